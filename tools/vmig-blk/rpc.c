// SPDX-License-Identifier: MIT
/*
 * JSON-RPC 2.0 control socket of vmig-blk (a unix stream socket, requests
 * delimited by newlines or simply by the end of each JSON object), in the
 * style of SPDK's rpc.py interface: vhost_get_controllers, bdev_get_iostat,
 * and vmig_blk_upgrade. A request may arrive in any number of pieces: the
 * splitter (util/json_split.h) finds where each ends, and only a whole one
 * is parsed. Also the two small clients behind "vmig-blk rpc"
 * and "vmig-blk upgrade".
 *
 * Threat model: the socket is 0600 and a client whose uid (SO_PEERCRED)
 * is neither ours nor root's is refused at accept. The bytes of an allowed
 * client are still untrusted. Each client has a fixed 64 KiB buffer; a
 * request that does not fit, or that is not valid JSON (a top-level scalar,
 * or a request the client ended half-way, included), gets a JSON-RPC error
 * and the connection is closed. Nothing from a request is used
 * except the method name, the id (echoed back) and the documented params,
 * each type-checked; no request names a file the daemon opens or runs.
 *
 * Threads: the control thread only.
 */
#include "blk.h"
#include "mirror.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "util/util.h"

#define RPC_PARSE_ERROR -32700
#define RPC_INVALID_REQUEST -32600
#define RPC_METHOD_NOT_FOUND -32601
#define RPC_INVALID_PARAMS -32602
#define RPC_SERVER_ERROR -32000
#define RPC_PERMISSION_DENIED -32001

int vblk_rpc_listen(struct vblk_daemon *dm, char *err, size_t errlen)
{
	dm->rpc_fd = vblk_listen_unix(dm->rpc_path, 0600, &dm->rpc_id, err, errlen);
	return dm->rpc_fd < 0 ? dm->rpc_fd : 0;
}

/*
 * The socket file is 0600, but a file mode is only the first gate (a
 * process with CAP_DAC_OVERRIDE, a chmod by mistake, a socket passed on):
 * the peer's credentials, as the kernel recorded them at connect, decide.
 * Our effective uid or root; everyone else gets an error and is dropped.
 */
static bool peer_allowed(struct vblk_daemon *dm, int fd)
{
	struct ucred cr;
	socklen_t len = sizeof(cr);
	char msg[160];

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) == 0 &&
	    (cr.uid == 0 || cr.uid == geteuid()))
		return true;
	if (len != sizeof(cr))
		cr = (struct ucred){.pid = 0, .uid = (uid_t)-1};
	snprintf(msg, sizeof(msg),
		 "permission denied: uid %d may not use this socket (only the daemon's uid %d and "
		 "root may)",
		 (int)cr.uid, (int)geteuid());
	vblk_rpc_send(fd, "null", NULL, RPC_PERMISSION_DENIED, msg);
	vblk_log(dm, "RPC client refused: pid %d, uid %d", (int)cr.pid, (int)cr.uid);
	return false;
}

void vblk_rpc_accept(struct vblk_daemon *dm)
{
	int fd = accept4(dm->rpc_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);

	if (fd < 0)
		return;
	if (!peer_allowed(dm, fd)) {
		close(fd);
		return;
	}
	for (int i = 0; i < VBLK_MAX_RPC_CLIENTS; i++) {
		if (dm->clients[i])
			continue;
		dm->clients[i] = malloc(sizeof(*dm->clients[i]));
		if (!dm->clients[i])
			break;
		dm->clients[i]->fd = fd;
		dm->clients[i]->len = 0;
		vmig__json_splitter_init(&dm->clients[i]->sp);
		return;
	}
	close(fd); /* too many clients */
}

static void client_close(struct vblk_daemon *dm, int i)
{
	close(dm->clients[i]->fd);
	free(dm->clients[i]);
	dm->clients[i] = NULL;
}

/* Write all of buf to a possibly non-blocking fd, waiting at most ~2 s. */
static int write_all(int fd, const char *buf, size_t len)
{
	for (int spins = 0; len && spins < 200;) {
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);

		if (n > 0) {
			buf += n;
			len -= (size_t)n;
		} else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
			struct pollfd p = {.fd = fd, .events = POLLOUT};

			poll(&p, 1, 10);
			spins++;
		} else {
			return -EPIPE;
		}
	}
	return len ? -ETIMEDOUT : 0;
}

int vblk_rpc_send(int fd, const char *id_json, const char *result_json, int code,
		  const char *message)
{
	char *out = NULL;
	int r, n;

	if (result_json)
		n = asprintf(&out, "{\"jsonrpc\":\"2.0\",\"id\":%s,\"result\":%s}\n", id_json,
			     result_json);
	else {
		json_t *msg = json_pack("{s:i,s:s}", "code", code, "message", message);
		char *m = msg ? json_dumps(msg, JSON_COMPACT) : NULL;

		n = m ? asprintf(&out, "{\"jsonrpc\":\"2.0\",\"id\":%s,\"error\":%s}\n", id_json, m)
		      : -1;
		free(m);
		json_decref(msg);
	}
	if (n < 0)
		return -ENOMEM;
	r = write_all(fd, out, (size_t)n);
	free(out);
	/* A client that does not read its answers: it gets no more of them
	 * (each would wait its 2 s again), and the next read sees the end. */
	if (r)
		shutdown(fd, SHUT_RDWR);
	return r;
}

static json_t *hex(uint64_t v)
{
	char buf[24];

	snprintf(buf, sizeof(buf), "0x%llx", (unsigned long long)v);
	return json_string(buf);
}

static const char *recovery_name(const struct vhost_vring *vr)
{
	switch (vr->recovery.outcome) {
	case VHOST_INFLIGHT_FRESH:
		return "fresh";
	case VHOST_INFLIGHT_RECOVERED:
		return "recovered";
	case VHOST_INFLIGHT_INVALID:
		return "invalid";
	}
	return "none";
}

static const char *backend_name(const struct vblk_disk *disk)
{
	switch (disk->backend) {
	case VBLK_BACKEND_RAM:
		return "ram";
	case VBLK_BACKEND_NULL:
		return "null";
	case VBLK_BACKEND_FILE:
		break;
	}
	return "file";
}

static json_t *controllers(struct vblk_daemon *dm)
{
	const struct vhost_dev *d = &dm->dev;
	const char *bdev = dm->opts.file ? dm->opts.file : backend_name(&dm->disk);
	json_t *queues = json_array();
	json_t *c;

	for (unsigned i = 0; i < dm->nqueues; i++) {
		const struct vhost_vring *vr = &d->vring[i];
		struct vblk_ring_view rv;
		struct vblk_stats st;

		vblk_stats_read(&dm->q[i], &st);
		json_array_append_new(
		    queues,
		    json_pack("{s:i,s:b,s:i,s:I,s:s,s:i,s:I,s:I,s:i,s:b}", "queue", i, "started",
			      vr->started, "size", vr->num, "starts", (json_int_t)vr->starts,
			      "inflight_recovery", recovery_name(vr), "recovered_requests",
			      vr->recovery.nresubmit, "sleeps", (json_int_t)st.sleeps, "poll_hits",
			      (json_int_t)st.poll_hits, "inflight_requests",
			      (int)vblk_queue_inflight(&dm->q[i]), "broken",
			      __atomic_load_n(&dm->q[i].broken, __ATOMIC_RELAXED)));
		json_object_set_new(json_array_get(queues, json_array_size(queues) - 1),
				    "delayed_requests",
				    json_integer((json_int_t)vblk_queue_delayed(&dm->q[i])));
		json_object_set_new(
		    json_array_get(queues, json_array_size(queues) - 1), "bounced_requests",
		    json_integer((json_int_t)__atomic_load_n(&dm->q[i].bounced, __ATOMIC_RELAXED)));
		vblk_queue_ring_view(&dm->q[i], &rv);
		if (rv.valid)
			json_object_set_new(
			    json_array_get(queues, json_array_size(queues) - 1), "ring",
			    json_pack("{s:i,s:i,s:i,s:i,s:i}", "avail_idx", rv.avail_idx,
				      "last_avail_idx", rv.last_avail, "used_idx", rv.used_idx,
				      "used_event", rv.event_idx ? (int)rv.used_event : -1,
				      "io_outstanding", (int)rv.io_outstanding));
	}
	c = json_pack("{s:s,s:s,s:s,s:i,s:s,s:s?,s:I,s:i,s:b,s:i,s:b,s:I,s:I,s:{s:{s:b,s:s}}}",
		      "ctrlr", "vmig-blk0", "socket", dm->opts.socket, "rpc", dm->rpc_path, "pid",
		      (int)getpid(), "backend", backend_name(&dm->disk), "file", dm->opts.file,
		      "size_bytes", (json_int_t)dm->disk.size, "block_size", dm->disk.block_size,
		      "read_only", dm->disk.read_only, "num_queues", dm->nqueues, "connected",
		      dm->conn_fd >= 0, "connections", (json_int_t)dm->connections, "upgrades",
		      (json_int_t)dm->upgrades, "backend_specific", "block", "readonly",
		      dm->disk.read_only, "bdev", bdev);
	if (!c) {
		json_decref(queues);
		return NULL;
	}
	json_object_set_new(c, "queues", queues);
	json_object_set_new(c, "poll_us", json_integer(dm->poll_us));
	json_object_set_new(c, "upgrade_binary", json_string(dm->upgrade_binary));
	json_object_set_new(c, "image_locked", json_boolean(dm->disk.lock_fd >= 0));
	json_object_set_new(c, "cache", json_string(dm->disk.direct ? "none" : "writeback"));
	/* How requests reach the disk: through each queue's io_uring, or
	 * served on the queue thread itself (a file on tmpfs or ramfs; RAM
	 * and null disks have no I/O). */
	json_object_set_new(c, "io",
			    json_string(dm->disk.backend != VBLK_BACKEND_FILE ? "memory"
					: dm->disk.inline_io		      ? "inline"
									      : "io_uring"));
	json_object_set_new(c, "mem_align", json_integer(dm->disk.mem_align));
	json_object_set_new(c, "physical_block_size", json_integer(dm->disk.physical_block_size));
	json_object_set_new(c, "latency",
			    json_pack("{s:i,s:i}", "read_us", (int)dm->read_latency_us, "write_us",
				      (int)dm->write_latency_us));
	if (dm->disk.backend == VBLK_BACKEND_NULL)
		json_object_set_new(c, "read_zeroes", json_boolean(dm->disk.read_zeroes));
	json_object_set_new(c, "features", hex(d->offered_features));
	json_object_set_new(c, "negotiated_features", hex(d->features));
	json_object_set_new(c, "protocol_features", hex(d->offered_protocol));
	json_object_set_new(c, "negotiated_protocol_features", hex(d->protocol));
	json_object_set_new(c, "memory_regions", json_integer(d->mem.nregions));
	json_object_set_new(c, "dirty_logging",
			    json_boolean((d->features >> VHOST_F_LOG_ALL) & 1 && d->log.bits));
	return json_pack("[o]", c);
}

static json_t *stats_json(const struct vblk_stats *s)
{
	return json_pack(
	    "{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "num_read_ops",
	    (json_int_t)s->read_ops, "bytes_read", (json_int_t)s->read_bytes, "num_write_ops",
	    (json_int_t)s->write_ops, "bytes_written", (json_int_t)s->write_bytes, "num_flush_ops",
	    (json_int_t)s->flush_ops, "num_unmap_ops", (json_int_t)s->discard_ops, "bytes_unmapped",
	    (json_int_t)s->discard_bytes, "num_write_zeroes_ops", (json_int_t)s->write_zeroes_ops,
	    "bytes_write_zeroes", (json_int_t)s->write_zeroes_bytes, "num_get_id_ops",
	    (json_int_t)s->get_id_ops, "num_errors", (json_int_t)s->errors, "num_resubmitted",
	    (json_int_t)s->resubmitted);
}

static json_t *iostat(struct vblk_daemon *dm)
{
	struct vblk_stats total = {0}, s;
	json_t *queues = json_array(), *bdev;

	for (unsigned i = 0; i < dm->nqueues; i++) {
		json_t *q;

		vblk_stats_read(&dm->q[i], &s);
		for (size_t k = 0; k < sizeof(s) / sizeof(uint64_t); k++)
			((uint64_t *)&total)[k] += ((uint64_t *)&s)[k];
		q = stats_json(&s);
		json_object_set_new(q, "queue", json_integer(i));
		json_array_append_new(queues, q);
	}
	bdev = stats_json(&total);
	json_object_set_new(bdev, "name", json_string("vmig-blk0"));
	json_object_set_new(bdev, "queues", queues);
	return json_pack("{s:I,s:[o]}", "tick_rate", (json_int_t)1000000000, "bdevs", bdev);
}

/* {"poll_us": N}: change every queue's busy-poll window now. */
static json_t *set_poll(struct vblk_daemon *dm, int fd, const char *id, json_t *params)
{
	json_t *p = json_is_object(params) ? json_object_get(params, "poll_us") : NULL;
	json_int_t v = json_is_integer(p) ? json_integer_value(p) : -1;

	if (v < 0 || v > VBLK_MAX_POLL_US) {
		vblk_rpc_send(fd, id, NULL, RPC_INVALID_PARAMS, "poll_us must be 0..1000000");
		return NULL;
	}
	dm->poll_us = (uint32_t)v;
	for (unsigned i = 0; i < dm->nqueues; i++)
		vblk_queue_set_poll(&dm->q[i], dm->poll_us);
	return json_pack("{s:i}", "poll_us", (int)dm->poll_us);
}

/* {"read_us": R, "write_us": W} (each 0..60000000, absent: 0): the latency
 * every queue adds to the requests it takes from now on
 * (vblk_queue_set_latency). */
static json_t *set_latency(struct vblk_daemon *dm, int fd, const char *id, json_t *params)
{
	static const char *const keys[2] = {"read_us", "write_us"};
	json_int_t v[2];

	for (int k = 0; k < 2; k++) {
		json_t *p = json_is_object(params) ? json_object_get(params, keys[k]) : NULL;

		v[k] = !p ? 0 : json_is_integer(p) ? json_integer_value(p) : -1;
		if (v[k] < 0 || v[k] > VBLK_MAX_LATENCY_US) {
			vblk_rpc_send(fd, id, NULL, RPC_INVALID_PARAMS,
				      "read_us and write_us must be 0..60000000");
			return NULL;
		}
	}
	dm->read_latency_us = (uint32_t)v[0];
	dm->write_latency_us = (uint32_t)v[1];
	for (unsigned i = 0; i < dm->nqueues; i++)
		vblk_queue_set_latency(&dm->q[i], dm->read_latency_us, dm->write_latency_us);
	return json_pack("{s:i,s:i}", "read_us", (int)dm->read_latency_us, "write_us",
			 (int)dm->write_latency_us);
}

/* ---- dirty-block tracking (dirty.c; docs/vhost-user.md) ---- */

#define RPC_TAKE_DEFAULT_BYTES (64ull << 20)
#define RPC_TAKE_MAX_BYTES (1ull << 30)
#define RPC_TAKE_MAX_EXTENTS 4096u /* ~200 KiB of JSON at most */

/*
 * An optional unsigned integer param: *out keeps its default if absent.
 * False (and the error sent) if present but not an integer in [lo, hi].
 */
static bool param_u64(int fd, const char *id, json_t *params, const char *key, uint64_t lo,
		      uint64_t hi, uint64_t *out)
{
	json_t *p = json_is_object(params) ? json_object_get(params, key) : NULL;
	char msg[160];

	if (!p)
		return true;
	if (json_is_integer(p) && json_integer_value(p) >= 0 &&
	    (uint64_t)json_integer_value(p) >= lo && (uint64_t)json_integer_value(p) <= hi) {
		*out = (uint64_t)json_integer_value(p);
		return true;
	}
	snprintf(msg, sizeof(msg), "%s must be an integer in %llu..%llu", key,
		 (unsigned long long)lo, (unsigned long long)hi);
	vblk_rpc_send(fd, id, NULL, RPC_INVALID_PARAMS, msg);
	return false;
}

/* Params must be absent, an object, or an empty array, and an object may
 * hold only the keys named. */
static bool params_only(int fd, const char *id, json_t *params, const char *const *keys,
			unsigned nkeys)
{
	const char *key;
	json_t *v;

	if (json_is_array(params) && json_array_size(params) == 0)
		return true;
	if (json_is_array(params)) {
		vblk_rpc_send(fd, id, NULL, RPC_INVALID_PARAMS, "params must be an object");
		return false;
	}
	json_object_foreach(params, key, v)
	{
		bool known = false;
		char msg[160];

		for (unsigned i = 0; i < nkeys; i++)
			known = known || !strcmp(key, keys[i]);
		if (!known) {
			snprintf(msg, sizeof(msg), "unknown param \"%.64s\"", key);
			vblk_rpc_send(fd, id, NULL, RPC_INVALID_PARAMS, msg);
			return false;
		}
	}
	return true;
}

static json_t *dirty_query(struct vblk_daemon *dm)
{
	struct vblk_dirty_info in;
	json_t *o;

	vblk_dirty_query(dm, &in);
	o = json_pack("{s:b,s:I,s:I}", "active", in.active, "total", (json_int_t)in.total, "dirty",
		      (json_int_t)in.dirty);
	if (!o || !in.active)
		return o;
	json_object_set_new(o, "granularity", json_integer(in.granularity));
	json_object_set_new(o, "count", json_integer((json_int_t)in.dirty));
	json_object_set_new(o, "dirtied", json_integer((json_int_t)in.dirtied));
	json_object_set_new(o, "dirty-rate", json_integer((json_int_t)in.rate_bytes_per_s));
	json_object_set_new(o, "active_ms", json_integer((json_int_t)in.active_ms));
	return o;
}

/* {"granularity": G, "all_dirty": B}: start tracking. */
static json_t *dirty_start(struct vblk_daemon *dm, int fd, const char *id, json_t *params)
{
	static const char *const keys[] = {"granularity", "all_dirty"};
	uint64_t gran = VBLK_DIRTY_DEFAULT_GRANULARITY;
	json_t *all = json_is_object(params) ? json_object_get(params, "all_dirty") : NULL;
	char msg[200];
	int r;

	if (!params_only(fd, id, params, keys, 2) ||
	    !param_u64(fd, id, params, "granularity", VBLK_DIRTY_MIN_GRANULARITY,
		       VBLK_DIRTY_MAX_GRANULARITY, &gran))
		return NULL;
	if (all && !json_is_boolean(all)) {
		vblk_rpc_send(fd, id, NULL, RPC_INVALID_PARAMS, "all_dirty must be a boolean");
		return NULL;
	}
	r = vblk_dirty_start(dm, (uint32_t)gran, json_is_true(all));
	if (r == -EBUSY) {
		vblk_rpc_send(fd, id, NULL, RPC_SERVER_ERROR,
			      "dirty tracking is already on (dirty_bitmap_stop first)");
		return NULL;
	}
	if (r == -EINVAL) {
		snprintf(msg, sizeof(msg),
			 "granularity must be a power of two, at least the disk's block size "
			 "(%u)",
			 dm->disk.block_size);
		vblk_rpc_send(fd, id, NULL, RPC_INVALID_PARAMS, msg);
		return NULL;
	}
	if (r) {
		vblk_rpc_send(fd, id, NULL, RPC_SERVER_ERROR, strerror(-r));
		return NULL;
	}
	vblk_log(dm, "dirty tracking on, granularity %llu%s", (unsigned long long)gran,
		 json_is_true(all) ? ", all dirty" : "");
	return dirty_query(dm);
}

static json_t *dirty_stop(struct vblk_daemon *dm, int fd, const char *id, json_t *params)
{
	json_t *res;

	if (!params_only(fd, id, params, NULL, 0))
		return NULL;
	if (!dm->disk.dirty) {
		vblk_rpc_send(fd, id, NULL, RPC_SERVER_ERROR, "dirty tracking is not on");
		return NULL;
	}
	res = dirty_query(dm); /* what it stood at, as it stops */
	vblk_dirty_stop(dm);
	vblk_log(dm, "dirty tracking off");
	return res;
}

/* {"max_bytes": N}: clear and return dirty extents, N bytes at most. */
static json_t *dirty_take(struct vblk_daemon *dm, int fd, const char *id, json_t *params)
{
	static const char *const keys[] = {"max_bytes"};
	uint64_t max = RPC_TAKE_DEFAULT_BYTES, bytes;
	struct vblk_extent *ext;
	json_t *list, *res;
	size_t n;

	if (!params_only(fd, id, params, keys, 1) ||
	    !param_u64(fd, id, params, "max_bytes", 1, RPC_TAKE_MAX_BYTES, &max))
		return NULL;
	if (!dm->disk.dirty) {
		vblk_rpc_send(fd, id, NULL, RPC_SERVER_ERROR, "dirty tracking is not on");
		return NULL;
	}
	ext = malloc(RPC_TAKE_MAX_EXTENTS * sizeof(*ext));
	list = json_array();
	if (!ext || !list) {
		free(ext);
		json_decref(list);
		vblk_rpc_send(fd, id, NULL, RPC_SERVER_ERROR, "out of memory");
		return NULL;
	}
	n = vblk_dirty_take(dm->disk.dirty, max, ext, RPC_TAKE_MAX_EXTENTS, &bytes);
	for (size_t i = 0; i < n; i++)
		json_array_append_new(list,
				      json_pack("{s:I,s:I}", "offset", (json_int_t)ext[i].offset,
						"length", (json_int_t)ext[i].length));
	free(ext);
	res = json_pack("{s:o,s:I,s:I,s:i}", "extents", list, "bytes", (json_int_t)bytes, "dirty",
			(json_int_t)vblk_dirty_bytes(dm->disk.dirty), "granularity",
			(int)dm->disk.dirty->granularity);
	return res;
}

/* ---- storage migration (mirror.c, incoming.c) ---- */

static json_t *mirror_info(struct vblk_daemon *dm)
{
	struct vblk_mirror_info in;
	json_t *o;

	vblk_mirror_query(dm, &in);
	if (!in.exists)
		return json_pack("{s:b}", "active", false);
	o = json_pack("{s:s,s:s,s:s,s:I,s:I,s:I,s:I,s:b,s:b,s:I,s:I}", "type", "mirror", "uri",
		      in.uri, "status", in.status, "len", (json_int_t)in.len, "offset",
		      (json_int_t)in.offset, "remaining", (json_int_t)in.remaining, "speed",
		      (json_int_t)in.speed, "ready", in.ready, "completing", in.completing,
		      "dirty-rate", (json_int_t)in.dirty_rate, "rounds", (json_int_t)in.rounds);
	if (o) {
		json_object_set_new(
		    o, "copy-mode",
		    json_string(in.write_blocking ? "write-blocking" : "background"));
		json_object_set_new(o, "actively-synced", json_boolean(in.actively_synced));
		json_object_set_new(o, "held-writes", json_integer((json_int_t)in.held_writes));
		json_object_set_new(o, "postcopy", json_boolean(in.postcopy));
		json_object_set_new(o, "postcopy-not-taken", json_boolean(in.postcopy_not_taken));
		json_object_set_new(o, "postcopy-capable", json_boolean(vblk_postcopy_capable(dm)));
		if (in.postcopy)
			json_object_set_new(o, "postcopy-requested-bytes",
					    json_integer((json_int_t)in.urgent_bytes));
	}
	if (o && in.error[0])
		json_object_set_new(o, "error", json_string(in.error));
	return o;
}

/* "copy-mode" of params (absent: background). 0 or 1, or -1 after an
 * error reply. */
static int param_copy_mode(int fd, const char *id, json_t *params, bool required)
{
	json_t *j = json_object_get(params, "copy-mode");
	const char *v = json_string_value(j);

	if (!j && !required)
		return 0;
	if (!v || (strcmp(v, "background") && strcmp(v, "write-blocking"))) {
		vblk_rpc_send(fd, id, NULL, RPC_INVALID_PARAMS,
			      "copy-mode must be \"background\" or \"write-blocking\"");
		return -1;
	}
	return !strcmp(v, "write-blocking");
}

static json_t *mirror_reply(struct vblk_daemon *dm, int fd, const char *id, int r, const char *err)
{
	if (r) {
		vblk_rpc_send(fd, id, NULL, r == -EINVAL ? RPC_INVALID_PARAMS : RPC_SERVER_ERROR,
			      err);
		return NULL;
	}
	return mirror_info(dm);
}

/* {"uri": S, "granularity": N, "speed": N, "copy-mode": S}: copy the disk
 * to uri. */
static json_t *mirror_start(struct vblk_daemon *dm, int fd, const char *id, json_t *params)
{
	static const char *const keys[] = {"uri", "granularity", "speed", "copy-mode"};
	json_t *ju = json_is_object(params) ? json_object_get(params, "uri") : NULL;
	uint64_t gran = 0, speed = 0;
	char err[512];
	int wb;

	if (!params_only(fd, id, params, keys, 4) ||
	    !param_u64(fd, id, params, "granularity", VBLK_DIRTY_MIN_GRANULARITY,
		       VBLK_DIRTY_MAX_GRANULARITY, &gran) ||
	    !param_u64(fd, id, params, "speed", 0, UINT64_MAX / 2, &speed))
		return NULL;
	if (!json_is_string(ju)) {
		vblk_rpc_send(fd, id, NULL, RPC_INVALID_PARAMS,
			      "uri (tcp:HOST:PORT or unix:PATH) is required");
		return NULL;
	}
	wb = param_copy_mode(fd, id, params, false);
	if (wb < 0)
		return NULL;
	return mirror_reply(dm, fd, id,
			    vblk_mirror_start(dm, json_string_value(ju), (uint32_t)gran, speed, wb,
					      err, sizeof(err)),
			    err);
}

/* {"copy-mode": S}: QEMU's block-job-change for a running mirror. */
static json_t *mirror_change(struct vblk_daemon *dm, int fd, const char *id, json_t *params)
{
	static const char *const keys[] = {"copy-mode"};
	char err[512];
	int wb;

	if (!params_only(fd, id, params, keys, 1) ||
	    (wb = param_copy_mode(fd, id, params, true)) < 0)
		return NULL;
	return mirror_reply(dm, fd, id, vblk_mirror_change(dm, wb, err, sizeof(err)), err);
}

static json_t *mirror_simple(struct vblk_daemon *dm, int fd, const char *id, json_t *params,
			     int (*op)(struct vblk_daemon *, char *, size_t))
{
	char err[512];

	if (!params_only(fd, id, params, NULL, 0))
		return NULL;
	return mirror_reply(dm, fd, id, op(dm, err, sizeof(err)), err);
}

static json_t *mirror_speed(struct vblk_daemon *dm, int fd, const char *id, json_t *params)
{
	static const char *const keys[] = {"speed"};
	uint64_t speed = 0;
	char err[512];

	if (!params_only(fd, id, params, keys, 1) ||
	    !param_u64(fd, id, params, "speed", 0, UINT64_MAX / 2, &speed))
		return NULL;
	return mirror_reply(dm, fd, id, vblk_mirror_set_speed(dm, speed, err, sizeof(err)), err);
}

static json_t *incoming_info(struct vblk_daemon *dm)
{
	struct vblk_incoming_info in;
	json_t *o;

	vblk_incoming_query(dm, &in);
	if (!in.exists)
		return json_pack("{s:b}", "active", false);
	o = json_pack("{s:s,s:I,s:I,s:I}", "status", in.status, "received", (json_int_t)in.received,
		      "rounds", (json_int_t)in.rounds, "connections", (json_int_t)in.connections);
	if (o && in.port)
		json_object_set_new(o, "port", json_integer(in.port));
	if (o)
		json_object_set_new(o, "postcopy-capable", json_boolean(in.postcopy_capable));
	if (o && in.postcopy)
		json_object_set_new(o, "postcopy",
				    json_pack("{s:I,s:I,s:I}", "missing", (json_int_t)in.missing,
					      "urgent-requests", (json_int_t)in.urgent,
					      "held-requests", (json_int_t)in.held_requests));
	if (o && in.error[0])
		json_object_set_new(o, "error", json_string(in.error));
	return o;
}

/* A mirror owns the bitmap: nobody else may change it. */
static bool bitmap_free(struct vblk_daemon *dm, int fd, const char *id)
{
	if (!vblk_mirror_active(dm))
		return true;
	vblk_rpc_send(fd, id, NULL, RPC_SERVER_ERROR,
		      "a mirror owns dirty tracking (vmig_blk_mirror_cancel first)");
	return false;
}

/* Nothing but whitespace after buf[from] and in the socket? */
static bool nothing_after(const struct vblk_rpc_client *c, size_t from)
{
	int unread = 0;

	for (size_t i = from; i < c->len; i++)
		if (!strchr(" \t\r\n", c->buf[i]))
			return false;
	return ioctl(c->fd, FIONREAD, &unread) == 0 && unread == 0;
}

/* Handle one request object, which ends at c->buf[end]; returns false if
 * the client must be closed. */
static bool dispatch(struct vblk_daemon *dm, const struct vblk_rpc_client *c, size_t end,
		     json_t *req)
{
	int fd = c->fd;
	json_t *jid = json_is_object(req) ? json_object_get(req, "id") : NULL;
	json_t *params = json_is_object(req) ? json_object_get(req, "params") : NULL;
	const char *method =
	    json_is_object(req) ? json_string_value(json_object_get(req, "method")) : NULL;
	char *id = jid ? json_dumps(jid, JSON_COMPACT | JSON_ENCODE_ANY) : strdup("null");
	json_t *result = NULL;
	char *res = NULL;
	bool ok = true;

	if (!id)
		return false;
	if (!method ||
	    (jid && !json_is_integer(jid) && !json_is_string(jid) && !json_is_null(jid)) ||
	    (params && !json_is_object(params) && !json_is_array(params))) {
		vblk_rpc_send(fd, id, NULL, RPC_INVALID_REQUEST, "invalid request");
	} else if (!strcmp(method, "vhost_get_controllers")) {
		result = controllers(dm);
	} else if (!strcmp(method, "bdev_get_iostat")) {
		result = iostat(dm);
	} else if (!strcmp(method, "vmig_blk_set_poll")) {
		result = set_poll(dm, fd, id, params);
	} else if (!strcmp(method, "vmig_blk_set_latency")) {
		result = set_latency(dm, fd, id, params);
	} else if (!strcmp(method, "dirty_bitmap_start")) {
		result = bitmap_free(dm, fd, id) ? dirty_start(dm, fd, id, params) : NULL;
	} else if (!strcmp(method, "dirty_bitmap_stop")) {
		result = bitmap_free(dm, fd, id) ? dirty_stop(dm, fd, id, params) : NULL;
	} else if (!strcmp(method, "dirty_bitmap_query")) {
		result = params_only(fd, id, params, NULL, 0) ? dirty_query(dm) : NULL;
	} else if (!strcmp(method, "dirty_bitmap_take")) {
		result = bitmap_free(dm, fd, id) ? dirty_take(dm, fd, id, params) : NULL;
	} else if (!strcmp(method, "vmig_blk_mirror_start")) {
		result = mirror_start(dm, fd, id, params);
	} else if (!strcmp(method, "vmig_blk_mirror_query")) {
		result = params_only(fd, id, params, NULL, 0) ? mirror_info(dm) : NULL;
	} else if (!strcmp(method, "vmig_blk_mirror_complete")) {
		result = mirror_simple(dm, fd, id, params, vblk_mirror_complete);
	} else if (!strcmp(method, "vmig_blk_mirror_start_postcopy")) {
		result = mirror_simple(dm, fd, id, params, vblk_mirror_start_postcopy);
	} else if (!strcmp(method, "vmig_blk_mirror_cancel")) {
		result = mirror_simple(dm, fd, id, params, vblk_mirror_cancel);
	} else if (!strcmp(method, "vmig_blk_mirror_set_speed")) {
		result = mirror_speed(dm, fd, id, params);
	} else if (!strcmp(method, "vmig_blk_mirror_change")) {
		result = mirror_change(dm, fd, id, params);
	} else if (!strcmp(method, "vmig_blk_incoming_query")) {
		result = params_only(fd, id, params, NULL, 0) ? incoming_info(dm) : NULL;
	} else if (!strcmp(method, "vmig_blk_upgrade")) {
		char err[512];

		/* The binary is fixed at start: a request may not name one. */
		if (vblk_mirror_active(dm) || dm->incoming) {
			vblk_rpc_send(fd, id, NULL, RPC_SERVER_ERROR,
				      "a storage migration is running: upgrade after it");
		} else if (!nothing_after(c, end)) {
			/* the new process answers this request only */
			vblk_rpc_send(
			    fd, id, NULL, RPC_SERVER_ERROR,
			    "vmig_blk_upgrade must be the last request on its connection");
		} else if (json_is_object(params) && json_object_get(params, "binary")) {
			vblk_log(dm, "upgrade refused: the request named a binary");
			vblk_rpc_send(fd, id, NULL, RPC_INVALID_PARAMS,
				      "\"binary\" is not accepted: an upgrade only runs the binary "
				      "fixed when the daemon started (--upgrade-binary, by default "
				      "its own executable)");
		} else if ((json_is_object(params) && json_object_size(params)) ||
			   (json_is_array(params) && json_array_size(params))) {
			vblk_rpc_send(fd, id, NULL, RPC_INVALID_PARAMS,
				      "vmig_blk_upgrade takes no params");
		} else {
			/* Returns only on failure: the new process answers. */
			vblk_upgrade(dm, fd, id, err, sizeof(err));
			vblk_rpc_send(fd, id, NULL, RPC_SERVER_ERROR, err);
		}
	} else {
		vblk_rpc_send(fd, id, NULL, RPC_METHOD_NOT_FOUND, "method not found");
	}
	if (result) {
		res = json_dumps(result, JSON_COMPACT);
		ok = res && vblk_rpc_send(fd, id, res, 0, NULL) == 0;
	}
	free(res);
	json_decref(result);
	free(id);
	return ok;
}

/* Drop the first n bytes of the client's buffer. */
static void consume(struct vblk_rpc_client *c, size_t n)
{
	memmove(c->buf, c->buf + n, c->len - n);
	c->len -= n;
	vmig__json_splitter_consumed(&c->sp, n);
}

/* One whole top-level item; false if the client must be closed. */
static bool handle_item(struct vblk_daemon *dm, const struct vblk_rpc_client *c, size_t start,
			size_t end, enum vmig__json_item kind)
{
	json_error_t err;
	json_t *req;
	bool ok;

	req = kind == VMIG_JSON_CONTAINER
		  ? json_loadb(c->buf + start, end - start, JSON_REJECT_DUPLICATES, &err)
		  : NULL;
	if (!req) {
		vblk_rpc_send(c->fd, "null", NULL, RPC_PARSE_ERROR, "parse error");
		return false;
	}
	ok = dispatch(dm, c, end, req);
	json_decref(req);
	return ok;
}

/*
 * Handle every whole request in the client's buffer; false if the client
 * must be closed. At eof (the client sent all it will) what is left is a
 * request cut short, or a top-level scalar, whose end the splitter cannot
 * see before the next byte: a parse error.
 */
static bool drain_requests(struct vblk_daemon *dm, struct vblk_rpc_client *c, bool eof)
{
	enum vmig__json_item kind;
	size_t start, end;

	while (vmig__json_splitter_next(&c->sp, c->buf, c->len, &start, &end, &kind)) {
		if (!handle_item(dm, c, start, end, kind))
			return false;
	}
	consume(c, start); /* the requests handled, and whitespace after them */
	if (eof && c->len) {
		vblk_rpc_send(c->fd, "null", NULL, RPC_PARSE_ERROR, "parse error");
		return false;
	}
	if (c->len == sizeof(c->buf)) {
		vblk_rpc_send(c->fd, "null", NULL, RPC_INVALID_REQUEST, "request too large");
		return false;
	}
	return true;
}

/*
 * The client's socket is readable: take what fits in its buffer (one read,
 * so that a client that never stops sending cannot hold the control
 * thread: the rest waits for the next turn of the poll loop), answer each
 * whole request, and close it at its end or on an error.
 */
void vblk_rpc_client_input(struct vblk_daemon *dm, int i)
{
	struct vblk_rpc_client *c = dm->clients[i];
	ssize_t n;

	/* drain_requests leaves room: a full buffer closes the client */
	do
		n = recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len, 0);
	while (n < 0 && errno == EINTR);
	if (n > 0) {
		c->len += (size_t)n;
		if (drain_requests(dm, c, false))
			return;
	} else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
		return;
	} else if (n == 0) {
		drain_requests(dm, c, true); /* the end: answered or not, close */
	}
	client_close(dm, i); /* an error, a reset, or the end */
}

/* ---- clients ---- */

static int connect_unix(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd;

	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int r = -errno;

		close(fd);
		return r;
	}
	return fd;
}

/* One call; *reply gets the parsed response. 0 or -errno. */
static int rpc_call(const char *path, const char *method, json_t *params, json_t **reply)
{
	json_t *req = json_pack("{s:s,s:i,s:s}", "jsonrpc", "2.0", "id", 1, "method", method);
	char *text, buf[1 << 20];
	size_t len = 0;
	int fd, r = 0;

	if (params)
		json_object_set(req, "params", params);
	text = json_dumps(req, JSON_COMPACT);
	json_decref(req);
	fd = connect_unix(path);
	if (fd < 0) {
		free(text);
		return fd;
	}
	r = write_all(fd, text, strlen(text));
	free(text);
	/* A daemon that refuses us answers and closes before reading the
	 * request: our write then fails, but the answer is there to read. */
	if (r == -EPIPE)
		r = 0;
	*reply = NULL;
	while (r == 0 && !*reply) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		json_error_t err;
		ssize_t n;

		if (poll(&p, 1, 60000) <= 0) {
			r = -ETIMEDOUT;
			break;
		}
		n = read(fd, buf + len, sizeof(buf) - 1 - len);
		if (n <= 0) {
			r = n < 0 ? -errno : -EPIPE;
			break;
		}
		len += (size_t)n;
		/* The daemon ends each answer with a newline; parse only a
		 * whole one (a piece may end inside a token). */
		if (!memchr(buf, '\n', len)) {
			if (len == sizeof(buf) - 1)
				r = -EBADMSG;
			continue;
		}
		*reply = json_loadb(buf, len, JSON_DISABLE_EOF_CHECK, &err);
		if (!*reply)
			r = -EBADMSG;
	}
	close(fd);
	return r;
}

int vblk_rpc_cli(int argc, char **argv)
{
	const char *path = NULL;
	json_t *params = NULL, *reply = NULL;
	json_error_t jerr;
	int i = 1, r;

	if (i + 1 < argc && !strcmp(argv[i], "--rpc")) {
		path = argv[i + 1];
		i += 2;
	}
	if (!path || i >= argc || argc - i > 2) {
		fprintf(stderr, "usage: vmig-blk rpc --rpc PATH METHOD [JSON-PARAMS]\n");
		return 1;
	}
	if (argc - i == 2 && !(params = json_loads(argv[i + 1], 0, &jerr))) {
		fprintf(stderr, "vmig-blk rpc: bad params: %s\n", jerr.text);
		return 1;
	}
	r = rpc_call(path, argv[i], params, &reply);
	json_decref(params);
	if (r) {
		fprintf(stderr, "vmig-blk rpc: %s: %s\n", path, strerror(-r));
		return 1;
	}
	json_dumpf(reply, stdout, JSON_INDENT(2));
	putchar('\n');
	r = json_object_get(reply, "result") ? 0 : 1;
	json_decref(reply);
	return r;
}

int vblk_upgrade_cli(int argc, char **argv)
{
	static const struct option lopts[] = {
	    {"socket", required_argument, NULL, 's'},
	    {"binary", required_argument, NULL, 'b'},
	    {"rpc", required_argument, NULL, 'c'},
	    {NULL, 0, NULL, 0},
	};
	const char *sock = NULL, *rpc = NULL;
	char path[108];
	json_t *params, *reply = NULL, *res;
	int c, r;

	while ((c = getopt_long(argc, argv, "", lopts, NULL)) != -1) {
		if (c == 's') {
			sock = optarg;
		} else if (c == 'c') {
			rpc = optarg;
		} else if (c == 'b') {
			fprintf(stderr,
				"vmig-blk upgrade: --binary is not accepted: the daemon runs the "
				"binary it was started with (vmig-blk --upgrade-binary PATH)\n");
			return 1;
		} else {
			return 1;
		}
	}
	if ((!sock && !rpc) || optind != argc) {
		fprintf(stderr, "usage: vmig-blk upgrade (--socket PATH | --rpc PATH)\n");
		return 1;
	}
	snprintf(path, sizeof(path), "%s%s", rpc ? rpc : sock, rpc ? "" : ".rpc");
	params = json_object();
	r = rpc_call(path, "vmig_blk_upgrade", params, &reply);
	json_decref(params);
	if (r) {
		fprintf(stderr, "vmig-blk upgrade: %s: %s\n", path, strerror(-r));
		return 1;
	}
	res = json_object_get(reply, "result");
	if (!res) {
		json_t *e = json_object_get(json_object_get(reply, "error"), "message");

		fprintf(stderr, "vmig-blk upgrade: failed: %s\n",
			json_string_value(e) ? json_string_value(e) : "unknown error");
		json_decref(reply);
		return 1;
	}
	printf("vmig-blk upgrade: ok pause_ms=%.3f pid=%lld binary=%s\n",
	       json_real_value(json_object_get(res, "pause_ms")),
	       (long long)json_integer_value(json_object_get(res, "pid")),
	       json_string_value(json_object_get(res, "binary")) ?: "?");
	json_decref(reply);
	return 0;
}
