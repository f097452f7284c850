#!/usr/bin/env python3
"""Faults and hostile inputs from the red-team report (D9, D10, D11, D16):
absurd prefill reports, a tier directory removed while kvtierd runs, a tier
file system remounted read-only (a private mount namespace: skipped without
the privileges), the clean-stop record after files went missing, and the
messages a person gets for each."""
import os
import re
import shutil
import subprocess
import sys
import time

from harness import (KVTIERD, Daemon, Failure, Skip, check, eq, expect_fail, fixture, run)

CHAT = [fixture("v2/chat-a-turn1.bin"), fixture("v2/chat-a-turn2.bin"),
        fixture("v2/chat-b-turn1.bin")]


def wait_for(cond, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise Failure("timed out waiting for %s" % what)


def log_has(d, pattern):
    with open(d.log_path, "rb") as f:
        return re.search(pattern, f.read().decode(errors="replace")) is not None


def est_prefill(d, ns):
    return d.lookup(CHAT[0], ns=ns)["est_prefill_s"]


# ---- D9: prefill reports ----

def test_report_bounds(root, daemons):
    """Two absurd reports are refused with INVALID_ARGUMENT and a reason; one
    plausible outlier moves the model by less than 2.5x, not by orders of
    magnitude (before: 0.128 s became 7.4e-12 s and blobs were deleted as not
    worth restoring)."""
    d = Daemon(root).start()
    daemons.append(d)
    d.put(CHAT[0], ns="m")
    for _ in range(20):
        d.cli("report", "-n", "m", "--prompt-tokens", "1000", "--prompt-ms", "1000")
    before = est_prefill(d, "m")
    check(before > 0, "a prefill estimate after 20 reports: %r" % before)
    r = d.cli("report", "-n", "m", "--prompt-tokens", "4294967295", "--prompt-ms", "0.001",
              check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", "implausible prefill report", "4294967295 tokens")
    r = d.cli("report", "-n", "m", "--prompt-tokens", "10", "--prompt-ms", "1e-300",
              check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", "implausible prefill report",
                "faster than the plausible maximum of (tokens/s) 1e+07")
    r = d.cli("report", "-n", "m", "--prompt-tokens", "10", "--prompt-ms", "3600000",
              check_rc=False)
    expect_fail(r, "INVALID_ARGUMENT", "slower than the plausible maximum")
    eq(est_prefill(d, "m"), before, "estimate after refused reports")
    check(log_has(d, r"event=prefill_report_refused ns=\"m\" tokens=10"), "a warn log line")
    # The largest, fastest report the bounds accept: 4M tokens at 1e7 tokens/s.
    d.cli("report", "-n", "m", "--prompt-tokens", "4194304", "--prompt-ms", "419.4304")
    after = est_prefill(d, "m")
    check(before / 2.5 <= after < before,
          "one outlier moved the estimate from %g to %g s (more than 2.5x)" % (before, after))


if __name__ == "__main__":
    tests = [test_report_bounds]
    if len(sys.argv) > 1:
        tests = [t for t in tests if t.__name__ in sys.argv[1:]]
    run(tests)
