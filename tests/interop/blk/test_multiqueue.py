#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vmig-blk with two queues, under QEMU with two vCPUs.

QEMU 7.2 (TCG, -smp 2) runs the test guest on `vhost-user-blk-pci` with
`num-queues=2`, served by `vmig-blk --queues 2`. Linux's virtio-blk maps
one queue to each vCPU and sends a request down the queue of the CPU that
submits it. The guest's checker (blkcheck, 8 O_DIRECT requests in flight,
each block read and checked before its next generation is written) is a
single process, so a small wrapper added to the test's initramfs moves it
from one vCPU to the other every 200 ms (taskset): both queues must then
carry requests. Checked:

- the guest sees 2 CPUs and its disk has 2 hardware queues;
- the daemon reports 2 queues, both started, and runs a thread for each
  (control thread + one per queue);
- both queues served reads and writes (bdev_get_iostat, per queue);
- kill -9 of the daemon and a restart with the same arguments: both queues
  come back ("recovered" from the in-flight region QEMU hands back), and
  both carry requests again in the new process;
- at the end the guest reads back the whole region (no I/O error, no bad
  block) and the host scans the image.

Nothing here is timed: the guest runs until the test writes a stop marker
into the image (blkcheck --stop-block), and every wait has a generous
bound that only decides when to give up.

Usage: test_multiqueue.py BUILD_DIR
"""
import gzip
import io
import os
import shutil
import subprocess

import blkenv

QUEUES = 2
QD = 8
BLOCKS = 8192  # the guest's region: 32 MiB of the 64 MiB image
STOP_BLOCK = BLOCKS
STOP_MARKER = b"VMIGSTOP"  # blkcheck's STOP_MAGIC
FLIP_S = 0.2
WAIT_S = 180

# Runs blkcheck and moves it between the two vCPUs until it exits, at most
# MAX_FLIPS times (the first argument); the rest are blkcheck's.
MQCHECK = """#!/bin/sh
max=$1
shift
echo "VMIG-GUEST: MQ cpus=$(nproc) hw_queues=$(ls /sys/block/vda/mq | wc -l)"
/guest/bin/blkcheck "$@" &
pid=$!
i=0
while kill -0 $pid 2>/dev/null && [ $i -lt $max ]; do
	taskset -p $((1 << (i % 2))) $pid >/dev/null 2>&1
	i=$((i + 1))
	sleep FLIP_S
done
wait $pid
""".replace("FLIP_S", str(FLIP_S))


def cpio_newc(entries):
    """A newc cpio archive of (path, mode, data) entries, gzip-compressed."""
    out = io.BytesIO()

    def put(name, mode, data, ino):
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join("%08x" % v for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
        out.write(hdr.encode() + name_b)
        out.write(b"\0" * ((4 - (110 + len(name_b)) % 4) % 4))
        out.write(data)
        out.write(b"\0" * ((4 - len(data) % 4) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        put(name, mode, data, ino)
    put("TRAILER!!!", 0, b"", 0)
    return gzip.compress(out.getvalue())


def initrd_with_mqcheck(env):
    """The test guest's initramfs plus /guest/bin/mqcheck: the kernel
    unpacks concatenated archives in order, so the shared image is reused
    as it is."""
    path = os.path.join(env.tmp, "initramfs-mq.cpio.gz")
    with open(path, "wb") as out:
        with open(env.initrd, "rb") as base:
            shutil.copyfileobj(base, out)
        # guest/bin exists in the base archive.
        out.write(cpio_newc([("guest/bin/mqcheck", 0o100755, MQCHECK.encode())]))
    return path


class MqGuest(blkenv.Guest):
    """The harness' guest, with 2 vCPUs, a 2-queue disk and mqcheck."""

    def __init__(self, env, name, sock, guest_args, initrd):
        super().__init__(env, name, sock, guest_args)
        argv = self.proc.argv
        argv[argv.index("-accel") + 2:argv.index("-accel") + 2] = ["-smp", str(QUEUES)]
        argv[argv.index("-initrd") + 1] = initrd
        for i, a in enumerate(argv):
            if a.startswith("vhost-user-blk-pci,"):
                argv[i] = a.replace("num-queues=1", "num-queues=%d" % QUEUES)
            if a.startswith("console=ttyS0"):
                argv[i] = a.replace("vmig.test=blkcheck", "vmig.test=mqcheck")


def queue_ops(be):
    """[(reads, writes)] per queue of the running daemon."""
    st = be.rpc_call("bdev_get_iostat")["bdevs"][0]
    qs = sorted(st.get("queues") or [], key=lambda q: q.get("queue", 0))
    return [(q.get("num_read_ops", 0), q.get("num_write_ops", 0)) for q in qs]


def all_started(be):
    c = blkenv.controller(be)
    if not c or not c.get("connected"):
        return None
    qs = c.get("queues") or []
    return c if len(qs) == QUEUES and all(q.get("started") for q in qs) else None


def both_queues_busy(be, label):
    """Waits until each queue served a read and a write; returns the counts."""
    def cond():
        ops = queue_ops(be)
        return ops if len(ops) == QUEUES and all(r > 0 and w > 0 for r, w in ops) else None
    try:
        return blkenv.wait_until("reads and writes on both queues (%s)" % label, cond, WAIT_S)
    except blkenv.Fail:
        return queue_ops(be)


def body(env):
    if env.backend_kind != "vmig-blk":
        raise blkenv.Fail("this test checks vmig-blk's per-queue counters (VBLK_BACKEND=%s)"
                          % env.backend_kind)
    image = env.image()
    sock = os.path.join(env.tmp, "blk.sock")
    be = env.backend("backend", sock, image, extra=["--queues", str(QUEUES)]).start()
    initrd = initrd_with_mqcheck(env)
    max_flips = int(900 / FLIP_S)
    guest = MqGuest(env, "qemu", sock,
                    [max_flips, "--qd", QD, "--seconds", 900, "--blocks", BLOCKS,
                     "--write-pct", 50, "--gap-ms", 200, "--progress-ms", 250,
                     "--stop-block", STOP_BLOCK], initrd).start()
    m = guest.wait_line(r"^VMIG-GUEST: MQ cpus=(\d+) hw_queues=(\d+)", 120)
    env.case("guest_has_2_cpus_and_2_queues",
             m.group(1) == str(QUEUES) and m.group(2) == str(QUEUES),
             "guest: %s" % m.group(0))
    guest.wait_line(r"^VMIG-GUEST: READY .*qd=%d" % QD, 60)
    blkenv.wait_writes(guest, 4 * QD, WAIT_S)

    c = blkenv.wait_until("both queues started", lambda: all_started(be), WAIT_S)
    threads = len(os.listdir("/proc/%d/task" % be.proc.pid))
    env.case("two_queues_two_threads",
             c.get("num_queues") == QUEUES and threads >= 1 + QUEUES,
             "num_queues=%s, %d threads (want control + %d queue threads)" %
             (c.get("num_queues"), threads, QUEUES))
    ops = both_queues_busy(be, "first process")
    env.info("per-queue (reads, writes) before the kill: %s" % ops)
    env.case("both_queues_carry_requests",
             len(ops) == QUEUES and all(r > 0 and w > 0 for r, w in ops), "%s" % ops)

    be.kill9()
    be.start()
    c = blkenv.wait_until("reconnection and both rings started", lambda: all_started(be), WAIT_S)
    rec = [q.get("inflight_recovery") for q in c.get("queues")]
    env.case("both_queues_recovered", rec == ["recovered"] * QUEUES,
             "inflight_recovery per queue: %s" % rec)
    blkenv.wait_writes(guest, blkenv.writes_now(guest) + 4 * QD, WAIT_S)
    ops = both_queues_busy(be, "after the restart")
    env.info("per-queue (reads, writes) after the restart: %s" % ops)
    env.case("both_queues_carry_requests_after_restart",
             len(ops) == QUEUES and all(r > 0 and w > 0 for r, w in ops), "%s" % ops)

    # The stop marker: the guest stops issuing, flushes and reads back its
    # whole region. The daemon serves the image through the page cache, so
    # a plain write is what it reads.
    with open(image, "r+b") as f:
        f.seek(STOP_BLOCK * 4096)
        f.write(STOP_MARKER)
        f.flush()
        os.fsync(f.fileno())
    result = guest.result(timeout_s=600)
    env.check_summary(guest, result, min_writes=8 * QD)
    be.proc.stop()
    rc, scan, out = env.scan_image(image)
    env.case("image_consistent", rc == 0 and int(scan.get("pattern", 0)) > 0,
             "host scan: %s" % out.strip()[-300:])


if __name__ == "__main__":
    blkenv.run("multiqueue", body)
