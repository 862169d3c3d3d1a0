// SPDX-License-Identifier: MIT
/*
 * Guest program for the post-copy benchmark: a working set that keeps being
 * dirtied at a fixed rate while the VM migrates. It allocates WSS_MIB of
 * anonymous memory, writes every page once, prints "VMIG-DIRTIER: ready",
 * then forever overwrites pages with whole 4 KiB writes, paced to RATE_MIB
 * per second, in the order PATTERN says. It never exits: the benchmark kills
 * the VM.
 *
 * Every page carries a stamp (its index and a write sequence number kept in
 * a side table) at its first, middle and last word, checked before each
 * overwrite; a mismatch means the migration lost or misplaced a page and is
 * counted as "bad". Every two seconds it prints the achieved rate and the
 * counts on the console, so the host can see the guest is alive and keeping
 * pace on whichever side it runs.
 *
 * Usage (vmig.args on the kernel command line):
 *   dirtier [WSS_MIB [RATE_MIB [FILL_MIB|auto [THREADS [PATTERN]]]]]
 * Defaults: 1024 MiB working set, 256 MiB/s, no fill, 1 thread, random.
 * PATTERN is one of vmig-vm's workloads, with the same meaning: random
 * (uniform over the working set), stream (each thread sweeps its pages in
 * order, over and over) or hotset (90% of writes to the first 1/16 of the
 * working set, the rest uniform over all of it). FILL_MIB more MiB are
 * filled once with pseudo-random bytes and never touched again, so the rest
 * of guest RAM is not zero pages a migration could skip; "auto" fills all
 * but FILL_SPARE_MIB of what the kernel reports as available.
 */
#include <errno.h>
#include <stdint.h>
#include <pthread.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096u
#define WORDS (PAGE / 8)
#define REPORT_NS 2000000000ull
/* Pages written between clock reads: small enough that pacing stays smooth
 * (64 pages = 256 KiB, about 1 ms at 256 MiB/s). */
#define BATCH 64u
#define CATCH_UP_NS 20000000ull
#define FILL_SPARE_MIB 48ull
#define HOTSET_PERCENT 90
#define HOTSET_DIVISOR 16

enum pattern { PAT_RANDOM, PAT_STREAM, PAT_HOTSET };

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift64(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

static uint64_t stamp(uint64_t idx, uint32_t seq)
{
	return 0xd1ull << 56 | idx << 24 | (seq & 0xffffffu);
}

/* Overwrites page idx with a full 4 KiB write after checking its stamp;
 * returns 1 if the old contents were not what this program last wrote. */
static int write_page(uint64_t *page, uint64_t idx, uint32_t *seqs)
{
	uint32_t seq = seqs[idx];
	int bad = 0;
	uint64_t v;

	if (seq) {
		v = stamp(idx, seq);
		bad = page[0] != v || page[WORDS / 2] != v || page[WORDS - 1] != v;
	}
	seq = (seq + 1) & 0xffffffu;
	if (!seq)
		seq = 1;
	v = stamp(idx, seq);
	for (unsigned i = 0; i < WORDS; i++)
		page[i] = v;
	seqs[idx] = seq;
	return bad;
}

static uint64_t mem_available_mib(void)
{
	char line[128];
	unsigned long long kib = 0;
	FILE *f = fopen("/proc/meminfo", "r");

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "MemAvailable: %llu kB", &kib) == 1)
			break;
	fclose(f);
	return kib / 1024;
}

/* Fills fill_mib MiB of fresh memory with pseudo-random bytes; returns the
 * MiB actually filled (0 if the memory could not be had). */
static uint64_t fill_random(const char *arg)
{
	uint64_t mib, rng = 0x2545f4914f6cdd1dull, *p;

	if (!strcmp(arg, "auto")) {
		mib = mem_available_mib();
		mib = mib > FILL_SPARE_MIB ? mib - FILL_SPARE_MIB : 0;
	} else {
		mib = strtoull(arg, NULL, 10);
	}
	if (!mib)
		return 0;
	p = mmap(NULL, mib << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return 0;
	for (uint64_t i = 0; i < (mib << 20) / 8; i++)
		p[i] = xorshift64(&rng);
	return mib;
}

/* Sleeps until written pages are due at the target rate. After a stall
 * (a post-copy fault, the host descheduling the vCPU) the schedule restarts
 * rather than bursting to catch up, so the rate never exceeds the target. */
static void pace(uint64_t *start_ns, uint64_t written, double pages_per_ns)
{
	uint64_t due = *start_ns + (uint64_t)((double)written / pages_per_ns);
	uint64_t t = now_ns();
	struct timespec ts;

	if (due <= t) {
		if (t - due > CATCH_UP_NS)
			*start_ns += t - due;
		return;
	}
	ts.tv_sec = (time_t)((due - t) / 1000000000ull);
	ts.tv_nsec = (long)((due - t) % 1000000000ull);
	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

struct writer {
	uint8_t *mem;
	uint32_t *seqs;
	uint64_t npages;
	unsigned id, nthreads;
	enum pattern pattern;
	double pages_per_ns;
	uint64_t written; /* atomic */
	uint64_t bad;     /* atomic */
};

/* How many of the first span pages are writer w's own. */
static uint64_t owned(const struct writer *w, uint64_t span)
{
	return span > w->id ? (span - w->id + w->nthreads - 1) / w->nthreads : 0;
}

/* One writer thread: the pages whose index is id modulo nthreads are its
 * own, so no two threads write one page (and its stamp stays checkable). */
static void *writer_main(void *arg)
{
	struct writer *w = arg;
	uint64_t rng = 0x9e3779b97f4a7c15ull * (2 * w->id + 1), start = now_ns(), written = 0;
	uint64_t mine = owned(w, w->npages), cursor = 0;
	uint64_t hot = owned(w, w->npages / HOTSET_DIVISOR);

	if (!hot)
		hot = 1;
	for (;;) {
		for (unsigned b = 0; b < BATCH; b++) {
			uint64_t k, idx;
			int bad;

			if (w->pattern == PAT_STREAM) {
				k = cursor++;
				if (cursor == mine)
					cursor = 0;
			} else if (w->pattern == PAT_HOTSET &&
				   xorshift64(&rng) % 100 < HOTSET_PERCENT) {
				k = xorshift64(&rng) % hot;
			} else {
				k = xorshift64(&rng) % mine;
			}
			idx = k * w->nthreads + w->id;
			bad = write_page((uint64_t *)(w->mem + idx * PAGE), idx, w->seqs);

			if (bad)
				__atomic_add_fetch(&w->bad, 1, __ATOMIC_RELAXED);
		}
		written += BATCH;
		__atomic_store_n(&w->written, written, __ATOMIC_RELAXED);
		pace(&start, written, w->pages_per_ns);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	uint64_t wss_mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 1024;
	uint64_t rate_mib = argc > 2 ? strtoull(argv[2], NULL, 10) : 256;
	unsigned nthreads = argc > 4 ? (unsigned)strtoul(argv[4], NULL, 10) : 1;
	static const char *const patterns[] = {"random", "stream", "hotset"};
	const char *pattern = argc > 5 ? argv[5] : "random";
	int pat = -1;
	uint64_t npages, t0, last_report, last_written = 0, filled = 0;
	struct writer w[16];
	uint32_t *seqs;
	uint8_t *mem;

	for (int i = 0; i < 3; i++)
		if (!strcmp(pattern, patterns[i]))
			pat = i;
	if (!wss_mib || !rate_mib || !nthreads || nthreads > 16 || pat < 0) {
		fprintf(
		    stderr,
		    "usage: dirtier [WSS_MIB [RATE_MIB [FILL [THREADS [random|stream|hotset]]]]]"
		    " (> 0, <= 16 threads)\n");
		return 2;
	}
	npages = wss_mib * 1024 * 1024 / PAGE;
	mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
		   0);
	seqs = calloc(npages, sizeof(*seqs));
	if (mem == MAP_FAILED || !seqs || npages < nthreads) {
		fprintf(stderr, "dirtier: cannot allocate %llu MiB\n", (unsigned long long)wss_mib);
		return 1;
	}
	for (uint64_t i = 0; i < npages; i++)
		write_page((uint64_t *)(mem + i * PAGE), i, seqs);
	if (argc > 3)
		filled = fill_random(argv[3]);
	printf(
	    "VMIG-DIRTIER: ready wss=%lluMiB rate=%lluMiB/s fill=%lluMiB threads=%u pattern=%s\n",
	    (unsigned long long)wss_mib, (unsigned long long)rate_mib, (unsigned long long)filled,
	    nthreads, pattern);
	fflush(stdout);

	for (unsigned i = 0; i < nthreads; i++) {
		pthread_t t;

		w[i] = (struct writer){.mem = mem,
				       .seqs = seqs,
				       .npages = npages,
				       .id = i,
				       .nthreads = nthreads,
				       .pattern = (enum pattern)pat,
				       .pages_per_ns =
					   (double)rate_mib * 1024 * 1024 / PAGE / 1e9 / nthreads};
		if (pthread_create(&t, NULL, writer_main, &w[i])) {
			fprintf(stderr, "dirtier: cannot start a writer thread\n");
			return 1;
		}
	}
	t0 = last_report = now_ns();
	for (;;) {
		uint64_t t, written = 0, bad = 0;

		usleep(100000);
		t = now_ns();
		if (t - last_report < REPORT_NS)
			continue;
		for (unsigned i = 0; i < nthreads; i++) {
			written += __atomic_load_n(&w[i].written, __ATOMIC_RELAXED);
			bad += __atomic_load_n(&w[i].bad, __ATOMIC_RELAXED);
		}
		printf("VMIG-DIRTIER: t=%.1fs rate=%.0fMiB/s pages=%llu bad=%llu\n",
		       (double)(t - t0) / 1e9,
		       (double)(written - last_written) * PAGE / (1024.0 * 1024.0) /
			       ((double)(t - last_report) / 1e9),
		       (unsigned long long)written, (unsigned long long)bad);
		fflush(stdout);
		last_report = t;
		last_written = written;
	}
}
