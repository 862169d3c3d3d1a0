#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Packed virtqueues with real QEMU 7.2: the same disk as the other tests,
attached as vhost-user-blk-pci with packed=on, so the guest's virtio driver
and QEMU negotiate VIRTIO_F_RING_PACKED with the backend. A Linux guest keeps
16 O_DIRECT requests in flight, reads and checks each block before writing
its next generation, and checks the whole region at the end (blkcheck --qd,
as in test_kill_restart.py).

While it writes:
- the VM is paused and resumed twice (QMP stop/cont): QEMU stops the ring
  with GET_VRING_BASE and restarts it with SET_VRING_BASE, the avail
  position with its wrap counter in bit 15 on the way out and back (QEMU
  7.2 also reads and sends the used position in bits 16-31);
- the daemon is live-upgraded twice (`vmig-blk upgrade`): the new process
  takes the ring over at the position the old one stopped at, without QEMU
  reconnecting;
- the backend is killed with SIGKILL three times and restarted at once.
  QEMU hands the new process the same in-flight region, and, since it has no
  index of its own for a packed ring, the base it sends is that of the
  previous start: the position must come from the region. Two kills are
  "held" (writes delayed with vmig_blk_set_latency until QD requests are held in
  the daemon, none written: all must be redone), one "mid-stream" (10 ms on
  everything, the kill when half the queue depth is in flight).

After each restart the ring must be "recovered", recovered_requests must
equal num_resubmitted, and the guest must write again. At the end: no I/O
error, no bad block in the guest's check, and the host's scan of the image
finds only well-placed patterns.

Then a pre-copy migration of a second packed=on guest between two vmig-blk
on one image (as test_migrate_precopy.py does for split rings): QEMU carries
the ring position it got from the source's GET_VRING_BASE to the
destination's SET_VRING_BASE, and the destination guest must go on writing
and verifying with no error. The ring wraps hundreds of times over the
run (QEMU's ring of 128 descriptors, tens of thousands of requests).

Usage: test_packed.py BUILD_DIR
"""
import os
import re
import subprocess
import time

import blkenv

QD = 16
KILLS = ["held", "mid-stream", "held"]
PAUSES = 2
UPGRADES = 2
BLOCKS = 8192
STOP_BLOCK = BLOCKS
STOP_MARKER = b"VMIGSTOP"
GUEST_CAP_S = 900
HOLD_US = 30 * 1000 * 1000
MID_LATENCY_US = 10 * 1000
WAIT_S = 120
MIG_GUEST_SECONDS = 40
RING_PACKED = 1 << 34


def kill_once(be, guest, kind):
    rec = {"kind": kind}
    if kind == "held":
        be.rpc_call("vmig_blk_set_latency", {"write_us": HOLD_US})
        rec["seen_inflight"] = blkenv.wait_held(be, QD)
    else:
        be.rpc_call("vmig_blk_set_latency",
                    {"read_us": MID_LATENCY_US, "write_us": MID_LATENCY_US})
        blkenv.wait_writes(guest, blkenv.writes_now(guest) + QD)
        rec["seen_inflight"] = blkenv.wait_inflight(be, QD // 2)
    t_kill = time.monotonic()
    be.kill9()
    be.start()
    c, q = blkenv.wait_serving(be)
    rec["packed"] = bool(int(c.get("negotiated_features", "0"), 16) & RING_PACKED)
    rec["recovery"] = q.get("inflight_recovery")
    rec["recovered"] = q.get("recovered_requests")
    rec["broken"] = q.get("broken")
    blkenv.wait_writes(guest, blkenv.writes_now(guest) + 2 * QD)
    rec["progress_s"] = time.monotonic() - t_kill
    st = be.rpc_call("bdev_get_iostat")["bdevs"][0]
    rec["resubmitted"] = st.get("num_resubmitted")
    return rec


def packed_guest(env, name, sock, args, incoming=False):
    """A blkenv.Guest whose vhost-user-blk-pci device has packed=on."""
    guest = blkenv.Guest(env, name, sock, args, incoming=incoming)
    dev = [i for i, a in enumerate(guest.proc.argv) if a.startswith("vhost-user-blk-pci,")]
    if len(dev) != 1:
        raise blkenv.Fail("no vhost-user-blk-pci device in %s" % guest.proc.argv)
    guest.proc.argv[dev[0]] += ",packed=on"
    return guest


def migrate_phase(env):
    image = env.image("mig.img")
    sock_src = os.path.join(env.tmp, "src.sock")
    sock_dst = os.path.join(env.tmp, "dst.sock")
    be_src = env.backend("backend-src", sock_src, image, shared=True).start()
    be_dst = env.backend("backend-dst", sock_dst, image, shared=True).start()
    args = ["--seconds", MIG_GUEST_SECONDS, "--blocks", BLOCKS, "--write-pct", 60,
            "--gap-ms", 100, "--progress-ms", 500]
    src = packed_guest(env, "qemu-src", sock_src, args).start()
    dst = packed_guest(env, "qemu-dst", sock_dst, args, incoming=True).start()
    src.wait_line(r"^VMIG-GUEST: READY", 60)
    blkenv.wait_writes(src, 200)
    uri = "tcp:127.0.0.1:%d" % blkenv.free_port()
    dst.qmp.cmd("migrate-incoming", uri=uri)
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 24 << 20})
    t0 = time.monotonic()
    src.qmp.cmd("migrate", uri=uri)
    info = {}
    while time.monotonic() - t0 < WAIT_S:
        info = src.qmp.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.2)
    secs = time.monotonic() - t0
    env.case("migration_completed", info.get("status") == "completed",
             "status %s: %s" % (info.get("status"), info))
    if info.get("status") != "completed":
        return
    at_switch = blkenv.writes_now(src)

    # "completed" on the source comes before the destination QEMU starts
    # its device: wait until its ring runs before reading what it agreed.
    def dest_started():
        c, q = blkenv.queue0(be_dst)
        return c if c and q.get("started") else None
    try:
        c = blkenv.wait_until("the destination's ring start", dest_started)
    except blkenv.Fail:
        c = None
    feats = int((c or {}).get("negotiated_features", "0"), 16)
    env.case("packed_on_destination", feats & RING_PACKED != 0,
             "destination negotiated %#x" % feats)
    result = dst.result(timeout_s=MIG_GUEST_SECONDS + 90)
    env.case("guest_ran_on_destination", blkenv.writes_now(dst) > at_switch + 100,
             "writes %d at switch-over, %d on the destination" % (at_switch, blkenv.writes_now(dst)))
    s = env.check_summary(dst, result, min_writes=1000)
    env.info("migration %.1f s, downtime %s ms; destination guest: %s writes, %s reads" %
             (secs, info.get("downtime"), s.get("writes"), s.get("reads")))
    for p in (src.proc, dst.proc, be_src.proc, be_dst.proc):
        p.stop()
    rc, scan, out = env.scan_image(image)
    env.case("migrated_image_consistent", rc == 0 and int(scan.get("pattern", 0)) > 0,
             "host scan: %s" % out.strip()[-300:])


def body(env):
    if env.backend_kind != "vmig-blk":
        raise blkenv.Fail("this test reads vmig-blk's counters")
    image = env.image()
    sock = os.path.join(env.tmp, "blk.sock")
    be = env.backend("backend", sock, image).start()
    guest = packed_guest(env, "qemu", sock,
                         ["--qd", QD, "--seconds", GUEST_CAP_S, "--blocks", BLOCKS,
                          "--write-pct", 100, "--gap-ms", 200, "--progress-ms", 250,
                          "--stop-block", STOP_BLOCK]).start()
    guest.wait_line(r"^VMIG-GUEST: READY .*qd=%d" % QD, 60)
    blkenv.wait_writes(guest, 4 * QD)
    c, q = blkenv.queue0(be)
    feats = int((c or {}).get("negotiated_features", "0"), 16)
    env.case("packed_negotiated", feats & RING_PACKED != 0,
             "negotiated features %#x" % feats)
    env.info("ring size %s" % q.get("size"))

    for i in range(PAUSES):
        blkenv.wait_writes(guest, blkenv.writes_now(guest) + 2 * QD)
        guest.qmp.cmd("stop")
        time.sleep(0.3)
        _, q = blkenv.queue0(be)
        stopped = not q.get("started")
        guest.qmp.cmd("cont")
        blkenv.wait_writes(guest, blkenv.writes_now(guest) + 2 * QD)
        env.info("pause %d: ring stopped while paused: %s, guest writing again" %
                 (i + 1, stopped))
    env.case("pause_resume", True)

    conn_before = c.get("connections") if c else None
    upgraded = []
    for i in range(UPGRADES):
        blkenv.wait_writes(guest, blkenv.writes_now(guest) + 2 * QD)
        r = subprocess.run([env.vmig_blk, "upgrade", "--socket", sock], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30)
        out = r.stdout.decode(errors="replace").strip()
        m = re.search(r"pause_ms=([0-9.]+)", out)
        upgraded.append(float(m.group(1)) if r.returncode == 0 and m else None)
        env.info("upgrade %d: %s" % (i + 1, out[-200:]))
        blkenv.wait_writes(guest, blkenv.writes_now(guest) + 2 * QD)
    c, q = blkenv.queue0(be)
    env.case("live_upgrade", None not in upgraded and c and
             c.get("connections") == conn_before and not q.get("broken"),
             "pauses %s ms, connections before %s after %s, broken %s" %
             (upgraded, conn_before, c and c.get("connections"), q.get("broken")))

    kills = []
    for kind in KILLS:
        blkenv.wait_writes(guest, blkenv.writes_now(guest) + 2 * QD)
        r = kill_once(be, guest, kind)
        env.info("%s kill: %d in flight before, recovery %s, recovered_requests %s, "
                 "num_resubmitted %s, guest writing again after %.2f s" %
                 (kind, r["seen_inflight"], r["recovery"], r["recovered"],
                  r["resubmitted"], r["progress_s"]))
        kills.append(r)
    held = [r for r in kills if r["kind"] == "held"]
    env.case("packed_after_restart", all(r["packed"] for r in kills),
             "RING_PACKED negotiated after each restart: %s" % [r["packed"] for r in kills])
    env.case("recovered_from_region", all(r["recovery"] == "recovered" for r in kills),
             "recovery outcomes: %s" % [r["recovery"] for r in kills])
    env.case("ring_not_broken", not any(r["broken"] for r in kills),
             "broken after restart: %s" % [r["broken"] for r in kills])
    env.case("resubmitted_after_held_kills",
             all((r["resubmitted"] or 0) >= QD for r in held),
             "num_resubmitted after the held kills: %s (want >= %d each)" %
             ([r["resubmitted"] for r in held], QD))
    env.case("resubmitted_equals_recovered",
             all(r["resubmitted"] == r["recovered"] for r in kills),
             "num_resubmitted %s, recovered_requests %s" %
             ([r["resubmitted"] for r in kills], [r["recovered"] for r in kills]))

    with open(image, "r+b") as f:
        f.seek(STOP_BLOCK * 4096)
        f.write(STOP_MARKER + bytes(4096 - len(STOP_MARKER)))
    result = guest.result(timeout_s=600)
    s = env.check_summary(guest, result, min_writes=1000)
    env.info("guest: %s writes, %s reads, %s requests in flight on average" %
             (s.get("writes"), s.get("reads"), s.get("avg_inflight")))
    guest.proc.stop()
    be.proc.stop()
    rc, scan, out = env.scan_image(image)
    env.case("image_consistent", rc == 0 and int(scan.get("pattern", 0)) > 0,
             "host scan: %s" % out.strip()[-300:])
    migrate_phase(env)


blkenv.run("packed", body)
