// SPDX-License-Identifier: MIT
/*
 * vCPU threads and workloads of the reference guest (see guest.h for the
 * memory layout and the page self-check).
 *
 * Each vCPU owns the workload pages whose index is congruent to its id
 * modulo the vCPU count, so no two vCPUs write one page and each can check
 * a page against the table entry it wrote last. A vCPU stops only between
 * two page updates (page, then table entry), so a stopped guest's memory is
 * always self-consistent: that is what migration must carry over.
 */
#include <errno.h>
#include <stdio.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "guest.h"

#define GUEST_MAGIC 0x56474d4956474d56ull /* header of page 0 */
#define PAGE_MAGIC 0x5047u                /* high 16 bits of a written page's word 0 */
#define STATE_MAGIC 0x3155504356474d56ull
/* hotset: this share of the writes goes to the first 1/HOTSET_DIVISOR of the
 * working set, the rest anywhere in it (tests/interop/guest/dirtier.c too). */
#define HOTSET_PERCENT 90
#define HOTSET_DIVISOR 16
#define BATCH_NS 1000000ull /* a vCPU checks for stop at least this often */
/* A throttled vCPU runs this long, then sleeps its share (QEMU's timeslice). */
#define THROTTLE_SLICE_NS 10000000ull

struct vcpu_state {
	uint64_t rng;
	uint64_t cursor; /* stream: next index into the owned working set */
};

struct vcpu {
	struct guest *g;
	unsigned id;
	int tid; /* Linux thread id, set by the thread before it first parks */
	bool parked; /* under g->lock */
	pthread_t thread;
	struct vcpu_state st;
};

struct guest {
	uint8_t *ram;
	uint64_t npages;
	uint64_t meta_pages;
	uint32_t *table; /* in guest RAM */
	struct vm_config cfg;
	uint64_t wss_pages; /* set at create, read-only after */
	uint64_t hot_pages; /* hotset: its hot part; read-only after create */

	pthread_mutex_t lock;
	pthread_cond_t run_cond;  /* vCPUs wait here: start, stop, quit */
	pthread_cond_t park_cond; /* stop and create wait here for vCPUs to park */
	bool run;  /* under lock; read atomically by vCPUs between pages */
	bool quit; /* under lock */
	unsigned parked;

	uint64_t pages_written; /* atomics */
	uint64_t pages_verified;
	uint64_t inconsistencies;

	unsigned throttle; /* atomic: percent of the time vCPUs sleep (auto-converge) */

	/* Set once before the guest first runs: is vCPU i blocked on a page
	 * that has not arrived (post-copy)? */
	bool (*blocked)(void *opaque, unsigned vcpu);
	void *blocked_opaque;

	unsigned nvcpus;
	struct vcpu *vcpus;
};

static uint64_t xorshift(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

static uint64_t pattern(uint64_t pfn, uint64_t seq, uint64_t i)
{
	uint64_t x = (pfn << 32 ^ seq) * 0x9e3779b97f4a7c15ull + i * 0xbf58476d1ce4e5b9ull;

	return x ^ (x >> 29);
}

static void page_write(uint8_t *page, uint64_t pfn, uint32_t seq)
{
	uint64_t *w = (uint64_t *)page;

	w[0] = (uint64_t)PAGE_MAGIC << 48 | pfn;
	w[1] = seq;
	for (uint64_t i = 2; i < VMIG_PAGE_SIZE / 8; i++)
		w[i] = pattern(pfn, seq, i);
}

static bool page_check(const uint8_t *page, uint64_t pfn, uint32_t seq)
{
	const uint64_t *w = (const uint64_t *)page;

	if (w[0] != ((uint64_t)PAGE_MAGIC << 48 | pfn) || w[1] != seq)
		return false;
	for (uint64_t i = 2; i < VMIG_PAGE_SIZE / 8; i++)
		if (w[i] != pattern(pfn, seq, i))
			return false;
	return true;
}

/* Overwrite workload page pfn after checking what it holds. */
static void touch_page(struct guest *g, uint64_t pfn)
{
	uint8_t *page = g->ram + pfn * VMIG_PAGE_SIZE;
	uint32_t seq = g->table[pfn];

	if (seq) {
		if (page_check(page, pfn, seq))
			__atomic_add_fetch(&g->pages_verified, 1, __ATOMIC_RELAXED);
		else
			__atomic_add_fetch(&g->inconsistencies, 1, __ATOMIC_RELAXED);
	}
	seq = seq + 1 ? seq + 1 : 1;
	page_write(page, pfn, seq);
	g->table[pfn] = seq;
	__atomic_add_fetch(&g->pages_written, 1, __ATOMIC_RELAXED);
}

/* Owned workload pages of a vCPU within the first span pages of workload memory. */
static uint64_t owned(struct guest *g, unsigned id, uint64_t span)
{
	return span > id ? (span - id + g->nvcpus - 1) / g->nvcpus : 0;
}

static uint64_t owned_pfn(struct guest *g, unsigned id, uint64_t k)
{
	return g->meta_pages + k * g->nvcpus + id;
}

static uint64_t next_page(struct vcpu *v)
{
	struct guest *g = v->g;
	uint64_t wss = owned(g, v->id, g->wss_pages);

	switch (g->cfg.workload) {
	case VM_WL_STREAM:
		if (v->st.cursor >= wss)
			v->st.cursor = 0;
		return owned_pfn(g, v->id, v->st.cursor++);
	case VM_WL_HOTSET:
		if (xorshift(&v->st.rng) % 100 < HOTSET_PERCENT)
			return owned_pfn(g, v->id,
					 xorshift(&v->st.rng) % owned(g, v->id, g->hot_pages));
		return owned_pfn(g, v->id, xorshift(&v->st.rng) % wss);
	default: /* random: uniform over the working set */
		return owned_pfn(g, v->id, xorshift(&v->st.rng) % wss);
	}
}

static bool running(struct guest *g)
{
	return __atomic_load_n(&g->run, __ATOMIC_ACQUIRE);
}

/* Park while stopped; returns false when the guest is being destroyed. */
static bool wait_runnable(struct vcpu *v)
{
	struct guest *g = v->g;
	bool quit;

	pthread_mutex_lock(&g->lock);
	while (!g->run && !g->quit) {
		g->parked++;
		v->parked = true;
		/* Only the controller listens here: waking the other parked
		 * vCPUs would make them wake each other forever. */
		pthread_cond_broadcast(&g->park_cond);
		pthread_cond_wait(&g->run_cond, &g->lock);
		v->parked = false;
		g->parked--;
	}
	quit = g->quit;
	pthread_mutex_unlock(&g->lock);
	return !quit;
}

/* Sleep up to ns, waking early on stop or quit. */
static void pace(struct guest *g, uint64_t ns)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_nsec += (long)ns;
	ts.tv_sec += ts.tv_nsec / 1000000000;
	ts.tv_nsec %= 1000000000;
	pthread_mutex_lock(&g->lock);
	if (g->run && !g->quit)
		pthread_cond_timedwait(&g->run_cond, &g->lock, &ts);
	pthread_mutex_unlock(&g->lock);
}

/*
 * The throttle, as QEMU's: once a vCPU has run for a timeslice, it sleeps so
 * that sleep / (run + sleep) is the throttle percentage. *ran counts the
 * time run since the last sleep.
 */
static void throttle_point(struct guest *g, uint64_t *ran)
{
	unsigned pct = __atomic_load_n(&g->throttle, __ATOMIC_RELAXED);

	if (!pct) {
		*ran = 0;
		return;
	}
	if (*ran < THROTTLE_SLICE_NS)
		return;
	pace(g, *ran * pct / (100 - pct));
	*ran = 0;
}

static void *vcpu_main(void *arg)
{
	struct vcpu *v = arg;
	struct guest *g = v->g;
	/* Pages per second for this vCPU; 0 = as fast as it can. */
	double rate = (double)g->cfg.dirty_rate / VMIG_PAGE_SIZE / g->nvcpus;
	uint64_t t0 = 0, done = 0, ran = 0;

	__atomic_store_n(&v->tid, (int)gettid(), __ATOMIC_RELEASE);

	while (wait_runnable(v)) {
		uint64_t now = vmig__now_ns(), due;

		if (g->cfg.workload == VM_WL_IDLE || g->npages <= g->meta_pages) {
			pace(g, 100000000ull);
			continue;
		}
		if (!t0 || now - t0 > 1000000000ull) { /* restart pacing after a stop */
			t0 = now;
			done = 0;
		}
		due = rate > 0 ? (uint64_t)(rate * (double)(now - t0) / 1e9) : done + 64;
		while (done < due && running(g)) {
			touch_page(g, next_page(v));
			done++;
			if (vmig__now_ns() - now > BATCH_NS)
				break;
		}
		ran += vmig__now_ns() - now;
		throttle_point(g, &ran);
		if (rate > 0)
			pace(g, BATCH_NS);
	}
	return NULL;
}

static void init_layout(struct guest *g)
{
	uint64_t *hdr = (uint64_t *)g->ram;

	memset(g->ram, 0, g->meta_pages * VMIG_PAGE_SIZE);
	hdr[0] = GUEST_MAGIC;
	hdr[1] = g->npages;
	hdr[2] = g->meta_pages;
}

int guest_create(struct guest **out, uint8_t *ram, uint64_t ram_size, const struct vm_config *cfg,
		 bool fresh, struct vmig__err *err)
{
	struct guest *g = calloc(1, sizeof(*g));
	unsigned i;

	if (!g)
		return -ENOMEM;
	g->ram = ram;
	g->npages = ram_size / VMIG_PAGE_SIZE;
	g->meta_pages = 1 + VMIG_DIV_ROUND_UP(g->npages * sizeof(uint32_t), VMIG_PAGE_SIZE);
	if (g->meta_pages + cfg->vcpus > g->npages) {
		vmig__err_set(err, "guest memory too small for %u vCPUs", cfg->vcpus);
		free(g);
		return -EINVAL;
	}
	g->table = (uint32_t *)(ram + VMIG_PAGE_SIZE);
	g->cfg = *cfg;
	g->nvcpus = cfg->vcpus;
	g->wss_pages = cfg->wss_bytes / VMIG_PAGE_SIZE;
	if (!g->wss_pages || g->wss_pages > g->npages - g->meta_pages)
		g->wss_pages = g->npages - g->meta_pages;
	if (g->wss_pages < g->nvcpus)
		g->wss_pages = g->nvcpus;
	g->hot_pages = g->wss_pages / HOTSET_DIVISOR;
	if (g->hot_pages < g->nvcpus)
		g->hot_pages = g->nvcpus;
	if (fresh)
		init_layout(g);
	pthread_mutex_init(&g->lock, NULL);
	pthread_cond_init(&g->run_cond, NULL);
	pthread_cond_init(&g->park_cond, NULL);
	g->vcpus = calloc(g->nvcpus, sizeof(*g->vcpus));
	if (!g->vcpus)
		goto err_free;
	for (i = 0; i < g->nvcpus; i++) {
		struct vcpu *v = &g->vcpus[i];

		v->g = g;
		v->id = i;
		v->st.rng = (cfg->seed ? cfg->seed : 0x243f6a8885a308d3ull) * (2 * i + 1) | 1;
		char name[16];

		if (pthread_create(&v->thread, NULL, vcpu_main, v))
			goto err_threads;
		snprintf(name, sizeof(name), "vcpu%u", i);
		pthread_setname_np(v->thread, name);
	}
	/* Wait until every vCPU has parked once, so their thread ids are known. */
	pthread_mutex_lock(&g->lock);
	while (g->parked < g->nvcpus)
		pthread_cond_wait(&g->park_cond, &g->lock);
	pthread_mutex_unlock(&g->lock);
	*out = g;
	return 0;
err_threads:
	pthread_mutex_lock(&g->lock);
	g->quit = true;
	pthread_cond_broadcast(&g->run_cond);
	pthread_mutex_unlock(&g->lock);
	while (i--)
		pthread_join(g->vcpus[i].thread, NULL);
	free(g->vcpus);
err_free:
	free(g);
	vmig__err_set(err, "cannot start vCPU threads");
	return -ENOMEM;
}

void guest_destroy(struct guest *g)
{
	if (!g)
		return;
	pthread_mutex_lock(&g->lock);
	g->quit = true;
	pthread_cond_broadcast(&g->run_cond);
	pthread_mutex_unlock(&g->lock);
	for (unsigned i = 0; i < g->nvcpus; i++)
		pthread_join(g->vcpus[i].thread, NULL);
	pthread_cond_destroy(&g->run_cond);
	pthread_cond_destroy(&g->park_cond);
	pthread_mutex_destroy(&g->lock);
	free(g->vcpus);
	free(g);
}

void guest_set_blocked_check(struct guest *g, bool (*blocked)(void *opaque, unsigned vcpu),
			     void *opaque)
{
	g->blocked = blocked;
	g->blocked_opaque = opaque;
}

/* Under g->lock: every vCPU is parked, or blocked on a missing page (it
 * cannot run on before the page arrives, and parks right after). */
static bool all_stopped(struct guest *g)
{
	if (g->parked == g->nvcpus || g->quit)
		return true;
	if (!g->blocked)
		return false;
	for (unsigned i = 0; i < g->nvcpus; i++)
		if (!g->vcpus[i].parked && !g->blocked(g->blocked_opaque, i))
			return false;
	return true;
}

void guest_stop(struct guest *g)
{
	pthread_mutex_lock(&g->lock);
	__atomic_store_n(&g->run, false, __ATOMIC_RELEASE);
	pthread_cond_broadcast(&g->run_cond);
	while (!all_stopped(g)) {
		struct timespec ts;

		/* A blocked vCPU does not signal: look again every ms. */
		vmig__cond_deadline(&ts, 1);
		pthread_cond_timedwait(&g->park_cond, &g->lock, &ts);
	}
	pthread_mutex_unlock(&g->lock);
}

void guest_start(struct guest *g)
{
	pthread_mutex_lock(&g->lock);
	__atomic_store_n(&g->run, true, __ATOMIC_RELEASE);
	pthread_cond_broadcast(&g->run_cond);
	pthread_mutex_unlock(&g->lock);
}

struct saved_state {
	uint64_t magic;
	uint64_t npages;
	uint32_t nvcpus;
	uint32_t reserved;
};

int guest_save(struct guest *g, void *buf, size_t cap, size_t *len)
{
	struct saved_state hdr = {STATE_MAGIC, g->npages, g->nvcpus, 0};
	size_t need = sizeof(hdr) + g->nvcpus * sizeof(struct vcpu_state);
	uint8_t *p = buf;

	if (need > cap)
		return -ENOSPC;
	memcpy(p, &hdr, sizeof(hdr));
	for (unsigned i = 0; i < g->nvcpus; i++)
		memcpy(p + sizeof(hdr) + i * sizeof(struct vcpu_state), &g->vcpus[i].st,
		       sizeof(struct vcpu_state));
	*len = need;
	return 0;
}

/* The state comes from the migration stream: check it before use. */
int guest_load(struct guest *g, const void *buf, size_t len, struct vmig__err *err)
{
	struct saved_state hdr;
	const uint8_t *p = buf;

	if (len < sizeof(hdr)) {
		vmig__err_set(err, "vCPU state too short");
		return -EINVAL;
	}
	memcpy(&hdr, p, sizeof(hdr));
	if (hdr.magic != STATE_MAGIC || hdr.npages != g->npages) {
		vmig__err_set(err, "vCPU state does not belong to this guest");
		return -EINVAL;
	}
	if (hdr.nvcpus != g->nvcpus) {
		vmig__err_set(err, "source has %u vCPUs, destination %u", hdr.nvcpus, g->nvcpus);
		return -EINVAL;
	}
	if (len != sizeof(hdr) + g->nvcpus * sizeof(struct vcpu_state)) {
		vmig__err_set(err, "vCPU state has the wrong size");
		return -EINVAL;
	}
	for (unsigned i = 0; i < g->nvcpus; i++) {
		memcpy(&g->vcpus[i].st, p + sizeof(hdr) + i * sizeof(struct vcpu_state),
		       sizeof(struct vcpu_state));
		g->vcpus[i].st.rng |= 1; /* xorshift must not hold 0 */
	}
	return 0;
}

void guest_get_stats(struct guest *g, struct vm_guest_stats *out)
{
	out->pages_written = __atomic_load_n(&g->pages_written, __ATOMIC_RELAXED);
	out->pages_verified = __atomic_load_n(&g->pages_verified, __ATOMIC_RELAXED);
	out->inconsistencies = __atomic_load_n(&g->inconsistencies, __ATOMIC_RELAXED);
	out->mem_bytes = g->npages * VMIG_PAGE_SIZE;
	out->vcpus = g->nvcpus;
	out->throttle = __atomic_load_n(&g->throttle, __ATOMIC_RELAXED);
	out->workload = guest_workload_name(g->cfg.workload);
}

void guest_set_throttle(struct guest *g, unsigned percent)
{
	__atomic_store_n(&g->throttle, percent > 99 ? 99 : percent, __ATOMIC_RELAXED);
}

int guest_vcpu_tid(struct guest *g, unsigned i)
{
	return i < g->nvcpus ? __atomic_load_n(&g->vcpus[i].tid, __ATOMIC_ACQUIRE) : -1;
}

const char *guest_workload_name(enum vm_workload wl)
{
	static const char *const names[] = {"idle", "random", "stream", "hotset"};

	return (unsigned)wl < VMIG_ARRAY_SIZE(names) ? names[wl] : "unknown";
}
