/* SPDX-License-Identifier: MIT */
/*
 * The vhost-user back-end library used by vmig-blk: guest memory table,
 * dirty log, split and packed virtqueues with in-flight tracking, and the
 * device state
 * machine that handles the front-end's messages. It knows nothing about
 * block devices: a device plugs in through struct vhost_dev_ops (config
 * space, queue start/stop) and runs its own data path on struct vhost_vq.
 *
 * Threads: one control thread owns struct vhost_dev and handles messages.
 * A started ring's struct vhost_vq belongs to the device's queue thread until
 * ops->queue_stop returns; the control thread stops every ring a message
 * could affect before it touches shared state (memory table, log, features,
 * ring fds), so the data path never takes a lock.
 *
 * Errors: functions return 0 or -errno; text goes to dev->err.
 */
#ifndef VMIG_VHOST_H
#define VMIG_VHOST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "vhost/inflight.h"
#include "vhost/proto.h"

#define VHOST_MAX_QUEUES 16
#define VHOST_MAX_QUEUE_SIZE 1024
#define VHOST_MAX_MEM_REGIONS 32

/* ---- guest memory (mem.c) ---- */

struct vhost_mem_region {
	uint64_t gpa;	      /* guest physical start */
	uint64_t size;	      /* bytes */
	uint64_t uva;	      /* front-end virtual start (ring addresses use it) */
	uint64_t mmap_offset; /* offset of the region in fd */
	uint8_t *hva;	      /* our mapping of gpa */
	void *map;	      /* mmap() result, map_len bytes */
	size_t map_len;
	int fd; /* owned; -1 when unused */
};

struct vhost_mem {
	uint32_t nregions;
	struct vhost_mem_region r[VHOST_MAX_MEM_REGIONS];
};

void vhost_mem_init(struct vhost_mem *m);
/* -EINVAL if fd is a regular file too short for [offset, offset + size):
 * mapping it would turn our first access past its end into SIGBUS. */
int vhost_fd_covers(int fd, uint64_t offset, uint64_t size);
/* Map a region described by the peer; takes ownership of fd on success. */
int vhost_mem_add(struct vhost_mem *m, const struct vhost_user_mem_region *d, int fd);
/* Unmap the region matching d (gpa, size, uva); -ENOENT if none. */
int vhost_mem_remove(struct vhost_mem *m, const struct vhost_user_mem_region *d);
void vhost_mem_clear(struct vhost_mem *m);
/*
 * Host address of guest physical [gpa, gpa + *len): returns the start and
 * shrinks *len to the part that is contiguous in one region, or NULL if gpa
 * is not mapped. Callers loop for ranges spanning regions.
 */
void *vhost_mem_gpa(const struct vhost_mem *m, uint64_t gpa, uint64_t *len);
/* Host address of front-end virtual [uva, uva + len), all in one region. */
void *vhost_mem_uva(const struct vhost_mem *m, uint64_t uva, uint64_t len);
/* Guest physical address of front-end virtual uva: 0 or -EFAULT. */
int vhost_mem_uva_to_gpa(const struct vhost_mem *m, uint64_t uva, uint64_t *gpa);

/* ---- dirty log (mem.c) ---- */

struct vhost_log {
	uint8_t *bits; /* one bit per 4 KiB guest page, NULL if no log */
	uint64_t size; /* bytes of bitmap */
	void *map;
	size_t map_len;
	uint64_t mmap_offset;
	int fd;
};

int vhost_log_map(struct vhost_log *l, int fd, uint64_t size, uint64_t offset);
void vhost_log_unmap(struct vhost_log *l);
/* Mark guest pages of [gpa, gpa + len) dirty. Lock-free, any thread. */
void vhost_log_write(const struct vhost_log *l, uint64_t gpa, uint64_t len);

/* ---- split virtqueue data path (virtq.c) ---- */

/* The ring layouts, in guest memory (virtio 1.x split ring). */
struct vhost_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};
#define VHOST_DESC_F_NEXT 1
#define VHOST_DESC_F_WRITE 2
#define VHOST_DESC_F_INDIRECT 4

struct vhost_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[]; /* num entries, then used_event (EVENT_IDX) */
};
#define VHOST_AVAIL_F_NO_INTERRUPT 1
#define VHOST_USED_F_NO_NOTIFY 1

struct vhost_used_elem {
	uint32_t id;
	uint32_t len;
};
struct vhost_used {
	uint16_t flags;
	uint16_t idx;
	struct vhost_used_elem ring[]; /* num entries, then avail_event */
};

#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_F_RING_PACKED 34

/* The packed ring layout (virtio 1.1, 2.7): one descriptor ring that the
 * driver and the device both write, and two event suppression areas. */
struct vhost_pdesc {
	uint64_t addr;
	uint32_t len;
	uint16_t id;
	uint16_t flags; /* VHOST_DESC_F_* and the two below */
};
#define VHOST_PDESC_F_AVAIL (1u << 7)
#define VHOST_PDESC_F_USED (1u << 15)

/* Driver area (the driver says when it wants interrupts) and device area
 * (we say when we want kicks). off_wrap: position in bits 0-14, wrap
 * counter in bit 15; only read with VHOST_PEVENT_DESC, which needs
 * EVENT_IDX. */
struct vhost_pevent {
	uint16_t off_wrap;
	uint16_t flags;
};
#define VHOST_PEVENT_ENABLE 0
#define VHOST_PEVENT_DISABLE 1
#define VHOST_PEVENT_DESC 2

/* A packed ring descriptor as we fetched it: our own copy, because the
 * driver may reuse the ring slot as soon as we have read it. */
struct vhost_packed_slot {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next; /* next slot of the same buffer */
};

/*
 * Packed ring state. Positions are ring slots (0..num-1) with a wrap
 * counter that starts at 1 and flips each time the position passes the end.
 * The private arrays (num entries each, one allocation made by
 * vhost_packed_alloc()) are what the data path trusts; the in-flight region,
 * when there is one, gets a copy of every change (inflight.h) and is read
 * only when the ring starts after a crash.
 */
struct vhost_packed {
	volatile struct vhost_pdesc *ring;
	volatile struct vhost_pevent *driver_event;
	volatile struct vhost_pevent *device_event;
	uint64_t ring_gpa;	   /* guest address of ring, for the dirty log */
	uint64_t device_event_gpa; /* guest address of device_event */
	uint16_t avail_pos;	   /* next slot to fetch */
	bool avail_wrap;
	uint16_t used_pos; /* next slot to write a used descriptor into */
	bool used_wrap;
	struct vhost_inflight_packed *inflight; /* NULL without a region */
	struct vhost_packed_slot *slot;		/* fetched descriptors */
	uint16_t *free_slots;			/* stack of unused slot numbers */
	uint16_t nfree;
	uint16_t *id_head;    /* first slot of buffer id */
	uint16_t *id_ndesc;   /* ring descriptors of buffer id; 0: not ours */
	uint64_t *id_counter; /* fetch order of buffer id */
	uint32_t *staged_len; /* lengths of the completions in vq->batch */
	uint16_t alloc_num;   /* entries the arrays were allocated for */
	void *alloc;
};

/* Longest indirect table we accept (entries); Linux uses at most ~seg_max+2. */
#define VHOST_MAX_INDIRECT 1024

struct vhost_vq {
	uint16_t num;
	bool event_idx;
	bool indirect;
	bool packed; /* VIRTIO_F_RING_PACKED: pk, not desc/avail/used */
	volatile struct vhost_desc *desc;
	volatile struct vhost_avail *avail;
	volatile struct vhost_used *used;
	uint16_t last_avail_idx; /* next avail entry to fetch */
	uint16_t used_idx;	 /* next used entry to write (staged) */
	uint16_t published_idx;	 /* used->idx as last stored */
	const struct vhost_mem *mem;
	const struct vhost_log *log; /* NULL unless logging is on */
	bool log_used;		     /* also log used-ring writes */
	uint64_t used_gpa;
	struct vhost_inflight_queue *inflight; /* NULL without a region */
	uint64_t counter;		       /* last fetch counter handed out */
	uint16_t *batch;		       /* heads staged since the last flush */
	bool broken;			       /* guest broke the ring: stop using it */
	const char *broken_why;		       /* packed rings: what broke it */
	struct vhost_packed pk;
};

/* A descriptor chain resolved to host memory. iov/gpa are caller storage of
 * max entries; [0, nout) is device-readable, [nout, nout + nin) writable. */
struct vhost_chain {
	uint16_t head;
	uint16_t max;
	uint16_t nout;
	uint16_t nin;
	struct iovec *iov;
	uint64_t *gpa;
};

/*
 * Fetch the next available head (marks it in flight). Returns 1 with *head
 * set, 0 if the ring is empty, -EIO if the guest broke the ring (the queue
 * is then marked broken and must not be used until restarted). On a packed
 * ring the "head" is the buffer id, and every function below takes it so.
 */
int vhost_vq_pop(struct vhost_vq *vq, uint16_t *head);
/*
 * Resolve the chain at head. -EINVAL for a malformed chain (bad flags,
 * readable after writable, nested indirect), -ELOOP if longer than the ring
 * or the indirect table, -EFAULT if outside the memory table, -E2BIG if it
 * needs more than c->max iovecs.
 */
int vhost_vq_map_chain(const struct vhost_vq *vq, uint16_t head, struct vhost_chain *c);
/* Log every device-writable segment of c (after writing it). */
void vhost_vq_log_chain(const struct vhost_vq *vq, const struct vhost_chain *c);
/* Stage a completion; visible to the guest at the next flush. */
void vhost_vq_push(struct vhost_vq *vq, uint16_t head, uint32_t len);
/* Publish staged completions. Returns true if the guest must be notified. */
bool vhost_vq_flush(struct vhost_vq *vq);
/*
 * Tell the guest we will sleep (EVENT_IDX: avail_event = last_avail_idx;
 * otherwise clear VRING_USED_F_NO_NOTIFY) and recheck. Returns true if more
 * buffers are available, so the caller must keep going instead of sleeping.
 */
bool vhost_vq_enable_notify(struct vhost_vq *vq);
/*
 * Tell the guest it need not kick: we are polling the avail ring. Without
 * EVENT_IDX this sets VRING_USED_F_NO_NOTIFY in used->flags; with EVENT_IDX
 * it does nothing, because avail_event stays where the last
 * vhost_vq_enable_notify() put it and the guest, which is past it already,
 * only kicks again when its avail index crosses it (after 65536 buffers: one
 * harmless extra kick). Only a hint: callers still handle kicks.
 */
void vhost_vq_disable_notify(struct vhost_vq *vq);
/*
 * Cheap poll: true if the guest has published buffers we have not fetched.
 * One load of avail->idx, no side effects; vhost_vq_pop() does the checks.
 */
static inline bool vhost_pdesc_avail(uint16_t flags, bool wrap)
{
	return !!(flags & VHOST_PDESC_F_AVAIL) == wrap && !!(flags & VHOST_PDESC_F_USED) != wrap;
}
static inline bool vhost_vq_avail_pending(const struct vhost_vq *vq)
{
	if (vq->packed)
		return vhost_pdesc_avail(
		    __atomic_load_n(&vq->pk.ring[vq->pk.avail_pos].flags, __ATOMIC_RELAXED),
		    vq->pk.avail_wrap);
	return __atomic_load_n(&vq->avail->idx, __ATOMIC_RELAXED) != vq->last_avail_idx;
}
/*
 * The EVENT_IDX rule (virtio 1.x, 2.7.10): after moving an index from old to
 * new_idx, the other side asked to be notified iff its event index lies in
 * [old, new_idx), modulo 2^16. Used for used_event (our interrupts) and by
 * tests for avail_event (the guest's kicks).
 */
static inline bool vhost_need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
	return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* Append guest [gpa, gpa + len) to c, split at region boundaries (both
 * ring types use it). -EINVAL if readable after writable, -EFAULT, -E2BIG. */
int vhost_vq_chain_add(const struct vhost_vq *vq, struct vhost_chain *c, uint64_t gpa, uint32_t len,
		       bool writable);

/* ---- packed virtqueue data path (packed.c), reached through vhost_vq_* ---- */

/* Allocate pk's private arrays for num entries (kept if already big enough). */
int vhost_packed_alloc(struct vhost_packed *pk, uint16_t num);
void vhost_packed_free(struct vhost_packed *pk);
/* True if base (SET_VRING_BASE: position | wrap << 15) names a slot. */
static inline bool vhost_packed_base_ok(uint16_t num, uint32_t base)
{
	return base <= 0xffff && (base & 0x7fff) < num;
}
/* Encode where fetching continues the way GET_VRING_BASE answers it. */
static inline uint16_t vhost_packed_base(const struct vhost_vq *vq)
{
	return (uint16_t)(vq->pk.avail_pos | (vq->pk.avail_wrap ? 0x8000u : 0));
}
/* Nothing in flight, both positions at base (which must be base_ok); the
 * in-flight region, if any, is initialised to match (with features). */
void vhost_packed_reset(struct vhost_vq *vq, uint16_t base, uint64_t features);
int vhost_packed_pop(struct vhost_vq *vq, uint16_t *id);
int vhost_packed_map_chain(const struct vhost_vq *vq, uint16_t id, struct vhost_chain *c);
void vhost_packed_push(struct vhost_vq *vq, uint16_t id, uint32_t len);
bool vhost_packed_flush(struct vhost_vq *vq);
bool vhost_packed_enable_notify(struct vhost_vq *vq);
void vhost_packed_disable_notify(struct vhost_vq *vq);
/*
 * Recover a packed ring from vq->pk.inflight after the back-end restarted
 * (inflight_packed.c; the protocol is in inflight.h). Sets the positions,
 * the private copies and vq->counter, and fills resubmit (num entries) with
 * the buffer ids to redo, oldest first. For INVALID, nothing is trusted and
 * the region is left as it is: the caller marks the ring broken.
 */
void vhost_packed_recover(struct vhost_vq *vq, uint64_t features, uint16_t base, uint16_t *resubmit,
			  struct vhost_inflight_recovery *out);

/* ---- device and message handling (dev.c) ---- */

struct vhost_dev;

struct vhost_vring {
	unsigned idx;
	uint16_t num;
	bool addr_set;
	struct vhost_user_vring_addr addr;
	uint16_t base;	   /* last_avail_idx while stopped */
	uint16_t base_used; /* packed: bits 16-31 of SET_VRING_BASE (used position) */
	bool need_recover; /* base came from the front-end: consult inflight */
	/* Set by the back-end's queue_stop: it stopped with requests still in
	 * flight (marked in the in-flight region, not returned), which the
	 * next start must redo from the region. */
	bool left_inflight;
	bool position_lost; /* packed ring whose region was not trusted: stays
			     * broken until the front-end sets a new base */
	int kick_fd;
	int call_fd;
	int err_fd;
	bool enabled;
	bool started;	   /* the device's queue thread owns vq */
	bool start_failed; /* tried and failed; again once something changes */
	struct vhost_vq vq;
	uint16_t *batch;    /* num entries */
	uint16_t *resubmit; /* heads to redo first, oldest first */
	uint16_t nresubmit;
	struct vhost_inflight_recovery recovery; /* what the last start found */
	uint64_t starts;
};

struct vhost_dev_ops {
	/* Fill the whole config space (VHOST_USER_CONFIG_MAX bytes). */
	void (*get_config)(void *opaque, uint8_t *cfg);
	/* Take over vr->vq and start serving it (resubmit first). 0 or -errno. */
	int (*queue_start)(void *opaque, struct vhost_vring *vr);
	/* Stop taking buffers, finish all in flight, give vr->vq back. */
	void (*queue_stop)(void *opaque, struct vhost_vring *vr);
};

struct vhost_inflight_map {
	int fd;
	void *map;
	size_t map_len;
	uint64_t size;
	uint64_t offset;
	uint16_t nqueues;
	uint16_t queue_size;
};

/* Post-copy (postcopy.c). */
enum vhost_pc_state {
	VHOST_PC_OFF = 0,   /* no userfaultfd */
	VHOST_PC_ADVISED,   /* uffd open and handed to the front-end */
	VHOST_PC_LISTENING, /* new mappings are registered on the uffd */
};

struct vhost_postcopy {
	enum vhost_pc_state state;
	int uffd;	      /* owned; the front-end holds its own copy */
	bool mem_ack_pending; /* mapping replied, front-end's ack not yet seen */
	uint64_t advises;
	uint64_t registered; /* regions registered on the uffd, ever */
};

struct vhost_dev {
	const struct vhost_dev_ops *ops;
	void *opaque;
	unsigned nqueues;
	uint64_t offered_features;
	uint64_t offered_protocol;
	uint64_t features; /* acked by SET_FEATURES */
	uint64_t protocol; /* acked by SET_PROTOCOL_FEATURES (or implied, see h_set_features) */
	bool protocol_set; /* SET_PROTOCOL_FEATURES came on this connection */
	bool features_set;
	struct vhost_mem mem;
	struct vhost_log log;
	struct vhost_inflight_map inflight;
	struct vhost_vring vring[VHOST_MAX_QUEUES];
	struct vhost_postcopy pc;
	uint64_t msgs;
	uint64_t msg_errors;
	char err[256]; /* last error text */
};

/* A message with its fds. Handlers take an fd by setting it to -1. */
struct vhost_msg {
	struct vhost_user_hdr hdr;
	union vhost_user_payload p;
	int fds[VHOST_USER_MAX_FDS];
	unsigned nfds;
};

void vhost_dev_init(struct vhost_dev *d, unsigned nqueues, uint64_t features,
		    const struct vhost_dev_ops *ops, void *opaque);
/* Connection gone: stop every ring, drop memory, log, fds, negotiation. */
void vhost_dev_reset(struct vhost_dev *d);
/*
 * Validate and handle one message. Returns 1 if *reply must be sent, 0 if
 * not, or -EPROTO if the peer broke the protocol (drop the connection).
 * Closes every fd of m that the handler did not keep.
 */
int vhost_dev_handle(struct vhost_dev *d, struct vhost_msg *m, struct vhost_msg *reply);
/* Name of a request id, for logs ("SET_MEM_TABLE"), or NULL. */
const char *vhost_req_name(uint32_t req);
/* Stop / (re)start every ring: quiesce for live upgrade. Starting returns
 * the error of the first ring that could not start (text in d->err). */
void vhost_dev_stop_all(struct vhost_dev *d);
int vhost_dev_start_ready(struct vhost_dev *d);
/* Map the in-flight region of an inherited fd (live upgrade). */
int vhost_dev_map_inflight(struct vhost_dev *d, int fd, uint64_t size, uint64_t offset,
			   uint16_t nqueues, uint16_t queue_size);

/* ---- post-copy (postcopy.c), called by dev.c's handlers ---- */

void vhost_pc_init(struct vhost_postcopy *pc);
/* Open a non-blocking userfaultfd into d->pc.uffd; state ADVISED. */
int vhost_pc_advise(struct vhost_dev *d);
/* ADVISED -> LISTENING; -EPROTO out of order, -EBUSY if memory is mapped. */
int vhost_pc_listen(struct vhost_dev *d);
/* Register a freshly mapped region on the uffd (MISSING mode). */
int vhost_pc_register(struct vhost_dev *d, const struct vhost_mem_region *r);
/* Unregister every region, close the uffd; state OFF. Idempotent. */
void vhost_pc_end(struct vhost_dev *d);
/* True if m is the front-end's u64 ack that follows a post-copy mapping reply. */
bool vhost_pc_is_mem_ack(const struct vhost_dev *d, const struct vhost_msg *m);

/* ---- socket I/O (msg.c) ---- */

/* Read one message with its fds. 0, -EPIPE on EOF, -EBADMSG, -ETIMEDOUT
 * (the socket's SO_RCVTIMEO ran out mid-message), -errno. */
int vhost_msg_recv(int sock, struct vhost_msg *m);
/* 0, -ETIMEDOUT (SO_SNDTIMEO ran out: the peer does not read), -errno. */
int vhost_msg_send(int sock, const struct vhost_msg *m);
void vhost_msg_close_fds(struct vhost_msg *m);

#endif
