/* SPDX-License-Identifier: MIT */
/*
 * JSON helpers for the QMP server: table-driven checking of command
 * arguments. Where each request ends in the byte stream is found by
 * lib/util/json_split.h.
 */
#ifndef VMIG_VM_JSON_UTIL_H
#define VMIG_VM_JSON_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "util/json_split.h"
#include "util/util.h"

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
