#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Where the longest guest I/O stall of the storage-migration benchmark
comes from on this testbed: QEMU 7.2's setup of the RAM migration, under
TCG, with the guest RAM size every test here uses.

The interop guest runs with 256 MiB + 8 KiB of RAM (blkenv.GUEST_MEM_KB):
with a RAM block whose length is a multiple of 64 pages, QEMU 7.2 under TCG
takes a word-at-a-time dirty-bitmap path that loses guest writes during a
migration (fixed upstream in 9.0). The other length makes QEMU take its
per-page path, and the first bitmap sync, at the setup of the migration,
then walks every page with the big lock held, so the vCPU (and the guest's
I/O) waits.

Each round here migrates the guest's RAM alone (vmig-blk serves one shared
image on both sides, no disk moves), once at 256 MiB + 8 KiB and once at
exactly 256 MiB, and reports QEMU's own setup-time (query-migrate) and the
longest I/O gap the source guest reported during the migration (its GAP
lines; gaps under 100 ms are not reported, so 0 means none). The 256 MiB
run is only timed: it is the size that loses writes, so its destination is
not checked.

Usage: qemu_setup_stall.py BUILD_DIR [ROUNDS]   (default 3 rounds)
"""
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "interop", "blk"))
import blkenv  # noqa: E402

SIZES = (("256 MiB + 8 KiB", blkenv.GUEST_MEM_KB), ("256 MiB", 256 * 1024))
MIGRATE_TIMEOUT_S = 90


def longest_gap(text, after_ms):
    """The longest GAP the guest reported that ended after after_ms of its
    own clock (its t=0 is its start), in ms; 0 if none."""
    gaps = [float(g.get("gap_ms", 0)) for g in blkenv.parse_kv_lines(text, "GAP")
            if float(g.get("end_ms", 0)) > after_ms]
    return max(gaps) if gaps else 0.0


def one(env, label, mem_kb, n):
    pair = blkenv.MigrationPair(env, 60, prefix="r%d-%d-" % (n, mem_kb), mem_kb=mem_kb)
    try:
        p = blkenv.parse_kv_lines(pair.src.serial(), "PROGRESS")
        t_guest = float(p[-1].get("t_ms", 0)) if p else 0.0
        uri = "tcp:127.0.0.1:%d" % blkenv.free_port()
        pair.dst.qmp.cmd("migrate-incoming", uri=uri)
        pair.src.qmp.cmd("migrate", uri=uri)
        t0, info = time.monotonic(), {}
        while time.monotonic() - t0 < MIGRATE_TIMEOUT_S:
            info = pair.src.qmp.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.2)
        env.case("%s_round%d_completed" % (mem_kb, n), info.get("status") == "completed",
                 "status %s" % info.get("status"))
        gap = longest_gap(pair.src.serial(), t_guest)
        env.info("%s: setup-time %s ms, downtime %s ms, longest guest I/O gap %.0f ms" %
                 (label, info.get("setup-time"), info.get("downtime"), gap))
        return info.get("setup-time"), gap
    finally:
        pair.stop()


def body(env):
    got = {label: [] for label, _ in SIZES}
    for n in range(rounds):
        for label, mem_kb in SIZES:
            got[label].append(one(env, label, mem_kb, n))
    for label, _ in SIZES:
        setup = [s for s, _ in got[label] if s is not None]
        gaps = [g for _, g in got[label]]
        env.info("%s, median of %d: setup-time %s ms, longest guest I/O gap %.0f ms" %
                 (label, rounds, statistics.median(setup) if setup else "-",
                  statistics.median(gaps)))


if len(sys.argv) not in (2, 3):
    print(__doc__)
    sys.exit(2)
rounds = int(sys.argv[2]) if len(sys.argv) == 3 else 3
sys.argv[1:] = [os.path.abspath(sys.argv[1])]
blkenv.run("qemu_setup_stall", body)
