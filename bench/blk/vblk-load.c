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
 * reads and writes in a chosen mix, for a chosen time. With --queues N it
 * negotiates VIRTIO_BLK_F_MQ, brings up N queues and drives each from a
 * thread of its own, QD requests in flight on each (so N x QD in all), as a
 * guest with one vCPU per queue would. It reports IOPS (all queues), the
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
 * a product: no reconnect, no indirect descriptors or event idx.
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
#include <pthread.h>
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
#define MAX_QUEUES 16u

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
	unsigned qd, read_pct, seconds, warmup_s, hold_s, queues;
	uint64_t range_bytes;
	int pid;
	int poll_mode;
};

struct slot {
	uint64_t start_ns;
	int busy;
};

struct load;

/* One queue: owned by its thread once the run starts. */
struct lq {
	unsigned idx;
	int kick, call;
	struct vring vr;
	uint16_t avail_idx, used_seen;
	uint8_t *ring, *hdrs, *data, *status; /* this queue's areas inside mem */
	struct slot *slots;
	uint32_t *hist;
	uint64_t rng;
	uint64_t done, errors;
	int measuring, rc;
	const struct opts *o;
	const struct load *l;
	uint64_t t_meas, t_end; /* set by the main thread before the start */
	pthread_t thread;
};

struct load {
	int sock, memfd;
	uint8_t *mem;
	size_t mem_size;
	unsigned num;	      /* ring size, the same for every queue */
	uint64_t nsectors_4k; /* capacity in 4 KiB blocks */
	unsigned nq;
	struct lq q[MAX_QUEUES];
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t rnd(struct lq *l)
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

/* Capacity from the virtio-blk config space, in 4 KiB blocks; with more than
 * one queue, the device must offer at least that many. */
static int vu_get_config(struct load *l, int mq)
{
	struct vu_msg m = {.request = VU_GET_CONFIG};
	struct virtio_blk_config cfg;
	/* Ask for the config space up to the discard/write-zeroes fields, the
	 * size QEMU 7.2 asks for: back-ends refuse a window larger than their
	 * own structure, and newer headers have grown it. */
	uint32_t want = (uint32_t)offsetof(struct virtio_blk_config, max_secure_erase_sectors);
	uint32_t nq_end = (uint32_t)offsetof(struct virtio_blk_config, num_queues) + 2;
	int rc;

	m.size = 12 + want;
	m.u.config.size = want;
	rc = vu_send(l, &m, NULL, 0);
	if (rc == 0)
		rc = vu_recv(l, VU_GET_CONFIG, &m, 12 + want);
	if (rc)
		return rc;
	if (m.size < 12 + 8 || m.u.config.size < 8 || m.u.config.size > want)
		return -EPROTO;
	memset(&cfg, 0, sizeof(cfg));
	memcpy(&cfg, m.u.config.data, m.u.config.size);
	l->nsectors_4k = cfg.capacity / (BLOCK / 512);
	if (mq && (m.u.config.size < nq_end || cfg.num_queues < l->nq))
		return -ENXIO; /* fewer queues than asked for */
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

/* Shared memory, one memfd: per queue, its ring first, then per-slot data,
 * header and status. */
static int setup_memory(struct load *l, unsigned qd)
{
	size_t ring = vring_size(l->num, 4096), per_q;

	ring = (ring + 4095) & ~(size_t)4095;
	per_q = ring + (size_t)qd * BLOCK + (((size_t)qd * 32 + 4095) & ~(size_t)4095);
	l->mem_size = per_q * l->nq;
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
	for (unsigned i = 0; i < l->nq; i++) {
		struct lq *q = &l->q[i];

		q->ring = l->mem + per_q * i;
		vring_init(&q->vr, l->num, q->ring, 4096);
		q->data = q->ring + ring;
		q->hdrs = q->data + (size_t)qd * BLOCK;
		q->status = q->hdrs + (size_t)qd * 16;
	}
	return 0;
}

static uint64_t gpa(const struct load *l, const void *p)
{
	return (uint64_t)((const uint8_t *)p - l->mem); /* guest-physical = offset */
}

static int setup_queue(struct load *l, struct lq *q)
{
	struct vhost_vring_addr a = {0};
	uint64_t index = q->idx; /* vring index, with an fd */
	int rc;

	a.index = q->idx;
	a.desc_user_addr = (uint64_t)(uintptr_t)q->vr.desc;
	a.avail_user_addr = (uint64_t)(uintptr_t)q->vr.avail;
	a.used_user_addr = (uint64_t)(uintptr_t)q->vr.used;
	if ((rc = vu_set_state(l, VU_SET_VRING_NUM, q->idx, l->num)) ||
	    (rc = vu_set_state(l, VU_SET_VRING_BASE, q->idx, 0)) ||
	    (rc = vu_set(l, VU_SET_VRING_ADDR, &a, sizeof(a), -1)) ||
	    (rc = vu_set(l, VU_SET_VRING_CALL, &index, 8, q->call)) ||
	    (rc = vu_set(l, VU_SET_VRING_KICK, &index, 8, q->kick)) ||
	    (rc = vu_set_state(l, VU_SET_VRING_ENABLE, q->idx, 1)))
		return rc;
	return 0;
}

static int setup_device(struct load *l)
{
	uint64_t features, pf, want;
	struct vu_msg m = {0};
	int rc, mq = l->nq > 1;

	if ((rc = vu_set(l, VU_SET_OWNER, NULL, 0, -1)) ||
	    (rc = vu_get_u64(l, VU_GET_FEATURES, &features)))
		return rc;
	if (!(features & (1ull << VU_F_PROTOCOL_FEATURES)))
		return -EPROTONOSUPPORT;
	if (mq && !(features & (1ull << VIRTIO_BLK_F_MQ)))
		return -ENXIO;
	if ((rc = vu_get_u64(l, VU_GET_PROTOCOL_FEATURES, &pf)))
		return rc;
	if (!(pf & (1ull << VU_PF_CONFIG)))
		return -EPROTONOSUPPORT;
	pf = 1ull << VU_PF_CONFIG;
	if ((rc = vu_set(l, VU_SET_PROTOCOL_FEATURES, &pf, 8, -1)) || (rc = vu_get_config(l, mq)))
		return rc;
	want = (1ull << VIRTIO_F_VERSION_1) | (1ull << VU_F_PROTOCOL_FEATURES);
	if (mq)
		want |= 1ull << VIRTIO_BLK_F_MQ;
	features &= want;
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
	for (unsigned i = 0; i < l->nq; i++)
		if ((rc = setup_queue(l, &l->q[i])))
			return rc;
	/* A request with a reply: everything before it has been processed. */
	return vu_get_u64(l, VU_GET_FEATURES, &features);
}

/* Puts slot s (descriptors 3s..3s+2) on the avail ring; not yet published. */
static void submit(struct lq *q, unsigned s)
{
	const struct opts *o = q->o;
	struct virtio_blk_outhdr *h = (void *)(q->hdrs + (size_t)s * 16);
	struct vring_desc *d = &q->vr.desc[3 * s];
	uint64_t range = o->range_bytes / BLOCK;
	int is_read = rnd(q) % 100 < o->read_pct;

	if (range == 0 || range > q->l->nsectors_4k)
		range = q->l->nsectors_4k;
	h->type = is_read ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
	h->ioprio = 0;
	h->sector = (rnd(q) % range) * (BLOCK / 512);
	q->status[s] = 0xff;
	d[0] = (struct vring_desc){gpa(q->l, h), 16, VRING_DESC_F_NEXT, (uint16_t)(3 * s + 1)};
	d[1] =
	    (struct vring_desc){gpa(q->l, q->data + (size_t)s * BLOCK), BLOCK,
				(uint16_t)(VRING_DESC_F_NEXT | (is_read ? VRING_DESC_F_WRITE : 0)),
				(uint16_t)(3 * s + 2)};
	d[2] = (struct vring_desc){gpa(q->l, q->status + s), 1, VRING_DESC_F_WRITE, 0};
	q->vr.avail->ring[q->avail_idx % q->l->num] = (uint16_t)(3 * s);
	q->avail_idx++;
	q->slots[s].busy = 1;
	q->slots[s].start_ns = now_ns();
}

static int publish(struct lq *q)
{
	uint64_t one = 1;

	__atomic_store_n(&q->vr.avail->idx, q->avail_idx, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (__atomic_load_n(&q->vr.used->flags, __ATOMIC_ACQUIRE) & VRING_USED_F_NO_NOTIFY)
		return 0;
	return write(q->kick, &one, 8) == 8 ? 0 : -errno;
}

/* Reaps completions; resubmits while `resubmit`. Returns the number reaped
 * or -EPROTO when the back-end returns something that was never submitted. */
static int reap(struct lq *q, int resubmit)
{
	uint16_t used = __atomic_load_n(&q->vr.used->idx, __ATOMIC_ACQUIRE);
	int n = 0;

	while (q->used_seen != used) {
		struct vring_used_elem *e = &q->vr.used->ring[q->used_seen % q->l->num];
		uint32_t id = e->id, s = id / 3;
		uint64_t lat;

		if (id % 3 || s >= q->o->qd || !q->slots[s].busy)
			return -EPROTO;
		q->used_seen++;
		q->slots[s].busy = 0;
		lat = (now_ns() - q->slots[s].start_ns) / LAT_BUCKET_NS;
		if (q->status[s] != VIRTIO_BLK_S_OK)
			q->errors++;
		if (q->measuring) {
			q->hist[lat < LAT_BUCKETS ? lat : LAT_BUCKETS - 1]++;
			q->done++;
		}
		if (resubmit)
			submit(q, s);
		n++;
	}
	return n;
}

/* Waits for the back-end's call eventfd (or spins with --poll). */
static int wait_call(struct lq *q)
{
	struct pollfd p = {.fd = q->call, .events = POLLIN};
	uint64_t v;

	if (q->o->poll_mode)
		return 0;
	if (poll(&p, 1, 1000) < 0)
		return errno == EINTR ? 0 : -errno;
	if (p.revents & POLLIN)
		return read(q->call, &v, 8) == 8 ? 0 : -errno;
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

/* One queue's thread: QD requests in flight from start to t_end, counted
 * from t_meas on, then a bounded drain (5 s). Result in q->rc. */
static void *queue_run(void *arg)
{
	struct lq *q = arg;
	uint64_t drain_end;
	int rc;

	for (unsigned s = 0; s < q->o->qd; s++)
		submit(q, s);
	if ((rc = publish(q)))
		goto out;
	for (;;) {
		uint64_t t = now_ns();

		if (t >= q->t_meas)
			q->measuring = t < q->t_end;
		if (t >= q->t_end)
			break;
		int reaped = reap(q, 1);

		if (reaped < 0) {
			rc = reaped;
			goto out;
		}
		rc = reaped ? publish(q) : wait_call(q);
		if (rc)
			goto out;
	}
	q->measuring = 0;
	drain_end = now_ns() + 5000000000ull; /* in-flight requests get 5 s to finish */
	for (unsigned left = q->o->qd; left && now_ns() < drain_end;) {
		if ((rc = reap(q, 0)) < 0)
			goto out;
		left -= (unsigned)rc;
		if (rc == 0)
			wait_call(q);
	}
	rc = 0;
out:
	q->rc = rc;
	return NULL;
}

static void sleep_until(uint64_t t_ns)
{
	struct timespec ts = {(time_t)(t_ns / 1000000000ull), (long)(t_ns % 1000000000ull)};

	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

/* Starts every queue's thread; the main thread samples CPU times at the
 * start and at the end of the measured window, then merges the results. */
static int run(struct load *l, const struct opts *o)
{
	uint64_t t0 = now_ns(), t_meas = t0 + (uint64_t)o->warmup_s * 1000000000ull;
	uint64_t t_end = t_meas + (uint64_t)o->seconds * 1000000000ull;
	uint64_t be0 = 0, be1 = 0, me0 = 0, me1 = 0, done = 0, errors = 0;
	unsigned started = 0;
	int rc = 0, be_rc = 0;

	for (unsigned i = 0; i < l->nq; i++) {
		l->q[i].t_meas = t_meas;
		l->q[i].t_end = t_end;
		if ((rc = -pthread_create(&l->q[i].thread, NULL, queue_run, &l->q[i])))
			break;
		started++;
	}
	if (rc == 0) {
		sleep_until(t_meas);
		me0 = self_cpu_ns();
		if (o->pid)
			be_rc = proc_cpu_ns(o->pid, &be0);
		sleep_until(t_end);
		me1 = self_cpu_ns();
		if (o->pid && !be_rc)
			be_rc = proc_cpu_ns(o->pid, &be1);
	}
	for (unsigned i = 0; i < started; i++) {
		pthread_join(l->q[i].thread, NULL);
		if (!rc)
			rc = l->q[i].rc;
	}
	if (rc)
		return rc;
	if (be_rc)
		return -ESRCH;
	for (unsigned i = 0; i < l->nq; i++) {
		done += l->q[i].done;
		errors += l->q[i].errors;
		if (i)
			for (unsigned b = 0; b < LAT_BUCKETS; b++)
				l->q[0].hist[b] += l->q[i].hist[b];
	}
	printf("iops=%.0f p50_us=%.1f p99_us=%.1f ios=%" PRIu64 " errors=%" PRIu64
	       " backend_cpu_us_per_io=%.3f load_cpu_us_per_io=%.3f qd=%u queues=%u read_pct=%u"
	       " seconds=%.2f",
	       (double)done * 1e9 / (double)(t_end - t_meas), pct(l->q[0].hist, done, 0.50),
	       pct(l->q[0].hist, done, 0.99), done, errors,
	       o->pid && done ? (double)(be1 - be0) / 1000.0 / (double)done : -1.0,
	       done ? (double)(me1 - me0) / 1000.0 / (double)done : -1.0, o->qd, l->nq, o->read_pct,
	       (double)(t_end - t_meas) / 1e9);
	for (unsigned i = 0; i < l->nq && l->nq > 1; i++)
		printf(" q%u_ios=%" PRIu64, i, l->q[i].done);
	printf("\n");
	return errors ? -EIO : 0;
}

/* Keep the queues connected and idle; report the back-end's CPU meanwhile. */
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
		else if (!strcmp(a, "--queues"))
			o->queues = (unsigned)strtoul(v, NULL, 0);
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
	    o->seconds > 3600 || o->warmup_s > 60 || o->queues == 0 || o->queues > MAX_QUEUES ||
	    (o->hold_s && !o->pid) || o->hold_s > 600)
		return -1;
	return 0;
}

static void cleanup(struct load *l)
{
	if (l->sock >= 0)
		close(l->sock);
	if (l->mem)
		munmap(l->mem, l->mem_size);
	if (l->memfd >= 0)
		close(l->memfd);
	for (unsigned i = 0; i < l->nq; i++) {
		if (l->q[i].kick >= 0)
			close(l->q[i].kick);
		if (l->q[i].call >= 0)
			close(l->q[i].call);
		free(l->q[i].slots);
		free(l->q[i].hist);
	}
}

int main(int argc, char **argv)
{
	struct opts o = {.qd = 32, .read_pct = 50, .seconds = 5, .warmup_s = 1, .queues = 1};
	static struct load l;
	int rc = 0;

	if (parse_opts(argc, argv, &o)) {
		fprintf(stderr,
			"usage: vblk-load --socket PATH [--qd N] [--queues N] [--read-pct P]\n"
			"                 [--seconds S] [--warmup S] [--range-mb MB]\n"
			"                 [--pid BACKEND_PID] [--poll] [--hold S (needs --pid)]\n");
		return 2;
	}
	l.sock = l.memfd = -1;
	l.nq = o.queues;
	for (l.num = 64; l.num < 3 * o.qd; l.num *= 2)
		;
	for (unsigned i = 0; i < l.nq; i++) {
		struct lq *q = &l.q[i];

		q->idx = i;
		q->o = &o;
		q->l = &l;
		q->rng = 0x2545f4914f6cdd1dull + 0x9e3779b97f4a7c15ull * i; /* a stream each */
		q->slots = calloc(o.qd, sizeof(*q->slots));
		q->hist = calloc(LAT_BUCKETS, sizeof(*q->hist));
		q->kick = eventfd(0, EFD_CLOEXEC);
		q->call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (!q->slots || !q->hist || q->kick < 0 || q->call < 0)
			rc = -ENOMEM;
	}
	if (rc || (rc = setup_memory(&l, o.qd)))
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
	cleanup(&l);
	return rc ? 1 : 0;
}
