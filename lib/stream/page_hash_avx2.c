// SPDX-License-Identifier: MIT
/*
 * XXH3-64 of one page, from libxxhash's own header, compiled for AVX2 (this
 * file only, see meson.build). digest.c calls it on CPUs that have AVX2.
 */
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "stream/stream.h"

uint64_t vmig__page_hash_avx2(const void *page)
{
	return XXH3_64bits(page, VMIG_PAGE_SIZE);
}
