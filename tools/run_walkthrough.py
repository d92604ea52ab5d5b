#!/usr/bin/env python3
"""Run every walkthrough chapter as a script, in order, with matplotlib's Agg backend.

    python tools/run_walkthrough.py [--only 03,04] [--list] [--check | --redraw]

Each chapter `walkthrough/NN_name.py` runs in its own Python process (cwd: the repository root), so one
chapter's state never leaks into the next. The first failing chapter stops the run (exit 1, its
output shown). The timings are printed at the end.

Figures are committed (walkthrough/figures/<name>.png, with <name>.json recording what it draws: see
walkthrough/_common.py). A chapter redraws a figure only when what it draws differs from the committed
record; the run ends with the list of figures that were stale or missing, to be committed. `--check` writes
nothing and exits 1 when a figure is stale or missing; `--redraw` rewrites every figure (after a change of
style the record does not capture, or of matplotlib).

The chapters use small models, for which BLAS threads buy little and, on a shared machine, cost a lot
(oversubscribed OpenBLAS threads spin: a 4-layer forward measured 10x slower with the default threads than
with one under a load of 11 on 2 cores). So the BLAS libraries get one thread unless the environment
already says otherwise (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WALK = ROOT / "walkthrough"
CHAPTER = re.compile(r"^(\d\d)_\w+\.py$")


def chapters():
    return sorted(p for p in WALK.iterdir() if CHAPTER.match(p.name))


def main(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma list of chapter numbers, e.g. 03,12")
    ap.add_argument("--list", action="store_true", help="list the chapters and exit")
    ap.add_argument("--quiet", action="store_true", help="show a chapter's output only when it fails")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="write no figure; exit 1 if one is stale or missing")
    mode.add_argument("--redraw", action="store_true", help="rewrite every figure")
    args = ap.parse_args(argv)
    todo = chapters()
    if args.only:
        wanted = {n.strip().zfill(2) for n in args.only.split(",") if n.strip()}
        todo = [p for p in todo if p.name[:2] in wanted]
    if args.list or not todo:
        for p in todo:
            print(p.relative_to(ROOT))
        return 0 if todo or args.list else 1
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["STABLELM_FIGURES"] = "check" if args.check else "redraw" if args.redraw else "update"
    with tempfile.TemporaryDirectory(prefix="walkthrough-") as folder:    # the chapters' figure log, read at the end
        env["STABLELM_FIGURE_LOG"] = str(Path(folder) / "figures.tsv")
        return run(todo, env, args)


def run(todo, env, args):
    """Run the chapters `todo` in order with `env`; report the timings and the figure log's stale entries."""
    log = Path(env["STABLELM_FIGURE_LOG"])
    timings, start = [], time.perf_counter()
    for path in todo:
        rel = path.relative_to(ROOT)
        print(f"=== {rel}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        dt = time.perf_counter() - t0
        if proc.returncode != 0 or not args.quiet:
            print(proc.stdout, end="" if proc.stdout.endswith("\n") else "\n")
        if proc.returncode != 0:
            print(f"FAILED: {rel} (exit {proc.returncode}, {dt:.1f} s)", file=sys.stderr)
            return 1
        timings.append((rel, dt))
    print("\nchapter timings:")
    for rel, dt in timings:
        print(f"  {dt:6.1f} s  {rel}")
    entries = [line.split("\t") for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []
    print(f"  {time.perf_counter() - start:6.1f} s  total ({len(timings)} chapters, {len(entries)} figures in "
          f"{(WALK / 'figures').relative_to(ROOT)}/)")
    behind = [e for e in entries if e[1] != "current"]
    if not behind:
        print(f"figures: all {len(entries)} current (what each draws equals its committed record)")
        return 0
    print(f"figures: {len(behind)} of {len(entries)} stale or missing:")
    for rel, status, written, why in behind:
        print(f"  {status:8s} {rel} ({written}): {why}")
    if args.check:
        print("run `make walkthrough` and commit walkthrough/figures/", file=sys.stderr)
        return 1
    print("commit walkthrough/figures/ (the redrawn .png and .json) so readers on the web see them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
