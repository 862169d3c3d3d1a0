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
#include "stream/stream.h"
#include "util/util.h"

struct vmig__dirty;

struct vmig__block {
	char name[VMIG_BLOCK_NAME_MAX + 1];
	uint8_t *host;
	uint64_t size;
	uint64_t npages;
	int fd;
	uint64_t fd_offset;
	uint64_t *dirty;     /* source: pages still to send */
	uint64_t *page_hash; /* hash of each page as last sent / placed */
	uint64_t *received;  /* destination: page written at least once */
};

enum vmig__cap {
	VMIG_CAP_POSTCOPY_RAM,
	VMIG_CAP_POSTCOPY_BLOCKTIME,
	VMIG_CAP_POSTCOPY_PREEMPT,
	VMIG_CAP_MULTIFD,
	VMIG_CAP_VERIFY_MEMORY,
	VMIG_CAP__MAX
};

enum vmig__param {
	VMIG_PARAM_MAX_BANDWIDTH,
	VMIG_PARAM_DOWNTIME_LIMIT,
	VMIG_PARAM_MULTIFD_CHANNELS,
	VMIG_PARAM_DIRTY_TRACKING,
	VMIG_PARAM__MAX
};

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
	enum vmig_status status;
	struct vmig__err err;
	struct vmig_stats stats; /* published copy, under lock */

	/* current migration */
	bool is_source;
	bool thread_started;
	pthread_t thread;
	char uri[256];
	int fd;        /* migration connection, -1 if none */
	int listen_fd; /* destination, until a connection arrives */
	int cancel_efd;
	bool cancel; /* atomic */
	uint64_t start_ns;

	/* source return path, under lock */
	bool rp_started;
	pthread_t rp_thread;
	bool rp_resumed;
	bool rp_failed;
	uint64_t rp_acked_round;
	uint64_t rp_load_us;
};

/* session.c */
void vmig__set_status(struct vmig_session *s, enum vmig_status st);
/* Record the first error and move to failed (or cancelled if cancelling). */
void vmig__fail(struct vmig_session *s, int ret, const char *fmt, ...) VMIG_PRINTF(3, 4);
void vmig__emit(struct vmig_session *s, enum vmig_event_type type);
static inline bool vmig__cancelled(struct vmig_session *s)
{
	return __atomic_load_n(&s->cancel, __ATOMIC_ACQUIRE);
}
static inline int64_t vmig__param(struct vmig_session *s, enum vmig__param p)
{
	return __atomic_load_n(&s->params[p], __ATOMIC_RELAXED);
}
/* Publish a stats snapshot (under lock). */
void vmig__publish(struct vmig_session *s, const struct vmig_stats *st);

/* source.c / dest.c: thread bodies */
void *vmig__source_thread(void *arg);
void *vmig__dest_thread(void *arg);

#endif
