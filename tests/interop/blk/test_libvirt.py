#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""libvirt manages a VM whose disk is served by vmig-blk.

Two libvirt "hosts" run on this machine. Each is a libvirtd of its own (the
monolithic daemon of Debian 12's libvirt 9.0) in a network namespace and a
mount namespace that the test creates: /etc/libvirt, /var and /run are bind
mounts of directories in the test's temp dir, so its config, state, logs and
sockets are the test's and no system libvirtd is used or touched. A veth
pair joins the two network namespaces; libvirtd listens for qemu+tcp on its
own veth address only, and the migration streams run on that link.

Each host has a vmig-blk on the same shared image, on the socket path the
domain names (/var/lib/libvirt/vmig/disk.sock inside the host's mount
namespace). The domain is a TCG guest (no /dev/kvm here) with memfd shared
memory and a <disk type='vhostuser'> with <reconnect enabled='yes'/>. It
boots the interop test guest (tests/interop/guest), which writes and
verifies patterned blocks the whole time, while the test:

  1. kills vmig-blk on host A with SIGKILL and starts it again;
  2. live-upgrades vmig-blk on host A (`vmig-blk upgrade`);
  3. migrates the domain to host B with `virsh migrate --live` (pre-copy);
  4. migrates it back to host A with `virsh migrate --live --postcopy` and
     `virsh migrate-postcopy` once the pre-copy phase runs.

After each step the guest must keep writing, and its final pass must read
back every block with 0 I/O errors and 0 bad blocks. The serial console is
one file (append='on') that both hosts' QEMUs write, so it reads as one log.

QEMU runs as libvirt-qemu, as on a default Debian install: vmig-blk's socket
is in a setgid directory of that group and made under umask 007. For the
post-copy step the test sets vm.unprivileged_userfaultfd to 1 and puts it
back afterwards (see UnprivilegedUserfaultfd). The domain's <emulator> is a
wrapper that works around a QEMU 7.2 TCG bug (see WRAPPER).

Missing libvirt is installed through scripts/install-deps.sh (root only);
if it is still missing, or anything else the test needs is, that is a FAIL.
Everything the test started or changed (domains, QEMUs, daemons,
namespaces, the sysctl) is stopped, removed or put back whatever happened;
the mounts live only in the namespaces, which die with their last process.
docs/libvirt.md explains the set-up for operators.

Usage: test_libvirt.py BUILD_DIR
"""
import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import time

import blkenv

GUEST_SECONDS = 110
GUEST_ARGS = ["--seconds", GUEST_SECONDS, "--blocks", 8192, "--write-pct", 60,
              "--gap-ms", 50, "--progress-ms", 500]
# How many more guest writes prove that the guest goes on after a step.
WRITES_AFTER_STEP = 300
STEP_TIMEOUT_S = 45
MIGRATE_TIMEOUT_S = 120
# All waits together stay well under the 1200 s that tests/run-all.sh
# gives a script, so a hung step fails here and the cleanup still runs.
VIRSH_TIMEOUT_S = 30
# The socket path the domain XML names: the same on both hosts, each host's
# mount namespace maps it to its own vmig-blk.
DISK_SOCK = "/var/lib/libvirt/vmig/disk.sock"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
INSTALL_DEPS = os.path.join(ROOT, "scripts", "install-deps.sh")
# QEMU runs as Debian's libvirt user, not root: the socket must let it in.
QEMU_USER = QEMU_GROUP = "libvirt-qemu"
TOOLS = ("virsh", "libvirtd", "ip", "unshare", "qemu-system-x86_64")


def missing_libvirt():
    """What this test needs that is not installed, as a list of names."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    try:
        # libvirtd 9.0 resolves its default QEMU user before it reads
        # qemu.conf, so it will not start without it even with user=root.
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        missing.append("user libvirt-qemu")
    return missing


def ensure_libvirt(env):
    if os.geteuid() != 0:
        raise blkenv.Fail("must run as root (network and mount namespaces, libvirtd)")
    missing = missing_libvirt()
    if missing:
        env.info("missing %s: running scripts/install-deps.sh" % " ".join(missing))
        rc, out = run_cmd([INSTALL_DEPS], timeout_s=900)
        missing = missing_libvirt()
        if missing:
            raise blkenv.Fail("not installed: %s; install-deps.sh (exit %d) said: %s" %
                              (" ".join(missing), rc, out.strip()[-300:]))


def run_cmd(argv, timeout_s=VIRSH_TIMEOUT_S):
    """Runs argv; returns (exit status, output). A timeout is status 124."""
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = e.output.decode(errors="replace") if e.output else ""
        return 124, "timed out after %ds: %s" % (timeout_s, out)
    return r.returncode, r.stdout.decode(errors="replace")


class Host:
    """One libvirt host: a libvirtd in its own network and mount namespaces,
    with /etc/libvirt, /var and /run bound to directories under root."""

    def __init__(self, env, name, ns, addr, uuid):
        self.env, self.name, self.ns, self.addr = env, name, ns, addr
        self.root = os.path.join(env.tmp, "host-" + name)
        etc, var, run = (os.path.join(self.root, d) for d in ("etc", "var", "run"))
        for d in (etc, os.path.join(run, "libvirt"), os.path.join(var, "lib/libvirt/vmig"),
                  os.path.join(var, "cache/libvirt"), os.path.join(var, "log/libvirt/qemu"),
                  os.path.join(var, "tmp"), os.path.join(run, "lock")):
            os.makedirs(d, exist_ok=True)
        os.symlink("/run", os.path.join(var, "run"))
        os.symlink("/run/lock", os.path.join(var, "lock"))
        with open(os.path.join(etc, "libvirtd.conf"), "w") as f:
            f.write('listen_tls = 0\nlisten_tcp = 1\nlisten_addr = "%s"\n'
                    'auth_tcp = "none"\nauth_unix_rw = "none"\n'
                    'unix_sock_rw_perms = "0700"\nhost_uuid = "%s"\n' % (addr, uuid))
        with open(os.path.join(etc, "qemu.conf"), "w") as f:
            f.write('user = "%s"\ngroup = "%s"\ndynamic_ownership = 0\n' %
                    (QEMU_USER, QEMU_GROUP) +
                    'remember_owner = 0\nsecurity_driver = "none"\n'
                    'cgroup_controllers = [ ]\n'
                    'stdio_handler = "file"\n'
                    'migration_host = "%s"\nmigration_address = "%s"\n' % (addr, addr))
        self.sock = os.path.join(run, "libvirt", "libvirt-sock")
        self.uri = "qemu+unix:///system?socket=" + self.sock
        self.tcp_uri = "qemu+tcp://%s/system" % addr
        self.disk_sock = os.path.join(var, DISK_SOCK[len("/var/"):])
        # The socket's directory: QEMU's group, setgid, so that vmig-blk's
        # socket (made under umask 007, see start_backend) is in that group.
        sock_dir = os.path.dirname(self.disk_sock)
        os.chown(sock_dir, 0, grp.getgrnam(QEMU_GROUP).gr_gid)
        os.chmod(sock_dir, 0o2770)
        self.qemu_log_dir = os.path.join(var, "log/libvirt/qemu")
        self.pid_dir = os.path.join(run, "libvirt/qemu")
        script = ("mount --bind {etc} /etc/libvirt && mount --bind {var} /var && "
                  "mount --bind {run} /run && exec libvirtd --listen "
                  "--config /etc/libvirt/libvirtd.conf --pid-file /run/libvirtd.pid").format(
                      etc=shlex.quote(etc), var=shlex.quote(var), run=shlex.quote(run))
        # ip netns exec and unshare exec, so libvirtd is the process we own.
        self.proc = blkenv.Proc(env, "libvirtd-" + name,
                                ["ip", "netns", "exec", ns, "unshare", "--mount",
                                 "--propagation", "private", "sh", "-c", script])
        env.procs.append(self.proc)

    def start(self, timeout_s=30):
        self.proc.start()
        deadline = time.monotonic() + timeout_s
        out = ""
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise blkenv.Fail("libvirtd on host %s exited: %s" %
                                  (self.name, self.proc.text()[-400:]))
            if os.path.exists(self.sock):
                rc, out = self.virsh("version", timeout_s=10)
                if rc == 0:
                    return self
            time.sleep(0.2)
        raise blkenv.Fail("libvirtd on host %s not answering in %ds: %s" %
                          (self.name, timeout_s, out.strip()[-300:]))

    def virsh(self, *args, timeout_s=VIRSH_TIMEOUT_S):
        return run_cmd(["virsh", "-q", "-c", self.uri] + list(args), timeout_s)

    def virsh_argv_in_ns(self, *args):
        """virsh run in this host's network namespace, where the peer's
        qemu+tcp address is reachable; it still reaches this host's daemon
        through the unix socket."""
        return ["ip", "netns", "exec", self.ns, "virsh", "-q", "-c", self.uri] + list(args)

    def domstate(self, dom):
        rc, out = self.virsh("domstate", dom, timeout_s=10)
        return out.strip() if rc == 0 else "absent (%s)" % out.strip()[-120:]

    def qemu_pid(self, dom):
        try:
            with open(os.path.join(self.pid_dir, dom + ".pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def qemu_log(self, dom):
        try:
            with open(os.path.join(self.qemu_log_dir, dom + ".log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def teardown(self, dom):
        """Destroys what runs on this host, then stops its libvirtd. QEMU
        outlives libvirtd by design, so a QEMU that is still there is
        killed by its pid (from the pid file libvirt wrote)."""
        if self.proc.alive():
            rc, out = self.virsh("list", "--name", timeout_s=10)
            for d in out.split() if rc == 0 else []:
                self.virsh("destroy", d, timeout_s=20)
        pid = self.qemu_pid(dom)
        self.proc.stop(grace_s=5)
        if pid is not None and qemu_of(pid, dom):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def start_backend(be):
    """Starts (or restarts) a vmig-blk so that its vhost-user socket is
    rw for its group (the directory's, QEMU's) and nothing for others."""
    old = os.umask(0o007)
    try:
        return be.start()
    finally:
        os.umask(old)


def qemu_of(pid, dom):
    """Whether pid is still the QEMU that runs domain dom (pids get reused)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return ("guest=%s," % dom).encode() in f.read()
    except OSError:
        return False


def reap_qemus(dom):
    """Any QEMU left that runs our domain (its name is unique to this run)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit() and qemu_of(int(pid), dom):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


class Network:
    """Two network namespaces joined by a veth pair; removed by remove()."""

    def __init__(self, tag):
        self.ns = ["vblklv-a-" + tag, "vblklv-b-" + tag]
        net = 20 + os.getpid() % 200
        self.addr = ["10.232.%d.1" % net, "10.232.%d.2" % net]
        self.created = []

    def create(self):
        for ns in self.ns:
            rc, out = run_cmd(["ip", "netns", "add", ns])
            if rc != 0:
                raise blkenv.Fail("ip netns add %s: %s" % (ns, out.strip()))
            self.created.append(ns)
            run_cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
        steps = [["ip", "link", "add", "veth0", "netns", self.ns[0], "type", "veth",
                  "peer", "name", "veth0", "netns", self.ns[1]]]
        for ns, addr in zip(self.ns, self.addr):
            steps.append(["ip", "-n", ns, "addr", "add", addr + "/24", "dev", "veth0"])
            steps.append(["ip", "-n", ns, "link", "set", "veth0", "up"])
        for argv in steps:
            rc, out = run_cmd(argv)
            if rc != 0:
                raise blkenv.Fail("%s: %s" % (" ".join(argv), out.strip()))

    def remove(self):
        for ns in reversed(self.created):
            run_cmd(["ip", "netns", "del", ns])
        self.created = []


# QEMU 7.2 under TCG loses guest stores during a migration when the RAM
# block's length is a multiple of 256 KiB (see GUEST_MEM_KB in blkenv.py),
# and libvirt rounds a domain's memory up to a whole MiB on x86, so every
# domain it starts is exposed: measured here, the guest oopsed in
# blk_mq_complete_request_remote after its second migration, with 257 MiB.
# The domain therefore names this wrapper as its <emulator>. It runs the real
# QEMU with the RAM size libvirt chose replaced by blkenv.GUEST_MEM_KB, in
# both "-m" and the pc.ram memory backend, and changes nothing else (other
# invocations, such as libvirt's capability probes, pass through). Both hosts
# run the same wrapper, so the two sides of a migration agree. KVM is not
# affected; VBLK_LIBVIRT_NO_WRAPPER=1 runs QEMU directly, to see the bug.
QEMU = "/usr/bin/qemu-system-x86_64"
WRAPPER = """#!/usr/bin/python3
import json, os, sys
QEMU, RAM_KB = %r, %d
MIB = (RAM_KB + 1023) // 1024
args = sys.argv[1:]
fixed = list(args)
found = set()
for i in range(len(args) - 1):
    if args[i] == "-m" and args[i + 1] == str(MIB):
        fixed[i + 1] = "%%dk" %% RAM_KB
        found.add("m")
    elif args[i] == "-object" and args[i + 1].startswith("{"):
        obj = json.loads(args[i + 1])
        if obj.get("id") == "pc.ram" and obj.get("size") == MIB << 20:
            obj["size"] = RAM_KB << 10
            fixed[i + 1] = json.dumps(obj)
            found.add("obj")
os.execv(QEMU, [QEMU] + (fixed if found == {"m", "obj"} else args))
"""


def emulator(env):
    """The <emulator> for the domain: the wrapper above, or QEMU itself."""
    if os.environ.get("VBLK_LIBVIRT_NO_WRAPPER") == "1":
        return QEMU
    path = os.path.join(env.tmp, "qemu-tcg-ram")
    with open(path, "w") as f:
        f.write(WRAPPER % (QEMU, blkenv.GUEST_MEM_KB))
    os.chmod(path, 0o755)
    return path


def readable_copy(env, path):
    """A copy of path in the temp dir that QEMU_USER can read: the build
    tree may sit in a directory only root can enter (a mktemp -d clone)."""
    dst = os.path.join(env.tmp, "guest-" + os.path.basename(path))
    shutil.copyfile(path, dst)
    os.chmod(dst, 0o644)
    return dst


def domain_xml(env, dom, serial_log):
    return """<domain type='qemu'>
  <name>{dom}</name>
  <memory unit='KiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw'/>
      <source type='unix' path='{sock}'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{serial}' append='on'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
""".format(dom=dom, mem=blkenv.GUEST_MEM_KB, kernel=readable_copy(env, env.kernel),
           initrd=readable_copy(env, env.initrd),
           cmdline=blkenv.guest_cmdline(GUEST_ARGS), sock=DISK_SOCK, serial=serial_log,
           emulator=emulator(env))


class Console:
    """The guest's serial console: one file both hosts' QEMUs append to.
    Its waits end early, with the reason, when the domain stops running on
    the host it is on (set host and dom once it runs)."""

    def __init__(self, path):
        self.path = path
        self.host = self.dom = None
        self.next_check = 0.0

    def check_running(self):
        if self.host is None or time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + 2.0
        state = self.host.domstate(self.dom)
        if state != "running":
            tail = [l for l in self.serial().splitlines() if "PROGRESS" not in l][-6:]
            raise blkenv.Fail("domain %s on host %s: %s; console: %s" %
                              (self.dom, self.host.name, state, " | ".join(tail)[-600:]))

    def serial(self):
        try:
            with open(self.path, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_line(self, pattern, timeout_s):
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = rx.search(self.serial())
            if m:
                return m
            self.check_running()
            time.sleep(0.2)
        raise blkenv.Fail("timeout (%ds) waiting for '%s' on the guest console" %
                          (timeout_s, pattern))

    def writes(self):
        return blkenv.writes_of(self.serial())

    def wait_writes(self, above, timeout_s=STEP_TIMEOUT_S):
        """Waits until the guest has written more than `above` blocks in
        all; returns (reached, count, whether the guest already finished)."""
        deadline = time.monotonic() + timeout_s
        while True:
            n = self.writes()
            if n > above:
                return True, n, False
            if "VMIG-GUEST: SUMMARY" in self.serial() or time.monotonic() > deadline:
                return False, n, "VMIG-GUEST: SUMMARY" in self.serial()
            self.check_running()
            time.sleep(0.2)


def guest_goes_on(env, name, console, since, state, text_from):
    """The guest wrote WRITES_AFTER_STEP more blocks after the step ended.
    Also reports its longest I/O stall (GAP line) since text_from, the
    console's length when the step began."""
    ok, n, finished = console.wait_writes(since + WRITES_AFTER_STEP)
    env.case(name, ok, "guest writes %d at the step, %d %s; domain %s" %
             (since, n, "when it finished its run" if finished else
              "%ds later" % STEP_TIMEOUT_S, state))
    gaps = [float(g.get("gap_ms", 0)) for g in
            blkenv.parse_kv_lines(console.serial()[text_from:], "GAP")]
    env.info("%s: longest guest I/O stall %s" %
             (name, "%.0f ms" % max(gaps) if gaps else "under the 50 ms threshold"))
    return ok


def step_kill_restart(env, host, be, console, dom):
    """SIGKILL of vmig-blk, 1 s without it, then the same arguments again."""
    text_from = len(console.serial())
    be.kill9()
    time.sleep(1)
    start_backend(be)
    since = console.writes()
    guest_goes_on(env, "kill9_restart_guest_goes_on", console, since, host.domstate(dom),
                  text_from)


def step_upgrade(env, host, console, dom):
    text_from = len(console.serial())
    rc, out = run_cmd([env.vmig_blk, "upgrade", "--socket", host.disk_sock])
    since = console.writes()
    m = re.search(r'"pause_ms":\s*([0-9.]+)|pause_ms=([0-9.]+)', out)
    env.case("live_upgrade", rc == 0 and m is not None,
             "exit %d: %s" % (rc, out.strip()[-300:]))
    if m:
        env.info("live upgrade: daemon-measured pause %s ms" % (m.group(1) or m.group(2)))
    guest_goes_on(env, "live_upgrade_guest_goes_on", console, since, host.domstate(dom),
                  text_from)


def moved(src, dst, dom):
    """Whether the domain now runs on dst only; returns (ok, description)."""
    s, d = src.domstate(dom), dst.domstate(dom)
    ok = d == "running" and not s.startswith("running") and not s.startswith("paused")
    return ok, "on %s: %s; on %s: %s" % (src.name, s, dst.name, d)


def step_precopy(env, src, dst, console, dom):
    text_from = len(console.serial())
    t0 = time.monotonic()
    rc, out = run_cmd(src.virsh_argv_in_ns("migrate", "--live", "--persistent",
                                           "--undefinesource", dom, dst.tcp_uri),
                      timeout_s=MIGRATE_TIMEOUT_S)
    secs = time.monotonic() - t0
    since = console.writes()
    where_ok, where = moved(src, dst, dom)
    if rc == 0:
        console.host = dst
    env.case("precopy_migrate_%s_to_%s" % (src.name, dst.name), rc == 0 and where_ok,
             "virsh migrate exit %d after %.1fs: %s; %s" % (rc, secs, out.strip()[-300:],
                                                           where))
    env.info("pre-copy migration %s -> %s took %.1f s" % (src.name, dst.name, secs))
    if rc != 0 or not where_ok:
        return False
    report_job(env, dst, dom)
    return guest_goes_on(env, "precopy_guest_goes_on_%s" % dst.name, console, since,
                         dst.domstate(dom), text_from)


def report_job(env, host, dom):
    """libvirt's statistics of the migration that just ended, as the
    destination keeps them."""
    rc, out = host.virsh("domjobinfo", dom, "--completed", timeout_s=10)
    keep = ("Time elapsed:", "Total downtime:", "Memory processed:", "Memory bandwidth:",
            "Postcopy requests:")
    lines = [" ".join(l.split()) for l in out.splitlines() if l.strip().startswith(keep)]
    env.info("domjobinfo --completed on %s: %s" %
             (host.name, "; ".join(lines) if rc == 0 else out.strip()[-200:]))


class UnprivilegedUserfaultfd:
    """vm.unprivileged_userfaultfd=1 for a while, put back afterwards.

    The destination QEMU of a post-copy migration needs a userfaultfd. As
    QEMU_USER, with no capabilities, QEMU 7.2 gets one only when this
    sysctl is 1 (it does not ask for UFFD_USER_MODE_ONLY, and only QEMU 8.1
    and later try /dev/userfaultfd); with 0, the destination QEMU answers
    libvirt's migrate-set-capabilities with "Postcopy is not supported" and
    logs "userfaultfd not available: Operation not permitted". Only the
    creation of the fd needs it, so it is put back once the migration ended.
    """

    PATH = "/proc/sys/vm/unprivileged_userfaultfd"

    def __init__(self, env):
        self.env, self.old = env, None

    def __enter__(self):
        with open(self.PATH) as f:
            value = f.read().strip()
        if value != "1":
            with open(self.PATH, "w") as f:
                f.write("1")
            self.old = value
            self.env.info("vm.unprivileged_userfaultfd: %s -> 1 for the post-copy step" %
                          value)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            with open(self.PATH, "w") as f:
                f.write(self.old)
            self.env.info("vm.unprivileged_userfaultfd put back to %s" % self.old)


def wait_outgoing_job(src, dom, timeout_s=30):
    """Waits until QEMU's migration runs, not only libvirt's job: libvirt
    enables the postcopy-ram capability only once the destination is
    prepared, and migrate-postcopy before that is refused by QEMU."""
    deadline = time.monotonic() + timeout_s
    out = ""
    while time.monotonic() < deadline:
        rc, out = src.virsh("domjobinfo", dom, timeout_s=10)
        m = re.search(r"^(?:Memory|Data) processed:\s+([0-9.]+) (\w+)", out, re.M)
        if rc == 0 and m and float(m.group(1)) > 0:
            return True, out
        time.sleep(0.2)
    return False, out


def step_postcopy(env, src, dst, be_dst, console, dom):
    """Pre-copy capped at 16 MiB/s so that most of the RAM is still on the
    source when migrate-postcopy switches; then the guest runs on dst while
    its pages arrive (at most 32 MiB/s in the background, faulted pages
    first)."""
    log_from = len(be_dst.proc.text())
    text_from = len(console.serial())
    argv = src.virsh_argv_in_ns("migrate", "--live", "--postcopy", "--bandwidth", "16",
                                "--postcopy-bandwidth", "32", "--persistent",
                                "--undefinesource", dom, dst.tcp_uri)
    out_path = os.path.join(env.tmp, "virsh-migrate-postcopy.log")
    t0 = time.monotonic()
    with open(out_path, "wb") as out:
        mig = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        running, job = wait_outgoing_job(src, dom)
        time.sleep(1.5)
        rc_pc, out_pc = src.virsh("migrate-postcopy", dom)
        t_switch = time.monotonic() - t0
        env.case("postcopy_switch_accepted", running and rc_pc == 0,
                 "outgoing job seen %s (%s); migrate-postcopy exit %d: %s" %
                 (running, job.strip()[-200:], rc_pc, out_pc.strip()[-300:]))
        # The source's view of the post-copy phase: its last job report
        # before the domain leaves it holds the pages the destination
        # asked for (libvirt keeps no completed statistics of it here).
        rc, last_job = None, ""
        deadline = time.monotonic() + MIGRATE_TIMEOUT_S
        while rc is None and time.monotonic() < deadline:
            jrc, jout = src.virsh("domjobinfo", dom, timeout_s=10)
            if jrc == 0 and "Postcopy requests:" in jout:
                last_job = jout
            try:
                rc = mig.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        if rc is None:
            rc = 124
    finally:
        if mig.poll() is None:
            os.killpg(mig.pid, signal.SIGKILL)
            mig.wait(timeout=10)
    secs = time.monotonic() - t0
    since = console.writes()
    with open(out_path, errors="replace") as f:
        out = f.read()
    where_ok, where = moved(src, dst, dom)
    if rc == 0:
        console.host = dst
    env.case("postcopy_migrate_%s_to_%s" % (src.name, dst.name), rc == 0 and where_ok,
             "virsh migrate --postcopy exit %d after %.1fs: %s; %s" %
             (rc, secs, out.strip()[-300:], where))
    env.info("post-copy migration %s -> %s took %.1f s (switched at %.1f s)" %
             (src.name, dst.name, secs, t_switch))
    m = re.search(r"^Postcopy requests:\s+(\d+)", last_job, re.M)
    env.case("postcopy_pages_requested", m is not None and int(m.group(1)) > 0,
             "last domjobinfo of the source: %s" % " ".join(last_job.split())[-400:])
    if m:
        env.info("post-copy: %s pages requested by the destination, last seen" % m.group(1))
    # The destination daemon saw QEMU's post-copy (ADVISE, LISTEN, END) and
    # registered its mappings of guest memory on QEMU's userfaultfd.
    log = be_dst.proc.text()[log_from:]
    m = re.search(r"post-copy: listening -> off \((\d+) regions registered", log)
    env.case("backend_%s_served_postcopy" % dst.name, m is not None and int(m.group(1)) > 0,
             "vmig-blk log on %s since the migration: %s" % (dst.name, log.strip()[-400:]))
    if rc == 0 and where_ok:
        guest_goes_on(env, "postcopy_guest_goes_on_%s" % dst.name, console, since,
                      dst.domstate(dom), text_from)


def body(env):
    try:
        ensure_libvirt(env)
    except blkenv.Fail as e:
        e.case = "libvirt_installed"
        raise
    env.case("libvirt_installed", True)
    # QEMU (as QEMU_USER) runs the <emulator> wrapper from the temp dir:
    # it may pass through, not list it.
    os.chmod(env.tmp, 0o711)
    tag = "%d" % os.getpid()
    # Unique to this run: reaping by name never hits another run's QEMU.
    dom = "vblk-lv-" + re.sub(r"[^A-Za-z0-9]", "", os.path.basename(env.tmp))[-8:]
    net = Network(tag)
    hosts = []
    try:
        net.create()
        a = Host(env, "a", net.ns[0], net.addr[0],
                 "5a1e0000-0000-4000-8000-%012d" % (2 * os.getpid()))
        b = Host(env, "b", net.ns[1], net.addr[1],
                 "5a1e0000-0000-4000-8000-%012d" % (2 * os.getpid() + 1))
        hosts = [a, b]
        for h in hosts:
            h.start()
        env.case("libvirt_hosts_started", True)
        run_guest(env, a, b, dom)
    finally:
        for h in reversed(hosts):
            h.teardown(dom)
        reap_qemus(dom)
        net.remove()


def run_guest(env, a, b, dom):
    image = env.image("disk.img")
    be_a = start_backend(env.backend("vmig-blk-a", a.disk_sock, image, shared=True))
    be_b = start_backend(env.backend("vmig-blk-b", b.disk_sock, image, shared=True))
    console = Console(os.path.join(env.tmp, "guest.serial"))
    xml = os.path.join(env.tmp, "domain.xml")
    with open(xml, "w") as f:
        f.write(domain_xml(env, dom, console.path))
    rc, out = a.virsh("define", xml)
    if rc == 0:
        rc, out = a.virsh("start", dom)
    env.case("domain_started", rc == 0, "virsh: %s; QEMU log: %s" %
             (out.strip()[-300:], a.qemu_log(dom).strip()[-300:]))
    if rc != 0:
        return
    pid = a.qemu_pid(dom)
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
        ram = argv[argv.index("-m") + 1]
    except (TypeError, OSError, ValueError, IndexError):
        ram = "unknown"
    env.info("domain %s runs on host a, QEMU pid %s with -m %s" % (dom, pid, ram))
    console.host, console.dom = a, dom
    uid = pwd.getpwnam(QEMU_USER).pw_uid
    env.case("qemu_runs_as_%s" % QEMU_USER.replace("-", "_"),
             re.search(r"connection \d+ accepted \(pid \d+, uid %d\)" % uid,
                       be_a.proc.text()) is not None,
             "vmig-blk on a: %s" % be_a.proc.text().strip()[-300:])
    console.wait_line(r"^VMIG-GUEST: READY", 90)
    t_ready = time.monotonic()
    ok, _, _ = console.wait_writes(WRITES_AFTER_STEP)
    env.case("guest_writes_on_a", ok, "guest writes: %d" % console.writes())

    step_kill_restart(env, a, be_a, console, dom)
    step_upgrade(env, a, console, dom)
    if step_precopy(env, a, b, console, dom):
        with UnprivilegedUserfaultfd(env):
            step_postcopy(env, b, a, be_a, console, dom)
    ran_out = "VMIG-GUEST: SUMMARY" in console.serial()
    env.case("steps_done_while_guest_ran", not ran_out,
             "the guest finished its %d s run before the last step" % GUEST_SECONDS)

    # The rest of the guest's run, then its final pass over every block.
    left_s = GUEST_SECONDS - (time.monotonic() - t_ready)
    result = console.wait_line(r"^VMIG-GUEST: RESULT (.*)$", max(0, left_s) + 90).group(1)
    env.check_summary(console, result.strip(), min_writes=1000)
    for h in (a, b):
        h.virsh("destroy", dom, timeout_s=20)
    be_a.proc.stop()
    be_b.proc.stop()
    rc, scan, out = env.scan_image(image)
    env.case("image_consistent", rc == 0 and int(scan.get("pattern", 0)) > 0,
             "host scan: %s" % out.strip()[-300:])


blkenv.run("libvirt", body)
