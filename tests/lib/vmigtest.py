# SPDX-License-Identifier: MIT
"""Helpers for vmig's integration and interop tests (Python standard library only).

- QMP: a small QMP client (greeting, capabilities, commands, events).
- VM: starts build/vmig-vm with a QMP socket in a private temp dir and kills
  it at the end, whatever happens.
- Runner: runs test functions, prints `PASS: name` / `FAIL: name: reason`,
  and exits non-zero if any failed.

Every wait here is bounded in time; every process is killed on exit.
"""
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback


class QMPError(Exception):
    def __init__(self, cls, desc):
        super().__init__("%s: %s" % (cls, desc))
        self.cls = cls
        self.desc = desc


class QMP:
    """One QMP connection. Commands are synchronous; events are kept."""

    def __init__(self, path, timeout=30.0, negotiate=True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.buf = b""
        self.events = []
        self.greeting = self._read()
        if negotiate:
            self.cmd("qmp_capabilities")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _read(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("QMP connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send_raw(self, data):
        self.sock.sendall(data)

    def read_reply(self):
        """Next non-event message."""
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def cmd(self, name, **args):
        req = {"execute": name}
        if args:
            req["arguments"] = args
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        reply = self.read_reply()
        if "error" in reply:
            raise QMPError(reply["error"].get("class"), reply["error"].get("desc"))
        return reply.get("return")

    def hmp(self, line):
        return self.cmd("human-monitor-command", **{"command-line": line})

    def wait_event(self, name, timeout=30.0, pred=None):
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name and (pred is None or pred(ev.get("data", {}))):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no %s event within %.0fs" % (name, timeout))
            self.sock.settimeout(left)
            try:
                msg = self._read()
            finally:
                self.sock.settimeout(30.0)
            if "event" in msg:
                self.events.append(msg)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Procs:
    """Tracks started processes and temp dirs; kills/removes them at the end."""

    def __init__(self):
        self.procs = []
        self.dirs = []

    def tmpdir(self):
        d = tempfile.mkdtemp(prefix="vmig-test-")
        self.dirs.append(d)
        return d

    def start(self, argv, log):
        f = open(log, "wb")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        f.close()
        p.log = log
        self.procs.append(p)
        return p

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        self.procs = []
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.dirs = []


class VM:
    """A vmig-vm process with its QMP connection."""

    def __init__(self, procs, build, *args, name="vm"):
        self.name = name
        self.dir = procs.tmpdir()
        self.qmp_path = os.path.join(self.dir, name + ".qmp")
        self.log = os.path.join(self.dir, name + ".log")
        argv = [os.path.join(build, "vm", "vmig-vm"), "--qmp", "unix:" + self.qmp_path]
        argv += [str(a) for a in args]
        self.proc = procs.start(argv, self.log)
        try:
            self.qmp = QMP(self.qmp_path, timeout=30)
        except Exception:
            raise RuntimeError("vmig-vm did not come up: %s" % self.log_text())

    def log_text(self):
        try:
            with open(self.log, "rb") as f:
                return f.read().decode(errors="replace")[-2000:]
        except OSError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def status(self):
        return self.qmp.cmd("query-status")["status"]

    def migrate_status(self):
        return self.qmp.cmd("query-migrate")

    def check_guest_verifies(self, pages, timeout=20):
        """Waits until the running guest has re-checked `pages` pages, and
        fails unless it did, with no page found inconsistent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.guest()["pages-verified"] < pages:
            time.sleep(0.1)
        g = self.guest()
        check(g["pages-verified"] >= pages,
              "%s verified only %d pages" % (self.name, g["pages-verified"]))
        check(g["inconsistencies"] == 0, "%s saw inconsistent pages: %r" % (self.name, g))

    def wait_migration(self, timeout=120, states=("completed", "failed", "cancelled")):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.qmp.cmd("query-migrate")
            if info.get("status") in states:
                return info
            time.sleep(0.02)  # short: some states (postcopy-active) can be brief
        raise TimeoutError("migration did not finish within %ds: %r" % (timeout, info))

    def memory_digest(self, size):
        """SHA-256 of guest memory via pmemsave (independent of the engine)."""
        path = os.path.join(self.dir, "mem-%d.bin" % random.randrange(1 << 30))
        self.qmp.cmd("pmemsave", val=0, size=size, filename=path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
        got = os.path.getsize(path)
        os.unlink(path)
        if got != size:
            raise AssertionError("pmemsave wrote %d bytes, expected %d" % (got, size))
        return h.hexdigest()

    def hmp(self, line):
        return self.qmp.hmp(line)

    def guest(self):
        return self.qmp.cmd("x-vmig-query-guest")


class Runner:
    def __init__(self, build):
        self.build = os.path.abspath(build)
        self.passed = 0
        self.failed = 0

    def run(self, name, fn, *args):
        procs = Procs()
        t0 = time.monotonic()
        try:
            fn(procs, *args)
            self.passed += 1
            print("PASS: %s (%.1fs)" % (name, time.monotonic() - t0), flush=True)
        except Exception as e:  # any failure of the case, reported with its reason
            self.failed += 1
            reason = str(e).replace("\n", " | ")[:600]
            print("FAIL: %s: %s" % (name, reason), flush=True)
            traceback.print_exc(file=sys.stderr)
        finally:
            procs.cleanup()

    def finish(self):
        print("%d passed, %d failed" % (self.passed, self.failed), flush=True)
        return 0 if self.failed == 0 else 1


class Relay:
    """Forwards every TCP connection made to its port on to 127.0.0.1:target.

    Connections are numbered in the order they arrive (for vmig: 0 is the
    main channel; then the urgent or multifd channels). The test controls
    the link:
    - cut() breaks all current connections at once (a network failure);
    - with limit, the first connection is cut after `limit` bytes have gone
      from the client to the target (a stream truncated at that offset);
    - reverse_delay holds everything the target sends back for that many
      seconds (a slow return path), and freeze_reverse() holds it for good;
    - hold_reverse (a return-path message type, for vmig: 0x41, RESUMED)
      holds connection 0's reverse stream for good from the first message
      of that type on, whatever the timing (what came before it goes
      through); the event `held` is set then;
    - forward_delay {index: seconds} delivers what connection index sends
      that much later (a late connection; not slower, still in order);
    - drop: the indices of connections closed as soon as they arrive;
    - inject(i, data) puts data into connection i's forward stream before
      its next chunk, flip(i) flips one byte in the middle of its next chunk
      of at least min_chunk bytes, truncate(i) ends its forward stream.
    Bounded: it stops accepting after 300 s or close().
    """

    def __init__(self, target, limit=None, reverse_delay=0.0, forward_delay=None, drop=(),
                 hold_reverse=None):
        self.target = target
        self.limit = limit
        self.reverse_delay = reverse_delay
        self.hold_reverse = hold_reverse
        self.held = threading.Event()
        self.forward_delay = forward_delay or {}
        self.drop = set(drop)
        self.frozen = False
        self.stalled_until = 0.0
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self.socks = []
        self.conns = []  # (client, target) sockets, by arrival
        self.hooks = {}  # connection index -> function(chunk) -> chunk, used once
        self.dropped = set()  # connection indices whose pump forwards nothing more
        self.applied = threading.Event()
        self.lock = threading.Lock()
        self.stop = False
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _hook(self, index, data):
        with self.lock:
            fn = self.hooks.get(index)
            if fn is None:
                return data
            out = fn(data)
            if out is None:
                return data
            del self.hooks[index]
        self.applied.set()
        return out

    def _pump(self, a, b, limit, index=None):
        left = limit
        try:
            while left is None or left > 0:
                d = a.recv(262144 if left is None else min(262144, left))
                if not d:
                    break
                if left is not None:
                    left -= len(d)
                if index is not None:
                    d = self._hook(index, d)
                    if index in self.dropped:
                        break  # cut below, before any later byte goes through
                self._wait_stall()
                b.sendall(d)
        except OSError:
            pass
        if limit is not None:
            self.cut()
            return
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _wait_stall(self):
        while time.monotonic() < self.stalled_until and not self.stop:
            time.sleep(0.01)

    def _pump_back(self, b, a, index):
        """Target to client, late by reverse_delay, or not at all once frozen
        (or, on connection 0 with hold_reverse, from that message on)."""
        hold = self.hold_reverse if index == 0 else None
        if not self.reverse_delay and hold is None:
            return self._pump(b, a, None)
        self._delay_line(b, a, self.reverse_delay, True, hold)

    def _until_message(self, hold):
        """A function(chunk) -> (the part before the first message of type
        hold, whether it came), reading vmig's framing (struct
        vmig_wire_rec: u8 type, u8 flags, u16 reserved, u32 len, then len
        bytes) across chunks."""
        header = bytearray()
        skip = [0]

        def split(d):
            i = 0
            while i < len(d):
                if skip[0]:
                    n = min(skip[0], len(d) - i)
                    skip[0] -= n
                    i += n
                    continue
                if not header and d[i] == hold:
                    return d[:i], True
                n = min(8 - len(header), len(d) - i)
                header.extend(d[i:i + n])
                i += n
                if len(header) == 8:
                    skip[0] = struct.unpack_from("<I", header, 4)[0]
                    header.clear()
            return d, False
        return split

    def _delay_line(self, b, a, delay, freezable, hold=None):
        """b to a, each chunk sent delay seconds after it arrived; with hold,
        nothing from the first message of that type on."""
        split = self._until_message(hold) if hold is not None else None
        held = False
        queue = []
        cond = threading.Condition()
        done = []

        def sender():
            while True:
                with cond:
                    while not queue and not done:
                        cond.wait(0.1)
                    if not queue or self.stop:
                        return
                    due, d = queue[0]
                    now = time.monotonic()
                    if now < due or (freezable and self.frozen):
                        cond.wait(min(max(due - now, 0.005), 0.05))
                        continue
                    queue.pop(0)
                self._wait_stall()
                try:
                    a.sendall(d)
                except OSError:
                    return

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        try:
            while True:
                d = b.recv(262144)
                if not d:
                    break
                if held:
                    continue  # read on, so that the target never blocks
                if split:
                    d, held = split(d)
                    if held:
                        self.held.set()
                    if not d:
                        continue
                with cond:
                    queue.append((time.monotonic() + delay, d))
                    cond.notify()
        except OSError:
            pass
        with cond:
            done.append(True)
            cond.notify()

    def _accept(self):
        deadline = time.monotonic() + 300
        while not self.stop and time.monotonic() < deadline:
            try:
                a, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            if self.accepted in self.drop:
                self.accepted += 1
                a.close()
                continue
            try:
                b = socket.create_connection(("127.0.0.1", self.target), timeout=30)
            except OSError:  # the target is gone: so is this connection
                a.close()
                continue
            a.settimeout(None)
            b.settimeout(None)
            with self.lock:
                self.socks += [a, b]
                self.conns.append((a, b))
                index = self.accepted
            limit = self.limit if self.accepted == 0 else None
            self.accepted += 1
            if index in self.forward_delay:
                threading.Thread(target=self._delay_line,
                                 args=(a, b, self.forward_delay[index], False),
                                 daemon=True).start()
            else:
                threading.Thread(target=self._pump, args=(a, b, limit, index),
                                 daemon=True).start()
            threading.Thread(target=self._pump_back, args=(b, a, index), daemon=True).start()

    def freeze_reverse(self):
        self.frozen = True

    def inject(self, index, data):
        with self.lock:
            self.hooks[index] = lambda chunk: data + chunk

    def flip(self, index, min_chunk=65536):
        def fn(chunk):
            if len(chunk) < min_chunk:
                return None
            mid = len(chunk) // 2
            return chunk[:mid] + bytes([chunk[mid] ^ 0x5a]) + chunk[mid + 1:]
        with self.lock:
            self.hooks[index] = fn

    def drop_first(self, index, late=0.0):
        """Connection `index` is cut before its first byte reaches the
        target (for vmig: before its preamble). Its pump stops at that
        chunk and shuts both sides down: nothing after it goes through, as
        on a real link, where a stream never loses its start and goes on.
        With late, the cut comes that many seconds after the first chunk,
        and nothing is read meanwhile: the client fills the window first,
        so it has nothing more in flight when the FIN reaches it."""
        def fn(chunk):
            time.sleep(late)
            self.dropped.add(index)
            return b""
        with self.lock:
            self.hooks[index] = fn

    def truncate(self, index):
        with self.lock:
            a, b = self.conns[index]
        for s, how in ((a, socket.SHUT_RD), (b, socket.SHUT_WR)):
            try:
                s.shutdown(how)
            except OSError:
                pass

    def cut_conn(self, index, direction="both"):
        """Breaks connection `index`: both ways, or only "forward" (client
        to target) or "reverse" (target to client: for vmig's main channel,
        the return path)."""
        with self.lock:
            if index >= len(self.conns):
                return False
            a, b = self.conns[index]
        pairs = {"both": ((a, socket.SHUT_RDWR), (b, socket.SHUT_RDWR)),
                 "forward": ((a, socket.SHUT_RD), (b, socket.SHUT_WR)),
                 "reverse": ((b, socket.SHUT_RD), (a, socket.SHUT_WR))}[direction]
        for s, how in pairs:
            try:
                s.shutdown(how)
            except OSError:
                pass
        return True

    def stall(self, seconds):
        """Holds every byte, both ways, for `seconds` (a stalled link)."""
        self.stalled_until = time.monotonic() + seconds

    def cut(self):
        with self.lock:
            for s in self.socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.socks = []

    def close(self):
        self.stop = True
        self.cut()
        self.lsock.close()


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def push_after_requests(src, dst, timeout=60, running=lambda: True):
    """The post-copy push held back by a max-postcopy-bandwidth set before the
    switch: wait (while running()) until both sides have counted a page
    request, then let the push run free. Unlimited, the push may place all of
    RAM before a running destination's vCPUs first fault."""
    deadline = time.monotonic() + timeout
    while running():
        info, dinfo = src.qmp.cmd("query-migrate"), dst.qmp.cmd("query-migrate")
        if (info.get("ram", {}).get("postcopy-requests", 0) > 0 and
                dinfo.get("x-vmig-postcopy-requests", 0) > 0):
            break
        if info.get("status") in ("completed", "failed", "cancelled"):
            break  # the caller's checks say what went wrong
        check(time.monotonic() < deadline, "no page request within %ds: source %r, "
              "destination %r" % (timeout, info.get("ram"), dinfo))
        time.sleep(0.05)
    src.qmp.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})


def cancel_midway(src, dst, bandwidth):
    """Starts a migration capped at bandwidth bytes/s, cancels it after a
    second, and checks that the source is back to running and the guest
    still writes, and that the destination ended the migration and answers."""
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": bandwidth})
    uri = "tcp:127.0.0.1:%d" % free_port()
    dst.qmp.cmd("migrate-incoming", uri=uri)
    src.qmp.cmd("migrate", uri=uri)
    time.sleep(1.0)
    src.qmp.cmd("migrate_cancel")
    info = src.wait_migration(30)
    check(info["status"] == "cancelled", "status after cancel: %r" % info["status"])
    check(src.status() == "running", "source not running after cancel: %s" % src.status())
    if src.guest()["workload"] != "idle":
        w0 = src.guest()["pages-written"]
        deadline = time.monotonic() + 10
        while src.guest()["pages-written"] <= w0:
            check(time.monotonic() < deadline, "source guest stopped writing after cancel")
            time.sleep(0.05)
    d = dst.wait_migration(30)
    check(d["status"] in ("failed", "cancelled"), "destination status %r" % d["status"])
    check(dst.qmp.cmd("query-status") is not None, "destination stopped answering")


def wait_completed(src, dst, src_timeout=120, dst_timeout=60):
    """Waits until both sides of a migration end, checks that both completed
    (else fails with each side's error-desc), returns their query-migrate."""
    info = src.wait_migration(src_timeout)
    dinfo = dst.wait_migration(dst_timeout)
    check(info["status"] == "completed", "source %r: %s" % (info["status"],
                                                          info.get("error-desc")))
    check(dinfo["status"] == "completed", "destination %r: %s" % (dinfo["status"],
                                                               dinfo.get("error-desc")))
    return info, dinfo
