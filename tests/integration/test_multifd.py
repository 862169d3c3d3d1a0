#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Multifd pre-copy (capability "multifd", parameter "multifd-channels")
between real vmig-vm processes over loopback.

Every completed case compares guest memory on both sides through pmemsave
and has the engine re-hash all of RAM at switch-over (x-vmig-verify-memory).
Failure cases check that the source keeps running and that the destination
says what was wrong.

usage: test_multifd.py BUILD_DIR
"""
import os
import signal
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from vmigtest import (VM, QMPError, Relay, Runner, cancel_midway, check, free_port,  # noqa: E402
                      wait_completed)

MEM = 128 << 20
MEM_ARG = "128M"


def set_multifd(vm, channels, extra_caps=()):
    caps = [{"capability": c, "state": True} for c in ("multifd",) + tuple(extra_caps)]
    vm.qmp.cmd("migrate-set-capabilities", capabilities=caps)
    vm.qmp.cmd("migrate-set-parameters", **{"multifd-channels": channels})


def pair(procs, build, channels, workload="random", extra_dst=()):
    src = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--workload", workload,
             "--dirty-rate", "32M", "--fill", "random", name="src")
    dst = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--incoming", "defer", "-S",
             *extra_dst, name="dst")
    for vm in (src, dst):
        set_multifd(vm, channels, ("x-vmig-verify-memory",))
    return src, dst


def start(src, dst):
    uri = "tcp:127.0.0.1:%d" % free_port()
    dst.qmp.cmd("migrate-incoming", uri=uri)
    src.qmp.cmd("migrate", uri=uri)


def completed_and_equal(src, dst):
    info, _ = wait_completed(src, dst)
    check(src.memory_digest(MEM) == dst.memory_digest(MEM), "guest memory differs")
    ram = info["ram"]
    check(ram["multifd-bytes"] >= MEM - (8 << 20),
          "multifd-bytes %d for %d bytes of RAM" % (ram["multifd-bytes"], MEM))
    check(ram["normal"] + ram["duplicate"] >= MEM // 4096, "not every page was sent")
    check(ram["transferred"] >= ram["multifd-bytes"], "transferred < multifd-bytes")
    for vm in (src, dst):
        check(vm.guest()["inconsistencies"] == 0, "guest self-check failed")
    return info


def case_workload(procs, build, channels, workload):
    src, dst = pair(procs, build, channels, workload)
    time.sleep(0.5)
    start(src, dst)
    completed_and_equal(src, dst)
    if workload != "idle":
        check(src.guest()["pages-written"] > 0, "workload wrote nothing")


def fill_file(procs, text):
    """A fill file for --fill: text repeated over all of guest RAM."""
    path = os.path.join(procs.tmpdir(), "fill.bin")
    with open(path, "wb") as f:
        f.write((text * (MEM // len(text) + 1))[:MEM])
    return path


def case_compressed(procs, build, codec, compressible):
    """multifd-compression zstd or zlib: exact memory either way; a
    compressible guest moves far fewer bytes, an incompressible one goes raw
    (no worse)."""
    fill = (fill_file(procs, b"vmig multifd compression test pattern, page after page. ")
            if compressible else "random")
    level = "multifd-%s-level" % codec
    src = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--workload", "hotset",
             "--dirty-rate", "16M", "--fill", fill, name="src")
    dst = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--incoming", "defer", "-S",
             name="dst")
    for vm in (src, dst):
        set_multifd(vm, 3, ("x-vmig-verify-memory",))
        vm.qmp.cmd("migrate-set-parameters", **{"multifd-compression": codec, level: 3})
        p = vm.qmp.cmd("query-migrate-parameters")
        check(p["multifd-compression"] == codec and p[level] == 3,
              "parameters not kept: %r" % p)
    start(src, dst)
    info, _ = wait_completed(src, dst)
    check(src.memory_digest(MEM) == dst.memory_digest(MEM), "guest memory differs")
    for vm in (src, dst):
        check(vm.guest()["inconsistencies"] == 0, "guest self-check failed")
    sent = info["ram"]["transferred"]
    if compressible:
        check(sent < MEM // 4, "compressible RAM: %d bytes sent for %d" % (sent, MEM))
    else:
        check(sent >= MEM, "random RAM: only %d bytes sent for %d" % (sent, MEM))


def case_zero_copy(procs, build, channels):
    """zero-copy-send (MSG_ZEROCOPY from guest RAM) under a guest that keeps
    writing: exact memory, and dirty-sync-missed-zero-copy told honestly.
    Over loopback the kernel copies every zero-copy send when it delivers
    it, so each channel's share of each round counts as missed: between 1
    and dirty-sync-count x channels, as QEMU bounds it."""
    src, dst = pair(procs, build, channels, "random")
    src.qmp.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "zero-copy-send", "state": True}])
    caps = {c["capability"]: c["state"] for c in src.qmp.cmd("query-migrate-capabilities")}
    check(caps.get("zero-copy-send") is True, "zero-copy-send not kept: %r" % caps)
    start(src, dst)
    info = completed_and_equal(src, dst)
    ram = info["ram"]
    missed, syncs = ram["dirty-sync-missed-zero-copy"], ram["dirty-sync-count"]
    print("zero-copy: missed %d, syncs %d, channels %d" % (missed, syncs, channels))
    check(1 <= missed <= syncs * channels,
          "dirty-sync-missed-zero-copy %d with %d syncs on %d channels over loopback"
          % (missed, syncs, channels))


def case_zero_copy_stalled_dest_cancel(procs, build):
    """A destination that stops reading leaves zero-copy sends the kernel
    never finishes: migrate_cancel must still end the migration (the wait
    for the kernel wakes when the connections are shut down), the source
    run on, and a new migration to another destination complete."""
    src, dst = pair(procs, build, 2, "random")
    src.qmp.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "zero-copy-send", "state": True}])
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 32 << 20})
    start(src, dst)
    time.sleep(0.3)
    os.kill(dst.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(1.5)  # the source fills its socket buffers and waits
        st = src.migrate_status()["status"]
        check(st == "active", "source %r before the cancel" % st)
        src.qmp.cmd("migrate_cancel")
        info = src.wait_migration(30)
        check(info["status"] == "cancelled", "source %r after cancel" % info["status"])
        check(src.status() == "running", "source not running: %s" % src.status())
    finally:
        os.kill(dst.proc.pid, signal.SIGCONT)
    dst.kill()
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    dst2 = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--incoming", "defer", "-S",
              name="dst2")
    set_multifd(dst2, 2, ("x-vmig-verify-memory",))
    start(src, dst2)
    completed_and_equal(src, dst2)


def case_zero_copy_refused(procs, build):
    """zero-copy-send needs multifd, no compression and a tcp: URI (and no
    TLS: test_tls.py); migrate says which, and the guest runs on."""
    src = VM(procs, build, "--mem", "16M", name="src")
    tcp = "tcp:127.0.0.1:%d" % free_port()
    unix = "unix:" + os.path.join(procs.tmpdir(), "mig.sock")
    steps = (
        ({"zero-copy-send": True}, {}, tcp, "needs multifd"),
        ({"multifd": True}, {"multifd-compression": "zstd"}, tcp, "multifd-compression"),
        ({}, {"multifd-compression": "none"}, unix, "tcp:"),
    )
    for caps, params, uri, want in steps:
        if caps:
            src.qmp.cmd("migrate-set-capabilities", capabilities=[
                {"capability": c, "state": v} for c, v in caps.items()])
        if params:
            src.qmp.cmd("migrate-set-parameters", **params)
        try:
            src.qmp.cmd("migrate", uri=uri)
            raise AssertionError("migrate to %s accepted zero-copy-send (want: %s)" % (uri, want))
        except QMPError as e:
            check("zero-copy-send" in str(e) and want in str(e), "unclear error: %s" % e)
        check(src.status() == "running", "source not running")


def case_cli_zero_copy(procs, build):
    """The vmig CLI: zero-copy-send without multifd is refused by the source
    with its reason, and the destination it had already set listening is let
    go (not left in "setup", where it would refuse the next attempt's
    capabilities). The next attempt, with multifd, completes."""
    src, dst = pair(procs, build, 2, "random")
    for vm in (src, dst):  # the CLI sets the capabilities on both sides
        vm.qmp.cmd("migrate-set-capabilities",
                   capabilities=[{"capability": "multifd", "state": False}])
    cli = os.path.join(build, "tools", "vmig", "vmig")
    argv = [cli, "migrate", "unix:" + src.qmp_path, "tcp:127.0.0.1:%d" % free_port(),
            "--dest", "unix:" + dst.qmp_path, "--no-progress",
            "--capability", "zero-copy-send=on"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    check(r.returncode == 1 and "zero-copy-send: it needs multifd" in r.stderr,
          "vmig migrate exited %d: %s" % (r.returncode, r.stderr[-500:]))
    st = dst.migrate_status()["status"]
    check(st != "setup", "destination left listening (%r) after the source refused" % st)
    check(src.status() == "running", "source not running")
    argv += ["--capability", "multifd=on"]
    argv[3] = "tcp:127.0.0.1:%d" % free_port()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, "second vmig migrate exited %d: %s" % (r.returncode,
                                                                    r.stderr[-500:]))
    check(src.memory_digest(MEM) == dst.memory_digest(MEM), "guest memory differs")


def case_compression_names(procs, build):
    vm = VM(procs, build, "--mem", "16M", name="vm")
    check(vm.qmp.cmd("query-migrate-parameters")["multifd-compression"] == "none",
          "default is not none")
    for value, want in (("lz4", "does not accept value"), ("lz5", "does not accept value"),
                        (2, "expected: string")):
        try:
            vm.qmp.cmd("migrate-set-parameters", **{"multifd-compression": value})
            raise AssertionError("multifd-compression %r accepted" % (value,))
        except QMPError as e:
            check(want in str(e), "unclear error for %r: %s" % (value, e))
    check(vm.qmp.cmd("query-migrate-parameters")["multifd-compression"] == "none",
          "a refused value changed the parameter")


def case_prealloc_dest(procs, build):
    src, dst = pair(procs, build, 3, "hotset", extra_dst=("--mem-prealloc",))
    start(src, dst)
    completed_and_equal(src, dst)


def case_shared_bandwidth(procs, build):
    """max-bandwidth bounds all channels together: 64 MiB at 32 MiB/s > 1.5 s."""
    src = VM(procs, build, "--mem", "64M", "--fill", "random", name="src")
    dst = VM(procs, build, "--mem", "64M", "--incoming", "defer", "-S", name="dst")
    for vm in (src, dst):
        set_multifd(vm, 4)
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 32 << 20})
    t0 = time.monotonic()
    start(src, dst)
    info = src.wait_migration(60)
    elapsed = time.monotonic() - t0
    check(info["status"] == "completed", "migration %r" % info)
    check(elapsed > 1.5, "64 MiB moved in %.2fs over 4 channels despite 32 MiB/s" % elapsed)
    check(src.memory_digest(64 << 20) == dst.memory_digest(64 << 20), "memory differs")


def case_dest_without_multifd(procs, build):
    src = VM(procs, build, "--mem", "32M", "--fill", "random", name="src")
    dst = VM(procs, build, "--mem", "32M", "--incoming", "defer", "-S", name="dst")
    set_multifd(src, 2)
    start(src, dst)
    dinfo = dst.wait_migration(30)
    info = src.wait_migration(30)
    check(dinfo["status"] == "failed", "destination %r" % dinfo["status"])
    check("multifd is not enabled" in dinfo.get("error-desc", ""), "unclear: %r" % dinfo)
    check(info["status"] == "failed", "source %r" % info["status"])
    check("multifd is not enabled" in info.get("error-desc", ""),
          "source does not relay the reason: %r" % info.get("error-desc"))
    check(src.status() == "running", "source not running")


def case_dest_killed_then_remigrate(procs, build):
    src, dst = pair(procs, build, 4, "stream")
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
    start(src, dst)
    time.sleep(1.0)
    dst.kill()
    info = src.wait_migration(30)
    check(info["status"] == "failed", "source %r after the destination died" % info["status"])
    check(src.status() == "running", "source not running: %s" % src.status())
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    dst2 = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--incoming", "defer", "-S",
              name="dst2")
    set_multifd(dst2, 4, ("x-vmig-verify-memory",))
    start(src, dst2)
    completed_and_equal(src, dst2)


def case_cancel(procs, build):
    src, dst = pair(procs, build, 2, "random")
    cancel_midway(src, dst, 8 << 20)


# A hand-made hostile source (the framing of docs/stream-format.md).
def rec(rtype, payload=b""):
    return struct.pack("<BBHI", rtype, 0, 0, len(payload)) + payload


def preamble(channel, flags, session):
    return b"VMIGSTRM" + struct.pack("<IHHQQ", 2, channel, flags, session, session)


def case_page_on_wrong_channel(procs, build):
    """A data channel that carries a chunk of another channel is refused."""
    dst = VM(procs, build, "--mem", "1M", "--incoming", "defer", "-S", name="dst")
    set_multifd(dst, 2)
    port = free_port()
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
    session = 0x5eed
    main = socket.create_connection(("127.0.0.1", port), timeout=10)
    data = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        name = b"pc.ram"
        blocks = struct.pack("<IB3xIQ", 1, len(name), 4096, 1 << 20) + name
        main.sendall(preamble(0, 0, session) + rec(0x01, blocks) +
                     rec(0x0a, struct.pack("<II", 2, 0)))
        data[1].sendall(preamble(2, 1 << 8, session))
        # Page 64 is chunk 1, which belongs to channel 1, not 0.
        data[0].sendall(preamble(2, 0 << 8, session) +
                        rec(0x02, struct.pack("<IIQ", 0, 1, 64) + b"\x55" * 4096))
        info = dst.wait_migration(30)
    finally:
        for s in [main] + data:
            s.close()
    check(info["status"] == "failed", "destination %r" % info["status"])
    check("wrong multifd channel" in info.get("error-desc", ""),
          "unclear error: %r" % info.get("error-desc"))
    check(dst.alive() and dst.qmp.cmd("query-status") is not None, "destination unusable")


def case_missing_channel_cancel(procs, build):
    """A source that never opens its data channels leaves the destination
    waiting for them, as QEMU does; migrate_cancel there ends the wait."""
    dst = VM(procs, build, "--mem", "1M", "--incoming", "defer", "-S", name="dst")
    set_multifd(dst, 2)
    port = free_port()
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
    main = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        name = b"pc.ram"
        blocks = struct.pack("<IB3xIQ", 1, len(name), 4096, 1 << 20) + name
        main.sendall(preamble(0, 0, 7) + rec(0x01, blocks) + rec(0x0a, struct.pack("<II", 2, 0)))
        deadline = time.monotonic() + 10
        while dst.qmp.cmd("query-migrate")["status"] != "active":
            check(time.monotonic() < deadline, "not waiting: %r" % dst.qmp.cmd("query-migrate"))
            time.sleep(0.05)
        dst.qmp.cmd("migrate_cancel")
        info = dst.wait_migration(10)
    finally:
        main.close()
    check(info["status"] in ("cancelled", "failed"), "destination %r" % info["status"])
    check(dst.alive() and dst.qmp.cmd("query-status") is not None, "destination unusable")


def case_data_channel_lost_early(procs, build, which, late=0.0):
    """A data connection is cut before its preamble reaches the destination,
    which then waits for it while the source writes the others into a
    destination that reads nothing: both must give up, the source running.
    With late, the source has filled that connection's window before the
    cut: no write of its fails, and only the FIN tells it."""
    src, dst = pair(procs, build, 2)
    port = free_port()
    relay = Relay(port)
    relay.drop_first(which, late)
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port)
    check(relay.applied.wait(20), "the data connection never came")
    info = src.wait_migration(30)
    d = dst.wait_migration(30)
    check(info["status"] == "failed", "source %r" % info)
    if late:  # connection 0 is the main one
        check("multifd channel %d" % (which - 1) in info.get("error-desc", ""),
              "source error %r" % info.get("error-desc"))
    check(src.status() == "running", "source not running: %s" % src.status())
    check(d["status"] == "failed", "destination %r" % d)
    relay.close()


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    r = Runner(sys.argv[1])
    for channels, wl in ((1, "idle"), (2, "random"), (3, "stream"), (4, "hotset")):
        r.run("multifd-%d-%s" % (channels, wl), case_workload, r.build, channels, wl)
    r.run("multifd-prealloc-dest", case_prealloc_dest, r.build)
    r.run("multifd-zstd-compressible", case_compressed, r.build, "zstd", True)
    r.run("multifd-zstd-random", case_compressed, r.build, "zstd", False)
    r.run("multifd-zlib-compressible", case_compressed, r.build, "zlib", True)
    r.run("multifd-zlib-random", case_compressed, r.build, "zlib", False)
    r.run("multifd-compression-names", case_compression_names, r.build)
    for channels in (1, 3):
        r.run("multifd-%d-zero-copy-send" % channels, case_zero_copy, r.build, channels)
    r.run("multifd-zero-copy-send-stalled-dest-cancel", case_zero_copy_stalled_dest_cancel,
          r.build)
    r.run("multifd-zero-copy-send-refused", case_zero_copy_refused, r.build)
    r.run("multifd-cli-zero-copy-send", case_cli_zero_copy, r.build)
    r.run("multifd-shared-max-bandwidth", case_shared_bandwidth, r.build)
    r.run("multifd-dest-without-multifd", case_dest_without_multifd, r.build)
    r.run("multifd-dest-killed-then-remigrate", case_dest_killed_then_remigrate, r.build)
    r.run("multifd-cancel", case_cancel, r.build)
    r.run("multifd-page-on-wrong-channel", case_page_on_wrong_channel, r.build)
    r.run("multifd-missing-channel-cancel", case_missing_channel_cancel, r.build)
    for which in (1, 2):
        r.run("multifd-data-channel-%d-lost-early" % which, case_data_channel_lost_early,
              r.build, which)
    r.run("multifd-data-channel-lost-with-full-window", case_data_channel_lost_early, r.build,
          1, 1.0)
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
