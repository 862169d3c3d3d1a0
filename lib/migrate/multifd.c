// SPDX-License-Identifier: MIT
/*
 * Multifd: pages over several connections at once (QEMU's
 * capability "multifd" and parameter "multifd-channels").
 *
 * The main connection keeps the control records (block list, SYNC, device
 * state, digest, end) and the return path; after its MULTIFD record it
 * carries no page. Each data channel has a thread on both sides. Pages are
 * dealt by chunk (format.h: 64 pages, one dirty-bitmap word, chunk % N), so
 * a page always takes the same connection: its copies arrive in the order
 * they were sent, with no sequencing between channels, and the threads on
 * either side never share a bitmap word.
 *
 * Source: for each round the migration thread syncs the dirty bitmap while
 * the channel threads are idle, then lets them run; each one sends the
 * dirty pages of its chunks, ends its share with SYNC(round) (or EOS after
 * the final round) and reports back. Destination: a loader thread per
 * channel reads until EOS. The destination acknowledges SYNC round k once
 * every channel, the main one included, has loaded its SYNC(k).
 *
 * With multifd-compression zstd, each channel's writer compresses its runs
 * of pages (writer.c) and each receiving loader decompresses them; a run
 * that does not shrink goes uncompressed.
 *
 * With zero-copy-send, each channel's writer sends from guest RAM with
 * MSG_ZEROCOPY (writer.c) and, at the end of its share of a round, waits
 * until the kernel is done with all of it, as QEMU does at each sync. A
 * page written meanwhile is dirty in the next round, as it would be with a
 * copying send, and its copies stay in order on its one connection.
 *
 * With post-copy (as QEMU 10.1 allows), the background push after the
 * switch travels on the data channels too, each pushing its own chunks,
 * nearest the latest fault first, then EOS; requested pages keep the
 * urgent channel. Before the source's first DISCARD every channel's pages
 * must be loaded (a stale copy loaded after a DISCARD would stand for the
 * page), so each SYNC the main channel waits for is also sent on every
 * data channel (a round with no pages when they have none to send). On
 * the destination, the loaders switch to the placer at POSTCOPY_RUN; they
 * are idle then, since nothing is sent on them between the last SYNC and
 * the push. A lost connection pauses as in post-copy without multifd, and
 * the resume connects the data channels again.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "migrate/migrate_int.h"
#include "ram/bitmap.h"

/* ---- source ------------------------------------------------------------ */

#define NO_HINT UINT64_MAX

/* What the channels are asked to do. */
enum mf_job {
	MF_ROUND, /* their dirty pages, then SYNC(round), or EOS if final */
	MF_MARK,  /* SYNC(round) alone */
	MF_PUSH,  /* post-copy: push their pages until none is left, then EOS */
};

struct mf_send {
	struct vmig__mf_source *mf;
	unsigned idx;
	bool started;
	bool busy; /* under mf->lock: its share of the current job is not done */
	pthread_t thread;
	uint64_t counts[2]; /* atomic: pages, zero pages queued (writer.counts) */
	uint64_t hint;	    /* atomic: (block << 48 | word) to push next, or NO_HINT */
	struct vmig__writer w;
};

struct vmig__mf_source {
	struct vmig__source *src;
	unsigned n;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	/* under lock: what the channels are asked to do */
	uint64_t gen; /* bumped once per job */
	enum mf_job job;
	uint64_t round;
	bool final;
	bool quit;     /* also read without the lock by a push (atomic) */
	unsigned busy; /* channels still on this job */
	int err;       /* first channel error of this job */
	/* migration thread only: the last round the channels sent SYNC for */
	uint64_t synced;
	/* atomic: shares whose zero-copy sends the kernel all copied anyway */
	uint64_t missed_zero_copy;
	/* migration thread only: counts already added to src->st */
	uint64_t seen[2];
	struct mf_send *ch;
};

/* Send the runs of pages set in bits, taken from word wi of block bi. */
static void send_bits(struct mf_send *c, unsigned bi, uint64_t wi, uint64_t bits)
{
	struct vmig__source *src = c->mf->src;

	__atomic_sub_fetch(&src->dirty_pages, (uint64_t)__builtin_popcountll(bits),
			   __ATOMIC_RELAXED);
	while (bits) {
		unsigned lo = (unsigned)__builtin_ctzll(bits);
		uint64_t rest = ~(bits >> lo);
		unsigned len = rest ? (unsigned)__builtin_ctzll(rest) : 64;
		uint64_t first = wi * 64 + lo;

		vmig__src_send_run(src, &c->w, bi, first, first + len, true);
		bits = lo + len >= 64 ? 0 : bits & (~0ull << (lo + len));
	}
}

/* Pre-copy: one bitmap word, cleared as it is sent (no other thread
 * touches this channel's words). */
static void send_word(struct mf_send *c, unsigned bi, uint64_t wi)
{
	uint64_t *word = &c->mf->src->s->blocks[bi].dirty[wi];
	uint64_t bits = *word;

	*word = 0;
	send_bits(c, bi, wi, bits);
}

/*
 * Post-copy: the next word of this channel's chunks with a page to push,
 * at or after word *wi of block *bi, wrapping once; false if none is left.
 * RAM and its bitmaps only lose bits after the switch, so a pass that finds
 * none is final.
 */
static bool next_word(struct mf_send *c, unsigned *bi, uint64_t *wi)
{
	struct vmig_session *s = c->mf->src->s;

	for (unsigned n = 0; n <= s->nblocks; n++) {
		struct vmig__block *b = &s->blocks[*bi];
		size_t words = vmig__bitmap_words(b->npages);

		for (; *wi < words; *wi += c->mf->n)
			if (__atomic_load_n(&b->dirty[*wi], __ATOMIC_RELAXED))
				return true;
		*bi = (*bi + 1) % s->nblocks;
		*wi = c->idx;
	}
	return false;
}

/* Post-copy: push this channel's pages. Whoever clears a dirty bit sends
 * the page (the return-path thread clears the bits of requested pages). */
static void push_share(struct mf_send *c)
{
	struct vmig__mf_source *mf = c->mf;
	struct vmig_session *s = mf->src->s;
	unsigned bi = 0;
	uint64_t wi = c->idx;

	while (!c->w.err && !__atomic_load_n(&mf->quit, __ATOMIC_ACQUIRE)) {
		uint64_t hint = __atomic_exchange_n(&c->hint, NO_HINT, __ATOMIC_RELAXED);

		if (hint != NO_HINT) { /* checked by vmig__mf_source_hint */
			bi = (unsigned)(hint >> 48);
			wi = hint & ((1ull << 48) - 1);
		}
		if (!next_word(c, &bi, &wi))
			break;
		send_bits(c, bi, wi,
			  __atomic_exchange_n(&s->blocks[bi].dirty[wi], 0, __ATOMIC_RELAXED));
		wi += mf->n;
	}
}

/* One channel's share of a job: its pages (or none), then SYNC or EOS. */
static int send_share(struct mf_send *c, enum mf_job job, uint64_t round, bool final)
{
	struct vmig_session *s = c->mf->src->s;
	bool copied;
	int ret;

	for (unsigned bi = 0; job == MF_ROUND && bi < s->nblocks && !c->w.err; bi++) {
		struct vmig__block *b = &s->blocks[bi];
		size_t words = vmig__bitmap_words(b->npages);

		for (uint64_t wi = c->idx; wi < words && !c->w.err; wi += c->mf->n) {
			/* The switch is asked for: it comes first, and the pages
			 * left dirty go in post-copy (never in the final round of
			 * a pre-copy switch-over: those pages must all go). */
			if (!final && __atomic_load_n(&s->postcopy_requested, __ATOMIC_ACQUIRE))
				break;
			if (b->dirty[wi])
				send_word(c, bi, wi);
		}
	}
	if (job == MF_PUSH) {
		/* A page request is served on the return-path thread, maybe
		 * on this core: it comes first, and waits for a write in
		 * progress to end at most. */
		vmig__thread_background();
		c->w.flush_bytes = VMIG_WRITER_FLUSH_BYTES_POSTCOPY;
		push_share(c);
	}
	if (__atomic_load_n(&c->mf->quit, __ATOMIC_ACQUIRE))
		return -ECANCELED;
	if (final || job == MF_PUSH) {
		vmig__writer_rec(&c->w, VMIG_REC_EOS, NULL, 0);
	} else {
		struct vmig_wire_sync sy = {.round = round};

		vmig__writer_rec(&c->w, VMIG_REC_SYNC, &sy, sizeof(sy));
	}
	/* With zero-copy-send, as QEMU at each sync: the kernel is done with
	 * every page of this round before the next one may send it again. */
	ret = vmig__writer_drain(&c->w, &copied);
	if (copied)
		__atomic_add_fetch(&c->mf->missed_zero_copy, 1, __ATOMIC_RELAXED);
	return ret;
}

static void *send_thread(void *arg)
{
	struct mf_send *c = arg;
	struct vmig__mf_source *mf = c->mf;
	uint64_t gen = 0;

	for (;;) {
		enum mf_job job;
		uint64_t round;
		bool final;
		int ret;

		pthread_mutex_lock(&mf->lock);
		while (mf->gen == gen && !mf->quit)
			pthread_cond_wait(&mf->cond, &mf->lock);
		if (mf->quit) {
			pthread_mutex_unlock(&mf->lock);
			return NULL;
		}
		gen = mf->gen;
		job = mf->job;
		round = mf->round;
		final = mf->final;
		pthread_mutex_unlock(&mf->lock);

		ret = send_share(c, job, round, final);

		pthread_mutex_lock(&mf->lock);
		if (ret && !mf->err)
			mf->err = ret;
		c->busy = false;
		if (!--mf->busy)
			pthread_cond_broadcast(&mf->cond);
		pthread_mutex_unlock(&mf->lock);
		/* One channel down fails the migration before the switch, and
		 * pauses it after. The others, and the main channel, may be
		 * blocked on a destination that will never read them again:
		 * free them. */
		if (ret && ret != -ECANCELED)
			vmig__break_channels(mf->src->s);
	}
}

/* Connect channel i and queue its preamble; the channel is kept in the
 * session. */
static int connect_one(struct vmig__mf_source *mf, unsigned i, const struct vmig__uri *u,
		       bool resume, struct vmig__err *err)
{
	struct vmig_session *s = mf->src->s;
	struct mf_send *c = &mf->ch[i];
	struct vmig__chan *ch;
	int ret = vmig__chan_connect(u, &s->tls, vmig__connect_wake_fd(s, resume), &ch, err);

	if (ret)
		return ret;
	pthread_mutex_lock(&s->lock);
	s->mf_chans[i] = ch;
	s->mf_count = i + 1;
	pthread_mutex_unlock(&s->lock);
	c->mf = mf;
	c->idx = i;
	vmig__writer_init(&c->w, ch);
	c->w.throttle = vmig__src_throttle;
	c->w.throttle_opaque = mf->src;
	c->w.counts = c->counts;
	switch (vmig__param(s, VMIG_PARAM_MULTIFD_COMPRESSION)) {
	case VMIG_COMPRESS_ZSTD:
		ret = vmig__writer_compress(&c->w, false,
					    (int)vmig__param(s, VMIG_PARAM_MULTIFD_ZSTD_LEVEL));
		break;
	case VMIG_COMPRESS_ZLIB:
		ret = vmig__writer_compress(&c->w, true,
					    (int)vmig__param(s, VMIG_PARAM_MULTIFD_ZLIB_LEVEL));
		break;
	}
	if (ret) {
		vmig__err_set(err, "cannot set up multifd compression");
		return ret;
	}
	c->hint = NO_HINT;
	vmig__writer_preamble(
	    &c->w, VMIG_CHAN_MULTIFD,
	    (uint16_t)(i << VMIG_PRE_F_INDEX_SHIFT | (resume ? VMIG_PRE_F_RESUME : 0)),
	    s->session_id);
	ret = vmig__writer_flush(&c->w);
	if (ret) {
		vmig__err_set(err, "multifd channel %u: %s", i, strerror(-ret));
		return ret;
	}
	if (s->caps[VMIG_CAP_ZERO_COPY_SEND]) {
		ret = vmig__writer_zerocopy(&c->w, err);
		if (ret)
			return ret;
	}
	ret = -pthread_create(&c->thread, NULL, send_thread, c);
	if (ret) {
		vmig__err_set(err, "cannot start multifd thread: %s", strerror(-ret));
		return ret;
	}
	pthread_setname_np(c->thread, "vmig-mf-send");
	c->started = true;
	return 0;
}

int vmig__mf_source_open(struct vmig__source *src, bool resume, struct vmig__err *err)
{
	struct vmig_session *s = src->s;
	unsigned n = (unsigned)vmig__param(s, VMIG_PARAM_MULTIFD_CHANNELS);
	struct vmig__mf_source *mf = calloc(1, sizeof(*mf));
	struct vmig__uri u;
	int ret;

	if (!mf || !(mf->ch = calloc(n, sizeof(*mf->ch)))) {
		free(mf);
		vmig__err_set(err, "out of memory for %u multifd channels", n);
		return -ENOMEM;
	}
	mf->src = src;
	mf->n = n;
	pthread_mutex_init(&mf->lock, NULL);
	pthread_cond_init(&mf->cond, NULL);
	src->mf = mf; /* from here on vmig__mf_source_close() cleans up */
	ret = vmig__uri_parse(s->uri, &u, err);
	for (unsigned i = 0; !ret && i < n; i++)
		ret = connect_one(mf, i, &u, resume, err);
	return ret;
}

static void start_job(struct vmig__mf_source *mf, enum mf_job job, uint64_t round, bool final)
{
	pthread_mutex_lock(&mf->lock);
	mf->job = job;
	mf->round = round;
	mf->final = final;
	mf->busy = mf->n;
	for (unsigned i = 0; i < mf->n; i++)
		mf->ch[i].busy = true;
	mf->err = 0;
	mf->gen++;
	pthread_cond_broadcast(&mf->cond);
	pthread_mutex_unlock(&mf->lock);
	if (job != MF_PUSH)
		mf->synced = round;
}

/*
 * A data channel whose share is still being sent, closed by the other end:
 * the destination lost it, or a relay on the way did before the
 * destination ever saw it. No write need fail then: once its window is
 * full, the send thread would wait for good. Fail the job and free it.
 * (The destination writes nothing on a data channel, and closes one only
 * once it reads no more; at its end that is after every share is done.)
 */
static void check_lost(struct vmig__mf_source *mf)
{
	struct vmig_session *s = mf->src->s;
	bool busy[VMIG_MAX_MULTIFD];
	unsigned lost = mf->n;
	bool failing;

	pthread_mutex_lock(&mf->lock);
	failing = mf->err != 0; /* the job ends anyway: no second 1 s wait */
	for (unsigned i = 0; i < mf->n; i++)
		busy[i] = mf->ch[i].busy;
	pthread_mutex_unlock(&mf->lock);
	if (failing)
		return;
	pthread_mutex_lock(&s->lock);
	for (unsigned i = 0; i < mf->n && lost == mf->n; i++)
		if (busy[i] && i < s->mf_count && s->mf_chans[i] &&
		    vmig__chan_peer_closed(s->mf_chans[i]))
			lost = i;
	pthread_mutex_unlock(&s->lock);
	if (lost == mf->n)
		return;
	/* A destination that failed gives its reason first. */
	if (!vmig__src_rp_ended(s, 1000))
		vmig__note_err(s, "multifd channel %u: the destination closed the connection",
			       lost);
	pthread_mutex_lock(&mf->lock);
	if (!mf->err)
		mf->err = -EPIPE;
	pthread_mutex_unlock(&mf->lock);
	vmig__break_channels(s);
}

int vmig__mf_source_wait(struct vmig__source *src, unsigned timeout_ms, int *err)
{
	struct vmig__mf_source *mf = src->mf;
	struct timespec ts;
	bool done;

	vmig__cond_deadline(&ts, timeout_ms);
	pthread_mutex_lock(&mf->lock);
	while (mf->busy && pthread_cond_timedwait(&mf->cond, &mf->lock, &ts) != ETIMEDOUT)
		;
	done = !mf->busy;
	*err = mf->err;
	pthread_mutex_unlock(&mf->lock);
	if (!done)
		check_lost(mf);
	return done;
}

/* Start a job and wait for it, publishing progress now and then. */
static int run_job(struct vmig__source *src, enum mf_job job, uint64_t round, bool final)
{
	int err;

	start_job(src->mf, job, round, final);
	while (!vmig__mf_source_wait(src, 50, &err))
		vmig__src_stats_tick(src, false);
	return err;
}

int vmig__mf_source_round(struct vmig__source *src, uint64_t round, bool final)
{
	return run_job(src, MF_ROUND, round, final);
}

int vmig__mf_source_mark(struct vmig__source *src, uint64_t round)
{
	return src->mf->synced >= round ? 0 : run_job(src, MF_MARK, round, false);
}

void vmig__mf_source_push(struct vmig__source *src)
{
	start_job(src->mf, MF_PUSH, 0, false);
}

void vmig__mf_source_hint(struct vmig__source *src, unsigned bi, uint64_t pfn)
{
	struct vmig__mf_source *mf = src->mf;
	uint64_t wi = pfn / 64;

	if (bi < src->s->nblocks && pfn < src->s->blocks[bi].npages)
		__atomic_store_n(&mf->ch[wi % mf->n].hint, (uint64_t)bi << 48 | wi,
				 __ATOMIC_RELAXED);
}

void vmig__mf_source_collect(struct vmig__source *src)
{
	struct vmig__mf_source *mf = src->mf;
	uint64_t sum[2] = {0, 0};

	for (unsigned i = 0; i < mf->n; i++)
		for (int k = 0; k < 2; k++)
			sum[k] += __atomic_load_n(&mf->ch[i].counts[k], __ATOMIC_RELAXED);
	src->st.ram.normal += sum[0] - mf->seen[0];
	src->st.ram.normal_bytes += (sum[0] - mf->seen[0]) * VMIG_PAGE_SIZE;
	src->st.ram.duplicate += sum[1] - mf->seen[1];
	src->st.ram.multifd_bytes = vmig__mf_source_bytes(src);
	src->st.ram.dirty_sync_missed_zero_copy =
	    src->mf_done[1] + __atomic_load_n(&mf->missed_zero_copy, __ATOMIC_RELAXED);
	mf->seen[0] = sum[0];
	mf->seen[1] = sum[1];
}

uint64_t vmig__mf_source_bytes(struct vmig__source *src)
{
	struct vmig__mf_source *mf = src->mf;
	uint64_t bytes = src->mf_done[0];

	for (unsigned i = 0; mf && i < mf->n; i++)
		bytes += __atomic_load_n(&mf->ch[i].w.bytes, __ATOMIC_RELAXED);
	return bytes;
}

/* The connections are shut down already (vmig__break_channels). */
void vmig__mf_source_close(struct vmig__source *src)
{
	struct vmig__mf_source *mf = src->mf;

	if (!mf)
		return;
	pthread_mutex_lock(&mf->lock);
	__atomic_store_n(&mf->quit, true, __ATOMIC_RELEASE);
	pthread_cond_broadcast(&mf->cond);
	pthread_mutex_unlock(&mf->lock);
	for (unsigned i = 0; i < mf->n; i++) {
		if (mf->ch[i].started)
			pthread_join(mf->ch[i].thread, NULL);
		vmig__writer_release(&mf->ch[i].w);
	}
	vmig__mf_source_collect(src);
	/* A post-copy recovery opens new channels: keep counting from here. */
	src->mf_done[0] = src->st.ram.multifd_bytes;
	src->mf_done[1] = src->st.ram.dirty_sync_missed_zero_copy;
	pthread_cond_destroy(&mf->cond);
	pthread_mutex_destroy(&mf->lock);
	free(mf->ch);
	free(mf);
	src->mf = NULL;
}

/* ---- destination ------------------------------------------------------- */

struct mf_recv {
	struct vmig__mf_dest *mf;
	unsigned idx;
	bool started;
	bool busy; /* under mf->lock: its share of the current job is not done */
	pthread_t thread;
	int ret;
	struct vmig__err err;
	struct vmig__reader *r;
	struct vmig__loader l;
	/* atomic: published for statistics and acknowledgements; bytes
	 * counts every connection this channel had (after a recovery too) */
	uint64_t round, bytes, normal, zero;
	uint64_t done; /* bytes of its earlier connections: set before its thread starts */
};

struct vmig__mf_dest {
	struct vmig_session *s;
	unsigned n;
	pthread_mutex_t lock; /* acked, main_round, failed */
	uint64_t main_round;
	uint64_t acked;
	int failed; /* index of the first channel that failed, or -1 */
	bool postcopy; /* atomic: the loaders place pages (after the switch) */
	struct mf_recv *ch;
};

/* Acknowledge the SYNC round every channel has reached, if it moved on. */
static void ack(struct vmig__mf_dest *mf)
{
	uint64_t low;

	pthread_mutex_lock(&mf->lock);
	low = mf->main_round;
	for (unsigned i = 0; i < mf->n; i++) {
		uint64_t r = __atomic_load_n(&mf->ch[i].round, __ATOMIC_RELAXED);

		low = r < low ? r : low;
	}
	if (low > mf->acked) {
		struct vmig_wire_sync_ack a = {.round = low};

		mf->acked = low;
		vmig__dest_send_rp(mf->s, VMIG_RP_SYNC_ACK, &a, sizeof(a));
	}
	pthread_mutex_unlock(&mf->lock);
}

static void *recv_thread(void *arg)
{
	struct mf_recv *c = arg;
	struct vmig_session *s = c->mf->s;

	while (!c->l.eos) {
		uint8_t type;

		c->ret = vmig__load_record(&c->l, &type);
		if (c->ret)
			break;
		__atomic_store_n(&c->bytes, c->done + c->r->bytes, __ATOMIC_RELAXED);
		__atomic_store_n(&c->normal, c->l.pages_normal, __ATOMIC_RELAXED);
		__atomic_store_n(&c->zero, c->l.pages_zero, __ATOMIC_RELAXED);
		if (type == VMIG_REC_SYNC) {
			__atomic_store_n(&c->round, c->l.last_round, __ATOMIC_RELAXED);
			ack(c->mf);
		}
	}
	if (c->ret) {
		pthread_mutex_lock(&c->mf->lock);
		if (c->mf->failed < 0)
			c->mf->failed = (int)c->idx;
		pthread_mutex_unlock(&c->mf->lock);
		/* The main thread may be blocked reading: end its stream, so it
		 * fails and reports this channel's error (or, in post-copy, a
		 * lost connection pauses). */
		pthread_mutex_lock(&s->lock);
		if (s->ch)
			vmig__chan_shutdown(s->ch, SHUT_RD);
		pthread_mutex_unlock(&s->lock);
	}
	return NULL;
}

/* A loader thread on data channel i (s->mf_chans[i]), from its next record. */
static int run_one(struct vmig__mf_dest *mf, unsigned i)
{
	struct mf_recv *c = &mf->ch[i];
	int ret;

	/* No thread of this channel runs now: the last one was joined. */
	c->done = __atomic_load_n(&c->bytes, __ATOMIC_RELAXED);
	pthread_mutex_lock(&mf->s->lock);
	vmig__reader_init_chan(c->r, mf->s->mf_chans[i]);
	pthread_mutex_unlock(&mf->s->lock);
	c->ret = 0;
	vmig__err_clear(&c->err);
	c->l.eos = false;
	ret = -pthread_create(&c->thread, NULL, recv_thread, c);
	if (ret)
		return ret;
	pthread_setname_np(c->thread, "vmig-mf-recv");
	c->started = true;
	return 0;
}

/* For vmig__dest_accept_side: are all n data channels of this migration kept? */
static bool all_here(void *arg)
{
	struct vmig__mf_dest *mf = arg;
	struct vmig_session *s = mf->s;
	unsigned i;

	pthread_mutex_lock(&s->lock);
	for (i = 0; i < mf->n; i++)
		if (!s->mf_chans[i] || !vmig__sid_eq(s->mf_session[i], s->session_id))
			break;
	pthread_mutex_unlock(&s->lock);
	return i == mf->n;
}

static int start_one(struct vmig__mf_dest *mf, unsigned i, const struct vmig__loader *main)
{
	struct mf_recv *c = &mf->ch[i];
	int ret;

	c->mf = mf;
	c->idx = i;
	c->r = malloc(sizeof(*c->r));
	c->l.bounce = malloc(VMIG_REC_MAX_PAGES * VMIG_PAGE_SIZE);
	if (!c->r || !c->l.bounce)
		return -ENOMEM;
	c->l.r = c->r;
	c->l.blocks = main->blocks;
	c->l.nblocks = main->nblocks;
	c->l.err = &c->err;
	c->l.hooks = main->hooks;
	c->l.blocks_ok = true;
	c->l.mf_data = true;
	c->l.mf_index = i;
	c->l.mf_channels = mf->n;
	c->l.postcopy_flag = &mf->postcopy;
	ret = run_one(mf, i);
	return ret;
}

int vmig__mf_dest_start(struct vmig_session *s, struct vmig__loader *main,
			struct vmig__mf_dest **out)
{
	struct vmig__mf_dest *mf = calloc(1, sizeof(*mf));
	int ret;

	if (!mf || !(mf->ch = calloc(main->mf_channels, sizeof(*mf->ch)))) {
		free(mf);
		vmig__err_set_first(main->err, "out of memory for multifd");
		return -ENOMEM;
	}
	mf->s = s;
	mf->n = main->mf_channels;
	mf->main_round = main->last_round;
	mf->failed = -1;
	pthread_mutex_init(&mf->lock, NULL);
	*out = mf; /* from here on vmig__mf_dest_free() cleans up */
	/* The source connects them after the MULTIFD record; its own connect
	 * gives up after VMIG_CONNECT_TIMEOUT_MS. */
	ret = vmig__mf_dest_accept(mf, main->err);
	for (unsigned i = 0; !ret && i < mf->n; i++)
		ret = start_one(mf, i, main);
	if (ret)
		vmig__err_set_first(main->err, "multifd channels: %s", strerror(-ret));
	return ret;
}

int vmig__mf_dest_accept(struct vmig__mf_dest *mf, struct vmig__err *err)
{
	return vmig__dest_accept_side(mf->s, all_here, mf, 2 * VMIG_CONNECT_TIMEOUT_MS, err);
}

void vmig__mf_dest_postcopy(struct vmig__mf_dest *mf)
{
	if (mf)
		__atomic_store_n(&mf->postcopy, true, __ATOMIC_RELEASE);
}

int vmig__mf_dest_failure(struct vmig__mf_dest *mf, struct vmig__err *err)
{
	int failed, ret = 0;

	if (!mf)
		return 0;
	pthread_mutex_lock(&mf->lock);
	failed = mf->failed;
	pthread_mutex_unlock(&mf->lock);
	if (failed >= 0 && !vmig__net_error(mf->ch[failed].ret)) {
		ret = mf->ch[failed].ret;
		vmig__err_clear(err);
		vmig__err_set(err, "multifd channel %d: %s", failed, mf->ch[failed].err.msg);
	}
	return ret;
}

int vmig__mf_dest_resume(struct vmig__mf_dest *mf, struct vmig__err *err)
{
	int ret;

	if (!mf)
		return 0;
	ret = vmig__mf_dest_accept(mf, err);
	for (unsigned i = 0; !ret && i < mf->n; i++)
		ret = run_one(mf, i);
	return ret;
}

void vmig__mf_dest_sync(struct vmig__mf_dest *mf, uint64_t main_round)
{
	pthread_mutex_lock(&mf->lock);
	mf->main_round = main_round;
	pthread_mutex_unlock(&mf->lock);
	ack(mf);
}

/* Shut the data connections down, waking their threads. */
static void stop_channels(struct vmig__mf_dest *mf)
{
	pthread_mutex_lock(&mf->s->lock);
	for (unsigned i = 0; i < mf->n; i++)
		if (mf->ch[i].started)
			vmig__chan_shutdown(mf->s->mf_chans[i], SHUT_RDWR);
	pthread_mutex_unlock(&mf->s->lock);
}

int vmig__mf_dest_finish(struct vmig__mf_dest *mf, bool abort, struct vmig__err *err)
{
	int failed;

	if (!mf)
		return 0;
	if (abort)
		stop_channels(mf);
	for (unsigned i = 0; i < mf->n; i++) {
		if (mf->ch[i].started) {
			pthread_join(mf->ch[i].thread, NULL);
			mf->ch[i].started = false;
		}
	}
	pthread_mutex_lock(&mf->lock);
	failed = mf->failed;
	if (abort)
		mf->failed = -1; /* stopped on purpose: started again after a resume */
	pthread_mutex_unlock(&mf->lock);
	if (failed < 0)
		return 0;
	vmig__err_set(err, "multifd channel %d: %s", failed, mf->ch[failed].err.msg);
	return mf->ch[failed].ret;
}

void vmig__mf_dest_counts(struct vmig__mf_dest *mf, uint64_t *bytes, uint64_t *normal,
			  uint64_t *zero)
{
	for (unsigned i = 0; mf && i < mf->n; i++) {
		*bytes += __atomic_load_n(&mf->ch[i].bytes, __ATOMIC_RELAXED);
		*normal += __atomic_load_n(&mf->ch[i].normal, __ATOMIC_RELAXED);
		*zero += __atomic_load_n(&mf->ch[i].zero, __ATOMIC_RELAXED);
	}
}

/* Stop the threads (their connections are shut down) and free it all. */
void vmig__mf_dest_free(struct vmig__mf_dest *mf)
{
	if (!mf)
		return;
	stop_channels(mf);
	for (unsigned i = 0; i < mf->n; i++) {
		if (mf->ch[i].started)
			pthread_join(mf->ch[i].thread, NULL);
		vmig__loader_release(&mf->ch[i].l);
		free(mf->ch[i].r);
		free(mf->ch[i].l.bounce);
	}
	pthread_mutex_destroy(&mf->lock);
	free(mf->ch);
	free(mf);
}
