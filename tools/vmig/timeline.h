/* SPDX-License-Identifier: MIT */
/*
 * A migration's timeline for the vmig tool: what query-migrate and the QMP
 * events said over one run, kept as a bounded series, written as it goes to
 * a log of JSON lines, and drawn as an SVG picture against time. Redrawing
 * from a log goes through the same records as recording live, so both give
 * the same picture. It knows nothing about sockets: vmig.c polls and passes
 * the replies in. Single-threaded.
 *
 * The log format (one JSON object per line, docs/qmp.md):
 *   {"vmig-timeline": 1, "started": "2026-12-05T10:00:00Z", "uri": "tcp:..."}
 *   {"t": 0.1, "query-migrate": {...the reply, unchanged...}}
 *   {"t": 0.1, "event": {...the QMP event, unchanged...}}
 *   {"t": 0.0, "parameters": {...query-migrate-parameters' reply...}}
 * t is in seconds since the migrate command was sent.
 */
#ifndef VMIG_TOOLS_TIMELINE_H
#define VMIG_TOOLS_TIMELINE_H

#include <jansson.h>

#include "util/util.h"

struct timeline;

/* Returns 0 or -ENOMEM. */
int timeline_new(struct timeline **out);
void timeline_free(struct timeline *tl);

/*
 * From now on, every record kept is also written to log_path (created or
 * truncated), after a header line naming uri (may be NULL). Returns 0 or
 * -errno with text in err.
 */
int timeline_log_open(struct timeline *tl, const char *log_path, const char *uri,
		      struct vmig__err *err);
/* Closes the log; returns 0, or -EIO with text in err if any write failed. */
int timeline_log_close(struct timeline *tl, struct vmig__err *err);

/*
 * Records, with t_s the seconds since the migration was started. The JSON
 * values are borrowed. A field the reply lacks (QEMU leaves some out in
 * some states) is a gap in its series, never an error.
 */
void timeline_add_sample(struct timeline *tl, double t_s, const json_t *query_migrate);
void timeline_add_event(struct timeline *tl, double t_s, const json_t *event);
void timeline_add_parameters(struct timeline *tl, double t_s, const json_t *parameters);

/*
 * Reads a log written by timeline_log_open. Every line is untrusted: a line
 * that is not such a record (garbage, a truncated last line, time running
 * backwards) fails the load with "PATH:LINE: why" in err. Returns 0 or
 * -errno (-EINVAL for a bad log, -ENODATA for one without any sample).
 */
int timeline_load(struct timeline **out, const char *log_path, struct vmig__err *err);

/* Draws the timeline as SVG into svg_path. Returns 0 or -errno with text
 * in err (-ENODATA when there is no sample to draw). */
int timeline_write_svg(const struct timeline *tl, const char *svg_path, struct vmig__err *err);

#endif
