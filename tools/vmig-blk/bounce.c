// SPDX-License-Identifier: MIT
/*
 * Bounce buffers for vmig-blk's O_DIRECT data path (--cache none). The
 * kernel takes a guest buffer for O_DIRECT only if each piece of it starts
 * at the device's DMA alignment and is a whole number of logical blocks
 * long; virtio lets a guest lay its buffers out any way it likes (a header
 * and data in one descriptor, a status byte after the data, odd sizes).
 * Such a request goes through one of a few aligned buffers of the queue,
 * chunk by chunk (blk.c drives that); this file holds the pool and the
 * iovec copies. Not a cache: nothing stays in a bounce buffer after its
 * request is done. Queue thread only.
 */
#include "blk.h"
#include "util/util.h"

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* The largest alignment vblk_disk_probe lets through. */
#define VBLK_BOUNCE_ALIGN VBLK_MAX_BLOCK_SIZE

int vblk_bounce_alloc(struct vblk_bounce_pool *p, uint16_t num)
{
	void *mem = NULL;

	vblk_bounce_free(p);
	if (posix_memalign(&mem, VBLK_BOUNCE_ALIGN, (size_t)VBLK_BOUNCE_SLOTS * VBLK_BOUNCE_BYTES))
		return -ENOMEM;
	p->waiters = calloc(num, sizeof(*p->waiters));
	if (!p->waiters) {
		free(mem);
		return -ENOMEM;
	}
	p->mem = mem;
	p->free_mask = (1u << VBLK_BOUNCE_SLOTS) - 1;
	p->wait_head = 0;
	p->nwaiting = 0;
	return 0;
}

void vblk_bounce_free(struct vblk_bounce_pool *p)
{
	free(p->mem);
	free(p->waiters);
	memset(p, 0, sizeof(*p));
}

uint8_t *vblk_bounce_get(struct vblk_bounce_pool *p)
{
	unsigned i;

	if (!p->mem || !p->free_mask)
		return NULL;
	i = (unsigned)__builtin_ctz(p->free_mask);
	p->free_mask &= ~(1u << i);
	return p->mem + (size_t)i * VBLK_BOUNCE_BYTES;
}

void vblk_bounce_put(struct vblk_bounce_pool *p, uint8_t *buf)
{
	size_t i = (size_t)(buf - p->mem) / VBLK_BOUNCE_BYTES;

	assert(buf >= p->mem && i < VBLK_BOUNCE_SLOTS && buf == p->mem + i * VBLK_BOUNCE_BYTES);
	assert(!(p->free_mask & (1u << i))); /* not returned twice */
	p->free_mask |= 1u << i;
}

bool vblk_iov_direct_ok(const struct iovec *iov, unsigned n, uint32_t mem_align, uint32_t len_align)
{
	assert(mem_align && len_align);
	for (unsigned i = 0; i < n; i++)
		if ((uintptr_t)iov[i].iov_base % mem_align || iov[i].iov_len % len_align)
			return false;
	return true;
}

/* Copy len bytes between iov[0..n), from byte skip on, and buf; to_buf
 * says which way. The caller has checked that the iovecs hold that much. */
static void iov_copy(const struct iovec *iov, unsigned n, uint64_t skip, uint8_t *buf, size_t len,
		     bool to_buf)
{
	size_t done = 0;

	for (unsigned i = 0; i < n && done < len; i++) {
		uint8_t *p;
		size_t c;

		if (skip >= iov[i].iov_len) {
			skip -= iov[i].iov_len;
			continue;
		}
		p = (uint8_t *)iov[i].iov_base + skip;
		c = VMIG_MIN(iov[i].iov_len - skip, len - done);
		skip = 0;
		if (to_buf)
			memcpy(buf + done, p, c);
		else
			memcpy(p, buf + done, c);
		done += c;
	}
	assert(done == len);
}

void vblk_iov_to_buf(const struct iovec *iov, unsigned n, uint64_t skip, uint8_t *buf, size_t len)
{
	iov_copy(iov, n, skip, buf, len, true);
}

void vblk_iov_from_buf(const struct iovec *iov, unsigned n, uint64_t skip, const uint8_t *buf,
		       size_t len)
{
	iov_copy(iov, n, skip, (uint8_t *)buf, len, false);
}
