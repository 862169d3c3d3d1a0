// SPDX-License-Identifier: MIT
/*
 * Recovery of a packed ring's in-flight buffers from the shared in-flight
 * region after the back-end restarted. The layout and the write protocol are
 * in inflight.h; the data-path half is in packed.c.
 *
 * Threat model: the region was left by a process that may have died at any
 * store, and it is shared with the front-end, which may have scribbled on
 * it; the ring slot we look at is guest memory. Every field is read once,
 * into our private copies or a local, and checked before it is used as an
 * index; every walk is bounded by the ring size, and no entry may belong to
 * two buffers. A region that fails a check is not trusted at all and is
 * left as it is (the caller marks the ring broken): a packed ring has no
 * index in guest memory to fall back on.
 *
 * Threads: the control thread, while the ring is stopped.
 */
#include "vhost/vhost.h"

#include <string.h>

#define NO_SLOT 0xffffu

size_t vhost_inflight_packed_queue_size(uint16_t queue_size)
{
	size_t n = sizeof(struct vhost_inflight_packed) +
		   (size_t)queue_size * sizeof(struct vhost_inflight_pdesc);

	return (n + VHOST_INFLIGHT_ALIGN - 1) & ~(size_t)(VHOST_INFLIGHT_ALIGN - 1);
}

void vhost_inflight_packed_init(struct vhost_inflight_packed *q, uint16_t num, uint64_t features,
				uint16_t pos, bool wrap)
{
	__atomic_store_n(&q->version, 0, __ATOMIC_RELEASE);
	memset(q->desc, 0, (size_t)num * sizeof(q->desc[0]));
	q->features = features;
	q->desc_num = num;
	q->free_head = q->old_free_head = 0;
	q->used_idx = q->old_used_idx = pos;
	q->used_wrap_counter = q->old_used_wrap_counter = wrap;
	/* Version last: a crash in the middle leaves version 0 = "fresh". */
	__atomic_store_n(&q->version, VHOST_INFLIGHT_PACKED_VERSION, __ATOMIC_RELEASE);
}

/* Where recovery stands while it reads the region. */
struct scan {
	uint16_t num;
	uint16_t pos; /* used position, once the interrupted return is decided */
	bool wrap;
	uint16_t retired_head; /* head entry of a return found complete, or NO_SLOT */
	uint32_t ndesc;	       /* descriptors of the buffers in flight */
	uint8_t taken[VHOST_MAX_QUEUE_SIZE];
};

/*
 * A return interrupted between steps a and c of inflight.h: decide from the
 * ring slot at the old used position whether its used descriptor was
 * written. Returns NULL or the reason the region is not trusted.
 */
static const char *decide_return(const struct vhost_vq *vq, struct vhost_inflight_packed *q,
				 struct scan *sc)
{
	uint16_t num = sc->num;
	uint16_t new_pos = q->used_idx, old_pos = q->old_used_idx, h = q->free_head;
	uint8_t new_wrap = q->used_wrap_counter, old_wrap = q->old_used_wrap_counter;
	uint16_t adv, flags;
	bool avail, used;

	if (new_pos >= num || old_pos >= num || new_wrap > 1 || old_wrap > 1)
		return "used position out of range";
	sc->pos = old_pos;
	sc->wrap = old_wrap;
	if (new_pos == old_pos && new_wrap == old_wrap)
		return NULL;
	if (h >= num)
		return "buffer being returned out of range";
	adv = (uint16_t)((new_pos + (new_wrap ? 0 : num)) - (old_pos + (old_wrap ? 0 : num))) &
	      (uint16_t)(2 * num - 1);
	if (adv == 0 || adv > num || adv != q->desc[h].num)
		return "interrupted return does not match its buffer";
	flags = __atomic_load_n(&vq->pk.ring[old_pos].flags, __ATOMIC_ACQUIRE);
	avail = !!(flags & VHOST_PDESC_F_AVAIL);
	used = !!(flags & VHOST_PDESC_F_USED);
	if (avail == old_wrap && used != old_wrap) {
		/* Still the descriptor we fetched: the driver saw nothing. */
		if (q->desc[h].inflight != 1)
			return "buffer being returned is not in flight";
		return NULL;
	}
	if (used != old_wrap)
		return "ring slot at the used position is neither available nor used";
	/* Written (and maybe consumed and reused): the return happened. */
	sc->pos = new_pos;
	sc->wrap = new_wrap;
	sc->retired_head = h;
	return NULL;
}

/* Copy the buffer whose head entry is h into the private slots. */
static const char *load_buffer(struct vhost_vq *vq, const struct vhost_inflight_packed *q,
			       struct scan *sc, uint16_t h, uint16_t *id_out)
{
	struct vhost_packed *pk = &vq->pk;
	uint16_t nd = q->desc[h].num, last = q->desc[h].last, s = h, prev = NO_SLOT, id = 0;
	uint64_t counter = q->desc[h].counter;

	if (nd == 0 || nd > sc->num)
		return "in-flight buffer with a bad descriptor count";
	if (counter == 0)
		return "in-flight buffer without a fetch counter";
	for (uint16_t i = 0; i < nd; i++) {
		struct vhost_inflight_pdesc e;

		if (s >= sc->num)
			return "in-flight chain link out of range";
		if (sc->taken[s])
			return "descriptor entry in two in-flight buffers";
		sc->taken[s] = 1;
		memcpy(&e, &q->desc[s], sizeof(e));
		if (!!(e.flags & VHOST_DESC_F_NEXT) != (i + 1 < nd))
			return "in-flight chain flags disagree with its length";
		pk->slot[s] = (struct vhost_packed_slot){
		    .addr = e.addr, .len = e.len, .flags = e.flags, .next = NO_SLOT};
		if (prev != NO_SLOT)
			pk->slot[prev].next = s;
		prev = s;
		id = e.id;
		s = e.next;
	}
	if (prev != last)
		return "in-flight chain does not end where its head says";
	if (id >= sc->num)
		return "in-flight buffer id out of range";
	if (pk->id_ndesc[id])
		return "two in-flight buffers with one id";
	pk->id_head[id] = h;
	pk->id_ndesc[id] = nd;
	pk->id_counter[id] = counter;
	sc->ndesc += nd;
	*id_out = id;
	return NULL;
}

/* Sort ids oldest fetch first (insertion sort: small, allocation-free). */
static void sort_by_counter(const struct vhost_packed *pk, uint16_t *ids, uint16_t n)
{
	for (uint16_t i = 1; i < n; i++) {
		uint16_t cur = ids[i];
		uint16_t j = i;

		while (j > 0 && pk->id_counter[ids[j - 1]] > pk->id_counter[cur]) {
			ids[j] = ids[j - 1];
			j--;
		}
		ids[j] = cur;
	}
}

static const char *scan_region(struct vhost_vq *vq, struct scan *sc, uint16_t *resubmit,
			       struct vhost_inflight_recovery *out)
{
	struct vhost_packed *pk = &vq->pk;
	struct vhost_inflight_packed *q = pk->inflight;
	uint64_t max_counter = 0;
	uint16_t n = 0;
	const char *why;

	if (q->version != VHOST_INFLIGHT_PACKED_VERSION)
		return "unknown region version";
	if (q->desc_num != sc->num)
		return "region queue size differs from the ring's";
	if (!(q->features & ((uint64_t)1 << VIRTIO_F_RING_PACKED)))
		return "region was set up for a split ring";
	if ((why = decide_return(vq, q, sc)) != NULL)
		return why;
	for (uint16_t h = 0; h < sc->num; h++) {
		uint8_t f = q->desc[h].inflight;
		uint16_t id;

		if (f > 1)
			return "in-flight flag neither 0 nor 1";
		if (f == 0 || h == sc->retired_head)
			continue;
		if ((why = load_buffer(vq, q, sc, h, &id)) != NULL)
			return why;
		if (pk->id_counter[id] > max_counter)
			max_counter = pk->id_counter[id];
		resubmit[n++] = id;
	}
	if (sc->ndesc > sc->num)
		return "more descriptors in flight than the ring holds";
	sort_by_counter(pk, resubmit, n);
	out->nresubmit = n;
	out->next_counter = max_counter + 1;
	out->retired = sc->retired_head != NO_SLOT;
	return NULL;
}

/* The region, repaired: the interrupted return finished or undone. */
static void repair(struct vhost_inflight_packed *q, const struct scan *sc, uint64_t features)
{
	if (sc->retired_head != NO_SLOT)
		q->desc[sc->retired_head].inflight = 0;
	q->features = features;
	q->free_head = q->old_free_head;
	q->used_idx = q->old_used_idx = sc->pos;
	q->used_wrap_counter = q->old_used_wrap_counter = sc->wrap;
}

void vhost_packed_recover(struct vhost_vq *vq, uint64_t features, uint16_t base, uint16_t *resubmit,
			  struct vhost_inflight_recovery *out)
{
	struct vhost_packed *pk = &vq->pk;
	struct scan sc = {.num = vq->num, .retired_head = NO_SLOT};
	uint32_t avail;
	const char *why;

	memset(out, 0, sizeof(*out));
	out->next_counter = 1;
	if (pk->inflight->version == 0) {
		/* Never written by a back-end: nothing can be in flight. */
		vhost_packed_reset(vq, base, features);
		out->outcome = VHOST_INFLIGHT_FRESH;
		out->last_avail_idx = base;
		return;
	}
	/* Empty private state without touching the region, then load it. */
	{
		struct vhost_inflight_packed *keep = pk->inflight;

		pk->inflight = NULL;
		vhost_packed_reset(vq, base, features);
		pk->inflight = keep;
	}
	why = scan_region(vq, &sc, resubmit, out);
	if (why) {
		struct vhost_inflight_packed *keep = pk->inflight;

		pk->inflight = NULL;
		vhost_packed_reset(vq, base, features);
		pk->inflight = keep;
		memset(out, 0, sizeof(*out));
		out->outcome = VHOST_INFLIGHT_INVALID;
		out->last_avail_idx = base;
		out->next_counter = 1;
		out->why = why;
		return;
	}
	repair(pk->inflight, &sc, features);
	/* Every slot no buffer holds is free. */
	pk->nfree = 0;
	for (uint16_t s = vq->num; s-- > 0;)
		if (!sc.taken[s])
			pk->free_slots[pk->nfree++] = s;
	pk->used_pos = sc.pos;
	pk->used_wrap = sc.wrap;
	avail = (uint32_t)sc.pos + sc.ndesc;
	pk->avail_wrap = sc.wrap;
	if (avail >= vq->num) {
		avail -= vq->num;
		pk->avail_wrap = !sc.wrap;
	}
	pk->avail_pos = (uint16_t)avail;
	out->outcome = VHOST_INFLIGHT_RECOVERED;
	out->last_avail_idx = vhost_packed_base(vq);
}
