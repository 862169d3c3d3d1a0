// SPDX-License-Identifier: MIT
/*
 * Dirty-block tracking of vmig-blk (tools/vmig-blk/dirty.c), end to end:
 * the daemon named by argv[1] runs on a file image, a small front-end here
 * (the same framing as test_hostile.c) brings a ring up over its vhost-user
 * socket and writes, discards and zeroes as a guest driver would, and the
 * bitmap is checked through the JSON-RPC methods dirty_bitmap_start, _stop,
 * _query and _take: what each request marks, that reads mark nothing,
 * bounds of a take, errors for bad params, a copier that takes and copies
 * while a writer runs and must end with an exact copy (no write lost), and
 * tracking turned on again, all dirty, after a live upgrade.
 *
 * Usage: vhost-test_dirty PATH-TO-VMIG-BLK
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
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

#define MIB (1u << 20)
#define GM_SIZE (2u * MIB) /* guest memory: one region, guest physical 0 */
#define UVA 0x7f1000000000ull
#define NUM 16
#define G_DESC 0x1000ull
#define G_AVAIL 0x2000ull
#define G_USED 0x3000ull
#define G_HDR 0x8000ull
#define G_STATUS 0x9000ull
#define G_SEG 0xa000ull
#define G_DATA 0x10000ull /* up to 1 MiB of data */
#define IMG_SIZE (16u * MIB)
#define GRAN (64u << 10)
#define WAIT_MS 10000
/*
 * A copy speed (bytes/s) for cases that must act while a mirror is still
 * far from done: a cut in the first pass, blocks still missing at a
 * post-copy switch, however slowly the test itself runs. Written blocks of
 * 8 KiB go every 2 s, post-copy granules every 16 s; a case's steps take
 * milliseconds. (At 256 KiB/s the post-copy cases' whole first pass took
 * 2 s, and a stall that long in a loaded run left the destination nothing
 * to ask for.)
 */
#define CRAWL 4096u

#define PROTO_WANTED                                                                               \
	((1ull << VHOST_USER_PROTOCOL_F_MQ) | (1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK) |          \
	 (1ull << VHOST_USER_PROTOCOL_F_CONFIG))
#define FEATURES ((1ull << VIRTIO_F_VERSION_1) | (1ull << VHOST_USER_F_PROTOCOL_FEATURES))

struct wire {
	struct vhost_user_hdr hdr;
	union vhost_user_payload p;
} __attribute__((packed));

static struct {
	const char *bin;
	char dir[256];
	char sock[300], rpc[300], image[300], log[300];
	/* the destination of a storage migration */
	char sock2[300], rpc2[300], image2[300], log2[300], stor[300], uri[320];
	pid_t pid, pid2;
	int gm_fd;
	uint8_t *gm;
	int sock_fd, kick, call, err;
	uint16_t avail_idx;
	bool default_stall; /* the next source daemon keeps the 1 s write-blocking bound */
} T;

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void *gp(uint64_t gpa)
{
	assert_true(gpa < GM_SIZE);
	return T.gm + gpa;
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

/* ---- JSON-RPC ---- */

/* One call to the daemon at path; the parsed reply (NULL if none came in
 * time). */
static json_t *rpc_raw_at(const char *path, const char *method, const char *params)
{
	static char buf[1 << 20];
	char req[512];
	size_t len = 0;
	uint64_t end = now_ms() + WAIT_MS;
	int fd = connect_path(path), n;
	json_t *reply = NULL;

	if (fd < 0)
		return NULL;
	n = snprintf(req, sizeof(req), "{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"%s\"%s%s}\n",
		     method, params ? ",\"params\":" : "", params ? params : "");
	if (send(fd, req, (size_t)n, MSG_NOSIGNAL) != n) {
		close(fd);
		return NULL;
	}
	while (len + 1 < sizeof(buf) && !memchr(buf, '\n', len)) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int64_t left = (int64_t)(end - now_ms());
		ssize_t r;

		if (left <= 0 || poll(&p, 1, (int)left) <= 0)
			break;
		r = recv(fd, buf + len, sizeof(buf) - 1 - len, 0);
		if (r <= 0)
			break;
		len += (size_t)r;
	}
	close(fd);
	if (memchr(buf, '\n', len))
		reply = json_loadb(buf, len, JSON_DISABLE_EOF_CHECK, NULL);
	return reply;
}

static json_t *rpc_raw(const char *method, const char *params)
{
	return rpc_raw_at(T.rpc, method, params);
}

/* A call that must succeed: its result (caller decrefs). */
static json_t *rpc_ok_at(const char *path, const char *method, const char *params)
{
	json_t *reply = rpc_raw_at(path, method, params), *res;

	assert_non_null(reply);
	res = json_object_get(reply, "result");
	if (!res) {
		char *t = json_dumps(reply, JSON_COMPACT);

		fail_msg("%s %s failed: %s", method, params ? params : "", t);
	}
	json_incref(res);
	json_decref(reply);
	return res;
}

static json_t *rpc_ok(const char *method, const char *params)
{
	return rpc_ok_at(T.rpc, method, params);
}

/* A call that must fail with the JSON-RPC error code given. */
static void rpc_fails(const char *method, const char *params, int code)
{
	json_t *reply = rpc_raw(method, params), *e;

	assert_non_null(reply);
	e = json_object_get(reply, "error");
	if (!e || json_integer_value(json_object_get(e, "code")) != code) {
		char *t = json_dumps(reply, JSON_COMPACT);

		fail_msg("%s %s: expected error %d, got %s", method, params ? params : "", code, t);
	}
	assert_non_null(json_string_value(json_object_get(e, "message")));
	json_decref(reply);
}

static uint64_t field(json_t *o, const char *key)
{
	json_t *v = json_object_get(o, key);

	if (!json_is_integer(v))
		fail_msg("no integer \"%s\"", key);
	return (uint64_t)json_integer_value(v);
}

static uint64_t query_dirty(void)
{
	json_t *q = rpc_ok("dirty_bitmap_query", NULL);
	uint64_t d = field(q, "dirty");

	json_decref(q);
	return d;
}

/* Take, with max_bytes, into ext[] (offset, length pairs); returns count. */
static size_t take(uint64_t max_bytes, uint64_t (*ext)[2], size_t max_ext, uint64_t *bytes)
{
	char params[64];
	json_t *res, *list, *e;
	size_t i, total = 0, wraps = 0;

	snprintf(params, sizeof(params), "{\"max_bytes\":%llu}", (unsigned long long)max_bytes);
	res = rpc_ok("dirty_bitmap_take", params);
	list = json_object_get(res, "extents");
	assert_true(json_is_array(list));
	assert_true(json_array_size(list) <= max_ext);
	json_array_foreach(list, i, e)
	{
		ext[i][0] = field(e, "offset");
		ext[i][1] = field(e, "length");
		assert_true(ext[i][1] > 0 && ext[i][0] + ext[i][1] <= IMG_SIZE);
		/* In disk order from where the last take stopped, wrapping
		 * around at most once; disjoint, and not touching (touching
		 * extents are returned as one). */
		if (i && ext[i][0] < ext[i - 1][0])
			wraps++;
		else if (i)
			assert_true(ext[i][0] > ext[i - 1][0] + ext[i - 1][1]);
		total += ext[i][1];
	}
	assert_true(wraps <= 1);
	if (wraps)
		assert_true(ext[i - 1][0] + ext[i - 1][1] <= ext[0][0]);
	assert_int_equal(total, field(res, "bytes"));
	assert_true(total <= (max_bytes < GRAN ? GRAN : max_bytes));
	*bytes = total;
	json_decref(res);
	return json_array_size(list) <= max_ext ? i : 0;
}

/* Take everything; all must be one extent [off, off + len). */
static void expect_one_extent(uint64_t off, uint64_t len)
{
	uint64_t ext[8][2], bytes;
	size_t n = take(1ull << 30, ext, 8, &bytes);

	if (n != 1 || ext[0][0] != off || ext[0][1] != len)
		fail_msg("expected [%llu, +%llu), got %zu extents, first [%llu, +%llu)",
			 (unsigned long long)off, (unsigned long long)len, n,
			 (unsigned long long)(n ? ext[0][0] : 0),
			 (unsigned long long)(n ? ext[0][1] : 0));
	assert_int_equal(query_dirty(), 0);
}

/* ---- the daemon ---- */

/* Start a vmig-blk writing its output to log; returns once it answers on
 * rpc. */
static pid_t spawn(const char *log, const char *rpc, char *const argv[])
{
	uint64_t end;
	pid_t pid = fork();

	assert_true(pid >= 0);
	if (pid == 0) {
		int lfd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);

		if (lfd >= 0) {
			dup2(lfd, 1);
			dup2(lfd, 2);
		}
		execv(T.bin, argv);
		_exit(127);
	}
	end = now_ms() + WAIT_MS;
	while (now_ms() < end) {
		json_t *r = rpc_raw_at(rpc, "dirty_bitmap_query", NULL);

		if (r) {
			json_decref(r);
			return pid;
		}
		usleep(10000);
	}
	fail_msg("daemon did not come up");
	return -1;
}

/*
 * The source daemon; tls: its --tls-creds, or NULL. A write-blocking
 * mirror holds guest writes for up to 8 s here, not the 1 s default, so
 * that the cases that check every write is on the destination when it
 * completes do not depend on how fast a loaded machine acknowledges a
 * round; the case about that bound starts its own daemon with the default.
 */
static void daemon_start_tls(const char *tls)
{
	T.pid = spawn(T.log, T.rpc,
		      (char *const[]){(char *)T.bin, "--socket", T.sock, "--file", T.image, "--rpc",
				      T.rpc, "--poll-us", "0", "--write-blocking-stall-ms",
				      T.default_stall ? "1000" : "8000", tls ? "--tls-creds" : NULL,
				      (char *)tls, NULL});
}

static void daemon_start(void)
{
	daemon_start_tls(NULL);
}

static int daemon_stop(void)
{
	int st;

	if (T.pid <= 0)
		return 0;
	kill(T.pid, SIGTERM);
	waitpid(T.pid, &st, 0);
	T.pid = -1;
	return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

/* ---- vhost-user front-end ---- */

static int fe_send(uint32_t req, uint32_t flags, const void *p, uint32_t size, const int *fds,
		   unsigned nfds)
{
	char ctl[CMSG_SPACE(sizeof(int) * 8)];
	struct wire w;
	struct iovec iov = {&w, sizeof(w.hdr) + size};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};

	memset(&w, 0, sizeof(w));
	w.hdr.request = req;
	w.hdr.flags = VHOST_USER_VERSION | flags;
	w.hdr.size = size;
	if (size)
		memcpy(&w.p, p, size);
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
	return sendmsg(T.sock_fd, &mh, MSG_NOSIGNAL) == (ssize_t)iov.iov_len ? 0 : -EIO;
}

static void fe_recv(struct wire *w)
{
	struct pollfd pf = {.fd = T.sock_fd, .events = POLLIN};

	assert_int_equal(poll(&pf, 1, WAIT_MS), 1);
	assert_int_equal(recv(T.sock_fd, &w->hdr, sizeof(w->hdr), MSG_WAITALL), sizeof(w->hdr));
	assert_true(w->hdr.size <= sizeof(w->p));
	if (w->hdr.size)
		assert_int_equal(recv(T.sock_fd, &w->p, w->hdr.size, MSG_WAITALL), w->hdr.size);
}

/* Send with NEED_REPLY; the ack must say success. */
static void fe_ack(uint32_t req, const void *p, uint32_t size, const int *fds, unsigned nfds)
{
	struct wire w;

	assert_int_equal(fe_send(req, VHOST_USER_NEED_REPLY_MASK, p, size, fds, nfds), 0);
	fe_recv(&w);
	assert_int_equal(w.hdr.request, req);
	assert_int_equal(w.p.u64, 0);
}

static void fe_state(uint32_t req, uint32_t num)
{
	struct vhost_user_vring_state s = {0, num};

	fe_ack(req, &s, sizeof(s), NULL, 0);
}

/* Connect and bring ring 0 up, as QEMU would; the back-end's answer to
 * the last step, which starts the ring (0: started). */
static uint64_t fe_up_answer(void)
{
	struct vhost_user_mem_table t = {.nregions = 1};
	struct vhost_user_vring_addr a = {.index = 0,
					  .desc_user_addr = UVA + G_DESC,
					  .avail_user_addr = UVA + G_AVAIL,
					  .used_user_addr = UVA + G_USED};
	uint64_t v = PROTO_WANTED, zero = 0;
	struct wire w;
	uint64_t end = now_ms() + WAIT_MS;

	memset(T.gm, 0, 0x10000);
	T.avail_idx = 0;
	do
		T.sock_fd = connect_path(T.sock);
	while (T.sock_fd < 0 && now_ms() < end && usleep(10000) == 0);
	assert_true(T.sock_fd >= 0);
	T.kick = eventfd(0, EFD_CLOEXEC);
	T.call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	T.err = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	assert_int_equal(fe_send(VHOST_USER_GET_FEATURES, 0, NULL, 0, NULL, 0), 0);
	fe_recv(&w);
	assert_int_equal(fe_send(VHOST_USER_GET_PROTOCOL_FEATURES, 0, NULL, 0, NULL, 0), 0);
	fe_recv(&w);
	assert_int_equal(w.p.u64 & PROTO_WANTED, PROTO_WANTED);
	assert_int_equal(fe_send(VHOST_USER_SET_PROTOCOL_FEATURES, 0, &v, 8, NULL, 0), 0);
	fe_ack(VHOST_USER_SET_OWNER, NULL, 0, NULL, 0);
	v = FEATURES;
	fe_ack(VHOST_USER_SET_FEATURES, &v, 8, NULL, 0);
	t.regions[0] = (struct vhost_user_mem_region){0, GM_SIZE, UVA, 0};
	fe_ack(VHOST_USER_SET_MEM_TABLE, &t, 8 + 32, &T.gm_fd, 1);
	fe_state(VHOST_USER_SET_VRING_NUM, NUM);
	fe_state(VHOST_USER_SET_VRING_BASE, 0);
	fe_ack(VHOST_USER_SET_VRING_ADDR, &a, sizeof(a), NULL, 0);
	fe_ack(VHOST_USER_SET_VRING_CALL, &zero, 8, &T.call, 1);
	fe_ack(VHOST_USER_SET_VRING_ERR, &zero, 8, &T.err, 1);
	assert_int_equal(
	    fe_send(VHOST_USER_SET_VRING_KICK, VHOST_USER_NEED_REPLY_MASK, &zero, 8, &T.kick, 1),
	    0);
	fe_recv(&w);
	assert_int_equal(w.hdr.request, VHOST_USER_SET_VRING_KICK);
	return w.p.u64;
}

static void fe_up(void)
{
	assert_int_equal(fe_up_answer(), 0);
}

static void fe_down(void)
{
	close(T.sock_fd);
	close(T.kick);
	close(T.call);
	close(T.err);
	T.sock_fd = T.kick = T.call = T.err = -1;
	/* Wait until the daemon let go of the ring (its next query answers
	 * only after the disconnect was handled, but make sure). */
	usleep(20000);
}

/* ---- requests: one at a time, head 0, chain 0-1-2 ---- */

static void set_desc(unsigned i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
	struct vhost_desc *t = gp(G_DESC);

	t[i] = (struct vhost_desc){.addr = addr, .len = len, .flags = flags, .next = next};
}

/* Run one request; returns its status. */
/* Put a request on the ring and kick; the used index that means done. */
static uint16_t post(uint32_t type, uint64_t sector, uint64_t data_gpa, uint32_t len)
{
	struct virtio_blk_outhdr *h = gp(G_HDR);
	struct vhost_avail *av = gp(G_AVAIL);
	uint16_t want = (uint16_t)(T.avail_idx + 1);

	h->type = type;
	h->ioprio = 0;
	h->sector = sector;
	*(volatile uint8_t *)gp(G_STATUS) = 0xee;
	set_desc(0, G_HDR, sizeof(*h), VHOST_DESC_F_NEXT, 1);
	set_desc(1, data_gpa, len,
		 VHOST_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? VHOST_DESC_F_WRITE : 0), 2);
	set_desc(2, G_STATUS, 1, VHOST_DESC_F_WRITE, 0);
	av->ring[T.avail_idx % NUM] = 0;
	T.avail_idx = want;
	__atomic_store_n(&av->idx, want, __ATOMIC_RELEASE);
	eventfd_write(T.kick, 1);
	return want;
}

static bool used(uint16_t want)
{
	return __atomic_load_n(&((struct vhost_used *)gp(G_USED))->idx, __ATOMIC_ACQUIRE) == want;
}

static uint8_t request(uint32_t type, uint64_t sector, uint64_t data_gpa, uint32_t len)
{
	uint64_t end = now_ms() + WAIT_MS;
	uint16_t want = post(type, sector, data_gpa, len);

	while (!used(want)) {
		if (now_ms() > end)
			fail_msg("request type %u never completed", type);
		usleep(50);
	}
	return *(volatile uint8_t *)gp(G_STATUS);
}

static void write_at(uint64_t off, uint32_t len, uint8_t fill)
{
	memset(gp(G_DATA), fill, len);
	assert_int_equal(request(VIRTIO_BLK_T_OUT, off / 512, G_DATA, len), VIRTIO_BLK_S_OK);
}

/* Data in every block of the image: a hole costs a copy nothing, and the
 * image is otherwise whatever the cases before left. */
static void fill_image(void)
{
	for (unsigned i = 0; i < IMG_SIZE / MIB; i++)
		write_at((uint64_t)i * MIB, MIB, (uint8_t)(0x10 + i));
}

/* Discard or write-zeroes of one segment. */
static void dwz_at(uint32_t type, uint64_t off, uint64_t len, uint32_t flags)
{
	struct virtio_blk_discard_write_zeroes *s = gp(G_SEG);

	s->sector = off / 512;
	s->num_sectors = (uint32_t)(len / 512);
	s->flags = flags;
	assert_int_equal(request(type, 0, G_SEG, sizeof(*s)), VIRTIO_BLK_S_OK);
}

/* ---- cases ---- */

static void test_rpc_errors(void **state)
{
	json_t *q;

	/* Off: a query says so, take and stop are errors. */
	q = rpc_ok("dirty_bitmap_query", NULL);
	assert_true(json_is_false(json_object_get(q, "active")));
	assert_int_equal(field(q, "total"), IMG_SIZE);
	json_decref(q);
	rpc_fails("dirty_bitmap_take", NULL, -32000);
	rpc_fails("dirty_bitmap_stop", NULL, -32000);
	/* Bad params never start it. */
	rpc_fails("dirty_bitmap_start", "{\"granularity\":3000}", -32602);
	rpc_fails("dirty_bitmap_start", "{\"granularity\":12288}", -32602); /* not 2^n */
	rpc_fails("dirty_bitmap_start", "{\"granularity\":2048}", -32602);
	rpc_fails("dirty_bitmap_start", "{\"granularity\":1099511627776}", -32602);
	rpc_fails("dirty_bitmap_start", "{\"granularity\":-65536}", -32602);
	rpc_fails("dirty_bitmap_start", "{\"granularity\":\"64k\"}", -32602);
	rpc_fails("dirty_bitmap_start", "{\"granularity\":65536.0}", -32602);
	rpc_fails("dirty_bitmap_start", "{\"all_dirty\":1}", -32602);
	rpc_fails("dirty_bitmap_start", "{\"granularit\":65536}", -32602);
	rpc_fails("dirty_bitmap_start", "[65536]", -32602);
	rpc_fails("dirty_bitmap_query", "{\"x\":1}", -32602);
	q = rpc_ok("dirty_bitmap_query", NULL);
	assert_true(json_is_false(json_object_get(q, "active")));
	json_decref(q);
	/* On: fields in the style of QEMU's block-dirty-bitmap. */
	q = rpc_ok("dirty_bitmap_start", "{}");
	assert_true(json_is_true(json_object_get(q, "active")));
	assert_int_equal(field(q, "granularity"), GRAN);
	assert_int_equal(field(q, "total"), IMG_SIZE);
	assert_int_equal(field(q, "dirty"), 0);
	assert_int_equal(field(q, "count"), 0);
	(void)field(q, "dirty-rate");
	json_decref(q);
	rpc_fails("dirty_bitmap_start", NULL, -32000); /* already on */
	rpc_fails("dirty_bitmap_take", "{\"max_bytes\":0}", -32602);
	rpc_fails("dirty_bitmap_take", "{\"max_bytes\":-1}", -32602);
	rpc_fails("dirty_bitmap_take", "{\"max_bytes\":true}", -32602);
	rpc_fails("dirty_bitmap_take", "{\"max_bytes\":2147483648}", -32602);
	rpc_fails("dirty_bitmap_take", "{\"max_bytes\":1,\"x\":1}", -32602);
	json_decref(rpc_ok("dirty_bitmap_stop", NULL));
	rpc_fails("dirty_bitmap_stop", NULL, -32000);
}

/*
 * Send the pieces to the daemon's JSON-RPC socket, each in its own write,
 * 30 ms apart (so that the daemon reads them one by one), then half-close
 * if asked; collect what it answers until lines lines came, or it closed.
 * Replies are read while sending: a long pipeline's answers must not wait.
 * The bytes received; *closed: the daemon closed the connection.
 */
static size_t rpc_exchange(const char *const *pieces, unsigned n, bool shut, unsigned lines,
			   char *out, size_t cap, bool *closed)
{
	uint64_t end = now_ms() + 6 * WAIT_MS;
	size_t len = 0, sent = 0;
	unsigned got = 0, i = 0;
	int fd = connect_path(T.rpc);

	assert_true(fd >= 0);
	*closed = false;
	while (!*closed && (i < n || got < lines)) {
		struct pollfd p = {.fd = fd, .events = POLLIN | (i < n ? POLLOUT : 0)};
		ssize_t r;

		if (now_ms() > end)
			fail_msg("rpc: %u of %u answers after %u of %u pieces", got, lines, i, n);
		if (poll(&p, 1, 100) <= 0)
			continue;
		if (p.revents & (POLLIN | POLLHUP)) {
			assert_true(len < cap);
			r = recv(fd, out + len, cap - len, MSG_DONTWAIT);
			if (r == 0 || (r < 0 && errno == ECONNRESET)) {
				*closed = true;
			} else if (r > 0) {
				for (ssize_t k = 0; k < r; k++)
					got += out[len + (size_t)k] == '\n';
				len += (size_t)r;
			}
		}
		if (i < n && (p.revents & POLLOUT)) {
			r = send(fd, pieces[i] + sent, strlen(pieces[i]) - sent,
				 MSG_DONTWAIT | MSG_NOSIGNAL);
			if (r > 0 && (sent += (size_t)r) == strlen(pieces[i])) {
				sent = 0;
				if (++i < n)
					usleep(30000);
				else if (shut)
					shutdown(fd, SHUT_WR);
			}
		}
	}
	close(fd);
	return len;
}

/* Line k (from 0) of the answers, parsed; fails if there is none. */
static json_t *answer(const char *out, size_t len, unsigned k)
{
	const char *p = out, *e = out + len;
	json_t *j;

	for (unsigned i = 0; i < k && p < e; i++) {
		p = memchr(p, '\n', (size_t)(e - p));
		assert_non_null(p);
		p++;
	}
	assert_true(p < e && memchr(p, '\n', (size_t)(e - p)));
	j = json_loadb(p, (size_t)(e - p), JSON_DISABLE_EOF_CHECK, NULL);
	assert_non_null(j);
	return j;
}

/* An error answer with code (and a message). */
static void expect_error(json_t *a, int code)
{
	json_t *e = json_object_get(a, "error");

	if (!e || json_integer_value(json_object_get(e, "code")) != code)
		fail_msg("expected error %d, got %s", code, json_dumps(a, JSON_COMPACT));
	assert_non_null(json_string_value(json_object_get(e, "message")));
	json_decref(a);
}

/*
 * The JSON-RPC socket is a byte stream: a request may come in pieces, cut
 * anywhere (inside "true", after a minus sign, inside a \u escape), and
 * many may come at once, more than the 64 KiB a client's buffer holds.
 * Each whole request is answered, in order. A client that ends half-way
 * through a request hears a parse error; a single request over 64 KiB is
 * refused as too large.
 */
static void test_rpc_framing(void **state)
{
	static char out[1 << 20];
	const char *cut[] = {
	    "{\"jsonrpc\":\"2.0\",\"id\":-",
	    "5,\"method\":\"dirty_bitmap_q\\u00",
	    ("75ery\",\"params\":{}}\n{\"jsonrpc\":\"2.0\",\"id\":6,\"method\":"
	     "\"dirty_bitmap_start\",\"params\":{\"all_dirty\":tr"),
	    "ue}}",
	};
	const unsigned many = 3000;
	char *pipeline, *big;
	bool closed;
	size_t len;
	json_t *a;

	len = rpc_exchange(cut, 4, false, 2, out, sizeof(out), &closed);
	assert_false(closed);
	a = answer(out, len, 0);
	assert_int_equal(json_integer_value(json_object_get(a, "id")), -5);
	assert_true(json_is_false(json_object_get(json_object_get(a, "result"), "active")));
	json_decref(a);
	a = answer(out, len, 1);
	assert_int_equal(json_integer_value(json_object_get(a, "id")), 6);
	assert_int_equal(field(json_object_get(a, "result"), "dirty"), IMG_SIZE); /* all_dirty */
	json_decref(a);
	json_decref(rpc_ok("dirty_bitmap_stop", NULL));

	/* Many at once: about 190 KiB of requests in one go. */
	pipeline = malloc((size_t)many * 80 + 1);
	assert_non_null(pipeline);
	len = 0;
	for (unsigned i = 0; i < many; i++)
		len += (size_t)sprintf(
		    pipeline + len,
		    "{\"jsonrpc\":\"2.0\",\"id\":%u,\"method\":\"dirty_bitmap_query\"}", i);
	assert_true(len > 2 * 65536); /* twice a client's buffer in the daemon */
	len = rpc_exchange((const char *const[]){pipeline}, 1, false, many, out, sizeof(out),
			   &closed);
	for (unsigned i = 0; i < many; i++) {
		a = answer(out, len, i);
		assert_int_equal(json_integer_value(json_object_get(a, "id")), i);
		assert_non_null(json_object_get(a, "result"));
		json_decref(a);
	}
	free(pipeline);

	/* The client ends half-way: a parse error, then the end. */
	len = rpc_exchange((const char *const[]){"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"x\""},
			   1, true, 1, out, sizeof(out), &closed);
	expect_error(answer(out, len, 0), -32700);
	/* Not JSON at all, and a top-level scalar: the same. */
	len = rpc_exchange((const char *const[]){"{\"id\":1,}\n"}, 1, false, 1, out, sizeof(out),
			   &closed);
	expect_error(answer(out, len, 0), -32700);
	len = rpc_exchange((const char *const[]){"42\n"}, 1, false, 1, out, sizeof(out), &closed);
	expect_error(answer(out, len, 0), -32700);

	/* One request larger than the buffer. */
	big = malloc(70000 + 100);
	assert_non_null(big);
	len = (size_t)sprintf(big, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"");
	memset(big + len, 'x', 70000);
	strcpy(big + len + 70000, "\"}\n");
	len = rpc_exchange((const char *const[]){big}, 1, false, 1, out, sizeof(out), &closed);
	expect_error(answer(out, len, 0), -32600);
	free(big);
}

/* A client that sends "{}" requests (each answered -32600) as fast as the
 * socket takes them, reading its answers, until stop; counts the answers. */
static struct {
	bool stop; /* atomic */
	uint64_t answers;
} F;

static void *flood(void *arg)
{
	static const char req[] = "{}{}{}{}{}{}{}{}{}{}{}{}{}{}{}{}";
	int fd = connect_path(T.rpc);
	uint64_t end = now_ms() + 3 * WAIT_MS;
	char buf[65536];

	while (fd >= 0 && !__atomic_load_n(&F.stop, __ATOMIC_ACQUIRE) && now_ms() < end) {
		struct pollfd p = {.fd = fd, .events = POLLIN | POLLOUT};
		ssize_t n;

		if (poll(&p, 1, 100) <= 0)
			continue;
		if (p.revents & POLLIN) {
			n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
			if (n <= 0)
				break;
			for (ssize_t i = 0; i < n; i++)
				__atomic_fetch_add(&F.answers, buf[i] == '\n', __ATOMIC_RELAXED);
		}
		if ((p.revents & POLLOUT) &&
		    send(fd, req, sizeof(req) - 1, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 &&
		    errno != EAGAIN)
			break;
	}
	if (fd >= 0)
		close(fd);
	return NULL;
}

/*
 * Clients that misbehave on the JSON-RPC socket may not hold the daemon's
 * control thread (which also serves vhost-user, whose front-end may wait
 * on it with its vCPUs stopped):
 *  - one that sends requests without end, reading its answers: the others
 *    are still answered;
 *  - one that sends many requests and never reads the answers: once its
 *    socket is full it gets no more of them (each would wait 2 s), and is
 *    closed;
 *  - vmig_blk_upgrade with requests after it on the same connection: the
 *    new process would answer only the upgrade, so it is refused and the
 *    rest are answered here.
 */
static void test_rpc_clients_misbehave(void **state)
{
	static char out[1 << 16];
	char *many;
	pthread_t th;
	uint64_t t0;
	bool closed;
	size_t len;
	json_t *a, *q;
	int fd;

	F.stop = false;
	F.answers = 0;
	assert_int_equal(pthread_create(&th, NULL, flood, NULL), 0);
	for (uint64_t end = now_ms() + WAIT_MS; !__atomic_load_n(&F.answers, __ATOMIC_RELAXED);)
		assert_true(now_ms() < end);
	for (int i = 0; i < 20; i++) { /* each answered while the flood goes on */
		t0 = now_ms();
		q = rpc_ok("dirty_bitmap_query", NULL);
		json_decref(q);
		assert_true(now_ms() - t0 < WAIT_MS);
	}
	__atomic_store_n(&F.stop, true, __ATOMIC_RELEASE);
	pthread_join(th, NULL);

	/* 32 KiB of requests, never read: some 16000 answers do not fit */
	fd = connect_path(T.rpc);
	assert_true(fd >= 0);
	many = malloc(32768);
	assert_non_null(many);
	for (int i = 0; i < 32768; i += 2)
		memcpy(many + i, "{}", 2);
	assert_int_equal(send(fd, many, 32768, MSG_NOSIGNAL), 32768);
	free(many);
	t0 = now_ms();
	q = rpc_ok("dirty_bitmap_query", NULL); /* after about 2 s, not hours */
	json_decref(q);
	assert_true(now_ms() - t0 < WAIT_MS);
	close(fd);

	len = rpc_exchange((const char *const[]){"{\"id\":1,\"method\":\"vmig_blk_upgrade\"}\n"
						 "{\"id\":2,\"method\":\"dirty_bitmap_query\"}\n"},
			   1, false, 2, out, sizeof(out), &closed);
	a = answer(out, len, 0);
	assert_non_null(
	    strstr(json_string_value(json_object_get(json_object_get(a, "error"), "message")),
		   "last request"));
	json_decref(a);
	a = answer(out, len, 1);
	assert_int_equal(json_integer_value(json_object_get(a, "id")), 2);
	assert_non_null(json_object_get(a, "result"));
	json_decref(a);
	q = rpc_ok("vhost_get_controllers", NULL); /* no upgrade happened */
	assert_int_equal(json_integer_value(json_object_get(json_array_get(q, 0), "upgrades")), 0);
	assert_int_equal(json_integer_value(json_object_get(json_array_get(q, 0), "pid")), T.pid);
	json_decref(q);
}

static void test_requests_marked(void **state)
{
	json_t *q;
	uint64_t ext[8][2], bytes;

	fe_up();
	json_decref(rpc_ok("dirty_bitmap_start", "{\"granularity\":65536}"));
	/* One 4 KiB write inside a granule: that granule. */
	write_at(2 * GRAN + 4096, 4096, 0x11);
	assert_int_equal(query_dirty(), GRAN);
	expect_one_extent(2 * GRAN, GRAN);
	/* Across a granule boundary: both. */
	write_at(5 * GRAN - 4096, 8192, 0x22);
	expect_one_extent(4 * GRAN, 2 * GRAN);
	/* Reads, flushes and a refused write (past the end) mark nothing. */
	assert_int_equal(request(VIRTIO_BLK_T_IN, 0, G_DATA, 65536), VIRTIO_BLK_S_OK);
	assert_int_equal(request(VIRTIO_BLK_T_FLUSH, 0, G_DATA, 0), VIRTIO_BLK_S_OK);
	assert_int_equal(request(VIRTIO_BLK_T_OUT, IMG_SIZE / 512, G_DATA, 4096),
			 VIRTIO_BLK_S_IOERR);
	assert_int_equal(query_dirty(), 0);
	/* Discard and write-zeroes (with and without unmap). */
	dwz_at(VIRTIO_BLK_T_DISCARD, 8 * GRAN, 3 * GRAN, 0);
	expect_one_extent(8 * GRAN, 3 * GRAN);
	dwz_at(VIRTIO_BLK_T_WRITE_ZEROES, 20 * GRAN + 512, 1024, 0);
	expect_one_extent(20 * GRAN, GRAN);
	dwz_at(VIRTIO_BLK_T_WRITE_ZEROES, 30 * GRAN, GRAN, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
	expect_one_extent(30 * GRAN, GRAN);
	/* The last granule of the disk. */
	write_at(IMG_SIZE - 4096, 4096, 0x33);
	expect_one_extent(IMG_SIZE - GRAN, GRAN);
	/* Two writes far apart: two extents, in disk order. */
	write_at(40 * GRAN, 4096, 0x44);
	write_at(10 * GRAN, 4096, 0x44);
	assert_int_equal(take(1ull << 30, ext, 8, &bytes), 2);
	assert_int_equal(ext[0][0], 10 * GRAN);
	assert_int_equal(ext[1][0], 40 * GRAN);
	/* A granule written many times is dirty once; dirtied counts each
	 * time it turned dirty. */
	for (int i = 0; i < 5; i++)
		write_at(50 * GRAN, 512, (uint8_t)i);
	q = rpc_ok("dirty_bitmap_query", NULL);
	assert_int_equal(field(q, "dirty"), GRAN);
	assert_int_equal(field(q, "count"), GRAN);
	assert_true(field(q, "dirtied") >= 10 * GRAN);
	json_decref(q);
	/* Stopped: writes are no longer tracked, and a new start is clean. */
	json_decref(rpc_ok("dirty_bitmap_stop", NULL));
	write_at(60 * GRAN, 4096, 0x55);
	json_decref(rpc_ok("dirty_bitmap_start", "{\"granularity\":4096}"));
	assert_int_equal(query_dirty(), 0);
	write_at(60 * GRAN + 8192, 4096, 0x55);
	expect_one_extent(60 * GRAN + 8192, 4096);
	json_decref(rpc_ok("dirty_bitmap_stop", NULL));
	fe_down();
}

static void test_take_bounds(void **state)
{
	static uint64_t ext[4096][2];
	uint64_t bytes, total = 0;
	json_t *q = rpc_ok("dirty_bitmap_start", "{\"all_dirty\":true}");

	assert_int_equal(field(q, "dirty"), IMG_SIZE);
	json_decref(q);
	/* Less than a granule still takes one. */
	assert_int_equal(take(1, ext, 4096, &bytes), 1);
	assert_int_equal(ext[0][0], 0);
	assert_int_equal(bytes, GRAN);
	assert_int_equal(query_dirty(), IMG_SIZE - GRAN);
	/* 1 MiB at a time, in order, until nothing is left. */
	total = GRAN;
	for (int i = 0; i < 100 && total < IMG_SIZE; i++) {
		assert_int_equal(take(MIB, ext, 4096, &bytes), 1);
		assert_int_equal(ext[0][0], total);
		assert_true(bytes == MIB || total + bytes == IMG_SIZE);
		total += bytes;
	}
	assert_int_equal(total, IMG_SIZE);
	assert_int_equal(take(MIB, ext, 4096, &bytes), 0);
	assert_int_equal(bytes, 0);
	json_decref(rpc_ok("dirty_bitmap_stop", NULL));
	/* Every other granule dirty: a take is bounded by its extent count
	 * as well, and what it leaves comes in the next one. */
	fe_up();
	json_decref(rpc_ok("dirty_bitmap_start", "{\"granularity\":4096}"));
	for (uint64_t off = 0; off < 2 * MIB; off += 2 * 4096) {
		memset(gp(G_DATA), 0x5a, 4096);
		assert_int_equal(request(VIRTIO_BLK_T_OUT, off / 512, G_DATA, 4096),
				 VIRTIO_BLK_S_OK);
	}
	assert_int_equal(query_dirty(), MIB);
	assert_int_equal(take(1ull << 30, ext, 4096, &bytes), 256);
	assert_int_equal(bytes, MIB);
	assert_int_equal(query_dirty(), 0);
	json_decref(rpc_ok("dirty_bitmap_stop", NULL));
	fe_down();
}

/*
 * A writer (the guest) and a copier (a storage migration) at once. The
 * copier takes a few extents at a time and copies them from the image into
 * a shadow disk; the writer writes, discards and zeroes random blocks.
 * Once the writer is done, the copier takes until nothing is dirty: the
 * shadow must then be the image, byte for byte, or a write was lost.
 * Granules of 4 KiB over the whole disk make most writes the last one to
 * touch their granules, so a lost write is not hidden by a later write
 * that marks the same granule again: marking a write before its I/O
 * instead of after it makes this test fail.
 */
#define RACE_AREA IMG_SIZE
#define RACE_WRITES 3000

static volatile bool writer_done;

static void *writer(void *arg)
{
	uint64_t rng = 0x9e3779b97f4a7c15ull;

	(void)arg;
	for (int i = 0; i < RACE_WRITES; i++) {
		uint64_t off, len;

		rng ^= rng << 13;
		rng ^= rng >> 7;
		rng ^= rng << 17;
		off = (rng % (RACE_AREA / 4096)) * 4096;
		len = 4096 * (1 + (rng >> 40) % 4);
		if (off + len > RACE_AREA)
			len = RACE_AREA - off;
		if ((rng >> 50) % 8 == 0) {
			dwz_at((rng >> 53) & 1 ? VIRTIO_BLK_T_DISCARD : VIRTIO_BLK_T_WRITE_ZEROES,
			       off, len, 0);
		} else {
			uint8_t *p = gp(G_DATA);

			for (uint64_t k = 0; k < len; k += 8)
				memcpy(p + k, &(uint64_t){rng + k * 0x100000001b3ull}, 8);
			assert_int_equal(
			    request(VIRTIO_BLK_T_OUT, off / 512, G_DATA, (uint32_t)len),
			    VIRTIO_BLK_S_OK);
		}
	}
	__atomic_store_n(&writer_done, true, __ATOMIC_RELEASE);
	return NULL;
}

static unsigned copy_round(int img, uint8_t *shadow, uint64_t max_bytes)
{
	static uint64_t ext[4096][2];
	uint64_t bytes;
	size_t n = take(max_bytes, ext, 4096, &bytes);

	for (size_t i = 0; i < n; i++)
		assert_int_equal(pread(img, shadow + ext[i][0], ext[i][1], (off_t)ext[i][0]),
				 (ssize_t)ext[i][1]);
	return (unsigned)n;
}

static void test_race_take(void **state)
{
	uint8_t *shadow = calloc(1, IMG_SIZE), *image = malloc(IMG_SIZE);
	int img = open(T.image, O_RDONLY | O_CLOEXEC);
	unsigned rounds = 0, final_rounds = 0;
	pthread_t th;

	assert_true(shadow && image && img >= 0);
	fe_up();
	/* All dirty: the first takes are the background copy. */
	json_decref(rpc_ok("dirty_bitmap_start", "{\"all_dirty\":true,\"granularity\":4096}"));
	writer_done = false;
	assert_int_equal(pthread_create(&th, NULL, writer, NULL), 0);
	while (!__atomic_load_n(&writer_done, __ATOMIC_ACQUIRE) && rounds < 100000) {
		copy_round(img, shadow, 16 * 4096);
		rounds++;
	}
	pthread_join(th, NULL);
	/* Converge: nothing writes now, so this ends. */
	while (copy_round(img, shadow, 64 * MIB) && final_rounds < 10)
		final_rounds++;
	assert_true(final_rounds < 10);
	assert_int_equal(query_dirty(), 0);
	assert_int_equal(pread(img, image, IMG_SIZE, 0), IMG_SIZE);
	for (uint64_t off = 0; off < IMG_SIZE; off += 4096)
		if (memcmp(shadow + off, image + off, 4096))
			fail_msg("the copy differs at %llu: a write was lost (after %u rounds)",
				 (unsigned long long)off, rounds);
	fprintf(stderr, "race: %u takes while %d requests ran\n", rounds, RACE_WRITES);
	assert_true(rounds > 1);
	json_decref(rpc_ok("dirty_bitmap_stop", NULL));
	fe_down();
	close(img);
	free(shadow);
	free(image);
}

/* After a live upgrade tracking is on again, every block dirty. */
static void test_upgrade_all_dirty(void **state)
{
	uint64_t ext[4][2], bytes;
	json_t *res, *q;

	json_decref(rpc_ok("dirty_bitmap_start", "{\"granularity\":131072}"));
	while (take(1ull << 30, ext, 4, &bytes))
		;
	assert_int_equal(query_dirty(), 0);
	res = rpc_ok("vmig_blk_upgrade", NULL);
	json_decref(res);
	q = rpc_ok("dirty_bitmap_query", NULL);
	assert_true(json_is_true(json_object_get(q, "active")));
	assert_int_equal(field(q, "granularity"), 131072);
	assert_int_equal(field(q, "dirty"), IMG_SIZE);
	json_decref(q);
	json_decref(rpc_ok("dirty_bitmap_stop", NULL));
}

/*
 * A live upgrade runs its target with the daemon's own arguments and
 * --version before it execs it: a binary that refuses one of them (an
 * older one, and an option added since) is refused while the daemon still
 * serves. Before, the check ran only --version, and the exec'd binary,
 * past the point of no return, exited on the option, the disk unserved.
 */
static void test_upgrade_checks_arguments(void **state)
{
	char fake[4096], *slash;
	ssize_t n = readlink("/proc/self/exe", fake, sizeof(fake) - 16);
	const char *msg;
	json_t *r, *q;

	assert_true(n > 0);
	fake[n] = '\0';
	slash = strrchr(fake, '/');
	assert_non_null(slash);
	strcpy(slash + 1, "old-vmig-blk");
	assert_int_equal(daemon_stop(), 0);
	T.pid = spawn(T.log, T.rpc,
		      (char *const[]){(char *)T.bin, "--socket", T.sock, "--file", T.image, "--rpc",
				      T.rpc, "--write-blocking-stall-ms", "2000",
				      "--upgrade-binary", fake, NULL});
	r = rpc_raw("vmig_blk_upgrade", NULL);
	assert_non_null(r);
	msg = json_string_value(json_object_get(json_object_get(r, "error"), "message"));
	if (!msg || !strstr(msg, "refuses this daemon's arguments") ||
	    !strstr(msg, "--write-blocking-stall-ms"))
		fail_msg("upgrade to a binary that refuses an argument: %s",
			 json_dumps(r, JSON_COMPACT));
	json_decref(r);
	/* the same process serves on */
	q = rpc_ok("vhost_get_controllers", NULL);
	assert_int_equal(json_integer_value(json_object_get(json_array_get(q, 0), "pid")), T.pid);
	assert_int_equal(json_integer_value(json_object_get(json_array_get(q, 0), "upgrades")), 0);
	json_decref(q);
	fe_up();
	write_at(0, 4096, 0x3e);
	fe_down();
}

/* ---- storage migration to a second daemon (tools/vmig-blk/mirror.c, incoming.c) ---- */

#define RPC_SERVER_ERROR (-32000)

/* The destination daemon; tls: its --tls-creds (with --tls-authz qemu), or
 * NULL. */
static void dest_start_tls(bool fresh, const char *tls)
{
	if (fresh) {
		int fd = open(T.image2, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

		assert_true(fd >= 0);
		assert_int_equal(ftruncate(fd, IMG_SIZE), 0);
		close(fd);
	}
	T.pid2 =
	    spawn(T.log2, T.rpc2,
		  (char *const[]){(char *)T.bin, "--socket", T.sock2, "--file", T.image2, "--rpc",
				  T.rpc2, "--incoming", T.uri, tls ? "--tls-creds" : NULL,
				  (char *)tls, "--tls-authz", "qemu", NULL});
}

static void dest_start(bool fresh)
{
	dest_start_tls(fresh, NULL);
}

static void dest_stop(bool hard)
{
	int st;

	kill(T.pid2, hard ? SIGKILL : SIGTERM);
	waitpid(T.pid2, &st, 0);
	T.pid2 = -1;
	if (!hard)
		assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

static bool has_status(json_t *q, const char *status)
{
	const char *s = json_string_value(json_object_get(q, "status"));

	return s && !strcmp(s, status);
}

/* Poll vmig_blk_mirror_query until it says status (and ready, if asked),
 * or offset reaches min_offset; the last answer. */
static json_t *mirror_wait(const char *status, bool ready, uint64_t min_offset)
{
	uint64_t end = now_ms() + 6 * WAIT_MS;

	for (;;) {
		json_t *q = rpc_ok("vmig_blk_mirror_query", NULL);

		if ((status && has_status(q, status)) ||
		    (ready && json_is_true(json_object_get(q, "ready"))) ||
		    (min_offset && field(q, "offset") >= min_offset))
			return q;
		if (has_status(q, "concluded") || now_ms() > end) {
			char *t = json_dumps(q, JSON_COMPACT);

			fail_msg("mirror: waited for %s, got %s", status ? status : "progress", t);
		}
		json_decref(q);
		usleep(5000);
	}
}

/* Bytes the file system allocated to the image at path. */
static uint64_t allocated(const char *path)
{
	struct stat st;

	assert_int_equal(stat(path, &st), 0);
	return (uint64_t)st.st_blocks * 512;
}

/* The destination's image is the source's, byte for byte, and no less
 * sparse: the source's holes travel as ZERO with UNMAP, not as zeros read
 * and written. */
static void expect_same_images(void)
{
	uint8_t *a = malloc(IMG_SIZE), *b = malloc(IMG_SIZE);
	int fa = open(T.image, O_RDONLY | O_CLOEXEC), fb = open(T.image2, O_RDONLY | O_CLOEXEC);

	assert_true(a && b && fa >= 0 && fb >= 0);
	assert_int_equal(pread(fa, a, IMG_SIZE, 0), IMG_SIZE);
	assert_int_equal(pread(fb, b, IMG_SIZE, 0), IMG_SIZE);
	for (uint64_t off = 0; off < IMG_SIZE; off += 4096)
		if (memcmp(a + off, b + off, 4096))
			fail_msg("the destination differs at %llu", (unsigned long long)off);
	if (allocated(T.image2) > allocated(T.image) + 4 * GRAN)
		fail_msg("the destination allocated %llu bytes, the source %llu",
			 (unsigned long long)allocated(T.image2),
			 (unsigned long long)allocated(T.image));
	close(fa);
	close(fb);
	free(a);
	free(b);
}

/* Poll the destination until its status is status. */
static void incoming_wait(const char *status)
{
	for (uint64_t end = now_ms() + WAIT_MS;; usleep(5000)) {
		json_t *q = rpc_ok_at(T.rpc2, "vmig_blk_incoming_query", NULL);

		if (has_status(q, status)) {
			json_decref(q);
			return;
		}
		if (now_ms() > end)
			fail_msg("the destination never got to %s: %s", status,
				 json_dumps(q, JSON_COMPACT));
		json_decref(q);
	}
}

/* Complete once the front-end (the VM) stopped: the last round, then both
 * sides say so, and the images match. */
static void complete_and_check(void)
{
	json_t *q;

	fe_down();
	json_decref(rpc_ok("vmig_blk_mirror_complete", NULL));
	q = mirror_wait("concluded", false, 0);
	if (json_object_get(q, "error"))
		fail_msg("mirror failed: %s", json_string_value(json_object_get(q, "error")));
	assert_int_equal(field(q, "remaining"), 0);
	json_decref(q);
	/* The destination says "completed" once its receiver is done, just
	 * after the DONE that ends the source's mirror: not at the same
	 * instant. */
	incoming_wait("completed");
	expect_same_images();
	/* tracking went off with the mirror's end */
	q = rpc_ok("dirty_bitmap_query", NULL);
	assert_true(json_is_false(json_object_get(q, "active")));
	json_decref(q);
}

/*
 * The guest writes, discards and zeroes 3000 random blocks while the disk
 * is mirrored; once the VM stopped, the last round makes the destination
 * the source byte for byte. 4 KiB granules, as in test_race_take, so a
 * lost write is rarely hidden by a later one.
 */
static void test_mirror_while_writing(void **state)
{
	char params[512];
	pthread_t th;
	json_t *q;

	fe_up();
	dest_start(true);
	writer_done = false;
	assert_int_equal(pthread_create(&th, NULL, writer, NULL), 0);
	snprintf(params, sizeof(params), "{\"uri\":\"%s\",\"granularity\":4096}", T.uri);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	/* the mirror owns tracking; the guest still runs, so no completion */
	rpc_fails("dirty_bitmap_take", NULL, RPC_SERVER_ERROR);
	rpc_fails("dirty_bitmap_stop", NULL, RPC_SERVER_ERROR);
	rpc_fails("vmig_blk_mirror_complete", NULL, RPC_SERVER_ERROR);
	rpc_fails("vmig_blk_mirror_start", params, RPC_SERVER_ERROR);
	pthread_join(th, NULL);
	q = mirror_wait(NULL, true, 0);
	json_decref(q);
	complete_and_check();
	dest_stop(false);
}

/*
 * The destination is killed (-9) twice: during the first pass, and after
 * it, while the guest writes. Each time the source keeps serving, the
 * mirror ends with an error, and a new start resumes from the bitmap: the
 * second resume sends only what was dirtied, not the disk again.
 */
static void test_mirror_resumes(void **state)
{
	char params[512];
	json_t *q;

	fe_up();
	fill_image();
	dest_start(true);
	/* a crawl: the cut lands in the first pass, however slow the test */
	snprintf(params, sizeof(params), "{\"uri\":\"%s\",\"speed\":%u}", T.uri, CRAWL);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	json_decref(mirror_wait(NULL, false, 1));
	dest_stop(true);
	q = mirror_wait("concluded", false, 0);
	assert_non_null(json_object_get(q, "error"));
	assert_false(json_is_true(json_object_get(q, "ready")));
	json_decref(q);
	write_at(5 * MIB, 8192, 0x5a); /* the source still serves */

	dest_start(false);
	snprintf(params, sizeof(params), "{\"uri\":\"%s\"}", T.uri);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	json_decref(mirror_wait(NULL, true, 0));
	write_at(7 * MIB, 4096, 0x6b);
	write_at(IMG_SIZE - 4096, 4096, 0x7c);
	dest_stop(true); /* those two may or may not have been acknowledged */
	json_decref(mirror_wait("concluded", false, 0));
	write_at(9 * MIB, 4096, 0x8d); /* certainly not */

	dest_start(false);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	q = mirror_wait(NULL, true, 0);
	/* only the blocks written since the last acknowledged round */
	assert_true(field(q, "len") > 0);
	assert_true(field(q, "len") <= 4 * (64u << 10));
	json_decref(q);
	complete_and_check();
	dest_stop(false);
}

/* The destination's image at off: len bytes of fill? */
static bool dest_has(uint64_t off, uint32_t len, uint8_t fill)
{
	uint8_t buf[16384];
	int fd = open(T.image2, O_RDONLY | O_CLOEXEC);
	bool same = true;

	assert_true(fd >= 0 && len <= sizeof(buf));
	assert_int_equal(pread(fd, buf, len, (off_t)off), (ssize_t)len);
	for (uint32_t i = 0; i < len; i++)
		same &= buf[i] == fill;
	close(fd);
	return same;
}

/* Poll the mirror until actively-synced (write-blocking, the backlog on the
 * destination). */
static void wait_synced(void)
{
	uint64_t end = now_ms() + 6 * WAIT_MS;

	for (;;) {
		json_t *q = rpc_ok("vmig_blk_mirror_query", NULL);
		bool synced = json_is_true(json_object_get(q, "actively-synced"));

		if (!synced && (has_status(q, "concluded") || now_ms() > end)) {
			char *t = json_dumps(q, JSON_COMPACT);

			fail_msg("mirror: never actively synced: %s", t);
		}
		json_decref(q);
		if (synced)
			return;
		usleep(5000);
	}
}

/*
 * copy-mode write-blocking: once the mirror is actively synced, a write the
 * guest saw complete is already on the destination, every time, even with
 * a copy speed far below the guest's writes (the rounds that carry held
 * writes are not limited). A destination killed (-9) while writes wait
 * lets them go: the source serves on, and a resumed mirror completes with
 * both images the same. Without the gate, the destination lags behind the
 * completions and the first check fails.
 */
static void test_mirror_write_blocking(void **state)
{
	char params[512];
	uint64_t rng = 0x2545f4914f6cdd1dull, sent;
	json_t *q;

	fe_up();
	dest_start(true);
	rpc_fails("vmig_blk_mirror_start", "{\"uri\":\"unix:/x\",\"copy-mode\":\"eager\"}", -32602);
	snprintf(params, sizeof(params),
		 "{\"uri\":\"%s\",\"granularity\":4096,\"copy-mode\":\"write-blocking\"}", T.uri);
	q = rpc_ok("vmig_blk_mirror_start", params);
	assert_string_equal(json_string_value(json_object_get(q, "copy-mode")), "write-blocking");
	json_decref(q);
	rpc_fails("vmig_blk_mirror_change", NULL, -32602);
	rpc_fails("vmig_blk_mirror_change", "{\"copy-mode\":1}", -32602);
	json_decref(mirror_wait(NULL, true, 0));
	wait_synced();
	json_decref(rpc_ok("vmig_blk_mirror_set_speed", "{\"speed\":4096}"));
	for (int i = 0; i < 300; i++) {
		uint32_t len = 4096u * (1 + (uint32_t)(i % 4));
		uint64_t off;

		rng ^= rng << 13;
		rng ^= rng >> 7;
		rng ^= rng << 17;
		off = (rng % (IMG_SIZE / 4096 - 4)) * 4096;
		write_at(off, len, (uint8_t)(i + 1));
		if (!dest_has(off, len, (uint8_t)(i + 1)))
			fail_msg("write %d at %llu completed before the destination had it", i,
				 (unsigned long long)off);
	}
	q = rpc_ok("vmig_blk_mirror_query", NULL);
	assert_true(field(q, "held-writes") >= 300);
	json_decref(q);

	/* The destination dies with writes held: they complete, here. */
	dest_stop(true);
	for (int i = 0; i < 20; i++)
		write_at((uint64_t)i * 65536, 4096, 0xa0);
	json_decref(mirror_wait("concluded", false, 0));

	/* A resumed mirror, background then write-blocking again, switched
	 * while a round crawls at 4 KiB/s through 2 MiB: that round must end
	 * at full speed (else syncing would take minutes). */
	dest_start(false);
	snprintf(params, sizeof(params), "{\"uri\":\"%s\"}", T.uri);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	q = mirror_wait(NULL, true, 0);
	sent = field(q, "offset");
	json_decref(q);
	json_decref(rpc_ok("vmig_blk_mirror_set_speed", "{\"speed\":4096}"));
	for (int i = 0; i < 2; i++)
		write_at(8 * MIB + (uint64_t)i * MIB, MIB, (uint8_t)(0xd0 + i));
	/* the round's first MiB went out: the second waits for the limit */
	json_decref(mirror_wait(NULL, false, sent + MIB));
	q = rpc_ok("vmig_blk_mirror_change", "{\"copy-mode\":\"write-blocking\"}");
	assert_string_equal(json_string_value(json_object_get(q, "copy-mode")), "write-blocking");
	json_decref(q);
	wait_synced();
	write_at(3 * MIB, 8192, 0xc3);
	assert_true(dest_has(3 * MIB, 8192, 0xc3));
	assert_true(dest_has(9 * MIB, 4096, 0xd1));
	complete_and_check();
	dest_stop(false);
}

/*
 * The destination holds its guest's requests until the stream completed:
 * a read posted there after the source stopped, but before the last round,
 * waits, and then returns the block the last round carried.
 */
static void test_incoming_holds_requests(void **state)
{
	char params[512], sock[300];
	uint16_t want;

	fe_up();
	dest_start(true);
	snprintf(params, sizeof(params), "{\"uri\":\"%s\"}", T.uri);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	json_decref(mirror_wait(NULL, true, 0));
	write_at(3 * MIB, 4096, 0xab);
	fe_down(); /* the VM stopped on the source */
	/* its twin starts on the destination and reads that block */
	memcpy(sock, T.sock, sizeof(sock));
	memcpy(T.sock, T.sock2, sizeof(T.sock));
	fe_up();
	memset(gp(G_DATA), 0, 4096);
	want = post(VIRTIO_BLK_T_IN, 3 * MIB / 512, G_DATA, 4096);
	usleep(300000);
	assert_false(used(want));
	json_decref(rpc_ok("vmig_blk_mirror_complete", NULL));
	json_decref(mirror_wait("concluded", false, 0));
	for (uint64_t end = now_ms() + WAIT_MS; !used(want);) {
		if (now_ms() > end)
			fail_msg("the held read never completed");
		usleep(100);
	}
	assert_int_equal(*(volatile uint8_t *)gp(G_STATUS), VIRTIO_BLK_S_OK);
	for (unsigned i = 0; i < 4096; i++)
		if (((uint8_t *)gp(G_DATA))[i] != 0xab)
			fail_msg("the destination returned a stale block (byte %u)", i);
	fe_down();
	memcpy(T.sock, sock, sizeof(T.sock));
	expect_same_images();
	dest_stop(false);
}

/*
 * A link between the two daemons that the test can cut: a forwarder
 * between a unix socket of its own and the destination's. A cut closes
 * both sides of the current connection; the next one is forwarded again.
 */
static struct {
	char path[300], uri[320];
	int lfd, cut_fd;
	pthread_t th;
	bool up;       /* link_up ran, link_down not yet */
	bool stop;     /* atomic */
	bool hold;     /* atomic: forward nothing (a stalled link) while set */
	unsigned cuts; /* atomic: connections the forwarder cut */
} L;

static void *link_thread(void *arg)
{
	while (!__atomic_load_n(&L.stop, __ATOMIC_ACQUIRE)) {
		struct pollfd a = {.fd = L.lfd, .events = POLLIN};
		int src, dst;

		if (poll(&a, 1, 50) != 1)
			continue;
		src = accept4(L.lfd, NULL, NULL, SOCK_CLOEXEC);
		dst = src >= 0 ? connect_path(T.stor) : -1;
		while (src >= 0 && dst >= 0 && !__atomic_load_n(&L.stop, __ATOMIC_ACQUIRE)) {
			struct pollfd p[3] = {{.fd = src, .events = POLLIN},
					      {.fd = dst, .events = POLLIN},
					      {.fd = L.cut_fd, .events = POLLIN}};
			char buf[65536];
			ssize_t n;

			if (__atomic_load_n(&L.hold, __ATOMIC_ACQUIRE)) {
				usleep(5000);
				continue;
			}
			if (poll(p, 3, 50) <= 0)
				continue;
			if (p[2].revents) {
				eventfd_t v;

				eventfd_read(L.cut_fd, &v);
				__atomic_fetch_add(&L.cuts, 1, __ATOMIC_RELEASE);
				break;
			}
			for (int i = 0; i < 2; i++) {
				if (!p[i].revents)
					continue;
				n = read(p[i].fd, buf, sizeof(buf));
				if (n <= 0 || write(p[1 - i].fd, buf, (size_t)n) != n)
					goto close;
			}
		}
	close:
		if (src >= 0)
			close(src);
		if (dst >= 0)
			close(dst);
	}
	return NULL;
}

static void link_up(void)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};

	snprintf(L.path, sizeof(L.path), "%s/link.sock", T.dir);
	snprintf(L.uri, sizeof(L.uri), "unix:%s", L.path);
	assert_true(strlen(L.path) < sizeof(sa.sun_path));
	memcpy(sa.sun_path, L.path, strlen(L.path) + 1);
	unlink(L.path);
	L.lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(L.lfd >= 0);
	assert_int_equal(bind(L.lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(listen(L.lfd, 4), 0);
	L.cut_fd = eventfd(0, EFD_CLOEXEC);
	L.stop = false;
	L.hold = false;
	L.cuts = 0;
	assert_int_equal(pthread_create(&L.th, NULL, link_thread, NULL), 0);
	L.up = true;
}

static void link_down(void)
{
	L.up = false;
	__atomic_store_n(&L.stop, true, __ATOMIC_RELEASE);
	pthread_join(L.th, NULL);
	close(L.lfd);
	close(L.cut_fd);
	unlink(L.path);
}

/*
 * The link breaks twice while both daemons live: during the first pass
 * and after it. The source goes on serving, the destination waits, and a
 * new start resumes with the same session (the destination refuses any
 * other for a resumed copy); the last resume sends only what was dirtied.
 */
static void test_mirror_link_cut(void **state)
{
	char params[512];
	json_t *q;

	fe_up();
	fill_image();
	dest_start(true);
	link_up();
	/* a crawl: the first cut lands in the first pass */
	snprintf(params, sizeof(params), "{\"uri\":\"%s\",\"speed\":%u}", L.uri, CRAWL);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	json_decref(mirror_wait(NULL, false, 1));
	eventfd_write(L.cut_fd, 1);
	q = mirror_wait("concluded", false, 0);
	assert_non_null(json_object_get(q, "error"));
	assert_false(json_is_true(json_object_get(q, "ready")));
	json_decref(q);
	write_at(5 * MIB, 8192, 0x3c); /* the source still serves */

	snprintf(params, sizeof(params), "{\"uri\":\"%s\"}", L.uri);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	json_decref(mirror_wait(NULL, true, 0));
	write_at(9 * MIB, 4096, 0x4d);
	eventfd_write(L.cut_fd, 1);
	json_decref(mirror_wait("concluded", false, 0));
	assert_int_equal(__atomic_load_n(&L.cuts, __ATOMIC_ACQUIRE), 2);
	for (uint64_t end = now_ms() + WAIT_MS;; usleep(5000)) { /* it saw the end too */
		q = rpc_ok_at(T.rpc2, "vmig_blk_incoming_query", NULL);
		if (has_status(q, "listening"))
			break;
		if (now_ms() > end)
			fail_msg("the destination did not see the link break");
		json_decref(q);
	}
	assert_non_null(json_object_get(q, "error"));
	json_decref(q);

	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	q = mirror_wait(NULL, true, 0);
	assert_true(field(q, "len") <= 2 * (64u << 10));
	json_decref(q);
	complete_and_check();
	q = rpc_ok_at(T.rpc2, "vmig_blk_incoming_query", NULL);
	assert_int_equal(field(q, "connections"), 3);
	json_decref(q);
	link_down();
	dest_stop(false);
}

/*
 * Write-blocking over a link that stalls (nothing passes, nothing is
 * closed): the guest's writes wait a bounded time, then complete on the
 * source (their blocks stay dirty); once the link moves again the mirror
 * goes on, writes wait for the destination again, and completion makes
 * the images the same. Without the bound, a write would wait the 60 s a
 * round may take, and the request here would time out after 10 s.
 */
static void expect_refused(char *const argv[], const char *why);

static void test_mirror_write_blocking_stall(void **state)
{
	char params[512];
	uint64_t t0;

	expect_refused((char *const[]){(char *)T.bin, "--socket", T.sock2, "--null", "1M",
				       "--write-blocking-stall-ms", "0", NULL},
		       "--write-blocking-stall-ms must be 1..30000");
	assert_int_equal(daemon_stop(), 0);
	T.default_stall = true; /* 1 s, as a user gets it */
	daemon_start();
	T.default_stall = false;
	fe_up();
	dest_start(true);
	link_up();
	snprintf(params, sizeof(params), "{\"uri\":\"%s\",\"copy-mode\":\"write-blocking\"}",
		 L.uri);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	wait_synced();
	__atomic_store_n(&L.hold, true, __ATOMIC_RELEASE);
	t0 = now_ms();
	for (int i = 0; i < 4; i++)
		write_at((uint64_t)(i + 1) * MIB, 4096, (uint8_t)(0x10 + i));
	printf("stalled link: 4 writes completed in %llu ms\n",
	       (unsigned long long)(now_ms() - t0));
	__atomic_store_n(&L.hold, false, __ATOMIC_RELEASE);
	wait_synced();
	write_at(6 * MIB, 4096, 0x77);
	assert_true(dest_has(6 * MIB, 4096, 0x77));
	assert_true(dest_has(1 * MIB, 4096, 0x10));
	complete_and_check();
	link_down();
	dest_stop(false);
}

/*
 * TLS 1.3 with a pre-shared key between the daemons: the mirror works as
 * in the clear; a destination with another key refuses the source, whose
 * mirror ends saying why; a plain source cannot feed a TLS destination.
 */
static void write_psk(const char *sub, const char *key)
{
	char dir[400], path[420];
	FILE *f;

	snprintf(dir, sizeof(dir), "%s/%s", T.dir, sub);
	mkdir(dir, 0700);
	snprintf(path, sizeof(path), "%s/keys.psk", dir);
	f = fopen(path, "w");
	assert_non_null(f);
	fprintf(f, "qemu:%s\n", key);
	fclose(f);
}

static void test_mirror_tls(void **state)
{
	char params[512], cli[512], srv[512], bad[512];
	json_t *q;
	const char *e;

	write_psk("psk", "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff");
	write_psk("psk-bad", "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100");
	snprintf(cli, sizeof(cli), "psk,dir=%s/psk,endpoint=client", T.dir);
	snprintf(srv, sizeof(srv), "psk,dir=%s/psk,endpoint=server", T.dir);
	snprintf(bad, sizeof(bad), "psk,dir=%s/psk-bad,endpoint=server", T.dir);
	assert_int_equal(daemon_stop(), 0);
	daemon_start_tls(cli);
	snprintf(params, sizeof(params), "{\"uri\":\"%s\"}", T.uri);

	/* another key: refused, and the source says it was TLS */
	dest_start_tls(true, bad);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	q = mirror_wait("concluded", false, 0);
	e = json_string_value(json_object_get(q, "error"));
	if (!e || !strstr(e, "TLS"))
		fail_msg("mirror with the wrong key: %s", e ? e : "no error");
	json_decref(q);
	json_decref(rpc_ok("vmig_blk_mirror_cancel", NULL));
	dest_stop(false);

	/* the same key: a whole mirror, while the guest writes */
	fe_up();
	dest_start_tls(true, srv);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	json_decref(mirror_wait(NULL, true, 0));
	write_at(2 * MIB, 8192, 0x61);
	complete_and_check();
	dest_stop(false);

	/* a source in the clear: the TLS destination refuses it */
	assert_int_equal(daemon_stop(), 0);
	daemon_start();
	dest_start_tls(true, srv);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	q = mirror_wait("concluded", false, 0);
	assert_non_null(json_object_get(q, "error"));
	json_decref(q);
	json_decref(rpc_ok("vmig_blk_mirror_cancel", NULL));
	q = rpc_ok_at(T.rpc2, "vmig_blk_incoming_query", NULL);
	assert_true(has_status(q, "listening"));
	assert_int_equal(field(q, "received"), 0);
	json_decref(q);
	dest_stop(false);
}

/* ---- post-copy storage ---- */

#define PC_STRIDE (256u << 10) /* one written block every 4 granules */
#define PC_BLOCKS (IMG_SIZE / PC_STRIDE)

/* Read len bytes at off through the front-end; every byte fill? */
static bool read_is(uint64_t off, uint32_t len, uint8_t fill)
{
	memset(gp(G_DATA), ~fill, len);
	assert_int_equal(request(VIRTIO_BLK_T_IN, off / 512, G_DATA, len), VIRTIO_BLK_S_OK);
	for (uint32_t i = 0; i < len; i++)
		if (((uint8_t *)gp(G_DATA))[i] != fill)
			return false;
	return true;
}

static uint64_t incoming_pc(const char *key)
{
	json_t *q = rpc_ok_at(T.rpc2, "vmig_blk_incoming_query", NULL);
	uint64_t v = field(json_object_get(q, "postcopy"), key);

	json_decref(q);
	return v;
}

/* Swap which daemon the front-end talks to (the VM moves). */
static void fe_to(const char *sock)
{
	static char saved[300];

	if (!sock && !saved[0])
		return; /* never swapped */
	if (!saved[0])
		memcpy(saved, T.sock, sizeof(saved));
	memcpy(T.sock, sock ? sock : saved, sizeof(T.sock));
}

/* A run of bytes the guest wrote on the destination after the switch. */
struct guest_write {
	uint64_t off, len;
	uint8_t byte;
};

/* The destination's image must be the source's, with the guest's writes
 * since the switch on top. */
static void expect_destination_image(const struct guest_write *w, unsigned n)
{
	uint8_t *expect = malloc(IMG_SIZE), *got = malloc(IMG_SIZE);
	int fd;

	assert_true(expect && got);
	fd = open(T.image, O_RDONLY | O_CLOEXEC);
	assert_int_equal(pread(fd, expect, IMG_SIZE, 0), IMG_SIZE);
	close(fd);
	for (unsigned i = 0; i < n; i++)
		memset(expect + w[i].off, w[i].byte, w[i].len);
	fd = open(T.image2, O_RDONLY | O_CLOEXEC);
	assert_int_equal(pread(fd, got, IMG_SIZE, 0), IMG_SIZE);
	close(fd);
	for (uint64_t off = 0; off < IMG_SIZE; off += 4096)
		if (memcmp(expect + off, got + off, 4096))
			fail_msg("the destination differs at %llu", (unsigned long long)off);
	free(expect);
	free(got);
}

/* The guest wrote one block every PC_STRIDE (block i holds i + 1), and a
 * mirror to uri is crawling through them: the first has been sent. */
static void pc_mirror_start(const char *uri)
{
	char params[512];

	fe_up();
	for (unsigned i = 0; i < PC_BLOCKS; i++)
		write_at((uint64_t)i * PC_STRIDE, 8192, (uint8_t)(i + 1));
	snprintf(params, sizeof(params), "{\"uri\":\"%s\",\"speed\":%u}", uri, CRAWL);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	json_decref(mirror_wait(NULL, false, PC_STRIDE));
}

/*
 * Post-copy storage. The source copies at a crawl (CRAWL) and the VM stops
 * with most of the disk not sent; the switch hands the disk over at once.
 * On the destination the guest then reads a block the background copy is
 * far from (it is fetched on demand, ahead of the push), writes part of a
 * missing granule (the rest of the granule arrives first) and a whole one
 * (the push must not overwrite it later). Once the push runs at full speed
 * the post-copy ends, the state file goes, and the destination's image is
 * the source's plus the guest's new writes. The source, its disk handed
 * over, refuses to serve its guest again.
 */
static void test_mirror_postcopy(void **state)
{
	const struct guest_write wrote[] = {
	    {(uint64_t)(PC_BLOCKS - 2) * PC_STRIDE + 4096, 4096, 0xee},
	    {(uint64_t)(PC_BLOCKS - 3) * PC_STRIDE, GRAN, 0xdd},
	};
	char statefile[320];
	uint16_t want;
	json_t *q;

	dest_start(true);
	snprintf(statefile, sizeof(statefile), "%s.vmig-postcopy", T.image2);
	q = rpc_ok_at(T.rpc2, "vmig_blk_incoming_query", NULL);
	assert_true(json_is_true(json_object_get(q, "postcopy-capable")));
	json_decref(q);
	pc_mirror_start(T.uri);
	/* the guest still runs here: no switch */
	rpc_fails("vmig_blk_mirror_start_postcopy", NULL, RPC_SERVER_ERROR);
	fe_down(); /* the VM stopped on the source */
	json_decref(rpc_ok("vmig_blk_mirror_start_postcopy", NULL));
	for (uint64_t end = now_ms() + WAIT_MS;;) {
		q = rpc_ok("vmig_blk_mirror_query", NULL);
		if (json_is_true(json_object_get(q, "postcopy")))
			break;
		assert_true(now_ms() < end && !has_status(q, "concluded"));
		json_decref(q);
		usleep(5000);
	}
	assert_false(has_status(q, "concluded"));
	json_decref(q);
	rpc_fails("vmig_blk_mirror_cancel", NULL, RPC_SERVER_ERROR);
	rpc_fails("vmig_blk_mirror_complete", NULL, RPC_SERVER_ERROR);
	/* The source says post-copy once the switch went out; the destination
	 * takes it (its state file first) when it reads it. */
	incoming_wait("postcopy-active");
	assert_int_equal(access(statefile, F_OK), 0);

	/* the VM runs on the destination */
	fe_to(T.sock2);
	fe_up();
	assert_true(read_is((uint64_t)(PC_BLOCKS - 1) * PC_STRIDE, 8192, PC_BLOCKS));
	assert_true(incoming_pc("urgent-requests") >= 1);
	assert_true(incoming_pc("held-requests") >= 1);
	/* part of a missing granule, then a whole one */
	for (unsigned i = 0; i < 2; i++)
		write_at(wrote[i].off, wrote[i].len, wrote[i].byte);
	assert_true(read_is((uint64_t)(PC_BLOCKS - 2) * PC_STRIDE, 4096, PC_BLOCKS - 1));
	assert_true(read_is((uint64_t)(PC_BLOCKS - 2) * PC_STRIDE + 4096, 4096, 0xee));
	q = rpc_ok("vmig_blk_mirror_query", NULL);
	assert_true(field(q, "postcopy-requested-bytes") >= GRAN);
	assert_false(has_status(q, "concluded")); /* the push is far from done */
	json_decref(q);

	/* the rest at full speed: the post-copy ends */
	json_decref(rpc_ok("vmig_blk_mirror_set_speed", "{\"speed\":0}"));
	q = mirror_wait("concluded", false, 0);
	if (json_object_get(q, "error"))
		fail_msg("post-copy failed: %s", json_string_value(json_object_get(q, "error")));
	json_decref(q);
	for (uint64_t end = now_ms() + WAIT_MS;;) {
		q = rpc_ok_at(T.rpc2, "vmig_blk_incoming_query", NULL);
		if (has_status(q, "completed"))
			break;
		assert_true(now_ms() < end);
		json_decref(q);
		usleep(5000);
	}
	json_decref(q);
	assert_int_equal(access(statefile, F_OK), -1);
	for (unsigned i = 0; i < PC_BLOCKS - 3; i++)
		assert_true(read_is((uint64_t)i * PC_STRIDE, 8192, (uint8_t)(i + 1)));
	assert_true(read_is((uint64_t)(PC_BLOCKS - 3) * PC_STRIDE, GRAN, 0xdd));
	fe_down();
	fe_to(NULL);

	expect_destination_image(wrote, 2);
	dest_stop(false);

	/* The source handed its disk over: its guest may not run there again. */
	assert_int_not_equal(fe_up_answer(), 0);
	want = post(VIRTIO_BLK_T_OUT, 0, G_DATA, 4096);
	usleep(300000);
	assert_false(used(want));
	q = rpc_ok("vhost_get_controllers", NULL);
	assert_false(json_is_true(json_object_get(
	    json_array_get(json_object_get(json_array_get(q, 0), "queues"), 0), "started")));
	json_decref(q);
	fe_down();
	/* a fresh source for the cases after this one */
	assert_int_equal(daemon_stop(), 0);
	daemon_start();
}

/* The source copied a little to uri, then the VM stopped there and the
 * disk switched to post-copy; the front-end is the destination's now. */
static void postcopy_switched(const char *uri)
{
	json_t *q;

	pc_mirror_start(uri);
	fe_down();
	json_decref(rpc_ok("vmig_blk_mirror_start_postcopy", NULL));
	for (uint64_t end = now_ms() + WAIT_MS;; usleep(5000)) {
		q = rpc_ok("vmig_blk_mirror_query", NULL);
		if (json_is_true(json_object_get(q, "postcopy")))
			break;
		assert_true(now_ms() < end && !has_status(q, "concluded"));
		json_decref(q);
	}
	json_decref(q);
	fe_to(T.sock2);
	fe_up();
}

/* Wait for a posted request; its status. */
static uint8_t wait_used(uint16_t want)
{
	for (uint64_t end = now_ms() + WAIT_MS; !used(want); usleep(100))
		if (now_ms() > end)
			fail_msg("a held request never completed");
	return *(volatile uint8_t *)gp(G_STATUS);
}

/*
 * Post-copy storage through faults, as RAM post-copy recovers: the link is
 * cut (only the requests that need a missing block wait; a new start
 * resumes, the destination says what it still lacks and the waiting read
 * completes), then the destination daemon is killed (-9) and started again
 * with the same arguments: it finds its state file, serves what it has at
 * once, keeps the guest's acknowledged writes; then the source daemon is
 * killed and started again, and finishes from the destination's map. The
 * image is the source's plus the guest's writes.
 */
static void test_mirror_postcopy_faults(void **state)
{
	const uint64_t last = (uint64_t)(PC_BLOCKS - 1) * PC_STRIDE;
	const uint64_t wrote = (uint64_t)(PC_BLOCKS - 2) * PC_STRIDE + 4096;
	char params[512], statefile[320];
	uint16_t want;
	json_t *q;

	dest_start(true);
	snprintf(statefile, sizeof(statefile), "%s.vmig-postcopy", T.image2);
	link_up();
	postcopy_switched(L.uri);
	assert_true(read_is(last, 8192, PC_BLOCKS));
	write_at(wrote, 4096, 0xee); /* acknowledged here: must survive all below */

	/* The cut. */
	eventfd_write(L.cut_fd, 1);
	q = mirror_wait("concluded", false, 0);
	assert_non_null(json_object_get(q, "error"));
	assert_true(json_is_true(json_object_get(q, "postcopy")));
	json_decref(q);
	incoming_wait("postcopy-paused");
	assert_true(read_is(last, 8192, PC_BLOCKS)); /* here: served */
	want = post(VIRTIO_BLK_T_IN, (PC_BLOCKS - 5) * PC_STRIDE / 512, G_DATA, 8192);
	usleep(200000);
	assert_false(used(want)); /* not here: waits */
	/* resumed at a crawl: the waiting read must be asked for on the new
	 * connection, not found by the background push */
	snprintf(params, sizeof(params), "{\"uri\":\"%s\",\"speed\":4096}", L.uri);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	assert_int_equal(wait_used(want), VIRTIO_BLK_S_OK);
	for (unsigned i = 0; i < 8192; i++)
		if (((uint8_t *)gp(G_DATA))[i] != PC_BLOCKS - 4)
			fail_msg("the read after the resume returned a wrong byte at %u", i);
	q = rpc_ok("vmig_blk_mirror_query", NULL);
	assert_true(json_is_true(json_object_get(q, "postcopy")));
	assert_false(has_status(q, "concluded")); /* the push crawls on */
	json_decref(q);

	/* The destination daemon dies, and comes back on its state file. */
	dest_stop(true);
	json_decref(mirror_wait("concluded", false, 0));
	fe_down();
	dest_start(false);
	q = rpc_ok_at(T.rpc2, "vmig_blk_incoming_query", NULL);
	assert_true(has_status(q, "postcopy-paused"));
	assert_true(field(json_object_get(q, "postcopy"), "missing") > 0);
	json_decref(q);
	fe_up();
	assert_true(read_is(wrote, 4096, 0xee));
	assert_true(read_is(last, 8192, PC_BLOCKS));
	json_decref(rpc_ok("vmig_blk_mirror_start", params));

	/* The source daemon dies too: started again, its state file says it
	 * handed the disk over, so it serves the post-copy and never the
	 * guest, and a new start resumes from the destination's map (its own
	 * bitmap died with it). A read waiting meanwhile completes. */
	kill(T.pid, SIGKILL);
	waitpid(T.pid, NULL, 0);
	incoming_wait("postcopy-paused");
	want = post(VIRTIO_BLK_T_IN, (PC_BLOCKS - 9) * PC_STRIDE / 512, G_DATA, 8192);
	fe_to(NULL); /* the source's socket, for its daemon */
	daemon_start();
	fe_to(T.sock2);
	q = rpc_ok("vmig_blk_mirror_query", NULL);
	assert_true(has_status(q, "concluded"));
	assert_true(json_is_true(json_object_get(q, "postcopy")));
	assert_non_null(strstr(json_string_value(json_object_get(q, "error")), "restarted"));
	json_decref(q);
	rpc_fails("vmig_blk_mirror_cancel", NULL, RPC_SERVER_ERROR);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	assert_int_equal(wait_used(want), VIRTIO_BLK_S_OK);
	for (unsigned i = 0; i < 8192; i++)
		if (((uint8_t *)gp(G_DATA))[i] != PC_BLOCKS - 8)
			fail_msg("the read after the source's restart got a wrong byte at %u", i);
	json_decref(rpc_ok("vmig_blk_mirror_set_speed", "{\"speed\":0}"));
	q = mirror_wait("concluded", false, 0);
	if (json_object_get(q, "error"))
		fail_msg("post-copy failed: %s", json_string_value(json_object_get(q, "error")));
	json_decref(q);
	incoming_wait("completed");
	assert_int_equal(access(statefile, F_OK), -1);
	fe_down();
	fe_to(NULL);
	link_down();

	expect_destination_image(&(struct guest_write){wrote, 4096, 0xee}, 1);
	dest_stop(false);
	assert_int_equal(daemon_stop(), 0); /* a fresh source for the next case */
	daemon_start();
}

/*
 * The switch goes out but the destination cannot take it (its state file
 * cannot be made: a directory is in the way), so it never serves the disk,
 * and the source, fenced from the moment the switch went out, would stay
 * so. Resumed, the destination answers that it never switched
 * (NOT_SWITCHED): the source takes the disk back (the fence and its state
 * file go, its guest is served again), and a new mirror copies the whole
 * disk, its guest's last write included, and completes as any mirror.
 */
static void test_mirror_postcopy_not_taken(void **state)
{
	char params[512], in_way[360], src_state[320];
	json_t *q;

	dest_start(true);
	snprintf(in_way, sizeof(in_way), "%s.vmig-postcopy.new", T.image2);
	assert_int_equal(mkdir(in_way, 0700), 0);
	snprintf(src_state, sizeof(src_state), "%s.vmig-postcopy", T.image);
	pc_mirror_start(T.uri);
	fe_down();
	json_decref(rpc_ok("vmig_blk_mirror_start_postcopy", NULL));
	q = mirror_wait("concluded", false, 0);
	assert_true(json_is_true(json_object_get(q, "postcopy")));
	assert_non_null(strstr(json_string_value(json_object_get(q, "error")), "state file"));
	json_decref(q);
	/* fenced: the switch went out */
	assert_int_equal(access(src_state, F_OK), 0);
	assert_int_not_equal(fe_up_answer(), 0);
	fe_down();
	q = rpc_ok_at(T.rpc2, "vmig_blk_incoming_query", NULL);
	assert_false(has_status(q, "postcopy-active") || has_status(q, "postcopy-paused"));
	json_decref(q);

	/* resumed: the destination never switched, and says so */
	snprintf(params, sizeof(params), "{\"uri\":\"%s\",\"speed\":%u}", T.uri, CRAWL);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	q = mirror_wait("concluded", false, 0);
	if (!json_is_true(json_object_get(q, "postcopy-not-taken"))) {
		const char *why = json_string_value(json_object_get(q, "error"));

		fail_msg("the resumed mirror did not hear that the switch was not taken: %s",
			 why ? why : "(no error)");
	}
	assert_false(json_is_true(json_object_get(q, "postcopy")));
	assert_non_null(strstr(json_string_value(json_object_get(q, "error")), "never took"));
	json_decref(q);
	assert_int_equal(access(src_state, F_OK), -1);
	fe_up(); /* the guest is served here again */
	write_at(0, 8192, 0x5a);
	assert_true(read_is(0, 8192, 0x5a));

	/* a new mirror copies every block (it cannot know which arrived) */
	assert_int_equal(rmdir(in_way), 0);
	snprintf(params, sizeof(params), "{\"uri\":\"%s\"}", T.uri);
	json_decref(rpc_ok("vmig_blk_mirror_start", params));
	json_decref(mirror_wait(NULL, true, 0));
	q = rpc_ok("vmig_blk_mirror_query", NULL);
	assert_true(field(q, "offset") >= IMG_SIZE);
	json_decref(q);
	complete_and_check();
	dest_stop(false);
}

/* A vmig-blk that must refuse to start, saying why. */
static void expect_refused(char *const argv[], const char *why)
{
	char log[320], text[2048] = "";
	int st, fd;
	pid_t pid;

	snprintf(log, sizeof(log), "%s/refused.log", T.dir);
	unlink(log);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		int lfd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);

		dup2(lfd, 1);
		dup2(lfd, 2);
		execv(T.bin, argv);
		_exit(127);
	}
	assert_int_equal(waitpid(pid, &st, 0), pid);
	fd = open(log, O_RDONLY | O_CLOEXEC);
	assert_true(fd >= 0);
	assert_true(read(fd, text, sizeof(text) - 1) >= 0);
	close(fd);
	unlink(log);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 1 || !strstr(text, why))
		fail_msg("expected a refusal (%s), got status %d: %s", why, st, text);
}

/* A source of the test's own, to send what a real one would not: the
 * storage stream's bytes as docs/storage-migration.md lays them out. */
static const uint8_t fake_session[16] = {0x5e, 0x55, 0x10, 0x4e};

static void raw_put(int fd, uint8_t type, uint8_t flags, const void *p, uint32_t len)
{
	uint8_t h[8] = {type, flags, 0, 0};

	memcpy(h + 4, &len, 4); /* the tests run little-endian */
	assert_int_equal(write(fd, h, 8), 8);
	if (len)
		assert_int_equal(write(fd, p, len), (ssize_t)len);
}

static int fake_source_g(uint16_t flags, uint32_t gran)
{
	uint8_t pre[48] = "VMIGBLKS";
	uint32_t version = 1, bs = 512;
	uint64_t size = IMG_SIZE, end = now_ms() + WAIT_MS;
	int fd;

	memcpy(pre + 8, &version, 4);
	memcpy(pre + 12, &flags, 2);
	memcpy(pre + 16, &size, 8);
	memcpy(pre + 24, &bs, 4);
	memcpy(pre + 28, &gran, 4);
	memcpy(pre + 32, fake_session, 16);
	while ((fd = connect_path(T.stor)) < 0 && now_ms() < end)
		usleep(10000);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, pre, sizeof(pre)), sizeof(pre));
	return fd;
}

static int fake_source(uint16_t flags)
{
	return fake_source_g(flags, GRAN);
}

/* MISSING for every granule of the disk at granularity gran. */
static void raw_missing_all(int fd, uint32_t gran)
{
	size_t words = (IMG_SIZE / gran + 63) / 64;
	uint8_t *rec = calloc(1, 8 + words * 8);

	assert_non_null(rec);
	for (size_t g = 0; g < IMG_SIZE / gran; g++) /* no bit past the last granule */
		rec[8 + g / 8] |= (uint8_t)(1u << (g % 8));
	raw_put(fd, 0x06, 0, rec, (uint32_t)(8 + words * 8));
	free(rec);
}

static void raw_data(int fd, uint64_t off, uint32_t len, uint8_t fill)
{
	uint8_t *b = malloc(8 + len);

	assert_non_null(b);
	memcpy(b, &off, 8);
	memset(b + 8, fill, len);
	raw_put(fd, 0x01, 0, b, 8 + len);
	free(b);
}

/* The next record on the return path: its type, and a range's payload. */
static uint8_t raw_get(int fd, uint64_t range[2], char *text, size_t textlen)
{
	struct pollfd pf = {.fd = fd, .events = POLLIN};
	uint8_t h[8], p[256];
	uint32_t len;

	assert_int_equal(poll(&pf, 1, WAIT_MS), 1);
	assert_int_equal(recv(fd, h, 8, MSG_WAITALL), 8);
	memcpy(&len, h + 4, 4);
	assert_true(len <= sizeof(p));
	if (len)
		assert_int_equal(recv(fd, p, len, MSG_WAITALL), (ssize_t)len);
	if (range && len == 16)
		memcpy(range, p, 16);
	if (text)
		snprintf(text, textlen, "%.*s", (int)len, (const char *)p);
	return h[0];
}

/*
 * The destination's side of post-copy against a source of the test's own:
 * a guest write to a missing granule waits, and the destination asks for
 * exactly that granule (READ_REQ); once it arrived the write goes on, and
 * the same granule sent again (a duplicate, or a stale background copy)
 * must not undo the guest's write. A source that ends the stream with
 * granules still missing is refused, and the requests for them wait on.
 */
static void test_incoming_postcopy(void **state)
{
	uint64_t all[IMG_SIZE / GRAN / 64], range[2];
	char statefile[320], text[256];
	uint16_t want;
	uint8_t type;
	json_t *q;
	int fd;

	dest_start(true);
	snprintf(statefile, sizeof(statefile), "%s.vmig-postcopy", T.image2);
	fd = fake_source(0x0001);	/* FULL */
	memset(all, 0xff, sizeof(all)); /* nothing was sent before the switch */
	{
		uint8_t rec[8 + sizeof(all)];
		uint64_t first = 0;

		memcpy(rec, &first, 8);
		memcpy(rec + 8, all, sizeof(all));
		raw_put(fd, 0x06, 0, rec, sizeof(rec)); /* MISSING */
	}
	raw_put(fd, 0x07, 0, NULL, 0); /* POSTCOPY */

	fe_to(T.sock2);
	fe_up();
	memset(gp(G_DATA), 0xb5, GRAN);
	want = post(VIRTIO_BLK_T_OUT, 5 * GRAN / 512, G_DATA, GRAN);
	assert_int_equal(raw_get(fd, range, NULL, 0), 0x43); /* READ_REQ */
	assert_int_equal(range[0], 5 * GRAN);
	assert_int_equal(range[1], GRAN);
	usleep(100000);
	assert_false(used(want)); /* not before the granule is here */
	raw_data(fd, 5 * GRAN, GRAN, 0xa5);
	for (uint64_t end = now_ms() + WAIT_MS; !used(want);)
		assert_true(now_ms() < end);
	assert_int_equal(*(volatile uint8_t *)gp(G_STATUS), VIRTIO_BLK_S_OK);
	raw_data(fd, 5 * GRAN, GRAN, 0xa5); /* again: must change nothing */
	raw_data(fd, 6 * GRAN, GRAN, 0xa6); /* applied after it, in stream order */
	assert_true(read_is(6 * GRAN, 4096, 0xa6));
	assert_true(read_is(5 * GRAN, GRAN, 0xb5));
	assert_true(dest_has(5 * GRAN, 4096, 0xb5));

	/* The end, with granules still missing: refused, and they stay so. */
	raw_put(fd, 0x04, 0, NULL, 0);				       /* FLUSH */
	raw_put(fd, 0x05, 0, NULL, 0);				       /* EOS */
	/* (the read of granule 6 may have asked for it before it came) */
	while ((type = raw_get(fd, NULL, text, sizeof(text))) == 0x43)
		;
	assert_int_equal(type, 0x42); /* ERROR */
	assert_non_null(strstr(text, "still missing"));
	close(fd);
	want = post(VIRTIO_BLK_T_IN, 9 * GRAN / 512, G_DATA, 4096);
	usleep(200000);
	assert_false(used(want));
	q = rpc_ok_at(T.rpc2, "vmig_blk_incoming_query", NULL);
	assert_true(has_status(q, "postcopy-paused"));
	assert_int_equal(field(json_object_get(q, "postcopy"), "missing"), IMG_SIZE - 2 * GRAN);
	json_decref(q);
	assert_int_equal(access(statefile, F_OK), 0);

	/* Once the guest runs here, only a stream that resumes the post-copy
	 * (flag POSTCOPY, the same session) is let in: a fresh full copy
	 * would overwrite what the guest wrote. */
	fd = fake_source(0x0001);
	assert_int_equal(raw_get(fd, NULL, text, sizeof(text)), 0x42);
	assert_non_null(strstr(text, "post-copy"));
	close(fd);
	fe_down();
	fe_to(NULL);
	dest_stop(true);

	/* The image is not whole: only a destination resumes it, and a state
	 * file that does not describe it refuses the start. */
	expect_refused(
	    (char *const[]){(char *)T.bin, "--socket", T.sock2, "--file", T.image2, NULL},
	    "not whole");
	{ /* --postcopy-state names the file */
		char moved[340];

		snprintf(moved, sizeof(moved), "%s/elsewhere.state", T.dir);
		assert_int_equal(rename(statefile, moved), 0);
		expect_refused((char *const[]){(char *)T.bin, "--socket", T.sock2, "--file",
					       T.image2, "--postcopy-state", moved, NULL},
			       "elsewhere.state exists");
		assert_int_equal(rename(moved, statefile), 0);
	}
	assert_int_equal(truncate(statefile, 100), 0);
	expect_refused((char *const[]){(char *)T.bin, "--socket", T.sock2, "--file", T.image2,
				       "--incoming", T.uri, NULL},
		       "does not describe this disk");
	unlink(statefile);
}

/*
 * Peers that change their mind: a switch that never completed (MISSING,
 * then the connection ends) counts for nothing on the next connection,
 * whose map may have another granularity (sized by it, not the first); and
 * once switched, a resumed post-copy must keep the switch's granularity.
 */
static void test_incoming_postcopy_peers(void **state)
{
	char statefile[320], text[256];
	uint8_t type;
	int fd;

	dest_start(true);
	snprintf(statefile, sizeof(statefile), "%s.vmig-postcopy", T.image2);
	fd = fake_source_g(0x0001, 1u << 20); /* 1 MiB granules: a small map */
	raw_missing_all(fd, 1u << 20);
	close(fd);
	incoming_wait("listening");
	fd = fake_source_g(0x0001, 4096); /* 4 KiB granules: 64 times the map */
	raw_missing_all(fd, 4096);
	raw_put(fd, 0x07, 0, NULL, 0); /* POSTCOPY */
	incoming_wait("postcopy-active");
	raw_data(fd, 0, 4096, 0x11);
	close(fd);
	incoming_wait("postcopy-paused");
	{
		json_t *q = rpc_ok_at(T.rpc2, "vmig_blk_incoming_query", NULL);

		assert_int_equal(field(json_object_get(q, "postcopy"), "missing"), IMG_SIZE - 4096);
		json_decref(q);
	}
	fd = fake_source_g(0x0002, GRAN); /* resumed, other granules */
	while ((type = raw_get(fd, NULL, text, sizeof(text))) != 0x42)
		;
	assert_non_null(strstr(text, "granularity"));
	close(fd);
	dest_stop(true);
	unlink(statefile);
}

/* ---- setup ---- */

/* Each case starts with tracking off, whatever the one before left. */
static int case_setup(void **state)
{
	json_t *r = rpc_raw("dirty_bitmap_stop", NULL);

	json_decref(r);
	return r ? 0 : -1;
}

/*
 * After each case, whatever state a failed one left: the front-end and
 * the link close, a destination daemon still running is killed, and the
 * source daemon is started afresh without post-copy state files (a failed
 * post-copy case may leave it fenced), so that one failure reports one failure, not every case
 * after it. The source must still end cleanly.
 */
static int case_teardown(void **state)
{
	int r;

	if (T.sock_fd >= 0)
		fe_down();
	fe_to(NULL);
	if (L.up)
		link_down();
	if (T.pid2 > 0) {
		kill(T.pid2, SIGKILL);
		waitpid(T.pid2, NULL, 0);
		T.pid2 = -1;
	}
	r = daemon_stop();
	if (r)
		fprintf(stderr, "the source daemon did not exit cleanly\n");
	/* a post-copy cut short leaves its state files (the source's fences
	 * its disk): the images are the cases' scratch, so they go */
	for (int i = 0; i < 2; i++) {
		char path[340];

		snprintf(path, sizeof(path), "%s.vmig-postcopy", i ? T.image2 : T.image);
		unlink(path);
		strcat(path, ".new");
		rmdir(path);
	}
	daemon_start();
	return r;
}

static int group_setup(void **state)
{
	const char *tmpdir = getenv("TMPDIR");
	int fd;

	snprintf(T.dir, sizeof(T.dir), "%s/vhost-dirty.XXXXXX",
		 tmpdir && strlen(tmpdir) < 100 ? tmpdir : "/tmp");
	if (!mkdtemp(T.dir))
		return -1;
	snprintf(T.sock, sizeof(T.sock), "%s/vblk.sock", T.dir);
	snprintf(T.rpc, sizeof(T.rpc), "%s/vblk.rpc", T.dir);
	snprintf(T.image, sizeof(T.image), "%s/disk.img", T.dir);
	snprintf(T.log, sizeof(T.log), "%s/daemon.log", T.dir);
	snprintf(T.sock2, sizeof(T.sock2), "%s/vblk2.sock", T.dir);
	snprintf(T.rpc2, sizeof(T.rpc2), "%s/vblk2.rpc", T.dir);
	snprintf(T.image2, sizeof(T.image2), "%s/disk2.img", T.dir);
	snprintf(T.log2, sizeof(T.log2), "%s/daemon2.log", T.dir);
	snprintf(T.stor, sizeof(T.stor), "%s/storage.sock", T.dir);
	snprintf(T.uri, sizeof(T.uri), "unix:%s", T.stor);
	fd = open(T.image, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0 || ftruncate(fd, IMG_SIZE) < 0)
		return -1;
	close(fd);
	T.gm_fd = memfd_create("dirty-guest", MFD_CLOEXEC);
	if (T.gm_fd < 0 || ftruncate(T.gm_fd, GM_SIZE) < 0)
		return -1;
	T.gm = mmap(NULL, GM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, T.gm_fd, 0);
	if (T.gm == MAP_FAILED)
		return -1;
	signal(SIGPIPE, SIG_IGN);
	daemon_start();
	return 0;
}

static int group_teardown(void **state)
{
	int r = daemon_stop();

	if (r == 0) {
		unlink(T.image);
		unlink(T.log);
		unlink(T.image2);
		unlink(T.log2);
		unlink(T.stor);
		for (int i = 0; i < 2; i++) {
			char path[420];

			snprintf(path, sizeof(path), "%s/%s/keys.psk", T.dir,
				 i ? "psk-bad" : "psk");
			unlink(path);
			*strrchr(path, '/') = '\0';
			rmdir(path);
		}
		rmdir(T.dir);
	} else {
		fprintf(stderr, "the daemon did not exit cleanly; files kept in %s\n", T.dir);
	}
	return r;
}

int main(int argc, char **argv)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_rpc_errors, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_rpc_framing, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_rpc_clients_misbehave, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_requests_marked, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_take_bounds, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_race_take, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_upgrade_all_dirty, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_upgrade_checks_arguments, case_setup,
					    case_teardown),
	    cmocka_unit_test_setup_teardown(test_mirror_while_writing, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_mirror_resumes, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_incoming_holds_requests, case_setup,
					    case_teardown),
	    cmocka_unit_test_setup_teardown(test_mirror_link_cut, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_mirror_tls, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_mirror_write_blocking, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_mirror_write_blocking_stall, case_setup,
					    case_teardown),
	    cmocka_unit_test_setup_teardown(test_mirror_postcopy, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_incoming_postcopy, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_mirror_postcopy_faults, case_setup, case_teardown),
	    cmocka_unit_test_setup_teardown(test_incoming_postcopy_peers, case_setup,
					    case_teardown),
	    cmocka_unit_test_setup_teardown(test_mirror_postcopy_not_taken, case_setup,
					    case_teardown),
	};

	if (argc != 2 && argc != 3) {
		fprintf(stderr, "usage: %s PATH-TO-VMIG-BLK [TEST-NAME-PATTERN]\n", argv[0]);
		return 2;
	}
	if (argc == 3)
		cmocka_set_test_filter(argv[2]);
	T.bin = argv[1];
	T.pid = T.pid2 = -1;
	T.sock_fd = T.kick = T.call = T.err = -1;
	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
