#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""QMP protocol tests against a running vmig-vm.

usage: test_qmp.py BUILD_DIR

Starts BUILD_DIR/vm/vmig-vm (or $VMIG_VM_BINARY) as a source and as a
destination (--incoming defer -S) with QMP sockets in a fresh temp dir, and
checks the wire protocol: greeting, negotiation, the reply shape of every
command, errors for malformed JSON, binary garbage, huge input, unknown
commands and wrong argument types (with the server still answering other
clients), pmemsave sizes, STOP/RESUME/MIGRATION events, a migration between
the two and quit. Prints PASS/FAIL per case; exits 0 only if all passed.
"""
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from vmigtest import free_port  # noqa: E402

RESULTS = []


def report(name, ok, reason=""):
    RESULTS.append(ok)
    print(f"PASS: {name}" if ok else f"FAIL: {name}: {reason}", flush=True)


class QMP:
    """A blocking QMP client with a timeout on every read."""

    def __init__(self, path, negotiate=True, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        self.timeout = timeout
        self.greeting = self.read()
        if negotiate:
            r = self.cmd("qmp_capabilities")
            assert "return" in r, r

    def send_raw(self, data):
        self.sock.sendall(data)

    def read(self, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from server")
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def reply(self, timeout=None):
        """Next non-event message; events are kept in self.events."""
        while True:
            m = self.read(timeout)
            if "event" in m:
                self.events.append(m)
                continue
            return m

    def cmd(self, name, args=None, **extra):
        req = {"execute": name}
        if args is not None:
            req["arguments"] = args
        req.update(extra)
        self.send_raw(json.dumps(req).encode() + b"\n")
        return self.reply()

    def ret(self, name, args=None):
        r = self.cmd(name, args)
        if "return" not in r:
            raise AssertionError(f"{name}: {r}")
        return r["return"]

    def wait_event(self, name, timeout=10.0, pred=None):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name and (pred is None or pred(e)):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} event")
            m = self.read(left)
            if "event" in m:
                self.events.append(m)

    def close(self):
        self.sock.close()


def is_error(r, cls="GenericError"):
    return "error" in r and r["error"].get("class") == cls and isinstance(r["error"].get("desc"), str)


def case(name):
    def deco(fn):
        fn.case_name = name
        return fn
    return deco


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


@case("greeting")
def t_greeting(env):
    q = QMP(env.src, negotiate=False)
    g = q.greeting.get("QMP")
    check(isinstance(g, dict), f"bad greeting {q.greeting}")
    v = g["version"]
    check(all(isinstance(v["qemu"][k], int) for k in ("major", "minor", "micro")), str(v))
    check(isinstance(v["package"], str) and isinstance(g["capabilities"], list), str(g))
    q.close()


@case("commands refused before qmp_capabilities")
def t_negotiation(env):
    q = QMP(env.src, negotiate=False)
    r = q.cmd("query-status", id="a1")
    check(is_error(r, "CommandNotFound") and r.get("id") == "a1", str(r))
    r = q.cmd("qmp_capabilities", id={"x": [1, 2]})
    check(r.get("return") == {} and r.get("id") == {"x": [1, 2]}, str(r))
    r = q.cmd("qmp_capabilities")
    check(is_error(r, "CommandNotFound"), str(r))
    q.close()


@case("query-status, stop/cont with STOP and RESUME events")
def t_status(env):
    q = QMP(env.src)
    s = q.ret("query-status")
    check(s == {"running": True, "singlestep": False, "status": "running"}, str(s))
    check(q.ret("stop") == {}, "stop")
    e = q.wait_event("STOP")
    check(set(e["timestamp"]) == {"seconds", "microseconds"}, str(e))
    s = q.ret("query-status")
    check(s["running"] is False and s["status"] == "paused", str(s))
    check(q.ret("cont") == {}, "cont")
    q.wait_event("RESUME")
    check(q.ret("query-status")["running"] is True, "not running after cont")
    q.close()


@case("capabilities and parameters")
def t_caps_params(env):
    q = QMP(env.src)
    caps = q.ret("query-migrate-capabilities")
    check(isinstance(caps, list) and caps, str(caps))
    check(all(set(c) == {"capability", "state"} and isinstance(c["state"], bool) for c in caps), str(caps))
    names = [c["capability"] for c in caps]
    check("postcopy-ram" in names, str(names))
    r = q.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "nope", "state": True}]})
    check(is_error(r) and "nope" in r["error"]["desc"], str(r))
    r = q.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "auto-converge", "state": "yes"}]})
    check(is_error(r), str(r))
    params = q.ret("query-migrate-parameters")
    check("max-bandwidth" in params and "downtime-limit" in params, str(params))
    check(q.ret("migrate-set-parameters", {"max-bandwidth": 12345678, "downtime-limit": 77}) == {}, "set")
    params = q.ret("query-migrate-parameters")
    check(params["max-bandwidth"] == 12345678 and params["downtime-limit"] == 77, str(params))
    r = q.cmd("migrate-set-parameters", {"no-such-param": 1})
    check(is_error(r) and "no-such-param" in r["error"]["desc"], str(r))
    r = q.cmd("migrate-set-parameters", {"downtime-limit": "fast"})
    check(is_error(r), str(r))
    q.close()


@case("query-migrate before any migration is empty")
def t_query_migrate_empty(env):
    q = QMP(env.src)
    check(q.ret("query-migrate") == {}, "not {}")
    q.close()


@case("human-monitor-command")
def t_hmp(env):
    q = QMP(env.src)
    hmp = lambda line: q.ret("human-monitor-command", {"command-line": line})
    check(hmp("info status") == "VM status: running\r\n", repr(hmp("info status")))
    check(hmp("info migrate") == "", repr(hmp("info migrate")))
    caps = hmp("info migrate_capabilities")
    check("postcopy-ram: off\r\n" in caps, repr(caps))
    params = hmp("info migrate_parameters")
    check("downtime-limit: " in params and " ms\r\n" in params, repr(params))
    check(hmp("migrate_set_parameter downtime-limit 250") == "", "set param")
    check(q.ret("query-migrate-parameters")["downtime-limit"] == 250, "param not set")
    check(hmp("migrate_set_capability nope on").startswith("Error: "), "bad cap accepted")
    check(hmp("bogus") == "unknown command: 'bogus'\r\n", repr(hmp("bogus")))
    check(hmp("stop") == "", "stop")
    check(hmp("info status") == "VM status: paused\r\n", repr(hmp("info status")))
    check(hmp("c") == "", "cont")
    r = q.cmd("human-monitor-command", {"command-line": 5})
    check(is_error(r), str(r))
    q.close()


@case("x-vmig-query-guest, query-version, query-commands")
def t_misc(env):
    q = QMP(env.src)
    g = q.ret("x-vmig-query-guest")
    for k in ("pages-written", "pages-verified", "inconsistencies", "mem-bytes", "vcpus", "workload"):
        check(k in g, f"missing {k}: {g}")
    check(g["mem-bytes"] == 64 << 20, str(g))
    check("qemu" in q.ret("query-version"), "version")
    names = {c["name"] for c in q.ret("query-commands")}
    for n in ("migrate", "query-migrate", "pmemsave", "human-monitor-command", "migrate_cancel"):
        check(n in names, f"{n} not in query-commands")
    q.close()


@case("pmemsave writes exactly size bytes")
def t_pmemsave(env):
    q = QMP(env.src)
    for addr, size in ((0, 4096), (12345, 100000), ((64 << 20) - 10, 10), (0, 0)):
        path = os.path.join(env.tmp, f"mem-{addr}-{size}")
        check(q.ret("pmemsave", {"val": addr, "size": size, "filename": path}) == {}, "pmemsave")
        got = os.path.getsize(path)
        check(got == size, f"{path}: {got} bytes, wanted {size}")
    r = q.cmd("pmemsave", {"val": 64 << 20, "size": 1, "filename": os.path.join(env.tmp, "x")})
    check(is_error(r), f"out of range accepted: {r}")
    r = q.cmd("pmemsave", {"val": "0", "size": 1, "filename": "f"})
    check(is_error(r), str(r))
    q.close()


@case("post-copy commands answer with a QMP error or success shape")
def t_postcopy_cmds(env):
    q = QMP(env.src)
    for name, args in (("migrate-start-postcopy", None), ("migrate-pause", None),
                       ("migrate-recover", {"uri": "tcp:127.0.0.1:1"})):
        r = q.cmd(name, args)
        check(is_error(r) or r.get("return") == {}, f"{name}: {r}")
    r = q.cmd("migrate", {"uri": "tcp:127.0.0.1:1", "blk": True})
    check(is_error(r), str(r))
    r = q.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:1"})
    check(is_error(r), f"migrate-incoming accepted on a running VM: {r}")
    q.close()


def still_answers(env):
    q = QMP(env.src)
    s = q.ret("query-status")
    q.close()
    check("status" in s, "server stopped answering")


@case("bad input gets errors and never stops the server")
def t_bad_input(env):
    q = QMP(env.src)
    bad = [
        (b'}}\n', "stray closing brackets"),
        (b'{"execute": }\n', "malformed"),
        (b'[1, 2, 3]\n', "array"),
        (b'42\n', "scalar"),
        (b'{"execute": "no-such-command"}\n', "unknown command"),
        (b'{"execute": 17}\n', "execute not a string"),
        (b'{"execute": "stop", "arguments": [1]}\n', "arguments not an object"),
        (b'{"execute": "stop", "arguments": {"force": true}}\n', "unexpected argument"),
        (b'{"execute": "migrate", "arguments": {"uri": 5}}\n', "wrong argument type"),
        (b'{"execute": "migrate", "arguments": {}}\n', "missing argument"),
        (b'{"execute": "pmemsave", "arguments": {"val": 0, "size": -1, "filename": "x"}}\n', "negative size"),
        (b'\x00\xff\xfe\x80garbage\x01\n', "binary garbage"),
        (b'{"execute": "\xc3\x28"}\n', "invalid UTF-8"),
        (b'[' * 5000 + b']' * 5000 + b'\n', "deep nesting"),
    ]
    for data, what in bad:
        q.send_raw(data)
        r = q.reply()
        check("error" in r, f"{what}: no error: {r}")
        # Skip any further errors this input produced (e.g. one per "}"),
        # then the server must still execute a good command on this client.
        q.send_raw(b'{"execute": "query-status", "id": "sync"}\n')
        for _ in range(100):
            r = q.reply()
            if r.get("id") == "sync":
                break
            check("error" in r, f"{what}: unexpected {r}")
        check(r.get("id") == "sync" and "return" in r, f"{what}: {r}")
    q.close()
    still_answers(env)


@case("several objects per write and objects split across writes")
def t_framing(env):
    q = QMP(env.src)
    q.send_raw(b'{"execute":"query-status","id":1}{"execute":"query-status","id":2}\n'
               b'  {"execute":"query-status","id":3}')
    ids = [q.reply()["id"] for _ in range(3)]
    check(ids == [1, 2, 3], str(ids))
    msg = b'{"execute": "query-status", "id": "split \\"}{\\" here"}\n'
    for i in range(len(msg)):
        q.send_raw(msg[i:i + 1])
        time.sleep(0.001)
    r = q.reply()
    check(r.get("id") == 'split "}{" here' and "return" in r, str(r))
    q.close()


@case("huge input disconnects only that client")
def t_huge(env):
    other = QMP(env.src)
    q = QMP(env.src)
    closed = False
    try:
        q.send_raw(b'["' + b"x" * (2 << 20))
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    deadline = time.monotonic() + 10
    while not closed and time.monotonic() < deadline:
        try:
            q.read(timeout=deadline - time.monotonic())
        except EOFError:
            closed = True
        except (ConnectionResetError, TimeoutError):
            break
    check(closed, "client with >1 MiB of input was not disconnected")
    q.close()
    check("return" in other.cmd("query-status"), "other client not answered")
    other.close()
    still_answers(env)


@case("migration: MIGRATION events, query-migrate fields, destination runs")
def t_migrate(env):
    src = QMP(env.src)
    dst = QMP(env.dst)
    s = dst.ret("query-status")
    check(s["status"] == "inmigrate" and not s["running"], str(s))
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    check(dst.ret("migrate-incoming", {"uri": uri}) == {}, "migrate-incoming")
    check(dst.ret("cont") == {}, "cont on destination")
    check(src.ret("migrate", {"uri": uri}) == {}, "migrate")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        qm = src.ret("query-migrate")
        if qm.get("status") == "active":
            check("expected-downtime" in qm and "ram" in qm, f"active fields: {qm}")
        if qm.get("status") in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.05)
    check(qm.get("status") == "completed", f"migration ended as {qm}")
    for k in ("total-time", "setup-time", "downtime", "ram"):
        check(k in qm, f"{k} missing: {qm}")
    check("expected-downtime" not in qm, "expected-downtime after completion")
    ram = qm["ram"]
    for k in ("transferred", "remaining", "total", "duplicate", "normal", "normal-bytes",
              "dirty-sync-count", "mbps", "dirty-pages-rate", "pages-per-second",
              "precopy-bytes", "downtime-bytes", "page-size", "postcopy-requests", "postcopy-bytes"):
        check(k in ram, f"ram.{k} missing")
    check(isinstance(ram["mbps"], float), "mbps not a float")
    check(ram["total"] == 64 << 20, f"ram.total {ram['total']}")
    src.wait_event("MIGRATION", pred=lambda e: e["data"]["status"] == "completed")
    src.wait_event("STOP")
    check(src.ret("query-status")["status"] == "postmigrate", "source not postmigrate")
    text = src.ret("human-monitor-command", {"command-line": "info migrate"})
    check(text.startswith("Migration status: completed\r\n") and "transferred ram: " in text, repr(text))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not dst.ret("query-status")["running"]:
        time.sleep(0.05)
    check(dst.ret("query-status")["status"] == "running", "destination not running")
    dst.wait_event("RESUME")
    src.close()
    dst.close()


@case("quit replies, announces SHUTDOWN and ends the process")
def t_quit(env):
    q = QMP(env.dst)
    check(q.ret("quit") == {}, "quit")
    q.wait_event("SHUTDOWN")
    try:
        env.procs[1].wait(timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError("vmig-vm still running 15 s after quit")
    check(env.procs[1].returncode == 0, f"exit status {env.procs[1].returncode}")
    q.close()


class Env:
    pass


def wait_socket(path, proc, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        if os.path.exists(path):
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                s.close()
                return None
            except OSError:
                pass
        time.sleep(0.05)
    return "QMP socket did not appear"


def main():
    if len(sys.argv) != 2:
        print("usage: test_qmp.py BUILD_DIR", file=sys.stderr)
        return 2
    binary = os.environ.get("VMIG_VM_BINARY") or os.path.join(sys.argv[1], "vm", "vmig-vm")
    if not os.access(binary, os.X_OK):
        report("setup", False, f"{binary} not found or not executable")
        return 1
    env = Env()
    env.tmp = tempfile.mkdtemp(prefix="vmig-qmp-")
    env.src = os.path.join(env.tmp, "src.qmp")
    env.dst = os.path.join(env.tmp, "dst.qmp")
    env.procs = []
    try:
        for path, extra in ((env.src, []), (env.dst, ["--incoming", "defer", "-S"])):
            log = open(os.path.join(env.tmp, os.path.basename(path) + ".log"), "w")
            env.procs.append(subprocess.Popen(
                [binary, "--mem", "64M", "--vcpus", "1", "--qmp", "unix:" + path] + extra,
                stdout=log, stderr=subprocess.STDOUT))
            log.close()
        for path, proc in zip((env.src, env.dst), env.procs):
            err = wait_socket(path, proc)
            if err:
                report("setup", False, f"{binary} ({os.path.basename(path)}): {err}")
                return 1
        cases = [t_greeting, t_negotiation, t_status, t_caps_params, t_query_migrate_empty,
                 t_hmp, t_misc, t_pmemsave, t_postcopy_cmds, t_bad_input, t_framing, t_huge,
                 t_migrate, t_quit]
        for fn in cases:
            try:
                fn(env)
                report(fn.case_name, True)
            except Exception as e:  # any failure of a case is reported, never fatal
                report(fn.case_name, False, f"{type(e).__name__}: {e}")
        report("server survived all cases", env.procs[0].poll() is None,
               "source vmig-vm exited early")
    finally:
        for p in env.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        shutil.rmtree(env.tmp, ignore_errors=True)
    return 0 if all(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
