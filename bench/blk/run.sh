#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# vhost-user-blk benchmark: builds the vblk-load front-end (not part of the
# meson tree: a benchmark tool with one plain cc line, same warnings as the
# project) into BUILD_DIR/bench-blk/, then runs bench_blk.py, which measures
# vmig-blk and qemu-storage-daemon side by side and, with --record, rewrites
# the blk section of docs/benchmarks.md.
#
# Usage: bench/blk/run.sh BUILD_DIR [--record]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ $# -lt 1 ]; then
	echo "usage: $0 BUILD_DIR [--record]" >&2
	exit 2
fi
build=$(cd "$1" && pwd)
shift
record=
for a in "$@"; do
	[ "$a" = "--record" ] && record=--record
done
[ "${BENCH_RECORD:-0}" = "1" ] && record=--record

out=$build/bench-blk
mkdir -p "$out"
${CC:-cc} -O2 -D_GNU_SOURCE -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes \
	-Wmissing-prototypes -pthread -o "$out/vblk-load" "$here/vblk-load.c"
exec python3 "$here/bench_blk.py" "$build" "$out/vblk-load" $record
