#!/usr/bin/env python3
"""kvtier-llama end to end on a real engine: the real kvtierd, the real plugin, and
tests/llama_double/real/llama_real.mjs (llama-server's slot API on the llama.cpp library
v0.4.0 that node-llama-cpp 3.21.1 ships prebuilt) with the fixture models. Tokens, prefill,
prompt_n, the KV cache and the slot files are the library's; whether a restored slot is used
is llama-server's rule (tools/server/server-context.cpp), run against the library's real
pos_min.

Covers: a conversation that lost its slot resumes with a restore, prefills only its new
tokens and continues with exactly the tokens of an uninterrupted run; the same after a
llama-server kill -9 and restart; a conversation moving to another backend; the prompt_n
verification (one the library refuses as failed); blobs changed in the tier (another token,
truncated, which would abort llama.cpp, corrupt KV of the right size, which prompt_n could not
tell) never sent: Stage checks what it links, drops them, the turn is served from the slot as
it was, fsck --verify finds them too; a sliding-window model
without --swa-full (restores ignored, then paused) and with it (used; a chat turn that leaves
the blob inside the window is not restored); a recurrent model (the next turn restored and
used, an edited one not restored). About 25 s on an idle machine, 45 s on a loaded one.

Needs Node.js and node_modules/node-llama-cpp (scripts/deps): without them it prints
"SKIP: reason" and exits 77, or fails under CI=true.
"""
import os
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "llama_double", "real"))

import realenv  # noqa: E402
import test_llama_plugin as tlp  # noqa: E402
from harness import Daemon, Failure, check, eq, run, slot_tokens as file_tokens  # noqa: E402
from test_llama_plugin import (PLUGIN, Plugin, ProcGroup, common_prefix, conversation,  # noqa: E402
                               post_json, slot_tokens, stopping_cleanly, turn, wait_for, wait_saves)

START_TIMEOUT_S = 120
SimulatedDouble = tlp.LlamaDouble      # setup_real() swaps the module's name for a while


class RealDouble(SimulatedDouble):
    """The real-engine double in the place of tests/llama_double/llama_double.py: the same
    constructor, state() and chat_tokens(), so test_llama_plugin's helpers drive it."""
    model = "micro.gguf"
    flags = ()

    def __init__(self, root, name, slot_dir, port=None, parallel=1, ctx=4096, extra=()):
        SimulatedDouble.__init__(self, root, name, slot_dir, port=port, parallel=parallel, ctx=ctx,
                                 extra=extra)

    def start(self):
        # --temp 0: greedy by default (a real llama-server option), so runs can be compared
        self.spawn(["node", realenv.DOUBLE, "-m", realenv.model(self.model), "--host", "127.0.0.1",
                    "--port", str(self.port), "--slot-save-path", self.slot_dir,
                    "-np", str(self.parallel), "-c", str(self.ctx), "--temp", "0"] +
                   list(self.flags) + self.extra)

        def up():
            if not self.alive():
                raise Failure("the real-engine double exited during start:\n" + self.read_log())
            try:
                return tlp.request("GET", self.url + "/health", timeout=2)[0] == 200
            except OSError:
                return False
        wait_for("the real-engine double on port %d" % self.port, up, timeout=START_TIMEOUT_S)
        return self


def double_class(model="micro.gguf", flags=()):
    return type("RealDouble_" + model.split(".")[0], (RealDouble,), {"model": model, "flags": tuple(flags)})


def setup_real(root, procs, model="micro.gguf", flags=(), **kw):
    """test_llama_plugin.setup() with real-engine doubles (kvtierd, the doubles, the plugin;
    --cache-ram 0 on both sides: the double has no RAM prompt cache)."""
    saved = tlp.LlamaDouble
    tlp.LlamaDouble = double_class(model, flags)
    try:
        kw.setdefault("ctx", 4096)
        return tlp.setup(root, procs, **kw)
    finally:
        tlp.LlamaDouble = saved


def generated(dbl, slot=0):
    """The token ids the slot's last request generated (the double's /__double/state)."""
    return dbl.state()["slots"][slot]["last_generated"]


# ---- the uninterrupted run, computed once per model ------------------------

QUESTIONS = ("first question", "second question", "third question")
_reference = {}


def reference(root, procs, model="micro.gguf", flags=()):
    """Conversation 0 with QUESTIONS asked straight to a fresh double, never losing its slot:
    per turn the assistant's text and the generated token ids."""
    key = (model, tuple(flags))
    if key in _reference:
        return _reference[key]
    sub = os.path.join(root, "reference")
    os.makedirs(sub, exist_ok=True)
    dbl = double_class(model, flags)(sub, "reference", sub)
    procs.append(dbl)
    dbl.start()
    msgs, out = conversation(0), []
    for q in QUESTIONS:
        msgs.append({"role": "user", "content": q})
        st, r = post_json(dbl.url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 8, "id_slot": 0})
        eq(st, 200, "reference turn")
        text = r["choices"][0]["message"]["content"]
        msgs.append({"role": "assistant", "content": text})
        out.append((text, generated(dbl)))
    eq(dbl.state()["counters"]["restores"], 0, "the reference never restores")
    dbl.stop()
    _reference[key] = out
    return out


def check_turn_tokens(dbl, ref, k, what):
    text, toks = ref[k]
    eq(generated(dbl), toks, "%s: turn %d generates the tokens of an uninterrupted run" % (what, k + 1))


# ---- tests -----------------------------------------------------------------

def test_lost_slot(root, procs):
    """A conversation whose slot went to another one resumes with a restore: prompt_n is
    only its new tokens, and it continues with exactly the tokens of an uninterrupted run
    (the KV restored is the real one, bit for bit)."""
    ref = reference(root, procs)
    d, (dbl,), p, slot_dir = setup_real(root, procs)
    a, b = conversation(0), conversation(1)
    r, toks, _ = turn(p, dbl, a, QUESTIONS[0])
    eq(r["choices"][0]["message"]["content"], ref[0][0], "turn 1 as in the reference run")
    check_turn_tokens(dbl, ref, 0, "lost slot")
    wait_saves(p, 1)
    saved = slot_tokens(dbl)
    turn(p, dbl, b, "another conversation takes the slot")
    wait_saves(p, 2)
    check(common_prefix(slot_tokens(dbl), saved) < len(saved) // 2, "the slot no longer holds A")
    before = dbl.state()["counters"]
    r, toks, expected = turn(p, dbl, a, QUESTIONS[1], saved)
    after = dbl.state()["counters"]
    eq(after["restores"] - before["restores"], 1, "A resumed with a restore")
    eq(after["restores_failed"], 0, "which the library accepted")
    eq(r["timings"]["prompt_n"], expected, "and prefilled only its new tokens")
    check(expected < len(toks) // 3 and r["timings"]["cache_n"] == len(toks) - expected,
          "new tokens only: prompt_n %d of %d" % (expected, len(toks)))
    check_turn_tokens(dbl, ref, 1, "lost slot")
    p.wait_restores("ok", 1)
    eq(p.restores("ignored") + p.restores("failed"), 0, "nothing ignored or failed")
    wait_saves(p, 3)
    # the next turn finds its slot as it left it: no restore
    r, toks, expected = turn(p, dbl, a, QUESTIONS[2], slot_tokens(dbl))
    eq(r["timings"]["prompt_n"], expected, "turn 3 reuses the slot's own cache")
    eq(dbl.state()["counters"]["restores"], after["restores"], "no restore needed")
    check_turn_tokens(dbl, ref, 2, "lost slot")


def test_restart(root, procs):
    """llama-server killed (kill -9) and started again on the same port: its slots are
    empty, and the conversation's next turn comes back from kvtier with a restore."""
    ref = reference(root, procs)
    d, (dbl,), p, slot_dir = setup_real(root, procs, plugin_extra=["--slot-check-ms", "0"])
    a = conversation(0)
    turn(p, dbl, a, QUESTIONS[0])
    wait_saves(p, 1)
    saved = slot_tokens(dbl)
    port = dbl.port
    dbl.kill9()
    dbl2 = double_class()(root, "double-restarted", slot_dir, port=port, extra=["--cache-ram", "0"])
    procs.append(dbl2)
    dbl2.start()
    r, toks, expected = turn(p, dbl2, a, QUESTIONS[1], saved)
    eq(dbl2.state()["counters"]["restores"], 1, "the turn after the restart restores")
    eq(r["timings"]["prompt_n"], expected, "and prefills only its new tokens")
    check_turn_tokens(dbl2, ref, 1, "after a restart")
    p.wait_restores("ok", 1)


def test_two_backends(root, procs):
    """A conversation started on one backend continues on the other with a restore (a file
    the first one wrote, loaded into the second one's context)."""
    ref = reference(root, procs)
    d, (x, y), p, slot_dir = setup_real(root, procs, n_backends=2)
    eq(p.namespace(x.url), p.namespace(y.url), "same model, same layout: one namespace")
    x0, y0 = x.state()["counters"]["completions"], y.state()["counters"]["completions"]
    eq((x0, y0), (1, 1), "the layout probe ran one completion on each backend's empty slot")
    a, b, c = conversation(0), conversation(1), conversation(2)
    turn(p, x, a, QUESTIONS[0])                     # A on x
    wait_saves(p, 1)
    saved_a = slot_tokens(x)
    turn(p, x, b, "first question of B")            # B on y
    wait_saves(p, 2)
    eq(y.state()["counters"]["completions"] - y0, 1, "B went to the second backend")
    turn(p, x, c, "first question of C")            # C evicts A from x
    wait_saves(p, 3)
    eq(x.state()["counters"]["completions"] - x0, 2, "C went to the first backend")
    r, toks, expected = turn(p, x, a, QUESTIONS[1], saved_a)
    eq(y.state()["counters"]["completions"] - y0, 2, "A continued on the second backend")
    eq(y.state()["counters"]["restores"], 1, "with a restore")
    eq(r["timings"]["prompt_n"], expected, "A prefilled only its new tokens on the other backend")
    check_turn_tokens(y, ref, 1, "on the other backend")
    p.wait_restores("ok", 1)


def tier_file_of(d, tokens):
    """The path of the tier file of the blob whose token payload is `tokens`."""
    for f in d.tier_files():
        path = os.path.join(d.tier_dir, f)
        try:
            if file_tokens(path) == tokens:
                return path
        except (OSError, struct.error):
            continue
    raise Failure("no tier file holds the %d tokens" % len(tokens))


def refused_by_stage(d, p, dbl, conv, saved, path):
    """The next turn of conv, whose blob (tier file `path`) was changed in the tier: Stage
    refuses it (DATA_LOSS) and drops it, no restore reaches the server, and the turn is
    served from the slot as it was."""
    blob = os.path.basename(path)
    before = dbl.state()["counters"]
    failed = p.restores("failed")
    held = slot_tokens(dbl)
    r, toks, _ = turn(p, dbl, conv, QUESTIONS[1], saved)
    eq(dbl.state()["counters"]["restores"], before["restores"], "no restore sent")
    wait_for("the restore failed at Stage", lambda: p.restores("failed") >= failed + 1)
    eq(r["timings"]["prompt_n"], len(toks) - common_prefix(toks, held),
       "served from the slot as it was")
    check("event=checksum_mismatch blob=%s" % blob in d.read_log() and
          "during=stage" in d.read_log(), "kvtierd dropped the changed blob at Stage")
    check(blob not in [x["blob"] for x in d.ls()], "the changed blob is gone")


def test_verification(root, procs):
    """prompt_n tells what the server did with a restore; the real library decides.
    1. A blob whose token payload no longer matches kvtier's index (changed in the tier):
       Stage checks the bytes it links (review D7), so the blob is dropped with DATA_LOSS and
       nothing reaches the server; the turn is served from the slot as it was.
    2. A blob of another layout forced into one namespace (--namespace: no layout probe):
       flash attention on one backend, off on the other. The library refuses the file
       (incompatible V transposition): failed, the slot is cleared, the request is served
       by a full prefill.
    3. A truncated blob, which aborts llama.cpp v0.4.0 (GGML_ASSERT(nread <= state_size)):
       refused by Stage (its size is not the recorded one) before any slot action; the
       server stays up.
    4. Corrupted KV bytes of the right size, which the server would use (prompt_n cannot
       tell): kvtier fsck --verify finds the blob, and Stage refuses it."""
    # 1 and 3 and 4: one backend
    d, (dbl,), p, slot_dir = setup_real(root, procs)
    convs = [conversation(i) for i in range(4)]
    saved = []
    for c in convs:
        turn(p, dbl, c, QUESTIONS[0])
        wait_saves(p, len(saved) + 1)
        saved.append(slot_tokens(dbl))
    # 1: conversation 0's blob gets another token at position 10
    path = tier_file_of(d, saved[0])
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        words = struct.unpack_from("<3i", data, 12)
        off = 12 + 4 * ((3 if words[0] == -1 else 0) + 10)
        tok = struct.unpack_from("<i", data, off)[0]
        f.seek(off)
        f.write(struct.pack("<i", tok + 1 if tok < 31999 else tok - 1))
    refused_by_stage(d, p, dbl, convs[0], saved[0], path)
    # 3: conversation 1's blob loses its last 100 bytes
    path = tier_file_of(d, saved[1])
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    refused_by_stage(d, p, dbl, convs[1], saved[1], path)
    check(dbl.alive(), "the server is up")
    # 4: conversation 2's blob gets its K rows of layer 0 zeroed (same size)
    wait_for("the saves of both turns", lambda: p.saves("ok") >= 6)
    path = tier_file_of(d, saved[2])
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        n_words = struct.unpack_from("<I", data, 8)[0]
        state = 12 + 4 * n_words
        # n_stream 1, cell_count, cells (pos, n_seq_id, seq_id), v_trans, n_layer, k type + row size
        n_cells = struct.unpack_from("<I", data, state + 4)[0]
        k0 = state + 8 + 12 * n_cells + 8 + 12
        row = struct.unpack_from("<Q", data, k0 - 8)[0]
        data[k0:k0 + row * n_cells] = bytes(row * n_cells)
        f.seek(0)
        f.write(data)
    fs = d.fsck(verify=True)
    check(fs.rc == 1 and "fails its checksum" in fs.out and os.path.basename(path) in fs.out,
          "kvtier fsck --verify finds the corrupt blob: %r" % fs)
    refused_by_stage(d, p, dbl, convs[2], saved[2], path)

    # 2: two layouts in one namespace
    sub = os.path.join(root, "layouts")
    os.makedirs(sub)
    sp = []
    procs.append(ProcGroup(sp))
    d2 = Daemon(sub)
    sp.append(d2)
    d2.start()
    x = double_class("micro.gguf", ["-fa", "on"])(sub, "double-fa-on", d2.slot_dir)
    y = double_class("micro.gguf", ["-fa", "off"])(sub, "double-fa-off", d2.slot_dir)
    sp.extend([x, y])
    x.start()
    y.start()
    q = Plugin(sub, [x.url, y.url], "unix:" + d2.sock, d2.slot_dir,
               ["--server-cache-ram", "0", "--namespace", "one-namespace-for-two-layouts"])
    sp.append(q)
    q.start()
    a = conversation(0)
    turn(q, x, a, QUESTIONS[0])                     # on x (both idle: the first)
    wait_saves(q, 1)
    x.kill9()                                       # the next turn can only go to y
    wait_for("x down", lambda: q.m('kvtier_llama_backend_up{backend="%s"}' % x.url) == 0)
    r, toks, _ = turn(q, y, a, QUESTIONS[1])
    eq((y.state()["counters"]["restores"], y.state()["counters"]["restores_failed"]), (1, 1),
       "the restore was sent and the library refused it")
    check("incompatible V transposition" in y.read_log(),
          "the library's reason in the server's log:\n" + y.read_log())
    eq(r["timings"]["prompt_n"], len(toks), "the failed restore cleared the slot: full prefill")
    wait_for("restore failed", lambda: q.restores("failed") >= 1)
    eq(q.m("kvtier_llama_request_errors_total"), 0, "the request itself succeeded")


def ids_of(dbl, text, bos=False):
    st, r = post_json(dbl.url + "/tokenize", {"content": text, "add_special": bos})
    eq(st, 200, "tokenize")
    return r["tokens"]


def complete_ids(p, prompt, n=8):
    """A /completion with token ids through the plugin (managed like a chat turn)."""
    st, r = post_json(p.url + "/completion", {"prompt": prompt, "n_predict": n, "return_tokens": True})
    eq(st, 200, "completion through the plugin: %r" % (r,))
    return r


def test_sliding_window(root, procs):
    """A sliding-window model (gemma3 architecture, window 128). Its slot files hold the
    window layers' last 128 positions only, so the plugin restores a blob only when the
    prompt extends it whole (token-id turns here: prompt, generated tokens, new ones).
    Without --swa-full, llama-server does not use such a restore (pos_min is past the
    threshold, and a restored slot has no checkpoint): the prompt is prefilled in full, the
    plugin sees it from prompt_n and, after 3 in a row, pauses restores into that backend.
    With --swa-full the restore is used. A chat turn whose reply does not re-tokenize to the
    tokens generated leaves the blob inside the window: not restored (the server would take
    it and decode without the positions the window needs)."""
    sub = os.path.join(root, "no-swa-full")
    os.makedirs(sub)
    sp = []
    procs.append(ProcGroup(sp))
    d, (dbl,), p, _ = setup_real(sub, sp, model="iswa.gguf")
    check("event=sliding_window_model" in p.read_log(), "the model kind is told at start")
    check("L=kv+swa-" in p.namespace(dbl.url), "two KV sections in the namespace")
    prompts = [ids_of(dbl, "%s: you are assistant %d. " % ("AB"[i], i) * 30 + "First question?", bos=True)
               for i in range(2)]
    for i in range(2):
        prompts[i] += complete_ids(p, prompts[i])["tokens"]
        wait_saves(p, i + 1)
    for k, i in enumerate((0, 1, 0)):               # each comes back after the other
        before = dbl.state()["counters"]
        prompts[i] += ids_of(dbl, " Question %d?" % k)
        r = complete_ids(p, prompts[i])
        eq(dbl.state()["counters"]["restores"], before["restores"] + 1, "a restore was sent (%d)" % k)
        eq(dbl.state()["counters"]["full_reprocess"], before["full_reprocess"] + 1,
           "the server forced full re-processing (the pos_min rule)")
        eq(r["timings"]["prompt_n"], len(prompts[i]), "the prompt was prefilled in full")
        prompts[i] += r["tokens"]
        wait_for("ignored restore %d" % (k + 1), lambda: p.restores("ignored") >= k + 1)
        wait_saves(p, 3 + k)
    eq(p.restores("ignored"), 3, "every restore ignored")
    check("event=restores_paused" in p.read_log() and "--swa-full" in p.read_log(),
          "restores paused, with the advice")
    n = dbl.state()["counters"]["restores"]
    prompts[1] += ids_of(dbl, " After the pause?")
    complete_ids(p, prompts[1])
    eq(dbl.state()["counters"]["restores"], n, "no restore while paused")
    check(p.restores("skipped_ignored") >= 1, "counted as skipped")
    eq(p.restores("ok"), 0, "none used")

    sub = os.path.join(root, "swa-full")
    os.makedirs(sub)
    sp = []
    procs.append(ProcGroup(sp))
    d, (dbl,), p, _ = setup_real(sub, sp, model="iswa.gguf", double_extra=["--swa-full"])
    a = ids_of(dbl, "A: you are assistant 0. " * 30 + "First question?", bos=True)
    b = ids_of(dbl, "B: you are assistant 1. " * 30 + "First question?", bos=True)
    a += complete_ids(p, a)["tokens"]
    wait_saves(p, 1)
    saved = slot_tokens(dbl)
    eq(saved, a[:-1], "the slot holds the prompt and the generated tokens but the last")
    complete_ids(p, b)
    wait_saves(p, 2)
    a += ids_of(dbl, " Second question?")
    r = complete_ids(p, a)
    eq(dbl.state()["counters"]["restores"], 1, "restored")
    eq(r["timings"]["prompt_n"], len(a) - len(saved), "with --swa-full the restore is used")
    p.wait_restores("ok", 1)
    eq(p.restores("ignored"), 0, "nothing ignored")
    wait_saves(p, 3)
    # a chat conversation, another takes the slot, its next turn
    c, e = conversation(0, length=30), conversation(1, length=30)
    turn(p, dbl, c, "first")
    wait_saves(p, 4)
    saved = slot_tokens(dbl)
    turn(p, dbl, e, "first")
    wait_saves(p, 5)
    held = slot_tokens(dbl)
    n = dbl.state()["counters"]["restores"]
    r, toks, expected = turn(p, dbl, c, "second", saved)
    print("note: the chat reply re-tokenized %s (%d of the blob's %d tokens kept)" % (
        "exactly" if common_prefix(toks, saved) == len(saved) else "otherwise", common_prefix(toks, saved),
        len(saved)))
    if common_prefix(toks, saved) == len(saved):
        eq(dbl.state()["counters"]["restores"], n + 1, "the next chat turn extends the blob: restored")
        eq(r["timings"]["prompt_n"], expected, "and used")
    else:
        eq(dbl.state()["counters"]["restores"], n, "the reply re-tokenized otherwise: not restored")
        check(p.restores("skipped_rollback") >= 1, "counted as skipped_rollback")
        eq(r["timings"]["prompt_n"], len(toks) - common_prefix(toks, held), "prefilled from what the slot held")


def test_recurrent(root, procs):
    """A recurrent model (mamba architecture): the state holds its last position only.
    1. A chat conversation: the reply re-tokenizes to the tokens generated, so the next turn
       extends the saved tokens exactly: restored and used.
    2. Token-id prompts, each turn the previous prompt, the generated tokens and the new ones:
       restored and used. A turn that leaves the saved tokens (an edit) is not restored, and
       llama-server prefills it in full (no rollback without checkpoints)."""
    d, (dbl,), p, _ = setup_real(root, procs, model="recurrent.gguf")
    check("event=recurrent_model" in p.read_log(), "the model kind is told at start")
    check("L=recurrent-" in p.namespace(dbl.url), "recurrent in the namespace")
    a, b = conversation(0), conversation(1)
    turn(p, dbl, a, QUESTIONS[0])
    wait_saves(p, 1)
    saved = slot_tokens(dbl)
    turn(p, dbl, b, "another conversation takes the slot")
    wait_saves(p, 2)
    r, toks, expected = turn(p, dbl, a, QUESTIONS[1], saved)
    eq(common_prefix(toks, saved), len(saved), "the next chat turn extends the saved tokens")
    eq(dbl.state()["counters"]["restores"], 1, "restored")
    eq(r["timings"]["prompt_n"], expected, "and used")
    p.wait_restores("ok", 1)
    wait_saves(p, 3)

    def ids(text, bos=False):
        return ids_of(dbl, text, bos)

    def complete(prompt):
        return complete_ids(p, prompt)

    a1 = ids("C: you are assistant 2. " * 12 + "First question?", bos=True)
    ra = complete(a1)
    wait_saves(p, 4)
    saved = slot_tokens(dbl)
    eq(saved, a1 + ra["tokens"][:-1], "the slot holds the prompt and the generated tokens but the last")
    b1 = ids("D: you are assistant 3. " * 12 + "First question?", bos=True)
    rb = complete(b1)
    wait_saves(p, 5)
    a2 = a1 + ra["tokens"] + ids(" Second question?")
    r = complete(a2)
    eq(dbl.state()["counters"]["restores"], 2, "the next turn was restored")
    eq(r["timings"]["prompt_n"], len(a2) - len(saved), "and used: only the new tokens prefilled")
    p.wait_restores("ok", 2)
    wait_saves(p, 6)
    complete(b1 + rb["tokens"] + ids(" Another one?"))   # the other's next turn: restored too
    wait_saves(p, 7)
    edited = a1[:-3] + ids(" Edited question?")
    r = complete(edited)
    check(p.restores("skipped_rollback") >= 1, "a prompt that leaves the blob is not restored")
    eq(dbl.state()["counters"]["restores"], 3, "the next turns were restored, the edit was not")
    eq(r["timings"]["prompt_n"], len(edited), "prefilled in full, as llama-server would")


if __name__ == "__main__":
    if not os.access(PLUGIN, os.X_OK):
        print("SKIP: %s is not built (cmake -DKVTIER_PLUGIN=ON)" % PLUGIN)
        sys.exit(77)
    realenv.require()
    tests = [test_lost_slot, test_restart, test_two_backends, test_verification,
             test_sliding_window, test_recurrent]
    only = sys.argv[1:]
    if only:
        tests = [t for t in tests if t.__name__ in only]
    t0 = time.time()
    try:
        run([stopping_cleanly(t) for t in tests])
    finally:
        print("real-engine tests: %.1fs" % (time.time() - t0))
