#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""TLS on every migration connection, end to end through vmig-vm and QMP.

Credentials come from tests/lib/tlscerts.py, made fresh for the run, and are
given as QEMU gives them: `--object tls-creds-x509|tls-creds-psk|authz-simple`
or QMP object-add, then the migration parameters tls-creds, tls-hostname and
tls-authz. The destination always waits with `--incoming defer`.

- Success cases (x509 pre-copy over one channel and over multifd, PSK,
  authz-simple with the right identity, post-copy with a cut and a
  recovery, the vmig CLI) compare guest memory on both sides through
  pmemsave and check the guests' own page checks. Where a relay can sit in
  the path, it also looks at the bytes: every connection must open with a
  TLS handshake record, and a marker that fills the source's RAM must never
  cross in clear.
- Every rejection case (no client cert, wrong CA, expired certs, a name the
  cert does not carry, wrong PSK, TLS against plain and plain against TLS,
  an identity authz-simple does not allow) checks that the source ends in
  "failed" with an error-desc that names the cause, keeps running with its
  memory intact, and that the destination is still waiting, has counted
  the connection as rejected with the reason, and has not had a byte of
  its guest memory written. Then a good source gets through to the same
  destination (when the destination's own credentials were the bad ones,
  to a new destination instead).
- A post-copy resume must authenticate again: a resume in clear to a TLS
  destination is refused, and both sides stay paused until a TLS resume.

Every wait is bounded. VMs have 64 MiB of RAM, so the suite stays quick.

usage: test_tls.py BUILD_DIR
"""
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import tlscerts  # noqa: E402
from vmigtest import VM, QMPError, Relay, Runner, check, free_port, wait_completed  # noqa: E402

MEM_ARG = "64M"
MEM = 64 << 20
# Fills the source's RAM so that plaintext on the wire is recognisable.
MARKER = b"vmig-tls-test plaintext marker: must never cross the wire in clear. "
HANDSHAKE_RECORD = b"\x16\x03"  # TLS record type 22 (handshake), version 3.x
CERTS = None  # the run's credential base dir, made in main()


# ---- set-up ----------------------------------------------------------------

def x509_opt(oid, endpoint, d, verify_peer=None):
    s = "tls-creds-x509,id=%s,endpoint=%s,dir=%s" % (oid, endpoint, d)
    if verify_peer is not None:
        s += ",verify-peer=" + ("on" if verify_peer else "off")
    return s


def psk_opt(oid, endpoint, d, username=None):
    s = "tls-creds-psk,id=%s,endpoint=%s,dir=%s" % (oid, endpoint, d)
    return s + (",username=" + username if username else "")


def authz_opt(oid, identity):
    return "authz-simple,id=%s,identity=%s" % (oid, identity.replace(",", ",,"))


def add_x509(vm, oid, endpoint, d, verify_peer=None):
    props = {"qom-type": "tls-creds-x509", "id": oid, "endpoint": endpoint, "dir": d}
    if verify_peer is not None:
        props["verify-peer"] = verify_peer
    vm.qmp.cmd("object-add", **props)


def add_psk(vm, oid, endpoint, d, username=None):
    props = {"qom-type": "tls-creds-psk", "id": oid, "endpoint": endpoint, "dir": d}
    if username:
        props["username"] = username
    vm.qmp.cmd("object-add", **props)


def marker_fill(procs):
    path = os.path.join(procs.tmpdir(), "fill.bin")
    with open(path, "wb") as f:
        f.write((MARKER * (MEM // len(MARKER) + 1))[:MEM])
    return path


def source(procs, build, *objects, fill="random", name="src", caps=("x-vmig-verify-memory",)):
    """A source guest that writes (and checks) its pages all along."""
    args = ["--mem", MEM_ARG, "--vcpus", 2, "--workload", "random", "--dirty-rate", "8M",
            "--fill", fill]
    for o in objects:
        args += ["--object", o]
    vm = VM(procs, build, *args, name=name)
    set_caps(vm, caps)
    return vm


def destination(procs, build, *objects, name="dst", caps=("x-vmig-verify-memory",),
                extra=("-S",)):
    args = ["--mem", MEM_ARG, "--vcpus", 2, "--incoming", "defer"] + list(extra)
    for o in objects:
        args += ["--object", o]
    vm = VM(procs, build, *args, name=name)
    set_caps(vm, caps)
    return vm


def set_caps(vm, caps):
    if caps:
        vm.qmp.cmd("migrate-set-capabilities",
                   capabilities=[{"capability": c, "state": True} for c in caps])


def set_tls(vm, creds, hostname=None, authz=None):
    params = {"tls-creds": creds}
    if hostname is not None:
        params["tls-hostname"] = hostname
    if authz is not None:
        params["tls-authz"] = authz
    vm.qmp.cmd("migrate-set-parameters", **params)


def listen(dst):
    uri = "tcp:127.0.0.1:%d" % free_port()
    dst.qmp.cmd("migrate-incoming", uri=uri)
    return uri


def port_of(uri):
    return int(uri.rsplit(":", 1)[1])


class Sniffer(Relay):
    """A relay that also looks at what the source sends on each connection:
    its first bytes, and whether MARKER crossed in clear."""

    def __init__(self, target):
        self.first = {}
        self.marker_seen = 0
        self.sniff_lock = threading.Lock()
        super().__init__(target)

    def _hook(self, index, data):
        with self.sniff_lock:
            head = self.first.get(index, b"")
            if len(head) < 8:
                self.first[index] = head + bytes(data[:8 - len(head)])
            if MARKER[:32] in data:
                self.marker_seen += 1
        return super()._hook(index, data)

    def check_encrypted(self, min_conns):
        with self.sniff_lock:
            first, seen = dict(self.first), self.marker_seen
        check(len(first) >= min_conns, "only %d connections crossed the relay, expected %d"
              % (len(first), min_conns))
        for i, head in sorted(first.items()):
            check(head.startswith(HANDSHAKE_RECORD),
                  "connection %d opened with %r, not a TLS handshake record" % (i, head))
        check(seen == 0, "guest memory crossed the wire in clear (%d chunks)" % seen)

    def check_plain(self):
        with self.sniff_lock:
            check(self.marker_seen > 0, "the sniffer saw no plaintext in a plain migration")


# ---- outcomes ----------------------------------------------------------------

def says(text, *groups):
    """text names one word of every group (case-insensitive)."""
    t = (text or "").lower()
    return all(any(w.lower() in t for w in g) for g in groups)


def completed_and_equal(src, dst):
    info, dinfo = wait_completed(src, dst, 120, 60)
    check(src.status() == "postmigrate", "source runstate %s" % src.status())
    check(dst.status() == "paused", "destination runstate %s (-S)" % dst.status())
    check(src.memory_digest(MEM) == dst.memory_digest(MEM), "guest memory differs")
    for vm in (src, dst):
        g = vm.guest()
        check(g["inconsistencies"] == 0, "%s guest self-check failed: %r" % (vm.name, g))
    return info, dinfo


def source_intact(src):
    """Running, its guest still writing, and no page it checked was wrong."""
    check(src.status() == "running", "source not running: %s" % src.status())
    w0 = src.guest()["pages-written"]
    deadline = time.monotonic() + 10
    while src.guest()["pages-written"] <= w0:
        check(time.monotonic() < deadline, "source guest stopped writing")
        time.sleep(0.05)
    g = src.guest()
    check(g["inconsistencies"] == 0, "source guest self-check failed: %r" % g)


def wait_rejected(dst, n, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        d = dst.migrate_status()
        if d.get("x-vmig-rejected-connections", 0) >= n:
            return d
        check(d.get("status") not in ("failed", "completed", "cancelled"),
              "destination ended the migration instead of waiting: %r" % d)
        check(time.monotonic() < deadline, "destination rejected %r connections, expected "
              "%d: %r" % (d.get("x-vmig-rejected-connections"), n, d))
        time.sleep(0.05)


def source_failed(src, *words, timeout=60):
    """The source's migration failed, and its error-desc names the cause."""
    info = src.wait_migration(timeout)
    check(info["status"] == "failed", "source %r, expected failed: %s" %
          (info["status"], info.get("error-desc")))
    desc = info.get("error-desc", "")
    check(says(desc, *words), "source error-desc %r does not name the cause (wanted %s)"
          % (desc, " and ".join("/".join(g) for g in words)))
    source_intact(src)
    return info


def destination_waits(dst, n, digest, *words):
    """The destination counted n rejected connections, the last one with a
    reason that names the cause, still waits, and its memory is untouched."""
    d = wait_rejected(dst, n)
    why = d.get("x-vmig-last-rejection", "")
    check(says(why, *words), "destination's x-vmig-last-rejection %r does not name the cause "
          "(wanted %s)" % (why, " and ".join("/".join(g) for g in words)))
    time.sleep(0.3)  # a destination that fails late must be caught too
    d = dst.migrate_status()
    check(d.get("status") not in ("failed", "completed", "cancelled"),
          "destination no longer waits: %r" % d)
    check(dst.status() != "running", "destination runs: %s" % dst.status())
    check(dst.memory_digest(MEM) == digest, "a rejected peer wrote guest memory")
    return d


def x509_pair(procs, build, client_dir, server_dir=None, verify_peer=True, dst_objects=()):
    """A source with client creds "tls0" from client_dir, and a destination
    waiting with server creds "tls0" (the good server unless server_dir)."""
    server_dir = server_dir or tlscerts.x509_good(CERTS).server
    src = source(procs, build)
    if client_dir:
        add_x509(src, "tls0", "client", client_dir)
        set_tls(src, "tls0", "localhost")
    dst = destination(procs, build, x509_opt("tls0", "server", server_dir, verify_peer),
                      *dst_objects)
    set_tls(dst, "tls0")
    return src, dst


def good_source_gets_in(src, dst, uri, creds_dir=None, hostname="localhost"):
    """The same source, given good credentials, migrates to the same
    destination."""
    if creds_dir:
        add_x509(src, "good", "client", creds_dir)
        set_tls(src, "good", hostname)
    elif hostname is not None:
        src.qmp.cmd("migrate-set-parameters", **{"tls-hostname": hostname})
    src.qmp.cmd("migrate", uri=uri)
    completed_and_equal(src, dst)


# ---- success -----------------------------------------------------------------

def case_self_check(procs, build):
    tlscerts.self_check(procs.tmpdir())


def case_x509_precopy(procs, build):
    """One channel, credentials from the command line, through a sniffer."""
    g = tlscerts.x509_good(CERTS)
    src = source(procs, build, x509_opt("tls0", "client", g.client), fill=marker_fill(procs))
    dst = destination(procs, build, x509_opt("tls0", "server", g.server, True))
    set_tls(src, "tls0", "localhost")
    set_tls(dst, "tls0")
    for vm, host in ((src, "localhost"), (dst, "")):
        p = vm.qmp.cmd("query-migrate-parameters")
        check(p.get("tls-creds") == "tls0" and p.get("tls-hostname") == host,
              "%s parameters not kept: %r" % (vm.name, p))
    uri = listen(dst)
    relay = Sniffer(port_of(uri))
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port)
    completed_and_equal(src, dst)
    relay.check_encrypted(1)
    relay.close()


def case_x509_multifd(procs, build, channels=4):
    """multifd, credentials by object-add; no tls-hostname, so the name
    checked is the URI's host, 127.0.0.1 (an IP SAN of the cert)."""
    g = tlscerts.x509_good(CERTS)
    src = source(procs, build, fill=marker_fill(procs), caps=("x-vmig-verify-memory", "multifd"))
    dst = destination(procs, build, caps=("x-vmig-verify-memory", "multifd"))
    add_x509(src, "tls0", "client", g.client)
    add_x509(dst, "tls0", "server", g.server, True)
    for vm in (src, dst):
        vm.qmp.cmd("migrate-set-parameters", **{"multifd-channels": channels})
        set_tls(vm, "tls0")
    uri = listen(dst)
    relay = Sniffer(port_of(uri))
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port)
    info, _ = completed_and_equal(src, dst)
    check(info["ram"]["multifd-bytes"] >= MEM - (8 << 20),
          "multifd-bytes %d for %d bytes of RAM" % (info["ram"]["multifd-bytes"], MEM))
    relay.check_encrypted(1 + channels)
    relay.close()


def case_zero_copy_refused(procs, build):
    """zero-copy-send with TLS: the kernel would send the ciphertext, not
    guest RAM, so there is nothing to send in place; migrate says so (as
    QEMU refuses it) and the guest runs on."""
    g = tlscerts.x509_good(CERTS)
    src = source(procs, build, caps=("multifd", "zero-copy-send"))
    add_x509(src, "tls0", "client", g.client)
    set_tls(src, "tls0")
    try:
        src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % free_port())
        raise AssertionError("migrate with TLS accepted zero-copy-send")
    except QMPError as e:
        check("zero-copy-send" in str(e) and "TLS" in str(e), "unclear error: %s" % e)
    check(src.status() == "running", "source not running")


def case_psk(procs, build):
    p = tlscerts.psk(CERTS)
    src = source(procs, build, psk_opt("tls0", "client", p.client), fill=marker_fill(procs))
    dst = destination(procs, build, psk_opt("tls0", "server", p.server))
    set_tls(src, "tls0")
    set_tls(dst, "tls0")
    uri = listen(dst)
    relay = Sniffer(port_of(uri))
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port)
    completed_and_equal(src, dst)
    relay.check_encrypted(1)
    relay.close()


def case_authz_right_dn(procs, build):
    """authz-simple with the client's DN, by object-add: let in."""
    g = tlscerts.x509_good(CERTS)
    src, dst = x509_pair(procs, build, g.client)
    dst.qmp.cmd("object-add", **{"qom-type": "authz-simple", "id": "authz0",
                                 "identity": g.client_dn})
    set_tls(dst, "tls0", authz="authz0")
    check(dst.qmp.cmd("query-migrate-parameters").get("tls-authz") == "authz0",
          "tls-authz not kept")
    src.qmp.cmd("migrate", uri=listen(dst))
    completed_and_equal(src, dst)


def case_cli(procs, build):
    """`vmig migrate --tls-creds --tls-hostname --tls-authz` drives both sides."""
    g = tlscerts.x509_good(CERTS)
    src = source(procs, build, x509_opt("tls0", "client", g.client))
    dst = destination(procs, build, x509_opt("tls0", "server", g.server, True),
                      authz_opt("authz0", g.client_dn))
    cli = os.path.join(build, "tools", "vmig", "vmig")
    argv = [cli, "migrate", "unix:" + src.qmp_path, "tcp:127.0.0.1:%d" % free_port(),
            "--dest", "unix:" + dst.qmp_path, "--no-progress",
            "--tls-creds", "tls0", "--tls-hostname", "localhost", "--tls-authz", "authz0"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, "vmig migrate exited %d: %s %s" % (r.returncode, r.stdout[-500:],
                                                               r.stderr[-500:]))
    sp, dp = (vm.qmp.cmd("query-migrate-parameters") for vm in (src, dst))
    check(sp.get("tls-creds") == "tls0" and sp.get("tls-hostname") == "localhost",
          "source parameters %r" % sp)
    check(dp.get("tls-creds") == "tls0" and dp.get("tls-authz") == "authz0",
          "destination parameters %r" % dp)
    completed_and_equal(src, dst)


# ---- post-copy -----------------------------------------------------------------

def postcopy_tls_start(procs, build):
    """A post-copy migration over TLS through a sniffer, switched at once
    during a slow pre-copy, with the destination running its own writer and
    a slow background push, so that post-copy lasts several seconds."""
    g = tlscerts.x509_good(CERTS)
    src = source(procs, build, x509_opt("tls0", "client", g.client), fill=marker_fill(procs),
                 caps=("postcopy-ram",))
    dst = destination(procs, build, x509_opt("tls0", "server", g.server, True),
                      caps=("postcopy-ram",), extra=("--workload", "random",
                                                     "--dirty-rate", "16M"))
    set_tls(src, "tls0", "localhost")
    set_tls(dst, "tls0")
    # A slow pre-copy too: unlimited, its first pass may converge before the
    # switch asked for just after it (at 16 MiB/s it takes 4 s; the push
    # follows max-postcopy-bandwidth instead).
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20,
                                             "max-postcopy-bandwidth": 8 << 20})
    uri = listen(dst)
    relay = Sniffer(port_of(uri))
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port)
    src.qmp.cmd("migrate-start-postcopy")
    src.wait_migration(60, ("postcopy-active",))
    dst.wait_migration(60, ("postcopy-active",))
    time.sleep(0.5)
    relay.check_encrypted(2)  # the main and the urgent connection
    relay.cut()
    dst.wait_migration(30, ("postcopy-paused",))
    src.wait_migration(30, ("postcopy-paused",))
    relay.close()
    return src, dst


def resume_and_verify(src, dst, uri):
    """A TLS resume through a sniffer; then both complete and the running
    destination's guest verifies its pages."""
    relay = Sniffer(port_of(uri))
    src.qmp.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port, resume=True)
    wait_completed(src, dst, 60, 60)
    check(dst.status() == "running", "destination %s" % dst.status())
    dst.check_guest_verifies(1000)
    relay.check_encrypted(1)
    relay.close()


def case_postcopy_cut_recover(procs, build):
    src, dst = postcopy_tls_start(procs, build)
    uri = "tcp:127.0.0.1:%d" % free_port()
    dst.qmp.cmd("migrate-recover", uri=uri)
    resume_and_verify(src, dst, uri)


def case_postcopy_resume_needs_auth(procs, build):
    """After the cut, a resume in clear is refused by the destination and
    both sides stay paused; then a TLS resume completes."""
    src, dst = postcopy_tls_start(procs, build)
    uri = "tcp:127.0.0.1:%d" % free_port()
    dst.qmp.cmd("migrate-recover", uri=uri)
    set_tls(src, "")
    try:
        src.qmp.cmd("migrate", uri=uri, resume=True)
    except QMPError:
        pass  # refused at once is fine too: what matters is who got in
    info = src.wait_migration(30, ("postcopy-paused", "failed", "completed"))
    check(info["status"] == "postcopy-paused", "source after a refused resume: %r" % info)
    d = wait_rejected(dst, 1)
    check(d["status"] not in ("failed", "completed", "postcopy-active"),
          "destination after a resume in clear: %r" % d)
    check(says(d.get("x-vmig-last-rejection"), ("TLS", "handshake")),
          "destination's reason %r does not say TLS was expected" %
          d.get("x-vmig-last-rejection"))
    check(dst.guest()["inconsistencies"] == 0, "destination guest: %r" % dst.guest())
    set_tls(src, "tls0", "localhost")
    resume_and_verify(src, dst, uri)


# ---- rejections --------------------------------------------------------------------
# In each: the bad attempt, what the source says, what the destination
# says, then a good peer.

def case_no_client_cert(procs, build):
    """verify-peer=on and a client without a cert."""
    src, dst = x509_pair(procs, build, tlscerts.x509_no_client_cert(CERTS).client)
    digest = dst.memory_digest(MEM)
    uri = listen(dst)
    src.qmp.cmd("migrate", uri=uri)
    source_failed(src, ("certificate",))
    destination_waits(dst, 1, digest, ("certificate",))
    good_source_gets_in(src, dst, uri, tlscerts.x509_good(CERTS).client)


def case_wrong_ca(procs, build):
    """The source's CA did not sign the destination's cert."""
    src, dst = x509_pair(procs, build, tlscerts.x509_wrong_ca(CERTS).client)
    digest = dst.memory_digest(MEM)
    uri = listen(dst)
    src.qmp.cmd("migrate", uri=uri)
    source_failed(src, ("certificate",), ("issuer", "signer", "trust", "authority",
                                          "unknown ca"))
    destination_waits(dst, 1, digest, ("TLS", "handshake", "certificate"))
    good_source_gets_in(src, dst, uri, tlscerts.x509_good(CERTS).client)


def expire_soon(make):
    """Makes a set whose cert expires in a few seconds; returns it and the
    moment (monotonic) from which it has surely expired."""
    life_s = 4
    t0 = time.monotonic()
    dirs = make(CERTS, life_s)
    return dirs, t0 + life_s + 1.5


def case_expired_at_object_add(procs, build):
    """Certs that have expired are refused when the credentials are made,
    as QEMU's object-add refuses them (and as vmig.h promises: files are
    checked then), on either side, saying so."""
    src = source(procs, build)
    dst = destination(procs, build)
    for vm, endpoint, dirs in ((dst, "server", tlscerts.x509_expired_server(CERTS).server),
                               (src, "client", tlscerts.x509_expired_client(CERTS).client)):
        try:
            add_x509(vm, "old", endpoint, dirs)
            raise AssertionError("object-add took an expired %s cert" % endpoint)
        except QMPError as e:
            check(says(str(e), ("expired",)), "unclear object-add error: %s" % e)


def case_expired_server_cert(procs, build):
    """A server cert that expires after it was loaded is refused by the
    source in the handshake. The destination's own credentials are the bad
    ones here, so the source, unharmed, then migrates to a good one."""
    g = tlscerts.x509_good(CERTS)
    src = source(procs, build)
    add_x509(src, "tls0", "client", g.client)
    set_tls(src, "tls0", "localhost")
    dst = destination(procs, build)
    dirs, expired_at = expire_soon(tlscerts.x509_expired_server)
    add_x509(dst, "tls0", "server", dirs.server, True)
    set_tls(dst, "tls0")
    digest = dst.memory_digest(MEM)
    uri = listen(dst)
    time.sleep(max(0.0, expired_at - time.monotonic()))
    src.qmp.cmd("migrate", uri=uri)
    source_failed(src, ("expired",))
    destination_waits(dst, 1, digest, ("TLS", "handshake", "certificate"))
    dst2 = destination(procs, build, x509_opt("tls0", "server", g.server, True), name="dst2")
    set_tls(dst2, "tls0")
    src.qmp.cmd("migrate", uri=listen(dst2))
    completed_and_equal(src, dst2)


def case_expired_client_cert(procs, build):
    """A client cert that expires after it was loaded is refused by the
    destination, which then lets in a good source."""
    src, dst = x509_pair(procs, build, None)
    dirs, expired_at = expire_soon(tlscerts.x509_expired_client)
    add_x509(src, "tls0", "client", dirs.client)
    set_tls(src, "tls0", "localhost")
    digest = dst.memory_digest(MEM)
    uri = listen(dst)
    time.sleep(max(0.0, expired_at - time.monotonic()))
    src.qmp.cmd("migrate", uri=uri)
    source_failed(src, ("certificate", "expired"))
    destination_waits(dst, 1, digest, ("expired",))
    good_source_gets_in(src, dst, uri, tlscerts.x509_good(CERTS).client)


def case_hostname_mismatch(procs, build):
    """tls-hostname names a host the destination's cert is not for."""
    src, dst = x509_pair(procs, build, tlscerts.x509_good(CERTS).client)
    set_tls(src, "tls0", tlscerts.OTHER_HOSTNAME)
    digest = dst.memory_digest(MEM)
    uri = listen(dst)
    src.qmp.cmd("migrate", uri=uri)
    source_failed(src, ("hostname", "host name", "name"), (tlscerts.OTHER_HOSTNAME,))
    destination_waits(dst, 1, digest, ("TLS", "handshake", "certificate"))
    good_source_gets_in(src, dst, uri, hostname="localhost")


def case_cert_for_other_host(procs, build):
    """The destination's cert is for another host only: refused when the
    name checked is the URI's host (127.0.0.1) and when it is localhost;
    let in once tls-hostname names the cert's host."""
    other = tlscerts.x509_other_hostname(CERTS)
    src, dst = x509_pair(procs, build, other.client, server_dir=other.server)
    set_tls(src, "tls0", "")
    digest = dst.memory_digest(MEM)
    uri = listen(dst)
    for n, name in enumerate(("127.0.0.1", "localhost")):
        if name != "127.0.0.1":
            set_tls(src, "tls0", name)
        src.qmp.cmd("migrate", uri=uri)
        source_failed(src, ("hostname", "host name", "name"), (name,))
        destination_waits(dst, n + 1, digest, ("TLS", "handshake", "certificate"))
    good_source_gets_in(src, dst, uri, hostname=tlscerts.OTHER_HOSTNAME)


def case_psk_mismatch(procs, build):
    good, bad = tlscerts.psk(CERTS), tlscerts.psk_mismatch(CERTS)
    src = source(procs, build, psk_opt("bad", "client", bad.client))
    dst = destination(procs, build, psk_opt("tls0", "server", good.server))
    set_tls(src, "bad")
    set_tls(dst, "tls0")
    digest = dst.memory_digest(MEM)
    uri = listen(dst)
    src.qmp.cmd("migrate", uri=uri)
    source_failed(src, ("PSK", "key"))
    destination_waits(dst, 1, digest, ("PSK", "key"))
    add_psk(src, "good", "client", good.client)
    set_tls(src, "good")
    src.qmp.cmd("migrate", uri=uri)
    completed_and_equal(src, dst)


def case_psk_authz_username(procs, build):
    """PSK with authz-simple: the identity is the username. alice has a
    valid key but is not allowed; bob is."""
    users = (("alice", "a"), ("bob", "b"))
    alice = tlscerts.psk(CERTS, "psk-alice", users, client_user="alice")
    bob = tlscerts.psk(CERTS, "psk-bob", users, client_user="bob")
    src = source(procs, build, psk_opt("alice", "client", alice.client, "alice"))
    dst = destination(procs, build, psk_opt("tls0", "server", alice.server),
                      authz_opt("authz0", "bob"))
    set_tls(src, "alice")
    set_tls(dst, "tls0", authz="authz0")
    digest = dst.memory_digest(MEM)
    uri = listen(dst)
    src.qmp.cmd("migrate", uri=uri)
    source_failed(src, ("not allowed", "authz", "denied", "authoriz", "access"))
    destination_waits(dst, 1, digest, ("not allowed", "authz", "denied", "authoriz"),
                      ("alice",))
    add_psk(src, "bob", "client", bob.client, "bob")
    set_tls(src, "bob")
    src.qmp.cmd("migrate", uri=uri)
    completed_and_equal(src, dst)


def case_tls_source_plain_dest(procs, build):
    """A TLS source against a destination without TLS: refused; then the
    same source in clear gets in (through a sniffer, which must see the
    plaintext: the check that the sniffer works)."""
    g = tlscerts.x509_good(CERTS)
    src = source(procs, build, x509_opt("tls0", "client", g.client), fill=marker_fill(procs))
    set_tls(src, "tls0", "localhost")
    dst = destination(procs, build)
    digest = dst.memory_digest(MEM)
    uri = listen(dst)
    src.qmp.cmd("migrate", uri=uri)
    source_failed(src, ("TLS",))
    destination_waits(dst, 1, digest, ("TLS", "magic", "preamble", "not a vmig"))
    set_tls(src, "", "")
    relay = Sniffer(port_of(uri))
    src.qmp.cmd("migrate", uri="tcp:127.0.0.1:%d" % relay.port)
    completed_and_equal(src, dst)
    relay.check_plain()
    relay.close()


def case_plain_source_tls_dest(procs, build):
    """A source in clear against a TLS destination: refused before a byte
    of it reaches guest memory; then the same source with TLS gets in."""
    src, dst = x509_pair(procs, build, None)
    digest = dst.memory_digest(MEM)
    uri = listen(dst)
    src.qmp.cmd("migrate", uri=uri)
    source_failed(src, ("TLS",))
    destination_waits(dst, 1, digest, ("TLS", "handshake"))
    good_source_gets_in(src, dst, uri, tlscerts.x509_good(CERTS).client)


def case_authz_wrong_dn(procs, build):
    """authz-simple allows only the second client's DN (given on the command
    line, commas doubled): the first client, valid otherwise, is refused;
    the second gets in."""
    second = tlscerts.x509_second_client(CERTS)
    g = tlscerts.x509_good(CERTS)
    src, dst = x509_pair(procs, build, g.client,
                         dst_objects=(authz_opt("authz0", second.client_dn),))
    set_tls(dst, "tls0", authz="authz0")
    digest = dst.memory_digest(MEM)
    uri = listen(dst)
    src.qmp.cmd("migrate", uri=uri)
    source_failed(src, ("not allowed", "authz", "denied", "authoriz", "access"))
    destination_waits(dst, 1, digest, ("not allowed", "authz", "denied", "authoriz"),
                      (g.client_dn,))
    good_source_gets_in(src, dst, uri, second.client)


def case_misconfigured(procs, build):
    """tls-creds naming no object, or server creds on a source: the
    migration does not start, or fails, saying why; the source runs on."""
    g = tlscerts.x509_good(CERTS)
    src = source(procs, build, x509_opt("srv", "server", g.server))
    dst = destination(procs, build, x509_opt("tls0", "server", g.server))
    set_tls(dst, "tls0")
    uri = listen(dst)
    for creds, words in (("nosuch", (("nosuch",),)), ("srv", (("endpoint", "server"),))):
        set_tls(src, creds, "localhost")
        try:
            src.qmp.cmd("migrate", uri=uri)
            info = src.wait_migration(30)
            check(info["status"] == "failed", "migrate with tls-creds %r: %r" % (creds, info))
            desc = info.get("error-desc", "")
        except QMPError as e:
            desc = str(e)
        check(says(desc, *words), "tls-creds %r: unclear error %r" % (creds, desc))
        source_intact(src)
    d = dst.migrate_status()
    check(d.get("status") not in ("failed", "completed"), "destination %r" % d)


def main():
    global CERTS
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    r = Runner(sys.argv[1])
    CERTS = tempfile.mkdtemp(prefix="vmig-tls-certs-")
    try:
        r.run("tls-certs-self-check", case_self_check, r.build)
        r.run("tls-x509-precopy", case_x509_precopy, r.build)
        r.run("tls-x509-multifd-4", case_x509_multifd, r.build)
        r.run("tls-zero-copy-send-refused", case_zero_copy_refused, r.build)
        r.run("tls-psk-precopy", case_psk, r.build)
        r.run("tls-authz-right-dn", case_authz_right_dn, r.build)
        r.run("tls-postcopy-cut-recover", case_postcopy_cut_recover, r.build)
        r.run("tls-postcopy-resume-needs-auth", case_postcopy_resume_needs_auth, r.build)
        r.run("tls-cli", case_cli, r.build)
        r.run("tls-reject-no-client-cert", case_no_client_cert, r.build)
        r.run("tls-reject-wrong-ca", case_wrong_ca, r.build)
        r.run("tls-expired-cert-refused-at-object-add", case_expired_at_object_add, r.build)
        r.run("tls-reject-expired-server-cert", case_expired_server_cert, r.build)
        r.run("tls-reject-expired-client-cert", case_expired_client_cert, r.build)
        r.run("tls-reject-hostname-mismatch", case_hostname_mismatch, r.build)
        r.run("tls-reject-cert-for-other-host", case_cert_for_other_host, r.build)
        r.run("tls-reject-psk-mismatch", case_psk_mismatch, r.build)
        r.run("tls-reject-psk-username-not-allowed", case_psk_authz_username, r.build)
        r.run("tls-reject-tls-source-plain-dest", case_tls_source_plain_dest, r.build)
        r.run("tls-reject-plain-source-tls-dest", case_plain_source_tls_dest, r.build)
        r.run("tls-reject-authz-wrong-dn", case_authz_wrong_dn, r.build)
        r.run("tls-misconfigured-creds", case_misconfigured, r.build)
    finally:
        shutil.rmtree(CERTS, ignore_errors=True)
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
