#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Busy-polling and the null back-end of vmig-blk, driven by the benchmark's
own front-end (bench/blk/vblk-load.c, compiled here with cc) instead of a
guest, so it runs in seconds.

Cases:
- polling_used: during QD1 I/O the queue thread picks buffers up without a
  kick (vhost_get_controllers: poll_hits > 0).
- idle_cpu_low: once I/O stops (the front-end stays connected, the ring
  stays started), the daemon's CPU use over 2 s, read from /proc/PID/stat
  by this test, is under 5%: the poll window ends and the thread sleeps.
- no_poll_when_disabled: with --poll-us 0 nothing is picked up by polling.
- null_io_ok: the null back-end completes reads and writes without errors.
- poll_setting_survives_upgrade / null_io_across_upgrade: vmig_blk_set_poll
  changes the window, a live upgrade (by exec) during I/O keeps it, keeps
  the null back-end and loses no request.

Usage: test_poll.py BUILD_DIR
"""
import os
import shutil
import subprocess
import time

import blkenv

HERE = os.path.dirname(os.path.abspath(__file__))
LOAD_SRC = os.path.join(HERE, "..", "..", "..", "bench", "blk", "vblk-load.c")
IDLE_LIMIT_PCT = 5.0


def parse_kv(text):
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks


def start_daemon(env, name, extra):
    sock = os.path.join(env.tmp, name + ".sock")
    be = env.backend(name, sock, None)
    be.proc.argv = [env.vmig_blk, "--socket", sock, "--rpc", be.rpc] + extra
    return be.start()


def controller(be):
    res = be.rpc_call("vhost_get_controllers")
    if not isinstance(res, list) or not res:
        raise blkenv.Fail("vhost_get_controllers: %r" % res)
    return res[0]


def load(env, be, seconds, hold=0, read_pct=50):
    argv = [env.load_bin, "--socket", be.sock, "--qd", "1", "--read-pct", str(read_pct),
            "--seconds", str(seconds), "--pid", str(be.proc.pid)]
    if hold:
        argv += ["--hold", str(hold)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish_load(p, timeout_s):
    try:
        out, _ = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        raise blkenv.Fail("vblk-load did not finish in %d s" % timeout_s)
    return p.returncode, out.decode(errors="replace")


def idle_case(env):
    be = start_daemon(env, "poll", ["--null", "64M", "--poll-us", "200"])
    p = load(env, be, seconds=1, hold=6)
    try:
        line = p.stdout.readline().decode(errors="replace")  # the result line
        mark = p.stdout.readline().decode(errors="replace")
        if mark.strip() != "holding":
            raise blkenv.Fail("vblk-load: %s %s" % (line.strip(), mark.strip()))
        time.sleep(0.5)  # I/O stopped: give the window (200 us) ample time
        tick = os.sysconf("SC_CLK_TCK")
        c0, t0 = cpu_ticks(be.proc.pid), time.monotonic()
        time.sleep(2.0)
        c1, t1 = cpu_ticks(be.proc.pid), time.monotonic()
        pct = (c1 - c0) * 100.0 / tick / (t1 - t0)
        started = controller(be)["queues"][0]["started"]
    finally:
        rc, rest = finish_load(p, 30)
    kv = parse_kv(line)
    env.info("QD1 null with --poll-us 200: %s" % line.strip())
    env.case("null_io_ok", rc == 0 and kv.get("errors") == "0" and int(kv.get("ios", 0)) > 0,
             "rc=%d %s %s" % (rc, line.strip(), rest.strip()[-200:]))
    q = controller(be)["queues"][0]
    env.case("polling_used", q.get("poll_hits", 0) > 0, "queue stats %r" % q)
    env.case("idle_cpu_low", started and pct < IDLE_LIMIT_PCT,
             "daemon used %.1f%% CPU over 2 s idle (ring started: %s)" % (pct, started))
    be.proc.stop()


def no_poll_case(env):
    be = start_daemon(env, "nopoll", ["--null", "64M", "--poll-us", "0"])
    rc, out = finish_load(load(env, be, seconds=1), 30)
    q = controller(be)["queues"][0]
    env.case("no_poll_when_disabled",
             rc == 0 and q.get("poll_hits") == 0 and q.get("sleeps", 0) > 0,
             "rc=%d queue stats %r; %s" % (rc, q, out.strip()[-200:]))
    be.proc.stop()


def upgrade_case(env):
    be = start_daemon(env, "upg", ["--null", "64M", "--poll-us", "7"])
    before = be.rpc_call("vmig_blk_set_poll", {"poll_us": 123})
    p = load(env, be, seconds=4)
    time.sleep(2.0)
    r = subprocess.run([env.vmig_blk, "upgrade", "--socket", be.sock, "--rpc", be.rpc],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    up = r.stdout.decode(errors="replace").strip()
    rc, out = finish_load(p, 60)
    c = controller(be)
    env.case("poll_setting_survives_upgrade",
             r.returncode == 0 and before == {"poll_us": 123} and c.get("poll_us") == 123 and
             c.get("upgrades") == 1 and c.get("backend") == "null",
             "upgrade: %s; set_poll=%r; after: poll_us=%r upgrades=%r backend=%r" %
             (up, before, c.get("poll_us"), c.get("upgrades"), c.get("backend")))
    kv = parse_kv(out)
    env.case("null_io_across_upgrade", rc == 0 and kv.get("errors") == "0",
             "rc=%d %s" % (rc, out.strip()[-300:]))
    be.proc.stop()


def body(env):
    env.vmig_blk = blkenv.find_vmig_blk(env.build_dir)
    if env.vmig_blk is None:
        raise blkenv.Fail("no vmig-blk binary in %s" % env.build_dir)
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise blkenv.Fail("%s not installed: needed to build vblk-load" % cc)
    env.load_bin = os.path.join(env.tmp, "vblk-load")
    r = subprocess.run([cc, "-O2", "-D_GNU_SOURCE", "-o", env.load_bin, LOAD_SRC],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    if r.returncode != 0:
        raise blkenv.Fail("vblk-load build: %s" % r.stdout.decode(errors="replace")[-300:])
    for step in (idle_case, no_poll_case, upgrade_case):
        try:
            step(env)
        except blkenv.Fail as e:
            env.case(step.__name__, False, str(e))


if __name__ == "__main__":
    blkenv.run("poll", body, prepare=False)
