#!/usr/bin/env python3
"""kvtier-llama with the llama-server of today (the double's 2026 generation, see
tests/llama_double/README.md): the layout probe puts KV types, flash attention and stream
counts into the namespace; the packed token payload and version-3 files resume; sliding-window
models without --swa-full stop being restored; recurrent states are restored only when the
prompt extends them; the server's own RAM prompt cache is not duplicated (and a wrong guess about
it corrects itself); four auto slots with unified KV clear idle slots; router mode; API keys on
both sides; a busy backend is not marked down by a slow /health.
"""
import os
import sys

from harness import Failure, check, eq, run
from test_llama_plugin import (LlamaDouble, Plugin, PLUGIN, ProcGroup, conversation, post_json,
                               request, setup, slot_tokens, stopping_cleanly, turn, wait_for,
                               wait_saves, common_prefix)
from harness import Daemon


def completions(dbl):
    return dbl.state()["counters"]["completions"]


def lose_slot_and_return(p, dbl, a, b):
    """A's first turn, saved; B takes the only slot, saved; A's second turn. Returns what
    turn() returns for A's second turn and the tokens A's slot held when it was saved."""
    turn(p, dbl, a, "first question")
    wait_saves(p, 1)
    saved = slot_tokens(dbl)
    turn(p, dbl, b, "another conversation takes the slot")
    wait_saves(p, 2)
    r, toks, expected = turn(p, dbl, a, "second question", saved)
    return r, toks, expected, saved


def test_layout_namespaces(root, procs):
    """The layout probe tells apart what llama-server does not report: flash attention (v_trans)
    and the number of KV streams. A blob of one never reaches the other."""
    d = Daemon(root)
    procs.append(d)
    d.start()
    x = LlamaDouble(root, "double-fa-off", d.slot_dir, extra=["--cache-ram", "0", "-fa", "off"])
    y = LlamaDouble(root, "double-fa-on", d.slot_dir, extra=["--cache-ram", "0", "-fa", "on"])
    z = LlamaDouble(root, "double-2-streams", d.slot_dir, parallel=2,
                    extra=["--cache-ram", "0", "-fa", "off"])
    procs.extend([x, y, z])
    for dbl in (x, y, z):
        dbl.start()
    p = Plugin(root, [x.url, y.url, z.url], "unix:" + d.sock, d.slot_dir,
               extra=["--server-cache-ram", "0"])
    procs.append(p)
    p.start()
    nx, ny, nz = p.namespace(x.url), p.namespace(y.url), p.namespace(z.url)
    check(nx != ny and nx != nz and ny != nz, "three layouts, three namespaces: %s %s %s" %
          (nx, ny, nz))
    # The model part is the same; only the layout tag differs.
    eq(nx.rsplit("/L=", 1)[0], ny.rsplit("/L=", 1)[0], "same model fingerprint")
    log = p.read_log()
    check('v_trans=0' in log and 'v_trans=1' in log, "both V layouts logged")
    check('streams=2' in log and 'streams=1' in log, "both stream counts logged")
    # A conversation saved on x; it comes back while x is busy elsewhere: y and z may serve it
    # but never restore x's blob.
    a = conversation(0)
    turn(p, x, a, "first question")
    wait_saves(p, 1)
    eq(len(d.ls()), 1, "one blob")
    blob_ns = d.ls()[0]["namespace"]
    eq(blob_ns, nx, "saved in x's namespace")
    before = [dbl.state()["counters"]["restores"] for dbl in (y, z)]
    # Occupy nothing: send the next turns; whichever backend takes them, only x may restore.
    for i in range(3):
        turn(p, x, a, "question %d" % i)
    after = [dbl.state()["counters"]["restores"] for dbl in (y, z)]
    eq(after, before, "no restore on another layout")
    eq(p.restores("failed"), 0, "no failed restore")


def test_token_forms(root, procs):
    """The packed token payload of upstream master and the version-3 header of llama.cpp
    v0.4.0: keys are computed from the real tokens, so a conversation resumes."""
    for extra in (["--token-form", "packed"], ["--file-version", "3"],
                  ["--token-form", "packed", "--file-version", "3"]):
        sub = os.path.join(root, "-".join(x.strip("-") for x in extra))
        os.makedirs(sub)
        sub_procs = []
        procs.append(ProcGroup(sub_procs))
        d, (dbl,), p, slot_dir = setup(sub, sub_procs, double_extra=extra)
        check("L=kv-v%s-%s" % ("3" if "3" in extra else "2",
                               "packed" if "packed" in extra else "plain") in p.namespace(dbl.url),
              "the namespace names the format: %s" % p.namespace(dbl.url))
        a, b = conversation(0), conversation(1)
        r, toks, expected, saved = lose_slot_and_return(p, dbl, a, b)
        eq(r["timings"]["prompt_n"], expected, "%s: resumed from the restore" % extra)
        p.wait_restores("ok", 1)
        blobs = d.ls()
        forms = set(bl.get("token_form") for bl in blobs)
        eq(forms, {"packed" if "packed" in extra else "plain"}, "token form recorded")


def test_sliding_window(root, procs):
    """Without --swa-full a restored sliding-window slot is not used (llama-server prefills in
    full): after 3 ignored restores in a row the plugin stops restoring into that backend and
    says why. With --swa-full restores are used."""
    iswa = ["--model-kind", "iswa", "--n-layer", "6"]
    sub = os.path.join(root, "no-swa-full")
    os.makedirs(sub)
    sp = []
    procs.append(ProcGroup(sp))
    d, (dbl,), p, _ = setup(sub, sp, double_extra=iswa)
    check("event=sliding_window_model" in p.read_log(), "the model kind is told at start")
    check("L=kv+swa-" in p.namespace(dbl.url), "two KV sections in the namespace")
    convs = [conversation(0, length=30), conversation(1, length=30)]
    for c in convs:                                  # both saved
        turn(p, dbl, c, "first")
    wait_saves(p, 2)
    for rnd in range(3):                             # each comes back after the other
        for i, c in enumerate(convs):
            turn(p, dbl, c, "round %d" % rnd)
            wait_saves(p, 3 + 2 * rnd + i)
            if p.restores("skipped_ignored"):
                break
        if p.restores("skipped_ignored"):
            break
    wait_for("3 ignored restores", lambda: p.restores("ignored") >= 3)
    eq(p.restores("ignored"), 3, "restores ignored before the pause")
    check("event=restores_paused" in p.read_log() and "--swa-full" in p.read_log(),
          "the pause is logged with the advice")
    turn(p, dbl, convs[0], "after the pause")
    check(p.restores("skipped_ignored") >= 1, "no restore while paused")
    eq(p.restores("ok"), 0, "none used")

    sub = os.path.join(root, "swa-full")
    os.makedirs(sub)
    sp = []
    procs.append(ProcGroup(sp))
    d, (dbl,), p, _ = setup(sub, sp, double_extra=iswa + ["--swa-full"])
    a, b = conversation(0, length=30), conversation(1, length=30)
    r, toks, expected, saved = lose_slot_and_return(p, dbl, a, b)
    eq(r["timings"]["prompt_n"], expected, "with --swa-full the restore is used")
    p.wait_restores("ok", 1)
    eq(p.restores("ignored"), 0, "nothing ignored")
    # A regenerated last turn leaves the blob inside its window: a restore would decode
    # without positions the window needs (wrong tokens on a real server): never sent.
    wait_saves(p, 3)
    turn(p, dbl, b, "B again")
    wait_saves(p, 4)
    regen = a[:-2]
    r, toks, _ = turn(p, dbl, regen, "second, asked again")
    check(p.restores("skipped_rollback") >= 1, "a prefix ending inside the window: not restored")
    eq(p.restores("ok"), 2, "B came back with a restore, the regenerated A without")


def test_recurrent(root, procs):
    """A recurrent state holds its last position only: it is restored when the prompt extends
    the saved tokens exactly (the next chat turn), never when the prompt leaves them (an edited
    or regenerated turn), which llama-server would prefill in full anyway."""
    d, (dbl,), p, _ = setup(root, procs, double_extra=["--model-kind", "recurrent",
                                                       "--n-layer", "2"])
    check("event=recurrent_model" in p.read_log(), "the model kind is told at start")
    check("L=recurrent-" in p.namespace(dbl.url), "recurrent in the namespace")
    a, b = conversation(0), conversation(1)
    r, toks, expected, saved = lose_slot_and_return(p, dbl, a, b)
    eq(common_prefix(toks, saved), len(saved), "the next turn extends the saved tokens")
    eq(r["timings"]["prompt_n"], expected, "restored and used")
    p.wait_restores("ok", 1)
    wait_saves(p, 3)
    # B again, then A with its last turn edited: the prompt leaves A's saved tokens.
    turn(p, dbl, b, "B again")
    wait_saves(p, 4)
    edited = a[:-2] + [{"role": "user", "content": "second question, edited"}]
    r, toks, _ = turn(p, dbl, edited, "and more")
    check(p.restores("skipped_rollback") >= 1, "a prompt leaving the blob is not restored")
    eq(dbl.state()["counters"]["restores"], 2, "A and B came back with a restore, not the edit")
    eq(r["timings"]["prompt_n"], len(toks), "prefilled in full, as llama-server would")


def test_server_cache(root, procs):
    """Today's llama-server keeps prompts in RAM (--cache-ram, on by default): a conversation
    coming back to a slot that holds another one is loaded from there by the server itself,
    so the plugin does not restore it; after a server restart that cache is gone and kvtier
    restores. A server that runs without the cache (the plugin not told) is found out at the
    first wrong guess and restores resume."""
    d, (dbl,), p, slot_dir = setup(root, procs, server_cache=True)
    check("server_cache=on" in p.read_log(), "the plugin models the server's cache")
    a, b = conversation(0), conversation(1)
    r, toks, expected, saved = lose_slot_and_return(p, dbl, a, b)
    eq(r["timings"]["prompt_n"], expected, "the server's own cache brought A back")
    eq(dbl.state()["counters"]["restores"], 0, "no restore sent")
    check(dbl.state()["counters"]["cache_loads"] >= 1, "loaded from the server's RAM cache")
    eq(p.restores("skipped_server_cache"), 1, "counted as left to the server")
    wait_saves(p, 3)
    # A restart empties the server's cache: kvtier restores.
    saved = slot_tokens(dbl)
    port = dbl.port
    dbl.stop()
    wait_for("backend down", lambda: p.m('kvtier_llama_backend_up{backend="%s"}' % dbl.url) == 0)
    dbl2 = LlamaDouble(root, "double-restarted", slot_dir, port=port)
    procs.append(dbl2)
    dbl2.start()
    wait_for("backend up", lambda: p.m('kvtier_llama_backend_up{backend="%s"}' % dbl2.url) == 1)
    r, toks, expected = turn(p, dbl2, a, "third question", saved)
    eq(r["timings"]["prompt_n"], expected, "restored by kvtier after the restart")
    p.wait_restores("ok", 1)

    # The server runs with --cache-ram 0 but the plugin was not told.
    sub = os.path.join(root, "no-cache")
    os.makedirs(sub)
    sp = []
    procs.append(ProcGroup(sp))
    d, (dbl,), p, _ = setup(sub, sp, server_cache=True, double_extra=["--cache-ram", "0"])
    a, b = conversation(0), conversation(1)
    turn(p, dbl, a, "first")
    wait_saves(p, 1)
    turn(p, dbl, b, "first")
    wait_saves(p, 2)
    r, toks, _ = turn(p, dbl, a, "second")            # the plugin guesses wrong once
    wait_for("server_cache_off", lambda: "event=server_cache_off" in p.read_log())
    wait_saves(p, 3)
    saved = slot_tokens(dbl)
    turn(p, dbl, b, "second")
    wait_saves(p, 4)
    r, toks, expected = turn(p, dbl, a, "third", saved)
    eq(r["timings"]["prompt_n"], expected, "restored once the guess was corrected")
    p.wait_restores("ok", 2)                         # B's second turn, then A's third


def test_auto_slots(root, procs):
    """With no --parallel today's server has 4 slots and a unified KV cache, and clears idle
    slots into its RAM cache whenever a task starts. A conversation pinned to a cleared slot is
    not loaded from that cache (an empty slot never consults it): kvtier restores it, and every
    save still finds its slot's contents (a task waits for the backend's saves)."""
    d, (dbl,), p, _ = setup(root, procs, parallel=-1, server_cache=True)
    log = p.read_log()
    check("n_slots=4" in log, "four slots")
    check("streams=1" in log and "server_cache=clears-idle-slots" in log,
          "unified KV seen, idle slots known to be cleared")
    convs = [conversation(i) for i in range(3)]
    for i, c in enumerate(convs):
        turn(p, dbl, c, "first")
        wait_saves(p, i + 1)
    check(dbl.state()["counters"]["idle_slots_cleared"] >= 2, "the server cleared idle slots")
    saved = None
    r, toks, _ = turn(p, dbl, convs[0], "second")
    check(r["timings"]["prompt_n"] < 40, "conversation 0 resumed (prompt_n %d)" %
          r["timings"]["prompt_n"])
    p.wait_restores("ok", 1)
    wait_saves(p, 4)
    eq(p.saves("failed"), 0, "no save found its slot cleared")


def test_router(root, procs):
    """A llama-server in router mode serves several models, each with its own slots: the
    plugin takes URL#MODEL as one backend, sends "model" with its slot actions and ?model=
    with its GETs, and routes each request to the backend of its model."""
    d = Daemon(root)
    procs.append(d)
    d.start()
    r = LlamaDouble(root, "router", d.slot_dir,
                    extra=["--cache-ram", "0", "--router-models", "m1,m2"])
    procs.append(r)
    r.start()
    p = Plugin(root, [r.url + "#m1", r.url + "#m2"], "unix:" + d.sock, d.slot_dir,
               extra=["--server-cache-ram", "0"])
    procs.append(p)
    p.start()
    check(p.namespace(r.url + "#m1") != p.namespace(r.url + "#m2"),
          "two models, two namespaces")
    msgs = {"m1": conversation(0), "m2": conversation(1)}
    for m in ("m1", "m2"):
        msgs[m].append({"role": "user", "content": "first"})
        res = p.chat(msgs[m], model=m)
        msgs[m].append({"role": "assistant", "content": res["choices"][0]["message"]["content"]})
    wait_saves(p, 2)
    nss = sorted(bl["namespace"] for bl in d.ls())
    eq(nss, sorted([p.namespace(r.url + "#m1"), p.namespace(r.url + "#m2")]),
       "one blob per model")
    # Another conversation takes m1's slot; the first one comes back with a restore.
    other = conversation(2) + [{"role": "user", "content": "other"}]
    p.chat(other, model="m1")
    wait_saves(p, 3)
    msgs["m1"].append({"role": "user", "content": "second"})
    res = p.chat(msgs["m1"], model="m1")
    check(res["timings"]["prompt_n"] < 40, "m1's conversation restored (prompt_n %d)" %
          res["timings"]["prompt_n"])
    p.wait_restores("ok", 1)
    # A model no backend entry names is passed through (the router refuses it).
    st, _ = post_json(p.url + "/v1/chat/completions",
                      {"model": "m3", "messages": other, "max_tokens": 2})
    eq(st, 400, "unknown model answered by the router")


def test_api_keys(root, procs):
    """--api-key on the backend (--backend-api-key-file) and for the plugin's own clients
    (--api-key-file): llama-server's rule (Authorization: Bearer, or X-Api-Key) and its 401
    answer; /health stays open."""
    keys = os.path.join(root, "keys")
    os.makedirs(keys)
    bk, ck = os.path.join(keys, "backend"), os.path.join(keys, "clients")
    with open(bk, "w") as f:
        f.write("backend-secret-1\n")
    with open(ck, "w") as f:
        f.write("client-secret-2\n")
    d, (dbl,), p, _ = setup(root, procs, double_extra=["--api-key", "backend-secret-1"],
                            plugin_extra=["--backend-api-key-file", bk, "--api-key-file", ck])
    st, _, raw = request("GET", p.url + "/health")
    eq(st, 200, "/health needs no key")
    body = {"messages": conversation(0) + [{"role": "user", "content": "hi"}], "max_tokens": 4}
    st, _, raw = request("POST", p.url + "/v1/chat/completions", body)
    eq(st, 401, "no key: refused")
    check(b'"authentication_error"' in raw and b"Invalid API Key" in raw, "llama-server's 401")
    st, _, _ = request("POST", p.url + "/v1/chat/completions", body,
                       headers={"Authorization": "Bearer backend-secret-1"})
    eq(st, 401, "the backend's key is not the plugin's")
    st, _, _ = request("GET", p.url + "/metrics")
    eq(st, 401, "/metrics needs the key too")
    st, _, raw = request("POST", p.url + "/v1/chat/completions", body,
                         headers={"Authorization": "Bearer client-secret-2"})
    eq(st, 200, "Bearer key: served")
    st, _, raw = request("POST", p.url + "/v1/chat/completions", body,
                         headers={"X-Api-Key": "client-secret-2"})
    eq(st, 200, "X-Api-Key: served")
    wait_for("a save (the plugin's own calls carry the backend's key)",
             lambda: "event=save outcome=ok" in p.read_log())


def test_busy_backend_health(root, procs):
    """A long prefill must not get a busy backend marked down: ik_llama.cpp's /health timed
    out during a 4K-token prefill while it answered the plugin's own request."""
    d, (dbl,), p, _ = setup(root, procs, double_extra=["--health-blocks-during-prefill",
                                                       "--prefill-ms-per-token", "8"])
    long_conv = conversation(0, length=60)           # ~1,000 tokens: ~8 s of prefill
    turn(p, dbl, long_conv, "a long one")
    log = p.read_log()
    check("event=backend_down" not in log, "not marked down while busy:\n" + log[-2000:])
    eq(p.m('kvtier_llama_backend_up{backend="%s"}' % dbl.url), 1, "still up")


if __name__ == "__main__":
    if not os.access(PLUGIN, os.X_OK):
        print("SKIP: %s is not built" % PLUGIN)
        sys.exit(77)
    tests = [test_layout_namespaces, test_token_forms, test_sliding_window, test_recurrent,
             test_server_cache, test_auto_slots, test_router, test_api_keys,
             test_busy_backend_health]
    only = sys.argv[1:]
    if only:
        tests = [t for t in tests if t.__name__ in only]
    run([stopping_cleanly(t) for t in tests])
