// SPDX-License-Identifier: MIT
/*
 * The QMP server of vmig-vm: unix socket, clients, framing, capability
 * negotiation, dispatch and events. Commands themselves live in qmp_cmds.c.
 *
 * Threat model: a client is untrusted. Its bytes may be malformed JSON,
 * binary garbage, endless or deeply nested input, or valid JSON of the wrong
 * shape. Each such item gets a QMP error reply; a client that buffers more
 * than QMP_MAX_INPUT bytes without completing an item, or leaves more than
 * QMP_MAX_OUTPUT bytes of replies unread, is disconnected. Neither stops the
 * server or affects other clients.
 *
 * Threads: everything here runs on the thread in qmp_server_run(), except
 * on_vm_event() (any thread: it only queues under ev_lock and writes the
 * eventfd) and qmp_server_stop() (signal handlers: an atomic flag and a
 * write to the same eventfd).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "qmp_int.h"
#include "vm.h"

#define QMP_EVENT_RING 256
#define QMP_READ_CHUNK 65536

struct qmp_event {
	enum vm_event ev;
	char status[32];
	struct timeval when;
};

struct qmp_client {
	struct qmp_server *srv;
	int fd; /* -1 for a detached (in-memory) client */
	char *in;
	size_t in_len, in_cap;
	struct vmig__json_splitter sp;
	char *out;
	size_t out_len, out_cap, out_off;
	bool negotiated;
	bool dead;
	struct qmp_client *next;
};

struct qmp_server {
	struct vm *vm;
	int listen_fd;
	int wake_fd;
	char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	struct qmp_client *clients;
	unsigned nclients;
	bool quit;
	bool shutdown_sent;
	atomic_bool stop;

	/* ev_lock protects the ring: filled by any thread, drained by ours. */
	pthread_mutex_t ev_lock;
	struct qmp_event ring[QMP_EVENT_RING];
	unsigned ring_head, ring_count;
	uint64_t ring_dropped;
};

/* ---- output ---- */

static void client_append(struct qmp_client *c, const char *s, size_t n)
{
	if (c->dead)
		return;
	if (c->out_len - c->out_off + n > QMP_MAX_OUTPUT) {
		c->dead = true; /* not reading its replies: drop it */
		return;
	}
	if (c->out_off && c->out_len + n + 1 > c->out_cap) {
		memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
		c->out_len -= c->out_off;
		c->out_off = 0;
	}
	if (c->out_len + n + 1 > c->out_cap) {
		size_t cap = c->out_cap ? c->out_cap : 4096;
		char *p;

		while (cap < c->out_len + n + 1)
			cap *= 2;
		p = realloc(c->out, cap);
		if (!p) {
			c->dead = true;
			return;
		}
		c->out = p;
		c->out_cap = cap;
	}
	memcpy(c->out + c->out_len, s, n);
	c->out_len += n;
	c->out[c->out_len] = '\0';
}

/* One JSON message per line, "\r\n" as QEMU ends them. Steals msg. */
static void client_send(struct qmp_client *c, json_t *msg)
{
	char *s = msg ? json_dumps(msg, JSON_ENCODE_ANY) : NULL;

	if (s) {
		client_append(c, s, strlen(s));
		client_append(c, "\r\n", 2);
	} else {
		c->dead = true;
	}
	free(s);
	json_decref(msg);
}

static void client_send_error(struct qmp_client *c, const json_t *id, const char *cls,
			      const char *desc)
{
	json_t *msg =
	    json_pack("{s:{s:s,s:s}}", "error", "class", cls ? cls : "GenericError", "desc", desc);

	if (msg && id)
		json_object_set(msg, "id", (json_t *)id);
	client_send(c, msg);
}

static void client_send_return(struct qmp_client *c, const json_t *id, json_t *ret)
{
	json_t *msg = json_object();

	if (msg) {
		json_object_set_new(msg, "return", ret ? ret : json_object());
		if (id)
			json_object_set(msg, "id", (json_t *)id);
	} else {
		json_decref(ret);
	}
	client_send(c, msg);
}

static int client_write(struct qmp_client *c)
{
	while (c->fd >= 0 && c->out_off < c->out_len) {
		ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off,
				 MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			c->dead = true;
			return -errno;
		}
		c->out_off += (size_t)n;
	}
	if (c->fd >= 0 && c->out_off == c->out_len)
		c->out_off = c->out_len = 0;
	return 0;
}

/* ---- events ---- */

static const char *event_name(enum vm_event ev)
{
	switch (ev) {
	case VM_EV_STOP:
		return "STOP";
	case VM_EV_RESUME:
		return "RESUME";
	case VM_EV_MIGRATION:
		return "MIGRATION";
	}
	return NULL;
}

/* Called from any thread (vCPU control, libvmig's threads). */
static void on_vm_event(void *opaque, enum vm_event ev, const char *migration_status)
{
	struct qmp_server *srv = opaque;
	uint64_t one = 1;
	struct qmp_event *e;

	pthread_mutex_lock(&srv->ev_lock);
	if (srv->ring_count == QMP_EVENT_RING) {
		/* Main loop stalled: keep the newest, count what is lost. */
		srv->ring_head = (srv->ring_head + 1) % QMP_EVENT_RING;
		srv->ring_count--;
		srv->ring_dropped++;
	}
	e = &srv->ring[(srv->ring_head + srv->ring_count) % QMP_EVENT_RING];
	e->ev = ev;
	snprintf(e->status, sizeof(e->status), "%s", migration_status ? migration_status : "");
	gettimeofday(&e->when, NULL);
	srv->ring_count++;
	pthread_mutex_unlock(&srv->ev_lock);
	if (write(srv->wake_fd, &one, sizeof(one)) < 0) {
		/* eventfd counter saturated: the main loop is already woken. */
	}
}

static json_t *event_json(const char *name, json_t *data, const struct timeval *when)
{
	json_t *msg =
	    json_pack("{s:s,s:{s:I,s:I}}", "event", name, "timestamp", "seconds",
		      (json_int_t)when->tv_sec, "microseconds", (json_int_t)when->tv_usec);

	if (msg && data)
		json_object_set_new(msg, "data", data);
	else
		json_decref(data);
	return msg;
}

static void broadcast(struct qmp_server *srv, json_t *msg)
{
	for (struct qmp_client *c = srv->clients; c && msg; c = c->next)
		if (c->negotiated && !c->dead)
			client_send(c, json_incref(msg));
	json_decref(msg);
}

void qmp__server_flush_events(struct qmp_server *srv)
{
	struct qmp_event e;

	for (;;) {
		const char *name;
		json_t *data = NULL;

		pthread_mutex_lock(&srv->ev_lock);
		if (!srv->ring_count) {
			pthread_mutex_unlock(&srv->ev_lock);
			return;
		}
		e = srv->ring[srv->ring_head];
		srv->ring_head = (srv->ring_head + 1) % QMP_EVENT_RING;
		srv->ring_count--;
		pthread_mutex_unlock(&srv->ev_lock);

		name = event_name(e.ev);
		if (!name)
			continue;
		if (e.ev == VM_EV_MIGRATION)
			data = json_pack("{s:s}", "status", e.status);
		broadcast(srv, event_json(name, data, &e.when));
	}
}

void qmp_server_request_quit(struct qmp_server *srv)
{
	srv->quit = true;
}

/* QEMU announces SHUTDOWN after the reply to quit; so do we, once. */
static void announce_shutdown(struct qmp_server *srv)
{
	struct timeval now;

	if (!srv->quit || srv->shutdown_sent)
		return;
	srv->shutdown_sent = true;
	gettimeofday(&now, NULL);
	broadcast(srv,
		  event_json("SHUTDOWN",
			     json_pack("{s:b,s:s}", "guest", 0, "reason", "host-qmp-quit"), &now));
}

bool qmp__server_quit_requested(const struct qmp_server *srv)
{
	return srv->quit;
}

/* ---- dispatch ---- */

static const char *const qmp_members[] = {"execute",  "arguments", "id",
					  "exec-oob", "control",   NULL};

/* Checks on the request object itself, before any command is looked up. */
static int check_request(const json_t *req, const char **cmd, struct vmig__err *err)
{
	const char *key;
	json_t *val;

	json_object_foreach((json_t *)req, key, val)
	{
		unsigned i;

		for (i = 0; qmp_members[i]; i++)
			if (!strcmp(qmp_members[i], key))
				break;
		if (!qmp_members[i]) {
			vmig__err_set(err, "QMP input member '%.200s' is unexpected", key);
			return -EINVAL;
		}
	}
	if (json_object_get(req, "exec-oob")) {
		vmig__err_set(err, "Out-of-band execution is not supported ('oob' capability)");
		return -EINVAL;
	}
	val = json_object_get(req, "execute");
	if (!val) {
		vmig__err_set(err, "QMP input lacks member 'execute'");
		return -EINVAL;
	}
	if (!json_is_string(val)) {
		vmig__err_set(err, "QMP input member 'execute' must be a string");
		return -EINVAL;
	}
	val = json_object_get(req, "arguments");
	if (val && !json_is_object(val)) {
		vmig__err_set(err, "QMP input member 'arguments' must be an object");
		return -EINVAL;
	}
	*cmd = json_string_value(json_object_get(req, "execute"));
	return 0;
}

static void negotiate(struct qmp_client *c, const json_t *id, const json_t *args)
{
	static const struct json_arg_spec spec[] = {{"enable", JA_ARRAY, false}, {.name = NULL}};
	struct vmig__err err;
	const json_t *enable;
	size_t i;
	json_t *v;

	if (json_args_check(args, spec, &err)) {
		client_send_error(c, id, NULL, err.msg);
		return;
	}
	enable = args ? json_object_get(args, "enable") : NULL;
	json_array_foreach((json_t *)enable, i, v)
	{
		vmig__err_set(&err, "Capability '%.200s' not available",
			      json_is_string(v) ? json_string_value(v) : "?");
		client_send_error(c, id, NULL, err.msg);
		return;
	}
	c->negotiated = true;
	client_send_return(c, id, NULL);
}

static void dispatch_request(struct qmp_client *c, json_t *req)
{
	struct qmp_cmd_ctx ctx = {.srv = c->srv, .vm = c->srv->vm};
	const json_t *id = json_object_get(req, "id");
	const json_t *args;
	const char *cmd;
	json_t *ret = NULL;
	int ret_code;

	if (check_request(req, &cmd, &ctx.err)) {
		client_send_error(c, id, NULL, ctx.err.msg);
		return;
	}
	args = json_object_get(req, "arguments");
	if (!strcmp(cmd, "qmp_capabilities")) {
		if (c->negotiated)
			client_send_error(c, id, "CommandNotFound",
					  "Capabilities negotiation is already complete, command "
					  "ignored");
		else
			negotiate(c, id, args);
		return;
	}
	if (!c->negotiated) {
		client_send_error(c, id, "CommandNotFound",
				  "Expecting capabilities negotiation with 'qmp_capabilities'");
		return;
	}
	if (!qmp_command_find(cmd)) {
		vmig__err_set(&ctx.err, "The command %.200s has not been found", cmd);
		client_send_error(c, id, "CommandNotFound", ctx.err.msg);
		return;
	}
	ret_code = qmp_invoke(&ctx, cmd, args, &ret);
	/* Events the command caused (STOP for stop, ...) go first, as in QEMU. */
	qmp__server_flush_events(c->srv);
	if (ret_code)
		client_send_error(c, id, ctx.err_class, ctx.err.msg);
	else
		client_send_return(c, id, ret);
}

static void dispatch_item(struct qmp_client *c, const char *p, size_t n, enum vmig__json_item kind)
{
	json_error_t jerr;
	json_t *req;
	char msg[300];

	switch (kind) {
	case VMIG_JSON_STRAY_CLOSER:
		client_send_error(c, NULL, NULL, "JSON parse error, unexpected closing bracket");
		return;
	case VMIG_JSON_TOO_DEEP:
		client_send_error(c, NULL, NULL, "JSON parse error, nesting too deep");
		return;
	case VMIG_JSON_SCALAR:
		req = json_loadb(p, n, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &jerr);
		break;
	case VMIG_JSON_CONTAINER:
	default:
		req = json_loadb(p, n, JSON_REJECT_DUPLICATES, &jerr);
		break;
	}
	if (!req) {
		snprintf(msg, sizeof(msg), "JSON parse error, %s", jerr.text);
		client_send_error(c, NULL, NULL, msg);
		return;
	}
	if (!json_is_object(req))
		client_send_error(c, NULL, NULL, "QMP input must be a JSON object");
	else
		dispatch_request(c, req);
	json_decref(req);
	announce_shutdown(c->srv);
}

/* Append up to QMP_READ_CHUNK bytes and handle every complete item. */
static int client_feed_chunk(struct qmp_client *c, const char *data, size_t len)
{
	size_t start, end, keep_from = 0;
	enum vmig__json_item kind;

	if (c->in_len + len > c->in_cap) {
		size_t cap = c->in_len + len;
		char *p = realloc(c->in, cap);

		if (!p)
			return -ENOMEM;
		c->in = p;
		c->in_cap = cap;
	}
	memcpy(c->in + c->in_len, data, len);
	c->in_len += len;

	while (!c->dead && !c->srv->quit) {
		if (!vmig__json_splitter_next(&c->sp, c->in, c->in_len, &start, &end, &kind)) {
			keep_from = start;
			break;
		}
		dispatch_item(c, c->in + start, end - start, kind);
		keep_from = end;
	}
	if (c->srv->quit)
		keep_from = c->in_len; /* nothing after quit is executed */
	if (keep_from) {
		memmove(c->in, c->in + keep_from, c->in_len - keep_from);
		c->in_len -= keep_from;
		vmig__json_splitter_consumed(&c->sp, keep_from);
	}
	if (c->in_len > QMP_MAX_INPUT)
		return -EMSGSIZE;
	return c->dead ? -ENOBUFS : 0;
}

int qmp__client_feed(struct qmp_client *c, const void *data, size_t len)
{
	const char *p = data;
	int ret = 0;

	while (len && !ret) {
		size_t n = VMIG_MIN(len, (size_t)QMP_READ_CHUNK);

		ret = client_feed_chunk(c, p, n);
		p += n;
		len -= n;
	}
	if (ret == -EMSGSIZE)
		client_send_error(
		    c, NULL, NULL,
		    "Input exceeds 1 MiB without a complete JSON object; disconnecting");
	if (ret)
		c->dead = true;
	return ret;
}

/* ---- clients ---- */

static json_t *greeting(void)
{
	return json_pack("{s:{s:{s:{s:i,s:i,s:i},s:s},s:[]}}", "QMP", "version", "qemu", "micro", 0,
			 "minor", 2, "major", 7, "package", "vmig " VMIG_VERSION, "capabilities");
}

static int client_add(struct qmp_server *srv, int fd, struct qmp_client **out)
{
	struct qmp_client *c = calloc(1, sizeof(*c));

	if (!c)
		return -ENOMEM;
	c->srv = srv;
	c->fd = fd;
	vmig__json_splitter_init(&c->sp);
	c->next = srv->clients;
	srv->clients = c;
	srv->nclients++;
	client_send(c, greeting());
	*out = c;
	return 0;
}

static void client_unlink_free(struct qmp_client *c)
{
	struct qmp_server *srv = c->srv;

	for (struct qmp_client **pp = &srv->clients; *pp; pp = &(*pp)->next) {
		if (*pp == c) {
			*pp = c->next;
			srv->nclients--;
			break;
		}
	}
	if (c->fd >= 0)
		close(c->fd);
	free(c->in);
	free(c->out);
	free(c);
}

int qmp__client_new_detached(struct qmp_server *srv, struct qmp_client **out)
{
	return client_add(srv, -1, out);
}

const char *qmp__client_output(struct qmp_client *c, size_t *len)
{
	if (len)
		*len = c->out_len - c->out_off;
	return c->out ? c->out + c->out_off : "";
}

void qmp__client_output_clear(struct qmp_client *c)
{
	c->out_off = c->out_len = 0;
	if (c->out)
		c->out[0] = '\0';
}

void qmp__client_free(struct qmp_client *c)
{
	client_unlink_free(c);
}

static void client_read(struct qmp_client *c)
{
	char buf[QMP_READ_CHUNK];
	ssize_t n;

	for (unsigned i = 0; i < 16 && !c->dead; i++) { /* bounded: be fair to others */
		n = recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (n <= 0) {
			c->dead = true;
			return;
		}
		if (qmp__client_feed(c, buf, (size_t)n))
			return;
		if (c->srv->quit)
			return;
	}
}

/* ---- server ---- */

static int server_alloc(struct qmp_server **out, struct vm *vm)
{
	struct qmp_server *srv = calloc(1, sizeof(*srv));

	if (!srv)
		return -ENOMEM;
	srv->vm = vm;
	srv->listen_fd = -1;
	atomic_init(&srv->stop, false);
	srv->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (srv->wake_fd < 0) {
		int ret = -errno;

		free(srv);
		return ret;
	}
	pthread_mutex_init(&srv->ev_lock, NULL);
	*out = srv;
	return 0;
}

int qmp__server_new_detached(struct qmp_server **out, struct vm *vm)
{
	int ret = server_alloc(out, vm);

	if (!ret)
		vm_set_event_cb(vm, on_vm_event, *out);
	return ret;
}

static int server_listen(struct qmp_server *srv, const char *addr, struct vmig__err *err)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	const char *path = addr;
	struct stat st;
	int fd, ret;

	if (!strncmp(addr, "unix:", 5))
		path = addr + 5;
	else if (strchr(addr, ':') && !strchr(addr, '/')) {
		vmig__err_set(err, "QMP address '%s': only unix:PATH is supported", addr);
		return -EINVAL;
	}
	if (!*path || strlen(path) >= sizeof(sa.sun_path)) {
		vmig__err_set(err, "QMP socket path '%s' is empty or too long", path);
		return -ENAMETOOLONG;
	}
	strcpy(sa.sun_path, path);
	strcpy(srv->sock_path, path);
	/* Only a stale socket is removed; never a regular file given by mistake. */
	if (!lstat(path, &st) && S_ISSOCK(st.st_mode))
		unlink(path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		ret = -errno;
		vmig__err_set(err, "QMP socket: %s", strerror(-ret));
		return ret;
	}
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(fd, 16)) {
		ret = -errno;
		vmig__err_set(err, "QMP socket %s: %s", path, strerror(-ret));
		close(fd);
		srv->sock_path[0] = '\0';
		return ret;
	}
	srv->listen_fd = fd;
	return 0;
}

int qmp_server_new(struct qmp_server **out, struct vm *vm, const char *addr, struct vmig__err *err)
{
	struct qmp_server *srv = NULL;
	int ret;

	ret = server_alloc(&srv, vm);
	if (ret) {
		vmig__err_set(err, "QMP server: %s", strerror(-ret));
		return ret;
	}
	ret = server_listen(srv, addr, err);
	if (ret) {
		qmp_server_free(srv);
		return ret;
	}
	vm_set_event_cb(vm, on_vm_event, srv);
	*out = srv;
	return 0;
}

void qmp_server_stop(struct qmp_server *srv)
{
	uint64_t one = 1;

	atomic_store(&srv->stop, true);
	if (write(srv->wake_fd, &one, sizeof(one)) < 0) {
		/* counter saturated: already woken */
	}
}

static void server_accept(struct qmp_server *srv)
{
	struct qmp_client *c;

	for (unsigned i = 0; i < 16; i++) {
		int fd = accept4(srv->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0)
			return;
		if (srv->nclients >= QMP_MAX_CLIENTS || client_add(srv, fd, &c)) {
			close(fd);
			continue;
		}
		client_write(c);
	}
}

static void reap_dead(struct qmp_server *srv)
{
	struct qmp_client *c = srv->clients, *next;

	for (; c; c = next) {
		next = c->next;
		if (!c->dead)
			continue;
		client_write(c); /* best effort: the error that explains why */
		client_unlink_free(c);
	}
}

/* After quit: give clients up to ~1 s to take the reply and SHUTDOWN. */
static void drain_output(struct qmp_server *srv)
{
	uint64_t deadline = vmig__now_ms() + 1000;

	for (;;) {
		struct pollfd pfd[QMP_MAX_CLIENTS];
		unsigned n = 0;

		for (struct qmp_client *c = srv->clients; c && n < QMP_MAX_CLIENTS; c = c->next) {
			client_write(c);
			if (c->fd >= 0 && !c->dead && c->out_off < c->out_len)
				pfd[n++] = (struct pollfd){.fd = c->fd, .events = POLLOUT};
		}
		if (!n || vmig__now_ms() >= deadline)
			return;
		poll(pfd, n, 50);
	}
}

static void handle_ready(struct qmp_server *srv, struct pollfd *pfd, struct qmp_client **who,
			 unsigned n)
{
	uint64_t cnt;

	if (pfd[0].revents & POLLIN) {
		if (read(srv->wake_fd, &cnt, sizeof(cnt)) < 0) {
			/* EAGAIN: spurious wake */
		}
		qmp__server_flush_events(srv);
	}
	if (pfd[1].revents & POLLIN)
		server_accept(srv);
	for (unsigned i = 2; i < n; i++) {
		struct qmp_client *c = who[i];

		if (pfd[i].revents & (POLLIN | POLLHUP | POLLERR))
			client_read(c);
		if (srv->quit)
			break;
	}
	/* Replies and events produced above, for every client. */
	for (struct qmp_client *c = srv->clients; c; c = c->next)
		client_write(c);
}

int qmp_server_run(struct qmp_server *srv)
{
	struct pollfd pfd[2 + QMP_MAX_CLIENTS];
	struct qmp_client *who[2 + QMP_MAX_CLIENTS];

	if (srv->listen_fd < 0)
		return -EINVAL;
	while (!srv->quit && !atomic_load(&srv->stop)) {
		unsigned n = 2;

		pfd[0] = (struct pollfd){.fd = srv->wake_fd, .events = POLLIN};
		pfd[1] = (struct pollfd){.fd = srv->listen_fd, .events = POLLIN};
		for (struct qmp_client *c = srv->clients; c; c = c->next) {
			if (n >= VMIG_ARRAY_SIZE(pfd))
				break;
			pfd[n] = (struct pollfd){.fd = c->fd, .events = POLLIN};
			if (c->out_off < c->out_len)
				pfd[n].events |= POLLOUT;
			who[n++] = c;
		}
		if (poll(pfd, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		handle_ready(srv, pfd, who, n);
		reap_dead(srv);
	}
	if (srv->quit) {
		qmp__server_flush_events(srv);
		drain_output(srv);
	}
	return 0;
}

void qmp_server_free(struct qmp_server *srv)
{
	if (!srv)
		return;
	if (srv->vm)
		vm_set_event_cb(srv->vm, NULL, NULL);
	while (srv->clients)
		client_unlink_free(srv->clients);
	if (srv->listen_fd >= 0) {
		close(srv->listen_fd);
		if (srv->sock_path[0])
			unlink(srv->sock_path);
	}
	close(srv->wake_fd);
	pthread_mutex_destroy(&srv->ev_lock);
	free(srv);
}
