// SPDX-License-Identifier: MIT
/*
 * Draws a timeline (timeline_int.h) as one SVG file: a status strip, a row
 * of dirty-sync marks, then four panels on one time axis in seconds: the
 * transfer and dirty rates, the RAM remaining, the expected downtime and
 * the post-copy page requests. The post-copy switch and the final downtime
 * are marked across all panels.
 *
 * The SVG is written by hand, with fprintf: the picture is a few lines,
 * paths and texts, and a plotting library (cairo, gnuplot, ...) would be a
 * dependency to build and install for that alone. Any browser shows the
 * result. Every text that comes from the input (statuses, error text, the
 * URI) goes through svg_escape; element ids and classes are fixed here, so
 * tests and style sheets can find each series.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "timeline_int.h"

#define SVG_W 1000
#define PLOT_X 80
#define PLOT_W 640
#define LEGEND_X (PLOT_X + PLOT_W + 24)
#define STRIP_Y 66
#define STRIP_H 18
#define SYNC_Y (STRIP_Y + STRIP_H + 8)
#define SYNC_H 16
#define PANEL_Y0 (SYNC_Y + SYNC_H + 34)
#define PANEL_H 130
#define PANEL_GAP 46
#define NPANELS 4
#define SVG_H (PANEL_Y0 + NPANELS * (PANEL_H + PANEL_GAP) - PANEL_GAP + 48)
#define MIB 1048576.0

struct series_desc {
	const char *id, *label, *color;
	double scale; /* from the recorded unit to the panel's */
};

static const struct series_desc series_desc[TL__SERIES] = {
    [TL_THROUGHPUT] = {"throughput", "throughput (ram.mbps)", "#1f77b4", 1 / MIB},
    [TL_DIRTY_RATE] = {"dirty-rate", "dirty rate (pages x page size)", "#d62728", 1 / MIB},
    [TL_REMAINING] = {"remaining", "remaining (ram.remaining)", "#2ca02c", 1 / MIB},
    [TL_EXPECTED_DOWNTIME] = {"expected-downtime", "expected downtime", "#9467bd", 1},
    [TL_POSTCOPY_REQUESTS] = {"postcopy-requests", "page requests (ram.postcopy-requests)",
			      "#ff7f0e", 1},
};

struct panel_desc {
	const char *id, *title;
	enum tl_series series[2];
	unsigned nseries;
};

static const struct panel_desc panels[NPANELS] = {
    {"rate", "Transfer and dirty rate (MiB/s)", {TL_THROUGHPUT, TL_DIRTY_RATE}, 2},
    {"remaining", "RAM remaining (MiB)", {TL_REMAINING}, 1},
    {"downtime", "Downtime (ms)", {TL_EXPECTED_DOWNTIME}, 1},
    {"requests", "Post-copy page requests (total)", {TL_POSTCOPY_REQUESTS}, 1},
};

static const struct {
	const char *status, *color;
} status_colors[] = {
    {"setup", "#c7c7c7"},	    {"active", "#aec7e8"},	     {"postcopy-active", "#ffbb78"},
    {"postcopy-paused", "#c5b0d5"}, {"postcopy-recover", "#c49c94"}, {"device", "#f7b6d2"},
    {"pre-switchover", "#dbdb8d"},  {"completed", "#98df8a"},	     {"failed", "#ff9896"},
    {"cancelling", "#d9d9d9"},	    {"cancelled", "#d9d9d9"},
};

/* What the drawing needs, worked out once from the records. */
struct layout {
	double t_max_s, t_step_s;		  /* the time axis: 0 to t_max_s */
	double postcopy_s;			  /* the switch to post-copy, NAN if none */
	double completed_s;			  /* NAN if the run did not complete */
	double downtime_from_s, downtime_to_s;	  /* NAN if no downtime was reported */
	enum tl_mark_kind status_kind, sync_kind; /* which marks to draw */
};

/* XML text or attribute value: markup characters escaped, and what XML 1.0
 * forbids (control characters, U+FFFE and U+FFFF) replaced. The input is
 * valid UTF-8: it came through jansson, or was checked by it. */
static void svg_escape(FILE *f, const char *s)
{
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == 0xef && (unsigned char)s[1] == 0xbf &&
		    ((unsigned char)s[2] == 0xbe || (unsigned char)s[2] == 0xbf)) {
			fputc('?', f);
			s += 2;
		} else if (c == '&')
			fputs("&amp;", f);
		else if (c == '<')
			fputs("&lt;", f);
		else if (c == '>')
			fputs("&gt;", f);
		else if (c == '"')
			fputs("&quot;", f);
		else if (c == '\'')
			fputs("&#39;", f);
		else if (c < 0x20 || c == 0x7f)
			fputc(' ', f);
		else
			fputc(c, f);
	}
}

/* <text> at (x, y) with attrs (fixed markup), its content formatted, then
 * escaped. A text cut by the buffer's size is cut at a character boundary. */
static void VMIG_PRINTF(5, 6)
    svg_text(FILE *f, double x, double y, const char *attrs, const char *fmt, ...)
{
	char buf[512];
	size_t len;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	len = strlen(buf);
	if (len == sizeof(buf) - 1 && ((unsigned char)buf[len - 1] & 0x80)) {
		/* cut: drop the last character, which may be partial */
		while (len && ((unsigned char)buf[len - 1] & 0xc0) == 0x80)
			len--;
		buf[len ? len - 1 : 0] = '\0';
	}
	fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" %s>", x, y, attrs);
	svg_escape(f, buf);
	fputs("</text>\n", f);
}

/* 1, 2 or 5 times a power of ten, so that range / step is about n. */
static double nice_step(double range, unsigned n)
{
	double raw = range / n, mag, f;

	if (!(raw > 0) || !isfinite(raw))
		return 1;
	mag = pow(10, floor(log10(raw)));
	f = raw / mag;
	return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
}

/* A tick label with as many decimals as the step needs. */
static void fmt_tick(char *buf, size_t size, double v, double step)
{
	int decimals = step >= 1 ? 0 : (int)ceil(-log10(step) - 1e-9);

	snprintf(buf, size, "%.*f", decimals > 6 ? 6 : decimals, v);
}

static double x_of(const struct layout *l, double t_s)
{
	return PLOT_X + t_s / l->t_max_s * PLOT_W;
}

static double panel_y(unsigned p)
{
	return PANEL_Y0 + p * (PANEL_H + PANEL_GAP);
}

static const char *status_color(const char *status)
{
	for (size_t i = 0; i < VMIG_ARRAY_SIZE(status_colors); i++)
		if (!strcmp(status, status_colors[i].status))
			return status_colors[i].color;
	return "#eeeeee";
}

static bool has_marks(const struct timeline *tl, enum tl_mark_kind kind)
{
	for (unsigned i = 0; i < tl->nmarks; i++)
		if (tl->marks[i].kind == kind)
			return true;
	return false;
}

/* The earliest time any status mark says status, NAN if none. */
static double first_status(const struct timeline *tl, const char *status)
{
	double t = NAN;

	for (unsigned i = 0; i < tl->nmarks; i++) {
		const struct tl_mark *m = &tl->marks[i];

		if ((m->kind == TL_MARK_STATUS_POLL || m->kind == TL_MARK_STATUS_EVENT) &&
		    !strcmp(m->status, status) && !(m->t_s >= t))
			t = m->t_s;
	}
	return t;
}

/*
 * Where the downtime goes: from the source's STOP event, if one came
 * before completion, else ending at completion (or where the downtime
 * was first reported, polling being up to a period late).
 */
static void place_downtime(const struct timeline *tl, struct layout *l)
{
	double dt_s = tl->downtime_ms / 1000, stop = NAN;
	double end = isnan(l->completed_s) ? tl->downtime_seen_s : l->completed_s;

	l->downtime_from_s = l->downtime_to_s = NAN;
	if (isnan(dt_s))
		return;
	for (unsigned i = 0; i < tl->nmarks; i++)
		if (tl->marks[i].kind == TL_MARK_STOP && tl->marks[i].t_s <= end)
			stop = tl->marks[i].t_s;
	l->downtime_from_s = isnan(stop) ? fmax(end - dt_s, 0) : stop;
	l->downtime_to_s = l->downtime_from_s + dt_s;
}

static void make_layout(const struct timeline *tl, struct layout *l)
{
	double t_end = fmax(tl->t_end_s, 0.1);

	/* Events are exact; polling sees a status up to one period late. */
	l->status_kind =
	    has_marks(tl, TL_MARK_STATUS_EVENT) ? TL_MARK_STATUS_EVENT : TL_MARK_STATUS_POLL;
	l->sync_kind = has_marks(tl, TL_MARK_PASS) ? TL_MARK_PASS : TL_MARK_SYNC;
	l->postcopy_s = first_status(tl, "postcopy-active");
	l->completed_s = first_status(tl, "completed");
	place_downtime(tl, l);
	if (l->downtime_to_s > t_end)
		t_end = l->downtime_to_s;
	l->t_step_s = nice_step(t_end, 10);
	l->t_max_s = ceil(t_end / l->t_step_s - 1e-9) * l->t_step_s;
}

static int cmp_mark_time(const void *a, const void *b)
{
	const struct tl_mark *x = *(const struct tl_mark *const *)a;
	const struct tl_mark *y = *(const struct tl_mark *const *)b;

	return (x->t_s > y->t_s) - (x->t_s < y->t_s);
}

/* The status strip: one span per status, in time order. */
static void draw_status_strip(FILE *f, const struct timeline *tl, const struct layout *l)
{
	const struct tl_mark *ms[TL_MAX_MARKS];
	unsigned n = 0;

	for (unsigned i = 0; i < tl->nmarks; i++)
		if (tl->marks[i].kind == l->status_kind)
			ms[n++] = &tl->marks[i];
	qsort(ms, n, sizeof(ms[0]), cmp_mark_time);
	svg_text(f, PLOT_X - 8, STRIP_Y + 13, "text-anchor=\"end\"", "status");
	fprintf(f, "<g id=\"status\">\n");
	for (unsigned i = 0; i < n; i++) {
		double x0 = x_of(l, ms[i]->t_s);
		double x1 = i + 1 < n ? x_of(l, ms[i + 1]->t_s) : x_of(l, tl->t_end_s);

		if (x1 - x0 < 3) /* a brief or final status still shows */
			x1 = x0 + 3;
		fprintf(f, "<rect class=\"status-span\" data-status=\"");
		svg_escape(f, ms[i]->status);
		fprintf(f, "\" x=\"%.1f\" y=\"%d\" width=\"%.1f\" height=\"%d\" fill=\"%s\">", x0,
			STRIP_Y, x1 - x0, STRIP_H, status_color(ms[i]->status));
		fputs("<title>", f);
		svg_escape(f, ms[i]->status);
		fprintf(f, " from %.2f s</title></rect>\n", ms[i]->t_s);
		if (x1 - x0 > 8.0 * (double)strlen(ms[i]->status))
			svg_text(f, x0 + 4, STRIP_Y + 13, "class=\"small\"", "%s", ms[i]->status);
	}
	fprintf(f, "</g>\n");
}

/* One tick per dirty sync (or MIGRATION_PASS), numbered where there is
 * room for the number. */
static void draw_syncs(FILE *f, const struct timeline *tl, const struct layout *l)
{
	double last_label_x = -1e9;
	unsigned count = 0;

	svg_text(f, PLOT_X - 8, SYNC_Y + 12, "text-anchor=\"end\"", "dirty syncs");
	fprintf(f, "<g id=\"syncs\">\n");
	for (unsigned i = 0; i < tl->nmarks; i++) {
		const struct tl_mark *m = &tl->marks[i];
		double x = x_of(l, m->t_s);

		if (m->kind != l->sync_kind)
			continue;
		count++;
		fprintf(f,
			"<line class=\"mark sync\" data-count=\"%llu\" x1=\"%.1f\" y1=\"%d\" "
			"x2=\"%.1f\" y2=\"%d\"/>\n",
			(unsigned long long)m->n, x, SYNC_Y, x, SYNC_Y + SYNC_H);
		if (x - last_label_x >= 24) {
			svg_text(f, x + 2, SYNC_Y + 11, "class=\"small\"", "%llu",
				 (unsigned long long)m->n);
			last_label_x = x;
		}
	}
	fprintf(f, "</g>\n");
	if (!count)
		svg_text(f, PLOT_X + 4, SYNC_Y + 12, "class=\"small\"", "none reported");
}

/* Writes series k's path; returns the number of points drawn. */
static unsigned draw_series(FILE *f, const struct timeline *tl, const struct layout *l,
			    enum tl_series k, double y0, double y_max)
{
	const struct series_desc *d = &series_desc[k];
	unsigned points = 0;
	bool pen_down = false;

	for (unsigned i = 0; i < tl->nsamples; i++)
		points += !isnan(tl->samples[i].v[k]);
	fprintf(f, "<path id=\"series-%s\" class=\"series %s\" data-points=\"%u\" stroke=\"%s\"",
		d->id, d->id, points, d->color);
	if (points)
		fputs(" d=\"", f);
	for (unsigned i = 0; points && i < tl->nsamples; i++) {
		double v = tl->samples[i].v[k];

		if (isnan(v)) { /* a gap: the field was missing */
			pen_down = false;
			continue;
		}
		fprintf(f, "%s%.1f %.1f ", pen_down ? "L" : "M", x_of(l, tl->samples[i].t_s),
			y0 + PANEL_H - v * d->scale / y_max * PANEL_H);
		pen_down = true;
	}
	fputs(points ? "\"/>\n" : "/>\n", f);
	/* A single point draws no line: a dot instead. */
	for (unsigned i = 0; points == 1 && i < tl->nsamples; i++)
		if (!isnan(tl->samples[i].v[k]))
			fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\" fill=\"%s\"/>\n",
				x_of(l, tl->samples[i].t_s),
				y0 + PANEL_H - tl->samples[i].v[k] * d->scale / y_max * PANEL_H,
				d->color);
	return points;
}

/* The panel's reference line (a limit), in the panel's unit, or NAN. A
 * limit far above the data would squash it: then it is left out. */
static double panel_limit(const struct timeline *tl, unsigned p, double data_max)
{
	double v = NAN;

	if (!strcmp(panels[p].id, "rate") && tl->max_bandwidth_bytes_per_s > 0)
		v = tl->max_bandwidth_bytes_per_s / MIB;
	else if (!strcmp(panels[p].id, "downtime") && tl->downtime_limit_ms > 0)
		v = tl->downtime_limit_ms;
	return v <= fmax(data_max, 1e-9) * 3 ? v : NAN;
}

static double panel_data_max(const struct timeline *tl, unsigned p)
{
	double m = 0;

	for (unsigned s = 0; s < panels[p].nseries; s++) {
		enum tl_series k = panels[p].series[s];

		for (unsigned i = 0; i < tl->nsamples; i++)
			if (tl->samples[i].v[k] * series_desc[k].scale > m)
				m = tl->samples[i].v[k] * series_desc[k].scale;
	}
	if (!strcmp(panels[p].id, "downtime") && tl->downtime_ms > m)
		m = tl->downtime_ms;
	return m;
}

static void draw_axes(FILE *f, const struct layout *l, double y0, double y_max, double y_step,
		      bool time_labels)
{
	char buf[32];

	/* y_max and t_max_s are whole numbers of steps, a dozen at most */
	for (unsigned i = 0; i <= 16 && i * y_step <= y_max + y_step / 2; i++) {
		double v = i * y_step, y = y0 + PANEL_H - v / y_max * PANEL_H;

		fprintf(f, "<line class=\"grid\" x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\"/>\n",
			PLOT_X, y, PLOT_X + PLOT_W, y);
		fmt_tick(buf, sizeof(buf), v, y_step);
		svg_text(f, PLOT_X - 6, y + 4, "class=\"tick\" text-anchor=\"end\"", "%s", buf);
	}
	for (unsigned i = 0; i <= 16 && i * l->t_step_s <= l->t_max_s + l->t_step_s / 2; i++) {
		double t = i * l->t_step_s, x = x_of(l, t);

		fprintf(f,
			"<line class=\"grid\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n",
			x, y0, x, y0 + PANEL_H);
		if (time_labels) {
			fmt_tick(buf, sizeof(buf), t, l->t_step_s);
			svg_text(f, x, y0 + PANEL_H + 16, "class=\"tick\" text-anchor=\"middle\"",
				 "%s", buf);
		}
	}
	fprintf(f, "<path class=\"axis\" fill=\"none\" d=\"M%d %.1f V%.1f H%d\"/>\n", PLOT_X, y0,
		y0 + PANEL_H, PLOT_X + PLOT_W);
}

static void legend_entry(FILE *f, double y, const char *color, const char *dash, const char *label)
{
	fprintf(f,
		"<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"%s\" "
		"stroke-width=\"2\"%s/>\n",
		LEGEND_X, y - 4, LEGEND_X + 18, y - 4, color, dash);
	svg_text(f, LEGEND_X + 24, y, "class=\"small\"", "%s", label);
}

static void draw_panel(FILE *f, const struct timeline *tl, const struct layout *l, unsigned p)
{
	const struct panel_desc *pd = &panels[p];
	double y0 = panel_y(p), data_max = panel_data_max(tl, p);
	double limit = panel_limit(tl, p, data_max);
	double y_step = nice_step(fmax(fmax(data_max, limit), 1e-9), 4), y_max, legend_y = y0 + 12;
	unsigned points = 0;

	if (!(data_max > 0) && isnan(limit))
		y_step = 1; /* all zero, or nothing: an axis from 0 to 4 */
	y_max = ceil(fmax(fmax(data_max, limit), 1e-9) / y_step - 1e-9) * y_step;
	if (y_max < 4 * y_step && !(data_max > 0))
		y_max = 4 * y_step;
	fprintf(f, "<g id=\"panel-%s\" class=\"panel\">\n", pd->id);
	svg_text(f, PLOT_X, y0 - 10, "class=\"panel-title\"", "%s", pd->title);
	draw_axes(f, l, y0, y_max, y_step, p == NPANELS - 1);
	if (!isnan(limit)) {
		double y = y0 + PANEL_H - limit / y_max * PANEL_H;

		fprintf(f,
			"<line id=\"limit-%s\" class=\"limit\" x1=\"%d\" y1=\"%.1f\" x2=\"%d\" "
			"y2=\"%.1f\"/>\n",
			pd->id, PLOT_X, y, PLOT_X + PLOT_W, y);
	}
	for (unsigned s = 0; s < pd->nseries; s++) {
		enum tl_series k = pd->series[s];

		points += draw_series(f, tl, l, k, y0, y_max);
		legend_entry(f, legend_y, series_desc[k].color, "", series_desc[k].label);
		legend_y += 16;
	}
	if (!isnan(limit)) {
		legend_entry(f, legend_y, "#555555", " stroke-dasharray=\"5 3\"",
			     p == 0 ? "max-bandwidth" : "downtime-limit");
		legend_y += 16;
	}
	if (p == 2 && !isnan(tl->downtime_ms)) {
		double t = isnan(l->downtime_to_s) ? tl->t_end_s : l->downtime_to_s;

		fprintf(f,
			"<circle id=\"final-downtime\" cx=\"%.1f\" cy=\"%.1f\" r=\"4\" "
			"fill=\"#e377c2\" stroke=\"#333\"/>\n",
			x_of(l, t), y0 + PANEL_H - tl->downtime_ms / y_max * PANEL_H);
		fprintf(
		    f, "<circle cx=\"%d\" cy=\"%.1f\" r=\"4\" fill=\"#e377c2\" stroke=\"#333\"/>\n",
		    LEGEND_X + 9, legend_y - 4);
		svg_text(f, LEGEND_X + 24, legend_y, "class=\"small\"", "downtime: %.0f ms",
			 tl->downtime_ms);
	}
	if (!points)
		svg_text(f, PLOT_X + PLOT_W / 2, y0 + PANEL_H / 2, "class=\"no-data\"",
			 "no data in this run");
	fprintf(f, "</g>\n");
}

/* The post-copy switch and the downtime, across every panel. */
static void draw_marks(FILE *f, const struct layout *l)
{
	double top = STRIP_Y, bottom = panel_y(NPANELS - 1) + PANEL_H;

	if (!isnan(l->downtime_from_s)) {
		double x0 = x_of(l, l->downtime_from_s), x1 = x_of(l, l->downtime_to_s);

		fprintf(f,
			"<rect id=\"mark-downtime\" class=\"mark downtime\" x=\"%.1f\" y=\"%.1f\" "
			"width=\"%.1f\" height=\"%.1f\"><title>downtime %.0f ms</title></rect>\n",
			x0, top, fmax(x1 - x0, 2), bottom - top,
			(l->downtime_to_s - l->downtime_from_s) * 1000);
		svg_text(f, x0 - 3, PANEL_Y0 - 24, "class=\"mark-label\" text-anchor=\"end\"",
			 "downtime %.0f ms", (l->downtime_to_s - l->downtime_from_s) * 1000);
	}
	if (!isnan(l->postcopy_s)) {
		double x = x_of(l, l->postcopy_s);

		fprintf(
		    f,
		    "<line id=\"mark-postcopy\" class=\"mark postcopy\" x1=\"%.1f\" y1=\"%.1f\" "
		    "x2=\"%.1f\" y2=\"%.1f\"/>\n",
		    x, top, x, bottom);
		svg_text(f, x + 3, PANEL_Y0 - 10, "class=\"mark-label\" fill=\"#8c564b\"",
			 "post-copy from %.2f s", l->postcopy_s);
	}
}

static void draw_header(FILE *f, const struct timeline *tl, const struct layout *l)
{
	const char *status = tl->status[0] ? tl->status : "none";
	char downtime[40] = "";

	if (!isnan(tl->downtime_ms))
		snprintf(downtime, sizeof(downtime), ", downtime %.0f ms", tl->downtime_ms);
	svg_text(f, PLOT_X, 24, "class=\"title\"", "Migration timeline%s%s%s%s",
		 tl->uri[0] ? " to " : "", tl->uri, tl->started[0] ? ", started " : "",
		 tl->started);
	svg_text(f, PLOT_X, 44, "class=\"subtitle\"", "%s after %.2f s%s; %u samples%s%s%s", status,
		 tl->t_end_s, downtime, tl->nsamples,
		 isnan(l->postcopy_s) ? "" : "; switched to post-copy",
		 tl->error_desc[0] ? "; error: " : "", tl->error_desc);
	if (tl->dropped_marks)
		svg_text(f, LEGEND_X, 44, "class=\"small\"", "%u marks beyond %u not drawn",
			 tl->dropped_marks, TL_MAX_MARKS);
}

static void draw(FILE *f, const struct timeline *tl)
{
	struct layout l;

	make_layout(tl, &l);
	fprintf(f,
		"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
		"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
		"viewBox=\"0 0 %d %d\" font-family=\"sans-serif\" font-size=\"12\">\n"
		"<title>vmig migration timeline</title>\n"
		"<style>\n"
		".grid{stroke:#e6e6e6;stroke-width:1}\n"
		".axis{stroke:#333;stroke-width:1}\n"
		".series{fill:none;stroke-width:1.6;stroke-linejoin:round}\n"
		".limit{stroke:#555;stroke-width:1;stroke-dasharray:5 3}\n"
		".sync{stroke:#666;stroke-width:1}\n"
		".postcopy{stroke:#8c564b;stroke-width:1.5}\n"
		".downtime{fill:#e377c2;fill-opacity:0.35;stroke:#e377c2}\n"
		".title{font-size:15px;font-weight:bold}\n"
		".subtitle{font-size:12px;fill:#333}\n"
		".panel-title{font-size:12px;font-weight:bold;fill:#222}\n"
		".tick,.small{font-size:10px;fill:#555}\n"
		".mark-label{font-size:10px;fill:#444}\n"
		".no-data{font-size:11px;fill:#999;text-anchor:middle}\n"
		"</style>\n"
		"<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
		SVG_W, SVG_H, SVG_W, SVG_H);
	draw_header(f, tl, &l);
	draw_status_strip(f, tl, &l);
	draw_syncs(f, tl, &l);
	for (unsigned p = 0; p < NPANELS; p++)
		draw_panel(f, tl, &l, p);
	draw_marks(f, &l);
	svg_text(f, PLOT_X + PLOT_W / 2.0, SVG_H - 12, "text-anchor=\"middle\"",
		 "time since the migration started (s)");
	fputs("</svg>\n", f);
}

int timeline_write_svg(const struct timeline *tl, const char *svg_path, struct vmig__err *err)
{
	FILE *f;
	int ret;

	if (!tl->nsamples) {
		vmig__err_set(err, "no sample to draw: the migration never reported");
		return -ENODATA;
	}
	f = fopen(svg_path, "w");
	if (!f) {
		ret = -errno;
		vmig__err_set(err, "cannot create %s: %s", svg_path, strerror(-ret));
		return ret;
	}
	draw(f, tl);
	ret = ferror(f) ? -EIO : 0;
	if (fclose(f) && !ret)
		ret = -EIO;
	if (ret)
		vmig__err_set(err, "writing %s failed", svg_path);
	return ret;
}
