// SPDX-License-Identifier: MIT
/*
 * Destination-side record loader: reads records, checks them, and places
 * pages into guest RAM.
 *
 * Threat model: every byte comes from the peer and is untrusted. The peer
 * may send garbage, truncate the stream anywhere, lie about lengths, name
 * blocks or pages that do not exist, or repeat records. Each record header
 * is checked (type known, flags and reserved zero, length within the bounds
 * of its type) before its payload is read; each page run is checked against
 * the block it names before a byte is written to guest RAM. Nothing is
 * guessed: on any doubt the load fails with a message that says what was
 * wrong and at which stream offset.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "ram/bitmap.h"
#include "stream/stream.h"

#define BLOCKS_PAYLOAD_MAX (4 + VMIG_MAX_BLOCKS * (sizeof(struct vmig_wire_block) + VMIG_BLOCK_NAME_MAX))

static int fail(struct vmig__loader *l, int ret, uint64_t at, const char *what)
{
	vmig__err_set_first(l->err, "invalid migration stream at offset %llu: %s",
			    (unsigned long long)at, what);
	return ret;
}

static int read_error(struct vmig__loader *l, int ret, const char *what)
{
	if (ret == -EPIPE)
		vmig__err_set_first(l->err, "migration stream ended early (after %llu bytes, in %s)",
				    (unsigned long long)l->r->bytes, what);
	else
		vmig__err_set_first(l->err, "reading migration stream (%s): %s", what,
				    vmig__reader_strerror(l->r, ret));
	return ret;
}

int vmig__load_preamble(struct vmig__loader *l)
{
	struct vmig_wire_preamble pre;
	/* Exact: the connection may be handed on to another reader. */
	int ret = vmig__reader_read_exact(l->r, &pre, sizeof(pre));

	if (ret)
		return read_error(l, ret, "preamble");
	if (memcmp(pre.magic, VMIG_STREAM_MAGIC, sizeof(pre.magic)))
		return fail(l, -EPROTO, 0, "not a vmig migration stream (bad magic)");
	if (pre.version != VMIG_STREAM_VERSION) {
		vmig__err_set_first(l->err,
				    "unsupported migration stream version %u (this build reads %u)",
				    pre.version, VMIG_STREAM_VERSION);
		return -EPROTONOSUPPORT;
	}
	if (pre.flags & ~(VMIG_PRE_F_RESUME | VMIG_PRE_F_INDEX_MASK) ||
	    pre.channel > VMIG_CHAN_MULTIFD ||
	    ((pre.flags & VMIG_PRE_F_INDEX_MASK) && pre.channel != VMIG_CHAN_MULTIFD) ||
	    (pre.flags & VMIG_PRE_F_INDEX_MASK) >> VMIG_PRE_F_INDEX_SHIFT >= VMIG_MAX_MULTIFD)
		return fail(l, -EPROTO, 12, "unknown channel kind or preamble flags");
	l->channel = pre.channel;
	l->pre_flags = pre.flags;
	l->session = pre.session;
	return 0;
}

static int load_blocks(struct vmig__loader *l, uint32_t len, uint64_t at)
{
	uint8_t buf[BLOCKS_PAYLOAD_MAX];
	uint32_t count;
	size_t off = 4;
	int ret;

	if (l->blocks_ok)
		return fail(l, -EPROTO, at, "RAM block list sent twice");
	if (len < 4 || len > sizeof(buf))
		return fail(l, -EPROTO, at, "bad RAM block list length");
	ret = vmig__reader_read(l->r, buf, len);
	if (ret)
		return read_error(l, ret, "RAM block list");
	memcpy(&count, buf, 4);
	if (count != l->nblocks) {
		vmig__err_set_first(l->err, "source has %u RAM blocks, destination has %u", count,
				    l->nblocks);
		return -EINVAL;
	}
	for (uint32_t i = 0; i < count; i++) {
		struct vmig_wire_block wb;
		struct vmig__load_block *b = &l->blocks[i];

		if (len - off < sizeof(wb))
			return fail(l, -EPROTO, at, "RAM block list truncated");
		memcpy(&wb, buf + off, sizeof(wb));
		off += sizeof(wb);
		if (!wb.name_len || wb.name_len > VMIG_BLOCK_NAME_MAX || len - off < wb.name_len ||
		    wb.reserved[0] | wb.reserved[1] | wb.reserved[2])
			return fail(l, -EPROTO, at, "bad RAM block entry");
		if (wb.page_size != VMIG_PAGE_SIZE)
			return fail(l, -EPROTO, at, "unsupported page size");
		if (strlen(b->name) != wb.name_len || memcmp(b->name, buf + off, wb.name_len)) {
			vmig__err_set_first(l->err, "RAM block %u is '%.*s' on the source, '%s' here",
					    i, (int)wb.name_len, (const char *)buf + off, b->name);
			return -EINVAL;
		}
		off += wb.name_len;
		if (wb.size != b->size) {
			vmig__err_set_first(l->err,
					    "RAM block '%s' size mismatch: source %llu bytes, "
					    "destination %llu bytes",
					    b->name, (unsigned long long)wb.size,
					    (unsigned long long)b->size);
			return -EINVAL;
		}
	}
	if (off != len)
		return fail(l, -EPROTO, at, "trailing bytes after RAM block list");
	l->blocks_ok = true;
	return 0;
}

/* Check a page run against its block; returns the block or NULL. */
static struct vmig__load_block *check_run(struct vmig__loader *l, const struct vmig_wire_pages *pg,
					  uint64_t at)
{
	struct vmig__load_block *b;

	if (pg->block >= l->nblocks) {
		fail(l, -EPROTO, at, "page record names an unknown RAM block");
		return NULL;
	}
	b = &l->blocks[pg->block];
	if (!pg->npages || pg->npages > VMIG_REC_MAX_PAGES || pg->first >= b->npages ||
	    pg->npages > b->npages - pg->first) {
		fail(l, -EPROTO, at, "page record outside its RAM block");
		return NULL;
	}
	if (l->mf_channels) {
		/* Multifd: each chunk on its own channel, and only there (the
		 * receiving threads rely on it: no two share a bitmap word). */
		uint64_t chunk = pg->first / VMIG_MULTIFD_CHUNK_PAGES;

		if (!l->mf_data || chunk != (pg->first + pg->npages - 1) / VMIG_MULTIFD_CHUNK_PAGES ||
		    chunk % l->mf_channels != l->mf_index) {
			fail(l, -EPROTO, at, "page record on the wrong multifd channel");
			return NULL;
		}
	}
	return b;
}

/* The most a compressor may produce for one run: zstd's bound (zlib's is
 * smaller for a run's size). */
#define ZMAX ZSTD_COMPRESSBOUND(VMIG_REC_MAX_PAGES *VMIG_PAGE_SIZE)

/* One whole zlib stream in src that inflates to exactly want bytes. */
static bool inflate_exact(struct vmig__loader *l, const uint8_t *src, size_t len, size_t want)
{
	z_stream *zs = l->zlib;

	if (inflateReset(zs) != Z_OK)
		return false;
	zs->next_in = (Bytef *)src;
	zs->avail_in = (uInt)len;
	zs->next_out = l->bounce;
	zs->avail_out = (uInt)want;
	/* The end of the stream, all input used, all output filled: nothing
	 * more, nothing less. */
	return inflate(zs, Z_FINISH) == Z_STREAM_END && !zs->avail_in && !zs->avail_out;
}

/*
 * PAGES_ZSTD or PAGES_ZLIB payload: one zstd frame or zlib stream that
 * must decompress to exactly the run's pages, into the bounce buffer. The
 * compressed size is bounded by what a compressor can produce for that
 * many pages.
 */
static int load_compressed(struct vmig__loader *l, uint8_t type, const struct vmig_wire_pages *pg,
			   uint32_t len, uint64_t at)
{
	size_t want = (size_t)pg->npages * VMIG_PAGE_SIZE, zlen = len - sizeof(*pg), got;
	bool zlib = type == VMIG_REC_PAGES_ZLIB;
	int ret;

	if (!l->mf_data || !l->bounce)
		return fail(l, -EPROTO, at, "compressed pages outside a multifd channel");
	if (!zlen || zlen > ZMAX)
		return fail(l, -EPROTO, at, "bad compressed page record length");
	if (!zlib && !l->zctx && !(l->zctx = ZSTD_createDCtx()))
		return fail(l, -ENOMEM, at, "out of memory for decompression");
	if (zlib && !l->zlib) {
		z_stream *zs = calloc(1, sizeof(*zs));

		if (!zs || inflateInit(zs) != Z_OK) {
			free(zs);
			return fail(l, -ENOMEM, at, "out of memory for decompression");
		}
		l->zlib = zs;
	}
	if (!l->zbuf && !(l->zbuf = malloc(ZMAX)))
		return fail(l, -ENOMEM, at, "out of memory for decompression");
	ret = vmig__reader_read(l->r, l->zbuf, zlen);
	if (ret)
		return read_error(l, ret, "compressed page data");
	if (zlib) {
		if (!inflate_exact(l, l->zbuf, zlen, want))
			return fail(l, -EPROTO, at,
				    "compressed page data does not decompress to its pages");
		return 0;
	}
	got = ZSTD_decompressDCtx(l->zctx, l->bounce, want, l->zbuf, zlen);
	if (ZSTD_isError(got) || got != want)
		return fail(l, -EPROTO, at, "compressed page data does not decompress to its pages");
	return 0;
}

/* After the post-copy switch: pages go to the placer. */
static bool in_postcopy(const struct vmig__loader *l)
{
	return l->postcopy ||
	       (l->postcopy_flag && __atomic_load_n(l->postcopy_flag, __ATOMIC_ACQUIRE));
}

static int load_pages(struct vmig__loader *l, uint8_t type, uint32_t len, uint64_t at)
{
	bool compressed = type == VMIG_REC_PAGES_ZSTD || type == VMIG_REC_PAGES_ZLIB;
	struct vmig_wire_pages pg;
	struct vmig__load_block *b;
	bool postcopy = in_postcopy(l);
	uint8_t *dst;
	int ret;

	if (!l->blocks_ok)
		return fail(l, -EPROTO, at, "page record before the RAM block list");
	if (len < sizeof(pg))
		return fail(l, -EPROTO, at, "page record too short");
	ret = vmig__reader_read(l->r, &pg, sizeof(pg));
	if (ret)
		return read_error(l, ret, "page record");
	b = check_run(l, &pg, at);
	if (!b)
		return -EPROTO;
	dst = b->host + pg.first * VMIG_PAGE_SIZE;
	if (type == VMIG_REC_ZERO) {
		if (len != sizeof(pg))
			return fail(l, -EPROTO, at, "zero-page record with a payload");
		l->pages_zero += pg.npages;
		if (postcopy)
			return l->hooks.place(l->hooks.opaque, pg.block, pg.first, pg.npages, NULL);
		/* A populated block on a post-copy destination: its pages may be
		 * out of this view already (a DISCARD), so the placer writes. */
		if (b->stale && l->hooks.fill) {
			ret = l->hooks.fill(l->hooks.opaque, pg.block, pg.first, pg.npages, NULL);
			if (ret) {
				vmig__err_set_first(l->err,
						    "installing zero pages in guest RAM: %s",
						    strerror(-ret));
				return ret;
			}
		}
		for (uint32_t i = 0; i < pg.npages; i++) {
			uint64_t pfn = pg.first + i;

			/* A cleared page that never held data is zero already: don't
			 * fault it in. */
			if ((b->stale && !l->hooks.fill) ||
			    (!b->stale && vmig__bitmap_test(b->received, pfn) &&
			     !vmig__bitmap_test(b->zero, pfn)))
				memset(dst + (uint64_t)i * VMIG_PAGE_SIZE, 0, VMIG_PAGE_SIZE);
			b->page_hash[pfn] = vmig__zero_page_hash();
			vmig__bitmap_set(b->received, pfn);
			vmig__bitmap_set(b->zero, pfn);
		}
		return 0;
	}
	if (compressed) { /* the pages are in the bounce buffer now */
		ret = load_compressed(l, type, &pg, len, at);
		if (ret)
			return ret;
	} else if (len - sizeof(pg) != (uint64_t)pg.npages * VMIG_PAGE_SIZE) {
		return fail(l, -EPROTO, at, "page record length does not match its page count");
	}
	l->pages_normal += pg.npages;
	if (postcopy) {
		ret = compressed
			  ? 0
			  : vmig__reader_read(l->r, l->bounce, (size_t)pg.npages * VMIG_PAGE_SIZE);
		if (ret)
			return read_error(l, ret, "page data");
		return l->hooks.place(l->hooks.opaque, pg.block, pg.first, pg.npages, l->bounce);
	}
	if (l->hooks.fill) {
		/* Through a bounce buffer, so pages can be installed whole. */
		ret = compressed ? 0 : vmig__reader_read(l->r, l->bounce,
							 (size_t)pg.npages * VMIG_PAGE_SIZE);
		if (ret)
			return read_error(l, ret, "page data");
		ret = l->hooks.fill(l->hooks.opaque, pg.block, pg.first, pg.npages, l->bounce);
		if (ret) {
			vmig__err_set_first(l->err, "installing pages in guest RAM: %s",
					    strerror(-ret));
			return ret;
		}
		dst = l->bounce;
	} else if (compressed) {
		memcpy(dst, l->bounce, (size_t)pg.npages * VMIG_PAGE_SIZE);
		dst = l->bounce;
	} else if (l->bounce) {
		/*
		 * Through the bounce buffer, which stays in cache: the pages
		 * are hashed there and copied into guest RAM once. Read
		 * straight into guest RAM, they would be hashed from memory
		 * the kernel's copy has just pushed out of the cache, which
		 * costs more than this copy (a 1 GiB profile: 1.1 s hashing).
		 */
		ret = vmig__reader_read(l->r, l->bounce, (size_t)pg.npages * VMIG_PAGE_SIZE);
		if (ret)
			return read_error(l, ret, "page data");
		memcpy(dst, l->bounce, (size_t)pg.npages * VMIG_PAGE_SIZE);
		dst = l->bounce;
	} else {
		ret = vmig__reader_read(l->r, dst, (size_t)pg.npages * VMIG_PAGE_SIZE);
		if (ret)
			return read_error(l, ret, "page data");
	}
	for (uint32_t i = 0; i < pg.npages; i++) {
		b->page_hash[pg.first + i] = vmig__page_hash(dst + (uint64_t)i * VMIG_PAGE_SIZE);
		vmig__bitmap_set(b->received, pg.first + i);
		vmig__bitmap_clear(b->zero, pg.first + i);
	}
	return 0;
}

static int load_discard(struct vmig__loader *l, uint32_t len, uint64_t at)
{
	struct vmig_wire_discard d;
	int ret;

	if (!l->hooks.discard)
		return fail(l, -EPROTO, at,
			    "post-copy record, but post-copy-ram is not enabled on the destination");
	if (l->run)
		return fail(l, -EPROTO, at, "discard after the post-copy switch");
	if (len != sizeof(d))
		return fail(l, -EPROTO, at, "bad discard record");
	ret = vmig__reader_read(l->r, &d, sizeof(d));
	if (ret)
		return read_error(l, ret, "discard record");
	if (d.block >= l->nblocks || d.reserved || !d.npages ||
	    d.first >= l->blocks[d.block].npages || d.npages > l->blocks[d.block].npages - d.first)
		return fail(l, -EPROTO, at, "discard record outside its RAM block");
	return l->hooks.discard(l->hooks.opaque, d.block, d.first, d.npages);
}

static int load_fixed(struct vmig__loader *l, uint32_t len, uint64_t at, void *dst, size_t size,
		      const char *what)
{
	int ret;

	if (len != size)
		return fail(l, -EPROTO, at, what);
	ret = vmig__reader_read(l->r, dst, size);
	return ret ? read_error(l, ret, what) : 0;
}

/* MULTIFD: from now on pages arrive on data channels, none on this one. */
static int load_multifd(struct vmig__loader *l, uint32_t len, uint64_t at)
{
	struct vmig_wire_multifd mf;
	int ret;

	if (!l->multifd_ok)
		return fail(l, -EPROTO, at,
			    "multifd stream, but multifd is not enabled on the destination");
	if (l->mf_channels || l->rounds || l->pages_normal || l->pages_zero)
		return fail(l, -EPROTO, at, "multifd record out of order");
	ret = load_fixed(l, len, at, &mf, sizeof(mf), "bad multifd record");
	if (ret)
		return ret;
	if (!mf.channels || mf.channels > VMIG_MAX_MULTIFD || mf.reserved)
		return fail(l, -EPROTO, at, "bad multifd channel count");
	l->mf_channels = mf.channels;
	return 0;
}

static int load_state(struct vmig__loader *l, uint32_t len, uint64_t at)
{
	int ret;

	if (l->state)
		return fail(l, -EPROTO, at, "device state sent twice");
	l->state = malloc(len ? len : 1);
	if (!l->state) {
		vmig__err_set_first(l->err, "out of memory for %u bytes of device state", len);
		return -ENOMEM;
	}
	l->state_len = len;
	ret = vmig__reader_read(l->r, l->state, len);
	return ret ? read_error(l, ret, "device state") : 0;
}

int vmig__load_record(struct vmig__loader *l, uint8_t *type)
{
	struct vmig_wire_rec rec;
	struct vmig_wire_sync sync;
	uint64_t at = l->r->bytes - (l->r->len - l->r->pos);
	int ret;

	ret = vmig__reader_read(l->r, &rec, sizeof(rec));
	if (ret)
		return read_error(l, ret, "record header");
	*type = rec.type;
	if (rec.flags || rec.reserved)
		return fail(l, -EPROTO, at, "record header has unknown flags");
	if (rec.len > VMIG_REC_MAX_PAYLOAD)
		return fail(l, -EPROTO, at, "record longer than the format allows");
	if (l->eos)
		return fail(l, -EPROTO, at, "record after end of stream");
	if (rec.type != VMIG_REC_BLOCKS && !l->blocks_ok)
		return fail(l, -EPROTO, at, "stream does not start with the RAM block list");
	if (l->urgent && rec.type != VMIG_REC_PAGES && rec.type != VMIG_REC_ZERO)
		return fail(l, -EPROTO, at, "urgent channel carries page records only");
	if (l->mf_data && rec.type != VMIG_REC_PAGES && rec.type != VMIG_REC_PAGES_ZSTD &&
	    rec.type != VMIG_REC_PAGES_ZLIB && rec.type != VMIG_REC_ZERO &&
	    rec.type != VMIG_REC_SYNC && rec.type != VMIG_REC_EOS)
		return fail(l, -EPROTO, at, "multifd channel carries pages, sync and end only");

	switch (rec.type) {
	case VMIG_REC_BLOCKS:
		return load_blocks(l, rec.len, at);
	case VMIG_REC_PAGES:
	case VMIG_REC_PAGES_ZSTD:
	case VMIG_REC_PAGES_ZLIB:
	case VMIG_REC_ZERO:
		return load_pages(l, rec.type, rec.len, at);
	case VMIG_REC_SYNC:
		ret = load_fixed(l, rec.len, at, &sync, sizeof(sync), "bad sync record");
		if (!ret) {
			l->rounds++;
			l->last_round = sync.round;
		}
		return ret;
	case VMIG_REC_STATE:
		return load_state(l, rec.len, at);
	case VMIG_REC_DIGEST:
		if (l->have_digest)
			return fail(l, -EPROTO, at, "digest sent twice");
		ret = load_fixed(l, rec.len, at, &l->digest, sizeof(l->digest), "bad digest record");
		if (ret)
			return ret;
		if (l->digest.flags & ~VMIG_DIGEST_F_MEMORY || l->digest.reserved)
			return fail(l, -EPROTO, at, "digest record has unknown flags");
		l->have_digest = true;
		return 0;
	case VMIG_REC_DISCARD:
		return load_discard(l, rec.len, at);
	case VMIG_REC_POSTCOPY_RUN:
		if (!l->hooks.place)
			return fail(l, -EPROTO, at,
				    "post-copy switch, but post-copy-ram is not enabled on the "
				    "destination");
		if (rec.len || l->run || !l->state)
			return fail(l, -EPROTO, at, "post-copy switch out of order");
		l->run = true;
		return 0;
	case VMIG_REC_MULTIFD:
		return load_multifd(l, rec.len, at);
	case VMIG_REC_EOS:
		if (rec.len)
			return fail(l, -EPROTO, at, "end-of-stream record with a payload");
		if (!l->mf_data && (!l->state || !l->have_digest))
			return fail(l, -EPROTO, at, "end of stream before device state and digest");
		l->eos = true;
		return 0;
	default: {
		char what[64];

		snprintf(what, sizeof(what), "unknown record type 0x%02x", rec.type);
		return fail(l, -EPROTO, at, what);
	}
	}
}

int vmig__load_verify(struct vmig__loader *l)
{
	uint64_t *hashes[VMIG_MAX_BLOCKS];
	uint64_t npages[VMIG_MAX_BLOCKS];
	uint64_t got;

	for (unsigned i = 0; i < l->nblocks; i++) {
		hashes[i] = l->blocks[i].page_hash;
		npages[i] = l->blocks[i].npages;
	}
	for (unsigned i = 0; i < l->nblocks; i++) {
		struct vmig__load_block *b = &l->blocks[i];
		uint64_t p = b->stale ? vmig__bitmap_find_next_zero(b->received, b->npages, 0) : b->npages;

		/* Not cleared, so its hash says nothing about what it holds. */
		if (p < b->npages) {
			vmig__err_set_first(l->err, "RAM block '%s' page %llu never arrived",
					    b->name, (unsigned long long)p);
			return -EBADMSG;
		}
	}
	got = vmig__digest_of_hashes(hashes, npages, l->nblocks);
	if (got != l->digest.page_digest) {
		vmig__err_set_first(l->err,
				    "memory digest mismatch: source %016llx, destination %016llx",
				    (unsigned long long)l->digest.page_digest,
				    (unsigned long long)got);
		return -EBADMSG;
	}
	if (!(l->digest.flags & VMIG_DIGEST_F_MEMORY))
		return 0;
	/* Full check: hash guest RAM as it is now, page by page. */
	for (unsigned i = 0; i < l->nblocks; i++) {
		struct vmig__load_block *b = &l->blocks[i];

		for (uint64_t p = 0; p < b->npages; p++) {
			if (vmig__page_hash(b->host + p * VMIG_PAGE_SIZE) != b->page_hash[p]) {
				vmig__err_set_first(l->err,
						    "RAM block '%s' page %llu differs from what "
						    "was received",
						    b->name, (unsigned long long)p);
				return -EBADMSG;
			}
		}
	}
	if (got != l->digest.mem_digest) {
		vmig__err_set_first(l->err, "memory digest at switch-over does not match");
		return -EBADMSG;
	}
	return 0;
}

void vmig__loader_release(struct vmig__loader *l)
{
	free(l->state);
	l->state = NULL;
	l->state_len = 0;
	ZSTD_freeDCtx(l->zctx);
	l->zctx = NULL;
	if (l->zlib)
		inflateEnd(l->zlib);
	free(l->zlib);
	l->zlib = NULL;
	free(l->zbuf);
	l->zbuf = NULL;
}

int vmig__rp_read(struct vmig__reader *r, uint8_t *type, void *payload, size_t cap, size_t *len,
		  struct vmig__err *err)
{
	struct vmig_wire_rec rec;
	int ret = vmig__reader_read(r, &rec, sizeof(rec));

	if (ret) {
		if (ret == -EPIPE)
			vmig__err_set_first(err, "destination closed the connection");
		else
			vmig__err_set_first(err, "reading return path: %s",
					    vmig__reader_strerror(r, ret));
		return ret;
	}
	/* A TLS record (alert or handshake) where a plain one was expected. */
	if ((rec.type == 0x15 || rec.type == 0x16) && rec.flags == 0x03 && r->c &&
	    !vmig__chan_is_tls(r->c)) {
		vmig__err_set_first(err, "the destination requires TLS (set tls-creds here)");
		return -EPROTO;
	}
	if (rec.type < VMIG_RP_READY || rec.type > VMIG_RP_COMPLETE || rec.flags || rec.reserved ||
	    rec.len > cap) {
		vmig__err_set_first(err, "invalid return-path message (type 0x%02x, %u bytes)",
				    rec.type, rec.len);
		return -EPROTO;
	}
	ret = vmig__reader_read(r, payload, rec.len);
	if (ret) {
		vmig__err_set_first(err, "return path ended early");
		return ret;
	}
	*type = rec.type;
	*len = rec.len;
	return 0;
}
