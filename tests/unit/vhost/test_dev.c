// SPDX-License-Identifier: MIT
/*
 * Unit tests of vhost-user message handling (lib/vhost/dev.c): the checks
 * every message passes before its handler (id, version, size, fd count,
 * negotiated protocol feature, ring index), fd ownership (a rejected
 * message's fds are closed), REPLY_ACK, order independence of ring setup,
 * GET_VRING_BASE stopping the ring, and the in-flight fd round trip. The
 * device's queue start/stop are stubs that count calls.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <sys/eventfd.h>
#include <cmocka.h>

#include "harness.h"

struct stub {
	int starts;
	int stops;
	struct vhost_inflight_recovery last;
};

static void stub_config(void *opaque, uint8_t *cfg)
{
	for (unsigned i = 0; i < VHOST_USER_CONFIG_MAX; i++)
		cfg[i] = (uint8_t)i;
}

static int stub_start(void *opaque, struct vhost_vring *vr)
{
	struct stub *s = opaque;

	s->starts++;
	s->last = vr->recovery;
	return 0;
}

static void stub_stop(void *opaque, struct vhost_vring *vr)
{
	((struct stub *)opaque)->stops++;
}

static const struct vhost_dev_ops stub_ops = {stub_config, stub_start, stub_stop};

static struct vhost_msg msg(uint32_t req, uint32_t size, const void *payload)
{
	struct vhost_msg m;

	memset(&m, 0, sizeof(m));
	m.hdr.request = req;
	m.hdr.flags = VHOST_USER_VERSION;
	m.hdr.size = size;
	if (payload)
		memcpy(&m.p, payload, size);
	for (unsigned i = 0; i < VHOST_USER_MAX_FDS; i++)
		m.fds[i] = -1;
	return m;
}

static int send_u64(struct vhost_dev *d, uint32_t req, uint64_t v, struct vhost_msg *reply)
{
	struct vhost_msg m = msg(req, 8, &v);

	return vhost_dev_handle(d, &m, reply);
}

static int send_state(struct vhost_dev *d, uint32_t req, uint32_t idx, uint32_t num,
		      struct vhost_msg *reply)
{
	struct vhost_user_vring_state st = {idx, num};
	struct vhost_msg m = msg(req, sizeof(st), &st);

	return vhost_dev_handle(d, &m, reply);
}

static bool fd_is_open(int fd)
{
	return fcntl(fd, F_GETFD) >= 0;
}

static void test_rejected_before_handler(void **state)
{
	struct vhost_dev d;
	struct stub s = {0};
	struct vhost_msg m, reply;
	int efd = eventfd(0, 0);

	vhost_dev_init(&d, 2, 0, &stub_ops, &s);
	m = msg(VHOST_USER_SET_FEATURES, 4, NULL); /* needs 8 bytes */
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), -EPROTO);
	m = msg(VHOST_USER_SET_VRING_NUM, 8, NULL); /* takes no fd */
	m.fds[0] = efd;
	m.nfds = 1;
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), -EPROTO);
	assert_false(fd_is_open(efd)); /* closed, not leaked */
	m = msg(200, 0, NULL);
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), -EPROTO);
	m = msg(VHOST_USER_GET_FEATURES, 0, NULL);
	m.hdr.flags = 2; /* wrong version */
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), -EPROTO);
	assert_int_equal(send_state(&d, VHOST_USER_SET_VRING_NUM, 2, 8, &reply), -EPROTO);
	assert_int_equal(send_u64(&d, VHOST_USER_SET_VRING_CALL, 0x1ff00, &reply), -EPROTO);
	/* GET_CONFIG before PROTOCOL_F_CONFIG was negotiated. */
	m = msg(VHOST_USER_GET_CONFIG, 12 + 8, NULL);
	m.p.config.size = 8;
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), -EPROTO);
	assert_int_equal(s.starts, 0);
	vhost_dev_reset(&d);
}

static void test_features_and_reply_ack(void **state)
{
	struct vhost_dev d;
	struct stub s = {0};
	struct vhost_msg m, reply;

	vhost_dev_init(&d, 2, 1ull << VIRTIO_F_VERSION_1, &stub_ops, &s);
	m = msg(VHOST_USER_GET_FEATURES, 0, NULL);
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 1);
	assert_true(reply.hdr.flags & VHOST_USER_REPLY_MASK);
	assert_true(reply.p.u64 & (1ull << VHOST_USER_F_PROTOCOL_FEATURES));
	assert_true(reply.p.u64 & (1ull << VIRTIO_F_VERSION_1));
	/* Without REPLY_ACK a failed SET gets no answer. */
	assert_int_equal(send_u64(&d, VHOST_USER_SET_FEATURES, 1ull << 60, &reply), 0);
	assert_int_equal(send_u64(&d, VHOST_USER_SET_PROTOCOL_FEATURES,
				  1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK, &reply),
			 0);
	m = msg(VHOST_USER_SET_FEATURES, 8, NULL);
	m.hdr.flags |= VHOST_USER_NEED_REPLY_MASK;
	m.p.u64 = 1ull << 60; /* not offered */
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 1);
	assert_int_not_equal(reply.p.u64, 0);
	m.p.u64 = 1ull << VIRTIO_F_VERSION_1;
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 1);
	assert_int_equal(reply.p.u64, 0);
	vhost_dev_reset(&d);
}

static void send_mem_table(struct vhost_dev *d, struct harness *h)
{
	struct vhost_msg m = msg(VHOST_USER_SET_MEM_TABLE, 8 + 2 * 32, NULL), reply;

	m.p.mem.nregions = 2;
	for (int i = 0; i < 2; i++) {
		m.p.mem.regions[i] = (struct vhost_user_mem_region){i * H_REGION, H_REGION,
								    H_UVA_BASE + i * H_REGION, 0};
		m.fds[i] = dup(h->fd[i]);
	}
	m.nfds = 2;
	assert_int_equal(vhost_dev_handle(d, &m, &reply), 0);
	assert_int_equal(d->mem.nregions, 2);
}

static void send_ring_addr(struct vhost_dev *d)
{
	struct vhost_user_vring_addr a = {
	    .index = 0,
	    .desc_user_addr = H_UVA_BASE + H_DESC,
	    .avail_user_addr = H_UVA_BASE + H_AVAIL,
	    .used_user_addr = H_UVA_BASE + H_USED,
	};
	struct vhost_msg m = msg(VHOST_USER_SET_VRING_ADDR, sizeof(a), &a), reply;

	assert_int_equal(vhost_dev_handle(d, &m, &reply), 0);
}

static void send_kick(struct vhost_dev *d)
{
	struct vhost_msg m = msg(VHOST_USER_SET_VRING_KICK, 8, NULL), reply;

	m.fds[0] = eventfd(0, EFD_CLOEXEC);
	m.nfds = 1;
	assert_int_equal(vhost_dev_handle(d, &m, &reply), 0);
}

static void test_ring_order_independent(void **state)
{
	struct harness h;
	struct vhost_dev d;
	struct stub s = {0};
	struct vhost_msg reply;

	h_init(&h, 8, false, false);
	vhost_dev_init(&d, 1, 0, &stub_ops, &s);
	/* Ring addresses and kick before features and the memory table. */
	send_ring_addr(&d);
	send_kick(&d);
	assert_int_equal(send_state(&d, VHOST_USER_SET_VRING_NUM, 0, 8, &reply), 0);
	assert_int_equal(send_state(&d, VHOST_USER_SET_VRING_BASE, 0, 0, &reply), 0);
	assert_int_equal(send_u64(&d, VHOST_USER_SET_FEATURES, 0, &reply), 0);
	assert_int_equal(s.starts, 0);
	send_mem_table(&d, &h);
	assert_int_equal(s.starts, 1);
	assert_true(d.vring[0].started);
	/* Non-power-of-two sizes are refused and do not touch the ring. */
	assert_int_equal(send_state(&d, VHOST_USER_SET_VRING_NUM, 0, 6, &reply), 0);
	assert_int_equal(d.vring[0].num, 8);
	/* GET_VRING_BASE stops the ring and keeps it stopped. */
	d.vring[0].vq.last_avail_idx = 3;
	assert_int_equal(send_state(&d, VHOST_USER_GET_VRING_BASE, 0, 0, &reply), 1);
	assert_int_equal(reply.p.state.num, 3);
	assert_int_equal(s.stops, 1);
	assert_false(d.vring[0].started);
	assert_int_equal(send_state(&d, VHOST_USER_SET_VRING_BASE, 0, 3, &reply), 0);
	assert_int_equal(s.starts, 1);
	send_kick(&d);
	assert_int_equal(s.starts, 2);
	vhost_dev_reset(&d);
	assert_int_equal(s.stops, 2);
	h_free(&h);
}

static void test_inflight_roundtrip(void **state)
{
	struct harness h;
	struct vhost_dev d;
	struct stub s = {0};
	struct vhost_msg m, reply;
	struct vhost_user_inflight inf = {.num_queues = 1, .queue_size = 8};

	h_init(&h, 8, false, false);
	vhost_dev_init(&d, 1, 0, &stub_ops, &s);
	assert_int_equal(send_u64(&d, VHOST_USER_SET_PROTOCOL_FEATURES,
				  1ull << VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, &reply),
			 0);
	m = msg(VHOST_USER_GET_INFLIGHT_FD, sizeof(inf), &inf);
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 1);
	assert_int_equal(reply.nfds, 1);
	assert_int_equal(reply.p.inflight.mmap_size, vhost_inflight_queue_size(8));
	m = msg(VHOST_USER_SET_INFLIGHT_FD, sizeof(reply.p.inflight), &reply.p.inflight);
	m.fds[0] = reply.fds[0];
	m.nfds = 1;
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 0);
	assert_non_null(d.inflight.map);
	/* A geometry that does not fit the fd is refused. */
	inf.queue_size = 6;
	m = msg(VHOST_USER_GET_INFLIGHT_FD, sizeof(inf), &inf);
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 1);
	assert_int_equal(reply.nfds, 0);
	assert_int_equal(reply.p.inflight.mmap_size, 0);

	send_mem_table(&d, &h);
	send_ring_addr(&d);
	assert_int_equal(send_state(&d, VHOST_USER_SET_VRING_NUM, 0, 8, &reply), 0);
	assert_int_equal(send_state(&d, VHOST_USER_SET_VRING_BASE, 0, 0, &reply), 0);
	assert_int_equal(send_u64(&d, VHOST_USER_SET_FEATURES, 0, &reply), 0);
	send_kick(&d);
	assert_int_equal(s.starts, 1);
	assert_int_equal(s.last.outcome, VHOST_INFLIGHT_FRESH);
	assert_non_null(d.vring[0].vq.inflight);
	vhost_dev_reset(&d);
	h_free(&h);
}

/* A ring whose addresses are not in the memory table does not start, and
 * the message that completed its set says why through REPLY_ACK; once the
 * addresses are fixed it starts. */
static void test_ring_start_failure_acked(void **state)
{
	struct harness h;
	struct vhost_dev d;
	struct stub s = {0};
	struct vhost_msg m, reply;
	struct vhost_user_vring_addr a = {
	    .index = 0,
	    .desc_user_addr = H_UVA_BASE + 4 * H_REGION, /* not mapped */
	    .avail_user_addr = H_UVA_BASE + H_AVAIL,
	    .used_user_addr = H_UVA_BASE + H_USED,
	};

	h_init(&h, 8, false, false);
	vhost_dev_init(&d, 1, 0, &stub_ops, &s);
	assert_int_equal(send_u64(&d, VHOST_USER_SET_PROTOCOL_FEATURES,
				  1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK, &reply),
			 0);
	send_mem_table(&d, &h);
	assert_int_equal(send_u64(&d, VHOST_USER_SET_FEATURES, 0, &reply), 0);
	assert_int_equal(send_state(&d, VHOST_USER_SET_VRING_NUM, 0, 8, &reply), 0);
	m = msg(VHOST_USER_SET_VRING_ADDR, sizeof(a), &a);
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 0);
	m = msg(VHOST_USER_SET_VRING_KICK, 8, NULL);
	m.hdr.flags |= VHOST_USER_NEED_REPLY_MASK;
	m.fds[0] = eventfd(0, EFD_CLOEXEC);
	m.nfds = 1;
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 1);
	assert_int_equal(reply.p.u64, EFAULT);
	assert_non_null(strstr(d.err, "outside the memory table"));
	assert_int_equal(s.starts, 0);
	/* Not retried (nor reported) by messages that change nothing. */
	m = msg(VHOST_USER_SET_OWNER, 0, NULL);
	m.hdr.flags |= VHOST_USER_NEED_REPLY_MASK;
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 1);
	assert_int_equal(reply.p.u64, 0);
	/* Fixed addresses: it starts. */
	a.desc_user_addr = H_UVA_BASE + H_DESC;
	m = msg(VHOST_USER_SET_VRING_ADDR, sizeof(a), &a);
	m.hdr.flags |= VHOST_USER_NEED_REPLY_MASK;
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 1);
	assert_int_equal(reply.p.u64, 0);
	assert_int_equal(s.starts, 1);
	vhost_dev_reset(&d);
	h_free(&h);
}

/*
 * QEMU 7.2, reconnecting to a back-end it had set up but never started (a
 * VM paused, or waiting for an incoming migration), skips GET_ and
 * SET_PROTOCOL_FEATURES and goes on with what the last connection
 * negotiated: SET_FEATURES with VHOST_USER_F_PROTOCOL_FEATURES, then
 * GET_INFLIGHT_FD. The offered protocol features then stand for the ones
 * never acked. An explicit SET_PROTOCOL_FEATURES still rules, and without
 * VHOST_USER_F_PROTOCOL_FEATURES nothing is implied.
 */
static void test_protocol_features_implied(void **state)
{
	struct vhost_dev d;
	struct stub s = {0};
	struct vhost_msg m, reply;
	struct vhost_user_inflight inf = {.num_queues = 1, .queue_size = 8};
	uint64_t f = 1ull << VHOST_USER_F_PROTOCOL_FEATURES;

	vhost_dev_init(&d, 1, 0, &stub_ops, &s);
	assert_int_equal(send_u64(&d, VHOST_USER_SET_FEATURES, f, &reply), 0);
	m = msg(VHOST_USER_GET_INFLIGHT_FD, sizeof(inf), &inf);
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 1);
	assert_int_equal(reply.nfds, 1);
	close(reply.fds[0]);
	vhost_dev_reset(&d);

	assert_int_equal(send_u64(&d, VHOST_USER_SET_PROTOCOL_FEATURES, 0, &reply), 0);
	assert_int_equal(send_u64(&d, VHOST_USER_SET_FEATURES, f, &reply), 0);
	m = msg(VHOST_USER_GET_INFLIGHT_FD, sizeof(inf), &inf);
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), -EPROTO);
	vhost_dev_reset(&d);

	assert_int_equal(send_u64(&d, VHOST_USER_SET_FEATURES, 0, &reply), 0);
	m = msg(VHOST_USER_GET_INFLIGHT_FD, sizeof(inf), &inf);
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), -EPROTO);
	vhost_dev_reset(&d);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_rejected_before_handler),
	    cmocka_unit_test(test_features_and_reply_ack),
	    cmocka_unit_test(test_ring_order_independent),
	    cmocka_unit_test(test_inflight_roundtrip),
	    cmocka_unit_test(test_ring_start_failure_acked),
	    cmocka_unit_test(test_protocol_features_implied),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
