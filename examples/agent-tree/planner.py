#!/usr/bin/env python3
"""Plan a k-NN hyper-parameter search on the UCI digits as a tree of Muster tasks.

The grid (4 distance metrics x k in 1,3,5,7,9 x uniform/distance votes = 40 configs) is cut
into one slice per metric; each slice is a worker task started with `muster run`:

  PLANNER-w1     euclidean
  PLANNER-w2     manhattan
  PLANNER-w3     cosine, fanned out to two helper tasks of its own (PLANNER-w3-h1, -h2)
  PLANNER-flaky  chebyshev, fails its first two attempts on purpose: crash_loop, incident;
                 the planner acks the incident, stops it, starts PLANNER-flaky-r2 instead

The planner follows its subtree through $MUSTER_INBOX (new events, deduped by seq) and
`muster ls --parent $MUSTER_TASK --json` (the ground truth it acts on), reports to
$MUSTER_STATUS_FILE, and writes result.json / result.txt into $MUSTER_DATA_DIR. Workers write
their slice into $MUSTER_DATA_DIR/results/, shared because every node of `muster up` is on
this machine. A restarted planner starts nothing that exists already (child or result).
"""

import argparse
import os
import signal
import sys
import time

from common import (FINAL, GAVE_UP, HERE, Inbox, MusterError, Status, children, escalate,
                    log, read_json, start_child, write_json)

# (worker name suffix, metric, extra worker arguments, extra `muster run` options of the
# slice's first worker only -- its replacements get the defaults of common.start_child)
SLICES = [
    ("w1", "euclidean", [], {}),
    ("w2", "manhattan", [], {}),
    ("w3", "cosine", ["--helpers", "2"], {}),
    # the injected fault: fail 2 attempts; with one restart allowed the 2nd is a crash loop
    ("flaky", "chebyshev", ["--fail-attempts", "2"], {"max_restarts": 1, "backoff": ("200ms", "1s")}),
]
REPLACEMENTS = 2  # per slice: NAME-r2, NAME-r3; then the slice is given up
URGENT = {"task.crash_loop", "task.failed", "task.stopped", "task.succeeded", "incident.opened"}


class Slice:
    def __init__(self, me, suffix, metric, extra, opts, results):
        self.metric, self.extra, self.opts = metric, extra, opts
        base = f"{me}-{suffix}"
        self.names = [base] + [f"{base}-r{n}" for n in range(2, REPLACEMENTS + 2)]
        self.out = os.path.join(results, f"{metric}.json")
        self.result, self.lost = None, None


class Planner:
    def __init__(self, args):
        self.args = args
        self.me = os.environ["MUSTER_TASK"]
        self.dir = os.environ["MUSTER_DATA_DIR"]
        results = os.path.join(self.dir, "results")
        self.slices = [Slice(self.me, *s, results) for s in SLICES]
        self.status = Status()
        self.inbox = Inbox(os.environ.get("MUSTER_INBOX"))
        self.incidents = {}  # task -> open incident ids seen in the inbox
        self.kids = {}
        # incidents this planner acked, kept across its restarts (for the final report only)
        self.acked_file = os.path.join(self.dir, "acked.json")
        self.acked = set(read_json(self.acked_file) or [])

    @property
    def replaced(self):
        return sum(1 for s in self.slices for n in s.names[1:] if n in self.kids)

    def submit(self, s, name):
        argv = ["python3", "worker.py", "--metric", s.metric, "--splits", str(self.args.splits),
                "--data", self.args.data, "--out", s.out]
        extra, opts = s.extra, dict(s.opts)
        if name != s.names[0]:
            # A replacement runs without the injected fault; a real planner would change
            # something here too (another node, config or version).
            if "--fail-attempts" in extra:
                i = extra.index("--fail-attempts")
                extra = extra[:i] + extra[i + 2:]
            opts = {}
        limits = ["budget=5m"]  # each worker's subtree: at most 5 minutes, 2 helpers, 1 level
        if "--helpers" in extra:
            limits += ["max_children=2", "max_depth=1"]
        try:
            new = start_child(name, argv + extra, limits=limits,
                              labels=["example=agent-tree", "role=worker"], **opts)
            log(f"{'started' if new else 'found existing'} {name} for the {s.metric} slice")
        except MusterError as e:
            if e.permanent:  # a limit or the token refused it: retrying will not help
                s.lost = f"{name} refused: {e.stderr}"
                log(f"giving up the {s.metric} slice: {s.lost}")
            else:
                log(f"could not start {name} (will retry): {e}")

    def reconcile(self, s):
        """Move one slice on, from the ground truth in self.kids (listed before this)."""
        if s.result or s.lost:
            return
        res = read_json(s.out)
        if res and res.get("metric") == s.metric and res.get("splits") == self.args.splits:
            s.result = res
            log(f"{s.metric} slice done by {res['by']}")
            return
        present = [n for n in s.names if n in self.kids]
        if not present:
            return self.submit(s, s.names[0])
        owner = present[-1]
        state = self.kids[owner]["state"]
        if state not in GAVE_UP and state != "succeeded":  # succeeded w/o result: gave up too
            return
        log(f"{owner} is {state} ({self.kids[owner].get('message') or 'no message'}): escalating")
        escalate(owner, state, self.incidents.get(owner, ()), self.acked)
        write_json(self.acked_file, sorted(self.acked, key=str))
        i = s.names.index(owner) + 1
        if i == len(s.names):
            s.lost = f"{owner} {state}, no replacement left"
            log(f"giving up the {s.metric} slice: {s.lost}")
            return
        self.submit(s, s.names[i])

    def read_inbox(self, quiet=False):
        urgent = False
        events = self.inbox.new_events()
        if quiet and events:  # a restarted planner: what earlier attempts saw already
            log(f"inbox: {len(events)} earlier events (up to #{events[-1].get('seq')})")
        for ev in events:
            kind, task, data = ev.get("kind"), ev.get("task", ""), ev.get("data") or {}
            if kind != "task.report" and not quiet:
                log(f"inbox #{ev.get('seq')} {kind} {task} #{ev.get('attempt', '-')}: "
                    f"{ev.get('message', '')}")
            if kind == "incident.opened" and data.get("incident") is not None:
                self.incidents.setdefault(task, set()).add(data["incident"])
            elif kind in ("incident.acked", "incident.resolved"):
                self.incidents.get(task, set()).discard(data.get("incident"))
            urgent |= kind in URGENT and ev.get("parent") == self.me
        return urgent

    def report(self, state, message, **extra):
        running = sum(1 for t in self.kids.values() if t.get("state") not in FINAL)
        self.status(state, message, slices_done=sum(1 for s in self.slices if s.result),
                    slices=len(self.slices), children=len(self.kids), children_live=running,
                    replacements=self.replaced, incidents_acked=len(self.acked),
                    inbox_events=len(self.inbox.seen), **extra)

    def run(self):
        self.report("starting", f"k-NN search: {len(self.slices)} slices, "
                    f"{self.args.splits} held-out splits, data {self.args.data}")
        last_ok, next_ls = time.monotonic(), 0.0
        self.read_inbox(quiet=True)
        while True:
            urgent = self.read_inbox()
            if urgent or time.monotonic() >= next_ls:
                try:
                    self.kids = children(self.me)
                    last_ok = time.monotonic()
                except MusterError as e:
                    if e.permanent or time.monotonic() - last_ok > 120:
                        self.report("failed", f"cannot list my children: {e.stderr}")
                        return 1
                    log(f"muster ls failed, trying again: {e}")
                else:
                    for s in self.slices:
                        self.reconcile(s)
                next_ls = time.monotonic() + self.args.poll
            if all(s.result or s.lost for s in self.slices):
                break
            if self.status.due(3):
                done = [s.metric for s in self.slices if s.result]
                self.report("running", f"{len(done)}/{len(self.slices)} slices in"
                            + (f" ({', '.join(done)})" if done else ""))
            time.sleep(0.5)
        self.settle()
        return self.finish()

    def settle(self, wait=15):
        """Give the children a moment to exit after writing their results (a clean tree)."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self.read_inbox()
            try:
                self.kids = children(self.me)
            except MusterError:
                return
            if all(t.get("state") in FINAL for t in self.kids.values()):
                return
            time.sleep(1)

    def finish(self):
        rows = []
        for s in self.slices:
            for config, ok in (s.result or {}).get("correct", {}).items():
                rows.append({"config": config, "accuracy": round(ok / s.result["rows"], 4),
                             "correct": ok, "rows": s.result["rows"], "by": s.result["by"]})
        # best first; ties go to the smaller k, then to uniform votes (the simpler model)
        rows.sort(key=lambda r: (-r["accuracy"], int(r["config"].split("k=")[1].split("/")[0]),
                                 r["config"].endswith("distance")))
        lost = {s.metric: s.lost for s in self.slices if s.lost}
        summary = {"best": rows[0] if rows else None, "table": rows, "lost_slices": lost,
                   "replacements": self.replaced, "incidents_acked": sorted(self.acked, key=str),
                   "splits": self.args.splits, "data": self.args.data}
        write_json(os.path.join(self.dir, "result.json"), summary)
        ks = sorted({int(r["config"].split("k=")[1].split("/")[0]) for r in rows})
        acc = {r["config"]: r["accuracy"] for r in rows}
        lines = [f"{'held-out accuracy':<19}" + "".join(f"{'k=' + str(k):>8}" for k in ks) + "   by"]
        for s in self.slices:
            for w in ("uniform", "distance"):
                cells = [acc.get(f"{s.metric}/k={k}/{w}") for k in ks]
                lines.append(f"{s.metric + '/' + w:<19}" + "".join(
                    f"{c:>8.4f}" if c is not None else f"{'-':>8}" for c in cells)
                    + f"   {(s.result or {}).get('by', 'LOST')}")
        lines += [f"lost: {m}: {why}" for m, why in lost.items()]
        if rows:
            lines.append(f"best: {rows[0]['config']} {rows[0]['accuracy']:.4f} "
                         f"({rows[0]['correct']}/{rows[0]['rows']} held-out rows)")
        with open(os.path.join(self.dir, "result.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
        if lost or not rows:
            self.report("failed", f"slices lost: {lost}; partial table in {self.dir}/result.txt")
            return 1
        b = rows[0]
        self.report("done", f"best {b['config']} accuracy {b['accuracy']:.4f} "
                    f"({len(rows)} configs, {self.replaced} replacement(s)); "
                    f"table in {self.dir}/result.txt", best_acc=b["accuracy"])
        log(f"best: {b['config']} accuracy {b['accuracy']:.4f}")
        return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../ml-sweep/digits.csv.gz",
                   help="digits csv.gz, relative to this directory (the workers' workdir)")
    p.add_argument("--splits", type=int, default=8, help="random 80/20 held-out splits")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between `muster ls` calls")
    args = p.parse_args(argv)
    for var in ("MUSTER_TASK", "MUSTER_DATA_DIR"):
        if not os.environ.get(var):
            sys.exit(f"planner: ${var} is not set: run me as a Muster task "
                     f"(muster up --example agent-tree)")
    if not os.path.exists(os.path.join(HERE, args.data)):
        sys.exit(f"planner: no data at {os.path.join(HERE, args.data)}")
    planner = Planner(args)
    # Stopped (by an operator, or the budget): say so and go; with parent_close = stop the
    # controller stops the workers too.
    signal.signal(signal.SIGTERM, lambda *_: (planner.report("running", "stopping on SIGTERM"),
                                              sys.exit(143)))
    return planner.run()


if __name__ == "__main__":
    sys.exit(main())
