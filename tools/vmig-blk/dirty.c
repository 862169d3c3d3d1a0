// SPDX-License-Identifier: MIT
/*
 * Dirty-block tracking of vmig-blk: one bit per `granularity` bytes of the
 * disk, set for every guest write, discard and write-zeroes once it has
 * been done, and taken (read and cleared) by whoever copies the disk
 * elsewhere. The foundation of storage migration in mirror mode (see
 * docs/storage-migration.md); this file only keeps the bitmap, it copies
 * nothing.
 *
 * Threads: queue threads set bits (vblk_queue_mark_dirty, through
 * vblk_dirty_mark); the control thread (the RPC handlers) creates, takes
 * from, counts and frees the bitmap. Bits are only ever set with
 * __atomic_fetch_or and cleared with __atomic_fetch_and on whole 64-bit
 * words, so a set and a clear of different bits of one word never undo
 * each other.
 *
 * The ordering that makes a take-then-copy lose nothing: a queue thread
 * sets the bits of a request only after the request's I/O has completed
 * (its data is in the backing file, or in the RAM disk), and before the
 * guest is told. A copier clears a bit (fetch_and) and only then reads the
 * block. Take a write W racing with that copier on one block:
 * - W's data landed before the copier's read: the copier copies it. W's bit
 *   may have been set before the clear (cleared, but the data was copied)
 *   or after it (the block is copied once more; harmless).
 * - W's data landed after the copier's read: then W's bit is set after the
 *   data landed, so after the read, so after the clear (the clear came
 *   before the read). The bit stays set; the next take returns the block.
 * Setting the bit before the I/O instead would lose the second case: the
 * clear could come between the set and the data, and the read before the
 * data. The set is a release and the clear an acquire-release, so for the
 * RAM disk (plain memory) a copier that sees the bit cleared by it also
 * sees the data of every write whose bit it cleared; file I/O is ordered
 * by the system calls themselves.
 *
 * Lifetime: the control thread publishes the bitmap in disk->dirty, and a
 * queue thread uses it only between raising and lowering its own
 * q->dirty_busy flag, re-reading the pointer after raising it (both
 * sequentially consistent). vblk_dirty_stop withdraws the pointer, then
 * waits until no queue's flag is up, and only then frees: a queue that saw
 * the pointer is done with it, a queue that raises its flag later sees
 * NULL.
 */
#include "blk.h"
#include "req.h"
#include "util/util.h"

#include <assert.h>
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static bool pow2(uint64_t v)
{
	return v && !(v & (v - 1));
}

int vblk_dirty_new(uint64_t disk_size, uint32_t granularity, bool all_dirty,
		   struct vblk_dirty **out)
{
	struct vblk_dirty *d;

	if (!pow2(granularity) || granularity < VBLK_DIRTY_MIN_GRANULARITY ||
	    granularity > VBLK_DIRTY_MAX_GRANULARITY || disk_size == 0)
		return -EINVAL;
	d = calloc(1, sizeof(*d));
	if (!d)
		return -ENOMEM;
	d->disk_size = disk_size;
	d->granularity = granularity;
	d->shift = (unsigned)__builtin_ctz(granularity);
	d->nbits = (disk_size + granularity - 1) >> d->shift;
	d->nwords = (d->nbits + 63) / 64;
	d->words = calloc(d->nwords, sizeof(*d->words));
	if (!d->words) {
		free(d);
		return -ENOMEM;
	}
	if (all_dirty) {
		memset(d->words, 0xff, d->nwords * sizeof(*d->words));
		if (d->nbits % 64) /* no bits past the disk's end */
			d->words[d->nwords - 1] = (1ull << (d->nbits % 64)) - 1;
	}
	*out = d;
	return 0;
}

void vblk_dirty_free(struct vblk_dirty *d)
{
	if (!d)
		return;
	free(d->words);
	free(d);
}

uint64_t vblk_dirty_mark(struct vblk_dirty *d, uint64_t offset, uint64_t len)
{
	uint64_t first, last, added = 0;

	if (len == 0 || offset >= d->disk_size)
		return 0;
	if (len > d->disk_size - offset)
		len = d->disk_size - offset;
	first = offset >> d->shift;
	last = (offset + len - 1) >> d->shift;
	assert(last < d->nbits);
	for (uint64_t w = first / 64; w <= last / 64; w++) {
		uint64_t lo = w == first / 64 ? first % 64 : 0;
		uint64_t hi = w == last / 64 ? last % 64 : 63;
		uint64_t mask = (hi == 63 ? ~0ull : (1ull << (hi + 1)) - 1) & ~((1ull << lo) - 1);
		uint64_t old;

		/* Always the atomic OR, even where the bits look set already: a
		 * plain load here may run before this thread's writes of the
		 * data are visible (x86 lets a load pass earlier stores), see
		 * bits that a copier clears a moment later, and skip the mark;
		 * the copier then reads the old data and the write is lost.
		 * The OR is a release that the copier's take acquires, or comes
		 * after the take and leaves the bits set. */
		old = __atomic_fetch_or(&d->words[w], mask, __ATOMIC_RELEASE);
		added += (uint64_t)__builtin_popcountll(mask & ~old);
	}
	return added;
}

void vblk_dirty_clear(struct vblk_dirty *d, uint64_t offset, uint64_t len)
{
	uint64_t first, last;

	if (len == 0 || offset >= d->disk_size)
		return;
	if (len > d->disk_size - offset)
		len = d->disk_size - offset;
	first = offset >> d->shift;
	last = (offset + len - 1) >> d->shift;
	for (uint64_t w = first / 64; w <= last / 64; w++) {
		uint64_t lo = w == first / 64 ? first % 64 : 0;
		uint64_t hi = w == last / 64 ? last % 64 : 63;
		uint64_t mask = (hi == 63 ? ~0ull : (1ull << (hi + 1)) - 1) & ~((1ull << lo) - 1);

		__atomic_fetch_and(&d->words[w], ~mask, __ATOMIC_ACQ_REL);
	}
}

/* Bytes that n bits starting at bit first stand for, the last one clipped
 * to the end of the disk. */
static uint64_t bits_bytes(const struct vblk_dirty *d, uint64_t first, uint64_t n)
{
	uint64_t off = first << d->shift, end = (first + n) << d->shift;

	return VMIG_MIN(end, d->disk_size) - off;
}

uint64_t vblk_dirty_bytes(const struct vblk_dirty *d)
{
	uint64_t bits = 0;
	uint64_t last_word;

	for (uint64_t w = 0; w < d->nwords; w++)
		bits +=
		    (uint64_t)__builtin_popcountll(__atomic_load_n(&d->words[w], __ATOMIC_RELAXED));
	/* Only the last bit can stand for less than a whole granule. */
	last_word = __atomic_load_n(&d->words[(d->nbits - 1) / 64], __ATOMIC_RELAXED);
	if (bits && (last_word >> ((d->nbits - 1) % 64)) & 1)
		return ((bits - 1) << d->shift) + bits_bytes(d, d->nbits - 1, 1);
	return bits << d->shift;
}

/*
 * Take (clear and return) dirty extents, from where the last take stopped
 * on, wrapping around once: a copier that always takes less than all of it
 * still gets to every block. Each word's bits are cleared with one
 * fetch_and of the bits chosen from it, and only the bits that fetch_and
 * found set are returned; a bit set after it stays for the next take.
 */
size_t vblk_dirty_take(struct vblk_dirty *d, uint64_t max_bytes, struct vblk_extent *ext,
		       size_t max_ext, uint64_t *taken_bytes)
{
	uint64_t budget = max_bytes >> d->shift; /* whole granules */
	uint64_t start = d->cursor;
	size_t n = 0;

	*taken_bytes = 0;
	if (budget == 0)
		budget = 1;
	for (uint64_t i = 0; i < d->nwords && budget && n < max_ext; i++) {
		uint64_t w = (start + i) % d->nwords;
		uint64_t want = __atomic_load_n(&d->words[w], __ATOMIC_RELAXED), got;

		if (!want)
			continue;
		/* No more bits than the budget: drop the highest ones. */
		while ((uint64_t)__builtin_popcountll(want) > budget)
			want &= ~(1ull << (63 - __builtin_clzll(want)));
		got = __atomic_fetch_and(&d->words[w], ~want, __ATOMIC_ACQ_REL) & want;
		while (got && n < max_ext) {
			unsigned lo = (unsigned)__builtin_ctzll(got);
			uint64_t rest = got >> lo;
			unsigned run = ~rest ? (unsigned)__builtin_ctzll(~rest) : 64;
			uint64_t bit = w * 64 + lo, len;

			if (lo + run < 64)
				got &= ~(((1ull << run) - 1) << lo);
			else
				got &= (1ull << lo) - 1;
			len = bits_bytes(d, bit, run);
			budget -= run;
			*taken_bytes += len;
			/* Joined to the previous extent where they touch. */
			if (n && ext[n - 1].offset + ext[n - 1].length == bit << d->shift)
				ext[n - 1].length += len;
			else
				ext[n++] = (struct vblk_extent){bit << d->shift, len};
		}
		if (got) {
			/* Out of room for extents: give back what is left. */
			__atomic_fetch_or(&d->words[w], got, __ATOMIC_RELEASE);
		}
		/* A word left with bits we chose not to take is where the
		 * next take goes on. */
		d->cursor = got || !budget ? w : (w + 1) % d->nwords;
	}
	return n;
}

void vblk_queue_mark_dirty(struct vblk_queue *q, uint64_t offset, uint64_t len)
{
	struct vblk_dirty *d;

	__atomic_store_n(&q->dirty_busy, true, __ATOMIC_SEQ_CST);
	d = __atomic_load_n(&q->disk->dirty, __ATOMIC_SEQ_CST);
	if (d) {
		uint64_t added = vblk_dirty_mark(d, offset, len);

		if (added) /* single writer: the queue thread */
			__atomic_store_n(&q->dirtied_bits, q->dirtied_bits + added,
					 __ATOMIC_RELAXED);
	}
	__atomic_store_n(&q->dirty_busy, false, __ATOMIC_RELEASE);
}

/* Bits the queues have newly set, all queues together. */
static uint64_t dirtied_bits(const struct vblk_daemon *dm)
{
	uint64_t n = 0;

	for (unsigned i = 0; i < dm->nqueues; i++)
		n += __atomic_load_n(&dm->q[i].dirtied_bits, __ATOMIC_RELAXED);
	return n;
}

int vblk_dirty_start(struct vblk_daemon *dm, uint32_t granularity, bool all_dirty)
{
	struct vblk_dirty *d;
	int r;

	if (dm->disk.dirty)
		return -EBUSY;
	if (granularity < dm->disk.block_size)
		return -EINVAL;
	r = vblk_dirty_new(dm->disk.size, granularity, all_dirty, &d);
	if (r)
		return r;
	d->start_ns = d->rate_ns = mono_ns();
	d->base_bits = d->rate_bits = dirtied_bits(dm);
	__atomic_store_n(&dm->disk.dirty, d, __ATOMIC_SEQ_CST);
	return 0;
}

void vblk_dirty_stop(struct vblk_daemon *dm)
{
	struct vblk_dirty *d = dm->disk.dirty;

	if (!d)
		return;
	__atomic_store_n(&dm->disk.dirty, NULL, __ATOMIC_SEQ_CST);
	/* A queue inside vblk_queue_mark_dirty holds it for a few word
	 * operations at most. */
	for (unsigned i = 0; i < dm->nqueues; i++)
		while (__atomic_load_n(&dm->q[i].dirty_busy, __ATOMIC_SEQ_CST))
			sched_yield();
	vblk_dirty_free(d);
}

void vblk_dirty_query(struct vblk_daemon *dm, struct vblk_dirty_info *info)
{
	struct vblk_dirty *d = dm->disk.dirty;
	uint64_t now = mono_ns(), bits = dirtied_bits(dm);

	memset(info, 0, sizeof(*info));
	info->total = dm->disk.size;
	if (!d)
		return;
	info->active = true;
	info->granularity = d->granularity;
	info->dirty = vblk_dirty_bytes(d);
	info->dirtied = (bits - d->base_bits) << d->shift;
	/* Over the time since the previous query, or since the start; a
	 * window shorter than 100 ms keeps the rate it had. */
	if (now - d->rate_ns >= 100000000ull) {
		d->rate_bytes_per_s = (uint64_t)((double)((bits - d->rate_bits) << d->shift) * 1e9 /
						 (double)(now - d->rate_ns));
		d->rate_ns = now;
		d->rate_bits = bits;
	}
	info->rate_bytes_per_s = d->rate_bytes_per_s;
	info->active_ms = (now - d->start_ns) / 1000000u;
}
