#!/usr/bin/env python3
"""The disk tier and placement, with tiny tiers so that spill, promotion and
eviction happen in seconds: identical bytes from either tier, admission by
measured prefill speed, a flipped byte on disk, kill -9 during migrations, a
disk tier on a file system smaller than its capacity. Each test runs twice:
io_uring as the probe finds it, then with the probe failure simulated
(KVTIER_NO_IO_URING=1), so the pread fallback passes the same checks."""
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from harness import (BIN, KVTIER, Daemon, Failure, Skip, check, eq, expect_fail, fixture,
                     free_port, make_slot, run, sha256)

MODE = {"io": "auto"}   # set per pass by main


def disk_dir(root):
    """A disk-tier directory on a real (ext4) file system, removed with root."""
    base = tempfile.mkdtemp(prefix="kvtier-it-disk-", dir="/var/tmp")
    os.symlink(base, os.path.join(root, "disk-link"))   # so cleanup finds it
    return base


def cleanup_disk(root, daemons):
    """Stops the test's daemons first: a move in flight would write into the
    directory while it is being removed."""
    for d in daemons:
        try:
            d.kill9()
        except Exception:
            pass
    link = os.path.join(root, "disk-link")
    if os.path.islink(link):
        shutil.rmtree(os.readlink(link), ignore_errors=True)


def tiered(root, daemons, tmpfs="4M", disk="64M", disk_path=None, extra=(), metrics=True):
    env = {"KVTIER_NO_IO_URING": "1"} if MODE["io"] == "pread" else None
    ex = ["--tier", "disk:%s:%s" % (disk_path or disk_dir(root), disk), "--probe-size", "1M",
          "--log-level", "debug"]
    addr = None
    if metrics:
        addr = "127.0.0.1:%d" % free_port()
        ex += ["--metrics", addr]
    d = Daemon(root, tier_size=tmpfs, extra=ex + list(extra), env=env)
    d.metrics_addr = addr
    daemons.append(d)
    d.start()
    return d


def metrics(d):
    with urllib.request.urlopen("http://%s/metrics" % d.metrics_addr, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def metric(d, name, **labels):
    total = 0.0
    for k, v in metrics(d).items():
        m = re.match(r"([a-z_]+)(\{.*\})?$", k)
        if not m or m.group(1) != name:
            continue
        lab = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(lab.get(a) == str(b) for a, b in labels.items()):
            total += v
    return total


def where(d):
    """blob id -> tier index."""
    return {b["blob"]: b["tier_index"] for b in d.ls()}


def wait_for(cond, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise Failure("timed out waiting for " + what)


def slots(root, n, ns_seed=0, n_tokens=256, row_bytes=1024, kind="f16"):
    """n slot files of ~2 * n_tokens * row_bytes bytes; f16-like KV payload."""
    srcdir = os.path.join(root, "src%d" % ns_seed)
    os.makedirs(srcdir, exist_ok=True)
    rnd = random.Random(ns_seed)
    files = []
    for i in range(n):
        toks = [rnd.randrange(1, 32000) for _ in range(n_tokens)]
        p = make_slot(os.path.join(srcdir, "s%03d.bin" % i), toks, row_bytes=row_bytes)
        payload = n_tokens * row_bytes
        k_rows = 12 + 4 * n_tokens + 4 + 8 * n_tokens + 8 + 12
        with open(p, "r+b") as f:
            for start in (k_rows, k_rows + payload + 12):   # K rows, then V rows
                body = bytearray(payload)
                half = payload // 2
                if kind == "f16":   # small-magnitude halves: what f16 KV looks like to LZ4
                    body[0::2] = rnd.randbytes(half)
                    body[1::2] = bytes(0x2c + (x & 3) for x in rnd.randbytes(half))
                else:               # incompressible
                    body[:] = rnd.randbytes(payload)
                f.seek(start)
                f.write(body)
        files.append(p)
    return files


def fetch_same(d, blob, src):
    out = os.path.join(d.root, "got-%s.bin" % blob[:12])
    d.cli("get", blob, "-o", out)
    eq(sha256(out), sha256(src), "bytes of blob %s fetched from its tier" % blob[:12])
    os.unlink(out)


def test_spill_fetch_promote(root, daemons):
    d = tiered(root, daemons)
    try:
        files = slots(root, 12)
        ids = [d.put(f) for f in files]
        # 12 blobs of ~0.5 MiB into 4 MiB of tmpfs (high watermark 90 %).
        placed = wait_for(lambda: (lambda w: w if sum(1 for t in w.values() if t == 1) >= 4
                                   and sum(1 for t in w.values() if t == 0) >= 1 else None)(
                                       where(d)), "blobs spilling to the disk tier")
        eq(len(placed), 12, "blobs kept (spilled, not lost)")
        # The coldest (first saved) went down; the newest stayed in RAM.
        check(placed[ids[0]] == 1, "the oldest blob moved to disk: %r" % placed)
        check(placed[ids[-1]] == 0, "the newest blob stayed on tmpfs: %r" % placed)
        info = {b["blob"]: b for b in d.ls()}
        check(info[ids[0]]["compression"] in ("lz4", "lz4+shuffle"),
              "f16-like KV is compressed on disk: %r" % info[ids[0]])
        check(info[ids[0]]["stored_bytes"] < info[ids[0]]["size_bytes"] * 0.9,
              "compression saved at least 10 %%: %r" % info[ids[0]])
        for blob, f in zip(ids, files):
            fetch_same(d, blob, f)
        check(metric(d, "kvtier_migrations_total", direction="down") >= 4, "migrations counted")
        # Make one disk blob hot: hits count for GDSF's frequency; after the
        # flush (1 s) a whole read asks for a promotion, and the policy grants it.
        # Lookup gives a disk blob's size as served (as List), not as stored.
        on_disk = [b for b in d.ls() if b["tier_index"] == 1 and b["compression"] != "none"]
        check(on_disk, "a compressed blob on disk")
        m = d.lookup(files[ids.index(on_disk[0]["blob"])])
        eq((m["blob"], m["tier_index"], m["size_bytes"]),
           (on_disk[0]["blob"], 1, on_disk[0]["size_bytes"]), "lookup of a compressed disk blob")
        check(on_disk[0]["stored_bytes"] < m["size_bytes"], "stored smaller than served")
        hot = ids[0]
        for _ in range(4):
            d.cli("lookup", "--namespace", "ns-test", "--tokens-of", files[0])
        time.sleep(1.5)
        fetch_same(d, hot, files[0])
        wait_for(lambda: where(d).get(hot) == 0, "the hot blob promoted to tmpfs")
        check(metric(d, "kvtier_migrations_total", direction="up") >= 1, "promotion counted")
        fetch_same(d, hot, files[0])
        # A stage of a disk blob works too (a promotion or a copy: either way
        # the staged file holds the blob's bytes).
        cold = [b for b, t in where(d).items() if t == 1][0]
        r = d.cli("stage", cold, "--dir", d.slot_dir, "--json").json()
        src = files[ids.index(cold)]
        eq(sha256(r["path"]), sha256(src), "staged bytes of a disk blob")
        d.cli("release", r["lease"])
        d.stop()
        f = d.fsck(verify=True)   # every part read back, the lz4 ones decoded
        check(f.rc == 0, "fsck --verify clean: %r" % f)
    finally:
        cleanup_disk(root, daemons)


def test_admission_by_prefill_speed(root, daemons):
    d = tiered(root, daemons)
    try:
        fast = slots(root, 10, ns_seed=1)
        slow = slots(root, 10, ns_seed=2)
        ids = {"fast": [d.put(fast[0], ns="fast")], "slow": [d.put(slow[0], ns="slow")]}
        # "fast": 1e7 tokens/s, so 256 tokens take 26 us: less than reading
        # 0.5 MiB from any disk. "slow": 10 tokens/s, 26 s per blob.
        d.cli("report", "-n", "fast", "--prompt-tokens", "10000", "--prompt-ms", "1")
        d.cli("report", "-n", "slow", "--prompt-tokens", "100", "--prompt-ms", "10000")
        for a, b in zip(fast[1:], slow[1:]):
            ids["fast"].append(d.put(a, ns="fast"))
            ids["slow"].append(d.put(b, ns="slow"))
        eq(len(set(ids["fast"] + ids["slow"])), 20, "distinct blobs put")
        wait_for(lambda: metric(d, "kvtier_evictions_total", reason="not_worth_restoring") > 0,
                 "a blob refused by the disk tier")
        time.sleep(1.5)
        w = where(d)
        on_disk = {ns: [b for b in v if w.get(b) == 1] for ns, v in ids.items()}
        gone = {ns: [b for b in v if b not in w] for ns, v in ids.items()}
        # Each blob is 527408 bytes: 7 fit in 4 MiB of tmpfs (under the 90 %
        # watermark), the 8th put makes room down to the low watermark (75 %:
        # 4 resident + the new one), so puts 8, 11, 14, 17 and 20 shed 3
        # blobs each, lowest priority first. A fast blob is worth less than
        # its restore time on any tier, so every fast one resident goes
        # first, deleted, never moved; then the oldest slow ones move down.
        # The 20th put (the last slow blob) sheds the last fast one: all 10
        # fast blobs evicted as not worth restoring, 5 slow blobs moved to
        # disk, the 5 newest slow ones on tmpfs, nothing else evicted.
        eq(gone["slow"], [], "slow-prefill blobs evicted")
        eq(sorted(gone["fast"]), sorted(ids["fast"]), "fast-prefill blobs evicted")
        eq(sorted(on_disk["slow"]), sorted(ids["slow"][:5]), "slow-prefill blobs moved to disk")
        eq(metric(d, "kvtier_evictions_total", reason="not_worth_restoring"), 10,
           "not_worth_restoring evictions")
        eq(metric(d, "kvtier_evictions_total"), len(gone["fast"]), "evictions of any reason")
        with open(d.log_path, "rb") as f:
            log = f.read().decode(errors="replace")
        evicted = re.findall(r"event=evict blob=([0-9a-f]{64}) tier=0 "
                             r"reason=not_worth_restoring ", log)
        eq(sorted(evicted), sorted(gone["fast"]), "blobs the log says were not worth restoring")
        # Lookup carries the model's estimate: one report of 100 tokens in 10 s
        # at depth 0 gives 0.1 s per token, so a 256-token match costs 25.6 s.
        m = d.lookup(slow[0], ns="slow")
        eq(m["matched_tokens"], 256, "slow blob matched whole")
        check(abs(m["est_prefill_s"] - 25.6) < 0.01, "prefill estimate from the model: %r" % m)
        info = d.cli("info", "--json").json()
        models = {m["namespace"]: m for m in info.get("namespaces", [])}
        # One report each at depth 0: a = ms / 1000 / tokens, b = 0.
        check("fast" in models and "slow" in models, "both models are in Info: %r" % models)
        check(abs(models["fast"]["prefill_s_per_token"] - 1e-7) <= 0.02 * 1e-7,
              "fast: 1 ms for 10000 tokens is 1e-7 s per token: %r" % models["fast"])
        check(abs(models["slow"]["prefill_s_per_token"] - 0.1) <= 0.02 * 0.1,
              "slow: 10 s for 100 tokens is 0.1 s per token: %r" % models["slow"])
        for ns in ("fast", "slow"):
            eq(models[ns]["prefill_s_per_token_per_ctx"], 0, "%s: no depth term" % ns)
    finally:
        cleanup_disk(root, daemons)


def test_flipped_byte_on_disk(root, daemons):
    dd = disk_dir(root)
    d = tiered(root, daemons, disk_path=dd)
    try:
        files = slots(root, 12)
        ids = [d.put(f) for f in files]
        wait_for(lambda: where(d).get(ids[0]) == 1, "the oldest blob on disk")
        path = os.path.join(dd, ids[0])
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(size // 2)
            b = f.read(1)
            f.seek(size // 2)
            f.write(bytes([b[0] ^ 0x40]))
        # fsck --verify decodes the compressed part and finds the damage.
        r = d.fsck(verify=True)
        check(r.rc != 0 and ("blob %s" % ids[0]) in r.out + r.err and
              ("does not read back" in r.out + r.err or "fails its checksum" in r.out + r.err),
              "fsck --verify names the damaged disk blob: %r" % r)
        r = d.cli("get", ids[0], "-o", os.path.join(root, "bad.bin"), check_rc=False)
        expect_fail(r, "DATA_LOSS")
        check(not os.path.exists(os.path.join(root, "bad.bin")), "nothing written")
        check(ids[0] not in where(d), "the damaged blob is gone from the index")
        check(not os.path.exists(path), "its file is gone")
        eq(metric(d, "kvtier_checksum_failures_total"), 1, "checksum failures")
        check(ids[0][:16] in d.read_log(), "the log names the blob")
        fetch_same(d, ids[1], files[1])   # the rest is served
    finally:
        cleanup_disk(root, daemons)


def test_kill9_during_migrations(root, daemons):
    dd = disk_dir(root)
    d = tiered(root, daemons, tmpfs="6M", disk="256M", disk_path=dd, metrics=False)
    try:
        acked = {}
        reconciled = []   # per restart: (removed_files, dropped_blobs, log lines)
        # Three crashes, each while puts go on and a move's copy is being
        # written on the disk tier (its temporary seen there), at a few delays
        # after it was seen: right away, a little later, and later still, when
        # the move may have finished. The first start after each crash must
        # keep every acked blob and clean up what the crash left half done.
        for rnd_no, delay in enumerate((0.0, 0.002, 0.02)):
            files = slots(root, 40, ns_seed=10 + rnd_no, n_tokens=128)
            stop = []

            def putter():
                for f in files:
                    if stop:
                        return
                    p = subprocess.run([KVTIER, "--socket", d.sock, "put", "--namespace",
                                        "ns-test", f], capture_output=True, timeout=60)
                    if p.returncode == 0:
                        acked[p.stdout.decode().strip()] = f
            th = threading.Thread(target=putter)
            th.start()
            # A copy lives for milliseconds: poll without sleeping.
            deadline = time.time() + 60
            while (th.is_alive() and time.time() < deadline and
                   not any(n.startswith(".tmp-") for n in os.listdir(dd))):
                pass
            caught = th.is_alive() and time.time() < deadline
            time.sleep(delay)
            d.kill9()
            stop.append(1)
            th.join()
            check(caught, "round %d: no move seen copying to disk while puts ran" % rnd_no)
            log_from = os.path.getsize(d.log_path)
            d.start()
            with open(d.log_path, "rb") as f:
                f.seek(log_from)
                log = f.read().decode(errors="replace")
            m = re.findall(r"event=reconciled removed_files=(\d+) dropped_blobs=(\d+)", log)
            eq(len(m), 1, "round %d: one reconcile at the start after kill -9" % rnd_no)
            removes = re.findall(r"event=reconcile_remove_file .*", log)
            eq(int(m[0][0]), len(removes), "round %d: removed files counted" % rnd_no)
            reconciled.append((int(m[0][0]), int(m[0][1]), removes))
            w = where(d)
            for blob, f in acked.items():
                check(blob in w, "round %d: acked blob %s survived the crash" %
                      (rnd_no, blob[:12]))
                fetch_same(d, blob, f)
        check(len(acked) >= 5, "puts acked before the crashes: %d" % len(acked))
        # A kill while a copy's temporary exists leaves it (or, after its
        # rename, a second copy) for reconcile: the round killed right away
        # loses that race only if the move ended within the same millisecond.
        check(any(r[0] > 0 for r in reconciled),
              "a restart reconciled something: %r" % reconciled)
        # Each blob's files on exactly one tier. Stopped first: a move running
        # now has its new copy renamed in before the old one goes.
        d.stop()
        names = [n for n in os.listdir(d.tier_dir) + os.listdir(dd) if not n.startswith(".")]
        eq(len(names), len(set(names)), "no blob file on two tiers")
        eq(sorted(set(n[:64] for n in names)), sorted(w), "files match the index")
        f = d.fsck()
        check(f.rc == 0, "fsck clean after the crash: %r" % f)
    finally:
        cleanup_disk(root, daemons)


def test_disk_fs_smaller_than_capacity(root, daemons):
    if os.geteuid() != 0:
        raise Skip("mounting a size-limited tmpfs needs root")
    mnt = os.path.join(root, "small")
    os.mkdir(mnt)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", mnt],
                      capture_output=True).returncode != 0:
        raise Skip("mount -t tmpfs is not allowed here")
    try:
        # 64 MiB configured, 3 MiB real: ENOSPC long before the watermark.
        d = tiered(root, daemons, tmpfs="3M", disk="64M", disk_path=mnt)
        files = slots(root, 24, kind="random")
        ids = {}   # blob -> its file, for the puts that were acked
        for f in files:
            r = d.cli("put", "--namespace", "ns-test", f, check_rc=False)
            if r.rc == 0:
                ids[r.out.strip()] = f
            else:
                expect_fail(r, "RESOURCE_EXHAUSTED")
        check(len(ids) >= 20, "puts keep succeeding while the disk fills: %d" % len(ids))
        wait_for(lambda: metric(d, "kvtier_tier_enospc_total", tier=1) > 0, "ENOSPC seen")
        time.sleep(1.5)
        w = where(d)
        check(w, "blobs remain")
        check(set(w) <= set(ids), "only acked blobs are stored: %r" % sorted(set(w) - set(ids)))
        # Every acked blob that is gone was evicted, and counted.
        eq(metric(d, "kvtier_evictions_total"), len(ids) - len(w),
           "evictions (acked %d, left %d)" % (len(ids), len(w)))
        for blob in w:
            fetch_same(d, blob, ids[blob])
        # Still serving: a new put and a lookup work.
        more = slots(root, 1, ns_seed=9, kind="random")[0]
        b = d.put(more)
        eq(d.lookup(more)["blob"], b, "lookup after the disk filled")
        d.stop()
        f = d.fsck()
        check(f.rc == 0, "fsck clean: %r" % f)
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)


MOVES = re.compile(r"event=(evict|evict_pass|victim|migrate)\b")


def oversized_refused(root, d, tier_bytes):
    """Fills tier 0 of d with real fixture blobs (~1 MB, under its watermark),
    then sends three uploads that cannot fit in tier 0 even when it is empty:
    kvtier put of a sparse file with a valid slot header, Adopt of such a file
    from the slot dir, and a raw Put announcing a 60 GiB part with no data.
    Each must be refused before anything is evicted or demoted (D2), and the
    daemon must live through it (D13: the eviction scan found no candidate)."""
    ids = {}
    for ns in ("a", "b", "c", "d", "e", "f"):
        for f in ("chat-a-turn2.bin", "chat-b-turn1.bin"):   # turn1 would be superseded
            src = fixture("v2/" + f)
            ids[d.put(src, ns=ns)] = src
    eq(len(ids), 12, "12 distinct blobs stored")
    eq(set(where(d).values()), {0}, "all on tier 0 before the oversized uploads")
    with open(d.log_path, "rb") as f:
        log_start = len(f.read())
    ev0 = metric(d, "kvtier_evictions_total")
    mig0 = metric(d, "kvtier_migrations_total")
    eq((ev0, mig0), (0.0, 0.0), "no eviction or migration while filling")

    big = 2 * tier_bytes   # sparse: nothing of it is written
    bigf = os.path.join(root, "big.bin")
    with open(fixture("v2/chat-a-turn1.bin"), "rb") as f:
        head = f.read(1108)
    with open(bigf, "wb") as f:
        f.write(head)
    os.truncate(bigf, big)
    msg = ("oversized", "%d bytes" % big, "tier 0 (tmpfs:%s)" % d.tier_dir,
           "(%d bytes)" % tier_bytes, "nothing was evicted", "--tier tmpfs:%s:SIZE" % d.tier_dir,
           "--max-blob-size")

    # 1. kvtier put of the sparse file.
    r = d.cli("put", "--namespace", "a", bigf, check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", *msg)

    # 2. Adopt of the same file from the slot dir: refused, left in place.
    slot = os.path.join(d.slot_dir, "big.bin")
    with open(slot, "wb") as f:
        f.write(head)
    os.truncate(slot, big)
    r = d.cli("adopt", "--namespace", "a", slot, check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", "oversized", slot, "%d bytes" % big,
                "(%d bytes)" % tier_bytes, "nothing was evicted")
    check(os.path.exists(slot) and os.path.getsize(slot) == big,
          "the refused slot file is left in place")

    # 3. A Put stream announcing a 60 GiB part (under the 64G --max-blob-size)
    # and sending nothing: the CLI cannot, put_cancel can.
    huge = 60 << 30
    hugef = os.path.join(root, "huge.bin")
    with open(hugef, "wb") as f:
        f.write(head)
    os.truncate(hugef, huge)
    tool = os.path.join(BIN, "tests", "put_cancel")
    p = subprocess.run([tool, "unix:" + d.sock, "a", hugef, "1", "0", "status"],
                       capture_output=True, timeout=60)
    out = p.stdout.decode(errors="replace")
    eq(p.returncode, 0, "put_cancel ran: %r %r" % (out, p.stderr))
    check(out.startswith("status=3 "), "INVALID_ARGUMENT (3) for the 60 GiB part: %r" % out)
    for ph in ("oversized", "%d bytes" % huge, "(%d bytes)" % tier_bytes,
               "nothing was evicted", "--tier tmpfs:%s:SIZE" % d.tier_dir):
        check(ph in out, "expected %r in the message: %r" % (ph, out))

    # Nothing moved: every blob where it was, with its bytes; no eviction or
    # migration in the metrics or the log; the daemon alive.
    check(d.proc.poll() is None, "kvtierd still running")
    d.cli("info")
    eq(where(d), {b: 0 for b in ids}, "every blob still on tier 0")
    for blob, src in ids.items():
        fetch_same(d, blob, src)
    eq(metric(d, "kvtier_evictions_total"), ev0, "no eviction counted")
    eq(metric(d, "kvtier_migrations_total"), mig0, "no migration counted")
    with open(d.log_path, "rb") as f:
        tail = f.read()[log_start:].decode(errors="replace")
    moved = [l for l in tail.splitlines() if MOVES.search(l)]
    eq(moved, [], "no eviction or migration in the log")
    eq(len(re.findall(r"event=put_oversized", tail)), 3, "three refusals logged")
    check(not any(f.startswith("big") or f.startswith("huge") for f in os.listdir(d.tier_dir)),
          "nothing of the refused uploads on the tier")
    # Still serving: a put that fits.
    more = slots(root, 1, ns_seed=5, n_tokens=64, row_bytes=256)[0]
    b = d.put(more)
    eq(d.lookup(more)["blob"], b, "lookup after the refusals")
    d.stop()
    f = d.fsck()
    check(f.rc == 0, "fsck clean: %r" % f)


def test_oversized_put_evicts_nothing(root, daemons):
    """A single tmpfs tier of 2 MiB: refusals delete nothing."""
    env = {"KVTIER_NO_IO_URING": "1"} if MODE["io"] == "pread" else None
    addr = "127.0.0.1:%d" % free_port()
    d = Daemon(root, tier_size="2M", env=env,
               extra=["--metrics", addr, "--probe-size", "1M", "--log-level", "debug"])
    d.metrics_addr = addr
    daemons.append(d)
    d.start()
    oversized_refused(root, d, 2 << 20)


def test_oversized_put_demotes_nothing(root, daemons):
    """tmpfs 2 MiB over a 64 MiB disk tier: the 4 MiB file would fit on the
    disk tier, but uploads land on tier 0 only: refused, nothing demoted."""
    try:
        d = tiered(root, daemons, tmpfs="2M", disk="64M")
        oversized_refused(root, d, 2 << 20)
    finally:
        cleanup_disk(root, daemons)


def test_full_tier_pinned_evicts_nothing(root, daemons):
    """A put that fits in tier 0 but not next to its pinned (staged) blobs:
    when the unpinned blobs hold less than what must leave, evicting them
    would not help, so none is evicted (D2, make_room). Then with every blob
    pinned, the eviction scan finds no candidate at all: the sanitizer build
    used to abort there (D13, qsort(NULL, 0))."""
    env = {"KVTIER_NO_IO_URING": "1"} if MODE["io"] == "pread" else None
    addr = "127.0.0.1:%d" % free_port()
    cap = 2 << 20
    d = Daemon(root, tier_size="2M", env=env,
               extra=["--metrics", addr, "--probe-size", "1M", "--log-level", "debug"])
    d.metrics_addr = addr
    daemons.append(d)
    d.start()
    ids = {}
    for ns in ("a", "b"):
        for f in ("chat-a-turn2.bin", "chat-b-turn1.bin"):
            src = fixture("v2/" + f)
            ids[d.put(src, ns=ns)] = src
    blobs = sorted(ids)
    eq(len(blobs), 4, "4 blobs stored")
    stored = sum(b["stored_bytes"] for b in d.ls())
    staged = {}
    for b in blobs[:3]:
        staged[b] = d.cli("stage", b, "--dir", d.slot_dir, "--json").json()
    free_one = blobs[3]
    # Fits in the empty tier; with the blobs in, more than the one unpinned
    # blob must leave.
    size = cap - 4096
    check(stored + size - cap > os.path.getsize(ids[free_one]),
          "the unpinned blob alone cannot make room (%d stored)" % stored)
    with open(d.log_path, "rb") as f:
        log_start = len(f.read())
    bigf = os.path.join(root, "nearly.bin")
    with open(fixture("v2/chat-a-turn1.bin"), "rb") as f:
        head = f.read(1108)
    with open(bigf, "wb") as f:
        f.write(head)
    os.truncate(bigf, size)
    r = d.cli("put", "--namespace", "c", bigf, check_rc=False)
    expect_fail(r, "RESOURCE_EXHAUSTED", "tier 0", "is full")
    eq(sorted(where(d)), blobs, "the unpinned blob was not evicted for nothing")
    # Every blob pinned: no candidate at all.
    staged[free_one] = d.cli("stage", free_one, "--dir", d.slot_dir, "--json").json()
    r = d.cli("put", "--namespace", "c", bigf, check_rc=False)
    expect_fail(r, "RESOURCE_EXHAUSTED", "tier 0", "is full")
    check(d.proc.poll() is None, "kvtierd still running after a scan with no candidate")
    for b, st in staged.items():
        d.cli("release", st["lease"])
    eq(sorted(where(d)), blobs, "every blob still stored")
    for b in blobs:
        fetch_same(d, b, ids[b])
    eq(metric(d, "kvtier_evictions_total"), 0.0, "no eviction counted")
    with open(d.log_path, "rb") as f:
        tail = f.read()[log_start:].decode(errors="replace")
    eq([l for l in tail.splitlines() if MOVES.search(l)], [], "no eviction in the log")
    check("event=evict_skip" in tail, "the skipped pass is logged")
    d.stop()


TESTS = [test_spill_fetch_promote, test_admission_by_prefill_speed, test_flipped_byte_on_disk,
         test_kill9_during_migrations, test_disk_fs_smaller_than_capacity,
         test_oversized_put_evicts_nothing, test_oversized_put_demotes_nothing,
         test_full_tier_pinned_evicts_nothing]

if __name__ == "__main__":
    only = [t for t in TESTS if len(sys.argv) < 2 or t.__name__ in sys.argv[1:]]
    modes = [m for m in ("auto", "pread") if os.environ.get("KVTIER_IO_MODES", "auto pread")
             .split().count(m)]
    results = []
    for m in modes:
        MODE["io"] = m
        print("== io mode: %s" % ("io_uring as probed" if m == "auto" else
                                   "probe failure simulated (KVTIER_NO_IO_URING=1)"))
        pid = os.fork()
        if pid == 0:
            run(only)
        _, status = os.waitpid(pid, 0)
        results.append(os.waitstatus_to_exitcode(status))
    sys.exit(1 if any(r not in (0, 77) for r in results) else 0)
