/* SPDX-License-Identifier: MIT */
/*
 * Post-copy placement on the destination: guest RAM registered with
 * userfaultfd (MISSING), a fault thread that turns faults into page
 * requests, every arriving page placed exactly once with UFFDIO_COPY or
 * UFFDIO_ZEROPAGE, and the blocktime and fault-latency accounting.
 * Internal to libvmig.
 *
 * This is a layer below lib/migrate: it knows guest RAM blocks and
 * userfaultfd, not sessions, sockets or the stream. The migration state
 * machine (lib/migrate: pc_dest_run.c on the destination, pc_source.c on
 * the source) drives it and hears back through the callbacks of
 * struct vmig__pc_config.
 */
#ifndef VMIG_POSTCOPY_H
#define VMIG_POSTCOPY_H

#include <stdbool.h>
#include <stdint.h>

#include <vmig/vmig.h>

#include "ram/ram.h"
#include "stream/stream.h"
#include "util/util.h"

/* The post-copy part of query-migrate (struct vmig_stats.postcopy). */
typedef __typeof__(((struct vmig_stats *)0)->postcopy) vmig__pc_stats;

struct vmig__pc_config {
	/* guest RAM; the blocks and their bitmaps outlive the placer */
	struct vmig__block *blocks;
	unsigned nblocks;
	bool postcopy_ram;   /* place and discard hooks (else pre-copy fill only) */
	bool blocktime;	     /* capability postcopy-blocktime: stats are valid */
	const int *vcpu_tid; /* Linux thread id of each vCPU, copied at creation */
	unsigned nvcpus;
	/* Called from the fault thread and the placing threads. */
	/* ask the source for pages [first, first + npages), npages <= 64 */
	void (*request)(void *opaque, unsigned block, uint64_t first, uint32_t npages);
	void (*publish)(void *opaque, const vmig__pc_stats *st);     /* new statistics */
	void *opaque;
};

struct vmig__pc_dest;

/* The kernel has MINOR faults on shmem (Linux 5.14): a preallocated file
 * block can stay populated for post-copy (struct vmig__block.pc_minor). */
bool vmig__pc_minor_supported(void);
int vmig__pc_dest_new(const struct vmig__pc_config *cfg, struct vmig__pc_dest **out);
/* Stop the fault thread and unregister guest RAM (waking any waiter). */
void vmig__pc_dest_free(struct vmig__pc_dest *pc);
/* Loader hooks: fill (pre-copy), place and discard (post-copy). */
void vmig__pc_dest_hooks(struct vmig__pc_dest *pc, struct vmig__load_hooks *hooks);
/* Incoming migration starts: register guest RAM with userfaultfd (pages are
 * installed with UFFDIO_COPY from then on) and start the fault thread.
 * Fails on kernels without userfaultfd for shmem; then RAM is written
 * directly and post-copy is not available. */
int vmig__pc_dest_register(struct vmig__pc_dest *pc, struct vmig__err *err);
/* POSTCOPY_RUN arrived: faults become page requests. */
int vmig__pc_dest_switch(struct vmig__pc_dest *pc, struct vmig__err *err);
/* Ask again for every page a fault still waits for (a new connection). */
void vmig__pc_dest_rerequest(struct vmig__pc_dest *pc);
/* Everything is in place: stop the fault thread (RAM stays registered
 * until vmig__pc_dest_free). */
void vmig__pc_dest_stop_faults(struct vmig__pc_dest *pc);
/* Publish the statistics now (they are also published every 100 ms). */
void vmig__pc_dest_publish(struct vmig__pc_dest *pc);
/* True while vCPU index waits for a page (vmig_vcpu_blocked). */
bool vmig__pc_dest_vcpu_blocked(struct vmig__pc_dest *pc, unsigned index);

#endif
