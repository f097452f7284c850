#!/usr/bin/env python3
"""The store end to end: real kvtierd, real CLI, real llama-server slot files."""
import json
import os
import re
import tempfile
import shutil
import stat
import subprocess
import threading

from harness import (KVTIER, Daemon, check, eq, expect_fail, fixture, opaque_copy, run,
                     sha256, slot_tokens)


def start(root, daemons, **kw):
    d = Daemon(root, **kw)
    daemons.append(d)
    return d.start()


def fsck_clean(d):
    r = d.fsck()
    check(r.rc == 0, "fsck not clean: %r" % r)


def test_lookup_prefix(root, daemons):
    d = start(root, daemons)
    blob = d.put(fixture("v2/chat-a-turn1.bin"))
    eq(len(blob), 64, "blob id length")
    m = d.lookup(fixture("v2/chat-a-turn1.bin"))
    eq(m["blob"], blob, "self lookup blob")
    eq(m["matched_tokens"], 274, "self lookup matched")
    eq(m["n_tokens"], 274, "n_tokens")
    eq(m["tier"], "tmpfs", "tier")
    m = d.lookup(fixture("v2/chat-b-turn1.bin"))
    eq(m["blob"], blob, "chat-b finds chat-a")
    check(192 <= m["matched_tokens"] <= 225, "chat-b matched %d" % m["matched_tokens"])
    # The daemon compares the token arrays: it finds exactly the 225 shared tokens.
    a, b = slot_tokens(fixture("v2/chat-a-turn1.bin")), slot_tokens(fixture("v2/chat-b-turn1.bin"))
    shared = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
    eq(m["matched_tokens"], shared, "token-exact match")
    # A miss prints "blob": null.
    m = d.lookup(fixture("v2/chat-a-turn1.bin"), ns="other")
    eq(m["blob"], None, "miss in another namespace")
    eq(m["matched_tokens"], 0, "miss matched")
    fsck_clean(d)


def test_supersede_and_get(root, daemons):
    d = start(root, daemons)
    t1 = d.put(fixture("v2/chat-a-turn1.bin"))
    t2 = d.put(fixture("v2/chat-a-turn2.bin"))
    check(t1 != t2, "distinct ids")
    ids = [b["blob"] for b in d.ls()]
    eq(ids, [t2], "turn 1 superseded, only turn 2 left")
    m = d.lookup(fixture("v2/chat-a-turn1.bin"))
    eq(m["blob"], t2, "lookup with turn 1 tokens returns turn 2")
    eq(m["matched_tokens"], 274, "turn 1 fully matched inside turn 2")
    out = os.path.join(root, "got.bin")
    d.cli("get", t2, "-o", out)
    eq(sha256(out), sha256(fixture("v2/chat-a-turn2.bin")), "get returns turn 2's bytes")
    # The superseded blob's file is gone from the tier too.
    eq([f for f in d.tier_files() if f.startswith(t1)], [], "turn 1 files removed")
    r = d.cli("get", t1, "-o", out + "2", check_rc=False)
    expect_fail(r, "NOT_FOUND")
    check(not os.path.exists(out + "2"), "failed get leaves no file")
    fsck_clean(d)


def test_no_supersede(root, daemons):
    d = start(root, daemons, extra=["--no-supersede"])
    t1 = d.put(fixture("v2/chat-a-turn1.bin"))
    t2 = d.put(fixture("v2/chat-a-turn2.bin"))
    eq(sorted(b["blob"] for b in d.ls()), sorted([t1, t2]), "both kept")
    # Longest match wins: a lookup with turn 2's tokens returns turn 2.
    eq(d.lookup(fixture("v2/chat-a-turn2.bin"))["blob"], t2, "turn 2 lookup")


def test_dedup(root, daemons):
    d = start(root, daemons)
    a = d.put(fixture("v2/chat-a-turn1.bin"))
    r = d.cli("put", "--namespace", "ns-test", fixture("v2/chat-a-turn1.bin"))
    eq(r.out.strip(), a, "same id for identical content")
    eq(len(d.ls()), 1, "one blob stored")
    eq(len([f for f in d.tier_files()]), 1, "one file on the tier")
    s = d.cli("stats", "--json").json()
    eq(s["blobs"], 1, "stats blobs")
    eq(s["dedups"], 1, "stats dedups")


def test_refusals(root, daemons):
    d = start(root, daemons)
    r = d.cli("put", "--namespace", "ns-test", fixture("v2/empty.bin"), check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", "empty")
    src = open(fixture("v2/chat-a-turn1.bin"), "rb").read()
    trunc = os.path.join(root, "trunc.bin")
    open(trunc, "wb").write(src[:len(src) - 1000])
    r = d.cli("put", "--namespace", "ns-test", trunc, check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", "truncated")
    bad = os.path.join(root, "badmagic.bin")
    open(bad, "wb").write(b"GGUF" + src[4:])
    r = d.cli("put", "--namespace", "ns-test", bad, check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", "magic")
    r = d.cli("put", "--namespace", "bad\x01name", fixture("v2/chat-a-turn1.bin"), check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", "namespace")
    r = d.cli("put", "--namespace", "n" * 256, fixture("v2/chat-a-turn1.bin"), check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", "namespace")
    eq(d.ls(), [], "nothing indexed after refusals")
    eq(d.tier_files(), [], "nothing left on the tier after refusals")
    # A flash-attention (v_trans = 0) file into a namespace of v_trans = 1 files.
    d.put(fixture("v2/chat-a-turn1.bin"), ns="model-x")
    r = d.cli("put", "--namespace", "model-x", fixture("v2-flash-attn/chat-b-turn1.bin"),
              check_rc=False)
    expect_fail(r, "FAILED_PRECONDITION", "v_trans")
    r = d.cli("put", "--namespace", "model-x", fixture("v2-q8/chat-b-turn1.bin"), check_rc=False)
    expect_fail(r, "FAILED_PRECONDITION")
    eq(len(d.ls()), 1, "only the first blob stored")
    eq(len(d.tier_files()), 1, "only the first blob's file on the tier")
    s = d.cli("stats", "--json").json()
    eq(s["blobs"], 1, "stats blobs after refusals")
    fsck_clean(d)


def test_namespaces_isolated(root, daemons):
    d = start(root, daemons)
    a = d.put(fixture("v2/chat-a-turn1.bin"), ns="model-a")
    b = d.put(fixture("v2/chat-a-turn1.bin"), ns="model-b")
    check(a != b, "same tokens in two namespaces are two blobs")
    eq(d.lookup(fixture("v2/chat-a-turn1.bin"), ns="model-a")["blob"], a, "ns a")
    eq(d.lookup(fixture("v2/chat-a-turn1.bin"), ns="model-b")["blob"], b, "ns b")
    d.cli("rm", a)
    eq(d.lookup(fixture("v2/chat-a-turn1.bin"), ns="model-a")["blob"], None, "ns a emptied")
    eq(d.lookup(fixture("v2/chat-a-turn1.bin"), ns="model-b")["blob"], b, "ns b untouched")
    eq([x["blob"] for x in d.ls(ns="model-b")], [b], "ls --namespace")
    fsck_clean(d)


def test_v4_sidecar(root, daemons):
    d = start(root, daemons)
    blob = d.put(fixture("v4-ik/chat-a-turn1.bin"), ns="ik")
    info = [b for b in d.ls() if b["blob"] == blob][0]
    eq(info["sidecars"], [".tokens.json"], "sidecar recorded")
    eq(info["version"], 4, "header version")
    out = os.path.join(root, "out.bin")
    d.cli("get", blob, "-o", out)
    eq(sha256(out), sha256(fixture("v4-ik/chat-a-turn1.bin")), "slot file bytes")
    eq(sha256(out + ".tokens.json"), sha256(fixture("v4-ik/chat-a-turn1.bin.tokens.json")),
       "sidecar bytes")
    st = d.cli("stage", blob, "--dir", d.slot_dir, "--json").json()
    staged = os.path.join(d.slot_dir, st["filename"])
    eq(sha256(staged), sha256(fixture("v4-ik/chat-a-turn1.bin")), "staged slot file")
    eq(sha256(staged + ".tokens.json"),
       sha256(fixture("v4-ik/chat-a-turn1.bin.tokens.json")), "staged sidecar")
    d.cli("release", st["lease"])
    check(not os.path.exists(staged), "release removes the staged file")
    check(not os.path.exists(staged + ".tokens.json"), "release removes the staged sidecar")
    fsck_clean(d)


def test_stage_and_adopt(root, daemons):
    d = start(root, daemons)
    blob = d.put(fixture("v2/chat-a-turn1.bin"))
    st = d.cli("stage", blob, "--dir", d.slot_dir, "--json").json()
    staged = os.path.join(d.slot_dir, st["filename"])
    eq(os.path.dirname(st["path"]), os.path.realpath(d.slot_dir), "staged in the slot dir")
    check(st["filename"].startswith("kvtier-") and "/" not in st["filename"], "daemon name")
    tier_file = os.path.join(d.tier_dir, blob)
    eq(os.stat(staged).st_ino, os.stat(tier_file).st_ino, "hard link, no copy")
    d.cli("rm", blob)
    check(os.path.exists(staged), "staged file survives the blob's deletion")
    eq(sha256(staged), sha256(fixture("v2/chat-a-turn1.bin")), "bytes intact after delete")
    d.cli("release", st["lease"])
    check(not os.path.exists(staged), "release removes it")
    r = d.cli("release", st["lease"], check_rc=False)
    expect_fail(r, "NOT_FOUND")
    # Stage outside the allowed slot dirs is refused.
    blob = d.put(fixture("v2/chat-a-turn1.bin"))
    other = os.path.join(root, "elsewhere")
    os.mkdir(other)
    r = d.cli("stage", blob, "--dir", other, check_rc=False)
    expect_fail(r, "PERMISSION_DENIED", "slot")
    d.cli("rm", blob)
    # Adopt: a file "llama-server saved" into the slot dir is indexed under its tokens.
    saved = os.path.join(d.slot_dir, "slot0-save.bin")
    shutil.copy(fixture("v2/chat-b-turn1.bin"), saved)
    adopted = d.cli("adopt", "--namespace", "ns-test", saved).out.strip()
    check(not os.path.exists(saved), "adopt takes the file (source name removed)")
    m = d.lookup(fixture("v2/chat-b-turn1.bin"))
    eq(m["blob"], adopted, "adopted blob found by its tokens")
    eq(m["matched_tokens"], 268, "all tokens")
    out = os.path.join(root, "adopted.bin")
    d.cli("get", adopted, "-o", out)
    eq(sha256(out), sha256(fixture("v2/chat-b-turn1.bin")), "adopted bytes")
    # Adopt refuses symlinks and paths outside the slot dirs.
    link = os.path.join(d.slot_dir, "link.bin")
    os.symlink(fixture("v2/chat-a-turn1.bin"), link)
    r = d.cli("adopt", "--namespace", "ns-test", link, check_rc=False)
    expect_fail(r, "PERMISSION_DENIED")
    outside = os.path.join(other, "x.bin")
    shutil.copy(fixture("v2/chat-a-turn1.bin"), outside)
    r = d.cli("adopt", "--namespace", "ns-test", outside, check_rc=False)
    expect_fail(r, "PERMISSION_DENIED")
    # A bad file adopted is refused and stays where it was.
    bad = os.path.join(d.slot_dir, "empty.bin")
    shutil.copy(fixture("v2/empty.bin"), bad)
    r = d.cli("adopt", "--namespace", "ns-test", bad, check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", "empty")
    check(os.path.exists(bad), "refused source left in place")
    fsck_clean(d)


def n_written(folder, name):
    """The size llama-server reported for its save of folder/name.bin (n_written)."""
    m = json.load(open(fixture(folder + "/manifest.json")))
    n = m[name]["save"]["n_written"]
    eq(os.path.getsize(fixture("%s/%s.bin" % (folder, name))), n, "fixture size = n_written")
    return n


def cut_copy(src, dst, keep):
    """What a crash during llama-server's in-place save leaves: the first bytes,
    header and tokens whole."""
    data = open(src, "rb").read()
    open(dst, "wb").write(data[:keep])
    return dst


def test_put_reported_size(root, daemons):
    d = start(root, daemons)
    src = fixture("v2-2026/chat-a-turn1.bin")
    n = n_written("v2-2026", "chat-a-turn1")
    # The server reported another size: refused, both sizes named, nothing stored.
    for wrong in (n + 1, n - 1):
        r = d.cli("put", "--namespace", "ns-test", "--expect-size", str(wrong), src,
                  check_rc=False)
        expect_fail(r, "INVALID_ARGUMENT", str(n), str(wrong), "reported")
    # A save cut short keeps a valid header: the reported size catches it.
    cut = cut_copy(src, os.path.join(root, "cut.bin"), n - 4096)
    r = d.cli("put", "--namespace", "ns-test", "--expect-size", str(n), cut, check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", str(n - 4096), str(n))
    # An ik_llama.cpp file the same way, sidecar and all.
    ik = os.path.join(root, "ik.bin")
    shutil.copy(fixture("v4-ik/chat-a-turn1.bin.tokens.json"), ik + ".tokens.json")
    ik_size = os.path.getsize(fixture("v4-ik/chat-a-turn1.bin"))
    cut_copy(fixture("v4-ik/chat-a-turn1.bin"), ik, ik_size - 100)
    r = d.cli("put", "--namespace", "ik", "--expect-size", str(ik_size), ik, check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", str(ik_size - 100), str(ik_size))
    eq(d.ls(), [], "nothing indexed after wrong sizes")
    eq(d.tier_files(), [], "nothing left on the tier after wrong sizes")
    r = d.cli("put", "--namespace", "ns-test", "--expect-size", "0", src, check_rc=False)
    eq(r.rc, 2, "--expect-size 0 is a usage error: %r" % r)
    # The right size: stored, and recorded as what it is.
    blob = d.cli("put", "--namespace", "ns-test", "--expect-size", str(n), src).out.strip()
    eq([b["blob"] for b in d.ls()], [blob], "stored with the right size")
    b = d.ls()[0]
    eq((b["version"], b["state"], b["token_form"], b["media_cut"], b["n_tokens"]),
       (2, "kv", "plain", False, 274), "state of a v2-2026 file")
    # Without --expect-size nothing is checked: the old behaviour.
    blob2 = d.put(fixture("v4-ik/chat-a-turn1.bin"), ns="ik")
    eq(len(d.ls()), 2, "put without a reported size")
    eq([x["blob"] for x in d.ls(ns="ik")], [blob2], "ik blob listed")
    fsck_clean(d)


def test_adopt_reported_size(root, daemons):
    d = start(root, daemons)
    src = fixture("v2-2026-packed/chat-a-turn1.bin")
    n = n_written("v2-2026-packed", "chat-a-turn1")
    saved = os.path.join(d.slot_dir, "slot0.bin")
    shutil.copy(src, saved)
    r = d.cli("adopt", "--namespace", "ns-test", "--expect-size", str(n + 16), saved,
              check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", str(n), str(n + 16), "reported")
    eq(sha256(saved), sha256(src), "refused source left in place, untouched")
    # A save cut short by a crash (llama-server writes in place, no fsync).
    cut = cut_copy(src, os.path.join(d.slot_dir, "slot1.bin"), n - 1000)
    r = d.cli("adopt", "--namespace", "ns-test", "--expect-size", str(n), cut, check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", str(n - 1000), str(n))
    check(os.path.exists(cut), "refused cut file left in place")
    eq(d.ls(), [], "nothing indexed after wrong sizes")
    eq(d.tier_files(), [], "nothing left on the tier after wrong sizes")
    # The right size: taken, the source name removed.
    blob = d.cli("adopt", "--namespace", "ns-test", "--expect-size", str(n), saved).out.strip()
    check(not os.path.exists(saved), "adopted source name removed")
    b = d.ls()[0]
    eq(b["blob"], blob, "adopted blob listed")
    eq((b["version"], b["state"], b["token_form"], b["media_cut"], b["n_tokens"]),
       (2, "kv", "packed", False, 274), "state of a packed file")
    m = d.lookup(fixture("v2-2026/chat-a-turn1.bin"))
    eq((m["blob"], m["matched_tokens"]), (blob, 274),
       "a packed file is found by the tokens of a plain one")
    out = os.path.join(root, "out.bin")
    d.cli("get", blob, "-o", out)
    eq(sha256(out), sha256(src), "adopted bytes")
    # Adopt with the right size of an ik_llama.cpp file and its sidecar.
    ik = os.path.join(d.slot_dir, "ik.bin")
    shutil.copy(fixture("v4-ik/chat-a-turn1.bin"), ik)
    shutil.copy(fixture("v4-ik/chat-a-turn1.bin.tokens.json"), ik + ".tokens.json")
    r = d.cli("adopt", "--namespace", "ik", "--expect-size", str(os.path.getsize(ik) - 1), ik,
              check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT")
    check(os.path.exists(ik + ".tokens.json"), "refused sidecar left in place")
    blob = d.cli("adopt", "--namespace", "ik", "--expect-size", str(os.path.getsize(ik)),
                 ik).out.strip()
    eq([x["sidecars"] for x in d.ls(ns="ik")], [[".tokens.json"]], "sidecar adopted")
    check(not os.path.exists(ik + ".tokens.json"), "adopted sidecar name removed")
    fsck_clean(d)


# (folder, namespace, version, state, token_form) of the real files.
STATES = [
    ("v2", "feb-2025", 2, "kv-2025", "plain"),
    ("v2-2026", "mid-2026", 2, "kv", "plain"),
    ("v2-2026-packed", "packed", 2, "kv", "packed"),
    ("v2-2026-iswa", "iswa", 2, "kv", "plain"),
    ("v2-2026-recurrent", "recurrent", 2, "recurrent", "plain"),
    ("v3-2026-10", "lib-v3", 3, "kv", "plain"),
    ("v3-2026-10-recurrent", "lib-v3-recurrent", 3, "recurrent", "plain"),
]


def test_states_listed(root, daemons):
    d = start(root, daemons)
    want = {}
    for folder, ns, version, state, form in STATES:
        blob = d.put(fixture(folder + "/chat-a-turn1.bin"), ns=ns)
        want[blob] = (ns, version, state, form, False)
    # A state of no known layout is stored as it is, and says so.
    odd = opaque_copy(fixture("v2-2026/chat-a-turn1.bin"), os.path.join(root, "odd.bin"), 3)
    blob = d.put(odd, ns="odd")
    want[blob] = ("odd", 3, "opaque", "plain", False)
    odd_pk = opaque_copy(fixture("v2-2026-packed/chat-a-turn1.bin"),
                         os.path.join(root, "odd-packed.bin"), 2)
    blob = d.put(odd_pk, ns="odd-packed")
    want[blob] = ("odd-packed", 2, "opaque", "packed", False)
    # ik_llama.cpp: version 4, its state one of the known ones or opaque.
    ik = d.put(fixture("v4-ik/chat-a-turn1.bin"), ns="ik")
    got = {b["blob"]: (b["namespace"], b["version"], b["state"], b["token_form"],
                       b["media_cut"]) for b in d.ls()}
    check(got.pop(ik, (None,) * 5)[1:3] in [(4, k) for k in
                                             ("opaque", "kv-2025", "kv", "recurrent", "hybrid")],
          "v4 file listed with a state")
    eq(got, want, "ls --json: version, state, token_form, media_cut per blob")
    # The human table has a STATE column.
    lines = d.cli("ls").out.splitlines()
    check("STATE" in lines[0].split(), "STATE column: %r" % lines[0])
    shown = {line.split()[0]: line.split()[2] for line in lines[1:]}
    for blob, (ns, _, state, form, _) in want.items():
        eq(shown[blob], state + (",packed" if form == "packed" else ""), "STATE of %s" % ns)
    # Version 3 files are looked up like any other.
    a = slot_tokens(fixture("v3-2026-10/chat-a-turn1.bin"))
    b = slot_tokens(fixture("v3-2026-10/chat-b-turn1.bin"))
    shared = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
    m = d.lookup(fixture("v3-2026-10/chat-b-turn1.bin"), ns="lib-v3")
    eq((m["blob"] is not None, m["matched_tokens"]), (True, shared), "v3 lookup")
    # The namespace's recorded layout guards opaque files both ways.
    odd_b = opaque_copy(fixture("v2-2026/chat-b-turn1.bin"), os.path.join(root, "odd-b.bin"), 3)
    r = d.cli("put", "--namespace", "mid-2026", odd_b, check_rc=False)
    expect_fail(r, "FAILED_PRECONDITION", "opaque")
    r = d.cli("put", "--namespace", "odd", fixture("v2-2026/chat-b-turn1.bin"), check_rc=False)
    expect_fail(r, "FAILED_PRECONDITION", "opaque")
    eq(len(d.ls()), len(want) + 1, "nothing stored across layouts")
    d.put(odd_b, ns="odd")
    eq(len(d.ls(ns="odd")), 2, "an opaque file of the same version into its namespace")
    fsck_clean(d)


# The folders of slot files (models/ holds the GGUF models that wrote them).
FOLDERS = sorted(f for f in os.listdir(fixture(".")) if os.path.isfile(fixture(f + "/chat-a-turn1.bin")))


def test_every_folder(root, daemons):
    """Every fixture folder, old and new, through the store: put with the size the server
    reported, lookup (chat B shares exactly its 225 first tokens with chat A), supersession
    where turn 2 extends turn 1 (the micro model's folders; the iswa and recurrent models
    generate other tokens), get and stage byte for byte, adopt, and the empty save refused."""
    d = start(root, daemons, tier_size="256M")
    eq(len(FOLDERS), 15, "fifteen folders: %r" % FOLDERS)
    for folder in FOLDERS:
        ns = "every-" + folder
        f = {n: fixture("%s/%s.bin" % (folder, n))
             for n in ("chat-a-turn1", "chat-a-turn2", "chat-b-turn1", "empty")}
        toks = {n: slot_tokens(f[n]) for n in f if n != "empty"}
        a1 = d.cli("put", "--namespace", ns, "--expect-size",
                   str(os.path.getsize(f["chat-a-turn1"])), f["chat-a-turn1"]).out.strip()
        m = d.lookup(f["chat-b-turn1"], ns=ns)
        eq((m["blob"], m["matched_tokens"]), (a1, 225), "%s: chat B finds chat A" % folder)
        extends = toks["chat-a-turn2"][:274] == toks["chat-a-turn1"]
        eq(extends, folder not in ("v2-2026-iswa", "v2-2026-iswa-swafull",
                                   "v2-2026-recurrent", "v3-2026-10-iswa",
                                   "v3-2026-10-recurrent"), "%s: turn 2 extends turn 1" % folder)
        a2 = d.put(f["chat-a-turn2"], ns=ns)
        b1 = d.put(f["chat-b-turn1"], ns=ns)
        listed = sorted(b["blob"] for b in d.ls(ns=ns))
        eq(listed, sorted([a2, b1] + ([] if extends else [a1])),
           "%s: supersession as the README says" % folder)
        m = d.lookup(f["chat-a-turn1"], ns=ns)
        eq(m["blob"], a2 if extends else a1, "%s: turn 1's tokens find the longest" % folder)
        eq(m["matched_tokens"], 274, "%s: all 274 tokens" % folder)
        for blob, src in ((a2, f["chat-a-turn2"]), (b1, f["chat-b-turn1"])):
            out = os.path.join(root, "got.bin")
            d.cli("get", blob, "-o", out)
            eq(sha256(out), sha256(src), "%s: get returns the bytes" % folder)
            if os.path.exists(src + ".tokens.json"):
                eq(sha256(out + ".tokens.json"), sha256(src + ".tokens.json"),
                   "%s: the sidecar comes with it" % folder)
            st = d.cli("stage", blob, "--dir", d.slot_dir, "--json").json()
            eq(sha256(st["path"]), sha256(src), "%s: staged bytes" % folder)
            d.cli("release", st["lease"])
        # Adopt a copy, as the plugin does after a save, with the reported size.
        saved = os.path.join(d.slot_dir, "save-%s.bin" % folder)
        shutil.copy(f["chat-b-turn1"], saved)
        if os.path.exists(f["chat-b-turn1"] + ".tokens.json"):
            shutil.copy(f["chat-b-turn1"] + ".tokens.json", saved + ".tokens.json")
        adopted = d.cli("adopt", "--namespace", ns + "-adopt", "--expect-size",
                        str(os.path.getsize(saved)), saved).out.strip()
        eq(d.lookup(f["chat-b-turn1"], ns=ns + "-adopt")["blob"], adopted,
           "%s: adopted and found" % folder)
        r = d.cli("put", "--namespace", ns, f["empty"], check_rc=False)
        expect_fail(r, "INVALID_ARGUMENT", "empty")
    fsck_clean(d)


def test_layouts_never_cross(root, daemons):
    """v2-2026 (V transposed) and v2-2026-fa (flash attention) hold the same tokens: a
    namespace holds one of the two layouts, and a lookup in the other's never offers it."""
    d = start(root, daemons)
    x = d.put(fixture("v2-2026/chat-a-turn1.bin"), ns="mid-fa-off")
    r = d.cli("put", "--namespace", "mid-fa-off", fixture("v2-2026-fa/chat-b-turn1.bin"),
              check_rc=False)
    expect_fail(r, "FAILED_PRECONDITION", "layout")
    y = d.put(fixture("v2-2026-fa/chat-a-turn1.bin"), ns="mid-fa-on")
    check(x != y, "different files, different blobs")
    for ns, want in (("mid-fa-off", x), ("mid-fa-on", y)):
        for folder in ("v2-2026", "v2-2026-fa"):
            m = d.lookup(fixture(folder + "/chat-b-turn1.bin"), ns=ns)
            eq(m["blob"], want, "only %s's own layout is offered" % ns)
    # The same goes for the stream count (v2-2026-kvu: one stream) and the token form.
    for folder in ("v2-2026-kvu", "v2-2026-packed", "v3-2026-10"):
        r = d.cli("put", "--namespace", "mid-fa-on", fixture(folder + "/chat-b-turn1.bin"),
                  check_rc=False)
        expect_fail(r, "FAILED_PRECONDITION", "layout")
    fsck_clean(d)


def test_get_onto_non_regular_files(root, daemons):
    """`kvtier get BLOB -o X` where X is a device, a FIFO or standard output writes into it in
    place: renaming a temporary over it replaced the device node (as root, the machine's
    /dev/null became a regular file). The nodes are made here, never the machine's."""
    d = start(root, daemons)
    src = fixture("v4-ik/chat-a-turn1.bin")          # a blob with a sidecar
    blob = d.put(src)
    want = open(src, "rb").read()
    work = os.path.join(root, "nodes")
    os.mkdir(work)
    # A FIFO: the bytes come out of it, and it is still a FIFO.
    fifo = os.path.join(work, "fifo")
    os.mkfifo(fifo)
    got = {}

    def reader():
        with open(fifo, "rb") as f:
            got["data"] = f.read()
    t = threading.Thread(target=reader, daemon=True)   # never holds the test up
    t.start()
    d.cli("get", blob, "-o", fifo)
    t.join(30)
    check(not t.is_alive(), "the FIFO's reader finished")
    eq(got.get("data"), want, "the slot file through the FIFO")
    check(stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO is still a FIFO")
    eq(sorted(os.listdir(work)), ["fifo"], "no sidecar or temporary beside it")
    # A character device (the null device, made here): still that device afterwards.
    if os.geteuid() == 0:
        null = os.path.join(work, "null")
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        d.cli("get", blob, "-o", null)
        st = os.lstat(null)
        check(stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3),
              "the device node is still the device: %r" % (st,))
        eq(sorted(os.listdir(work)), ["fifo", "null"], "nothing written beside it")
    else:
        print("  (not root: the device-node part needs mknod)")
    # Standard output.
    r = subprocess.run([KVTIER, "--socket", d.sock, "get", blob, "-o", "-"],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    eq(r.returncode, 0, "get -o -")
    eq(r.stdout, want, "the slot file on standard output")
    # A regular file still gets the whole blob, sidecar included.
    out = os.path.join(root, "regular.bin")
    d.cli("get", blob, "-o", out)
    eq(sha256(out), sha256(src), "regular file")
    eq(sha256(out + ".tokens.json"), sha256(src + ".tokens.json"), "its sidecar")


def test_corrupt_blob_never_served(root, daemons):
    d = start(root, daemons)
    blob = d.put(fixture("v2/chat-a-turn2.bin"))
    path = os.path.join(d.tier_dir, blob)
    eq(stat.S_IMODE(os.stat(path).st_mode), 0o440, "stored files are read-only")
    os.chmod(path, 0o640)
    with open(path, "r+b") as f:     # flip one byte of KV data, same size
        f.seek(50000)
        b = f.read(1)
        f.seek(50000)
        f.write(bytes([b[0] ^ 0x40]))
    r = d.fsck()
    check(r.rc == 0, "fsck without --verify reads no bytes: %r" % r)
    r = d.fsck(verify=True)
    check(r.rc != 0 and ("blob %s" % blob) in r.out + r.err and "fails its checksum" in r.out + r.err,
          "fsck --verify names the damaged blob: %r" % r)
    out = os.path.join(root, "bad.bin")
    r = d.cli("get", blob, "-o", out, check_rc=False)
    expect_fail(r, "DATA_LOSS", "checksum")
    check(not os.path.exists(out), "no file written from a corrupt blob")
    eq(d.ls(), [], "the corrupt blob is dropped")
    eq(d.lookup(fixture("v2/chat-a-turn2.bin"))["blob"], None, "and no longer found")
    eq(d.tier_files(), [], "its file is removed")
    fsck_clean(d)


def test_stage_copy_checked(root, daemons):
    """A slot directory on another file system gets a copy, not a link; the copy is checked
    against the blob's CRC like every other read: a flipped byte is never staged."""
    other = tempfile.mkdtemp(prefix="kvtier-it-xfs-", dir="/var/tmp")
    try:
        slots = os.path.join(root, "slots")
        os.makedirs(slots, exist_ok=True)
        d = start(root, daemons, slot_dirs=[slots, other])
        if os.stat(other).st_dev == os.stat(d.tier_dir).st_dev:
            print("SKIP part: /var/tmp and the tier are on one file system")
            return
        src = fixture("v2/chat-a-turn2.bin")
        blob = d.put(src)
        st = d.cli("stage", blob, "--dir", other, "--json").json()
        eq(st["copied"], True, "another file system: a copy")
        staged = os.path.join(other, st["filename"])
        eq(sha256(staged), sha256(src), "the copy holds the blob's bytes")
        check(os.stat(staged).st_ino != os.stat(os.path.join(d.tier_dir, blob)).st_ino,
              "not the tier's inode")
        d.cli("release", st["lease"])
        eq(sorted(os.listdir(other)), [], "released, nothing left")
        path = os.path.join(d.tier_dir, blob)
        os.chmod(path, 0o640)
        with open(path, "r+b") as f:     # flip one byte of KV data, same size
            f.seek(50000)
            b = f.read(1)
            f.seek(50000)
            f.write(bytes([b[0] ^ 0x40]))
        r = d.cli("stage", blob, "--dir", other, "--json", check_rc=False)
        expect_fail(r, "DATA_LOSS")
        eq(sorted(os.listdir(other)), [], "no staged file and no temporary from a corrupt blob")
        eq(d.ls(), [], "the corrupt blob is dropped")
        eq(d.tier_files(), [], "its file is removed")
        check("event=checksum_mismatch blob=%s part=\"\" tier=0 during=stage" % blob
              in d.read_log(), "the log names the blob and the stage")
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_start_guards(root, daemons):
    import subprocess
    from harness import KVTIERD
    d = start(root, daemons)
    blob = d.put(fixture("v2/chat-a-turn1.bin"))
    foreign = os.path.join(d.tier_dir, "notes.txt")
    open(foreign, "w").write("not kvtier's")
    d.stop()
    d.start()
    check(os.path.exists(foreign), "a file kvtier did not create is never deleted")
    eq([b["blob"] for b in d.ls()], [blob], "blob kept")
    d.stop()

    def refused(args, *phrases):
        p = subprocess.run([KVTIERD] + args, capture_output=True, timeout=30)
        check(p.returncode != 0, "kvtierd should refuse %r" % args)
        for ph in phrases:
            check(ph in p.stderr.decode(), "message %r lacks %r" % (p.stderr, ph))
    moved = os.path.join(root, "tier2")
    refused(["--data", d.data, "--socket", d.sock, "--tier", "tmpfs:%s:64M" % moved,
             "--slot-dir", d.slot_dir], "same --tier options")
    refused(["--data", d.data, "--socket", d.sock, "--tier", "tmpfs:%s:64M" % d.slot_dir,
             "--slot-dir", d.slot_dir], "overlap")
    refused(["--data", os.path.join(root, "new"), "--socket", d.sock,
             "--tier", "tmpfs:%s:64M" % os.path.join(root, "new", "tier")], "overlap")
    d.start()  # the original configuration still works, with its blob
    eq([b["blob"] for b in d.ls()], [blob], "blob still there after refused starts")


def test_cancelled_put_stores_nothing(root, daemons):
    import subprocess
    from harness import BIN
    d = start(root, daemons)
    tool = os.path.join(BIN, "tests", "put_cancel")
    src = fixture("v4-ik/chat-a-turn1.bin")
    size = os.path.getsize(src)
    # Cut in the middle of the slot file, and after the whole slot file but
    # before its announced sidecar: both are incomplete uploads.
    for n_parts, sent in ((1, size // 2), (2, -1)):
        p = subprocess.run([tool, "unix:" + d.sock, "ik", src, str(n_parts), str(sent)],
                           capture_output=True, timeout=60)
        eq(p.returncode, 0, "put_cancel ran: %r" % p.stderr)
        eq(d.ls(), [], "nothing stored after a cancelled put (%d parts, %d bytes)" %
           (n_parts, sent))
        eq([f for f in d.tier_files()], [], "no file left on the tier")
    # The complete upload that follows keeps its sidecar.
    blob = d.put(src, ns="ik")
    eq([b["sidecars"] for b in d.ls()], [[".tokens.json"]], "sidecar stored")
    out = os.path.join(root, "o.bin")
    d.cli("get", blob, "-o", out)
    eq(sha256(out + ".tokens.json"), sha256(src + ".tokens.json"), "sidecar bytes")


def test_lease_expiry(root, daemons):
    d = start(root, daemons, extra=["--lease-seconds", "1"])
    blob = d.put(fixture("v2/chat-a-turn1.bin"))
    st = d.cli("stage", blob, "--dir", d.slot_dir, "--json").json()
    staged = os.path.join(d.slot_dir, st["filename"])
    check(os.path.exists(staged), "staged")
    import time
    deadline = time.time() + 10
    while os.path.exists(staged) and time.time() < deadline:
        time.sleep(0.2)
    check(not os.path.exists(staged), "lease expiry removed the staged file")
    r = d.cli("release", st["lease"], check_rc=False)
    expect_fail(r, "NOT_FOUND")


def test_restart_keeps_blobs(root, daemons):
    d = start(root, daemons)
    blob = d.put(fixture("v2/chat-a-turn2.bin"))
    st = d.cli("stage", blob, "--dir", d.slot_dir, "--json").json()
    eq(d.stop(), 0, "clean exit on SIGTERM")
    check(not os.path.exists(d.sock), "socket removed on exit")
    check(not os.path.exists(os.path.join(d.slot_dir, st["filename"])),
          "staged file removed when the daemon stops")
    d.start()
    eq(d.lookup(fixture("v2/chat-a-turn2.bin"))["blob"], blob, "blob survives restart")
    # A clean stop on this boot: the start trusts the index and restores the
    # tier's counters from the record instead of checking every file.
    log = d.read_log()
    check("event=start_after_clean_stop" in log, "clean restart skips the per-file check")
    s = d.cli("stats", "--json").json()
    eq(s["blobs"], 1, "blob count restored")
    eq(s["tiers"][0]["used_bytes"], os.path.getsize(fixture("v2/chat-a-turn2.bin")),
       "tier usage restored")
    # After kill -9 the record is gone: the next start checks every file.
    d.kill9()
    d.start()
    # The whole log of the three starts (read_log keeps only its tail): the
    # first start (fresh data) and the one after kill -9 reconcile; the one
    # after the clean stop does not. Nothing was half-done at the crash, so
    # the reconcile after it finds nothing to remove.
    with open(d.log_path, "rb") as f:
        full = f.read().decode(errors="replace")
    starts = ("reconciled", "start_after_clean_stop", "ready", "stopping", "stopped")
    seq = [e for e in re.findall(r"\bevent=(\w+)", full) if e in starts]
    eq(seq, ["reconciled", "ready", "stopping", "stopped",
             "start_after_clean_stop", "ready",
             "reconciled", "ready"], "start and stop events of the three starts, in order")
    rec = re.findall(r"event=reconciled removed_files=(\d+) dropped_blobs=(\d+)", full)
    eq(rec, [("0", "0"), ("0", "0")], "what each reconcile removed")
    eq(d.cli("stats", "--json").json()["tiers"][0]["used_bytes"],
       os.path.getsize(fixture("v2/chat-a-turn2.bin")), "tier usage after reconcile")
    info = d.cli("info").out
    check("tmpfs" in info, "info names the tier: %r" % info)
    eq(stat.S_IMODE(os.stat(d.sock).st_mode), 0o660, "socket mode")
    fsck_clean(d)


if __name__ == "__main__":
    run([test_lookup_prefix, test_supersede_and_get, test_no_supersede, test_dedup,
         test_refusals, test_namespaces_isolated, test_v4_sidecar, test_stage_and_adopt,
         test_put_reported_size, test_adopt_reported_size, test_states_listed, test_every_folder,
         test_layouts_never_cross, test_get_onto_non_regular_files,
         test_corrupt_blob_never_served, test_stage_copy_checked, test_start_guards,
         test_cancelled_put_stores_nothing, test_lease_expiry, test_restart_keeps_blobs])
