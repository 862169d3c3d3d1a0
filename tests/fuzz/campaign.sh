#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# A fuzz campaign: every libFuzzer target (clang, ASan+UBSan) runs for a
# fixed budget, starting from its checked-in corpus, and the new inputs
# that add coverage are merged back into that corpus (only those, so it
# stays small enough to check in). Prints one line per target with its
# executions, rate, coverage and corpus size; a crash stops that target,
# keeps the input under $OUT/crash-*, and makes the script exit non-zero.
#
# usage: tests/fuzz/campaign.sh [SECONDS_PER_TARGET] [TARGET...]
#   SECONDS_PER_TARGET  default 1200 (20 minutes)
#   TARGET              default: every target in tests/fuzz/meson.build
#   FUZZ_BUILD=DIR      build directory (default build-fuzz-campaign)
#   OUT=DIR             where logs and crashes go (default a temp dir)
#   JOBS=N              targets fuzzed at once (default 1; each takes a core)
set -uo pipefail
cd "$(dirname "$0")/../.."
budget=${1:-1200}
shift || true
build=${FUZZ_BUILD:-build-fuzz-campaign}
out=${OUT:-$(mktemp -d /tmp/vmig-fuzz.XXXXXX)}
mkdir -p "$out"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
	mapfile -t targets < <(sed -n "s/^  '\([a-z_]*\)' : \[.*/\1/p" tests/fuzz/meson.build)
fi

if [ ! -f "$build/build.ninja" ]; then
	CC=clang meson setup "$build" -Dfuzz_libfuzzer=true -Db_sanitize=address,undefined \
		-Db_lundef=false --buildtype=debugoptimized >"$out/setup.log" 2>&1 ||
		{ echo "campaign: meson setup failed (see $out/setup.log)"; exit 1; }
fi
ninja -C "$build" >"$out/build.log" 2>&1 || { echo "campaign: build failed (see $out/build.log)"; exit 1; }

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# One target: fuzz, merge, print its line (into $out/$t.line).
fuzz_one() {
	local t=$1
	local bin="$build/tests/fuzz/fuzz-$t" corpus="tests/fuzz/corpus/$t" work="$out/$t"
	local log="$out/$t.log" rc execs rate cov ft result
	rm -rf "$work" && mkdir -p "$work"
	cp "$corpus"/* "$work"/
	"$bin" -max_total_time="$budget" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
		-artifact_prefix="$out/crash-$t-" "$work" >"$log" 2>&1
	rc=$?
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
	rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
	cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
	ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
	result=ok
	[ "$rc" -ne 0 ] && result="CRASH (exit $rc, see $log)"
	# Into the checked-in corpus (its named seeds stay): only the new
	# inputs that add coverage to it.
	"$bin" -merge=1 "$corpus" "$work" >"$out/$t.merge.log" 2>&1 ||
		echo "campaign: merging $t's corpus failed (see $out/$t.merge.log)"
	printf '%-12s %10s %8s %6s %7s %7s %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" \
		"${ft:-?}" "$(ls "$corpus" | wc -l)" "$result" >"$out/$t.line"
}

jobs=${JOBS:-1}
for t in "${targets[@]}"; do
	while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
		wait -n
	done
	fuzz_one "$t" &
done
wait
printf '%-12s %10s %8s %6s %7s %7s %s\n' target execs exec/s cov features corpus result
status=0
for t in "${targets[@]}"; do
	cat "$out/$t.line"
	grep -q CRASH "$out/$t.line" && status=1
done
echo "logs: $out"
exit $status
