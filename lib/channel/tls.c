// SPDX-License-Identifier: MIT
/*
 * TLS for migration channels, with GnuTLS (as QEMU): credentials laid out
 * as QEMU's tls-creds-x509 and tls-creds-psk objects, TLS 1.3 only, and a
 * peer check on every connection.
 *
 * Who is let in. A client (the source) checks the server's certificate
 * chain, dates and name during the handshake (verify-peer=on). A server
 * (the destination) with verify-peer=on requires a client certificate
 * signed by its CA; with PSK, a peer without the key cannot finish the
 * handshake. Then, if tls-authz names an identity (the client
 * certificate's DN, or the PSK username), nobody else gets in. Only after
 * all of this does the engine read a byte of the peer's stream.
 *
 * I/O. The transport functions are ours: reads go through a 64 KiB buffer
 * (one recv() serves several records), writes use sendmsg(MSG_NOSIGNAL).
 * A writev is cut into whole 16 KiB records: large pieces (page runs) are
 * encrypted straight from guest memory, small ones (record headers) are
 * gathered first, so headers never cost a record each. The records of one
 * writev are gathered too, up to 256 KiB, and go out in one sendmsg(): a
 * system call per 16 KiB record cost more than the copy that gathering
 * takes (and a system call costs a lot more where the host is a guest).
 *
 * Threads: one reader and one writer at a time. GnuTLS 3.7 cannot take a
 * TLS 1.3 KeyUpdate on one thread while another encrypts or decrypts: the
 * new epoch copies the other direction's sequence number, so records went
 * out with a stale one (the peer fails to decrypt them, or worse, a nonce
 * repeats under the same key). A peer may ask for one at any time, and
 * GnuTLS rekeys by itself after 2^24 records. So once the handshake is
 * over every call into the session holds glock, a record at a time, and
 * none of them blocks: the reader's pull never waits for the socket (the
 * reader polls outside the lock), the writer's pushes go to pbuf, which it
 * sends outside the lock. rbuf and the read-side error belong to the
 * reader, wbuf and the write-side error to the writer; pbuf and the
 * sending side of the socket to whoever holds wlock.
 */
#include <errno.h>
#include <fcntl.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "channel/chan_int.h"

#define TLS_RBUF (64u << 10)
#define TLS_RECORD (16u << 10)
#define TLS_PBUF (256u << 10)
/* Room one locked send may add to pbuf: its record, a KeyUpdate before it
 * and their overhead. */
#define TLS_PBUF_ROOM (2 * TLS_RECORD + 1024)

/* TLS 1.3 only; its cipher suites are all AEAD, AES-GCM first (the CPUs
 * that move guests have AES instructions; ChaCha20 runs at a fraction of
 * that speed here). PSK key exchange only with (EC)DHE, never plain PSK:
 * a leaked key must not decrypt recorded migrations. */
#define PRIO_BASE                                                                              \
	"NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-256-GCM:+AES-128-GCM:+CHACHA20-POLY1305"
#define PRIO_X509 PRIO_BASE
#define PRIO_PSK PRIO_BASE ":-KX-ALL:+ECDHE-PSK:+DHE-PSK"

struct vmig_tls_creds {
	int refs; /* atomic */
	enum vmig_tls_endpoint endpoint;
	bool psk;
	bool verify_peer;
	gnutls_certificate_credentials_t x509;
	gnutls_psk_client_credentials_t psk_client;
	gnutls_psk_server_credentials_t psk_server;
	char dir[256];
};

/* A lock that serves in turn: a reader waiting for it gets it after the
 * writer's current record, however fast the writer comes back. */
struct turn_lock {
	pthread_mutex_t m;
	pthread_cond_t cv;
	unsigned next, serving; /* m */
};

static void turn_lock(struct turn_lock *l)
{
	unsigned me;

	pthread_mutex_lock(&l->m);
	me = l->next++;
	while (me != l->serving)
		pthread_cond_wait(&l->cv, &l->m);
	pthread_mutex_unlock(&l->m);
}

static void turn_unlock(struct turn_lock *l)
{
	pthread_mutex_lock(&l->m);
	l->serving++;
	if (l->next != l->serving)
		pthread_cond_broadcast(&l->cv);
	pthread_mutex_unlock(&l->m);
}

struct vmig__tls_conn {
	gnutls_session_t s;
	struct vmig_tls_creds *creds; /* a reference */
	bool server;
	bool done;	 /* handshake finished and peer accepted */
	struct turn_lock glock; /* every call into s once done */
	pthread_mutex_t wlock;	/* pbuf, plen, and sending on the socket */
	char host[256];	 /* client: the name the server's certificate must carry */
	char authz[512]; /* server: the one identity let in, or "" */
	/* reader thread (and the handshake) */
	uint8_t *rbuf;
	size_t rpos, rlen;
	bool got_bytes; /* something arrived: its first bytes are rbuf's */
	int rerrno;	/* errno of the last failed recv */
	char rmsg[128]; /* why the last read failed, if TLS's fault */
	/* writer thread */
	uint8_t *wbuf;
	size_t wlen;
	bool gather; /* the writer, in a gnutls_record_send under glock */
	/* wlock */
	uint8_t *pbuf; /* encrypted records waiting for one sendmsg() */
	size_t plen;
	int werrno; /* wlock */
	char wmsg[128];
};

/* ---- credentials ------------------------------------------------------ */

static void set_err(char *err, size_t errlen, const char *fmt, ...) VMIG_PRINTF(3, 4);
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

static int path_in(char *out, size_t len, const char *dir, const char *name)
{
	return snprintf(out, len, "%s/%s", dir, name) < (int)len ? 0 : -ENAMETOOLONG;
}

static bool exists(const char *dir, const char *name)
{
	char p[512];

	return !path_in(p, sizeof(p), dir, name) && !access(p, F_OK);
}

static int creds_alloc(struct vmig_tls_creds **out, const struct vmig_tls_creds_opts *o, char *err,
		       size_t errlen)
{
	struct vmig_tls_creds *c;
	struct stat st;

	if (!o || o->size < offsetof(struct vmig_tls_creds_opts, username) + sizeof(o->username)) {
		set_err(err, errlen, "TLS credentials: bad options");
		return -EINVAL;
	}
	if (o->endpoint != VMIG_TLS_ENDPOINT_CLIENT && o->endpoint != VMIG_TLS_ENDPOINT_SERVER) {
		set_err(err, errlen, "TLS credentials: endpoint must be 'server' or 'client'");
		return -EINVAL;
	}
	if (!o->dir || !o->dir[0]) {
		set_err(err, errlen, "TLS credentials: 'dir' is required");
		return -EINVAL;
	}
	if (strlen(o->dir) >= sizeof(c->dir)) {
		set_err(err, errlen, "TLS credentials: dir '%s' is too long", o->dir);
		return -ENAMETOOLONG;
	}
	if (stat(o->dir, &st) || !S_ISDIR(st.st_mode)) {
		set_err(err, errlen, "TLS credentials: cannot use dir '%s': %s", o->dir,
			errno && !S_ISDIR(st.st_mode) ? strerror(errno) : "not a directory");
		return -ENOENT;
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		set_err(err, errlen, "out of memory");
		return -ENOMEM;
	}
	c->refs = 1;
	c->endpoint = o->endpoint;
	c->verify_peer = o->verify_peer;
	strcpy(c->dir, o->dir);
	*out = c;
	return 0;
}

/*
 * As QEMU's sanity check of its own certificates: every certificate in
 * dir/name must be valid now. A peer would refuse it anyway, with a
 * vaguer message, and only once a migration is under way.
 */
static int check_dates(const char *dir, const char *name, char *err, size_t errlen)
{
	gnutls_datum_t data = {0};
	gnutls_x509_crt_t *crts = NULL;
	unsigned n = 0;
	time_t now = time(NULL);
	char p[512];
	int ret = 0;

	if (path_in(p, sizeof(p), dir, name) || gnutls_load_file(p, &data) < 0)
		return 0; /* not there (optional), or the loader says why */
	if (gnutls_x509_crt_list_import2(&crts, &n, &data, GNUTLS_X509_FMT_PEM, 0) < 0)
		n = 0;
	for (unsigned i = 0; i < n; i++) {
		if (!ret && gnutls_x509_crt_get_expiration_time(crts[i]) < now) {
			set_err(err, errlen, "TLS credentials: the certificate %s has expired", p);
			ret = -EKEYEXPIRED;
		} else if (!ret && gnutls_x509_crt_get_activation_time(crts[i]) > now) {
			set_err(err, errlen,
				"TLS credentials: the certificate %s is not yet active", p);
			ret = -EKEYEXPIRED;
		}
		gnutls_x509_crt_deinit(crts[i]);
	}
	gnutls_free(crts);
	gnutls_free(data.data);
	return ret;
}

/* Load dir/name into the x509 credentials with fn; a missing required
 * file or a bad one is an error naming it. */
static int load_pair(struct vmig_tls_creds *c, const char *cert, const char *key, bool required,
		     char *err, size_t errlen)
{
	char pc[512], pk[512];
	int ret;

	if (!exists(c->dir, cert) && !exists(c->dir, key) && !required)
		return 0;
	if (path_in(pc, sizeof(pc), c->dir, cert) || path_in(pk, sizeof(pk), c->dir, key))
		return -ENAMETOOLONG;
	ret = gnutls_certificate_set_x509_key_file(c->x509, pc, pk, GNUTLS_X509_FMT_PEM);
	if (ret < 0) {
		set_err(err, errlen, "TLS credentials: cannot load %s and %s: %s", pc, pk,
			gnutls_strerror(ret));
		return -EINVAL;
	}
	return check_dates(c->dir, cert, err, errlen);
}

VMIG_EXPORT int vmig_tls_creds_new_x509(vmig_tls_creds **out,
					const struct vmig_tls_creds_opts *opts, char *err,
					size_t errlen)
{
	bool server = opts && opts->endpoint == VMIG_TLS_ENDPOINT_SERVER;
	struct vmig_tls_creds *c;
	char p[512];
	int ret = creds_alloc(&c, opts, err, errlen);

	if (ret)
		return ret;
	if (gnutls_certificate_allocate_credentials(&c->x509) < 0) {
		set_err(err, errlen, "out of memory");
		ret = -ENOMEM;
		goto fail;
	}
	/* The CA: to check the peer, and always on a client (as QEMU). */
	if (c->verify_peer || !server || exists(c->dir, "ca-cert.pem")) {
		path_in(p, sizeof(p), c->dir, "ca-cert.pem");
		ret = gnutls_certificate_set_x509_trust_file(c->x509, p, GNUTLS_X509_FMT_PEM);
		if (ret <= 0) {
			set_err(err, errlen, "TLS credentials: cannot load CA certificate %s: %s",
				p, ret ? gnutls_strerror(ret) : "no certificate in it");
			ret = -EINVAL;
			goto fail;
		}
		ret = check_dates(c->dir, "ca-cert.pem", err, errlen);
		if (ret)
			goto fail;
	}
	if (exists(c->dir, "ca-crl.pem")) {
		path_in(p, sizeof(p), c->dir, "ca-crl.pem");
		ret = gnutls_certificate_set_x509_crl_file(c->x509, p, GNUTLS_X509_FMT_PEM);
		if (ret < 0) {
			set_err(err, errlen, "TLS credentials: cannot load %s: %s", p,
				gnutls_strerror(ret));
			ret = -EINVAL;
			goto fail;
		}
	}
	ret = server ? load_pair(c, "server-cert.pem", "server-key.pem", true, err, errlen)
		     : load_pair(c, "client-cert.pem", "client-key.pem", false, err, errlen);
	if (ret)
		goto fail;
	*out = c;
	return 0;
fail:
	vmig_tls_creds_unref(c);
	return ret;
}

/* Whether s is a username:hexkey line of keys.psk; the key goes to *key. */
static bool psk_line(char *s, const char **user, const char **key)
{
	char *colon = strchr(s, ':');
	size_t n;

	s[strcspn(s, "\r\n")] = '\0';
	if (!colon || colon == s)
		return false;
	*colon = '\0';
	*user = s;
	*key = colon + 1;
	n = strlen(*key);
	if (!n || n % 2)
		return false;
	return strspn(*key, "0123456789abcdefABCDEF") == n;
}

VMIG_EXPORT int vmig_tls_creds_new_psk(vmig_tls_creds **out, const struct vmig_tls_creds_opts *opts,
				       char *err, size_t errlen)
{
	const char *want = opts && opts->username && opts->username[0] ? opts->username : "qemu";
	bool server = opts && opts->endpoint == VMIG_TLS_ENDPOINT_SERVER;
	struct vmig_tls_creds *c;
	char p[512], line[1024];
	unsigned good = 0;
	bool found = false;
	FILE *f;
	int ret = creds_alloc(&c, opts, err, errlen);

	if (ret)
		return ret;
	c->psk = true;
	path_in(p, sizeof(p), c->dir, "keys.psk");
	f = fopen(p, "re");
	if (!f) {
		ret = -errno;
		set_err(err, errlen, "TLS credentials: cannot open %s: %s", p, strerror(errno));
		goto fail;
	}
	while (fgets(line, sizeof(line), f)) {
		const char *user, *key;

		if (!psk_line(line, &user, &key))
			continue;
		good++;
		if (server || strcmp(user, want))
			continue;
		found = true;
		if (gnutls_psk_allocate_client_credentials(&c->psk_client) < 0 ||
		    gnutls_psk_set_client_credentials(
			c->psk_client, user,
			&(gnutls_datum_t){.data = (unsigned char *)key,
					  .size = (unsigned)strlen(key)},
			GNUTLS_PSK_KEY_HEX) < 0) {
			set_err(err, errlen, "TLS credentials: cannot use the key of '%s' in %s",
				user, p);
			ret = -EINVAL;
			break;
		}
		break;
	}
	explicit_bzero(line, sizeof(line));
	fclose(f);
	if (ret)
		goto fail;
	if (!good) {
		set_err(err, errlen, "TLS credentials: %s has no 'username:hexkey' line", p);
		ret = -EINVAL;
		goto fail;
	}
	if (!server && !found) {
		set_err(err, errlen, "TLS credentials: %s has no key for username '%s'", p, want);
		ret = -ENOENT;
		goto fail;
	}
	if (server && (gnutls_psk_allocate_server_credentials(&c->psk_server) < 0 ||
		       gnutls_psk_set_server_credentials_file(c->psk_server, p) < 0)) {
		set_err(err, errlen, "TLS credentials: cannot use %s", p);
		ret = -EINVAL;
		goto fail;
	}
	*out = c;
	return 0;
fail:
	vmig_tls_creds_unref(c);
	return ret;
}

static struct vmig_tls_creds *creds_ref(struct vmig_tls_creds *c)
{
	if (c)
		__atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);
	return c;
}

VMIG_EXPORT void vmig_tls_creds_unref(vmig_tls_creds *c)
{
	if (!c || __atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL))
		return;
	if (c->x509)
		gnutls_certificate_free_credentials(c->x509);
	if (c->psk_client)
		gnutls_psk_free_client_credentials(c->psk_client);
	if (c->psk_server)
		gnutls_psk_free_server_credentials(c->psk_server);
	free(c);
}

int vmig__tls_set(struct vmig__tls *t, struct vmig_tls_creds *creds, const char *hostname,
		  const char *authz, struct vmig__err *err)
{
	if ((hostname && strlen(hostname) >= sizeof(t->hostname)) ||
	    (authz && strlen(authz) >= sizeof(t->authz))) {
		vmig__err_set(err, "tls-hostname or tls-authz identity too long");
		return -ENAMETOOLONG;
	}
	vmig__tls_clear(t);
	t->creds = creds_ref(creds);
	snprintf(t->hostname, sizeof(t->hostname), "%s", hostname ? hostname : "");
	snprintf(t->authz, sizeof(t->authz), "%s", authz ? authz : "");
	return 0;
}

void vmig__tls_clear(struct vmig__tls *t)
{
	vmig_tls_creds_unref(t->creds);
	memset(t, 0, sizeof(*t));
}

int vmig__tls_check_endpoint(const struct vmig__tls *t, enum vmig_tls_endpoint endpoint,
			     struct vmig__err *err)
{
	if (!t->creds || t->creds->endpoint == endpoint)
		return 0;
	vmig__err_set(err, "Expected TLS credentials for a %s endpoint (tls-creds is a %s's)",
		      endpoint == VMIG_TLS_ENDPOINT_SERVER ? "server" : "client",
		      endpoint == VMIG_TLS_ENDPOINT_SERVER ? "client" : "server");
	return -EINVAL;
}

/* ---- transport ------------------------------------------------------- */

static ssize_t pull(gnutls_transport_ptr_t p, void *buf, size_t n)
{
	struct vmig__chan *c = p;
	struct vmig__tls_conn *tc = c->tls;
	size_t take;

	if (tc->rpos == tc->rlen) {
		ssize_t got;

		do { /* under glock (done): the reader waits in poll, not here */
			got = recv(c->fd, tc->rbuf, TLS_RBUF, tc->done ? MSG_DONTWAIT : 0);
		} while (got < 0 && errno == EINTR);
		if (got < 0) {
			tc->rerrno = errno;
			gnutls_transport_set_errno(tc->s, errno);
			return -1;
		}
		if (!got)
			return 0;
		tc->rpos = 0;
		tc->rlen = (size_t)got;
		tc->got_bytes = true;
	}
	take = VMIG_MIN(n, tc->rlen - tc->rpos);
	memcpy(buf, tc->rbuf + tc->rpos, take);
	tc->rpos += take;
	return (ssize_t)take;
}

static int pull_timeout(gnutls_transport_ptr_t p, unsigned ms)
{
	struct vmig__chan *c = p;
	struct pollfd pfd = {.fd = c->fd, .events = POLLIN};

	if (c->tls->rpos < c->tls->rlen)
		return 1;
	return poll(&pfd, 1, ms == GNUTLS_INDEFINITE_TIMEOUT ? -1 : (int)ms);
}

static ssize_t vec_send(struct vmig__chan *c, const giovec_t *iov, int iovcnt)
{
	struct msghdr msg = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)iovcnt};
	ssize_t n;

	do {
		n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		c->tls->werrno = errno;
	return n;
}

/* Sends all of pbuf, under wlock (the socket is blocking once done). */
static int flush_pbuf(struct vmig__chan *c)
{
	struct vmig__tls_conn *tc = c->tls;
	size_t off = 0;

	while (off < tc->plen) {
		giovec_t v = {.iov_base = tc->pbuf + off, .iov_len = tc->plen - off};
		ssize_t n = vec_send(c, &v, 1);

		if (n < 0)
			return -1;
		off += (size_t)n;
	}
	tc->plen = 0;
	return 0;
}

/* The writer's own, outside glock: pbuf out if it has less than room
 * left (all of it for room TLS_PBUF). */
static int flush_for(struct vmig__chan *c, size_t room)
{
	struct vmig__tls_conn *tc = c->tls;
	int ret = 0;

	pthread_mutex_lock(&tc->wlock);
	if (tc->plen && tc->plen + room > TLS_PBUF)
		ret = flush_pbuf(c);
	pthread_mutex_unlock(&tc->wlock);
	return ret;
}

static ssize_t vec_push(gnutls_transport_ptr_t p, const giovec_t *iov, int iovcnt)
{
	struct vmig__chan *c = p;
	struct vmig__tls_conn *tc = c->tls;
	size_t total = 0;
	ssize_t ret;

	for (int i = 0; i < iovcnt; i++)
		total += iov[i].iov_len;
	pthread_mutex_lock(&tc->wlock);
	if (!tc->gather || tc->plen + total > TLS_PBUF) {
		/* Outside the writer's records (the handshake, an alert from the
		 * reader), or no room: what was gathered goes first, this at once. */
		ret = flush_pbuf(c) ? -1 : vec_send(c, iov, iovcnt);
		if (ret < 0) /* inside a GnuTLS call: it may be told */
			gnutls_transport_set_errno(tc->s, tc->werrno);
	} else {
		for (int i = 0; i < iovcnt; i++) {
			memcpy(tc->pbuf + tc->plen, iov[i].iov_base, iov[i].iov_len);
			tc->plen += iov[i].iov_len;
		}
		ret = (ssize_t)total;
	}
	pthread_mutex_unlock(&tc->wlock);
	return ret;
}

int vmig__tls_conn_new(struct vmig__chan *c, const struct vmig__tls *t, bool server,
		       const char *uri_host, struct vmig__err *err)
{
	struct vmig_tls_creds *cr = t->creds;
	struct vmig__tls_conn *tc = calloc(1, sizeof(*tc));
	const char *host = t->hostname[0] ? t->hostname : uri_host;
	int ret;

	if (!tc || !(tc->rbuf = malloc(TLS_RBUF)) || !(tc->wbuf = malloc(TLS_RECORD)) ||
	    !(tc->pbuf = malloc(TLS_PBUF))) {
		vmig__err_set(err, "out of memory for TLS");
		ret = -ENOMEM;
		goto fail_mem;
	}
	pthread_mutex_init(&tc->glock.m, NULL);
	pthread_cond_init(&tc->glock.cv, NULL);
	pthread_mutex_init(&tc->wlock, NULL);
	ret = gnutls_init(&tc->s, (server ? GNUTLS_SERVER : GNUTLS_CLIENT) | GNUTLS_NO_TICKETS);
	if (ret < 0) {
		vmig__err_set(err, "TLS: %s", gnutls_strerror(ret));
		goto fail_mem;
	}
	tc->creds = creds_ref(cr);
	tc->server = server;
	snprintf(tc->host, sizeof(tc->host), "%s", host ? host : "");
	snprintf(tc->authz, sizeof(tc->authz), "%s", t->authz);
	c->tls = tc;
	ret = gnutls_priority_set_direct(tc->s, cr->psk ? PRIO_PSK : PRIO_X509, NULL);
	if (ret >= 0 && cr->psk)
		ret = server ? gnutls_credentials_set(tc->s, GNUTLS_CRD_PSK, cr->psk_server)
			     : gnutls_credentials_set(tc->s, GNUTLS_CRD_PSK, cr->psk_client);
	else if (ret >= 0)
		ret = gnutls_credentials_set(tc->s, GNUTLS_CRD_CERTIFICATE, cr->x509);
	if (ret < 0) {
		vmig__err_set(err, "TLS: %s", gnutls_strerror(ret));
		goto fail;
	}
	if (!cr->psk && cr->verify_peer) {
		if (server)
			gnutls_certificate_server_set_request(tc->s, GNUTLS_CERT_REQUIRE);
		/* Chain, dates and (client) name, checked inside the handshake:
		 * a failure sends the peer the matching alert. */
		gnutls_session_set_verify_cert(tc->s, server || !host || !host[0] ? NULL : host, 0);
	}
	if (!server && !cr->psk && host && host[0])
		gnutls_server_name_set(tc->s, GNUTLS_NAME_DNS, host, strlen(host));
	gnutls_transport_set_ptr(tc->s, c);
	gnutls_transport_set_pull_function(tc->s, pull);
	gnutls_transport_set_pull_timeout_function(tc->s, pull_timeout);
	gnutls_transport_set_vec_push_function(tc->s, vec_push);
	gnutls_handshake_set_timeout(tc->s, 0); /* our own deadlines */
	return 0;
fail_mem:
	if (tc) {
		free(tc->rbuf);
		free(tc->wbuf);
		free(tc->pbuf);
		free(tc);
	}
	return -ENOMEM;
fail:
	c->tls = NULL;
	vmig__tls_conn_free(tc);
	return -EINVAL;
}

void vmig__tls_conn_free(struct vmig__tls_conn *tc)
{
	gnutls_deinit(tc->s);
	pthread_mutex_destroy(&tc->glock.m);
	pthread_cond_destroy(&tc->glock.cv);
	pthread_mutex_destroy(&tc->wlock);
	vmig_tls_creds_unref(tc->creds);
	free(tc->rbuf);
	free(tc->wbuf);
	free(tc->pbuf);
	free(tc);
}

/* ---- handshake and peer checks --------------------------------------- */

/* The peer's identity for tls-authz: its certificate's DN, or its PSK
 * username. */
static int peer_identity(struct vmig__tls_conn *tc, char *out, size_t len)
{
	const gnutls_datum_t *certs;
	gnutls_x509_crt_t crt;
	unsigned n = 0;
	size_t sz = len;
	int ret;

	if (tc->creds->psk) {
		const char *user = gnutls_psk_server_get_username(tc->s);

		if (!user)
			return -ENOENT;
		snprintf(out, len, "%s", user);
		return 0;
	}
	certs = gnutls_certificate_get_peers(tc->s, &n);
	if (!certs || !n || gnutls_x509_crt_init(&crt) < 0)
		return -ENOENT;
	ret = gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER);
	if (ret >= 0)
		ret = gnutls_x509_crt_get_dn(crt, out, &sz);
	gnutls_x509_crt_deinit(crt);
	return ret < 0 ? -EINVAL : 0;
}

/* A server whose peer opened with a plain vmig preamble. */
static bool plain_peer(const struct vmig__tls_conn *tc)
{
	return tc->server && tc->got_bytes && tc->rlen >= 4 && !memcmp(tc->rbuf, "VMIG", 4);
}

static const char *peer_name(const struct vmig__tls_conn *tc)
{
	return tc->server ? "source" : "destination";
}

/* Why the handshake failed, in words that point at the cause. */
static void describe(struct vmig__chan *c, int ret, struct vmig__err *err)
{
	struct vmig__tls_conn *tc = c->tls;
	const char *who = peer_name(tc);
	const char *hint = "";

	if (ret == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
		gnutls_datum_t txt = {0};
		unsigned st = gnutls_session_get_verify_cert_status(tc->s);

		gnutls_certificate_verification_status_print(st, GNUTLS_CRT_X509, &txt, 0);
		vmig__err_set(err, "TLS: the %s's certificate was refused: %s%s%s%s", who,
			      txt.data ? (char *)txt.data : "verification failed",
			      st & GNUTLS_CERT_UNEXPECTED_OWNER ? " (the hostname expected was '"
								: "",
			      st & GNUTLS_CERT_UNEXPECTED_OWNER ? tc->host : "",
			      st & GNUTLS_CERT_UNEXPECTED_OWNER ? "': see tls-hostname)" : "");
		gnutls_free(txt.data);
		return;
	}
	if (ret == GNUTLS_E_NO_CERTIFICATE_FOUND || ret == GNUTLS_E_CERTIFICATE_REQUIRED) {
		vmig__err_set(err, "TLS: the %s sent no certificate, and verify-peer is on here",
			      who);
		return;
	}
	if (ret == GNUTLS_E_FATAL_ALERT_RECEIVED) {
		gnutls_alert_description_t a = gnutls_alert_get(tc->s);

		if (tc->creds->psk &&
		    (a == GNUTLS_A_DECRYPT_ERROR || a == GNUTLS_A_BAD_RECORD_MAC ||
		     a == GNUTLS_A_ILLEGAL_PARAMETER || a == GNUTLS_A_UNKNOWN_PSK_IDENTITY))
			hint = " (do both sides have the same PSK username and key?)";
		else if (a == GNUTLS_A_CERTIFICATE_REQUIRED)
			hint = " (the destination verifies peers: give this side "
			       "client-cert.pem and client-key.pem)";
		vmig__err_set(err, "TLS: the %s refused the handshake: %s%s", who,
			      gnutls_alert_get_name(a), hint);
		return;
	}
	if (plain_peer(tc)) {
		vmig__err_set(err, "a connection without TLS, but this side requires TLS");
		return;
	}
	if (ret == GNUTLS_E_PREMATURE_TERMINATION || ret == GNUTLS_E_PULL_ERROR ||
	    ret == GNUTLS_E_PUSH_ERROR) {
		if (!tc->server)
			hint = " (does the destination use TLS, with matching credentials?)";
		vmig__err_set(err, "TLS: the %s closed the connection during the handshake%s", who,
			      hint);
		return;
	}
	if (tc->creds->psk) /* what else a PSK handshake can fail on */
		hint = " (do both sides have the same PSK username and key?)";
	vmig__err_set(err, "TLS handshake with the %s failed: %s%s", who, gnutls_strerror(ret),
		      hint);
}

/* The alert that names why the peer's certificate was refused. */
static gnutls_alert_description_t verify_alert(struct vmig__tls_conn *tc)
{
	unsigned st = gnutls_session_get_verify_cert_status(tc->s);

	if (st & GNUTLS_CERT_EXPIRED)
		return GNUTLS_A_CERTIFICATE_EXPIRED;
	if (st & (GNUTLS_CERT_SIGNER_NOT_FOUND | GNUTLS_CERT_SIGNER_NOT_CA))
		return GNUTLS_A_UNKNOWN_CA;
	if (st & GNUTLS_CERT_REVOKED)
		return GNUTLS_A_CERTIFICATE_REVOKED;
	return GNUTLS_A_BAD_CERTIFICATE;
}

/* After the handshake: the one identity tls-authz lets in. */
static int check_authz(struct vmig__chan *c, struct vmig__err *err)
{
	struct vmig__tls_conn *tc = c->tls;
	char id[512];

	if (!tc->server || !tc->authz[0])
		return 0;
	if (peer_identity(tc, id, sizeof(id))) {
		gnutls_alert_send(tc->s, GNUTLS_AL_FATAL, GNUTLS_A_ACCESS_DENIED);
		vmig__err_set(err, "TLS: the source has no identity for tls-authz%s",
			      tc->creds->psk ? "" : " (tls-authz needs verify-peer=on)");
		return -EACCES;
	}
	if (strcmp(id, tc->authz)) {
		gnutls_alert_send(tc->s, GNUTLS_AL_FATAL, GNUTLS_A_ACCESS_DENIED);
		vmig__err_set(err, "TLS: the source's identity '%s' is not allowed by tls-authz",
			      id);
		return -EACCES;
	}
	return 0;
}

int vmig__tls_handshake_step(struct vmig__chan *c, struct vmig__err *err)
{
	struct vmig__tls_conn *tc = c->tls;
	int ret;

	if (tc->done)
		return 0;
	ret = gnutls_handshake(tc->s);
	if (ret == GNUTLS_E_AGAIN || ret == GNUTLS_E_INTERRUPTED)
		return -EAGAIN;
	if (ret < 0) {
		describe(c, ret, err);
		if (plain_peer(tc)) /* it would not understand an alert */
			return -EPROTONOSUPPORT;
		/* Tell the peer why, unless it told us (or is gone). */
		if (ret == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR)
			gnutls_alert_send(tc->s, GNUTLS_AL_FATAL, verify_alert(tc));
		else if (ret != GNUTLS_E_FATAL_ALERT_RECEIVED &&
			 ret != GNUTLS_E_PREMATURE_TERMINATION)
			gnutls_alert_send_appropriate(tc->s, ret);
		return -ECONNABORTED;
	}
	ret = check_authz(c, err);
	if (ret)
		return ret;
	tc->done = true;
	return 0;
}

short vmig__tls_events(const struct vmig__chan *c)
{
	return gnutls_record_get_direction(c->tls->s) ? POLLOUT : POLLIN;
}

int vmig__tls_client_handshake(struct vmig__chan *c, int cancel_fd, uint64_t deadline_ns,
			       struct vmig__err *err)
{
	int flags = fcntl(c->fd, F_GETFL), ret;

	if (flags < 0 || fcntl(c->fd, F_SETFL, flags | O_NONBLOCK))
		return -errno;
	while ((ret = vmig__tls_handshake_step(c, err)) == -EAGAIN) {
		struct pollfd pfd[2] = {{.fd = c->fd, .events = vmig__tls_events(c)},
					{.fd = cancel_fd, .events = POLLIN}};
		uint64_t now = vmig__now_ns();

		if (now >= deadline_ns) {
			vmig__err_set(err, "TLS: no handshake with the destination within %d s",
				      VMIG_CONNECT_TIMEOUT_MS / 1000);
			return -ETIMEDOUT;
		}
		if (poll(pfd, cancel_fd >= 0 ? 2 : 1, (int)((deadline_ns - now) / 1000000 + 1)) >
			0 &&
		    cancel_fd >= 0 && pfd[1].revents) {
			vmig__err_set(err, "cancelled during the TLS handshake");
			return -ECANCELED;
		}
	}
	if (ret)
		return ret;
	return fcntl(c->fd, F_SETFL, flags) ? -errno : 0;
}

/* ---- records ---------------------------------------------------------- */

/* A GnuTLS failure as -errno: the socket's own error if it had one, else
 * -ECONNABORTED with the reason in msg for vmig__chan_strerror(). A record
 * that fails its check (tampering) ends the connection like a network
 * failure: nothing of it was used, and post-copy can recover. */
static int io_error(struct vmig__tls_conn *tc, int ret, int sock_errno, char *msg, size_t len)
{
	if ((ret == GNUTLS_E_PULL_ERROR || ret == GNUTLS_E_PUSH_ERROR) && sock_errno)
		return -sock_errno;
	if (ret == GNUTLS_E_PREMATURE_TERMINATION)
		return -EPIPE;
	if (ret == GNUTLS_E_FATAL_ALERT_RECEIVED)
		snprintf(msg, len, "the %s ended TLS: %s", peer_name(tc),
			 gnutls_alert_get_name(gnutls_alert_get(tc->s)));
	else
		snprintf(msg, len, "TLS: %s", gnutls_strerror(ret));
	return -ECONNABORTED;
}

ssize_t vmig__tls_read(struct vmig__chan *c, void *buf, size_t n)
{
	struct vmig__tls_conn *tc = c->tls;
	ssize_t got;

	for (;;) {
		turn_lock(&tc->glock);
		got = gnutls_record_recv(tc->s, buf, n);
		turn_unlock(&tc->glock);
		if (got > 0)
			return got;
		if (!got) /* close_notify */
			return -EPIPE;
		if (got == GNUTLS_E_INTERRUPTED)
			continue;
		if (got == GNUTLS_E_AGAIN && !c->nonblock) {
			struct pollfd pfd = {.fd = c->fd, .events = POLLIN};

			/* GnuTLS says so after a record that was not data (a
			 * KeyUpdate) too: wait only when rbuf is empty. A
			 * shutdown() of the socket wakes the poll. */
			if (tc->rpos == tc->rlen && poll(&pfd, 1, -1) < 0 && errno != EINTR)
				return -errno;
			continue;
		}
		if (got == GNUTLS_E_AGAIN)
			return -EAGAIN;
		return io_error(tc, (int)got, tc->rerrno, tc->rmsg, sizeof(tc->rmsg));
	}
}

/* The writer's failure: the socket's errno if sending failed. */
static int write_error(struct vmig__tls_conn *tc, int ret)
{
	int e;

	pthread_mutex_lock(&tc->wlock);
	e = tc->werrno;
	pthread_mutex_unlock(&tc->wlock);
	return io_error(tc, ret, e, tc->wmsg, sizeof(tc->wmsg));
}

static int push_error(struct vmig__tls_conn *tc)
{
	return write_error(tc, GNUTLS_E_PUSH_ERROR);
}

/* Send exactly n bytes as records, one at a time under glock. Gathered
 * ones go out, outside it, when pbuf has no room for another. */
static int send_all(struct vmig__chan *c, const uint8_t *p, size_t n, bool gather)
{
	struct vmig__tls_conn *tc = c->tls;

	while (n) {
		ssize_t put;

		if (gather && flush_for(c, TLS_PBUF_ROOM))
			return push_error(tc);
		turn_lock(&tc->glock);
		tc->gather = gather;
		put = gnutls_record_send(tc->s, p, VMIG_MIN(n, TLS_RECORD));
		tc->gather = false;
		turn_unlock(&tc->glock);

		if (put == GNUTLS_E_INTERRUPTED || put == GNUTLS_E_AGAIN) {
			/* the same data again, as GnuTLS asks */
			continue;
		}
		if (put < 0)
			return write_error(tc, (int)put);
		p += put;
		n -= (size_t)put;
	}
	return 0;
}

int vmig__tls_writev(struct vmig__chan *c, const struct iovec *iov, int iovcnt)
{
	struct vmig__tls_conn *tc = c->tls;
	int ret = 0;

	bool gather = !c->nonblock; /* a blocking socket: pbuf, then one sendmsg() */

	tc->wlen = 0;
	for (int i = 0; i < iovcnt && !ret; i++) {
		const uint8_t *p = iov[i].iov_base;
		size_t n = iov[i].iov_len;

		while (n && !ret) {
			size_t take;

			if (!tc->wlen && n >= TLS_RECORD) { /* whole records, no copy */
				take = n - n % TLS_RECORD;
				ret = send_all(c, p, take, gather);
			} else {
				take = VMIG_MIN(n, TLS_RECORD - tc->wlen);
				memcpy(tc->wbuf + tc->wlen, p, take);
				tc->wlen += take;
				if (tc->wlen == TLS_RECORD) {
					ret = send_all(c, tc->wbuf, tc->wlen, gather);
					tc->wlen = 0;
				}
			}
			p += take;
			n -= take;
		}
	}
	if (!ret && tc->wlen)
		ret = send_all(c, tc->wbuf, tc->wlen, gather);
	tc->wlen = 0;
	if (!ret && flush_for(c, TLS_PBUF))
		ret = push_error(tc);
	return ret;
}

bool vmig__tls_buffered(const struct vmig__chan *c)
{
	struct vmig__tls_conn *tc = c->tls;
	bool pending;

	turn_lock(&tc->glock);
	pending = gnutls_record_check_pending(tc->s) > 0;
	turn_unlock(&tc->glock);
	return pending || tc->rpos < tc->rlen;
}

/* The reading thread, after a failed read. */
const char *vmig__tls_strerror(const struct vmig__chan *c)
{
	return c->tls->rmsg[0] ? c->tls->rmsg : NULL;
}
