// SPDX-License-Identifier: MIT
/*
 * What the two ends of a storage migration share inside vmig-blk: the
 * post-copy state file's layout and a few helpers (defined in mirror.c).
 * Not an interface of vmig-blk: mirror.h is.
 */
#ifndef VMIG_BLK_MIRROR_INT_H
#define VMIG_BLK_MIRROR_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "util/util.h"

struct vblk_daemon;

/*
 * The state file of a post-copy in progress, next to the image (or where
 * --postcopy-state says). On the destination, while it exists, the image
 * is not whole, and no vmig-blk serves it but one that resumes the
 * post-copy: a header of PC_STATE_HDR bytes, then the missing bitmap as
 * little-endian words (the layout of the stream's maps), mapped shared: a
 * bit is cleared once its granule's data is in the image, and both outlive
 * a kill -9 of the daemon in the page cache. On the source, the header
 * alone: the disk was handed over (the session says to which migration),
 * so a restarted daemon serves the post-copy and never the guest.
 */
#define PC_STATE_MAGIC "VMIGBLKP"     /* a destination's: the missing bitmap follows */
#define PC_STATE_MAGIC_SRC "VMIGBLKO" /* a source's: the disk was handed over */
#define PC_STATE_VERSION 1u
#define PC_STATE_HDR 4096u

struct pc_state_hdr {
	char magic[8];
	uint32_t version;
	uint32_t granularity;
	uint64_t disk_size;
	uint64_t nbits;
	uint8_t session[16];
};

/* Where this disk's post-copy state file lives: --postcopy-state, or next
 * to an image file; "" for a block device without it, and for RAM. */
void vblk_pc_state_path(const struct vblk_daemon *dm, char *buf, size_t len);
/* Can a state file be made at path (its directory is writable)? */
bool vblk_pc_state_writable(const char *path);

/* The storage stream's reader and writer callbacks over a vmig__chan. */
ssize_t vblk_chan_get(void *opaque, void *buf, size_t n);
int vblk_chan_put(void *opaque, const void *buf, size_t n);
/* A buffer for one record's data (VBLK_SS_MAX_DATA), aligned for O_DIRECT;
 * NULL when out of memory. free() it. */
void *vblk_ss_buf_alloc(void);
/* snprintf into an error buffer of len bytes. */
void vblk_fmt_err(char *err, size_t len, const char *fmt, ...) VMIG_PRINTF(3, 4);

#endif
