#!/usr/bin/env python3
"""plugin_bodies.py: kvtier-llama's peak memory under N concurrent large request bodies.

Starts kvtierd, the llama-server test double and kvtier-llama (loopback, temporary
directories, each stopped by its PID at the end), sends N concurrent POST /completion bodies of
SIZE MB at once, and prints the plugin's VmHWM before and after, the growth as a multiple of
the bytes sent, and the answers' status codes. A figure, not a test: nothing is asserted.

    /usr/bin/python3 bench/plugin_bodies.py --bin build --n 16 --size-mb 60
    /usr/bin/python3 bench/plugin_bodies.py --bin build --n 4 --size-mb 60 --kind ids \
        --plugin-arg=--max-inflight-body-bytes=1G

--kind string sends {"prompt": "aaa..."}; --kind ids {"prompt": [10, 10, ...]}. Mind the
test double: it tokenizes a string prompt byte by byte in Python (about 13 bytes of its memory
per prompt byte, per request it holds).
"""
import argparse
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.path.join(HERE, "..", "build"),
                    help="build directory holding kvtierd and plugin/kvtier-llama")
    ap.add_argument("--n", type=int, default=16, help="concurrent bodies")
    ap.add_argument("--size-mb", type=int, default=60, help="size of each body in MB")
    ap.add_argument("--kind", choices=["string", "ids", "mixed"], default="string")
    ap.add_argument("--plugin-arg", action="append", default=[],
                    help="an extra kvtier-llama option (repeat)")
    a = ap.parse_args()
    os.environ["KVTIER_BIN"] = os.path.abspath(a.bin)
    sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
    import harness  # noqa: E402
    import test_plugin_attack as t  # noqa: E402
    from test_llama_plugin import setup  # noqa: E402

    size = a.size_mb * t.MB
    if a.kind == "mixed":
        bodies = t.big_bodies(a.n, size)
    else:
        one = t.big_bodies(2, size)[0 if a.kind == "string" else 1]
        bodies = [one] * a.n
    extra = ["--max-request-size", "%dM" % (a.size_mb + 4)] + a.plugin_arg
    root = harness.tmp_root("kvtier-bench-bodies-")
    procs = []
    try:
        d, (dbl,), p, _ = setup(root, procs, plugin_extra=extra)
        pid = p.proc.pid
        before = t.vm_hwm_kib(pid)
        t0 = time.monotonic()
        res = t.send_all(p.port, bodies)
        took = time.monotonic() - t0
        after = t.vm_hwm_kib(pid)
        with open("/proc/%d/status" % pid) as f:
            rss = [line.split()[1] for line in f if line.startswith("VmRSS:")][0]
        sent = sum(len(b) for b in bodies)
        statuses = {}
        for r in res:
            k = r[0] if isinstance(r, tuple) else type(r).__name__
            statuses[k] = statuses.get(k, 0) + 1
        print("bodies: %d x %d MB (%s), %.0f MB sent in %.1f s" %
              (a.n, a.size_mb, a.kind, sent / t.MB, took))
        print("answers: %s" % ", ".join("%s x%d" % (k, v) for k, v in sorted(
            statuses.items(), key=lambda kv: str(kv[0]))))
        print("plugin VmHWM: %.1f MB -> %.1f MB (growth %.1f MB = %.2fx the bytes sent); "
              "VmRSS after: %.1f MB" % (before / 1024.0, after / 1024.0,
                                       (after - before) / 1024.0,
                                       (after - before) * 1024.0 / sent, int(rss) / 1024.0))
    finally:
        for x in reversed(procs):
            try:
                x.stop()
            except Exception:
                x.kill9()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
