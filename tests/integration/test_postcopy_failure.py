#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Failures after the post-copy switch, injected by a relay the test controls.

After the switch the destination runs on memory that is still arriving, so
no failure may let a vCPU read a page that never came:
- a lost connection (a truncated stream, a killed source) pauses the
  destination ("postcopy-paused"); a truncated stream then recovers and the
  memory is verified;
- anything else (a bad record on the main or the urgent channel, or on a
  multifd data channel carrying the push, a digest mismatch) fails it with its vCPUs stopped and guest RAM still registered
  with userfaultfd: query-migrate says x-vmig-ram-incomplete, cont and
  pmemsave are refused, and the source stays paused with the complete copy.
In every case the guest's own page checks (each page it overwrites must hold
what it wrote there last) find nothing wrong, and the process still answers
and quits when told.

usage: test_postcopy_failure.py BUILD_DIR
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from vmigtest import VM, QMPError, Relay, Runner, check, free_port, wait_completed  # noqa: E402

MEM_ARG = "128M"
MEM = 128 << 20
CAPS = [{"capability": "postcopy-ram", "state": True}]
MAIN, URGENT, DATA0 = 0, 1, 2  # the relay numbers connections as they arrive
# Pre-copy's max-bandwidth where the switch is asked for during it.
# Unlimited, the first pass over 128 MiB takes a fraction of a second (less
# still on multifd's data channels) and may converge before a switch asked
# for just after the migrate command; at this rate it takes 8 s, and the
# switch finds most of RAM to push. The post-copy push follows
# max-postcopy-bandwidth instead.
PRECOPY_BW = 16 << 20


def vm_pair(procs, build, dst_runs=True, multifd=False):
    """A writing source and a destination with post-copy on, the destination
    running its own writer on arrival (or -S); with multifd, 2 channels."""
    src = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--workload", "random",
             "--dirty-rate", "32M", "--fill", "random", name="src")
    dargs = ("--workload", "random", "--dirty-rate", "64M") if dst_runs else ("-S",)
    dst = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--incoming", "defer", *dargs,
             name="dst")
    caps = CAPS + ([{"capability": "multifd", "state": True}] if multifd else [])
    for vm in (src, dst):
        vm.qmp.cmd("migrate-set-capabilities", capabilities=caps)
        if multifd:
            vm.qmp.cmd("migrate-set-parameters", **{"multifd-channels": 2})
    return src, dst


def through_relay(src, dst, prepare=None):
    """Starts the migration through a new relay; prepare(relay) runs first."""
    port = free_port()
    relay = Relay(port)
    if prepare:
        prepare(relay)
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port)
    return relay


def start(procs, build, dst_runs=True, multifd=False):
    """A post-copy migration through a relay, switched at once (during a
    slow pre-copy), with a slow background push so that post-copy lasts a
    few seconds."""
    src, dst = vm_pair(procs, build, dst_runs, multifd)
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": PRECOPY_BW,
                                             "max-postcopy-bandwidth": 16 << 20})
    relay = through_relay(src, dst)
    src.qmp.cmd("migrate-start-postcopy")
    src.wait_migration(60, ("postcopy-active",))
    dst.wait_migration(60, ("postcopy-active",))
    return src, dst, relay


def guest_clean(vm):
    g = vm.guest()
    check(g["inconsistencies"] == 0, "%s guest read a page it was not given: %r" % (vm.name, g))


def stopped_for_good(dst, src, what):
    """The destination failed with its vCPUs stopped and RAM held back; the
    source is paused with the complete copy."""
    dinfo = dst.wait_migration(30)
    check(dinfo["status"] == "failed", "destination %r" % dinfo)
    check(what in dinfo.get("error-desc", ""), "destination error-desc %r lacks %r" %
          (dinfo.get("error-desc"), what))
    check(dinfo.get("x-vmig-ram-incomplete") is True, "not reported incomplete: %r" % dinfo)
    check(dst.status() != "running", "destination still running: %s" % dst.status())
    w0 = dst.guest()["pages-written"]
    time.sleep(0.5)
    check(dst.guest()["pages-written"] == w0, "destination vCPUs still write")
    guest_clean(dst)
    for cmd, args in (("cont", {}), ("pmemsave", {"val": 0, "size": 4096,
                                                  "filename": os.path.join(dst.dir, "m")})):
        try:
            dst.qmp.cmd(cmd, **args)
            raise AssertionError("%s accepted on an incomplete destination" % cmd)
        except QMPError as e:
            check("incomplete" in str(e) or "never arrived" in str(e), "unclear: %s" % e)
    check(dst.status() != "running", "cont started the destination")
    info = src.wait_migration(30, ("failed", "postcopy-paused", "completed"))
    check(info["status"] in ("failed", "postcopy-paused"), "source %r" % info)
    check(src.status() != "running", "source resumed: %s" % src.status())
    guest_clean(src)
    quits_in_time(dst)


def quits_in_time(vm, timeout=15):
    try:
        vm.qmp.cmd("quit")
    except (QMPError, ConnectionError, OSError):
        pass
    try:
        vm.proc.wait(timeout=timeout)
    except Exception:
        raise AssertionError("%s did not quit within %ds" % (vm.name, timeout))


def case_bad_record(procs, build, channel):
    src, dst, relay = start(procs, build, multifd=channel == DATA0)
    time.sleep(0.3)
    # A run of 0xff shifts every record after it: the next header read is
    # garbage, whatever it lands on.
    relay.inject(channel, b"\xff" * 4096)
    check(relay.applied.wait(20), "nothing crossed the relay to garble")
    stopped_for_good(dst, src, {URGENT: "urgent channel", DATA0: "multifd channel 0"}.get(
        channel, ""))
    relay.close()


def case_digest_mismatch(procs, build):
    """A byte flipped inside a page in flight: framing intact, content not.
    The destination is -S, so every page comes on the main channel and the
    flipped one is the copy that is kept."""
    src, dst, relay = start(procs, build, dst_runs=False)
    relay.flip(MAIN)
    check(relay.applied.wait(20), "no large chunk crossed the relay")
    src.qmp.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    stopped_for_good(dst, src, "digest")
    relay.close()


def recover_and_verify(src, dst):
    """Both sides paused: recover directly (no relay), finish at full speed,
    and let the destination's guest verify its pages."""
    guest_clean(dst)
    port = free_port()
    dst.qmp.cmd("migrate-recover", uri="tcp:127.0.0.1:%d" % port)
    # Each side leaves the pause as its command returns, so that an
    # orchestrator never takes the old pause for a new failure.
    check(dst.migrate_status()["status"] != "postcopy-paused", "destination still paused")
    src.qmp.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % port, resume=True)
    check(src.migrate_status()["status"] != "postcopy-paused", "source still paused")
    wait_completed(src, dst, 60, 60)
    check(dst.status() == "running", "destination %s" % dst.status())
    dst.check_guest_verifies(1000)


def case_truncated(procs, build, channel=MAIN):
    """A stream ends early (EOF; the main one, or a multifd data channel
    carrying the push): the destination pauses, recovers, and the memory
    checks out."""
    src, dst, relay = start(procs, build, multifd=channel == DATA0)
    time.sleep(0.5)
    relay.truncate(channel)
    dst.wait_migration(30, ("postcopy-paused",))
    src.wait_migration(30, ("postcopy-paused",))
    recover_and_verify(src, dst)
    relay.close()


def case_source_killed(procs, build):
    """The source dies: the destination pauses with what it has, its vCPUs
    wait on the pages that never come, and it still answers and quits."""
    src, dst, relay = start(procs, build)
    time.sleep(0.5)
    src.kill()
    dinfo = dst.wait_migration(30, ("postcopy-paused", "failed", "completed"))
    check(dinfo["status"] == "postcopy-paused", "destination %r" % dinfo)
    time.sleep(1.0)
    guest_clean(dst)
    check(dst.migrate_status()["status"] == "postcopy-paused", "destination left the pause")
    quits_in_time(dst)
    relay.close()


def case_urgent_lost_before_switch(procs, build):
    """The urgent connection is cut before its preamble arrives. At the
    switch the destination waits for it only briefly, then fails without
    starting and says so: the source, which knows the destination never
    ran, takes the guest back. Nobody waits forever on the other."""
    src, dst = vm_pair(procs, build)
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": PRECOPY_BW})
    relay = through_relay(src, dst, lambda r: r.drop_first(URGENT))
    check(relay.applied.wait(20), "no urgent connection came")
    src.qmp.cmd("migrate-start-postcopy")
    info = src.wait_migration(60)
    d = dst.wait_migration(30)
    check(d["status"] == "failed", "destination %r" % d)
    check(not d.get("x-vmig-ram-incomplete"), "destination started: %r" % d)
    check(dst.status() != "running", "destination runs: %s" % dst.status())
    check(info["status"] == "failed", "source %r" % info)
    check(src.status() == "running", "source not running: %s" % src.status())
    guest_clean(src)
    relay.close()


def case_urgent_cut_before_switch(procs, build):
    """The urgent connection dies during pre-copy, after its preamble: the
    switch finds it gone, both sides pause, and a recovery completes."""
    src, dst = vm_pair(procs, build)
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": PRECOPY_BW})
    relay = through_relay(src, dst)
    deadline = time.monotonic() + 20
    while src.migrate_status().get("ram", {}).get("transferred", 0) < (8 << 20):
        check(time.monotonic() < deadline, "pre-copy did not start")
        time.sleep(0.01)
    check(relay.cut_conn(URGENT), "no urgent connection to cut")
    src.qmp.cmd("migrate-start-postcopy")
    dst.wait_migration(30, ("postcopy-paused", "failed", "completed"))
    src.wait_migration(30, ("postcopy-paused", "failed", "completed"))
    check(src.migrate_status()["status"] == "postcopy-paused", "source %r" % src.migrate_status())
    check(dst.migrate_status()["status"] == "postcopy-paused", "dest %r" % dst.migrate_status())
    recover_and_verify(src, dst)
    relay.close()


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    r = Runner(sys.argv[1])
    r.run("postcopy-fail-bad-record-main", case_bad_record, r.build, MAIN)
    r.run("postcopy-fail-bad-record-urgent", case_bad_record, r.build, URGENT)
    r.run("postcopy-fail-digest-mismatch", case_digest_mismatch, r.build)
    r.run("postcopy-fail-truncated-recovers", case_truncated, r.build)
    r.run("multifd-postcopy-fail-bad-record-data", case_bad_record, r.build, DATA0)
    r.run("multifd-postcopy-truncated-data-recovers", case_truncated, r.build, DATA0)
    r.run("postcopy-fail-source-killed", case_source_killed, r.build)
    r.run("postcopy-urgent-lost-before-switch", case_urgent_lost_before_switch, r.build)
    r.run("postcopy-urgent-cut-before-switch", case_urgent_cut_before_switch, r.build)
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
