# SPDX-License-Identifier: MIT
"""Shared harness for the vmig-blk interop tests: real QEMU 7.2 (TCG) with a
Linux guest whose disk is a vhost-user-blk backend.

It starts and always reaps the processes a test needs (the backend under test,
QEMU), builds or reuses the cached test guest (tests/interop/guest/build.sh),
talks QMP and the backend's JSON-RPC, and parses the guest's "VMIG-GUEST:"
lines. Results are printed as "PASS: name" / "FAIL: name: reason".

The backend is vmig-blk unless VBLK_BACKEND=qsd selects qemu-storage-daemon,
the reference implementation of the same protocol (used to validate the
harness itself). Everything lives in a fresh mktemp directory, removed when
all cases passed and kept (its path printed) when one failed. Only the
Python 3 standard library is used.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST_BUILD = os.path.join(HERE, "..", "guest", "build.sh")
QSD_SERIAL = "vhost_user_blk"  # what qemu-storage-daemon 7.2 answers to GET_ID


class Fail(Exception):
    """A setup step failed: the current case (and what depends on it) fails."""


def find_vmig_blk(build_dir):
    for rel in ("vmig-blk", "tools/vmig-blk/vmig-blk"):
        p = os.path.join(build_dir, rel)
        if os.access(p, os.X_OK) and os.path.isfile(p):
            return p
    return None


class Proc:
    """A child process with its output in a log file; killed by pid only."""

    def __init__(self, env, name, argv):
        self.name, self.argv, self.env = name, argv, env
        self.log = os.path.join(env.tmp, name + ".log")
        self.p = None

    def start(self):
        out = open(self.log, "ab")
        try:
            self.p = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()
        return self

    @property
    def pid(self):
        return self.p.pid if self.p else None

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def kill9(self):
        if self.alive():
            self.p.send_signal(signal.SIGKILL)
        if self.p is not None:
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def stop(self, grace_s=2.0):
        if not self.alive():
            return
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill9()

    def text(self):
        try:
            with open(self.log, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


class Backend:
    """The vhost-user-blk server under test, restartable with identical args."""

    def __init__(self, env, name, sock, image, serial, shared=False, extra=()):
        self.env, self.sock, self.image, self.serial = env, sock, image, serial
        self.rpc = sock + ".rpc"
        self.kind = env.backend_kind
        if self.kind == "qsd":
            # locking=off: two daemons share one image in the migration test.
            argv = ["qemu-storage-daemon",
                    "--blockdev", "driver=file,node-name=file,filename=%s,locking=off" % image,
                    "--blockdev", "driver=raw,node-name=raw,file=file",
                    "--export", "type=vhost-user-blk,id=exp,node-name=raw,addr.type=unix,"
                    "addr.path=%s,writable=on" % sock]
            self.serial = QSD_SERIAL
        else:
            # Not --quiet: connections, ring recoveries and errors go to the
            # backend's log in the test dir (VMIG_BLK_DEBUG=1 in the
            # environment adds every vhost-user message).
            argv = [env.vmig_blk, "--socket", sock, "--file", image, "--rpc", self.rpc,
                    "--serial", serial]
            if shared:
                # Two back-ends on one image (a migration): vmig-blk locks
                # its image like QEMU's locking=on, so the second would
                # refuse to start. The test coordinates them instead.
                argv.append("--no-lock")
            argv += list(extra)
        self.proc = Proc(env, name, argv)
        env.procs.append(self.proc)
        env.backends.append(self)
        self.starts = 0

    def _sock_ino(self):
        # Inode numbers get reused after an unlink, so the change time too.
        try:
            st = os.stat(self.sock)
            return (st.st_ino, st.st_ctime_ns)
        except OSError:
            return None

    def start(self, timeout_s=10.0):
        """Starts (or restarts) it and waits until its socket is a new inode:
        connecting to probe would count as a front-end connection."""
        old = self._sock_ino()
        self.proc.start()
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ino = self._sock_ino()
            if ino is not None and ino != old:
                return self
            if not self.proc.alive():
                raise Fail("%s exited at start: %s" % (self.kind, self.proc.text()[-400:]))
            time.sleep(0.02)
        raise Fail("%s socket %s did not appear in %.0fs" % (self.kind, self.sock, timeout_s))

    def kill9(self):
        self.proc.kill9()

    def rpc_call(self, method, params=None, timeout_s=10.0):
        """JSON-RPC 2.0 over the backend's unix socket; returns 'result'."""
        req = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            req["params"] = params
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout_s)
        try:
            s.connect(self.rpc)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            dec = json.JSONDecoder()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                try:
                    obj, _ = dec.raw_decode(buf.decode(errors="replace").strip())
                    break
                except ValueError:
                    continue
            else:
                raise Fail("rpc %s: timeout" % method)
            obj = json.loads(buf.decode(errors="replace").strip())
        except (OSError, ValueError) as e:
            raise Fail("rpc %s: %s" % (method, e))
        finally:
            s.close()
        if "error" in obj:
            raise Fail("rpc %s: error %s" % (method, obj["error"]))
        return obj.get("result")


def find_key(obj, key):
    """First value of key anywhere in a JSON structure, or None."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            r = find_key(v, key)
            if r is not None:
                return r
    return None


class Qmp:
    """Minimal QMP client: one JSON object per line, events skipped."""

    def __init__(self, path, timeout_s=20.0):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.settimeout(timeout_s)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.monotonic() > deadline:
                    raise Fail("QMP socket %s not reachable" % path)
                time.sleep(0.1)
        self.f = self.s.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.f.readline()
        if not line:
            raise Fail("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        for _ in range(1000):
            r = self._read()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise Fail("QMP %s: %s" % (name, r["error"].get("desc", r["error"])))
        raise Fail("QMP %s: no reply" % name)

    def close(self):
        try:
            self.f.close()
            self.s.close()
        except OSError:
            pass


# Guest RAM size in KiB. 256 MiB + 8 KiB, on purpose: QEMU 7.2 under TCG
# loses guest CPU stores during pre-copy migration when the RAM block's
# length is a multiple of 64 pages (256 KiB). Its dirty-bitmap sync then takes
# a word-at-a-time fast path that clears the migration dirty bits without
# resetting the TCG TLB's not-dirty flags, so a page the guest keeps writing
# through a cached TLB entry is never marked dirty again and the destination
# gets a stale copy (kernel stacks, slab, bios: guest oopses or EIO storms
# whatever the disk back-end is; reproduced with QEMU's own virtio-blk, no
# vhost-user involved). Upstream fixed it in 9.0 (commit 03bfc2188f,
# "physmem: Fix migration dirty bitmap coherency with TCG memory access");
# Debian 12's 7.2 does not carry the fix. With a length that is not a
# multiple of 64 pages QEMU takes its per-page path, which resets the TLB
# for every page whose bit it clears. QEMU rounds -m to 8 KiB, so +8 KiB.
GUEST_MEM_KB = 256 * 1024 + 8


class Guest:
    """One QEMU running the test guest on a vhost-user-blk socket."""

    def __init__(self, env, name, sock, guest_args, incoming=False, mem_kb=GUEST_MEM_KB):
        self.env, self.name = env, name
        self.serial_log = os.path.join(env.tmp, name + ".serial")
        self.qmp_path = os.path.join(env.tmp, name + ".qmp")
        # A second monitor, for a client such as `vmig migrate` while the
        # test holds the first (a QMP socket serves one client at a time).
        self.qmp2_path = os.path.join(env.tmp, name + ".qmp2")
        append = "console=ttyS0 quiet panic=-1 vmig.test=blkcheck vmig.args=" + \
            ",".join(str(a) for a in guest_args)
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "%dK" % mem_kb,
                "-object", "memory-backend-memfd,id=mem,size=%dK,share=on" % mem_kb,
                "-numa", "node,memdev=mem",
                "-kernel", env.kernel, "-initrd", env.initrd, "-append", append,
                "-display", "none", "-nodefaults", "-serial", "file:" + self.serial_log,
                "-no-reboot", "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path,
                "-qmp", "unix:%s,server=on,wait=off" % self.qmp2_path,
                "-chardev", "socket,id=c0,path=%s,reconnect=1" % sock,
                "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]
        if incoming:
            argv += ["-incoming", "defer"]
        self.proc = Proc(env, name, argv)
        env.procs.append(self.proc)
        env.guests.append(self)
        self.qmp = None

    def start(self):
        self.proc.start()
        self.qmp = Qmp(self.qmp_path)
        self.env.qmps.append(self.qmp)
        return self

    def serial(self):
        try:
            with open(self.serial_log, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_line(self, pattern, timeout_s):
        """Waits for a serial line matching the regex; returns the match."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = rx.search(self.serial())
            if m:
                return m
            if not self.proc.alive():
                m = rx.search(self.serial())
                if m:
                    return m
                raise Fail("QEMU %s exited before '%s': %s" %
                           (self.name, pattern, self.proc.text()[-300:].strip()))
            time.sleep(0.1)
        raise Fail("timeout (%.0fs) waiting for '%s' on %s" % (timeout_s, pattern, self.name))

    def result(self, timeout_s):
        """Waits for the guest's RESULT line and its powering off."""
        m = self.wait_line(r"^VMIG-GUEST: RESULT (.*)$", timeout_s)
        return m.group(1).strip()

    def last_progress(self):
        return parse_kv_lines(self.serial(), "PROGRESS")[-1:] or [{}]


def parse_kv_lines(text, tag):
    """All 'VMIG-GUEST: TAG k=v ...' lines of text as dicts of strings."""
    out = []
    for line in text.splitlines():
        if line.startswith("VMIG-GUEST: " + tag + " "):
            out.append(dict(kv.split("=", 1) for kv in line.split()[2:] if "=" in kv))
    return out


def writes_of(text):
    """The guest program's write count in its last PROGRESS line of text."""
    p = parse_kv_lines(text, "PROGRESS")
    return int(p[-1].get("writes", "0")) if p else 0


# ---- Bounded waits on the guest and the daemon; reaching a bound fails ----

WAIT_S = 120


def wait_until(what, cond, timeout_s=WAIT_S, step_s=0.02):
    """Polls cond() until it returns something true; raises Fail on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step_s)
    raise Fail("no %s within %.0f s" % (what, timeout_s))


def writes_now(guest):
    return writes_of(guest.serial())


def wait_writes(guest, than, timeout_s=WAIT_S):
    """Waits until the guest reports more than `than` completed writes. The
    guest stops early on an I/O error or a bad block: that fails the wait
    (case guest_progress) with what it saw."""
    def cond():
        text = guest.serial()
        if "VMIG-GUEST: SUMMARY" in text:
            virtio = [l.strip() for l in text.splitlines() if "virtio" in l][:2]
            e = Fail("the guest stopped before the test was done: %s; %s %s" % (
                first_lines(text, "SUMMARY", 1),
                first_lines(text, "IOERR") or first_lines(text, "BAD"), " | ".join(virtio)))
            e.case = "guest_progress"
            raise e
        return writes_now(guest) > than
    wait_until("guest progress past %d writes" % than, cond, timeout_s)


def controller(be):
    """The daemon's controller (vhost_get_controllers), or None if it does
    not answer (killed, restarting)."""
    try:
        return be.rpc_call("vhost_get_controllers", timeout_s=5)[0]
    except (Fail, IndexError, TypeError):
        return None


def queue0(be):
    """(controller, its queue 0); ({} for the queue) if either is missing."""
    c = controller(be)
    return c, ((c or {}).get("queues") or [{}])[0]


def wait_inflight(be, at_least):
    """Waits until the daemon reports at least `at_least` requests taken from
    queue 0 and not returned; returns that count."""
    def cond():
        n = queue0(be)[1].get("inflight_requests", 0)
        return n if n >= at_least else 0
    return wait_until("%d requests in flight in the daemon" % at_least, cond)


def wait_held(be, at_least):
    """Waits until the daemon holds at least `at_least` requests of queue 0
    for its latency (vmig_blk_set_latency): taken and neither at the disk nor
    returned, so none can complete before a kill that follows. Requests in
    flight are not enough: one already at the disk when the latency was set
    still completes at once, and the guest's next request may not be taken
    yet when the kill comes. Returns the count."""
    def cond():
        n = queue0(be)[1].get("delayed_requests", 0)
        return n if n >= at_least else 0
    return wait_until("%d requests held in the daemon" % at_least, cond)


def wait_serving(be):
    """Waits until a (re)started daemon has QEMU connected and queue 0
    running; returns (controller, queue 0)."""
    def cond():
        c, q = queue0(be)
        return (c, q) if c and c.get("connected") and q.get("started") else None
    return wait_until("reconnection and ring start", cond)


class MigrationPair:
    """What the migration tests share: two back-ends on one image, a source
    guest that writes and verifies blocks for `seconds`, and a destination
    guest waiting for the migration (-incoming defer). Once started, the
    source guest has been writing for 5 s, and writes_before holds its count.
    With storage_uri, each back-end has a local image of its own instead,
    the destination's empty and waiting for the disk on storage_uri
    (vmig-blk --incoming)."""

    def __init__(self, env, seconds, storage_uri=None, prefix="", mem_kb=GUEST_MEM_KB):
        self.image = env.image(prefix + "disk.img")
        self.sock_src = os.path.join(env.tmp, prefix + "src.sock")
        self.sock_dst = os.path.join(env.tmp, prefix + "dst.sock")
        self.be_src = env.backend(prefix + "backend-src", self.sock_src, self.image,
                                  shared=not storage_uri).start()
        if storage_uri:
            self.image_dst = env.image(prefix + "disk-dst.img")
            self.be_dst = env.backend(prefix + "backend-dst", self.sock_dst, self.image_dst,
                                      extra=["--incoming", storage_uri]).start()
        else:
            self.image_dst = self.image
            self.be_dst = env.backend(prefix + "backend-dst", self.sock_dst, self.image,
                                      shared=True).start()
        args = ["--seconds", seconds, "--blocks", 8192, "--write-pct", 60,
                "--gap-ms", 100, "--progress-ms", 500]
        self.src = Guest(env, prefix + "qemu-src", self.sock_src, args, mem_kb=mem_kb).start()
        self.dst = Guest(env, prefix + "qemu-dst", self.sock_dst, args, incoming=True,
                         mem_kb=mem_kb).start()
        self.src.wait_line(r"^VMIG-GUEST: READY", 60)
        time.sleep(5)
        self.writes_before = writes_of(self.src.serial())

    def stop(self):
        for p in (self.src.proc, self.dst.proc, self.be_src.proc, self.be_dst.proc):
            p.stop()

    def check_destination(self, env, writes_at_switch, timeout_s):
        """The destination guest went on writing, and its final pass read back
        every block: no I/O error, no bad block. Returns its summary."""
        result = self.dst.result(timeout_s=timeout_s)
        env.case("guest_ran_on_destination",
                 writes_of(self.dst.serial()) > writes_at_switch + 100,
                 "writes %d at switch-over, %d last seen on the destination" %
                 (writes_at_switch, writes_of(self.dst.serial())))
        return env.check_summary(self.dst, result, min_writes=1000)

    def finish(self, env):
        """Stops everything, then checks the image (the destination's) from
        the host."""
        self.stop()
        rc, scan, out = env.scan_image(self.image_dst)
        env.case("image_consistent", rc == 0 and int(scan.get("pattern", 0)) > 0,
                 "host scan: %s" % out.strip()[-300:])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Env:
    """Per-test environment: temp dir, processes, result bookkeeping."""

    def __init__(self, test_name, build_dir=None):
        if build_dir is None:
            if len(sys.argv) != 2 or not os.path.isabs(sys.argv[1]):
                print("usage: %s BUILD_DIR (absolute)" % sys.argv[0], file=sys.stderr)
                sys.exit(2)
            build_dir = sys.argv[1]
        self.build_dir = build_dir
        self.test_name = test_name
        self.backend_kind = os.environ.get("VBLK_BACKEND", "vmig-blk")
        self.tmp = tempfile.mkdtemp(prefix="vblk-%s." % test_name)
        self.procs, self.qmps = [], []
        self.backends, self.guests = [], []  # for dump_state
        self.dumped = False
        self.failed = 0
        self.vmig_blk = None
        self.kernel = self.initrd = self.blkcheck = None
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame):
        raise SystemExit(128 + signum)

    def case(self, name, ok, reason=""):
        if ok:
            print("PASS: %s" % name, flush=True)
        else:
            self.failed += 1
            print("FAIL: %s: %s" % (name, reason or "failed"), flush=True)
        return ok

    def info(self, text):
        print("# " + text, flush=True)

    def prepare(self):
        """Checks tools, builds the guest; raises Fail with the reason."""
        for tool in ("qemu-system-x86_64", "gcc", "cpio"):
            if shutil.which(tool) is None:
                raise Fail("%s not installed (scripts/install-deps.sh)" % tool)
        if self.backend_kind == "qsd":
            if shutil.which("qemu-storage-daemon") is None:
                raise Fail("qemu-storage-daemon not installed")
        elif self.backend_kind == "vmig-blk":
            self.vmig_blk = find_vmig_blk(self.build_dir)
            if self.vmig_blk is None:
                raise Fail("no vmig-blk binary in %s" % self.build_dir)
        else:
            raise Fail("VBLK_BACKEND=%s: want vmig-blk or qsd" % self.backend_kind)
        r = subprocess.run([GUEST_BUILD, os.path.join(self.build_dir, "interop-guest")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
        if r.returncode != 0:
            raise Fail("guest build failed: %s" % r.stderr.decode(errors="replace")[-400:])
        gdir = r.stdout.decode().strip().splitlines()[-1]
        with open(os.path.join(gdir, "kernel")) as f:
            self.kernel = f.read().strip()
        self.initrd = os.path.join(gdir, "initramfs.cpio.gz")
        self.blkcheck = os.path.join(gdir, "blkcheck")
        self.info("backend=%s tmp=%s" % (self.backend_kind, self.tmp))

    def image(self, name="disk.img", size_mb=64):
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.truncate(size_mb << 20)
        return path

    def backend(self, name, sock, image, serial="vmig-test-disk", shared=False, extra=()):
        return Backend(self, name, sock, image, serial, shared, extra)

    def scan_image(self, image):
        """Host-side check: every block zero or a valid, well-placed pattern."""
        r = subprocess.run([self.blkcheck, "--scan", image], stdout=subprocess.PIPE,
                           timeout=120)
        out = r.stdout.decode(errors="replace")
        scan = parse_kv_lines(out, "SCAN")
        return r.returncode, (scan[0] if scan else {}), out

    def check_summary(self, guest, result, min_writes=1):
        """The standard cases on a finished guest run."""
        text = guest.serial()
        summ = parse_kv_lines(text, "SUMMARY")
        s = summ[-1] if summ else {}
        self.case("guest_result_ok", result == "ok", "guest said RESULT %s" % result)
        self.case("zero_io_errors", s.get("io_errors") == "0",
                  "io_errors=%s; %s" % (s.get("io_errors"), first_lines(text, "IOERR")))
        self.case("zero_bad_blocks", s.get("bad_blocks") == "0",
                  "bad_blocks=%s; %s" % (s.get("bad_blocks"), first_lines(text, "BAD")))
        writes = int(s.get("writes", "0"))
        self.case("guest_did_io", writes >= min_writes,
                  "only %d writes (want >= %d)" % (writes, min_writes))
        return s

    def _reap_strays(self):
        """A live upgrade replaces the daemon with a process we did not spawn
        directly; it (and anything else left) is found by our unique temp
        dir on its command line and killed by pid."""
        me = os.getpid()
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == me:
                continue
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if any(self.tmp.encode() in a for a in argv):
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass

    def dump_state(self):
        """After a failure, while the processes still run: where each
        vmig-blk's queues stand and how far each guest got, so that a
        stall seen once in CI can be told apart (a missed kick, a disk
        that stopped answering, a guest that was not called)."""
        if self.dumped:
            return
        self.dumped = True
        for be in self.backends:
            if be.kind != "vmig-blk" or not be.proc.alive():
                continue
            try:
                c = be.rpc_call("vhost_get_controllers", timeout_s=5)[0]
                print("# --- %s queues: %s" % (be.proc.name, json.dumps(c.get("queues"))),
                      file=sys.stderr)
            except (Fail, IndexError, TypeError, AttributeError) as e:
                print("# --- %s: no state (%s)" % (be.proc.name, e), file=sys.stderr)
        for g in self.guests:
            tail = g.serial()[-1500:].strip()
            if tail:
                print("# --- %s serial (%s) ---" % (g.name, g.serial_log), file=sys.stderr)
                print(tail, file=sys.stderr)

    def finish(self):
        for q in self.qmps:
            q.close()
        for p in reversed(self.procs):
            p.stop()
        self._reap_strays()
        if self.failed == 0 and not os.environ.get("VBLK_KEEP_LOGS"):
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.failed == 0:
            self.info("logs kept in %s (VBLK_KEEP_LOGS)" % self.tmp)
        else:
            self.info("logs kept in %s" % self.tmp)
            for p in self.procs:
                tail = p.text()[-1500:].strip()
                if tail:
                    print("# --- %s (%s) ---" % (p.name, p.log), file=sys.stderr)
                    print(tail, file=sys.stderr)
        return 1 if self.failed else 0


def first_lines(text, tag, n=3):
    lines = [l for l in text.splitlines() if l.startswith("VMIG-GUEST: " + tag)]
    return " | ".join(lines[:n])


def run(test_name, body, prepare=True):
    """Runs body(env) and exits with the result; a Fail aborts the test
    as one failed case named 'setup' (or whatever body was doing).
    prepare=False: the test needs no QEMU guest, so none is set up."""
    env = Env(test_name)
    try:
        if prepare:
            env.prepare()
        body(env)
    except Fail as e:
        env.dump_state()
        env.case(getattr(e, "case", "setup"), False, str(e))
    except SystemExit:
        env.case("interrupted", False, "signal")
    except Exception as e:  # a harness bug still must not leak processes
        env.case("harness", False, "%s: %s" % (type(e).__name__, e))
    finally:
        rc = env.finish()
    sys.exit(rc)


def guest_cmdline(guest_args):
    """The kernel command line that runs the test guest's blkcheck with
    guest_args, as Guest passes it (for a front-end started another way,
    such as a libvirt domain's <cmdline>)."""
    return "console=ttyS0 quiet panic=-1 vmig.test=blkcheck vmig.args=" + \
        ",".join(str(a) for a in guest_args)
