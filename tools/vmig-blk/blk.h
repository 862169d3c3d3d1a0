/* SPDX-License-Identifier: MIT */
/*
 * vmig-blk: a vhost-user-blk back-end. This header ties its parts together:
 * the disk (a file, a block device, a RAM memfd or nothing) and its geometry
 * (disk.c), the per-queue data path (blk.c, one thread and one io_uring per
 * queue; dwz.c for discard and write-zeroes, bounce.c for the O_DIRECT bounce
 * buffers), dirty-block tracking (dirty.c), the daemon's control loop
 * (main.c), the JSON-RPC control socket (rpc.c) and the live upgrade by
 * exec (upgrade.c).
 *
 * Threads: the control thread owns struct vblk_daemon and everything in it
 * except a started queue, which its queue thread owns until queue_stop
 * returns. Statistics are written only by the queue thread (relaxed atomic
 * stores) and read by the control thread.
 */
#ifndef VMIG_BLK_H
#define VMIG_BLK_H

#include <liburing.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "util/json_split.h"
#include "vhost/vhost.h"

#define VBLK_SECTOR 512u
#define VBLK_SEG_MAX 126u		/* data segments we advertise */
#define VBLK_MAX_IOV 256u		/* iovecs per request incl. header/status/splits */
#define VBLK_MAX_DWZ_SEGS 16u		/* discard / write-zeroes segments per request */
#define VBLK_MAX_DWZ_SECTORS (1u << 22) /* 2 GiB per segment */
#define VBLK_SERIAL_LEN 20u		/* VIRTIO_BLK_ID_BYTES */
#define VBLK_MAX_RPC_CLIENTS 8
#define VBLK_DEFAULT_POLL_US 50u      /* see docs/vhost-user.md, "Polling" */
#define VBLK_MAX_POLL_US 1000000u     /* 1 s: longer is a configuration mistake */
/* How long a guest write may wait for a write-blocking round's
 * acknowledgement (--write-blocking-stall-ms; docs/storage-migration.md). */
#define VBLK_DEFAULT_WB_STALL_MS 1000u
#define VBLK_MAX_WB_STALL_MS 30000u   /* well short of the 60 s a round may take */
#define VBLK_MAX_LATENCY_US 60000000u /* 60 s: see vblk_queue_set_latency */
#define VBLK_MSG_TIMEOUT_S 2	      /* to finish a vhost-user message or send a reply */
#define VBLK_MAX_BLOCK_SIZE 65536u    /* largest logical block size we serve */
#define VBLK_BOUNCE_SLOTS 4u	      /* bounce buffers per queue (--cache none) */
#define VBLK_BOUNCE_BYTES (256u << 10) /* each: a bounced request moves in such chunks */

struct vblk_stats {
	uint64_t read_ops, read_bytes;
	uint64_t write_ops, write_bytes;
	uint64_t flush_ops;
	uint64_t discard_ops, discard_bytes;
	uint64_t write_zeroes_ops, write_zeroes_bytes;
	uint64_t get_id_ops;
	uint64_t errors;      /* requests completed with IOERR/UNSUPP or no status */
	uint64_t resubmitted; /* requests redone from the in-flight region */
	uint64_t sleeps;      /* times the queue thread went to sleep on its io_uring */
	uint64_t poll_hits;   /* times polling found work that came without a kick */
};

enum vblk_backend {
	VBLK_BACKEND_FILE,
	VBLK_BACKEND_RAM,
	VBLK_BACKEND_NULL,
};

struct vblk_dirty;

/*
 * The write-blocking gate of a storage migration (mirror.c, copy-mode
 * "write-blocking"). While `on`, a request that changed the disk is
 * returned to the guest only once the destination acknowledged a round
 * that began after the request marked its blocks dirty: both copies have
 * it. Lives as long as the daemon; every field is an atomic.
 *
 * Why a round that *began* after the mark: the copier clears a block's bit
 * before it reads the block (dirty.c), so a take that starts after the
 * mark finds the bit, or found it cleared by an earlier take that read the
 * block after the write landed. The queue thread marks, then reads begun;
 * the copier raises begun, then takes: with a SEQ_CST fence between the
 * two steps on each side, at least one of them sees the other's first
 * step, so a request that read begun = k is on the destination once round
 * k + 1 is acknowledged.
 */
struct vblk_wgate {
	bool on;	/* the mirror (copier, return and control threads) sets it */
	bool idle;	/* the copier waits for dirty blocks: a holding queue kicks it */
	uint64_t begun; /* rounds whose takes began (copier) */
	uint64_t acked; /* rounds the destination acknowledged (return thread) */
	int kick_fd;	/* eventfd the idle copier polls; valid once on was set */
	bool kick_made; /* control thread: kick_fd exists (kept for the daemon's life) */
	uint64_t held;	/* requests held so far, all queues (statistics) */
};

/*
 * Post-copy storage on the destination (postcopy.c): the granules that are
 * not here yet. While `active`, a request that touches a missing granule
 * is held by its queue thread, which asks for the granules (sets their
 * `wanted` bits unless `asked` has them, and kicks want_fd); the receiver
 * writes a granule only while its bit is set, clears the bit once the data
 * landed, then raises `gen` and wakes the queues if any holds a request.
 * A queue counts itself in `waiting`, then looks at the bits; the receiver
 * clears bits, then reads `waiting` (SEQ_CST on both sides): a request is
 * never left waiting for a wake-up that already went by.
 *
 * Made by the control thread or the receiver before `active` is set
 * (RELEASE); the arrays live as long as the daemon, since queue threads
 * read them without a lock. Every field is an atomic.
 */
struct vblk_pcmap {
	bool active;	   /* the bits below are valid; off again once the disk is whole */
	uint64_t *missing; /* bit per granule: not here yet (the state file's mapping) */
	uint64_t *wanted;  /* a queue needs it: for the requester to ask */
	uint64_t *asked;   /* asked for on the current connection */
	uint64_t nbits, nwords;
	unsigned shift;	  /* log2(granularity) */
	uint64_t gen;	  /* raised after bits were cleared, or asked was reset */
	uint32_t waiting; /* requests held, all queues */
	int want_fd;	  /* eventfd: wakes the requester */
	uint64_t held;	  /* requests held so far (statistics) */
};

struct vblk_disk {
	enum vblk_backend backend;
	int fd;	       /* the image file or the RAM disk's memfd; -1 for null */
	uint8_t *ram;  /* RAM disk mapping, NULL otherwise */
	uint64_t size; /* bytes, a multiple of 512 */
	bool read_only;
	bool read_zeroes; /* null: reads fill the buffer with zeros */
	bool inline_io;	  /* file on tmpfs/ramfs: preadv/pwritev on the queue thread */
	int lock_fd;	  /* the image's OFD lock is on this fd (see lock_image); -1: none */
	bool is_blkdev;	  /* a block device, not a regular file */
	bool direct;	  /* opened O_DIRECT (--cache none): see vblk_disk_probe */
	/*
	 * Geometry, from vblk_disk_probe. block_size is the logical block size
	 * the guest is told (virtio-blk blk_size) and every request must be
	 * aligned to, in offset and length. With direct, a guest buffer is used
	 * as it is only if each iovec starts at a multiple of mem_align and is a
	 * multiple of block_size long; otherwise the request is bounced.
	 */
	uint32_t block_size;
	uint32_t mem_align;
	uint32_t physical_block_size;	   /* >= block_size */
	uint32_t min_io_size, opt_io_size; /* bytes; 0: not known */
	char serial[VBLK_SERIAL_LEN];
	/* Dirty-block tracking (dirty.c), NULL while off. Written by the
	 * control thread, read by queue threads (atomics; see dirty.c for
	 * when it may be freed). */
	struct vblk_dirty *dirty;
	struct vblk_wgate gate;
	struct vblk_pcmap pc;
	/* The source of a post-copy storage migration switched: the disk is
	 * the destination's now, and no queue may start here again (atomic;
	 * the copier sets it, queue_start reads it). */
	bool handed_over;
};

/*
 * Dirty-block bitmap (dirty.c). The default granularity is 64 KiB, as
 * QEMU's mirror job's: a 1 TiB disk needs a 2 MiB bitmap, and a 4 KiB write
 * costs the copier at most 64 KiB, where 4 KiB granules would need a 32 MiB
 * bitmap and 16 times the words to scan and take for a sequential writer.
 */
#define VBLK_DIRTY_DEFAULT_GRANULARITY (64u << 10)
#define VBLK_DIRTY_MIN_GRANULARITY 4096u
#define VBLK_DIRTY_MAX_GRANULARITY (64u << 20)

struct vblk_dirty {
	uint64_t *words; /* bit b: bytes [b, b + 1) * granularity; atomics */
	uint64_t nbits;	 /* granules, the last one maybe partly past the disk */
	uint64_t nwords;
	uint64_t disk_size; /* bytes */
	uint32_t granularity;
	unsigned shift; /* log2(granularity) */
	/* The rest: control thread only, but for cursor: the one taker's (the
	 * RPC's dirty_bitmap_take, or a mirror's copier thread). */
	uint64_t cursor;	     /* the word the next take starts at */
	uint64_t start_ns;	     /* when tracking started */
	uint64_t base_bits;	     /* sum of the queues' dirtied_bits at start */
	uint64_t rate_ns, rate_bits; /* the start of the dirty-rate window */
	uint64_t rate_bytes_per_s;   /* as of the last window */
};

struct vblk_extent {
	uint64_t offset, length; /* bytes */
};

struct vblk_dirty_info {
	bool active;
	uint32_t granularity;
	uint64_t total;		   /* bytes of the disk */
	uint64_t dirty;		   /* bytes dirty now (granules, the last clipped) */
	uint64_t dirtied;	   /* bytes newly made dirty since start */
	uint64_t rate_bytes_per_s; /* of newly dirty bytes */
	uint64_t active_ms;
};

/*
 * Bounce buffers of one queue, for guest buffers that O_DIRECT cannot take:
 * VBLK_BOUNCE_SLOTS buffers of VBLK_BOUNCE_BYTES, aligned for any device,
 * allocated once when the queue is first set up for a direct disk. A request
 * holds at most one slot and moves its data through it chunk by chunk;
 * requests that find no free slot wait, in ring order, for one. Queue thread
 * only.
 */
struct vblk_bounce_pool {
	uint8_t *mem;	    /* VBLK_BOUNCE_SLOTS * VBLK_BOUNCE_BYTES; NULL: none */
	uint32_t free_mask; /* bit i: slot i is free */
	uint16_t *waiters;  /* heads waiting for a slot, a ring of alloc_num */
	uint16_t wait_head; /* index of the oldest waiter */
	uint16_t nwaiting;
};

struct vblk_req;

struct vblk_queue {
	struct vblk_disk *disk;
	struct vhost_vring *vr;
	unsigned idx;
	pthread_t thread;
	bool running;
	int stop_fd;	     /* eventfd: the control thread asks the queue to stop */
	bool stop_requested; /* set (atomic) before stop_fd is written: ends polling */
	/* Busy-poll window after the last work, ns; 0: sleep at once. Written
	 * by the control thread, read by the queue thread (relaxed atomics). */
	uint64_t poll_ns;
	/* Added latency of reads and of the other requests, ns; 0: none.
	 * Written by the control thread, read by the queue thread (relaxed
	 * atomics). */
	uint64_t read_latency_ns, write_latency_ns;
	struct io_uring ring;
	struct vblk_req *reqs; /* one per head: a head is in flight at most once */
	unsigned ndelayed;     /* requests waiting or held for the latency */
	unsigned nmirror;      /* requests held by the write-blocking gate */
	uint64_t mirror_seen;  /* disk->gate.acked when they were last looked at */
	unsigned npc;	       /* requests held for missing granules (post-copy) */
	uint64_t pc_seen;      /* disk->pc.gen when they were last looked at */
	/* The queue stopped with requests held for missing granules: they
	 * stay in flight in the in-flight region, and the next start redoes
	 * them from it (queue thread sets, control thread reads after join). */
	bool pc_left;
	/* eventfd: the mirror's return thread says a round was acknowledged.
	 * Created by the first queue_start, kept for the daemon's life (so the
	 * return thread never writes to a closed fd); -1: none yet. Atomic:
	 * the control thread sets it, the return thread reads it. */
	int wake_fd;
	uint64_t wake_buf;
	uint64_t wake_ns;      /* when the first of them is due; 0: none */
	/* Requests taken from the ring and not yet returned to the guest, as
	 * of the queue thread's last pass (relaxed atomic; 0 when stopped). */
	uint32_t inflight_now;
	/* Of those, the ones held for the latency (vmig_blk_set_latency):
	 * waiting to start or to be returned; same pass, relaxed atomic. */
	uint32_t delayed_now;
	/* The same pass's view of the ring and the io_uring, for the control
	 * socket: the next avail entry to take, the used index published, and
	 * I/O operations waiting for the kernel (relaxed atomics; a sleeping
	 * queue's last pass). With the guest's own avail index next to them,
	 * a stalled queue shows where it stalled. */
	uint16_t last_avail_now, used_now;
	uint32_t outstanding_now;
	struct iovec *iov_pool;
	uint64_t *gpa_pool;
	uint16_t alloc_num;
	uint32_t outstanding; /* requests waiting for io_uring */
	uint64_t kick_buf;
	uint64_t stop_buf;
	bool warned_broken;
	bool broken;		/* the guest broke the ring (relaxed atomic; until restart) */
	struct vblk_bounce_pool bounce;
	bool no_uring_discard; /* the kernel cannot discard through io_uring */
	/* Requests that went through a bounce buffer since the daemon started
	 * (relaxed atomic; queue thread writes). Not in struct vblk_stats,
	 * whose layout is part of the live-upgrade state. */
	uint64_t bounced;
	uint64_t logged_starts; /* control thread: recovery already logged */
	/* Up while the queue thread may use disk->dirty (SEQ_CST; dirty.c). */
	bool dirty_busy;
	/* Dirty bits this queue turned from 0 to 1 since the daemon started
	 * (relaxed atomic; queue thread writes, control thread reads). */
	uint64_t dirtied_bits;
	struct vblk_stats stats;
};

struct vblk_opts {
	const char *socket;
	const char *file;
	const char *rpc;
	const char *serial;
	const char *upgrade_binary; /* --upgrade-binary; default: our executable */
	uint64_t ram_size;
	uint64_t null_size;
	uint64_t size;
	uint32_t poll_us;
	uint32_t wb_stall_ms; /* --write-blocking-stall-ms */
	unsigned queues;
	bool read_only;
	bool read_zeroes;
	bool quiet;
	bool no_lock; /* --no-lock: no OFD lock on the image (shared storage) */
	bool cache_none; /* --cache none: O_DIRECT; default --cache writeback */
	const char *incoming;	    /* --incoming URI: receive the disk first (incoming.c) */
	const char *postcopy_state; /* --postcopy-state FILE (mirror.c, incoming.c) */
	const char *tls_creds, *tls_hostname, *tls_authz; /* the storage stream's TLS */
};

struct vblk_rpc_client {
	int fd;
	size_t len;
	struct vmig__json_splitter sp; /* where the next request ends in buf */
	char buf[65536];
};

/* Which file a socket path named when we bound it. */
struct vblk_sock_id {
	bool valid;
	dev_t dev;
	ino_t ino;
};

struct vblk_daemon {
	struct vblk_opts opts;
	char rpc_path[108];
	char exe[4096];		   /* our binary at start (/proc/self/exe) */
	char upgrade_binary[4096]; /* the only binary an upgrade runs */
	char **argv;
	struct vblk_disk disk;
	char disk_err[512]; /* why vblk_disk_open failed, if it says; "" if not */
	unsigned nqueues;
	struct vblk_queue q[VHOST_MAX_QUEUES];
	struct vhost_dev dev;
	int listen_fd;
	int conn_fd;
	int rpc_fd;
	struct vblk_sock_id sock_id, rpc_id; /* the socket files we created */
	int signal_fd;
	struct vblk_rpc_client *clients[VBLK_MAX_RPC_CLIENTS];
	uint64_t connections; /* vhost-user connections accepted, across upgrades */
	uint64_t upgrades;
	uint32_t poll_us; /* current busy-poll window (--poll-us, or set by RPC) */
	uint32_t read_latency_us, write_latency_us; /* added latency (set by RPC) */
	bool stop;
	/* Storage migration (mirror.c, incoming.c): the source's mirror, the destination's
	 * receiver; control thread. */
	struct vblk_mirror *mirror;
	struct vblk_incoming *incoming;
	struct vmig__tls *tls; /* NULL: plain; set at start, read-only after */
};

/* blk.c: the device */
uint64_t vblk_device_features(const struct vblk_disk *disk, unsigned nqueues);
extern const struct vhost_dev_ops vblk_dev_ops;
void vblk_queue_init(struct vblk_queue *q, struct vblk_disk *disk, unsigned idx);
void vblk_queue_free(struct vblk_queue *q);
/* Change the busy-poll window of a queue (control thread, any time). */
void vblk_queue_set_poll(struct vblk_queue *q, uint32_t poll_us);
/*
 * Add latency to every request the queue takes from the ring from now on:
 * read_us to reads (and GET_ID), write_us to the others (writes, flushes,
 * discards, write-zeroes). A delayed request's I/O is issued half its
 * latency after the request was taken, and the request is returned to the
 * guest no earlier than all of it after. Like SPDK's delay bdev or null_blk's
 * completion_nsec, it emulates a slower disk; and it lets a test be sure
 * that requests are in flight when it kills the daemon, some before their
 * I/O and some after it, as on a real disk where a write lands somewhere
 * within its latency. 0 removes the delay, also from requests already
 * delayed. A stopping queue starts and returns every delayed request at
 * once.
 */
void vblk_queue_set_latency(struct vblk_queue *q, uint32_t read_us, uint32_t write_us);
/* Requests taken from the ring and not yet returned (control thread). */
uint32_t vblk_queue_inflight(const struct vblk_queue *q);
/* Of those, the ones held for the latency (control thread). */
uint32_t vblk_queue_delayed(const struct vblk_queue *q);
/* Wake every queue's thread (any thread): it looks at its held requests
 * again. */
void vblk_wake_queues(struct vblk_daemon *dm);
/* Where the queue's ring stands (control thread): see vblk_queue. */
struct vblk_ring_view {
	bool valid;	     /* a started split ring */
	uint16_t avail_idx;  /* the guest's: entries it posted */
	uint16_t last_avail; /* ours: entries taken */
	uint16_t used_idx;   /* ours: entries returned and published */
	uint16_t used_event; /* the guest's (EVENT_IDX): when it wants a call */
	bool event_idx;
	uint32_t io_outstanding;
};
void vblk_queue_ring_view(const struct vblk_queue *q, struct vblk_ring_view *v);
/* Stats of one queue, read from the control thread. */
void vblk_stats_read(const struct vblk_queue *q, struct vblk_stats *out);

/* bounce.c: bounce buffers and iovec helpers for O_DIRECT */
int vblk_bounce_alloc(struct vblk_bounce_pool *p, uint16_t num);
void vblk_bounce_free(struct vblk_bounce_pool *p);
/* A free slot's buffer, or NULL if all are taken. */
uint8_t *vblk_bounce_get(struct vblk_bounce_pool *p);
void vblk_bounce_put(struct vblk_bounce_pool *p, uint8_t *buf);
/* Can O_DIRECT take these iovecs as they are? */
bool vblk_iov_direct_ok(const struct iovec *iov, unsigned n, uint32_t mem_align,
			uint32_t len_align);
/* Copy len bytes between iov[0..n), from byte skip on, and buf. */
void vblk_iov_to_buf(const struct iovec *iov, unsigned n, uint64_t skip, uint8_t *buf, size_t len);
void vblk_iov_from_buf(const struct iovec *iov, unsigned n, uint64_t skip, const uint8_t *buf,
		       size_t len);

/* disk.c */
/*
 * Fill in the geometry of disk (block_size, mem_align, physical block and
 * I/O sizes) from its open fd: a block device's logical block size
 * (BLKSSZGET) and topology, a direct file's statx DIO alignment, else 512.
 * 0, or -errno with the reason in err (a block size we cannot serve).
 */
int vblk_disk_probe(struct vblk_disk *disk, char *err, size_t errlen);

/* dirty.c: the bitmap itself (any thread, see dirty.c) */
/* A bitmap for disk_size bytes; granularity a power of two in
 * [VBLK_DIRTY_MIN_GRANULARITY, VBLK_DIRTY_MAX_GRANULARITY]. 0 or -errno. */
int vblk_dirty_new(uint64_t disk_size, uint32_t granularity, bool all_dirty,
		   struct vblk_dirty **out);
void vblk_dirty_free(struct vblk_dirty *d);
/* Set the bits of [offset, offset + len) (clipped to the disk); returns how
 * many were newly set. */
uint64_t vblk_dirty_mark(struct vblk_dirty *d, uint64_t offset, uint64_t len);
/* Clear the bits of [offset, offset + len) (clipped to the disk). */
void vblk_dirty_clear(struct vblk_dirty *d, uint64_t offset, uint64_t len);
/* Dirty bytes now (a snapshot: bits may change meanwhile). */
uint64_t vblk_dirty_bytes(const struct vblk_dirty *d);
/* Clear and return up to max_bytes (at least one granule) of dirty extents,
 * at most max_ext of them: disjoint, in disk order from where the previous
 * take stopped, wrapping around to the start of the disk at most once.
 * Returns the number of extents; *taken_bytes their total. One taker at a
 * time (the control thread). */
size_t vblk_dirty_take(struct vblk_dirty *d, uint64_t max_bytes, struct vblk_extent *ext,
		       size_t max_ext, uint64_t *taken_bytes);
/* Queue thread: a request changed [offset, offset + len); call once its
 * I/O has completed, before the guest sees it. */
void vblk_queue_mark_dirty(struct vblk_queue *q, uint64_t offset, uint64_t len);
/* Control thread: start tracking (-EBUSY: already on; -EINVAL: bad
 * granularity, or smaller than the disk's block size), stop it, and read
 * its counters (also when off: active false). */
int vblk_dirty_start(struct vblk_daemon *dm, uint32_t granularity, bool all_dirty);
void vblk_dirty_stop(struct vblk_daemon *dm);
void vblk_dirty_query(struct vblk_daemon *dm, struct vblk_dirty_info *info);

/* rpc.c */
/* The RPC socket, owner-only (0600); clients are checked at accept. */
int vblk_rpc_listen(struct vblk_daemon *dm, char *err, size_t errlen);
void vblk_rpc_accept(struct vblk_daemon *dm);
/* Handle input on client slot i; closes it on EOF or error. */
void vblk_rpc_client_input(struct vblk_daemon *dm, int i);
/* Send a JSON-RPC result or error on a raw fd (used after an upgrade). */
int vblk_rpc_send(int fd, const char *id_json, const char *result_json, int code,
		  const char *message);
int vblk_rpc_cli(int argc, char **argv);
int vblk_upgrade_cli(int argc, char **argv);

/* upgrade.c */
/* Exec dm->upgrade_binary with every connection kept, once it passed the
 * ownership checks. On success it does not return: the new process replies
 * on reply_fd. On failure serving resumes here and the error is returned
 * (text in err). */
int vblk_upgrade(struct vblk_daemon *dm, int reply_fd, const char *id_json, char *err,
		 size_t errlen);
/* In a process started by an upgrade: take the state over. 1 if there was
 * an upgrade to resume, 0 if not, -errno on failure. */
int vblk_upgrade_resume(struct vblk_daemon *dm);

/* main.c */
void vblk_log(const struct vblk_daemon *dm, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
int vblk_disk_open(struct vblk_daemon *dm, int inherited_fd, int inherited_lock_fd);
/* Bound the time a vhost-user connection may block the control thread. */
void vblk_conn_setup(int fd);
/*
 * Listening unix socket at path, with the file mode given (0: as the umask
 * says). An existing path is replaced only if it is a socket that no
 * process listens on (checked by connecting to it); anything else is
 * refused with the reason in err. fd or -errno; *id names the file made.
 */
int vblk_listen_unix(const char *path, mode_t mode, struct vblk_sock_id *id, char *err,
		     size_t errlen);
/* Remove the socket file at path if it is still the one id names. */
void vblk_unlink_socket(const char *path, const struct vblk_sock_id *id);
void vblk_sock_id_of(const char *path, struct vblk_sock_id *id);

#endif
