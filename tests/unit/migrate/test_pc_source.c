// SPDX-License-Identifier: MIT
/*
 * The source's post-copy page-request handler, called the way the
 * return-path thread calls it, against a real session's RAM block and a
 * real socket for the urgent channel.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "migrate/migrate_int.h"
#include "ram/bitmap.h"
#include "stream/stream.h"
#include "../../lib/nop_vm.h"

#define NPAGES 8
#define UNSET 0x5a5a5a5a5a5a5a5aull /* a hash no page here has */

/*
 * Whoever claims a page (clears its dirty bit) stores its hash, and the
 * digest reads the hashes once every claim has been flushed. A request
 * still sends the pages it did not claim, for the faulting vCPU's sake
 * (the push may hold them in an unflushed buffer), but it must not store
 * their hashes: it may arrive after the push claimed the last page and
 * the digest began to read (a data race, found by ThreadSanitizer).
 */
static void test_request_hashes_only_what_it_claims(void **state)
{
	struct vmig__source src = {0};
	struct vmig__writer uw;
	struct vmig__err err = {{0}};
	struct vmig_wire_pages req = {.block = 0, .first = 2, .npages = 5};
	struct vmig__block *b;
	vmig_session *s;
	uint8_t *ram = mmap(NULL, NPAGES * VMIG_PAGE_SIZE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct vmig_ram_block blk = {
	    .name = "pc.ram", .host = ram, .size = NPAGES * VMIG_PAGE_SIZE, .fd = -1};
	int sv[2];

	assert_true(ram != MAP_FAILED);
	for (unsigned p = 0; p < NPAGES; p++) /* page 3 is zero */
		memset(ram + p * VMIG_PAGE_SIZE, p == 3 ? 0 : (int)(p + 1), VMIG_PAGE_SIZE);
	assert_int_equal(vmig_session_new(&s, &nop_vm_ops, NULL), 0);
	assert_int_equal(vmig_ram_block_add(s, &blk), 0);
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	vmig__writer_init(&uw, vmig__chan_from_fd(sv[0]));
	src.s = s;
	src.uw = &uw;
	b = &s->blocks[0];
	/* The push has claimed pages 0-3; 4-7 are still to send. */
	memset(b->dirty, 0, vmig__bitmap_words(NPAGES) * sizeof(uint64_t));
	for (unsigned p = 4; p < NPAGES; p++)
		vmig__bitmap_set(b->dirty, p);
	src.dirty_pages = 4;
	for (unsigned p = 0; p < NPAGES; p++)
		b->page_hash[p] = UNSET;
	__atomic_store_n(&s->in_postcopy, true, __ATOMIC_RELEASE);

	/* Pages 2-6: 2 and 3 are the push's, 4-6 this request's. */
	assert_int_equal(vmig__pc_source_request(&src, &req, &err), 0);

	/* All five went out: four non-zero pages of data, one zero record. */
	assert_true(uw.bytes >= 4 * VMIG_PAGE_SIZE);
	assert_int_equal(src.urgent_requests, 1);
	assert_int_equal(src.urgent_inflight, 0);
	/* Only the claimed ones were taken from the push and hashed. */
	assert_int_equal(src.dirty_pages, 1);
	for (unsigned p = 0; p < NPAGES; p++)
		assert_int_equal(vmig__bitmap_test(b->dirty, p), p == 7);
	for (unsigned p = 0; p < NPAGES; p++) {
		uint64_t want =
		    p >= 4 && p <= 6 ? vmig__page_hash(ram + p * VMIG_PAGE_SIZE) : UNSET;

		if (b->page_hash[p] != want)
			fail_msg("page %u: hash %#llx, expected %#llx", p,
				 (unsigned long long)b->page_hash[p], (unsigned long long)want);
	}

	vmig__writer_release(&uw);
	vmig__chan_free(uw.c);
	close(sv[1]);
	vmig_session_free(s);
	munmap(ram, NPAGES * VMIG_PAGE_SIZE);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_request_hashes_only_what_it_claims),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
