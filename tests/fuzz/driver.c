// SPDX-License-Identifier: MIT
/*
 * Stand-alone driver for the fuzz targets when libFuzzer is not used: replays
 * every file of a corpus directory, then runs a bounded number of
 * deterministic mutations of those files (bit flips, byte sets, truncation,
 * splices, random tails). A crash, a sanitizer report or a hang (the test's
 * timeout) fails the run. This is the fuzz smoke run of `make check`; real
 * fuzzing uses the libFuzzer build of the same target.
 *
 * usage: fuzz-NAME CORPUS_DIR [MUTATIONS]
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"

struct input {
	uint8_t *data;
	size_t size;
};

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng(void)
{
	/* xorshift64*: deterministic, so a failing mutation can be replayed. */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 2685821657736338717ull;
}

static int load_file(const char *path, struct input *in)
{
	FILE *f = fopen(path, "rb");
	long n;

	if (!f)
		return -1;
	if (fseek(f, 0, SEEK_END) || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) {
		fclose(f);
		return -1;
	}
	in->size = (size_t)n;
	in->data = malloc(in->size ? in->size : 1);
	if (!in->data || fread(in->data, 1, in->size, f) != in->size) {
		free(in->data);
		fclose(f);
		return -1;
	}
	fclose(f);
	return 0;
}

static size_t mutate(uint8_t *buf, size_t len, size_t cap, const struct input *other)
{
	unsigned n = 1 + (unsigned)(rng() % 4);

	for (unsigned i = 0; i < n; i++) {
		switch (rng() % 6) {
		case 0: /* flip a bit */
			if (len)
				buf[rng() % len] ^= (uint8_t)(1u << (rng() % 8));
			break;
		case 1: { /* set an interesting byte */
			static const uint8_t vals[] = {0, 1, 0x7f, 0x80, 0xff, 0x10, 0x40};
			if (len)
				buf[rng() % len] = vals[rng() % sizeof(vals)];
			break;
		}
		case 2: /* truncate */
			if (len)
				len = rng() % len;
			break;
		case 3: { /* splice from another input */
			if (other->size && len) {
				size_t at = rng() % len;
				size_t from = rng() % other->size;
				size_t cnt = (other->size - from < cap - at ? other->size - from : cap - at);
				cnt = cnt ? rng() % cnt + 1 : 0;
				memcpy(buf + at, other->data + from, cnt);
				if (at + cnt > len)
					len = at + cnt;
			}
			break;
		}
		case 4: { /* append random bytes */
			size_t add = rng() % 64;
			if (len + add > cap)
				add = cap - len;
			for (size_t j = 0; j < add; j++)
				buf[len + j] = (uint8_t)rng();
			len += add;
			break;
		}
		case 5: { /* write a random 32-bit little-endian value */
			if (len >= 4) {
				uint32_t v = (uint32_t)rng();
				if (rng() & 1)
					v &= 0xffff;
				memcpy(buf + rng() % (len - 3), &v, 4);
			}
			break;
		}
		}
	}
	return len;
}

int main(int argc, char **argv)
{
	struct input *inputs = NULL;
	size_t ninputs = 0;
	unsigned long mutations = 10000;
	DIR *d;
	struct dirent *de;
	size_t cap = 1 << 20;
	uint8_t *buf;

	if (argc < 2) {
		fprintf(stderr, "usage: %s CORPUS_DIR [MUTATIONS]\n", argv[0]);
		return 2;
	}
	if (argc > 2)
		mutations = strtoul(argv[2], NULL, 0);
	d = opendir(argv[1]);
	if (!d) {
		fprintf(stderr, "%s: cannot open corpus %s\n", argv[0], argv[1]);
		return 2;
	}
	while ((de = readdir(d))) {
		char path[4096];
		struct input in;

		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", argv[1], de->d_name);
		if (load_file(path, &in))
			continue;
		inputs = realloc(inputs, (ninputs + 1) * sizeof(*inputs));
		if (!inputs)
			return 2;
		inputs[ninputs++] = in;
		LLVMFuzzerTestOneInput(in.data, in.size);
	}
	closedir(d);
	if (!ninputs) {
		fprintf(stderr, "%s: empty corpus %s\n", argv[0], argv[1]);
		return 2;
	}
	buf = malloc(cap);
	if (!buf)
		return 2;
	for (unsigned long i = 0; i < mutations; i++) {
		const struct input *base = &inputs[rng() % ninputs];
		const struct input *other = &inputs[rng() % ninputs];
		size_t len = base->size < cap ? base->size : cap;

		memcpy(buf, base->data, len);
		len = mutate(buf, len, cap, other);
		/* Exact-size copy, so ASan sees reads past the end of the input. */
		uint8_t *exact = malloc(len ? len : 1);
		memcpy(exact, buf, len);
		LLVMFuzzerTestOneInput(exact, len);
		free(exact);
	}
	printf("%s: %zu corpus inputs, %lu mutations, no crash\n", argv[0], ninputs, mutations);
	for (size_t i = 0; i < ninputs; i++)
		free(inputs[i].data);
	free(inputs);
	free(buf);
	return 0;
}
