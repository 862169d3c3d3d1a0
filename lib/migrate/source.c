// SPDX-License-Identifier: MIT
/*
 * Outgoing migration: the migration thread and the return-path thread of
 * the source. Post-copy's own steps live in pc_source.c; this file runs
 * pre-copy and calls into post-copy when asked to switch.
 *
 * The migration thread connects, sends the RAM block list, starts dirty
 * tracking and copies all of RAM once (the bulk round). It then repeats
 * "sync the dirty bitmap, send the dirty pages" until the time to send what
 * is left at the measured bandwidth fits downtime-limit. Then it stops the
 * vCPUs, sends the last dirty pages, the device state and the memory digest,
 * and waits for the destination to say it is running.
 *
 * The handover rule (docs/handover.md): the destination starts only once it
 * has read EOS (or POSTCOPY_RUN), so a failure before that record is queued
 * restarts the vCPUs here and the VM carries on. From the moment it is
 * queued ("committed") the destination may run, and the vCPUs here are
 * restarted only if the destination says it failed without starting
 * (RP_ERROR with no RESUMED before it: the return path is ordered). Any
 * other failure leaves them stopped, with the outcome reported as unknown.
 */
#include <assert.h>
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "migrate/migrate_int.h"
#include "ram/bitmap.h"
#include "ram/ram.h"

/* How often (at most) the migration thread publishes statistics. */
#define STATS_PERIOD_NS 100000000ull
#define STATE_MAX (16u << 20)

uint64_t vmig__src_wire_bytes(struct vmig__source *src)
{
	return src->w->bytes + src->w->pending + vmig__mf_source_bytes(src);
}

/* Update the working statistics and publish them every STATS_PERIOD_NS. */
void vmig__src_stats_tick(struct vmig__source *src, bool force)
{
	uint64_t now = vmig__now_ns();
	uint64_t dt = now - src->last_pub_ns;
	uint64_t urgent = __atomic_load_n(&src->urgent_bytes, __ATOMIC_RELAXED);
	uint64_t bytes = vmig__src_wire_bytes(src) + urgent;
	uint64_t dirty = __atomic_load_n(&src->dirty_pages, __ATOMIC_RELAXED);

	if (src->mf)
		vmig__mf_source_collect(src);
	src->st.ram.transferred = bytes;
	src->st.ram.remaining = dirty * VMIG_PAGE_SIZE;
	if (dt < STATS_PERIOD_NS && !force)
		return;
	if (dt >= STATS_PERIOD_NS / 2) {
		uint64_t pages = src->st.ram.normal + src->st.ram.duplicate;

		src->st.ram.mbps = vmig__mbps(bytes - src->last_pub_bytes, dt);
		src->st.ram.pages_per_second =
			(uint64_t)((double)(pages - src->last_pub_pages) * 1e9 / (double)dt);
		src->last_pub_bytes = bytes;
		src->last_pub_pages = pages;
		src->last_pub_ns = now;
	}
	if (src->bandwidth)
		src->st.expected_downtime_ms =
			(int64_t)(src->st.ram.remaining * 1000 / src->bandwidth);
	src->st.ram.postcopy_requests = __atomic_load_n(&src->urgent_requests, __ATOMIC_RELAXED);
	src->st.total_time_ms = (int64_t)((now - src->s->start_ns) / 1000000);
	vmig__publish(src->s, &src->st);
}

/*
 * Sleep wait_ns for the rate limit, in slices: at a low max-bandwidth one
 * wait can be long (a 1 MiB flush at 1000 bytes/s is 17 minutes), and it
 * must end at once on a cancel, a lost destination or a pause, and when
 * the limit changes (the debt run up at the old rate is forgiven then).
 */
static int throttle_wait(struct vmig__source *src, uint64_t wait_ns, int64_t limit)
{
	struct vmig_session *s = src->s;
	uint64_t end = vmig__now_ns() + wait_ns;
	struct pollfd pfd = {.fd = s->cancel_efd, .events = POLLIN};

	for (;;) {
		uint64_t now = vmig__now_ns();
		int64_t cur = vmig__param(s, vmig__in_postcopy(s) ? VMIG_PARAM_MAX_POSTCOPY_BANDWIDTH
							     : VMIG_PARAM_MAX_BANDWIDTH);

		if (vmig__cancelled(s))
			return -ECANCELED;
		if (__atomic_load_n(&s->rp_failed, __ATOMIC_ACQUIRE) ||
		    __atomic_load_n(&s->pause_requested, __ATOMIC_ACQUIRE))
			return -ECONNRESET;
		if (cur != limit) {
			pthread_mutex_lock(&src->rl_lock);
			src->rl.next_ns = now;
			pthread_mutex_unlock(&src->rl_lock);
			return 0;
		}
		if (now >= end)
			return 0;
		poll(&pfd, 1, (int)VMIG_MIN((end - now) / 1000000 + 1, 100));
	}
}

/* Writer throttle: max-bandwidth and cancellation, checked once per flush.
 * Shared by the multifd channels' threads: the rate limit is for them all. */
int vmig__src_throttle(void *opaque, size_t bytes)
{
	struct vmig__source *src = opaque;
	uint64_t wait_ns;
	int64_t limit;

	if (vmig__cancelled(src->s))
		return -ECANCELED;
	/* The destination closed its end: stop sending into a half-open
	 * connection that may never report an error by itself. */
	if (__atomic_load_n(&src->s->rp_failed, __ATOMIC_ACQUIRE))
		return -ECONNRESET;
	/* As QEMU: post-copy's background push has its own limit. */
	limit = vmig__param(src->s, vmig__in_postcopy(src->s) ? VMIG_PARAM_MAX_POSTCOPY_BANDWIDTH
							: VMIG_PARAM_MAX_BANDWIDTH);
	pthread_mutex_lock(&src->rl_lock);
	wait_ns = vmig__ratelimit_account(&src->rl, (uint64_t)limit, bytes, vmig__now_ns());
	pthread_mutex_unlock(&src->rl_lock);
	return wait_ns ? throttle_wait(src, wait_ns, limit) : 0;
}

static void set_page_hash(struct vmig__block *b, uint64_t pfn, uint64_t h)
{
	/* Post-copy may hash one page from two threads; the value is the same. */
	__atomic_store_n(&b->page_hash[pfn], h, __ATOMIC_RELAXED);
}

/* Queue pages [first, end) of block bi on w, split into zero and non-zero
 * runs, and if hash, remember each page's hash: only the thread that
 * claimed the pages (cleared their dirty bits) may store that. Page first
 * is at p: in guest RAM, or in a copy made into w's stage if copied. */
static void send_pages(struct vmig__source *src, struct vmig__writer *w, unsigned bi,
		       uint64_t first, uint64_t end, const uint8_t *p, bool copied, bool hash)
{
	struct vmig__block *b = &src->s->blocks[bi];
	bool main = w == src->w;
	uint64_t i = first;

	while (i < end) {
		bool zero = vmig__page_is_zero(p + (i - first) * VMIG_PAGE_SIZE);
		uint64_t j = i + 1;

		while (j < end && vmig__page_is_zero(p + (j - first) * VMIG_PAGE_SIZE) == zero)
			j++;
		if (zero) {
			for (uint64_t k = i; hash && k < j; k++)
				set_page_hash(b, k, vmig__zero_page_hash());
			vmig__writer_zero(w, bi, i, (uint32_t)(j - i));
			if (main)
				src->st.ram.duplicate += j - i;
		} else {
			/* A copy is hashed now, while in cache from the read;
			 * guest RAM by the flush that sends it (see the writer). */
			for (uint64_t k = i; hash && copied && k < j; k++)
				set_page_hash(b, k,
					      vmig__page_hash(p + (k - first) * VMIG_PAGE_SIZE));
			vmig__writer_pages(w, bi, i, (uint32_t)(j - i),
					   p + (i - first) * VMIG_PAGE_SIZE,
					   hash && !copied ? b->page_hash + i : NULL);
			if (main) {
				src->st.ram.normal += j - i;
				src->st.ram.normal_bytes += (j - i) * VMIG_PAGE_SIZE;
			}
		}
		i = j;
	}
}

/*
 * A copy of pages [first, end) of a huge-page block, read through its file
 * into w's stage, or NULL (no room, or the read failed) to read the mapping.
 *
 * Why not the mapping: write-protecting a huge page for dirty tracking
 * changes its page-table entry, and where the host is itself a guest whose
 * hypervisor shadows page tables, the next access to each 4 KiB of it then
 * traps into the hypervisor. Measured on such a host, one load per 4 KiB
 * page of 4 GiB took 0.03 s before the write-protection and 0.9 to 1.4 s
 * after it, while pread() of the same memfd, which goes through the
 * kernel's own mapping, took 0.17 s (bench/migrate/wp_probe). On 4 KiB
 * pages the protection cost the next loads nothing there, and the read
 * would only add a copy, so normal pages are read in place.
 */
static const uint8_t *read_through_file(struct vmig__writer *w, const struct vmig__block *b,
					uint64_t first, uint64_t end)
{
	size_t len = (end - first) * VMIG_PAGE_SIZE, done = 0;
	uint8_t *p = vmig__writer_stage(w, len);
	off_t at = (off_t)(b->fd_offset + first * VMIG_PAGE_SIZE);

	while (p && done < len) {
		ssize_t n = pread(b->fd, p + done, len - done, at + (off_t)done);

		if (n > 0)
			done += (size_t)n;
		else if (n < 0 && errno == EINTR)
			continue;
		else
			return NULL; /* the mapping has the same pages */
	}
	return p;
}

/* Queue pages [first, end) of block bi on w (see send_pages). */
void vmig__src_send_run(struct vmig__source *src, struct vmig__writer *w, unsigned bi,
			uint64_t first, uint64_t end, bool hash)
{
	struct vmig__block *b = &src->s->blocks[bi];
	/* Huge pages go through the file, a record's worth at a time. */
	uint64_t step = b->hpage ? VMIG_REC_MAX_PAGES : end - first;

	for (uint64_t at = first; at < end; at += step) {
		uint64_t to = VMIG_MIN(end, at + step);
		const uint8_t *copy = b->hpage ? read_through_file(w, b, at, to) : NULL;

		send_pages(src, w, bi, at, to, copy ? copy : b->host + at * VMIG_PAGE_SIZE,
			   copy != NULL, hash);
	}
}

/* Send every page whose dirty bit is set, clearing the bits as it goes.
 * Pre-copy only: post-copy's push claims pages atomically instead. */
static int send_dirty(struct vmig__source *src, bool final)
{
	struct vmig_session *s = src->s;

	if (src->mf) /* each channel ends its share with the coming SYNC, or EOS */
		return vmig__mf_source_round(src, src->sync_marks + 1, final);

	for (unsigned bi = 0; bi < s->nblocks; bi++) {
		struct vmig__block *b = &s->blocks[bi];
		uint64_t pfn = vmig__bitmap_find_next(b->dirty, b->npages, 0);

		while (pfn < b->npages) {
			/* At most one record's run: the search stops there (in
			 * a full bitmap it would scan to the end every time). */
			uint64_t end = vmig__bitmap_find_next_zero(
			    b->dirty, VMIG_MIN(b->npages, pfn + VMIG_REC_MAX_PAGES), pfn);
			vmig__bitmap_clear_range(b->dirty, pfn, end - pfn);
			src->dirty_pages -= end - pfn;
			vmig__src_send_run(src, src->w, bi, pfn, end, true);
			if (src->w->err)
				return src->w->err;
			vmig__src_stats_tick(src, false);
			/* Post-copy asked for: switch now, the rest goes after.
			 * Not in the final round: the switch-over is decided,
			 * and every dirty page must go (the digest covers only
			 * what was sent, so a page left out goes unnoticed). */
			if (!final && __atomic_load_n(&s->postcopy_requested, __ATOMIC_ACQUIRE))
				return vmig__writer_flush(src->w);
			pfn = vmig__bitmap_find_next(b->dirty, b->npages, end);
		}
	}
	return vmig__writer_flush(src->w);
}

/* Collect pages dirtied since the last sync into the dirty bitmaps. */
int vmig__src_sync_dirty(struct vmig__source *src)
{
	struct vmig_session *s = src->s;
	uint64_t now, added = 0;

	for (unsigned bi = 0; bi < s->nblocks; bi++) {
		struct vmig__block *b = &s->blocks[bi];
		struct vmig__err err = {{0}};
		uint64_t n = 0;
		int ret = vmig__dirty_sync(src->dirty, bi, b->dirty, &n, &err);

		if (ret) {
			vmig__fail(s, ret, "dirty bitmap sync: %s", err.msg);
			return ret;
		}
		added += n;
	}
	src->dirty_pages += added;
	src->ac_dirtied += added * VMIG_PAGE_SIZE;
	now = vmig__now_ns();
	if (now > src->last_sync_ns)
		src->st.ram.dirty_pages_rate =
			(uint64_t)((double)added * 1e9 / (double)(now - src->last_sync_ns));
	src->last_sync_ns = now;
	src->st.ram.dirty_sync_count++;
	return 0;
}

static void send_blocks(struct vmig__source *src)
{
	struct vmig_session *s = src->s;
	uint8_t buf[4 + VMIG_MAX_BLOCKS * (sizeof(struct vmig_wire_block) + VMIG_BLOCK_NAME_MAX)];
	uint32_t count = s->nblocks;
	size_t off = 4;

	memcpy(buf, &count, 4);
	for (unsigned i = 0; i < s->nblocks; i++) {
		struct vmig_wire_block wb = {.name_len = (uint8_t)strlen(s->blocks[i].name),
					     .page_size = VMIG_PAGE_SIZE,
					     .size = s->blocks[i].size};

		memcpy(buf + off, &wb, sizeof(wb));
		off += sizeof(wb);
		memcpy(buf + off, s->blocks[i].name, wb.name_len);
		off += wb.name_len;
	}
	vmig__writer_rec(src->w, VMIG_REC_BLOCKS, buf, (uint32_t)off);
	if (s->caps[VMIG_CAP_MULTIFD]) {
		struct vmig_wire_multifd mf = {
			.channels = (uint32_t)vmig__param(s, VMIG_PARAM_MULTIFD_CHANNELS)};

		vmig__writer_rec(src->w, VMIG_REC_MULTIFD, &mf, sizeof(mf));
	}
}

/* Text from the peer, made printable (it ends up in error-desc). */
static void peer_text(char *out, size_t cap, const uint8_t *text, size_t len)
{
	size_t n = len < cap - 1 ? len : cap - 1;

	for (size_t i = 0; i < n; i++)
		out[i] = text[i] >= 0x20 && text[i] < 0x7f ? (char)text[i] : '?';
	out[n] = '\0';
}

/*
 * One message of the return path, in the return-path thread. Every field
 * is the destination's and untrusted: a message of the wrong size, or one
 * that has no place now, is a protocol error (-EPROTO, with err set), and
 * the return path ends.
 */
int vmig__src_rp_message(struct vmig__source *src, uint8_t type, const uint8_t *payload,
			 size_t len, struct vmig__err *err)
{
	static const uint32_t sizes[] = {
		[VMIG_RP_RESUMED - VMIG_RP_READY] = sizeof(struct vmig_wire_resumed),
		[VMIG_RP_SYNC_ACK - VMIG_RP_READY] = sizeof(struct vmig_wire_sync_ack),
		[VMIG_RP_PAGE_REQ - VMIG_RP_READY] = sizeof(struct vmig_wire_pages),
		[VMIG_RP_COMPLETE - VMIG_RP_READY] = 0,
	};
	struct vmig_session *s = src->s;
	char text[160];
	int ret = 0;

	if (type < VMIG_RP_READY || type > VMIG_RP_COMPLETE || type == VMIG_RP_READY ||
	    type == VMIG_RP_RECV_BITMAP) {
		vmig__err_set_first(err, "unexpected return-path message 0x%02x", type);
		return -EPROTO;
	}
	if (type != VMIG_RP_ERROR && len != sizes[type - VMIG_RP_READY]) {
		vmig__err_set_first(err, "return-path message 0x%02x has %zu bytes, not %u", type,
				    len, sizes[type - VMIG_RP_READY]);
		return -EPROTO;
	}
	if (type == VMIG_RP_PAGE_REQ) {
		struct vmig_wire_pages req;

		memcpy(&req, payload, sizeof(req));
		return vmig__pc_source_request(src, &req, err);
	}
	pthread_mutex_lock(&s->lock);
	if (type == VMIG_RP_RESUMED) {
		struct vmig_wire_resumed res;

		memcpy(&res, payload, sizeof(res));
		s->rp_load_us = res.load_us;
		s->rp_resumed = true;
	} else if (type == VMIG_RP_SYNC_ACK) {
		struct vmig_wire_sync_ack ack;

		memcpy(&ack, payload, sizeof(ack));
		if (ack.round < s->rp_acked_round) {
			vmig__err_set_first(err, "destination acknowledged round %llu after %llu",
					    (unsigned long long)ack.round,
					    (unsigned long long)s->rp_acked_round);
			ret = -EPROTO;
		} else {
			s->rp_acked_round = ack.round;
		}
	} else if (type == VMIG_RP_COMPLETE) {
		s->rp_complete = true;
	} else { /* VMIG_RP_ERROR */
		/* Published now: the migration thread wakes up and reports it
		 * before this thread has ended. */
		peer_text(text, sizeof(text), payload, len);
		vmig__err_set_first(err, "destination: %s", text);
		vmig__err_set_first(&s->mig_err, "%s", err->msg);
		s->rp_error = true;
		__atomic_store_n(&s->rp_failed, true, __ATOMIC_RELEASE);
	}
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	return ret;
}

/* Return path: the destination's acks, requests and verdict; runs until EOF. */
static void *rp_thread(void *arg)
{
	struct vmig__source *src = arg;
	struct vmig_session *s = src->s;
	struct vmig__reader *r = malloc(sizeof(*r));
	struct vmig__err err = {{0}};

	if (!r)
		goto out;
	vmig__reader_init_chan(r, s->ch);
	for (;;) {
		uint8_t type, payload[256];
		size_t len;

		if (vmig__rp_read(r, &type, payload, sizeof(payload), &len, &err) ||
		    vmig__src_rp_message(src, type, payload, len, &err))
			break;
	}
	free(r);
out:
	pthread_mutex_lock(&s->lock);
	/* The destination is gone (or done): a send blocked on a peer that
	 * no longer reads would otherwise wait for TCP's own timeout. */
	if (s->ch)
		vmig__chan_shutdown(s->ch, SHUT_RDWR);
	__atomic_store_n(&s->rp_failed, true, __ATOMIC_RELEASE);
	if (!s->rp_resumed || vmig__in_postcopy(s)) {
		vmig__err_set_first(&err, "destination closed the connection");
		/* Keep the destination's reason for the failure report. */
		if (!s->mig_err.msg[0])
			s->mig_err = err;
	}
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	return NULL;
}

/*
 * Wait until *flag is set by the return path (0), or the return path fails
 * or the migration is cancelled (-EIO).
 */
int vmig__src_wait_rp(struct vmig_session *s, const bool *flag)
{
	int ret;

	pthread_mutex_lock(&s->lock);
	while (!*flag && !__atomic_load_n(&s->rp_failed, __ATOMIC_ACQUIRE) && !vmig__cancelled(s) &&
	       !__atomic_load_n(&s->pause_requested, __ATOMIC_ACQUIRE))
		pthread_cond_wait(&s->cond, &s->lock);
	ret = *flag ? 0 : -EIO;
	pthread_mutex_unlock(&s->lock);
	return ret;
}

bool vmig__src_rp_ended(struct vmig_session *s, unsigned ms)
{
	struct timespec until;
	bool ended;

	vmig__cond_deadline(&until, ms);
	pthread_mutex_lock(&s->lock);
	while (s->rp_started && !__atomic_load_n(&s->rp_failed, __ATOMIC_ACQUIRE) &&
	       !vmig__cancelled(s) &&
	       pthread_cond_timedwait(&s->cond, &s->lock, &until) != ETIMEDOUT)
		;
	ended = __atomic_load_n(&s->rp_failed, __ATOMIC_ACQUIRE);
	pthread_mutex_unlock(&s->lock);
	return ended;
}

/* A send failed: the destination's reason, if it gave one, is reported
 * rather than our "broken pipe". */
static void send_failed(struct vmig__source *src, int ret)
{
	if (ret != -ECANCELED)
		vmig__src_rp_ended(src->s, 2000);
	vmig__fail(src->s, ret, "sending to the destination failed");
}

/*
 * Wait until the destination has placed everything up to SYNC round `round`.
 * Called before stopping the vCPUs, so that data still queued in socket
 * buffers drains while the guest runs instead of during downtime.
 */
static int wait_drained(struct vmig_session *s, uint64_t round);

/* Send a SYNC mark and wait until the destination has processed it. */
int vmig__src_mark_and_drain(struct vmig__source *src)
{
	struct vmig_wire_sync sy = {.round = ++src->sync_marks, .dirty_pages = src->dirty_pages};
	int ret = 0;

	/* With multifd the destination acknowledges a round once every
	 * channel has reached it: then all their pages are loaded. */
	if (src->mf)
		ret = vmig__mf_source_mark(src, sy.round);
	vmig__writer_rec(src->w, VMIG_REC_SYNC, &sy, sizeof(sy));
	if (!ret)
		ret = vmig__writer_flush(src->w);
	if (!ret)
		ret = wait_drained(src->s, sy.round);
	if (ret)
		vmig__fail(src->s, ret, "destination stopped acknowledging the stream");
	return ret;
}

static int wait_drained(struct vmig_session *s, uint64_t round)
{
	int ret;

	pthread_mutex_lock(&s->lock);
	while (s->rp_acked_round < round && !__atomic_load_n(&s->rp_failed, __ATOMIC_ACQUIRE) && !vmig__cancelled(s))
		pthread_cond_wait(&s->cond, &s->lock);
	ret = s->rp_acked_round >= round ? 0 : -EIO;
	pthread_mutex_unlock(&s->lock);
	return ret;
}

void vmig__src_digest(struct vmig__source *src, struct vmig_wire_digest *d)
{
	struct vmig_session *s = src->s;
	uint64_t *hashes[VMIG_MAX_BLOCKS];
	uint64_t npages[VMIG_MAX_BLOCKS];

	/* Pages still queued get their hashes at this flush. The urgent and
	 * data channels flush their own before they report done. */
	vmig__writer_flush(src->w);
	for (unsigned i = 0; i < s->nblocks; i++) {
		hashes[i] = s->blocks[i].page_hash;
		npages[i] = s->blocks[i].npages;
	}
	memset(d, 0, sizeof(*d));
	d->page_digest = vmig__digest_of_hashes(hashes, npages, s->nblocks);
}

static int digest_record(struct vmig__source *src)
{
	struct vmig_session *s = src->s;
	struct vmig_wire_digest d;

	vmig__src_digest(src, &d);
	if (s->caps[VMIG_CAP_VERIFY_MEMORY]) {
		/* Full check, at the cost of downtime: RAM as it is now must equal
		 * what was sent. A mismatch means dirty tracking missed a write. */
		for (unsigned i = 0; i < s->nblocks; i++) {
			struct vmig__block *b = &s->blocks[i];

			for (uint64_t p = 0; p < b->npages; p++) {
				if (vmig__page_hash(b->host + p * VMIG_PAGE_SIZE) != b->page_hash[p]) {
					vmig__fail(s, -EIO,
						   "RAM block '%s' page %llu changed after it was "
						   "last sent: dirty tracking missed a write",
						   b->name, (unsigned long long)p);
					return -EIO;
				}
			}
		}
		d.flags |= VMIG_DIGEST_F_MEMORY;
		d.mem_digest = d.page_digest;
	}
	vmig__writer_rec(src->w, VMIG_REC_DIGEST, &d, sizeof(d));
	return 0;
}

/* Stop the vCPUs (both kinds of switch). */
int vmig__src_stop_vm(struct vmig__source *src)
{
	struct vmig_session *s = src->s;
	int ret = s->ops.stop(s->opaque);

	if (ret) {
		vmig__fail(s, ret, "cannot stop the vCPUs");
		return ret;
	}
	src->stopped_vm = true;
	vmig__emit(s, VMIG_EVENT_STOPPED);
	return 0;
}

/* Queue the embedder's device state as a STATE record. */
int vmig__src_send_state(struct vmig__source *src)
{
	struct vmig_session *s = src->s;
	size_t state_len = 0;
	int ret;

	ret = s->ops.save_state(s->opaque, src->state, STATE_MAX, &state_len);
	if (!ret && state_len > STATE_MAX)
		ret = -EOVERFLOW;
	if (!ret)
		vmig__writer_rec(src->w, VMIG_REC_STATE, src->state, (uint32_t)state_len);
	if (ret)
		vmig__fail(s, ret, "saving device state failed");
	return ret;
}

/*
 * Capability pause-before-switchover, with the vCPUs stopped: wait in
 * status pre-switchover for migrate-continue (0) or a cancel (-ECANCELED).
 */
int vmig__src_maybe_pause(struct vmig__source *src)
{
	struct vmig_session *s = src->s;
	bool changed;

	if (!s->caps[VMIG_CAP_PAUSE_BEFORE_SWITCHOVER])
		return 0;
	pthread_mutex_lock(&s->lock);
	changed = !vmig__cancelled(s) && vmig__set_status_locked(s, VMIG_STATUS_PRE_SWITCHOVER);
	pthread_mutex_unlock(&s->lock);
	if (changed)
		vmig__emit(s, VMIG_EVENT_STATUS);
	pthread_mutex_lock(&s->lock);
	while (!s->continue_requested && !vmig__cancelled(s) && !__atomic_load_n(&s->rp_failed, __ATOMIC_ACQUIRE))
		pthread_cond_wait(&s->cond, &s->lock);
	pthread_mutex_unlock(&s->lock);
	if (vmig__cancelled(s)) {
		vmig__fail(s, -ECANCELED, "migration cancelled");
		return -ECANCELED;
	}
	if (!s->continue_requested) {
		vmig__fail(s, -EIO, "the destination went away during pre-switchover");
		return -EIO;
	}
	return 0;
}

/* The record that lets the destination start is about to be queued. */
void vmig__src_commit(struct vmig__source *src)
{
	__atomic_store_n(&src->s->committed, true, __ATOMIC_RELEASE);
}

/* Stop the VM, send the rest, and hand over. */
static int switch_over(struct vmig__source *src)
{
	struct vmig_session *s = src->s;
	uint64_t stop_ns = vmig__now_ns();
	uint64_t before = vmig__src_wire_bytes(src);
	int ret;

	ret = vmig__src_stop_vm(src);
	if (!ret)
		ret = vmig__src_maybe_pause(src);
	if (ret)
		return ret;
	vmig__set_status(s, VMIG_STATUS_DEVICE);
	ret = vmig__src_sync_dirty(src);
	if (ret)
		return ret;
	ret = send_dirty(src, true);
	if (ret)
		goto err_io;
	ret = vmig__src_send_state(src);
	if (ret)
		return ret;
	ret = digest_record(src);
	if (ret)
		return ret;
	vmig__src_commit(src);
	vmig__writer_rec(src->w, VMIG_REC_EOS, NULL, 0);
	ret = vmig__writer_flush(src->w);
	if (ret)
		goto err_io;
	src->st.ram.downtime_bytes = vmig__src_wire_bytes(src) - before;
	ret = vmig__src_wait_rp(s, &s->rp_resumed);
	if (ret) {
		struct vmig__err why;

		vmig__get_err(s, &why);
		vmig__fail(s, ret, "destination did not start: %s",
			   why.msg[0] ? why.msg : "no reply");
		return ret;
	}
	src->st.downtime_us = (vmig__now_ns() - stop_ns) / 1000;
	src->st.downtime_ms = (int64_t)((src->st.downtime_us + 500) / 1000);
	return 0;
err_io:
	send_failed(src, ret);
	return ret;
}

/*
 * A side connection failed while the main one is up: the destination may
 * have refused this migration (and closed its listener), and its reason,
 * on the return path, explains our symptom better. Wait a little for it.
 */
static void dest_reason(struct vmig__source *src, struct vmig__chan *c)
{
	struct vmig__reader *r = malloc(sizeof(*r));
	struct vmig__err err = {{0}};
	uint8_t type, payload[256];
	size_t len;

	if (r && vmig__chan_wait_readable(c, 2000) == 1) {
		vmig__reader_init_chan(r, c);
		if (!vmig__rp_read(r, &type, payload, sizeof(payload), &len, &err) &&
		    type == VMIG_RP_ERROR)
			vmig__src_rp_message(src, type, payload, len, &err);
	}
	free(r);
}

/* Why a connect failed: a resume given up by migrate-pause says so (its
 * connect only saw the eventfd, as if cancelled). */
static const char *attempt_err(struct vmig_session *s, bool resume, const char *msg)
{
	return resume && vmig__pause_requested(s) ? VMIG_PAUSED_MSG : msg;
}

/*
 * Connect the main channel (and the urgent one for post-copy), send the
 * preambles and start the return-path thread. resume: reconnecting a
 * paused post-copy migration.
 */
int vmig__src_connect(struct vmig__source *src, bool resume)
{
	struct vmig_session *s = src->s;
	uint16_t flags = resume ? VMIG_PRE_F_RESUME : 0;
	struct vmig__uri u;
	struct vmig__err err = {{0}};
	struct vmig__chan *ch = NULL, *uch = NULL;
	int wake_fd = vmig__connect_wake_fd(s, resume);
	bool paused;
	int ret;

	ret = vmig__uri_parse(s->uri, &u, &err);
	if (!ret)
		ret = vmig__chan_connect(&u, &s->tls, wake_fd, &ch, &err);
	if (!ret && s->caps[VMIG_CAP_POSTCOPY_RAM])
		ret = vmig__chan_connect(&u, &s->tls, wake_fd, &uch, &err);
	if (ret) {
		vmig__chan_free(ch);
		vmig__note_err(s, "%s", attempt_err(s, resume, err.msg));
		return ret;
	}
	uint64_t sent = src->w->bytes; /* a resumed stream keeps counting */

	pthread_mutex_lock(&s->lock);
	s->ch = ch;
	s->urgent = uch;
	__atomic_store_n(&s->rp_failed, false, __ATOMIC_RELEASE);
	/* A pause before s->ch was there broke nothing: see it here. */
	paused = resume && vmig__pause_requested(s);
	pthread_mutex_unlock(&s->lock);
	if (paused) {
		vmig__note_err(s, VMIG_PAUSED_MSG);
		return -ECANCELED;
	}
	vmig__writer_init(src->w, ch);
	if (resume)
		src->w->bytes = sent;
	src->w->throttle = vmig__src_throttle;
	src->w->throttle_opaque = src;
	vmig__writer_preamble(src->w, VMIG_CHAN_MAIN, flags, s->session_id);
	if (!resume)
		send_blocks(src);
	ret = vmig__writer_flush(src->w);
	if (!ret && s->caps[VMIG_CAP_MULTIFD]) {
		ret = vmig__mf_source_open(src, resume, &err);
		if (ret) {
			dest_reason(src, ch);
			vmig__note_err(s, "%s", attempt_err(s, resume, err.msg));
			return ret;
		}
	}
	if (!ret && uch) {
		vmig__writer_init(src->uw, uch);
		vmig__writer_preamble(src->uw, VMIG_CHAN_URGENT, flags, s->session_id);
		ret = vmig__writer_flush(src->uw);
	}
	if (ret) {
		vmig__note_err(s, "sending to the destination failed");
		return ret;
	}
	if (resume) /* the destination's bitmaps come first, read by the caller */
		return 0;
	return vmig__src_start_rp(src);
}

/* Start the return path after a resume handshake. */
int vmig__src_start_rp(struct vmig__source *src)
{
	struct vmig_session *s = src->s;
	int ret = pthread_create(&s->rp_thread, NULL, rp_thread, src);

	if (ret)
		return -ret;
	pthread_setname_np(s->rp_thread, "vmig-return");
	s->rp_started = true;
	return 0;
}

/* Close both channels and join the return-path thread. */
void vmig__src_close_channels(struct vmig__source *src)
{
	struct vmig_session *s = src->s;

	vmig__break_channels(s);
	if (s->rp_started) {
		pthread_join(s->rp_thread, NULL);
		s->rp_started = false;
	}
	vmig__mf_source_close(src);
	vmig__close_channels(s);
}

static int setup(struct vmig__source *src)
{
	struct vmig_session *s = src->s;
	struct vmig__err err = {{0}};
	int ret;

	ret = vmig__src_connect(src, false);
	if (ret) {
		vmig__fail(s, ret, "cannot connect");
		return ret;
	}
	if (vmig__cancelled(s)) /* cancelled while connecting */
		return -ECANCELED;
	ret = vmig__dirty_open(&src->dirty,
			       (enum vmig_dirty_tracking)vmig__param(s, VMIG_PARAM_DIRTY_TRACKING),
			       &err);
	for (unsigned i = 0; !ret && i < s->nblocks; i++) {
		ret = vmig__dirty_add_range(src->dirty, s->blocks[i].host, s->blocks[i].size, &err);
		ret = ret < 0 ? ret : 0;
	}
	if (!ret)
		ret = vmig__dirty_start(src->dirty, &err);
	if (ret) {
		vmig__fail(s, ret, "dirty tracking: %s", err.msg);
		return ret;
	}
	/* Bulk round: everything is dirty. Starting the log is the first
	 * dirty sync, as QEMU counts it. */
	for (unsigned i = 0; i < s->nblocks; i++) {
		vmig__bitmap_set_range(s->blocks[i].dirty, 0, s->blocks[i].npages);
		src->dirty_pages += s->blocks[i].npages;
	}
	src->st.ram.dirty_sync_count = 1;
	src->last_sync_ns = src->ac_start_ns = vmig__now_ns();
	return 0;
}

/* Ask the VMM for a vCPU throttle (0 = none), if it changes. */
static void set_throttle(struct vmig__source *src, unsigned percent)
{
	struct vmig_session *s = src->s;

	if (percent == src->throttle)
		return;
	src->throttle = percent;
	src->st.cpu_throttle_percentage = percent;
	s->ops.throttle(s->opaque, percent);
}

/*
 * auto-converge, as QEMU does it: over periods of at least a second, when
 * the guest dirtied more than throttle-trigger-threshold percent of what was
 * sent, twice, throttle the vCPUs (cpu-throttle-initial, then up by
 * cpu-throttle-increment each time, up to max-cpu-throttle). A guest that
 * writes faster than the link carries then slows down until it converges.
 */
static void auto_converge(struct vmig__source *src, uint64_t sent)
{
	struct vmig_session *s = src->s;
	uint64_t now = vmig__now_ns();
	unsigned max = (unsigned)vmig__param(s, VMIG_PARAM_MAX_CPU_THROTTLE), next;

	src->ac_sent += sent;
	if (!s->caps[VMIG_CAP_AUTO_CONVERGE] || now - src->ac_start_ns < 1000000000ull)
		return;
	if (src->ac_dirtied * 100 >
		src->ac_sent * (uint64_t)vmig__param(s, VMIG_PARAM_THROTTLE_TRIGGER_THRESHOLD) &&
	    ++src->dirty_high >= 2) {
		src->dirty_high = 0;
		next = src->throttle
			   ? src->throttle +
				 (unsigned)vmig__param(s, VMIG_PARAM_CPU_THROTTLE_INCREMENT)
			   : (unsigned)vmig__param(s, VMIG_PARAM_CPU_THROTTLE_INITIAL);
		set_throttle(src, next < max ? next : max);
	}
	src->ac_start_ns = now;
	src->ac_sent = src->ac_dirtied = 0;
}

/* Time to send what is dirty at the measured bandwidth, in ms. */
static uint64_t expected_downtime_ms(struct vmig__source *src)
{
	if (!src->bandwidth)
		return src->dirty_pages ? UINT64_MAX : 0;
	return src->dirty_pages * VMIG_PAGE_SIZE * 1000 / src->bandwidth;
}

/*
 * Pre-copy rounds until the rest fits in downtime-limit (returns 0) or
 * post-copy is requested (returns 1).
 */
static int iterate(struct vmig__source *src)
{
	struct vmig_session *s = src->s;

	for (;;) {
		uint64_t t0 = vmig__now_ns(), b0 = vmig__src_wire_bytes(src), dt;
		struct vmig_wire_sync sy;
		int ret = send_dirty(src, false);

		if (ret) {
			send_failed(src, ret);
			return ret;
		}
		if (__atomic_load_n(&s->postcopy_requested, __ATOMIC_ACQUIRE)) {
			ret = vmig__pc_source_prepare(src);
			return ret ? ret : 1;
		}
		dt = vmig__now_ns() - t0;
		/* Bandwidth of this round; short rounds are too noisy to use, so
		 * they fall back to the average since the start. */
		if (dt > 5000000ull && vmig__src_wire_bytes(src) > b0)
			src->bandwidth = (uint64_t)((double)(vmig__src_wire_bytes(src) - b0) * 1e9 /
						    (double)dt);
		else if (!src->bandwidth)
			src->bandwidth = (uint64_t)((double)vmig__src_wire_bytes(src) * 1e9 /
						    (double)(vmig__now_ns() - s->start_ns + 1));
		ret = vmig__src_sync_dirty(src);
		if (ret)
			return ret;
		auto_converge(src, vmig__src_wire_bytes(src) - b0);
		sy.round = ++src->sync_marks;
		sy.dirty_pages = src->dirty_pages;
		vmig__writer_rec(src->w, VMIG_REC_SYNC, &sy, sizeof(sy));
		vmig__src_stats_tick(src, true);
		if (expected_downtime_ms(src) <= (uint64_t)vmig__param(s, VMIG_PARAM_DOWNTIME_LIMIT)) {
			ret = vmig__writer_flush(src->w);
			if (!ret)
				ret = wait_drained(s, sy.round);
			if (ret)
				vmig__fail(s, ret, "destination stopped acknowledging the stream");
			/* Asked for while the last round drained: the user's
			 * choice wins over a switch the engine had picked. */
			if (!ret && __atomic_load_n(&s->postcopy_requested, __ATOMIC_ACQUIRE)) {
				ret = vmig__pc_source_prepare(src);
				return ret ? ret : 1;
			}
			/* The guest kept writing while the round drained, and
			 * what it wrote is part of the switch-over too: count
			 * it, and iterate on if the rest no longer fits. A
			 * write-heavy guest otherwise overran downtime-limit. */
			if (!ret)
				ret = vmig__src_sync_dirty(src);
			if (!ret && expected_downtime_ms(src) >
					(uint64_t)vmig__param(s, VMIG_PARAM_DOWNTIME_LIMIT)) {
				vmig__src_stats_tick(src, true);
				continue;
			}
			return ret;
		}
		if (vmig__cancelled(s)) {
			vmig__fail(s, -ECANCELED, "migration cancelled");
			return -ECANCELED;
		}
	}
}

/* The destination said it failed, and had not said it runs before that:
 * it never started (the return path is ordered), so the VM is ours. */
static bool dest_refused(struct vmig_session *s)
{
	bool refused;

	pthread_mutex_lock(&s->lock);
	refused = s->rp_error && !s->rp_resumed;
	pthread_mutex_unlock(&s->lock);
	return refused;
}

/* The destination said it runs (RESUMED): from then on the guest's newest
 * state is there, whatever happens. */
static bool dest_ran(struct vmig_session *s)
{
	bool ran;

	pthread_mutex_lock(&s->lock);
	ran = s->rp_resumed;
	pthread_mutex_unlock(&s->lock);
	return ran;
}

/* After failure or cancel before the switch: keep the VM running here. */
static void recover_source(struct vmig__source *src)
{
	struct vmig_session *s = src->s;

	set_throttle(src, 0);
	/* Restart first: unprotecting a large guest takes a while. */
	if (src->stopped_vm && src->vm_was_running) {
		s->ops.start(s->opaque);
		vmig__emit(s, VMIG_EVENT_RESUMED);
	}
	if (src->dirty)
		vmig__dirty_stop(src->dirty);
}

static void finish(struct vmig__source *src, int ret)
{
	struct vmig_session *s = src->s;

	set_throttle(src, 0);
	vmig__src_stats_tick(src, true);
	if (!ret)
		src->st.ram.remaining = 0;
	src->st.expected_downtime_ms = 0;
	src->st.total_time_ms = (int64_t)((vmig__now_ns() - s->start_ns) / 1000000);
	if (!ret) { /* as QEMU: the average over the time after setup */
		int64_t ms = VMIG_MAX(src->st.total_time_ms - src->st.setup_time_ms, 1);

		src->st.ram.mbps = vmig__mbps(src->st.ram.transferred, (uint64_t)ms * 1000000);
	}
	vmig__publish(s, &src->st);
	/* The destination runs: report that now, then release what is left. */
	if (!ret)
		vmig__set_status(s, VMIG_STATUS_COMPLETED);
	vmig__src_close_channels(src);
	if (src->dirty)
		vmig__dirty_close(src->dirty); /* the VM stays stopped: no restore */
}

void *vmig__source_thread(void *arg)
{
	struct vmig_session *s = arg;
	struct vmig__source src = {.s = s};
	int ret = -ENOMEM;

	pthread_mutex_init(&src.rl_lock, NULL);
	src.w = malloc(sizeof(*src.w));
	src.uw = malloc(sizeof(*src.uw));
	/* Here, not at the switch: unmapping 16 MiB once took 20 to 85 ms of
	 * the downtime, with each side pinned to one CPU. */
	src.state = malloc(STATE_MAX);
	if (!src.w || !src.uw || !src.state) {
		vmig__fail(s, -ENOMEM, "out of memory");
		vmig__set_status(s, VMIG_STATUS_FAILED); /* nothing was stopped */
		goto out;
	}
	src.vm_was_running = s->ops.running ? s->ops.running(s->opaque) : true;
	src.last_pub_ns = s->start_ns;
	src.st.ram.page_size = VMIG_PAGE_SIZE;
	src.st.ram.total = s->stats.ram.total;
	ret = setup(&src);
	if (!ret) {
		src.st.setup_time_ms = (int64_t)((vmig__now_ns() - s->start_ns) / 1000000);
		/* Whoever sees "active" sees the round's figures too. */
		vmig__src_stats_tick(&src, true);
		vmig__set_status(s, VMIG_STATUS_ACTIVE);
		ret = iterate(&src);
	}
	src.st.ram.precopy_bytes = vmig__src_wire_bytes(&src);
	if (ret == 1) {
		ret = vmig__pc_source_switch(&src);
		if (!ret)
			ret = vmig__pc_source_push(&src);
	} else if (!ret) {
		ret = switch_over(&src);
	}
	if (ret && __atomic_load_n(&s->committed, __ATOMIC_ACQUIRE) && !dest_refused(s) &&
	    (!vmig__in_postcopy(s) || !dest_ran(s))) {
		vmig__fail_unknown(s);
	} else if (ret) {
		vmig__fail(s, ret, "migration failed"); /* a reason, if none yet */
		if (!vmig__in_postcopy(s))
			recover_source(&src);
		/* Only now: whoever sees "failed" finds the VM running again. */
		vmig__set_status(s, vmig__cancelled(s) ? VMIG_STATUS_CANCELLED : VMIG_STATUS_FAILED);
	}
	/* Past the post-copy switch the destination may run: committed. */
	assert(!vmig__in_postcopy(s) || __atomic_load_n(&s->committed, __ATOMIC_ACQUIRE));
	finish(&src, ret);
out:
	free(src.w);
	free(src.uw);
	free(src.state);
	pthread_mutex_destroy(&src.rl_lock);
	return NULL;
}
