// SPDX-License-Identifier: MIT
/*
 * Post-copy on the destination, the state machine: after the switch, the
 * main stream and the urgent channel are loaded side by side while the
 * guest runs, a lost connection pauses until migrate-recover and resumes
 * on new connections, and the end checks that every page arrived. Pages
 * are placed by lib/postcopy (userfaultfd), through the loader hooks.
 *
 * With multifd, the background push arrives on the data channels, each
 * loaded by its own thread (multifd.c) through the same placer; the end
 * waits for each one's EOS, and a resume connects them again.
 *
 * Threads: the migration thread runs all of this; an urgent thread loads
 * the urgent channel. struct pc_run is the migration thread's, except the
 * fields marked otherwise.
 */
#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "migrate/migrate_int.h"
#include "postcopy/postcopy.h"
#include "ram/bitmap.h"

/* How long the end of the main stream waits for answers still on the
 * urgent channel. */
#define URGENT_DRAIN_NS (10ull * 1000000000ull)

struct pc_run {
	struct vmig_session *s;
	struct vmig__pc_dest *placer;
	struct vmig__load_block *lb; /* the main loader's block views */
	struct vmig__mf_dest *mf;    /* multifd data channels, or NULL */
	bool urgent_started;
	pthread_t urgent_thread;
	bool finishing; /* atomic: the urgent channel is closed on purpose */
	/* The urgent thread's failure other than a lost connection (a bad
	 * record): written by it before it breaks the main channel (release),
	 * read by the migration thread after that (acquire) or after the join. */
	int urgent_err;
	struct vmig__err urgent_msg;

	/*
	 * Progress for query-migrate, published by the fault thread's
	 * statistics tick (publish_stats) while s->pcr points here: so the
	 * figures move on even while the main channel is idle (with multifd
	 * it carries nothing until the digest). Counts cover every
	 * connection, so that they do not fall back after a recovery.
	 */
	uint64_t main_bytes;		 /* atomic: main channel, written by the migration thread */
	uint64_t main_normal, main_zero; /* atomic: its loader's pages, likewise */
	uint64_t urgent_bytes;		 /* atomic: urgent channel, by the urgent thread */
	uint64_t main_done, urgent_done; /* bytes of connections lost before; set while no
					    thread of that channel runs */
	uint64_t switch_bytes;		 /* main and data channels at the switch; read-only */
	uint64_t last_ns, last_bytes;	 /* s->lock: the last publication, for mbps */
};

/* ---- the placer's callbacks -------------------------------------------- */

static void request_page(void *opaque, unsigned block, uint64_t first, uint32_t npages)
{
	struct vmig_wire_pages req = {.block = block, .npages = npages, .first = first};

	vmig__dest_send_rp(opaque, VMIG_RP_PAGE_REQ, &req, sizeof(req));
}

/*
 * The transfer figures after the switch, as the source counts them: every
 * channel (the urgent one too) in transferred, what came after the switch
 * in postcopy-bytes. final: mbps is the average since the source connected.
 * Called with s->lock held.
 */
static void progress_locked(struct pc_run *pc, bool final)
{
	struct vmig__dest_counts c = {
	    .normal = __atomic_load_n(&pc->main_normal, __ATOMIC_RELAXED),
	    .zero = __atomic_load_n(&pc->main_zero, __ATOMIC_RELAXED),
	};

	vmig__mf_dest_counts(pc->mf, &c.mf_bytes, &c.normal, &c.zero);
	c.bytes = __atomic_load_n(&pc->main_bytes, __ATOMIC_RELAXED) + c.mf_bytes +
		  __atomic_load_n(&pc->urgent_bytes, __ATOMIC_RELAXED);
	vmig__dest_ram_figures(pc->s, &pc->s->stats, &c, final, &pc->last_ns, &pc->last_bytes);
	pc->s->stats.ram.postcopy_bytes = c.bytes - pc->switch_bytes;
}

/* The fault thread's statistics tick (every 100 ms, and at its end). */
static void publish_stats(void *opaque, const vmig__pc_stats *st)
{
	struct vmig_session *s = opaque;

	pthread_mutex_lock(&s->lock);
	s->stats.postcopy = *st;
	if (s->pcr)
		progress_locked(s->pcr, false);
	pthread_mutex_unlock(&s->lock);
}

/* Migration thread, after each record of the main channel. */
static void note_main(struct pc_run *pc, const struct vmig__loader *l)
{
	__atomic_store_n(&pc->main_bytes, pc->main_done + l->r->bytes, __ATOMIC_RELAXED);
	__atomic_store_n(&pc->main_normal, l->pages_normal, __ATOMIC_RELAXED);
	__atomic_store_n(&pc->main_zero, l->pages_zero, __ATOMIC_RELAXED);
}

int vmig__dest_pc_new(struct vmig_session *s, struct vmig__pc_dest **out)
{
	struct vmig__pc_config cfg = {.blocks = s->blocks,
				      .nblocks = s->nblocks,
				      .postcopy_ram = s->caps[VMIG_CAP_POSTCOPY_RAM],
				      .blocktime = s->caps[VMIG_CAP_POSTCOPY_BLOCKTIME],
				      .vcpu_tid = s->vcpu_tid,
				      .nvcpus = s->nvcpus,
				      .request = request_page,
				      .publish = publish_stats,
				      .opaque = s};
	int ret = vmig__pc_dest_new(&cfg, out);

	if (ret)
		return ret;
	pthread_mutex_lock(&s->lock);
	assert(!s->pcd);
	s->pcd = *out;
	pthread_mutex_unlock(&s->lock);
	return 0;
}

void vmig__dest_pc_free(struct vmig_session *s, struct vmig__pc_dest *pc)
{
	if (!pc)
		return;
	pthread_mutex_lock(&s->lock);
	if (s->pcd == pc)
		s->pcd = NULL;
	pthread_mutex_unlock(&s->lock);
	vmig__pc_dest_free(pc);
}

/* ---- after the switch: main stream, urgent channel, pause, recovery ---- */

static void *urgent_main(void *arg)
{
	struct pc_run *pc = arg;
	struct vmig_session *s = pc->s;
	struct vmig__reader *r = malloc(sizeof(*r));
	uint8_t *bounce = malloc(VMIG_REC_MAX_PAGES * VMIG_PAGE_SIZE);
	struct vmig__err err = {{0}};
	struct vmig__loader l = {.blocks = pc->lb,
				 .nblocks = s->nblocks,
				 .err = &err,
				 .urgent = true,
				 .postcopy = true,
				 .blocks_ok = true,
				 .bounce = bounce};
	struct vmig__chan *uch;
	uint8_t type;

	pthread_mutex_lock(&s->lock);
	uch = s->urgent;
	pthread_mutex_unlock(&s->lock);
	if (r && bounce && uch) {
		int ret;

		vmig__pc_dest_hooks(pc->placer, &l.hooks);
		vmig__reader_init_chan(r, uch);
		l.r = r;
		while (!(ret = vmig__load_record(&l, &type)))
			__atomic_store_n(&pc->urgent_bytes, pc->urgent_done + r->bytes,
					 __ATOMIC_RELAXED);
		if (!vmig__net_error(ret) && !__atomic_load_n(&pc->finishing, __ATOMIC_ACQUIRE)) {
			pc->urgent_msg = err;
			__atomic_store_n(&pc->urgent_err, ret, __ATOMIC_RELEASE);
		}
	}
	/* Wake the main loader: losing the urgent channel means the connection
	 * is gone (pause); a bad record on it fails the migration, and then
	 * the main channel must still carry RP_ERROR (so only its reading side
	 * is shut). */
	pthread_mutex_lock(&s->lock);
	if (s->ch && !__atomic_load_n(&pc->finishing, __ATOMIC_ACQUIRE))
		vmig__chan_shutdown(s->ch, __atomic_load_n(&pc->urgent_err, __ATOMIC_ACQUIRE)
					       ? SHUT_RD
					       : SHUT_RDWR);
	pthread_mutex_unlock(&s->lock);
	free(bounce);
	free(r);
	return NULL;
}

/* Shut the urgent channel and join its thread (the channel stays until
 * closed with the others). */
static void stop_urgent(struct pc_run *pc)
{
	struct vmig_session *s = pc->s;

	/* On purpose: the urgent thread must not take it for a lost link
	 * and break the main channel, which still has to carry RP_ERROR. */
	__atomic_store_n(&pc->finishing, true, __ATOMIC_RELEASE);
	pthread_mutex_lock(&s->lock);
	if (s->urgent)
		vmig__chan_shutdown(s->urgent, SHUT_RDWR);
	pthread_mutex_unlock(&s->lock);
	if (pc->urgent_started) {
		pthread_join(pc->urgent_thread, NULL);
		pc->urgent_started = false;
	}
	pc->lb = NULL;
}

static void close_channels(struct pc_run *pc)
{
	struct vmig__err scratch = {{0}};

	vmig__break_channels(pc->s);
	if (pc->urgent_started) {
		pthread_join(pc->urgent_thread, NULL);
		pc->urgent_started = false;
	}
	vmig__mf_dest_finish(pc->mf, true, &scratch); /* joins the loaders */
	vmig__close_channels(pc->s);
}

static int start_urgent(struct pc_run *pc)
{
	int ret;

	/* Its last thread, if any, is joined: it counts on from there. */
	pc->urgent_done = __atomic_load_n(&pc->urgent_bytes, __ATOMIC_RELAXED);
	ret = pthread_create(&pc->urgent_thread, NULL, urgent_main, pc);

	if (ret)
		return -ret;
	pthread_setname_np(pc->urgent_thread, "vmig-urgent");
	pc->urgent_started = true;
	return 0;
}

static int send_bitmaps(struct pc_run *pc)
{
	struct vmig_session *s = pc->s;

	for (unsigned bi = 0; bi < s->nblocks; bi++) {
		struct vmig__block *b = &s->blocks[bi];
		size_t words = vmig__bitmap_words(b->npages);
		size_t len = sizeof(struct vmig_wire_recv_bitmap) + words * 8;
		uint8_t *buf = malloc(len);
		struct vmig_wire_recv_bitmap hdr = {.block = bi, .npages = b->npages};

		if (!buf)
			return -ENOMEM;
		memcpy(buf, &hdr, sizeof(hdr));
		for (size_t w = 0; w < words; w++) {
			/* A huge page's received pages wait in the file for the
			 * rest of it (lib/postcopy): they are here too. */
			uint64_t have =
			    __atomic_load_n(&b->placed[w], __ATOMIC_ACQUIRE) |
			    (__atomic_load_n(&b->received[w], __ATOMIC_ACQUIRE) &
			     (b->hpage ? ~0ull : __atomic_load_n(&b->zero[w], __ATOMIC_ACQUIRE)));
			memcpy(buf + sizeof(hdr) + w * 8, &have, 8);
		}
		vmig__dest_send_rp(s, VMIG_RP_RECV_BITMAP, buf, (uint32_t)len);
		free(buf);
	}
	/* Faults still waiting: ask again on the new connection. */
	vmig__pc_dest_rerequest(pc->placer);
	return 0;
}

/* Connection lost after the switch: wait for migrate-recover, reconnect. */
static int pause_and_recover(struct pc_run *pc, struct vmig__loader *l)
{
	struct vmig_session *s = pc->s;
	int ret;

	close_channels(pc);
	/* The next main connection counts from its start. */
	pc->main_done = __atomic_load_n(&pc->main_bytes, __ATOMIC_RELAXED);
	vmig__set_status(s, VMIG_STATUS_POSTCOPY_PAUSED);
	for (;;) {
		ret = vmig__wait_recover(s); /* listen_fd is ours from here */
		if (ret)
			return ret;
		/* All channels, in whatever order they come; strays are dropped. */
		ret = vmig__dest_accept(s, l, true);
		if (!ret && !s->urgent)
			ret = vmig__dest_accept_urgent(s, l->err);
		if (!ret)
			ret = vmig__mf_dest_resume(pc->mf, l->err);
		close(s->listen_fd);
		s->listen_fd = -1;
		vmig__close_pending(s);
		if (ret != -ETIMEDOUT && ret != -EPIPE)
			break;
		/* The source's connections did not all come: this recovery
		 * failed, not the migration. Paused again, for the next one. */
		vmig__err_clear(l->err);
		close_channels(pc);
		vmig__set_status(s, VMIG_STATUS_POSTCOPY_PAUSED);
	}
	if (ret)
		return ret;
	l->have_digest = false;
	l->eos = false;
	ret = send_bitmaps(pc);
	if (!ret)
		ret = start_urgent(pc);
	if (!ret)
		vmig__set_status(s, VMIG_STATUS_POSTCOPY_ACTIVE);
	return ret;
}

/* Every page must now be in place or a known zero page. */
static int check_complete(struct pc_run *pc, struct vmig__err *err)
{
	struct vmig_session *s = pc->s;

	for (unsigned bi = 0; bi < s->nblocks; bi++) {
		struct vmig__block *b = &s->blocks[bi];

		for (size_t w = 0; w < vmig__bitmap_words(b->npages); w++) {
			/* The fault thread may still place known zero pages, and
			 * the urgent thread may still mark pages of a populated
			 * block received (pc_dest.c, install). */
			uint64_t have = __atomic_load_n(&b->placed[w], __ATOMIC_ACQUIRE) |
					(__atomic_load_n(&b->received[w], __ATOMIC_ACQUIRE) &
					 __atomic_load_n(&b->zero[w], __ATOMIC_ACQUIRE));
			uint64_t want = w == b->npages / 64 && b->npages % 64
					    ? (1ull << (b->npages % 64)) - 1
					    : ~0ull;

			if ((have & want) != want) {
				vmig__err_set(
				    err, "RAM block '%s' page %llu never arrived", b->name,
				    (unsigned long long)(w * 64 +
							 (unsigned)__builtin_ctzll(~have & want)));
				return -EIO;
			}
		}
	}
	return 0;
}

/* The urgent thread failed on a bad record: that is the error to report. */
static int urgent_failure(struct pc_run *pc, struct vmig__err *err)
{
	int ret = __atomic_load_n(&pc->urgent_err, __ATOMIC_ACQUIRE);

	if (ret) {
		vmig__err_clear(err);
		vmig__err_set(err, "urgent channel: %s", pc->urgent_msg.msg);
	}
	return ret;
}

/*
 * Load the main stream after the switch until EOS. A lost connection pauses
 * and waits for recovery; anything else (a bad record on either channel)
 * is returned, with the urgent thread joined: nothing may use the loaders
 * once this returns.
 */
static int load_rest(struct pc_run *pc, struct vmig__loader *l)
{
	int ret = start_urgent(pc);

	while (!ret) {
		uint8_t type;
		int mf_err;

		ret = vmig__load_record(l, &type);
		if (!ret)
			note_main(pc, l);
		/* Multifd: the push ends with EOS on each data channel too. */
		if (!ret && l->eos)
			ret = vmig__mf_dest_finish(pc->mf, false, l->err);
		if (!ret && l->eos)
			return 0;
		if (!ret)
			continue;
		if (urgent_failure(pc, l->err))
			ret = pc->urgent_err;
		else if ((mf_err = vmig__mf_dest_failure(pc->mf, l->err)))
			ret = mf_err;
		else if (vmig__net_error(ret)) {
			vmig__err_clear(l->err);
			ret = pause_and_recover(pc, l);
		}
	}
	stop_urgent(pc);		/* the main channel stays, for RP_ERROR */
	if (urgent_failure(pc, l->err)) /* it may have lost the race to say so */
		ret = pc->urgent_err;
	return ret;
}

static int run(struct pc_run *pc, struct vmig__loader *l)
{
	struct vmig__pc_dest *placer = pc->placer;
	int ret;

	ret = load_rest(pc, l);
	if (ret)
		return ret;
	/*
	 * The main channel ended, but pages the source sent in answer to
	 * requests travel on the urgent channel, which the push skips: some
	 * may still be on their way (many, after a resume re-asks for every
	 * page a fault waits on). Let the urgent thread place them before
	 * that channel goes; bounded, in case the link is gone.
	 */
	for (uint64_t end = vmig__now_ns() + URGENT_DRAIN_NS; vmig__now_ns() < end;) {
		struct vmig__err scratch = {{0}};

		if (!check_complete(pc, &scratch) ||
		    __atomic_load_n(&pc->urgent_err, __ATOMIC_ACQUIRE))
			break;
		usleep(1000);
	}
	__atomic_store_n(&pc->finishing, true, __ATOMIC_RELEASE);
	stop_urgent(pc);
	ret = urgent_failure(pc, l->err);
	if (!ret)
		ret = check_complete(pc, l->err);
	if (!ret)
		ret = vmig__load_verify(l);
	/* On failure the fault thread stays: a vCPU may wait on a page that
	 * never came, and the embedder's stop must see it blocked. */
	if (!ret)
		vmig__pc_dest_stop_faults(placer);
	vmig__pc_dest_publish(placer);
	return ret;
}

int vmig__dest_pc_run(struct vmig_session *s, struct vmig__pc_dest *placer, struct vmig__loader *l,
		      struct vmig__mf_dest *mf)
{
	struct pc_run pc = {.s = s, .placer = placer, .lb = l->blocks, .mf = mf};
	uint64_t mf_bytes = 0, normal = 0, zero = 0;
	int ret;

	vmig__mf_dest_counts(mf, &mf_bytes, &normal, &zero);
	pc.switch_bytes = l->r->bytes + mf_bytes;
	note_main(&pc, l);
	pthread_mutex_lock(&s->lock);
	s->pcr = &pc;
	pthread_mutex_unlock(&s->lock);
	ret = run(&pc, l);
	/* The fault thread may go on (after a failure): not with this. */
	pthread_mutex_lock(&s->lock);
	progress_locked(&pc, true);
	s->pcr = NULL;
	pthread_mutex_unlock(&s->lock);
	return ret;
}
