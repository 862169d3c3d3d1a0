// SPDX-License-Identifier: MIT
/*
 * The object registry of vmig-vm (tls-creds-x509, tls-creds-psk,
 * authz-simple) and the TLS migration parameters that name its objects.
 * See objects.h for what it is for; the engine's side is
 * vmig_tls_creds_new_*() and vmig_session_set_tls().
 *
 * Threat model: properties come from a QMP client or the command line and
 * are untrusted. Every member's name and JSON type is checked against its
 * type's table, strings are bounded and may not hide a NUL, ids follow
 * QEMU's rule, and nothing is created unless the whole request is valid.
 * Loading credentials reads files the client named; a failure there is an
 * error reply with the library's reason, never fatal. Main thread only.
 */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json_util.h"
#include "objects.h"

#define DIR_MAX 3800	  /* leaves room for the file names the library adds */
#define NAME_MAX_LEN 255  /* tls-hostname, username, parameter values */
#define IDENTITY_MAX 1024 /* authz-simple: a distinguished name or a username */

enum obj_type { OBJ_TLS_X509 = 0, OBJ_TLS_PSK, OBJ_AUTHZ_SIMPLE };

struct vm_object {
	char id[VM_OBJECT_ID_MAX + 1];
	enum obj_type type;
	vmig_tls_creds *creds;		 /* tls-creds-*: the registry's reference */
	enum vmig_tls_endpoint endpoint; /* tls-creds-* */
	char *identity;			 /* authz-simple */
	struct vm_object *next;
};

struct vm_objects {
	struct vm_object *head; /* newest first */
	unsigned count;
	/* tls-creds, tls-hostname, tls-authz (vm_tls_param_names order):
	 * never NULL, "" when unset */
	char *tls_param[3];
};

static const struct json_arg_spec x509_props[] = {
    {"qom-type", JA_STR, true},	     {"id", JA_STR, true},
    {"endpoint", JA_STR, false},     {"dir", JA_STR, true},
    {"verify-peer", JA_BOOL, false}, {.name = NULL}};
static const struct json_arg_spec psk_props[] = {{"qom-type", JA_STR, true},
						 {"id", JA_STR, true},
						 {"endpoint", JA_STR, false},
						 {"dir", JA_STR, true},
						 {"verify-peer", JA_BOOL, false},
						 {"username", JA_STR, false},
						 {.name = NULL}};
static const struct json_arg_spec authz_props[] = {
    {"qom-type", JA_STR, true}, {"id", JA_STR, true}, {"identity", JA_STR, true}, {.name = NULL}};

/* QEMU's properties vmig does not implement: refused by name, not as typos. */
static const char *const x509_unsupported[] = {"priority", "sanity-check", "passwordid", NULL};
static const char *const psk_unsupported[] = {"priority", NULL};

static const struct obj_class {
	const char *name;
	const struct json_arg_spec *props;
	const char *const *unsupported;
} classes[] = {
    [OBJ_TLS_X509] = {"tls-creds-x509", x509_props, x509_unsupported},
    [OBJ_TLS_PSK] = {"tls-creds-psk", psk_props, psk_unsupported},
    [OBJ_AUTHZ_SIMPLE] = {"authz-simple", authz_props, NULL},
};

const char *const vm_tls_param_names[] = {"tls-creds", "tls-hostname", "tls-authz", NULL};

static const char *endpoint_name(enum vmig_tls_endpoint ep)
{
	return ep == VMIG_TLS_ENDPOINT_SERVER ? "server" : "client";
}

static const struct obj_class *class_find(const char *name)
{
	for (size_t i = 0; i < VMIG_ARRAY_SIZE(classes); i++)
		if (!strcmp(classes[i].name, name))
			return &classes[i];
	return NULL;
}

static struct vm_object *find(const struct vm_objects *objs, const char *id)
{
	for (struct vm_object *o = objs->head; o; o = o->next)
		if (!strcmp(o->id, id))
			return o;
	return NULL;
}

static void object_free(struct vm_object *o)
{
	vmig_tls_creds_unref(o->creds);
	free(o->identity);
	free(o);
}

int vm_objects_new(struct vm_objects **out)
{
	struct vm_objects *objs = calloc(1, sizeof(*objs));

	if (!objs)
		return -ENOMEM;
	for (size_t i = 0; i < VMIG_ARRAY_SIZE(objs->tls_param); i++) {
		objs->tls_param[i] = strdup("");
		if (!objs->tls_param[i]) {
			vm_objects_free(objs);
			return -ENOMEM;
		}
	}
	*out = objs;
	return 0;
}

void vm_objects_free(struct vm_objects *objs)
{
	struct vm_object *o, *next;

	if (!objs)
		return;
	for (o = objs->head; o; o = next) {
		next = o->next;
		object_free(o);
	}
	for (size_t i = 0; i < VMIG_ARRAY_SIZE(objs->tls_param); i++)
		free(objs->tls_param[i]);
	free(objs);
}

bool vm_objects_has(const struct vm_objects *objs, const char *id)
{
	return find(objs, id) != NULL;
}

bool vm_objects_have_tls_creds(const struct vm_objects *objs)
{
	for (const struct vm_object *o = objs->head; o; o = o->next)
		if (o->creds)
			return true;
	return false;
}

/* ---- object-add ---- */

/* QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'. */
static bool id_wellformed(const char *id)
{
	if (!((*id >= 'a' && *id <= 'z') || (*id >= 'A' && *id <= 'Z')))
		return false;
	for (const char *p = id + 1; *p; p++)
		if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._",
			    *p))
			return false;
	return true;
}

/* A string value: no NUL inside, at most max bytes, and not empty if
 * nonempty. */
static int check_str_value(const json_t *v, const char *name, size_t max, bool nonempty,
			   struct vmig__err *err)
{
	size_t len = json_string_length(v);

	if (strlen(json_string_value(v)) != len) {
		vmig__err_set(err, "Parameter '%s' must not contain a NUL character", name);
		return -EINVAL;
	}
	if (len > max) {
		vmig__err_set(err, "Parameter '%s' is longer than %zu bytes", name, max);
		return -EINVAL;
	}
	if (nonempty && !len) {
		vmig__err_set(err, "Parameter '%s' must not be empty", name);
		return -EINVAL;
	}
	return 0;
}

/* A string member of props, if present (its type is already checked). */
static int check_str(const json_t *props, const char *name, size_t max, bool nonempty,
		     struct vmig__err *err)
{
	const json_t *v = json_object_get(props, name);

	return v ? check_str_value(v, name, max, nonempty, err) : 0;
}

/* The class named by qom-type, or NULL with err set. */
static const struct obj_class *props_class(const json_t *props, struct vmig__err *err)
{
	const json_t *t = props ? json_object_get(props, "qom-type") : NULL;
	const struct obj_class *cls;

	if (props && !json_is_object(props)) {
		vmig__err_set(err, "QMP input member 'arguments' must be an object");
		return NULL;
	}
	if (!t) {
		vmig__err_set(err, "Parameter 'qom-type' is missing");
		return NULL;
	}
	if (!json_is_string(t)) {
		vmig__err_set(err, "Invalid parameter type for 'qom-type', expected: string");
		return NULL;
	}
	cls = class_find(json_string_value(t));
	if (!cls)
		vmig__err_set(err,
			      "Parameter 'qom-type' does not accept value '%.60s' (vmig-vm has "
			      "tls-creds-x509, tls-creds-psk and authz-simple)",
			      json_string_value(t));
	return cls;
}

/* Everything about props except loading the credentials. */
static int check_props(const struct vm_objects *objs, const struct obj_class *cls,
		       const json_t *props, struct vmig__err *err)
{
	const char *id, *ep;

	for (const char *const *u = cls->unsupported; u && *u; u++) {
		if (json_object_get(props, *u)) {
			vmig__err_set(err, "Property '%s' of %s is not supported by vmig", *u,
				      cls->name);
			return -EOPNOTSUPP;
		}
	}
	if (json_args_check(props, cls->props, err) ||
	    check_str(props, "id", VM_OBJECT_ID_MAX, true, err) ||
	    check_str(props, "dir", DIR_MAX, true, err) ||
	    check_str(props, "username", NAME_MAX_LEN, true, err) ||
	    check_str(props, "identity", IDENTITY_MAX, true, err) ||
	    check_str(props, "endpoint", NAME_MAX_LEN, false, err))
		return -EINVAL;
	id = json_arg_str(props, "id", "");
	if (!id_wellformed(id)) {
		vmig__err_set(err,
			      "Parameter 'id' expects an identifier (letters, digits, '-', '.', "
			      "'_', starting with a letter), not '%s'",
			      id);
		return -EINVAL;
	}
	if (find(objs, id)) {
		vmig__err_set(err,
			      "attempt to add duplicate object id '%s': an object with that "
			      "id exists (object-del it first)",
			      id);
		return -EEXIST;
	}
	ep = json_arg_str(props, "endpoint", "client");
	if (strcmp(ep, "client") && strcmp(ep, "server")) {
		vmig__err_set(
		    err, "Parameter 'endpoint' does not accept value '%.60s' (client or server)",
		    ep);
		return -EINVAL;
	}
	if (objs->count >= VM_OBJECTS_MAX) {
		vmig__err_set(err, "Too many objects (%d): object-del some first", VM_OBJECTS_MAX);
		return -ENOSPC;
	}
	return 0;
}

/* Load the credentials of a tls-creds-* object that passed check_props(). */
static int load_creds(struct vm_object *o, const struct obj_class *cls, const json_t *props,
		      struct vmig__err *err)
{
	struct vmig_tls_creds_opts opts = {
	    .size = sizeof(opts),
	    .endpoint = o->endpoint,
	    .dir = json_arg_str(props, "dir", ""),
	    .verify_peer = json_arg_bool(props, "verify-peer", true),
	    .username = json_arg_str(props, "username", NULL),
	};
	char reason[sizeof(err->msg)] = "";
	int ret;

	if (o->type == OBJ_TLS_X509)
		ret = vmig_tls_creds_new_x509(&o->creds, &opts, reason, sizeof(reason));
	else
		ret = vmig_tls_creds_new_psk(&o->creds, &opts, reason, sizeof(reason));
	if (ret) {
		o->creds = NULL;
		vmig__err_set(err, "%s '%s': %.200s", cls->name, o->id,
			      reason[0] ? reason : strerror(ret < 0 ? -ret : EINVAL));
		return ret < 0 ? ret : -EINVAL;
	}
	return 0;
}

int vm_objects_add(struct vm_objects *objs, const json_t *props, struct vmig__err *err)
{
	const struct obj_class *cls = props_class(props, err);
	struct vm_object *o;
	int ret;

	if (!cls)
		return -EINVAL;
	ret = check_props(objs, cls, props, err);
	if (ret)
		return ret;
	o = calloc(1, sizeof(*o));
	if (!o)
		goto nomem;
	snprintf(o->id, sizeof(o->id), "%s", json_arg_str(props, "id", ""));
	o->type = (enum obj_type)(cls - classes);
	if (o->type == OBJ_AUTHZ_SIMPLE) {
		o->identity = strdup(json_arg_str(props, "identity", ""));
		if (!o->identity)
			goto nomem;
	} else {
		o->endpoint = strcmp(json_arg_str(props, "endpoint", "client"), "server")
				  ? VMIG_TLS_ENDPOINT_CLIENT
				  : VMIG_TLS_ENDPOINT_SERVER;
		ret = load_creds(o, cls, props, err);
		if (ret) {
			object_free(o);
			return ret;
		}
	}
	o->next = objs->head;
	objs->head = o;
	objs->count++;
	return 0;
nomem:
	free(o);
	vmig__err_set(err, "object-add: %s", strerror(ENOMEM));
	return -ENOMEM;
}

int vm_objects_del(struct vm_objects *objs, const char *id, struct vmig__err *err)
{
	for (struct vm_object **pp = &objs->head; *pp; pp = &(*pp)->next) {
		struct vm_object *o = *pp;

		if (strcmp(o->id, id))
			continue;
		*pp = o->next;
		objs->count--;
		object_free(o);
		return 0;
	}
	vmig__err_set(err, "object '%.100s' not found", id);
	return -ENOENT;
}

/* ---- the command-line form ---- */

static int parse_bool(const char *s, bool *on)
{
	static const char *const yes[] = {"on", "yes", "true", NULL};
	static const char *const no[] = {"off", "no", "false", NULL};

	for (int i = 0; yes[i]; i++) {
		if (!strcmp(s, yes[i]) || !strcmp(s, no[i])) {
			*on = !strcmp(s, yes[i]);
			return 0;
		}
	}
	return -EINVAL;
}

/* The keyval form gives strings; turn the class's boolean members into
 * booleans, as QEMU's keyval visitor does. */
static int convert_bools(json_t *props, struct vmig__err *err)
{
	const json_t *t = json_object_get(props, "qom-type");
	const struct obj_class *cls = json_is_string(t) ? class_find(json_string_value(t)) : NULL;

	for (const struct json_arg_spec *s = cls ? cls->props : NULL; s && s->name; s++) {
		json_t *v = json_object_get(props, s->name);
		bool on;

		if (s->type != JA_BOOL || !v)
			continue;
		if (parse_bool(json_string_value(v), &on)) {
			vmig__err_set(err, "Parameter '%s' expects 'on' or 'off'", s->name);
			return -EINVAL;
		}
		json_object_set_new(props, s->name, json_boolean(on));
	}
	return 0;
}

/* One "KEY=VALUE" (or the leading TYPE) into props. */
static int keyval_add(json_t *props, char *tok, bool first, struct vmig__err *err)
{
	char *eq = strchr(tok, '=');
	const char *key = tok, *val;

	if (!eq && first) {
		key = "qom-type";
		val = tok;
	} else if (!eq) {
		vmig__err_set(err, "Expected '=' after parameter '%.100s'", tok);
		return -EINVAL;
	} else {
		*eq = '\0';
		val = eq + 1;
	}
	if (!*key) {
		vmig__err_set(err, "A property name is empty (a ',' where none belongs?)");
		return -EINVAL;
	}
	if (json_object_get(props, key)) {
		vmig__err_set(err, "Parameter '%.100s' is given more than once", key);
		return -EINVAL;
	}
	return json_object_set_new(props, key, json_string(val)) ? -ENOMEM : 0;
}

/* "TYPE,KEY=VALUE,..." with ",," for a comma inside a token. */
static int parse_keyval(const char *opt, json_t *props, struct vmig__err *err)
{
	char *tok = malloc(strlen(opt) + 1);
	const char *p = opt;
	int ret = 0;

	if (!tok)
		return -ENOMEM;
	for (bool first = true; !ret; first = false) {
		size_t n = 0;

		while (*p && !(p[0] == ',' && p[1] != ',')) {
			tok[n++] = *p;
			p += p[0] == ',' ? 2 : 1; /* ",," is one comma */
		}
		tok[n] = '\0';
		if (!n) {
			vmig__err_set(err, "%s",
				      first ? "Parameter 'qom-type' is missing"
					    : "Empty property (a ',' too many?)");
			ret = -EINVAL;
			break;
		}
		ret = keyval_add(props, tok, first, err);
		if (!*p)
			break;
		p++; /* the separating ',' */
	}
	free(tok);
	return ret;
}

int vm_objects_parse_opt(const char *opt, json_t **props, struct vmig__err *err)
{
	json_error_t jerr;
	json_t *obj;
	int ret;

	*props = NULL;
	if (opt[0] == '{') {
		obj = json_loads(opt, JSON_REJECT_DUPLICATES, &jerr);
		if (!json_is_object(obj)) {
			vmig__err_set(err, "JSON parse error, %.200s",
				      obj ? "not an object" : jerr.text);
			json_decref(obj);
			return -EINVAL;
		}
		*props = obj;
		return 0;
	}
	obj = json_object();
	if (!obj)
		return -ENOMEM;
	ret = parse_keyval(opt, obj, err);
	if (!ret)
		ret = convert_bools(obj, err);
	if (ret) {
		json_decref(obj);
		return ret;
	}
	*props = obj;
	return 0;
}

/* ---- migration parameters ---- */

static int tls_param_index(const char *name)
{
	for (int i = 0; vm_tls_param_names[i]; i++)
		if (!strcmp(vm_tls_param_names[i], name))
			return i;
	return -1;
}

bool vm_tls_param_is(const char *name)
{
	return tls_param_index(name) >= 0;
}

int vm_tls_param_check(const char *name, const json_t *value, struct vmig__err *err)
{
	if (json_is_null(value))
		return 0;
	if (!json_is_string(value)) {
		vmig__err_set(err, "Invalid parameter type for '%s', expected: string", name);
		return -EINVAL;
	}
	return check_str_value(value, name, NAME_MAX_LEN, false, err);
}

int vm_tls_param_set(struct vm_objects *objs, const char *name, const json_t *value)
{
	int i = tls_param_index(name);
	char *s;

	assert(i >= 0);
	s = strdup(json_is_string(value) ? json_string_value(value) : "");
	if (!s)
		return -ENOMEM;
	free(objs->tls_param[i]);
	objs->tls_param[i] = s;
	return 0;
}

const char *vm_tls_param_get(const struct vm_objects *objs, const char *name)
{
	int i = tls_param_index(name);

	return i >= 0 ? objs->tls_param[i] : NULL;
}

/* The tls-authz object for a server, or NULL with err set. */
static const struct vm_object *authz_find(const struct vm_objects *objs, const char *id,
					  struct vmig__err *err)
{
	const struct vm_object *a = find(objs, id);

	if (!a)
		vmig__err_set(err, "tls-authz: no authz-simple object with id '%.100s'", id);
	else if (a->type != OBJ_AUTHZ_SIMPLE)
		vmig__err_set(err, "tls-authz: object '%.100s' is a %s, not an authz-simple", id,
			      classes[a->type].name);
	return a && a->type == OBJ_AUTHZ_SIMPLE ? a : NULL;
}

int vm_objects_apply_tls(const struct vm_objects *objs, vmig_session *s,
			 enum vmig_tls_endpoint endpoint, struct vmig__err *err)
{
	const char *creds_id = objs->tls_param[0], *host = objs->tls_param[1];
	const char *authz_id = objs->tls_param[2];
	const bool server = endpoint == VMIG_TLS_ENDPOINT_SERVER;
	const struct vm_object *c = NULL, *a = NULL;
	const char *detail;
	int ret;

	if (*creds_id) {
		c = find(objs, creds_id);
		if (!c) {
			vmig__err_set(err, "No TLS credentials with id '%.100s'", creds_id);
			return -ENOENT;
		}
		if (!c->creds) {
			vmig__err_set(err,
				      "No TLS credentials with id '%.100s': it is an %s object",
				      creds_id, classes[c->type].name);
			return -EINVAL;
		}
		if (c->endpoint != endpoint) {
			vmig__err_set(err,
				      "Expected TLS credentials for a %s endpoint: '%.100s' has "
				      "endpoint=%s",
				      endpoint_name(endpoint), creds_id,
				      endpoint_name(c->endpoint));
			return -EINVAL;
		}
	}
	/* Only the server authorizes its peer. Without TLS there is nobody to
	 * authorize: refuse rather than let anyone in unauthenticated. */
	if (server && *authz_id && !c) {
		vmig__err_set(err,
			      "tls-authz '%.100s' is set but tls-creds is not: set tls-creds "
			      "too, or tls-authz to \"\"",
			      authz_id);
		return -EINVAL;
	}
	if (server && *authz_id && !(a = authz_find(objs, authz_id, err)))
		return -ENOENT;
	ret = vmig_session_set_tls(s, c ? c->creds : NULL, c && !server && *host ? host : NULL,
				   a ? a->identity : NULL);
	if (!ret || ret == -EBUSY)
		return 0;
	detail = vmig_session_error(s);
	vmig__err_set(err, "TLS: %.200s", detail && *detail ? detail : strerror(-ret));
	return ret;
}
