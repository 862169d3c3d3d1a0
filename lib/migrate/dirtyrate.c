// SPDX-License-Identifier: MIT
/*
 * QEMU's calc-dirty-rate: how fast the guest dirties its memory, before
 * deciding how (or whether) to migrate it. Two of QEMU's modes (dirty-ring
 * needs KVM's dirty ring):
 *
 *  - page-sampling: hash a random sample of pages (sample-pages per GiB of
 *    each block) at the start, again at the end; the rate is the share of
 *    samples that changed, times the size of RAM, over the time.
 *  - dirty-bitmap: the dirty tracker of pre-copy over all of RAM for the
 *    period; the rate is the pages it reports, over the time. Not during a
 *    migration, whose own tracker holds the memory.
 *
 * Threads: the control thread starts a measurement and joins the previous
 * one; the measurement runs on its own thread, which writes s->dr under
 * s->lock. Guest RAM is read without a lock, as the migration reads it.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "migrate/migrate_int.h"
#include "ram/ram.h"

#define CALC_MIN_MS 1000
#define CALC_MAX_MS 60000
#define SAMPLE_MIN 128
#define SAMPLE_MAX 16384
#define SAMPLE_DEFAULT 512

struct sample {
	unsigned block;
	uint64_t page;
	uint64_t hash;
};

/* Sleep ms in slices, ending early if the session goes away. */
static bool wait_period(struct vmig_session *s, int64_t ms)
{
	uint64_t end = vmig__now_ns() + (uint64_t)ms * 1000000ull;

	while (!__atomic_load_n(&s->dr_stop, __ATOMIC_ACQUIRE)) {
		uint64_t now = vmig__now_ns();
		struct timespec ts = {0, 10000000};

		if (now >= end)
			return true;
		if (end - now < 10000000ull)
			ts.tv_nsec = (long)(end - now);
		nanosleep(&ts, NULL);
	}
	return false;
}

static uint64_t next_random(uint64_t *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 7;
	*x ^= *x << 17;
	return *x;
}

/* The rate in MB/s (MiB, as QEMU) of `bytes` over ms. */
static int64_t rate_of(double bytes, uint64_t ns)
{
	return (int64_t)(bytes / (1 << 20) / ((double)ns / 1e9) + 0.5);
}

static int by_sampling(struct vmig_session *s, int64_t ms, uint64_t per_gib, int64_t *rate)
{
	uint64_t n = 0, total = 0, changed = 0, x, t0;
	struct sample *v;

	if (getrandom(&x, sizeof(x), 0) != sizeof(x) || !x)
		x = vmig__now_ns() | 1;
	for (unsigned b = 0; b < s->nblocks; b++)
		n += VMIG_MAX(1, per_gib * s->blocks[b].size >> 30);
	v = calloc(n, sizeof(*v));
	if (!v)
		return -ENOMEM;
	n = 0;
	for (unsigned b = 0; b < s->nblocks; b++) {
		struct vmig__block *blk = &s->blocks[b];

		total += blk->size;
		for (uint64_t k = VMIG_MAX(1, per_gib * blk->size >> 30); k > 0; k--, n++) {
			v[n].block = b;
			v[n].page = next_random(&x) % blk->npages;
			v[n].hash = vmig__page_hash(blk->host + v[n].page * VMIG_PAGE_SIZE);
		}
	}
	t0 = vmig__now_ns();
	if (!wait_period(s, ms)) {
		free(v);
		return -ECANCELED;
	}
	for (uint64_t i = 0; i < n; i++)
		changed += vmig__page_hash(s->blocks[v[i].block].host +
					   v[i].page * VMIG_PAGE_SIZE) != v[i].hash;
	*rate = rate_of((double)changed / (double)n * (double)total, vmig__now_ns() - t0);
	free(v);
	return 0;
}

static int by_bitmap(struct vmig_session *s, int64_t ms, int64_t *rate)
{
	struct vmig__err err = {{0}};
	struct vmig__dirty *d;
	uint64_t dirty = 0, t0;
	bool started;
	int ret = vmig__dirty_open(
	    &d, (enum vmig_dirty_tracking)vmig__param(s, VMIG_PARAM_DIRTY_TRACKING), &err);

	if (ret)
		return ret;
	for (unsigned b = 0; !ret && b < s->nblocks; b++)
		ret = vmig__dirty_add_range(d, s->blocks[b].host, s->blocks[b].size, &err);
	if (!ret)
		ret = vmig__dirty_start(d, &err);
	started = !ret;
	t0 = vmig__now_ns();
	if (!ret && !wait_period(s, ms))
		ret = -ECANCELED;
	for (unsigned b = 0; !ret && b < s->nblocks; b++) {
		uint64_t *map = calloc(vmig__bitmap_words(s->blocks[b].npages), sizeof(uint64_t));
		uint64_t count = 0;

		ret = map ? vmig__dirty_sync(d, b, map, &count, &err) : -ENOMEM;
		dirty += count;
		free(map);
	}
	if (!ret)
		*rate = rate_of((double)dirty * VMIG_PAGE_SIZE, vmig__now_ns() - t0);
	if (started) /* the vCPUs get their speed back */
		vmig__dirty_stop(d);
	vmig__dirty_close(d);
	return ret;
}

static void *dr_main(void *arg)
{
	struct vmig_session *s = arg;
	int64_t rate = 0;
	int ret;

	ret = s->dr.mode == VMIG_DIRTY_RATE_DIRTY_BITMAP
		  ? by_bitmap(s, s->dr.calc_time_ms, &rate)
		  : by_sampling(s, s->dr.calc_time_ms, s->dr.sample_pages, &rate);
	pthread_mutex_lock(&s->lock);
	/* A failed measurement (no memory, no tracker) reports what QEMU
	 * reports for one that measured nothing: status measured, rate 0. */
	s->dr.dirty_rate = ret ? 0 : rate;
	s->dr.status = VMIG_DIRTY_RATE_MEASURED;
	pthread_mutex_unlock(&s->lock);
	return NULL;
}

void vmig__dirty_rate_stop(struct vmig_session *s)
{
	__atomic_store_n(&s->dr_stop, true, __ATOMIC_RELEASE);
	if (s->dr_started)
		pthread_join(s->dr_thread, NULL);
	s->dr_started = false;
}

VMIG_EXPORT int vmig_calc_dirty_rate(vmig_session *s, int64_t calc_time_ms,
				     enum vmig_dirty_rate_mode mode, uint64_t sample_pages)
{
	bool busy;
	int ret;

	if (!s)
		return -EINVAL;
	if (calc_time_ms < CALC_MIN_MS || calc_time_ms > CALC_MAX_MS) {
		vmig__err_set(&s->api_err, "calc-time is out of range [%d, %d] seconds",
			      CALC_MIN_MS / 1000, CALC_MAX_MS / 1000);
		return -ERANGE;
	}
	if (mode != VMIG_DIRTY_RATE_PAGE_SAMPLING && mode != VMIG_DIRTY_RATE_DIRTY_BITMAP) {
		vmig__err_set(&s->api_err, "unknown dirty-rate mode");
		return -EINVAL;
	}
	if (mode == VMIG_DIRTY_RATE_PAGE_SAMPLING && !sample_pages)
		sample_pages = SAMPLE_DEFAULT;
	if (mode == VMIG_DIRTY_RATE_PAGE_SAMPLING &&
	    (sample_pages < SAMPLE_MIN || sample_pages > SAMPLE_MAX)) {
		vmig__err_set(&s->api_err, "sample-pages is out of range [%d, %d]", SAMPLE_MIN,
			      SAMPLE_MAX);
		return -ERANGE;
	}
	if (mode != VMIG_DIRTY_RATE_PAGE_SAMPLING && sample_pages) {
		vmig__err_set(&s->api_err, "sample-pages is used only in page-sampling mode");
		return -EINVAL;
	}
	if (!s->nblocks) {
		vmig__err_set(&s->api_err, "no guest RAM registered");
		return -EINVAL;
	}
	if (mode == VMIG_DIRTY_RATE_DIRTY_BITMAP && vmig__migration_running(s)) {
		vmig__err_set(&s->api_err,
			      "dirty-bitmap mode cannot measure during a migration, "
			      "whose dirty tracking holds guest RAM; use page-sampling");
		return -EBUSY;
	}
	pthread_mutex_lock(&s->lock);
	busy = s->dr.status == VMIG_DIRTY_RATE_MEASURING;
	pthread_mutex_unlock(&s->lock);
	if (busy) {
		vmig__err_set(&s->api_err, "the dirty rate is already being measured");
		return -EBUSY;
	}
	if (s->dr_started) /* finished: collect its thread */
		pthread_join(s->dr_thread, NULL);
	s->dr_started = false;
	pthread_mutex_lock(&s->lock);
	s->dr = (struct vmig_dirty_rate){
	    .status = VMIG_DIRTY_RATE_MEASURING,
	    .mode = mode,
	    .start_time = (int64_t)time(NULL),
	    .calc_time_ms = calc_time_ms,
	    .sample_pages = mode == VMIG_DIRTY_RATE_PAGE_SAMPLING ? sample_pages : 0};
	pthread_mutex_unlock(&s->lock);
	ret = pthread_create(&s->dr_thread, NULL, dr_main, s);
	if (ret) {
		pthread_mutex_lock(&s->lock);
		s->dr.status = VMIG_DIRTY_RATE_UNSTARTED;
		pthread_mutex_unlock(&s->lock);
		vmig__err_set(&s->api_err, "cannot start the measurement: %s", strerror(ret));
		return -ret;
	}
	pthread_setname_np(s->dr_thread, "vmig-dirtyrate");
	s->dr_started = true;
	return 0;
}

VMIG_EXPORT int vmig_query_dirty_rate(vmig_session *s, struct vmig_dirty_rate *out)
{
	if (!s || !out)
		return -EINVAL;
	pthread_mutex_lock(&s->lock);
	*out = s->dr;
	pthread_mutex_unlock(&s->lock);
	return 0;
}
