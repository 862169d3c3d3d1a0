/* SPDX-License-Identifier: MIT */
/*
 * Channels: every connection of a migration (main with its return path,
 * urgent, multifd) is a struct vmig__chan, plain or TLS. This layer owns the
 * sockets: connect, accept, the TLS handshake and peer checks, timeouts,
 * MSG_NOSIGNAL and shutdown. The engine reads and writes channels, never a
 * raw fd. Internal.
 *
 * Threads: a channel may have one reading thread and one writing thread at
 * a time (GnuTLS allows that much; the return path relies on it). Any
 * thread may call vmig__chan_shutdown() to wake both. Only the owner frees
 * it, after both have stopped.
 */
#ifndef VMIG_CHANNEL_H
#define VMIG_CHANNEL_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <vmig/vmig.h>

#include "util/util.h"

/* How long a connect (with its TLS handshake) may take before it fails. */
#define VMIG_CONNECT_TIMEOUT_MS 30000

/*
 * TLS settings of one side of one migration (vmig_session_set_tls): the
 * credentials (a reference is held), the name the server's certificate must
 * carry (client) and the one identity let in (server). A zeroed struct is
 * plain TCP.
 */
struct vmig__tls {
	struct vmig_tls_creds *creds; /* NULL: no TLS */
	char hostname[256];	      /* "" : the URI's host (tcp) or none */
	char authz[512];	      /* "" : anyone with valid credentials */
};
/* Replace t's settings (references creds, drops the old one). */
int vmig__tls_set(struct vmig__tls *t, struct vmig_tls_creds *creds, const char *hostname,
		  const char *authz, struct vmig__err *err);
void vmig__tls_clear(struct vmig__tls *t);
/* 0 if t may serve as endpoint (client: the source); else a reason. */
int vmig__tls_check_endpoint(const struct vmig__tls *t, enum vmig_tls_endpoint endpoint,
			     struct vmig__err *err);

struct vmig__chan;

/*
 * Connect to a migration URI; with t->creds, also run the TLS handshake and
 * check the server. *out is a blocking channel. Gives up after
 * VMIG_CONNECT_TIMEOUT_MS, or with -ECANCELED as soon as cancel_fd (if >= 0)
 * becomes readable.
 */
int vmig__chan_connect(const struct vmig__uri *u, const struct vmig__tls *t, int cancel_fd,
		       struct vmig__chan **out, struct vmig__err *err);
/* Listen on a migration URI: only on the address it names (tcp::PORT is
 * every address). A stale unix socket file is replaced. */
int vmig__chan_listen(const struct vmig__uri *u, int *fd, struct vmig__err *err);
/* Local port of a listening TCP socket, or 0. */
int vmig__chan_local_port(int fd);

/*
 * The incoming side. Accept one connection from listen_fd, non-blocking:
 * 0 with *out, -EAGAIN if none is waiting, or -errno. The new channel then
 * goes through vmig__chan_handshake() (a no-op without TLS) and
 * vmig__chan_recv_nb() (its preamble) without blocking, and becomes a
 * blocking channel with vmig__chan_set_blocking() once it is trusted.
 */
int vmig__chan_accept(int listen_fd, const struct vmig__tls *t, struct vmig__chan **out);
/* 0 when the handshake is done and the peer passed every check; -EAGAIN to
 * be called again when vmig__chan_events() are ready; -EPROTONOSUPPORT if
 * the peer speaks plain vmig; else the peer failed (the reason in err). */
int vmig__chan_handshake(struct vmig__chan *c, struct vmig__err *err);
/* For a peer that turned out to speak plain vmig where TLS was required:
 * one best-effort, non-blocking write outside TLS (its refusal). */
void vmig__chan_reply_plain(struct vmig__chan *c, const struct iovec *iov, int iovcnt);
/* The poll events the channel waits for (POLLIN or POLLOUT). */
short vmig__chan_events(const struct vmig__chan *c);
/* A read that never blocks: bytes (> 0), -EAGAIN, -EPIPE at end, -errno. */
ssize_t vmig__chan_recv_nb(struct vmig__chan *c, void *buf, size_t n);
int vmig__chan_set_blocking(struct vmig__chan *c);

/* Blocking I/O. A read returns bytes (> 0), -EPIPE at end of stream or
 * -errno; a write writes everything (iov is modified) or returns -errno.
 * A TLS failure is -ECONNABORTED with its text in vmig__chan_strerror().
 * A plain read of VMIG_CHAN_LOWAT_MIN bytes or more that has to wait
 * returns once all of it is there (or half the receive buffer, or the
 * stream ends), not at the first segment: see socket.c. */
#define VMIG_CHAN_LOWAT_MIN (64u << 10)
ssize_t vmig__chan_read(struct vmig__chan *c, void *buf, size_t n);
int vmig__chan_writev(struct vmig__chan *c, struct iovec *iov, int iovcnt);
int vmig__chan_write(struct vmig__chan *c, const void *buf, size_t n);
/*
 * Zero-copy writes (MSG_ZEROCOPY; zerocopy.c), writing thread only. Once
 * enabled on a plain TCP channel, vmig__chan_writev_zc() writes everything
 * as vmig__chan_writev() does, but the kernel may read the bytes later: the
 * caller leaves them unchanged until vmig__chan_zc_wait() has returned for
 * a count of sends that includes this write's (vmig__chan_zc_sent() after
 * it). Unmapping them meanwhile is safe; the kernel holds the pages.
 * Without zero-copy enabled, these behave as plain writes, all complete.
 */
int vmig__chan_zc_enable(struct vmig__chan *c, struct vmig__err *err);
int vmig__chan_writev_zc(struct vmig__chan *c, struct iovec *iov, int iovcnt);
uint64_t vmig__chan_zc_sent(const struct vmig__chan *c);
/* Wait until the kernel is done with the first n sends: 0, or -errno if
 * the connection failed or was shut down. */
int vmig__chan_zc_wait(struct vmig__chan *c, uint64_t n);
/* Whether sends completed since the last call and the kernel copied the
 * bytes of every one of them anyway (false if none completed, or without
 * zero-copy), and start again. */
bool vmig__chan_zc_take_copied(struct vmig__chan *c);
/* Wait up to timeout_ms for something to read (or the end): 1, 0 on
 * timeout, -errno. Data TLS has already decrypted counts. */
int vmig__chan_wait_readable(struct vmig__chan *c, int timeout_ms);
/* Whether the peer has ended its side (FIN or reset), without waiting. A
 * vmig peer does that only when it has stopped reading the connection. */
bool vmig__chan_peer_closed(const struct vmig__chan *c);
/* The reading thread: why its last read on c failed with ret, TLS's reason
 * if it was TLS's doing, else strerror(-ret). c may be NULL. */
const char *vmig__chan_strerror(const struct vmig__chan *c, int ret);
/* The fd, for poll() only (hang-up detection); never read or write it. */
int vmig__chan_fd(const struct vmig__chan *c);
bool vmig__chan_is_tls(const struct vmig__chan *c);
/* Wake any thread blocked on c (shutdown(2)); any thread, any time. */
void vmig__chan_shutdown(struct vmig__chan *c, int how);
/* A plain channel over a connected stream socket (or another fd), which it
 * then owns: for tests, tools and the fuzzer. NULL without memory. */
struct vmig__chan *vmig__chan_from_fd(int fd);
/* Close and free (NULL is a no-op). */
void vmig__chan_free(struct vmig__chan *c);

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
