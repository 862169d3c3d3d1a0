// SPDX-License-Identifier: MIT
/*
 * Unit tests of the QMP server (vm/qmp*.c, vm/hmp.c, vm/json_util.c) over the
 * fake VM: framing, negotiation, every command's reply shape, errors for bad
 * input, events, the human monitor text, and the socket server itself.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmocka.h>

#include "qmp_fakevm.h"
#include "qmp_harness.h"
#include "qmp_int.h"

/* ---- splitter ---- */

static void test_splitter(void **state)
{
	const char *in = " {\"a\":\"}{\\\"\"} [1,[2]] 42\n} \"s p\" {";
	struct vmig__json_splitter sp;
	size_t s, e, len = strlen(in);
	enum vmig__json_item k;

	vmig__json_splitter_init(&sp);
	assert_true(vmig__json_splitter_next(&sp, in, len, &s, &e, &k));
	assert_int_equal(k, VMIG_JSON_CONTAINER);
	assert_int_equal(s, 1);
	assert_memory_equal(in + s, "{\"a\":\"}{\\\"\"}", e - s);
	assert_true(vmig__json_splitter_next(&sp, in, len, &s, &e, &k));
	assert_int_equal(k, VMIG_JSON_CONTAINER);
	assert_memory_equal(in + s, "[1,[2]]", e - s);
	assert_true(vmig__json_splitter_next(&sp, in, len, &s, &e, &k));
	assert_int_equal(k, VMIG_JSON_SCALAR);
	assert_memory_equal(in + s, "42", e - s);
	assert_true(vmig__json_splitter_next(&sp, in, len, &s, &e, &k));
	assert_int_equal(k, VMIG_JSON_STRAY_CLOSER);
	assert_true(vmig__json_splitter_next(&sp, in, len, &s, &e, &k));
	assert_int_equal(k, VMIG_JSON_SCALAR);
	assert_memory_equal(in + s, "\"s p\"", e - s);
	/* The last '{' is incomplete: more input needed, keep from it. */
	assert_false(vmig__json_splitter_next(&sp, in, len, &s, &e, &k));
	assert_int_equal(in[s], '{');
}

static void test_splitter_depth(void **state)
{
	char buf[2 * (VMIG_JSON_MAX_DEPTH + 1) + 1];
	struct vmig__json_splitter sp;
	size_t s, e;
	enum vmig__json_item k;

	memset(buf, '[', VMIG_JSON_MAX_DEPTH + 1);
	memset(buf + VMIG_JSON_MAX_DEPTH + 1, ']', VMIG_JSON_MAX_DEPTH + 1);
	buf[sizeof(buf) - 1] = '\0';
	vmig__json_splitter_init(&sp);
	assert_true(vmig__json_splitter_next(&sp, buf, strlen(buf), &s, &e, &k));
	assert_int_equal(k, VMIG_JSON_TOO_DEEP);
	assert_int_equal(e, strlen(buf));
}

/* ---- protocol ---- */

static void test_greeting(void **state)
{
	struct qmp_client *c;
	json_t *g, *v;
	const char *out;
	size_t len;

	fakevm_reset();
	struct fixture *f = *state;
	assert_int_equal(qmp__client_new_detached(f->srv, &c), 0);
	out = qmp__client_output(c, &len);
	assert_true(len > 2 && !strcmp(out + len - 2, "\r\n"));
	g = json_loadb(out, len - 2, 0, NULL);
	assert_non_null(g);
	v = json_object_get(json_object_get(g, "QMP"), "version");
	assert_int_equal(json_integer_value(json_object_get(json_object_get(v, "qemu"), "major")),
			 7);
	assert_non_null(strstr(json_string_value(json_object_get(v, "package")), "vmig"));
	assert_true(json_is_array(json_object_get(json_object_get(g, "QMP"), "capabilities")));
	json_decref(g);
	qmp__client_free(c);
}

static void test_negotiation(void **state)
{
	struct fixture *f = *state;
	json_t *r;

	r = one(f, "{\"execute\":\"query-status\",\"id\":\"x1\"}");
	assert_string_equal(err_class(r), "CommandNotFound");
	assert_string_equal(json_string_value(json_object_get(r, "id")), "x1");
	json_decref(r);
	expect_error(f, "{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}",
		     "oob");
	r = one(f, "{\"execute\":\"qmp_capabilities\",\"id\":{\"n\":[1]}}");
	assert_non_null(json_object_get(r, "return"));
	assert_int_equal(
	    json_integer_value(json_array_get(json_object_get(json_object_get(r, "id"), "n"), 0)),
	    1);
	json_decref(r);
	r = one(f, "{\"execute\":\"qmp_capabilities\"}");
	assert_string_equal(err_class(r), "CommandNotFound");
	json_decref(r);
}

static void test_split_and_batched(void **state)
{
	struct fixture *f = *state;
	const char *cmd = "{\"execute\":\"query-status\",\"id\":7}";
	json_t *arr;

	negotiate(f);
	/* One byte at a time: nothing until the last byte. */
	for (size_t i = 0; cmd[i + 1]; i++) {
		char b[2] = {cmd[i], 0};

		arr = feed(f, b);
		assert_int_equal(json_array_size(arr), 0);
		json_decref(arr);
	}
	arr = feed(f, "}");
	assert_int_equal(json_array_size(arr), 1);
	json_decref(arr);
	/* Three in one read, no separators, replies in order. */
	arr = feed(f, "{\"execute\":\"stop\",\"id\":1}{\"execute\":\"query-status\",\"id\":2}"
		      "{\"execute\":\"cont\",\"id\":3}");
	/* STOP event, stop's reply, status, RESUME event, cont's reply: a
	 * command's events precede its reply, as QEMU orders them. */
	assert_int_equal(json_array_size(arr), 5);
	assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 0), "event")),
			    "STOP");
	assert_int_equal(json_integer_value(json_object_get(json_array_get(arr, 1), "id")), 1);
	assert_false(json_is_true(
	    json_object_get(json_object_get(json_array_get(arr, 2), "return"), "running")));
	assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 3), "event")),
			    "RESUME");
	assert_int_equal(json_integer_value(json_object_get(json_array_get(arr, 4), "id")), 3);
	json_decref(arr);
}

static void test_bad_input(void **state)
{
	struct fixture *f = *state;
	static const char *const bad[] = {
	    "{\"execute\":}",
	    "[1,2]",
	    "42",
	    "\"x\"",
	    "}",
	    "{\"execute\":\"stop\",\"execute\":\"cont\"}",
	    "{\"execute\":5}",
	    "{\"arguments\":{}}",
	    "{\"execute\":\"stop\",\"arguments\":[]}",
	    "{\"execute\":\"stop\",\"bogus\":1}",
	    "{\"execute\":\"stop\",\"exec-oob\":\"stop\"}",
	    "{\"execute\":\"stop\",\"arguments\":{\"x\":1}}",
	    "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":\"0\",\"size\":1,\"filename\":\"f\"}}",
	    "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":-1,\"size\":1,\"filename\":\"f\"}}",
	    "{\"execute\":\"pmemsave\",\"arguments\":{\"size\":1,\"filename\":\"f\"}}",
	    "{\"execute\":\"migrate\",\"arguments\":{\"uri\":1}}",
	    "{\"a\":\"\\u0000\"}",
	    "\xff\xfe{\"execute\":\"\xc3\x28\"}",
	};
	json_t *r;

	negotiate(f);
	for (size_t i = 0; i < VMIG_ARRAY_SIZE(bad); i++) {
		char line[256];
		json_t *arr, *last;

		/* Newline-terminated, as clients send; a bare scalar needs an end. */
		snprintf(line, sizeof(line), "%s\n", bad[i]);
		arr = feed(f, line);

		/* The garbage bytes before '{' are one more error item. */
		assert_true(json_array_size(arr) >= 1);
		last = json_array_get(arr, json_array_size(arr) - 1);
		if (!json_object_get(last, "error"))
			fail_msg("no error for input %zu", i);
		json_decref(arr);
	}
	r = one(f, "{\"execute\":\"nope\",\"id\":9}");
	assert_string_equal(err_class(r), "CommandNotFound");
	json_decref(r);
	/* Still answering. */
	json_decref(ret_of(f, "{\"execute\":\"query-status\"}"));
}

static void test_huge_input(void **state)
{
	struct fixture *f = *state;
	size_t n = QMP_MAX_INPUT + 4096;
	char *big = malloc(n);
	int ret;

	negotiate(f);
	memset(big, ' ', n);
	big[0] = '{';
	big[1] = '"';
	ret = qmp__client_feed(f->c, big, n);
	assert_int_equal(ret, -EMSGSIZE);
	free(big);
}

/* ---- commands ---- */

static void test_status_stop_cont(void **state)
{
	struct fixture *f = *state;
	json_t *ret, *arr;

	negotiate(f);
	ret = ret_of(f, "{\"execute\":\"query-status\"}");
	assert_true(json_is_true(json_object_get(ret, "running")));
	assert_true(json_is_false(json_object_get(ret, "singlestep")));
	assert_string_equal(json_string_value(json_object_get(ret, "status")), "running");
	json_decref(ret);
	arr = feed(f, "{\"execute\":\"stop\"}");
	assert_int_equal(json_array_size(arr), 2);
	assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 0), "event")),
			    "STOP");
	assert_non_null(
	    json_object_get(json_object_get(json_array_get(arr, 0), "timestamp"), "microseconds"));
	json_decref(arr);
	ret = ret_of(f, "{\"execute\":\"query-status\"}");
	assert_string_equal(json_string_value(json_object_get(ret, "status")), "paused");
	json_decref(ret);
	fakevm_get()->runstate = VM_RS_FINISH_MIGRATE;
	expect_error(f, "{\"execute\":\"cont\"}", "finish-migrate");
}

static void test_events_only_after_negotiation(void **state)
{
	struct fixture *f = *state;
	json_t *arr;

	fakevm_emit(VM_EV_MIGRATION, "active");
	arr = feed(f, "");
	assert_int_equal(json_array_size(arr), 0);
	json_decref(arr);
	negotiate(f);
	fakevm_emit(VM_EV_MIGRATION, "completed");
	arr = feed(f, "");
	assert_int_equal(json_array_size(arr), 1);
	assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 0), "event")),
			    "MIGRATION");
	assert_string_equal(json_string_value(json_object_get(
				json_object_get(json_array_get(arr, 0), "data"), "status")),
			    "completed");
	json_decref(arr);
}

static void test_migrate(void **state)
{
	struct fixture *f = *state;
	struct fakevm *fv = fakevm_get();
	json_t *ret;

	negotiate(f);
	ret = ret_of(f, "{\"execute\":\"query-migrate\"}");
	assert_int_equal(json_object_size(ret), 0);
	json_decref(ret);
	expect_error(f, "{\"execute\":\"migrate\",\"arguments\":{}}", "'uri' is missing");
	expect_error(f,
		     "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:h:1\",\"blk\":true}}",
		     "Block");
	/* resume is only for a paused post-copy migration */
	expect_error(
	    f, "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:h:1\",\"resume\":true}}",
	    "migrate (resume)");
	assert_int_equal(fv->migrate_calls, 0);
	fv->next_error = -ECONNREFUSED;
	snprintf(fv->error_text, sizeof(fv->error_text), "connect to h:1: refused");
	expect_error(f, "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:h:1\"}}", "refused");
	fv->error_text[0] = '\0';
	json_decref(ret_of(f, "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:127.0.0.1:"
			      "4444\",\"detach\":true}}"));
	assert_string_equal(fv->last_uri, "tcp:127.0.0.1:4444");
	json_decref(ret_of(f, "{\"execute\":\"migrate-cancel\"}"));
	json_decref(ret_of(f, "{\"execute\":\"migrate_cancel\"}"));
	assert_int_equal(fv->cancel_calls, 2);
	/* Post-copy commands out of order are refused ... */
	expect_error(f, "{\"execute\":\"migrate-start-postcopy\"}", "migrate-start-postcopy");
	expect_error(f, "{\"execute\":\"migrate-pause\"}", "migrate-pause");
	expect_error(f, "{\"execute\":\"migrate-recover\",\"arguments\":{\"uri\":\"tcp:h:1\"}}",
		     "migrate-recover");
	/* ... and in order they reach the engine. */
	fv->stats.status = VMIG_STATUS_ACTIVE;
	json_decref(ret_of(f, "{\"execute\":\"migrate-start-postcopy\"}"));
	assert_int_equal(fv->stats.status, VMIG_STATUS_POSTCOPY_ACTIVE);
	json_decref(ret_of(f, "{\"execute\":\"migrate-pause\"}"));
	assert_int_equal(fv->stats.status, VMIG_STATUS_POSTCOPY_PAUSED);
	json_decref(ret_of(f, "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:h:2\","
			      "\"resume\":true}}"));
	assert_int_equal(fv->stats.status, VMIG_STATUS_POSTCOPY_RECOVER);
	assert_string_equal(fv->last_uri, "tcp:h:2");
	/* A recovery attempt is given up with migrate-pause, as in QEMU 8.2. */
	json_decref(ret_of(f, "{\"execute\":\"migrate-pause\"}"));
	assert_int_equal(fv->stats.status, VMIG_STATUS_POSTCOPY_PAUSED);
	json_decref(ret_of(f, "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:h:2\","
			      "\"resume\":true}}"));
	assert_int_equal(fv->stats.status, VMIG_STATUS_POSTCOPY_RECOVER);
	fv->stats.status = VMIG_STATUS_CANCELLED;
	/* A running VM must not accept incoming RAM. */
	expect_error(f, "{\"execute\":\"migrate-incoming\",\"arguments\":{\"uri\":\"tcp:h:1\"}}",
		     "--incoming defer");
	fv->runstate = VM_RS_INMIGRATE;
	json_decref(
	    ret_of(f, "{\"execute\":\"migrate-incoming\",\"arguments\":{\"uri\":\"tcp:h:1\"}}"));
	assert_int_equal(fv->incoming_calls, 1);
}

static void test_caps_params(void **state)
{
	struct fixture *f = *state;
	struct fakevm *fv = fakevm_get();
	json_t *ret, *v;
	size_t i;

	negotiate(f);
	json_decref(ret_of(f, "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{"
			      "\"capabilities\":[{\"capability\":\"multifd\",\"state\":true}]}}"));
	assert_true(fv->caps[3]);
	/* One bad element: nothing changes. */
	expect_error(f,
		     "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":["
		     "{\"capability\":\"multifd\",\"state\":false},{\"capability\":\"nope\","
		     "\"state\":true}]}}",
		     "nope");
	assert_true(fv->caps[3]);
	expect_error(f,
		     "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":["
		     "{\"capability\":\"multifd\",\"state\":1}]}}",
		     "state");
	expect_error(f,
		     "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":["
		     "7]}}",
		     "object");
	ret = ret_of(f, "{\"execute\":\"query-migrate-capabilities\"}");
	assert_int_equal(json_array_size(ret), 7);
	json_array_foreach(ret, i, v)
	{
		assert_true(json_is_string(json_object_get(v, "capability")));
		assert_true(json_is_boolean(json_object_get(v, "state")));
		if (!strcmp(json_string_value(json_object_get(v, "capability")), "multifd"))
			assert_true(json_is_true(json_object_get(v, "state")));
	}
	json_decref(ret);

	json_decref(ret_of(f, "{\"execute\":\"migrate-set-parameters\",\"arguments\":{"
			      "\"max-bandwidth\":1000000,\"downtime-limit\":50}}"));
	assert_int_equal(fv->params[0], 1000000);
	assert_int_equal(fv->params[1], 50);
	expect_error(f, "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"nope\":1}}",
		     "'nope' is unexpected");
	expect_error(f,
		     "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"downtime-limit\":1,"
		     "\"max-bandwidth\":\"1M\"}}",
		     "expected: integer");
	assert_int_equal(fv->params[1], 50);
	expect_error(f,
		     "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"downtime-limit\":"
		     "-5}}",
		     "out of range");
	fv->next_error = -EBUSY;
	expect_error(f,
		     "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"multifd-channels\""
		     ":4}}",
		     "while a migration is running");
	ret = ret_of(f, "{\"execute\":\"query-migrate-parameters\"}");
	assert_int_equal(json_integer_value(json_object_get(ret, "max-bandwidth")), 1000000);
	assert_int_equal(json_integer_value(json_object_get(ret, "downtime-limit")), 50);
	assert_int_equal(json_object_size(ret), 8); /* 5 of the fake engine, 3 TLS */
	assert_string_equal(json_string_value(json_object_get(ret, "multifd-compression")),
			    "none");
	json_decref(ret);

	/* QEMU's enum parameters take and give names, not numbers. */
	ret = ret_of(f, "{\"execute\":\"migrate-set-parameters\",\"arguments\":"
			"{\"multifd-compression\":\"zstd\"}}");
	json_decref(ret);
	assert_int_equal(fv->params[4], 2);
	ret = ret_of(f, "{\"execute\":\"query-migrate-parameters\"}");
	assert_string_equal(json_string_value(json_object_get(ret, "multifd-compression")),
			    "zstd");
	json_decref(ret);
	expect_error(f,
		     "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"multifd-"
		     "compression\":\"lz5\"}}",
		     "does not accept value 'lz5'");
	expect_error(f,
		     "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"multifd-"
		     "compression\":2}}",
		     "expected: string");
	assert_int_equal(fv->params[4], 2);
}

static void set_completed_stats(struct vmig_stats *st)
{
	memset(st, 0, sizeof(*st));
	st->status = VMIG_STATUS_COMPLETED;
	st->is_source = true;
	st->total_time_ms = 9;
	st->setup_time_ms = 1;
	st->downtime_ms = 3;
	st->ram.transferred = 603263;
	st->ram.total = 67641344;
	st->ram.duplicate = 16403;
	st->ram.normal = 111;
	st->ram.normal_bytes = 454656;
	st->ram.dirty_sync_count = 2;
	st->ram.mbps = 635.6906666;
	st->ram.precopy_bytes = 603263;
	st->ram.page_size = 4096;
}

static void test_query_migrate_fields(void **state)
{
	struct fixture *f = *state;
	struct vmig_stats *st = &fakevm_get()->stats;
	json_t *ret, *ram;

	negotiate(f);
	st->status = VMIG_STATUS_SETUP;
	st->is_source = true;
	ret = ret_of(f, "{\"execute\":\"query-migrate\"}");
	assert_int_equal(json_object_size(ret), 1);
	assert_string_equal(json_string_value(json_object_get(ret, "status")), "setup");
	json_decref(ret);

	st->status = VMIG_STATUS_ACTIVE;
	st->expected_downtime_ms = 42;
	st->ram.mbps = 1.5;
	ret = ret_of(f, "{\"execute\":\"query-migrate\"}");
	assert_int_equal(json_integer_value(json_object_get(ret, "expected-downtime")), 42);
	assert_null(json_object_get(ret, "downtime"));
	assert_non_null(json_object_get(ret, "total-time"));
	assert_non_null(json_object_get(ret, "setup-time"));
	ram = json_object_get(ret, "ram");
	assert_true(json_is_real(json_object_get(ram, "mbps")));
	static const char *const keys[] = {
	    "transferred",	"remaining",	  "total",
	    "duplicate",	"normal",	  "normal-bytes",
	    "dirty-sync-count", "mbps",		  "dirty-pages-rate",
	    "pages-per-second", "precopy-bytes",  "downtime-bytes",
	    "page-size",	"postcopy-bytes", "postcopy-requests"};
	for (size_t i = 0; i < VMIG_ARRAY_SIZE(keys); i++)
		if (!json_object_get(ram, keys[i]))
			fail_msg("ram.%s missing", keys[i]);
	json_decref(ret);

	set_completed_stats(st);
	ret = ret_of(f, "{\"execute\":\"query-migrate\"}");
	assert_int_equal(json_integer_value(json_object_get(ret, "downtime")), 3);
	assert_null(json_object_get(ret, "expected-downtime"));
	assert_int_equal(json_integer_value(json_object_get(json_object_get(ret, "ram"), "total")),
			 67641344);
	json_decref(ret);

	memset(st, 0, sizeof(*st));
	st->status = VMIG_STATUS_FAILED;
	st->is_source = true;
	snprintf(st->error_desc, sizeof(st->error_desc), "connection reset");
	ret = ret_of(f, "{\"execute\":\"query-migrate\"}");
	assert_string_equal(json_string_value(json_object_get(ret, "error-desc")),
			    "connection reset");
	assert_null(json_object_get(ret, "ram"));
	json_decref(ret);

	/* A destination: QEMU's fields are status only; what arrived is
	 * vmig's own x-vmig-ram. */
	st->status = VMIG_STATUS_COMPLETED;
	st->is_source = false;
	st->ram.transferred = 4242;
	ret = ret_of(f, "{\"execute\":\"query-migrate\"}");
	assert_int_equal(json_object_size(ret), 2);
	assert_null(json_object_get(ret, "ram"));
	assert_int_equal(
	    json_integer_value(json_object_get(json_object_get(ret, "x-vmig-ram"), "transferred")),
	    4242);
	json_decref(ret);
}

static void test_hmp(void **state)
{
	struct fixture *f = *state;
	struct fakevm *fv = fakevm_get();
	char *t;

	negotiate(f);
	set_completed_stats(&fv->stats);
	t = hmp(f, "info migrate");
	assert_string_equal(t, "Migration status: completed\r\n"
			       "total time: 9 ms\r\n"
			       "downtime: 3 ms\r\n"
			       "setup: 1 ms\r\n"
			       "transferred ram: 589 kbytes\r\n"
			       "throughput: 635.69 mbps\r\n"
			       "remaining ram: 0 kbytes\r\n"
			       "total ram: 66056 kbytes\r\n"
			       "duplicate: 16403 pages\r\n"
			       "skipped: 0 pages\r\n"
			       "normal: 111 pages\r\n"
			       "normal bytes: 444 kbytes\r\n"
			       "dirty sync count: 2\r\n"
			       "page size: 4 kbytes\r\n"
			       "multifd bytes: 0 kbytes\r\n"
			       "pages-per-second: 0\r\n"
			       "precopy ram: 589 kbytes\r\n");
	free(t);
	t = hmp(f, "info status");
	assert_string_equal(t, "VM status: running\r\n");
	free(t);
	fv->runstate = VM_RS_POSTMIGRATE;
	t = hmp(f, "info status");
	assert_string_equal(t, "VM status: paused (postmigrate)\r\n");
	free(t);
	fv->runstate = VM_RS_RUNNING;
	t = hmp(f, "  stop ");
	assert_string_equal(t, "");
	free(t);
	assert_int_equal(fv->runstate, VM_RS_PAUSED);
	t = hmp(f, "c");
	free(t);
	assert_int_equal(fv->runstate, VM_RS_RUNNING);
	t = hmp(f, "migrate_set_parameter max-bandwidth 100M");
	assert_string_equal(t, "");
	free(t);
	assert_int_equal(fv->params[0], 100 << 20);
	t = hmp(f, "migrate_set_capability postcopy-ram on");
	free(t);
	assert_true(fv->caps[0]);
	t = hmp(f, "migrate_set_capability bogus on");
	assert_non_null(strstr(t, "Error: "));
	free(t);
	t = hmp(f, "info migrate_parameters");
	assert_non_null(strstr(t, "max-bandwidth: 104857600 bytes/second\r\n"));
	assert_non_null(strstr(t, "downtime-limit: 300 ms\r\n"));
	free(t);
	t = hmp(f, "info migrate_capabilities");
	assert_non_null(strstr(t, "postcopy-ram: on\r\n"));
	assert_non_null(strstr(t, "multifd: off\r\n"));
	free(t);
	t = hmp(f, "migrate -d tcp:127.0.0.1:5555");
	assert_string_equal(t, "");
	free(t);
	assert_string_equal(fv->last_uri, "tcp:127.0.0.1:5555");
	t = hmp(f, "migrate_cancel");
	free(t);
	assert_int_equal(fv->cancel_calls, 1);
	t = hmp(f, "frobnicate");
	assert_string_equal(t, "unknown command: 'frobnicate'\r\n");
	free(t);
	t = hmp(f, "info nothing");
	assert_string_equal(t, "unknown command: 'info nothing'\r\n");
	free(t);
	t = hmp(f, "");
	assert_string_equal(t, "");
	free(t);
}

static void test_pmemsave_guest_quit(void **state)
{
	struct fixture *f = *state;
	struct fakevm *fv = fakevm_get();
	json_t *ret, *arr;

	negotiate(f);
	json_decref(ret_of(f, "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":4096,\"size\":"
			      "8192,\"filename\":\"/tmp/m\"}}"));
	assert_int_equal(fv->pmem_addr, 4096);
	assert_int_equal(fv->pmem_size, 8192);
	assert_string_equal(fv->pmem_path, "/tmp/m");
	expect_error(f,
		     "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":0,\"size\":1099511627776,"
		     "\"filename\":\"/tmp/m\"}}",
		     "outside");
	fv->guest.pages_written = 5;
	fv->guest.inconsistencies = 0;
	ret = ret_of(f, "{\"execute\":\"x-vmig-query-guest\"}");
	assert_int_equal(json_integer_value(json_object_get(ret, "pages-written")), 5);
	assert_non_null(json_object_get(ret, "pages-verified"));
	assert_non_null(json_object_get(ret, "inconsistencies"));
	assert_string_equal(json_string_value(json_object_get(ret, "workload")), "idle");
	json_decref(ret);
	ret = ret_of(f, "{\"execute\":\"query-commands\"}");
	assert_true(json_array_size(ret) >= 20);
	json_decref(ret);
	/* quit: reply, SHUTDOWN, and nothing after it runs. */
	arr = feed(f, "{\"execute\":\"quit\"}{\"execute\":\"stop\"}");
	assert_int_equal(json_array_size(arr), 2);
	assert_non_null(json_object_get(json_array_get(arr, 0), "return"));
	assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 1), "event")),
			    "SHUTDOWN");
	json_decref(arr);
	assert_true(qmp__server_quit_requested(f->srv));
	assert_int_equal(fv->runstate, VM_RS_RUNNING);
}

/* ---- the socket server ---- */

struct sock_client {
	int fd;
	FILE *in;
};

static void sc_open(struct sock_client *sc, const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	char line[4096];

	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	sc->fd = socket(AF_UNIX, SOCK_STREAM, 0);
	assert_true(sc->fd >= 0);
	assert_int_equal(connect(sc->fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	sc->in = fdopen(dup(sc->fd), "r");
	assert_non_null(fgets(line, sizeof(line), sc->in));
	assert_non_null(strstr(line, "\"QMP\""));
}

static json_t *sc_cmd(struct sock_client *sc, const char *req)
{
	char line[65536];

	if (*req)
		assert_int_equal(send(sc->fd, req, strlen(req), MSG_NOSIGNAL),
				 (ssize_t)strlen(req));
	for (;;) {
		json_t *v;

		if (!fgets(line, sizeof(line), sc->in))
			return NULL;
		v = json_loads(line, 0, NULL);
		assert_non_null(v);
		if (!json_object_get(v, "event"))
			return v;
		json_decref(v);
	}
}

static void sc_close(struct sock_client *sc)
{
	fclose(sc->in);
	close(sc->fd);
}

static void *run_thread(void *arg)
{
	return (void *)(intptr_t)qmp_server_run(arg);
}

static void test_socket_server(void **state)
{
	char dir[] = "/tmp/vmig-qmp-test-XXXXXX", path[128];
	struct sock_client a, b, evil;
	struct qmp_server *srv;
	struct vmig__err err;
	pthread_t th;
	void *rv;
	json_t *r;
	char *junk;

	fakevm_reset();
	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "unix:%s/qmp.sock", dir);
	assert_int_equal(qmp_server_new(&srv, fakevm_vm(), path, &err), 0);
	assert_int_equal(pthread_create(&th, NULL, run_thread, srv), 0);
	sc_open(&a, path + 5);
	sc_open(&b, path + 5);
	sc_open(&evil, path + 5);
	json_decref(sc_cmd(&a, "{\"execute\":\"qmp_capabilities\"}\n"));
	json_decref(sc_cmd(&b, "{\"execute\":\"qmp_capabilities\"}\n"));
	/* A client that never completes an object is cut off at 1 MiB... */
	junk = malloc(QMP_MAX_INPUT + 65536);
	memset(junk, 'x', QMP_MAX_INPUT + 65536);
	junk[0] = '[';
	junk[1] = '"';
	for (size_t off = 0; off < QMP_MAX_INPUT + 65536;) {
		ssize_t n = send(evil.fd, junk + off, QMP_MAX_INPUT + 65536 - off, MSG_NOSIGNAL);

		if (n <= 0)
			break;
		off += (size_t)n;
	}
	free(junk);
	r = sc_cmd(&evil, "");
	assert_non_null(r); /* the error that explains the disconnect */
	assert_non_null(strstr(err_desc(r), "1 MiB"));
	json_decref(r);
	assert_null(sc_cmd(&evil, "")); /* then EOF */
	/* ...while the others keep working. */
	r = sc_cmd(&a, "{\"execute\":\"query-status\",\"id\":1}\n");
	assert_true(json_is_true(json_object_get(json_object_get(r, "return"), "running")));
	json_decref(r);
	r = sc_cmd(&b, "{\"execute\":\"stop\"}\n");
	assert_non_null(json_object_get(r, "return"));
	json_decref(r);
	qmp_server_stop(srv);
	assert_int_equal(pthread_join(th, &rv), 0);
	assert_int_equal((intptr_t)rv, 0);
	qmp_server_free(srv);
	sc_close(&a);
	sc_close(&b);
	sc_close(&evil);
	assert_int_equal(access(path + 5, F_OK), -1); /* socket file removed */
	rmdir(dir);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_splitter),
	    cmocka_unit_test(test_splitter_depth),
	    cmocka_unit_test_setup_teardown(test_greeting, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_negotiation, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_split_and_batched, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_bad_input, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_huge_input, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_status_stop_cont, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_events_only_after_negotiation, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_migrate, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_caps_params, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_query_migrate_fields, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_hmp, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_pmemsave_guest_quit, setup, teardown),
	    cmocka_unit_test(test_socket_server),
	};

	signal(SIGPIPE, SIG_IGN); /* a disconnected test client must not kill us */
	return cmocka_run_group_tests(tests, NULL, NULL);
}
