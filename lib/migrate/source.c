// SPDX-License-Identifier: MIT
/*
 * Outgoing pre-copy migration: the migration thread and the return-path
 * thread of the source.
 *
 * The migration thread connects, sends the RAM block list, starts dirty
 * tracking and copies all of RAM once (the bulk round). It then repeats
 * "sync the dirty bitmap, send the dirty pages" until the time to send what
 * is left at the measured bandwidth fits downtime-limit. Then it stops the
 * vCPUs, sends the last dirty pages, the device state and the memory digest,
 * and waits for the destination to say it is running. If anything fails
 * before that point, the vCPUs are (re)started and the VM carries on here:
 * the source never depends on the destination until the destination runs.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "migrate/migrate_int.h"
#include "ram/bitmap.h"
#include "ram/ram.h"

/* How often (at most) the migration thread publishes statistics. */
#define STATS_PERIOD_NS 100000000ull
#define STATE_MAX (16u << 20)

struct source {
	struct vmig_session *s;
	struct vmig__writer *w;
	struct vmig__dirty *dirty;
	struct vmig__ratelimit rl;
	struct vmig_stats st; /* private working copy, published periodically */
	uint64_t dirty_pages; /* bits set in all dirty bitmaps */
	uint64_t last_pub_ns;
	uint64_t last_pub_bytes;
	uint64_t last_pub_pages;
	uint64_t bandwidth; /* bytes/s, measured */
	uint64_t last_sync_ns;
	bool vm_was_running;
	bool stopped_vm;
};

static uint64_t wire_bytes(struct source *src)
{
	return src->w->bytes + src->w->pending;
}

/* Update the working statistics and publish them every STATS_PERIOD_NS. */
static void stats_tick(struct source *src, bool force)
{
	uint64_t now = vmig__now_ns();
	uint64_t dt = now - src->last_pub_ns;
	uint64_t bytes = wire_bytes(src);

	src->st.ram.transferred = bytes;
	src->st.ram.remaining = src->dirty_pages * VMIG_PAGE_SIZE;
	if (dt < STATS_PERIOD_NS && !force)
		return;
	if (dt >= STATS_PERIOD_NS / 2) {
		uint64_t pages = src->st.ram.normal + src->st.ram.duplicate;

		src->st.ram.mbps = (double)(bytes - src->last_pub_bytes) * 8.0 / ((double)dt / 1e3);
		src->st.ram.pages_per_second =
			(uint64_t)((double)(pages - src->last_pub_pages) * 1e9 / (double)dt);
		src->last_pub_bytes = bytes;
		src->last_pub_pages = pages;
		src->last_pub_ns = now;
	}
	if (src->bandwidth)
		src->st.expected_downtime_ms =
			(int64_t)(src->st.ram.remaining * 1000 / src->bandwidth);
	src->st.total_time_ms = (int64_t)((now - src->s->start_ns) / 1000000);
	vmig__publish(src->s, &src->st);
}

/* Writer throttle: max-bandwidth and cancellation, checked once per flush. */
static int throttle(void *opaque, size_t bytes)
{
	struct source *src = opaque;
	uint64_t wait_ns;

	if (vmig__cancelled(src->s))
		return -ECANCELED;
	wait_ns = vmig__ratelimit_account(&src->rl, (uint64_t)vmig__param(src->s,
									 VMIG_PARAM_MAX_BANDWIDTH),
					  bytes, vmig__now_ns());
	if (wait_ns) {
		struct timespec ts = {.tv_sec = (time_t)(wait_ns / 1000000000ull),
				      .tv_nsec = (long)(wait_ns % 1000000000ull)};
		nanosleep(&ts, NULL);
	}
	return 0;
}

/* Send one run of dirty pages [first, end) of block b, split into zero and
 * non-zero sub-runs. The bits are already cleared. */
static void send_run(struct source *src, unsigned bi, uint64_t first, uint64_t end)
{
	struct vmig__block *b = &src->s->blocks[bi];
	uint64_t i = first;

	while (i < end) {
		bool zero = vmig__page_is_zero(b->host + i * VMIG_PAGE_SIZE);
		uint64_t j = i + 1;

		if (!zero)
			b->page_hash[i] = vmig__page_hash(b->host + i * VMIG_PAGE_SIZE);
		for (; j < end; j++) {
			const uint8_t *p = b->host + j * VMIG_PAGE_SIZE;

			if (vmig__page_is_zero(p) != zero)
				break;
			if (!zero)
				b->page_hash[j] = vmig__page_hash(p);
		}
		if (zero) {
			for (uint64_t k = i; k < j; k++)
				b->page_hash[k] = vmig__zero_page_hash();
			vmig__writer_zero(src->w, bi, i, (uint32_t)(j - i));
			src->st.ram.duplicate += j - i;
		} else {
			vmig__writer_pages(src->w, bi, i, (uint32_t)(j - i),
					   b->host + i * VMIG_PAGE_SIZE);
			src->st.ram.normal += j - i;
			src->st.ram.normal_bytes += (j - i) * VMIG_PAGE_SIZE;
		}
		i = j;
	}
}

/* Send every page whose dirty bit is set, clearing the bits as it goes. */
static int send_dirty(struct source *src)
{
	struct vmig_session *s = src->s;

	for (unsigned bi = 0; bi < s->nblocks; bi++) {
		struct vmig__block *b = &s->blocks[bi];
		uint64_t pfn = vmig__bitmap_find_next(b->dirty, b->npages, 0);

		while (pfn < b->npages) {
			uint64_t end = vmig__bitmap_find_next_zero(b->dirty, b->npages, pfn);

			if (end - pfn > VMIG_REC_MAX_PAGES)
				end = pfn + VMIG_REC_MAX_PAGES;
			vmig__bitmap_clear_range(b->dirty, pfn, end - pfn);
			src->dirty_pages -= end - pfn;
			send_run(src, bi, pfn, end);
			if (src->w->err)
				return src->w->err;
			stats_tick(src, false);
			pfn = vmig__bitmap_find_next(b->dirty, b->npages, end);
		}
	}
	return vmig__writer_flush(src->w);
}

/* Collect pages dirtied since the last sync into the dirty bitmaps. */
static int sync_dirty(struct source *src)
{
	struct vmig_session *s = src->s;
	uint64_t now, added = 0;

	for (unsigned bi = 0; bi < s->nblocks; bi++) {
		struct vmig__block *b = &s->blocks[bi];
		struct vmig__err err = {{0}};
		uint64_t before = vmig__bitmap_count(b->dirty, b->npages);
		uint64_t n = 0;
		int ret = vmig__dirty_sync(src->dirty, bi, b->dirty, &n, &err);

		if (ret) {
			vmig__fail(s, ret, "dirty bitmap sync: %s", err.msg);
			return ret;
		}
		added += vmig__bitmap_count(b->dirty, b->npages) - before;
	}
	src->dirty_pages += added;
	now = vmig__now_ns();
	if (now > src->last_sync_ns)
		src->st.ram.dirty_pages_rate =
			(uint64_t)((double)added * 1e9 / (double)(now - src->last_sync_ns));
	src->last_sync_ns = now;
	src->st.ram.dirty_sync_count++;
	return 0;
}

static void send_blocks(struct source *src)
{
	struct vmig_session *s = src->s;
	uint8_t buf[4 + VMIG_MAX_BLOCKS * (sizeof(struct vmig_wire_block) + VMIG_BLOCK_NAME_MAX)];
	uint32_t count = s->nblocks;
	size_t off = 4;

	memcpy(buf, &count, 4);
	for (unsigned i = 0; i < s->nblocks; i++) {
		struct vmig_wire_block wb = {.name_len = (uint8_t)strlen(s->blocks[i].name),
					     .page_size = VMIG_PAGE_SIZE,
					     .size = s->blocks[i].size};

		memcpy(buf + off, &wb, sizeof(wb));
		off += sizeof(wb);
		memcpy(buf + off, s->blocks[i].name, wb.name_len);
		off += wb.name_len;
	}
	vmig__writer_rec(src->w, VMIG_REC_BLOCKS, buf, (uint32_t)off);
}

/* Return path: wait for the destination's verdict; runs until EOF. */
static void *rp_thread(void *arg)
{
	struct vmig_session *s = arg;
	struct vmig__reader *r = malloc(sizeof(*r));
	struct vmig__err err = {{0}};

	if (!r)
		goto out;
	vmig__reader_init_fd(r, s->fd);
	for (;;) {
		uint8_t type, payload[256];
		size_t len;
		int ret = vmig__rp_read(r, &type, payload, sizeof(payload) - 1, &len, &err);

		if (ret)
			break;
		pthread_mutex_lock(&s->lock);
		if (type == VMIG_RP_RESUMED && len == sizeof(struct vmig_wire_resumed)) {
			struct vmig_wire_resumed res;

			memcpy(&res, payload, sizeof(res));
			s->rp_load_us = res.load_us;
			s->rp_resumed = true;
		} else if (type == VMIG_RP_SYNC_ACK && len == sizeof(struct vmig_wire_sync_ack)) {
			struct vmig_wire_sync_ack ack;

			memcpy(&ack, payload, sizeof(ack));
			s->rp_acked_round = ack.round;
		} else if (type == VMIG_RP_ERROR) {
			payload[len] = '\0';
			vmig__err_set_first(&err, "destination: %s", (char *)payload);
			s->rp_failed = true;
		}
		pthread_cond_broadcast(&s->cond);
		pthread_mutex_unlock(&s->lock);
	}
	free(r);
out:
	pthread_mutex_lock(&s->lock);
	if (!s->rp_resumed) {
		s->rp_failed = true;
		vmig__err_set_first(&err, "destination closed the connection");
		/* Keep the destination's reason for the failure report. */
		if (!s->err.msg[0])
			s->err = err;
	}
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	return NULL;
}

/*
 * Wait until the destination has placed everything up to SYNC round `round`.
 * Called before stopping the vCPUs, so that data still queued in socket
 * buffers drains while the guest runs instead of during downtime.
 */
static int wait_drained(struct vmig_session *s, uint64_t round)
{
	int ret;

	pthread_mutex_lock(&s->lock);
	while (s->rp_acked_round < round && !s->rp_failed && !vmig__cancelled(s))
		pthread_cond_wait(&s->cond, &s->lock);
	ret = s->rp_acked_round >= round ? 0 : -EIO;
	pthread_mutex_unlock(&s->lock);
	return ret;
}

/* Wait until the destination runs (0) or fails (-EIO). */
static int wait_resumed(struct vmig_session *s)
{
	int ret;

	pthread_mutex_lock(&s->lock);
	while (!s->rp_resumed && !s->rp_failed && !vmig__cancelled(s))
		pthread_cond_wait(&s->cond, &s->lock);
	ret = s->rp_resumed ? 0 : -EIO;
	pthread_mutex_unlock(&s->lock);
	return ret;
}

static int digest_record(struct source *src)
{
	struct vmig_session *s = src->s;
	uint64_t *hashes[VMIG_MAX_BLOCKS];
	uint64_t npages[VMIG_MAX_BLOCKS];
	struct vmig_wire_digest d = {0};

	for (unsigned i = 0; i < s->nblocks; i++) {
		hashes[i] = s->blocks[i].page_hash;
		npages[i] = s->blocks[i].npages;
	}
	d.page_digest = vmig__digest_of_hashes(hashes, npages, s->nblocks);
	if (s->caps[VMIG_CAP_VERIFY_MEMORY]) {
		/* Full check, at the cost of downtime: RAM as it is now must equal
		 * what was sent. A mismatch means dirty tracking missed a write. */
		for (unsigned i = 0; i < s->nblocks; i++) {
			struct vmig__block *b = &s->blocks[i];

			for (uint64_t p = 0; p < b->npages; p++) {
				if (vmig__page_hash(b->host + p * VMIG_PAGE_SIZE) != b->page_hash[p]) {
					vmig__fail(s, -EIO,
						   "RAM block '%s' page %llu changed after it was "
						   "last sent: dirty tracking missed a write",
						   b->name, (unsigned long long)p);
					return -EIO;
				}
			}
		}
		d.flags |= VMIG_DIGEST_F_MEMORY;
		d.mem_digest = d.page_digest;
	}
	vmig__writer_rec(src->w, VMIG_REC_DIGEST, &d, sizeof(d));
	return 0;
}

/* Stop the VM, send the rest, and hand over. */
static int switch_over(struct source *src)
{
	struct vmig_session *s = src->s;
	uint64_t stop_ns = vmig__now_ns();
	uint64_t before = wire_bytes(src);
	void *state = NULL;
	size_t state_len = 0;
	int ret;

	ret = s->ops.stop(s->opaque);
	if (ret) {
		vmig__fail(s, ret, "cannot stop the vCPUs");
		return ret;
	}
	src->stopped_vm = true;
	vmig__emit(s, VMIG_EVENT_STOPPED);
	ret = sync_dirty(src);
	if (ret)
		return ret;
	ret = send_dirty(src);
	if (ret)
		goto err_io;
	state = malloc(STATE_MAX);
	if (!state) {
		vmig__fail(s, -ENOMEM, "out of memory for device state");
		return -ENOMEM;
	}
	ret = s->ops.save_state(s->opaque, state, STATE_MAX, &state_len);
	if (ret || state_len > STATE_MAX) {
		free(state);
		vmig__fail(s, ret ? ret : -EOVERFLOW, "saving device state failed");
		return ret ? ret : -EOVERFLOW;
	}
	vmig__writer_rec(src->w, VMIG_REC_STATE, state, (uint32_t)state_len);
	free(state);
	ret = digest_record(src);
	if (ret)
		return ret;
	vmig__writer_rec(src->w, VMIG_REC_EOS, NULL, 0);
	ret = vmig__writer_flush(src->w);
	if (ret)
		goto err_io;
	src->st.ram.downtime_bytes = wire_bytes(src) - before;
	ret = wait_resumed(s);
	if (ret) {
		vmig__fail(s, ret, "destination did not start: %s",
			   s->err.msg[0] ? s->err.msg : "no reply");
		return ret;
	}
	src->st.downtime_us = (vmig__now_ns() - stop_ns) / 1000;
	src->st.downtime_ms = (int64_t)((src->st.downtime_us + 500) / 1000);
	return 0;
err_io:
	vmig__fail(s, ret, "sending to the destination failed");
	return ret;
}

static int setup(struct source *src)
{
	struct vmig_session *s = src->s;
	struct vmig__uri u;
	struct vmig__err err = {{0}};
	int fd, ret;

	ret = vmig__uri_parse(s->uri, &u, &err);
	if (!ret)
		ret = vmig__chan_connect(&u, &fd, &err);
	if (ret) {
		vmig__fail(s, ret, "%s", err.msg);
		return ret;
	}
	pthread_mutex_lock(&s->lock);
	s->fd = fd;
	pthread_mutex_unlock(&s->lock);
	if (vmig__cancelled(s)) /* cancelled while connecting */
		return -ECANCELED;
	vmig__writer_init(src->w, fd);
	src->w->throttle = throttle;
	src->w->throttle_opaque = src;
	vmig__writer_preamble(src->w);
	send_blocks(src);
	ret = vmig__writer_flush(src->w);
	if (ret) {
		vmig__fail(s, ret, "sending to the destination failed");
		return ret;
	}
	ret = pthread_create(&s->rp_thread, NULL, rp_thread, s);
	if (ret) {
		vmig__fail(s, -ret, "cannot start the return-path thread");
		return -ret;
	}
	s->rp_started = true;

	ret = vmig__dirty_open(&src->dirty,
			       (enum vmig_dirty_tracking)vmig__param(s, VMIG_PARAM_DIRTY_TRACKING),
			       &err);
	for (unsigned i = 0; !ret && i < s->nblocks; i++)
		ret = vmig__dirty_add_range(src->dirty, s->blocks[i].host, s->blocks[i].size, &err);
	if (!ret)
		ret = vmig__dirty_start(src->dirty, &err);
	if (ret) {
		vmig__fail(s, ret, "dirty tracking: %s", err.msg);
		return ret;
	}
	/* Bulk round: everything is dirty. */
	for (unsigned i = 0; i < s->nblocks; i++) {
		vmig__bitmap_set_range(s->blocks[i].dirty, 0, s->blocks[i].npages);
		src->dirty_pages += s->blocks[i].npages;
	}
	src->last_sync_ns = vmig__now_ns();
	return 0;
}

/* Pre-copy rounds until the rest fits in downtime-limit. */
static int iterate(struct source *src)
{
	struct vmig_session *s = src->s;

	for (;;) {
		uint64_t t0 = vmig__now_ns(), b0 = wire_bytes(src);
		uint64_t dt, limit_ms, expected_ms;
		struct vmig_wire_sync sy;
		int ret = send_dirty(src);

		if (ret) {
			vmig__fail(s, ret, "sending to the destination failed");
			return ret;
		}
		dt = vmig__now_ns() - t0;
		/* Bandwidth of this round; short rounds are too noisy to use, so
		 * they fall back to the average since the start. */
		if (dt > 5000000ull && wire_bytes(src) > b0)
			src->bandwidth = (uint64_t)((double)(wire_bytes(src) - b0) * 1e9 / (double)dt);
		else if (!src->bandwidth)
			src->bandwidth = (uint64_t)((double)wire_bytes(src) * 1e9 /
						    (double)(vmig__now_ns() - s->start_ns + 1));
		ret = sync_dirty(src);
		if (ret)
			return ret;
		sy.round = src->st.ram.dirty_sync_count;
		sy.dirty_pages = src->dirty_pages;
		vmig__writer_rec(src->w, VMIG_REC_SYNC, &sy, sizeof(sy));
		stats_tick(src, true);
		limit_ms = (uint64_t)vmig__param(s, VMIG_PARAM_DOWNTIME_LIMIT);
		expected_ms = src->bandwidth ? src->dirty_pages * VMIG_PAGE_SIZE * 1000 / src->bandwidth
					     : (src->dirty_pages ? UINT64_MAX : 0);
		if (expected_ms <= limit_ms) {
			ret = vmig__writer_flush(src->w);
			if (!ret)
				ret = wait_drained(s, sy.round);
			if (ret)
				vmig__fail(s, ret, "destination stopped acknowledging the stream");
			return ret;
		}
		if (vmig__cancelled(s)) {
			vmig__fail(s, -ECANCELED, "migration cancelled");
			return -ECANCELED;
		}
	}
}

/* After failure or cancel: keep the VM running here, as it was. */
static void recover_source(struct source *src)
{
	struct vmig_session *s = src->s;

	if (src->dirty)
		vmig__dirty_stop(src->dirty);
	if (src->stopped_vm && src->vm_was_running) {
		s->ops.start(s->opaque);
		vmig__emit(s, VMIG_EVENT_RESUMED);
	}
}

static void teardown(struct source *src)
{
	struct vmig_session *s = src->s;
	int fd;

	pthread_mutex_lock(&s->lock);
	fd = s->fd;
	if (fd >= 0)
		shutdown(fd, SHUT_RDWR);
	pthread_mutex_unlock(&s->lock);
	if (s->rp_started) {
		pthread_join(s->rp_thread, NULL);
		s->rp_started = false;
	}
	pthread_mutex_lock(&s->lock);
	s->fd = -1;
	pthread_mutex_unlock(&s->lock);
	if (fd >= 0)
		close(fd);
	if (src->dirty) {
		vmig__dirty_stop(src->dirty);
		vmig__dirty_close(src->dirty);
	}
}

void *vmig__source_thread(void *arg)
{
	struct vmig_session *s = arg;
	struct source src = {.s = s};
	int ret;

	src.w = malloc(sizeof(*src.w));
	if (!src.w) {
		vmig__fail(s, -ENOMEM, "out of memory");
		return NULL;
	}
	src.vm_was_running = s->ops.running ? s->ops.running(s->opaque) : true;
	src.last_pub_ns = s->start_ns;
	src.st.ram.page_size = VMIG_PAGE_SIZE;
	src.st.ram.total = s->stats.ram.total;
	ret = setup(&src);
	if (!ret) {
		src.st.setup_time_ms = (int64_t)((vmig__now_ns() - s->start_ns) / 1000000);
		vmig__set_status(s, VMIG_STATUS_ACTIVE);
		ret = iterate(&src);
	}
	if (!ret) {
		src.st.ram.precopy_bytes = wire_bytes(&src);
		ret = switch_over(&src);
	}
	if (ret) {
		if (vmig__cancelled(s))
			vmig__fail(s, -ECANCELED, "migration cancelled");
		recover_source(&src);
	}
	stats_tick(&src, true);
	src.st.ram.remaining = ret ? src.st.ram.remaining : 0;
	src.st.expected_downtime_ms = 0;
	src.st.total_time_ms = (int64_t)((vmig__now_ns() - s->start_ns) / 1000000);
	vmig__publish(s, &src.st);
	/* The destination runs: report that now, then release what is left
	 * (unprotecting a large guest takes a while and is not downtime). */
	if (!ret)
		vmig__set_status(s, VMIG_STATUS_COMPLETED);
	teardown(&src);
	free(src.w);
	return NULL;
}
