// SPDX-License-Identifier: MIT
/*
 * The geometry of vmig-blk's disk: which logical block size the guest is
 * told and held to, how guest buffers must be aligned for O_DIRECT, and the
 * physical block and I/O sizes virtio-blk's topology fields pass on. Read
 * once from the open disk (a block device's ioctls, a file's statx DIO
 * alignment). Opening, sizing and locking the disk stay in main.c.
 */
#include "blk.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#ifndef STATX_DIOALIGN
#define STATX_DIOALIGN 0x00002000U
#endif

/* Unknown DMA alignment of a direct file: a page is enough for any device. */
#define VBLK_DEFAULT_MEM_ALIGN 4096u

static bool pow2(uint32_t v)
{
	return v && !(v & (v - 1));
}

/* A block device's sizes, as the block layer reports them. */
static int probe_blkdev(struct vblk_disk *disk, char *err, size_t errlen)
{
	int lbs = 0;
	unsigned int pbs = 0, io_min = 0, io_opt = 0;
	struct statx sx;

	if (ioctl(disk->fd, BLKSSZGET, &lbs) < 0) {
		int r = -errno;

		snprintf(err, errlen, "cannot read the logical block size (BLKSSZGET): %s",
			 strerror(-r));
		return r;
	}
	disk->block_size = (uint32_t)lbs;
	if (ioctl(disk->fd, BLKPBSZGET, &pbs) == 0 && pbs >= (unsigned)lbs && pow2(pbs))
		disk->physical_block_size = pbs;
	if (ioctl(disk->fd, BLKIOMIN, &io_min) == 0)
		disk->min_io_size = io_min;
	if (ioctl(disk->fd, BLKIOOPT, &io_opt) == 0)
		disk->opt_io_size = io_opt;
	/* The DMA alignment: since Linux 6.1 statx reports it for block
	 * devices too. Without it, a logical block is what a device needs. */
	disk->mem_align = disk->block_size;
	if (statx(disk->fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 &&
	    (sx.stx_mask & STATX_DIOALIGN) && pow2(sx.stx_dio_mem_align))
		disk->mem_align = sx.stx_dio_mem_align;
	return 0;
}

/* A regular file opened O_DIRECT: its file system's DIO alignment (statx,
 * Linux 6.1+), else 512 for offsets and a page for memory. */
static void probe_direct_file(struct vblk_disk *disk)
{
	struct statx sx;

	disk->mem_align = VBLK_DEFAULT_MEM_ALIGN;
	if (statx(disk->fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) < 0 ||
	    !(sx.stx_mask & STATX_DIOALIGN))
		return;
	if (pow2(sx.stx_dio_offset_align) && sx.stx_dio_offset_align > VBLK_SECTOR)
		disk->block_size = sx.stx_dio_offset_align;
	if (pow2(sx.stx_dio_mem_align))
		disk->mem_align = sx.stx_dio_mem_align;
}

int vblk_disk_probe(struct vblk_disk *disk, char *err, size_t errlen)
{
	int r;

	disk->block_size = VBLK_SECTOR;
	disk->mem_align = 1;
	disk->physical_block_size = 0;
	disk->min_io_size = disk->opt_io_size = 0;
	if (disk->backend == VBLK_BACKEND_FILE && disk->is_blkdev) {
		r = probe_blkdev(disk, err, errlen);
		if (r)
			return r;
	} else if (disk->backend == VBLK_BACKEND_FILE && disk->direct) {
		probe_direct_file(disk);
	}
	/* virtio-blk counts in 512-byte sectors: a block is a whole number of
	 * them, and a guest cannot use blocks larger than 64 KiB. */
	if (!pow2(disk->block_size) || disk->block_size < VBLK_SECTOR ||
	    disk->block_size > VBLK_MAX_BLOCK_SIZE) {
		snprintf(err, errlen,
			 "logical block size %u is not served (512 to %u, a power of 2)",
			 disk->block_size, VBLK_MAX_BLOCK_SIZE);
		return -EINVAL;
	}
	if (disk->mem_align > VBLK_MAX_BLOCK_SIZE)
		disk->mem_align = VBLK_MAX_BLOCK_SIZE;
	if (disk->physical_block_size < disk->block_size)
		disk->physical_block_size = disk->block_size;
	/* Served in whole blocks, as the 512-byte sectors were before. */
	disk->size -= disk->size % disk->block_size;
	if (disk->size == 0) {
		snprintf(err, errlen, "smaller than one logical block (%u bytes)",
			 disk->block_size);
		return -EINVAL;
	}
	return 0;
}
