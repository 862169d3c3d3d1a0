#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Side-by-side migration benchmark: vmig-vm, QEMU and a raw TCP stream.

Each engine migrates the same idle guest, whose RAM is filled from one file
of random bytes, over loopback, driven identically over QMP (QEMU's command
names). The raw single-stream TCP transfer of the same bytes (tcp_raw) is
the ceiling. Runs are interleaved (raw, QEMU, vmig, raw, QEMU, vmig, ...) so
slow drift of the machine hits every engine alike, and each VM pair is torn
down before the next starts so peak memory stays at about three guests.

The harness is a matrix of scenarios x runtimes. A scenario says which
capabilities and parameters to set and may act while the migration runs
(post-copy switches over, for instance); a runtime says how to start a
source and a destination. Post-copy and multifd are meant to be added as
further Scenario subclasses in SCENARIOS.

Invoked by bench/migrate/run.sh, which builds tcp_raw and the fill file.
"""

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
import benchlib  # noqa: E402
from benchlib import BenchError, Qmp  # noqa: E402
import report  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
POLL_S = 0.05
VERIFY_BYTES = 64 * MIB


class Runtime:
    """How to start one engine's source and destination."""

    key = ""
    label = ""
    unlimited_bandwidth = 0

    def unavailable_reason(self):
        return None

    def src_argv(self, cfg, qmp_path):
        raise NotImplementedError

    def dst_argv(self, cfg, qmp_path):
        raise NotImplementedError


class QemuRuntime(Runtime):
    key = "qemu"
    # QEMU caps pre-copy at 128 MiB/s by default and 0 does not mean
    # "unlimited" there, so ask for far more than loopback can carry.
    unlimited_bandwidth = 100 * GIB

    def __init__(self, binary):
        self.binary = binary
        self.label = "QEMU"
        self.version = None
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
            self.version = out.split("version", 1)[1].split()[0] if "version" in out else None
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.version:
            self.label = "QEMU " + self.version

    def unavailable_reason(self):
        if not self.version:
            return "%s not runnable" % self.binary
        return None

    def _common(self, cfg, qmp_path, backend):
        mib = cfg.mem_bytes // MIB
        return [self.binary, "-accel", "tcg", "-machine", "pc,memory-backend=mem",
                "-m", "%dM" % mib, "-smp", "1", "-object", backend,
                "-nodefaults", "-display", "none", "-name", "bench,debug-threads=on",
                "-qmp", "unix:%s,server=on,wait=off" % qmp_path]

    def src_argv(self, cfg, qmp_path):
        # share=off: the guest gets a private copy, so it can never write
        # into the cached fill file; prealloc=on copies the file in before
        # QMP answers, outside the measured window. No boot device: SeaBIOS
        # reports that and halts the vCPU, which keeps the guest idle.
        backend = ("memory-backend-file,id=mem,size=%dM,mem-path=%s,prealloc=on,share=off"
                   % (cfg.mem_bytes // MIB, cfg.fill_file))
        return self._common(cfg, qmp_path, backend)

    def dst_argv(self, cfg, qmp_path):
        backend = "memory-backend-ram,id=mem,size=%dM" % (cfg.mem_bytes // MIB)
        return self._common(cfg, qmp_path, backend) + ["-incoming", "defer", "-S"]


class VmigRuntime(Runtime):
    key = "vmig"
    label = "vmig"
    unlimited_bandwidth = 0  # vmig: 0 = no rate limit

    def __init__(self, build_dir):
        self.binary = None
        for rel in ("vm/vmig-vm", "vmig-vm"):
            path = os.path.join(build_dir, rel)
            if os.access(path, os.X_OK):
                self.binary = path
                break
        self.build_dir = build_dir

    def unavailable_reason(self):
        if self.binary is None:
            return "vmig-vm not built in %s" % self.build_dir
        return None

    def src_argv(self, cfg, qmp_path):
        return [self.binary, "--mem", "%dM" % (cfg.mem_bytes // MIB), "--vcpus", "1",
                "--workload", "idle", "--fill", cfg.fill_file, "--qmp", "unix:" + qmp_path]

    def dst_argv(self, cfg, qmp_path):
        return [self.binary, "--mem", "%dM" % (cfg.mem_bytes // MIB), "--vcpus", "1",
                "--qmp", "unix:" + qmp_path, "--incoming", "defer", "-S"]


class Scenario:
    """One way of migrating. Subclasses add capabilities and in-flight actions."""

    key = ""
    title = ""
    capabilities = {}  # set on both sides before migrate-incoming/migrate
    parameters = {}    # set on both sides (QEMU wants multifd-channels on both)
    extra_columns = []  # (metric key, header, format) beyond the common ones
    has_targets = False  # the throughput/downtime targets apply

    def on_poll(self, run, info):
        """Called with each source query-migrate reply while active."""

    def extra_metrics(self, run, src_info, dst_info):
        return {}


class Precopy1ch(Scenario):
    key = "precopy-1ch"
    title = "pre-copy, one channel"
    has_targets = True


class PrecopyMultifd(Scenario):
    """Pre-copy over N multifd data channels (QEMU's names on both engines)."""

    def __init__(self, channels):
        self.key = "multifd-%d" % channels
        self.title = "pre-copy, multifd with %d channels" % channels
        self.capabilities = {"multifd": True}
        self.parameters = {"multifd-channels": channels}


class Postcopy(Scenario):
    """Post-copy, switched over as soon as the source reports "active".

    Switching at once makes (nearly) all of RAM move after switch-over,
    which is what post-copy is for with a guest too big or too busy to
    converge. Blocktime is the destination's own figure (QEMU's names).
    """

    key = "postcopy"
    title = "post-copy, switch-over as soon as active"
    capabilities = {"postcopy-ram": True, "postcopy-blocktime": True}
    extra_columns = [("blocktime_ms", "blocktime ms", "%.0f")]

    def on_poll(self, run, info):
        if not run.get("switched") and info.get("status") == "active":
            run["src"].execute("migrate-start-postcopy")
            run["switched"] = True

    def extra_metrics(self, run, src_info, dst_info):
        m = {"blocktime_ms": dst_info.get("postcopy-blocktime")}
        for k in ("postcopy-latency", "postcopy-latency-dist", "x-vmig-postcopy-requests",
                  "x-vmig-postcopy-faults"):
            if k in dst_info:
                m[k.replace("-", "_")] = dst_info[k]
        if not run.get("switched"):
            raise BenchError("migration completed before post-copy could be started")
        return m


# Scenario objects are shared by all runs: per-run state lives in the run
# dict passed to on_poll() and extra_metrics().
SCENARIOS = {s.key: s for s in (Precopy1ch(), PrecopyMultifd(4), Postcopy())}


class Config:
    def __init__(self, args):
        self.build_dir = os.path.abspath(args.build_dir)
        self.mem_bytes = args.mem_bytes
        self.fill_file = os.path.abspath(args.fill_file)
        self.runs = args.runs
        self.timeout_s = args.timeout
        self.tcp_raw = args.tcp_raw
        self.results_dir = args.results_dir
        self.quiet_busy = args.quiet_busy
        self.quiet_wait_s = args.quiet_wait
        self.retries = args.retries
        self.max_foreign = args.max_foreign
        self.perf_dir = os.environ.get("BENCH_PERF_DIR")  # optional profiling
        self.run_tag = ""


def set_caps_and_params(qmp, scenario, extra_params=None):
    if scenario.capabilities:
        caps = [{"capability": k, "state": v} for k, v in scenario.capabilities.items()]
        qmp.execute("migrate-set-capabilities", {"capabilities": caps})
    params = dict(scenario.parameters)
    params.update(extra_params or {})
    if params:
        qmp.execute("migrate-set-parameters", params)


def wait_status(qmp, want, timeout_s):
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = qmp.execute("query-status").get("status")
        if status in want:
            return status
        time.sleep(0.05)
    raise BenchError("status is %r, expected one of %s" % (status, sorted(want)))


class ThreadSampler:
    """Per-thread CPU of some processes, sampled while a migration runs.

    Migration threads often exit at completion, taking their counters with
    them, so the last value seen of each thread is kept.
    """

    def __init__(self, pids):
        self.pids = pids
        self.first = {pid: benchlib.thread_cpu_seconds(pid) for pid in pids}
        self.last = {pid: dict(v) for pid, v in self.first.items()}

    def sample(self):
        for pid in self.pids:
            self.last[pid].update(benchlib.thread_cpu_seconds(pid))

    def delta(self, pid):
        return benchlib.thread_cpu_delta(self.first[pid], self.last[pid])


def poll_until_done(qmp, timeout_s, on_poll=None):
    """Polls query-migrate until a final status; returns (info, seconds)."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    while True:
        info = qmp.execute("query-migrate")
        status = info.get("status")
        if on_poll:
            on_poll(info)
        if status in ("completed", "failed", "cancelled"):
            return info, time.monotonic() - t0
        if time.monotonic() > deadline:
            raise BenchError("migration still %r after %d s" % (status, timeout_s))
        time.sleep(POLL_S)


def verify_sample(qmp, cfg, tmpdir):
    """Dumps VERIFY_BYTES of destination RAM and compares it with the fill file.

    Guest-physical addresses below 3 GiB equal backend offsets in both
    engines, and the middle of RAM is never touched by firmware.
    """
    size = min(VERIFY_BYTES, cfg.mem_bytes // 8)
    addr = min(GIB, cfg.mem_bytes // 4)
    dump = os.path.join(tmpdir, "sample.bin")
    qmp.execute("pmemsave", {"val": addr, "size": size, "filename": dump}, timeout_s=120)
    with open(dump, "rb") as f:
        got = hashlib.sha256(f.read()).hexdigest()
    os.unlink(dump)
    with open(cfg.fill_file, "rb") as f:
        f.seek(addr)
        want = hashlib.sha256(f.read(size)).hexdigest()
    if got != want:
        raise BenchError("destination RAM at 0x%x+%d differs from the fill file" % (addr, size))


def start_perf(cfg, procs, tmpdir, pids):
    """With BENCH_PERF_DIR set, profiles each process over the migration."""
    if not cfg.perf_dir:
        return []
    os.makedirs(cfg.perf_dir, exist_ok=True)
    perfs = []
    for side, pid in pids.items():
        out = os.path.join(cfg.perf_dir, "%s-%s.data" % (cfg.run_tag, side))
        perfs.append(procs.start(["perf", "record", "-q", "-F", "999", "-g", "-p", str(pid),
                                  "-o", out], os.path.join(tmpdir, "perf-%s.log" % side)))
    time.sleep(0.5)  # let perf attach before the clock starts
    return perfs


def stop_perf(procs, perfs):
    for p in perfs:
        try:
            os.kill(p.pid, signal.SIGINT)  # perf writes its file on SIGINT
            p.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        procs.stop(p)


def migrate_once(cfg, runtime, scenario, procs, tmpdir):
    """One measured migration; returns a dict of metrics or raises BenchError."""
    need = 2 * cfg.mem_bytes + GIB
    if benchlib.mem_available_bytes() < need:
        raise BenchError("only %.1f GiB RAM available, need %.1f" %
                         (benchlib.mem_available_bytes() / GIB, need / GIB))
    src_qmp, dst_qmp = os.path.join(tmpdir, "src.qmp"), os.path.join(tmpdir, "dst.qmp")
    src = procs.start(runtime.src_argv(cfg, src_qmp), os.path.join(tmpdir, "src.log"))
    dst = procs.start(runtime.dst_argv(cfg, dst_qmp), os.path.join(tmpdir, "dst.log"))
    qs = qd = None
    try:
        qs, qd = Qmp(src_qmp, timeout_s=300), Qmp(dst_qmp, timeout_s=300)
        wait_status(qs, {"running"}, 30)
        uri = "tcp:127.0.0.1:%d" % benchlib.free_tcp_port()
        set_caps_and_params(qd, scenario)
        qd.execute("migrate-incoming", {"uri": uri})
        set_caps_and_params(qs, scenario, {"max-bandwidth": runtime.unlimited_bandwidth})
        params = qs.execute("query-migrate-parameters")
        run = {"src": qs, "dst": qd}
        busy = benchlib.wait_quiet(cfg.quiet_busy, cfg.quiet_wait_s)
        perfs = start_perf(cfg, procs, tmpdir, {"src": src.pid, "dst": dst.pid})
        threads = ThreadSampler([src.pid, dst.pid])
        host0 = benchlib.host_busy_cpu_seconds()
        cpu_src0, cpu_dst0 = benchlib.cpu_seconds(src.pid), benchlib.cpu_seconds(dst.pid)
        t0 = time.monotonic()
        qs.execute("migrate", {"uri": uri})

        def on_src_poll(i):
            threads.sample()
            scenario.on_poll(run, i)

        info, _ = poll_until_done(qs, cfg.timeout_s, on_src_poll)
        t_src = time.monotonic() - t0
        cpu_src = benchlib.cpu_seconds(src.pid) - cpu_src0
        if info.get("status") != "completed":
            raise BenchError("source reports %r: %s" % (info.get("status"),
                                                         info.get("error-desc", "")))
        dst_info, _ = poll_until_done(qd, 120, lambda i: threads.sample())
        t_dst = time.monotonic() - t0
        cpu_dst = benchlib.cpu_seconds(dst.pid) - cpu_dst0
        # CPU time the rest of the host used meanwhile (other people's jobs,
        # kernel threads): a large value means this run was disturbed.
        foreign = benchlib.host_busy_cpu_seconds() - host0 - cpu_dst - (
            benchlib.cpu_seconds(src.pid) - cpu_src0)
        if dst_info.get("status") != "completed":
            raise BenchError("destination reports %r" % dst_info.get("status"))
        stop_perf(procs, perfs)
        verify_sample(qd, cfg, tmpdir)
        qd.execute("cont")
        wait_status(qd, {"running"}, 30)
        ram = info.get("ram", {})
        total_ms = info.get("total-time")
        if not total_ms or "downtime" not in info or "transferred" not in ram:
            raise BenchError("query-migrate lacks total-time/downtime/ram.transferred: %s"
                             % json.dumps(info)[:300])
        m = {
            "total_s": total_ms / 1000.0,
            "downtime_ms": float(info["downtime"]),
            "setup_ms": info.get("setup-time"),
            "transferred_bytes": ram["transferred"],
            "ram_gbps": cfg.mem_bytes * 8 / (total_ms / 1000.0) / 1e9,
            "wire_gbps": ram["transferred"] * 8 / (total_ms / 1000.0) / 1e9,
            "reported_mbps": ram.get("mbps"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            "src_cpu_s": cpu_src,
            "dst_cpu_s": cpu_dst,
            "wall_src_s": t_src,
            "wall_dst_s": t_dst,
            "window_s": t_dst,
            "downtime_limit_ms": params.get("downtime-limit"),
            "max_bandwidth": params.get("max-bandwidth"),
            "host_busy": busy,
            "foreign_cpu_s": max(0.0, foreign),
            "src_thread_cpu_s": threads.delta(src.pid),
            "dst_thread_cpu_s": threads.delta(dst.pid),
            "query_migrate": info,
        }
        m.update(scenario.extra_metrics(run, info, dst_info))
        return m
    finally:
        for q in (qs, qd):
            if q is not None:
                try:
                    q.execute("quit", timeout_s=5)
                except BenchError:
                    pass
                q.close()
        procs.stop(src)
        procs.stop(dst)


def _children_cpu_s():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def raw_once(cfg):
    busy = benchlib.wait_quiet(cfg.quiet_busy, cfg.quiet_wait_s)
    host0, own0, t0 = benchlib.host_busy_cpu_seconds(), _children_cpu_s(), time.monotonic()
    out = subprocess.run([cfg.tcp_raw, "--file", cfg.fill_file, "--bytes", str(cfg.mem_bytes)],
                         capture_output=True, text=True, timeout=cfg.timeout_s)
    wall = time.monotonic() - t0
    foreign = benchlib.host_busy_cpu_seconds() - host0 - (_children_cpu_s() - own0)
    if out.returncode != 0:
        raise BenchError("tcp_raw failed: %s" % out.stderr.strip())
    kv = dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)
    return {
        "total_s": float(kv["tcp_seconds"]),
        "ram_gbps": float(kv["tcp_gbps"]),
        "wire_gbps": float(kv["tcp_gbps"]),
        "transferred_bytes": int(kv["tcp_bytes"]),
        "src_cpu_s": float(kv["tcp_sender_cpu_s"]),
        "dst_cpu_s": float(kv["tcp_receiver_cpu_s"]),
        "memcpy_gbytes_per_s": float(kv["memcpy_gbytes_per_s"]),
        "host_busy": busy,
        "foreign_cpu_s": max(0.0, foreign),
        "window_s": wall,
    }


def measure(cfg, entry, what, fn):
    """Runs fn() until a measurement is not disturbed, at most 1 + retries times.

    Disturbed means other processes used more than cfg.max_foreign CPUs on
    average during the measured window: on a 2-core shared host that alone
    can halve a result. Discarded measurements are kept in the entry; if
    every attempt was disturbed, the last one counts and is marked so.
    """
    for attempt in range(cfg.retries + 1):
        m = fn()
        m["disturbed"] = m["foreign_cpu_s"] > cfg.max_foreign * m["window_s"]
        m["attempt"] = attempt + 1
        if not m["disturbed"] or attempt == cfg.retries:
            entry["runs"].append(m)
            return m
        entry.setdefault("discarded", []).append(m)
        print("  %s: discarded (others used %.2f CPU s in %.2f s), measuring again" %
              (what, m["foreign_cpu_s"], m["window_s"]), flush=True)
    raise AssertionError("unreachable")


def keep_logs(tmpdir, dest_dir, tag):
    for name in ("src.log", "dst.log"):
        p = os.path.join(tmpdir, name)
        if os.path.exists(p):
            shutil.copy(p, os.path.join(dest_dir, "%s-%s" % (tag, name)))


def run_matrix(cfg, scenarios, runtimes, procs):
    """Returns {scenario: {engine: {"runs": [...], "errors": [...], "pending": reason}}}."""
    os.makedirs(cfg.results_dir, exist_ok=True)
    # One unmeasured transfer first: the first loopback stream after a quiet
    # spell was repeatedly several times slower than the ones after it.
    subprocess.run([cfg.tcp_raw, "--bytes", str(GIB), "--no-memcpy"], capture_output=True,
                   timeout=cfg.timeout_s)
    results = {}
    for sc in scenarios:
        res = results.setdefault(sc.key, {})
        res["raw"] = {"label": "raw TCP (1 stream)", "runs": [], "errors": []}
        for rt in runtimes:
            res[rt.key] = {"label": rt.label, "runs": [], "errors": [],
                           "pending": rt.unavailable_reason()}
        for i in range(cfg.runs):
            try:
                m = measure(cfg, res["raw"], "run %d raw" % (i + 1), lambda: raw_once(cfg))
                print("  run %d raw: %.2f Gbit/s, others %.2f s" %
                      (i + 1, m["ram_gbps"], m["foreign_cpu_s"]), flush=True)
            except (BenchError, subprocess.TimeoutExpired, KeyError, ValueError) as e:
                res["raw"]["errors"].append(str(e))
                print("  run %d raw: FAILED: %s" % (i + 1, e), flush=True)
            for rt in runtimes:
                entry = res[rt.key]
                if entry["pending"]:
                    continue
                tmpdir = tempfile.mkdtemp(prefix="vmig-bench-")
                tag = "%s-%s-run%d" % (sc.key, rt.key, i + 1)
                cfg.run_tag = tag
                try:
                    m = measure(cfg, entry, "run %d %s" % (i + 1, rt.label),
                                lambda: migrate_once(cfg, rt, sc, procs, tmpdir))
                    print("  run %d %s: %.2f s, %.2f Gbit/s, downtime %.0f ms, "
                          "CPU src %.2f s dst %.2f s, others %.2f s" %
                          (i + 1, rt.label, m["total_s"], m["ram_gbps"], m["downtime_ms"],
                           m["src_cpu_s"], m["dst_cpu_s"], m["foreign_cpu_s"]), flush=True)
                    print("    threads src %s; dst %s" % (m["src_thread_cpu_s"],
                                                         m["dst_thread_cpu_s"]), flush=True)
                except (BenchError, OSError) as e:
                    entry["errors"].append(str(e))
                    keep_logs(tmpdir, cfg.results_dir, tag)
                    print("  run %d %s: FAILED: %s (logs in %s)" %
                          (i + 1, rt.label, e, cfg.results_dir), flush=True)
                finally:
                    shutil.rmtree(tmpdir, ignore_errors=True)
    return results


def parse_size(s):
    mult = {"K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}
    s = s.strip().upper()
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", required=True)
    ap.add_argument("--mem", default="4G")
    ap.add_argument("--fill-file", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=600, help="per migration, seconds")
    ap.add_argument("--tcp-raw", required=True)
    ap.add_argument("--scenarios", default="precopy-1ch")
    ap.add_argument("--runtimes", default="qemu,vmig")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--results-dir", required=True)
    ap.add_argument("--quiet-busy", type=float, default=0.15,
                    help="start a measurement once the host is at most this busy (0..1)")
    ap.add_argument("--retries", type=int, default=2,
                    help="extra attempts for a measurement that other processes disturbed")
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="CPUs other processes may use on average during a measurement")
    ap.add_argument("--quiet-wait", type=float, default=120,
                    help="seconds to wait for a quiet host before measuring anyway")
    ap.add_argument("--record", metavar="DOC", help="rewrite the migrate section of DOC")
    ap.add_argument("--command", default="", help="command line to quote in the record")
    args = ap.parse_args()
    args.mem_bytes = parse_size(args.mem)
    if args.runs < 1 or args.mem_bytes < 64 * MIB or args.mem_bytes % MIB:
        ap.error("need --runs >= 1 and --mem >= 64M, a whole number of MiB")
    if os.path.getsize(args.fill_file) != args.mem_bytes:
        ap.error("fill file %s is not %d bytes" % (args.fill_file, args.mem_bytes))
    cfg = Config(args)

    scenarios = []
    for k in args.scenarios.split(","):
        if k not in SCENARIOS:
            ap.error("unknown scenario %r (known: %s)" % (k, ", ".join(SCENARIOS)))
        scenarios.append(SCENARIOS[k])
    all_rt = {"qemu": QemuRuntime(args.qemu), "vmig": VmigRuntime(cfg.build_dir)}
    runtimes = []
    for k in args.runtimes.split(","):
        if k not in all_rt:
            ap.error("unknown runtime %r (known: qemu, vmig)" % k)
        runtimes.append(all_rt[k])

    procs = benchlib.Procs()

    def on_signal(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    facts = benchlib.host_facts()
    print("migration benchmark: %d MiB guest, %d run(s), %s" %
          (cfg.mem_bytes // MIB, cfg.runs, facts["date"]), flush=True)
    try:
        results = run_matrix(cfg, scenarios, runtimes, procs)
    except KeyboardInterrupt:
        print("interrupted: tearing down", file=sys.stderr)
        return 130
    finally:
        procs.kill_all()

    meta = dict(facts, mem_bytes=cfg.mem_bytes, runs=cfg.runs, fill_file=cfg.fill_file,
                command=args.command, qemu_version=all_rt["qemu"].version,
                commit=report.git_commit(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(cfg.results_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    status = report.print_tables(meta, scenarios, results)
    if args.record:
        benchlib.replace_section(args.record, "<!-- migrate:begin -->", "<!-- migrate:end -->",
                                 report.markdown(meta, scenarios, results))
        print("recorded in %s" % args.record)
    return status


if __name__ == "__main__":
    sys.exit(main())
