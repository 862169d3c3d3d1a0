#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""A VM whose disk is local to its host moves with its disk: QEMU 7.2, a
Linux guest writing and verifying O_DIRECT blocks throughout, a vmig-blk
on each side with an image of its own (the destination's empty, started
with --incoming), and one `vmig migrate` command that mirrors the disk,
migrates the RAM and hands both over while the VM is stopped. Run twice:
with pre-copy of RAM, and with post-copy of RAM (the switch to post-copy
happens after the disk's hand-over, so the destination guest runs on a
whole disk while its RAM still arrives).

After the migration the destination guest goes on writing, and its final
pass reads back every block it ever wrote, the ones written on the source
before and during the copy included: 0 bad blocks. The destination image
then passes the host-side scan, and the source's image, which the mirror
copied, holds nothing the destination lacks.

Usage: test_storage_mirror.py BUILD_DIR
"""
import os
import re
import subprocess
import time

import blkenv

GUEST_SECONDS = 40
MIGRATE_TIMEOUT_S = 240


def vmig_bin(env):
    p = os.path.join(env.build_dir, "tools/vmig/vmig")
    if not os.access(p, os.X_OK):
        raise blkenv.Fail("no vmig binary at %s" % p)
    return p


def one_run(env, postcopy):
    tag = "postcopy" if postcopy else "precopy"
    storage_uri = "unix:" + os.path.join(env.tmp, "storage-%s.sock" % tag)
    pair = blkenv.MigrationPair(env, GUEST_SECONDS, storage_uri=storage_uri,
                                prefix=tag + "-")
    src, dst, writes_before = pair.src, pair.dst, pair.writes_before
    port = blkenv.free_port()
    argv = [vmig_bin(env), "migrate", "unix:" + src.qmp2_path, "tcp:127.0.0.1:%d" % port,
            "--dest", "unix:" + dst.qmp2_path, "--storage-src", pair.be_src.rpc,
            "--storage-dst", pair.be_dst.rpc, "--storage-uri", storage_uri,
            # stretch the copy over seconds of guest I/O
            "--storage-speed", "16M", "--max-bandwidth", "32M"]
    if postcopy:
        argv.append("--postcopy")
    t0 = time.monotonic()
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=MIGRATE_TIMEOUT_S)
    out = r.stdout.decode(errors="replace")
    secs = time.monotonic() - t0
    env.case("%s_vmig_migrate_ok" % tag, r.returncode == 0,
             "exit %d after %.1fs: %s" % (r.returncode, secs, out[-1500:]))
    m = re.search(r"hand-over in (\d+) ms", out)
    env.case("%s_disk_handed_over" % tag, m is not None, out[-600:])
    ready = re.search(r"the disk is on the destination after ([0-9.]+) s", out)
    env.info("%s: %.1fs in all, disk ready after %s s, hand-over %s ms" %
             (tag, secs, ready.group(1) if ready else "?", m.group(1) if m else "?"))
    writes_at_switch = blkenv.writes_of(src.serial())
    env.case("%s_writes_during_copy" % tag, writes_at_switch > writes_before + 100,
             "guest writes %d before, %d at switch-over" % (writes_before, writes_at_switch))
    inc = pair.be_dst.rpc_call("vmig_blk_incoming_query")
    env.case("%s_destination_complete" % tag, inc.get("status") == "completed", str(inc))
    if r.returncode != 0:
        pair.stop()
        return
    s = pair.check_destination(env, writes_at_switch, GUEST_SECONDS + 120)
    env.info("%s: guest maxgap_ms=%s (switch-over included)" % (tag, s.get("maxgap_ms")))
    pair.finish(env)


def body(env):
    one_run(env, postcopy=False)
    one_run(env, postcopy=True)


blkenv.run("storage_mirror", body)
