#!/usr/bin/env python3
"""/metrics: valid for promtool, and the numbers follow what happened."""
import os
import shutil
import subprocess
import urllib.request

from harness import Daemon, Skip, check, eq, fixture, free_port, opaque_copy, run


def scrape(addr):
    with urllib.request.urlopen("http://%s/metrics" % addr, timeout=10) as r:
        eq(r.status, 200, "status")
        check(r.headers["Content-Type"].startswith("text/plain"), "content type")
        return r.read().decode()


def value(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line == name:
            return float(line.split()[-1])
    raise AssertionError("no sample %s" % name)


def test_metrics(root, daemons):
    if not shutil.which("promtool"):
        raise Skip("promtool (Debian package prometheus) is not installed")
    addr = "127.0.0.1:%d" % free_port()
    d = Daemon(root, extra=["--metrics", addr])
    daemons.append(d)
    d.start()
    d.put(fixture("v2/chat-a-turn1.bin"))
    d.lookup(fixture("v2/chat-a-turn1.bin"))
    d.lookup(fixture("v2/chat-a-turn1.bin"), ns="nothing-here")
    d.cli("put", "--namespace", "ns-test", fixture("v2/empty.bin"), check_rc=False)
    # A bad file is refused from its first bytes: the daemon does not take in
    # the rest of a 32 MiB upload before saying so.
    big = os.path.join(root, "badmagic-big.bin")
    with open(big, "wb") as f:
        f.write(b"XXXX" + bytes(8))
        f.truncate(32 << 20)
    r = d.cli("put", "--namespace", "ns-test", big, check_rc=False)
    check(r.rc != 0 and "magic" in r.err, "bad magic refused: %r" % r)
    text = scrape(addr)
    path = os.path.join(root, "m.txt")
    open(path, "w").write(text)
    p = subprocess.run(["promtool", "check", "metrics"], stdin=open(path), capture_output=True)
    check(p.returncode == 0, "promtool check metrics failed:\n%s%s" %
          (p.stdout.decode(), p.stderr.decode()))
    eq(value(text, "kvtier_lookups_total"), 2, "lookups")
    eq(value(text, "kvtier_lookup_hits_total"), 1, "hits")
    eq(value(text, "kvtier_matched_tokens_total"), 274, "matched tokens")
    eq(value(text, "kvtier_puts_total"), 1, "puts")
    written = [float(l.split()[-1]) for l in text.splitlines()
               if l.startswith("kvtier_tier_written_bytes_total{")]
    check(written and written[0] < 8 << 20,
          "refused 32 MiB upload was read to the end: %r bytes written" % written)
    eq(value(text, "kvtier_blobs"), 1, "blobs")
    check('kvtier_rpc_calls_total{method="Lookup",code="OK"} 2' in text, "rpc calls by method")
    check('kvtier_rpc_calls_total{method="Put",code="INVALID_ARGUMENT"} 2' in text,
          "refused put counted by status")
    check('kvtier_tier_capacity_bytes{tier="0",kind="tmpfs"} 67108864' in text,
          "tier capacity")
    # Puts by state kind, and opaque blobs per namespace.
    d.put(opaque_copy(fixture("v2/chat-b-turn1.bin"), os.path.join(root, "odd.bin"), 3),
          ns="odd")
    text = scrape(addr)
    eq(value(text, 'kvtier_puts_by_state_total{state="kv-2025"}'), 1, "kv-2025 puts")
    eq(value(text, 'kvtier_puts_by_state_total{state="opaque"}'), 1, "opaque puts")
    eq(value(text, 'kvtier_puts_by_state_total{state="kv"}'), 0, "kv puts")
    eq(value(text, 'kvtier_namespace_opaque_blobs{namespace="odd"}'), 1, "opaque blobs")
    eq(value(text, 'kvtier_namespace_opaque_blobs{namespace="ns-test"}'), 0,
       "no opaque blobs in ns-test")
    # Read-only: other paths are 404, other methods 405.
    try:
        urllib.request.urlopen("http://%s/other" % addr, timeout=10)
        check(False, "/other should be 404")
    except urllib.error.HTTPError as e:
        eq(e.code, 404, "other path")
    try:
        urllib.request.urlopen(urllib.request.Request("http://%s/metrics" % addr, data=b"x",
                                                      method="POST"), timeout=10)
        check(False, "POST should be 405")
    except urllib.error.HTTPError as e:
        eq(e.code, 405, "POST")


if __name__ == "__main__":
    run([test_metrics])
