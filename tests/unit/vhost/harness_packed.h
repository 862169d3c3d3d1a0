/* SPDX-License-Identifier: MIT */
/*
 * Packed-ring additions to harness.h: the same fake guest RAM, with a packed
 * descriptor ring at H_DESC, the driver event area at H_AVAIL and the device
 * event area at H_USED (where a front-end's SET_VRING_ADDR puts them), and a
 * small guest driver that posts buffers and reaps used ones the way Linux's
 * virtio_ring does: wrap counters on both sides, the head's flags written
 * last, the used position advanced by each buffer's descriptor count.
 * Header-only, included once by each test program that drives a packed ring.
 */
#ifndef VMIG_TEST_VHOST_HARNESS_PACKED_H
#define VMIG_TEST_VHOST_HARNESS_PACKED_H

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>

#include "harness.h"

/* The guest driver's side of a packed ring. */
struct hp_driver {
	uint16_t next_avail; /* next slot it writes */
	bool avail_wrap;
	uint16_t last_used; /* next slot it reads a used descriptor from */
	bool used_wrap;
	uint16_t free;			      /* descriptors it may still post */
	uint16_t ndesc[VHOST_MAX_QUEUE_SIZE]; /* per buffer id it posted */
};

struct hpk {
	struct harness h;
	struct hp_driver drv;
	struct vhost_pdesc *ring;
	struct vhost_pevent *driver_ev;
	struct vhost_pevent *device_ev;
	struct vhost_inflight_packed *inflight;
	uint64_t features;
};

/* One descriptor of a buffer the test posts. */
struct hp_seg {
	uint64_t addr;
	uint32_t len;
	uint16_t flags; /* VHOST_DESC_F_WRITE / _INDIRECT; NEXT is added */
};

/* Point the harness vq at the packed ring and reset both sides at base
 * (position | wrap << 15); the driver starts there too. */
static inline void hp_reset(struct hpk *p, uint16_t base)
{
	vhost_packed_reset(&p->h.vq, base, p->features);
	p->drv.next_avail = p->drv.last_used = base & 0x7fff;
	p->drv.avail_wrap = p->drv.used_wrap = base >> 15;
	p->drv.free = p->h.num;
	p->h.vq.last_avail_idx = p->h.vq.used_idx = p->h.vq.published_idx = 0;
}

static inline void hp_init(struct hpk *p, uint16_t num, bool event_idx, bool indirect)
{
	struct vhost_vq *vq;

	memset(p, 0, sizeof(*p));
	h_init(&p->h, num, event_idx, indirect);
	vq = &p->h.vq;
	p->features = (1ull << VIRTIO_F_RING_PACKED) | (1ull << VIRTIO_F_VERSION_1);
	p->ring = h_gpa(&p->h, H_DESC);
	p->driver_ev = h_gpa(&p->h, H_AVAIL);
	p->device_ev = h_gpa(&p->h, H_USED);
	vq->packed = true;
	vq->desc = NULL;
	vq->avail = NULL;
	vq->used = NULL;
	vq->pk.ring = vhost_mem_uva(&p->h.mem, H_UVA_BASE + H_DESC, 16u * num);
	vq->pk.driver_event = vhost_mem_uva(&p->h.mem, H_UVA_BASE + H_AVAIL, 4);
	vq->pk.device_event = vhost_mem_uva(&p->h.mem, H_UVA_BASE + H_USED, 4);
	vq->pk.ring_gpa = H_DESC;
	vq->pk.device_event_gpa = H_USED;
	if (vhost_packed_alloc(&vq->pk, num))
		abort();
	hp_reset(p, 0x8000);
}

/* Give the vq a fresh in-flight region (zeroed, like a new memfd), set up
 * as a ring start would. */
static inline void hp_inflight(struct hpk *p)
{
	p->inflight = calloc(1, vhost_inflight_packed_queue_size(p->h.num));
	if (!p->inflight)
		abort();
	p->h.vq.pk.inflight = p->inflight;
	vhost_packed_reset(&p->h.vq, vhost_packed_base(&p->h.vq), p->features);
}

static inline uint16_t hp_avail_flags(bool wrap)
{
	return wrap ? VHOST_PDESC_F_AVAIL : VHOST_PDESC_F_USED;
}

/*
 * The driver posts buffer id made of n descriptors: every descriptor but the
 * head first, then the head's flags with a release store, so the device
 * never sees a half-written chain. Returns false if the ring has no room.
 */
static inline bool hp_post(struct hpk *p, uint16_t id, const struct hp_seg *seg, uint16_t n)
{
	struct hp_driver *d = &p->drv;
	uint16_t head = d->next_avail, head_flags = 0;

	if (n == 0 || n > d->free)
		return false;
	for (uint16_t i = 0; i < n; i++) {
		uint16_t flags = seg[i].flags | (i + 1 < n ? VHOST_DESC_F_NEXT : 0) |
				 hp_avail_flags(d->avail_wrap);
		struct vhost_pdesc *e = &p->ring[d->next_avail];

		e->addr = seg[i].addr;
		e->len = seg[i].len;
		e->id = id;
		if (i == 0)
			head_flags = flags;
		else
			__atomic_store_n(&e->flags, flags, __ATOMIC_RELEASE);
		if (++d->next_avail == p->h.num) {
			d->next_avail = 0;
			d->avail_wrap = !d->avail_wrap;
		}
	}
	__atomic_store_n(&p->ring[head].flags, head_flags, __ATOMIC_RELEASE);
	d->ndesc[id] = n;
	d->free = (uint16_t)(d->free - n);
	return true;
}

/* One writable descriptor of len bytes at addr. */
static inline bool hp_post1(struct hpk *p, uint16_t id, uint64_t addr, uint32_t len)
{
	struct hp_seg s = {addr, len, VHOST_DESC_F_WRITE};

	return hp_post(p, id, &s, 1);
}

/* The driver reaps one used descriptor; false if there is none. */
static inline bool hp_get_used(struct hpk *p, uint16_t *id, uint32_t *len)
{
	struct hp_driver *d = &p->drv;
	const struct vhost_pdesc *e = &p->ring[d->last_used];
	uint16_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
	bool avail = flags & VHOST_PDESC_F_AVAIL, used = flags & VHOST_PDESC_F_USED;
	uint16_t n;

	if (avail != used || used != d->used_wrap)
		return false;
	*id = e->id;
	*len = e->len;
	n = *id < p->h.num ? d->ndesc[*id] : 0;
	if (n == 0)
		abort(); /* the device returned an id the driver never posted */
	d->ndesc[*id] = 0;
	d->free = (uint16_t)(d->free + n);
	d->last_used = (uint16_t)(d->last_used + n);
	if (d->last_used >= p->h.num) {
		d->last_used = (uint16_t)(d->last_used - p->h.num);
		d->used_wrap = !d->used_wrap;
	}
	return true;
}

static inline void hp_free(struct hpk *p)
{
	vhost_packed_free(&p->h.vq.pk);
	free(p->inflight);
	h_free(&p->h);
}

#endif
