#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Entry point of `make bench`: runs every benchmark suite in turn against one
# build directory. Migration (bench/migrate) first, then the vhost-user-blk
# suite (bench/blk) when it exists. Each suite prints its own table; with
# --record (or BENCH_RECORD=1) each rewrites only its own section of
# docs/benchmarks.md. The exit status is the first non-zero suite status, but
# a failing suite does not stop the next one from running.
#
# Usage: bench/run.sh BUILD_DIR [--record]
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ $# -lt 1 ]; then
	echo "usage: $0 BUILD_DIR [--record]" >&2
	exit 2
fi

rc=0
for suite in migrate blk; do
	script="$here/$suite/run.sh"
	[ -x "$script" ] || continue
	echo "== bench/$suite"
	"$script" "$@"
	st=$?
	if [ $st -ge 128 ]; then
		exit $st  # interrupted: stop here
	fi
	[ $rc -eq 0 ] && rc=$st
done
exit $rc
