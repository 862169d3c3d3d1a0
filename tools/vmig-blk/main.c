// SPDX-License-Identifier: MIT
/*
 * vmig-blk: the daemon's entry point and control loop. It parses the
 * command line, opens the disk, listens on the vhost-user socket (as the
 * server; QEMU connects with reconnect=N) and on the JSON-RPC socket, and
 * runs one poll() loop on the control thread that handles vhost-user
 * messages, RPC clients and SIGTERM/SIGINT. The data path runs on the queue
 * threads (blk.c). "vmig-blk rpc ..." and "vmig-blk upgrade ..." are small
 * clients of the RPC socket (rpc.c).
 *
 * Restart after kill -9 needs no state of ours: the stale socket file is
 * replaced (only a socket nobody listens on), QEMU reconnects and hands
 * back the in-flight region, and the rings resume from it
 * (lib/vhost/inflight.c).
 */
#include "blk.h"
#include "mirror.h"
#include "util/util.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

static bool debug_msgs;

void vblk_log(const struct vblk_daemon *dm, const char *fmt, ...)
{
	va_list ap;

	if (dm->opts.quiet)
		return;
	va_start(ap, fmt);
	fputs("vmig-blk: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static void usage(FILE *f)
{
	fputs(
	    "usage: vmig-blk --socket PATH (--file PATH | --ram SIZE | --null SIZE "
	    "[--read-zeroes])\n"
	    "                [--queues N] [--read-only] [--poll-us N] [--rpc PATH] [--serial ID]\n"
	    "                [--size SIZE] [--cache none|writeback] [--upgrade-binary PATH]\n"
	    "                [--no-lock] [--incoming URI] [--postcopy-state FILE]\n"
	    "                [--write-blocking-stall-ms N]\n"
	    "                [--tls-creds SPEC]\n"
	    "                [--tls-hostname NAME] [--tls-authz ID] [--quiet]\n"
	    "       vmig-blk rpc --rpc PATH METHOD [JSON-PARAMS]\n"
	    "       vmig-blk upgrade (--socket PATH | --rpc PATH)\n"
	    "       vmig-blk --version\n"
	    "\n"
	    "  --cache writeback  (default) I/O goes through the host's page cache, as\n"
	    "                     QEMU's cache=writeback\n"
	    "  --cache none       the image is opened O_DIRECT, as QEMU's cache=none: the\n"
	    "                     host's page cache is bypassed; guest flushes are\n"
	    "                     fdatasync() in both modes. A file system without\n"
	    "                     O_DIRECT is refused at start. Misaligned guest buffers\n"
	    "                     go through bounce buffers\n"
	    "  --incoming URI     the destination of a storage migration: receive the\n"
	    "                     disk from the source's vmig-blk on URI (tcp:HOST:PORT\n"
	    "                     or unix:PATH) and serve the guest only once all of it\n"
	    "                     arrived, or, in post-copy storage, at the switch,\n"
	    "                     fetching what is not here yet on demand\n"
	    "                     (docs/storage-migration.md)\n"
	    "  --postcopy-state FILE  where a post-copy storage migration keeps its state:\n"
	    "                     on the destination, which blocks are not here yet; on\n"
	    "                     the source, that the disk was handed over (default:\n"
	    "                     the image's name + .vmig-postcopy; a block device\n"
	    "                     needs it for post-copy). A daemon started on an image\n"
	    "                     whose state file exists resumes that post-copy\n"
	    "  --write-blocking-stall-ms N  a storage migration in copy-mode\n"
	    "                     write-blocking: how long a guest write waits for the\n"
	    "                     destination before it completes here anyway (1..30000,\n"
	    "                     default 1000)\n"
	    "  --tls-creds x509|psk,dir=DIR,endpoint=client|server[,username=U]\n"
	    "                     [,verify-peer=on|off]\n"
	    "                     TLS 1.3 for the storage stream, credentials laid out as\n"
	    "                     QEMU's tls-creds-x509 / tls-creds-psk objects:\n"
	    "                     endpoint=server with --incoming, client on the source\n"
	    "  --tls-hostname N   source: the name the destination's certificate carries\n"
	    "  --tls-authz ID     destination: the one client identity let in (the\n"
	    "                     certificate's DN or the PSK username)\n",
	    f);
}

/* A decimal number, digits only (strtoul alone takes a sign and spaces):
 * 0 and *v, or -1. */
static int parse_uint(const char *arg, unsigned long max, unsigned long *v)
{
	char *end;

	if (!isdigit((unsigned char)arg[0]))
		return -1;
	errno = 0;
	*v = strtoul(arg, &end, 10);
	return errno || *end || *v > max ? -1 : 0;
}

static int parse_args(int argc, char **argv, struct vblk_opts *o)
{
	static const struct option lopts[] = {
	    {"socket", required_argument, NULL, 's'},
	    {"file", required_argument, NULL, 'f'},
	    {"ram", required_argument, NULL, 'r'},
	    {"queues", required_argument, NULL, 'q'},
	    {"read-only", no_argument, NULL, 'R'},
	    {"rpc", required_argument, NULL, 'c'},
	    {"serial", required_argument, NULL, 'i'},
	    {"size", required_argument, NULL, 'z'},
	    {"quiet", no_argument, NULL, 'Q'},
	    {"help", no_argument, NULL, 'h'},
	    {"version", no_argument, NULL, 'V'},
	    {"null", required_argument, NULL, 'n'},
	    {"read-zeroes", no_argument, NULL, 'Z'},
	    {"poll-us", required_argument, NULL, 'p'},
	    {"write-blocking-stall-ms", required_argument, NULL, 'W'},
	    {"upgrade-binary", required_argument, NULL, 'u'},
	    {"no-lock", no_argument, NULL, 'L'},
	    {"cache", required_argument, NULL, 'C'},
	    {"incoming", required_argument, NULL, 'I'},
	    {"postcopy-state", required_argument, NULL, 'P'},
	    {"tls-creds", required_argument, NULL, 'T'},
	    {"tls-hostname", required_argument, NULL, 'H'},
	    {"tls-authz", required_argument, NULL, 'A'},
	    {NULL, 0, NULL, 0},
	};
	unsigned long v;
	int c;

	o->queues = 1;
	o->poll_us = VBLK_DEFAULT_POLL_US;
	o->wb_stall_ms = VBLK_DEFAULT_WB_STALL_MS;
	while ((c = getopt_long(argc, argv, "", lopts, NULL)) != -1) {
		switch (c) {
		case 's':
			o->socket = optarg;
			break;
		case 'f':
			o->file = optarg;
			break;
		case 'r':
			if (vmig__parse_size(optarg, &o->ram_size) || o->ram_size < VBLK_SECTOR) {
				fprintf(stderr, "vmig-blk: bad --ram size '%s'\n", optarg);
				return -1;
			}
			break;
		case 'n':
			if (vmig__parse_size(optarg, &o->null_size) || o->null_size < VBLK_SECTOR) {
				fprintf(stderr, "vmig-blk: bad --null size '%s'\n", optarg);
				return -1;
			}
			break;
		case 'Z':
			o->read_zeroes = true;
			break;
		case 'p':
			if (parse_uint(optarg, VBLK_MAX_POLL_US, &v)) {
				fprintf(stderr, "vmig-blk: --poll-us must be 0..%u\n",
					VBLK_MAX_POLL_US);
				return -1;
			}
			o->poll_us = (uint32_t)v;
			break;
		case 'W':
			if (parse_uint(optarg, VBLK_MAX_WB_STALL_MS, &v) || v < 1) {
				fprintf(stderr,
					"vmig-blk: --write-blocking-stall-ms must be 1..%u\n",
					VBLK_MAX_WB_STALL_MS);
				return -1;
			}
			o->wb_stall_ms = (uint32_t)v;
			break;
		case 'q':
			if (parse_uint(optarg, VHOST_MAX_QUEUES, &v) || v < 1) {
				fprintf(stderr, "vmig-blk: --queues must be 1..%u\n",
					VHOST_MAX_QUEUES);
				return -1;
			}
			o->queues = (unsigned)v;
			break;
		case 'R':
			o->read_only = true;
			break;
		case 'c':
			o->rpc = optarg;
			break;
		case 'i':
			o->serial = optarg;
			break;
		case 'z':
			if (vmig__parse_size(optarg, &o->size) || o->size < VBLK_SECTOR) {
				fprintf(stderr, "vmig-blk: bad --size '%s'\n", optarg);
				return -1;
			}
			break;
		case 'Q':
			o->quiet = true;
			break;
		case 'u':
			o->upgrade_binary = optarg;
			break;
		case 'L':
			o->no_lock = true;
			break;
		case 'C':
			if (strcmp(optarg, "none") && strcmp(optarg, "writeback")) {
				fprintf(stderr,
					"vmig-blk: --cache must be none or writeback, not '%s'\n",
					optarg);
				return -1;
			}
			o->cache_none = !strcmp(optarg, "none");
			break;
		case 'I':
			o->incoming = optarg;
			break;
		case 'P':
			o->postcopy_state = optarg;
			break;
		case 'T':
			o->tls_creds = optarg;
			break;
		case 'H':
			o->tls_hostname = optarg;
			break;
		case 'A':
			o->tls_authz = optarg;
			break;
		case 'h':
			usage(stdout);
			exit(0);
		case 'V':
			printf("vmig-blk 0.1.0 state-v2\n"); /* upgrade.c VERSION_TAG */
			exit(0);
		default:
			usage(stderr);
			return -1;
		}
	}
	if (optind != argc || !o->socket || !!o->file + !!o->ram_size + !!o->null_size != 1) {
		fprintf(stderr,
			"vmig-blk: need --socket and exactly one of --file / --ram / --null\n");
		usage(stderr);
		return -1;
	}
	if (o->cache_none && !o->file) {
		fprintf(stderr, "vmig-blk: --cache none goes with --file\n");
		return -1;
	}
	if ((o->tls_hostname || o->tls_authz) && !o->tls_creds) {
		fprintf(stderr, "vmig-blk: --tls-hostname and --tls-authz go with --tls-creds\n");
		return -1;
	}
	if (o->incoming && (o->null_size || o->read_only)) {
		fprintf(stderr, "vmig-blk: --incoming needs a writable --file or --ram disk\n");
		return -1;
	}
	if (o->postcopy_state && !o->file) {
		fprintf(stderr, "vmig-blk: --postcopy-state goes with --file\n");
		return -1;
	}
	if (o->read_zeroes && !o->null_size) {
		fprintf(stderr, "vmig-blk: --read-zeroes goes with --null\n");
		return -1;
	}
	if (strlen(o->socket) + (o->rpc ? 1 : 5) > sizeof(((struct sockaddr_un *)0)->sun_path) ||
	    (o->rpc && strlen(o->rpc) + 1 > sizeof(((struct sockaddr_un *)0)->sun_path))) {
		fprintf(stderr, "vmig-blk: socket path too long\n");
		return -1;
	}
	return 0;
}

static int disk_size(struct vblk_daemon *dm, int fd, uint64_t *size)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	if (S_ISBLK(st.st_mode))
		return ioctl(fd, BLKGETSIZE64, size) < 0 ? -errno : 0;
	if (!S_ISREG(st.st_mode))
		return -EINVAL;
	*size = (uint64_t)st.st_size;
	if (dm->opts.size && *size < dm->opts.size && !dm->opts.read_only) {
		if (ftruncate(fd, (off_t)dm->opts.size) < 0)
			return -errno;
		*size = dm->opts.size;
	}
	return 0;
}

/*
 * A regular file whose pages live only in memory (tmpfs, ramfs): see
 * inline_rw() in blk.c. Only a regular file: fstatfs on a device node
 * describes the file system the node sits in, and /dev is devtmpfs, whose
 * f_type is TMPFS_MAGIC. Taking a block device for a tmpfs file would serve
 * it with blocking preadv/pwritev on the queue thread, one request at a
 * time, whatever the guest's queue depth.
 */
static bool on_memory_fs(int fd)
{
	struct statfs sf;
	struct stat st;

	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || fstatfs(fd, &sf) < 0)
		return false;
	return sf.f_type == TMPFS_MAGIC || sf.f_type == RAMFS_MAGIC;
}

/*
 * Lock the image as QEMU's locking=on does: an OFD lock (fcntl
 * F_OFD_SETLK) over the whole file, a write lock if we may write, a read
 * lock if --read-only. A conflict is -EBUSY.
 *
 * The lock is held by a file description of its own, opened again through
 * /proc/self/fd (so the same file, whatever happened to its path), through
 * which no I/O ever goes. An OFD lock lasts as long as its file description:
 * the disk fd's one can outlive a kill -9 by the time io_uring takes to
 * drop the requests that were in flight, and a restart at once would find
 * the image still locked; this one goes with the process's fd table, before
 * the process can even be reaped. A live upgrade hands it over
 * (inherited_lock_fd, checked to be the same file); taking the lock again
 * through it only confirms it.
 */
static void disk_unlock(struct vblk_disk *disk)
{
	if (disk->lock_fd >= 0)
		close(disk->lock_fd);
	disk->lock_fd = -1;
}

static int lock_image(struct vblk_daemon *dm, int fd, int inherited_lock_fd)
{
	const struct vblk_opts *o = &dm->opts;
	struct flock fl = {.l_type = o->read_only ? F_RDLCK : F_WRLCK,
			   .l_whence = SEEK_SET,
			   .l_start = 0,
			   .l_len = 0};
	struct stat a, b;
	char path[64];
	int lfd = inherited_lock_fd, r;

	if (lfd >= 0 && (fstat(fd, &a) < 0 || fstat(lfd, &b) < 0 || a.st_dev != b.st_dev ||
			 a.st_ino != b.st_ino)) {
		close(lfd);
		lfd = -1;
	}
	if (lfd < 0) {
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
		lfd = open(path, (o->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOCTTY);
		if (lfd < 0)
			return -errno;
	}
	if (fcntl(lfd, F_OFD_SETLK, &fl) < 0) {
		r = errno == EAGAIN || errno == EACCES ? -EBUSY : -errno;
		close(lfd);
		return r;
	}
	fcntl(lfd, F_SETFD, FD_CLOEXEC);
	dm->disk.lock_fd = lfd;
	return 0;
}

/*
 * Open the image file or block device; --cache none opens it O_DIRECT, as
 * QEMU's cache=none does. A file system that refuses O_DIRECT (open fails
 * with EINVAL: ramfs, or tmpfs before Linux 6.6) makes the daemon refuse
 * to start, as QEMU does ("filesystem does not support O_DIRECT"), rather
 * than serve through the page cache the user asked to bypass. fd or -errno.
 */
static int open_image(struct vblk_daemon *dm)
{
	const struct vblk_opts *o = &dm->opts;
	int flags = (o->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | (o->size ? O_CREAT : 0);
	int fd, r;

	/* A new image holds the guest's data: for our user only. */
	fd = open(o->file, flags | (o->cache_none ? O_DIRECT : 0), 0600);
	if (fd >= 0)
		return fd;
	r = -errno;
	if (r == -EINVAL && o->cache_none) {
		/* Is it O_DIRECT that was refused? */
		fd = open(o->file, flags & ~O_CREAT);
		if (fd >= 0) {
			close(fd);
			snprintf(dm->disk_err, sizeof(dm->disk_err),
				 "the file system does not support O_DIRECT, which --cache none "
				 "needs (--cache writeback serves it through the page cache)");
		}
	}
	return r;
}

/* Make an inherited disk fd's O_DIRECT what the command line says. */
static int set_direct(int fd, bool direct)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0)
		return -errno;
	if (!!(fl & O_DIRECT) == direct)
		return 0;
	return fcntl(fd, F_SETFL, direct ? fl | O_DIRECT : fl & ~O_DIRECT) < 0 ? -errno : 0;
}

/* Open the disk, or take over an inherited fd and lock fd (live upgrade;
 * -1 if none). -EBUSY: the image is locked by another process. Other
 * errors may leave their reason in dm->disk_err. */
int vblk_disk_open(struct vblk_daemon *dm, int inherited_fd, int inherited_lock_fd)
{
	struct vblk_disk *disk = &dm->disk;
	const struct vblk_opts *o = &dm->opts;
	const char *serial = o->serial ? o->serial : "vmig-blk";
	uint64_t size = o->ram_size;
	int fd = inherited_fd, r;
	bool populate = false; /* a fresh RAM disk: map its pages now */

	disk->read_only = o->read_only;
	disk->read_zeroes = o->read_zeroes;
	disk->backend = o->file	      ? VBLK_BACKEND_FILE
			: o->ram_size ? VBLK_BACKEND_RAM
				      : VBLK_BACKEND_NULL;
	/* virtio-blk serials are 20 bytes, NUL-padded, not NUL-terminated. */
	memset(disk->serial, 0, sizeof(disk->serial));
	memcpy(disk->serial, serial, VMIG_MIN(strlen(serial), sizeof(disk->serial)));
	if (disk->backend == VBLK_BACKEND_NULL) {
		/* Nothing to open: a size is all a null disk has. */
		if (fd >= 0)
			close(fd);
		disk->fd = -1;
		disk->size = o->null_size & ~(uint64_t)(VBLK_SECTOR - 1);
		return vblk_disk_probe(disk, dm->disk_err, sizeof(dm->disk_err));
	}
	if (fd < 0 && o->ram_size) {
		fd = memfd_create("vmig-blk-ram", MFD_CLOEXEC);
		if (fd < 0)
			return -errno;
		/* Allocate the whole disk now: a page the kernel cannot supply
		 * later would be a SIGBUS on the queue thread, and allocating
		 * on first touch puts a page fault in the I/O path. */
		if (ftruncate(fd, (off_t)o->ram_size) < 0 ||
		    fallocate(fd, 0, 0, (off_t)o->ram_size) < 0) {
			r = -errno;
			close(fd);
			return r;
		}
		populate = true;
	} else if (fd < 0) {
		fd = open_image(dm);
		if (fd < 0)
			return fd;
	} else if (disk->backend == VBLK_BACKEND_FILE) {
		r = set_direct(fd, o->cache_none);
		if (r) {
			snprintf(dm->disk_err, sizeof(dm->disk_err),
				 "cannot %s O_DIRECT on the inherited disk: %s",
				 o->cache_none ? "set" : "clear", strerror(-r));
			close(fd);
			return r;
		}
	}
	disk->lock_fd = -1;
	if (disk->backend == VBLK_BACKEND_FILE && !o->no_lock) {
		/* Before anything is read or resized. */
		r = lock_image(dm, fd, inherited_lock_fd);
		if (r && inherited_fd >= 0) {
			/* A binary that did not lock handed over: keep serving
			 * rather than drop the guest's disk. */
			vblk_log(dm, "warning: cannot lock the image after the upgrade: %s",
				 strerror(-r));
		} else if (r) {
			close(fd);
			return r;
		}
	} else if (inherited_lock_fd >= 0) {
		close(inherited_lock_fd);
	}
	if (!o->ram_size) {
		r = disk_size(dm, fd, &size);
		if (r) {
			disk_unlock(disk);
			close(fd);
			return r;
		}
		if (o->size && o->size < size)
			size = o->size;
	}
	size &= ~(uint64_t)(VBLK_SECTOR - 1);
	if (size == 0) {
		disk_unlock(disk);
		close(fd);
		return -EINVAL;
	}
	if (o->ram_size) {
		/* Not after a live upgrade: mapping every page would lengthen
		 * the pause; the pages exist, only page tables are rebuilt. */
		disk->ram = mmap(NULL, size, PROT_READ | PROT_WRITE,
				 MAP_SHARED | (populate ? MAP_POPULATE : 0), fd, 0);
		if (disk->ram == MAP_FAILED) {
			disk->ram = NULL;
			close(fd);
			return -errno;
		}
	}
	disk->fd = fd;
	disk->size = size;
	disk->inline_io = disk->backend == VBLK_BACKEND_FILE && on_memory_fs(fd);
	disk->direct = disk->backend == VBLK_BACKEND_FILE && o->cache_none;
	{
		struct stat st;

		disk->is_blkdev = fstat(fd, &st) == 0 && S_ISBLK(st.st_mode);
	}
	r = vblk_disk_probe(disk, dm->disk_err, sizeof(dm->disk_err));
	if (r) {
		if (disk->ram)
			munmap(disk->ram, size);
		disk->ram = NULL;
		disk_unlock(disk);
		close(fd);
		disk->fd = -1;
		return r;
	}
	return 0;
}

/* Does a process listen on the unix socket at path? 1 yes, 0 no (a file
 * left by a killed process), -errno if we cannot tell. Non-blocking, so a
 * listener whose backlog is full counts as one, and we never wait on it. A
 * live daemon sees the probe as a connection that closes at once. */
static int socket_in_use(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0), r;

	if (fd < 0)
		return -errno;
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 || errno == EAGAIN ||
	    errno == EINPROGRESS)
		r = 1;
	else if (errno == ECONNREFUSED || errno == ENOENT)
		r = 0;
	else
		r = -errno;
	close(fd);
	return r;
}

void vblk_sock_id_of(const char *path, struct vblk_sock_id *id)
{
	struct stat st;

	id->valid = lstat(path, &st) == 0 && S_ISSOCK(st.st_mode);
	id->dev = id->valid ? st.st_dev : 0;
	id->ino = id->valid ? st.st_ino : 0;
}

int vblk_listen_unix(const char *path, mode_t mode, struct vblk_sock_id *id, char *err,
		     size_t errlen)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct stat st;
	mode_t old = 0;
	int fd, r;

	id->valid = false;
	if (strlen(path) >= sizeof(sa.sun_path)) {
		snprintf(err, errlen, "%s: path too long for a unix socket", path);
		return -ENAMETOOLONG;
	}
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	/* Only a socket nobody listens on is replaced: never another kind of
	 * file, never the socket of a daemon that still runs. */
	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode)) {
			snprintf(err, errlen, "%s exists and is not a socket: not replacing it",
				 path);
			return -EEXIST;
		}
		r = socket_in_use(path);
		if (r > 0) {
			snprintf(
			    err, errlen,
			    "%s is already in use: a process listens on it (another vmig-blk?)",
			    path);
			return -EADDRINUSE;
		}
		if (r < 0) {
			snprintf(err, errlen, "%s: cannot tell whether it is in use: %s", path,
				 strerror(-r));
			return r;
		}
		if (unlink(path) < 0 && errno != ENOENT) {
			r = -errno;
			snprintf(err, errlen, "cannot remove the stale socket %s: %s", path,
				 strerror(-r));
			return r;
		}
	} else if (errno != ENOENT) {
		r = -errno;
		snprintf(err, errlen, "%s: %s", path, strerror(-r));
		return r;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		r = -errno;
		snprintf(err, errlen, "socket: %s", strerror(-r));
		return r;
	}
	/* The file gets its mode from the umask at bind: no moment when it
	 * is more open than asked. Only the control thread runs here. */
	if (mode)
		old = umask(0777 & ~mode);
	r = bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ? -errno : 0;
	if (mode)
		umask(old);
	if (r == 0 && listen(fd, 4) < 0)
		r = -errno;
	if (r) {
		/* EADDRINUSE: another daemon bound it since we looked. */
		snprintf(err, errlen, "%s: %s", path,
			 r == -EADDRINUSE ? "already in use" : strerror(-r));
		close(fd);
		return r;
	}
	vblk_sock_id_of(path, id);
	return fd;
}

void vblk_unlink_socket(const char *path, const struct vblk_sock_id *id)
{
	struct vblk_sock_id now;

	/* Only the socket file we created: not whatever replaced it since. */
	vblk_sock_id_of(path, &now);
	if (id->valid && now.valid && now.dev == id->dev && now.ino == id->ino)
		unlink(path);
}

static void disconnect(struct vblk_daemon *dm, const char *why)
{
	vblk_log(dm, "vhost-user connection closed (%s)", why);
	vhost_dev_reset(&dm->dev);
	close(dm->conn_fd);
	dm->conn_fd = -1;
}

/* Say what each ring found in the in-flight region when it (re)started. */
static void log_recoveries(struct vblk_daemon *dm)
{
	for (unsigned i = 0; i < dm->nqueues; i++) {
		struct vhost_vring *vr = &dm->dev.vring[i];
		const struct vhost_inflight_recovery *rc = &vr->recovery;

		if (vr->starts == dm->q[i].logged_starts)
			continue;
		dm->q[i].logged_starts = vr->starts;
		if (debug_msgs)
			vblk_log(dm,
				 "queue %u: start %llu at avail %u (front-end base %u), log %s%s",
				 i, (unsigned long long)vr->starts, rc->last_avail_idx, vr->base,
				 vr->vq.log ? "on" : "off", vr->vq.log_used ? "+used" : "");
		if (rc->outcome == VHOST_INFLIGHT_INVALID)
			vblk_log(dm, "queue %u: in-flight region not trusted (%s), resuming at %u",
				 i, rc->why ? rc->why : "?", rc->last_avail_idx);
		else if (rc->outcome == VHOST_INFLIGHT_RECOVERED && (rc->nresubmit || rc->retired))
			vblk_log(dm,
				 "queue %u: resubmitting %u in-flight requests, %u retired again",
				 i, rc->nresubmit, rc->retired);
	}
}

/*
 * VMIG_BLK_DEBUG=1: one line per vhost-user message with the payload fields
 * that decide the data path (features, ring indexes, log flags), and one per
 * reply, so a migration's message sequence can be read back from the log.
 * Called before the handler: the payload is the peer's, only printed.
 */
static void debug_msg(struct vblk_daemon *dm, const struct vhost_msg *m)
{
	const char *name = vhost_req_name(m->hdr.request);
	char detail[160] = "";

	switch (m->hdr.request) {
	case VHOST_USER_SET_FEATURES:
	case VHOST_USER_SET_PROTOCOL_FEATURES:
	case VHOST_USER_SET_VRING_KICK:
	case VHOST_USER_SET_VRING_CALL:
	case VHOST_USER_SET_VRING_ERR:
		if (m->hdr.size >= sizeof(uint64_t))
			snprintf(detail, sizeof(detail), " u64=0x%llx",
				 (unsigned long long)m->p.u64);
		break;
	case VHOST_USER_SET_VRING_NUM:
	case VHOST_USER_SET_VRING_BASE:
	case VHOST_USER_GET_VRING_BASE:
	case VHOST_USER_SET_VRING_ENABLE:
		snprintf(detail, sizeof(detail), " ring=%u num=%u", m->p.state.index,
			 m->p.state.num);
		break;
	case VHOST_USER_SET_VRING_ADDR:
		snprintf(detail, sizeof(detail), " ring=%u flags=0x%x log_gpa=0x%llx",
			 m->p.addr.index, m->p.addr.flags,
			 (unsigned long long)m->p.addr.log_guest_addr);
		break;
	case VHOST_USER_SET_LOG_BASE:
		snprintf(detail, sizeof(detail), " size=%llu offset=%llu",
			 (unsigned long long)m->p.log.mmap_size,
			 (unsigned long long)m->p.log.mmap_offset);
		break;
	default:
		break;
	}
	vblk_log(dm, "msg %s (%u) flags 0x%x size %u fds %u%s", name ? name : "?", m->hdr.request,
		 m->hdr.flags, m->hdr.size, m->nfds, detail);
}

static void debug_reply(struct vblk_daemon *dm, const struct vhost_msg *r)
{
	const char *name = vhost_req_name(r->hdr.request);

	if (r->hdr.request == VHOST_USER_GET_VRING_BASE)
		vblk_log(dm, "reply %s ring=%u num=%u", name, r->p.state.index, r->p.state.num);
	else if (r->hdr.size == sizeof(uint64_t))
		vblk_log(dm, "reply %s u64=0x%llx", name ? name : "?",
			 (unsigned long long)r->p.u64);
	else
		vblk_log(dm, "reply %s size %u", name ? name : "?", r->hdr.size);
}

/* Post-copy transitions are rare and matter when a migration goes wrong. */
static void log_postcopy(struct vblk_daemon *dm, enum vhost_pc_state was)
{
	static const char *const names[] = {"off", "advised", "listening"};
	const struct vhost_postcopy *pc = &dm->dev.pc;

	if (pc->state == was)
		return;
	vblk_log(dm, "post-copy: %s -> %s (%llu regions registered on the userfaultfd)", names[was],
		 names[pc->state], (unsigned long long)pc->registered);
}

static void handle_vhost(struct vblk_daemon *dm)
{
	struct vhost_msg m, reply;
	uint64_t errors = dm->dev.msg_errors;
	enum vhost_pc_state pc_was = dm->dev.pc.state;
	uint64_t t0;
	int r = vhost_msg_recv(dm->conn_fd, &m);

	if (r) {
		disconnect(dm, r == -EPIPE	 ? "peer closed"
			       : r == -ETIMEDOUT ? "message cut short"
						 : strerror(-r));
		return;
	}
	if (debug_msgs)
		debug_msg(dm, &m);
	t0 = debug_msgs ? vmig__now_ns() : 0;
	r = vhost_dev_handle(&dm->dev, &m, &reply);
	if (debug_msgs) /* what the front-end waits for, often with its BQL held */
		vblk_log(dm, "%s handled in %.3f ms", vhost_req_name(m.hdr.request) ?: "?",
			 (double)(vmig__now_ns() - t0) / 1e6);
	if (debug_msgs && r == 1)
		debug_reply(dm, &reply);
	if (dm->dev.msg_errors != errors)
		vblk_log(dm, "%s", dm->dev.err);
	log_postcopy(dm, pc_was);
	log_recoveries(dm);
	if (r < 0) {
		disconnect(dm, "protocol error");
		return;
	}
	if (r == 1) {
		r = vhost_msg_send(dm->conn_fd, &reply);
		vhost_msg_close_fds(&reply);
		if (r)
			disconnect(dm, r == -ETIMEDOUT ? "replies not read" : "reply failed");
	}
}

/*
 * The control thread reads a message whole once its first byte is there,
 * and writes replies on a blocking socket: a front-end that stops in the
 * middle of a message, or never reads its replies, would hold it (and the
 * RPC socket and SIGTERM with it) forever. QEMU sends each message with
 * one sendmsg and reads each reply at once, so a bound of a few seconds
 * costs it nothing; when it runs out the connection is dropped.
 */
void vblk_conn_setup(int fd)
{
	struct timeval tv = {.tv_sec = VBLK_MSG_TIMEOUT_S};

	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

static void accept_vhost(struct vblk_daemon *dm)
{
	int fd = accept4(dm->listen_fd, NULL, NULL, SOCK_CLOEXEC);
	struct ucred cr = {.pid = 0, .uid = (uid_t)-1};
	socklen_t len = sizeof(cr);

	if (fd < 0)
		return;
	vblk_conn_setup(fd);
	getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len);
	dm->conn_fd = fd;
	dm->connections++;
	vblk_log(dm, "vhost-user connection %llu accepted (pid %d, uid %d)",
		 (unsigned long long)dm->connections, (int)cr.pid, (int)cr.uid);
}

static void run(struct vblk_daemon *dm)
{
	while (!dm->stop) {
		struct pollfd pfd[4 + VBLK_MAX_RPC_CLIENTS];
		int slot[4 + VBLK_MAX_RPC_CLIENTS];
		nfds_t n = 0;

		pfd[n] = (struct pollfd){.fd = dm->signal_fd, .events = POLLIN};
		slot[n++] = -1;
		pfd[n] = (struct pollfd){.fd = dm->conn_fd >= 0 ? dm->conn_fd : dm->listen_fd,
					 .events = POLLIN};
		slot[n++] = -2;
		pfd[n] = (struct pollfd){.fd = dm->rpc_fd, .events = POLLIN};
		slot[n++] = -3;
		if (vblk_incoming_fd(dm) >= 0) {
			pfd[n] = (struct pollfd){.fd = vblk_incoming_fd(dm), .events = POLLIN};
			slot[n++] = -4;
		}
		for (int i = 0; i < VBLK_MAX_RPC_CLIENTS; i++) {
			if (!dm->clients[i])
				continue;
			pfd[n] = (struct pollfd){.fd = dm->clients[i]->fd, .events = POLLIN};
			slot[n++] = i;
		}
		if (poll(pfd, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		for (nfds_t i = 0; i < n && !dm->stop; i++) {
			if (!pfd[i].revents)
				continue;
			if (slot[i] == -1)
				dm->stop = true;
			else if (slot[i] == -2 && dm->conn_fd >= 0)
				handle_vhost(dm);
			else if (slot[i] == -2)
				accept_vhost(dm);
			else if (slot[i] == -3)
				vblk_rpc_accept(dm);
			else if (slot[i] == -4)
				vblk_incoming_event(dm);
			else
				vblk_rpc_client_input(dm, slot[i]);
		}
	}
}

static int setup_signals(struct vblk_daemon *dm)
{
	sigset_t set;

	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	/* Blocked before any queue thread exists, so only signalfd sees them. */
	if (sigprocmask(SIG_BLOCK, &set, NULL) < 0)
		return -errno;
	dm->signal_fd = signalfd(-1, &set, SFD_CLOEXEC);
	return dm->signal_fd < 0 ? -errno : 0;
}

static int start_fresh(struct vblk_daemon *dm)
{
	char err[512];
	int r = vblk_disk_open(dm, -1, -1);

	if (r == -EBUSY && dm->opts.file) {
		fprintf(stderr,
			"vmig-blk: image %s is locked by another process (another vmig-blk, or "
			"QEMU with locking=on, serves it): refusing to serve it too. Only if "
			"every user of the image coordinates its writes (two back-ends on shared "
			"storage during a migration), start both with --no-lock\n",
			dm->opts.file);
		return r;
	}
	if (r && dm->disk_err[0]) {
		fprintf(stderr, "vmig-blk: cannot open disk %s: %s\n",
			dm->opts.file ? dm->opts.file : "(ram)", dm->disk_err);
		return r;
	}
	if (r) {
		fprintf(stderr, "vmig-blk: cannot open disk %s: %s\n",
			dm->opts.file ? dm->opts.file : "(ram)", strerror(-r));
		return r;
	}
	/* A post-copy in progress: an incomplete destination image is served
	 * only by the destination that finishes it, and a source that handed
	 * its disk over never serves its guest again. */
	r = vblk_postcopy_state_check(dm, err, sizeof(err));
	if (r) {
		fprintf(stderr, "vmig-blk: %s\n", err);
		return r;
	}
	r = vblk_rpc_listen(dm, err, sizeof(err));
	if (r) {
		fprintf(stderr, "vmig-blk: cannot listen: %s\n", err);
		return r;
	}
	/* The vhost-user socket last: front ends (QEMU, libvirt, scripts)
	 * wait for its file to appear, and from then on the RPC socket
	 * answers too. It gets the mode the umask gives: QEMU often runs as
	 * a user of its own (docs/security.md). */
	dm->listen_fd = vblk_listen_unix(dm->opts.socket, 0, &dm->sock_id, err, sizeof(err));
	if (dm->listen_fd < 0) {
		fprintf(stderr, "vmig-blk: cannot listen: %s\n", err);
		return dm->listen_fd;
	}
	return 0;
}

static void daemon_init(struct vblk_daemon *dm, char **argv)
{
	ssize_t n;

	dm->argv = argv;
	dm->listen_fd = dm->conn_fd = dm->rpc_fd = dm->signal_fd = -1;
	dm->disk.fd = -1;
	dm->disk.lock_fd = -1;
	dm->disk.read_only = dm->opts.read_only;
	snprintf(dm->rpc_path, sizeof(dm->rpc_path), "%s",
		 dm->opts.rpc ? dm->opts.rpc : dm->opts.socket);
	if (!dm->opts.rpc)
		strncat(dm->rpc_path, ".rpc", sizeof(dm->rpc_path) - strlen(dm->rpc_path) - 1);
	n = readlink("/proc/self/exe", dm->exe, sizeof(dm->exe) - 1);
	dm->exe[n > 0 ? n : 0] = '\0';
	/* Fixed now, for the life of the daemon: an upgrade runs this path and
	 * nothing else (absolute, so that no later chdir changes it; symlinks
	 * are followed at upgrade time, so a link can be pointed at a new
	 * version). */
	if (!dm->opts.upgrade_binary) {
		snprintf(dm->upgrade_binary, sizeof(dm->upgrade_binary), "%s", dm->exe);
	} else if (dm->opts.upgrade_binary[0] == '/') {
		snprintf(dm->upgrade_binary, sizeof(dm->upgrade_binary), "%s",
			 dm->opts.upgrade_binary);
	} else {
		char cwd[2048];

		if (getcwd(cwd, sizeof(cwd)))
			snprintf(dm->upgrade_binary, sizeof(dm->upgrade_binary), "%s/%s", cwd,
				 dm->opts.upgrade_binary);
	}
}

static void shutdown_daemon(struct vblk_daemon *dm)
{
	vblk_mirror_free(dm);
	vhost_dev_reset(&dm->dev); /* the queues stop before the map goes */
	vblk_incoming_free(dm);
	vblk_storage_tls_free(dm);
	vblk_dirty_stop(dm);
	for (unsigned i = 0; i < dm->nqueues; i++)
		vblk_queue_free(&dm->q[i]);
	for (int i = 0; i < VBLK_MAX_RPC_CLIENTS; i++) {
		if (dm->clients[i]) {
			close(dm->clients[i]->fd);
			free(dm->clients[i]);
		}
	}
	if (dm->conn_fd >= 0)
		close(dm->conn_fd);
	if (dm->listen_fd >= 0) {
		close(dm->listen_fd);
		vblk_unlink_socket(dm->opts.socket, &dm->sock_id);
	}
	if (dm->rpc_fd >= 0) {
		close(dm->rpc_fd);
		vblk_unlink_socket(dm->rpc_path, &dm->rpc_id);
	}
	if (dm->disk.ram)
		munmap(dm->disk.ram, dm->disk.size);
	if (dm->disk.fd >= 0)
		close(dm->disk.fd);
	disk_unlock(&dm->disk);
}

int main(int argc, char **argv)
{
	static struct vblk_daemon dm; /* large (RPC buffers, rings): not on the stack */
	int r;

	if (argc > 1 && !strcmp(argv[1], "rpc"))
		return vblk_rpc_cli(argc - 1, argv + 1);
	if (argc > 1 && !strcmp(argv[1], "upgrade"))
		return vblk_upgrade_cli(argc - 1, argv + 1);
	if (parse_args(argc, argv, &dm.opts))
		return 1;
	debug_msgs = getenv("VMIG_BLK_DEBUG") != NULL;
	daemon_init(&dm, argv);
	if (setup_signals(&dm)) {
		fprintf(stderr, "vmig-blk: signals: %s\n", strerror(errno));
		return 1;
	}
	dm.nqueues = dm.opts.queues;
	dm.poll_us = dm.opts.poll_us;
	for (unsigned i = 0; i < dm.nqueues; i++) {
		vblk_queue_init(&dm.q[i], &dm.disk, i);
		vblk_queue_set_poll(&dm.q[i], dm.poll_us);
	}
	/* Credentials first: a bad one fails the start, not a later migration
	 * (and an upgraded process needs them as much as a fresh one). */
	{
		char err[512];

		if (vblk_storage_tls(&dm, dm.opts.tls_creds, dm.opts.tls_hostname,
				     dm.opts.tls_authz, err, sizeof(err))) {
			fprintf(stderr, "vmig-blk: %s\n", err);
			return 1;
		}
	}
	r = vblk_upgrade_resume(&dm);
	if (r < 0) {
		fprintf(stderr, "vmig-blk: cannot resume after upgrade: %s\n",
			dm.disk_err[0] ? dm.disk_err : strerror(-r));
		return 1;
	}
	if (r == 0) {
		vhost_dev_init(&dm.dev, dm.nqueues, vblk_device_features(&dm.disk, dm.nqueues),
			       dm.opts.incoming ? &vblk_incoming_ops : &vblk_dev_ops, dm.q);
		if (start_fresh(&dm)) {
			shutdown_daemon(&dm);
			return 1;
		}
		if (dm.opts.incoming) {
			char err[512];

			if (vblk_incoming_start(&dm, dm.opts.incoming, err, sizeof(err))) {
				fprintf(stderr, "vmig-blk: %s\n", err);
				shutdown_daemon(&dm);
				return 1;
			}
		}
		vblk_log(&dm, "listening on %s", dm.opts.socket);
	}
	run(&dm);
	vblk_log(&dm, "shutting down");
	shutdown_daemon(&dm);
	return 0;
}
