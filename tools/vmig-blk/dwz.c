// SPDX-License-Identifier: MIT
/*
 * Discard and write-zeroes for vmig-blk's queue thread (blk.c starts and
 * completes them through vblk_dwz_start and vblk_dwz_complete). Which
 * operation each becomes depends on the disk: a hole, a zeroed range, zeros
 * written, or a block device's discard (see below). The segments come from
 * the guest and are checked against the disk before anything is issued.
 */
#include "req.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/virtio_blk.h>
#include <string.h>
#include <sys/ioctl.h>

/* A block device's discard through io_uring (Linux 6.12+), as BLKDISCARD
 * without blocking the queue thread; the uapi headers we build with may
 * predate it. */
#ifndef BLOCK_URING_CMD_DISCARD
#define BLOCK_URING_CMD_DISCARD _IO(0x12, 0)
#endif

/*
 * Discard and write-zeroes. The virtio rule: write-zeroes without the
 * UNMAP flag must leave the range allocated, so it is written with zeros
 * (a regular file), or zeroed with FALLOC_FL_ZERO_RANGE (a block device,
 * where the kernel turns it into a write-zeroes that does not unmap, and
 * writes zeros itself where the device cannot); never a hole. With UNMAP a
 * hole is punched (FALLOC_FL_PUNCH_HOLE reads back as zeros; on a block
 * device the kernel makes it a write-zeroes that may unmap); where that
 * cannot be done, zeros are written (ZERO_RANGE on a block device). A
 * discard punches a hole in a file; on a block device it is a real discard
 * (BLKDISCARD, issued through io_uring; where the kernel cannot, Linux
 * before 6.12, a punch as above). Where neither works, discard, a hint,
 * does nothing. Not FALLOC_FL_ZERO_RANGE on a file: ext4 and XFS make the
 * range unwritten extents, which SEEK_HOLE reports as a hole and copies
 * lose.
 *
 * A request's segments are done one after the other, one io_uring
 * operation at a time; zeros are written in chunks of up to
 * VBLK_ZERO_CHUNK from one shared buffer of zeros.
 */
#define VBLK_ZERO_BUF (256u << 10)
#define VBLK_ZERO_IOVS 16u
#define VBLK_ZERO_CHUNK ((uint64_t)VBLK_ZERO_BUF * VBLK_ZERO_IOVS)

static const struct iovec *zero_iovs(void)
{
	/* Never written: reads as zeros. Aligned for O_DIRECT. */
	static uint8_t zeros[VBLK_ZERO_BUF] __attribute__((aligned(VBLK_MAX_BLOCK_SIZE)));
	static struct iovec iov[VBLK_ZERO_IOVS];

	if (!iov[0].iov_base)
		for (unsigned i = 0; i < VBLK_ZERO_IOVS; i++)
			iov[i] = (struct iovec){zeros, sizeof(zeros)};
	return iov;
}

static void dwz_seg_begin(const struct vblk_queue *q, struct vblk_req *req)
{
	bool unmap = req->type == VIRTIO_BLK_T_DISCARD ||
		     (req->segs[req->seg].flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);

	req->seg_done = 0;
	if (req->type == VIRTIO_BLK_T_DISCARD && q->disk->is_blkdev && !q->no_uring_discard)
		req->seg_mode = VBLK_DWZ_DISCARD;
	else if (unmap)
		req->seg_mode = VBLK_DWZ_PUNCH;
	else
		req->seg_mode = q->disk->is_blkdev ? VBLK_DWZ_ZERO_RANGE : VBLK_DWZ_WRITE;
}

/* Issue the request's next operation: 0xff while one is in flight, else
 * the final status. */
static uint8_t dwz_next(struct vblk_queue *q, struct vblk_req *req)
{
	while (req->seg < req->nsegs) {
		const struct vblk_dwz_seg *s = &req->segs[req->seg];
		uint64_t off = s->sector * VBLK_SECTOR + req->seg_done;
		uint64_t left = (uint64_t)s->num_sectors * VBLK_SECTOR - req->seg_done;
		struct io_uring_sqe *sqe;

		if (left == 0 || q->disk->backend == VBLK_BACKEND_NULL) {
			if (++req->seg < req->nsegs)
				dwz_seg_begin(q, req);
			continue;
		}
		if (q->disk->ram) {
			memset(q->disk->ram + off, 0, left);
			req->seg_done += left;
			continue;
		}
		sqe = get_sqe(q);
		if (!sqe)
			return VIRTIO_BLK_S_IOERR;
		if (req->seg_mode == VBLK_DWZ_WRITE) {
			uint64_t n = left < VBLK_ZERO_CHUNK ? left : VBLK_ZERO_CHUNK;

			/* Whole buffers, or what is left of less than one: a
			 * remainder goes with the next chunk. */
			if (n >= VBLK_ZERO_BUF)
				io_uring_prep_writev(sqe, q->disk->fd, zero_iovs(),
						     (unsigned)(n / VBLK_ZERO_BUF), off);
			else
				io_uring_prep_write(sqe, q->disk->fd, zero_iovs()[0].iov_base,
						    (unsigned)n, off);
		} else if (req->seg_mode == VBLK_DWZ_DISCARD) {
			io_uring_prep_rw(IORING_OP_URING_CMD, sqe, q->disk->fd, NULL, 0, 0);
			sqe->cmd_op = BLOCK_URING_CMD_DISCARD;
			sqe->addr = off;
			sqe->addr3 = left;
		} else {
			io_uring_prep_fallocate(sqe, q->disk->fd,
						(req->seg_mode == VBLK_DWZ_PUNCH
						     ? FALLOC_FL_PUNCH_HOLE
						     : FALLOC_FL_ZERO_RANGE) |
						    FALLOC_FL_KEEP_SIZE,
						off, left);
		}
		io_uring_sqe_set_data(sqe, req);
		req->pending++;
		q->outstanding++;
		return 0xff;
	}
	return VIRTIO_BLK_S_OK;
}

/* One completion of a discard / write-zeroes operation: 0xff while the
 * request goes on, else its final status. */
uint8_t vblk_dwz_complete(struct vblk_queue *q, struct vblk_req *req, int res)
{
	const struct vblk_dwz_seg *s = &req->segs[req->seg];

	if (req->seg_mode == VBLK_DWZ_DISCARD && (res == -EOPNOTSUPP || res == -EINVAL)) {
		/* No discard through io_uring here (an older kernel, or a
		 * device without discard): punch, from now on. The range was
		 * checked, so EINVAL is the kernel's unknown command. */
		q->no_uring_discard = true;
		req->seg_mode = VBLK_DWZ_PUNCH;
	} else if (res == -EOPNOTSUPP && req->seg_mode != VBLK_DWZ_WRITE) {
		/* No holes (or no zero range) here. Discard is a hint: done.
		 * Write-zeroes: zero the range another way, never a hole. */
		if (req->type == VIRTIO_BLK_T_DISCARD)
			req->seg_done = (uint64_t)s->num_sectors * VBLK_SECTOR;
		else if (req->seg_mode == VBLK_DWZ_PUNCH && q->disk->is_blkdev)
			req->seg_mode = VBLK_DWZ_ZERO_RANGE;
		else
			req->seg_mode = VBLK_DWZ_WRITE;
	} else if (res < 0) {
		return VIRTIO_BLK_S_IOERR;
	} else if (req->seg_mode == VBLK_DWZ_WRITE) {
		if (res == 0)
			return VIRTIO_BLK_S_IOERR; /* the file shrank under us */
		req->seg_done += (uint64_t)res;
	} else {
		req->seg_done = (uint64_t)s->num_sectors * VBLK_SECTOR;
	}
	return dwz_next(q, req);
}

uint8_t vblk_dwz_parse(struct vblk_queue *q, struct vblk_req *req, uint64_t *total_out)
{
	bool discard = req->type == VIRTIO_BLK_T_DISCARD;
	struct vblk_dwz_seg *segs = req->segs;
	uint64_t len = iov_total(req->data, req->ndata);
	unsigned n;
	uint64_t total = 0;

	req->nsegs = 0;
	if (q->disk->read_only)
		return VIRTIO_BLK_S_IOERR;
	/* Bound the length in 64 bits before anything is derived from it:
	 * the guest's descriptors can add up to far more than 4 GiB, and
	 * 2^36 + 16 bytes would count as one segment in 32 bits. */
	if (len == 0 || len > sizeof(req->segs) || len % sizeof(segs[0]))
		return VIRTIO_BLK_S_UNSUPP;
	n = (unsigned)(len / sizeof(segs[0]));
	if (iov_gather(req->data, req->ndata, segs, (size_t)len))
		return VIRTIO_BLK_S_UNSUPP;
	for (unsigned i = 0; i < n; i++) {
		uint64_t bytes = (uint64_t)segs[i].num_sectors * VBLK_SECTOR;

		if (segs[i].flags & ~(uint32_t)(discard ? 0 : VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
			return VIRTIO_BLK_S_UNSUPP;
		if (segs[i].num_sectors > VBLK_MAX_DWZ_SECTORS ||
		    !range_ok(q->disk, segs[i].sector, bytes))
			return VIRTIO_BLK_S_IOERR;
		total += bytes;
	}
	req->nsegs = n;
	*total_out = total;
	return 0;
}

uint8_t vblk_dwz_start(struct vblk_queue *q, struct vblk_req *req)
{
	bool discard = req->type == VIRTIO_BLK_T_DISCARD;
	uint64_t total;
	uint8_t st = vblk_dwz_parse(q, req, &total);

	if (st)
		return st;
	req->seg = 0;
	dwz_seg_begin(q, req);
	stat_add(discard ? &q->stats.discard_ops : &q->stats.write_zeroes_ops, 1);
	stat_add(discard ? &q->stats.discard_bytes : &q->stats.write_zeroes_bytes, total);
	return dwz_next(q, req);
}
