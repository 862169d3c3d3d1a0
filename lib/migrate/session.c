// SPDX-License-Identifier: MIT
/*
 * The libvmig session: creation, RAM block registration, capabilities and
 * parameters, status and statistics, and starting or cancelling a migration.
 * The data path itself is in source.c and dest.c.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <linux/magic.h>
#include <sys/socket.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "migrate/migrate_int.h"
#include "postcopy/postcopy.h"
#include "ram/bitmap.h"

static const char *const status_names[VMIG_STATUS__MAX] = {
	[VMIG_STATUS_NONE] = "none",
	[VMIG_STATUS_SETUP] = "setup",
	[VMIG_STATUS_CANCELLING] = "cancelling",
	[VMIG_STATUS_CANCELLED] = "cancelled",
	[VMIG_STATUS_ACTIVE] = "active",
	[VMIG_STATUS_POSTCOPY_ACTIVE] = "postcopy-active",
	[VMIG_STATUS_POSTCOPY_PAUSED] = "postcopy-paused",
	[VMIG_STATUS_POSTCOPY_RECOVER] = "postcopy-recover",
	[VMIG_STATUS_COMPLETED] = "completed",
	[VMIG_STATUS_FAILED] = "failed",
	[VMIG_STATUS_DEVICE] = "device",
	[VMIG_STATUS_PRE_SWITCHOVER] = "pre-switchover",
};

static const char *const cap_names[VMIG_CAP__MAX + 1] = {
    [VMIG_CAP_POSTCOPY_RAM] = "postcopy-ram",
    [VMIG_CAP_POSTCOPY_BLOCKTIME] = "postcopy-blocktime",
    [VMIG_CAP_POSTCOPY_PREEMPT] = "postcopy-preempt",
    [VMIG_CAP_MULTIFD] = "multifd",
    [VMIG_CAP_AUTO_CONVERGE] = "auto-converge",
    [VMIG_CAP_VERIFY_MEMORY] = "x-vmig-verify-memory",
    [VMIG_CAP_PAUSE_BEFORE_SWITCHOVER] = "pause-before-switchover",
    [VMIG_CAP_ZERO_COPY_SEND] = "zero-copy-send",
};

/* Capabilities this build can act on; the others are listed (so tools see
 * QEMU's names) but refuse to be switched on. */
static const bool cap_supported[VMIG_CAP__MAX] = {
    [VMIG_CAP_POSTCOPY_RAM] = true,
    [VMIG_CAP_POSTCOPY_BLOCKTIME] = true,
    /* vmig always sends requested pages on their own channel */
    [VMIG_CAP_POSTCOPY_PREEMPT] = true,
    [VMIG_CAP_MULTIFD] = true,
    [VMIG_CAP_AUTO_CONVERGE] = true, /* if the VMM can throttle: see below */
    [VMIG_CAP_VERIFY_MEMORY] = true,
    [VMIG_CAP_PAUSE_BEFORE_SWITCHOVER] = true,
    [VMIG_CAP_ZERO_COPY_SEND] = true, /* multifd only: check_zero_copy() */
};

/* Names by index, NULL-terminated, as vmig_parameter_names() returns them. */
static const char *const param_names[VMIG_PARAM__MAX + 1] = {
    [VMIG_PARAM_MAX_BANDWIDTH] = "max-bandwidth",
    [VMIG_PARAM_DOWNTIME_LIMIT] = "downtime-limit",
    [VMIG_PARAM_MULTIFD_CHANNELS] = "multifd-channels",
    [VMIG_PARAM_DIRTY_TRACKING] = "x-vmig-dirty-tracking",
    [VMIG_PARAM_MAX_POSTCOPY_BANDWIDTH] = "max-postcopy-bandwidth",
    [VMIG_PARAM_CPU_THROTTLE_INITIAL] = "cpu-throttle-initial",
    [VMIG_PARAM_CPU_THROTTLE_INCREMENT] = "cpu-throttle-increment",
    [VMIG_PARAM_MAX_CPU_THROTTLE] = "max-cpu-throttle",
    [VMIG_PARAM_THROTTLE_TRIGGER_THRESHOLD] = "throttle-trigger-threshold",
    [VMIG_PARAM_MULTIFD_COMPRESSION] = "multifd-compression",
    [VMIG_PARAM_MULTIFD_ZSTD_LEVEL] = "multifd-zstd-level",
    [VMIG_PARAM_MULTIFD_ZLIB_LEVEL] = "multifd-zlib-level",
};

/* QEMU's MultiFDCompression, by value. */
static const char *const compression_names[] = {
	[VMIG_COMPRESS_NONE] = "none",
	[VMIG_COMPRESS_ZLIB] = "zlib",
	[VMIG_COMPRESS_ZSTD] = "zstd",
	NULL,
};

static const struct {
	int64_t def, min, max;
	bool live; /* may change while a migration runs */
	const char *const *choices; /* names of the values, for enum parameters */
} param_info[VMIG_PARAM__MAX] = {
    [VMIG_PARAM_MAX_BANDWIDTH] = {.def = 0, .min = 0, .max = INT64_MAX, .live = true},
    [VMIG_PARAM_DOWNTIME_LIMIT] = {.def = 300, .min = 0, .max = 2000000, .live = true},
    [VMIG_PARAM_MULTIFD_CHANNELS] = {.def = 2, .min = 1, .max = 255},
    [VMIG_PARAM_DIRTY_TRACKING] = {.def = VMIG_DIRTY_AUTO,
				   .min = VMIG_DIRTY_AUTO,
				   .max = VMIG_DIRTY_UFFD_SYNC},
    [VMIG_PARAM_MAX_POSTCOPY_BANDWIDTH] = {.def = 0, .min = 0, .max = INT64_MAX, .live = true},
    /* QEMU's defaults and ranges */
    [VMIG_PARAM_CPU_THROTTLE_INITIAL] = {.def = 20, .min = 1, .max = 99, .live = true},
    [VMIG_PARAM_CPU_THROTTLE_INCREMENT] = {.def = 10, .min = 1, .max = 99, .live = true},
    [VMIG_PARAM_MAX_CPU_THROTTLE] = {.def = 99, .min = 1, .max = 99, .live = true},
    [VMIG_PARAM_THROTTLE_TRIGGER_THRESHOLD] = {.def = 50, .min = 1, .max = 100, .live = true},
    [VMIG_PARAM_MULTIFD_COMPRESSION] = {.def = VMIG_COMPRESS_NONE,
					.min = VMIG_COMPRESS_NONE,
					.max = VMIG_COMPRESS_ZSTD,
					.choices = compression_names},
    [VMIG_PARAM_MULTIFD_ZSTD_LEVEL] = {.def = 1, .min = 0, .max = 20},
    [VMIG_PARAM_MULTIFD_ZLIB_LEVEL] = {.def = 1, .min = 0, .max = 9},
};

/* Under s->lock: shut every connection of the migration down. */
static void shutdown_all(struct vmig_session *s)
{
	if (s->ch)
		vmig__chan_shutdown(s->ch, SHUT_RDWR);
	if (s->urgent)
		vmig__chan_shutdown(s->urgent, SHUT_RDWR);
	for (unsigned i = 0; i < s->mf_count; i++)
		if (s->mf_chans[i])
			vmig__chan_shutdown(s->mf_chans[i], SHUT_RDWR);
}

VMIG_EXPORT const char *vmig_status_name(enum vmig_status status)
{
	if ((unsigned)status >= VMIG_STATUS__MAX)
		return "unknown";
	return status_names[status];
}

VMIG_EXPORT const char *const *vmig_capability_names(void)
{
	return cap_names;
}

VMIG_EXPORT const char *const *vmig_parameter_names(void)
{
	return param_names;
}

VMIG_EXPORT int vmig_session_new(vmig_session **out, const struct vmig_vm_ops *ops, void *opaque)
{
	struct vmig_session *s;

	if (!out || !ops || !ops->stop || !ops->start || !ops->save_state || !ops->load_state)
		return -EINVAL;
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->ops = *ops;
	s->opaque = opaque;
	s->listen_fd = -1;
	s->autostart = true;
	s->cancel_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	s->recover_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (s->cancel_efd < 0 || s->recover_efd < 0) {
		int ret = -errno;

		if (s->cancel_efd >= 0)
			close(s->cancel_efd);
		if (s->recover_efd >= 0)
			close(s->recover_efd);
		free(s);
		return ret;
	}
	for (int i = 0; i < VMIG_PARAM__MAX; i++)
		s->params[i] = param_info[i].def;
	pthread_mutex_init(&s->lock, NULL);
	pthread_mutex_init(&s->rp_lock, NULL);
	pthread_cond_init(&s->cond, NULL);
	s->stats.ram.page_size = VMIG_PAGE_SIZE;
	*out = s;
	return 0;
}

/* Join a finished (or cancelled) migration thread. */
static void join_thread(struct vmig_session *s)
{
	if (!s->thread_started)
		return;
	pthread_join(s->thread, NULL);
	s->thread_started = false;
}

static bool status_running(enum vmig_status st)
{
	return st == VMIG_STATUS_SETUP || st == VMIG_STATUS_ACTIVE ||
	       st == VMIG_STATUS_CANCELLING || st == VMIG_STATUS_DEVICE ||
	       st == VMIG_STATUS_PRE_SWITCHOVER || st == VMIG_STATUS_POSTCOPY_ACTIVE ||
	       st == VMIG_STATUS_POSTCOPY_PAUSED || st == VMIG_STATUS_POSTCOPY_RECOVER;
}

bool vmig__migration_running(struct vmig_session *s)
{
	enum vmig_status st;

	pthread_mutex_lock(&s->lock);
	st = s->status;
	pthread_mutex_unlock(&s->lock);
	return status_running(st);
}

VMIG_EXPORT void vmig_session_free(vmig_session *s)
{
	if (!s)
		return;
	/* Stop everything, post-copy included (vmig_cancel refuses that). */
	vmig_cancel(s);
	__atomic_store_n(&s->cancel, true, __ATOMIC_RELEASE);
	vmig__break_channels(s);
	eventfd_write(s->cancel_efd, 1);
	eventfd_write(s->recover_efd, 1);
	join_thread(s);
	vmig__dirty_rate_stop(s);
	/* A failed post-copy destination kept guest RAM registered: only now,
	 * with the embedder tearing the VM down, is it let go. */
	vmig__dest_pc_free(s, s->pcd);
	for (unsigned i = 0; i < s->nblocks; i++) {
		free(s->blocks[i].dirty);
		free(s->blocks[i].page_hash);
		free(s->blocks[i].received);
		free(s->blocks[i].zero);
		free(s->blocks[i].placed);
		free(s->blocks[i].installed);
		free(s->blocks[i].requested);
	}
	if (s->listen_fd >= 0)
		close(s->listen_fd);
	vmig__tls_clear(&s->tls);
	close(s->cancel_efd);
	close(s->recover_efd);
	pthread_cond_destroy(&s->cond);
	pthread_mutex_destroy(&s->rp_lock);
	pthread_mutex_destroy(&s->lock);
	free(s);
}

VMIG_EXPORT const char *vmig_session_error(const vmig_session *s)
{
	return s ? s->api_err.msg : "";
}

VMIG_EXPORT int vmig_ram_block_add(vmig_session *s, const struct vmig_ram_block *blk)
{
	struct vmig__block *b;
	size_t words;

	if (!s || !blk || !blk->name || !blk->host)
		return -EINVAL;
	if (!*blk->name || strlen(blk->name) > VMIG_BLOCK_NAME_MAX || !blk->size ||
	    blk->size % VMIG_PAGE_SIZE || (uintptr_t)blk->host % VMIG_PAGE_SIZE ||
	    blk->flags & ~VMIG_RAM_PREALLOC) {
		vmig__err_set(&s->api_err, "RAM block '%s': bad name, size, alignment or flags",
			      blk->name);
		return -EINVAL;
	}
	if (s->nblocks == VMIG_MAX_BLOCKS || s->thread_started)
		return -EBUSY;
	for (unsigned i = 0; i < s->nblocks; i++)
		if (!strcmp(s->blocks[i].name, blk->name))
			return -EEXIST;
	b = &s->blocks[s->nblocks];
	memset(b, 0, sizeof(*b));
	strcpy(b->name, blk->name);
	b->host = blk->host;
	b->size = blk->size;
	b->npages = blk->size / VMIG_PAGE_SIZE;
	b->fd = blk->fd;
	b->fd_offset = blk->fd_offset;
	b->prealloc = blk->flags & VMIG_RAM_PREALLOC;
	if (blk->fd >= 0) { /* huge pages: QEMU's memory-backend-*,hugetlb=on */
		struct statfs st;

		if (!fstatfs(blk->fd, &st) && st.f_type == HUGETLBFS_MAGIC)
			b->hpage = (uint64_t)st.f_bsize;
		if (b->hpage && (blk->size % b->hpage || (uintptr_t)blk->host % b->hpage ||
				 blk->fd_offset % b->hpage)) {
			vmig__err_set(&s->api_err,
				      "RAM block '%s': not aligned to its %llu KiB huge pages",
				      blk->name, (unsigned long long)(b->hpage >> 10));
			return -EINVAL;
		}
	}
	words = vmig__bitmap_words(b->npages);
	b->dirty = calloc(words, sizeof(uint64_t));
	b->received = calloc(words, sizeof(uint64_t));
	b->zero = calloc(words, sizeof(uint64_t));
	b->placed = calloc(words, sizeof(uint64_t));
	b->installed = calloc(words, sizeof(uint64_t));
	b->requested = calloc(words, sizeof(uint64_t));
	b->page_hash = calloc(b->npages, sizeof(uint64_t));
	if (!b->dirty || !b->received || !b->zero || !b->placed || !b->installed || !b->requested ||
	    !b->page_hash) {
		free(b->dirty);
		free(b->received);
		free(b->zero);
		free(b->placed);
		free(b->installed);
		free(b->requested);
		free(b->page_hash);
		return -ENOMEM;
	}
	s->nblocks++;
	pthread_mutex_lock(&s->lock);
	s->stats.ram.total += blk->size;
	pthread_mutex_unlock(&s->lock);
	return 0;
}

/* Index of name in a NULL-terminated name table, or -1. */
static int name_index(const char *const *names, const char *name)
{
	for (int i = 0; name && names[i]; i++)
		if (!strcmp(names[i], name))
			return i;
	return -1;
}

VMIG_EXPORT int vmig_capability_set(vmig_session *s, const char *name, bool on)
{
	int i = name_index(cap_names, name);

	if (!s)
		return -EINVAL;
	if (i < 0) {
		vmig__err_set(&s->api_err, "unknown migration capability '%s'", name ? name : "");
		return -ENOENT;
	}
	if (vmig__migration_running(s)) {
		vmig__err_set(&s->api_err, "cannot change capability '%s' during a migration", name);
		return -EBUSY;
	}
	if (on && !cap_supported[i]) {
		vmig__err_set(&s->api_err, "capability '%s' is not supported by this build", name);
		return -ENOTSUP;
	}
	if (on && i == VMIG_CAP_AUTO_CONVERGE && !s->ops.throttle) {
		vmig__err_set(&s->api_err, "auto-converge needs a VMM that can throttle its vCPUs");
		return -ENOTSUP;
	}
	s->caps[i] = on;
	return 0;
}

VMIG_EXPORT int vmig_capability_get(const vmig_session *s, const char *name, bool *on)
{
	int i = name_index(cap_names, name);

	if (!s || !on)
		return -EINVAL;
	if (i < 0)
		return -ENOENT;
	*on = s->caps[i];
	return 0;
}

VMIG_EXPORT int vmig_parameter_set(vmig_session *s, const char *name, int64_t value)
{
	int i = name_index(param_names, name);

	if (!s)
		return -EINVAL;
	if (i < 0) {
		vmig__err_set(&s->api_err, "unknown migration parameter '%s'", name ? name : "");
		return -ENOENT;
	}
	if (value < param_info[i].min || value > param_info[i].max) {
		vmig__err_set(&s->api_err, "parameter '%s' must be between %lld and %lld", name,
			      (long long)param_info[i].min, (long long)param_info[i].max);
		return -ERANGE;
	}
	if (!param_info[i].live && vmig__migration_running(s)) {
		vmig__err_set(&s->api_err, "cannot change parameter '%s' during a migration", name);
		return -EBUSY;
	}
	__atomic_store_n(&s->params[i], value, __ATOMIC_RELAXED);
	return 0;
}

VMIG_EXPORT const char *const *vmig_parameter_choices(const char *name)
{
	int i = name_index(param_names, name);

	return i < 0 ? NULL : param_info[i].choices;
}

VMIG_EXPORT int vmig_parameter_get(const vmig_session *s, const char *name, int64_t *value)
{
	int i = name_index(param_names, name);

	if (!s || !value)
		return -EINVAL;
	if (i < 0)
		return -ENOENT;
	*value = __atomic_load_n(&s->params[i], __ATOMIC_RELAXED);
	return 0;
}

VMIG_EXPORT int vmig_set_autostart(vmig_session *s, bool on)
{
	if (!s)
		return -EINVAL;
	s->autostart = on;
	return 0;
}

void vmig__emit(struct vmig_session *s, enum vmig_event_type type)
{
	struct vmig_event ev = {.type = type};

	pthread_mutex_lock(&s->lock);
	ev.status = s->status;
	pthread_mutex_unlock(&s->lock);
	if (s->ops.event)
		s->ops.event(s->opaque, &ev);
}

bool vmig__set_status_locked(struct vmig_session *s, enum vmig_status st)
{
	if (s->status == st)
		return false;
	s->status = st;
	s->stats.status = st;
	return true;
}

void vmig__set_status(struct vmig_session *s, enum vmig_status st)
{
	bool changed;

	pthread_mutex_lock(&s->lock);
	changed = vmig__set_status_locked(s, st);
	pthread_mutex_unlock(&s->lock);
	if (changed)
		vmig__emit(s, VMIG_EVENT_STATUS);
}

int vmig__wait_recover(struct vmig_session *s)
{
	bool changed = false;

	pthread_mutex_lock(&s->lock);
	while (!s->recover_requested && !vmig__cancelled(s))
		pthread_cond_wait(&s->cond, &s->lock);
	if (!vmig__cancelled(s)) {
		/* In one step with the request: what it set up (the URI, the
		 * destination's listen_fd) is the caller's from here. */
		s->recover_requested = false;
		changed = vmig__set_status_locked(s, VMIG_STATUS_POSTCOPY_RECOVER);
	}
	pthread_mutex_unlock(&s->lock);
	if (vmig__cancelled(s))
		return -ECANCELED;
	if (changed)
		vmig__emit(s, VMIG_EVENT_STATUS);
	return 0;
}

void vmig__fail(struct vmig_session *s, int ret, const char *fmt, ...)
{
	va_list ap;
	bool cancelled = vmig__cancelled(s);

	pthread_mutex_lock(&s->lock);
	if (!s->mig_err.msg[0] && !cancelled) {
		va_start(ap, fmt);
		vmig__err_vset(&s->mig_err, fmt, ap);
		va_end(ap);
		if (ret && !strstr(s->mig_err.msg, strerror(-ret)) && strlen(s->mig_err.msg) < 200)
			snprintf(s->mig_err.msg + strlen(s->mig_err.msg),
				 sizeof(s->mig_err.msg) - strlen(s->mig_err.msg), " (%s)",
				 strerror(-ret));
	}
	snprintf(s->stats.error_desc, sizeof(s->stats.error_desc), "%s", s->mig_err.msg);
	pthread_mutex_unlock(&s->lock);
	/* The source publishes its end state once it has decided who runs
	 * the guest and restarted its vCPUs if they may run (source.c): a
	 * "failed" seen by an orchestrator must mean the VM already runs. */
	if (!s->is_source)
		vmig__set_status(s, cancelled ? VMIG_STATUS_CANCELLED : VMIG_STATUS_FAILED);
}

void vmig__fail_unknown(struct vmig_session *s)
{
	char why[256];

	pthread_mutex_lock(&s->lock);
	snprintf(why, sizeof(why), "%.100s",
		 s->mig_err.msg[0] ? s->mig_err.msg : "the migration was cancelled");
	vmig__err_set(&s->mig_err,
		      "the connection failed after the final device state was sent (%s): the "
		      "destination may be running, so the VM stays paused here; start it on "
		      "exactly one side",
		      why);
	snprintf(s->stats.error_desc, sizeof(s->stats.error_desc), "%s", s->mig_err.msg);
	s->stats.handover_unknown = true;
	pthread_mutex_unlock(&s->lock);
	vmig__set_status(s, VMIG_STATUS_FAILED);
}

void vmig__note_err(struct vmig_session *s, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&s->lock);
	if (!s->mig_err.msg[0]) {
		va_start(ap, fmt);
		vmig__err_vset(&s->mig_err, fmt, ap);
		va_end(ap);
	}
	pthread_mutex_unlock(&s->lock);
}

void vmig__get_err(struct vmig_session *s, struct vmig__err *out)
{
	pthread_mutex_lock(&s->lock);
	*out = s->mig_err;
	pthread_mutex_unlock(&s->lock);
}

void vmig__clear_err(struct vmig_session *s)
{
	pthread_mutex_lock(&s->lock);
	vmig__err_clear(&s->mig_err);
	pthread_mutex_unlock(&s->lock);
}

void vmig__publish(struct vmig_session *s, const struct vmig_stats *st)
{
	pthread_mutex_lock(&s->lock);
	s->stats.total_time_ms = st->total_time_ms;
	s->stats.setup_time_ms = st->setup_time_ms;
	s->stats.downtime_ms = st->downtime_ms;
	s->stats.downtime_us = st->downtime_us;
	s->stats.expected_downtime_ms = st->expected_downtime_ms;
	s->stats.cpu_throttle_percentage = st->cpu_throttle_percentage;
	s->stats.ram = st->ram;
	pthread_mutex_unlock(&s->lock);
}

/* Reset per-migration state; called with no migration thread running. */
static int begin(struct vmig_session *s, const char *uri, bool source)
{
	uint64_t junk;
	bool busy;

	if (!s->nblocks) {
		vmig__err_set(&s->api_err, "no guest RAM registered");
		return -EINVAL;
	}
	if (vmig__migration_running(s)) {
		vmig__err_set(&s->api_err, "a migration is already in progress");
		return -EBUSY;
	}
	pthread_mutex_lock(&s->lock);
	busy =
	    s->dr.status == VMIG_DIRTY_RATE_MEASURING && s->dr.mode == VMIG_DIRTY_RATE_DIRTY_BITMAP;
	pthread_mutex_unlock(&s->lock);
	if (busy) {
		vmig__err_set(&s->api_err, "a dirty-rate measurement in dirty-bitmap mode holds "
					   "guest RAM until it ends");
		return -EBUSY;
	}
	join_thread(s);
	while (read(s->cancel_efd, &junk, sizeof(junk)) > 0)
		;
	while (read(s->recover_efd, &junk, sizeof(junk)) > 0)
		;
	__atomic_store_n(&s->cancel, false, __ATOMIC_RELEASE);
	snprintf(s->uri, sizeof(s->uri), "%s", uri);
	s->is_source = source;
	s->start_ns = vmig__now_ns();
	s->rp_started = s->rp_resumed = s->rp_complete = s->rp_error = false;
	__atomic_store_n(&s->rp_failed, false, __ATOMIC_RELEASE);
	s->rp_acked_round = 0;
	__atomic_store_n(&s->in_postcopy, false, __ATOMIC_RELEASE);
	s->recover_requested = s->continue_requested = false;
	__atomic_store_n(&s->committed, false, __ATOMIC_RELEASE);
	__atomic_store_n(&s->postcopy_requested, false, __ATOMIC_RELEASE);
	__atomic_store_n(&s->pause_requested, false, __ATOMIC_RELEASE);
	/* Ties the channels of this migration together (and a resumed one).
	 * It must be unguessable: without it, nothing else could tell a side
	 * channel of ours from one of an intruder's (without TLS). */
	if (getrandom(&s->session_id, sizeof(s->session_id), 0) != sizeof(s->session_id)) {
		vmig__err_set(&s->api_err, "no random session id: %s", strerror(errno));
		return -EIO;
	}
	pthread_mutex_lock(&s->lock);
	vmig__err_clear(&s->mig_err);
	memset(&s->stats, 0, sizeof(s->stats));
	s->stats.is_source = source;
	s->stats.ram.page_size = VMIG_PAGE_SIZE;
	for (unsigned i = 0; i < s->nblocks; i++)
		s->stats.ram.total += s->blocks[i].size;
	pthread_mutex_unlock(&s->lock);
	vmig__set_status(s, VMIG_STATUS_SETUP);
	return 0;
}

static int spawn(struct vmig_session *s, void *(*fn)(void *))
{
	int ret = pthread_create(&s->thread, NULL, fn, s);

	if (ret) {
		vmig__fail(s, -ret, "cannot start the migration thread");
		vmig__set_status(s, VMIG_STATUS_FAILED); /* no thread to do it */
		return -ret;
	}
	pthread_setname_np(s->thread, s->is_source ? "vmig-send" : "vmig-recv");
	s->thread_started = true;
	return 0;
}

VMIG_EXPORT int vmig_session_set_tls(vmig_session *s, vmig_tls_creds *creds, const char *hostname,
				     const char *authz_identity)
{
	struct vmig__err err = {{0}};
	int ret;

	if (!s)
		return -EINVAL;
	/* A paused post-copy may come back with other credentials: nothing
	 * connects or accepts until vmig_recover/vmig_resume, under lock. */
	pthread_mutex_lock(&s->lock);
	if (status_running(s->status) && s->status != VMIG_STATUS_POSTCOPY_PAUSED) {
		pthread_mutex_unlock(&s->lock);
		vmig__err_set(&s->api_err, "TLS settings cannot change while a migration runs");
		return -EBUSY;
	}
	ret = vmig__tls_set(&s->tls, creds, hostname, authz_identity, &err);
	pthread_mutex_unlock(&s->lock);
	if (ret)
		vmig__err_set(&s->api_err, "%s", err.msg);
	return ret;
}

/* The TLS credentials must be made for this side (as QEMU checks). */
static int check_tls(struct vmig_session *s, bool source)
{
	return vmig__tls_check_endpoint(
	    &s->tls, source ? VMIG_TLS_ENDPOINT_CLIENT : VMIG_TLS_ENDPOINT_SERVER, &s->api_err);
}

/* zero-copy-send: QEMU's rule (multifd, neither compression nor TLS, which
 * both send bytes other than guest RAM's), and MSG_ZEROCOPY needs TCP. */
static int check_zero_copy(struct vmig_session *s, const struct vmig__uri *u)
{
	const char *why = NULL;

	if (!s->caps[VMIG_CAP_ZERO_COPY_SEND])
		return 0;
	if (!s->caps[VMIG_CAP_MULTIFD])
		why = "it needs multifd";
	else if (vmig__param(s, VMIG_PARAM_MULTIFD_COMPRESSION) != VMIG_COMPRESS_NONE)
		why = "it cannot be used with multifd-compression";
	else if (s->tls.creds)
		why = "it cannot be used with TLS";
	else if (u->kind != VMIG_URI_TCP)
		why = "it needs a tcp: URI";
	if (!why)
		return 0;
	vmig__err_set(&s->api_err, "zero-copy-send: %s", why);
	return -EINVAL;
}

VMIG_EXPORT int vmig_migrate(vmig_session *s, const char *uri)
{
	struct vmig__uri u;
	int ret;

	if (!s || !uri)
		return -EINVAL;
	ret = vmig__uri_parse(uri, &u, &s->api_err);
	if (!ret)
		ret = check_tls(s, true);
	if (!ret)
		ret = check_zero_copy(s, &u);
	if (ret)
		return ret;
	ret = begin(s, uri, true);
	return ret ? ret : spawn(s, vmig__source_thread);
}

VMIG_EXPORT int vmig_incoming(vmig_session *s, const char *uri)
{
	struct vmig__uri u;
	int ret;

	if (!s || !uri)
		return -EINVAL;
	ret = vmig__uri_parse(uri, &u, &s->api_err);
	if (!ret)
		ret = check_tls(s, false);
	if (ret)
		return ret;
	if (vmig__migration_running(s)) {
		vmig__err_set(&s->api_err, "a migration is already in progress");
		return -EBUSY;
	}
	/* The previous migration's thread owns listen_fd until it ends: it
	 * may be closing it right now. */
	join_thread(s);
	if (s->pcd) { /* kept by a post-copy that failed after the guest ran */
		vmig__err_set(&s->api_err, "guest memory is incomplete after a failed post-copy "
					   "migration: this VM cannot take another one");
		return -EBUSY;
	}
	/* Bind now, so a busy port is reported to the caller at once. */
	if (s->listen_fd >= 0) {
		close(s->listen_fd);
		s->listen_fd = -1;
	}
	ret = vmig__chan_listen(&u, &s->listen_fd, &s->api_err);
	if (ret)
		return ret;
	ret = begin(s, uri, false);
	if (ret)
		return ret;
	return spawn(s, vmig__dest_thread);
}

VMIG_EXPORT int vmig_cancel(vmig_session *s)
{
	bool postcopy;

	if (!s)
		return -EINVAL;
	if (!vmig__migration_running(s))
		return 0;
	pthread_mutex_lock(&s->lock);
	/* After the switch the destination holds the newest state of the
	 * guest (and may have written to its disks): going back to the source
	 * is never a way out. Except on a source that lost the link before the
	 * destination said it runs: there the outcome is unknown, as after a
	 * pre-copy commit, and giving up leaves the choice to the operator. */
	postcopy = vmig__in_postcopy(s) &&
		   !(s->is_source && s->status == VMIG_STATUS_POSTCOPY_PAUSED && !s->rp_resumed);
	pthread_mutex_unlock(&s->lock);
	if (postcopy) {
		vmig__err_set(&s->api_err, "a post-copy migration cannot be cancelled");
		return -EBUSY;
	}
	__atomic_store_n(&s->cancel, true, __ATOMIC_RELEASE);
	pthread_mutex_lock(&s->lock);
	if (s->status == VMIG_STATUS_ACTIVE || s->status == VMIG_STATUS_SETUP ||
	    s->status == VMIG_STATUS_PRE_SWITCHOVER || s->status == VMIG_STATUS_POSTCOPY_PAUSED) {
		s->status = s->stats.status = VMIG_STATUS_CANCELLING;
		pthread_mutex_unlock(&s->lock);
		vmig__emit(s, VMIG_EVENT_STATUS);
		pthread_mutex_lock(&s->lock);
	}
	/* Unblock any socket I/O of the migration threads. */
	shutdown_all(s);
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	eventfd_write(s->cancel_efd, 1);
	eventfd_write(s->recover_efd, 1);
	return 0;
}

static enum vmig_status get_status(struct vmig_session *s)
{
	enum vmig_status st;

	pthread_mutex_lock(&s->lock);
	st = s->status;
	pthread_mutex_unlock(&s->lock);
	return st;
}

VMIG_EXPORT int vmig_start_postcopy(vmig_session *s)
{
	enum vmig_status st;

	if (!s)
		return -EINVAL;
	st = get_status(s);
	if (!s->is_source || (st != VMIG_STATUS_ACTIVE && st != VMIG_STATUS_SETUP)) {
		vmig__err_set(&s->api_err, "post-copy must be started after migration has been started");
		return -EINVAL;
	}
	if (!s->caps[VMIG_CAP_POSTCOPY_RAM]) {
		vmig__err_set(&s->api_err, "enable the postcopy-ram capability before migrating");
		return -EINVAL;
	}
	__atomic_store_n(&s->postcopy_requested, true, __ATOMIC_RELEASE);
	return 0;
}

/* Break the connections; the threads blocked on them see an error. */
void vmig__break_channels(struct vmig_session *s)
{
	pthread_mutex_lock(&s->lock);
	shutdown_all(s);
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
}

/* Detach all connections from the session and close them (the threads
 * that used them have been joined). */
void vmig__close_channels(struct vmig_session *s)
{
	struct vmig__chan *ch, *uch;

	pthread_mutex_lock(&s->lock);
	pthread_mutex_lock(&s->rp_lock);
	ch = s->ch;
	uch = s->urgent;
	s->ch = s->urgent = NULL;
	pthread_mutex_unlock(&s->rp_lock);
	for (unsigned i = 0; i < s->mf_count; i++) {
		vmig__chan_free(s->mf_chans[i]);
		s->mf_chans[i] = NULL;
	}
	s->mf_count = 0;
	pthread_mutex_unlock(&s->lock);
	vmig__chan_free(ch);
	vmig__chan_free(uch);
}

/*
 * As QEMU 8.2 and later: in postcopy-active, break the connections (both
 * sides pause); in postcopy-recover, also give up the recovery attempt,
 * wherever it waits (a source that never comes, a destination that never
 * answers): the side goes back to postcopy-paused for the next one.
 */
VMIG_EXPORT int vmig_pause(vmig_session *s)
{
	enum vmig_status st;

	if (!s)
		return -EINVAL;
	/* Under lock with the flag: a resume's connect looks at it there. */
	pthread_mutex_lock(&s->lock);
	st = s->status;
	if (st == VMIG_STATUS_POSTCOPY_ACTIVE || st == VMIG_STATUS_POSTCOPY_RECOVER) {
		__atomic_store_n(&s->pause_requested, true, __ATOMIC_RELEASE);
		if (st == VMIG_STATUS_POSTCOPY_RECOVER)
			eventfd_write(s->recover_efd, 1);
		shutdown_all(s);
		pthread_cond_broadcast(&s->cond);
	}
	pthread_mutex_unlock(&s->lock);
	if (st != VMIG_STATUS_POSTCOPY_ACTIVE && st != VMIG_STATUS_POSTCOPY_RECOVER) {
		vmig__err_set(&s->api_err,
			      "only possible in postcopy-active or postcopy-recover (now: %s)",
			      vmig_status_name(st));
		return -EINVAL;
	}
	return 0;
}

static int request_recovery(struct vmig_session *s, const char *uri, bool source)
{
	struct vmig__uri u;
	bool changed = false;
	int ret;

	if (!s || !uri)
		return -EINVAL;
	ret = vmig__uri_parse(uri, &u, &s->api_err);
	if (!ret)
		ret = check_tls(s, source);
	if (ret)
		return ret;
	/* Under the lock: the migration thread takes the request (and then
	 * listen_fd) and leaves postcopy-paused in one step. */
	pthread_mutex_lock(&s->lock);
	if (s->status != VMIG_STATUS_POSTCOPY_PAUSED || s->is_source != source ||
	    s->recover_requested) {
		pthread_mutex_unlock(&s->lock);
		vmig__err_set(&s->api_err, "%s is only possible on a paused post-copy %s",
			      source ? "resume" : "migrate-recover",
			      source ? "source" : "destination");
		return -EINVAL;
	}
	if (!source) {
		if (s->listen_fd >= 0)
			close(s->listen_fd);
		s->listen_fd = -1;
		ret = vmig__chan_listen(&u, &s->listen_fd, &s->api_err);
	}
	if (!ret) {
		uint64_t junk;

		snprintf(s->uri, sizeof(s->uri), "%s", uri);
		/* A pause of an earlier attempt is not one of this attempt. */
		__atomic_store_n(&s->pause_requested, false, __ATOMIC_RELEASE);
		while (read(s->recover_efd, &junk, sizeof(junk)) > 0)
			;
		s->recover_requested = true;
		/* At once, as the command returns: whoever looks next must not
		 * take the old pause for a new one. */
		changed = vmig__set_status_locked(s, VMIG_STATUS_POSTCOPY_RECOVER);
		pthread_cond_broadcast(&s->cond);
	}
	pthread_mutex_unlock(&s->lock);
	if (changed)
		vmig__emit(s, VMIG_EVENT_STATUS);
	return ret;
}

VMIG_EXPORT int vmig_recover(vmig_session *s, const char *uri)
{
	return request_recovery(s, uri, false);
}

VMIG_EXPORT int vmig_resume(vmig_session *s, const char *uri)
{
	return request_recovery(s, uri, true);
}

VMIG_EXPORT int vmig_continue(vmig_session *s, enum vmig_status state)
{
	if (!s)
		return -EINVAL;
	pthread_mutex_lock(&s->lock);
	if (s->status != state || state != VMIG_STATUS_PRE_SWITCHOVER) {
		pthread_mutex_unlock(&s->lock);
		vmig__err_set(&s->api_err, "migrate-continue: the migration is not in state '%s'",
			      vmig_status_name(state));
		return -EINVAL;
	}
	s->continue_requested = true;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	return 0;
}

VMIG_EXPORT bool vmig_vcpu_blocked(vmig_session *s, unsigned index)
{
	bool blocked = false;

	if (!s || index >= VMIG_MAX_VCPUS)
		return false;
	pthread_mutex_lock(&s->lock);
	if (s->pcd)
		blocked = vmig__pc_dest_vcpu_blocked(s->pcd, index);
	pthread_mutex_unlock(&s->lock);
	return blocked;
}

VMIG_EXPORT int vmig_vcpu_register(vmig_session *s, unsigned index, int tid)
{
	if (!s || index >= VMIG_MAX_VCPUS || tid <= 0)
		return -EINVAL;
	s->vcpu_tid[index] = tid;
	if (index >= s->nvcpus)
		s->nvcpus = index + 1;
	return 0;
}

VMIG_EXPORT int vmig_query(vmig_session *s, struct vmig_stats *out)
{
	if (!s || !out)
		return -EINVAL;
	pthread_mutex_lock(&s->lock);
	*out = s->stats;
	out->status = s->status;
	if (s->status == VMIG_STATUS_SETUP || s->status == VMIG_STATUS_ACTIVE ||
	    s->status == VMIG_STATUS_CANCELLING || s->status == VMIG_STATUS_DEVICE ||
	    s->status == VMIG_STATUS_PRE_SWITCHOVER)
		out->total_time_ms = (int64_t)((vmig__now_ns() - s->start_ns) / 1000000);
	pthread_mutex_unlock(&s->lock);
	return 0;
}
