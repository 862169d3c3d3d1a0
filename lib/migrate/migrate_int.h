/* SPDX-License-Identifier: MIT */
/*
 * The session: everything one migration (outgoing or incoming) needs. The
 * struct is private to lib/migrate; callers hold an opaque vmig_session.
 *
 * Threads and locking:
 *  - The control thread (embedder) calls the public API.
 *  - One migration thread runs an outgoing or incoming migration; on the
 *    source a return-path thread reads the destination's replies.
 *  - lock protects status, err, stats (the published copy) and the
 *    return-path flags; cond signals return-path progress.
 *  - Parameters are read by the migration thread with atomic loads, so
 *    max-bandwidth and downtime-limit can change mid-migration.
 */
#ifndef VMIG_MIGRATE_INT_H
#define VMIG_MIGRATE_INT_H

#include <pthread.h>
#include <stdbool.h>

#include <vmig/vmig.h>

#include "channel/channel.h"
#include "ram/ram.h"
#include "stream/stream.h"
#include "util/util.h"

struct vmig__dirty;

_Static_assert(sizeof(((struct vmig__block *)0)->name) == VMIG_BLOCK_NAME_MAX + 1,
	       "a block name of the stream format fits struct vmig__block");

/* A connection to the incoming port that has not finished its TLS
 * handshake or sent its whole preamble yet (accept.c). */
#define VMIG_MAX_PENDING 16
struct vmig__pending {
	struct vmig__chan *c;
	bool trusted; /* handshake done, peer accepted (always, without TLS) */
	bool closing; /* refused: its TLS alert goes out, then it closes */
	uint8_t got;
	uint64_t since_ns;
	uint8_t buf[sizeof(struct vmig_wire_preamble)];
};

enum vmig__cap {
	VMIG_CAP_POSTCOPY_RAM,
	VMIG_CAP_POSTCOPY_BLOCKTIME,
	VMIG_CAP_POSTCOPY_PREEMPT,
	VMIG_CAP_MULTIFD,
	VMIG_CAP_AUTO_CONVERGE,
	VMIG_CAP_VERIFY_MEMORY,
	VMIG_CAP_PAUSE_BEFORE_SWITCHOVER,
	VMIG_CAP_ZERO_COPY_SEND,
	VMIG_CAP__MAX
};

enum vmig__param {
	VMIG_PARAM_MAX_BANDWIDTH,
	VMIG_PARAM_DOWNTIME_LIMIT,
	VMIG_PARAM_MULTIFD_CHANNELS,
	VMIG_PARAM_DIRTY_TRACKING,
	VMIG_PARAM_MAX_POSTCOPY_BANDWIDTH,
	VMIG_PARAM_CPU_THROTTLE_INITIAL,
	VMIG_PARAM_CPU_THROTTLE_INCREMENT,
	VMIG_PARAM_MAX_CPU_THROTTLE,
	VMIG_PARAM_THROTTLE_TRIGGER_THRESHOLD,
	VMIG_PARAM_MULTIFD_COMPRESSION,
	VMIG_PARAM_MULTIFD_ZSTD_LEVEL,
	VMIG_PARAM_MULTIFD_ZLIB_LEVEL,
	VMIG_PARAM__MAX
};

struct pc_run;

struct vmig_session {
	struct vmig_vm_ops ops;
	void *opaque;

	struct vmig__block blocks[VMIG_MAX_BLOCKS];
	unsigned nblocks;

	bool caps[VMIG_CAP__MAX];
	int64_t params[VMIG_PARAM__MAX]; /* atomic loads from the migration thread */
	bool autostart;

	pthread_mutex_t lock;
	pthread_cond_t cond;
	pthread_mutex_t rp_lock; /* destination: serialises return-path writes */
	enum vmig_status status;     /* under lock */
	struct vmig__err mig_err;    /* under lock: the migration's first error */
	struct vmig__err api_err;    /* control thread only: vmig_session_error() */
	struct vmig_stats stats; /* published copy, under lock */

	/* current migration */
	bool is_source;
	bool thread_started;
	pthread_t thread;
	char uri[256];
	struct vmig__chan *ch; /* main connection, NULL if none; written under lock and
				* rp_lock, read under either */
	/* TLS of the next connections (vmig_session_set_tls): the control
	 * thread writes it under lock while no migration thread may connect or
	 * accept; those threads read it when they do. */
	struct vmig__tls tls;
	/* destination: the listener. The control thread sets it before the
	 * migration thread starts (or, for migrate-recover, under lock while
	 * that thread waits); the migration thread then owns it. */
	int listen_fd;
	int cancel_efd;
	/* eventfd: wakes a recovery attempt in progress, where it connects or
	 * accepts (migrate-pause in postcopy-recover, a cancel, the session's
	 * end); drained, under lock, when a recovery is requested */
	int recover_efd;
	bool cancel; /* atomic */
	uint64_t start_ns;
	/* destination: when the source's main connection came, for the average
	 * mbps at the end (not the wait before it); set by the migration thread
	 * before it starts the others */
	uint64_t connected_ns;

	/* source return path, under lock */
	bool rp_started;
	pthread_t rp_thread;
	bool rp_resumed;
	bool rp_failed; /* atomic (written under lock too): the senders poll it */
	bool rp_complete;
	bool rp_error; /* the destination reported a failure (RP_ERROR) */
	/* source, atomic: the record that lets the destination start (EOS,
	 * POSTCOPY_RUN) may have gone out; from then on the vCPUs here are
	 * never restarted by libvmig (docs/handover.md) */
	bool committed;
	bool continue_requested; /* under lock: migrate-continue */
	uint64_t rp_acked_round;
	uint64_t rp_load_us;

	/* post-copy */
	struct vmig_wire_sid session_id;
	struct vmig__chan *urgent;   /* NULL if none; under lock */
	bool postcopy_requested;     /* atomic: migrate-start-postcopy */
	bool in_postcopy;            /* atomic: past the switch (vmig__in_postcopy) */
	bool pause_requested;        /* atomic: migrate-pause */
	bool recover_requested;      /* under lock: vmig_resume/vmig_recover (uri in uri) */
	/* destination: the post-copy state while a migration thread uses it,
	 * and after a post-copy failure (guest RAM stays registered with
	 * userfaultfd until the session is freed); under lock */
	struct vmig__pc_dest *pcd;
	/* Destination: its run after the post-copy switch, whose progress the
	 * fault thread's statistics tick publishes (pc_dest_run.c); under lock */
	struct pc_run *pcr;

	/* multifd data connections by index, NULL if none; under lock */
	struct vmig__chan *mf_chans[VMIG_MAX_MULTIFD];
	struct vmig_wire_sid mf_session[VMIG_MAX_MULTIFD]; /* destination: each one's preamble */
	unsigned mf_count;            /* entries in use: [0, mf_count) */
	int vcpu_tid[VMIG_MAX_VCPUS];
	unsigned nvcpus;

	/* calc-dirty-rate (dirtyrate.c): one measurement at a time, on its own
	 * thread; dr is written under lock, dr_thread by the control thread */
	struct vmig_dirty_rate dr;
	bool dr_started;
	pthread_t dr_thread;
	bool dr_stop; /* atomic: the session is going away */

	/* destination: connections still sending their preamble (accept.c);
	 * the migration thread only */
	struct vmig__pending pending[VMIG_MAX_PENDING];
	unsigned npending;
};

/*
 * The source's working state for one migration, owned by the migration
 * thread; the return-path thread reads blocks and writes the urgent channel.
 */
struct vmig__source {
	struct vmig_session *s;
	struct vmig__writer *w;
	struct vmig__writer *uw; /* urgent channel writer (return-path thread) */
	void *state;		 /* device state buffer, STATE_MAX bytes: made before the
				  * guest stops, so the downtime neither maps nor unmaps it */
	struct vmig__dirty *dirty;
	struct vmig__ratelimit rl;
	pthread_mutex_t rl_lock; /* rl: the senders of all channels share it */
	struct vmig_stats st;  /* private working copy, published periodically */
	uint64_t dirty_pages;  /* bits set in all dirty bitmaps (atomic in post-copy) */
	uint64_t last_pub_ns;
	uint64_t last_pub_bytes;
	uint64_t last_pub_pages;
	uint64_t bandwidth; /* bytes/s, measured */
	uint64_t last_sync_ns;
	uint64_t sync_marks; /* SYNC records sent; the destination acks each */
	uint64_t hint;            /* atomic: (block << 48 | page) to push next, post-copy */
	uint64_t urgent_bytes;    /* atomic */
	uint64_t urgent_requests; /* atomic */
	/* atomic: page requests between the claim of their dirty bits and
	 * their flush, which stores the pages' hashes (return-path thread);
	 * the digest waits for none to be left */
	uint32_t urgent_inflight;
	bool vm_was_running;
	bool stopped_vm;
	/* auto-converge: the throttle asked of the VMM (percent), how many
	 * periods dirtied too much, and the current period (>= 1 s, as QEMU) */
	unsigned throttle;
	unsigned dirty_high;
	uint64_t ac_start_ns;
	uint64_t ac_sent;
	uint64_t ac_dirtied;
	struct vmig__mf_source *mf; /* multifd data channels, NULL without */
	/* multifd-bytes and dirty-sync-missed-zero-copy of the data channels
	 * closed so far (a post-copy recovery opens new ones) */
	uint64_t mf_done[2];
};

/* session.c */
void vmig__set_status(struct vmig_session *s, enum vmig_status st);
/* Under s->lock: change the status; true if it changed (then emit). */
bool vmig__set_status_locked(struct vmig_session *s, enum vmig_status st);
/* A paused post-copy, either side: wait for migrate-recover / resume (or a
 * cancel, -ECANCELED), then move to postcopy-recover. */
int vmig__wait_recover(struct vmig_session *s);
/* Record the first error and move to failed (or cancelled if cancelling);
 * on the source the move waits for the end of the migration thread. */
void vmig__fail(struct vmig_session *s, int ret, const char *fmt, ...) VMIG_PRINTF(3, 4);
/* Source, after the commit point: fail with the outcome unknown (the first
 * error becomes the reason given), vCPUs left stopped. */
void vmig__fail_unknown(struct vmig_session *s);
/* The migration's error, under s->lock: note a first reason without failing
 * yet, copy it out, clear it (post-copy resume). */
void vmig__note_err(struct vmig_session *s, const char *fmt, ...) VMIG_PRINTF(2, 3);
void vmig__get_err(struct vmig_session *s, struct vmig__err *out);
void vmig__clear_err(struct vmig_session *s);
void vmig__emit(struct vmig_session *s, enum vmig_event_type type);
static inline bool vmig__cancelled(struct vmig_session *s)
{
	return __atomic_load_n(&s->cancel, __ATOMIC_ACQUIRE);
}
static inline bool vmig__in_postcopy(struct vmig_session *s)
{
	return __atomic_load_n(&s->in_postcopy, __ATOMIC_ACQUIRE);
}
static inline bool vmig__pause_requested(struct vmig_session *s)
{
	return __atomic_load_n(&s->pause_requested, __ATOMIC_ACQUIRE);
}
/* The eventfd that ends a connect early: a resume's connects are attempts
 * that migrate-pause gives up (and a cancel too), the others only a cancel. */
static inline int vmig__connect_wake_fd(struct vmig_session *s, bool resume)
{
	return resume ? s->recover_efd : s->cancel_efd;
}
/* Why a recovery attempt ended, when migrate-pause ended it. */
#define VMIG_PAUSED_MSG "migrate-pause: this recovery attempt was given up"
static inline int64_t vmig__param(struct vmig_session *s, enum vmig__param p)
{
	return __atomic_load_n(&s->params[p], __ATOMIC_RELAXED);
}
void vmig__break_channels(struct vmig_session *s);
void vmig__close_channels(struct vmig_session *s);
/* Publish a stats snapshot (under lock). */
void vmig__publish(struct vmig_session *s, const struct vmig_stats *st);

/* dest.c, shared with pc_dest_run.c: the destination's transfer counters,
 * summed over every channel of every connection. */
struct vmig__dest_counts {
	uint64_t bytes;	   /* all channels */
	uint64_t mf_bytes; /* the data channels' share */
	uint64_t normal, zero;
};
/* Set st's transfer figures (QEMU's ram.*) from c. average: mbps is the
 * average since the source connected, else the rate since the last call,
 * which *last_ns and *last_bytes keep. The caller serializes the calls. */
void vmig__dest_ram_figures(const struct vmig_session *s, struct vmig_stats *st,
			    const struct vmig__dest_counts *c, bool average, uint64_t *last_ns,
			    uint64_t *last_bytes);

/* source.c / dest.c: thread bodies */
void *vmig__source_thread(void *arg);
void *vmig__dest_thread(void *arg);

/* source.c, shared with pc_source.c */
uint64_t vmig__src_wire_bytes(struct vmig__source *src);
int vmig__src_throttle(void *opaque, size_t bytes);
void vmig__src_stats_tick(struct vmig__source *src, bool force);
void vmig__src_send_run(struct vmig__source *src, struct vmig__writer *w, unsigned bi,
			uint64_t first, uint64_t end, bool hash);
int vmig__src_sync_dirty(struct vmig__source *src);
int vmig__src_stop_vm(struct vmig__source *src);
int vmig__src_maybe_pause(struct vmig__source *src);
void vmig__src_commit(struct vmig__source *src);
int vmig__src_mark_and_drain(struct vmig__source *src);
int vmig__src_send_state(struct vmig__source *src);
int vmig__src_connect(struct vmig__source *src, bool resume);
int vmig__src_start_rp(struct vmig__source *src);
void vmig__src_close_channels(struct vmig__source *src);
int vmig__src_wait_rp(struct vmig_session *s, const bool *flag);
/* A connection failed. The destination may have said why on the return path
 * just before it closed (a TLS alert, RP_ERROR): wait up to ms for the
 * return-path thread to read it and end. True if it has ended (its reason,
 * if any, is then the migration's error). */
bool vmig__src_rp_ended(struct vmig_session *s, unsigned ms);
/* One return-path message (the return-path thread; the fuzzer). */
int vmig__src_rp_message(struct vmig__source *src, uint8_t type, const uint8_t *payload,
			 size_t len, struct vmig__err *err);
void vmig__src_digest(struct vmig__source *src, struct vmig_wire_digest *d);

/* multifd.c: pages over several connections (pre-copy, and the post-copy push) */
struct vmig__mf_source;
struct vmig__mf_dest;
int vmig__mf_source_open(struct vmig__source *src, bool resume, struct vmig__err *err);
/* Send the dirty pages of this round on every channel, each ending with
 * SYNC(round) (or EOS when final); returns once all are sent. */
int vmig__mf_source_round(struct vmig__source *src, uint64_t round, bool final);
/* SYNC(round) on every channel, unless their last round was that one. */
int vmig__mf_source_mark(struct vmig__source *src, uint64_t round);
/* Post-copy: start the background push on every channel (each ends with
 * EOS); vmig__mf_source_wait tells when all are done. */
void vmig__mf_source_push(struct vmig__source *src);
/* Wait up to timeout_ms for the channels' job: true when all are done, *err
 * then their first error (0 if none). A channel the destination closed
 * before its share was sent fails the job (all channels are shut down). */
int vmig__mf_source_wait(struct vmig__source *src, unsigned timeout_ms, int *err);
/* Return-path thread: push from page pfn of block bi next (a fault there). */
void vmig__mf_source_hint(struct vmig__source *src, unsigned bi, uint64_t pfn);
void vmig__mf_source_collect(struct vmig__source *src); /* counters into src->st */
uint64_t vmig__mf_source_bytes(struct vmig__source *src);
void vmig__mf_source_close(struct vmig__source *src);
/* Destination: after the MULTIFD record, take the data channels and start a
 * loader thread on each. */
int vmig__mf_dest_start(struct vmig_session *s, struct vmig__loader *main, struct vmig__mf_dest **out);
/* The main channel loaded SYNC(main_round): acknowledge the lowest round
 * every channel has reached, if that moved on. */
void vmig__mf_dest_sync(struct vmig__mf_dest *mf, uint64_t main_round);
/* Wait for every data channel's EOS (abort: stop them first); 0, or the
 * error of the first channel that failed, with its message in err. */
int vmig__mf_dest_finish(struct vmig__mf_dest *mf, bool abort, struct vmig__err *err);
/* Wait until all data channels of this migration are kept (s->mf_chans). */
int vmig__mf_dest_accept(struct vmig__mf_dest *mf, struct vmig__err *err);
/* The switch: from the next record on, the loaders place pages (NULL: no
 * multifd, nothing to do). */
void vmig__mf_dest_postcopy(struct vmig__mf_dest *mf);
/* A data channel failed on something else than a lost connection (a bad
 * record): its error (message in err), else 0. */
int vmig__mf_dest_failure(struct vmig__mf_dest *mf, struct vmig__err *err);
/* Post-copy resume: take the new data channels and load them again (the
 * loaders were stopped with vmig__mf_dest_finish(mf, true, ...)). */
int vmig__mf_dest_resume(struct vmig__mf_dest *mf, struct vmig__err *err);
void vmig__mf_dest_counts(struct vmig__mf_dest *mf, uint64_t *bytes, uint64_t *normal, uint64_t *zero);
void vmig__mf_dest_free(struct vmig__mf_dest *mf);

/*
 * pc_source.c: post-copy, source side. At the switch, stop the vCPUs, tell
 * the destination which of its pages are stale (DISCARD), send the device
 * state and POSTCOPY_RUN; then push every page not yet in place, preferring
 * the area of recent faults, while the return-path thread answers page
 * requests on the urgent channel. A broken connection pauses the migration
 * until vmig_resume(); the source's memory is frozen, so nothing is lost.
 */
int vmig__pc_source_prepare(struct vmig__source *src);
int vmig__pc_source_switch(struct vmig__source *src);
int vmig__pc_source_push(struct vmig__source *src);
/* Return-path thread: a page request from the destination. 0, or -EPROTO
 * for a request outside guest RAM. */
int vmig__pc_source_request(struct vmig__source *src, const struct vmig_wire_pages *req,
			    struct vmig__err *err);
/* Resuming: the destination's RECV_BITMAP of every block from r; the dirty
 * bitmaps become what it lacks. */
int vmig__pc_source_read_bitmaps(struct vmig__source *src, struct vmig__reader *r);

/*
 * pc_dest_run.c: post-copy, destination side, around lib/postcopy's placer.
 * vmig__dest_pc_new makes the placer for this session (s->pcd);
 * vmig__dest_pc_run is the rest of the migration after the switch: load the
 * main stream and the urgent channel, pause and recover as needed, verify.
 * It returns 0 when every page is in place and verified. On failure guest
 * RAM stays registered and the fault thread keeps running (faults wait,
 * never read a missing page): the caller stops the vCPUs and keeps the
 * placer until the session ends.
 */
struct vmig__pc_dest;
int vmig__dest_pc_new(struct vmig_session *s, struct vmig__pc_dest **out);
void vmig__dest_pc_free(struct vmig_session *s, struct vmig__pc_dest *pc);
int vmig__dest_pc_run(struct vmig_session *s, struct vmig__pc_dest *pc, struct vmig__loader *l,
		      struct vmig__mf_dest *mf);

/* dirtyrate.c: join a measurement's thread (vmig_session_free). */
void vmig__dirty_rate_stop(struct vmig_session *s);
/* session.c, for dirtyrate.c: is a migration running? */
bool vmig__migration_running(struct vmig_session *s);

/* accept.c: the incoming side's connections */
void vmig__close_pending(struct vmig_session *s);
int vmig__dest_accept(struct vmig_session *s, struct vmig__loader *l, bool resume);
int vmig__dest_accept_urgent(struct vmig_session *s, struct vmig__err *err);
/* Accept urgent and multifd connections of this migration until done(arg);
 * -ETIMEDOUT after timeout_ms, -EPIPE if the main connection closes. */
int vmig__dest_accept_side(struct vmig_session *s, bool (*done)(void *arg), void *arg,
			   unsigned timeout_ms, struct vmig__err *err);
/* Keep a multifd data connection whose preamble l has read. */
void vmig__dest_keep_multifd(struct vmig_session *s, struct vmig__chan *c,
			     const struct vmig__loader *l);
void vmig__dest_send_rp(struct vmig_session *s, uint8_t type, const void *payload, uint32_t len);

#endif
