/* SPDX-License-Identifier: MIT */
/*
 * Guest memory for the vhost fuzz targets (virtq, virtq_packed, blk_req):
 * two adjacent regions of FUZZ_REGION bytes of one memfd at guest physical
 * 0 and user address FUZZ_UVA, so that chains crossing a region boundary are
 * exercised; and the input reader the ring targets share.
 */
#ifndef VMIG_TESTS_FUZZ_GUESTMEM_H
#define VMIG_TESTS_FUZZ_GUESTMEM_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhost/vhost.h"

#define FUZZ_REGION (64u * 1024)
#define FUZZ_MEM_SIZE (2u * FUZZ_REGION)
#define FUZZ_UVA 0x10000000ull

/* Map the guest's memory into mem (once per process); aborts on failure. */
static inline uint8_t *fuzz_guest_mem(struct vhost_mem *mem, const char *name)
{
	uint8_t *ram;
	int fd = memfd_create(name, MFD_CLOEXEC);

	if (fd < 0 || ftruncate(fd, FUZZ_MEM_SIZE) < 0)
		abort();
	ram = mmap(NULL, FUZZ_MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (ram == MAP_FAILED)
		abort();
	vhost_mem_init(mem);
	for (unsigned i = 0; i < 2; i++) {
		struct vhost_user_mem_region d = {i * FUZZ_REGION, FUZZ_REGION,
						  FUZZ_UVA + i * FUZZ_REGION, i * FUZZ_REGION};

		if (vhost_mem_add(mem, &d, dup(fd)))
			abort();
	}
	close(fd);
	return ram;
}

/* Fill dst with the next n input bytes, zeros past the input's end. */
static inline size_t fuzz_take(const uint8_t **data, size_t *size, void *dst, size_t n)
{
	size_t c = n < *size ? n : *size;

	memset(dst, 0, n);
	memcpy(dst, *data, c);
	*data += c;
	*size -= c;
	return c;
}

#endif
