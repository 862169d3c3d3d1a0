// SPDX-License-Identifier: MIT
/*
 * Word-at-a-time operations on dirty bitmaps (see bitmap.h). These run over
 * maps of a million bits or more once per migration round, so they skip whole
 * zero (or all-ones) words and never touch memory past the last word that
 * holds one of the first nbits bits.
 */
#include "ram/bitmap.h"

/* Bits [lo, 64) of a word. lo < 64. */
static inline uint64_t mask_from(uint64_t lo)
{
	return ~0ull << lo;
}

/* Bits [0, hi) of a word, for 0 < hi <= 64. */
static inline uint64_t mask_below(uint64_t hi)
{
	return hi >= VMIG__BITS_PER_WORD ? ~0ull : (1ull << hi) - 1;
}

/*
 * Shared search: invert flips every word so that looking for a zero becomes
 * looking for a one. Words are read with relaxed atomic loads (plain loads
 * on the CPUs we run on): some bitmaps are searched by one thread while
 * another sets or clears bits atomically (post-copy's dirty and requested
 * maps), and a search needs a word as it was at some point, nothing more.
 */
static uint64_t find_next(const uint64_t *map, uint64_t nbits, uint64_t from, uint64_t invert)
{
	uint64_t w, word, bit;
	size_t nwords = vmig__bitmap_words(nbits);

	if (from >= nbits)
		return nbits;
	w = from / VMIG__BITS_PER_WORD;
	word = (__atomic_load_n(&map[w], __ATOMIC_RELAXED) ^ invert) &
	       mask_from(from % VMIG__BITS_PER_WORD);
	for (;;) {
		if (word) {
			bit = w * VMIG__BITS_PER_WORD + (uint64_t)__builtin_ctzll(word);
			return bit < nbits ? bit : nbits;
		}
		if (++w >= nwords)
			return nbits;
		word = __atomic_load_n(&map[w], __ATOMIC_RELAXED) ^ invert;
	}
}

uint64_t vmig__bitmap_find_next(const uint64_t *map, uint64_t nbits, uint64_t from)
{
	return find_next(map, nbits, from, 0);
}

uint64_t vmig__bitmap_find_next_zero(const uint64_t *map, uint64_t nbits, uint64_t from)
{
	return find_next(map, nbits, from, ~0ull);
}

uint64_t vmig__bitmap_count(const uint64_t *map, uint64_t nbits)
{
	uint64_t full = nbits / VMIG__BITS_PER_WORD;
	uint64_t rest = nbits % VMIG__BITS_PER_WORD;
	uint64_t n = 0;

	for (uint64_t w = 0; w < full; w++)
		n += (uint64_t)__builtin_popcountll(map[w]);
	if (rest)
		n += (uint64_t)__builtin_popcountll(map[full] & mask_below(rest));
	return n;
}

void vmig__bitmap_set_range(uint64_t *map, uint64_t start, uint64_t n)
{
	uint64_t end = start + n;
	uint64_t w = start / VMIG__BITS_PER_WORD;
	uint64_t last = end / VMIG__BITS_PER_WORD; /* word holding bit end (exclusive) */

	if (!n)
		return;
	if (w == last) {
		map[w] |=
		    mask_from(start % VMIG__BITS_PER_WORD) & mask_below(end % VMIG__BITS_PER_WORD);
		return;
	}
	map[w++] |= mask_from(start % VMIG__BITS_PER_WORD);
	for (; w < last; w++)
		map[w] = ~0ull;
	if (end % VMIG__BITS_PER_WORD)
		map[last] |= mask_below(end % VMIG__BITS_PER_WORD);
}

void vmig__bitmap_clear_range(uint64_t *map, uint64_t start, uint64_t n)
{
	uint64_t end = start + n;
	uint64_t w = start / VMIG__BITS_PER_WORD;
	uint64_t last = end / VMIG__BITS_PER_WORD;

	if (!n)
		return;
	if (w == last) {
		map[w] &= ~(mask_from(start % VMIG__BITS_PER_WORD) &
			    mask_below(end % VMIG__BITS_PER_WORD));
		return;
	}
	map[w++] &= ~mask_from(start % VMIG__BITS_PER_WORD);
	for (; w < last; w++)
		map[w] = 0;
	if (end % VMIG__BITS_PER_WORD)
		map[last] &= ~mask_below(end % VMIG__BITS_PER_WORD);
}

uint64_t vmig__bitmap_set_range_count(uint64_t *map, uint64_t start, uint64_t n)
{
	uint64_t end = start + n, b = start, w, hi, mask, added = 0;

	while (b < end) {
		w = b / VMIG__BITS_PER_WORD;
		hi = end - w * VMIG__BITS_PER_WORD;
		mask = mask_from(b % VMIG__BITS_PER_WORD) &
		       mask_below(hi < VMIG__BITS_PER_WORD ? hi : VMIG__BITS_PER_WORD);
		added += (uint64_t)__builtin_popcountll(mask & ~map[w]);
		map[w] |= mask;
		b = (w + 1) * VMIG__BITS_PER_WORD;
	}
	return added;
}

void vmig__bitmap_or(uint64_t *dst, const uint64_t *src, uint64_t nbits)
{
	uint64_t full = nbits / VMIG__BITS_PER_WORD;
	uint64_t rest = nbits % VMIG__BITS_PER_WORD;

	for (uint64_t w = 0; w < full; w++)
		dst[w] |= src[w];
	if (rest)
		dst[full] |= src[full] & mask_below(rest);
}
