/* SPDX-License-Identifier: MIT */
/*
 * The timeline's data, shared by the recorder (timeline.c) and the SVG
 * drawing (timeline_svg.c); nothing else sees it.
 *
 * Bounded: at most TL_MAX_SAMPLES samples are kept. When the array is full,
 * every other sample goes and the spacing required between samples doubles,
 * so a long run keeps its whole length at a coarser step. Status changes,
 * dirty syncs and the final sample are kept regardless, as marks or by
 * forcing the sample in, since they are what the picture is for.
 */
#ifndef VMIG_TOOLS_TIMELINE_INT_H
#define VMIG_TOOLS_TIMELINE_INT_H

#include <stdint.h>
#include <stdio.h>

#include "timeline.h"

#define TL_MAX_SAMPLES 8192
#define TL_MAX_MARKS 4096
#define TL_MAX_LOGGED_EVENTS 8192
#define TL_STATUS_LEN 24
#define TL_ERROR_LEN 200
#define TL_LOG_VERSION 1

enum tl_series {
	TL_THROUGHPUT,	      /* bytes/s: ram.mbps while running */
	TL_DIRTY_RATE,	      /* bytes/s: ram.dirty-pages-rate x ram.page-size */
	TL_REMAINING,	      /* bytes: ram.remaining */
	TL_EXPECTED_DOWNTIME, /* ms: expected-downtime */
	TL_POSTCOPY_REQUESTS, /* count: ram.postcopy-requests */
	TL__SERIES
};

struct tl_sample {
	double t_s;
	double v[TL__SERIES]; /* NAN where the reply had no such field */
};

enum tl_mark_kind {
	TL_MARK_SYNC,	      /* ram.dirty-sync-count went up (seen by polling) */
	TL_MARK_PASS,	      /* a MIGRATION_PASS event */
	TL_MARK_STATUS_POLL,  /* the status changed (seen by polling) */
	TL_MARK_STATUS_EVENT, /* a MIGRATION event */
	TL_MARK_STOP,	      /* a STOP event: the source's vCPUs stopped */
};

struct tl_mark {
	double t_s;
	enum tl_mark_kind kind;
	uint64_t n;		    /* SYNC, PASS: the count */
	char status[TL_STATUS_LEN]; /* STATUS_*: the new status */
};

struct timeline {
	struct tl_sample *samples; /* TL_MAX_SAMPLES of them */
	unsigned nsamples;
	double min_spacing_s;  /* between kept samples; grows as they are thinned */
	struct tl_mark *marks; /* TL_MAX_MARKS of them, by arrival */
	unsigned nmarks, dropped_marks;

	/* State of the last sample fed, kept or not */
	char status[TL_STATUS_LEN];
	double last_sync;

	/* What the run ended with */
	double t_end_s;		/* the latest time of any record */
	double downtime_ms;	/* the "downtime" field, NAN until seen */
	double downtime_seen_s; /* when it was first seen */
	char error_desc[TL_ERROR_LEN];

	/* From query-migrate-parameters, NAN if unknown */
	double downtime_limit_ms, max_bandwidth_bytes_per_s;

	/* From the log's header */
	char started[40];
	char uri[160];

	FILE *log; /* NULL unless recording to a log */
	unsigned logged_events;
	bool log_failed;
};

/* completed, failed or cancelled: the run is over */
bool tl_is_terminal(const char *status);

#endif
