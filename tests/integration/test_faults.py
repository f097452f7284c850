#!/usr/bin/env python3
"""Faults and hostile inputs from the red-team report (D9, D10, D11, D16):
absurd prefill reports, a tier directory removed while kvtierd runs, a tier
file system remounted read-only (a private mount namespace: skipped without
the privileges), the clean-stop record after files went missing, and the
messages a person gets for each."""
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

from harness import (KVTIER, KVTIERD, Daemon, Failure, Skip, check, eq, expect_fail, fixture,
                     free_port, make_slot, run)

CHAT = [fixture("v2/chat-a-turn1.bin"), fixture("v2/chat-a-turn2.bin"),
        fixture("v2/chat-b-turn1.bin")]


def wait_for(cond, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise Failure("timed out waiting for %s" % what)


def log_has(d, pattern):
    with open(d.log_path, "rb") as f:
        return re.search(pattern, f.read().decode(errors="replace")) is not None


def start(root, daemons, extra=(), **kw):
    addr = "127.0.0.1:%d" % free_port()
    d = Daemon(root, extra=["--metrics", addr] + list(extra), **kw)
    d.metrics_addr = addr
    daemons.append(d)
    return d.start()


def metric(d, name, **labels):
    """Sum of the samples of metric `name` whose labels include `labels`."""
    with urllib.request.urlopen("http://%s/metrics" % d.metrics_addr, timeout=10) as r:
        text = r.read().decode()
    total, seen = 0.0, False
    for line in text.splitlines():
        m = re.match(r"([a-z_]+)(\{.*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        lab = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(lab.get(a) == str(b) for a, b in labels.items()):
            total += float(m.group(3))
            seen = True
    check(seen, "metric %s%r not exported" % (name, labels))
    return total


def est_prefill(d, ns):
    return d.lookup(CHAT[0], ns=ns)["est_prefill_s"]


# ---- D9: prefill reports ----

def test_report_bounds(root, daemons):
    """Two absurd reports are refused with INVALID_ARGUMENT and a reason; one
    plausible outlier moves the model by less than 2.5x, not by orders of
    magnitude (before: 0.128 s became 7.4e-12 s and blobs were deleted as not
    worth restoring)."""
    d = Daemon(root).start()
    daemons.append(d)
    d.put(CHAT[0], ns="m")
    for _ in range(8):
        d.cli("report", "-n", "m", "--prompt-tokens", "1000", "--prompt-ms", "1000")
    before = est_prefill(d, "m")
    check(before > 0, "a prefill estimate after 8 reports: %r" % before)
    r = d.cli("report", "-n", "m", "--prompt-tokens", "4294967295", "--prompt-ms", "0.001",
              check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", "implausible prefill report", "4294967295 tokens")
    r = d.cli("report", "-n", "m", "--prompt-tokens", "10", "--prompt-ms", "1e-300",
              check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", "implausible prefill report",
                "faster than the plausible maximum of (tokens/s) 1e+07")
    r = d.cli("report", "-n", "m", "--prompt-tokens", "10", "--prompt-ms", "3600000",
              check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", "slower than the plausible maximum")
    eq(est_prefill(d, "m"), before, "estimate after refused reports")
    check(log_has(d, r"event=prefill_report_refused ns=\"m\" tokens=10"), "a warn log line")
    # The largest, fastest report the bounds accept: 4M tokens at 1e7 tokens/s.
    d.cli("report", "-n", "m", "--prompt-tokens", "4194304", "--prompt-ms", "419.4304")
    after = est_prefill(d, "m")
    check(before / 2.5 <= after < before,
          "one outlier moved the estimate from %g to %g s (more than 2.5x)" % (before, after))


# ---- D10: the tier directory removed or moved while running ----

def test_tier_dir_removed(root, daemons):
    """rm -rf of the tier directory: puts fail with FAILED_PRECONDITION and a
    message that says what happened and what to do (before: NOT_FOUND "No such
    file or directory", until a restart); the loss is logged and exported,
    Lookup stops offering the lost blobs, a recreated directory is used again,
    and SIGTERM does not record a clean stop (the next start checks files)."""
    d = start(root, daemons)
    ids = [d.put(CHAT[0]), d.put(CHAT[2])]
    check(d.lookup(CHAT[0])["blob"] == ids[0], "a hit before the removal")
    shutil.rmtree(d.tier_dir)
    r = d.cli("put", "-n", "ns-test", fixture("v2/chat-a-turn2.bin"), check_rc=False)
    expect_fail(r, "FAILED_PRECONDITION", "was removed while kvtierd was running",
                "mkdir -m 0700 %s" % d.tier_dir)
    check("NOT_FOUND" not in r.err, "no NOT_FOUND: %r" % r)
    wait_for(lambda: log_has(d, r"level=warn.*event=tier_dir_removed tier=0"),
             "event=tier_dir_removed")
    eq(metric(d, "kvtier_tier_dir_missing", tier=0), 1.0, "kvtier_tier_dir_missing")
    eq(metric(d, "kvtier_tier_dir_lost_total", tier=0), 1.0, "kvtier_tier_dir_lost_total")
    eq(metric(d, "kvtier_missing_blobs_dropped_total"), 2.0, "records dropped")
    check(d.lookup(CHAT[0])["blob"] is None, "Lookup still offers a blob whose file is gone")
    eq(d.ls(), [], "blobs listed after their files were removed")
    eq(metric(d, "kvtier_tier_used_bytes", tier=0), 0.0, "tier 0 usage after the loss")
    os.mkdir(d.tier_dir, 0o700)
    new = d.put(CHAT[1])     # the put itself finds the new directory
    check(log_has(d, r"event=tier_dir_reopened tier=0"), "event=tier_dir_reopened")
    eq([b["blob"] for b in d.ls()], [new], "blobs after the directory came back")
    check(os.path.exists(os.path.join(d.tier_dir, new + ".bin")) or
          any(n.startswith(new) for n in os.listdir(d.tier_dir)), "the new blob's file")
    wait_for(lambda: metric(d, "kvtier_tier_dir_missing", tier=0) == 0.0, "the gauge back at 0")
    eq(d.stop(), 0, "exit status")
    check(log_has(d, r"event=clean_stop_skipped"), "clean stop skipped")
    check(not log_has(d, r"event=clean_stop_recorded"), "no clean stop recorded")
    d.start()
    check(log_has(d, r"event=reconciled"), "the next start checks every file")
    eq([b["blob"] for b in d.ls()], [new], "blobs after the restart")
    d.stop()
    r = d.fsck()
    eq(r.rc, 0, "fsck after the restart: %r" % r)
    del ids


def test_tier_dir_moved(root, daemons):
    """The tier directory renamed away: kvtierd says so (warn, gauge), keeps
    using the directory it opened (the blobs are there), and notices when
    it is put back."""
    d = start(root, daemons)
    a = d.put(CHAT[0])
    os.rename(d.tier_dir, d.tier_dir + ".moved")
    wait_for(lambda: log_has(d, r"level=warn.*event=tier_dir_moved tier=0.*keeps using"),
             "event=tier_dir_moved")
    eq(metric(d, "kvtier_tier_dir_missing", tier=0), 1.0, "kvtier_tier_dir_missing")
    b = d.put(CHAT[2])
    check(os.path.exists(os.path.join(d.tier_dir + ".moved", b + ".bin")) or
          any(n.startswith(b) for n in os.listdir(d.tier_dir + ".moved")),
          "the put landed in the directory kvtierd uses")
    eq(sorted(x["blob"] for x in d.ls()), sorted([a, b]), "both blobs kept")
    os.rename(d.tier_dir + ".moved", d.tier_dir)
    wait_for(lambda: log_has(d, r"event=tier_dir_back tier=0"), "event=tier_dir_back")
    eq(metric(d, "kvtier_tier_dir_missing", tier=0), 0.0, "gauge after the move back")
    eq(d.stop(), 0, "exit status")
    check(log_has(d, r"event=clean_stop_recorded"), "nothing was lost: a clean stop")


# ---- D11, D16: a tier file system remounted read-only ----

class PrivateMount:
    """A small tmpfs at `path`, mounted in a private mount namespace held by a
    `sleep` (kvtierd joins it with nsenter). Skip when unshare/mount are not
    permitted here. Ended by its PID."""

    def __init__(self, path, size="16m"):
        self.path = path
        os.makedirs(path, exist_ok=True)
        if not shutil.which("unshare") or not shutil.which("nsenter"):
            raise Skip("unshare or nsenter is not installed")
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs -o size=%s,mode=0700 kvtier-test "$0" && echo ready && '
             'exec sleep 300' % size, path],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            err = self.proc.stderr.read().decode(errors="replace")
            self.proc.wait(10)
            raise Skip("no private mount namespace with a tmpfs here (needs root or "
                       "CAP_SYS_ADMIN): %s" % err.strip())

    def prefix(self):
        return ["nsenter", "-t", str(self.proc.pid), "-m", "--"]

    def remount(self, mode):
        subprocess.run(self.prefix() + ["mount", "-o", "remount,%s" % mode, self.path],
                       check=True, timeout=30)

    def listdir(self, sub):
        """A directory inside the mount, seen through the holder's root."""
        return sorted(os.listdir("/proc/%d/root%s" % (self.proc.pid, os.path.join(self.path, sub))))

    def end(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class NsDaemon(Daemon):
    def __init__(self, mnt, *a, **kw):
        Daemon.__init__(self, *a, **kw)
        self.mnt = mnt

    def args(self):
        return self.mnt.prefix() + Daemon.args(self)


def ns_daemon(root, daemons, mnt, extra=()):
    addr = "127.0.0.1:%d" % free_port()
    d = NsDaemon(mnt, root, tier_dir=os.path.join(mnt.path, "tier"),
                 extra=["--metrics", addr] + list(extra))
    d.metrics_addr = addr
    daemons.append(d)
    return d


def test_readonly_tier(root, daemons):
    """The tier's file system remounted read-only: a Delete still deletes the
    blob, and its file, which cannot be unlinked, is counted, logged, kept in
    the tier's usage and retried until it goes (before: OK, and the file and
    its bytes leaked across clean restarts); a put says the file system is
    read-only (FAILED_PRECONDITION, before: INTERNAL); a stop with a removal
    still pending is not recorded as clean, and the next start removes the
    orphan."""
    mnt = PrivateMount(os.path.join(root, "mnt"))
    try:
        d = ns_daemon(root, daemons, mnt).start()
        a, b, c = d.put(CHAT[0]), d.put(CHAT[2]), d.put(CHAT[0], ns="other")
        used = metric(d, "kvtier_tier_used_bytes", tier=0)
        mnt.remount("ro")
        d.cli("rm", a)
        check(log_has(d, r"level=warn.*event=remove_failed tier=0 name=%s.*Read-only file "
                         r"system.*action=retry_every_second" % a), "event=remove_failed")
        eq(metric(d, "kvtier_remove_failures_total"), 1.0, "kvtier_remove_failures_total")
        eq(metric(d, "kvtier_removals_pending"), 1.0, "kvtier_removals_pending")
        eq(metric(d, "kvtier_tier_blobs", tier=0), 2.0, "blobs on tier 0 (index: 2)")
        eq(metric(d, "kvtier_tier_used_bytes", tier=0), used,
           "the file still takes its bytes until it is removed")
        eq(sorted(x["blob"] for x in d.ls()), sorted([b, c]), "blobs listed")
        r = d.cli("put", "-n", "ns-test", CHAT[1], check_rc=False)
        expect_fail(r, "FAILED_PRECONDITION", "file system is read-only", "remount it read-write")
        # Retried every second: removed once the file system is writable.
        mnt.remount("rw")
        wait_for(lambda: log_has(d, r"event=remove_retried tier=0 name=%s result=removed" % a),
                 "event=remove_retried")
        eq(metric(d, "kvtier_removals_pending"), 0.0, "kvtier_removals_pending after the retry")
        check(a not in mnt.listdir("tier"), "the file of the deleted blob is gone")
        check(metric(d, "kvtier_tier_used_bytes", tier=0) < used, "its bytes are freed")
        # A removal still failing at stop: no clean stop; the next start removes it.
        mnt.remount("ro")
        d.cli("rm", b)
        eq(d.stop(), 0, "exit status")
        check(log_has(d, r"event=clean_stop_skipped files_missing=0 removals_pending=1"),
              "clean stop skipped while a removal is pending")
        mnt.remount("rw")
        d.start()
        check(log_has(d, r"event=reconcile_remove_file tier=0 name=%s" % b),
              "the start removed the orphan")
        check(b not in mnt.listdir("tier"), "no orphan file after the restart")
        eq(mnt.listdir("tier"), [c], "tier files = index")
        eq(metric(d, "kvtier_tier_blobs", tier=0), 1.0, "blobs on tier 0 after the restart")
        d.stop()
    finally:
        for x in daemons:
            x.kill9()
        mnt.end()


def test_enospc_nothing_evicted(root, daemons):
    """A tier file system smaller than the tier's capacity fills mid-upload
    while its only blob is pinned: the refusal says nothing could be evicted
    (before: "blobs were evicted to make room, retry")."""
    mnt = PrivateMount(os.path.join(root, "mnt"), size="1m")
    try:
        d = ns_daemon(root, daemons, mnt, extra=["--probe-size", "64K"])
        d.tier_size = "64M"
        d.start()
        a = make_slot(os.path.join(root, "a.bin"), list(range(256)), row_bytes=1024)
        b = make_slot(os.path.join(root, "b.bin"), list(range(5000, 5256)), row_bytes=1536)
        d.cli("stage", d.put(a), "--dir", d.slot_dir)
        r = d.cli("put", "-n", "ns-test", b, check_rc=False)
        expect_fail(r, "RESOURCE_EXHAUSTED", "ran out of space on its file system",
                    "nothing could be evicted")
        check("blobs were evicted" not in r.err, "no eviction claimed: %r" % r)
        d.stop()
    finally:
        for x in daemons:
            x.kill9()
        mnt.end()


def test_messages(root, daemons):
    """D16: a full tier says what holds its space (here: pinned blobs, and what
    to do about them), not "delete blobs"; a Delete with the index map full
    names MDB_MAP_FULL and --map-size."""
    d = start(root, daemons, tier_size="1M")
    big = [make_slot(os.path.join(root, "big%d.bin" % i), list(range(i * 1000, i * 1000 + 256)),
                     row_bytes=768) for i in range(3)]
    ids = [d.put(big[0]), d.put(big[1])]
    for i in ids:
        d.cli("stage", i, "--dir", d.slot_dir)
    r = d.cli("put", "-n", "ns-test", big[2], check_rc=False)
    expect_fail(r, "RESOURCE_EXHAUSTED", "is full: no room for this blob part",
                "pinned by Fetches in progress or staged leases", "kvtier release")
    check("delete blobs (kvtier rm)" not in r.err, "no advice to delete: %r" % r)
    d.stop()
    # The index map full (1 MiB): a Delete says why and what to do.
    root2 = os.path.join(root, "map")
    os.makedirs(root2)
    d = start(root2, daemons, extra=["--map-size", "1M"])
    first, i = None, 0
    for n_tokens in (131072, 4096, 1024, 256):   # then what smaller records still fit
        for _ in range(100):
            i += 1
            f = make_slot(os.path.join(root2, "s.bin"),
                          list(range(i * 10000, i * 10000 + n_tokens)), row_bytes=4)
            r = d.cli("put", "-n", "ns-test", f, check_rc=False)
            if r.rc:
                expect_fail(r, "RESOURCE_EXHAUSTED", "MDB_MAP_FULL", "--map-size")
                break
            first = first or r.out.strip()
        else:
            raise Failure("100 puts did not fill a 1 MiB index map")
    r = d.cli("rm", first, check_rc=False)
    expect_fail(r, "RESOURCE_EXHAUSTED", "index map is full (MDB_MAP_FULL",
                "restart kvtierd with a larger --map-size")
    d.stop()


if __name__ == "__main__":
    tests = [test_report_bounds, test_tier_dir_removed, test_tier_dir_moved, test_readonly_tier,
             test_enospc_nothing_evicted, test_messages]
    if len(sys.argv) > 1:
        tests = [t for t in tests if t.__name__ in sys.argv[1:]]
    run(tests)
