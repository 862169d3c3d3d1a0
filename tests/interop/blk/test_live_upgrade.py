#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Live upgrade: while a Linux guest writes and verifies O_DIRECT blocks,
`vmig-blk upgrade --socket PATH` replaces the running daemon with a new
process (the same binary here) three times. QEMU must not notice: the
daemon's "connections" counter (carried across the upgrade) stays the same,
QEMU logs nothing new (a reconnect always logs), and the guest sees zero I/O
errors and zero bad blocks. Each upgrade's pause, as measured by the daemon,
must be under 50 ms; the guest-visible gap around it is reported.

qemu-storage-daemon has no live upgrade, so VBLK_BACKEND=qsd fails here.

Usage: test_live_upgrade.py BUILD_DIR
"""
import os
import re
import subprocess
import time

import blkenv

UPGRADES = 3
GUEST_SECONDS = 35
PAUSE_LIMIT_MS = 50.0


def connections(be):
    return blkenv.find_key(be.rpc_call("vhost_get_controllers"), "connections")


def upgrade(env, sock):
    """Runs the upgrade CLI; returns (pause_ms or None, output)."""
    r = subprocess.run([env.vmig_blk, "upgrade", "--socket", sock], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=30)
    out = r.stdout.decode(errors="replace").strip()
    m = re.search(r"pause_ms=([0-9.]+)|([0-9.]+)\s*ms\b", out)
    if r.returncode != 0 or not m:
        return None, "exit %d: %s" % (r.returncode, out[-300:])
    return float(m.group(1) or m.group(2)), out


def body(env):
    if env.backend_kind != "vmig-blk":
        raise blkenv.Fail("backend %s has no live upgrade" % env.backend_kind)
    image = env.image()
    sock = os.path.join(env.tmp, "blk.sock")
    be = env.backend("backend", sock, image).start()
    guest = blkenv.Guest(env, "qemu", sock,
                         ["--seconds", GUEST_SECONDS, "--blocks", 8192, "--write-pct", 70,
                          "--gap-ms", 20, "--progress-ms", 500]).start()
    guest.wait_line(r"^VMIG-GUEST: READY", 60)
    time.sleep(4)
    conn_before = connections(be)
    qemu_log_before = guest.proc.text()
    pauses, errors = [], []
    for _ in range(UPGRADES):
        if "SUMMARY" in guest.serial():
            break
        pause, out = upgrade(env, sock)
        if pause is None:
            errors.append(out)
        else:
            pauses.append(pause)
        time.sleep(4)
    env.case("upgrades_succeeded", len(pauses) == UPGRADES,
             "%d of %d upgrades reported a pause; %s" % (len(pauses), UPGRADES,
                                                        " | ".join(errors)[:400]))
    env.info("daemon-measured pauses (ms): %s" % " ".join("%.2f" % p for p in pauses))
    env.case("pause_under_50ms", pauses and max(pauses) < PAUSE_LIMIT_MS,
             "max pause %s ms" % (max(pauses) if pauses else "n/a"))
    conn_after = connections(be)
    env.info("vhost-user connections before=%s after=%s" % (conn_before, conn_after))
    env.case("no_reconnect_counter", conn_before is not None and conn_before == conn_after,
             "connections before=%s after=%s" % (conn_before, conn_after))
    new_log = guest.proc.text()[len(qemu_log_before):].strip()
    env.case("no_reconnect_qemu_log", new_log == "", "QEMU logged: %s" % new_log[:300])
    result = guest.result(timeout_s=GUEST_SECONDS + 90)
    s = env.check_summary(guest, result, min_writes=1000)
    gaps = sorted((float(g["gap_ms"]) for g in blkenv.parse_kv_lines(guest.serial(), "GAP")),
                  reverse=True)
    env.info("guest-visible max gap %s ms over the run; largest gaps >= 20 ms: %s" %
             (s.get("maxgap_ms"), " ".join("%.0f" % g for g in gaps[:6]) or "none"))
    guest.proc.stop()
    be.proc.stop()
    rc, scan, out = env.scan_image(image)
    env.case("image_consistent", rc == 0 and int(scan.get("pattern", 0)) > 0,
             "host scan: %s" % out.strip()[-300:])


blkenv.run("live_upgrade", body)
