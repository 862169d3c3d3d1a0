#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""QEMU's calc-dirty-rate and query-dirty-rate, in both of QEMU's modes that
need no KVM (page-sampling, dirty-bitmap), through QMP and HMP.

- An idle guest dirties nothing: 0 MB/s in both modes.
- A guest writing random pages at a set rate: the rate reported matches
  what the guest itself counted. Each measurement is checked against the
  guest's own count of writes over the same window, turned into distinct
  pages (random writes hit some pages twice), so the check holds at any
  speed of this machine.
- Every bad argument gets QEMU's error, a second measurement waits for the
  first, and dirty-bitmap is refused during a migration (page-sampling is
  not).

usage: test_dirty_rate.py BUILD_DIR
"""
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from vmigtest import VM, QMPError, Runner, check, free_port  # noqa: E402

MEM = 64 << 20
PAGES = MEM // 4096


def measure(vm, mode, **extra):
    """One 1 s measurement; returns (reported MB/s, expected MB/s from the
    guest's own count of writes during it)."""
    w0, t0 = vm.guest()["pages-written"], time.monotonic()
    vm.qmp.cmd("calc-dirty-rate", **{"calc-time": 1, "mode": mode}, **extra)
    deadline = time.monotonic() + 30
    while True:
        info = vm.qmp.cmd("query-dirty-rate")
        if info["status"] == "measured":
            break
        check(info["status"] == "measuring", "status %r" % info)
        check(time.monotonic() < deadline, "no result within 30 s")
        time.sleep(0.02)
    w1, t1 = vm.guest()["pages-written"], time.monotonic()
    check(info["mode"] == mode and info["calc-time"] == 1, "query-dirty-rate %r" % info)
    # Distinct pages among (w1 - w0) random writes, over the window the
    # test saw (a little longer than the measurement's).
    distinct = PAGES * (1 - math.exp(-(w1 - w0) / PAGES))
    return info["dirty-rate"], distinct * 4096 / (1 << 20) / (t1 - t0)


def case_idle(procs, build):
    vm = VM(procs, build, "--mem", "64M", "--fill", "random", name="vm")
    check(vm.qmp.cmd("query-dirty-rate")["status"] == "unstarted", "not unstarted")
    for mode in ("page-sampling", "dirty-bitmap"):
        rate, _ = measure(vm, mode)
        check(rate == 0, "%s: an idle guest dirtied %d MB/s" % (mode, rate))


def case_writer(procs, build):
    vm = VM(procs, build, "--mem", "64M", "--vcpus", 1, "--workload", "random",
            "--dirty-rate", "12M", "--fill", "random", name="vm")
    time.sleep(0.3)
    for mode, extra, lo, hi in (("dirty-bitmap", {}, 0.7, 1.3),
                                ("page-sampling", {"sample-pages": 16384}, 0.5, 1.5)):
        rate, want = measure(vm, mode, **extra)
        check(want > 2, "the guest wrote too little to measure (%.1f MB/s)" % want)
        check(lo * want <= rate <= hi * want + 1,
              "%s: %d MB/s reported, the guest dirtied %.1f MB/s" % (mode, rate, want))
    out = vm.hmp("info dirty_rate")
    check("Status: measured" in out and "Dirty rate:" in out and "(MB/s)" in out,
          "info dirty_rate: %r" % out)


def expect_error(vm, words, **args):
    try:
        vm.qmp.cmd("calc-dirty-rate", **args)
    except QMPError as e:
        check(words in e.desc, "unclear error for %r: %s" % (args, e.desc))
        return
    raise AssertionError("calc-dirty-rate accepted %r" % (args,))


def case_bad_input(procs, build):
    vm = VM(procs, build, "--mem", "64M", "--workload", "random", "--dirty-rate", "4M",
            name="vm")
    expect_error(vm, "out of range", **{"calc-time": 0})
    expect_error(vm, "out of range", **{"calc-time": 61})
    expect_error(vm, "dirty-ring is not enabled", **{"calc-time": 1, "mode": "dirty-ring"})
    expect_error(vm, "does not accept value", **{"calc-time": 1, "mode": "guess"})
    expect_error(vm, "out of range", **{"calc-time": 1, "sample-pages": 5})
    expect_error(vm, "only in page-sampling", **{"calc-time": 1, "mode": "dirty-bitmap",
                                                 "sample-pages": 512})
    expect_error(vm, "expected", **{"calc-time": "1"})
    vm.qmp.cmd("calc-dirty-rate", **{"calc-time": 2})
    expect_error(vm, "already being measured", **{"calc-time": 1})
    out = vm.hmp("calc_dirty_rate")
    check("usage" in out, "calc_dirty_rate without arguments: %r" % out)
    check(vm.status() == "running", "the VM stopped")


def case_during_migration(procs, build):
    src = VM(procs, build, "--mem", "64M", "--workload", "random", "--dirty-rate", "8M",
             "--fill", "random", name="src")
    dst = VM(procs, build, "--mem", "64M", "--incoming", "defer", "-S", name="dst")
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20})  # several seconds
    port = free_port()
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % port)
    src.wait_migration(30, ("active",))
    expect_error(src, "during a migration", **{"calc-time": 1, "mode": "dirty-bitmap"})
    # The most samples QEMU allows (1024 of this guest's 16384 pages): with
    # the default 512 per GiB, 32 pages, a slow run (the guest writing at a
    # fraction of its rate) could miss every written page by chance.
    rate, expected = measure(src, "page-sampling", **{"sample-pages": 16384})
    check(rate > 0, "page-sampling saw nothing during the migration (the guest's own count "
          "says %.1f MB/s)" % expected)
    src.qmp.cmd("migrate_cancel")
    info = src.wait_migration(30)
    check(info["status"] == "cancelled", "source %r" % info)
    check(src.status() == "running", "source not running")


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    r = Runner(sys.argv[1])
    r.run("dirty-rate-idle", case_idle, r.build)
    r.run("dirty-rate-writer", case_writer, r.build)
    r.run("dirty-rate-bad-input", case_bad_input, r.build)
    r.run("dirty-rate-during-migration", case_during_migration, r.build)
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
