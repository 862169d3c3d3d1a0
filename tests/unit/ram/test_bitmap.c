// SPDX-License-Identifier: MIT
/*
 * Unit tests for lib/ram/bitmap: every operation is checked against a naive
 * bit-by-bit model, with the edges that word-at-a-time code gets wrong: word
 * boundaries, nbits not a multiple of 64, empty maps and stray bits past
 * nbits in the last word.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "ram/bitmap.h"

#define MAXBITS 320
#define MAXWORDS (MAXBITS / 64)

static uint64_t naive_find(const uint64_t *map, uint64_t nbits, uint64_t from, bool want)
{
	for (uint64_t b = from; b < nbits; b++)
		if (vmig__bitmap_test(map, b) == want)
			return b;
	return nbits;
}

/* xorshift64: deterministic patterns without libc state. */
static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void test_words(void **state)
{
	(void)state;
	assert_int_equal(vmig__bitmap_words(0), 0);
	assert_int_equal(vmig__bitmap_words(1), 1);
	assert_int_equal(vmig__bitmap_words(63), 1);
	assert_int_equal(vmig__bitmap_words(64), 1);
	assert_int_equal(vmig__bitmap_words(65), 2);
	assert_int_equal(vmig__bitmap_words(1ull << 20), 1ull << 14);
}

static void test_set_clear_test(void **state)
{
	static const uint64_t bits[] = {0, 1, 62, 63, 64, 65, 127, 128, 191, 255, 256, 319};
	uint64_t map[MAXWORDS] = {0};

	(void)state;
	for (size_t i = 0; i < sizeof(bits) / sizeof(bits[0]); i++) {
		assert_false(vmig__bitmap_test(map, bits[i]));
		vmig__bitmap_set(map, bits[i]);
		assert_true(vmig__bitmap_test(map, bits[i]));
	}
	assert_int_equal(vmig__bitmap_count(map, MAXBITS), sizeof(bits) / sizeof(bits[0]));
	assert_int_equal(map[0], 0x8000000000000003ull | (1ull << 62));
	assert_int_equal(map[1], 0x8000000000000003ull);
	for (size_t i = 0; i < sizeof(bits) / sizeof(bits[0]); i++) {
		vmig__bitmap_clear(map, bits[i]);
		assert_false(vmig__bitmap_test(map, bits[i]));
	}
	for (int w = 0; w < MAXWORDS; w++)
		assert_int_equal(map[w], 0);
}

static void test_atomic(void **state)
{
	uint64_t map[2] = {0};

	(void)state;
	vmig__bitmap_set_atomic(map, 63);
	vmig__bitmap_set_atomic(map, 64);
	assert_int_equal(map[0], 1ull << 63);
	assert_int_equal(map[1], 1);
	assert_true(vmig__bitmap_test_and_clear_atomic(map, 63));
	assert_false(vmig__bitmap_test_and_clear_atomic(map, 63));
	assert_int_equal(map[0], 0);
	assert_true(vmig__bitmap_test_and_clear_atomic(map, 64));
	assert_int_equal(map[1], 0);
}

static void test_find_empty_and_edges(void **state)
{
	uint64_t map[MAXWORDS];

	(void)state;
	memset(map, 0, sizeof(map));
	assert_int_equal(vmig__bitmap_find_next(map, 0, 0), 0);
	assert_int_equal(vmig__bitmap_find_next_zero(map, 0, 0), 0);
	assert_int_equal(vmig__bitmap_find_next(map, 100, 0), 100);
	assert_int_equal(vmig__bitmap_find_next(map, 100, 500), 100);
	assert_int_equal(vmig__bitmap_find_next_zero(map, 100, 99), 99);
	assert_int_equal(vmig__bitmap_find_next_zero(map, 100, 100), 100);
	assert_int_equal(vmig__bitmap_count(map, 0), 0);

	/* Stray bits past nbits must be invisible. */
	map[1] = ~0ull << 36; /* bits 100.. set */
	assert_int_equal(vmig__bitmap_find_next(map, 100, 0), 100);
	assert_int_equal(vmig__bitmap_count(map, 100), 0);
	assert_int_equal(vmig__bitmap_find_next(map, 101, 0), 100);

	/* All ones: no zero below nbits, even with nbits at a word edge. */
	memset(map, 0xff, sizeof(map));
	assert_int_equal(vmig__bitmap_find_next_zero(map, 128, 0), 128);
	assert_int_equal(vmig__bitmap_find_next_zero(map, 130, 5), 130);
	assert_int_equal(vmig__bitmap_count(map, 130), 130);
	assert_int_equal(vmig__bitmap_find_next(map, 130, 129), 129);
	vmig__bitmap_clear(map, 64);
	assert_int_equal(vmig__bitmap_find_next_zero(map, 130, 0), 64);
	assert_int_equal(vmig__bitmap_find_next_zero(map, 64, 0), 64);
}

static void test_find_random(void **state)
{
	uint64_t map[MAXWORDS], seed = 0x9e3779b97f4a7c15ull;

	(void)state;
	for (int round = 0; round < 200; round++) {
		uint64_t nbits = rnd(&seed) % (MAXBITS + 1);

		for (int w = 0; w < MAXWORDS; w++) /* sparse or dense patterns */
			map[w] = round % 2 ? rnd(&seed) & rnd(&seed) & rnd(&seed)
					   : rnd(&seed) | rnd(&seed);
		for (uint64_t from = 0; from <= nbits + 2; from++) {
			assert_int_equal(vmig__bitmap_find_next(map, nbits, from),
					 naive_find(map, nbits, from, true));
			assert_int_equal(vmig__bitmap_find_next_zero(map, nbits, from),
					 naive_find(map, nbits, from, false));
		}
		uint64_t n = 0;
		for (uint64_t b = 0; b < nbits; b++)
			n += vmig__bitmap_test(map, b);
		assert_int_equal(vmig__bitmap_count(map, nbits), n);
	}
}

/* Every (start, n) in a window crossing three word boundaries. */
static void test_ranges_exhaustive(void **state)
{
	uint64_t map[MAXWORDS], model[MAXWORDS];

	(void)state;
	for (uint64_t start = 0; start < 200; start++) {
		for (uint64_t n = 0; start + n <= MAXBITS && n < 200; n++) {
			memset(map, 0, sizeof(map));
			memset(model, 0, sizeof(model));
			vmig__bitmap_set_range(map, start, n);
			for (uint64_t b = start; b < start + n; b++)
				vmig__bitmap_set(model, b);
			assert_memory_equal(map, model, sizeof(map));

			/* set_range_count on a half-filled map counts only new bits. */
			uint64_t added = 0;
			for (int w = 0; w < MAXWORDS; w++)
				map[w] = model[w] = 0x5555555555555555ull;
			for (uint64_t b = start; b < start + n; b++) {
				added += !vmig__bitmap_test(model, b);
				vmig__bitmap_set(model, b);
			}
			assert_int_equal(vmig__bitmap_set_range_count(map, start, n), added);
			assert_memory_equal(map, model, sizeof(map));

			memset(map, 0xff, sizeof(map));
			memset(model, 0xff, sizeof(model));
			vmig__bitmap_clear_range(map, start, n);
			for (uint64_t b = start; b < start + n; b++)
				vmig__bitmap_clear(model, b);
			assert_memory_equal(map, model, sizeof(map));
		}
	}
}

static void test_or(void **state)
{
	uint64_t dst[3] = {0x1, 0, 0}, src[3] = {0x2, ~0ull, ~0ull};

	(void)state;
	/* 130 bits: src's word 2 only contributes bits 128 and 129. */
	vmig__bitmap_or(dst, src, 130);
	assert_int_equal(dst[0], 0x3);
	assert_int_equal(dst[1], ~0ull);
	assert_int_equal(dst[2], 0x3);
	/* Multiple of 64: whole words, nothing past them touched. */
	uint64_t d2[3] = {0, 0, 0x10};
	vmig__bitmap_or(d2, src, 128);
	assert_int_equal(d2[0], 0x2);
	assert_int_equal(d2[1], ~0ull);
	assert_int_equal(d2[2], 0x10);
	/* Empty. */
	uint64_t d3[1] = {0};
	vmig__bitmap_or(d3, src, 0);
	assert_int_equal(d3[0], 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_words),	cmocka_unit_test(test_set_clear_test),
	    cmocka_unit_test(test_atomic),	cmocka_unit_test(test_find_empty_and_edges),
	    cmocka_unit_test(test_find_random), cmocka_unit_test(test_ranges_exhaustive),
	    cmocka_unit_test(test_or),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
