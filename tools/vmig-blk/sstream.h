/* SPDX-License-Identifier: MIT */
/*
 * The storage stream between two vmig-blk daemons (docs/storage-migration.md
 * is its byte layout; the two must stay in step): a reader that checks every
 * record against the disk's geometry before anything is applied, and a
 * writer with a sticky error. Both run over byte-source and byte-sink
 * callbacks, so the same code serves a vmig channel (plain or TLS), a
 * socket pair in tests and a memory buffer in the fuzzer. Neither touches
 * the disk: the caller applies what the reader returns.
 *
 * Not thread-safe: one reader and one writer per direction, each used by one
 * thread at a time.
 */
#ifndef VMIG_BLK_SSTREAM_H
#define VMIG_BLK_SSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define VBLK_SS_MAGIC "VMIGBLKS"
#define VBLK_SS_VERSION 1u
#define VBLK_SS_PREAMBLE_LEN 48u
#define VBLK_SS_HDR_LEN 8u
#define VBLK_SS_MAX_DATA (1u << 20)	/* bytes of disk in one DATA record */
#define VBLK_SS_MAX_READ_REQ (1u << 20) /* bytes one READ_REQ may ask for */
#define VBLK_SS_MAX_TEXT 255u		/* ERROR text */
#define VBLK_SS_MIN_GRANULARITY 4096u
#define VBLK_SS_MAX_GRANULARITY (64u << 20)

enum vblk_ss_type {
	/* source to destination */
	VBLK_SS_DATA = 0x01,
	VBLK_SS_ZERO = 0x02,
	VBLK_SS_SYNC = 0x03,
	VBLK_SS_FLUSH = 0x04,
	VBLK_SS_EOS = 0x05,
	VBLK_SS_MISSING = 0x06,	 /* post-copy: granules the destination must fetch */
	VBLK_SS_POSTCOPY = 0x07, /* post-copy: the destination serves from here on */
	/* destination to source (the return path) */
	VBLK_SS_ACK = 0x41,
	VBLK_SS_ERROR = 0x42,
	VBLK_SS_READ_REQ = 0x43,
	VBLK_SS_DONE = 0x44,
	VBLK_SS_MISSING_MAP = 0x45, /* a resumed post-copy: what the destination lacks */
	VBLK_SS_MAP_END = 0x46,	    /* ... and that was all of it */
	/* a resumed post-copy this disk never switched to: the destination
	 * never served it, so the source may again */
	VBLK_SS_NOT_SWITCHED = 0x47,
};

#define VBLK_SS_ZERO_F_UNMAP 0x01u /* ZERO: the range may become a hole */
/* Preamble flag: the stream starts with every block of the disk (a fresh
 * copy, not a resumed one), so a destination may take it from a new
 * session. */
#define VBLK_SS_F_FULL 0x0001u
/* Preamble flag: the connection resumes a post-copy storage migration. The
 * destination already serves the disk; it answers with the granules it
 * still lacks (MISSING_MAP records, then MAP_END), and the stream is in
 * post-copy from its first record; or, if it never took the switch (never
 * served the disk), with NOT_SWITCHED alone. Not with FULL. */
#define VBLK_SS_F_POSTCOPY 0x0002u

/* Which way a stream runs: which record types it may carry. */
enum vblk_ss_dir {
	VBLK_SS_TO_DEST,   /* DATA, ZERO, SYNC, FLUSH, EOS, MISSING, POSTCOPY */
	VBLK_SS_TO_SOURCE, /* ACK, ERROR, READ_REQ, DONE, MISSING_MAP, MAP_END, NOT_SWITCHED */
};

struct vblk_ss_geom {
	uint64_t disk_size;   /* bytes, a multiple of block_size, > 0 */
	uint32_t block_size;  /* 512..65536, a power of two: every offset and length */
	uint32_t granularity; /* the source's dirty granularity, a power of two */
	uint8_t session[16];  /* 128 random bits, the same for every connection */
	uint16_t flags;	      /* preamble flags: VBLK_SS_F_FULL, VBLK_SS_F_POSTCOPY or 0 */
};

/* One record, checked. Pointers stay valid until the next read. */
struct vblk_ss_rec {
	enum vblk_ss_type type;
	uint8_t flags;
	uint64_t offset, length;	 /* DATA, ZERO, READ_REQ: bytes */
	const uint8_t *data;		 /* DATA, MISSING, MISSING_MAP: length bytes */
	uint64_t granule;		 /* MISSING, MISSING_MAP: bit 0 of the first word */
	uint64_t round;			 /* SYNC, ACK */
	uint64_t dirty_bytes;		 /* SYNC: what the source still had dirty */
	char text[VBLK_SS_MAX_TEXT + 1]; /* ERROR, NUL-terminated */
};

/* Read up to n bytes: > 0 bytes read, 0 or -errno at the end or on error
 * (vmig__chan_read's convention: -EPIPE at the end). */
typedef ssize_t (*vblk_ss_read_fn)(void *opaque, void *buf, size_t n);
/* Write all n bytes: 0 or -errno (vmig__chan_write's convention). */
typedef int (*vblk_ss_write_fn)(void *opaque, const void *buf, size_t n);

struct vblk_ss_reader {
	vblk_ss_read_fn read;
	void *opaque;
	enum vblk_ss_dir dir;
	struct vblk_ss_geom geom; /* from the preamble (TO_DEST) or the caller */
	bool have_geom;
	bool eos;	     /* EOS, DONE or NOT_SWITCHED read: nothing may follow */
	bool postcopy;	     /* TO_DEST: POSTCOPY read, or a resumed post-copy */
	bool map_started;    /* TO_SOURCE: a MISSING_MAP read */
	bool map_ended;	     /* TO_SOURCE: MAP_END read */
	uint64_t pos;	     /* bytes consumed, for error messages */
	uint64_t last_round; /* the last SYNC or ACK round; 0: none yet */
	uint8_t *buf;	     /* VBLK_SS_MAX_DATA bytes: DATA and map payloads */
	char err[200];	     /* why the last call failed */
};

/*
 * Every field from the peer is untrusted. A reader for dir; buf must hold
 * VBLK_SS_MAX_DATA bytes (or be NULL: then a DATA or map record is an
 * error). A return path has no preamble: its reader takes the geometry
 * of the stream it answers (flags included) from vblk_ss_reader_set_geom.
 */
void vblk_ss_reader_init(struct vblk_ss_reader *r, enum vblk_ss_dir dir, vblk_ss_read_fn read,
			 void *opaque, uint8_t *buf);
void vblk_ss_reader_set_geom(struct vblk_ss_reader *r, const struct vblk_ss_geom *g);
/* Read and check the preamble; *g gets it. If want is not NULL, its disk
 * size and block size must match (the destination's own disk). 0 or
 * -errno (-EPROTO: a bad preamble, the reason in r->err). */
int vblk_ss_read_preamble(struct vblk_ss_reader *r, const struct vblk_ss_geom *want,
			  struct vblk_ss_geom *g);
/* Read and check one record. 0, or -errno with the reason in r->err:
 * -EPROTO for a record that breaks the format (nothing of it may be
 * applied), or the byte source's error. */
int vblk_ss_read_record(struct vblk_ss_reader *r, struct vblk_ss_rec *rec);

/* A writer keeps the first error (sticky): later puts do nothing and
 * return it, so a sender may check only at the end. Every put checks its
 * arguments against the geometry as the reader would (-EINVAL). */
struct vblk_ss_writer {
	vblk_ss_write_fn write;
	void *opaque;
	struct vblk_ss_geom geom;
	uint64_t pos;
	int error;
	bool postcopy; /* POSTCOPY put, or a resumed post-copy */
};

void vblk_ss_writer_init(struct vblk_ss_writer *w, vblk_ss_write_fn write, void *opaque,
			 const struct vblk_ss_geom *g);
int vblk_ss_put_preamble(struct vblk_ss_writer *w);
int vblk_ss_put_data(struct vblk_ss_writer *w, uint64_t offset, const void *buf, uint32_t len);
int vblk_ss_put_zero(struct vblk_ss_writer *w, uint64_t offset, uint64_t len, bool unmap);
int vblk_ss_put_sync(struct vblk_ss_writer *w, uint64_t round, uint64_t dirty_bytes);
int vblk_ss_put_flush(struct vblk_ss_writer *w);
int vblk_ss_put_eos(struct vblk_ss_writer *w);
int vblk_ss_put_ack(struct vblk_ss_writer *w, uint64_t round);
int vblk_ss_put_error(struct vblk_ss_writer *w, const char *text);
int vblk_ss_put_read_req(struct vblk_ss_writer *w, uint64_t offset, uint64_t len);
int vblk_ss_put_done(struct vblk_ss_writer *w);
/* Post-copy storage. A map record carries nwords 64-bit words of a bitmap
 * of granules (geom.granularity bytes each, the last one clipped to the
 * disk): bit b of word i is granule first + 64 * i + b. first a multiple
 * of 64, 1..VBLK_SS_MAX_DATA / 8 words, inside the disk's bitmap, no bit
 * set past the last granule. */
int vblk_ss_put_missing(struct vblk_ss_writer *w, uint64_t first, const uint64_t *words,
			size_t nwords);
int vblk_ss_put_postcopy(struct vblk_ss_writer *w);
int vblk_ss_put_missing_map(struct vblk_ss_writer *w, uint64_t first, const uint64_t *words,
			    size_t nwords);
int vblk_ss_put_map_end(struct vblk_ss_writer *w);
/* The answer to a resumed post-copy this destination never switched to;
 * nothing may follow it. */
int vblk_ss_put_not_switched(struct vblk_ss_writer *w);

/* Granules of the disk, and 64-bit words of a bitmap of them. */
static inline uint64_t vblk_ss_granules(const struct vblk_ss_geom *g)
{
	return g->disk_size / g->granularity + !!(g->disk_size % g->granularity);
}

static inline uint64_t vblk_ss_map_words(const struct vblk_ss_geom *g)
{
	return (vblk_ss_granules(g) + 63) / 64;
}

/* Word i of a MISSING or MISSING_MAP record (little-endian on the wire). */
static inline uint64_t vblk_ss_map_word(const struct vblk_ss_rec *rec, size_t i)
{
	const uint8_t *p = rec->data + 8 * i;
	uint64_t v = 0;

	for (int k = 7; k >= 0; k--)
		v = v << 8 | p[k];
	return v;
}

/* Is g a geometry the format allows? */
bool vblk_ss_geom_ok(const struct vblk_ss_geom *g);

#endif
