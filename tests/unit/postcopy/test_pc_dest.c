// SPDX-License-Identifier: MIT
/*
 * The post-copy placer (lib/postcopy) against real userfaultfd: guest RAM is
 * a memfd registered for MISSING faults, a "vCPU" thread touches it, and the
 * test calls the loader hooks the way the receiving threads do.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "postcopy/postcopy.h"
#include "ram/bitmap.h"

/* A run placed in one call: large enough that copying it takes
 * milliseconds, so a touch of its last page lands while it is copied. */
#define RUN_PAGES 8192u
#define ATTEMPTS 6
#define NPAGES (RUN_PAGES * ATTEMPTS)

struct rig {
	struct vmig__block blk;
	struct vmig__pc_dest *pc;
	struct vmig__load_hooks hooks;
	uint8_t *data; /* RUN_PAGES pages to place */

	pthread_mutex_t lock; /* guards everything below */
	pthread_cond_t cond;
	vmig__pc_stats st;  /* last published */
	uint64_t requested; /* pages the placer asked the "source" for */
	int vcpu_tid;
	uint64_t touch;	  /* page the vCPU touches once it is claimed; UINT64_MAX: none */
	uint64_t touched; /* value read there, once read */
	bool touch_done, quit;
};

static void on_request(void *opaque, unsigned block, uint64_t first, uint32_t npages)
{
	struct rig *r = opaque;

	(void)block;
	(void)first;
	pthread_mutex_lock(&r->lock);
	r->requested += npages;
	pthread_mutex_unlock(&r->lock);
}

static void on_publish(void *opaque, const vmig__pc_stats *st)
{
	struct rig *r = opaque;

	pthread_mutex_lock(&r->lock);
	r->st = *st;
	pthread_mutex_unlock(&r->lock);
}

/* The vCPU: waits for a page to touch, then for the placer to claim it, and
 * reads it (a fault until the page is in). */
static void *vcpu_main(void *arg)
{
	struct rig *r = arg;

	pthread_mutex_lock(&r->lock);
	r->vcpu_tid = gettid();
	pthread_cond_broadcast(&r->cond);
	for (;;) {
		while (r->touch == UINT64_MAX && !r->quit)
			pthread_cond_wait(&r->cond, &r->lock);
		if (r->quit)
			break;
		uint64_t p = r->touch;

		pthread_mutex_unlock(&r->lock);
		while (!(__atomic_load_n(&r->blk.placed[p / 64], __ATOMIC_ACQUIRE) &
			 vmig__bitmap_mask(p)))
			;
		uint64_t v = *(volatile uint64_t *)(r->blk.host + p * VMIG_PAGE_SIZE);

		pthread_mutex_lock(&r->lock);
		r->touched = v;
		r->touch = UINT64_MAX;
		r->touch_done = true;
		pthread_cond_broadcast(&r->cond);
	}
	pthread_mutex_unlock(&r->lock);
	return NULL;
}

static uint64_t *bitmap(void)
{
	uint64_t *m = calloc(vmig__bitmap_words(NPAGES), sizeof(uint64_t));

	assert_non_null(m);
	return m;
}

/*
 * A vCPU that touches a page while the placer's UFFDIO_COPY of its run is
 * under way must wait once, for that copy, not fault again and again: the
 * fault thread must leave it asleep rather than wake it into the same
 * missing page. Before the fix each such touch counted thousands of
 * faults, and the spinning vCPU took CPU from the copy it waited for.
 */
static void test_fault_on_page_being_placed_waits_once(void **state)
{
	struct rig r = {.touch = UINT64_MAX};
	struct vmig__err err = {{0}};
	pthread_t vcpu;
	int memfd, tid, caught = 0;

	(void)state;
	pthread_mutex_init(&r.lock, NULL);
	pthread_cond_init(&r.cond, NULL);
	memfd = memfd_create("pc-dest-test", MFD_CLOEXEC);
	assert_true(memfd >= 0);
	assert_int_equal(ftruncate(memfd, (off_t)NPAGES * VMIG_PAGE_SIZE), 0);
	r.blk = (struct vmig__block){.name = "ram",
				     .size = (uint64_t)NPAGES * VMIG_PAGE_SIZE,
				     .npages = NPAGES,
				     .fd = memfd};
	r.blk.host = mmap(NULL, r.blk.size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	assert_true(r.blk.host != MAP_FAILED);
	r.blk.received = bitmap();
	r.blk.zero = bitmap();
	r.blk.placed = bitmap();
	r.blk.installed = bitmap();
	r.blk.requested = bitmap();
	r.blk.page_hash = calloc(NPAGES, sizeof(uint64_t));
	r.data = malloc((size_t)RUN_PAGES * VMIG_PAGE_SIZE);
	assert_non_null(r.blk.page_hash);
	assert_non_null(r.data);
	for (uint64_t i = 0; i < (uint64_t)RUN_PAGES * VMIG_PAGE_SIZE / 8; i++)
		((uint64_t *)r.data)[i] = i + 1;

	assert_int_equal(pthread_create(&vcpu, NULL, vcpu_main, &r), 0);
	pthread_mutex_lock(&r.lock);
	while (!r.vcpu_tid)
		pthread_cond_wait(&r.cond, &r.lock);
	tid = r.vcpu_tid;
	pthread_mutex_unlock(&r.lock);

	struct vmig__pc_config cfg = {.blocks = &r.blk,
				      .nblocks = 1,
				      .postcopy_ram = true,
				      .blocktime = true,
				      .vcpu_tid = &tid,
				      .nvcpus = 1,
				      .request = on_request,
				      .publish = on_publish,
				      .opaque = &r};

	assert_int_equal(vmig__pc_dest_new(&cfg, &r.pc), 0);
	vmig__pc_dest_hooks(r.pc, &r.hooks);
	assert_int_equal(vmig__pc_dest_register(r.pc, &err), 0);
	/* Nothing arrived in pre-copy: every page is missing at the switch. */
	assert_int_equal(r.hooks.discard(r.hooks.opaque, 0, 0, NPAGES), 0);
	assert_int_equal(vmig__pc_dest_switch(r.pc, &err), 0);

	for (unsigned a = 0; a < ATTEMPTS && caught < 2; a++) {
		uint64_t first = (uint64_t)a * RUN_PAGES, last = first + RUN_PAGES - 1, before;

		vmig__pc_dest_publish(r.pc);
		pthread_mutex_lock(&r.lock);
		before = r.st.faults;
		r.touch = last;
		r.touch_done = false;
		pthread_cond_broadcast(&r.cond);
		pthread_mutex_unlock(&r.lock);

		assert_int_equal(r.hooks.place(r.hooks.opaque, 0, first, RUN_PAGES, r.data), 0);

		pthread_mutex_lock(&r.lock);
		while (!r.touch_done)
			pthread_cond_wait(&r.cond, &r.lock);
		/* The vCPU read what was placed, not a page of zeros. */
		assert_int_equal(r.touched, (uint64_t)(RUN_PAGES - 1) * VMIG_PAGE_SIZE / 8 + 1);
		pthread_mutex_unlock(&r.lock);

		vmig__pc_dest_publish(r.pc);
		pthread_mutex_lock(&r.lock);
		uint64_t faults = r.st.faults - before;

		/* 0: the copy was done before the touch; then try again. */
		fprintf(stderr, "  run %u: %llu fault(s) on a page being placed\n", a,
			(unsigned long long)faults);
		assert_true(faults <= 1);
		caught += faults == 1;
		/* A page being placed is never asked of the source. */
		assert_int_equal(r.requested, 0);
		assert_int_equal(r.st.requests, 0);
		pthread_mutex_unlock(&r.lock);
	}
	/* The case under test must have happened, or the test proved nothing. */
	assert_true(caught >= 1);
	/* Once waited for, the vCPU was not counted as blocked any more. */
	assert_false(vmig__pc_dest_vcpu_blocked(r.pc, 0));

	pthread_mutex_lock(&r.lock);
	r.quit = true;
	pthread_cond_broadcast(&r.cond);
	pthread_mutex_unlock(&r.lock);
	pthread_join(vcpu, NULL);
	vmig__pc_dest_free(r.pc);
	munmap(r.blk.host, r.blk.size);
	close(memfd);
	free(r.blk.received);
	free(r.blk.zero);
	free(r.blk.placed);
	free(r.blk.installed);
	free(r.blk.requested);
	free(r.blk.page_hash);
	free(r.data);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_fault_on_page_being_placed_waits_once),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
