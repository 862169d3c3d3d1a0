#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Waits that must end, and doors that strangers cannot jam.

- Strays on the incoming port (a silent connection, garbage, a connection
  closed at once, a resume with no migration to resume, another stream
  version) are dropped and counted; the migration goes on waiting and a
  real source gets through while the silent one is still pending, so no
  connection can hold the door.
- A silent connection is dropped once its preamble is overdue.
- A rate-limited source (max-bandwidth 1000 bytes/s, so that one flush
  would sleep for 17 minutes) cancels at once, and a raised limit takes
  effect at once.
- A connect that nobody answers (a full listen backlog drops the SYN) is
  cancelled at once.
- The incoming side listens only on the address its URI names: tcp:127.0.0.1:P
  is not reachable on 127.0.0.2; tcp::P listens on every IPv4 address.

usage: test_robustness.py BUILD_DIR
"""
import os
import select
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from vmigtest import VM, Runner, check, free_port, wait_completed  # noqa: E402

MEM = 32 << 20
MEM_ARG = "32M"
PREAMBLE = 32


def pair(procs, build):
    src = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--workload", "random",
             "--dirty-rate", "8M", "--fill", "random", name="src")
    dst = VM(procs, build, "--mem", MEM_ARG, "--vcpus", 2, "--incoming", "defer", "-S",
             name="dst")
    return src, dst


def wait_rejected(dst, n, timeout=15):
    deadline = time.monotonic() + timeout
    while True:
        info = dst.migrate_status()
        if info.get("x-vmig-rejected-connections", 0) >= n:
            return info
        check(time.monotonic() < deadline, "only %r connections rejected, expected %d: %r" %
              (info.get("x-vmig-rejected-connections"), n, info))
        time.sleep(0.02)


def still_open(sock):
    """The peer has neither closed nor reset the connection."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return True
    try:
        return sock.recv(1) != b""
    except OSError:
        return False


def case_strays(procs, build):
    src, dst = pair(procs, build)
    port = free_port()
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)

    def conn():
        return socket.create_connection(("127.0.0.1", port), timeout=10)

    silent = conn()  # a health check that never speaks
    strays = [
        (os.urandom(65536), "magic"),
        (b"", "closed before"),
        (b"VMIGSTRM" + (99).to_bytes(4, "little") + bytes(20), "version 99"),
    ]
    for i, (data, why) in enumerate(strays):
        s = conn()
        if data:
            try:
                s.sendall(data)
            except OSError:
                pass  # the destination may drop it before it all went
        s.close()
        info = wait_rejected(dst, i + 1)
        check(why in info["x-vmig-last-rejection"], "reason %r lacks %r" %
              (info["x-vmig-last-rejection"], why))
        check(info["status"] == "setup", "destination gave up: %r" % info)
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})  # about 2 s
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % port)
    deadline = time.monotonic() + 30
    while dst.migrate_status()["status"] == "setup":
        check(time.monotonic() < deadline, "the real source never got in")
        time.sleep(0.01)
    check(still_open(silent), "the silent connection was dropped before the real source got "
          "in: it held the door")
    wait_completed(src, dst, 60, 30)
    # Had it waited for the silent one, that one would have been dropped
    # (and counted) as overdue first.
    check(dst.migrate_status().get("x-vmig-rejected-connections") == len(strays),
          "rejections: %r" % dst.migrate_status())
    check(src.memory_digest(MEM) == dst.memory_digest(MEM), "guest memory differs")
    silent.close()


def case_silent_dropped(procs, build):
    src, dst = pair(procs, build)
    port = free_port()
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
    silent = socket.create_connection(("127.0.0.1", port), timeout=10)
    silent.sendall(b"VMIG")  # a part of a preamble, then nothing
    info = wait_rejected(dst, 1, timeout=30)
    check("no preamble" in info["x-vmig-last-rejection"], "reason %r" % info)
    silent.settimeout(5)
    check(silent.recv(1) == b"", "the connection was not closed")
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % port)
    wait_completed(src, dst, 60, 30)


def slow_limit(procs, build):
    """A migration at 1000 bytes/s, a second in: one flush there waits long."""
    src, dst = pair(procs, build)
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1000})
    uri = "tcp:127.0.0.1:%d" % free_port()
    dst.qmp.cmd("migrate-incoming", uri=uri)
    src.qmp.cmd("migrate", uri=uri)
    time.sleep(1.0)
    return src, dst


def case_slow_limit_cancel(procs, build):
    src, dst = slow_limit(procs, build)
    src.qmp.cmd("migrate_cancel")
    info = src.wait_migration(10)
    check(info["status"] == "cancelled", "source %r" % info)
    check(src.status() == "running", "source not running: %s" % src.status())


def case_slow_limit_raised(procs, build):
    src, dst = slow_limit(procs, build)
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    wait_completed(src, dst, 30, 30)
    check(src.memory_digest(MEM) == dst.memory_digest(MEM), "guest memory differs")


def case_connect_cancel(procs, build):
    """A listener whose backlog is full: the kernel drops further SYNs, so
    a connect hangs until TCP gives up (about two minutes) unless cancelled."""
    src, _ = pair(procs, build)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue (backlog 0 admits one or two)
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    time.sleep(0.2)
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % port)
    time.sleep(1.0)
    check(src.migrate_status()["status"] == "setup", "connect did not hang: %r" %
          src.migrate_status())
    src.qmp.cmd("migrate_cancel")
    info = src.wait_migration(5)
    check(info["status"] == "cancelled", "source %r" % info)
    check(src.status() == "running", "source not running: %s" % src.status())
    for s in fillers:
        s.close()
    lsock.close()


def listening_on(port):
    """Local addresses (hex, as /proc/net/tcp writes them) listening on port."""
    found = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            addr, hexport = fields[1].split(":")
            if int(hexport, 16) == port and fields[3] == "0A":  # TCP_LISTEN
                found.append(addr)
    return found


def case_bind_named_address(procs, build):
    dst = VM(procs, build, "--mem", MEM_ARG, "--incoming", "defer", "-S", name="dst")
    port = free_port()
    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
    check(listening_on(port) == ["0100007F"], "listening on %r" % listening_on(port))
    try:
        socket.create_connection(("127.0.0.2", port), timeout=5).close()
        check(False, "127.0.0.2 reached a listener bound to 127.0.0.1")
    except ConnectionRefusedError:
        pass
    check(dst.migrate_status()["status"] == "setup", "destination gave up")
    dst.qmp.cmd("migrate_cancel")
    dst.wait_migration(10)
    other = VM(procs, build, "--mem", MEM_ARG, "--incoming", "defer", "-S", name="any")
    port = free_port()
    other.qmp.cmd("migrate-incoming", uri="tcp::%d" % port)
    check(listening_on(port) == ["00000000"], "tcp::P listening on %r" % listening_on(port))


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    r = Runner(sys.argv[1])
    r.run("incoming-survives-strays", case_strays, r.build)
    r.run("incoming-drops-silent-connection", case_silent_dropped, r.build)
    r.run("slow-limit-cancels-at-once", case_slow_limit_cancel, r.build)
    r.run("slow-limit-raised-takes-effect", case_slow_limit_raised, r.build)
    r.run("connect-cancels-at-once", case_connect_cancel, r.build)
    r.run("incoming-binds-named-address", case_bind_named_address, r.build)
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
