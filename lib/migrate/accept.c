// SPDX-License-Identifier: MIT
/*
 * The incoming side's door: accepting the connections of a migration.
 *
 * Anything can connect to the incoming port (a port scanner, a health
 * check, a peer of another version, an attacker), so nothing is trusted
 * before a connection has passed TLS (with tls-creds: handshake, peer
 * certificate or key, tls-authz) and then sent a whole, valid preamble
 * carrying this migration's session id. No connection can hold the door:
 * connections wait in a small pending set, each handshaken and read
 * without blocking as its bytes come, each with a deadline. A connection
 * that fails TLS, closes, sends garbage, stays silent past the deadline or
 * is pushed out of a full set is dropped and counted (query-migrate shows
 * the count and the last reason); the migration goes on waiting for its
 * peer, until it is cancelled.
 *
 * Thread: the destination's migration thread only. The pending set lives
 * in the session so that connections that arrived early (an urgent channel
 * before the main one) survive between calls; close_pending() drops them
 * when the migration ends.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "migrate/migrate_int.h"

/* How long a connection may take to send its preamble. */
#define PREAMBLE_TIMEOUT_NS (10ull * 1000000000ull)
/* How long a refused TLS peer has to read the alert that says why. */
#define LINGER_NS (2ull * 1000000000ull)

static void reject(struct vmig_session *s, const char *why)
{
	pthread_mutex_lock(&s->lock);
	s->stats.rejected_connections++;
	snprintf(s->stats.last_rejection, sizeof(s->stats.last_rejection), "%s", why);
	pthread_mutex_unlock(&s->lock);
}

static void drop(struct vmig_session *s, unsigned i, const char *why)
{
	struct vmig__pending *p = &s->pending[i];

	vmig__chan_free(p->c);
	reject(s, why);
	s->pending[i] = s->pending[--s->npending];
}

/*
 * Refuse connection i after a failed TLS handshake: count it now, but keep
 * it a moment, half-closed, reading and dropping what the peer still sends.
 * Closing at once with its bytes unread would reset the connection, and
 * the reset could overtake the TLS alert that tells the peer why.
 */
static void refuse(struct vmig_session *s, unsigned i, const char *why)
{
	struct vmig__pending *p = &s->pending[i];

	reject(s, why);
	vmig__chan_shutdown(p->c, SHUT_WR);
	p->closing = true;
	p->since_ns = vmig__now_ns();
}

/* A refused connection: drain it; gone (1) at its end or after LINGER_NS. */
static int linger(struct vmig_session *s, unsigned i, uint64_t now)
{
	struct vmig__pending *p = &s->pending[i];
	uint8_t junk[4096];
	ssize_t n;

	while ((n = recv(vmig__chan_fd(p->c), junk, sizeof(junk), MSG_DONTWAIT)) > 0)
		;
	if ((n < 0 && errno == EAGAIN) && now - p->since_ns < LINGER_NS)
		return 0;
	vmig__chan_free(p->c);
	s->pending[i] = s->pending[--s->npending];
	return 1;
}

void vmig__close_pending(struct vmig_session *s)
{
	for (unsigned i = 0; i < s->npending; i++)
		vmig__chan_free(s->pending[i].c);
	s->npending = 0;
}

static int take_new(struct vmig_session *s, struct vmig__err *err)
{
	struct vmig__chan *c;
	int ret = vmig__chan_accept(s->listen_fd, &s->tls, &c);

	if (ret == -EAGAIN)
		return 0;
	if (ret == -ENOMEM || ret == -EMFILE || ret == -ENFILE) {
		reject(s, "out of resources for a new connection");
		return 0;
	}
	if (ret) {
		vmig__err_set(err, "accept: %s", strerror(-ret));
		return ret;
	}
	if (s->npending == VMIG_MAX_PENDING) { /* full: the oldest goes */
		unsigned oldest = 0;

		for (unsigned i = 1; i < s->npending; i++)
			if (s->pending[i].since_ns < s->pending[oldest].since_ns)
				oldest = i;
		drop(s, oldest, "too many connections without a preamble");
	}
	s->pending[s->npending++] = (struct vmig__pending){
	    .c = c, .trusted = !vmig__chan_is_tls(c), .since_ns = vmig__now_ns()};
	return 0;
}

/* A TLS ClientHello starts with a handshake record header: 0x16 0x03. */
static bool looks_like_tls(const uint8_t *b)
{
	return b[0] == 0x16 && b[1] == 0x03;
}

/*
 * Move pending connection i on: its TLS handshake, then its preamble
 * (never more). 1 when that is whole and valid (l holds it; the connection
 * leaves the set, now blocking), 0 to wait for more; a bad one is dropped
 * (0).
 */
static int read_preamble(struct vmig_session *s, unsigned i, struct vmig__loader *l)
{
	struct vmig__pending *p = &s->pending[i];
	struct vmig__err why = {{0}};
	struct vmig__reader *r = l->r;
	struct vmig__err *keep = l->err;
	int ret;

	if (!p->trusted) {
		ret = vmig__chan_handshake(p->c, &why);
		if (ret == -EAGAIN)
			return 0;
		if (ret == -EPROTONOSUPPORT) { /* say it in the peer's words */
			const char *msg = "this destination requires TLS (set tls-creds)";
			struct vmig_wire_rec rec = {.type = VMIG_RP_ERROR,
						    .len = (uint32_t)strlen(msg)};
			struct iovec iov[2] = {{&rec, sizeof(rec)}, {(void *)msg, rec.len}};

			vmig__chan_reply_plain(p->c, iov, 2);
		}
		if (ret) {
			refuse(s, i, why.msg);
			return 0;
		}
		p->trusted = true;
	}
	/* Until it would block: TLS may hold decrypted bytes that poll()
	 * cannot see. */
	while (p->got < sizeof(p->buf)) {
		ssize_t n = vmig__chan_recv_nb(p->c, p->buf + p->got, sizeof(p->buf) - p->got);

		if (n == -EAGAIN)
			return 0;
		if (n == -EPIPE) {
			drop(s, i, "connection closed before its preamble");
			return 0;
		}
		if (n < 0) {
			vmig__err_set(&why, "connection failed before its preamble: %s",
				      vmig__chan_strerror(p->c, (int)n));
			drop(s, i, why.msg);
			return 0;
		}
		p->got += (uint8_t)n;
	}
	if (!vmig__chan_is_tls(p->c) && looks_like_tls(p->buf)) {
		drop(s, i, "a TLS connection, but this side has no tls-creds");
		return 0;
	}
	vmig__reader_init_mem(r, p->buf, sizeof(p->buf));
	l->err = &why;
	ret = vmig__load_preamble(l);
	l->err = keep;
	if (!ret && vmig__chan_set_blocking(p->c)) {
		vmig__err_set(&why, "cannot make the connection blocking: %s", strerror(errno));
		ret = -errno;
	}
	if (ret) {
		drop(s, i, why.msg);
		return 0;
	}
	vmig__reader_init_chan(r, p->c);
	r->bytes = sizeof(p->buf); /* offsets in messages count the preamble */
	s->pending[i] = s->pending[--s->npending];
	return 1;
}

/*
 * The next connection with a valid preamble: its channel in *out, its
 * preamble in l (l->r reads the rest of it). -ECANCELED on cancel. watch
 * (or NULL) is the main connection while side connections are awaited: if
 * the source hangs up on it, they will never come (-EPIPE).
 */
static int next_conn(struct vmig_session *s, struct vmig__loader *l, struct vmig__chan **out,
		     struct vmig__chan *watch, uint64_t deadline_ns, struct vmig__err *err)
{
	for (;;) {
		struct pollfd pfd[4 + VMIG_MAX_PENDING];
		uint64_t now = vmig__now_ns(), first = UINT64_MAX, wake;
		unsigned n = s->npending;
		int timeout_ms = -1;

		for (unsigned i = 0; i < s->npending;) {
			if (s->pending[i].closing) {
				if (!linger(s, i, now))
					i++;
				continue;
			}
			if (now - s->pending[i].since_ns >= PREAMBLE_TIMEOUT_NS) {
				drop(s, i,
				     s->pending[i].trusted ? "no preamble within 10 s"
							   : "no TLS handshake within 10 s");
				continue;
			}
			if (s->pending[i].since_ns < first)
				first = s->pending[i].since_ns;
			i++;
		}
		n = s->npending;
		if (deadline_ns && now >= deadline_ns) {
			vmig__err_set(err, "the source's other connections did not arrive in time");
			return -ETIMEDOUT;
		}
		wake = first == UINT64_MAX ? UINT64_MAX : first + PREAMBLE_TIMEOUT_NS;
		for (unsigned i = 0; i < s->npending; i++)
			if (s->pending[i].closing && s->pending[i].since_ns + LINGER_NS < wake)
				wake = s->pending[i].since_ns + LINGER_NS;
		if (deadline_ns && deadline_ns < wake)
			wake = deadline_ns;
		if (wake != UINT64_MAX)
			timeout_ms = (int)((wake - now) / 1000000 + 1);
		pfd[0] = (struct pollfd){.fd = s->listen_fd, .events = POLLIN};
		pfd[1] = (struct pollfd){.fd = s->cancel_efd, .events = POLLIN};
		for (unsigned i = 0; i < n; i++) {
			struct vmig__pending *p = &s->pending[i];

			pfd[2 + i] = (struct pollfd){
			    .fd = vmig__chan_fd(p->c),
			    .events = p->trusted || p->closing ? POLLIN : vmig__chan_events(p->c)};
		}
		pfd[2 + n] =
		    (struct pollfd){.fd = watch ? vmig__chan_fd(watch) : -1, .events = POLLRDHUP};
		pfd[3 + n] = (struct pollfd){.fd = s->recover_efd, .events = POLLIN};
		if (poll(pfd, 4 + n, timeout_ms) < 0) {
			if (errno == EINTR)
				continue;
			vmig__err_set(err, "waiting for a connection: %s", strerror(errno));
			return -errno;
		}
		if (pfd[1].revents)
			return -ECANCELED;
		if (pfd[3 + n].revents) { /* a recovery that may be tried again */
			vmig__err_set(err, VMIG_PAUSED_MSG);
			return -EPIPE;
		}
		if (pfd[2 + n].revents & (POLLRDHUP | POLLHUP | POLLERR)) {
			vmig__err_set(err, "the source closed the migration connection while its "
					   "other connections were awaited");
			return -EPIPE;
		}
		/* Back to front: dropping i moves the last entry into i. */
		for (unsigned i = n; i-- > 0;) {
			struct vmig__chan *ci = s->pending[i].c;

			if (pfd[2 + i].revents && !s->pending[i].closing &&
			    read_preamble(s, i, l) == 1) {
				*out = ci;
				return 0;
			}
		}
		if (pfd[0].revents) {
			int ret = take_new(s, err);

			if (ret)
				return ret;
		}
	}
}

/* Keep a multifd data connection whose preamble l has read. */
void vmig__dest_keep_multifd(struct vmig_session *s, struct vmig__chan *c,
			     const struct vmig__loader *l)
{
	unsigned i = (l->pre_flags & VMIG_PRE_F_INDEX_MASK) >> VMIG_PRE_F_INDEX_SHIFT;

	pthread_mutex_lock(&s->lock);
	/* an older one (a retry): the newest wins */
	vmig__chan_free(s->mf_chans[i]);
	s->mf_chans[i] = c;
	s->mf_session[i] = l->session;
	if (s->mf_count < i + 1)
		s->mf_count = i + 1;
	pthread_mutex_unlock(&s->lock);
}

/* Keep an urgent channel that arrived; drop it if one is already kept. */
static void keep_urgent(struct vmig_session *s, struct vmig__chan *c)
{
	pthread_mutex_lock(&s->lock);
	vmig__chan_free(s->urgent);
	s->urgent = c;
	pthread_mutex_unlock(&s->lock);
}

/*
 * Accept connections until the main channel of this migration arrives; l
 * then holds its preamble and l->r reads the rest of it. An urgent or
 * multifd channel may arrive before it (connections can be reordered on the
 * way): they are kept. A new migration takes the first main channel that
 * does not resume; a resume (resume = true) must carry the session id of
 * this migration. Anything else is dropped and counted.
 */
int vmig__dest_accept(struct vmig_session *s, struct vmig__loader *l, bool resume)
{
	struct vmig_wire_sid urgent_session = {0};

	for (;;) {
		struct vmig__chan *c;
		int ret = next_conn(s, l, &c, NULL, 0, l->err);

		if (ret)
			return ret;
		if (!(l->pre_flags & VMIG_PRE_F_RESUME) != !resume ||
		    (resume && !vmig__sid_eq(l->session, s->session_id))) {
			vmig__chan_free(c);
			reject(s, resume ? "not a resume of this migration"
					 : "a resume, but no migration to resume");
			continue;
		}
		if (l->channel == VMIG_CHAN_URGENT) {
			keep_urgent(s, c);
			urgent_session = l->session;
			continue;
		}
		if (l->channel == VMIG_CHAN_MULTIFD) {
			vmig__dest_keep_multifd(s, c, l);
			continue;
		}
		/* Under rp_lock too: in a post-copy resume the fault thread
		 * sends page requests on it as soon as it is there. */
		pthread_mutex_lock(&s->lock);
		pthread_mutex_lock(&s->rp_lock);
		s->ch = c;
		pthread_mutex_unlock(&s->rp_lock);
		pthread_mutex_unlock(&s->lock);
		s->session_id = l->session;
		if (s->urgent && !vmig__sid_eq(urgent_session, s->session_id))
			keep_urgent(s, NULL); /* an urgent channel of someone else */
		return 0;
	}
}

/*
 * Accept the side connections of this migration (urgent, multifd) until
 * done(arg). Preambles are read exactly, so what follows them stays for the
 * channel's own reader. A connection of another session or of the wrong
 * kind is dropped.
 */
int vmig__dest_accept_side(struct vmig_session *s, bool (*done)(void *arg), void *arg,
			   unsigned timeout_ms, struct vmig__err *err)
{
	uint64_t deadline = vmig__now_ns() + (uint64_t)timeout_ms * 1000000ull;
	struct vmig__reader *r = malloc(sizeof(*r));
	bool resume = vmig__in_postcopy(s);
	int ret = 0;

	if (!r)
		return -ENOMEM;
	while (!ret && !done(arg)) {
		struct vmig__err scratch = {{0}};
		struct vmig__loader l = {.r = r, .err = &scratch};
		struct vmig__chan *c;

		ret = next_conn(s, &l, &c, s->ch, deadline, err);
		if (ret)
			break;
		if (vmig__sid_eq(l.session, s->session_id) &&
		    !(l.pre_flags & VMIG_PRE_F_RESUME) == !resume) {
			if (l.channel == VMIG_CHAN_URGENT) {
				keep_urgent(s, c);
				continue;
			}
			if (l.channel == VMIG_CHAN_MULTIFD) {
				vmig__dest_keep_multifd(s, c, &l);
				continue;
			}
		}
		vmig__chan_free(c);
		reject(s, "not a channel of this migration");
	}
	free(r);
	return ret;
}

static bool have_urgent(void *arg)
{
	struct vmig_session *s = arg;

	return s->urgent;
}

/* The urgent channel, if it has not arrived with the main one. The source
 * connects it before it sends anything on the main channel, so by the time
 * it is needed it is here, on its way, or lost: the wait is short. */
int vmig__dest_accept_urgent(struct vmig_session *s, struct vmig__err *err)
{
	return vmig__dest_accept_side(s, have_urgent, s, 10000, err);
}
