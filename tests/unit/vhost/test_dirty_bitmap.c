// SPDX-License-Identifier: MIT
/*
 * Unit tests of vmig-blk's dirty bitmap on its own (tools/vmig-blk/dirty.c,
 * no daemon): marking at the edges of the disk, a last granule that is only
 * partly inside the disk, counting, takes bounded by bytes and by extent
 * count, where the next take goes on, and bad granularities. Then takes
 * under contention: writer threads store into a fake disk and then mark,
 * as the queue threads do, while a copier takes (with budgets that split
 * words, and few extents, so bits are given back) and then copies; once
 * the writers stop and the copier drained the bitmap, its copy must equal
 * the disk. In memory the window a wrong order would open (marking before
 * the store) is a few nanoseconds, too short to be hit reliably: that
 * order is tested end to end, through the daemon, in test_dirty.c.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "vmig-blk/blk.h"

#define G 4096u
#define DISK (256u * G + 512u) /* 257 granules, the last of 512 bytes */

static void test_new_checks(void **state)
{
	struct vblk_dirty *d = NULL;

	assert_int_equal(vblk_dirty_new(DISK, 3000, false, &d), -EINVAL);
	assert_int_equal(vblk_dirty_new(DISK, 2048, false, &d), -EINVAL);
	assert_int_equal(vblk_dirty_new(DISK, 128u << 20, false, &d), -EINVAL);
	assert_int_equal(vblk_dirty_new(0, G, false, &d), -EINVAL);
	assert_null(d);
	assert_int_equal(vblk_dirty_new(DISK, G, true, &d), 0);
	assert_int_equal(d->nbits, 257);
	assert_int_equal(d->nwords, 5);
	/* All dirty is exactly the disk: no bits past its end. */
	assert_int_equal(vblk_dirty_bytes(d), DISK);
	assert_int_equal(d->words[4], 1);
	vblk_dirty_free(d);
}

static void test_mark_edges(void **state)
{
	struct vblk_dirty *d;
	struct vblk_extent e[8];
	uint64_t bytes;

	assert_int_equal(vblk_dirty_new(DISK, G, false, &d), 0);
	assert_int_equal(vblk_dirty_mark(d, 0, 1), 1);
	assert_int_equal(vblk_dirty_mark(d, 0, G), 0);	   /* already set */
	assert_int_equal(vblk_dirty_mark(d, G - 1, 2), 1); /* into the next */
	assert_int_equal(vblk_dirty_bytes(d), 2 * G);
	/* Across a word boundary (bits 63, 64). */
	assert_int_equal(vblk_dirty_mark(d, 63ull * G, 2 * G), 2);
	/* The partial last granule counts as its 512 bytes. */
	assert_int_equal(vblk_dirty_mark(d, DISK - 512, 512), 1);
	assert_int_equal(vblk_dirty_bytes(d), 4 * G + 512);
	/* Clipped to the disk; nothing past it, nothing for 0 bytes. */
	assert_int_equal(vblk_dirty_mark(d, DISK - 512, 1u << 20), 0);
	assert_int_equal(vblk_dirty_mark(d, DISK, G), 0);
	assert_int_equal(vblk_dirty_mark(d, UINT64_MAX - 10, 100), 0);
	assert_int_equal(vblk_dirty_mark(d, 10 * G, 0), 0);
	assert_int_equal(vblk_dirty_take(d, UINT64_MAX >> 1, e, 8, &bytes), 3);
	assert_int_equal(e[0].offset, 0);
	assert_int_equal(e[0].length, 2 * G);
	assert_int_equal(e[1].offset, 63ull * G);
	assert_int_equal(e[1].length, 2 * G);
	assert_int_equal(e[2].offset, 256ull * G);
	assert_int_equal(e[2].length, 512);
	assert_int_equal(bytes, 4 * G + 512);
	assert_int_equal(vblk_dirty_bytes(d), 0);
	/* The whole disk at once: one extent, clipped. */
	assert_int_equal(vblk_dirty_mark(d, 0, DISK), 257);
	assert_int_equal(vblk_dirty_take(d, UINT64_MAX >> 1, e, 8, &bytes), 1);
	assert_int_equal(e[0].length, DISK);
	vblk_dirty_free(d);
}

static void test_take_bounds(void **state)
{
	struct vblk_dirty *d;
	struct vblk_extent e[4];
	uint64_t bytes, total = 0;
	size_t n;

	assert_int_equal(vblk_dirty_new(DISK, G, false, &d), 0);
	/* Every other granule: 129 extents of one granule (the last 512 B). */
	for (uint64_t g = 0; g < 257; g += 2)
		vblk_dirty_mark(d, g * G, 1);
	/* At most 4 extents per take; the rest stays, and the next take
	 * goes on after them, in disk order. */
	for (uint64_t want = 0; want < 256; want += 8) {
		n = vblk_dirty_take(d, 1u << 30, e, 4, &bytes);
		assert_int_equal(n, 4);
		assert_int_equal(e[0].offset, want * G);
		assert_int_equal(e[3].offset, (want + 6) * G);
		total += bytes;
	}
	n = vblk_dirty_take(d, 1u << 30, e, 4, &bytes);
	assert_int_equal(n, 1);
	assert_int_equal(e[0].offset, 256ull * G);
	total += bytes;
	assert_int_equal(total, 128 * G + 512);
	assert_int_equal(vblk_dirty_take(d, 1u << 30, e, 4, &bytes), 0);
	/* A byte budget takes whole granules, at least one. */
	vblk_dirty_mark(d, 0, 10 * G);
	assert_int_equal(vblk_dirty_take(d, 1, e, 4, &bytes), 1);
	assert_int_equal(bytes, G);
	assert_int_equal(vblk_dirty_take(d, 3 * G + 1, e, 4, &bytes), 1);
	assert_int_equal(e[0].offset, G);
	assert_int_equal(bytes, 3 * G);
	/* Wrapping around: what is left before the cursor comes last. */
	vblk_dirty_mark(d, 200ull * G, G);
	assert_int_equal(vblk_dirty_take(d, 1u << 30, e, 4, &bytes), 2);
	assert_int_equal(e[0].offset, 4ull * G); /* 4..9 */
	assert_int_equal(e[1].offset, 200ull * G);
	vblk_dirty_mark(d, 0, G);
	assert_int_equal(vblk_dirty_take(d, 1u << 30, e, 4, &bytes), 1);
	assert_int_equal(e[0].offset, 0);
	vblk_dirty_free(d);
}

/* ---- the ordering contract under contention ---- */

#define RACE_GRANULES 4096u
#define RACE_WRITES 300000u
#define RACE_WRITERS 2
#define RACE_MIN_TAKES 100u

static struct vblk_dirty *race_d;
static unsigned race_takes;		  /* atomic: takes done so far */
static uint64_t race_disk[RACE_GRANULES]; /* one "block" per granule */

struct writer_arg {
	uint64_t id;
	uint64_t rng;
};

static void *race_writer(void *p)
{
	struct writer_arg *a = p;

	/* At least RACE_WRITES, and on until the copier has taken
	 * RACE_MIN_TAKES times: however the threads are scheduled, the takes
	 * race with writes. */
	for (uint64_t i = 1;
	     i <= RACE_WRITES || __atomic_load_n(&race_takes, __ATOMIC_RELAXED) < RACE_MIN_TAKES;
	     i++) {
		uint64_t g;

		a->rng ^= a->rng << 13;
		a->rng ^= a->rng >> 7;
		a->rng ^= a->rng << 17;
		g = a->rng % RACE_GRANULES;
		/* The "I/O", then the mark: as the queue thread does. */
		__atomic_store_n(&race_disk[g], a->id << 32 | i, __ATOMIC_RELAXED);
		vblk_dirty_mark(race_d, g * G, G);
	}
	return NULL;
}

static unsigned race_copy(uint64_t *shadow, uint64_t budget)
{
	struct vblk_extent e[16];
	uint64_t bytes;
	size_t n = vblk_dirty_take(race_d, budget, e, 16, &bytes);

	for (size_t i = 0; i < n; i++)
		for (uint64_t g = e[i].offset / G; g < (e[i].offset + e[i].length) / G; g++)
			shadow[g] = __atomic_load_n(&race_disk[g], __ATOMIC_RELAXED);
	return (unsigned)n;
}

static void test_race(void **state)
{
	static uint64_t shadow[RACE_GRANULES];
	struct writer_arg args[RACE_WRITERS];
	pthread_t th[RACE_WRITERS];
	unsigned takes = 0;

	__atomic_store_n(&race_takes, 0, __ATOMIC_RELAXED);
	assert_int_equal(vblk_dirty_new(RACE_GRANULES * G, G, true, &race_d), 0);
	for (unsigned i = 0; i < RACE_WRITERS; i++) {
		args[i] = (struct writer_arg){i + 1, 0x9e3779b97f4a7c15ull * (i + 1)};
		assert_int_equal(pthread_create(&th[i], NULL, race_writer, &args[i]), 0);
	}
	/* Bounded: the writers end, and so does this. */
	for (unsigned i = 0; i < RACE_WRITERS; i++) {
		while (pthread_tryjoin_np(th[i], NULL) == EBUSY) {
			race_copy(shadow, (1 + takes % 5) * G);
			__atomic_store_n(&race_takes, ++takes, __ATOMIC_RELAXED);
		}
	}
	while (race_copy(shadow, 1u << 30))
		;
	for (unsigned g = 0; g < RACE_GRANULES; g++)
		if (shadow[g] != race_disk[g])
			fail_msg("granule %u: copied %llx, disk holds %llx (after %u takes)", g,
				 (unsigned long long)shadow[g], (unsigned long long)race_disk[g],
				 takes);
	assert_true(takes >= RACE_MIN_TAKES);
	vblk_dirty_free(race_d);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_new_checks),
	    cmocka_unit_test(test_mark_edges),
	    cmocka_unit_test(test_take_bounds),
	    cmocka_unit_test(test_race),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
