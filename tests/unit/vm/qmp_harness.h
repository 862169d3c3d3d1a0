/* SPDX-License-Identifier: MIT */
/*
 * The harness the QMP unit tests share (test_qmp.c, test_objects.c): a
 * detached QMP server over the fake VM with one in-memory client. Failures
 * are cmocka assertions, so the helpers return only what passed.
 */
#ifndef VMIG_TESTS_QMP_HARNESS_H
#define VMIG_TESTS_QMP_HARNESS_H

#include <jansson.h>

#include "qmp_int.h"

struct fixture {
	struct qmp_server *srv;
	struct qmp_client *c;
};

/* cmocka setup/teardown: a reset fake VM, a server and a client whose
 * greeting is already read. */
int setup(void **state);
int teardown(void **state);

/* Feed text, deliver events, return every output line parsed, as an array. */
json_t *feed(struct fixture *f, const char *text);
/* Exactly one reply (events ignored): return it (caller decrefs). */
json_t *one(struct fixture *f, const char *text);
void negotiate(struct fixture *f);
const char *err_class(const json_t *r);
const char *err_desc(const json_t *r);
/* A command that must fail with GenericError whose text contains needle. */
void expect_error(struct fixture *f, const char *text, const char *needle);
/* The "return" value of a command that must succeed (caller decrefs). */
json_t *ret_of(struct fixture *f, const char *text);
/* human-monitor-command's text (caller frees). */
char *hmp(struct fixture *f, const char *line);

#endif
