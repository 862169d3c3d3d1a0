// SPDX-License-Identifier: MIT
/*
 * Storage migration in mirror mode, the source (docs/storage-migration.md).
 *
 * The source. vmig_blk_mirror_start turns dirty tracking on with every
 * block dirty and starts a copier thread, which connects to the
 * destination and sends rounds: a round takes what is dirty when it
 * begins (the first round is the whole disk), sends it as DATA (or ZERO
 * where the block reads as zeros), ends with SYNC(k), and waits for ACK(k)
 * before the next. A return thread reads the ACKs. Taking a block clears
 * its bit before the block is read, and a guest write sets it after its
 * data landed (dirty.c), so a block written during its copy is taken again.
 * Until ACK(k), the blocks of round k are also kept in `unacked`: if the
 * connection fails they go back into the dirty bitmap, which stays on, and
 * a new vmig_blk_mirror_start resumes from it.
 *
 * The hand-over: once the guest can no longer write (every queue stopped,
 * which QEMU does when it stops the VM), vmig_blk_mirror_complete asks for
 * the last round: everything still dirty, FLUSH, SYNC, and after its ACK
 * EOS; the destination answers DONE once all of it is durable.
 *
 * The destination is incoming.c.
 *
 * Threads. The control thread creates, starts, queries, cancels and frees;
 * the copier and return threads run the stream. Fields say who owns them;
 * the mirror's mutex guards those marked `lock`.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "blk.h"
#include "channel/channel.h"
#include "mirror.h"
#include "mirror_int.h"
#include "sstream.h"

/* A round's takes go this many bytes at a time, so that a round's extents
 * fit the array. */
#define TAKE_BYTES (64ull << 20)
#define TAKE_EXTENTS 4096
/* An idle mirror (nothing dirty) looks again after this long. */
#define IDLE_MS 20
/* How long the last round may wait for the destination's DONE. */
#define DONE_TIMEOUT_MS 60000
/* How long guest writes may wait for an acknowledgement (write-blocking)
 * before they are let go, so that a stalled link does not hang the guest:
 * --write-blocking-stall-ms (opts.wb_stall_ms). */

/* ---- shared ---------------------------------------------------------- */

ssize_t vblk_chan_get(void *opaque, void *buf, size_t n)
{
	return vmig__chan_read(opaque, buf, n);
}

int vblk_chan_put(void *opaque, const void *buf, size_t n)
{
	return vmig__chan_write(opaque, buf, n);
}

static bool all_zero(const uint8_t *p, size_t n)
{
	static const uint8_t zero[64];

	if (n <= sizeof(zero))
		return !memcmp(p, zero, n);
	return !memcmp(p, zero, sizeof(zero)) && !memcmp(p, p + sizeof(zero), n - sizeof(zero));
}

void *vblk_ss_buf_alloc(void)
{
	void *p = NULL;

	/* aligned for O_DIRECT on any device */
	return posix_memalign(&p, 4096, VBLK_SS_MAX_DATA) ? NULL : p;
}

void vblk_fmt_err(char *err, size_t len, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, len, fmt, ap);
	va_end(ap);
}

/* ts = now (CLOCK_MONOTONIC, the clock of our condition variables) + ns. */
static void deadline_ns(struct timespec *ts, uint64_t ns)
{
	clock_gettime(CLOCK_MONOTONIC, ts);
	ts->tv_sec += (time_t)(ns / 1000000000u);
	ts->tv_nsec += (long)(ns % 1000000000u);
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

static void add_ms(struct timespec *ts, unsigned ms)
{
	deadline_ns(ts, (uint64_t)ms * 1000000u);
}

static void cond_init_mono(pthread_cond_t *cv)
{
	pthread_condattr_t a;

	pthread_condattr_init(&a);
	pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
	pthread_cond_init(cv, &a);
	pthread_condattr_destroy(&a);
}

/* ---- the post-copy state file (its layout: mirror_int.h) -------------- */

/* Where this disk's post-copy state file lives: --postcopy-state, or
 * next to an image file; "" for a block device without it, and for RAM. */
void vblk_pc_state_path(const struct vblk_daemon *dm, char *buf, size_t len)
{
	buf[0] = '\0';
	if (dm->opts.postcopy_state)
		snprintf(buf, len, "%s", dm->opts.postcopy_state);
	else if (dm->opts.file && dm->disk.backend == VBLK_BACKEND_FILE && !dm->disk.is_blkdev)
		snprintf(buf, len, "%s.vmig-postcopy", dm->opts.file);
}

/* Can a state file be made at path (its directory is writable)? */
bool vblk_pc_state_writable(const char *path)
{
	char dir[4096];
	char *slash;

	if (!path[0])
		return false;
	snprintf(dir, sizeof(dir), "%s", path);
	slash = strrchr(dir, '/');
	if (!slash)
		return !access(".", W_OK);
	if (slash == dir)
		slash[1] = '\0';
	else
		*slash = '\0';
	return !access(dir, W_OK);
}

/* ---- TLS -------------------------------------------------------------- */

/* "key=value" in a comma-separated list: the value, or NULL. */
static const char *opt_value(char *const *items, int n, const char *key)
{
	size_t k = strlen(key);

	for (int i = 1; i < n; i++)
		if (!strncmp(items[i], key, k) && items[i][k] == '=')
			return items[i] + k + 1;
	return NULL;
}

int vblk_storage_tls(struct vblk_daemon *dm, const char *spec, const char *hostname,
		     const char *authz, char *err, size_t errlen)
{
	static const char *const known[] = {"dir", "endpoint", "username", "verify-peer"};
	struct vmig_tls_creds_opts o = {.size = sizeof(o), .verify_peer = true};
	char copy[1024], *items[8], *save = NULL, *tok;
	const char *ep, *vp;
	struct vmig__err e = {{0}};
	vmig_tls_creds *creds = NULL;
	int n = 0, r;

	if (!spec)
		return 0;
	if (snprintf(copy, sizeof(copy), "%s", spec) >= (int)sizeof(copy)) {
		vblk_fmt_err(err, errlen, "--tls-creds: too long");
		return -EINVAL;
	}
	for (tok = strtok_r(copy, ",", &save); tok && n < 8; tok = strtok_r(NULL, ",", &save))
		items[n++] = tok;
	for (int i = 1; i < n; i++) {
		bool ok = false;

		for (size_t k = 0; k < VMIG_ARRAY_SIZE(known); k++)
			ok |= !strncmp(items[i], known[k], strlen(known[k])) &&
			      items[i][strlen(known[k])] == '=';
		if (!ok) {
			vblk_fmt_err(err, errlen, "--tls-creds: unknown setting '%s'", items[i]);
			return -EINVAL;
		}
	}
	ep = n ? opt_value(items, n, "endpoint") : NULL;
	vp = n ? opt_value(items, n, "verify-peer") : NULL;
	o.dir = n ? opt_value(items, n, "dir") : NULL;
	o.username = n ? opt_value(items, n, "username") : NULL;
	if (!n || (strcmp(items[0], "x509") && strcmp(items[0], "psk")) || !o.dir || !ep ||
	    (strcmp(ep, "client") && strcmp(ep, "server")) ||
	    (vp && strcmp(vp, "on") && strcmp(vp, "off"))) {
		vblk_fmt_err(err, errlen,
			     "--tls-creds wants x509|psk,dir=DIR,endpoint=client|server"
			     "[,username=U][,verify-peer=on|off]");
		return -EINVAL;
	}
	o.endpoint = strcmp(ep, "server") ? VMIG_TLS_ENDPOINT_CLIENT : VMIG_TLS_ENDPOINT_SERVER;
	o.verify_peer = !vp || !strcmp(vp, "on");
	if ((o.endpoint == VMIG_TLS_ENDPOINT_SERVER) != !!dm->opts.incoming) {
		vblk_fmt_err(
		    err, errlen,
		    "--tls-creds: a destination (--incoming) needs endpoint=server, a source "
		    "endpoint=client");
		return -EINVAL;
	}
	r = strcmp(items[0], "psk") ? vmig_tls_creds_new_x509(&creds, &o, err, errlen)
				    : vmig_tls_creds_new_psk(&creds, &o, err, errlen);
	if (r)
		return r;
	dm->tls = calloc(1, sizeof(*dm->tls));
	if (!dm->tls) {
		vmig_tls_creds_unref(creds);
		vblk_fmt_err(err, errlen, "out of memory");
		return -ENOMEM;
	}
	r = vmig__tls_set(dm->tls, creds, hostname, authz, &e);
	vmig_tls_creds_unref(creds); /* dm->tls holds its own */
	if (r)
		vblk_fmt_err(err, errlen, "--tls-creds: %s", e.msg);
	return r;
}

void vblk_storage_tls_free(struct vblk_daemon *dm)
{
	if (!dm->tls)
		return;
	vmig__tls_clear(dm->tls);
	free(dm->tls);
	dm->tls = NULL;
}

/* ---- the source ------------------------------------------------------ */

struct vblk_mirror {
	struct vblk_daemon *dm;
	struct vmig__uri uri;
	char uri_text[160];
	struct vblk_ss_geom geom;
	pthread_t copier, reader;
	bool copier_running; /* control thread */
	int cancel_fd;	     /* eventfd: ends a connect in progress */
	pthread_mutex_t lock;
	pthread_cond_t cv;
	/* lock */
	struct vmig__chan *chan; /* the copier sets it; freed after the copier ends */
	bool ready, completing, done;
	bool cancel; /* cancelled by the operator (sets stop too) */
	/* The end, in two steps. stop: every thread of the mirror ends now
	 * (m_fail, a complete copy, cancel). concluded: the copier has settled
	 * what it ends in (requeued blocks, a disk taken back) and is gone;
	 * only then does the query say "concluded". */
	bool stop, concluded;
	uint64_t acked;	 /* the last round the destination acknowledged */
	uint64_t speed;	 /* bytes/s, 0: none */
	char error[256]; /* stopped with an error */
	bool write_blocking; /* copy-mode "write-blocking" (the gate, blk.h) */
	bool synced;	     /* the gate is on and everything dirty before it was acked */
	/* Post-copy storage: the switch was asked for; it went out (or this
	 * mirror resumes a post-copy: then from its start); a resumed one got
	 * the destination's map. */
	bool postcopy_req, postcopy, map_done;
	/* A resumed post-copy the destination answered with NOT_SWITCHED
	 * (heard: the return thread), so it never served the disk, which is
	 * this host's again once the copier has taken it back (not_taken,
	 * kept by a mirror that resumes this one). */
	bool heard_not_switched, not_taken;
	/* atomics: the copier writes, the control thread reads */
	uint64_t offset;	/* bytes sent */
	uint64_t unacked_bytes; /* bytes sent in the round not yet acknowledged */
	uint64_t urgent_bytes;	/* post-copy: bytes sent because the destination asked */
	/* copier thread */
	bool gate_on;	    /* we turned disk.gate on (under lock, which turns it off) */
	uint64_t gate_from; /* the first round that began with the gate on */
	struct vblk_ss_writer w;
	struct vblk_dirty *unacked;
	/* Post-copy: granules the destination asked for (READ_REQ); the
	 * return thread marks, the copier takes first. */
	struct vblk_dirty *urgent;
	uint8_t *buf;
	struct vblk_extent *ext;
	struct vmig__ratelimit rl;
};

/* Under lock: writes wait for nothing any more; those held are returned
 * (their blocks stay dirty, for the last round or the next mirror). */
static void gate_off(struct vblk_mirror *m)
{
	m->gate_on = false;
	m->synced = false;
	if (__atomic_exchange_n(&m->dm->disk.gate.on, false, __ATOMIC_ACQ_REL))
		vblk_wake_queues(m->dm);
}

/* Under lock: wake every thread of the mirror, wherever it waits. */
static void m_wake(struct vblk_mirror *m)
{
	pthread_cond_broadcast(&m->cv);
	eventfd_write(m->dm->disk.gate.kick_fd, 1); /* an idle copier */
	if (m->stop) {
		gate_off(m);
		if (m->chan)
			vmig__chan_shutdown(m->chan, SHUT_RDWR);
		eventfd_write(m->cancel_fd, 1);
	}
}

/* End the mirror with an error (the first one is kept); wakes everyone. */
static void m_fail(struct vblk_mirror *m, const char *fmt, ...) VMIG_PRINTF(2, 3);
static void m_fail(struct vblk_mirror *m, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&m->lock);
	if (!m->stop) {
		va_start(ap, fmt);
		vsnprintf(m->error, sizeof(m->error), fmt, ap);
		va_end(ap);
		m->stop = true;
	}
	m_wake(m);
	pthread_mutex_unlock(&m->lock);
}

/* The return path: ACKs, and the destination's ERROR or DONE. */
static void *m_reader(void *arg)
{
	struct vblk_mirror *m = arg;
	struct vblk_dirty *d = m->dm->disk.dirty;
	struct vblk_ss_reader r;
	struct vblk_ss_rec rec;
	uint8_t *buf = vblk_ss_buf_alloc(); /* a resumed post-copy's map */

	vblk_ss_reader_init(&r, VBLK_SS_TO_SOURCE, vblk_chan_get, m->w.opaque, buf);
	vblk_ss_reader_set_geom(&r, &m->geom);
	for (;;) {
		int ret = vblk_ss_read_record(&r, &rec);
		bool postcopy;

		if (ret) {
			m_fail(m, "the connection to the destination failed: %s", r.err);
			break;
		}
		if (rec.type == VBLK_SS_READ_REQ) /* the copier sends them first */
			vblk_dirty_mark(m->urgent, rec.offset, rec.length);
		pthread_mutex_lock(&m->lock);
		postcopy = m->postcopy;
		if (rec.type == VBLK_SS_ACK)
			m->acked = rec.round;
		else if (rec.type == VBLK_SS_DONE)
			m->done = true;
		else if (rec.type == VBLK_SS_MAP_END)
			m->map_done = true;
		else if (rec.type == VBLK_SS_NOT_SWITCHED)
			m->heard_not_switched = true;
		pthread_cond_broadcast(&m->cv);
		pthread_mutex_unlock(&m->lock);
		if (rec.type == VBLK_SS_NOT_SWITCHED) {
			m_fail(m, "the destination never took the switch to post-copy (it never "
				  "served this disk): the disk is this host's again, and a new "
				  "mirror copies all of it");
			break;
		}
		if (rec.type == VBLK_SS_ERROR) {
			m_fail(m, "the destination gave up: %s", rec.text);
			break;
		}
		if (rec.type == VBLK_SS_READ_REQ && !postcopy) {
			m_fail(m, "the destination asked for blocks on demand before the switch to "
				  "post-copy");
			break;
		}
		if (rec.type == VBLK_SS_MISSING_MAP) /* what the copier pushes from */
			for (uint64_t i = 0; i < rec.length / 8; i++)
				__atomic_fetch_or(&d->words[rec.granule / 64 + i],
						  vblk_ss_map_word(&rec, i), __ATOMIC_RELEASE);
		if (rec.type == VBLK_SS_DONE)
			break;
	}
	free(buf);
	return NULL;
}

/*
 * How many bytes from off (at most len, whole blocks) are a hole of the
 * image file: nothing to read there, it reads as zeros. 0 where the file
 * system cannot say (a block device, no SEEK_DATA). Like a read, this may
 * race with a guest write; the write's dirty bit, set after it landed,
 * sends the block again.
 */
static uint64_t m_hole(struct vblk_disk *disk, uint64_t off, uint64_t len, uint64_t align)
{
	off_t d;

	if (disk->ram || disk->is_blkdev)
		return 0;
	d = lseek(disk->fd, (off_t)off, SEEK_DATA);
	if (d < 0)
		return errno == ENXIO ? len : 0; /* ENXIO: only a hole up to the end */
	if ((uint64_t)d >= off + len)
		return len;
	return ((uint64_t)d - off) / align * align;
}

/* How many bytes from off (at most len, in units of align) to read: up to
 * the next hole, if the file system says where it is. */
static uint64_t m_data(struct vblk_disk *disk, uint64_t off, uint64_t len, uint64_t align)
{
	off_t h;

	if (disk->ram || disk->is_blkdev)
		return len;
	h = lseek(disk->fd, (off_t)off, SEEK_HOLE);
	if (h < 0 || (uint64_t)h <= off || (uint64_t)h - off >= len)
		return len;
	return VMIG_MIN(len, ((uint64_t)h - off + align - 1) / align * align);
}

/*
 * Send [off, off + len) of the disk as DATA and ZERO records; holes of the
 * image go as ZERO without being read (and cost no rate-limit budget). In
 * post-copy every record covers whole granules (the extents are granules
 * already, and 1 MiB is a multiple of one). 0; 1: stopped for the switch
 * to post-copy, the rest unsent; -errno: failed (m_fail said why).
 */
/* Post-copy: wait until the background push may send again (speed), or
 * the destination asked for something, or the end; true if it asked. */
static bool m_push_wait(struct vblk_mirror *m)
{
	bool asked;

	pthread_mutex_lock(&m->lock);
	for (;;) {
		uint64_t now = vmig__now_ns();
		struct timespec until;

		asked = vblk_dirty_bytes(m->urgent) != 0;
		if (asked || !m->speed || m->rl.next_ns <= now || m->stop)
			break;
		deadline_ns(&until, m->rl.next_ns - now);
		pthread_cond_timedwait(&m->cv, &m->lock, &until);
	}
	pthread_mutex_unlock(&m->lock);
	return asked;
}

static int m_send_extent(struct vblk_mirror *m, uint64_t off, uint64_t len, bool urgent)
{
	struct vblk_disk *disk = &m->dm->disk;
	struct vblk_ss_writer *w = &m->w;
	uint64_t align = m->w.postcopy ? m->geom.granularity : disk->block_size;

	while (len) {
		uint32_t n = (uint32_t)VMIG_MIN(len, (uint64_t)VBLK_SS_MAX_DATA);
		uint64_t wait_ns, speed, hole = m_hole(disk, off, len, align);
		bool switching;
		const uint8_t *p = m->buf;
		int r;

		if (hole) {
			r = vblk_ss_put_zero(w, off, hole, true);
			if (r) {
				m_fail(m, "cannot send to the destination: %s", strerror(-r));
				return r;
			}
			__atomic_fetch_add(&m->offset, hole, __ATOMIC_RELAXED);
			off += hole;
			len -= hole;
			continue;
		}
		n = (uint32_t)m_data(disk, off, n, align);
		if (disk->ram) {
			p = disk->ram + off;
		} else {
			for (uint32_t got = 0; got < n;) {
				ssize_t k =
				    pread(disk->fd, m->buf + got, n - got, (off_t)(off + got));

				if (k < 0 && errno == EINTR)
					continue;
				if (k <= 0) {
					m_fail(m, "cannot read the disk at %llu: %s",
					       (unsigned long long)(off + got),
					       k < 0 ? strerror(errno) : "end of file");
					return -EIO;
				}
				got += (uint32_t)k;
			}
		}
		r = all_zero(p, n) ? vblk_ss_put_zero(w, off, n, false)
				   : vblk_ss_put_data(w, off, p, n);
		if (r) {
			m_fail(m, "cannot send to the destination: %s", strerror(-r));
			return r;
		}
		__atomic_fetch_add(&m->offset, n, __ATOMIC_RELAXED);
		pthread_mutex_lock(&m->lock);
		/* No limit once the guest is stopped, nor in write-blocking
		 * mode after the first pass: the guest waits for the rounds
		 * (and a mirror switched to it mid-round must get to the next
		 * round, where the gate goes on, at once). In post-copy what the
		 * destination asked for neither waits nor spends the budget,
		 * and the background push waits for its budget before each
		 * extent instead (m_push_wait), so that a request that comes
		 * meanwhile goes first and the push still keeps to the limit. */
		switching = m->postcopy_req && !m->postcopy;
		speed =
		    m->completing || switching || (m->write_blocking && m->ready) ? 0 : m->speed;
		wait_ns = urgent ? 0 : vmig__ratelimit_account(&m->rl, speed, n, vmig__now_ns());
		if (m->postcopy)
			wait_ns = 0;
		if (wait_ns) { /* ends at once when the limit no longer applies */
			struct timespec until;

			deadline_ns(&until, wait_ns);
			while (!m->completing && !m->stop && !(m->postcopy_req && !m->postcopy) &&
			       !(m->write_blocking && m->ready) &&
			       pthread_cond_timedwait(&m->cv, &m->lock, &until) != ETIMEDOUT)
				;
		}
		switching = m->postcopy_req && !m->postcopy;
		pthread_mutex_unlock(&m->lock);
		off += n;
		len -= n;
		if (switching && len)
			return 1;
	}
	return 0;
}

/* What is dirty now goes back in the bitmap: the round in flight failed. */
static void m_requeue(struct vblk_mirror *m)
{
	struct vblk_dirty *d = m->dm->disk.dirty, *u = m->unacked;

	if (d && u)
		for (uint64_t i = 0; i < u->nwords; i++)
			if (u->words[i])
				__atomic_fetch_or(&d->words[i], u->words[i], __ATOMIC_RELEASE);
}

/*
 * Wait for the destination to acknowledge round k (or DONE with done).
 * With the gate on, guest writes wait too: after --write-blocking-stall-ms
 * (opts.wb_stall_ms, 1 s by default) they are
 * let go (their blocks stay dirty) and the gate stays off until the next
 * round, so a stalled link stalls the guest's writes for a bounded time.
 */
static bool m_wait(struct vblk_mirror *m, uint64_t k, bool done)
{
	struct timespec until, stall;
	bool ok;

	add_ms(&until, DONE_TIMEOUT_MS);
	add_ms(&stall, m->dm->opts.wb_stall_ms);
	pthread_mutex_lock(&m->lock);
	while (!m->stop && (done ? !m->done : m->acked < k) && (done || !m->postcopy_req)) {
		bool gate = m->gate_on;

		if (pthread_cond_timedwait(&m->cv, &m->lock, gate ? &stall : &until) != ETIMEDOUT)
			continue;
		if (!gate)
			break;
		gate_off(m);
		vblk_log(m->dm,
			 "mirror: write-blocking: no acknowledgement in %u ms; guest writes "
			 "no longer wait for this round",
			 m->dm->opts.wb_stall_ms);
	}
	ok = !m->stop && (done ? m->done : m->acked >= k);
	pthread_mutex_unlock(&m->lock);
	return ok;
}

/*
 * The start of a round: turn the gate on if the mode asks for it and the
 * first pass is on the destination, or off if it no longer does; then
 * raise gate.begun, before any take (struct vblk_wgate). Returns the
 * round's number on the gate.
 */
static uint64_t gate_round_begins(struct vblk_mirror *m)
{
	struct vblk_wgate *g = &m->dm->disk.gate;
	uint64_t b;
	bool want;

	pthread_mutex_lock(&m->lock);
	want = m->write_blocking && m->ready && !m->completing && !m->stop;
	if (want && !m->gate_on) {
		m->gate_on = true;
		m->gate_from = __atomic_load_n(&g->begun, __ATOMIC_RELAXED) + 1;
		__atomic_store_n(&g->on, true, __ATOMIC_SEQ_CST);
		vblk_log(m->dm, "mirror: write-blocking: guest writes now wait for the "
				"destination");
	} else if (!want && m->gate_on) {
		gate_off(m);
	}
	pthread_mutex_unlock(&m->lock);
	b = __atomic_add_fetch(&g->begun, 1, __ATOMIC_SEQ_CST);
	__atomic_thread_fence(__ATOMIC_SEQ_CST); /* begun, then the takes */
	return b;
}

/* Every block taken up to gate round b is on the destination: the writes
 * held for it go back to the guest. */
static void gate_round_acked(struct vblk_mirror *m, uint64_t b)
{
	__atomic_store_n(&m->dm->disk.gate.acked, b, __ATOMIC_RELEASE);
	pthread_mutex_lock(&m->lock);
	if (m->gate_on) {
		m->synced |= b >= m->gate_from;
		vblk_wake_queues(m->dm);
	}
	pthread_mutex_unlock(&m->lock);
}

static bool m_switch_asked(struct vblk_mirror *m)
{
	bool r;

	pthread_mutex_lock(&m->lock);
	r = m->postcopy_req && !m->postcopy;
	pthread_mutex_unlock(&m->lock);
	return r;
}

/* One round: what is dirty as it begins (everything, with last). 0; 1:
 * stopped for the switch to post-copy (what it took and did not send is
 * dirty again, what it sent is in unacked); -errno: failed. */
static int m_round(struct vblk_mirror *m, uint64_t k, bool last, bool *sent)
{
	struct vblk_dirty *d = m->dm->disk.dirty;
	uint64_t gate_b = gate_round_begins(m);
	uint64_t budget = last ? UINT64_MAX : vblk_dirty_bytes(d);

	*sent = false;
	while (budget) {
		uint64_t bytes;
		size_t n =
		    vblk_dirty_take(d, VMIG_MIN(budget, TAKE_BYTES), m->ext, TAKE_EXTENTS, &bytes);

		if (!n)
			break;
		*sent = true;
		budget -= VMIG_MIN(budget, bytes);
		for (size_t i = 0; i < n; i++) {
			int r;

			vblk_dirty_mark(m->unacked, m->ext[i].offset, m->ext[i].length);
			__atomic_fetch_add(&m->unacked_bytes, m->ext[i].length, __ATOMIC_RELAXED);
			r = m_send_extent(m, m->ext[i].offset, m->ext[i].length, false);
			if (r < 0) { /* this one is in unacked; the rest were taken too */
				while (++i < n)
					vblk_dirty_mark(d, m->ext[i].offset, m->ext[i].length);
				return -EIO;
			}
			if (r > 0 || (i + 1 < n && m_switch_asked(m))) {
				while (++i < n) /* taken, not sent */
					vblk_dirty_mark(d, m->ext[i].offset, m->ext[i].length);
				return 1;
			}
		}
	}
	if (m_switch_asked(m))
		return 1;
	if (!*sent && !last) {
		/* Nothing dirty: every earlier round was acknowledged (they go
		 * one at a time), so whatever a held write marked is there. */
		gate_round_acked(m, gate_b);
		return 0;
	}
	if ((last && vblk_ss_put_flush(&m->w)) || vblk_ss_put_sync(&m->w, k, vblk_dirty_bytes(d))) {
		m_fail(m, "cannot send to the destination: %s", strerror(-m->w.error));
		return -EIO;
	}
	if (!m_wait(m, k, false)) {
		if (m_switch_asked(m)) /* the round's blocks stay in unacked */
			return 1;
		m_fail(m, "the destination did not acknowledge round %llu", (unsigned long long)k);
		return -EIO;
	}
	memset(m->unacked->words, 0, m->unacked->nwords * sizeof(uint64_t));
	__atomic_store_n(&m->unacked_bytes, 0, __ATOMIC_RELAXED);
	gate_round_acked(m, gate_b);
	return 0;
}

/*
 * Nothing was dirty: sleep until a queue holds a write (write-blocking),
 * something asks (m_wake), or IDLE_MS passed. A queue that holds a write
 * marked its blocks, then looks at idle; we set idle, then look at the
 * blocks: with a fence on each side, one of us sees the other.
 */
static void m_idle(struct vblk_mirror *m)
{
	struct vblk_wgate *g = &m->dm->disk.gate;
	struct pollfd pfd = {.fd = g->kick_fd, .events = POLLIN};
	eventfd_t v;
	bool stop;

	__atomic_store_n(&g->idle, true, __ATOMIC_SEQ_CST);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	pthread_mutex_lock(&m->lock);
	stop = m->completing || m->stop;
	pthread_mutex_unlock(&m->lock);
	if (!stop && !vblk_dirty_bytes(m->dm->disk.dirty))
		poll(&pfd, 1, IDLE_MS);
	__atomic_store_n(&g->idle, false, __ATOMIC_RELAXED);
	eventfd_read(g->kick_fd, &v); /* non-blocking: empty it */
}

/* The source's state file: the disk was handed over to this session. */
static int m_state_create(struct vblk_mirror *m)
{
	struct pc_state_hdr h = {.version = PC_STATE_VERSION,
				 .granularity = m->geom.granularity,
				 .disk_size = m->geom.disk_size};
	char path[4096];
	int fd, r = 0;

	vblk_pc_state_path(m->dm, path, sizeof(path));
	if (!path[0]) /* a RAM disk: it dies with the daemon anyway */
		return 0;
	memcpy(h.magic, PC_STATE_MAGIC_SRC, 8);
	memcpy(h.session, m->geom.session, sizeof(h.session));
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0 || pwrite(fd, &h, sizeof(h), 0) != (ssize_t)sizeof(h))
		r = errno ? -errno : -EIO;
	if (fd >= 0)
		close(fd);
	if (r)
		m_fail(m, "cannot write the post-copy state file %s: %s", path, strerror(-r));
	return r;
}

/*
 * The switch to post-copy storage, the guest stopped (every queue is):
 * what the destination may lack is what is dirty plus what went out in a
 * round it did not acknowledge. That set goes as MISSING, then POSTCOPY;
 * it is also what the copier pushes from now on (the dirty bitmap, which
 * nothing marks any more: no queue may start here again).
 */
static int m_switch(struct vblk_mirror *m)
{
	struct vblk_dirty *d = m->dm->disk.dirty, *u = m->unacked;
	const uint64_t chunk = VBLK_SS_MAX_DATA / 8;
	uint64_t *words = (uint64_t *)m->buf;

	/* Never two writers: fenced before the destination may serve, and
	 * for good (the state file fences a restarted daemon too). Without
	 * the file nothing went out and the guest may still resume here. */
	if (m_state_create(m))
		return -EIO;
	__atomic_store_n(&m->dm->disk.handed_over, true, __ATOMIC_RELEASE);
	m_requeue(m);
	memset(u->words, 0, u->nwords * sizeof(uint64_t));
	__atomic_store_n(&m->unacked_bytes, 0, __ATOMIC_RELAXED);
	for (uint64_t i = 0; i < d->nwords; i += chunk) {
		uint64_t n = VMIG_MIN(chunk, d->nwords - i), any = 0;

		for (uint64_t k = 0; k < n; k++)
			any |= words[k] = __atomic_load_n(&d->words[i + k], __ATOMIC_ACQUIRE);
		if (any)
			vblk_ss_put_missing(&m->w, i * 64, words, n);
	}
	pthread_mutex_lock(&m->lock);
	m->postcopy = true; /* before the destination can ask for anything */
	pthread_mutex_unlock(&m->lock);
	if (vblk_ss_put_postcopy(&m->w)) {
		m_fail(m, "cannot send to the destination: %s", strerror(-m->w.error));
		return -EIO;
	}
	vblk_log(m->dm,
		 "mirror: switched to post-copy: the destination serves the guest; %llu KiB "
		 "to send, what it asks for first",
		 (unsigned long long)vblk_dirty_bytes(d) >> 10);
	return 0;
}

/* Post-copy: send what the destination asks for first, then the rest, and
 * end with FLUSH, EOS and the destination's DONE. */
static int m_push(struct vblk_mirror *m)
{
	struct vblk_dirty *d = m->dm->disk.dirty;
	uint64_t t0 = vmig__now_ns();

	for (;;) {
		bool urgent = true, stop;
		uint64_t bytes;
		size_t n;

		pthread_mutex_lock(&m->lock);
		stop = m->stop;
		pthread_mutex_unlock(&m->lock);
		if (stop)
			return -ECANCELED;
		n = vblk_dirty_take(m->urgent, VBLK_SS_MAX_DATA, m->ext, TAKE_EXTENTS, &bytes);
		if (!n) {
			urgent = false;
			n = vblk_dirty_take(d, VBLK_SS_MAX_DATA, m->ext, TAKE_EXTENTS, &bytes);
		}
		if (!n)
			break;
		for (size_t i = 0; i < n; i++) {
			if (!urgent && m_push_wait(m)) {
				/* asked for meanwhile: that first, the rest later */
				for (; i < n; i++)
					vblk_dirty_mark(d, m->ext[i].offset, m->ext[i].length);
				break;
			}
			if (urgent) /* not again in the background */
				vblk_dirty_clear(d, m->ext[i].offset, m->ext[i].length);
			if (m_send_extent(m, m->ext[i].offset, m->ext[i].length, urgent)) {
				/* back where a resumed post-copy's map would have it */
				vblk_dirty_mark(d, m->ext[i].offset, m->ext[i].length);
				return -EIO;
			}
			if (urgent)
				__atomic_fetch_add(&m->urgent_bytes, m->ext[i].length,
						   __ATOMIC_RELAXED);
		}
	}
	if (vblk_ss_put_flush(&m->w) || vblk_ss_put_eos(&m->w) || !m_wait(m, 0, true)) {
		m_fail(m, "the destination did not confirm the end of the post-copy");
		return -EIO;
	}
	{
		char path[4096];

		vblk_pc_state_path(m->dm, path, sizeof(path));
		if (path[0])
			unlink(path); /* handed over and delivered: nothing to resume */
	}
	pthread_mutex_lock(&m->lock);
	m->stop = true;
	m_wake(m);
	pthread_mutex_unlock(&m->lock);
	vblk_log(m->dm, "mirror: post-copy complete in %.1f ms of pushing; %llu KiB sent on demand",
		 (double)(vmig__now_ns() - t0) / 1e6,
		 (unsigned long long)__atomic_load_n(&m->urgent_bytes, __ATOMIC_RELAXED) >> 10);
	return 0;
}

/*
 * Under lock, the copier: the switch went out but the destination never
 * took it (it was cut on the way, or refused), so it never served the disk
 * and says so (NOT_SWITCHED): the fence comes off and the state file goes.
 * Which blocks it has is unknown here (the bitmap was emptied for its
 * map), so every block is dirty: a mirror resumed from this one copies
 * the whole disk again.
 */
static void m_take_back(struct vblk_mirror *m)
{
	struct vblk_dirty *d = m->dm->disk.dirty;
	char path[4096];

	m->postcopy = m->postcopy_req = false;
	vblk_dirty_mark(d, 0, m->dm->disk.size);
	vblk_pc_state_path(m->dm, path, sizeof(path));
	if (path[0])
		unlink(path);
	__atomic_store_n(&m->dm->disk.handed_over, false, __ATOMIC_RELEASE);
	m->not_taken = true; /* the query says so only now: the guest may start */
	vblk_log(m->dm, "mirror: the destination never took the switch to post-copy: the disk "
			"is served here again");
}

/* A resumed post-copy: the destination's map replaces what we would push
 * (its MISSING_MAP records land in the emptied bitmap); wait for its end. */
static bool m_wait_map(struct vblk_mirror *m)
{
	struct timespec until;
	bool ok;

	add_ms(&until, DONE_TIMEOUT_MS);
	pthread_mutex_lock(&m->lock);
	while (!m->map_done && !m->stop &&
	       pthread_cond_timedwait(&m->cv, &m->lock, &until) != ETIMEDOUT)
		;
	ok = m->map_done && !m->stop;
	pthread_mutex_unlock(&m->lock);
	if (!ok)
		m_fail(m, "the destination did not say what it still lacks");
	return ok;
}

static void m_copy(struct vblk_mirror *m)
{
	struct vmig__tls none = {0};
	struct vmig__err err = {{0}};
	struct vmig__chan *c;
	bool reader = false;
	uint64_t k = 0, t_last, sent_before;
	int r;

	r = vmig__chan_connect(&m->uri, m->dm->tls ? m->dm->tls : &none, m->cancel_fd, &c, &err);
	if (r) {
		m_fail(m, "cannot connect to %s: %s", m->uri_text, err.msg);
		return;
	}
	pthread_mutex_lock(&m->lock);
	m->chan = c;
	if (m->stop) /* cancelled meanwhile */
		vmig__chan_shutdown(c, SHUT_RDWR);
	pthread_mutex_unlock(&m->lock);
	vblk_ss_writer_init(&m->w, vblk_chan_put, c, &m->geom);
	if (vblk_ss_put_preamble(&m->w)) {
		m_fail(m, "cannot send to the destination: %s", strerror(-m->w.error));
		goto out;
	}
	if (m->w.postcopy) { /* a resumed post-copy: the destination's map */
		struct vblk_dirty *d = m->dm->disk.dirty;

		for (uint64_t i = 0; i < d->nwords; i++)
			__atomic_store_n(&d->words[i], 0, __ATOMIC_RELAXED);
	}
	if (pthread_create(&m->reader, NULL, m_reader, m)) {
		m_fail(m, "cannot start the return path's thread");
		goto out;
	}
	reader = true;
	if (m->w.postcopy) {
		vblk_log(m->dm, "mirror: resuming the post-copy to %s", m->uri_text);
		if (m_wait_map(m))
			m_push(m);
		goto out;
	}
	vblk_log(m->dm, "mirror: copying to %s", m->uri_text);
	for (;;) {
		bool last, stop, sent;

		pthread_mutex_lock(&m->lock);
		last = m->completing;
		stop = m->stop;
		pthread_mutex_unlock(&m->lock);
		if (stop)
			break;
		if (m_switch_asked(m)) {
			if (!m_switch(m))
				m_push(m);
			break;
		}
		t_last = vmig__now_ns();
		sent_before = __atomic_load_n(&m->offset, __ATOMIC_RELAXED);
		r = m_round(m, k + 1, last, &sent);
		if (r > 0)
			continue; /* the switch, at the top */
		if (r)
			break;
		if (sent || last)
			k++;
		pthread_mutex_lock(&m->lock);
		if (!m->ready) /* every block is on the destination at least once */
			vblk_log(m->dm, "mirror: the first pass is on the destination (ready)");
		m->ready = true;
		pthread_mutex_unlock(&m->lock);
		if (last) {
			if (vblk_ss_put_eos(&m->w) || !m_wait(m, 0, true)) {
				m_fail(m, "the destination did not confirm the end of the copy");
				break;
			}
			pthread_mutex_lock(&m->lock);
			m->stop = true;
			m_wake(m);
			pthread_mutex_unlock(&m->lock);
			vblk_log(
			    m->dm,
			    "mirror: complete, %llu rounds; the last one sent %llu KiB in "
			    "%.1f ms, the destination's sync included",
			    (unsigned long long)k,
			    (unsigned long long)(__atomic_load_n(&m->offset, __ATOMIC_RELAXED) -
						 sent_before) >>
				10,
			    (double)(vmig__now_ns() - t_last) / 1e6);
			break;
		}
		if (!sent)
			m_idle(m);
	}
out:
	pthread_mutex_lock(&m->lock);
	if (m->error[0] || m->cancel)
		m_requeue(m);
	if (m->error[0] && m->postcopy_req && !m->postcopy) { /* the switch never went out */
		m->postcopy_req = false;
		__atomic_store_n(&m->dm->disk.handed_over, false, __ATOMIC_RELEASE);
		vblk_log(m->dm, "mirror: the switch to post-copy did not go out; the disk stays "
				"here");
	}
	if (m->heard_not_switched)
		m_take_back(m);
	pthread_mutex_unlock(&m->lock);
	vmig__chan_shutdown(c, SHUT_RDWR);
	if (reader)
		pthread_join(m->reader, NULL);
}

static void *m_copier(void *arg)
{
	struct vblk_mirror *m = arg;

	m_copy(m);
	pthread_mutex_lock(&m->lock);
	if (!m->stop) /* a bug: never let it pass for a complete copy */
		snprintf(m->error, sizeof(m->error), "the copier ended unexpectedly");
	m->stop = m->concluded = true;
	m_wake(m);
	pthread_mutex_unlock(&m->lock);
	return NULL;
}

/* Control thread: wait for the copier (it ends by itself once stopped). */
static void m_join(struct vblk_mirror *m)
{
	if (!m->copier_running)
		return;
	pthread_join(m->copier, NULL);
	m->copier_running = false;
	pthread_mutex_lock(&m->lock);
	vmig__chan_free(m->chan);
	m->chan = NULL;
	pthread_mutex_unlock(&m->lock);
}

static void m_free(struct vblk_mirror *m)
{
	if (!m)
		return;
	m_join(m);
	vblk_dirty_free(m->unacked);
	vblk_dirty_free(m->urgent);
	free(m->buf);
	free(m->ext);
	if (m->cancel_fd >= 0)
		close(m->cancel_fd);
	pthread_mutex_destroy(&m->lock);
	pthread_cond_destroy(&m->cv);
	free(m);
}

bool vblk_mirror_active(const struct vblk_daemon *dm)
{
	struct vblk_mirror *m = dm->mirror;
	bool active;

	if (!m)
		return false;
	pthread_mutex_lock(&m->lock);
	/* a failed one keeps the bitmap for the next */
	active = (!m->stop || m->error[0]) && !m->cancel;
	pthread_mutex_unlock(&m->lock);
	return active;
}

bool vblk_postcopy_capable(const struct vblk_daemon *dm)
{
	char path[4096];

	vblk_pc_state_path(dm, path, sizeof(path));
	return vblk_pc_state_writable(path) || dm->disk.ram;
}

/* A source restarted after it handed its disk over: fenced, with a failed
 * post-copy mirror for vblk_mirror_start to resume (the destination's map
 * refills the empty bitmap). */
static int m_restore(struct vblk_daemon *dm, const struct pc_state_hdr *h, const char *path,
		     char *err, size_t len)
{
	struct vblk_mirror *m;
	int r;

	__atomic_store_n(&dm->disk.handed_over, true, __ATOMIC_RELEASE);
	r = vblk_dirty_start(dm, h->granularity, false);
	m = r ? NULL : calloc(1, sizeof(*m));
	if (!m) {
		vblk_fmt_err(err, len, "cannot resume the post-copy of %s: %s", path,
			     strerror(r ? -r : ENOMEM));
		return r ? r : -ENOMEM;
	}
	pthread_mutex_init(&m->lock, NULL);
	cond_init_mono(&m->cv);
	m->dm = dm;
	m->cancel_fd = -1;
	m->stop = m->concluded = true; /* no copier until it is resumed */
	m->postcopy = m->postcopy_req = true;
	m->geom = (struct vblk_ss_geom){.disk_size = dm->disk.size,
					.block_size = dm->disk.block_size,
					.granularity = h->granularity};
	memcpy(m->geom.session, h->session, sizeof(m->geom.session));
	snprintf(m->error, sizeof(m->error),
		 "the daemon restarted during a post-copy: the disk is the destination's; "
		 "resume with vmig_blk_mirror_start");
	dm->mirror = m;
	vblk_log(dm,
		 "the disk was handed over by a post-copy (%s): serving the destination "
		 "only, never the guest; vmig_blk_mirror_start resumes the post-copy",
		 path);
	return 0;
}

int vblk_postcopy_state_check(struct vblk_daemon *dm, char *err, size_t len)
{
	struct vblk_ss_geom g = {.disk_size = dm->disk.size, .block_size = dm->disk.block_size};
	struct pc_state_hdr h;
	char path[4096];
	ssize_t n;
	int fd;

	vblk_pc_state_path(dm, path, sizeof(path));
	if (!path[0])
		return 0;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 && errno == ENOENT)
		return 0;
	if (fd < 0) {
		vblk_fmt_err(err, len, "%s: %s", path, strerror(errno));
		return -errno;
	}
	n = pread(fd, &h, sizeof(h), 0);
	close(fd);
	if (n == (ssize_t)sizeof(h) && !memcmp(h.magic, PC_STATE_MAGIC, 8)) {
		if (dm->opts.incoming)
			return 0; /* vblk_incoming_start checks and resumes it */
		vblk_fmt_err(err, len,
			     "%s exists: this image is in the middle of a post-copy storage "
			     "migration and is not whole; only vmig-blk --incoming can finish it",
			     path);
		return -EBUSY;
	}
	memset(&g.session, 0, sizeof(g.session));
	if (n == (ssize_t)sizeof(h)) {
		g.granularity = h.granularity;
		memcpy(g.session, h.session, sizeof(g.session));
	}
	if (n != (ssize_t)sizeof(h) || memcmp(h.magic, PC_STATE_MAGIC_SRC, 8) ||
	    h.version != PC_STATE_VERSION || h.disk_size != dm->disk.size || !vblk_ss_geom_ok(&g) ||
	    h.granularity > VBLK_SS_MAX_DATA) {
		vblk_fmt_err(err, len,
			     "%s is not a post-copy state file of this disk: remove it only if no "
			     "post-copy storage migration of this image is in progress",
			     path);
		return -EINVAL;
	}
	if (dm->opts.incoming) {
		vblk_fmt_err(
		    err, len,
		    "%s says this image was handed over to another host by a post-copy: it "
		    "cannot receive a disk",
		    path);
		return -EBUSY;
	}
	return m_restore(dm, &h, path, err, len);
}

int vblk_mirror_start(struct vblk_daemon *dm, const char *uri, uint32_t granularity, uint64_t speed,
		      bool write_blocking, char *err, size_t errlen)
{
	struct vblk_mirror *m, *old = dm->mirror;
	struct vmig__err e = {{0}};
	bool resume = false, postcopy = false, not_taken = false;
	int r;

	if (old) {
		pthread_mutex_lock(&old->lock);
		r = old->stop ? 0 : -EBUSY;
		pthread_mutex_unlock(&old->lock);
		if (r) {
			vblk_fmt_err(err, errlen, "a mirror is already running (to %s)",
				     old->uri_text);
			return r;
		}
		/* Concluded, but its copier may still be settling what it ends
		 * in (requeued blocks, a disk taken back): decide after it. */
		m_join(old);
		pthread_mutex_lock(&old->lock);
		resume = old->error[0] && !old->cancel;
		postcopy = resume && old->postcopy; /* it goes on in post-copy */
		not_taken = old->not_taken;
		pthread_mutex_unlock(&old->lock);
	}
	if (dm->disk.backend == VBLK_BACKEND_NULL) {
		vblk_fmt_err(err, errlen, "a null disk has nothing to copy");
		return -EINVAL;
	}
	if (dm->disk.dirty && !resume) {
		vblk_fmt_err(err, errlen,
			     "dirty tracking is on for another user (dirty_bitmap_stop first)");
		return -EBUSY;
	}
	if (resume && granularity && granularity != dm->disk.dirty->granularity) {
		vblk_fmt_err(err, errlen,
			     "a resumed mirror keeps the granularity of the one that failed (%u)",
			     dm->disk.dirty->granularity);
		return -EINVAL;
	}
	m = calloc(1, sizeof(*m));
	if (!m) {
		vblk_fmt_err(err, errlen, "out of memory");
		return -ENOMEM;
	}
	pthread_mutex_init(&m->lock, NULL);
	cond_init_mono(&m->cv);
	m->dm = dm;
	m->cancel_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (m->cancel_fd < 0) {
		vblk_fmt_err(err, errlen, "eventfd: %s", strerror(errno));
		r = -errno;
		goto fail;
	}
	if (!dm->disk.gate.kick_made) { /* kept for the daemon's life: queues use it */
		dm->disk.gate.kick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (dm->disk.gate.kick_fd < 0) {
			vblk_fmt_err(err, errlen, "eventfd: %s", strerror(errno));
			r = -errno;
			goto fail;
		}
		dm->disk.gate.kick_made = true;
	}
	m->speed = speed;
	m->write_blocking = write_blocking;
	m->postcopy = m->postcopy_req = postcopy;
	m->not_taken = not_taken;
	snprintf(m->uri_text, sizeof(m->uri_text), "%s", uri);
	r = vmig__uri_parse(uri, &m->uri, &e);
	if (r) {
		vblk_fmt_err(err, errlen, "%s", e.msg);
		goto fail;
	}
	if (!granularity)
		granularity = resume ? dm->disk.dirty->granularity : VBLK_DIRTY_DEFAULT_GRANULARITY;
	if (!resume) {
		r = vblk_dirty_start(dm, granularity, true);
		if (r) {
			vblk_fmt_err(err, errlen,
				     r == -EINVAL
					 ? "granularity must be a power of two, at least the "
					   "disk's block size"
					 : "cannot start dirty tracking: %s",
				     strerror(-r));
			goto fail;
		}
	}
	m->geom = (struct vblk_ss_geom){.disk_size = dm->disk.size,
					.block_size = dm->disk.block_size,
					.granularity = granularity};
	if (resume) { /* the destination knows this session: it goes on with it */
		memcpy(m->geom.session, old->geom.session, sizeof(m->geom.session));
		if (postcopy)
			m->geom.flags = VBLK_SS_F_POSTCOPY;
	} else { /* every block follows: a destination may take it from anyone */
		m->geom.flags = VBLK_SS_F_FULL;
		while (getrandom(m->geom.session, sizeof(m->geom.session), 0) < 0 && errno == EINTR)
			;
		m->geom.session[0] |= 1; /* never all zero */
	}
	r = vblk_dirty_new(dm->disk.size, granularity, false, &m->unacked);
	if (!r)
		r = vblk_dirty_new(dm->disk.size, granularity, false, &m->urgent);
	m->buf = vblk_ss_buf_alloc();
	m->ext = calloc(TAKE_EXTENTS, sizeof(*m->ext));
	if (r || !m->buf || !m->ext) {
		vblk_fmt_err(err, errlen, "out of memory");
		r = -ENOMEM;
		goto fail_tracking;
	}
	r = -pthread_create(&m->copier, NULL, m_copier, m);
	if (r) {
		vblk_fmt_err(err, errlen, "cannot start the copier thread: %s", strerror(-r));
		goto fail_tracking;
	}
	m->copier_running = true;
	m_free(old);
	dm->mirror = m;
	vblk_log(dm, "mirror: %s to %s, granularity %u, copy-mode %s",
		 postcopy ? "resuming the post-copy"
		 : resume ? "resuming"
			  : "starting",
		 uri, granularity, write_blocking ? "write-blocking" : "background");
	return 0;
fail_tracking:
	if (!resume)
		vblk_dirty_stop(dm);
fail:
	m_free(m);
	return r;
}

/*
 * What both ends of a mirror at switch-over check first: the guest is
 * stopped here (no queue runs), and a mirror exists that has not ended.
 * `what` finishes "... once the VM is stopped". Returns 0 with m->lock held.
 */
static int switch_begin(struct vblk_daemon *dm, const char *what, char *err, size_t errlen)
{
	struct vblk_mirror *m = dm->mirror;

	for (unsigned i = 0; i < dm->nqueues; i++) {
		if (dm->q[i].running) {
			vblk_fmt_err(
			    err, errlen,
			    "the guest can still write (queue %u is running): %s once the VM "
			    "is stopped for switch-over",
			    i, what);
			return -EBUSY;
		}
	}
	if (!m) {
		vblk_fmt_err(err, errlen, "no mirror is running");
		return -ENOENT;
	}
	pthread_mutex_lock(&m->lock);
	if (m->stop) {
		vblk_fmt_err(err, errlen, "the mirror has ended%s%s", m->error[0] ? ": " : "",
			     m->error);
		pthread_mutex_unlock(&m->lock);
		return -ENOENT;
	}
	return 0;
}

int vblk_mirror_complete(struct vblk_daemon *dm, char *err, size_t errlen)
{
	struct vblk_mirror *m = dm->mirror;
	int r = switch_begin(dm, "complete the mirror", err, errlen);

	if (r)
		return r;
	if (m->postcopy_req) {
		vblk_fmt_err(err, errlen, "the mirror is in post-copy: it completes by itself");
		r = -EBUSY;
	} else if (!m->ready) {
		vblk_fmt_err(err, errlen,
			     "the mirror is not ready yet (its first pass is not on the "
			     "destination)");
		r = -EAGAIN;
	} else {
		m->completing = true;
		m_wake(m);
	}
	pthread_mutex_unlock(&m->lock);
	return r;
}

int vblk_mirror_start_postcopy(struct vblk_daemon *dm, char *err, size_t errlen)
{
	struct vblk_mirror *m = dm->mirror;
	int r = switch_begin(dm, "switch", err, errlen);

	if (r)
		return r;
	if (m->completing) {
		vblk_fmt_err(err, errlen, "the mirror is completing its last round");
		r = -EBUSY;
	} else if (m->geom.granularity > VBLK_SS_MAX_DATA) {
		vblk_fmt_err(err, errlen,
			     "post-copy needs a granularity of at most 1 MiB (this one: %u)",
			     m->geom.granularity);
		r = -EINVAL;
	} else if (!vblk_postcopy_capable(dm)) {
		vblk_fmt_err(err, errlen,
			     "post-copy needs a state file for this disk (--postcopy-state FILE)");
		r = -EINVAL;
	} else if (!m->postcopy_req) {
		m->postcopy_req = true;
		/* From now on the guest may not run here: QEMU resuming the
		 * source VM meanwhile must not write a disk that is being
		 * handed over (lifted if the switch never goes out). */
		__atomic_store_n(&dm->disk.handed_over, true, __ATOMIC_RELEASE);
		m_wake(m);
	}
	pthread_mutex_unlock(&m->lock);
	return r;
}

int vblk_mirror_cancel(struct vblk_daemon *dm, char *err, size_t errlen)
{
	struct vblk_mirror *m = dm->mirror;

	if (!m) {
		vblk_fmt_err(err, errlen, "no mirror is running");
		return -ENOENT;
	}
	pthread_mutex_lock(&m->lock);
	if (m->postcopy_req) {
		pthread_mutex_unlock(&m->lock);
		vblk_fmt_err(err, errlen,
			     "the mirror is in post-copy: the destination serves the disk, so it "
			     "cannot be cancelled; it ends once every block is there");
		return -EBUSY;
	}
	m->cancel = true;
	if (!m->stop)
		snprintf(m->error, sizeof(m->error), "cancelled");
	m->stop = true;
	m_wake(m);
	pthread_mutex_unlock(&m->lock);
	m_join(m);
	vblk_dirty_stop(dm);
	vblk_log(dm, "mirror: cancelled");
	return 0;
}

int vblk_mirror_change(struct vblk_daemon *dm, bool write_blocking, char *err, size_t errlen)
{
	struct vblk_mirror *m = dm->mirror;
	int r = 0;

	if (!m) {
		vblk_fmt_err(err, errlen, "no mirror is running");
		return -ENOENT;
	}
	pthread_mutex_lock(&m->lock);
	if (m->stop) {
		vblk_fmt_err(err, errlen, "the mirror has ended");
		r = -ENOENT;
	} else if (m->write_blocking != write_blocking) {
		m->write_blocking = write_blocking;
		m_wake(m); /* the copier's next round turns the gate on or off */
		vblk_log(dm, "mirror: copy-mode %s",
			 write_blocking ? "write-blocking" : "background");
	}
	pthread_mutex_unlock(&m->lock);
	return r;
}

int vblk_mirror_set_speed(struct vblk_daemon *dm, uint64_t speed, char *err, size_t errlen)
{
	struct vblk_mirror *m = dm->mirror;

	if (!m) {
		vblk_fmt_err(err, errlen, "no mirror is running");
		return -ENOENT;
	}
	pthread_mutex_lock(&m->lock);
	m->speed = speed;
	pthread_cond_broadcast(&m->cv); /* a push waiting for its budget */
	pthread_mutex_unlock(&m->lock);
	return 0;
}

void vblk_mirror_query(struct vblk_daemon *dm, struct vblk_mirror_info *in)
{
	struct vblk_mirror *m = dm->mirror;
	struct vblk_dirty_info di;
	bool ok_end;

	memset(in, 0, sizeof(*in));
	if (!m)
		return;
	in->exists = true;
	pthread_mutex_lock(&m->lock);
	in->ready = m->ready;
	in->completing = m->completing;
	in->speed = m->speed;
	in->rounds = m->acked;
	in->write_blocking = m->write_blocking;
	in->actively_synced = m->synced;
	in->postcopy = m->postcopy;
	in->postcopy_not_taken = m->not_taken;
	snprintf(in->error, sizeof(in->error), "%s", m->error);
	/* Not at stop: a mirror that heard NOT_SWITCHED is stopped by the
	 * return thread, and the copier takes the disk back only after that
	 * (m_take_back). "concluded" before then would show the disk still
	 * fenced and postcopy-not-taken false to an orchestrator acting on it. */
	in->status = m->concluded ? "concluded" : m->ready ? "ready" : "running";
	ok_end = m->concluded && !m->error[0];
	pthread_mutex_unlock(&m->lock);
	snprintf(in->uri, sizeof(in->uri), "%s", m->uri_text);
	in->offset = __atomic_load_n(&m->offset, __ATOMIC_RELAXED);
	in->held_writes = __atomic_load_n(&dm->disk.gate.held, __ATOMIC_RELAXED);
	in->urgent_bytes = __atomic_load_n(&m->urgent_bytes, __ATOMIC_RELAXED);
	vblk_dirty_query(dm, &di);
	in->dirty_rate = di.rate_bytes_per_s;
	in->remaining =
	    ok_end ? 0 : di.dirty + __atomic_load_n(&m->unacked_bytes, __ATOMIC_RELAXED);
	in->len = in->offset + in->remaining;
	if (ok_end && dm->disk.dirty) { /* done with the bitmap */
		m_join(m);
		vblk_dirty_stop(dm);
	}
}

void vblk_mirror_free(struct vblk_daemon *dm)
{
	struct vblk_mirror *m = dm->mirror;

	if (!m)
		return;
	pthread_mutex_lock(&m->lock);
	m->cancel = true;
	m->stop = true;
	m_wake(m);
	pthread_mutex_unlock(&m->lock);
	m_free(m);
	dm->mirror = NULL;
}
