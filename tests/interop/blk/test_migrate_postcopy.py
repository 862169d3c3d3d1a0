#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""QEMU post-copy migration of a guest whose disk is served by vhost-user-blk
on both sides: two back-ends on one shared image, a source QEMU and a
destination QEMU (-incoming defer), both with the postcopy-ram capability.
The test starts `migrate`, waits a little while the guest writes, then
switches to post-copy with migrate-start-postcopy: the guest runs on the
destination before its RAM has arrived. From then on the destination
back-end's own reads of guest memory (ring indices, descriptors, the data of
guest writes) and its writes (the data of guest reads, used-ring entries)
fault on missing pages; QEMU resolves those faults through the userfaultfd
the back-end handed it in the POSTCOPY_ADVISE reply, using the addresses the
back-end reported in its post-copy mapping reply. (Those accesses fault
only where the guest CPU has not touched the page first; see below.)
QEMU fails or hangs the destination on a back-end that gets the protocol
wrong: no PAGEFAULT, no fd in the ADVISE reply, a mapping reply of the wrong
size or gpa, or one that chokes on QEMU's fd-less ack (qemu-storage-daemon
7.2 fails here that way). The guest's last pass, on the destination, reads
back every block: it must find 0 bad blocks and 0 I/O errors.

What this test does not catch: the guest program touches each buffer with
the CPU before the device uses it, so QEMU has fetched the page before
vmig-blk touches it, and a back-end that skipped the userfaultfd
registration still passes (tried). tests/unit/vhost/test_postcopy.c covers
the fault path.

Guests run with blkenv.GUEST_MEM_KB of RAM (QEMU 7.2 TCG bug with RAM sizes
that are a multiple of 256 KiB; see blkenv).

Usage: test_migrate_postcopy.py BUILD_DIR   (VBLK_BACKEND=qsd for the reference)
"""
import re
import subprocess
import time

import blkenv

GUEST_SECONDS = 40
POSTCOPY_AFTER_S = 1.5
MIGRATE_TIMEOUT_S = 120


def set_postcopy(qmp):
    qmp.cmd("migrate-set-capabilities",
            capabilities=[{"capability": "postcopy-ram", "state": True}])


def try_upgrade(env, sock):
    """A live upgrade of the destination back-end while post-copy runs must
    be refused (its mappings are registered on QEMU's userfaultfd); returns
    (refused as expected, what the CLI said)."""
    r = subprocess.run([env.vmig_blk, "upgrade", "--socket", sock], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=30)
    out = r.stdout.decode(errors="replace").strip()
    return r.returncode != 0 and "post-copy" in out, "exit %d: %s" % (r.returncode, out[-300:])


def migrate(env, src, dst, during_postcopy=None):
    """Migrates with a switch to post-copy; returns (src status, dst status,
    seconds, the source's last query-migrate, whether post-copy started).
    during_postcopy() runs once while the destination is in post-copy."""
    port = blkenv.free_port()
    uri = "tcp:127.0.0.1:%d" % port
    set_postcopy(dst.qmp)
    set_postcopy(src.qmp)
    dst.qmp.cmd("migrate-incoming", uri=uri)
    # Slow pre-copy, so most of the RAM is still missing at the switch.
    # The background stream of post-copy is capped too (max-postcopy-
    # bandwidth), so the destination runs for several seconds with pages
    # missing and the back-end's own accesses fault; requested pages jump
    # the queue.
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20,
                                             "max-postcopy-bandwidth": 8 << 20})
    t0 = time.monotonic()
    src.qmp.cmd("migrate", uri=uri)
    time.sleep(POSTCOPY_AFTER_S)
    src.qmp.cmd("migrate-start-postcopy")
    info, dinfo, saw_postcopy = {}, {}, False
    while time.monotonic() - t0 < MIGRATE_TIMEOUT_S:
        info = src.qmp.cmd("query-migrate")
        dinfo = dst.qmp.cmd("query-migrate")
        if str(info.get("status", "")).startswith("postcopy"):
            saw_postcopy = True
        if during_postcopy and dinfo.get("status") == "postcopy-active":
            during_postcopy()
            during_postcopy = None
        if info.get("status") in ("failed", "cancelled"):
            break
        if info.get("status") == "completed" and dinfo.get("status") == "completed":
            break
        time.sleep(0.2)
    return (info.get("status"), dinfo.get("status"), time.monotonic() - t0, info,
            saw_postcopy)


def body(env):
    pair = blkenv.MigrationPair(env, GUEST_SECONDS)
    src, dst, writes_before = pair.src, pair.dst, pair.writes_before
    upgrade_result = []

    def during_postcopy():
        if env.backend_kind != "qsd":
            upgrade_result.append(try_upgrade(env, pair.sock_dst))

    status, dstatus, secs, info, saw_pc = migrate(env, src, dst, during_postcopy)
    ram = info.get("ram", {})
    env.case("migration_completed", status == "completed" and dstatus == "completed",
             "source %s, destination %s after %.1fs: %s" % (status, dstatus, secs, info))
    env.case("postcopy_was_active", saw_pc and int(ram.get("postcopy-requests", 0)) > 0,
             "post-copy seen %s, %s page requests from the destination" %
             (saw_pc, ram.get("postcopy-requests")))
    env.info("migration %.1fs, downtime %s ms, %s post-copy requests, %s MiB transferred" %
             (secs, info.get("downtime"), ram.get("postcopy-requests"),
              int(ram.get("transferred", 0)) >> 20))
    writes_at_switch = blkenv.writes_of(src.serial())
    env.case("writes_before_switch", writes_at_switch > writes_before,
             "guest writes %d before, %d at switch-over" % (writes_before, writes_at_switch))
    if status != "completed":
        return
    pair.check_destination(env, writes_at_switch, GUEST_SECONDS + 120)
    if env.backend_kind != "qsd":
        env.case("upgrade_refused_in_postcopy", bool(upgrade_result) and upgrade_result[0][0],
                 upgrade_result[0][1] if upgrade_result else
                 "the destination was never seen in postcopy-active")
        # The destination back-end went ADVISE -> LISTEN -> END and mapped
        # guest memory in post-copy mode (registered on the userfaultfd,
        # addresses reported to QEMU, which accepted them).
        log = pair.be_dst.proc.text()
        m = re.search(r"post-copy: listening -> off \((\d+) regions registered", log)
        env.case("backend_mapped_in_postcopy", m is not None and int(m.group(1)) > 0,
                 "destination back-end log: %s" % log.strip()[-400:])
    pair.finish(env)


blkenv.run("migrate_postcopy", body)
