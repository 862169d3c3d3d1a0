// SPDX-License-Identifier: MIT
/*
 * Post-copy on the destination: userfaultfd registration, the fault thread,
 * page placement, and the blocktime and latency accounting. The state
 * machine around it (the urgent channel, pause and recovery) is
 * lib/migrate's; this file knows guest RAM and userfaultfd only, and talks
 * back through the callbacks of its config.
 *
 * Page state, per page, in bitmaps of the block:
 *   received/zero  what pre-copy delivered (zero: delivered as a zero page,
 *                  which may still be a hole in RAM)
 *   placed         in RAM and final, or about to be; set exactly once, by
 *                  whoever claims it (test-and-set), before UFFDIO_COPY or
 *                  UFFDIO_ZEROPAGE
 *   installed      placed and mapped: the claimer's UFFDIO_COPY is done
 *   requested      asked of the source, or a fault waits on a page being
 *                  placed (the placer ends that wait)
 * A fault on a page that is neither placed nor a known zero hole becomes a
 * request; a page arriving for a page already placed is dropped. So every
 * page is written once, and a late background copy never overwrites what
 * the guest has changed since.
 *
 * A preallocated block with a file (pc_minor) is not emptied for all that:
 * pre-copy writes into it in place, and from the first DISCARD on, the pages
 * still missing are only kept out of the guest's view (their data stays in
 * the file). A fault on one of them is a MINOR fault; its page is written
 * through a second mapping, which userfaultfd does not watch, and mapped
 * into the guest's view with UFFDIO_CONTINUE. So the destination pays the
 * first touch of its memory when it preallocates, not while the guest
 * waits. Huge-page blocks work the same way, a whole huge page at a time
 * (below).
 *
 * Threads: the migration thread loads the main stream, an urgent thread
 * loads the urgent channel (both through the loader hooks given here), the
 * fault thread reads userfaultfd. All three may place pages; the bitmaps
 * are updated atomically, the accounting under acct_lock.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "postcopy/postcopy.h"
#include "ram/bitmap.h"
#include "util/compat.h"

#define OTHER_SLOTS 16 /* non-vCPU faults (e.g. the monitor reading RAM) in flight */
#define HLOCKS 64      /* striped locks for huge pages being assembled */
#define LAT_SAMPLES 65536 /* recent fault latencies kept for exact percentiles */

struct fault_slot {
	int tid;
	uint64_t key; /* block << 48 | page + 1; 0 = not waiting */
	uint64_t start_ns;
};

struct vmig__pc_dest {
	struct vmig__pc_config cfg; /* read-only after vmig__pc_dest_new */
	int uffd;
	int stop_efd;
	bool fault_started;
	pthread_t fault_thread;
	/* atomic: faults are answered post-copy style (requests) from the
	 * first DISCARD on; before that a fault can only be someone reading a
	 * page that has not arrived yet, which is zero so far. */
	bool postcopy_faults;
	/* Migration thread: the populated (pc_minor) blocks are registered
	 * and have every page not received out of the guest's view; done at
	 * the first DISCARD (or at the switch, if none came). */
	bool minor_started;
	/* Huge-page blocks: a second mapping of each one's fd (NULL for other
	 * blocks), made at register, unmapped at free; and the locks that
	 * make "write a piece into a huge page" and "map the huge page into
	 * the guest" exclusive, striped by huge page. */
	uint8_t **alias;
	pthread_mutex_t hlock[HLOCKS];

	pthread_mutex_t acct_lock;
	uint64_t waiting; /* atomic: faults being waited on */
	struct fault_slot vcpu[VMIG_MAX_VCPUS];
	struct fault_slot other[OTHER_SLOTS];
	unsigned nvcpus;
	unsigned blocked; /* vCPUs waiting now */
	uint64_t all_blocked_since;
	uint64_t blocktime_ns;
	uint64_t vcpu_blocked_ns[VMIG_MAX_VCPUS];
	uint64_t vcpu_faults[VMIG_MAX_VCPUS];
	uint64_t faults, requests, latency_sum_ns, other_faults, other_latency_ns;
	uint64_t dist[VMIG_LATENCY_BUCKETS];
	uint32_t *lat_ns;   /* ring of LAT_SAMPLES latencies, saturated at 4.29 s */
	uint32_t *lat_tmp;  /* scratch for selecting percentiles */
	uint64_t lat_seen;  /* faults ever recorded into the ring */
	uint64_t lat_done;  /* lat_seen when the percentiles were last computed */
	uint64_t p50_ns, p99_ns;
};

static inline bool bitmap_test_atomic(const uint64_t *map, uint64_t bit)
{
	return __atomic_load_n(&map[bit / 64], __ATOMIC_ACQUIRE) & (1ull << (bit % 64));
}

/* Returns true if this call set the bit. */
static inline bool bitmap_claim(uint64_t *map, uint64_t bit)
{
	uint64_t mask = 1ull << (bit % 64);

	return !(__atomic_fetch_or(&map[bit / 64], mask, __ATOMIC_ACQ_REL) & mask);
}

static inline uint64_t slot_key(unsigned bi, uint64_t pfn)
{
	return ((uint64_t)bi << 48 | pfn) + 1;
}

/* ---- accounting ------------------------------------------------------- */

static void update_percentiles(struct vmig__pc_dest *pc);

void vmig__pc_dest_publish(struct vmig__pc_dest *pc)
{
	vmig__pc_stats st = {0};

	/* The counters are acct_lock's (any placing thread updates them):
	 * copied under it, published under the session lock. */
	pthread_mutex_lock(&pc->acct_lock);
	update_percentiles(pc);
	st.valid = pc->cfg.blocktime;
	st.blocktime_ms = pc->blocktime_ns / 1000000;
	st.nvcpus = pc->nvcpus;
	for (unsigned i = 0; i < pc->nvcpus; i++) {
		st.vcpu_blocktime_ms[i] = pc->vcpu_blocked_ns[i] / 1000000;
		st.vcpu_latency_ns[i] =
			pc->vcpu_faults[i] ? pc->vcpu_blocked_ns[i] / pc->vcpu_faults[i] : 0;
	}
	st.faults = pc->faults;
	st.requests = pc->requests;
	st.latency_ns = pc->faults ? pc->latency_sum_ns / pc->faults : 0;
	st.non_vcpu_latency_ns = pc->other_faults ? pc->other_latency_ns / pc->other_faults : 0;
	memcpy(st.latency_dist, pc->dist, sizeof(pc->dist));
	st.latency_p50_ns = pc->p50_ns;
	st.latency_p99_ns = pc->p99_ns;
	pthread_mutex_unlock(&pc->acct_lock);
	pc->cfg.publish(pc->cfg.opaque, &st);
}

/* Under acct_lock: refresh p50/p99 if new faults came in. */
static void update_percentiles(struct vmig__pc_dest *pc)
{
	size_t n = pc->lat_seen < LAT_SAMPLES ? pc->lat_seen : LAT_SAMPLES;

	if (!n || pc->lat_done == pc->lat_seen)
		return;
	memcpy(pc->lat_tmp, pc->lat_ns, n * sizeof(uint32_t));
	pc->p50_ns = vmig__select_kth(pc->lat_tmp, n, n / 2);
	pc->p99_ns = vmig__select_kth(pc->lat_tmp, n, n * 99 / 100);
	pc->lat_done = pc->lat_seen;
}

static unsigned bucket_of(uint64_t ns)
{
	uint64_t us = ns / 1000;
	unsigned b = 0;

	while (us > 1 && b < VMIG_LATENCY_BUCKETS - 1) {
		us >>= 1;
		b++;
	}
	return b;
}

static void slot_done(struct vmig__pc_dest *pc, struct fault_slot *slot, int vcpu, uint64_t now);

/* A fault on key by thread tid starts waiting (fault thread). */
static void fault_begin(struct vmig__pc_dest *pc, int tid, uint64_t key, uint64_t now)
{
	struct fault_slot *slot = NULL;
	bool vcpu = false;

	pthread_mutex_lock(&pc->acct_lock);
	for (unsigned i = 0; i < pc->nvcpus; i++) {
		if (pc->vcpu[i].tid == tid) {
			slot = &pc->vcpu[i];
			vcpu = true;
			break;
		}
	}
	for (unsigned i = 0; !slot && i < OTHER_SLOTS; i++)
		if (!pc->other[i].key)
			slot = &pc->other[i];
	if (slot && slot->key && slot->key != key)
		slot_done(pc, slot, vcpu ? (int)(slot - pc->vcpu) : -1, now); /* superseded */
	if (slot && !slot->key) {
		slot->key = key;
		slot->start_ns = now;
		__atomic_add_fetch(&pc->waiting, 1, __ATOMIC_RELEASE);
		if (vcpu && ++pc->blocked == pc->nvcpus)
			pc->all_blocked_since = now;
	}
	pthread_mutex_unlock(&pc->acct_lock);
}

static void slot_done(struct vmig__pc_dest *pc, struct fault_slot *slot, int vcpu, uint64_t now)
{
	uint64_t lat = now - slot->start_ns;

	pc->faults++;
	pc->latency_sum_ns += lat;
	pc->dist[bucket_of(lat)]++;
	pc->lat_ns[pc->lat_seen++ % LAT_SAMPLES] = lat > UINT32_MAX ? UINT32_MAX : (uint32_t)lat;
	if (vcpu >= 0) {
		if (pc->blocked-- == pc->nvcpus)
			pc->blocktime_ns += now - pc->all_blocked_since;
		pc->vcpu_blocked_ns[vcpu] += lat;
		pc->vcpu_faults[vcpu]++;
	} else {
		pc->other_faults++;
		pc->other_latency_ns += lat;
	}
	slot->key = 0;
	__atomic_sub_fetch(&pc->waiting, 1, __ATOMIC_RELEASE);
}

/* Page key is in place: end the waits on it. */
static void fault_end(struct vmig__pc_dest *pc, uint64_t key)
{
	uint64_t now;

	if (!__atomic_load_n(&pc->waiting, __ATOMIC_ACQUIRE))
		return;
	now = vmig__now_ns();
	pthread_mutex_lock(&pc->acct_lock);
	for (unsigned i = 0; i < pc->nvcpus; i++)
		if (pc->vcpu[i].key == key)
			slot_done(pc, &pc->vcpu[i], (int)i, now);
	for (unsigned i = 0; i < OTHER_SLOTS; i++)
		if (pc->other[i].key == key)
			slot_done(pc, &pc->other[i], -1, now);
	pthread_mutex_unlock(&pc->acct_lock);
}

/* ---- placement --------------------------------------------------------- */

enum uffd_op {
	OP_COPY,     /* UFFDIO_COPY from src */
	OP_ZERO,     /* UFFDIO_ZEROPAGE */
	OP_CONTINUE, /* UFFDIO_CONTINUE: map what the file holds already */
};

/*
 * One userfaultfd operation over [host, host+len), carried to its end,
 * waking whoever waits there: a partial result goes on from where it
 * stopped, EAGAIN (the address space changing) and EINTR try again, and a
 * page mapped already (EEXIST) is skipped, step bytes (the mapping's page
 * size): someone placed it first.
 */
static int uffd_range(int uffd, enum uffd_op op, uint8_t *host, const uint8_t *src, uint64_t len,
		      uint64_t step)
{
	uint64_t done = 0;

	while (done < len) {
		uintptr_t at = (uintptr_t)host + done;
		int64_t got;
		int rc;

		if (op == OP_COPY) {
			struct uffdio_copy c = {
			    .dst = at, .src = (uintptr_t)src + done, .len = len - done};

			rc = ioctl(uffd, UFFDIO_COPY, &c);
			got = c.copy;
		} else if (op == OP_ZERO) {
			struct uffdio_zeropage z = {.range = {.start = at, .len = len - done}};

			rc = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
			got = z.zeropage;
		} else {
			struct uffdio_continue c = {.range = {.start = at, .len = len - done}};

			rc = ioctl(uffd, UFFDIO_CONTINUE, &c);
			got = c.mapped;
		}
		if (got > 0)
			done += (uint64_t)got;
		if (!rc || errno == EAGAIN || errno == EINTR)
			continue;
		if (errno != EEXIST)
			return -errno;
		done = VMIG_ALIGN_UP(done + 1, step);
	}
	return 0;
}

/* Install [host, host+len) of a 4 KiB block from src (NULL: zero pages). */
static int uffd_install(int uffd, uint8_t *host, const uint8_t *src, uint64_t len)
{
	return uffd_range(uffd, src ? OP_COPY : OP_ZERO, host, src, len, VMIG_PAGE_SIZE);
}

/* Map [host, host+len), whose pages (of step bytes) are in the file
 * already, into the guest's view. */
static int uffd_continue(int uffd, uint8_t *host, uint64_t len, uint64_t step)
{
	return uffd_range(uffd, OP_CONTINUE, host, NULL, len, step);
}

/* len bytes of buf at dst, or zeros if buf is NULL. */
static void copy_or_zero(uint8_t *dst, const uint8_t *buf, uint64_t len)
{
	if (buf)
		memcpy(dst, buf, len);
	else
		memset(dst, 0, len);
}

/* Blocks whose pages are written through the second mapping (alias) and
 * mapped with UFFDIO_CONTINUE, registered late: huge pages at the switch,
 * populated blocks at the first DISCARD (minor_start). */
static inline bool via_alias(const struct vmig__block *b)
{
	return b->hpage || b->pc_minor;
}

/* ---- huge pages -------------------------------------------------------
 *
 * A huge page can only be mapped whole, but the stream carries 4 KiB pages,
 * and only some of a huge page's pages may be stale after pre-copy. So
 * huge pages are assembled where they live, in the block's file (the
 * page cache of hugetlbfs), through a second mapping that userfaultfd does
 * not watch, and mapped into the guest's view whole with UFFDIO_CONTINUE
 * once every one of their pages is there (MINOR faults):
 *  - before the switch, a DISCARD unmaps the huge pages it touches from the
 *    guest's view (MADV_DONTNEED keeps their data in the file) and clears
 *    the discarded pages' received bits;
 *  - at the switch, the block is registered for MISSING and MINOR faults,
 *    and the huge pages with every page received are placed;
 *  - a page arriving for a huge page not placed yet is written through the
 *    second mapping and marked received; the last one places the huge page;
 *  - a fault on a huge page not placed asks the source for its missing
 *    pages, and waits for that.
 * "placed" is set for all the pages of a huge page at once, under its lock,
 * and nothing writes into a placed huge page any more: after that the guest
 * owns it. Blocktime keys and "requested" use the huge page's first page.
 */

static inline uint64_t hp_pages(const struct vmig__block *b)
{
	return b->hpage / VMIG_PAGE_SIZE;
}

static pthread_mutex_t *hp_lock(struct vmig__pc_dest *pc, unsigned bi, uint64_t h)
{
	return &pc->hlock[(h * 31 + bi) % HLOCKS];
}

static bool hp_complete(const struct vmig__block *b, uint64_t h)
{
	for (uint64_t p = h * hp_pages(b); p < (h + 1) * hp_pages(b); p++)
		if (!bitmap_test_atomic(b->received, p))
			return false;
	return true;
}

/* Map huge page h into the guest's view from the file, waking whoever
 * waits on it. A huge page that is still a hole (all zero pages, never
 * written) gets its file page made first. */
static int hp_map(struct vmig__pc_dest *pc, unsigned bi, uint64_t h)
{
	struct vmig__block *b = &pc->cfg.blocks[bi];
	uint64_t off = h * b->hpage;

	/* Allocates the (zeroed) page if the file has none there. */
	__atomic_fetch_add(pc->alias[bi] + off, 0, __ATOMIC_RELAXED);
	return uffd_continue(pc->uffd, b->host + off, b->hpage, b->hpage);
}

/* Huge page h is complete: map it, under its lock; from now on it is the
 * guest's. */
static int hp_place(struct vmig__pc_dest *pc, unsigned bi, uint64_t h)
{
	struct vmig__block *b = &pc->cfg.blocks[bi];
	int ret;

	/* The content as it arrived: hashed before the guest can write it. */
	for (uint64_t p = h * hp_pages(b); p < (h + 1) * hp_pages(b); p++)
		b->page_hash[p] = vmig__page_hash(pc->alias[bi] + p * VMIG_PAGE_SIZE);
	ret = hp_map(pc, bi, h);
	if (ret)
		return ret;
	for (uint64_t p = h * hp_pages(b); p < (h + 1) * hp_pages(b); p++)
		__atomic_fetch_or(&b->placed[p / 64], 1ull << (p % 64), __ATOMIC_RELEASE);
	if (bitmap_test_atomic(b->requested, h * hp_pages(b)))
		fault_end(pc, slot_key(bi, h * hp_pages(b)));
	return 0;
}

/* Pages [first, first + n) of a huge-page block arrive (buf NULL: zeros). */
static int hp_fill(struct vmig__pc_dest *pc, unsigned bi, uint64_t first, uint32_t n,
		   const uint8_t *buf)
{
	struct vmig__block *b = &pc->cfg.blocks[bi];
	uint64_t end = first + n;
	int ret = 0;

	while (!ret && first < end) {
		uint64_t h = first / hp_pages(b), stop = VMIG_MIN(end, (h + 1) * hp_pages(b));
		pthread_mutex_t *lk = hp_lock(pc, bi, h);

		pthread_mutex_lock(lk);
		if (!bitmap_test_atomic(b->placed, h * hp_pages(b))) { /* else a late copy */
			copy_or_zero(pc->alias[bi] + first * VMIG_PAGE_SIZE, buf,
				     (stop - first) * VMIG_PAGE_SIZE);
			for (uint64_t p = first; p < stop; p++)
				__atomic_fetch_or(&b->received[p / 64], 1ull << (p % 64),
						  __ATOMIC_RELEASE);
			if (hp_complete(b, h))
				ret = hp_place(pc, bi, h);
		}
		pthread_mutex_unlock(lk);
		if (buf)
			buf += (stop - first) * VMIG_PAGE_SIZE;
		first = stop;
	}
	return ret;
}

/* Ask for the pages huge page h still lacks, in runs. */
static void hp_request(struct vmig__pc_dest *pc, unsigned bi, uint64_t h)
{
	struct vmig__block *b = &pc->cfg.blocks[bi];
	uint64_t p = h * hp_pages(b), end = p + hp_pages(b);

	while (p < end) {
		uint64_t q;

		if (bitmap_test_atomic(b->received, p)) {
			p++;
			continue;
		}
		for (q = p + 1;
		     q < end && q - p < VMIG_REC_MAX_PAGES && !bitmap_test_atomic(b->received, q);
		     q++)
			;
		pc->cfg.request(pc->cfg.opaque, bi, p, (uint32_t)(q - p));
		p = q;
	}
}

/* A fault on huge page h (the fault thread). */
static void hp_fault(struct vmig__pc_dest *pc, unsigned bi, uint64_t h, int tid)
{
	struct vmig__block *b = &pc->cfg.blocks[bi];
	uint64_t key = slot_key(bi, h * hp_pages(b));
	pthread_mutex_t *lk = hp_lock(pc, bi, h);
	struct uffdio_range wake = {.start = (uintptr_t)b->host + h * b->hpage, .len = b->hpage};
	bool ask = false;

	fault_begin(pc, tid, key, vmig__now_ns());
	pthread_mutex_lock(lk);
	if (bitmap_test_atomic(b->placed, h * hp_pages(b)) || hp_complete(b, h)) {
		/* Placed (mapped meanwhile, or a hole of zeros that needs its
		 * page made), or complete: map it now. */
		int ret = bitmap_test_atomic(b->placed, h * hp_pages(b)) ? hp_map(pc, bi, h)
									 : hp_place(pc, bi, h);

		if (ret)
			ioctl(pc->uffd, UFFDIO_WAKE, &wake);
		fault_end(pc, key);
	} else {
		ask = bitmap_claim(b->requested, h * hp_pages(b));
	}
	pthread_mutex_unlock(lk);
	if (ask) {
		pthread_mutex_lock(&pc->acct_lock);
		pc->requests++;
		pthread_mutex_unlock(&pc->acct_lock);
		hp_request(pc, bi, h);
	}
}

/* Put claimed pages [first, first + n) in place from src (NULL: zeros). */
static int install(struct vmig__pc_dest *pc, unsigned bi, uint64_t first, uint64_t n,
		   const uint8_t *src)
{
	struct vmig__block *b = &pc->cfg.blocks[bi];
	uint64_t off = first * VMIG_PAGE_SIZE, len = n * VMIG_PAGE_SIZE;

	if (!b->pc_minor)
		return uffd_install(pc->uffd, b->host + off, src, len);
	copy_or_zero(pc->alias[bi] + off, src, len);
	/* The end-of-stream check wants every page of a populated block
	 * received (stale data must not pass for a page). */
	for (uint64_t p = first; p < first + n; p++)
		vmig__bitmap_set_atomic(b->received, p);
	return uffd_continue(pc->uffd, b->host + off, len, VMIG_PAGE_SIZE);
}

/* Loader hook: pages arriving after the switch (any channel). */
static int pc_place(void *opaque, unsigned bi, uint64_t first, uint32_t npages,
		    const uint8_t *buf)
{
	struct vmig__pc_dest *pc = opaque;
	struct vmig__block *b = &pc->cfg.blocks[bi];
	uint32_t i = 0;

	if (b->hpage)
		return hp_fill(pc, bi, first, npages, buf);

	while (i < npages) {
		uint32_t j;
		int ret;

		if (!bitmap_claim(b->placed, first + i)) {
			/* Already in place: a late duplicate. If it answers a
			 * request, a wait may still be on the books. */
			if (bitmap_test_atomic(b->requested, first + i))
				fault_end(pc, slot_key(bi, first + i));
			i++;
			continue;
		}
		for (j = i + 1; j < npages && bitmap_claim(b->placed, first + j); j++)
			;
		/* Claimed [i, j); a page that failed to claim at j is skipped next. */
		for (uint32_t k = i; k < j; k++)
			b->page_hash[first + k] = buf ? vmig__page_hash(buf + (uint64_t)k * VMIG_PAGE_SIZE)
						      : vmig__zero_page_hash();
		ret = install(pc, bi, first + i, j - i,
			      buf ? buf + (uint64_t)i * VMIG_PAGE_SIZE : NULL);
		if (ret) {
			/* Unclaimed, so that a copy arriving later (or asked
			 * for again after a recovery) can still place them. */
			for (uint32_t k = i; k < j; k++)
				vmig__bitmap_test_and_clear_atomic(b->placed, first + k);
			return ret;
		}
		for (uint32_t k = i; k < j; k++)
			vmig__bitmap_set_atomic(b->installed, first + k);
		/* Pairs with the fence in handle_fault: either it sees the page
		 * installed, or this sees its mark in requested. */
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		/* Only requested pages can have a fault waiting on them (faults
		 * on known zero pages are ended by the fault thread itself). */
		for (uint32_t k = i; k < j; k++)
			if (bitmap_test_atomic(b->requested, first + k))
				fault_end(pc, slot_key(bi, first + k));
		if (j < npages && bitmap_test_atomic(b->requested, first + j))
			fault_end(pc, slot_key(bi, first + j));
		i = j + (j < npages); /* page j (if any) was already placed */
	}
	return 0;
}

/*
 * Loader hook, pre-copy: put a run of received pages in place (buf NULL:
 * zeros, for a populated block). A page that
 * is still a hole is installed with UFFDIO_COPY, which allocates it and
 * copies in one step (no fault, no clearing of the new page: about twice as
 * fast as writing into a fresh shmem page); a page already present (sent
 * before, or read by someone meanwhile) is overwritten with memcpy.
 */
static int pc_fill(void *opaque, unsigned bi, uint64_t first, uint32_t npages, const uint8_t *buf)
{
	struct vmig__pc_dest *pc = opaque;
	struct vmig__block *b = &pc->cfg.blocks[bi];
	uint8_t *dst = b->host + first * VMIG_PAGE_SIZE;
	uint64_t len = (uint64_t)npages * VMIG_PAGE_SIZE, done = 0;

	if (b->pc_minor && pc->minor_started) { /* a page after a DISCARD */
		copy_or_zero(pc->alias[bi] + first * VMIG_PAGE_SIZE, buf, len);
		return uffd_continue(pc->uffd, dst, len, VMIG_PAGE_SIZE);
	}
	if (via_alias(b)) { /* not registered yet */
		copy_or_zero(dst, buf, len);
		return 0;
	}
	assert(buf); /* zeros come here for populated blocks only */
	while (done < len) {
		struct uffdio_copy c = {.dst = (uintptr_t)dst + done,
					.src = (uintptr_t)buf + done,
					.len = len - done};

		if (!ioctl(pc->uffd, UFFDIO_COPY, &c))
			return 0;
		if (c.copy > 0) {
			done += (uint64_t)c.copy;
			continue;
		}
		if (errno == EAGAIN)
			continue;
		if (errno != EEXIST)
			return -errno;
		memcpy(dst + done, buf + done, VMIG_PAGE_SIZE);
		done += VMIG_PAGE_SIZE;
	}
	return 0;
}

static int minor_start(struct vmig__pc_dest *pc, struct vmig__err *err);

/* Loader hook, before the switch: these pages are stale here. */
static int pc_discard(void *opaque, unsigned bi, uint64_t first, uint64_t npages)
{
	struct vmig__pc_dest *pc = opaque;
	struct vmig__block *b = &pc->cfg.blocks[bi];
	uint64_t off = first * VMIG_PAGE_SIZE, len = npages * VMIG_PAGE_SIZE;
	int ret;

	__atomic_store_n(&pc->postcopy_faults, true, __ATOMIC_RELEASE);
	vmig__bitmap_clear_range(b->received, first, npages);
	vmig__bitmap_clear_range(b->zero, first, npages);
	if (b->pc_minor && !pc->minor_started) { /* unmaps these pages too */
		struct vmig__err err = {{0}};

		return minor_start(pc, &err);
	}
	if (via_alias(b)) { /* out of the guest's view; the file keeps the rest */
		uint64_t gran = b->hpage ? b->hpage : VMIG_PAGE_SIZE;
		uint64_t lo = VMIG_ALIGN_DOWN(off, gran), hi = VMIG_ALIGN_UP(off + len, gran);

		return madvise(b->host + lo, hi - lo, MADV_DONTNEED) ? -errno : 0;
	}
	if (b->fd >= 0)
		ret = fallocate(b->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
				(off_t)(b->fd_offset + off), (off_t)len);
	else if ((ret = madvise(b->host + off, len, MADV_REMOVE)))
		ret = madvise(b->host + off, len, MADV_DONTNEED);
	return ret ? -errno : 0;
}

/* ---- faults ------------------------------------------------------------ */

static void send_request(struct vmig__pc_dest *pc, unsigned bi, uint64_t pfn)
{
	pc->cfg.request(pc->cfg.opaque, bi, pfn, 1);
}

static void handle_fault(struct vmig__pc_dest *pc, uint64_t addr, int tid)
{
	const struct vmig__pc_config *c = &pc->cfg;
	unsigned bi;

	for (bi = 0; bi < c->nblocks; bi++)
		if (addr >= (uintptr_t)c->blocks[bi].host &&
		    addr - (uintptr_t)c->blocks[bi].host < c->blocks[bi].size)
			break;
	if (bi == c->nblocks)
		return; /* not guest RAM: cannot happen, we registered only that */
	struct vmig__block *b = &c->blocks[bi];
	uint64_t pfn = (addr - (uintptr_t)b->host) / VMIG_PAGE_SIZE;

	/* Registered at the switch, which stored postcopy_faults after all
	 * that came before (acquire: the DISCARDs' bitmaps are seen). */
	if (b->hpage && __atomic_load_n(&pc->postcopy_faults, __ATOMIC_ACQUIRE)) {
		hp_fault(pc, bi, pfn / hp_pages(b), tid);
		return;
	}
	uint64_t key = slot_key(bi, pfn);
	struct uffdio_range wake = {.start = (uintptr_t)b->host + pfn * VMIG_PAGE_SIZE,
				    .len = VMIG_PAGE_SIZE};

	if (!__atomic_load_n(&pc->postcopy_faults, __ATOMIC_ACQUIRE)) {
		/* Pre-copy: the page has not arrived, so it reads as zero. A
		 * copy arriving later replaces it (pc_fill falls back to memcpy). */
		struct uffdio_zeropage z = {.range = wake};

		if (ioctl(pc->uffd, UFFDIO_ZEROPAGE, &z))
			ioctl(pc->uffd, UFFDIO_WAKE, &wake);
		return;
	}
	fault_begin(pc, tid, key, vmig__now_ns());
	if (bitmap_test_atomic(b->placed, pfn)) {
		/*
		 * Claimed by a placing thread: its UFFDIO_COPY wakes this
		 * fault. Waking it before that only makes it fault again at
		 * once, over and over while the copy runs; a vCPU sweeping
		 * memory right behind the background push spent most of its
		 * time so. The mark in requested has the placer end the wait;
		 * if the page is in already, it ends here.
		 */
		bitmap_claim(b->requested, pfn);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (bitmap_test_atomic(b->installed, pfn)) {
			/* In a populated block, a page in place may still be
			 * out of this view (a MINOR fault): map it. */
			if (!b->pc_minor || uffd_continue(pc->uffd, b->host + pfn * VMIG_PAGE_SIZE,
							  VMIG_PAGE_SIZE, VMIG_PAGE_SIZE))
				ioctl(pc->uffd, UFFDIO_WAKE, &wake);
			fault_end(pc, key);
		}
		return;
	}
	if (bitmap_test_atomic(b->received, pfn) && bitmap_test_atomic(b->zero, pfn)) {
		/* A known zero page that is still a hole: no need to ask. */
		pc_place(pc, bi, pfn, 1, NULL);
		fault_end(pc, key);
		return;
	}
	if (bitmap_claim(b->requested, pfn)) {
		pthread_mutex_lock(&pc->acct_lock);
		pc->requests++;
		pthread_mutex_unlock(&pc->acct_lock);
		send_request(pc, bi, pfn);
	}
}

static void *fault_main(void *arg)
{
	struct vmig__pc_dest *pc = arg;
	struct pollfd pfd[2] = {{.fd = pc->uffd, .events = POLLIN},
				{.fd = pc->stop_efd, .events = POLLIN}};
	struct uffd_msg msgs[32];
	uint64_t last_pub = 0;

	for (;;) {
		ssize_t n;

		if (poll(pfd, 2, 100) < 0 && errno != EINTR)
			break;
		if (pfd[1].revents)
			break;
		n = read(pc->uffd, msgs, sizeof(msgs));
		for (ssize_t i = 0; n > 0 && i < n / (ssize_t)sizeof(msgs[0]); i++)
			if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
				handle_fault(pc, msgs[i].arg.pagefault.address,
					     (int)msgs[i].arg.pagefault.feat.ptid);
		if (vmig__now_ns() - last_pub > 100000000ull) {
			vmig__pc_dest_publish(pc);
			last_pub = vmig__now_ns();
		}
	}
	vmig__pc_dest_publish(pc);
	return NULL;
}

/* ---- setup ------------------------------------------------------------- */

bool vmig__pc_dest_vcpu_blocked(struct vmig__pc_dest *pc, unsigned index)
{
	bool blocked;

	pthread_mutex_lock(&pc->acct_lock);
	blocked = index < pc->nvcpus && pc->vcpu[index].key;
	pthread_mutex_unlock(&pc->acct_lock);
	return blocked;
}

bool vmig__pc_minor_supported(void)
{
	static int known; /* 0: not asked yet, 1: yes, -1: no */
	int k = __atomic_load_n(&known, __ATOMIC_RELAXED);

	if (!k) {
		struct uffdio_api api = {.api = UFFD_API};
		int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);

		/* With no feature asked for, the kernel lists those it has. */
		k = fd >= 0 && !ioctl(fd, UFFDIO_API, &api) &&
			    (api.features & UFFD_FEATURE_MINOR_SHMEM)
			? 1
			: -1;
		if (fd >= 0)
			close(fd);
		__atomic_store_n(&known, k, __ATOMIC_RELAXED);
	}
	return k > 0;
}

int vmig__pc_dest_new(const struct vmig__pc_config *cfg, struct vmig__pc_dest **out)
{
	struct vmig__pc_dest *pc = calloc(1, sizeof(*pc));

	assert(cfg->nvcpus <= VMIG_MAX_VCPUS && cfg->request && cfg->publish);
	if (!pc)
		return -ENOMEM;
	pc->cfg = *cfg;
	pc->uffd = -1;
	pc->lat_ns = malloc(LAT_SAMPLES * sizeof(uint32_t));
	pc->lat_tmp = malloc(LAT_SAMPLES * sizeof(uint32_t));
	pc->stop_efd = eventfd(0, EFD_CLOEXEC);
	if (pc->stop_efd < 0 || !pc->lat_ns || !pc->lat_tmp) {
		if (pc->stop_efd >= 0)
			close(pc->stop_efd);
		free(pc->lat_ns);
		free(pc->lat_tmp);
		free(pc);
		return -ENOMEM;
	}
	pthread_mutex_init(&pc->acct_lock, NULL);
	for (unsigned i = 0; i < HLOCKS; i++)
		pthread_mutex_init(&pc->hlock[i], NULL);
	pc->nvcpus = cfg->nvcpus;
	for (unsigned i = 0; i < pc->nvcpus; i++)
		pc->vcpu[i].tid = cfg->vcpu_tid[i];
	*out = pc;
	return 0;
}

void vmig__pc_dest_hooks(struct vmig__pc_dest *pc, struct vmig__load_hooks *hooks)
{
	hooks->fill = pc_fill;
	hooks->place = pc->cfg.postcopy_ram ? pc_place : NULL;
	hooks->discard = pc->cfg.postcopy_ram ? pc_discard : NULL;
	hooks->opaque = pc;
}

void vmig__pc_dest_stop_faults(struct vmig__pc_dest *pc)
{
	if (!pc->fault_started)
		return;
	eventfd_write(pc->stop_efd, 1);
	pthread_join(pc->fault_thread, NULL);
	pc->fault_started = false;
}

void vmig__pc_dest_free(struct vmig__pc_dest *pc)
{
	if (!pc)
		return;
	vmig__pc_dest_stop_faults(pc);
	if (pc->uffd >= 0)
		close(pc->uffd); /* unregisters, waking anything still waiting */
	for (unsigned i = 0; pc->alias && i < pc->cfg.nblocks; i++)
		if (pc->alias[i])
			munmap(pc->alias[i], pc->cfg.blocks[i].size);
	free(pc->alias);
	for (unsigned i = 0; i < HLOCKS; i++)
		pthread_mutex_destroy(&pc->hlock[i]);
	close(pc->stop_efd);
	pthread_mutex_destroy(&pc->acct_lock);
	free(pc->lat_ns);
	free(pc->lat_tmp);
	free(pc);
}

void vmig__pc_dest_rerequest(struct vmig__pc_dest *pc)
{
	for (unsigned bi = 0; bi < pc->cfg.nblocks; bi++) {
		struct vmig__block *b = &pc->cfg.blocks[bi];

		for (uint64_t p = vmig__bitmap_find_next(b->requested, b->npages, 0); p < b->npages;
		     p = vmig__bitmap_find_next(b->requested, b->npages, p + 1)) {
			if (bitmap_test_atomic(b->placed, p))
				continue;
			if (b->hpage)
				hp_request(pc, bi, p / hp_pages(b));
			else
				send_request(pc, bi, p);
		}
	}
}

/* Watch a block placed through its second mapping for MISSING and MINOR
 * faults. */
static int alias_register(struct vmig__pc_dest *pc, const struct vmig__block *b,
			  struct vmig__err *err)
{
	struct uffdio_register reg = {.range = {.start = (uintptr_t)b->host, .len = b->size},
				      .mode = UFFDIO_REGISTER_MODE_MISSING |
					      UFFDIO_REGISTER_MODE_MINOR};

	if (ioctl(pc->uffd, UFFDIO_REGISTER, &reg) || !(reg.ioctls & (1ull << _UFFDIO_CONTINUE))) {
		int ret = errno ? -errno : -EOPNOTSUPP;

		vmig__err_set(err, "registering %sRAM block '%s' with userfaultfd: %s",
			      b->hpage ? "huge-page " : "", b->name, strerror(-ret));
		return ret;
	}
	return 0;
}

/*
 * The populated blocks, once: registered, and every page not received
 * taken out of the guest's view, while the guest still runs on the source
 * (at the first DISCARD), so the downtime does not pay for it. From then on
 * nothing can map a stale page again: a touch is a fault, answered once the
 * page is placed, and each DISCARD unmaps its own pages.
 */
static int minor_start(struct vmig__pc_dest *pc, struct vmig__err *err)
{
	for (unsigned bi = 0; !pc->minor_started && bi < pc->cfg.nblocks; bi++) {
		struct vmig__block *b = &pc->cfg.blocks[bi];
		int ret = b->pc_minor ? alias_register(pc, b, err) : 0;

		if (ret)
			return ret;
		for (uint64_t p = vmig__bitmap_find_next_zero(b->received, b->npages, 0);
		     b->pc_minor && p < b->npages;) {
			uint64_t q = vmig__bitmap_find_next(b->received, b->npages, p);

			if (madvise(b->host + p * VMIG_PAGE_SIZE, (q - p) * VMIG_PAGE_SIZE,
				    MADV_DONTNEED)) {
				ret = -errno;
				vmig__err_set(err, "unmapping missing pages of RAM block '%s': %s",
					      b->name, strerror(errno));
				return ret;
			}
			p = vmig__bitmap_find_next_zero(b->received, b->npages, q);
		}
	}
	pc->minor_started = true;
	return 0;
}

/*
 * A block placed through its second mapping, at the switch: watch it for
 * MISSING and MINOR faults. A huge page with every page received is final
 * (placed); so is every received page of a populated block. The others go
 * out of the guest's view until they are placed.
 */
static int alias_switch(struct vmig__pc_dest *pc, unsigned bi, struct vmig__err *err)
{
	struct vmig__block *b = &pc->cfg.blocks[bi];
	int ret = b->pc_minor ? minor_start(pc, err) : alias_register(pc, b, err);

	if (ret)
		return ret;
	if (b->pc_minor) {
		/* Zero pages too: they were written in place. */
		for (size_t w = 0; w < vmig__bitmap_words(b->npages); w++) {
			__atomic_fetch_or(&b->placed[w], b->received[w], __ATOMIC_RELEASE);
			__atomic_fetch_or(&b->installed[w], b->received[w], __ATOMIC_RELEASE);
		}
		return 0;
	}
	for (uint64_t h = 0; h < b->size / b->hpage; h++) {
		if (!hp_complete(b, h)) {
			if (madvise(b->host + h * b->hpage, b->hpage, MADV_DONTNEED))
				return -errno;
			continue;
		}
		for (uint64_t p = h * hp_pages(b); p < (h + 1) * hp_pages(b); p++)
			__atomic_fetch_or(&b->placed[p / 64], 1ull << (p % 64), __ATOMIC_RELEASE);
	}
	return 0;
}

int vmig__pc_dest_switch(struct vmig__pc_dest *pc, struct vmig__err *err)
{
	/* Pages with data from pre-copy that were not discarded are final. */
	for (unsigned i = 0; i < pc->cfg.nblocks; i++) {
		struct vmig__block *b = &pc->cfg.blocks[i];
		int ret = via_alias(b) ? alias_switch(pc, i, err) : 0;

		if (ret)
			return ret;
		for (size_t w = 0; !via_alias(b) && w < vmig__bitmap_words(b->npages); w++)
			__atomic_fetch_or(&b->placed[w], b->received[w] & ~b->zero[w],
					  __ATOMIC_RELEASE);
	}
	__atomic_store_n(&pc->postcopy_faults, true, __ATOMIC_RELEASE);
	/* Requests made before the switch were ignored by the source. */
	vmig__pc_dest_rerequest(pc);
	return 0;
}

int vmig__pc_dest_register(struct vmig__pc_dest *pc, struct vmig__err *err)
{
	const struct vmig__pc_config *s = &pc->cfg;
	struct uffdio_api api = {.api = UFFD_API,
				 .features = UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_MISSING_SHMEM};
	int ret;

	for (unsigned i = 0; i < s->nblocks; i++) {
		struct vmig__block *b = &s->blocks[i];

		if (!via_alias(b))
			continue;
		/* Huge pages are assembled in the file, through a second
		 * mapping (see "huge pages" above); populated blocks are
		 * written through one (see the top of this file). */
		if (b->hpage)
			api.features |=
			    UFFD_FEATURE_MISSING_HUGETLBFS | UFFD_FEATURE_MINOR_HUGETLBFS;
		else
			api.features |= UFFD_FEATURE_MINOR_SHMEM;
		if (!pc->alias && !(pc->alias = calloc(s->nblocks, sizeof(*pc->alias))))
			return -ENOMEM;
		/* A populated block's pages are mapped here now, while the
		 * guest does not wait: mapping a page costs more than
		 * writing it on some hosts. */
		pc->alias[i] = b->fd < 0 ? MAP_FAILED
					 : mmap(NULL, b->size, PROT_READ | PROT_WRITE,
						MAP_SHARED | (b->pc_minor ? MAP_POPULATE : 0),
						b->fd, (off_t)b->fd_offset);
		if (pc->alias[i] == MAP_FAILED) {
			ret = b->fd < 0 ? -EBADF : -errno;
			pc->alias[i] = NULL;
			vmig__err_set(err, "post-copy needs a second mapping of RAM block '%s': %s",
				      b->name, b->fd < 0 ? "the block has no fd" : strerror(-ret));
			return ret;
		}
	}
	pc->uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (pc->uffd < 0 || ioctl(pc->uffd, UFFDIO_API, &api)) {
		ret = -errno;
		vmig__err_set(err, "userfaultfd for incoming RAM: %s%s", strerror(errno),
			      pc->alias ? " (post-copy through a second mapping needs MINOR "
					  "faults: Linux 5.13 on hugetlbfs, 5.14 on shmem)"
					: "");
		return ret;
	}
	for (unsigned i = 0; i < s->nblocks; i++) {
		if (via_alias(&s->blocks[i])) /* registered at the switch */
			continue;
		struct uffdio_register reg = {.range = {.start = (uintptr_t)s->blocks[i].host,
							.len = s->blocks[i].size},
					      .mode = UFFDIO_REGISTER_MODE_MISSING};
		uint64_t need = 1ull << _UFFDIO_COPY | 1ull << _UFFDIO_ZEROPAGE | 1ull << _UFFDIO_WAKE;

		if (ioctl(pc->uffd, UFFDIO_REGISTER, &reg) || (reg.ioctls & need) != need) {
			ret = errno ? -errno : -EOPNOTSUPP;
			vmig__err_set(err, "registering RAM block '%s' with userfaultfd: %s",
				      s->blocks[i].name, strerror(-ret));
			return ret;
		}
	}
	ret = pthread_create(&pc->fault_thread, NULL, fault_main, pc);
	if (ret) {
		vmig__err_set(err, "cannot start the fault thread");
		return -ret;
	}
	pthread_setname_np(pc->fault_thread, "vmig-fault");
	pc->fault_started = true;
	return 0;
}
