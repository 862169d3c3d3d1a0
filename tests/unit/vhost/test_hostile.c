// SPDX-License-Identifier: MIT
/*
 * A hostile vhost-user front-end against the real vmig-blk daemon, over its
 * unix socket, with no QEMU: the program named by argv[1] is started on a
 * file image and fed, connection after connection, what a malicious or
 * broken front-end (or the guest behind it) can send:
 *
 * - memory tables that are malformed, overlapping, larger than their fd,
 *   wrapping around, not mappable, or more than the slots we offer;
 * - rings outside guest memory, misaligned, of bad sizes;
 * - descriptors outside guest memory or straddling its end, loops, chains
 *   that run off the table, indirect tables out of bounds, nested, split
 *   across regions or too long, lengths past 4 GiB (a 4 GiB region lets a
 *   chain add up to more than 64 GiB), bad discard segments;
 * - avail indexes that jump by more than the ring, heads out of range, a
 *   head posted twice while in flight;
 * - framing abuse: oversized headers, a message cut short and never
 *   finished, replies never read, too many fds, random messages;
 * - after a kill -9 and restart, an in-flight region scribbled in every way
 *   the recovery checks for, and random bytes;
 * - descriptors and the in-flight region rewritten while the queue runs.
 *
 * Each case must end in an error (an error ack, an error status, a request
 * returned with length 0, or the ring's error eventfd), or in the daemon
 * dropping the connection; never in a crash or a hang. After each case the
 * daemon must still be alive, answer its RPC socket, and serve a new
 * connection correctly (a write read back). Guest memory is one memfd whose
 * two regions are separated (and followed) by areas the memory table never
 * maps, filled with a secret pattern: it must stay intact (no write outside
 * guest memory), and must never reach the disk image (no read outside).
 * The daemon's open fds are counted before and after, so a case that leaks
 * descriptors fails too. In the ASan+UBSan build the daemon is the ASan
 * one: a memory error aborts it, and the case fails.
 *
 * Usage: vhost-test_hostile PATH-TO-VMIG-BLK
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/virtio_blk.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "vhost/vhost.h"

/* Guest memory: one memfd. Region A is guest physical [0, 1 MiB) at memfd
 * offset 0, region B is guest physical [1 MiB, 2 MiB) at memfd offset
 * 2 MiB; memfd [1 MiB, 2 MiB) and [3 MiB, 4 MiB) are never in the table. */
#define MIB (1u << 20)
#define GM_SIZE (4u * MIB)
#define R_SIZE MIB
#define RB_OFF (2u * MIB)
#define GPA_B R_SIZE
#define GPA_END (2u * MIB) /* first guest physical address not mapped */
#define UVA_A 0x7f1000000000ull
#define UVA_B 0x7f2000000000ull
#define SECRET "SECRET-CANARY-42" /* 16 bytes, fills the unmapped areas */

/* Layout inside region A (guest physical). */
#define NUM 16
#define G_DESC 0x1000ull
#define G_AVAIL 0x2000ull
#define G_USED 0x3000ull
#define G_IND 0x4000ull	   /* indirect tables, 16 KiB: 1024 entries */
#define G_HDR 0x8000ull	   /* request headers, 32 bytes per head */
#define G_STATUS 0x9000ull /* status bytes, one per head */
#define G_SEG 0xa000ull	   /* discard / write-zeroes segments */
#define G_DATA 0x10000ull  /* 4 KiB per head */
#define G_BIG 0x100000000ull
#define BIG_SIZE (0x100000000ull + 0x10000) /* 4 GiB + 64 KiB, sparse */

#define IMG_SIZE (16u * MIB)
#define WAIT_MS 10000 /* bound on every wait for the daemon */

#define PROTO_WANTED                                                                               \
	((1ull << VHOST_USER_PROTOCOL_F_MQ) | (1ull << VHOST_USER_PROTOCOL_F_LOG_SHMFD) |          \
	 (1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK) | (1ull << VHOST_USER_PROTOCOL_F_CONFIG) |      \
	 (1ull << VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) |                                          \
	 (1ull << VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS))
#define FEAT_BASE ((1ull << VIRTIO_F_VERSION_1) | (1ull << VHOST_USER_F_PROTOCOL_FEATURES))
#define FEAT_STD (FEAT_BASE | (1ull << VIRTIO_RING_F_INDIRECT_DESC))

struct wire {
	struct vhost_user_hdr hdr;
	union vhost_user_payload p;
} __attribute__((packed));

struct fe {
	int sock;
	int kick, call, err;
	int inflight_fd;
	void *inflight;
	size_t inflight_len;
};

static struct {
	const char *bin;
	char dir[256];
	char sock[300], rpc[300], image[300], log[300];
	pid_t pid;
	int gm_fd;
	uint8_t *gm;
	uint16_t avail_idx;
	unsigned sanity_runs;
	int open[8]; /* connections a failed case may have left open, + 1 */
} T;

/* ---- small helpers ---- */

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

/* Our pointer to guest physical gpa (regions A and B only). */
static void *gp(uint64_t gpa)
{
	if (gpa < R_SIZE)
		return T.gm + gpa;
	if (gpa < GPA_END)
		return T.gm + RB_OFF + (gpa - GPA_B);
	fail_msg("gpa 0x%llx is not test memory", (unsigned long long)gpa);
	return NULL;
}

static struct vhost_desc *desc_table(void)
{
	return gp(G_DESC);
}
static struct vhost_avail *avail(void)
{
	return gp(G_AVAIL);
}
static struct vhost_used *used(void)
{
	return gp(G_USED);
}

static void print_log_tail(void)
{
	char buf[4096];
	int fd = open(T.log, O_RDONLY);
	off_t end;
	ssize_t n;

	if (fd < 0)
		return;
	end = lseek(fd, 0, SEEK_END);
	lseek(fd, end > (off_t)sizeof(buf) - 1 ? end - (off_t)sizeof(buf) + 1 : 0, SEEK_SET);
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n > 0) {
		buf[n] = 0;
		fprintf(stderr, "--- daemon log (tail) ---\n%s\n---\n", buf);
	}
}

static bool log_contains(const char *needle)
{
	static char buf[1 << 20];
	int fd = open(T.log, O_RDONLY);
	ssize_t n;

	if (fd < 0)
		return false;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	buf[n > 0 ? n : 0] = 0;
	return strstr(buf, needle) != NULL;
}

/* ---- the daemon ---- */

static bool daemon_alive(void)
{
	int st;
	pid_t r = waitpid(T.pid, &st, WNOHANG);

	if (r == 0)
		return true;
	if (r == T.pid) {
		fprintf(stderr, "daemon died: %s %d\n", WIFSIGNALED(st) ? "signal" : "exit status",
			WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
		print_log_tail();
		T.pid = -1;
	}
	return false;
}

static int connect_path(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int r = -errno;

		close(fd);
		return r;
	}
	return fd;
}

/* One JSON-RPC call; the reply text (one line) goes to out. 0 or -errno. */
static int rpc(const char *method, const char *params, char *out, size_t outlen, int timeout_ms)
{
	char req[512];
	size_t len = 0;
	uint64_t end = now_ms() + (uint64_t)timeout_ms;
	int fd = connect_path(T.rpc), n;

	if (fd < 0)
		return fd;
	n = snprintf(req, sizeof(req), "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"%s\"%s%s}\n",
		     method, params ? ",\"params\":" : "", params ? params : "");
	if (send(fd, req, (size_t)n, MSG_NOSIGNAL) != n) {
		close(fd);
		return -EIO;
	}
	out[0] = 0;
	while (len + 1 < outlen && !memchr(out, '\n', len)) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int64_t left = (int64_t)(end - now_ms());
		ssize_t r;

		if (left <= 0 || poll(&p, 1, (int)left) <= 0) {
			close(fd);
			return -ETIMEDOUT;
		}
		r = recv(fd, out + len, outlen - 1 - len, 0);
		if (r <= 0) {
			close(fd);
			return -EPIPE;
		}
		len += (size_t)r;
		out[len] = 0;
	}
	close(fd);
	return 0;
}

static char rpc_buf[65536];

/* The controller as JSON text (asserts the daemon answers). */
static const char *controllers(void)
{
	assert_int_equal(rpc("vhost_get_controllers", NULL, rpc_buf, sizeof(rpc_buf), WAIT_MS), 0);
	return rpc_buf;
}

/* Wait until the daemon's RPC says `needle`; true if it did in time. */
static bool wait_rpc(const char *method, const char *needle, unsigned ms)
{
	uint64_t end = now_ms() + ms;

	do {
		if (rpc(method, NULL, rpc_buf, sizeof(rpc_buf), WAIT_MS) == 0 &&
		    strstr(rpc_buf, needle))
			return true;
		usleep(5000);
	} while (now_ms() < end);
	fprintf(stderr, "RPC %s never showed %s; last: %.400s\n", method, needle, rpc_buf);
	return false;
}

static void daemon_start(void)
{
	char want[64];
	uint64_t end;
	pid_t pid = fork();

	assert_true(pid >= 0);
	if (pid == 0) {
		int lfd = open(T.log, O_WRONLY | O_CREAT | O_APPEND, 0644);

		if (lfd >= 0) {
			dup2(lfd, 1);
			dup2(lfd, 2);
		}
		execl(T.bin, T.bin, "--socket", T.sock, "--file", T.image, "--rpc", T.rpc,
		      "--serial", "hostile", (char *)NULL);
		_exit(127);
	}
	T.pid = pid;
	snprintf(want, sizeof(want), "\"pid\":%d,", (int)pid);
	end = now_ms() + WAIT_MS;
	while (now_ms() < end) {
		if (rpc("vhost_get_controllers", NULL, rpc_buf, sizeof(rpc_buf), 1000) == 0 &&
		    strstr(rpc_buf, want))
			return;
		if (!daemon_alive())
			fail_msg("daemon exited at start");
		usleep(10000);
	}
	print_log_tail();
	fail_msg("daemon did not come up");
}

static void daemon_kill9(void)
{
	int st;

	kill(T.pid, SIGKILL);
	waitpid(T.pid, &st, 0);
	T.pid = -1;
}

/* SIGTERM; the daemon must exit 0 (under ASan: also no leak report). */
static int daemon_stop(void)
{
	uint64_t end = now_ms() + WAIT_MS;
	int st;

	if (T.pid <= 0)
		return -1;
	kill(T.pid, SIGTERM);
	while (now_ms() < end) {
		pid_t r = waitpid(T.pid, &st, WNOHANG);

		if (r == T.pid) {
			T.pid = -1;
			if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
				return 0;
			fprintf(stderr, "daemon stopped with %s %d\n",
				WIFSIGNALED(st) ? "signal" : "status",
				WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
			print_log_tail();
			return -1;
		}
		usleep(10000);
	}
	kill(T.pid, SIGKILL);
	waitpid(T.pid, &st, 0);
	T.pid = -1;
	fprintf(stderr, "daemon ignored SIGTERM\n");
	print_log_tail();
	return -1;
}

static int daemon_fds(void)
{
	char path[64];
	struct dirent *e;
	DIR *d;
	int n = 0;

	snprintf(path, sizeof(path), "/proc/%d/fd", (int)T.pid);
	d = opendir(path);
	if (!d)
		return -1;
	while ((e = readdir(d)))
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

/* The daemon's fd count once the RPC clients we closed are gone. */
static int settled_fds(void)
{
	int n = daemon_fds();

	for (int i = 0; i < 30; i++) {
		int m = daemon_fds();

		n = m < n ? m : n;
		usleep(10000);
	}
	return n;
}

/* The daemon's fd count returns to n (an RPC client we just closed may
 * take it a moment to notice). */
static bool fds_back_to(int n)
{
	uint64_t end = now_ms() + WAIT_MS;
	char cmd[128];

	do {
		if (daemon_fds() == n)
			return true;
		usleep(10000);
	} while (now_ms() < end);
	fprintf(stderr, "the daemon has %d fds, had %d:\n", daemon_fds(), n);
	snprintf(cmd, sizeof(cmd), "ls -l /proc/%d/fd >&2", (int)T.pid);
	if (system(cmd) != 0)
		fprintf(stderr, "(cannot list them)\n");
	return false;
}

/* ---- vhost-user framing ---- */

static int send_fds(int sock, const void *buf, size_t len, const int *fds, unsigned nfds)
{
	char ctl[CMSG_SPACE(sizeof(int) * 64)];
	struct iovec iov = {(void *)buf, len};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
	ssize_t n;

	if (nfds) {
		struct cmsghdr *c;

		memset(ctl, 0, sizeof(ctl));
		mh.msg_control = ctl;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
	}
	do
		n = sendmsg(sock, &mh, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	return (size_t)n == len ? 0 : -EIO;
}

static int fe_send(struct fe *f, uint32_t req, uint32_t flags, const void *p, uint32_t size,
		   const int *fds, unsigned nfds)
{
	struct wire w;

	memset(&w, 0, sizeof(w));
	w.hdr.request = req;
	w.hdr.flags = VHOST_USER_VERSION | flags;
	w.hdr.size = size;
	if (size)
		memcpy(&w.p, p, size);
	return send_fds(f->sock, &w, sizeof(w.hdr) + size, fds, nfds);
}

static int read_full(int fd, void *buf, size_t len, uint64_t end)
{
	uint8_t *p = buf;

	while (len) {
		struct pollfd pf = {.fd = fd, .events = POLLIN};
		int64_t left = (int64_t)(end - now_ms());
		ssize_t n;

		if (left <= 0 || poll(&pf, 1, (int)left) <= 0)
			return -ETIMEDOUT;
		n = recv(fd, p, len, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -EPIPE; /* EOF or reset: the daemon dropped us */
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Receive one reply (with at most one fd). 0, -EPIPE, -ETIMEDOUT. */
static int fe_recv(struct fe *f, struct wire *w, int *fd_out)
{
	char ctl[CMSG_SPACE(sizeof(int) * 8)];
	struct iovec iov = {&w->hdr, sizeof(w->hdr)};
	struct msghdr mh = {
	    .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof(ctl)};
	uint64_t end = now_ms() + WAIT_MS;
	struct pollfd pf = {.fd = f->sock, .events = POLLIN};
	ssize_t n;

	if (fd_out)
		*fd_out = -1;
	if (poll(&pf, 1, WAIT_MS) <= 0)
		return -ETIMEDOUT;
	n = recvmsg(f->sock, &mh, MSG_CMSG_CLOEXEC);
	if (n <= 0)
		return -EPIPE;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		int nf = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));

		for (int i = 0; i < nf; i++) {
			int fd;

			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			if (fd_out && *fd_out < 0)
				*fd_out = fd;
			else
				close(fd);
		}
	}
	if ((size_t)n < sizeof(w->hdr) &&
	    read_full(f->sock, (uint8_t *)&w->hdr + n, sizeof(w->hdr) - (size_t)n, end))
		return -EPIPE;
	if (w->hdr.size > sizeof(w->p))
		fail_msg("reply of %u bytes", w->hdr.size);
	return w->hdr.size ? read_full(f->sock, &w->p, w->hdr.size, end) : 0;
}

/* Send with NEED_REPLY and read the ack: 0 = ok, > 0 = the error it
 * carries, -EPIPE = the daemon dropped the connection. */
static int fe_ack(struct fe *f, uint32_t req, const void *p, uint32_t size, const int *fds,
		  unsigned nfds)
{
	struct wire w;
	int r = fe_send(f, req, VHOST_USER_NEED_REPLY_MASK, p, size, fds, nfds);

	if (r)
		return -EPIPE;
	r = fe_recv(f, &w, NULL);
	if (r == -EPIPE)
		return r;
	assert_int_equal(r, 0);
	assert_int_equal(w.hdr.request, req);
	assert_true(w.hdr.flags & VHOST_USER_REPLY_MASK);
	assert_int_equal(w.hdr.size, 8);
	return w.p.u64 > 0x7fffffff ? 0x7fffffff : (int)w.p.u64;
}

static int ack_u64(struct fe *f, uint32_t req, uint64_t v)
{
	return fe_ack(f, req, &v, 8, NULL, 0);
}

static int ack_state(struct fe *f, uint32_t req, uint32_t idx, uint32_t num)
{
	struct vhost_user_vring_state s = {idx, num};

	return fe_ack(f, req, &s, sizeof(s), NULL, 0);
}

/* A request with its own reply (GET_*): reply payload into *w. */
static int fe_get(struct fe *f, uint32_t req, const void *p, uint32_t size, struct wire *w,
		  int *fd_out)
{
	int r = fe_send(f, req, 0, p, size, NULL, 0);

	return r ? -EPIPE : fe_recv(f, w, fd_out);
}

/* True once the daemon has closed the connection (replies are skipped). */
static bool fe_dropped(struct fe *f)
{
	uint64_t end = now_ms() + WAIT_MS;
	char buf[4096];

	while (now_ms() < end) {
		struct pollfd pf = {.fd = f->sock, .events = POLLIN};
		ssize_t n;

		if (poll(&pf, 1, 100) <= 0)
			continue;
		n = recv(f->sock, buf, sizeof(buf), MSG_DONTWAIT);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
			return true;
	}
	return false;
}

/* An error ack or a dropped connection: both end a hostile message. */
static void assert_refused(int r)
{
	if (r == 0)
		fail_msg("the daemon accepted it");
}

static bool wait_fd(int fd, unsigned ms)
{
	struct pollfd p = {.fd = fd, .events = POLLIN};

	return poll(&p, 1, (int)ms) == 1;
}

/* ---- a front-end connection ---- */

enum {
	UP_NO_INDIRECT = 1,
	UP_INFLIGHT = 2,      /* GET + SET_INFLIGHT_FD: a fresh region */
	UP_KEEP_INFLIGHT = 4, /* SET_INFLIGHT_FD with the region in *f */
	UP_NO_RING = 8,	      /* stop after the memory table */
	UP_BIG = 16,	      /* also map the 4 GiB region at G_BIG */
};

static void fe_connect(struct fe *f)
{
	int fd = -1;
	uint64_t end = now_ms() + WAIT_MS;

	while (now_ms() < end && (fd = connect_path(T.sock)) < 0)
		usleep(10000);
	assert_true(fd >= 0);
	f->sock = fd;
	for (unsigned i = 0; i < 8; i++) {
		if (!T.open[i]) {
			T.open[i] = fd + 1;
			break;
		}
	}
	f->kick = eventfd(0, EFD_CLOEXEC);
	f->call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	f->err = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	assert_true(f->kick >= 0 && f->call >= 0 && f->err >= 0);
}

static void fe_close_sock(struct fe *f)
{
	for (unsigned i = 0; i < 8; i++)
		if (T.open[i] == f->sock + 1)
			T.open[i] = 0;
	close(f->sock);
	f->sock = -1;
}

/* Close, and wait until the daemon is done with the connection: a ring it
 * still serves would write into the guest memory the next case resets. */
static void fe_close(struct fe *f)
{
	fe_close_sock(f);
	close(f->kick);
	close(f->call);
	close(f->err);
	f->sock = f->kick = f->call = f->err = -1;
	if (T.pid > 0 && daemon_alive())
		assert_true(wait_rpc("vhost_get_controllers", "\"connected\":false", WAIT_MS));
}

static void fe_drop_inflight(struct fe *f)
{
	if (f->inflight)
		munmap(f->inflight, f->inflight_len);
	if (f->inflight_fd >= 0)
		close(f->inflight_fd);
	f->inflight = NULL;
	f->inflight_fd = -1;
}

static void fe_handshake(struct fe *f, uint64_t features)
{
	struct wire w;

	assert_int_equal(fe_get(f, VHOST_USER_GET_FEATURES, NULL, 0, &w, NULL), 0);
	assert_true(w.p.u64 & (1ull << VHOST_USER_F_PROTOCOL_FEATURES));
	assert_int_equal(fe_get(f, VHOST_USER_GET_PROTOCOL_FEATURES, NULL, 0, &w, NULL), 0);
	assert_int_equal(w.p.u64 & PROTO_WANTED, PROTO_WANTED);
	{
		uint64_t v = PROTO_WANTED;

		assert_int_equal(fe_send(f, VHOST_USER_SET_PROTOCOL_FEATURES, 0, &v, 8, NULL, 0),
				 0);
	}
	assert_int_equal(fe_ack(f, VHOST_USER_SET_OWNER, NULL, 0, NULL, 0), 0);
	assert_int_equal(ack_u64(f, VHOST_USER_SET_FEATURES, features), 0);
}

static struct vhost_user_mem_region region_a(void)
{
	return (struct vhost_user_mem_region){0, R_SIZE, UVA_A, 0};
}

static struct vhost_user_mem_region region_b(void)
{
	return (struct vhost_user_mem_region){GPA_B, R_SIZE, UVA_B, RB_OFF};
}

/* SET_MEM_TABLE of n regions, all from fd (sent n times). */
static int fe_mem_table(struct fe *f, const struct vhost_user_mem_region *r, unsigned n, int fd,
			unsigned nfds)
{
	union vhost_user_payload p;
	int fds[VHOST_USER_MAX_FDS];

	/* Up to 15 regions fit the payload buffer: more than a table holds. */
	assert_true(8 + n * 32 <= sizeof(p) && nfds <= VHOST_USER_MAX_FDS);
	memset(&p, 0, sizeof(p));
	p.mem.nregions = n;
	memcpy(p.raw + 8, r, n * 32);
	for (unsigned i = 0; i < nfds; i++)
		fds[i] = fd;
	return fe_ack(f, VHOST_USER_SET_MEM_TABLE, &p, 8 + n * 32, fds, nfds);
}

static int big_fd(void)
{
	int fd = memfd_create("hostile-big", MFD_CLOEXEC);

	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)BIG_SIZE), 0);
	return fd;
}

static void ring_reset(void)
{
	memset(desc_table(), 0, 16 * NUM);
	memset(avail(), 0, 6 + 2 * NUM);
	memset(used(), 0, 6 + 8 * NUM);
	memset(gp(G_STATUS), 0xee, NUM);
	T.avail_idx = 0;
}

static int fe_ring(struct fe *f, uint16_t base)
{
	struct vhost_user_vring_addr a = {
	    .index = 0,
	    .desc_user_addr = UVA_A + G_DESC,
	    .avail_user_addr = UVA_A + G_AVAIL,
	    .used_user_addr = UVA_A + G_USED,
	};
	int r;

	if ((r = ack_state(f, VHOST_USER_SET_VRING_NUM, 0, NUM)) ||
	    (r = ack_state(f, VHOST_USER_SET_VRING_BASE, 0, base)) ||
	    (r = fe_ack(f, VHOST_USER_SET_VRING_ADDR, &a, sizeof(a), NULL, 0)) ||
	    (r = fe_ack(f, VHOST_USER_SET_VRING_CALL, &(uint64_t){0}, 8, &f->call, 1)) ||
	    (r = fe_ack(f, VHOST_USER_SET_VRING_ERR, &(uint64_t){0}, 8, &f->err, 1)))
		return r;
	return fe_ack(f, VHOST_USER_SET_VRING_KICK, &(uint64_t){0}, 8, &f->kick, 1);
}

static void fe_inflight(struct fe *f, bool fresh)
{
	struct vhost_user_inflight inf = {.num_queues = 1, .queue_size = NUM};
	struct wire w;

	if (fresh) {
		fe_drop_inflight(f);
		assert_int_equal(
		    fe_get(f, VHOST_USER_GET_INFLIGHT_FD, &inf, sizeof(inf), &w, &f->inflight_fd),
		    0);
		assert_true(f->inflight_fd >= 0);
		assert_int_equal(w.p.inflight.mmap_size, vhost_inflight_queue_size(NUM));
		f->inflight_len = (size_t)w.p.inflight.mmap_size;
		f->inflight = mmap(NULL, f->inflight_len, PROT_READ | PROT_WRITE, MAP_SHARED,
				   f->inflight_fd, 0);
		assert_true(f->inflight != MAP_FAILED);
	}
	inf.mmap_size = f->inflight_len;
	assert_int_equal(
	    fe_ack(f, VHOST_USER_SET_INFLIGHT_FD, &inf, sizeof(inf), &f->inflight_fd, 1), 0);
}

/* Connect and bring the ring up as QEMU would; returns once it runs. */
static void fe_up(struct fe *f, unsigned flags, uint16_t base)
{
	struct vhost_user_mem_region r[3] = {
	    region_a(), region_b(), {G_BIG, BIG_SIZE, UVA_B + 0x1000000000ull, 0}};
	bool keep = flags & UP_KEEP_INFLIGHT;

	if (!keep) {
		f->inflight_fd = -1;
		f->inflight = NULL;
	}
	fe_connect(f);
	fe_handshake(f, flags & UP_NO_INDIRECT ? FEAT_BASE : FEAT_STD);
	if (flags & (UP_INFLIGHT | UP_KEEP_INFLIGHT))
		fe_inflight(f, !keep);
	if (flags & UP_BIG) {
		struct vhost_user_mem_table t = {.nregions = 3};
		int fds[3] = {T.gm_fd, T.gm_fd, big_fd()};

		memcpy(t.regions, r, sizeof(r));
		assert_int_equal(fe_ack(f, VHOST_USER_SET_MEM_TABLE, &t, 8 + 3 * 32, fds, 3), 0);
		close(fds[2]);
	} else {
		assert_int_equal(fe_mem_table(f, r, 2, T.gm_fd, 2), 0);
	}
	if (flags & UP_NO_RING)
		return;
	assert_int_equal(fe_ring(f, base), 0);
	/* A started queue signals once at once. */
	assert_true(wait_fd(f->call, WAIT_MS));
}

/* ---- the driver's side of the ring ---- */

/* Relaxed atomic stores: the scribbler thread writes descriptors too. */
static void set_desc(volatile struct vhost_desc *t, unsigned i, uint64_t addr, uint32_t len,
		     uint16_t flags, uint16_t next)
{
	__atomic_store_n(&t[i].addr, addr, __ATOMIC_RELAXED);
	__atomic_store_n(&t[i].len, len, __ATOMIC_RELAXED);
	__atomic_store_n(&t[i].flags, flags, __ATOMIC_RELAXED);
	__atomic_store_n(&t[i].next, next, __ATOMIC_RELAXED);
}

static void post_raw(uint16_t head)
{
	avail()->ring[T.avail_idx % NUM] = head;
	T.avail_idx++;
	__atomic_store_n(&avail()->idx, T.avail_idx, __ATOMIC_RELEASE);
}

static void post(struct fe *f, uint16_t head)
{
	post_raw(head);
	eventfd_write(f->kick, 1);
}

static bool wait_used(uint16_t want, unsigned ms)
{
	uint64_t end = now_ms() + ms;

	do {
		if (__atomic_load_n(&used()->idx, __ATOMIC_ACQUIRE) == want)
			return true;
		usleep(200);
	} while (now_ms() < end);
	return false;
}

static uint64_t hdr_gpa(uint16_t head)
{
	return G_HDR + 32u * head;
}

static uint64_t status_gpa(uint16_t head)
{
	return G_STATUS + head;
}

static void set_hdr(uint16_t head, uint32_t type, uint64_t sector)
{
	struct virtio_blk_outhdr *h = gp(hdr_gpa(head));

	h->type = type;
	h->ioprio = 0;
	h->sector = sector;
	*(volatile uint8_t *)gp(status_gpa(head)) = 0xee;
}

/* Chain head, head+1, head+2: header, data [gpa, gpa + len), status. */
static void build_rw(uint16_t head, uint32_t type, uint64_t sector, uint64_t gpa, uint32_t len)
{
	uint16_t wr =
	    type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID ? VHOST_DESC_F_WRITE : 0;

	set_hdr(head, type, sector);
	set_desc(desc_table(), head, hdr_gpa(head), 16, VHOST_DESC_F_NEXT, head + 1);
	set_desc(desc_table(), head + 1, gpa, len, VHOST_DESC_F_NEXT | wr, head + 2);
	set_desc(desc_table(), head + 2, status_gpa(head), 1, VHOST_DESC_F_WRITE, 0);
}

static uint8_t status_of(uint16_t head)
{
	return *(volatile uint8_t *)gp(status_gpa(head));
}

static const struct vhost_used_elem *last_used(void)
{
	uint16_t i = (uint16_t)(used()->idx - 1);

	return &used()->ring[i % NUM];
}

/* Post head and wait for it: returned with length 0 (dropped). */
static void expect_dropped(struct fe *f, uint16_t head)
{
	uint16_t want = (uint16_t)(used()->idx + 1);

	*(volatile uint8_t *)gp(status_gpa(head)) = 0xee;
	post(f, head);
	if (!wait_used(want, WAIT_MS))
		fail_msg("head %u never returned (daemon alive: %d)", head, daemon_alive());
	assert_int_equal(last_used()->id, head);
	assert_int_equal(last_used()->len, 0);
	assert_int_equal(status_of(head), 0xee); /* the status byte was not touched */
}

/* Post head and wait for it: completed with status st. */
static void expect_status(struct fe *f, uint16_t head, uint8_t st)
{
	uint16_t want = (uint16_t)(used()->idx + 1);

	*(volatile uint8_t *)gp(status_gpa(head)) = 0xee;
	post(f, head);
	if (!wait_used(want, WAIT_MS))
		fail_msg("head %u never returned (daemon alive: %d)", head, daemon_alive());
	assert_int_equal(last_used()->id, head);
	assert_int_equal(status_of(head), st);
}

/* The ring is broken: the error eventfd fires, the queue reports it, and
 * nothing more is returned. */
static void expect_broken(struct fe *f, uint16_t used_before)
{
	if (!wait_fd(f->err, WAIT_MS))
		fail_msg("no error signalled on the ring's error eventfd");
	assert_true(wait_rpc("vhost_get_controllers", "\"broken\":true", WAIT_MS));
	usleep(50000);
	assert_int_equal(used()->idx, used_before);
}

/* ---- checks after every case ---- */

static void fill_secret(void)
{
	for (size_t off = 0; off < GM_SIZE; off += 16) {
		bool mapped = off < R_SIZE || (off >= RB_OFF && off < RB_OFF + R_SIZE);

		if (!mapped)
			memcpy(T.gm + off, SECRET, 16);
	}
}

static void assert_secret_intact(void)
{
	for (size_t off = R_SIZE; off < GM_SIZE; off += 16) {
		if (off >= RB_OFF && off < RB_OFF + R_SIZE)
			continue;
		if (memcmp(T.gm + off, SECRET, 16))
			fail_msg("memory outside the table was written at memfd offset 0x%zx", off);
	}
}

static void assert_image_clean(void)
{
	static uint8_t buf[MIB];
	int fd = open(T.image, O_RDONLY);

	assert_true(fd >= 0);
	for (off_t off = 0;; off += (off_t)sizeof(buf)) {
		ssize_t n = pread(fd, buf, sizeof(buf), off);

		if (n <= 0)
			break;
		if (memmem(buf, (size_t)n, SECRET, 8))
			fail_msg("memory outside the table reached the image near offset %lld",
				 (long long)off);
	}
	close(fd);
}

/* A fresh connection writes a block and reads it back. */
static void sanity_io(void)
{
	struct fe f;
	uint8_t *w = gp(GPA_B + 0x1000), *r = gp(G_DATA + 0x3000);
	uint8_t seed = (uint8_t)(++T.sanity_runs * 37);

	ring_reset();
	fe_up(&f, 0, 0);
	for (unsigned i = 0; i < 4096; i++)
		w[i] = (uint8_t)(seed + i * 7);
	memset(r, 0, 4096);
	build_rw(0, VIRTIO_BLK_T_OUT, 2048, GPA_B + 0x1000, 4096);
	expect_status(&f, 0, VIRTIO_BLK_S_OK);
	build_rw(3, VIRTIO_BLK_T_IN, 2048, G_DATA + 0x3000, 4096);
	expect_status(&f, 3, VIRTIO_BLK_S_OK);
	assert_int_equal(last_used()->len, 4097);
	assert_memory_equal(w, r, 4096);
	build_rw(6, VIRTIO_BLK_T_FLUSH, 0, G_DATA, 0);
	set_desc(desc_table(), 6, hdr_gpa(6), 16, VHOST_DESC_F_NEXT, 8);
	expect_status(&f, 6, VIRTIO_BLK_S_OK);
	fe_close(&f);
}

/* After each case: alive, nothing outside guest memory touched, and a new
 * connection works. */
static void after_case(void)
{
	if (!daemon_alive())
		fail_msg("the daemon died");
	assert_secret_intact();
	sanity_io();
	assert_true(daemon_alive());
	assert_secret_intact();
}

/* ---- cases: memory tables ---- */

static void test_mem_tables(void **state)
{
	struct vhost_user_mem_region r[9] = {{0}};
	struct fe f;
	int efd = eventfd(0, EFD_CLOEXEC), ro;

	/* Malformed tables end the connection: no regions, too many, a
	 * count that disagrees with the size. */
	fe_connect(&f);
	fe_handshake(&f, FEAT_STD);
	assert_refused(fe_mem_table(&f, r, 0, T.gm_fd, 1));
	fe_close(&f);
	fe_connect(&f);
	fe_handshake(&f, FEAT_STD);
	for (unsigned i = 0; i < 9; i++)
		r[i] = (struct vhost_user_mem_region){i * 4096ull, 4096, UVA_A + i * 4096ull, 0};
	assert_refused(fe_mem_table(&f, r, 9, T.gm_fd, 8));
	fe_close(&f);

	/* The rest get an error ack; each is tried on the same connection,
	 * which must still work afterwards. */
	fe_connect(&f);
	fe_handshake(&f, FEAT_STD);
	r[0] = region_a();
	r[1] = region_b();
	assert_refused(fe_mem_table(&f, r, 2, T.gm_fd, 1)); /* 2 regions, 1 fd */
	r[1] = (struct vhost_user_mem_region){R_SIZE / 2, R_SIZE, UVA_B, RB_OFF}; /* overlap */
	assert_refused(fe_mem_table(&f, r, 2, T.gm_fd, 2));
	r[1] = (struct vhost_user_mem_region){0, R_SIZE, UVA_B, RB_OFF}; /* same gpa twice */
	assert_refused(fe_mem_table(&f, r, 2, T.gm_fd, 2));
	/* Larger than the fd, or running off its end. */
	r[0] = (struct vhost_user_mem_region){0, 8 * MIB, UVA_A, 0};
	assert_refused(fe_mem_table(&f, r, 1, T.gm_fd, 1));
	r[0] = (struct vhost_user_mem_region){0, 2 * MIB, UVA_A, 3 * MIB};
	assert_refused(fe_mem_table(&f, r, 1, T.gm_fd, 1));
	r[0] = (struct vhost_user_mem_region){0, 1ull << 62, UVA_A, 0};
	assert_refused(fe_mem_table(&f, r, 1, T.gm_fd, 1));
	/* Wrapping around in each address space. */
	r[0] = (struct vhost_user_mem_region){~0ull - 4095, 8192, UVA_A, 0};
	assert_refused(fe_mem_table(&f, r, 1, T.gm_fd, 1));
	r[0] = (struct vhost_user_mem_region){0, 8192, ~0ull - 4095, 0};
	assert_refused(fe_mem_table(&f, r, 1, T.gm_fd, 1));
	r[0] = (struct vhost_user_mem_region){0, 8192, UVA_A, ~0ull - 4095};
	assert_refused(fe_mem_table(&f, r, 1, T.gm_fd, 1));
	r[0] = (struct vhost_user_mem_region){0, 0, UVA_A, 0}; /* empty */
	assert_refused(fe_mem_table(&f, r, 1, T.gm_fd, 1));
	/* Not mappable: an eventfd, a read-only fd. */
	r[0] = region_a();
	assert_refused(fe_mem_table(&f, r, 1, efd, 1));
	{
		char path[64];

		snprintf(path, sizeof(path), "/proc/self/fd/%d", T.gm_fd);
		ro = open(path, O_RDONLY | O_CLOEXEC);
		assert_true(ro >= 0);
		assert_refused(fe_mem_table(&f, r, 1, ro, 1));
		close(ro);
	}
	/* The same connection still maps a good table and runs a ring. */
	r[0] = region_a();
	r[1] = region_b();
	assert_int_equal(fe_mem_table(&f, r, 2, T.gm_fd, 2), 0);
	ring_reset();
	assert_int_equal(fe_ring(&f, 0), 0);
	assert_true(wait_fd(f.call, WAIT_MS));
	build_rw(0, VIRTIO_BLK_T_OUT, 8, G_DATA, 4096);
	expect_status(&f, 0, VIRTIO_BLK_S_OK);
	fe_close(&f);
	close(efd);
	after_case();
}

static void test_mem_slots(void **state)
{
	struct vhost_user_mem_single s = {0}, last;
	struct fe f;
	int fd = T.gm_fd;

	fe_connect(&f);
	fe_handshake(&f, FEAT_STD);
	/* 32 slots of one page each are accepted, the 33rd is not. */
	for (unsigned i = 0; i < VHOST_MAX_MEM_REGIONS; i++) {
		s.region =
		    (struct vhost_user_mem_region){i * 0x10000ull, 4096, UVA_A + i * 0x10000ull, 0};
		assert_int_equal(fe_ack(&f, VHOST_USER_ADD_MEM_REG, &s, sizeof(s), &fd, 1), 0);
	}
	s.region = (struct vhost_user_mem_region){0x1000000, 4096, UVA_B, 0};
	assert_refused(fe_ack(&f, VHOST_USER_ADD_MEM_REG, &s, sizeof(s), &fd, 1));
	/* Free the last slot, so that what follows is refused for itself:
	 * overlapping an existing slot, larger than the fd, no fd. */
	last = (struct vhost_user_mem_single){.region = {0x1f0000, 4096, UVA_A + 0x1f0000, 0}};
	assert_int_equal(fe_ack(&f, VHOST_USER_REM_MEM_REG, &last, sizeof(last), NULL, 0), 0);
	s.region = (struct vhost_user_mem_region){0x10800, 4096, UVA_B, 0};
	assert_refused(fe_ack(&f, VHOST_USER_ADD_MEM_REG, &s, sizeof(s), &fd, 1));
	s.region = (struct vhost_user_mem_region){0x2000000, 64 * MIB, UVA_B, 0};
	assert_refused(fe_ack(&f, VHOST_USER_ADD_MEM_REG, &s, sizeof(s), &fd, 1));
	/* Removing what is not there. */
	s.region = (struct vhost_user_mem_region){0x3000000, 4096, UVA_B, 0};
	assert_refused(fe_ack(&f, VHOST_USER_REM_MEM_REG, &s, sizeof(s), NULL, 0));
	s.region = (struct vhost_user_mem_region){0x4000000, 4096, UVA_B, 0};
	assert_refused(fe_ack(&f, VHOST_USER_ADD_MEM_REG, &s, sizeof(s), NULL, 0));
	fe_close(&f);
	after_case();
}

/* ---- cases: ring setup ---- */

static void test_ring_setup(void **state)
{
	struct vhost_user_vring_addr a;
	struct fe f;

	ring_reset();
	fe_up(&f, UP_NO_RING, 0);
	/* Sizes: zero, not a power of two, too large; a base past 16 bits. */
	assert_refused(ack_state(&f, VHOST_USER_SET_VRING_NUM, 0, 0));
	assert_refused(ack_state(&f, VHOST_USER_SET_VRING_NUM, 0, 12));
	assert_refused(ack_state(&f, VHOST_USER_SET_VRING_NUM, 0, 4096));
	assert_refused(ack_state(&f, VHOST_USER_SET_VRING_BASE, 0, 0x10000));
	assert_refused(ack_state(&f, VHOST_USER_SET_VRING_ENABLE, 0, 7));
	/* Ring addresses outside guest memory, straddling its end, and
	 * misaligned: the ring does not start, and the message that would
	 * have started it says so. */
	assert_int_equal(ack_state(&f, VHOST_USER_SET_VRING_NUM, 0, NUM), 0);
	assert_int_equal(ack_state(&f, VHOST_USER_SET_VRING_BASE, 0, 0), 0);
	assert_int_equal(fe_ack(&f, VHOST_USER_SET_VRING_CALL, &(uint64_t){0}, 8, &f.call, 1), 0);
	assert_int_equal(fe_ack(&f, VHOST_USER_SET_VRING_ERR, &(uint64_t){0}, 8, &f.err, 1), 0);
	a = (struct vhost_user_vring_addr){.desc_user_addr = UVA_A + 0x10000000,
					   .avail_user_addr = UVA_A + G_AVAIL,
					   .used_user_addr = UVA_A + G_USED};
	assert_int_equal(fe_ack(&f, VHOST_USER_SET_VRING_ADDR, &a, sizeof(a), NULL, 0), 0);
	assert_refused(fe_ack(&f, VHOST_USER_SET_VRING_KICK, &(uint64_t){0}, 8, &f.kick, 1));
	a.desc_user_addr = UVA_A + R_SIZE - 16 * NUM + 16; /* last entry off the end */
	assert_refused(fe_ack(&f, VHOST_USER_SET_VRING_ADDR, &a, sizeof(a), NULL, 0));
	a.desc_user_addr = UVA_A + G_DESC + 8; /* misaligned */
	assert_refused(fe_ack(&f, VHOST_USER_SET_VRING_ADDR, &a, sizeof(a), NULL, 0));
	a.desc_user_addr = UVA_A + G_DESC;
	a.used_user_addr = ~0ull - 16;
	assert_refused(fe_ack(&f, VHOST_USER_SET_VRING_ADDR, &a, sizeof(a), NULL, 0));
	assert_false(wait_fd(f.call, 100)); /* never started */
	/* Ring fd messages with bad bits, ring index out of range. */
	assert_refused(fe_ack(&f, VHOST_USER_SET_VRING_CALL, &(uint64_t){0x100}, 8, &f.call, 1));
	fe_close(&f);
	fe_up(&f, UP_NO_RING, 0);
	assert_refused(ack_state(&f, VHOST_USER_SET_VRING_NUM, 1, NUM));
	fe_close(&f);
	fe_up(&f, UP_NO_RING, 0);
	assert_refused(fe_ack(&f, VHOST_USER_SET_VRING_KICK, &(uint64_t){0x1f}, 8, &f.kick, 1));
	fe_close(&f);
	after_case();
}

/* ---- cases: descriptors ---- */

static void test_desc_outside_memory(void **state)
{
	struct fe f;

	ring_reset();
	fe_up(&f, 0, 0);
	/* Data just past the end of guest memory, straddling it, wrapping
	 * the address space, far from it. */
	build_rw(0, VIRTIO_BLK_T_OUT, 0, GPA_END, 4096);
	expect_dropped(&f, 0);
	build_rw(0, VIRTIO_BLK_T_OUT, 0, GPA_END - 100, 4096);
	expect_dropped(&f, 0);
	build_rw(0, VIRTIO_BLK_T_IN, 0, GPA_END - 100, 4096);
	expect_dropped(&f, 0);
	build_rw(0, VIRTIO_BLK_T_OUT, 0, ~0ull - 4095, 8192);
	expect_dropped(&f, 0);
	build_rw(0, VIRTIO_BLK_T_IN, 0, 0xffffffffffffff00ull, 0x200);
	expect_dropped(&f, 0);
	build_rw(0, VIRTIO_BLK_T_OUT, 0, 0x40000000, 4096);
	expect_dropped(&f, 0);
	/* A 4 GiB - 1 descriptor from inside memory. */
	build_rw(0, VIRTIO_BLK_T_OUT, 0, G_DATA, 0xffffffffu);
	expect_dropped(&f, 0);
	/* The header, the status byte outside memory. */
	build_rw(0, VIRTIO_BLK_T_OUT, 0, G_DATA, 512);
	set_desc(desc_table(), 0, GPA_END + 0x1000, 16, VHOST_DESC_F_NEXT, 1);
	expect_dropped(&f, 0);
	build_rw(0, VIRTIO_BLK_T_IN, 0, G_DATA, 512);
	set_desc(desc_table(), 2, GPA_END + 0x10, 1, VHOST_DESC_F_WRITE, 0);
	expect_dropped(&f, 0);
	/* A buffer that spans both regions is fine: it is guest memory. */
	memset(gp(R_SIZE - 2048), 0x5a, 2048);
	memset(gp(GPA_B), 0x5b, 2048);
	build_rw(0, VIRTIO_BLK_T_OUT, 64, R_SIZE - 2048, 4096);
	expect_status(&f, 0, VIRTIO_BLK_S_OK);
	fe_close(&f);
	after_case();
}

static void test_desc_chains(void **state)
{
	struct fe f;

	ring_reset();
	fe_up(&f, 0, 0);
	/* Loops: two descriptors pointing at each other, one at itself. */
	build_rw(0, VIRTIO_BLK_T_OUT, 0, G_DATA, 512);
	set_desc(desc_table(), 1, G_DATA, 512, VHOST_DESC_F_NEXT, 0);
	expect_dropped(&f, 0);
	build_rw(0, VIRTIO_BLK_T_OUT, 0, G_DATA, 512);
	set_desc(desc_table(), 1, G_DATA, 512, VHOST_DESC_F_NEXT, 1);
	expect_dropped(&f, 0);
	/* next beyond the table. */
	build_rw(0, VIRTIO_BLK_T_OUT, 0, G_DATA, 512);
	set_desc(desc_table(), 1, G_DATA, 512, VHOST_DESC_F_NEXT, NUM);
	expect_dropped(&f, 0);
	set_desc(desc_table(), 1, G_DATA, 512, VHOST_DESC_F_NEXT, 0xffff);
	expect_dropped(&f, 0);
	/* A chain through the whole table that never ends. */
	for (unsigned i = 0; i < NUM; i++)
		set_desc(desc_table(), i, G_DATA, 512, VHOST_DESC_F_NEXT,
			 (uint16_t)((i + 1) % NUM));
	expect_dropped(&f, 5);
	/* Readable after writable; no writable descriptor at all; a
	 * zero-length status. */
	build_rw(0, VIRTIO_BLK_T_OUT, 0, G_DATA, 512);
	set_desc(desc_table(), 1, G_DATA, 512, VHOST_DESC_F_NEXT | VHOST_DESC_F_WRITE, 2);
	set_desc(desc_table(), 2, G_DATA + 512, 512, VHOST_DESC_F_NEXT, 3);
	set_desc(desc_table(), 3, status_gpa(0), 1, VHOST_DESC_F_WRITE, 0);
	expect_dropped(&f, 0);
	build_rw(0, VIRTIO_BLK_T_OUT, 0, G_DATA, 512);
	set_desc(desc_table(), 2, status_gpa(0), 1, 0, 0);
	expect_dropped(&f, 0);
	build_rw(0, VIRTIO_BLK_T_OUT, 0, G_DATA, 512);
	set_desc(desc_table(), 2, status_gpa(0), 0, VHOST_DESC_F_WRITE, 0);
	expect_dropped(&f, 0);
	/* A header shorter than a header (nothing else is readable). */
	build_rw(0, VIRTIO_BLK_T_IN, 0, G_DATA, 512);
	set_desc(desc_table(), 0, hdr_gpa(0), 8, VHOST_DESC_F_NEXT, 1);
	expect_dropped(&f, 0);
	fe_close(&f);
	after_case();
}

static void test_indirect(void **state)
{
	volatile struct vhost_desc *ind = gp(G_IND);
	struct fe f;

	ring_reset();
	fe_up(&f, 0, 0);
	/* A good indirect request first, so that the rejections below are
	 * about what they change. */
	set_hdr(0, VIRTIO_BLK_T_OUT, 16);
	set_desc(ind, 0, hdr_gpa(0), 16, VHOST_DESC_F_NEXT, 1);
	set_desc(ind, 1, G_DATA, 4096, VHOST_DESC_F_NEXT, 2);
	set_desc(ind, 2, status_gpa(0), 1, VHOST_DESC_F_WRITE, 0);
	set_desc(desc_table(), 0, G_IND, 3 * 16, VHOST_DESC_F_INDIRECT, 0);
	expect_status(&f, 0, VIRTIO_BLK_S_OK);
	/* The table outside memory, straddling its end, split across the
	 * two regions (contiguous in guest memory, not in ours). */
	set_desc(desc_table(), 0, GPA_END + 0x1000, 3 * 16, VHOST_DESC_F_INDIRECT, 0);
	expect_dropped(&f, 0);
	set_desc(desc_table(), 0, GPA_END - 16, 3 * 16, VHOST_DESC_F_INDIRECT, 0);
	expect_dropped(&f, 0);
	set_desc(desc_table(), 0, R_SIZE - 16, 3 * 16, VHOST_DESC_F_INDIRECT, 0);
	expect_dropped(&f, 0);
	/* Lengths: not a multiple of 16, zero, more than 1024 entries, 4 GiB. */
	set_desc(desc_table(), 0, G_IND, 3 * 16 + 3, VHOST_DESC_F_INDIRECT, 0);
	expect_dropped(&f, 0);
	set_desc(desc_table(), 0, G_IND, 0, VHOST_DESC_F_INDIRECT, 0);
	expect_dropped(&f, 0);
	set_desc(desc_table(), 0, G_IND, 1025 * 16, VHOST_DESC_F_INDIRECT, 0);
	expect_dropped(&f, 0);
	set_desc(desc_table(), 0, G_IND, 0xfffffff0u, VHOST_DESC_F_INDIRECT, 0);
	expect_dropped(&f, 0);
	/* INDIRECT with NEXT; nested; next past the table's end; a loop in
	 * the table; an entry outside memory. */
	set_desc(desc_table(), 0, G_IND, 3 * 16, VHOST_DESC_F_INDIRECT | VHOST_DESC_F_NEXT, 1);
	expect_dropped(&f, 0);
	set_desc(desc_table(), 0, G_IND, 3 * 16, VHOST_DESC_F_INDIRECT, 0);
	set_desc(ind, 1, G_IND, 3 * 16, VHOST_DESC_F_INDIRECT, 0);
	expect_dropped(&f, 0);
	set_desc(ind, 1, G_DATA, 4096, VHOST_DESC_F_NEXT, 3);
	expect_dropped(&f, 0);
	set_desc(ind, 1, G_DATA, 4096, VHOST_DESC_F_NEXT, 0);
	expect_dropped(&f, 0);
	set_desc(ind, 1, GPA_END, 4096, VHOST_DESC_F_NEXT, 2);
	expect_dropped(&f, 0);
	/* 1024 entries of one byte: more segments than a request may have. */
	for (unsigned i = 0; i < 1024; i++)
		set_desc(ind, i, G_DATA + i, 1, VHOST_DESC_F_NEXT, (uint16_t)(i + 1));
	set_desc(ind, 0, hdr_gpa(0), 16, VHOST_DESC_F_NEXT, 1);
	set_desc(ind, 1023, status_gpa(0), 1, VHOST_DESC_F_WRITE, 0);
	set_desc(desc_table(), 0, G_IND, 1024 * 16, VHOST_DESC_F_INDIRECT, 0);
	expect_dropped(&f, 0);
	fe_close(&f);

	/* INDIRECT_DESC not negotiated. */
	ring_reset();
	fe_up(&f, UP_NO_INDIRECT, 0);
	set_desc(ind, 0, hdr_gpa(0), 16, VHOST_DESC_F_NEXT, 1);
	set_desc(ind, 1, G_DATA, 4096, VHOST_DESC_F_NEXT, 2);
	set_desc(ind, 2, status_gpa(0), 1, VHOST_DESC_F_WRITE, 0);
	set_desc(desc_table(), 0, G_IND, 3 * 16, VHOST_DESC_F_INDIRECT, 0);
	set_hdr(0, VIRTIO_BLK_T_OUT, 16);
	expect_dropped(&f, 0);
	fe_close(&f);
	after_case();
}

/* Lengths past 4 GiB: a 4 GiB region lets descriptors of 4 GiB - 1 each
 * add up to any length. */
static void test_lengths_past_4g(void **state)
{
	volatile struct vhost_desc *ind = gp(G_IND);
	struct virtio_blk_discard_write_zeroes *seg = gp(G_SEG);
	struct fe f;

	ring_reset();
	fe_up(&f, UP_BIG, 0);
	/* One descriptor of 4 GiB - 1, then two that add up to more than
	 * 4 GiB: the disk is 16 MiB, so reads and writes fail, whatever
	 * wraps in 32 bits. */
	build_rw(0, VIRTIO_BLK_T_OUT, 0, G_BIG, 0xffffffffu);
	expect_status(&f, 0, VIRTIO_BLK_S_IOERR);
	build_rw(0, VIRTIO_BLK_T_IN, 0, G_BIG, 0xfffffe00u);
	expect_status(&f, 0, VIRTIO_BLK_S_IOERR);
	set_hdr(0, VIRTIO_BLK_T_OUT, 0);
	set_desc(ind, 0, hdr_gpa(0), 16, VHOST_DESC_F_NEXT, 1);
	set_desc(ind, 1, G_BIG, 0xfffff000u, VHOST_DESC_F_NEXT, 2);
	set_desc(ind, 2, G_BIG, 0x2000, VHOST_DESC_F_NEXT, 3);
	set_desc(ind, 3, status_gpa(0), 1, VHOST_DESC_F_WRITE, 0);
	set_desc(desc_table(), 0, G_IND, 4 * 16, VHOST_DESC_F_INDIRECT, 0);
	expect_status(&f, 0, VIRTIO_BLK_S_IOERR);
	set_hdr(0, VIRTIO_BLK_T_IN, 0);
	set_desc(ind, 1, G_BIG, 0xfffff000u, VHOST_DESC_F_NEXT | VHOST_DESC_F_WRITE, 2);
	set_desc(ind, 2, G_BIG, 0x1000, VHOST_DESC_F_NEXT | VHOST_DESC_F_WRITE, 3);
	expect_status(&f, 0, VIRTIO_BLK_S_IOERR);
	/* Discard and write-zeroes whose segment list is 2^36 + 16 bytes
	 * long: 16 descriptors of 4 GiB - 1 and one of 32 bytes. Counted in
	 * 32 bits that is one segment; it must be refused as 2^32 + 1. */
	for (int k = 0; k < 2; k++) {
		set_hdr(0, k ? VIRTIO_BLK_T_WRITE_ZEROES : VIRTIO_BLK_T_DISCARD, 0);
		set_desc(ind, 0, hdr_gpa(0), 16, VHOST_DESC_F_NEXT, 1);
		for (unsigned i = 1; i <= 16; i++)
			set_desc(ind, i, G_BIG, 0xffffffffu, VHOST_DESC_F_NEXT, (uint16_t)(i + 1));
		set_desc(ind, 17, G_BIG, 32, VHOST_DESC_F_NEXT, 18);
		set_desc(ind, 18, status_gpa(0), 1, VHOST_DESC_F_WRITE, 0);
		set_desc(desc_table(), 0, G_IND, 19 * 16, VHOST_DESC_F_INDIRECT, 0);
		expect_status(&f, 0, VIRTIO_BLK_S_UNSUPP);
	}
	/* Segments: too many sectors, past the end, sector overflow, bad
	 * flags, too many segments, a partial segment. */
	seg[0] = (struct virtio_blk_discard_write_zeroes){.sector = 0, .num_sectors = 0xffffffffu};
	build_rw(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, G_SEG, 16);
	expect_status(&f, 0, VIRTIO_BLK_S_IOERR);
	seg[0] = (struct virtio_blk_discard_write_zeroes){.sector = IMG_SIZE / 512 - 1,
							  .num_sectors = 2};
	expect_status(&f, 0, VIRTIO_BLK_S_IOERR);
	seg[0] = (struct virtio_blk_discard_write_zeroes){.sector = ~0ull - 1, .num_sectors = 8};
	expect_status(&f, 0, VIRTIO_BLK_S_IOERR);
	build_rw(0, VIRTIO_BLK_T_DISCARD, 0, G_SEG, 16);
	expect_status(&f, 0, VIRTIO_BLK_S_IOERR);
	seg[0] = (struct virtio_blk_discard_write_zeroes){
	    .sector = 0, .num_sectors = 8, .flags = 0x80000000u};
	expect_status(&f, 0, VIRTIO_BLK_S_UNSUPP);
	build_rw(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, G_SEG, 17 * 16);
	expect_status(&f, 0, VIRTIO_BLK_S_UNSUPP);
	build_rw(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, G_SEG, 24);
	expect_status(&f, 0, VIRTIO_BLK_S_UNSUPP);
	/* Reads and writes past the end of the disk and wrapping sectors. */
	build_rw(0, VIRTIO_BLK_T_OUT, IMG_SIZE / 512 - 4, G_DATA, 4096);
	expect_status(&f, 0, VIRTIO_BLK_S_IOERR);
	build_rw(0, VIRTIO_BLK_T_IN, ~0ull - 3, G_DATA, 4096);
	expect_status(&f, 0, VIRTIO_BLK_S_IOERR);
	build_rw(0, VIRTIO_BLK_T_IN, 0, G_DATA, 100); /* not whole sectors */
	expect_status(&f, 0, VIRTIO_BLK_S_IOERR);
	build_rw(0, 0x7777, 0, G_DATA, 512);
	expect_status(&f, 0, VIRTIO_BLK_S_UNSUPP);
	/* GET_ID into a 4 GiB buffer writes the 20 bytes of the serial. */
	build_rw(0, VIRTIO_BLK_T_GET_ID, 0, G_BIG, 0xfffffff0u);
	expect_status(&f, 0, VIRTIO_BLK_S_OK);
	assert_int_equal(last_used()->len, 21);
	fe_close(&f);
	after_case();
}

/* ---- cases: ring indexes ---- */

static void test_avail_jump(void **state)
{
	struct fe f;

	ring_reset();
	fe_up(&f, 0, 0);
	build_rw(0, VIRTIO_BLK_T_OUT, 0, G_DATA, 512);
	expect_status(&f, 0, VIRTIO_BLK_S_OK);
	/* The avail index jumps by more than the ring. */
	T.avail_idx = (uint16_t)(T.avail_idx + NUM + 1);
	__atomic_store_n(&avail()->idx, T.avail_idx, __ATOMIC_RELEASE);
	eventfd_write(f.kick, 1);
	expect_broken(&f, 1);
	fe_close(&f);

	/* ... or runs backwards. */
	ring_reset();
	fe_up(&f, 0, 0);
	__atomic_store_n(&avail()->idx, (uint16_t)0xffff, __ATOMIC_RELEASE);
	eventfd_write(f.kick, 1);
	expect_broken(&f, 0);
	fe_close(&f);

	/* A head out of range. */
	ring_reset();
	fe_up(&f, 0, 0);
	post(&f, NUM + 3);
	expect_broken(&f, 0);
	fe_close(&f);

	/* A ring base far from the guest's used index is the front-end's
	 * word: fetching starts there. */
	ring_reset();
	used()->idx = 100;
	T.avail_idx = 40000;
	avail()->idx = 40000;
	fe_up(&f, 0, 40000);
	build_rw(0, VIRTIO_BLK_T_OUT, 0, G_DATA, 512);
	post(&f, 0);
	assert_true(wait_used(101, WAIT_MS));
	fe_close(&f);
	after_case();
}

static void test_head_twice(void **state)
{
	struct fe f;
	char out[256];

	/* Writes held for 30 s: both fetches happen while the first is in
	 * flight, with and without an in-flight region. */
	for (int with_inflight = 0; with_inflight < 2; with_inflight++) {
		ring_reset();
		fe_up(&f, with_inflight ? UP_INFLIGHT : 0, 0);
		assert_int_equal(rpc("vmig_blk_set_latency", "{\"write_us\":30000000}", out,
				     sizeof(out), WAIT_MS),
				 0);
		build_rw(0, VIRTIO_BLK_T_OUT, 0, G_DATA, 512);
		post_raw(0);
		post(&f, 0);
		expect_broken(&f, 0);
		assert_int_equal(
		    rpc("vmig_blk_set_latency", "{\"write_us\":0}", out, sizeof(out), WAIT_MS), 0);
		fe_close(&f);
		fe_drop_inflight(&f);
	}
	after_case();
}

/* ---- cases: framing ---- */

static void test_framing(void **state)
{
	struct wire w;
	struct fe f;
	int fds[20];
	int before = settled_fds(), r;

	assert_true(before > 0);
	/* A payload size beyond any message. */
	fe_connect(&f);
	memset(&w, 0, sizeof(w));
	w.hdr = (struct vhost_user_hdr){VHOST_USER_GET_FEATURES, VHOST_USER_VERSION, 0x10000};
	assert_int_equal(send_fds(f.sock, &w, sizeof(w.hdr), NULL, 0), 0);
	assert_true(fe_dropped(&f));
	fe_close(&f);
	/* Wrong version, reply flag on a request, unknown ids. */
	fe_connect(&f);
	assert_int_equal(
	    send_fds(f.sock, &(struct vhost_user_hdr){VHOST_USER_GET_FEATURES, 2, 0}, 12, NULL, 0),
	    0);
	assert_true(fe_dropped(&f));
	fe_close(&f);
	fe_connect(&f);
	assert_int_equal(
	    send_fds(f.sock, &(struct vhost_user_hdr){1000, VHOST_USER_VERSION, 0}, 12, NULL, 0),
	    0);
	assert_true(fe_dropped(&f));
	fe_close(&f);
	/* Too many fds: each is closed, none kept. */
	fe_connect(&f);
	for (int i = 0; i < 20; i++)
		fds[i] = eventfd(0, EFD_CLOEXEC);
	memset(&w, 0, sizeof(w));
	w.hdr = (struct vhost_user_hdr){VHOST_USER_SET_MEM_TABLE, VHOST_USER_VERSION, 8 + 32};
	w.p.mem.nregions = 1;
	w.p.mem.regions[0] = region_a();
	r = send_fds(f.sock, &w, sizeof(w.hdr) + w.hdr.size, fds, 20);
	assert_true(r == 0 || r == -EPIPE || r == -ECONNRESET);
	assert_true(fe_dropped(&f));
	fe_close(&f);
	for (int i = 0; i < 20; i++)
		close(fds[i]);
	/* GET_CONFIG windows past the config space. */
	fe_connect(&f);
	fe_handshake(&f, FEAT_STD);
	memset(&w, 0, sizeof(w));
	w.p.config.offset = 250;
	w.p.config.size = 20;
	assert_int_equal(fe_send(&f, VHOST_USER_GET_CONFIG, 0, &w.p, 12 + 20, NULL, 0), 0);
	assert_true(fe_dropped(&f));
	fe_close(&f);
	/* Log and in-flight regions larger than their fds, or wrapping. */
	fe_connect(&f);
	fe_handshake(&f, FEAT_STD);
	{
		struct vhost_user_log lg = {.mmap_size = 64 * MIB, .mmap_offset = 0};
		struct vhost_user_inflight inf = {
		    .mmap_size = 1ull << 40, .num_queues = 1, .queue_size = NUM};
		int efd = eventfd(0, EFD_CLOEXEC);

		assert_int_equal(
		    fe_send(&f, VHOST_USER_SET_LOG_BASE, 0, &lg, sizeof(lg), &T.gm_fd, 1), 0);
		assert_int_equal(fe_recv(&f, &w, NULL), 0);
		assert_int_not_equal(w.p.u64, 0);
		lg = (struct vhost_user_log){.mmap_size = 4096, .mmap_offset = ~0ull - 100};
		assert_int_equal(
		    fe_send(&f, VHOST_USER_SET_LOG_BASE, 0, &lg, sizeof(lg), &T.gm_fd, 1), 0);
		assert_int_equal(fe_recv(&f, &w, NULL), 0);
		assert_int_not_equal(w.p.u64, 0);
		assert_refused(
		    fe_ack(&f, VHOST_USER_SET_INFLIGHT_FD, &inf, sizeof(inf), &T.gm_fd, 1));
		inf = (struct vhost_user_inflight){.mmap_size = 4096,
						   .mmap_offset = ~0ull - 100,
						   .num_queues = 1,
						   .queue_size = NUM};
		assert_refused(
		    fe_ack(&f, VHOST_USER_SET_INFLIGHT_FD, &inf, sizeof(inf), &T.gm_fd, 1));
		inf = (struct vhost_user_inflight){
		    .mmap_size = 1 * MIB, .num_queues = 0, .queue_size = NUM};
		assert_refused(
		    fe_ack(&f, VHOST_USER_SET_INFLIGHT_FD, &inf, sizeof(inf), &T.gm_fd, 1));
		inf = (struct vhost_user_inflight){
		    .mmap_size = 1 * MIB, .num_queues = 1, .queue_size = 3};
		assert_refused(
		    fe_ack(&f, VHOST_USER_SET_INFLIGHT_FD, &inf, sizeof(inf), &T.gm_fd, 1));
		inf = (struct vhost_user_inflight){
		    .mmap_size = 1 * MIB, .num_queues = 1, .queue_size = NUM};
		assert_refused(fe_ack(&f, VHOST_USER_SET_INFLIGHT_FD, &inf, sizeof(inf), &efd, 1));
		close(efd);
	}
	fe_close(&f);
	/* Everything those connections brought is gone again. */
	assert_true(wait_rpc("vhost_get_controllers", "\"connected\":false", WAIT_MS));
	assert_true(fds_back_to(before));
	after_case();
}

/* A message cut short and never finished must not stop the daemon from
 * serving its RPC socket, and the connection must be dropped. */
static void test_stalled_message(void **state)
{
	struct wire w;
	struct fe f;
	char out[4096];
	uint64_t t0;

	fe_connect(&f);
	fe_handshake(&f, FEAT_STD);
	memset(&w, 0, sizeof(w));
	w.hdr = (struct vhost_user_hdr){VHOST_USER_SET_VRING_ADDR, VHOST_USER_VERSION, 40};
	assert_int_equal(send_fds(f.sock, &w, sizeof(w.hdr) + 10, NULL, 0), 0);
	usleep(100000);
	t0 = now_ms();
	assert_int_equal(rpc("vhost_get_controllers", NULL, out, sizeof(out), WAIT_MS), 0);
	/* The daemon gives the message 2 s (VBLK_MSG_TIMEOUT_S); 5 s more for a
	 * loaded machine, still short of a daemon that waits for good. */
	assert_true(now_ms() - t0 < 7000);
	assert_true(fe_dropped(&f));
	fe_close(&f);

	/* Only a part of a header. */
	fe_connect(&f);
	assert_int_equal(send_fds(f.sock, &w, 5, NULL, 0), 0);
	usleep(100000);
	assert_int_equal(rpc("vhost_get_controllers", NULL, out, sizeof(out), WAIT_MS), 0);
	assert_true(fe_dropped(&f));
	fe_close(&f);
	after_case();
}

/* Requests whose replies are never read must not block the daemon. */
static void test_unread_replies(void **state)
{
	struct fe f;
	struct vhost_user_hdr h = {VHOST_USER_GET_FEATURES, VHOST_USER_VERSION, 0};
	char out[4096];
	unsigned sent = 0;
	uint64_t end;

	fe_connect(&f);
	fcntl(f.sock, F_SETFL, O_NONBLOCK);
	/* Send until our side is full too: the daemon no longer reads. */
	end = now_ms() + WAIT_MS;
	while (now_ms() < end) {
		ssize_t n = send(f.sock, &h, sizeof(h), MSG_NOSIGNAL);

		if (n == (ssize_t)sizeof(h)) {
			sent++;
			continue;
		}
		if (n < 0 && errno == EAGAIN) {
			usleep(20000);
			if (send(f.sock, &h, sizeof(h), MSG_NOSIGNAL) < 0 && errno == EAGAIN)
				break;
			sent++;
			continue;
		}
		break;
	}
	assert_true(sent > 100);
	assert_int_equal(rpc("vhost_get_controllers", NULL, out, sizeof(out), WAIT_MS), 0);
	fcntl(f.sock, F_SETFL, 0);
	assert_true(fe_dropped(&f));
	fe_close(&f);
	after_case();
}

/* Random messages: ids, flags, sizes, payloads and fds. Whatever the
 * daemon makes of them, it must survive and serve afterwards. Post-copy is
 * not negotiated (PAGEFAULT): see docs/security.md for why. */
static void test_random_messages(void **state)
{
	struct fe f;
	int before = settled_fds();
	/* Random fds are this memfd, never guest memory: a log or an in-flight
	 * region the front-end places there is the daemon's to write. */
	int scratch = memfd_create("hostile-scratch", MFD_CLOEXEC);

	assert_true(scratch >= 0 && ftruncate(scratch, MIB) == 0);
	rng_state = 0x1234567887654321ull;
	fe_up(&f, UP_NO_RING, 0);
	for (unsigned n = 0; n < 400; n++) {
		struct wire w;
		int fds[3];
		unsigned nfds = (unsigned)(rnd() % 4);
		uint32_t size = (uint32_t)(rnd() % 64);

		if (rnd() % 4 == 0)
			size = (uint32_t)(rnd() % sizeof(w.p));
		memset(&w, 0, sizeof(w));
		for (size_t i = 0; i < sizeof(w.p); i += 8) {
			uint64_t v = rnd();

			/* Small values reach deeper than uniform noise. */
			if (v % 3 == 0)
				v %= 64;
			memcpy(w.p.raw + i, &v, 8);
		}
		w.hdr.request = (uint32_t)(rnd() % (VHOST_USER_REQ_MAX + 2));
		if (w.hdr.request >= VHOST_USER_POSTCOPY_ADVISE &&
		    w.hdr.request <= VHOST_USER_POSTCOPY_END)
			w.hdr.request = VHOST_USER_GET_FEATURES;
		w.hdr.flags = VHOST_USER_VERSION | (rnd() % 8 == 0 ? (uint32_t)rnd() & 0xc : 0);
		w.hdr.size = size;
		if (nfds == 3)
			nfds = 1;
		for (unsigned i = 0; i < nfds; i++)
			fds[i] = rnd() % 2 ? eventfd(0, EFD_CLOEXEC) : dup(scratch);
		if (send_fds(f.sock, &w, sizeof(w.hdr) + size, fds, nfds) < 0 ||
		    (rnd() % 16 == 0)) {
			fe_close(&f);
			assert_true(daemon_alive());
			fe_up(&f, UP_NO_RING, 0);
		}
		for (unsigned i = 0; i < nfds; i++)
			close(fds[i]);
		/* Drain whatever came back. */
		{
			char buf[4096];

			while (recv(f.sock, buf, sizeof(buf), MSG_DONTWAIT) > 0)
				;
		}
	}
	fe_close(&f);
	close(scratch);
	assert_true(daemon_alive());
	assert_true(wait_rpc("vhost_get_controllers", "\"connected\":false", WAIT_MS));
	assert_true(fds_back_to(before));
	after_case();
}

/* ---- cases: the in-flight region after a crash ---- */

enum corruption {
	C_NONE,
	C_VERSION,
	C_DESC_NUM,
	C_FLAG_VALUE,
	C_ALL_MARKED_NO_COUNTER,
	C_ALL_MARKED,
	C_USED_IDX_FAR,
	C_USED_RING_BAD_ID,
	C_COUNTER_MAX,
	C_GARBAGE_CHAINS,
	C_BATCH_FIELDS,
	C_RANDOM,
	C_COUNT,
};

static const char *const corruption_names[C_COUNT] = {
    "none",	    "version",	    "desc_num",	   "flag_value",  "all_marked_no_counter",
    "all_marked",   "used_idx_far", "used_bad_id", "counter_max", "garbage_chains",
    "batch_fields", "random",
};

static void corrupt(struct vhost_inflight_queue *q, enum corruption c, unsigned round)
{
	switch (c) {
	case C_NONE:
		break;
	case C_VERSION:
		q->version = 7;
		break;
	case C_DESC_NUM:
		q->desc_num = NUM / 2;
		break;
	case C_FLAG_VALUE:
		q->desc[5].inflight = 2;
		break;
	case C_ALL_MARKED_NO_COUNTER:
		for (unsigned i = 0; i < NUM; i++) {
			q->desc[i].inflight = 1;
			q->desc[i].counter = 0;
		}
		break;
	case C_ALL_MARKED:
		for (unsigned i = 0; i < NUM; i++) {
			q->desc[i].inflight = 1;
			q->desc[i].counter = 100 + i;
		}
		break;
	case C_USED_IDX_FAR:
		q->used_idx = 0x8000;
		break;
	case C_USED_RING_BAD_ID:
		q->used_idx = (uint16_t)(q->used_idx - 1);
		used()->ring[q->used_idx % NUM].id = 999;
		break;
	case C_COUNTER_MAX:
		for (unsigned i = 0; i < NUM; i++)
			if (q->desc[i].inflight)
				q->desc[i].counter = ~0ull - i;
		break;
	case C_GARBAGE_CHAINS:
		/* The marked heads are redone: make their chains garbage. */
		for (unsigned i = 0; i < NUM; i++)
			if (q->desc[i].inflight)
				set_desc(desc_table(), i, GPA_END + i * 4096, 0xffffffffu,
					 VHOST_DESC_F_NEXT | VHOST_DESC_F_INDIRECT,
					 (uint16_t)(i * 7));
		break;
	case C_BATCH_FIELDS:
		q->last_batch_head = 0xffff;
		for (unsigned i = 0; i < NUM; i++)
			q->desc[i].next = (uint16_t)(0xfff0 + i);
		break;
	case C_RANDOM:
		rng_state = 0xabcdef0123456789ull + round;
		for (size_t i = 0; i < vhost_inflight_queue_size(NUM); i++)
			if (rnd() % (round + 2) == 0)
				((uint8_t *)q)[i] = (uint8_t)rnd();
		break;
	case C_COUNT:
		break;
	}
}

static void inflight_round(enum corruption c, unsigned round)
{
	struct vhost_inflight_queue *q;
	struct fe f;
	char out[256];
	uint16_t used_at_kill;
	uint64_t end;

	ring_reset();
	fe_up(&f, UP_INFLIGHT, 0);
	q = f.inflight;
	/* Two writes done, then four held in flight, then the crash. */
	for (uint16_t h = 0; h < 6; h += 3) {
		build_rw(h, VIRTIO_BLK_T_OUT, 8 * h, G_DATA + 0x1000u * h, 4096);
		expect_status(&f, h, VIRTIO_BLK_S_OK);
	}
	assert_int_equal(
	    rpc("vmig_blk_set_latency", "{\"write_us\":30000000}", out, sizeof(out), WAIT_MS), 0);
	for (uint16_t h = 0; h < 12; h += 3) {
		build_rw(h, VIRTIO_BLK_T_OUT, 8 * h, G_DATA + 0x1000u * h, 4096);
		post(&f, h);
	}
	assert_true(wait_rpc("vhost_get_controllers", "\"inflight_requests\":4", WAIT_MS));
	/* all four held for the latency, the two done before it not */
	assert_true(wait_rpc("vhost_get_controllers", "\"delayed_requests\":4", WAIT_MS));
	/* The ring as the control socket shows it: six posted and taken, two
	 * returned, nothing at the disk yet (the writes wait for the latency). */
	assert_true(wait_rpc("vhost_get_controllers",
			     "\"ring\":{\"avail_idx\":6,\"last_avail_idx\":6,\"used_idx\":2,",
			     WAIT_MS));
	assert_true(wait_rpc("vhost_get_controllers", "\"io_outstanding\":0}", WAIT_MS));
	daemon_kill9();
	fe_close_sock(&f);
	used_at_kill = used()->idx;
	assert_int_equal(used_at_kill, 2);
	assert_int_equal(q->version, VHOST_INFLIGHT_VERSION);
	corrupt(q, c, round);
	daemon_start();

	/* QEMU's reconnect: the same region, the guest's used index as base. */
	close(f.kick);
	close(f.call);
	close(f.err);
	fe_up(&f, UP_KEEP_INFLIGHT, used_at_kill);
	/* Whatever the region said, every request the guest posted comes back
	 * (redone, or dropped if its chain was garbage), or the ring is
	 * declared broken; nothing else. */
	end = now_ms() + WAIT_MS;
	while (now_ms() < end && used()->idx != T.avail_idx && !wait_fd(f.err, 0))
		usleep(1000);
	if (used()->idx != T.avail_idx && !wait_fd(f.err, 0))
		fail_msg("corruption %s: used %u of %u, ring not broken", corruption_names[c],
			 used()->idx, T.avail_idx);
	controllers();
	if (c == C_NONE || c == C_BATCH_FIELDS || c == C_COUNTER_MAX)
		assert_non_null(strstr(rpc_buf, "\"inflight_recovery\":\"recovered\""));
	if (c == C_NONE)
		assert_non_null(strstr(rpc_buf, "\"recovered_requests\":4"));
	if (c == C_VERSION || c == C_DESC_NUM || c == C_FLAG_VALUE ||
	    c == C_ALL_MARKED_NO_COUNTER || c == C_ALL_MARKED || c == C_USED_IDX_FAR ||
	    c == C_USED_RING_BAD_ID) {
		assert_non_null(strstr(rpc_buf, "\"inflight_recovery\":\"invalid\""));
		assert_true(log_contains("in-flight region not trusted"));
	}
	fe_close(&f);
	fe_drop_inflight(&f);
	after_case();
}

static void test_inflight_corrupted(void **state)
{
	for (enum corruption c = C_NONE; c < C_COUNT; c++) {
		unsigned rounds = c == C_RANDOM ? 4 : 1;

		for (unsigned r = 0; r < rounds; r++)
			inflight_round(c, r);
	}
}

/* ---- cases: guest memory rewritten while the queue runs ---- */

static volatile bool scribbling;

static void *scribbler(void *arg)
{
	struct fe *f = arg;
	uint64_t s = 0x5555aaaa5555aaaaull;

	while (__atomic_load_n(&scribbling, __ATOMIC_RELAXED)) {
		unsigned i;

		s ^= s << 13;
		s ^= s >> 7;
		s ^= s << 17;
		i = (unsigned)(s % NUM);
		switch ((s >> 8) % 4) {
		case 0:
			__atomic_store_n(&desc_table()[i].addr, s >> 16, __ATOMIC_RELAXED);
			break;
		case 1:
			__atomic_store_n(&desc_table()[i].len, (uint32_t)(s >> 20),
					 __ATOMIC_RELAXED);
			break;
		case 2:
			__atomic_store_n(&desc_table()[i].flags, (uint16_t)(s >> 24),
					 __ATOMIC_RELAXED);
			__atomic_store_n(&desc_table()[i].next, (uint16_t)(s >> 40),
					 __ATOMIC_RELAXED);
			break;
		case 3:
			if (f->inflight)
				((uint8_t *)f->inflight)[(s >> 12) % f->inflight_len] =
				    (uint8_t)(s >> 32);
			break;
		}
	}
	return NULL;
}

static void test_concurrent_scribble(void **state)
{
	struct fe f;
	pthread_t th;
	uint64_t end;

	for (int with_inflight = 0; with_inflight < 2; with_inflight++) {
		ring_reset();
		fe_up(&f, with_inflight ? UP_INFLIGHT : 0, 0);
		__atomic_store_n(&scribbling, true, __ATOMIC_RELAXED);
		assert_int_equal(pthread_create(&th, NULL, scribbler, &f), 0);
		end = now_ms() + 1000;
		while (now_ms() < end && !wait_fd(f.err, 0)) {
			uint16_t h = (uint16_t)(rnd() % 5) * 3;

			/* One at a time: a head is never posted twice. */
			if (T.avail_idx != used()->idx) {
				usleep(100);
				continue;
			}
			build_rw(h, rnd() % 2 ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT, rnd() % 64,
				 G_DATA + (rnd() % 8) * 4096, 4096);
			post(&f, h);
		}
		__atomic_store_n(&scribbling, false, __ATOMIC_RELAXED);
		pthread_join(th, NULL);
		assert_true(daemon_alive());
		fe_close(&f);
		fe_drop_inflight(&f);
	}
	after_case();
}

/* kill -9 while a flush of many dirty pages runs on an io_uring worker,
 * then restart at once: the image lock must already be free (the daemon
 * holds it on a file description of its own, which no I/O keeps alive),
 * and the restarted daemon must serve. Repeated, since the flush may or
 * may not have been taken when the kill comes. */
static void test_restart_during_flush(void **state)
{
	struct fe f;
	uint8_t *buf = gp(GPA_B);

	for (int round = 0; round < 3; round++) {
		ring_reset();
		fe_up(&f, 0, 0);
		memset(buf, 0x40 + round, R_SIZE / 2);
		/* 16 MiB of dirty pages: the whole image, 512 KiB at a time. */
		for (uint64_t sector = 0; sector < IMG_SIZE / 512; sector += 1024) {
			build_rw(0, VIRTIO_BLK_T_OUT, sector, GPA_B, R_SIZE / 2);
			expect_status(&f, 0, VIRTIO_BLK_S_OK);
		}
		build_rw(3, VIRTIO_BLK_T_FLUSH, 0, G_DATA, 0);
		set_desc(desc_table(), 3, hdr_gpa(3), 16, VHOST_DESC_F_NEXT, 5);
		post(&f, 3);
		usleep(1000 * (unsigned)round);
		daemon_kill9();
		fe_close_sock(&f);
		close(f.kick);
		close(f.call);
		close(f.err);
		daemon_start(); /* fails if the image is still locked */
	}
	after_case();
}

/* Nothing from outside guest memory ever reached the disk. */
static void test_image_clean(void **state)
{
	assert_true(daemon_alive());
	assert_image_clean();
}

/* Before each case: whatever a failed one left behind is cleaned up, so
 * that one failure does not fail every case after it. */
static int case_setup(void **state)
{
	for (unsigned i = 0; i < 8; i++) {
		if (T.open[i])
			close(T.open[i] - 1);
		T.open[i] = 0;
	}
	__atomic_store_n(&scribbling, false, __ATOMIC_RELAXED);
	if (T.pid <= 0 || !daemon_alive()) {
		fprintf(stderr, "(restarting the daemon for the next case)\n");
		daemon_start();
	}
	if (!wait_rpc("vhost_get_controllers", "\"connected\":false", WAIT_MS))
		return -1;
	rpc("vmig_blk_set_latency", "{}", rpc_buf, sizeof(rpc_buf), WAIT_MS);
	return 0;
}

/* ---- setup ---- */

static int group_setup(void **state)
{
	char tmpl[] = "/tmp/vhost-hostile.XXXXXX";
	const char *tmpdir = getenv("TMPDIR");
	int fd;

	if (tmpdir && strlen(tmpdir) < 100)
		snprintf(T.dir, sizeof(T.dir), "%s/vhost-hostile.XXXXXX", tmpdir);
	else
		snprintf(T.dir, sizeof(T.dir), "%s", tmpl);
	if (!mkdtemp(T.dir))
		return -1;
	snprintf(T.sock, sizeof(T.sock), "%s/vblk.sock", T.dir);
	snprintf(T.rpc, sizeof(T.rpc), "%s/vblk.rpc", T.dir);
	snprintf(T.image, sizeof(T.image), "%s/disk.img", T.dir);
	snprintf(T.log, sizeof(T.log), "%s/daemon.log", T.dir);
	fd = open(T.image, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0 || ftruncate(fd, IMG_SIZE) < 0)
		return -1;
	close(fd);
	T.gm_fd = memfd_create("hostile-guest", MFD_CLOEXEC);
	if (T.gm_fd < 0 || ftruncate(T.gm_fd, GM_SIZE) < 0)
		return -1;
	T.gm = mmap(NULL, GM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, T.gm_fd, 0);
	if (T.gm == MAP_FAILED)
		return -1;
	fill_secret();
	signal(SIGPIPE, SIG_IGN);
	daemon_start();
	return 0;
}

static int group_teardown(void **state)
{
	int r = 0;

	if (T.pid > 0)
		r = daemon_stop();
	if (r == 0) {
		unlink(T.image);
		unlink(T.log);
		unlink(T.sock);
		unlink(T.rpc);
		rmdir(T.dir);
	} else {
		fprintf(stderr, "files kept in %s\n", T.dir);
	}
	return r;
}

int main(int argc, char **argv)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup(test_mem_tables, case_setup),
	    cmocka_unit_test_setup(test_mem_slots, case_setup),
	    cmocka_unit_test_setup(test_ring_setup, case_setup),
	    cmocka_unit_test_setup(test_desc_outside_memory, case_setup),
	    cmocka_unit_test_setup(test_desc_chains, case_setup),
	    cmocka_unit_test_setup(test_indirect, case_setup),
	    cmocka_unit_test_setup(test_lengths_past_4g, case_setup),
	    cmocka_unit_test_setup(test_avail_jump, case_setup),
	    cmocka_unit_test_setup(test_head_twice, case_setup),
	    cmocka_unit_test_setup(test_framing, case_setup),
	    cmocka_unit_test_setup(test_stalled_message, case_setup),
	    cmocka_unit_test_setup(test_unread_replies, case_setup),
	    cmocka_unit_test_setup(test_random_messages, case_setup),
	    cmocka_unit_test_setup(test_inflight_corrupted, case_setup),
	    cmocka_unit_test_setup(test_concurrent_scribble, case_setup),
	    cmocka_unit_test_setup(test_restart_during_flush, case_setup),
	    cmocka_unit_test_setup(test_image_clean, case_setup),
	};

	if (argc != 2) {
		fprintf(stderr, "usage: %s PATH-TO-VMIG-BLK\n", argv[0]);
		return 2;
	}
	T.bin = argv[1];
	T.pid = -1;
	/* HOSTILE_ONLY=test_name runs one case (while debugging). */
	if (getenv("HOSTILE_ONLY"))
		cmocka_set_test_filter(getenv("HOSTILE_ONLY"));
	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
