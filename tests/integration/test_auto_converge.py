#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""auto-converge: a guest that dirties memory faster than the link carries
only converges if its vCPUs are throttled (QEMU's capability "auto-converge"
and its cpu-throttle-* parameters).

Whether a migration converges must not depend on how fast this machine, this
build or its load lets the guest write, so the cases are sized to make the
outcome follow from the throttle alone:

- The source guest writes flat out over a working set of 128 pages (512 KiB)
  in 64 MiB of otherwise zero RAM, so the bulk round is short.
- max-bandwidth is at most 1 MiB/s: a round that carries the working set
  lasts half a second or more, far longer than a throttle slice (10 ms), and
  the link carries less than one page per millisecond.
- downtime-limit is 0: a round only ends the migration if the pages dirtied
  during it take no whole millisecond at the measured bandwidth, that is, if
  the guest wrote next to nothing for a whole round.

Unthrottled, or at 50%, both vCPUs run every other 10 ms and write thousands
of pages a second, so every round finds the whole working set dirty again:
the migration cannot end (and the guest dirtied as much as was sent, so the
throttle rises). At 95-99% a vCPU sleeps 190-990 ms after each 10 ms slice,
rounds shrink, and soon one passes in which neither vCPU ran: the migration
ends. The one figure that depends on speed is sized from a measurement: once
the migration runs, the guest's write rate is measured, and max-bandwidth is
lowered below 1 MiB/s if need be (a ThreadSanitizer build writes slowly) so
that the guest writes each page of its working set 16 times per round.

usage: test_auto_converge.py BUILD_DIR
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from vmigtest import VM, QMPError, Runner, check, free_port, wait_completed  # noqa: E402

MEM = 64 << 20
MEM_ARG = "64M"
LINK = 1 << 20  # max-bandwidth at most: less than a page per millisecond
WSS = 128 * 4096  # half a second of that link


def pair(procs, build, auto_converge, initial=95, increment=4, limit=99):
    src = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--workload", "random",
             "--dirty-rate", "0", "--wss", WSS, "--fill", "zero", name="src")
    dst = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--incoming", "defer", "-S",
             name="dst")
    if auto_converge:
        for vm in (src, dst):
            vm.qmp.cmd("migrate-set-capabilities",
                       capabilities=[{"capability": "auto-converge", "state": True}])
    # Large steps, so the test needs two of them rather than nine.
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": LINK,
                                             "downtime-limit": 0,
                                             "cpu-throttle-initial": initial,
                                             "cpu-throttle-increment": increment,
                                             "max-cpu-throttle": limit})
    uri = "tcp:127.0.0.1:%d" % free_port()
    dst.qmp.cmd("migrate-incoming", uri=uri)
    src.qmp.cmd("migrate", uri=uri)
    # With dirty tracking on, the unthrottled guest must write each page of
    # its working set 16 times per round (WSS / max-bandwidth seconds), so
    # that even at half speed it keeps them all dirty: slow the link down
    # to that if need be, but not to rounds of more than 4 s.
    rate = write_rate(src, 0.5) * 4096
    link = int(min(LINK, rate / 16)) & ~1023
    check(link >= WSS // 4, "the guest writes only %.1f MiB/s: too slow to keep %d pages "
          "dirty against a link that carries them in 4 s" % (rate / 2**20, WSS // 4096))
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": link})
    return src, dst


def write_rate(vm, seconds):
    """Pages per second the guest writes, over a short window."""
    w0, t0 = vm.guest()["pages-written"], time.monotonic()
    time.sleep(seconds)
    return (vm.guest()["pages-written"] - w0) / (time.monotonic() - t0)


def wait_throttle(src, timeout):
    """The first throttle percentage query-migrate reports, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = src.qmp.cmd("query-migrate")
        if info.get("cpu-throttle-percentage"):
            return info["cpu-throttle-percentage"]
        if info.get("status") not in ("setup", "active"):
            return None
        time.sleep(0.05)
    return None


def case_converges(procs, build):
    src, dst = pair(procs, build, True)
    pct = wait_throttle(src, 30)
    check(pct is not None and 90 <= pct <= 99, "no throttle reported: %r" % pct)
    hmp = src.qmp.cmd("human-monitor-command", **{"command-line": "info migrate"})
    check("cpu throttle percentage" in hmp or src.qmp.cmd("query-migrate")["status"] != "active",
          "info migrate does not show the throttle: %r" % hmp[:400])
    info, _ = wait_completed(src, dst, 60, 30)
    check("cpu-throttle-percentage" not in info, "throttle still reported when completed")
    check(src.guest()["throttle-percentage"] == 0, "source vCPUs left throttled")
    check(src.memory_digest(MEM) == dst.memory_digest(MEM), "guest memory differs")
    for vm in (src, dst):
        check(vm.guest()["inconsistencies"] == 0, "guest self-check failed")


def case_needs_throttle(procs, build):
    """The control: without auto-converge the same migration does not end."""
    src, dst = pair(procs, build, False)
    time.sleep(8)
    info = src.qmp.cmd("query-migrate")
    check(info["status"] == "active", "converged without throttling (%r): the other "
          "case would prove nothing" % info["status"])
    check("cpu-throttle-percentage" not in info, "throttled without auto-converge")
    src.qmp.cmd("migrate_cancel")
    check(src.wait_migration(30)["status"] == "cancelled", "cancel did not take")


def case_released_on_cancel(procs, build):
    """max-cpu-throttle caps it (50% is too little to converge here), and
    migrate_cancel gives the vCPUs their full speed back."""
    src, dst = pair(procs, build, True, initial=40, increment=40, limit=50)
    check(wait_throttle(src, 30) == 40, "first step is not cpu-throttle-initial")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and src.guest()["throttle-percentage"] != 50:
        time.sleep(0.1)
    check(src.guest()["throttle-percentage"] == 50, "throttle not capped at 50: %r" %
          src.guest())
    time.sleep(2.5)  # more periods: it must stay at the cap
    check(src.qmp.cmd("query-migrate").get("cpu-throttle-percentage") == 50, "beyond the cap")
    src.qmp.cmd("migrate_cancel")
    info = src.wait_migration(30)
    check(info["status"] == "cancelled", "status after cancel %r" % info["status"])
    check(src.status() == "running", "source not running after cancel")
    check(src.guest()["throttle-percentage"] == 0, "vCPUs still throttled after cancel")
    w0 = src.guest()["pages-written"]
    deadline = time.monotonic() + 10
    while src.guest()["pages-written"] <= w0:
        check(time.monotonic() < deadline, "source guest stopped writing")
        time.sleep(0.05)


def case_parameters(procs, build):
    vm = VM(procs, build, "--mem", "16M", name="vm")
    p = vm.qmp.cmd("query-migrate-parameters")
    check((p["cpu-throttle-initial"], p["cpu-throttle-increment"], p["max-cpu-throttle"],
           p["throttle-trigger-threshold"]) == (20, 10, 99, 50), "QEMU's defaults: %r" % p)
    for name, bad in (("cpu-throttle-initial", 0), ("cpu-throttle-increment", 100),
                      ("max-cpu-throttle", 100), ("throttle-trigger-threshold", 0)):
        try:
            vm.qmp.cmd("migrate-set-parameters", **{name: bad})
            raise AssertionError("%s=%d accepted" % (name, bad))
        except QMPError as e:
            check("range" in str(e), "unclear error for %s=%d: %s" % (name, bad, e))


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    r = Runner(sys.argv[1])
    r.run("auto-converge-converges", case_converges, r.build)
    r.run("auto-converge-control-without", case_needs_throttle, r.build)
    r.run("auto-converge-released-on-cancel", case_released_on_cancel, r.build)
    r.run("auto-converge-parameters", case_parameters, r.build)
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
