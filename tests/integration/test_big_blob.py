#!/usr/bin/env python3
"""A 1 GiB blob goes through put and get while the daemon's RSS stays far below it."""
import os
import threading
import time

from harness import Daemon, check, eq, make_slot, run, sha256, Skip

GiB = 1 << 30


def test_1gib_put_get(root, daemons):
    shm = os.statvfs("/dev/shm")
    if shm.f_bavail * shm.f_frsize < 3 * GiB:
        raise Skip("/dev/shm has less than 3 GiB free for a 1 GiB tier")
    # Under AddressSanitizer freed chunks sit in a quarantine (256 MiB by
    # default) before reuse; a small one keeps RSS about the program's own.
    env = None
    if os.environ.get("KVTIER_SANITIZE") == "ON":
        env = {"ASAN_OPTIONS": os.environ.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=8"}
    d = Daemon(root, tier_size="1200M", env=env)
    daemons.append(d)
    d.start()
    # Source and output on disk (not tmpfs): only the tier's copy uses RAM.
    work = os.path.join("/var/tmp", "kvtier-big-%d" % os.getpid())
    os.makedirs(work, exist_ok=True)
    try:
        n = 1024
        src = make_slot(os.path.join(work, "big.bin"), list(range(1, n + 1)),
                        row_bytes=512 * 1024, sparse=True)
        size = os.path.getsize(src)
        check(size > GiB, "source is %d bytes" % size)
        base = d.rss_kib()
        peak = [base]
        stop = []

        def sample():
            while not stop:
                try:
                    peak[0] = max(peak[0], d.rss_kib())
                except Exception:
                    pass
                time.sleep(0.02)
        t = threading.Thread(target=sample)
        t.start()
        try:
            blob = d.put(src)
            out = os.path.join(work, "out.bin")
            d.cli("get", blob, "-o", out, timeout=600)
        finally:
            stop.append(1)
            t.join()
        eq(os.path.getsize(out), size, "size of the fetched blob")
        eq(sha256(out), sha256(src), "bytes of the fetched blob")
        grown = (peak[0] - base) / 1024.0
        print("rss: base %.1f MiB, peak %.1f MiB, growth %.1f MiB for a %.2f GiB blob" %
              (base / 1024.0, peak[0] / 1024.0, grown, size / GiB))
        check(peak[0] < 256 * 1024, "daemon RSS peaked at %.0f MiB (limit 256)" % (peak[0] / 1024))
    finally:
        for f in os.listdir(work):
            os.unlink(os.path.join(work, f))
        os.rmdir(work)


if __name__ == "__main__":
    run([test_1gib_put_get])
