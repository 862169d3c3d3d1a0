// SPDX-License-Identifier: MIT
/*
 * Unit tests of vmig-vm's objects (vm/objects.c) through QMP, over the fake
 * VM: object-add and object-del for tls-creds-x509, tls-creds-psk and
 * authz-simple with every kind of bad input, the --object command-line
 * syntax, the migration parameters tls-creds, tls-hostname and tls-authz,
 * and what the migrate commands hand to vmig_session_set_tls().
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "objects.h"
#include "qmp_fakevm.h"
#include "qmp_harness.h"

/* Requests are written with ' for " so they stay readable. */
static char *dq(const char *s)
{
	char *out = strdup(s);

	assert_non_null(out);
	for (char *p = out; *p; p++)
		if (*p == '\'')
			*p = '"';
	return out;
}

static void ok(struct fixture *f, const char *req)
{
	char *r = dq(req);

	json_decref(ret_of(f, r));
	free(r);
}

static void bad(struct fixture *f, const char *req, const char *needle)
{
	char *r = dq(req);

	expect_error(f, r, needle);
	free(r);
}

static json_t *params(struct fixture *f)
{
	return ret_of(f, "{\"execute\":\"query-migrate-parameters\"}");
}

static const char *param(const json_t *p, const char *name)
{
	const char *v = json_string_value(json_object_get(p, name));

	assert_non_null(v);
	return v;
}

/* ---- object-add, object-del ---- */

static void test_add_del(void **state)
{
	struct fixture *f = *state;
	struct fakevm *fv = fakevm_get();

	negotiate(f);
	ok(f, "{'execute':'object-add','arguments':{'qom-type':'tls-creds-x509','id':'tls0',"
	      "'dir':'/etc/pki/vmig','endpoint':'server'}}");
	assert_int_equal(fv->tls_opts.endpoint, VMIG_TLS_ENDPOINT_SERVER);
	assert_true(fv->tls_opts.verify_peer); /* QEMU's default */
	assert_int_equal(fv->tls_opts.size, sizeof(struct vmig_tls_creds_opts));
	assert_string_equal(fv->tls_dir, "/etc/pki/vmig");
	ok(f, "{'execute':'object-add','arguments':{'qom-type':'tls-creds-x509','id':'tls1',"
	      "'dir':'/d','verify-peer':false}}");
	assert_int_equal(fv->tls_opts.endpoint, VMIG_TLS_ENDPOINT_CLIENT); /* the default */
	assert_false(fv->tls_opts.verify_peer);
	ok(f, "{'execute':'object-add','arguments':{'qom-type':'tls-creds-psk','id':'psk0',"
	      "'dir':'/p','endpoint':'client','username':'alice'}}");
	assert_string_equal(fv->tls_username, "alice");
	ok(f, "{'execute':'object-add','arguments':{'qom-type':'tls-creds-psk','id':'psk1',"
	      "'dir':'/p','endpoint':'server'}}");
	assert_string_equal(fv->tls_username, "");
	ok(f, "{'execute':'object-add','arguments':{'qom-type':'authz-simple','id':'auth0',"
	      "'identity':'CN=client,O=vmig'}}");
	assert_int_equal(fv->tls_creds_live, 4);

	/* An id is taken whatever the type. */
	bad(f,
	    "{'execute':'object-add','arguments':{'qom-type':'authz-simple','id':'tls0',"
	    "'identity':'x'}}",
	    "duplicate object id 'tls0'");
	bad(f,
	    "{'execute':'object-add','arguments':{'qom-type':'tls-creds-x509','id':'tls0',"
	    "'dir':'/d'}}",
	    "duplicate");
	assert_int_equal(fv->tls_creds_live, 4);

	ok(f, "{'execute':'object-del','arguments':{'id':'tls0'}}");
	assert_int_equal(fv->tls_creds_live, 3);
	bad(f, "{'execute':'object-del','arguments':{'id':'tls0'}}", "object 'tls0' not found");
	bad(f, "{'execute':'object-del','arguments':{'id':5}}", "expected: string");
	bad(f, "{'execute':'object-del','arguments':{}}", "'id' is missing");
	bad(f, "{'execute':'object-del'}", "'id' is missing");
	ok(f, "{'execute':'object-del','arguments':{'id':'auth0'}}");
	/* The id is free again. */
	ok(f, "{'execute':'object-add','arguments':{'qom-type':'tls-creds-x509','id':'tls0',"
	      "'dir':'/d'}}");
	assert_int_equal(fv->tls_creds_live, 4);
}

/* Every bad request is refused with a clear reason and creates nothing. */
static void test_add_errors(void **state)
{
	static const struct {
		const char *args, *needle;
	} cases[] = {
	    {"{}", "'qom-type' is missing"},
	    {"{'qom-type':5,'id':'a'}", "'qom-type', expected: string"},
	    {"{'qom-type':'memory-backend-ram','id':'a','size':1}",
	     "'qom-type' does not accept value 'memory-backend-ram'"},
	    {"{'qom-type':'tls-creds-anon','id':'a'}", "tls-creds-x509, tls-creds-psk"},
	    {"{'qom-type':'tls-creds-x509','dir':'/d'}", "'id' is missing"},
	    {"{'qom-type':'tls-creds-x509','id':7,'dir':'/d'}", "'id', expected: string"},
	    {"{'qom-type':'tls-creds-x509','id':'','dir':'/d'}", "'id' must not be empty"},
	    {"{'qom-type':'tls-creds-x509','id':'1abc','dir':'/d'}", "expects an identifier"},
	    {"{'qom-type':'tls-creds-x509','id':'a b','dir':'/d'}", "expects an identifier"},
	    {"{'qom-type':'tls-creds-x509','id':'"
	     "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	     "aaaaaaaaaaaaaaa','dir':'/d'}",
	     "'id' is longer than 64"},
	    {"{'qom-type':'tls-creds-x509','id':'a'}", "'dir' is missing"},
	    {"{'qom-type':'tls-creds-x509','id':'a','dir':['/d']}", "'dir', expected: string"},
	    {"{'qom-type':'tls-creds-x509','id':'a','dir':''}", "'dir' must not be empty"},
	    {"{'qom-type':'tls-creds-x509','id':'a','dir':'/d','endpoint':'both'}",
	     "'endpoint' does not accept value 'both'"},
	    {"{'qom-type':'tls-creds-x509','id':'a','dir':'/d','endpoint':1}",
	     "'endpoint', expected: string"},
	    {"{'qom-type':'tls-creds-x509','id':'a','dir':'/d','verify-peer':'on'}",
	     "'verify-peer', expected: bool"},
	    {"{'qom-type':'tls-creds-x509','id':'a','dir':'/d','verify-peer':null}",
	     "'verify-peer', expected: bool"},
	    {"{'qom-type':'tls-creds-x509','id':'a','dir':'/d','username':'u'}",
	     "'username' is unexpected"},
	    {"{'qom-type':'tls-creds-x509','id':'a','dir':'/d','bogus':1}",
	     "'bogus' is unexpected"},
	    {"{'qom-type':'tls-creds-x509','id':'a','dir':'/d','priority':'NORMAL'}",
	     "'priority' of tls-creds-x509 is not supported"},
	    {"{'qom-type':'tls-creds-x509','id':'a','dir':'/d','sanity-check':true}",
	     "not supported"},
	    {"{'qom-type':'tls-creds-psk','id':'a','dir':'/d','username':5}",
	     "'username', expected: string"},
	    {"{'qom-type':'tls-creds-psk','id':'a','dir':'/d','username':''}",
	     "'username' must not be empty"},
	    {"{'qom-type':'authz-simple','id':'a'}", "'identity' is missing"},
	    {"{'qom-type':'authz-simple','id':'a','identity':{}}", "'identity', expected: string"},
	    {"{'qom-type':'authz-simple','id':'a','identity':'x','dir':'/d'}",
	     "'dir' is unexpected"},
	};
	struct fixture *f = *state;
	char req[512];

	negotiate(f);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		snprintf(req, sizeof(req), "{'execute':'object-add','arguments':%s}",
			 cases[i].args);
		bad(f, req, cases[i].needle);
	}
	bad(f, "{'execute':'object-add'}", "'qom-type' is missing");
	bad(f, "{'execute':'object-add','arguments':[1]}", "must be an object");
	assert_int_equal(fakevm_get()->tls_creds_live, 0);
	/* Nothing was created: every id is still free. */
	ok(f, "{'execute':'object-add','arguments':{'qom-type':'authz-simple','id':'a',"
	      "'identity':'x'}}");
}

/* The library's reason for credentials it cannot load reaches the client. */
static void test_add_load_failure(void **state)
{
	struct fixture *f = *state;
	struct fakevm *fv = fakevm_get();

	negotiate(f);
	fv->creds_error = -ENOENT;
	bad(f,
	    "{'execute':'object-add','arguments':{'qom-type':'tls-creds-x509','id':'t',"
	    "'dir':'/nonexistent'}}",
	    "tls-creds-x509 't': cannot read /nonexistent/ca-cert.pem");
	bad(f,
	    "{'execute':'object-add','arguments':{'qom-type':'tls-creds-psk','id':'t',"
	    "'dir':'/nonexistent'}}",
	    "tls-creds-psk 't': cannot read");
	fv->creds_error = 0;
	ok(f, "{'execute':'object-add','arguments':{'qom-type':'tls-creds-x509','id':'t',"
	      "'dir':'/d'}}");
}

static void test_add_limit(void **state)
{
	struct fixture *f = *state;
	char req[200];

	negotiate(f);
	for (int i = 0; i < VM_OBJECTS_MAX; i++) {
		snprintf(req, sizeof(req),
			 "{'execute':'object-add','arguments':{'qom-type':'authz-simple',"
			 "'id':'a%d','identity':'x'}}",
			 i);
		ok(f, req);
	}
	bad(f,
	    "{'execute':'object-add','arguments':{'qom-type':'authz-simple','id':'z',"
	    "'identity':'x'}}",
	    "Too many objects");
	ok(f, "{'execute':'object-del','arguments':{'id':'a7'}}");
	ok(f, "{'execute':'object-add','arguments':{'qom-type':'authz-simple','id':'z',"
	      "'identity':'x'}}");
}

/* ---- --object ---- */

static json_t *parse_ok(const char *opt)
{
	struct vmig__err err;
	json_t *props = NULL;

	vmig__err_clear(&err);
	if (vm_objects_parse_opt(opt, &props, &err))
		fail_msg("'%s' refused: %s", opt, err.msg);
	return props;
}

static void parse_bad(const char *opt, const char *needle)
{
	struct vmig__err err;
	json_t *props = (json_t *)&err; /* must come back NULL */

	vmig__err_clear(&err);
	assert_int_not_equal(vm_objects_parse_opt(opt, &props, &err), 0);
	assert_null(props);
	if (!strstr(err.msg, needle))
		fail_msg("'%s': error '%s' lacks '%s'", opt, err.msg, needle);
}

static const char *pstr(const json_t *props, const char *key)
{
	const char *v = json_string_value(json_object_get(props, key));

	assert_non_null(v);
	return v;
}

static void test_opt_syntax(void **state)
{
	struct vmig__err err;
	json_t *p;

	p = parse_ok("tls-creds-x509,id=t0,endpoint=server,dir=/a,,b,verify-peer=off");
	assert_string_equal(pstr(p, "qom-type"), "tls-creds-x509");
	assert_string_equal(pstr(p, "id"), "t0");
	assert_string_equal(pstr(p, "endpoint"), "server");
	assert_string_equal(pstr(p, "dir"), "/a,b");
	assert_true(json_is_false(json_object_get(p, "verify-peer")));
	assert_int_equal(json_object_size(p), 5);
	json_decref(p);

	/* A distinguished name: its commas doubled. */
	p = parse_ok("authz-simple,id=a0,identity=CN=client,,O=vmig,,C=FR");
	assert_string_equal(pstr(p, "identity"), "CN=client,O=vmig,C=FR");
	json_decref(p);
	p = parse_ok("authz-simple,id=a0,identity=x,,,,");
	assert_string_equal(pstr(p, "identity"), "x,,");
	json_decref(p);
	p = parse_ok("qom-type=tls-creds-psk,id=p,dir=/d,username=bob,verify-peer=yes");
	assert_string_equal(pstr(p, "qom-type"), "tls-creds-psk");
	assert_true(json_is_true(json_object_get(p, "verify-peer")));
	json_decref(p);
	/* QEMU 6's JSON form. */
	p = parse_ok("{\"qom-type\":\"tls-creds-x509\",\"id\":\"j\",\"dir\":\"/d\","
		     "\"verify-peer\":true}");
	assert_true(json_is_true(json_object_get(p, "verify-peer")));
	json_decref(p);
	/* Unknown types and properties parse; vm_objects_add refuses them. */
	p = parse_ok("frobnicator,id=x,foo=bar");
	vmig__err_clear(&err);
	assert_int_equal(vm_objects_add(fakevm_get()->objects, p, &err), -EINVAL);
	assert_non_null(strstr(err.msg, "'frobnicator'"));
	json_decref(p);

	parse_bad("", "'qom-type' is missing");
	parse_bad(",id=x", "'qom-type' is missing");
	parse_bad("authz-simple,id=a,identity", "Expected '=' after parameter 'identity'");
	parse_bad("authz-simple,id=a,identity=x,", "Empty property");
	parse_bad("authz-simple,id=a,id=b", "'id' is given more than once");
	parse_bad("authz-simple,=x", "property name is empty");
	parse_bad("tls-creds-x509,id=a,dir=/d,verify-peer=maybe",
		  "'verify-peer' expects 'on' or 'off'");
	parse_bad("{\"qom-type\":", "JSON parse error");
	parse_bad("{\"a\":1,\"a\":2}", "JSON parse error");
}

static void test_opt_add(void **state)
{
	struct vm_objects *objs = fakevm_get()->objects;
	struct vmig__err err;
	json_t *p;

	p = parse_ok("tls-creds-x509,id=t0,endpoint=server,dir=/d");
	assert_int_equal(vm_objects_add(objs, p, &err), 0);
	json_decref(p);
	assert_true(vm_objects_has(objs, "t0"));
	assert_true(vm_objects_have_tls_creds(objs));
	p = parse_ok("tls-creds-x509,id=t0,dir=/d");
	assert_int_equal(vm_objects_add(objs, p, &err), -EEXIST);
	json_decref(p);
	p = parse_ok("tls-creds-x509,id=t1,dir=/d,endpoint=nowhere");
	assert_int_equal(vm_objects_add(objs, p, &err), -EINVAL);
	assert_non_null(strstr(err.msg, "'nowhere'"));
	json_decref(p);
	assert_int_equal(vm_objects_del(objs, "t0", &err), 0);
	assert_false(vm_objects_have_tls_creds(objs));
	assert_int_equal(vm_objects_del(objs, "t0", &err), -ENOENT);
}

/* ---- parameters ---- */

static void test_params(void **state)
{
	struct fixture *f = *state;
	struct fakevm *fv = fakevm_get();
	json_t *p;
	char *t;

	negotiate(f);
	p = params(f);
	assert_string_equal(param(p, "tls-creds"), "");
	assert_string_equal(param(p, "tls-hostname"), "");
	assert_string_equal(param(p, "tls-authz"), "");
	json_decref(p);

	ok(f, "{'execute':'migrate-set-parameters','arguments':{'tls-creds':'tls0',"
	      "'tls-hostname':'dst.example','tls-authz':'auth0','downtime-limit':42}}");
	p = params(f);
	assert_string_equal(param(p, "tls-creds"), "tls0");
	assert_string_equal(param(p, "tls-hostname"), "dst.example");
	assert_string_equal(param(p, "tls-authz"), "auth0");
	assert_int_equal(json_integer_value(json_object_get(p, "downtime-limit")), 42);
	json_decref(p);

	/* A bad member changes nothing, the engine's parameters included. */
	bad(f,
	    "{'execute':'migrate-set-parameters','arguments':{'downtime-limit':7,"
	    "'tls-creds':5}}",
	    "'tls-creds', expected: string");
	bad(f, "{'execute':'migrate-set-parameters','arguments':{'tls-hostname':true}}",
	    "expected: string");
	bad(f, "{'execute':'migrate-set-parameters','arguments':{'tls-authz':['a']}}",
	    "expected: string");
	bad(f,
	    "{'execute':'migrate-set-parameters','arguments':{'tls-creds':'x',"
	    "'downtime-limit':'fast'}}",
	    "expected: integer");
	fv->next_error = -EBUSY; /* the engine refuses: the TLS ones stay too */
	bad(f,
	    "{'execute':'migrate-set-parameters','arguments':{'tls-creds':'y',"
	    "'downtime-limit':8}}",
	    "while a migration is running");
	p = params(f);
	assert_string_equal(param(p, "tls-creds"), "tls0");
	assert_string_equal(param(p, "tls-hostname"), "dst.example");
	assert_int_equal(json_integer_value(json_object_get(p, "downtime-limit")), 42);
	json_decref(p);

	/* "" and null (QEMU's StrOrNull) unset. */
	ok(f, "{'execute':'migrate-set-parameters','arguments':{'tls-creds':null,"
	      "'tls-hostname':''}}");
	p = params(f);
	assert_string_equal(param(p, "tls-creds"), "");
	assert_string_equal(param(p, "tls-hostname"), "");
	assert_string_equal(param(p, "tls-authz"), "auth0");
	json_decref(p);

	/* The human monitor: QEMU's quoted lines, and words as values. */
	t = hmp(f, "migrate_set_parameter tls-creds tls9");
	assert_string_equal(t, "");
	free(t);
	t = hmp(f, "migrate_set_parameter multifd-compression zstd");
	assert_string_equal(t, "");
	free(t);
	t = hmp(f, "info migrate_parameters");
	assert_non_null(strstr(t, "tls-creds: 'tls9'\r\n"));
	assert_non_null(strstr(t, "tls-hostname: ''\r\n"));
	assert_non_null(strstr(t, "tls-authz: 'auth0'\r\n"));
	assert_non_null(strstr(t, "multifd-compression: zstd\r\n"));
	free(t);
	t = hmp(f, "migrate_set_parameter tls-authz ''");
	assert_string_equal(t, "");
	free(t);
	t = hmp(f, "migrate_set_parameter downtime-limit soon");
	assert_non_null(strstr(t, "Error: "));
	free(t);
	p = params(f);
	assert_string_equal(param(p, "tls-authz"), "");
	json_decref(p);
}

/* ---- what a migration start hands to the session ---- */

static void add_standard_objects(struct fixture *f)
{
	ok(f, "{'execute':'object-add','arguments':{'qom-type':'tls-creds-x509','id':'cli',"
	      "'dir':'/d','endpoint':'client'}}");
	ok(f, "{'execute':'object-add','arguments':{'qom-type':'tls-creds-psk','id':'srv',"
	      "'dir':'/d','endpoint':'server'}}");
	ok(f, "{'execute':'object-add','arguments':{'qom-type':'authz-simple','id':'auth',"
	      "'identity':'CN=src'}}");
}

static void test_apply_source(void **state)
{
	struct fixture *f = *state;
	struct fakevm *fv = fakevm_get();

	negotiate(f);
	add_standard_objects(f);
	/* No TLS: the session is told so at every start. */
	ok(f, "{'execute':'migrate','arguments':{'uri':'tcp:h:1'}}");
	assert_int_equal(fv->set_tls_calls, 1);
	assert_null(fv->tls_creds);
	assert_int_equal(fv->migrate_calls, 1);
	fv->stats.status = VMIG_STATUS_NONE;

	ok(f, "{'execute':'migrate-set-parameters','arguments':{'tls-creds':'nope'}}");
	bad(f, "{'execute':'migrate','arguments':{'uri':'tcp:h:1'}}",
	    "No TLS credentials with id 'nope'");
	ok(f, "{'execute':'migrate-set-parameters','arguments':{'tls-creds':'auth'}}");
	bad(f, "{'execute':'migrate','arguments':{'uri':'tcp:h:1'}}", "authz-simple");
	ok(f, "{'execute':'migrate-set-parameters','arguments':{'tls-creds':'srv'}}");
	bad(f, "{'execute':'migrate','arguments':{'uri':'tcp:h:1'}}",
	    "Expected TLS credentials for a client endpoint: 'srv' has endpoint=server");
	bad(f, "{'execute':'migrate','arguments':{'uri':'tcp:h:1','resume':true}}",
	    "client endpoint");
	assert_int_equal(fv->migrate_calls, 1);

	/* tls-authz is the destination's: the source ignores it. */
	ok(f, "{'execute':'migrate-set-parameters','arguments':{'tls-creds':'cli',"
	      "'tls-hostname':'dst','tls-authz':'whatever'}}");
	ok(f, "{'execute':'migrate','arguments':{'uri':'tcp:h:1'}}");
	assert_non_null(fv->tls_creds);
	assert_string_equal(fv->tls_hostname, "dst");
	assert_string_equal(fv->tls_authz, "");
	assert_int_equal(fv->migrate_calls, 2);

	/* Deleting the object leaves the session its own reference; the next
	 * start no longer finds the id. */
	ok(f, "{'execute':'object-del','arguments':{'id':'cli'}}");
	assert_int_equal(fv->tls_creds_live, 2); /* srv, and cli held by the session */
	fv->stats.status = VMIG_STATUS_NONE;
	bad(f, "{'execute':'migrate','arguments':{'uri':'tcp:h:1'}}",
	    "No TLS credentials with id 'cli'");

	/* Empty tls-hostname: NULL, the engine takes the URI's host. */
	ok(f, "{'execute':'object-add','arguments':{'qom-type':'tls-creds-x509','id':'cli',"
	      "'dir':'/d'}}");
	ok(f, "{'execute':'migrate-set-parameters','arguments':{'tls-hostname':''}}");
	ok(f, "{'execute':'migrate','arguments':{'uri':'tcp:h:1'}}");
	assert_string_equal(fv->tls_hostname, "");
	assert_int_equal(fv->tls_creds_live, 2); /* the old cli went with set_tls */

	/* -EBUSY (a migration runs): the engine call answers; other errors
	 * stop the start. */
	fv->set_tls_error = -EBUSY;
	ok(f, "{'execute':'migrate','arguments':{'uri':'tcp:h:1'}}");
	assert_int_equal(fv->migrate_calls, 4);
	fv->set_tls_error = -EINVAL;
	snprintf(fv->error_text, sizeof(fv->error_text), "creds are for a server");
	bad(f, "{'execute':'migrate','arguments':{'uri':'tcp:h:1'}}",
	    "TLS: creds are for a server");
	assert_int_equal(fv->migrate_calls, 4);
}

static void test_apply_destination(void **state)
{
	struct fixture *f = *state;
	struct fakevm *fv = fakevm_get();

	negotiate(f);
	add_standard_objects(f);
	fv->runstate = VM_RS_INMIGRATE;
	ok(f, "{'execute':'migrate-set-parameters','arguments':{'tls-creds':'cli'}}");
	bad(f, "{'execute':'migrate-incoming','arguments':{'uri':'tcp:h:1'}}",
	    "Expected TLS credentials for a server endpoint");
	/* Without TLS nobody could be authorized: refused, not ignored. */
	ok(f, "{'execute':'migrate-set-parameters','arguments':{'tls-creds':'',"
	      "'tls-authz':'auth'}}");
	bad(f, "{'execute':'migrate-incoming','arguments':{'uri':'tcp:h:1'}}",
	    "tls-authz 'auth' is set but tls-creds is not");
	ok(f, "{'execute':'migrate-set-parameters','arguments':{'tls-creds':'srv',"
	      "'tls-authz':'nobody'}}");
	bad(f, "{'execute':'migrate-incoming','arguments':{'uri':'tcp:h:1'}}",
	    "no authz-simple object with id 'nobody'");
	ok(f, "{'execute':'migrate-set-parameters','arguments':{'tls-authz':'srv'}}");
	bad(f, "{'execute':'migrate-incoming','arguments':{'uri':'tcp:h:1'}}",
	    "'srv' is a tls-creds-psk, not an authz-simple");
	assert_int_equal(fv->incoming_calls, 0);
	assert_int_equal(fv->set_tls_calls, 0);

	/* tls-hostname is the source's: the destination ignores it. */
	ok(f, "{'execute':'migrate-set-parameters','arguments':{'tls-authz':'auth',"
	      "'tls-hostname':'h'}}");
	ok(f, "{'execute':'migrate-incoming','arguments':{'uri':'tcp:h:1'}}");
	assert_int_equal(fv->incoming_calls, 1);
	assert_non_null(fv->tls_creds);
	assert_string_equal(fv->tls_authz, "CN=src");
	assert_string_equal(fv->tls_hostname, "");

	/* migrate-recover is the destination too. */
	ok(f, "{'execute':'migrate-set-parameters','arguments':{'tls-authz':''}}");
	fv->stats.status = VMIG_STATUS_POSTCOPY_PAUSED;
	ok(f, "{'execute':'migrate-recover','arguments':{'uri':'tcp:h:2'}}");
	assert_int_equal(fv->set_tls_calls, 2);
	assert_string_equal(fv->tls_authz, "");
	ok(f, "{'execute':'migrate-set-parameters','arguments':{'tls-creds':'gone'}}");
	fv->stats.status = VMIG_STATUS_POSTCOPY_PAUSED;
	bad(f, "{'execute':'migrate-recover','arguments':{'uri':'tcp:h:2'}}",
	    "No TLS credentials with id 'gone'");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_add_del, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_add_errors, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_add_load_failure, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_add_limit, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_opt_syntax, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_opt_add, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_params, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_apply_source, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_apply_destination, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
