#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Crash recovery: while a Linux guest writes and verifies O_DIRECT blocks,
the backend is killed with SIGKILL three times and restarted with identical
arguments about 1 s later. QEMU reconnects (chardev reconnect=1) and must
resubmit or complete whatever was in flight: the guest must see zero I/O
errors and zero bad blocks, keep making progress after every restart, and the
image must be consistent afterwards. The guest-visible pause of each kill
(longest gap between two completed I/Os around it) is reported.

Usage: test_kill_restart.py BUILD_DIR   (VBLK_BACKEND=qsd for the reference)
"""
import os
import time

import blkenv

KILLS = 3
GUEST_SECONDS = 45
RESTART_DELAY_S = 1.0
BETWEEN_KILLS_S = 6.0


def writes_now(guest):
    return int(guest.last_progress()[0].get("writes", "0"))


def wait_progress(guest, than, timeout_s):
    """Waits until the guest reports more writes than `than`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if writes_now(guest) > than:
            return True
        time.sleep(0.2)
    return False


def body(env):
    image = env.image()
    sock = os.path.join(env.tmp, "blk.sock")
    be = env.backend("backend", sock, image).start()
    guest = blkenv.Guest(env, "qemu", sock,
                         ["--seconds", GUEST_SECONDS, "--blocks", 8192, "--write-pct", 70,
                          "--gap-ms", 200, "--progress-ms", 500]).start()
    guest.wait_line(r"^VMIG-GUEST: READY", 60)
    time.sleep(3)
    progressed = 0
    kill_times = []
    for i in range(KILLS):
        before = writes_now(guest)
        if "SUMMARY" in guest.serial():
            break  # the guest finished early: the count check below fails
        be.kill9()
        kill_times.append(time.monotonic())
        time.sleep(RESTART_DELAY_S)
        be.start()
        if wait_progress(guest, before + 100, 30):
            progressed += 1
        else:
            env.info("no guest progress after restart %d" % (i + 1))
        time.sleep(BETWEEN_KILLS_S)
    env.case("killed_during_writes", len(kill_times) == KILLS,
             "only %d of %d kills happened before the guest finished" %
             (len(kill_times), KILLS))
    env.case("progress_after_each_restart", progressed == KILLS,
             "guest progressed after %d of %d restarts" % (progressed, len(kill_times)))
    result = guest.result(timeout_s=GUEST_SECONDS + 90)
    env.check_summary(guest, result, min_writes=1000)
    gaps = sorted((float(g["gap_ms"]) for g in blkenv.parse_kv_lines(guest.serial(), "GAP")),
                  reverse=True)
    env.info("guest-visible pauses (largest %d gaps, ms): %s" %
             (KILLS, " ".join("%.0f" % g for g in gaps[:KILLS])))
    env.case("pause_seen_per_kill", len(gaps) >= len(kill_times),
             "%d I/O gaps >= 200 ms for %d kills: were the kills real?" %
             (len(gaps), len(kill_times)))
    guest.proc.stop()
    be.proc.stop()
    rc, scan, out = env.scan_image(image)
    env.case("image_consistent", rc == 0 and int(scan.get("pattern", 0)) > 0,
             "host scan: %s" % out.strip()[-300:])


blkenv.run("kill_restart", body)
