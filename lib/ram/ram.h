/* SPDX-License-Identifier: MIT */
/*
 * Dirty-page tracking over ranges of guest RAM, for the pre-copy engine. A
 * tracker write-protects the ranges with userfaultfd and reports, at each
 * sync, every 4 KiB page written since the previous sync. Two backends:
 *
 *  - UFFD_ASYNC (Linux 6.7+): UFFD_FEATURE_WP_ASYNC lets the kernel resolve
 *    write faults by itself, and one PAGEMAP_SCAN ioctl per sync finds the
 *    written pages and re-protects them under the page-table lock. No thread,
 *    no per-page syscall, exact (no false positives).
 *  - UFFD_SYNC: classic uffd-wp. A tracker thread receives each first write
 *    to a protected page, records it and un-protects the page; sync()
 *    re-protects the recorded pages. Conservative: a page may occasionally be
 *    reported without having been written, never the reverse.
 *
 * Only writes made through the registered mapping of this process are seen
 * (including kernel writes into it, e.g. read(2) into guest RAM); writes to
 * the same memfd through another mapping or another process are not.
 *
 * Threads: open/add_range/start/sync/stop/close are called from one thread
 * at a time (the migration thread); vCPU threads may write to the ranges
 * concurrently with any of them. Internal API: not exported from libvmig.
 */
#ifndef VMIG_RAM_RAM_H
#define VMIG_RAM_RAM_H

#include <stdbool.h>
#include <stdint.h>

#include "ram/bitmap.h"
#include "util/util.h"
#include "vmig/vmig.h"

/*
 * A registered guest RAM block and its per-page state, as the migration
 * state machines (lib/migrate) and post-copy placement (lib/postcopy) see
 * it. The bitmaps have one bit per 4 KiB page; who writes which is said
 * where they are used.
 */
struct vmig__block {
	char name[64 + 1]; /* VMIG_BLOCK_NAME_MAX of the stream format, checked there */
	uint8_t *host;
	uint64_t size;
	uint64_t npages;
	int fd;
	uint64_t fd_offset;
	bool prealloc;	     /* VMIG_RAM_PREALLOC: keep populated, write in place */
	/* Destination, post-copy on a preallocated file block: the pages stay
	 * in the file; missing ones are kept out of the guest's view and
	 * mapped with UFFDIO_CONTINUE (MINOR faults) once written through a
	 * second mapping. Set at incoming start, read-only after. */
	bool pc_minor;
	uint64_t hpage;	     /* hugetlbfs page size (dirty tracking and placement
			      * granularity), or 0 for normal pages */
	uint64_t *dirty;     /* source: pages still to send */
	uint64_t *page_hash; /* hash of each page as last sent / placed */
	uint64_t *received;  /* destination: page content arrived (data or zero) */
	uint64_t *zero;	     /* destination: the content that arrived was zero */
	uint64_t *placed;    /* destination, post-copy: page claimed for placing */
	uint64_t *installed; /* destination, post-copy: placed page is mapped */
	uint64_t *requested; /* destination, post-copy: page asked for, or a fault
			      * waits for its placing to end */
};

/* Ranges per tracker. Guest RAM comes in a handful of blocks. */
#define VMIG__DIRTY_MAX_RANGES 32

struct vmig__dirty; /* opaque */

/*
 * Create a tracker. mode AUTO picks UFFD_ASYNC when the kernel offers both
 * UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN (probed now), else UFFD_SYNC.
 * Asking for a backend the kernel lacks fails with -EOPNOTSUPP and says why
 * in err. Returns 0 or -errno.
 */
int vmig__dirty_open(struct vmig__dirty **out, enum vmig_dirty_tracking mode,
		     struct vmig__err *err);
/*
 * Same, with flags for tests: VMIG__DIRTY_NO_WP_UNPOPULATED behaves as on a
 * kernel without UFFD_FEATURE_WP_UNPOPULATED (before 6.4) in sync mode, where
 * page-table holes get the zero page mapped at start() so they can be
 * protected. Async mode always has it (WP_ASYNC implies it).
 */
#define VMIG__DIRTY_NO_WP_UNPOPULATED 0x1u
int vmig__dirty_open_flags(struct vmig__dirty **out, enum vmig_dirty_tracking mode, unsigned flags,
			   struct vmig__err *err);
/* The backend actually in use (never AUTO). */
enum vmig_dirty_tracking vmig__dirty_mode(const struct vmig__dirty *d);

/*
 * Add a range: host and size page aligned, size > 0, mapped for as long as
 * the tracker uses it (MAP_SHARED memfd or MAP_PRIVATE anonymous memory).
 * Returns the range index (>= 0, in order of addition) or -errno. A range
 * added while tracking is active is protected at once.
 */
int vmig__dirty_add_range(struct vmig__dirty *d, void *host, uint64_t size, struct vmig__err *err);
/* Pages in range idx (size / 4096): the bitmap for sync() has this many bits. */
uint64_t vmig__dirty_range_pages(const struct vmig__dirty *d, unsigned idx);

/*
 * Register every range and write-protect it whole, including pages never
 * touched yet. From the moment this returns, any write to a range marks its
 * page dirty. Returns 0 or -errno (-EBUSY if already started, or if another
 * userfaultfd already watches the memory).
 */
int vmig__dirty_start(struct vmig__dirty *d, struct vmig__err *err);

/*
 * OR into bitmap (one bit per page of range idx, vmig__dirty_range_pages()
 * bits) every page written since start() or since the previous sync of this
 * range, and re-protect exactly those pages. *ndirty (may be NULL) receives
 * how many bits of bitmap this call turned from 0 to 1 (with a cleared
 * bitmap: the number of pages written since the previous sync). A write
 * racing with the sync is reported by this sync or by the next one, never
 * lost, provided the caller reads a page's content only after the sync that
 * reported it has returned. Returns 0 or -errno (-EINVAL if not started or
 * idx is out of range).
 */
int vmig__dirty_sync(struct vmig__dirty *d, unsigned idx, uint64_t *bitmap, uint64_t *ndirty,
		     struct vmig__err *err);

/*
 * Stop tracking: remove the protection, unregister, stop the tracker thread,
 * and (MAP_SHARED ranges) restore write access to every present page, so
 * writers run at full speed again without a single fault. start() may be called again afterwards.
 * Returns 0 or the first -errno met (it still undoes everything it can).
 */
int vmig__dirty_stop(struct vmig__dirty *d);
/*
 * Same, with VMIG__DIRTY_STOP_NO_RESTORE: skip restoring write access to
 * MAP_SHARED ranges. Restoring takes one kernel write fault per present page
 * (about 1 s per 4 GiB here) so that the vCPUs do not take them; skip it
 * when the VM will not run on this side any more (migration completed).
 * Never call stop during downtime.
 */
#define VMIG__DIRTY_STOP_NO_RESTORE 0x1u
int vmig__dirty_stop_flags(struct vmig__dirty *d, unsigned flags);
/* Stop if needed and free everything (without the restore). NULL is fine. */
void vmig__dirty_close(struct vmig__dirty *d);

/*
 * For tests: cap the number of page regions one PAGEMAP_SCAN call may return
 * (default VMIG__DIRTY_SCAN_REGIONS), so the "output vector full, resume at
 * walk_end" path can be exercised with few pages. n >= 1. Call before start.
 */
#define VMIG__DIRTY_SCAN_REGIONS 4096
int vmig__dirty_set_scan_regions(struct vmig__dirty *d, unsigned n);

/*
 * Kernel features found by a probe (for reports and tests): the userfaultfd
 * feature bits the kernel offers, and whether /proc/self/pagemap answers
 * PAGEMAP_SCAN. Returns 0 or -errno (e.g. -EPERM if userfaultfd is denied).
 */
int vmig__dirty_probe(uint64_t *uffd_features, bool *has_pagemap_scan);

#endif
