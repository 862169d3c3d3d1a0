// SPDX-License-Identifier: MIT
/*
 * Fuzz target for the destination's migration-stream loader: the input is a
 * whole stream (preamble and records) as a hostile source would send it. Two
 * small RAM blocks stand in for guest RAM; ASan catches any write outside
 * them. A stream that loads to the end is also run through verification.
 * A preamble of kind multifd makes the input a data channel's stream.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "stream/stream.h"

#include "fuzz.h"

#define PAGES0 16
#define PAGES1 4

static const uint64_t npages_of[2] = {PAGES0, PAGES1};

/* Post-copy hooks: the loader must only pass runs inside their block. */
static int fake_place(void *opaque, unsigned block, uint64_t first, uint32_t npages,
		      const uint8_t *buf)
{
	if (block >= 2 || !npages || npages > VMIG_REC_MAX_PAGES || first >= npages_of[block] ||
	    npages > npages_of[block] - first)
		abort();
	if (buf)
		for (uint32_t i = 0; i < npages; i++) /* touch all of it for ASan */
			(void)vmig__page_hash(buf + (size_t)i * VMIG_PAGE_SIZE);
	return 0;
}

static int fake_discard(void *opaque, unsigned block, uint64_t first, uint64_t npages)
{
	if (block >= 2 || !npages || first >= npages_of[block] || npages > npages_of[block] - first)
		abort();
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t ram0[PAGES0 * VMIG_PAGE_SIZE], ram1[PAGES1 * VMIG_PAGE_SIZE];
	static uint64_t hash0[PAGES0], hash1[PAGES1], recv0[1], recv1[1], zero0[1], zero1[1];
	struct vmig__load_block blocks[2] = {
		{.name = "pc.ram", .host = ram0, .size = sizeof(ram0), .npages = PAGES0,
		 .page_hash = hash0, .received = recv0, .zero = zero0},
		{.name = "vga.vram", .host = ram1, .size = sizeof(ram1), .npages = PAGES1,
		 .page_hash = hash1, .received = recv1, .zero = zero1},
	};
	struct vmig__reader *r = malloc(sizeof(*r));
	struct vmig__err err = {{0}};
	struct vmig__loader l = {.blocks = blocks, .nblocks = 2, .err = &err};
	static uint8_t bounce[VMIG_REC_MAX_PAGES * VMIG_PAGE_SIZE];
	uint8_t type;

	if (!r)
		return 0;
	/* Inputs whose session id (preamble byte 16) is odd run with the
	 * destination's hooks (UFFDIO_COPY fill, post-copy placement and
	 * discards); even ones write RAM directly. Both loader paths are fuzzed. */
	if (size > 16 && data[16] & 1) {
		l.hooks.fill = fake_place;
		l.hooks.place = fake_place;
		l.hooks.discard = fake_discard;
		l.bounce = bounce;
	}
	recv0[0] = recv1[0] = zero0[0] = zero1[0] = 0;
	vmig__reader_init_mem(r, data, size);
	l.r = r;
	l.multifd_ok = true;
	if (!vmig__load_preamble(&l)) {
		if (l.channel == VMIG_CHAN_MULTIFD) {
			/* A data channel, set up as the destination does after the
			 * main channel's MULTIFD record (byte 17 picks the count). */
			l.mf_data = l.blocks_ok = true;
			l.bounce = bounce; /* as the destination gives every data channel */
			l.mf_index = (l.pre_flags & VMIG_PRE_F_INDEX_MASK) >> VMIG_PRE_F_INDEX_SHIFT;
			l.mf_channels = l.mf_index + 1 + (size > 17 ? data[17] % 4u : 0);
		}
		/* Bounded: each record consumes at least its 8-byte header. */
		while (!l.eos && !vmig__load_record(&l, &type))
			if (l.run && !l.postcopy) {
				l.postcopy = true;
				l.bounce = bounce;
			}
		if (l.eos)
			vmig__load_verify(&l);
	}
	vmig__loader_release(&l);
	free(r);
	return 0;
}
