// SPDX-License-Identifier: MIT
/*
 * Fuzz target for the storage stream between two vmig-blk daemons
 * (tools/vmig-blk/sstream.c), as a hostile peer would send it. An input
 * that starts with the magic is a source-to-destination stream: the
 * preamble's geometry is taken as it comes, and every DATA and ZERO record
 * the reader returns is applied to a fake disk of exactly that size
 * (malloc'ed, so ASan catches a byte written outside it); disks over 4 MiB
 * are not allocated, but every range is still checked against the disk
 * here, independently of the reader, and any overrun aborts. MISSING
 * records are applied to a bitmap of exactly the disk's granules, and
 * after POSTCOPY every DATA and ZERO must cover whole granules. Any other
 * input is a return path (destination to source) answering a 1 MiB disk;
 * one that starts with 'R' answers a resumed post-copy (the rest is the
 * return path: a missing map may come first).
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vmig-blk/sstream.h"

#include "fuzz.h"

#define FAKE_DISK_MAX (4u << 20)

struct src {
	const uint8_t *p;
	size_t left;
};

static ssize_t mem_read(void *opaque, void *buf, size_t n)
{
	struct src *s = opaque;

	if (!s->left)
		return -32; /* -EPIPE */
	if (n > s->left)
		n = s->left;
	memcpy(buf, s->p, n);
	s->p += n;
	s->left -= n;
	return (ssize_t)n;
}

/* The reader's promise, checked on its own: whole blocks inside the disk. */
static void check_range(const struct vblk_ss_geom *g, uint64_t off, uint64_t len)
{
	if (!len || off % g->block_size || len % g->block_size || off > g->disk_size ||
	    len > g->disk_size - off)
		abort();
}

/* After the switch: whole granules, the last one clipped to the disk. */
static void check_granules(const struct vblk_ss_geom *g, bool postcopy, uint64_t off, uint64_t len)
{
	if (postcopy &&
	    (off % g->granularity || (len % g->granularity && len != g->disk_size - off)))
		abort();
}

/* A map record, applied to a bitmap of nwords words (NULL: too big to
 * allocate, checked only): inside it, no bit past the last granule. */
static void apply_map(const struct vblk_ss_geom *g, const struct vblk_ss_rec *rec, uint64_t *map,
		      const uint8_t *buf)
{
	uint64_t total = vblk_ss_map_words(g), n = rec->length / 8, first = rec->granule / 64;
	uint64_t granules = vblk_ss_granules(g);

	if (rec->data != buf || !n || rec->length % 8 || rec->length > VBLK_SS_MAX_DATA ||
	    rec->granule % 64 || first > total || n > total - first)
		abort();
	for (uint64_t i = 0; i < n; i++) {
		uint64_t w = vblk_ss_map_word(rec, i);

		if (first + i == total - 1 && granules % 64 && (w >> (granules % 64)))
			abort();
		if (map)
			map[first + i] |= w;
	}
}

static void to_dest(const uint8_t *data, size_t size, uint8_t *buf)
{
	struct src s = {data, size};
	struct vblk_ss_reader r;
	struct vblk_ss_geom g;
	struct vblk_ss_rec rec;
	uint8_t *disk = NULL;
	uint64_t *map = NULL;
	bool postcopy;

	vblk_ss_reader_init(&r, VBLK_SS_TO_DEST, mem_read, &s, buf);
	if (vblk_ss_read_preamble(&r, NULL, &g))
		return;
	postcopy = g.flags & VBLK_SS_F_POSTCOPY;
	if (g.disk_size <= FAKE_DISK_MAX) {
		disk = malloc(g.disk_size);
		map = calloc(vblk_ss_map_words(&g), sizeof(*map));
	}
	while (vblk_ss_read_record(&r, &rec) == 0) {
		switch (rec.type) {
		case VBLK_SS_DATA:
			check_range(&g, rec.offset, rec.length);
			check_granules(&g, postcopy, rec.offset, rec.length);
			if (rec.length > VBLK_SS_MAX_DATA || rec.data != buf)
				abort();
			if (disk)
				memcpy(disk + rec.offset, rec.data, rec.length);
			break;
		case VBLK_SS_ZERO:
			check_range(&g, rec.offset, rec.length);
			check_granules(&g, postcopy, rec.offset, rec.length);
			if (disk)
				memset(disk + rec.offset, 0, rec.length);
			break;
		case VBLK_SS_MISSING:
			if (postcopy)
				abort();
			apply_map(&g, &rec, map, buf);
			break;
		case VBLK_SS_POSTCOPY:
			if (postcopy)
				abort();
			postcopy = true;
			break;
		case VBLK_SS_SYNC:
			if (postcopy)
				abort();
			break;
		case VBLK_SS_FLUSH:
		case VBLK_SS_EOS:
			break;
		default:
			abort(); /* a return-path type in this direction */
		}
	}
	free(disk);
	free(map);
}

static void to_source(const uint8_t *data, size_t size, uint8_t *buf)
{
	struct vblk_ss_geom g = {
	    .disk_size = 1u << 20, .block_size = 512, .granularity = 65536, .session = {1}};
	bool resumed = size && data[0] == 'R', map_started = false, map_ended = false;
	struct src s = {data + resumed, size - resumed};
	struct vblk_ss_reader r;
	struct vblk_ss_rec rec;
	uint64_t map[1] = {0};

	if (resumed)
		g.flags = VBLK_SS_F_POSTCOPY;
	vblk_ss_reader_init(&r, VBLK_SS_TO_SOURCE, mem_read, &s, buf);
	vblk_ss_reader_set_geom(&r, &g);
	while (vblk_ss_read_record(&r, &rec) == 0) {
		if (rec.type == VBLK_SS_MISSING_MAP) {
			if (!resumed || map_ended)
				abort();
			map_started = true;
			apply_map(&g, &rec, map, buf);
		} else if (rec.type == VBLK_SS_NOT_SWITCHED) {
			/* instead of a map, and the last record */
			if (!resumed || map_started || map_ended || !r.eos)
				abort();
		} else if (rec.type == VBLK_SS_MAP_END) {
			if (!resumed || map_ended)
				abort();
			map_ended = true;
		} else if (rec.type == VBLK_SS_ACK && resumed) {
			abort();
		} else if (rec.type == VBLK_SS_READ_REQ) {
			check_range(&g, rec.offset, rec.length);
			if (rec.length > VBLK_SS_MAX_READ_REQ)
				abort();
		} else if (rec.type == VBLK_SS_ERROR) {
			size_t n = strlen(rec.text);

			if (n == 0 || n > VBLK_SS_MAX_TEXT)
				abort();
		} else if (rec.type != VBLK_SS_ACK && rec.type != VBLK_SS_DONE) {
			abort();
		}
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t *buf;

	if (!buf && !(buf = malloc(VBLK_SS_MAX_DATA)))
		return 0;
	if (size >= 8 && !memcmp(data, VBLK_SS_MAGIC, 8))
		to_dest(data, size, buf);
	else
		to_source(data, size, buf);
	return 0;
}
