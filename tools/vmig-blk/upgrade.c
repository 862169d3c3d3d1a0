// SPDX-License-Identifier: MIT
/*
 * Live upgrade of vmig-blk without a vhost-user disconnect: the running
 * daemon quiesces its rings (every in-flight request finishes, so the rings
 * and the in-flight region are consistent), writes its state to a memfd,
 * clears FD_CLOEXEC on everything the new process needs and execs the new
 * binary with the same arguments. The new process finds the memfd through
 * VMIG_BLK_UPGRADE_FD, maps guest memory, the dirty log and the in-flight
 * region again from the inherited fds, restarts the rings where they stood
 * and answers the RPC client that asked for the upgrade. QEMU sees nothing:
 * same socket, same eventfds, same memory.
 *
 * The target is the binary fixed at start (--upgrade-binary, by default our
 * own executable as /proc/self/exe named it then), never one named by the
 * request: whoever can reach the RPC socket must not be able to run code
 * that inherits guest memory and the disk. Before quiescing, it is opened
 * and checked (open_binary: only root or our user could have written it),
 * then run with --version from that open file; a binary that fails either
 * check, or is not a vmig-blk speaking this state format, is refused while
 * the old process still serves. The exec runs the same open file. exec
 * itself is the point of no return; if it fails, the rings restart here and
 * the caller gets the error.
 *
 * The state blob comes from the previous process of the same daemon: it is
 * trusted to be well-meant, but still checked (magic, version, size, counts,
 * fds) so a mismatched pair of binaries fails cleanly.
 */
#include "blk.h"
#include "util/util.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define STATE_MAGIC 0x3150554b4c42564dull /* "MVBLKUP1" */
/* 2: adds the back-end kind, the poll window and the poll statistics. */
#define STATE_VERSION 2
#define STATE_ENV "VMIG_BLK_UPGRADE_FD"
/* The fd that holds the image's lock (main.c, lock_image). Passed beside
 * the state rather than in it, so that the state format stays state-v2. */
#define LOCK_ENV "VMIG_BLK_LOCK_FD"
#define VERSION_TAG "state-v2"
/* Dirty tracking's granularity, when it was on: the new process turns it
 * on again with every block dirty (see take_dirty). Beside the state, like
 * the lock fd: a binary that knows nothing of it simply does not track. */
#define DIRTY_ENV "VMIG_BLK_DIRTY_GRANULARITY"

struct st_region {
	struct vhost_user_mem_region d;
	int32_t fd;
	uint32_t pad;
};

struct st_vring {
	struct vhost_user_vring_addr addr;
	uint64_t counter;
	uint64_t starts;
	int32_t kick_fd, call_fd, err_fd;
	uint16_t num, base;
	uint8_t addr_set, enabled, outcome, pad;
	uint16_t recovered;
	struct vblk_stats stats;
};

struct st {
	uint64_t magic;
	uint32_t version;
	uint32_t size;
	uint64_t quiesce_ns;
	uint64_t connections, upgrades;
	int32_t listen_fd, conn_fd, rpc_fd, reply_fd, disk_fd, log_fd, inflight_fd;
	uint32_t nqueues;
	uint64_t disk_size;
	uint32_t backend; /* enum vblk_backend: must match the new command line */
	uint32_t poll_us; /* may have been changed by RPC since start */
	uint64_t features, protocol;
	uint32_t features_set, nregions;
	struct st_region regions[VHOST_MAX_MEM_REGIONS];
	uint64_t log_size, log_offset;
	uint64_t inflight_size, inflight_offset;
	uint16_t inflight_nq, inflight_qs;
	uint32_t pad;
	struct st_vring vring[VHOST_MAX_QUEUES];
	char reply_id[512];
};

/* Is dir, a directory above the upgrade binary, safe from other users? */
static int check_dir(const char *dir, const char *binary, char *err, size_t errlen)
{
	struct stat st;

	if (stat(dir, &st) < 0) {
		int r = -errno;

		snprintf(err, errlen, "upgrade binary %s: cannot check directory %s: %s", binary,
			 dir, strerror(-r));
		return r;
	}
	if (st.st_uid != 0 && st.st_uid != geteuid()) {
		snprintf(err, errlen,
			 "upgrade binary %s: directory %s is owned by uid %d, not by root or the "
			 "daemon's uid %d",
			 binary, dir, (int)st.st_uid, (int)geteuid());
		return -EPERM;
	}
	/* Others may not replace what is in it, unless the sticky bit keeps
	 * them to their own files (/tmp). */
	if ((st.st_mode & (S_IWGRP | S_IWOTH)) && !(st.st_mode & S_ISVTX)) {
		snprintf(err, errlen,
			 "upgrade binary %s: directory %s is writable by its group or others (mode "
			 "%04o)",
			 binary, dir, (unsigned)(st.st_mode & 07777));
		return -EPERM;
	}
	return 0;
}

/* check_dir() on every directory above path (an absolute path, which is
 * cut down in place). */
static int check_dirs_above(char *path, const char *binary, char *err, size_t errlen)
{
	for (;;) {
		char *slash = strrchr(path, '/');
		int r;

		if (!slash)
			return 0;
		if (slash == path)
			slash[1] = '\0';
		else
			*slash = '\0';
		r = check_dir(path, binary, err, errlen);
		if (r || !strcmp(path, "/"))
			return r;
	}
}

/* The upgrade binary itself: a regular file of root or ours, that its
 * group and others may not write. */
static int check_file(const struct stat *st, const char *binary, char *err, size_t errlen)
{
	if (!S_ISREG(st->st_mode)) {
		snprintf(err, errlen, "upgrade binary %s is not a regular file", binary);
		return -EPERM;
	}
	if (st->st_uid != 0 && st->st_uid != geteuid()) {
		snprintf(err, errlen,
			 "upgrade binary %s is owned by uid %d, not by root or the daemon's uid %d",
			 binary, (int)st->st_uid, (int)geteuid());
		return -EPERM;
	}
	if (st->st_mode & (S_IWGRP | S_IWOTH)) {
		snprintf(err, errlen,
			 "upgrade binary %s is writable by its group or others (mode %04o)", binary,
			 (unsigned)(st->st_mode & 07777));
		return -EPERM;
	}
	return 0;
}

/*
 * Open the binary fixed at start (--upgrade-binary, or our own executable)
 * and check that only root or the daemon's own user could have put it
 * there: a regular file owned by one of them, not writable by its group
 * or others, and every directory above it (along its real path and along
 * the path as configured) the same, or sticky like /tmp. The checks are
 * on the open file, and the exec runs that very file (fexecve): replacing
 * the path after the check changes nothing. Returns the fd (close-on-exec)
 * or -errno with the reason in err.
 */
static int open_binary(const char *binary, char *err, size_t errlen)
{
	char proc[64], real[PATH_MAX];
	struct stat st;
	ssize_t n;
	int fd, r;

	if (!binary[0]) {
		snprintf(err, errlen,
			 "no upgrade binary: our executable was not readable at start "
			 "(give --upgrade-binary)");
		return -ENOENT;
	}
	fd = open(binary, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0) {
		r = -errno;
		snprintf(err, errlen, "upgrade binary %s: %s", binary, strerror(-r));
		return r;
	}
	r = fstat(fd, &st) < 0 ? -errno : 0;
	if (r)
		snprintf(err, errlen, "upgrade binary %s: %s", binary, strerror(-r));
	else
		r = check_file(&st, binary, err, errlen);
	if (r == 0) {
		snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
		n = readlink(proc, real, sizeof(real) - 1);
		if (n <= 0 || real[0] != '/') {
			r = -ENOENT;
			snprintf(err, errlen, "upgrade binary %s: cannot resolve its path", binary);
		} else {
			real[n] = '\0';
		}
	}
	/* Every directory from the file's own up to the root: those of its
	 * real path, and those of the path as configured, where a symlink
	 * that leads to it may live. */
	if (r == 0)
		r = check_dirs_above(real, binary, err, errlen);
	if (r == 0) {
		snprintf(real, sizeof(real), "%s", binary);
		r = check_dirs_above(real, binary, err, errlen);
	}
	if (r) {
		close(fd);
		return r;
	}
	return fd;
}

/*
 * Run the binary (open as fd) with our own arguments and --version last,
 * and check it is a vmig-blk with our state format. It reads the
 * arguments it will be started with before it reaches --version, so a
 * binary that does not know one of them (an older one, and an option added
 * since) is refused here, while this process still serves, and not after
 * the exec, where it could only exit.
 */
static int preflight(int bfd, const char *binary, char *const *argv, char *err, size_t errlen)
{
	char out[256] = {0};
	size_t len = 0, argc = 0;
	int pfd[2], status;
	char **args;
	pid_t pid;

	while (argv[argc])
		argc++;
	args = calloc(argc + 2, sizeof(*args));
	if (!args)
		return -ENOMEM;
	args[0] = (char *)binary;
	for (size_t i = 1; i < argc; i++)
		args[i] = argv[i];
	args[argc ? argc : 1] = "--version";
	if (pipe2(pfd, O_CLOEXEC)) {
		free(args);
		return -errno;
	}
	pid = fork();
	if (pid == 0) {
		dup2(pfd[1], 1);
		dup2(pfd[1], 2); /* what it says about an argument it refuses */
		fexecve(bfd, args, environ);
		dprintf(1, "cannot exec: %s", strerror(errno));
		_exit(127);
	}
	close(pfd[1]);
	free(args);
	for (int waited = 0; pid > 0 && len < sizeof(out) - 1 && waited < 5000; waited += 50) {
		struct pollfd p = {.fd = pfd[0], .events = POLLIN};
		ssize_t n;

		if (poll(&p, 1, 50) <= 0)
			continue;
		n = read(pfd[0], out + len, sizeof(out) - 1 - len);
		if (n <= 0)
			break;
		len += (size_t)n;
	}
	close(pfd[0]);
	if (pid < 0)
		return -errno;
	kill(pid, SIGKILL); /* no-op if it already exited */
	waitpid(pid, &status, 0);
	if (strncmp(out, "vmig-blk ", 9) || !strstr(out, VERSION_TAG)) {
		snprintf(err, errlen,
			 "%s is not a compatible vmig-blk, or refuses this daemon's arguments "
			 "(it said \"%.120s\")",
			 binary, out);
		return -ENOEXEC;
	}
	return 0;
}

static void save(struct vblk_daemon *dm, struct st *s, int reply_fd, const char *id_json)
{
	const struct vhost_dev *d = &dm->dev;

	memset(s, 0, sizeof(*s));
	s->magic = STATE_MAGIC;
	s->version = STATE_VERSION;
	s->size = sizeof(*s);
	s->connections = dm->connections;
	s->upgrades = dm->upgrades;
	s->listen_fd = dm->listen_fd;
	s->conn_fd = dm->conn_fd;
	s->rpc_fd = dm->rpc_fd;
	s->reply_fd = reply_fd;
	s->disk_fd = dm->disk.fd;
	s->disk_size = dm->disk.size;
	s->backend = dm->disk.backend;
	s->poll_us = dm->poll_us;
	s->nqueues = dm->nqueues;
	s->features = d->features;
	s->protocol = d->protocol;
	s->features_set = d->features_set;
	s->nregions = d->mem.nregions;
	for (uint32_t i = 0; i < d->mem.nregions; i++) {
		const struct vhost_mem_region *r = &d->mem.r[i];

		s->regions[i].d =
		    (struct vhost_user_mem_region){r->gpa, r->size, r->uva, r->mmap_offset};
		s->regions[i].fd = r->fd;
	}
	s->log_fd = d->log.bits ? d->log.fd : -1;
	s->log_size = d->log.size;
	s->log_offset = d->log.mmap_offset;
	s->inflight_fd = d->inflight.map ? d->inflight.fd : -1;
	s->inflight_size = d->inflight.size;
	s->inflight_offset = d->inflight.offset;
	s->inflight_nq = d->inflight.nqueues;
	s->inflight_qs = d->inflight.queue_size;
	for (unsigned i = 0; i < dm->nqueues; i++) {
		const struct vhost_vring *vr = &d->vring[i];
		struct st_vring *v = &s->vring[i];

		v->addr = vr->addr;
		v->counter = vr->vq.counter;
		v->starts = vr->starts;
		v->kick_fd = vr->kick_fd;
		v->call_fd = vr->call_fd;
		v->err_fd = vr->err_fd;
		v->num = vr->num;
		v->base = vr->base;
		v->addr_set = vr->addr_set;
		v->enabled = vr->enabled;
		v->outcome = (uint8_t)vr->recovery.outcome;
		v->recovered = vr->recovery.nresubmit;
		vblk_stats_read(&dm->q[i], &v->stats);
	}
	snprintf(s->reply_id, sizeof(s->reply_id), "%s", id_json);
}

/* Set or clear FD_CLOEXEC on every fd the state names. */
static void set_cloexec(const struct st *s, bool on)
{
	int fds[7 + VHOST_MAX_MEM_REGIONS + 3 * VHOST_MAX_QUEUES];
	unsigned n = 0;

	fds[n++] = s->listen_fd;
	fds[n++] = s->conn_fd;
	fds[n++] = s->rpc_fd;
	fds[n++] = s->reply_fd;
	fds[n++] = s->disk_fd;
	fds[n++] = s->log_fd;
	fds[n++] = s->inflight_fd;
	for (uint32_t i = 0; i < s->nregions && i < VHOST_MAX_MEM_REGIONS; i++)
		fds[n++] = s->regions[i].fd;
	for (uint32_t i = 0; i < s->nqueues && i < VHOST_MAX_QUEUES; i++) {
		fds[n++] = s->vring[i].kick_fd;
		fds[n++] = s->vring[i].call_fd;
		fds[n++] = s->vring[i].err_fd;
	}
	for (unsigned i = 0; i < n; i++)
		if (fds[i] >= 0)
			fcntl(fds[i], F_SETFD, on ? FD_CLOEXEC : 0);
}

int vblk_upgrade(struct vblk_daemon *dm, int reply_fd, const char *id_json, char *err,
		 size_t errlen)
{
	static struct st s; /* not on the stack: it is a few KiB */
	const char *binary = dm->upgrade_binary;
	char env[32];
	uint64_t t0;
	int fd, bfd, r;

	if (strlen(id_json) >= sizeof(s.reply_id)) {
		snprintf(err, errlen, "request id too long");
		return -EINVAL;
	}
	/* The userfaultfd of a post-copy migration is registered on our
	 * mappings and its faults are served by QEMU; the new image would
	 * have to re-register and tell QEMU new addresses, which the protocol
	 * cannot do mid-migration. Refuse until POSTCOPY_END. */
	if (dm->dev.pc.state != VHOST_PC_OFF) {
		snprintf(err, errlen, "post-copy migration in progress");
		return -EBUSY;
	}
	bfd = open_binary(binary, err, errlen);
	if (bfd < 0) {
		vblk_log(dm, "upgrade refused: %s", err);
		return bfd;
	}
	r = preflight(bfd, binary, dm->argv, err, errlen);
	if (r) {
		close(bfd);
		return r;
	}
	fd = memfd_create("vmig-blk-state", 0); /* inherited on purpose */
	if (fd < 0) {
		r = -errno;
		snprintf(err, errlen, "memfd: %s", strerror(-r));
		close(bfd);
		return r;
	}
	/* The pause starts here: rings stop, in-flight requests finish. */
	vblk_log(dm, "upgrading to %s", binary);
	t0 = vmig__now_ns();

	vhost_dev_stop_all(&dm->dev);
	save(dm, &s, reply_fd, id_json);
	s.quiesce_ns = t0;
	r = vmig__write_full(fd, &s, sizeof(s));
	if (r == 0) {
		snprintf(env, sizeof(env), "%d", fd);
		set_cloexec(&s, false);
		setenv(STATE_ENV, env, 1);
		if (dm->disk.lock_fd >= 0) {
			snprintf(env, sizeof(env), "%d", dm->disk.lock_fd);
			fcntl(dm->disk.lock_fd, F_SETFD, 0);
			setenv(LOCK_ENV, env, 1);
		}
		if (dm->disk.dirty) {
			snprintf(env, sizeof(env), "%u", dm->disk.dirty->granularity);
			setenv(DIRTY_ENV, env, 1);
		}
		fexecve(bfd, dm->argv, environ);
		r = -errno;
		unsetenv(STATE_ENV);
		unsetenv(LOCK_ENV);
		unsetenv(DIRTY_ENV);
		if (dm->disk.lock_fd >= 0)
			fcntl(dm->disk.lock_fd, F_SETFD, FD_CLOEXEC);
		set_cloexec(&s, true);
	}
	close(fd);
	close(bfd);
	snprintf(err, errlen, "exec %s: %s", binary, strerror(-r));
	if (vhost_dev_start_ready(&dm->dev))
		vblk_log(dm, "after a failed upgrade: %s", dm->dev.err);
	return r;
}

static int load(int fd, struct st *s)
{
	if (pread(fd, s, sizeof(*s), 0) != (ssize_t)sizeof(*s))
		return -EIO;
	if (s->magic != STATE_MAGIC || s->version != STATE_VERSION || s->size != sizeof(*s))
		return -EPROTO;
	if (s->nregions > VHOST_MAX_MEM_REGIONS || s->nqueues > VHOST_MAX_QUEUES ||
	    s->reply_id[sizeof(s->reply_id) - 1] != '\0')
		return -EPROTO;
	return 0;
}

static int restore_dev(struct vblk_daemon *dm, const struct st *s)
{
	struct vhost_dev *d = &dm->dev;
	int r;

	vhost_dev_init(d, dm->nqueues, vblk_device_features(&dm->disk, dm->nqueues), &vblk_dev_ops,
		       dm->q);
	d->features = s->features;
	d->protocol = s->protocol;
	d->features_set = s->features_set;
	for (uint32_t i = 0; i < s->nregions; i++) {
		r = vhost_mem_add(&d->mem, &s->regions[i].d, s->regions[i].fd);
		if (r)
			return r;
	}
	if (s->log_fd >= 0 && (r = vhost_log_map(&d->log, s->log_fd, s->log_size, s->log_offset)))
		return r;
	if (s->inflight_fd >= 0 &&
	    (r = vhost_dev_map_inflight(d, s->inflight_fd, s->inflight_size, s->inflight_offset,
					s->inflight_nq, s->inflight_qs)))
		return r;
	for (unsigned i = 0; i < dm->nqueues; i++) {
		const struct st_vring *v = &s->vring[i];
		struct vhost_vring *vr = &d->vring[i];

		if (v->num > VHOST_MAX_QUEUE_SIZE || (v->num & (v->num - 1)))
			return -EPROTO;
		vr->addr = v->addr;
		vr->vq.counter = v->counter;
		vr->starts = v->starts;
		vr->kick_fd = v->kick_fd;
		vr->call_fd = v->call_fd;
		vr->err_fd = v->err_fd;
		vr->num = v->num;
		vr->base = v->base;
		vr->addr_set = v->addr_set;
		vr->enabled = v->enabled;
		vr->need_recover = false; /* quiesced: base is exact */
		vr->recovery.outcome = v->outcome;
		vr->recovery.nresubmit = v->recovered;
		memcpy(&dm->q[i].stats, &v->stats, sizeof(v->stats));
	}
	return 0;
}

static void reply(struct vblk_daemon *dm, const struct st *s, uint64_t ready_ns)
{
	double pause_ms = (double)(ready_ns - s->quiesce_ns) / 1e6;
	char result[4096 + 128];

	snprintf(result, sizeof(result),
		 "{\"pause_ms\":%.3f,\"pid\":%d,\"binary\":\"%s\",\"upgrades\":%llu,"
		 "\"connections\":%llu}",
		 pause_ms, (int)getpid(), dm->exe, (unsigned long long)dm->upgrades,
		 (unsigned long long)dm->connections);
	if (strchr(dm->exe, '"') || strchr(dm->exe, '\\'))
		snprintf(result, sizeof(result), "{\"pause_ms\":%.3f,\"pid\":%d}", pause_ms,
			 (int)getpid());
	if (s->reply_fd >= 0) {
		vblk_rpc_send(s->reply_fd, s->reply_id, result, 0, NULL);
		close(s->reply_fd);
	}
	vblk_log(dm, "resumed after upgrade %llu, pause %.3f ms", (unsigned long long)dm->upgrades,
		 pause_ms);
}

/* The lock fd the previous process handed over, or -1. */
static int take_lock_fd(void)
{
	const char *env = getenv(LOCK_ENV);
	char *end;
	long fd;

	if (!env)
		return -1;
	fd = strtol(env, &end, 10);
	unsetenv(LOCK_ENV);
	if (*end || end == env || fd < 0 || fd > 1 << 20 || fcntl((int)fd, F_GETFD) < 0)
		return -1;
	fcntl((int)fd, F_SETFD, FD_CLOEXEC);
	return (int)fd;
}

/*
 * Dirty tracking was on before the upgrade: turn it on again, before any
 * ring restarts, with every block dirty. The bitmap itself is not handed
 * over: the old process's bits are a subset of "all", a copier that
 * takes everything again loses nothing, and passing it would need its own
 * memfd and format for a case (an upgrade in the middle of a storage
 * migration) where one more full pass is cheap next to being wrong. The
 * same holds after a crash, where there is no bitmap to hand over at all:
 * a copier that finds tracking off must start over.
 */
static void take_dirty(struct vblk_daemon *dm)
{
	const char *env = getenv(DIRTY_ENV);
	unsigned long gran;
	char *end;
	int r;

	if (!env)
		return;
	gran = strtoul(env, &end, 10);
	unsetenv(DIRTY_ENV);
	r = *end || end == env || gran > UINT32_MAX ? -EINVAL
						    : vblk_dirty_start(dm, (uint32_t)gran, true);
	if (r)
		vblk_log(dm, "warning: dirty tracking not resumed after the upgrade: %s",
			 strerror(-r));
	else
		vblk_log(dm, "dirty tracking resumed after the upgrade, every block dirty");
}

int vblk_upgrade_resume(struct vblk_daemon *dm)
{
	static struct st s;
	const char *env = getenv(STATE_ENV);
	char *end;
	long fd;
	int r, lock_fd = take_lock_fd();

	if (!env) {
		if (lock_fd >= 0)
			close(lock_fd);
		return 0;
	}
	fd = strtol(env, &end, 10);
	unsetenv(STATE_ENV);
	if (*end || fd < 0 || fd > 1 << 20)
		return -EINVAL;
	r = load((int)fd, &s);
	close((int)fd);
	if (r)
		return r;
	set_cloexec(&s, true);
	if (s.nqueues != dm->nqueues)
		return -EPROTO;
	r = vblk_disk_open(dm, s.disk_fd, lock_fd);
	if (r)
		return r;
	if (dm->disk.size != s.disk_size || (uint32_t)dm->disk.backend != s.backend ||
	    s.poll_us > VBLK_MAX_POLL_US)
		return -EPROTO;
	dm->poll_us = s.poll_us;
	for (unsigned i = 0; i < dm->nqueues; i++)
		vblk_queue_set_poll(&dm->q[i], dm->poll_us);
	take_dirty(dm);
	dm->listen_fd = s.listen_fd;
	dm->conn_fd = s.conn_fd;
	if (dm->conn_fd >= 0) /* a connection from a binary that did not */
		vblk_conn_setup(dm->conn_fd);
	dm->rpc_fd = s.rpc_fd;
	/* The files our listening sockets are bound to, removed at exit. */
	vblk_sock_id_of(dm->opts.socket, &dm->sock_id);
	vblk_sock_id_of(dm->rpc_path, &dm->rpc_id);
	dm->connections = s.connections;
	dm->upgrades = s.upgrades + 1;
	r = restore_dev(dm, &s);
	if (r)
		return r;
	if (vhost_dev_start_ready(&dm->dev))
		vblk_log(dm, "after upgrade: %s", dm->dev.err);
	reply(dm, &s, vmig__now_ns());
	return 1;
}
