// SPDX-License-Identifier: MIT
/*
 * A stand-in for an older vmig-blk, as a live upgrade's target: it answers
 * --version with the same state format, but refuses an option added since
 * (--write-blocking-stall-ms), as an older binary's getopt would. Run for
 * real it does nothing: the test only lets the upgrade's preflight run it.
 */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--write-blocking-stall-ms")) {
			fprintf(stderr, "%s: unrecognized option '%s'\n", argv[0], argv[i]);
			return 1;
		}
		if (!strcmp(argv[i], "--version")) {
			printf("vmig-blk 0.1.0 state-v2\n");
			return 0;
		}
	}
	return 1;
}
