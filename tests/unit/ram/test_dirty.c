// SPDX-License-Identifier: MIT
/*
 * Unit tests for lib/ram dirty tracking on the running kernel. Every test
 * runs once per backend (forced: UFFD_ASYNC and UFFD_SYNC) and per kind of
 * memory (MAP_SHARED memfd, MAP_PRIVATE anonymous), so both paths are tested
 * here whatever AUTO would pick. If the kernel lacks a backend, the tests for
 * it fail with the tracker's reason: nothing is skipped silently.
 *
 * The concurrency test checks the property migration needs, not just "some
 * bits were set": writers store counters into random pages while the test
 * syncs and copies the reported pages into a shadow buffer, as pre-copy
 * would; after a final sync and copy the shadow must equal the memory.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmocka.h>

#include "ram/ram.h"
#include "util/compat.h"

#define PAGE VMIG_PAGE_SIZE
#define NPAGES 4096u /* 16 MiB */

enum mem_kind { MEM_MEMFD, MEM_ANON };

struct variant {
	enum vmig_dirty_tracking mode;
	enum mem_kind kind;
	unsigned flags; /* for vmig__dirty_open_flags() */
};

static const struct variant v_async_memfd = {VMIG_DIRTY_UFFD_ASYNC, MEM_MEMFD, 0};
static const struct variant v_async_anon = {VMIG_DIRTY_UFFD_ASYNC, MEM_ANON, 0};
static const struct variant v_sync_memfd = {VMIG_DIRTY_UFFD_SYNC, MEM_MEMFD, 0};
static const struct variant v_sync_anon = {VMIG_DIRTY_UFFD_SYNC, MEM_ANON, 0};
/* Sync mode as on kernels before 6.4 (no UFFD_FEATURE_WP_UNPOPULATED). */
static const struct variant v_old_memfd = {VMIG_DIRTY_UFFD_SYNC, MEM_MEMFD,
					   VMIG__DIRTY_NO_WP_UNPOPULATED};
static const struct variant v_old_anon = {VMIG_DIRTY_UFFD_SYNC, MEM_ANON,
					  VMIG__DIRTY_NO_WP_UNPOPULATED};

struct fixture {
	const struct variant *v;
	uint8_t *mem;
	uint64_t size;
	struct vmig__dirty *d;
	struct vmig__err err;
	uint64_t *bitmap;
	uint64_t *expect;
};

static uint8_t *map_mem(enum mem_kind kind, uint64_t size)
{
	void *p;

	if (kind == MEM_MEMFD) {
		int fd = memfd_create("vmig-test-ram", MFD_CLOEXEC);

		assert_true(fd >= 0);
		assert_int_equal(ftruncate(fd, (off_t)size), 0);
		p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		close(fd);
	} else {
		p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	}
	assert_true(p != MAP_FAILED);
	return p;
}

/* Map memory, open a tracker in the forced mode, add the range. */
static int setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));
	int ret;

	assert_non_null(f);
	f->v = *state;
	f->size = (uint64_t)NPAGES * PAGE;
	f->mem = map_mem(f->v->kind, f->size);
	f->bitmap = calloc(vmig__bitmap_words(NPAGES), sizeof(uint64_t));
	f->expect = calloc(vmig__bitmap_words(NPAGES), sizeof(uint64_t));
	assert_non_null(f->bitmap);
	assert_non_null(f->expect);
	ret = vmig__dirty_open_flags(&f->d, f->v->mode, f->v->flags, &f->err);
	if (ret)
		fail_msg("vmig__dirty_open(mode %d): %s (%d)", f->v->mode, f->err.msg, ret);
	assert_int_equal(vmig__dirty_mode(f->d), f->v->mode);
	ret = vmig__dirty_add_range(f->d, f->mem, f->size, &f->err);
	if (ret != 0)
		fail_msg("add_range: %s (%d)", f->err.msg, ret);
	assert_int_equal(vmig__dirty_range_pages(f->d, 0), NPAGES);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *f = *state;

	vmig__dirty_close(f->d);
	munmap(f->mem, f->size);
	free(f->bitmap);
	free(f->expect);
	free(f);
	return 0;
}

static void start_ok(struct fixture *f)
{
	int ret = vmig__dirty_start(f->d, &f->err);

	if (ret)
		fail_msg("start: %s (%d)", f->err.msg, ret);
}

/* Sync range 0 into a cleared f->bitmap; returns the reported count. */
static uint64_t sync_fresh(struct fixture *f)
{
	uint64_t n = ~0ull;
	int ret;

	memset(f->bitmap, 0, vmig__bitmap_words(NPAGES) * sizeof(uint64_t));
	ret = vmig__dirty_sync(f->d, 0, f->bitmap, &n, &f->err);
	if (ret)
		fail_msg("sync: %s (%d)", f->err.msg, ret);
	assert_int_equal(n, vmig__bitmap_count(f->bitmap, NPAGES));
	return n;
}

/* Report the first difference between reported and expected pages. */
static void assert_bitmap_exact(struct fixture *f)
{
	for (uint64_t p = 0; p < NPAGES; p++) {
		bool got = vmig__bitmap_test(f->bitmap, p), want = vmig__bitmap_test(f->expect, p);

		if (got != want)
			fail_msg("page %llu: reported %d, written %d", (unsigned long long)p, got,
				 want);
	}
}

static void write_page(struct fixture *f, uint64_t page, uint8_t val)
{
	((volatile uint8_t *)f->mem)[page * PAGE + (page * 7) % PAGE] = val;
	vmig__bitmap_set(f->expect, page);
}

static void clear_expect(struct fixture *f)
{
	memset(f->expect, 0, vmig__bitmap_words(NPAGES) * sizeof(uint64_t));
}

/*
 * Exactly the written pages are reported (word edges, first and last page,
 * pages populated before start and pages never touched), a second sync
 * reports nothing, and writes after a sync show up at the next one.
 */
static void test_exact(void **state)
{
	static const uint64_t pages[] = {0,    1,    63,   64,	 65,   127,	   128,	      1000,
					 1001, 1002, 2047, 2048, 3000, NPAGES - 2, NPAGES - 1};
	struct fixture *f = *state;

	memset(f->mem, 0x5a, f->size / 2); /* first half populated, second half never touched */
	start_ok(f);
	assert_int_equal(sync_fresh(f), 0);
	for (size_t i = 0; i < sizeof(pages) / sizeof(pages[0]); i++)
		write_page(f, pages[i], (uint8_t)i);
	assert_int_equal(sync_fresh(f), sizeof(pages) / sizeof(pages[0]));
	assert_bitmap_exact(f);
	assert_int_equal(sync_fresh(f), 0);

	clear_expect(f);
	write_page(f, 64, 1);
	write_page(f, 4000, 1);
	write_page(f, 4000, 2); /* twice: still one page */
	assert_int_equal(sync_fresh(f), 2);
	assert_bitmap_exact(f);
	assert_int_equal(sync_fresh(f), 0);
	assert_int_equal(vmig__dirty_stop(f->d), 0);
}

/* Pages never touched before start() that are written must be reported. */
static void test_unpopulated(void **state)
{
	struct fixture *f = *state;

	start_ok(f);
	for (uint64_t p = 5; p < NPAGES; p += 97)
		write_page(f, p, 0xee);
	write_page(f, NPAGES - 1, 0xee);
	sync_fresh(f);
	assert_bitmap_exact(f);
	/* Reading never-written pages is not a write. */
	volatile uint8_t sum = 0;
	for (uint64_t p = 0; p < NPAGES; p += 3)
		sum += f->mem[p * PAGE];
	(void)sum;
	assert_int_equal(sync_fresh(f), 0);
}

/*
 * Many disjoint runs with a tiny output vector: in async mode the scan must
 * resume at walk_end until the range is done; in sync mode every run is a
 * separate re-protect. Long runs check coalescing.
 */
static void test_many_runs(void **state)
{
	struct fixture *f = *state;

	assert_int_equal(vmig__dirty_set_scan_regions(f->d, 3), 0);
	memset(f->mem, 1, f->size);
	start_ok(f);
	for (int round = 0; round < 3; round++) {
		clear_expect(f);
		for (uint64_t p = (uint64_t)round; p < 1500; p += 2)
			write_page(f, p, (uint8_t)round);
		for (uint64_t p = 2000; p < 2000 + 700; p++) /* one long run */
			write_page(f, p, (uint8_t)round);
		sync_fresh(f);
		assert_bitmap_exact(f);
	}
	assert_int_equal(sync_fresh(f), 0);
}

struct writer {
	uint8_t *mem;
	uint64_t seed;
	uint64_t *written; /* pages this writer touched, private */
	uint64_t writes;
	int *stop;
};

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

/* Writes a running counter into random words of random pages. */
static void *writer_main(void *arg)
{
	struct writer *w = arg;
	uint64_t n = 0;

	while (!__atomic_load_n(w->stop, __ATOMIC_RELAXED) && n < 1000000000) {
		uint64_t r = rnd(&w->seed);
		uint64_t page = r % NPAGES;
		uint64_t word = (r >> 32) % (PAGE / sizeof(uint64_t));

		__atomic_store_n((uint64_t *)(w->mem + page * PAGE) + word, ++n, __ATOMIC_RELAXED);
		vmig__bitmap_set(w->written, page);
		__atomic_store_n(&w->writes, n, __ATOMIC_RELAXED);
	}
	return NULL;
}

/*
 * Copy every page reported in f->bitmap from memory to shadow. Word by word
 * with atomic loads: the writers store concurrently (as vCPUs would).
 */
static void copy_reported(struct fixture *f, uint8_t *shadow)
{
	for (uint64_t p = vmig__bitmap_find_next(f->bitmap, NPAGES, 0); p < NPAGES;
	     p = vmig__bitmap_find_next(f->bitmap, NPAGES, p + 1)) {
		const uint64_t *src = (const uint64_t *)(f->mem + p * PAGE);
		uint64_t *dst = (uint64_t *)(shadow + p * PAGE);

		for (size_t i = 0; i < PAGE / sizeof(uint64_t); i++)
			dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
	}
}

/*
 * One pre-copy round: sync into a fresh bitmap, add it to seen, copy the
 * reported pages. Returns 0 or -errno (-EPROTO if the count is inconsistent,
 * with the count in *n).
 */
static int sync_collect(struct fixture *f, uint64_t *seen, uint8_t *shadow, uint64_t *n)
{
	int ret;

	memset(f->bitmap, 0, vmig__bitmap_words(NPAGES) * sizeof(uint64_t));
	ret = vmig__dirty_sync(f->d, 0, f->bitmap, n, &f->err);
	if (ret)
		return ret;
	if (*n != vmig__bitmap_count(f->bitmap, NPAGES))
		return -EPROTO;
	vmig__bitmap_or(seen, f->bitmap, NPAGES);
	copy_reported(f, shadow);
	return 0;
}

static void test_concurrent_no_loss(void **state)
{
	struct fixture *f = *state;
	uint8_t *shadow = malloc(f->size);
	uint64_t *seen = calloc(vmig__bitmap_words(NPAGES), sizeof(uint64_t));
	struct writer w[2];
	pthread_t th[2];
	int stop = 0, ret = 0;
	uint64_t start_ms, syncs = 0, bad = 0;

	assert_non_null(shadow);
	assert_non_null(seen);
	/* Half the pages start populated; the shadow starts as a full copy. */
	memset(f->mem, 0x11, f->size / 2);
	start_ok(f);
	memcpy(shadow, f->mem, f->size);
	for (int i = 0; i < 2; i++) {
		w[i] = (struct writer){
		    .mem = f->mem, .seed = 0x1234567ull * (uint64_t)(i + 1), .stop = &stop};
		w[i].written = calloc(vmig__bitmap_words(NPAGES), sizeof(uint64_t));
		assert_non_null(w[i].written);
		assert_int_equal(pthread_create(&th[i], NULL, writer_main, &w[i]), 0);
	}
	/*
	 * Sync and copy for about a second (bounded by count too). No cmocka
	 * assertion while the writers run: a failure would leave them
	 * writing into memory that teardown unmaps.
	 */
	/*
	 * At least a second and 50 syncs, and until each writer has done 1000
	 * writes (a loaded machine may starve one), but never more than 20 s.
	 */
	start_ms = vmig__now_ms();
	while (!ret && syncs < 1000000) {
		uint64_t elapsed = vmig__now_ms() - start_ms;

		if (elapsed > 20000 || (elapsed > 1000 && syncs >= 50 &&
					__atomic_load_n(&w[0].writes, __ATOMIC_RELAXED) > 1000 &&
					__atomic_load_n(&w[1].writes, __ATOMIC_RELAXED) > 1000))
			break;
		ret = sync_collect(f, seen, shadow, &bad);
		syncs++;
		usleep(200);
	}
	__atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
	for (int i = 0; i < 2; i++)
		pthread_join(th[i], NULL);
	if (ret)
		fail_msg("sync while writing: %s (%d), %llu reported vs %llu in bitmap", f->err.msg,
			 ret, (unsigned long long)bad,
			 (unsigned long long)vmig__bitmap_count(f->bitmap, NPAGES));
	assert_int_equal(sync_collect(f, seen, shadow, &bad), 0);
	print_message("mode %d kind %d flags %u: %llu syncs, %llu + %llu writes, %llu pages seen\n",
		      f->v->mode, f->v->kind, f->v->flags, (unsigned long long)syncs,
		      (unsigned long long)w[0].writes, (unsigned long long)w[1].writes,
		      (unsigned long long)vmig__bitmap_count(seen, NPAGES));
	assert_true(syncs >= 50);
	if (w[0].writes <= 1000 || w[1].writes <= 1000)
		fail_msg("writers made too little progress in 20 s");
	for (int i = 0; i < 2; i++) {
		for (uint64_t p = 0; p < NPAGES; p++)
			if (vmig__bitmap_test(w[i].written, p) && !vmig__bitmap_test(seen, p))
				fail_msg("page %llu written by writer %d never reported",
					 (unsigned long long)p, i);
		free(w[i].written);
	}
	for (uint64_t p = 0; p < NPAGES; p++)
		if (memcmp(shadow + p * PAGE, f->mem + p * PAGE, PAGE))
			fail_msg("page %llu: a write was lost (shadow differs)",
				 (unsigned long long)p);
	assert_int_equal(sync_fresh(f), 0);
	free(seen);
	free(shadow);
}

static long minor_faults(void)
{
	struct rusage ru;

	assert_int_equal(getrusage(RUSAGE_THREAD, &ru), 0);
	return ru.ru_minflt;
}

/* Pages of the fixture's memory whose PTE is uffd-wp write-protected
 * (/proc/self/pagemap bit 57). */
static uint64_t wp_pages(const struct fixture *f)
{
	uint64_t *e = calloc(NPAGES, sizeof(*e)), n = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);

	assert_non_null(e);
	assert_true(fd >= 0);
	assert_int_equal(
	    pread(fd, e, NPAGES * sizeof(*e), (off_t)((uintptr_t)f->mem / PAGE * sizeof(*e))),
	    (ssize_t)(NPAGES * sizeof(*e)));
	close(fd);
	for (uint64_t p = 0; p < NPAGES; p++)
		n += e[p] >> 57 & 1;
	free(e);
	return n;
}

/*
 * After stop(), no page is left write-protected, so writes to populated
 * pages take no fault of ours. (Not none at all: the kernel may migrate a
 * page meanwhile, compaction for one, and the next write to it faults once.
 * CI saw one such fault in 4096 writes; a page left protected would fault
 * on every one of the 4096.)
 */
static void test_stop_restores_speed(void **state)
{
	struct fixture *f = *state;
	struct vmig__err err;
	long before;

	memset(f->mem, 3, f->size);
	start_ok(f);
	for (uint64_t p = 0; p < NPAGES; p += 2)
		write_page(f, p, 4);
	sync_fresh(f);
	assert_true(wp_pages(f) > 0); /* what stop() must undo, seen here */
	assert_int_equal(vmig__dirty_stop(f->d), 0);
	assert_int_equal(vmig__dirty_sync(f->d, 0, f->bitmap, NULL, &err), -EINVAL);
	assert_int_equal(wp_pages(f), 0);
	before = minor_faults();
	for (uint64_t p = 0; p < NPAGES; p++)
		f->mem[p * PAGE + 1] = 5;
	assert_true(minor_faults() - before < NPAGES / 64);

	/* And tracking can start again from scratch. */
	start_ok(f);
	clear_expect(f);
	write_page(f, 77, 9);
	sync_fresh(f);
	assert_bitmap_exact(f);
}

/*
 * Stop without restoring write access (migration completed): memory stays
 * fully usable (a write may fault once, in the kernel only), and a restart
 * tracks again.
 */
static void test_stop_no_restore(void **state)
{
	struct fixture *f = *state;

	memset(f->mem, 3, f->size);
	start_ok(f);
	assert_int_equal(vmig__dirty_stop_flags(f->d, VMIG__DIRTY_STOP_NO_RESTORE), 0);
	for (uint64_t p = 0; p < NPAGES; p++)
		f->mem[p * PAGE + 2] = (uint8_t)p;
	for (uint64_t p = 0; p < NPAGES; p++)
		assert_int_equal(f->mem[p * PAGE + 2], (uint8_t)p);
	start_ok(f);
	clear_expect(f);
	write_page(f, NPAGES - 1, 9);
	sync_fresh(f);
	assert_bitmap_exact(f);
}

/* A second range added while tracking is active is protected at once. */
static void test_second_range(void **state)
{
	struct fixture *f = *state;
	uint8_t *mem2 = map_mem(f->v->kind, 64 * PAGE);
	uint64_t map2[1] = {0}, n = 0;
	int idx;

	start_ok(f);
	idx = vmig__dirty_add_range(f->d, mem2, 64 * PAGE, &f->err);
	if (idx != 1)
		fail_msg("add_range while started: %s (%d)", f->err.msg, idx);
	mem2[5 * PAGE] = 1;
	mem2[63 * PAGE] = 1;
	write_page(f, 9, 1);
	assert_int_equal(vmig__dirty_sync(f->d, 1, map2, &n, &f->err), 0);
	assert_int_equal(n, 2);
	assert_int_equal(map2[0], (1ull << 5) | (1ull << 63));
	sync_fresh(f);
	assert_bitmap_exact(f);
	assert_int_equal(vmig__dirty_stop(f->d), 0);
	munmap(mem2, 64 * PAGE);
}

/* AUTO picks async exactly when the kernel has both features. */
static void test_auto_and_args(void **state)
{
	struct vmig__dirty *d;
	struct vmig__err err = {{0}};
	uint64_t features;
	bool scan;
	char buf[2 * PAGE] __attribute__((aligned(PAGE)));

	(void)state;
	assert_int_equal(vmig__dirty_probe(&features, &scan), 0);
	print_message("uffd features 0x%llx, WP_ASYNC %d, WP_UNPOPULATED %d, "
		      "WP_HUGETLBFS_SHMEM %d, PAGEMAP_SCAN %d\n",
		      (unsigned long long)features, !!(features & UFFD_FEATURE_WP_ASYNC),
		      !!(features & UFFD_FEATURE_WP_UNPOPULATED),
		      !!(features & UFFD_FEATURE_WP_HUGETLBFS_SHMEM), scan);
	assert_int_equal(vmig__dirty_open(&d, VMIG_DIRTY_AUTO, &err), 0);
	assert_int_equal(vmig__dirty_mode(d), (features & UFFD_FEATURE_WP_ASYNC) && scan
						  ? VMIG_DIRTY_UFFD_ASYNC
						  : VMIG_DIRTY_UFFD_SYNC);
	assert_int_equal(vmig__dirty_add_range(d, buf + 1, PAGE, &err), -EINVAL);
	assert_int_equal(vmig__dirty_add_range(d, buf, PAGE + 1, &err), -EINVAL);
	assert_int_equal(vmig__dirty_add_range(d, buf, 0, &err), -EINVAL);
	assert_int_equal(vmig__dirty_sync(d, 0, NULL, NULL, &err), -EINVAL);
	vmig__dirty_close(d);
	vmig__dirty_close(NULL);
	assert_int_equal(vmig__dirty_open(&d, (enum vmig_dirty_tracking)42, &err), -EINVAL);
}

/*
 * Huge pages (hugetlbfs, 2 MiB): the kernel protects and reports them only
 * whole, so a write anywhere in one reports its 512 pages, and nothing
 * else. The test reserves the huge pages it needs and gives them back.
 */
#define HP (2u << 20)
#define HP_NR "/proc/sys/vm/nr_hugepages"
#define HP_FREE "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"

static long read_long(const char *path)
{
	FILE *f = fopen(path, "r");
	long v = -1;

	if (f && fscanf(f, "%ld", &v) != 1)
		v = -1;
	if (f)
		fclose(f);
	return v;
}

static bool write_long(const char *path, long v)
{
	FILE *f = fopen(path, "w");
	bool ok = f && fprintf(f, "%ld\n", v) > 0;

	if (f)
		ok = !fclose(f) && ok;
	return ok;
}

static long hp_saved = -1; /* nr_hugepages before the test raised it */

/* Give the huge pages back, even after a failed assertion. */
static int hp_restore(void **state)
{
	if (hp_saved >= 0 && read_long(HP_NR) != hp_saved && !write_long(HP_NR, hp_saved))
		return -1;
	return 0;
}

static void hugetlb_case(enum vmig_dirty_tracking mode)
{
	long nr = read_long(HP_NR), want = 4;
	struct vmig__err err = {{0}};
	uint64_t bitmap[4 * HP / PAGE / 64], count = 0;
	struct vmig__dirty *d;
	uint8_t *mem;
	int fd;

	if (hp_saved < 0)
		hp_saved = nr;
	if (nr < 0 || (read_long(HP_FREE) < want && !write_long(HP_NR, nr + want)))
		fail_msg("cannot reserve %ld huge pages in " HP_NR " (run as root)", want);
	fd = memfd_create("vmig-test-huge", MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, 4 * HP), 0);
	mem = mmap(NULL, 4 * HP, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	assert_true(mem != MAP_FAILED);
	memset(mem, 1, 4 * HP);
	assert_int_equal(vmig__dirty_open(&d, mode, &err), 0);
	assert_int_equal(vmig__dirty_add_range(d, mem, 4 * HP, &err), 0);
	/* Not aligned to its huge pages: refused, with the reason. */
	assert_int_equal(vmig__dirty_add_range(d, mem + PAGE, HP, &err), -EINVAL);
	assert_non_null(strstr(err.msg, "2048 KiB"));
	assert_int_equal(vmig__dirty_start(d, &err), 0);
	memset(bitmap, 0, sizeof(bitmap));
	assert_int_equal(vmig__dirty_sync(d, 0, bitmap, &count, &err), 0);
	assert_int_equal(count, 0);
	mem[HP + 7 * PAGE + 3] = 2; /* one byte in huge page 1 */
	count = 0;
	assert_int_equal(vmig__dirty_sync(d, 0, bitmap, &count, &err), 0);
	assert_int_equal(count, HP / PAGE);
	for (uint64_t p = 0; p < 4 * HP / PAGE; p++)
		assert_int_equal(vmig__bitmap_test(bitmap, p), p >= HP / PAGE && p < 2 * HP / PAGE);
	memset(bitmap, 0, sizeof(bitmap));
	count = 0;
	assert_int_equal(vmig__dirty_sync(d, 0, bitmap, &count, &err), 0);
	assert_int_equal(count, 0);
	mem[3 * HP] = 3; /* huge page 3, twice */
	mem[4 * HP - 1] = 3;
	assert_int_equal(vmig__dirty_sync(d, 0, bitmap, &count, &err), 0);
	assert_int_equal(count, HP / PAGE);
	assert_true(vmig__bitmap_test(bitmap, 3 * HP / PAGE));
	assert_int_equal(vmig__dirty_stop(d), 0);
	vmig__dirty_close(d);
	munmap(mem, 4 * HP);
}

static void test_hugetlb_async(void **state)
{
	hugetlb_case(VMIG_DIRTY_UFFD_ASYNC);
}

static void test_hugetlb_sync(void **state)
{
	hugetlb_case(VMIG_DIRTY_UFFD_SYNC);
}

/* clang-format off */
#define WITH(fn, v) cmocka_unit_test_prestate_setup_teardown(fn, setup, teardown, (void *)&(v))
#define VARIANTS(fn) \
	WITH(fn, v_async_memfd), WITH(fn, v_async_anon), \
	WITH(fn, v_sync_memfd), WITH(fn, v_sync_anon)
#define OLD_KERNEL(fn) WITH(fn, v_old_memfd), WITH(fn, v_old_anon)

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_auto_and_args),
		VARIANTS(test_exact),
		VARIANTS(test_unpopulated),
		VARIANTS(test_many_runs),
		VARIANTS(test_concurrent_no_loss),
		VARIANTS(test_stop_restores_speed),
		VARIANTS(test_stop_no_restore),
		VARIANTS(test_second_range),
		OLD_KERNEL(test_exact),
		OLD_KERNEL(test_unpopulated),
		OLD_KERNEL(test_concurrent_no_loss),
		cmocka_unit_test_teardown(test_hugetlb_async, hp_restore),
		cmocka_unit_test_teardown(test_hugetlb_sync, hp_restore),
	};
	/* clang-format on */

	return cmocka_run_group_tests(tests, NULL, NULL);
}
