// SPDX-License-Identifier: MIT
/*
 * Helpers shared across libvmig: clocks, size and URI parsing, error text and
 * full-length I/O. Nothing here keeps state.
 */
#include "util/util.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

uint64_t vmig__now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void vmig__cond_deadline(struct timespec *ts, unsigned ms)
{
	clock_gettime(CLOCK_REALTIME, ts);
	ts->tv_sec += ms / 1000;
	ts->tv_nsec += (long)(ms % 1000) * 1000000;
	if (ts->tv_nsec >= 1000000000) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000;
	}
}

uint64_t vmig__cpu_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void vmig__thread_background(void)
{
	/* Linux: a thread id names one thread; lowering its own priority
	 * needs no privilege. Nothing to undo: such a thread keeps it. */
	setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 10);
}

void vmig__err_vset(struct vmig__err *e, const char *fmt, va_list ap)
{
	if (!e)
		return;
	vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
}

void vmig__err_set(struct vmig__err *e, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vmig__err_vset(e, fmt, ap);
	va_end(ap);
}

void vmig__err_set_first(struct vmig__err *e, const char *fmt, ...)
{
	va_list ap;

	if (!e || e->msg[0])
		return;
	va_start(ap, fmt);
	vmig__err_vset(e, fmt, ap);
	va_end(ap);
}

int vmig__parse_size(const char *s, uint64_t *out)
{
	char *end;
	double mult = 1;
	double v;

	if (!s || !*s || !(isdigit((unsigned char)*s) || *s == '.'))
		return -EINVAL;
	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s)
		return -EINVAL;
	switch (toupper((unsigned char)*end)) {
	case '\0':
		break;
	case 'K':
		mult = 1024.0;
		break;
	case 'M':
		mult = 1024.0 * 1024;
		break;
	case 'G':
		mult = 1024.0 * 1024 * 1024;
		break;
	case 'T':
		mult = 1024.0 * 1024 * 1024 * 1024;
		break;
	default:
		return -EINVAL;
	}
	if (*end) {
		end++;
		if (toupper((unsigned char)*end) == 'B' || toupper((unsigned char)*end) == 'I')
			end++;
		if (toupper((unsigned char)*end) == 'B')
			end++;
		if (*end)
			return -EINVAL;
	}
	v *= mult;
	if (!isfinite(v) || v < 0 || v >= 18446744073709551615.0)
		return -ERANGE;
	*out = (uint64_t)v;
	return 0;
}

int vmig__uri_parse(const char *uri, struct vmig__uri *out, struct vmig__err *err)
{
	memset(out, 0, sizeof(*out));
	if (!uri) {
		vmig__err_set(err, "missing migration URI");
		return -EINVAL;
	}
	if (!strncmp(uri, "unix:", 5)) {
		const char *path = uri + 5;

		if (!*path || strlen(path) >= sizeof(out->path)) {
			vmig__err_set(err, "invalid unix socket path in '%s'", uri);
			return -EINVAL;
		}
		out->kind = VMIG_URI_UNIX;
		strcpy(out->path, path);
		return 0;
	}
	if (!strncmp(uri, "tcp:", 4)) {
		const char *hp = uri + 4;
		const char *colon;
		size_t hlen;

		if (*hp == '[') {
			const char *close = strchr(hp, ']');

			if (!close || close[1] != ':')
				goto bad_tcp;
			hp++;
			hlen = (size_t)(close - hp);
			colon = close + 1;
		} else {
			colon = strrchr(hp, ':');
			if (!colon)
				goto bad_tcp;
			hlen = (size_t)(colon - hp);
		}
		if (hlen >= sizeof(out->host) || strlen(colon + 1) >= sizeof(out->port) ||
		    !colon[1])
			goto bad_tcp;
		for (const char *p = colon + 1; *p; p++)
			if (!isdigit((unsigned char)*p))
				goto bad_tcp;
		memcpy(out->host, hp, hlen);
		out->host[hlen] = '\0';
		if (!hlen)
			strcpy(out->host, "0.0.0.0");
		strcpy(out->port, colon + 1);
		out->kind = VMIG_URI_TCP;
		return 0;
bad_tcp:
		vmig__err_set(err, "invalid tcp address '%s' (expected tcp:HOST:PORT)", uri);
		return -EINVAL;
	}
	vmig__err_set(err, "unsupported migration URI '%s' (use tcp:HOST:PORT or unix:PATH)", uri);
	return -EINVAL;
}

int vmig__read_full(int fd, void *buf, size_t len)
{
	char *p = buf;

	while (len) {
		ssize_t n = read(fd, p, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EPIPE;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/*
 * One write of iov to fd. Sockets get MSG_NOSIGNAL: a peer that resets the
 * connection must give this call -EPIPE, not kill an embedder that leaves
 * SIGPIPE at its default. Other fds (files, pipes of tools) use writev.
 */
static ssize_t write_some(int fd, const struct iovec *iov, int iovcnt, bool *not_socket)
{
	if (!*not_socket) {
		struct msghdr msg = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)iovcnt};
		ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);

		if (n >= 0 || errno != ENOTSOCK)
			return n;
		*not_socket = true;
	}
	return writev(fd, iov, iovcnt);
}

int vmig__write_full(int fd, const void *buf, size_t len)
{
	struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};

	return len ? vmig__writev_full(fd, &iov, 1) : 0;
}

int vmig__writev_full(int fd, struct iovec *iov, int iovcnt)
{
	bool not_socket = false;

	while (iovcnt > 0) {
		ssize_t n = write_some(fd, iov, iovcnt > IOV_MAX ? IOV_MAX : iovcnt, &not_socket);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		vmig__iov_advance(&iov, &iovcnt, (size_t)n);
	}
	return 0;
}

void vmig__iov_advance(struct iovec **iovp, int *iovcnt, size_t n)
{
	struct iovec *iov = *iovp;

	while (*iovcnt > 0 && n >= iov->iov_len) {
		n -= iov->iov_len;
		iov++;
		(*iovcnt)--;
	}
	if (*iovcnt > 0) {
		iov->iov_base = (char *)iov->iov_base + n;
		iov->iov_len -= n;
	}
	*iovp = iov;
}

bool vmig__buffer_is_zero(const void *p, size_t len)
{
	const unsigned char *c = p;

	/* Cheap reject on the first word, then let memcmp do the rest fast. */
	if (len >= 16) {
		uint64_t a, b;

		memcpy(&a, c, 8);
		memcpy(&b, c + len - 8, 8);
		if (a | b)
			return false;
		return memcmp(c, c + 8, len - 8) == 0;
	}
	for (size_t i = 0; i < len; i++)
		if (c[i])
			return false;
	return true;
}

bool vmig__page_is_zero(const void *p)
{
	return vmig__buffer_is_zero(p, VMIG_PAGE_SIZE);
}

/* k-th smallest of v[0..n), k < n: quickselect with a three-way partition
 * (duplicates are common: many faults take the same few microseconds). */
uint32_t vmig__select_kth(uint32_t *v, size_t n, size_t k)
{
	size_t lo = 0, hi = n; /* k is in [lo, hi) */

	while (hi - lo > 1) {
		uint32_t pivot = v[lo + (hi - lo) / 2], t;
		size_t lt = lo, i = lo, gt = hi;

		/* [lo, lt) < pivot, [lt, i) == pivot, [gt, hi) > pivot */
		while (i < gt) {
			if (v[i] < pivot) {
				t = v[lt], v[lt++] = v[i], v[i++] = t;
			} else if (v[i] > pivot) {
				t = v[--gt], v[gt] = v[i], v[i] = t;
			} else {
				i++;
			}
		}
		if (k < lt)
			hi = lt;
		else if (k >= gt)
			lo = gt;
		else
			return pivot;
	}
	return v[lo];
}
