#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Migration benchmark: vmig-vm vs QEMU vs one raw loopback TCP stream, all
# moving the same idle guest filled with random data (pre-copy), and
# vmig-vm vs QEMU post-copy of a guest dirtying its working set. Builds its two small C
# helpers, makes sure the cached fill file exists with the right size, then
# hands over to bench_migrate.py, which starts, measures and tears down every
# VM. Prints a table; with --record (or BENCH_RECORD=1) it also rewrites the
# migrate section of docs/benchmarks.md.
#
# With --tls it runs the TLS comparison instead: each engine in clear and with
# x509 TLS on every connection, side by side, destinations preallocated, one
# channel and multifd (scenarios tls-precopy-1ch,tls-multifd-4), bounded by
# BENCH_DEADLINE (default 3600 s); --record then rewrites the tls section.
#
# With --two-host every scenario runs in the two-host model instead of on
# loopback: source and destination each in a network namespace of their own,
# joined by a veth pair, each pinned to a CPU of its own (needs root;
# see TwoHosts in bench_migrate.py). Its results go to their own sections.
#
# Usage: bench/migrate/run.sh BUILD_DIR [--tls] [--two-host] [--record]
# Environment (all optional):
#   BENCH_RUNS=3            runs per engine (medians are reported)
#   BENCH_MEM=4G            guest RAM size
#   BENCH_FILL_FILE=PATH    cached random file (default /var/tmp/vmig-bench-<MEM>.bin)
#   BENCH_SCENARIOS=precopy-1ch,postcopy-wss   comma-separated scenarios
#                           (also precopy-1ch-prealloc, precopy-1ch-hugetlb,
#                           multifd-4, precopy-write-heavy, postcopy; with --tls
#                           the default is tls-precopy-1ch,tls-multifd-4).
#                           multifd-4-zero-copy runs each engine with and without
#                           zero-copy-send; postcopy-wss-stream, -hotset, the
#                           -1vcpu variants of all three, postcopy-wss-noprealloc
#                           and postcopy-wss-multifd-2 (vmig with multifd) are
#                           the busy guest's other post-copy cases. --record
#                           writes those two groups to sections of their own.
#   BENCH_RUNTIMES=qemu,vmig      comma-separated engines (raw TCP always runs)
#   BENCH_TIMEOUT=600       seconds allowed per migration
#   BENCH_DEADLINE=0        no measurement starts after this many seconds
#                           (0: no limit; with --tls the default is 3600)
#   BENCH_QUIET_BUSY=0.15   wait until the host's CPUs are at most this busy...
#   BENCH_QUIET_WAIT=120    ...for up to this many seconds before each measurement
#   BENCH_RETRIES=2         re-measure a run that other processes disturbed...
#   BENCH_MAX_FOREIGN=0.25  ...i.e. used more than this many CPUs on average meanwhile
#   BENCH_PERF_DIR=DIR      also `perf record -g` both sides of each migration into DIR
#   BENCH_RECORD=1          same as --record
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

if [ $# -lt 1 ]; then
	echo "usage: $0 BUILD_DIR [--tls] [--two-host] [--record]" >&2
	exit 2
fi
build_dir=$(cd "$1" && pwd)
shift
record=${BENCH_RECORD:-0}
tls=0
two_host=0
for arg in "$@"; do
	case "$arg" in
	--record) record=1 ;;
	--tls) tls=1 ;;
	--two-host) two_host=1 ;;
	*) echo "$0: unknown argument $arg" >&2; exit 2 ;;
	esac
done

mem=${BENCH_MEM:-4G}
if [ "$tls" = 1 ]; then
	scenarios=${BENCH_SCENARIOS:-tls-precopy-1ch,tls-multifd-4}
	deadline=${BENCH_DEADLINE:-3600}
else
	scenarios=${BENCH_SCENARIOS:-precopy-1ch,postcopy-wss}
	deadline=${BENCH_DEADLINE:-0}
fi
runs=${BENCH_RUNS:-3}
fill=${BENCH_FILL_FILE:-/var/tmp/vmig-bench-$mem.bin}
mem_bytes=$(python3 -c '
import sys
s = sys.argv[1].upper()
m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
print(int(float(s[:-1]) * m[s[-1]]) if s[-1] in m else int(s))' "$mem")

tools=(cc python3 qemu-system-x86_64)
[ "$tls" = 1 ] && tools+=(openssl) # tests/lib/tlscerts.py makes the credentials
for tool in "${tools[@]}"; do
	if ! command -v "$tool" >/dev/null; then
		echo "bench/migrate: $tool not found (run scripts/install-deps.sh)" >&2
		exit 1
	fi
done

# The helpers are tiny: build them every time, so a stale binary never runs.
bin_dir="$build_dir/bench/migrate"
mkdir -p "$bin_dir"
cflags=(-O2 -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes)
cc "${cflags[@]}" -o "$bin_dir/fill_random" "$here/fill_random.c"
cc "${cflags[@]}" -pthread -o "$bin_dir/tcp_raw" "$here/tcp_raw.c"
cc "${cflags[@]}" -I"$here/../../lib" -o "$bin_dir/wp_probe" "$here/wp_probe.c" # not run here: see its header

# The fill file is only read before the measured window (QEMU prealloc,
# vmig-vm --fill), so it may live on disk; /var/tmp keeps it from pinning
# RAM between runs the way a tmpfs copy would.
have=$(stat -c %s "$fill" 2>/dev/null || echo 0)
if [ "$have" != "$mem_bytes" ]; then
	echo "bench/migrate: writing $mem_bytes random bytes to $fill"
	mkdir -p "$(dirname "$fill")"
	"$bin_dir/fill_random" "$fill" "$mem_bytes"
fi

results="$root/bench/results/migrate-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$results"
args=(--build-dir "$build_dir" --mem "$mem" --runs "$runs" --fill-file "$fill"
      --tcp-raw "$bin_dir/tcp_raw" --results-dir "$results"
      --scenarios "$scenarios" --runtimes "${BENCH_RUNTIMES:-qemu,vmig}"
      --timeout "${BENCH_TIMEOUT:-600}" --deadline "$deadline"
      --quiet-busy "${BENCH_QUIET_BUSY:-0.15}" --quiet-wait "${BENCH_QUIET_WAIT:-120}"
      --retries "${BENCH_RETRIES:-2}" --max-foreign "${BENCH_MAX_FOREIGN:-0.25}")
# The command quoted in the record: what `make bench` runs for this suite.
cmd="BENCH_RUNS=$runs BENCH_MEM=$mem BENCH_SCENARIOS=$scenarios bench/migrate/run.sh $(basename "$build_dir")"
if [ "$tls" = 1 ]; then
	args+=(--tls)
	cmd="$cmd --tls"
fi
if [ "$two_host" = 1 ]; then
	args+=(--two-host)
	cmd="$cmd --two-host"
fi
if [ "$record" = 1 ]; then
	doc="$root/docs/benchmarks.md"
	if [ ! -f "$doc" ]; then
		echo "bench/migrate: $doc is missing" >&2
		exit 1
	fi
	args+=(--record "$doc")
	cmd="$cmd --record"
fi

# The Python harness owns the VMs and kills them on exit, on Ctrl-C
# (SIGINT reaches the whole foreground group) and on SIGTERM/SIGHUP, which
# this trap forwards because the harness runs as a background child here.
py_pid=
forward() {
	[ -n "$py_pid" ] && kill -TERM "$py_pid" 2>/dev/null
	wait "$py_pid" 2>/dev/null
	exit 130
}
trap forward TERM HUP INT
python3 "$here/bench_migrate.py" "${args[@]}" --command "$cmd" &
py_pid=$!
set +e
wait "$py_pid"
rc=$?
set -e
trap - TERM HUP INT
echo "bench/migrate: raw results in $results"
exit $rc
