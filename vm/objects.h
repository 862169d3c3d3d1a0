/* SPDX-License-Identifier: MIT */
/*
 * QEMU's user-creatable objects that migration needs, with QEMU's names:
 * tls-creds-x509, tls-creds-psk and authz-simple. They are created by
 * --object on the command line or QMP object-add, removed by object-del, and
 * to be named by id from the migration parameters tls-creds and tls-authz.
 *
 * Not thread-safe: everything here runs on the main (QMP) thread.
 */
#ifndef VMIG_VM_OBJECTS_H
#define VMIG_VM_OBJECTS_H

#include <stdbool.h>

#include <jansson.h>
#include <vmig/vmig.h>

#include "util/util.h"

/* Longest id accepted (QEMU has no limit; ours keeps error texts whole). */
#define VM_OBJECT_ID_MAX 64
/* More objects than this is a client gone wrong, not a configuration. */
#define VM_OBJECTS_MAX 256

struct vm_objects;

int vm_objects_new(struct vm_objects **out);
/* Drops every object and the registry's references to their credentials. */
void vm_objects_free(struct vm_objects *objs);

/*
 * object-add in QEMU 6's flat form: {"qom-type": T, "id": ID, PROPERTY...}.
 * Every member is checked (names, JSON types, values) before anything is
 * created; credentials are loaded from their files here, so a missing or
 * bad file fails now with the reason. Returns 0 or -errno with text in err.
 */
int vm_objects_add(struct vm_objects *objs, const json_t *props, struct vmig__err *err);
/* object-del. -ENOENT (text in err) if there is no object with that id. */
int vm_objects_del(struct vm_objects *objs, const char *id, struct vmig__err *err);
/* Whether an object with this id exists (any type). */
bool vm_objects_has(const struct vm_objects *objs, const char *id);
/* Whether any tls-creds-* object exists. */
bool vm_objects_have_tls_creds(const struct vm_objects *objs);

/*
 * The command-line form, QEMU's -object: "TYPE,id=ID,KEY=VALUE,...", where
 * ",," stands for a comma inside a value (for distinguished names), or a
 * JSON object as object-add takes. On success *props is the object-add
 * form (owned by the caller), booleans already converted from on/off.
 * Only the syntax is checked here; vm_objects_add() checks the rest.
 */
int vm_objects_parse_opt(const char *opt, json_t **props, struct vmig__err *err);

#endif
