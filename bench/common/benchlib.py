# SPDX-License-Identifier: MIT
"""Helpers shared by the bench/ scripts: a small QMP client, process
bookkeeping that guarantees teardown, CPU accounting from /proc, free
loopback ports, medians, and rewriting one marked section of a markdown file.

Only the Python 3 standard library is used. Nothing here talks to anything
but 127.0.0.1 and UNIX sockets the caller created. QMP peers are our own
children, but replies are still parsed defensively: a malformed line is an
error for the caller, never a crash in the middle of teardown.
"""

import json
import os
import signal
import socket
import statistics
import subprocess
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A run could not be measured; the message says why."""


class Qmp:
    """One QMP connection over a UNIX socket (QEMU wire protocol).

    Events that arrive while waiting for a reply are kept in self.events.
    Not thread-safe: one caller at a time.
    """

    def __init__(self, path, timeout_s=120.0):
        self.path = path
        self.events = []
        self._buf = b""
        deadline = time.monotonic() + timeout_s
        last_err = None
        self.sock = None
        while time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                self.sock = s
                break
            except OSError as e:
                last_err = e
                s.close()
                time.sleep(0.1)
        if self.sock is None:
            raise BenchError("QMP %s: cannot connect: %s" % (path, last_err))
        # The greeting only comes once the VMM's main loop runs, which for a
        # preallocated multi-GiB guest can take a while.
        greeting = self._read_msg(deadline)
        if "QMP" not in greeting:
            raise BenchError("QMP %s: no greeting: %r" % (path, greeting))
        self.execute("qmp_capabilities")

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _read_msg(self, deadline):
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("QMP %s: timed out waiting for a reply" % self.path)
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as e:
                raise BenchError("QMP %s: %s" % (self.path, e))
            if not chunk:
                raise BenchError("QMP %s: connection closed" % self.path)
            self._buf += chunk
            if len(self._buf) > (16 << 20):
                raise BenchError("QMP %s: reply too long" % self.path)
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise BenchError("QMP %s: bad JSON: %r" % (self.path, line[:200]))
        if not isinstance(msg, dict):
            raise BenchError("QMP %s: reply is not an object" % self.path)
        return msg

    def execute(self, cmd, args=None, timeout_s=30.0):
        """Runs cmd and returns its "return" value; raises BenchError on an error reply."""
        req = {"execute": cmd}
        if args is not None:
            req["arguments"] = args
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as e:
            raise BenchError("QMP %s: send %s: %s" % (self.path, cmd, e))
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self._read_msg(deadline)
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                err = msg["error"]
                desc = err.get("desc") if isinstance(err, dict) else err
                raise BenchError("QMP %s: %s failed: %s" % (self.path, cmd, desc))
            if "return" in msg:
                return msg["return"]
            raise BenchError("QMP %s: unexpected reply %r" % (self.path, msg))


class Procs:
    """Every process a bench starts, so all of them die at the end.

    Children are started in their own session so a stray grandchild is
    reached by killpg too. kill_all() is idempotent and bounded in time.
    """

    def __init__(self):
        self.procs = []

    def start(self, argv, log_path):
        log = open(log_path, "wb")
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self.procs.append(p)
        return p

    def stop(self, p, grace_s=5.0):
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if p in self.procs:
            self.procs.remove(p)

    def kill_all(self):
        for p in list(self.procs):
            self.stop(p, grace_s=2.0)


def _signal_group(p, sig):
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass


def cpu_seconds(pid):
    """utime + stime of a whole process (all threads), in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_tcp_port():
    """A loopback port that was free a moment ago (the VMM binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def mem_available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def host_facts():
    """Date, kernel and CPU model, for the record."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "kernel": os.uname().release,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
    }


def replace_section(path, begin, end, body):
    """Rewrites the text between the begin and end markers of path.

    The file is re-read right before writing and replaced atomically, so an
    edit someone else made outside the markers is kept.
    """
    with open(path) as f:
        text = f.read()
    i = text.find(begin)
    j = text.find(end, i + len(begin)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise BenchError("%s: markers %s ... %s not found" % (path, begin, end))
    text = text[:i + len(begin)] + "\n" + body.rstrip("\n") + "\n" + text[j:]
    tmp = path + ".tmp.%d" % os.getpid()
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _cpu_times():
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals[:8]), idle


def host_busy_cpu_seconds():
    """CPU seconds all CPUs have spent busy (not idle or iowait) since boot."""
    total, idle = _cpu_times()
    return (total - idle) / CLK_TCK


def host_busy_fraction(interval_s=1.0):
    """Share of all CPUs busy over interval_s (0..1), whoever used them."""
    total0, idle0 = _cpu_times()
    time.sleep(interval_s)
    total1, idle1 = _cpu_times()
    if total1 <= total0:
        return 0.0
    return 1.0 - (idle1 - idle0) / (total1 - total0)


def wait_quiet(max_busy, timeout_s):
    """Waits, up to timeout_s, until the host is at most max_busy busy.

    On a small shared machine someone else's build can halve a result, so
    each measurement starts on a quiet host when possible. Returns the last
    busy fraction seen (the caller records it next to the result).
    """
    deadline = time.monotonic() + timeout_s
    busy = host_busy_fraction()
    while busy > max_busy and time.monotonic() < deadline:
        busy = host_busy_fraction()
    return busy


def thread_cpu_seconds(pid):
    """{tid: (thread name, utime + stime seconds)} for every thread of pid."""
    out = {}
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                data = f.read()
        except OSError:
            continue  # the thread exited meanwhile
        name = data[data.index("(") + 1:data.rindex(")")]
        fields = data[data.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def thread_cpu_delta(before, after):
    """CPU seconds per thread between two thread_cpu_seconds() samples.

    Keyed by thread name, or "name#tid" when several busy threads share a
    name (unnamed threads inherit the process name). Threads that exited
    before the later sample are missing (their time still counts in the
    process total).
    """
    per_tid = {}
    for tid, (name, secs) in after.items():
        d = round(secs - before.get(tid, (name, 0.0))[1], 2)
        if d > 0:
            per_tid[tid] = (name, d)
    names = [n for n, _ in per_tid.values()]
    acc = {}
    for tid, (name, d) in per_tid.items():
        acc[name if names.count(name) == 1 else "%s#%d" % (name, tid)] = d
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))
