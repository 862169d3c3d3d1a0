// SPDX-License-Identifier: MIT
/*
 * Unit tests of the storage stream reader and writer
 * (tools/vmig-blk/sstream.c): what the writer puts reads back as it was
 * meant, byte for byte as docs/storage-migration.md lays it out; and every
 * kind of bad input (preamble, header, each record type, ranges at and past
 * the end of the disk, 64-bit wrap-around, rounds, records after the end,
 * the wrong direction, every truncation of a good stream) is refused with
 * an error, never returned as a record. The writer refuses what the reader
 * would, and keeps its first error.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "vmig-blk/sstream.h"

#define MIB (1u << 20)

struct mem {
	uint8_t buf[4 * MIB];
	size_t len, rpos, limit; /* limit: bytes the reader may see */
	int fail_at;		 /* writes fail once len would pass it; 0: never */
};

static int mem_write(void *opaque, const void *buf, size_t n)
{
	struct mem *m = opaque;

	if (m->fail_at && m->len + n > (size_t)m->fail_at)
		return -ENOSPC;
	assert_true(m->len + n <= sizeof(m->buf));
	memcpy(m->buf + m->len, buf, n);
	m->len += n;
	return 0;
}

static ssize_t mem_read(void *opaque, void *buf, size_t n)
{
	struct mem *m = opaque;
	size_t end = m->limit < m->len ? m->limit : m->len;

	if (m->rpos >= end)
		return -EPIPE;
	if (n > end - m->rpos)
		n = end - m->rpos;
	/* A byte at a time now and then, as a socket may deliver it. */
	if (n > 1 && m->rpos % 7 == 3)
		n = 1;
	memcpy(buf, m->buf + m->rpos, n);
	m->rpos += n;
	return (ssize_t)n;
}

static const struct vblk_ss_geom geom = {
    .disk_size = 2 * MIB, .block_size = 512, .granularity = 65536, .session = {9, 8, 7}};

static struct mem *mem_new(void)
{
	struct mem *m = calloc(1, sizeof(*m));

	assert_non_null(m);
	m->limit = SIZE_MAX;
	return m;
}

/* A reader over m for dir, with the preamble read for TO_DEST. */
static int reader(struct vblk_ss_reader *r, struct mem *m, enum vblk_ss_dir dir)
{
	static uint8_t buf[VBLK_SS_MAX_DATA];
	struct vblk_ss_geom g;

	vblk_ss_reader_init(r, dir, mem_read, m, dir == VBLK_SS_TO_DEST ? buf : NULL);
	if (dir == VBLK_SS_TO_SOURCE) {
		vblk_ss_reader_set_geom(r, &geom);
		return 0;
	}
	return vblk_ss_read_preamble(r, &geom, &g);
}

static void test_roundtrip(void **state)
{
	struct mem *m = mem_new();
	struct vblk_ss_writer w;
	struct vblk_ss_reader r;
	struct vblk_ss_rec rec;
	struct vblk_ss_geom g;
	static uint8_t data[VBLK_SS_MAX_DATA];

	for (size_t i = 0; i < sizeof(data); i++)
		data[i] = (uint8_t)(i * 31 + 7);
	vblk_ss_writer_init(&w, mem_write, m, &geom);
	vblk_ss_put_preamble(&w);
	vblk_ss_put_data(&w, 0, data, 512);
	vblk_ss_put_data(&w, geom.disk_size - VBLK_SS_MAX_DATA, data, VBLK_SS_MAX_DATA);
	vblk_ss_put_zero(&w, 4096, 65536, true);
	vblk_ss_put_sync(&w, 1, 131072);
	vblk_ss_put_flush(&w);
	vblk_ss_put_sync(&w, 5, 0);
	assert_int_equal(vblk_ss_put_eos(&w), 0);
	assert_int_equal(w.pos, m->len);
	/* The preamble, as the document lays it out. */
	assert_memory_equal(m->buf, "VMIGBLKS\x01\0\0\0\0\0\0\0", 16);
	assert_memory_equal(m->buf + 16, "\0\0\x20\0\0\0\0\0\0\x02\0\0\0\0\x01\0", 16);
	assert_memory_equal(m->buf + 32, "\x09\x08\x07", 3);
	/* The first record: DATA, 8 + 512 bytes, offset 0. */
	assert_memory_equal(m->buf + 48, "\x01\0\0\0\x08\x02\0\0", 8);

	vblk_ss_reader_init(&r, VBLK_SS_TO_DEST, mem_read, m, (uint8_t[VBLK_SS_MAX_DATA]){0});
	assert_int_equal(vblk_ss_read_preamble(&r, &geom, &g), 0);
	assert_int_equal(g.disk_size, geom.disk_size);
	assert_int_equal(g.granularity, 65536);
	assert_memory_equal(g.session, geom.session, 16);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_DATA);
	assert_int_equal(rec.offset, 0);
	assert_int_equal(rec.length, 512);
	assert_memory_equal(rec.data, data, 512);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.offset, geom.disk_size - VBLK_SS_MAX_DATA);
	assert_int_equal(rec.length, VBLK_SS_MAX_DATA);
	assert_memory_equal(rec.data, data, VBLK_SS_MAX_DATA);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_ZERO);
	assert_int_equal(rec.flags, VBLK_SS_ZERO_F_UNMAP);
	assert_int_equal(rec.offset, 4096);
	assert_int_equal(rec.length, 65536);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_SYNC);
	assert_int_equal(rec.round, 1);
	assert_int_equal(rec.dirty_bytes, 131072);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_FLUSH);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.round, 5);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_EOS);
	assert_int_equal(r.pos, m->len);
	/* Nothing may follow the end. */
	assert_int_equal(vblk_ss_read_record(&r, &rec), -EPROTO);
	free(m);
}

static void test_return_path(void **state)
{
	struct mem *m = mem_new();
	struct vblk_ss_writer w;
	struct vblk_ss_reader r;
	struct vblk_ss_rec rec;
	char long_text[400];

	memset(long_text, 'x', sizeof(long_text) - 1);
	long_text[sizeof(long_text) - 1] = 0;
	vblk_ss_writer_init(&w, mem_write, m, &geom);
	vblk_ss_put_ack(&w, 1);
	vblk_ss_put_read_req(&w, MIB, MIB);
	vblk_ss_put_ack(&w, 2);
	assert_int_equal(vblk_ss_put_error(&w, long_text), 0);
	assert_int_equal(reader(&r, m, VBLK_SS_TO_SOURCE), 0);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_ACK);
	assert_int_equal(rec.round, 1);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_READ_REQ);
	assert_int_equal(rec.offset, MIB);
	assert_int_equal(rec.length, MIB);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.round, 2);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_ERROR);
	assert_int_equal(strlen(rec.text), VBLK_SS_MAX_TEXT);	  /* cut, not refused */
	assert_int_equal(vblk_ss_read_record(&r, &rec), -EPROTO); /* ERROR ends it */
	/* DONE ends a return path as well. */
	m->len = m->rpos = 0;
	vblk_ss_writer_init(&w, mem_write, m, &geom);
	vblk_ss_put_done(&w);
	vblk_ss_put_ack(&w, 1);
	assert_int_equal(reader(&r, m, VBLK_SS_TO_SOURCE), 0);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_DONE);
	assert_int_equal(vblk_ss_read_record(&r, &rec), -EPROTO);
	free(m);
}

/* A raw record: header (type, flags, reserved, len) and payload. */
static void raw(struct mem *m, uint8_t type, uint8_t flags, uint16_t reserved, uint32_t len,
		const void *payload, size_t plen)
{
	uint8_t h[8] = {type, flags, (uint8_t)reserved, (uint8_t)(reserved >> 8)};

	memcpy(h + 4, &len, 4); /* the tests run little-endian */
	mem_write(m, h, 8);
	if (plen)
		mem_write(m, payload, plen);
}

static void raw_range(struct mem *m, uint8_t type, uint8_t flags, uint64_t a, uint64_t b)
{
	uint64_t p[2] = {a, b};

	raw(m, type, flags, 0, 16, p, 16);
}

/* m, after a good preamble, holds one bad record: it must be refused. */
static void expect_refused(struct mem *m, enum vblk_ss_dir dir, const char *what)
{
	struct vblk_ss_reader r;
	struct vblk_ss_rec rec;
	int rc;

	m->rpos = 0;
	assert_int_equal(reader(&r, m, dir), 0);
	/* Read on, past an end record too: what follows it is an error. */
	for (int i = 0; (rc = vblk_ss_read_record(&r, &rec)) == 0; i++)
		if (i == 10)
			fail_msg("%s: accepted", what);
	assert_true(rc == -EPROTO || rc == -EPIPE);
	assert_true(strstr(r.err, "storage stream") != NULL);
}

/* A fresh stream with a good preamble (TO_DEST) or none (TO_SOURCE). */
static struct mem *stream(enum vblk_ss_dir dir)
{
	struct mem *m = mem_new();
	struct vblk_ss_writer w;

	vblk_ss_writer_init(&w, mem_write, m, &geom);
	if (dir == VBLK_SS_TO_DEST)
		vblk_ss_put_preamble(&w);
	return m;
}

static void test_bad_records(void **state)
{
	const uint64_t end = geom.disk_size;
	uint8_t block[1024 + 8] = {0};
	struct mem *m;

#define CASE(dir, what, ...)                                                                       \
	do {                                                                                       \
		m = stream(dir);                                                                   \
		__VA_ARGS__;                                                                       \
		expect_refused(m, dir, what);                                                      \
		free(m);                                                                           \
	} while (0)
#define D VBLK_SS_TO_DEST
#define S VBLK_SS_TO_SOURCE
	CASE(D, "unknown type", raw(m, 0x08, 0, 0, 0, NULL, 0));
	CASE(S, "unknown return type", raw(m, 0x47, 0, 0, 0, NULL, 0));
	CASE(D, "type 0", raw(m, 0x00, 0, 0, 0, NULL, 0));
	CASE(D, "return-path type", raw(m, VBLK_SS_ACK, 0, 0, 8, block, 8));
	CASE(S, "source type on the return path", raw(m, VBLK_SS_EOS, 0, 0, 0, NULL, 0));
	CASE(D, "flags", raw(m, VBLK_SS_FLUSH, 1, 0, 0, NULL, 0));
	CASE(D, "ZERO unknown flag", raw_range(m, VBLK_SS_ZERO, 2, 0, 512));
	CASE(D, "reserved", raw(m, VBLK_SS_EOS, 0, 0x100, 0, NULL, 0));
	CASE(D, "EOS with a payload", raw(m, VBLK_SS_EOS, 0, 0, 8, block, 8));
	CASE(D, "SYNC short", raw(m, VBLK_SS_SYNC, 0, 0, 8, block, 8));
	CASE(D, "DATA without data", raw(m, VBLK_SS_DATA, 0, 0, 8, block, 8));
	CASE(D, "DATA not whole blocks", raw(m, VBLK_SS_DATA, 0, 0, 8 + 100, block, 108));
	CASE(D, "DATA of 4 GiB", raw(m, VBLK_SS_DATA, 0, 0, UINT32_MAX, block, 8));
	CASE(D, "DATA over the limit",
	     raw(m, VBLK_SS_DATA, 0, 0, 8 + VBLK_SS_MAX_DATA + 512, block, 8));
	CASE(D, "DATA past the end", memcpy(block, &end, 8);
	     raw(m, VBLK_SS_DATA, 0, 0, 8 + 512, block, 8 + 512));
	CASE(D, "DATA across the end", {
		uint64_t off = end - 512;

		memcpy(block, &off, 8);
		raw(m, VBLK_SS_DATA, 0, 0, 8 + 1024, block, 8 + 1024);
	});
	CASE(D, "DATA wrapping", {
		uint64_t off = UINT64_MAX - 511;

		memcpy(block, &off, 8);
		raw(m, VBLK_SS_DATA, 0, 0, 8 + 1024, block, 8 + 1024);
	});
	CASE(D, "DATA unaligned offset", {
		uint64_t off = 100;

		memcpy(block, &off, 8);
		raw(m, VBLK_SS_DATA, 0, 0, 8 + 512, block, 8 + 512);
	});
	CASE(D, "ZERO empty", raw_range(m, VBLK_SS_ZERO, 0, 0, 0));
	CASE(D, "ZERO past the end", raw_range(m, VBLK_SS_ZERO, 0, end, 512));
	CASE(D, "ZERO wrapping", raw_range(m, VBLK_SS_ZERO, 0, 512, UINT64_MAX - 511));
	CASE(D, "ZERO unaligned", raw_range(m, VBLK_SS_ZERO, 0, 0, 513));
	CASE(D, "SYNC round 0", raw_range(m, VBLK_SS_SYNC, 0, 0, 0));
	CASE(D, "SYNC round repeated", raw_range(m, VBLK_SS_SYNC, 0, 2, 0);
	     raw_range(m, VBLK_SS_SYNC, 0, 2, 0));
	CASE(D, "SYNC round back", raw_range(m, VBLK_SS_SYNC, 0, 2, 0);
	     raw_range(m, VBLK_SS_SYNC, 0, 1, 0));
	CASE(D, "SYNC dirty past the disk", raw_range(m, VBLK_SS_SYNC, 0, 1, end + 1));
	CASE(D, "after EOS", raw(m, VBLK_SS_EOS, 0, 0, 0, NULL, 0);
	     raw(m, VBLK_SS_FLUSH, 0, 0, 0, NULL, 0));
	CASE(D, "no EOS", raw(m, VBLK_SS_FLUSH, 0, 0, 0, NULL, 0));
	CASE(S, "ACK round back", raw(m, VBLK_SS_ACK, 0, 0, 8, (uint64_t[]){3}, 8);
	     raw(m, VBLK_SS_ACK, 0, 0, 8, (uint64_t[]){3}, 8));
	CASE(S, "READ_REQ too long", raw_range(m, VBLK_SS_READ_REQ, 0, 0, MIB + 512));
	CASE(S, "READ_REQ past the end", raw_range(m, VBLK_SS_READ_REQ, 0, end - 512, 1024));
	CASE(S, "READ_REQ empty", raw_range(m, VBLK_SS_READ_REQ, 0, 0, 0));
	CASE(S, "ERROR empty", raw(m, VBLK_SS_ERROR, 0, 0, 0, NULL, 0));
	CASE(S, "ERROR too long", raw(m, VBLK_SS_ERROR, 0, 0, 256, block, 256));
	CASE(S, "ERROR with a NUL", raw(m, VBLK_SS_ERROR, 0, 0, 3, "a\0b", 3));
#undef CASE
#undef D
#undef S
}

static void test_bad_preambles(void **state)
{
	static const struct {
		unsigned off;
		uint8_t value;
		const char *what;
	} cases[] = {
	    {0, 'X', "magic"},
	    {8, 2, "version"},
	    {12, 4, "flags"},
	    {12, 3, "FULL and POSTCOPY together"},
	    {13, 0x80, "flags (high byte)"},
	    {14, 1, "reserved"},
	    {18, 0x00, "disk size 0"},
	    {16, 1, "disk not whole blocks"},
	    {25, 0x03, "block size"},
	    {28, 0x01, "granularity not 2^n"},
	    {30, 0x00, "granularity 0"},
	};
	struct vblk_ss_geom g, want = geom;

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct mem *m = stream(VBLK_SS_TO_DEST);
		struct vblk_ss_reader r;

		m->buf[cases[i].off] = cases[i].value;
		vblk_ss_reader_init(&r, VBLK_SS_TO_DEST, mem_read, m, NULL);
		if (vblk_ss_read_preamble(&r, NULL, &g) != -EPROTO)
			fail_msg("preamble with a bad %s accepted", cases[i].what);
		free(m);
	}
	/* A good preamble for another disk. */
	want.disk_size += 512;
	{
		struct mem *m = stream(VBLK_SS_TO_DEST);
		struct vblk_ss_reader r;

		vblk_ss_reader_init(&r, VBLK_SS_TO_DEST, mem_read, m, NULL);
		assert_int_equal(vblk_ss_read_preamble(&r, &want, &g), -EPROTO);
		assert_non_null(strstr(r.err, "this one"));
		free(m);
	}
	/* A session of zeros is no session. */
	{
		struct mem *m = stream(VBLK_SS_TO_DEST);
		struct vblk_ss_reader r;

		memset(m->buf + 32, 0, 16);
		vblk_ss_reader_init(&r, VBLK_SS_TO_DEST, mem_read, m, NULL);
		assert_int_equal(vblk_ss_read_preamble(&r, NULL, &g), -EPROTO);
		free(m);
	}
}

/* Every prefix of a good stream but the whole is refused (-EPIPE), and
 * whatever records came before were good. */
static void test_truncated(void **state)
{
	struct mem *m = mem_new();
	struct vblk_ss_writer w;
	uint8_t data[4096];

	memset(data, 0x5a, sizeof(data));
	vblk_ss_writer_init(&w, mem_write, m, &geom);
	vblk_ss_put_preamble(&w);
	vblk_ss_put_data(&w, 8192, data, sizeof(data));
	vblk_ss_put_zero(&w, 0, 512, false);
	vblk_ss_put_sync(&w, 1, 0);
	vblk_ss_put_flush(&w);
	assert_int_equal(vblk_ss_put_eos(&w), 0);
	for (size_t cut = 0; cut < m->len; cut++) {
		struct vblk_ss_reader r;
		struct vblk_ss_rec rec;
		struct vblk_ss_geom g;
		int rc;

		m->rpos = 0;
		m->limit = cut;
		vblk_ss_reader_init(&r, VBLK_SS_TO_DEST, mem_read, m,
				    (uint8_t[VBLK_SS_MAX_DATA]){0});
		rc = vblk_ss_read_preamble(&r, &geom, &g);
		while (rc == 0 && (rc = vblk_ss_read_record(&r, &rec)) == 0)
			assert_true(rec.type != VBLK_SS_EOS);
		assert_int_equal(rc, -EPIPE);
		assert_true(r.pos <= cut);
	}
	free(m);
}

static void test_writer_checks(void **state)
{
	struct mem *m = mem_new();
	struct vblk_ss_writer w;
	struct vblk_ss_geom bad = geom;
	uint8_t data[1024] = {0};

	vblk_ss_writer_init(&w, mem_write, m, &geom);
	assert_int_equal(vblk_ss_put_data(&w, geom.disk_size, data, 512), -EINVAL);
	assert_int_equal(m->len, 0); /* nothing written */
	/* Sticky: later good puts return the first error and write nothing. */
	assert_int_equal(vblk_ss_put_flush(&w), -EINVAL);
	assert_int_equal(m->len, 0);
#define REFUSED(call)                                                                              \
	do {                                                                                       \
		vblk_ss_writer_init(&w, mem_write, m, &geom);                                      \
		assert_int_equal(call, -EINVAL);                                                   \
		assert_int_equal(m->len, 0);                                                       \
	} while (0)
	REFUSED(vblk_ss_put_data(&w, 0, data, 0));
	REFUSED(vblk_ss_put_data(&w, 0, data, 100));
	REFUSED(vblk_ss_put_data(&w, 1, data, 512));
	REFUSED(vblk_ss_put_data(&w, 0, data, VBLK_SS_MAX_DATA + 512));
	REFUSED(vblk_ss_put_zero(&w, UINT64_MAX - 511, 1024, false));
	REFUSED(vblk_ss_put_sync(&w, 0, 0));
	REFUSED(vblk_ss_put_sync(&w, 1, geom.disk_size + 1));
	REFUSED(vblk_ss_put_ack(&w, 0));
	REFUSED(vblk_ss_put_error(&w, ""));
	REFUSED(vblk_ss_put_read_req(&w, 0, MIB + 512));
#undef REFUSED
	bad.granularity = 256;
	vblk_ss_writer_init(&w, mem_write, m, &bad);
	assert_int_equal(vblk_ss_put_preamble(&w), -EINVAL);
	/* A failing byte sink: its error sticks. */
	m->fail_at = 60;
	vblk_ss_writer_init(&w, mem_write, m, &geom);
	assert_int_equal(vblk_ss_put_preamble(&w), 0);
	assert_int_equal(vblk_ss_put_data(&w, 0, data, 512), -ENOSPC);
	assert_int_equal(vblk_ss_put_eos(&w), -ENOSPC);
	free(m);
}

/* ---- post-copy storage ---- */

/* 2 MiB in granules of 64 KiB: 32 granules, one word whose top half is
 * past the disk. */
#define GRAN 65536u

static void test_postcopy_roundtrip(void **state)
{
	struct mem *m = mem_new();
	struct vblk_ss_writer w;
	struct vblk_ss_reader r;
	struct vblk_ss_rec rec;
	static uint8_t data[GRAN];
	uint64_t map = 0x80000005ull; /* granules 0, 2 and the last, 31 */

	assert_int_equal(vblk_ss_granules(&geom), 32);
	assert_int_equal(vblk_ss_map_words(&geom), 1);
	memset(data, 0xa5, sizeof(data));
	vblk_ss_writer_init(&w, mem_write, m, &geom);
	vblk_ss_put_preamble(&w);
	vblk_ss_put_data(&w, 512, data, 512); /* before the switch: any blocks */
	vblk_ss_put_sync(&w, 1, 0);
	vblk_ss_put_missing(&w, 0, &map, 1);
	vblk_ss_put_postcopy(&w);
	vblk_ss_put_data(&w, 0, data, GRAN);
	vblk_ss_put_zero(&w, 2 * GRAN, GRAN, true);
	vblk_ss_put_data(&w, geom.disk_size - GRAN, data, GRAN);
	vblk_ss_put_flush(&w);
	assert_int_equal(vblk_ss_put_eos(&w), 0);
	/* MISSING: type 6, 16 bytes, granule 0, then the word, little-endian */
	assert_memory_equal(m->buf + 48 + 8 + 8 + 512 + 8 + 16,
			    "\x06\0\0\0\x10\0\0\0\0\0\0\0\0\0\0\0\x05\0\0\x80\0\0\0\0", 24);
	assert_memory_equal(m->buf + 48 + 8 + 8 + 512 + 8 + 16 + 24, "\x07\0\0\0\0\0\0\0", 8);

	assert_int_equal(reader(&r, m, VBLK_SS_TO_DEST), 0);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_DATA);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_SYNC);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_MISSING);
	assert_int_equal(rec.granule, 0);
	assert_int_equal(rec.length, 8);
	assert_int_equal(vblk_ss_map_word(&rec, 0), map);
	assert_false(r.postcopy);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_POSTCOPY);
	assert_true(r.postcopy);
	for (int i = 0; i < 3; i++) {
		assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
		assert_true(rec.type == (i == 1 ? VBLK_SS_ZERO : VBLK_SS_DATA));
	}
	assert_int_equal(rec.offset, geom.disk_size - GRAN);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_FLUSH);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_EOS);

	/* The writer refuses what the reader would after the switch. */
#define REFUSED(call)                                                                              \
	do {                                                                                       \
		size_t len = m->len;                                                               \
		vblk_ss_writer_init(&w, mem_write, m, &geom);                                      \
		assert_int_equal(vblk_ss_put_postcopy(&w), 0);                                     \
		len = m->len;                                                                      \
		assert_int_equal(call, -EINVAL);                                                   \
		assert_int_equal(m->len, len);                                                     \
	} while (0)
	REFUSED(vblk_ss_put_data(&w, 512, data, 512));
	REFUSED(vblk_ss_put_data(&w, 0, data, 512));
	REFUSED(vblk_ss_put_zero(&w, GRAN, GRAN / 2, false));
	REFUSED(vblk_ss_put_sync(&w, 2, 0));
	REFUSED(vblk_ss_put_missing(&w, 0, &map, 1));
	REFUSED(vblk_ss_put_postcopy(&w));
	REFUSED(vblk_ss_put_missing_map(&w, 0, &map, 1)); /* not a resumed stream */
	REFUSED(vblk_ss_put_map_end(&w));
#undef REFUSED
	/* Maps outside the disk's bitmap. */
	m->len = 0;
	vblk_ss_writer_init(&w, mem_write, m, &geom);
	assert_int_equal(vblk_ss_put_missing(&w, 0, &map, 0), -EINVAL);
	vblk_ss_writer_init(&w, mem_write, m, &geom);
	assert_int_equal(vblk_ss_put_missing(&w, 1, &map, 1), -EINVAL);
	vblk_ss_writer_init(&w, mem_write, m, &geom);
	assert_int_equal(vblk_ss_put_missing(&w, 64, &map, 1), -EINVAL);
	vblk_ss_writer_init(&w, mem_write, m, &geom);
	assert_int_equal(vblk_ss_put_missing(&w, 0, (uint64_t[]){1ull << 32}, 1), -EINVAL);
	vblk_ss_writer_init(&w, mem_write, m, &geom);
	assert_int_equal(vblk_ss_put_missing(&w, 0, (uint64_t[]){map, 0}, 2), -EINVAL);
	assert_int_equal(m->len, 0);
	free(m);
}

/* A resumed post-copy: the preamble says so, the destination answers with
 * its map, and the stream is in post-copy from its first record. */
static void test_postcopy_resume(void **state)
{
	struct vblk_ss_geom rg = geom;
	struct mem *m = mem_new(), *back = mem_new();
	static uint8_t buf[VBLK_SS_MAX_DATA], data[GRAN];
	struct vblk_ss_writer w;
	struct vblk_ss_reader r;
	struct vblk_ss_rec rec;
	struct vblk_ss_geom g;
	uint64_t map = 0xffffffffull;

	rg.flags = VBLK_SS_F_POSTCOPY;
	vblk_ss_writer_init(&w, mem_write, m, &rg);
	vblk_ss_put_preamble(&w);
	assert_int_equal(vblk_ss_put_sync(&w, 1, 0), -EINVAL); /* no rounds */
	vblk_ss_writer_init(&w, mem_write, m, &rg);
	vblk_ss_put_data(&w, GRAN, data, GRAN);
	assert_int_equal(vblk_ss_put_eos(&w), 0);
	vblk_ss_reader_init(&r, VBLK_SS_TO_DEST, mem_read, m, buf);
	assert_int_equal(vblk_ss_read_preamble(&r, &geom, &g), 0);
	assert_int_equal(g.flags, VBLK_SS_F_POSTCOPY);
	assert_true(r.postcopy);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.offset, GRAN);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_EOS);

	/* The return path: the map, its end, then requests and DONE. */
	vblk_ss_writer_init(&w, mem_write, back, &rg);
	vblk_ss_put_missing_map(&w, 0, &map, 1);
	vblk_ss_put_map_end(&w);
	assert_int_equal(vblk_ss_put_ack(&w, 1), -EINVAL);
	vblk_ss_writer_init(&w, mem_write, back, &rg);
	vblk_ss_put_read_req(&w, 4 * GRAN, GRAN);
	assert_int_equal(vblk_ss_put_done(&w), 0);
	vblk_ss_reader_init(&r, VBLK_SS_TO_SOURCE, mem_read, back, buf);
	vblk_ss_reader_set_geom(&r, &rg);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_MISSING_MAP);
	assert_int_equal(vblk_ss_map_word(&rec, 0), map);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_MAP_END);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_READ_REQ);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_DONE);

	/* A destination that never switched answers NOT_SWITCHED alone. */
	free(back);
	back = mem_new();
	vblk_ss_writer_init(&w, mem_write, back, &geom);
	assert_int_equal(vblk_ss_put_not_switched(&w), -EINVAL); /* not a resumed stream */
	vblk_ss_writer_init(&w, mem_write, back, &rg);
	assert_int_equal(vblk_ss_put_not_switched(&w), 0);
	vblk_ss_reader_init(&r, VBLK_SS_TO_SOURCE, mem_read, back, buf);
	vblk_ss_reader_set_geom(&r, &rg);
	assert_int_equal(vblk_ss_read_record(&r, &rec), 0);
	assert_int_equal(rec.type, VBLK_SS_NOT_SWITCHED);
	assert_true(r.eos);
	free(m);
	free(back);
}

/* Bad post-copy records, in a fresh stream (TO_DEST) or a return path that
 * answers a resumed post-copy (resumed) or an ordinary stream. */
static void expect_refused_g(struct mem *m, enum vblk_ss_dir dir, const struct vblk_ss_geom *g,
			     const char *what)
{
	static uint8_t buf[VBLK_SS_MAX_DATA];
	struct vblk_ss_reader r;
	struct vblk_ss_rec rec;
	struct vblk_ss_geom got;
	int rc = 0;

	m->rpos = 0;
	vblk_ss_reader_init(&r, dir, mem_read, m, buf);
	if (dir == VBLK_SS_TO_SOURCE)
		vblk_ss_reader_set_geom(&r, g);
	else
		rc = vblk_ss_read_preamble(&r, g, &got);
	for (int i = 0; rc == 0 && (rc = vblk_ss_read_record(&r, &rec)) == 0; i++)
		if (i == 10)
			fail_msg("%s: accepted", what);
	if (rc != -EPROTO)
		fail_msg("%s: %d (%s)", what, rc, r.err);
}

static void test_postcopy_bad(void **state)
{
	struct vblk_ss_geom rg = geom;
	uint8_t zero[64] = {0};
	uint64_t pl[3];
	struct mem *m;

	rg.flags = VBLK_SS_F_POSTCOPY;
#define CASE(dir, g, what, ...)                                                                    \
	do {                                                                                       \
		struct vblk_ss_writer w;                                                           \
		m = mem_new();                                                                     \
		vblk_ss_writer_init(&w, mem_write, m, g);                                          \
		if (dir == VBLK_SS_TO_DEST)                                                        \
			vblk_ss_put_preamble(&w);                                                  \
		__VA_ARGS__;                                                                       \
		expect_refused_g(m, dir, g, what);                                                 \
		free(m);                                                                           \
	} while (0)
#define D VBLK_SS_TO_DEST
#define S VBLK_SS_TO_SOURCE
#define SWITCH raw(m, VBLK_SS_POSTCOPY, 0, 0, 0, NULL, 0)
	CASE(D, &geom, "POSTCOPY with a payload", raw(m, VBLK_SS_POSTCOPY, 0, 0, 8, zero, 8));
	CASE(D, &geom, "POSTCOPY twice", SWITCH; SWITCH);
	CASE(D, &rg, "POSTCOPY in a resumed post-copy", SWITCH);
	{
		struct vblk_ss_geom big = geom;

		big.granularity = 2 * MIB;
		CASE(D, &big, "POSTCOPY with granules over 1 MiB", SWITCH);
		big.flags = VBLK_SS_F_POSTCOPY;
		assert_false(vblk_ss_geom_ok(&big));
	}
	CASE(D, &geom, "MISSING empty", raw(m, VBLK_SS_MISSING, 0, 0, 8, zero, 8));
	CASE(D, &geom, "MISSING not whole words", raw(m, VBLK_SS_MISSING, 0, 0, 12, zero, 12));
	CASE(D, &geom, "MISSING too long",
	     raw(m, VBLK_SS_MISSING, 0, 0, 16 + VBLK_SS_MAX_DATA, zero, 16));
	CASE(D, &geom, "MISSING first not a word", pl[0] = 8; pl[1] = 1;
	     raw(m, VBLK_SS_MISSING, 0, 0, 16, pl, 16));
	CASE(D, &geom, "MISSING past the bitmap", pl[0] = 64; pl[1] = 1;
	     raw(m, VBLK_SS_MISSING, 0, 0, 16, pl, 16));
	CASE(D, &geom, "MISSING wrapping", pl[0] = UINT64_MAX - 63; pl[1] = 1;
	     raw(m, VBLK_SS_MISSING, 0, 0, 16, pl, 16));
	CASE(D, &geom, "MISSING two words of one", pl[0] = 0; pl[1] = 1; pl[2] = 0;
	     raw(m, VBLK_SS_MISSING, 0, 0, 24, pl, 24));
	CASE(D, &geom, "MISSING a granule past the disk", pl[0] = 0; pl[1] = 1ull << 32;
	     raw(m, VBLK_SS_MISSING, 0, 0, 16, pl, 16));
	CASE(D, &geom, "MISSING after POSTCOPY", SWITCH; pl[0] = 0; pl[1] = 1;
	     raw(m, VBLK_SS_MISSING, 0, 0, 16, pl, 16));
	CASE(D, &geom, "SYNC after POSTCOPY", SWITCH; raw_range(m, VBLK_SS_SYNC, 0, 1, 0));
	CASE(D, &rg, "SYNC in a resumed post-copy", raw_range(m, VBLK_SS_SYNC, 0, 1, 0));
	CASE(D, &geom, "ZERO of part of a granule", SWITCH;
	     raw_range(m, VBLK_SS_ZERO, 0, GRAN, GRAN / 2));
	CASE(D, &geom, "ZERO off a granule", SWITCH; raw_range(m, VBLK_SS_ZERO, 0, 512, GRAN));
	CASE(D, &rg, "DATA of part of a granule", {
		static uint8_t rec[8 + 4096];

		raw(m, VBLK_SS_DATA, 0, 0, sizeof(rec), rec, sizeof(rec));
	});
	CASE(S, &geom, "MISSING_MAP not asked for", pl[0] = 0; pl[1] = 1;
	     raw(m, VBLK_SS_MISSING_MAP, 0, 0, 16, pl, 16));
	CASE(S, &geom, "MAP_END not asked for", raw(m, VBLK_SS_MAP_END, 0, 0, 0, NULL, 0));
	CASE(S, &rg, "MAP_END twice", raw(m, VBLK_SS_MAP_END, 0, 0, 0, NULL, 0);
	     raw(m, VBLK_SS_MAP_END, 0, 0, 0, NULL, 0));
	CASE(S, &rg, "MISSING_MAP after MAP_END", raw(m, VBLK_SS_MAP_END, 0, 0, 0, NULL, 0);
	     pl[0] = 0; pl[1] = 1; raw(m, VBLK_SS_MISSING_MAP, 0, 0, 16, pl, 16));
	CASE(S, &rg, "MISSING_MAP a granule past the disk", pl[0] = 0; pl[1] = 1ull << 40;
	     raw(m, VBLK_SS_MISSING_MAP, 0, 0, 16, pl, 16));
	CASE(S, &rg, "ACK in a resumed post-copy",
	     raw(m, VBLK_SS_ACK, 0, 0, 8, (uint64_t[]){1}, 8));
	CASE(S, &geom, "NOT_SWITCHED not asked for",
	     raw(m, VBLK_SS_NOT_SWITCHED, 0, 0, 0, NULL, 0));
	CASE(S, &rg, "NOT_SWITCHED with a payload", raw(m, VBLK_SS_NOT_SWITCHED, 0, 0, 8, zero, 8));
	CASE(S, &rg, "NOT_SWITCHED after the map began", pl[0] = 0; pl[1] = 1;
	     raw(m, VBLK_SS_MISSING_MAP, 0, 0, 16, pl, 16);
	     raw(m, VBLK_SS_NOT_SWITCHED, 0, 0, 0, NULL, 0));
	CASE(S, &rg, "NOT_SWITCHED after MAP_END", raw(m, VBLK_SS_MAP_END, 0, 0, 0, NULL, 0);
	     raw(m, VBLK_SS_NOT_SWITCHED, 0, 0, 0, NULL, 0));
	CASE(S, &rg, "a record after NOT_SWITCHED", raw(m, VBLK_SS_NOT_SWITCHED, 0, 0, 0, NULL, 0);
	     raw(m, VBLK_SS_MAP_END, 0, 0, 0, NULL, 0));
#undef SWITCH
#undef CASE
#undef D
#undef S
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_roundtrip),	       cmocka_unit_test(test_return_path),
	    cmocka_unit_test(test_bad_records),	       cmocka_unit_test(test_bad_preambles),
	    cmocka_unit_test(test_truncated),	       cmocka_unit_test(test_writer_checks),
	    cmocka_unit_test(test_postcopy_roundtrip), cmocka_unit_test(test_postcopy_resume),
	    cmocka_unit_test(test_postcopy_bad),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
