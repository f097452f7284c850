#!/usr/bin/env python3
"""TLS on kvtierd's --listen (--tls-cert/--tls-key), and on the client side (kvtier --tls-ca,
libkvtier's kvtier_open_tls, kvtier-llama --kvtier-tls-ca).

A throwaway CA and a server certificate for localhost/127.0.0.1 are made with the openssl CLI
in the test's temp dir, plus a second CA nobody trusts. Checks: put/get byte-exact over TLS
with the right CA; a plaintext client, a client of another CA and a client expecting another
name fail; a wrong token is still UNAUTHENTICATED over TLS; the client sends a TLS
ClientHello and never the token when it was asked for TLS; bad certificate/key files are
refused at start, before anything listens, with a message naming the fault; --listen without
TLS warns that the token travels in clear; kvtier-llama reaches a TLS kvtierd (remote mode,
restores over TLS) and refuses or reports a bad CA.
"""
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

from harness import (BIN, KVTIER, KVTIERD, Daemon, Skip, check, eq, expect_fail, fixture,
                     free_port, run, sha256)

TOKEN = "tls-test-token-0123456789abcdef"
PLUGIN = os.path.join(BIN, "plugin", "kvtier-llama")


def openssl(*args):
    p = subprocess.run(["openssl"] + list(args), capture_output=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    check(p.returncode == 0, "openssl %s: %s" % (" ".join(args), p.stderr.decode()))


def make_ca(d, name):
    """A self-signed CA (P-256) in d: returns (ca.pem, ca.key)."""
    os.makedirs(d, exist_ok=True)
    crt, key = os.path.join(d, "ca.pem"), os.path.join(d, "ca.key")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", crt, "-days", "2", "-subj", "/CN=%s" % name)
    return crt, key


def make_server_cert(d, ca, sans="DNS:localhost,IP:127.0.0.1"):
    """A server certificate signed by ca for sans: returns (cert.pem, key.pem)."""
    crt, key = os.path.join(d, "server.pem"), os.path.join(d, "server.key")
    csr, ext = os.path.join(d, "server.csr"), os.path.join(d, "ext.cnf")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", csr, "-subj", "/CN=kvtierd")
    with open(ext, "w") as f:
        f.write("subjectAltName=%s\nbasicConstraints=CA:FALSE\n"
                "extendedKeyUsage=serverAuth\n" % sans)
    openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-set_serial", "7",
            "-days", "2", "-out", crt, "-extfile", ext)
    os.chmod(key, 0o600)
    return crt, key


class Pki:
    def __init__(self, root):
        self.dir = os.path.join(root, "pki")
        self.ca = make_ca(os.path.join(self.dir, "ca"), "kvtier test CA")
        self.other_ca = make_ca(os.path.join(self.dir, "other"), "some other CA")
        self.cert, self.key = make_server_cert(os.path.join(self.dir, "ca"), self.ca)
        self.token = os.path.join(root, "token")
        with open(self.token, "w") as f:
            f.write(TOKEN + "\n")
        os.chmod(self.token, 0o600)


def tls_daemon(root, daemons, pki, port):
    d = Daemon(root, extra=["--listen", "127.0.0.1:%d" % port, "--auth-token-file", pki.token,
                            "--tls-cert", pki.cert, "--tls-key", pki.key])
    daemons.append(d)
    d.start()
    return d


def test_cli_over_tls(root, daemons):
    pki = Pki(root)
    port = free_port()
    d = tls_daemon(root, daemons, pki, port)
    log = d.read_log()
    check("event=tls_ready" in log and "tls=on" in log, "TLS logged at start:\n" + log)
    check("event=listen_plaintext" not in log, "no plaintext warning with TLS:\n" + log)
    addr = "127.0.0.1:%d" % port
    good = ["--token-file", pki.token, "--tls-ca", pki.ca[0]]

    # The right CA and token: everything works, bytes exact.
    src = fixture("v2/chat-a-turn1.bin")
    blob = d.cli("put", "--namespace", "n", src, address=addr, extra_global=good).out.strip()
    m = d.cli("lookup", "--namespace", "n", "--tokens-of", src, "--json", address=addr,
              extra_global=good).json()
    eq(m["blob"], blob, "lookup over TLS")
    out = os.path.join(root, "o.bin")
    d.cli("get", blob, "-o", out, address=addr, extra_global=good)
    eq(sha256(out), sha256(src), "get over TLS: the bytes put")
    # The certificate's other name, given explicitly. (Not "localhost:PORT" as the address:
    # resolving a name goes through c-ares, whose one-off allocation LeakSanitizer reports.)
    d.cli("info", address=addr, extra_global=good + ["--tls-server-name", "localhost"])

    # A client expecting another name: refused by the client before any call.
    r = d.cli("info", address=addr, extra_global=good + ["--tls-server-name", "other.example"],
              check_rc=False)
    expect_fail(r, "UNAVAILABLE", "other.example")
    # A plaintext client (with the right token) cannot talk to the TLS port.
    r = d.cli("put", "--namespace", "n", fixture("v2/chat-b-turn1.bin"), address=addr,
              extra_global=["--token-file", pki.token, "--timeout-ms", "5000"], check_rc=False)
    expect_fail(r, "UNAVAILABLE")
    # A client trusting another CA refuses kvtierd's certificate.
    r = d.cli("put", "--namespace", "n", fixture("v2/chat-b-turn1.bin"), address=addr,
              extra_global=["--token-file", pki.token, "--tls-ca", pki.other_ca[0]],
              check_rc=False)
    expect_fail(r, "UNAVAILABLE", pki.other_ca[0])
    # TLS does not replace the token: a wrong or missing one is still refused.
    bad = os.path.join(root, "bad")
    with open(bad, "w") as f:
        f.write("wrong-token-wrong-token-0000000\n")
    r = d.cli("put", "--namespace", "n", fixture("v2/chat-b-turn1.bin"), address=addr,
              extra_global=["--token-file", bad, "--tls-ca", pki.ca[0]], check_rc=False)
    expect_fail(r, "UNAUTHENTICATED", "bearer token")
    r = d.cli("info", address=addr, extra_global=["--tls-ca", pki.ca[0]], check_rc=False)
    expect_fail(r, "UNAUTHENTICATED")
    eq([b["blob"] for b in d.ls()], [blob], "only the authenticated TLS put was stored")
    # The Unix socket is unchanged: no token, no TLS.
    d.cli("info")

    # Usage errors and a bad CA file, before anything is sent.
    r = d.cli("info", address=addr, extra_global=["--tls-server-name", "localhost"],
              check_rc=False)
    eq(r.rc, 2, "--tls-server-name without --tls-ca is a usage error: %r" % r)
    check("--tls-ca" in r.err, "names --tls-ca: %r" % r)
    r = d.cli("info", extra_global=["--tls-ca", pki.ca[0]], check_rc=False)
    eq(r.rc, 2, "--tls-ca on the Unix socket is a usage error: %r" % r)
    check("Unix socket" in r.err, "says why: %r" % r)
    r = d.cli("info", address=addr, extra_global=["--tls-ca", os.path.join(root, "nope.pem")],
              check_rc=False)
    check(r.rc == 1 and "cannot read CA file" in r.err and "No such file" in r.err,
          "missing CA file: %r" % r)
    r = d.cli("info", address=addr, extra_global=["--tls-ca", pki.token], check_rc=False)
    check(r.rc == 1 and "no PEM certificate" in r.err, "CA file without a certificate: %r" % r)


def recorder():
    """A TCP listener on 127.0.0.1 that records every byte sent to it (never answers).
    Returns (port, list of received chunks, stop function)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    got, conns, stop = [], [], threading.Event()

    def loop():
        deadline = time.time() + 60
        while not stop.is_set() and time.time() < deadline:
            try:
                c, _ = srv.accept()
                c.settimeout(0.05)
                conns.append(c)
            except socket.timeout:
                pass
            for c in list(conns):
                try:
                    b = c.recv(65536)
                    if b:
                        got.append(b)
                    else:
                        conns.remove(c)
                        c.close()
                except socket.timeout:
                    pass
                except OSError:
                    conns.remove(c)
        for c in conns:
            c.close()
        srv.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()

    def finish():
        stop.set()
        t.join(10)
    return srv.getsockname()[1], got, finish


def test_token_never_in_clear(root, daemons):
    """Asked for TLS, the client opens with a TLS ClientHello and sends no token to a peer
    that does not complete the handshake; the same call without TLS starts HTTP/2 in clear
    (what the check tells apart)."""
    pki = Pki(root)
    results = {}
    for mode, extra in (("tls", ["--tls-ca", pki.ca[0]]), ("plain", [])):
        port, got, finish = recorder()
        p = subprocess.run([KVTIER, "--address", "127.0.0.1:%d" % port, "--token-file",
                            pki.token, "--timeout-ms", "1500"] + extra + ["info"],
                           capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        finish()
        check(p.returncode != 0, "%s: no daemon there, the call must fail: %r" % (mode, p))
        results[mode] = b"".join(got)
    tls, plain = results["tls"], results["plain"]
    check(plain.startswith(b"PRI * HTTP/2.0"), "plaintext client starts HTTP/2: %r" % plain[:32])
    check(len(tls) > 5 and tls[0] == 0x16 and tls[1] == 0x03,
          "TLS client starts with a TLS handshake record, got %r" % tls[:32])
    check(b"PRI * HTTP" not in tls, "no HTTP/2 in clear over the TLS connection")
    check(TOKEN.encode() not in tls and b"authorization" not in tls,
          "the token never left in clear")


def expect_refused(root, name, args, *phrases):
    """kvtierd with args refuses to start (exit 2) with a message holding phrases, before
    it creates its data directory or listens."""
    data = os.path.join(root, "data-" + name)
    sock = os.path.join(root, name + ".sock")
    port = free_port()
    a = [KVTIERD, "--data", data, "--socket", sock, "--tier",
         "tmpfs:%s:8M" % os.path.join(root, "tier-" + name)]
    if "--no-listen" in args:
        args = [x for x in args if x != "--no-listen"]
    else:
        a += ["--listen", "127.0.0.1:%d" % port]
    p = subprocess.run(a + args, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    err = p.stderr.decode(errors="replace")
    eq(p.returncode, 2, "%s: kvtierd must refuse to start (stderr %r)" % (name, err))
    for ph in phrases:
        check(ph in err, "%s: %r in the message: %r" % (name, ph, err))
    check(not os.path.exists(sock) and not os.path.exists(data),
          "%s: refused before the socket or data directory was made" % name)
    s = socket.socket()
    try:
        check(s.connect_ex(("127.0.0.1", port)) != 0, "%s: nothing listens on TCP" % name)
    finally:
        s.close()


def test_bad_tls_files_refused_at_start(root, daemons):
    pki = Pki(root)
    other = make_server_cert(os.path.join(pki.dir, "other"), pki.other_ca)
    tok = ["--auth-token-file", pki.token]
    missing = os.path.join(root, "missing.pem")
    garbage = os.path.join(root, "garbage.pem")
    with open(garbage, "wb") as f:
        f.write(os.urandom(700))
    broken = os.path.join(root, "broken.pem")
    with open(pki.cert) as f:
        lines = f.read().splitlines()
    with open(broken, "w") as f:  # the PEM armour is there, the DER inside is cut short
        f.write("\n".join(lines[:3] + lines[-1:]) + "\n")
    der = os.path.join(root, "server.der")
    openssl("x509", "-in", pki.cert, "-outform", "der", "-out", der)
    enc = os.path.join(root, "enc.key")
    openssl("pkey", "-in", pki.key, "-aes256", "-passout", "pass:secret", "-out", enc)

    cases = [
        ("cert-only", ["--tls-cert", pki.cert], "--tls-cert and --tls-key go together"),
        ("key-only", ["--tls-key", pki.key], "--tls-cert and --tls-key go together"),
        ("no-listen", ["--no-listen", "--tls-cert", pki.cert, "--tls-key", pki.key],
         "add --listen"),
        ("cert-missing", ["--tls-cert", missing, "--tls-key", pki.key],
         "cannot read certificate file", missing, "No such file"),
        ("cert-dir", ["--tls-cert", root, "--tls-key", pki.key],
         "cannot read certificate file", "Is a directory"),
        ("key-missing", ["--tls-cert", pki.cert, "--tls-key", missing],
         "cannot read private key file", missing),
        ("cert-garbage", ["--tls-cert", garbage, "--tls-key", pki.key], "no PEM certificate"),
        ("cert-der", ["--tls-cert", der, "--tls-key", pki.key], "no PEM certificate",
         "openssl x509 -inform der"),
        ("cert-broken", ["--tls-cert", broken, "--tls-key", pki.key], "does not parse"),
        ("swapped", ["--tls-cert", pki.key, "--tls-key", pki.cert], "no PEM certificate"),
        ("key-garbage", ["--tls-cert", pki.cert, "--tls-key", garbage], "no PEM private key"),
        ("key-encrypted", ["--tls-cert", pki.cert, "--tls-key", enc], "passphrase"),
        ("mismatch", ["--tls-cert", pki.cert, "--tls-key", other[1]],
         "does not belong to the certificate"),
    ]
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        locked = os.path.join(root, "locked.key")
        shutil.copy(pki.key, locked)
        os.chmod(locked, 0)
        cases.append(("key-unreadable", ["--tls-cert", pki.cert, "--tls-key", locked],
                      "cannot read private key file", "Permission denied"))
    for name, args, *phrases in cases:
        expect_refused(root, name, tok + args, *phrases)
    print("  %d bad TLS settings refused at start" % len(cases))


def test_plaintext_listen_warns(root, daemons):
    """--listen without TLS stays allowed (loopback, tunnels, trusted networks) and says
    loudly that the token travels in clear."""
    pki = Pki(root)
    d = Daemon(root, extra=["--listen", "127.0.0.1:%d" % free_port(), "--auth-token-file",
                            pki.token])
    daemons.append(d)
    d.start()
    log = d.read_log()
    check("level=warn event=listen_plaintext" in log and "in clear" in log and
          "--tls-cert" in log, "plaintext --listen warns at start:\n" + log)
    check("tls=off" in log, "ready line says tls=off:\n" + log)


def test_plugin_over_tls(root, procs):
    """kvtier-llama reaches a TLS kvtierd: remote mode, saves streamed out and restores
    streamed in over TLS. A bad CA file stops it at start; a CA that did not sign kvtierd's
    certificate leaves kvtierd unreachable (requests still served)."""
    if not os.access(PLUGIN, os.X_OK):
        raise Skip("%s is not built (cmake -DKVTIER_PLUGIN=ON)" % PLUGIN)
    import test_llama_plugin as lp
    pki = Pki(root)
    port = free_port()
    d = tls_daemon(root, procs, pki, port)
    slot_dir = os.path.join(root, "remote-slots")
    os.makedirs(slot_dir)
    dbl = lp.LlamaDouble(root, "double0", slot_dir, extra=["--cache-ram", "0"])
    procs.append(dbl)
    dbl.start()
    base = ["--server-cache-ram", "0", "--kvtier-token-file", pki.token]

    # A CA file that is not one: refused at start with the reason.
    p = subprocess.run(lp.Plugin(root, [dbl.url], "127.0.0.1:%d" % port, slot_dir,
                                 base + ["--kvtier-tls-ca", pki.token]).args,
                       capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    err = p.stderr.decode(errors="replace")
    check(p.returncode != 0 and "--kvtier-tls-ca" in err and "no PEM certificate" in err,
          "kvtier-llama with a bad CA file: rc=%d %r" % (p.returncode, err))

    # The CA of another: kvtierd is unreachable, the plugin says so and serves anyway.
    q = lp.Plugin(root, [dbl.url], "127.0.0.1:%d" % port, slot_dir,
                  base + ["--kvtier-tls-ca", pki.other_ca[0]], name="plugin-other-ca")
    procs.append(q)
    q.start()
    lp.wait_for("kvtier_unreachable logged", lambda: "event=kvtier_unreachable" in q.read_log())
    q.chat(lp.conversation(5) + [{"role": "user", "content": "hello"}])
    eq(d.ls(), [], "nothing reached kvtierd through an untrusted certificate")
    q.stop()

    p = lp.Plugin(root, [dbl.url], "127.0.0.1:%d" % port, slot_dir,
                  base + ["--kvtier-tls-ca", pki.ca[0], "--kvtier-tls-server-name", "localhost"])
    procs.append(p)
    p.start()
    log = p.read_log()
    check("kvtier_tls=on" in log and "mode=remote" in log, "TLS, remote mode:\n" + log)
    check("event=kvtier_plaintext" not in log, "no plaintext warning with TLS:\n" + log)
    lp.check_round_robin(p, dbl, rounds=2, n_conv=2)
    eq(p.restores("ok"), 2, "restores over TLS")
    eq(len(d.ls()), 2, "one blob per conversation in kvtierd")


if __name__ == "__main__":
    if not shutil.which("openssl"):
        print("SKIP: the openssl CLI is not installed (scripts/deps installs it)")
        sys.exit(77)
    tests = [test_cli_over_tls, test_token_never_in_clear, test_bad_tls_files_refused_at_start,
             test_plaintext_listen_warns, test_plugin_over_tls]
    only = sys.argv[1:]
    if only:
        tests = [t for t in tests if t.__name__ in only]
    run(tests)
