#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Moving a VM with its local disk: vmig (two vmig-blk daemons and `vmig
migrate --storage-*`) against what a user does today with QEMU 7.2 alone
(a virtio-blk disk on a local file, copied by `blockdev-mirror` to an NBD
export of the destination QEMU, the way libvirt's --copy-storage-all does
it), side by side in one run.

Both runs boot the same guest (the interop test guest: Linux 6.1 and
blkcheck, which writes and verifies O_DIRECT 4 KiB blocks all along) with
the same RAM, on the same 4 GiB raw image holding 1 GiB of random data,
and the guest keeps writing during the whole migration. The destination
image starts empty (sparse). RAM migration is QEMU's in both, with the
same parameters (no bandwidth cap, downtime-limit 300 ms unless told), so what differs
is how the disk moves and how the two copies are handed over:

- QEMU: the destination starts with -S and -incoming defer and exports its
  (empty) disk over NBD (nbd-server-start, block-export-add); the source
  attaches it (blockdev-add driver=nbd) and runs blockdev-mirror
  sync=full; once the job is ready, the RAM migration; once that completed
  (the source VM stopped), block-job-cancel (in the ready state: stop with
  the target in sync), the NBD client and export go away, and `cont` on
  the destination. This is libvirt's order.
- vmig: one `vmig migrate` command (mirror mode, its default).

Measured per run:
- total time: from the first command to the destination's RESUME event;
- VM downtime: the source's STOP event to the destination's RESUME event
  (QMP event timestamps, one host clock); of which the disk's hand-over
  (QEMU: from the RAM migration's completion to `cont` returning, the
  mirror's cancel and the NBD teardown included; vmig: what `vmig migrate`
  prints as the hand-over, the last round and the destination's sync),
  and QEMU's own `downtime` figure from the source's query-migrate;
- the longest guest-visible I/O stall: the guest's own longest gap between
  two completed I/Os (maxgap_ms), over its whole run, switch-over included;
- guest throughput during the copy: its writes per second from the start
  of the migration to the source's STOP, against the 5 s before;
- CPU seconds of each side over the same window as the total time: the
  source QEMU (plus its vmig-blk and the vmig command for vmig), the
  destination QEMU (plus its vmig-blk). The guest's own TCG execution is in
  the QEMU figures of both (the same guest, the same work).

Every run is also checked: the guest's final pass reads back every block it
wrote (0 bad blocks, after the migration, on the destination), and the
destination image's 1 GiB random region equals the source's. A run that
fails a check is reported as failed, not measured.

Usage: bench_storage.py BUILD_DIR [--runs N] [--record]
(BENCH_DOWNTIME_LIMIT_MS=MS sets both engines' downtime-limit, 300 by
default; BENCH_KEEP=1 keeps every run's directory.)
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "common"))
import benchlib as bl  # noqa: E402

ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
GUEST_BUILD = os.path.join(ROOT, "tests", "interop", "guest", "build.sh")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- storage-migration:begin -->", "<!-- storage-migration:end -->"

IMAGE_BYTES = 4 << 30
RANDOM_AT, RANDOM_BYTES = 256 << 20, 1 << 30
# See tests/interop/blk/blkenv.py: not a multiple of 256 KiB (QEMU 7.2 TCG).
GUEST_MEM_KB = 256 * 1024 + 8
GUEST_BLOCKS = 8192  # the guest writes [0, 32 MiB)
STOP_BLOCK = 16384  # 64 MiB: the host writes the stop marker here
STOP_MARKER = b"VMIGSTOP"
SERIAL = "vmig-bench-disk"
MIGRATE_TIMEOUT_S = 900
DOWNTIME_LIMIT_MS = int(os.environ.get("BENCH_DOWNTIME_LIMIT_MS", "300"))


def log(msg):
    print(msg, flush=True)


def make_template(path):
    """The source image: 4 GiB, sparse but for 1 GiB of random data."""
    with open(path, "wb") as f:
        f.truncate(IMAGE_BYTES)
        f.seek(RANDOM_AT)
        left = RANDOM_BYTES
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n


def region_digest(path):
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        f.seek(RANDOM_AT)
        left = RANDOM_BYTES
        while left:
            chunk = f.read(min(left, 16 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def kv_lines(text, tag):
    out = []
    for line in text.splitlines():
        if line.startswith("VMIG-GUEST: " + tag + " "):
            out.append(dict(kv.split("=", 1) for kv in line.split()[2:] if "=" in kv))
    return out


class Run:
    """One migration of the guest and its disk by one engine."""

    def __init__(self, engine, build, guest, template, tmp):
        self.engine, self.build, self.guest, self.tmp = engine, build, guest, tmp
        self.procs = bl.Procs()
        self.src_img = os.path.join(tmp, "src.img")
        self.dst_img = os.path.join(tmp, "dst.img")
        subprocess.run(["cp", "--sparse=always", template, self.src_img], check=True)
        with open(self.dst_img, "wb") as f:
            f.truncate(IMAGE_BYTES)
        self.side = {}

    def qemu(self, name, disk_args, incoming):
        serial = os.path.join(self.tmp, name + ".serial")
        qmp = os.path.join(self.tmp, name + ".qmp")
        qmp2 = os.path.join(self.tmp, name + ".qmp2")
        args = ["--seconds", 900, "--blocks", GUEST_BLOCKS, "--write-pct", 60,
                "--gap-ms", 100, "--progress-ms", 250, "--stop-block", STOP_BLOCK,
                "--serial", SERIAL]
        append = ("console=ttyS0 quiet panic=-1 vmig.test=blkcheck vmig.args=" +
                  ",".join(str(a) for a in args))
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "%dK" % GUEST_MEM_KB,
                "-object", "memory-backend-memfd,id=mem,size=%dK,share=on" % GUEST_MEM_KB,
                "-numa", "node,memdev=mem", "-kernel", self.guest["kernel"],
                "-initrd", self.guest["initrd"], "-append", append, "-display", "none",
                "-nodefaults", "-serial", "file:" + serial, "-no-reboot",
                "-qmp", "unix:%s,server=on,wait=off" % qmp,
                "-qmp", "unix:%s,server=on,wait=off" % qmp2] + disk_args
        if incoming:
            argv += ["-incoming", "defer"]
        p = self.procs.start(argv, os.path.join(self.tmp, name + ".log"))
        return {"proc": p, "serial": serial, "qmp": bl.Qmp(qmp), "qmp2": qmp2}

    def daemon(self, name, image, extra):
        sock = os.path.join(self.tmp, name + ".sock")
        rpc = sock + ".rpc"
        argv = [os.path.join(self.build, "tools/vmig-blk/vmig-blk"), "--socket", sock,
                "--file", image, "--rpc", rpc, "--serial", SERIAL] + extra
        p = self.procs.start(argv, os.path.join(self.tmp, name + ".log"))
        deadline = time.monotonic() + 20
        while not os.path.exists(rpc):
            if p.poll() is not None or time.monotonic() > deadline:
                raise bl.BenchError("%s did not start" % name)
            time.sleep(0.05)
        return {"proc": p, "sock": sock, "rpc": rpc}

    @staticmethod
    def serial_text(vm):
        try:
            with open(vm["serial"], errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_serial(self, vm, pattern, timeout_s):
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = rx.search(self.serial_text(vm))
            if m:
                return m
            if vm["proc"].poll() is not None:
                break
            time.sleep(0.1)
        raise bl.BenchError("%s: no '%s' on the guest's console" % (self.engine, pattern))

    def writes(self, vm):
        p = kv_lines(self.serial_text(vm), "PROGRESS")
        return (int(p[-1]["writes"]), float(p[-1]["t_ms"])) if p else (0, 0.0)

    def cpu(self, pids):
        total = 0.0
        for pid in pids:
            try:
                total += bl.cpu_seconds(pid)
            except OSError:
                pass
        return total

    def start(self):
        if self.engine == "qemu":
            def disk(img):
                return ["-blockdev", "driver=file,filename=%s,node-name=file0" % img,
                        "-blockdev", "driver=raw,file=file0,node-name=disk0",
                        "-device", "virtio-blk-pci,drive=disk0,serial=%s" % SERIAL]
            self.src = self.qemu("qemu-src", disk(self.src_img), False)
            # -S: the destination must not run before the mirror is cancelled
            self.dst = self.qemu("qemu-dst", disk(self.dst_img) + ["-S"], True)
            self.src_pids = [self.src["proc"].pid]
            self.dst_pids = [self.dst["proc"].pid]
        else:
            self.stor = "unix:" + os.path.join(self.tmp, "storage.sock")
            self.bsrc = self.daemon("vmig-blk-src", self.src_img, [])
            self.bdst = self.daemon("vmig-blk-dst", self.dst_img, ["--incoming", self.stor])

            def disk(d):
                return ["-chardev", "socket,id=c0,path=%s,reconnect=1" % d["sock"],
                        "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]
            self.src = self.qemu("qemu-src", disk(self.bsrc), False)
            self.dst = self.qemu("qemu-dst", disk(self.bdst), True)
            self.src_pids = [self.src["proc"].pid, self.bsrc["proc"].pid]
            self.dst_pids = [self.dst["proc"].pid, self.bdst["proc"].pid]
        self.wait_serial(self.src, r"^VMIG-GUEST: READY", 120)
        w0, t0 = self.writes(self.src)
        time.sleep(5)
        w1, t1 = self.writes(self.src)
        self.base_wps = (w1 - w0) * 1000.0 / (t1 - t0) if t1 > t0 else None

    def migrate_qemu(self, port):
        src, dst = self.src["qmp"], self.dst["qmp"]
        nbd = os.path.join(self.tmp, "nbd.sock")
        for q in (src, dst):
            q.execute("migrate-set-parameters",
                      {"max-bandwidth": 1 << 40, "downtime-limit": DOWNTIME_LIMIT_MS})
        dst.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
        dst.execute("block-export-add", {"type": "nbd", "id": "exp0", "node-name": "disk0",
                                         "name": "disk0", "writable": True})
        src.execute("blockdev-add", {"driver": "nbd", "node-name": "tgt0",
                                     "server": {"type": "unix", "path": nbd},
                                     "export": "disk0"})
        src.execute("blockdev-mirror", {"job-id": "m0", "device": "disk0", "target": "tgt0",
                                        "sync": "full"})
        deadline = time.monotonic() + MIGRATE_TIMEOUT_S
        while True:
            jobs = src.execute("query-block-jobs")
            if jobs and jobs[0].get("ready"):
                break
            if not jobs or time.monotonic() > deadline:
                raise bl.BenchError("qemu: the mirror never got ready: %s" % jobs)
            time.sleep(0.1)
        dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:%d" % port})
        src.execute("migrate", {"uri": "tcp:127.0.0.1:%d" % port})
        while True:
            st = src.execute("query-migrate").get("status")
            if st == "completed":
                break
            if st in ("failed", "cancelled") or time.monotonic() > deadline:
                raise bl.BenchError("qemu: migration %s" % st)
            time.sleep(0.005)
        t_handover = time.monotonic()
        src.execute("block-job-cancel", {"device": "m0"})
        while src.execute("query-block-jobs"):
            if time.monotonic() > deadline:
                raise bl.BenchError("qemu: the mirror did not end")
            time.sleep(0.005)
        src.execute("blockdev-del", {"node-name": "tgt0"})  # the NBD client goes
        dst.execute("block-export-del", {"id": "exp0"})
        dst.execute("nbd-server-stop")
        dst.execute("cont")
        self.handover_ms = (time.monotonic() - t_handover) * 1000.0

    def migrate_vmig(self, port):
        argv = [os.path.join(self.build, "tools/vmig/vmig"), "migrate",
                "unix:" + self.src["qmp2"], "tcp:127.0.0.1:%d" % port,
                "--dest", "unix:" + self.dst["qmp2"], "--max-bandwidth", "1T",
                "--downtime-limit", str(DOWNTIME_LIMIT_MS), "--no-progress",
                "--storage-src", self.bsrc["rpc"], "--storage-dst", self.bdst["rpc"],
                "--storage-uri", self.stor]
        out = open(os.path.join(self.tmp, "vmig.log"), "wb")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + MIGRATE_TIMEOUT_S
        while True:  # wait4: the command's own CPU time comes with its status
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                p.wait()
                raise bl.BenchError("vmig: migration did not end")
            time.sleep(0.01)
        p.returncode = os.waitstatus_to_exitcode(status)
        self.vmig_cpu = ru.ru_utime + ru.ru_stime
        with open(os.path.join(self.tmp, "vmig.log"), errors="replace") as f:
            text = f.read()
        if p.returncode != 0:
            raise bl.BenchError("vmig migrate failed: %s" % text[-600:])
        m = re.search(r"storage: hand-over in (\d+) ms", text)
        self.handover_ms = float(m.group(1)) if m else None

    def event_ts(self, q, name, timeout_s=30):
        deadline = time.monotonic() + timeout_s
        while True:
            for e in q.events:
                if e.get("event") == name:
                    ts = e.get("timestamp", {})
                    return ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
            if time.monotonic() > deadline:
                raise bl.BenchError("%s: no %s event" % (self.engine, name))
            q.execute("query-status")  # reading a reply collects pending events
            time.sleep(0.01)

    def migrate(self):
        port = bl.free_tcp_port()
        for q in (self.src["qmp"], self.dst["qmp"]):
            q.events.clear()
        w_start, t_start = self.writes(self.src)
        cpu_src0, cpu_dst0 = self.cpu(self.src_pids), self.cpu(self.dst_pids)
        wall0 = time.time()
        t0 = time.monotonic()
        if self.engine == "qemu":
            self.migrate_qemu(port)
        else:
            self.migrate_vmig(port)
        resume = self.event_ts(self.dst["qmp"], "RESUME")
        stop = self.event_ts(self.src["qmp"], "STOP")
        total = time.monotonic() - t0
        cpu_src = self.cpu(self.src_pids) - cpu_src0
        cpu_dst = self.cpu(self.dst_pids) - cpu_dst0
        if self.engine == "vmig":  # the vmig command's, on the source's side
            cpu_src += self.vmig_cpu
        ram_downtime = self.src["qmp"].execute("query-migrate").get("downtime")
        w_stop, t_stop = self.writes(self.src)
        wps = (w_stop - w_start) * 1000.0 / (t_stop - t_start) if t_stop > t_start else None
        return {"total_s": total, "downtime_ms": (resume - stop) * 1000.0,
                "resume_after_s": resume - wall0, "wps_during": wps,
                "wps_before": self.base_wps, "cpu_src_s": cpu_src, "cpu_dst_s": cpu_dst,
                "ram_downtime_ms": ram_downtime, "handover_ms": self.handover_ms}

    def check(self, res):
        time.sleep(3)  # the guest runs and writes on the destination first
        with open(self.dst_img, "r+b") as f:
            f.seek(STOP_BLOCK * 4096)
            f.write(STOP_MARKER + b"\0" * (4096 - len(STOP_MARKER)))
        m = self.wait_serial(self.dst, r"^VMIG-GUEST: SUMMARY (.*)$", 600)
        s = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
        res["maxgap_ms"] = float(s.get("maxgap_ms", "nan"))
        bad = int(s.get("bad_blocks", "-1")), int(s.get("io_errors", "-1"))
        if bad != (0, 0) or s.get("serial_ok") != "1":
            raise bl.BenchError("%s: the guest found bad_blocks=%d io_errors=%d serial_ok=%s" %
                                (self.engine, bad[0], bad[1], s.get("serial_ok")))
        if region_digest(self.src_img) != region_digest(self.dst_img):
            raise bl.BenchError("%s: the destination's 1 GiB random region differs" %
                                self.engine)

    def close(self):
        for vm in (getattr(self, "src", None), getattr(self, "dst", None)):
            if vm:
                vm["qmp"].close()
        self.procs.kill_all()


ROWS = [
    ("total time (s)", "total_s", "%.1f"),
    ("VM downtime (ms)", "downtime_ms", "%.0f"),
    ("  of which the disk's hand-over (ms)", "handover_ms", "%.0f"),
    ("  QEMU's own downtime figure (ms)", "ram_downtime_ms", "%.0f"),
    ("longest guest I/O stall (ms)", "maxgap_ms", "%.0f"),
    ("guest writes/s during the copy", "wps_during", "%.0f"),
    ("guest writes/s in the 5 s before", "wps_before", "%.0f"),
    ("CPU s, source side", "cpu_src_s", "%.1f"),
    ("CPU s, destination side", "cpu_dst_s", "%.1f"),
]


def one(engine, build, guest, template, keep):
    tmp = tempfile.mkdtemp(prefix="bench-storage-%s." % engine)
    run = Run(engine, build, guest, template, tmp)
    ok = False
    try:
        run.start()
        res = run.migrate()
        run.check(res)
        ok = True
        return res
    finally:
        run.close()
        if ok and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif not ok:
            log("  (logs kept in %s)" % tmp)


def table(results):
    lines = ["| | vmig | QEMU 7.2 mirror to NBD | vmig / QEMU |", "|---|---:|---:|---:|"]
    for label, key, fmt in ROWS:
        v = bl.median([r[key] for r in results["vmig"]])
        q = bl.median([r[key] for r in results["qemu"]])
        ratio = "%.2fx" % (v / q) if v is not None and q else "-"
        lines.append("| %s | %s | %s | %s |" % (label, fmt % v if v is not None else "-",
                                               fmt % q if q is not None else "-", ratio))
    return "\n".join(lines)


def main():
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    build = os.path.abspath(args[0])
    runs = 3
    record = "--record" in args
    if "--runs" in args:
        runs = int(args[args.index("--runs") + 1])
    keep = os.environ.get("BENCH_KEEP") == "1"
    for tool in ("qemu-system-x86_64",):
        if shutil.which(tool) is None:
            log("bench/storage: %s is not installed" % tool)
            return 1
    r = subprocess.run([GUEST_BUILD, os.path.join(build, "interop-guest")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=900)
    if r.returncode != 0:
        log("bench/storage: guest build failed: %s" % r.stderr.decode(errors="replace")[-400:])
        return 1
    gdir = r.stdout.decode().strip().splitlines()[-1]
    with open(os.path.join(gdir, "kernel")) as f:
        guest = {"kernel": f.read().strip(), "initrd": os.path.join(gdir, "initramfs.cpio.gz")}
    work = tempfile.mkdtemp(prefix="bench-storage.")
    template = os.path.join(work, "template.img")
    facts = bl.host_facts()
    results = {"vmig": [], "qemu": []}
    failures = []
    try:
        log("bench/storage: writing the 4 GiB image with 1 GiB of random data")
        make_template(template)
        for i in range(runs):
            for engine in ("vmig", "qemu"):  # interleaved, so drift hits both
                busy = bl.wait_quiet(0.3, 60)
                try:
                    res = one(engine, build, guest, template, keep)
                except bl.BenchError as e:
                    failures.append("%s run %d: %s" % (engine, i + 1, e))
                    log("  %s run %d FAILED: %s" % (engine, i + 1, e))
                    continue
                res["host_busy"] = busy
                results[engine].append(res)
                log("  %s run %d: %s" % (engine, i + 1, json.dumps(
                    {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not results["vmig"] or not results["qemu"]:
        log("bench/storage: no complete pair of results")
        return 1
    body = ["### Moving a VM with its local disk: 4 GiB image (1 GiB random data), guest "
            "writing throughout, median of %d runs" % runs, "",
            "Measured %s on %s (%d CPUs, %.0f GiB, kernel %s)." % (
                facts["date"], facts["cpu"], facts["cpus"], facts["mem_gib"],
                facts["kernel"]), "",
            table(results), "",
            "Command: `python3 bench/storage/bench_storage.py build --runs %d --record`. "
            "Runs that failed a check: %s." % (runs, "; ".join(failures) or "none")]
    text = "\n".join(body)
    log(text)
    if record:
        bl.replace_section(DOC, BEGIN, END, text)
        log("bench/storage: recorded in %s" % DOC)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
