// SPDX-License-Identifier: MIT
/*
 * Unit tests of in-flight tracking and recovery (lib/vhost/inflight.c with
 * the marking done by virtq.c). A "crash" is simulated by dropping the
 * struct vhost_vq mid-stream and recovering from the region and the guest
 * rings alone, exactly what a restarted back-end has: resubmission in fetch
 * order, the half-finished last batch, a lying last_batch_head, and regions
 * that are uninitialised or scribbled on.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "harness.h"

static void recover(struct harness *h, uint16_t base, uint16_t *resubmit,
		    struct vhost_inflight_recovery *out)
{
	vhost_inflight_recover(h->inflight, h->num, 0, (const volatile uint32_t *)h->used->ring,
			       h->used->idx, h->avail->idx, base, resubmit, out);
}

static void fetch(struct harness *h, unsigned n)
{
	uint16_t head;

	for (unsigned i = 0; i < n; i++)
		assert_int_equal(vhost_vq_pop(&h->vq, &head), 1);
}

static void test_fresh_region(void **state)
{
	struct harness h;
	struct vhost_inflight_recovery r;
	uint16_t resubmit[8];

	h_init(&h, 8, false, false);
	h.inflight = calloc(1, vhost_inflight_queue_size(8)); /* all zero: version 0 */
	recover(&h, 5, resubmit, &r);
	assert_int_equal(r.outcome, VHOST_INFLIGHT_FRESH);
	assert_int_equal(r.last_avail_idx, 5);
	assert_int_equal(r.nresubmit, 0);
	assert_int_equal(h.inflight->version, VHOST_INFLIGHT_VERSION);
	assert_int_equal(h.inflight->desc_num, 8);
	h_free(&h);
}

static void test_resubmit_in_fetch_order(void **state)
{
	static const uint16_t posted[] = {5, 2, 7, 0, 3};
	struct harness h;
	struct vhost_inflight_recovery r;
	uint16_t resubmit[8];

	h_init(&h, 8, false, false);
	h_inflight(&h);
	for (unsigned i = 0; i < 5; i++)
		h_post(&h, posted[i]);
	fetch(&h, 5);
	/* Complete 2 (head 7) and 0 out of order, then "crash". */
	vhost_vq_push(&h.vq, 7, 0);
	vhost_vq_push(&h.vq, 0, 0);
	vhost_vq_flush(&h.vq);
	recover(&h, h.used->idx, resubmit, &r);
	assert_int_equal(r.outcome, VHOST_INFLIGHT_RECOVERED);
	assert_int_equal(r.nresubmit, 3);
	assert_int_equal(resubmit[0], 5);
	assert_int_equal(resubmit[1], 2);
	assert_int_equal(resubmit[2], 3);
	assert_int_equal(r.last_avail_idx, 5); /* 2 used + 3 in flight */
	assert_int_equal(r.next_counter, 6);
	assert_int_equal(r.retired, 0);
	h_free(&h);
}

/* Crash between publishing used->idx and clearing the in-flight bits. */
static void half_batch(struct harness *h, uint16_t lying_batch_head)
{
	struct vhost_inflight_recovery r;
	uint16_t resubmit[8];

	for (uint16_t i = 0; i < 4; i++)
		h_post(h, (uint16_t)(6 - i)); /* heads 6,5,4,3 */
	fetch(h, 4);
	/* Back-end wrote two used elements and the batch link, published
	 * used->idx, and died before the flags and inflight->used_idx. */
	h->used->ring[0] = (struct vhost_used_elem){.id = 5};
	h->used->ring[1] = (struct vhost_used_elem){.id = 3};
	h->inflight->desc[5].next = 3;
	h->inflight->last_batch_head = lying_batch_head;
	h->used->idx = 2;
	recover(h, 2, resubmit, &r);
	assert_int_equal(r.outcome, VHOST_INFLIGHT_RECOVERED);
	assert_int_equal(r.retired, 2);
	assert_int_equal(r.nresubmit, 2);
	assert_int_equal(resubmit[0], 6);
	assert_int_equal(resubmit[1], 4);
	assert_int_equal(r.last_avail_idx, 4);
	assert_int_equal(h->inflight->used_idx, 2);
	assert_int_equal(h->inflight->desc[5].inflight, 0);
	assert_int_equal(h->inflight->desc[3].inflight, 0);
	assert_int_equal(r.batch_mismatch, lying_batch_head != 5);
}

static void test_half_finished_batch(void **state)
{
	struct harness h;

	h_init(&h, 8, false, false);
	h_inflight(&h);
	half_batch(&h, 5);
	h_free(&h);
}

static void test_bad_last_batch_head(void **state)
{
	struct harness h;

	/* last_batch_head far out of range: must not be used as an index,
	 * and must not change what is recovered. */
	h_init(&h, 8, false, false);
	h_inflight(&h);
	half_batch(&h, 0xffff);
	h_free(&h);
}

static void test_crash_before_publish(void **state)
{
	struct harness h;
	struct vhost_inflight_recovery r;
	uint16_t resubmit[8];

	h_init(&h, 8, false, false);
	h_inflight(&h);
	h_post(&h, 1);
	h_post(&h, 2);
	fetch(&h, 2);
	/* Used element written but used->idx not yet stored: still in flight. */
	h.used->ring[0] = (struct vhost_used_elem){.id = 1};
	recover(&h, 0, resubmit, &r);
	assert_int_equal(r.outcome, VHOST_INFLIGHT_RECOVERED);
	assert_int_equal(r.nresubmit, 2);
	assert_int_equal(r.last_avail_idx, 2);
	h_free(&h);
}

static void expect_invalid(struct harness *h, uint16_t base)
{
	struct vhost_inflight_recovery r;
	uint16_t resubmit[8];

	recover(h, base, resubmit, &r);
	assert_int_equal(r.outcome, VHOST_INFLIGHT_INVALID);
	assert_non_null(r.why);
	/* Fall back to the front-end's base: re-fetch, never skip. */
	assert_int_equal(r.last_avail_idx, base);
	assert_int_equal(r.nresubmit, 0);
	/* And the region is usable again. */
	assert_int_equal(h->inflight->version, VHOST_INFLIGHT_VERSION);
	for (unsigned i = 0; i < 8; i++)
		assert_int_equal(h->inflight->desc[i].inflight, 0);
}

static void test_garbage_regions(void **state)
{
	struct harness h;

	h_init(&h, 8, false, false);
	h_inflight(&h);
	h.inflight->version = 7;
	expect_invalid(&h, 3);

	h.inflight->desc_num = 16; /* another queue size */
	expect_invalid(&h, 0);

	h.inflight->desc[2].inflight = 2;
	h.inflight->desc[2].counter = 1;
	expect_invalid(&h, 0);

	/* Marked with no fetch counter. */
	h.avail->idx = 1;
	h.inflight->desc[2].inflight = 1;
	expect_invalid(&h, 0);

	/* More in flight than the guest has outstanding. */
	for (unsigned i = 0; i < 3; i++)
		h.inflight->desc[i] = (struct vhost_inflight_desc){.inflight = 1, .counter = i + 1};
	expect_invalid(&h, 0);

	/* Half batch whose used entry names a head beyond the ring. */
	h.used->ring[0].id = 99;
	h.used->idx = 1;
	expect_invalid(&h, 1);

	/* used->idx more than a ring ahead of the region. */
	h.used->idx = 12;
	h.avail->idx = 12;
	expect_invalid(&h, 12);

	/* Guest avail more than a ring ahead of used. */
	h.used->idx = 0;
	h.inflight->used_idx = 0;
	h.avail->idx = 9;
	expect_invalid(&h, 0);
	h_free(&h);
}

static void test_reposted_head_breaks_ring(void **state)
{
	struct harness h;
	uint16_t head;

	h_init(&h, 8, false, false);
	h_inflight(&h);
	h_post(&h, 4);
	h_post(&h, 4); /* same head while we still own it */
	assert_int_equal(vhost_vq_pop(&h.vq, &head), 1);
	assert_int_equal(vhost_vq_pop(&h.vq, &head), -EIO);
	assert_true(h.vq.broken);
	h_free(&h);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_fresh_region),
	    cmocka_unit_test(test_resubmit_in_fetch_order),
	    cmocka_unit_test(test_half_finished_batch),
	    cmocka_unit_test(test_bad_last_batch_head),
	    cmocka_unit_test(test_crash_before_publish),
	    cmocka_unit_test(test_garbage_regions),
	    cmocka_unit_test(test_reposted_head_breaks_ring),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
