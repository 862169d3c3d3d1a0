// SPDX-License-Identifier: MIT
/*
 * Async dirty-tracking backend (Linux 6.7+). The ranges are registered with
 * UFFD_FEATURE_WP_ASYNC: a write to a protected page is resolved by the
 * kernel itself, which clears the page's uffd-wp bit. A sync is then one
 * PAGEMAP_SCAN walk per range over /proc/self/pagemap asking for the pages
 * whose bit is clear (PAGE_IS_WRITTEN) and, in the same walk, setting it again
 * (PM_SCAN_WP_MATCHING). The kernel tests and re-protects each PTE under its
 * page-table lock, so a concurrent write either lands before (reported now)
 * or faults after (reported next time). A writer that still holds a stale
 * writable TLB entry can only hit a page this very sync reports, and the
 * caller reads that page after sync() returns, when the TLB has been flushed.
 *
 * The output vector is preallocated at open(); when it fills up the kernel
 * stops at walk_end and we call again from there, so the cost per sync is
 * one ioctl per scan_vec_len dirty runs and nothing per clean page.
 *
 * Input: only the kernel's answers, which are still bounds-checked before
 * they index the caller's bitmap.
 */
#include "ram/dirty_int.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

/* Bound on ioctls per range and sync beyond the ones that made progress. */
#define SCAN_EINTR_RETRIES 100

bool vmig__dirty_async_supported(int pagemap_fd)
{
	static uint64_t probe_page[VMIG_PAGE_SIZE / sizeof(uint64_t)]
	    __attribute__((aligned(VMIG_PAGE_SIZE)));
	struct page_region region;
	struct pm_scan_arg arg = {
	    .size = sizeof(arg),
	    .start = (uintptr_t)probe_page,
	    .end = (uintptr_t)probe_page + VMIG_PAGE_SIZE,
	    .vec = (uintptr_t)&region,
	    .vec_len = 1,
	    .category_anyof_mask = PAGE_IS_PRESENT,
	    .return_mask = PAGE_IS_PRESENT,
	};

	/* Kernels without the ioctl answer ENOTTY (or EINVAL on some). */
	return ioctl(pagemap_fd, PAGEMAP_SCAN, &arg) >= 0;
}

/* Fold one region reported by the kernel into bitmap; false if it is bogus. */
static bool fold_region(const struct vmig__dirty_range *r, const struct page_region *pr,
			uintptr_t from, uintptr_t to, uint64_t *bitmap, uint64_t *count)
{
	uint64_t first, n;

	if (pr->start < from || pr->end > to || pr->start >= pr->end ||
	    (pr->start | pr->end) % VMIG_PAGE_SIZE)
		return false;
	first = (pr->start - r->start) / VMIG_PAGE_SIZE;
	n = (pr->end - pr->start) / VMIG_PAGE_SIZE;
	*count += vmig__bitmap_set_range_count(bitmap, first, n);
	return true;
}

int vmig__dirty_async_sync(struct vmig__dirty *d, struct vmig__dirty_range *r, uint64_t *bitmap,
			   uint64_t *ndirty, struct vmig__err *err)
{
	uintptr_t pos = r->start, end = r->start + r->size;
	uint64_t count = 0;
	unsigned eintr = 0;
	struct pm_scan_arg arg;
	long n;

	while (pos < end) {
		memset(&arg, 0, sizeof(arg));
		arg.size = sizeof(arg);
		arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
		arg.start = pos;
		arg.end = end;
		arg.vec = (uintptr_t)d->scan_vec;
		arg.vec_len = d->scan_vec_len;
		arg.category_mask = PAGE_IS_WRITTEN;
		arg.return_mask = PAGE_IS_WRITTEN;
		n = ioctl(d->pagemap_fd, PAGEMAP_SCAN, &arg);
		if (n < 0) {
			if (errno == EINTR && ++eintr < SCAN_EINTR_RETRIES)
				continue;
			n = -errno;
			vmig__err_set(err, "dirty tracking: PAGEMAP_SCAN %#lx-%#lx: %s%s",
				      (unsigned long)pos, (unsigned long)end, strerror((int)-n),
				      n == -EPERM ? " (range not under async write-protect)" : "");
			return (int)n;
		}
		for (long i = 0; i < n && (unsigned long)n <= d->scan_vec_len; i++) {
			if (!fold_region(r, &d->scan_vec[i], pos, end, bitmap, &count))
				goto bogus;
		}
		if ((unsigned long)n > d->scan_vec_len || arg.walk_end <= pos ||
		    arg.walk_end > end || arg.walk_end % VMIG_PAGE_SIZE)
			goto bogus;
		pos = arg.walk_end;
	}
	if (ndirty)
		*ndirty = count;
	return 0;

bogus:
	vmig__err_set(err, "dirty tracking: PAGEMAP_SCAN at %#lx returned an impossible answer",
		      (unsigned long)pos);
	return -EIO;
}
