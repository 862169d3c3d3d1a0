// SPDX-License-Identifier: MIT
/*
 * TCP and unix-socket transports for migration channels, and the rate
 * limiter. Addresses come from vmig__uri_parse(); name resolution uses
 * getaddrinfo with numeric-friendly flags.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "channel/channel.h"

void vmig__chan_tune(int fd)
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

int vmig__chan_connect(const struct vmig__uri *u, int cancel_fd, int *fd, struct vmig__err *err)
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
		vmig__chan_tune(s);
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
	vmig__chan_tune(s);
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
