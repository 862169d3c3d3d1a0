# SPDX-License-Identifier: MIT
"""Turns the migration benchmark's raw results into the stdout table and
the markdown section of docs/benchmarks.md. Every figure is the median over
the runs of one engine, taken per column; the individual runs are listed
beside it so the spread is visible. Ratios compare medians.
"""

import os
import subprocess

import benchlib

MIB = 1 << 20

# Targets from the issue: one-channel pre-copy at least 3x QEMU's throughput,
# idle-guest downtime under 10 ms.
TARGET_X_QEMU = 3.0
TARGET_DOWNTIME_MS = 10.0

COLUMNS = [
    # key, header, format
    ("total_s", "total s", "%.2f"),
    ("ram_gbps", "Gbit/s", "%.2f"),
    ("wire_gbps", "wire Gbit/s", "%.2f"),
    ("downtime_ms", "downtime ms", "%.0f"),
    ("src_cpu_s", "src CPU s", "%.2f"),
    ("dst_cpu_s", "dst CPU s", "%.2f"),
]

ORDER = ["raw", "qemu", "vmig"]


def git_commit(path):
    try:
        out = subprocess.run(["git", "-C", path, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _fmt(fmt, v):
    return "-" if v is None else fmt % v


def _columns(sc):
    return COLUMNS + list(sc.extra_columns)


def _medians(entry, sc=None):
    runs = entry.get("runs", [])
    cols = _columns(sc) if sc else COLUMNS
    return {k: benchlib.median([r.get(k) for r in runs]) for k, _, _ in cols}


def _ratio(a, b):
    return a / b if a and b else None


def _rows(res, sc):
    """(key, label, medians or None, status text) per engine, raw first."""
    rows = []
    for key in ORDER + sorted(k for k in res if k not in ORDER):
        if key not in res:
            continue
        e = res[key]
        if e.get("pending"):
            rows.append((key, e["label"], None, "pending: " + e["pending"]))
        elif not e["runs"]:
            rows.append((key, e["label"], None, "failed: " + "; ".join(e["errors"][:1])))
        else:
            status = "%d/%d runs" % (len(e["runs"]), len(e["runs"]) + len(e["errors"]))
            rows.append((key, e["label"], _medians(e, sc), status))
    return rows


def _targets(res, sc):
    """Lines stating whether vmig met the issue's targets, or why unknown."""
    if not sc.has_targets:
        return []
    med = {k: _medians(e) for k, e in res.items() if e.get("runs")}
    if "vmig" not in med:
        return ["targets: not evaluated (no vmig result)"]
    lines = []
    x = _ratio(med["vmig"]["ram_gbps"], med.get("qemu", {}).get("ram_gbps"))
    if x is None:
        lines.append("throughput target (>= %.0fx QEMU): not evaluated (no QEMU result)"
                     % TARGET_X_QEMU)
    else:
        lines.append("throughput target (>= %.0fx QEMU): %.2fx -> %s" %
                     (TARGET_X_QEMU, x, "met" if x >= TARGET_X_QEMU else "NOT met"))
    d = med["vmig"]["downtime_ms"]
    lines.append("downtime target (< %.0f ms): %.1f ms -> %s" %
                 (TARGET_DOWNTIME_MS, d, "met" if d < TARGET_DOWNTIME_MS else "NOT met"))
    return lines


def print_tables(meta, scenarios, results):
    """Prints one table per scenario; returns 0 ok, 1 if a run failed, 2 if pending."""
    status = 0
    for sc in scenarios:
        res = results[sc.key]
        print()
        print("%s, %d MiB idle guest filled with random data, median of %d run(s)" %
              (sc.title, meta["mem_bytes"] // MIB, meta["runs"]))
        cols = _columns(sc)
        head = "%-22s" % "engine" + "".join("%13s" % h for _, h, _ in cols)
        head += "%9s%9s  %s" % ("x QEMU", "x raw", "runs")
        print(head)
        raw = _medians(res["raw"]) if res["raw"]["runs"] else {}
        qemu = _medians(res["qemu"]) if res.get("qemu", {}).get("runs") else {}
        for key, label, med, st in _rows(res, sc):
            if med is None:
                print("%-22s  %s" % (label, st))
                continue
            line = "%-22s" % label + "".join("%13s" % _fmt(f, med[k]) for k, _, f in cols)
            xq = _ratio(med["ram_gbps"], qemu.get("ram_gbps")) if key != "raw" else None
            xr = _ratio(med["ram_gbps"], raw.get("ram_gbps"))
            line += "%9s%9s  %s" % (_fmt("%.2f", xq), _fmt("%.2f", xr), st)
            print(line)
        mc = benchlib.median([r.get("memcpy_gbytes_per_s") for r in res["raw"]["runs"]])
        if mc:
            print("memcpy: %.1f GB/s" % mc)
        for t in _targets(res, sc):
            print(t)
        for e in res.values():
            if e.get("errors"):
                status = 1
            elif e.get("pending") and status == 0:
                status = 2
    return status


def _md_table(res, sc):
    cols = _columns(sc)
    raw = _medians(res["raw"]) if res["raw"]["runs"] else {}
    qemu = _medians(res["qemu"]) if res.get("qemu", {}).get("runs") else {}
    out = ["| engine | " + " | ".join(h for _, h, _ in cols) + " | x QEMU | x raw |",
           "|---" * (len(cols) + 3) + "|"]
    for key, label, med, st in _rows(res, sc):
        if med is None:
            out.append("| %s | %s |" % (label, " | ".join([st] + [""] * (len(cols) + 1))))
            continue
        cells = [_fmt(f, med[k]) for k, _, f in cols]
        xq = _ratio(med["ram_gbps"], qemu.get("ram_gbps")) if key != "raw" else None
        xr = _ratio(med["ram_gbps"], raw.get("ram_gbps"))
        cells += [_fmt("%.2f", xq), _fmt("%.2f", xr)]
        out.append("| %s | %s |" % (label, " | ".join(cells)))
    return out


def _md_runs(res, sc):
    out = []
    for key, label, med, st in _rows(res, sc):
        runs = res[key].get("runs", [])
        if not runs:
            continue
        tot = ", ".join("%.2f" % r["total_s"] for r in runs)
        dt = ", ".join("%.0f" % r["downtime_ms"] for r in runs if "downtime_ms" in r)
        line = "- %s: total s %s" % (label, tot)
        if dt:
            line += "; downtime ms %s" % dt
        line += "; host CPU busy before start %s" % ", ".join(
            "%.0f%%" % (100 * r["host_busy"]) for r in runs if r.get("host_busy") is not None)
        if any(r.get("foreign_cpu_s") is not None for r in runs):
            line += "; CPU s used by other processes during the measurement %s" % ", ".join(
                "%.1f" % r["foreign_cpu_s"] for r in runs if r.get("foreign_cpu_s") is not None)
        lim = runs[0].get("downtime_limit_ms")
        if lim is not None:
            line += "; downtime-limit %s ms" % lim
        out.append(line)
        dis = [r for r in runs if r.get("disturbed")]
        if dis:
            out.append("  - runs disturbed on every attempt (kept anyway): %d"
                       % len(dis))
        nd = len(res[key].get("discarded", []))
        if nd:
            out.append("  - %d disturbed measurement(s) discarded and measured again" % nd)
        for err in res[key].get("errors", []):
            out.append("  - failed run: %s" % err)
    return out


def markdown(meta, scenarios, results):
    """The text that goes between the migrate markers of docs/benchmarks.md."""
    gib = meta["mem_bytes"] / (1 << 30)
    out = ["## Live migration: vmig vs QEMU %s vs raw loopback TCP" % (meta["qemu_version"] or ""),
           "",
           "Recorded by `%s` (the migration part of `make bench`) on %s." %
           (meta["command"], meta["date"]),
           "Host: %s, %s CPUs, %.0f GiB RAM, Linux %s. QEMU %s (TCG). Tree: %s." %
           (meta["cpu"], meta["cpus"], meta["mem_gib"], meta["kernel"],
            meta["qemu_version"] or "?", meta["commit"] or "?"),
           ""]
    for sc in scenarios:
        res = results[sc.key]
        out.append("### %s, %.0f GiB idle guest, random contents, median of %d runs" %
                   (sc.title, gib, meta["runs"]))
        out.append("")
        out += _md_table(res, sc)
        out.append("")
        mc = benchlib.median([r.get("memcpy_gbytes_per_s") for r in res["raw"]["runs"]])
        if mc:
            out.append("memcpy on this host: %.1f GB/s." % mc)
            out.append("")
        out += ["- " + t for t in _targets(res, sc)]
        out.append("")
        out.append("Individual runs:")
        out.append("")
        out += _md_runs(res, sc)
        out.append("")
    out += METHOD_TEXT.format(gib=gib, size=meta["mem_bytes"]).split("\n")
    return "\n".join(out)


METHOD_TEXT = """### How it is measured

- Guest RAM of every engine is filled from one file of {size} bytes ({gib:.0f} GiB) of
  pseudo-random data (xoshiro256**, fixed seed, written once by
  `bench/migrate/fill_random.c` and cached; `BENCH_FILL_FILE` picks the path). It
  defeats zero-page detection and compression, so every engine has to move every byte.
- QEMU source: `-accel tcg -machine pc,memory-backend=mem -object
  memory-backend-file,...,mem-path=FILE,prealloc=on,share=off -nodefaults -display none`.
  `share=off` gives the guest a private copy of the file. The guest is kept idle by
  having no boot device: SeaBIOS finds nothing to boot and halts the vCPU for good (no
  reboot; checked over 90 s: same instruction pointer, halted, the QEMU process uses
  about 0.6% of a core for timers). So the guest is running, not paused, when
  migration starts, and QEMU has to stop it for switch-over. QEMU destination: the same
  with `memory-backend-ram`, `-incoming defer -S`.
- vmig source: `vmig-vm --mem SIZE --vcpus 1 --workload idle --fill FILE`; destination
  `vmig-vm --mem SIZE --vcpus 1 --incoming defer -S`.
- Both engines are driven by the same QMP sequence: `migrate-incoming` on the
  destination; `migrate-set-parameters` `max-bandwidth` on the source (QEMU: 100 GiB/s,
  as its default is 128 MiB/s; vmig: 0, which means unlimited there); `migrate`; then
  `query-migrate` every 50 ms until `completed`. All other parameters keep their
  defaults (the `downtime-limit` each engine used is listed with the runs).
- total s and downtime ms are the source's own `total-time` and `downtime`.
  Gbit/s is guest RAM size / total time; wire Gbit/s is `ram.transferred` / total time.
- CPU s is utime + stime of each whole process from `/proc/PID/stat`, from just
  before `migrate` until the source (src) or the destination (dst) reports `completed`.
- Each migration is checked: 64 MiB of destination RAM (`pmemsave`) must equal the fill
  file, and the destination must reach `running` after `cont`.
- raw TCP: `bench/migrate/tcp_raw.c` sends the same file from a populated read-only
  mapping over one loopback TCP connection to a reader that discards into a 4 MiB
  buffer; two threads, CPU per thread. It is the ceiling for one channel. One unmeasured
  1 GiB transfer warms the path up before the first run.
- Per-thread CPU of both processes (sampled every 50 ms while migrating) and the CPU
  time other processes used meanwhile are kept in `bench/results/*/results.json`;
  `BENCH_PERF_DIR=DIR` also profiles both sides of each migration with `perf record -g`.
- Runs are interleaved (raw, QEMU, vmig, raw, ...) and each VM pair is torn down before
  the next starts. The host is shared, so before each measurement the harness waits (up
  to `BENCH_QUIET_WAIT` s) until all CPUs together are at most `BENCH_QUIET_BUSY` busy
  over one second; the busy share it saw is listed with the runs. A measurement during
  which other processes used more than `BENCH_MAX_FOREIGN` CPUs on average (host busy
  time from `/proc/stat` minus the measured processes' own CPU) is discarded and taken
  again, up to `BENCH_RETRIES` times.
- Figures are per-column medians; x QEMU and x raw compare Gbit/s.
- Further scenarios run with `BENCH_SCENARIOS` (comma-separated): `multifd-4` (4 multifd
  channels) and `postcopy` (capability `postcopy-ram`, `migrate-start-postcopy` as soon
  as the source is active; blocktime is the destination's `postcopy-blocktime`).
"""
