// SPDX-License-Identifier: MIT
/*
 * vhost-user device state machine: the table of messages we accept, their
 * validation, their handlers, and the rule that decides when a ring runs.
 *
 * Threat model: the front-end is untrusted. Before a handler runs, the table
 * checks the id, the version bits, the payload size bounds, the fd count
 * bounds, the protocol feature the message depends on and, for ring
 * messages, the ring index. Handlers then check the values (sizes, offsets,
 * powers of two) and take ownership of an fd only when they keep it; the
 * dispatcher closes every other fd.
 *
 * Message order: a ring starts as soon as it has everything it needs (size,
 * addresses, kick fd, memory table, features, enabled), whichever message
 * completes the set; addresses are translated only then, so SET_VRING_ADDR
 * may come before SET_MEM_TABLE. Any message that changes what a running
 * ring uses stops that ring (or all rings) first; the device's queue_stop
 * finishes the ring's in-flight requests, so the new state never races the
 * data path. SET_VRING_ENABLE defaults to enabled: QEMU's vhost-user-blk
 * before 7.2 never sent it, and starting on the kick is what it expects.
 *
 * Threads: the control thread only.
 */
#include "vhost/vhost.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef int (*vhost_handler)(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply);

/* Table flags. */
#define F_REPLY 0x1	 /* always answered with a reply of its own */
#define F_RING_STATE 0x2 /* payload starts with a u32 ring index */
#define F_RING_FILE 0x4	 /* payload is a u64: bits 0-7 ring index */

struct msg_spec {
	const char *name;
	vhost_handler fn;
	uint32_t min_size;
	uint32_t max_size;
	uint8_t min_fds;
	uint8_t max_fds;
	uint8_t flags;
	int8_t protocol_bit; /* needed protocol feature, or -1 */
};

static void dev_err(struct vhost_dev *d, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void dev_err(struct vhost_dev *d, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(d->err, sizeof(d->err), fmt, ap);
	va_end(ap);
}

static bool has_bit(uint64_t v, unsigned bit)
{
	return (v >> bit) & 1;
}

static void reply_u64(struct vhost_msg *reply, uint64_t v)
{
	reply->p.u64 = v;
	reply->hdr.size = sizeof(uint64_t);
}

static struct vhost_vring *msg_ring(struct vhost_dev *d, const struct vhost_msg *m)
{
	return &d->vring[m->p.u64 & VHOST_USER_VRING_IDX_MASK];
}

static struct vhost_vring *state_ring(struct vhost_dev *d, const struct vhost_msg *m)
{
	return &d->vring[m->p.state.index];
}

static int take_fd(struct vhost_msg *m, unsigned i)
{
	int fd = m->fds[i];

	m->fds[i] = -1;
	return fd;
}

static void replace_fd(int *slot, int fd)
{
	if (*slot >= 0)
		close(*slot);
	*slot = fd;
}

/* ---- ring start / stop ---- */

static void vring_stop(struct vhost_dev *d, struct vhost_vring *vr)
{
	/* Whatever made it stop may have fixed what kept it from starting. */
	vr->start_failed = false;
	if (!vr->started)
		return;
	d->ops->queue_stop(d->opaque, vr);
	vr->started = false;
	/* We now hold the exact position; nothing is in flight, unless the
	 * back-end left requests in the in-flight region to redo. */
	vr->base = vr->vq.packed ? vhost_packed_base(&vr->vq) : vr->vq.last_avail_idx;
	vr->need_recover = vr->left_inflight;
	vr->left_inflight = false;
}

void vhost_dev_stop_all(struct vhost_dev *d)
{
	for (unsigned i = 0; i < d->nqueues; i++)
		vring_stop(d, &d->vring[i]);
}

static bool vring_ready(const struct vhost_dev *d, const struct vhost_vring *vr)
{
	return !vr->started && !vr->start_failed && vr->num && vr->addr_set && vr->kick_fd >= 0 &&
	       vr->enabled && d->features_set && d->mem.nregions && !d->pc.mem_ack_pending;
}

/* Packed ring: the descriptor ring and the driver and device event areas
 * come in the three addresses of SET_VRING_ADDR. */
static int vring_map_packed(struct vhost_dev *d, struct vhost_vring *vr)
{
	struct vhost_packed *pk = &vr->vq.pk;
	void *ring = vhost_mem_uva(&d->mem, vr->addr.desc_user_addr, 16ull * vr->num);
	void *driver = vhost_mem_uva(&d->mem, vr->addr.avail_user_addr, 4);
	void *device = vhost_mem_uva(&d->mem, vr->addr.used_user_addr, 4);
	uint64_t ring_gpa;

	if (!ring || !driver || !device ||
	    vhost_mem_uva_to_gpa(&d->mem, vr->addr.desc_user_addr, &ring_gpa)) {
		dev_err(d, "ring %u: packed ring addresses outside the memory table", vr->idx);
		return -EFAULT;
	}
	if (((uintptr_t)ring & 15) || ((uintptr_t)driver & 3) || ((uintptr_t)device & 3)) {
		dev_err(d, "ring %u: misaligned packed ring addresses", vr->idx);
		return -EINVAL;
	}
	pk->ring = ring;
	pk->driver_event = driver;
	pk->device_event = device;
	pk->ring_gpa = ring_gpa;
	pk->device_event_gpa = vr->addr.log_guest_addr;
	return 0;
}

/* Split ring: descriptor table, avail ring, used ring. */
static int vring_map_split(struct vhost_dev *d, struct vhost_vring *vr)
{
	struct vhost_vq *vq = &vr->vq;
	uint64_t num = vr->num;
	void *desc = vhost_mem_uva(&d->mem, vr->addr.desc_user_addr, 16 * num);
	void *avail = vhost_mem_uva(&d->mem, vr->addr.avail_user_addr, 6 + 2 * num);
	void *used = vhost_mem_uva(&d->mem, vr->addr.used_user_addr, 6 + 8 * num);

	if (!desc || !avail || !used) {
		dev_err(d, "ring %u: addresses outside the memory table", vr->idx);
		return -EFAULT;
	}
	if (((uintptr_t)desc & 15) || ((uintptr_t)avail & 1) || ((uintptr_t)used & 3)) {
		dev_err(d, "ring %u: misaligned ring addresses", vr->idx);
		return -EINVAL;
	}
	vq->desc = desc;
	vq->avail = avail;
	vq->used = used;
	return 0;
}

/* Point vq at the guest's rings; -EFAULT if they are not all mapped. */
static int vring_map(struct vhost_dev *d, struct vhost_vring *vr)
{
	struct vhost_vq *vq = &vr->vq;
	int r;

	vq->packed = has_bit(d->features, VIRTIO_F_RING_PACKED);
	vq->desc = NULL;
	vq->avail = NULL;
	vq->used = NULL;
	r = vq->packed ? vring_map_packed(d, vr) : vring_map_split(d, vr);
	if (r)
		return r;
	vq->num = vr->num;
	vq->mem = &d->mem;
	vq->event_idx = has_bit(d->features, VIRTIO_RING_F_EVENT_IDX);
	vq->indirect = has_bit(d->features, VIRTIO_RING_F_INDIRECT_DESC);
	vq->log = has_bit(d->features, VHOST_F_LOG_ALL) && d->log.bits ? &d->log : NULL;
	vq->log_used = has_bit(vr->addr.flags, VHOST_VRING_F_LOG);
	vq->used_gpa = vr->addr.log_guest_addr;
	vq->batch = vr->batch;
	vq->broken = false;
	vq->broken_why = NULL;
	return 0;
}

/*
 * Bytes per queue in the region: the packed layout's when the region is big
 * enough for it (GET_INFLIGHT_FD sizes it so once RING_PACKED is
 * negotiated), else the split layout's. Derived from the size alone, so a
 * live upgrade maps an inherited region the way its creator laid it out.
 */
static size_t inflight_stride(const struct vhost_inflight_map *im)
{
	size_t packed = vhost_inflight_packed_queue_size(im->queue_size);

	if (im->size >= (uint64_t)im->nqueues * packed)
		return packed;
	return vhost_inflight_queue_size(im->queue_size);
}

static void *vring_inflight(struct vhost_dev *d, struct vhost_vring *vr)
{
	struct vhost_inflight_map *im = &d->inflight;
	size_t stride;

	if (!im->map || vr->idx >= im->nqueues || im->queue_size != vr->num)
		return NULL;
	stride = inflight_stride(im);
	if (vr->vq.packed && stride < vhost_inflight_packed_queue_size(vr->num))
		return NULL; /* a split-sized region: no room for packed tracking */
	return (uint8_t *)im->map + (im->map_len - im->size) + vr->idx * stride;
}

static int vring_alloc(struct vhost_dev *d, struct vhost_vring *vr)
{
	uint16_t *batch = realloc(vr->batch, vr->num * sizeof(uint16_t));
	uint16_t *resubmit;

	if (!batch)
		return -ENOMEM;
	vr->batch = batch;
	resubmit = realloc(vr->resubmit, vr->num * sizeof(uint16_t));
	if (!resubmit)
		return -ENOMEM;
	vr->resubmit = resubmit;
	if (has_bit(d->features, VIRTIO_F_RING_PACKED))
		return vhost_packed_alloc(&vr->vq.pk, vr->num);
	return 0;
}

/* Packed ring: where fetching resumes, and what to redo first. */
static int vring_position_packed(struct vhost_dev *d, struct vhost_vring *vr)
{
	struct vhost_vq *vq = &vr->vq;
	struct vhost_inflight_recovery *rc = &vr->recovery;

	if (!vhost_packed_base_ok(vr->num, vr->base) ||
	    (vr->base_used && !vhost_packed_base_ok(vr->num, vr->base_used))) {
		dev_err(d, "ring %u: base %#x is not a position in a packed ring of %u", vr->idx,
			(unsigned)vr->base | (unsigned)vr->base_used << 16, vr->num);
		return -EINVAL;
	}
	vq->inflight = NULL;
	vq->pk.inflight = vring_inflight(d, vr);
	vr->nresubmit = 0;
	if (vr->need_recover && vq->pk.inflight) {
		vhost_packed_recover(vq, d->features, vr->base, vr->resubmit, rc);
		vq->counter = rc->next_counter - 1;
		vr->nresubmit = rc->nresubmit;
		vr->position_lost = rc->outcome == VHOST_INFLIGHT_INVALID;
	} else {
		vhost_packed_reset(vq, vr->base, d->features);
		if (vr->need_recover)
			vq->counter = 0;
	}
	if (vr->position_lost) {
		/* After a crash the front-end's base is where the ring stood at
		 * its previous start: resuming there would read stale slots. */
		vq->broken = true;
		vq->broken_why = "in-flight region not trusted, ring position unknown";
	}
	/* Buffer counts, not positions, on a packed ring. */
	vq->last_avail_idx = vr->nresubmit;
	vq->used_idx = 0;
	vq->published_idx = 0;
	vr->need_recover = false;
	return 0;
}

/* Decide where fetching resumes: from the in-flight region after a
 * (re)connect, else from our own position. */
static int vring_position(struct vhost_dev *d, struct vhost_vring *vr)
{
	struct vhost_vq *vq = &vr->vq;
	uint16_t used_idx, avail_idx;

	if (vq->packed)
		return vring_position_packed(d, vr);
	used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
	avail_idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
	vq->inflight = vring_inflight(d, vr);
	vr->nresubmit = 0;
	vq->last_avail_idx = vr->base;
	if (vr->need_recover && vq->inflight) {
		vhost_inflight_recover(vq->inflight, vr->num, d->features,
				       (const volatile uint32_t *)vq->used->ring, used_idx,
				       avail_idx, vr->base, vr->resubmit, &vr->recovery);
		vq->last_avail_idx = vr->recovery.last_avail_idx;
		vq->counter = vr->recovery.next_counter - 1;
		vr->nresubmit = vr->recovery.nresubmit;
	} else if (vr->need_recover) {
		vq->counter = 0;
	}
	vq->used_idx = used_idx;
	vq->published_idx = used_idx;
	vr->need_recover = false;
	return 0;
}

static int vring_start(struct vhost_dev *d, struct vhost_vring *vr)
{
	int r = vring_alloc(d, vr);

	if (r)
		dev_err(d, "ring %u: %s", vr->idx, strerror(-r));
	else
		r = vring_map(d, vr);
	if (!r)
		r = vring_position(d, vr);
	if (r) {
		vr->start_failed = true;
		return r;
	}
	r = d->ops->queue_start(d->opaque, vr);
	if (r) {
		dev_err(d, "ring %u: start failed: %s", vr->idx, strerror(-r));
		vr->start_failed = true;
		return r;
	}
	vr->started = true;
	vr->starts++;
	return 0;
}

int vhost_dev_start_ready(struct vhost_dev *d)
{
	int first = 0, r;

	for (unsigned i = 0; i < d->nqueues; i++) {
		if (!vring_ready(d, &d->vring[i]))
			continue;
		r = vring_start(d, &d->vring[i]);
		if (r && !first)
			first = r;
	}
	return first;
}

/* ---- handlers ---- */

static int h_get_features(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	reply_u64(reply, d->offered_features);
	return 1;
}

static int h_set_features(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	if (m->p.u64 & ~d->offered_features) {
		dev_err(d, "SET_FEATURES: 0x%llx not offered",
			(unsigned long long)(m->p.u64 & ~d->offered_features));
		return -EINVAL;
	}
	/* QEMU 7.2, reconnecting to a back-end it set up but never started
	 * (a paused VM, an incoming migration), skips the protocol features'
	 * negotiation and goes on with what the last connection agreed: what
	 * we offer, as every connection of this daemon offers the same. */
	if (has_bit(m->p.u64, VHOST_USER_F_PROTOCOL_FEATURES) && !d->protocol_set) {
		d->protocol = d->offered_protocol;
		d->protocol_set = true;
	}
	if (d->features_set && d->features == m->p.u64)
		return 0;
	vhost_dev_stop_all(d); /* EVENT_IDX / LOG_ALL change the data path */
	d->features = m->p.u64;
	d->features_set = true;
	return 0;
}

static int h_nop(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	return 0;
}

/*
 * Post-copy mapping reply: the request's own layout with each userspace_addr
 * replaced by our address of the region, which QEMU needs to turn our fault
 * addresses into RAM block offsets. Rings wait for QEMU's ack (see
 * vhost_pc_is_mem_ack) because before it QEMU cannot serve our faults.
 */
static int postcopy_map_reply(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply,
			      const struct vhost_mem_region *r, unsigned n)
{
	struct vhost_user_mem_region *out = m->hdr.request == VHOST_USER_ADD_MEM_REG
						? &reply->p.mem_single.region
						: reply->p.mem.regions;

	memcpy(&reply->p, &m->p, m->hdr.size);
	for (unsigned i = 0; i < n; i++)
		out[i].userspace_addr = (uint64_t)(uintptr_t)r[i].hva;
	reply->hdr.size = m->hdr.size;
	d->pc.mem_ack_pending = true;
	return 1;
}

static int h_set_mem_table(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	bool postcopy = d->pc.state == VHOST_PC_LISTENING;
	uint32_t n = m->p.mem.nregions;
	int r = 0;

	if (n == 0 || n > VHOST_USER_MEM_TABLE_MAX || n != m->nfds ||
	    m->hdr.size != 8 + n * sizeof(struct vhost_user_mem_region)) {
		dev_err(d, "SET_MEM_TABLE: %u regions, %u fds, %u bytes", n, m->nfds, m->hdr.size);
		return -EINVAL;
	}
	vhost_dev_stop_all(d);
	vhost_mem_clear(&d->mem);
	for (uint32_t i = 0; i < n && r == 0; i++) {
		r = vhost_mem_add(&d->mem, &m->p.mem.regions[i], m->fds[i]);
		if (r) {
			dev_err(d, "SET_MEM_TABLE: region rejected: %s", strerror(-r));
			break;
		}
		m->fds[i] = -1;
		if (postcopy)
			r = vhost_pc_register(d, &d->mem.r[i]); /* sets d->err */
	}
	if (r) {
		vhost_mem_clear(&d->mem);
		/* In post-copy QEMU waits for a reply of the request's size and
		 * has no way to hear a failure: drop it rather than hang it. */
		return postcopy ? -EPROTO : r;
	}
	if (postcopy)
		return postcopy_map_reply(d, m, reply, d->mem.r, n);
	return 0;
}

static int h_set_log_base(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	int r;

	vhost_dev_stop_all(d);
	r = vhost_log_map(&d->log, m->fds[0], m->p.log.mmap_size, m->p.log.mmap_offset);
	if (r == 0)
		m->fds[0] = -1;
	else
		dev_err(d, "SET_LOG_BASE: cannot map log: %s", strerror(-r));
	/* QEMU waits for this reply (a u64 0) when LOG_SHMFD is negotiated. */
	reply_u64(reply, r ? 1 : 0);
	return 1;
}

static int h_set_vring_num(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	struct vhost_vring *vr = state_ring(d, m);
	uint32_t num = m->p.state.num;

	if (num == 0 || num > VHOST_MAX_QUEUE_SIZE || (num & (num - 1))) {
		dev_err(d, "SET_VRING_NUM: bad size %u", num);
		return -EINVAL;
	}
	vring_stop(d, vr);
	vr->num = (uint16_t)num;
	return 0;
}

static int h_set_vring_addr(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	struct vhost_vring *vr = &d->vring[m->p.addr.index];

	vring_stop(d, vr);
	vr->addr = m->p.addr;
	vr->addr_set = true;
	return 0;
}

static int h_set_vring_base(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	struct vhost_vring *vr = state_ring(d, m);
	uint32_t num = m->p.state.num;

	if (num > 0xffff && !has_bit(d->features, VIRTIO_F_RING_PACKED)) {
		dev_err(d, "SET_VRING_BASE: %u is not a split-ring index", num);
		return -EINVAL;
	}
	vring_stop(d, vr);
	/*
	 * A packed ring's base is the avail position with its wrap counter in
	 * bit 15, and QEMU (7.2) puts the used position, encoded the same way,
	 * in bits 16-31. Both are checked against the ring size when the ring
	 * starts. Fetching resumes at the avail position: a front-end that
	 * stopped us cleanly got both equal, nothing being in flight, and after
	 * a crash the in-flight region, not the base, says where the ring is.
	 */
	vr->base = (uint16_t)num;
	vr->base_used = (uint16_t)(num >> 16);
	vr->need_recover = true;
	vr->position_lost = false;
	return 0;
}

static int h_get_vring_base(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	struct vhost_vring *vr = state_ring(d, m);

	/* Stopping finishes every in-flight request, so the base we return
	 * is exact and the front-end can migrate or restart from it. */
	vring_stop(d, vr);
	reply->p.state.index = vr->idx;
	reply->p.state.num = vr->base;
	/* Packed: nothing is in flight after a stop, so the used position,
	 * which QEMU reads from bits 16-31, is the avail position. */
	if (has_bit(d->features, VIRTIO_F_RING_PACKED))
		reply->p.state.num |= (uint32_t)vr->base << 16;
	reply->hdr.size = sizeof(reply->p.state);
	/* The ring stays stopped until a new SET_VRING_KICK. */
	replace_fd(&vr->kick_fd, -1);
	return 1;
}

static int vring_file(struct vhost_dev *d, struct vhost_msg *m, int *slot)
{
	struct vhost_vring *vr = msg_ring(d, m);
	bool nofd = m->p.u64 & VHOST_USER_VRING_NOFD_MASK;

	if (nofd != (m->nfds == 0)) {
		dev_err(d, "%s: fd count disagrees with the no-fd flag",
			vhost_req_name(m->hdr.request));
		return -EINVAL;
	}
	vring_stop(d, vr);
	replace_fd(slot, nofd ? -1 : take_fd(m, 0));
	return 0;
}

static int h_set_vring_kick(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	return vring_file(d, m, &msg_ring(d, m)->kick_fd);
}

static int h_set_vring_call(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	return vring_file(d, m, &msg_ring(d, m)->call_fd);
}

static int h_set_vring_err(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	return vring_file(d, m, &msg_ring(d, m)->err_fd);
}

static int h_get_protocol(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	reply_u64(reply, d->offered_protocol);
	return 1;
}

static int h_set_protocol(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	if (m->p.u64 & ~d->offered_protocol) {
		dev_err(d, "SET_PROTOCOL_FEATURES: 0x%llx not offered",
			(unsigned long long)(m->p.u64 & ~d->offered_protocol));
		return -EINVAL;
	}
	d->protocol = m->p.u64;
	d->protocol_set = true;
	return 0;
}

static int h_get_queue_num(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	reply_u64(reply, d->nqueues);
	return 1;
}

static int h_set_vring_enable(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	struct vhost_vring *vr = state_ring(d, m);

	if (m->p.state.num > 1) {
		dev_err(d, "SET_VRING_ENABLE: %u", m->p.state.num);
		return -EINVAL;
	}
	if (vr->enabled == (m->p.state.num == 1))
		return 0;
	vring_stop(d, vr);
	vr->enabled = m->p.state.num == 1;
	return 0;
}

static int h_get_config(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	uint8_t cfg[VHOST_USER_CONFIG_MAX] = {0};
	uint32_t off = m->p.config.offset, size = m->p.config.size;

	if (size != m->hdr.size - VHOST_USER_CONFIG_HDR || off > VHOST_USER_CONFIG_MAX ||
	    size > VHOST_USER_CONFIG_MAX - off) {
		dev_err(d, "GET_CONFIG: bad window %u+%u in %u bytes", off, size, m->hdr.size);
		return -EPROTO; /* no sensible reply: drop the peer */
	}
	d->ops->get_config(d->opaque, cfg);
	reply->p.config.offset = off;
	reply->p.config.size = size;
	reply->p.config.flags = 0;
	memcpy(reply->p.config.region, cfg + off, size);
	reply->hdr.size = VHOST_USER_CONFIG_HDR + size;
	return 1;
}

static int h_set_config(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	/* Nothing in our config space is writable (no CONFIG_WCE). */
	return -ENOTSUP;
}

static bool inflight_geometry_ok(uint16_t nqueues, uint16_t queue_size)
{
	return nqueues >= 1 && nqueues <= VHOST_MAX_QUEUES && queue_size >= 1 &&
	       queue_size <= VHOST_MAX_QUEUE_SIZE && !(queue_size & (queue_size - 1));
}

static int h_get_inflight(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	uint16_t nq = m->p.inflight.num_queues, qs = m->p.inflight.queue_size;
	uint64_t size = (uint64_t)nq * (has_bit(d->features, VIRTIO_F_RING_PACKED)
					    ? vhost_inflight_packed_queue_size(qs)
					    : vhost_inflight_queue_size(qs));
	int fd = -1;

	memset(&reply->p.inflight, 0, sizeof(reply->p.inflight));
	reply->hdr.size = sizeof(reply->p.inflight);
	if (!inflight_geometry_ok(nq, qs)) {
		dev_err(d, "GET_INFLIGHT_FD: %u queues of %u", nq, qs);
		return 1; /* mmap_size 0: the front-end runs without tracking */
	}
	/* A fresh memfd is all zero: version 0, nothing in flight. */
	fd = memfd_create("vmig-blk-inflight", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0 || ftruncate(fd, (off_t)size) < 0) {
		dev_err(d, "GET_INFLIGHT_FD: memfd: %s", strerror(errno));
		if (fd >= 0)
			close(fd);
		return 1;
	}
	fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
	reply->p.inflight.mmap_size = size;
	reply->p.inflight.num_queues = nq;
	reply->p.inflight.queue_size = qs;
	reply->fds[0] = fd;
	reply->nfds = 1;
	return 1;
}

int vhost_dev_map_inflight(struct vhost_dev *d, int fd, uint64_t size, uint64_t offset,
			   uint16_t nqueues, uint16_t queue_size)
{
	uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
	uint64_t off_aligned = offset & ~(page - 1);
	struct vhost_inflight_map *im = &d->inflight;
	uint64_t map_len;
	void *map;

	if (!inflight_geometry_ok(nqueues, queue_size) ||
	    size < (uint64_t)nqueues * vhost_inflight_queue_size(queue_size) ||
	    offset + size < offset || size > SIZE_MAX / 2 || vhost_fd_covers(fd, offset, size))
		return -EINVAL;
	map_len = size + (offset - off_aligned);
	map =
	    mmap(NULL, (size_t)map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)off_aligned);
	if (map == MAP_FAILED)
		return -errno;
	if (im->map)
		munmap(im->map, im->map_len);
	if (im->fd >= 0)
		close(im->fd);
	im->fd = fd;
	im->map = map;
	im->map_len = (size_t)map_len;
	im->size = size;
	im->offset = offset;
	im->nqueues = nqueues;
	im->queue_size = queue_size;
	return 0;
}

static int h_set_inflight(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	const struct vhost_user_inflight *p = &m->p.inflight;
	int r;

	vhost_dev_stop_all(d);
	r = vhost_dev_map_inflight(d, m->fds[0], p->mmap_size, p->mmap_offset, p->num_queues,
				   p->queue_size);
	if (r) {
		dev_err(d, "SET_INFLIGHT_FD: %u queues of %u in %llu bytes: %s", p->num_queues,
			p->queue_size, (unsigned long long)p->mmap_size, strerror(-r));
		return r;
	}
	m->fds[0] = -1;
	return 0;
}

static int h_get_max_mem_slots(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	reply_u64(reply, VHOST_MAX_MEM_REGIONS);
	return 1;
}

static int region_index(const struct vhost_mem *mem, const struct vhost_user_mem_region *d)
{
	for (uint32_t i = 0; i < mem->nregions; i++)
		if (mem->r[i].gpa == d->guest_phys_addr && mem->r[i].size == d->memory_size &&
		    mem->r[i].uva == d->userspace_addr)
			return (int)i;
	return -1;
}

static int h_add_mem_reg(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	const struct vhost_user_mem_region *reg = &m->p.mem_single.region;
	bool postcopy = d->pc.state == VHOST_PC_LISTENING;
	int i = region_index(&d->mem, reg);
	int r;

	if (i >= 0) /* idempotent: the front-end re-sent what we have */
		return postcopy ? postcopy_map_reply(d, m, reply, &d->mem.r[i], 1) : 0;
	vhost_dev_stop_all(d);
	r = vhost_mem_add(&d->mem, reg, m->fds[0]);
	if (r) {
		dev_err(d, "ADD_MEM_REG: %s", strerror(-r));
		return postcopy ? -EPROTO : r;
	}
	m->fds[0] = -1;
	if (!postcopy)
		return 0;
	i = (int)d->mem.nregions - 1;
	r = vhost_pc_register(d, &d->mem.r[i]);
	if (r) {
		vhost_mem_remove(&d->mem, reg);
		return -EPROTO; /* QEMU waits for a mapping reply: drop it */
	}
	return postcopy_map_reply(d, m, reply, &d->mem.r[i], 1);
}

static int h_rem_mem_reg(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	vhost_dev_stop_all(d);
	if (vhost_mem_remove(&d->mem, &m->p.mem_single.region)) {
		dev_err(d, "REM_MEM_REG: no such region");
		return -ENOENT;
	}
	/* In post-copy QEMU follows a batch of removals with its ack too. */
	if (d->pc.state == VHOST_PC_LISTENING)
		d->pc.mem_ack_pending = true;
	return 0;
}

static int h_postcopy_advise(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	int fd;

	/* QEMU expects an empty reply with the fd; without an fd it fails
	 * the migration cleanly ("Failed to get ufd"). */
	reply->hdr.size = 0;
	if (vhost_pc_advise(d))
		return -EIO;
	/* The reply's fds are closed after sending: send a duplicate. */
	fd = fcntl(d->pc.uffd, F_DUPFD_CLOEXEC, 0);
	if (fd < 0) {
		dev_err(d, "POSTCOPY_ADVISE: dup: %s", strerror(errno));
		vhost_pc_end(d);
		return -EIO;
	}
	reply->fds[0] = fd;
	reply->nfds = 1;
	return 0;
}

/* LISTEN and END: QEMU sets NEED_REPLY and waits for a u64 status even
 * without REPLY_ACK, so answer whenever the flag asks for it. */
static int postcopy_status(const struct vhost_msg *m, struct vhost_msg *reply, int r)
{
	if (!(m->hdr.flags & VHOST_USER_NEED_REPLY_MASK))
		return r;
	reply_u64(reply, r ? 1 : 0);
	return 1;
}

static int h_postcopy_listen(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	return postcopy_status(m, reply, vhost_pc_listen(d));
}

static int h_postcopy_end(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	int r = 0;

	if (d->pc.state == VHOST_PC_OFF) {
		dev_err(d, "POSTCOPY_END without POSTCOPY_ADVISE");
		r = -EPROTO;
	}
	vhost_pc_end(d);
	return postcopy_status(m, reply, r);
}

#define P(bit) VHOST_USER_PROTOCOL_F_##bit
#define U64 sizeof(uint64_t)
#define STATE sizeof(struct vhost_user_vring_state)
static const struct msg_spec msg_table[VHOST_USER_REQ_MAX] = {
    [VHOST_USER_GET_FEATURES] = {"GET_FEATURES", h_get_features, 0, 0, 0, 0, F_REPLY, -1},
    [VHOST_USER_SET_FEATURES] = {"SET_FEATURES", h_set_features, U64, U64, 0, 0, 0, -1},
    [VHOST_USER_SET_OWNER] = {"SET_OWNER", h_nop, 0, 0, 0, 0, 0, -1},
    [VHOST_USER_RESET_OWNER] = {"RESET_OWNER", h_nop, 0, 0, 0, 0, 0, -1},
    [VHOST_USER_SET_MEM_TABLE] = {"SET_MEM_TABLE", h_set_mem_table, 8 + 32, 8 + 32 * 8, 1,
				  VHOST_USER_MEM_TABLE_MAX, 0, -1},
    [VHOST_USER_SET_LOG_BASE] = {"SET_LOG_BASE", h_set_log_base, sizeof(struct vhost_user_log),
				 sizeof(struct vhost_user_log), 1, 1, F_REPLY, P(LOG_SHMFD)},
    [VHOST_USER_SET_VRING_NUM] = {"SET_VRING_NUM", h_set_vring_num, STATE, STATE, 0, 0,
				  F_RING_STATE, -1},
    [VHOST_USER_SET_VRING_ADDR] = {"SET_VRING_ADDR", h_set_vring_addr,
				   sizeof(struct vhost_user_vring_addr),
				   sizeof(struct vhost_user_vring_addr), 0, 0, F_RING_STATE, -1},
    [VHOST_USER_SET_VRING_BASE] = {"SET_VRING_BASE", h_set_vring_base, STATE, STATE, 0, 0,
				   F_RING_STATE, -1},
    [VHOST_USER_GET_VRING_BASE] = {"GET_VRING_BASE", h_get_vring_base, STATE, STATE, 0, 0,
				   F_REPLY | F_RING_STATE, -1},
    [VHOST_USER_SET_VRING_KICK] = {"SET_VRING_KICK", h_set_vring_kick, U64, U64, 0, 1, F_RING_FILE,
				   -1},
    [VHOST_USER_SET_VRING_CALL] = {"SET_VRING_CALL", h_set_vring_call, U64, U64, 0, 1, F_RING_FILE,
				   -1},
    [VHOST_USER_SET_VRING_ERR] = {"SET_VRING_ERR", h_set_vring_err, U64, U64, 0, 1, F_RING_FILE,
				  -1},
    [VHOST_USER_GET_PROTOCOL_FEATURES] = {"GET_PROTOCOL_FEATURES", h_get_protocol, 0, 0, 0, 0,
					  F_REPLY, -1},
    [VHOST_USER_SET_PROTOCOL_FEATURES] = {"SET_PROTOCOL_FEATURES", h_set_protocol, U64, U64, 0, 0,
					  0, -1},
    [VHOST_USER_GET_QUEUE_NUM] = {"GET_QUEUE_NUM", h_get_queue_num, 0, 0, 0, 0, F_REPLY, P(MQ)},
    [VHOST_USER_SET_VRING_ENABLE] = {"SET_VRING_ENABLE", h_set_vring_enable, STATE, STATE, 0, 0,
				     F_RING_STATE, -1},
    [VHOST_USER_GET_CONFIG] = {"GET_CONFIG", h_get_config, VHOST_USER_CONFIG_HDR,
			       VHOST_USER_CONFIG_HDR + VHOST_USER_CONFIG_MAX, 0, 0, F_REPLY,
			       P(CONFIG)},
    [VHOST_USER_SET_CONFIG] = {"SET_CONFIG", h_set_config, VHOST_USER_CONFIG_HDR,
			       VHOST_USER_CONFIG_HDR + VHOST_USER_CONFIG_MAX, 0, 0, 0, P(CONFIG)},
    [VHOST_USER_POSTCOPY_ADVISE] = {"POSTCOPY_ADVISE", h_postcopy_advise, 0, 0, 0, 0, F_REPLY,
				    P(PAGEFAULT)},
    [VHOST_USER_POSTCOPY_LISTEN] = {"POSTCOPY_LISTEN", h_postcopy_listen, 0, 0, 0, 0, 0,
				    P(PAGEFAULT)},
    [VHOST_USER_POSTCOPY_END] = {"POSTCOPY_END", h_postcopy_end, 0, 0, 0, 0, 0, P(PAGEFAULT)},
    [VHOST_USER_GET_INFLIGHT_FD] = {"GET_INFLIGHT_FD", h_get_inflight, VHOST_USER_INFLIGHT_MIN,
				    sizeof(struct vhost_user_inflight), 0, 0, F_REPLY,
				    P(INFLIGHT_SHMFD)},
    [VHOST_USER_SET_INFLIGHT_FD] = {"SET_INFLIGHT_FD", h_set_inflight, VHOST_USER_INFLIGHT_MIN,
				    sizeof(struct vhost_user_inflight), 1, 1, 0, P(INFLIGHT_SHMFD)},
    [VHOST_USER_GET_MAX_MEM_SLOTS] = {"GET_MAX_MEM_SLOTS", h_get_max_mem_slots, 0, 0, 0, 0, F_REPLY,
				      P(CONFIGURE_MEM_SLOTS)},
    [VHOST_USER_ADD_MEM_REG] = {"ADD_MEM_REG", h_add_mem_reg, sizeof(struct vhost_user_mem_single),
				sizeof(struct vhost_user_mem_single), 1, 1, 0,
				P(CONFIGURE_MEM_SLOTS)},
    [VHOST_USER_REM_MEM_REG] = {"REM_MEM_REG", h_rem_mem_reg, sizeof(struct vhost_user_mem_single),
				sizeof(struct vhost_user_mem_single), 0, 1, 0,
				P(CONFIGURE_MEM_SLOTS)},
};
#undef P
#undef U64
#undef STATE

const char *vhost_req_name(uint32_t req)
{
	if (req < VHOST_USER_REQ_MAX && msg_table[req].name)
		return msg_table[req].name;
	return NULL;
}

/* The checks every message passes before its handler. NULL = accepted. */
static const char *msg_check(const struct vhost_dev *d, const struct vhost_msg *m,
			     const struct msg_spec *s)
{
	uint32_t ring;

	if ((m->hdr.flags & VHOST_USER_VERSION_MASK) != VHOST_USER_VERSION)
		return "bad version";
	if (m->hdr.flags & VHOST_USER_REPLY_MASK)
		return "reply flag on a request";
	if (m->hdr.size < s->min_size || m->hdr.size > s->max_size)
		return "bad payload size";
	if (m->nfds < s->min_fds || m->nfds > s->max_fds)
		return "bad number of fds";
	if (s->protocol_bit >= 0 && !has_bit(d->protocol, (unsigned)s->protocol_bit))
		return "protocol feature not negotiated";
	if (s->flags & (F_RING_STATE | F_RING_FILE)) {
		ring = s->flags & F_RING_FILE ? (uint32_t)(m->p.u64 & VHOST_USER_VRING_IDX_MASK)
					      : m->p.state.index;
		if ((s->flags & F_RING_FILE) &&
		    (m->p.u64 &
		     ~(uint64_t)(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK)))
			return "unknown bits in ring fd message";
		if (ring >= d->nqueues)
			return "ring index out of range";
	}
	return NULL;
}

static int ack(const struct vhost_dev *d, const struct vhost_msg *m, struct vhost_msg *reply, int r)
{
	if (!(m->hdr.flags & VHOST_USER_NEED_REPLY_MASK) ||
	    !has_bit(d->protocol, VHOST_USER_PROTOCOL_F_REPLY_ACK))
		return 0;
	reply_u64(reply, r < 0 ? (uint64_t)-r : 0);
	return 1;
}

int vhost_dev_handle(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply)
{
	uint32_t req = m->hdr.request;
	const struct msg_spec *s = req < VHOST_USER_REQ_MAX ? &msg_table[req] : NULL;
	const char *why;
	int r, sr;

	memset(&reply->hdr, 0, sizeof(reply->hdr));
	reply->hdr.request = req;
	reply->hdr.flags = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK;
	reply->nfds = 0;
	d->msgs++;
	if (vhost_pc_is_mem_ack(d, m)) {
		/* QEMU can serve our faults from now on: rings may start. */
		if (m->p.u64)
			dev_err(d, "post-copy mapping ack carries error %llu",
				(unsigned long long)m->p.u64);
		d->pc.mem_ack_pending = false;
		vhost_dev_start_ready(d);
		return 0;
	}
	if (!s || !s->fn) {
		d->msg_errors++;
		dev_err(d, "unsupported request %u", req);
		vhost_msg_close_fds(m);
		r = ack(d, m, reply, -ENOTSUP);
		return r ? r : -EPROTO;
	}
	why = msg_check(d, m, s);
	if (why) {
		d->msg_errors++;
		dev_err(d, "%s: %s (size %u, %u fds)", s->name, why, m->hdr.size, m->nfds);
		vhost_msg_close_fds(m);
		return -EPROTO;
	}
	r = s->fn(d, m, reply);
	vhost_msg_close_fds(m);
	/* A ring that this message made ready but that cannot start (its
	 * addresses are outside the memory table, say) is this message's
	 * error: the front-end hears it through REPLY_ACK, the log shows it. */
	sr = vhost_dev_start_ready(d);
	if (sr && r == 0)
		r = sr;
	else if (sr)
		d->msg_errors++;
	if (r < 0) {
		d->msg_errors++;
		if (r == -EPROTO)
			return r;
	}
	if (r == 1 || (s->flags & F_REPLY))
		return 1; /* the handler built a reply of its own */
	return ack(d, m, reply, r);
}

static void vring_init(struct vhost_vring *vr, unsigned idx)
{
	memset(vr, 0, sizeof(*vr));
	vr->idx = idx;
	vr->kick_fd = -1;
	vr->call_fd = -1;
	vr->err_fd = -1;
	vr->enabled = true;
}

void vhost_dev_init(struct vhost_dev *d, unsigned nqueues, uint64_t features,
		    const struct vhost_dev_ops *ops, void *opaque)
{
	memset(d, 0, sizeof(*d));
	d->ops = ops;
	d->opaque = opaque;
	d->nqueues = nqueues;
	d->offered_features =
	    features | (1ull << VHOST_USER_F_PROTOCOL_FEATURES) | (1ull << VHOST_F_LOG_ALL);
	d->offered_protocol =
	    (1ull << VHOST_USER_PROTOCOL_F_MQ) | (1ull << VHOST_USER_PROTOCOL_F_LOG_SHMFD) |
	    (1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK) | (1ull << VHOST_USER_PROTOCOL_F_CONFIG) |
	    (1ull << VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) |
	    (1ull << VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS) |
	    (1ull << VHOST_USER_PROTOCOL_F_PAGEFAULT);
	vhost_mem_init(&d->mem);
	vhost_pc_init(&d->pc);
	d->log.fd = -1;
	d->inflight.fd = -1;
	for (unsigned i = 0; i < VHOST_MAX_QUEUES; i++)
		vring_init(&d->vring[i], i);
}

void vhost_dev_reset(struct vhost_dev *d)
{
	struct vhost_inflight_map *im = &d->inflight;

	vhost_dev_stop_all(d);
	vhost_pc_end(d);
	for (unsigned i = 0; i < VHOST_MAX_QUEUES; i++) {
		struct vhost_vring *vr = &d->vring[i];

		replace_fd(&vr->kick_fd, -1);
		replace_fd(&vr->call_fd, -1);
		replace_fd(&vr->err_fd, -1);
		free(vr->batch);
		free(vr->resubmit);
		vhost_packed_free(&vr->vq.pk);
		vring_init(vr, i);
	}
	vhost_mem_clear(&d->mem);
	vhost_log_unmap(&d->log);
	if (im->map)
		munmap(im->map, im->map_len);
	if (im->fd >= 0)
		close(im->fd);
	memset(im, 0, sizeof(*im));
	im->fd = -1;
	d->features = 0;
	d->protocol = 0;
	d->protocol_set = false;
	d->features_set = false;
}
