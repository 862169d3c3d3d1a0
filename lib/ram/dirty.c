// SPDX-License-Identifier: MIT
/*
 * Dirty tracker, common part: feature probing and backend choice, the
 * userfaultfd, range registration and write protection, start/stop. The
 * per-sync work lives in dirty_async.c (PAGEMAP_SCAN) and dirty_sync.c
 * (tracker thread). See ram.h for the contract.
 *
 * Nothing here parses peer data; the only input is the kernel's answers.
 */
#include "ram/dirty_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* 5.14 */
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* 5.14 */
#endif

/* /proc/self/pagemap entry: page present in RAM. */
#define PAGEMAP_PRESENT (1ull << 63)
/* Pagemap entries read per pread(2) when restoring write access. */
#define PAGEMAP_CHUNK 512

/* Bounded retries for ioctls that may answer EAGAIN while the mm changes. */
#define DIRTY_RETRIES 1000

/*
 * A userfaultfd that also sees faults raised by the kernel on our behalf
 * (read(2) into guest RAM): try that first, and fall back to user-mode-only
 * where unprivileged userfaultfd is restricted to it.
 */
static int uffd_new(int flags)
{
	int fd = (int)syscall(SYS_userfaultfd, flags);

	if (fd < 0 && errno == EPERM)
		fd = (int)syscall(SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY);
	return fd < 0 ? -errno : fd;
}

static int uffd_api(int fd, uint64_t want, uint64_t *offered)
{
	struct uffdio_api api = {.api = UFFD_API, .features = want};

	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return -errno;
	if (offered)
		*offered = api.features;
	return 0;
}

int vmig__dirty_probe(uint64_t *uffd_features, bool *has_pagemap_scan)
{
	int fd, ret;

	*uffd_features = 0;
	*has_pagemap_scan = false;
	fd = uffd_new(O_CLOEXEC);
	if (fd < 0)
		return fd;
	ret = uffd_api(fd, 0, uffd_features);
	close(fd);
	if (ret)
		return ret;
	fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		*has_pagemap_scan = vmig__dirty_async_supported(fd);
		close(fd);
	}
	return 0;
}

int vmig__dirty_wp(int uffd, uintptr_t start, uint64_t len, bool protect)
{
	struct uffdio_writeprotect wp;

	for (int i = 0; i < DIRTY_RETRIES; i++) {
		wp.range.start = start;
		wp.range.len = len;
		wp.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
		if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) == 0)
			return 0;
		if (errno != EAGAIN && errno != EINTR)
			return -errno;
	}
	return -EAGAIN;
}

/* Pick the backend from what the kernel offers; fills d->mode. */
static int choose_mode(struct vmig__dirty *d, enum vmig_dirty_tracking want, uint64_t offered,
		       bool has_scan, struct vmig__err *err)
{
	bool async_ok = (offered & UFFD_FEATURE_WP_ASYNC) && has_scan;

	if (!(offered & UFFD_FEATURE_PAGEFAULT_FLAG_WP)) {
		vmig__err_set(err, "dirty tracking: kernel lacks userfaultfd write-protect");
		return -EOPNOTSUPP;
	}
	switch (want) {
	case VMIG_DIRTY_AUTO:
		d->mode = async_ok ? VMIG_DIRTY_UFFD_ASYNC : VMIG_DIRTY_UFFD_SYNC;
		return 0;
	case VMIG_DIRTY_UFFD_ASYNC:
		if (!async_ok) {
			vmig__err_set(err,
				      "dirty tracking: async mode needs Linux 6.7+ "
				      "(UFFD_FEATURE_WP_ASYNC: %s, PAGEMAP_SCAN: %s)",
				      (offered & UFFD_FEATURE_WP_ASYNC) ? "yes" : "no",
				      has_scan ? "yes" : "no");
			return -EOPNOTSUPP;
		}
		d->mode = want;
		return 0;
	case VMIG_DIRTY_UFFD_SYNC:
		d->mode = want;
		return 0;
	}
	vmig__err_set(err, "dirty tracking: unknown mode %d", (int)want);
	return -EINVAL;
}

/* Probe, choose the backend, create the userfaultfd with its features. */
static int dirty_setup(struct vmig__dirty *d, enum vmig_dirty_tracking mode, unsigned flags,
		       struct vmig__err *err)
{
	uint64_t offered, want;
	int ret;

	ret = d->uffd = uffd_new(O_CLOEXEC | O_NONBLOCK);
	if (ret < 0) {
		vmig__err_set(err, "dirty tracking: userfaultfd: %s", strerror(-ret));
		return ret;
	}
	/* The API handshake may be done once per fd: probe on a spare one. */
	ret = vmig__dirty_probe(&offered, &(bool){false});
	if (ret) {
		vmig__err_set(err, "dirty tracking: UFFDIO_API probe: %s", strerror(-ret));
		return ret;
	}
	d->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	ret = choose_mode(d, mode, offered,
			  d->pagemap_fd >= 0 && vmig__dirty_async_supported(d->pagemap_fd), err);
	if (ret)
		return ret;
	want = UFFD_FEATURE_PAGEFAULT_FLAG_WP |
	       (offered & (UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED));
	if (flags & VMIG__DIRTY_NO_WP_UNPOPULATED)
		want &= ~(uint64_t)UFFD_FEATURE_WP_UNPOPULATED;
	if (d->mode == VMIG_DIRTY_UFFD_ASYNC)
		want |= UFFD_FEATURE_WP_ASYNC;
	ret = uffd_api(d->uffd, want, NULL);
	if (ret) {
		vmig__err_set(err, "dirty tracking: UFFDIO_API(0x%llx): %s",
			      (unsigned long long)want, strerror(-ret));
		return ret;
	}
	d->uffd_features = want;
	return 0;
}

int vmig__dirty_open(struct vmig__dirty **out, enum vmig_dirty_tracking mode, struct vmig__err *err)
{
	return vmig__dirty_open_flags(out, mode, 0, err);
}

int vmig__dirty_open_flags(struct vmig__dirty **out, enum vmig_dirty_tracking mode, unsigned flags,
			   struct vmig__err *err)
{
	struct vmig__dirty *d;
	int ret;

	*out = NULL;
	d = calloc(1, sizeof(*d));
	if (!d) {
		vmig__err_set(err, "dirty tracking: out of memory");
		return -ENOMEM;
	}
	d->uffd = d->pagemap_fd = d->stop_efd = -1;
	d->scan_vec_len = VMIG__DIRTY_SCAN_REGIONS;
	ret = -pthread_mutex_init(&d->lock, NULL);
	if (ret) {
		free(d);
		vmig__err_set(err, "dirty tracking: mutex: %s", strerror(-ret));
		return ret;
	}
	if (flags & ~VMIG__DIRTY_NO_WP_UNPOPULATED) {
		ret = -EINVAL;
		vmig__err_set(err, "dirty tracking: unknown flags %#x", flags);
		goto err_close;
	}
	ret = dirty_setup(d, mode, flags, err);
	if (ret)
		goto err_close;
	if (d->mode == VMIG_DIRTY_UFFD_ASYNC) {
		d->scan_vec = calloc(d->scan_vec_len, sizeof(*d->scan_vec));
		if (!d->scan_vec) {
			ret = -ENOMEM;
			vmig__err_set(err, "dirty tracking: out of memory");
			goto err_close;
		}
	} else {
		close(d->pagemap_fd);
		d->pagemap_fd = -1;
	}
	*out = d;
	return 0;

err_close:
	vmig__dirty_close(d);
	return ret;
}

enum vmig_dirty_tracking vmig__dirty_mode(const struct vmig__dirty *d)
{
	return d->mode;
}

int vmig__dirty_set_scan_regions(struct vmig__dirty *d, unsigned n)
{
	if (!n || d->started)
		return -EINVAL;
	/* The preallocated vector only ever shrinks: no allocation needed. */
	if (n > VMIG__DIRTY_SCAN_REGIONS)
		n = VMIG__DIRTY_SCAN_REGIONS;
	d->scan_vec_len = n;
	return 0;
}

uint64_t vmig__dirty_range_pages(const struct vmig__dirty *d, unsigned idx)
{
	return idx < d->nranges ? d->ranges[idx].npages : 0;
}

/* Register one range for write-protect faults and protect all of it. */
static int range_arm(struct vmig__dirty *d, struct vmig__dirty_range *r, struct vmig__err *err)
{
	struct uffdio_register reg = {
	    .range = {.start = r->start, .len = r->size},
	    .mode = UFFDIO_REGISTER_MODE_WP,
	};
	int ret;

	if (ioctl(d->uffd, UFFDIO_REGISTER, &reg) < 0) {
		ret = -errno;
		vmig__err_set(err, "dirty tracking: UFFDIO_REGISTER(%#lx+%llu): %s%s",
			      (unsigned long)r->start, (unsigned long long)r->size, strerror(-ret),
			      ret == -EBUSY ? " (another userfaultfd watches this memory)" : "");
		return ret;
	}
	r->registered = true;
	if (!(reg.ioctls & (1ull << _UFFDIO_WRITEPROTECT))) {
		vmig__err_set(err, "dirty tracking: memory at %#lx cannot be write-protected",
			      (unsigned long)r->start);
		return -EOPNOTSUPP;
	}
	/*
	 * Without WP_UNPOPULATED the kernel cannot protect page-table holes of
	 * private anonymous memory, and a first write there would go unseen.
	 * Mapping the shared zero page (no memory spent) gives it a PTE to
	 * protect. Shared memory needs no help (the kernel leaves a marker in
	 * the hole), and reading it would allocate every page.
	 */
	if (!(d->uffd_features & UFFD_FEATURE_WP_UNPOPULATED) && !r->shared)
		(void)madvise((void *)r->start, r->size, MADV_POPULATE_READ);
	if (r->pending)
		memset(r->pending, 0, vmig__bitmap_words(r->npages) * sizeof(uint64_t));
	ret = vmig__dirty_wp(d->uffd, r->start, r->size, true);
	if (ret) {
		vmig__err_set(err, "dirty tracking: write-protect %#lx+%llu: %s",
			      (unsigned long)r->start, (unsigned long long)r->size, strerror(-ret));
		return ret;
	}
	return 0;
}

/*
 * Whether the mapping containing addr is MAP_SHARED, and its page size
 * (4 KiB, or a huge page), from /proc/self/smaps: the kernel's own text, a
 * "start-end perms ..." line per mapping followed by its fields, among them
 * "KernelPageSize: N kB".
 */
static void mapping_info(uintptr_t addr, bool *shared, uint64_t *page)
{
	FILE *f = fopen("/proc/self/smaps", "re");
	char line[512], perms[8];
	unsigned long lo, hi, kb;
	bool in = false;

	*shared = false;
	*page = VMIG_PAGE_SIZE;
	if (!f)
		return;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) == 3 && strchr(line, '-')) {
			if (in)
				break;
			in = addr >= lo && addr < hi;
			*shared = in && perms[3] == 's';
			continue;
		}
		if (in && sscanf(line, "KernelPageSize: %lu kB", &kb) == 1) {
			if (kb << 10 > VMIG_PAGE_SIZE && !((kb << 10) & ((kb << 10) - 1)))
				*page = (uint64_t)kb << 10;
			break;
		}
	}
	fclose(f);
}

/*
 * After uffd-wp, the kernel leaves the PTEs of a MAP_SHARED mapping read-only
 * (only the uffd-wp bit is cleared), so every page would take one more write
 * fault in the vCPUs. Take those faults here instead, with
 * MADV_POPULATE_WRITE over the runs of present pages only: populating holes
 * would allocate guest RAM the guest never used. Best effort: on failure the
 * vCPUs just take the faults themselves.
 */
static void range_restore_write(struct vmig__dirty_range *r)
{
	uint64_t ent[PAGEMAP_CHUNK], run = 0, first = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return;
	for (uint64_t p = 0; p < r->npages; p += PAGEMAP_CHUNK) {
		uint64_t n = VMIG_MIN((uint64_t)PAGEMAP_CHUNK, r->npages - p);
		off_t off = (off_t)((r->start / VMIG_PAGE_SIZE + p) * sizeof(uint64_t));

		if (pread(fd, ent, n * sizeof(uint64_t), off) != (ssize_t)(n * sizeof(uint64_t)))
			break;
		for (uint64_t i = 0; i < n; i++) {
			if (ent[i] & PAGEMAP_PRESENT) {
				first = run ? first : p + i;
				run++;
				continue;
			}
			if (run)
				(void)madvise((void *)(r->start + first * VMIG_PAGE_SIZE),
					      run * VMIG_PAGE_SIZE, MADV_POPULATE_WRITE);
			run = 0;
		}
	}
	if (run)
		(void)madvise((void *)(r->start + first * VMIG_PAGE_SIZE), run * VMIG_PAGE_SIZE,
			      MADV_POPULATE_WRITE);
	close(fd);
}

/* Undo range_arm(): unprotect (waking blocked writers) and unregister. */
static int range_unprotect(struct vmig__dirty *d, struct vmig__dirty_range *r)
{
	return r->registered ? vmig__dirty_wp(d->uffd, r->start, r->size, false) : 0;
}

static int range_unregister(struct vmig__dirty *d, struct vmig__dirty_range *r)
{
	struct uffdio_range range = {.start = r->start, .len = r->size};

	if (!r->registered)
		return 0;
	r->registered = false;
	return ioctl(d->uffd, UFFDIO_UNREGISTER, &range) < 0 ? -errno : 0;
}

int vmig__dirty_add_range(struct vmig__dirty *d, void *host, uint64_t size, struct vmig__err *err)
{
	struct vmig__dirty_range *r;
	uintptr_t start = (uintptr_t)host;
	int ret = 0;

	if (!size || start % VMIG_PAGE_SIZE || size % VMIG_PAGE_SIZE || start + size < start) {
		vmig__err_set(err, "dirty tracking: range %p+%llu is not page aligned", host,
			      (unsigned long long)size);
		return -EINVAL;
	}
	if (d->nranges >= VMIG__DIRTY_MAX_RANGES) {
		vmig__err_set(err, "dirty tracking: more than %d ranges", VMIG__DIRTY_MAX_RANGES);
		return -ENOSPC;
	}
	r = &d->ranges[d->nranges];
	memset(r, 0, sizeof(*r));
	r->start = start;
	r->size = size;
	r->npages = size / VMIG_PAGE_SIZE;
	mapping_info(start, &r->shared, &r->unit);
	if (start % r->unit || size % r->unit) {
		vmig__err_set(err,
			      "dirty tracking: range %p+%llu is not aligned to its %llu KiB pages",
			      host, (unsigned long long)size, (unsigned long long)(r->unit >> 10));
		return -EINVAL;
	}
	if (d->mode == VMIG_DIRTY_UFFD_SYNC) {
		r->pending = calloc(vmig__bitmap_words(r->npages), sizeof(uint64_t));
		if (!r->pending) {
			vmig__err_set(err, "dirty tracking: out of memory");
			return -ENOMEM;
		}
	}
	if (d->started) {
		/*
		 * Publish the range to the tracker thread (which looks ranges up
		 * under the lock) before any page of it can fault.
		 */
		pthread_mutex_lock(&d->lock);
		d->nranges++;
		ret = range_arm(d, r, err);
		if (ret) {
			(void)range_unprotect(d, r);
			(void)range_unregister(d, r);
			d->nranges--;
		}
		pthread_mutex_unlock(&d->lock);
	} else {
		d->nranges++;
	}
	if (ret) {
		free(r->pending);
		r->pending = NULL;
		return ret;
	}
	return (int)(d->nranges - 1);
}

int vmig__dirty_start(struct vmig__dirty *d, struct vmig__err *err)
{
	int ret;

	if (d->started) {
		vmig__err_set(err, "dirty tracking: already started");
		return -EBUSY;
	}
	/* The thread must be there before the first write can block on it. */
	if (d->mode == VMIG_DIRTY_UFFD_SYNC) {
		ret = vmig__dirty_thread_start(d, err);
		if (ret)
			return ret;
	}
	for (unsigned i = 0; i < d->nranges; i++) {
		pthread_mutex_lock(&d->lock);
		ret = range_arm(d, &d->ranges[i], err);
		pthread_mutex_unlock(&d->lock);
		if (ret)
			goto err_undo;
	}
	d->started = true;
	return 0;

err_undo:
	d->started = true;
	(void)vmig__dirty_stop(d);
	return ret;
}

int vmig__dirty_sync(struct vmig__dirty *d, unsigned idx, uint64_t *bitmap, uint64_t *ndirty,
		     struct vmig__err *err)
{
	struct vmig__dirty_range *r;

	if (ndirty)
		*ndirty = 0;
	if (!d->started || idx >= d->nranges) {
		vmig__err_set(err, "dirty tracking: sync of range %u: %s", idx,
			      d->started ? "no such range" : "not started");
		return -EINVAL;
	}
	r = &d->ranges[idx];
	if (d->mode == VMIG_DIRTY_UFFD_ASYNC)
		return vmig__dirty_async_sync(d, r, bitmap, ndirty, err);
	return vmig__dirty_sync_collect(d, r, bitmap, ndirty, err);
}

int vmig__dirty_stop(struct vmig__dirty *d)
{
	return vmig__dirty_stop_flags(d, 0);
}

int vmig__dirty_stop_flags(struct vmig__dirty *d, unsigned flags)
{
	int ret = 0, r;

	if (!d->started)
		return 0;
	/*
	 * Unprotect everything first: that wakes writers blocked on the
	 * tracker thread and no new fault can start, so the thread can be
	 * joined without leaving anyone stuck. Unregister last.
	 */
	for (unsigned i = 0; i < d->nranges; i++) {
		r = range_unprotect(d, &d->ranges[i]);
		ret = ret ? ret : r;
	}
	if (d->mode == VMIG_DIRTY_UFFD_SYNC)
		vmig__dirty_thread_stop(d);
	for (unsigned i = 0; i < d->nranges; i++) {
		r = range_unregister(d, &d->ranges[i]);
		ret = ret ? ret : r;
		if (d->ranges[i].shared && !(flags & VMIG__DIRTY_STOP_NO_RESTORE))
			range_restore_write(&d->ranges[i]);
	}
	d->started = false;
	return ret;
}

void vmig__dirty_close(struct vmig__dirty *d)
{
	if (!d)
		return;
	(void)vmig__dirty_stop_flags(d, VMIG__DIRTY_STOP_NO_RESTORE);
	for (unsigned i = 0; i < d->nranges; i++)
		free(d->ranges[i].pending);
	free(d->scan_vec);
	if (d->pagemap_fd >= 0)
		close(d->pagemap_fd);
	if (d->uffd >= 0)
		close(d->uffd);
	pthread_mutex_destroy(&d->lock);
	free(d);
}
