// SPDX-License-Identifier: MIT
/*
 * Command-argument checking for QMP.
 *
 * Threat model: every byte comes from a QMP client, which may be hostile or
 * simply broken. Argument checking rejects undeclared members and wrong types before any
 * command handler runs, so handlers see only the shapes they declared.
 */
#include <errno.h>
#include <string.h>

#include "json_util.h"

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
