#!/usr/bin/env python3
"""kill -9 in the middle of puts: every put that returned success survives with
its bytes, no temporaries are left, fsck is clean. Plus fsck's own findings.

And the red team's kill -9 rounds (issue 12): KVTIER_CRASH_ROUNDS (default 5)
rounds of kill -9 while 8 clients (tests/tools/kvload) put, fetch, stage and
remove on a 16M tmpfs tier over a 96M disk tier (migrations and evictions all
the time). After each restart: every acknowledged put is fetched and
compared by SHA-256; one that is gone counts as evicted only with an
event=evict line (or an rm of the load) for its id, else as lost; 0 lost and
0 corrupt required; no temporary in the tiers and no staged file left; fsck
clean with the daemon stopped. Figures printed."""
import json
import os
import random
import re
import subprocess
import threading
import time

from harness import (BIN, KVTIER, Daemon, check, eq, make_slot, run, sha256)

KVLOAD = os.path.join(BIN, "tests", "kvload")
ROUNDS = int(os.environ.get("KVTIER_CRASH_ROUNDS", "5"))


def test_kill9_during_puts(root, daemons):
    d = Daemon(root, tier_size="256M")
    daemons.append(d)
    d.start()
    srcdir = os.path.join(root, "src")
    os.mkdir(srcdir)
    rnd = random.Random(7)
    files = []
    for i in range(240):
        toks = [rnd.randrange(1, 32000) for _ in range(64 + rnd.randrange(0, 200))]
        files.append(make_slot(os.path.join(srcdir, "f%03d.bin" % i), toks,
                               row_bytes=rnd.choice([64, 1024, 16384])))
    acked = {}          # blob id -> source file, for puts that returned success
    lock = threading.Lock()
    for rnd_no in range(3):
        todo = files[rnd_no * 80:(rnd_no + 1) * 80]
        stop = []

        def worker(part):
            for f in part:
                if stop:
                    return
                p = subprocess.run([KVTIER, "--socket", d.sock, "put", "--namespace", "crash", f],
                                   capture_output=True, timeout=60)
                if p.returncode == 0:
                    with lock:
                        acked[p.stdout.decode().strip()] = f
        threads = [threading.Thread(target=worker, args=(todo[k::3],)) for k in range(3)]
        for t in threads:
            t.start()
        # Kill once this round has had puts acknowledged (bounded wait), at a
        # point that varies from round to round, with puts still in flight.
        start_n = len(acked)
        deadline = time.time() + 20
        while len(acked) < start_n + 8 and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rnd.uniform(0.0, 0.2))
        d.kill9()
        stop.append(1)
        for t in threads:
            t.join()
        d.start()
        have = {b["blob"] for b in d.ls()}
        missing = [b for b in acked if b not in have]
        eq(missing, [], "acknowledged puts lost after kill -9 (round %d)" % rnd_no)
        tmp = [f for f in os.listdir(d.tier_dir) if f.startswith(".tmp-")]
        eq(tmp, [], "temporaries left after restart")
        r = d.fsck()
        check(r.rc == 0, "fsck after restart: %r" % r)
    print("acknowledged puts: %d" % len(acked))
    check(len(acked) >= 20, "too few puts went through to make the test meaningful")
    for blob, f in acked.items():
        out = os.path.join(root, "out.bin")
        d.cli("get", blob, "-o", out)
        eq(sha256(out), sha256(f), "bytes of %s" % blob)


def test_fsck_finds_and_restart_repairs(root, daemons):
    d = Daemon(root)
    daemons.append(d)
    d.start()
    a = d.put(make_slot(os.path.join(root, "a.bin"), list(range(1, 200))))
    b = d.put(make_slot(os.path.join(root, "b.bin"), list(range(500, 700))))
    d.stop()
    r = d.fsck()
    eq(r.rc, 0, "fsck clean on a stopped daemon's data: %r" % r)
    os.unlink(os.path.join(d.tier_dir, a))                  # metadata without file
    open(os.path.join(d.tier_dir, "0" * 64), "wb").write(b"x")  # file without metadata
    open(os.path.join(d.tier_dir, ".tmp-deadbeef"), "wb").write(b"y")  # temporary
    r = d.fsck()
    eq(r.rc, 1, "fsck exit status with problems")
    out = r.out + r.err
    check(a in out, "fsck names the blob whose file is missing: %s" % out)
    check("0" * 64 in out, "fsck names the orphan file: %s" % out)
    check(".tmp-deadbeef" in out, "fsck names the temporary: %s" % out)
    eq(sorted(os.listdir(d.tier_dir)), sorted([b, "0" * 64, ".tmp-deadbeef"]),
       "fsck changed nothing")
    # The stop was clean, so a plain start would trust the index: ask for the
    # per-file check (a crash or a reboot gets it without asking).
    d.extra.append("--verify-on-start")
    d.start()
    eq([x["blob"] for x in d.ls()], [b], "restart dropped the blob with no file")
    eq(os.listdir(d.tier_dir), [b], "restart removed the orphan and the temporary")
    d.stop()
    r = d.fsck()
    eq(r.rc, 0, "fsck clean after the repair: %r" % r)


def kvload_json(out):
    js = [l for l in out.splitlines() if l.startswith("json ")]
    check(js, "kvload printed no figures:\n%s" % out)
    return json.loads(js[-1][5:])


def leftovers(d):
    tmp = []
    for t in (d.tier_dir, os.path.join(d.root, "disk")):
        if os.path.isdir(t):
            tmp += [os.path.join(t, f) for f in os.listdir(t) if f.startswith(".tmp-")]
    staged = [f for f in os.listdir(d.slot_dir) if f.startswith("kvtier-")]
    return tmp, staged


def test_kill9_rounds_under_load(root, daemons):
    check(os.access(KVLOAD, os.X_OK), "%s is not built" % KVLOAD)
    disk = os.path.join(root, "disk")
    d = Daemon(root, tier_size="16M", extra=["--tier", "disk:%s:96M" % disk])
    daemons.append(d)
    work = os.path.join(root, "work")
    os.mkdir(work)
    record = os.path.join(root, "acked.txt")
    rnd = random.Random(11)
    d.start()
    totals = {"acked": 0, "ok": 0, "evicted": 0, "removed": 0, "lost": 0, "corrupt": 0}
    for rnd_no in range(ROUNDS):
        load = subprocess.Popen(
            [KVLOAD, "run", "--socket", d.sock, "--work", work, "--log", d.log_path,
             "--slot-dir", d.slot_dir, "--clients", "8", "--seconds", "30", "--pid",
             str(d.pid()), "--allow-disconnect", "--record", record, "--seed",
             str(1000 + rnd_no), "--tokens", "64-256", "--rm-pct", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # Kill at a point that varies from round to round, puts in flight.
        time.sleep(rnd.uniform(1.5, 3.5))
        d.kill9()
        try:
            out = load.communicate(timeout=120)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            load.kill()
            load.wait()
            raise
        f = kvload_json(out)
        eq(f["mismatches"], 0, "byte mismatches during round %d" % rnd_no)
        eq(f["unexplained"], 0, "unexplained NOT_FOUND during round %d:\n%s" % (rnd_no, out))
        eq(f["errors"], 0, "errors other than the kill's during round %d:\n%s" % (rnd_no, out))
        d.start()
        tmp, staged = leftovers(d)
        eq(tmp, [], "temporaries left after the restart of round %d" % rnd_no)
        eq(staged, [], "staged files left after the restart of round %d" % rnd_no)
        p = subprocess.run([KVLOAD, "verify", "--socket", d.sock, "--log", d.log_path,
                            "--record", record], capture_output=True, timeout=300)
        vout = p.stdout.decode(errors="replace")
        v = kvload_json(vout)
        log = open(d.log_path, "rb").read().decode(errors="replace")
        repaired = len(re.findall(r"event=reconcile\w*remove", log))
        print("round %d: load %d puts acked, %d gets + %d stages checked; after restart: %s; "
              "migrations so far %d, restart removals so far %d" %
              (rnd_no, f["put_ok"], f["get_ok"], f["stage_ok"],
               [l for l in vout.splitlines() if l.startswith("verify ")][0],
               log.count("event=migrate "), repaired))
        eq(v["lost"], 0, "acknowledged puts lost after kill -9 (round %d):\n%s" % (rnd_no, vout))
        eq(v["corrupt"], 0, "corrupt blobs after kill -9 (round %d):\n%s" % (rnd_no, vout))
        eq(v["errors"], 0, "errors verifying round %d:\n%s" % (rnd_no, vout))
        eq(p.returncode, 0, "kvload verify's verdict")
        totals = v
        eq(d.stop(), 0, "kvtierd exit status after round %d" % rnd_no)
        r = d.fsck()
        check(r.rc == 0, "fsck after round %d: %r" % (rnd_no, r))
        d.start()
    print("%d rounds: %d acknowledged puts, %d intact, %d evicted (each with its event=evict "
          "line), %d removed by the load, 0 lost, 0 corrupt; %d migrations" %
          (ROUNDS, totals["acked"], totals["ok"], totals["evicted"], totals["removed"],
           open(d.log_path, "rb").read().count(b"event=migrate ")))
    check(totals["acked"] >= 10 * ROUNDS, "too few acknowledged puts to mean something")
    check(totals["ok"] >= 1, "nothing survived to be checked")


if __name__ == "__main__":
    run([test_kill9_during_puts, test_fsck_finds_and_restart_repairs,
         test_kill9_rounds_under_load])
