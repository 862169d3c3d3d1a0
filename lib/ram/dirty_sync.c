// SPDX-License-Identifier: MIT
/*
 * Synchronous dirty-tracking backend (kernels without UFFD_FEATURE_WP_ASYNC).
 * A write to a protected page blocks the writer and queues a userfaultfd
 * message. The tracker thread reads messages in batches, marks each page in
 * its range's pending bitmap and un-protects it, which wakes the writer.
 * sync() re-protects the pending pages in coalesced runs and reports them.
 *
 * Why a lock and not only atomics: per page, the tracker does "mark,
 * un-protect" and sync() does "re-protect, clear mark". Without the lock the
 * tracker could handle a fresh fault between sync()'s two steps (mark is
 * already set, page un-protected again) and sync() would then clear the mark
 * of a page that is writable: every later write to it would go unseen. With
 * d->lock around each pair, the invariant "a page is write-protected or
 * marked pending" always holds. (The order inside the pair does not matter
 * for correctness, because the caller copies a page only after the sync that
 * reported it returns; re-protecting first keeps the mark if the ioctl
 * fails.) Writers faulting meanwhile wait until the tracker gets the lock.
 * sync() takes the lock per chunk of the bitmap, so writers never wait for
 * more than one chunk's worth of ioctls. The unit test's shadow-copy check
 * fails if the lock is dropped between the two steps.
 *
 * A stale message (two threads faulting on the same page, or a fault handled
 * after sync() re-protected the page) only marks a page that was not
 * written: reports may have extras, never misses.
 *
 * Input: userfaultfd messages from the kernel; addresses are checked against
 * the registered ranges before they index a bitmap.
 */
#include "ram/dirty_int.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* Messages read per read(2) from the userfaultfd. */
#define MSG_BATCH 64
/* Bitmap words (64 pages each) re-protected per lock hold in sync(). */
#define SYNC_CHUNK_WORDS 16

/* First error wins; sync() reads it from another thread. */
static void set_thread_err(struct vmig__dirty *d, int err)
{
	int none = 0;

	__atomic_compare_exchange_n(&d->thread_err, &none, err, false, __ATOMIC_ACQ_REL,
				    __ATOMIC_ACQUIRE);
}

static struct vmig__dirty_range *range_of(struct vmig__dirty *d, uintptr_t addr)
{
	for (unsigned i = 0; i < d->nranges; i++) {
		struct vmig__dirty_range *r = &d->ranges[i];

		if (addr >= r->start && addr - r->start < r->size)
			return r;
	}
	return NULL;
}

/* Un-protect [start, end) and remember the first failure. Called under lock. */
static void unprotect_run(struct vmig__dirty *d, uintptr_t start, uintptr_t end)
{
	int ret;

	if (start == end)
		return;
	ret = vmig__dirty_wp(d->uffd, start, end - start, false);
	if (ret)
		set_thread_err(d, ret);
}

/*
 * Handle one batch of messages under the lock. Pages are marked before the
 * un-protect that lets their writer go on; adjacent pages share one ioctl.
 */
static void handle_batch(struct vmig__dirty *d, const struct uffd_msg *msgs, size_t n)
{
	uintptr_t run_start = 0, run_end = 0, page;
	struct vmig__dirty_range *r;

	pthread_mutex_lock(&d->lock);
	for (size_t i = 0; i < n; i++) {
		uintptr_t addr = (uintptr_t)msgs[i].arg.pagefault.address;
		uint64_t unit = VMIG_PAGE_SIZE;

		if (msgs[i].event != UFFD_EVENT_PAGEFAULT ||
		    !(msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP))
			continue;
		r = range_of(d, addr);
		if (r)
			unit = r->unit;
		/* A huge page is protected whole: all of its 4 KiB pages
		 * count as written. */
		page = addr & ~(uintptr_t)(unit - 1);
		/* Outside every range cannot happen; un-protect anyway so no writer hangs. */
		for (uint64_t k = 0; r && k < unit / VMIG_PAGE_SIZE; k++)
			vmig__bitmap_set_atomic(r->pending, (page - r->start) / VMIG_PAGE_SIZE + k);
		d->thread_faults++;
		if (page == run_end) {
			run_end += unit;
			continue;
		}
		unprotect_run(d, run_start, run_end);
		run_start = page;
		run_end = page + unit;
	}
	unprotect_run(d, run_start, run_end);
	pthread_mutex_unlock(&d->lock);
}

/* Tracker thread: runs from start() to stop(), owns reading d->uffd. */
static void *tracker_main(void *arg)
{
	struct vmig__dirty *d = arg;
	struct pollfd pfd[2] = {{.fd = d->uffd, .events = POLLIN},
				{.fd = d->stop_efd, .events = POLLIN}};
	struct uffd_msg msgs[MSG_BATCH];
	ssize_t n;

	for (;;) {
		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			set_thread_err(d, -errno);
			break;
		}
		if (pfd[1].revents)
			return NULL;
		if (pfd[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
			set_thread_err(d, -EIO);
			break;
		}
		n = read(d->uffd, msgs, sizeof(msgs));
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			set_thread_err(d, -errno);
			break;
		}
		handle_batch(d, msgs, (size_t)n / sizeof(msgs[0]));
	}
	/*
	 * Nobody will service faults any more: lift the protection so the
	 * writers keep running. Tracking is lost; the next sync() says so.
	 */
	pthread_mutex_lock(&d->lock);
	for (unsigned i = 0; i < d->nranges; i++)
		if (d->ranges[i].registered)
			(void)vmig__dirty_wp(d->uffd, d->ranges[i].start, d->ranges[i].size, false);
	pthread_mutex_unlock(&d->lock);
	return NULL;
}

int vmig__dirty_thread_start(struct vmig__dirty *d, struct vmig__err *err)
{
	int ret;

	d->stop_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (d->stop_efd < 0) {
		ret = -errno;
		vmig__err_set(err, "dirty tracking: eventfd: %s", strerror(-ret));
		return ret;
	}
	d->thread_err = 0;
	ret = -pthread_create(&d->thread, NULL, tracker_main, d);
	if (ret) {
		close(d->stop_efd);
		d->stop_efd = -1;
		vmig__err_set(err, "dirty tracking: tracker thread: %s", strerror(-ret));
		return ret;
	}
	d->thread_running = true;
	return 0;
}

void vmig__dirty_thread_stop(struct vmig__dirty *d)
{
	if (!d->thread_running)
		return;
	eventfd_write(d->stop_efd, 1);
	pthread_join(d->thread, NULL);
	d->thread_running = false;
	close(d->stop_efd);
	d->stop_efd = -1;
}

/*
 * Clear bits [first, first + n) word by word with atomic stores: sync() peeks
 * at the map without the lock.
 */
static void clear_run_atomic(uint64_t *map, uint64_t first, uint64_t n)
{
	uint64_t end = first + n, b = first, w, hi, mask;

	while (b < end) {
		w = b / VMIG__BITS_PER_WORD;
		hi = VMIG_MIN(end - w * VMIG__BITS_PER_WORD, (uint64_t)VMIG__BITS_PER_WORD);
		mask = (hi == VMIG__BITS_PER_WORD ? ~0ull : (1ull << hi) - 1) &
		       (~0ull << (b % VMIG__BITS_PER_WORD));
		__atomic_fetch_and(&map[w], ~mask, __ATOMIC_RELAXED);
		b = (w + 1) * VMIG__BITS_PER_WORD;
	}
}

/* Re-protect and report the pending pages of words [w0, w1). Under lock. */
static int collect_chunk(struct vmig__dirty *d, struct vmig__dirty_range *r, size_t w0, size_t w1,
			 uint64_t *bitmap, uint64_t *count)
{
	uint64_t limit = VMIG_MIN((uint64_t)w1 * VMIG__BITS_PER_WORD, r->npages);
	uint64_t page = vmig__bitmap_find_next(r->pending, limit, (uint64_t)w0 * 64);
	uint64_t run_end;
	int ret;

	while (page < limit) {
		run_end = vmig__bitmap_find_next_zero(r->pending, limit, page);
		ret = vmig__dirty_wp(d->uffd, r->start + page * VMIG_PAGE_SIZE,
				     (run_end - page) * VMIG_PAGE_SIZE, true);
		if (ret)
			return ret;
		*count += vmig__bitmap_set_range_count(bitmap, page, run_end - page);
		clear_run_atomic(r->pending, page, run_end - page);
		page = vmig__bitmap_find_next(r->pending, limit, run_end);
	}
	return 0;
}

int vmig__dirty_sync_collect(struct vmig__dirty *d, struct vmig__dirty_range *r, uint64_t *bitmap,
			     uint64_t *ndirty, struct vmig__err *err)
{
	size_t nwords = vmig__bitmap_words(r->npages);
	uint64_t count = 0;
	bool any;
	int ret = 0;

	for (size_t w0 = 0; w0 < nwords && !ret; w0 += SYNC_CHUNK_WORDS) {
		size_t w1 = VMIG_MIN(w0 + SYNC_CHUNK_WORDS, nwords);

		/* Peek without the lock: clean chunks cost no lock at all. */
		any = false;
		for (size_t w = w0; w < w1 && !any; w++)
			any = __atomic_load_n(&r->pending[w], __ATOMIC_RELAXED) != 0;
		if (!any)
			continue;
		pthread_mutex_lock(&d->lock);
		ret = collect_chunk(d, r, w0, w1, bitmap, &count);
		pthread_mutex_unlock(&d->lock);
	}
	if (ret) {
		vmig__err_set(err, "dirty tracking: re-protect in range %#lx: %s",
			      (unsigned long)r->start, strerror(-ret));
		return ret;
	}
	ret = __atomic_load_n(&d->thread_err, __ATOMIC_ACQUIRE);
	if (ret) {
		vmig__err_set(err, "dirty tracking: tracker thread: %s", strerror(-ret));
		return ret;
	}
	if (ndirty)
		*ndirty = count;
	return 0;
}
