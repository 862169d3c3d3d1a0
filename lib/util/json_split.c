// SPDX-License-Identifier: MIT
/*
 * Where one top-level JSON item ends in a byte stream (json_split.h).
 *
 * Threat model: every byte comes from a client, which may be hostile or
 * simply broken. The splitter never reads outside buf[0, len), keeps O(1)
 * state whatever the input, and never recurses, so deep nesting cannot blow
 * the stack; items nested beyond VMIG_JSON_MAX_DEPTH are reported as such
 * and never handed to the parser. The caller bounds how many bytes it buffers.
 */
#include <string.h>

#include "json_split.h"

void vmig__json_splitter_init(struct vmig__json_splitter *sp)
{
	memset(sp, 0, sizeof(*sp));
}

static bool is_ws(char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

static bool is_bracket(char c)
{
	return c == '{' || c == '[' || c == '}' || c == ']';
}

/* Track string state; returns true if c was part of (or closed) a string. */
static bool string_step(struct vmig__json_splitter *sp, char c)
{
	if (!sp->in_string)
		return false;
	if (sp->escape)
		sp->escape = false;
	else if (c == '\\')
		sp->escape = true;
	else if (c == '"')
		sp->in_string = false;
	return true;
}

static void item_begin(struct vmig__json_splitter *sp, char c)
{
	sp->in_item = true;
	sp->start = sp->pos;
	sp->depth = 0;
	sp->max_depth_seen = 0;
	sp->in_string = false;
	sp->escape = false;
	sp->scalar = !(c == '{' || c == '[');
}

bool vmig__json_splitter_next(struct vmig__json_splitter *sp, const char *buf, size_t len,
			      size_t *item_start, size_t *item_end, enum vmig__json_item *kind)
{
	while (sp->pos < len) {
		char c = buf[sp->pos];

		if (!sp->in_item) {
			if (is_ws(c)) {
				sp->pos++;
				continue;
			}
			if (c == '}' || c == ']') {
				*item_start = sp->pos;
				*item_end = ++sp->pos;
				*kind = VMIG_JSON_STRAY_CLOSER;
				return true;
			}
			item_begin(sp, c);
		}
		if (string_step(sp, c)) {
			sp->pos++;
			continue;
		}
		if (sp->scalar) {
			/* A scalar ends before whitespace or a bracket. */
			if (sp->pos > sp->start && (is_ws(c) || is_bracket(c))) {
				*item_start = sp->start;
				*item_end = sp->pos;
				*kind = VMIG_JSON_SCALAR;
				sp->in_item = false;
				return true;
			}
			if (c == '"')
				sp->in_string = true;
			sp->pos++;
			continue;
		}
		sp->pos++;
		if (c == '"') {
			sp->in_string = true;
		} else if (c == '{' || c == '[') {
			sp->depth++;
			if (sp->depth > sp->max_depth_seen)
				sp->max_depth_seen = sp->depth;
		} else if (c == '}' || c == ']') {
			if (--sp->depth == 0) {
				*item_start = sp->start;
				*item_end = sp->pos;
				*kind = sp->max_depth_seen > VMIG_JSON_MAX_DEPTH
					    ? VMIG_JSON_TOO_DEEP
					    : VMIG_JSON_CONTAINER;
				sp->in_item = false;
				return true;
			}
		}
	}
	*item_start = sp->in_item ? sp->start : sp->pos;
	return false;
}

void vmig__json_splitter_consumed(struct vmig__json_splitter *sp, size_t n)
{
	sp->pos = sp->pos >= n ? sp->pos - n : 0;
	if (sp->in_item)
		sp->start = sp->start >= n ? sp->start - n : 0;
}
