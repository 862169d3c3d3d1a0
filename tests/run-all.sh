#!/usr/bin/env bash
# Runs every test: unit and fuzz-smoke (meson) in the release build and in the
# ASan+UBSan build, then compiles the libFuzzer build, then the integration
# tests (real processes over loopback) and the interop tests (real QEMU, real
# Linux guest); with VMIG_TSAN=1, then the unit and integration tests once
# more under ThreadSanitizer. Prints one line per suite or case and ends with
# "N passed, N failed". A test that cannot run because something is missing
# counts as failed: nothing is skipped silently.
#
# usage: tests/run-all.sh BUILD_DIR ASAN_BUILD_DIR [FUZZ_BUILD_DIR [TSAN_BUILD_DIR]]
#   FUZZ_BUILD_DIR      the libFuzzer build, configured here if it is not
#                       (default: build-fuzz)
#   TSAN_BUILD_DIR      the ThreadSanitizer build (default: build-tsan)
#   VMIG_TSAN=0|1|only  skip (default), add, or run only the ThreadSanitizer part
#   VMIG_TESTS=pattern  only run integration/interop scripts whose path matches
#   VMIG_NINJA=cmd      how to run ninja (default: ninja), e.g. "ninja -j2"
set -uo pipefail
shopt -s nullglob # an empty folder yields no names, and is caught below
cd "$(dirname "$0")/.."
build=$(realpath "$1")
asan=$(realpath "$2")
fuzz=$(realpath -m "${3:-build-fuzz}")
tsan=$(realpath -m "${4:-build-tsan}")
tsan_mode=${VMIG_TSAN:-0}
case "$tsan_mode" in
0 | 1 | only) ;;
*)
	echo "run-all.sh: VMIG_TSAN must be 0, 1 or only, not '$tsan_mode'" >&2
	exit 2
	;;
esac
ninja=${VMIG_NINJA:-ninja}
passed=0
failed=0
last_failed=0 # failures of the latest count_meson or run_script
run_prefix=() # what test processes run under (setarch -R, if TSan needs it)
logdir=$(mktemp -d /tmp/vmig-check.XXXXXX)

count_meson() { # build-dir label [suite...] (default: unit fuzz)
	local dir=$1 label=$2 s suites=()
	shift 2
	[ $# -gt 0 ] || set -- unit fuzz
	for s in "$@"; do
		suites+=(--suite "$s")
	done
	local log="$logdir/meson-$label.log"
	"${run_prefix[@]}" meson test -C "$dir" "${suites[@]}" --num-processes 2 --print-errorlogs \
		>"$log" 2>&1
	local ok fail
	ok=$(awk '/^Ok:/ {print $2}' "$log")
	fail=$(awk '/^(Fail|Unexpected Pass|Timeout|Skipped|Expected Fail):/ {s += $NF} END {print s + 0}' "$log")
	if [ -z "$ok" ]; then
		echo "FAIL: meson tests ($label) did not run; see below"
		tail -30 "$log"
		failed=$((failed + 1))
		last_failed=1
		return
	fi
	grep -E '^ *[0-9]+/[0-9]+ ' "$log" | sed "s/^/  [$label] /"
	[ "$fail" -gt 0 ] && grep -B2 -A30 -E 'FAIL|TIMEOUT|SKIP' "$log" | tail -80
	passed=$((passed + ok))
	failed=$((failed + fail))
	last_failed=$fail
}

run_script() { # script build-dir [label]
	local t=$1 dir=$2 rc
	local log="$logdir/$(echo "$t${3:-}" | tr / _).log"
	echo "== $t ${3:-}"
	timeout --kill-after=10 1200 "${run_prefix[@]}" "$t" "$dir" >"$log" 2>"$log.err"
	rc=$?
	grep -E '^(PASS|FAIL):' "$log" | sed "s/^\(PASS\|FAIL\):/\1:${3:+ [$3]}/"
	local p f
	p=$(grep -c '^PASS:' "$log")
	f=$(grep -c '^FAIL:' "$log")
	if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
		echo "FAIL: $t exited with status $rc"
		tail -20 "$log.err"
		f=1
	fi
	# enough for a failed test's state dump (queues, serial tails) and its logs
	[ "$f" -gt 0 ] && tail -150 "$log.err"
	passed=$((passed + p))
	failed=$((failed + f))
	last_failed=$f
}

# The libFuzzer build, configured exactly as README.md documents it, so that
# it never rots: compiled with clang and -Werror, and each target run once
# over its checked-in corpus (which proves it links and starts; fuzzing for
# real is a job of its own). One line, passed or failed.
fuzz_configured() { # build-dir: with clang, -Dfuzz_libfuzzer=true and -Werror?
	python3 - "$1" 2>/dev/null <<'EOF'
import json, os, sys
d = sys.argv[1]
with open(os.path.join(d, "meson-info", "intro-buildoptions.json")) as f:
    opts = {o["name"]: o["value"] for o in json.load(f)}
with open(os.path.join(d, "compile_commands.json")) as f:
    cc = json.load(f)[0]["command"].split()[0]
sys.exit(0 if opts.get("fuzz_libfuzzer") is True and opts.get("werror") is True
         and "address" in opts.get("b_sanitize", "")
         and os.path.basename(cc).startswith("clang") else 1)
EOF
}

fuzz_build() { # build-dir
	local dir=$1 log="$logdir/fuzz-build.log" why="" f name
	echo "== libFuzzer build (clang, -Dfuzz_libfuzzer=true, ASan+UBSan)"
	# A build directory configured otherwise (gcc, no libFuzzer, no -Werror)
	# is not the documented build: start it again.
	if [ -d "$dir/meson-private" ] && ! fuzz_configured "$dir"; then
		echo "  $dir was configured otherwise: configuring it again"
		rm -rf "$dir"
	fi
	if [ ! -f "$dir/build.ninja" ] &&
		! CC=clang meson setup "$dir" -Dfuzz_libfuzzer=true -Db_sanitize=address,undefined \
			-Db_lundef=false >"$log" 2>&1; then
		why="meson setup failed"
	elif ! $ninja -C "$dir" >>"$log" 2>&1; then
		why="compile failed"
	else
		local corpora=(tests/fuzz/corpus/*/) inputs
		[ ${#corpora[@]} -gt 0 ] || why="no corpus in tests/fuzz/corpus"
		for f in "${corpora[@]}"; do
			name=$(basename "$f")
			inputs=("$f"*)
			if [ ! -x "$dir/tests/fuzz/fuzz-$name" ]; then
				why="no fuzz-$name was built"
			elif [ ${#inputs[@]} -eq 0 ]; then
				why="corpus $f is empty"
			elif ! timeout 120 "$dir/tests/fuzz/fuzz-$name" -runs=0 "${inputs[@]}" >>"$log" 2>&1; then
				why="fuzz-$name failed on its corpus"
			fi
			[ -n "$why" ] && break
		done
	fi
	if [ -z "$why" ]; then
		echo "PASS: libFuzzer build compiles, each target replays its corpus"
		passed=$((passed + 1))
	else
		echo "FAIL: libFuzzer build: $why"
		tail -30 "$log"
		failed=$((failed + 1))
	fi
}
# A test_* file that cannot run as a test script fails, with the reason: a
# test is never skipped because of its mode or its name.
runnable() { # path
	local t=$1 why=""
	case "$t" in
	*.py | *.sh) ;;
	*) why="named like a test, but not a .py or .sh script" ;;
	esac
	if [ -z "$why" ] && { [ ! -f "$t" ] || [ ! -x "$t" ]; }; then
		why="not executable, so it would never run (chmod +x it)"
	fi
	[ -z "$why" ] && return 0
	echo "FAIL: $t: $why"
	failed=$((failed + 1))
	return 1
}

# ThreadSanitizer. clang 14's runtime maps its shadow memory at fixed
# addresses, and on kernels that randomise mmap with more than 28 bits it
# stops at start ("unexpected memory mapping") or crashes, though not every
# time. So with more than 28 bits, its test processes run with ASLR off
# (setarch -R, which children inherit) even if one start succeeded; if even
# that fails, and we are root, vm.mmap_rnd_bits is lowered to 28 for the run
# and put back on exit, however the run ends.
tsan_rnd_bits="" # the value to put back, once lowered
tsan_restore() {
	[ -n "$tsan_rnd_bits" ] || return 0
	sysctl -q -w vm.mmap_rnd_bits="$tsan_rnd_bits" &&
		echo "  vm.mmap_rnd_bits put back to $tsan_rnd_bits"
	tsan_rnd_bits=""
}
trap tsan_restore EXIT
trap 'exit 130' INT TERM

tsan_starts() { # does a TSan program start, under run_prefix?
	local out
	out=$(TSAN_OPTIONS="" "${run_prefix[@]}" "$tsan/vm/vmig-vm" --help 2>&1 >/dev/null) &&
		! grep -q ThreadSanitizer <<<"$out"
}

tsan_setup() {
	local bits
	bits=$(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 0)
	run_prefix=()
	if [ ! -x "$tsan/vm/vmig-vm" ]; then
		echo "FAIL: no ThreadSanitizer build in $tsan (make tsan-build makes it)"
		failed=$((failed + 1))
		return 1
	fi
	[ "$bits" -le 28 ] && tsan_starts && return 0
	run_prefix=(setarch "$(uname -m)" -R)
	if tsan_starts; then
		echo "  ThreadSanitizer on this kernel (vm.mmap_rnd_bits=$bits): tests run under setarch -R"
		return 0
	fi
	run_prefix=()
	if [ "$bits" -gt 28 ] && [ "$(id -u)" -eq 0 ]; then
		tsan_rnd_bits=$bits
		if sysctl -q -w vm.mmap_rnd_bits=28 && tsan_starts; then
			echo "  ThreadSanitizer on this kernel: vm.mmap_rnd_bits lowered from $bits to 28 for the run"
			return 0
		fi
		tsan_restore
	fi
	echo "FAIL: ThreadSanitizer cannot start on this kernel ($(uname -r), vm.mmap_rnd_bits=$bits)"
	failed=$((failed + 1))
	return 1
}

# Each process that TSan reports on writes its report to a file of its own
# (log_path) and stops (halt_on_error, exit code 66), since an integration
# test's processes log into folders it removes. This prints the reports
# written since the last call and removes them; it fails if there were any.
tsan_reports() {
	local f clean=0
	for f in "$logdir"/tsan/report.*; do
		echo "  ThreadSanitizer report ($(basename "$f")):"
		sed -n '/WARNING: ThreadSanitizer/,/^SUMMARY/p' "$f" | head -80 |
			sed -E "s# \([^ ()]+\+0x[0-9a-f]+\)( \(BuildId: [0-9a-f]+\))?##; s#$tsan/\.\./##g; s#$PWD/##g; s/^/    /"
		rm -f "$f"
		clean=1
	done
	return $clean
}

tsan_part() {
	local t0=$SECONDS
	echo "== ThreadSanitizer build: unit tests"
	tsan_setup || return
	mkdir -p "$logdir/tsan"
	# Races on guest RAM are the guest's own (see tests/tsan.supp).
	export TSAN_OPTIONS="halt_on_error=1:exitcode=66:second_deadlock_stack=1:suppressions=$PWD/tests/tsan.supp:log_path=$logdir/tsan/report"
	count_meson "$tsan" tsan unit
	if ! tsan_reports && [ "$last_failed" -eq 0 ]; then
		echo "FAIL: [tsan] unit tests: ThreadSanitizer reports (above)"
		failed=$((failed + 1))
	fi
	for t in tests/integration/test_*; do
		[ -n "${VMIG_TESTS:-}" ] && [[ "$t" != *${VMIG_TESTS}* ]] && continue
		runnable "$t" || continue
		run_script "$t" "$tsan" tsan
		if ! tsan_reports && [ "$last_failed" -eq 0 ]; then
			echo "FAIL: [tsan] $t: ThreadSanitizer reports (above)"
			failed=$((failed + 1))
		fi
	done
	unset TSAN_OPTIONS
	run_prefix=()
	tsan_restore
	echo "== ThreadSanitizer part took $((SECONDS - t0)) s"
}

# These folders must hold tests: a missing or empty one fails the run.
for d in tests/integration tests/interop/qemu tests/interop/blk; do
	tests=("$d"/test_*)
	if [ ${#tests[@]} -eq 0 ]; then
		echo "FAIL: $d: no test_* scripts there (is the folder missing?)"
		failed=$((failed + 1))
	fi
done

if [ "$tsan_mode" != only ]; then
	echo "== unit + fuzz smoke (release build)"
	count_meson "$build" release
	echo "== unit + fuzz smoke (ASan+UBSan build)"
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		count_meson "$asan" asan

	fuzz_build "$fuzz"

	for t in tests/integration/test_* tests/interop/*/test_*; do
		[ -n "${VMIG_TESTS:-}" ] && [[ "$t" != *${VMIG_TESTS}* ]] && continue
		runnable "$t" || continue
		run_script "$t" "$build"
	done

	# The engine's real multi-process runs once more under ASan+UBSan: a memory
	# error in any vmig-vm aborts it and fails its case.
	export ASAN_OPTIONS=abort_on_error=1:detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
	for t in tests/integration/test_*; do
		[ -n "${VMIG_TESTS:-}" ] && [[ "$t" != *${VMIG_TESTS}* ]] && continue
		runnable "$t" || continue
		run_script "$t" "$asan" asan
	done
fi
[ "$tsan_mode" = 0 ] || tsan_part

rm -rf "$logdir"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
