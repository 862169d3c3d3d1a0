// SPDX-License-Identifier: MIT
/*
 * Fuzz target for the source's return path: the input is what a hostile
 * destination sends back. It goes through the same calls as in a real
 * migration, past framing into the handlers: RESUMED, SYNC_ACK, COMPLETE,
 * ERROR and post-copy page requests (which make the source read guest RAM
 * and answer on the urgent channel), and, when the first input byte is odd,
 * the RECV_BITMAP exchange of a post-copy resume first.
 *
 * The source side is a real session with two RAM blocks (pc.ram: 16 pages,
 * vga.vram: 4 pages) past the post-copy switch; the urgent channel writes
 * to /dev/null.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "migrate/migrate_int.h"
#include "ram/bitmap.h"

#include "fuzz.h"
#include "../lib/nop_vm.h"

static struct {
	vmig_session *s;
	uint8_t *ram;
	struct vmig__chan *null_chan; /* the urgent channel's writes go nowhere */
} g;

static void setup(void)
{
	static const struct {
		const char *name;
		unsigned pages;
	} blocks[] = {{"pc.ram", 16}, {"vga.vram", 4}};
	size_t off = 0;

	g.ram = mmap(NULL, 20 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (g.ram == MAP_FAILED || vmig_session_new(&g.s, &nop_vm_ops, NULL))
		abort();
	for (unsigned i = 0; i < 20 * 4096; i++) /* some zero pages, some not */
		g.ram[i] = (uint8_t)((i / 4096) % 3 ? i * 7 : 0);
	for (unsigned i = 0; i < 2; i++) {
		struct vmig_ram_block b = {.name = blocks[i].name, .host = g.ram + off,
					   .size = blocks[i].pages * 4096ull, .fd = -1};

		if (vmig_ram_block_add(g.s, &b))
			abort();
		off += b.size;
	}
	g.null_chan = vmig__chan_from_fd(open("/dev/null", O_WRONLY | O_CLOEXEC));
	if (!g.null_chan || vmig__chan_fd(g.null_chan) < 0)
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct vmig__source src = {0};
	struct vmig__reader *r = malloc(sizeof(*r));
	struct vmig__err err = {{0}};
	struct vmig_session *s;

	if (!g.s)
		setup();
	s = g.s;
	src.s = s;
	src.uw = malloc(sizeof(*src.uw));
	if (src.uw)
		vmig__writer_init(src.uw, g.null_chan);
	if (!r || !src.uw || !size)
		goto out;
	/* Fresh per input: past the switch, nothing acknowledged yet. */
	s->rp_resumed = s->rp_complete = s->rp_error = s->rp_failed = false;
	s->rp_acked_round = 0;
	vmig__err_clear(&s->mig_err);
	__atomic_store_n(&s->in_postcopy, true, __ATOMIC_RELEASE);
	for (unsigned i = 0; i < s->nblocks; i++)
		memset(s->blocks[i].dirty, 0xff, vmig__bitmap_words(s->blocks[i].npages) * 8);
	vmig__reader_init_mem(r, data + 1, size - 1);
	if (data[0] & 1 && vmig__pc_source_read_bitmaps(&src, r))
		goto out;
	for (;;) {
		uint8_t type, payload[256];
		size_t len;

		if (vmig__rp_read(r, &type, payload, sizeof(payload), &len, &err) ||
		    vmig__src_rp_message(&src, type, payload, len, &err))
			break;
	}
out:
	if (src.uw)
		vmig__writer_release(src.uw);
	free(src.uw);
	free(r);
	return 0;
}
