/* SPDX-License-Identifier: MIT */
/*
 * The vmig migration stream, on the wire. docs/stream-format.md describes the
 * same thing as byte tables; keep the two in step.
 *
 * Everything is little-endian. A stream starts with a 32-byte preamble, then
 * a sequence of records. Each record is an 8-byte header (type, flags,
 * reserved, payload length) followed by its payload. A record never guesses:
 * an unknown type, a reserved bit set, or a length outside the bounds of its
 * type is an error. The same framing carries the return path
 * (destination to source) on the same connection.
 */
#ifndef VMIG_STREAM_FORMAT_H
#define VMIG_STREAM_FORMAT_H

#include <stdbool.h>
#include <stdint.h>

#define VMIG_STREAM_MAGIC "VMIGSTRM" /* 8 bytes, no NUL on the wire */
#define VMIG_STREAM_VERSION 2u	     /* 2: 128-bit session ids */

/* Pages per PAGES/ZERO record at most: 64 pages = 256 KiB of payload. */
#define VMIG_REC_MAX_PAGES 64u
/* Largest payload of any record (device state is the big one). */
#define VMIG_REC_MAX_PAYLOAD (16u << 20)
#define VMIG_MAX_BLOCKS 64u
#define VMIG_BLOCK_NAME_MAX 64u

/*
 * A migration may use several connections: the main one (records and the
 * return path) and, for post-copy, an urgent one that carries requested
 * pages only. Each starts with a preamble naming its role and the session
 * it belongs to, so a reconnecting source is matched to its destination.
 */
enum vmig_channel_kind {
	VMIG_CHAN_MAIN = 0,
	VMIG_CHAN_URGENT = 1,
	VMIG_CHAN_MULTIFD = 2, /* one of the MULTIFD record's data channels */
};

#define VMIG_PRE_F_RESUME 0x1u /* reconnecting a paused post-copy migration */
/* Multifd channels carry their index (0..254) in bits 8-15 of the flags. */
#define VMIG_PRE_F_INDEX_SHIFT 8
#define VMIG_PRE_F_INDEX_MASK 0xff00u
#define VMIG_MAX_MULTIFD 255u

/*
 * Multifd: pages are dealt to the data channels in chunks of 64 pages (one
 * dirty-bitmap word): chunk c = page / 64 of every block belongs to channel
 * c % channels. A page therefore always travels on the same connection, so
 * its copies arrive in order without any cross-channel sequencing, and no
 * two receiving threads ever touch the same chunk.
 */
#define VMIG_MULTIFD_CHUNK_PAGES 64u

/* A migration's session id: 128 random bits chosen by the source, the same
 * on every connection of the migration (and of its resumes), so a side
 * channel or a resume cannot be guessed into it. */
struct vmig_wire_sid {
	uint64_t lo, hi;
} __attribute__((packed));

static inline bool vmig__sid_eq(struct vmig_wire_sid a, struct vmig_wire_sid b)
{
	return !((a.lo ^ b.lo) | (a.hi ^ b.hi)); /* no early exit on a prefix */
}

struct vmig_wire_preamble {
	char magic[8];
	uint32_t version;
	uint16_t channel; /* enum vmig_channel_kind */
	uint16_t flags;   /* VMIG_PRE_F_* */
	struct vmig_wire_sid session;
} __attribute__((packed));

struct vmig_wire_rec {
	uint8_t type;
	uint8_t flags;
	uint16_t reserved; /* must be 0 */
	uint32_t len;      /* payload bytes after this header */
} __attribute__((packed));

enum vmig_rec_type {
	/* source -> destination */
	VMIG_REC_BLOCKS = 0x01,	      /* RAM block list: must be first */
	VMIG_REC_PAGES = 0x02,	      /* run of whole pages */
	VMIG_REC_ZERO = 0x03,	      /* run of zero pages, no data */
	VMIG_REC_SYNC = 0x04,	      /* end of a dirty-sync round */
	VMIG_REC_STATE = 0x05,	      /* device/vCPU state blob */
	VMIG_REC_DIGEST = 0x06,	      /* memory digest at switch-over */
	VMIG_REC_EOS = 0x07,	      /* end of stream */
	VMIG_REC_DISCARD = 0x08,      /* post-copy: drop these pages, they are stale */
	VMIG_REC_POSTCOPY_RUN = 0x09, /* post-copy: start now, pages follow */
	VMIG_REC_MULTIFD = 0x0a,      /* pages go on data channels from here on */
	VMIG_REC_PAGES_ZSTD = 0x0b,   /* multifd data channel: PAGES, zstd-compressed */
	VMIG_REC_PAGES_ZLIB = 0x0c,   /* multifd data channel: PAGES, zlib-compressed */

	/* destination -> source (return path) */
	VMIG_RP_READY = 0x40,	    /* blocks accepted, go ahead */
	VMIG_RP_RESUMED = 0x41,	    /* destination verified and started */
	VMIG_RP_ERROR = 0x42,	    /* destination failed: UTF-8 text */
	VMIG_RP_SYNC_ACK = 0x43,    /* all records up to SYNC round N are placed */
	VMIG_RP_PAGE_REQ = 0x44,    /* post-copy: send these pages now */
	VMIG_RP_RECV_BITMAP = 0x45, /* recovery: the pages the destination has */
	VMIG_RP_COMPLETE = 0x46,    /* post-copy: every page placed and verified */
};

/* DISCARD payload: a run of pages, possibly long. */
struct vmig_wire_discard {
	uint32_t block;
	uint32_t reserved;
	uint64_t first;
	uint64_t npages;
} __attribute__((packed));

/* RP_PAGE_REQ payload uses struct vmig_wire_pages (npages <= 64). */

/* RP_RECV_BITMAP payload: this header, then ceil(npages / 64) u64 words,
 * bit i of word i / 64 set when page i is already in place. */
struct vmig_wire_recv_bitmap {
	uint32_t block;
	uint32_t reserved;
	uint64_t npages;
} __attribute__((packed));

/* BLOCKS payload: u32 count, then count entries of: */
struct vmig_wire_block {
	uint8_t name_len; /* 1..VMIG_BLOCK_NAME_MAX, name follows, no NUL */
	uint8_t reserved[3];
	uint32_t page_size; /* 4096 in version 1 */
	uint64_t size;      /* bytes, multiple of page_size */
} __attribute__((packed));

/* PAGES and ZERO payload prefix; PAGES then carries npages * 4096 bytes,
 * PAGES_ZSTD one zstd frame and PAGES_ZLIB one zlib stream (RFC 1950) that
 * decompress to exactly that. */
struct vmig_wire_pages {
	uint32_t block;
	uint32_t npages; /* 1..VMIG_REC_MAX_PAGES */
	uint64_t first;  /* page index within the block */
} __attribute__((packed));

/* SYNC payload */
struct vmig_wire_sync {
	uint64_t round;
	uint64_t dirty_pages;
} __attribute__((packed));

/* DIGEST payload */
#define VMIG_DIGEST_F_MEMORY 0x1u /* mem_digest is valid */
struct vmig_wire_digest {
	uint32_t flags;
	uint32_t reserved;
	uint64_t page_digest; /* XXH3-64 over the array of per-page XXH3-64 */
	uint64_t mem_digest;  /* same, recomputed from memory at switch-over */
} __attribute__((packed));

/* MULTIFD payload: main channel, right after BLOCKS */
struct vmig_wire_multifd {
	uint32_t channels; /* 1..VMIG_MAX_MULTIFD */
	uint32_t reserved;
} __attribute__((packed));

/* RP_SYNC_ACK payload */
struct vmig_wire_sync_ack {
	uint64_t round;
} __attribute__((packed));

/* RP_RESUMED payload */
struct vmig_wire_resumed {
	uint64_t load_us; /* destination time from EOS to running */
} __attribute__((packed));

#endif
