// SPDX-License-Identifier: MIT
/*
 * Plain socket channel reads (lib/channel/socket.c), over real TCP on
 * loopback.
 *
 * A read of VMIG_CHAN_LOWAT_MIN bytes or more that has to wait returns once
 * all of it is there, not at the first segment, without ever hanging: not
 * when the stream pauses right after the data, not at the end of the
 * stream, not on a pipe. Afterwards the socket's SO_RCVLOWAT is the
 * kernel's default again, so a poll for a small message still wakes.
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "channel/channel.h"

#define BIG (256u << 10)

/* A connected TCP pair on loopback: fds[0] reads, fds[1] writes. */
static void tcp_pair(int fds[2])
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(a);
	int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	assert_true(l >= 0);
	assert_int_equal(bind(l, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(l, 1), 0);
	assert_int_equal(getsockname(l, (struct sockaddr *)&a, &len), 0);
	fds[1] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(fds[1] >= 0);
	assert_int_equal(connect(fds[1], (struct sockaddr *)&a, sizeof(a)), 0);
	fds[0] = accept(l, NULL, NULL);
	assert_true(fds[0] >= 0);
	close(l);
}

static uint8_t byte_at(size_t i)
{
	return (uint8_t)(i * 131 + i / 4096);
}

struct sender {
	int fd;
	size_t total; /* bytes to send */
	size_t piece; /* in pieces of this many */
	int gap_ms;   /* before each piece */
	bool close_at_end;
	int done_fd; /* keep the connection open until this is readable */
};

static void sleep_ms(int ms)
{
	struct timespec t = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000};

	nanosleep(&t, NULL);
}

static void *send_main(void *arg)
{
	struct sender *s = arg;
	uint8_t *buf = malloc(s->total);

	assert_non_null(buf);
	for (size_t i = 0; i < s->total; i++)
		buf[i] = byte_at(i);
	for (size_t off = 0; off < s->total; off += s->piece) {
		size_t n = s->total - off < s->piece ? s->total - off : s->piece;

		sleep_ms(s->gap_ms);
		assert_int_equal(write(s->fd, buf + off, n), (ssize_t)n);
	}
	free(buf);
	if (s->close_at_end) {
		close(s->fd);
	} else {
		char c;

		assert_int_equal(read(s->done_fd, &c, 1), 1); /* the stream pauses here */
	}
	return NULL;
}

/* Read total bytes with vmig__chan_read(c, want) calls; returns how many
 * calls it took, and checks every byte. */
static unsigned read_all(struct vmig__chan *c, size_t total, size_t want)
{
	uint8_t *buf = malloc(total);
	unsigned calls = 0;

	assert_non_null(buf);
	for (size_t got = 0; got < total; calls++) {
		size_t n = total - got < want ? total - got : want;
		ssize_t r = vmig__chan_read(c, buf + got, n);

		assert_true(r > 0);
		got += (size_t)r;
	}
	for (size_t i = 0; i < total; i++)
		if (buf[i] != byte_at(i))
			fail_msg("byte %zu differs", i);
	free(buf);
	return calls;
}

static int rcvlowat(int fd)
{
	int v = 0;
	socklen_t len = sizeof(v);

	assert_int_equal(getsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &v, &len), 0);
	return v;
}

/* A reading channel on a TCP pair, and a thread sending into it; the
 * stream stays open, idle, until pair_stop(). */
struct pair {
	int fds[2], done[2];
	struct sender s;
	struct vmig__chan *c;
	pthread_t t;
};

static void pair_start(struct pair *p, size_t total, size_t piece, int gap_ms)
{
	tcp_pair(p->fds);
	assert_int_equal(pipe(p->done), 0);
	p->s = (struct sender){.fd = p->fds[1],
			       .total = total,
			       .piece = piece,
			       .gap_ms = gap_ms,
			       .done_fd = p->done[0]};
	p->c = vmig__chan_from_fd(p->fds[0]);
	assert_non_null(p->c);
	assert_int_equal(pthread_create(&p->t, NULL, send_main, &p->s), 0);
}

static void pair_stop(struct pair *p)
{
	assert_int_equal(write(p->done[1], "x", 1), 1);
	assert_int_equal(pthread_join(p->t, NULL), 0);
	vmig__chan_free(p->c);
	close(p->fds[1]);
	close(p->done[0]);
	close(p->done[1]);
}

/* 256 KiB arriving in four pieces, 30 ms apart: one read, all of it. The
 * stream then pauses, and a small message after that is seen by poll() at
 * once. */
static void test_large_read_waits_for_all(void **state)
{
	struct pair p;
	struct pollfd pfd;
	char msg[4];

	(void)state;
	pair_start(&p, BIG, BIG / 4, 30);
	assert_int_equal(read_all(p.c, BIG, BIG), 1);
	assert_int_equal(rcvlowat(p.fds[0]), 1);

	assert_int_equal(send(p.fds[1], "ping", 4, MSG_NOSIGNAL), 4);
	pfd = (struct pollfd){.fd = p.fds[0], .events = POLLIN};
	assert_int_equal(poll(&pfd, 1, 5000), 1);
	assert_int_equal(vmig__chan_read(p.c, msg, sizeof(msg)), 4);
	assert_memory_equal(msg, "ping", 4);
	pair_stop(&p);
}

/* Data that stops short of the read, the stream staying open: the read
 * returns what came (in however many calls), and never waits for bytes
 * that are not coming. 100 KiB in pieces of 24 KiB, asked for in reads of
 * 256 KiB, then 64 KiB exactly, as a record's payload would be. */
static void test_large_read_never_waits_past_the_data(void **state)
{
	static const size_t totals[] = {100u << 10, 64u << 10};

	(void)state;
	for (unsigned k = 0; k < 2; k++) {
		struct pair p;

		pair_start(&p, totals[k], 24u << 10, 20);
		read_all(p.c, totals[k], k ? totals[k] : BIG);
		assert_int_equal(rcvlowat(p.fds[0]), 1);
		pair_stop(&p);
	}
}

/* The peer sends 10 KiB and closes while a 256 KiB read waits: the read
 * returns the 10 KiB, the next one the end of the stream. */
static void test_large_read_sees_the_end(void **state)
{
	int fds[2];
	struct sender s = {
	    .total = 10u << 10, .piece = 10u << 10, .gap_ms = 30, .close_at_end = true};
	struct vmig__chan *c;
	uint8_t *buf = malloc(BIG);
	pthread_t t;

	(void)state;
	assert_non_null(buf);
	tcp_pair(fds);
	s.fd = fds[1];
	c = vmig__chan_from_fd(fds[0]);
	assert_int_equal(pthread_create(&t, NULL, send_main, &s), 0);
	assert_int_equal(vmig__chan_read(c, buf, BIG), 10u << 10);
	assert_int_equal(vmig__chan_read(c, buf, BIG), -EPIPE);
	assert_int_equal(pthread_join(t, NULL), 0);
	vmig__chan_free(c);
	free(buf);
}

/* Not a socket: a pipe is read as before. */
static void test_large_read_from_a_pipe(void **state)
{
	int p[2];
	struct sender s = {.total = BIG, .piece = 16u << 10, .gap_ms = 1, .close_at_end = true};
	struct vmig__chan *c;
	pthread_t t;

	(void)state;
	assert_int_equal(pipe(p), 0);
	s.fd = p[1];
	c = vmig__chan_from_fd(p[0]);
	assert_int_equal(pthread_create(&t, NULL, send_main, &s), 0);
	read_all(c, BIG, BIG);
	assert_int_equal(pthread_join(t, NULL), 0);
	vmig__chan_free(c);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_large_read_waits_for_all),
	    cmocka_unit_test(test_large_read_never_waits_past_the_data),
	    cmocka_unit_test(test_large_read_sees_the_end),
	    cmocka_unit_test(test_large_read_from_a_pipe),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
