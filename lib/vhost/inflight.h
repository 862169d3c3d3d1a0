/* SPDX-License-Identifier: MIT */
/*
 * In-flight request tracking for split virtqueues, in the shared region that
 * the front-end keeps for us across a back-end crash (GET/SET_INFLIGHT_FD).
 *
 * Layout (per queue, the split-ring layout of the vhost-user spec):
 *
 *   offset  size  field
 *   0       8     features          virtio features when the region was set up
 *   8       2     version           1 (0 = never initialised)
 *   10      2     desc_num          queue size; must equal the ring's size
 *   12      2     last_batch_head   first head of the last completed batch
 *   14      2     used_idx          used->idx after the last batch was retired
 *   16      16*n  desc[n]           per descriptor head:
 *                                     +0 u8 inflight (1 = fetched, not completed)
 *                                     +1 u8[5] padding
 *                                     +6 u16 next (link of the last batch)
 *                                     +8 u64 counter (fetch order, from 1)
 *
 * Queues follow each other at a stride of vhost_inflight_queue_size(n), which
 * rounds the above up to 64 bytes.
 *
 * Protocol between the data path (virtq.c) and recovery (this file):
 * 1. fetch: desc[h].counter = ++counter, then desc[h].inflight = 1, strictly
 *    in avail-ring order, before the request is submitted;
 * 2. retire a batch: used elements written, batch linked through .next and
 *    last_batch_head set, used->idx published, every desc[h].inflight of the
 *    batch cleared, then used_idx = used->idx.
 * After a crash, used->idx != used_idx means step 2 stopped between the
 * publish and the end: the batch is the used-ring entries between the two
 * indexes (written by us before the publish) and is retired again. Every
 * head still marked is then in flight, and last_avail_idx = used->idx +
 * their number. We read the batch from the used ring rather than trusting
 * last_batch_head, and we check the header, so a stale, uninitialised or
 * scribbled region falls back to the front-end's ring base instead of
 * losing or inventing requests.
 *
 * Threat model: the region is shared with the front-end and the guest rings
 * with the guest; every field read here is untrusted and only ever used
 * after a bounds check.
 */
#ifndef VMIG_VHOST_INFLIGHT_H
#define VMIG_VHOST_INFLIGHT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VHOST_INFLIGHT_VERSION 1
#define VHOST_INFLIGHT_ALIGN 64u

struct vhost_inflight_desc {
	uint8_t inflight;
	uint8_t padding[5];
	uint16_t next;
	uint64_t counter;
};

struct vhost_inflight_queue {
	uint64_t features;
	uint16_t version;
	uint16_t desc_num;
	uint16_t last_batch_head;
	uint16_t used_idx;
	struct vhost_inflight_desc desc[];
};

_Static_assert(sizeof(struct vhost_inflight_desc) == 16, "inflight desc is 16 bytes");
_Static_assert(sizeof(struct vhost_inflight_queue) == 16, "inflight header is 16 bytes");

/* Bytes one queue of queue_size descriptors takes in the region. */
size_t vhost_inflight_queue_size(uint16_t queue_size);

/* Initialise a queue's region: no request in flight. */
void vhost_inflight_init(struct vhost_inflight_queue *q, uint16_t num, uint64_t features);

enum vhost_inflight_outcome {
	VHOST_INFLIGHT_FRESH = 1, /* version 0: initialised, ring base used as is */
	VHOST_INFLIGHT_RECOVERED, /* region valid: resubmit list and last_avail computed */
	VHOST_INFLIGHT_INVALID,	  /* inconsistent: reinitialised, ring base used as is */
};

struct vhost_inflight_recovery {
	enum vhost_inflight_outcome outcome;
	uint16_t last_avail_idx; /* where fetching continues */
	uint16_t nresubmit;	 /* heads in resubmit[], oldest first */
	uint16_t retired;	 /* half-finished last batch entries retired again */
	bool batch_mismatch;	 /* last_batch_head disagreed with the used ring */
	uint64_t next_counter;	 /* first counter value for new fetches */
	const char *why;	 /* for INVALID: which check failed */
};

/*
 * Recover one queue after (re)connection. `used_ring` is the guest's used
 * ring (id/len pairs, num entries), `used_idx` and `avail_idx` the guest's
 * current indexes (read once by the caller), `base` the ring base the
 * front-end sent. resubmit must have room for num heads. The region is
 * repaired in place (half batch retired, header initialised). Never fails:
 * the outcome says what was trusted.
 */
void vhost_inflight_recover(struct vhost_inflight_queue *q, uint16_t num, uint64_t features,
			    const volatile uint32_t *used_ring, uint16_t used_idx,
			    uint16_t avail_idx, uint16_t base, uint16_t *resubmit,
			    struct vhost_inflight_recovery *out);

/*
 * Packed rings (VIRTIO_F_RING_PACKED): the packed layout of the vhost-user
 * spec, per queue:
 *
 *   offset  size  field
 *   0       8     features               virtio features when set up
 *   8       2     version                1 (0 = never initialised)
 *   10      2     desc_num               queue size; must equal the ring's
 *   12      2     free_head              head entry of the buffer being returned
 *   14      2     old_free_head          the same, once its return is complete
 *   16      2     used_idx               next used position, return included
 *   18      2     old_used_idx           next used position, return not included
 *   20      1     used_wrap_counter      wrap counter that goes with used_idx
 *   21      1     old_used_wrap_counter  wrap counter that goes with old_used_idx
 *   22      10    padding
 *   32      32*n  desc[n]                one entry per ring descriptor we hold:
 *                   +0 u8 inflight   (head entry: 1 = fetched, not returned)
 *                   +1 u8 padding
 *                   +2 u16 next      next entry of the same buffer
 *                   +4 u16 last      (head entry) last entry of the buffer
 *                   +6 u16 num       (head entry) ring descriptors of the buffer
 *                   +8 u64 counter   (head entry) fetch order, from 1
 *                   +16 u16 id       buffer id (meaningful in the last entry)
 *                   +18 u16 flags    the descriptor's flags
 *                   +20 u32 len
 *                   +24 u64 addr
 *
 * Why the descriptors themselves are copied: in a packed ring the driver
 * reuses a ring slot as soon as the device has read it, so after a crash the
 * ring no longer holds the requests that were in flight; the region does.
 *
 * Protocol (virtq.c writes, vhost_packed_recover() reads):
 * 1. fetch a buffer of k ring descriptors into free entries e0..ek-1: each
 *    entry's copy and next link, then in e0 num = k, last = ek-1,
 *    counter = ++counter, and last of all e0.inflight = 1;
 * 2. return a buffer (head entry h) at used position p, wrap w, which moves
 *    the used position to p', w' (p advanced by its k descriptors):
 *    a. free_head = h, used_idx = p', used_wrap_counter = w';
 *    b. the used descriptor is written into the ring at p, its flags last;
 *    c. desc[h].inflight = 0, then old_free_head = h, old_used_wrap_counter
 *       = w' and old_used_idx = p'.
 * After a crash, (used_idx, used_wrap_counter) != (old_used_idx,
 * old_used_wrap_counter) means a return stopped between a and c. Whether b
 * happened is read from the ring slot at old_used_idx: it still holds the
 * available descriptor we fetched in lap w (AVAIL == w, USED != w) unless
 * the used descriptor was written there (AVAIL == USED == w), or that was
 * written and the driver has already reused the slot for lap !w (AVAIL !=
 * w, USED == w); the driver cannot reuse it earlier, since the slot at the
 * used position is the last one it gets back. Not written: the return is
 * undone (the old position stands, the buffer is redone). Written: it is
 * completed. Every entry still marked is then in flight; the avail position
 * is the used position plus their descriptors. The private copies of the
 * data path are rebuilt from the region, never the other way round.
 * free_head and old_free_head only name the buffer of step 2; the list of
 * free entries is rebuilt, not read.
 *
 * A region that fails any check is not trusted. Unlike a split ring, the
 * front-end's base (the position at the ring's previous start, after a
 * crash) cannot stand in for it: the ring is then reported broken.
 */

#define VHOST_INFLIGHT_PACKED_VERSION 1

struct vhost_inflight_pdesc {
	uint8_t inflight;
	uint8_t padding;
	uint16_t next;
	uint16_t last;
	uint16_t num;
	uint64_t counter;
	uint16_t id;
	uint16_t flags;
	uint32_t len;
	uint64_t addr;
};

struct vhost_inflight_packed {
	uint64_t features;
	uint16_t version;
	uint16_t desc_num;
	uint16_t free_head;
	uint16_t old_free_head;
	uint16_t used_idx;
	uint16_t old_used_idx;
	uint8_t used_wrap_counter;
	uint8_t old_used_wrap_counter;
	uint8_t padding[10];
	struct vhost_inflight_pdesc desc[];
};

_Static_assert(sizeof(struct vhost_inflight_pdesc) == 32, "packed inflight desc is 32 bytes");
_Static_assert(sizeof(struct vhost_inflight_packed) == 32, "packed inflight header is 32 bytes");
_Static_assert(offsetof(struct vhost_inflight_pdesc, addr) == 24, "spec layout");

/* Bytes one packed queue of queue_size descriptors takes in the region. */
size_t vhost_inflight_packed_queue_size(uint16_t queue_size);

/* Initialise a packed queue's region: nothing in flight, both used
 * positions at pos with wrap counter wrap. */
void vhost_inflight_packed_init(struct vhost_inflight_packed *q, uint16_t num, uint64_t features,
				uint16_t pos, bool wrap);

#endif
