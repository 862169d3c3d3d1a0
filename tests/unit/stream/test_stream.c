// SPDX-License-Identifier: MIT
/*
 * Unit tests for the stream framing: the writer and the loader must agree
 * byte for byte, and the loader must reject every malformed or truncated
 * stream with a clear message and without writing outside guest RAM.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <linux/capability.h>
#include <xxhash.h>

#include "ram/bitmap.h"
#include "stream/stream.h"

#define NPAGES 32

struct side {
	uint8_t *ram;
	uint64_t hash[NPAGES];
	uint64_t received[1];
	uint64_t zero[1];
	struct vmig__load_block blk;
};

static void side_init(struct side *s)
{
	s->ram = calloc(NPAGES, VMIG_PAGE_SIZE);
	assert_non_null(s->ram);
	for (int i = 0; i < NPAGES; i++)
		s->hash[i] = vmig__zero_page_hash();
	s->received[0] = 0;
	s->zero[0] = 0;
	memset(&s->blk, 0, sizeof(s->blk));
	strcpy(s->blk.name, "pc.ram");
	s->blk.host = s->ram;
	s->blk.size = NPAGES * VMIG_PAGE_SIZE;
	s->blk.npages = NPAGES;
	s->blk.page_hash = s->hash;
	s->blk.received = s->received;
	s->blk.zero = s->zero;
}

/* Build a stream for src->ram: pages 0..7 data, 8..31 zero, digest, EOS. */
static size_t build_stream(uint8_t **out, struct side *src, bool with_state)
{
	int fd = memfd_create("stream", 0);
	struct vmig__writer *w = malloc(sizeof(*w));
	uint8_t blocks[4 + sizeof(struct vmig_wire_block) + 6];
	struct vmig_wire_block wb = {.name_len = 6, .page_size = VMIG_PAGE_SIZE,
				     .size = NPAGES * VMIG_PAGE_SIZE};
	uint32_t one = 1;
	uint64_t *hp = src->hash, np = NPAGES;
	struct vmig_wire_digest d = {0};
	off_t len;

	assert_true(fd >= 0);
	assert_non_null(w);
	memcpy(blocks, &one, 4);
	memcpy(blocks + 4, &wb, sizeof(wb));
	memcpy(blocks + 4 + sizeof(wb), "pc.ram", 6);
	vmig__writer_init(w, vmig__chan_from_fd(dup(fd)));
	vmig__writer_preamble(w, VMIG_CHAN_MAIN, 0, (struct vmig_wire_sid){42, 0});
	vmig__writer_rec(w, VMIG_REC_BLOCKS, blocks, sizeof(blocks));
	for (int i = 0; i < 8; i++) {
		memset(src->ram + i * VMIG_PAGE_SIZE, 0x10 + i, VMIG_PAGE_SIZE);
		src->hash[i] = vmig__page_hash(src->ram + i * VMIG_PAGE_SIZE);
	}
	vmig__writer_pages(w, 0, 0, 8, src->ram, NULL);
	vmig__writer_zero(w, 0, 8, 24);
	if (with_state)
		vmig__writer_rec(w, VMIG_REC_STATE, "state", 5);
	d.page_digest = vmig__digest_of_hashes(&hp, &np, 1);
	vmig__writer_rec(w, VMIG_REC_DIGEST, &d, sizeof(d));
	vmig__writer_rec(w, VMIG_REC_EOS, NULL, 0);
	assert_int_equal(vmig__writer_flush(w), 0);
	len = lseek(fd, 0, SEEK_CUR);
	*out = malloc((size_t)len);
	assert_int_equal(pread(fd, *out, (size_t)len, 0), len);
	assert_int_equal(w->bytes, (uint64_t)len);
	close(fd);
	vmig__chan_free(w->c);
	free(w);
	return (size_t)len;
}

/* Load a whole stream with loader l (set up by the caller) until EOS;
 * verify: also check the digest. Returns 0 or the first error. */
static int load_with(const uint8_t *data, size_t len, struct vmig__loader *l, bool verify)
{
	struct vmig__reader *r = malloc(sizeof(*r));
	uint8_t type;
	int ret;

	vmig__reader_init_mem(r, data, len);
	l->r = r;
	ret = vmig__load_preamble(l);
	while (!ret && !l->eos)
		ret = vmig__load_record(l, &type);
	if (!ret && verify)
		ret = vmig__load_verify(l);
	vmig__loader_release(l);
	free(r);
	return ret;
}

/* Load a whole main-channel stream into dst. */
static int load_all(const uint8_t *data, size_t len, struct side *dst, struct vmig__err *err)
{
	struct vmig__loader l = {.blocks = &dst->blk, .nblocks = 1, .err = err};

	return load_with(data, len, &l, true);
}

static void test_roundtrip(void **state)
{
	struct side src, dst;
	struct vmig__err err = {{0}};
	uint8_t *data;
	size_t len;

	side_init(&src);
	side_init(&dst);
	len = build_stream(&data, &src, true);
	assert_int_equal(load_all(data, len, &dst, &err), 0);
	assert_memory_equal(src.ram, dst.ram, NPAGES * VMIG_PAGE_SIZE);
	/* Page 7 arrived with data, page 8 as a zero page that stays a hole. */
	assert_true(vmig__bitmap_test(dst.received, 7));
	assert_false(vmig__bitmap_test(dst.zero, 7));
	assert_true(vmig__bitmap_test(dst.received, 8));
	assert_true(vmig__bitmap_test(dst.zero, 8));
	free(data);
	free(src.ram);
	free(dst.ram);
}

static void test_truncated_everywhere(void **state)
{
	struct side src, dst;
	uint8_t *data;
	size_t len;

	side_init(&src);
	side_init(&dst);
	len = build_stream(&data, &src, true);
	for (size_t cut = 0; cut < len; cut += (cut < 256 ? 1 : 97)) {
		struct vmig__err err = {{0}};
		uint8_t *copy = malloc(cut ? cut : 1);

		memcpy(copy, data, cut);
		assert_int_not_equal(load_all(copy, cut, &dst, &err), 0);
		assert_non_null(strstr(err.msg, "ended early"));
		free(copy);
	}
	free(data);
	free(src.ram);
	free(dst.ram);
}

static void test_corrupt_page_detected(void **state)
{
	struct side src, dst;
	struct vmig__err err = {{0}};
	uint8_t *data;
	size_t len;

	side_init(&src);
	side_init(&dst);
	len = build_stream(&data, &src, true);
	/* Flip a byte in the middle of the page data (after headers). */
	data[len / 2] ^= 0x40;
	assert_int_equal(load_all(data, len, &dst, &err), -EBADMSG);
	assert_non_null(strstr(err.msg, "digest mismatch"));
	free(data);
	free(src.ram);
	free(dst.ram);
}

static void test_bad_preamble(void **state)
{
	struct side src, dst;
	struct vmig__err err = {{0}};
	uint8_t *data;
	size_t len;

	side_init(&src);
	side_init(&dst);
	len = build_stream(&data, &src, true);
	data[8] = 7; /* version */
	assert_int_equal(load_all(data, len, &dst, &err), -EPROTONOSUPPORT);
	assert_non_null(strstr(err.msg, "version 7"));
	memset(&err, 0, sizeof(err));
	data[0] = 'X';
	assert_int_equal(load_all(data, len, &dst, &err), -EPROTO);
	assert_non_null(strstr(err.msg, "bad magic"));
	free(data);
	free(src.ram);
	free(dst.ram);
}

static void test_missing_state_rejected(void **state)
{
	struct side src, dst;
	struct vmig__err err = {{0}};
	uint8_t *data;
	size_t len;

	side_init(&src);
	side_init(&dst);
	len = build_stream(&data, &src, false);
	assert_int_equal(load_all(data, len, &dst, &err), -EPROTO);
	assert_non_null(strstr(err.msg, "before device state"));
	free(data);
	free(src.ram);
	free(dst.ram);
}

/* A page run that reaches past the end of its block is refused, and
 * nothing is written outside the block. */
static void test_out_of_range_run(void **state)
{
	uint8_t buf[sizeof(struct vmig_wire_preamble) + 256];
	struct vmig_wire_preamble pre = {.version = VMIG_STREAM_VERSION};
	struct vmig_wire_rec rec = {.type = VMIG_REC_BLOCKS};
	struct vmig_wire_block wb = {.name_len = 6, .page_size = VMIG_PAGE_SIZE,
				     .size = NPAGES * VMIG_PAGE_SIZE};
	struct vmig_wire_pages pg = {.block = 0, .npages = 2, .first = NPAGES - 1};
	uint32_t one = 1;
	size_t off = 0;
	struct side dst;
	struct vmig__err err = {{0}};

	side_init(&dst);
	memcpy(pre.magic, VMIG_STREAM_MAGIC, 8);
	memcpy(buf, &pre, sizeof(pre));
	off += sizeof(pre);
	rec.len = 4 + sizeof(wb) + 6;
	memcpy(buf + off, &rec, sizeof(rec));
	off += sizeof(rec);
	memcpy(buf + off, &one, 4);
	memcpy(buf + off + 4, &wb, sizeof(wb));
	memcpy(buf + off + 4 + sizeof(wb), "pc.ram", 6);
	off += rec.len;
	rec.type = VMIG_REC_ZERO;
	rec.len = sizeof(pg);
	memcpy(buf + off, &rec, sizeof(rec));
	off += sizeof(rec);
	memcpy(buf + off, &pg, sizeof(pg));
	off += sizeof(pg);
	assert_int_equal(load_all(buf, off, &dst, &err), -EPROTO);
	assert_non_null(strstr(err.msg, "outside its RAM block"));
	free(dst.ram);
}

static void test_zero_record_clears_received_page(void **state)
{
	struct side src, dst;
	struct vmig__err err = {{0}};
	uint8_t *data;
	size_t len;

	side_init(&src);
	side_init(&dst);
	len = build_stream(&data, &src, true);
	/* Pretend page 9 held data from an earlier round. */
	memset(dst.ram + 9 * VMIG_PAGE_SIZE, 0xee, VMIG_PAGE_SIZE);
	vmig__bitmap_set(dst.received, 9);
	vmig__bitmap_clear(dst.zero, 9);
	assert_int_equal(load_all(data, len, &dst, &err), 0);
	assert_true(vmig__page_is_zero(dst.ram + 9 * VMIG_PAGE_SIZE));
	free(data);
	free(src.ram);
	free(dst.ram);
}

static void test_zero_detection(void **state)
{
	uint8_t *p = calloc(1, VMIG_PAGE_SIZE);

	assert_true(vmig__page_is_zero(p));
	for (size_t at = 0; at < VMIG_PAGE_SIZE; at += 511) {
		p[at] = 1;
		assert_false(vmig__page_is_zero(p));
		p[at] = 0;
	}
	p[VMIG_PAGE_SIZE - 1] = 1;
	assert_false(vmig__page_is_zero(p));
	free(p);
}

/*
 * A multifd data channel with zstd or zlib: compressible runs go as
 * PAGES_ZSTD or PAGES_ZLIB, a run that does not shrink goes raw, and the
 * loader puts back the exact bytes.
 */
static size_t build_compressed(uint8_t **out, struct side *src, bool zlib)
{
	int fd = memfd_create("stream", 0);
	struct vmig__writer *w = malloc(sizeof(*w));
	uint64_t x = 0x9e3779b97f4a7c15ull;
	off_t len;

	assert_true(fd >= 0);
	assert_non_null(w);
	for (unsigned i = 0; i < 16; i++) /* compressible: a short text, repeated */
		for (unsigned k = 0; k < VMIG_PAGE_SIZE; k++)
			src->ram[i * VMIG_PAGE_SIZE + k] = "multifd zstd "[(k + i) % 13];
	for (size_t k = 16 * VMIG_PAGE_SIZE; k < 17 * VMIG_PAGE_SIZE; k++) { /* random */
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		src->ram[k] = (uint8_t)x;
	}
	vmig__writer_init(w, vmig__chan_from_fd(dup(fd)));
	assert_int_equal(vmig__writer_compress(w, zlib, 3), 0);
	vmig__writer_preamble(w, VMIG_CHAN_MULTIFD, 0, (struct vmig_wire_sid){42, 0});
	vmig__writer_pages(w, 0, 0, 16, src->ram, NULL);
	vmig__writer_pages(w, 0, 16, 1, src->ram + 16 * VMIG_PAGE_SIZE, NULL);
	vmig__writer_rec(w, VMIG_REC_EOS, NULL, 0);
	assert_int_equal(vmig__writer_flush(w), 0);
	vmig__writer_release(w);
	len = lseek(fd, 0, SEEK_CUR);
	*out = malloc((size_t)len);
	assert_int_equal(pread(fd, *out, (size_t)len, 0), len);
	close(fd);
	vmig__chan_free(w->c);
	free(w);
	return (size_t)len;
}

static int load_data_channel(const uint8_t *data, size_t len, struct side *dst,
			     struct vmig__err *err)
{
	static uint8_t bounce[VMIG_REC_MAX_PAGES * VMIG_PAGE_SIZE];
	struct vmig__loader l = {.blocks = &dst->blk, .nblocks = 1, .err = err, .bounce = bounce,
				 .blocks_ok = true, .mf_data = true, .mf_channels = 1};

	return load_with(data, len, &l, false);
}

static void compressed_data_channel(bool zlib)
{
	struct side src, dst;
	struct vmig__err err = {{0}};
	uint8_t *data;
	size_t len;

	side_init(&src);
	side_init(&dst);
	len = build_compressed(&data, &src, zlib);
	assert_int_equal(data[sizeof(struct vmig_wire_preamble)],
			 zlib ? VMIG_REC_PAGES_ZLIB : VMIG_REC_PAGES_ZSTD);
	/* 16 pages shrank to a few hundred bytes; the random page went raw. */
	assert_true(len < 2 * VMIG_PAGE_SIZE);
	assert_true(len > VMIG_PAGE_SIZE);
	assert_int_equal(load_data_channel(data, len, &dst, &err), 0);
	assert_memory_equal(src.ram, dst.ram, 17 * VMIG_PAGE_SIZE);
	for (int i = 0; i < 17; i++)
		assert_true(dst.hash[i] == vmig__page_hash(src.ram + i * VMIG_PAGE_SIZE));

	/* A broken frame (its magic, after preamble, header and prefix) is
	 * refused. A flipped literal inside a frame may still decompress: the
	 * page hashes, checked at switch-over, catch that. */
	free(dst.ram);
	side_init(&dst);
	data[sizeof(struct vmig_wire_preamble) + 8 + 16] ^= 0x40;
	assert_int_not_equal(load_data_channel(data, len, &dst, &err), 0);
	assert_non_null(strstr(err.msg, "decompress"));
	free(data);
	free(src.ram);
	free(dst.ram);
}

static void test_compressed_data_channel(void **state)
{
	compressed_data_channel(false);
}

static void test_zlib_data_channel(void **state)
{
	compressed_data_channel(true);
}

/*
 * A page that changes while its run is being compressed must not spoil the
 * run's other pages. Pages A, B, C: B starts as a copy of A, so the
 * compressor encodes B as a match of A at a distance of one page; the
 * first read of C (protected) changes B and gives C the new contents of B.
 * A compressor reading guest RAM then checks C against B as it is now and
 * encodes C as "the page before", while the decoder copies B as the frame
 * holds it: C would arrive as B's old contents, and since C did not change
 * after it was read, it would never be sent again. B changed, so B may
 * arrive stale (it is dirty and goes again in the next round); A and C must
 * arrive as they are.
 */
static uint8_t *trap_run;
static volatile sig_atomic_t trap_fired;

static void fill_random_page(uint8_t *p, uint64_t seed)
{
	uint64_t x = seed | 1;

	for (unsigned k = 0; k < VMIG_PAGE_SIZE; k += 8) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		memcpy(p + k, &x, 8);
	}
}

/*
 * Page hashes and the digest are a contract between two hosts, which may
 * have different vector units: they must be plain XXH3-64, whichever code
 * path of the library computes them.
 */
static void test_hashes_are_xxh3(void **state)
{
	uint8_t *pages = aligned_alloc(VMIG_PAGE_SIZE, 64 * VMIG_PAGE_SIZE);
	uint64_t h[64], *blocks[2] = {h, h + 40}, np[2] = {40, 24};

	(void)state;
	assert_non_null(pages);
	for (unsigned i = 0; i < 64; i++) {
		fill_random_page(pages + i * VMIG_PAGE_SIZE, 0x9e3779b97f4a7c15ull * (i + 1));
		pages[i * VMIG_PAGE_SIZE + i * 61] ^= 0x5a; /* a byte anywhere changes it */
		h[i] = vmig__page_hash(pages + i * VMIG_PAGE_SIZE);
		assert_true(h[i] == XXH3_64bits(pages + i * VMIG_PAGE_SIZE, VMIG_PAGE_SIZE));
	}
	memset(pages, 0, VMIG_PAGE_SIZE);
	assert_true(vmig__page_hash(pages) == XXH3_64bits(pages, VMIG_PAGE_SIZE));
	assert_true(vmig__zero_page_hash() == XXH3_64bits(pages, VMIG_PAGE_SIZE));
	/* The digest runs over the blocks' arrays as if they were one. */
	assert_true(vmig__digest_of_hashes(blocks, np, 2) == XXH3_64bits(h, sizeof(h)));
	free(pages);
}

static void trap_handler(int sig, siginfo_t *si, void *uc)
{
	uint8_t *b = trap_run + VMIG_PAGE_SIZE, *c = trap_run + 2 * VMIG_PAGE_SIZE;
	uint8_t *at = si->si_addr;

	(void)uc;
	if (trap_fired || at < c || at >= c + VMIG_PAGE_SIZE) {
		signal(sig, SIG_DFL); /* a real fault: crash on return */
		return;
	}
	mprotect(c, VMIG_PAGE_SIZE, PROT_READ | PROT_WRITE);
	fill_random_page(b, 2);
	fill_random_page(c, 2);
	trap_fired = 1;
}

static void page_changing_while_compressed(bool zlib)
{
	struct sigaction sa = {.sa_sigaction = trap_handler, .sa_flags = SA_SIGINFO}, old;
	struct vmig__err err = {{0}};
	struct vmig__writer *w = malloc(sizeof(*w));
	int fd = memfd_create("stream", 0);
	struct side dst;
	uint8_t *data;
	off_t len;

	assert_non_null(w);
	assert_true(fd >= 0);
	trap_run = mmap(NULL, 3 * VMIG_PAGE_SIZE, PROT_READ | PROT_WRITE,
			MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	assert_true(trap_run != MAP_FAILED);
	fill_random_page(trap_run, 1);
	memcpy(trap_run + VMIG_PAGE_SIZE, trap_run, VMIG_PAGE_SIZE);
	fill_random_page(trap_run + 2 * VMIG_PAGE_SIZE, 3);
	assert_int_equal(mprotect(trap_run + 2 * VMIG_PAGE_SIZE, VMIG_PAGE_SIZE, PROT_NONE), 0);
	trap_fired = 0;
	sigemptyset(&sa.sa_mask);
	assert_int_equal(sigaction(SIGSEGV, &sa, &old), 0);

	vmig__writer_init(w, vmig__chan_from_fd(dup(fd)));
	assert_int_equal(vmig__writer_compress(w, zlib, 3), 0);
	vmig__writer_preamble(w, VMIG_CHAN_MULTIFD, 0, (struct vmig_wire_sid){42, 0});
	vmig__writer_pages(w, 0, 0, 3, trap_run, NULL);
	vmig__writer_rec(w, VMIG_REC_EOS, NULL, 0);
	assert_int_equal(vmig__writer_flush(w), 0);
	sigaction(SIGSEGV, &old, NULL);
	assert_true(trap_fired);
	vmig__writer_release(w);
	vmig__chan_free(w->c);
	free(w);

	len = lseek(fd, 0, SEEK_CUR);
	data = malloc((size_t)len);
	assert_non_null(data);
	assert_int_equal(pread(fd, data, (size_t)len, 0), len);
	close(fd);
	/* It did go compressed (A and B are one page twice). */
	assert_int_equal(data[sizeof(struct vmig_wire_preamble)],
			 zlib ? VMIG_REC_PAGES_ZLIB : VMIG_REC_PAGES_ZSTD);
	side_init(&dst);
	assert_int_equal(load_data_channel(data, (size_t)len, &dst, &err), 0);
	assert_memory_equal(dst.ram, trap_run, VMIG_PAGE_SIZE);
	assert_memory_equal(dst.ram + 2 * VMIG_PAGE_SIZE, trap_run + 2 * VMIG_PAGE_SIZE,
			    VMIG_PAGE_SIZE);
	free(data);
	free(dst.ram);
	munmap(trap_run, 3 * VMIG_PAGE_SIZE);
}

static void test_zstd_page_changing_while_compressed(void **state)
{
	page_changing_while_compressed(false);
}

static void test_zlib_page_changing_while_compressed(void **state)
{
	page_changing_while_compressed(true);
}

/* ---- zero-copy sends ---------------------------------------------------- */

/*
 * A TCP connection over loopback: *wfd the writer's end, *rfd the reader's.
 * The reader's receive buffer is tiny and the writer's send buffer large,
 * so that what the reader has not read yet stays queued in the writer's
 * socket, where a zero-copy send still reads it from the writer's memory.
 */
static void tcp_pair(int *wfd, int *rfd)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t alen = sizeof(a);
	int small = 4096, big = 1 << 20;
	int l = socket(AF_INET, SOCK_STREAM, 0);

	assert_true(l >= 0);
	assert_int_equal(setsockopt(l, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)), 0);
	assert_int_equal(bind(l, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(l, 1), 0);
	assert_int_equal(getsockname(l, (struct sockaddr *)&a, &alen), 0);
	*wfd = socket(AF_INET, SOCK_STREAM, 0);
	assert_true(*wfd >= 0);
	assert_int_equal(setsockopt(*wfd, SOL_SOCKET, SO_SNDBUF, &big, sizeof(big)), 0);
	assert_int_equal(connect(*wfd, (struct sockaddr *)&a, sizeof(a)), 0);
	*rfd = accept(l, NULL, NULL);
	assert_true(*rfd >= 0);
	close(l);
}

struct slow_reader {
	int fd;
	int started; /* atomic: set just before the first read */
	uint8_t *data;
	size_t len;
};

/* Wait 200 ms, then read everything up to the end of the stream. */
static void *slow_read(void *arg)
{
	struct slow_reader *r = arg;
	size_t cap = 1 << 20;
	ssize_t n;

	usleep(200000);
	r->data = malloc(cap);
	__atomic_store_n(&r->started, 1, __ATOMIC_RELEASE);
	while (r->data && (n = read(r->fd, r->data + r->len, cap - r->len)) > 0) {
		r->len += (size_t)n;
		if (r->len == cap)
			r->data = realloc(r->data, cap *= 2);
	}
	return NULL;
}

/*
 * zero-copy-send: n pages, one per flush, to a reader that reads nothing
 * for 200 ms, then the end of the stream and vmig__writer_drain(). The
 * pages are overwritten right after drain returns, and must still arrive
 * as they were: drain returns only once the kernel is done with every one
 * (so the reader must have started). On loopback the kernel copies every
 * zero-copy send when it delivers it, and says so: drain reports it (what
 * dirty-sync-missed-zero-copy counts).
 */
static void zero_copy_slow_reader(unsigned n)
{
	struct vmig__writer *w = malloc(sizeof(*w));
	struct slow_reader r = {0};
	struct vmig__err err = {{0}};
	struct side src, dst;
	pthread_t t;
	bool copied;
	int wfd;
	uint8_t *sent;

	assert_non_null(w);
	side_init(&src);
	side_init(&dst);
	for (unsigned i = 0; i < NPAGES; i++)
		fill_random_page(src.ram + i * VMIG_PAGE_SIZE, i + 1);
	sent = malloc(NPAGES * VMIG_PAGE_SIZE);
	assert_non_null(sent);
	memcpy(sent, src.ram, NPAGES * VMIG_PAGE_SIZE);
	tcp_pair(&wfd, &r.fd);
	assert_int_equal(pthread_create(&t, NULL, slow_read, &r), 0);

	vmig__writer_init(w, vmig__chan_from_fd(wfd));
	vmig__writer_preamble(w, VMIG_CHAN_MULTIFD, 0, (struct vmig_wire_sid){42, 0});
	assert_int_equal(vmig__writer_zerocopy(w, &err), 0);
	for (unsigned i = 0; i < n; i++) {
		vmig__writer_pages(w, 0, i, 1, src.ram + i * VMIG_PAGE_SIZE, NULL);
		assert_int_equal(vmig__writer_flush(w), 0);
	}
	vmig__writer_rec(w, VMIG_REC_EOS, NULL, 0);
	assert_int_equal(vmig__writer_drain(w, &copied), 0);
	assert_true(__atomic_load_n(&r.started, __ATOMIC_ACQUIRE));
	memset(src.ram, 0xaa, NPAGES * VMIG_PAGE_SIZE);
	assert_true(copied);
	assert_true(vmig__chan_zc_sent(w->c) >= n);
	/* Nothing was sent since: nothing to report. */
	assert_int_equal(vmig__writer_drain(w, &copied), 0);
	assert_false(copied);
	vmig__writer_release(w);
	vmig__chan_free(w->c);
	free(w);
	pthread_join(t, NULL);
	close(r.fd);

	assert_non_null(r.data);
	assert_int_equal(load_data_channel(r.data, r.len, &dst, &err), 0);
	assert_memory_equal(dst.ram, sent, (size_t)n * VMIG_PAGE_SIZE);
	free(r.data);
	free(sent);
	free(src.ram);
	free(dst.ram);
}

/* Fewer flushes than the writer has header buffers: only drain waits. */
/*
 * Hashes asked of vmig__writer_pages are taken by the flush that sends the
 * run, from the pages as they are then; also when that write fails (part of
 * it may have arrived), and from the private copy when the run is compressed.
 */
static void check_flush_hashes(int level, bool fail)
{
	enum { N = 8 };
	uint8_t *ram = aligned_alloc(VMIG_PAGE_SIZE, N * VMIG_PAGE_SIZE);
	struct vmig__writer *w = malloc(sizeof(*w));
	uint64_t hashes[N];
	int fds[2];

	assert_non_null(ram);
	assert_non_null(w);
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
	for (int i = 0; i < N; i++)
		memset(ram + i * VMIG_PAGE_SIZE, level ? 'a' : 0x30 + i, VMIG_PAGE_SIZE);
	vmig__writer_init(w, vmig__chan_from_fd(fds[0]));
	if (level)
		assert_int_equal(vmig__writer_compress(w, false, level), 0);
	memset(hashes, 0xee, sizeof(hashes));
	vmig__writer_pages(w, 0, 0, N, ram, hashes);
	if (!level) /* not before the flush: the pages may still change */
		for (int i = 0; i < N; i++)
			assert_true(hashes[i] == 0xeeeeeeeeeeeeeeeeull);
	/* A compressed run is hashed from its copy, taken above. */
	memset(ram, 'z', VMIG_PAGE_SIZE);
	if (fail)
		close(fds[1]);
	assert_int_equal(vmig__writer_flush(w) != 0, fail);
	for (int i = 0; i < N; i++) {
		uint8_t page[VMIG_PAGE_SIZE];

		memset(page, i == 0 && !level ? 'z' : level ? 'a' : 0x30 + i, sizeof(page));
		assert_true(hashes[i] == vmig__page_hash(page));
	}
	if (!fail)
		close(fds[1]);
	vmig__chan_free(w->c);
	vmig__writer_release(w);
	free(w);
	free(ram);
}

static void test_flush_takes_hashes(void **state)
{
	(void)state;
	signal(SIGPIPE, SIG_IGN);
	check_flush_hashes(0, false);
	check_flush_hashes(0, true);
	check_flush_hashes(3, false);
}

/*
 * Read the page records the writer has written so far, without waiting:
 * their page counts go to npages[], and the number of records is returned.
 */
static unsigned read_page_records(int fd, uint32_t *npages, unsigned max)
{
	unsigned n = 0;

	for (;;) {
		struct vmig_wire_rec rec;
		struct vmig_wire_pages pg;
		ssize_t got = recv(fd, &rec, sizeof(rec), MSG_DONTWAIT);

		if (got < 0 && errno == EAGAIN)
			return n;
		assert_int_equal(got, sizeof(rec));
		assert_int_equal(rec.type, VMIG_REC_PAGES);
		assert_int_equal(recv(fd, &pg, sizeof(pg), MSG_WAITALL), sizeof(pg));
		assert_int_equal(rec.len, sizeof(pg) + (uint64_t)pg.npages * VMIG_PAGE_SIZE);
		for (uint64_t left = rec.len - sizeof(pg); left;) {
			uint8_t buf[VMIG_PAGE_SIZE];

			got = recv(fd, buf, sizeof(buf), MSG_WAITALL);
			assert_int_equal(got, sizeof(buf));
			left -= (uint64_t)got;
		}
		assert_true(n < max);
		npages[n++] = pg.npages;
	}
}

/*
 * A smaller flush_bytes (the post-copy push's) bounds each write: a run of
 * pages larger than that goes as several records, each written as soon as
 * the next is queued, not all at the next explicit flush. The default
 * keeps a whole run in one record. With compression on, a run that does not
 * shrink (random pages) goes raw, and is split the same way.
 */
static void test_flush_bytes_bound_each_write(void **state)
{
	enum { N = VMIG_REC_MAX_PAGES };
	uint8_t *ram = aligned_alloc(VMIG_PAGE_SIZE, N * VMIG_PAGE_SIZE);
	struct vmig__writer *w = malloc(sizeof(*w));
	const uint32_t cap = VMIG_WRITER_FLUSH_BYTES_POSTCOPY / VMIG_PAGE_SIZE;
	uint64_t hashes[N];
	uint32_t npages[N];
	int fds[2], big = 4 << 20;

	(void)state;
	assert_non_null(ram);
	assert_non_null(w);
	assert_true(cap > 0 && N % cap == 0 && N / cap >= 2);
	for (unsigned i = 0; i < N; i++)
		fill_random_page(ram + (size_t)i * VMIG_PAGE_SIZE, 0x9e3779b97f4a7c15ull * (i + 1));
	for (int mode = 0; mode < 3; mode++) {
		bool post = mode > 0;

		assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
		assert_int_equal(setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big)), 0);
		vmig__writer_init(w, vmig__chan_from_fd(fds[0]));
		if (post)
			w->flush_bytes = VMIG_WRITER_FLUSH_BYTES_POSTCOPY;
		if (mode == 2)
			assert_int_equal(vmig__writer_compress(w, false, 1), 0);
		memset(hashes, 0xee, sizeof(hashes));
		vmig__writer_pages(w, 0, 0, N, ram, hashes);
		unsigned before = read_page_records(fds[1], npages, N);

		assert_int_equal(before, post ? N / cap - 1 : 0);
		for (unsigned i = 0; i < before; i++)
			assert_int_equal(npages[i], cap);
		/* The pages written are hashed; the ones still queued are not. */
		for (unsigned i = 0; i < N; i++)
			assert_true(
			    (hashes[i] == vmig__page_hash(ram + (size_t)i * VMIG_PAGE_SIZE)) ==
			    (i < before * cap));
		assert_int_equal(vmig__writer_flush(w), 0);
		assert_int_equal(read_page_records(fds[1], npages, N), 1);
		assert_int_equal(npages[0], post ? cap : N);
		vmig__chan_free(w->c);
		vmig__writer_release(w);
		close(fds[1]);
	}
	free(w);
	free(ram);
}

/*
 * vmig__writer_stage hands out room for copies of page runs, which queued
 * records then point into until they are written. A flush in the middle of
 * a run (here: the header buffer fills up) writes part of it and leaves the
 * rest queued, so the room of that rest must not be handed out again before
 * the next flush: run B is staged right after such a flush, while the end
 * of run A still waits, and every page must arrive as it was copied.
 */
static void test_stage_outlives_a_flush_within_a_run(void **state)
{
	enum { RUN = 8, ZEROS = VMIG_WRITER_HDRBUF / 24 - 5 };
	struct vmig__writer *w = malloc(sizeof(*w));
	uint8_t *a, *b, page[VMIG_PAGE_SIZE], want[VMIG_PAGE_SIZE];
	unsigned seen = 0;
	int fds[2], big = 4 << 20;

	(void)state;
	assert_non_null(w);
	assert_int_equal(sizeof(struct vmig_wire_rec) + sizeof(struct vmig_wire_pages), 24);
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
	assert_int_equal(setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big)), 0);
	vmig__writer_init(w, vmig__chan_from_fd(fds[0]));
	for (unsigned i = 0; i < ZEROS; i++) /* headers only: the buffer nearly full */
		vmig__writer_zero(w, 0, 1000 + i, 1);
	a = vmig__writer_stage(w, RUN * VMIG_PAGE_SIZE);
	assert_non_null(a);
	for (unsigned i = 0; i < RUN; i++) {
		fill_random_page(a + i * VMIG_PAGE_SIZE, 0xa000 + i);
		vmig__writer_pages(w, 0, i, 1, a + i * VMIG_PAGE_SIZE, NULL);
	}
	assert_true(w->bytes > 0);		       /* flushed within run A */
	assert_true(w->niov > 0 && w->niov < 2 * RUN); /* and the end of A still queued */
	b = vmig__writer_stage(w, RUN * VMIG_PAGE_SIZE);
	assert_non_null(b);
	for (unsigned i = 0; i < RUN; i++)
		fill_random_page(b + i * VMIG_PAGE_SIZE, 0xb000 + i);
	vmig__writer_pages(w, 0, 100, RUN, b, NULL);
	assert_int_equal(vmig__writer_flush(w), 0);

	for (;;) {
		struct vmig_wire_rec rec;
		struct vmig_wire_pages pg;
		ssize_t got = recv(fds[1], &rec, sizeof(rec), MSG_DONTWAIT);

		if (got < 0 && errno == EAGAIN)
			break;
		assert_int_equal(got, sizeof(rec));
		assert_int_equal(recv(fds[1], &pg, sizeof(pg), MSG_WAITALL), sizeof(pg));
		if (rec.type == VMIG_REC_ZERO)
			continue;
		assert_int_equal(rec.type, VMIG_REC_PAGES);
		for (uint32_t i = 0; i < pg.npages; i++) {
			uint64_t at = pg.first + i;

			assert_int_equal(recv(fds[1], page, sizeof(page), MSG_WAITALL),
					 sizeof(page));
			fill_random_page(want, at < 100 ? 0xa000 + at : 0xb000 + at - 100);
			assert_memory_equal(page, want, sizeof(page));
			seen++;
		}
	}
	assert_int_equal(seen, 2 * RUN);

	/* Too large a run, or a writer that reads guest RAM its own way. */
	assert_null(vmig__writer_stage(w, (VMIG_REC_MAX_PAGES + 1) * VMIG_PAGE_SIZE));
	assert_int_equal(vmig__writer_compress(w, false, 1), 0);
	assert_null(vmig__writer_stage(w, VMIG_PAGE_SIZE));
	vmig__writer_release(w);
	vmig__chan_free(w->c);
	close(fds[1]);
	free(w);
}

static void test_zero_copy_drain_waits_for_the_kernel(void **state)
{
	zero_copy_slow_reader(6);
}

/* Four times as many flushes as header buffers: the first flushes' headers
 * are still queued (unread by the kernel) when their buffers come round
 * again. The writer must wait rather than overwrite them, or pages would
 * land in the wrong places. */
static void test_zero_copy_headers_wait_for_the_kernel(void **state)
{
	zero_copy_slow_reader(NPAGES);
}

/* The child of test_zero_copy_without_locked_memory: 0 if all went well. */
static int zero_copy_no_memlock_child(int wfd, const uint8_t *ram)
{
	struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3};
	struct __user_cap_data_struct cap[2];
	struct rlimit none = {0, 0};
	struct vmig__writer *w = malloc(sizeof(*w));
	struct vmig__err err = {{0}};
	bool copied = false;

	/* No allowance, and no capability to go past it. */
	if (!w || setrlimit(RLIMIT_MEMLOCK, &none))
		return 2;
	if (!syscall(SYS_capget, &hdr, cap)) {
		cap[CAP_IPC_LOCK / 32].effective &= ~(1u << (CAP_IPC_LOCK % 32));
		cap[CAP_IPC_LOCK / 32].permitted &= ~(1u << (CAP_IPC_LOCK % 32));
		if (syscall(SYS_capset, &hdr, cap))
			return 3;
	}
	vmig__writer_init(w, vmig__chan_from_fd(wfd));
	vmig__writer_preamble(w, VMIG_CHAN_MULTIFD, 0, (struct vmig_wire_sid){42, 0});
	if (vmig__writer_zerocopy(w, &err))
		return 4;
	for (unsigned i = 0; i < 4; i++) {
		vmig__writer_pages(w, 0, i, 1, ram + i * VMIG_PAGE_SIZE, NULL);
		if (vmig__writer_flush(w))
			return 5;
	}
	vmig__writer_rec(w, VMIG_REC_EOS, NULL, 0);
	if (vmig__writer_drain(w, &copied))
		return 6;
	if (!copied) /* every send went by copy: dirty-sync-missed-zero-copy */
		return 7;
	if (vmig__chan_zc_sent(w->c)) /* and none zero-copy */
		return 8;
	return 0;
}

/*
 * Without CAP_IPC_LOCK and with a locked-memory limit of 0, the kernel
 * refuses every zero-copy send (ENOBUFS): the writer sends by copy, every
 * page arrives, and drain says the sends were copied. In a child process,
 * which drops the capability.
 */
static void test_zero_copy_without_locked_memory(void **state)
{
	struct vmig__err err = {{0}};
	struct side src, dst;
	size_t cap = 64 << 10, len = 0;
	uint8_t *data = malloc(cap);
	int wfd, rfd, status;
	ssize_t n;
	pid_t pid;

	assert_non_null(data);
	side_init(&src);
	side_init(&dst);
	for (unsigned i = 0; i < 4; i++)
		fill_random_page(src.ram + i * VMIG_PAGE_SIZE, i + 7);
	tcp_pair(&wfd, &rfd);
	pid = fork();
	assert_true(pid >= 0);
	if (!pid)
		_exit(zero_copy_no_memlock_child(wfd, src.ram));
	close(wfd);
	while (len < cap && (n = read(rfd, data + len, cap - len)) > 0)
		len += (size_t)n;
	close(rfd);
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	assert_int_equal(load_data_channel(data, len, &dst, &err), 0);
	assert_memory_equal(dst.ram, src.ram, 4 * VMIG_PAGE_SIZE);
	free(data);
	free(src.ram);
	free(dst.ram);
}

/* Zero-copy needs a plain TCP socket and no compression: clear refusals. */
static void test_zero_copy_refusals(void **state)
{
	struct vmig__writer *w = malloc(sizeof(*w));
	struct vmig__err err = {{0}};
	int sv[2];

	assert_non_null(w);
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	vmig__writer_init(w, vmig__chan_from_fd(sv[0]));
	assert_int_not_equal(vmig__writer_zerocopy(w, &err), 0);
	assert_non_null(strstr(err.msg, "tcp:"));
	assert_int_equal(vmig__writer_compress(w, false, 1), 0);
	assert_int_equal(vmig__writer_zerocopy(w, &err), -EINVAL);
	assert_non_null(strstr(err.msg, "multifd-compression"));
	vmig__writer_release(w);
	vmig__chan_free(w->c);
	close(sv[1]);
	free(w);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_roundtrip),
	    cmocka_unit_test(test_truncated_everywhere),
	    cmocka_unit_test(test_corrupt_page_detected),
	    cmocka_unit_test(test_bad_preamble),
	    cmocka_unit_test(test_missing_state_rejected),
	    cmocka_unit_test(test_out_of_range_run),
	    cmocka_unit_test(test_zero_record_clears_received_page),
	    cmocka_unit_test(test_zero_detection),
	    cmocka_unit_test(test_hashes_are_xxh3),
	    cmocka_unit_test(test_compressed_data_channel),
	    cmocka_unit_test(test_zlib_data_channel),
	    cmocka_unit_test(test_zstd_page_changing_while_compressed),
	    cmocka_unit_test(test_zlib_page_changing_while_compressed),
	    cmocka_unit_test(test_flush_takes_hashes),
	    cmocka_unit_test(test_flush_bytes_bound_each_write),
	    cmocka_unit_test(test_stage_outlives_a_flush_within_a_run),
	    cmocka_unit_test(test_zero_copy_drain_waits_for_the_kernel),
	    cmocka_unit_test(test_zero_copy_headers_wait_for_the_kernel),
	    cmocka_unit_test(test_zero_copy_without_locked_memory),
	    cmocka_unit_test(test_zero_copy_refusals),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
