#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Post-copy and hybrid migration between real vmig-vm processes over loopback.

Memory is compared through pmemsave with the destination started with -S, so
its memory at the end must equal the source at the switch. Other cases let
the destination run its workload during post-copy: every page it touches
before it arrives is fetched on demand, and the guest's page self-checks must
find no inconsistency. Recovery cases cut the connections through a relay
the test controls, at several points of post-copy, then recover and verify.
The multifd cases do the same with the background push on the data
channels (as QEMU 10.1 allows), compressed or not.

usage: test_postcopy.py BUILD_DIR
"""
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from vmigtest import (VM, QMPError, Relay, Runner, check, free_port,  # noqa: E402
                      push_after_requests, wait_completed)

MEM_ARG = "128M"
MEM = 128 << 20
CAPS = [{"capability": "postcopy-ram", "state": True},
        {"capability": "postcopy-blocktime", "state": True}]
# Pre-copy's max-bandwidth wherever the switch is asked for during it: its
# first pass over RAM then takes 8 s, so a switch asked for at once or within
# a second always finds it running (unlimited, the pass takes some 70 ms and
# may converge first: no post-copy at all). The post-copy push follows
# max-postcopy-bandwidth instead, so this slows nothing after the switch.
PRECOPY_BW = 16 << 20


def pair(procs, build, workload="random", dst_args=("-S",), rate="32M", multifd=None):
    """multifd: None, or the multifd parameters of both sides."""
    src = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--workload", workload,
             "--dirty-rate", rate, "--fill", "random", name="src")
    dst = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--incoming", "defer", *dst_args,
             name="dst")
    caps = CAPS + ([{"capability": "multifd", "state": True}] if multifd else [])
    for vm in (src, dst):
        vm.qmp.cmd("migrate-set-capabilities", capabilities=caps)
        if multifd:
            vm.qmp.cmd("migrate-set-parameters", **multifd)
    return src, dst


def start(src, dst, uri, switch_after):
    """Migrate at PRECOPY_BW, and ask for the switch after switch_after s."""
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": PRECOPY_BW})
    dst.qmp.cmd("migrate-incoming", uri=uri)
    src.qmp.cmd("migrate", uri=uri)
    if switch_after:
        time.sleep(switch_after)
    src.qmp.cmd("migrate-start-postcopy")


# The push's max-postcopy-bandwidth where a running destination must be seen
# to ask for pages: unlimited, the push may place all of RAM before its
# vCPUs first fault. Lifted by push_after_requests once they have.
REQUEST_PUSH_BW = 8 << 20


# Bytes the source counts and the destination does not: the preambles of
# the connections (which the destination reads before it loads a stream).
PREAMBLE_SLACK = 64 << 10


def check_dest_counts(info, dinfo, lossless):
    """The destination's transfer figures count what arrived on every
    channel, after the switch too and over every connection of a recovery,
    as the source counts what it sent. Without a cut: the same bytes, but
    for preambles. With cuts (bytes in flight lost, a write cut part-way
    that the source does not count): all of RAM, filled with random bytes,
    on the data channels too with multifd."""
    ram, dram = info["ram"], dinfo["x-vmig-ram"]
    if lossless:
        for key in ("transferred", "multifd-bytes"):
            check(ram[key] - PREAMBLE_SLACK <= dram[key] <= ram[key],
                  "destination %s %d, the source's %d" % (key, dram[key], ram[key]))
        check(0 < dram["postcopy-bytes"] <= ram["postcopy-bytes"],
              "destination postcopy-bytes %d, the source's %d" %
              (dram["postcopy-bytes"], ram["postcopy-bytes"]))
    check(dram["transferred"] >= MEM - (8 << 20),
          "destination transferred %d for %d bytes of RAM" % (dram["transferred"], MEM))
    check(not ram["multifd-bytes"] or dram["multifd-bytes"] >= MEM - (8 << 20),
          "destination multifd-bytes %d for %d bytes of RAM" % (dram["multifd-bytes"], MEM))


def finish_and_compare(src, dst, lossless=True):
    """lossless: no connection was cut (bytes in flight are lost at a cut)."""
    info, dinfo = wait_completed(src, dst)
    check(src.status() == "postmigrate", "source runstate %s" % src.status())
    check(src.memory_digest(MEM) == dst.memory_digest(MEM), "guest memory differs")
    check(dst.guest()["inconsistencies"] == 0, "destination self-check failed")
    check_dest_counts(info, dinfo, lossless)
    return info, dinfo


def case_postcopy(procs, build, workload, switch_after):
    # Hybrid (switch_after): start() makes the pre-copy slow, so the switch
    # comes in the middle of it.
    src, dst = pair(procs, build, workload)
    time.sleep(0.3)
    start(src, dst, "tcp:127.0.0.1:%d" % free_port(), switch_after)
    info, dinfo = finish_and_compare(src, dst)
    ram = info["ram"]
    check("downtime" in info, "no downtime reported")
    check("postcopy-blocktime" in dinfo, "no blocktime on the destination: %r" % dinfo)


def case_prealloc_dest(procs, build):
    """A --mem-prealloc destination keeps its pages for post-copy (pages not
    there yet are kept out of the guest's view: MINOR faults), and the
    migration is exact."""
    src, dst = pair(procs, build, "random", dst_args=("-S", "--mem-prealloc"))
    time.sleep(0.3)
    start(src, dst, "tcp:127.0.0.1:%d" % free_port(), 0)
    info, dinfo = finish_and_compare(src, dst)
    check(info["ram"]["postcopy-bytes"] > 0, "nothing was sent after the switch")


def case_dest_runs(procs, build, workload, prealloc=False):
    """The destination runs the workload at once; pages come on demand
    (prealloc: through MINOR faults on its populated RAM)."""
    src, dst = pair(procs, build, workload,
                    dst_args=("--workload", workload, "--dirty-rate", "64M") +
                    (("--mem-prealloc",) if prealloc else ()))
    # A sequential writer may stay behind the background push and never
    # wait; random writers always touch pages that have not arrived (and
    # must be seen to, so the push waits for their first request).
    requests = workload != "stream"
    if requests:
        src.qmp.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": REQUEST_PUSH_BW})
    time.sleep(0.3)
    start(src, dst, "tcp:127.0.0.1:%d" % free_port(), 0)
    if requests:
        push_after_requests(src, dst)
    info = src.wait_migration(120)
    dinfo = dst.wait_migration(60)
    check(info["status"] == "completed", "source %r: %s" % (info["status"],
                                                          info.get("error-desc")))
    check(dinfo["status"] == "completed", "destination %r" % dinfo)
    if requests:
        check(info["ram"]["postcopy-requests"] > 0, "no page was requested: %r" % info["ram"])
        check(dinfo["x-vmig-postcopy-requests"] > 0, "destination fetched nothing")
    check(len(dinfo["postcopy-vcpu-blocktime"]) == 2, "per-vCPU blocktime missing")
    check(sum(dinfo["postcopy-latency-dist"]) == dinfo["x-vmig-postcopy-faults"],
          "latency distribution does not add up: %r" % dinfo)
    check(dst.status() == "running", "destination runstate %s" % dst.status())
    dst.check_guest_verifies(1000)
    hmp = dst.hmp("info migrate")
    check("Postcopy Blocktime" in hmp, "info migrate lacks blocktime: %s" % hmp)


def case_multifd(procs, build, params, switch_after, dst_runs):
    """Post-copy with multifd: the pages pushed after the switch travel on
    the data channels (multifd-bytes grows after it; the main channel only
    carries the device state, the digest and the end), requested pages on
    the urgent channel. dst_runs: the destination runs its workload, else it
    stays stopped (-S) and its memory must equal the source's."""
    dst_args = ("--workload", "random", "--dirty-rate", "64M") if dst_runs else ("-S",)
    src, dst = pair(procs, build, "random", dst_args=dst_args, multifd=params)
    # start() makes the pre-copy slow (the post-copy push is not limited,
    # but until a running destination has asked for a page): most of RAM is
    # still to send at the switch.
    if dst_runs:
        src.qmp.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": REQUEST_PUSH_BW})
    time.sleep(0.3)
    start(src, dst, "tcp:127.0.0.1:%d" % free_port(), switch_after)
    if dst_runs:
        push_after_requests(src, dst)
        info = src.wait_migration(120)
        dinfo = dst.wait_migration(60)
        check(info["status"] == "completed" and dinfo["status"] == "completed",
              "source %r, destination %r: %s" % (info["status"], dinfo["status"],
                                                 info.get("error-desc")))
        check(info["ram"]["postcopy-requests"] > 0, "no page was requested: %r" % info["ram"])
        dst.check_guest_verifies(1000)
    else:
        info, dinfo = finish_and_compare(src, dst)
    ram = info["ram"]
    # transferred counts the main and data channels: what is not on the
    # data channels went on the main one (the urgent one is counted apart,
    # in postcopy-bytes). The main channel carries the DISCARD records (a
    # few MiB at most for scattered pages), not the pushed pages.
    main = ram["transferred"] - ram["multifd-bytes"]
    check(ram["postcopy-bytes"] >= MEM // 4,
          "post-copy moved only %d bytes: switched too late" % ram["postcopy-bytes"])
    check(main < ram["postcopy-bytes"] // 4,
          "the main channel carried %d bytes of %d after the switch: pages went on it" %
          (main, ram["postcopy-bytes"]))
    check(ram["multifd-bytes"] >= MEM - (8 << 20),
          "multifd-bytes %d for %d bytes of RAM" % (ram["multifd-bytes"], MEM))
    check(dinfo["x-vmig-postcopy-faults"] == sum(dinfo["postcopy-latency-dist"]),
          "latency distribution does not add up: %r" % dinfo)


def case_multifd_late_channel(procs, build):
    """A data channel whose bytes arrive a second late (a relay holds them):
    its pre-copy pages are still on the way when the source sends DISCARD
    for the pages dirtied since. They must be loaded before the DISCARDs,
    or a stale copy would stand for the page (the pushed copy, which comes
    after it on the same channel, is then dropped) and memory would differ."""
    src, dst = pair(procs, build, "random", multifd={"multifd-channels": 2})
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": PRECOPY_BW})
    port = free_port()
    # connections in order: main, urgent, data channels 0 and 1
    relay = Relay(port, forward_delay={2: 1.0})
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port)
    time.sleep(0.5)
    src.qmp.cmd("migrate-start-postcopy")
    finish_and_compare(src, dst)
    relay.close()


def case_recovery(procs, build, cuts, dst_args=("-S",), multifd=None):
    """Cut the link at several points of post-copy; recover each time."""
    src, dst = pair(procs, build, "random", dst_args=dst_args, multifd=multifd)
    # A slow pre-copy (so the switch comes first) and a slow background push
    # (so post-copy lasts long enough to be cut: over 100 MiB to push at
    # 4 MiB/s take some 25 s, the cuts a few; the limit is lifted after them).
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": PRECOPY_BW,
                                             "max-postcopy-bandwidth": 4 << 20})
    port = free_port()
    relay = Relay(port)
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port)
    time.sleep(0.5)
    src.qmp.cmd("migrate-start-postcopy")
    src.wait_migration(60, ("postcopy-active",))
    # The destination says it runs (RESUMED) before it reports
    # postcopy-active. A cut before the source reads RESUMED leaves the
    # outcome unknown, and cancel is then allowed on purpose (vmig_cancel);
    # this case is about a destination known to run.
    dst.wait_migration(60, ("postcopy-active",))
    # The destination's figures move on during post-copy, whichever
    # channels the push takes (at 4 MiB/s, about 200 KiB every 50 ms).
    moved = dst.qmp.cmd("query-migrate")["x-vmig-ram"]["transferred"]
    deadline = time.monotonic() + 10
    while dst.qmp.cmd("query-migrate")["x-vmig-ram"]["transferred"] <= moved:
        check(time.monotonic() < deadline,
              "the destination's transferred did not move in 10 s of post-copy")
        time.sleep(0.05)
    for i, delay in enumerate(cuts):
        time.sleep(delay)
        if src.qmp.cmd("query-migrate")["status"] == "completed":
            raise AssertionError("migration completed before cut %d; slow it down" % i)
        relay.cut()
        relay.close()
        src.wait_migration(30, ("postcopy-paused",))
        dst.wait_migration(30, ("postcopy-paused",))
        try:
            src.qmp.cmd("migrate_cancel")
            raise AssertionError("cancel was accepted during post-copy")
        except QMPError:
            pass
        port = free_port()
        relay = Relay(port)
        dst.qmp.cmd("migrate-recover", uri="tcp:127.0.0.1:%d" % port)
        src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port, resume=True)
        src.wait_migration(30, ("postcopy-active", "completed"))
    src.qmp.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    info, dinfo = finish_and_compare(src, dst, lossless=False)
    relay.close()
    if multifd:
        # counted over every set of data connections, not the last one only
        ram = info["ram"]
        check(ram["multifd-bytes"] >= MEM - (8 << 20) and
              ram["transferred"] >= ram["multifd-bytes"],
              "multifd-bytes %d, transferred %d for %d bytes of RAM" %
              (ram["multifd-bytes"], ram["transferred"], MEM))


def case_multifd_resume_partial(procs, build, end="cut"):
    """A resume whose data channels never arrive (the relay drops them)
    fails that attempt only: both sides go back to postcopy-paused, and the
    next migrate-recover and resume complete with the memory intact. The
    attempt ends with the link cut, or (end="pause") with migrate-pause on
    the destination, which would otherwise wait a minute for them."""
    src, dst = pair(procs, build, "random", multifd={"multifd-channels": 2})
    pause_in_postcopy(src, dst, 16 << 20, 0.3)
    port = free_port()
    relay = Relay(port, drop=(2, 3))  # main, urgent pass; data channels 0, 1 do not
    dst.qmp.cmd("migrate-recover", uri="tcp:127.0.0.1:%d" % port)
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port, resume=True)
    deadline = time.monotonic() + 20
    while relay.accepted < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    check(relay.accepted >= 4, "the source made %d connections, not 4" % relay.accepted)
    if end == "pause":
        check(dst.qmp.cmd("query-migrate")["status"] == "postcopy-recover",
              "destination not in postcopy-recover")
        dst.qmp.cmd("migrate-pause")
        dst.wait_migration(10, ("postcopy-paused",))
    else:
        relay.cut()  # the source waits for bitmaps that need the missing channels
    relay.close()
    recover_direct(src, dst)


def pause_in_postcopy(src, dst, push_rate, after):
    """A slow pre-copy (start()), the switch after 0.3 s, a push at
    push_rate, then migrate-pause `after` s into post-copy; returns with
    both sides paused."""
    src.qmp.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": push_rate})
    start(src, dst, "tcp:127.0.0.1:%d" % free_port(), 0.3)
    src.wait_migration(60, ("postcopy-active",))
    time.sleep(after)
    src.qmp.cmd("migrate-pause")
    src.wait_migration(30, ("postcopy-paused",))
    dst.wait_migration(30, ("postcopy-paused",))


def recover_direct(src, dst):
    """Both sides paused: recover without a relay, at full speed, and check."""
    src.wait_migration(30, ("postcopy-paused",))
    dst.wait_migration(30, ("postcopy-paused",))
    uri = "tcp:127.0.0.1:%d" % free_port()
    dst.qmp.cmd("migrate-recover", uri=uri)
    src.qmp.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    src.qmp.cmd("migrate", uri=uri, resume=True)
    finish_and_compare(src, dst, lossless=False)


def case_pause_recover(procs, build):
    """migrate-pause forces the same path, without a relay."""
    src, dst = pair(procs, build, "hotset")
    pause_in_postcopy(src, dst, 24 << 20, 0.5)
    recover_direct(src, dst)


def case_pause_during_recover_dest(procs, build):
    """A destination told to listen where the source never comes sits in
    postcopy-recover; migrate-pause there (as QEMU 8.2 and later allow)
    gives that attempt up, back to postcopy-paused, and a new
    migrate-recover then completes the migration."""
    src, dst = pair(procs, build, "hotset")
    pause_in_postcopy(src, dst, 24 << 20, 0.3)
    dst.qmp.cmd("migrate-recover", uri="tcp:127.0.0.1:%d" % free_port())
    check(dst.qmp.cmd("query-migrate")["status"] == "postcopy-recover",
          "destination not in postcopy-recover")
    time.sleep(0.3)  # the attempt waits for the source's connections
    dst.qmp.cmd("migrate-pause")
    dst.wait_migration(10, ("postcopy-paused",))
    recover_direct(src, dst)


def case_pause_during_recover_src(procs, build):
    """A source resuming to a peer that accepts and never answers sits in
    postcopy-recover; migrate-pause there gives that attempt up, and a
    resume to the real destination then completes the migration."""
    src, dst = pair(procs, build, "hotset")
    pause_in_postcopy(src, dst, 24 << 20, 0.3)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts; nobody ever reads or writes
    try:
        src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % silent.getsockname()[1],
                    resume=True)
        time.sleep(0.5)  # connected; waiting for the destination's bitmaps
        check(src.qmp.cmd("query-migrate")["status"] == "postcopy-recover",
              "source not in postcopy-recover")
        src.qmp.cmd("migrate-pause")
        src.wait_migration(10, ("postcopy-paused",))
    finally:
        silent.close()
    recover_direct(src, dst)


def case_fail_before_switch(procs, build):
    """With postcopy-ram on, a failure before the switch still keeps the source."""
    src, dst = pair(procs, build, "random")
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20})
    uri = "tcp:127.0.0.1:%d" % free_port()
    dst.qmp.cmd("migrate-incoming", uri=uri)
    src.qmp.cmd("migrate", uri=uri)
    time.sleep(0.5)
    dst.kill()
    info = src.wait_migration(30)
    check(info["status"] == "failed", "source %r" % info["status"])
    check(src.status() == "running", "source not running: %s" % src.status())
    check(src.guest()["inconsistencies"] == 0, "source self-check failed")


def case_cli(procs, build, flag):
    """The vmig CLI's --postcopy and --postcopy-after drive vmig-vm too."""
    src, dst = pair(procs, build, "random", rate="64M")
    cli = os.path.join(build, "tools", "vmig", "vmig")
    argv = [cli, "migrate", "unix:" + src.qmp_path, "tcp:127.0.0.1:%d" % free_port(),
            "--dest", "unix:" + dst.qmp_path, "--no-progress",
            "--capability", "postcopy-ram=on"] + flag
    if flag[0] == "--postcopy-after":
        # A pre-copy that takes about 4 s, so the 1 s timer decides.
        argv += ["--max-bandwidth", "32M"]
    else:
        # The switch is asked for at once: a slow pre-copy cannot converge
        # before it (as PRECOPY_BW).
        argv += ["--max-bandwidth", "16M"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, "vmig migrate exited %d: %s %s" % (r.returncode, r.stdout[-500:],
                                                               r.stderr[-500:]))
    check("postcopy ram" in r.stdout, "no post-copy in the report: %s" % r.stdout[-800:])
    check(src.memory_digest(MEM) == dst.memory_digest(MEM), "guest memory differs")


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    r = Runner(sys.argv[1])
    for wl in ("idle", "random", "stream", "hotset"):
        r.run("postcopy-" + wl, case_postcopy, r.build, wl, 0)
        r.run("hybrid-" + wl, case_postcopy, r.build, wl, 0.4)
    for wl in ("random", "stream", "hotset"):
        r.run("postcopy-dest-runs-" + wl, case_dest_runs, r.build, wl)
        r.run("postcopy-prealloc-dest-runs-" + wl, case_dest_runs, r.build, wl, True)
    r.run("postcopy-recover-3-cuts", case_recovery, r.build, (0.2, 0.6, 0.4))
    r.run("postcopy-recover-immediate-cut", case_recovery, r.build, (0.0,))
    r.run("postcopy-prealloc-recover-3-cuts", case_recovery, r.build, (0.2, 0.6, 0.4),
          ("-S", "--mem-prealloc"))
    mf2 = {"multifd-channels": 2}
    mf3z = {"multifd-channels": 3, "multifd-compression": "zstd"}
    r.run("multifd-postcopy", case_multifd, r.build, mf2, 0, False)
    r.run("multifd-hybrid-zstd", case_multifd, r.build, mf3z, 0.4, False)
    r.run("multifd-postcopy-dest-runs", case_multifd, r.build, mf2, 0, True)
    r.run("multifd-postcopy-late-channel", case_multifd_late_channel, r.build)
    r.run("multifd-postcopy-resume-partial", case_multifd_resume_partial, r.build)
    r.run("multifd-postcopy-recover-3-cuts", case_recovery, r.build, (0.2, 0.6, 0.4), ("-S",),
          mf2)
    r.run("multifd-postcopy-prealloc-recover", case_recovery, r.build, (0.3,),
          ("-S", "--mem-prealloc"), mf3z)
    r.run("postcopy-pause-recover", case_pause_recover, r.build)
    r.run("postcopy-pause-during-recover-dest", case_pause_during_recover_dest, r.build)
    r.run("postcopy-pause-during-recover-src", case_pause_during_recover_src, r.build)
    r.run("multifd-postcopy-pause-during-partial-resume", case_multifd_resume_partial,
          r.build, "pause")
    r.run("postcopy-prealloc-dest", case_prealloc_dest, r.build)
    r.run("postcopy-fail-before-switch", case_fail_before_switch, r.build)
    r.run("cli-postcopy", case_cli, r.build, ["--postcopy"])
    r.run("cli-postcopy-after", case_cli, r.build, ["--postcopy-after", "1"])
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
