/* SPDX-License-Identifier: MIT */
/*
 * What every fuzz target shares: the entry point libFuzzer (or driver.c,
 * the corpus replayer of `make check`) calls, and the oracle's helpers.
 */
#ifndef VMIG_TESTS_FUZZ_H
#define VMIG_TESTS_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Not assert(): the checks must hold in a build with NDEBUG too. */
#define CHECK(cond)                                                                                \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);   \
			abort();                                                                   \
		}                                                                                  \
	} while (0)

/* The checks are an oracle, not code under test: kept out of the coverage
 * that guides libFuzzer, where their per-byte loops only cost time (and
 * not inlined, which would instrument them in their caller). */
#ifdef __clang__
#define NO_COVERAGE __attribute__((no_sanitize("coverage"), noinline))
#else
#define NO_COVERAGE
#endif

#endif
