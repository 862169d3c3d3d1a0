// SPDX-License-Identifier: MIT
/*
 * Memory digest: each page is hashed with XXH3-64 when it is sent (source)
 * or placed (destination); the digest of guest memory is XXH3-64 over those
 * per-page hashes in block order. Keeping per-page hashes makes the digest
 * at switch-over cost a pass over 8 bytes per page instead of over all of
 * guest RAM, so it fits in the downtime budget.
 */
#include <stdio.h>
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>

#include "stream/stream.h"

uint64_t vmig__page_hash(const void *page)
{
#ifdef VMIG_HAVE_PAGE_HASH_AVX2
	/* The same value, about 2.5 times as fast (see lib/stream/meson.build). */
	if (__builtin_cpu_supports("avx2"))
		return vmig__page_hash_avx2(page);
#endif
	return XXH3_64bits(page, VMIG_PAGE_SIZE);
}

uint64_t vmig__zero_page_hash(void)
{
	/* XXH3-64 of 4096 zero bytes, computed once; the value is a constant. */
	static uint64_t h;
	static const uint8_t zero[VMIG_PAGE_SIZE];

	if (!__atomic_load_n(&h, __ATOMIC_RELAXED))
		__atomic_store_n(&h, XXH3_64bits(zero, sizeof(zero)), __ATOMIC_RELAXED);
	return __atomic_load_n(&h, __ATOMIC_RELAXED);
}

uint64_t vmig__digest_of_hashes(uint64_t *const *hashes, const uint64_t *npages, unsigned nblocks)
{
	XXH3_state_t st;

	XXH3_64bits_reset(&st);
	for (unsigned i = 0; i < nblocks; i++)
		XXH3_64bits_update(&st, hashes[i], npages[i] * sizeof(uint64_t));
	return XXH3_64bits_digest(&st);
}
