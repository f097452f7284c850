#!/usr/bin/env python3
"""Connection floods and silent clients never stop kvtierd (review D1), and calls to an
unknown method are answered UNIMPLEMENTED (review D14).

The floods run kvtierd under `prlimit --nofile=256:256`: the hard limit is as low as the
soft one, so raising the soft limit cannot help; only capping connections below the limit
and surviving EMFILE can. Before the fix, gRPC's listener stopped accepting for good.
"""
import os
import re
import resource
import socket
import subprocess
import sys
import time
import urllib.request

from harness import Daemon, Failure, Skip, check, eq, free_port, run

NOFILE = 256
FLOOD = 400                 # connections per listener, more than NOFILE
TOKEN = "flood-test-token-0123456789abcdef"


class LimitedDaemon(Daemon):
    """A kvtierd started under prlimit (which execs it: same PID)."""

    def args(self):
        return ["prlimit", "--nofile=%d:%d" % (NOFILE, NOFILE)] + super().args()


def raise_own_limit(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise Skip("this test process may open only %d files (needs %d)" % (hard, need))
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def open_flood(connect, n):
    """Opens up to n silent connections; returns them (connect errors end the flood)."""
    socks = []
    for _ in range(n):
        try:
            socks.append(connect())
        except OSError:
            break
    return socks


def unix_connect(path):
    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(path)
        return s
    return connect


def tcp_connect(port):
    def connect():
        return socket.create_connection(("127.0.0.1", port), timeout=2)
    return connect


def daemon_fds(d):
    return len(os.listdir("/proc/%d/fd" % d.pid()))


def info_ok_within(d, seconds, address=None, extra=()):
    """Polls `kvtier info` (bounded: one try per second) until it succeeds."""
    last = None
    for _ in range(seconds):
        last = d.cli("info", check_rc=False, address=address,
                     extra_global=["--timeout-ms", "2000"] + list(extra), timeout=30)
        if last.rc == 0:
            return last
        time.sleep(1)
    raise Failure("kvtier info still failing %ds after the flood closed: %r\n%s" %
                         (seconds, last, d.read_log()))


def clean_refusal(r):
    """A call during the flood either worked or failed fast with a status, never hung."""
    return r.rc == 0 or "UNAVAILABLE" in r.err or "RESOURCE_EXHAUSTED" in r.err


def outcome(r):
    """OK, or the status name the CLI printed ([UNAVAILABLE])."""
    m = re.search(r"\[([A-Z_]+)\]\s*$", r.err)
    return "OK" if r.rc == 0 else (m.group(1) if m else r.err.strip()[-60:])


def test_flood_unix_and_tcp(root, daemons):
    raise_own_limit(2 * FLOOD + 64)
    tok = os.path.join(root, "token")
    with open(tok, "w") as f:
        f.write(TOKEN + "\n")
    os.chmod(tok, 0o600)
    port = free_port()
    addr = "127.0.0.1:%d" % port
    d = LimitedDaemon(root, extra=["--workers", "2", "--listen", addr, "--auth-token-file", tok])
    daemons.append(d)
    d.start()
    g = ["--token-file", tok]
    fds_before = daemon_fds(d)

    flood = open_flood(tcp_connect(port), FLOOD)
    try:
        time.sleep(1)   # let the daemon take them all off its accept queue
        # TCP gets half the connections: a TCP flood leaves the Unix socket's share.
        r_local = d.cli("info", check_rc=False, extra_global=["--timeout-ms", "4000"],
                        timeout=30)
        check(r_local.rc == 0, "Unix call during a TCP flood: %r" % r_local)
        flood += open_flood(unix_connect(d.sock), FLOOD)
        time.sleep(1)
        fds_during = daemon_fds(d)
        check(fds_during < NOFILE, "daemon at %d fds of %d during the flood" %
              (fds_during, NOFILE))
        r_unix = d.cli("info", check_rc=False, extra_global=["--timeout-ms", "4000"],
                       timeout=30)
        r_tcp = d.cli("info", check_rc=False, address=addr,
                      extra_global=["--timeout-ms", "4000"] + g, timeout=30)
        check(clean_refusal(r_unix), "Unix call during the flood: %r" % r_unix)
        check(clean_refusal(r_tcp), "TCP call during the flood: %r" % r_tcp)
    finally:
        for s in flood:
            s.close()
    t0 = time.time()
    info_ok_within(d, 30)
    info_ok_within(d, 30, address=addr, extra=g)
    log = d.read_log()
    check("event=connection_refused" in log, "no event=connection_refused line:\n" + log)
    print("  flood: %d connections opened by the client, daemon fds %d before / %d during "
          "(limit %d); Unix during: %s; TCP during: %s; both answer %.1fs after the flood" %
          (len(flood), fds_before, fds_during, NOFILE,
           outcome(r_unix), outcome(r_tcp), time.time() - t0))
    # The token is still required on TCP after all this.
    r = d.cli("info", check_rc=False, address=addr)
    check(r.rc != 0 and "UNAUTHENTICATED" in r.err, "TCP without a token: %r" % r)


def read_until_closed(s, seconds):
    """Reads until EOF or reset; returns the seconds it took, or None (bounded)."""
    t0 = time.time()
    s.settimeout(0.5)
    while time.time() - t0 < seconds:
        try:
            if s.recv(65536) == b"":
                return time.time() - t0
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.time() - t0
    return None


def scrape(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as r:
        return r.read().decode()


def metric(text, name, labels):
    m = re.search(r"^%s\{%s\} (\S+)$" % (re.escape(name), re.escape(labels)), text, re.M)
    return float(m.group(1)) if m else None


def test_silent_connection_dropped(root, daemons):
    mport = free_port()
    d = Daemon(root, extra=["--handshake-timeout-ms", "500", "--connection-idle-ms", "1500",
                            "--metrics", "127.0.0.1:%d" % mport])
    daemons.append(d)
    d.start()
    silent = unix_connect(d.sock)()
    took = read_until_closed(silent, 10)
    silent.close()
    check(took is not None, "a silent connection was still open after 10 s")
    # After the HTTP/2 preface and SETTINGS, an idle connection is closed by gRPC.
    h2 = unix_connect(d.sock)()
    h2.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    idle = read_until_closed(h2, 15)
    h2.close()
    check(idle is not None, "an idle HTTP/2 connection was still open after 15 s")
    text = scrape(mport)
    silent_n = metric(text, "kvtier_connections_refused_total",
                      'listener="unix",reason="silent"')
    eq(silent_n, 1.0, "kvtier_connections_refused_total{reason=silent}")
    check(metric(text, "kvtier_connections_accepted_total", 'listener="unix"') >= 2,
          "accepted connections counted")
    print("  silent connection closed after %.1fs (timeout 0.5s); idle HTTP/2 connection "
          "after %.1fs (idle 1.5s)" % (took, idle))
    d.cli("info")


UNKNOWN_CLIENT = r"""
import sys, grpc
ch = grpc.insecure_channel("unix:" + sys.argv[1])
f = ch.unary_unary("/kvtier.v1.Kvtier/Future")
try:
    f(b"", timeout=10)
    print("OK")
except grpc.RpcError as e:
    print(e.code().name, e.details())
"""


def test_unknown_method(root, daemons):
    py = "/usr/bin/python3"
    if not os.access(py, os.X_OK) or subprocess.run([py, "-c", "import grpc"],
                                                    capture_output=True).returncode:
        raise Skip("Debian's python3-grpcio is not installed (scripts/deps)")
    d = Daemon(root)
    daemons.append(d)
    d.start()
    outs = []
    for _ in range(3):  # more than once: the request for unknown calls is re-posted
        p = subprocess.run([py, "-c", UNKNOWN_CLIENT, d.sock], capture_output=True,
                           timeout=60)
        outs.append(p.stdout.decode().strip())
    for o in outs:
        check(o.startswith("UNIMPLEMENTED") and "does not serve method "
              "/kvtier.v1.Kvtier/Future" in o, "unknown method answered: %r" % o)
    print("  unknown method: %s" % outs[0])
    d.cli("info")


if __name__ == "__main__":
    run([test_flood_unix_and_tcp, test_silent_connection_dropped, test_unknown_method])
