/* SPDX-License-Identifier: MIT */
/*
 * A splitter that finds where one top-level JSON item ends in a byte
 * stream, so that several items in one read and an item split across reads
 * both work: the QMP server (vm/qmp.c) and vmig-blk's JSON-RPC socket frame
 * their requests with it. The JSON itself is parsed by jansson, and only
 * once the splitter has found the whole item: a parser handed a prefix
 * cannot tell a cut-off "true" or "1.5" from a wrong one. The splitter only
 * tracks string state and bracket depth.
 */
#ifndef VMIG_UTIL_JSON_SPLIT_H
#define VMIG_UTIL_JSON_SPLIT_H

#include <stdbool.h>
#include <stddef.h>

/* Deeper nesting than this is refused without being parsed. */
#define VMIG_JSON_MAX_DEPTH 1024

enum vmig__json_item {
	VMIG_JSON_CONTAINER = 1, /* a balanced {...} or [...] */
	VMIG_JSON_SCALAR,	 /* a top-level token that is not a container */
	VMIG_JSON_TOO_DEEP,	 /* balanced, but nested beyond the limit */
	VMIG_JSON_STRAY_CLOSER,	 /* a '}' or ']' with nothing open */
};

/*
 * Incremental splitter state. The caller keeps the bytes; the splitter keeps
 * only its scan position, so feeding more bytes never rescans old ones.
 */
struct vmig__json_splitter {
	size_t pos;   /* next byte to scan, relative to the caller's buffer */
	size_t start; /* where the current item starts */
	unsigned depth;
	unsigned max_depth_seen;
	bool in_item;
	bool scalar;
	bool in_string;
	bool escape;
};

void vmig__json_splitter_init(struct vmig__json_splitter *sp);
/*
 * Scan buf[0, len). Returns true when an item is complete: it is
 * buf[*item_start, *item_end) and *kind says what it is. Returns false when
 * more input is needed; *item_start is then the first byte the caller must
 * keep (bytes before it are whitespace and may be dropped).
 */
bool vmig__json_splitter_next(struct vmig__json_splitter *sp, const char *buf, size_t len,
			      size_t *item_start, size_t *item_end, enum vmig__json_item *kind);
/* The caller dropped the first n bytes of its buffer. */
void vmig__json_splitter_consumed(struct vmig__json_splitter *sp, size_t n);

#endif
