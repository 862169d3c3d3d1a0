// SPDX-License-Identifier: MIT
/*
 * Guest memory table and dirty log of a vhost-user device: mapping the
 * front-end's memory fds, translating guest physical and front-end virtual
 * addresses to our own, and setting dirty-log bits while QEMU migrates.
 *
 * Threat model: region descriptions come from the peer. Sizes and offsets are
 * checked for overflow before mmap, and translation never returns a pointer
 * whose range leaves the mapping. Regions may not overlap in guest physical
 * space, so a translation is unambiguous.
 *
 * Threads: the table is changed only by the control thread while every ring
 * is stopped; queue threads read it without locks.
 */
#include "vhost/vhost.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int vhost_fd_covers(int fd, uint64_t offset, uint64_t size)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	/* A regular file (memfd, hugetlbfs, tmpfs) shorter than the range
	 * would make our first access past its end a SIGBUS. */
	if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < offset + size)
		return -EINVAL;
	return 0;
}

void vhost_mem_init(struct vhost_mem *m)
{
	m->nregions = 0;
	for (unsigned i = 0; i < VHOST_MAX_MEM_REGIONS; i++)
		m->r[i].fd = -1;
}

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return a < b + blen && b < a + alen;
}

int vhost_mem_add(struct vhost_mem *m, const struct vhost_user_mem_region *d, int fd)
{
	uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
	uint64_t off_aligned, map_len;
	struct vhost_mem_region *r;
	void *map;

	if (fd < 0 || d->memory_size == 0)
		return -EINVAL;
	if (m->nregions >= VHOST_MAX_MEM_REGIONS)
		return -ENOSPC;
	/* No wrap-around in any of the three address spaces. */
	if (d->guest_phys_addr + d->memory_size < d->guest_phys_addr ||
	    d->userspace_addr + d->memory_size < d->userspace_addr ||
	    d->mmap_offset + d->memory_size < d->mmap_offset)
		return -EINVAL;
	for (uint32_t i = 0; i < m->nregions; i++)
		if (ranges_overlap(m->r[i].gpa, m->r[i].size, d->guest_phys_addr, d->memory_size))
			return -EEXIST;
	if (vhost_fd_covers(fd, d->mmap_offset, d->memory_size))
		return -EINVAL;
	off_aligned = d->mmap_offset & ~(page - 1);
	map_len = d->memory_size + (d->mmap_offset - off_aligned);
	if (map_len > SIZE_MAX)
		return -EINVAL;
	/* MAP_NORESERVE: guest RAM is the front-end's; we only touch what the
	 * guest hands us. No MAP_POPULATE: mapping 4 GiB must stay cheap, it is
	 * on the restart and upgrade path. */
	map = mmap(NULL, (size_t)map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd,
		   (off_t)off_aligned);
	if (map == MAP_FAILED)
		return -errno;
	r = &m->r[m->nregions++];
	r->gpa = d->guest_phys_addr;
	r->size = d->memory_size;
	r->uva = d->userspace_addr;
	r->mmap_offset = d->mmap_offset;
	r->map = map;
	r->map_len = (size_t)map_len;
	r->hva = (uint8_t *)map + (d->mmap_offset - off_aligned);
	r->fd = fd;
	return 0;
}

static void region_release(struct vhost_mem_region *r)
{
	if (r->map)
		munmap(r->map, r->map_len);
	if (r->fd >= 0)
		close(r->fd);
	memset(r, 0, sizeof(*r));
	r->fd = -1;
}

int vhost_mem_remove(struct vhost_mem *m, const struct vhost_user_mem_region *d)
{
	for (uint32_t i = 0; i < m->nregions; i++) {
		struct vhost_mem_region *r = &m->r[i];

		if (r->gpa != d->guest_phys_addr || r->size != d->memory_size ||
		    r->uva != d->userspace_addr)
			continue;
		region_release(r);
		m->r[i] = m->r[m->nregions - 1];
		m->r[--m->nregions].fd = -1;
		m->r[m->nregions].map = NULL;
		return 0;
	}
	return -ENOENT;
}

void vhost_mem_clear(struct vhost_mem *m)
{
	for (uint32_t i = 0; i < m->nregions; i++)
		region_release(&m->r[i]);
	m->nregions = 0;
}

void *vhost_mem_gpa(const struct vhost_mem *m, uint64_t gpa, uint64_t *len)
{
	for (uint32_t i = 0; i < m->nregions; i++) {
		const struct vhost_mem_region *r = &m->r[i];
		uint64_t off = gpa - r->gpa;

		/* Unsigned compare also rejects gpa below the region. */
		if (off >= r->size)
			continue;
		if (*len > r->size - off)
			*len = r->size - off;
		return r->hva + off;
	}
	return NULL;
}

void *vhost_mem_uva(const struct vhost_mem *m, uint64_t uva, uint64_t len)
{
	for (uint32_t i = 0; i < m->nregions; i++) {
		const struct vhost_mem_region *r = &m->r[i];
		uint64_t off = uva - r->uva;

		if (off >= r->size)
			continue;
		if (len > r->size - off)
			return NULL;
		return r->hva + off;
	}
	return NULL;
}

int vhost_mem_uva_to_gpa(const struct vhost_mem *m, uint64_t uva, uint64_t *gpa)
{
	for (uint32_t i = 0; i < m->nregions; i++) {
		const struct vhost_mem_region *r = &m->r[i];
		uint64_t off = uva - r->uva;

		if (off >= r->size)
			continue;
		*gpa = r->gpa + off;
		return 0;
	}
	return -EFAULT;
}

int vhost_log_map(struct vhost_log *l, int fd, uint64_t size, uint64_t offset)
{
	uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
	uint64_t off_aligned = offset & ~(page - 1);
	uint64_t map_len = size + (offset - off_aligned);
	void *map;

	if (size == 0 || offset + size < offset || map_len > SIZE_MAX ||
	    vhost_fd_covers(fd, offset, size))
		return -EINVAL;
	map =
	    mmap(NULL, (size_t)map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)off_aligned);
	if (map == MAP_FAILED)
		return -errno;
	vhost_log_unmap(l);
	l->map = map;
	l->map_len = (size_t)map_len;
	l->bits = (uint8_t *)map + (offset - off_aligned);
	l->size = size;
	l->mmap_offset = offset;
	l->fd = fd;
	return 0;
}

void vhost_log_unmap(struct vhost_log *l)
{
	if (l->map)
		munmap(l->map, l->map_len);
	if (l->fd >= 0)
		close(l->fd);
	memset(l, 0, sizeof(*l));
	l->fd = -1;
}

void vhost_log_write(const struct vhost_log *l, uint64_t gpa, uint64_t len)
{
	uint64_t first, last;

	if (!l || !l->bits || len == 0)
		return;
	first = gpa / VHOST_LOG_PAGE;
	last = (gpa + len - 1) / VHOST_LOG_PAGE;
	for (uint64_t page = first; page <= last; page++) {
		uint64_t byte = page / 8;

		/* Pages beyond the log are not guest RAM QEMU migrates. */
		if (byte >= l->size)
			break;
		/* QEMU collects the bitmap with atomic exchanges; an atomic OR
		 * keeps bits set concurrently by other queues. */
		__atomic_fetch_or(&l->bits[byte], (uint8_t)(1u << (page % 8)), __ATOMIC_RELAXED);
	}
}
