// SPDX-License-Identifier: MIT
/*
 * Incoming migration: the destination's migration thread. It waits for the
 * source to connect, loads records into guest RAM, checks the memory digest,
 * loads the device state, starts the vCPUs (unless told not to) and tells
 * the source it is running.
 *
 * A bad, truncated or hostile stream fails this migration with a message in
 * error-desc; the process and its control interface carry on, and the
 * source, which has not handed over yet, keeps running.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "migrate/migrate_int.h"
#include "ram/bitmap.h"

/*
 * Guest RAM on the destination is defined by the stream alone. Drop what the
 * blocks hold now (a fresh VM holds zeros, an earlier failed attempt may
 * have left pages), so zero-page records need not touch untouched pages.
 */
static int reset_ram(struct vmig_session *s, struct vmig__load_block *lb)
{
	uint64_t zh = vmig__zero_page_hash();

	for (unsigned i = 0; i < s->nblocks; i++) {
		struct vmig__block *b = &s->blocks[i];
		int ret = 0;

		if (b->fd >= 0)
			ret = fallocate(b->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
					(off_t)b->fd_offset, (off_t)b->size);
		else if (madvise(b->host, b->size, MADV_REMOVE)) /* shared anonymous */
			ret = madvise(b->host, b->size, MADV_DONTNEED); /* private */
		if (ret)
			memset(b->host, 0, b->size);
		memset(b->received, 0, vmig__bitmap_words(b->npages) * sizeof(uint64_t));
		for (uint64_t p = 0; p < b->npages; p++)
			b->page_hash[p] = zh;
		strcpy(lb[i].name, b->name);
		lb[i].host = b->host;
		lb[i].size = b->size;
		lb[i].npages = b->npages;
		lb[i].page_hash = b->page_hash;
		lb[i].received = b->received;
	}
	return 0;
}

static void send_rp(int fd, uint8_t type, const void *payload, uint32_t len)
{
	struct vmig_wire_rec rec = {.type = type, .len = len};
	struct iovec iov[2] = {{&rec, sizeof(rec)}, {(void *)payload, len}};

	/* Best effort: the source may already be gone. */
	vmig__writev_full(fd, iov, len ? 2 : 1);
}

static void send_rp(int fd, uint8_t type, const void *payload, uint32_t len);

static void publish_progress(struct vmig_session *s, struct vmig__loader *l, bool force,
			     uint64_t *last_ns, uint64_t *last_bytes)
{
	uint64_t now = vmig__now_ns();
	struct vmig_stats st;

	if (!force && now - *last_ns < 100000000ull)
		return;
	pthread_mutex_lock(&s->lock);
	st = s->stats;
	pthread_mutex_unlock(&s->lock);
	st.ram.transferred = l->r->bytes;
	st.ram.normal = l->pages_normal;
	st.ram.normal_bytes = l->pages_normal * VMIG_PAGE_SIZE;
	st.ram.duplicate = l->pages_zero;
	st.ram.dirty_sync_count = l->rounds;
	if (now > *last_ns)
		st.ram.mbps = (double)(l->r->bytes - *last_bytes) * 8.0 / ((double)(now - *last_ns) / 1e3);
	st.total_time_ms = (int64_t)((now - s->start_ns) / 1000000);
	*last_ns = now;
	*last_bytes = l->r->bytes;
	vmig__publish(s, &st);
}

/* Load records until EOS; returns 0 with the stream fully loaded. */
static int load_stream(struct vmig_session *s, struct vmig__loader *l)
{
	uint64_t last_ns = vmig__now_ns(), last_bytes = 0;
	int ret = vmig__load_preamble(l);

	if (ret)
		return ret;
	vmig__set_status(s, VMIG_STATUS_ACTIVE);
	while (!l->eos) {
		uint8_t type;

		if (vmig__cancelled(s))
			return -ECANCELED;
		ret = vmig__load_record(l, &type);
		if (ret)
			return ret;
		if (type == VMIG_REC_SYNC) {
			struct vmig_wire_sync_ack ack = {.round = l->last_round};

			send_rp(s->fd, VMIG_RP_SYNC_ACK, &ack, sizeof(ack));
		}
		publish_progress(s, l, false, &last_ns, &last_bytes);
	}
	publish_progress(s, l, true, &last_ns, &last_bytes);
	return 0;
}

static int finish(struct vmig_session *s, struct vmig__loader *l, uint64_t eos_ns)
{
	struct vmig_wire_resumed res;
	int ret = vmig__load_verify(l);

	if (ret)
		return ret;
	ret = s->ops.load_state(s->opaque, l->state, l->state_len);
	if (ret) {
		vmig__err_set_first(l->err, "loading device state failed (%s)", strerror(-ret));
		return ret;
	}
	if (s->autostart) {
		ret = s->ops.start(s->opaque);
		if (ret) {
			vmig__err_set_first(l->err, "cannot start the vCPUs (%s)", strerror(-ret));
			return ret;
		}
		vmig__emit(s, VMIG_EVENT_RESUMED);
	}
	res.load_us = (vmig__now_ns() - eos_ns) / 1000;
	send_rp(s->fd, VMIG_RP_RESUMED, &res, sizeof(res));
	return 0;
}

static int accept_source(struct vmig_session *s)
{
	struct vmig__err err = {{0}};
	int fd, ret = vmig__chan_accept(s->listen_fd, s->cancel_efd, &fd, &err);

	/* One migration per migrate-incoming, as in QEMU. */
	close(s->listen_fd);
	s->listen_fd = -1;
	if (ret) {
		vmig__fail(s, ret, "%s", ret == -ECANCELED ? "migration cancelled" : err.msg);
		return ret;
	}
	pthread_mutex_lock(&s->lock);
	s->fd = fd;
	pthread_mutex_unlock(&s->lock);
	return 0;
}

void *vmig__dest_thread(void *arg)
{
	struct vmig_session *s = arg;
	struct vmig__load_block lb[VMIG_MAX_BLOCKS];
	struct vmig__err err = {{0}};
	struct vmig__reader *r = NULL;
	struct vmig__loader l = {0};
	int ret, fd;

	ret = accept_source(s);
	if (ret)
		return NULL;
	r = malloc(sizeof(*r));
	if (!r) {
		vmig__fail(s, -ENOMEM, "out of memory");
		goto out;
	}
	vmig__reader_init_fd(r, s->fd);
	reset_ram(s, lb);
	l.r = r;
	l.blocks = lb;
	l.nblocks = s->nblocks;
	l.err = &err;
	ret = load_stream(s, &l);
	if (!ret)
		ret = finish(s, &l, vmig__now_ns());
	if (ret) {
		if (!err.msg[0])
			vmig__err_set(&err, "%s", strerror(-ret));
		if (!vmig__cancelled(s))
			send_rp(s->fd, VMIG_RP_ERROR, err.msg, (uint32_t)strlen(err.msg));
		vmig__fail(s, 0, "%s",
			   ret == -ECANCELED ? "migration cancelled" : err.msg);
	}
	vmig__loader_release(&l);
	free(r);
out:
	pthread_mutex_lock(&s->lock);
	fd = s->fd;
	s->fd = -1;
	pthread_mutex_unlock(&s->lock);
	if (fd >= 0) {
		/* Let the source read our last message before the FIN. */
		shutdown(fd, SHUT_WR);
		close(fd);
	}
	if (!ret)
		vmig__set_status(s, VMIG_STATUS_COMPLETED);
	return NULL;
}
