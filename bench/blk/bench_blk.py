#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vhost-user-blk benchmark: vmig-blk against qemu-storage-daemon 7.2.

Part 1, throughput: vblk-load (our own front-end) drives each back-end with
the same 4 KiB random request stream at the same queue depth and queue
count. The headline pairing is a real block device with the host page cache
out of the way on both sides: a loop device made with
`losetup --direct-io=on` over a 1 GiB file written in full (so reads hit
allocated blocks), created and removed by the benchmark (needs root),
served by vmig-blk `--cache none` and by qsd's host_device driver with
`cache.direct=on`, once with `aio=io_uring` and once with `aio=native`.
Then the null pairing (vmig-blk --null, qsd's null-co): the data path
alone. Every back-end is started with 2 queues, and each workload runs on
1 queue, or on 2 queues driven by 2 front-end threads. qsd runs its export
in an iothread with the same polling budget as vmig-blk. Runs are
interleaved; medians are reported, and every run is printed. Then the CPU
use of an idle, connected back-end.

BENCH_BLK_TMPFS=1 adds the special case of a file on tmpfs (/dev/shm),
where vmig-blk does not use io_uring at all (preadv/pwritev inline on the
queue thread) while qsd goes through io_uring, buffered: a figure about
tmpfs, not about disks.

Part 2, guest-visible pause: a Linux guest under QEMU (TCG) writes and
verifies O_DIRECT blocks while the back-end is killed with SIGKILL and
restarted 1 s later (vmig-blk, and qsd for reference), or live-upgraded
(vmig-blk). The pause is the longest gap between two completed guest I/Os
after each event, as the guest itself measured it.

Usage: bench_blk.py BUILD_DIR VBLK_LOAD [--record]
Env: BENCH_BLK_RUNS (5), BENCH_BLK_SECONDS (4), BENCH_BLK_EVENTS (3),
BENCH_BLK_POLL_US (50), BENCH_BLK_ONLY ("loop" or "loop:randread QD1,...":
a subset while iterating; --record refuses it), BENCH_BLK_PAUSE (0: skip
part 2), BENCH_BLK_TMPFS (1: add the tmpfs rows).
"""
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "interop", "blk"))
import blkenv  # noqa: E402

RUNS = int(os.environ.get("BENCH_BLK_RUNS", "5"))
SECONDS = int(os.environ.get("BENCH_BLK_SECONDS", "4"))
EVENTS = int(os.environ.get("BENCH_BLK_EVENTS", "3"))
# vmig-blk's busy-poll window; qsd's iothread gets the same (poll-max-ns).
POLL_US = int(os.environ.get("BENCH_BLK_POLL_US", "50"))
IDLE_S = 3  # idle CPU is measured over this long, front-end connected
DISK_BYTES = 1 << 30
BACKEND_QUEUES = 2  # every back-end offers this many; a workload uses 1 or 2
# (name, read percent, queue depth per queue, queues): 2 queues carry the
# same total depth as the 1-queue row above them, from 2 front-end threads.
WORKLOADS = {
    "loop": [("randread QD32", 100, 32, 1), ("randwrite QD32", 0, 32, 1),
             ("randread QD1", 100, 1, 1), ("randwrite QD1", 0, 1, 1),
             ("randread 2 queues x QD16", 100, 16, 2), ("randread 2 queues x QD1", 100, 1, 2)],
    "null": [("randread QD32", 100, 32, 1), ("randread QD1", 100, 1, 1),
             ("randread 2 queues x QD16", 100, 16, 2), ("randread 2 queues x QD1", 100, 1, 2)],
    "tmpfs": [("randread QD32", 100, 32, 1), ("randwrite QD32", 0, 32, 1),
              ("randread QD1", 100, 1, 1)],
}
STORAGES = ["loop", "null"] + (["tmpfs"] if os.environ.get("BENCH_BLK_TMPFS") == "1" else [])
KINDS = {
    "loop": ["vmig-blk", "qsd-io_uring", "qsd-native"],
    "null": ["vmig-blk", "qsd"],
    "tmpfs": ["vmig-blk", "qsd-io_uring"],
}
# Can be narrowed while iterating, e.g. BENCH_BLK_ONLY="null:randread QD1".
ONLY = os.environ.get("BENCH_BLK_ONLY", "")


def backend_argv(kind, storage, sock, path, vmig_blk):
    """path: the loop device (loop), the tmpfs file (tmpfs), None (null)."""
    if kind == "vmig-blk":
        src = {"null": ["--null", "1G"],
               "loop": ["--file", path, "--cache", "none", "--no-lock"],
               "tmpfs": ["--file", path, "--no-lock"]}[storage]
        return [vmig_blk, "--socket", sock, "--quiet", "--poll-us", str(POLL_US),
                "--queues", str(BACKEND_QUEUES)] + src
    if storage == "null":
        dev = ["--blockdev", "driver=null-co,node-name=disk,size=%d,read-zeroes=off" %
               DISK_BYTES]
    elif storage == "loop":
        # host_device: qsd's driver for a block device; cache.direct=on is
        # QEMU's cache=none, as vmig-blk --cache none. locking=off: both
        # back-ends are up on the one device (only one is driven at a time).
        dev = ["--blockdev", "driver=host_device,node-name=f,filename=%s,aio=%s,"
               "cache.direct=on,locking=off" % (path, kind.split("-", 1)[1]),
               "--blockdev", "driver=raw,node-name=disk,file=f"]
    else:
        # tmpfs: buffered (no O_DIRECT in tmpfs' own sense), io_uring.
        dev = ["--blockdev", "driver=file,node-name=f,filename=%s,aio=io_uring,"
               "cache.direct=off,locking=off" % path,
               "--blockdev", "driver=raw,node-name=disk,file=f"]
    exp = ("type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=%s,"
           "writable=on,num-queues=%d,iothread=io0" % (sock, BACKEND_QUEUES))
    return (["qemu-storage-daemon", "--object",
             "iothread,id=io0,poll-max-ns=%d" % (POLL_US * 1000)] + dev + ["--export", exp])


def wait_socket(path, proc, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise blkenv.Fail("back-end exited at start")
        time.sleep(0.02)
    raise blkenv.Fail("back-end socket did not appear")


def parse_kv(text):
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def selected(storage, wname):
    return not ONLY or any(o in ("%s:%s" % (storage, wname), storage)
                           for o in ONLY.split(","))


def make_loop_device(tmp):
    """A 1 GiB file on the root file system, written in full, behind a loop
    device with direct I/O; returns (device, file). Needs root."""
    backing = tempfile.mkdtemp(prefix="vblk-bench.", dir="/var/tmp")
    path = os.path.join(backing, "disk.img")
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(DISK_BYTES >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    r = subprocess.run(["losetup", "-f", "--show", "--direct-io=on", path],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    if r.returncode != 0:
        subprocess.run(["rm", "-rf", backing])
        raise blkenv.Fail("losetup: %s" % r.stdout.decode(errors="replace").strip())
    dev = r.stdout.decode().strip()
    with open("/sys/block/%s/loop/dio" % os.path.basename(dev)) as f:
        if f.read().strip() != "1":
            remove_loop_device(dev, path)
            raise blkenv.Fail("%s: direct I/O not on" % dev)
    return dev, path


def remove_loop_device(dev, path):
    subprocess.run(["losetup", "-d", dev], timeout=30)
    subprocess.run(["rm", "-rf", os.path.dirname(path)])


def start_backends(storage, vmig_blk, tmp, procs, cleanup):
    """Starts every back-end of one storage pairing; returns {kind: (proc, sock)}."""
    up = {}
    path = None
    if storage == "loop":
        dev, backing = make_loop_device(tmp)
        cleanup.append(lambda: remove_loop_device(dev, backing))
        path = dev
    elif storage == "tmpfs":
        fd, path = tempfile.mkstemp(prefix="vblk-bench.", dir="/dev/shm")
        os.close(fd)
        cleanup.append(lambda: os.unlink(path))
        with open(path, "wb") as f:
            f.truncate(DISK_BYTES)
    for kind in KINDS[storage]:
        if kind == "vmig-blk" and vmig_blk is None:
            continue  # reported as failed in the table
        sock = os.path.join(tmp, "%s-%s.sock" % (kind, storage))
        log = open(os.path.join(tmp, "%s-%s.log" % (kind, storage)), "wb")
        p = subprocess.Popen(backend_argv(kind, storage, sock, path, vmig_blk), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        procs.append(p)
        try:
            wait_socket(sock, p)
        except blkenv.Fail as e:
            print("  %s %s: %s" % (kind, storage, e), flush=True)
            continue
        up[kind] = (p, sock)
    return up, path


def one_run(load_bin, proc, sock, read_pct, qd, queues=1, hold=0):
    argv = [load_bin, "--socket", sock, "--qd", str(qd), "--read-pct", str(read_pct),
            "--queues", str(queues), "--seconds", str(SECONDS), "--pid", str(proc.pid)]
    if hold:
        argv += ["--hold", str(hold)]
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=SECONDS + hold + 60)
    out = r.stdout.decode(errors="replace").strip()
    res = parse_kv(out) if r.returncode == 0 else {"error": out[-200:]}
    return res, " ".join(out.split())


def throughput(load_bin, vmig_blk, tmp):
    """Returns ({(storage, workload): {kind: [result dicts]}}, {kind: idle %}).

    Runs are interleaved: run i of every back-end before run i + 1 of any,
    the order rotating from run to run, so that a slow period of this
    shared machine hits all of them alike instead of one back-end's block."""
    results, idle = {}, {}
    for storage in STORAGES:
        if not any(selected(storage, w[0]) for w in WORKLOADS[storage]):
            continue
        procs, cleanup = [], []
        kinds = KINDS[storage]
        try:
            up, _ = start_backends(storage, vmig_blk, tmp, procs, cleanup)
            for wname, read_pct, qd, queues in WORKLOADS[storage]:
                if not selected(storage, wname):
                    continue
                by_kind = results.setdefault((storage, wname), {k: [] for k in kinds})
                for i in range(RUNS):
                    order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
                    for kind in order:
                        if kind not in up:
                            by_kind[kind].append({"error": "back-end not running"})
                            continue
                        res, line = one_run(load_bin, up[kind][0], up[kind][1], read_pct, qd,
                                            queues)
                        by_kind[kind].append(res)
                        print("  %-12s %-6s %-24s %s" % (kind, storage, wname, line),
                              flush=True)
            if storage == "null":
                # CPU of a connected but idle back-end, after a short QD1 run.
                for kind in up:
                    res, line = one_run(load_bin, up[kind][0], up[kind][1], 100, 1, 1, IDLE_S)
                    idle[kind] = res.get("idle_backend_cpu_pct")
                    print("  %-12s idle after I/O: %s" % (kind, line), flush=True)
        finally:
            for p in procs:
                p.kill()
                p.wait()
            for c in reversed(cleanup):
                c()
    return results, idle


def med(runs, key):
    vals = [float(r[key]) for r in runs if key in r]
    return statistics.median(vals) if vals else None


def throughput_table(results):
    """One row per (storage, workload, back-end); the vmig-blk row carries
    its ratios to the qsd variant with the better median IOPS."""
    rows = ["| storage | workload | back-end | IOPS (median) | IOPS of each run (k) | p50 µs | "
            "p99 µs | back-end CPU µs/IO | IOPS vmig/qsd | CPU per I/O vmig/qsd |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for (storage, wname), by_kind in results.items():
        kinds = KINDS[storage]
        qsd = [(med(by_kind.get(k, []), "iops"), k) for k in kinds[1:]]
        qsd = [x for x in qsd if x[0] is not None]
        q_iops, q_kind = max(qsd) if qsd else (None, None)
        for kind in kinds:
            runs = by_kind.get(kind, [])
            iops = med(runs, "iops")
            errs = [r["error"] for r in runs if "error" in r]
            if iops is None:
                rows.append("| %s | %s | %s | failed: %s | | | | | | |" %
                            (storage, wname, kind, errs[0].replace("|", "/") if errs else "?"))
                continue
            each = "/".join("%.0f" % (float(r["iops"]) / 1000) if "iops" in r else "err"
                            for r in runs)
            cpu = med(runs, "backend_cpu_us_per_io")
            r_iops = r_cpu = ""
            if kind == "vmig-blk" and q_iops:
                q_cpu = med(by_kind[q_kind], "backend_cpu_us_per_io")
                r_iops = "%.2fx (vs %s)" % (iops / q_iops, q_kind)
                r_cpu = "%.2fx" % (cpu / q_cpu) if q_cpu else ""
                ratios.append((storage, wname, iops / q_iops))
            rows.append("| %s | %s | %s | %.0f | %s | %.1f | %.1f | %.2f | %s | %s |" %
                        (storage, wname, kind, iops, each, med(runs, "p50_us"),
                         med(runs, "p99_us"), cpu, r_iops, r_cpu))
    return rows, ratios


def idle_rows(idle):
    rows = ["| back-end | CPU use while connected and idle |", "|---|---|"]
    for kind in KINDS["null"]:
        v = idle.get(kind)
        rows.append("| %s | %s |" % (kind, "%s%%" % v if v is not None else "not measured"))
    return rows


def gaps_since(guest, pos):
    text = guest.serial()[pos:]
    return [float(g["gap_ms"]) for g in blkenv.parse_kv_lines(text, "GAP")]


def pause_run(build_dir, kind, event):
    """Guest-visible pause per event; returns (pauses_ms, daemon_ms, note)."""
    os.environ["VBLK_BACKEND"] = kind
    env = blkenv.Env("bench-pause", build_dir=build_dir)
    pauses, daemon_ms, note = [], [], ""
    try:
        env.prepare()
        image = env.image()
        sock = os.path.join(env.tmp, "blk.sock")
        be = env.backend("backend", sock, image).start()
        guest = blkenv.Guest(env, "qemu", sock,
                             ["--seconds", 12 + EVENTS * 7, "--blocks", 8192, "--gap-ms", 10,
                              "--progress-ms", 1000]).start()
        guest.wait_line(r"^VMIG-GUEST: READY", 60)
        time.sleep(3)
        quiet_pos = len(guest.serial())
        time.sleep(3)
        quiet = gaps_since(guest, quiet_pos)
        note = "largest gap in 3 s without events: %.0f ms" % (max(quiet) if quiet else 10)
        for _ in range(EVENTS):
            pos = len(guest.serial())
            if event == "kill":
                be.kill9()
                time.sleep(1.0)
                be.start()
            else:
                r = subprocess.run([env.vmig_blk, "upgrade", "--socket", sock],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
                out = r.stdout.decode(errors="replace")
                m = re.search(r"pause_ms=([0-9.]+)|([0-9.]+)\s*ms\b", out)
                if r.returncode == 0 and m:
                    daemon_ms.append(float(m.group(1) or m.group(2)))
                else:
                    note += "; upgrade failed: %s" % out.strip()[-200:]
            time.sleep(5)
            g = gaps_since(guest, pos)
            pauses.append(max(g) if g else 0.0)  # 0: no gap of 10 ms or more
        result = guest.result(timeout_s=120)
        s = blkenv.parse_kv_lines(guest.serial(), "SUMMARY")
        s = s[-1] if s else {}
        note += "; guest %s, io_errors=%s bad_blocks=%s" % (result, s.get("io_errors"),
                                                            s.get("bad_blocks"))
    except blkenv.Fail as e:
        note += "; failed: %s" % e
    finally:
        env.failed = 0  # bench: keep no logs around
        env.finish()
    return pauses, daemon_ms, note


def pause_table(build_dir, have_vmig_blk):
    rows = ["| back-end | event | guest-visible pause per event (ms) | median | "
            "daemon-measured pause (ms) | notes |", "|---|---|---|---|---|---|"]
    for kind, event in (("qsd", "kill"), ("vmig-blk", "kill"), ("vmig-blk", "upgrade")):
        label = "kill -9, restart after 1 s" if event == "kill" else "live upgrade"
        if kind == "vmig-blk" and not have_vmig_blk:
            rows.append("| %s | %s | - | - | - | no vmig-blk binary |" % (kind, label))
            continue
        pauses, daemon_ms, note = pause_run(build_dir, kind, event)
        print("  %-9s %-8s pauses=%s daemon=%s %s" % (kind, event, pauses, daemon_ms, note),
              flush=True)
        rows.append("| %s | %s | %s | %s | %s | %s |" % (
            kind, label, " ".join("%.0f" % p for p in pauses) or "-",
            "%.0f" % statistics.median(pauses) if pauses else "-",
            " ".join("%.2f" % d for d in daemon_ms) or "-", note.strip("; ")))
    return rows


def machine():
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], stdout=subprocess.PIPE)
    qv = qemu.stdout.decode().splitlines()[0] if qemu.returncode == 0 else "?"
    kernel = ".".join(platform.release().split(".")[:2])  # no build-specific suffix
    return "%d cores, kernel %s, %s" % (os.cpu_count(), kernel, qv)


def record(lines):
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    with open(path) as f:
        text = f.read()
    begin, end = "<!-- blk:begin -->", "<!-- blk:end -->"
    if begin not in text or end not in text:
        raise SystemExit("bench_blk: markers missing in %s" % path)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


SCALING = [("randread QD32", "randread 2 queues x QD16"),
           ("randread QD1", "randread 2 queues x QD1")]


def scaling_rows(results):
    """IOPS with 2 queues over IOPS with 1, per back-end (medians)."""
    rows = ["| storage | 1 queue | 2 queues | back-end | IOPS 1 queue | IOPS 2 queues | "
            "2 / 1 |", "|---|---|---|---|---|---|---|"]
    for storage in STORAGES:
        for one, two in SCALING:
            r1, r2 = results.get((storage, one)), results.get((storage, two))
            if not r1 or not r2:
                continue
            for kind in KINDS[storage]:
                a, b = med(r1.get(kind, []), "iops"), med(r2.get(kind, []), "iops")
                if a and b:
                    rows.append("| %s | %s | %s | %s | %.0f | %.0f | %.2fx |" %
                                (storage, one, two, kind, a, b, b / a))
    return rows


def record_text(t_rows, s_rows, i_rows, behind, p_rows, loads):
    env = "".join(" %s=%s" % (k, os.environ[k]) for k in
                  ("BENCH_BLK_RUNS", "BENCH_BLK_SECONDS", "BENCH_BLK_POLL_US",
                   "BENCH_BLK_TMPFS") if k in os.environ)
    tmpfs = "tmpfs" in STORAGES
    return ["## vhost-user-blk: vmig-blk vs qemu-storage-daemon", "",
            "Recorded %s on %s with `%sbench/blk/run.sh BUILD_DIR --record`, as root ("
            "the benchmark makes and removes its loop device; each benchmark run of this "
            "repository holds `flock /tmp/vmig-bench.lock`). All figures below come from "
            "that one run, on a 2-core machine shared with other jobs: compare within a "
            "table, and read the ratios rather than the absolute figures." %
            (time.strftime("%Y-%m-%d"), machine(), env.strip() + " " if env else ""), "",
            "### Throughput, same front-end (bench/blk/vblk-load.c)", "",
            "4 KiB random I/O, %d runs of %d s each (after 1 s warm-up) per back-end, "
            "interleaved (run i of every back-end before run i+1 of any, in a rotating "
            "order), medians; every run's IOPS is listed so the spread is visible. Single "
            "runs of the same set-up differ by up to 3x on this machine. Jobs that do not "
            "take the benchmark lock (tests, builds) may run meanwhile: the 1-minute load "
            "average was %s when the throughput part started and %s when it ended (the "
            "benchmark's own front-end and back-end account for up to 2, 4 with two "
            "queues)." % (RUNS, SECONDS, loads[0], loads[1]), "",
            "Back-ends and storage, the same on both sides:", "",
            "- `loop` (the headline): one loop device made by the benchmark with "
            "`losetup -f --show --direct-io=on` over a 1 GiB file on the root file system "
            "(ext4 on a virtio disk), written in full first so that reads hit allocated "
            "blocks. vmig-blk `--file /dev/loopN --cache none` (O_DIRECT, io_uring) against "
            "qsd `driver=host_device,cache.direct=on` with `aio=io_uring` (`qsd-io_uring`) "
            "and with `aio=native` (`qsd-native`). Both keep the host page cache out of "
            "the way, so every I/O reaches the loop device and, through it, the file.",
            "- `null`: vmig-blk `--null 1G` vs qsd `null-co` with `read-zeroes=off`: "
            "neither stores nor copies anything. The pure overhead of each data path.",
            ] + (["- `tmpfs` (a special case, not a disk): both serve a 1 GiB file in "
                  "/dev/shm. vmig-blk serves a tmpfs file inline on the queue thread "
                  "(preadv/pwritev, no io_uring), qsd through io_uring, buffered "
                  "(`cache.direct=off`), which on tmpfs hands every request to an io-wq "
                  "worker. Its ratios say how each handles tmpfs, nothing about disks."]
                 if tmpfs else []) + [
            "- Every back-end is started with 2 queues (vmig-blk `--queues 2`, qsd "
            "`num-queues=2`) and one `--poll-us %d` polling budget: qsd runs its export "
            "in an iothread with `poll-max-ns=%d` (qsd 7.2 serves all queues of an export "
            "from one iothread; vmig-blk has one thread and one io_uring per queue). A "
            "workload uses 1 queue, or 2 queues driven by 2 front-end threads "
            "(`vblk-load --queues 2`), each with half the 1-queue row's depth for QD32 "
            "(the same 32 requests in flight in all) and QD1 each for QD1." %
            (POLL_US, POLL_US * 1000),
            "- The ratios compare vmig-blk with the qsd variant that had the better "
            "median IOPS in that row (named in the IOPS column).", "",
            "Earlier versions of this section led with a RAM disk and a tmpfs file. On "
            "tmpfs vmig-blk does no asynchronous I/O at all while qsd pays for io_uring's "
            "worker threads, so those rows measured tmpfs handling, not a disk path; they "
            "are now only run with `BENCH_BLK_TMPFS=1`, under their own label. Measuring "
            "a real device also found a defect: until 2026-12-05 vmig-blk took every "
            "block device for a tmpfs file (`fstatfs` on a node in /dev reports devtmpfs) "
            "and served it with blocking `preadv`/`pwritev` on the queue thread, one "
            "request at a time; at QD32 on this loop device that gave a fraction of "
            "qsd's IOPS. The figures below are with the fix.", "",
            "CPU is the back-end process's user+system time from /proc/PID/stat over the "
            "measured window divided by I/Os. Both back-ends poll after work, so at QD1 "
            "CPU per I/O is mostly the poll window, not the cost of an I/O.", ""] + t_rows + [
            "", "Rows where vmig-blk has fewer IOPS than the better qsd: %s." %
            ("; ".join(behind) or "none"), "",
            "### Queues: 1 against 2", "",
            "The same medians as above, side by side. On 2 cores, 2 queues mean 2 "
            "front-end threads and 2 back-end threads (vmig-blk) on 2 cores, so a back-end "
            "that gets faster per queue can still lose IOPS here: this shows that the "
            "second queue works and what it costs on this machine, not how far it scales "
            "on a host with a core per queue.", ""] + s_rows + [
            "", "### CPU of an idle back-end", "",
            "After a short QD1 run on `null`, the front-end stays connected with the ring "
            "started and does nothing for %d s; the back-end's CPU use over that time "
            "(`tests/interop/blk/test_poll.py` checks vmig-blk's stays under 5%%). The poll "
            "window only runs after work, so an idle vmig-blk sleeps on its kick eventfd." %
            IDLE_S, ""] + i_rows + [
            "", "### Guest-visible I/O pause (QEMU 7.2 TCG, Linux 6.1 guest)", "",
            "The guest writes and verifies 4 KiB O_DIRECT blocks at queue depth 1; the "
            "pause is the longest gap between two completed guest I/Os after each event "
            "(gaps under 10 ms are not reported by the guest, shown as 0). The "
            "daemon-measured pause is what `vmig-blk upgrade` prints. The guest figure is "
            "the largest gap in the 5 s after the event, so it is bounded below by the "
            "scheduling noise shown in the notes (largest gap in a quiet 3 s window).",
            ""] + p_rows


def main():
    if len(sys.argv) < 3:
        raise SystemExit("usage: bench_blk.py BUILD_DIR VBLK_LOAD [--record]")
    build_dir, load_bin = os.path.abspath(sys.argv[1]), sys.argv[2]
    if "--record" in sys.argv and (ONLY or os.environ.get("BENCH_BLK_PAUSE", "1") == "0"):
        raise SystemExit("bench_blk: --record needs the full run "
                         "(no BENCH_BLK_ONLY, no BENCH_BLK_PAUSE=0)")
    if os.geteuid() != 0 and any(selected("loop", w[0]) for w in WORKLOADS["loop"]):
        raise SystemExit("bench_blk: needs root (it makes a loop device)")
    vmig_blk = blkenv.find_vmig_blk(build_dir)
    if vmig_blk is None:
        print("bench_blk: no vmig-blk in %s: measuring qemu-storage-daemon only" % build_dir,
              file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="vblk-bench.")
    print("throughput (%d runs x %d s each, poll window %d us):" % (RUNS, SECONDS, POLL_US),
          flush=True)
    loads = [loadavg()]
    results, idle = throughput(load_bin, vmig_blk, tmp)
    loads.append(loadavg())
    print("load average at start / end: %s / %s" % tuple(loads), flush=True)
    t_rows, ratios = throughput_table(results)
    s_rows = scaling_rows(results)
    i_rows = idle_rows(idle)
    print("\n".join(t_rows + [""] + s_rows + [""] + i_rows))
    behind = ["%s %s %.2fx" % r for r in ratios if r[2] < 1.0]
    print("rows where vmig-blk is behind qsd: %s" % ("; ".join(behind) or "none"), flush=True)
    p_rows = []
    if os.environ.get("BENCH_BLK_PAUSE", "1") != "0":
        print("guest-visible pause (%d events each):" % EVENTS, flush=True)
        p_rows = pause_table(build_dir, vmig_blk is not None)
        print("\n".join(p_rows))
    subprocess.run(["rm", "-rf", tmp])
    if "--record" in sys.argv:
        record(record_text(t_rows, s_rows, i_rows, behind, p_rows, loads))
    return 0 if vmig_blk is not None else 1


if __name__ == "__main__":
    sys.exit(main())
