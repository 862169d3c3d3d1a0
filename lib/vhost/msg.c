// SPDX-License-Identifier: MIT
/*
 * vhost-user message framing on the unix socket: one 12-byte header (with
 * the fds as SCM_RIGHTS ancillary data), then the payload. Only framing is
 * checked here (payload size against our buffer, truncated control data);
 * per-message rules (id, size, fd count) are checked by the dispatch table
 * in dev.c before any handler runs.
 *
 * Threat model: the peer is untrusted. A size larger than any message we
 * know drops the connection before we read it; fds are received with
 * MSG_CMSG_CLOEXEC and every fd of a rejected message is closed, so a peer
 * cannot make us leak descriptors. The caller bounds how long a message
 * may take to arrive and a reply to leave (SO_RCVTIMEO, SO_SNDTIMEO):
 * both then fail with -ETIMEDOUT, and a peer that stops mid-message or
 * never reads cannot hold the caller's thread.
 */
#include "vhost/vhost.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

void vhost_msg_close_fds(struct vhost_msg *m)
{
	for (unsigned i = 0; i < m->nfds; i++) {
		if (m->fds[i] >= 0)
			close(m->fds[i]);
		m->fds[i] = -1;
	}
	m->nfds = 0;
}

static int read_payload(int sock, void *buf, size_t len)
{
	uint8_t *p = buf;

	while (len) {
		ssize_t n = recv(sock, p, len, 0);

		if (n < 0 && errno == EINTR)
			continue;
		/* SO_RCVTIMEO ran out: the rest of the message never came. */
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return -ETIMEDOUT;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EPIPE;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Take the fds out of the control messages; -EBADMSG if there are too many. */
static int take_fds(struct msghdr *mh, struct vhost_msg *m)
{
	int r = 0;

	for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
		size_t n;
		int *fds;

		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		fds = (int *)CMSG_DATA(c);
		for (size_t i = 0; i < n; i++) {
			int fd;

			memcpy(&fd, &fds[i], sizeof(fd));
			if (m->nfds < VHOST_USER_MAX_FDS)
				m->fds[m->nfds++] = fd;
			else {
				close(fd);
				r = -EBADMSG;
			}
		}
	}
	return r;
}

int vhost_msg_recv(int sock, struct vhost_msg *m)
{
	char cbuf[CMSG_SPACE(sizeof(int) * VHOST_USER_MAX_FDS)];
	struct iovec iov = {.iov_base = &m->hdr, .iov_len = sizeof(m->hdr)};
	struct msghdr mh = {
	    .msg_iov = &iov,
	    .msg_iovlen = 1,
	    .msg_control = cbuf,
	    .msg_controllen = sizeof(cbuf),
	};
	ssize_t n;
	int r;

	m->nfds = 0;
	do {
		n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
	} while (n < 0 && errno == EINTR);
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
		return -ETIMEDOUT;
	if (n < 0)
		return -errno;
	if (n == 0)
		return -EPIPE;
	r = take_fds(&mh, m);
	if (r == 0 && (mh.msg_flags & MSG_CTRUNC))
		r = -EBADMSG;
	if (r == 0 && (size_t)n < sizeof(m->hdr))
		r = read_payload(sock, (uint8_t *)&m->hdr + n, sizeof(m->hdr) - (size_t)n);
	if (r == 0 && m->hdr.size > VHOST_USER_PAYLOAD_MAX)
		r = -EBADMSG;
	if (r == 0 && m->hdr.size)
		r = read_payload(sock, &m->p, m->hdr.size);
	if (r)
		vhost_msg_close_fds(m);
	return r;
}

int vhost_msg_send(int sock, const struct vhost_msg *m)
{
	char cbuf[CMSG_SPACE(sizeof(int) * VHOST_USER_MAX_FDS)];
	struct iovec iov[2] = {
	    {.iov_base = (void *)&m->hdr, .iov_len = sizeof(m->hdr)},
	    {.iov_base = (void *)&m->p, .iov_len = m->hdr.size},
	};
	struct msghdr mh = {.msg_iov = iov, .msg_iovlen = m->hdr.size ? 2 : 1};
	size_t total = sizeof(m->hdr) + m->hdr.size;
	ssize_t n;

	if (m->hdr.size > VHOST_USER_PAYLOAD_MAX || m->nfds > VHOST_USER_MAX_FDS)
		return -EINVAL;
	if (m->nfds) {
		struct cmsghdr *c;

		memset(cbuf, 0, sizeof(cbuf));
		mh.msg_control = cbuf;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * m->nfds);
		c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * m->nfds);
		memcpy(CMSG_DATA(c), m->fds, sizeof(int) * m->nfds);
	}
	do {
		n = sendmsg(sock, &mh, MSG_NOSIGNAL);
	} while (n < 0 && errno == EINTR);
	/* SO_SNDTIMEO ran out: the peer does not read its replies. */
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
		return -ETIMEDOUT;
	if (n < 0)
		return -errno;
	/* Replies are small; a short write on a blocking unix socket means
	 * the peer is gone. */
	return (size_t)n == total ? 0 : -EPIPE;
}
