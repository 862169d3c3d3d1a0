/* SPDX-License-Identifier: MIT */
/*
 * Storage migration between two vmig-blk daemons, mirror mode
 * (docs/storage-migration.md): the source's copier sends the disk and then
 * the blocks the guest dirtied, round after round, over the storage stream
 * (sstream.h); the destination's receiver writes them to its own disk and
 * holds its guest's requests until the source's last round arrived.
 *
 * Every function here runs on the control thread (the RPC handlers, the
 * vhost-user message handlers and the main loop).
 */
#ifndef VMIG_BLK_MIRROR_H
#define VMIG_BLK_MIRROR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vblk_daemon;
struct vhost_dev_ops;

/*
 * TLS of the storage stream, from --tls-creds TYPE,dir=DIR,endpoint=E
 * [,username=U][,verify-peer=on|off] (TYPE x509 or psk, as QEMU's
 * tls-creds-x509 / tls-creds-psk objects), --tls-hostname (the name the
 * destination's certificate must carry; default the URI's host) and
 * --tls-authz (the one client identity a destination lets in). A
 * destination (--incoming) needs endpoint=server, a source endpoint=client.
 * 0, or -errno with err set. NULL spec: plain streams.
 */
int vblk_storage_tls(struct vblk_daemon *dm, const char *spec, const char *hostname,
		     const char *authz, char *err, size_t errlen);
void vblk_storage_tls_free(struct vblk_daemon *dm);

/* What vmig_blk_mirror_query reports, with query-block-jobs' names. */
struct vblk_mirror_info {
	bool exists;	     /* a mirror was started (and not dismissed by a new one) */
	const char *status;  /* "running", "ready" or "concluded" */
	bool ready;	     /* the first pass is on the destination */
	bool completing;     /* vmig_blk_mirror_complete asked for the last round */
	uint64_t len;	     /* offset + remaining */
	uint64_t offset;     /* bytes sent (DATA and ZERO ranges) */
	uint64_t remaining;  /* dirty, or sent but not acknowledged */
	uint64_t speed;	     /* bytes/s limit, 0: none */
	uint64_t dirty_rate; /* bytes/s the guest dirties */
	uint64_t rounds;     /* rounds the destination acknowledged */
	bool write_blocking; /* copy-mode: "write-blocking" (else "background") */
	/* Write-blocking, and every block dirty when the gate went on is on
	 * the destination: from here on, both copies have every write the
	 * guest saw complete (QEMU's actively-synced). */
	bool actively_synced;
	uint64_t held_writes; /* requests the gate held, since the daemon started */
	bool postcopy;	      /* switched to post-copy: the destination serves the guest */
	/* the destination answered a resumed post-copy (this mirror's, or the
	 * one it resumed) that it never took the switch, and the disk is this
	 * host's again (postcopy is false): its guest may start */
	bool postcopy_not_taken;
	uint64_t urgent_bytes; /* post-copy: bytes sent because the destination asked */
	char error[256];     /* concluded: why it failed; "" if it did not */
	char uri[160];
};

/*
 * Start copying the disk to the vmig-blk listening at uri (tcp:HOST:PORT or
 * unix:PATH). Dirty tracking must be off, or left on by a mirror that
 * failed: then the new one resumes from that bitmap (what the old one had
 * sent and the destination had not acknowledged is dirty again).
 * granularity 0: the default. write_blocking: once the first pass is on
 * the destination, every guest write completes only when the destination
 * has it (QEMU's copy-mode "write-blocking"; else "background"), so a
 * guest that writes faster than the copy still converges. 0, or -errno
 * with err set.
 */
int vblk_mirror_start(struct vblk_daemon *dm, const char *uri, uint32_t granularity, uint64_t speed,
		      bool write_blocking, char *err, size_t errlen);
/* Change the copy-mode of a running mirror (QEMU's block-job-change). */
int vblk_mirror_change(struct vblk_daemon *dm, bool write_blocking, char *err, size_t errlen);
/* The last round: only once the guest can no longer write (every queue
 * stopped, as QEMU does when the VM stops for switch-over). */
int vblk_mirror_complete(struct vblk_daemon *dm, char *err, size_t errlen);
/* Post-copy storage (QEMU's migrate-start-postcopy, for the disk): once
 * the guest can no longer write here, hand the disk to the destination
 * now; what it lacks follows, what its guest asks for first. After it no
 * queue starts here again. A mirror that fails in post-copy is resumed
 * in post-copy by the next vblk_mirror_start. */
int vblk_mirror_start_postcopy(struct vblk_daemon *dm, char *err, size_t errlen);
/* Stop copying; the disk stays served here. Tracking goes off. Refused in
 * post-copy. */
int vblk_mirror_cancel(struct vblk_daemon *dm, char *err, size_t errlen);
int vblk_mirror_set_speed(struct vblk_daemon *dm, uint64_t speed, char *err, size_t errlen);
void vblk_mirror_query(struct vblk_daemon *dm, struct vblk_mirror_info *info);
/* A mirror owns the dirty bitmap: nobody else may take from or stop it. */
bool vblk_mirror_active(const struct vblk_daemon *dm);
void vblk_mirror_free(struct vblk_daemon *dm);

/* What vmig_blk_incoming_query reports. */
struct vblk_incoming_info {
	bool exists;
	/* "listening", "receiving", "postcopy-active" (the guest is served
	 * here, the source connected), "postcopy-paused" (the same, waiting
	 * for the source to resume) or "completed" */
	const char *status;
	uint64_t received;  /* bytes of DATA and ZERO applied */
	uint64_t rounds;    /* rounds acknowledged */
	uint64_t connections;
	int port;	 /* tcp: the port listened on */
	bool postcopy_capable;	/* a post-copy can keep its state here (a state file) */
	bool postcopy;		/* the switch happened: the guest may be served here */
	uint64_t missing;	/* post-copy: bytes not here yet */
	uint64_t urgent;	/* post-copy: READ_REQ records sent */
	uint64_t held_requests; /* post-copy: guest requests that waited for blocks */
	char error[256]; /* why the last connection ended early; "" if none did */
};

/*
 * The destination: listen on uri for the source's storage stream, and hold
 * every queue the front-end starts until the stream ended with EOS (so no
 * guest request sees a block before its last copy arrived). The ops to
 * give vhost_dev_init while incoming.
 */
int vblk_incoming_start(struct vblk_daemon *dm, const char *uri, char *err, size_t errlen);
extern const struct vhost_dev_ops vblk_incoming_ops;
/* An fd for the main loop's poll: readable when the stream completed. */
int vblk_incoming_fd(const struct vblk_daemon *dm);
/* Readable: start the queues that were held. */
void vblk_incoming_event(struct vblk_daemon *dm);
void vblk_incoming_query(struct vblk_daemon *dm, struct vblk_incoming_info *info);
/* After the queues stopped: they read the post-copy map. */
void vblk_incoming_free(struct vblk_daemon *dm);
/*
 * At start, the disk open: its post-copy state file (--postcopy-state, or
 * the image's name + .vmig-postcopy), if any. A destination's (the image
 * is not whole) is refused without --incoming, which resumes it; a
 * source's (the disk was handed over) is refused with --incoming, and
 * otherwise fences this daemon (no queue starts) and leaves a failed
 * post-copy mirror that vblk_mirror_start resumes. 0, or -errno with err.
 */
int vblk_postcopy_state_check(struct vblk_daemon *dm, char *err, size_t len);
/* Can a post-copy keep its state for this disk (a state file, or RAM)? */
bool vblk_postcopy_capable(const struct vblk_daemon *dm);
struct vblk_pcmap;
void vblk_pcmap_free(struct vblk_pcmap *pc);

#endif
