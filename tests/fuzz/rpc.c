// SPDX-License-Identifier: MIT
/*
 * Fuzz target: vmig-blk's JSON-RPC control socket (tools/vmig-blk/rpc.c):
 * how requests are framed in a client's stream (util/json_split.c), the
 * JSON itself, the request object, every method's params and the answers.
 *
 * The daemon's own code runs as its control thread runs it:
 * vblk_rpc_client_input on one end of a socket pair, fed in pieces, with
 * dirty-block tracking (dirty.c) and the queue statistics (blk.c) real, on
 * a null disk of 1 MiB with no front-end. Storage migration (mirror.c,
 * incoming.c) and the live upgrade are stand-ins here: no input may make
 * the target connect, listen, open a file or exec. They check that what
 * rpc.c hands them was checked.
 *
 * Input: byte 0 = the size of the pieces the rest is sent in (1 to 256
 * bytes); byte 1 = the stand-ins' state (bit 0: a mirror exists, bit 1: it
 * is active, bit 2: an incoming migration exists, bit 3: their operations
 * fail). The rest is what one client sends before it closes its end.
 *
 * The oracle reads the whole input with jansson, independently of the
 * pieces: each whole request gets exactly one answer, in order, with its
 * id, as one line of JSON-RPC 2.0 (a result, or an error with an integer
 * code and a message); a request that is not an object with a method
 * gets -32600; the first bytes that are not a whole JSON object (or one
 * over 64 KiB) get one error with id null, and nothing after it is
 * answered.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vmig-blk/blk.h"
#include "vmig-blk/mirror.h"

#include "fuzz.h"

#define DISK_SIZE (1u << 20)
#define CLIENT_BUF 65536 /* sizeof(struct vblk_rpc_client.buf) */

/* ---- stand-ins for mirror.c, incoming.c, upgrade.c and main.c ---- */

static struct {
	bool exists, active, incoming, fail;
} st;

static int stub_result(char *err, size_t errlen)
{
	if (!st.fail)
		return 0;
	snprintf(err, errlen, "refused by the fuzz target");
	return -EBUSY;
}

void vblk_log(const struct vblk_daemon *dm, const char *fmt, ...)
{
	(void)dm;
	(void)fmt;
}

int vblk_listen_unix(const char *path, mode_t mode, struct vblk_sock_id *id, char *err,
		     size_t errlen)
{
	abort(); /* the target never listens */
}

int vblk_upgrade(struct vblk_daemon *dm, int reply_fd, const char *id_json, char *err,
		 size_t errlen)
{
	/* rpc.c upgrades only with no storage migration and no params */
	CHECK(!st.active && !dm->incoming);
	snprintf(err, errlen, "no upgrade in the fuzz target");
	return -ENOTSUP;
}

bool vblk_postcopy_capable(const struct vblk_daemon *dm)
{
	return false;
}

void vblk_incoming_query(struct vblk_daemon *dm, struct vblk_incoming_info *info)
{
	memset(info, 0, sizeof(*info));
	info->exists = st.incoming;
	info->status = "listening";
}

bool vblk_mirror_active(const struct vblk_daemon *dm)
{
	return st.active;
}

int vblk_mirror_start(struct vblk_daemon *dm, const char *uri, uint32_t granularity, uint64_t speed,
		      bool write_blocking, char *err, size_t errlen)
{
	CHECK(uri != NULL);
	CHECK(granularity == 0 || (granularity >= VBLK_DIRTY_MIN_GRANULARITY &&
				   granularity <= VBLK_DIRTY_MAX_GRANULARITY));
	CHECK(speed <= UINT64_MAX / 2);
	if (stub_result(err, errlen))
		return -EINVAL;
	st.exists = st.active = true;
	return 0;
}

int vblk_mirror_change(struct vblk_daemon *dm, bool write_blocking, char *err, size_t errlen)
{
	return stub_result(err, errlen);
}

int vblk_mirror_complete(struct vblk_daemon *dm, char *err, size_t errlen)
{
	return stub_result(err, errlen);
}

int vblk_mirror_start_postcopy(struct vblk_daemon *dm, char *err, size_t errlen)
{
	return stub_result(err, errlen);
}

int vblk_mirror_cancel(struct vblk_daemon *dm, char *err, size_t errlen)
{
	int r = stub_result(err, errlen);

	if (!r)
		st.active = false;
	return r;
}

int vblk_mirror_set_speed(struct vblk_daemon *dm, uint64_t speed, char *err, size_t errlen)
{
	CHECK(speed <= UINT64_MAX / 2);
	return stub_result(err, errlen);
}

void vblk_mirror_query(struct vblk_daemon *dm, struct vblk_mirror_info *info)
{
	memset(info, 0, sizeof(*info));
	info->exists = st.exists;
	info->status = st.active ? "running" : "concluded";
	snprintf(info->uri, sizeof(info->uri), "unix:/nowhere");
	if (st.fail)
		snprintf(info->error, sizeof(info->error), "failed");
}

/* ---- the oracle ---- */

NO_COVERAGE static bool is_ws(uint8_t c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* Answer line k of out (out[0, len)): parsed, or NULL if there is none. */
NO_COVERAGE static json_t *answer_line(const char *out, size_t len, size_t *at)
{
	const char *nl;
	json_t *j;

	if (*at >= len)
		return NULL;
	nl = memchr(out + *at, '\n', len - *at);
	CHECK(nl != NULL); /* every answer is a whole line */
	j = json_loadb(out + *at, (size_t)(nl - out - *at), 0, NULL);
	CHECK(j != NULL);
	*at = (size_t)(nl - out) + 1;
	return j;
}

/* A JSON-RPC 2.0 answer with this id (NULL: null; ANY_ID: not checked);
 * its error code, or 0 for a result. */
#define ANY_ID ((json_t *)1)
NO_COVERAGE static int check_answer(json_t *a, json_t *id)
{
	json_t *e = json_object_get(a, "error");
	const char *v = json_string_value(json_object_get(a, "jsonrpc"));

	CHECK(json_is_object(a));
	CHECK(v && !strcmp(v, "2.0"));
	if (id == ANY_ID)
		CHECK(json_object_get(a, "id") != NULL);
	else if (id)
		CHECK(json_equal(json_object_get(a, "id"), id));
	else
		CHECK(json_is_null(json_object_get(a, "id")));
	CHECK(!e != !json_object_get(a, "result"));
	if (!e)
		return 0;
	CHECK(json_is_integer(json_object_get(e, "code")));
	CHECK(json_is_string(json_object_get(e, "message")));
	CHECK(json_integer_value(json_object_get(e, "code")) != 0);
	return (int)json_integer_value(json_object_get(e, "code"));
}

/* Nesting the splitter refuses (beyond VMIG_JSON_MAX_DEPTH) though jansson
 * takes it: such a request gets a parse error, and nothing after it is
 * answered. The item p[0, n) is valid JSON: brackets in strings do not
 * count. */
NO_COVERAGE static bool too_deep(const uint8_t *p, size_t n)
{
	size_t depth = 0, max = 0;
	bool str = false, esc = false;

	for (size_t i = 0; i < n; i++) {
		if (esc)
			esc = false;
		else if (str && p[i] == '\\')
			esc = true;
		else if (p[i] == '"')
			str = !str;
		else if (!str && (p[i] == '{' || p[i] == '['))
			max = ++depth > max ? depth : max;
		else if (!str && (p[i] == '}' || p[i] == ']'))
			depth--;
	}
	return max > VMIG_JSON_MAX_DEPTH;
}

/* Methods that answer with a result whatever the daemon's state, given no
 * params: a dispatch that refused everything would not pass. */
NO_COVERAGE static bool always_answers(json_t *req)
{
	static const char *const m[] = {"vhost_get_controllers", "bdev_get_iostat",
					"dirty_bitmap_query", "vmig_blk_mirror_query",
					"vmig_blk_incoming_query"};
	const char *method = json_string_value(json_object_get(req, "method"));
	json_t *id = json_object_get(req, "id");

	if (!method || json_object_get(req, "params") ||
	    (id && !json_is_integer(id) && !json_is_string(id) && !json_is_null(id)))
		return false;
	for (size_t i = 0; i < sizeof(m) / sizeof(m[0]); i++)
		if (!strcmp(method, m[i]))
			return true;
	return false;
}

/*
 * jansson counts a NUL byte in a number as the end of its input, and its
 * position then falls a byte short, so from the request that holds the
 * first NUL on the oracle cannot tell where requests end: the answers from
 * there on are checked for their form only.
 */
NO_COVERAGE static void check_rest(const char *out, size_t len, size_t at)
{
	json_t *a;

	while ((a = answer_line(out, len, &at))) {
		check_answer(a, ANY_ID);
		json_decref(a);
	}
}

NO_COVERAGE static void check_all(const uint8_t *in, size_t n, const char *out, size_t len)
{
	const uint8_t *nul = memchr(in, 0, n);
	size_t pos = 0, at = 0, z = nul ? (size_t)(nul - in) : n;
	json_t *a;

	for (;;) {
		json_error_t err;
		json_t *req, *id;
		size_t item;
		int code;

		while (pos < n && is_ws(in[pos]))
			pos++;
		if (pos == n)
			break;
		req = json_loadb((const char *)in + pos, n - pos,
				 JSON_DISABLE_EOF_CHECK | JSON_REJECT_DUPLICATES, &err);
		item = req ? (size_t)err.position : 0;
		if (nul && z >= pos && z <= pos + (req ? item : (size_t)err.position)) {
			json_decref(req);
			check_rest(out, len, at);
			return;
		}
		if (!req || item > CLIENT_BUF) {
			/* the end: one error for the first bad (or too large) bytes */
			a = answer_line(out, len, &at);
			CHECK(a != NULL);
			code = check_answer(a, NULL);
			CHECK(code == -32700 || code == -32600);
			json_decref(a);
			json_decref(req);
			break;
		}
		a = answer_line(out, len, &at);
		CHECK(a != NULL);
		if (too_deep(in + pos, item)) {
			CHECK(check_answer(a, NULL) == -32700);
			json_decref(a);
			json_decref(req);
			break;
		}
		id = json_is_object(req) ? json_object_get(req, "id") : NULL;
		code = check_answer(a, id);
		if (!json_is_object(req) || !json_is_string(json_object_get(req, "method")))
			CHECK(code == -32600);
		if (json_is_object(req) && always_answers(req))
			CHECK(code == 0);
		json_decref(a);
		json_decref(req);
		pos += item;
	}
	CHECK(at == len); /* nothing more was answered */
}

/* ---- the target ---- */

static struct vblk_daemon dm;

static void daemon_reset(void)
{
	if (dm.disk.dirty)
		vblk_dirty_stop(&dm);
	memset(&dm, 0, sizeof(dm));
	dm.disk.backend = VBLK_BACKEND_NULL;
	dm.disk.fd = dm.disk.lock_fd = -1;
	dm.disk.size = DISK_SIZE;
	dm.disk.block_size = dm.disk.mem_align = dm.disk.physical_block_size = 512;
	dm.conn_fd = dm.rpc_fd = -1;
	dm.opts.socket = "/nowhere/vblk.sock";
	snprintf(dm.rpc_path, sizeof(dm.rpc_path), "/nowhere/vblk.rpc");
	snprintf(dm.upgrade_binary, sizeof(dm.upgrade_binary), "/nowhere/vmig-blk");
}

/* Read what the daemon answered so far into *out. */
static void take_answers(int fd, char **out, size_t *len, size_t *cap, bool until_eof)
{
	for (;;) {
		ssize_t r;

		if (*cap - *len < 65536) {
			*cap = *cap * 2 + 65536;
			*out = realloc(*out, *cap);
			CHECK(*out != NULL);
		}
		r = recv(fd, *out + *len, *cap - *len, until_eof ? 0 : MSG_DONTWAIT);
		if (r > 0) {
			*len += (size_t)r;
			continue;
		}
		if (r < 0 && errno == EINTR)
			continue;
		/* ECONNRESET: the daemon closed with bytes of ours unread; what
		 * it answered before came first */
		CHECK(r == 0 || errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNRESET);
		return;
	}
}

/* The control thread's turns while the client's socket is readable (one
 * read per turn). */
static void input_while_readable(int fd)
{
	for (int turns = 0; dm.clients[0]; turns++) {
		struct pollfd p = {.fd = fd, .events = POLLIN};

		CHECK(turns < 1000);
		if (poll(&p, 1, 0) != 1)
			return;
		vblk_rpc_client_input(&dm, 0);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static char *out;
	static size_t cap;
	size_t chunk, len = 0, sent = 0;
	int sv[2];

	if (size < 2)
		return 0;
	chunk = (size_t)data[0] + 1;
	st.exists = data[1] & 1;
	st.active = st.exists && (data[1] & 2);
	st.incoming = data[1] & 4;
	st.fail = data[1] & 8;
	data += 2;
	size -= 2;

	daemon_reset();
	dm.incoming = st.incoming ? (struct vblk_incoming *)&st : NULL; /* only tested for NULL */
	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
	CHECK(fcntl(sv[0], F_SETFL, O_NONBLOCK) == 0);
	dm.clients[0] = calloc(1, sizeof(*dm.clients[0]));
	CHECK(dm.clients[0] != NULL);
	dm.clients[0]->fd = sv[0];
	vmig__json_splitter_init(&dm.clients[0]->sp);

	/* Piece by piece, as the control thread's poll loop would see them;
	 * answers are taken after each, so none waits on a full socket. */
	while (sent < size && dm.clients[0]) {
		size_t n = size - sent < chunk ? size - sent : chunk;

		CHECK(send(sv[1], data + sent, n, MSG_NOSIGNAL) == (ssize_t)n);
		sent += n;
		input_while_readable(sv[0]);
		take_answers(sv[1], &out, &len, &cap, false);
	}
	if (dm.clients[0]) {
		shutdown(sv[1], SHUT_WR);
		input_while_readable(sv[0]);
	}
	CHECK(dm.clients[0] == NULL); /* the end of the client ends it */
	take_answers(sv[1], &out, &len, &cap, true);
	close(sv[1]);
	check_all(data, size, out, len);
	if (dm.disk.dirty)
		vblk_dirty_stop(&dm);
	return 0;
}
