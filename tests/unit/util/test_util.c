// SPDX-License-Identifier: MIT
/* Unit tests for the shared helpers: sizes, URIs, rate limiter. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "channel/channel.h"
#include "util/util.h"

static void test_parse_size(void **state)
{
	uint64_t v;

	assert_int_equal(vmig__parse_size("4096", &v), 0);
	assert_int_equal(v, 4096);
	assert_int_equal(vmig__parse_size("512M", &v), 0);
	assert_int_equal(v, 512ull << 20);
	assert_int_equal(vmig__parse_size("4G", &v), 0);
	assert_int_equal(v, 4ull << 30);
	assert_int_equal(vmig__parse_size("64k", &v), 0);
	assert_int_equal(v, 64ull << 10);
	assert_int_equal(vmig__parse_size("1.5G", &v), 0);
	assert_int_equal(v, 3ull << 29);
	assert_int_equal(vmig__parse_size("2MiB", &v), 0);
	assert_int_equal(v, 2ull << 20);
	assert_int_equal(vmig__parse_size("", &v), -EINVAL);
	assert_int_equal(vmig__parse_size("-1", &v), -EINVAL);
	assert_int_equal(vmig__parse_size("12Q", &v), -EINVAL);
	assert_int_equal(vmig__parse_size("5Mx", &v), -EINVAL);
	assert_int_equal(vmig__parse_size("99999999999T", &v), -ERANGE);
}

static void test_uri(void **state)
{
	struct vmig__uri u;
	struct vmig__err err = {{0}};

	assert_int_equal(vmig__uri_parse("tcp:127.0.0.1:4444", &u, &err), 0);
	assert_int_equal(u.kind, VMIG_URI_TCP);
	assert_string_equal(u.host, "127.0.0.1");
	assert_string_equal(u.port, "4444");
	assert_int_equal(vmig__uri_parse("tcp:[::1]:5", &u, &err), 0);
	assert_string_equal(u.host, "::1");
	assert_int_equal(vmig__uri_parse("tcp::4444", &u, &err), 0);
	assert_string_equal(u.host, "0.0.0.0");
	assert_int_equal(vmig__uri_parse("unix:/tmp/x.sock", &u, &err), 0);
	assert_int_equal(u.kind, VMIG_URI_UNIX);
	assert_string_equal(u.path, "/tmp/x.sock");
	assert_int_equal(vmig__uri_parse("tcp:host", &u, &err), -EINVAL);
	assert_int_equal(vmig__uri_parse("tcp:host:12a", &u, &err), -EINVAL);
	assert_int_equal(vmig__uri_parse("rdma:1.2.3.4:5", &u, &err), -EINVAL);
	assert_non_null(strstr(err.msg, "unsupported"));
	assert_int_equal(vmig__uri_parse("unix:", &u, &err), -EINVAL);
}

static void test_ratelimit(void **state)
{
	struct vmig__ratelimit rl = {0};
	const uint64_t rate = 100ull << 20; /* 100 MiB/s */
	uint64_t now = 1000000000ull, sent = 0;

	/* Unlimited never waits. */
	assert_int_equal(vmig__ratelimit_account(&rl, 0, 1 << 30, now), 0);
	/* Send 1 MiB chunks as fast as allowed for one simulated second. */
	rl.next_ns = now;
	while (now < 2000000000ull) {
		now += vmig__ratelimit_account(&rl, rate, 1 << 20, now);
		sent += 1 << 20;
	}
	/* Within one chunk of 100 MiB. */
	assert_true(sent >= rate - (2 << 20) && sent <= rate + (2 << 20));
}

/* Four senders share one limiter (multifd): together they get the rate,
 * not four times it, however their waits interleave. */
static void test_ratelimit_shared(void **state)
{
	struct vmig__ratelimit rl = {0};
	const uint64_t rate = 32ull << 20;
	uint64_t ready[4] = {0}, sent = 0, start = 5000000000ull;

	(void)state;
	rl.next_ns = start;
	for (;;) {
		unsigned k = 0;

		for (unsigned i = 1; i < 4; i++) /* the sender that is ready first */
			if (ready[i] < ready[k])
				k = i;
		if (ready[k] < start)
			ready[k] = start;
		if (ready[k] >= start + 2000000000ull)
			break;
		ready[k] += vmig__ratelimit_account(&rl, rate, 1 << 20, ready[k]);
		sent += 1 << 20;
	}
	/* Two simulated seconds: 64 MiB, give or take a chunk per sender. */
	assert_true(sent >= 2 * rate - (4 << 20) && sent <= 2 * rate + (5 << 20));
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

/* Every rank of many random arrays (with and without duplicates) against
 * a sorted copy. */
static void test_select_kth(void **state)
{
	uint32_t v[300], w[300], sorted[300];
	uint64_t seed = 7;

	for (int t = 0; t < 500; t++) {
		size_t n = 1 + (size_t)(seed % 300);

		for (size_t i = 0; i < n; i++) {
			seed = seed * 6364136223846793005ull + 1442695040888963407ull;
			v[i] = (uint32_t)(seed >> 33) % (t % 3 ? 7u : 100000u);
		}
		memcpy(sorted, v, n * sizeof(v[0]));
		qsort(sorted, n, sizeof(v[0]), cmp_u32);
		for (size_t k = 0; k < n; k++) {
			memcpy(w, v, n * sizeof(v[0]));
			assert_int_equal(vmig__select_kth(w, n, k), sorted[k]);
		}
	}
}

/* A peer that went away gives -EPIPE, with SIGPIPE left at its default
 * (which would kill the process): libvmig must never raise it. */
static void test_write_to_closed_peer(void **state)
{
	char buf[4096] = {0};
	struct iovec iov[2] = {{buf, sizeof(buf)}, {buf, sizeof(buf)}};
	int sv[2];

	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	close(sv[1]);
	signal(SIGPIPE, SIG_DFL);
	assert_int_equal(vmig__write_full(sv[0], buf, sizeof(buf)), -EPIPE);
	assert_int_equal(vmig__writev_full(sv[0], iov, 2), -EPIPE);
	close(sv[0]);
	/* Files and pipes still work (no sendmsg there). */
	assert_int_equal(pipe(sv), 0);
	assert_int_equal(vmig__write_full(sv[1], "ok", 2), 0);
	assert_int_equal(read(sv[0], buf, sizeof(buf)), 2);
	close(sv[0]);
	close(sv[1]);
}

/* A unix listener with a full backlog: the connect waits for room (as a TCP
 * one would) instead of failing with EAGAIN at once. */
static void test_connect_full_backlog(void **state)
{
	struct vmig__uri u = {.kind = VMIG_URI_UNIX};
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct vmig__err err = {{0}};
	struct vmig__chan *c = NULL;
	int l, fillers[4], n = 0;
	pid_t child;

	snprintf(u.path, sizeof(u.path), "/tmp/vmig-ut-backlog-%d.sock", (int)getpid());
	strcpy(sa.sun_path, u.path);
	unlink(u.path);
	l = socket(AF_UNIX, SOCK_STREAM, 0);
	assert_int_equal(bind(l, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(listen(l, 0), 0);
	for (int i = 0; i < 4; i++) { /* fill the backlog */
		fillers[i] = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
		n += !connect(fillers[i], (struct sockaddr *)&sa, sizeof(sa));
	}
	assert_true(n >= 1);
	child = fork();
	if (child == 0) { /* room for one more comes in 200 ms */
		usleep(200000);
		close(accept(l, NULL, NULL));
		_exit(0);
	}
	assert_int_equal(vmig__chan_connect(&u, NULL, -1, &c, &err), 0);
	assert_int_equal(waitpid(child, NULL, 0), child);
	assert_non_null(c);
	vmig__chan_free(c);
	for (int i = 0; i < 4; i++)
		close(fillers[i]);
	close(l);
	unlink(u.path);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parse_size),
		cmocka_unit_test(test_uri),
		cmocka_unit_test(test_ratelimit),
		cmocka_unit_test(test_ratelimit_shared),
		cmocka_unit_test(test_select_kth),
		cmocka_unit_test(test_write_to_closed_peer),
		cmocka_unit_test(test_connect_full_backlog),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
