/* SPDX-License-Identifier: MIT */
/*
 * Small helpers shared by every part of libvmig and its tools: clocks, sizes,
 * URIs, error text, full-length I/O. Internal: not part of the public API.
 */
#ifndef VMIG_UTIL_H
#define VMIG_UTIL_H

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <sys/uio.h>

#define VMIG_PAGE_SIZE 4096u
#define VMIG_PAGE_SHIFT 12u

#define VMIG_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define VMIG_MIN(a, b) ((a) < (b) ? (a) : (b))
#define VMIG_MAX(a, b) ((a) > (b) ? (a) : (b))
#define VMIG_DIV_ROUND_UP(n, d) (((n) + (d)-1) / (d))
#define VMIG_ALIGN_UP(n, a) (((n) + (a)-1) & ~((__typeof__(n))(a)-1))
#define VMIG_ALIGN_DOWN(n, a) ((n) & ~((__typeof__(n))(a)-1))

#define VMIG_EXPORT __attribute__((visibility("default")))
#define VMIG_PRINTF(f, a) __attribute__((format(printf, f, a)))

/* Monotonic clock. */
uint64_t vmig__now_ns(void);
static inline uint64_t vmig__now_us(void) { return vmig__now_ns() / 1000; }
static inline uint64_t vmig__now_ms(void) { return vmig__now_ns() / 1000000; }
/* *ts = now + ms on CLOCK_REALTIME, the clock of pthread_cond_timedwait on a
 * default condition variable. */
void vmig__cond_deadline(struct timespec *ts, unsigned ms);
/* CPU time used by this process so far (user + system), in ns. */
uint64_t vmig__cpu_ns(void);
/* Mbit/s of bytes over ns nanoseconds, as QEMU's mbps (0 for no time). */
static inline double vmig__mbps(uint64_t bytes, uint64_t ns)
{
	return ns ? (double)bytes * 8.0 / ((double)ns / 1e3) : 0.0;
}
/* The calling thread does bulk work from now on (nice 10, best effort):
 * threads serving a waiting guest get the CPU before it when they share. */
void vmig__thread_background(void);

/* Error text: a fixed buffer filled once, passed upward, printed by tools. */
struct vmig__err {
	char msg[256];
};
void vmig__err_set(struct vmig__err *e, const char *fmt, ...) VMIG_PRINTF(2, 3);
void vmig__err_vset(struct vmig__err *e, const char *fmt, va_list ap) VMIG_PRINTF(2, 0);
/* Set only if nothing was set yet (the first error is the interesting one). */
void vmig__err_set_first(struct vmig__err *e, const char *fmt, ...) VMIG_PRINTF(2, 3);
static inline void vmig__err_clear(struct vmig__err *e) { e->msg[0] = '\0'; }

/*
 * "512M", "4G", "4096", "1.5G": sizes with K/M/G/T suffixes, powers of 1024.
 * Returns 0 or -EINVAL/-ERANGE.
 */
int vmig__parse_size(const char *s, uint64_t *out);

/* A parsed migration address: "tcp:HOST:PORT" or "unix:PATH". */
enum vmig__uri_kind { VMIG_URI_TCP = 1, VMIG_URI_UNIX };
struct vmig__uri {
	enum vmig__uri_kind kind;
	char host[256]; /* tcp; "[::1]" is stored without brackets */
	char port[16];  /* tcp */
	char path[108]; /* unix (sun_path size) */
};
int vmig__uri_parse(const char *uri, struct vmig__uri *out, struct vmig__err *err);

/* Errors that mean the connection is gone (a network failure, a peer that
 * died), as opposed to a peer that sent something wrong. */
static inline bool vmig__net_error(int ret)
{
	return ret == -EPIPE || ret == -ECONNRESET || ret == -ENOTCONN || ret == -ETIMEDOUT ||
	       ret == -ECONNABORTED || ret == -EHOSTUNREACH || ret == -ENETUNREACH ||
	       ret == -ENETDOWN || ret == -ESHUTDOWN;
}

/* Full-length I/O on blocking fds, retrying EINTR and short transfers.
 * Return 0, -errno, or -EPIPE for EOF in the middle of a read. */
int vmig__read_full(int fd, void *buf, size_t len);
int vmig__write_full(int fd, const void *buf, size_t len);
/* Writes all of iov; modifies iov in place. */
int vmig__writev_full(int fd, struct iovec *iov, int iovcnt);
/* Step an iovec array past n bytes written (the first one left is trimmed). */
void vmig__iov_advance(struct iovec **iov, int *iovcnt, size_t n);

/* The k-th smallest of v[0..n) (0 <= k < n), reordering v; O(n) expected. */
uint32_t vmig__select_kth(uint32_t *v, size_t n, size_t k);

/* True if the page-size block at p is all zero. */
bool vmig__page_is_zero(const void *p);
bool vmig__buffer_is_zero(const void *p, size_t len);

#endif
