/* SPDX-License-Identifier: MIT */
/*
 * Post-copy, both sides. Internal to libvmig.
 *
 * Source (pc_source.c): at the switch, stop the vCPUs, tell the destination
 * which of its pages are stale (DISCARD), send the device state and
 * POSTCOPY_RUN; then push every page not yet in place, preferring the area
 * of recent faults, while the return-path thread answers page requests on
 * the urgent channel. A broken connection pauses the migration until
 * vmig_resume(); the source's memory is frozen, so nothing is lost.
 *
 * Destination (pc_dest.c): on POSTCOPY_RUN, register guest RAM with
 * userfaultfd (MISSING), start a fault thread that turns faults into page
 * requests, and place every arriving page with UFFDIO_COPY / UFFDIO_ZEROPAGE
 * exactly once. Blocktime and fault latency are accounted here.
 */
#ifndef VMIG_POSTCOPY_H
#define VMIG_POSTCOPY_H

#include "migrate/migrate_int.h"

/* Source: called by the migration thread after a pre-copy round. */
int vmig__pc_source_prepare(struct vmig__source *src);
int vmig__pc_source_switch(struct vmig__source *src);
int vmig__pc_source_push(struct vmig__source *src);
/* Source, return-path thread: a page request from the destination. 0, or
 * -EPROTO for a request outside guest RAM. */
int vmig__pc_source_request(struct vmig__source *src, const struct vmig_wire_pages *req,
			    struct vmig__err *err);
/* Source, resuming: the destination's RECV_BITMAP of every block from r;
 * the dirty bitmaps become what it lacks. */
int vmig__pc_source_read_bitmaps(struct vmig__source *src, struct vmig__reader *r);

/* Destination. */
struct vmig__pc_dest;
/* Hooks for the loader before the switch (discard), created when the
 * destination has postcopy-ram. */
int vmig__pc_dest_new(struct vmig_session *s, struct vmig__pc_dest **out);
void vmig__pc_dest_free(struct vmig__pc_dest *pc);
/* True while vCPU index waits for a page (vmig_vcpu_blocked). */
bool vmig__pc_dest_vcpu_blocked(struct vmig__pc_dest *pc, unsigned index);
void vmig__pc_dest_hooks(struct vmig__pc_dest *pc, struct vmig__load_hooks *hooks);
/* Incoming migration starts: register guest RAM with userfaultfd (pages are
 * installed with UFFDIO_COPY from then on) and start the fault thread.
 * Fails on kernels without userfaultfd for shmem; then RAM is written
 * directly and post-copy is not available. */
int vmig__pc_dest_register(struct vmig__pc_dest *pc, struct vmig__err *err);
/* POSTCOPY_RUN arrived: faults become page requests. */
int vmig__pc_dest_switch(struct vmig__pc_dest *pc, struct vmig__err *err);
/*
 * The rest of the migration after the switch: load the main stream (l) and
 * the urgent channel, pause and recover as needed, verify, unregister.
 * Returns 0 when every page is in place and verified. On failure the
 * guest RAM stays registered and the fault thread keeps running (faults
 * wait, never read a missing page): the caller stops the vCPUs and keeps
 * pc until the session ends.
 */
int vmig__pc_dest_run(struct vmig__pc_dest *pc, struct vmig__loader *l);

#endif
