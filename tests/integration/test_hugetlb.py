#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Guest RAM on 2 MiB huge pages (vmig-vm --hugetlb, QEMU's
memory-backend-memfd,hugetlb=on).

- Pre-copy moves a guest that writes all along, with either dirty tracker
  (the kernel write-protects huge pages whole, so a write dirties its 2 MiB),
  over one channel and over multifd, and from huge pages to normal ones:
  guest memory compares equal through pmemsave and the guest's self-checks
  pass on the destination after cont.
- Post-copy into a running destination on huge pages: faults fetch the
  missing pages of their huge page, which is mapped whole once complete;
  the migration's memory digest checks every page, and the guest's
  self-checks pass. Also after a cut and a recovery.
- Too few huge pages: vmig-vm says so and how to reserve them.

The test reserves the huge pages it needs in /proc/sys/vm/nr_hugepages and
puts the old value back, whatever happens.

usage: test_hugetlb.py BUILD_DIR
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from vmigtest import VM, Relay, Runner, check, free_port, wait_completed  # noqa: E402

MEM = 64 << 20
MEM_ARG = "64M"
NR = "/proc/sys/vm/nr_hugepages"
RESERVE = 2 * MEM // (2 << 20) + 8  # two guests, and room to spare


def read_nr():
    with open(NR) as f:
        return int(f.read())


def write_nr(n):
    with open(NR, "w") as f:
        f.write("%d\n" % n)


def pair(procs, build, tracking="auto", dst_hugetlb=True, rate="4M"):
    src = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--workload", "random",
             "--dirty-rate", rate, "--fill", "random", "--hugetlb",
             "--dirty-tracking", tracking, name="src")
    dst = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--incoming", "defer", "-S",
             "--workload", "random", "--dirty-rate", rate,
             *(("--hugetlb",) if dst_hugetlb else ()), name="dst")
    return src, dst


def migrate_and_verify(src, dst, caps=(), params=None):
    port = free_port()
    for vm in (src, dst):
        if caps:
            vm.qmp.cmd("migrate-set-capabilities",
                       capabilities=[{"capability": c, "state": True} for c in caps])
        if params:
            vm.qmp.cmd("migrate-set-parameters", **params)
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % port)
    info, _ = wait_completed(src, dst)
    check(src.memory_digest(MEM) == dst.memory_digest(MEM), "guest memory differs")
    check(src.guest()["pages-written"] > 0, "the guest wrote nothing")
    dst.qmp.cmd("cont")
    dst.check_guest_verifies(200)
    return info


def case_precopy(procs, build, tracking):
    src, dst = pair(procs, build, tracking)
    info = migrate_and_verify(src, dst)
    check(info["ram"]["dirty-sync-count"] >= 1, "no dirty sync: %r" % info["ram"])


def case_multifd(procs, build):
    src, dst = pair(procs, build)
    migrate_and_verify(src, dst, ("multifd",), {"multifd-channels": 2})


def case_to_normal_pages(procs, build):
    src, dst = pair(procs, build, dst_hugetlb=False)
    migrate_and_verify(src, dst)


def postcopy_pair(procs, build, dst_runs=True):
    """A post-copy migration through a relay, switched at once, with a slow
    background push, into a destination that runs its own writer (its
    faults fetch their huge pages), or that stays paused (post-copy then
    lasts seconds)."""
    src = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--workload", "random",
             "--dirty-rate", "16M", "--fill", "random", "--hugetlb", name="src")
    dst = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--incoming", "defer",
             "--workload", "random", "--dirty-rate", "32M", *(() if dst_runs else ("-S",)),
             "--hugetlb", name="dst")
    for vm in (src, dst):
        vm.qmp.cmd("migrate-set-capabilities",
                   capabilities=[{"capability": "postcopy-ram", "state": True}])
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20,
                                             "max-postcopy-bandwidth": 8 << 20})
    port = free_port()
    relay = Relay(port)
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port)
    src.wait_migration(30, ("active",))
    src.qmp.cmd("migrate-start-postcopy")
    src.wait_migration(60, ("postcopy-active",))
    dst.wait_migration(60, ("postcopy-active",))
    return src, dst, relay


def finish_postcopy(src, dst, dst_ran=True):
    info, _ = wait_completed(src, dst, 120, 60)
    if dst_ran:
        check(info["ram"]["postcopy-requests"] > 0, "the guest never waited for a page: %r"
              % info["ram"])
    else:
        dst.qmp.cmd("cont")
    check(dst.status() == "running", "destination %s" % dst.status())
    dst.check_guest_verifies(500)


def case_postcopy(procs, build):
    src, dst, relay = postcopy_pair(procs, build)
    finish_postcopy(src, dst)
    relay.close()


def case_postcopy_recover(procs, build):
    src, dst, relay = postcopy_pair(procs, build, dst_runs=False)
    relay.cut()
    dst.wait_migration(30, ("postcopy-paused",))
    src.wait_migration(30, ("postcopy-paused",))
    port = free_port()
    dst.qmp.cmd("migrate-recover", uri="tcp:127.0.0.1:%d" % port)
    src.qmp.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % port, resume=True)
    finish_postcopy(src, dst, dst_ran=False)
    relay.close()


def case_too_few_pages(procs, build):
    with open("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages") as f:
        free = int(f.read())
    argv = [os.path.join(build, "vm", "vmig-vm"), "--mem", "%dM" % (2 * free + 64),
            "--hugetlb", "--qmp", "unix:/nonexistent/never"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    check(p.returncode != 0, "vmig-vm started without its huge pages")
    check("huge pages" in p.stderr and "nr_hugepages" in p.stderr,
          "unclear error: %r" % p.stderr)
    p = subprocess.run(argv[:1] + ["--mem", "3M", "--hugetlb"], capture_output=True,
                       text=True, timeout=30)
    check(p.returncode != 0 and "multiple of 2M" in p.stderr, "odd size: %r" % p.stderr)


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    old = read_nr()
    write_nr(old + RESERVE)
    try:
        check(read_nr() >= old + RESERVE, "cannot reserve %d huge pages" % RESERVE)
        r = Runner(sys.argv[1])
        r.run("hugetlb-precopy-async", case_precopy, r.build, "async")
        r.run("hugetlb-precopy-sync", case_precopy, r.build, "sync")
        r.run("hugetlb-multifd", case_multifd, r.build)
        r.run("hugetlb-to-normal-pages", case_to_normal_pages, r.build)
        r.run("hugetlb-postcopy", case_postcopy, r.build)
        r.run("hugetlb-postcopy-recover", case_postcopy_recover, r.build)
        r.run("hugetlb-too-few-pages", case_too_few_pages, r.build)
        return r.finish()
    finally:
        write_nr(old)


if __name__ == "__main__":
    sys.exit(main())
