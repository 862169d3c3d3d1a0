#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""A VM whose disk is local to its host moves with its disk: QEMU 7.2, a
Linux guest writing and verifying O_DIRECT blocks throughout, a vmig-blk
on each side with an image of its own (the destination's empty, started
with --incoming), and one `vmig migrate` command that mirrors the disk,
migrates the RAM and hands both over while the VM is stopped. Run twice:
with pre-copy of RAM, and with post-copy of RAM (the switch to post-copy
happens after the disk's hand-over, so the destination guest runs on a
whole disk while its RAM still arrives).

The same two runs again with --storage-mode write-blocking: once the
first pass is on the destination, each guest write completes only when
the destination has it. Then a guest that writes faster than the copy: in
the default mode, with the copy capped at 2 MiB/s, the guest has dirtied
its whole 32 MiB working set (at 64 KiB granules) by the time the first
pass is there, and the next round would take 16 s: `vmig migrate` must see
the backlog stay up, switch the mirror to write-blocking before it starts
the RAM, say so, and hand over.

Then three more times with pre-copy, with a fault in the middle of the
disk's copy: the source's vmig-blk killed (-9) and started again (QEMU
reconnects; the new daemon has no bitmap, so `vmig migrate` starts the copy
over), the destination's killed and started again (the copy resumes from
the source's bitmap), and the network cut: the storage stream goes through
a forwarder of the test, which closes both ends of the connection (the
copy resumes from the source's bitmap over a new one). The fault comes
once the mirror has sent 8 MiB, whatever the speed of the machine.

Then post-copy storage (--storage-mode postcopy), with the copy capped at
2 MiB/s so that most of the guest's 32 MiB is still on the source when the
VM stops: the disk is handed over at once, the destination guest runs and
reads and writes blocks not there yet (fetched on demand, ahead of the
background push), and `vmig migrate` waits until the destination has every
block. With pre-copy and with post-copy of RAM; then, with pre-copy, the
destination's vmig-blk killed (-9) and started again after the switch (it
resumes from its state file, QEMU reconnects and its requests are redone),
the source's (it restarts fenced and resumes from the destination's map),
and the network cut; each time `vmig migrate` resumes the copy. Last, a
switch the destination cannot take (a directory where its state file
goes): `vmig migrate` fails, the source takes the disk back, and the VM
and its guest's I/O go on at the source.

After the migration the destination guest goes on writing, and its final
pass reads back every block it ever wrote, the ones written on the source
before and during the copy included: 0 bad blocks. The destination image
then passes the host-side scan.

Usage: test_storage_mirror.py BUILD_DIR
"""
import hashlib
import os
import re
import socket
import struct
import subprocess
import threading
import time

import blkenv

GUEST_SECONDS = 40
MIGRATE_TIMEOUT_S = 240
# Post-copy runs: the half of the disk the guest never touches holds data
# too (blocks in the guest's own pattern, so the host-side scan checks them
# on the destination), 32 MiB that the background push sends at 2 MiB/s
# long after the guest fetched its working set: the faults come then.
BLK = 4096
PREFILL_FROM, PREFILL_TO = 8192, 16384
FNV_PRIME, FNV_MASK = 1099511628211, (1 << 64) - 1


def prefill(path):
    """Blocks [PREFILL_FROM, PREFILL_TO) as blkcheck's scan accepts them: its
    magic, the block's own number, a zero body, the FNV-1a checksum. Returns
    the region's digest."""
    zero_mul = pow(FNV_PRIME, BLK - 8 - 32, 1 << 64)
    out = bytearray()
    for b in range(PREFILL_FROM, PREFILL_TO):
        hdr = struct.pack("<QQQQ", 0x314b4c4247494d56, b, 1, 0x5eed)
        h = 1469598103934665603
        for c in hdr:
            h = ((h ^ c) * FNV_PRIME) & FNV_MASK
        h = (h * zero_mul) & FNV_MASK  # the zero body: a multiply per byte
        out += hdr + bytes(BLK - 8 - 32) + struct.pack("<Q", h)
    with open(path, "r+b") as f:
        f.seek(PREFILL_FROM * BLK)
        f.write(out)
    return hashlib.sha256(out).hexdigest()


def region_digest(path):
    with open(path, "rb") as f:
        f.seek(PREFILL_FROM * BLK)
        return hashlib.sha256(f.read((PREFILL_TO - PREFILL_FROM) * BLK)).hexdigest()


def vmig_bin(env):
    p = os.path.join(env.build_dir, "tools/vmig/vmig")
    if not os.access(p, os.X_OK):
        raise blkenv.Fail("no vmig binary at %s" % p)
    return p


class Link:
    """A forwarder between a unix socket of its own and the destination
    daemon's storage socket, which the test can cut: cut() closes both ends
    of the connection it carries; later connections are forwarded again."""

    def __init__(self, path, target):
        self.path, self.target = path, target
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(path)
        self.lsock.listen(4)
        self.lsock.settimeout(0.2)
        self.stop_flag = False
        self.conns = []
        self.lock = threading.Lock()
        self.cuts = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _pump(self, a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self):
        while not self.stop_flag:
            try:
                c, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            d = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                d.connect(self.target)
            except OSError:
                c.close()
                d.close()
                continue
            with self.lock:
                self.conns += [c, d]
            for a, b in ((c, d), (d, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def cut(self):
        with self.lock:
            conns, self.conns = self.conns, []
            self.cuts += 1
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.stop_flag = True
        self.cut()
        self.lsock.close()
        self.thread.join(timeout=5)


def wait_copied(pair, nbytes):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            q = pair.be_src.rpc_call("vmig_blk_mirror_query")
        except blkenv.Fail:
            q = {}
        if q.get("offset", 0) >= nbytes:
            return q
        time.sleep(0.05)
    raise blkenv.Fail("the mirror did not reach %d MiB in 60 s" % (nbytes >> 20))


def wait_switched(pair):
    deadline = time.monotonic() + MIGRATE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            q = pair.be_src.rpc_call("vmig_blk_mirror_query")
        except blkenv.Fail:
            q = {}
        if q.get("postcopy"):
            return q
        time.sleep(0.05)
    raise blkenv.Fail("the disk was never handed over")


def wait_serving(pair):
    """Post-copy: the destination's guest runs and has asked for blocks."""
    deadline = time.monotonic() + MIGRATE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            inc = pair.be_dst.rpc_call("vmig_blk_incoming_query")
        except blkenv.Fail:
            inc = {}
        if (inc.get("postcopy") or {}).get("held-requests", 0) > 0:
            return
        time.sleep(0.05)
    raise blkenv.Fail("the destination's guest never asked for a block")


def kill_mid_copy(env, pair, which, after_switch=False):
    """Once the mirror has sent 8 MiB (or, after_switch, once the disk was
    handed over by post-copy and the destination's guest runs on it), kill
    -9 the source's or the destination's daemon and start it again (or, for
    "link", cut the storage stream's connection); says what it did."""
    if after_switch:
        # Not while the destination QEMU starts its device: QEMU 7.2 does
        # not retry a vhost start that a dying back-end failed.
        wait_switched(pair)
        wait_serving(pair)
        q = pair.be_src.rpc_call("vmig_blk_mirror_query")
    else:
        q = wait_copied(pair, 8 << 20)
    if which == "link":
        pair.link.cut()
        env.info("cut the storage stream's connection at %s MiB copied" %
                 (q.get("offset", 0) >> 20))
        return
    be = pair.be_src if which == "src" else pair.be_dst
    be.kill9()
    be.start()
    env.info("killed and restarted the %s daemon at %s MiB copied" %
             (which, q.get("offset", 0) >> 20))


def one_run(env, postcopy, kill=None, mode=None, outwrite=False):
    tag = (("postcopy" if postcopy else "precopy") + ("-kill-" + kill if kill else "") +
           ("-" + mode if mode else "") + ("-outwritten" if outwrite else ""))
    storage_uri = "unix:" + os.path.join(env.tmp, "storage-%s.sock" % tag)
    pair = blkenv.MigrationPair(env, GUEST_SECONDS, storage_uri=storage_uri,
                                prefix=tag + "-")
    src, dst, writes_before = pair.src, pair.dst, pair.writes_before
    pair.link = None
    digest = prefill(pair.image) if mode == "postcopy" else None
    if kill == "link":  # the source reaches the destination through the forwarder
        link_path = os.path.join(env.tmp, "link-%s.sock" % tag)
        pair.link = Link(link_path, storage_uri[len("unix:"):])
        storage_uri = "unix:" + link_path
    port = blkenv.free_port()
    argv = [vmig_bin(env), "migrate", "unix:" + src.qmp2_path, "tcp:127.0.0.1:%d" % port,
            "--dest", "unix:" + dst.qmp2_path, "--storage-src", pair.be_src.rpc,
            "--storage-dst", pair.be_dst.rpc, "--storage-uri", storage_uri,
            # stretch the copy over seconds of guest I/O
            "--storage-speed", "16M", "--max-bandwidth", "32M"]
    if postcopy and mode == "write-blocking":
        # The gate holds guest writes from the mirror's first pass until the
        # VM stops. With --postcopy that stop comes within tens of ms of the
        # RAM migration's start (QEMU switches at its first iteration), a
        # window in which a slow guest may write nothing at all. A second
        # of RAM pre-copy first (256 MiB at 32 MiB/s takes longer) gives the
        # guest's continuous writes time to be held.
        argv += ["--postcopy-after", "1"]
    elif postcopy:
        argv.append("--postcopy")
    if mode:
        argv += ["--storage-mode", mode]
    if outwrite or mode == "postcopy":
        argv[argv.index("--storage-speed") + 1] = "2M"
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        if kill:
            kill_mid_copy(env, pair, kill, after_switch=mode == "postcopy")
        out = proc.communicate(timeout=MIGRATE_TIMEOUT_S)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pair.link:
            pair.link.close()
    r = subprocess.CompletedProcess(argv, proc.returncode)
    secs = time.monotonic() - t0
    env.case("%s_vmig_migrate_ok" % tag, r.returncode == 0,
             "exit %d after %.1fs: %s" % (r.returncode, secs, out[-1500:]))
    m = re.search(r"hand-over in (\d+) ms", out)
    env.case("%s_disk_handed_over" % tag, m is not None, out[-600:])
    if kill:
        env.case("%s_mirror_restarted" % tag, "the mirror runs again" in out, out[-800:])
    q = pair.be_src.rpc_call("vmig_blk_mirror_query")
    if mode == "write-blocking" or outwrite:
        env.case("%s_write_blocking" % tag,
                 q.get("copy-mode") == "write-blocking" and q.get("held-writes", 0) > 0,
                 "the source's mirror at the end: %s" % q)
    if outwrite:
        env.case("%s_switch_said" % tag,
                 "switching the mirror to write-blocking" in out and
                 "converged by write-blocking" in out, out[-1500:])
    elif not mode:
        env.info("%s: the mirror ended in copy-mode %s" % (tag, q.get("copy-mode")))
    ready = re.search(r"the disk is on the destination after ([0-9.]+) s", out)
    env.info("%s: %.1fs in all, disk ready after %s s, hand-over %s ms" %
             (tag, secs, ready.group(1) if ready else "?", m.group(1) if m else "?"))
    writes_at_switch = blkenv.writes_of(src.serial())
    # (In post-copy storage the disk moves after the switch, while the
    # destination's guest writes: fetched_on_demand below.)
    if mode != "postcopy":
        env.case("%s_writes_during_copy" % tag, writes_at_switch > writes_before + 100,
                 "guest writes %d before, %d at switch-over" % (writes_before, writes_at_switch))
    inc = pair.be_dst.rpc_call("vmig_blk_incoming_query")
    env.case("%s_destination_complete" % tag, inc.get("status") == "completed", str(inc))
    if mode == "postcopy":
        pc = inc.get("postcopy") or {}
        env.case("%s_postcopy_complete" % tag,
                 "post-copy complete" in out and pc.get("missing") == 0, out[-800:])
        # The guest's working set was mostly on the source when it moved.
        env.case("%s_fetched_on_demand" % tag,
                 pc.get("urgent-requests", 0) > 0 and pc.get("held-requests", 0) > 0,
                 "destination: %s" % inc)
        env.case("%s_untouched_half_moved" % tag, region_digest(pair.image_dst) == digest,
                 "the destination's blocks %d-%d differ from the source's" %
                 (PREFILL_FROM, PREFILL_TO - 1))
        left = [f for f in (pair.image + ".vmig-postcopy", pair.image_dst + ".vmig-postcopy")
                if os.path.exists(f)]
        env.case("%s_state_files_gone" % tag, not left, "left: %s" % left)
        env.info("%s: %s requests waited for blocks, %s READ_REQ sent" %
                 (tag, pc.get("held-requests"), pc.get("urgent-requests")))
    if r.returncode != 0:
        pair.stop()
        return
    s = pair.check_destination(env, writes_at_switch, GUEST_SECONDS + 120)
    env.info("%s: guest maxgap_ms=%s (switch-over included)" % (tag, s.get("maxgap_ms")))
    pair.finish(env)


def switch_not_taken(env):
    """Post-copy storage whose switch the destination cannot take: a
    directory where its state file goes. The source fences itself as the
    switch goes out; resumed, it hears that the destination never switched
    (NOT_SWITCHED) and takes the disk back. vmig then fails the migration at
    once, the VM goes on at the source, and its guest's I/O with it."""
    tag = "postcopy-not-taken"
    storage_uri = "unix:" + os.path.join(env.tmp, "storage-%s.sock" % tag)
    pair = blkenv.MigrationPair(env, GUEST_SECONDS, storage_uri=storage_uri,
                                prefix=tag + "-")
    os.mkdir(pair.image_dst + ".vmig-postcopy.new")
    port = blkenv.free_port()
    argv = [vmig_bin(env), "migrate", "unix:" + pair.src.qmp2_path,
            "tcp:127.0.0.1:%d" % port, "--dest", "unix:" + pair.dst.qmp2_path,
            "--storage-src", pair.be_src.rpc, "--storage-dst", pair.be_dst.rpc,
            "--storage-uri", storage_uri, "--storage-speed", "2M", "--max-bandwidth", "32M",
            "--storage-mode", "postcopy"]
    t0 = time.monotonic()
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=MIGRATE_TIMEOUT_S)
    out = r.stdout.decode(errors="replace")
    env.case("%s_migration_fails" % tag,
             r.returncode != 0 and "never took the switch to post-copy" in out,
             "exit %d after %.1fs: %s" % (r.returncode, time.monotonic() - t0, out[-1500:]))
    q = pair.be_src.rpc_call("vmig_blk_mirror_query")
    env.case("%s_source_took_the_disk_back" % tag,
             q.get("postcopy-not-taken") is True and not q.get("postcopy") and
             not os.path.exists(pair.image + ".vmig-postcopy"),
             "the source's mirror: %s" % q)
    inc = pair.be_dst.rpc_call("vmig_blk_incoming_query")
    env.case("%s_destination_never_served" % tag,
             not str(inc.get("status", "")).startswith("postcopy") and
             inc.get("status") != "completed", str(inc))
    # The VM runs on at the source, its disk served there again.
    blkenv.wait_writes(pair.src, blkenv.writes_now(pair.src) + 100)
    status = pair.src.qmp.cmd("query-status").get("status")
    env.case("%s_source_runs" % tag, status == "running", "source VM: %s" % status)
    pair.stop()
    rc, scan, sout = env.scan_image(pair.image)
    env.case("%s_source_image_consistent" % tag, rc == 0 and int(scan.get("pattern", 0)) > 0,
             "host scan: %s" % sout.strip()[-300:])


def body(env):
    one_run(env, postcopy=False)
    one_run(env, postcopy=True)
    one_run(env, postcopy=False, mode="write-blocking")
    one_run(env, postcopy=True, mode="write-blocking")
    one_run(env, postcopy=False, outwrite=True)
    one_run(env, postcopy=False, kill="src")
    one_run(env, postcopy=False, kill="dst")
    one_run(env, postcopy=False, kill="link")
    one_run(env, postcopy=False, mode="postcopy")
    one_run(env, postcopy=True, mode="postcopy")
    one_run(env, postcopy=False, mode="postcopy", kill="dst")
    one_run(env, postcopy=False, mode="postcopy", kill="src")
    one_run(env, postcopy=False, mode="postcopy", kill="link")
    switch_not_taken(env)


blkenv.run("storage_mirror", body)
