#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Pre-copy migration between real vmig-vm processes over loopback.

Every case compares guest memory on both sides through pmemsave (so the check
does not trust the engine's own digest), and checks the guest's page
self-checks. Bad-input cases check that the destination reports a clear
error and keeps answering QMP, and that the source keeps running unharmed.
Connections that never become peers are covered by test_robustness.py.

usage: test_precopy.py BUILD_DIR
"""
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from vmigtest import VM, Relay, Runner, cancel_midway, check, free_port  # noqa: E402

MEM = 128 << 20
MEM_ARG = "128M"
PREAMBLE = 32  # bytes: a connection is not a peer before it has sent them


def pair(procs, build, workload="random", rate="32M", extra_src=(), extra_dst=(), vcpus=2):
    src = VM(procs, build, "--mem", MEM_ARG, "--vcpus", vcpus, "--workload", workload,
             "--dirty-rate", rate, "--fill", "random", *extra_src, name="src")
    dst = VM(procs, build, "--mem", MEM_ARG, "--vcpus", vcpus, "--incoming", "defer", "-S",
             *extra_dst, name="dst")
    return src, dst


def migrate(src, dst, uri=None, caps=(), timeout=180):
    port = free_port()
    uri = uri or "tcp:127.0.0.1:%d" % port
    if caps:
        c = [{"capability": n, "state": True} for n in caps]
        src.qmp.cmd("migrate-set-capabilities", capabilities=c)
        dst.qmp.cmd("migrate-set-capabilities", capabilities=c)
    dst.qmp.cmd("migrate-incoming", uri=uri)
    src.qmp.cmd("migrate", uri=uri)
    info = src.wait_migration(timeout)
    dinfo = dst.wait_migration(30)
    return info, dinfo


def assert_completed_and_equal(src, dst, info, dinfo):
    check(info["status"] == "completed", "source status %r: %s" % (info["status"],
                                                                 info.get("error-desc")))
    check(dinfo["status"] == "completed", "destination status %r: %s"
          % (dinfo["status"], dinfo.get("error-desc")))
    check(src.status() == "postmigrate", "source runstate %s" % src.status())
    check(dst.status() == "paused", "destination runstate %s (-S)" % dst.status())
    a, b = src.memory_digest(MEM), dst.memory_digest(MEM)
    check(a == b, "guest memory differs after migration")
    ram = info["ram"]
    check(ram["total"] == MEM, "ram.total %d" % ram["total"])
    check(ram["normal"] + ram["duplicate"] >= MEM // 4096,
          "sent %d pages for %d" % (ram["normal"] + ram["duplicate"], MEM // 4096))
    check(ram["transferred"] >= ram["normal-bytes"], "transferred < normal-bytes")
    check(ram["dirty-sync-count"] >= 1, "no dirty sync")
    check(ram["page-size"] == 4096, "page-size")
    check("downtime" in info and info["downtime"] >= 0, "no downtime reported")
    # As QEMU: after completion, mbps is the whole migration's average
    # (bytes over the time after setup), not the last period's rate.
    ms = max(info["total-time"] - info.get("setup-time", 0), 1)
    avg = ram["transferred"] * 8.0 / ms / 1000
    check(abs(ram["mbps"] - avg) <= 0.02 * avg + 0.01,
          "ram.mbps %.3f after completion, but the average was %.3f" % (ram["mbps"], avg))
    for vm in (src, dst):
        g = vm.guest()
        check(g["inconsistencies"] == 0, "guest self-check failed: %r" % g)


def case_workload(procs, build, workload, tracking="auto"):
    src, dst = pair(procs, build, workload, extra_src=("--dirty-tracking", tracking))
    time.sleep(0.5)  # let the guest write for a while first
    info, dinfo = migrate(src, dst, caps=("x-vmig-verify-memory",))
    assert_completed_and_equal(src, dst, info, dinfo)
    if workload != "idle":
        check(src.guest()["pages-written"] > 0, "workload wrote nothing")


def case_unix_socket(procs, build):
    src, dst = pair(procs, build, "hotset")
    uri = "unix:" + os.path.join(dst.dir, "mig.sock")
    info, dinfo = migrate(src, dst, uri=uri)
    assert_completed_and_equal(src, dst, info, dinfo)


def case_dest_runs_after_cont(procs, build):
    """The destination continues the workload and its self-checks pass."""
    src, dst = pair(procs, build, "random", extra_dst=("--workload", "random",
                                                       "--dirty-rate", "32M"))
    info, dinfo = migrate(src, dst)
    check(info["status"] == "completed", "migration %r" % info)
    dst.qmp.cmd("cont")
    check(dst.status() == "running", "destination not running after cont")
    dst.check_guest_verifies(500)


def case_max_bandwidth(procs, build):
    """max-bandwidth bounds throughput: 64 MiB of data at 32 MiB/s needs > 1.5 s."""
    src = VM(procs, build, "--mem", "64M", "--fill", "random", name="src")
    dst = VM(procs, build, "--mem", "64M", "--incoming", "defer", "-S", name="dst")
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 32 << 20})
    check(src.qmp.cmd("query-migrate-parameters")["max-bandwidth"] == 32 << 20,
          "parameter not kept")
    port = free_port()
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
    t0 = time.monotonic()
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % port)
    info = src.wait_migration(60)
    elapsed = time.monotonic() - t0
    check(info["status"] == "completed", "migration %r" % info)
    check(elapsed > 1.5, "64 MiB moved in %.2fs despite a 32 MiB/s limit" % elapsed)
    check(src.memory_digest(64 << 20) == dst.memory_digest(64 << 20), "memory differs")


def case_cancel_then_remigrate(procs, build):
    src, dst = pair(procs, build, "random")
    cancel_midway(src, dst, 8 << 20)
    # A fresh destination, full speed: must complete and match.
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    dst2 = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--incoming", "defer", "-S",
              name="dst2")
    info, dinfo = migrate(src, dst2)
    assert_completed_and_equal(src, dst2, info, dinfo)


def rss_shmem(vm):
    """Bytes of shared memory the VM process has mapped in (its guest RAM)."""
    with open("/proc/%d/status" % vm.proc.pid) as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem in /proc/%d/status" % vm.proc.pid)


def case_prealloc_dest(procs, build):
    """--mem-prealloc: RAM is populated at start and stays so; pages are written
    in place. The destination first receives part of a random-filled guest and
    is cancelled, so its RAM holds stale data; then a mostly-zero guest (zero
    pages must overwrite the stale ones) migrates into the same process."""
    dst = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--incoming", "defer", "-S",
             "--mem-prealloc", name="dst")
    check(rss_shmem(dst) >= MEM, "RAM not preallocated: RssShmem %d" % rss_shmem(dst))
    old = VM(procs, build, "--mem", MEM_ARG, "--fill", "random", "--seed", "77", name="old")
    cancel_midway(old, dst, 16 << 20)
    old.kill()
    src = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--workload", "random",
             "--dirty-rate", "32M", "--wss", "32M", name="src")
    time.sleep(0.3)
    info, dinfo = migrate(src, dst, caps=("x-vmig-verify-memory",))
    assert_completed_and_equal(src, dst, info, dinfo)
    check(info["ram"]["duplicate"] > 0, "no zero pages were sent")
    check(rss_shmem(dst) >= MEM, "RAM no longer populated: RssShmem %d" % rss_shmem(dst))


def case_truncated_stream(procs, build):
    rng = random.Random(int(os.environ.get("VMIG_TEST_SEED", "1")))
    src = VM(procs, build, "--mem", "64M", "--vcpus", 2, "--workload", "random",
             "--dirty-rate", "16M", "--fill", "random", name="src")
    for i in range(3):
        cut = rng.choice([5, 17, 4096 + rng.randrange(4096), rng.randrange(1 << 20, 60 << 20)])
        dst = VM(procs, build, "--mem", "64M", "--vcpus", 2, "--incoming", "defer", "-S",
                 name="dst%d" % i)
        port = free_port()
        dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
        relay = Relay(port, cut)
        src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port)
        info = src.wait_migration(60)
        check(info["status"] == "failed", "source %r after cut at %d" % (info["status"], cut))
        if cut < PREAMBLE:
            # Not a peer yet: dropped, and the destination waits on.
            deadline = time.monotonic() + 30
            while not dst.migrate_status().get("x-vmig-rejected-connections"):
                check(time.monotonic() < deadline, "cut preamble never dropped")
                time.sleep(0.05)
            d = dst.migrate_status()
            check(d["status"] == "setup", "destination %r after cut at %d" % (d, cut))
            dst.qmp.cmd("migrate_cancel")
        else:
            d = dst.wait_migration(60)
            check(d["status"] == "failed", "destination %r after cut at %d" % (d["status"], cut))
            check(d.get("error-desc"), "destination gave no error-desc")
        check(src.status() == "running", "source not running after failure")
        check(dst.alive(), "destination died")
        dst.qmp.cmd("query-status")
    dst = VM(procs, build, "--mem", "64M", "--vcpus", 2, "--incoming", "defer", "-S",
             name="dstok")
    info, dinfo = migrate(src, dst)
    check(info["status"] == "completed", "final migration %r" % info)
    check(src.memory_digest(64 << 20) == dst.memory_digest(64 << 20), "memory differs")
    check(dst.guest()["inconsistencies"] == 0 and src.guest()["inconsistencies"] == 0,
          "guest self-check failed")


def case_dest_killed(procs, build):
    src, dst = pair(procs, build, "stream")
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
    port = free_port()
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % port)
    time.sleep(1.0)
    dst.kill()
    info = src.wait_migration(30)
    check(info["status"] == "failed", "source %r after the destination died" % info["status"])
    check(src.status() == "running", "source not running: %s" % src.status())
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    dst2 = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--incoming", "defer", "-S",
              name="dst2")
    info, dinfo = migrate(src, dst2)
    assert_completed_and_equal(src, dst2, info, dinfo)


def case_size_mismatch(procs, build):
    src = VM(procs, build, "--mem", "32M", name="src")
    dst = VM(procs, build, "--mem", "16M", "--incoming", "defer", "-S", name="dst")
    info, dinfo = migrate(src, dst)
    check(dinfo["status"] == "failed", "destination %r" % dinfo["status"])
    check("size mismatch" in dinfo.get("error-desc", ""), "unclear: %r" % dinfo)
    check(info["status"] == "failed", "source %r" % info["status"])
    check("size mismatch" in info.get("error-desc", ""),
          "source does not relay the destination's reason: %r" % info.get("error-desc"))
    check(src.status() == "running", "source not running")


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    r = Runner(sys.argv[1])
    for wl in ("idle", "random", "stream", "hotset"):
        r.run("precopy-" + wl, case_workload, r.build, wl)
    r.run("precopy-random-uffd-sync", case_workload, r.build, "random", "sync")
    r.run("precopy-random-uffd-async", case_workload, r.build, "random", "async")
    r.run("precopy-unix-socket", case_unix_socket, r.build)
    r.run("precopy-dest-runs-after-cont", case_dest_runs_after_cont, r.build)
    r.run("max-bandwidth", case_max_bandwidth, r.build)
    r.run("cancel-then-remigrate", case_cancel_then_remigrate, r.build)
    r.run("prealloc-dest-reused", case_prealloc_dest, r.build)
    r.run("truncated-stream", case_truncated_stream, r.build)
    r.run("dest-killed-then-remigrate", case_dest_killed, r.build)
    r.run("ram-size-mismatch", case_size_mismatch, r.build)
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
