// SPDX-License-Identifier: MIT
/*
 * blkcheck: the data-integrity workload that runs inside the interop test
 * guest (static, no libc beyond what -static links in).
 *
 * It writes patterned 4 KiB blocks to a virtio disk with O_DIRECT, reads them
 * back and checks every byte, for a bounded time or number of operations.
 * Each block carries its block number, a generation counter, the run's seed
 * and a checksum, so stale data (an old generation), misplaced data (another
 * block's number), torn data (checksum mismatch) and plain corruption are told
 * apart. It also exercises flush (fdatasync), discard (BLKDISCARD) and
 * write-zeroes (BLKZEROOUT, then every zeroed block must read back as zero),
 * prints the disk's serial, and measures the longest gap between two
 * completed I/Os: the guest-visible pause while the backend restarts.
 *
 * With --qd N (N > 1) it keeps N requests in flight instead of one, through
 * Linux native AIO, and every write is preceded by a read that checks the
 * block's current content (see aio_loop for what that lets the host test
 * conclude after the back-end was killed and restarted). With --stop-block B
 * it ends early once block B (outside the region it writes) starts with the
 * stop marker, which the host test writes into the image: the test decides
 * how long the guest runs, not a guess of the machine's speed.
 *
 * Output is line-oriented for the host test to parse, every line starting
 * with "VMIG-GUEST: ". The last line is SUMMARY; the exit status is 0 only if
 * there were no I/O errors, no bad blocks and the serial matched.
 *
 * The same static binary also runs on the host: "--scan FILE" checks that
 * every block of a disk image is either all zero or a self-consistent
 * pattern block at the right place. It does not trust the image: any content
 * is handled, nothing in it is used as a size or an index.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BLK_SIZE 4096u
#define BLK_MAGIC 0x314b4c4247494d56ull	 /* "VMIGBLK1" little-endian */
#define RANGE_BLOCKS 16u		 /* discard / write-zeroes range: 64 KiB */
#define POOL_BLOCKS 2048u		 /* read buffers: 8 MiB of guest RAM */
#define STOP_MAGIC 0x504f545347494d56ull /* "VMIGSTOP": the host asks to stop */
#define MAX_QD 256u

/* Header at the start of every pattern block; the body follows, and the last
 * 8 bytes of the block are a checksum over everything before them. */
struct blk_hdr {
	uint64_t magic;
	uint64_t block;
	uint64_t gen;
	uint64_t seed;
};

struct opts {
	const char *dev;
	const char *scan;
	const char *expect_serial;
	uint64_t blocks;
	uint64_t seconds;
	uint64_t max_ops;
	uint64_t stop_block;
	int has_stop;
	unsigned qd;
	unsigned write_pct;
	unsigned gap_report_ms;
	unsigned progress_ms;
	int features;
};

/* Expected content of each block of the region. gen 0 means all zero.
 * loose[b] set: all zero is also acceptable (the block was discarded). */
struct state {
	uint64_t *gen;
	uint8_t *loose;
	uint64_t nblocks;
	uint64_t seed;
	int fd;
	uint64_t t0_ns, last_done_ns, maxgap_ns, maxgap_at_ns;
	uint64_t writes, reads, io_errors, bad_blocks, flushes, discards, zeroouts;
	unsigned gap_report_ms;
	uint8_t *buf, *expect, *ctl;
	uint8_t *busy; /* --qd: a request on the block is in flight */
	double avg_inflight;
	/*
	 * Reads land in a rotating pool of buffers that only the device writes
	 * (the CPU just compares them). Before a buffer is reused, its content
	 * is checked again: if the back-end's DMA into it was not dirty-logged
	 * during a migration, the destination holds an older copy of the page
	 * and the re-check fails. One buffer would be re-dirtied by the CPU all
	 * the time and hide exactly that bug.
	 */
	uint8_t *pool;
	struct pool_ent {
		uint64_t block, gen; /* gen 0: the buffer held zeroes */
		int valid;
	} * pool_ent;
	uint64_t pool_next, mem_bad;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t rng_state = 88172645463325252ull;

static uint64_t xorshift64(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

static uint64_t checksum(const uint8_t *p, size_t len)
{
	uint64_t h = 1469598103934665603ull; /* FNV-1a, 64 bit */

	for (size_t i = 0; i < len; i++) {
		h ^= p[i];
		h *= 1099511628211ull;
	}
	return h;
}

static void pattern_fill(uint8_t *p, uint64_t block, uint64_t gen, uint64_t seed)
{
	struct blk_hdr h = {BLK_MAGIC, block, gen, seed};
	uint64_t s = seed ^ (block * 0x9e3779b97f4a7c15ull) ^ (gen * 0xc2b2ae3d27d4eb4full);
	uint64_t sum;

	if (s == 0)
		s = 1;
	memcpy(p, &h, sizeof(h));
	for (size_t off = sizeof(h); off < BLK_SIZE - 8; off += 8) {
		uint64_t v = xorshift64(&s);

		memcpy(p + off, &v, 8);
	}
	sum = checksum(p, BLK_SIZE - 8);
	memcpy(p + BLK_SIZE - 8, &sum, 8);
}

static int is_zero(const uint8_t *p, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (p[i])
			return 0;
	return 1;
}

/* Names what is wrong with block content p that should have been (block, gen). */
static const char *classify(const uint8_t *p, uint64_t block, uint64_t gen, uint64_t *seen_gen)
{
	struct blk_hdr h;
	uint64_t sum;

	memcpy(&h, p, sizeof(h));
	memcpy(&sum, p + BLK_SIZE - 8, 8);
	*seen_gen = h.gen;
	if (is_zero(p, BLK_SIZE))
		return "zero";
	if (h.magic != BLK_MAGIC)
		return "garbage";
	if (sum != checksum(p, BLK_SIZE - 8))
		return "torn";
	if (h.block != block)
		return "misplaced";
	if (h.gen < gen)
		return "stale";
	if (h.gen > gen)
		return "future";
	return "corrupt";
}

static double ms_since(const struct state *st, uint64_t t)
{
	return (double)(t - st->t0_ns) / 1e6;
}

/* Called after every completed I/O: tracks the longest gap between two. */
static void io_done(struct state *st)
{
	uint64_t t = now_ns();
	uint64_t gap = t - st->last_done_ns;

	if (gap > st->maxgap_ns) {
		st->maxgap_ns = gap;
		st->maxgap_at_ns = t;
	}
	if (st->gap_report_ms && gap >= (uint64_t)st->gap_report_ms * 1000000ull)
		printf("VMIG-GUEST: GAP end_ms=%.1f gap_ms=%.1f\n", ms_since(st, t),
		       (double)gap / 1e6);
	st->last_done_ns = t;
}

static int write_block(struct state *st, uint64_t b)
{
	uint64_t gen = st->gen[b] + 1;
	ssize_t n;

	pattern_fill(st->buf, b, gen, st->seed);
	n = pwrite(st->fd, st->buf, BLK_SIZE, (off_t)(b * BLK_SIZE));
	io_done(st);
	st->writes++;
	if (n != (ssize_t)BLK_SIZE) {
		st->io_errors++;
		printf("VMIG-GUEST: IOERR write block=%" PRIu64 " ret=%zd errno=%d\n", b, n,
		       n < 0 ? errno : 0);
		/* The block's content is now unknown: accept the old or new data. */
		st->loose[b] = 2;
		st->gen[b] = gen;
		return -1;
	}
	st->gen[b] = gen;
	st->loose[b] = 0;
	return 0;
}

/* Re-checks what an earlier read left in pool buffer `slot`. */
static void pool_recheck(struct state *st, uint64_t slot)
{
	struct pool_ent *e = &st->pool_ent[slot];
	uint8_t *p = st->pool + slot * BLK_SIZE;

	if (!e->valid)
		return;
	e->valid = 0;
	if (e->gen == 0 ? is_zero(p, BLK_SIZE)
			: (pattern_fill(st->expect, e->block, e->gen, st->seed),
			   memcmp(p, st->expect, BLK_SIZE) == 0))
		return;
	st->bad_blocks++;
	st->mem_bad++;
	printf("VMIG-GUEST: BAD block=%" PRIu64 " expect_gen=%" PRIu64
	       " kind=read-buffer-changed-in-memory\n",
	       e->block, e->gen);
}

/* Is buf what block b must hold now? A mismatch is counted and reported. */
static int check_content(struct state *st, uint64_t b, const uint8_t *buf)
{
	uint64_t seen;
	const char *kind;

	if (st->loose[b] == 2)
		return 0; /* after a failed write anything goes; already counted */
	if (st->gen[b] == 0) {
		if (is_zero(buf, BLK_SIZE))
			return 0;
	} else {
		pattern_fill(st->expect, b, st->gen[b], st->seed);
		if (memcmp(buf, st->expect, BLK_SIZE) == 0)
			return 0;
		if (st->loose[b] && is_zero(buf, BLK_SIZE))
			return 0;
	}
	st->bad_blocks++;
	kind = classify(buf, b, st->gen[b], &seen);
	printf("VMIG-GUEST: BAD block=%" PRIu64 " expect_gen=%" PRIu64 " kind=%s seen_gen=%" PRIu64
	       "\n",
	       b, st->gen[b], kind, seen);
	return -1;
}

static int verify_block(struct state *st, uint64_t b)
{
	uint64_t slot = st->pool_next++ % POOL_BLOCKS;
	ssize_t n;
	uint8_t *buf = st->pool + slot * BLK_SIZE;

	pool_recheck(st, slot);
	n = pread(st->fd, buf, BLK_SIZE, (off_t)(b * BLK_SIZE));
	io_done(st);
	st->reads++;
	if (n != (ssize_t)BLK_SIZE) {
		st->io_errors++;
		printf("VMIG-GUEST: IOERR read block=%" PRIu64 " ret=%zd errno=%d\n", b, n,
		       n < 0 ? errno : 0);
		return -1;
	}
	if (st->loose[b] == 2)
		return 0;
	if (check_content(st, b, buf))
		return -1;
	st->pool_ent[slot] = (struct pool_ent){b, is_zero(buf, BLK_SIZE) ? 0 : st->gen[b], 1};
	return 0;
}

static void do_flush(struct state *st)
{
	int rc = fdatasync(st->fd);

	io_done(st);
	st->flushes++;
	if (rc) {
		st->io_errors++;
		printf("VMIG-GUEST: IOERR flush errno=%d\n", errno);
	}
}

/* Discard a 64 KiB range: afterwards each block may read as zero or as its
 * old content, so both are accepted until it is written again. */
static void do_discard(struct state *st, uint64_t first)
{
	uint64_t range[2] = {first * BLK_SIZE, RANGE_BLOCKS * BLK_SIZE};

	if (ioctl(st->fd, BLKDISCARD, range)) {
		io_done(st);
		st->io_errors++;
		printf("VMIG-GUEST: IOERR discard errno=%d\n", errno);
		return;
	}
	io_done(st);
	st->discards++;
	for (uint64_t b = first; b < first + RANGE_BLOCKS; b++) {
		if (st->gen[b] && st->loose[b] != 2)
			st->loose[b] = 1;
		verify_block(st, b);
	}
}

/* Write-zeroes a 64 KiB range: every block in it must then read as zero. */
static void do_zeroout(struct state *st, uint64_t first)
{
	uint64_t range[2] = {first * BLK_SIZE, RANGE_BLOCKS * BLK_SIZE};

	if (ioctl(st->fd, BLKZEROOUT, range)) {
		io_done(st);
		st->io_errors++;
		printf("VMIG-GUEST: IOERR zeroout errno=%d\n", errno);
		return;
	}
	io_done(st);
	st->zeroouts++;
	for (uint64_t b = first; b < first + RANGE_BLOCKS; b++) {
		st->gen[b] = 0;
		st->loose[b] = 0;
		verify_block(st, b);
	}
}

static void read_sysfs(const char *dev, const char *attr, char *out, size_t len)
{
	const char *name = strrchr(dev, '/') ? strrchr(dev, '/') + 1 : dev;
	char path[256];
	FILE *f;

	snprintf(out, len, "?");
	snprintf(path, sizeof(path), "/sys/block/%s/%s", name, attr);
	f = fopen(path, "r");
	if (!f)
		return;
	if (fgets(out, (int)len, f))
		out[strcspn(out, "\n")] = '\0';
	fclose(f);
}

static int print_device_info(const struct opts *o)
{
	char serial[128], wc[64], dmax[64], zmax[64];

	read_sysfs(o->dev, "serial", serial, sizeof(serial));
	read_sysfs(o->dev, "queue/write_cache", wc, sizeof(wc));
	for (char *p = wc; *p; p++)
		if (*p == ' ')
			*p = '-'; /* "write back" -> one token */
	read_sysfs(o->dev, "queue/discard_max_bytes", dmax, sizeof(dmax));
	read_sysfs(o->dev, "queue/write_zeroes_max_bytes", zmax, sizeof(zmax));
	printf("VMIG-GUEST: DEVICE dev=%s serial=%s write_cache=%s discard_max_bytes=%s "
	       "write_zeroes_max_bytes=%s\n",
	       o->dev, serial, wc, dmax, zmax);
	if (o->expect_serial && strcmp(serial, o->expect_serial) != 0) {
		printf("VMIG-GUEST: SERIAL-MISMATCH want=%s got=%s\n", o->expect_serial, serial);
		return -1;
	}
	return 0;
}

static void progress(struct state *st, uint64_t t)
{
	printf("VMIG-GUEST: PROGRESS t_ms=%.0f writes=%" PRIu64 " reads=%" PRIu64
	       " io_errors=%" PRIu64 " bad_blocks=%" PRIu64 " mem_bad=%" PRIu64 " maxgap_ms=%.1f\n",
	       ms_since(st, t), st->writes, st->reads, st->io_errors, st->bad_blocks, st->mem_bad,
	       (double)st->maxgap_ns / 1e6);
	fflush(stdout);
}

/* --stop-block: has the host written the stop marker into that block? It
 * lies outside the region under test, and O_DIRECT reads it from the disk. */
static int stop_requested(struct state *st, const struct opts *o)
{
	uint64_t magic;

	if (!o->has_stop || pread(st->fd, st->ctl, BLK_SIZE, (off_t)(o->stop_block * BLK_SIZE)) !=
				(ssize_t)BLK_SIZE)
		return 0;
	memcpy(&magic, st->ctl, sizeof(magic));
	return magic == STOP_MAGIC;
}

/* Random writes and read-verifies (plus the special operations every 2 s
 * with --features) until the time or operation budget is used up. */
static void main_loop(struct state *st, const struct opts *o)
{
	uint64_t end = st->t0_ns + o->seconds * 1000000000ull;
	uint64_t next_progress = st->t0_ns, next_special = st->t0_ns + 2000000000ull;
	uint64_t ops = 0, special = 0;

	printf("VMIG-GUEST: READY blocks=%" PRIu64 " seed=%" PRIu64 "\n", st->nblocks, st->seed);
	fflush(stdout);
	for (;;) {
		uint64_t t = now_ns();
		uint64_t b = xorshift64(&rng_state) % st->nblocks;

		if (t >= end || (o->max_ops && ops >= o->max_ops))
			break;
		if (t >= next_progress) {
			progress(st, t);
			if (stop_requested(st, o))
				break;
			next_progress = t + (uint64_t)o->progress_ms * 1000000ull;
		}
		if (o->features && t >= next_special && st->nblocks >= 2 * RANGE_BLOCKS) {
			uint64_t first = (b / RANGE_BLOCKS) * RANGE_BLOCKS;

			if (first + RANGE_BLOCKS > st->nblocks)
				first = 0;
			if (special % 3 == 0)
				do_flush(st);
			else if (special % 3 == 1)
				do_discard(st, first);
			else
				do_zeroout(st, first);
			special++;
			next_special = t + 2000000000ull;
		}
		if (xorshift64(&rng_state) % 100 < o->write_pct) {
			if (write_block(st, b) == 0 && o->write_pct < 100)
				verify_block(st, b); /* read-after-write, same block */
		} else {
			verify_block(st, b);
		}
		ops++;
	}
}

/* ---- queue-depth mode (--qd N) ---- */

/*
 * Linux native AIO by raw system calls (a static guest has no libaio). With
 * O_DIRECT on a block device, io_submit only queues the requests: N iocbs
 * submitted are N requests on the virtqueue at once.
 */
static long aio_setup(unsigned nr, aio_context_t *ctx)
{
	return syscall(SYS_io_setup, nr, ctx);
}

static long aio_submit(aio_context_t ctx, long n, struct iocb **cbs)
{
	return syscall(SYS_io_submit, ctx, n, cbs);
}

static long aio_getevents(aio_context_t ctx, long min, long max, struct io_event *ev,
			  struct timespec *timeout)
{
	return syscall(SYS_io_getevents, ctx, min, max, ev, timeout);
}

static void aio_destroy(aio_context_t ctx)
{
	syscall(SYS_io_destroy, ctx);
}

enum slot_op { SLOT_IDLE, SLOT_READ, SLOT_WRITE };

struct slot {
	struct iocb cb;
	uint8_t *buf;
	uint64_t block, gen; /* gen: what a write puts there */
	enum slot_op op;
	int queued;	/* prepared, goes out with the next io_submit */
	int then_write; /* a read that is followed by a write of the block */
};

static void slot_prep(struct state *st, struct slot *s, enum slot_op op)
{
	memset(&s->cb, 0, sizeof(s->cb));
	s->cb.aio_data = (uint64_t)(uintptr_t)s;
	s->cb.aio_lio_opcode = op == SLOT_READ ? IOCB_CMD_PREAD : IOCB_CMD_PWRITE;
	s->cb.aio_fildes = (uint32_t)st->fd;
	s->cb.aio_buf = (uint64_t)(uintptr_t)s->buf;
	s->cb.aio_nbytes = BLK_SIZE;
	s->cb.aio_offset = (int64_t)(s->block * BLK_SIZE);
	s->op = op;
	s->queued = 1;
}

/* A request of slot s is over: the block may be used again. */
static void slot_release(struct state *st, struct slot *s)
{
	st->busy[s->block] = 0;
	s->op = SLOT_IDLE;
}

/* One completion: check a read, account a write, chain a read to its write. */
static void slot_done(struct state *st, struct slot *s, int64_t res, int stopping)
{
	uint64_t b = s->block;

	io_done(st);
	if (s->op == SLOT_READ) {
		st->reads++;
		if (res != (int64_t)BLK_SIZE) {
			st->io_errors++;
			printf("VMIG-GUEST: IOERR read block=%" PRIu64 " ret=%" PRId64 "\n", b,
			       res);
		} else if (check_content(st, b, s->buf) == 0 && s->then_write && !stopping) {
			s->gen = st->gen[b] + 1;
			pattern_fill(s->buf, b, s->gen, st->seed);
			slot_prep(st, s, SLOT_WRITE);
			return;
		}
		slot_release(st, s);
		return;
	}
	st->writes++;
	st->gen[b] = s->gen;
	st->loose[b] = 0;
	if (res != (int64_t)BLK_SIZE) {
		st->io_errors++;
		printf("VMIG-GUEST: IOERR write block=%" PRIu64 " ret=%" PRId64 "\n", b, res);
		st->loose[b] = 2; /* content unknown: old or new */
	}
	slot_release(st, s);
}

/*
 * Keeps o->qd requests in flight on random blocks until the time or
 * operation budget is used up or the host asks to stop; then lets every
 * request finish. write_pct of the operations are "read the block, check it,
 * then write its next generation", the others a read and check alone.
 *
 * Why this detects a lost write and a write applied twice when the back-end
 * is killed and restarted while requests are in flight (the restarted
 * back-end redoes, from the in-flight region, what the old one had taken
 * from the ring without returning it):
 *
 * - Each block's generation is its own write sequence number: the write of
 *   generation g puts (block, g, this run's seed) under a checksum, so the
 *   content of every write ever issued to a block is distinct and
 *   recognisable. gen[b] is the last generation whose write the guest saw
 *   complete.
 * - A block has at most one request in flight (busy[]), and the write of
 *   g+1 is issued only after the write of g completed and a read of the
 *   block, issued after that completion, returned exactly g. So between the
 *   completion of the write of g and the issue of the write of g+1, the
 *   block must hold g; the read before g+1 checks it, and the final pass
 *   over the whole region (after every request has finished) checks the
 *   last generation of every block.
 * - Lost: the write of g completed but did not reach the disk. The block
 *   still holds g-1 (or zero), and the next read of it, which comes before
 *   any other write to it, reports "stale" (or "zero").
 * - Applied twice: an earlier request to the block (the write of g-1, or
 *   whatever an old descriptor points to) is redone after the write of g
 *   completed. The block then holds g-1 ("stale") or another block's data
 *   ("misplaced") where g must be, and the same read reports it: no later
 *   write can hide it, since none is issued before that read. The only
 *   replay left unseen is one that lands after the write of g+1 was issued
 *   and before that write reaches the disk, which the write then undoes:
 *   nothing wrong remains for anyone to read.
 * - Redoing a request that was still in flight is what the back-end must
 *   do, and it is invisible here: nothing else touches its block until it
 *   completes, and a write carries the same data each time.
 */
static void aio_loop(struct state *st, const struct opts *o)
{
	uint64_t end = st->t0_ns + o->seconds * 1000000000ull;
	uint64_t next_progress = st->t0_ns, ops = 0, area_t = st->t0_ns, main_end = 0;
	double area = 0; /* requests in flight x ns, while new ones are issued */
	struct slot *slots = calloc(o->qd, sizeof(*slots));
	struct iocb **subq = calloc(o->qd, sizeof(*subq));
	struct io_event *ev = calloc(o->qd, sizeof(*ev));
	aio_context_t ctx = 0;
	unsigned inflight = 0;
	int stopping = 0;

	if (!slots || !subq || !ev || aio_setup(o->qd, &ctx) < 0) {
		printf("VMIG-GUEST: ERROR io_setup: %s\n", strerror(errno));
		st->io_errors++;
		goto out;
	}
	for (unsigned i = 0; i < o->qd; i++)
		if (posix_memalign((void **)&slots[i].buf, BLK_SIZE, BLK_SIZE)) {
			printf("VMIG-GUEST: ERROR out of memory\n");
			st->io_errors++;
			goto out;
		}
	printf("VMIG-GUEST: READY blocks=%" PRIu64 " seed=%" PRIu64 " qd=%u\n", st->nblocks,
	       st->seed, o->qd);
	fflush(stdout);
	for (;;) {
		uint64_t t = now_ns();
		unsigned nsub = 0;
		long r;

		if (!stopping && (t >= end || (o->max_ops && ops >= o->max_ops))) {
			stopping = 1;
			main_end = t;
		}
		if (t >= next_progress) {
			progress(st, t);
			if (!stopping && stop_requested(st, o)) {
				stopping = 1;
				main_end = now_ns();
			}
			next_progress = now_ns() + (uint64_t)o->progress_ms * 1000000ull;
		}
		for (unsigned i = 0; i < o->qd; i++) {
			struct slot *s = &slots[i];

			if (s->op == SLOT_IDLE && !stopping) {
				uint64_t b;

				do
					b = xorshift64(&rng_state) % st->nblocks;
				while (st->busy[b]);
				st->busy[b] = 1;
				s->block = b;
				s->then_write = xorshift64(&rng_state) % 100 < o->write_pct;
				slot_prep(st, s, SLOT_READ);
				ops++;
			}
			if (s->queued) {
				s->queued = 0;
				subq[nsub++] = &s->cb;
			}
		}
		t = now_ns();
		if (!main_end)
			area += (double)inflight * (double)(t - area_t);
		area_t = t;
		r = nsub ? aio_submit(ctx, nsub, subq) : 0;
		if (r < (long)nsub) {
			/* Not expected on a block device with room for qd requests:
			 * the ones not taken fail, their blocks' content unknown. */
			printf("VMIG-GUEST: IOERR io_submit %u of %u errno=%d\n",
			       r < 0 ? 0u : (unsigned)r, nsub, r < 0 ? errno : 0);
			for (unsigned i = r < 0 ? 0u : (unsigned)r; i < nsub; i++) {
				struct slot *s = (struct slot *)(uintptr_t)subq[i]->aio_data;

				st->io_errors++;
				if (s->op == SLOT_WRITE)
					st->loose[s->block] = 2;
				slot_release(st, s);
			}
			stopping = 1;
			if (!main_end)
				main_end = t;
		}
		inflight += r > 0 ? (unsigned)r : 0u;
		if (inflight == 0) {
			if (stopping)
				break;
			continue;
		}
		/* Bounded wait: progress lines (and the stop check) go on while
		 * the back-end is away. */
		struct timespec ts = {0, 100 * 1000000L};

		r = aio_getevents(ctx, 1, o->qd, ev, &ts);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			printf("VMIG-GUEST: ERROR io_getevents: %s\n", strerror(errno));
			st->io_errors++;
			break;
		}
		t = now_ns();
		if (!main_end)
			area += (double)inflight * (double)(t - area_t);
		area_t = t;
		for (long i = 0; i < r; i++) {
			inflight--;
			slot_done(st, (struct slot *)(uintptr_t)ev[i].data, ev[i].res, stopping);
		}
		if (st->io_errors && !stopping) {
			/* A device that fails one request (a broken ring fails
			 * them all) would otherwise be hammered until the end:
			 * stop, so that the run ends with the error reported. */
			printf("VMIG-GUEST: STOPPING io_errors=%" PRIu64 "\n", st->io_errors);
			stopping = 1;
			main_end = t;
		}
	}
	if (main_end > st->t0_ns)
		st->avg_inflight = area / (double)(main_end - st->t0_ns);
out:
	if (ctx)
		aio_destroy(ctx);
	for (unsigned i = 0; slots && i < o->qd; i++)
		free(slots[i].buf);
	free(slots);
	free(subq);
	free(ev);
}

static int run_device(const struct opts *o)
{
	struct state st = {0};
	uint64_t size = 0;
	int rc = 1, serial_bad;

	serial_bad = print_device_info(o);
	st.fd = open(o->dev, O_RDWR | O_DIRECT);
	if (st.fd < 0 || ioctl(st.fd, BLKGETSIZE64, &size)) {
		printf("VMIG-GUEST: ERROR open %s: %s\n", o->dev, strerror(errno));
		goto out;
	}
	st.nblocks = size / BLK_SIZE < o->blocks ? size / BLK_SIZE : o->blocks;
	if (st.nblocks == 0) {
		printf("VMIG-GUEST: ERROR device too small\n");
		goto out;
	}
	if (o->qd > 1 && st.nblocks < 2ull * o->qd) {
		printf("VMIG-GUEST: ERROR %" PRIu64 " blocks are too few for qd %u\n", st.nblocks,
		       o->qd);
		goto out;
	}
	if (o->has_stop && (o->stop_block < st.nblocks || o->stop_block >= size / BLK_SIZE)) {
		printf("VMIG-GUEST: ERROR stop block %" PRIu64 " not between the region and the "
		       "end of the disk\n",
		       o->stop_block);
		goto out;
	}
	st.gen = calloc(st.nblocks, sizeof(*st.gen));
	st.loose = calloc(st.nblocks, 1);
	st.busy = calloc(st.nblocks, 1);
	st.pool_ent = calloc(POOL_BLOCKS, sizeof(*st.pool_ent));
	if (!st.gen || !st.loose || !st.busy || !st.pool_ent ||
	    posix_memalign((void **)&st.pool, BLK_SIZE, (size_t)POOL_BLOCKS * BLK_SIZE) ||
	    posix_memalign((void **)&st.buf, BLK_SIZE, BLK_SIZE) ||
	    posix_memalign((void **)&st.ctl, BLK_SIZE, BLK_SIZE) ||
	    posix_memalign((void **)&st.expect, BLK_SIZE, BLK_SIZE)) {
		printf("VMIG-GUEST: ERROR out of memory\n");
		goto out;
	}
	st.gap_report_ms = o->gap_report_ms;
	st.seed = now_ns() | 1;
	rng_state ^= st.seed;
	st.t0_ns = st.last_done_ns = now_ns();
	if (o->qd > 1)
		aio_loop(&st, o);
	else
		main_loop(&st, o);
	do_flush(&st);
	/* Final pass: every block of the region, in order. */
	for (uint64_t b = 0; b < st.nblocks; b++)
		verify_block(&st, b);
	for (uint64_t slot = 0; slot < POOL_BLOCKS; slot++)
		pool_recheck(&st, slot);
	progress(&st, now_ns());
	printf(
	    "VMIG-GUEST: SUMMARY writes=%" PRIu64 " reads=%" PRIu64 " flushes=%" PRIu64
	    " discards=%" PRIu64 " zeroouts=%" PRIu64 " io_errors=%" PRIu64 " bad_blocks=%" PRIu64
	    " mem_bad=%" PRIu64 " maxgap_ms=%.1f maxgap_end_ms=%.0f serial_ok=%d qd=%u"
	    " avg_inflight=%.2f\n",
	    st.writes, st.reads, st.flushes, st.discards, st.zeroouts, st.io_errors, st.bad_blocks,
	    st.mem_bad, (double)st.maxgap_ns / 1e6, ms_since(&st, st.maxgap_at_ns), !serial_bad,
	    o->qd, o->qd > 1 ? st.avg_inflight : 1.0);
	rc = (st.io_errors || st.bad_blocks || serial_bad) ? 1 : 0;
out:
	if (st.fd >= 0)
		close(st.fd);
	free(st.gen);
	free(st.loose);
	free(st.busy);
	free(st.ctl);
	free(st.buf);
	free(st.expect);
	free(st.pool);
	free(st.pool_ent);
	return rc;
}

/* Host-side check of an image: every block zero or a valid pattern block. */
static int run_scan(const char *path)
{
	uint64_t zero = 0, good = 0, bad = 0, control = 0, max_gen = 0, seen;
	uint8_t buf[BLK_SIZE];
	int fd = open(path, O_RDONLY);

	if (fd < 0) {
		printf("VMIG-GUEST: ERROR open %s: %s\n", path, strerror(errno));
		return 1;
	}
	for (uint64_t b = 0;; b++) {
		struct blk_hdr h;
		uint64_t sum;
		ssize_t n = pread(fd, buf, BLK_SIZE, (off_t)(b * BLK_SIZE));

		if (n == 0)
			break;
		if (n != (ssize_t)BLK_SIZE) {
			printf("VMIG-GUEST: ERROR short read at block %" PRIu64 "\n", b);
			bad++;
			break;
		}
		memcpy(&h, buf, sizeof(h));
		memcpy(&sum, buf + BLK_SIZE - 8, 8);
		if (is_zero(buf, BLK_SIZE)) {
			zero++;
		} else if (h.magic == STOP_MAGIC) {
			control++; /* --stop-block, written by the host */
		} else if (h.magic == BLK_MAGIC && h.block == b &&
			   sum == checksum(buf, BLK_SIZE - 8)) {
			good++;
			max_gen = h.gen > max_gen ? h.gen : max_gen;
		} else {
			if (bad < 20)
				printf("VMIG-GUEST: BAD block=%" PRIu64 " kind=%s\n", b,
				       classify(buf, b, h.gen, &seen));
			bad++;
		}
	}
	close(fd);
	printf("VMIG-GUEST: SCAN zero=%" PRIu64 " pattern=%" PRIu64 " bad=%" PRIu64
	       " control=%" PRIu64 " max_gen=%" PRIu64 "\n",
	       zero, good, bad, control, max_gen);
	return bad ? 1 : 0;
}

static void usage(void)
{
	printf("usage: blkcheck [--dev /dev/vda] [--blocks N] [--seconds S] [--ops N]\n"
	       "                [--write-pct P] [--features] [--serial ID] [--gap-ms MS]\n"
	       "                [--progress-ms MS] [--qd N] [--stop-block B]\n"
	       "       blkcheck --scan IMAGE\n");
}

static int parse_args(int argc, char **argv, struct opts *o)
{
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(a, "--features")) {
			o->features = 1;
			continue;
		}
		if (!v)
			return -1;
		i++;
		if (!strcmp(a, "--dev"))
			o->dev = v;
		else if (!strcmp(a, "--scan"))
			o->scan = v;
		else if (!strcmp(a, "--serial"))
			o->expect_serial = v;
		else if (!strcmp(a, "--blocks"))
			o->blocks = strtoull(v, NULL, 0);
		else if (!strcmp(a, "--seconds"))
			o->seconds = strtoull(v, NULL, 0);
		else if (!strcmp(a, "--ops"))
			o->max_ops = strtoull(v, NULL, 0);
		else if (!strcmp(a, "--write-pct"))
			o->write_pct = (unsigned)strtoul(v, NULL, 0);
		else if (!strcmp(a, "--gap-ms"))
			o->gap_report_ms = (unsigned)strtoul(v, NULL, 0);
		else if (!strcmp(a, "--progress-ms"))
			o->progress_ms = (unsigned)strtoul(v, NULL, 0);
		else if (!strcmp(a, "--qd"))
			o->qd = (unsigned)strtoul(v, NULL, 0);
		else if (!strcmp(a, "--stop-block")) {
			o->stop_block = strtoull(v, NULL, 0);
			o->has_stop = 1;
		} else
			return -1;
	}
	if (o->write_pct > 100 || o->blocks == 0 || o->progress_ms == 0 || o->qd == 0 ||
	    o->qd > MAX_QD || (o->qd > 1 && o->features))
		return -1;
	return 0;
}

int main(int argc, char **argv)
{
	struct opts o = {
	    .dev = "/dev/vda",
	    .blocks = 8192,
	    .seconds = 20,
	    .write_pct = 70,
	    .gap_report_ms = 100,
	    .progress_ms = 1000,
	    .qd = 1,
	};

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (parse_args(argc, argv, &o)) {
		usage();
		return 2;
	}
	if (o.scan)
		return run_scan(o.scan);
	return run_device(&o);
}
