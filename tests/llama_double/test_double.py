#!/usr/bin/env python3
"""test_double.py: self-test of llama_double.py (the llama-server test double).

Starts the double on a free loopback port in a temp directory, drives it with
urllib, and checks the behaviour kvtier-llama relies on. Exit 0 pass, 1 fail.
Every double started here is stopped by its PID; the temp dir is removed.
Real slot files are taken from $KVTIER_FIXTURES (default: tests/fixtures/llama-slots);
the checks that need them are skipped (and said so) when they are absent.
"""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
DOUBLE = os.path.join(HERE, "llama_double.py")
FIX = os.environ.get("KVTIER_FIXTURES", os.path.join(HERE, "..", "fixtures", "llama-slots"))
TIMEOUT = 10.0          # every HTTP call is bounded
HANG_PROBE = 1.0        # how long we wait to call a request "hung"
MAGIC = 0x67677371


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def eq(a, b, what):
    if a != b:
        raise Failure("%s: expected %r, got %r" % (what, b, a))


def note(msg):
    print("  " + msg, flush=True)


# --------------------------------------------------------------------------
# the slot-file parser, written from shared/DESIGN.md (independent of the double)

def parse_slot_file(path):
    with open(path, "rb") as f:
        b = f.read()
    magic, version, n = struct.unpack_from("<III", b, 0)
    off = 12
    tokens = list(struct.unpack_from("<%di" % n, b, off))
    off += 4 * n
    cell_count, = struct.unpack_from("<I", b, off)
    off += 4
    cells = [struct.unpack_from("<iI", b, off + 8 * i) for i in range(cell_count)]
    off += 8 * cell_count
    v_trans, n_layer = struct.unpack_from("<II", b, off)
    off += 8
    k, v = [], []
    for _ in range(n_layer):
        kt, krow = struct.unpack_from("<iQ", b, off)
        off += 12 + krow * cell_count
        k.append((kt, krow))
    for _ in range(n_layer):
        if v_trans == 0:
            vt, vrow = struct.unpack_from("<iQ", b, off)
            off += 12 + vrow * cell_count
            v.append((vt, vrow))
        else:
            vt, el, ne = struct.unpack_from("<iII", b, off)
            off += 12 + el * ne * cell_count
            v.append((vt, el, ne))
    return {"magic": magic, "version": version, "n": n, "tokens": tokens, "cell_count": cell_count,
            "cells": cells, "v_trans": v_trans, "n_layer": n_layer, "k": k, "v": v,
            "state_end": off, "size": len(b), "tail": b[off:]}


def parse_state_file(b, kind="dense", fmt=2026):
    """Any slot file, written from llama.cpp's sources (independent of the double):
    fmt 2025 (Feb 2025 and ik), fmt 2026 dense/iswa (llama-kv-cache.cpp state_write, one KV cache
    or two), recurrent (llama-memory-recurrent.cpp state_write). Returns the fields and `rows`,
    the (offset, length) spans of K/V/R/S row data."""
    magic, version, nw = struct.unpack_from("<III", b, 0)
    off = 12
    words = list(struct.unpack_from("<%di" % nw, b, off))
    off += 4 * nw
    tokens = words
    if words and words[0] == -1:                     # upstream's packed form
        n = words[2]
        tokens = words[3:3 + n]
        assert words[1] == 1 and words[3 + n] == 0 and len(words) == n + 4, "packed words %r" % words[:4]
    rows = []
    out = {"magic": magic, "version": version, "words": words, "tokens": tokens, "rows": rows}

    def u32():
        nonlocal off
        v, = struct.unpack_from("<I", b, off)
        off += 4
        return v

    def kv(c, n_layer, v_trans):
        nonlocal off
        k, v = [], []
        for _ in range(n_layer):
            t, row = struct.unpack_from("<iQ", b, off)
            rows.append((off + 12, row * c))
            off += 12 + row * c
            k.append((t, row))
        for _ in range(n_layer):
            if v_trans == 0:
                t, row = struct.unpack_from("<iQ", b, off)
                rows.append((off + 12, row * c))
                off += 12 + row * c
                v.append((t, row))
            else:
                t, el, ne = struct.unpack_from("<iII", b, off)
                rows.append((off + 12, el * ne * c))
                off += 12 + el * ne * c
                v.append((t, el, ne))
        return k, v

    if fmt == 2025:
        c = u32()
        cells = [struct.unpack_from("<iI", b, off + 8 * i) for i in range(c)]
        off += 8 * c
        v_trans, n_layer = u32(), u32()
        k, v = kv(c, n_layer, v_trans)
        out.update({"cell_count": c, "cells": cells, "v_trans": v_trans, "n_layer": n_layer, "k": k, "v": v})
    elif kind == "recurrent":
        c = u32()
        cells = [struct.unpack_from("<iI", b, off + 8 * i) for i in range(c)]
        off += 8 * c
        s_trans, n_layer = u32(), u32()
        ents = []
        for _ in range(2 * n_layer):
            t, row = struct.unpack_from("<iQ", b, off)
            rows.append((off + 12, row * c))
            off += 12 + row * c
            ents.append((t, row))
        out.update({"cell_count": c, "cells": cells, "s_trans": s_trans, "n_layer": n_layer,
                    "r": ents[:n_layer], "s": ents[n_layer:]})
    else:
        sections = []
        for _ in range(2 if kind == "iswa" else 1):
            n_stream = u32()
            streams = []
            for _ in range(n_stream):
                c = u32()
                st = {"cell_count": c}
                if c:
                    cells = []
                    for _ in range(c):
                        pos, n_seq = struct.unpack_from("<iI", b, off)
                        off += 8
                        ids = list(struct.unpack_from("<%di" % n_seq, b, off))
                        off += 4 * n_seq
                        cells.append((pos, n_seq, ids))
                    v_trans, n_layer = u32(), u32()
                    k, v = kv(c, n_layer, v_trans)
                    st.update({"cells": cells, "v_trans": v_trans, "n_layer": n_layer, "k": k, "v": v})
                streams.append(st)
            sections.append({"n_stream": n_stream, "streams": streams})
        out["sections"] = sections
    out["state_end"] = off
    out["size"] = len(b)
    out["tail"] = b[off:]
    return out


def same_but_rows(mine, real, what):
    """Byte-for-byte equal except inside the K/V/R/S row data of `real`."""
    with open(mine, "rb") as f:
        a = f.read()
    with open(real, "rb") as f:
        b = f.read()
    eq(len(a), len(b), "%s: size (double vs real file)" % what)
    return a, b


def compare_masked(a, b, rows, what):
    prev = 0
    for start, length in sorted(rows) + [(len(b), 0)]:
        if a[prev:start] != b[prev:start]:
            i = next(j for j in range(prev, start) if a[j] != b[j])
            raise Failure("%s: byte %d differs outside the KV rows (double %r, real %r)"
                          % (what, i, a[i:i + 8], b[i:i + 8]))
        prev = start + length


def v2_size(n, n_layer, k_row, v_bytes_per_cell):
    # 12 + 4n (header) + 4 + 8n (cells) + 4 + 4 (v_trans, n_layer)
    # + per layer K header 12 + n*k_row, per layer V header 12 + n*v bytes
    return 12 + 4 * n + 4 + 8 * n + 4 + 4 + n_layer * (12 + n * k_row) + n_layer * (12 + n * v_bytes_per_cell)


# --------------------------------------------------------------------------
# HTTP helpers

def call(base, method, path, body=None, timeout=TIMEOUT, raw=None, headers=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    req = urllib.request.Request(base + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        txt = e.read()
        try:
            return e.code, json.loads(txt)
        except ValueError:
            return e.code, txt


def hangs(base, method, path, body=None, raw=None, timeout=HANG_PROBE):
    """True when the request gets no answer within `timeout` seconds."""
    try:
        call(base, method, path, body, timeout=timeout, raw=raw)
    except (socket.timeout, TimeoutError):
        return True
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            return True
        raise
    return False


def stream_events(base, path, body):
    """POST and read the SSE stream incrementally: [(arrival time, line)], headers."""
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    out = []
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        headers = {k.lower(): v for k, v in r.getheaders()}
        while True:
            line = r.readline()
            if not line:
                break
            if line.strip():
                out.append((time.monotonic(), line.decode().rstrip("\n")))
    return out, headers


class Double:
    def __init__(self, tmp, name, *args):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        self.errpath = os.path.join(tmp, name + ".stderr")
        self.err = open(self.errpath, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, DOUBLE, "--host", "127.0.0.1", "--port", "0",
             "--slot-save-path", self.dir] + list(args),
            stdout=subprocess.PIPE, stderr=self.err)
        deadline = time.monotonic() + TIMEOUT
        line = b""
        import select
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                ch = os.read(self.proc.stdout.fileno(), 1)
                if not ch:
                    break
                line += ch
        text = line.decode().strip()
        check(text.startswith("listening on http://127.0.0.1:"), "double did not start: %r" % text)
        self.base = text[len("listening on "):]

    def path(self, name):
        return os.path.join(self.dir, name)

    def get(self, path, **kw):
        return call(self.base, "GET", path, **kw)

    def post(self, path, body=None, **kw):
        return call(self.base, "POST", path, body, **kw)

    def config(self, **kw):
        st, cfg = self.post("/__double/config", kw)
        eq(st, 200, "/__double/config status")
        return cfg

    def state(self):
        st, s = self.get("/__double/state?tokens=1")
        eq(st, 200, "/__double/state status")
        return s

    def slot_state(self, i):
        return self.state()["slots"][i]

    def action(self, slot, action, body):
        return self.post("/slots/%d?action=%s" % (slot, action), body)

    def completion(self, prompt, slot=None, n_predict=4, **extra):
        body = {"prompt": prompt, "n_predict": n_predict}
        if slot is not None:
            body["id_slot"] = slot
        body.update(extra)
        st, r = self.post("/completion", body)
        eq(st, 200, "/completion status (%r)" % (r,))
        return r

    def tokenize(self, text, add_special=True):
        st, r = self.post("/tokenize", {"content": text, "add_special": add_special})
        eq(st, 200, "/tokenize status")
        return r["tokens"]

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc.stdout.close()
        self.err.close()


def fixture(rel):
    p = os.path.join(FIX, rel)
    return p if os.path.exists(p) else None


# --------------------------------------------------------------------------
# checks on the llama.cpp flavour

def t_basic(d):
    st, h = d.get("/health")
    eq((st, h), (200, {"status": "ok"}), "/health")
    st, p = d.get("/props")
    eq(st, 200, "/props status")
    eq(p["default_generation_settings"]["n_ctx"], 1024, "props n_ctx (c / parallel)")
    eq(p["total_slots"], 2, "props total_slots")
    for k in ("model_path", "chat_template", "build_info"):
        check(k in p, "props lacks %s" % k)
    st, m = d.get("/v1/models")
    eq(st, 200, "/v1/models status")
    eq(m["object"], "list", "models object")
    e = m["data"][0]
    eq((e["object"], e["owned_by"], e["meta"]["vocab_type"]), ("model", "llamacpp", 1), "model entry")
    for k in ("n_vocab", "n_ctx_train", "n_embd", "n_params", "size"):
        check(k in e["meta"], "model meta lacks %s" % k)
    st, s = d.get("/slots")
    eq(st, 501, "/slots without --slots")
    eq(s, {"error": {"code": 501, "message": "This server does not support slots endpoint. Start it with `--slots`",
                     "type": "not_supported_error"}}, "/slots 501 body")
    st, e = d.get("/no/such/path")
    eq((st, e["error"]["type"]), (404, "not_found_error"), "unknown path")


def t_tokenizer(d):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    st, a = d.post("/apply-template", {"messages": msgs})
    eq(st, 200, "/apply-template status")
    p1 = a["prompt"]
    check(p1.endswith("<|im_start|>assistant\n"), "template must end with the assistant header: %r" % p1)
    msgs2 = msgs + [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"}]
    p2 = d.post("/apply-template", {"messages": msgs2})[1]["prompt"]
    check(p2.startswith(p1), "chat prompt of turn 2 must extend turn 1")
    t1, t2 = d.tokenize(p1), d.tokenize(p2)
    eq(t2[:len(t1)], t1, "tokenize(a + b) starts with tokenize(a)")
    eq(t1[0], 1, "BOS first with add_special")
    eq(d.tokenize(p1, add_special=False), t1[1:], "add_special false: no BOS")
    st, r = d.post("/tokenize", {"content": "ab"})
    eq(r["tokens"], [ord("a") + 3, ord("b") + 3], "default add_special is false")
    st, r = d.post("/tokenize", {"content": "a", "with_pieces": True})
    eq(r["tokens"], [{"id": ord("a") + 3, "piece": "a"}], "with_pieces")
    st, r = d.post("/detokenize", {"tokens": d.tokenize("Hello, world", False)})
    eq(r["content"], "Hello, world", "detokenize")


def t_prefix_reuse_save_restore(d):
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    toks = d.tokenize(prompt)
    r1 = d.completion(prompt, slot=0, n_predict=8)
    eq(r1["id_slot"], 0, "id_slot")
    eq(r1["timings"]["prompt_n"], len(toks), "first completion prefills everything")
    eq(r1["tokens_evaluated"], len(toks), "tokens_evaluated = prompt length")
    eq(r1["tokens_predicted"], 8, "tokens_predicted")
    eq(r1["tokens_cached"], len(toks) + 8 - 1, "tokens_cached = prompt + generated - 1")
    for k in ("index", "content", "tokens", "stop", "model", "generation_settings", "prompt", "has_new_line",
              "truncated", "stop_type", "stopping_word"):
        check(k in r1, "completion lacks %s" % k)
    eq(sorted(r1["timings"]), sorted(["prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
                                     "predicted_n", "predicted_ms", "predicted_per_token_ms",
                                     "predicted_per_second"]), "timings keys")
    # turn 2: the prompt extends prompt + reply
    prompt2 = prompt + r1["content"] + " And then?"
    toks2 = d.tokenize(prompt2)
    r2 = d.completion(prompt2, slot=0, n_predict=8)
    eq(r2["timings"]["prompt_n"], len(toks2) - r1["tokens_cached"], "second turn prefills only new tokens")
    # the same prompt again: all cached, one token re-evaluated
    r3 = d.completion(prompt2, slot=0, n_predict=8)
    eq(r3["timings"]["prompt_n"], 1, "a fully cached prompt re-evaluates its last token")
    n = r3["tokens_cached"]
    # save: real header, exact v2 layout
    st, s = d.action(0, "save", {"filename": "turn2.bin"})
    eq(st, 200, "save status")
    eq(sorted(s), ["filename", "id_slot", "n_saved", "n_written", "timings"], "save answer keys")
    eq((s["id_slot"], s["filename"], s["n_saved"]), (0, "turn2.bin", n), "save answer")
    check("save_ms" in s["timings"], "save timings")
    f = parse_slot_file(d.path("turn2.bin"))
    eq((f["magic"], f["version"], f["n"], f["cell_count"]), (MAGIC, 2, n, n), "saved header")
    eq(f["cells"], [(i, 0) for i in range(n)], "saved cells (pos i, n_seq_id 0)")
    eq((f["v_trans"], f["n_layer"]), (1, 2), "v_trans, n_layer")
    eq(f["k"], [(1, 64), (1, 64)], "K layers (f16, 64-byte rows)")
    eq(f["v"], [(1, 2, 32), (1, 2, 32)], "V layers (transposed, f16 x 32)")
    expected = v2_size(n, 2, 64, 2 * 32)
    eq(f["size"], expected, "file size = v2 layout")
    eq(f["state_end"], f["size"], "nothing after the state")
    eq(s["n_written"], expected, "n_written")
    eq(f["tokens"], d.slot_state(0)["tokens"], "saved tokens = slot tokens")
    # erase, restore, extend
    st, e = d.action(0, "erase", {})
    eq((st, e), (200, {"id_slot": 0, "n_erased": n}), "erase")
    eq(d.slot_state(0)["n_tokens"], 0, "erased slot is empty")
    st, r = d.action(0, "restore", {"filename": "turn2.bin"})
    eq(st, 200, "restore status")
    eq(sorted(r), ["filename", "id_slot", "n_read", "n_restored", "timings"], "restore answer keys")
    eq((r["n_restored"], r["n_read"]), (n, expected), "restore counts")
    check("restore_ms" in r["timings"], "restore timings")
    prompt3 = prompt2 + r3["content"] + " Go on."
    toks3 = d.tokenize(prompt3)
    r4 = d.completion(prompt3, slot=0)
    eq(r4["timings"]["prompt_n"], len(toks3) - n, "after restore only the new tokens are prefilled")
    # a restore into another slot works the same
    st, r = d.action(1, "restore", {"filename": "turn2.bin"})
    eq(st, 200, "restore into slot 1")
    r5 = d.completion(prompt3, slot=1)
    eq(r5["timings"]["prompt_n"], len(toks3) - n, "restored slot 1 prefill")
    # cache_prompt false: everything is prefilled and the slot keeps nothing
    r6 = d.completion(prompt3, slot=1, cache_prompt=False)
    eq(r6["timings"]["prompt_n"], len(toks3), "cache_prompt false prefills everything")
    eq(d.slot_state(1)["n_tokens"], 0, "cache_prompt false leaves the slot without cached tokens")
    return "turn2.bin", n


def t_fixture_size(d):
    # 259 prompt tokens + 16 generated - 1 = 274 tokens, like shared fixture v2/chat-a-turn1.bin
    prompt = "x" * 258                                # + BOS = 259 tokens
    r = d.completion(prompt, slot=1, n_predict=16)
    eq(r["tokens_cached"], 274, "tokens cached")
    st, s = d.action(1, "save", {"filename": "like-chat-a-turn1.bin"})
    eq(st, 200, "save")
    eq(s["n_written"], 73504, "the double's 274-token v2 file has the fixture's size")
    mine = parse_slot_file(d.path("like-chat-a-turn1.bin"))
    eq(mine["size"], 73504, "file size")
    fx = fixture("v2/chat-a-turn1.bin")
    if not fx:
        note("SKIP comparison with v2/chat-a-turn1.bin: no fixtures at %s" % FIX)
        return
    real = parse_slot_file(fx)
    eq(real["size"], 73504, "fixture size")
    for k in ("magic", "version", "n", "cell_count", "cells", "v_trans", "n_layer", "k", "v", "state_end"):
        eq(mine[k], real[k], "layout field %s (double vs real file)" % k)


def t_real_fixtures(d):
    fx = fixture("v2/chat-a-turn1.bin")
    if not fx:
        note("SKIP real-file restores: no fixtures at %s" % FIX)
        return
    for name in ("v2/chat-a-turn1.bin", "v2-flash-attn/chat-a-turn1.bin", "v2-q8/chat-a-turn1.bin",
                 "v4-ik/chat-a-turn1.bin", "v2/empty.bin"):
        shutil.copy(fixture(name), d.path(name.replace("/", "-")))
    # real KV bytes are not the double's deterministic ones: refused like a corrupt file
    st, r = d.action(0, "restore", {"filename": "v2-chat-a-turn1.bin"})
    eq(st, 400, "real KV bytes with verify_kv on")
    eq(r["error"]["message"], "Unable to restore slot, no available space in KV cache or invalid slot save file",
       "restore error message")
    eq(d.slot_state(0)["n_tokens"], 0, "a failed restore leaves the slot empty")
    d.config(verify_kv=False)
    try:
        st, r = d.action(0, "restore", {"filename": "v2-chat-a-turn1.bin"})
        eq((st, r["n_restored"], r["n_read"]), (200, 274, 73504), "real v2 file restores with verify_kv off")
        man = json.load(open(fixture("v2/manifest.json")))["chat-a-turn1"]
        eq(d.slot_state(0)["tokens"][:259], man["prompt_tokens"], "restored tokens = the file's")
        r = d.completion(man["prompt_tokens"], slot=0, n_predict=2)
        eq(r["timings"]["prompt_n"], 1, "the real file's prompt is fully cached")
        for other, why in (("v2-flash-attn-chat-a-turn1.bin", "v_trans 0 into a server without -fa"),
                           ("v2-q8-chat-a-turn1.bin", "q8_0 KV into an f16 server"),
                           ("v4-ik-chat-a-turn1.bin", "version 4 into mainline")):
            st, r = d.action(0, "restore", {"filename": other})
            eq(st, 400, "refused: " + why)
    finally:
        d.config(verify_kv=True)


def t_errors(d, good_file, n_good):
    # filenames the real server refuses
    for bad in ("../x.bin", "a/b.bin", "a:b", "x\x01y", "x" * 256, "", "..", "trail.", " lead"):
        st, r = d.action(0, "save", {"filename": bad})
        eq((st, r), (400, {"error": {"code": 400, "message": "Invalid filename", "type": "invalid_request_error"}}),
           "invalid filename %r" % bad)
    st, r = d.action(0, "save", {"filename": "é" * 127})
    eq(st, 200, "a 254-byte UTF-8 name is valid")
    st, r = d.post("/slots/7?action=save", {"filename": "x.bin"})
    eq((st, r["error"]["message"]), (400, "Invalid slot ID"), "slot id out of range")
    st, r = d.post("/slots/0?action=frobnicate", {"filename": "x.bin"})
    eq((st, r["error"]["message"]), (400, "Invalid action"), "unknown action")
    st, r = d.action(0, "restore", {"filename": "does-not-exist.bin"})
    eq(st, 400, "restore of a missing file")
    # more tokens than the slot's n_ctx (1024)
    with open(d.path("too-long.bin"), "wb") as f:
        f.write(struct.pack("<III", MAGIC, 2, 1025) + struct.pack("<1025i", *([300] * 1025)) + b"\0" * 64)
    st, r = d.action(0, "restore", {"filename": "too-long.bin"})
    eq(st, 400, "restore of more tokens than n_ctx")
    eq(r["error"]["message"], "Unable to restore slot, no available space in KV cache or invalid slot save file",
       "the real message")
    # a corrupt file (one KV byte flipped) and a truncated one
    with open(d.path(good_file), "rb") as f:
        data = bytearray(f.read())
    data[-5] ^= 0xFF
    with open(d.path("corrupt.bin"), "wb") as f:
        f.write(data)
    with open(d.path("truncated.bin"), "wb") as f:
        f.write(data[:len(data) // 2])
    for name in ("corrupt.bin", "truncated.bin"):
        d.action(0, "restore", {"filename": good_file})
        eq(d.slot_state(0)["n_tokens"], n_good, "slot holds the good file")
        st, r = d.action(0, "restore", {"filename": name})
        eq(st, 400, "restore of %s" % name)
        eq(d.slot_state(0)["n_tokens"], 0, "failed restore of %s leaves the slot empty" % name)
    # symlinks are followed
    os.symlink(d.path(good_file), d.path("link.bin"))
    st, r = d.action(0, "restore", {"filename": "link.bin"})
    eq((st, r.get("n_restored")), (200, n_good), "restore through a symlink")
    # an empty POST body to a slot action gets no answer
    check(hangs(d.base, "POST", "/slots/0?action=save", raw=b""), "empty-body save must hang")
    check(hangs(d.base, "POST", "/slots/0?action=erase", raw=b""), "empty-body erase must hang")
    st, _ = d.get("/health")
    eq(st, 200, "the llama flavour keeps answering after hung requests")


def t_switches(d, good_file, n_good):
    # fail_restore: 400, slot emptied
    d.action(0, "restore", {"filename": good_file})
    d.config(fail_restore=True)
    st, r = d.action(0, "restore", {"filename": good_file})
    eq(st, 400, "fail_restore")
    eq(d.slot_state(0)["n_tokens"], 0, "fail_restore leaves the slot empty")
    d.config(fail_restore=False)
    # save_fails_silently: 200, n_written 0, no file
    d.action(0, "restore", {"filename": good_file})
    d.config(save_fails_silently=True)
    st, s = d.action(0, "save", {"filename": "silent.bin"})
    eq((st, s["n_saved"], s["n_written"]), (200, n_good, 0), "save_fails_silently answer")
    check(not os.path.exists(d.path("silent.bin")), "save_fails_silently writes no file")
    d.config(save_fails_silently=False)
    # hang_slot_actions
    d.config(hang_slot_actions=True)
    check(hangs(d.base, "POST", "/slots/0?action=save", {"filename": "h.bin"}), "hang_slot_actions: save hangs")
    check(hangs(d.base, "POST", "/slots/0?action=restore", {"filename": good_file}),
          "hang_slot_actions: restore hangs")
    d.config(hang_slot_actions=False)
    # ignore_restore: success answer, slot unchanged, next completion prefills everything
    d.action(0, "erase", {})
    d.config(ignore_restore=True)
    st, r = d.action(0, "restore", {"filename": good_file})
    eq((st, r["n_restored"]), (200, n_good), "ignore_restore answers success")
    eq(d.slot_state(0)["n_tokens"], 0, "ignore_restore loads nothing")
    toks = parse_slot_file(d.path(good_file))["tokens"]
    r = d.completion(toks, slot=0, n_predict=1)
    eq(r["timings"]["prompt_n"], len(toks), "after an ignored restore everything is prefilled")
    d.config(ignore_restore=False)
    # kv_fragmented: restore refused
    d.config(kv_fragmented=True)
    st, r = d.action(0, "restore", {"filename": good_file})
    eq(st, 400, "kv_fragmented refuses restores")
    d.config(kv_fragmented=False)
    st, r = d.action(0, "restore", {"filename": good_file})
    eq(st, 200, "restores work again")
    s = d.state()
    for k in ("requests", "saves", "restores", "restores_failed", "prefilled_tokens"):
        check(s["counters"][k] > 0, "counter %s" % k)
    eq(s["slots"][0]["last_prompt_n"], len(toks), "state: last prompt_n of slot 0")


def t_busy_slot(d):
    d.config(prefill_ms_per_token=4.0)
    try:
        res = {}

        def run():
            res["r"] = d.completion("busy " * 60, slot=1, n_predict=2)   # ~300 tokens: ~1.2 s
            res["t"] = time.monotonic()

        th = threading.Thread(target=run)
        th.start()
        time.sleep(0.3)
        st, s = d.action(1, "save", {"filename": "busy.bin"})
        t_save = time.monotonic()
        th.join(TIMEOUT)
        check("r" in res, "busy completion finished")
        eq(st, 200, "save on a busy slot")
        check(t_save >= res["t"] - 0.05, "the save waited for the completion")
        eq(s["n_saved"], res["r"]["tokens_cached"], "the save saw the finished slot")
    finally:
        d.config(prefill_ms_per_token=0.05)


def t_streams(d):
    d.config(gen_ms_per_token=40.0)
    try:
        ev, hdr = stream_events(d.base, "/completion", {"prompt": "stream me", "n_predict": 4, "stream": True})
        eq(hdr.get("content-type"), "text/event-stream", "SSE content type")
        eq(hdr.get("transfer-encoding"), "chunked", "SSE uses chunked encoding")
        check(all(l.startswith("data: ") for _, l in ev), "every event is data:")
        msgs = [json.loads(l[6:]) for _, l in ev]
        eq(len(msgs), 5, "4 token events + 1 final")
        for i, m in enumerate(msgs[:4]):
            eq((m["stop"], m["tokens_predicted"], len(m["tokens"])), (False, i + 1, 1), "partial %d" % i)
        fin = msgs[-1]
        eq((fin["stop"], fin["content"], fin["tokens_predicted"]), (True, "", 4), "final event")
        check("timings" in fin and fin["id_slot"] >= 0, "final event has timings and id_slot")
        times = sorted(set(round(t, 3) for t, _ in ev))
        check(len(times) >= 2 and ev[-1][0] - ev[0][0] >= 0.08,
              "events arrive over time, not at once (%.3f s)" % (ev[-1][0] - ev[0][0]))
        check(ev[1][0] - ev[0][0] >= 0.02, "first two tokens arrive at different times")

        ev, hdr = stream_events(d.base, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "stream": True})
        eq(hdr.get("transfer-encoding"), "chunked", "chat SSE uses chunked encoding")
        lines = [l for _, l in ev]
        eq(lines[-1], "data: [DONE]", "chat stream ends with [DONE]")
        msgs = [json.loads(l[6:]) for l in lines[:-1]]
        eq(len(msgs), 4, "3 deltas + final")
        for m in msgs[:3]:
            eq(m["object"], "chat.completion.chunk", "chunk object")
            check("content" in m["choices"][0]["delta"] and m["choices"][0]["finish_reason"] is None, "delta chunk")
        fin = msgs[-1]
        eq(fin["choices"][0]["finish_reason"], "length", "final finish_reason")
        check("timings" in fin and "usage" in fin, "final chunk has timings and usage")
        check(ev[-2][0] - ev[0][0] >= 0.06, "chat chunks arrive over time")

        ev, _ = stream_events(d.base, "/v1/completions", {"prompt": "abc", "max_tokens": 2, "stream": True})
        eq(ev[-1][1], "data: [DONE]", "OAI completion stream ends with [DONE]")
        eq(json.loads(ev[-2][1][6:])["choices"][0]["finish_reason"], "length", "OAI completion final chunk")
    finally:
        d.config(gen_ms_per_token=0.0)


def t_oai(d):
    st, r = d.post("/v1/completions", {"prompt": "Once upon", "max_tokens": 3, "id_slot": 1, "cache_prompt": True})
    eq(st, 200, "/v1/completions status")
    eq(r["object"], "text_completion", "object")
    c = r["choices"][0]
    eq((c["index"], c["logprobs"], c["finish_reason"]), (0, None, "length"), "choice")
    eq(r["usage"]["completion_tokens"], 3, "usage.completion_tokens")
    eq(r["usage"]["total_tokens"], r["usage"]["prompt_tokens"] + 3, "usage.total_tokens")
    check(r["id"].startswith("chatcmpl-") and "timings" in r and "system_fingerprint" in r, "id, timings")
    st, r = d.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                            "id_slot": 0})
    eq(st, 200, "/v1/chat/completions status")
    eq(r["object"], "chat.completion", "chat object")
    eq(r["choices"][0]["message"]["role"], "assistant", "chat message role")
    eq(r["choices"][0]["finish_reason"], "length", "chat finish_reason")
    check("timings" in r, "chat timings")
    prompt = d.post("/apply-template", {"messages": [{"role": "user", "content": "Hi"}]})[1]["prompt"]
    eq(r["usage"]["prompt_tokens"], len(d.tokenize(prompt)), "chat prompt = template, with BOS")


def t_zero_token_crash(d):
    d.action(1, "erase", {})
    st, s = d.action(1, "save", {"filename": "empty.bin"})
    eq((st, s["n_saved"], s["n_written"]), (200, 0, 72), "saving an empty slot writes a 0-token file")
    fx = fixture("v2/empty.bin")
    if fx:
        eq(os.path.getsize(fx), 72, "real empty.bin is 72 bytes too")
    f = parse_slot_file(d.path("empty.bin"))
    eq((f["n"], f["cell_count"], f["n_layer"]), (0, 0, 2), "0-token file layout")
    try:
        d.action(0, "restore", {"filename": "empty.bin"})
    except Exception:
        pass
    try:
        rc = d.proc.wait(5)
    except subprocess.TimeoutExpired:
        raise Failure("restoring a 0-token file must kill the double")
    eq(rc, 134, "exit status after the 0-token restore")


# --------------------------------------------------------------------------
# checks on the ik_llama.cpp flavour

def t_ik(d):
    st, s = d.get("/slots")
    eq((st, len(s)), (200, 2), "ik serves /slots without a flag")
    check(all("cache_tokens" not in x and "tokens" not in x for x in s), "/slots shows no cached tokens")
    prompt = "y" * 258
    r = d.completion(prompt, slot=0, n_predict=16)
    eq(r["tokens_cached"], 274, "tokens cached")
    st, sv = d.action(0, "save", {"filename": "ik.bin"})
    eq(st, 200, "ik save")
    f = parse_slot_file(d.path("ik.bin"))
    eq((f["magic"], f["version"], f["n"]), (MAGIC, 4, 274), "ik header")
    eq(f["v_trans"], 0, "ik (flash attention by default) stores V untransposed")
    eq(f["tail"], b"\0" * 8, "8 zero bytes after the v2-like state")
    eq(f["size"], 73512, "ik file size")
    eq(sv["n_written"], 73512, "ik n_written")
    with open(d.path("ik.bin.tokens.json"), "rb") as fh:
        side_raw = fh.read()
    side = json.loads(side_raw)
    eq(list(side), ["has_mtmd", "map_idx_to_media", "tokens", "magic", "version"], "sidecar keys")
    eq((side["has_mtmd"], side["map_idx_to_media"], side["tokens"]), (False, [], f["tokens"]), "sidecar content")
    fx = fixture("v4-ik/chat-a-turn1.bin")
    if fx:
        real = parse_slot_file(fx)
        for k in ("magic", "version", "n", "cells", "v_trans", "n_layer", "k", "v", "size", "tail"):
            eq(f[k], real[k], "ik layout field %s (double vs real file)" % k)
        with open(fx + ".tokens.json") as fh:
            eq(list(json.load(fh)), list(side), "sidecar keys = real sidecar keys")
    else:
        note("SKIP comparison with v4-ik/chat-a-turn1.bin: no fixtures at %s" % FIX)
    # restore with the sidecar
    d.action(0, "erase", {})
    st, rr = d.action(0, "restore", {"filename": "ik.bin"})
    eq((st, rr["n_restored"]), (200, 274), "ik restore")
    ext = prompt + r["content"] + " more"
    r2 = d.completion(ext, slot=0)
    eq(r2["timings"]["prompt_n"], len(d.tokenize(ext)) - 274, "ik restore is used")
    # restore without the sidecar: the slot believes it holds n_ctx tokens that match nothing
    shutil.copy(d.path("ik.bin"), d.path("ik-alone.bin"))
    st, rr = d.action(1, "restore", {"filename": "ik-alone.bin"})
    eq((st, rr["n_restored"]), (200, 274), "ik restore without sidecar answers success")
    ss = d.slot_state(1)
    eq((ss["n_tokens"], ss["garbage"]), (1024, True), "the slot believes it holds n_ctx tokens")
    r3 = d.completion(ext, slot=1)
    eq(r3["timings"]["prompt_n"], len(d.tokenize(ext)), "nothing of a sidecar-less restore is reused")
    # a real ik file restores (verify_kv off: its KV bytes are real ones)
    if fx:
        shutil.copy(fx, d.path("real-ik.bin"))
        shutil.copy(fx + ".tokens.json", d.path("real-ik.bin.tokens.json"))
        d.config(verify_kv=False)
        st, rr = d.action(1, "restore", {"filename": "real-ik.bin"})
        eq((st, rr["n_restored"]), (200, 274), "real ik file restores")
        eq(d.slot_state(1)["tokens"], real["tokens"], "restored tokens come from the sidecar")
        d.config(verify_kv=True)
    # failed slot actions never get an answer; after 3 the whole server stops answering
    check(hangs(d.base, "POST", "/slots/0?action=restore", {"filename": "missing.bin"}), "ik: failed restore hangs")
    st, _ = d.get("/health")
    eq(st, 200, "ik still answers after one hang")
    check(hangs(d.base, "POST", "/slots/0?action=save", {"filename": "../bad"}), "ik: invalid filename hangs")
    check(hangs(d.base, "POST", "/slots/9?action=erase", {}), "ik: invalid slot hangs")
    check(hangs(d.base, "GET", "/health"), "ik: the server stops answering after 3 hung slot actions")
    check(d.state()["wedged"], "state reports the wedge")


# --------------------------------------------------------------------------
# the double's files against the real ones, configured like the servers that wrote them

MICRO = ["-c", "8192", "--parallel", "2", "--n-layer", "2", "--kv-bytes-per-token", "256"]
MICRO_Q8 = ["-c", "8192", "--parallel", "2", "--n-layer", "2", "--kv-bytes-per-token", "136",
            "-ctk", "q8_0", "-ctv", "q8_0"]
ISWA = ["-c", "8192", "--parallel", "2", "--model-kind", "iswa", "--n-layer", "6",
        "--n-embd-k-gqa", "32", "--n-embd-v-gqa", "32"]
RECURRENT = ["-c", "8192", "--parallel", "2", "--model-kind", "recurrent", "--n-layer", "2"]
FIXTURE_SETUPS = [
    # folder, model kind, layout generation, the double's options
    ("v2", "dense", 2025, MICRO + ["--state-format", "2025", "--slots"]),
    ("v2-flash-attn", "dense", 2025, MICRO + ["--state-format", "2025", "--slots", "-fa"]),
    ("v2-q8", "dense", 2025, MICRO_Q8 + ["--state-format", "2025", "--slots", "-fa"]),
    ("v4-ik", "dense", 2025, MICRO + ["--flavor", "ik"]),
    ("v2-2026", "dense", 2026, MICRO + ["-fa", "off"]),
    ("v2-2026-kvu", "dense", 2026, MICRO + ["-kvu", "-fa", "off"]),
    ("v2-2026-fa", "dense", 2026, MICRO + ["-fa", "on"]),
    ("v2-2026-q8", "dense", 2026, MICRO_Q8 + ["-fa", "on"]),
    ("v2-2026-iswa", "iswa", 2026, ISWA),
    ("v2-2026-iswa-swafull", "iswa", 2026, ISWA + ["--swa-full"]),
    ("v2-2026-recurrent", "recurrent", 2026, RECURRENT),
    ("v2-2026-packed", "dense", 2026, MICRO + ["--token-form", "packed"]),
    ("v3-2026-10", "dense", 2026, MICRO + ["--file-version", "3"]),
    ("v3-2026-10-iswa", "iswa", 2026, ISWA + ["--file-version", "3"]),
    ("v3-2026-10-recurrent", "recurrent", 2026, RECURRENT + ["--file-version", "3"]),
]
CHAT_FILES = ("chat-a-turn1", "chat-a-turn2", "chat-b-turn1")
FAST = ["--prefill-ms-per-token", "0", "--gen-ms-per-token", "0"]


def start_fixture_doubles(tmp):
    """One double per fixture folder (started together: they are independent)."""
    out = []
    for folder, kind, fmt, opts in FIXTURE_SETUPS:
        if not fixture(folder + "/empty.bin"):
            note("SKIP %s: no fixture folder" % folder)
            continue
        out.append((folder, kind, fmt, Double(tmp, "fx-" + folder, *(opts + FAST))))
    return out


def t_fixture_layouts(setups):
    """Save through the double the token arrays of the real files: the same size and the same
    bytes except K/V/R/S row data; empty.bin exactly."""
    for folder, kind, fmt, d in setups:
        try:
            man = {}
            if fixture(folder + "/manifest.json"):
                with open(fixture(folder + "/manifest.json")) as f:
                    man = json.load(f)
            for name in CHAT_FILES:
                real_path = fixture("%s/%s.bin" % (folder, name))
                with open(real_path, "rb") as f:
                    real_b = f.read()
                real = parse_state_file(real_b, kind, fmt)
                toks = real["tokens"]
                r = d.completion(toks, slot=0, n_predict=1)
                eq(r["tokens_cached"], len(toks), "%s/%s: the slot holds the file's tokens" % (folder, name))
                st, sv = d.action(0, "save", {"filename": name + ".bin"})
                eq(st, 200, "%s/%s: save" % (folder, name))
                what = "%s/%s" % (folder, name)
                mine_b, _ = same_but_rows(d.path(name + ".bin"), real_path, what)
                mine = parse_state_file(mine_b, kind, fmt)
                eq(sorted(mine["rows"]), sorted(real["rows"]), what + ": row spans")
                compare_masked(mine_b, real_b, real["rows"], what)
                eq(sv["n_written"], len(real_b), what + ": n_written")
                if isinstance(man.get(name), dict) and "save" in man[name]:
                    eq((sv["n_saved"], sv["n_written"]),
                       (man[name]["save"]["n_saved"], man[name]["save"]["n_written"]), what + ": save answer")
                if folder == "v4-ik":
                    with open(d.path(name + ".bin.tokens.json"), "rb") as f1, \
                            open(real_path + ".tokens.json", "rb") as f2:
                        eq(f1.read(), f2.read(), what + ": the .tokens.json sidecar, byte for byte")
            st, _ = d.action(0, "erase", {})
            eq(st, 200, folder + ": erase")
            st, sv = d.action(0, "save", {"filename": "empty.bin"})
            with open(d.path("empty.bin"), "rb") as f1, open(fixture(folder + "/empty.bin"), "rb") as f2:
                a, b = f1.read(), f2.read()
            eq(a, b, folder + "/empty.bin, byte for byte")
            eq(sv["n_written"], len(b), folder + "/empty.bin n_written")
            if folder == "v4-ik":
                with open(d.path("empty.bin.tokens.json"), "rb") as f1, \
                        open(fixture(folder + "/empty.bin.tokens.json"), "rb") as f2:
                    eq(f1.read(), f2.read(), folder + "/empty.bin.tokens.json")
        except Failure as e:
            raise Failure("%s (double started with %s)" % (e, " ".join(
                next(o for f, _, _, o in FIXTURE_SETUPS if f == folder))))


def t_fixture_restores(setups):
    """Real files restored into doubles configured like their servers (verify_kv off), and the
    reuse rules of today's server: n_stream mismatch, SWA pos_min check, recurrent rollback."""
    by = {f: (kind, fmt, d) for f, kind, fmt, d in setups}
    extra = [300, 301, 302]
    # prompt_n of the next request: (file tokens + 3, the turn-2 prompt, the file's tokens again)
    expect = {"v2-2026": (3, 45, 1), "v2-2026-kvu": (3, 45, 1), "v2-2026-fa": (3, 45, 1),
              "v2-2026-q8": (3, 45, 1), "v2-2026-packed": (3, 45, 1),
              "v2-2026-iswa": (277, 319, 274), "v2-2026-iswa-swafull": (3, 60, 1),
              "v2-2026-recurrent": (3, 319, 274)}
    for folder, (kind, fmt, d) in sorted(by.items()):
        if fmt != 2026:
            continue
        d.config(verify_kv=False)
        path = fixture(folder + "/chat-a-turn1.bin")
        shutil.copy(path, d.path("real.bin"))
        with open(path, "rb") as f:
            real = parse_state_file(f.read(), kind, fmt)
        toks = real["tokens"]
        st, r = d.action(1, "restore", {"filename": "real.bin"})
        eq((st, r.get("n_restored"), r.get("n_read")), (200, len(toks), real["size"]),
           folder + ": the real file restores into slot 1")
        eq(d.slot_state(1)["tokens"], toks, folder + ": restored tokens")
        if folder not in expect:
            continue
        with open(fixture(folder + "/manifest.json")) as f:
            turn2 = json.load(f)["chat-a-turn2"]["prompt_tokens"]
        for prompt, want, what in ((toks + extra, expect[folder][0], "the file's tokens + 3"),
                                   (turn2, expect[folder][1], "the turn-2 prompt"),
                                   (toks, expect[folder][2], "the file's tokens again")):
            st, r = d.action(1, "restore", {"filename": "real.bin"})
            eq(st, 200, folder + ": restore")
            c = d.completion(prompt, slot=1, n_predict=1)
            eq(c["timings"]["prompt_n"], want, "%s: prompt_n after a restore, prompt = %s" % (folder, what))
            eq(c["timings"]["cache_n"], len(prompt) - want, folder + ": cache_n")
    if "v2-2026" in by and "v2-2026-kvu" in by:
        d = by["v2-2026"][2]
        d.action(1, "restore", {"filename": "real.bin"})
        for other, why in (("v2-2026-kvu", "n_stream 1 into 2 streams"), ("v2", "the Feb 2025 layout"),
                           ("v3-2026-10", "version 3 into a version-2 server")):
            if not fixture(other + "/chat-a-turn1.bin"):
                continue
            shutil.copy(fixture(other + "/chat-a-turn1.bin"), d.path(other + ".bin"))
            eq(d.slot_state(1)["n_tokens"] > 0, True, "slot 1 holds tokens before the failed restore")
            st, r = d.action(1, "restore", {"filename": other + ".bin"})
            eq((st, r["error"]["message"]), (400, "Unable to restore slot, no available space in KV cache "
                                                  "or invalid slot save file"), "refused: " + why)
            eq(d.slot_state(1)["n_tokens"], 0, "a failed restore clears the slot (%s)" % why)
            d.action(1, "restore", {"filename": "real.bin"})
        # a 0-token file restores on today's server (no crash)
        shutil.copy(fixture("v2-2026/empty.bin"), d.path("real-empty.bin"))
        st, r = d.action(1, "restore", {"filename": "real-empty.bin"})
        eq((st, r.get("n_restored"), r.get("n_read")), (200, 0, 24), "a 0-token file restores (2026)")
        eq(d.slot_state(1)["n_tokens"], 0, "and leaves the slot empty")
        st, _ = d.get("/health")
        eq(st, 200, "the server lives on after a 0-token restore")
    if "v2-2026-packed" in by and "v2-2026-fa" in by:
        up, mid = by["v2-2026-packed"][2], by["v2-2026-fa"][2]
        shutil.copy(fixture("v2-2026-fa/chat-a-turn1.bin"), up.path("plain.bin"))
        st, r = up.action(0, "restore", {"filename": "plain.bin"})
        eq((st, r.get("n_restored")), (200, 274), "upstream (packed) reads a plain token list too")
        shutil.copy(fixture("v2-2026-packed/chat-a-turn1.bin"), mid.path("packed.bin"))
        st, r = mid.action(0, "restore", {"filename": "packed.bin"})
        eq((st, r.get("n_restored")), (200, 278),
           "mid-2026 takes the packed words for tokens (restore succeeds with n + 4 'tokens')")
        eq(mid.slot_state(0)["tokens"][:3], [-1, 1, 274], "the slot holds the packed words")
        c = mid.completion(parse_state_file(open(fixture("v2-2026-packed/chat-a-turn1.bin"), "rb").read())["tokens"],
                           slot=0, n_predict=1)
        eq(c["timings"]["prompt_n"], 274, "so nothing of it is reused")
        with open(up.path("bad-tokens.bin"), "wb") as f:
            f.write(struct.pack("<III", MAGIC, 2, 3) + struct.pack("<3i", 5, 99999, 7)
                    + open(fixture("v2-2026-fa/chat-a-turn1.bin"), "rb").read()[12 + 274 * 4:])
        st, r = up.action(0, "restore", {"filename": "bad-tokens.bin"})
        eq((st, r["error"]["message"]), (400, "Unable to restore slot: Invalid tokens in slot save file"),
           "upstream validates the restored tokens")
    for _, _, d in by.values():
        d.config(verify_kv=True)


# --------------------------------------------------------------------------
# today's server (2026): slots, streams, the RAM prompt cache, keys, router, /health

def conv(tag, n=40):
    """A prompt of its own from the first byte after BOS (no prefix shared with another tag)."""
    return ("%s: " % tag) * n


def t_today_defaults(d):
    st, p = d.get("/props")
    eq((st, p["total_slots"], p["default_generation_settings"]["n_ctx"]), (200, 4, 4096),
       "no -np: 4 slots (auto), each with the whole context (unified KV)")
    s = d.state()
    eq((s["kv_unified"], s["layout"]["n_stream"], s["flash_attn"], s["state_format"]), (True, 1, True, 2026),
       "auto: unified KV (n_stream 1), -fa auto on, 2026 layout")
    st, sl = d.get("/slots")
    eq((st, len(sl)), (200, 4), "GET /slots is on by default")
    eq(sorted(sl[0]), ["id", "is_processing", "n_ctx", "speculative"], "a slot that never ran a task")
    st, r = d.post("/slots/0?action=save", raw=b"")
    eq((st, r["error"]["code"], r["error"]["type"]), (500, 500, "server_error"),
       "an empty body to save: 500 (json::parse)")
    check("empty input" in r["error"]["message"], "the nlohmann message: %r" % r["error"]["message"])
    st, r = d.post("/slots/1?action=erase", raw=b"")
    eq((st, r), (200, {"id_slot": 1, "n_erased": 0}), "erase reads no body")
    st, r = d.post("/slots/5?action=erase", {})
    eq((st, r.get("id_slot")), (200, 5), "a slot id beyond the slots wraps around (get_slot_by_id)")
    st, r = d.post("/slots/-1?action=erase", {})
    eq((st, r["error"]["message"]), (400, "Invalid slot ID"), "a negative id")
    # a POST without Content-Length is read until the connection closes: no answer
    sk = socket.create_connection(("127.0.0.1", int(d.base.rsplit(":", 1)[1])), timeout=HANG_PROBE)
    try:
        sk.sendall(b"POST /slots/0?action=erase HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            got = sk.recv(100)
        except socket.timeout:
            got = None
        eq(got, None, "a POST without Content-Length gets no answer")
    finally:
        sk.close()
    # a task at a time: A on the LRU slot (the last of the never-used ones), B on another; B's
    # start moves idle A into the RAM cache and clears it (unified KV)
    a = d.completion(conv("A"), n_predict=4)
    eq(a["id_slot"], 3, "LRU among never-used slots: the last one")
    b = d.completion(conv("B"), n_predict=4)
    check(b["id_slot"] != 3, "B goes to another slot")
    eq(d.slot_state(3)["n_tokens"], 0, "idle slot A was cleared when B started")
    st, sv = d.action(3, "save", {"filename": "a-cleared.bin"})
    eq((st, sv["n_saved"]), (200, 0), "a save of the cleared slot holds nothing")
    cache = d.state()["prompt_cache"]
    eq([e["n_tokens"] for e in cache], [a["tokens_cached"]], "A's prompt is in the RAM cache")
    a2_prompt = conv("A") + a["content"] + " and more"
    a2 = d.completion(a2_prompt, n_predict=4)
    n_a2 = len(d.tokenize(a2_prompt))
    eq(a2["timings"]["prompt_n"], n_a2 - a["tokens_cached"], "A's next turn is loaded from the RAM cache")
    eq(a2["timings"]["cache_n"], a["tokens_cached"], "cache_n")
    eq(d.state()["counters"]["cache_loads"], 1, "one load from the cache")
    st, sv = d.action(a2["id_slot"], "save", {"filename": "a2.bin"})
    eq(sv["n_saved"], a2["tokens_cached"], "a save then holds the loaded prompt and the new turn")
    f = parse_state_file(open(d.path("a2.bin"), "rb").read())
    eq((f["sections"][0]["n_stream"], f["sections"][0]["streams"][0]["cells"][0][2]),
       (1, [a2["id_slot"]]), "unified: one stream, seq_id = the slot's id")
    # naming an empty slot: no similarity, f_keep NaN, so no cache lookup: full prefill
    b2_prompt = conv("B") + b["content"] + " and more"
    empty = next(i for i in range(4) if d.slot_state(i)["n_tokens"] == 0 and i != b["id_slot"])
    b2 = d.completion(b2_prompt, slot=empty, n_predict=4)
    eq(b2["timings"]["prompt_n"], len(d.tokenize(b2_prompt)), "a request naming an empty slot prefills in full")
    # the context check of today's server
    st, r = d.post("/completion", {"prompt": "x" * 5000, "n_predict": 1})
    eq((st, r["error"]["type"], r["error"]["n_ctx"], r["error"]["n_prompt_tokens"]),
       (400, "exceed_context_size_error", 4096, 5001), "too long a prompt")
    # the slots share the 4096 cells of the unified KV cache: a restore finds no room while an
    # idle slot holds too many of them (nothing clears idle slots for a restore)
    big = d.completion("y" * 3000, n_predict=1)
    st, sv = d.action(big["id_slot"], "save", {"filename": "big.bin"})
    other = (big["id_slot"] + 1) % 4
    st, r = d.action(other, "restore", {"filename": "big.bin"})
    eq(st, 400, "no room in the unified KV cache for a second copy of 3001 cells")
    d.action(big["id_slot"], "erase", {})
    st, r = d.action(other, "restore", {"filename": "big.bin"})
    eq((st, r.get("n_restored")), (200, 3001), "room again once the other slot is erased")
    d.action(other, "erase", {})
    return "a2.bin"


def t_today_streams(tmp, d2, nocache, today, a2_file):
    """Explicit -np 2 (one KV stream per slot): idle slots cached but kept; cache loads; the
    n_stream rule of restores."""
    a = d2.completion(conv("A"), slot=0, n_predict=4)
    d2.completion(conv("B"), slot=1, n_predict=4)
    eq(d2.slot_state(0)["n_tokens"], a["tokens_cached"], "without unified KV an idle slot is kept")
    eq(len(d2.state()["prompt_cache"]), 1, "but copied into the RAM cache")
    c = d2.completion(conv("C"), slot=0, n_predict=4)
    eq(c["timings"]["prompt_n"], len(d2.tokenize(conv("C"))) - 1, "C replaces A in slot 0 (BOS is shared)")
    a2_prompt = conv("A") + a["content"] + " more"
    a2 = d2.completion(a2_prompt, slot=0, n_predict=4)
    eq(a2["timings"]["prompt_n"], len(d2.tokenize(a2_prompt)) - a["tokens_cached"],
       "A comes back from the RAM cache into slot 0 (it prefixes the prompt better than C)")
    # the same without the cache
    for x in (nocache,):
        x.completion(conv("A"), slot=0, n_predict=4)
        x.completion(conv("C"), slot=0, n_predict=4)
        r = x.completion(a2_prompt, slot=0, n_predict=4)
        eq(r["timings"]["prompt_n"], len(x.tokenize(a2_prompt)) - 1, "--cache-ram 0: A is prefilled again")
        eq(x.state()["prompt_cache"], None, "no cache")
    st, sv = d2.action(1, "save", {"filename": "s1.bin"})
    f = parse_state_file(open(d2.path("s1.bin"), "rb").read())
    sec = f["sections"][0]
    eq((sec["n_stream"], [x["cell_count"] for x in sec["streams"]], sec["streams"][1]["cells"][0][2]),
       (2, [0, sv["n_saved"]], [1]), "slot 1's file: 2 streams, its cells in stream 1 with seq_id 1")
    st, r = d2.action(0, "restore", {"filename": "s1.bin"})
    eq((st, r["n_restored"]), (200, sv["n_saved"]), "restored into slot 0 (stream 0)")
    shutil.copy(d2.path("s1.bin"), today.path("s1.bin"))
    shutil.copy(today.path(a2_file), d2.path("u.bin"))
    for x, name, why in ((today, "s1.bin", "2 streams into 1"), (d2, "u.bin", "1 stream into 2")):
        x.action(0, "erase", {})
        x.completion(conv("Z"), slot=0, n_predict=2)
        st, r = x.action(0, "restore", {"filename": name})
        eq(st, 400, "n_stream mismatch: " + why)
        eq(x.slot_state(0)["n_tokens"], 0, "the failed restore cleared the slot (%s)" % why)


def t_today_models(iswa, rec):
    """The double's own iswa and recurrent files (KV verified); in-slot reuse with checkpoints."""
    p = conv("S", 60)
    n = len(iswa.tokenize(p))
    r = iswa.completion(p, slot=0, n_predict=2)
    eq(r["timings"]["prompt_n"], n, "iswa first prompt")
    r2 = iswa.completion(p + r["content"] + " more", slot=0, n_predict=2)
    eq(r2["timings"]["prompt_n"], len(iswa.tokenize(p + r["content"] + " more")) - r["tokens_cached"],
       "iswa: the next turn in the same slot reuses it")
    st, sv = iswa.action(0, "save", {"filename": "i.bin"})
    f = parse_state_file(open(iswa.path("i.bin"), "rb").read(), "iswa")
    base, swa = (x["streams"][0] for x in f["sections"])
    eq((base["cell_count"], swa["cell_count"], swa["cells"][0][0], base["n_layer"], swa["n_layer"]),
       (sv["n_saved"], 128, sv["n_saved"] - 128, 1, 5), "iswa file: all cells, then the last n_swa")
    st, rr = iswa.action(1, "restore", {"filename": "i.bin"})
    eq(st, 200, "iswa: the double's own file restores with its KV verified")
    toks = iswa.slot_state(1)["tokens"]
    r3 = iswa.completion(toks + [300, 301], slot=1, n_predict=1)
    eq(r3["timings"]["prompt_n"], len(toks) + 2, "iswa without --swa-full: a restored slot is prefilled in full")
    # recurrent: checkpoints let a slot roll back a little; a restore does not
    p = conv("R", 60)
    n = len(rec.tokenize(p))
    r = rec.completion(p, slot=0, n_predict=1)
    eq(rec.slot_state(0)["checkpoints"], [{"n_tokens": n - 4, "pos_min": n - 5, "pos_max": n - 5}],
       "recurrent: a checkpoint 4 tokens before the end of the prompt")
    q = rec.tokenize(p)[:n - 2] + [300, 301, 302]
    r2 = rec.completion(q, slot=0, n_predict=1)
    eq(r2["timings"]["prompt_n"], len(q) - (n - 4), "recurrent: a rollback restores the checkpoint")
    st, sv = rec.action(0, "save", {"filename": "r.bin"})
    f = parse_state_file(open(rec.path("r.bin"), "rb").read(), "recurrent")
    eq((f["cell_count"], f["cells"], f["r"], f["s"]), (1, [(sv["n_saved"] - 1, 0)], [(0, 1536)] * 2, [(0, 8192)] * 2),
       "recurrent file: one cell at the last position, f32 R and S rows")
    st, rr = rec.action(1, "restore", {"filename": "r.bin"})
    eq(st, 200, "recurrent: the double's own file restores with its state verified")
    toks = rec.slot_state(1)["tokens"]
    r3 = rec.completion(toks[:-1] + [400], slot=1, n_predict=1)
    eq(r3["timings"]["prompt_n"], len(toks), "recurrent: no rollback after a restore")
    rec.action(1, "restore", {"filename": "r.bin"})
    r4 = rec.completion(toks + [400], slot=1, n_predict=1)
    eq(r4["timings"]["prompt_n"], 1, "recurrent: an exact extension reuses the restore")


def t_api_key(d):
    st, r = d.get("/props")
    eq((st, r), (401, {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}}),
       "no key: 401")
    for path in ("/health", "/v1/health", "/models", "/v1/models"):
        eq(d.get(path)[0], 200, "%s needs no key" % path)
    eq(d.get("/props", headers={"Authorization": "Bearer k2"})[0], 200, "Authorization: Bearer")
    eq(d.get("/props", headers={"X-Api-Key": "k1"})[0], 200, "X-Api-Key")
    eq(d.get("/props", headers={"Authorization": "Bearer nope"})[0], 401, "a wrong key")
    eq(d.post("/slots/0?action=erase", {})[0], 401, "slot actions need the key")
    eq(d.post("/slots/0?action=erase", {}, headers={"Authorization": "k1"})[0], 200, "a key without Bearer")
    eq(d.get("/no/such/path")[0], 401, "the key is checked before routing")


def t_router(d):
    st, m = d.get("/models")
    eq((st, [x["id"] for x in m["data"]], [x["status"]["value"] for x in m["data"]]),
       (200, ["A", "B"], ["unloaded", "unloaded"]), "router: the models, none loaded")
    for body, msg in (({"filename": "x.bin"}, "model name is missing from the request"),
                      ({"filename": "x.bin", "model": "C"}, "model 'C' not found")):
        st, r = d.post("/slots/0?action=save", body)
        eq((st, r["error"]["message"], r["error"]["type"]), (400, msg, "invalid_request_error"), "router: " + msg)
    st, r = d.get("/slots")
    eq((st, r["error"]["message"]), (400, "model name is missing from the request"), "GET /slots needs ?model=")
    eq(d.post("/slots/0?action=save", raw=b"")[0], 500, "router: an empty body is a JSON error")
    r = d.completion(conv("A"), n_predict=2, model="A", id_slot=0)
    st, sa = d.get("/slots?model=A")
    st2, sb = d.get("/slots?model=B")
    eq((st, st2, "id_task" in sa[0], "id_task" in sb[0]), (200, 200, True, False),
       "router: each model has its own slots (B autoloaded, unused)")
    st, sv = d.post("/slots/0?action=save", {"filename": "ra.bin", "model": "A"})
    eq((st, sv["n_saved"]), (200, r["tokens_cached"]), "router: a save names its model")
    st, sv = d.post("/slots/0?action=save", {"filename": "rb.bin", "model": "B"})
    eq((st, sv["n_saved"]), (200, 0), "model B's slot 0 is empty")
    st, m = d.get("/models")
    eq([x["status"]["value"] for x in m["data"]], ["loaded", "loaded"], "both loaded now")


def t_health_blocks(blocking, free):
    for d, blocks in ((blocking, True), (free, False)):
        d.config(prefill_ms_per_token=3.0)
        try:
            th = threading.Thread(target=lambda: d.completion(conv("H", 70), n_predict=1))
            th.start()
            time.sleep(0.15)
            t0 = time.monotonic()
            st, _ = d.get("/health")
            dt = time.monotonic() - t0
            th.join(TIMEOUT)
            eq(st, 200, "/health")
            if blocks:
                check(dt > 0.25, "--health-blocks-during-prefill: /health waited for the prefill (%.3f s)" % dt)
            else:
                check(dt < 0.2, "/health is answered during a prefill (%.3f s)" % dt)
        finally:
            d.config(prefill_ms_per_token=0.0)


def main():
    tmp = tempfile.mkdtemp(prefix="llama-double-test-")
    doubles = []
    t_start = time.monotonic()
    ok = False
    try:
        common = ["--state-format", "2025", "-c", "2048", "--parallel", "2", "--kv-bytes-per-token", "256", "--n-layer", "2",
                  "--prefill-ms-per-token", "0.05", "--gen-ms-per-token", "0"]
        d = Double(tmp, "llama", *common)
        doubles.append(d)
        steps = [
            ("basic endpoints", lambda: t_basic(d)),
            ("tokenizer and template", lambda: t_tokenizer(d)),
        ]
        state = {}

        def prefix():
            state["file"], state["n"] = t_prefix_reuse_save_restore(d)

        steps += [
            ("prefix reuse, save, erase, restore", prefix),
            ("file size matches the real fixture", lambda: t_fixture_size(d)),
            ("real fixture files", lambda: t_real_fixtures(d)),
            ("errors", lambda: t_errors(d, state["file"], state["n"])),
            ("misbehaviour switches", lambda: t_switches(d, state["file"], state["n"])),
            ("slot actions wait for a busy slot", lambda: t_busy_slot(d)),
            ("streaming", lambda: t_streams(d)),
            ("OpenAI shapes", lambda: t_oai(d)),
            ("0-token restore kills the server", lambda: t_zero_token_crash(d)),
        ]
        for name, fn in steps:
            t0 = time.monotonic()
            fn()
            print("ok   %-45s %.2fs" % (name, time.monotonic() - t0), flush=True)
        ik = Double(tmp, "ik", "--flavor", "ik", *common)
        doubles.append(ik)
        t0 = time.monotonic()
        t_ik(ik)
        print("ok   %-45s %.2fs" % ("ik flavour", time.monotonic() - t0), flush=True)
        t0 = time.monotonic()
        fx = start_fixture_doubles(tmp)
        doubles.extend(x[3] for x in fx)
        t_fixture_layouts(fx)
        print("ok   %-45s %.2fs" % ("layouts match the real files (%d folders)" % len(fx),
                                    time.monotonic() - t0), flush=True)
        t0 = time.monotonic()
        z = ["--prefill-ms-per-token", "0", "--gen-ms-per-token", "0"]
        today = Double(tmp, "today", *z)
        d2 = Double(tmp, "np2", "-np", "2", "-c", "4096", *z)
        nocache = Double(tmp, "nocache", "-np", "2", "-c", "4096", "--cache-ram", "0", *z)
        iswa = Double(tmp, "iswa", "-np", "2", "-c", "4096", "--model-kind", "iswa", "--n-layer", "6",
                      "--kv-bytes-per-token", "768", *z)
        rec = Double(tmp, "rec", "-np", "2", "-c", "4096", "--model-kind", "recurrent", *z)
        keyed = Double(tmp, "keyed", "--api-key", "k1,k2", *z)
        router = Double(tmp, "router", "--router-models", "A,B", *z)
        blocking = Double(tmp, "blocking", "--health-blocks-during-prefill", "-np", "1", *z)
        doubles.extend([today, d2, nocache, iswa, rec, keyed, router, blocking])
        steps = [
            ("today: auto slots, unified KV, RAM cache", lambda: state.update(a2=t_today_defaults(today))),
            ("today: streams per slot, cache, n_stream", lambda: t_today_streams(tmp, d2, nocache, today,
                                                                                  state["a2"])),
            ("today: iswa and recurrent slots", lambda: t_today_models(iswa, rec)),
            ("--api-key", lambda: t_api_key(keyed)),
            ("--router-models", lambda: t_router(router)),
            ("--health-blocks-during-prefill", lambda: t_health_blocks(blocking, today)),
        ]
        for name, fn in steps:
            t1 = time.monotonic()
            fn()
            print("ok   %-45s %.2fs" % (name, time.monotonic() - t1), flush=True)
        t0 = time.monotonic()
        t_fixture_restores(fx)
        print("ok   %-45s %.2fs" % ("real files restore, with today's reuse rules", time.monotonic() - t0),
              flush=True)
        ok = True
    except Failure as e:
        print("FAIL: %s" % e, flush=True)
    except Exception:
        print("FAIL: unexpected error", flush=True)
        traceback.print_exc()
    finally:
        for d in doubles:
            d.stop()
        if not ok:
            for d in doubles:
                try:
                    with open(d.errpath) as f:
                        tail = f.read()[-2000:]
                    if tail.strip():
                        print("--- stderr of the %s double ---\n%s" % (os.path.basename(d.dir), tail))
                except OSError:
                    pass
        shutil.rmtree(tmp, ignore_errors=True)
    print("%s in %.1fs" % ("PASS" if ok else "FAIL", time.monotonic() - t_start))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
