// SPDX-License-Identifier: MIT
/*
 * Incoming migration: the destination's migration thread. It waits for the
 * source to connect, loads records into guest RAM, checks the memory digest,
 * loads the device state, starts the vCPUs (unless told not to) and tells
 * the source it is running. With post-copy, the switch hands over to
 * pc_dest_run.c, which loads the rest while the guest runs; lib/postcopy
 * places the pages.
 *
 * A bad, truncated or hostile stream fails this migration with a message in
 * error-desc; the process and its control interface carry on, and the
 * source, which has not handed over yet, keeps running.
 *
 * After the post-copy switch the guest runs here on memory that is still
 * arriving. A lost connection pauses (postcopy-paused); any other failure
 * stops the vCPUs and leaves guest RAM registered with userfaultfd, so no
 * vCPU ever reads a page that never came: the guest stays stopped for good
 * here (ram_incomplete), and the source keeps the complete copy.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "migrate/migrate_int.h"
#include "postcopy/postcopy.h"
#include "ram/bitmap.h"

/* A preallocated block stays populated (pages are written in place). For
 * post-copy that needs MINOR faults on its file (see lib/postcopy), else
 * it is freed, to have holes to fault on. */
static bool keep_populated(const struct vmig_session *s, const struct vmig__block *b)
{
	return b->prealloc && (!s->caps[VMIG_CAP_POSTCOPY_RAM] || b->pc_minor);
}

/* Free a block's pages, so that it reads as zero and has holes to fill. */
static void clear_block(struct vmig__block *b)
{
	int ret;

	if (b->fd >= 0)
		ret = fallocate(b->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
				(off_t)b->fd_offset, (off_t)b->size);
	else if ((ret = madvise(b->host, b->size, MADV_REMOVE))) /* shared anonymous */
		ret = madvise(b->host, b->size, MADV_DONTNEED); /* private */
	if (ret)
		memset(b->host, 0, b->size);
}

/*
 * Guest RAM on the destination is defined by the stream alone. Drop what the
 * blocks hold now (a fresh VM holds zeros, an earlier failed attempt may
 * have left pages), so zero-page records need not touch untouched pages.
 */
static void reset_ram(struct vmig_session *s, struct vmig__load_block *lb)
{
	uint64_t zh = vmig__zero_page_hash();

	for (unsigned i = 0; i < s->nblocks; i++) {
		struct vmig__block *b = &s->blocks[i];
		size_t words = vmig__bitmap_words(b->npages);

		b->pc_minor = b->prealloc && !b->hpage && b->fd >= 0 &&
			      s->caps[VMIG_CAP_POSTCOPY_RAM] && vmig__pc_minor_supported();
		/* Kept populated: every page arrives in the bulk round, so old
		 * contents never survive (the loader checks that they all did). */
		lb[i].stale = keep_populated(s, b);
		if (!lb[i].stale)
			clear_block(b);
		memset(b->received, 0, words * sizeof(uint64_t));
		memset(b->zero, 0, words * sizeof(uint64_t));
		memset(b->placed, 0, words * sizeof(uint64_t));
		memset(b->installed, 0, words * sizeof(uint64_t));
		memset(b->requested, 0, words * sizeof(uint64_t));
		for (uint64_t p = 0; p < b->npages; p++)
			b->page_hash[p] = zh;
		strcpy(lb[i].name, b->name);
		lb[i].host = b->host;
		lb[i].size = b->size;
		lb[i].npages = b->npages;
		lb[i].page_hash = b->page_hash;
		lb[i].received = b->received;
		lb[i].zero = b->zero;
	}
}

/* Best effort: the source may already be gone. Any thread. */
void vmig__dest_send_rp(struct vmig_session *s, uint8_t type, const void *payload, uint32_t len)
{
	struct vmig_wire_rec rec = {.type = type, .len = len};
	struct iovec iov[2] = {{&rec, sizeof(rec)}, {(void *)payload, len}};

	pthread_mutex_lock(&s->rp_lock);
	if (s->ch)
		vmig__chan_writev(s->ch, iov, len ? 2 : 1);
	pthread_mutex_unlock(&s->rp_lock);
}

void vmig__dest_ram_figures(const struct vmig_session *s, struct vmig_stats *st,
			    const struct vmig__dest_counts *c, bool average, uint64_t *last_ns,
			    uint64_t *last_bytes)
{
	uint64_t now = vmig__now_ns();

	st->ram.transferred = c->bytes;
	st->ram.multifd_bytes = c->mf_bytes;
	st->ram.normal = c->normal;
	st->ram.normal_bytes = c->normal * VMIG_PAGE_SIZE;
	st->ram.duplicate = c->zero;
	if (average)
		st->ram.mbps = vmig__mbps(c->bytes, now - s->connected_ns);
	else if (now > *last_ns)
		st->ram.mbps = vmig__mbps(c->bytes - *last_bytes, now - *last_ns);
	st->total_time_ms = (int64_t)((now - s->start_ns) / 1000000);
	*last_ns = now;
	*last_bytes = c->bytes;
}

/* Publish the figures every 100 ms, or now if forced; at the end (EOS, a
 * failure) mbps is the average since the source connected, as in QEMU. */
static void publish_progress(struct vmig_session *s, struct vmig__loader *l,
			     struct vmig__mf_dest *mf, bool force, uint64_t *last_ns,
			     uint64_t *last_bytes)
{
	struct vmig__dest_counts c = {.normal = l->pages_normal, .zero = l->pages_zero};
	struct vmig_stats st;

	if (!force && vmig__now_ns() - *last_ns < 100000000ull)
		return;
	vmig__mf_dest_counts(mf, &c.mf_bytes, &c.normal, &c.zero);
	c.bytes = l->r->bytes + c.mf_bytes;
	pthread_mutex_lock(&s->lock);
	st = s->stats;
	pthread_mutex_unlock(&s->lock);
	vmig__dest_ram_figures(s, &st, &c, force && !l->run, last_ns, last_bytes);
	st.ram.dirty_sync_count = l->rounds;
	vmig__publish(s, &st);
}

/* After a record of the main channel: acknowledge SYNC, start multifd. */
static int after_record(struct vmig_session *s, struct vmig__loader *l, uint8_t type,
			struct vmig__mf_dest **mf)
{
	if (type == VMIG_REC_MULTIFD)
		return vmig__mf_dest_start(s, l, mf);
	if (type == VMIG_REC_SYNC && *mf) {
		vmig__mf_dest_sync(*mf, l->last_round);
	} else if (type == VMIG_REC_SYNC) {
		struct vmig_wire_sync_ack ack = {.round = l->last_round};

		vmig__dest_send_rp(s, VMIG_RP_SYNC_ACK, &ack, sizeof(ack));
	}
	return 0;
}

/*
 * Load records until EOS (0) or the post-copy switch (1). With multifd, EOS
 * on the main channel also waits for the end of every data channel. A data
 * channel's failure ends the main stream early (multifd.c): its own error
 * is the one reported.
 */
static int load_stream(struct vmig_session *s, struct vmig__loader *l, struct vmig__mf_dest **mf)
{
	uint64_t last_ns = vmig__now_ns(), last_bytes = 0;
	int ret = 0;

	vmig__set_status(s, VMIG_STATUS_ACTIVE);
	while (!ret && !l->eos && !l->run) {
		uint8_t type;

		if (vmig__cancelled(s))
			return -ECANCELED;
		ret = vmig__load_record(l, &type);
		if (!ret)
			ret = after_record(s, l, type, mf);
		publish_progress(s, l, *mf, false, &last_ns, &last_bytes);
	}
	/* At the post-copy switch the data channels stay: the push comes on
	 * them (pc_dest_run.c). */
	if (*mf && (ret || !l->run)) {
		struct vmig__err err = {{0}};
		int mret = vmig__mf_dest_finish(*mf, ret != 0, &err);

		if (mret) {
			*l->err = err;
			ret = mret;
		}
	}
	publish_progress(s, l, *mf, true, &last_ns, &last_bytes);
	return ret ? ret : l->run ? 1 : 0;
}

/* Load the device state and start; then tell the source. */
static int start_guest(struct vmig_session *s, struct vmig__loader *l, uint64_t t0_ns)
{
	struct vmig_wire_resumed res;
	int ret = s->ops.load_state(s->opaque, l->state, l->state_len);

	if (ret) {
		vmig__err_set_first(l->err, "loading device state failed (%s)", strerror(-ret));
		return ret;
	}
	if (s->autostart) {
		ret = s->ops.start(s->opaque);
		if (ret) {
			vmig__err_set_first(l->err, "cannot start the vCPUs (%s)", strerror(-ret));
			return ret;
		}
		vmig__emit(s, VMIG_EVENT_RESUMED);
	}
	res.load_us = (vmig__now_ns() - t0_ns) / 1000;
	vmig__dest_send_rp(s, VMIG_RP_RESUMED, &res, sizeof(res));
	return 0;
}

/*
 * Register guest RAM with userfaultfd for the whole incoming migration (see
 * lib/postcopy: pages are installed whole, faster than faulting them in). A
 * kernel without it still does pre-copy, writing RAM directly.
 */
static int register_ram(struct vmig_session *s, struct vmig__pc_dest **pc, struct vmig__err *err)
{
	int ret = 0;

	/* Populated RAM has no holes to install into (UFFDIO_COPY would fail
	 * with EEXIST on every page), and huge pages take no 4 KiB
	 * UFFDIO_COPY: pages are read straight into it. With post-copy, the
	 * placer still registers huge pages (at the switch) and populated
	 * blocks (at the first DISCARD). */
	for (unsigned i = 0; i < s->nblocks; i++)
		if ((keep_populated(s, &s->blocks[i]) && !s->blocks[i].pc_minor) ||
		    (s->blocks[i].hpage && !s->caps[VMIG_CAP_POSTCOPY_RAM]))
			ret = -EEXIST;
	if (!ret)
		ret = vmig__pc_dest_register(*pc, err);
	if (!ret)
		return 0;
	if (s->caps[VMIG_CAP_POSTCOPY_RAM])
		return ret; /* post-copy cannot work without it */
	vmig__err_clear(err);
	vmig__dest_pc_free(s, *pc);
	*pc = NULL;
	return 0;
}

/* The post-copy switch: take over now, load the rest while the guest runs. */
static int run_postcopy(struct vmig_session *s, struct vmig__pc_dest *pc, struct vmig__loader *l,
			struct vmig__mf_dest *mf)
{
	uint64_t t0 = vmig__now_ns();
	int ret;

	ret = s->urgent ? 0 : vmig__dest_accept_urgent(s, l->err);
	if (!ret)
		ret = vmig__pc_dest_switch(pc, l->err);
	if (ret)
		return ret;
	l->postcopy = true;
	/* Before RESUMED, after which the source pushes on them. */
	vmig__mf_dest_postcopy(mf);
	ret = start_guest(s, l, t0);
	if (ret)
		return ret;
	pthread_mutex_lock(&s->lock);
	__atomic_store_n(&s->in_postcopy, true, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&s->lock);
	vmig__set_status(s, VMIG_STATUS_POSTCOPY_ACTIVE);
	ret = vmig__dest_pc_run(s, pc, l, mf);
	if (!ret)
		vmig__dest_send_rp(s, VMIG_RP_COMPLETE, NULL, 0);
	return ret;
}

/*
 * Post-copy failed after the vCPUs started: stop them. A vCPU waiting on a
 * missing page stays blocked in its fault (the registration stays), which
 * the embedder's stop counts as stopped (vmig_vcpu_blocked).
 */
static void stop_incomplete_guest(struct vmig_session *s, struct vmig__err *err)
{
	int ret = s->ops.stop(s->opaque);

	if (ret && strlen(err->msg) < 180)
		snprintf(err->msg + strlen(err->msg), sizeof(err->msg) - strlen(err->msg),
			 "; cannot stop the vCPUs (%s)", strerror(-ret));
	pthread_mutex_lock(&s->lock);
	s->stats.ram_incomplete = true;
	pthread_mutex_unlock(&s->lock);
	vmig__emit(s, VMIG_EVENT_STOPPED);
}

static void close_all(struct vmig_session *s)
{
	/* close() sends a FIN after our last message, which the source reads. */
	vmig__close_channels(s);
	vmig__close_pending(s);
	/* One migration per migrate-incoming, as in QEMU. */
	if (s->listen_fd >= 0) {
		close(s->listen_fd);
		s->listen_fd = -1;
	}
}

void *vmig__dest_thread(void *arg)
{
	struct vmig_session *s = arg;
	struct vmig__load_block lb[VMIG_MAX_BLOCKS];
	struct vmig__err err = {{0}};
	struct vmig__reader *r = NULL;
	struct vmig__pc_dest *pc = NULL;
	struct vmig__mf_dest *mf = NULL;
	struct vmig__loader l = {0};
	bool pc_keep = false;
	int ret;

	r = malloc(sizeof(*r));
	l.bounce = malloc(VMIG_REC_MAX_PAGES * VMIG_PAGE_SIZE);
	if (!r || !l.bounce || vmig__dest_pc_new(s, &pc)) {
		vmig__err_set(&err, "out of memory");
		ret = -ENOMEM;
		goto fail;
	}
	l.r = r;
	l.err = &err;
	ret = vmig__dest_accept(s, &l, false);
	if (ret)
		goto fail;
	s->connected_ns = vmig__now_ns();
	reset_ram(s, lb);
	l.blocks = lb;
	l.nblocks = s->nblocks;
	ret = register_ram(s, &pc, &err);
	if (ret)
		goto fail;
	if (pc)
		vmig__pc_dest_hooks(pc, &l.hooks);
	l.multifd_ok = s->caps[VMIG_CAP_MULTIFD];
	ret = load_stream(s, &l, &mf);
	if (ret == 1)
		ret = run_postcopy(s, pc, &l, mf);
	else if (!ret) {
		uint64_t t0 = vmig__now_ns();

		ret = vmig__load_verify(&l);
		/* Unregister before the vCPUs run: they must not fault to us. */
		vmig__dest_pc_free(s, pc);
		pc = NULL;
		if (!ret)
			ret = start_guest(s, &l, t0);
	}
fail:
	if (ret) {
		bool started;

		if (ret == -ECANCELED)
			vmig__err_set(&err, "migration cancelled");
		if (!err.msg[0])
			vmig__err_set(&err, "%s", strerror(-ret));
		pthread_mutex_lock(&s->lock);
		started = vmig__in_postcopy(s);
		pthread_mutex_unlock(&s->lock);
		pc_keep = started;
		if (started)
			stop_incomplete_guest(s, &err);
		if (!vmig__cancelled(s))
			vmig__dest_send_rp(s, VMIG_RP_ERROR, err.msg, (uint32_t)strlen(err.msg));
		vmig__fail(s, 0, "%s", ret == -ECANCELED ? "migration cancelled" : err.msg);
	}
	vmig__mf_dest_free(mf);
	if (!pc_keep)
		vmig__dest_pc_free(s, pc); /* else freed with the session */
	vmig__loader_release(&l);
	free(l.bounce);
	free(r);
	close_all(s);
	if (!ret)
		vmig__set_status(s, VMIG_STATUS_COMPLETED);
	return NULL;
}
