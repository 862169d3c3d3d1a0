// SPDX-License-Identifier: MIT
/*
 * Unit tests of packed virtqueues (lib/vhost/packed.c, inflight_packed.c and
 * their wiring in dev.c), on a ring in memfd-backed fake guest RAM that the
 * test drives as a guest driver would: chains, indirect tables, the wrap of
 * both counters (with buffers completed out of order and ring slots reused
 * while older buffers are still in flight), event suppression on both
 * sides, every rejection a hostile driver can trigger, the GET/SET_VRING_BASE
 * encoding, and recovery from the in-flight region after a crash at each
 * step of the write protocol, or from a region that was scribbled on.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <sys/eventfd.h>
#include <cmocka.h>

#include "harness_packed.h"

#define IOV_MAX_T 8

struct chain_buf {
	struct iovec iov[IOV_MAX_T];
	uint64_t gpa[IOV_MAX_T];
	struct vhost_chain c;
};

static struct vhost_chain *chain_init(struct chain_buf *b, uint16_t max)
{
	b->c = (struct vhost_chain){.max = max, .iov = b->iov, .gpa = b->gpa};
	return &b->c;
}

/* The device completes id with len, and publishes at once. */
static bool complete(struct hpk *p, uint16_t id, uint32_t len)
{
	vhost_vq_push(&p->h.vq, id, len);
	return vhost_vq_flush(&p->h.vq);
}

static void test_chain(void **state)
{
	struct hpk p;
	struct chain_buf b;
	struct hp_seg seg[3] = {
	    {H_DATA, 16, 0},
	    {H_DATA + 0x1000, 4096, VHOST_DESC_F_WRITE},
	    {H_DATA + 0x3000, 1, VHOST_DESC_F_WRITE},
	};
	uint16_t id;
	uint32_t len;

	hp_init(&p, 8, false, false);
	memcpy(h_gpa(&p.h, H_DATA), "header", 6);
	assert_false(vhost_vq_avail_pending(&p.h.vq));
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 0);
	assert_true(hp_post(&p, 5, seg, 3));
	assert_true(vhost_vq_avail_pending(&p.h.vq));
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	assert_int_equal(id, 5);
	assert_int_equal(vhost_packed_base(&p.h.vq), 0x8000 | 3);
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, id, chain_init(&b, IOV_MAX_T)), 0);
	assert_int_equal(b.c.head, 5);
	assert_int_equal(b.c.nout, 1);
	assert_int_equal(b.c.nin, 2);
	assert_memory_equal(b.iov[0].iov_base, "header", 6);
	assert_int_equal(b.iov[1].iov_len, 4096);
	assert_int_equal(b.gpa[2], H_DATA + 0x3000);
	assert_false(hp_get_used(&p, &id, &len));
	assert_true(complete(&p, 5, 4097));
	assert_true(hp_get_used(&p, &id, &len));
	assert_int_equal(id, 5);
	assert_int_equal(len, 4097);
	/* One used descriptor, in the head's slot, the used position moved by
	 * the buffer's three descriptors. */
	assert_int_equal(p.ring[0].flags & (VHOST_PDESC_F_AVAIL | VHOST_PDESC_F_USED),
			 VHOST_PDESC_F_AVAIL | VHOST_PDESC_F_USED);
	assert_int_equal(p.h.vq.pk.used_pos, 3);
	assert_int_equal(p.h.vq.pk.nfree, 8);
	hp_free(&p);
}

/*
 * 200 buffers of 1 to 3 descriptors through a ring of 8, completed in an
 * order that is not the fetch order: both wrap counters flip many times,
 * and ring slots are reused while buffers fetched earlier are in flight.
 */
static void test_wrap_out_of_order(void **state)
{
	struct hpk p;
	uint16_t held[8], nheld = 0, posted = 0, done = 0, flips = 0;
	bool last_wrap = true;

	hp_init(&p, 8, false, false);
	while (done < 200) {
		struct hp_seg seg[3];
		uint16_t n = (uint16_t)(1 + posted % 3), id, got;
		uint32_t len;

		for (uint16_t i = 0; i < n; i++)
			seg[i] = (struct hp_seg){H_DATA + 0x1000u * (posted % 8), 512,
						 i ? VHOST_DESC_F_WRITE : 0};
		/* The driver uses the lowest free id, like Linux's free list. */
		for (id = 0; id < 8 && p.drv.ndesc[id]; id++)
			;
		if (posted < 200 && id < 8 && hp_post(&p, id, seg, n)) {
			posted++;
			while (vhost_vq_pop(&p.h.vq, &got) == 1)
				held[nheld++] = got;
			assert_false(p.h.vq.broken);
		}
		if (nheld && (nheld >= 2 || posted == 200 || p.drv.free < 3)) {
			/* Complete the newest first. */
			struct chain_buf b;
			uint16_t last = held[--nheld];

			assert_int_equal(
			    vhost_vq_map_chain(&p.h.vq, last, chain_init(&b, IOV_MAX_T)), 0);
			assert_int_equal(b.c.nout + b.c.nin, p.drv.ndesc[last]);
			complete(&p, last, last);
			assert_true(hp_get_used(&p, &got, &len));
			assert_int_equal(got, last);
			assert_int_equal(len, last);
			done++;
		}
		if (p.h.vq.pk.used_wrap != last_wrap) {
			flips++;
			last_wrap = p.h.vq.pk.used_wrap;
		}
	}
	assert_true(flips > 20);
	assert_int_equal(p.drv.free, 8);
	assert_int_equal(p.h.vq.pk.nfree, 8);
	assert_int_equal(p.h.vq.pk.used_pos, p.h.vq.pk.avail_pos);
	assert_int_equal(p.h.vq.pk.used_wrap, p.h.vq.pk.avail_wrap);
	assert_int_equal(p.drv.next_avail, p.h.vq.pk.avail_pos);
	hp_free(&p);
}

/* A buffer's descriptors are kept when the driver reuses their ring slots. */
static void test_slot_reuse_keeps_chain(void **state)
{
	struct hpk p;
	struct chain_buf b;
	struct hp_seg a[3] = {
	    {H_DATA, 16, 0}, {H_DATA + 0x1000, 512, VHOST_DESC_F_WRITE}, {H_DATA + 0x2000, 1, 2}};
	uint16_t id;
	uint32_t len;

	hp_init(&p, 4, false, false);
	assert_true(hp_post(&p, 0, a, 3));		  /* slots 0-2 */
	assert_true(hp_post1(&p, 1, H_DATA + 0x5000, 8)); /* slot 3 */
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	complete(&p, 1, 8); /* used descriptor in slot 0 */
	assert_true(hp_get_used(&p, &id, &len));
	/* One descriptor free: the driver writes slot 0, lap 2. */
	assert_true(hp_post1(&p, 2, H_DATA + 0x6000, 64));
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	assert_int_equal(id, 2);
	assert_false(p.h.vq.pk.avail_wrap);
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, 0, chain_init(&b, IOV_MAX_T)), 0);
	assert_int_equal(b.c.nout, 1);
	assert_int_equal(b.c.nin, 2);
	assert_int_equal(b.gpa[0], H_DATA);
	assert_int_equal(b.gpa[1], H_DATA + 0x1000);
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, 2, chain_init(&b, IOV_MAX_T)), 0);
	assert_int_equal(b.gpa[0], H_DATA + 0x6000);
	/* An id we do not hold maps to nothing. */
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, 1, chain_init(&b, IOV_MAX_T)), -EINVAL);
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, 9, chain_init(&b, IOV_MAX_T)), -EINVAL);
	complete(&p, 0, 1);
	complete(&p, 2, 64);
	assert_true(hp_get_used(&p, &id, &len));
	assert_int_equal(id, 0);
	assert_true(hp_get_used(&p, &id, &len));
	assert_int_equal(id, 2);
	assert_int_equal(p.drv.free, 4);
	hp_free(&p);
}

static void set_table(struct vhost_pdesc *t, unsigned i, uint64_t addr, uint32_t len,
		      uint16_t flags)
{
	t[i] = (struct vhost_pdesc){.addr = addr, .len = len, .id = 0xdead, .flags = flags};
}

static void test_indirect(void **state)
{
	struct hpk p;
	struct chain_buf b;
	struct vhost_pdesc *t;
	struct hp_seg ind = {H_INDIRECT, 3 * 16, VHOST_DESC_F_INDIRECT};
	uint16_t id;

	hp_init(&p, 8, false, true);
	t = h_gpa(&p.h, H_INDIRECT);
	/* NEXT and INDIRECT inside a packed table mean nothing: all three
	 * are used, in order. */
	set_table(t, 0, H_DATA, 16, VHOST_DESC_F_NEXT);
	set_table(t, 1, H_DATA + 0x1000, 4096, VHOST_DESC_F_WRITE | VHOST_DESC_F_INDIRECT);
	set_table(t, 2, H_DATA + 0x3000, 1, VHOST_DESC_F_WRITE);
	assert_true(hp_post(&p, 3, &ind, 1));
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, id, chain_init(&b, IOV_MAX_T)), 0);
	assert_int_equal(b.c.nout, 1);
	assert_int_equal(b.c.nin, 2);
	assert_int_equal(b.gpa[1], H_DATA + 0x1000);
	/* Readable after writable inside the table. */
	set_table(t, 2, H_DATA + 0x3000, 1, 0);
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, id, chain_init(&b, IOV_MAX_T)), -EINVAL);
	/* Lengths that are not a table. */
	p.h.vq.pk.slot[p.h.vq.pk.id_head[id]].len = 20;
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, id, chain_init(&b, IOV_MAX_T)), -EINVAL);
	p.h.vq.pk.slot[p.h.vq.pk.id_head[id]].len = 0;
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, id, chain_init(&b, IOV_MAX_T)), -EINVAL);
	p.h.vq.pk.slot[p.h.vq.pk.id_head[id]].len = (VHOST_MAX_INDIRECT + 1) * 16;
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, id, chain_init(&b, IOV_MAX_T)), -EINVAL);
	/* A table outside the memory table. */
	p.h.vq.pk.slot[p.h.vq.pk.id_head[id]].len = 48;
	p.h.vq.pk.slot[p.h.vq.pk.id_head[id]].addr = 2 * H_REGION;
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, id, chain_init(&b, IOV_MAX_T)), -EFAULT);
	complete(&p, id, 0);
	/* INDIRECT in a chain of two ring descriptors. */
	{
		struct hp_seg two[2] = {{H_INDIRECT, 48, VHOST_DESC_F_INDIRECT},
					{H_DATA, 1, VHOST_DESC_F_WRITE}};

		assert_true(hp_post(&p, 4, two, 2));
		assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
		assert_int_equal(vhost_vq_map_chain(&p.h.vq, id, chain_init(&b, IOV_MAX_T)),
				 -EINVAL);
		complete(&p, id, 0);
	}
	/* Without INDIRECT_DESC negotiated. */
	p.h.vq.indirect = false;
	assert_true(hp_post(&p, 5, &ind, 1));
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, id, chain_init(&b, IOV_MAX_T)), -EINVAL);
	/* A malformed chain is a failed request, not a broken ring. */
	assert_false(p.h.vq.broken);
	hp_free(&p);
}

static void test_bad_chains(void **state)
{
	struct hpk p;
	struct chain_buf b;
	uint16_t id;

	hp_init(&p, 8, false, false);
	{
		struct hp_seg bad[2] = {{H_DATA, 16, VHOST_DESC_F_WRITE}, {H_DATA, 16, 0}};

		assert_true(hp_post(&p, 0, bad, 2)); /* readable after writable */
		assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
		assert_int_equal(vhost_vq_map_chain(&p.h.vq, id, chain_init(&b, IOV_MAX_T)),
				 -EINVAL);
	}
	assert_true(hp_post1(&p, 1, 2 * H_REGION, 16)); /* outside the memory table */
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, id, chain_init(&b, IOV_MAX_T)), -EFAULT);
	assert_true(hp_post1(&p, 2, 2 * H_REGION - 16, 32)); /* runs off the end */
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, id, chain_init(&b, IOV_MAX_T)), -EFAULT);
	{
		struct hp_seg many[4] = {
		    {H_DATA, 1, 0}, {H_DATA, 1, 0}, {H_DATA, 1, 0}, {H_DATA, 1, 0}};

		assert_true(hp_post(&p, 3, many, 4)); /* needs 4 iovecs */
		assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
		assert_int_equal(vhost_vq_map_chain(&p.h.vq, id, chain_init(&b, 3)), -E2BIG);
	}
	assert_false(p.h.vq.broken);
	hp_free(&p);
}

/* Things a driver can do to a packed ring that break it for good. */
static void expect_broken(struct hpk *p, const char *why)
{
	uint16_t id;

	assert_int_equal(vhost_vq_pop(&p->h.vq, &id), -EIO);
	assert_true(p->h.vq.broken);
	assert_non_null(p->h.vq.broken_why);
	assert_string_equal(p->h.vq.broken_why, why);
	assert_int_equal(vhost_vq_pop(&p->h.vq, &id), -EIO); /* and stays so */
}

static void test_hostile_ring(void **state)
{
	struct hpk p;
	uint16_t id;

	/* A buffer id beyond the ring. */
	hp_init(&p, 8, false, false);
	assert_true(hp_post1(&p, 0, H_DATA, 1));
	p.ring[0].id = 8;
	expect_broken(&p, "buffer id out of range");
	hp_free(&p);

	/* An id posted again while we hold it. */
	hp_init(&p, 8, false, false);
	assert_true(hp_post1(&p, 3, H_DATA, 1));
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	p.drv.ndesc[3] = 0;
	assert_true(hp_post1(&p, 3, H_DATA, 1));
	expect_broken(&p, "buffer id posted again while still in flight");
	hp_free(&p);

	/* A chain that never ends: every slot available with NEXT, around
	 * the ring and into the next lap. */
	hp_init(&p, 8, false, false);
	for (uint16_t i = 0; i < 8; i++)
		p.ring[i] =
		    (struct vhost_pdesc){H_DATA, 1, 0, VHOST_DESC_F_NEXT | VHOST_PDESC_F_AVAIL};
	expect_broken(&p, "descriptor chain longer than the ring");
	hp_free(&p);

	/* A head whose next descriptor was never made available. */
	hp_init(&p, 8, false, false);
	p.ring[0] = (struct vhost_pdesc){H_DATA, 1, 0, VHOST_DESC_F_NEXT | VHOST_PDESC_F_AVAIL};
	p.ring[1] = (struct vhost_pdesc){H_DATA, 1, 0, 0};
	expect_broken(&p, "chained descriptor not made available");
	hp_free(&p);

	/* More descriptors in flight than the ring holds: the driver makes
	 * slot 0 available again for the next lap while we still hold it. */
	hp_init(&p, 4, false, false);
	for (uint16_t i = 0; i < 4; i++) {
		assert_true(hp_post1(&p, i, H_DATA, 1));
		assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	}
	p.ring[0] = (struct vhost_pdesc){H_DATA, 1, 0, VHOST_PDESC_F_USED};
	expect_broken(&p, "more descriptors in flight than the ring holds");
	hp_free(&p);
}

/* Interrupts: what the driver's event area asks for. */
static void test_driver_event(void **state)
{
	struct hpk p;
	uint16_t id;
	uint32_t len;

	hp_init(&p, 8, false, false);
	assert_true(hp_post1(&p, 0, H_DATA, 1));
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	p.driver_ev->flags = VHOST_PEVENT_DISABLE;
	assert_false(complete(&p, 0, 1));
	assert_true(hp_get_used(&p, &id, &len));
	/* DESC without EVENT_IDX negotiated: not ours to read; signal. */
	p.driver_ev->flags = VHOST_PEVENT_DESC;
	p.driver_ev->off_wrap = 5 | 0x8000;
	assert_true(hp_post1(&p, 0, H_DATA, 1));
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	assert_true(complete(&p, 0, 1));
	assert_true(hp_get_used(&p, &id, &len));
	hp_free(&p);

	/* EVENT_IDX: an interrupt exactly when the used position passes the
	 * driver's event position, on either side of a wrap. */
	hp_init(&p, 8, true, false);
	p.driver_ev->flags = VHOST_PEVENT_DESC;
	p.driver_ev->off_wrap = 3 | 0x8000; /* slot 3 of the first lap */
	for (uint16_t i = 0; i < 20; i++) {
		uint16_t before = p.h.vq.pk.used_pos, ev = p.driver_ev->off_wrap;
		bool before_wrap = p.h.vq.pk.used_wrap;

		assert_true(hp_post1(&p, 0, H_DATA, 1));
		assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
		assert_int_equal(complete(&p, 0, 1),
				 before == (ev & 0x7fff) && before_wrap == (ev >> 15));
		assert_true(hp_get_used(&p, &id, &len));
		if (i == 3)
			p.driver_ev->off_wrap = 1; /* behind us: slot 1, lap 2 */
		if (i == 10)
			p.driver_ev->off_wrap = 5; /* slot 5, lap 2: at i = 13 */
	}
	/* A buffer of three descriptors jumps over the event position: it
	 * still signals. */
	{
		struct hp_seg three[3] = {{H_DATA, 1, 0}, {H_DATA, 1, 0}, {H_DATA, 1, 2}};
		uint16_t next = (uint16_t)(p.h.vq.pk.used_pos + 1);
		bool wrap = p.h.vq.pk.used_wrap;

		if (next == 8) {
			next = 0;
			wrap = !wrap;
		}
		p.driver_ev->off_wrap = (uint16_t)(next | (wrap ? 0x8000 : 0));
		assert_true(hp_post(&p, 1, three, 3));
		assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
		assert_true(complete(&p, 1, 0));
		assert_true(hp_get_used(&p, &id, &len));
	}
	/* An event position beyond the ring: signal rather than guess. */
	p.driver_ev->off_wrap = 100;
	assert_true(hp_post1(&p, 0, H_DATA, 1));
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	assert_true(complete(&p, 0, 1));
	hp_free(&p);
}

/* Kicks: what we write into the device event area. */
static void test_device_event(void **state)
{
	struct hpk p;
	uint16_t id;

	hp_init(&p, 8, false, false);
	vhost_vq_disable_notify(&p.h.vq);
	assert_int_equal(p.device_ev->flags, VHOST_PEVENT_DISABLE);
	assert_false(vhost_vq_enable_notify(&p.h.vq));
	assert_int_equal(p.device_ev->flags, VHOST_PEVENT_ENABLE);
	assert_true(hp_post1(&p, 0, H_DATA, 1));
	/* A buffer posted while we were deciding to sleep is seen. */
	assert_true(vhost_vq_enable_notify(&p.h.vq));
	hp_free(&p);

	hp_init(&p, 8, true, false);
	for (uint16_t i = 0; i < 11; i++) {
		uint32_t len;

		assert_true(hp_post1(&p, 0, H_DATA, 1));
		assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
		complete(&p, 0, 1);
		assert_true(hp_get_used(&p, &id, &len));
	}
	assert_false(vhost_vq_enable_notify(&p.h.vq));
	assert_int_equal(p.device_ev->flags, VHOST_PEVENT_DESC);
	/* 11 buffers into a ring of 8: slot 3 of the second lap (wrap 0). */
	assert_int_equal(p.device_ev->off_wrap, 3);
	vhost_vq_disable_notify(&p.h.vq);
	assert_int_equal(p.device_ev->flags, VHOST_PEVENT_DISABLE);
	hp_free(&p);
}

static void test_dirty_log(void **state)
{
	struct hpk p;
	uint16_t id;

	hp_init(&p, 8, true, false);
	h_log(&p.h, true);
	p.h.vq.pk.ring_gpa = H_DESC;
	assert_true(hp_post1(&p, 0, H_DATA, 1));
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	assert_false(h_dirty(&p.h, H_DESC));
	complete(&p, 0, 1);
	assert_true(h_dirty(&p.h, H_DESC));
	assert_false(h_dirty(&p.h, H_USED));
	vhost_vq_enable_notify(&p.h.vq);
	assert_true(h_dirty(&p.h, H_USED));
	hp_free(&p);
}

static void test_base_encoding(void **state)
{
	struct hpk p;
	uint16_t id;
	uint32_t len;

	assert_true(vhost_packed_base_ok(8, 0x8000 | 7));
	assert_true(vhost_packed_base_ok(8, 3));
	assert_false(vhost_packed_base_ok(8, 8));
	assert_false(vhost_packed_base_ok(8, 0x8000 | 8));
	assert_false(vhost_packed_base_ok(8, 0x10000));
	hp_init(&p, 8, false, false);
	hp_reset(&p, 6); /* slot 6, wrap counter 0 */
	assert_int_equal(vhost_packed_base(&p.h.vq), 6);
	for (uint16_t i = 0; i < 3; i++) {
		assert_true(hp_post1(&p, i, H_DATA, 1));
		assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	}
	/* 6, 7, then slot 0 of the next lap: wrap counter 1. */
	assert_int_equal(vhost_packed_base(&p.h.vq), 0x8000 | 1);
	for (uint16_t i = 0; i < 3; i++) {
		complete(&p, i, 0);
		assert_true(hp_get_used(&p, &id, &len));
	}
	assert_int_equal(p.h.vq.pk.used_pos, 1);
	assert_true(p.h.vq.pk.used_wrap);
	hp_free(&p);
}

/* ---- in-flight recovery ---- */

/* What a restarted process has: the same guest memory and region, nothing
 * else. Returns the recovery's result; ids to redo in resubmit. */
static void restart(struct hpk *p, uint16_t base, uint16_t *resubmit,
		    struct vhost_inflight_recovery *rc)
{
	struct vhost_vq *vq = &p->h.vq;

	memset(vq->pk.alloc, 0xa5, 64); /* the old private state is gone */
	vq->counter = 0;
	vq->broken = false;
	vhost_packed_recover(vq, p->features, base, resubmit, rc);
	vq->counter = rc->next_counter - 1;
	vq->last_avail_idx = rc->nresubmit;
	vq->used_idx = vq->published_idx = 0;
}

static void test_recover_in_flight(void **state)
{
	struct hpk p;
	struct chain_buf b;
	struct vhost_inflight_recovery rc;
	uint16_t resubmit[8], id;
	uint32_t len;
	struct hp_seg two[2] = {{H_DATA, 16, 0}, {H_DATA + 0x1000, 512, VHOST_DESC_F_WRITE}};

	hp_init(&p, 8, false, false);
	hp_inflight(&p);
	/* Fresh region: version 0 means nothing was ever in flight. */
	memset(p.inflight, 0, vhost_inflight_packed_queue_size(8));
	restart(&p, 0x8000 | 2, resubmit, &rc);
	assert_int_equal(rc.outcome, VHOST_INFLIGHT_FRESH);
	assert_int_equal(p.inflight->version, VHOST_INFLIGHT_PACKED_VERSION);
	assert_int_equal(vhost_packed_base(&p.h.vq), 0x8000 | 2);
	hp_reset(&p, 0x8000 | 2);

	/* Lap 1 and into lap 2 with ids 4, 1 (two descriptors), 6, 2. */
	assert_true(hp_post1(&p, 4, H_DATA + 0x2000, 8));
	assert_true(hp_post(&p, 1, two, 2));
	assert_true(hp_post1(&p, 6, H_DATA + 0x3000, 8));
	assert_true(hp_post1(&p, 2, H_DATA + 0x4000, 8));
	for (int i = 0; i < 4; i++)
		assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	complete(&p, 6, 8);
	assert_true(hp_get_used(&p, &id, &len));
	assert_int_equal(id, 6);
	/* The driver reuses the freed slot for a new buffer we never fetch. */
	assert_true(hp_post1(&p, 6, H_DATA + 0x5000, 8));
	assert_int_equal(vhost_packed_base(&p.h.vq), 0x8000 | 7);

	/* Crash; the front-end hands back the base of the previous start. */
	restart(&p, 0x8000 | 2, resubmit, &rc);
	assert_int_equal(rc.outcome, VHOST_INFLIGHT_RECOVERED);
	assert_null(rc.why);
	assert_int_equal(rc.nresubmit, 3);
	assert_int_equal(resubmit[0], 4); /* oldest fetch first */
	assert_int_equal(resubmit[1], 1);
	assert_int_equal(resubmit[2], 2);
	assert_int_equal(rc.next_counter, 5);
	assert_int_equal(rc.last_avail_idx, 0x8000 | 7);
	assert_int_equal(p.h.vq.pk.used_pos, 3);
	assert_int_equal(p.h.vq.pk.nfree, 8 - 4);
	/* The chains come from the region, not from the reused ring. */
	assert_int_equal(vhost_vq_map_chain(&p.h.vq, 1, chain_init(&b, IOV_MAX_T)), 0);
	assert_int_equal(b.c.nout, 1);
	assert_int_equal(b.gpa[1], H_DATA + 0x1000);
	/* Serving goes on: the buffer posted meanwhile, then the redone ones. */
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	assert_int_equal(id, 6);
	complete(&p, 4, 8);
	complete(&p, 6, 8);
	complete(&p, 1, 512);
	complete(&p, 2, 8);
	for (int i = 0; i < 4; i++)
		assert_true(hp_get_used(&p, &id, &len));
	assert_int_equal(p.drv.free, 8);
	assert_int_equal(p.h.vq.pk.nfree, 8);
	/* And a clean restart finds nothing in flight. */
	restart(&p, 0, resubmit, &rc);
	assert_int_equal(rc.outcome, VHOST_INFLIGHT_RECOVERED);
	assert_int_equal(rc.nresubmit, 0);
	assert_int_equal(rc.last_avail_idx, vhost_packed_base(&p.h.vq));
	assert_int_equal(p.h.vq.pk.avail_pos, p.drv.next_avail);
	hp_free(&p);
}

/*
 * A crash in the middle of returning a buffer (inflight.h, step 2). Buffer
 * 5 (two descriptors) at slots 0-1 and buffer 7 at slot 2; buffer 5 is
 * returned at used position 0. how: 0 = stopped before the used descriptor
 * was written, 1 = after it, 2 = after it and after the driver reaped it and
 * reused the slot.
 */
static void interrupted_return(int how)
{
	struct hpk p;
	struct vhost_inflight_recovery rc;
	struct vhost_inflight_packed *q;
	struct vhost_pdesc saved;
	uint16_t resubmit[8], id, h;
	uint32_t len;
	struct hp_seg two[2] = {{H_DATA, 16, 0}, {H_DATA + 0x1000, 512, VHOST_DESC_F_WRITE}};

	hp_init(&p, 8, false, false);
	hp_inflight(&p);
	q = p.inflight;
	assert_true(hp_post(&p, 5, two, 2));
	assert_true(hp_post1(&p, 7, H_DATA + 0x2000, 8));
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	assert_int_equal(vhost_vq_pop(&p.h.vq, &id), 1);
	h = p.h.vq.pk.id_head[5];
	saved = p.ring[0];
	complete(&p, 5, 512);
	/* Undo step c: the old state and the flag as they were. */
	q->desc[h].inflight = 1;
	q->old_used_idx = 0;
	q->old_used_wrap_counter = 1;
	assert_int_equal(q->used_idx, 2);
	assert_int_equal(q->free_head, h);
	if (how == 0)
		p.ring[0] = saved; /* step b undone too */
	if (how == 2) {
		assert_true(hp_get_used(&p, &id, &len));
		/* Lap 1 took slots 2..7 (6 free descriptors), the driver's
		 * next lap writes slot 0 with wrap counter 0. */
		for (uint16_t i = 0; i < 3; i++)
			assert_true(hp_post1(&p, i, H_DATA, 1));
		assert_true(hp_post(&p, 3, two, 2));
		assert_true(hp_post1(&p, 4, H_DATA, 1));
		assert_true(hp_post1(&p, 6, H_DATA, 1));
		assert_int_equal(p.ring[0].flags & (VHOST_PDESC_F_AVAIL | VHOST_PDESC_F_USED),
				 VHOST_PDESC_F_USED);
	}
	restart(&p, 0x8000, resubmit, &rc);
	assert_int_equal(rc.outcome, VHOST_INFLIGHT_RECOVERED);
	if (how == 0) {
		assert_int_equal(rc.nresubmit, 2);
		assert_int_equal(resubmit[0], 5);
		assert_int_equal(resubmit[1], 7);
		assert_int_equal(p.h.vq.pk.used_pos, 0);
		assert_int_equal(rc.retired, 0);
	} else {
		assert_int_equal(rc.nresubmit, 1);
		assert_int_equal(resubmit[0], 7);
		assert_int_equal(p.h.vq.pk.used_pos, 2);
		assert_int_equal(rc.retired, 1);
		assert_int_equal(q->desc[h].inflight, 0);
	}
	assert_int_equal(p.h.vq.pk.avail_pos, 3);
	assert_true(p.h.vq.pk.avail_wrap);
	assert_int_equal(q->used_idx, q->old_used_idx);
	/* Whatever was decided, the ring serves on and the driver sees each
	 * buffer exactly once. */
	for (uint16_t i = 0; i < rc.nresubmit; i++)
		complete(&p, resubmit[i], 1);
	hp_free(&p);
}

static void test_interrupted_return(void **state)
{
	interrupted_return(0);
	interrupted_return(1);
	interrupted_return(2);
}

/* A region with buffers 3 (three descriptors) and 6 in flight, for the
 * corruption tests to scribble on. */
static void scribble_setup(struct hpk *p)
{
	struct hp_seg three[3] = {{H_DATA, 16, 0}, {H_DATA, 512, 2}, {H_DATA, 1, 2}};
	uint16_t id;

	hp_init(p, 8, false, false);
	hp_inflight(p);
	assert_true(hp_post(p, 3, three, 3));
	assert_true(hp_post1(p, 6, H_DATA, 8));
	assert_int_equal(vhost_vq_pop(&p->h.vq, &id), 1);
	assert_int_equal(vhost_vq_pop(&p->h.vq, &id), 1);
}

static void expect_invalid(struct hpk *p, const char *why)
{
	struct vhost_inflight_recovery rc;
	uint16_t resubmit[8];

	restart(p, 0x8000 | 4, resubmit, &rc);
	assert_int_equal(rc.outcome, VHOST_INFLIGHT_INVALID);
	assert_non_null(rc.why);
	assert_string_equal(rc.why, why);
	assert_int_equal(rc.nresubmit, 0);
	/* Nothing of it is kept: no id maps to a chain. */
	for (uint16_t i = 0; i < 8; i++)
		assert_int_equal(p->h.vq.pk.id_ndesc[i], 0);
	assert_int_equal(p->h.vq.pk.nfree, 8);
	hp_free(p);
}

static void test_corrupt_region(void **state)
{
	struct hpk p;
	struct vhost_inflight_packed *q;
	uint16_t h3;

#define SCRIBBLE(stmt, why)                                                                        \
	do {                                                                                       \
		scribble_setup(&p);                                                                \
		q = p.inflight;                                                                    \
		h3 = p.h.vq.pk.id_head[3];                                                         \
		(void)h3;                                                                          \
		stmt;                                                                              \
		expect_invalid(&p, why);                                                           \
	} while (0)

	SCRIBBLE(q->version = 9, "unknown region version");
	SCRIBBLE(q->desc_num = 16, "region queue size differs from the ring's");
	SCRIBBLE(q->features = 0, "region was set up for a split ring");
	SCRIBBLE(q->used_idx = q->old_used_idx = 8, "used position out of range");
	SCRIBBLE(q->old_used_wrap_counter = 2, "used position out of range");
	SCRIBBLE(q->desc[h3].inflight = 2, "in-flight flag neither 0 nor 1");
	SCRIBBLE(q->desc[h3].num = 0, "in-flight buffer with a bad descriptor count");
	SCRIBBLE(q->desc[h3].num = 9, "in-flight buffer with a bad descriptor count");
	SCRIBBLE(q->desc[h3].counter = 0, "in-flight buffer without a fetch counter");
	SCRIBBLE(q->desc[h3].next = 8, "in-flight chain link out of range");
	SCRIBBLE(q->desc[q->desc[h3].next].next = h3, "descriptor entry in two in-flight buffers");
	SCRIBBLE(q->desc[h3].num = 2, "in-flight chain flags disagree with its length");
	SCRIBBLE(q->desc[h3].last = h3, "in-flight chain does not end where its head says");
	SCRIBBLE(q->desc[q->desc[h3].last].id = 8, "in-flight buffer id out of range");
	SCRIBBLE(q->desc[p.h.vq.pk.id_head[6]].id = 3, "two in-flight buffers with one id");
	/* An interrupted return that does not add up. */
	SCRIBBLE(q->used_idx = 1, "interrupted return does not match its buffer");
	SCRIBBLE((q->used_idx = 3, q->free_head = 9), "buffer being returned out of range");
	SCRIBBLE((q->used_idx = 3, q->free_head = h3, p.ring[0].flags = 0),
		 "ring slot at the used position is neither available nor used");
	SCRIBBLE((q->used_idx = 3, q->free_head = h3, q->desc[h3].inflight = 0),
		 "buffer being returned is not in flight");
#undef SCRIBBLE
}

/* Random bytes over the region (its header kept, so the scan goes deep):
 * never a crash, never a state that could corrupt the data path. */
static void test_random_region(void **state)
{
	unsigned seed = 12345;

	for (int round = 0; round < 400; round++) {
		struct hpk p;
		struct vhost_inflight_recovery rc;
		uint16_t resubmit[8], seen[8] = {0};
		uint8_t *bytes;
		size_t size = vhost_inflight_packed_queue_size(8);

		scribble_setup(&p);
		bytes = (uint8_t *)p.inflight;
		for (size_t i = 32; i < size; i++)
			if (rand_r(&seed) % 4 == 0)
				bytes[i] = (uint8_t)rand_r(&seed);
		if (round % 2)
			for (size_t i = 12; i < 22; i++)
				bytes[i] = (uint8_t)(rand_r(&seed) % 3);
		restart(&p, 0x8000, resubmit, &rc);
		assert_true(rc.outcome == VHOST_INFLIGHT_RECOVERED ||
			    rc.outcome == VHOST_INFLIGHT_INVALID);
		assert_true(p.h.vq.pk.avail_pos < 8 && p.h.vq.pk.used_pos < 8);
		for (uint16_t i = 0; i < rc.nresubmit; i++) {
			struct chain_buf b;

			assert_true(resubmit[i] < 8);
			assert_false(seen[resubmit[i]]++);
			vhost_vq_map_chain(&p.h.vq, resubmit[i], chain_init(&b, IOV_MAX_T));
		}
		/* Slots held plus slots free is the ring, exactly. */
		{
			unsigned held = 0;

			for (uint16_t i = 0; i < 8; i++)
				held += p.h.vq.pk.id_ndesc[i];
			assert_int_equal(held + p.h.vq.pk.nfree, 8);
		}
		for (uint16_t i = 0; i < rc.nresubmit; i++)
			complete(&p, resubmit[i], 0);
		hp_free(&p);
	}
}

/* ---- through the message handlers ---- */

struct stub {
	int starts;
	struct vhost_inflight_recovery last;
};

static void stub_config(void *opaque, uint8_t *cfg)
{
	memset(cfg, 0, VHOST_USER_CONFIG_MAX);
}

static int stub_start(void *opaque, struct vhost_vring *vr)
{
	struct stub *s = opaque;

	s->starts++;
	s->last = vr->recovery;
	return 0;
}

static void stub_stop(void *opaque, struct vhost_vring *vr) {}

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

static int send_u64(struct vhost_dev *d, uint32_t req, uint64_t v)
{
	struct vhost_msg m = msg(req, 8, &v), reply;

	return vhost_dev_handle(d, &m, &reply);
}

static int send_state(struct vhost_dev *d, uint32_t req, uint32_t num, struct vhost_msg *reply)
{
	struct vhost_user_vring_state st = {0, num};
	struct vhost_msg m = msg(req, sizeof(st), &st);

	return vhost_dev_handle(d, &m, reply);
}

/* A front-end bringing up ring 0 as packed, with the in-flight fd (a dup
 * is handed over, so the caller keeps one, as QEMU does), at base. */
static void bring_up(struct vhost_dev *d, struct hpk *p, int inflight_fd, uint64_t inflight_size,
		     uint32_t base)
{
	struct vhost_user_vring_addr a = {
	    .desc_user_addr = H_UVA_BASE + H_DESC,
	    .avail_user_addr = H_UVA_BASE + H_AVAIL,
	    .used_user_addr = H_UVA_BASE + H_USED,
	    .log_guest_addr = H_USED,
	};
	struct vhost_user_inflight inf = {
	    .mmap_size = inflight_size, .num_queues = 1, .queue_size = 8};
	struct vhost_msg m, reply;

	assert_int_equal(send_u64(d, VHOST_USER_SET_PROTOCOL_FEATURES,
				  1ull << VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD),
			 0);
	assert_int_equal(send_u64(d, VHOST_USER_SET_FEATURES, p->features), 0);
	m = msg(VHOST_USER_SET_INFLIGHT_FD, sizeof(inf), &inf);
	m.fds[0] = dup(inflight_fd);
	m.nfds = 1;
	assert_int_equal(vhost_dev_handle(d, &m, &reply), 0);
	m = msg(VHOST_USER_SET_MEM_TABLE, 8 + 2 * 32, NULL);
	m.p.mem.nregions = 2;
	for (int i = 0; i < 2; i++) {
		m.p.mem.regions[i] = (struct vhost_user_mem_region){i * H_REGION, H_REGION,
								    H_UVA_BASE + i * H_REGION, 0};
		m.fds[i] = dup(p->h.fd[i]);
	}
	m.nfds = 2;
	assert_int_equal(vhost_dev_handle(d, &m, &reply), 0);
	m = msg(VHOST_USER_SET_VRING_ADDR, sizeof(a), &a);
	assert_int_equal(vhost_dev_handle(d, &m, &reply), 0);
	assert_int_equal(send_state(d, VHOST_USER_SET_VRING_NUM, 8, &reply), 0);
	assert_int_equal(send_state(d, VHOST_USER_SET_VRING_BASE, base, &reply), 0);
	m = msg(VHOST_USER_SET_VRING_KICK, 8, NULL);
	m.fds[0] = eventfd(0, EFD_CLOEXEC);
	m.nfds = 1;
	assert_int_equal(vhost_dev_handle(d, &m, &reply), 0);
}

static void test_device_crash_and_base(void **state)
{
	struct hpk p;
	struct vhost_dev d;
	struct stub s = {0};
	struct vhost_msg m, reply;
	struct vhost_user_inflight inf = {.num_queues = 1, .queue_size = 8};
	uint64_t size;
	struct vhost_vq *vq;
	uint16_t id;
	uint32_t len;
	int fd;

	hp_init(&p, 8, false, false);
	p.features |= 1ull << VIRTIO_RING_F_EVENT_IDX;
	vhost_dev_init(&d, 1, p.features, &stub_ops, &s);
	assert_int_equal(send_u64(&d, VHOST_USER_SET_PROTOCOL_FEATURES,
				  1ull << VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD),
			 0);
	assert_int_equal(send_u64(&d, VHOST_USER_SET_FEATURES, p.features), 0);
	/* With RING_PACKED negotiated the region has the packed layout. */
	m = msg(VHOST_USER_GET_INFLIGHT_FD, sizeof(inf), &inf);
	assert_int_equal(vhost_dev_handle(&d, &m, &reply), 1);
	assert_int_equal(reply.nfds, 1);
	size = reply.p.inflight.mmap_size;
	assert_int_equal(size, vhost_inflight_packed_queue_size(8));
	fd = reply.fds[0];

	/* A base naming no slot, in either half, does not start the ring. */
	bring_up(&d, &p, fd, size, 8);
	assert_int_equal(s.starts, 0);
	assert_non_null(strstr(d.err, "not a position in a packed ring"));
	assert_int_equal(send_state(&d, VHOST_USER_SET_VRING_BASE, 0x00098000u, &reply), 0);
	assert_int_equal(s.starts, 0);
	/* A new base: the ring starts with it (its kick fd is still set). */
	assert_int_equal(send_state(&d, VHOST_USER_SET_VRING_BASE, 0x8000, &reply), 0);
	assert_int_equal(s.starts, 1);
	assert_int_equal(s.last.outcome, VHOST_INFLIGHT_FRESH);
	vq = &d.vring[0].vq;
	assert_true(vq->packed);
	assert_non_null(vq->pk.inflight);
	assert_true(vq->event_idx);

	/* The guest posts three buffers, we take them and finish one. */
	assert_true(hp_post1(&p, 0, H_DATA, 8));
	assert_true(hp_post1(&p, 1, H_DATA, 8));
	assert_true(hp_post1(&p, 2, H_DATA, 8));
	for (int i = 0; i < 3; i++)
		assert_int_equal(vhost_vq_pop(vq, &id), 1);
	vhost_vq_push(vq, 1, 8);
	vhost_vq_flush(vq);
	assert_true(hp_get_used(&p, &id, &len));

	/* kill -9: the process is gone, the front-end keeps its fd. */
	vhost_dev_reset(&d);
	vhost_dev_init(&d, 1, p.features, &stub_ops, &s);
	/* The base of the previous start, used position in bits 16-31 as
	 * QEMU 7.2 sends it. */
	bring_up(&d, &p, fd, size, 0x80008000u);
	assert_int_equal(s.starts, 2);
	assert_int_equal(s.last.outcome, VHOST_INFLIGHT_RECOVERED);
	assert_int_equal(s.last.nresubmit, 2);
	assert_int_equal(d.vring[0].nresubmit, 2);
	assert_int_equal(d.vring[0].resubmit[0], 0);
	assert_int_equal(d.vring[0].resubmit[1], 2);
	vq = &d.vring[0].vq;
	assert_int_equal(vq->last_avail_idx - vq->published_idx, 2);
	/* The device finishes them; GET_VRING_BASE answers the position with
	 * its wrap counter in bit 15. */
	vhost_vq_push(vq, 0, 8);
	vhost_vq_push(vq, 2, 8);
	vhost_vq_flush(vq);
	assert_int_equal(send_state(&d, VHOST_USER_GET_VRING_BASE, 0, &reply), 1);
	assert_int_equal(reply.p.state.num, 0x80038003u);

	/* A region scribbled on while nobody ran: the ring does not resume
	 * from a base that may be laps old; it is broken, and says why. */
	vhost_dev_reset(&d);
	{
		struct vhost_inflight_packed *q =
		    mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);

		assert_true(q != MAP_FAILED);
		q->desc[0].inflight = 7;
		munmap(q, size);
	}
	vhost_dev_init(&d, 1, p.features, &stub_ops, &s);
	bring_up(&d, &p, fd, size, 0x8000 | 3);
	assert_int_equal(s.last.outcome, VHOST_INFLIGHT_INVALID);
	vq = &d.vring[0].vq;
	assert_true(vq->broken);
	assert_int_equal(vhost_vq_pop(vq, &id), -EIO);
	/* A restart of the ring without a new base keeps it broken. */
	assert_int_equal(send_u64(&d, VHOST_USER_SET_VRING_CALL, 0x100), 0);
	assert_true(d.vring[0].started);
	assert_true(d.vring[0].vq.broken);
	vhost_dev_reset(&d);
	close(fd);
	hp_free(&p);
}

/* Bits 16-31 of SET_VRING_BASE are only a packed ring's. */
static void test_base_halves(void **state)
{
	struct vhost_dev d;
	struct stub s = {0};
	struct vhost_msg reply;

	vhost_dev_init(&d, 1, 1ull << VIRTIO_F_RING_PACKED, &stub_ops, &s);
	assert_int_equal(send_u64(&d, VHOST_USER_SET_FEATURES, 0), 0);
	assert_int_equal(send_state(&d, VHOST_USER_SET_VRING_BASE, 0x80008000u, &reply), 0);
	assert_int_equal(d.vring[0].base, 0);
	assert_non_null(strstr(d.err, "not a split-ring index"));
	assert_int_equal(send_u64(&d, VHOST_USER_SET_FEATURES, 1ull << VIRTIO_F_RING_PACKED), 0);
	assert_int_equal(send_state(&d, VHOST_USER_SET_VRING_BASE, 0x80058003u, &reply), 0);
	assert_int_equal(d.vring[0].base, 0x8003);
	assert_int_equal(d.vring[0].base_used, 0x8005);
	/* A ring that never ran answers what it was given, used = avail. */
	assert_int_equal(send_state(&d, VHOST_USER_GET_VRING_BASE, 0, &reply), 1);
	assert_int_equal(reply.p.state.num, 0x80038003u);
	vhost_dev_reset(&d);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_chain),
	    cmocka_unit_test(test_wrap_out_of_order),
	    cmocka_unit_test(test_slot_reuse_keeps_chain),
	    cmocka_unit_test(test_indirect),
	    cmocka_unit_test(test_bad_chains),
	    cmocka_unit_test(test_hostile_ring),
	    cmocka_unit_test(test_driver_event),
	    cmocka_unit_test(test_device_event),
	    cmocka_unit_test(test_dirty_log),
	    cmocka_unit_test(test_base_encoding),
	    cmocka_unit_test(test_recover_in_flight),
	    cmocka_unit_test(test_interrupted_return),
	    cmocka_unit_test(test_corrupt_region),
	    cmocka_unit_test(test_random_region),
	    cmocka_unit_test(test_device_crash_and_base),
	    cmocka_unit_test(test_base_halves),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
