#!/usr/bin/env python3
"""bench/report.py: folds the result lines of bench/scenarios/* into one table
(stdout) and one JSON file. Called by bench/run; standard library only.

A result line is one JSON object on a scenario's stdout (bench/README.md):
  {"scenario", "unit", "kvtier", "reference", "reference_name",
   "higher_is_better", "target", "target_ratio", "target_abs", "runs",
   "spread": [min, max]}   (optional: "reference_spread", "note")
This script computes the ratio (kvtier / reference) and whether the target is
met; the scenarios never judge their own figures.
"""
import argparse
import datetime
import json
import math
import os
import platform
import socket
import sys

REQUIRED = ("scenario", "unit", "kvtier", "reference", "higher_is_better", "runs", "spread")


def num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def judge(r):
    """Adds ratio and met (True, False, or None when there is no target)."""
    k, ref = r.get("kvtier"), r.get("reference")
    hib = bool(r.get("higher_is_better"))
    ratio = k / ref if num(k) and num(ref) and ref != 0 else None
    r["ratio"] = ratio
    checks = []
    tr, ta = r.get("target_ratio"), r.get("target_abs")
    if num(tr):
        checks.append(ratio is not None and (ratio >= tr if hib else ratio <= tr))
    if num(ta):
        checks.append(num(k) and (k >= ta if hib else k <= ta))
    r["met"] = all(checks) if checks else None
    return r


def fmt(v):
    if not num(v):
        return "—"
    a = abs(v)
    if a >= 100:
        return "%.0f" % v
    if a >= 10:
        return "%.1f" % v
    if a >= 1:
        return "%.2f" % v
    return "%.3g" % v


def spread(s):
    if isinstance(s, list) and len(s) == 2 and num(s[0]) and num(s[1]):
        return "%s–%s" % (fmt(s[0]), fmt(s[1]))
    return "—"


def table(rows):
    head = ["scenario", "kvtier", "reference", "ratio", "target", "met", "runs",
            "kvtier spread", "ref spread"]
    body = []
    for r in rows:
        unit = r.get("unit", "")
        met = {True: "yes", False: "NO", None: "—"}[r.get("met")]
        body.append([
            r["scenario"],
            "%s %s" % (fmt(r.get("kvtier")), unit),
            ("%s %s" % (fmt(r.get("reference")), unit)) if num(r.get("reference")) else "—",
            ("%.2f×" % r["ratio"]) if r.get("ratio") is not None else "—",
            r.get("target") or "—",
            met,
            str(r.get("runs", "")),
            spread(r.get("spread")),
            spread(r.get("reference_spread")),
        ])
    width = [max(len(x) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, width)),
             "  ".join("-" * w for w in width)]
    for b in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(b, width)).rstrip())
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--latest")
    ap.add_argument("--meta", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    ap.add_argument("--scenario", nargs=5, action="append", default=[],
                    metavar=("NAME", "EXIT", "SECONDS", "STDOUT", "STDERR"))
    a = ap.parse_args()

    results, scenarios = [], []
    for name, rc, secs, out, err in a.scenario:
        s = {"name": name, "exit": int(rc), "seconds": float(secs), "lines": 0, "error": None}
        bad = []
        try:
            with open(out, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        r = json.loads(line)
                        missing = [k for k in REQUIRED if k not in r]
                        if missing:
                            raise ValueError("missing " + ", ".join(missing))
                    except ValueError as e:
                        bad.append("line %d: %s" % (n, e))
                        continue
                    r["source"] = name
                    results.append(judge(r))
                    s["lines"] += 1
        except OSError as e:
            bad.append(str(e))
        if s["exit"] != 0 or bad or s["lines"] == 0:
            why = []
            if s["exit"] == 124:
                why.append("timed out")
            elif s["exit"] != 0:
                why.append("exit %d" % s["exit"])
            if s["lines"] == 0:
                why.append("no result lines")
            why += bad[:3]
            try:
                with open(err, encoding="utf-8", errors="replace") as f:
                    tail = [l.rstrip() for l in f.readlines()[-3:] if l.strip()]
            except OSError:
                tail = []
            s["error"] = "; ".join(why) + ((": " + " | ".join(tail)) if tail else "")
        scenarios.append(s)

    meta = dict(a.meta)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    try:
        with open("/proc/loadavg") as f:
            load_end = " ".join(f.read().split()[:3])
    except OSError:
        load_end = None
    judged = [r for r in results if r["met"] is not None]
    doc = {
        "schema": 1,
        "started": meta.get("started"),
        "finished": now,
        "command": meta.get("command"),
        "commit": meta.get("commit"),
        "dirty_tree": meta.get("dirty") == "1",
        "quick": meta.get("quick") == "1",
        "runs": int(meta.get("runs", 0)),
        "runs_gib": int(meta.get("runs_gib", 0)),
        "host": {"name": socket.gethostname(), "kernel": platform.release(),
                 "cpus": os.cpu_count(), "cpu": cpu},
        "load_average": {"start": meta.get("load_start"), "end": load_end},
        "scenarios": scenarios,
        "results": results,
        "targets_met": sum(1 for r in judged if r["met"]),
        "targets_total": len(judged),
        "all_scenarios_ran": all(s["error"] is None for s in scenarios),
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    if a.latest:
        with open(a.latest, "w") as f:
            json.dump(doc, f, indent=2, ensure_ascii=False)
            f.write("\n")

    print()
    print("kvtier bench: %s, %d CPUs, kernel %s, commit %s%s; %s" % (
        doc["host"]["name"], doc["host"]["cpus"] or 0, doc["host"]["kernel"],
        (doc["commit"] or "?")[:12], " (dirty tree)" if doc["dirty_tree"] else "",
        "QUICK smoke run" if doc["quick"] else "full run"))
    print("load average (1, 5, 15 min) at start %s, at end %s: other work on the machine "
          "widens the spread" % (meta.get("load_start") or "?", load_end or "?"))
    print("each figure: median of the runs shown; spread = [min–max] of those runs; "
          "ratio = kvtier / reference")
    print()
    print(table(results))
    print()
    refs = ["  %s: %s" % (r["scenario"], r["reference_name"])
            for r in results if r.get("reference_name")]
    if refs:
        print("references (measured in the same run, alternating with kvtier):")
        print("\n".join(refs))
        print()
    notes = []
    for r in results:
        if r.get("note") and r["note"] not in notes:
            notes.append(r["note"])
    if notes:
        print("notes:")
        print("\n".join("  " + n for n in notes))
        print()
    for s in scenarios:
        if s["error"]:
            print("FAILED scenario %s: %s" % (s["name"], s["error"]))
    print("targets met: %d of %d; scenarios: %s; JSON: %s" % (
        doc["targets_met"], doc["targets_total"],
        ", ".join("%s (%.0f s)" % (s["name"], s["seconds"]) for s in scenarios), a.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
