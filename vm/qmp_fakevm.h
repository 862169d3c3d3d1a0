/* SPDX-License-Identifier: MIT */
/*
 * A stand-in for the VM and its libvmig session, for the QMP unit tests and
 * the QMP fuzz target: it implements the vm.h functions and the vmig.h
 * functions the QMP layer calls, records what was asked, and touches no
 * file, socket or thread, so a fuzzer can drive every command safely.
 * Link it instead of vm.c (and before libvmig's archive, whose session
 * functions it replaces).
 */
#ifndef VMIG_VM_QMP_FAKEVM_H
#define VMIG_VM_QMP_FAKEVM_H

#include <stdbool.h>
#include <stdint.h>

#include <vmig/vmig.h>

#include "vm.h"

#define FAKEVM_MAX_CAPS 16
#define FAKEVM_MAX_PARAMS 16

struct fakevm {
	enum vm_runstate runstate;
	vm_event_cb cb;
	void *cb_opaque;
	/* engine side */
	bool caps[FAKEVM_MAX_CAPS];
	int64_t params[FAKEVM_MAX_PARAMS];
	struct vmig_stats stats;
	char last_uri[256];
	unsigned migrate_calls, incoming_calls, cancel_calls;
	int next_error; /* if non-zero, the next engine call fails with it */
	char error_text[128];
	/* pmemsave: recorded, never written */
	uint64_t pmem_addr, pmem_size;
	char pmem_path[256];
	struct vm_guest_stats guest;
	/* objects and TLS: the registry is the real one (objects.c); the
	 * credentials are fakes that read no file */
	struct vm_objects *objects;
	int creds_error;	 /* if non-zero, creating credentials fails with it */
	int set_tls_error;	 /* if non-zero, vmig_session_set_tls fails with it */
	unsigned tls_creds_live; /* fake credentials not yet freed */
	unsigned set_tls_calls;
	vmig_tls_creds *tls_creds;	     /* the session's reference, as set_tls left it */
	char tls_hostname[256];		     /* "" for NULL */
	char tls_authz[256];		     /* "" for NULL */
	char tls_dir[256];		     /* the dir of the last credentials created */
	char tls_username[256];		     /* and their username, "" for NULL */
	struct vmig_tls_creds_opts tls_opts; /* the last ones (dir and username cleared) */
};

/* The single fake (the real VM has no global state; this test double may). */
struct fakevm *fakevm_get(void);
/* Reset to a running VM with default parameters, no migration and no
 * objects. */
void fakevm_reset(void);
/* The struct vm pointer to hand to the QMP server. */
struct vm *fakevm_vm(void);
/* Emit a VM event as the VM would (synchronously, from this thread). */
void fakevm_emit(enum vm_event ev, const char *migration_status);

#endif
