/* SPDX-License-Identifier: MIT */
/*
 * JSON helpers for the QMP server (and the vmig client): a splitter that finds
 * where one top-level JSON item ends in a byte stream, so several objects per
 * read and objects split across reads both work, and table-driven checking of
 * command arguments. The JSON itself is parsed by jansson; the splitter only
 * tracks string state and bracket depth to find item boundaries.
 */
#ifndef VMIG_VM_JSON_UTIL_H
#define VMIG_VM_JSON_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "util/util.h"

/* Deeper nesting than this is refused without being parsed. */
#define JSON_SPLIT_MAX_DEPTH 1024

enum json_item_kind {
	JSON_ITEM_CONTAINER = 1, /* a balanced {...} or [...] */
	JSON_ITEM_SCALAR,	 /* a top-level token that is not a container */
	JSON_ITEM_TOO_DEEP,	 /* balanced, but nested beyond the limit */
	JSON_ITEM_STRAY_CLOSER,	 /* a '}' or ']' with nothing open */
};

/*
 * Incremental splitter state. The caller keeps the bytes; the splitter keeps
 * only its scan position, so feeding more bytes never rescans old ones.
 */
struct json_splitter {
	size_t pos;   /* next byte to scan, relative to the caller's buffer */
	size_t start; /* where the current item starts */
	unsigned depth;
	unsigned max_depth_seen;
	bool in_item;
	bool scalar;
	bool in_string;
	bool escape;
};

void json_splitter_init(struct json_splitter *sp);
/*
 * Scan buf[0, len). Returns true when an item is complete: it is
 * buf[*item_start, *item_end) and *kind says what it is. Returns false when
 * more input is needed; *item_start is then the first byte the caller must
 * keep (bytes before it are whitespace and may be dropped).
 */
bool json_splitter_next(struct json_splitter *sp, const char *buf, size_t len, size_t *item_start,
			size_t *item_end, enum json_item_kind *kind);
/* The caller dropped the first n bytes of its buffer. */
void json_splitter_consumed(struct json_splitter *sp, size_t n);

/* Argument types a command may declare. */
enum json_arg_type {
	JA_STR = 1,
	JA_INT,	 /* integer (int64) */
	JA_UINT, /* integer >= 0 */
	JA_BOOL,
	JA_NUMBER, /* integer or real */
	JA_ARRAY,
	JA_OBJECT,
	JA_ANY,
};

struct json_arg_spec {
	const char *name;
	enum json_arg_type type;
	bool required;
};

/*
 * Check args (an object or NULL) against a table ending with a NULL name:
 * every member must be declared and of its type, every required one
 * present. On failure returns -EINVAL with a QEMU-style text in err.
 */
int json_args_check(const json_t *args, const struct json_arg_spec *spec, struct vmig__err *err);

/* Lookups that assume json_args_check passed; they return def if absent. */
const char *json_arg_str(const json_t *args, const char *name, const char *def);
int64_t json_arg_int(const json_t *args, const char *name, int64_t def);
bool json_arg_bool(const json_t *args, const char *name, bool def);

/* Human name of an argument type, for error messages ("integer", ...). */
const char *json_arg_type_name(enum json_arg_type t);

#endif
