// SPDX-License-Identifier: MIT
/*
 * Manual benchmark for lib/ram dirty tracking (not run by `make check`: it
 * needs several GiB of RAM). It maps a MAP_SHARED memfd of SIZE (default
 * 4G), touches every page, starts tracking in each backend the kernel has,
 * dirties 0, 1000 and 100000 distinct random pages and times sync() of the
 * whole range (median of REPS runs). It also times start() (protect all),
 * the writes themselves (first write per page after a sync takes a fault in
 * both backends: resolved in the kernel in async mode, by the tracker thread
 * in sync mode) and stop().
 *
 *   ram-dirty-bench [SIZE [REPS [memfd|anon]]]
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ram/ram.h"

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* Write one byte into n distinct random pages (distinct via the scratch map). */
static void dirty_pages(uint8_t *mem, uint64_t npages, uint64_t n, uint64_t *scratch,
			uint64_t *seed)
{
	memset(scratch, 0, vmig__bitmap_words(npages) * sizeof(uint64_t));
	for (uint64_t done = 0; done < n;) {
		uint64_t p = rnd(seed) % npages;

		if (vmig__bitmap_test(scratch, p))
			continue;
		vmig__bitmap_set(scratch, p);
		((volatile uint8_t *)mem)[p * VMIG_PAGE_SIZE] = (uint8_t)done;
		done++;
	}
}

static int bench_mode(enum vmig_dirty_tracking mode, uint8_t *mem, uint64_t size, int reps)
{
	static const uint64_t counts[] = {0, 1000, 100000};
	uint64_t npages = size / VMIG_PAGE_SIZE, seed = 0x2545f4914f6cdd1dull, n, t0;
	uint64_t *bitmap = calloc(vmig__bitmap_words(npages), sizeof(uint64_t));
	uint64_t *scratch = calloc(vmig__bitmap_words(npages), sizeof(uint64_t));
	uint64_t us[64], write_us[64];
	struct vmig__dirty *d = NULL;
	struct vmig__err err = {{0}};
	int ret;

	if (!bitmap || !scratch)
		return -ENOMEM;
	ret = vmig__dirty_open(&d, mode, &err);
	if (!ret)
		ret = vmig__dirty_add_range(d, mem, size, &err);
	if (ret < 0)
		goto out;
	t0 = vmig__now_us();
	ret = vmig__dirty_start(d, &err);
	if (ret)
		goto out;
	printf("%s: start (protect %llu MiB) %.1f ms\n",
	       mode == VMIG_DIRTY_UFFD_ASYNC ? "async" : "sync", (unsigned long long)(size >> 20),
	       (vmig__now_us() - t0) / 1000.0);
	for (size_t c = 0; c < sizeof(counts) / sizeof(counts[0]); c++) {
		for (int r = 0; r < reps; r++) {
			t0 = vmig__now_us();
			dirty_pages(mem, npages, counts[c], scratch, &seed);
			write_us[r] = vmig__now_us() - t0;
			t0 = vmig__now_us();
			ret = vmig__dirty_sync(d, 0, bitmap, &n, &err);
			us[r] = vmig__now_us() - t0;
			if (ret)
				goto out;
			memset(bitmap, 0, vmig__bitmap_words(npages) * sizeof(uint64_t));
			if (n < counts[c]) {
				snprintf(err.msg, sizeof(err.msg),
					 "sync reported %llu < %llu pages", (unsigned long long)n,
					 (unsigned long long)counts[c]);
				ret = -EIO;
				goto out;
			}
		}
		qsort(us, (size_t)reps, sizeof(us[0]), cmp_u64);
		qsort(write_us, (size_t)reps, sizeof(write_us[0]), cmp_u64);
		printf("  %6llu dirty pages: sync median %8.2f ms (min %.2f, max %.2f); "
		       "writing them %.2f ms\n",
		       (unsigned long long)counts[c], us[reps / 2] / 1000.0, us[0] / 1000.0,
		       us[reps - 1] / 1000.0, write_us[reps / 2] / 1000.0);
	}
	t0 = vmig__now_us();
	ret = vmig__dirty_stop(d);
	printf("  stop %.1f ms\n", (vmig__now_us() - t0) / 1000.0);
out:
	if (ret < 0)
		fprintf(stderr, "mode %d: %s (%d)\n", (int)mode, err.msg, ret);
	vmig__dirty_close(d);
	free(bitmap);
	free(scratch);
	return ret < 0 ? ret : 0;
}

int main(int argc, char **argv)
{
	uint64_t size = 4ull << 30, features;
	int reps = 7, fd, ret = 0;
	bool scan, anon = false;
	uint8_t *mem;

	if (argc > 1 && vmig__parse_size(argv[1], &size)) {
		fprintf(stderr, "usage: %s [SIZE [REPS]]\n", argv[0]);
		return 2;
	}
	if (argc > 2)
		reps = atoi(argv[2]);
	if (argc > 3)
		anon = !strcmp(argv[3], "anon");
	if (reps < 1 || reps > 64 || size % VMIG_PAGE_SIZE || !size) {
		fprintf(stderr, "REPS must be 1..64, SIZE a non-zero multiple of 4K\n");
		return 2;
	}
	if (vmig__dirty_probe(&features, &scan) == 0)
		printf("kernel: uffd features 0x%llx, WP_ASYNC %d, PAGEMAP_SCAN %d\n",
		       (unsigned long long)features, !!(features & (1ull << 15)), scan);
	if (anon) {
		mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	} else {
		fd = memfd_create("ram-dirty-bench", MFD_CLOEXEC);
		if (fd < 0 || ftruncate(fd, (off_t)size) < 0) {
			perror("memfd");
			return 1;
		}
		mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		close(fd);
	}
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	printf("memory: %s, %llu MiB, every page touched\n",
	       anon ? "anonymous private" : "memfd shared", (unsigned long long)(size >> 20));
	for (uint64_t off = 0; off < size; off += VMIG_PAGE_SIZE)
		mem[off] = 1;
	ret |= bench_mode(VMIG_DIRTY_UFFD_ASYNC, mem, size, reps);
	ret |= bench_mode(VMIG_DIRTY_UFFD_SYNC, mem, size, reps);
	munmap(mem, size);
	return ret ? 1 : 0;
}
