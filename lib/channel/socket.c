// SPDX-License-Identifier: MIT
/*
 * The channel object, TCP and unix-socket transports, plain I/O, and the
 * rate limiter. Addresses come from vmig__uri_parse(); name resolution uses
 * getaddrinfo. TLS is in tls.c: a channel with c->tls set goes there.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "channel/chan_int.h"

static void tune(int fd)
{
	int one = 1;
	int buf = 4 << 20;

	/* Bigger socket buffers keep loopback and LAN pipes full; the kernel
	 * caps them at net.core.{w,r}mem_max. */
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf));
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
	/* The return path carries small latency-sensitive messages. */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static int unix_addr(const struct vmig__uri *u, struct sockaddr_un *sa)
{
	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	if (strlen(u->path) >= sizeof(sa->sun_path))
		return -ENAMETOOLONG;
	strcpy(sa->sun_path, u->path);
	return 0;
}

static int tcp_resolve(const struct vmig__uri *u, bool passive, struct addrinfo **res,
		       struct vmig__err *err)
{
	struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_ADDRCONFIG | (passive ? AI_PASSIVE : 0)};
	int rc = getaddrinfo(u->host, u->port, &hints, res);

	if (rc) {
		vmig__err_set(err, "cannot resolve '%s:%s': %s", u->host, u->port,
			      gai_strerror(rc));
		return -EHOSTUNREACH;
	}
	return 0;
}

/*
 * Connect s to addr without blocking for longer than timeout_ms, and give up
 * at once when cancel_fd becomes readable. s is left in blocking mode.
 */
static int connect_bounded(int s, const struct sockaddr *addr, socklen_t len, int cancel_fd,
			   int timeout_ms)
{
	int flags = fcntl(s, F_GETFL), soerr = 0;
	socklen_t optlen = sizeof(soerr);
	struct pollfd pfd[2] = {{.fd = s, .events = POLLOUT}, {.fd = cancel_fd, .events = POLLIN}};
	uint64_t deadline = vmig__now_ns() + (uint64_t)timeout_ms * 1000000ull;

	if (flags < 0 || fcntl(s, F_SETFL, flags | O_NONBLOCK))
		return -errno;
	/* A unix socket whose listen backlog is full says EAGAIN at once
	 * (where TCP would wait): try again until the deadline. */
	while (connect(s, addr, len)) {
		if (errno == EINPROGRESS)
			goto wait;
		if (errno != EAGAIN || vmig__now_ns() >= deadline)
			return -errno;
		if (cancel_fd >= 0 && poll(&pfd[1], 1, 10) > 0)
			return -ECANCELED;
		if (cancel_fd < 0)
			poll(NULL, 0, 10);
	}
	goto done;
wait:
	for (;;) {
		uint64_t now = vmig__now_ns();
		int n;

		if (now >= deadline)
			return -ETIMEDOUT;
		n = poll(pfd, cancel_fd >= 0 ? 2 : 1, (int)((deadline - now) / 1000000 + 1));
		if (n < 0 && errno != EINTR)
			return -errno;
		if (n > 0 && cancel_fd >= 0 && pfd[1].revents)
			return -ECANCELED;
		if (n > 0 && pfd[0].revents)
			break;
	}
	if (getsockopt(s, SOL_SOCKET, SO_ERROR, &soerr, &optlen))
		return -errno;
	if (soerr)
		return -soerr;
done:
	return fcntl(s, F_SETFL, flags) ? -errno : 0;
}

static int connect_fd(const struct vmig__uri *u, int cancel_fd, int *fd, struct vmig__err *err)
{
	struct addrinfo *res = NULL, *ai;
	int s = -1, ret = 0;

	if (u->kind == VMIG_URI_UNIX) {
		struct sockaddr_un sa;

		if (unix_addr(u, &sa))
			return -ENAMETOOLONG;
		s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		ret = s < 0 ? -errno
			    : connect_bounded(s, (struct sockaddr *)&sa, sizeof(sa), cancel_fd,
					      VMIG_CONNECT_TIMEOUT_MS);
		if (ret) {
			vmig__err_set(err, "connect to unix:%s: %s", u->path, strerror(-ret));
			goto err_close;
		}
		tune(s);
		*fd = s;
		return 0;
	}
	ret = tcp_resolve(u, false, &res, err);
	if (ret)
		return ret;
	ret = -ECONNREFUSED;
	for (ai = res; ai; ai = ai->ai_next) {
		s = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
		if (s < 0)
			continue;
		ret = connect_bounded(s, ai->ai_addr, ai->ai_addrlen, cancel_fd,
				      VMIG_CONNECT_TIMEOUT_MS);
		if (!ret)
			break;
		close(s);
		s = -1;
		if (ret == -ECANCELED)
			break;
	}
	freeaddrinfo(res);
	if (ret == -ETIMEDOUT)
		vmig__err_set(err, "connect to %s:%s: no answer within %d s", u->host, u->port,
			      VMIG_CONNECT_TIMEOUT_MS / 1000);
	else if (ret)
		vmig__err_set(err, "connect to %s:%s: %s", u->host, u->port, strerror(-ret));
	if (ret)
		return ret;
	tune(s);
	*fd = s;
	return 0;
err_close:
	if (s >= 0)
		close(s);
	return ret;
}

int vmig__chan_listen(const struct vmig__uri *u, int *fd, struct vmig__err *err)
{
	struct addrinfo *res = NULL;
	int s = -1, one = 1, ret;

	if (u->kind == VMIG_URI_UNIX) {
		struct sockaddr_un sa;
		struct stat st;

		if (unix_addr(u, &sa))
			return -ENAMETOOLONG;
		/* Replace a stale socket, but never another kind of file. */
		if (!lstat(u->path, &st) && S_ISSOCK(st.st_mode))
			unlink(u->path);
		s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (s < 0 || bind(s, (struct sockaddr *)&sa, sizeof(sa)) || listen(s, 16)) {
			ret = -errno;
			vmig__err_set(err, "listen on unix:%s: %s", u->path, strerror(errno));
			goto err_close;
		}
		*fd = s;
		return 0;
	}
	ret = tcp_resolve(u, true, &res, err);
	if (ret)
		return ret;
	s = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol);
	if (s < 0) {
		ret = -errno;
		goto err_msg;
	}
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(s, res->ai_addr, res->ai_addrlen) || listen(s, 16)) {
		ret = -errno;
		goto err_msg;
	}
	freeaddrinfo(res);
	*fd = s;
	return 0;
err_msg:
	vmig__err_set(err, "listen on %s:%s: %s", u->host, u->port, strerror(-ret));
	freeaddrinfo(res);
err_close:
	if (s >= 0)
		close(s);
	return ret;
}

int vmig__chan_local_port(int fd)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);

	if (getsockname(fd, (struct sockaddr *)&ss, &len))
		return 0;
	if (ss.ss_family == AF_INET)
		return ntohs(((struct sockaddr_in *)&ss)->sin_port);
	if (ss.ss_family == AF_INET6)
		return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
	return 0;
}

static struct vmig__chan *chan_new(int fd)
{
	struct vmig__chan *c = calloc(1, sizeof(*c));

	if (c) {
		c->fd = fd;
		c->rcvlowat = 1;
	}
	return c;
}

struct vmig__chan *vmig__chan_from_fd(int fd)
{
	return chan_new(fd);
}

int vmig__chan_connect(const struct vmig__uri *u, const struct vmig__tls *t, int cancel_fd,
		       struct vmig__chan **out, struct vmig__err *err)
{
	uint64_t deadline = vmig__now_ns() + (uint64_t)VMIG_CONNECT_TIMEOUT_MS * 1000000ull;
	struct vmig__chan *c;
	int fd, ret = connect_fd(u, cancel_fd, &fd, err);

	if (ret)
		return ret;
	c = chan_new(fd);
	if (!c) {
		close(fd);
		vmig__err_set(err, "out of memory for a channel");
		return -ENOMEM;
	}
	if (t && t->creds) {
		ret =
		    vmig__tls_conn_new(c, t, false, u->kind == VMIG_URI_TCP ? u->host : NULL, err);
		if (!ret)
			ret = vmig__tls_client_handshake(c, cancel_fd, deadline, err);
		if (ret) {
			vmig__chan_free(c);
			return ret;
		}
	}
	*out = c;
	return 0;
}

int vmig__chan_accept(int listen_fd, const struct vmig__tls *t, struct vmig__chan **out)
{
	struct vmig__err scratch;
	struct vmig__chan *c;
	int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);

	if (fd < 0)
		return errno == EINTR || errno == EAGAIN || errno == ECONNABORTED || errno == EPERM
			   ? -EAGAIN
			   : -errno;
	tune(fd);
	c = chan_new(fd);
	if (!c || (t && t->creds && vmig__tls_conn_new(c, t, true, NULL, &scratch))) {
		if (c)
			vmig__chan_free(c);
		else
			close(fd);
		return -ENOMEM;
	}
	c->nonblock = true;
	*out = c;
	return 0;
}

int vmig__chan_handshake(struct vmig__chan *c, struct vmig__err *err)
{
	return c->tls ? vmig__tls_handshake_step(c, err) : 0;
}

short vmig__chan_events(const struct vmig__chan *c)
{
	return c->tls ? vmig__tls_events(c) : POLLIN;
}

ssize_t vmig__chan_recv_nb(struct vmig__chan *c, void *buf, size_t n)
{
	ssize_t got;

	assert(c->nonblock);
	if (c->tls)
		return vmig__tls_read(c, buf, n);
	got = recv(c->fd, buf, n, MSG_DONTWAIT);
	if (got < 0)
		return errno == EINTR ? -EAGAIN : -errno;
	return got ? got : -EPIPE;
}

void vmig__chan_reply_plain(struct vmig__chan *c, const struct iovec *iov, int iovcnt)
{
	struct msghdr msg = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)iovcnt};

	if (sendmsg(c->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
		/* best effort: the peer learns less, nothing else changes */
	}
}

int vmig__chan_set_blocking(struct vmig__chan *c)
{
	int flags = fcntl(c->fd, F_GETFL);

	if (flags < 0 || fcntl(c->fd, F_SETFL, flags & ~O_NONBLOCK))
		return -errno;
	c->nonblock = false;
	return 0;
}

/* SO_RCVLOWAT, if it is not already want; a socket that refuses it is
 * left alone from then on. The kernel caps it at half the receive buffer. */
static void set_rcvlowat(struct vmig__chan *c, size_t want)
{
	int v = (int)VMIG_MIN(want, (size_t)INT_MAX);

	if (c->rcvlowat == v || c->rcvlowat < 0)
		return;
	if (setsockopt(c->fd, SOL_SOCKET, SO_RCVLOWAT, &v, sizeof(v)))
		c->rcvlowat = -1;
	else
		c->rcvlowat = v;
}

/*
 * A read of VMIG_CHAN_LOWAT_MIN bytes or more (a run of pages) that finds
 * nothing to read waits until all of it is there, or as much as the
 * receive buffer allows, rather than waking at each segment.
 *
 * Why: a destination that keeps up sleeps in read() most of the time, and
 * each arriving segment wakes it. Over a veth the sender's core runs the
 * receiver's TCP input, wakeups included; in a profile of 4 GiB of pre-copy
 * on huge pages, waking the reader took 907 samples of vmig's source
 * against 221 of QEMU's, whose destination is slower (docs/benchmarks.md).
 *
 * The wait is poll() under SO_RCVLOWAT set to what is still missing, never
 * a blocking read: a read that copied part of the data and slept again
 * would only be woken by SO_RCVLOWAT new bytes, which may never come if
 * the stream pauses after this record. poll() copies nothing, and wakes on
 * an error or the end of the stream as before. The kernel's default is put
 * back before returning, so that no other wait on the socket (a poll for
 * the next small message) is held up by it.
 */
static ssize_t read_large(struct vmig__chan *c, void *buf, size_t n)
{
	struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
	ssize_t got;
	int err = 0;

	for (;;) {
		got = recv(c->fd, buf, n, MSG_DONTWAIT);
		if (got >= 0)
			break;
		err = errno;
		if (err == EINTR)
			continue;
		if (err != EAGAIN && err != EWOULDBLOCK)
			break;
		set_rcvlowat(c, n);
		if (poll(&pfd, 1, -1) < 0 && errno != EINTR) {
			err = errno;
			break;
		}
	}
	set_rcvlowat(c, 1);
	if (got < 0 && err == ENOTSOCK) { /* a pipe, say: read it as such */
		c->rcvlowat = -1;
		return vmig__chan_read(c, buf, n);
	}
	if (got < 0)
		return -err;
	return got ? got : -EPIPE;
}

ssize_t vmig__chan_read(struct vmig__chan *c, void *buf, size_t n)
{
	ssize_t got;

	if (c->tls)
		return vmig__tls_read(c, buf, n);
	if (!c->nonblock && c->rcvlowat >= 0 && n >= VMIG_CHAN_LOWAT_MIN)
		return read_large(c, buf, n);
	do {
		got = read(c->fd, buf, n);
	} while (got < 0 && errno == EINTR);
	if (got < 0)
		return -errno;
	return got ? got : -EPIPE;
}

int vmig__chan_writev(struct vmig__chan *c, struct iovec *iov, int iovcnt)
{
	return c->tls ? vmig__tls_writev(c, iov, iovcnt) : vmig__writev_full(c->fd, iov, iovcnt);
}

int vmig__chan_write(struct vmig__chan *c, const void *buf, size_t n)
{
	struct iovec iov = {.iov_base = (void *)buf, .iov_len = n};

	return n ? vmig__chan_writev(c, &iov, 1) : 0;
}

int vmig__chan_wait_readable(struct vmig__chan *c, int timeout_ms)
{
	struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
	int n;

	if (c->tls && vmig__tls_buffered(c))
		return 1;
	do {
		n = poll(&pfd, 1, timeout_ms);
	} while (n < 0 && errno == EINTR);
	return n < 0 ? -errno : n;
}

bool vmig__chan_peer_closed(const struct vmig__chan *c)
{
	/* Not POLLERR: with zero-copy-send it only means a completion is
	 * queued. A reset sets POLLHUP as well. */
	struct pollfd pfd = {.fd = c->fd, .events = POLLRDHUP};

	return poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLRDHUP | POLLHUP));
}

const char *vmig__chan_strerror(const struct vmig__chan *c, int ret)
{
	const char *why = c && c->tls && ret == -ECONNABORTED ? vmig__tls_strerror(c) : NULL;

	return why ? why : strerror(-ret);
}

int vmig__chan_fd(const struct vmig__chan *c)
{
	return c->fd;
}

bool vmig__chan_is_tls(const struct vmig__chan *c)
{
	return c->tls;
}

void vmig__chan_shutdown(struct vmig__chan *c, int how)
{
	shutdown(c->fd, how);
}

void vmig__chan_free(struct vmig__chan *c)
{
	if (!c)
		return;
	if (c->tls)
		vmig__tls_conn_free(c->tls);
	close(c->fd);
	free(c->zc);
	free(c);
}

uint64_t vmig__ratelimit_account(struct vmig__ratelimit *rl, uint64_t bytes_per_s, uint64_t bytes,
				 uint64_t now_ns)
{
	/* Unused time is banked for at most this long: a short burst after
	 * a pause, never a flood. */
	const uint64_t bank_ns = 10000000ull;
	uint64_t wait_ns;

	if (!bytes_per_s) {
		rl->next_ns = now_ns;
		return 0;
	}
	if (rl->next_ns + bank_ns < now_ns)
		rl->next_ns = now_ns - bank_ns;
	wait_ns = rl->next_ns > now_ns ? rl->next_ns - now_ns : 0;
	/* Every caller's bytes push the clock on, so several senders sharing
	 * one limiter are spaced out together, debts included. */
	rl->next_ns += (uint64_t)((double)bytes * 1e9 / (double)bytes_per_s);
	return wait_ns;
}
