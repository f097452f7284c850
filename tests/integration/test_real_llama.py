#!/usr/bin/env python3
"""kvtier with the real llama.cpp library (v0.4.0, node-llama-cpp 3.21.1 from npm, prebuilt:
never built or downloaded here) on the three tiny models of tests/fixtures/llama-slots/models:
dense (llama), sliding-window (gemma3) and recurrent (mamba).

The library writes slot files of real conversations; the real kvtierd stores them (put, lookup of
a shared prefix, supersession, get, stage, adopt, a move to the disk tier, LZ4 and back); what
kvtier hands back is restored into a FRESH context of the library, and the next greedy tokens
must be token for token those of the context that wrote the file and went on uninterrupted.
The comparison is shown not to be vacuous: each uninterrupted continuation varies, a fresh
context without the restore continues otherwise, and a file with damaged K/V rows, or restored
into another model of the same shape, continues otherwise too. Files of another layout are
refused by kvtierd's namespaces and, when forced on the library, by the library itself (or it
aborts). Models of the same shape are kept apart only by the namespace: kvtier-llama derives
different ones from their GGUF files.

No Node.js 20, no node_modules/node-llama-cpp (scripts/deps installs it), or a library that does
not load: "SKIP: reason", exit 77; with CI=true that is a failure (exit 1).
"""
import array
import ctypes
import json
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

from harness import (Daemon, Failure, check, eq, expect_fail, fixture, make_slot, run, sha256,
                     slot_tokens)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
LIB = os.path.join(REPO, "tests", "real_llama", "lib.mjs")
MODELS = {"dense": "micro.gguf", "iswa": "iswa.gguf", "recurrent": "recurrent.gguf"}
N_GEN = 24                                  # greedy tokens compared after every restore
CTX = {"contextSize": 2048, "sequences": 2}  # two sequences: two KV streams (n_stream 2)
TIMEOUT = 120                               # seconds for one request to the library
STATE = {"dense": "kv", "iswa": "kv", "recurrent": "recurrent"}   # kvtier ls's state

# Longer than a block of kvtier's index (64 tokens): B finds A through the shared system prompt.
SYSTEM = ("<|im_start|>system\nYou are a helpful assistant who answers briefly. You know how "
          "large language models are served: prefill, decoding, the KV cache, slots, context "
          "windows, sliding-window attention and recurrent state. Answer in plain English, "
          "without lists, in at most three sentences, and say so when you do not know."
          "<|im_end|>\n")
USER_A1 = "<|im_start|>user\nWhat is a KV cache, and why would one keep it on disk?<|im_end|>\n" \
          "<|im_start|>assistant\n"
USER_A2 = "<|im_end|>\n<|im_start|>user\nAnd how long does a restore take?<|im_end|>\n" \
          "<|im_start|>assistant\n"
USER_A3 = "<|im_end|>\n<|im_start|>user\nThank you. One more question: what is LZ4?<|im_end|>\n" \
          "<|im_start|>assistant\n"
USER_B1 = "<|im_start|>user\nWhich file systems support hard links?<|im_end|>\n" \
          "<|im_start|>assistant\n"
USER_B2 = "<|im_end|>\n<|im_start|>user\nAnd tmpfs?<|im_end|>\n<|im_start|>assistant\n"


def model_path(kind):
    return fixture("models/" + MODELS[kind])


# ---------------------------------------------------------------------------
# an honest skip

def skip_or_fail(reason):
    """No library is a skip (exit 77), never a pass; under CI=true, where the registry and
    Node.js 20 are there, it is a failure."""
    if os.environ.get("CI") == "true":
        print("FAIL: %s (CI=true: the real llama.cpp library must run here)" % reason)
        sys.exit(1)
    print("SKIP: %s" % reason)
    sys.exit(77)


def library_or_skip():
    node = shutil.which("node")
    if not node:
        skip_or_fail("no node on PATH: the real llama.cpp library needs Node.js 20")
    pkg = os.path.join(REPO, "node_modules", "node-llama-cpp", "package.json")
    if not os.path.exists(pkg):
        skip_or_fail("%s is missing: run scripts/deps (npm ci --omit=optional)%s" %
                     (os.path.dirname(pkg), "" if shutil.which("npm") else "; npm is not on PATH"))
    try:
        p = subprocess.run([node, LIB, '{"op": "probe"}'], capture_output=True, timeout=TIMEOUT,
                           stdin=subprocess.DEVNULL, cwd=REPO)
        out = json.loads(p.stdout.decode() or "{}")
    except (subprocess.TimeoutExpired, ValueError) as e:
        skip_or_fail("the llama.cpp library did not load: %r" % e)
    if p.returncode != 0 or "release" not in out:
        version = subprocess.run([node, "--version"], capture_output=True, timeout=30)
        skip_or_fail("the llama.cpp library did not load (node %s): %s %s" %
                     (version.stdout.decode().strip(), out,
                      p.stderr.decode(errors="replace")[-1500:]))
    for kind in MODELS:
        check(os.path.exists(model_path(kind)), "model %s missing" % model_path(kind))
    return out["release"]


# ---------------------------------------------------------------------------
# the library, through tests/real_llama/lib.mjs

class Lib:
    """One `node lib.mjs serve` for the whole test (a model loads once), stopped by its PID.
    Requests that may abort the process (a KV file forced into a recurrent context) run in a
    process of their own (oneshot)."""

    def __init__(self, workdir):
        self.log_path = os.path.join(workdir, "lib.log")
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["node", LIB, "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, cwd=REPO)
        self.answers = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.answers.put(line)
        self.answers.put(None)

    def read_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-3000:]

    def __call__(self, op, **req):
        req["op"] = op
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
            line = self.answers.get(timeout=TIMEOUT)
        except (OSError, queue.Empty) as e:
            self.stop()
            raise Failure("the library did not answer %s: %r\n%s" % (op, e, self.read_log()))
        if line is None:
            raise Failure("the library exited (%r) during %s:\n%s" %
                          (self.proc.wait(), op, self.read_log()))
        a = json.loads(line)
        if "error" in a:
            raise Failure("the library failed %s: %s" % (op, a["error"]))
        return a

    @staticmethod
    def oneshot(op, **req):
        """(returncode, answer or None, stderr) of one request in a process of its own."""
        req["op"] = op
        p = subprocess.run(["node", LIB, json.dumps(req)], capture_output=True, timeout=TIMEOUT,
                           stdin=subprocess.DEVNULL, cwd=REPO)
        try:
            a = json.loads(p.stdout.decode())
        except ValueError:
            a = None
        return p.returncode, a, p.stderr.decode(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


LIBRARY = {}      # "lib": the Lib, "dir": files shared by the tests, "chats": kind -> Chats


def lib():
    return LIBRARY["lib"]


# ---------------------------------------------------------------------------
# real conversations, written once per model

class SlotFile:
    """A slot file the library wrote, the continuation to test it with, and what the context
    that wrote it generated next (ref) when it went on without a save and restore."""

    def __init__(self, path, pending, cont):
        self.path, self.pending, self.cont = path, pending, cont
        self.tokens = slot_tokens(path)
        self.ref = None

    def continuation(self):
        return [self.pending] + self.cont


class Chats:
    """Per model: conversation A (turn 1, and turn 2 extending it), conversation B (the same
    system prompt: a shared prefix) and A's turn 1 in a one-sequence context (one KV stream).

    The continuation that follows a restore is the next user message for the attention models.
    The recurrent model's random-weight state fades within a few tokens (its output depends
    on the last ones only), so there it is the answer itself going on (the pending token): a
    continuation the saved state decides. Either way the test checks it does."""

    def __init__(self, kind, workdir):
        self.kind = kind
        m = self.model = model_path(kind)
        t0 = time.time()

        def tok(text, bos=False):
            return lib()("tokenize", model=m, text=text, bos=bos)["tokens"]
        self.system = tok(SYSTEM, bos=True)
        a1, a2, a3, b1, b2 = (tok(t) for t in (USER_A1, USER_A2, USER_A3, USER_B1, USER_B2))
        attention = kind != "recurrent"
        path = lambda name: os.path.join(workdir, "%s-%s.bin" % (kind, name))

        def converse(ctx, steps):
            return lib()("converse", model=m, ctx=ctx, steps=steps)["steps"]
        # A, turn 1, and the context going on after it.
        s = converse(CTX, [{"eval": self.system + a1, "gen": 16, "save": path("a1")},
                           {"pending": True, "eval": a2 if attention else [], "gen": N_GEN}])
        self.a1 = SlotFile(path("a1"), s[0]["generated"][-1], a2 if attention else [])
        self.a1.ref = s[1]["generated"]
        # A again (the same file, byte for byte), turn 2 saved, and the context going on.
        s = converse(CTX, [{"eval": self.system + a1, "gen": 16, "save": path("a1-again")},
                           {"pending": True, "eval": a2, "gen": 16, "save": path("a2")},
                           {"pending": True, "eval": a3 if attention else [], "gen": N_GEN}])
        eq(sha256(path("a1-again")), sha256(path("a1")),
           "%s: the library writes the same turn 1 again (deterministic)" % kind)
        self.turn2_answer = s[1]["generated"]
        self.a2 = SlotFile(path("a2"), s[1]["generated"][-1], a3 if attention else [])
        self.a2.ref = s[2]["generated"]
        # B: the same system prompt, another question.
        self.b1_prompt = self.system + b1
        s = converse(CTX, [{"eval": self.b1_prompt, "gen": 16, "save": path("b1")},
                           {"pending": True, "eval": b2 if attention else [], "gen": N_GEN}])
        self.b1 = SlotFile(path("b1"), s[0]["generated"][-1], b2 if attention else [])
        self.b1.ref = s[1]["generated"]
        # A's turn 1 in a context of one sequence: one KV stream instead of two.
        converse(dict(CTX, sequences=1), [{"eval": self.system + a1, "gen": 16,
                                           "save": path("a1-1seq")}])
        self.a1_1seq = SlotFile(path("a1-1seq"), self.a1.pending, self.a1.cont)
        self.a1_1seq.ref = self.a1.ref
        self.seconds = time.time() - t0
        self.check_meaningful()

    def files(self):
        return (self.a1, self.a2, self.b1)

    def check_meaningful(self):
        """The comparison after a restore can fail: each continuation varies, and a fresh
        context that did not restore the file continues otherwise."""
        k = self.kind
        eq(self.a2.tokens[:len(self.a1.tokens)], self.a1.tokens, "%s: turn 2 extends turn 1" % k)
        shared = common_prefix(self.a1.tokens, self.b1.tokens)
        check(len(self.system) <= shared < len(self.b1.tokens),
              "%s: B shares the system prompt with A and no more than a prefix" % k)
        if k != "recurrent":
            # Restoring turn 1 and sending turn 2's message must give turn 2's answer.
            eq(self.a1.ref[:16], self.turn2_answer, "%s: turn 1's continuation is turn 2" % k)
        for f in self.files():
            name = os.path.basename(f.path)
            eq(len(f.ref), N_GEN, "%s: greedy tokens generated after %s" % (k, name))
            check(len(set(f.ref)) >= 3, "%s: the continuation after %s is degenerate: %r" %
                  (k, name, f.ref))
            fresh = lib()("converse", model=self.model, ctx=CTX,
                          steps=[{"eval": f.continuation(), "gen": N_GEN}])["steps"][0]
            check(fresh["generated"] != f.ref,
                  "%s: a fresh context continues %s's continuation the same without its state: "
                  "the comparison would prove nothing" % (k, name))


def chats(kind):
    c = LIBRARY["chats"]
    if kind not in c:
        c[kind] = Chats(kind, LIBRARY["dir"])
        print("  %s: conversations written and checked in %.1fs" % (kind, c[kind].seconds))
    return c[kind]


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def diverges(a, b):
    """The index of the first token where generations a and b differ."""
    return common_prefix(a, b)


def restored(kind, path, f, what, ctx=CTX):
    """Restores `path` into a fresh context and checks the continuation is f's."""
    a = lib()("restore", model=model_path(kind), ctx=ctx, file=path,
              eval=f.continuation(), gen=N_GEN)
    check(a["loaded"], "%s: %s did not load: %r" % (kind, what, a))
    eq(a["context_tokens"], f.tokens, "%s: tokens restored from %s" % (kind, what))
    eq(a["generated"], f.ref, "%s: the %d tokens after restoring %s (uninterrupted run)" %
       (kind, N_GEN, what))


# ---------------------------------------------------------------------------
# slot-file surgery and LZ4

def state_rows(path, kind):
    """(offset, length) of every K and V (for the recurrent model R and S) row block of a
    version-3 slot file of the library: kv (dense), kv+kv (iswa) or recurrent. The walk must
    end at the end of the file, so everything else (header, tokens, cells, types and sizes)
    is known to lie outside these blocks."""
    data = open(path, "rb").read()
    o = 0

    def u32():
        nonlocal o
        o += 4
        return struct.unpack_from("<I", data, o - 4)[0]

    def u64():
        nonlocal o
        o += 8
        return struct.unpack_from("<Q", data, o - 8)[0]

    def cells():
        nonlocal o
        n = u32()
        for _ in range(n):
            u32()               # pos
            n_seq_id = u32()
            o += 4 * n_seq_id   # seq ids
        return n

    def rows(n_cells):
        nonlocal o
        trans, n_layer = u32(), u32()
        out = []
        for part in ("K", "V"):
            for _ in range(n_layer):
                u32()           # ggml type
                size = (u32() * u32() if part == "V" and trans else u64()) * n_cells
                out.append((o, size))
                o += size
        return out
    magic, version, n_tok = struct.unpack_from("<III", data, 0)
    eq((magic, version), (0x67677371, 3), "%s: a version-3 slot file" % path)
    o = 12 + 4 * n_tok
    out = []
    if kind == "recurrent":
        out += rows(cells())
    else:
        for _ in range(2 if kind == "iswa" else 1):     # iswa: base layers, then SWA layers
            for _ in range(u32()):                        # KV streams
                n = cells()
                if n:
                    out += rows(n)
    eq(o, len(data), "%s: the walk of its %s state ends at the end of the file" % (path, kind))
    return out


def damage_rows(src, dst, kind):
    """dst: src with an exponent bit flipped in every fourth byte of the last quarter of each
    row block (the newest cells' K and V; all of the recurrent state's single cell is in it)."""
    data = bytearray(open(src, "rb").read())
    flipped = 0
    for off, size in state_rows(src, kind):
        for i in range(off + size - size // 4 + 3, off + size, 4):
            data[i] ^= 0x40
            flipped += 1
    check(flipped > 0, "bytes flipped")
    open(dst, "wb").write(data)
    return dst


def lz4_saving(path):
    """The share of its bytes LZ4 saves on the file, plain or byte-shuffled (16-bit), the
    better of the two, as kvtierd measures it (its frames are 1 MiB: these files are one);
    None when liblz4 cannot be loaded here."""
    try:
        lz = ctypes.CDLL("liblz4.so.1")
    except OSError:
        return None
    data = open(path, "rb").read()
    n = len(data)

    def size(b):
        cap = lz.LZ4_compressBound(len(b))
        out = ctypes.create_string_buffer(cap)
        return lz.LZ4_compress_default(b, out, len(b), cap)
    even = n // 2 * 2
    shuffled = data[0:even:2] + data[1:even:2] + data[even:]
    return 1 - min(size(data), size(shuffled)) / n


# ---------------------------------------------------------------------------
# another model of the same shape

GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
               11: "<q", 12: "<d"}


def gguf_tensors(data):
    """(offset of the tensor data, [(name, element count, ggml type, offset)]) of a GGUF file."""
    o = 0

    def take(fmt):
        nonlocal o
        v = struct.unpack_from(fmt, data, o)[0]
        o += struct.calcsize(fmt)
        return v

    def value(t):
        nonlocal o
        if t == 8:
            n = take("<Q")
            o += n
            return None
        if t == 9:
            et, n = take("<I"), take("<Q")
            return [value(et) for _ in range(n)]
        return take(GGUF_SCALAR[t])
    eq(bytes(data[:4]), b"GGUF", "GGUF magic")
    o = 4
    take("<I")                  # version
    n_tensors, n_kv = take("<Q"), take("<Q")
    align = 32
    for _ in range(n_kv):
        n = take("<Q")
        key = bytes(data[o:o + n])
        o += n
        v = value(take("<I"))
        if key == b"general.alignment":
            align = v
    tensors = []
    for _ in range(n_tensors):
        n = take("<Q")
        name = bytes(data[o:o + n]).decode()
        o += n
        count = 1
        for _ in range(take("<I")):
            count *= take("<Q")
        tensors.append((name, count, take("<I"), take("<Q")))
    return (o + align - 1) // align * align, tensors


def same_shape_model(src, dst):
    """dst: model src with other weights: each tensor's elements in reverse order. The GGUF
    header (metadata and tensor descriptions) stays byte for byte the same, so the shapes,
    the KV layout and the weight distribution are those of src; only the weights differ.
    (Pure Python and well under a second: no numpy, no mkmodel.py, nothing to commit.)"""
    data = bytearray(open(src, "rb").read())
    start, tensors = gguf_tensors(data)
    for name, count, t, off in tensors:
        check(t in (0, 1), "%s: tensor %s is f32 or f16 (type %d)" % (src, name, t))
        a = array.array("I" if t == 0 else "H")
        size = count * a.itemsize
        a.frombytes(bytes(data[start + off:start + off + size]))
        a.reverse()
        data[start + off:start + off + size] = a.tobytes()
    open(dst, "wb").write(data)
    return start


# ---------------------------------------------------------------------------
# kvtierd with a disk tier

def disk_daemon(root, daemons):
    """A 1 MiB tmpfs tier over a 64 MiB disk tier (ext4 under /var/tmp for O_DIRECT)."""
    disk = tempfile.mkdtemp(prefix="kvtier-it-disk-", dir="/var/tmp")
    os.symlink(disk, os.path.join(root, "disk-link"))
    d = Daemon(root, tier_size="1M", extra=["--tier", "disk:%s:64M" % disk,
                                            "--probe-size", "256K"])
    d.disk_dir = disk
    daemons.append(d)
    return d.start()


def drop_disk(root, daemons):
    for d in daemons:
        d.kill9()
    link = os.path.join(root, "disk-link")
    if os.path.islink(link):
        shutil.rmtree(os.readlink(link), ignore_errors=True)


def info_of(d, blob):
    got = [b for b in d.ls() if b["blob"] == blob]
    check(got, "blob %s listed" % blob[:12])
    return got[0]


def wait_for(what, fn, timeout=30, fail=True):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    if fail:
        raise Failure("timed out after %ds waiting for %s" % (timeout, what))
    return None


def to_disk(d, root, blob):
    """Puts filler blobs into a namespace of their own until the placement policy has moved
    `blob` down to the disk tier: six fill the 1 MiB tmpfs tier past its high watermark (more
    only if that was not enough). Their namespace is reported to prefill 10 tokens/s, so each
    of their bytes is worth far more than a real blob's, hits and all: the real ones go first."""
    fillers = []
    for i in range(40):
        toks = [(i * 7919 + j * 104729) % 31000 + 1 for j in range(4096)]     # 180 KB
        f = make_slot(os.path.join(root, "filler.bin"), toks, row_bytes=16)
        fillers.append(d.put(f, ns="filler"))
        if i == 0:      # the namespace exists now
            d.cli("report", "-n", "filler", "--prompt-tokens", "100", "--prompt-ms", "10000")
        if len(fillers) >= 6 and len(fillers) % 2 == 0 and wait_for(
                "a move", lambda: info_of(d, blob)["tier_index"] == 1, timeout=5, fail=False):
            return fillers
    raise Failure("blob %s still on tmpfs after %d fillers: %r" % (blob[:12], len(fillers),
                                                                   info_of(d, blob)))


# ---------------------------------------------------------------------------
# the tests

def store_round_trip(kind, root, daemons):
    """One model's conversations through kvtierd; every file kvtier hands back (get, a staged
    hard link, an adopted file, from the disk tier and back) restores into a fresh context and
    continues as the uninterrupted run; damaged K/V rows continue otherwise."""
    c = chats(kind)
    d = disk_daemon(root, daemons)
    try:
        ns = "real-" + kind
        # Turn 1: put, found by its own tokens, fetched and restored.
        a1 = d.put(c.a1.path, ns=ns)
        m = d.lookup(c.a1.path, ns=ns)
        eq((m["blob"], m["matched_tokens"], m["tier"]), (a1, len(c.a1.tokens), "tmpfs"),
           "%s: turn 1 found by its tokens" % kind)
        b = info_of(d, a1)
        eq((b["version"], b["state"], b["token_form"]), (3, STATE[kind], "plain"),
           "%s: what kvtier read in the library's file" % kind)
        got = os.path.join(root, "got-a1.bin")
        d.cli("get", a1, "-o", got)
        eq(sha256(got), sha256(c.a1.path), "%s: get returns turn 1's bytes" % kind)
        restored(kind, got, c.a1, "turn 1 from `kvtier get`")
        # Turn 2 extends turn 1: it supersedes it where the server can take a prefix of
        # a state (one KV section). A sliding-window file holds only the window's last
        # positions and a recurrent state its last one: there turn 1 stays, for an edited
        # turn 2, and equal matches go to the shorter blob.
        a2 = d.put(c.a2.path, ns=ns)
        prefix_ok = kind == "dense"
        held = sorted(x["blob"] for x in d.ls(ns=ns))
        if prefix_ok:
            eq(held, [a2], "%s: turn 1 superseded by turn 2" % kind)
            check(d.cli("stats", "--json").json()["supersessions"] >= 1,
                  "supersession counted")
        else:
            eq(held, sorted([a1, a2]), "%s: turn 1 kept beside turn 2" % kind)
        first = a2 if prefix_ok else a1
        m = d.lookup(c.a1.path, ns=ns)
        eq((m["blob"], m["matched_tokens"]), (first, len(c.a1.tokens)),
           "%s: turn 1's tokens find %s" % (kind, "turn 2" if prefix_ok else "turn 1"))
        # Conversation B shares A's prefix: the lookup finds A with exactly the shared tokens.
        m = d.lookup(c.b1.path, ns=ns)
        eq((m["blob"], m["matched_tokens"]), (first, common_prefix(c.a2.tokens, c.b1.tokens)),
           "%s: chat B finds chat A with the shared prefix" % kind)
        # B as the plugin takes a save: the library saves into the slot directory (as
        # llama-server does), kvtier adopts the file, and stages it for a restore.
        saved = os.path.join(d.slot_dir, "slot1.bin")
        lib()("converse", model=c.model, ctx=CTX,
              steps=[{"eval": c.b1_prompt, "gen": 16, "save": saved}])
        eq(sha256(saved), sha256(c.b1.path), "%s: B saved again, the same bytes" % kind)
        b1 = d.cli("adopt", "--namespace", ns, "--expect-size", str(os.path.getsize(saved)),
                   saved).out.strip()
        check(not os.path.exists(saved), "%s: adopt took the file" % kind)
        m = d.lookup(c.b1.path, ns=ns)
        eq((m["blob"], m["matched_tokens"]), (b1, len(c.b1.tokens)), "%s: B adopted" % kind)
        st = d.cli("stage", b1, "--dir", d.slot_dir, "--json").json()
        eq(st["copied"], False, "%s: staged from tmpfs" % kind)
        eq(os.stat(st["path"]).st_ino, os.stat(os.path.join(d.tier_dir, b1)).st_ino,
           "%s: the staged file is a hard link of the stored blob" % kind)
        restored(kind, st["path"], c.b1, "chat B adopted and staged (hard link)")
        d.cli("release", st["lease"])
        check(not os.path.exists(st["path"]), "released")
        got = os.path.join(root, "got-a2.bin")
        d.cli("get", a2, "-o", got)
        eq(sha256(got), sha256(c.a2.path), "%s: get returns turn 2's bytes" % kind)
        restored(kind, got, c.a2, "turn 2 from `kvtier get`")
        # Down to the disk tier, compressed where LZ4 pays.
        fillers = to_disk(d, root, a2)
        b = info_of(d, a2)
        saving = lz4_saving(c.a2.path)
        eq(b["size_bytes"], os.path.getsize(c.a2.path), "%s: size as served" % kind)
        if b["compression"] in ("lz4", "lz4+shuffle"):
            check(b["stored_bytes"] <= b["size_bytes"] * 0.9,
                  "%s: compressed saves at least 10 %%: %r" % (kind, b))
            check(abs(b["compression_ratio"] * b["stored_bytes"] - b["size_bytes"])
                  <= 0.01 * b["size_bytes"], "%s: the ratio shown: %r" % (kind, b))
        else:
            eq((b["compression"], b["stored_bytes"]), ("none", b["size_bytes"]),
               "%s: stored as it is" % kind)
        if saving is not None:
            if saving >= 0.12:
                check(b["compression"] != "none", "%s: LZ4 saves %.0f %% on this file, yet it "
                      "is stored raw: %r" % (kind, saving * 100, b))
            elif saving <= 0.08:
                eq(b["compression"], "none", "%s: LZ4 saves only %.0f %%" % (kind, saving * 100))
        print("  %s: turn 2 on disk: %s, %d of %d bytes stored (LZ4 alone would save %s)" %
              (kind, b["compression"], b["stored_bytes"], b["size_bytes"],
               "?" if saving is None else "%.1f %%" % (saving * 100)))
        got = os.path.join(root, "got-a2-disk.bin")
        d.cli("get", a2, "-o", got)
        eq(sha256(got), sha256(c.a2.path), "%s: turn 2's bytes from the disk tier" % kind)
        restored(kind, got, c.a2, "turn 2 read back from the disk tier")
        # And back: with room on tmpfs a whole read from disk promotes the blob (read again
        # if the placement thread, busy, declined).
        d.cli("rm", *fillers)

        def promoted():
            d.cli("get", a2, "-o", got)
            return wait_for("a promotion", lambda: info_of(d, a2)["tier_index"] == 0, timeout=3,
                            fail=False)
        wait_for("turn 2 promoted to tmpfs", promoted)
        eq(sha256(got), sha256(c.a2.path), "%s: turn 2's bytes read for the promotion" % kind)
        st = d.cli("stage", a2, "--dir", d.slot_dir, "--json").json()
        eq(st["copied"], False, "%s: staged from tmpfs after the round trip" % kind)
        eq(os.stat(st["path"]).st_ino, os.stat(os.path.join(d.tier_dir, a2)).st_ino,
           "%s: a hard link of the promoted blob" % kind)
        eq(info_of(d, a2)["compression"], "none", "%s: raw again on tmpfs" % kind)
        restored(kind, st["path"], c.a2, "turn 2 after the disk tier and back, staged")
        d.cli("release", st["lease"])
        # Damaged K/V rows: kvtier stores and hands back what it was given (its CRC covers
        # the stored bytes, not their meaning); the restore does not continue as before.
        bad = damage_rows(c.a2.path, os.path.join(root, "damaged.bin"), kind)
        x = d.put(bad, ns=ns + "-damaged")
        eq((info_of(d, x)["state"], info_of(d, x)["n_tokens"]), (STATE[kind], len(c.a2.tokens)),
           "%s: the damaged file still has a valid layout" % kind)
        got = os.path.join(root, "got-damaged.bin")
        d.cli("get", x, "-o", got)
        eq(sha256(got), sha256(bad), "%s: get returns the damaged bytes as put" % kind)
        a = lib()("restore", model=c.model, ctx=CTX, file=got, eval=c.a2.continuation(),
                  gen=N_GEN)
        check(not a["loaded"] or a["generated"] != c.a2.ref,
              "%s: damaged K/V rows continue like the intact file: %r" % (kind, a))
        print("  %s: damaged rows: %s" % (kind, "refused" if not a["loaded"] else
                                          "loaded, the continuation differs from token %d" %
                                          diverges(a["generated"], c.a2.ref)))
        # Damage after the put is kvtier's to catch: its CRC, and the blob is never served.
        stored = os.path.join(d.tier_dir, x)
        os.chmod(stored, 0o640)
        with open(stored, "r+b") as f:
            off, size = state_rows(stored, kind)[0]
            f.seek(off + size // 2)
            byte = f.read(1)
            f.seek(off + size // 2)
            f.write(bytes([byte[0] ^ 0x40]))
        os.unlink(got)
        r = d.cli("get", x, "-o", got, check_rc=False)
        expect_fail(r, "DATA_LOSS", "checksum")
        check(not os.path.exists(got), "%s: nothing written from a damaged blob" % kind)
        eq(d.lookup(bad, ns=ns + "-damaged")["blob"], None,
           "%s: the damaged blob is dropped" % kind)
        d.stop()
        r = d.fsck(verify=True)
        check(r.rc == 0, "%s: fsck --verify clean: %r" % (kind, r))
    finally:
        drop_disk(root, daemons)


def test_dense(root, daemons):
    store_round_trip("dense", root, daemons)


def test_sliding_window(root, daemons):
    store_round_trip("iswa", root, daemons)


def test_recurrent(root, daemons):
    store_round_trip("recurrent", root, daemons)


def test_layouts_never_cross(root, daemons):
    """A file of another layout (another KV stream count, another kind of model) is refused by
    kvtierd's namespace and never offered; forced on the library, the library refuses it too,
    except that a KV file forced into a recurrent context aborts the process."""
    d = Daemon(root)
    daemons.append(d)
    d.start()
    c = {k: chats(k) for k in MODELS}
    blob = {k: d.put(c[k].a2.path, ns="real-" + k) for k in MODELS}
    for k in MODELS:
        for other in MODELS:
            if other != k:
                r = d.cli("put", "--namespace", "real-" + k, c[other].a1.path, check_rc=False)
                expect_fail(r, "FAILED_PRECONDITION", "layout")
                eq(d.lookup(c[other].a2.path, ns="real-" + k)["blob"], blob[k],
                   "a lookup with %s's tokens in %s's namespace offers %s's blob" % (other, k, k))
    # One sequence: one KV stream where the namespace's files have two.
    for k in ("dense", "iswa"):
        one = c[k].a1_1seq
        eq(one.tokens, c[k].a1.tokens, "%s: the same tokens in one stream" % k)
        r = d.cli("put", "--namespace", "real-" + k, one.path, check_rc=False)
        expect_fail(r, "FAILED_PRECONDITION", "layout")
        x = d.put(one.path, ns="real-%s-1seq" % k)
        m = d.lookup(one.path, ns="real-" + k)
        eq((m["blob"], m["matched_tokens"]), (blob[k], len(one.tokens)),
           "%s: the two-stream namespace offers only its own blob" % k)
        eq(d.lookup(one.path, ns="real-%s-1seq" % k)["blob"], x, "%s: one stream" % k)
        for path, seqs, what in ((one.path, 2, "one stream into two"),
                                 (c[k].a1.path, 1, "two streams into one")):
            a = lib()("restore", model=c[k].model, ctx=dict(CTX, sequences=seqs), file=path,
                      eval=c[k].a1.continuation(), gen=N_GEN)
            check(not a["loaded"], "%s: the library loaded %s" % (k, what))
            check(any("n_stream mismatch" in line for line in a["log"]),
                  "%s: the library says why it refused %s: %r" % (k, what, a))
        restored(k, one.path, one, "turn 1 of one stream into one stream",
                 ctx=dict(CTX, sequences=1))
    # A recurrent state has no streams: the file of a one-sequence context is the same file.
    eq(sha256(c["recurrent"].a1_1seq.path), sha256(c["recurrent"].a1.path),
       "recurrent: one sequence or two, the same file")
    # Forced on the library: every pair of kinds.
    outcomes = []
    for k in MODELS:
        for other in MODELS:
            if other == k:
                continue
            req = dict(model=c[k].model, ctx=CTX, file=c[other].a1.path, eval=[1], gen=4)
            if k == "recurrent":    # may abort: in a process of its own
                rc, a, err = Lib.oneshot("restore", **req)
                if a is None:
                    check(rc in (-6, 134) and "GGML_ASSERT" in err,
                          "%s file into a %s context: neither refused nor an assertion: rc %d %s"
                          % (other, k, rc, err[-800:]))
                    outcomes.append("%s->%s aborted (%s)" %
                                    (other, k, re.search(r"GGML_ASSERT\([^)]*\)", err).group(0)))
                    continue
            else:
                a = lib()("restore", **req)
            check(not a["loaded"], "the library loaded a %s file into a %s context" % (other, k))
            outcomes.append("%s->%s refused (%s)" % (other, k, "; ".join(a["log"]) or
                                                      a["refusal"]))
    print("  forced on the library:\n    " + "\n    ".join(outcomes))


def test_same_shape_models(root, daemons):
    """Another model of the same shape (other weights) loads the first model's files without
    a word and continues otherwise: only the namespace keeps them apart. kvtierd never offers
    one namespace's blob in another, and kvtier-llama derives different namespaces from the
    two GGUF files (through the weights it samples: their headers are the same)."""
    from test_llama_plugin import PLUGIN, LlamaDouble, Plugin
    check(os.access(PLUGIN, os.X_OK), "%s is built" % PLUGIN)
    d = Daemon(root)
    daemons.append(d)
    d.start()
    other = {}
    for k in MODELS:
        c = chats(k)
        b = other[k] = os.path.join(root, "other-" + MODELS[k])
        t0 = time.time()
        start = same_shape_model(c.model, b)
        with open(c.model, "rb") as fa, open(b, "rb") as fb:
            ha, hb = fa.read(start), fb.read(start)
        eq(ha, hb, "%s: the same GGUF header" % k)
        check(sha256(c.model) != sha256(b), "%s: other weights" % k)
        print("  %s: model of the same shape made in %.2fs" % (k, time.time() - t0))
        # The library takes A's file into B's context and continues otherwise.
        restored(k, c.a2.path, c.a2, "turn 2 into its own model")
        a = lib()("restore", model=b, ctx=CTX, file=c.a2.path, eval=c.a2.continuation(),
                  gen=N_GEN)
        check(a["loaded"], "%s: model B refused model A's file: %r" % (k, a))
        check(a["generated"] != c.a2.ref, "%s: model B continues A's state as A does" % k)
        print("  %s: A's turn 2 restored into B: loaded, differs from token %d" %
              (k, diverges(a["generated"], c.a2.ref)))
        # B's own file of the same tokens.
        fb_path = os.path.join(root, "other-%s-a2.bin" % k)
        lib()("converse", model=b, ctx=CTX, steps=[{"eval": c.a2.tokens, "save": fb_path}])
        eq(slot_tokens(fb_path), c.a2.tokens, "%s: B's file holds A's tokens" % k)
        a = lib()("restore", model=c.model, ctx=CTX, file=fb_path, eval=c.a2.continuation(),
                  gen=N_GEN)
        check(a["loaded"] and a["generated"] != c.a2.ref,
              "%s: A loads B's file and continues otherwise: %r" % (k, a))
        # kvtier: the layout is the same, so a namespace alone tells them apart.
        na, nb = "model-a-" + k, "model-b-" + k
        xa, xb = d.put(c.a2.path, ns=na), d.put(fb_path, ns=nb)
        check(xa != xb, "two blobs")
        d.put(fb_path, ns="both-" + k)
        d.put(c.a2.path, ns="both-" + k)       # accepted: nothing in the file tells them apart
        eq(d.lookup(c.a2.path, ns=na)["blob"], xa, "%s: A's namespace offers A's blob" % k)
        eq(d.lookup(c.a2.path, ns=nb)["blob"], xb, "%s: B's namespace offers B's blob" % k)
        d.cli("rm", xa)
        m = d.lookup(c.a2.path, ns=na)
        eq((m["blob"], m["matched_tokens"]), (None, 0),
           "%s: A's namespace without A's blob: a miss, never B's blob" % k)
    # kvtier-llama's namespaces: one double (dense, n_embd 64 as these models), the plugin
    # started with each model file.
    dbl = LlamaDouble(root, "double", d.slot_dir, extra=["--cache-ram", "0", "--n-embd-k-gqa",
                                                          "32", "--n-embd-v-gqa", "32"])
    daemons.append(dbl)
    dbl.start()
    names = {}
    for k in MODELS:
        for which, path in (("A", model_path(k)), ("B", other[k])):
            p = Plugin(root, [dbl.url], "unix:" + d.sock, d.slot_dir,
                       ["--model-file", path, "--server-cache-ram", "0"],
                       name="plugin-%s-%s" % (k, which))
            daemons.append(p)
            p.start()
            line = wait_for("the backend's namespace", lambda: re.search(
                r"event=backend url=%s up=1 namespace=(\S+) source=(\S+)" % re.escape(dbl.url),
                p.read_log()))
            eq(line.group(2), "model-file", "%s %s: the namespace comes from the GGUF file:\n%s"
               % (k, which, p.read_log()))
            names[(k, which)] = line.group(1)
            p.stop()
    eq(len(set(names.values())), len(names), "six model files, six namespaces: %r" % names)
    for k in MODELS:
        a, b = names[(k, "A")], names[(k, "B")]
        strip = lambda n: re.sub(r"/gguf-[0-9a-f]+/", "/gguf-/", n)
        eq(strip(a), strip(b), "%s: A and B differ in their GGUF fingerprint only" % k)
    print("  plugin namespaces: %s" % ", ".join("%s %s: %s" % (k, w, re.search(
        r"gguf-[0-9a-f]+", n).group(0)) for (k, w), n in sorted(names.items())))


TESTS = [test_dense, test_sliding_window, test_recurrent, test_layouts_never_cross,
         test_same_shape_models]

if __name__ == "__main__":
    t0 = time.time()
    release = library_or_skip()
    print("llama.cpp %s (node-llama-cpp, prebuilt) ready in %.1fs" % (release, time.time() - t0))
    only = [t for t in TESTS if len(sys.argv) < 2 or t.__name__ in sys.argv[1:]]
    LIBRARY["dir"] = tempfile.mkdtemp(prefix="kvtier-real-llama-")
    LIBRARY["chats"] = {}
    LIBRARY["lib"] = Lib(LIBRARY["dir"])
    try:
        run(only)
    finally:
        LIBRARY["lib"].stop()
        shutil.rmtree(LIBRARY["dir"], ignore_errors=True)
        print("total %.1fs" % (time.time() - t0))
