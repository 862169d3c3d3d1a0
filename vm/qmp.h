/* SPDX-License-Identifier: MIT */
/*
 * vmig-vm's QMP server: QEMU's machine protocol on a unix socket, so the
 * same clients (the vmig CLI, scripts, libvirt-style tools) drive vmig-vm
 * and QEMU alike. Everything runs on the thread that calls qmp_server_run(),
 * except the VM event callback, which only queues and wakes that thread.
 */
#ifndef VMIG_VM_QMP_H
#define VMIG_VM_QMP_H

#include "util/util.h"

struct vm;
struct qmp_server;

/*
 * addr is "unix:PATH" or a bare PATH. A stale socket file at PATH is
 * unlinked first. Registers itself as the VM's event callback, so STOP,
 * RESUME and MIGRATION reach every client that finished negotiation.
 * Returns 0 or -errno (text in err).
 */
int qmp_server_new(struct qmp_server **out, struct vm *vm, const char *addr, struct vmig__err *err);
/*
 * Serve clients until `quit` or qmp_server_stop(). Returns 0 then, or
 * -errno on a fatal error of the server itself (a misbehaving client is
 * only disconnected).
 */
int qmp_server_run(struct qmp_server *srv);
/* Make qmp_server_run() return soon. Async-signal-safe. */
void qmp_server_stop(struct qmp_server *srv);
/* Close every client and the socket, unlink the socket file. */
void qmp_server_free(struct qmp_server *srv);

#endif
