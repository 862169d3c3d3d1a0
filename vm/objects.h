/* SPDX-License-Identifier: MIT */
/*
 * QEMU's user-creatable objects that migration needs, with QEMU's names:
 * tls-creds-x509, tls-creds-psk and authz-simple. They are created by
 * --object on the command line or QMP object-add, removed by object-del, and
 * named by id from the migration parameters tls-creds and tls-authz.
 *
 * Those parameters and tls-hostname are kept here too: they are strings the
 * engine never sees. vm_objects_apply_tls() resolves them into
 * vmig_session_set_tls() when a migration starts, as QEMU resolves its
 * parameters at that moment, not when they are set.
 *
 * Not thread-safe: everything here runs on the main (QMP) thread. The engine
 * holds its own reference to the credentials it was given, so object-del
 * never pulls them from under a running migration.
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

/* ---- the migration parameters tls-creds, tls-hostname, tls-authz ---- */

/* NULL-terminated, in the order query-migrate-parameters lists them. */
extern const char *const vm_tls_param_names[];
bool vm_tls_param_is(const char *name);
/* Check a migrate-set-parameters value: a string, or null meaning "" as
 * QEMU's StrOrNull. Returns 0 or -EINVAL with text in err. */
int vm_tls_param_check(const char *name, const json_t *value, struct vmig__err *err);
/* Set a value that passed vm_tls_param_check(). Returns 0 or -ENOMEM. */
int vm_tls_param_set(struct vm_objects *objs, const char *name, const json_t *value);
/* The current value, "" when unset (never NULL for a name of the list). */
const char *vm_tls_param_get(const struct vm_objects *objs, const char *name);

/*
 * Resolve the parameters for a migration about to start on the side that
 * uses endpoint (client: migrate, migrate with resume; server:
 * migrate-incoming, migrate-recover) and hand them to the session. With
 * tls-creds "" TLS is turned off. Errors (with QEMU's wording where QEMU
 * has one): an unknown tls-creds id, an object of another type, credentials
 * for the other endpoint, a tls-authz that names no authz-simple object.
 * -EBUSY from the session (a migration runs) is not an error here: the
 * engine call that follows refuses with its own reason.
 */
int vm_objects_apply_tls(const struct vm_objects *objs, vmig_session *s,
			 enum vmig_tls_endpoint endpoint, struct vmig__err *err);

#endif
