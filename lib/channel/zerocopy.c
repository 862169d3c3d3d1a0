// SPDX-License-Identifier: MIT
/*
 * Zero-copy sends (MSG_ZEROCOPY, QEMU's "zero-copy-send") on a plain TCP
 * channel.
 *
 * With MSG_ZEROCOPY the kernel pins the pages behind a write and reads them
 * after sendmsg() has returned, as late as the moment it transmits them.
 * Each successful call is one send, numbered from 0 by the socket (a 32-bit
 * counter). When the kernel no longer needs a range of sends, it queues a
 * notification [lo, hi] on the socket's error queue, with
 * SO_EE_CODE_ZEROCOPY_COPIED if it ended up copying the bytes anyway (it
 * always does when the peer is a socket on the same host: loopback, a veth
 * into another namespace).
 *
 * The channel keeps "done", the number of sends below which every send is
 * complete, and a window of completions that arrived ahead of it (TCP
 * reports them in order in practice; nothing here relies on it). At most
 * ZC_WINDOW sends are outstanding: the next write first waits for the
 * oldest, which also bounds the kernel's notification memory (optmem).
 *
 * Everything here belongs to the channel's writing thread.
 */
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h> /* before linux/errqueue.h, which needs struct timespec */

#include <linux/errqueue.h>

#include "channel/chan_int.h"

#define ZC_WINDOW 1024u

struct vmig__zc {
	uint64_t sent; /* sends made: ids 0 .. sent-1 (the kernel counts mod 2^32) */
	uint64_t done; /* every send below this one is complete */
	uint64_t early[ZC_WINDOW / 64]; /* completed ids in [done, sent), by id % ZC_WINDOW */
	/* since the last vmig__chan_zc_take_copied(): */
	bool any;	 /* some send completed (or went by copy: ENOBUFS) */
	bool all_copied; /* and the kernel copied every one of them */
};

int vmig__chan_zc_enable(struct vmig__chan *c, struct vmig__err *err)
{
	int one = 1;

	if (c->tls) {
		vmig__err_set(err, "zero-copy-send cannot be used with TLS");
		return -EINVAL;
	}
	if (c->zc)
		return 0;
	if (setsockopt(c->fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof(one))) {
		int e = errno;

		vmig__err_set(err,
			      "zero-copy-send: the kernel refuses MSG_ZEROCOPY on this socket "
			      "(%s); it needs a tcp: URI",
			      strerror(e));
		return -e;
	}
	c->zc = calloc(1, sizeof(*c->zc));
	if (!c->zc) {
		vmig__err_set(err, "out of memory");
		return -ENOMEM;
	}
	c->zc->all_copied = true;
	return 0;
}

static void mark_done(struct vmig__zc *z, uint32_t lo, uint32_t hi, bool copied)
{
	uint32_t n = hi - lo + 1;
	/* The 64-bit id of lo: the kernel's ids are the low 32 bits of ours,
	 * and every outstanding one lies in [done, done + ZC_WINDOW). */
	uint64_t id = z->done + (uint32_t)(lo - (uint32_t)z->done);

	z->any = true;
	if (!copied)
		z->all_copied = false;
	/* Only ids still outstanding count (a range never covers more). */
	for (uint32_t k = 0; k < n && id < z->sent; k++, id++)
		if (id >= z->done)
			z->early[(id % ZC_WINDOW) / 64] |= 1ull << (id % 64);
	while (z->done < z->sent) {
		uint64_t *w = &z->early[(z->done % ZC_WINDOW) / 64];
		uint64_t bit = 1ull << (z->done % 64);

		if (!(*w & bit))
			break;
		*w &= ~bit;
		z->done++;
	}
}

/* Read every notification queued now: 0, or -errno. */
static int reap(struct vmig__chan *c)
{
	for (;;) {
		union {
			char buf[CMSG_SPACE(sizeof(struct sock_extended_err) + 64)];
			struct cmsghdr align;
		} ctl;
		struct msghdr msg = {.msg_control = ctl.buf, .msg_controllen = sizeof(ctl.buf)};
		struct cmsghdr *cm;

		if (recvmsg(c->fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) {
			if (errno == EINTR)
				continue;
			return errno == EAGAIN ? 0 : -errno;
		}
		for (cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
			struct sock_extended_err ee;

			if (!((cm->cmsg_level == SOL_IP && cm->cmsg_type == IP_RECVERR) ||
			      (cm->cmsg_level == SOL_IPV6 && cm->cmsg_type == IPV6_RECVERR)) ||
			    cm->cmsg_len < CMSG_LEN(sizeof(ee)))
				continue;
			memcpy(&ee, CMSG_DATA(cm), sizeof(ee));
			if (ee.ee_origin != SO_EE_ORIGIN_ZEROCOPY)
				continue; /* not ours: TCP sets no IP_RECVERR, so none comes */
			if (ee.ee_errno)
				return -(int)ee.ee_errno;
			mark_done(c->zc, ee.ee_info, ee.ee_data,
				  ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED);
		}
	}
}

int vmig__chan_zc_wait(struct vmig__chan *c, uint64_t n)
{
	struct vmig__zc *z = c->zc;

	if (!z)
		return 0;
	if (n > z->sent)
		n = z->sent;
	while (z->done < n) {
		/* No events asked: poll reports POLLERR when a notification is
		 * queued (or the socket has an error), POLLHUP once it is shut
		 * down both ways (vmig__chan_shutdown wakes a waiter so). */
		struct pollfd p = {.fd = c->fd, .events = 0};
		int ret = reap(c);
		int sockerr = 0;
		socklen_t len = sizeof(sockerr);

		if (ret)
			return ret;
		if (z->done >= n)
			break;
		ret = poll(&p, 1, 1000);
		if (ret < 0 && errno != EINTR)
			return -errno;
		if (ret <= 0)
			continue;
		if (p.revents & POLLHUP)
			return -EPIPE;
		if (p.revents & POLLERR) {
			ret = reap(c);
			if (ret)
				return ret;
			if (!getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &sockerr, &len) && sockerr)
				return -sockerr;
		}
	}
	return 0;
}

uint64_t vmig__chan_zc_sent(const struct vmig__chan *c)
{
	return c->zc ? c->zc->sent : 0;
}

bool vmig__chan_zc_take_copied(struct vmig__chan *c)
{
	bool copied;

	if (!c->zc)
		return false;
	copied = c->zc->any && c->zc->all_copied;
	c->zc->any = false;
	c->zc->all_copied = true;
	return copied;
}

int vmig__chan_writev_zc(struct vmig__chan *c, struct iovec *iov, int iovcnt)
{
	struct vmig__zc *z = c->zc;

	if (!z)
		return vmig__chan_writev(c, iov, iovcnt);
	while (iovcnt > 0) {
		struct msghdr msg = {.msg_iov = iov,
				     .msg_iovlen = (size_t)(iovcnt > IOV_MAX ? IOV_MAX : iovcnt)};
		int flags = MSG_NOSIGNAL | MSG_ZEROCOPY;
		ssize_t n;
		int ret;

		if (z->sent - z->done >= ZC_WINDOW) {
			ret = vmig__chan_zc_wait(c, z->done + 1);
			if (ret)
				return ret;
		}
		n = sendmsg(c->fd, &msg, flags);
		if (n < 0 && errno == ENOBUFS) {
			/* Out of notification memory or of locked-memory
			 * allowance: wait for one send if any is out, else
			 * send this one by copy. */
			if (z->done < z->sent) {
				ret = vmig__chan_zc_wait(c, z->done + 1);
				if (ret)
					return ret;
				continue;
			}
			z->any = true; /* a copied send, as far as the caller is told */
			n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
		} else if (n > 0) {
			z->sent++;
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		vmig__iov_advance(&iov, &iovcnt, (size_t)n);
	}
	return 0;
}
