#!/usr/bin/env python3
"""The real-engine double's self-test: llama-server's answers, and its rules run on the real
llama.cpp library (node-llama-cpp 3.21.1, llama.cpp v0.4.0) with the three fixture models.

Exit 0 pass, 1 fail, 77 skip (no Node.js / node-llama-cpp / models; under CI=true: 1).
About 20 s, most of it the four doubles starting (in parallel).
"""
import http.client
import json
import os
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

import realenv

FAILS = []


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def eq(a, b, what):
    if a != b:
        raise AssertionError("%s: expected %r, got %r" % (what, b, a))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Real:
    def __init__(self, name, model, args):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="real-%s-" % name)
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.log = open(os.path.join(self.dir, "double.log"), "wb")
        self.p = subprocess.Popen(["node", realenv.DOUBLE, "-m", realenv.model(model), "--host", "127.0.0.1",
                                   "--port", str(self.port), "--slot-save-path", self.dir, "--temp", "0"] + args,
                                  stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait(self):
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise AssertionError("%s exited: %s" % (self.name, self.read_log()))
            try:
                if self.call("GET", "/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("%s did not start" % self.name)

    def read_log(self):
        return open(self.log.name, "rb").read().decode(errors="replace")[-3000:]

    def call(self, method, path, body=None, raw=None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def post(self, path, body=None, raw=None):
        return self.call("POST", path, body, raw)

    def get(self, path):
        st, r = self.call("GET", path)
        eq(st, 200, "GET " + path)
        return r

    def state(self):
        return self.get("/__double/state?tokens=1")

    def completion(self, prompt, n=4, **kw):
        body = {"prompt": prompt, "n_predict": n, "return_tokens": True}
        body.update(kw)
        st, r = self.post("/completion", body)
        eq(st, 200, "completion: %r" % (r,))
        return r

    def action(self, slot, action, filename=None):
        return self.post("/slots/%d?action=%s" % (slot, action), None if filename is None else {"filename": filename})

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                raise AssertionError("%s did not stop on SIGTERM" % self.name)
        return self.p.returncode


def header(path):
    with open(path, "rb") as f:
        magic, version, n = struct.unpack("<III", f.read(12))
        words = list(struct.unpack("<%di" % n, f.read(4 * n)))
        rest = f.read(8)
    return magic, version, words, rest


WORDS = " ".join("w%d" % i for i in range(120))


def prompt_ids(d, text):
    st, r = d.post("/tokenize", {"content": text, "add_special": True})
    eq(st, 200, "tokenize")
    return r["tokens"]


def t_api(d):
    """The endpoints' shapes."""
    eq(d.get("/health"), {"status": "ok"}, "/health")
    pr = d.get("/props")
    eq(pr["total_slots"], 2, "total_slots")
    eq(pr["default_generation_settings"]["n_ctx"], 4096, "a slot's context: 8192 / 2")
    check(pr["model_path"].endswith("micro.gguf") and "<|im_start|>" in pr["chat_template"], "model and template")
    eq(pr["build_info"], "b1-80fb11a", "the v0.4.0 tree's build_info")
    m = d.get("/v1/models")["data"][0]
    eq((m["meta"]["n_vocab"], m["meta"]["n_ctx_train"], m["meta"]["n_embd"]), (32000, 32768, 64), "model meta")
    sl = d.get("/slots")
    eq([(s["id"], s["n_ctx"], "id_task" in s) for s in sl], [(0, 4096, False), (1, 4096, False)],
       "/slots of a fresh server: no task yet")
    eq(d.call("GET", "/metrics")[0], 501, "/metrics without --metrics")
    eq(d.call("GET", "/nothing")[0], 404, "unknown path")
    st, r = d.post("/tokenize", {"content": "Hello world", "with_pieces": True})
    eq([p["piece"] for p in r["tokens"]], [" Hello", " world"], "pieces (SentencePiece, space prefix)")
    ids = prompt_ids(d, "Hello world")
    eq(ids[0], 1, "add_special: BOS")
    eq(d.post("/detokenize", {"tokens": ids})[1]["content"], "<s> Hello world", "detokenize (specials shown)")
    st, r = d.post("/apply-template", {"messages": [{"role": "system", "content": "S"},
                                                    {"role": "user", "content": "U"}]})
    eq(r["prompt"], "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n",
       "ChatML through llama.cpp's Jinja engine")
    st, r = d.post("/completion", {"prompt": ["a", "b"]})
    eq(st, 400, "multi-prompt refused")
    st, r = d.post("/completion", {"prompt": "x " * 5000, "n_predict": 1})
    eq((st, r["error"]["type"], r["error"]["n_ctx"]), (400, "exceed_context_size_error", 4096), "too long")
    st, r = d.post("/completion", raw=b"")
    eq(st, 500, "an empty body is a JSON parse error")


def t_prompt_cache(d):
    """Slot choice and prompt reuse."""
    p = "System: " + WORDS + ". User: tell me a story."
    # the refused prompt of t_api used slot 1 (the last never-used one): LRU gives slot 0
    r = d.completion(p)
    n = r["tokens_evaluated"]
    eq((r["id_slot"], r["timings"]["prompt_n"], r["timings"]["cache_n"]), (0, n, 0),
       "the least recently used slot, everything prefilled")
    eq(d.state()["slots"][0]["n_tokens"], n + 4 - 1, "the slot holds prompt + generated - 1")
    r2 = d.completion(p)
    eq((r2["id_slot"], r2["timings"]["prompt_n"], r2["timings"]["cache_n"]), (0, 1, n - 1),
       "the same prompt: found by similarity, at least one token evaluated")
    eq(r2["tokens"], r["tokens"], "greedy: the same tokens")
    r3 = d.completion(p + " And another one.")
    check(r3["timings"]["prompt_n"] < 10 and r3["timings"]["cache_n"] == n, "extension: only the new tokens")
    r4 = d.completion("Completely different " + WORDS, id_slot=1)
    eq(r4["id_slot"], 1, "id_slot")
    eq(d.state()["slots"][1]["last_generated"], r4["tokens"], "state shows the generated tokens")


def t_slot_files(d):
    """Save, restore, erase: the library's files, llama-server's answers."""
    ids = prompt_ids(d, "Files: " + WORDS)
    r = d.completion(ids, id_slot=1)
    st = d.state()["slots"][1]
    st_, sv = d.action(1, "save", "s1.bin")
    eq(st_, 200, "save")
    eq(sv["n_saved"], st["n_tokens"], "n_saved")
    path = os.path.join(d.dir, "s1.bin")
    eq(sv["n_written"], os.path.getsize(path), "n_written is the file size")
    magic, version, words, rest = header(path)
    eq((magic, version), (0x67677371, 3), "magic and the library's version 3")
    eq(words[:3] + words[-1:], [-1, 1, st["n_tokens"], 0], "the packed token form of the v0.4.0 server")
    eq(words[3:-1], st["tokens"], "the slot's tokens")
    eq(struct.unpack("<II", rest), (2, 0), "n_stream 2 (one per slot: kv_unified false), stream 0 empty")
    # into the other slot: the cells go to slot 0's stream
    st_, rs = d.action(0, "restore", "s1.bin")
    eq((st_, rs["n_restored"], rs["n_read"]), (200, sv["n_saved"], sv["n_written"]), "restore into slot 0")
    more = ids + r["tokens"] + prompt_ids(d, " next")[1:]
    r2 = d.completion(more, id_slot=0)
    eq(r2["timings"]["prompt_n"], len(more) - sv["n_saved"], "the restored KV is used")
    st_, er = d.action(0, "erase")
    eq((st_, er["n_erased"]), (200, len(more) + 4 - 1), "erase")
    s0 = d.state()["slots"][0]
    eq((s0["n_tokens"], s0["pos_max"]), (0, -1), "erased: tokens and memory")
    # filename validation
    for bad in ["", "../x", "a/b", "x.", " x", "x:y", "a\u2215b", "\ufeffx", "."]:
        st_, r = d.action(0, "save", bad)
        eq((st_, r["error"]["message"]), (400, "Invalid filename"), "filename %r" % bad)
    eq(d.post("/slots/0?action=nope", {})[0], 400, "unknown action")
    eq(d.post("/slots/x?action=erase")[0], 400, "non-numeric slot id")
    st_, r = d.post("/slots/-1?action=erase")
    eq((st_, r["id_slot"]), (200, -1), "-1 wraps to slot 1 (size_t modulo), as the real server does")


def t_restore_errors(d):
    """A failed restore clears the slot and answers 400 "Unable to restore slot: ..."."""
    fix = realenv.FIXTURES
    msg = "Unable to restore slot: No available space in KV cache or invalid slot save file"
    d.completion("Something to lose: " + WORDS, id_slot=0)

    def refused(name, what):
        st, r = d.action(0, "restore", name)
        eq((st, r["error"]["message"]), (400, msg), what)
        s0 = d.state()["slots"][0]
        eq((s0["n_tokens"], s0["pos_max"]), (0, -1), what + ": the slot is cleared")
        d.completion("Something to lose: " + WORDS, id_slot=0)

    refused("missing.bin", "a missing file")
    v2 = os.path.join(fix, "v2-2026", "chat-a-turn1.bin")
    open(os.path.join(d.dir, "v2.bin"), "wb").write(open(v2, "rb").read())
    refused("v2.bin", "a version-2 file (the library reads version 3 only)")
    eq(d.action(0, "save", "good.bin")[0], 200, "save")
    good = open(os.path.join(d.dir, "good.bin"), "rb").read()
    bad = bytearray(good)
    struct.pack_into("<i", bad, 12 + 4 * 5, 999999)
    open(os.path.join(d.dir, "badtok.bin"), "wb").write(bytes(bad))
    st, r = d.action(0, "restore", "badtok.bin")
    eq((st, r["error"]["message"]), (400, "Unable to restore slot: Invalid tokens in slot save file"),
       "server_tokens::validate")
    # a real fixture written by the same library (plain token form, 2 streams): restored and used
    v3 = os.path.join(fix, "v3-2026-10", "chat-a-turn1.bin")
    open(os.path.join(d.dir, "v3.bin"), "wb").write(open(v3, "rb").read())
    st, r = d.action(0, "restore", "v3.bin")
    eq((st, r["n_restored"]), (200, 274), "the v3-2026-10 fixture restores")
    toks = header(v3)[2]
    r = d.completion(toks + [450, 263], id_slot=0)
    eq((r["timings"]["prompt_n"], r["timings"]["cache_n"]), (2, 274), "and its KV is used")


def t_stream_and_concurrency(d):
    c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    c.request("POST", "/v1/chat/completions", body=json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}),
        headers={"Content-Type": "application/json"})
    r = c.getresponse()
    eq((r.status, r.getheader("Content-Type")), (200, "text/event-stream"), "SSE")
    ev = [json.loads(x[6:]) if x != "data: [DONE]" else x
          for x in r.read().decode().split("\n\n") if x.startswith("data: ")]
    c.close()
    eq(ev[0]["choices"][0]["delta"], {"role": "assistant", "content": None}, "first chunk: the role")
    eq(ev[-1], "data: [DONE]", "[DONE] last")
    check("timings" in ev[-2] and ev[-2]["choices"][0]["finish_reason"] == "length", "final chunk")
    # two slots at once
    out, errs = [], []

    def one(i):
        try:
            out.append(d.completion("Parallel %d: " % i + WORDS, n=24, id_slot=i))
        except Exception as e:
            errs.append(repr(e))
    ts = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    eq(errs, [], "parallel errors")
    eq(sorted(r["id_slot"] for r in out), [0, 1], "both slots served")
    solo = d.completion("Parallel 0: " + WORDS, n=24, id_slot=0, cache_prompt=False)
    eq(solo["tokens"], [r for r in out if r["id_slot"] == 0][0]["tokens"],
       "the batch of two sequences gives the tokens of one alone")
    # a client that goes away: the slot is released
    c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    c.request("POST", "/completion", body=json.dumps({"prompt": "Go on " + WORDS, "n_predict": 3000,
                                                       "id_slot": 1, "stream": True}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    r.read1(100)
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    deadline = time.time() + 10
    while d.state()["slots"][1]["is_processing"] and time.time() < deadline:
        time.sleep(0.05)
    check(not d.state()["slots"][1]["is_processing"], "a cancelled request releases its slot")


def restore_cycle(d, n_gen=4):
    """A long prompt saved; another takes the slot; the first restored and extended."""
    ids = prompt_ids(d, "System: " + WORDS + " " + WORDS + ". User: go.")
    r = d.completion(ids, n=n_gen)
    st, sv = d.action(0, "save", "c.bin")
    eq(st, 200, "save")
    d.completion("Other: " + WORDS, n=2)
    st, rs = d.action(0, "restore", "c.bin")
    eq(st, 200, "restore")
    return ids, r["tokens"], sv["n_saved"]


def t_sliding_window(d, swa_full):
    ids, gen, n_saved = restore_cycle(d)
    s0 = d.state()["slots"][0]
    eq(s0["pos_min"], n_saved - 128, "the restored window section holds the last n_swa positions")
    more = ids + gen + prompt_ids(d, " next")[1:]
    before = d.state()["counters"]["full_reprocess"]
    r = d.completion(more)
    if swa_full:
        eq(r["timings"]["prompt_n"], len(more) - n_saved, "--swa-full: the restore is used")
    else:
        eq(r["timings"]["prompt_n"], len(more), "without --swa-full: pos_min rule, full prefill")
        eq(d.state()["counters"]["full_reprocess"], before + 1, "counted")


def t_recurrent(d):
    eq(d.state()["seq_rm"], "full", "common_context_can_seq_rm: a recurrent memory cannot be cut")
    ids, gen, n_saved = restore_cycle(d)
    eq(d.state()["slots"][0]["pos_min"], n_saved - 1, "a recurrent state holds its last position")
    more = ids + gen + prompt_ids(d, " next")[1:]
    r = d.completion(more)
    eq(r["timings"]["prompt_n"], len(more) - n_saved, "extended exactly: the restore is used")
    # the same restore, then a prompt that leaves out the last saved token: no rollback
    st, rs = d.action(0, "restore", "c.bin")
    r = d.completion(ids + gen[:-2] + [450])
    eq(r["timings"]["prompt_n"], len(ids) + len(gen) - 1, "no rollback without a checkpoint: full prefill")
    # context checkpoints (made near the end of a prompt) allow a short rollback
    long_ = prompt_ids(d, "Long: " + " ".join("x%d" % i for i in range(700)))
    d.completion(long_, n=2)
    cps = d.state()["slots"][0]["checkpoints"]
    eq([c["n_tokens"] for c in cps], [len(long_) - 4 - 512, len(long_) - 4],
       "checkpoints 4 + n_ubatch and 4 tokens before the end")
    used = d.state()["counters"]["checkpoints_used"]
    r = d.completion(long_[:-2] + [450, 451, 452])
    eq(r["timings"]["prompt_n"], len(long_) + 1 - (len(long_) - 4),
       "the rollback restores the checkpoint 4 tokens back")
    eq(d.state()["counters"]["checkpoints_used"], used + 1, "checkpoint used")


def t_truncated(d):
    """A truncated slot file aborts the library (and a real llama-server v0.4.0):
    src/llama-context.cpp:3244 GGML_ASSERT(nread <= state_size). kvtier must never send one."""
    d.completion("Truncate me: " + WORDS, id_slot=0)
    eq(d.action(0, "save", "good.bin")[0], 200, "save")
    good = open(os.path.join(d.dir, "good.bin"), "rb").read()
    open(os.path.join(d.dir, "trunc.bin"), "wb").write(good[:len(good) - 100])
    try:
        d.action(0, "restore", "trunc.bin")
    except (OSError, http.client.HTTPException):
        pass
    d.p.wait(20)
    eq(d.p.returncode, -signal.SIGABRT, "the library aborted the process")
    check("GGML_ASSERT(nread <= state_size)" in d.read_log(), "the assertion in the log")


def t_options():
    for args, what in ((["-np", "-1"], "auto slots"), (["--cache-ram", "8192"], "the RAM cache"),
                       (["-kvu"], "unified KV"), (["--host", "0.0.0.0"], "a non-loopback address")):
        p = subprocess.run(["node", realenv.DOUBLE, "-m", realenv.model("micro.gguf")] + args,
                           capture_output=True, timeout=60)
        eq(p.returncode, 2, "%s is refused at start: %s" % (what, p.stderr.decode()[-200:]))


def main():
    realenv.require()
    t0 = time.time()
    doubles = {
        "micro": Real("micro", "micro.gguf", ["-np", "2", "-c", "8192"]),
        "iswa": Real("iswa", "iswa.gguf", ["-np", "1", "-c", "4096"]),
        "iswa-full": Real("iswa-full", "iswa.gguf", ["-np", "1", "-c", "4096", "--swa-full"]),
        "recurrent": Real("recurrent", "recurrent.gguf", ["-np", "1", "-c", "4096"]),
        "doomed": Real("doomed", "micro.gguf", ["-np", "1", "-c", "2048"]),
    }
    tests = [("options", t_options, None), ("api", t_api, "micro"), ("prompt cache", t_prompt_cache, "micro"),
             ("slot files", t_slot_files, "micro"), ("restore errors", t_restore_errors, "micro"),
             ("stream and concurrency", t_stream_and_concurrency, "micro"),
             ("sliding window", lambda d: t_sliding_window(d, False), "iswa"),
             ("sliding window --swa-full", lambda d: t_sliding_window(d, True), "iswa-full"),
             ("recurrent", t_recurrent, "recurrent"), ("truncated file", t_truncated, "doomed")]
    failed = 0
    try:
        for d in doubles.values():
            d.wait()
        print("doubles up in %.1fs" % (time.time() - t0))
        for name, fn, which in tests:
            t1 = time.time()
            try:
                fn(doubles[which]) if which else fn()
                print("PASS %s (%.1fs)" % (name, time.time() - t1))
            except Exception:
                failed += 1
                print("FAIL %s" % name)
                traceback.print_exc()
                if which:
                    print("--- log ---\n" + doubles[which].read_log())
        for d in doubles.values():
            if d.name == "doomed":
                continue
            rc = d.stop()
            if rc != 0:
                failed += 1
                print("FAIL %s exited with %r on SIGTERM" % (d.name, rc))
    finally:
        for d in doubles.values():
            if d.p.poll() is None:
                d.p.kill()
    print("%s in %.1fs" % ("FAILED" if failed else "passed", time.time() - t0))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
