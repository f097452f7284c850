#!/usr/bin/env python3
"""kvtier-llama end to end: the real kvtierd, the real plugin, and the llama-server test
double (tests/llama_double) as the backend(s).

Covers: conversations round-robin through a 1-slot backend resume with a restore and prefill
only their new tokens; a conversation moves to another backend with a restore; a backend
restart; each misbehaviour of the double (the user's request still succeeds, the outcome is
counted, nothing corrupt is stored, a hung slot action costs at most --slot-timeout-ms);
blobs that must not be restored are never sent; streamed answers pass through chunk by chunk
and unchanged; remote kvtierd (TCP + token, slot directory not shared); the ik_llama.cpp
flavour (sidecars); the plugin's /metrics under promtool.
"""
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from harness import (BIN, Daemon, Failure, Skip, check, eq, free_port, make_slot, run)

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN = os.path.join(BIN, "plugin", "kvtier-llama")
DOUBLE = os.path.join(HERE, "..", "llama_double", "llama_double.py")
TOKEN = "plugin-test-token-0123456789abcdef"
SLOT_TIMEOUT_MS = 1500


# ---------------------------------------------------------------------------
# HTTP helpers (stdlib only; every call has a timeout)

def request(method, url, body=None, timeout=60, headers=None):
    """Returns (status, headers dict, raw bytes)."""
    data = None if body is None else (body if isinstance(body, bytes) else
                                      json.dumps(body).encode())
    h = {"Content-Type": "application/json"} if data is not None else {}
    h.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_json(url, body, timeout=60):
    st, _, raw = request("POST", url, body, timeout)
    return st, json.loads(raw) if raw else None


def get_json(url, timeout=30):
    st, _, raw = request("GET", url, timeout=timeout)
    eq(st, 200, "GET %s" % url)
    return json.loads(raw)


def stream_events(host, port, path, body, timeout=60):
    """POSTs body and reads the answer as it arrives. Returns (status, headers,
    raw body, [(t, bytes read)]); the last read is (t, b"") at the end of the body."""
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("POST", path, body=json.dumps(body).encode(),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        reads, raw = [], b""
        deadline = time.time() + timeout
        while time.time() < deadline:
            b = r.read1(65536) if hasattr(r, "read1") else r.read(1)
            if not b:
                reads.append((time.monotonic(), b""))
                break
            reads.append((time.monotonic(), b))
            raw += b
        return r.status, dict(r.getheaders()), raw, reads
    finally:
        c.close()


def wait_for(what, fn, timeout=20, step=0.05):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(step)
    raise Failure("timed out after %ds waiting for %s (last: %r)" % (timeout, what, last))


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------
# processes

class Proc:
    """A child process with a log file, stopped by its PID when the test ends."""

    def __init__(self, root, name):
        self.root = root
        self.name = name
        self.proc = None
        self.log_path = os.path.join(root, name + ".log")

    def spawn(self, args):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def read_log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-6000:]
        except OSError:
            return ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=20):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise Failure("%s did not stop within %ds of SIGTERM" % (self.name, timeout))
        rc = self.proc.returncode if self.proc else 0
        self.proc = None
        return rc

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class LlamaDouble(Proc):
    def __init__(self, root, name, slot_dir, port=None, parallel=1, ctx=8192, extra=()):
        Proc.__init__(self, root, name)
        self.slot_dir = slot_dir
        self.port = port or free_port()
        self.parallel = parallel
        self.ctx = ctx
        self.extra = list(extra)
        self.url = "http://127.0.0.1:%d" % self.port

    def start(self):
        self.spawn([sys.executable, DOUBLE, "--host", "127.0.0.1", "--port", str(self.port),
                    "--slot-save-path", self.slot_dir, "--parallel", str(self.parallel),
                    "-c", str(self.ctx), "--prefill-ms-per-token", "0.05",
                    "--gen-ms-per-token", "1"] + self.extra)

        def up():
            if not self.alive():
                raise Failure("the double exited during start:\n" + self.read_log())
            try:
                return request("GET", self.url + "/health", timeout=2)[0] == 200
            except OSError:
                return False
        wait_for("the double on port %d" % self.port, up)
        return self

    def state(self, tokens=False):
        return get_json(self.url + "/__double/state" + ("?tokens=1" if tokens else ""))

    def config(self, **kw):
        st, r = post_json(self.url + "/__double/config", kw)
        eq(st, 200, "double config %r" % kw)
        return r

    def chat_tokens(self, messages):
        """The tokens a chat request's slot holds: apply-template, then tokenize with BOS."""
        st, r = post_json(self.url + "/apply-template", {"messages": messages})
        eq(st, 200, "apply-template")
        st, t = post_json(self.url + "/tokenize", {"content": r["prompt"], "add_special": True})
        eq(st, 200, "tokenize")
        return t["tokens"]


class Plugin(Proc):
    def __init__(self, root, backends, kvtier, slot_dir, extra=(), name="plugin"):
        Proc.__init__(self, root, name)
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.args = [PLUGIN, "--listen", "127.0.0.1:%d" % self.port, "--kvtier", kvtier,
                     "--slot-dir", slot_dir, "--slot-timeout-ms", str(SLOT_TIMEOUT_MS),
                     "--health-interval-ms", "200", "--timeout-ms", "60000"]
        for b in backends:
            self.args += ["--backend", b]
        self.args += list(extra)

    def start(self):
        self.spawn(self.args)

        def up():
            if not self.alive():
                raise Failure("kvtier-llama exited during start:\n" + self.read_log())
            try:
                # 401: the plugin takes requests, with --api-key-file only with the key
                return request("GET", self.url + "/metrics", timeout=2)[0] in (200, 401)
            except OSError:
                return False
        wait_for("kvtier-llama on port %d" % self.port, up)
        return self

    def metrics_text(self):
        st, _, raw = request("GET", self.url + "/metrics")
        eq(st, 200, "GET /metrics")
        return raw.decode()

    def metrics(self):
        out = {}
        for line in self.metrics_text().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
        return out

    def m(self, series):
        return self.metrics().get(series, 0.0)

    def restores(self, outcome):
        return self.m('kvtier_llama_restores_total{outcome="%s"}' % outcome)

    def wait_restores(self, outcome, n):
        """Restore outcomes ok and ignored are counted after the answer went out (the
        verification is off the request's critical path): wait for them."""
        wait_for("%d restores %s" % (n, outcome), lambda: self.restores(outcome) >= n, timeout=10)
        eq(self.restores(outcome), n, "restores %s" % outcome)

    def saves(self, outcome):
        return self.m('kvtier_llama_saves_total{outcome="%s"}' % outcome)

    def chat(self, messages, timeout=60, **kw):
        body = {"messages": messages, "max_tokens": 8}
        body.update(kw)
        st, r = post_json(self.url + "/v1/chat/completions", body, timeout)
        eq(st, 200, "chat completion through the plugin: %r" % (r,))
        return r

    def namespace(self, backend_url):
        m = re.search(r"event=backend url=%s up=1 namespace=(\S+)" % re.escape(backend_url),
                      self.read_log())
        check(m, "no namespace logged for %s:\n%s" % (backend_url, self.read_log()))
        return m.group(1)


def setup(root, procs, n_backends=1, parallel=1, remote=False, double_extra=(), plugin_extra=(),
          ctx=8192, kvtierd_extra=(), server_cache=False):
    """kvtierd, the doubles and the plugin. Local: the slot dir is kvtierd's --slot-dir.
    Remote: kvtierd listens on TCP with a token and the slot dir is elsewhere.
    server_cache: the doubles keep today's RAM prompt cache (--cache-ram 8192, idle slots
    cached); without it they run with --cache-ram 0 and the plugin is told so, so that
    what is tested is kvtier's own restores."""
    d = Daemon(root, extra=list(kvtierd_extra))
    slot_dir = d.slot_dir
    kvtier = "unix:" + d.sock
    extra = list(plugin_extra)
    if not server_cache:
        double_extra = ["--cache-ram", "0"] + list(double_extra)
        extra = ["--server-cache-ram", "0"] + extra
    if remote:
        tok = os.path.join(root, "token")
        with open(tok, "w") as f:
            f.write(TOKEN + "\n")
        os.chmod(tok, 0o600)
        port = free_port()
        d.extra += ["--listen", "127.0.0.1:%d" % port, "--auth-token-file", tok]
        kvtier = "127.0.0.1:%d" % port
        slot_dir = os.path.join(root, "remote-slots")
        os.makedirs(slot_dir)
        extra += ["--kvtier-token-file", tok]
    procs.append(d)
    d.start()
    doubles = []
    for i in range(n_backends):
        x = LlamaDouble(root, "double%d" % i, slot_dir, parallel=parallel, ctx=ctx,
                        extra=double_extra)
        procs.append(x)
        doubles.append(x.start())
    p = Plugin(root, [x.url for x in doubles], kvtier, slot_dir, extra)
    procs.append(p)
    p.start()
    return d, doubles, p, slot_dir


def conversation(i, length=12):
    """A conversation whose system prompt differs from the others' from its first byte."""
    return [{"role": "system", "content": "%s: you are assistant %d. " % ("ABCDEFGH"[i], i) *
             length}]


def turn(p, dbl, msgs, text, saved=None):
    """One user turn through the plugin. Returns (response, the tokens of the prompt, the
    prompt_n expected if the slot held `saved`)."""
    msgs.append({"role": "user", "content": text})
    toks = dbl.chat_tokens(msgs)
    r = p.chat(msgs)
    msgs.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
    expected = None if saved is None else len(toks) - common_prefix(toks, saved)
    return r, toks, expected


def slot_tokens(dbl, slot=0):
    return dbl.state(tokens=True)["slots"][slot]["tokens"]


def wait_saves(p, n, what="saves"):
    wait_for("%d ok saves" % n, lambda: p.saves("ok") >= n)


def check_round_robin(p, dbl, rounds=3, n_conv=3):
    """n_conv conversations in turn through one 1-slot backend: from the second round each
    resumes with a restore and prefills only its new tokens."""
    convs = [conversation(i) for i in range(n_conv)]
    saved = [None] * n_conv
    saves = 0
    for rnd in range(rounds):
        for c in range(n_conv):
            before = dbl.state()["counters"]["restores"]
            r, toks, expected = turn(p, dbl, convs[c],
                                     "round %d: tell me about topic %d." % (rnd, 10 * c + rnd),
                                     saved[c])
            after = dbl.state()
            pn = r["timings"]["prompt_n"]
            if rnd == 0:
                eq(after["counters"]["restores"], before, "no restore in round 0")
                check(pn > 200, "round 0 prefills everything (prompt_n %d)" % pn)
            else:
                eq(after["counters"]["restores"], before + 1,
                   "round %d conv %d resumes with a restore" % (rnd, c))
                eq(pn, expected, "round %d conv %d prefills only its new tokens" % (rnd, c))
                check(pn < 120, "new tokens only: prompt_n %d of %d" % (pn, len(toks)))
            eq(after["slots"][0]["last_prompt_n"], pn, "the double's prompt_n")
            saves += 1
            wait_saves(p, saves)
            saved[c] = slot_tokens(dbl)
    return convs


def check_promtool(p):
    if not shutil.which("promtool"):
        raise Skip("promtool (Debian package prometheus) is not installed")
    r = subprocess.run(["promtool", "check", "metrics"], input=p.metrics_text().encode(),
                       capture_output=True, timeout=60)
    check(r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(),
          "promtool check metrics: rc=%d %s%s" % (r.returncode, r.stdout.decode(),
                                                  r.stderr.decode()))


def no_leftovers(slot_dir, allow_staged=False):
    left = [f for f in os.listdir(slot_dir) if f.startswith("kvtier-llama-") or
            f.startswith(".kvtier-") or (not allow_staged and f.startswith("kvtier-"))]
    eq(left, [], "files left in the slot directory")


# ---------------------------------------------------------------------------
# tests

def test_round_robin(root, procs):
    d, (dbl,), p, slot_dir = setup(root, procs)
    check_round_robin(p, dbl)
    eq(p.restores("ok"), 6, "restores ok")
    for o in ("failed", "timeout", "ignored", "skipped_invalid"):
        eq(p.restores(o), 0, "restores %s" % o)
    eq(p.m('kvtier_llama_requests_total{endpoint="/v1/chat/completions",handling="slot"}'), 9,
       "requests counted")
    check(p.m('kvtier_llama_time_to_first_token_seconds_count{restored="true"}') == 6 and
          p.m('kvtier_llama_time_to_first_token_seconds_count{restored="false"}') == 3,
          "TTFT observed with and without a restore")
    check(p.m('kvtier_llama_bytes_moved_total{direction="restore"}') > 0, "restore bytes")
    check(p.m('kvtier_llama_bytes_moved_total{direction="save"}') > 0, "save bytes")
    eq(p.m('kvtier_llama_backend_up{backend="%s"}' % dbl.url), 1, "backend up")
    check("mode=local" in p.read_log(), "local mode (Stage/Adopt)")
    # Supersession keeps one blob per conversation.
    eq(len(d.ls()), 3, "one blob per conversation in kvtierd")
    no_leftovers(slot_dir)
    r = d.fsck()
    check(r.rc == 0, "fsck clean: %r" % r)
    check(dbl.alive(), "the double is alive")
    check_promtool(p)


def test_completion_endpoints(root, procs):
    """/completion with a string and with token ids, and /v1/completions, are slot managed."""
    d, (dbl,), p, slot_dir = setup(root, procs)
    prompt = "Once upon a time there was a long story about kvtier. " * 6
    st, r = post_json(p.url + "/completion", {"prompt": prompt, "n_predict": 4})
    eq(st, 200, "/completion")
    n = r["tokens_evaluated"]
    eq(r["timings"]["prompt_n"], n, "first /completion prefills everything")
    wait_saves(p, 1)
    # Another prompt takes the only slot; then the first one comes back with more text.
    st, _ = post_json(p.url + "/v1/completions", {"prompt": "Z" * 300, "max_tokens": 4})
    eq(st, 200, "/v1/completions")
    wait_saves(p, 2)
    st, r = post_json(p.url + "/completion", {"prompt": prompt + "And then?", "n_predict": 4})
    eq(st, 200, "/completion again")
    check(r["timings"]["prompt_n"] <= 10, "restored: prompt_n %d" % r["timings"]["prompt_n"])
    p.wait_restores("ok", 1)
    # Token ids are used as they are (no BOS added).
    ids = dbl.chat_tokens(conversation(5)) + [50, 51, 52]
    st, r = post_json(p.url + "/completion", {"prompt": ids, "n_predict": 2})
    eq(st, 200, "/completion with token ids")
    eq(r["tokens_evaluated"], len(ids), "token prompt length")
    eq(p.m('kvtier_llama_requests_total{endpoint="/completion",handling="slot"}'), 3,
       "managed /completion requests")
    # Several prompts at once are passed through untouched (the double refuses them: 400).
    st, _ = post_json(p.url + "/completion", {"prompt": ["a", "b"], "n_predict": 2})
    eq(st, 400, "multi-prompt answered by the backend")
    eq(p.m('kvtier_llama_requests_total{endpoint="/completion",handling="passthrough"}'), 1,
       "multi-prompt counted as passthrough")


def test_two_backends(root, procs):
    """A conversation started on one backend continues on the other with a restore."""
    d, (x, y), p, slot_dir = setup(root, procs, n_backends=2)
    eq(p.namespace(x.url), p.namespace(y.url), "same model, same namespace")
    # The layout probe of each backend ran a one-token completion on its empty slot.
    x0, y0 = x.state()["counters"]["completions"], y.state()["counters"]["completions"]
    eq((x0, y0), (1, 1), "one probe completion per backend")
    a, b, c = conversation(0), conversation(1), conversation(2)
    turn(p, x, a, "first question of A")            # A on x (both idle: the first)
    wait_saves(p, 1)
    saved_a = slot_tokens(x)
    turn(p, x, b, "first question of B")            # B on y (least recently used)
    wait_saves(p, 2)
    eq(y.state()["counters"]["completions"] - y0, 1, "B went to the second backend")
    turn(p, x, c, "first question of C")            # C evicts A from x
    wait_saves(p, 3)
    eq(x.state()["counters"]["completions"] - x0, 2, "C went to the first backend")
    r, toks, expected = turn(p, x, a, "second question of A", saved_a)
    # A's second turn: x holds C, y holds B; y is the least recently used.
    eq(y.state()["counters"]["completions"] - y0, 2, "A continued on the second backend")
    eq(y.state()["counters"]["restores"], 1, "with a restore")
    eq(r["timings"]["prompt_n"], expected, "A prefilled only its new tokens on the other backend")
    p.wait_restores("ok", 1)


def test_backend_restart(root, procs):
    """After a llama-server restart, the next turn restores (both when the plugin saw the
    backend go down and when the restart was faster than its health check)."""
    for slots_api, wait_down in ((False, True), (True, False)):
        sub = os.path.join(root, "slots-api-%d" % slots_api)
        os.makedirs(sub)
        sub_procs = []
        procs.append(ProcGroup(sub_procs))
        extra = ["--slots"] if slots_api else ["--no-slots"]
        # A restart faster than the health check is seen through the slot's task id, read
        # before every request here (by default only when the slot was idle >= 1 s).
        d, (dbl,), p, slot_dir = setup(sub, sub_procs, double_extra=extra,
                                       plugin_extra=["--slot-check-ms", "0"])
        a = conversation(0)
        turn(p, dbl, a, "first question")
        wait_saves(p, 1)
        r, toks, expected = turn(p, dbl, a, "second question", slot_tokens(dbl))
        eq(r["timings"]["prompt_n"], expected, "turn 2 reuses the slot's own cache")
        eq(dbl.state()["counters"]["restores"], 0, "no restore needed while the slot holds it")
        wait_saves(p, 2)
        saved = slot_tokens(dbl)
        port = dbl.port
        dbl.stop()
        if wait_down:
            wait_for("backend_up 0", lambda: p.m('kvtier_llama_backend_up{backend="%s"}' %
                                                 dbl.url) == 0)
        dbl2 = LlamaDouble(sub, "double-restarted", slot_dir, port=port,
                           extra=["--cache-ram", "0"] + extra)
        sub_procs.append(dbl2)
        dbl2.start()
        if wait_down:
            wait_for("backend_up 1", lambda: p.m('kvtier_llama_backend_up{backend="%s"}' %
                                                 dbl2.url) == 1)
        r, toks, expected = turn(p, dbl2, a, "third question, after the restart", saved)
        eq(dbl2.state()["counters"]["restores"], 1,
           "the turn after the restart restores (slots_api=%s)" % slots_api)
        eq(r["timings"]["prompt_n"], expected, "and prefills only its new tokens")


class ProcGroup:
    """Several processes stopped together (for tests that start more than one setup)."""

    def __init__(self, procs):
        self.procs = procs
        self.root = "(group)"

    def kill9(self):
        for x in self.procs:
            try:
                x.kill9()
            except Exception:
                pass

    def read_log(self):
        return "\n".join("--- %s ---\n%s" % (getattr(x, "name", "kvtierd"), x.read_log())
                         for x in self.procs)


def test_kvtierd_down(root, procs):
    """kvtierd stops: requests are still served (plain prefill), the failures are counted;
    kvtierd comes back: restores resume."""
    d, (dbl,), p, slot_dir = setup(root, procs)
    a = conversation(0)
    turn(p, dbl, a, "first question of A")
    wait_saves(p, 1)
    saved_a = slot_tokens(dbl)
    d.stop()
    b = conversation(1)
    r, toks, _ = turn(p, dbl, b, "B while kvtierd is down")
    eq(r["timings"]["prompt_n"], len(toks) - common_prefix(toks, saved_a), "served by prefill")
    wait_for("the failed save", lambda: p.saves("failed") >= 1)
    check(p.m('kvtier_llama_kvtier_errors_total{call="lookup"}') >= 1, "lookup failure counted")
    no_leftovers(slot_dir)
    d.start()
    time.sleep(2.5)  # the plugin's back-off after kvtierd failed
    r, toks, expected = turn(p, dbl, a, "A once kvtierd is back", saved_a)
    eq(dbl.state()["counters"]["restores"], 1, "restores resume")
    eq(r["timings"]["prompt_n"], expected, "only the new tokens")


def two_saved_conversations(p, dbl):
    """A and B each saved once; B now holds the only slot. Returns (A's messages, the tokens
    A's blob holds, the tokens the slot holds)."""
    a, b = conversation(0), conversation(1)
    turn(p, dbl, a, "first question of A")
    wait_saves(p, 1)
    saved_a = slot_tokens(dbl)
    turn(p, dbl, b, "first question of B")
    wait_saves(p, 2)
    return a, saved_a, slot_tokens(dbl)


def test_fail_restore(root, procs):
    d, (dbl,), p, slot_dir = setup(root, procs)
    a, saved_a, in_slot = two_saved_conversations(p, dbl)
    blobs = sorted(x["blob"] for x in d.ls())
    dbl.config(fail_restore=True)
    r, toks, _ = turn(p, dbl, a, "second question of A")
    eq(p.restores("failed"), 1, "failed restore counted")
    eq(dbl.state()["counters"]["restores_failed"], 1, "the double refused it")
    eq(r["timings"]["prompt_n"], len(toks), "plain prefill after a failed restore")
    wait_saves(p, 3)
    # The blobs are intact, and A's new save superseded its old one.
    check(len(d.ls()) == 2 and blobs != sorted(x["blob"] for x in d.ls()), "A re-saved")
    r = d.fsck()
    check(r.rc == 0, "fsck clean: %r" % r)
    # kv_fragmented: the other way a real restore fails.
    dbl.config(fail_restore=False, kv_fragmented=True)
    turn(p, dbl, conversation(1), "B again, into a fragmented cache")
    eq(p.restores("failed"), 2, "fragmented cache: restore failed, counted")
    wait_saves(p, 4)
    no_leftovers(slot_dir)


def test_save_fails_silently(root, procs):
    d, (dbl,), p, slot_dir = setup(root, procs)
    dbl.config(save_fails_silently=True)
    turn(p, dbl, conversation(0), "a question")
    wait_for("a failed save", lambda: p.saves("failed") >= 1)
    eq(p.saves("ok"), 0, "no save ok")
    eq(d.ls(), [], "nothing stored")
    no_leftovers(slot_dir)
    dbl.config(save_fails_silently=False)
    turn(p, dbl, conversation(1), "another question")
    wait_saves(p, 1)
    eq(len(d.ls()), 1, "saves work again")


def test_hang_slot_actions(root, procs):
    d, (dbl,), p, slot_dir = setup(root, procs)
    a, saved_a, in_slot = two_saved_conversations(p, dbl)
    dbl.config(hang_slot_actions=True)
    t0 = time.time()
    r, toks, _ = turn(p, dbl, a, "second question of A")
    took = time.time() - t0
    eq(p.restores("timeout"), 1, "restore timeout counted")
    # The restore never ran: the slot still holds B, and A shares only the template's start.
    eq(r["timings"]["prompt_n"], len(toks) - common_prefix(toks, in_slot),
       "plain prefill after a hung restore")
    check(took < SLOT_TIMEOUT_MS / 1000 + 3, "a hung restore costs at most the slot timeout "
          "(took %.1fs)" % took)
    wait_for("a timed-out save", lambda: p.saves("timeout") >= 1)
    eq(len(d.ls()), 2, "nothing stored by the hung save")
    # The next request on the slot waits for that save at most: still bounded.
    dbl.config(hang_slot_actions=False)
    t0 = time.time()
    turn(p, dbl, conversation(2), "C's question")
    check(time.time() - t0 < 2 * SLOT_TIMEOUT_MS / 1000 + 3, "bounded")
    check(dbl.alive(), "the double is alive")
    wait_saves(p, 3)
    no_leftovers(slot_dir)


def test_lost_save_answers(root, procs):
    """A save the server carries out but never answers (ik_llama.cpp's lost result) is seen
    from its file, stored, and frees the slot long before --slot-timeout-ms; the next turn
    of another conversation does not wait for the timeout, and the lost save restores."""
    d, (dbl,), p, slot_dir = setup(root, procs, double_extra=["--slots"],
                                   plugin_extra=["--slot-timeout-ms", "30000"])
    dbl.config(lose_slot_answers=True)
    a, b = conversation(0), conversation(1)
    t0 = time.time()
    turn(p, dbl, a, "first question of A")
    saved_a = slot_tokens(dbl)
    wait_for("A's save, answer lost", lambda: p.saves("answer_lost") >= 1, timeout=25)
    took = time.time() - t0
    check(took < 10, "the lost answer cost %.1f s, not the 30 s slot timeout" % took)
    eq(dbl.state()["counters"]["slot_answers_lost"], 1, "the double lost the answer")
    eq(len(d.ls()), 1, "A's blob stored")
    # B takes the only slot at once (A's save is over), and its save is lost too.
    t0 = time.time()
    turn(p, dbl, b, "first question of B")
    wait_for("B's save, answer lost", lambda: p.saves("answer_lost") >= 2, timeout=25)
    check(time.time() - t0 < 10, "B served and saved in %.1f s" % (time.time() - t0))
    eq(p.saves("timeout"), 0, "no save timed out")
    eq(p.saves("answer_lost"), 2, "saves whose answer was lost")
    eq(dbl.state()["counters"]["slot_answers_lost"], 2, "the double lost both answers")
    eq(len(d.ls()), 2, "A's and B's blobs stored")
    # A comes back: restored from the blob its lost save left (restores are answered here).
    dbl.config(lose_slot_answers=False)
    r, toks, expected = turn(p, dbl, a, "second question of A", saved_a)
    eq(dbl.state()["counters"]["restores"], 1, "A restored")
    eq(r["timings"]["prompt_n"], expected, "A prefilled only its new tokens")
    wait_saves(p, 1)
    eq(p.saves("ok"), 1, "A's second save, answered")
    r = d.fsck()
    check(r.rc == 0, "fsck clean: %r" % r)


def test_ignore_restore(root, procs):
    mport = free_port()
    d, (dbl,), p, slot_dir = setup(root, procs,
                                   kvtierd_extra=["--metrics", "127.0.0.1:%d" % mport])
    a, saved_a, in_slot = two_saved_conversations(p, dbl)
    dbl.config(ignore_restore=True)
    r, toks, _ = turn(p, dbl, a, "second question of A")
    check(r["timings"]["prompt_n"] > len(toks) - 100, "the server prefilled nearly everything")
    p.wait_restores("ignored", 1)
    eq(p.restores("ok"), 0, "not counted as ok")
    def quarantined():
        st, _, raw = request("GET", "http://127.0.0.1:%d/metrics" % mport)
        m = re.search(rb"^kvtier_quarantined_total (\d+)", raw, re.M)
        return int(m.group(1)) if m else None
    wait_for("kvtierd to quarantine the blob", lambda: quarantined() == 1, timeout=10)
    check("event=quarantine" in d.read_log(), "kvtierd logged the quarantine")


def test_never_send_bad_blobs(root, procs):
    """A blob longer than the slot's context is never sent to the backend for restore (the
    double would refuse it; a 0-token one would crash it), and the request is served."""
    d, (dbl,), p, slot_dir = setup(root, procs, ctx=600)
    ns = p.namespace(dbl.url)
    a = conversation(0, length=6)
    a.append({"role": "user", "content": "question"})
    toks = dbl.chat_tokens(a)
    check(64 <= len(toks) < 550, "prompt fits the 600-token slot (%d)" % len(toks))
    big = os.path.join(root, "big.bin")
    make_slot(big, toks + [40] * (1100 - len(toks)))  # past n_ctx (600, padded to 768)
    d.cli("put", "--namespace", ns, big)
    st, r = post_json(p.url + "/v1/chat/completions", {"messages": a, "max_tokens": 4})
    eq(st, 200, "served")
    eq(p.restores("skipped_invalid"), 1, "oversized blob skipped")
    eq(dbl.state()["counters"]["restores"] + dbl.state()["counters"]["restores_failed"], 0,
       "never sent to the backend")
    check(dbl.alive(), "the double is alive")
    # kvtierd refuses a 0-token file outright, so none can be looked up.
    empty = os.path.join(root, "empty.bin")
    make_slot(empty, [])
    r = d.cli("put", "--namespace", ns, empty, check_rc=False)
    check(r.rc != 0, "kvtierd refuses a 0-token blob")
    check(dbl.alive(), "the double is alive")
    # The answer's save was refused by kvtierd: the namespace's KV layout is the hand-made
    # blob's, not the double's. Refused saves leave nothing behind either.
    wait_for("the save's outcome", lambda: p.saves("ok") + p.saves("failed") >= 1)
    eq(p.saves("failed"), 1, "kvtierd refused a blob of another KV layout")
    no_leftovers(slot_dir)


def normalize(raw):
    """SSE events with the fields that differ between two runs (ids, times, timings) blanked."""
    out = []
    for ev in raw.decode().split("\n\n"):
        if ev.startswith("data: {"):
            o = json.loads(ev[6:])
            for k in ("id", "created", "timings"):
                o.pop(k, None)
            out.append(json.dumps(o, sort_keys=True))
        else:
            out.append(ev)
    return out


def test_streaming(root, procs):
    d, (dbl,), p, slot_dir = setup(root, procs)
    msgs = conversation(3) + [{"role": "user", "content": "stream me an answer"}]
    body = {"messages": msgs, "max_tokens": 6, "stream": True}
    dbl.config(gen_ms_per_token=60)
    st, hdrs, raw, reads = stream_events("127.0.0.1", p.port, "/v1/chat/completions", body)
    eq(st, 200, "streamed status")
    check(hdrs.get("Content-Type", "").startswith("text/event-stream"), "SSE content type")
    events = [e for e in raw.split(b"\n\n") if e]
    eq(len(events), 8, "6 tokens, the final chunk and [DONE]")
    eq(events[-1], b"data: [DONE]", "ends with [DONE]")
    # Chunk by chunk: the events arrive spread over the generation, not at once.
    data_reads = [t for t, b in reads if b.strip()]
    check(len(data_reads) >= 4, "read in %d pieces" % len(data_reads))
    check(data_reads[-1] - data_reads[0] >= 0.15, "arrived over %.3fs" %
          (data_reads[-1] - data_reads[0]))
    # The same request straight to the double: the same events.
    st2, hdrs2, raw2, _ = stream_events("127.0.0.1", dbl.port, "/v1/chat/completions", body)
    eq(st2, 200, "direct status")
    eq(normalize(raw), normalize(raw2), "events identical to the backend's")
    eq(hdrs.get("Content-Type"), hdrs2.get("Content-Type"), "content type")
    # /completion streams too, and its final event's timings reach the plugin.
    st, _, raw, _ = stream_events("127.0.0.1", p.port, "/completion",
                                  {"prompt": "x" * 200, "n_predict": 3, "stream": True})
    eq(st, 200, "/completion stream")
    check(b'"stop":true' in raw, "final event passed")
    wait_for("saves after streamed answers", lambda: p.saves("ok") >= 2)
    # A client that leaves mid-stream, or while a long answer is being made: the backend's
    # work is cancelled, the slot is released, the next request is served.
    dbl.config(gen_ms_per_token=100)
    for stream in (True, False):
        c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=30)
        c.request("POST", "/v1/chat/completions", body=json.dumps(
            {"messages": conversation(4), "max_tokens": 60, "stream": stream}).encode(),
            headers={"Content-Type": "application/json"})
        if stream:
            resp = c.getresponse()
            check(resp.read1(65536).startswith(b"data: "), "first event")
        else:
            wait_for("generation under way",
                     lambda: dbl.state()["slots"][0]["is_processing"], timeout=10)
        c.sock.shutdown(2)
        c.close()
        wait_for("the backend to stop generating (stream=%s)" % stream,
                 lambda: not dbl.state()["slots"][0]["is_processing"], timeout=5)
    dbl.config(gen_ms_per_token=1)
    p.chat(conversation(4) + [{"role": "user", "content": "still there?"}])
    check(p.alive() and dbl.alive(), "both alive")
    # Non-streamed pass-through is byte for byte.
    q = {"content": "bytes for bytes", "with_pieces": True}
    a = request("POST", p.url + "/tokenize", q)
    b = request("POST", dbl.url + "/tokenize", q)
    eq(a[0], b[0], "tokenize status")
    eq(a[2], b[2], "tokenize body byte for byte")
    eq(p.m('kvtier_llama_requests_total{endpoint="other",handling="passthrough"}'), 1,
       "pass-through counted")


def test_slot_check(root, procs):
    """--slot-check-ms: a slot idle that long or longer has its task id read (GET /slots)
    before the plugin relies on it, so a slot another client used is noticed and restored
    from kvtier; a slot used less than that long ago is taken as the plugin left it (no
    GET /slots on the request's path), and a change is noticed afterwards from prompt_n.
    A streamed answer ends with the backend's, not after the plugin's later calls."""
    for window, noticed in (("0", True), ("600000", False)):
        sub = os.path.join(root, "window-%s" % window)
        os.makedirs(sub)
        sub_procs = []
        procs.append(ProcGroup(sub_procs))
        # A slot timeout above the 3 s GET /slots below: the plugin waits for it.
        d, (dbl,), p, slot_dir = setup(sub, sub_procs, double_extra=["--slots"],
                                       plugin_extra=["--slot-check-ms", window,
                                                     "--slot-timeout-ms", "10000"])
        a = conversation(0)
        turn(p, dbl, a, "first question")
        wait_saves(p, 1)
        saved = slot_tokens(dbl)
        # Another client takes the slot behind the plugin's back.
        st, _ = post_json(dbl.url + "/completion",
                          {"prompt": "someone else entirely " * 8, "id_slot": 0, "n_predict": 2})
        eq(st, 200, "a completion straight to the double")
        r, toks, expected = turn(p, dbl, a, "second question", saved)
        if noticed:
            eq(p.m('kvtier_llama_slot_resets_total{reason="foreign"}'), 1,
               "the foreign task id noticed before the request")
            eq(dbl.state()["counters"]["restores"], 1, "the conversation restored from kvtier")
            eq(r["timings"]["prompt_n"], expected, "and only its new tokens prefilled")
        else:
            eq(dbl.state()["counters"]["restores"], 0, "not checked, so not restored")
            check(r["timings"]["prompt_n"] > expected + 64,
                  "the whole prompt prefilled (%d, %d with a restore)" %
                  (r["timings"]["prompt_n"], expected))
            wait_for("the change noticed from prompt_n",
                     lambda: p.m('kvtier_llama_slot_resets_total{reason="unexpected_prefill"}')
                     == 1)
            eq(p.m('kvtier_llama_slot_resets_total{reason="foreign"}'), 0, "no foreign check")
            continue
        # A busy server answers GET /slots late: the streamed answer does not wait for it.
        wait_saves(p, 2)
        dbl.config(slots_read_ms=3000)
        slots_reads = dbl.state()["counters"]["slots_reads"]
        a.append({"role": "user", "content": "third question, streamed"})
        st, _, raw, reads = stream_events("127.0.0.1", p.port, "/v1/chat/completions",
                                          {"messages": a, "max_tokens": 4, "stream": True})
        eq(st, 200, "streamed status")
        check(raw.rstrip().endswith(b"data: [DONE]"), "[DONE] passed")
        last_data = max(t for t, b in reads if b.strip())
        check(reads[-1][1] == b"" and reads[-1][0] - last_data < 1.0,
              "the stream ended %.2f s after its last event (GET /slots takes 3 s)" %
              (reads[-1][0] - last_data))
        dbl.config(slots_read_ms=0)
        wait_saves(p, 3)
        # --slot-check-ms 0: one GET /slots before the request, and one after its answer.
        eq(dbl.state()["counters"]["slots_reads"], slots_reads + 2,
           "GET /slots around the streamed request")

    # With two slots: a turn sent as soon as the previous answer ends queues on its own
    # slot while the plugin is still busy with the previous request (GET /slots after it
    # takes 300 ms here) instead of taking the other, idle slot. Then the threshold itself
    # (--slot-check-ms 5000): no GET /slots before a turn that follows at once, one before
    # a turn after 6 s idle (the double counts them; one more follows every answer).
    sub = os.path.join(root, "window-5000")
    os.makedirs(sub)
    sub_procs = []
    procs.append(ProcGroup(sub_procs))
    d, (dbl,), p, slot_dir = setup(sub, sub_procs, parallel=2, double_extra=["--slots"],
                                   plugin_extra=["--slot-check-ms", "5000"])
    a = conversation(1)
    turn(p, dbl, a, "first question")
    wait_saves(p, 1)
    dbl.config(slots_read_ms=300)
    slot = [s["n_tokens"] > 0 for s in dbl.state()["slots"]].index(True)
    for i, q in enumerate(("second question, at once", "third question, at once")):
        r, toks, expected = turn(p, dbl, a, q, slot_tokens(dbl, slot))
        eq(dbl.state()["slots"][slot]["last_prompt_n"], r["timings"]["prompt_n"],
           "turn %d ran on the first turn's slot" % (i + 2))
        eq(r["timings"]["prompt_n"], expected, "and prefilled only its new tokens")
        eq(dbl.state()["slots"][1 - slot]["n_tokens"], 0,
           "the other slot is untouched after turn %d" % (i + 2))
    wait_saves(p, 3)
    for pause, checks in ((0, 0), (6, 1)):
        time.sleep(pause)
        reads = dbl.state()["counters"]["slots_reads"]
        r, toks, expected = turn(p, dbl, a, "a question after %d s" % pause,
                                 slot_tokens(dbl, slot))
        eq(r["timings"]["prompt_n"], expected, "the slot reused after %d s" % pause)
        wait_saves(p, 4 + (pause > 0))
        eq(dbl.state()["counters"]["slots_reads"], reads + checks + 1,
           "GET /slots before the turn after %d s: %d" % (pause, checks))
    eq(dbl.state()["counters"]["restores"], 0, "no restore was needed")
    eq(dbl.state()["slots"][1 - slot]["n_tokens"], 0, "the other slot was never used")
    dbl.config(slots_read_ms=0)


def test_remote_kvtierd(root, procs):
    """kvtierd over TCP with a token and no shared slot directory: blobs are streamed in
    for restores and out after saves; the round-robin test passes the same way."""
    d, (dbl,), p, slot_dir = setup(root, procs, remote=True)
    check("mode=remote" in p.read_log(), "remote mode:\n" + p.read_log())
    check_round_robin(p, dbl)
    eq(p.restores("ok"), 6, "restores ok")
    eq(len(d.ls()), 3, "one blob per conversation")
    no_leftovers(slot_dir, allow_staged=True)
    check(not any(f.startswith("kvtier-") for f in os.listdir(d.slot_dir)),
          "nothing staged in kvtierd's own slot dir")


def test_ik_flavor(root, procs):
    """ik_llama.cpp: version-4 files with a .tokens.json sidecar that must travel with the
    blob; the round robin works the same."""
    d, (dbl,), p, slot_dir = setup(root, procs, double_extra=["--flavor", "ik"],
                                   plugin_extra=["--flash-attn"])
    check_round_robin(p, dbl, rounds=2, n_conv=2)
    blobs = d.ls()
    eq(len(blobs), 2, "two blobs")
    for b in blobs:
        eq(b["sidecars"], [".tokens.json"], "the sidecar is part of the blob")
    eq(dbl.state()["counters"]["slot_actions_hung"], 0, "no slot action failed")


def test_namespaces(root, procs):
    """Backends of different models never share blobs; the plugin says which namespace each
    backend is in and why; --model-file is read (and refused for a server that disagrees)."""
    d = Daemon(root)
    procs.append(d)
    d.start()
    x = LlamaDouble(root, "double-x", d.slot_dir)
    y = LlamaDouble(root, "double-y", d.slot_dir, extra=["-m", "/models/other-model.gguf"])
    procs.extend([x, y])
    x.start()
    y.start()
    p = Plugin(root, [x.url, y.url], "unix:" + d.sock, d.slot_dir)
    procs.append(p)
    p.start()
    check(p.namespace(x.url) != p.namespace(y.url), "different models: different namespaces")
    log = p.read_log()
    eq(log.count("event=backend url="), 2, "one start-up line per backend")
    check("source=props" in log and "why=" in log, "source and reason logged")
    # A conversation on x, its blob saved; the same conversation can never restore on y.
    a = conversation(0)
    turn(p, x, a, "question on x")
    wait_saves(p, 1)
    x.stop()
    wait_for("x down", lambda: p.m('kvtier_llama_backend_up{backend="%s"}' % x.url) == 0)
    turn(p, y, a, "question on y")
    eq(y.state()["counters"]["restores"], 0, "no blob crosses models")
    eq(p.restores("ok") + p.restores("skipped_small"), 0, "nothing even matched")
    # --model-file: the GGUF header is read; this server reports another shape, so the
    # plugin falls back to /props for it and says why.
    gguf = os.environ.get("KVTIER_MODEL_FILE") or os.path.join(
        os.environ.get("KVTIER_FIXTURES", os.path.join(HERE, "..", "fixtures", "llama-slots")),
        "models", "micro.gguf")
    if os.path.exists(gguf):
        q = Plugin(root, [y.url], "unix:" + d.sock, d.slot_dir, ["--model-file", gguf],
                   name="plugin-gguf")
        procs.append(q)
        q.start()
        log = q.read_log()
        check("event=model_file" in log and "arch=llama" in log and "n_embd=64" in log,
              "GGUF header read:\n" + log)
        check("--model-file does not match this server" in log, "mismatch explained:\n" + log)
    else:
        print("note: %s not found; --model-file not exercised" % gguf)


def test_concurrency(root, procs):
    """Conversations in parallel on a 2-slot backend, and requests queued on a 1-slot one:
    every request is served, nothing fails, and later turns reuse their prefix."""
    d, (dbl,), p, slot_dir = setup(root, procs, parallel=2, ctx=16384)
    results, errors = [], []

    def chat_thread(i):
        try:
            msgs = conversation(i)
            for rnd in range(3):
                msgs.append({"role": "user", "content": "round %d, question %d" % (rnd, i)})
                n = len(dbl.chat_tokens(msgs))
                r = p.chat(msgs)
                msgs.append({"role": "assistant",
                             "content": r["choices"][0]["message"]["content"]})
                results.append((rnd, n, r["timings"]["prompt_n"]))
        except Exception as e:  # reported below, with the others
            errors.append(repr(e))
    threads = [threading.Thread(target=chat_thread, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    check(not any(t.is_alive() for t in threads), "threads finished")
    eq(errors, [], "errors in parallel conversations")
    eq(len(results), 12, "every turn answered")
    later = [(n, pn) for rnd, n, pn in results if rnd > 0]
    check(sum(pn for n, pn in later) < 0.5 * sum(n for n, pn in later),
          "later turns reuse their prefix (prefilled %d of %d)" %
          (sum(pn for n, pn in later), sum(n for n, pn in later)))
    for o in ("failed", "timeout", "ignored", "skipped_invalid"):
        eq(p.restores(o), 0, "restores %s" % o)
    eq(p.m("kvtier_llama_request_errors_total"), 0, "no error answered by the proxy")
    wait_for("every save", lambda: p.saves("ok") + p.saves("skipped") >= 12)
    eq(p.saves("failed") + p.saves("timeout"), 0, "no failed save")
    no_leftovers(slot_dir)
    # One slot, three requests at once: they queue, each one's save runs in between.
    sub = os.path.join(root, "one-slot")
    os.makedirs(sub)
    sub_procs = []
    procs.append(ProcGroup(sub_procs))
    d1, (dbl1,), p1, slot_dir1 = setup(sub, sub_procs)
    out = []

    def one(i):
        try:
            out.append(p1.chat(conversation(i) + [{"role": "user", "content": "hi %d" % i}]))
        except Exception as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    eq(errors, [], "errors in queued requests")
    eq(len(out), 3, "all three served")
    wait_for("three saves", lambda: p1.saves("ok") >= 3)
    eq(len(d1.ls()), 3, "three blobs")


def stopping_cleanly(t):
    """Runs test t, then stops every plugin it started with SIGTERM: it must exit 0 promptly,
    with no sanitizer report in its log (leaks show up only at a clean exit)."""
    def wrapped(root, procs):
        t(root, procs)
        plugins = [x for x in procs if isinstance(x, Plugin)]
        for g in procs:
            if isinstance(g, ProcGroup):
                plugins += [x for x in g.procs if isinstance(x, Plugin)]
        for x in plugins:
            if not x.alive():
                continue
            t0 = time.time()
            rc = x.stop()
            log = x.read_log()
            check(rc == 0, "kvtier-llama exited with %r on SIGTERM:\n%s" % (rc, log))
            check(time.time() - t0 < 10, "kvtier-llama took %.1fs to stop" % (time.time() - t0))
            check("Sanitizer" not in log and "runtime error" not in log,
                  "sanitizer report:\n" + log)
            check("event=stopped" in log, "clean stop logged")
    wrapped.__name__ = t.__name__
    return wrapped


if __name__ == "__main__":
    if not os.access(PLUGIN, os.X_OK):
        print("SKIP: %s is not built (cmake -DKVTIER_PLUGIN=ON)" % PLUGIN)
        sys.exit(77)
    tests = [test_round_robin, test_completion_endpoints, test_two_backends,
             test_backend_restart, test_fail_restore, test_save_fails_silently,
             test_hang_slot_actions, test_lost_save_answers, test_ignore_restore, test_never_send_bad_blobs,
             test_streaming, test_slot_check, test_remote_kvtierd, test_ik_flavor, test_namespaces,
             test_concurrency, test_kvtierd_down]
    only = sys.argv[1:]
    if only:
        tests = [t for t in tests if t.__name__ in only]
    run([stopping_cleanly(t) for t in tests])
