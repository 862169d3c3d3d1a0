/* SPDX-License-Identifier: MIT */
/*
 * Private state of the dirty tracker, shared by dirty.c (common setup and
 * registration), dirty_async.c (PAGEMAP_SCAN backend) and dirty_sync.c
 * (tracker-thread backend). Not for use outside lib/ram/.
 */
#ifndef VMIG_RAM_DIRTY_INT_H
#define VMIG_RAM_DIRTY_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "ram/ram.h"
#include "util/compat.h"

struct vmig__dirty_range {
	uintptr_t start; /* page aligned */
	uint64_t size;
	uint64_t npages;
	bool registered; /* UFFDIO_REGISTER done (start() .. stop()) */
	bool shared;	 /* MAP_SHARED (memfd): write access restored at stop() */
	/* The unit of write protection: 4 KiB, or the huge page of a hugetlbfs
	 * mapping, which the kernel protects and reports only whole. */
	uint64_t unit;
	/*
	 * Sync backend only: pages the tracker thread un-protected since the
	 * last sync. Set by the tracker, cleared by sync(), both under
	 * d->lock (see dirty_sync.c for why the lock, not just atomics).
	 */
	uint64_t *pending;
};

struct vmig__dirty {
	enum vmig_dirty_tracking mode; /* ASYNC or SYNC, never AUTO */
	int uffd;
	uint64_t uffd_features; /* features enabled on uffd */
	bool started;

	struct vmig__dirty_range ranges[VMIG__DIRTY_MAX_RANGES];
	unsigned nranges;

	/* Async backend: /proc/self/pagemap and the preallocated output vector. */
	int pagemap_fd;
	struct page_region *scan_vec;
	unsigned scan_vec_len;

	/*
	 * Sync backend: the tracker thread and its stop signal. lock orders
	 * "record + un-protect" (tracker) against "re-protect + clear"
	 * (sync) for each page; it also guards ranges[] against add_range()
	 * while the thread runs.
	 */
	pthread_mutex_t lock;
	pthread_t thread;
	bool thread_running;
	int stop_efd;
	int thread_err;		/* first -errno seen by the tracker, read after join */
	uint64_t thread_faults; /* WP faults handled (statistics) */
};

/* UFFDIO_WRITEPROTECT over [start, start + len), retrying EAGAIN/EINTR. */
int vmig__dirty_wp(int uffd, uintptr_t start, uint64_t len, bool protect);

/* Async backend (dirty_async.c). */
int vmig__dirty_async_sync(struct vmig__dirty *d, struct vmig__dirty_range *r, uint64_t *bitmap,
			   uint64_t *ndirty, struct vmig__err *err);
bool vmig__dirty_async_supported(int pagemap_fd);

/* Sync backend (dirty_sync.c). */
int vmig__dirty_thread_start(struct vmig__dirty *d, struct vmig__err *err);
void vmig__dirty_thread_stop(struct vmig__dirty *d);
int vmig__dirty_sync_collect(struct vmig__dirty *d, struct vmig__dirty_range *r, uint64_t *bitmap,
			     uint64_t *ndirty, struct vmig__err *err);

#endif
