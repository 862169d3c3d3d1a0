/* SPDX-License-Identifier: MIT */
/*
 * A small blocking QMP client for the vmig command-line tool: connect to a
 * unix socket, negotiate, run commands and wait for their replies. It speaks
 * only QMP, so it works against vmig-vm and QEMU alike. Single-threaded.
 */
#ifndef VMIG_TOOLS_QMPC_H
#define VMIG_TOOLS_QMPC_H

#include <jansson.h>

#include "util/util.h"

struct qmpc;

/* addr is "unix:PATH" or a bare PATH. Reads the greeting and sends
 * qmp_capabilities. Returns 0 or -errno with text in err. */
int qmpc_connect(struct qmpc **out, const char *addr, int timeout_ms, struct vmig__err *err);
void qmpc_close(struct qmpc *q);
/* The greeting's "QMP" object (owned by q). */
const json_t *qmpc_greeting(const struct qmpc *q);

/*
 * Events arrive only while qmpc_execute waits for a reply: each one is passed
 * to fn (the message is borrowed for the call), in the order received. With
 * no handler (the default) they are dropped.
 */
typedef void qmpc_event_fn(void *opaque, const json_t *event);
void qmpc_set_event_handler(struct qmpc *q, qmpc_event_fn *fn, void *opaque);

/*
 * Run cmd with args (stolen; may be NULL) and wait up to timeout_ms for its
 * reply; events that arrive meanwhile go to the event handler. On success *ret (may be
 * NULL if the caller does not want it) is the "return" value, owned by the
 * caller. A QMP error returns -EREMOTEIO with "Class: desc" in err; I/O
 * problems and timeouts return other -errno values.
 */
int qmpc_execute(struct qmpc *q, const char *cmd, json_t *args, json_t **ret, int timeout_ms,
		 struct vmig__err *err);

#endif
