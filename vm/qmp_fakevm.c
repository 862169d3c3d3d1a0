// SPDX-License-Identifier: MIT
/*
 * Test double for vm.h and the part of vmig.h used by the QMP layer. See
 * qmp_fakevm.h. Single-threaded by design: tests and the fuzz target drive
 * it from one thread. Status transitions mimic the engine's contract only as
 * far as QMP needs (migrate -> active, cancel -> cancelled).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "objects.h"
#include "qmp_fakevm.h"

static const char *const cap_names[] = {
    "postcopy-ram",   "postcopy-blocktime", "postcopy-preempt",	    "multifd",
    "zero-copy-send", "auto-converge",	    "x-vmig-verify-memory", NULL};
static const char *const param_names[] = {"max-bandwidth", "downtime-limit", "multifd-channels",
					  "x-vmig-dirty-tracking", "multifd-compression", NULL};
static const char *const compression_names[] = {"none", "zlib", "zstd", NULL};

static struct fakevm fake;
/* Any non-NULL pointers do: the fake ignores them. */
static char vm_token, session_token;

struct fakevm *fakevm_get(void)
{
	return &fake;
}

void fakevm_reset(void)
{
	vm_objects_free(fake.objects);
	vmig_tls_creds_unref(fake.tls_creds);
	memset(&fake, 0, sizeof(fake));
	vm_objects_new(&fake.objects); /* NULL on ENOMEM: commands then crash the test */
	fake.runstate = VM_RS_RUNNING;
	fake.params[0] = 128 << 20;
	fake.params[1] = 300;
	fake.params[2] = 2;
	fake.stats.ram.page_size = 4096;
	fake.guest.mem_bytes = 64 << 20;
	fake.guest.vcpus = 1;
	fake.guest.workload = "idle";
}

struct vm *fakevm_vm(void)
{
	return (struct vm *)&vm_token;
}

void fakevm_emit(enum vm_event ev, const char *migration_status)
{
	if (fake.cb)
		fake.cb(fake.cb_opaque, ev, migration_status);
}

static int take_error(void)
{
	int e = fake.next_error;

	fake.next_error = 0;
	return e;
}

/* ---- vm.h ---- */

const char *vm_runstate_name(enum vm_runstate rs)
{
	static const char *const names[] = {"prelaunch",   "running",	     "paused",	"inmigrate",
					    "postmigrate", "finish-migrate", "shutdown"};

	return (unsigned)rs < sizeof(names) / sizeof(names[0]) ? names[rs] : "unknown";
}

void vm_set_event_cb(struct vm *vm, vm_event_cb cb, void *opaque)
{
	fake.cb = cb;
	fake.cb_opaque = opaque;
}

enum vm_runstate vm_get_runstate(struct vm *vm)
{
	return fake.runstate;
}

bool vm_is_running(struct vm *vm)
{
	return fake.runstate == VM_RS_RUNNING;
}

int vm_stop(struct vm *vm)
{
	if (fake.runstate == VM_RS_RUNNING) {
		fake.runstate = VM_RS_PAUSED;
		fakevm_emit(VM_EV_STOP, NULL);
	}
	return 0;
}

int vm_cont(struct vm *vm)
{
	/* As the real VM: in inmigrate, cont means "start on arrival". */
	if (fake.runstate == VM_RS_INMIGRATE)
		return 0;
	if (fake.runstate == VM_RS_FINISH_MIGRATE)
		return -EBUSY;
	if (fake.runstate != VM_RS_RUNNING) {
		fake.runstate = VM_RS_RUNNING;
		fakevm_emit(VM_EV_RESUME, NULL);
	}
	return 0;
}

vmig_session *vm_session(struct vm *vm)
{
	return (vmig_session *)&session_token;
}

struct vm_objects *vm_objects(struct vm *vm)
{
	return fake.objects;
}

int vm_pmemsave(struct vm *vm, uint64_t addr, uint64_t size, const char *path,
		struct vmig__err *err)
{
	if (addr > fake.guest.mem_bytes || size > fake.guest.mem_bytes - addr) {
		vmig__err_set(err, "pmemsave: range outside guest memory");
		return -EINVAL;
	}
	fake.pmem_addr = addr;
	fake.pmem_size = size;
	snprintf(fake.pmem_path, sizeof(fake.pmem_path), "%s", path);
	return 0;
}

void vm_guest_stats(struct vm *vm, struct vm_guest_stats *out)
{
	*out = fake.guest;
}

/* ---- the part of vmig.h the QMP layer uses ---- */

const char *vmig_status_name(enum vmig_status status)
{
	static const char *const names[] = {
	    "none",	 "setup",	    "cancelling",      "cancelled",
	    "active",	 "postcopy-active", "postcopy-paused", "postcopy-recover",
	    "completed", "failed",	    "device"};

	return (unsigned)status < sizeof(names) / sizeof(names[0]) ? names[status] : "unknown";
}

const char *vmig_session_error(const vmig_session *s)
{
	return fake.error_text;
}

const char *const *vmig_capability_names(void)
{
	return cap_names;
}

const char *const *vmig_parameter_names(void)
{
	return param_names;
}

static int find(const char *const *names, const char *name)
{
	for (int i = 0; names[i]; i++)
		if (!strcmp(names[i], name))
			return i;
	return -1;
}

const char *const *vmig_parameter_choices(const char *name)
{
	return !strcmp(name, "multifd-compression") ? compression_names : NULL;
}

int vmig_capability_set(vmig_session *s, const char *name, bool on)
{
	int i = find(cap_names, name), e = take_error();

	if (e)
		return e;
	if (i < 0)
		return -ENOENT;
	fake.caps[i] = on;
	return 0;
}

int vmig_capability_get(const vmig_session *s, const char *name, bool *on)
{
	int i = find(cap_names, name);

	if (i < 0)
		return -ENOENT;
	*on = fake.caps[i];
	return 0;
}

int vmig_parameter_set(vmig_session *s, const char *name, int64_t value)
{
	int i = find(param_names, name), e = take_error();

	if (e)
		return e;
	if (i < 0)
		return -ENOENT;
	if (value < 0 || (vmig_parameter_choices(name) && value > 2))
		return -ERANGE;
	fake.params[i] = value;
	return 0;
}

int vmig_parameter_get(const vmig_session *s, const char *name, int64_t *value)
{
	int i = find(param_names, name);

	if (i < 0)
		return -ENOENT;
	*value = fake.params[i];
	return 0;
}

int vmig_migrate(vmig_session *s, const char *uri)
{
	int e = take_error();

	fake.migrate_calls++;
	snprintf(fake.last_uri, sizeof(fake.last_uri), "%s", uri);
	if (e)
		return e;
	fake.stats.status = VMIG_STATUS_ACTIVE;
	fake.stats.is_source = true;
	return 0;
}

int vmig_incoming(vmig_session *s, const char *uri)
{
	int e = take_error();

	fake.incoming_calls++;
	snprintf(fake.last_uri, sizeof(fake.last_uri), "%s", uri);
	if (e)
		return e;
	fake.stats.status = VMIG_STATUS_SETUP;
	fake.stats.is_source = false;
	return 0;
}

int vmig_cancel(vmig_session *s)
{
	int e = take_error();

	fake.cancel_calls++;
	if (e)
		return e;
	if (fake.stats.status == VMIG_STATUS_ACTIVE || fake.stats.status == VMIG_STATUS_SETUP)
		fake.stats.status = VMIG_STATUS_CANCELLED;
	return 0;
}

int vmig_query(vmig_session *s, struct vmig_stats *out)
{
	*out = fake.stats;
	return 0;
}

int vmig_start_postcopy(vmig_session *s)
{
	int e = take_error();

	if (e)
		return e;
	if (fake.stats.status != VMIG_STATUS_ACTIVE)
		return -EINVAL;
	fake.stats.status = VMIG_STATUS_POSTCOPY_ACTIVE;
	return 0;
}

int vmig_pause(vmig_session *s)
{
	int e = take_error();

	if (e)
		return e;
	if (fake.stats.status != VMIG_STATUS_POSTCOPY_ACTIVE &&
	    fake.stats.status != VMIG_STATUS_POSTCOPY_RECOVER)
		return -EINVAL;
	fake.stats.status = VMIG_STATUS_POSTCOPY_PAUSED;
	return 0;
}

static int fake_recover(const char *uri)
{
	int e = take_error();

	snprintf(fake.last_uri, sizeof(fake.last_uri), "%s", uri);
	if (e)
		return e;
	if (fake.stats.status != VMIG_STATUS_POSTCOPY_PAUSED)
		return -EINVAL;
	fake.stats.status = VMIG_STATUS_POSTCOPY_RECOVER;
	return 0;
}

int vmig_continue(vmig_session *s, enum vmig_status state)
{
	int e = take_error();

	if (e)
		return e;
	if (fake.stats.status != VMIG_STATUS_PRE_SWITCHOVER || state != fake.stats.status)
		return -EINVAL;
	fake.stats.status = VMIG_STATUS_DEVICE;
	return 0;
}

int vmig_recover(vmig_session *s, const char *uri)
{
	return fake_recover(uri);
}

int vmig_resume(vmig_session *s, const char *uri)
{
	return fake_recover(uri);
}

/* ---- TLS: credentials that read no file ---- */

struct vmig_tls_creds {
	unsigned refs;
};

/* fake.creds_error makes them fail, as a missing file would. */
static int fake_creds_new(vmig_tls_creds **out, const struct vmig_tls_creds_opts *opts, char *err,
			  size_t errlen)
{
	int e = fake.creds_error;

	*out = NULL;
	fake.tls_opts = *opts;
	fake.tls_opts.dir = fake.tls_opts.username = NULL;
	snprintf(fake.tls_dir, sizeof(fake.tls_dir), "%s", opts->dir ? opts->dir : "");
	snprintf(fake.tls_username, sizeof(fake.tls_username), "%s",
		 opts->username ? opts->username : "");
	if (e) {
		snprintf(err, errlen, "cannot read %s/ca-cert.pem: %s", opts->dir, strerror(-e));
		return e;
	}
	*out = calloc(1, sizeof(**out));
	if (!*out)
		return -ENOMEM;
	(*out)->refs = 1;
	fake.tls_creds_live++;
	return 0;
}

int vmig_tls_creds_new_x509(vmig_tls_creds **out, const struct vmig_tls_creds_opts *opts, char *err,
			    size_t errlen)
{
	return fake_creds_new(out, opts, err, errlen);
}

int vmig_tls_creds_new_psk(vmig_tls_creds **out, const struct vmig_tls_creds_opts *opts, char *err,
			   size_t errlen)
{
	return fake_creds_new(out, opts, err, errlen);
}

void vmig_tls_creds_unref(vmig_tls_creds *creds)
{
	if (creds && !--creds->refs) {
		free(creds);
		fake.tls_creds_live--;
	}
}

int vmig_session_set_tls(vmig_session *s, vmig_tls_creds *creds, const char *hostname,
			 const char *authz_identity)
{
	fake.set_tls_calls++;
	if (fake.set_tls_error)
		return fake.set_tls_error;
	if (creds)
		creds->refs++;
	vmig_tls_creds_unref(fake.tls_creds);
	fake.tls_creds = creds;
	snprintf(fake.tls_hostname, sizeof(fake.tls_hostname), "%s", hostname ? hostname : "");
	snprintf(fake.tls_authz, sizeof(fake.tls_authz), "%s",
		 authz_identity ? authz_identity : "");
	return 0;
}

/* calc-dirty-rate on the fake: the library's checks of the arguments, and
 * a measurement that ends at once (the fake guest writes nothing). */
static struct vmig_dirty_rate fake_dr;

int vmig_calc_dirty_rate(vmig_session *s, int64_t calc_time_ms, enum vmig_dirty_rate_mode mode,
			 uint64_t sample_pages)
{
	if (calc_time_ms < 1000 || calc_time_ms > 60000 ||
	    (mode == VMIG_DIRTY_RATE_PAGE_SAMPLING && sample_pages &&
	     (sample_pages < 128 || sample_pages > 16384)))
		return -ERANGE;
	if (mode != VMIG_DIRTY_RATE_PAGE_SAMPLING && mode != VMIG_DIRTY_RATE_DIRTY_BITMAP)
		return -EINVAL;
	fake_dr = (struct vmig_dirty_rate){.status = VMIG_DIRTY_RATE_MEASURED,
					   .mode = mode,
					   .calc_time_ms = calc_time_ms,
					   .sample_pages = sample_pages ? sample_pages : 512};
	return 0;
}

int vmig_query_dirty_rate(vmig_session *s, struct vmig_dirty_rate *out)
{
	*out = fake_dr;
	return 0;
}
