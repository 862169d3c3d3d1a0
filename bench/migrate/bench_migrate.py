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

--tls runs the TLS comparison instead (TlsPrecopy): every engine both in
clear and with x509 TLS on all its connections (TlsRuntime), in the same
rounds, and --record then rewrites the tls section of the document.

Invoked by bench/migrate/run.sh, which builds tcp_raw and the fill file.
"""

import argparse
import hashlib
import json
import mmap
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests",
                                "lib"))
import benchlib  # noqa: E402
import tlscerts  # noqa: E402
from benchlib import BenchError, Qmp  # noqa: E402
import report  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
POLL_S = 0.05
VERIFY_BYTES = 64 * MIB


class Loopback:
    """Both sides on this host's loopback, unpinned (the second table)."""

    key = "loopback"

    def setup(self):
        pass

    def teardown(self):
        pass

    def wrap(self, argv, side):
        return argv

    def uri(self):
        return "tcp:127.0.0.1:%d" % benchlib.free_tcp_port()

    def raw_args(self):
        return []


class TwoHosts:
    """The two-host model: source and destination each in a network namespace
    of their own, joined by a veth pair, the source pinned to one CPU and the
    destination to the other, so each side has a core to itself and every
    byte crosses a network device, as between two hosts. The raw stream gets
    the same namespaces, address and CPUs (tcp_raw --src-netns ...).

    The namespaces and the veth are made here and removed in teardown(); the
    only addresses used are the two ends of that veth (10.231.0.1 and .2).
    Needs root and iproute2's `ip`; without them setup() raises BenchError,
    it never falls back to loopback."""

    key = "two-host"
    SRC_ADDR = "10.231.0.1"
    DST_ADDR = "10.231.0.2"

    def __init__(self):
        tag = "vmigb%d" % os.getpid()
        self.ns = {"src": tag + "s", "dst": tag + "d"}
        self.dev = {"src": tag + "a", "dst": tag + "b"}
        self.cpu = {}
        self.made = []

    @staticmethod
    def _ip(*args):
        out = subprocess.run(["ip"] + list(args), capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise BenchError("ip %s: %s" % (" ".join(args), out.stderr.strip()))

    def setup(self):
        if os.geteuid() != 0:
            raise BenchError("the two-host model makes network namespaces: run as root")
        for tool in ("ip", "taskset"):
            if not shutil.which(tool):
                raise BenchError("the two-host model needs %s (iproute2, util-linux)" % tool)
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise BenchError("the two-host model needs 2 CPUs, this process may use %d"
                             % len(cpus))
        self.cpu = {"src": cpus[0], "dst": cpus[1]}
        for side in ("src", "dst"):
            self._ip("netns", "add", self.ns[side])
            self.made.append(self.ns[side])
        self._ip("link", "add", self.dev["src"], "netns", self.ns["src"], "type", "veth",
                 "peer", "name", self.dev["dst"], "netns", self.ns["dst"])
        for side, addr in (("src", self.SRC_ADDR), ("dst", self.DST_ADDR)):
            self._ip("-n", self.ns[side], "addr", "add", addr + "/30", "dev", self.dev[side])
            self._ip("-n", self.ns[side], "link", "set", "lo", "up")
            self._ip("-n", self.ns[side], "link", "set", self.dev[side], "up")

    def teardown(self):
        # Deleting a namespace deletes its end of the veth, and so the pair.
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made = []

    def wrap(self, argv, side):
        # Both exec in place, so the pid the harness sees is the engine's.
        return ["ip", "netns", "exec", self.ns[side], "taskset", "-c",
                str(self.cpu[side])] + argv

    def uri(self):
        # A fresh namespace has every port free; a new one per run keeps
        # a lingering socket of the previous run out of the way.
        return "tcp:%s:%d" % (self.DST_ADDR, 20000 + int.from_bytes(os.urandom(2), "big") % 40000)

    def raw_args(self):
        return ["--src-netns", self.ns["src"], "--dst-netns", self.ns["dst"],
                "--addr", self.DST_ADDR, "--src-cpu", str(self.cpu["src"]),
                "--dst-cpu", str(self.cpu["dst"])]


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

    def dst_argv(self, cfg, qmp_path, prealloc=False):
        backend = "memory-backend-ram,id=mem,size=%dM" % (cfg.mem_bytes // MIB)
        if prealloc:
            backend += ",prealloc=on"
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

    def dst_argv(self, cfg, qmp_path, prealloc=False):
        return [self.binary, "--mem", "%dM" % (cfg.mem_bytes // MIB), "--vcpus", "1",
                "--qmp", "unix:" + qmp_path, "--incoming", "defer", "-S"] + \
            (["--mem-prealloc"] if prealloc else [])


class TlsRuntime(Runtime):
    """An engine with TLS on every migration connection, as QEMU sets it up:
    x509 credentials "tls0" on each side (verify-peer on, so the destination
    checks the source's client cert too), tls-creds on both sides and
    tls-hostname on the source. The credentials are cfg.tls_creds, one set
    of tests/lib/tlscerts.py (EC P-256 keys)."""

    def __init__(self, base):
        self.base = base
        self.key = base.key + "-tls"
        self.label = base.label + " TLS"
        self.unlimited_bandwidth = base.unlimited_bandwidth
        self.binary = base.binary
        self.version = getattr(base, "version", None)

    def unavailable_reason(self):
        why = self.base.unavailable_reason()
        if why or self.base.key != "vmig":
            return why
        try:
            out = subprocess.run([self.binary, "--help"], capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return "vmig-vm --help: %s" % e
        if "--object" not in out.stdout + out.stderr:
            return "this vmig-vm has no --object, so no TLS credentials"
        return None

    def _object(self, cfg, endpoint):
        creds = cfg.tls_creds
        if creds is None:
            raise BenchError("no TLS credentials were made")
        d = creds.server if endpoint == "server" else creds.client
        flag = "--object" if self.base.key == "vmig" else "-object"
        return [flag, "tls-creds-x509,id=tls0,endpoint=%s,dir=%s,verify-peer=on" % (endpoint, d)]

    def src_argv(self, cfg, qmp_path):
        return self.base.src_argv(cfg, qmp_path) + self._object(cfg, "client")

    def dst_argv(self, cfg, qmp_path, prealloc=False):
        return self.base.dst_argv(cfg, qmp_path, prealloc) + self._object(cfg, "server")

    def side_params(self, side):
        if side == "src":
            return {"tls-creds": "tls0", "tls-hostname": tlscerts.SERVER_NAME}
        return {"tls-creds": "tls0"}


class Scenario:
    """One way of migrating. Subclasses add capabilities and in-flight actions.

    The defaults describe the idle guest filled from the fill file; a
    scenario with its own guest (postcopy-wss) overrides the argv, readiness,
    check and reporting hooks below.
    """

    key = ""
    title = ""
    capabilities = {}  # set on both sides before migrate-incoming/migrate
    parameters = {}    # set on both sides (QEMU wants multifd-channels on both)
    extra_columns = []  # (metric key, header, format) beyond the common ones
    columns = None      # replaces the common columns when set (report.py)
    ratios = None       # [(header, metric key, base engine)]; None = Gbit/s vs QEMU, raw
    run_columns = None  # per-run figures listed in the record; None = total, downtime
    has_targets = False  # the throughput/downtime targets apply
    with_raw = True     # also time the raw TCP stream of the same size
    busy_guest = False  # guests use CPU: wait for a quiet host before starting them

    def engines(self, runtimes):
        """[(result key, label, runtime, extra capabilities)] measured per run."""
        return [(rt.key, rt.label, rt, {}) for rt in runtimes]

    raw_args = []       # extra tcp_raw arguments for this scenario's raw stream

    def prepare(self, cfg):
        """Called once before the first run (build guests and the like)."""

    def finish(self, cfg):
        """Called once at the end, even after a failure: undo prepare()."""

    def after_run(self, cfg):
        """Called after each engine run, once its VMs are gone."""

    def mem_needed(self, cfg):
        """Free RAM a run needs: two guests and some room."""
        return 2 * self.guest_mem_bytes(cfg) + GIB

    def guest_mem_bytes(self, cfg):
        return cfg.mem_bytes

    def src_argv(self, rt, cfg, qmp_path, tmpdir):
        return rt.src_argv(cfg, qmp_path)

    def dst_argv(self, rt, cfg, qmp_path, tmpdir):
        return rt.dst_argv(cfg, qmp_path)

    def wait_ready(self, run, rt, cfg, tmpdir):
        """Returns once the source guest is in the state to be measured."""

    def check_dst(self, run, rt, cfg, tmpdir):
        """Checks the destination after completion; returns extra metrics."""
        verify_sample(run["dst"], cfg, tmpdir)
        run["dst"].execute("cont")
        wait_status(run["dst"], {"running"}, 30)
        return {}

    def on_poll(self, run, info):
        """Called with each source query-migrate reply while active."""

    def extra_metrics(self, run, src_info, dst_info):
        return {}


class Precopy1ch(Scenario):
    key = "precopy-1ch"
    title = "pre-copy, one channel"
    has_targets = True


class Precopy1chPrealloc(Precopy1ch):
    """As precopy-1ch, but both destinations allocate all guest RAM at start-up
    (QEMU: prealloc=on; vmig-vm: --mem-prealloc), outside the measured window."""

    key = "precopy-1ch-prealloc"
    title = "pre-copy, one channel, destination RAM preallocated"

    def dst_argv(self, rt, cfg, qmp_path, tmpdir):
        return rt.dst_argv(cfg, qmp_path, prealloc=True)


class HugePages:
    """2 MiB huge pages for the hugetlb scenario: reserved in
    /proc/sys/vm/nr_hugepages on top of what the host had, plus a hugetlbfs
    mount of our own for the QEMU source's guest RAM file. Both are undone by
    release(). Needs root."""

    PAGE = 2 * MIB

    def __init__(self):
        self.old_nr = None
        self.mnt = None

    @staticmethod
    def _nr():
        with open("/proc/sys/vm/nr_hugepages") as f:
            return int(f.read())

    @staticmethod
    def _set_nr(n):
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write("%d\n" % n)

    def reserve(self, nbytes):
        if os.geteuid() != 0:
            raise BenchError("huge pages: reserving them needs root")
        want = -(-nbytes // self.PAGE)
        self.old_nr = self._nr()
        self._set_nr(self.old_nr + want)
        got = self._nr() - self.old_nr
        if got < want:
            self.release()
            raise BenchError("huge pages: asked the kernel for %d more 2 MiB pages, got %d"
                             % (want, got))
        self._warm(want * self.PAGE)
        self.mnt = tempfile.mkdtemp(prefix="vmig-bench-huge-")
        out = subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none",
                              self.mnt], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            self.release()
            raise BenchError("huge pages: mount hugetlbfs: %s" % out.stderr.strip())

    def _warm(self, nbytes):
        """Writes every page of the new pool once. This host is itself a guest
        whose memory its hypervisor backs on first use: in the first
        recording, the first runs of both engines on a fresh pool took up to
        five times longer than the later ones (QEMU 9.2 s, then 1.7 s). The
        pool is warmed here, before any measurement, so no engine pays it."""
        fd = os.memfd_create("vmig-bench-warm", os.MFD_HUGETLB | os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            with mmap.mmap(fd, nbytes) as m:
                chunk = bytes(64 * MIB)
                for off in range(0, nbytes, len(chunk)):
                    n = min(len(chunk), nbytes - off)
                    m[off:off + n] = chunk[:n]
        except OSError as e:
            self.release()
            raise BenchError("huge pages: cannot warm the pool: %s" % e)
        finally:
            os.close(fd)

    def release(self):
        if self.mnt:
            subprocess.run(["umount", self.mnt], capture_output=True, timeout=30)
            shutil.rmtree(self.mnt, ignore_errors=True)
            self.mnt = None
        if self.old_nr is not None:
            self._set_nr(self.old_nr)
            self.old_nr = None

    def guest_file(self, fill_file, size):
        """A file of the fill data on hugetlbfs (written through a mapping,
        as hugetlbfs has no write())."""
        path = os.path.join(self.mnt, "guest-ram")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size) as m, open(fill_file, "rb") as f:
                off = 0
                while off < size:
                    chunk = f.read(64 * MIB)
                    if not chunk:
                        break
                    m[off:off + len(chunk)] = chunk
                    off += len(chunk)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            raise BenchError("huge pages: cannot fill %s: %s" % (path, e))
        os.close(fd)
        return path


class PrecopyHugetlb(Scenario):
    """Pre-copy, one channel, guest RAM on 2 MiB huge pages on both sides of
    both engines, as production hosts run VMs. QEMU: the source's RAM is a
    hugetlbfs file holding the fill data (memory-backend-file,share=on,
    written before each run), the destination's memory-backend-memfd with
    hugetlb=on. vmig-vm: --hugetlb on both sides (a hugetlb memfd). The raw
    stream is sent from huge pages too (tcp_raw --hugetlb). Destinations are
    not preallocated: the first touch of a 2 MiB page is what is measured."""

    key = "precopy-1ch-hugetlb"
    title = "pre-copy, one channel, guest RAM on 2 MiB huge pages"
    has_targets = True
    target_x_raw = 0.9
    raw_args = ["--hugetlb"]

    def __init__(self):
        self.huge = HugePages()
        self.qemu_file = None

    def prepare(self, cfg):
        # At most two guests at a time; the QEMU source's file is removed
        # after each run.
        self.huge.reserve(2 * cfg.mem_bytes)

    def finish(self, cfg):
        self.huge.release()

    def mem_needed(self, cfg):
        return GIB  # the guests live in the reserved pool

    def src_argv(self, rt, cfg, qmp_path, tmpdir):
        if rt.key == "qemu":
            self.qemu_file = self.huge.guest_file(cfg.fill_file, cfg.mem_bytes)
            backend = ("memory-backend-file,id=mem,size=%dM,mem-path=%s,share=on,prealloc=on"
                       % (cfg.mem_bytes // MIB, self.qemu_file))
            return rt._common(cfg, qmp_path, backend)
        return rt.src_argv(cfg, qmp_path) + ["--hugetlb"]

    def dst_argv(self, rt, cfg, qmp_path, tmpdir):
        if rt.key == "qemu":
            backend = ("memory-backend-memfd,id=mem,size=%dM,hugetlb=on,hugetlbsize=2M"
                       % (cfg.mem_bytes // MIB))
            return rt._common(cfg, qmp_path, backend) + ["-incoming", "defer", "-S"]
        return rt.dst_argv(cfg, qmp_path) + ["--hugetlb"]

    def after_run(self, cfg):
        if self.qemu_file:
            try:
                os.unlink(self.qemu_file)
            except OSError:
                pass
            self.qemu_file = None


class PrecopyMultifd(Scenario):
    """Pre-copy over N multifd data channels (QEMU's names on both engines)."""

    def __init__(self, channels):
        self.key = "multifd-%d" % channels
        self.title = "pre-copy, multifd with %d channels" % channels
        self.capabilities = {"multifd": True}
        self.parameters = {"multifd-channels": channels}
        self.has_targets = True


class PairedScenario(Scenario):
    """Each engine measured without and with a feature (variant()), side by
    side in the same run, recorded in a section of its own (section) with
    the ratios between the pairs. Both destinations preallocate guest RAM
    (QEMU prealloc=on, vmig-vm --mem-prealloc), so the first touch of every
    page, which costs more than the whole transfer on this machine, stays
    out of the measured window and the sending side's work is what
    differs."""

    suffix = ""   # the variant's result key is the engine's + "-" + suffix
    feature = ""  # its name in the tables

    def variant(self, rt):
        """(result key, label, runtime, extra capabilities) of rt with the feature."""
        raise NotImplementedError

    @property
    def ratios(self):
        return [("x QEMU " + self.feature, "ram_gbps", "qemu-" + self.suffix),
                ("x vmig plain", "ram_gbps", "vmig")]

    @property
    def pairs(self):
        f, zc = self.feature, "-" + self.suffix
        return [("vmig" + zc, "qemu" + zc, "vmig %s / QEMU %s" % (f, f)),
                ("vmig" + zc, "vmig", "vmig %s / vmig plain" % f),
                ("qemu" + zc, "qemu", "QEMU %s / QEMU plain" % f)]

    def engines(self, runtimes):
        out = []
        for rt in runtimes:
            out += [(rt.key, rt.label, rt, {}), self.variant(rt)]
        return out

    def dst_argv(self, rt, cfg, qmp_path, tmpdir):
        return rt.dst_argv(cfg, qmp_path, prealloc=True)


class TlsPrecopy(PairedScenario):
    """What TLS costs: each engine migrates both in clear and over TLS,
    pre-copy over one channel or over multifd (the engines' own per-byte
    work, now including encryption, is what is compared)."""

    tls = True
    section = "tls"  # of docs/benchmarks.md
    suffix, feature = "tls", "TLS"

    def __init__(self, channels):
        if channels == 1:
            self.key = "tls-precopy-1ch"
            self.title = "TLS: pre-copy, one channel, destination RAM preallocated"
            self.capabilities = {}
            self.parameters = {}
        else:
            self.key = "tls-multifd-%d" % channels
            self.title = ("TLS: pre-copy, multifd with %d channels, destination RAM "
                          "preallocated" % channels)
            self.capabilities = {"multifd": True}
            self.parameters = {"multifd-channels": channels}

    def variant(self, rt):
        tls = TlsRuntime(rt)
        return (tls.key, tls.label, tls, {})


class MultifdZeroCopy(PairedScenario):
    """zero-copy-send: each engine migrates over multifd without and with it.

    Here both ends run on one host (loopback, or a veth pair between two
    namespaces): the kernel copies every zero-copy send when it delivers it
    to the local socket, so this measures what MSG_ZEROCOPY costs where it
    cannot save the copy, and dirty-sync-missed-zero-copy (both engines
    report it) shows the kernel saying so."""

    section = "zerocopy"  # of docs/benchmarks.md
    suffix, feature = "zc", "zero-copy"
    extra_columns = [("missed_zero_copy", "missed zero-copy syncs", "%.0f")]

    def __init__(self, channels):
        self.key = "multifd-%d-zero-copy" % channels
        self.title = ("zero-copy-send: pre-copy, multifd with %d channels, destination RAM "
                      "preallocated" % channels)
        self.capabilities = {"multifd": True}
        self.parameters = {"multifd-channels": channels}

    def variant(self, rt):
        return (rt.key + "-zc", rt.label + " zero-copy", rt, {"zero-copy-send": True})

    def extra_metrics(self, run, src_info, dst_info):
        return {"missed_zero_copy": src_info.get("ram", {}).get("dirty-sync-missed-zero-copy")}


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


class PostcopyWss(Scenario):
    """Post-copy of a busy guest: a 2 GiB guest whose 1 GiB working set is
    written at 256 MiB/s in one access pattern, switched to post-copy 1 s
    after `migrate`, with 1 or 2 vCPUs. The destination's RAM is
    preallocated, as production destinations often are (both engines get
    the same flag; QEMU frees it again for post-copy); postcopy-wss-noprealloc
    measures the random pattern without.

    Patterns (vmig-vm's --workload and tests/interop/guest/dirtier.c's, the
    same definitions): random (uniform over the working set), stream (each
    vCPU sweeps its pages in order) and hotset (90% of writes to the first
    1/16 of the working set, the rest uniform over all of it).

    The destination runs the guest during post-copy (no -S), so its vCPUs
    fault on missing pages and blocktime and page-request latency mean
    something. vmig's guest is vmig-vm's workload; QEMU's is Debian's
    kernel running the dirtier with one writer thread per vCPU, which does
    the same thing (whole 4 KiB writes, paced). Both guests check every page
    they overwrite, so a lost page shows up. Both guests' RAM is (nearly)
    all random, not zero pages: vmig-vm --fill random, and the dirtier fills
    what the guest kernel has left over ("auto").
    QEMU runs twice, without and with its postcopy-preempt channel; vmig
    always sends requested pages on its own urgent channel and accepts the
    capability. postcopy-wss-multifd-2: vmig with multifd (2 channels) as
    well, its background push on the data channels; QEMU 7.2 refuses
    multifd with post-copy (10.1 added it), so it runs as above.
    """

    section = "postcopy"  # of docs/benchmarks.md
    PATTERNS = {"random": "uniform random writes", "stream": "sequential sweeps",
                "hotset": "a hot set (90% of writes to 1/16 of it)"}
    title = "post-copy of a busy guest"
    MEM = 2 * GIB
    WSS_MIB = 1024
    RATE_MIB = 256
    # Switch 1 s after migrate, or once half of guest RAM has been sent if
    # that comes first: early enough that neither engine's pre-copy has
    # converged, on any host. (A fast host sends 2 GiB in about 1.1 s; with
    # the 1 s rule alone, vmig then sometimes completed in pre-copy.)
    SWITCH_AFTER_S = 1.0
    SWITCH_AFTER_SHARE = 0.5
    # QEMU 7.2 under TCG loses dirty-page writes when guest RAM is a multiple
    # of 256 KiB (fixed upstream only in 9.0): 2 GiB + 8 KiB avoids it.
    QEMU_MEM_KB = 2 * 1024 * 1024 + 8
    capabilities = {"postcopy-ram": True, "postcopy-blocktime": True}
    parameters = {"max-postcopy-bandwidth": 0}
    with_raw = False
    busy_guest = True
    columns = [
        ("total_s", "total s", "%.2f"),
        ("switch_after_s", "switch at s", "%.2f"),
        ("downtime_ms", "downtime ms", "%.1f"),
        ("blocktime_ms", "blocktime ms", "%.0f"),
        ("vcpu_blocktime_sum_ms", "vCPU blocktime sum ms", "%.0f"),
        ("postcopy_requests", "page requests", "%.0f"),
        ("latency_p50_us", "latency p50 us", "%.0f"),
        ("latency_p99_us", "latency p99 us", "%.0f"),
        ("src_cpu_s", "src CPU s", "%.2f"),
        ("dst_cpu_s", "dst CPU s", "%.2f"),
    ]
    ratios = [("total x QEMU", "total_s", "qemu"), ("blocktime x QEMU", "blocktime_ms", "qemu")]
    not_reported = {"latency_p50_us": "n/a (QEMU 7.2 does not report it)",
                    "latency_p99_us": "n/a (QEMU 7.2 does not report it)"}
    run_columns = ["total_s", "switch_after_s", "downtime_ms", "blocktime_ms",
                   "vcpu_blocktime_sum_ms",
                   "postcopy_requests", "latency_p50_us", "latency_p99_us", "src_cpu_s",
                   "dst_cpu_s"]

    def __init__(self, pattern="random", vcpus=2, prealloc=True, multifd=0):
        if pattern not in self.PATTERNS:
            raise ValueError(pattern)
        self.guest_dir = None
        self.pattern, self.vcpus, self.prealloc = pattern, vcpus, prealloc
        self.multifd = multifd
        if multifd:  # set on both sides; QEMU ignores it without the capability
            self.parameters = dict(self.parameters, **{"multifd-channels": multifd})
            self.section = "postcopy-multifd"

    @property
    def key(self):
        return "postcopy-wss%s%s%s%s" % (
            "" if self.pattern == "random" else "-" + self.pattern,
            "" if self.vcpus == 2 else "-%dvcpu" % self.vcpus,
            "" if self.prealloc else "-noprealloc",
            "-multifd-%d" % self.multifd if self.multifd else "")

    @property
    def guest_text(self):
        return ("2 GiB guest, %d vCPU%s, 1 GiB working set written at 256 MiB/s in %s, "
                "post-copy 1 s after migrate or at half of RAM sent, destination RAM %s%s" % (
                    self.vcpus, "s" if self.vcpus > 1 else "", self.PATTERNS[self.pattern],
                    "preallocated" if self.prealloc else "not preallocated",
                    "; vmig with multifd, %d channels (QEMU 7.2 refuses multifd with "
                    "post-copy)" % self.multifd if self.multifd else ""))

    def engines(self, runtimes):
        out = []
        for rt in runtimes:
            if rt.key == "qemu":
                out.append(("qemu", rt.label, rt, {}))
                out.append(("qemu-preempt", rt.label + " preempt", rt,
                            {"postcopy-preempt": True}))
            elif self.multifd:
                out.append((rt.key, rt.label + " multifd", rt,
                            {"postcopy-preempt": True, "multifd": True}))
            else:
                out.append((rt.key, rt.label, rt, {"postcopy-preempt": True}))
        return out

    def prepare(self, cfg):
        build = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                             "tests", "interop", "guest", "build.sh")
        out = subprocess.run([build, os.path.join(cfg.build_dir, "bench", "guest")],
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise BenchError("guest build failed: %s" % out.stderr.strip()[-300:])
        self.guest_dir = out.stdout.strip().splitlines()[-1]

    def guest_mem_bytes(self, cfg):
        return self.MEM

    def _argv(self, rt, cfg, qmp_path, serial):
        if rt.key == "qemu":
            if not self.guest_dir:
                raise BenchError("no QEMU guest (build failed)")
            with open(os.path.join(self.guest_dir, "kernel")) as f:
                kernel = f.read().strip()
            return [rt.binary, "-accel", "tcg", "-machine", "pc", "-smp", str(self.vcpus),
                    "-m", "%dK" % self.QEMU_MEM_KB, "-nodefaults", "-display", "none",
                    "-name", "bench,debug-threads=on", "-no-reboot",
                    "-kernel", kernel, "-initrd", os.path.join(self.guest_dir, "initramfs.cpio.gz"),
                    "-append", "console=ttyS0 quiet vmig.test=dirtier vmig.args=%d,%d,auto,%d,%s"
                    % (self.WSS_MIB, self.RATE_MIB, self.vcpus, self.pattern),
                    "-serial", "file:" + serial,
                    "-qmp", "unix:%s,server=on,wait=off" % qmp_path]
        return [rt.binary, "--mem", "%dM" % (self.MEM // MIB), "--vcpus", str(self.vcpus),
                "--workload", self.pattern, "--wss", "%dM" % self.WSS_MIB,
                "--dirty-rate", "%dM" % self.RATE_MIB, "--qmp", "unix:" + qmp_path]

    def src_argv(self, rt, cfg, qmp_path, tmpdir):
        argv = self._argv(rt, cfg, qmp_path, os.path.join(tmpdir, "src-serial.log"))
        return argv + (["--fill", "random"] if rt.key == "vmig" else [])

    def dst_argv(self, rt, cfg, qmp_path, tmpdir):
        vmig = rt.key == "vmig"
        return self._argv(rt, cfg, qmp_path, os.path.join(tmpdir, "dst-serial.log")) + [
            "--incoming" if vmig else "-incoming", "defer"] + (
            [("--" if vmig else "-") + "mem-prealloc"] if self.prealloc else [])

    @staticmethod
    def _serial_lines(path):
        try:
            with open(path, errors="replace") as f:
                return [l.strip() for l in f if l.startswith("VMIG-")]
        except OSError:
            return []

    def wait_ready(self, run, rt, cfg, tmpdir):
        if rt.key != "qemu":
            return  # vmig-vm's workload runs as soon as QMP answers
        serial = os.path.join(tmpdir, "src-serial.log")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            lines = self._serial_lines(serial)
            if any("RESULT" in l for l in lines):
                raise BenchError("QEMU guest stopped: %s" % lines[-1])
            # Ready, and one rate report: the guest is dirtying at full pace.
            if any("VMIG-DIRTIER: ready" in l for l in lines) and \
                    any("VMIG-DIRTIER: t=" in l for l in lines):
                return
            time.sleep(0.2)
        raise BenchError("QEMU guest did not start dirtying within 180 s")

    def on_poll(self, run, info):
        if run.get("switched") or info.get("status") != "active":
            return
        ram = info.get("ram", {})
        sent = ram.get("transferred", 0) >= self.SWITCH_AFTER_SHARE * ram.get("total", 1 << 62)
        if sent or time.monotonic() - run["t0"] >= self.SWITCH_AFTER_S:
            run["src"].execute("migrate-start-postcopy")
            run["switched"] = True
            run["switch_s"] = time.monotonic() - run["t0"]

    def check_dst(self, run, rt, cfg, tmpdir):
        """The destination guest must be running and its self-check clean."""
        qd = run["dst"]
        wait_status(qd, {"running"}, 30)
        if rt.key == "vmig":
            g0 = qd.execute("x-vmig-query-guest")
            time.sleep(2.0)  # let the guest go on writing on the destination
            g = qd.execute("x-vmig-query-guest")
            if g["pages-written"] <= g0["pages-written"]:
                raise BenchError("destination guest is not writing: %s" % json.dumps(g))
            return {"guest_bad_pages": g["inconsistencies"],
                    "guest_check": "x-vmig-query-guest: inconsistencies %d, pages verified %d"
                                   % (g["inconsistencies"], g["pages-verified"])}
        # QEMU: the dirtier reports every 2 s; wait for two reports from the
        # destination so at least one covers time after the switch-over.
        serial = os.path.join(tmpdir, "dst-serial.log")
        deadline = time.monotonic() + 20
        lines = []
        while time.monotonic() < deadline:
            lines = [l for l in self._serial_lines(serial) if "VMIG-DIRTIER: t=" in l]
            if len(lines) >= 2:
                break
            time.sleep(0.2)
        if len(lines) < 2:
            raise BenchError("destination guest printed no progress: %r" % lines)
        bad = int(lines[-1].rsplit("bad=", 1)[1])
        return {"guest_bad_pages": bad, "guest_check": "dirtier: " + lines[-1]}

    def extra_metrics(self, run, src_info, dst_info):
        if not run.get("switched"):
            raise BenchError("migration completed before post-copy could be started")
        vb = dst_info.get("postcopy-vcpu-blocktime")
        m = {
            "blocktime_ms": dst_info.get("postcopy-blocktime"),
            "vcpu_blocktime_ms": vb,
            "vcpu_blocktime_sum_ms": sum(vb) if isinstance(vb, list) else None,
            "postcopy_requests": src_info.get("ram", {}).get("postcopy-requests"),
            "switch_after_s": run.get("switch_s"),
            "dst_query_migrate": dst_info,
        }
        # A run in which no vCPU faulted has no latency (not 0 us): it
        # is left out of the median.
        for k, key in (("x-vmig-postcopy-latency-p50", "latency_p50_us"),
                       ("x-vmig-postcopy-latency-p99", "latency_p99_us")):
            if k in dst_info and dst_info.get("x-vmig-postcopy-faults", 1):
                m[key] = dst_info[k] / 1000.0
        for k in ("postcopy-latency-dist", "x-vmig-postcopy-requests", "x-vmig-postcopy-faults",
                  "postcopy-latency"):
            if k in dst_info:
                m[k.replace("-", "_")] = dst_info[k]
        return m



class PrecopyWriteHeavy(PostcopyWss):
    """Pre-copy of a write-heavy guest: the same 2 GiB guests as
    postcopy-wss (1 GiB working set rewritten at 256 MiB/s, whole 4 KiB
    pages, every page checked), but migrated by pre-copy alone, so the
    engine must see the rest fit downtime-limit and keep to it. The record
    lists every run, not only the median: each must converge within the
    limit."""

    key = "precopy-write-heavy"
    section = None  # the migrate section
    title = "pre-copy of a write-heavy guest"
    capabilities = {}
    parameters = {}
    columns = [
        ("total_s", "total s", "%.2f"),
        ("downtime_ms", "downtime ms", "%.1f"),
        ("dirty_sync_count", "dirty syncs", "%.0f"),
        ("wire_gbps", "wire Gbit/s", "%.2f"),
        ("src_cpu_s", "src CPU s", "%.2f"),
        ("dst_cpu_s", "dst CPU s", "%.2f"),
    ]
    ratios = [("total x QEMU", "total_s", "qemu")]
    guest_text = "2 GiB guest, 2 vCPUs, 1 GiB working set rewritten at 256 MiB/s"
    not_reported = {}
    run_columns = ["total_s", "downtime_ms", "dirty_sync_count", "src_cpu_s", "dst_cpu_s"]

    def __init__(self):
        super().__init__(prealloc=False)

    def engines(self, runtimes):
        return [(rt.key, rt.label, rt, {}) for rt in runtimes]

    def on_poll(self, run, info):
        pass

    def extra_metrics(self, run, src_info, dst_info):
        return {}

# Scenario objects are shared by all runs: per-run state lives in the run
# dict passed to on_poll() and extra_metrics().
SCENARIOS = {s.key: s for s in (Precopy1ch(), Precopy1chPrealloc(), PrecopyHugetlb(),
                                PrecopyMultifd(4), MultifdZeroCopy(4), PrecopyWriteHeavy(),
                                Postcopy(),
                                *(PostcopyWss(p, n) for n in (2, 1) for p in PostcopyWss.PATTERNS),
                                PostcopyWss(prealloc=False), PostcopyWss(multifd=2),
                                TlsPrecopy(1), TlsPrecopy(4))}
TLS_SCENARIOS = "tls-precopy-1ch,tls-multifd-4"  # what --tls runs by default


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
        # No new measurement starts after this moment (monotonic; None: no limit).
        self.deadline = time.monotonic() + args.deadline if args.deadline > 0 else None
        self.deadline_s = args.deadline
        self.tls_creds = None  # tlscerts.TLSDirs, made when a scenario uses TLS
        self.place = TwoHosts() if args.two_host else Loopback()


def set_caps_and_params(qmp, scenario, extra_params=None, caps=None):
    want = dict(scenario.capabilities)
    want.update(caps or {})
    if want:
        caps = [{"capability": k, "state": v} for k, v in want.items()]
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


def migrate_once(cfg, engine, scenario, procs, tmpdir):
    """One measured migration; returns a dict of metrics or raises BenchError."""
    _, _, runtime, extra_caps = engine
    need = scenario.mem_needed(cfg)
    if benchlib.mem_available_bytes() < need:
        raise BenchError("only %.1f GiB RAM available, need %.1f" %
                         (benchlib.mem_available_bytes() / GIB, need / GIB))
    if scenario.busy_guest:
        # Busy guests keep the host busy once started, so wait before.
        busy = benchlib.wait_quiet(cfg.quiet_busy, cfg.quiet_wait_s)
    src_qmp, dst_qmp = os.path.join(tmpdir, "src.qmp"), os.path.join(tmpdir, "dst.qmp")
    src = procs.start(cfg.place.wrap(scenario.src_argv(runtime, cfg, src_qmp, tmpdir), "src"),
                      os.path.join(tmpdir, "src.log"))
    dst = procs.start(cfg.place.wrap(scenario.dst_argv(runtime, cfg, dst_qmp, tmpdir), "dst"),
                      os.path.join(tmpdir, "dst.log"))
    qs = qd = None
    try:
        qs, qd = Qmp(src_qmp, timeout_s=300), Qmp(dst_qmp, timeout_s=300)
        wait_status(qs, {"running"}, 30)
        uri = cfg.place.uri()
        # Parameters of one side only (TLS: tls-hostname is the source's).
        side_params = getattr(runtime, "side_params", lambda side: {})
        set_caps_and_params(qd, scenario, side_params("dst"), caps=extra_caps)
        qd.execute("migrate-incoming", {"uri": uri})
        src_params = {"max-bandwidth": runtime.unlimited_bandwidth}
        src_params.update(side_params("src"))
        set_caps_and_params(qs, scenario, src_params, caps=extra_caps)
        params = qs.execute("query-migrate-parameters")
        run = {"src": qs, "dst": qd}
        scenario.wait_ready(run, runtime, cfg, tmpdir)
        if not scenario.busy_guest:
            busy = benchlib.wait_quiet(cfg.quiet_busy, cfg.quiet_wait_s)
        perfs = start_perf(cfg, procs, tmpdir, {"src": src.pid, "dst": dst.pid})
        threads = ThreadSampler([src.pid, dst.pid])
        host0 = benchlib.host_busy_cpu_seconds()
        cpu_src0, cpu_dst0 = benchlib.cpu_seconds(src.pid), benchlib.cpu_seconds(dst.pid)
        t0 = run["t0"] = time.monotonic()
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
        checked = scenario.check_dst(run, runtime, cfg, tmpdir)
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
            "ram_gbps": scenario.guest_mem_bytes(cfg) * 8 / (total_ms / 1000.0) / 1e9,
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
        m.update(checked)
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
        scenario.after_run(cfg)


def _children_cpu_s():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def raw_once(cfg, sc):
    busy = benchlib.wait_quiet(cfg.quiet_busy, cfg.quiet_wait_s)
    host0, own0, t0 = benchlib.host_busy_cpu_seconds(), _children_cpu_s(), time.monotonic()
    out = subprocess.run([cfg.tcp_raw, "--file", cfg.fill_file, "--bytes", str(cfg.mem_bytes)]
                         + cfg.place.raw_args() + sc.raw_args, capture_output=True, text=True,
                         timeout=cfg.timeout_s)
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
    for name in ("src.log", "dst.log", "src-serial.log", "dst-serial.log"):
        p = os.path.join(tmpdir, name)
        if os.path.exists(p):
            shutil.copy(p, os.path.join(dest_dir, "%s-%s" % (tag, name)))


def past_deadline(cfg, entry, what):
    """True (and noted in the entry) once the run's deadline has passed."""
    if cfg.deadline is None or time.monotonic() < cfg.deadline:
        return False
    entry["errors"].append("not measured: the run's deadline of %d s had passed" % cfg.deadline_s)
    print("  %s: not measured, the run's deadline of %d s has passed" % (what, cfg.deadline_s),
          flush=True)
    return True


def raw_run(cfg, sc, entry, i):
    if past_deadline(cfg, entry, "run %d raw" % (i + 1)):
        return
    try:
        m = measure(cfg, entry, "run %d raw" % (i + 1), lambda: raw_once(cfg, sc))
        print("  run %d raw: %.2f Gbit/s, others %.2f s" %
              (i + 1, m["ram_gbps"], m["foreign_cpu_s"]), flush=True)
    except (BenchError, subprocess.TimeoutExpired, KeyError, ValueError) as e:
        entry["errors"].append(str(e))
        print("  run %d raw: FAILED: %s" % (i + 1, e), flush=True)


def engine_run(cfg, sc, engine, entry, procs, i):
    key, label = engine[0], engine[1]
    if past_deadline(cfg, entry, "run %d %s" % (i + 1, label)):
        return
    tmpdir = tempfile.mkdtemp(prefix="vmig-bench-")
    tag = "%s-%s-run%d" % (sc.key, key, i + 1)
    cfg.run_tag = tag
    try:
        m = measure(cfg, entry, "run %d %s" % (i + 1, label),
                    lambda: migrate_once(cfg, engine, sc, procs, tmpdir))
        m["run"] = i + 1  # pairs the engines' runs of one round (report.py)
        line = "  run %d %s: %.2f s, %.2f Gbit/s, downtime %.1f ms" % (
            i + 1, label, m["total_s"], m["ram_gbps"], m["downtime_ms"])
        if "blocktime_ms" in m:
            line += ", blocktime %s ms (vCPUs %s), requests %s" % (
                m["blocktime_ms"], m.get("vcpu_blocktime_ms"), m.get("postcopy_requests"))
        if m.get("latency_p50_us") is not None:
            line += ", latency p50 %.0f us p99 %.0f us" % (m["latency_p50_us"],
                                                           m["latency_p99_us"])
        line += ", CPU src %.2f s dst %.2f s, others %.2f s" % (
            m["src_cpu_s"], m["dst_cpu_s"], m["foreign_cpu_s"])
        print(line, flush=True)
        if m.get("guest_check"):
            print("    guest %s" % m["guest_check"], flush=True)
        print("    threads src %s; dst %s" % (m["src_thread_cpu_s"], m["dst_thread_cpu_s"]),
              flush=True)
    except (BenchError, OSError) as e:
        entry["errors"].append(str(e))
        keep_logs(tmpdir, cfg.results_dir, tag)
        print("  run %d %s: FAILED: %s (logs in %s)" % (i + 1, label, e, cfg.results_dir),
              flush=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def run_matrix(cfg, scenarios, runtimes, procs):
    """Returns {scenario: {engine: {"runs": [...], "errors": [...], "pending": reason}}}."""
    os.makedirs(cfg.results_dir, exist_ok=True)
    # One unmeasured transfer first: the first loopback stream after a quiet
    # spell was repeatedly several times slower than the ones after it.
    subprocess.run([cfg.tcp_raw, "--bytes", str(GIB), "--no-memcpy"] + cfg.place.raw_args(),
                   capture_output=True, timeout=cfg.timeout_s)
    results = {}
    plans = []
    for sc in scenarios:
        res = results.setdefault(sc.key, {})
        engines = sc.engines(runtimes)
        if sc.with_raw:
            res["raw"] = {"label": "raw TCP (1 stream)", "runs": [], "errors": []}
        for key, label, rt, _ in engines:
            res[key] = {"label": label, "runs": [], "errors": [],
                        "pending": rt.unavailable_reason()}
        plans.append((sc, res, engines))
    # A paired comparison (TLS, zero-copy) goes round by round across its
    # scenarios, so that a deadline cuts every scenario short alike instead
    # of starving the last; the others keep scenario after scenario.
    rounds_first = all(getattr(sc, "pairs", None) for sc in scenarios)
    for n, (sc, res, engines) in enumerate(plans):
        try:
            sc.prepare(cfg)
        except (BenchError, OSError, subprocess.TimeoutExpired) as e:
            for key, _, _, _ in engines:
                res[key]["errors"].append("prepare: %s" % e)
            print("  %s: prepare FAILED: %s" % (sc.key, e), flush=True)
        if rounds_first and n < len(plans) - 1:
            continue
        for i in range(cfg.runs):
            for sc2, res2, engines2 in (plans if rounds_first else [(sc, res, engines)]):
                if sc2.with_raw:
                    raw_run(cfg, sc2, res2["raw"], i)
                for engine in engines2:
                    if not res2[engine[0]]["pending"]:
                        engine_run(cfg, sc2, engine, res2[engine[0]], procs, i)
    return results


def parse_size(s):
    mult = {"K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}
    s = s.strip().upper()
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def record(doc, meta, scenarios, results):
    """Rewrites the sections of doc these scenarios belong to: the TLS and
    zero-copy comparisons and the post-copy patterns have a section each,
    everything else the migrate one, and the two-host model has its own of
    each."""
    two = "-twohost" if meta.get("placement") == TwoHosts.key else ""
    groups = {}
    for sc in scenarios:
        groups.setdefault(getattr(sc, "section", None), []).append(sc)
    for name, scs in groups.items():
        if name:
            body = report.section_markdown(meta, scs, results, name)
        else:
            name, body = "migrate", report.markdown(meta, scs, results)
        benchlib.replace_section(doc, "<!-- %s%s:begin -->" % (name, two),
                                 "<!-- %s%s:end -->" % (name, two), body)
        print("recorded the %s%s section of %s" % (name, two, doc))


def render(path, doc):
    """Rewrite the section of doc from a saved results.json."""
    with open(path) as f:
        saved = json.load(f)
    scenarios = [SCENARIOS[k] for k in saved["results"]]
    record(doc, saved["meta"], scenarios, saved["results"])
    return 0


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--render" and sys.argv[3] == "--record":
        return render(sys.argv[2], sys.argv[4])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", required=True)
    ap.add_argument("--mem", default="4G")
    ap.add_argument("--fill-file", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=600, help="per migration, seconds")
    ap.add_argument("--tcp-raw", required=True)
    ap.add_argument("--scenarios", default=None,
                    help="comma-separated (default: precopy-1ch,postcopy-wss; with --tls: %s)"
                    % TLS_SCENARIOS)
    ap.add_argument("--tls", action="store_true",
                    help="the TLS comparison: each engine in clear and over TLS, side by side")
    ap.add_argument("--two-host", action="store_true",
                    help="the two-host model: each side in its own network namespace, "
                    "joined by a veth, pinned to a CPU of its own")
    ap.add_argument("--deadline", type=float, default=0,
                    help="seconds after which no new measurement starts (0: none)")
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
    ap.add_argument("--record", metavar="DOC",
                    help="rewrite the sections of DOC the scenarios belong to (migrate, "
                    "tls, zerocopy, postcopy)")
    ap.add_argument("--command", default="", help="command line to quote in the record")
    args = ap.parse_args()
    args.mem_bytes = parse_size(args.mem)
    if args.runs < 1 or args.mem_bytes < 64 * MIB or args.mem_bytes % MIB:
        ap.error("need --runs >= 1 and --mem >= 64M, a whole number of MiB")
    if os.path.getsize(args.fill_file) != args.mem_bytes:
        ap.error("fill file %s is not %d bytes" % (args.fill_file, args.mem_bytes))
    cfg = Config(args)

    scenarios = []
    names = args.scenarios or (TLS_SCENARIOS if args.tls else "precopy-1ch,postcopy-wss")
    for k in names.split(","):
        if k not in SCENARIOS:
            ap.error("unknown scenario %r (known: %s)" % (k, ", ".join(SCENARIOS)))
        scenarios.append(SCENARIOS[k])
    tls = [getattr(sc, "tls", False) for sc in scenarios]
    if args.tls and not all(tls):
        ap.error("--tls runs only the tls-* scenarios")
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
    tls_dir = None
    try:
        if any(tls):
            tls_dir = tempfile.mkdtemp(prefix="vmig-bench-tls-")
            cfg.tls_creds = tlscerts.x509_good(tls_dir)
        cfg.place.setup()
        results = run_matrix(cfg, scenarios, runtimes, procs)
    except KeyboardInterrupt:
        print("interrupted: tearing down", file=sys.stderr)
        return 130
    except tlscerts.CertError as e:
        print("cannot make the TLS credentials: %s" % e, file=sys.stderr)
        return 1
    except BenchError as e:
        print("bench/migrate: %s" % e, file=sys.stderr)
        return 1
    finally:
        procs.kill_all()
        for sc in scenarios:
            sc.finish(cfg)
        cfg.place.teardown()
        if tls_dir:
            shutil.rmtree(tls_dir, ignore_errors=True)

    meta = dict(facts, mem_bytes=cfg.mem_bytes, runs=cfg.runs, fill_file=cfg.fill_file,
                placement=cfg.place.key,
                command=args.command, qemu_version=all_rt["qemu"].version,
                commit=report.git_commit(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(cfg.results_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    status = report.print_tables(meta, scenarios, results)
    if args.record:
        record(args.record, meta, scenarios, results)
    return status


if __name__ == "__main__":
    sys.exit(main())
