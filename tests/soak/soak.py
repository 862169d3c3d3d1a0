#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Fault-injection soak: hundreds of migrations, each broken once at a
random moment, each checked for the four things that must never happen.

Every trial migrates a running vmig-vm guest (random writer, 2 vCPUs) to a
destination that runs it on arrival, through a relay on loopback that the
soak controls. It picks one fault and one moment:

  kill -9 of the source or of the destination, during setup, the bulk
  round, a later round, the switch-over or post-copy; a cut of one
  connection (main both ways, main forward, the return path, the urgent
  channel, a multifd channel) or of all of them; a stall of every
  connection; a bandwidth drop.

Then it acts as an operator would (recover a paused post-copy, start the
side that query-migrate says may run) and checks:

  1. split brain: the guest never ran on both sides at once (running
     intervals from the STOP/RESUME events of both VMs, and kill times);
  2. the VM is whole on exactly one side: the side that runs verifies its
     pages (the guest checks every page it overwrites) and no guest ever
     saw an inconsistent page; or the VM was on a host that died (a kill
     of the source before the handover, or of either side in post-copy,
     where the documented risk of post-copy applies), and no survivor runs;
  3. no hang: every step ends within its deadline, every survivor answers;
  4. no leak: a survivor whose migration ended holds the fds and threads it
     held before the migration (a destination whose post-copy failed keeps
     its userfaultfd and fault thread on purpose).

usage: soak.py BUILD_DIR
  SOAK_FAULTS   number of trials (default 500)
  SOAK_MINUTES  stop starting new trials after this long (default 60)
  SOAK_SEED     seed of the random choices (default: the time; printed)
Prints a line per trial, a table per fault class, and "N passed, N failed".
"""
import collections
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from vmigtest import VM, QMPError, Procs, Relay, check, free_port  # noqa: E402

MEM_ARG = "64M"
SETTLE_S = 60       # a migration must reach an end or a pause within this
TERMINAL = ("completed", "failed", "cancelled")
PAUSED = ("postcopy-paused",)


class Trial:
    def __init__(self, procs, build, rng, n):
        self.procs, self.build, self.rng, self.n = procs, build, rng, n
        self.mode = rng.choice(["precopy", "precopy", "multifd", "postcopy", "postcopy"])
        self.fault, self.phase = self.pick_fault()
        self.killed = {}  # name -> wall time of the kill
        self.pre_kill = {}  # name -> (wall time, runstate) just before the kill
        self.outcome = None

    def pick_fault(self):
        r = self.rng
        phases = ["setup", "bulk", "rounds", "switch"]
        if self.mode == "postcopy":
            phases = ["setup", "bulk", "switch", "postcopy", "postcopy"]
        kinds = ["kill-src", "kill-dst", "cut-main", "cut-forward", "cut-return", "cut-all",
                 "stall", "bandwidth"]
        if self.mode == "postcopy":
            kinds.append("cut-urgent")
        if self.mode == "multifd":
            kinds += ["cut-multifd", "cut-multifd"]
        return r.choice(kinds), r.choice(phases)

    def name(self):
        return "%s %s@%s" % (self.mode, self.fault, self.phase)

    # ---- setup -----------------------------------------------------------

    def start(self):
        self.src = VM(self.procs, self.build, "--mem", MEM_ARG, "--vcpus", 2, "--workload",
                      "random", "--dirty-rate", "32M", "--fill", "random", name="src")
        self.dst = VM(self.procs, self.build, "--mem", MEM_ARG, "--vcpus", 2, "--incoming",
                      "defer", "--workload", "random", "--dirty-rate", "32M", name="dst")
        caps = []
        if self.mode == "postcopy":
            caps = ["postcopy-ram"]
        if self.mode == "multifd":
            caps = ["multifd"]
        for vm in (self.src, self.dst):
            if caps:
                vm.qmp.cmd("migrate-set-capabilities",
                           capabilities=[{"capability": c, "state": True} for c in caps])
            if self.mode == "multifd":
                vm.qmp.cmd("migrate-set-parameters", **{"multifd-channels": 2})
        self.src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 48 << 20,
                                                      "max-postcopy-bandwidth": 32 << 20})
        self.base = {vm.name: resources(vm) for vm in (self.src, self.dst)}
        port = free_port()
        self.relay = Relay(port)
        self.dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
        self.src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % self.relay.port)
        self.switch_at = None
        if self.mode == "postcopy":
            self.switch_at = time.monotonic() + self.rng.uniform(0.2, 0.6)

    def maybe_switch(self):
        if self.mode == "postcopy" and self.switch_at and time.monotonic() >= self.switch_at:
            self.switch_at = None
            if not self.src.alive():
                return
            try:
                self.src.qmp.cmd("migrate-start-postcopy")
            except QMPError:
                pass  # already over, or failed: the fault decides

    # ---- the fault ---------------------------------------------------------

    def wait_phase(self):
        """Returns once the chosen moment has come (or the migration ended
        before it: the fault then hits whatever state there is)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.maybe_switch()
            info = self.src.qmp.cmd("query-migrate")
            st = info.get("status")
            ram = info.get("ram", {})
            if st in TERMINAL:
                return
            if self.phase == "setup":
                break
            if self.phase == "bulk" and ram.get("transferred", 0) > (8 << 20):
                break
            if self.phase == "rounds" and ram.get("dirty-sync-count", 0) >= 2:
                break
            if self.phase == "switch" and (st in ("device", "postcopy-active") or
                                           self.src.status() == "finish-migrate"):
                break
            if self.phase == "postcopy" and st == "postcopy-active":
                break
            time.sleep(0.002 if self.phase == "switch" else 0.01)
        jitter = {"setup": 0.02, "bulk": 0.2, "rounds": 0.2, "switch": 0.003, "postcopy": 0.5}
        time.sleep(self.rng.uniform(0, jitter[self.phase]))

    def kill(self, vm):
        # Collect its events, and whether it ran, just before: a STOP it
        # sent and nobody read would die with it.
        status = vm.status()
        self.pre_kill[vm.name] = (time.time(), status)
        self.killed[vm.name] = time.time()
        vm.kill()

    def inject(self):
        f, r = self.fault, self.relay
        if f == "kill-src":
            self.kill(self.src)
        elif f == "kill-dst":
            self.kill(self.dst)
        elif f == "cut-main":
            r.cut_conn(0)
        elif f == "cut-forward":
            r.cut_conn(0, "forward")
        elif f == "cut-return":
            r.cut_conn(0, "reverse")
        elif f == "cut-urgent":
            r.cut_conn(1)
        elif f == "cut-multifd":
            r.cut_conn(1 + self.rng.randrange(2))
        elif f == "cut-all":
            r.cut()
        elif f == "stall":
            r.stall(self.rng.uniform(0.3, 2.0))
        elif f == "bandwidth":
            self.src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
            time.sleep(self.rng.uniform(0.2, 1.0))
            self.src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 48 << 20})

    # ---- after the fault ---------------------------------------------------

    def alive(self):
        return [vm for vm in (self.src, self.dst) if vm.alive()]

    def settle(self):
        """Both sides end, pause, or die; bounded."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            self.maybe_switch()
            states = {vm.name: vm.migrate_status().get("status") for vm in self.alive()}
            # A destination that never got its peer (the connection was cut
            # before its preamble) waits on, as it should, once the source
            # has given up or died.
            if states.get("dst") == "setup" and states.get("src", "failed") in TERMINAL:
                states["dst"] = "setup (no peer)"
                return states
            if all(st in TERMINAL + PAUSED for st in states.values()):
                # A paused side waits for its peer: settled once the peer
                # has settled too (or is dead).
                return states
            if time.monotonic() > deadline:
                raise Hang("no end within %ds: %r" % (SETTLE_S, states))
            time.sleep(0.02)

    def resolve(self, states):
        """What an operator does; returns the side the VM lives on, or None."""
        src, dst = self.src, self.dst
        s, d = states.get("src"), states.get("dst")
        if s in PAUSED and d in PAUSED:  # post-copy lost its link: recover it
            port = free_port()
            self.relay.close()
            self.relay = Relay(port)
            src.qmp.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
            dst.qmp.cmd("migrate-recover", uri="tcp:127.0.0.1:%d" % port)
            src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % self.relay.port, resume=True)
            states = self.settle()
            s, d = states.get("src"), states.get("dst")
            if s in PAUSED and d in PAUSED:
                raise Hang("post-copy paused again after recovery")
            self.outcome = "post-copy recovered"
        if d == "completed" and dst.status() == "running":
            self.outcome = self.outcome or "on destination"
            return dst
        if src.alive() and src.status() == "running":
            self.outcome = self.outcome or "stayed on source"
            return src
        if s in PAUSED and not (dst.alive() and dst.status() == "running"):
            # Paused, but the destination does not run: if it never said
            # it did, the source may give up and the operator decides.
            try:
                src.qmp.cmd("migrate_cancel")
                states = self.settle()
                s = states.get("src")
            except QMPError:
                self.outcome = "post-copy destination ran, then died (documented risk)"
                return None
        sinfo = src.migrate_status() if src.alive() else {}
        dinfo = dst.migrate_status() if dst.alive() else {}
        if sinfo.get("x-vmig-handover-unknown"):
            # Ask the destination; start exactly one side.
            if dst.alive() and dst.status() == "running":
                self.outcome = "unknown, destination runs"
                return dst
            src.qmp.cmd("cont")
            self.outcome = "unknown, operator resumed source"
            return src
        if dinfo.get("x-vmig-ram-incomplete") and src.alive():
            check(src.status() != "running", "source runs beside a failed post-copy")
            src.qmp.cmd("cont")  # no disk here: rolling back is safe
            self.outcome = "post-copy failed, operator resumed source"
            return src
        if "src" in self.killed and not (dst.alive() and dst.status() == "running"):
            self.outcome = "source host died before the handover"
            return None
        if (s in PAUSED or d in PAUSED) and self.killed:
            self.outcome = "post-copy peer died (documented risk)"
            return None
        if "dst" in self.killed and src.alive() and src.migrate_status().get("status") in PAUSED:
            self.outcome = "post-copy peer died (documented risk)"
            return None
        raise AssertionError("VM on no side: src %r (%s), dst %r (%s)" % (
            s, src.status() if src.alive() else "dead", d,
            dst.status() if dst.alive() else "dead"))

    def check_split_brain(self, home):
        """Running intervals from each VM's STOP/RESUME events must not
        overlap (a dead VM stops at its kill time)."""
        now = time.time()
        spans = {}
        for vm, initially in ((self.src, True), (self.dst, False)):
            if vm.alive():
                vm.qmp.cmd("query-status")  # collect pending events
            on = -1e18 if initially else None
            out = []
            for e in vm.qmp.events:
                ts = e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
                if e["event"] == "RESUME" and on is None:
                    on = ts
                elif e["event"] == "STOP" and on is not None:
                    out.append((on, ts))
                    on = None
            if on is not None:
                end = self.killed.get(vm.name, now)
                seen = self.pre_kill.get(vm.name)
                if seen and seen[1] != "running":
                    end = min(end, seen[0])  # it had stopped before we killed it
                out.append((on, end))
            spans[vm.name] = out
        for a0, a1 in spans["src"]:
            for b0, b1 in spans["dst"]:
                if a0 < b1 and b0 < a1:
                    raise SplitBrain("both ran from %.6f to %.6f" % (max(a0, b0), min(a1, b1)))
        running = [vm.name for vm in self.alive() if vm.status() == "running"]
        if len(running) > 1:
            raise SplitBrain("both run now")

    def check_whole(self, home):
        for vm in self.alive():
            g = vm.guest()
            if g["inconsistencies"]:
                raise Corruption("%s saw %d inconsistent pages" % (vm.name, g["inconsistencies"]))
        if home is not None:
            v0 = home.guest()["pages-verified"]
            deadline = time.monotonic() + 20
            while home.guest()["pages-verified"] < v0 + 500:
                if time.monotonic() > deadline:
                    raise Hang("%s runs but verifies no pages" % home.name)
                time.sleep(0.05)
            if home.guest()["inconsistencies"]:
                raise Corruption("%s saw inconsistent pages" % home.name)

    def check_leaks(self):
        for vm in self.alive():
            info = vm.migrate_status()
            if info.get("status") not in TERMINAL or info.get("x-vmig-ram-incomplete"):
                continue  # still paused, or failed post-copy keeps uffd on purpose
            deadline = time.monotonic() + 5
            while True:
                fds, threads = resources(vm)
                bfds, bthreads = self.base[vm.name]
                if fds <= bfds and threads <= bthreads:
                    break
                if time.monotonic() > deadline:
                    raise Leak("%s: %d fds, %d threads; %d and %d before the migration" % (
                        vm.name, fds, threads, bfds, bthreads))
                time.sleep(0.05)

    def run(self):
        self.start()
        self.wait_phase()
        self.inject()
        states = self.settle()
        home = self.resolve(states)
        self.check_split_brain(home)
        self.check_whole(home)
        self.check_leaks()
        for vm in self.alive():  # survivors quit when told, in time
            try:
                vm.qmp.cmd("quit")
            except (QMPError, OSError, ConnectionError):
                pass
            try:
                vm.proc.wait(timeout=15)
            except Exception:
                raise Hang("%s did not quit" % vm.name)
        self.relay.close()


class SplitBrain(Exception):
    pass


class Corruption(Exception):
    pass


class Hang(Exception):
    pass


class Leak(Exception):
    pass


def resources(vm):
    pid = vm.proc.pid
    return len(os.listdir("/proc/%d/fd" % pid)), len(os.listdir("/proc/%d/task" % pid))


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    build = os.path.abspath(sys.argv[1])
    faults = int(os.environ.get("SOAK_FAULTS", "500"))
    minutes = float(os.environ.get("SOAK_MINUTES", "60"))
    seed = int(os.environ.get("SOAK_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    print("soak: %d faults, at most %.0f minutes, seed %d" % (faults, minutes, seed), flush=True)
    end = time.monotonic() + minutes * 60
    per_class = collections.defaultdict(collections.Counter)
    violations = collections.Counter()
    passed = failed = 0
    for n in range(faults):
        if time.monotonic() > end:
            print("soak: time is up after %d trials" % n, flush=True)
            break
        procs = Procs()
        t = Trial(procs, build, rng, n)
        t0 = time.monotonic()
        kind = "%s %s" % (t.mode, t.fault)
        try:
            signal.alarm(180)  # the last resort against a hang of the soak itself
            t.run()
            signal.alarm(0)
            passed += 1
            per_class[kind][t.outcome] += 1
            print("PASS: soak-%d %s: %s (%.1fs)" % (n, t.name(), t.outcome,
                                                      time.monotonic() - t0), flush=True)
        except (SplitBrain, Corruption, Hang, Leak, AssertionError, QMPError, OSError,
                TimeoutError, ConnectionError) as e:
            signal.alarm(0)
            failed += 1
            cls = type(e).__name__
            violations[cls] += 1
            per_class[kind]["FAILED " + cls] += 1
            print("FAIL: soak-%d %s: %s: %s" % (n, t.name(), cls, str(e)[:300]), flush=True)
            for vm in ("src", "dst"):
                v = getattr(t, vm, None)
                if v is not None:
                    sys.stderr.write("--- %s log ---\n%s\n" % (vm, v.log_text()))
        finally:
            procs.cleanup()
    print("\n| fault | trials | outcomes |")
    print("|---|---|---|")
    for kind in sorted(per_class):
        c = per_class[kind]
        print("| %s | %d | %s |" % (kind, sum(c.values()),
                                    ", ".join("%s: %d" % kv for kv in sorted(c.items()))))
    print("\nsplit brain: %d, corrupted memory: %d, hangs: %d, leaks: %d, other failures: %d" % (
        violations["SplitBrain"], violations["Corruption"], violations["Hang"],
        violations["Leak"], failed - sum(violations[k] for k in
                                         ("SplitBrain", "Corruption", "Hang", "Leak"))))
    print("seed %d" % seed)
    print("%d passed, %d failed" % (passed, failed), flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
