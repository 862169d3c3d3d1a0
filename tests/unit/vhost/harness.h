/* SPDX-License-Identifier: MIT */
/*
 * Test harness for lib/vhost: fake guest RAM in two memfds (guest physical
 * 0..1 MiB and 1..2 MiB, adjacent regions; nothing is mapped from 2 MiB on),
 * a memory table that maps them the way a front-end's SET_MEM_TABLE
 * would, and a split ring at fixed guest addresses that the test drives as
 * the guest driver would. Header-only: each test program includes it once.
 */
#ifndef VMIG_TEST_VHOST_HARNESS_H
#define VMIG_TEST_VHOST_HARNESS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhost/vhost.h"

#define H_REGION 0x100000ull /* 1 MiB per region */
#define H_DESC 0x1000ull
#define H_AVAIL 0x2000ull
#define H_USED 0x3000ull
#define H_INDIRECT 0x4000ull
#define H_DATA 0x10000ull
#define H_UVA_BASE 0x7f0000000000ull /* the "front-end's" virtual address of gpa 0 */

struct harness {
	int fd[2];
	uint8_t *ram[2]; /* our (the guest's) view */
	struct vhost_mem mem;
	struct vhost_vq vq;
	uint16_t batch[VHOST_MAX_QUEUE_SIZE];
	uint16_t num;
	uint16_t avail_idx; /* driver's next avail index */
	struct vhost_desc *desc;
	struct vhost_avail *avail;
	struct vhost_used *used;
	struct vhost_inflight_queue *inflight;
	struct vhost_log log;
	uint8_t *log_bits;
};

static inline void *h_gpa(struct harness *h, uint64_t gpa)
{
	return h->ram[gpa / H_REGION] + gpa % H_REGION;
}

static inline void h_init(struct harness *h, uint16_t num, bool event_idx, bool indirect)
{
	memset(h, 0, sizeof(*h));
	vhost_mem_init(&h->mem);
	for (int i = 0; i < 2; i++) {
		struct vhost_user_mem_region d = {
		    .guest_phys_addr = i * H_REGION,
		    .memory_size = H_REGION,
		    .userspace_addr = H_UVA_BASE + i * H_REGION,
		    .mmap_offset = 0,
		};

		h->fd[i] = memfd_create("harness", 0);
		if (h->fd[i] < 0 || ftruncate(h->fd[i], H_REGION) < 0)
			abort();
		h->ram[i] = mmap(NULL, H_REGION, PROT_READ | PROT_WRITE, MAP_SHARED, h->fd[i], 0);
		if (h->ram[i] == MAP_FAILED || vhost_mem_add(&h->mem, &d, dup(h->fd[i])))
			abort();
	}
	h->num = num;
	h->desc = h_gpa(h, H_DESC);
	h->avail = h_gpa(h, H_AVAIL);
	h->used = h_gpa(h, H_USED);
	h->vq.num = num;
	h->vq.event_idx = event_idx;
	h->vq.indirect = indirect;
	h->vq.desc = vhost_mem_uva(&h->mem, H_UVA_BASE + H_DESC, 16u * num);
	h->vq.avail = vhost_mem_uva(&h->mem, H_UVA_BASE + H_AVAIL, 6u + 2u * num);
	h->vq.used = vhost_mem_uva(&h->mem, H_UVA_BASE + H_USED, 6u + 8u * num);
	h->vq.mem = &h->mem;
	h->vq.batch = h->batch;
	h->log.fd = -1;
}

/* Give the vq an in-flight region (calloc'ed, like a fresh memfd). */
static inline void h_inflight(struct harness *h)
{
	h->inflight = calloc(1, vhost_inflight_queue_size(h->num));
	vhost_inflight_init(h->inflight, h->num, 0);
	h->vq.inflight = h->inflight;
}

/* A dirty log covering both regions: 2 MiB = 512 pages = 64 bytes. */
static inline void h_log(struct harness *h, bool log_used)
{
	static uint8_t bits[64];

	memset(bits, 0, sizeof(bits));
	h->log.bits = bits;
	h->log.size = sizeof(bits);
	h->log_bits = bits;
	h->vq.log = &h->log;
	h->vq.log_used = log_used;
	h->vq.used_gpa = H_USED;
}

static inline bool h_dirty(const struct harness *h, uint64_t gpa)
{
	uint64_t page = gpa / VHOST_LOG_PAGE;

	return (h->log_bits[page / 8] >> (page % 8)) & 1;
}

static inline void h_set_desc(struct harness *h, struct vhost_desc *table, uint16_t i,
			      uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
	table[i] = (struct vhost_desc){.addr = addr, .len = len, .flags = flags, .next = next};
}

/* The driver makes head available. */
static inline void h_post(struct harness *h, uint16_t head)
{
	h->avail->ring[h->avail_idx % h->num] = head;
	h->avail_idx++;
	__atomic_store_n(&h->avail->idx, h->avail_idx, __ATOMIC_RELEASE);
}

static inline void h_free(struct harness *h)
{
	vhost_mem_clear(&h->mem);
	for (int i = 0; i < 2; i++) {
		munmap(h->ram[i], H_REGION);
		close(h->fd[i]);
	}
	free(h->inflight);
}

#endif
