// SPDX-License-Identifier: MIT
/*
 * Storage migration, the destination (docs/storage-migration.md); the
 * source is mirror.c.
 *
 * The destination (vmig-blk --incoming URI). A receiver thread accepts the
 * source's connection, checks its preamble against this disk, writes DATA
 * and ZERO to the disk, acknowledges each SYNC (after fdatasync if a FLUSH
 * came first), and on EOS syncs, answers DONE and stops listening. A
 * connection that fails is logged and the next one accepted: the source
 * resumes. Until DONE, the queues the front-end starts are held (their
 * kicks wait in the eventfd); the main loop starts them when the receiver
 * signals. So the destination's guest never sees a block before its last
 * copy arrived.
 *
 * In post-copy (the source sent POSTCOPY), the guest is served at once: a
 * request that touches a granule still missing is held by its queue thread
 * and its granules asked for (READ_REQ) by a requester thread, ahead of
 * the source's background push; the missing set lives in a state file next
 * to the image, so a kill -9 loses nothing.
 *
 * Threads. The control thread starts, queries and frees; the receiver
 * thread runs the stream and the requester thread sends READ_REQ. Fields
 * say who owns them; `lock` and `wlock` guard those marked so.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <unistd.h>

#include "blk.h"
#include "channel/channel.h"
#include "mirror.h"
#include "mirror_int.h"
#include "sstream.h"

/* ---- the destination ------------------------------------------------- */

enum in_status {
	IN_LISTENING,
	IN_RECEIVING,
	IN_POSTCOPY_ACTIVE, /* post-copy, the source connected */
	IN_POSTCOPY_PAUSED, /* post-copy, waiting for the source to resume */
	IN_COMPLETED,
};

struct vblk_incoming {
	struct vblk_daemon *dm;
	int listen_fd;
	int stop_fd;  /* eventfd: the control thread stops the receiver */
	int event_fd; /* eventfd: the receiver says the guest may be served */
	int port;
	char unix_path[108]; /* unix: the socket file we made */
	pthread_t thread, requester;
	bool thread_started, requester_started;
	pthread_mutex_t lock;
	/* lock */
	enum in_status status;
	struct vmig__chan *chan; /* the connection being received */
	uint64_t received, rounds, connections;
	uint64_t urgent; /* post-copy: READ_REQ records sent */
	bool postcopy;	 /* the switch happened (or the state file says so) */
	char error[256];
	/* wlock: the writer on the connection being received, shared by the
	 * receiver (ACK, DONE, ERROR, the map) and the requester (READ_REQ) */
	pthread_mutex_t wlock;
	struct vblk_ss_writer w;
	bool w_ok; /* the requester may send on w */
	/* receiver thread (and the control thread before it starts) */
	uint8_t session[16];
	bool have_session;
	uint8_t *buf;
	uint64_t *staged; /* post-copy: MISSING records before the switch */
	/* The post-copy state file ("" if this disk can have none) and its
	 * mapping: a header, then the missing bitmap (disk.pc.missing). */
	char state_path[4096];
	void *state_map;
	size_t state_len;
	/* control thread */
	struct vhost_vring *held[VHOST_MAX_QUEUES];
	bool released; /* the guest may be served: queues start as they come */
};

/* ---- post-copy storage, the destination ------------------------------ */

static int pc_arrays(struct vblk_pcmap *pc, const struct vblk_ss_geom *g)
{
	pc->nbits = vblk_ss_granules(g);
	pc->nwords = vblk_ss_map_words(g);
	pc->shift = (unsigned)__builtin_ctz(g->granularity);
	pc->wanted = calloc(pc->nwords, sizeof(uint64_t));
	pc->asked = calloc(pc->nwords, sizeof(uint64_t));
	pc->want_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	return pc->wanted && pc->asked && pc->want_fd >= 0 ? 0 : -ENOMEM;
}

void vblk_pcmap_free(struct vblk_pcmap *pc)
{
	free(pc->wanted);
	free(pc->asked);
	if (pc->want_fd > 0)
		close(pc->want_fd);
	memset(pc, 0, sizeof(*pc));
}

static uint64_t pc_missing_granules(const struct vblk_pcmap *pc)
{
	uint64_t n = 0;

	for (uint64_t i = 0; i < pc->nwords; i++)
		n += (uint64_t)__builtin_popcountll(
		    __atomic_load_n(&pc->missing[i], __ATOMIC_RELAXED));
	return n;
}

/* Map the state file's bitmap; in->state_map/len own the mapping. */
static int pc_map(struct vblk_incoming *in, int fd, size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);

	if (p == MAP_FAILED)
		return -errno;
	in->state_map = p;
	in->state_len = len;
	in->dm->disk.pc.missing = (uint64_t *)((uint8_t *)p + PC_STATE_HDR);
	return 0;
}

/* All of buf at off, across short writes and signals: 0 or -errno. */
static int pwrite_all(int fd, const void *buf, size_t n, off_t off)
{
	for (size_t done = 0; done < n;) {
		ssize_t k = pwrite(fd, (const uint8_t *)buf + done, n - done, off + (off_t)done);

		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return k < 0 ? -errno : -EIO;
		done += (size_t)k;
	}
	return 0;
}

/* The switch: the staged map becomes the state file (or, for a RAM disk,
 * which dies with the process anyway, plain memory). */
static int pc_state_create(struct vblk_incoming *in, const struct vblk_ss_geom *g, char *err,
			   size_t len)
{
	struct vblk_pcmap *pc = &in->dm->disk.pc;
	char tmp[4200];
	struct pc_state_hdr h = {.version = PC_STATE_VERSION,
				 .granularity = g->granularity,
				 .disk_size = g->disk_size,
				 .nbits = pc->nbits};
	size_t size = PC_STATE_HDR + pc->nwords * 8;
	int fd, r;

	if (in->dm->disk.ram) {
		pc->missing = in->staged;
		in->staged = NULL;
		return 0;
	}
	memcpy(h.magic, PC_STATE_MAGIC, 8);
	memcpy(h.session, g->session, 16);
	/* Whole or not at all: a daemon killed while writing must not find a
	 * valid header over a bitmap that says nothing is missing. The map
	 * is written to a file of its own, which then takes the name. */
	if (snprintf(tmp, sizeof(tmp), "%s.new", in->state_path) >= (int)sizeof(tmp)) {
		vblk_fmt_err(err, len, "the post-copy state file's name is too long");
		return -ENAMETOOLONG;
	}
	fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		vblk_fmt_err(err, len, "cannot create the post-copy state file %s: %s", tmp,
			     strerror(errno));
		return -errno;
	}
	r = ftruncate(fd, (off_t)size) ? -errno : 0;
	if (!r)
		r = pwrite_all(fd, in->staged, pc->nwords * 8, PC_STATE_HDR);
	if (!r)
		r = pwrite_all(fd, &h, sizeof(h), 0);
	if (!r && rename(tmp, in->state_path))
		r = -errno;
	if (!r)
		r = pc_map(in, fd, size);
	close(fd);
	if (r) {
		vblk_fmt_err(err, len, "cannot write the post-copy state file %s: %s",
			     in->state_path, strerror(-r));
		unlink(tmp);
		unlink(in->state_path);
	}
	return r;
}

/* Granules arrived: held requests look again (struct vblk_pcmap). */
static void pc_arrived(struct vblk_incoming *in)
{
	struct vblk_pcmap *pc = &in->dm->disk.pc;

	__atomic_add_fetch(&pc->gen, 1, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&pc->waiting, __ATOMIC_SEQ_CST))
		vblk_wake_queues(in->dm);
}

static int in_write(struct vblk_disk *disk, uint64_t off, const uint8_t *p, uint64_t len);
static int in_zero(struct vblk_incoming *in, uint64_t off, uint64_t len, bool unmap);

/*
 * DATA or ZERO after the switch (whole granules, the reader checked): only
 * the granules still missing are written, since the guest may have written
 * the others since they arrived; each bit is cleared once its data is in
 * the image.
 */
static int pc_apply(struct vblk_incoming *in, const struct vblk_ss_rec *rec)
{
	struct vblk_pcmap *pc = &in->dm->disk.pc;
	uint64_t end = rec->offset + rec->length, g = rec->offset >> pc->shift, applied = 0;
	int r = 0;

	while (!r && g < pc->nbits && g << pc->shift < end) {
		uint64_t a = g, off, n;

		if (!(__atomic_load_n(&pc->missing[g / 64], __ATOMIC_ACQUIRE) >> (g % 64) & 1)) {
			g++;
			continue;
		}
		while (g < pc->nbits && g << pc->shift < end &&
		       (__atomic_load_n(&pc->missing[g / 64], __ATOMIC_ACQUIRE) >> (g % 64) & 1))
			g++;
		off = a << pc->shift;
		n = VMIG_MIN(g << pc->shift, end) - off;
		r = rec->type == VBLK_SS_DATA
			? in_write(&in->dm->disk, off, rec->data + (off - rec->offset), n)
			: in_zero(in, off, n, rec->flags & VBLK_SS_ZERO_F_UNMAP);
		if (r)
			break;
		for (uint64_t k = a; k < g; k++)
			__atomic_fetch_and(&pc->missing[k / 64], ~(1ull << (k % 64)),
					   __ATOMIC_SEQ_CST);
		applied += n;
	}
	if (applied) {
		pc_arrived(in);
		pthread_mutex_lock(&in->lock);
		in->received += applied;
		pthread_mutex_unlock(&in->lock);
	}
	return r;
}

/* Ask for what the queues want (wlock held, w usable): runs of granules,
 * up to 1 MiB per READ_REQ. */
static void pc_ask(struct vblk_incoming *in)
{
	struct vblk_pcmap *pc = &in->dm->disk.pc;
	const uint64_t max = VBLK_SS_MAX_READ_REQ >> pc->shift;
	uint64_t a = 0, n = 0, sent = 0;

	for (uint64_t i = 0; i <= pc->nwords; i++) {
		uint64_t x = 0;

		if (i < pc->nwords && __atomic_load_n(&pc->wanted[i], __ATOMIC_RELAXED)) {
			x = __atomic_exchange_n(&pc->wanted[i], 0, __ATOMIC_ACQ_REL) &
			    __atomic_load_n(&pc->missing[i], __ATOMIC_ACQUIRE) &
			    ~__atomic_load_n(&pc->asked[i], __ATOMIC_RELAXED);
			__atomic_fetch_or(&pc->asked[i], x, __ATOMIC_RELAXED);
		}
		for (;;) {
			uint64_t g = x ? i * 64 + (uint64_t)__builtin_ctzll(x) : UINT64_MAX;

			if (n && (g != a + n || n == max || i == pc->nwords)) {
				uint64_t off = a << pc->shift;

				vblk_ss_put_read_req(
				    &in->w, off, VMIG_MIN(n << pc->shift, in->dm->disk.size - off));
				sent++;
				n = 0;
			}
			if (!x)
				break;
			if (!n)
				a = g;
			n++;
			x &= x - 1;
		}
	}
	if (sent) {
		pthread_mutex_lock(&in->lock);
		in->urgent += sent;
		pthread_mutex_unlock(&in->lock);
	}
}

/* The requester: READ_REQ for the granules held requests need, on the
 * connection being received; none while there is none (a new connection
 * has the queues ask again). */
static void *pc_requester(void *arg)
{
	struct vblk_incoming *in = arg;
	struct vblk_pcmap *pc = &in->dm->disk.pc;

	for (;;) {
		struct pollfd pfd[2] = {{.fd = pc->want_fd, .events = POLLIN},
					{.fd = in->stop_fd, .events = POLLIN}};
		eventfd_t v;

		if (poll(pfd, 2, -1) < 0 && errno != EINTR)
			return NULL;
		if (pfd[1].revents)
			return NULL;
		eventfd_read(pc->want_fd, &v);
		pthread_mutex_lock(&in->wlock);
		if (in->w_ok && !in->w.error)
			pc_ask(in);
		pthread_mutex_unlock(&in->wlock);
	}
}

/* Serve the guest in post-copy: the bitmap is published, the requester
 * runs, and the held queues start (the main loop, on event_fd). */
static int pc_go(struct vblk_incoming *in, char *err, size_t len)
{
	struct vblk_pcmap *pc = &in->dm->disk.pc;
	int r;

	__atomic_store_n(&pc->active, true, __ATOMIC_RELEASE);
	r = -pthread_create(&in->requester, NULL, pc_requester, in);
	if (r) {
		vblk_fmt_err(err, len, "cannot start the requester thread: %s", strerror(-r));
		return r;
	}
	in->requester_started = true;
	pthread_mutex_lock(&in->lock);
	in->postcopy = true;
	pthread_mutex_unlock(&in->lock);
	eventfd_write(in->event_fd, 1);
	return 0;
}

/* A new connection in post-copy: tell the source what is still missing
 * (MISSING_MAP, MAP_END), then let the requester ask on it, and have the
 * held requests ask again (asked is reset: what was asked on the old
 * connection may never have come). */
static int pc_resume(struct vblk_incoming *in)
{
	struct vblk_pcmap *pc = &in->dm->disk.pc;
	const uint64_t chunk = VBLK_SS_MAX_DATA / 8;
	uint64_t *words = (uint64_t *)in->buf;
	int r = 0;

	pthread_mutex_lock(&in->wlock);
	for (uint64_t i = 0; i < pc->nwords && !r; i += chunk) {
		uint64_t n = VMIG_MIN(chunk, pc->nwords - i), any = 0;

		for (uint64_t k = 0; k < n; k++)
			any |= words[k] = __atomic_load_n(&pc->missing[i + k], __ATOMIC_ACQUIRE);
		if (any)
			r = vblk_ss_put_missing_map(&in->w, i * 64, words, n);
	}
	if (!r)
		r = vblk_ss_put_map_end(&in->w);
	for (uint64_t i = 0; i < pc->nwords; i++)
		__atomic_store_n(&pc->asked[i], 0, __ATOMIC_RELAXED);
	in->w_ok = !r;
	pthread_mutex_unlock(&in->wlock);
	pc_arrived(in); /* held requests mark what they need as wanted again */
	/* what was wanted while no connection could carry it: ask now */
	eventfd_write(in->dm->disk.pc.want_fd, 1);
	return r;
}

/*
 * At start: a state file says a post-copy was in progress (this daemon
 * was killed or restarted during it). Everything in it is checked against
 * this disk; one that does not fit refuses the start, since serving the
 * image would show the guest blocks it never wrote. 1: resumed, 0: none.
 */
static int pc_state_load(struct vblk_incoming *in, char *err, size_t len)
{
	struct vblk_disk *disk = &in->dm->disk;
	struct vblk_pcmap *pc = &disk->pc;
	struct vblk_ss_geom g = {.disk_size = disk->size, .block_size = disk->block_size};
	struct pc_state_hdr h;
	struct stat st;
	uint64_t tail;
	int fd, r = 0;

	if (!in->state_path[0])
		return 0;
	fd = open(in->state_path, O_RDWR | O_CLOEXEC);
	if (fd < 0 && errno == ENOENT)
		return 0;
	if (fd < 0 || fstat(fd, &st) || pread(fd, &h, sizeof(h), 0) != (ssize_t)sizeof(h)) {
		vblk_fmt_err(err, len, "cannot read the post-copy state file %s: %s",
			     in->state_path, strerror(errno ? errno : EIO));
		if (fd >= 0)
			close(fd);
		return -EIO;
	}
	g.granularity = h.granularity;
	memcpy(g.session, h.session, sizeof(g.session));
	if (memcmp(h.magic, PC_STATE_MAGIC, 8) || h.version != PC_STATE_VERSION ||
	    h.disk_size != disk->size || !vblk_ss_geom_ok(&g) || h.granularity > VBLK_SS_MAX_DATA ||
	    h.nbits != vblk_ss_granules(&g) ||
	    (uint64_t)st.st_size != PC_STATE_HDR + vblk_ss_map_words(&g) * 8)
		r = -EINVAL;
	else if (pc_arrays(pc, &g) || pc_map(in, fd, (size_t)st.st_size))
		r = -ENOMEM;
	close(fd);
	tail = pc->nbits % 64;
	if (!r && tail && pc->missing[pc->nwords - 1] >> tail)
		r = -EINVAL;
	if (r) {
		vblk_fmt_err(
		    err, len,
		    "the post-copy state file %s does not describe this disk (%s): the image "
		    "is not whole; refusing to serve it",
		    in->state_path, r == -EINVAL ? "damaged, or another disk's" : "no memory");
		return r;
	}
	memcpy(in->session, h.session, sizeof(in->session));
	in->have_session = true;
	r = pc_go(in, err, len);
	if (r)
		return r;
	pthread_mutex_lock(&in->lock);
	in->status = IN_POSTCOPY_PAUSED;
	pthread_mutex_unlock(&in->lock);
	vblk_log(in->dm,
		 "incoming: resuming a post-copy (%s): %llu KiB of the disk are still on the "
		 "source; requests for them wait until it reconnects",
		 in->state_path, (unsigned long long)(pc_missing_granules(pc) << pc->shift) >> 10);
	return 1;
}

/* The last granule arrived and EOS came: the image is whole. */
static int pc_finish(struct vblk_incoming *in)
{
	__atomic_store_n(&in->dm->disk.pc.active, false, __ATOMIC_RELEASE);
	if (in->state_path[0] && !in->dm->disk.ram && unlink(in->state_path) && errno != ENOENT)
		return -errno;
	return 0;
}

static int in_write(struct vblk_disk *disk, uint64_t off, const uint8_t *p, uint64_t len)
{
	if (disk->ram) {
		memcpy(disk->ram + off, p, len);
		return 0;
	}
	return pwrite_all(disk->fd, p, len, (off_t)off);
}

static int in_zero(struct vblk_incoming *in, uint64_t off, uint64_t len, bool unmap)
{
	struct vblk_disk *disk = &in->dm->disk;
	int mode = unmap ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
			 : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;

	if (disk->ram) {
		memset(disk->ram + off, 0, len);
		return 0;
	}
	if (!fallocate(disk->fd, mode, (off_t)off, (off_t)len))
		return 0;
	if (errno != EOPNOTSUPP && errno != EINVAL && errno != ENODEV)
		return -errno;
	/* no such fallocate here: write the zeros */
	memset(in->buf, 0, VBLK_SS_MAX_DATA);
	while (len) {
		uint64_t n = VMIG_MIN(len, (uint64_t)VBLK_SS_MAX_DATA);
		int r = in_write(disk, off, in->buf, n);

		if (r)
			return r;
		off += n;
		len -= n;
	}
	return 0;
}

static int in_sync(struct vblk_disk *disk)
{
	return disk->ram || !fdatasync(disk->fd) ? 0 : -errno;
}

/* Put a record on the connection's writer (wlock): the requester shares it. */
#define IN_PUT(in, call)                                                                           \
	({                                                                                         \
		int r_;                                                                            \
		pthread_mutex_lock(&(in)->wlock);                                                  \
		r_ = (call);                                                                       \
		pthread_mutex_unlock(&(in)->wlock);                                                \
		r_;                                                                                \
	})

/* A refusal goes back to the source too, as an ERROR record. */
static int in_refuse(struct vblk_incoming *in, char *err, size_t len, const char *why)
{
	vblk_fmt_err(err, len, "%s", why);
	IN_PUT(in, vblk_ss_put_error(&in->w, err));
	return -EPROTO;
}

/* Check a connection's preamble against this disk and where it stands. */
static int in_preamble(struct vblk_incoming *in, struct vblk_ss_reader *r, struct vblk_ss_geom *g,
		       char *err, size_t len)
{
	struct vblk_disk *disk = &in->dm->disk;
	struct vblk_ss_geom want = {.disk_size = disk->size, .block_size = disk->block_size};
	bool postcopy;

	if (vblk_ss_read_preamble(r, &want, g))
		return in_refuse(in, err, len, r->err);
	pthread_mutex_lock(&in->lock);
	postcopy = in->postcopy;
	pthread_mutex_unlock(&in->lock);
	/* A resumed stream must be the same session's (its source sends only
	 * what we lack); a full copy may come from a new one, as after the
	 * source daemon restarted: it overwrites every block. Not once the
	 * guest runs here: then only the migration that switched may go on. */
	if (postcopy && (!(g->flags & VBLK_SS_F_POSTCOPY) ||
			 memcmp(in->session, g->session, sizeof(g->session))))
		return in_refuse(in, err, len,
				 "this disk is in post-copy: only the migration that switched it "
				 "to this host may resume it");
	if (!postcopy && (g->flags & VBLK_SS_F_POSTCOPY)) {
		bool served;

		pthread_mutex_lock(&in->lock);
		served = in->status == IN_COMPLETED;
		pthread_mutex_unlock(&in->lock);
		if (served)
			return in_refuse(in, err, len, "there is no post-copy to resume here");
		/* The switch never reached us (or we refused it), and without it
		 * or DONE the guest was never served here: the source may take
		 * the disk back, and must hear so, or it stays fenced. */
		pthread_mutex_lock(&in->wlock);
		vblk_ss_writer_init(&in->w, vblk_chan_put, in->w.opaque, g);
		vblk_ss_put_not_switched(&in->w);
		pthread_mutex_unlock(&in->wlock);
		vblk_fmt_err(err, len,
			     "the source resumes a post-copy this disk never switched to: told it "
			     "so, the disk stays with the source");
		return -EPROTO;
	}
	if (postcopy && g->granularity != 1u << in->dm->disk.pc.shift)
		return in_refuse(in, err, len,
				 "a resumed post-copy must keep the granularity of the switch");
	if (in->have_session && memcmp(in->session, g->session, sizeof(g->session)) &&
	    !(g->flags & VBLK_SS_F_FULL))
		return in_refuse(in, err, len,
				 "a resumed stream of another migration (its session differs "
				 "from the one this disk was receiving)");
	memcpy(in->session, g->session, sizeof(g->session));
	in->have_session = true;
	return 0;
}

/* MISSING, before the switch: staged until POSTCOPY. */
static int in_missing(struct vblk_incoming *in, const struct vblk_ss_geom *g,
		      const struct vblk_ss_rec *rec, char *err, size_t len)
{
	if (!in->state_path[0] && !in->dm->disk.ram)
		return in_refuse(in, err, len,
				 "post-copy storage needs a state file for this disk "
				 "(--postcopy-state FILE)");
	if (!in->staged && !(in->staged = calloc(vblk_ss_map_words(g), sizeof(uint64_t))))
		return in_refuse(in, err, len, "out of memory for the missing map");
	for (uint64_t i = 0; i < rec->length / 8; i++)
		in->staged[rec->granule / 64 + i] |= vblk_ss_map_word(rec, i);
	return 0;
}

/* POSTCOPY: the guest is served from here on. */
static int in_switch(struct vblk_incoming *in, const struct vblk_ss_geom *g, char *err, size_t len)
{
	struct vblk_pcmap *pc = &in->dm->disk.pc;
	char why[256];
	int r;

	if (!in->staged)
		r = in_missing(in, g, &(struct vblk_ss_rec){.length = 0}, err, len);
	else
		r = 0;
	if (r)
		return r;
	if (pc_arrays(pc, g))
		return in_refuse(in, err, len, "out of memory for the missing map");
	r = pc_state_create(in, g, why, sizeof(why));
	if (!r)
		r = pc_go(in, why, sizeof(why));
	if (r)
		return in_refuse(in, err, len, why);
	vblk_log(in->dm,
		 "incoming: post-copy: serving the guest; %llu KiB still to come, on demand "
		 "first",
		 (unsigned long long)(pc_missing_granules(pc) << pc->shift) >> 10);
	return 0;
}

/* Receive one connection's stream. 0: it ended with EOS and DONE went out;
 * else why not, in err. */
static int in_receive(struct vblk_incoming *in, struct vmig__chan *c, char *err, size_t len)
{
	struct vblk_disk *disk = &in->dm->disk;
	struct vblk_ss_geom g = {.disk_size = disk->size, .block_size = disk->block_size};
	struct vblk_ss_reader r;
	struct vblk_ss_rec rec;
	bool flush = false, synced;
	int ret;

	vblk_ss_reader_init(&r, VBLK_SS_TO_DEST, vblk_chan_get, c, in->buf);
	pthread_mutex_lock(&in->wlock);
	vblk_ss_writer_init(&in->w, vblk_chan_put, c, &g);
	pthread_mutex_unlock(&in->wlock);
	/* A switch that did not complete on an earlier connection counts for
	 * nothing (its map was sized by that connection's geometry too). */
	free(in->staged);
	in->staged = NULL;
	ret = in_preamble(in, &r, &g, err, len);
	if (ret)
		return ret;
	pthread_mutex_lock(&in->wlock);
	vblk_ss_writer_init(&in->w, vblk_chan_put, c, &g);
	pthread_mutex_unlock(&in->wlock);
	if ((g.flags & VBLK_SS_F_POSTCOPY) && pc_resume(in)) {
		vblk_fmt_err(err, len, "cannot answer the source: %s", strerror(-in->w.error));
		return -EIO;
	}
	for (;;) {
		ret = vblk_ss_read_record(&r, &rec);
		if (ret) {
			vblk_fmt_err(err, len, "%s", r.err);
			return ret;
		}
		switch (rec.type) {
		case VBLK_SS_DATA:
			ret = r.postcopy ? pc_apply(in, &rec)
					 : in_write(disk, rec.offset, rec.data, rec.length);
			break;
		case VBLK_SS_ZERO:
			ret = r.postcopy ? pc_apply(in, &rec)
					 : in_zero(in, rec.offset, rec.length,
						   rec.flags & VBLK_SS_ZERO_F_UNMAP);
			break;
		case VBLK_SS_FLUSH:
			flush = true;
			break;
		case VBLK_SS_MISSING:
			if (in_missing(in, &g, &rec, err, len))
				return -EPROTO;
			break;
		case VBLK_SS_POSTCOPY:
			if (in_switch(in, &g, err, len))
				return -EPROTO;
			pthread_mutex_lock(&in->wlock);
			in->w_ok = true;
			pthread_mutex_unlock(&in->wlock);
			eventfd_write(disk->pc.want_fd, 1); /* wanted before it could ask */
			pthread_mutex_lock(&in->lock);
			in->status = IN_POSTCOPY_ACTIVE;
			pthread_mutex_unlock(&in->lock);
			break;
		case VBLK_SS_SYNC:
			synced = flush;
			if (flush && (ret = in_sync(disk)))
				break;
			flush = false;
			pthread_mutex_lock(&in->lock);
			in->rounds = rec.round;
			pthread_mutex_unlock(&in->lock);
			if (IN_PUT(in, vblk_ss_put_ack(&in->w, rec.round))) {
				vblk_fmt_err(err, len, "cannot answer the source: %s",
					     strerror(-in->w.error));
				return -EIO;
			}
			/* While the source works on its next round: so the last
			 * round's sync, inside the VM's downtime, has only that
			 * round's blocks to write back. */
			if (!synced)
				ret = in_sync(disk);
			break;
		case VBLK_SS_EOS:
			if (r.postcopy && pc_missing_granules(&disk->pc)) {
				char why[160];

				snprintf(why, sizeof(why),
					 "the source ended the stream with %llu granules still "
					 "missing",
					 (unsigned long long)pc_missing_granules(&disk->pc));
				return in_refuse(in, err, len, why);
			}
			if ((ret = in_sync(disk)) || (r.postcopy && (ret = pc_finish(in))))
				break;
			if (IN_PUT(in, vblk_ss_put_done(&in->w))) {
				vblk_fmt_err(err, len, "cannot answer the source: %s",
					     strerror(-in->w.error));
				return -EIO;
			}
			return 0;
		default: /* the reader lets only the source's types through */
			break;
		}
		if (ret) {
			char why[200];

			snprintf(why, sizeof(why), "cannot write the disk at %llu: %s",
				 (unsigned long long)rec.offset, strerror(-ret));
			return in_refuse(in, err, len, why);
		}
		if (!r.postcopy && (rec.type == VBLK_SS_DATA || rec.type == VBLK_SS_ZERO)) {
			pthread_mutex_lock(&in->lock);
			in->received += rec.length;
			pthread_mutex_unlock(&in->lock);
		}
	}
}

#define HANDSHAKE_MS 10000

/* Run an accepted connection's handshake (a no-op without TLS) without
 * blocking, within HANDSHAKE_MS; false if it failed, took too long, or we
 * were asked to stop. */
static bool in_handshake(struct vblk_incoming *in, struct vmig__chan *c)
{
	uint64_t end = vmig__now_ms() + HANDSHAKE_MS;
	struct vmig__err err = {{0}};
	int r;

	while ((r = vmig__chan_handshake(c, &err)) == -EAGAIN) {
		struct pollfd pfd[2] = {{.fd = vmig__chan_fd(c), .events = vmig__chan_events(c)},
					{.fd = in->stop_fd, .events = POLLIN}};
		int64_t left = (int64_t)(end - vmig__now_ms());

		if (left <= 0 || poll(pfd, 2, (int)left) <= 0 || pfd[1].revents) {
			snprintf(err.msg, sizeof(err.msg), "the handshake took too long");
			r = -ETIMEDOUT;
			break;
		}
	}
	if (r) {
		pthread_mutex_lock(&in->lock);
		snprintf(in->error, sizeof(in->error), "a connection was refused: %.200s", err.msg);
		pthread_mutex_unlock(&in->lock);
		vblk_log(in->dm, "incoming: a connection was refused: %s", err.msg);
	}
	return !r;
}

/* Accept one connection, or stop: NULL when asked to stop. */
static struct vmig__chan *in_accept(struct vblk_incoming *in)
{
	for (;;) {
		struct pollfd pfd[2] = {{.fd = in->listen_fd, .events = POLLIN},
					{.fd = in->stop_fd, .events = POLLIN}};
		struct vmig__tls none = {0};
		struct vmig__chan *c;

		if (poll(pfd, 2, -1) < 0 && errno != EINTR)
			return NULL;
		if (pfd[1].revents)
			return NULL;
		if (!pfd[0].revents ||
		    vmig__chan_accept(in->listen_fd, in->dm->tls ? in->dm->tls : &none, &c))
			continue;
		if (!in_handshake(in, c) || vmig__chan_set_blocking(c)) {
			vmig__chan_shutdown(c, SHUT_RDWR);
			vmig__chan_free(c);
			continue;
		}
		return c;
	}
}

static void *in_thread(void *arg)
{
	struct vblk_incoming *in = arg;

	for (;;) {
		struct vmig__chan *c = in_accept(in);
		char err[256] = "";
		int r;

		if (!c)
			return NULL;
		pthread_mutex_lock(&in->lock);
		in->chan = c;
		in->status = in->postcopy ? IN_POSTCOPY_ACTIVE : IN_RECEIVING;
		in->connections++;
		pthread_mutex_unlock(&in->lock);
		vblk_log(in->dm, "incoming: receiving the disk");
		r = in_receive(in, c, err, sizeof(err));
		pthread_mutex_lock(&in->wlock); /* the requester is done with c */
		in->w_ok = false;
		pthread_mutex_unlock(&in->wlock);
		pthread_mutex_lock(&in->lock);
		in->chan = NULL;
		in->status = !r ? IN_COMPLETED : in->postcopy ? IN_POSTCOPY_PAUSED : IN_LISTENING;
		if (r)
			snprintf(in->error, sizeof(in->error), "%s", err);
		pthread_mutex_unlock(&in->lock);
		vmig__chan_free(c);
		if (!r) {
			vblk_log(in->dm, "incoming: the disk is complete; serving it");
			eventfd_write(in->event_fd, 1);
			return NULL;
		}
		vblk_log(in->dm,
			 "incoming: the stream ended early (%s); waiting for the source "
			 "to resume%s",
			 err,
			 in->status == IN_POSTCOPY_PAUSED
			     ? " (post-copy: requests for blocks not here yet wait)"
			     : "");
	}
}

int vblk_incoming_start(struct vblk_daemon *dm, const char *uri, char *err, size_t errlen)
{
	struct vblk_incoming *in = calloc(1, sizeof(*in));
	struct vmig__uri u;
	struct vmig__err e = {{0}};
	int r;

	if (!in || !(in->buf = vblk_ss_buf_alloc())) {
		free(in);
		vblk_fmt_err(err, errlen, "out of memory");
		return -ENOMEM;
	}
	in->dm = dm;
	in->listen_fd = in->stop_fd = in->event_fd = -1;
	pthread_mutex_init(&in->lock, NULL);
	pthread_mutex_init(&in->wlock, NULL);
	dm->incoming = in;
	vblk_pc_state_path(dm, in->state_path, sizeof(in->state_path));
	r = vmig__uri_parse(uri, &u, &e);
	if (!r)
		r = vmig__chan_listen(&u, &in->listen_fd, &e);
	if (r) {
		vblk_fmt_err(err, errlen, "--incoming %s: %s", uri, e.msg);
		return r;
	}
	in->port = vmig__chan_local_port(in->listen_fd);
	if (u.kind == VMIG_URI_UNIX)
		snprintf(in->unix_path, sizeof(in->unix_path), "%s", u.path);
	in->stop_fd = eventfd(0, EFD_CLOEXEC);
	in->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (in->stop_fd < 0 || in->event_fd < 0) {
		vblk_fmt_err(err, errlen, "eventfd: %s", strerror(errno));
		return -errno;
	}
	r = pc_state_load(in, err, errlen);
	if (r < 0)
		return r;
	if (r == 0)
		vblk_log(dm, "incoming: waiting for the disk on %s", uri);
	r = -pthread_create(&in->thread, NULL, in_thread, in);
	if (r) {
		vblk_fmt_err(err, errlen, "cannot start the receiver thread: %s", strerror(-r));
		return r;
	}
	in->thread_started = true;
	return 0;
}

int vblk_incoming_fd(const struct vblk_daemon *dm)
{
	return dm->incoming ? dm->incoming->event_fd : -1;
}

static struct vblk_daemon *dm_of(void *opaque)
{
	return (struct vblk_daemon *)((char *)opaque - offsetof(struct vblk_daemon, q));
}

void vblk_incoming_event(struct vblk_daemon *dm)
{
	struct vblk_incoming *in = dm->incoming;
	eventfd_t v;

	if (!in || eventfd_read(in->event_fd, &v))
		return;
	in->released = true;
	for (unsigned i = 0; i < VHOST_MAX_QUEUES; i++) {
		struct vhost_vring *vr = in->held[i];

		if (!vr)
			continue;
		in->held[i] = NULL;
		if (vblk_dev_ops.queue_start(dm->q, vr))
			vblk_log(dm, "incoming: queue %u cannot start", i);
	}
}

static void in_get_config(void *opaque, uint8_t *cfg)
{
	vblk_dev_ops.get_config(opaque, cfg);
}

/* Until the stream completed, a queue the front-end starts is held. */
static int in_queue_start(void *opaque, struct vhost_vring *vr)
{
	struct vblk_incoming *in = dm_of(opaque)->incoming;

	if (in->released)
		return vblk_dev_ops.queue_start(opaque, vr);
	in->held[vr->idx] = vr;
	return 0;
}

static void in_queue_stop(void *opaque, struct vhost_vring *vr)
{
	struct vblk_incoming *in = dm_of(opaque)->incoming;

	if (in->held[vr->idx] == vr) {
		in->held[vr->idx] = NULL;
		return;
	}
	vblk_dev_ops.queue_stop(opaque, vr);
}

const struct vhost_dev_ops vblk_incoming_ops = {
    .get_config = in_get_config,
    .queue_start = in_queue_start,
    .queue_stop = in_queue_stop,
};

void vblk_incoming_query(struct vblk_daemon *dm, struct vblk_incoming_info *info)
{
	static const char *const names[] = {"listening", "receiving", "postcopy-active",
					    "postcopy-paused", "completed"};
	struct vblk_incoming *in = dm->incoming;
	struct vblk_pcmap *pc = &dm->disk.pc;

	memset(info, 0, sizeof(*info));
	if (!in)
		return;
	info->exists = true;
	info->port = in->port;
	pthread_mutex_lock(&in->lock);
	info->status = names[in->status];
	info->received = in->received;
	info->rounds = in->rounds;
	info->connections = in->connections;
	info->postcopy = in->postcopy;
	info->urgent = in->urgent;
	snprintf(info->error, sizeof(info->error), "%s", in->error);
	pthread_mutex_unlock(&in->lock);
	info->postcopy_capable = vblk_pc_state_writable(in->state_path) || dm->disk.ram;
	if (info->postcopy) {
		info->missing = VMIG_MIN(pc_missing_granules(pc) << pc->shift, dm->disk.size);
		info->held_requests = __atomic_load_n(&pc->held, __ATOMIC_RELAXED);
	}
}

void vblk_incoming_free(struct vblk_daemon *dm)
{
	struct vblk_incoming *in = dm->incoming;

	if (!in)
		return;
	if (in->thread_started) {
		eventfd_write(in->stop_fd, 1);
		pthread_mutex_lock(&in->lock);
		if (in->chan)
			vmig__chan_shutdown(in->chan, SHUT_RDWR);
		pthread_mutex_unlock(&in->lock);
		pthread_join(in->thread, NULL);
	}
	if (in->listen_fd >= 0) {
		close(in->listen_fd);
		if (in->unix_path[0])
			unlink(in->unix_path);
	}
	if (in->requester_started)
		pthread_join(in->requester, NULL); /* stop_fd ends it too */
	if (in->stop_fd >= 0)
		close(in->stop_fd);
	if (in->event_fd >= 0)
		close(in->event_fd);
	/* The queues are stopped (shutdown_daemon): nobody reads the map. */
	if (in->state_map)
		munmap(in->state_map, in->state_len);
	else
		free(dm->disk.pc.missing); /* a RAM disk's, or NULL */
	vblk_pcmap_free(&dm->disk.pc);
	pthread_mutex_destroy(&in->lock);
	pthread_mutex_destroy(&in->wlock);
	free(in->staged);
	free(in->buf);
	free(in);
	dm->incoming = NULL;
}
