// SPDX-License-Identifier: MIT
/*
 * The harness the QMP unit tests share: a detached server over the fake VM
 * (vm/qmp_fakevm.c) with one in-memory client, and helpers that feed it
 * requests and pick the replies apart. See qmp_harness.h.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "qmp_fakevm.h"
#include "qmp_harness.h"

int setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));

	fakevm_reset();
	assert_int_equal(qmp__server_new_detached(&f->srv, fakevm_vm()), 0);
	assert_int_equal(qmp__client_new_detached(f->srv, &f->c), 0);
	qmp__client_output_clear(f->c); /* greeting, checked separately */
	*state = f;
	return 0;
}

int teardown(void **state)
{
	struct fixture *f = *state;

	qmp_server_free(f->srv);
	free(f);
	return 0;
}

json_t *feed(struct fixture *f, const char *text)
{
	json_t *arr = json_array();
	const char *out, *p;
	size_t len;

	qmp__client_feed(f->c, text, strlen(text));
	qmp__server_flush_events(f->srv);
	out = qmp__client_output(f->c, &len);
	for (p = out; p < out + len;) {
		const char *eol = strstr(p, "\r\n");
		json_error_t e;
		json_t *v;

		assert_non_null(eol); /* every message ends with CRLF */
		v = json_loadb(p, (size_t)(eol - p), 0, &e);
		assert_non_null(v);
		json_array_append_new(arr, v);
		p = eol + 2;
	}
	qmp__client_output_clear(f->c);
	return arr;
}

json_t *one(struct fixture *f, const char *text)
{
	json_t *arr = feed(f, text);
	json_t *v = NULL, *m;
	size_t i;

	json_array_foreach(arr, i, m)
	{
		if (json_object_get(m, "event"))
			continue;
		assert_null(v);
		v = json_incref(m);
	}
	assert_non_null(v);
	json_decref(arr);
	return v;
}

void negotiate(struct fixture *f)
{
	json_t *r = one(f, "{\"execute\":\"qmp_capabilities\"}");

	assert_true(json_is_object(json_object_get(r, "return")));
	json_decref(r);
}

const char *err_class(const json_t *r)
{
	return json_string_value(json_object_get(json_object_get(r, "error"), "class"));
}

const char *err_desc(const json_t *r)
{
	return json_string_value(json_object_get(json_object_get(r, "error"), "desc"));
}

void expect_error(struct fixture *f, const char *text, const char *needle)
{
	json_t *r = one(f, text);

	assert_non_null(json_object_get(r, "error"));
	assert_string_equal(err_class(r), "GenericError");
	if (needle && !strstr(err_desc(r), needle))
		fail_msg("error '%s' lacks '%s'", err_desc(r), needle);
	json_decref(r);
}

json_t *ret_of(struct fixture *f, const char *text)
{
	json_t *r = one(f, text);
	json_t *ret = json_incref(json_object_get(r, "return"));

	if (!ret)
		fail_msg("no return for %s: %s", text, err_desc(r));
	json_decref(r);
	return ret;
}

char *hmp(struct fixture *f, const char *line)
{
	json_t *args = json_pack("{s:s,s:{s:s}}", "execute", "human-monitor-command", "arguments",
				 "command-line", line);
	char *req = json_dumps(args, 0), *text;
	json_t *ret = ret_of(f, req);

	assert_true(json_is_string(ret));
	text = strdup(json_string_value(ret));
	json_decref(ret);
	json_decref(args);
	free(req);
	return text;
}
