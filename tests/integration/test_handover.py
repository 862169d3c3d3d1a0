#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The handover rule (docs/handover.md): exactly one side runs the guest.

- A link cut after the final device state left the source, before the
  destination's "running" reached it: the destination runs, and the source
  must stay paused and say that the outcome is unknown. The relay holds
  what the destination sends back from its "running" message (RESUMED) on,
  whenever that comes, and the test cuts every connection once the
  destination runs; the source never learns the outcome.
- A destination that refuses the state before it starts: the source knows
  the destination never ran, so it resumes.
- pause-before-switchover (QEMU's capability): the source stops and waits in
  "pre-switchover" for migrate-continue; a cancel there resumes it.

usage: test_handover.py BUILD_DIR
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from vmigtest import VM, QMPError, Relay, Runner, check, free_port, wait_completed  # noqa: E402

MEM_ARG = "64M"
MEM = 64 << 20
RP_RESUMED = 0x41  # lib/stream/format.h: the destination verified and started


def src_vm(procs, build, vcpus=2):
    return VM(procs, build, "--mem", MEM_ARG, "--vcpus", vcpus, "--workload", "random",
              "--dirty-rate", "16M", "--fill", "random", name="src")


def dst_vm(procs, build, *args, vcpus=2):
    return VM(procs, build, "--mem", MEM_ARG, "--vcpus", vcpus, "--incoming", "defer",
              "--workload", "random", "--dirty-rate", "16M", *args, name="dst")


def stays_stopped(vm, seconds=0.5):
    """The VM's vCPUs do not run: not 'running', and no page gets written."""
    check(vm.status() != "running", "%s is running" % vm.name)
    w0 = vm.guest()["pages-written"]
    time.sleep(seconds)
    check(vm.status() != "running", "%s is running" % vm.name)
    w1 = vm.guest()["pages-written"]
    check(w1 == w0, "%s vCPUs still write (%d -> %d pages)" % (vm.name, w0, w1))


def resumed_events(vm):
    vm.qmp.cmd("query-status")  # collects the events sent so far
    return [e for e in vm.qmp.events if e["event"] == "RESUME"]


def case_cut_after_commit(procs, build):
    src = src_vm(procs, build)
    dst = dst_vm(procs, build)
    port = free_port()
    # The destination's answer never gets back, however late this test
    # gets to cut the link.
    relay = Relay(port, hold_reverse=RP_RESUMED)
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port)
    check(relay.held.wait(60), "the destination never said it runs: %r" %
          dst.migrate_status())
    deadline = time.monotonic() + 30
    while dst.status() != "running":
        check(time.monotonic() < deadline, "the destination never started: %r" %
              dst.migrate_status())
        time.sleep(0.002)
    relay.cut()
    info = src.wait_migration(30)
    check(info["status"] == "failed", "source status %r (the cut came too late?)" %
          info["status"])
    check(info.get("x-vmig-handover-unknown") is True, "outcome not reported unknown: %r" % info)
    check("may be running" in info.get("error-desc", ""), "unclear error-desc: %r" %
          info.get("error-desc"))
    stays_stopped(src)
    check(not resumed_events(src), "the source resumed its vCPUs")
    check(dst.status() == "running", "destination stopped: %s" % dst.status())
    dst.check_guest_verifies(200)
    dinfo = dst.migrate_status()
    check(dinfo["status"] == "completed", "destination %r" % dinfo)
    # The operator's decision: the destination runs, so the source is
    # discarded; nothing here ever ran both.
    relay.close()


def case_dest_refuses(procs, build):
    """A destination with another vCPU count rejects the state before it
    starts and says so: the source knows it never ran, and resumes."""
    src = src_vm(procs, build, vcpus=2)
    dst = dst_vm(procs, build, vcpus=1)
    uri = "tcp:127.0.0.1:%d" % free_port()
    dst.qmp.cmd("migrate-incoming", uri=uri)
    src.qmp.cmd("migrate", uri=uri)
    info = src.wait_migration(60)
    check(info["status"] == "failed", "source status %r" % info["status"])
    check("x-vmig-handover-unknown" not in info, "outcome reported unknown: %r" % info)
    check("destination" in info.get("error-desc", ""), "error-desc: %r" % info.get("error-desc"))
    check(src.status() == "running", "source not running: %s" % src.status())
    w0 = src.guest()["pages-written"]
    deadline = time.monotonic() + 10
    while src.guest()["pages-written"] <= w0:
        check(time.monotonic() < deadline, "source guest does not write")
        time.sleep(0.05)
    dinfo = dst.wait_migration(30)
    check(dinfo["status"] == "failed", "destination %r" % dinfo)
    check(dst.status() != "running", "destination runs: %s" % dst.status())


def pause_pair(procs, build):
    src = src_vm(procs, build)
    dst = dst_vm(procs, build, "-S")
    src.qmp.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "pause-before-switchover", "state": True}])
    uri = "tcp:127.0.0.1:%d" % free_port()
    dst.qmp.cmd("migrate-incoming", uri=uri)
    src.qmp.cmd("migrate", uri=uri)
    src.wait_migration(60, ("pre-switchover", "failed", "completed"))
    info = src.migrate_status()
    check(info["status"] == "pre-switchover", "source %r" % info)
    check(src.status() == "finish-migrate", "source runstate %s" % src.status())
    stays_stopped(src, 0.3)
    check(dst.migrate_status()["status"] == "active", "destination %r" % dst.migrate_status())
    return src, dst


def case_pause_continue(procs, build):
    src, dst = pause_pair(procs, build)
    try:
        src.qmp.cmd("migrate-continue", state="active")
        raise AssertionError("migrate-continue accepted the wrong state")
    except QMPError as e:
        check("pre-switchover" in str(e) or "not in state" in str(e), "unclear error: %s" % e)
    src.qmp.cmd("migrate-continue", state="pre-switchover")
    wait_completed(src, dst, 60, 30)
    check(src.memory_digest(MEM) == dst.memory_digest(MEM), "guest memory differs")
    check(not resumed_events(src), "the source resumed its vCPUs")


def case_pause_cancel(procs, build):
    src, dst = pause_pair(procs, build)
    src.qmp.cmd("migrate_cancel")
    info = src.wait_migration(30)
    check(info["status"] == "cancelled", "source %r" % info)
    check(src.status() == "running", "source not running after cancel: %s" % src.status())
    d = dst.wait_migration(30)
    check(d["status"] in ("failed", "cancelled"), "destination %r" % d)
    check(dst.status() != "running", "destination runs: %s" % dst.status())


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    r = Runner(sys.argv[1])
    for i in range(3):
        r.run("handover-cut-after-commit-%d" % i, case_cut_after_commit, r.build)
    r.run("handover-dest-refuses-state", case_dest_refuses, r.build)
    r.run("pause-before-switchover-continue", case_pause_continue, r.build)
    r.run("pause-before-switchover-cancel", case_pause_cancel, r.build)
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
