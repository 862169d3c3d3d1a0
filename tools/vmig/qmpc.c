// SPDX-License-Identifier: MIT
/*
 * QMP client for the vmig tool. See qmpc.h.
 *
 * Threat model: the server (vmig-vm, QEMU, or whatever listens on the path
 * given) is trusted to speak QMP but not to be well-behaved: a line longer
 * than QMPC_MAX_LINE, a reply that is not JSON, or silence past the timeout
 * ends the command with an error instead of growing memory or hanging.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "qmpc.h"

#define QMPC_MAX_LINE (16u << 20)

struct qmpc {
	int fd;
	char *buf;
	size_t len, cap;
	json_t *greeting;
	json_int_t next_id;
	qmpc_event_fn *on_event; /* may be NULL */
	void *event_opaque;
};

static int sock_connect(const char *addr, struct vmig__err *err)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	const char *path = strncmp(addr, "unix:", 5) ? addr : addr + 5;
	int fd, ret;

	if (!*path || strlen(path) >= sizeof(sa.sun_path)) {
		vmig__err_set(err, "bad QMP socket path '%s'", addr);
		return -EINVAL;
	}
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		ret = -errno;
		vmig__err_set(err, "cannot connect to QMP socket %s: %s", path, strerror(-ret));
		close(fd);
		return ret;
	}
	return fd;
}

/* Next complete line as JSON (NULL on error, with ret set). */
static json_t *read_message(struct qmpc *q, uint64_t deadline_ms, int *ret, struct vmig__err *err)
{
	for (;;) {
		char *nl = q->len ? memchr(q->buf, '\n', q->len) : NULL;

		if (nl) {
			size_t n = (size_t)(nl - q->buf) + 1;
			json_error_t jerr;
			json_t *msg = json_loadb(q->buf, n, 0, &jerr);

			memmove(q->buf, q->buf + n, q->len - n);
			q->len -= n;
			if (msg)
				return msg;
			vmig__err_set(err, "QMP server sent invalid JSON: %s", jerr.text);
			*ret = -EPROTO;
			return NULL;
		}
		if (q->len >= QMPC_MAX_LINE) {
			vmig__err_set(err, "QMP server sent a line over %u bytes", QMPC_MAX_LINE);
			*ret = -EPROTO;
			return NULL;
		}
		if (q->cap - q->len < 65536) {
			char *p = realloc(q->buf, q->cap + 65536);

			if (!p) {
				*ret = -ENOMEM;
				return NULL;
			}
			q->buf = p;
			q->cap += 65536;
		}
		uint64_t now = vmig__now_ms();
		struct pollfd pfd = {.fd = q->fd, .events = POLLIN};
		int left = now >= deadline_ms ? 0 : (int)(deadline_ms - now);
		int pr = poll(&pfd, 1, left);

		if (pr < 0 && errno == EINTR)
			continue; /* a signal (Ctrl-C): the caller decides at its next step */
		if (pr == 0) {
			vmig__err_set(err, "QMP server did not answer in time");
			*ret = -ETIMEDOUT;
			return NULL;
		}
		ssize_t n = recv(q->fd, q->buf + q->len, q->cap - q->len, 0);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			vmig__err_set(err, "QMP connection closed%s%s", n < 0 ? ": " : "",
				      n < 0 ? strerror(errno) : "");
			*ret = n < 0 ? -errno : -ECONNRESET;
			return NULL;
		}
		q->len += (size_t)n;
	}
}

int qmpc_connect(struct qmpc **out, const char *addr, int timeout_ms, struct vmig__err *err)
{
	struct qmpc *q = calloc(1, sizeof(*q));
	json_t *msg;
	int ret = 0;

	if (!q)
		return -ENOMEM;
	q->next_id = 1;
	q->fd = sock_connect(addr, err);
	if (q->fd < 0) {
		ret = q->fd;
		free(q);
		return ret;
	}
	msg = read_message(q, vmig__now_ms() + (uint64_t)timeout_ms, &ret, err);
	if (!msg)
		goto fail;
	q->greeting = json_incref(json_object_get(msg, "QMP"));
	json_decref(msg);
	if (!q->greeting) {
		vmig__err_set(err, "%s did not greet with QMP", addr);
		ret = -EPROTO;
		goto fail;
	}
	ret = qmpc_execute(q, "qmp_capabilities", NULL, NULL, timeout_ms, err);
	if (ret)
		goto fail;
	*out = q;
	return 0;
fail:
	qmpc_close(q);
	return ret;
}

void qmpc_close(struct qmpc *q)
{
	if (!q)
		return;
	close(q->fd);
	json_decref(q->greeting);
	free(q->buf);
	free(q);
}

const json_t *qmpc_greeting(const struct qmpc *q)
{
	return q->greeting;
}

void qmpc_set_event_handler(struct qmpc *q, qmpc_event_fn *fn, void *opaque)
{
	q->on_event = fn;
	q->event_opaque = opaque;
}

static int send_command(struct qmpc *q, const char *cmd, json_t *args, json_int_t id)
{
	json_t *req = json_pack("{s:s,s:I}", "execute", cmd, "id", id);
	char *text;
	int ret;

	if (!req) {
		json_decref(args);
		return -ENOMEM;
	}
	if (args)
		json_object_set_new(req, "arguments", args);
	text = json_dumps(req, JSON_COMPACT);
	json_decref(req);
	if (!text)
		return -ENOMEM;
	ret = vmig__write_full(q->fd, text, strlen(text));
	if (!ret)
		ret = vmig__write_full(q->fd, "\n", 1);
	free(text);
	return ret;
}

int qmpc_execute(struct qmpc *q, const char *cmd, json_t *args, json_t **ret, int timeout_ms,
		 struct vmig__err *err)
{
	uint64_t deadline = vmig__now_ms() + (uint64_t)timeout_ms;
	json_int_t id = q->next_id++;
	int rc = send_command(q, cmd, args, id);

	if (ret)
		*ret = NULL;
	if (rc) {
		vmig__err_set(err, "sending %s: %s", cmd, strerror(-rc));
		return rc;
	}
	for (;;) {
		json_t *msg = read_message(q, deadline, &rc, err);
		const json_t *mid, *e;

		if (!msg)
			return rc;
		mid = json_object_get(msg, "id");
		if (json_object_get(msg, "event") && q->on_event)
			q->on_event(q->event_opaque, msg);
		if (json_object_get(msg, "event") || (mid && json_integer_value(mid) != id)) {
			json_decref(msg);
			continue;
		}
		e = json_object_get(msg, "error");
		if (e) {
			vmig__err_set(err, "%s: %s",
				      json_string_value(json_object_get(e, "class")) ?: "Error",
				      json_string_value(json_object_get(e, "desc")) ?: "?");
			json_decref(msg);
			return -EREMOTEIO;
		}
		if (ret)
			*ret = json_incref(json_object_get(msg, "return"));
		json_decref(msg);
		return 0;
	}
}
