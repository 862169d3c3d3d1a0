#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The vmig CLI drives real QEMU unchanged (it only speaks QMP).

usage: test_cli_qemu.py BUILD_DIR

Starts pairs of qemu-system-x86_64 (TCG, 64 MiB, no devices; the destination
with -incoming defer) with QMP sockets in a fresh temp dir, then runs
BUILD_DIR/tools/vmig/vmig: status, a full migration with --dest (the CLI sets
the destination up), info, qmp, a Ctrl-C cancel of a throttled migration, and
usage errors. Prints PASS/FAIL per case; exits 0 only if all passed.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

RESULTS = []
QEMU = "qemu-system-x86_64"


def report(name, ok, reason=""):
    RESULTS.append(ok)
    print(f"PASS: {name}" if ok else f"FAIL: {name}: {reason}", flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Pair:
    """A source and a destination QEMU, killed by close()."""

    def __init__(self, tmp, tag):
        self.src = os.path.join(tmp, f"{tag}-src.qmp")
        self.dst = os.path.join(tmp, f"{tag}-dst.qmp")
        self.procs = []
        for path, extra in ((self.src, []), (self.dst, ["-incoming", "defer"])):
            self.procs.append(subprocess.Popen(
                [QEMU, "-accel", "tcg", "-m", "64M", "-display", "none", "-nodefaults",
                 "-qmp", f"unix:{path},server=on,wait=off"] + extra,
                stdout=subprocess.DEVNULL, stderr=open(path + ".log", "w")))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(os.path.exists(p) for p in (self.src, self.dst)):
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.05)
        self.close()
        raise RuntimeError("QEMU did not create its QMP sockets")

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def vmig(build, *args, timeout=120):
    return subprocess.run([os.path.join(build, "tools", "vmig", "vmig")] + list(args),
                          capture_output=True, text=True, timeout=timeout)


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def t_status(build, pair):
    r = vmig(build, "status", "unix:" + pair.src)
    check(r.returncode == 0 and r.stdout.strip() == "running", f"src: {r.returncode} {r.stdout!r} {r.stderr!r}")
    r = vmig(build, "status", pair.dst)  # bare path works too
    check(r.returncode == 0 and r.stdout.strip() == "inmigrate", f"dst: {r.stdout!r} {r.stderr!r}")


def t_migrate(build, pair):
    uri = f"tcp:127.0.0.1:{free_port()}"
    r = vmig(build, "migrate", "unix:" + pair.src, uri, "--dest", "unix:" + pair.dst,
             "--max-bandwidth", "512M", "--downtime-limit", "100",
             "--capability", "auto-converge=on")
    check(r.returncode == 0, f"exit {r.returncode}: {r.stderr}")
    check("Migration status: completed" in r.stdout and "transferred ram:" in r.stdout,
          f"no info migrate text: {r.stdout!r}")
    check("vmig: " in r.stderr, "no progress lines on stderr")
    check(vmig(build, "status", pair.src).stdout.strip() == "postmigrate", "source not postmigrate")
    check(vmig(build, "status", pair.dst).stdout.strip() == "running", "destination not running")
    r = vmig(build, "qmp", pair.src, "query-migrate-capabilities")
    caps = {c["capability"]: c["state"] for c in json.loads(r.stdout)}
    check(caps.get("auto-converge") is True, f"capability not set on source: {caps}")
    r = vmig(build, "qmp", pair.dst, "query-migrate-capabilities")
    caps = {c["capability"]: c["state"] for c in json.loads(r.stdout)}
    check(caps.get("auto-converge") is True, f"capability not set on destination: {caps}")
    r = vmig(build, "qmp", pair.src, "query-migrate-parameters")
    params = json.loads(r.stdout)
    check(params["downtime-limit"] == 100 and params["max-bandwidth"] == 512 << 20, str(params))


def t_info_qmp(build, pair):
    r = vmig(build, "info", pair.src)
    check(r.returncode == 0 and "Migration status: completed" in r.stdout, r.stdout)
    r = vmig(build, "qmp", pair.dst, "query-migrate")
    check(r.returncode == 0 and json.loads(r.stdout).get("status") == "completed", r.stdout)
    r = vmig(build, "qmp", pair.src, "human-monitor-command", '{"command-line": "info status"}')
    check(r.returncode == 0 and "postmigrate" in r.stdout, r.stdout)
    r = vmig(build, "qmp", pair.src, "no-such-command")
    check(r.returncode == 1 and "CommandNotFound" in r.stderr, f"{r.returncode} {r.stderr!r}")


def t_cancel(build, tmp):
    pair = Pair(tmp, "cancel")
    try:
        uri = f"tcp:127.0.0.1:{free_port()}"
        p = subprocess.Popen([os.path.join(build, "tools", "vmig", "vmig"), "migrate", pair.src, uri,
                              "--dest", pair.dst, "--max-bandwidth", "32K"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # QEMU's QMP socket serves one client at a time, so watch the
            # CLI's own progress lines (one per second) for "active".
            deadline = time.monotonic() + 20
            active = False
            while time.monotonic() < deadline and not active:
                line = p.stderr.readline()
                if not line:
                    break
                active = line.startswith("vmig: active ")
            check(active, "throttled migration never reported active")
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        check(p.returncode == 1, f"exit {p.returncode} after Ctrl-C: {err}")
        check("cancelled" in err, f"no cancel message: {err!r}")
        r = vmig(build, "qmp", pair.src, "query-migrate")
        check(json.loads(r.stdout).get("status") == "cancelled", r.stdout)
        check(vmig(build, "status", pair.src).stdout.strip() == "running", "source not running after cancel")
    finally:
        pair.close()


def t_postcopy(build, tmp):
    """--postcopy-after switches a throttled migration; --postcopy at once."""
    for tag, opts, says in (("pc-after", ["--postcopy-after", "1"], "switching to post-copy"),
                            ("pc-now", ["--postcopy"], None)):
        pair = Pair(tmp, tag)
        try:
            r = vmig(build, "migrate", pair.src, f"tcp:127.0.0.1:{free_port()}", "--dest", pair.dst,
                     "--max-bandwidth", "64K", *opts)
            check(r.returncode == 0, f"{tag}: exit {r.returncode}: {r.stderr}")
            check("postcopy ram: " in r.stdout, f"{tag}: nothing sent in post-copy: {r.stdout!r}")
            check(says is None or says in r.stderr, f"{tag}: {r.stderr!r}")
            check(vmig(build, "status", pair.dst).stdout.strip() == "running", f"{tag}: destination not running")
            r = vmig(build, "qmp", pair.dst, "query-migrate-capabilities")
            caps = {c["capability"]: c["state"] for c in json.loads(r.stdout)}
            check(caps.get("postcopy-ram") is True, f"{tag}: postcopy-ram not set on destination")
        finally:
            pair.close()


def t_usage(build, pair):
    for args in ((), ("migrate",), ("migrate", pair.src), ("frobnicate",),
                 ("migrate", pair.src, "tcp:127.0.0.1:1", "--postcopy-after", "soon"),
                 ("qmp", pair.src, "query-status", "[1]")):
        r = vmig(build, *args)
        check(r.returncode == 2, f"vmig {' '.join(args)}: exit {r.returncode}")
    # storage options go together, and only the modes that exist are taken
    base = ("migrate", pair.src, "tcp:127.0.0.1:1")
    for extra, words in ((("--storage-src", "a.rpc"), "go together"),
                         (("--storage-src", "a", "--storage-dst", "b", "--storage-uri",
                           "unix:c", "--storage-mode", "eager"),
                          "the modes are mirror, write-blocking and postcopy"),
                         (("--storage-speed", "1M"), "goes with")):
        r = vmig(build, *(base + extra))
        check(r.returncode == 2 and words in r.stderr,
              f"vmig {' '.join(extra)}: exit {r.returncode}: {r.stderr.strip()[-200:]}")
    check(vmig(build, "help").returncode == 0, "help")


def main():
    if len(sys.argv) != 2:
        print("usage: test_cli_qemu.py BUILD_DIR", file=sys.stderr)
        return 2
    build = os.path.abspath(sys.argv[1])
    if not shutil.which(QEMU):
        report("setup", False, f"{QEMU} not installed (apt-get install qemu-system-x86)")
        return 1
    if not os.access(os.path.join(build, "tools", "vmig", "vmig"), os.X_OK):
        report("setup", False, f"{build}/tools/vmig/vmig not built")
        return 1
    tmp = tempfile.mkdtemp(prefix="vmig-cli-qemu-")
    pair = None
    try:
        pair = Pair(tmp, "main")
        for name, fn, arg in (("vmig status on QEMU", t_status, pair),
                              ("vmig migrate --dest between two QEMUs", t_migrate, pair),
                              ("vmig info and vmig qmp on QEMU", t_info_qmp, pair),
                              ("Ctrl-C cancels a QEMU migration", t_cancel, tmp),
                              ("--postcopy and --postcopy-after on QEMU", t_postcopy, tmp),
                              ("usage errors exit 2", t_usage, pair)):
            try:
                fn(build, arg)
                report(name, True)
            except Exception as e:  # every failure is a FAIL line, never a crash
                report(name, False, f"{type(e).__name__}: {e}")
    except Exception as e:
        report("setup", False, f"{type(e).__name__}: {e}")
    finally:
        if pair:
            pair.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if RESULTS and all(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
