#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Crash recovery at queue depth 16: while a Linux guest keeps 16 O_DIRECT
requests in flight on its vhost-user disk, the backend is killed with SIGKILL
four times and restarted at once with identical arguments. QEMU reconnects
(chardev reconnect=1) and hands the same in-flight region to the new process,
which must redo every request the old one had taken from the ring and not
returned, before anything else.

The guest (blkcheck --qd 16, see aio_loop in tests/interop/guest/blkcheck.c)
reads and checks every block before it writes the block's next generation,
and checks the whole region at the end. So a write the guest saw complete
but that is not on the disk (lost), or a request redone after a newer write
to its block completed (applied twice), shows up as a bad block.

Killed at a random moment, the daemon almost never has a request in flight:
it serves a 4 KiB request in microseconds and then waits for the guest. So
the test makes the moment certain with vmig_blk_set_latency, which delays
each request's I/O by half the latency and its return by all of it. Two
kinds of kill alternate:
- "held": writes get a latency of HOLD_US (reads none, so every guest slot
  soon waits on a write), and the kill comes as soon as the daemon reports
  QD requests held for that latency (delayed_requests; requests merely in
  flight may include one already at the disk, which still completes).
  None of them can have been written yet, nor returned, before the kill: the
  new process must redo all of them (num_resubmitted >= QD), or the guest's
  next read of those blocks finds a lost write.
- "mid-stream": reads and writes get MID_LATENCY_US, like a slow disk, and
  the kill comes the moment the daemon is seen with QD/2 requests in
  flight, wherever its queue thread is then: requests before their I/O,
  after it (so they are written twice), being returned. The count is
  reported, not asserted: some of them may have been returned just before
  the kill.

After each restart: the ring was recovered from the region ("recovered"), the
count the new process found there (recovered_requests) is the count it
resubmitted (num_resubmitted in bdev_get_iostat, counted since the process
started, so per kill), and the guest makes progress again. Every wait is for
an event the test observes (guest writes, daemon state), with a generous
bound; the guest runs until the test writes a stop marker into the image
(--stop-block), not for a guessed duration.

Usage: test_kill_restart.py BUILD_DIR   (VBLK_BACKEND=qsd for the reference:
only the kills and the data checks, qsd has no counters to read)
"""
import os
import time

import blkenv

QD = 16
KILLS = 4  # held, mid-stream, held, mid-stream
BLOCKS = 8192  # the region the guest writes: 32 MiB of the 64 MiB image
STOP_BLOCK = BLOCKS  # just after the region
STOP_MARKER = b"VMIGSTOP"  # blkcheck's STOP_MAGIC
GUEST_CAP_S = 900  # the guest's own limit, in case the stop marker never comes
# Far longer than anything between seeing the requests held and the kill:
# their I/O would only be issued after half of it.
HOLD_US = 30 * 1000 * 1000
MID_LATENCY_US = 10 * 1000


def gap_count(guest):
    return len(blkenv.parse_kv_lines(guest.serial(), "GAP"))


def wait_resumed(guest, gaps_before):
    """Waits until the guest's I/O resumed after the kill and it completed
    2 * QD more writes. The guest prints a GAP line at the first completion
    after a stall (a kill stalls it for QEMU's 1 s reconnect timer), and
    only PROGRESS lines after that line count: one printed just after the
    kill may still show writes from before it."""
    def cond():
        blkenv.wait_writes(guest, 0)  # for its check that the guest did not stop
        gaps, before, after = 0, 0, None
        for line in guest.serial().splitlines():
            if line.startswith("VMIG-GUEST: GAP "):
                gaps += 1
            elif line.startswith("VMIG-GUEST: PROGRESS "):
                if gaps > gaps_before:
                    after = blkenv.writes_of(line)
                else:
                    before = blkenv.writes_of(line)
        return after is not None and after > before + 2 * QD
    blkenv.wait_until("guest progress after the restart", cond)


def kill_once(env, be, guest, kind, counters):
    """One kill and restart; returns a dict of what it saw."""
    rec = {"kind": kind}
    if counters:
        if kind == "held":
            be.rpc_call("vmig_blk_set_latency", {"write_us": HOLD_US})
            rec["seen_inflight"] = blkenv.wait_held(be, QD)
        else:
            be.rpc_call("vmig_blk_set_latency",
                        {"read_us": MID_LATENCY_US, "write_us": MID_LATENCY_US})
            # The guest goes on at this latency, then the kill comes at
            # the first moment the daemon is seen with half the queue depth.
            blkenv.wait_writes(guest, blkenv.writes_now(guest) + QD)
            rec["seen_inflight"] = blkenv.wait_inflight(be, QD // 2)
    gaps = gap_count(guest)
    t_kill = time.monotonic()
    be.kill9()
    be.start()  # the same arguments, so no latency: a fresh process
    if counters:
        _, q = blkenv.wait_serving(be)
        rec["recovery"] = q.get("inflight_recovery")
        rec["recovered"] = q.get("recovered_requests")
    rec["reconnect_s"] = time.monotonic() - t_kill
    wait_resumed(guest, gaps)
    rec["progress_s"] = time.monotonic() - t_kill
    if counters:
        st = be.rpc_call("bdev_get_iostat")["bdevs"][0]
        rec["resubmitted"] = st.get("num_resubmitted")
    return rec


def describe(r):
    if "resubmitted" not in r:
        return "kill: guest writing again after %.2f s" % r["progress_s"]
    return ("%s kill: reconnected in %.2f s, guest writing again after %.2f s, "
            "%d in flight before the kill, recovery %s, recovered_requests %s, "
            "num_resubmitted %s" % (r["kind"], r["reconnect_s"], r["progress_s"],
                                    r["seen_inflight"], r["recovery"], r["recovered"],
                                    r["resubmitted"]))


def body(env):
    counters = env.backend_kind == "vmig-blk"
    image = env.image()
    sock = os.path.join(env.tmp, "blk.sock")
    be = env.backend("backend", sock, image).start()
    guest = blkenv.Guest(env, "qemu", sock,
                         ["--qd", QD, "--seconds", GUEST_CAP_S, "--blocks", BLOCKS,
                          "--write-pct", 100, "--gap-ms", 200, "--progress-ms", 250,
                          "--stop-block", STOP_BLOCK]).start()
    guest.wait_line(r"^VMIG-GUEST: READY .*qd=%d" % QD, 60)
    blkenv.wait_writes(guest, 4 * QD)
    kills = []
    for i in range(KILLS):
        blkenv.wait_writes(guest, blkenv.writes_now(guest) + 2 * QD)  # writing now, at QD
        kind = "held" if i % 2 == 0 else "mid-stream"
        r = kill_once(env, be, guest, kind if counters else "plain", counters)
        env.info("kill %d: %s" % (i + 1, describe(r)))
        kills.append(r)
    env.case("progress_after_each_restart", len(kills) == KILLS,
             "%d of %d kills done" % (len(kills), KILLS))
    if counters:
        held = [r for r in kills if r["kind"] == "held"]
        env.case("queue_depth_reached", all(r["seen_inflight"] >= QD for r in held),
                 "in flight in the daemon before the held kills: %s" %
                 [r["seen_inflight"] for r in held])
        env.case("recovered_from_region",
                 all(r["recovery"] == "recovered" for r in kills),
                 "recovery outcomes: %s" % [r["recovery"] for r in kills])
        env.case("resubmitted_after_held_kills",
                 all((r["resubmitted"] or 0) >= QD for r in held),
                 "num_resubmitted after the held kills: %s (want >= %d each)" %
                 ([r["resubmitted"] for r in held], QD))
        env.case("resubmitted_equals_recovered",
                 all(r["resubmitted"] == r["recovered"] for r in kills),
                 "num_resubmitted %s, recovered_requests %s" %
                 ([r["resubmitted"] for r in kills], [r["recovered"] for r in kills]))
    # The guest stops issuing at its next progress tick, lets every request
    # finish, then flushes and reads back the whole region.
    with open(image, "r+b") as f:
        f.seek(STOP_BLOCK * 4096)
        f.write(STOP_MARKER + bytes(4096 - len(STOP_MARKER)))
    result = guest.result(timeout_s=600)
    s = env.check_summary(guest, result, min_writes=1000)
    env.info("guest: %s writes, %s reads, %s requests in flight on average" %
             (s.get("writes"), s.get("reads"), s.get("avg_inflight")))
    gaps = sorted((float(g["gap_ms"]) for g in blkenv.parse_kv_lines(guest.serial(), "GAP")),
                  reverse=True)
    env.info("guest-visible pauses (largest %d gaps, ms): %s" %
             (KILLS, " ".join("%.0f" % g for g in gaps[:KILLS])))
    env.case("pause_seen_per_kill", len(gaps) >= len(kills),
             "%d I/O gaps >= 200 ms for %d kills: were the kills real?" %
             (len(gaps), len(kills)))
    guest.proc.stop()
    be.proc.stop()
    rc, scan, out = env.scan_image(image)
    env.case("image_consistent", rc == 0 and int(scan.get("pattern", 0)) > 0,
             "host scan: %s" % out.strip()[-300:])


blkenv.run("kill_restart", body)
