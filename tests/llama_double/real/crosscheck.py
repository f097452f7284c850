#!/usr/bin/env python3
"""crosscheck.py: the real-engine double against a real llama-server, side by side.

Not part of the suite (CI has no llama-server binary): a tool for whoever changes
llama_real.mjs. It starts the double and a llama-server built from the same llama.cpp tree
(v0.4.0, as node-llama-cpp 3.21.1 ships it: `git clone` its llama/gitRelease.bundle, build
the llama-server target), with the same model and options, runs the same scenarios against
both and compares what the plugin depends on: status codes, error messages, slot choice,
prompt_n and cache_n, the generated tokens (greedy), n_saved/n_restored, and the slot
files byte for byte.

Usage: LLAMA_SERVER=/path/to/llama-server python3 crosscheck.py [MODEL_DIR]
Exit 0 when everything matched, 1 otherwise, 77 without LLAMA_SERVER.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
DOUBLE = os.path.join(HERE, "llama_real.mjs")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def call(url, path, body=None, method=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class Server:
    def __init__(self, argv, env=None):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.dir = tempfile.mkdtemp(prefix="xcheck-")
        self.log = open(os.path.join(self.dir, "log"), "wb")
        self.p = subprocess.Popen(argv + ["--host", "127.0.0.1", "--port", str(self.port),
                                          "--slot-save-path", self.dir + "/"],
                                  stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if call(self.url, "/health")[0] == 200:
                    return
            except OSError:
                pass
            if self.p.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("%s did not start: %s" % (argv[0], open(self.log.name).read()[-2000:]))

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(20)
        except subprocess.TimeoutExpired:
            self.p.kill()


def summary(st, r):
    """What must match in an answer."""
    if st != 200:
        return (st, r.get("error", {}).get("message"))
    if isinstance(r, dict) and "timings" in r and "tokens" in r:
        t = r["timings"]
        return (st, r["id_slot"], t["prompt_n"], t.get("cache_n"), r["tokens"], r["stop_type"])
    if isinstance(r, dict) and ("n_saved" in r or "n_restored" in r or "n_erased" in r):
        return (st, {k: v for k, v in r.items() if k not in ("timings", "filename")})
    return (st, r)


def scenario(model_dir, name, model, options, steps):
    """steps: (kind, ...) run against both; returns the mismatches."""
    print("--- %s: %s %s" % (name, model, " ".join(options)))
    mpath = os.path.join(model_dir, model)
    real = Server([os.environ["LLAMA_SERVER"], "-m", mpath, "-t", "1", "--cache-ram", "0"] + options)
    dbl = Server(["node", DOUBLE, "-m", mpath] + options)
    bad = 0
    try:
        for i, step in enumerate(steps):
            out = []
            for srv in (real, dbl):
                if step[0] == "completion":
                    body = dict(step[1], return_tokens=True)
                    out.append(summary(*call(srv.url, "/completion", body)))
                elif step[0] in ("save", "restore", "erase"):
                    body = None if step[0] == "erase" else {"filename": step[2]}
                    out.append(summary(*call(srv.url, "/slots/%d?action=%s" % (step[1], step[0]), body,
                                             method="POST")))
                elif step[0] == "copy":            # a file of the other server, or a fixture
                    src = step[1] if os.path.isabs(step[1]) else os.path.join(real.dir, step[1])
                    with open(src, "rb") as f, open(os.path.join(srv.dir, step[2]), "wb") as g:
                        g.write(f.read())
                    out.append(None)
            same = out[0] == out[1]
            if step[0] == "save" and same and out[0][0] == 200:
                a = open(os.path.join(real.dir, step[2]), "rb").read()
                b = open(os.path.join(dbl.dir, step[2]), "rb").read()
                diff = sum(1 for x, y in zip(a, b) if x != y) + abs(len(a) - len(b))
                same = diff == 0
                note = "files identical" if same else "files differ in %d bytes" % diff
            else:
                note = ""
            print("%s %2d %-10s real=%s\n%16s double=%s %s" % ("ok  " if same else "DIFF", i, step[0],
                                                               str(out[0])[:150], "", str(out[1])[:150], note))
            bad += not same
    finally:
        real.stop()
        dbl.stop()
    return bad


def main():
    if not os.environ.get("LLAMA_SERVER"):
        print("SKIP: set LLAMA_SERVER to a llama-server binary built from llama.cpp v0.4.0")
        sys.exit(77)
    model_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "fixtures", "llama-slots", "models")
    words = " ".join("w%d" % i for i in range(160))
    a = {"prompt": "System: " + words + ". User: tell me a story.", "n_predict": 6, "id_slot": 0, "temperature": 0}
    a2 = dict(a, prompt=a["prompt"] + " And another one, please.")
    b = {"prompt": "Other: " + words[::-1], "n_predict": 6, "id_slot": 0, "temperature": 0}
    long_ = {"prompt": "Long: " + " ".join("x%d" % i for i in range(700)), "n_predict": 4, "id_slot": 0,
             "temperature": 0}
    long2 = dict(long_, prompt=long_["prompt"] + " more words here")
    long_edit = dict(long_, prompt=long_["prompt"][:-12] + " an edit at the end")
    common = [("completion", a), ("save", 0, "a.bin"), ("completion", b), ("restore", 0, "a.bin"),
              ("completion", a2), ("completion", a2), ("erase", 0), ("restore", 0, "a.bin"),
              ("completion", a), ("restore", 0, "nothing.bin"), ("completion", a),
              ("completion", long_), ("completion", long2), ("completion", long_edit), ("save", 0, "l.bin")]
    bad = 0
    bad += scenario(model_dir, "dense", "micro.gguf", ["-np", "2", "-c", "8192"],
                    common + [("completion", dict(a, id_slot=1)), ("save", 1, "s1.bin"),
                              ("restore", -1, "a.bin"), ("completion", dict(a2, id_slot=1)),
                              ("copy", os.path.join(model_dir, "..", "v3-2026-10", "chat-a-turn1.bin"), "v3.bin"),
                              ("restore", 0, "v3.bin"),
                              ("copy", os.path.join(model_dir, "..", "v2-2026", "chat-a-turn1.bin"), "v2.bin"),
                              ("restore", 0, "v2.bin")])
    bad += scenario(model_dir, "sliding window", "iswa.gguf", ["-np", "1", "-c", "4096"], common)
    bad += scenario(model_dir, "sliding window, --swa-full", "iswa.gguf", ["-np", "1", "-c", "4096", "--swa-full"],
                    common)
    bad += scenario(model_dir, "recurrent", "recurrent.gguf", ["-np", "1", "-c", "4096"],
                    common + [("completion", dict(a, n_predict=1)), ("save", 0, "r.bin"), ("completion", b),
                              ("restore", 0, "r.bin"), ("completion", a2)])
    print("%d mismatches" % bad)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
