// SPDX-License-Identifier: MIT
/*
 * fill_random: writes SIZE bytes of pseudo-random data to PATH, fast.
 *
 * The migration benchmark fills guest RAM (of vmig-vm and of QEMU) from one
 * file, so both engines move exactly the same bytes. The data must defeat
 * zero-page detection and compression, but it need not be cryptographic:
 * reading /dev/urandom for 4 GiB takes far longer than the benchmark itself,
 * so this uses xoshiro256** seeded by splitmix64 (public-domain algorithms,
 * written out here from their published definitions). The same seed gives
 * the same file, which keeps reruns comparable.
 *
 * Usage: fill_random PATH SIZE_BYTES [SEED]
 * The file is written to PATH.tmp and renamed into place, so a cut-short run
 * never leaves a file of the right size with the wrong content.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHUNK_BYTES (8u << 20)

struct xoshiro {
	uint64_t s[4];
};

static uint64_t rotl64(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

static uint64_t splitmix64(uint64_t *state)
{
	uint64_t z = (*state += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void xoshiro_seed(struct xoshiro *x, uint64_t seed)
{
	for (int i = 0; i < 4; i++)
		x->s[i] = splitmix64(&seed);
}

static uint64_t xoshiro_next(struct xoshiro *x)
{
	uint64_t *s = x->s;
	uint64_t result = rotl64(s[1] * 5, 7) * 9;
	uint64_t t = s[1] << 17;

	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl64(s[3], 45);
	return result;
}

static int write_full(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len > 0) {
		ssize_t n = write(fd, p, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int fill_file(int fd, uint64_t size, uint64_t seed)
{
	struct xoshiro rng;
	uint64_t *chunk;
	uint64_t done = 0;
	int ret = 0;

	chunk = malloc(CHUNK_BYTES);
	if (!chunk)
		return -ENOMEM;
	xoshiro_seed(&rng, seed);
	while (done < size) {
		size_t len = size - done < CHUNK_BYTES ? (size_t)(size - done) : CHUNK_BYTES;

		for (size_t i = 0; i < CHUNK_BYTES / 8; i++)
			chunk[i] = xoshiro_next(&rng);
		ret = write_full(fd, chunk, len);
		if (ret < 0)
			break;
		done += len;
	}
	free(chunk);
	return ret;
}

int main(int argc, char **argv)
{
	char tmp_path[4096];
	uint64_t size, seed = 0x766d6967u;
	char *end;
	int fd, ret;

	if (argc < 3 || argc > 4) {
		fprintf(stderr, "usage: %s PATH SIZE_BYTES [SEED]\n", argv[0]);
		return 2;
	}
	errno = 0;
	size = strtoull(argv[2], &end, 0);
	if (errno || *end || size == 0) {
		fprintf(stderr, "fill_random: bad size '%s'\n", argv[2]);
		return 2;
	}
	if (argc == 4) {
		seed = strtoull(argv[3], &end, 0);
		if (*end) {
			fprintf(stderr, "fill_random: bad seed '%s'\n", argv[3]);
			return 2;
		}
	}
	if ((size_t)snprintf(tmp_path, sizeof(tmp_path), "%s.tmp", argv[1]) >= sizeof(tmp_path)) {
		fprintf(stderr, "fill_random: path too long\n");
		return 2;
	}
	fd = open(tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		fprintf(stderr, "fill_random: %s: %s\n", tmp_path, strerror(errno));
		return 1;
	}
	ret = fill_file(fd, size, seed);
	if (ret == 0 && fsync(fd) < 0)
		ret = -errno;
	if (close(fd) < 0 && ret == 0)
		ret = -errno;
	if (ret == 0 && rename(tmp_path, argv[1]) < 0)
		ret = -errno;
	if (ret < 0) {
		fprintf(stderr, "fill_random: %s: %s\n", argv[1], strerror(-ret));
		unlink(tmp_path);
		return 1;
	}
	return 0;
}
