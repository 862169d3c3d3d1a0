/* SPDX-License-Identifier: MIT */
/*
 * The reference guest: vCPU threads that run a workload over guest RAM and
 * check every page they overwrite. Its "kernel data" (a table of the last
 * sequence number written to each page) lives in guest RAM itself, so it
 * migrates with the memory and the destination can go on checking.
 *
 * RAM layout: page 0 is a header, pages 1..meta_pages-1 hold one u32 per
 * guest page (0 = never written by the workload), the rest is workload
 * memory. A page written by the workload starts with {magic|pfn, seq} and
 * every other 8-byte word is a function of (pfn, seq, index): a stale,
 * misplaced or torn page does not check out.
 */
#ifndef VMIG_VM_GUEST_H
#define VMIG_VM_GUEST_H

#include <stddef.h>
#include <stdint.h>

#include "vm.h"

struct guest;

/* init_layout: write the header and clear the table (a fresh boot); false
 * when RAM will arrive by migration. */
int guest_create(struct guest **out, uint8_t *ram, uint64_t ram_size, const struct vm_config *cfg,
		 bool init_layout, struct vmig__err *err);
void guest_destroy(struct guest *g);
/* Stop returns once no vCPU touches RAM; both are idempotent. A vCPU that
 * blocked() says waits on a post-copy page counts as stopped. */
void guest_stop(struct guest *g);
void guest_set_blocked_check(struct guest *g, bool (*blocked)(void *opaque, unsigned vcpu),
			     void *opaque);
void guest_start(struct guest *g);
/* vCPU state (RNG, cursors) for migration. */
int guest_save(struct guest *g, void *buf, size_t cap, size_t *len);
int guest_load(struct guest *g, const void *buf, size_t len, struct vmig__err *err);
void guest_get_stats(struct guest *g, struct vm_guest_stats *out);
const char *guest_workload_name(enum vm_workload wl);
/* Linux thread id of vCPU i. */
int guest_vcpu_tid(struct guest *g, unsigned i);
/* auto-converge: vCPUs sleep percent% of the time (0 = full speed). */
void guest_set_throttle(struct guest *g, unsigned percent);

#endif
