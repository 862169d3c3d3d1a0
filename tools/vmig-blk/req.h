/* SPDX-License-Identifier: MIT */
/*
 * vmig-blk's request, shared by the parts of the data path: blk.c (the
 * queue thread: parsing, reads and writes, completion) and dwz.c (discard
 * and write-zeroes). Everything here runs on the queue thread that owns
 * the request; nothing in it is for the rest of the daemon.
 */
#ifndef VMIG_BLK_REQ_H
#define VMIG_BLK_REQ_H

#include "blk.h"

#include <string.h>

struct vblk_dwz_seg {
	uint64_t sector;
	uint32_t num_sectors;
	uint32_t flags;
};

struct vblk_req {
	struct vblk_queue *q;
	struct vhost_chain chain;
	uint8_t *status;
	uint64_t status_gpa;
	uint32_t type;
	struct iovec *data; /* data iovecs, inside chain.iov */
	unsigned ndata;
	uint64_t offset;
	uint64_t bytes;	  /* to transfer */
	uint64_t done;	  /* transferred (short I/O is resubmitted) */
	uint32_t written; /* bytes we wrote into guest memory */
	int pending;	  /* io_uring operations outstanding */
	int error;	  /* first failure */
	bool busy;
	enum { VBLK_DELAY_NONE, VBLK_DELAY_WAITING, VBLK_DELAY_HELD } delay;
	uint8_t held_status; /* status to return once the latency is over */
	uint64_t gate_round; /* held until the gate's acked reaches it; 0: not held */
	uint8_t gate_status; /* the status to return then */
	bool pc_held;	     /* waits for missing granules (post-copy storage) */
	uint64_t sector;     /* from the request header */
	uint64_t fetch_ns;   /* taken from the ring (only while a latency is set) */
	unsigned nsegs;	     /* discard / write-zeroes segments */
	unsigned seg;	     /* the segment being worked on (one at a time) */
	uint64_t seg_done;   /* bytes of it zeroed so far (VBLK_DWZ_WRITE) */
	enum { VBLK_DWZ_DISCARD, VBLK_DWZ_PUNCH, VBLK_DWZ_ZERO_RANGE, VBLK_DWZ_WRITE } seg_mode;
	uint8_t *bounce; /* the bounce buffer it holds (see bounce_start); or NULL */
	/* A write's range, once checked: marked dirty when the request is
	 * done (req_finish). Discard and write-zeroes mark their segments. */
	uint64_t dirty_off, dirty_len;
	struct vblk_dwz_seg segs[VBLK_MAX_DWZ_SEGS];
};

static inline void stat_add(uint64_t *s, uint64_t v)
{
	/* Single writer (the queue thread); readers use relaxed loads. */
	__atomic_store_n(s, *s + v, __ATOMIC_RELAXED);
}

/* Copy len bytes from the start of iov[0..n) into dst; -1 if too short. */
static inline int iov_gather(const struct iovec *iov, unsigned n, void *dst, size_t len)
{
	uint8_t *d = dst;

	for (unsigned i = 0; i < n && len; i++) {
		size_t c = iov[i].iov_len < len ? iov[i].iov_len : len;

		memcpy(d, iov[i].iov_base, c);
		d += c;
		len -= c;
	}
	return len ? -1 : 0;
}

static inline uint64_t iov_total(const struct iovec *iov, unsigned n)
{
	uint64_t t = 0;

	for (unsigned i = 0; i < n; i++)
		t += iov[i].iov_len;
	return t;
}

/* Is [sector, sector + bytes) inside the disk, and whole logical blocks
 * (QEMU's virtio-blk refuses the rest with IOERR too)? Overflow-safe. */
static inline bool range_ok(const struct vblk_disk *disk, uint64_t sector, uint64_t bytes)
{
	uint64_t sectors = disk->size / VBLK_SECTOR;
	uint32_t block_sectors = disk->block_size / VBLK_SECTOR;

	return sector <= sectors && bytes / VBLK_SECTOR <= sectors - sector &&
	       bytes % disk->block_size == 0 && sector % block_sectors == 0;
}

static inline struct io_uring_sqe *get_sqe(struct vblk_queue *q)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&q->ring);

	if (!sqe) {
		io_uring_submit(&q->ring);
		sqe = io_uring_get_sqe(&q->ring);
	}
	return sqe;
}

/* blk.c: fetch and start up to one ring's worth of requests; returns how
 * many were started. The queue thread's step, not static so that the fuzz
 * target (tests/fuzz/blk_req.c) runs the request parsing on its own. */
unsigned vblk_process_avail(struct vblk_queue *q);

/* dwz.c: discard and write-zeroes. Both return a virtio status, or 0xff
 * while the request's next operation is in flight. */
uint8_t vblk_dwz_start(struct vblk_queue *q, struct vblk_req *req);
/* Read and check the segments into req->segs / nsegs (*total: their bytes):
 * 0, or the status the request fails with. vblk_dwz_start does it too. */
uint8_t vblk_dwz_parse(struct vblk_queue *q, struct vblk_req *req, uint64_t *total);
uint8_t vblk_dwz_complete(struct vblk_queue *q, struct vblk_req *req, int res);

#endif
