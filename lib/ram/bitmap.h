/* SPDX-License-Identifier: MIT */
/*
 * Plain word bitmaps for dirty-page bookkeeping: an array of uint64_t where
 * bit i (word i / 64, bit i % 64) stands for page i. Callers size the array
 * with vmig__bitmap_words(nbits). Bits at positions >= nbits in the last word
 * are never read by the range functions (they mask them), but they should be
 * kept zero so word-wise OR stays meaningful.
 *
 * The non-atomic helpers assume one writer at a time. The *_atomic helpers
 * are for maps that several threads update concurrently (e.g. a fault thread
 * setting bits while the migration thread collects them).
 */
#ifndef VMIG_RAM_BITMAP_H
#define VMIG_RAM_BITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VMIG__BITS_PER_WORD 64u

static inline size_t vmig__bitmap_words(uint64_t nbits)
{
	return (size_t)((nbits + VMIG__BITS_PER_WORD - 1) / VMIG__BITS_PER_WORD);
}

static inline uint64_t vmig__bitmap_mask(uint64_t bit)
{
	return 1ull << (bit % VMIG__BITS_PER_WORD);
}

static inline void vmig__bitmap_set(uint64_t *map, uint64_t bit)
{
	map[bit / VMIG__BITS_PER_WORD] |= vmig__bitmap_mask(bit);
}

static inline void vmig__bitmap_clear(uint64_t *map, uint64_t bit)
{
	map[bit / VMIG__BITS_PER_WORD] &= ~vmig__bitmap_mask(bit);
}

static inline bool vmig__bitmap_test(const uint64_t *map, uint64_t bit)
{
	return (map[bit / VMIG__BITS_PER_WORD] & vmig__bitmap_mask(bit)) != 0;
}

/* Atomic set: safe against concurrent set/test_and_clear on the same word. */
static inline void vmig__bitmap_set_atomic(uint64_t *map, uint64_t bit)
{
	__atomic_fetch_or(&map[bit / VMIG__BITS_PER_WORD], vmig__bitmap_mask(bit),
			  __ATOMIC_ACQ_REL);
}

/* Atomically clear the bit and return whether it was set. */
static inline bool vmig__bitmap_test_and_clear_atomic(uint64_t *map, uint64_t bit)
{
	uint64_t mask = vmig__bitmap_mask(bit);

	return (__atomic_fetch_and(&map[bit / VMIG__BITS_PER_WORD], ~mask, __ATOMIC_ACQ_REL) &
		mask) != 0;
}

/* First set bit at or after from, or nbits if there is none. */
uint64_t vmig__bitmap_find_next(const uint64_t *map, uint64_t nbits, uint64_t from);
/* First clear bit at or after from, or nbits if there is none. */
uint64_t vmig__bitmap_find_next_zero(const uint64_t *map, uint64_t nbits, uint64_t from);
/* Number of set bits among the first nbits. */
uint64_t vmig__bitmap_count(const uint64_t *map, uint64_t nbits);
/* Set or clear bits [start, start + n). */
void vmig__bitmap_set_range(uint64_t *map, uint64_t start, uint64_t n);
void vmig__bitmap_clear_range(uint64_t *map, uint64_t start, uint64_t n);
/* Set bits [start, start + n) and return how many of them were clear. */
uint64_t vmig__bitmap_set_range_count(uint64_t *map, uint64_t start, uint64_t n);
/* dst |= src over the first nbits (bits of dst past nbits are left alone). */
void vmig__bitmap_or(uint64_t *dst, const uint64_t *src, uint64_t nbits);

#endif
