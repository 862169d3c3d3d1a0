# SPDX-License-Identifier: MIT
"""TLS credential sets for the tests and benchmarks, made with the openssl CLI.

Every set is laid out as QEMU's tls-creds objects read them, so the same
directory works for vmig-vm and for QEMU:
- x509 server side: ca-cert.pem, server-cert.pem, server-key.pem;
- x509 client side: ca-cert.pem, client-cert.pem, client-key.pem (the
  client cert and key are left out by x509_no_client_cert);
- psk: keys.psk, lines "username:hexkey".

Each public function takes a base directory and returns a TLSDirs with the
server-side and client-side directories (plus the client's distinguished
name, for authz-simple). Sets are made once per base directory and reused:
one CA (CA_DN) signs every set except x509_wrong_ca's, which has a CA of its
own. Keys are EC P-256, so every set together takes about a second.

Distinguished names are given as gnutls_x509_crt_get_dn() prints them,
which is what QEMU's authz-simple compares a client's identity with: the
RDNs in the order the certificate encodes them, comma-separated. Subjects
here are encoded CN first, so CLIENT_DN is "CN=vmig-client,O=vmig". (The
strict RFC 4514 form, gnutls_x509_crt_get_dn3() or `openssl -nameopt
RFC2253`, lists the RDNs the other way round: "O=vmig,CN=vmig-client".)

What this is not: a certificate authority for anything outside tests. The
keys are unencrypted and the CA key lies next to the sets it signed.

`python3 tlscerts.py [DIR]` makes every set and checks them with
`openssl verify` (what self_check() does).
"""
import collections
import datetime
import os
import random
import subprocess
import sys
import tempfile

SERVER_NAME = "localhost"        # server cert: CN and DNS SAN; also IP SAN 127.0.0.1
SERVER_IP = "127.0.0.1"
OTHER_HOSTNAME = "otherhost.example"  # x509_other_hostname's only name
CA_DN = "CN=vmig test CA,O=vmig"
WRONG_CA_DN = "CN=vmig wrong CA,O=elsewhere"
CLIENT_DN = "CN=vmig-client,O=vmig"
CLIENT2_DN = "CN=vmig-other-client,O=vmig"
PSK_USERNAME = "qemu"  # QEMU's default PSK username

TLSDirs = collections.namedtuple("TLSDirs", "server client client_dn")

_REQ_CONFIG = """[req]
distinguished_name = dn
prompt = no
[dn]
"""

# Key usages as QEMU's tls-creds-x509 checks them at object-add (it wants
# digitalSignature and keyEncipherment on leaf certificates, keyCertSign on
# the CA, and the matching extended key usage).
_EXT_CA = """[v3]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""
_EXT_SERVER = """[v3]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {san}
"""
_EXT_CLIENT = """[v3]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

# `openssl x509 -req` of OpenSSL 3.0 has no start date option, so certs with
# dates of their own are issued with `openssl ca` and this throwaway config.
_CA_CONFIG = """[ca]
default_ca = ca_default
[ca_default]
database = {dir}/index.txt
serial = {dir}/serial
new_certs_dir = {dir}
default_md = sha256
policy = policy_any
unique_subject = no
email_in_dn = no
[policy_any]
commonName = supplied
organizationName = optional
"""


class CertError(Exception):
    pass


def _openssl(*args, cwd=None):
    r = subprocess.run(["openssl"] + list(args), capture_output=True, text=True, timeout=60,
                       cwd=cwd)
    if r.returncode != 0:
        raise CertError("openssl %s failed: %s" % (args[0], (r.stderr or r.stdout).strip()[-600:]))
    return r.stdout


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _subj(dn):
    """A DN as gnutls_x509_crt_get_dn() prints it to openssl's -subj: both
    list the RDNs in encoding order."""
    return "/" + "/".join(dn.split(","))


def _key(path):
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", path)


def _utc(offset_s):
    t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset_s)
    return t.strftime("%Y%m%d%H%M%SZ")


class _CA:
    """A CA under dir: ca-cert.pem, ca-key.pem; made if missing."""

    def __init__(self, dir, dn):
        self.dir = dir
        self.dn = dn
        self.cert = os.path.join(dir, "ca-cert.pem")
        self.key = os.path.join(dir, "ca-key.pem")
        if os.path.exists(self.cert):
            return
        os.makedirs(dir, exist_ok=True)
        _key(self.key)
        cfg = os.path.join(dir, "ca.cnf")
        _write(cfg, _REQ_CONFIG + _EXT_CA)
        _openssl("req", "-x509", "-new", "-config", cfg, "-extensions", "v3",
                 "-key", self.key, "-subj", _subj(dn), "-days", "3650", "-sha256",
                 "-out", self.cert)

    def issue(self, cert, key, dn, ext, not_before_s=None, not_after_s=None):
        """Signs a new key for dn. With not_before_s/not_after_s (seconds
        from now, may be negative), the cert is valid exactly then;
        otherwise for a year from now."""
        _key(key)
        with tempfile.TemporaryDirectory(prefix="vmig-certs-") as tmp:
            req_cfg, ext_file, csr = (os.path.join(tmp, n) for n in ("req.cnf", "ext.cnf",
                                                                     "req.csr"))
            _write(req_cfg, _REQ_CONFIG)
            _write(ext_file, ext)
            _openssl("req", "-new", "-config", req_cfg, "-key", key, "-subj", _subj(dn),
                     "-out", csr)
            if not_before_s is None:
                _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
                         "-set_serial", str(random.getrandbits(63)), "-days", "365",
                         "-sha256", "-extfile", ext_file, "-extensions", "v3", "-out", cert)
                return
            ca_cfg = os.path.join(tmp, "ca.cnf")
            _write(ca_cfg, _CA_CONFIG.format(dir=tmp))
            _write(os.path.join(tmp, "index.txt"), "")
            _write(os.path.join(tmp, "serial"), "%016X\n" % random.getrandbits(63))
            _openssl("ca", "-batch", "-notext", "-config", ca_cfg, "-cert", self.cert,
                     "-keyfile", self.key, "-in", csr, "-out", cert,
                     "-startdate", _utc(not_before_s), "-enddate", _utc(not_after_s),
                     "-extfile", ext_file, "-extensions", "v3")

    def copy_to(self, dir):
        os.makedirs(dir, exist_ok=True)
        with open(self.cert) as f:
            _write(os.path.join(dir, "ca-cert.pem"), f.read())


def _ca(base):
    return _CA(os.path.join(base, "ca"), CA_DN)


def _server_san(names):
    return ", ".join(("IP:" if n.replace(".", "").isdigit() else "DNS:") + n for n in names)


def _server_dir(base, name, ca, cn=SERVER_NAME, names=(SERVER_NAME, SERVER_IP), **dates):
    d = os.path.join(base, name)
    if not os.path.exists(os.path.join(d, "server-cert.pem")) or dates:
        ca.copy_to(d)
        ca.issue(os.path.join(d, "server-cert.pem"), os.path.join(d, "server-key.pem"),
                 "CN=%s,O=vmig" % cn, _EXT_SERVER.format(san=_server_san(names)), **dates)
    return d


def _client_dir(base, name, ca, dn, with_cert=True, **dates):
    d = os.path.join(base, name)
    if not os.path.exists(os.path.join(d, "ca-cert.pem")) or dates:
        ca.copy_to(d)
        if with_cert:
            ca.issue(os.path.join(d, "client-cert.pem"), os.path.join(d, "client-key.pem"),
                     dn, _EXT_CLIENT, **dates)
    return d


def x509_good(base):
    """The good set: server cert for localhost and 127.0.0.1, client cert
    with CLIENT_DN, one CA."""
    ca = _ca(base)
    return TLSDirs(_server_dir(base, "x509-server", ca),
                   _client_dir(base, "x509-client", ca, CLIENT_DN), CLIENT_DN)


def x509_second_client(base):
    """A second client of the same CA, with CLIENT2_DN (server: the good one)."""
    ca = _ca(base)
    return TLSDirs(_server_dir(base, "x509-server", ca),
                   _client_dir(base, "x509-client2", ca, CLIENT2_DN), CLIENT2_DN)


def x509_no_client_cert(base):
    """A client with the right CA but no certificate of its own."""
    ca = _ca(base)
    return TLSDirs(_server_dir(base, "x509-server", ca),
                   _client_dir(base, "x509-client-nocert", ca, None, with_cert=False), None)


def x509_wrong_ca(base):
    """A complete, valid set whose CA is another one: neither side trusts,
    nor is trusted by, a peer of the good set."""
    ca = _CA(os.path.join(base, "wrong-ca"), WRONG_CA_DN)
    return TLSDirs(_server_dir(base, "x509-wrongca-server", ca),
                   _client_dir(base, "x509-wrongca-client", ca, CLIENT_DN), CLIENT_DN)


def x509_expired_server(base, expires_in_s=None):
    """The good client and a server cert of the good CA that has expired:
    valid from 2 days ago to 1 day ago, or, with expires_in_s, until that
    many seconds from now (a cert that loads, then expires before use).
    Made afresh at every call."""
    ca = _ca(base)
    end = -86400 if expires_in_s is None else expires_in_s
    name = "x509-server-expired" if expires_in_s is None else "x509-server-short-lived"
    return TLSDirs(_server_dir(base, name, ca, not_before_s=-2 * 86400,
                               not_after_s=end),
                   _client_dir(base, "x509-client", ca, CLIENT_DN), CLIENT_DN)


def x509_expired_client(base, expires_in_s=None):
    """The good server and a client cert (CLIENT_DN) that has expired, as
    x509_expired_server. Made afresh at every call."""
    ca = _ca(base)
    end = -86400 if expires_in_s is None else expires_in_s
    name = "x509-client-expired" if expires_in_s is None else "x509-client-short-lived"
    return TLSDirs(_server_dir(base, "x509-server", ca),
                   _client_dir(base, name, ca, CLIENT_DN,
                               not_before_s=-2 * 86400, not_after_s=end), CLIENT_DN)


def x509_other_hostname(base):
    """A server cert of the good CA for OTHER_HOSTNAME only (no localhost,
    no IP), and the good client."""
    ca = _ca(base)
    return TLSDirs(_server_dir(base, "x509-server-otherhost", ca, cn=OTHER_HOSTNAME,
                               names=(OTHER_HOSTNAME,)),
                   _client_dir(base, "x509-client", ca, CLIENT_DN), CLIENT_DN)


def psk_key(seed):
    """A 32-byte key as 64 hex digits, the same for the same seed."""
    return "%064x" % random.Random(seed).getrandbits(256)


def psk(base, name="psk", users=((PSK_USERNAME, "good"),), client_user=PSK_USERNAME,
        client_key_seed=None):
    """PSK dirs: the server's keys.psk has one line per (username, key seed)
    of users; the client's has the one line for client_user, with the key
    of client_key_seed (default: the server's key for client_user)."""
    seeds = dict(users)
    if client_key_seed is None:
        client_key_seed = seeds[client_user]
    server, client = os.path.join(base, name + "-server"), os.path.join(base, name + "-client")
    for d in (server, client):
        os.makedirs(d, exist_ok=True)
    _write(os.path.join(server, "keys.psk"),
           "".join("%s:%s\n" % (u, psk_key(s)) for u, s in users))
    _write(os.path.join(client, "keys.psk"), "%s:%s\n" % (client_user, psk_key(client_key_seed)))
    return TLSDirs(server, client, client_user)


def psk_mismatch(base):
    """The client's key for "qemu" is not the server's."""
    return psk(base, name="psk-mismatch", client_key_seed="other")


def subject_dn(cert):
    """The subject as gnutls_x509_crt_get_dn() prints it: RFC 2253 escaping
    and separators, RDNs in encoding order (not reversed)."""
    out = _openssl("x509", "-in", cert, "-noout", "-subject", "-nameopt", "RFC2253,-dn_rev")
    return out.strip().split("=", 1)[1]


def _verify(ca, *args):
    r = subprocess.run(["openssl", "verify", "-CAfile", ca] + list(args),
                       capture_output=True, text=True, timeout=60)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def self_check(base):
    """Makes every set under base and checks it with openssl; raises
    CertError on the first thing wrong."""
    def want(ok_wanted, what, ca, *args):
        ok, out = _verify(ca, *args)
        if ok != ok_wanted:
            raise CertError("%s: openssl verify %s: %s" % (what, "failed" if ok_wanted else
                                                           "passed", out))
        return out

    g = x509_good(base)
    ca = os.path.join(g.server, "ca-cert.pem")
    srv, cli = os.path.join(g.server, "server-cert.pem"), os.path.join(g.client, "client-cert.pem")
    want(True, "good chain", ca, "-purpose", "sslserver", "-verify_hostname", SERVER_NAME, srv)
    want(True, "good chain", ca, "-purpose", "sslserver", "-verify_ip", SERVER_IP, srv)
    want(True, "good client", ca, "-purpose", "sslclient", cli)
    if subject_dn(cli) != CLIENT_DN:
        raise CertError("client DN %r, wanted %r" % (subject_dn(cli), CLIENT_DN))
    c2 = x509_second_client(base)
    c2cert = os.path.join(c2.client, "client-cert.pem")
    want(True, "second client", ca, "-purpose", "sslclient", c2cert)
    if subject_dn(c2cert) != CLIENT2_DN:
        raise CertError("second client DN %r, wanted %r" % (subject_dn(c2cert), CLIENT2_DN))
    if os.path.exists(os.path.join(x509_no_client_cert(base).client, "client-cert.pem")):
        raise CertError("no-client-cert set has a client cert")
    w = x509_wrong_ca(base)
    want(False, "wrong CA server against the good CA", ca,
         os.path.join(w.server, "server-cert.pem"))
    want(True, "wrong CA set against its own CA", os.path.join(w.server, "ca-cert.pem"),
         os.path.join(w.server, "server-cert.pem"), os.path.join(w.client, "client-cert.pem"))
    out = want(False, "expired server", ca,
               os.path.join(x509_expired_server(base).server, "server-cert.pem"))
    if "expired" not in out:
        raise CertError("expired server cert rejected for another reason: %s" % out)
    out = want(False, "expired client", ca,
               os.path.join(x509_expired_client(base).client, "client-cert.pem"))
    if "expired" not in out:
        raise CertError("expired client cert rejected for another reason: %s" % out)
    want(True, "short-lived server, still valid", ca,
         os.path.join(x509_expired_server(base, 600).server, "server-cert.pem"))
    o = os.path.join(x509_other_hostname(base).server, "server-cert.pem")
    want(True, "other hostname, its own name", ca, "-verify_hostname", OTHER_HOSTNAME, o)
    want(False, "other hostname, as localhost", ca, "-verify_hostname", SERVER_NAME, o)
    want(False, "other hostname, as 127.0.0.1", ca, "-verify_ip", SERVER_IP, o)
    for sets in (psk(base), psk_mismatch(base)):
        for d in (sets.server, sets.client):
            with open(os.path.join(d, "keys.psk")) as f:
                for line in f:
                    user, key = line.strip().split(":")
                    if not user or len(key) != 64 or int(key, 16) < 0:
                        raise CertError("bad keys.psk line in %s: %r" % (d, line))
    p, m = psk(base), psk_mismatch(base)
    with open(os.path.join(p.client, "keys.psk")) as a, \
            open(os.path.join(m.client, "keys.psk")) as b:
        if a.read() == b.read():
            raise CertError("mismatching PSK equals the good one")


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="vmig-certs-")
    self_check(base)
    print("tlscerts: every set made and checked in %s" % base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
