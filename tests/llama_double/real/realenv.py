"""realenv.py: where the real-engine double and its models are, and whether they can run.

Shared by the double's self-test (test_real.py) and tests/integration/test_llama_real_engine.py.
A test that cannot run says why on one line starting with "SKIP: " and exits 77 (CTest's
skip code); under CI=true a skip is a failure (exit 1): CI installs node-llama-cpp
(scripts/deps) and must run these tests, not pass them by skipping.
"""
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", "..", ".."))
DOUBLE = os.path.join(HERE, "llama_real.mjs")
MODELS = ("micro.gguf", "iswa.gguf", "recurrent.gguf")


FIXTURES = os.environ.get("KVTIER_FIXTURES") or os.path.join(REPO, "tests", "fixtures", "llama-slots")


def models_dir():
    """The fixture models, in the tree: $KVTIER_FIXTURES/models (tests/fixtures/llama-slots)."""
    d = os.path.join(FIXTURES, "models")
    return d if all(os.path.isfile(os.path.join(d, m)) for m in MODELS) else None


def model(name):
    return os.path.join(models_dir(), name)


def unavailable():
    """None when the double can run here, else the reason."""
    node = shutil.which("node")
    if not node:
        return "node (Node.js >= 20) is not on PATH"
    if not os.path.isfile(os.path.join(REPO, "node_modules", "node-llama-cpp", "package.json")):
        return "node_modules/node-llama-cpp is not installed (run scripts/deps: npm ci)"
    if models_dir() is None:
        # they are in the tree: their absence is a broken checkout, not a reason to skip
        print("FAIL: the fixture models (%s) are not in %s" % (", ".join(MODELS), os.path.join(FIXTURES, "models")))
        sys.exit(1)
    try:
        p = subprocess.run([node, DOUBLE, "--check", "-m", model("micro.gguf")], capture_output=True,
                           timeout=180, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "node llama_real.mjs --check did not finish in 180 s"
    if p.returncode != 0:
        return "the llama.cpp library does not load: %s" % (
            p.stderr.decode(errors="replace").strip().splitlines() or ["rc=%d" % p.returncode])[-1]
    return None


def skip_or_fail(reason):
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        print("FAIL: CI=true, and this test would skip: %s" % reason)
        sys.exit(1)
    print("SKIP: %s" % reason)
    sys.exit(77)


def require():
    reason = unavailable()
    if reason:
        skip_or_fail(reason)
