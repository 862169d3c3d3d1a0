#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vhost-user-blk benchmark: vmig-blk against qemu-storage-daemon 7.2.

Part 1, throughput: vblk-load (our own front-end) drives each back-end with
the same 4 KiB random request stream at the same queue depth. Two pairings,
each with the same kind of storage on both sides: a tmpfs file in /dev/shm
(vmig-blk --file, qsd's file driver with aio=io_uring) and memory-only
(vmig-blk --ram, qsd's null-co). Several runs each; medians are reported.

Part 2, guest-visible pause: a Linux guest under QEMU (TCG) writes and
verifies O_DIRECT blocks while the back-end is killed with SIGKILL and
restarted 1 s later (vmig-blk, and qsd for reference), or live-upgraded
(vmig-blk). The pause is the longest gap between two completed guest I/Os
after each event, as the guest itself measured it.

Usage: bench_blk.py BUILD_DIR VBLK_LOAD [--record]
Env: BENCH_BLK_RUNS (3), BENCH_BLK_SECONDS (5), BENCH_BLK_EVENTS (3).
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

RUNS = int(os.environ.get("BENCH_BLK_RUNS", "3"))
SECONDS = int(os.environ.get("BENCH_BLK_SECONDS", "5"))
EVENTS = int(os.environ.get("BENCH_BLK_EVENTS", "3"))
DISK_BYTES = 1 << 30
WORKLOADS = [  # (name, read percent, queue depth)
    ("randread QD1", 100, 1),
    ("randread QD32", 100, 32),
    ("randwrite QD32", 0, 32),
    ("randrw 70/30 QD32", 70, 32),
]


def backend_argv(kind, storage, sock, shm_file, vmig_blk):
    if kind == "vmig-blk":
        src = ["--ram", "1G"] if storage == "memory" else ["--file", shm_file]
        return [vmig_blk, "--socket", sock, "--quiet"] + src
    if storage == "memory":
        dev = ["--blockdev", "driver=null-co,node-name=disk,size=%d" % DISK_BYTES]
    else:
        dev = ["--blockdev", "driver=file,node-name=f,filename=%s,aio=io_uring" % shm_file,
               "--blockdev", "driver=raw,node-name=disk,file=f"]
    return ["qemu-storage-daemon"] + dev + [
        "--export", "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,"
        "addr.path=%s,writable=on" % sock]


def wait_socket(path, proc, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise blkenv.Fail("back-end exited at start")
        time.sleep(0.02)
    raise blkenv.Fail("back-end socket did not appear")


def parse_kv(line):
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


def throughput(load_bin, vmig_blk, tmp):
    """Returns {(storage, workload): {kind: [result dicts]}}."""
    results = {}
    for storage in ("shm-file", "memory"):
        for kind in ("vmig-blk", "qsd"):
            if kind == "vmig-blk" and vmig_blk is None:
                continue  # reported as failed in the table
            sock = os.path.join(tmp, "%s-%s.sock" % (kind, storage))
            shm = tempfile.mkstemp(prefix="vblk-bench.", dir="/dev/shm")[1]
            with open(shm, "wb") as f:
                f.truncate(DISK_BYTES)
            log = open(os.path.join(tmp, "%s-%s.log" % (kind, storage)), "wb")
            p = subprocess.Popen(backend_argv(kind, storage, sock, shm, vmig_blk),
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_socket(sock, p)
                for wname, read_pct, qd in WORKLOADS:
                    for _ in range(RUNS):
                        r = subprocess.run([load_bin, "--socket", sock, "--qd", str(qd),
                                            "--read-pct", str(read_pct), "--seconds",
                                            str(SECONDS), "--pid", str(p.pid)],
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           timeout=SECONDS + 60)
                        out = r.stdout.decode(errors="replace").strip()
                        res = parse_kv(out) if r.returncode == 0 else {"error": out[-200:]}
                        results.setdefault((storage, wname), {}).setdefault(kind, []).append(res)
                        print("  %-9s %-8s %-18s %s" % (kind, storage, wname, out), flush=True)
            finally:
                p.kill()
                p.wait()
                log.close()
                os.unlink(shm)
    return results


def med(runs, key):
    vals = [float(r[key]) for r in runs if key in r]
    return statistics.median(vals) if vals else None


def throughput_table(results):
    rows = ["| storage | workload | back-end | IOPS (median) | p50 µs | p99 µs | "
            "back-end CPU µs/IO | IOPS vs qsd |", "|---|---|---|---|---|---|---|---|"]
    for (storage, wname), by_kind in results.items():
        q_iops = med(by_kind.get("qsd", []), "iops")
        for kind in ("vmig-blk", "qsd"):
            runs = by_kind.get(kind, [])
            iops = med(runs, "iops")
            errs = [r["error"] for r in runs if "error" in r]
            if iops is None:
                rows.append("| %s | %s | %s | failed: %s | | | | |" %
                            (storage, wname, kind, errs[0].replace("|", "/") if errs else "?"))
                continue
            ratio = "%.2fx" % (iops / q_iops) if q_iops and kind == "vmig-blk" else ""
            rows.append("| %s | %s | %s | %.0f | %.1f | %.1f | %.2f | %s |" %
                        (storage, wname, kind, iops, med(runs, "p50_us"), med(runs, "p99_us"),
                         med(runs, "backend_cpu_us_per_io"), ratio))
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


def main():
    if len(sys.argv) < 3:
        raise SystemExit("usage: bench_blk.py BUILD_DIR VBLK_LOAD [--record]")
    build_dir, load_bin = os.path.abspath(sys.argv[1]), sys.argv[2]
    vmig_blk = blkenv.find_vmig_blk(build_dir)
    if vmig_blk is None:
        print("bench_blk: no vmig-blk in %s: measuring qemu-storage-daemon only" % build_dir,
              file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="vblk-bench.")
    print("throughput (%d runs x %d s each):" % (RUNS, SECONDS), flush=True)
    t_rows = throughput_table(throughput(load_bin, vmig_blk, tmp))
    print("\n".join(t_rows))
    print("guest-visible pause (%d events each):" % EVENTS, flush=True)
    p_rows = pause_table(build_dir, vmig_blk is not None)
    print("\n".join(p_rows))
    subprocess.run(["rm", "-rf", tmp])
    if "--record" in sys.argv:
        record(["## vhost-user-blk: vmig-blk vs qemu-storage-daemon", "",
                "Recorded %s on %s with `bench/blk/run.sh BUILD_DIR --record`." %
                (time.strftime("%Y-%m-%d"), machine()), "",
                "### Throughput, same front-end (bench/blk/vblk-load.c)", "",
                "4 KiB random I/O on one queue, %d runs of %d s (after 1 s warm-up), "
                "medians. `shm-file`: both back-ends serve a 1 GiB file in /dev/shm "
                "(qsd: file driver, aio=io_uring). `memory`: vmig-blk `--ram 1G` vs qsd "
                "`null-co` (which does no copy at all, so it flatters qsd). CPU is the "
                "back-end process's user+system time from /proc/PID/stat divided by I/Os. "
                "On a 2-core machine shared with other jobs single runs vary by up to 3x; "
                "the script prints every run, so look at the spread before trusting a ratio."
                % (RUNS, SECONDS), ""] + t_rows +
               ["", "### Guest-visible I/O pause (QEMU 7.2 TCG, Linux 6.1 guest)", "",
                "The guest writes and verifies 4 KiB O_DIRECT blocks at queue depth 1; the "
                "pause is the longest gap between two completed guest I/Os after each event "
                "(gaps under 10 ms are not reported by the guest, shown as 0). The "
                "daemon-measured pause is what `vmig-blk upgrade` prints. The guest figure is "
                "the largest gap in the 5 s after the event, so it is bounded below by the "
                "scheduling noise shown in the notes (largest gap in a quiet 3 s window).",
                ""] + p_rows)
    return 0 if vmig_blk is not None else 1


if __name__ == "__main__":
    sys.exit(main())
