"""harness.py: start the real kvtierd in a temp directory and drive it with the
real kvtier CLI. Used by every tests/integration/test_*.py.

Each test is a script: exit 0 pass, 1 fail, 77 skip (CTest's SKIP_RETURN_CODE).
Daemons listen on a Unix socket in the temp dir, or on 127.0.0.1 only.
Every daemon started here is stopped by its PID when the test ends.
"""
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

BIN = os.environ.get("KVTIER_BIN", os.path.join(os.path.dirname(__file__), "../../build"))
FIX = os.path.abspath(os.environ.get("KVTIER_FIXTURES",
                                     os.path.join(os.path.dirname(__file__),
                                                  "../fixtures/llama-slots")))
KVTIERD = os.path.join(BIN, "kvtierd")
KVTIER = os.path.join(BIN, "kvtier")


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def eq(a, b, what):
    if a != b:
        raise Failure("%s: expected %r, got %r" % (what, b, a))


def fixture(rel):
    return os.path.join(FIX, rel)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def slot_tokens(path):
    """The tokens of a slot file's header: the plain list, or the tokens of the packed
    payload (words -1, 1, n, the n tokens, ...) of llama-server since August 2026."""
    with open(path, "rb") as f:
        magic, version, n = struct.unpack("<III", f.read(12))
        words = list(struct.unpack("<%di" % n, f.read(4 * n)))
    if len(words) >= 3 and words[0] == -1:
        return words[3:3 + words[2]]
    return words


def opaque_copy(src, dst, version):
    """Writes dst: slot file src's header and token payload under header
    `version`, then a state no layout kvtier knows matches (what a future
    llama.cpp could write): kvtierd stores it as an opaque state."""
    with open(src, "rb") as f:
        data = f.read()
    n = struct.unpack("<I", data[8:12])[0]
    head = data[:4] + struct.pack("<I", version) + data[8:12 + 4 * n]
    with open(dst, "wb") as f:
        f.write(head + b"\xab" * 4096)
    return dst


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Result:
    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err

    def json(self):
        return json.loads(self.out)

    def __repr__(self):
        return "rc=%d out=%r err=%r" % (self.rc, self.out[:500], self.err[:500])


class Daemon:
    """A kvtierd on a fresh data dir, tmpfs tier and slot dir under one temp dir."""

    def __init__(self, root, tier_size="64M", extra=(), slot_dirs=None, tier_dir=None,
                 data=None, env=None):
        self.root = root
        self.data = data or os.path.join(root, "data")
        self.sock = os.path.join(root, "kvtierd.sock")
        self.tier_dir = tier_dir or os.path.join(root, "tier")
        self.slot_dir = os.path.join(root, "slots")
        os.makedirs(self.slot_dir, exist_ok=True)
        self.slot_dirs = slot_dirs or [self.slot_dir]
        self.tier_size = tier_size
        self.extra = list(extra)
        self.env = env
        self.proc = None
        self.log_path = os.path.join(root, "kvtierd.log")

    def args(self):
        a = [KVTIERD, "--data", self.data, "--socket", self.sock,
             "--tier", "tmpfs:%s:%s" % (self.tier_dir, self.tier_size)]
        for d in self.slot_dirs:
            a += ["--slot-dir", d]
        return a + self.extra

    def start(self, wait=True):
        self.log = open(self.log_path, "ab")
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        self.proc = subprocess.Popen(self.args(), stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise Failure("kvtierd exited with %d during start:\n%s" %
                              (self.proc.returncode, self.read_log()))
            if os.path.exists(self.sock):
                r = self.cli("info", check_rc=False)
                if r.rc == 0:
                    return
            time.sleep(0.05)
        raise Failure("kvtierd not ready after %ds:\n%s" % (timeout, self.read_log()))

    def read_log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise Failure("kvtierd did not stop within %ds of signal %d" % (timeout, sig))
        rc = self.proc.returncode if self.proc else 0
        self.proc = None
        return rc

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pid(self):
        return self.proc.pid

    def rss_kib(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cli(self, *args, check_rc=True, timeout=120, address=None, extra_global=()):
        a = [KVTIER]
        if address:
            a += ["--address", address]
        else:
            a += ["--socket", self.sock]
        a += list(extra_global) + list(args)
        p = subprocess.run(a, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        r = Result(p.returncode, p.stdout.decode(errors="replace"),
                   p.stderr.decode(errors="replace"))
        if check_rc and r.rc != 0:
            raise Failure("kvtier %s failed: %r\n--- daemon log ---\n%s" %
                          (" ".join(args), r, self.read_log()))
        return r

    def put(self, path, ns="ns-test"):
        return self.cli("put", "--namespace", ns, path).out.strip()

    def lookup(self, tokens_of, ns="ns-test"):
        return self.cli("lookup", "--namespace", ns, "--tokens-of", tokens_of, "--json").json()

    def ls(self, ns=None):
        a = ["ls", "--json"] + (["--namespace", ns] if ns else [])
        return self.cli(*a).json()

    def fsck(self, verify=False):
        p = subprocess.run([KVTIER, "fsck", "--data", self.data] + (["--verify"] if verify else []),
                           capture_output=True, timeout=300)
        return Result(p.returncode, p.stdout.decode(errors="replace"),
                      p.stderr.decode(errors="replace"))

    def tier_files(self):
        return sorted(os.listdir(self.tier_dir))


def tmp_root(prefix="kvtier-it-"):
    """A temp dir on tmpfs when possible (tier and slot dirs share it: hard links)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def expect_fail(r, status, *phrases):
    """r failed with gRPC status name `status` and a message containing phrases."""
    check(r.rc != 0, "expected failure, got success: %r" % r)
    check(status in r.err, "expected status %s in stderr: %r" % (status, r))
    for p in phrases:
        check(p in r.err, "expected %r in the message: %r" % (p, r))


def run(tests):
    """Runs test functions, each with its own temp dir and daemons; exits."""
    for b in (KVTIERD, KVTIER):
        if not os.access(b, os.X_OK):
            print("FAIL: %s is not built" % b)
            sys.exit(1)
    failed = 0
    for t in tests:
        root = tmp_root()
        daemons = []
        t0 = time.time()
        try:
            t(root, daemons)
            print("PASS %s (%.1fs)" % (t.__name__, time.time() - t0))
        except Skip as s:
            print("SKIP %s: %s" % (t.__name__, s))
            if len(tests) == 1:
                sys.exit(77)
        except Exception:
            failed += 1
            print("FAIL %s" % t.__name__)
            traceback.print_exc()
            for d in daemons:
                print("--- log of daemon in %s ---\n%s" % (d.root, d.read_log()))
        finally:
            for d in daemons:
                try:
                    d.kill9()
                except Exception:
                    pass
            shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if failed else 0)


class Skip(Exception):
    pass


def make_slot(path, tokens, row_bytes=16, n_layer=1, v_trans=0, fill=None, sparse=False):
    """Writes a version-2 slot file in llama.cpp's real header layout:
    magic, version, n_tokens, tokens, then the KV state (cell_count, cells,
    v_trans, n_layer, per layer K type/row size/rows, then V)."""
    n = len(tokens)
    with open(path, "wb") as f:
        f.write(struct.pack("<III", 0x67677371, 2, n))
        f.write(struct.pack("<%di" % n, *tokens))
        f.write(struct.pack("<I", n))
        f.write(b"".join(struct.pack("<iI", i, 0) for i in range(n)))
        f.write(struct.pack("<II", v_trans, n_layer))
        payload = n * row_bytes

        def rows(seed):
            if sparse:
                f.seek(payload, 1)
            elif fill is not None:
                chunk = bytes([fill]) * min(payload, 1 << 20)
                left = payload
                while left:
                    k = min(left, len(chunk))
                    f.write(chunk[:k])
                    left -= k
            else:
                f.write(hashlib.sha256(b"%d" % seed).digest() * (payload // 32) +
                        b"\0" * (payload % 32))
        for layer in range(n_layer):
            f.write(struct.pack("<iQ", 1, row_bytes))
            rows(layer)
        for layer in range(n_layer):
            if v_trans:
                el, embd = 2, row_bytes // 2
                f.write(struct.pack("<iII", 1, el, embd))
            else:
                f.write(struct.pack("<iQ", 1, row_bytes))
            rows(1000 + layer)
        if sparse:
            f.truncate(f.tell())
    return path
