// SPDX-License-Identifier: MIT
/*
 * vblk-load: a minimal vhost-user-blk front-end that generates load, so that
 * two back-ends (vmig-blk, qemu-storage-daemon) can be measured with the very
 * same driver, queue depth and request stream, without a guest in between.
 *
 * It does what QEMU does to bring up one queue (SET_OWNER, feature and
 * protocol-feature negotiation, GET_CONFIG for the capacity, SET_MEM_TABLE
 * with a memfd it shares, SET_VRING_NUM/BASE/ADDR/CALL/KICK, SET_VRING_ENABLE)
 * and then keeps QD requests of 4 KiB in flight on a split virtqueue: random
 * reads and writes in a chosen mix, for a chosen time. It reports IOPS, the
 * p50/p99 request latency and the CPU time per I/O of the back-end process
 * (from /proc/PID/stat) and of itself, as one "key=value ..." line. With
 * --hold S it then keeps the device connected and idle for S seconds and
 * prints the back-end's CPU use over that time ("idle_backend_cpu_pct=...",
 * after a line "holding" that marks the start), which shows whether a
 * polling back-end goes back to sleep.
 *
 * Threat model: the back-end is a program under test, so its replies and its
 * used-ring entries are checked (reply id and size, descriptor ids that are
 * in range and actually outstanding) and a bad one ends the run with an
 * error rather than corrupting the measurement. It is a benchmark tool, not
 * a product: one queue, no reconnect, no indirect descriptors or event idx.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stddef.h>
#include <linux/vhost_types.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ring.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* vhost-user requests (the spec's numbering; no uapi header has them). */
enum {
	VU_GET_FEATURES = 1,
	VU_SET_FEATURES = 2,
	VU_SET_OWNER = 3,
	VU_SET_MEM_TABLE = 5,
	VU_SET_VRING_NUM = 8,
	VU_SET_VRING_ADDR = 9,
	VU_SET_VRING_BASE = 10,
	VU_SET_VRING_KICK = 12,
	VU_SET_VRING_CALL = 13,
	VU_GET_PROTOCOL_FEATURES = 15,
	VU_SET_PROTOCOL_FEATURES = 16,
	VU_SET_VRING_ENABLE = 18,
	VU_GET_CONFIG = 24,
};
#define VU_VERSION 0x1u
#define VU_REPLY 0x4u
#define VU_F_PROTOCOL_FEATURES 30
#define VU_PF_CONFIG 9

#define BLOCK 4096u
#define LAT_BUCKET_NS 100u     /* histogram resolution */
#define LAT_BUCKETS (1000000u) /* 100 ns x 1M = 100 ms, last bucket = more */

struct vu_msg {
	uint32_t request;
	uint32_t flags;
	uint32_t size;
	union {
		uint64_t u64;
		struct vhost_vring_state state;
		struct vhost_vring_addr addr;
		struct {
			uint32_t nregions;
			uint32_t padding;
			/* flags_padding carries vhost-user's mmap_offset */
			struct vhost_memory_region regions[1];
		} mem;
		struct {
			uint32_t offset, size, flags;
			uint8_t data[256];
		} config;
	} u;
} __attribute__((packed));
#define VU_HDR_SIZE 12u

struct opts {
	const char *sock;
	unsigned qd, read_pct, seconds, warmup_s, hold_s;
	uint64_t range_bytes;
	int pid;
	int poll_mode;
};

struct slot {
	uint64_t start_ns;
	int busy;
};

struct load {
	int sock, kick, call, memfd;
	uint8_t *mem;
	size_t mem_size;
	struct vring vr;
	unsigned num; /* ring size */
	uint16_t avail_idx, used_seen;
	uint8_t *hdrs, *data, *status; /* request areas inside mem */
	uint64_t nsectors_4k;	       /* capacity in 4 KiB blocks */
	struct slot *slots;
	uint32_t *hist;
	uint64_t rng;
	uint64_t done, errors;
	int measuring;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t rnd(struct load *l)
{
	l->rng ^= l->rng << 13;
	l->rng ^= l->rng >> 7;
	l->rng ^= l->rng << 17;
	return l->rng;
}

static int vu_send(struct load *l, struct vu_msg *m, const int *fds, int nfds)
{
	char ctl[CMSG_SPACE(sizeof(int) * 8)];
	struct iovec iov = {m, VU_HDR_SIZE + m->size};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
	ssize_t n;

	m->flags = VU_VERSION;
	if (nfds > 0) {
		struct cmsghdr *c;

		memset(ctl, 0, sizeof(ctl));
		mh.msg_control = ctl;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
		c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
	}
	do
		n = sendmsg(l->sock, &mh, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	return n == (ssize_t)iov.iov_len ? 0 : -EIO;
}

static int read_full(int fd, void *buf, size_t len)
{
	uint8_t *p = buf;

	while (len) {
		ssize_t n = read(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EPIPE;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Receives the reply to `request`; its payload must be exactly `size` bytes
 * (for GET_CONFIG: at most `size`). */
static int vu_recv(struct load *l, uint32_t request, struct vu_msg *m, uint32_t size)
{
	int rc = read_full(l->sock, m, VU_HDR_SIZE);

	if (rc)
		return rc;
	if (getenv("VBLK_LOAD_DEBUG"))
		fprintf(stderr, "vblk-load: reply req=%u flags=%#x size=%u (want %u)\n", m->request,
			m->flags, m->size, size);
	if (m->request != request || !(m->flags & VU_REPLY) || m->size > sizeof(m->u))
		return -EPROTO;
	if (request == VU_GET_CONFIG ? m->size > size : m->size != size)
		return -EPROTO;
	return read_full(l->sock, &m->u, m->size);
}

static int vu_get_u64(struct load *l, uint32_t request, uint64_t *out)
{
	struct vu_msg m = {.request = request};
	int rc = vu_send(l, &m, NULL, 0);

	if (rc == 0)
		rc = vu_recv(l, request, &m, sizeof(uint64_t));
	if (rc == 0)
		*out = m.u.u64;
	return rc;
}

static int vu_set(struct load *l, uint32_t request, const void *payload, uint32_t size, int fd)
{
	struct vu_msg m = {.request = request, .size = size};

	memcpy(&m.u, payload, size);
	return vu_send(l, &m, &fd, fd >= 0 ? 1 : 0);
}

static int vu_set_state(struct load *l, uint32_t request, unsigned index, unsigned num)
{
	struct vhost_vring_state s = {.index = index, .num = num};

	return vu_set(l, request, &s, sizeof(s), -1);
}

/* Capacity from the virtio-blk config space, in 4 KiB blocks. */
static int vu_get_capacity(struct load *l)
{
	struct vu_msg m = {.request = VU_GET_CONFIG};
	struct virtio_blk_config cfg;
	/* Ask for the config space up to the discard/write-zeroes fields, the
	 * size QEMU 7.2 asks for: back-ends refuse a window larger than their
	 * own structure, and newer headers have grown it. */
	uint32_t want = (uint32_t)offsetof(struct virtio_blk_config, max_secure_erase_sectors);
	int rc;

	m.size = 12 + want;
	m.u.config.size = want;
	rc = vu_send(l, &m, NULL, 0);
	if (rc == 0)
		rc = vu_recv(l, VU_GET_CONFIG, &m, 12 + want);
	if (rc)
		return rc;
	if (m.size < 12 + 8 || m.u.config.size < 8)
		return -EPROTO;
	memcpy(&cfg, m.u.config.data, 8);
	l->nsectors_4k = cfg.capacity / (BLOCK / 512);
	return l->nsectors_4k ? 0 : -ENOSPC;
}

static int connect_socket(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd;

	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		int e = -errno;

		close(fd);
		return e;
	}
	return fd;
}

/* Shared memory: the ring first, then per-slot header, data, status. */
static int setup_memory(struct load *l, unsigned qd)
{
	size_t ring = vring_size(l->num, 4096);

	ring = (ring + 4095) & ~(size_t)4095;
	l->mem_size = ring + (size_t)qd * BLOCK + (((size_t)qd * 32 + 4095) & ~(size_t)4095);
	l->memfd = memfd_create("vblk-load", MFD_CLOEXEC);
	if (l->memfd < 0)
		return -errno;
	if (ftruncate(l->memfd, (off_t)l->mem_size))
		return -errno;
	l->mem = mmap(NULL, l->mem_size, PROT_READ | PROT_WRITE, MAP_SHARED, l->memfd, 0);
	if (l->mem == MAP_FAILED) {
		l->mem = NULL;
		return -errno;
	}
	vring_init(&l->vr, l->num, l->mem, 4096);
	l->data = l->mem + ring;
	l->hdrs = l->data + (size_t)qd * BLOCK;
	l->status = l->hdrs + (size_t)qd * 16;
	return 0;
}

static uint64_t gpa(const struct load *l, const void *p)
{
	return (uint64_t)((const uint8_t *)p - l->mem); /* guest-physical = offset */
}

static int setup_device(struct load *l)
{
	uint64_t features, pf;
	struct vu_msg m = {0};
	struct vhost_vring_addr a = {0};
	int rc;

	if ((rc = vu_set(l, VU_SET_OWNER, NULL, 0, -1)) ||
	    (rc = vu_get_u64(l, VU_GET_FEATURES, &features)))
		return rc;
	if (!(features & (1ull << VU_F_PROTOCOL_FEATURES)))
		return -EPROTONOSUPPORT;
	if ((rc = vu_get_u64(l, VU_GET_PROTOCOL_FEATURES, &pf)))
		return rc;
	if (!(pf & (1ull << VU_PF_CONFIG)))
		return -EPROTONOSUPPORT;
	pf = 1ull << VU_PF_CONFIG;
	if ((rc = vu_set(l, VU_SET_PROTOCOL_FEATURES, &pf, 8, -1)) || (rc = vu_get_capacity(l)))
		return rc;
	features &= (1ull << VIRTIO_F_VERSION_1) | (1ull << VU_F_PROTOCOL_FEATURES);
	if ((rc = vu_set(l, VU_SET_FEATURES, &features, 8, -1)))
		return rc;

	m.request = VU_SET_MEM_TABLE;
	m.size = 8 + sizeof(struct vhost_memory_region);
	m.u.mem.nregions = 1;
	m.u.mem.regions[0].guest_phys_addr = 0;
	m.u.mem.regions[0].memory_size = l->mem_size;
	m.u.mem.regions[0].userspace_addr = (uint64_t)(uintptr_t)l->mem;
	m.u.mem.regions[0].flags_padding = 0; /* mmap_offset */
	if ((rc = vu_send(l, &m, &l->memfd, 1)))
		return rc;

	a.index = 0;
	a.desc_user_addr = (uint64_t)(uintptr_t)l->vr.desc;
	a.avail_user_addr = (uint64_t)(uintptr_t)l->vr.avail;
	a.used_user_addr = (uint64_t)(uintptr_t)l->vr.used;
	if ((rc = vu_set_state(l, VU_SET_VRING_NUM, 0, l->num)) ||
	    (rc = vu_set_state(l, VU_SET_VRING_BASE, 0, 0)) ||
	    (rc = vu_set(l, VU_SET_VRING_ADDR, &a, sizeof(a), -1)))
		return rc;
	features = 0; /* vring index 0, with an fd */
	if ((rc = vu_set(l, VU_SET_VRING_CALL, &features, 8, l->call)) ||
	    (rc = vu_set(l, VU_SET_VRING_KICK, &features, 8, l->kick)) ||
	    (rc = vu_set_state(l, VU_SET_VRING_ENABLE, 0, 1)))
		return rc;
	/* A request with a reply: everything before it has been processed. */
	return vu_get_u64(l, VU_GET_FEATURES, &features);
}

/* Puts slot s (descriptors 3s..3s+2) on the avail ring; not yet published. */
static void submit(struct load *l, const struct opts *o, unsigned s)
{
	struct virtio_blk_outhdr *h = (void *)(l->hdrs + (size_t)s * 16);
	struct vring_desc *d = &l->vr.desc[3 * s];
	uint64_t range = o->range_bytes / BLOCK;
	int is_read = rnd(l) % 100 < o->read_pct;

	if (range == 0 || range > l->nsectors_4k)
		range = l->nsectors_4k;
	h->type = is_read ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
	h->ioprio = 0;
	h->sector = (rnd(l) % range) * (BLOCK / 512);
	l->status[s] = 0xff;
	d[0] = (struct vring_desc){gpa(l, h), 16, VRING_DESC_F_NEXT, (uint16_t)(3 * s + 1)};
	d[1] =
	    (struct vring_desc){gpa(l, l->data + (size_t)s * BLOCK), BLOCK,
				(uint16_t)(VRING_DESC_F_NEXT | (is_read ? VRING_DESC_F_WRITE : 0)),
				(uint16_t)(3 * s + 2)};
	d[2] = (struct vring_desc){gpa(l, l->status + s), 1, VRING_DESC_F_WRITE, 0};
	l->vr.avail->ring[l->avail_idx % l->num] = (uint16_t)(3 * s);
	l->avail_idx++;
	l->slots[s].busy = 1;
	l->slots[s].start_ns = now_ns();
}

static int publish(struct load *l)
{
	uint64_t one = 1;

	__atomic_store_n(&l->vr.avail->idx, l->avail_idx, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (__atomic_load_n(&l->vr.used->flags, __ATOMIC_ACQUIRE) & VRING_USED_F_NO_NOTIFY)
		return 0;
	return write(l->kick, &one, 8) == 8 ? 0 : -errno;
}

/* Reaps completions; resubmits while `resubmit`. Returns the number reaped
 * or -EPROTO when the back-end returns something that was never submitted. */
static int reap(struct load *l, const struct opts *o, int resubmit)
{
	uint16_t used = __atomic_load_n(&l->vr.used->idx, __ATOMIC_ACQUIRE);
	int n = 0;

	while (l->used_seen != used) {
		struct vring_used_elem *e = &l->vr.used->ring[l->used_seen % l->num];
		uint32_t id = e->id, s = id / 3;
		uint64_t lat;

		if (id % 3 || s >= o->qd || !l->slots[s].busy)
			return -EPROTO;
		l->used_seen++;
		l->slots[s].busy = 0;
		lat = (now_ns() - l->slots[s].start_ns) / LAT_BUCKET_NS;
		if (l->status[s] != VIRTIO_BLK_S_OK)
			l->errors++;
		if (l->measuring) {
			l->hist[lat < LAT_BUCKETS ? lat : LAT_BUCKETS - 1]++;
			l->done++;
		}
		if (resubmit)
			submit(l, o, s);
		n++;
	}
	return n;
}

/* Waits for the back-end's call eventfd (or spins with --poll). */
static int wait_call(struct load *l, const struct opts *o)
{
	struct pollfd p = {.fd = l->call, .events = POLLIN};
	uint64_t v;

	if (o->poll_mode)
		return 0;
	if (poll(&p, 1, 1000) < 0)
		return errno == EINTR ? 0 : -errno;
	if (p.revents & POLLIN)
		return read(l->call, &v, 8) == 8 ? 0 : -errno;
	return 0;
}

static double pct(const uint32_t *hist, uint64_t total, double q)
{
	uint64_t want = (uint64_t)((double)total * q), acc = 0;

	for (unsigned i = 0; i < LAT_BUCKETS; i++) {
		acc += hist[i];
		if (acc > want)
			return (i + 0.5) * LAT_BUCKET_NS / 1000.0;
	}
	return 0;
}

/* utime + stime of a process, in ns (all of its threads). */
static int proc_cpu_ns(int pid, uint64_t *out)
{
	char path[64], buf[1024], *p;
	unsigned long long ut, st;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -EIO;
	buf[n] = '\0';
	p = strrchr(buf, ')'); /* the command name may contain spaces */
	if (!p ||
	    sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
		return -EIO;
	*out = (uint64_t)(ut + st) * (1000000000ull / (uint64_t)sysconf(_SC_CLK_TCK));
	return 0;
}

static uint64_t self_cpu_ns(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000ull +
	       (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000ull;
}

static int run(struct load *l, const struct opts *o)
{
	uint64_t t0 = now_ns(), t_meas = t0 + (uint64_t)o->warmup_s * 1000000000ull;
	uint64_t t_end = t_meas + (uint64_t)o->seconds * 1000000000ull;
	uint64_t be0 = 0, be1 = 0, me0 = 0, t1 = 0, drain_end;
	int rc;

	for (unsigned s = 0; s < o->qd; s++)
		submit(l, o, s);
	if ((rc = publish(l)))
		return rc;
	for (;;) {
		uint64_t t = now_ns();

		if (!l->measuring && t >= t_meas) {
			l->measuring = 1;
			me0 = self_cpu_ns();
			if (o->pid && proc_cpu_ns(o->pid, &be0))
				return -ESRCH;
			t_meas = t;
		}
		if (t >= t_end)
			break;
		int reaped = reap(l, o, 1);

		if (reaped < 0)
			return reaped;
		rc = reaped ? publish(l) : wait_call(l, o);
		if (rc)
			return rc;
	}
	t1 = now_ns();
	if (o->pid && proc_cpu_ns(o->pid, &be1))
		return -ESRCH;
	me0 = self_cpu_ns() - me0;
	l->measuring = 0;
	drain_end = t1 + 5000000000ull; /* in-flight requests get 5 s to finish */
	for (unsigned left = o->qd; left && now_ns() < drain_end;) {
		if ((rc = reap(l, o, 0)) < 0)
			return rc;
		left -= (unsigned)rc;
		if (rc == 0)
			wait_call(l, o);
	}
	printf(
	    "iops=%.0f p50_us=%.1f p99_us=%.1f ios=%" PRIu64 " errors=%" PRIu64
	    " backend_cpu_us_per_io=%.3f load_cpu_us_per_io=%.3f qd=%u read_pct=%u seconds=%.2f\n",
	    (double)l->done * 1e9 / (double)(t1 - t_meas), pct(l->hist, l->done, 0.50),
	    pct(l->hist, l->done, 0.99), l->done, l->errors,
	    o->pid && l->done ? (double)(be1 - be0) / 1000.0 / (double)l->done : -1.0,
	    l->done ? (double)me0 / 1000.0 / (double)l->done : -1.0, o->qd, o->read_pct,
	    (double)(t1 - t_meas) / 1e9);
	return l->errors ? -EIO : 0;
}

/* Keep the queue connected and idle; report the back-end's CPU meanwhile. */
static int hold(const struct opts *o)
{
	uint64_t c0, c1, t0, t1;

	printf("holding\n");
	fflush(stdout);
	t0 = now_ns();
	if (proc_cpu_ns(o->pid, &c0))
		return -ESRCH;
	sleep(o->hold_s);
	t1 = now_ns();
	if (proc_cpu_ns(o->pid, &c1))
		return -ESRCH;
	printf("idle_backend_cpu_pct=%.2f idle_seconds=%.2f\n",
	       (double)(c1 - c0) * 100.0 / (double)(t1 - t0), (double)(t1 - t0) / 1e9);
	return 0;
}

static int parse_opts(int argc, char **argv, struct opts *o)
{
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(a, "--poll")) {
			o->poll_mode = 1;
			continue;
		}
		if (!v)
			return -1;
		i++;
		if (!strcmp(a, "--socket"))
			o->sock = v;
		else if (!strcmp(a, "--qd"))
			o->qd = (unsigned)strtoul(v, NULL, 0);
		else if (!strcmp(a, "--read-pct"))
			o->read_pct = (unsigned)strtoul(v, NULL, 0);
		else if (!strcmp(a, "--seconds"))
			o->seconds = (unsigned)strtoul(v, NULL, 0);
		else if (!strcmp(a, "--warmup"))
			o->warmup_s = (unsigned)strtoul(v, NULL, 0);
		else if (!strcmp(a, "--range-mb"))
			o->range_bytes = strtoull(v, NULL, 0) << 20;
		else if (!strcmp(a, "--pid"))
			o->pid = atoi(v);
		else if (!strcmp(a, "--hold"))
			o->hold_s = (unsigned)strtoul(v, NULL, 0);
		else
			return -1;
	}
	if (!o->sock || o->qd == 0 || o->qd > 1024 || o->read_pct > 100 || o->seconds == 0 ||
	    (o->hold_s && !o->pid) || o->hold_s > 600)
		return -1;
	return 0;
}

int main(int argc, char **argv)
{
	struct opts o = {.qd = 32, .read_pct = 50, .seconds = 5, .warmup_s = 1};
	struct load l = {
	    .sock = -1, .kick = -1, .call = -1, .memfd = -1, .rng = 0x2545f4914f6cdd1dull};
	int rc;

	if (parse_opts(argc, argv, &o)) {
		fprintf(
		    stderr,
		    "usage: vblk-load --socket PATH [--qd N] [--read-pct P] [--seconds S]\n"
		    "                 [--warmup S] [--range-mb MB] [--pid BACKEND_PID] [--poll]\n"
		    "                 [--hold S (needs --pid)]\n");
		return 2;
	}
	for (l.num = 64; l.num < 3 * o.qd; l.num *= 2)
		;
	l.slots = calloc(o.qd, sizeof(*l.slots));
	l.hist = calloc(LAT_BUCKETS, sizeof(*l.hist));
	l.kick = eventfd(0, EFD_CLOEXEC);
	l.call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (!l.slots || !l.hist || l.kick < 0 || l.call < 0) {
		rc = -ENOMEM;
		goto out;
	}
	if ((rc = setup_memory(&l, o.qd)))
		goto out;
	l.sock = connect_socket(o.sock);
	if (l.sock < 0) {
		rc = l.sock;
		goto out;
	}
	if ((rc = setup_device(&l)))
		goto out;
	rc = run(&l, &o);
	fflush(stdout);
	if (rc == 0 && o.hold_s)
		rc = hold(&o);
out:
	if (rc)
		fprintf(stderr, "vblk-load: %s\n", strerror(-rc));
	if (l.sock >= 0)
		close(l.sock);
	if (l.mem)
		munmap(l.mem, l.mem_size);
	if (l.memfd >= 0)
		close(l.memfd);
	if (l.kick >= 0)
		close(l.kick);
	if (l.call >= 0)
		close(l.call);
	free(l.slots);
	free(l.hist);
	return rc ? 1 : 0;
}
