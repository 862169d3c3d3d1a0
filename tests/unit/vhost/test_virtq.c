// SPDX-License-Identifier: MIT
/*
 * Unit tests of the split-virtqueue data path (lib/vhost/virtq.c) on rings
 * built in memfd-backed fake guest RAM: chain resolution (direct, indirect,
 * across regions), every rejection a hostile guest can trigger (loops,
 * chains longer than the ring, out-of-table addresses, bad flags, too many
 * segments), used-ring publication, EVENT_IDX on both sides (with the
 * need-event rule across the 16-bit wrap), kick suppression while the
 * back-end polls, and dirty logging of what the back-end writes.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "harness.h"

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

static void test_direct_chain(void **state)
{
	struct harness h;
	struct chain_buf b;
	uint16_t head;

	h_init(&h, 8, false, false);
	memcpy(h_gpa(&h, H_DATA), "header", 6);
	h_set_desc(&h, h.desc, 3, H_DATA, 16, VHOST_DESC_F_NEXT, 5);
	h_set_desc(&h, h.desc, 5, H_DATA + 0x1000, 4096, VHOST_DESC_F_NEXT | VHOST_DESC_F_WRITE, 1);
	h_set_desc(&h, h.desc, 1, H_DATA + 0x3000, 1, VHOST_DESC_F_WRITE, 0);
	assert_int_equal(vhost_vq_pop(&h.vq, &head), 0);
	h_post(&h, 3);
	assert_int_equal(vhost_vq_pop(&h.vq, &head), 1);
	assert_int_equal(head, 3);
	assert_int_equal(vhost_vq_map_chain(&h.vq, head, chain_init(&b, IOV_MAX_T)), 0);
	assert_int_equal(b.c.nout, 1);
	assert_int_equal(b.c.nin, 2);
	assert_memory_equal(b.iov[0].iov_base, "header", 6);
	assert_int_equal(b.iov[1].iov_len, 4096);
	assert_int_equal(b.gpa[2], H_DATA + 0x3000);
	/* The back-end's mapping and the guest's are the same memory. */
	memset(b.iov[1].iov_base, 0xab, 4096);
	assert_int_equal(((uint8_t *)h_gpa(&h, H_DATA + 0x1000))[4095], 0xab);
	h_free(&h);
}

static void test_chain_split_across_regions(void **state)
{
	struct harness h;
	struct chain_buf b;

	h_init(&h, 8, false, false);
	/* 8 KiB straddling the boundary of the two (adjacent) regions. */
	h_set_desc(&h, h.desc, 0, H_REGION - 4096, 8192, 0, 0);
	assert_int_equal(vhost_vq_map_chain(&h.vq, 0, chain_init(&b, IOV_MAX_T)), 0);
	assert_int_equal(b.c.nout, 2);
	assert_int_equal(b.iov[0].iov_len, 4096);
	assert_int_equal(b.iov[1].iov_len, 4096);
	assert_int_equal(b.gpa[1], H_REGION);
	h_free(&h);
}

static void test_outside_memory_table(void **state)
{
	struct harness h;
	struct chain_buf b;

	h_init(&h, 8, false, false);
	h_set_desc(&h, h.desc, 0, 2 * H_REGION, 16, 0, 0); /* unmapped */
	assert_int_equal(vhost_vq_map_chain(&h.vq, 0, chain_init(&b, IOV_MAX_T)), -EFAULT);
	h_set_desc(&h, h.desc, 0, 2 * H_REGION - 8, 16, 0, 0); /* runs off the end */
	assert_int_equal(vhost_vq_map_chain(&h.vq, 0, chain_init(&b, IOV_MAX_T)), -EFAULT);
	h_set_desc(&h, h.desc, 0, UINT64_MAX - 7, 16, 0, 0); /* wraps */
	assert_int_equal(vhost_vq_map_chain(&h.vq, 0, chain_init(&b, IOV_MAX_T)), -EFAULT);
	h_free(&h);
}

static void test_loops_and_long_chains(void **state)
{
	struct harness h;
	struct chain_buf b;

	h_init(&h, 8, false, true);
	/* Self loop. */
	h_set_desc(&h, h.desc, 2, H_DATA, 0, VHOST_DESC_F_NEXT, 2);
	assert_int_equal(vhost_vq_map_chain(&h.vq, 2, chain_init(&b, IOV_MAX_T)), -ELOOP);
	/* A cycle through every descriptor: longer than the ring. */
	for (uint16_t i = 0; i < 8; i++)
		h_set_desc(&h, h.desc, i, H_DATA, 0, VHOST_DESC_F_NEXT, (uint16_t)((i + 1) % 8));
	assert_int_equal(vhost_vq_map_chain(&h.vq, 0, chain_init(&b, IOV_MAX_T)), -ELOOP);
	/* A loop inside an indirect table. */
	struct vhost_desc *ind = h_gpa(&h, H_INDIRECT);
	h_set_desc(&h, ind, 0, H_DATA, 0, VHOST_DESC_F_NEXT, 1);
	h_set_desc(&h, ind, 1, H_DATA, 0, VHOST_DESC_F_NEXT, 0);
	h_set_desc(&h, h.desc, 0, H_INDIRECT, 2 * 16, VHOST_DESC_F_INDIRECT, 0);
	assert_int_equal(vhost_vq_map_chain(&h.vq, 0, chain_init(&b, IOV_MAX_T)), -ELOOP);
	/* next beyond the ring. */
	h_set_desc(&h, h.desc, 0, H_DATA, 16, VHOST_DESC_F_NEXT, 8);
	assert_int_equal(vhost_vq_map_chain(&h.vq, 0, chain_init(&b, IOV_MAX_T)), -EINVAL);
	h_free(&h);
}

static void test_indirect(void **state)
{
	struct harness h;
	struct chain_buf b;
	struct vhost_desc *ind;

	h_init(&h, 8, false, true);
	ind = h_gpa(&h, H_INDIRECT);
	h_set_desc(&h, ind, 0, H_DATA, 16, VHOST_DESC_F_NEXT, 1);
	h_set_desc(&h, ind, 1, H_DATA + 0x1000, 512, VHOST_DESC_F_NEXT | VHOST_DESC_F_WRITE, 2);
	h_set_desc(&h, ind, 2, H_DATA + 0x2000, 1, VHOST_DESC_F_WRITE, 0);
	h_set_desc(&h, h.desc, 4, H_INDIRECT, 3 * 16, VHOST_DESC_F_INDIRECT, 0);
	assert_int_equal(vhost_vq_map_chain(&h.vq, 4, chain_init(&b, IOV_MAX_T)), 0);
	assert_int_equal(b.c.head, 4);
	assert_int_equal(b.c.nout, 1);
	assert_int_equal(b.c.nin, 2);
	assert_int_equal(b.gpa[1], H_DATA + 0x1000);

	/* Not negotiated. */
	h.vq.indirect = false;
	assert_int_equal(vhost_vq_map_chain(&h.vq, 4, chain_init(&b, IOV_MAX_T)), -EINVAL);
	h.vq.indirect = true;
	/* INDIRECT together with NEXT. */
	h_set_desc(&h, h.desc, 4, H_INDIRECT, 3 * 16, VHOST_DESC_F_INDIRECT | VHOST_DESC_F_NEXT, 0);
	assert_int_equal(vhost_vq_map_chain(&h.vq, 4, chain_init(&b, IOV_MAX_T)), -EINVAL);
	/* Table length not a multiple of a descriptor, or empty. */
	h_set_desc(&h, h.desc, 4, H_INDIRECT, 3 * 16 + 1, VHOST_DESC_F_INDIRECT, 0);
	assert_int_equal(vhost_vq_map_chain(&h.vq, 4, chain_init(&b, IOV_MAX_T)), -EINVAL);
	h_set_desc(&h, h.desc, 4, H_INDIRECT, 0, VHOST_DESC_F_INDIRECT, 0);
	assert_int_equal(vhost_vq_map_chain(&h.vq, 4, chain_init(&b, IOV_MAX_T)), -EINVAL);
	/* Nested indirect. */
	h_set_desc(&h, ind, 2, H_INDIRECT, 16, VHOST_DESC_F_INDIRECT, 0);
	h_set_desc(&h, h.desc, 4, H_INDIRECT, 3 * 16, VHOST_DESC_F_INDIRECT, 0);
	assert_int_equal(vhost_vq_map_chain(&h.vq, 4, chain_init(&b, IOV_MAX_T)), -EINVAL);
	/* Table outside guest memory. */
	h_set_desc(&h, h.desc, 4, 2 * H_REGION, 32, VHOST_DESC_F_INDIRECT, 0);
	assert_int_equal(vhost_vq_map_chain(&h.vq, 4, chain_init(&b, IOV_MAX_T)), -EFAULT);
	h_free(&h);
}

static void test_bad_layout(void **state)
{
	struct harness h;
	struct chain_buf b;

	h_init(&h, 8, false, false);
	/* Device-readable after device-writable. */
	h_set_desc(&h, h.desc, 0, H_DATA, 16, VHOST_DESC_F_NEXT | VHOST_DESC_F_WRITE, 1);
	h_set_desc(&h, h.desc, 1, H_DATA, 16, 0, 0);
	assert_int_equal(vhost_vq_map_chain(&h.vq, 0, chain_init(&b, IOV_MAX_T)), -EINVAL);
	/* More segments than the caller has iovecs for. */
	for (uint16_t i = 0; i < 7; i++)
		h_set_desc(&h, h.desc, i, H_DATA, 16, VHOST_DESC_F_NEXT, (uint16_t)(i + 1));
	h_set_desc(&h, h.desc, 7, H_DATA, 16, 0, 0);
	assert_int_equal(vhost_vq_map_chain(&h.vq, 0, chain_init(&b, 4)), -E2BIG);
	assert_int_equal(vhost_vq_map_chain(&h.vq, 0, chain_init(&b, 8)), 0);
	h_free(&h);
}

static void test_broken_avail(void **state)
{
	struct harness h;
	uint16_t head;

	h_init(&h, 8, false, false);
	h_post(&h, 9); /* head out of range */
	assert_int_equal(vhost_vq_pop(&h.vq, &head), -EIO);
	assert_true(h.vq.broken);
	h_free(&h);

	h_init(&h, 8, false, false);
	h.avail->idx = 9; /* more than a ring ahead */
	assert_int_equal(vhost_vq_pop(&h.vq, &head), -EIO);
	h_free(&h);
}

static void test_used_and_notify(void **state)
{
	struct harness h;
	uint16_t head;

	h_init(&h, 8, false, false);
	for (uint16_t i = 0; i < 3; i++)
		h_post(&h, i);
	for (uint16_t i = 0; i < 3; i++)
		assert_int_equal(vhost_vq_pop(&h.vq, &head), 1);
	vhost_vq_push(&h.vq, 2, 100);
	vhost_vq_push(&h.vq, 0, 200);
	assert_int_equal(h.used->idx, 0); /* staged, not visible */
	assert_true(vhost_vq_flush(&h.vq));
	assert_int_equal(h.used->idx, 2);
	assert_int_equal(h.used->ring[0].id, 2);
	assert_int_equal(h.used->ring[1].len, 200);
	assert_false(vhost_vq_flush(&h.vq)); /* nothing new */
	h.avail->flags = VHOST_AVAIL_F_NO_INTERRUPT;
	vhost_vq_push(&h.vq, 1, 0);
	assert_false(vhost_vq_flush(&h.vq));
	assert_int_equal(h.used->idx, 3);
	h_free(&h);
}

static void test_event_idx(void **state)
{
	struct harness h;
	volatile uint16_t *used_event, *avail_event;
	uint16_t head;

	h_init(&h, 8, true, false);
	used_event = &h.avail->ring[8];
	avail_event = (uint16_t *)&h.used->ring[8];
	for (uint16_t i = 0; i < 4; i++)
		h_post(&h, i);
	for (uint16_t i = 0; i < 4; i++)
		assert_int_equal(vhost_vq_pop(&h.vq, &head), 1);
	/* Driver wants an interrupt once used passes index 1. */
	*used_event = 1;
	vhost_vq_push(&h.vq, 0, 0);
	assert_false(vhost_vq_flush(&h.vq)); /* used 0 -> 1: event 1 not crossed */
	vhost_vq_push(&h.vq, 1, 0);
	assert_true(vhost_vq_flush(&h.vq)); /* 1 -> 2 crosses */
	vhost_vq_push(&h.vq, 2, 0);
	assert_false(vhost_vq_flush(&h.vq)); /* already signalled past it */
	/* Device side: avail_event tells the driver when to kick. */
	assert_false(vhost_vq_enable_notify(&h.vq));
	assert_int_equal(*avail_event, 4);
	h_post(&h, 4);
	assert_true(vhost_vq_enable_notify(&h.vq)); /* raced: keep going */
	h_free(&h);
}

static void test_need_event_wraparound(void **state)
{
	/* Plain cases: the event index lies in [old, new). */
	assert_true(vhost_need_event(5, 6, 5));
	assert_false(vhost_need_event(6, 6, 5));
	assert_false(vhost_need_event(4, 6, 5));
	assert_true(vhost_need_event(3, 10, 0));
	/* Across the 16-bit wrap: old 0xfffe, new 2 covers 0xfffe..1. */
	assert_true(vhost_need_event(0xfffe, 2, 0xfffe));
	assert_true(vhost_need_event(0xffff, 2, 0xfffe));
	assert_true(vhost_need_event(0, 2, 0xfffe));
	assert_true(vhost_need_event(1, 2, 0xfffe));
	assert_false(vhost_need_event(2, 2, 0xfffe));
	assert_false(vhost_need_event(0xfffd, 2, 0xfffe));
	/* Nothing moved: never. A stale event far behind: not crossed. */
	assert_false(vhost_need_event(7, 7, 7));
	assert_false(vhost_need_event((uint16_t)(100 - 40000), 100, 90));
}

/* Without EVENT_IDX, polling suppresses kicks with VRING_USED_F_NO_NOTIFY. */
static void test_poll_notify_flags(void **state)
{
	struct harness h;
	uint16_t head;

	h_init(&h, 8, false, false);
	h_log(&h, true);
	assert_false(vhost_vq_avail_pending(&h.vq));
	vhost_vq_disable_notify(&h.vq);
	assert_int_equal(h.used->flags, VHOST_USED_F_NO_NOTIFY);
	assert_true(h_dirty(&h, H_USED)); /* logged: it is a guest-visible write */
	h_post(&h, 0);
	assert_true(vhost_vq_avail_pending(&h.vq));
	/* A buffer posted while we polled: enabling finds it, keep going. */
	assert_true(vhost_vq_enable_notify(&h.vq));
	assert_int_equal(h.used->flags, 0);
	assert_int_equal(vhost_vq_pop(&h.vq, &head), 1);
	assert_false(vhost_vq_avail_pending(&h.vq));
	assert_false(vhost_vq_enable_notify(&h.vq)); /* empty: sleep */
	assert_int_equal(h.used->flags, 0);
	h_free(&h);
}

/* With EVENT_IDX, polling leaves avail_event behind, so the driver (whose
 * kick test is vhost_need_event(avail_event, new, old)) stays quiet. */
static void test_poll_event_idx(void **state)
{
	struct harness h;
	volatile uint16_t *avail_event;
	uint16_t head;

	h_init(&h, 8, true, false);
	avail_event = (uint16_t *)&h.used->ring[8];
	assert_false(vhost_vq_enable_notify(&h.vq));
	assert_int_equal(*avail_event, 0);
	/* Driver posts 0 -> 1: event 0 crossed, it kicks; we start polling. */
	h_post(&h, 0);
	assert_true(vhost_need_event(*avail_event, 1, 0));
	vhost_vq_disable_notify(&h.vq);
	assert_int_equal(h.used->flags, 0); /* flags are not used with EVENT_IDX */
	assert_int_equal(vhost_vq_pop(&h.vq, &head), 1);
	/* While we poll, the next posts (1 -> 2 -> 3) cross nothing. */
	h_post(&h, 1);
	assert_false(vhost_need_event(*avail_event, 2, 1));
	h_post(&h, 2);
	assert_false(vhost_need_event(*avail_event, 3, 2));
	assert_int_equal(vhost_vq_pop(&h.vq, &head), 1);
	assert_int_equal(vhost_vq_pop(&h.vq, &head), 1);
	/* Going to sleep: avail_event = 3, the next post kicks again. */
	assert_false(vhost_vq_enable_notify(&h.vq));
	assert_int_equal(*avail_event, 3);
	h_post(&h, 3);
	assert_true(vhost_need_event(*avail_event, 4, 3));
	h_free(&h);
}

static void test_dirty_log(void **state)
{
	struct harness h;
	struct chain_buf b;
	uint16_t head;

	h_init(&h, 8, false, false);
	h_log(&h, true);
	h_set_desc(&h, h.desc, 0, H_DATA, 16, VHOST_DESC_F_NEXT, 1);
	h_set_desc(&h, h.desc, 1, H_DATA + 0x5000, 8192, VHOST_DESC_F_NEXT | VHOST_DESC_F_WRITE, 2);
	h_set_desc(&h, h.desc, 2, H_REGION + 0x7000, 1, VHOST_DESC_F_WRITE, 0);
	h_post(&h, 0);
	assert_int_equal(vhost_vq_pop(&h.vq, &head), 1);
	assert_int_equal(vhost_vq_map_chain(&h.vq, head, chain_init(&b, IOV_MAX_T)), 0);
	vhost_vq_log_chain(&h.vq, &b.c);
	assert_false(h_dirty(&h, H_DATA)); /* read-only data is not logged */
	assert_true(h_dirty(&h, H_DATA + 0x5000));
	assert_true(h_dirty(&h, H_DATA + 0x6000));
	assert_false(h_dirty(&h, H_DATA + 0x7000));
	assert_true(h_dirty(&h, H_REGION + 0x7000));
	assert_false(h_dirty(&h, H_USED));
	vhost_vq_push(&h.vq, head, 8193);
	vhost_vq_flush(&h.vq);
	assert_true(h_dirty(&h, H_USED));
	h_free(&h);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_direct_chain),
	    cmocka_unit_test(test_chain_split_across_regions),
	    cmocka_unit_test(test_outside_memory_table),
	    cmocka_unit_test(test_loops_and_long_chains),
	    cmocka_unit_test(test_indirect),
	    cmocka_unit_test(test_bad_layout),
	    cmocka_unit_test(test_broken_avail),
	    cmocka_unit_test(test_used_and_notify),
	    cmocka_unit_test(test_event_idx),
	    cmocka_unit_test(test_need_event_wraparound),
	    cmocka_unit_test(test_poll_notify_flags),
	    cmocka_unit_test(test_poll_event_idx),
	    cmocka_unit_test(test_dirty_log),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
