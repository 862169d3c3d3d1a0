// SPDX-License-Identifier: MIT
/*
 * The human monitor, reached through QMP's human-monitor-command: the few
 * HMP commands migration tools use (info migrate, info status, the migrate
 * commands, stop, cont), with QEMU 7.2's output text, so scripts written
 * for QEMU's "info migrate" read vmig-vm's the same way.
 *
 * Every HMP command is carried out by the QMP command of the same meaning
 * (qmp_invoke), so both interfaces check and behave alike; this file only
 * parses the command line and formats text. Errors are part of the text
 * ("Error: ..."), as in QEMU, not QMP errors.
 *
 * Threat model: the command line is untrusted text. It is split into at
 * most HMP_MAX_WORDS words of bounded length; nothing else is interpreted.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vmig/vmig.h>

#include "objects.h"
#include "qmp_int.h"
#include "vm.h"

#define HMP_MAX_WORDS 8
#define HMP_MAX_LINE 4096

struct hmp_line {
	char buf[HMP_MAX_LINE];
	char *w[HMP_MAX_WORDS];
	unsigned n;
};

static int split_words(const char *line, struct hmp_line *hl)
{
	char *save = NULL, *tok;

	if (strlen(line) >= sizeof(hl->buf))
		return -E2BIG;
	strcpy(hl->buf, line);
	hl->n = 0;
	for (tok = strtok_r(hl->buf, " \t\r\n", &save); tok;
	     tok = strtok_r(NULL, " \t\r\n", &save)) {
		if (hl->n == HMP_MAX_WORDS)
			return -E2BIG;
		hl->w[hl->n++] = tok;
	}
	return 0;
}

/* Run a QMP command; on error print "Error: ..." as QEMU's monitor does. */
static json_t *run(struct qmp_cmd_ctx *ctx, FILE *out, const char *cmd, json_t *args)
{
	json_t *ret = NULL;

	if (qmp_invoke(ctx, cmd, args, &ret)) {
		fprintf(out, "Error: %s\n", ctx->err.msg);
		ret = NULL;
	}
	json_decref(args);
	return ret;
}

static uint64_t ju64(const json_t *obj, const char *key)
{
	const json_t *v = json_object_get(obj, key);

	return json_is_integer(v) ? (uint64_t)json_integer_value(v) : 0;
}

static void format_ram(FILE *f, const json_t *ram)
{
	const json_t *mbps = json_object_get(ram, "mbps");

	fprintf(f, "transferred ram: %" PRIu64 " kbytes\n", ju64(ram, "transferred") >> 10);
	fprintf(f, "throughput: %0.2f mbps\n",
		json_is_number(mbps) ? json_number_value(mbps) : 0.0);
	fprintf(f, "remaining ram: %" PRIu64 " kbytes\n", ju64(ram, "remaining") >> 10);
	fprintf(f, "total ram: %" PRIu64 " kbytes\n", ju64(ram, "total") >> 10);
	fprintf(f, "duplicate: %" PRIu64 " pages\n", ju64(ram, "duplicate"));
	fprintf(f, "skipped: %" PRIu64 " pages\n", ju64(ram, "skipped"));
	fprintf(f, "normal: %" PRIu64 " pages\n", ju64(ram, "normal"));
	fprintf(f, "normal bytes: %" PRIu64 " kbytes\n", ju64(ram, "normal-bytes") >> 10);
	fprintf(f, "dirty sync count: %" PRIu64 "\n", ju64(ram, "dirty-sync-count"));
	fprintf(f, "page size: %" PRIu64 " kbytes\n", ju64(ram, "page-size") >> 10);
	fprintf(f, "multifd bytes: %" PRIu64 " kbytes\n", ju64(ram, "multifd-bytes") >> 10);
	fprintf(f, "pages-per-second: %" PRIu64 "\n", ju64(ram, "pages-per-second"));
	if (ju64(ram, "dirty-pages-rate"))
		fprintf(f, "dirty pages rate: %" PRIu64 " pages\n", ju64(ram, "dirty-pages-rate"));
	if (ju64(ram, "postcopy-requests"))
		fprintf(f, "postcopy request count: %" PRIu64 "\n", ju64(ram, "postcopy-requests"));
	if (ju64(ram, "precopy-bytes"))
		fprintf(f, "precopy ram: %" PRIu64 " kbytes\n", ju64(ram, "precopy-bytes") >> 10);
	if (ju64(ram, "downtime-bytes"))
		fprintf(f, "downtime ram: %" PRIu64 " kbytes\n", ju64(ram, "downtime-bytes") >> 10);
	if (ju64(ram, "postcopy-bytes"))
		fprintf(f, "postcopy ram: %" PRIu64 " kbytes\n", ju64(ram, "postcopy-bytes") >> 10);
	if (ju64(ram, "dirty-sync-missed-zero-copy"))
		fprintf(f, "Zero-copy-send fallbacks happened: %" PRIu64 " times\n",
			ju64(ram, "dirty-sync-missed-zero-copy"));
}

static void format_list(FILE *f, const char *label, const json_t *a)
{
	size_t i;
	const json_t *v;

	fprintf(f, "%s: [", label);
	json_array_foreach(a, i, v)
		fprintf(f, "%s%" PRIu64, i ? ", " : "", (uint64_t)json_integer_value(v));
	fprintf(f, "]\n");
}

/* Destination post-copy figures: QEMU's lines, then QEMU 10.1's latency. */
static void format_postcopy(FILE *f, const json_t *qm)
{
	if (!json_object_get(qm, "postcopy-blocktime"))
		return;
	fprintf(f, "Postcopy Blocktime (ms): %" PRIu64 "\n", ju64(qm, "postcopy-blocktime"));
	format_list(f, "Postcopy vCPU Blocktime (ms)", json_object_get(qm, "postcopy-vcpu-blocktime"));
	fprintf(f, "Postcopy Latency (ns): %" PRIu64 "\n", ju64(qm, "postcopy-latency"));
	fprintf(f, "Postcopy non-vCPU Latencies (ns): %" PRIu64 "\n",
		ju64(qm, "postcopy-non-vcpu-latency"));
	format_list(f, "Postcopy vCPU Latencies (ns)", json_object_get(qm, "postcopy-vcpu-latency"));
	format_list(f, "Postcopy Latency Distribution (2^N us buckets)",
		    json_object_get(qm, "postcopy-latency-dist"));
	fprintf(f, "Postcopy Latency p50/p99 (ns): %" PRIu64 " / %" PRIu64 "\n",
		ju64(qm, "x-vmig-postcopy-latency-p50"), ju64(qm, "x-vmig-postcopy-latency-p99"));
	fprintf(f, "Postcopy page faults: %" PRIu64 ", fetched: %" PRIu64 "\n",
		ju64(qm, "x-vmig-postcopy-faults"), ju64(qm, "x-vmig-postcopy-requests"));
}

static void format_info_migrate(FILE *f, const json_t *qm)
{
	const json_t *status = json_object_get(qm, "status");
	const json_t *ram = json_object_get(qm, "ram");

	if (json_is_string(status)) {
		const json_t *desc = json_object_get(qm, "error-desc");

		fprintf(f, "Migration status: %s", json_string_value(status));
		if (!strcmp(json_string_value(status), "failed") && json_is_string(desc))
			fprintf(f, " (%s)", json_string_value(desc));
		fprintf(f, "\n");
		fprintf(f, "total time: %" PRIu64 " ms\n", ju64(qm, "total-time"));
		if (json_object_get(qm, "expected-downtime"))
			fprintf(f, "expected downtime: %" PRIu64 " ms\n",
				ju64(qm, "expected-downtime"));
		if (json_object_get(qm, "downtime"))
			fprintf(f, "downtime: %" PRIu64 " ms\n", ju64(qm, "downtime"));
		if (json_object_get(qm, "setup-time"))
			fprintf(f, "setup: %" PRIu64 " ms\n", ju64(qm, "setup-time"));
		if (json_object_get(qm, "cpu-throttle-percentage"))
			fprintf(f, "cpu throttle percentage: %" PRIu64 "\n",
				ju64(qm, "cpu-throttle-percentage"));
	}
	if (json_is_object(ram))
		format_ram(f, ram);
	format_postcopy(f, qm);
}

/* Convert "\n" to "\r\n", as QEMU's monitor output has it. */
static char *crlf(const char *s, size_t len)
{
	size_t nl = 0, j = 0;
	char *out;

	for (size_t i = 0; i < len; i++)
		nl += s[i] == '\n';
	out = malloc(len + nl + 1);
	if (!out)
		return NULL;
	for (size_t i = 0; i < len; i++) {
		if (s[i] == '\n')
			out[j++] = '\r';
		out[j++] = s[i];
	}
	out[j] = '\0';
	return out;
}

char *hmp_format_info_migrate(const json_t *query_migrate)
{
	char *buf = NULL, *text;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	if (!f)
		return NULL;
	format_info_migrate(f, query_migrate);
	if (fclose(f)) {
		free(buf);
		return NULL;
	}
	text = crlf(buf, len);
	free(buf);
	return text;
}

static void info_status(struct qmp_cmd_ctx *ctx, FILE *f)
{
	json_t *st = run(ctx, f, "query-status", NULL);
	const char *status;

	if (!st)
		return;
	status = json_string_value(json_object_get(st, "status"));
	if (json_is_true(json_object_get(st, "running")))
		fprintf(f, "VM status: running\n");
	else if (status && strcmp(status, "paused"))
		fprintf(f, "VM status: paused (%s)\n", status);
	else
		fprintf(f, "VM status: paused\n");
	json_decref(st);
}

static void info_caps(struct qmp_cmd_ctx *ctx, FILE *f)
{
	json_t *caps = run(ctx, f, "query-migrate-capabilities", NULL);
	size_t i;
	json_t *v;

	json_array_foreach(caps, i, v)
	    fprintf(f, "%s: %s\n", json_string_value(json_object_get(v, "capability")),
		    json_is_true(json_object_get(v, "state")) ? "on" : "off");
	json_decref(caps);
}

static const char *param_unit(const char *name)
{
	if (!strcmp(name, "max-bandwidth") || !strcmp(name, "max-postcopy-bandwidth"))
		return " bytes/second";
	if (!strcmp(name, "downtime-limit"))
		return " ms";
	return "";
}

static void info_params(struct qmp_cmd_ctx *ctx, FILE *f)
{
	json_t *params = run(ctx, f, "query-migrate-parameters", NULL);
	const char *key;
	json_t *v;

	json_object_foreach(params, key, v)
	{
		if (vm_tls_param_is(key)) /* quoted, as QEMU prints them */
			fprintf(f, "%s: '%s'\n", key, json_string_value(v));
		else if (json_is_string(v)) /* a named value: multifd-compression */
			fprintf(f, "%s: %s\n", key, json_string_value(v));
		else
			fprintf(f, "%s: %lld%s\n", key, (long long)json_integer_value(v),
				param_unit(key));
	}
	json_decref(params);
}

static int parse_value(const char *s, int64_t *out);

/* QEMU's `info dirty_rate`. */
static void info_dirty_rate(struct qmp_cmd_ctx *ctx, FILE *f)
{
	json_t *v = run(ctx, f, "query-dirty-rate", NULL);
	const json_t *rate;

	if (!v)
		return;
	rate = json_object_get(v, "dirty-rate");
	fprintf(f, "Status: %s\n", json_string_value(json_object_get(v, "status")));
	fprintf(f, "Start Time: %" PRIu64 " (s)\n", ju64(v, "start-time"));
	if (!strcmp(json_string_value(json_object_get(v, "mode")), "page-sampling"))
		fprintf(f, "Sample Pages: %" PRIu64 " (per GB)\n", ju64(v, "sample-pages"));
	fprintf(f, "Period: %" PRIu64 " (sec)\n", ju64(v, "calc-time"));
	fprintf(f, "Mode: %s\n", json_string_value(json_object_get(v, "mode")));
	if (json_is_integer(rate))
		fprintf(f, "Dirty rate: %" PRId64 " (MB/s)\n", (int64_t)json_integer_value(rate));
	else
		fprintf(f, "Dirty rate: (not ready)\n");
	json_decref(v);
}

/* QEMU's `calc_dirty_rate [-b] SECONDS [SAMPLE_PAGES]` (-r, the dirty ring,
 * is refused by calc-dirty-rate itself). */
static void hmp_calc_dirty_rate(struct qmp_cmd_ctx *ctx, FILE *f, const struct hmp_line *hl)
{
	const char *mode = "page-sampling";
	unsigned i = 1;
	int64_t secs, pages = 0;
	json_t *args;

	for (; i < hl->n && hl->w[i][0] == '-'; i++) {
		if (!strcmp(hl->w[i], "-b"))
			mode = "dirty-bitmap";
		else if (!strcmp(hl->w[i], "-r"))
			mode = "dirty-ring";
		else
			break;
	}
	if (i >= hl->n || i + 2 < hl->n || parse_value(hl->w[i], &secs) ||
	    (i + 1 < hl->n && parse_value(hl->w[i + 1], &pages))) {
		fprintf(f,
			"Error: usage: calc_dirty_rate [-r] [-b] SECONDS [SAMPLE_PAGES_PER_GB]\n");
		return;
	}
	args = json_pack("{s:I,s:s}", "calc-time", (json_int_t)secs, "mode", mode);
	if (args && i + 1 < hl->n)
		json_object_set_new(args, "sample-pages", json_integer(pages));
	json_decref(run(ctx, f, "calc-dirty-rate", args));
}

static void hmp_info(struct qmp_cmd_ctx *ctx, FILE *f, const struct hmp_line *hl)
{
	const char *what = hl->n > 1 ? hl->w[1] : "";
	json_t *v;

	if (!strcmp(what, "migrate")) {
		v = run(ctx, f, "query-migrate", NULL);
		if (v)
			format_info_migrate(f, v);
		json_decref(v);
	} else if (!strcmp(what, "status")) {
		info_status(ctx, f);
	} else if (!strcmp(what, "migrate_capabilities")) {
		info_caps(ctx, f);
	} else if (!strcmp(what, "migrate_parameters")) {
		info_params(ctx, f);
	} else if (!strcmp(what, "dirty_rate")) {
		info_dirty_rate(ctx, f);
	} else if (!strcmp(what, "version")) {
		fprintf(f, "7.2.0 (vmig %s)\n", VMIG_VERSION);
	} else {
		fprintf(f, "unknown command: 'info %s'\n", what);
	}
}

static int parse_onoff(const char *s, bool *on)
{
	if (!strcmp(s, "on") || !strcmp(s, "true") || !strcmp(s, "yes")) {
		*on = true;
		return 0;
	}
	if (!strcmp(s, "off") || !strcmp(s, "false") || !strcmp(s, "no")) {
		*on = false;
		return 0;
	}
	return -EINVAL;
}

/* Integers, or sizes with K/M/G/T suffixes (powers of 1024) such as "100M". */
static int parse_value(const char *s, int64_t *out)
{
	char *end;
	long long v;
	uint64_t u;

	errno = 0;
	v = strtoll(s, &end, 0);
	if (!errno && end != s && !*end) {
		*out = v;
		return 0;
	}
	if (vmig__parse_size(s, &u) || u > INT64_MAX)
		return -EINVAL;
	*out = (int64_t)u;
	return 0;
}

static void hmp_set_capability(struct qmp_cmd_ctx *ctx, FILE *f, const struct hmp_line *hl)
{
	bool on;

	if (hl->n != 3 || parse_onoff(hl->w[2], &on)) {
		fprintf(f, "Error: usage: migrate_set_capability NAME on|off\n");
		return;
	}
	json_decref(
	    run(ctx, f, "migrate-set-capabilities",
		json_pack("{s:[{s:s,s:b}]}", "capabilities", "capability", hl->w[1], "state", on)));
}

/*
 * The value goes to migrate-set-parameters as an integer when it reads as
 * one (sizes included), else as a string, which the QMP command checks: the
 * TLS parameters and named values such as multifd-compression. '' (or "")
 * is the empty string, to unset a TLS parameter.
 */
static void hmp_set_parameter(struct qmp_cmd_ctx *ctx, FILE *f, const struct hmp_line *hl)
{
	const char *word;
	int64_t val;

	if (hl->n != 3) {
		fprintf(f, "Error: usage: migrate_set_parameter NAME VALUE\n");
		return;
	}
	word = hl->w[2];
	if (!strcmp(word, "''") || !strcmp(word, "\"\""))
		word = "";
	if (!vm_tls_param_is(hl->w[1]) && !parse_value(word, &val))
		json_decref(
		    run(ctx, f, "migrate-set-parameters", json_pack("{s:I}", hl->w[1], val)));
	else
		json_decref(
		    run(ctx, f, "migrate-set-parameters", json_pack("{s:s}", hl->w[1], word)));
}

static void hmp_migrate(struct qmp_cmd_ctx *ctx, FILE *f, const struct hmp_line *hl)
{
	const char *uri = NULL;
	bool resume = false;

	for (unsigned i = 1; i < hl->n; i++) {
		if (!strcmp(hl->w[i], "-d"))
			continue; /* always detached: the monitor never blocks */
		if (!strcmp(hl->w[i], "-r"))
			resume = true;
		else if (hl->w[i][0] == '-' || uri)
			uri = "";
		else
			uri = hl->w[i];
	}
	if (!uri || !*uri) {
		fprintf(f, "Error: usage: migrate [-d] [-r] URI\n");
		return;
	}
	json_decref(run(ctx, f, "migrate",
			resume ? json_pack("{s:s,s:b}", "uri", uri, "resume", 1)
			       : json_pack("{s:s}", "uri", uri)));
}

/* Commands that take one URI or nothing map straight onto QMP. */
static const struct {
	const char *hmp;
	const char *qmp;
	bool takes_uri;
} simple_cmds[] = {
    {"stop", "stop", false},
    {"cont", "cont", false},
    {"c", "cont", false},
    {"quit", "quit", false},
    {"q", "quit", false},
    {"migrate_cancel", "migrate_cancel", false},
    {"migrate_start_postcopy", "migrate-start-postcopy", false},
    {"migrate_pause", "migrate-pause", false},
    {"migrate_incoming", "migrate-incoming", true},
    {"migrate_recover", "migrate-recover", true},
};

static void hmp_dispatch(struct qmp_cmd_ctx *ctx, FILE *f, const struct hmp_line *hl)
{
	const char *cmd = hl->w[0];

	if (!strcmp(cmd, "info")) {
		hmp_info(ctx, f, hl);
		return;
	}
	if (!strcmp(cmd, "migrate")) {
		hmp_migrate(ctx, f, hl);
		return;
	}
	if (!strcmp(cmd, "migrate_set_capability")) {
		hmp_set_capability(ctx, f, hl);
		return;
	}
	if (!strcmp(cmd, "migrate_set_parameter")) {
		hmp_set_parameter(ctx, f, hl);
		return;
	}
	if (!strcmp(cmd, "calc_dirty_rate")) {
		hmp_calc_dirty_rate(ctx, f, hl);
		return;
	}
	for (size_t i = 0; i < VMIG_ARRAY_SIZE(simple_cmds); i++) {
		if (strcmp(cmd, simple_cmds[i].hmp))
			continue;
		if (hl->n != (simple_cmds[i].takes_uri ? 2u : 1u)) {
			fprintf(f, "Error: usage: %s%s\n", cmd,
				simple_cmds[i].takes_uri ? " URI" : "");
			return;
		}
		json_decref(
		    run(ctx, f, simple_cmds[i].qmp,
			simple_cmds[i].takes_uri ? json_pack("{s:s}", "uri", hl->w[1]) : NULL));
		return;
	}
	fprintf(f, "unknown command: '%s'\n", cmd);
}

int hmp_execute(struct qmp_cmd_ctx *ctx, const char *line, char **text)
{
	struct hmp_line *hl = malloc(sizeof(*hl));
	char *buf = NULL;
	size_t len = 0;
	FILE *f;

	*text = NULL;
	if (!hl)
		return -ENOMEM;
	f = open_memstream(&buf, &len);
	if (!f) {
		free(hl);
		return -ENOMEM;
	}
	if (split_words(line, hl))
		fprintf(f, "Error: command line too long\n");
	else if (hl->n) {
		ctx->hmp_out = f;
		hmp_dispatch(ctx, f, hl);
		ctx->hmp_out = NULL;
	}
	free(hl);
	if (fclose(f)) {
		free(buf);
		return -ENOMEM;
	}
	*text = crlf(buf, len);
	free(buf);
	return *text ? 0 : -ENOMEM;
}
