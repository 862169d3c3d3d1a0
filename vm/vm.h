/* SPDX-License-Identifier: MIT */
/*
 * vmig-vm's reference VM: guest RAM in a memfd, vCPU threads that run a
 * workload, and the libvmig session that migrates it. The QMP server drives
 * it only through this header. All functions are called from the main
 * (QMP) thread unless noted.
 */
#ifndef VMIG_VM_H
#define VMIG_VM_H

#include <stdbool.h>
#include <stdint.h>

#include <vmig/vmig.h>

#include "util/util.h"

enum vm_workload { VM_WL_IDLE = 0, VM_WL_RANDOM, VM_WL_STREAM, VM_WL_HOTSET };
enum vm_fill { VM_FILL_ZERO = 0, VM_FILL_RANDOM, VM_FILL_FILE };

struct vm_config {
	uint64_t mem_bytes;
	unsigned vcpus;
	enum vm_workload workload;
	uint64_t dirty_rate; /* bytes/s over all vCPUs; 0 = as fast as possible */
	uint64_t wss_bytes;  /* working set for stream/hotset; 0 = all of RAM */
	enum vm_fill fill;
	const char *fill_path;
	bool start_paused; /* -S */
	bool incoming;     /* --incoming given: RAM arrives by migration */
	bool prealloc;     /* --mem-prealloc: populate RAM at start-up */
	bool hugetlb;	   /* --hugetlb: 2 MiB huge pages (memory-backend-memfd,hugetlb=on) */
	uint64_t seed;
};

struct vm;
struct vm_objects;

/* QEMU RunState names as query-status reports them. */
enum vm_runstate {
	VM_RS_PRELAUNCH = 0,
	VM_RS_RUNNING,
	VM_RS_PAUSED,
	VM_RS_INMIGRATE,
	VM_RS_POSTMIGRATE,
	VM_RS_FINISH_MIGRATE,
	VM_RS_SHUTDOWN,
};
const char *vm_runstate_name(enum vm_runstate rs);

/* Events for the QMP layer: STOP, RESUME and MIGRATION. The callback is
 * called from any thread; it must hand the event to the main loop. */
enum vm_event { VM_EV_STOP = 1, VM_EV_RESUME, VM_EV_MIGRATION };
typedef void (*vm_event_cb)(void *opaque, enum vm_event ev, const char *migration_status);

int vm_create(struct vm **out, const struct vm_config *cfg, struct vmig__err *err);
void vm_destroy(struct vm *vm);
void vm_set_event_cb(struct vm *vm, vm_event_cb cb, void *opaque);

enum vm_runstate vm_get_runstate(struct vm *vm);
bool vm_is_running(struct vm *vm);
int vm_stop(struct vm *vm);     /* QMP stop: pause vCPUs */
int vm_cont(struct vm *vm);     /* QMP cont: resume vCPUs */

/* The migration session of this VM (for migrate, query-migrate, ...). */
vmig_session *vm_session(struct vm *vm);
/* Its objects (--object, object-add) and TLS migration parameters
 * (objects.h); owned by the VM, main thread only. */
struct vm_objects *vm_objects(struct vm *vm);

/* QMP pmemsave: write size bytes of guest-physical memory at addr to path. */
int vm_pmemsave(struct vm *vm, uint64_t addr, uint64_t size, const char *path,
		struct vmig__err *err);

/* Guest self-check counters (x-vmig-query-guest). */
struct vm_guest_stats {
	uint64_t pages_written;
	uint64_t pages_verified;
	uint64_t inconsistencies;
	uint64_t mem_bytes;
	unsigned vcpus;
	unsigned throttle; /* percent, set by auto-converge */
	const char *workload;
};
void vm_guest_stats(struct vm *vm, struct vm_guest_stats *out);

#endif
