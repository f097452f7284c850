#!/usr/bin/env python3
"""kill -9 in the middle of puts: every put that returned success survives with
its bytes, no temporaries are left, fsck is clean. Plus fsck's own findings."""
import os
import random
import subprocess
import threading
import time

from harness import (KVTIER, Daemon, check, eq, make_slot, run, sha256)


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


if __name__ == "__main__":
    run([test_kill9_during_puts, test_fsck_finds_and_restart_repairs])
