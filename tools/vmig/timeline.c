// SPDX-License-Identifier: MIT
/*
 * The timeline's records and its log: what each query-migrate reply, QMP
 * event and parameter set contributes, how samples are thinned to stay
 * bounded, and writing and reading the JSON-lines log. Drawing is in
 * timeline_svg.c. See timeline.h.
 *
 * Threat model: a log handed to timeline_load is untrusted (it may be
 * truncated, edited or not a log at all), and so is every reply from the
 * QMP server. Lines are read with a length bound, every field is checked
 * for its type and range before use, and the amount kept is bounded
 * (TL_MAX_SAMPLES, TL_MAX_MARKS), whatever the input's size.
 */
#include <assert.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "timeline_int.h"

#define TL_MAX_LINE (1u << 20)
#define TL_MAX_T_S 1e7 /* about 115 days: anything later is not a real run */
/* Above any real counter (1 EiB), below 2^63: converts to uint64_t safely,
 * and products of two such values stay finite. */
#define TL_MAX_VALUE 1e18
/* QEMU 7.2 always sends page-size with ram; older servers may not. */
#define TL_DEFAULT_PAGE_SIZE 4096

int timeline_new(struct timeline **out)
{
	struct timeline *tl = calloc(1, sizeof(*tl));

	if (!tl)
		return -ENOMEM;
	tl->samples = calloc(TL_MAX_SAMPLES, sizeof(*tl->samples));
	tl->marks = calloc(TL_MAX_MARKS, sizeof(*tl->marks));
	if (!tl->samples || !tl->marks) {
		timeline_free(tl);
		return -ENOMEM;
	}
	tl->downtime_ms = NAN;
	tl->downtime_seen_s = NAN;
	tl->downtime_limit_ms = NAN;
	tl->max_bandwidth_bytes_per_s = NAN;
	*out = tl;
	return 0;
}

void timeline_free(struct timeline *tl)
{
	if (!tl)
		return;
	if (tl->log)
		fclose(tl->log);
	free(tl->samples);
	free(tl->marks);
	free(tl);
}

bool tl_is_terminal(const char *status)
{
	return !strcmp(status, "completed") || !strcmp(status, "failed") ||
	       !strcmp(status, "cancelled");
}

/* A number from 0 to TL_MAX_VALUE, or NAN (missing, another type, junk). */
static double num_at(const json_t *obj, const char *key)
{
	const json_t *v = json_object_get(obj, key);
	double d;

	if (!json_is_number(v))
		return NAN;
	d = json_number_value(v);
	return d >= 0 && d <= TL_MAX_VALUE ? d : NAN;
}

/* Copies UTF-8 text (src may be NULL), cut if need be at a character
 * boundary, so that the SVG never holds half a character. */
static void copy_str(char *dst, size_t size, const char *src)
{
	size_t n = src ? strlen(src) : 0;

	assert(size > 0);
	if (n >= size) {
		n = size - 1;
		while (n && ((unsigned char)src[n] & 0xc0) == 0x80)
			n--; /* src[n] continues a character: cut before it starts */
	}
	if (n)
		memcpy(dst, src, n);
	dst[n] = '\0';
}

static void add_mark(struct timeline *tl, double t_s, enum tl_mark_kind kind, uint64_t n,
		     const char *status)
{
	struct tl_mark *m;

	if (tl->nmarks == TL_MAX_MARKS) {
		tl->dropped_marks++;
		return;
	}
	m = &tl->marks[tl->nmarks++];
	m->t_s = t_s;
	m->kind = kind;
	m->n = n;
	copy_str(m->status, sizeof(m->status), status);
}

/* Halves the samples (keeping the first and every other one after it) and
 * doubles the spacing asked of the next ones. */
static void thin_samples(struct timeline *tl)
{
	unsigned n = tl->nsamples, kept = 0;

	assert(n >= 2);
	for (unsigned i = 0; i < n; i += 2)
		tl->samples[kept++] = tl->samples[i];
	tl->nsamples = kept;
	tl->min_spacing_s = 2 * (tl->samples[kept - 1].t_s - tl->samples[0].t_s) / kept;
}

/* Fills s from a query-migrate reply. Rates are left out once the run is
 * over: after completion, QEMU's ram.mbps is the average of the whole run,
 * not a rate at that moment. */
static void sample_from_reply(struct tl_sample *s, double t_s, const json_t *qm, const char *status)
{
	const json_t *ram = json_object_get(qm, "ram");
	double page = num_at(ram, "page-size");
	bool over = tl_is_terminal(status);

	if (!(page > 0))
		page = TL_DEFAULT_PAGE_SIZE;
	s->t_s = t_s;
	s->v[TL_THROUGHPUT] = over ? NAN : num_at(ram, "mbps") * 1e6 / 8;
	s->v[TL_DIRTY_RATE] = over ? NAN : num_at(ram, "dirty-pages-rate") * page;
	s->v[TL_REMAINING] = num_at(ram, "remaining");
	s->v[TL_EXPECTED_DOWNTIME] = num_at(qm, "expected-downtime");
	s->v[TL_POSTCOPY_REQUESTS] = num_at(ram, "postcopy-requests");
}

/* Returns whether the sample was kept (and so belongs in the log). */
static bool record_sample(struct timeline *tl, double t_s, const json_t *qm)
{
	double sync = num_at(json_object_get(qm, "ram"), "dirty-sync-count");
	double downtime = num_at(qm, "downtime");
	char status[TL_STATUS_LEN];
	bool changed, must_keep;
	const char *desc;

	copy_str(status, sizeof(status),
		 json_string_value(json_object_get(qm, "status")) ?: "none");
	changed = strcmp(status, tl->status) != 0;
	must_keep = changed || tl_is_terminal(status) || !tl->nsamples;
	if (changed) {
		add_mark(tl, t_s, TL_MARK_STATUS_POLL, 0, status);
		copy_str(tl->status, sizeof(tl->status), status);
	}
	if (sync > tl->last_sync) {
		add_mark(tl, t_s, TL_MARK_SYNC, (uint64_t)sync, NULL);
		tl->last_sync = sync;
		must_keep = true;
	}
	if (isfinite(downtime)) {
		if (isnan(tl->downtime_seen_s))
			tl->downtime_seen_s = t_s;
		tl->downtime_ms = downtime;
	}
	desc = json_string_value(json_object_get(qm, "error-desc"));
	if (desc)
		copy_str(tl->error_desc, sizeof(tl->error_desc), desc);
	if (t_s > tl->t_end_s)
		tl->t_end_s = t_s;
	if (!must_keep && tl->nsamples &&
	    t_s - tl->samples[tl->nsamples - 1].t_s < tl->min_spacing_s)
		return false;
	if (tl->nsamples == TL_MAX_SAMPLES)
		thin_samples(tl);
	sample_from_reply(&tl->samples[tl->nsamples++], t_s, qm, status);
	return true;
}

static void record_event(struct timeline *tl, double t_s, const json_t *ev)
{
	const char *name = json_string_value(json_object_get(ev, "event")) ?: "";
	const json_t *data = json_object_get(ev, "data");

	if (!strcmp(name, "MIGRATION")) {
		const char *status = json_string_value(json_object_get(data, "status"));

		if (status)
			add_mark(tl, t_s, TL_MARK_STATUS_EVENT, 0, status);
	} else if (!strcmp(name, "MIGRATION_PASS")) {
		double pass = num_at(data, "pass");

		if (isfinite(pass))
			add_mark(tl, t_s, TL_MARK_PASS, (uint64_t)pass, NULL);
	} else if (!strcmp(name, "STOP")) {
		add_mark(tl, t_s, TL_MARK_STOP, 0, NULL);
	} else {
		return; /* logged, but not drawn */
	}
	if (t_s > tl->t_end_s)
		tl->t_end_s = t_s;
}

static void record_parameters(struct timeline *tl, const json_t *params)
{
	double v = num_at(params, "downtime-limit");

	if (isfinite(v))
		tl->downtime_limit_ms = v;
	v = num_at(params, "max-bandwidth");
	if (isfinite(v))
		tl->max_bandwidth_bytes_per_s = v;
}

/* ---- recording live ---- */

static void log_line(struct timeline *tl, const char *key, double t_s, const json_t *value)
{
	json_t *line;

	if (!tl->log)
		return;
	line = json_pack("{s:f,s:O}", "t", t_s, key, value);
	/* 12 digits: milliseconds over any run length, and QEMU's reals */
	if (!line || json_dumpf(line, tl->log, JSON_COMPACT | JSON_REAL_PRECISION(12)) ||
	    fputc('\n', tl->log) == EOF || fflush(tl->log))
		tl->log_failed = true;
	json_decref(line);
}

/* Times come from the caller's monotonic clock: only junk is refused. */
static bool time_ok(double t_s)
{
	return isfinite(t_s) && t_s >= 0 && t_s <= TL_MAX_T_S;
}

/* Milliseconds, as the log keeps them: a redrawn picture is the same. */
static double ms_round(double t_s)
{
	return round(t_s * 1000) / 1000;
}

void timeline_add_sample(struct timeline *tl, double t_s, const json_t *query_migrate)
{
	t_s = ms_round(t_s);
	if (time_ok(t_s) && json_is_object(query_migrate) && record_sample(tl, t_s, query_migrate))
		log_line(tl, "query-migrate", t_s, query_migrate);
}

void timeline_add_event(struct timeline *tl, double t_s, const json_t *event)
{
	t_s = ms_round(t_s);
	if (!time_ok(t_s) || !json_is_object(event))
		return;
	record_event(tl, t_s, event);
	/* A server that floods events must not fill the disk. */
	if (tl->logged_events < TL_MAX_LOGGED_EVENTS) {
		tl->logged_events++;
		log_line(tl, "event", t_s, event);
	}
}

void timeline_add_parameters(struct timeline *tl, double t_s, const json_t *parameters)
{
	t_s = ms_round(t_s);
	if (!time_ok(t_s) || !json_is_object(parameters))
		return;
	record_parameters(tl, parameters);
	log_line(tl, "parameters", t_s, parameters);
}

int timeline_log_open(struct timeline *tl, const char *log_path, const char *uri,
		      struct vmig__err *err)
{
	char started[40];
	time_t now = time(NULL);
	struct tm tm;
	json_t *hdr;
	int ret;

	assert(!tl->log);
	strftime(started, sizeof(started), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&now, &tm));
	tl->log = fopen(log_path, "w");
	if (!tl->log) {
		ret = -errno;
		vmig__err_set(err, "cannot create the timeline log %s: %s", log_path,
			      strerror(-ret));
		return ret;
	}
	copy_str(tl->started, sizeof(tl->started), started);
	/* json_string refuses a uri that is not UTF-8: then it is left out */
	hdr = json_pack("{s:i,s:s}", "vmig-timeline", TL_LOG_VERSION, "started", started);
	if (hdr && uri && !json_object_set_new(hdr, "uri", json_string(uri)))
		copy_str(tl->uri, sizeof(tl->uri), uri);
	if (!hdr || json_dumpf(hdr, tl->log, JSON_COMPACT) || fputc('\n', tl->log) == EOF ||
	    fflush(tl->log)) {
		json_decref(hdr);
		vmig__err_set(err, "cannot write the timeline log %s", log_path);
		fclose(tl->log);
		tl->log = NULL;
		return -EIO;
	}
	json_decref(hdr);
	return 0;
}

int timeline_log_close(struct timeline *tl, struct vmig__err *err)
{
	bool failed = tl->log_failed;

	if (!tl->log)
		return 0;
	if (fclose(tl->log))
		failed = true;
	tl->log = NULL;
	if (failed) {
		vmig__err_set(err, "writing the timeline log failed (disk full?)");
		return -EIO;
	}
	return 0;
}

/* ---- reading a log ---- */

/*
 * Next line of f into a buffer of TL_MAX_LINE + 1 bytes, without its '\n'.
 * Returns its length, -1 at the end of the file, -2 for a line too long.
 * *complete says whether it ended with '\n' (the last line of a truncated
 * log does not).
 */
static long read_line(FILE *f, char *buf, bool *complete)
{
	size_t len = 0;
	int c;

	*complete = false;
	while ((c = getc(f)) != EOF) {
		if (c == '\n') {
			*complete = true;
			break;
		}
		if (len == TL_MAX_LINE)
			return -2;
		buf[len++] = (char)c;
	}
	if (c == EOF && !len)
		return -1;
	buf[len] = '\0';
	return (long)len;
}

static int load_header(struct timeline *tl, const json_t *line, const char **why)
{
	const json_t *version = json_object_get(line, "vmig-timeline");

	if (!json_is_integer(version)) {
		*why = "not a vmig timeline log (its first line is no header)";
		return -EINVAL;
	}
	if (json_integer_value(version) != TL_LOG_VERSION) {
		*why = "a timeline log of another format version";
		return -EINVAL;
	}
	copy_str(tl->started, sizeof(tl->started),
		 json_string_value(json_object_get(line, "started")));
	copy_str(tl->uri, sizeof(tl->uri), json_string_value(json_object_get(line, "uri")));
	return 0;
}

/* One record after the header; *why says what is wrong with it. */
static int load_record(struct timeline *tl, const json_t *line, double *last_sample_t,
		       const char **why)
{
	const json_t *tj = json_object_get(line, "t"), *v;
	double t_s = json_is_number(tj) ? json_number_value(tj) : NAN;

	if (!json_is_object(line)) {
		*why = "not a JSON object";
		return -EINVAL;
	}
	if (!time_ok(t_s)) {
		*why = "no time \"t\" in seconds (0 to 1e7)";
		return -EINVAL;
	}
	if ((v = json_object_get(line, "query-migrate"))) {
		if (!json_is_object(v)) {
			*why = "\"query-migrate\" is not an object";
			return -EINVAL;
		}
		if (t_s < *last_sample_t) {
			*why = "time goes backwards";
			return -EINVAL;
		}
		*last_sample_t = t_s;
		record_sample(tl, t_s, v);
	} else if ((v = json_object_get(line, "event"))) {
		if (!json_is_object(v) || !json_is_string(json_object_get(v, "event"))) {
			*why = "\"event\" is not a QMP event";
			return -EINVAL;
		}
		record_event(tl, t_s, v);
	} else if ((v = json_object_get(line, "parameters"))) {
		if (!json_is_object(v)) {
			*why = "\"parameters\" is not an object";
			return -EINVAL;
		}
		record_parameters(tl, v);
	} else {
		*why = "neither query-migrate, event nor parameters";
		return -EINVAL;
	}
	return 0;
}

static int load_lines(struct timeline *tl, FILE *f, const char *path, struct vmig__err *err)
{
	char *buf = malloc(TL_MAX_LINE + 1);
	double last_sample_t = 0;
	unsigned long lineno = 0;
	const char *why = NULL;
	bool complete;
	long len;
	int ret = 0;

	if (!buf)
		return -ENOMEM;
	while (!ret && (len = read_line(f, buf, &complete)) != -1) {
		json_error_t jerr;
		json_t *line;

		lineno++;
		if (len == -2) {
			vmig__err_set(err, "%s:%lu: line longer than %u bytes", path, lineno,
				      TL_MAX_LINE);
			ret = -EINVAL;
			break;
		}
		line = json_loadb(buf, (size_t)len, 0, &jerr);
		if (!line) {
			vmig__err_set(err, "%s:%lu: not valid JSON%s: %s", path, lineno,
				      complete ? "" : " (the log looks truncated)", jerr.text);
			ret = -EINVAL;
			break;
		}
		ret = lineno == 1 ? load_header(tl, line, &why)
				  : load_record(tl, line, &last_sample_t, &why);
		if (ret)
			vmig__err_set(err, "%s:%lu: %s", path, lineno, why);
		json_decref(line);
	}
	free(buf);
	if (!ret && ferror(f)) {
		vmig__err_set(err, "cannot read %s", path);
		ret = -EIO;
	}
	if (!ret && !lineno) {
		vmig__err_set(err, "%s: empty, not a timeline log", path);
		ret = -EINVAL;
	}
	if (!ret && !tl->nsamples) {
		vmig__err_set(err, "%s: the log holds no query-migrate sample", path);
		ret = -ENODATA;
	}
	return ret;
}

int timeline_load(struct timeline **out, const char *log_path, struct vmig__err *err)
{
	struct timeline *tl;
	FILE *f;
	int ret = timeline_new(&tl);

	if (ret) {
		vmig__err_set(err, "out of memory");
		return ret;
	}
	f = fopen(log_path, "r");
	if (!f) {
		ret = -errno;
		vmig__err_set(err, "cannot open %s: %s", log_path, strerror(-ret));
		timeline_free(tl);
		return ret;
	}
	ret = load_lines(tl, f, log_path, err);
	fclose(f);
	if (ret) {
		timeline_free(tl);
		return ret;
	}
	*out = tl;
	return 0;
}
