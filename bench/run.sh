#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Entry point of `make bench`: runs every benchmark suite in turn against one
# build directory. Migration (bench/migrate) first, then the vhost-user-blk
# suite (bench/blk), then storage migration (bench/storage: a VM and its
# local disk, vmig against QEMU's mirror to NBD). Each suite prints its own table; with
# --record (or BENCH_RECORD=1) each rewrites only its own section of
# docs/benchmarks.md. The exit status is the first non-zero suite status, but
# a failing suite does not stop the next one from running.
#
# With --tls, only the migration suite's TLS comparison runs (each engine in
# clear and over TLS, side by side; see bench/migrate/run.sh). With
# --two-host, only the migration suite runs, in its two-host model.
#
# Usage: bench/run.sh BUILD_DIR [--tls] [--two-host] [--record]
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ $# -lt 1 ]; then
	echo "usage: $0 BUILD_DIR [--tls] [--two-host] [--record]" >&2
	exit 2
fi

suites=(migrate blk storage)
for arg in "$@"; do
	case "$arg" in
	--tls | --two-host) suites=(migrate) ;;
	esac
done

rc=0
for suite in "${suites[@]}"; do
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
