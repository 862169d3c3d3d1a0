#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""`vmig migrate --timeline` against real QEMU 7.2 (it only speaks QMP).

usage: test_timeline_qemu.py BUILD_DIR

Starts pairs of qemu-system-x86_64 (TCG, 128 MiB, no devices; the destination
with -incoming defer), each with two QMP sockets: QEMU 7.2 serves one client
per monitor, and the test checks the source on the second while the CLI
holds the first. Then runs a throttled pre-copy and a post-copy switch with
--timeline, and checks what QEMU's own fields and events gave the picture:
the series, the status spans, the events capability turned on and the
MIGRATION events logged, the downtime and the post-copy switch marked, and
that headless Chromium renders it. Every wait is bounded.
"""
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "lib"))
sys.path.insert(0, os.path.join(HERE, "..", "..", "integration"))
from vmigtest import QMP, Runner, check, free_port  # noqa: E402
import test_timeline as tt  # noqa: E402  (the SVG checks and Chromium rendering)

QEMU = "qemu-system-x86_64"


class Qemu:
    """One QEMU with two QMP sockets: qmp_path for the CLI, a second one
    kept by the test."""

    def __init__(self, procs, tag, *extra):
        self.dir = procs.tmpdir()
        self.qmp_path = os.path.join(self.dir, tag + ".qmp")
        self.mon_path = os.path.join(self.dir, tag + "-test.qmp")
        argv = [QEMU, "-accel", "tcg", "-m", "128M", "-display", "none", "-nodefaults",
                "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path,
                "-qmp", "unix:%s,server=on,wait=off" % self.mon_path] + list(extra)
        self.proc = procs.start(argv, os.path.join(self.dir, tag + ".log"))
        deadline = time.monotonic() + 30
        while not os.path.exists(self.mon_path):
            check(self.proc.poll() is None, "QEMU exited at start: %s" % self.log())
            check(time.monotonic() < deadline, "QEMU made no QMP socket in 30 s")
            time.sleep(0.05)
        self.qmp = QMP(self.mon_path, timeout=30)

    def log(self):
        with open(self.proc.log, errors="replace") as f:
            return f.read()[-1000:]


def run_cli(build, src, dst, svg, *extra):
    argv = [tt.cli(build), "migrate", "unix:" + src.qmp_path, "tcp:127.0.0.1:%d" % free_port(),
            "--dest", "unix:" + dst.qmp_path, "--no-progress", "--timeline", svg] + list(extra)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    check(r.returncode == 0, "vmig migrate exited %d: %s" % (r.returncode, r.stderr[-800:]))
    return r


def check_common(build, src, svg, workdir):
    """What every QEMU run must show; returns the SVG's ids and the log."""
    root = tt.parse_svg(svg)
    ids = tt.check_series(root, {"throughput": 3, "remaining": 3})
    st = tt.statuses(root)
    check("active" in st and st[-1] == "completed", "status spans %r" % st)
    check("mark-downtime" in ids, "downtime not marked")
    caps = {c["capability"]: c["state"] for c in src.qmp.cmd("query-migrate-capabilities")}
    check(caps.get("events") is True, "the events capability was not turned on")
    log = tt.read_log(svg + ".log")
    events = [x["event"]["data"]["status"] for x in log
              if x.get("event", {}).get("event") == "MIGRATION"]
    check("active" in events and "completed" in events, "MIGRATION events logged: %r" % events)
    tt.render(svg, workdir, {"throughput": tt.COLOURS["throughput"],
                             "remaining": tt.COLOURS["remaining"]})
    again = os.path.join(workdir, "again.svg")
    r = subprocess.run([tt.cli(build), "timeline", svg + ".log", "-o", again],
                       capture_output=True, text=True, timeout=60)
    check(r.returncode == 0, "vmig timeline exited %d: %s" % (r.returncode, r.stderr))
    with open(svg) as a, open(again) as b:
        check(a.read() == b.read(), "the redrawn picture differs from the live one")
    return ids, log


def case_precopy(procs, build):
    src = Qemu(procs, "src")
    dst = Qemu(procs, "dst", "-incoming", "defer")
    svg = os.path.join(src.dir, "qemu.svg")
    run_cli(build, src, dst, svg, "--max-bandwidth", "1M")
    ids, log = check_common(build, src, svg, src.dir)
    check("mark-postcopy" not in ids, "a post-copy switch marked in a pre-copy")
    last = [x["query-migrate"] for x in log if "query-migrate" in x][-1]
    check(last["status"] == "completed" and "downtime" in last, "last sample %r" % last)
    check(src.qmp.cmd("query-migrate")["status"] == "completed", "QEMU says otherwise")


def case_postcopy(procs, build):
    src = Qemu(procs, "src")
    dst = Qemu(procs, "dst", "-incoming", "defer")
    svg = os.path.join(src.dir, "qemu-pc.svg")
    run_cli(build, src, dst, svg, "--max-bandwidth", "64K", "--postcopy-after", "1")
    ids, log = check_common(build, src, svg, src.dir)
    check("mark-postcopy" in ids, "post-copy switch not marked")
    check("postcopy-active" in tt.statuses(tt.parse_svg(svg)), "no postcopy-active span")
    check(dst.qmp.cmd("query-status")["status"] == "running", "destination not running")


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    r = Runner(sys.argv[1])
    if not shutil.which(QEMU):
        print("FAIL: setup: %s not installed (apt-get install qemu-system-x86)" % QEMU)
        return 1
    r.run("qemu-timeline-precopy", case_precopy, r.build)
    r.run("qemu-timeline-postcopy", case_postcopy, r.build)
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
