// SPDX-License-Identifier: MIT
/*
 * Recovery of in-flight requests from the shared in-flight region after the
 * back-end restarted (crash or reconnect). The layout and the write protocol
 * are described in inflight.h; the data-path half (marking at fetch, batch
 * retirement) lives in virtq.c.
 *
 * Threat model: the region and the guest rings are shared memory that the
 * front-end or the guest may have scribbled on. Every index read from them is
 * bounds-checked before use, every loop is bounded by the queue size, and an
 * inconsistent region makes us fall back to the front-end's ring base (which
 * re-fetches rather than loses requests) instead of trusting it.
 */
#include "vhost/inflight.h"

#include <string.h>

size_t vhost_inflight_queue_size(uint16_t queue_size)
{
	size_t n = sizeof(struct vhost_inflight_queue) +
		   (size_t)queue_size * sizeof(struct vhost_inflight_desc);

	return (n + VHOST_INFLIGHT_ALIGN - 1) & ~(size_t)(VHOST_INFLIGHT_ALIGN - 1);
}

void vhost_inflight_init(struct vhost_inflight_queue *q, uint16_t num, uint64_t features)
{
	memset(q->desc, 0, (size_t)num * sizeof(q->desc[0]));
	q->features = features;
	q->desc_num = num;
	q->last_batch_head = 0;
	q->used_idx = 0;
	/* Version last: a crash in the middle leaves version 0 = "fresh". */
	__atomic_store_n(&q->version, VHOST_INFLIGHT_VERSION, __ATOMIC_RELEASE);
}

/* Sort heads oldest fetch first. At most num (<= 32768) entries, usually a
 * handful; insertion sort keeps this allocation-free. */
static void sort_by_counter(const struct vhost_inflight_queue *q, uint16_t *h, uint16_t n)
{
	for (uint16_t i = 1; i < n; i++) {
		uint16_t cur = h[i];
		uint64_t c = q->desc[cur].counter;
		uint16_t j = i;

		while (j > 0 && q->desc[h[j - 1]].counter > c) {
			h[j] = h[j - 1];
			j--;
		}
		h[j] = cur;
	}
}

/*
 * Retire the batch that was published (used->idx advanced) but whose
 * in-flight bits may not all be cleared. The used ring between the region's
 * used_idx and the guest's used->idx holds exactly the heads of that batch.
 * Returns 0 or a reason string.
 */
static const char *retire_half_batch(struct vhost_inflight_queue *q, uint16_t num,
				     const volatile uint32_t *used_ring, uint16_t used_idx,
				     struct vhost_inflight_recovery *out)
{
	uint16_t k = (uint16_t)(used_idx - q->used_idx);

	if (k == 0)
		return NULL;
	if (k > num)
		return "used index ran more than a ring ahead of the region";
	for (uint16_t i = 0; i < k; i++) {
		uint16_t slot = (uint16_t)(q->used_idx + i) % num;
		uint32_t id = used_ring[2 * (size_t)slot];

		if (id >= num)
			return "used ring entry out of range";
		if (i == 0 && id != q->last_batch_head)
			out->batch_mismatch = true;
		q->desc[id].inflight = 0;
	}
	out->retired = k;
	__atomic_store_n(&q->used_idx, used_idx, __ATOMIC_RELEASE);
	return NULL;
}

static const char *collect(struct vhost_inflight_queue *q, uint16_t num, uint16_t *resubmit,
			   struct vhost_inflight_recovery *out)
{
	uint64_t max_counter = 0;
	uint16_t n = 0;

	for (uint32_t i = 0; i < num; i++) {
		uint8_t f = q->desc[i].inflight;

		if (f == 0)
			continue;
		if (f != 1)
			return "in-flight flag neither 0 nor 1";
		if (q->desc[i].counter == 0)
			return "in-flight descriptor without a fetch counter";
		if (q->desc[i].counter > max_counter)
			max_counter = q->desc[i].counter;
		resubmit[n++] = (uint16_t)i;
	}
	sort_by_counter(q, resubmit, n);
	out->nresubmit = n;
	out->next_counter = max_counter + 1;
	return NULL;
}

void vhost_inflight_recover(struct vhost_inflight_queue *q, uint16_t num, uint64_t features,
			    const volatile uint32_t *used_ring, uint16_t used_idx,
			    uint16_t avail_idx, uint16_t base, uint16_t *resubmit,
			    struct vhost_inflight_recovery *out)
{
	uint16_t outstanding = (uint16_t)(avail_idx - used_idx);
	const char *why;

	memset(out, 0, sizeof(*out));
	out->next_counter = 1;
	if (q->version == 0) {
		/* Never written by a back-end: nothing can be in flight. */
		vhost_inflight_init(q, num, features);
		out->outcome = VHOST_INFLIGHT_FRESH;
		out->last_avail_idx = base;
		return;
	}
	if (q->version != VHOST_INFLIGHT_VERSION)
		why = "unknown region version";
	else if (q->desc_num != num)
		why = "region queue size differs from the ring's";
	else if (outstanding > num)
		why = "guest avail index more than a ring ahead of used";
	else if ((why = retire_half_batch(q, num, used_ring, used_idx, out)) == NULL &&
		 (why = collect(q, num, resubmit, out)) == NULL && out->nresubmit > outstanding)
		why = "more requests in flight than the guest has outstanding";
	if (why) {
		vhost_inflight_init(q, num, features);
		memset(out, 0, sizeof(*out));
		out->outcome = VHOST_INFLIGHT_INVALID;
		out->last_avail_idx = base;
		out->next_counter = 1;
		out->why = why;
		return;
	}
	q->features = features;
	out->outcome = VHOST_INFLIGHT_RECOVERED;
	out->last_avail_idx = (uint16_t)(used_idx + out->nresubmit);
}
