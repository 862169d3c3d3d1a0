// SPDX-License-Identifier: MIT
/*
 * JSON stream splitting and command-argument checking for QMP.
 *
 * Threat model: every byte comes from a QMP client, which may be hostile or
 * simply broken. The splitter never reads outside buf[0, len), keeps O(1)
 * state whatever the input, and never recurses, so deep nesting cannot blow
 * the stack; items nested beyond JSON_SPLIT_MAX_DEPTH are reported as such
 * and never handed to the parser. The caller bounds how many bytes it buffers.
 * Argument checking rejects undeclared members and wrong types before any
 * command handler runs, so handlers see only the shapes they declared.
 */
#include <errno.h>
#include <string.h>

#include "json_util.h"

void json_splitter_init(struct json_splitter *sp)
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
static bool string_step(struct json_splitter *sp, char c)
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

static void item_begin(struct json_splitter *sp, char c)
{
	sp->in_item = true;
	sp->start = sp->pos;
	sp->depth = 0;
	sp->max_depth_seen = 0;
	sp->in_string = false;
	sp->escape = false;
	sp->scalar = !(c == '{' || c == '[');
}

bool json_splitter_next(struct json_splitter *sp, const char *buf, size_t len, size_t *item_start,
			size_t *item_end, enum json_item_kind *kind)
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
				*kind = JSON_ITEM_STRAY_CLOSER;
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
				*kind = JSON_ITEM_SCALAR;
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
				*kind = sp->max_depth_seen > JSON_SPLIT_MAX_DEPTH
					    ? JSON_ITEM_TOO_DEEP
					    : JSON_ITEM_CONTAINER;
				sp->in_item = false;
				return true;
			}
		}
	}
	*item_start = sp->in_item ? sp->start : sp->pos;
	return false;
}

void json_splitter_consumed(struct json_splitter *sp, size_t n)
{
	sp->pos = sp->pos >= n ? sp->pos - n : 0;
	if (sp->in_item)
		sp->start = sp->start >= n ? sp->start - n : 0;
}

const char *json_arg_type_name(enum json_arg_type t)
{
	switch (t) {
	case JA_STR:
		return "string";
	case JA_INT:
	case JA_UINT:
		return "integer";
	case JA_BOOL:
		return "boolean";
	case JA_NUMBER:
		return "number";
	case JA_ARRAY:
		return "array";
	case JA_OBJECT:
		return "object";
	case JA_ANY:
		return "any";
	}
	return "?";
}

static bool type_ok(const json_t *v, enum json_arg_type t)
{
	switch (t) {
	case JA_STR:
		return json_is_string(v);
	case JA_INT:
		return json_is_integer(v);
	case JA_UINT:
		return json_is_integer(v) && json_integer_value(v) >= 0;
	case JA_BOOL:
		return json_is_boolean(v);
	case JA_NUMBER:
		return json_is_number(v);
	case JA_ARRAY:
		return json_is_array(v);
	case JA_OBJECT:
		return json_is_object(v);
	case JA_ANY:
		return true;
	}
	return false;
}

int json_args_check(const json_t *args, const struct json_arg_spec *spec, struct vmig__err *err)
{
	const char *key;
	json_t *val;
	const struct json_arg_spec *s;

	if (args && !json_is_object(args)) {
		vmig__err_set(err, "QMP input member 'arguments' must be an object");
		return -EINVAL;
	}
	if (args) {
		json_object_foreach((json_t *)args, key, val)
		{
			for (s = spec; s && s->name; s++)
				if (!strcmp(s->name, key))
					break;
			if (!s || !s->name) {
				vmig__err_set(err, "Parameter '%.200s' is unexpected", key);
				return -EINVAL;
			}
			if (!type_ok(val, s->type)) {
				vmig__err_set(err,
					      "Invalid parameter type for '%.200s', expected: %s%s",
					      key, json_arg_type_name(s->type),
					      s->type == JA_UINT ? " (>= 0)" : "");
				return -EINVAL;
			}
		}
	}
	for (s = spec; s && s->name; s++) {
		if (s->required && !(args && json_object_get(args, s->name))) {
			vmig__err_set(err, "Parameter '%s' is missing", s->name);
			return -EINVAL;
		}
	}
	return 0;
}

const char *json_arg_str(const json_t *args, const char *name, const char *def)
{
	const json_t *v = args ? json_object_get(args, name) : NULL;

	return json_is_string(v) ? json_string_value(v) : def;
}

int64_t json_arg_int(const json_t *args, const char *name, int64_t def)
{
	const json_t *v = args ? json_object_get(args, name) : NULL;

	return json_is_integer(v) ? (int64_t)json_integer_value(v) : def;
}

bool json_arg_bool(const json_t *args, const char *name, bool def)
{
	const json_t *v = args ? json_object_get(args, name) : NULL;

	return json_is_boolean(v) ? json_is_true(v) : def;
}
