#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The local interfaces of vmig-blk, as docs/security.md describes them,
checked on the daemon itself (no QEMU, no guest):

- the RPC socket is created 0600; a client of another uid cannot connect
  through the mode, and one that gets past it (the mode widened by
  mistake) is refused by its SO_PEERCRED credentials with a JSON-RPC error
  and disconnected, while the daemon's own uid keeps being served;
- the daemon replaces a socket path only if it is a socket nobody listens
  on: a regular file or a directory there, or the socket of a live daemon
  (vhost-user or RPC), makes it refuse to start with a clear error and
  leaves the path alone; a stale socket (its owner killed) is replaced;
  at exit it removes only the socket file it created;
- an upgrade only ever runs the binary fixed at start (--upgrade-binary):
  a request naming another one is refused (RPC and CLI) and nothing is
  run; the configured binary is refused at upgrade time, with the reason,
  if it is writable by group or others, owned by another user, or in a
  directory others may write (unless sticky; along its real path and along
  the configured one, where a symlink to it lives), and the daemon serves on;
  once it is right again the upgrade goes through;
- the vhost-user socket is the last thing the daemon creates: once its
  file exists (what QEMU and libvirt wait for), the RPC socket answers
  too, even when the start is slowed down (strace delays each listen());
- the image is locked (OFD write lock): a second daemon on it refuses to
  start, unless --no-lock; two --read-only daemons share it; the lock
  stays held across a live upgrade (same open file description, seen in
  /proc/locks) and goes with a kill -9, so a restart works at once.

Usage: test_security.py BUILD_DIR
"""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import blkenv

NOBODY = 65534


def rpc_raw(path, method, params=None, timeout_s=10.0):
    """One JSON-RPC call; returns the whole reply object."""
    req = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        req["params"] = params
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    return json.loads(buf.decode())


class Daemon:
    """One vmig-blk with its own log; started, checked, stopped by pid."""

    def __init__(self, env, name, sock, args, rpc=None):
        self.env, self.sock = env, sock
        self.rpc = rpc or sock + ".rpc"
        self.proc = blkenv.Proc(env, name, [env.vmig_blk, "--socket", sock, "--rpc", self.rpc]
                                + [str(a) for a in args])
        env.procs.append(self.proc)

    def start(self, timeout_s=20.0):
        """Starts it and waits until its RPC socket answers with its pid."""
        self.proc.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise blkenv.Fail("%s exited at start: %s" %
                                  (self.proc.name, self.proc.text()[-400:]))
            try:
                if self.controller().get("pid") == self.proc.pid:
                    return self
            except (OSError, ValueError, blkenv.Fail):
                pass
            time.sleep(0.05)
        raise blkenv.Fail("%s did not come up" % self.proc.name)

    def start_fails(self, timeout_s=20.0):
        """Starts it and expects it to exit; returns (status, its output)."""
        self.proc.start()
        try:
            rc = self.proc.p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill9()
            return None, "still running after %.0f s" % timeout_s
        return rc, self.proc.text()

    def call(self, method, params=None):
        return rpc_raw(self.rpc, method, params)

    def controller(self):
        r = self.call("vhost_get_controllers")
        if "result" not in r:
            raise blkenv.Fail("vhost_get_controllers: %r" % r)
        return r["result"][0]

    def serves(self):
        try:
            return self.controller().get("pid") == self.proc.pid
        except (OSError, ValueError, blkenv.Fail):
            return False


def as_nobody(code):
    """Runs python code as uid/gid NOBODY; returns (status, stdout)."""
    def drop():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    # The system's python: another uid may not be able to reach ours.
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    r = subprocess.run([py, "-c", code], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, preexec_fn=drop, timeout=30)
    return r.returncode, r.stdout.decode(errors="replace").strip()


NOBODY_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("CONNECT-FAILED", e.errno)
    sys.exit(0)
try:
    s.sendall(b'{"jsonrpc":"2.0","id":7,"method":"vhost_get_controllers"}\n')
except OSError:
    pass  # refused before it read: the answer is still there to read
buf = b""
while True:
    try:
        chunk = s.recv(65536)
    except OSError:
        break
    if not chunk:
        break
    buf += chunk
print("REPLY", buf.decode().strip())
print("CLOSED")
"""


def image(env, name="disk.img", mb=16):
    return env.image(name, size_mb=mb)


def case_rpc_socket(env):
    sock = os.path.join(env.tmp, "rpc-case.sock")
    d = Daemon(env, "rpc-case", sock, ["--file", image(env, "rpc.img")]).start()
    mode = stat.S_IMODE(os.stat(d.rpc).st_mode)
    env.case("rpc_socket_mode_0600", mode == 0o600, "mode %o" % mode)
    # Another uid cannot even connect through the mode (the parent
    # directory is the test's 0700 temp dir: open it up for the check).
    os.chmod(env.tmp, 0o755)
    rc, out = as_nobody(NOBODY_CLIENT.replace("sys.argv[1]", repr(d.rpc)))
    env.case("rpc_mode_keeps_other_uid_out", rc == 0 and out.startswith("CONNECT-FAILED 13"),
             "as uid %d: %s" % (NOBODY, out[:300]))
    # Mode widened by mistake: the peer check still refuses, with an error.
    os.chmod(d.rpc, 0o666)
    rc, out = as_nobody(NOBODY_CLIENT.replace("sys.argv[1]", repr(d.rpc)))
    reply = {}
    for line in out.splitlines():
        if line.startswith("REPLY "):
            try:
                reply = json.loads(line[6:])
            except ValueError:
                pass
    err = reply.get("error", {})
    env.case("rpc_other_uid_refused",
             rc == 0 and err.get("code") == -32001 and "permission denied" in
             err.get("message", "") and "CLOSED" in out and "result" not in reply,
             "as uid %d: %s" % (NOBODY, out[:400]))
    env.case("rpc_refusal_logged", "RPC client refused" in d.proc.text(),
             d.proc.text()[-300:])
    os.chmod(d.rpc, 0o600)
    os.chmod(env.tmp, 0o700)
    env.case("rpc_owner_still_served", d.serves(), "the daemon stopped answering")
    d.proc.stop()


def case_socket_paths(env):
    img = image(env, "paths.img")
    # A regular file and a directory where the sockets go: refused, kept.
    path = os.path.join(env.tmp, "file.sock")
    with open(path, "w") as f:
        f.write("not a socket\n")
    rc, out = Daemon(env, "on-file", path, ["--null", "1M"]).start_fails()
    with open(path) as f:
        kept = f.read()
    env.case("refuses_regular_file", rc == 1 and "is not a socket" in out and
             kept == "not a socket\n", "status %s, file now %r: %s" % (rc, kept, out[-300:]))
    rpc_file = os.path.join(env.tmp, "file.rpc")
    with open(rpc_file, "w") as f:
        f.write("keep me\n")
    rc, out = Daemon(env, "on-rpc-file", os.path.join(env.tmp, "x.sock"), ["--null", "1M"],
                     rpc=rpc_file).start_fails()
    with open(rpc_file) as f:
        kept = f.read()
    env.case("refuses_regular_file_rpc", rc == 1 and "is not a socket" in out and
             kept == "keep me\n", "status %s, file now %r: %s" % (rc, kept, out[-300:]))
    dpath = os.path.join(env.tmp, "dir.sock")
    os.mkdir(dpath)
    rc, out = Daemon(env, "on-dir", dpath, ["--null", "1M"]).start_fails()
    env.case("refuses_directory", rc == 1 and os.path.isdir(dpath) and "not a socket" in out,
             "status %s: %s" % (rc, out[-300:]))

    # A live daemon's sockets: a second daemon refuses, the first serves on
    # with its socket files untouched.
    sock = os.path.join(env.tmp, "live.sock")
    first = Daemon(env, "live", sock, ["--file", img]).start()
    ino = (os.stat(sock).st_ino, os.stat(first.rpc).st_ino)
    rc, out = Daemon(env, "live-2", sock, ["--null", "1M"],
                     rpc=os.path.join(env.tmp, "other.rpc")).start_fails()
    env.case("refuses_live_vhost_socket", rc == 1 and "already in use" in out,
             "status %s: %s" % (rc, out[-300:]))
    rc, out = Daemon(env, "live-3", os.path.join(env.tmp, "other.sock"), ["--null", "1M"],
                     rpc=first.rpc).start_fails()
    env.case("refuses_live_rpc_socket", rc == 1 and "already in use" in out,
             "status %s: %s" % (rc, out[-300:]))
    env.case("live_daemon_untouched",
             first.serves() and (os.stat(sock).st_ino, os.stat(first.rpc).st_ino) == ino,
             "first daemon serves: %s" % first.serves())

    # Killed: its sockets are stale and a restart replaces them.
    first.proc.kill9()
    again = Daemon(env, "live-again", sock, ["--file", img]).start()
    env.case("replaces_stale_sockets", again.serves(), "restart after kill -9 failed")

    # At exit only the socket file it made goes: one put in its place
    # meanwhile stays.
    os.rename(rpc_file, again.rpc)
    again.proc.stop()
    env.case("exit_removes_only_own_socket",
             again.proc.p.returncode == 0 and not os.path.exists(sock) and
             os.path.isfile(again.rpc),
             "status %s, vhost socket exists %s, rpc path is file %s" %
             (again.proc.p.returncode, os.path.exists(sock), os.path.isfile(again.rpc)))


def case_socket_order(env):
    """Waits for the vhost-user socket file as a front end would, then
    calls the RPC socket at once. strace holds each listen() for 300 ms,
    so a daemon that made the vhost-user socket first would be caught
    with no RPC socket yet."""
    img = image(env, "order.img")
    sock = os.path.join(env.tmp, "order.sock")
    d = Daemon(env, "order", sock, ["--file", img])
    d.proc.argv = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=listen",
                   "-e", "inject=listen:delay_enter=300000"] + d.proc.argv
    d.proc.start()
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if not d.proc.alive() or time.monotonic() > deadline:
            raise blkenv.Fail("no vhost-user socket: %s" % d.proc.text()[-400:])
        time.sleep(0.002)
    try:
        pid = d.controller().get("pid")
        why = "pid %s" % pid
    except (OSError, ValueError, blkenv.Fail) as e:
        pid, why = None, "RPC call as the vhost-user socket appeared: %s" % e
    # under strace the daemon is strace's child: its pid is not proc.pid
    env.case("rpc_ready_with_vhost_socket", isinstance(pid, int) and pid > 0, why)
    d.proc.stop()


def upgrade(env, d, *extra):
    r = subprocess.run([env.vmig_blk, "upgrade", "--rpc", d.rpc] + list(extra),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    return r.returncode, r.stdout.decode(errors="replace").strip()


def upgrades(d):
    return d.controller().get("upgrades")


def case_upgrade_binary(env):
    bindir = os.path.join(env.tmp, "bin")
    os.mkdir(bindir, 0o755)
    binary = os.path.join(bindir, "vmig-blk")
    with open(env.vmig_blk, "rb") as src, open(binary, "wb") as dst:
        dst.write(src.read())
    os.chmod(binary, 0o755)
    marker = os.path.join(env.tmp, "ran")
    evil = os.path.join(env.tmp, "evil")
    with open(evil, "w") as f:
        f.write("#!/bin/sh\ntouch %s\nexec %s \"$@\"\n" % (marker, env.vmig_blk))
    os.chmod(evil, 0o755)
    sock = os.path.join(env.tmp, "up.sock")
    d = Daemon(env, "upgrade-case", sock, ["--null", "16M", "--upgrade-binary", binary]).start()
    pid = d.proc.pid
    env.case("upgrade_binary_reported", d.controller().get("upgrade_binary") == binary,
             "upgrade_binary=%r" % d.controller().get("upgrade_binary"))

    # A request naming a binary, over RPC or with the CLI: refused, and
    # nothing is run.
    r = d.call("vmig_blk_upgrade", {"binary": evil})
    err = r.get("error", {})
    env.case("rpc_binary_refused",
             err.get("code") == -32602 and "not accepted" in err.get("message", ""),
             "reply %r" % r)
    r = d.call("vmig_blk_upgrade", {"force": True})
    env.case("rpc_other_params_refused", r.get("error", {}).get("code") == -32602,
             "reply %r" % r)
    rc, out = upgrade(env, d, "--binary", evil)
    env.case("cli_binary_refused", rc == 1 and "--binary is not accepted" in out,
             "status %d: %s" % (rc, out))
    env.case("nothing_else_ran",
             not os.path.exists(marker) and d.serves() and upgrades(d) == 0,
             "marker exists %s, serves %s, upgrades %s" %
             (os.path.exists(marker), d.serves(), upgrades(d)))

    # The configured binary, made unsafe in each way: refused at upgrade
    # time with the reason, and the daemon serves on.
    def refused(name, want):
        rc, out = upgrade(env, d)
        ok = rc == 1 and want in out and d.serves() and d.proc.pid == pid and \
            upgrades(d) == 0
        env.case(name, ok, "status %d: %s (serves %s)" % (rc, out, d.serves()))

    os.chmod(binary, 0o775)
    refused("refuses_group_writable_binary", "writable by its group or others")
    os.chmod(binary, 0o757)
    refused("refuses_world_writable_binary", "writable by its group or others")
    os.chmod(binary, 0o755)
    os.chown(binary, NOBODY, NOBODY)
    refused("refuses_binary_of_other_user", "owned by uid %d" % NOBODY)
    os.chown(binary, 0, 0)
    os.chmod(binary, 0o755)
    os.chmod(bindir, 0o777)
    refused("refuses_binary_in_writable_dir", "directory %s is writable" % bindir)
    os.chmod(bindir, 0o755)
    os.chown(bindir, NOBODY, NOBODY)
    refused("refuses_binary_in_dir_of_other_user", "directory %s is owned by uid" % bindir)
    os.chown(bindir, 0, 0)

    # A sticky, world-writable directory (like /tmp) is fine for a binary
    # nobody else owns; and so is the usual setup: the upgrade goes through.
    os.chmod(bindir, 0o1777)
    rc, out = upgrade(env, d)
    env.case("upgrade_in_sticky_dir", rc == 0 and "ok" in out and upgrades(d) == 1 and
             d.controller().get("pid") == pid, "status %d: %s" % (rc, out))
    os.chmod(bindir, 0o755)
    rc, out = upgrade(env, d)
    env.case("upgrade_of_safe_binary", rc == 0 and "binary=%s" % binary in out and
             upgrades(d) == 2, "status %d: %s" % (rc, out))
    d.proc.stop()

    # Configured as a symlink: the directory the link lives in counts too
    # (whoever may write there may point the link elsewhere).
    linkdir = os.path.join(env.tmp, "links")
    os.mkdir(linkdir, 0o755)
    link = os.path.join(linkdir, "vmig-blk")
    os.symlink(binary, link)
    d = Daemon(env, "upgrade-link", os.path.join(env.tmp, "up2.sock"),
               ["--null", "16M", "--upgrade-binary", link]).start()
    os.chmod(linkdir, 0o777)
    rc, out = upgrade(env, d)
    env.case("refuses_link_in_writable_dir",
             rc == 1 and "directory %s is writable" % linkdir in out and d.serves(),
             "status %d: %s" % (rc, out))
    os.chmod(linkdir, 0o755)
    rc, out = upgrade(env, d)
    env.case("upgrade_through_safe_link", rc == 0 and "binary=%s" % binary in out,
             "status %d: %s" % (rc, out))
    d.proc.stop()


def proc_locks_for(path):
    """The /proc/locks lines on path's inode."""
    ino = os.stat(path).st_ino
    with open("/proc/locks") as f:
        return [l.strip() for l in f if l.split()[5].split(":")[-1] == str(ino)]


def case_image_lock(env):
    img = image(env, "locked.img")
    s = lambda n: os.path.join(env.tmp, "lock-%s.sock" % n)
    first = Daemon(env, "lock-1", s(1), ["--file", img]).start()
    locks = proc_locks_for(img)
    env.case("image_write_locked",
             first.controller().get("image_locked") is True and
             any("OFDLCK" in l and "WRITE" in l for l in locks), "locks: %s" % locks)
    rc, out = Daemon(env, "lock-2", s(2), ["--file", img]).start_fails()
    env.case("second_daemon_refused", rc == 1 and "is locked by another process" in out,
             "status %s: %s" % (rc, out[-300:]))
    second = Daemon(env, "lock-3", s(3), ["--file", img, "--no-lock"]).start()
    env.case("no_lock_starts", second.controller().get("image_locked") is False,
             "image_locked=%r" % second.controller().get("image_locked"))
    second.proc.stop()

    # Across a live upgrade the new process holds the same lock.
    rc, out = upgrade(env, first)
    locks = proc_locks_for(img)
    rc2, out2 = Daemon(env, "lock-4", s(4), ["--file", img]).start_fails()
    env.case("lock_kept_across_upgrade",
             rc == 0 and upgrades(first) == 1 and first.controller().get("image_locked") and
             any("OFDLCK" in l and "WRITE" in l for l in locks) and rc2 == 1 and
             "is locked" in out2,
             "upgrade %d: %s; locks %s; second daemon: %s %s" %
             (rc, out, locks, rc2, out2[-200:]))

    # kill -9: the lock goes with the process; a restart takes it at once.
    first.proc.kill9()
    again = Daemon(env, "lock-5", s(5), ["--file", img]).start()
    env.case("restart_after_kill9_locks", again.controller().get("image_locked") is True,
             "image_locked=%r" % again.controller().get("image_locked"))
    again.proc.stop()
    env.case("lock_released_at_exit", proc_locks_for(img) == [],
             "locks: %s" % proc_locks_for(img))

    # Read-only daemons share a read lock; a writer is kept out.
    ro1 = Daemon(env, "lock-ro1", s(6), ["--file", img, "--read-only"]).start()
    ro2 = Daemon(env, "lock-ro2", s(7), ["--file", img, "--read-only"]).start()
    rc, out = Daemon(env, "lock-rw", s(8), ["--file", img]).start_fails()
    env.case("read_only_share_writer_refused",
             ro1.serves() and ro2.serves() and rc == 1 and "is locked" in out,
             "status %s: %s" % (rc, out[-200:]))
    ro1.proc.stop()
    ro2.proc.stop()


def body(env):
    env.vmig_blk = blkenv.find_vmig_blk(env.build_dir)
    if env.vmig_blk is None:
        raise blkenv.Fail("no vmig-blk binary in %s" % env.build_dir)
    if os.geteuid() != 0:
        raise blkenv.Fail("needs root: the test switches to uid %d" % NOBODY)
    for step in (case_rpc_socket, case_socket_paths, case_socket_order, case_upgrade_binary,
                 case_image_lock):
        try:
            step(env)
        except blkenv.Fail as e:
            env.case(step.__name__, False, str(e))


if __name__ == "__main__":
    blkenv.run("security", body, prepare=False)
