// SPDX-License-Identifier: MIT
/*
 * The incoming side's door: accepting the connections of a migration.
 *
 * Anything can connect to the incoming port (a port scanner, a health
 * check, a peer of another version, an attacker), so nothing is trusted
 * before a connection has sent a whole, valid preamble, and no connection
 * can hold the door: connections wait in a small pending set, each read
 * without blocking as its bytes come, each with a deadline. A connection
 * that closes, sends garbage, stays silent past the deadline or is pushed
 * out of a full set is dropped and counted (query-migrate shows the count
 * and the last reason); the migration goes on waiting for its peer, until
 * it is cancelled.
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

	close(p->fd);
	reject(s, why);
	s->pending[i] = s->pending[--s->npending];
}

void vmig__close_pending(struct vmig_session *s)
{
	for (unsigned i = 0; i < s->npending; i++)
		close(s->pending[i].fd);
	s->npending = 0;
}

static int take_new(struct vmig_session *s, struct vmig__err *err)
{
	int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC);

	if (fd < 0) {
		if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED || errno == EPERM)
			return 0;
		vmig__err_set(err, "accept: %s", strerror(errno));
		return -errno;
	}
	if (s->npending == VMIG_MAX_PENDING) { /* full: the oldest goes */
		unsigned oldest = 0;

		for (unsigned i = 1; i < s->npending; i++)
			if (s->pending[i].since_ns < s->pending[oldest].since_ns)
				oldest = i;
		drop(s, oldest, "too many connections without a preamble");
	}
	vmig__chan_tune(fd);
	s->pending[s->npending++] = (struct vmig__pending){.fd = fd, .since_ns = vmig__now_ns()};
	return 0;
}

/*
 * Read what pending connection i has sent of its preamble (never more). 1
 * when it is whole and valid (l holds it; the connection leaves the set),
 * 0 to wait for more; a bad one is dropped (0).
 */
static int read_preamble(struct vmig_session *s, unsigned i, struct vmig__loader *l)
{
	struct vmig__pending *p = &s->pending[i];
	ssize_t n = recv(p->fd, p->buf + p->got, sizeof(p->buf) - p->got, MSG_DONTWAIT);
	struct vmig__err why = {{0}};
	struct vmig__reader *r = l->r;
	struct vmig__err *keep = l->err;
	int ret;

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	if (n <= 0) {
		drop(s, i, n ? "connection failed before its preamble"
			     : "connection closed before its preamble");
		return 0;
	}
	p->got += (uint8_t)n;
	if (p->got < sizeof(p->buf))
		return 0;
	vmig__reader_init_mem(r, p->buf, sizeof(p->buf));
	l->err = &why;
	ret = vmig__load_preamble(l);
	l->err = keep;
	if (ret) {
		drop(s, i, why.msg);
		return 0;
	}
	vmig__reader_init_fd(r, p->fd);
	r->bytes = sizeof(p->buf); /* offsets in messages count the preamble */
	s->pending[i] = s->pending[--s->npending];
	return 1;
}

/*
 * The next connection with a valid preamble: its fd in *fd, its preamble in
 * l (l->r reads the rest of it). -ECANCELED on cancel. watch_fd (or -1) is
 * the main connection while side connections are awaited: if the source
 * hangs up on it, they will never come (-EPIPE).
 */
static int next_conn(struct vmig_session *s, struct vmig__loader *l, int *fd, int watch_fd,
		     uint64_t deadline_ns, struct vmig__err *err)
{
	for (;;) {
		struct pollfd pfd[3 + VMIG_MAX_PENDING];
		uint64_t now = vmig__now_ns(), first = UINT64_MAX, wake;
		unsigned n = s->npending;
		int timeout_ms = -1;

		for (unsigned i = 0; i < s->npending;) {
			if (now - s->pending[i].since_ns >= PREAMBLE_TIMEOUT_NS) {
				drop(s, i, "no preamble within 10 s");
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
		if (deadline_ns && deadline_ns < wake)
			wake = deadline_ns;
		if (wake != UINT64_MAX)
			timeout_ms = (int)((wake - now) / 1000000 + 1);
		pfd[0] = (struct pollfd){.fd = s->listen_fd, .events = POLLIN};
		pfd[1] = (struct pollfd){.fd = s->cancel_efd, .events = POLLIN};
		for (unsigned i = 0; i < n; i++)
			pfd[2 + i] = (struct pollfd){.fd = s->pending[i].fd, .events = POLLIN};
		pfd[2 + n] = (struct pollfd){.fd = watch_fd, .events = POLLRDHUP};
		if (poll(pfd, 3 + n, timeout_ms) < 0) {
			if (errno == EINTR)
				continue;
			vmig__err_set(err, "waiting for a connection: %s", strerror(errno));
			return -errno;
		}
		if (pfd[1].revents)
			return -ECANCELED;
		if (pfd[2 + n].revents & (POLLRDHUP | POLLHUP | POLLERR)) {
			vmig__err_set(err, "the source closed the migration connection while its "
					   "other connections were awaited");
			return -EPIPE;
		}
		/* Back to front: dropping i moves the last entry into i. */
		for (unsigned i = n; i-- > 0;) {
			int fdi = s->pending[i].fd;

			if (pfd[2 + i].revents && read_preamble(s, i, l) == 1) {
				*fd = fdi;
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
void vmig__dest_keep_multifd(struct vmig_session *s, int fd, const struct vmig__loader *l)
{
	unsigned i = (l->pre_flags & VMIG_PRE_F_INDEX_MASK) >> VMIG_PRE_F_INDEX_SHIFT;

	pthread_mutex_lock(&s->lock);
	if (s->mf_fds[i] >= 0) /* an older one (a stray, or a retry): the newest wins */
		close(s->mf_fds[i]);
	s->mf_fds[i] = fd;
	s->mf_session[i] = l->session;
	if (s->mf_count < i + 1)
		s->mf_count = i + 1;
	pthread_mutex_unlock(&s->lock);
}

/* Keep an urgent channel that arrived; drop it if one is already kept. */
static void keep_urgent(struct vmig_session *s, int fd)
{
	pthread_mutex_lock(&s->lock);
	if (s->urgent_fd >= 0)
		close(s->urgent_fd);
	s->urgent_fd = fd;
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
	uint64_t urgent_session = 0;

	for (;;) {
		int fd, ret = next_conn(s, l, &fd, -1, 0, l->err);

		if (ret)
			return ret;
		if (!(l->pre_flags & VMIG_PRE_F_RESUME) != !resume ||
		    (resume && l->session != s->session_id)) {
			close(fd);
			reject(s, resume ? "not a resume of this migration"
					 : "a resume, but no migration to resume");
			continue;
		}
		if (l->channel == VMIG_CHAN_URGENT) {
			keep_urgent(s, fd);
			urgent_session = l->session;
			continue;
		}
		if (l->channel == VMIG_CHAN_MULTIFD) {
			if (resume)
				close(fd);
			else
				vmig__dest_keep_multifd(s, fd, l);
			continue;
		}
		pthread_mutex_lock(&s->lock);
		s->fd = fd;
		pthread_mutex_unlock(&s->lock);
		s->session_id = l->session;
		if (s->urgent_fd >= 0 && urgent_session != s->session_id)
			keep_urgent(s, -1); /* an urgent channel of someone else */
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
		int fd;

		ret = next_conn(s, &l, &fd, s->fd, deadline, err);
		if (ret)
			break;
		if (l.session == s->session_id && !(l.pre_flags & VMIG_PRE_F_RESUME) == !resume) {
			if (l.channel == VMIG_CHAN_URGENT) {
				keep_urgent(s, fd);
				continue;
			}
			if (l.channel == VMIG_CHAN_MULTIFD && !resume) {
				vmig__dest_keep_multifd(s, fd, &l);
				continue;
			}
		}
		close(fd);
		reject(s, "not a channel of this migration");
	}
	free(r);
	return ret;
}

static bool have_urgent(void *arg)
{
	struct vmig_session *s = arg;

	return s->urgent_fd >= 0;
}

/* The urgent channel, if it has not arrived with the main one. The source
 * connects it before it sends anything on the main channel, so by the time
 * it is needed it is here, on its way, or lost: the wait is short. */
int vmig__dest_accept_urgent(struct vmig_session *s, struct vmig__err *err)
{
	return vmig__dest_accept_side(s, have_urgent, s, 10000, err);
}
