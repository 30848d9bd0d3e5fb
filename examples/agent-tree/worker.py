#!/usr/bin/env python3
"""Evaluate one slice of a k-nearest-neighbour grid on the UCI digits (stdlib only).

A slice is one distance metric with every k and vote weighting of the grid. Accuracy is
measured on held-out rows: --splits random 80/20 splits (seeds 1..N), the same for every
worker, so all slices are comparable. The result (correct counts per config) goes to --out.

  --part I/N       evaluate only every N-th held-out row from I (a helper's share)
  --helpers N      start N helpers with `muster run` (one per part), wait, merge their counts
  --fail-attempts N  exit 1 on the first N attempts of this task (counted in MUSTER_DATA_DIR)
"""

import argparse
import gzip
import heapq
import math
import os
import random
import signal
import sys
import time
from operator import mul, sub

from common import (GAVE_UP, MusterError, Status, children, escalate, log, read_json,
                    start_child, write_json)

METRICS = ("euclidean", "manhattan", "cosine", "chebyshev")
WEIGHTS = ("uniform", "distance")


def load_digits(path):
    X, y = [], []
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.strip():
                *pixels, label = map(int, line.split(","))
                X.append(pixels)
                y.append(label)
    return X, y


def held_out(n_rows, seed, val_frac=0.2):
    """The held-out rows of split `seed`: a seeded shuffle's first 20%."""
    idx = list(range(n_rows))
    random.Random(seed).shuffle(idx)
    return idx[:round(n_rows * val_frac)]


def work_items(n_rows, splits):
    """[(split_seed, row)] for every held-out row of splits 1..splits."""
    return [(seed, row) for seed in range(1, splits + 1) for row in held_out(n_rows, seed)]


def distances(metric, X, sq, q, train):
    """[(distance, row)] from query q to every training row; sq[i] = |X[i]|^2."""
    if metric == "manhattan":
        return [(sum(map(abs, map(sub, X[i], q))), i) for i in train]
    if metric == "chebyshev":
        return [(max(map(abs, map(sub, X[i], q))), i) for i in train]
    qq = sum(map(mul, q, q))
    if metric == "euclidean":  # |x - q|^2 = |x|^2 + |q|^2 - 2 x.q (exact: integer pixels)
        return [(math.sqrt(sq[i] + qq - 2 * sum(map(mul, X[i], q))), i) for i in train]
    nq = math.sqrt(qq) or 1.0  # cosine distance
    return [(1.0 - sum(map(mul, X[i], q)) / (math.sqrt(sq[i] or 1) * nq), i) for i in train]


def vote(neighbours, y, weights):
    """Class with the largest (weighted) vote; a tie goes to the class of the nearer one."""
    score = {}
    for rank, (d, i) in enumerate(neighbours):
        w = 1.0 if weights == "uniform" else 1.0 / (d + 1e-9)
        s, first = score.get(y[i], (0.0, rank))
        score[y[i]] = (s + w, first)
    return max(score, key=lambda c: (score[c][0], -score[c][1]))


def config_key(metric, k, weights):
    return f"{metric}/k={k}/{weights}"


def evaluate(X, y, metric, ks, items, progress=None):
    """{config: correct count} over the held-out items; each item is one query row."""
    correct = {config_key(metric, k, w): 0 for k in ks for w in WEIGHTS}
    train_of = {}
    kmax = max(ks)
    sq = [sum(map(mul, x, x)) for x in X]
    for n, (seed, row) in enumerate(items, 1):
        if seed not in train_of:
            held = set(held_out(len(X), seed))
            train_of[seed] = [i for i in range(len(X)) if i not in held]
        nearest = heapq.nsmallest(kmax, distances(metric, X, sq, X[row], train_of[seed]))
        for k in ks:
            for w in WEIGHTS:
                if vote(nearest[:k], y, w) == y[row]:
                    correct[config_key(metric, k, w)] += 1
        if progress:
            progress(n, len(items), correct)
    return correct


# ----------------------------------------------------------------------------- task side


def fail_on_purpose(limit):
    """Fail the first `limit` attempts of this task, counted in MUSTER_DATA_DIR."""
    if not os.environ.get("MUSTER_DATA_DIR"):
        log("--fail-attempts counts attempts in MUSTER_DATA_DIR, which is not set: ignored")
        return
    path = os.path.join(os.environ["MUSTER_DATA_DIR"], "attempts")
    n = int(open(path).read() or 0) + 1 if os.path.exists(path) else 1
    with open(path, "w") as f:
        f.write(str(n))
    if n <= limit:
        time.sleep(1)
        print(f"worker: deliberate failure on attempt {n} (this task fails its first {limit} "
              f"attempts on purpose, to show crash_loop and escalation)", file=sys.stderr, flush=True)
        sys.exit(1)


def run_helpers(args, base_argv, status):
    """Start one helper per part (unless it exists or its result does), wait, return the
    parts' counts. A part whose helper gave up, or could not be started, is done here."""
    me = os.environ["MUSTER_TASK"]
    parts_dir = os.path.join(os.environ["MUSTER_DATA_DIR"], "parts")
    parts = {f"{me}-h{i + 1}": (i, os.path.join(parts_dir, f"h{i + 1}.json"))
             for i in range(args.helpers)}
    try:
        existing = children(me)
    except MusterError as e:
        log(f"cannot list my children ({e}); submitting anyway (names are unique)")
        existing = {}
    local = set()
    for name, (i, out) in parts.items():
        if valid(read_json(out), args) or name in existing:
            continue
        try:
            start_child(name, ["python3", "worker.py", *base_argv, "--part", f"{i}/{args.helpers}",
                               "--out", out], labels=["example=agent-tree", "role=helper"])
            log(f"started helper {name} (part {i}/{args.helpers})")
        except MusterError as e:
            log(f"could not start helper {name}: {e}; doing part {i} myself")
            local.add(name)
    deadline = time.monotonic() + 300
    while True:
        try:
            kids = children(me)  # list first, then look for results: no race with an exit
        except MusterError as e:
            log(f"muster ls failed: {e}")
            kids = {}
        done = {n for n, (i, out) in parts.items() if valid(read_json(out), args)}
        for n in parts.keys() - done - local:
            state = kids.get(n, {}).get("state")
            if state in GAVE_UP or state == "succeeded" or time.monotonic() > deadline:
                log(f"helper {n} is {state} without a result; doing its part myself")
                if state:
                    escalate(n, state)
                local.add(n)
        if done | local >= parts.keys():
            break
        if status.due(2):
            status("running", f"waiting for helpers: {len(done)}/{len(parts)} parts in",
                   parts_done=len(done), parts=len(parts))
        time.sleep(1)
    for n in local - done:
        i, out = parts[n]
        write_json(out, run_slice(args, f"{i}/{args.helpers}", status))
    return [read_json(parts[n][1]) for n in sorted(parts)]


def valid(result, args):
    """A result of this slice's config (an earlier attempt's, or a helper's)."""
    return bool(result) and [result.get(k) for k in ("metric", "ks", "splits")] == \
        [args.metric, args.k, args.splits]


def run_slice(args, part, status):
    X, y = load_digits(args.data)
    items = work_items(len(X), args.splits)
    i, n = map(int, part.split("/"))
    items = items[i::n]
    t0 = time.monotonic()

    def progress(done, total, correct):
        if status.due(1) or done == total:
            best = max(correct.values()) / done
            status("running", f"{args.metric}: {done}/{total} held-out rows",
                   step=done, rows=total, best_acc=round(best, 4))

    correct = evaluate(X, y, args.metric, args.k, items, progress)
    return {"metric": args.metric, "ks": args.k, "splits": args.splits, "part": part,
            "rows": len(items), "correct": correct, "seconds": round(time.monotonic() - t0, 1),
            "by": os.environ.get("MUSTER_TASK", "local")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--metric", choices=METRICS, required=True)
    p.add_argument("--k", type=lambda s: [int(v) for v in s.split(",")], default=[1, 3, 5, 7, 9],
                   help="comma-separated k values (default 1,3,5,7,9)")
    p.add_argument("--splits", type=int, default=8, help="random 80/20 held-out splits")
    p.add_argument("--data", default="../ml-sweep/digits.csv.gz",
                   help="digits csv.gz, relative to the working directory")
    p.add_argument("--out", required=True, help="result JSON (written atomically)")
    p.add_argument("--part", default="0/1", help="I/N: only this share of the held-out rows")
    p.add_argument("--helpers", type=int, default=0, help="fan out to N helper tasks")
    p.add_argument("--fail-attempts", type=int, default=0, help="fail the first N attempts")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    status = Status()
    signal.signal(signal.SIGTERM, lambda *_: (status("running", "stopping on SIGTERM"),
                                              sys.exit(143)))
    if args.helpers and not (os.environ.get("MUSTER_TASK") and os.environ.get("MUSTER_DATA_DIR")):
        sys.exit("worker: --helpers starts tasks with `muster run`: run it under Muster")
    if args.fail_attempts:
        fail_on_purpose(args.fail_attempts)
    status("starting", f"{args.metric} k={args.k} part {args.part} -> {args.out}")
    old = read_json(args.out)
    if valid(old, args) and old["part"] == args.part:
        status("done", f"result already in {args.out}", rows=old["rows"])
        return 0
    if args.helpers:
        base = ["--metric", args.metric, "--k", ",".join(map(str, args.k)),
                "--splits", str(args.splits), "--data", args.data]
        parts = run_helpers(args, base, status)
        result = dict(parts[0], part="0/1", rows=sum(p["rows"] for p in parts),
                      seconds=max(p["seconds"] for p in parts),
                      by=os.environ.get("MUSTER_TASK", "local"),
                      helpers=[p["by"] for p in parts],
                      correct={c: sum(p["correct"][c] for p in parts) for c in parts[0]["correct"]})
    else:
        result = run_slice(args, args.part, status)
    write_json(args.out, result)
    best = max(result["correct"], key=result["correct"].get)
    acc = result["correct"][best] / result["rows"]
    extra = {"parts_done": len(result["helpers"])} if args.helpers else {}
    status("done", f"best {best} acc {acc:.4f} ({result['rows']} rows)",
           step=result["rows"], best_acc=round(acc, 4), **extra)
    log(f"wrote {args.out}: best {best} acc {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
