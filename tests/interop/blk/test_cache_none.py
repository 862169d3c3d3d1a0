#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vmig-blk --cache none (O_DIRECT) on a real block device, under QEMU.

Start-up, on the daemon alone:
- a file on ramfs, which has no O_DIRECT, is refused at start with that
  reason (exit 1, no socket left), as QEMU refuses cache=none there;
- a file on tmpfs gets what the kernel gives: since Linux 6.6 tmpfs accepts
  O_DIRECT (and QEMU 7.2 opens it with cache=none), before that it is
  refused like ramfs. The test asks the kernel itself and expects the same;
- --cache none without --file, and an unknown mode, are refused.

Then a loop device with 4096-byte logical blocks and direct I/O, made by
the test (losetup -f --show --direct-io=on --sector-size 4096) and removed
at the end whatever happened, served with --cache none:
- the daemon reports cache none and block size 4096, and a second daemon on
  the device is refused by the image lock;
- a Linux guest under QEMU keeps 16 O_DIRECT requests in flight, reading
  and checking each block before writing its next generation, while the
  daemon is killed (-9) twice (once with requests held in it, once mid-
  stream) and restarted at once, and live-upgraded once (after which its
  disk fd still has O_DIRECT); at the end the guest checks the whole region
  and the host scans the device: no I/O error, no bad block.

Needs root (mount, losetup); fails, not skips, without it.

Usage: test_cache_none.py BUILD_DIR
"""
import mmap
import os
import subprocess

import blkenv

QD = 16
BLOCKS = 8192  # the guest's region: 32 MiB of the 64 MiB device
STOP_BLOCK = BLOCKS
STOP_MARKER = b"VMIGSTOP"  # blkcheck's STOP_MAGIC
HOLD_US = 30 * 1000 * 1000
MID_LATENCY_US = 10 * 1000
NO_ODIRECT = "does not support O_DIRECT"


def run_daemon(env, args, timeout_s=10):
    """Runs vmig-blk with args until it exits (or timeout_s); (rc, output)."""
    r = subprocess.run([env.vmig_blk] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout_s)
    return r.returncode, r.stdout.decode(errors="replace")


def sh(*argv):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    if r.returncode != 0:
        raise blkenv.Fail("%s: %s" % (" ".join(argv), r.stdout.decode(errors="replace").strip()))
    return r.stdout.decode(errors="replace").strip()


def kernel_odirect(path):
    """Does the kernel open path with O_DIRECT?"""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
        return True
    except OSError:
        return False


def on_fs(env, fstype, check):
    """Mounts a fresh fstype in the test dir, runs check(dir), unmounts."""
    d = os.path.join(env.tmp, fstype)
    os.mkdir(d)
    sh("mount", "-t", fstype, "-o", "size=16m" if fstype == "tmpfs" else "mode=0700",
       fstype, d)
    try:
        check(d)
    finally:
        subprocess.run(["umount", d], timeout=30)


def startup_checks(env):
    def ramfs(d):
        img = os.path.join(d, "disk.img")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        sock = os.path.join(env.tmp, "ramfs.sock")
        rc, out = run_daemon(env, ["--socket", sock, "--file", img, "--cache", "none"])
        env.case("ramfs_refused", rc == 1 and NO_ODIRECT in out and not os.path.exists(sock),
                 "rc=%d, socket %s, output: %s" % (rc, os.path.exists(sock), out.strip()))

    def tmpfs(d):
        img = os.path.join(d, "disk.img")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        sock = os.path.join(env.tmp, "tmpfs.sock")
        if kernel_odirect(img):
            be = blkenv.Backend(env, "backend-tmpfs", sock, img, "tmpfs")
            be.proc.argv += ["--cache", "none"]
            be.start()
            c = be.rpc_call("vhost_get_controllers")[0]
            be.proc.stop()
            env.case("tmpfs_as_the_kernel_says", c.get("cache") == "none",
                     "the kernel opens tmpfs files O_DIRECT; daemon says %s" % c)
            env.info("tmpfs: this kernel has O_DIRECT on tmpfs (Linux 6.6+): served")
        else:
            rc, out = run_daemon(env, ["--socket", sock, "--file", img, "--cache", "none"])
            env.case("tmpfs_as_the_kernel_says", rc == 1 and NO_ODIRECT in out,
                     "no O_DIRECT on tmpfs here; rc=%d, output: %s" % (rc, out.strip()))
            env.info("tmpfs: no O_DIRECT on tmpfs in this kernel: refused")

    on_fs(env, "ramfs", ramfs)
    on_fs(env, "tmpfs", tmpfs)
    sock = os.path.join(env.tmp, "x.sock")
    rc, out = run_daemon(env, ["--socket", sock, "--ram", "1M", "--cache", "none"])
    env.case("cache_none_needs_file", rc == 1 and "--cache none goes with --file" in out,
             "rc=%d: %s" % (rc, out.strip()))
    rc, out = run_daemon(env, ["--socket", sock, "--ram", "1M", "--cache", "unsafe"])
    env.case("unknown_cache_mode_refused", rc == 1 and "none or writeback" in out,
             "rc=%d: %s" % (rc, out.strip()))


def kill_once(be, guest, held):
    """Kill -9 with requests in the daemon, restart at once, wait for the
    guest to write again; (requests seen in flight, recovery, resubmitted)."""
    if held:
        # reads too: with --qd each write follows a read of its block, and
        # reads through io_uring complete on their own, so holding writes
        # only would leave fewer than QD requests to resubmit
        be.rpc_call("vmig_blk_set_latency", {"read_us": HOLD_US, "write_us": HOLD_US})
        seen = blkenv.wait_held(be, QD)
    else:
        be.rpc_call("vmig_blk_set_latency",
                    {"read_us": MID_LATENCY_US, "write_us": MID_LATENCY_US})
        blkenv.wait_writes(guest, blkenv.writes_now(guest) + QD)
        seen = blkenv.wait_inflight(be, QD // 2)
    be.kill9()
    be.start()
    _, q = blkenv.wait_serving(be)
    blkenv.wait_writes(guest, blkenv.writes_now(guest) + 4 * QD)
    st = be.rpc_call("bdev_get_iostat")["bdevs"][0]
    return seen, q.get("inflight_recovery"), st.get("num_resubmitted")


def disk_fd_flags(pid, dev):
    """The open flags of the daemon's fds on dev (the I/O fd and the lock's)."""
    flags = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)) != dev:
                continue
            with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
                for line in f:
                    if line.startswith("flags:"):
                        flags.append(int(line.split()[1], 8))
        except OSError:
            continue
    return flags


def guest_on_loop(env, dev):
    sock = os.path.join(env.tmp, "blk.sock")
    be = env.backend("backend", sock, dev)
    be.proc.argv += ["--cache", "none"]
    be.start()
    c = be.rpc_call("vhost_get_controllers")[0]
    env.case("loop_cache_none_4k", c.get("cache") == "none" and c.get("block_size") == 4096 and
             c.get("size_bytes") == 64 << 20,
             "cache=%s block_size=%s size=%s" % (c.get("cache"), c.get("block_size"),
                                                 c.get("size_bytes")))
    # A device node sits on devtmpfs: it must not be taken for a tmpfs
    # file and served one request at a time on the queue thread.
    env.case("loop_through_io_uring", c.get("io") == "io_uring", "io=%s" % c.get("io"))
    rc, out = run_daemon(env, ["--socket", os.path.join(env.tmp, "second.sock"), "--file", dev,
                               "--cache", "none"])
    env.case("second_daemon_locked_out", rc == 1 and "is locked by another process" in out,
             "rc=%d: %s" % (rc, out.strip()[-300:]))

    guest = blkenv.Guest(env, "qemu", sock,
                         ["--qd", QD, "--seconds", 900, "--blocks", BLOCKS, "--write-pct", 100,
                          "--gap-ms", 200, "--progress-ms", 250, "--stop-block",
                          STOP_BLOCK]).start()
    guest.wait_line(r"^VMIG-GUEST: READY .*qd=%d" % QD, 60)
    blkenv.wait_writes(guest, 4 * QD)
    kills = []
    for held in (True, False):
        blkenv.wait_writes(guest, blkenv.writes_now(guest) + 2 * QD)
        kills.append(kill_once(be, guest, held))
        env.info("%s kill: %d in flight, recovery %s, resubmitted %s" %
                 ((("held" if held else "mid-stream"),) + kills[-1]))
    env.case("held_kill_resubmitted", kills[0][1] == "recovered" and (kills[0][2] or 0) >= QD,
             "held kill: %s" % (kills[0],))
    env.case("mid_stream_kill_recovered", kills[1][1] == "recovered", "%s" % (kills[1],))

    r = subprocess.run([env.vmig_blk, "upgrade", "--rpc", be.rpc], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    out = r.stdout.decode(errors="replace").strip()
    blkenv.wait_writes(guest, blkenv.writes_now(guest) + 4 * QD)
    flags = disk_fd_flags(be.proc.pid, dev)
    c = be.rpc_call("vhost_get_controllers")[0]
    env.case("upgrade_keeps_odirect",
             r.returncode == 0 and c.get("upgrades") == 1 and c.get("cache") == "none" and
             any(f & os.O_DIRECT for f in flags) and c.get("image_locked"),
             "upgrade: %s; fd flags %s; controller %s" %
             (out, [oct(f) for f in flags], {k: c.get(k) for k in ("upgrades", "cache",
                                                                  "image_locked")}))

    # Stop marker, written O_DIRECT to the device: the guest stops issuing,
    # flushes and reads back the whole region.
    buf = mmap.mmap(-1, 4096)
    buf.write(STOP_MARKER)
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(fd, buf, STOP_BLOCK * 4096)
    finally:
        os.close(fd)
    result = guest.result(timeout_s=600)
    s = env.check_summary(guest, result, min_writes=1000)
    env.info("guest: %s writes, %s reads; bounced requests %s" %
             (s.get("writes"), s.get("reads"),
              blkenv.queue0(be)[1].get("bounced_requests")))
    guest.proc.stop()
    be.proc.stop()
    rc, scan, out = env.scan_image(dev)
    env.case("device_consistent", rc == 0 and int(scan.get("pattern", 0)) > 0,
             "host scan: %s" % out.strip()[-300:])


def body(env):
    if os.geteuid() != 0:
        raise blkenv.Fail("needs root (mount, losetup)")
    startup_checks(env)
    backing = env.image("backing.img")
    dev = sh("losetup", "-f", "--show", "--direct-io=on", "--sector-size", "4096", backing)
    try:
        guest_on_loop(env, dev)
    except blkenv.Fail:
        env.dump_state()  # before the processes stop
        raise
    finally:
        for p in env.procs:
            p.stop()
        env._reap_strays()
        subprocess.run(["losetup", "-d", dev], timeout=30)


blkenv.run("cache_none", body)
