// SPDX-License-Identifier: MIT
/*
 * The QMP commands of vmig-vm, with QEMU's names, arguments and reply
 * shapes, driving the VM (vm.h) and its libvmig session (vmig.h).
 *
 * Threat model: arguments come from an untrusted client. The dispatcher
 * checks them against each command's table (names, types, required) before
 * a handler runs; handlers then validate values (capability and parameter
 * names, ranges) before anything is changed, so a bad request changes
 * nothing. Runs on the QMP thread only.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vmig/vmig.h>

#include "objects.h"
#include "qmp_int.h"
#include "vm.h"

static int fail(struct qmp_cmd_ctx *ctx, int ret, const char *what)
{
	const char *detail = ctx->vm ? vmig_session_error(vm_session(ctx->vm)) : "";

	if (detail && *detail)
		vmig__err_set(&ctx->err, "%s: %s", what, detail);
	else
		vmig__err_set(&ctx->err, "%s: %s", what, strerror(ret < 0 ? -ret : EINVAL));
	return ret < 0 ? ret : -EINVAL;
}

static bool name_in(const char *const *names, const char *name)
{
	for (; names && *names; names++)
		if (!strcmp(*names, name))
			return true;
	return false;
}

/* ---- run state ---- */

static int cmd_qmp_capabilities(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	/* Handled by the dispatcher, which knows the client; listed for query-commands. */
	vmig__err_set(&ctx->err, "Capabilities negotiation is already complete, command ignored");
	ctx->err_class = "CommandNotFound";
	return -EINVAL;
}

static int cmd_query_status(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	enum vm_runstate rs = vm_get_runstate(ctx->vm);

	ctx->ret = json_pack("{s:b,s:b,s:s}", "running", vm_is_running(ctx->vm), "singlestep", 0,
			     "status", vm_runstate_name(rs));
	return ctx->ret ? 0 : -ENOMEM;
}

static int cmd_stop(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	int ret = vm_stop(ctx->vm);

	if (ret) {
		vmig__err_set(&ctx->err, "stop: %s", strerror(-ret));
		return ret;
	}
	return 0;
}

static int cmd_cont(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	int ret = vm_cont(ctx->vm);

	if (ret == -ENODATA) {
		vmig__err_set(&ctx->err, "cont refused: post-copy failed after the guest started "
					 "here, so some of its memory never arrived; the source "
					 "holds the only complete copy");
		return ret;
	}
	if (ret) {
		vmig__err_set(&ctx->err, "cont is not possible in state '%s': %s",
			      vm_runstate_name(vm_get_runstate(ctx->vm)), strerror(-ret));
		return ret;
	}
	return 0;
}

static int cmd_quit(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	qmp_server_request_quit(ctx->srv);
	return 0;
}

/* ---- migration ---- */

static const struct json_arg_spec migrate_args[] = {
    {"uri", JA_STR, true},   {"detach", JA_BOOL, false}, {"blk", JA_BOOL, false},
    {"inc", JA_BOOL, false}, {"resume", JA_BOOL, false}, {.name = NULL}};

/*
 * The TLS parameters are ids, resolved now that a migration starts on the
 * side that uses endpoint (as QEMU does), and handed to the session.
 */
static int apply_tls(struct qmp_cmd_ctx *ctx, enum vmig_tls_endpoint endpoint)
{
	return vm_objects_apply_tls(vm_objects(ctx->vm), vm_session(ctx->vm), endpoint, &ctx->err);
}

static int cmd_migrate(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	int ret;

	if (json_arg_bool(args, "blk", false) || json_arg_bool(args, "inc", false)) {
		vmig__err_set(&ctx->err, "Block migration (blk, inc) is not supported by vmig");
		return -EOPNOTSUPP;
	}
	ret = apply_tls(ctx, VMIG_TLS_ENDPOINT_CLIENT);
	if (ret)
		return ret;
	if (json_arg_bool(args, "resume", false)) {
		ret = vmig_resume(vm_session(ctx->vm), json_arg_str(args, "uri", ""));
		return ret ? fail(ctx, ret, "migrate (resume)") : 0;
	}
	ret = vmig_migrate(vm_session(ctx->vm), json_arg_str(args, "uri", ""));
	return ret ? fail(ctx, ret, "migrate") : 0;
}

static const struct json_arg_spec uri_args[] = {{"uri", JA_STR, true}, {.name = NULL}};

static int cmd_migrate_incoming(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	enum vm_runstate rs = vm_get_runstate(ctx->vm);
	int ret;

	/* Loading RAM into a VM that already runs (or ran) would destroy it. */
	if (rs != VM_RS_INMIGRATE && rs != VM_RS_PRELAUNCH) {
		vmig__err_set(&ctx->err,
			      "migrate-incoming needs a VM started with --incoming defer (state is "
			      "'%s')",
			      vm_runstate_name(rs));
		return -EINVAL;
	}
	ret = apply_tls(ctx, VMIG_TLS_ENDPOINT_SERVER);
	if (ret)
		return ret;
	ret = vmig_incoming(vm_session(ctx->vm), json_arg_str(args, "uri", ""));
	return ret ? fail(ctx, ret, "migrate-incoming") : 0;
}

static int cmd_migrate_cancel(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	int ret = vmig_cancel(vm_session(ctx->vm));

	return ret ? fail(ctx, ret, "migrate_cancel") : 0;
}

static int cmd_start_postcopy(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	int ret = vmig_start_postcopy(vm_session(ctx->vm));

	return ret ? fail(ctx, ret, "migrate-start-postcopy") : 0;
}

static int cmd_migrate_pause(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	int ret = vmig_pause(vm_session(ctx->vm));

	return ret ? fail(ctx, ret, "migrate-pause") : 0;
}

static const struct json_arg_spec continue_args[] = {{"state", JA_STR, true}, {.name = NULL}};

/* QEMU's migrate-continue: only "pre-switchover" waits for it. */
static int cmd_migrate_continue(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	const char *name = json_arg_str(args, "state", "");
	int ret;

	for (int st = 0; st < VMIG_STATUS__MAX; st++) {
		if (strcmp(vmig_status_name((enum vmig_status)st), name))
			continue;
		ret = vmig_continue(vm_session(ctx->vm), (enum vmig_status)st);
		return ret ? fail(ctx, ret, "migrate-continue") : 0;
	}
	vmig__err_set(&ctx->err, "migrate-continue: '%s' is not a migration status", name);
	return -EINVAL;
}

static int cmd_migrate_recover(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	int ret = apply_tls(ctx, VMIG_TLS_ENDPOINT_SERVER);

	if (ret)
		return ret;
	ret = vmig_recover(vm_session(ctx->vm), json_arg_str(args, "uri", ""));
	return ret ? fail(ctx, ret, "migrate-recover") : 0;
}

static int cmd_query_migrate(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	struct vmig_stats st;
	int ret;

	memset(&st, 0, sizeof(st));
	ret = vmig_query(vm_session(ctx->vm), &st);
	if (ret)
		return fail(ctx, ret, "query-migrate");
	ctx->ret = qmp_stats_to_json(&st);
	return ctx->ret ? 0 : -ENOMEM;
}

/* ---- capabilities and parameters ---- */

/*
 * QEMU 2.11's experimental multifd names, which tutorials of that time
 * still show: accepted for the current ones, with a deprecation warning
 * where QEMU prints its warnings (the HMP output, else stderr). The page
 * count has no equivalent: vmig deals pages to channels in chunks of 64
 * (one dirty-bitmap word), so the value is checked as QEMU 2.11 did and
 * then ignored.
 */
static const struct {
	const char *old, *now; /* now NULL: accepted and ignored */
} name_aliases[] = {
    {"x-multifd", "multifd"},
    {"x-multifd-channels", "multifd-channels"},
    {"x-multifd-page-count", NULL},
};
#define PAGE_COUNT_MIN 1 /* QEMU 2.11's bounds for x-multifd-page-count */
#define PAGE_COUNT_MAX 10000

static bool is_alias(const char *name)
{
	for (size_t i = 0; i < VMIG_ARRAY_SIZE(name_aliases); i++)
		if (!strcmp(name, name_aliases[i].old))
			return true;
	return false;
}

/* The current name for name: itself if it is not an old one, NULL for an
 * old name that is accepted and ignored. */
static const char *current_name(const char *name)
{
	for (size_t i = 0; i < VMIG_ARRAY_SIZE(name_aliases); i++)
		if (!strcmp(name, name_aliases[i].old))
			return name_aliases[i].now;
	return name;
}

static void warn_report(struct qmp_cmd_ctx *ctx, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void warn_report(struct qmp_cmd_ctx *ctx, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	if (ctx->hmp_out) {
		fputs("warning: ", ctx->hmp_out);
		vfprintf(ctx->hmp_out, fmt, ap);
		fputc('\n', ctx->hmp_out);
	} else {
		fputs("vmig-vm: warning: ", stderr);
		vfprintf(stderr, fmt, ap);
		fputc('\n', stderr);
	}
	va_end(ap);
}

static void warn_alias(struct qmp_cmd_ctx *ctx, const char *kind, const char *old)
{
	const char *now = current_name(old);

	if (now)
		warn_report(ctx, "%s '%s' is deprecated, use '%s'", kind, old, now);
	else
		warn_report(
		    ctx, "%s '%s' is deprecated and ignored: vmig sends pages in runs of up to 64",
		    kind, old);
}

static const struct json_arg_spec set_caps_args[] = {{"capabilities", JA_ARRAY, true}, {.name = NULL}};

/* Validate every element before changing anything, as QEMU does. */
static int check_caps(struct qmp_cmd_ctx *ctx, const json_t *list)
{
	static const struct json_arg_spec elem[] = {
	    {"capability", JA_STR, true}, {"state", JA_BOOL, true}, {.name = NULL}};
	size_t i;
	json_t *v;

	json_array_foreach((json_t *)list, i, v)
	{
		const char *name;

		if (!json_is_object(v)) {
			vmig__err_set(&ctx->err,
				      "Invalid parameter type for 'capabilities[%zu]', "
				      "expected: object",
				      i);
			return -EINVAL;
		}
		if (json_args_check(v, elem, &ctx->err))
			return -EINVAL;
		name = json_arg_str(v, "capability", "");
		if (!current_name(name) || !name_in(vmig_capability_names(), current_name(name))) {
			vmig__err_set(&ctx->err,
				      "Parameter 'capability' does not accept value '%.200s'",
				      name);
			return -EINVAL;
		}
	}
	return 0;
}

static int cmd_set_caps(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	const json_t *list = json_object_get(args, "capabilities");
	size_t i;
	json_t *v;
	int ret;

	ret = check_caps(ctx, list);
	if (ret)
		return ret;
	json_array_foreach((json_t *)list, i, v)
	{
		const char *name = json_arg_str(v, "capability", "");

		if (is_alias(name))
			warn_alias(ctx, "capability", name);
		name = current_name(name);
		ret = vmig_capability_set(vm_session(ctx->vm), name, json_arg_bool(v, "state", 0));
		if (ret) {
			vmig__err_set(&ctx->err, "Cannot set capability '%.100s': %.120s", name,
				      ret == -EBUSY ? "not while a migration is running"
						    : strerror(-ret));
			return ret;
		}
	}
	return 0;
}

static int cmd_query_caps(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	json_t *list = json_array();

	for (const char *const *n = vmig_capability_names(); list && n && *n; n++) {
		bool on = false;

		if (vmig_capability_get(vm_session(ctx->vm), *n, &on))
			continue;
		json_array_append_new(list, json_pack("{s:s,s:b}", "capability", *n, "state", on));
	}
	ctx->ret = list;
	return list ? 0 : -ENOMEM;
}

/*
 * A parameter's value from JSON: an integer, or for QEMU's enum parameters
 * (multifd-compression) one of the names. -1 with ctx->err set if neither.
 */
static int param_value(struct qmp_cmd_ctx *ctx, const char *key, const json_t *v, int64_t *out)
{
	const char *const *choices = vmig_parameter_choices(key);

	if (!choices && json_is_integer(v)) {
		*out = json_integer_value(v);
		return 0;
	}
	for (int i = 0; choices && json_is_string(v) && choices[i]; i++) {
		if (!strcmp(choices[i], json_string_value(v))) {
			*out = i;
			return 0;
		}
	}
	if (choices && json_is_string(v))
		vmig__err_set(&ctx->err, "Parameter '%.100s' does not accept value '%.100s'", key,
			      json_string_value(v));
	else
		vmig__err_set(&ctx->err, "Invalid parameter type for '%.200s', expected: %s", key,
			      choices ? "string" : "integer");
	return -1;
}

/* Every member is checked before anything is set, as QEMU does. The TLS
 * parameters (strings the engine does not keep) are set last, once the
 * engine's have all been accepted. */
static int check_params(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	const char *key;
	int64_t val;
	json_t *v;

	json_object_foreach((json_t *)args, key, v)
	{
		if (vm_tls_param_is(key)) {
			if (vm_tls_param_check(key, v, &ctx->err))
				return -EINVAL;
			continue;
		}
		if (!current_name(key)) { /* x-multifd-page-count */
			if (param_value(ctx, key, v, &val))
				return -EINVAL;
			if (val < PAGE_COUNT_MIN || val > PAGE_COUNT_MAX) {
				vmig__err_set(
				    &ctx->err,
				    "Parameter '%.100s' expects a value between %d and %d", key,
				    PAGE_COUNT_MIN, PAGE_COUNT_MAX);
				return -EINVAL;
			}
			continue;
		}
		if (!name_in(vmig_parameter_names(), current_name(key))) {
			vmig__err_set(&ctx->err, "Parameter '%.200s' is unexpected", key);
			return -EINVAL;
		}
		if (param_value(ctx, current_name(key), v, &val))
			return -EINVAL;
	}
	return 0;
}

/* migrate-set-parameters takes any subset of the names, as members. */
static int cmd_set_params(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	const char *key, *name;
	int64_t val;
	json_t *v;
	int ret;

	ret = check_params(ctx, args);
	if (ret)
		return ret;
	json_object_foreach((json_t *)args, key, v)
	{
		if (vm_tls_param_is(key))
			continue;
		if (is_alias(key))
			warn_alias(ctx, "parameter", key);
		/* Not key itself: json_object_foreach steps on from it. */
		name = current_name(key);
		if (!name)
			continue;
		param_value(ctx, name, v, &val);
		ret = vmig_parameter_set(vm_session(ctx->vm), name, val);
		if (ret == -ENOTSUP) {
			vmig__err_set(&ctx->err, "%.200s", vmig_session_error(vm_session(ctx->vm)));
			return ret;
		}
		if (ret) {
			vmig__err_set(&ctx->err, "Parameter '%.100s' cannot be set to %lld: %.100s",
				      key, (long long)val,
				      ret == -EBUSY ? "not while a migration is running"
				      : ret == -ERANGE || ret == -EINVAL ? "value out of range"
									 : strerror(-ret));
			return ret;
		}
	}
	json_object_foreach((json_t *)args, key, v)
	{
		if (vm_tls_param_is(key) && vm_tls_param_set(vm_objects(ctx->vm), key, v))
			return -ENOMEM;
	}
	return 0;
}

static int cmd_query_params(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	json_t *obj = json_object();

	for (const char *const *n = vmig_parameter_names(); obj && n && *n; n++) {
		const char *const *choices = vmig_parameter_choices(*n);
		int64_t val;

		if (vmig_parameter_get(vm_session(ctx->vm), *n, &val))
			continue;
		if (choices) /* the value is an index into its names */
			json_object_set_new(obj, *n, json_string(choices[val]));
		else
			json_object_set_new(obj, *n, json_integer(val));
	}
	/* QEMU lists these always, "" when unset. */
	for (const char *const *n = vm_tls_param_names; obj && *n; n++)
		json_object_set_new(obj, *n,
				    json_string(vm_tls_param_get(vm_objects(ctx->vm), *n)));
	ctx->ret = obj;
	return obj ? 0 : -ENOMEM;
}

/* ---- objects ---- */

/* QEMU 6's flat form: qom-type, id and the type's properties as members. */
static int cmd_object_add(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	return vm_objects_add(vm_objects(ctx->vm), args, &ctx->err);
}

static const struct json_arg_spec object_del_args[] = {{"id", JA_STR, true}, {.name = NULL}};

/* An object a TLS parameter names may go: a running migration holds its
 * own reference, and the next one reports the id as unknown. */
static int cmd_object_del(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	return vm_objects_del(vm_objects(ctx->vm), json_arg_str(args, "id", ""), &ctx->err);
}

/* ---- query-migrate ---- */

static json_t *ram_json(const struct vmig_stats *st)
{
	json_t *ram = json_object();

#define RAM_U64(key, field) json_object_set_new(ram, key, json_integer((json_int_t)st->ram.field))
	if (!ram)
		return NULL;
	RAM_U64("transferred", transferred);
	RAM_U64("remaining", remaining);
	RAM_U64("total", total);
	RAM_U64("duplicate", duplicate);
	json_object_set_new(ram, "skipped", json_integer(0)); /* deprecated in QEMU, always 0 */
	RAM_U64("normal", normal);
	RAM_U64("normal-bytes", normal_bytes);
	RAM_U64("dirty-sync-count", dirty_sync_count);
	json_object_set_new(ram, "mbps", json_real(st->ram.mbps));
	RAM_U64("dirty-pages-rate", dirty_pages_rate);
	RAM_U64("pages-per-second", pages_per_second);
	RAM_U64("precopy-bytes", precopy_bytes);
	RAM_U64("downtime-bytes", downtime_bytes);
	RAM_U64("postcopy-bytes", postcopy_bytes);
	RAM_U64("postcopy-requests", postcopy_requests);
	RAM_U64("page-size", page_size);
	RAM_U64("multifd-bytes", multifd_bytes);
	RAM_U64("dirty-sync-missed-zero-copy", dirty_sync_missed_zero_copy);
#undef RAM_U64
	return ram;
}

/* Destination: what has arrived so far, over every connection and channel.
 * QEMU reports no ram there; the names are those of its ram, less the
 * figures only a source knows. */
static json_t *dest_ram_json(const struct vmig_stats *st)
{
	static const char *const source_only[] = {
	    "remaining",	 "skipped",	  "dirty-pages-rate",
	    "pages-per-second",	 "precopy-bytes", "downtime-bytes",
	    "postcopy-requests", "page-size",	  "dirty-sync-missed-zero-copy"};
	json_t *ram = ram_json(st);

	for (size_t i = 0; ram && i < sizeof(source_only) / sizeof(source_only[0]); i++)
		json_object_del(ram, source_only[i]);
	return ram;
}

static json_t *u64_list(const uint64_t *v, unsigned n)
{
	json_t *a = json_array();

	for (unsigned i = 0; a && i < n; i++)
		json_array_append_new(a, json_integer((json_int_t)v[i]));
	return a;
}

/* Destination post-copy figures, as QEMU reports them (blocktime in ms,
 * latencies in ns as QEMU 10.1, the distribution in power-of-two us). */
static void postcopy_json(json_t *obj, const struct vmig_stats *st)
{
	unsigned n = st->postcopy.nvcpus;

	json_object_set_new(obj, "postcopy-blocktime",
			    json_integer((json_int_t)st->postcopy.blocktime_ms));
	json_object_set_new(obj, "postcopy-vcpu-blocktime",
			    u64_list(st->postcopy.vcpu_blocktime_ms, n));
	json_object_set_new(obj, "postcopy-latency",
			    json_integer((json_int_t)st->postcopy.latency_ns));
	json_object_set_new(obj, "postcopy-vcpu-latency", u64_list(st->postcopy.vcpu_latency_ns, n));
	json_object_set_new(obj, "postcopy-non-vcpu-latency",
			    json_integer((json_int_t)st->postcopy.non_vcpu_latency_ns));
	json_object_set_new(obj, "postcopy-latency-dist",
			    u64_list(st->postcopy.latency_dist, VMIG_LATENCY_BUCKETS));
	json_object_set_new(obj, "x-vmig-postcopy-latency-p50",
			    json_integer((json_int_t)st->postcopy.latency_p50_ns));
	json_object_set_new(obj, "x-vmig-postcopy-latency-p99",
			    json_integer((json_int_t)st->postcopy.latency_p99_ns));
	json_object_set_new(obj, "x-vmig-postcopy-faults",
			    json_integer((json_int_t)st->postcopy.faults));
	json_object_set_new(obj, "x-vmig-postcopy-requests",
			    json_integer((json_int_t)st->postcopy.requests));
}

/*
 * Which fields apply follows QEMU: nothing before any migration; the status
 * alone during setup, on the destination and after cancel; times and ram
 * while running ("expected-downtime") and once completed ("downtime");
 * "error-desc" when failed.
 */
json_t *qmp_stats_to_json(const struct vmig_stats *st)
{
	json_t *obj = json_object();
	bool running = false, done = false;

	if (!obj || st->status == VMIG_STATUS_NONE || st->status >= VMIG_STATUS__MAX)
		return obj;
	json_object_set_new(obj, "status", json_string(vmig_status_name(st->status)));
	switch (st->status) {
	case VMIG_STATUS_ACTIVE:
	case VMIG_STATUS_CANCELLING:
	case VMIG_STATUS_POSTCOPY_ACTIVE:
	case VMIG_STATUS_POSTCOPY_PAUSED:
	case VMIG_STATUS_POSTCOPY_RECOVER:
	case VMIG_STATUS_DEVICE:
	case VMIG_STATUS_PRE_SWITCHOVER:
		running = true;
		break;
	case VMIG_STATUS_COMPLETED:
		done = true;
		break;
	default:
		break;
	}
	if (st->is_source && (running || done)) {
		json_object_set_new(obj, "total-time", json_integer(st->total_time_ms));
		json_object_set_new(obj, "setup-time", json_integer(st->setup_time_ms));
		if (running)
			json_object_set_new(obj, "expected-downtime",
					    json_integer(st->expected_downtime_ms));
		else
			json_object_set_new(obj, "downtime", json_integer(st->downtime_ms));
		if (running && st->cpu_throttle_percentage)
			json_object_set_new(obj, "cpu-throttle-percentage",
					    json_integer(st->cpu_throttle_percentage));
		json_object_set_new(obj, "ram", ram_json(st));
	}
	if (!st->is_source && (running || done))
		json_object_set_new(obj, "x-vmig-ram", dest_ram_json(st));
	if (!st->is_source && st->postcopy.valid)
		postcopy_json(obj, st);
	if (st->status == VMIG_STATUS_FAILED && st->error_desc[0])
		json_object_set_new(
		    obj, "error-desc",
		    json_stringn(st->error_desc, strnlen(st->error_desc, sizeof(st->error_desc))));
	if (!st->is_source && st->rejected_connections) {
		json_object_set_new(obj, "x-vmig-rejected-connections",
				    json_integer((json_int_t)st->rejected_connections));
		json_object_set_new(obj, "x-vmig-last-rejection",
				    json_stringn(st->last_rejection,
						 strnlen(st->last_rejection,
							 sizeof(st->last_rejection))));
	}
	/* vmig's own: which side may run after a failure (docs/handover.md) */
	if (st->status == VMIG_STATUS_FAILED && st->handover_unknown)
		json_object_set_new(obj, "x-vmig-handover-unknown", json_true());
	if (st->status == VMIG_STATUS_FAILED && st->ram_incomplete)
		json_object_set_new(obj, "x-vmig-ram-incomplete", json_true());
	return obj;
}

/* ---- memory, monitor, guest ---- */

static const struct json_arg_spec pmemsave_args[] = {{"val", JA_UINT, true},
						     {"size", JA_UINT, true},
						     {"filename", JA_STR, true},
						     {"cpu-index", JA_INT, false},
						     {.name = NULL}};

static int cmd_pmemsave(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	uint64_t addr = (uint64_t)json_arg_int(args, "val", 0);
	uint64_t size = (uint64_t)json_arg_int(args, "size", 0);

	return vm_pmemsave(ctx->vm, addr, size, json_arg_str(args, "filename", ""), &ctx->err);
}

static const struct json_arg_spec hmp_args[] = {
    {"command-line", JA_STR, true}, {"cpu-index", JA_INT, false}, {.name = NULL}};

static int cmd_hmp(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	char *text = NULL;
	int ret = hmp_execute(ctx, json_arg_str(args, "command-line", ""), &text);

	if (ret) {
		vmig__err_set(&ctx->err, "human-monitor-command: %s", strerror(-ret));
		return ret;
	}
	ctx->ret = json_string(text);
	free(text);
	return ctx->ret ? 0 : -ENOMEM;
}

static int cmd_query_guest(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	struct vm_guest_stats gs;

	memset(&gs, 0, sizeof(gs));
	vm_guest_stats(ctx->vm, &gs);
	ctx->ret =
	    json_pack("{s:I,s:I,s:I,s:I,s:i,s:i,s:s}", "pages-written", (json_int_t)gs.pages_written,
		      "pages-verified", (json_int_t)gs.pages_verified, "inconsistencies",
		      (json_int_t)gs.inconsistencies, "mem-bytes", (json_int_t)gs.mem_bytes,
		      "vcpus", (int)gs.vcpus, "throttle-percentage", (int)gs.throttle, "workload",
		      gs.workload ? gs.workload : "");
	return ctx->ret ? 0 : -ENOMEM;
}

static int cmd_query_version(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	ctx->ret = json_pack("{s:{s:i,s:i,s:i},s:s}", "qemu", "micro", 0, "minor", 2, "major", 7,
			     "package", "vmig " VMIG_VERSION);
	return ctx->ret ? 0 : -ENOMEM;
}

static int cmd_query_commands(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	json_t *list = json_array();
	const struct qmp_command *c;

	for (size_t i = 0; list && (c = qmp_command_at(i)); i++)
		json_array_append_new(list, json_pack("{s:s}", "name", c->name));
	ctx->ret = list;
	return list ? 0 : -ENOMEM;
}

/* ---- calc-dirty-rate, query-dirty-rate (QEMU's names and fields) ---- */

static const char *const dirty_rate_modes[] = {"page-sampling", "dirty-bitmap", NULL};
static const char *const dirty_rate_status[] = {"unstarted", "measuring", "measured", NULL};

static const struct json_arg_spec calc_dirty_rate_args[] = {{"calc-time", JA_INT, true},
							    {"sample-pages", JA_INT, false},
							    {"mode", JA_STR, false},
							    {.name = NULL}};

static int cmd_calc_dirty_rate(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	const char *mode = json_arg_str(args, "mode", "page-sampling");
	int64_t secs = json_arg_int(args, "calc-time", 0);
	int64_t sample = json_arg_int(args, "sample-pages", 0);
	int ret, m;

	if (!strcmp(mode, "dirty-ring")) { /* needs KVM's dirty ring */
		vmig__err_set(&ctx->err,
			      "mode dirty-ring is not enabled, use other method instead.");
		return -EINVAL;
	}
	for (m = 0; dirty_rate_modes[m] && strcmp(dirty_rate_modes[m], mode); m++)
		;
	if (!dirty_rate_modes[m]) {
		vmig__err_set(&ctx->err, "Parameter 'mode' does not accept value '%s'", mode);
		return -EINVAL;
	}
	if (json_object_get(args, "sample-pages") && sample <= 0) {
		vmig__err_set(&ctx->err, "sample-pages is out of range [128, 16384]");
		return -EINVAL;
	}
	if (secs < 1 || secs > 60) {
		vmig__err_set(&ctx->err, "calc-time is out of range [1, 60].");
		return -EINVAL;
	}
	ret = vmig_calc_dirty_rate(vm_session(ctx->vm), secs * 1000, (enum vmig_dirty_rate_mode)m,
				   (uint64_t)sample);
	return ret ? fail(ctx, ret, "calc-dirty-rate") : 0;
}

static int cmd_query_dirty_rate(struct qmp_cmd_ctx *ctx, const json_t *args)
{
	struct vmig_dirty_rate dr;

	vmig_query_dirty_rate(vm_session(ctx->vm), &dr);
	ctx->ret = json_pack("{s:s,s:I,s:I,s:I,s:s}", "status", dirty_rate_status[dr.status],
			     "start-time", (json_int_t)dr.start_time, "calc-time",
			     (json_int_t)(dr.calc_time_ms / 1000), "sample-pages",
			     (json_int_t)dr.sample_pages, "mode", dirty_rate_modes[dr.mode]);
	if (ctx->ret && dr.status == VMIG_DIRTY_RATE_MEASURED)
		json_object_set_new(ctx->ret, "dirty-rate", json_integer(dr.dirty_rate));
	return ctx->ret ? 0 : -ENOMEM;
}

/* ---- table and dispatch ---- */

static const struct qmp_command commands[] = {
    {"qmp_capabilities", cmd_qmp_capabilities, NULL, true},
    {"query-status", cmd_query_status, NULL, false},
    {"stop", cmd_stop, NULL, false},
    {"cont", cmd_cont, NULL, false},
    {"quit", cmd_quit, NULL, false},
    {"migrate", cmd_migrate, migrate_args, false},
    {"migrate-incoming", cmd_migrate_incoming, uri_args, false},
    {"migrate_cancel", cmd_migrate_cancel, NULL, false},
    {"migrate-cancel", cmd_migrate_cancel, NULL, false},
    {"migrate-set-capabilities", cmd_set_caps, set_caps_args, false},
    {"query-migrate-capabilities", cmd_query_caps, NULL, false},
    {"migrate-set-parameters", cmd_set_params, NULL, true},
    {"query-migrate-parameters", cmd_query_params, NULL, false},
    {"object-add", cmd_object_add, NULL, true},
    {"object-del", cmd_object_del, object_del_args, false},
    {"query-migrate", cmd_query_migrate, NULL, false},
    {"migrate-start-postcopy", cmd_start_postcopy, NULL, false},
    {"migrate-pause", cmd_migrate_pause, NULL, false},
    {"migrate-recover", cmd_migrate_recover, uri_args, false},
    {"migrate-continue", cmd_migrate_continue, continue_args, false},
    {"pmemsave", cmd_pmemsave, pmemsave_args, false},
    {"calc-dirty-rate", cmd_calc_dirty_rate, calc_dirty_rate_args, false},
    {"query-dirty-rate", cmd_query_dirty_rate, NULL, false},
    {"human-monitor-command", cmd_hmp, hmp_args, false},
    {"x-vmig-query-guest", cmd_query_guest, NULL, false},
    {"query-version", cmd_query_version, NULL, false},
    {"query-commands", cmd_query_commands, NULL, false},
};

const struct qmp_command *qmp_command_at(size_t i)
{
	return i < VMIG_ARRAY_SIZE(commands) ? &commands[i] : NULL;
}

const struct qmp_command *qmp_command_find(const char *name)
{
	for (size_t i = 0; i < VMIG_ARRAY_SIZE(commands); i++)
		if (!strcmp(commands[i].name, name))
			return &commands[i];
	return NULL;
}

int qmp_invoke(struct qmp_cmd_ctx *ctx, const char *name, const json_t *args, json_t **ret)
{
	const struct qmp_command *cmd = qmp_command_find(name);
	int err;

	*ret = NULL;
	ctx->ret = NULL;
	ctx->err_class = NULL;
	vmig__err_clear(&ctx->err);
	if (!cmd) {
		vmig__err_set(&ctx->err, "The command %.200s has not been found", name);
		ctx->err_class = "CommandNotFound";
		return -ENOENT;
	}
	if (args && !json_is_object(args)) {
		vmig__err_set(&ctx->err, "QMP input member 'arguments' must be an object");
		return -EINVAL;
	}
	if (!cmd->free_args && json_args_check(args, cmd->args, &ctx->err))
		return -EINVAL;
	err = cmd->fn(ctx, args);
	if (err) {
		json_decref(ctx->ret);
		ctx->ret = NULL;
		if (!ctx->err.msg[0])
			vmig__err_set(&ctx->err, "%s: %s", name, strerror(-err));
		return err < 0 ? err : -EINVAL;
	}
	*ret = ctx->ret ? ctx->ret : json_object();
	ctx->ret = NULL;
	return 0;
}
