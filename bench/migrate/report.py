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

# Pre-copy targets: ahead of QEMU (a scenario may ask more, or a share of
# the raw stream: target_x_raw), idle-guest downtime under 10 ms.
TARGET_X_QEMU = 1.0
TARGET_DOWNTIME_MS = 10.0
# Post-copy of the busy guest: beat QEMU on total time and blocktime, median
# page-request latency under 100 us, downtime under 5 ms.
TARGET_PC_P50_US = 100.0
TARGET_PC_DOWNTIME_MS = 5.0
DEFAULT_RATIOS = [("x QEMU", "ram_gbps", "qemu"), ("x raw", "ram_gbps", "raw")]

COLUMNS = [
    # key, header, format
    ("total_s", "total s", "%.2f"),
    ("ram_gbps", "Gbit/s", "%.2f"),
    ("wire_gbps", "wire Gbit/s", "%.2f"),
    ("downtime_ms", "downtime ms", "%.0f"),
    ("src_cpu_s", "src CPU s", "%.2f"),
    ("dst_cpu_s", "dst CPU s", "%.2f"),
]

ORDER = ["raw", "qemu", "qemu-preempt", "qemu-tls", "vmig", "vmig-tls"]


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
    if getattr(sc, "columns", None):
        return list(sc.columns)
    return COLUMNS + list(sc.extra_columns)


def _ratio_defs(sc):
    return getattr(sc, "ratios", None) or DEFAULT_RATIOS


def _ratio_cells(res, sc, key, med):
    """One ratio per _ratio_defs entry: this engine's median over the base's."""
    cells = []
    for _, metric, base in _ratio_defs(sc):
        b = res.get(base, {})
        bmed = _medians(b, sc) if b.get("runs") else {}
        if key == "raw" and base != "raw":
            cells.append(None)
        else:
            cells.append(_ratio(med.get(metric), bmed.get(metric)))
    return cells


def _guest_text(sc, meta):
    text = getattr(sc, "guest_text", None)
    if text:
        return text
    return "%d MiB idle guest filled with random data" % (meta["mem_bytes"] // MIB)


def _medians(entry, sc=None):
    runs = entry.get("runs", [])
    cols = _columns(sc) if sc else COLUMNS
    return {k: benchlib.median([r.get(k) for r in runs]) for k, _, _ in cols}


def _ratio(a, b):
    return a / b if a is not None and b else None


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
    if getattr(sc, "section", None) in ("postcopy", "postcopy-multifd"):
        return _postcopy_targets(res, sc)
    if getattr(sc, "key", "") == "precopy-write-heavy":
        return _write_heavy_targets(res, sc)
    if getattr(sc, "pairs", None):
        return _pair_lines(res, sc.pairs)
    if not sc.has_targets:
        return []
    med = {k: _medians(e) for k, e in res.items() if e.get("runs")}
    if "vmig" not in med:
        return ["targets: not evaluated (no vmig result)"]
    lines = []
    want = getattr(sc, "target_x_qemu", TARGET_X_QEMU)
    for base, label, want in (("qemu", "QEMU", want),
                              ("raw", "the raw stream", getattr(sc, "target_x_raw", None))):
        if want is None:
            continue
        x = _ratio(med["vmig"]["ram_gbps"], med.get(base, {}).get("ram_gbps"))
        if x is None:
            lines.append("throughput target (>= %.2fx %s): not evaluated (no result)"
                         % (want, label))
        else:
            lines.append("throughput target (>= %.2fx %s): %.2fx -> %s" %
                         (want, label, x, _met(x >= want)))
    d = med["vmig"]["downtime_ms"]
    lines.append("downtime target (< %.0f ms): %.1f ms -> %s" %
                 (TARGET_DOWNTIME_MS, d, "met" if d < TARGET_DOWNTIME_MS else "NOT met"))
    return lines


def _met(ok):
    return "met" if ok else "NOT met"


def _write_heavy_targets(res, sc):
    """Every run within its downtime-limit, and ahead of QEMU in total time."""
    lines = []
    for key in ("vmig", "qemu"):
        runs = res.get(key, {}).get("runs", [])
        if not runs:
            lines.append("%s: no result" % key)
            continue
        over = [r for r in runs if r.get("downtime_limit_ms") is not None and
                r["downtime_ms"] > r["downtime_limit_ms"]]
        lines.append("%s: %d of %d runs within downtime-limit (downtime %s ms)%s" % (
            res[key]["label"], len(runs) - len(over), len(runs),
            ", ".join("%.0f" % r["downtime_ms"] for r in runs),
            " -> met" if key == "vmig" and not over else
            " -> NOT met" if key == "vmig" else ""))
    v, q = (res.get(k, {}).get("runs", []) for k in ("vmig", "qemu"))
    if v and q:
        vt = [r["total_s"] for r in v]
        qt = [r["total_s"] for r in q]
        lines.append("total time: vmig %.2f to %.2f s, QEMU %.2f to %.2f s; every vmig run "
                     "ahead of the fastest QEMU run -> %s"
                     % (min(vt), max(vt), min(qt), max(qt), _met(max(vt) < min(qt))))
    return lines


def _postcopy_targets(res, sc):
    med = {k: _medians(e, sc) for k, e in res.items() if e.get("runs")}
    if "vmig" not in med:
        return ["targets: not evaluated (no vmig result)"]
    v = med["vmig"]
    lines = []
    for base in ("qemu", "qemu-preempt"):
        if base not in med:
            lines.append("targets vs %s: not evaluated (no result)" % base)
            continue
        q, label = med[base], res[base]["label"]
        for metric, what, unit in (("total_s", "total time", "%.2f s"),
                                   ("blocktime_ms", "blocktime", "%.0f ms"),
                                   ("vcpu_blocktime_sum_ms", "per-vCPU blocktime sum", "%.0f ms")):
            if v.get(metric) is None or q.get(metric) is None:
                lines.append("%s below %s: not evaluated (not reported)" % (what, label))
                continue
            lines.append("%s below %s: %s vs %s -> %s" % (
                what, label, unit % v[metric], unit % q[metric],
                _met(v[metric] < q[metric])))
    p50 = v.get("latency_p50_us")
    vruns = res["vmig"]["runs"]
    calm = sum(1 for r in vruns if r.get("x_vmig_postcopy_faults") == 0)
    if p50 is None and vruns and calm == len(vruns):
        lines.append("median page-request latency < %.0f us: no vCPU faulted on a missing "
                     "page in any of the %d runs -> met" % (TARGET_PC_P50_US, calm))
    else:
        lines.append("median page-request latency < %.0f us: %s%s -> %s" % (
            TARGET_PC_P50_US, _fmt("%.0f us", p50),
            " (median over %d of %d runs; in the others no vCPU faulted)"
            % (len(vruns) - calm, len(vruns)) if calm else "",
            "not evaluated" if p50 is None else _met(p50 < TARGET_PC_P50_US)))
    d = v.get("downtime_ms")
    lines.append("downtime < %.0f ms: %s -> %s" % (
        TARGET_PC_DOWNTIME_MS, _fmt("%.1f ms", d),
        "not evaluated" if d is None else _met(d < TARGET_PC_DOWNTIME_MS)))
    for key in ("vmig", "qemu", "qemu-preempt"):
        runs = res.get(key, {}).get("runs", [])
        bad = [r.get("guest_bad_pages") for r in runs]
        if runs:
            lines.append("%s destination guest self-check: bad pages per run %s -> %s" % (
                res[key]["label"], ", ".join(str(b) for b in bad),
                "clean" if all(b == 0 for b in bad) else "NOT clean"))
    return lines


def _paired_ratios(res, key, base, metric="ram_gbps"):
    """key / base for each round both were measured in (runs of one round
    ran back to back, so drift of the machine hits both alike)."""
    a = {r.get("run"): r.get(metric) for r in res.get(key, {}).get("runs", [])}
    b = {r.get("run"): r.get(metric) for r in res.get(base, {}).get("runs", [])}
    return [a[i] / b[i] for i in sorted(k for k in a if k is not None)
            if b.get(i) and a[i] is not None]


def _pair_lines(res, pairs):
    """Ratios of throughput between the engines a scenario pairs up (TLS or
    not, zero-copy or not): of medians, and the median of the ratios of each
    round."""
    med = {k: _medians(e) for k, e in res.items() if e.get("runs")}
    lines = []
    for key, base, what in pairs:
        if key not in med or base not in med:
            lines.append("%s: not evaluated (no result for %s)" %
                         (what, key if key not in med else base))
            continue
        paired = _paired_ratios(res, key, base)
        lines.append("%s throughput: %.2fx (medians %.2f / %.2f Gbit/s); per round %s, "
                     "median %s" % (what, _ratio(med[key]["ram_gbps"], med[base]["ram_gbps"]),
                                    med[key]["ram_gbps"], med[base]["ram_gbps"],
                                    ", ".join("%.2f" % x for x in paired) or "-",
                                    _fmt("%.2fx", benchlib.median(paired))))
    return lines


def print_tables(meta, scenarios, results):
    """Prints one table per scenario; returns 0 ok, 1 if a run failed, 2 if pending."""
    status = 0
    for sc in scenarios:
        res = results[sc.key]
        print()
        print("%s, %s, median of %d run(s)" % (sc.title, _guest_text(sc, meta), meta["runs"]))
        cols = _columns(sc)
        width = max(13, max(len(h) + 2 for _, h, _ in cols + _ratio_defs(sc)))
        head = "%-22s" % "engine" + "".join("%*s" % (width, h) for _, h, _ in cols)
        head += "".join("%*s" % (width, h) for h, _, _ in _ratio_defs(sc)) + "  runs"
        print(head)
        for key, label, med, st in _rows(res, sc):
            if med is None:
                print("%-22s  %s" % (label, st))
                continue
            line = "%-22s" % label + "".join("%*s" % (width, _fmt(f, med[k]))
                                             for k, _, f in cols)
            line += "".join("%*s" % (width, _fmt("%.2f", x))
                            for x in _ratio_cells(res, sc, key, med))
            print(line + "  " + st)
        mc = benchlib.median([r.get("memcpy_gbytes_per_s")
                              for r in res.get("raw", {}).get("runs", [])])
        if mc:
            print("memcpy: %.1f GB/s" % mc)
        for t in _targets(res, sc):
            print(t)
        for e in res.values():
            if e.get("errors") or any(r.get("guest_bad_pages") for r in e.get("runs", [])):
                status = 1
            elif e.get("pending") and status == 0:
                status = 2
    return status


def _md_table(res, sc):
    cols = _columns(sc)
    rdefs = _ratio_defs(sc)
    out = ["| engine | " + " | ".join(h for _, h, _ in cols) + " | " +
           " | ".join(h for h, _, _ in rdefs) + " |",
           "|---" * (len(cols) + len(rdefs) + 1) + "|"]
    na = getattr(sc, "not_reported", {})
    for key, label, med, st in _rows(res, sc):
        if med is None:
            out.append("| %s | %s |" % (label, " | ".join([st] + [""] * (len(cols) + len(rdefs) - 1))))
            continue
        cells = [na[k] if med[k] is None and k in na and key.startswith("qemu")
                 else _fmt(f, med[k]) for k, _, f in cols]
        cells += [_fmt("%.2f", x) for x in _ratio_cells(res, sc, key, med)]
        out.append("| %s | %s |" % (label, " | ".join(cells)))
    return out


def _md_runs(res, sc):
    out = []
    for key, label, med, st in _rows(res, sc):
        runs = res[key].get("runs", [])
        if not runs:
            continue
        keys = getattr(sc, "run_columns", None) or ["total_s", "downtime_ms"]
        fmts = {k: (h, f) for k, h, f in _columns(sc) + COLUMNS}
        parts = []
        for k in keys:
            vals = [r.get(k) for r in runs]
            if all(v is None for v in vals):
                continue
            h, f = fmts[k]
            parts.append("%s %s" % (h, ", ".join(_fmt(f, v) for v in vals)))
        line = "- %s: %s" % (label, "; ".join(parts))
        checks = [r["guest_check"] for r in runs if r.get("guest_check")]
        line += "; host CPU busy before start %s" % ", ".join(
            "%.0f%%" % (100 * r["host_busy"]) for r in runs if r.get("host_busy") is not None)
        if any(r.get("foreign_cpu_s") is not None for r in runs):
            line += "; CPU s used by other processes during the measurement %s" % ", ".join(
                "%.1f" % r["foreign_cpu_s"] for r in runs if r.get("foreign_cpu_s") is not None)
        lim = runs[0].get("downtime_limit_ms")
        if lim is not None:
            line += "; downtime-limit %s ms" % lim
        out.append(line)
        for c in checks:
            out.append("  - destination guest after the run: %s" % c)
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
    two = meta.get("placement") == "two-host"
    out = ["## Live migration%s: vmig vs QEMU %s vs %s" %
           (", two-host model" if two else "", meta["qemu_version"] or "",
            "one raw TCP stream over the veth" if two else "raw loopback TCP"),
           "",
           "Recorded by `%s` (the migration part of `make bench`) on %s." %
           (meta["command"], meta["date"]),
           "Host: %s, %s CPUs, %.0f GiB RAM, Linux %s. QEMU %s (TCG). Tree: %s." %
           (meta["cpu"], meta["cpus"], meta["mem_gib"], meta["kernel"],
            meta["qemu_version"] or "?", meta["commit"] or "?"),
           ""]
    for sc in scenarios:
        res = results[sc.key]
        out.append("### %s, %s, median of %d runs" % (sc.title, _guest_text(sc, meta),
                                                     meta["runs"]))
        out.append("")
        out += _md_table(res, sc)
        out.append("")
        mc = benchlib.median([r.get("memcpy_gbytes_per_s")
                              for r in res.get("raw", {}).get("runs", [])])
        if mc:
            out.append("memcpy on this host: %.1f GB/s." % mc)
            out.append("")
        out += ["- " + t for t in _targets(res, sc)]
        out.append("")
        out.append("Individual runs:")
        out.append("")
        out += _md_runs(res, sc)
        out.append("")
    if two:
        out += TWO_HOST_TEXT.split("\n")
    out += METHOD_TEXT.format(gib=gib, size=meta["mem_bytes"]).split("\n")
    return "\n".join(out)


def section_markdown(meta, scenarios, results, section):
    """The text between the markers of a section of docs/benchmarks.md of
    its own (SECTIONS: "tls" or "zerocopy", each engine measured with and
    without the feature side by side; "postcopy", the busy guest's access
    patterns)."""
    heading, method = SECTIONS[section]
    out = [heading % (meta["qemu_version"] or ""),
           "",
           "Recorded by `%s` on %s." % (meta["command"], meta["date"]),
           "Host: %s, %s CPUs, %.0f GiB RAM, Linux %s. QEMU %s (TCG). Tree: %s." %
           (meta["cpu"], meta["cpus"], meta["mem_gib"], meta["kernel"],
            meta["qemu_version"] or "?", meta["commit"] or "?"),
           ""]
    if meta.get("placement") == "two-host":
        out += ["Two-host model (see the migration tables: each side in its own network "
                "namespace, joined by a veth pair, each pinned to a core of its own).", ""]
    for sc in scenarios:
        res = results[sc.key]
        out.append("### %s, %s, median of %d runs" % (sc.title, _guest_text(sc, meta),
                                                     meta["runs"]))
        out.append("")
        out += _md_table(res, sc)
        out.append("")
        out += ["- " + t for t in _targets(res, sc)]
        out.append("")
        out.append("Individual runs:")
        out.append("")
        out += _md_runs(res, sc)
        out.append("")
    out += method.format(gib=meta["mem_bytes"] / (1 << 30)).split("\n")
    return "\n".join(out)


TLS_METHOD_TEXT = """### How the TLS comparison is measured

- Same guests, fill file, QMP sequence, timing, CPU accounting and checks as the
  migration benchmark above (its "How it is measured"), {gib:.0f} GiB idle guest filled
  with random data. Both destinations preallocate guest RAM (QEMU
  `memory-backend-ram,...,prealloc=on`, vmig-vm `--mem-prealloc`) before the measured
  window, to keep the first touch of each page, which on this machine costs more than the
  transfer itself, from hiding the cost of encryption. The destinations' CPU figures show
  how far that worked.
- Each engine runs twice per round, in clear and over TLS, one after the other (raw,
  QEMU, QEMU TLS, vmig, vmig TLS), and each round covers both scenarios before the next
  starts, so all four are measured under the same conditions and a deadline
  (`BENCH_DEADLINE`) shortens every scenario alike.
- TLS: x509 credentials made for the run by `tests/lib/tlscerts.py` (EC P-256 keys, one
  CA; the server cert is for localhost and 127.0.0.1). Source: `-object` (QEMU) or
  `--object` (vmig-vm) `tls-creds-x509,id=tls0,endpoint=client,dir=DIR,verify-peer=on`,
  `migrate-set-parameters` `tls-creds` `tls0` and `tls-hostname` `localhost`;
  destination: `tls-creds-x509,id=tls0,endpoint=server,dir=DIR,verify-peer=on` and
  `tls-creds` `tls0`. So both sides authenticate, and every connection (the main one and
  each multifd channel) is encrypted. Both engines use the system's GnuTLS; the CPU has
  AES-NI and VAES, and there is no kernel TLS here, so all of it runs in user space.
- x QEMU TLS and x vmig plain in the tables divide medians of Gbit/s. Below each table,
  the same ratios per round (the two runs of a round ran back to back) and their median.
"""


ZEROCOPY_METHOD_TEXT = """### How the zero-copy comparison is measured

- Same guests, fill file, QMP sequence, timing, CPU accounting and checks as the
  migration benchmark (its "How it is measured"), {gib:.0f} GiB idle guest filled with
  random data, multifd with 4 channels on both engines. Both destinations preallocate
  guest RAM, as in the TLS comparison, so that the sending side's work is what differs.
- Each engine runs twice per round, without and with the capability `zero-copy-send`
  (QEMU's name, set on both sides), one after the other (raw, QEMU, QEMU zero-copy, vmig,
  vmig zero-copy).
- missed zero-copy syncs is `dirty-sync-missed-zero-copy` from the source's final
  `query-migrate`. Both engines count one per multifd channel per flush in which the
  kernel copied every zero-copy send anyway; QEMU 7.2 flushes at the end of every
  iteration of its migration loop, vmig at the end of each round, so the two counts are
  not on the same scale.
- x QEMU zero-copy and x vmig plain in the tables divide medians of Gbit/s. Below each
  table, the same ratios per round and their median.
"""



TWO_HOST_TEXT = """### The two-host model

- `bench/migrate/run.sh BUILD --two-host` makes two network namespaces joined by a veth
  pair (10.231.0.1 and 10.231.0.2, MTU 1500), starts every source in the first and
  every destination in the second (`ip netns exec NS taskset -c CPU ...`), the source
  pinned to the first CPU and the destination to the second, and removes both
  namespaces at the end. So each side has a core of its own, and every byte crosses a
  network device and its softirq work, as it does between two hosts, instead of the
  loopback shortcut. The migration URI is the destination's veth address.
- The raw stream (`tcp_raw --src-netns ... --dst-netns ... --addr 10.231.0.2
  --src-cpu 0 --dst-cpu 1`) runs its sender in the source's namespace on the source's
  CPU and its receiver in the destination's on the other: the ceiling of one TCP
  stream over this link, measured the same way.
- Everything else below (guests, QMP sequence, timing, checks) is as on loopback.
"""


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
- "destination RAM preallocated" (`precopy-1ch-prealloc`): the QEMU destination gets
  `memory-backend-ram,...,prealloc=on` and the vmig destination `--mem-prealloc`, so both
  fault all guest RAM in at start-up, before QMP answers and outside the measured window.
  Without it both destinations pay for the first touch of every page during the
  migration, which on this VM costs 0.5 to 3 s per GiB (see the note after this section).
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
- `multifd-4`: capability `multifd` and `multifd-channels` 4 on both sides of both
  engines (QEMU: no compression), destinations not preallocated.
- Scenarios are chosen with `BENCH_SCENARIOS` (comma-separated; the default is
  `precopy-1ch,postcopy-wss`): also `precopy-1ch-prealloc`, `precopy-1ch-hugetlb`,
  `multifd-4`, `precopy-write-heavy` and `postcopy` (capability `postcopy-ram`,
  `migrate-start-postcopy` as soon as the source is active, idle guest; blocktime is the
  destination's `postcopy-blocktime`). The busy guest's post-copy scenarios
  (`postcopy-wss`, `postcopy-wss-stream`, `postcopy-wss-hotset`, and each with
  `-1vcpu`; `postcopy-wss-noprealloc`, `postcopy-wss-multifd-2`) are recorded in a section of their own, as are the TLS and zero-copy
  comparisons. `bench_migrate.py --render RESULTS_JSON --record DOC` rewrites the
  sections from a saved `results.json` without measuring again.
"""

POSTCOPY_WSS_TEXT = """### How the post-copy scenarios (postcopy-wss*) are measured

- Guest: 2 GiB of RAM, N vCPUs (1 or 2; `-1vcpu` in the scenario's name), a 1 GiB
  working set overwritten at 256 MiB/s in whole 4 KiB pages, in one of three patterns:
  random (uniform over the working set; `postcopy-wss`), stream (each vCPU sweeps its
  own pages of the working set in order, over and over; `postcopy-wss-stream`) and hotset
  (90% of writes to the first 1/16 of the working set, 64 MiB, the rest uniform over all
  of it; `postcopy-wss-hotset`). vmig: `vmig-vm --mem 2048M --vcpus N --workload PATTERN
  --wss 1024M --dirty-rate 256M` (source `--fill random`, destination `--incoming
  defer`). QEMU: `-accel tcg -machine pc -smp N -m 2097160K -kernel
  /boot/vmlinuz-6.1.0-*-amd64` with the initramfs of `tests/interop/guest/build.sh`
  running `tests/interop/guest/dirtier.c` with N writer threads and the same PATTERN,
  like vmig-vm's N vCPUs (same working set, pattern, rate and write size; it reports its
  achieved rate every 2 s). So that
  neither engine can skip most of RAM as zero pages, vmig's source is started with
  `--fill random` and the dirtier fills all but 48 MiB of the guest kernel's
  MemAvailable (about 780 MiB) with pseudo-random bytes once, before it starts. The RAM
  size is 2 GiB + 8 KiB because QEMU 7.2 under TCG loses dirty-page writes when RAM is a
  multiple of 256 KiB (fixed upstream in 9.0). The QEMU source is measured only once
  the guest has printed that it is dirtying and one rate report.
- Neither destination is started with `-S`: the guest runs on the destination during
  post-copy, so its vCPUs fault on pages not yet there. That is what blocktime measures.
- Both destinations preallocate guest RAM at start-up (vmig-vm `--mem-prealloc`, QEMU
  `-mem-prealloc`), before the measured window, as destinations in production often do;
  the `-noprealloc` scenario does without. QEMU 7.2 frees that memory again when
  post-copy is advised and installs every page it receives after that anew; vmig keeps
  it (pages missing at the switch are only unmapped, then placed with MINOR faults).
- Capabilities on both sides: `postcopy-ram`, `postcopy-blocktime`; "QEMU ... preempt"
  adds `postcopy-preempt` on both sides; vmig gets `postcopy-preempt` too (accepted; it
  always serves page requests on its own urgent connection). In `postcopy-wss-multifd-2`
  vmig also has `multifd` with `multifd-channels` 2, and its background push after the
  switch travels on the two data connections; QEMU 7.2 refuses `multifd` with
  `postcopy-ram` (10.1 allows it), so its rows there are plain post-copy. Parameters:
  `max-postcopy-bandwidth` 0 on both sides, `max-bandwidth` as for pre-copy. `migrate`,
  then `migrate-start-postcopy` at the first `query-migrate` poll (every 50 ms) at or
  after 1 s, or at which the source's `ram.transferred` has reached half of `ram.total`
  if that comes first (so that neither engine's pre-copy can converge before it, however
  fast the host; the run's switch time is kept in its JSON as `switch_after_s`), then
  poll until `completed` on both sides.
- total s and downtime ms: the source's `total-time` and `downtime`. page requests: the
  source's `ram.postcopy-requests`. blocktime ms: the destination's `postcopy-blocktime`
  (time during which all vCPUs waited for pages at once); vCPU blocktime sum: the sum of
  its `postcopy-vcpu-blocktime` list. latency p50/p99: vmig's
  `x-vmig-postcopy-latency-p50`/`-p99` (exact, over the last 65536 faults, from fault to
  wake-up); a run in which no vCPU faulted has no latency and is left out of the median
  (the targets line says how many such runs there were). QEMU 7.2 reports no request
  latency (its trace events could give one, but tracing itself would slow the side being
  measured), so those cells say n/a.
- CPU s covers the whole process from `migrate` until each side completes, so it
  includes the guest's own work (QEMU: TCG emulating the guest; vmig: the vCPU threads).
- After each run the destination guest must keep running and pass its own check: vmig's
  `x-vmig-query-guest` `inconsistencies` (each page's contents checked before every
  overwrite), QEMU's dirtier `bad=` count (a stamp at the start, middle and end of each
  page checked before every overwrite), read from its second progress line on the
  destination's serial console. Both are listed with the runs.
- No raw TCP row: the transfer is paced by the guest and by page requests, not by the
  link.
- On the all-vCPU blocktime: QEMU 7.2 counts time as "all vCPUs blocked" only when every
  vCPU waits on a page fault, and a halted vCPU never does. The dirtier therefore runs
  one writer thread per vCPU, as vmig-vm's workload does, so both vCPUs of each guest
  write. The guest kernel may still schedule both threads on one vCPU at times, so the
  per-vCPU blocktime sum remains the steadier comparison of how long guest code waited.
"""


POSTCOPY_MULTIFD_TEXT = """### How postcopy-wss-multifd-2 is measured

As `postcopy-wss` in the post-copy section (the same guests, pattern, switch and
columns), except that vmig has `multifd` on both sides with `multifd-channels` 2: its
pre-copy and, after the switch, its background push travel on the two data connections,
while requested pages keep the urgent connection. QEMU 7.2 refuses `multifd` together
with `postcopy-ram` (QEMU 10.1 allows it), so its rows are its plain post-copy, without
and with `postcopy-preempt`: the figures to beat with multifd on.
"""

SECTIONS = {
    "tls": ("## TLS: vmig vs QEMU %s, each in clear and over TLS", TLS_METHOD_TEXT),
    "zerocopy": ("## zero-copy-send: vmig vs QEMU %s, each with and without it",
                 ZEROCOPY_METHOD_TEXT),
    "postcopy": ("## Post-copy of a busy guest, by access pattern: vmig vs QEMU %s, "
                 "without and with postcopy-preempt", POSTCOPY_WSS_TEXT),
    "postcopy-multifd": ("## Post-copy with multifd: vmig's push on 2 data connections vs "
                         "QEMU %s post-copy", POSTCOPY_MULTIFD_TEXT),
}
