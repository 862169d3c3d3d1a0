/* SPDX-License-Identifier: MIT */
/* Inside lib/channel: the channel object, shared by socket.c and tls.c. */
#ifndef VMIG_CHAN_INT_H
#define VMIG_CHAN_INT_H

#include "channel/channel.h"

struct vmig__tls_conn;
struct vmig__zc;

struct vmig__chan {
	int fd;
	bool nonblock;		    /* accepted, not yet trusted (owner only) */
	struct vmig__tls_conn *tls; /* NULL: plain */
	struct vmig__zc *zc;	    /* zero-copy sends (zerocopy.c), writing thread only */
	int rcvlowat;		    /* SO_RCVLOWAT as set (1: the kernel's default), or -1
				     * once the socket refused it; reading thread only */
};

/* tls.c */
int vmig__tls_conn_new(struct vmig__chan *c, const struct vmig__tls *t, bool server,
		       const char *uri_host, struct vmig__err *err);
void vmig__tls_conn_free(struct vmig__tls_conn *tc);
/* Client: the whole handshake on a connected socket, bounded and
 * cancellable as connect is. */
int vmig__tls_client_handshake(struct vmig__chan *c, int cancel_fd, uint64_t deadline_ns,
			       struct vmig__err *err);
int vmig__tls_handshake_step(struct vmig__chan *c, struct vmig__err *err);
short vmig__tls_events(const struct vmig__chan *c);
ssize_t vmig__tls_read(struct vmig__chan *c, void *buf, size_t n);
int vmig__tls_writev(struct vmig__chan *c, const struct iovec *iov, int iovcnt);
bool vmig__tls_buffered(const struct vmig__chan *c);
const char *vmig__tls_strerror(const struct vmig__chan *c);

#endif
