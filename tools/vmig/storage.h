/* SPDX-License-Identifier: MIT */
/*
 * vmig migrate --storage-*: the disk of a vmig-blk moves with the VM, by
 * the two daemons' mirror (docs/storage-migration.md), driven over their
 * JSON-RPC control sockets.
 */
#ifndef VMIG_TOOL_STORAGE_H
#define VMIG_TOOL_STORAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct storage {
	const char *src_rpc, *dst_rpc, *uri, *mode; /* from the command line */
	uint64_t speed;				    /* bytes/s, 0: no limit */
	/* from the last poll */
	char status[16]; /* running, ready, concluded */
	bool ready;
	uint64_t len, offset, remaining, dirty_rate;
	uint64_t t0_ms, last_ms, last_offset;
	double rate; /* bytes/s sent, over the last poll interval */
	/* recovery: the mirror stopped (a daemon restarted, the link broke) */
	uint64_t broken_ms; /* since when; 0: it runs */
	uint64_t retry_ms;  /* the last restart tried */
	unsigned restarts;  /* restarts that worked */
	/* convergence: in mirror mode, a backlog that stays above what the
	 * copy clears in a moment switches the mirror to write-blocking */
	bool write_blocking; /* the copy-mode asked for (or switched to) */
	bool switched;	     /* switched to it because the guest outwrote the copy */
	double peak_rate;    /* the best copy rate seen, bytes/s */
	uint64_t behind_ms;  /* since when the backlog stays above it; 0: it does not */
	/* post-copy storage (--storage-mode postcopy) */
	bool postcopy;		  /* the mode asked for */
	bool handed_over;	  /* the switch went out: the destination owns the disk */
	bool not_taken;		  /* ... but the destination never took it: back here */
	uint64_t requested_bytes; /* sent because the destination asked */
};

/* 0 if the options go together; else says why on stderr. */
int storage_check(const struct storage *st);
/* Check the destination waits for the disk, start the mirror, and wait
 * (showing progress) until its first pass is on the destination. */
int storage_start(struct storage *st, bool tty);
/* Query the mirror: 0 while it runs or is being restarted (a daemon
 * restarted, the link broke: it resumes from the source's bitmap, or
 * starts over if that is gone), -1 once it could not be restarted within
 * a minute (said). In mirror mode, a mirror whose backlog does not come
 * down (the guest writes faster than the copy) is switched to
 * write-blocking here (said). */
int storage_poll(struct storage *st);
/* One progress line's worth: "disk 45% 120.0 MiB/s dirty 1.0 MiB/s". */
void storage_progress(const struct storage *st, char *buf, size_t len);
/* The VM is stopped for switch-over: the last round (post-copy: the
 * switch). 0 once the destination has the whole disk (post-copy: owns
 * it); else -1 (said). */
int storage_complete(struct storage *st);
/* Post-copy, the RAM migration done: wait (showing progress, resuming
 * the copy after faults) until the destination has every block. 0, or -1
 * (said: the destination's guest waits for the blocks still missing). */
int storage_finish(struct storage *st, bool tty);
/* The migration failed: stop copying; the source's disk serves on (not
 * after a post-copy switch: then it says where the disk is). */
void storage_cancel(struct storage *st);

#endif
