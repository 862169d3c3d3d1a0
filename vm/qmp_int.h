/* SPDX-License-Identifier: MIT */
/*
 * Internals shared by the QMP server (qmp.c), its commands (qmp_cmds.c) and
 * the human monitor (hmp.c). Not used outside vm/ except by the QMP unit
 * tests and fuzz target, which drive a server without a socket.
 */
#ifndef VMIG_VM_QMP_INT_H
#define VMIG_VM_QMP_INT_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "json_util.h"
#include "qmp.h"

#ifndef VMIG_VERSION
#define VMIG_VERSION "0.1.0"
#endif

/* Bytes a client may have buffered without completing an item. */
#define QMP_MAX_INPUT (1u << 20)
/* Bytes of replies and events a client may leave unread. */
#define QMP_MAX_OUTPUT (8u << 20)
#define QMP_MAX_CLIENTS 64

struct qmp_client;

/* What a command handler sees. The handler sets ret (owned) on success, or
 * fills err (and optionally err_class) and returns -errno. */
struct qmp_cmd_ctx {
	struct qmp_server *srv;
	struct vm *vm;
	json_t *ret;
	const char *err_class; /* NULL means "GenericError" */
	struct vmig__err err;
	/* While a human monitor command runs: its output, where warnings go
	 * (QEMU prints them on the HMP monitor); NULL: warnings go to stderr. */
	FILE *hmp_out;
};

typedef int (*qmp_handler_fn)(struct qmp_cmd_ctx *ctx, const json_t *args);

struct qmp_command {
	const char *name;
	qmp_handler_fn fn;
	const struct json_arg_spec *args; /* NULL: takes no arguments */
	bool free_args;			  /* members are checked by the handler itself */
};

/* The command table (qmp_cmds.c). */
const struct qmp_command *qmp_command_find(const char *name);
const struct qmp_command *qmp_command_at(size_t i); /* NULL past the end */

/*
 * Check args against the command's table and run it. On success *ret is the
 * reply value (owned by the caller, never NULL). On failure returns -errno
 * with ctx->err (and ctx->err_class) set.
 */
int qmp_invoke(struct qmp_cmd_ctx *ctx, const char *name, const json_t *args, json_t **ret);

/* Human monitor (hmp.c): run one command line; *text gets the output
 * (malloc'ed, "\r\n" line ends as QEMU's monitor produces). Returns 0 or
 * -ENOMEM; command errors are part of the text, as in QEMU. */
int hmp_execute(struct qmp_cmd_ctx *ctx, const char *line, char **text);
/* The text of "info migrate" for a query-migrate reply value. */
char *hmp_format_info_migrate(const json_t *query_migrate);

/* query-migrate's reply value for a stats snapshot (QEMU's field names, only
 * the fields that apply to the status, as QEMU does). */
struct vmig_stats;
json_t *qmp_stats_to_json(const struct vmig_stats *st);

/* Server hooks used by commands. */
void qmp_server_request_quit(struct qmp_server *srv);

/*
 * Socket-less use, for unit tests and the fuzz target: a server with no
 * listening socket, and clients fed from memory whose output is kept in a
 * buffer the caller can inspect.
 */
int qmp__server_new_detached(struct qmp_server **out, struct vm *vm);
int qmp__client_new_detached(struct qmp_server *srv, struct qmp_client **out);
/* Feed bytes as if read from the socket. Returns 0, or -EMSGSIZE/-ENOBUFS
 * when the client would have been disconnected. */
int qmp__client_feed(struct qmp_client *c, const void *data, size_t len);
/* Output produced so far (NUL-terminated), and discard it. */
const char *qmp__client_output(struct qmp_client *c, size_t *len);
void qmp__client_output_clear(struct qmp_client *c);
void qmp__client_free(struct qmp_client *c);
/* Deliver queued VM events to clients. */
void qmp__server_flush_events(struct qmp_server *srv);
bool qmp__server_quit_requested(const struct qmp_server *srv);

#endif
