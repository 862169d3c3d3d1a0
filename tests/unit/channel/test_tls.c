// SPDX-License-Identifier: MIT
/*
 * The channel layer with TLS, in one process: credentials that load or say
 * why not, handshakes between a client and a server over a real unix
 * socket (the server side driven without blocking, as the incoming side
 * does), data that crosses intact whatever the iovec shape, and every
 * refusal with its reason. PSK keys are made here; the x509 cases run end
 * to end in tests/integration/test_tls.py. A peer of bare GnuTLS plays the
 * part of a peer that does what vmig never does (TLS 1.3 KeyUpdate).
 */
#include <errno.h>
#include <fcntl.h>
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
#include <sys/un.h>
#include <unistd.h>

#include <cmocka.h>
#include <gnutls/gnutls.h>

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

/* ---- a peer of bare GnuTLS that asks for a KeyUpdate ------------------ */

#define KU_KEY "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

struct ku_peer {
	gnutls_session_t s;
	gnutls_psk_client_credentials_t cred;
	int fd;
	int ret;
	const uint8_t *out; /* what it writes, out_len bytes */
	size_t out_len;
	uint8_t *in; /* what it reads, in_len bytes */
	size_t in_len;
	size_t got;	  /* bytes read so far */
	size_t off;	  /* bytes written so far */
	unsigned sent;	  /* KeyUpdates sent so far */
	unsigned updates; /* KeyUpdates it sends, each asking for one back */
};

static void *ku_handshake(void *arg)
{
	struct ku_peer *k = arg;
	gnutls_datum_t key = {.data = (unsigned char *)KU_KEY, .size = sizeof(KU_KEY) - 1};

	k->ret = gnutls_psk_allocate_client_credentials(&k->cred);
	if (!k->ret)
		k->ret =
		    gnutls_psk_set_client_credentials(k->cred, "qemu", &key, GNUTLS_PSK_KEY_HEX);
	if (!k->ret)
		k->ret = gnutls_init(&k->s, GNUTLS_CLIENT);
	if (!k->ret)
		k->ret = gnutls_priority_set_direct(
		    k->s, "NORMAL:-VERS-ALL:+VERS-TLS1.3:-KX-ALL:+ECDHE-PSK", NULL);
	if (!k->ret)
		k->ret = gnutls_credentials_set(k->s, GNUTLS_CRD_PSK, k->cred);
	if (k->ret)
		return NULL;
	gnutls_transport_set_int(k->s, k->fd);
	do {
		k->ret = gnutls_handshake(k->s);
	} while (k->ret == GNUTLS_E_AGAIN || k->ret == GNUTLS_E_INTERRUPTED);
	return NULL;
}

/* The peer runs on one thread (GnuTLS 3.7 cannot change keys on one
 * thread while another reads or writes): a poll loop over a non-blocking
 * socket that reads all it is sent and writes out in records; after each
 * quarter, once vmig's writer is busy (some of its bytes arrived), it asks
 * for a KeyUpdate. A flood asks ten times at once and stops writing
 * (GnuTLS takes eight a second). Returns
 * 0 when everything went both ways, else the first GnuTLS error. */
static int ku_run(struct ku_peer *k, bool flood)
{
	size_t step = k->out_len / (k->updates + 1);
	bool updating = false, stopped = false, sending = false;

	fcntl(k->fd, F_SETFL, fcntl(k->fd, F_GETFL) | O_NONBLOCK);
	while (k->got < k->in_len || (k->off < k->out_len && !stopped)) {
		struct pollfd pfd = {.fd = k->fd, .events = POLLIN};
		/* an update is due here: no more writing until it went */
		bool due = k->sent < k->updates && k->off >= step * (flood ? 1 : k->sent + 1);
		bool can_write = k->off < k->out_len && !stopped && !updating && (!due || sending);
		ssize_t n;

		if (updating || (due && !sending && k->got >= k->in_len / 8)) {
			n = gnutls_session_key_update(k->s, GNUTLS_KU_PEER);
			updating = n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED;
			if (n < 0 && !updating)
				return (int)n;
			if (!updating)
				stopped = ++k->sent == k->updates && flood;
			continue;
		}
		if (can_write) { /* after GNUTLS_E_AGAIN, the same record again */
			n = gnutls_record_send(k->s, k->out + k->off,
					       VMIG_MIN(k->out_len - k->off, 16384));
			sending = n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED;
			if (n < 0 && !sending)
				return (int)n;
			if (!sending) {
				k->off += (size_t)n;
				continue;
			}
		}
		if (k->got >= k->in_len)
			pfd.events = 0;
		if (gnutls_record_check_pending(k->s) == 0) {
			if (can_write || updating)
				pfd.events |= POLLOUT;
			if (poll(&pfd, 1, 10000) != 1)
				return -ETIMEDOUT;
		}
		if (k->got >= k->in_len)
			continue;
		n = gnutls_record_recv(k->s, k->in + k->got, k->in_len - k->got);
		if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED)
			continue;
		if (n <= 0)
			return n ? (int)n : -EPIPE;
		k->got += (size_t)n;
	}
	return 0;
}

struct writer {
	struct vmig__chan *c;
	const uint8_t *data;
	size_t len;
	int ret;
};

/* Runs of 64 KiB, each a header and a page run as the RAM stream writes
 * them: four whole records per run. */
static void *writer_thread(void *arg)
{
	struct writer *w = arg;

	for (size_t off = 0; off < w->len && !w->ret;) {
		size_t run = VMIG_MIN(w->len - off, 64u << 10);
		struct iovec iov[2] = {{(void *)(w->data + off), 8},
				       {(void *)(w->data + off + 8), run - 8}};

		w->ret = vmig__chan_writev(w->c, iov, 2);
		off += run;
	}
	return NULL;
}

/* A peer asks for KeyUpdates while vmig reads on one thread and writes on
 * another. GnuTLS takes the request on the reading thread and sends its
 * answer from the writing thread, ahead of its next record: the gathered
 * records must keep their order around it, and both directions must
 * arrive whole, under new keys. vmig writes half its data while the
 * requests come, and the other half after they all arrived, so the answer
 * has records to go before. More than eight requests in a second are a
 * flood: the reader fails with a clear error and nothing hangs. */
static void key_update_case(unsigned updates, bool flood)
{
	struct peer srv = {0};
	struct vmig__uri u = {.kind = VMIG_URI_UNIX};
	struct vmig__err err = {{0}};
	size_t len = 16u << 20;
	uint8_t *a = malloc(len), *b = malloc(len), *ra = malloc(len), *rb = malloc(len);
	struct ku_peer k = {.out = a, .out_len = len, .in = rb, .in_len = len, .updates = updates};
	struct writer w = {.data = b, .len = len / 2};
	struct blob r = {.data = ra, .len = len};
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	gnutls_datum_t unused[3];
	unsigned char seq[8];
	pthread_t th, tr, tw;
	uint64_t records;
	int lfd;

	assert_true(a && b && ra && rb);
	for (size_t i = 0; i < len; i++) {
		a[i] = (uint8_t)(i * 131 + (i >> 12));
		b[i] = (uint8_t)(i * 37 + (i >> 13) + 1);
	}
	set_tls(&srv, psk("good", VMIG_TLS_ENDPOINT_SERVER, NULL), "qemu");
	snprintf(u.path, sizeof(u.path), "%s/sock", base);
	assert_int_equal(vmig__chan_listen(&u, &lfd, &err), 0);
	k.fd = socket(AF_UNIX, SOCK_STREAM, 0);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", u.path);
	assert_int_equal(connect(k.fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(pthread_create(&th, NULL, ku_handshake, &k), 0);
	assert_int_equal(serve(lfd, &srv), 0);
	pthread_join(th, NULL);
	assert_int_equal(k.ret, 0);
	close(lfd);

	assert_int_equal(vmig__chan_set_blocking(srv.c), 0);
	r.c = w.c = srv.c;
	assert_int_equal(pthread_create(&tr, NULL, reader_thread, &r), 0);
	assert_int_equal(pthread_create(&tw, NULL, writer_thread, &w), 0);
	k.in_len = len / 2; /* vmig's first half */
	k.ret = ku_run(&k, flood);
	pthread_join(tw, NULL);
	assert_int_equal(w.ret, 0);
	if (flood) {
		/* the second request ended it: vmig's reader says why */
		pthread_join(tr, NULL);
		assert_int_equal(k.ret, 0);
		assert_int_equal(r.ret, -ECONNABORTED);
		assert_non_null(strstr(vmig__chan_strerror(srv.c, r.ret), "TLS"));
		assert_memory_equal(rb, b, len / 2);
	} else {
		assert_int_equal(k.ret, 0);
		pthread_join(tr, NULL);
		assert_int_equal(r.ret, 0);
		assert_memory_equal(ra, a, len);
		w.data = b + len / 2;
		assert_int_equal(pthread_create(&tw, NULL, writer_thread, &w), 0);
		k.in_len = len;
		k.ret = ku_run(&k, false);
		pthread_join(tw, NULL);
		assert_int_equal(w.ret, 0);
		assert_int_equal(k.ret, 0);
		assert_memory_equal(rb, b, len);
		/* vmig answered: its records count from 0 again under a new key,
		 * so the peer's read sequence is below the records it took */
		assert_int_equal(
		    gnutls_record_get_state(k.s, 1, &unused[0], &unused[1], &unused[2], seq), 0);
		records = 0;
		for (int i = 0; i < 8; i++)
			records = records << 8 | seq[i];
		assert_true(records < len / 16384);
	}
	gnutls_deinit(k.s);
	gnutls_psk_free_client_credentials(k.cred);
	close(k.fd);
	vmig__chan_free(srv.c);
	vmig__tls_clear(&srv.tls);
	free(a);
	free(b);
	free(ra);
	free(rb);
}

static void test_peer_key_update(void **state)
{
	key_update_case(8, false);
}

static void test_peer_key_update_flood(void **state)
{
	key_update_case(10, true);
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
	    cmocka_unit_test(test_peer_key_update),
	    cmocka_unit_test(test_peer_key_update_flood),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
