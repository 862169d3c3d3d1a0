// SPDX-License-Identifier: MIT
/*
 * Post-copy on the source: the switch, the background push, page requests
 * on the urgent channel, and pause/resume.
 *
 * After the switch the vCPUs here are stopped for good, so guest RAM is
 * frozen: any thread may read a page and its content is final. A page's
 * dirty bit means "the destination may not have this page"; the push and
 * the request handler clear it atomically, and whoever clears it sends it.
 * A requested page is sent even if its bit was already clear (it may still
 * sit in the main channel's buffers); the destination keeps the first copy.
 * Only the claimer stores a page's hash, which the digest reads.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "migrate/migrate_int.h"
#include "ram/bitmap.h"
#include "ram/ram.h"

#define NO_HINT UINT64_MAX
_Static_assert(VMIG_REC_MAX_PAGES <= 64, "a request's claims fit one word");

/* A DISCARD record for every run of set bits in map (block bi). */
static void send_discards(struct vmig__source *src, unsigned bi, const uint64_t *map)
{
	struct vmig__block *b = &src->s->blocks[bi];
	uint64_t p = vmig__bitmap_find_next(map, b->npages, 0);

	while (p < b->npages) {
		uint64_t end = vmig__bitmap_find_next_zero(map, b->npages, p);
		struct vmig_wire_discard d = {.block = bi, .first = p, .npages = end - p};

		vmig__writer_rec(src->w, VMIG_REC_DISCARD, &d, sizeof(d));
		p = vmig__bitmap_find_next(map, b->npages, end);
	}
}

/*
 * Sync, and discard only pages that became dirty since the previous sync
 * (the others were discarded already); *added gets their number.
 */
static int discard_new(struct vmig__source *src, uint64_t *added_out)
{
	struct vmig_session *s = src->s;
	uint64_t added = 0;

	for (unsigned bi = 0; bi < s->nblocks; bi++) {
		struct vmig__block *b = &s->blocks[bi];
		uint64_t *fresh = calloc(vmig__bitmap_words(b->npages), sizeof(uint64_t));
		struct vmig__err err = {{0}};
		int ret;

		if (!fresh) {
			vmig__fail(s, -ENOMEM, "out of memory");
			return -ENOMEM;
		}
		ret = vmig__dirty_sync(src->dirty, bi, fresh, NULL, &err);
		if (ret) {
			free(fresh);
			vmig__fail(s, ret, "dirty bitmap sync: %s", err.msg);
			return ret;
		}
		/* Only pages not already discarded (and still dirty) need it. */
		for (size_t w = 0; w < vmig__bitmap_words(b->npages); w++)
			fresh[w] &= ~b->dirty[w];
		send_discards(src, bi, fresh);
		added += vmig__bitmap_count(fresh, b->npages);
		vmig__bitmap_or(b->dirty, fresh, b->npages);
		free(fresh);
	}
	src->dirty_pages += added;
	src->st.ram.dirty_sync_count++;
	if (added_out)
		*added_out = added;
	return 0;
}

/*
 * Before the switch, with the guest still running. Every page dirty now
 * stays dirty until post-copy pushes it (nothing is sent in between), so
 * the destination can drop its stale copies already. Dropping a page costs
 * the destination a few microseconds (a hole punched, a TLB flush), and the
 * guest dirties new pages meanwhile, so this repeats, like pre-copy rounds,
 * until what is left for the downtime is small.
 */
int vmig__pc_source_prepare(struct vmig__source *src)
{
	struct vmig_session *s = src->s;
	uint64_t added = 0;
	/* Multifd: every page on the data channels is loaded before the
	 * first DISCARD, so no stale copy lands after one. */
	int ret = src->mf ? vmig__src_mark_and_drain(src) : 0;

	if (!ret)
		ret = vmig__src_sync_dirty(src);
	if (ret)
		return ret;
	for (unsigned bi = 0; bi < s->nblocks; bi++)
		send_discards(src, bi, s->blocks[bi].dirty);
	ret = vmig__src_mark_and_drain(src);
	for (unsigned round = 0; !ret && round < 8; round++) {
		ret = discard_new(src, &added);
		if (!ret)
			ret = vmig__src_mark_and_drain(src);
		if (added < 1024)
			break;
	}
	return ret;
}

int vmig__pc_source_switch(struct vmig__source *src)
{
	struct vmig_session *s = src->s;
	uint64_t stop_ns = vmig__now_ns();
	int ret;

	ret = vmig__src_stop_vm(src);
	if (!ret)
		ret = vmig__src_maybe_pause(src);
	if (!ret)
		ret = discard_new(src, NULL);
	if (ret)
		return ret;
	ret = vmig__src_send_state(src);
	if (ret)
		return ret;
	/* From here the destination may be running: failures pause, not fail
	 * (a flush that fails part-way may still have delivered the record). */
	vmig__src_commit(src);
	pthread_mutex_lock(&s->lock);
	__atomic_store_n(&s->in_postcopy, true, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&s->lock);
	vmig__writer_rec(src->w, VMIG_REC_POSTCOPY_RUN, NULL, 0);
	__atomic_store_n(&src->hint, NO_HINT, __ATOMIC_RELAXED);
	ret = vmig__writer_flush(src->w);
	/* Page requests come in on this connection from now on. */
	src->w->flush_bytes = VMIG_WRITER_FLUSH_BYTES_POSTCOPY;
	vmig__set_status(s, VMIG_STATUS_POSTCOPY_ACTIVE);
	if (ret)
		return 0; /* a lost link: the push loop pauses */
	src->st.ram.downtime_bytes = vmig__src_wire_bytes(src) - src->st.ram.precopy_bytes;
	if (!vmig__src_wait_rp(s, &s->rp_resumed)) {
		src->st.downtime_us = (vmig__now_ns() - stop_ns) / 1000;
		src->st.downtime_ms = (int64_t)((src->st.downtime_us + 500) / 1000);
		/* Dirty tracking stays until finish(): RAM here no longer
		 * changes, and unregistering a large guest takes tens of ms
		 * of kernel time that the page requests must not wait behind. */
		return 0;
	}
	pthread_mutex_lock(&s->lock);
	if (s->rp_error) {
		/* The destination refused before it started: the VM is still ours. */
		__atomic_store_n(&s->in_postcopy, false, __ATOMIC_RELEASE);
		ret = -EIO;
	}
	pthread_mutex_unlock(&s->lock);
	if (ret)
		vmig__fail(s, ret, "destination did not start");
	return ret; /* otherwise a lost link: the push loop pauses */
}

/* Return-path thread: send the requested pages now, on the urgent channel. */
int vmig__pc_source_request(struct vmig__source *src, const struct vmig_wire_pages *req,
			    struct vmig__err *err)
{
	struct vmig_session *s = src->s;
	struct vmig__block *b;
	uint64_t before, claimed, mine = 0; /* bit i: this request claimed page first + i */

	if (req->block >= s->nblocks || !req->npages || req->npages > VMIG_REC_MAX_PAGES ||
	    req->first >= s->blocks[req->block].npages ||
	    req->npages > s->blocks[req->block].npages - req->first) {
		vmig__err_set_first(err,
				    "destination requested pages outside guest RAM "
				    "(block %u, page %llu, %u pages)",
				    req->block, (unsigned long long)req->first, req->npages);
		return -EPROTO;
	}
	b = &s->blocks[req->block];
	/* Asked before the switch reached it: it asks again after. */
	if (!vmig__in_postcopy(s))
		return 0;
	/* Before the claim: whoever sees the bits clear then sees this. */
	__atomic_add_fetch(&src->urgent_inflight, 1, __ATOMIC_SEQ_CST);
	for (uint32_t i = 0; i < req->npages; i++)
		if (vmig__bitmap_test_and_clear_atomic(b->dirty, req->first + i))
			mine |= 1ull << i;
	claimed = (uint64_t)__builtin_popcountll(mine);
	if (claimed)
		__atomic_sub_fetch(&src->dirty_pages, claimed, __ATOMIC_RELAXED);
	before = src->uw->bytes;
	/* Pages the push claimed go too, as they may wait in its buffer, but
	 * their hashes are the push's to store: once it has claimed the last
	 * page, the digest may be reading them. */
	for (uint32_t i = 0, j; i < req->npages; i = j) {
		bool own = mine >> i & 1;

		for (j = i + 1; j < req->npages && (mine >> j & 1) == own; j++)
			;
		vmig__src_send_run(src, src->uw, req->block, req->first + i, req->first + j, own);
	}
	/* An urgent-channel error is left to the main channel to notice. The
	 * claimed pages' hashes are stored once the flush returns, failed or
	 * not. */
	vmig__writer_flush(src->uw);
	__atomic_sub_fetch(&src->urgent_inflight, 1, __ATOMIC_RELEASE);
	__atomic_add_fetch(&src->urgent_bytes, src->uw->bytes - before, __ATOMIC_RELAXED);
	__atomic_add_fetch(&src->urgent_requests, 1, __ATOMIC_RELAXED);
	/* Push the neighbourhood of the fault next. */
	if (src->mf)
		vmig__mf_source_hint(src, req->block, req->first + req->npages);
	else
		__atomic_store_n(&src->hint,
				 (uint64_t)req->block << 48 | (req->first + req->npages),
				 __ATOMIC_RELAXED);
	return 0;
}

/* Find the next dirty page at or after (bi, pfn), wrapping once. */
static bool next_dirty(struct vmig__source *src, unsigned *bi, uint64_t *pfn)
{
	struct vmig_session *s = src->s;

	for (unsigned n = 0; n <= s->nblocks; n++) {
		struct vmig__block *b = &s->blocks[*bi];
		uint64_t p = *pfn < b->npages ? vmig__bitmap_find_next(b->dirty, b->npages, *pfn)
					      : b->npages;

		if (p < b->npages) {
			*pfn = p;
			return true;
		}
		*bi = (*bi + 1) % s->nblocks;
		*pfn = 0;
	}
	return false;
}

/* Send up to one record's worth of dirty pages at (bi, *pfn). */
static void push_some(struct vmig__source *src, unsigned bi, uint64_t *pfn)
{
	struct vmig__block *b = &src->s->blocks[bi];
	uint64_t p = *pfn, end = p + VMIG_REC_MAX_PAGES, claimed = 0;

	if (end > b->npages)
		end = b->npages;
	while (p < end) {
		uint64_t q;

		if (!vmig__bitmap_test_and_clear_atomic(b->dirty, p)) {
			p++;
			continue;
		}
		for (q = p + 1; q < end && vmig__bitmap_test_and_clear_atomic(b->dirty, q); q++)
			;
		vmig__src_send_run(src, src->w, bi, p, q, true);
		claimed += q - p;
		p = q;
	}
	if (claimed)
		__atomic_sub_fetch(&src->dirty_pages, claimed, __ATOMIC_RELAXED);
	*pfn = end;
}

/* Read the destination's RECV_BITMAP for every block: dirty = what it lacks. */
static int read_bitmaps(struct vmig__source *src)
{
	struct vmig__reader *r = malloc(sizeof(*r));
	int ret;

	if (!r)
		return -ENOMEM;
	vmig__reader_init_chan(r, src->s->ch);
	ret = vmig__pc_source_read_bitmaps(src, r);
	/* The destination sends nothing else until it hears from us, so no
	 * buffered bytes are lost when this reader goes away. */
	free(r);
	return ret;
}

int vmig__pc_source_read_bitmaps(struct vmig__source *src, struct vmig__reader *r)
{
	struct vmig_session *s = src->s;
	uint64_t dirty = 0;
	int ret = 0;

	for (unsigned i = 0; !ret && i < s->nblocks; i++) {
		struct vmig_wire_rec rec;
		struct vmig_wire_recv_bitmap hdr;
		struct vmig__block *b = &s->blocks[i];
		size_t words = vmig__bitmap_words(b->npages);

		ret = vmig__reader_read(r, &rec, sizeof(rec));
		if (!ret && (rec.type != VMIG_RP_RECV_BITMAP || rec.len != sizeof(hdr) + words * 8))
			ret = -EPROTO;
		if (!ret)
			ret = vmig__reader_read(r, &hdr, sizeof(hdr));
		if (!ret && (hdr.block != i || hdr.npages != b->npages || hdr.reserved))
			ret = -EPROTO;
		if (!ret)
			ret = vmig__reader_read(r, b->dirty, words * 8);
		if (ret)
			break;
		for (size_t w = 0; w < words; w++)
			b->dirty[w] = ~b->dirty[w];
		if (b->npages % 64)
			b->dirty[words - 1] &= (1ull << (b->npages % 64)) - 1;
		dirty += vmig__bitmap_count(b->dirty, b->npages);
	}
	__atomic_store_n(&src->dirty_pages, dirty, __ATOMIC_RELAXED);
	return ret;
}

/* The connection broke after the switch: wait for a resume and reconnect. */
static int pause_and_resume(struct vmig__source *src)
{
	struct vmig_session *s = src->s;
	int ret;

	vmig__src_close_channels(src);
	vmig__set_status(s, VMIG_STATUS_POSTCOPY_PAUSED);
	for (;;) {
		ret = vmig__wait_recover(s);
		if (ret)
			return ret;
		vmig__clear_err(s); /* the request cleared pause_requested */
		ret = vmig__src_connect(src, true);
		src->w->flush_bytes = VMIG_WRITER_FLUSH_BYTES_POSTCOPY; /* as at the switch */
		if (!ret)
			ret = read_bitmaps(src);
		if (!ret) {
			/* Only a destination that ran can be paused and resume:
			 * its RESUMED may have been lost with the link. */
			pthread_mutex_lock(&s->lock);
			s->rp_resumed = true;
			pthread_mutex_unlock(&s->lock);
		}
		if (!ret)
			ret = vmig__src_start_rp(src);
		if (!ret)
			break;
		vmig__src_close_channels(src);
		vmig__set_status(s, VMIG_STATUS_POSTCOPY_PAUSED);
	}
	vmig__set_status(s, VMIG_STATUS_POSTCOPY_ACTIVE);
	return 0;
}

static bool connection_lost(struct vmig__source *src)
{
	struct vmig_session *s = src->s;
	bool failed;

	pthread_mutex_lock(&s->lock);
	failed = __atomic_load_n(&s->rp_failed, __ATOMIC_ACQUIRE);
	pthread_mutex_unlock(&s->lock);
	return failed || src->w->err || __atomic_load_n(&s->pause_requested, __ATOMIC_ACQUIRE);
}

/*
 * Wait for the page requests whose claims cleared dirty bits to store their
 * pages' hashes; false if the connection broke meanwhile (a write that
 * never ends then fails). The push saw every bit clear, with relaxed loads;
 * the fence orders those before the load of the count, which a request
 * raised before it cleared any bit.
 */
static bool urgent_settled(struct vmig__source *src)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	while (__atomic_load_n(&src->urgent_inflight, __ATOMIC_ACQUIRE)) {
		if (connection_lost(src))
			return false;
		usleep(100);
	}
	return true;
}

/* Where the push is: without multifd, the page it sends next; with it,
 * whether the data channels were started on this connection. */
struct push_pos {
	unsigned bi;
	uint64_t pfn;
	bool pushing;
};

/* One step of the background push: 1 while pages are left, 0 once all
 * are sent, -EPIPE if a data channel broke (all are shut down then). */
static int push_step(struct vmig__source *src, struct push_pos *pos)
{
	uint64_t hint = __atomic_exchange_n(&src->hint, NO_HINT, __ATOMIC_RELAXED);
	int err;

	if (src->mf) {
		if (!pos->pushing) {
			vmig__mf_source_push(src);
			pos->pushing = true;
		}
		if (!vmig__mf_source_wait(src, 50, &err)) {
			vmig__src_stats_tick(src, false);
			return 1;
		}
		return err ? -EPIPE : 0;
	}
	if (hint != NO_HINT && (hint >> 48) < src->s->nblocks) {
		pos->bi = (unsigned)(hint >> 48);
		pos->pfn = hint & ((1ull << 48) - 1);
	}
	if (!next_dirty(src, &pos->bi, &pos->pfn))
		return 0;
	push_some(src, pos->bi, &pos->pfn);
	vmig__src_stats_tick(src, false);
	return 1;
}

/* Push everything the destination lacks, then the digest and EOS, until
 * the destination confirms. Pauses and resumes as the network demands. */
int vmig__pc_source_push(struct vmig__source *src)
{
	struct vmig_session *s = src->s;
	struct push_pos pos = {0};
	int ret, step = 1;

	for (;;) {
		struct vmig_wire_digest d;

		if (step < 0 || connection_lost(src)) {
			ret = pause_and_resume(src);
			if (ret)
				break;
			pos.pushing = false; /* on the new channels */
			step = 1;
			continue;
		}
		step = push_step(src, &pos);
		if (step)
			continue;
		/* All claimed. A page request may have claimed the last pages:
		 * their hashes come with its flush, before the digest. */
		if (!urgent_settled(src))
			continue;
		/* All sent: close the stream and wait for the verdict. */
		vmig__src_digest(src, &d);
		vmig__writer_rec(src->w, VMIG_REC_DIGEST, &d, sizeof(d));
		vmig__writer_rec(src->w, VMIG_REC_EOS, NULL, 0);
		if (!vmig__writer_flush(src->w) && !vmig__src_wait_rp(s, &s->rp_complete)) {
			ret = 0;
			break;
		}
		pthread_mutex_lock(&s->lock);
		ret = s->rp_error ? -EIO : 0;
		pthread_mutex_unlock(&s->lock);
		if (ret) /* the destination reported a real failure, not a lost link */
			break;
	}
	src->st.ram.postcopy_bytes = vmig__src_wire_bytes(src) - src->st.ram.precopy_bytes +
				     __atomic_load_n(&src->urgent_bytes, __ATOMIC_RELAXED);
	if (ret)
		vmig__fail(s, ret, "post-copy failed");
	return ret;
}
