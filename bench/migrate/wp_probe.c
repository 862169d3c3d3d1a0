// SPDX-License-Identifier: MIT
/*
 * wp_probe: what userfaultfd write-protection costs the next reads of the
 * memory it protects, on this host.
 *
 * vmig tracks a guest's writes during pre-copy by write-protecting guest RAM
 * with userfaultfd (UFFDIO_WRITEPROTECT at the start, then PAGEMAP_SCAN).
 * QEMU under TCG tracks them in software and changes no page table. Where the
 * host is itself a guest whose hypervisor shadows the page tables, changing
 * them can make the next access to each 4 KiB page trap into the hypervisor,
 * and that cost lands on whoever reads the page next: the sender's zero-page
 * check or the kernel's copy into the socket.
 *
 * The probe fills SIZE of memory from user space (as a guest writes its RAM),
 * waits IDLE seconds, then times one load per 4 KiB page:
 *   before_wp_s   the pass before any protection (the memory is warm);
 *   after_wp_s    the pass right after the whole range is write-protected:
 *                 by UFFDIO_WRITEPROTECT, or with --pagemap-scan by one
 *                 PAGEMAP_SCAN with PM_SCAN_WP_MATCHING (userfaultfd in
 *                 WP_ASYNC mode), as vmig re-protects written pages;
 *   again_s       the pass after that;
 *   after_mprotect_s  a control: the pass after mprotect(PROT_READ) and back.
 * Output is one "key=value" per line.
 *
 * Usage: wp_probe [--hugetlb] [--pagemap-scan] [--size MIB] [--idle SECONDS]
 * With --hugetlb the memory is a hugetlb memfd (2 MiB pages), which must be
 * reserved first: echo N > /proc/sys/vm/nr_hugepages (N = MIB / 2).
 * Build: cc -O2 -Ilib -o wp_probe bench/migrate/wp_probe.c (bench/migrate/run.sh
 * builds it next to tcp_raw). The constants Debian 12's kernel headers lack
 * come from vmig's compat header.
 */
#define _GNU_SOURCE /* memfd_create */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "util/compat.h" /* UFFD_FEATURE_WP_ASYNC, PAGEMAP_SCAN */

#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM /* Linux 5.19 */
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif

#define PAGE 4096u

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Where the passes store their sum, so that the loads are not dropped. */
static volatile uint64_t sink;

/* One load per 4 KiB page, as a sender's zero-page check does. */
static double load_pass(const uint8_t *p, size_t len)
{
	uint64_t sum = 0;
	double t0 = now_s();

	for (size_t off = 0; off < len; off += PAGE)
		sum += *(const volatile uint64_t *)(p + off);
	sink = sum;
	return now_s() - t0;
}

/* Protect [p, p + len) with PAGEMAP_SCAN: in WP_ASYNC mode every page not
 * yet protected counts as written, so WP_MATCHING protects them all. */
static int protect_by_scan(uint8_t *p, size_t len)
{
	struct page_region vec[16];
	struct pm_scan_arg arg = {
	    .size = sizeof(arg),
	    .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
	    .start = (uintptr_t)p,
	    .end = (uintptr_t)p + len,
	    .vec = (uintptr_t)vec,
	    .vec_len = 16,
	    .category_mask = PAGE_IS_WRITTEN,
	    .return_mask = PAGE_IS_WRITTEN,
	};
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC), ret;

	if (fd < 0)
		return -1;
	/* The walk may stop early (a full vec): go on from where it did. */
	do {
		ret = ioctl(fd, PAGEMAP_SCAN, &arg) < 0 ? -1 : 0;
		if (!ret && arg.walk_end <= arg.start) {
			errno = EIO; /* no progress: never loop forever */
			ret = -1;
		}
		arg.start = arg.walk_end;
	} while (!ret && arg.start < arg.end);
	close(fd);
	return ret;
}

static int fail(const char *what)
{
	fprintf(stderr, "wp_probe: %s: %s\n", what, strerror(errno));
	return 1;
}

static int usage(void)
{
	fprintf(stderr,
		"usage: wp_probe [--hugetlb] [--pagemap-scan] [--size MIB] [--idle SECONDS]\n");
	return 2;
}

int main(int argc, char **argv)
{
	size_t len = (size_t)1024 << 20;
	struct uffdio_writeprotect wp = {.mode = UFFDIO_WRITEPROTECT_MODE_WP};
	struct uffdio_register reg = {.mode = UFFDIO_REGISTER_MODE_WP};
	struct uffdio_api api = {.api = UFFD_API};
	unsigned idle = 0;
	int huge = 0, scan = 0, fd, uffd;
	uint8_t *p;
	double t0;

	for (int i = 1; i < argc; i++) {
		char *end;

		if (!strcmp(argv[i], "--hugetlb")) {
			huge = 1;
		} else if (!strcmp(argv[i], "--pagemap-scan")) {
			scan = 1;
		} else if (!strcmp(argv[i], "--size") && i + 1 < argc) {
			unsigned long mib = strtoul(argv[++i], &end, 10);

			if (*end || !mib || mib % 2 || mib > (1ul << 20))
				return usage(); /* whole huge pages, at most 1 TiB */
			len = (size_t)mib << 20;
		} else if (!strcmp(argv[i], "--idle") && i + 1 < argc) {
			unsigned long s = strtoul(argv[++i], &end, 10);

			if (*end || s > 3600)
				return usage();
			idle = (unsigned)s;
		} else {
			return usage();
		}
	}

	fd = memfd_create("wp_probe", MFD_CLOEXEC | (huge ? MFD_HUGETLB : 0));

	if (fd < 0)
		return fail("memfd_create");
	if (ftruncate(fd, (off_t)len))
		return fail("ftruncate");
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);

	if (p == MAP_FAILED)
		return fail(huge ? "mmap (are the huge pages reserved?)" : "mmap");

	/* Every word written from user space; distinct values, no zero pages. */
	t0 = now_s();
	for (size_t off = 0; off < len; off += 8)
		*(uint64_t *)(p + off) = (off + 1) * 0x9e3779b97f4a7c15ull;
	printf("fill_s=%.3f\n", now_s() - t0);
	if (idle)
		sleep(idle);
	printf("before_wp_s=%.3f\n", load_pass(p, len));

	uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0)
		return fail("userfaultfd");
	api.features =
	    (huge ? UFFD_FEATURE_WP_HUGETLBFS_SHMEM : 0) | (scan ? UFFD_FEATURE_WP_ASYNC : 0);
	reg.range = wp.range = (struct uffdio_range){(uintptr_t)p, len};
	if (ioctl(uffd, UFFDIO_API, &api))
		return fail("UFFDIO_API");
	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		return fail("UFFDIO_REGISTER");
	t0 = now_s();
	if (scan ? protect_by_scan(p, len) : ioctl(uffd, UFFDIO_WRITEPROTECT, &wp))
		return fail(scan ? "PAGEMAP_SCAN" : "UFFDIO_WRITEPROTECT");
	printf("writeprotect_s=%.3f\n", now_s() - t0);
	printf("after_wp_s=%.3f\n", load_pass(p, len));
	printf("again_s=%.3f\n", load_pass(p, len));

	if (ioctl(uffd, UFFDIO_UNREGISTER, &reg.range))
		return fail("UFFDIO_UNREGISTER");
	if (mprotect(p, len, PROT_READ) || mprotect(p, len, PROT_READ | PROT_WRITE))
		return fail("mprotect");
	printf("after_mprotect_s=%.3f\n", load_pass(p, len));
	printf("size_mib=%zu\nhugetlb=%d\npagemap_scan=%d\n", len >> 20, huge, scan);
	return 0;
}
