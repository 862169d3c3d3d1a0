// SPDX-License-Identifier: MIT
/*
 * The storage stream between two vmig-blk daemons: reader and writer (see
 * sstream.h; docs/storage-migration.md has the byte layout).
 *
 * Threat model: every byte the reader sees comes from the peer and is
 * untrusted. The reader checks the preamble's geometry (and, on the
 * destination, that it is its own disk's), each header's type against the
 * stream's direction, its flags and reserved bits, its length against the
 * exact or bounded size of its type, and every offset and length against
 * the disk size and block size with overflow-safe arithmetic, before it
 * returns the record. A DATA payload is read into the caller's buffer of
 * VBLK_SS_MAX_DATA bytes only after its length was checked. Nothing is
 * skipped or guessed: an unknown type, a record after EOS or a round that
 * does not increase ends the stream with an error naming its offset. Each
 * record consumes at least its 8-byte header, so a loop over records ends.
 */
#include "sstream.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

/* ---- little-endian fields ---- */

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p)
{
	return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
	put32(p, (uint32_t)v);
	put32(p + 4, (uint32_t)(v >> 32));
}

static bool pow2(uint64_t v)
{
	return v && !(v & (v - 1));
}

bool vblk_ss_geom_ok(const struct vblk_ss_geom *g)
{
	static const uint8_t zero[16];

	return pow2(g->block_size) && g->block_size >= 512 && g->block_size <= 65536 &&
	       g->disk_size && g->disk_size % g->block_size == 0 && pow2(g->granularity) &&
	       g->granularity >= VBLK_SS_MIN_GRANULARITY &&
	       g->granularity <= VBLK_SS_MAX_GRANULARITY && g->granularity >= g->block_size &&
	       !(g->flags & ~(VBLK_SS_F_FULL | VBLK_SS_F_POSTCOPY)) &&
	       (g->flags & (VBLK_SS_F_FULL | VBLK_SS_F_POSTCOPY)) !=
		   (VBLK_SS_F_FULL | VBLK_SS_F_POSTCOPY) &&
	       (!(g->flags & VBLK_SS_F_POSTCOPY) || g->granularity <= VBLK_SS_MAX_DATA) &&
	       memcmp(g->session, zero, sizeof(zero)) != 0;
}

/* Is [offset, offset + len) a non-empty range of whole blocks inside the
 * disk? Overflow-safe. */
static bool range_ok(const struct vblk_ss_geom *g, uint64_t offset, uint64_t len)
{
	return len && offset % g->block_size == 0 && len % g->block_size == 0 &&
	       offset <= g->disk_size && len <= g->disk_size - offset;
}

/* After the switch to post-copy, the destination tracks what it has per
 * granule: DATA and ZERO must cover whole granules (the last one clipped
 * to the disk). range_ok first. */
static bool granules_ok(const struct vblk_ss_geom *g, uint64_t offset, uint64_t len)
{
	return offset % g->granularity == 0 &&
	       (len % g->granularity == 0 || len == g->disk_size - offset);
}

/* Is a map of nwords words from granule first inside the disk's bitmap,
 * with no bit past the last granule (last: the record's last word)? */
static bool map_ok(const struct vblk_ss_geom *g, uint64_t first, uint64_t nwords, uint64_t last)
{
	uint64_t total = vblk_ss_map_words(g), tail = vblk_ss_granules(g) % 64;

	if (!nwords || nwords > VBLK_SS_MAX_DATA / 8 || first % 64 || first / 64 > total ||
	    nwords > total - first / 64)
		return false;
	/* the disk's last word: the bits past its last granule stay clear */
	return first / 64 + nwords < total || !tail || !(last >> tail);
}

/* ---- reader ---- */

static int fail(struct vblk_ss_reader *r, uint64_t at, const char *what)
{
	snprintf(r->err, sizeof(r->err), "storage stream: %s (at byte %llu)", what,
		 (unsigned long long)at);
	return -EPROTO;
}

/* Read exactly n bytes. At the end of the stream: -EPIPE, with the reason. */
static int read_full(struct vblk_ss_reader *r, void *buf, size_t n, const char *what)
{
	uint8_t *p = buf;

	while (n) {
		ssize_t got = r->read(r->opaque, p, n);

		if (got <= 0) {
			snprintf(r->err, sizeof(r->err), "storage stream: %s at byte %llu (%s)",
				 what, (unsigned long long)r->pos,
				 got == 0 || got == -EPIPE ? "the peer closed it"
							   : strerror((int)-got));
			return got < 0 ? (int)got : -EPIPE;
		}
		if ((size_t)got > n) /* a byte source that overran our buffer */
			return fail(r, r->pos, "byte source returned more than asked");
		p += got;
		n -= (size_t)got;
		r->pos += (uint64_t)got;
	}
	return 0;
}

void vblk_ss_reader_init(struct vblk_ss_reader *r, enum vblk_ss_dir dir, vblk_ss_read_fn read,
			 void *opaque, uint8_t *buf)
{
	memset(r, 0, sizeof(*r));
	r->dir = dir;
	r->read = read;
	r->opaque = opaque;
	r->buf = buf;
}

int vblk_ss_read_preamble(struct vblk_ss_reader *r, const struct vblk_ss_geom *want,
			  struct vblk_ss_geom *g)
{
	uint8_t p[VBLK_SS_PREAMBLE_LEN];
	char msg[160];
	int rc = read_full(r, p, sizeof(p), "stream ends inside the preamble");

	if (rc)
		return rc;
	if (memcmp(p, VBLK_SS_MAGIC, 8))
		return fail(r, 0, "not a vmig-blk storage stream (bad magic)");
	if (get32(p + 8) != VBLK_SS_VERSION) {
		snprintf(msg, sizeof(msg), "unsupported storage stream version %u", get32(p + 8));
		return fail(r, 8, msg);
	}
	if ((get16(p + 12) & ~(VBLK_SS_F_FULL | VBLK_SS_F_POSTCOPY)) || get16(p + 14))
		return fail(r, 12, "unknown preamble flags or reserved bits set");
	g->flags = get16(p + 12);
	g->disk_size = get64(p + 16);
	g->block_size = get32(p + 24);
	g->granularity = get32(p + 28);
	memcpy(g->session, p + 32, 16);
	if (!vblk_ss_geom_ok(g))
		return fail(r, 16, "bad geometry (disk size, block size, granularity or session)");
	if (want && (want->disk_size != g->disk_size || want->block_size != g->block_size)) {
		snprintf(msg, sizeof(msg),
			 "the source's disk is %llu bytes in blocks of %u, this one %llu in blocks "
			 "of %u",
			 (unsigned long long)g->disk_size, g->block_size,
			 (unsigned long long)want->disk_size, want->block_size);
		return fail(r, 16, msg);
	}
	vblk_ss_reader_set_geom(r, g);
	return 0;
}

void vblk_ss_reader_set_geom(struct vblk_ss_reader *r, const struct vblk_ss_geom *g)
{
	r->geom = *g;
	r->have_geom = true;
	/* a resumed post-copy is in post-copy from its first record */
	r->postcopy = r->dir == VBLK_SS_TO_DEST && (g->flags & VBLK_SS_F_POSTCOPY);
}

/* Exact payload size of each fixed-size type; -1: variable (checked by its
 * parser); -2: not a type of this direction. */
static long fixed_len(enum vblk_ss_dir dir, uint8_t type)
{
	if (dir == VBLK_SS_TO_DEST) {
		switch (type) {
		case VBLK_SS_DATA:
		case VBLK_SS_MISSING:
			return -1;
		case VBLK_SS_ZERO:
		case VBLK_SS_SYNC:
			return 16;
		case VBLK_SS_FLUSH:
		case VBLK_SS_EOS:
		case VBLK_SS_POSTCOPY:
			return 0;
		}
		return -2;
	}
	switch (type) {
	case VBLK_SS_ACK:
		return 8;
	case VBLK_SS_ERROR:
	case VBLK_SS_MISSING_MAP:
		return -1;
	case VBLK_SS_READ_REQ:
		return 16;
	case VBLK_SS_DONE:
	case VBLK_SS_MAP_END:
	case VBLK_SS_NOT_SWITCHED:
		return 0;
	}
	return -2;
}

static int parse_data(struct vblk_ss_reader *r, uint64_t at, uint32_t len, struct vblk_ss_rec *rec)
{
	uint8_t off[8];
	uint32_t n;
	int rc;

	if (len < 8 + r->geom.block_size || len - 8 > VBLK_SS_MAX_DATA)
		return fail(r, at, "DATA of a bad length");
	n = len - 8;
	rc = read_full(r, off, 8, "stream ends inside a DATA record");
	if (rc)
		return rc;
	rec->offset = get64(off);
	rec->length = n;
	if (!range_ok(&r->geom, rec->offset, n))
		return fail(r, at, "DATA outside the disk or not whole blocks");
	if (r->postcopy && !granules_ok(&r->geom, rec->offset, n))
		return fail(r, at, "DATA in post-copy that is not whole granules");
	rc = read_full(r, r->buf, n, "stream ends inside a DATA record");
	if (rc)
		return rc;
	rec->data = r->buf;
	return 0;
}

/* The payload of a fixed-size record, already read into p. */
static int parse_fixed(struct vblk_ss_reader *r, uint64_t at, const uint8_t *p,
		       struct vblk_ss_rec *rec)
{
	switch (rec->type) {
	case VBLK_SS_ZERO:
	case VBLK_SS_READ_REQ:
		rec->offset = get64(p);
		rec->length = get64(p + 8);
		if (!range_ok(&r->geom, rec->offset, rec->length))
			return fail(r, at, "range outside the disk or not whole blocks");
		if (rec->type == VBLK_SS_ZERO && r->postcopy &&
		    !granules_ok(&r->geom, rec->offset, rec->length))
			return fail(r, at, "ZERO in post-copy that is not whole granules");
		if (rec->type == VBLK_SS_READ_REQ && rec->length > VBLK_SS_MAX_READ_REQ)
			return fail(r, at, "READ_REQ of more than 1 MiB");
		return 0;
	case VBLK_SS_SYNC:
	case VBLK_SS_ACK:
		/* after the switch nothing is acknowledged by rounds */
		if (r->postcopy || (r->geom.flags & VBLK_SS_F_POSTCOPY))
			return fail(r, at, "SYNC or ACK in post-copy");
		rec->round = get64(p);
		if (rec->round <= r->last_round)
			return fail(r, at, "round number does not increase");
		if (rec->type == VBLK_SS_SYNC) {
			rec->dirty_bytes = get64(p + 8);
			if (rec->dirty_bytes > r->geom.disk_size)
				return fail(r, at, "SYNC with more dirty bytes than the disk");
		}
		r->last_round = rec->round;
		return 0;
	case VBLK_SS_EOS:
	case VBLK_SS_DONE:
		r->eos = true;
		return 0;
	case VBLK_SS_POSTCOPY:
		if (r->postcopy)
			return fail(r, at, "POSTCOPY twice, or in a resumed post-copy");
		/* a granule must fit one DATA record */
		if (r->geom.granularity > VBLK_SS_MAX_DATA)
			return fail(r, at, "POSTCOPY with granules larger than a DATA record");
		r->postcopy = true;
		return 0;
	case VBLK_SS_MAP_END:
		if (!(r->geom.flags & VBLK_SS_F_POSTCOPY) || r->map_ended)
			return fail(r, at, "MAP_END where no map was asked for, or twice");
		r->map_ended = true;
		return 0;
	case VBLK_SS_NOT_SWITCHED:
		/* instead of the map, never within it */
		if (!(r->geom.flags & VBLK_SS_F_POSTCOPY) || r->map_started || r->map_ended)
			return fail(r, at,
				    "NOT_SWITCHED where no post-copy was resumed, or after "
				    "its map began");
		r->eos = true;
		return 0;
	default:
		return 0;
	}
}

static int parse_error(struct vblk_ss_reader *r, uint64_t at, uint32_t len, struct vblk_ss_rec *rec)
{
	int rc;

	if (len == 0 || len > VBLK_SS_MAX_TEXT)
		return fail(r, at, "ERROR text of a bad length");
	rc = read_full(r, rec->text, len, "stream ends inside an ERROR record");
	if (rc)
		return rc;
	rec->text[len] = '\0';
	if (strlen(rec->text) != len)
		return fail(r, at, "ERROR text with a NUL byte");
	r->eos = true; /* the peer gives up: nothing follows */
	return 0;
}

/* MISSING (before the switch) and MISSING_MAP (a resumed post-copy's
 * return path, before MAP_END). */
static int parse_map(struct vblk_ss_reader *r, uint64_t at, uint32_t len, struct vblk_ss_rec *rec)
{
	uint8_t first[8];
	uint64_t nwords;
	int rc;

	if (rec->type == VBLK_SS_MISSING && r->postcopy)
		return fail(r, at, "MISSING after the switch to post-copy");
	if (rec->type == VBLK_SS_MISSING_MAP &&
	    (!(r->geom.flags & VBLK_SS_F_POSTCOPY) || r->map_ended))
		return fail(r, at, "MISSING_MAP where no map was asked for, or after MAP_END");
	if (rec->type == VBLK_SS_MISSING_MAP)
		r->map_started = true;
	if (!r->buf)
		return fail(r, at, "no buffer for a map record");
	if (len < 16 || (len - 8) % 8 || len - 8 > VBLK_SS_MAX_DATA)
		return fail(r, at, "map record of a bad length");
	nwords = (len - 8) / 8;
	rc = read_full(r, first, 8, "stream ends inside a map record");
	if (rc)
		return rc;
	rc = read_full(r, r->buf, len - 8, "stream ends inside a map record");
	if (rc)
		return rc;
	rec->granule = get64(first);
	rec->data = r->buf;
	rec->length = len - 8;
	if (!map_ok(&r->geom, rec->granule, nwords, get64(r->buf + len - 16)))
		return fail(r, at, "map outside the disk's granules");
	return 0;
}

int vblk_ss_read_record(struct vblk_ss_reader *r, struct vblk_ss_rec *rec)
{
	uint8_t h[VBLK_SS_HDR_LEN], p[16];
	uint64_t at = r->pos;
	uint32_t len;
	long want;
	int rc;

	if (!r->have_geom)
		return fail(r, at, "no geometry: read the preamble first");
	if (r->eos)
		return fail(r, at, "record after the end of the stream");
	rc = read_full(r, h, sizeof(h), "stream ends before its end record");
	if (rc)
		return rc;
	memset(rec, 0, sizeof(*rec));
	rec->type = (enum vblk_ss_type)h[0];
	rec->flags = h[1];
	len = get32(h + 4);
	want = fixed_len(r->dir, h[0]);
	if (want == -2)
		return fail(r, at, "unknown record type for this direction");
	if (get16(h + 2))
		return fail(r, at, "reserved bits set");
	if (rec->flags & ~(rec->type == VBLK_SS_ZERO ? VBLK_SS_ZERO_F_UNMAP : 0u))
		return fail(r, at, "unknown flags");
	if (want >= 0 && len != (uint32_t)want)
		return fail(r, at, "record of a bad length for its type");
	if (rec->type == VBLK_SS_DATA)
		return r->buf ? parse_data(r, at, len, rec) : fail(r, at, "no DATA buffer");
	if (rec->type == VBLK_SS_ERROR)
		return parse_error(r, at, len, rec);
	if (rec->type == VBLK_SS_MISSING || rec->type == VBLK_SS_MISSING_MAP)
		return parse_map(r, at, len, rec);
	rc = read_full(r, p, len, "stream ends inside a record");
	if (rc)
		return rc;
	return parse_fixed(r, at, p, rec);
}

/* ---- writer ---- */

void vblk_ss_writer_init(struct vblk_ss_writer *w, vblk_ss_write_fn write, void *opaque,
			 const struct vblk_ss_geom *g)
{
	memset(w, 0, sizeof(*w));
	w->write = write;
	w->opaque = opaque;
	w->geom = *g;
	w->postcopy = g->flags & VBLK_SS_F_POSTCOPY;
}

static int emit(struct vblk_ss_writer *w, const void *buf, size_t n)
{
	if (w->error)
		return w->error;
	if (n) {
		w->error = w->write(w->opaque, buf, n);
		if (w->error > 0)
			w->error = -EIO;
	}
	w->pos += n;
	return w->error;
}

/* The header of a record of type with len bytes of payload. */
static int emit_hdr(struct vblk_ss_writer *w, uint8_t type, uint8_t flags, uint32_t len)
{
	uint8_t h[VBLK_SS_HDR_LEN] = {type, flags, 0, 0};

	put32(h + 4, len);
	return emit(w, h, sizeof(h));
}

static int bad(struct vblk_ss_writer *w)
{
	if (!w->error)
		w->error = -EINVAL;
	return w->error;
}

int vblk_ss_put_preamble(struct vblk_ss_writer *w)
{
	uint8_t p[VBLK_SS_PREAMBLE_LEN] = {0};

	if (!vblk_ss_geom_ok(&w->geom))
		return bad(w);
	memcpy(p, VBLK_SS_MAGIC, 8);
	put32(p + 8, VBLK_SS_VERSION);
	put16(p + 12, w->geom.flags);
	put16(p + 14, 0);
	put64(p + 16, w->geom.disk_size);
	put32(p + 24, w->geom.block_size);
	put32(p + 28, w->geom.granularity);
	memcpy(p + 32, w->geom.session, 16);
	return emit(w, p, sizeof(p));
}

int vblk_ss_put_data(struct vblk_ss_writer *w, uint64_t offset, const void *buf, uint32_t len)
{
	uint8_t off[8];

	if (len > VBLK_SS_MAX_DATA || !range_ok(&w->geom, offset, len) ||
	    (w->postcopy && !granules_ok(&w->geom, offset, len)))
		return bad(w);
	put64(off, offset);
	emit_hdr(w, VBLK_SS_DATA, 0, 8 + len);
	emit(w, off, 8);
	return emit(w, buf, len);
}

static int put_range(struct vblk_ss_writer *w, uint8_t type, uint8_t flags, uint64_t a, uint64_t b)
{
	uint8_t p[16];

	put64(p, a);
	put64(p + 8, b);
	emit_hdr(w, type, flags, sizeof(p));
	return emit(w, p, sizeof(p));
}

int vblk_ss_put_zero(struct vblk_ss_writer *w, uint64_t offset, uint64_t len, bool unmap)
{
	if (!range_ok(&w->geom, offset, len) ||
	    (w->postcopy && !granules_ok(&w->geom, offset, len)))
		return bad(w);
	return put_range(w, VBLK_SS_ZERO, unmap ? VBLK_SS_ZERO_F_UNMAP : 0, offset, len);
}

int vblk_ss_put_sync(struct vblk_ss_writer *w, uint64_t round, uint64_t dirty_bytes)
{
	if (round == 0 || dirty_bytes > w->geom.disk_size || w->postcopy)
		return bad(w);
	return put_range(w, VBLK_SS_SYNC, 0, round, dirty_bytes);
}

int vblk_ss_put_flush(struct vblk_ss_writer *w)
{
	return emit_hdr(w, VBLK_SS_FLUSH, 0, 0);
}

int vblk_ss_put_eos(struct vblk_ss_writer *w)
{
	return emit_hdr(w, VBLK_SS_EOS, 0, 0);
}

int vblk_ss_put_ack(struct vblk_ss_writer *w, uint64_t round)
{
	uint8_t p[8];

	if (round == 0 || (w->geom.flags & VBLK_SS_F_POSTCOPY))
		return bad(w);
	put64(p, round);
	emit_hdr(w, VBLK_SS_ACK, 0, sizeof(p));
	return emit(w, p, sizeof(p));
}

int vblk_ss_put_error(struct vblk_ss_writer *w, const char *text)
{
	size_t n = strnlen(text, VBLK_SS_MAX_TEXT);

	/* Longer text is cut: the reason matters more than its end. */
	if (n == 0)
		return bad(w);
	emit_hdr(w, VBLK_SS_ERROR, 0, (uint32_t)n);
	return emit(w, text, n);
}

int vblk_ss_put_read_req(struct vblk_ss_writer *w, uint64_t offset, uint64_t len)
{
	if (len > VBLK_SS_MAX_READ_REQ || !range_ok(&w->geom, offset, len))
		return bad(w);
	return put_range(w, VBLK_SS_READ_REQ, 0, offset, len);
}

int vblk_ss_put_done(struct vblk_ss_writer *w)
{
	return emit_hdr(w, VBLK_SS_DONE, 0, 0);
}

static int put_map(struct vblk_ss_writer *w, uint8_t type, uint64_t first, const uint64_t *words,
		   size_t nwords)
{
	uint8_t p[8];

	if (!map_ok(&w->geom, first, nwords, nwords ? words[nwords - 1] : 0))
		return bad(w);
	put64(p, first);
	emit_hdr(w, type, 0, (uint32_t)(8 + 8 * nwords));
	emit(w, p, 8);
	for (size_t i = 0; i < nwords; i++) {
		put64(p, words[i]);
		emit(w, p, 8);
	}
	return w->error;
}

int vblk_ss_put_missing(struct vblk_ss_writer *w, uint64_t first, const uint64_t *words,
			size_t nwords)
{
	if (w->postcopy)
		return bad(w);
	return put_map(w, VBLK_SS_MISSING, first, words, nwords);
}

int vblk_ss_put_postcopy(struct vblk_ss_writer *w)
{
	if (w->postcopy || w->geom.granularity > VBLK_SS_MAX_DATA)
		return bad(w);
	w->postcopy = true;
	return emit_hdr(w, VBLK_SS_POSTCOPY, 0, 0);
}

int vblk_ss_put_missing_map(struct vblk_ss_writer *w, uint64_t first, const uint64_t *words,
			    size_t nwords)
{
	if (!(w->geom.flags & VBLK_SS_F_POSTCOPY))
		return bad(w);
	return put_map(w, VBLK_SS_MISSING_MAP, first, words, nwords);
}

int vblk_ss_put_map_end(struct vblk_ss_writer *w)
{
	if (!(w->geom.flags & VBLK_SS_F_POSTCOPY))
		return bad(w);
	return emit_hdr(w, VBLK_SS_MAP_END, 0, 0);
}

int vblk_ss_put_not_switched(struct vblk_ss_writer *w)
{
	if (!(w->geom.flags & VBLK_SS_F_POSTCOPY))
		return bad(w);
	return emit_hdr(w, VBLK_SS_NOT_SWITCHED, 0, 0);
}
