// SPDX-License-Identifier: MIT
/*
 * The channel layer with TLS, in one process: credentials that load or say
 * why not, handshakes between a client and a server over a real unix
 * socket (the server side driven without blocking, as the incoming side
 * does), data that crosses intact whatever the iovec shape, and every
 * refusal with its reason. PSK keys are made here; the x509 cases run end
 * to end in tests/integration/test_tls.py.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "channel/channel.h"

static char base[64];

static void write_file(const char *dir, const char *name, const char *text)
{
	char p[256];
	FILE *f;

	snprintf(p, sizeof(p), "%s/%s", dir, name);
	f = fopen(p, "w");
	assert_non_null(f);
	fputs(text, f);
	fclose(f);
}

static void make_dir(char *out, size_t len, const char *name)
{
	snprintf(out, len, "%s/%s", base, name);
	mkdir(out, 0700);
}

static int setup(void **state)
{
	char d[128];

	snprintf(base, sizeof(base), "/tmp/vmig-ut-tls-%d", (int)getpid());
	mkdir(base, 0700);
	make_dir(d, sizeof(d), "good");
	write_file(d, "keys.psk",
		   "# a comment line is skipped\n"
		   "qemu:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n"
		   "other:ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n");
	make_dir(d, sizeof(d), "bad-key");
	write_file(d, "keys.psk",
		   "qemu:0102030405060708090a0b0c0d0e0f100102030405060708090a0b0c0d0e0f10\n");
	make_dir(d, sizeof(d), "garbage");
	write_file(d, "keys.psk", "no colon here\nqemu:xyz\n");
	make_dir(d, sizeof(d), "empty");
	return 0;
}

static int teardown(void **state)
{
	char cmd[128];

	snprintf(cmd, sizeof(cmd), "rm -rf %s", base);
	return system(cmd);
}

static vmig_tls_creds *psk(const char *dir, enum vmig_tls_endpoint ep, const char *user)
{
	char path[128], err[256] = "";
	struct vmig_tls_creds_opts o = {
	    .size = sizeof(o), .endpoint = ep, .dir = path, .username = user};
	vmig_tls_creds *c = NULL;

	snprintf(path, sizeof(path), "%s/%s", base, dir);
	assert_int_equal(vmig_tls_creds_new_psk(&c, &o, err, sizeof(err)), 0);
	assert_string_equal(err, "");
	return c;
}

static void expect_creds_error(bool x509, const char *dir, enum vmig_tls_endpoint ep,
			       const char *user, const char *words)
{
	char path[128], err[256] = "";
	struct vmig_tls_creds_opts o = {
	    .size = sizeof(o), .endpoint = ep, .dir = path, .username = user, .verify_peer = true};
	vmig_tls_creds *c = NULL;
	int ret;

	snprintf(path, sizeof(path), "%s/%s", base, dir);
	ret = x509 ? vmig_tls_creds_new_x509(&c, &o, err, sizeof(err))
		   : vmig_tls_creds_new_psk(&c, &o, err, sizeof(err));
	assert_true(ret < 0);
	assert_null(c);
	if (!strstr(err, words))
		fail_msg("error '%s' lacks '%s'", err, words);
}

static void test_creds_errors(void **state)
{
	expect_creds_error(false, "missing", VMIG_TLS_ENDPOINT_SERVER, NULL, "missing");
	expect_creds_error(false, "empty", VMIG_TLS_ENDPOINT_SERVER, NULL, "keys.psk");
	expect_creds_error(false, "garbage", VMIG_TLS_ENDPOINT_CLIENT, NULL, "username:hexkey");
	expect_creds_error(false, "good", VMIG_TLS_ENDPOINT_CLIENT, "nobody", "'nobody'");
	expect_creds_error(true, "empty", VMIG_TLS_ENDPOINT_SERVER, NULL, "ca-cert.pem");
	expect_creds_error(true, "missing", VMIG_TLS_ENDPOINT_CLIENT, NULL, "missing");
}

/* ---- a client and a server over a unix socket ---------------------- */

struct peer {
	struct vmig__tls tls;
	struct vmig__uri u;
	struct vmig__chan *c;
	struct vmig__err err;
	int ret;
};

static void *client_thread(void *arg)
{
	struct peer *p = arg;

	p->ret = vmig__chan_connect(&p->u, &p->tls, -1, &p->c, &p->err);
	return NULL;
}

/* Accept one connection and drive its handshake as accept.c does. */
static int serve(int lfd, struct peer *srv)
{
	struct pollfd pfd = {.fd = lfd, .events = POLLIN};
	int ret;

	assert_int_equal(poll(&pfd, 1, 5000), 1);
	assert_int_equal(vmig__chan_accept(lfd, &srv->tls, &srv->c), 0);
	while ((ret = vmig__chan_handshake(srv->c, &srv->err)) == -EAGAIN) {
		pfd = (struct pollfd){.fd = vmig__chan_fd(srv->c),
				      .events = vmig__chan_events(srv->c)};
		assert_int_equal(poll(&pfd, 1, 5000), 1);
	}
	return ret;
}

/* Run a handshake between cli and srv; the server's result. */
static int handshake(struct peer *cli, struct peer *srv)
{
	struct vmig__uri u = {.kind = VMIG_URI_UNIX};
	struct vmig__err err = {{0}};
	pthread_t t;
	int lfd, ret;

	snprintf(u.path, sizeof(u.path), "%s/sock", base);
	assert_int_equal(vmig__chan_listen(&u, &lfd, &err), 0);
	cli->u = u;
	assert_int_equal(pthread_create(&t, NULL, client_thread, cli), 0);
	ret = serve(lfd, srv);
	if (ret) { /* as accept.c: the peer learns why before we close */
		vmig__chan_shutdown(srv->c, SHUT_WR);
		vmig__chan_free(srv->c);
		srv->c = NULL;
	}
	pthread_join(t, NULL);
	close(lfd);
	return ret;
}

static void peers_free(struct peer *cli, struct peer *srv)
{
	vmig__chan_free(cli->c);
	vmig__chan_free(srv->c);
	vmig__tls_clear(&cli->tls);
	vmig__tls_clear(&srv->tls);
}

static void set_tls(struct peer *p, vmig_tls_creds *creds, const char *authz)
{
	struct vmig__err err = {{0}};

	assert_int_equal(vmig__tls_set(&p->tls, creds, NULL, authz, &err), 0);
	vmig_tls_creds_unref(creds); /* p->tls holds its own reference */
}

struct blob {
	struct vmig__chan *c;
	uint8_t *data;
	size_t len;
	int ret;
};

static void *reader_thread(void *arg)
{
	struct blob *b = arg;

	for (size_t got = 0; got < b->len;) {
		ssize_t n = vmig__chan_read(b->c, b->data + got, b->len - got);

		if (n < 0) {
			b->ret = (int)n;
			return NULL;
		}
		got += (size_t)n;
	}
	b->ret = 0;
	return NULL;
}

/* Data written in every shape (tiny pieces, whole records, odd sizes)
 * arrives byte for byte. */
static void test_psk_roundtrip(void **state)
{
	struct peer cli = {0}, srv = {0};
	size_t len = (3u << 20) + 4321;
	uint8_t *out = malloc(len), *in = malloc(len);
	struct blob b = {.data = in, .len = len};
	struct iovec iov[64];
	pthread_t t;
	size_t off = 0;
	int n = 0;

	assert_non_null(out);
	assert_non_null(in);
	for (size_t i = 0; i < len; i++)
		out[i] = (uint8_t)(i * 131 + (i >> 12));
	set_tls(&cli, psk("good", VMIG_TLS_ENDPOINT_CLIENT, NULL), NULL);
	set_tls(&srv, psk("good", VMIG_TLS_ENDPOINT_SERVER, NULL), "qemu");
	assert_int_equal(handshake(&cli, &srv), 0);
	assert_int_equal(cli.ret, 0);
	assert_true(vmig__chan_is_tls(cli.c));
	assert_int_equal(vmig__chan_set_blocking(srv.c), 0);
	b.c = srv.c;
	assert_int_equal(pthread_create(&t, NULL, reader_thread, &b), 0);
	while (off < len) { /* sizes 1, 7, 16384, 16385, 100000, ... */
		static const size_t sizes[] = {1, 7, 8, 16384, 16385, 100000, 4096, 3};
		size_t take = sizes[n % 8] < len - off ? sizes[n % 8] : len - off;

		iov[n % 64] = (struct iovec){out + off, take};
		off += take;
		if (++n % 64 == 0 || off == len)
			assert_int_equal(vmig__chan_writev(cli.c, iov, (n - 1) % 64 + 1), 0);
	}
	pthread_join(t, NULL);
	assert_int_equal(b.ret, 0);
	assert_memory_equal(in, out, len);
	/* The writer's end: the reader sees the end of the stream. */
	vmig__chan_shutdown(cli.c, SHUT_RDWR);
	assert_int_equal(vmig__chan_read(srv.c, in, 1), -EPIPE);
	peers_free(&cli, &srv);
	free(in);
	free(out);
}

static void test_psk_mismatch(void **state)
{
	struct peer cli = {0}, srv = {0};

	set_tls(&cli, psk("bad-key", VMIG_TLS_ENDPOINT_CLIENT, NULL), NULL);
	set_tls(&srv, psk("good", VMIG_TLS_ENDPOINT_SERVER, NULL), NULL);
	assert_int_equal(handshake(&cli, &srv), -ECONNABORTED);
	assert_true(cli.ret < 0);
	assert_non_null(strstr(cli.err.msg, "PSK"));
	assert_non_null(strstr(srv.err.msg, "TLS"));
	peers_free(&cli, &srv);
}

static void test_authz_refuses_other_identity(void **state)
{
	struct peer cli = {0}, srv = {0};
	uint8_t byte = 0;

	set_tls(&cli, psk("good", VMIG_TLS_ENDPOINT_CLIENT, "other"), NULL);
	set_tls(&srv, psk("good", VMIG_TLS_ENDPOINT_SERVER, NULL), "qemu");
	assert_int_equal(handshake(&cli, &srv), -EACCES);
	assert_non_null(strstr(srv.err.msg, "'other' is not allowed by tls-authz"));
	/* TLS 1.3: the client finished first; it learns the refusal on its
	 * first read, as an alert. */
	assert_int_equal(cli.ret, 0);
	assert_int_equal(vmig__chan_read(cli.c, &byte, 1), -ECONNABORTED);
	assert_non_null(strstr(vmig__chan_strerror(cli.c, -ECONNABORTED), "denied"));
	peers_free(&cli, &srv);
}

/* A plain peer at a TLS server, and a TLS peer at a plain server. */
static void test_tls_and_plain_do_not_mix(void **state)
{
	struct peer cli = {0}, srv = {0};

	set_tls(&srv, psk("good", VMIG_TLS_ENDPOINT_SERVER, NULL), NULL);
	{ /* the client writes a plain preamble */
		struct vmig__uri u = {.kind = VMIG_URI_UNIX};
		struct vmig__err err = {{0}};
		struct vmig__chan *c;
		int lfd;

		snprintf(u.path, sizeof(u.path), "%s/sock", base);
		assert_int_equal(vmig__chan_listen(&u, &lfd, &err), 0);
		assert_int_equal(vmig__chan_connect(&u, NULL, -1, &c, &err), 0);
		assert_int_equal(vmig__chan_write(c, "VMIGSTRM\x02\0\0\0", 12), 0);
		assert_int_equal(serve(lfd, &srv), -EPROTONOSUPPORT);
		assert_non_null(strstr(srv.err.msg, "without TLS"));
		vmig__chan_free(c);
		vmig__chan_free(srv.c);
		srv.c = NULL;
		close(lfd);
	}
	vmig__tls_clear(&srv.tls);
	{ /* a TLS client, and a plain server that closes on what it cannot read */
		struct vmig__err err = {{0}};
		pthread_t t;
		int lfd;

		cli.u = (struct vmig__uri){.kind = VMIG_URI_UNIX};
		snprintf(cli.u.path, sizeof(cli.u.path), "%s/sock", base);
		assert_int_equal(vmig__chan_listen(&cli.u, &lfd, &err), 0);
		set_tls(&cli, psk("good", VMIG_TLS_ENDPOINT_CLIENT, NULL), NULL);
		assert_int_equal(pthread_create(&t, NULL, client_thread, &cli), 0);
		assert_int_equal(serve(lfd, &srv), 0); /* plain: nothing to shake */
		vmig__chan_free(srv.c);
		srv.c = NULL;
		pthread_join(t, NULL);
		close(lfd);
	}
	assert_true(cli.ret < 0);
	assert_non_null(strstr(cli.err.msg, "closed the connection during the handshake"));
	peers_free(&cli, &srv);
}

/* Credentials for the wrong side are refused when the migration starts. */
static void test_endpoint_checked(void **state)
{
	struct vmig__tls t = {0};
	struct vmig__err err = {{0}};

	assert_int_equal(
	    vmig__tls_set(&t, psk("good", VMIG_TLS_ENDPOINT_CLIENT, NULL), NULL, NULL, &err), 0);
	vmig_tls_creds_unref(t.creds); /* the one psk() made; t keeps its own */
	assert_int_equal(vmig__tls_check_endpoint(&t, VMIG_TLS_ENDPOINT_CLIENT, &err), 0);
	assert_int_equal(vmig__tls_check_endpoint(&t, VMIG_TLS_ENDPOINT_SERVER, &err), -EINVAL);
	assert_non_null(strstr(err.msg, "Expected TLS credentials for a server endpoint"));
	vmig__tls_clear(&t);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_creds_errors),
	    cmocka_unit_test(test_psk_roundtrip),
	    cmocka_unit_test(test_psk_mismatch),
	    cmocka_unit_test(test_authz_refuses_other_identity),
	    cmocka_unit_test(test_tls_and_plain_do_not_mix),
	    cmocka_unit_test(test_endpoint_checked),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
