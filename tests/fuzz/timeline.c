// SPDX-License-Identifier: MIT
/*
 * Fuzz target: the timeline log that `vmig timeline` reads back and draws
 * (tools/vmig/timeline.c, tools/vmig/timeline_svg.c). A log is user input:
 * it may be truncated, edited, or not a log at all, and its values come from
 * a QMP server in the first place.
 *
 * Input: the bytes of a log (JSON lines, timeline.h). They go through
 * timeline_load as a file (a memfd, named by /proc/self/fd). A log that
 * loads must keep the reader's promises (bounded, samples in time order,
 * values in range or missing), and is drawn with timeline_write_svg into a
 * second memfd. The picture is then checked: balanced elements, every '&' an entity the escaper
 * writes, valid UTF-8 without control characters, numeric attributes made only of numbers (no nan
 * or inf), and the document ends with </svg>. A check that fails aborts, like a sanitizer report.
 */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vmig/timeline_int.h"

#include "fuzz.h"

#define MAX_DEPTH 16

static int log_fd = -1, svg_fd = -1;
static char log_path[64], svg_path[64];

static void setup_once(void)
{
	if (log_fd >= 0)
		return;
	log_fd = memfd_create("fuzz-timeline-log", MFD_CLOEXEC);
	svg_fd = memfd_create("fuzz-timeline-svg", MFD_CLOEXEC);
	if (log_fd < 0 || svg_fd < 0)
		abort();
	snprintf(log_path, sizeof(log_path), "/proc/self/fd/%d", log_fd);
	snprintf(svg_path, sizeof(svg_path), "/proc/self/fd/%d", svg_fd);
}

static bool write_all(int fd, const uint8_t *data, size_t size)
{
	size_t done = 0;

	if (ftruncate(fd, 0))
		return false;
	while (done < size) {
		ssize_t w = pwrite(fd, data + done, size - done, (off_t)done);

		if (w <= 0)
			return false;
		done += (size_t)w;
	}
	return true;
}

/* The whole of fd, NUL-terminated; *len excludes the NUL. */
NO_COVERAGE static char *read_all(int fd, size_t *len)
{
	struct stat st;
	char *buf;
	size_t done = 0;

	if (fstat(fd, &st) || st.st_size < 0)
		abort();
	buf = malloc((size_t)st.st_size + 1);
	if (!buf)
		abort();
	while (done < (size_t)st.st_size) {
		ssize_t r = pread(fd, buf + done, (size_t)st.st_size - done, (off_t)done);

		if (r <= 0)
			abort();
		done += (size_t)r;
	}
	buf[done] = '\0';
	*len = done;
	return buf;
}

/* Length of the UTF-8 sequence at s (strictly: no overlongs, surrogates
 * or code points above U+10FFFF), 0 if it is not one. */
NO_COVERAGE static size_t utf8_len(const unsigned char *s, size_t left)
{
	size_t n;
	uint32_t cp;

	if (s[0] < 0x80)
		return 1;
	if (s[0] >= 0xc2 && s[0] <= 0xdf)
		n = 2, cp = s[0] & 0x1f;
	else if (s[0] >= 0xe0 && s[0] <= 0xef)
		n = 3, cp = s[0] & 0x0f;
	else if (s[0] >= 0xf0 && s[0] <= 0xf4)
		n = 4, cp = s[0] & 0x07;
	else
		return 0;
	if (n > left)
		return 0;
	for (size_t i = 1; i < n; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (s[i] & 0x3f);
	}
	if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
	    (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return n;
}

/* Attributes the drawing fills with printf'd numbers only. */
NO_COVERAGE static bool numeric_attr(const char *name, size_t len)
{
	static const char *const names[] = {"x",  "y",	"x1",	 "y1",	   "x2", "y2",
					    "cx", "cy", "width", "height", "d"};

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (strlen(names[i]) == len && !memcmp(names[i], name, len))
			return true;
	return false;
}

/* The attributes of one start tag, from just after its name to its '>'. */
NO_COVERAGE static void check_attrs(const char *p, const char *end)
{
	while (p < end) {
		const char *name, *value;

		while (p < end && (*p == ' ' || *p == '\n'))
			p++;
		if (p >= end || *p == '/' || *p == '?')
			break;
		name = p;
		while (p < end && *p != '=')
			p++;
		CHECK(p + 1 < end && p[1] == '"');
		value = p + 2;
		p = memchr(value, '"', (size_t)(end - value));
		CHECK(p);
		if (numeric_attr(name, (size_t)(value - 2 - name)))
			for (const char *c = value; c < p; c++)
				CHECK(strchr("0123456789.-% MLVH", *c) && *c);
		p++;
	}
}

/*
 * A well-formedness check for what timeline_svg.c writes: elements nest,
 * text never holds markup, entities are the escaper's. Not a general XML
 * parser: the markup itself is fixed in the drawing code.
 */
NO_COVERAGE static void check_svg(const char *svg, size_t len)
{
	static const char *const entities[] = {"&amp;", "&lt;", "&gt;", "&quot;", "&#39;"};
	const char *stack[MAX_DEPTH];
	size_t stack_len[MAX_DEPTH];
	unsigned depth = 0;
	bool root_seen = false;

	CHECK(strlen(svg) == len); /* no NUL inside */
	CHECK(len >= 7 && !strcmp(svg + len - 7, "</svg>\n"));
	for (size_t i = 0; i < len;) {
		const unsigned char c = (unsigned char)svg[i];
		size_t n = utf8_len((const unsigned char *)svg + i, len - i);

		CHECK(n); /* valid UTF-8: a cut never leaves half a character */
		CHECK(c >= 0x20 || c == '\n');
		CHECK(c != 0x7f);
		if (c == '&') {
			bool known = false;

			for (size_t e = 0; e < sizeof(entities) / sizeof(entities[0]); e++)
				known |= !strncmp(svg + i, entities[e], strlen(entities[e]));
			CHECK(known);
		} else if (c == '>') {
			CHECK(!"'>' outside a tag");
		} else if (c == '<') {
			const char *end = memchr(svg + i, '>', len - i), *name = svg + i + 1;
			size_t name_len;

			CHECK(end);
			if (*name == '?') {
				CHECK(i == 0);
			} else if (*name == '/') {
				name++;
				name_len = (size_t)(end - name);
				CHECK(depth > 0 && stack_len[depth - 1] == name_len &&
				      !memcmp(stack[depth - 1], name, name_len));
				depth--;
			} else {
				name_len = strcspn(name, " />\n");
				CHECK(name_len > 0 && name + name_len <= end);
				CHECK(depth > 0 || !root_seen); /* one root element */
				root_seen = true;
				check_attrs(name + name_len, end);
				if (end[-1] != '/') {
					CHECK(depth < MAX_DEPTH);
					stack[depth] = name;
					stack_len[depth++] = name_len;
				}
			}
			i = (size_t)(end - svg) + 1;
			continue;
		}
		i += n;
	}
	CHECK(depth == 0 && root_seen);
}

/* What the reader promises about a loaded timeline (timeline_int.h):
 * bounded, samples in time order, values in range or missing. */
NO_COVERAGE static void check_loaded(const struct timeline *tl)
{
	CHECK(tl->nsamples >= 1 && tl->nsamples <= TL_MAX_SAMPLES);
	CHECK(tl->nmarks <= TL_MAX_MARKS);
	for (unsigned i = 0; i < tl->nsamples; i++) {
		const struct tl_sample *s = &tl->samples[i];

		CHECK(s->t_s >= 0 && s->t_s <= tl->t_end_s && tl->t_end_s <= 1e7);
		CHECK(i == 0 || s->t_s >= s[-1].t_s);
		for (unsigned k = 0; k < TL__SERIES; k++)
			CHECK(isnan(s->v[k]) || (s->v[k] >= 0 && isfinite(s->v[k])));
	}
	for (unsigned i = 0; i < tl->nmarks; i++)
		CHECK(tl->marks[i].t_s >= 0 && tl->marks[i].t_s <= tl->t_end_s &&
		      memchr(tl->marks[i].status, '\0', sizeof(tl->marks[i].status)));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct vmig__err err = {0};
	struct timeline *tl = NULL;
	char *svg;
	size_t len;
	int ret;

	setup_once();
	if (!write_all(log_fd, data, size))
		abort();
	ret = timeline_load(&tl, log_path, &err);
	if (ret) {
		/* A refused log says where and why, and hands nothing back. */
		CHECK(ret == -EINVAL || ret == -ENODATA || ret == -ENOMEM);
		CHECK(!tl && err.msg[0]);
		return 0;
	}
	check_loaded(tl);
	ret = timeline_write_svg(tl, svg_path, &err);
	CHECK(ret == 0); /* a loaded log has a sample, so it draws */
	timeline_free(tl);
	svg = read_all(svg_fd, &len);
	check_svg(svg, len);
	free(svg);
	return 0;
}
