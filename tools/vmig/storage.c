// SPDX-License-Identifier: MIT
/*
 * vmig migrate --storage-*: the orchestration of a storage migration in
 * mirror mode between two vmig-blk daemons, next to QEMU's (or vmig-vm's)
 * RAM migration. The order, as libvirt does with a drive-mirror to NBD:
 *
 *   1. the destination daemon was started with --incoming and listens;
 *   2. the source daemon's mirror starts and copies the disk while the guest
 *      runs; the RAM migration starts only once the mirror is ready (its
 *      first pass is on the destination) and keeps up (its backlog is
 *      small, or it is write-blocking), so the two do not fight for the
 *      link from the start;
 *   3. the RAM migration runs with pause-before-switchover; when the source
 *      VM has stopped (status pre-switchover: vCPUs and devices stopped, so
 *      the daemon's queues are stopped and every guest write is marked),
 *      the mirror's last round runs, and only once the destination daemon
 *      has the whole disk does migrate-continue let the destination run;
 *   4. a failure of either ends both: a failed mirror cancels the RAM
 *      migration (the source VM resumes on its own disk), a failed RAM
 *      migration cancels the mirror.
 *
 * Convergence. In mode write-blocking the mirror holds each guest write
 * until the destination has it, from its first pass on. In mode mirror it
 * copies in the background, and if its backlog stays above what the copy
 * clears in BEHIND_S for BEHIND_FOR_MS after the first pass (the guest
 * writes faster than the copy), it is switched to write-blocking, and the
 * run says so: without that, the last round, inside the VM's downtime,
 * would carry whatever the guest dirtied meanwhile.
 *
 * Post-copy storage (mode postcopy): the mirror copies in the background
 * and the RAM migration starts at once; at pre-switchover the disk is
 * handed over (vmig_blk_mirror_start_postcopy) instead of the last round,
 * so the hand-over does not grow with what the guest dirtied, and after
 * the RAM migration the copy goes on until the destination has every
 * block, resumed after faults as the mirror is. From the switch on the
 * disk is the destination's: nothing cancels it.
 *
 * The control sockets speak JSON-RPC 2.0, one request per connection here.
 */
#include <errno.h>
#include <jansson.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "storage.h"
#include "util/util.h"

#define RPC_TIMEOUT_MS 30000
#define READY_TIMEOUT_MS (24 * 3600 * 1000)
#define COMPLETE_TIMEOUT_MS 120000
/* A stopped mirror is restarted every RETRY_EVERY_MS, for RETRY_FOR_MS
 * (PC_RETRY_FOR_MS after a post-copy switch: the disk cannot go back, and
 * the destination's guest waits for the blocks still missing). */
#define RETRY_EVERY_MS 500
#define RETRY_FOR_MS 60000
#define PC_RETRY_FOR_MS (10 * 60000)
/* Convergence in mode mirror: the backlog may stay above what the copy
 * sends in BEHIND_S (at least BEHIND_MIN bytes) for BEHIND_FOR_MS. */
#define BEHIND_S 0.1
#define BEHIND_MIN (4ull << 20)
#define BEHIND_FOR_MS 1000

static void nap_ms(unsigned ms)
{
	struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000};

	nanosleep(&ts, NULL);
}

/* One JSON-RPC call: 0 with *result (the caller's), or -1 with the reason
 * in err. */
static int rpc(const char *path, const char *method, json_t *params, json_t **result, char *err,
	       size_t errlen)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	json_t *req = json_pack("{s:s,s:i,s:s}", "jsonrpc", "2.0", "id", 1, "method", method);
	uint64_t end = vmig__now_ms() + RPC_TIMEOUT_MS;
	char *text = NULL, *line = NULL, buf[65536];
	json_t *reply = NULL, *e;
	size_t len = 0;
	int fd = -1, ret = -1;

	*result = NULL;
	if (params)
		json_object_set_new(req, "params", params);
	if (strlen(path) >= sizeof(sa.sun_path)) {
		snprintf(err, errlen, "%s: path too long", path);
		goto out;
	}
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		goto out;
	}
	text = json_dumps(req, JSON_COMPACT);
	if (!text || asprintf(&line, "%s\n", text) < 0) {
		line = NULL;
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	ret = vmig__write_full(fd, line, strlen(line)); /* one write: one request */
	if (ret) {
		snprintf(err, errlen, "%s: cannot send: %s", path, strerror(-ret));
		ret = -1;
		goto out;
	}
	ret = -1;
	while (!memchr(buf, '\n', len)) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int64_t left = (int64_t)(end - vmig__now_ms());
		ssize_t n;

		if (len == sizeof(buf) || left <= 0 || poll(&p, 1, (int)left) <= 0) {
			snprintf(err, errlen, "%s: no answer to %s", path, method);
			goto out;
		}
		n = recv(fd, buf + len, sizeof(buf) - len, 0);
		if (n <= 0) {
			snprintf(err, errlen, "%s: the daemon closed the connection", path);
			goto out;
		}
		len += (size_t)n;
	}
	reply = json_loadb(buf, len, JSON_DISABLE_EOF_CHECK, NULL);
	e = json_object_get(reply, "error");
	if (e || !json_object_get(reply, "result")) {
		snprintf(err, errlen, "%s",
			 e ? json_string_value(json_object_get(e, "message")) ?: "error"
			   : "a reply without a result");
		goto out;
	}
	*result = json_incref(json_object_get(reply, "result"));
	ret = 0;
out:
	if (fd >= 0)
		close(fd);
	free(text);
	free(line);
	json_decref(req);
	json_decref(reply);
	return ret;
}

static uint64_t u64(const json_t *o, const char *key)
{
	const json_t *v = json_object_get(o, key);

	return json_is_integer(v) ? (uint64_t)json_integer_value(v) : 0;
}

int storage_check(const struct storage *st)
{
	int given = !!st->src_rpc + !!st->dst_rpc + !!st->uri;

	if (given && given != 3) {
		fprintf(stderr,
			"vmig: --storage-src, --storage-dst and --storage-uri go together\n");
		return -1;
	}
	if (st->mode && !given) {
		fprintf(stderr, "vmig: --storage-mode needs --storage-src, --storage-dst and "
				"--storage-uri\n");
		return -1;
	}
	if (st->mode && strcmp(st->mode, "mirror") && strcmp(st->mode, "write-blocking") &&
	    strcmp(st->mode, "postcopy")) {
		fprintf(stderr,
			"vmig: --storage-mode %s: the modes are mirror, write-blocking and "
			"postcopy\n",
			st->mode);
		return -1;
	}
	return 0;
}

/* Start (or resume) the source's mirror; 0 or -1 with err. */
static int mirror_start(struct storage *st, char *err, size_t errlen)
{
	json_t *params = json_pack("{s:s,s:s}", "uri", st->uri, "copy-mode",
				   st->write_blocking ? "write-blocking" : "background"),
	       *q;

	if (st->speed)
		json_object_set_new(params, "speed", json_integer((json_int_t)st->speed));
	if (rpc(st->src_rpc, "vmig_blk_mirror_start", params, &q, err, errlen))
		return -1;
	json_decref(q);
	return 0;
}

/* The mirror stopped (why): restart it now and then; -1 once that failed
 * for RETRY_FOR_MS. */
static int recover(struct storage *st, const char *why)
{
	uint64_t now = vmig__now_ms();
	char err[512];

	if (!st->broken_ms) {
		st->broken_ms = now;
		st->retry_ms = 0;
		fprintf(stderr, "\nvmig: storage: the mirror stopped (%s); restarting it\n", why);
	}
	snprintf(st->status, sizeof(st->status), "recovering");
	if (now - st->broken_ms > (st->handed_over ? PC_RETRY_FOR_MS : RETRY_FOR_MS)) {
		fprintf(stderr,
			"vmig: storage: the mirror could not be restarted within %d s: %s\n",
			(st->handed_over ? PC_RETRY_FOR_MS : RETRY_FOR_MS) / 1000, why);
		return -1;
	}
	if (now - st->retry_ms < RETRY_EVERY_MS)
		return 0;
	st->retry_ms = now;
	if (mirror_start(st, err, sizeof(err)))
		return 0; /* the daemon may still be starting: again later */
	fprintf(stderr, "vmig: storage: the mirror runs again after %.1f s\n",
		(double)(now - st->broken_ms) / 1000.0);
	st->broken_ms = 0;
	st->restarts++;
	return 0;
}

/* The backlog the copy clears in a moment. */
static uint64_t backlog_bound(const struct storage *st)
{
	return VMIG_MAX(BEHIND_MIN, (uint64_t)(st->peak_rate * BEHIND_S));
}

/* Ready, and either write-blocking or with a backlog that small. */
static bool converged(const struct storage *st)
{
	return st->ready && !st->broken_ms &&
	       (st->write_blocking || st->remaining <= backlog_bound(st));
}

/* Mode mirror after its first pass: switch to write-blocking once the
 * backlog stayed too long above what the copy clears in a moment. */
static int converge(struct storage *st, uint64_t now)
{
	uint64_t bound = backlog_bound(st);
	char err[512];
	json_t *q;

	if (st->write_blocking || st->postcopy || !st->ready || st->broken_ms ||
	    st->remaining <= bound) {
		st->behind_ms = 0;
		return 0;
	}
	if (!st->behind_ms)
		st->behind_ms = now;
	if (now - st->behind_ms < BEHIND_FOR_MS)
		return 0;
	if (rpc(st->src_rpc, "vmig_blk_mirror_change",
		json_pack("{s:s}", "copy-mode", "write-blocking"), &q, err, sizeof(err))) {
		fprintf(stderr, "\nvmig: storage source: vmig_blk_mirror_change: %s\n", err);
		return 0; /* a mirror that stopped is restarted by the next poll */
	}
	json_decref(q);
	st->write_blocking = st->switched = true;
	fprintf(stderr,
		"\nvmig: storage: the guest dirties %.1f MiB/s and the copy's backlog stayed "
		"above %.1f MiB for %.1f s: switching the mirror to write-blocking (each guest "
		"write now waits for the destination)\n",
		(double)st->dirty_rate / 1048576.0, (double)bound / 1048576.0,
		BEHIND_FOR_MS / 1000.0);
	return 0;
}

int storage_poll(struct storage *st)
{
	uint64_t now = vmig__now_ms();
	char err[512], why[600];
	json_t *q;
	const char *status;

	if (rpc(st->src_rpc, "vmig_blk_mirror_query", NULL, &q, err, sizeof(err))) {
		snprintf(why, sizeof(why), "source daemon: %s", err);
		return recover(st, why);
	}
	if (json_is_true(json_object_get(q, "postcopy-not-taken"))) {
		/* The destination never served the disk: the source took it back.
		 * Not a fault to recover from: the switch is over, and failed. */
		st->handed_over = false;
		st->not_taken = true;
		json_decref(q);
		fprintf(stderr,
			"\nvmig: storage: the destination never took the switch to "
			"post-copy: the disk stays with the source, which serves it again\n");
		return -1;
	}
	status = json_string_value(json_object_get(q, "status"));
	if (!status) { /* a daemon that restarted has no mirror */
		json_decref(q);
		return recover(st, "the source daemon has no mirror: it restarted");
	}
	if (json_object_get(q, "error")) {
		snprintf(why, sizeof(why), "%s", json_string_value(json_object_get(q, "error")));
		json_decref(q);
		return recover(st, why);
	}
	snprintf(st->status, sizeof(st->status), "%s", status);
	st->ready = json_is_true(json_object_get(q, "ready"));
	st->len = u64(q, "len");
	st->offset = u64(q, "offset");
	st->remaining = u64(q, "remaining");
	st->dirty_rate = u64(q, "dirty-rate");
	st->handed_over |= json_is_true(json_object_get(q, "postcopy"));
	st->requested_bytes = u64(q, "postcopy-requested-bytes");
	if (now - st->last_ms >= 500 || !st->last_ms || st->offset < st->last_offset) {
		if (st->last_ms && now > st->last_ms && st->offset >= st->last_offset)
			st->rate = (double)(st->offset - st->last_offset) * 1000.0 /
				   (double)(now - st->last_ms);
		st->last_ms = now;
		st->last_offset = st->offset;
	}
	json_decref(q);
	if (st->rate > st->peak_rate)
		st->peak_rate = st->rate;
	return converge(st, now);
}

void storage_progress(const struct storage *st, char *buf, size_t len)
{
	unsigned pct = st->len ? (unsigned)((st->len - st->remaining) * 100 / st->len) : 0;

	if (st->handed_over) {
		snprintf(buf, len, "disk %3u%% post-copy %7.1f MiB/s, %.1f MiB on demand", pct,
			 st->rate / 1048576.0, (double)st->requested_bytes / 1048576.0);
		return;
	}
	snprintf(buf, len, "disk %3u%% %s%s %7.1f MiB/s dirty %5.1f MiB/s", pct, st->status,
		 st->write_blocking ? " write-blocking" : "", st->rate / 1048576.0,
		 (double)st->dirty_rate / 1048576.0);
}

int storage_start(struct storage *st, bool tty)
{
	uint64_t last_line = 0;
	json_t *q;
	char err[512], line[160];

	if (rpc(st->dst_rpc, "vmig_blk_incoming_query", NULL, &q, err, sizeof(err))) {
		fprintf(stderr, "vmig: storage destination: %s\n", err);
		return -1;
	}
	if (!json_object_get(q, "status") ||
	    strcmp(json_string_value(json_object_get(q, "status")) ?: "", "listening")) {
		fprintf(stderr,
			"vmig: storage destination: not waiting for a disk (start it with "
			"--incoming %s)\n",
			st->uri);
		json_decref(q);
		return -1;
	}
	st->write_blocking = st->mode && !strcmp(st->mode, "write-blocking");
	st->postcopy = st->mode && !strcmp(st->mode, "postcopy");
	if (st->postcopy && !json_is_true(json_object_get(q, "postcopy-capable"))) {
		fprintf(stderr,
			"vmig: storage destination: cannot keep a post-copy's state for its "
			"disk (start it with --postcopy-state FILE)\n");
		json_decref(q);
		return -1;
	}
	json_decref(q);
	if (mirror_start(st, err, sizeof(err))) {
		fprintf(stderr, "vmig: storage source: vmig_blk_mirror_start: %s\n", err);
		return -1;
	}
	st->t0_ms = vmig__now_ms();
	if (st->postcopy) {
		if (rpc(st->src_rpc, "vmig_blk_mirror_query", NULL, &q, err, sizeof(err)) ||
		    !json_is_true(json_object_get(q, "postcopy-capable"))) {
			fprintf(stderr, "vmig: storage source: %s\n",
				q ? "cannot keep a post-copy's state for its disk (start it with "
				    "--postcopy-state FILE)"
				  : err);
			json_decref(q);
			storage_cancel(st);
			return -1;
		}
		json_decref(q);
		/* The disk follows after the switch: the RAM need not wait. */
		fprintf(stderr,
			"vmig: storage: copying the disk to %s in the background; post-copy: the "
			"disk is handed over when the VM stops, what is missing follows\n",
			st->uri);
		return 0;
	}
	fprintf(stderr, "vmig: storage: mirroring the disk to %s (copy-mode %s)\n", st->uri,
		st->write_blocking ? "write-blocking" : "background");
	for (;;) {
		uint64_t now = vmig__now_ms();

		if (storage_poll(st))
			return -1;
		if (converged(st)) /* the RAM goes when the disk keeps up */
			break;
		if (now - st->t0_ms > READY_TIMEOUT_MS) {
			fprintf(stderr, "vmig: storage: the mirror did not get ready\n");
			storage_cancel(st);
			return -1;
		}
		if (tty || now - last_line >= 1000) {
			storage_progress(st, line, sizeof(line));
			fprintf(stderr, tty ? "\r%s  %6.1fs\033[K" : "vmig: %s elapsed %.1f s\n",
				line, (double)(now - st->t0_ms) / 1000.0);
			last_line = now;
		}
		nap_ms(100);
	}
	fprintf(stderr,
		"%svmig: storage: the disk is on the destination after %.1f s; now the "
		"RAM\n",
		tty ? "\n" : "", (double)(vmig__now_ms() - st->t0_ms) / 1000.0);
	return 0;
}

/* The destination took the switch: it serves the disk (or has all of it). */
static bool dest_switched(struct storage *st)
{
	const char *status;
	char err[512];
	bool ok;
	json_t *q;

	if (rpc(st->dst_rpc, "vmig_blk_incoming_query", NULL, &q, err, sizeof(err)))
		return false;
	status = json_string_value(json_object_get(q, "status")) ?: "";
	ok = !strncmp(status, "postcopy", 8) || !strcmp(status, "completed");
	json_decref(q);
	return ok;
}

/* The switch to post-copy storage, the VM stopped. */
static int storage_switch(struct storage *st)
{
	uint64_t t0 = vmig__now_ms();
	char err[512];
	json_t *q;

	while (st->broken_ms) { /* a mirror being restarted must run first */
		if (storage_poll(st))
			return -1;
		nap_ms(20);
	}
	if (rpc(st->src_rpc, "vmig_blk_mirror_start_postcopy", NULL, &q, err, sizeof(err))) {
		fprintf(stderr, "\nvmig: storage source: vmig_blk_mirror_start_postcopy: %s\n",
			err);
		return -1;
	}
	json_decref(q);
	while (vmig__now_ms() - t0 < COMPLETE_TIMEOUT_MS) {
		if (storage_poll(st))
			return -1;
		if (st->handed_over && dest_switched(st)) {
			fprintf(stderr,
				"\nvmig: storage: hand-over in %llu ms (post-copy: the destination "
				"serves the disk; %.1f MiB still to come)\n",
				(unsigned long long)(vmig__now_ms() - t0),
				(double)st->remaining / 1048576.0);
			return 0;
		}
		nap_ms(1);
	}
	fprintf(stderr, "\nvmig: storage: the switch did not happen within %d s\n",
		COMPLETE_TIMEOUT_MS / 1000);
	return -1;
}

int storage_finish(struct storage *st, bool tty)
{
	uint64_t t0 = vmig__now_ms(), last_line = 0;
	char line[160];

	for (;;) {
		uint64_t now = vmig__now_ms();

		if (storage_poll(st)) {
			fprintf(stderr,
				"vmig: storage: the destination runs the VM but lacks %.1f MiB of "
				"its disk, which only the source has: restart the source's "
				"vmig-blk (or heal the link) and resume with vmig_blk_mirror_start "
				"uri=%s; the guest's requests for those blocks wait meanwhile\n",
				(double)st->remaining / 1048576.0, st->uri);
			return -1;
		}
		if (!st->broken_ms && !strcmp(st->status, "concluded")) {
			fprintf(stderr,
				"%svmig: storage: post-copy complete %.1f s after the RAM; %.1f "
				"MiB sent on demand%s\n",
				tty ? "\n" : "", (double)(now - t0) / 1000.0,
				(double)st->requested_bytes / 1048576.0,
				st->restarts ? " (after restarts)" : "");
			return 0;
		}
		if (tty || now - last_line >= 1000) {
			storage_progress(st, line, sizeof(line));
			fprintf(stderr, tty ? "\r%s  %6.1fs\033[K" : "vmig: %s elapsed %.1f s\n",
				line, (double)(now - t0) / 1000.0);
			last_line = now;
		}
		nap_ms(100);
	}
}

int storage_complete(struct storage *st)
{
	uint64_t t0 = vmig__now_ms();
	char err[512];
	json_t *q;

	if (st->postcopy)
		return storage_switch(st);
	/* a mirror that is being restarted must be ready again first */
	while (st->broken_ms || !st->ready) {
		if (storage_poll(st))
			return -1;
		if (!st->broken_ms && st->ready)
			break;
		nap_ms(20);
	}
	if (rpc(st->src_rpc, "vmig_blk_mirror_complete", NULL, &q, err, sizeof(err))) {
		fprintf(stderr, "\nvmig: storage source: vmig_blk_mirror_complete: %s\n", err);
		return -1;
	}
	json_decref(q);
	while (vmig__now_ms() - t0 < COMPLETE_TIMEOUT_MS) {
		if (storage_poll(st) || st->broken_ms) {
			fprintf(stderr, "vmig: storage: the last round failed\n");
			return -1;
		}
		if (!strcmp(st->status, "concluded")) {
			fprintf(stderr, "\nvmig: storage: hand-over in %llu ms%s%s\n",
				(unsigned long long)(vmig__now_ms() - t0),
				st->restarts ? " (after restarts of the mirror)" : "",
				st->switched ? "; converged by write-blocking (the guest "
					       "outwrote the background copy)"
					     : "");
			return 0;
		}
		nap_ms(1);
	}
	fprintf(stderr, "\nvmig: storage: the last round did not end within %d s\n",
		COMPLETE_TIMEOUT_MS / 1000);
	storage_cancel(st);
	return -1;
}

void storage_cancel(struct storage *st)
{
	char err[512];
	json_t *q;

	if (st->handed_over) {
		fprintf(stderr,
			"vmig: storage: the disk was handed over to the destination by post-copy: "
			"the VM can only run there, and the source's vmig-blk keeps sending it "
			"what it lacks\n");
		return;
	}
	if (rpc(st->src_rpc, "vmig_blk_mirror_cancel", NULL, &q, err, sizeof(err)))
		fprintf(stderr, "vmig: storage source: vmig_blk_mirror_cancel: %s\n", err);
	else
		fprintf(stderr, "vmig: storage: mirror cancelled; the source's disk serves on\n");
	json_decref(q);
}
