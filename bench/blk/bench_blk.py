#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vhost-user-blk benchmark: vmig-blk against qemu-storage-daemon 7.2.

Part 1, throughput: vblk-load (our own front-end) drives each back-end with
the same 4 KiB random request stream at the same queue depth. Three
pairings, each with the same kind of storage on both sides: null (vmig-blk
--null, qsd's null-co), RAM (vmig-blk --ram, qsd's file driver on a tmpfs
file: qsd has no RAM disk) and a tmpfs file in /dev/shm (both file
back-ends). qsd runs twice, in its main loop and in an iothread with the
same polling budget as vmig-blk. Runs are interleaved; medians are
reported, and every run is printed. Then the CPU use of an idle, connected
back-end.

Part 2, guest-visible pause: a Linux guest under QEMU (TCG) writes and
verifies O_DIRECT blocks while the back-end is killed with SIGKILL and
restarted 1 s later (vmig-blk, and qsd for reference), or live-upgraded
(vmig-blk). The pause is the longest gap between two completed guest I/Os
after each event, as the guest itself measured it.

Usage: bench_blk.py BUILD_DIR VBLK_LOAD [--record]
Env: BENCH_BLK_RUNS (5), BENCH_BLK_SECONDS (4), BENCH_BLK_EVENTS (3),
BENCH_BLK_POLL_US (50), BENCH_BLK_ONLY ("null" or "null:randread QD1,...":
a subset while iterating; --record refuses it), BENCH_BLK_PAUSE (0: skip
part 2).
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
WORKLOADS = [  # (name, read percent, queue depth)
    ("randread QD1", 100, 1),
    ("randread QD32", 100, 32),
    ("randwrite QD32", 0, 32),
    ("randrw 70/30 QD32", 70, 32),
]
# Pairings with the same kind of storage on both sides. qsd has no RAM disk
# of its own: the nearest thing that also keeps the data and copies it per
# I/O is its file driver on a tmpfs file, so the `ram` row's qsd is the
# same set-up as the `shm-file` row's.
STORAGES = ["null", "ram", "shm-file"]
KINDS = ["vmig-blk", "qsd", "qsd-iothread"]
# Can be narrowed while iterating, e.g. BENCH_BLK_ONLY="null:randread QD1".
ONLY = os.environ.get("BENCH_BLK_ONLY", "")


def backend_argv(kind, storage, sock, shm_file, vmig_blk):
    if kind == "vmig-blk":
        src = {"null": ["--null", "1G"], "ram": ["--ram", "1G"]}.get(storage,
                                                                    ["--file", shm_file])
        return [vmig_blk, "--socket", sock, "--quiet", "--poll-us", str(POLL_US)] + src
    if storage == "null":
        dev = ["--blockdev", "driver=null-co,node-name=disk,size=%d,read-zeroes=off" %
               DISK_BYTES]
    else:
        # Buffered (cache.direct=off): tmpfs has no O_DIRECT, and the page
        # cache is where the data lives; io_uring as a tuned set-up would.
        dev = ["--blockdev", "driver=file,node-name=f,filename=%s,aio=io_uring,"
               "cache.direct=off" % shm_file,
               "--blockdev", "driver=raw,node-name=disk,file=f"]
    exp = ("type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=%s,"
           "writable=on" % sock)
    if kind == "qsd-iothread":
        return (["qemu-storage-daemon", "--object",
                 "iothread,id=io0,poll-max-ns=%d" % (POLL_US * 1000)] + dev +
                ["--export", exp + ",iothread=io0"])
    return ["qemu-storage-daemon"] + dev + ["--export", exp]


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


def start_backends(storage, load_bin, vmig_blk, tmp, procs):
    """Starts every back-end of one storage pairing; returns {kind: (proc, sock)}."""
    up = {}
    for kind in KINDS:
        if kind == "vmig-blk" and vmig_blk is None:
            continue  # reported as failed in the table
        sock = os.path.join(tmp, "%s-%s.sock" % (kind, storage))
        shm = None
        if storage != "null":
            fd, shm = tempfile.mkstemp(prefix="vblk-bench.", dir="/dev/shm")
            os.close(fd)
            with open(shm, "wb") as f:
                f.truncate(DISK_BYTES)
        log = open(os.path.join(tmp, "%s-%s.log" % (kind, storage)), "wb")
        p = subprocess.Popen(backend_argv(kind, storage, sock, shm, vmig_blk), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        procs.append((p, shm))
        try:
            wait_socket(sock, p)
        except blkenv.Fail as e:
            print("  %s %s: %s" % (kind, storage, e), flush=True)
            continue
        up[kind] = (p, sock)
    return up


def one_run(load_bin, proc, sock, read_pct, qd, hold=0):
    argv = [load_bin, "--socket", sock, "--qd", str(qd), "--read-pct", str(read_pct),
            "--seconds", str(SECONDS), "--pid", str(proc.pid)]
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
        if not any(selected(storage, w[0]) for w in WORKLOADS):
            continue
        procs = []
        try:
            up = start_backends(storage, load_bin, vmig_blk, tmp, procs)
            for wname, read_pct, qd in WORKLOADS:
                if not selected(storage, wname):
                    continue
                by_kind = results.setdefault((storage, wname), {k: [] for k in KINDS})
                for i in range(RUNS):
                    order = KINDS[i % len(KINDS):] + KINDS[:i % len(KINDS)]
                    for kind in order:
                        if kind not in up:
                            by_kind[kind].append({"error": "back-end not running"})
                            continue
                        res, line = one_run(load_bin, up[kind][0], up[kind][1], read_pct, qd)
                        by_kind[kind].append(res)
                        print("  %-12s %-8s %-18s %s" % (kind, storage, wname, line),
                              flush=True)
            if storage == "null":
                # CPU of a connected but idle back-end, after a short QD1 run.
                for kind in up:
                    res, line = one_run(load_bin, up[kind][0], up[kind][1], 100, 1, IDLE_S)
                    idle[kind] = res.get("idle_backend_cpu_pct")
                    print("  %-12s idle after I/O: %s" % (kind, line), flush=True)
        finally:
            for p, shm in procs:
                p.kill()
                p.wait()
                if shm:
                    os.unlink(shm)
    return results, idle


def med(runs, key):
    vals = [float(r[key]) for r in runs if key in r]
    return statistics.median(vals) if vals else None


def throughput_table(results):
    rows = ["| storage | workload | back-end | IOPS (median) | IOPS of each run (k) | p50 µs | "
            "p99 µs | back-end CPU µs/IO | vs best qsd |",
            "|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for (storage, wname), by_kind in results.items():
        q_best = max([m for m in (med(by_kind.get(k, []), "iops") for k in KINDS[1:])
                      if m is not None] or [0])
        for kind in KINDS:
            runs = by_kind.get(kind, [])
            iops = med(runs, "iops")
            errs = [r["error"] for r in runs if "error" in r]
            if iops is None:
                rows.append("| %s | %s | %s | failed: %s | | | | | |" %
                            (storage, wname, kind, errs[0].replace("|", "/") if errs else "?"))
                continue
            each = "/".join("%.0f" % (float(r["iops"]) / 1000) if "iops" in r else "err"
                            for r in runs)
            ratio = ""
            if kind == "vmig-blk" and q_best:
                ratio = "%.2fx" % (iops / q_best)
                ratios.append((storage, wname, iops / q_best))
            rows.append("| %s | %s | %s | %.0f | %s | %.1f | %.1f | %.2f | %s |" %
                        (storage, wname, kind, iops, each, med(runs, "p50_us"),
                         med(runs, "p99_us"), med(runs, "backend_cpu_us_per_io"), ratio))
    return rows, ratios


def idle_rows(idle):
    rows = ["| back-end | CPU use while connected and idle |", "|---|---|"]
    for kind in KINDS:
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


def record_text(t_rows, i_rows, below, p_rows, loads):
    env = "".join(" %s=%s" % (k, os.environ[k]) for k in
                  ("BENCH_BLK_RUNS", "BENCH_BLK_SECONDS", "BENCH_BLK_POLL_US")
                  if k in os.environ)
    return ["## vhost-user-blk: vmig-blk vs qemu-storage-daemon", "",
            "Recorded %s on %s with `%sbench/blk/run.sh BUILD_DIR --record` (each "
            "benchmark run of this repository holds `flock /tmp/vmig-bench.lock`)." %
            (time.strftime("%Y-%m-%d"), machine(), env.strip() + " " if env else ""), "",
            "### Throughput, same front-end (bench/blk/vblk-load.c)", "",
            "4 KiB random I/O on one queue, %d runs of %d s each (after 1 s warm-up) per "
            "back-end, interleaved (run i of every back-end before run i+1 of any, in a "
            "rotating order), medians; every run's IOPS is listed so the spread is "
            "visible. On this 2-core machine, shared with other jobs, single runs of the "
            "same set-up differ by up to 3x. Jobs that do not take the benchmark lock "
            "(tests, builds) may run meanwhile: the 1-minute load average was %s when the "
            "throughput part started and %s when it ended (the benchmark's own "
            "front-end and back-end account for up to 2)." %
            (RUNS, SECONDS, loads[0], loads[1]), "",
            "Back-ends and storage, the same kind on both sides:", "",
            "- `null`: vmig-blk `--null 1G` vs qsd `null-co` with `read-zeroes=off`: "
            "neither stores nor copies anything.",
            "- `ram`: vmig-blk `--ram 1G` (a memfd, allocated and mapped at start; one "
            "memcpy per I/O) vs qsd's file driver on a 1 GiB file in /dev/shm, the nearest "
            "thing qsd has to a RAM disk (data in memory, one copy per I/O).",
            "- `shm-file`: both serve a 1 GiB file in /dev/shm (vmig-blk `--file`, which "
            "uses preadv/pwritev on tmpfs; qsd file driver).",
            "- qsd is tuned as a user would: `aio=io_uring`, `cache.direct=off` (tmpfs has "
            "no O_DIRECT). `qsd` runs the export in its main loop (no polling); "
            "`qsd-iothread` in an iothread with `poll-max-ns=%d`, the same polling budget "
            "as vmig-blk's `--poll-us %d` (the default). The ratio is against the better "
            "of the two qsd medians." % (POLL_US * 1000, POLL_US), "",
            "CPU is the back-end process's user+system time from /proc/PID/stat divided by "
            "I/Os. A polling back-end spends its poll window spinning, so at QD1 its CPU per "
            "I/O is a whole core divided by IOPS, not the cost of an I/O.", ""] + t_rows + [
            "", "Cases below 2x the best qsd: %s." % ("; ".join(below) or "none"), "",
            "### CPU of an idle back-end", "",
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
    i_rows = idle_rows(idle)
    print("\n".join(t_rows + [""] + i_rows))
    below = ["%s %s %.2fx" % r for r in ratios if r[2] < 2.0]
    print("cases below 2x the best qsd: %s" % ("; ".join(below) or "none"), flush=True)
    p_rows = []
    if os.environ.get("BENCH_BLK_PAUSE", "1") != "0":
        print("guest-visible pause (%d events each):" % EVENTS, flush=True)
        p_rows = pause_table(build_dir, vmig_blk is not None)
        print("\n".join(p_rows))
    subprocess.run(["rm", "-rf", tmp])
    if "--record" in sys.argv:
        record(record_text(t_rows, i_rows, below, p_rows, loads))
    return 0 if vmig_blk is not None else 1


if __name__ == "__main__":
    sys.exit(main())
