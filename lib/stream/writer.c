// SPDX-License-Identifier: MIT
/*
 * Batching record writer for the source side. Record headers are packed into
 * a small buffer and page data is referenced in place (guest RAM), so one
 * writev() carries hundreds of records and the page bytes are copied once,
 * by the kernel. Errors are sticky: after the first failure every put is a
 * no-op and flush returns that error, so callers check once per batch.
 *
 * With compression on (multifd-compression zstd or zlib), each run of pages
 * is copied out of guest RAM first, then compressed into a buffer owned by
 * the writer, which the queued iovs point into until the next flush. The
 * copy is what makes compression safe while the guest runs: zstd reads its
 * input more than once (a repeat match is checked against the input as it
 * is then, while the decoder copies what the frame already holds), so a
 * page that changes during compression could make an unchanged page of the
 * same run decode wrong, and nothing would send that page again. From a
 * private copy, each page arrives as it was at the copy; one that changed
 * afterwards is dirty and goes again.
 *
 * A caller may instead copy a run out of guest RAM into the writer's stage
 * (vmig__writer_stage) and queue the copy: the source does so for huge
 * pages, which it reads through their file (lib/migrate/source.c says why).
 *
 * With zero-copy (zero-copy-send), the kernel reads page runs straight from
 * guest RAM and headers from a ring of ZC_SLOTS buffers, after the write
 * has returned: a slot is written again only once the kernel reports done
 * with the flush that last used it, ZC_SLOTS flushes later, so the writer
 * rarely waits. The ring is mmap'd: on release, munmap leaves any pages
 * the kernel still holds (a failed connection) to the kernel, where free()
 * would let the heap reuse them while they may still be sent.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <zlib.h>
#include <zstd.h>

#include "stream/stream.h"

/* Room for this many bytes of compressed runs between two flushes. */
#define ZBUF_BYTES (2u << 20)

#define ZC_SLOTS 8

struct vmig__wzc {
	uint8_t *ring;		  /* ZC_SLOTS header buffers of VMIG_WRITER_HDRBUF */
	uint64_t until[ZC_SLOTS]; /* slot i is free once this many sends are done */
	unsigned slot;		  /* the one w->hdr points into */
};

struct vmig__zstd {
	ZSTD_CCtx *cctx; /* zstd, or NULL for zlib */
	z_stream zs;	 /* zlib */
	size_t used;
	uint8_t buf[ZBUF_BYTES];
	uint8_t stage[VMIG_REC_MAX_PAGES * VMIG_PAGE_SIZE]; /* the run, out of guest RAM */
};

void vmig__writer_init(struct vmig__writer *w, struct vmig__chan *c)
{
	w->c = c;
	w->err = 0;
	w->bytes = 0;
	w->flush_bytes = VMIG_WRITER_FLUSH_BYTES;
	w->throttle = NULL;
	w->throttle_opaque = NULL;
	w->counts = NULL;
	w->z = NULL;
	w->zc = NULL;
	w->hdr = w->hdrbuf;
	w->niov = 0;
	w->pending = 0;
	w->hdrlen = 0;
	w->nhq = 0;
	w->staged = 0;
}

static void push_iov(struct vmig__writer *w, const void *base, size_t len)
{
	struct iovec *last = w->niov ? &w->iov[w->niov - 1] : NULL;

	/* Merge with the previous iov when contiguous (headers packed back to back). */
	if (last && (const uint8_t *)last->iov_base + last->iov_len == base) {
		last->iov_len += len;
	} else {
		w->iov[w->niov].iov_base = (void *)base;
		w->iov[w->niov].iov_len = len;
		w->niov++;
	}
	w->pending += len;
}

/* Make room for a header of hdr bytes and up to two iovs. */
static void reserve(struct vmig__writer *w, size_t hdr)
{
	if (w->niov + 2 > VMIG_WRITER_IOV || w->nhq + 1 > VMIG_WRITER_IOV ||
	    w->hdrlen + hdr > VMIG_WRITER_HDRBUF || w->pending >= w->flush_bytes)
		vmig__writer_flush(w);
}

static void *put_hdr(struct vmig__writer *w, uint8_t type, uint32_t len, size_t extra)
{
	struct vmig_wire_rec rec = {.type = type, .flags = 0, .reserved = 0, .len = len};
	uint8_t *p;

	reserve(w, sizeof(rec) + extra);
	p = w->hdr + w->hdrlen;
	memcpy(p, &rec, sizeof(rec));
	w->hdrlen += sizeof(rec) + extra;
	push_iov(w, p, sizeof(rec) + extra);
	return p + sizeof(rec);
}

void vmig__writer_preamble(struct vmig__writer *w, uint16_t channel, uint16_t flags,
			   struct vmig_wire_sid session)
{
	struct vmig_wire_preamble pre;
	uint8_t *p;

	if (w->err)
		return;
	memcpy(pre.magic, VMIG_STREAM_MAGIC, sizeof(pre.magic));
	pre.version = VMIG_STREAM_VERSION;
	pre.channel = channel;
	pre.flags = flags;
	pre.session = session;
	reserve(w, sizeof(pre));
	p = w->hdr + w->hdrlen;
	memcpy(p, &pre, sizeof(pre));
	w->hdrlen += sizeof(pre);
	push_iov(w, p, sizeof(pre));
}

void vmig__writer_rec(struct vmig__writer *w, uint8_t type, const void *payload, uint32_t len)
{
	if (w->err)
		return;
	if (len <= VMIG_WRITER_HDRBUF / 4) {
		void *p = put_hdr(w, type, len, len);

		if (len)
			memcpy(p, payload, len);
		return;
	}
	/* Big payload: reference it and flush now, since the caller may reuse it. */
	put_hdr(w, type, len, 0);
	push_iov(w, payload, len);
	if (w->zc)
		vmig__writer_drain(w, NULL);
	else
		vmig__writer_flush(w);
}

int vmig__writer_compress(struct vmig__writer *w, bool zlib, int level)
{
	struct vmig__zstd *z = calloc(1, sizeof(*z));

	if (!z)
		return -ENOMEM;
	if (zlib) {
		if (deflateInit(&z->zs, level) != Z_OK) {
			free(z);
			return -EINVAL;
		}
	} else if (!(z->cctx = ZSTD_createCCtx()) ||
		   ZSTD_isError(ZSTD_CCtx_setParameter(z->cctx, ZSTD_c_compressionLevel, level))) {
		ZSTD_freeCCtx(z->cctx);
		free(z);
		return -ENOMEM;
	}
	w->z = z;
	return 0;
}

int vmig__writer_zerocopy(struct vmig__writer *w, struct vmig__err *err)
{
	struct vmig__wzc *zc;
	int ret;

	if (w->z) {
		vmig__err_set(err, "zero-copy-send cannot be used with multifd-compression");
		return -EINVAL;
	}
	ret = vmig__writer_flush(w); /* what is queued uses hdrbuf */
	if (!ret)
		ret = vmig__chan_zc_enable(w->c, err);
	if (ret)
		return ret;
	zc = calloc(1, sizeof(*zc));
	if (zc)
		zc->ring = mmap(NULL, ZC_SLOTS * VMIG_WRITER_HDRBUF, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!zc || zc->ring == MAP_FAILED) {
		free(zc);
		vmig__err_set(err, "out of memory for zero-copy header buffers");
		return -ENOMEM;
	}
	w->zc = zc;
	w->hdr = zc->ring;
	return 0;
}

void vmig__writer_release(struct vmig__writer *w)
{
	if (w->zc) {
		munmap(w->zc->ring, ZC_SLOTS * VMIG_WRITER_HDRBUF);
		free(w->zc);
		w->zc = NULL;
		w->hdr = w->hdrbuf;
	}
	if (!w->z)
		return;
	if (w->z->cctx)
		ZSTD_freeCCtx(w->z->cctx);
	else
		deflateEnd(&w->z->zs);
	free(w->z);
	w->z = NULL;
}

/* Compress data into out (cap bytes); the size, or 0 if it did not fit. */
static size_t compress_run(struct vmig__zstd *z, uint8_t *out, size_t cap, const void *data,
			   size_t len)
{
	size_t n;

	if (z->cctx) {
		n = ZSTD_compress2(z->cctx, out, cap, data, len);
		return ZSTD_isError(n) ? 0 : n;
	}
	/* One whole zlib stream per run: each record stands on its own. */
	if (deflateReset(&z->zs) != Z_OK)
		return 0;
	z->zs.next_in = (Bytef *)data;
	z->zs.avail_in = (uInt)len;
	z->zs.next_out = out;
	z->zs.avail_out = (uInt)cap;
	if (deflate(&z->zs, Z_FINISH) != Z_STREAM_END)
		return 0;
	return cap - z->zs.avail_out;
}

/* Store each page's hash: others read them with relaxed atomics. */
static void hash_pages(const uint8_t *p, uint64_t *out, uint32_t npages)
{
	for (uint32_t i = 0; i < npages; i++)
		__atomic_store_n(&out[i], vmig__page_hash(p + (size_t)i * VMIG_PAGE_SIZE),
				 __ATOMIC_RELAXED);
}

/* Queue the run compressed; false if it did not shrink (send it raw). */
static bool put_compressed(struct vmig__writer *w, const struct vmig_wire_pages *pg,
			   const void *host, size_t data, uint64_t *hashes)
{
	struct vmig__zstd *z = w->z;
	size_t out;

	/* Flush first if need be: put_hdr() below must not flush, as that
	 * would hand the buffer space of this run to the next one. */
	reserve(w, sizeof(struct vmig_wire_rec) + sizeof(*pg));
	if (ZBUF_BYTES - z->used < VMIG_MAX(ZSTD_compressBound(data), compressBound(data)))
		vmig__writer_flush(w);
	if (w->err)
		return true; /* nothing more goes out anyway */
	if (data > sizeof(z->stage))
		return false;
	memcpy(z->stage, host, data);
	out = compress_run(z, z->buf + z->used, ZBUF_BYTES - z->used, z->stage, data);
	if (!out || out >= data)
		return false;
	if (hashes)
		hash_pages(z->stage, hashes, pg->npages);
	memcpy(put_hdr(w, z->cctx ? VMIG_REC_PAGES_ZSTD : VMIG_REC_PAGES_ZLIB,
		       (uint32_t)(sizeof(*pg) + out), sizeof(*pg)),
	       pg, sizeof(*pg));
	push_iov(w, z->buf + z->used, out);
	z->used += out;
	return true;
}

static void put_pages(struct vmig__writer *w, uint32_t block, uint64_t first, uint32_t npages,
		      const void *host, uint64_t *hashes)
{
	struct vmig_wire_pages pg = {.block = block, .npages = npages, .first = first};
	size_t data = (size_t)npages * VMIG_PAGE_SIZE;

	if (w->err)
		return;
	if (w->z && put_compressed(w, &pg, host, data, hashes))
		goto count;
	memcpy(put_hdr(w, VMIG_REC_PAGES, (uint32_t)(sizeof(pg) + data), sizeof(pg)), &pg,
	       sizeof(pg));
	push_iov(w, host, data);
	/* After put_hdr(), whose flush would take the entry too early. */
	if (hashes)
		w->hq[w->nhq++] =
		    (struct vmig__whash){.host = host, .out = hashes, .npages = npages};
count:
	if (w->counts)
		__atomic_add_fetch(&w->counts[0], npages, __ATOMIC_RELAXED);
}

void vmig__writer_pages(struct vmig__writer *w, uint32_t block, uint64_t first, uint32_t npages,
			const void *host, uint64_t *hashes)
{
	/* A run larger than a flush goes as several records, so that no
	 * write is much larger than flush_bytes. With compression too: a run
	 * that does not shrink goes raw, and must not make a write of a whole
	 * VMIG_REC_MAX_PAGES in the post-copy push. (Pre-copy's flush holds
	 * VMIG_REC_MAX_PAGES, so its runs are never split.) */
	uint32_t cap = (uint32_t)(w->flush_bytes / VMIG_PAGE_SIZE);

	if (!cap)
		cap = 1;
	while (npages > cap) {
		put_pages(w, block, first, cap, host, hashes);
		first += cap;
		npages -= cap;
		host = (const uint8_t *)host + (size_t)cap * VMIG_PAGE_SIZE;
		if (hashes)
			hashes += cap;
	}
	put_pages(w, block, first, npages, host, hashes);
}

void vmig__writer_zero(struct vmig__writer *w, uint32_t block, uint64_t first, uint32_t npages)
{
	struct vmig_wire_pages pg = {.block = block, .npages = npages, .first = first};

	if (w->err)
		return;
	memcpy(put_hdr(w, VMIG_REC_ZERO, sizeof(pg), sizeof(pg)), &pg, sizeof(pg));
	if (w->counts)
		__atomic_add_fetch(&w->counts[1], npages, __ATOMIC_RELAXED);
}

uint8_t *vmig__writer_stage(struct vmig__writer *w, size_t len)
{
	uint8_t *p;

	if (w->z || w->zc || len > VMIG_REC_MAX_PAGES * VMIG_PAGE_SIZE)
		return NULL;
	/*
	 * The room is handed out from the start again only right after a
	 * flush made here, when nothing queued can point into it. A flush
	 * from within the run (a full iov array, a post-copy flush size
	 * smaller than the run) leaves the rest of the run queued, so it must
	 * not rewind. Flushing here when this run would go over the flush
	 * size anyway keeps the copies to a flush's worth, in cache for the
	 * write.
	 */
	if (w->pending + len > w->flush_bytes || w->staged + len > sizeof(w->stage)) {
		vmig__writer_flush(w);
		w->staged = 0;
	}
	p = w->stage + w->staged;
	w->staged += len;
	return p;
}

/* After a zero-copy flush: headers go on in the next slot of the ring,
 * once the kernel is done with the flush that used it last. */
static void next_slot(struct vmig__writer *w)
{
	struct vmig__wzc *zc = w->zc;

	zc->until[zc->slot] = vmig__chan_zc_sent(w->c);
	zc->slot = (zc->slot + 1) % ZC_SLOTS;
	w->hdr = zc->ring + (size_t)zc->slot * VMIG_WRITER_HDRBUF;
	if (!w->err)
		w->err = vmig__chan_zc_wait(w->c, zc->until[zc->slot]);
}

int vmig__writer_flush(struct vmig__writer *w)
{
	if (w->err || !w->niov)
		goto out;
	if (w->throttle) {
		int ret = w->throttle(w->throttle_opaque, w->pending);

		if (ret) {
			w->err = ret;
			goto out;
		}
	}
	if (w->zc) {
		w->err = vmig__chan_writev_zc(w->c, w->iov, w->niov);
		next_slot(w);
	} else {
		w->err = vmig__chan_writev(w->c, w->iov, w->niov);
	}
	if (!w->err) /* atomic: other threads read it for statistics */
		__atomic_store_n(&w->bytes, w->bytes + w->pending, __ATOMIC_RELAXED);
out:
	/* Also after a failed write: part of it may have arrived. */
	for (unsigned i = 0; i < w->nhq; i++)
		hash_pages(w->hq[i].host, w->hq[i].out, w->hq[i].npages);
	w->nhq = 0;
	w->niov = 0;
	w->pending = 0;
	w->hdrlen = 0;
	if (w->z)
		w->z->used = 0;
	return w->err;
}

int vmig__writer_drain(struct vmig__writer *w, bool *copied)
{
	if (!vmig__writer_flush(w) && w->zc)
		w->err = vmig__chan_zc_wait(w->c, vmig__chan_zc_sent(w->c));
	if (copied)
		*copied = w->zc && vmig__chan_zc_take_copied(w->c);
	return w->err;
}
