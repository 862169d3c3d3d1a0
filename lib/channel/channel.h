/* SPDX-License-Identifier: MIT */
/*
 * Transports for migration channels: TCP and unix sockets behind one small
 * set of calls, and a rate limiter. The engine sees only fds. Internal.
 */
#ifndef VMIG_CHANNEL_H
#define VMIG_CHANNEL_H

#include <stdint.h>

#include "util/util.h"

/* How long a connect may take before it fails with -ETIMEDOUT. */
#define VMIG_CONNECT_TIMEOUT_MS 30000
/* Connect to a migration URI; *fd is a connected, blocking stream socket.
 * Gives up after VMIG_CONNECT_TIMEOUT_MS, or with -ECANCELED as soon as
 * cancel_fd (if >= 0) becomes readable. */
int vmig__chan_connect(const struct vmig__uri *u, int cancel_fd, int *fd, struct vmig__err *err);
/* Listen on a migration URI (unix: a stale socket file is replaced). */
int vmig__chan_listen(const struct vmig__uri *u, int *fd, struct vmig__err *err);
/* Socket options for bulk transfer (big buffers). */
void vmig__chan_tune(int fd);
/* Local port of a listening TCP socket, or 0. */
int vmig__chan_local_port(int fd);

/*
 * Rate limiter for max-bandwidth: a virtual clock that each send pushes on
 * by its size at the configured rate; a send waits until the clock has
 * caught up with it. bytes_per_s is read on every call, so changes apply at
 * once; 0 = no limit. Not thread-safe: senders sharing one take a lock.
 */
struct vmig__ratelimit {
	uint64_t next_ns; /* when the next byte may go */
};
/* Account bytes about to be sent; returns how long to wait first (ns). */
uint64_t vmig__ratelimit_account(struct vmig__ratelimit *rl, uint64_t bytes_per_s, uint64_t bytes,
				 uint64_t now_ns);

#endif
