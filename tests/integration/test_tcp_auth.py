#!/usr/bin/env python3
"""TCP is served only with a bearer token: without it UNAUTHENTICATED, with it everything works."""
import os
import subprocess

from harness import (KVTIERD, Daemon, check, eq, expect_fail, fixture, free_port, run, sha256)

TOKEN = "s3cret-token-for-tests-0123456789"


def test_tcp_token(root, daemons):
    tok = os.path.join(root, "token")
    with open(tok, "w") as f:
        f.write(TOKEN + "\n")
    os.chmod(tok, 0o600)
    port = free_port()
    addr = "127.0.0.1:%d" % port
    d = Daemon(root, extra=["--listen", addr, "--auth-token-file", tok])
    daemons.append(d)
    d.start()
    r = d.cli("info", address=addr, check_rc=False)
    expect_fail(r, "UNAUTHENTICATED", "token")
    bad = os.path.join(root, "bad")
    with open(bad, "w") as f:
        f.write("wrong-token-wrong-token-0000000\n")
    r = d.cli("info", address=addr, extra_global=["--token-file", bad], check_rc=False)
    expect_fail(r, "UNAUTHENTICATED")
    r = d.cli("put", "--namespace", "n", fixture("v2/chat-a-turn1.bin"), address=addr,
              check_rc=False)
    expect_fail(r, "UNAUTHENTICATED")
    eq(d.ls(), [], "unauthenticated put stored nothing")
    g = ["--token-file", tok]
    d.cli("info", address=addr, extra_global=g)
    blob = d.cli("put", "--namespace", "n", fixture("v2/chat-a-turn1.bin"), address=addr,
                 extra_global=g).out.strip()
    m = d.cli("lookup", "--namespace", "n", "--tokens-of", fixture("v2/chat-a-turn1.bin"),
              "--json", address=addr, extra_global=g).json()
    eq(m["blob"], blob, "lookup over TCP")
    out = os.path.join(root, "o.bin")
    d.cli("get", blob, "-o", out, address=addr, extra_global=g)
    eq(sha256(out), sha256(fixture("v2/chat-a-turn1.bin")), "get over TCP")
    # The Unix socket needs no token.
    d.cli("info")


def test_listen_requires_token(root, daemons):
    p = subprocess.run([KVTIERD, "--data", os.path.join(root, "d"), "--listen",
                        "127.0.0.1:%d" % free_port(), "--tier",
                        "tmpfs:%s:8M" % os.path.join(root, "t")],
                       capture_output=True, timeout=30)
    check(p.returncode != 0, "kvtierd --listen without a token must refuse to start")
    check(b"auth-token-file" in p.stderr, "message names the missing option: %r" % p.stderr)


if __name__ == "__main__":
    run([test_tcp_token, test_listen_requires_token])
