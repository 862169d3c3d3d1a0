#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""QMP protocol tests against a running vmig-vm.

usage: test_qmp.py BUILD_DIR

Starts BUILD_DIR/vm/vmig-vm (or $VMIG_VM_BINARY) as a source and as a
destination (--incoming defer -S) with QMP sockets in a fresh temp dir, and
checks the wire protocol: greeting, negotiation, the reply shape of every
command, errors for malformed JSON, binary garbage, huge input, unknown
commands and wrong argument types (with the server still answering other
clients), pmemsave sizes, the TLS objects (object-add, object-del, --object)
and parameters (tls-creds, tls-hostname, tls-authz) with their errors,
STOP/RESUME/MIGRATION events, a migration between the two and quit. Prints
PASS/FAIL per case; exits 0 only if all passed.
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
import tlscerts  # noqa: E402
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


@case("QEMU 2.11's x-multifd names, over HMP and QMP")
def t_old_multifd_names(env):
    q = QMP(env.src)
    hmp = lambda line: q.ret("human-monitor-command", {"command-line": line})
    before = q.ret("query-migrate-parameters")["multifd-channels"]
    # Lines from a QEMU 2.11 tutorial: they work, each with a warning.
    out = hmp("migrate_set_capability x-multifd on")
    check(out == "warning: capability 'x-multifd' is deprecated, use 'multifd'\r\n", repr(out))
    out = hmp("migrate_set_parameter x-multifd-channels 4")
    check(out == "warning: parameter 'x-multifd-channels' is deprecated, use "
          "'multifd-channels'\r\n", repr(out))
    out = hmp("migrate_set_parameter x-multifd-page-count 20")
    check(out.startswith("warning: parameter 'x-multifd-page-count' is deprecated and ignored")
          and out.count("\r\n") == 1, repr(out))
    caps = {c["capability"]: c["state"] for c in q.ret("query-migrate-capabilities")}
    check(caps.get("multifd") is True and "x-multifd" not in caps, str(caps))
    params = q.ret("query-migrate-parameters")
    check(params["multifd-channels"] == 4 and "x-multifd-page-count" not in params, str(params))
    check("multifd: on\r\n" in hmp("info migrate_capabilities"), "info migrate_capabilities")
    check("multifd-channels: 4\r\n" in hmp("info migrate_parameters"), "info migrate_parameters")
    # Out of QEMU 2.11's range, or not a number: refused, nothing changed.
    check(hmp("migrate_set_parameter x-multifd-page-count 0").startswith("Error: "), "0 accepted")
    check(hmp("migrate_set_parameter x-multifd-page-count lots").startswith("Error: "),
          "a word accepted")
    # Over QMP the same names work; the warning goes to stderr, as QEMU's.
    check(q.ret("migrate-set-parameters", {"x-multifd-channels": 3, "x-multifd-page-count": 64})
          == {}, "QMP set")
    check(q.ret("query-migrate-parameters")["multifd-channels"] == 3, "QMP alias not applied")
    check(q.ret("migrate-set-capabilities",
                {"capabilities": [{"capability": "x-multifd", "state": False}]}) == {}, "QMP cap")
    caps = {c["capability"]: c["state"] for c in q.ret("query-migrate-capabilities")}
    check(caps.get("multifd") is False, str(caps))
    r = q.cmd("migrate-set-capabilities",
              {"capabilities": [{"capability": "x-multifd-page-count", "state": True}]})
    check(is_error(r), str(r))
    with open(os.path.join(env.tmp, "src.qmp.log")) as f:
        log = f.read()
    check("vmig-vm: warning: parameter 'x-multifd-channels' is deprecated, use "
          "'multifd-channels'\n" in log and
          "vmig-vm: warning: capability 'x-multifd' is deprecated, use 'multifd'\n" in log,
          "stderr: %r" % log[-500:])
    check(q.ret("migrate-set-parameters", {"multifd-channels": before}) == {}, "restore")
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


# ---- TLS objects and parameters ----

def certs(env):
    """The x509 and PSK sets of tests/lib/tlscerts.py, made once per run."""
    if not hasattr(env, "x509"):
        base = os.path.join(env.tmp, "certs")
        env.x509 = tlscerts.x509_good(base)
        env.psk = tlscerts.psk(base)
    return env.x509, env.psk


def error_says(r, *words):
    return is_error(r) and all(w in r["error"]["desc"] for w in words)


@case("object-add and object-del: x509, psk, authz-simple")
def t_objects(env):
    x509, psk = certs(env)
    q = QMP(env.src)
    objs = [
        {"qom-type": "tls-creds-x509", "id": "tls-srv", "endpoint": "server", "dir": x509.server,
         "verify-peer": True},
        {"qom-type": "tls-creds-x509", "id": "tls-cli", "endpoint": "client", "dir": x509.client},
        {"qom-type": "tls-creds-x509", "id": "tls-noverify", "endpoint": "client",
         "dir": x509.client, "verify-peer": False},
        {"qom-type": "tls-creds-psk", "id": "psk-cli", "endpoint": "client", "dir": psk.client,
         "username": tlscerts.PSK_USERNAME},
        {"qom-type": "tls-creds-psk", "id": "psk-srv", "endpoint": "server", "dir": psk.server},
        {"qom-type": "authz-simple", "id": "authz0", "identity": x509.client_dn},
    ]
    for o in objs:
        check(q.ret("object-add", o) == {}, f"object-add {o}")
    for o in objs:
        r = q.cmd("object-add", dict(o))
        check(error_says(r, "duplicate", o["id"]), f"duplicate {o['id']} accepted: {r}")
    # one id space for every type
    r = q.cmd("object-add", {"qom-type": "authz-simple", "id": "tls-srv", "identity": "x"})
    check(error_says(r, "duplicate", "tls-srv"), str(r))
    for o in objs:
        check(q.ret("object-del", {"id": o["id"]}) == {}, f"object-del {o['id']}")
    r = q.cmd("object-del", {"id": "tls-srv"})
    check(error_says(r, "tls-srv", "not found"), str(r))
    # freed ids can be taken again
    check(q.ret("object-add", objs[0]) == {}, "re-add after del")
    check(q.ret("object-del", {"id": objs[0]["id"]}) == {}, "del")
    q.close()


@case("object-add and object-del refuse bad input, and create nothing")
def t_objects_bad(env):
    x509, _ = certs(env)
    q = QMP(env.src)
    good = {"qom-type": "tls-creds-x509", "id": "t0", "endpoint": "server", "dir": x509.server}
    bad = [
        ({}, ("'qom-type' is missing",)),
        ({"qom-type": None, "id": "t0"}, ("'qom-type'", "expected: string")),
        ({"qom-type": "memory-backend-ram", "id": "t0", "size": 1},
         ("'qom-type' does not accept value 'memory-backend-ram'",)),
        ({"qom-type": "tls-creds-anon", "id": "t0"}, ("tls-creds-x509",)),
        (dict(good, id=5), ("'id'", "expected: string")),
        (dict(good, id="0bad"), ("'id' expects an identifier",)),
        ({k: v for k, v in good.items() if k != "id"}, ("'id' is missing",)),
        ({k: v for k, v in good.items() if k != "dir"}, ("'dir' is missing",)),
        (dict(good, dir=[x509.server]), ("'dir'", "expected: string")),
        (dict(good, dir=""), ("'dir' must not be empty",)),
        (dict(good, endpoint="both"), ("'endpoint' does not accept value 'both'",)),
        (dict(good, endpoint=1), ("'endpoint'", "expected: string")),
        (dict(good, **{"verify-peer": "on"}), ("'verify-peer'", "expected: boolean")),
        (dict(good, **{"verify-peer": 1}), ("'verify-peer'", "expected: boolean")),
        (dict(good, username="u"), ("'username' is unexpected",)),
        (dict(good, priority="NORMAL"), ("'priority'", "not supported")),
        (dict(good, extra={"a": [1]}), ("'extra' is unexpected",)),
        ({"qom-type": "tls-creds-psk", "id": "t0", "dir": "/x", "username": 7},
         ("'username'", "expected: string")),
        ({"qom-type": "authz-simple", "id": "t0"}, ("'identity' is missing",)),
        ({"qom-type": "authz-simple", "id": "t0", "identity": ["CN=x"]},
         ("'identity'", "expected: string")),
        # credentials are loaded at creation: a missing file says which
        (dict(good, dir=os.path.join(env.tmp, "no-such-dir")), ("tls-creds-x509 't0'",)),
        (dict(good, dir=x509.client), ("tls-creds-x509 't0'",)),  # client files, server role
    ]
    for args, words in bad:
        r = q.cmd("object-add", args)
        check(error_says(r, *words), f"object-add {args}: {r}")
    r = q.cmd("object-add")
    check(error_says(r, "'qom-type' is missing"), str(r))
    r = q.cmd("object-add", [1])
    check(is_error(r), str(r))
    for args, words in (({"id": "nosuch"}, ("object 'nosuch' not found",)),
                        ({"id": 3}, ("'id'", "expected: string")),
                        ({}, ("'id' is missing",)),
                        ({"id": "t0", "force": True}, ("'force' is unexpected",))):
        r = q.cmd("object-del", args)
        check(error_says(r, *words), f"object-del {args}: {r}")
    # none of the above created t0
    check(q.ret("object-add", good) == {}, "t0 taken by a failed object-add")
    check(q.ret("object-del", {"id": "t0"}) == {}, "object-del t0")
    q.close()
    still_answers(env)


def tls_params(q):
    p = q.ret("query-migrate-parameters")
    return {k: p.get(k) for k in ("tls-creds", "tls-hostname", "tls-authz")}


def unset_tls(q):
    check(q.ret("migrate-set-parameters",
                {"tls-creds": "", "tls-hostname": "", "tls-authz": ""}) == {}, "unset TLS")


@case("tls-creds, tls-hostname, tls-authz round-trip through query-migrate-parameters")
def t_tls_params(env):
    q = QMP(env.src)
    empty = {"tls-creds": "", "tls-hostname": "", "tls-authz": ""}
    check(tls_params(q) == empty, f"defaults {tls_params(q)}")
    dt = q.ret("query-migrate-parameters")["downtime-limit"]
    want = {"tls-creds": "tls0", "tls-hostname": "dst.example", "tls-authz": "authz0"}
    check(q.ret("migrate-set-parameters", want) == {}, "set")
    check(tls_params(q) == want, f"after set {tls_params(q)}")
    for bad in ({"tls-creds": 5}, {"tls-hostname": True}, {"tls-authz": ["a"]},
                {"tls-creds": {}}, {"tls-creds": "x" * 300},
                {"downtime-limit": dt + 1, "tls-creds": 1},
                {"tls-creds": "other", "downtime-limit": "soon"}):
        r = q.cmd("migrate-set-parameters", bad)
        check(is_error(r), f"accepted {bad}: {r}")
    check(tls_params(q) == want, f"changed by a refused request: {tls_params(q)}")
    check(q.ret("query-migrate-parameters")["downtime-limit"] == dt, "downtime-limit changed")
    text = q.ret("human-monitor-command", {"command-line": "info migrate_parameters"})
    for line in ("tls-creds: 'tls0'\r\n", "tls-hostname: 'dst.example'\r\n",
                 "tls-authz: 'authz0'\r\n"):
        check(line in text, f"{line!r} not in {text!r}")
    check(q.ret("human-monitor-command",
                {"command-line": "migrate_set_parameter tls-hostname other.example"}) == "",
          "HMP set")
    check(tls_params(q)["tls-hostname"] == "other.example", str(tls_params(q)))
    # null (QEMU's StrOrNull) and "" unset
    check(q.ret("migrate-set-parameters", {"tls-creds": None, "tls-hostname": ""}) == {}, "unset")
    check(tls_params(q) == {"tls-creds": "", "tls-hostname": "", "tls-authz": "authz0"},
          str(tls_params(q)))
    unset_tls(q)
    check(tls_params(q) == empty, str(tls_params(q)))
    q.close()


def running_without_migration(q, what):
    s = q.ret("query-status")
    check(s["status"] == "running" and s["running"], f"{what}: VM {s}")
    check(q.ret("query-migrate") == {}, f"{what}: a migration started")


@case("migrate with bad TLS parameters fails with QEMU's message; the VM runs on")
def t_tls_migrate_errors(env):
    x509, _ = certs(env)
    q = QMP(env.src)
    uri = f"tcp:127.0.0.1:{free_port()}"
    check(q.ret("migrate-set-parameters", {"tls-creds": "nosuch"}) == {}, "set")
    r = q.cmd("migrate", {"uri": uri})
    check(is_error(r) and r["error"]["desc"] == "No TLS credentials with id 'nosuch'", str(r))
    running_without_migration(q, "unknown id")
    r = q.cmd("migrate", {"uri": uri, "resume": True})
    check(error_says(r, "No TLS credentials with id 'nosuch'"), str(r))
    q.ret("object-add", {"qom-type": "tls-creds-x509", "id": "srv", "endpoint": "server",
                         "dir": x509.server})
    q.ret("object-add", {"qom-type": "authz-simple", "id": "authz0", "identity": "CN=x"})
    for creds, words in (("srv", ("Expected TLS credentials for a client endpoint", "'srv'")),
                         ("authz0", ("No TLS credentials with id 'authz0'", "authz-simple"))):
        q.ret("migrate-set-parameters", {"tls-creds": creds})
        r = q.cmd("migrate", {"uri": uri})
        check(error_says(r, *words), f"tls-creds {creds}: {r}")
        running_without_migration(q, creds)
    # deleting an object a parameter names is allowed; the id is then unknown
    q.ret("object-del", {"id": "srv"})
    q.ret("migrate-set-parameters", {"tls-creds": "srv"})
    r = q.cmd("migrate", {"uri": uri})
    check(error_says(r, "No TLS credentials with id 'srv'"), str(r))
    running_without_migration(q, "deleted id")
    q.ret("object-del", {"id": "authz0"})
    unset_tls(q)
    q.close()


@case("migrate-incoming with bad TLS parameters fails; the destination still waits")
def t_tls_incoming_errors(env):
    x509, _ = certs(env)
    q = QMP(env.dst)
    uri = f"tcp:127.0.0.1:{free_port()}"
    q.ret("object-add", {"qom-type": "tls-creds-x509", "id": "cli", "endpoint": "client",
                         "dir": x509.client})
    q.ret("object-add", {"qom-type": "tls-creds-x509", "id": "srv", "endpoint": "server",
                         "dir": x509.server})
    cases = (({"tls-creds": "nosuch"}, ("No TLS credentials with id 'nosuch'",)),
             ({"tls-creds": "cli"}, ("Expected TLS credentials for a server endpoint",)),
             ({"tls-creds": "", "tls-authz": "srv"}, ("tls-authz 'srv'", "tls-creds")),
             ({"tls-creds": "srv", "tls-authz": "nosuch"}, ("tls-authz", "'nosuch'")),
             ({"tls-creds": "srv", "tls-authz": "cli"}, ("tls-authz", "not an authz-simple")))
    for params, words in cases:
        q.ret("migrate-set-parameters", params)
        r = q.cmd("migrate-incoming", {"uri": uri})
        check(error_says(r, *words), f"{params}: {r}")
        s = q.ret("query-status")
        check(s["status"] == "inmigrate", f"{params}: destination {s}")
        check(q.ret("query-migrate") == {}, f"{params}: destination started listening")
    for oid in ("cli", "srv"):
        q.ret("object-del", {"id": oid})
    unset_tls(q)
    q.close()


def run_vm(env, *args, timeout=20):
    """vmig-vm with args and no QMP: returns (exit status, stderr). It must
    exit by itself, never by a signal."""
    p = subprocess.run([env.binary, "--mem", "4M"] + list(args), capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stderr


@case("--object errors on the command line: a message, an exit status, no crash")
def t_object_cmdline(env):
    x509, _ = certs(env)
    srv = f"tls-creds-x509,id=t0,endpoint=server,dir={x509.server}"
    bad = [
        ("", ("'qom-type' is missing",)),
        ("tls-creds-anon,id=t0", ("'qom-type' does not accept value 'tls-creds-anon'",)),
        ("tls-creds-x509,id=t0,endpoint=server", ("'dir' is missing",)),
        (srv.replace("server", "sideways", 1), ("'endpoint' does not accept value 'sideways'",)),
        (srv + ",verify-peer=maybe", ("'verify-peer' expects 'on' or 'off'",)),
        (srv + ",dir", ("Expected '=' after parameter 'dir'",)),
        (srv + ",id=t1", ("'id' is given more than once",)),
        (srv + ",", ("Empty property",)),
        (srv + ",bogus=1", ("'bogus' is unexpected",)),
        ("tls-creds-x509,id=9,dir=/x", ("'id' expects an identifier",)),
        ("authz-simple,id=a0", ("'identity' is missing",)),
        (f"tls-creds-x509,id=t0,endpoint=server,dir={env.tmp}/none", ("tls-creds-x509 't0'",)),
        (f"tls-creds-psk,id=p0,endpoint=server,dir={env.tmp}/none", ("tls-creds-psk 'p0'",)),
        ('{"qom-type": "authz-simple", "id": 5}', ("'id'", "expected: string")),
        ('{"qom-type": ', ("JSON parse error",)),
    ]
    for opt, words in bad:
        rc, err = run_vm(env, "--object", opt)
        check(rc > 0, f"--object {opt!r}: exit status {rc}: {err[-300:]}")
        check("vmig-vm: --object" in err and all(w in err for w in words),
              f"--object {opt!r}: unclear message {err[-400:]!r}")
    rc, err = run_vm(env, "--object", srv, "--object",
                     "authz-simple,id=t0,identity=x")
    check(rc > 0 and "duplicate object id 't0'" in err, f"duplicate id: {rc} {err[-300:]!r}")


@case("--object: good objects are created; --incoming URI warns that it has no TLS")
def t_object_cmdline_good(env):
    x509, psk = certs(env)
    path = os.path.join(env.tmp, "objs.qmp")
    log = os.path.join(env.tmp, "objs.log")
    port = free_port()
    with open(log, "w") as f:
        p = subprocess.Popen(
            [env.binary, "--mem", "4M", "--qmp", "unix:" + path,
             "--incoming", f"tcp:127.0.0.1:{port}",
             "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={x509.server},verify-peer=on",
             "--object", f"tls-creds-psk,id=psk0,endpoint=server,dir={psk.server}",
             "--object", "authz-simple,id=authz0,identity=" + x509.client_dn.replace(",", ",,"),
             "--object", '{"qom-type": "authz-simple", "id": "authz1", "identity": "CN=a,O=b"}'],
            stdout=f, stderr=subprocess.STDOUT)
    try:
        err = wait_socket(path, p)
        check(err is None, f"vmig-vm with good objects: {err}: {open(log).read()[-500:]}")
        q = QMP(path)
        for oid in ("tls0", "psk0", "authz0", "authz1"):
            r = q.cmd("object-add", {"qom-type": "authz-simple", "id": oid, "identity": "x"})
            check(error_says(r, "duplicate", oid), f"{oid} not created: {r}")
        q.close()
        with open(log) as f:
            text = f.read()
        check("listens at once" in text and "defer" in text, f"no TLS warning: {text[-500:]!r}")
    finally:
        p.kill()
        p.wait()


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
    env.binary = binary
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
                 t_hmp, t_old_multifd_names, t_misc, t_pmemsave, t_postcopy_cmds, t_bad_input, t_framing, t_huge,
                 t_objects, t_objects_bad, t_tls_params, t_tls_migrate_errors,
                 t_tls_incoming_errors, t_object_cmdline, t_object_cmdline_good,
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
