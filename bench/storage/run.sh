#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Storage migration benchmark: a VM with its local disk moved by vmig (two
# vmig-blk daemons, `vmig migrate --storage-*`) and by QEMU 7.2 alone
# (blockdev-mirror to the destination's NBD export), side by side; with
# --record, rewrites the storage-migration section of docs/benchmarks.md.
#
# Usage: bench/storage/run.sh BUILD_DIR [--record] [--runs N]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ $# -lt 1 ]; then
	echo "usage: $0 BUILD_DIR [--record] [--runs N]" >&2
	exit 2
fi
build=$(cd "$1" && pwd)
shift
args=()
while [ $# -gt 0 ]; do
	case "$1" in
	--record) args+=(--record) ;;
	--runs) args+=(--runs "$2"); shift ;;
	esac
	shift
done
[ "${BENCH_RECORD:-0}" = "1" ] && args+=(--record)
exec python3 "$here/bench_storage.py" "$build" "${args[@]}"
