// SPDX-License-Identifier: MIT
/*
 * Packed virtqueue data path (VIRTIO_F_RING_PACKED, virtio 1.1 2.7): fetching
 * available buffers from the descriptor ring with its wrap counters, keeping
 * our own copy of what we fetched, resolving it to host iovecs (chains and
 * indirect tables), writing used descriptors back into the same ring, event
 * suppression on both sides (with RING_EVENT_FLAGS_DESC under EVENT_IDX),
 * the in-flight region's write protocol (inflight.h) and dirty logging. The
 * recovery half of the in-flight protocol is in inflight_packed.c.
 *
 * Threat model: the ring, the event areas and indirect tables are guest
 * memory and every field is hostile. A ring descriptor is copied once, after
 * an acquire load of its flags; the copy is all we use afterwards, which
 * also matters because the driver may reuse a ring slot as soon as we have
 * read it. A buffer longer than the ring, more descriptors in flight than the
 * ring holds, a buffer id out of range or one we still hold, or a chained
 * descriptor that is not available break the ring (vq->broken, with
 * vq->broken_why); a malformed chain (bad indirect table, readable after
 * writable, outside the memory table) is a -errno from map_chain, and the
 * request is returned with length 0 as on a split ring.
 *
 * Memory ordering: a descriptor's flags are read with acquire before the
 * rest of it; a used descriptor's id and len are written before the release
 * store of its flags; the in-flight region's "new" state is stored before
 * that release and its "old" state after another; a full fence separates the
 * last used descriptor from reading the driver's event area, and our event
 * area store from re-reading the ring before sleeping.
 *
 * Threads: all functions here run on the queue's own thread, but for alloc,
 * free and reset, which the control thread calls while the ring is stopped.
 */
#include "vhost/vhost.h"

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define NO_SLOT 0xffffu

int vhost_packed_alloc(struct vhost_packed *pk, uint16_t num)
{
	size_t n = num;
	size_t bytes = n * (sizeof(struct vhost_packed_slot) + sizeof(uint64_t) + sizeof(uint32_t) +
			    3 * sizeof(uint16_t));
	uint8_t *p;

	if (pk->alloc && pk->alloc_num >= num)
		return 0;
	p = calloc(1, bytes);
	if (!p)
		return -ENOMEM;
	free(pk->alloc);
	pk->alloc = p;
	pk->alloc_num = num;
	/* Largest alignment first. */
	pk->slot = (struct vhost_packed_slot *)p;
	p += n * sizeof(struct vhost_packed_slot);
	pk->id_counter = (uint64_t *)p;
	p += n * sizeof(uint64_t);
	pk->staged_len = (uint32_t *)p;
	p += n * sizeof(uint32_t);
	pk->free_slots = (uint16_t *)p;
	p += n * sizeof(uint16_t);
	pk->id_head = (uint16_t *)p;
	p += n * sizeof(uint16_t);
	pk->id_ndesc = (uint16_t *)p;
	return 0;
}

void vhost_packed_free(struct vhost_packed *pk)
{
	free(pk->alloc);
	pk->alloc = NULL;
	pk->alloc_num = 0;
}

void vhost_packed_reset(struct vhost_vq *vq, uint16_t base, uint64_t features)
{
	struct vhost_packed *pk = &vq->pk;

	assert(vhost_packed_base_ok(vq->num, base) && pk->alloc_num >= vq->num);
	/* seq_of() counts modulo 2 * num inside a uint16_t: powers of two only
	 * (SET_VRING_NUM refuses the rest). */
	assert(vq->num && !(vq->num & (vq->num - 1)));
	pk->avail_pos = pk->used_pos = base & 0x7fff;
	pk->avail_wrap = pk->used_wrap = base >> 15;
	memset(pk->id_ndesc, 0, vq->num * sizeof(uint16_t));
	/* Slot 0 on top of the stack: a fresh ring fills slots in order. */
	for (uint16_t i = 0; i < vq->num; i++)
		pk->free_slots[i] = (uint16_t)(vq->num - 1 - i);
	pk->nfree = vq->num;
	if (pk->inflight)
		vhost_inflight_packed_init(pk->inflight, vq->num, features, pk->used_pos,
					   pk->used_wrap);
}

static int packed_fail(struct vhost_vq *vq, const char *why)
{
	vq->broken = true;
	vq->broken_why = why;
	return -EIO;
}

/* Copy one fetched descriptor into slot s and, with a region, its entry. */
static void keep_slot(struct vhost_packed *pk, uint16_t s, const struct vhost_pdesc *d,
		      uint16_t flags)
{
	pk->slot[s] = (struct vhost_packed_slot){
	    .addr = d->addr, .len = d->len, .flags = flags, .next = NO_SLOT};
	if (pk->inflight) {
		struct vhost_inflight_pdesc *e = &pk->inflight->desc[s];

		e->addr = d->addr;
		e->len = d->len;
		e->flags = flags;
		e->id = d->id;
		e->next = NO_SLOT;
	}
}

static void link_slot(struct vhost_packed *pk, uint16_t prev, uint16_t s)
{
	pk->slot[prev].next = s;
	if (pk->inflight)
		pk->inflight->desc[prev].next = s;
}

int vhost_packed_pop(struct vhost_vq *vq, uint16_t *id)
{
	struct vhost_packed *pk = &vq->pk;
	uint16_t pos = pk->avail_pos, first = NO_SLOT, prev = NO_SLOT, n = 0, buf_id = 0;
	bool wrap = pk->avail_wrap;

	if (vq->broken)
		return -EIO;
	if (!vhost_pdesc_avail(__atomic_load_n(&pk->ring[pos].flags, __ATOMIC_RELAXED), wrap))
		return 0;
	for (;;) {
		uint16_t flags = __atomic_load_n(&pk->ring[pos].flags, __ATOMIC_ACQUIRE);
		struct vhost_pdesc d;
		uint16_t s;

		if (n == vq->num)
			return packed_fail(vq, "descriptor chain longer than the ring");
		if (!vhost_pdesc_avail(flags, wrap))
			return packed_fail(vq, "chained descriptor not made available");
		/* One copy; its flags are the value loaded above. */
		memcpy(&d, (const void *)(uintptr_t)&pk->ring[pos], sizeof(d));
		if (pk->nfree == 0)
			return packed_fail(vq, "more descriptors in flight than the ring holds");
		s = pk->free_slots[--pk->nfree];
		keep_slot(pk, s, &d, flags);
		if (prev == NO_SLOT)
			first = s;
		else
			link_slot(pk, prev, s);
		prev = s;
		n++;
		buf_id = d.id; /* the last descriptor's id names the buffer */
		if (++pos == vq->num) {
			pos = 0;
			wrap = !wrap;
		}
		if (!(flags & VHOST_DESC_F_NEXT))
			break;
	}
	if (buf_id >= vq->num)
		return packed_fail(vq, "buffer id out of range");
	if (pk->id_ndesc[buf_id])
		return packed_fail(vq, "buffer id posted again while still in flight");
	pk->id_head[buf_id] = first;
	pk->id_ndesc[buf_id] = n;
	pk->id_counter[buf_id] = ++vq->counter;
	if (pk->inflight) {
		struct vhost_inflight_pdesc *e = &pk->inflight->desc[first];

		e->num = n;
		e->last = prev;
		e->counter = vq->counter;
		/* Last: a marked entry always has its chain and order. */
		__atomic_store_n(&e->inflight, 1, __ATOMIC_RELEASE);
	}
	pk->avail_pos = pos;
	pk->avail_wrap = wrap;
	vq->last_avail_idx++; /* counts buffers on a packed ring */
	*id = buf_id;
	return 1;
}

/* A packed indirect table: its descriptors are used in order, all of them;
 * only their WRITE flag means anything (virtio 1.1, 2.7.5.3). */
static int map_indirect(const struct vhost_vq *vq, const struct vhost_packed_slot *d,
			struct vhost_chain *c)
{
	uint64_t len = d->len;
	const volatile struct vhost_pdesc *table;
	uint32_t n;

	if (!vq->indirect || (d->flags & VHOST_DESC_F_NEXT))
		return -EINVAL;
	if (d->len == 0 || d->len % sizeof(struct vhost_pdesc) ||
	    d->len / sizeof(struct vhost_pdesc) > VHOST_MAX_INDIRECT)
		return -EINVAL;
	table = vhost_mem_gpa(vq->mem, d->addr, &len);
	if (!table || len != d->len)
		return -EFAULT;
	n = d->len / sizeof(struct vhost_pdesc);
	for (uint32_t i = 0; i < n; i++) {
		struct vhost_pdesc e;
		int r;

		memcpy(&e, (const void *)(uintptr_t)&table[i], sizeof(e));
		r = vhost_vq_chain_add(vq, c, e.addr, e.len, e.flags & VHOST_DESC_F_WRITE);
		if (r)
			return r;
	}
	return 0;
}

int vhost_packed_map_chain(const struct vhost_vq *vq, uint16_t id, struct vhost_chain *c)
{
	const struct vhost_packed *pk = &vq->pk;
	uint16_t s, n;

	c->head = id;
	c->nout = 0;
	c->nin = 0;
	if (id >= vq->num || pk->id_ndesc[id] == 0)
		return -EINVAL;
	s = pk->id_head[id];
	n = pk->id_ndesc[id];
	for (uint16_t i = 0; i < n; i++) {
		const struct vhost_packed_slot *d;
		int r;

		assert(s < vq->num);
		d = &pk->slot[s];
		if (d->flags & VHOST_DESC_F_INDIRECT) {
			if (n != 1)
				return -EINVAL; /* an indirect descriptor stands alone */
			return map_indirect(vq, d, c);
		}
		r = vhost_vq_chain_add(vq, c, d->addr, d->len, d->flags & VHOST_DESC_F_WRITE);
		if (r)
			return r;
		s = d->next;
	}
	return 0;
}

void vhost_packed_push(struct vhost_vq *vq, uint16_t id, uint32_t len)
{
	uint16_t k = (uint16_t)(vq->used_idx - vq->published_idx);

	assert(k < vq->num);
	vq->batch[k] = id;
	vq->pk.staged_len[k] = len;
	vq->used_idx++;
}

/* A position with its wrap counter as one number modulo 2 * num, so that
 * a window of positions is a plain subtraction. */
static uint16_t seq_of(const struct vhost_vq *vq, uint16_t pos, bool wrap)
{
	return (uint16_t)(pos + (wrap ? 0 : vq->num));
}

/* Return one buffer: the used descriptor, with the region's protocol
 * (inflight.h, step 2) around it. */
static void return_one(struct vhost_vq *vq, uint16_t id, uint32_t len)
{
	struct vhost_packed *pk = &vq->pk;
	struct vhost_inflight_packed *inf = pk->inflight;
	volatile struct vhost_pdesc *u = &pk->ring[pk->used_pos];
	uint16_t h = pk->id_head[id], nd = pk->id_ndesc[id];
	uint16_t p = pk->used_pos, np = (uint16_t)(p + nd);
	bool w = pk->used_wrap, nw = w;
	uint16_t flags = w ? (VHOST_PDESC_F_AVAIL | VHOST_PDESC_F_USED) : 0;

	/* The device only returns what it fetched: an invariant, not input. */
	assert(id < vq->num && nd > 0 && nd <= vq->num);
	if (np >= vq->num) {
		np = (uint16_t)(np - vq->num);
		nw = !w;
	}
	if (inf) {
		inf->free_head = h;
		inf->used_wrap_counter = nw;
		inf->used_idx = np;
	}
	u->id = id;
	u->len = len;
	if (len)
		flags |= VHOST_DESC_F_WRITE; /* len is meaningful */
	__atomic_store_n(&u->flags, flags, __ATOMIC_RELEASE);
	if (vq->log && vq->log_used)
		vhost_log_write(vq->log, pk->ring_gpa + (uint64_t)p * sizeof(struct vhost_pdesc),
				sizeof(struct vhost_pdesc));
	if (inf) {
		__atomic_store_n(&inf->desc[h].inflight, 0, __ATOMIC_RELEASE);
		inf->old_free_head = h;
		inf->old_used_wrap_counter = nw;
		__atomic_store_n(&inf->old_used_idx, np, __ATOMIC_RELEASE);
	}
	for (uint16_t i = 0, s = h; i < nd; i++) {
		assert(s < vq->num && pk->nfree < vq->num);
		pk->free_slots[pk->nfree++] = s;
		s = pk->slot[s].next;
	}
	pk->id_ndesc[id] = 0;
	pk->used_pos = np;
	pk->used_wrap = nw;
}

/* Did the driver ask for an interrupt now that the used position moved
 * from old to new_seq (both seq_of values)? */
static bool driver_wants_interrupt(const struct vhost_vq *vq, uint16_t old, uint16_t new_seq)
{
	const volatile struct vhost_pevent *ev = vq->pk.driver_event;
	uint16_t flags = __atomic_load_n(&ev->flags, __ATOMIC_RELAXED);
	uint16_t mask = (uint16_t)(2 * vq->num - 1);
	uint16_t off_wrap, pos, event;

	if (flags == VHOST_PEVENT_DISABLE)
		return false;
	if (flags != VHOST_PEVENT_DESC || !vq->event_idx)
		return true; /* ENABLE, or a value we do not know: signal */
	off_wrap = __atomic_load_n(&ev->off_wrap, __ATOMIC_RELAXED);
	pos = off_wrap & 0x7fff;
	if (pos >= vq->num)
		return true;
	event = seq_of(vq, pos, off_wrap >> 15);
	/* Asked for iff the event position lies in [old, new). */
	return ((uint16_t)(event - old) & mask) < ((uint16_t)(new_seq - old) & mask);
}

bool vhost_packed_flush(struct vhost_vq *vq)
{
	uint16_t n = (uint16_t)(vq->used_idx - vq->published_idx);
	uint16_t old = seq_of(vq, vq->pk.used_pos, vq->pk.used_wrap);

	if (n == 0)
		return false;
	for (uint16_t k = 0; k < n; k++)
		return_one(vq, vq->batch[k], vq->pk.staged_len[k]);
	vq->published_idx = vq->used_idx;
	/* Our used descriptors before the driver's event area (no lost
	 * interrupt: it re-arms, then checks the ring). */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return driver_wants_interrupt(vq, old, seq_of(vq, vq->pk.used_pos, vq->pk.used_wrap));
}

static void set_device_event(struct vhost_vq *vq, uint16_t flags, uint16_t off_wrap)
{
	volatile struct vhost_pevent *ev = vq->pk.device_event;

	if (ev->flags == flags && (flags != VHOST_PEVENT_DESC || ev->off_wrap == off_wrap))
		return; /* already so: no store, no dirty cache line */
	if (flags == VHOST_PEVENT_DESC)
		ev->off_wrap = off_wrap;
	__atomic_store_n(&ev->flags, flags, __ATOMIC_RELEASE);
	if (vq->log && vq->log_used)
		vhost_log_write(vq->log, vq->pk.device_event_gpa, sizeof(struct vhost_pevent));
}

bool vhost_packed_enable_notify(struct vhost_vq *vq)
{
	if (vq->event_idx)
		set_device_event(vq, VHOST_PEVENT_DESC, vhost_packed_base(vq));
	else
		set_device_event(vq, VHOST_PEVENT_ENABLE, 0);
	/* Our store before the ring: either the driver sees that we sleep and
	 * kicks, or we see its buffer here. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return vhost_pdesc_avail(
	    __atomic_load_n(&vq->pk.ring[vq->pk.avail_pos].flags, __ATOMIC_ACQUIRE),
	    vq->pk.avail_wrap);
}

void vhost_packed_disable_notify(struct vhost_vq *vq)
{
	/* A packed ring can say "no kicks" outright, EVENT_IDX or not. */
	set_device_event(vq, VHOST_PEVENT_DISABLE, 0);
}
