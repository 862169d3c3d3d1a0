/* SPDX-License-Identifier: MIT */
/*
 * Record framing for the migration stream: a batching writer (source side),
 * a buffered reader, and the record loader (destination side). Internal.
 *
 * Ownership and threads: a writer or reader belongs to one thread. The
 * channel is owned by the caller; these objects never close it.
 */
#ifndef VMIG_STREAM_H
#define VMIG_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "channel/channel.h"
#include "stream/format.h"
#include "util/util.h"

/* ---- writer ---------------------------------------------------------- */

#define VMIG_WRITER_IOV 512
#define VMIG_WRITER_HDRBUF (32u << 10)
/*
 * How much a flush writes at most (a run of pages larger than that goes as
 * several records). The pages a flush wrote are hashed right after it, for
 * the digest: the kernel's copy has just brought them into the cache, along
 * with the socket buffers it copied them to. Both must still be in the core's
 * L2 cache (1 to 2 MiB on current x86 servers), or the hash reads the pages
 * from memory a second time. 256 KiB instead of 1 MiB cut the source's CPU
 * for 4 GiB of pre-copy from 2.50 to 1.89 s on 4 KiB pages and from 2.55 to
 * 2.12 s on huge pages (medians of alternating runs, docs/benchmarks.md),
 * for 4096 writes per GiB instead of 1024.
 */
#define VMIG_WRITER_FLUSH_BYTES (256u << 10)
/*
 * The flush size of a background push in post-copy. While a write runs,
 * the writing thread holds its core in the kernel, and on the main
 * connection it holds the socket too, so the page requests arriving on that
 * connection wait in its backlog: a page request waits for the write in
 * progress to end. 1 MiB took 300 to 600 us to copy; 64 KiB (one TCP
 * segment offload's worth) keeps that wait to tens of us, for a few more
 * system calls per GiB pushed.
 */
#define VMIG_WRITER_FLUSH_BYTES_POSTCOPY (64u << 10)
/* Room for the page runs copied out of guest RAM that one flush writes
 * (vmig__writer_stage): a flush's worth and one record's. */
#define VMIG_WRITER_STAGE (VMIG_WRITER_FLUSH_BYTES + VMIG_REC_MAX_PAGES * VMIG_PAGE_SIZE)

/*
 * Called before each flush with the number of bytes about to be written;
 * may sleep (rate limiting). Returning non-zero aborts the flush with that
 * error (cancellation).
 */
typedef int (*vmig__throttle_fn)(void *opaque, size_t bytes);

struct vmig__writer {
	struct vmig__chan *c;
	int err; /* sticky: first error, -errno; puts after it are no-ops */
	uint64_t bytes;
	vmig__throttle_fn throttle;
	void *throttle_opaque;
	uint64_t *counts; /* optional: [0] pages, [1] zero pages queued (atomic adds) */
	struct vmig__zstd *z; /* optional: compress page runs (vmig__writer_compress) */
	struct vmig__wzc *zc; /* optional: zero-copy sends (vmig__writer_zerocopy) */
	int niov;
	size_t pending;
	size_t flush_bytes; /* flush once this much is queued; init: VMIG_WRITER_FLUSH_BYTES */
	size_t hdrlen;
	uint8_t *hdr; /* where headers go: hdrbuf, or a zero-copy ring slot */
	struct iovec iov[VMIG_WRITER_IOV];
	uint8_t hdrbuf[VMIG_WRITER_HDRBUF];
	/* Page runs queued since the last flush whose hashes the flush takes
	 * (vmig__writer_pages with hashes): at most one per iov. */
	unsigned nhq;
	struct vmig__whash {
		const uint8_t *host;
		uint64_t *out;
		uint32_t npages;
	} hq[VMIG_WRITER_IOV];
	/* Copies of page runs that queued iovs may point into (see
	 * vmig__writer_stage): stage[0, staged) is handed out. Its pages are
	 * only touched when used: writers are allocated, not zeroed. */
	size_t staged;
	uint8_t stage[VMIG_WRITER_STAGE];
};

void vmig__writer_init(struct vmig__writer *w, struct vmig__chan *c);
/* Preamble: magic, version, channel kind, flags, session id. */
void vmig__writer_preamble(struct vmig__writer *w, uint16_t channel, uint16_t flags,
			   struct vmig_wire_sid session);
/* A record whose payload is copied now (payload may be reused at once). */
void vmig__writer_rec(struct vmig__writer *w, uint8_t type, const void *payload, uint32_t len);
/*
 * A run of npages whole pages at host (referenced, not copied: host must
 * stay mapped until the next flush). With hashes, hashes[i] gets page i's
 * vmig__page_hash (a relaxed atomic store) once the flush that sends the
 * run has written it, whether or not that write succeeded: the page is then
 * in cache, where hashing it costs a fraction of reading it from memory
 * first (13% less CPU per byte sent). A compressed run is hashed from its
 * private copy, as it was sent. A page the guest changes meanwhile is dirty
 * and goes again, with a new hash, as when the hash came first. A run of
 * more than flush_bytes goes as several records, compressed or not.
 */
void vmig__writer_pages(struct vmig__writer *w, uint32_t block, uint64_t first, uint32_t npages,
			const void *host, uint64_t *hashes);
void vmig__writer_zero(struct vmig__writer *w, uint32_t block, uint64_t first, uint32_t npages);
/*
 * Room for len bytes that the caller fills with a copy of a page run and
 * then queues, in whole or in parts, with vmig__writer_pages: the copy
 * stays untouched until the flush that writes it. NULL if len is larger
 * than VMIG_REC_MAX_PAGES pages, or if the writer compresses or sends
 * zero-copy: both read guest RAM in their own way, and a zero-copy send
 * would have the kernel read the room after it was handed out again.
 */
uint8_t *vmig__writer_stage(struct vmig__writer *w, size_t len);
/* Write out everything queued. Returns the sticky error. */
int vmig__writer_flush(struct vmig__writer *w);
/* From now on send page runs compressed at this level, zstd (PAGES_ZSTD)
 * or zlib (PAGES_ZLIB), except runs that do not shrink. -ENOMEM or -EINVAL
 * if the context cannot be made. */
int vmig__writer_compress(struct vmig__writer *w, bool zlib, int level);
/*
 * From now on send zero-copy (MSG_ZEROCOPY; the channel must be plain TCP,
 * and the writer must not compress): page runs go from guest RAM without
 * a copy, and headers from a ring of buffers, each reused only once the
 * kernel is done with the write that carried it. Guest pages may change
 * while the kernel still reads them, as they may during a copying write
 * (dirty tracking sends them again); vmig__writer_drain() is where the
 * caller makes sure the kernel is done with all of them.
 */
int vmig__writer_zerocopy(struct vmig__writer *w, struct vmig__err *err);
/* Flush, then wait until the kernel is done with every byte written so
 * far. *copied: whether it copied every zero-copy send that completed
 * since the last drain anyway (QEMU's dirty-sync-missed-zero-copy counts
 * those). Returns the sticky error. */
int vmig__writer_drain(struct vmig__writer *w, bool *copied);
/* Free what vmig__writer_compress and vmig__writer_zerocopy allocated. */
void vmig__writer_release(struct vmig__writer *w);

/* ---- reader ---------------------------------------------------------- */

/* Small: what a refill takes beyond a record header is page data, which
 * then costs a second copy; reads of a page or more bypass the buffer. */
#define VMIG_READER_BUF (8u << 10)

/* Reads from a channel, or from a memory buffer (c NULL) for the fuzzer. */
struct vmig__reader {
	struct vmig__chan *c;
	const uint8_t *mem;
	size_t mem_len;
	size_t mem_pos;
	uint64_t bytes;
	size_t pos;
	size_t len;
	uint8_t buf[VMIG_READER_BUF];
};

void vmig__reader_init_chan(struct vmig__reader *r, struct vmig__chan *c);
void vmig__reader_init_mem(struct vmig__reader *r, const void *data, size_t len);
/* Exactly n bytes into dst. 0, -EPIPE on end of stream, or -errno. Large
 * reads go straight into dst without passing through the buffer. */
int vmig__reader_read(struct vmig__reader *r, void *dst, size_t n);
/* As vmig__reader_read, but never reads ahead of n bytes from the source:
 * for a preamble, when the connection may be handed to another reader. */
int vmig__reader_read_exact(struct vmig__reader *r, void *dst, size_t n);
/* Skip n bytes. */
int vmig__reader_skip(struct vmig__reader *r, size_t n);
/* Text for a failed read: the channel's (TLS) reason, or strerror. */
const char *vmig__reader_strerror(const struct vmig__reader *r, int ret);

/* ---- loader (destination) -------------------------------------------- */

struct vmig__load_block {
	char name[VMIG_BLOCK_NAME_MAX + 1];
	uint8_t *host;
	uint64_t size;
	uint64_t npages;
	uint64_t *page_hash; /* npages entries: XXH3-64 of each page as placed */
	uint64_t *received;  /* bitmap: page content arrived (data or zero) */
	uint64_t *zero;      /* bitmap: the last content that arrived was zero */
	bool stale;          /* RAM was not cleared: a page not received may hold
			      * anything, so zero pages are written, not skipped */
};

/*
 * Post-copy hooks. Once set, pages are no longer written in place: they are
 * read into a bounce buffer and handed to place() (buf NULL for zero pages),
 * which installs them atomically. discard() drops stale pages before the
 * switch; a DISCARD record without it is an error.
 */
struct vmig__load_hooks {
	/* pre-copy: install pages (buf: npages * 4096 bytes, or NULL: zeros,
	 * for a block kept populated); no hook = write in place */
	int (*fill)(void *opaque, unsigned block, uint64_t first, uint32_t npages,
		    const uint8_t *buf);
	int (*place)(void *opaque, unsigned block, uint64_t first, uint32_t npages,
		     const uint8_t *buf);
	int (*discard)(void *opaque, unsigned block, uint64_t first, uint64_t npages);
	void *opaque;
};

struct vmig__loader {
	struct vmig__reader *r;
	struct vmig__load_block *blocks;
	unsigned nblocks;
	struct vmig__err *err;
	struct vmig__load_hooks hooks;
	bool urgent;       /* urgent channel: page records only */
	bool multifd_ok;   /* main channel: the destination accepts a MULTIFD record */
	bool mf_data;      /* a multifd data channel: pages, SYNC and EOS only */
	uint32_t mf_index; /* data channel: its index */
	uint32_t mf_channels; /* > 0: pages travel on this many data channels */
	bool postcopy;     /* set by the caller after POSTCOPY_RUN: use hooks.place */
	/* A multifd data channel's loader runs in its own thread, idle at
	 * the switch: the main thread flips this for it (NULL: unused). */
	const bool *postcopy_flag; /* atomic */
	uint8_t *bounce;   /* VMIG_REC_MAX_PAGES pages, for hooks.fill and postcopy */

	/* from the preamble */
	uint16_t channel;
	uint16_t pre_flags;
	struct vmig_wire_sid session;

	/* progress */
	bool blocks_ok;
	bool eos;
	bool have_digest;
	bool run; /* POSTCOPY_RUN seen */
	uint64_t rounds;
	uint64_t last_round; /* round number of the last SYNC record */
	uint64_t pages_normal;
	uint64_t pages_zero;

	/* device state, kept until the digest is checked */
	uint8_t *state;
	size_t state_len;

	/* PAGES_ZSTD, PAGES_ZLIB: made on first use, freed by
	 * vmig__loader_release */
	void *zctx;
	void *zlib;
	uint8_t *zbuf;
	struct vmig_wire_digest digest;
};

/* Read and check the preamble. */
int vmig__load_preamble(struct vmig__loader *l);
/* Read, check and apply one record; *type gets its type. After EOS, l->eos
 * is set and the caller verifies with vmig__load_verify(). */
int vmig__load_record(struct vmig__loader *l, uint8_t *type);
/* Compare the page digest (and memory digest, if sent) with what arrived. */
int vmig__load_verify(struct vmig__loader *l);
void vmig__loader_release(struct vmig__loader *l);

/* Return-path record: type and a small payload (<= cap bytes). */
int vmig__rp_read(struct vmig__reader *r, uint8_t *type, void *payload, size_t cap, size_t *len,
		  struct vmig__err *err);

/* ---- digest ------------------------------------------------------------ */

uint64_t vmig__page_hash(const void *page);
uint64_t vmig__page_hash_avx2(const void *page); /* x86-64 CPUs with AVX2 only */
uint64_t vmig__zero_page_hash(void);
/* XXH3-64 over the page-hash arrays of all blocks, in block order. */
uint64_t vmig__digest_of_hashes(uint64_t *const *hashes, const uint64_t *npages, unsigned nblocks);

#endif
