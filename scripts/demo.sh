#!/usr/bin/env bash
# make demo: migrate a running guest between two local vmig-vm processes over
# TCP loopback with the vmig CLI, print QEMU's `info migrate` report, then
# check that guest memory is equal on both sides (pmemsave dumps compared
# independently of the engine) and that the guest runs on at the destination
# with its page self-checks intact.
#
# usage: scripts/demo.sh [BUILD_DIR]   (DEMO_MEM, DEMO_RATE override the guest)
set -euo pipefail
build=$(realpath "${1:-build}")
mem=${DEMO_MEM:-1G}
rate=${DEMO_RATE:-64M}
work=$(mktemp -d /tmp/vmig-demo.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

vm="$build/vm/vmig-vm"
cli="$build/tools/vmig/vmig"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

echo "== source: $mem guest, 2 vCPUs writing random pages at $rate/s"
"$vm" --mem "$mem" --vcpus 2 --workload random --dirty-rate "$rate" --fill random \
	--qmp "unix:$work/src.qmp" >"$work/src.log" 2>&1 &
pids+=($!)
echo "== destination: waiting for the migration (-S: stays paused to compare memory)"
"$vm" --mem "$mem" --vcpus 2 --workload random --dirty-rate "$rate" \
	--qmp "unix:$work/dst.qmp" --incoming defer -S >"$work/dst.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
	[ -S "$work/src.qmp" ] && [ -S "$work/dst.qmp" ] && break
	sleep 0.1
done
sleep 1 # let the guest dirty memory for a moment

echo "== vmig migrate unix:src.qmp tcp:127.0.0.1:$port --dest unix:dst.qmp"
"$cli" migrate "unix:$work/src.qmp" "tcp:127.0.0.1:$port" --dest "unix:$work/dst.qmp"

echo
echo "== checking guest memory on both sides (pmemsave, sha256)"
bytes=$(python3 -c "import sys; m=sys.argv[1]; u={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(float(m[:-1])*u[m[-1].upper()]) if m[-1].upper() in u else int(m))" "$mem")
"$cli" qmp "unix:$work/src.qmp" pmemsave "{\"val\": 0, \"size\": $bytes, \"filename\": \"$work/src.mem\"}" >/dev/null
"$cli" qmp "unix:$work/dst.qmp" pmemsave "{\"val\": 0, \"size\": $bytes, \"filename\": \"$work/dst.mem\"}" >/dev/null
a=$(sha256sum "$work/src.mem" | cut -d' ' -f1)
b=$(sha256sum "$work/dst.mem" | cut -d' ' -f1)
rm -f "$work/src.mem" "$work/dst.mem"

echo "== resuming the guest on the destination for 2 s"
"$cli" qmp "unix:$work/dst.qmp" cont >/dev/null
sleep 2
guest=$("$cli" qmp "unix:$work/dst.qmp" x-vmig-query-guest)
incons=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["inconsistencies"])' "$guest")
verified=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["pages-verified"])' "$guest")
echo "destination guest: $verified pages re-checked since resume, $incons inconsistent"
echo
if [ "$a" = "$b" ] && [ "$incons" = 0 ]; then
	echo "guest memory verified equal on both sides: yes (sha256 ${a:0:16}...)"
else
	echo "guest memory verified equal on both sides: NO (source ${a:0:16}, destination ${b:0:16}, $incons inconsistent pages)"
	exit 1
fi
