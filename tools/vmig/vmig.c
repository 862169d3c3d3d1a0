// SPDX-License-Identifier: MIT
/*
 * vmig: the command-line client. It speaks only QMP, so every subcommand
 * works against vmig-vm and real QEMU alike: migrate (with a progress bar,
 * optional destination setup, post-copy switch-over and a timeline picture),
 * info, status, a raw QMP command, cancel, and timeline (redraw a recorded
 * timeline). Exit codes: 0 success, 1 failure (a failed or cancelled
 * migration, a QMP error, a bad timeline log), 2 usage errors.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qmpc.h"
#include "storage.h"
#include "timeline.h"

#define CMD_TIMEOUT_MS 30000
#define MAX_SETTINGS 32

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
	interrupted = 1;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: vmig COMMAND ...\n"
		   "  vmig migrate SRC_QMP URI [--dest DST_QMP] [--max-bandwidth RATE]\n"
		   "        [--downtime-limit MS] [--capability NAME=on|off]...\n"
		   "        [--parameter NAME=VALUE]... [--tls-creds ID] [--tls-hostname NAME]\n"
		   "        [--tls-authz ID] [--postcopy] [--postcopy-after SECONDS]\n"
		   "        [--no-progress] [--timeline FILE.svg [--timeline-log LOG]]\n"
		   "        [--storage-src RPC --storage-dst RPC --storage-uri URI\n"
		   "         [--storage-mode mirror|write-blocking|postcopy]\n"
		   "         [--storage-speed RATE]]\n"
		   "  vmig info QMP              print 'info migrate'\n"
		   "  vmig status QMP            print the VM's run state\n"
		   "  vmig qmp QMP COMMAND [JSON-ARGS]   run a raw QMP command, print the reply\n"
		   "  vmig cancel QMP            cancel the running migration\n"
		   "  vmig timeline LOG -o FILE.svg   draw a recorded timeline again\n"
		   "  vmig help\n"
		   "QMP is unix:PATH or PATH. URI is tcp:HOST:PORT or unix:PATH. RATE takes\n"
		   "K/M/G suffixes (bytes/s, powers of 1024). --parameter goes to both sides\n"
		   "(an integer VALUE as a number, else a string). The TLS options set QEMU's\n"
		   "parameters: --tls-creds the id of a tls-creds-* object, on both sides\n"
		   "(give them the same id); --tls-hostname the name the destination's\n"
		   "certificate carries (source); --tls-authz an authz-simple object of the\n"
		   "destination (needs --dest). \"\" unsets any of them. With TLS, start the\n"
		   "destination with --incoming defer. --timeline polls the source every\n"
		   "100 ms and draws the run (rates, remaining RAM, expected downtime,\n"
		   "dirty syncs, post-copy switch and requests, downtime) as an SVG at the\n"
		   "end; the samples go to LOG as JSON lines (default: FILE.svg.log).\n"
		   "--storage-* moves a local disk with the VM: RPC are the control sockets\n"
		   "of the source's vmig-blk and of the destination's, started with\n"
		   "--incoming URI; the disk is mirrored first, the RAM then, and the\n"
		   "destination runs only once it has the whole disk (needs --dest for a\n"
		   "clean failure, and a VM with pause-before-switchover). --storage-mode\n"
		   "write-blocking makes each guest write wait for the destination once the\n"
		   "first pass is there; mirror (the default) copies in the background and\n"
		   "switches to write-blocking if the guest writes faster than the copy;\n"
		   "postcopy hands the disk over when the VM stops and sends what the\n"
		   "destination lacks after, what its guest reads first (if the source\n"
		   "host dies before the end, those blocks are lost).\n");
}

static int connect_or_say(struct qmpc **q, const char *addr)
{
	struct vmig__err err;

	vmig__err_clear(&err);
	if (qmpc_connect(q, addr, CMD_TIMEOUT_MS, &err)) {
		fprintf(stderr, "vmig: %s\n", err.msg);
		return -1;
	}
	return 0;
}

/* Run a command; print the error and return -1 if it fails. */
static int run(struct qmpc *q, const char *cmd, json_t *args, json_t **ret, const char *who)
{
	struct vmig__err err;

	vmig__err_clear(&err);
	if (qmpc_execute(q, cmd, args, ret, CMD_TIMEOUT_MS, &err)) {
		fprintf(stderr, "vmig: %s%s%s: %s\n", who ? who : "", who ? ": " : "", cmd,
			err.msg);
		return -1;
	}
	return 0;
}

/* HMP text without the monitor's "\r". */
static void print_hmp(struct qmpc *q, const char *line, FILE *out)
{
	json_t *ret;

	if (run(q, "human-monitor-command", json_pack("{s:s}", "command-line", line), &ret, NULL))
		return;
	for (const char *p = json_string_value(ret); p && *p; p++)
		if (*p != '\r')
			fputc(*p, out);
	json_decref(ret);
}

/* ---- simple subcommands ---- */

static int cmd_info(int argc, char **argv)
{
	struct qmpc *q;

	if (argc != 3) {
		usage(stderr);
		return 2;
	}
	if (connect_or_say(&q, argv[2]))
		return 1;
	print_hmp(q, "info migrate", stdout);
	qmpc_close(q);
	return 0;
}

static int cmd_status(int argc, char **argv)
{
	struct qmpc *q;
	json_t *ret;
	int rc = 1;

	if (argc != 3) {
		usage(stderr);
		return 2;
	}
	if (connect_or_say(&q, argv[2]))
		return 1;
	if (!run(q, "query-status", NULL, &ret, NULL)) {
		printf("%s\n", json_string_value(json_object_get(ret, "status")) ?: "?");
		json_decref(ret);
		rc = 0;
	}
	qmpc_close(q);
	return rc;
}

static int cmd_qmp(int argc, char **argv)
{
	json_t *args = NULL, *ret;
	json_error_t jerr;
	struct qmpc *q;
	char *text;
	int rc = 1;

	if (argc != 4 && argc != 5) {
		usage(stderr);
		return 2;
	}
	if (argc == 5) {
		args = json_loads(argv[4], 0, &jerr);
		if (!json_is_object(args)) {
			fprintf(stderr, "vmig: JSON-ARGS must be a JSON object: %s\n",
				args ? "not an object" : jerr.text);
			json_decref(args);
			return 2;
		}
	}
	if (connect_or_say(&q, argv[2])) {
		json_decref(args);
		return 1;
	}
	if (!run(q, argv[3], args, &ret, NULL)) {
		text = json_dumps(ret, JSON_INDENT(2) | JSON_ENCODE_ANY);
		printf("%s\n", text ? text : "?");
		free(text);
		json_decref(ret);
		rc = 0;
	}
	qmpc_close(q);
	return rc;
}

static int cmd_cancel(int argc, char **argv)
{
	struct qmpc *q;
	int rc;

	if (argc != 3) {
		usage(stderr);
		return 2;
	}
	if (connect_or_say(&q, argv[2]))
		return 1;
	rc = run(q, "migrate_cancel", NULL, NULL, NULL) ? 1 : 0;
	qmpc_close(q);
	return rc;
}

/* ---- migrate ---- */

struct mig_opts {
	const char *src, *uri, *dest;
	const char *max_bandwidth, *downtime_limit;
	const char *caps[MAX_SETTINGS];
	unsigned ncaps;
	const char *params[MAX_SETTINGS];
	unsigned nparams;
	/* migrate-set-parameters tls-*: NULL when not given, "" unsets */
	const char *tls_creds, *tls_hostname, *tls_authz;
	bool postcopy, no_progress;
	double postcopy_after_s; /* < 0: never */
	const char *timeline_svg, *timeline_log; /* NULL: no timeline */
	struct storage storage;			 /* src_rpc NULL: no storage migration */
	const char *storage_speed;
};

/* Options that only make sense with another one; says which. */
static int check_migrate_opts(const struct mig_opts *o)
{
	if (o->timeline_log && !o->timeline_svg) {
		fprintf(stderr, "vmig: --timeline-log goes with --timeline\n");
		return -1;
	}
	if (storage_check(&o->storage))
		return -1;
	if (o->storage_speed && !o->storage.src_rpc) {
		fprintf(stderr, "vmig: --storage-speed goes with --storage-src\n");
		return -1;
	}
	if (o->tls_authz && !o->dest) {
		fprintf(stderr, "vmig: --tls-authz applies to the destination: it needs --dest\n");
		return -1;
	}
	return 0;
}

static int parse_migrate_opts(int argc, char **argv, struct mig_opts *o)
{
	static const struct option longopts[] = {{"dest", required_argument, NULL, 'd'},
						 {"max-bandwidth", required_argument, NULL, 'b'},
						 {"downtime-limit", required_argument, NULL, 't'},
						 {"capability", required_argument, NULL, 'c'},
						 {"parameter", required_argument, NULL, 'p'},
						 {"tls-creds", required_argument, NULL, 'C'},
						 {"tls-hostname", required_argument, NULL, 'H'},
						 {"tls-authz", required_argument, NULL, 'Z'},
						 {"postcopy", no_argument, NULL, 'P'},
						 {"postcopy-after", required_argument, NULL, 'A'},
						 {"no-progress", no_argument, NULL, 'n'},
						 {"timeline", required_argument, NULL, 'T'},
						 {"timeline-log", required_argument, NULL, 'L'},
						 {"storage-src", required_argument, NULL, 's'},
						 {"storage-dst", required_argument, NULL, 'D'},
						 {"storage-uri", required_argument, NULL, 'U'},
						 {"storage-mode", required_argument, NULL, 'M'},
						 {"storage-speed", required_argument, NULL, 'S'},
						 {NULL, 0, NULL, 0}};
	char *end;
	int c;

	memset(o, 0, sizeof(*o));
	o->postcopy_after_s = -1;
	optind = 2; /* after "vmig migrate" */
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 'd':
			o->dest = optarg;
			break;
		case 'b':
			o->max_bandwidth = optarg;
			break;
		case 't':
			o->downtime_limit = optarg;
			break;
		case 'c':
			if (o->ncaps == MAX_SETTINGS || !strchr(optarg, '='))
				return -1;
			o->caps[o->ncaps++] = optarg;
			break;
		case 'p':
			if (o->nparams == MAX_SETTINGS || !strchr(optarg, '='))
				return -1;
			o->params[o->nparams++] = optarg;
			break;
		case 'C':
			o->tls_creds = optarg;
			break;
		case 'H':
			o->tls_hostname = optarg;
			break;
		case 'Z':
			o->tls_authz = optarg;
			break;
		case 'P':
			o->postcopy = true;
			break;
		case 'A':
			o->postcopy_after_s = strtod(optarg, &end);
			if (*end || end == optarg || o->postcopy_after_s < 0)
				return -1;
			break;
		case 'n':
			o->no_progress = true;
			break;
		case 'T':
			o->timeline_svg = optarg;
			break;
		case 'L':
			o->timeline_log = optarg;
			break;
		case 's':
			o->storage.src_rpc = optarg;
			break;
		case 'D':
			o->storage.dst_rpc = optarg;
			break;
		case 'U':
			o->storage.uri = optarg;
			break;
		case 'M':
			o->storage.mode = optarg;
			break;
		case 'S':
			o->storage_speed = optarg;
			if (vmig__parse_size(optarg, &o->storage.speed))
				return -1;
			break;
		default:
			return -1;
		}
	}
	if (argc - optind != 2 || check_migrate_opts(o))
		return -1;
	o->src = argv[optind];
	o->uri = argv[optind + 1];
	return 0;
}

/* A capability's "NAME=VALUE": integers stay integers, on/off/true/false
 * become booleans, anything else is a string (and refused by build_caps). */
static json_t *setting_value(const char *v)
{
	char *end;
	long long n;

	errno = 0;
	n = strtoll(v, &end, 0);
	if (!errno && *v && !*end)
		return json_integer(n);
	if (!strcmp(v, "on") || !strcmp(v, "true"))
		return json_true();
	if (!strcmp(v, "off") || !strcmp(v, "false"))
		return json_false();
	return json_string(v);
}

/* A migration parameter: an integer when VALUE reads as one, else a string
 * (tls-creds, multifd-compression, ...), which the VM checks. */
static json_t *param_value(const char *v)
{
	char *end;
	long long n;

	errno = 0;
	n = strtoll(v, &end, 0);
	if (!errno && *v && !*end)
		return json_integer(n);
	return json_string(v);
}

static json_t *build_caps(const struct mig_opts *o)
{
	json_t *list = json_array();

	for (unsigned i = 0; i < o->ncaps; i++) {
		const char *eq = strchr(o->caps[i], '=');
		json_t *state = setting_value(eq + 1);

		if (!json_is_boolean(state)) {
			json_decref(state);
			json_decref(list);
			return NULL;
		}
		json_array_append_new(list, json_pack("{s:s%,s:o}", "capability", o->caps[i],
						      (size_t)(eq - o->caps[i]), "state", state));
	}
	if (o->postcopy || o->postcopy_after_s >= 0)
		json_array_append_new(
		    list, json_pack("{s:s,s:b}", "capability", "postcopy-ram", "state", 1));
	/* the disk's last round runs while the VM is stopped, before it may
	 * run on the destination */
	if (o->storage.src_rpc)
		json_array_append_new(list, json_pack("{s:s,s:b}", "capability",
						      "pause-before-switchover", "state", 1));
	return list;
}

static int build_params(const struct mig_opts *o, json_t **src, json_t **dst)
{
	uint64_t v;

	*src = json_object();
	*dst = json_object();
	if (o->max_bandwidth) {
		if (vmig__parse_size(o->max_bandwidth, &v) || v > INT64_MAX)
			return -1;
		json_object_set_new(*src, "max-bandwidth", json_integer((json_int_t)v));
	}
	if (o->downtime_limit) {
		char *end;
		long long ms = strtoll(o->downtime_limit, &end, 10);

		if (*end || end == o->downtime_limit || ms < 0)
			return -1;
		json_object_set_new(*src, "downtime-limit", json_integer(ms));
	}
	for (unsigned i = 0; i < o->nparams; i++) {
		const char *eq = strchr(o->params[i], '=');
		size_t len = (size_t)(eq - o->params[i]);

		/* Settings such as multifd-channels must match on both sides.
		 * A value that is no valid UTF-8 cannot be sent: refused. */
		if (!len || json_object_setn_new(*src, o->params[i], len, param_value(eq + 1)) ||
		    json_object_setn_new(*dst, o->params[i], len, param_value(eq + 1)))
			return -1;
	}
	/* Each side resolves the ids among its own objects; only the source
	 * checks a host name, only the destination authorizes. */
	if (o->tls_creds && (json_object_set_new(*src, "tls-creds", json_string(o->tls_creds)) ||
			     json_object_set_new(*dst, "tls-creds", json_string(o->tls_creds))))
		return -1;
	if (o->tls_hostname &&
	    json_object_set_new(*src, "tls-hostname", json_string(o->tls_hostname)))
		return -1;
	if (o->tls_authz && json_object_set_new(*dst, "tls-authz", json_string(o->tls_authz)))
		return -1;
	return 0;
}

static int setup_side(struct qmpc *q, json_t *caps, json_t *params, const char *who)
{
	if (json_array_size(caps) &&
	    run(q, "migrate-set-capabilities", json_pack("{s:O}", "capabilities", caps), NULL, who))
		return -1;
	if (json_object_size(params) &&
	    run(q, "migrate-set-parameters", json_incref(params), NULL, who))
		return -1;
	return 0;
}

static uint64_t ram_u64(const json_t *qm, const char *key)
{
	const json_t *v = json_object_get(json_object_get(qm, "ram"), key);

	return json_is_integer(v) ? (uint64_t)json_integer_value(v) : 0;
}

static void show_progress(const json_t *qm, double elapsed_s, bool tty, const char *disk)
{
	const char *status = json_string_value(json_object_get(qm, "status")) ?: "none";
	uint64_t done = ram_u64(qm, "transferred"), left = ram_u64(qm, "remaining");
	uint64_t page = ram_u64(qm, "page-size") ?: 4096;
	const json_t *mbps_j = json_object_get(json_object_get(qm, "ram"), "mbps");
	double mbps = json_is_number(mbps_j) ? json_number_value(mbps_j) : 0;
	double mib_s = mbps * 1e6 / 8 / 1048576.0;
	double dirty_mib_s = (double)(ram_u64(qm, "dirty-pages-rate") * page) / 1048576.0;
	const json_t *exp = json_object_get(qm, "expected-downtime");
	const json_t *thr = json_object_get(qm, "cpu-throttle-percentage");
	char throttle[32] = "";
	unsigned pct = done + left ? (unsigned)(done * 100 / (done + left)) : 0;
	char bar[21];

	if (pct > 100)
		pct = 100;
	for (unsigned i = 0; i < 20; i++)
		bar[i] = i < pct / 5 ? '#' : '.';
	bar[20] = '\0';
	if (json_is_integer(thr)) /* auto-converge is slowing the guest down */
		snprintf(throttle, sizeof(throttle), " throttle %lld%%",
			 (long long)json_integer_value(thr));
	if (tty)
		fprintf(stderr,
			"\r[%s] %3u%% %-16s %8.1f MiB/s  dirty %7.1f MiB/s  exp-down %4lld ms"
			"  syncs %llu%s%s%s  %6.1fs\033[K",
			bar, pct, status, mib_s, dirty_mib_s,
			(long long)(exp ? json_integer_value(exp) : 0),
			(unsigned long long)ram_u64(qm, "dirty-sync-count"), throttle,
			disk ? "  | " : "", disk ? disk : "", elapsed_s);
	else
		fprintf(stderr,
			"vmig: %s %u%% %.1f MiB/s dirty %.1f MiB/s expected-downtime %lld ms "
			"dirty-syncs %llu%s%s%s elapsed %.1f s\n",
			status, pct, mib_s, dirty_mib_s,
			(long long)(exp ? json_integer_value(exp) : 0),
			(unsigned long long)ram_u64(qm, "dirty-sync-count"), throttle,
			disk ? ", " : "", disk ? disk : "", elapsed_s);
}

static bool terminal(const char *status)
{
	return !strcmp(status, "completed") || !strcmp(status, "failed") ||
	       !strcmp(status, "cancelled");
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000};

	nanosleep(&ts, NULL); /* EINTR (Ctrl-C) just ends the nap early */
}

/* ---- timeline recording (--timeline) ---- */

/* Times of the run: t = 0 when the migration is started. */
struct recorder {
	struct timeline *tl;
	uint64_t start_ms;   /* monotonic, for polled samples */
	double start_wall_s; /* CLOCK_REALTIME, for events' timestamps */
};

static double wall_now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double rec_now_s(const struct recorder *rec)
{
	return (double)(vmig__now_ms() - rec->start_ms) / 1000.0;
}

/*
 * Events reach us only when the next poll reads them, up to a period late,
 * so their own timestamp (the server's wall clock; QMP sockets are local)
 * places them; one that is missing or far off is placed on arrival.
 */
static void rec_on_event(void *opaque, const json_t *event)
{
	const struct recorder *rec = opaque;
	const json_t *ts = json_object_get(event, "timestamp");
	const json_t *sec = json_object_get(ts, "seconds"),
		     *usec = json_object_get(ts, "microseconds");
	double now = rec_now_s(rec), t = now;

	if (json_is_integer(sec) && json_is_integer(usec)) {
		double at = (double)json_integer_value(sec) +
			    (double)json_integer_value(usec) / 1e6 - rec->start_wall_s;

		if (at >= -1 && at <= now + 1)
			t = fmax(at, 0);
	}
	timeline_add_event(rec->tl, t, event);
}

/*
 * QEMU sends MIGRATION and MIGRATION_PASS only with the "events" capability
 * on, so the timeline turns it on where the source lists it (vmig-vm has no
 * such capability: it always sends them). Without it, statuses and dirty
 * syncs come from polling alone: a failure here is only a warning.
 */
static void rec_enable_events(struct qmpc *src)
{
	json_t *caps;

	if (run(src, "query-migrate-capabilities", NULL, &caps, "source"))
		return;
	for (size_t i = 0; i < json_array_size(caps); i++) {
		const json_t *c = json_array_get(caps, i);
		const char *name = json_string_value(json_object_get(c, "capability"));

		if (name && !strcmp(name, "events") && json_is_false(json_object_get(c, "state")))
			run(src, "migrate-set-capabilities",
			    json_pack("{s:[{s:s,s:b}]}", "capabilities", "capability", "events",
				      "state", 1),
			    NULL, "source (timeline events)");
	}
	json_decref(caps);
}

/* Creates the timeline and its log; 0, or -1 after saying why. */
static int rec_open(struct recorder *rec, struct qmpc *src, const struct mig_opts *o,
		    char **log_path)
{
	struct vmig__err err;

	vmig__err_clear(&err);
	*log_path = o->timeline_log ? strdup(o->timeline_log) : NULL;
	if (!o->timeline_log && asprintf(log_path, "%s.log", o->timeline_svg) < 0)
		*log_path = NULL;
	if (!*log_path || timeline_new(&rec->tl)) {
		fprintf(stderr, "vmig: out of memory\n");
		return -1;
	}
	if (timeline_log_open(rec->tl, *log_path, o->uri, &err)) {
		fprintf(stderr, "vmig: %s\n", err.msg);
		return -1;
	}
	rec_enable_events(src);
	qmpc_set_event_handler(src, rec_on_event, rec);
	rec->start_ms = vmig__now_ms();
	rec->start_wall_s = wall_now_s();
	return 0;
}

/* Draws the picture and closes the log; 0, or -1 after saying why. */
static int rec_finish(struct recorder *rec, const struct mig_opts *o, const char *log_path)
{
	struct vmig__err err;
	int ret = 0;

	vmig__err_clear(&err);
	if (timeline_log_close(rec->tl, &err)) {
		fprintf(stderr, "vmig: %s: %s\n", log_path, err.msg);
		ret = -1;
	}
	if (timeline_write_svg(rec->tl, o->timeline_svg, &err)) {
		fprintf(stderr, "vmig: timeline: %s\n", err.msg);
		return -1;
	}
	fprintf(stderr, "vmig: timeline drawn in %s (samples in %s)\n", o->timeline_svg, log_path);
	return ret;
}

/* Poll query-migrate until a final status; returns its reply (owned).
 * Every reply also goes to the timeline, if rec has one. */
/* Cancel the RAM migration, once; at is when (the loop's now). */
static void cancel_once(struct qmpc *src, bool *sent, uint64_t *at, uint64_t now)
{
	if (*sent)
		return;
	run(src, "migrate_cancel", NULL, NULL, "source");
	*sent = true;
	*at = now;
}

static json_t *watch(struct qmpc *src, struct mig_opts *o, struct recorder *rec)
{
	struct storage *st = o->storage.src_rpc ? &o->storage : NULL;
	bool tty = isatty(STDERR_FILENO) && !o->no_progress, cancel_sent = false;
	bool switched = o->postcopy;
	uint64_t start = vmig__now_ms(), last_line = 0, cancel_at = 0;

	for (;;) {
		uint64_t now = vmig__now_ms();
		double elapsed = (double)(now - start) / 1000.0;
		const char *status;
		json_t *qm;

		if (interrupted && !cancel_sent) {
			fprintf(stderr, "\nvmig: interrupted, cancelling the migration\n");
			cancel_once(src, &cancel_sent, &cancel_at, now);
		}
		if (st && !cancel_sent && storage_poll(st)) {
			fprintf(stderr, "vmig: cancelling the migration: the disk cannot follow\n");
			cancel_once(src, &cancel_sent, &cancel_at, now);
		}
		if (run(src, "query-migrate", NULL, &qm, "source"))
			return NULL;
		if (rec->tl)
			timeline_add_sample(rec->tl, rec_now_s(rec), qm);
		status = json_string_value(json_object_get(qm, "status")) ?: "none";
		if (terminal(status) || (cancel_sent && now - cancel_at > 15000) ||
		    (!strcmp(status, "none") && now - start > 10000)) {
			if (tty)
				fputc('\n', stderr);
			return qm;
		}
		if (st && !cancel_sent && !strcmp(status, "pre-switchover")) {
			/* the VM is stopped: the disk's last round, then go on */
			if (storage_complete(st))
				cancel_once(src, &cancel_sent, &cancel_at, now);
			else
				run(src, "migrate-continue",
				    json_pack("{s:s}", "state", "pre-switchover"), NULL, "source");
			json_decref(qm);
			continue;
		}
		if (!switched && o->postcopy_after_s >= 0 && elapsed >= o->postcopy_after_s &&
		    !strcmp(status, "active")) {
			fprintf(stderr,
				"%svmig: not converged after %.1f s, switching to post-copy\n",
				tty ? "\n" : "", elapsed);
			run(src, "migrate-start-postcopy", NULL, NULL, "source");
			switched = true;
		}
		if (tty || (!o->no_progress && now - last_line >= 1000)) {
			char disk[160];

			if (st)
				storage_progress(st, disk, sizeof(disk));
			show_progress(qm, elapsed, tty, st ? disk : NULL);
			last_line = now;
		}
		json_decref(qm);
		sleep_ms(100);
	}
}

/* After the source completed: the destination should finish loading. */
static int wait_dest(struct qmpc *dst)
{
	uint64_t deadline = vmig__now_ms() + 30000;
	json_t *qm, *st;

	while (vmig__now_ms() < deadline && !interrupted) {
		const char *status;

		if (run(dst, "query-migrate", NULL, &qm, "destination"))
			return -1;
		status = json_string_value(json_object_get(qm, "status")) ?: "none";
		if (terminal(status)) {
			int ok = !strcmp(status, "completed");

			if (!ok)
				fprintf(stderr, "vmig: destination: migration %s%s%s\n", status,
					json_object_get(qm, "error-desc") ? ": " : "",
					json_string_value(json_object_get(qm, "error-desc")) ?: "");
			json_decref(qm);
			if (ok && !run(dst, "query-status", NULL, &st, "destination")) {
				fprintf(stderr, "vmig: destination is %s\n",
					json_string_value(json_object_get(st, "status")) ?: "?");
				json_decref(st);
			}
			return ok ? 0 : -1;
		}
		json_decref(qm);
		sleep_ms(100);
	}
	fprintf(stderr, "vmig: destination did not finish within 30 s\n");
	return -1;
}

static int start_migration(struct qmpc *src, struct qmpc *dst, const struct mig_opts *o)
{
	json_t *caps = build_caps(o), *sp = NULL, *dp = NULL;
	int ret = -1;

	if (!caps || build_params(o, &sp, &dp)) {
		fprintf(stderr, "vmig: bad --capability, --max-bandwidth, --downtime-limit, "
				"--parameter or --tls-* value\n");
		ret = -2;
		goto out;
	}
	if (dst &&
	    (setup_side(dst, caps, dp, "destination") ||
	     run(dst, "migrate-incoming", json_pack("{s:s}", "uri", o->uri), NULL, "destination")))
		goto out;
	if (setup_side(src, caps, sp, "source") ||
	    run(src, "migrate", json_pack("{s:s}", "uri", o->uri), NULL, "source")) {
		/* The destination listens for a migration that will not come:
		 * let it go, or it refuses the next attempt's settings (a vmig
		 * destination; QEMU 7.2 ignores migrate_cancel there). */
		if (dst)
			run(dst, "migrate_cancel", NULL, NULL, "destination");
		goto out;
	}
	if (o->postcopy)
		run(src, "migrate-start-postcopy", NULL, NULL, "source");
	ret = 0;
out:
	json_decref(caps);
	json_decref(sp);
	json_decref(dp);
	return ret;
}

static int cmd_migrate(int argc, char **argv)
{
	struct qmpc *src = NULL, *dst = NULL;
	struct recorder rec = {0};
	char *log_path = NULL;
	struct mig_opts o;
	const char *status;
	json_t *qm = NULL, *params;
	bool timeline_failed, storage_failed = false;
	int rc = 1, r;

	if (parse_migrate_opts(argc, argv, &o)) {
		usage(stderr);
		return 2;
	}
	signal(SIGINT, on_sigint);
	signal(SIGTERM, on_sigint);
	if (connect_or_say(&src, o.src) || (o.dest && connect_or_say(&dst, o.dest)))
		goto out;
	if (o.timeline_svg && rec_open(&rec, src, &o, &log_path))
		goto out;
	if (o.storage.src_rpc && storage_start(&o.storage, isatty(STDERR_FILENO) && !o.no_progress))
		goto out;
	r = start_migration(src, dst, &o);
	if (r) {
		rc = r == -2 ? 2 : 1;
		if (o.storage.src_rpc)
			storage_cancel(&o.storage);
		goto out;
	}
	if (rec.tl && !run(src, "query-migrate-parameters", NULL, &params, "source")) {
		timeline_add_parameters(rec.tl, rec_now_s(&rec), params);
		json_decref(params);
	}
	qm = watch(src, &o, &rec);
	/* Drawn whatever the outcome: a failed run is worth a picture too. A
	 * picture asked for and not drawn fails the command. */
	timeline_failed = rec.tl && rec_finish(&rec, &o, log_path);
	status = qm ? json_string_value(json_object_get(qm, "status")) ?: "none" : "none";
	if (o.storage.src_rpc && strcmp(status, "completed"))
		storage_cancel(&o.storage);
	if (o.storage.src_rpc && !strcmp(status, "completed") && o.storage.handed_over &&
	    storage_finish(&o.storage, isatty(STDERR_FILENO) && !o.no_progress))
		storage_failed = true;
	if (!qm)
		goto out;
	print_hmp(src, "info migrate", stdout);
	if (!strcmp(status, "completed")) {
		rc = (dst && wait_dest(dst)) || timeline_failed || storage_failed ? 1 : 0;
	} else {
		fprintf(stderr, "vmig: migration %s%s%s\n", status,
			json_object_get(qm, "error-desc") ? ": " : "",
			json_string_value(json_object_get(qm, "error-desc")) ?: "");
	}
out:
	json_decref(qm);
	qmpc_close(dst);
	qmpc_close(src);
	timeline_free(rec.tl);
	free(log_path);
	return rc;
}

/* ---- timeline: redraw from a log ---- */

static int cmd_timeline(int argc, char **argv)
{
	static const struct option longopts[] = {{"output", required_argument, NULL, 'o'},
						 {NULL, 0, NULL, 0}};
	const char *svg = NULL;
	struct vmig__err err;
	struct timeline *tl;
	int c, rc;

	optind = 2; /* after "vmig timeline" */
	while ((c = getopt_long(argc, argv, "o:", longopts, NULL)) != -1) {
		if (c != 'o') {
			usage(stderr);
			return 2;
		}
		svg = optarg;
	}
	if (!svg || argc - optind != 1) {
		usage(stderr);
		return 2;
	}
	vmig__err_clear(&err);
	if (timeline_load(&tl, argv[optind], &err)) {
		fprintf(stderr, "vmig: %s\n", err.msg);
		return 1;
	}
	rc = timeline_write_svg(tl, svg, &err) ? 1 : 0;
	if (rc)
		fprintf(stderr, "vmig: %s\n", err.msg);
	timeline_free(tl);
	return rc;
}

int main(int argc, char **argv)
{
	static const struct {
		const char *name;
		int (*fn)(int argc, char **argv);
	} cmds[] = {{"migrate", cmd_migrate}, {"info", cmd_info},     {"status", cmd_status},
		    {"qmp", cmd_qmp},	      {"cancel", cmd_cancel}, {"timeline", cmd_timeline}};

	signal(SIGPIPE, SIG_IGN);
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	if (!strcmp(argv[1], "help") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
		usage(stdout);
		return 0;
	}
	for (size_t i = 0; i < VMIG_ARRAY_SIZE(cmds); i++)
		if (!strcmp(argv[1], cmds[i].name))
			return cmds[i].fn(argc, argv);
	fprintf(stderr, "vmig: unknown command '%s'\n", argv[1]);
	usage(stderr);
	return 2;
}
