// SPDX-License-Identifier: MIT
/*
 * Split virtqueue data path: fetching available heads (with in-flight
 * marking), resolving descriptor chains to host iovecs, staging and
 * publishing used entries, EVENT_IDX notification suppression on both sides,
 * and dirty logging of what we write into guest memory. Each entry point
 * hands a packed ring to packed.c instead.
 *
 * Threat model: the rings and descriptors are guest memory and every field is
 * hostile. Each descriptor is copied once before use (no double fetch),
 * indexes are bounds-checked, chains are limited to the ring size (an
 * indirect table to its own length), so a loop ends in -ELOOP, and every
 * buffer must lie inside one mapped region per iovec.
 *
 * Memory ordering: avail->idx is read with acquire so the ring entries read
 * after it are at least as new; used elements are written before the
 * release store of used->idx; a full fence separates that store from reading
 * used_event / avail->flags (and our avail_event store from re-reading
 * avail->idx), the store-load pairs that EVENT_IDX depends on.
 *
 * Threads: all functions here run on the queue's own thread.
 */
#include "vhost/vhost.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>

static inline volatile uint16_t *used_event(const struct vhost_vq *vq)
{
	return &vq->avail->ring[vq->num];
}

static inline volatile uint16_t *avail_event(const struct vhost_vq *vq)
{
	return (volatile uint16_t *)&vq->used->ring[vq->num];
}

int vhost_vq_pop(struct vhost_vq *vq, uint16_t *head)
{
	uint16_t avail_idx, h;

	if (vq->packed)
		return vhost_packed_pop(vq, head);
	if (vq->broken)
		return -EIO;
	avail_idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
	if (avail_idx == vq->last_avail_idx)
		return 0;
	if ((uint16_t)(avail_idx - vq->last_avail_idx) > vq->num) {
		vq->broken = true;
		return -EIO;
	}
	h = vq->avail->ring[vq->last_avail_idx % vq->num];
	if (h >= vq->num) {
		vq->broken = true;
		return -EIO;
	}
	if (vq->inflight) {
		struct vhost_inflight_desc *d = &vq->inflight->desc[h];

		if (d->inflight) {
			/* The guest re-posted a head we still own. */
			vq->broken = true;
			return -EIO;
		}
		/* Counter before flag: a marked entry always has its order. */
		d->counter = ++vq->counter;
		__atomic_store_n(&d->inflight, 1, __ATOMIC_RELEASE);
	}
	vq->last_avail_idx++;
	*head = h;
	return 1;
}

/* Append [gpa, gpa + len) to the chain, split at region boundaries. */
int vhost_vq_chain_add(const struct vhost_vq *vq, struct vhost_chain *c, uint64_t gpa, uint32_t len,
		       bool writable)
{
	uint64_t left = len;

	if (!writable && c->nin)
		return -EINVAL; /* device-readable after device-writable */
	while (left) {
		uint64_t n = left;
		void *p = vhost_mem_gpa(vq->mem, gpa, &n);
		unsigned i = (unsigned)c->nout + c->nin;

		if (!p)
			return -EFAULT;
		if (i >= c->max)
			return -E2BIG;
		c->iov[i].iov_base = p;
		c->iov[i].iov_len = (size_t)n;
		c->gpa[i] = gpa;
		if (writable)
			c->nin++;
		else
			c->nout++;
		gpa += n;
		left -= n;
	}
	return 0;
}

/* Switch the walk to the indirect table described by d. */
static int enter_indirect(const struct vhost_vq *vq, const struct vhost_desc *d,
			  volatile struct vhost_desc **table, uint32_t *table_len)
{
	uint64_t len = d->len;
	void *p;

	if (!vq->indirect || (d->flags & VHOST_DESC_F_NEXT))
		return -EINVAL;
	if (d->len == 0 || d->len % sizeof(struct vhost_desc) ||
	    d->len / sizeof(struct vhost_desc) > VHOST_MAX_INDIRECT)
		return -EINVAL;
	p = vhost_mem_gpa(vq->mem, d->addr, &len);
	if (!p || len != d->len)
		return -EFAULT; /* unmapped, or split across regions */
	*table = p;
	*table_len = d->len / sizeof(struct vhost_desc);
	return 0;
}

int vhost_vq_map_chain(const struct vhost_vq *vq, uint16_t head, struct vhost_chain *c)
{
	volatile struct vhost_desc *table = vq->desc;
	uint32_t table_len = vq->num;
	uint32_t budget = vq->num; /* descriptors left before we call it a loop */
	uint32_t idx = head;
	bool indirect = false;
	int r;

	if (vq->packed)
		return vhost_packed_map_chain(vq, head, c);
	c->head = head;
	c->nout = 0;
	c->nin = 0;
	for (;;) {
		struct vhost_desc d;

		if (idx >= table_len)
			return -EINVAL;
		if (budget-- == 0)
			return -ELOOP;
		/* One copy: the guest may change the descriptor under us. Byte
		 * by byte as far as C knows: an indirect table may sit at any
		 * address the guest likes, aligned or not. */
		memcpy(&d, (const void *)(uintptr_t)&table[idx], sizeof(d));
		if (d.flags & VHOST_DESC_F_INDIRECT) {
			if (indirect)
				return -EINVAL; /* no nested tables */
			r = enter_indirect(vq, &d, &table, &table_len);
			if (r)
				return r;
			indirect = true;
			budget = table_len;
			idx = 0;
			continue;
		}
		r = vhost_vq_chain_add(vq, c, d.addr, d.len, d.flags & VHOST_DESC_F_WRITE);
		if (r)
			return r;
		if (!(d.flags & VHOST_DESC_F_NEXT))
			return 0;
		idx = d.next;
	}
}

void vhost_vq_log_chain(const struct vhost_vq *vq, const struct vhost_chain *c)
{
	if (!vq->log)
		return;
	for (unsigned i = c->nout; i < (unsigned)c->nout + c->nin; i++)
		vhost_log_write(vq->log, c->gpa[i], c->iov[i].iov_len);
}

void vhost_vq_push(struct vhost_vq *vq, uint16_t head, uint32_t len)
{
	volatile struct vhost_used_elem *e;

	if (vq->packed) {
		vhost_packed_push(vq, head, len);
		return;
	}
	e = &vq->used->ring[vq->used_idx % vq->num];
	e->id = head;
	e->len = len;
	vq->batch[(uint16_t)(vq->used_idx - vq->published_idx)] = head;
	vq->used_idx++;
}

static void log_used(const struct vhost_vq *vq, uint16_t old, uint16_t n)
{
	const uint64_t elem = sizeof(struct vhost_used_elem);
	uint16_t first = old % vq->num;
	uint16_t room = (uint16_t)(vq->num - first);
	uint16_t run = n < room ? n : room;
	uint64_t ring = vq->used_gpa + offsetof(struct vhost_used, ring);

	vhost_log_write(vq->log, ring + first * elem, run * elem);
	if (run < n)
		vhost_log_write(vq->log, ring, (uint64_t)(n - run) * elem);
	vhost_log_write(vq->log, vq->used_gpa + offsetof(struct vhost_used, idx), sizeof(uint16_t));
}

bool vhost_vq_flush(struct vhost_vq *vq)
{
	uint16_t old = vq->published_idx;
	uint16_t new_idx = vq->used_idx;
	uint16_t n = (uint16_t)(new_idx - old);
	struct vhost_inflight_queue *inf = vq->inflight;

	if (vq->packed)
		return vhost_packed_flush(vq);
	if (n == 0)
		return false;
	if (inf) {
		/* Record the batch before it becomes visible (inflight.h). */
		for (uint16_t i = 0; i + 1 < n; i++)
			inf->desc[vq->batch[i]].next = vq->batch[i + 1];
		inf->last_batch_head = vq->batch[0];
	}
	__atomic_store_n(&vq->used->idx, new_idx, __ATOMIC_RELEASE);
	/* Orders the idx store before the flag clears below (crash safety) and
	 * before reading used_event / avail->flags (no lost interrupt). */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (vq->log && vq->log_used)
		log_used(vq, old, n);
	if (inf) {
		for (uint16_t i = 0; i < n; i++)
			__atomic_store_n(&inf->desc[vq->batch[i]].inflight, 0, __ATOMIC_RELAXED);
		__atomic_store_n(&inf->used_idx, new_idx, __ATOMIC_RELEASE);
	}
	vq->published_idx = new_idx;
	if (vq->event_idx)
		return vhost_need_event(*used_event(vq), new_idx, old);
	return !(vq->avail->flags & VHOST_AVAIL_F_NO_INTERRUPT);
}

/* Store used->flags (only the bit we own) and log it when asked. */
static void set_used_flags(struct vhost_vq *vq, uint16_t flags)
{
	if (vq->used->flags == flags)
		return; /* already so: no store, no dirty cache line */
	vq->used->flags = flags;
	if (vq->log && vq->log_used)
		vhost_log_write(vq->log, vq->used_gpa + offsetof(struct vhost_used, flags),
				sizeof(uint16_t));
}

bool vhost_vq_enable_notify(struct vhost_vq *vq)
{
	if (vq->packed)
		return vhost_packed_enable_notify(vq);
	if (vq->event_idx) {
		*avail_event(vq) = vq->last_avail_idx;
		if (vq->log && vq->log_used)
			vhost_log_write(vq->log,
					vq->used_gpa + offsetof(struct vhost_used, ring) +
					    (uint64_t)vq->num * sizeof(struct vhost_used_elem),
					sizeof(uint16_t));
	} else {
		set_used_flags(vq, 0);
	}
	/* Our store before the guest's index: either it sees that we sleep
	 * and kicks, or we see its buffer here. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE) != vq->last_avail_idx;
}

void vhost_vq_disable_notify(struct vhost_vq *vq)
{
	if (vq->packed)
		vhost_packed_disable_notify(vq);
	else if (!vq->event_idx)
		set_used_flags(vq, VHOST_USED_F_NO_NOTIFY);
}
