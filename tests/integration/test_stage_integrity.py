"""Stage hands out only bytes that match their CRC, and Adopt takes only inodes nobody else can
change (review D7, D8).

- A byte flipped in a tmpfs tier file (never staged, or staged and released before): Stage
  refuses with DATA_LOSS, drops the blob and leaves nothing in the slot directory.
- Adopt of a slot file with a second name (the llama-server user keeps `own-keep.bin`, the
  review's D7 repro) or of another user's file linked into the slot directory (D8, a confused
  deputy when kvtierd is root): refused, the file's owner and mode untouched.
- An adopted inode can no longer be changed by the slot directory's owner: no chmod, no open
  for writing through the staged name; one they hold open for writing while it is adopted is
  copied, so their later writes never reach what Stage serves.

The slot directory's owner (llama-server's user) is simulated by uid/gid 65534 (children that
call setuid); without root the test reports a skip.
"""
import mmap
import os
import select
import shutil
import stat
import subprocess
import sys

from harness import Daemon, Skip, check, eq, expect_fail, fixture, run, sha256

OTHER = 65534  # the slot directory's owner: llama-server's user
CHILD_TIMEOUT = 30
# The children run as OTHER: an interpreter every user may run (ctest may run this test with
# one under root's home, e.g. pyenv's).
OTHER_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def drop_to_other():
    os.setgid(OTHER)
    os.setuid(OTHER)


def spawn_as_other(code, *argv, **kw):
    """Popen of python code as uid/gid OTHER; a skip when that user cannot run Python."""
    try:
        return subprocess.Popen([OTHER_PYTHON, "-c", code] + list(argv), preexec_fn=drop_to_other,
                                **kw)
    except PermissionError as e:
        raise Skip("uid %d cannot run %s: %s" % (OTHER, OTHER_PYTHON, e))


def start(root, daemons, owner=None):
    d = Daemon(root)
    if owner is not None:
        if os.geteuid() != 0:
            raise Skip("needs root to act as a second user (uid %d)" % owner)
        os.chmod(root, 0o711)  # the other user reaches the slot dir, not the tier dir
        os.chown(d.slot_dir, owner, owner)
    daemons.append(d)
    return d.start()


def staged_names(d):
    return sorted(n for n in os.listdir(d.slot_dir) if n.startswith("kvtier-"))


def flip_byte(path, off):
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))


def as_other(code, *argv):
    """Runs python code as uid/gid OTHER; returns (returncode, stdout, stderr)."""
    p = spawn_as_other(code, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=CHILD_TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, out, err


def own_copy(d, name, src, mode=0o644, owner=OTHER):
    """A slot file saved by the slot dir's owner."""
    p = os.path.join(d.slot_dir, name)
    shutil.copy(src, p)
    os.chown(p, owner, owner)
    os.chmod(p, mode)
    return p


def test_stage_refuses_flipped_byte(root, daemons):
    d = start(root, daemons)
    a_src, b_src = fixture("v2/chat-a-turn1.bin"), fixture("v2/chat-b-turn1.bin")
    a, b = d.put(a_src), d.put(b_src)
    # A healthy blob is staged by hard link, byte for byte.
    st = d.cli("stage", a, "--dir", d.slot_dir, "--json").json()
    eq(st["copied"], False, "tmpfs stage is a link")
    eq(os.stat(st["path"]).st_ino, os.stat(os.path.join(d.tier_dir, a)).st_ino, "same inode")
    eq(sha256(st["path"]), sha256(a_src), "staged bytes")
    d.cli("release", st["lease"])
    # One byte flipped in each tier file: a, staged (and checked) before; b, never staged.
    for blob in (a, b):
        flip_byte(os.path.join(d.tier_dir, blob), 2000)
    for blob in (a, b):
        r = d.cli("stage", blob, "--dir", d.slot_dir, "--json", check_rc=False)
        expect_fail(r, "DATA_LOSS", "failed its checksum", "dropped", "nothing of it was staged")
        eq(staged_names(d), [], "nothing staged of damaged blob %s" % blob)
        check(blob not in [x["blob"] for x in d.ls()], "damaged blob %s dropped" % blob)
        check(not os.path.exists(os.path.join(d.tier_dir, blob)), "its tier file removed")
    log = d.read_log()
    eq(log.count("event=checksum_mismatch"), 2, "two checksum failures logged")
    check("during=stage" in log, "logged as found by a stage: %s" % log[-2000:])
    eq(d.stop(), 0, "clean stop")
    r = d.fsck(verify=True)
    eq(r.rc, 0, "fsck --verify clean afterwards: %r" % r)


def test_adopt_refuses_second_name(root, daemons):
    """The review's D7 repro: the owner keeps a second link, adopts, then rewrites."""
    d = start(root, daemons, owner=OTHER)
    src = fixture("v2/chat-a-turn1.bin")
    own = own_copy(d, "own.bin", src)
    keep = os.path.join(d.slot_dir, "own-keep.bin")
    os.link(own, keep)
    before = os.stat(keep)
    r = d.cli("adopt", "--namespace", "ns-test", own, check_rc=False)
    expect_fail(r, "PERMISSION_DENIED", "has 2 names", "single name")
    after = os.stat(keep)
    eq((after.st_uid, stat.S_IMODE(after.st_mode), after.st_nlink),
       (before.st_uid, stat.S_IMODE(before.st_mode), 2), "second name untouched")
    check(os.path.exists(own), "refused source left in place")
    eq(d.ls(), [], "nothing stored")
    eq(os.listdir(d.tier_dir), [], "nothing in the tier")


def test_adopt_refuses_other_users_file(root, daemons):
    """D8: a user with write access to the slot dir links a root file that is a slot file."""
    d = start(root, daemons, owner=OTHER)
    for mode in (0o666, 0o600):
        victim = os.path.join(root, "victim-%o.bin" % mode)
        shutil.copy(fixture("v2/chat-a-turn1.bin"), victim)
        os.chown(victim, 0, 0)
        os.chmod(victim, mode)
        link = os.path.join(d.slot_dir, "linked-%o.bin" % mode)
        os.link(victim, link)
        r = d.cli("adopt", "--namespace", "ns-test", link, check_rc=False)
        expect_fail(r, "PERMISSION_DENIED", "belongs to uid 0, not to uid %d" % OTHER)
        v = os.stat(victim)
        eq((v.st_uid, stat.S_IMODE(v.st_mode)), (0, mode), "victim's owner and mode")
        # With a single name (moved in rather than linked) it is refused all the same.
        os.unlink(victim)
        r = d.cli("adopt", "--namespace", "ns-test", link, check_rc=False)
        expect_fail(r, "PERMISSION_DENIED", "belongs to uid 0")
        eq(stat.S_IMODE(os.stat(link).st_mode), mode, "mode untouched")
    eq(d.ls(), [], "nothing stored")
    eq(os.listdir(d.tier_dir), [], "nothing in the tier")


REWRITE = r"""
import os, sys
path = sys.argv[1]
res = []
try:
    os.chmod(path, 0o640)
    res.append("chmod")
except PermissionError:
    pass
try:
    with open(path, "r+b") as f:
        f.seek(2000)
        f.write(b"XXXXXXXX")
    res.append("write")
except PermissionError:
    pass
print(",".join(res) or "none")
"""


def test_adopted_inode_not_rewritable(root, daemons):
    """After Adopt the former owner cannot change the stored inode through a staged name."""
    d = start(root, daemons, owner=OTHER)
    src = fixture("v2/chat-b-turn1.bin")
    own = own_copy(d, "own.bin", src)
    blob = d.cli("adopt", "--namespace", "ns-test", own).out.strip()
    tier_ino = os.stat(os.path.join(d.tier_dir, blob)).st_ino
    st = d.cli("stage", blob, "--dir", d.slot_dir, "--json").json()
    eq(os.stat(st["path"]).st_ino, tier_ino, "linked in and out, no copy")
    # The former owner tries chmod and a write through the staged name.
    rc, out, err = as_other(REWRITE, st["path"])
    eq(rc, 0, "child ran: %r" % err)
    d.cli("release", st["lease"])
    r = d.cli("stage", blob, "--dir", d.slot_dir, "--json", check_rc=False)
    eq(r.rc, 0, "stage after the attempt: %r" % r)
    eq(sha256(r.json()["path"]), sha256(src), "staged bytes are the adopted ones")
    eq(out.decode().strip(), "none", "what the former owner could do to the stored inode")
    tier_file = os.stat(os.path.join(d.tier_dir, blob))
    eq(tier_file.st_uid, os.geteuid(), "adopted inode given to the daemon's user")
    eq(tier_file.st_gid, OTHER, "its group kept (llama-server reads it)")
    eq(stat.S_IMODE(tier_file.st_mode), 0o440, "read-only")


HOLDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print("open", flush=True)
sys.stdin.readline()
os.pwrite(fd, b"XXXXXXXX", 2000)
os.close(fd)
print("written", flush=True)
"""


def test_adopt_copies_file_open_for_writing(root, daemons):
    """A writable descriptor the owner holds while the file is adopted: a copy is stored."""
    d = start(root, daemons, owner=OTHER)
    src = fixture("v2/chat-b-turn1.bin")
    own = own_copy(d, "own.bin", src)
    ino = os.stat(own).st_ino

    holder = spawn_as_other(HOLDER, own, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([holder.stdout], [], [], CHILD_TIMEOUT)
        check(ready, "the holder answers within %d s" % CHILD_TIMEOUT)
        eq(holder.stdout.readline().strip(), b"open", "holder has the file open for writing")
        blob = d.cli("adopt", "--namespace", "ns-test", own).out.strip()
        check(os.stat(os.path.join(d.tier_dir, blob)).st_ino != ino,
              "the inode open for writing is copied, not linked")
        check("event=adopt_copied" in d.read_log() and "open for writing" in d.read_log(),
              "the copy is logged with its reason")
        out, _ = holder.communicate(b"go\n", timeout=CHILD_TIMEOUT)
        eq(out.strip(), b"written", "holder wrote through its descriptor")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    st = d.cli("stage", blob, "--dir", d.slot_dir, "--json").json()
    eq(sha256(st["path"]), sha256(src), "staged bytes are those adopted, not the later write")


def test_foreign_tier_file_never_linked(root, daemons):
    """A tier file another user can write (an inode an older kvtierd adopted as it was) is
    copied out through the CRC check, never linked: its owner could change it through a
    mapping, which leaves no trace in its times. fsck names it."""
    if os.geteuid() != 0:
        raise Skip("needs root to give a tier file to another user (uid %d)" % OTHER)
    d = start(root, daemons)
    src = fixture("v2/chat-a-turn1.bin")
    blob = d.put(src)
    tier_file = os.path.join(d.tier_dir, blob)
    os.chown(tier_file, OTHER, OTHER)
    os.chmod(tier_file, 0o640)
    r = d.fsck()
    eq(r.rc, 1, "fsck finds the foreign tier file: %r" % r)
    check(blob in r.out and "owned by uid %d" % OTHER in r.out, "fsck names it: %r" % r)
    fd = os.open(tier_file, os.O_RDWR)
    m = mmap.mmap(fd, os.path.getsize(tier_file))
    try:
        m[2000] = m[2000]  # a writable mapping, established (this first write stamps mtime)
        st = d.cli("stage", blob, "--dir", d.slot_dir, "--json").json()
        eq(sha256(st["path"]), sha256(src), "staged bytes")
        eq(st["copied"], True, "a foreign tier file is copied out, not linked")
        d.cli("release", st["lease"])
        m[2000] = m[2000] ^ 0xFF  # through the mapping: no time changes
        r = d.cli("stage", blob, "--dir", d.slot_dir, "--json", check_rc=False)
        expect_fail(r, "DATA_LOSS", "failed its checksum")
        eq(staged_names(d), [], "nothing staged")
    finally:
        m.close()
        os.close(fd)


if __name__ == "__main__":
    run([test_stage_refuses_flipped_byte, test_adopt_refuses_second_name,
         test_adopt_refuses_other_users_file, test_adopted_inode_not_rewritable,
         test_adopt_copies_file_open_for_writing, test_foreign_tier_file_never_linked])
