#!/usr/bin/env python3
"""Train a small MLP on the UCI handwritten digits, reporting to a Muster node agent.

Standard library only (Python 3.11+). The model is a 64 -> hidden (tanh) -> 10 (softmax)
network trained by minibatch gradient descent on a seeded 80/20 train/validation split.

Muster integration (all optional, so the script also runs by hand):

  MUSTER_STATUS_FILE  append one JSON status object per line here (stdout if unset)
  MUSTER_DATA_DIR     per-task folder that survives restarts; checkpoint.json lives here
                      (a fresh temp dir if unset, so nothing resumes)
  MUSTER_TASK, MUSTER_ATTEMPT  only used to label the human progress lines

Failure modes for exercising the control plane:

  --lr 50              diverges: the loss becomes NaN within the first report or two
  --bug                crashes at start-up with a KeyError (exit 1)
  --hang-at-step N     at step N (first time only) checkpoints, then hangs silently
"""

import argparse
import gzip
import json
import math
import operator
import os
import random
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "digits.csv.gz")
N_IN = 64
N_OUT = 10
CHECKPOINT_VERSION = 1
HANG_MARKER = "hung-once"


# ----------------------------------------------------------------------------- status output


class StatusWriter:
    """Appends JSON status lines with one unbuffered write each, so a line is never torn."""

    def __init__(self, path):
        self.path = path
        self.silenced = False
        if path:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        else:
            self.fd = None

    def emit(self, state, message, metrics):
        if self.silenced:
            return
        # json.dumps writes NaN / Infinity as bare tokens; the Muster controller accepts them.
        data = (json.dumps({"state": state, "message": message, "metrics": metrics}) + "\n").encode()
        fd = self.fd
        if fd is None:
            fd = 1
            try:
                sys.stdout.flush()
            except RuntimeError:  # re-entered from the SIGTERM handler mid-print
                pass
        while data:
            n = os.write(fd, data)
            data = data[n:]


# ----------------------------------------------------------------------------- numerics


def safe_exp(v):
    """math.exp, but overflow gives inf (like numpy) instead of raising."""
    try:
        return math.exp(v)
    except OverflowError:
        return math.inf


def softmax(z):
    # Textbook form, deliberately without subtracting max(z). With a sane learning rate the
    # logits stay small; with a huge one exp() overflows to inf, inf/inf is NaN and the loss
    # goes NaN -- the same thing an unguarded numpy implementation does.
    e = [safe_exp(v) for v in z]
    s = sum(e)
    if s == 0.0:  # every exp() underflowed: 0/0
        return [math.nan] * len(z)
    return [v / s for v in e]


def nll(p):
    """-log(p) with log(0) = -inf and log(NaN) = NaN instead of exceptions."""
    if p > 0.0:
        return -math.log(p)
    if p == 0.0:
        return math.inf
    return math.nan


def argmax(z):
    best, best_i = -math.inf, 0
    for i, v in enumerate(z):
        if v > best:  # NaN never wins
            best, best_i = v, i
    return best_i


# ----------------------------------------------------------------------------- model


class MLP:
    """64 -> hidden (tanh) -> 10. Inputs are sparse lists of (pixel, value) pairs."""

    def __init__(self, hidden, rng):
        s1 = math.sqrt(6.0 / (N_IN + hidden))
        s2 = math.sqrt(6.0 / (hidden + N_OUT))
        # W1 is pixel-major (W1[pixel][unit]) so a sparse input touches only its nonzero rows;
        # W2 is class-major (W2[class][unit]).
        self.w1 = [[rng.uniform(-s1, s1) for _ in range(hidden)] for _ in range(N_IN)]
        self.b1 = [0.0] * hidden
        self.w2 = [[rng.uniform(-s2, s2) for _ in range(hidden)] for _ in range(N_OUT)]
        self.b2 = [0.0] * N_OUT

    def to_json(self):
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    def load_json(self, d):
        hidden = len(self.b1)
        if len(d["w1"]) != N_IN or len(d["b1"]) != hidden or len(d["w2"]) != N_OUT:
            raise ValueError("checkpoint weights have the wrong shape")
        self.w1 = [[float(v) for v in row] for row in d["w1"]]
        self.b1 = [float(v) for v in d["b1"]]
        self.w2 = [[float(v) for v in row] for row in d["w2"]]
        self.b2 = [float(v) for v in d["b2"]]

    def hidden(self, x):
        a = self.b1
        w1 = self.w1
        for j, v in x:
            a = [ai + v * w for ai, w in zip(a, w1[j])]
        return [math.tanh(ai) for ai in a]

    def logits(self, h):
        mul = operator.mul
        return [b + sum(map(mul, row, h)) for row, b in zip(self.w2, self.b2)]

    def predict(self, x):
        return argmax(self.logits(self.hidden(x)))

    def train_step(self, batch, lr):
        """One gradient-descent step on a minibatch of (x, label); returns the mean loss."""
        hidden = len(self.b1)
        w2 = self.w2
        g_w1 = {}
        g_b1 = [0.0] * hidden
        g_w2 = [[0.0] * hidden for _ in range(N_OUT)]
        g_b2 = [0.0] * N_OUT
        loss = 0.0
        for x, y in batch:
            h = self.hidden(x)
            p = softmax(self.logits(h))
            loss += nll(p[y])
            p[y] -= 1.0  # dL/dz for softmax + cross-entropy
            dh = [0.0] * hidden
            for k in range(N_OUT):
                d = p[k]
                g_w2[k] = [g + d * hv for g, hv in zip(g_w2[k], h)]
                g_b2[k] += d
                dh = [a + d * w for a, w in zip(dh, w2[k])]
            da = [g * (1.0 - hv * hv) for g, hv in zip(dh, h)]
            g_b1 = [a + b for a, b in zip(g_b1, da)]
            for j, v in x:
                g = g_w1.get(j)
                if g is None:
                    g_w1[j] = [v * d for d in da]
                else:
                    g_w1[j] = [gi + v * d for gi, d in zip(g, da)]
        scale = lr / len(batch)
        for j, g in g_w1.items():
            self.w1[j] = [w - scale * gi for w, gi in zip(self.w1[j], g)]
        self.b1 = [w - scale * gi for w, gi in zip(self.b1, g_b1)]
        for k in range(N_OUT):
            w2[k] = [w - scale * gi for w, gi in zip(w2[k], g_w2[k])]
            self.b2[k] -= scale * g_b2[k]
        return loss / len(batch)

    def accuracy(self, data):
        return sum(1 for x, y in data if self.predict(x) == y) / len(data)


# ----------------------------------------------------------------------------- data


def load_digits(path):
    rows = []
    with gzip.open(path, "rt") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            vals = [int(v) for v in line.split(",")]
            if len(vals) != N_IN + 1:
                raise ValueError(f"{path}:{lineno}: expected {N_IN + 1} columns, got {len(vals)}")
            # Scale pixel counts 0..16 to 0..1 and keep only the nonzero ones.
            x = [(j, v / 16.0) for j, v in enumerate(vals[:N_IN]) if v]
            rows.append((x, vals[N_IN]))
    return rows


def split(rows, val_frac, seed):
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_val = int(round(len(rows) * val_frac))
    return [rows[i] for i in idx[n_val:]], [rows[i] for i in idx[:n_val]]


# ----------------------------------------------------------------------------- checkpoints


def write_json_atomic(path, obj):
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_checkpoint(path, cfg):
    try:
        with open(path) as f:
            ck = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        print(f"warning: ignoring unreadable checkpoint {path}: {e}", file=sys.stderr)
        return None
    if ck.get("version") != CHECKPOINT_VERSION or ck.get("config") != cfg:
        print(f"warning: ignoring checkpoint {path}: made with a different config "
              f"({ck.get('config')})", file=sys.stderr)
        return None
    return ck


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a small MLP on the UCI digits (stdlib only).")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    p.add_argument("--seed", type=int, default=1, help="seeds the split, init and shuffling")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=32, help="minibatch size")
    p.add_argument("--hidden", type=int, default=64, help="hidden units")
    p.add_argument("--val-frac", type=float, default=0.2, help="validation fraction")
    p.add_argument("--report-every", type=int, default=50, metavar="STEPS",
                   help="status line + checkpoint every STEPS steps (default 50)")
    p.add_argument("--hang-at-step", type=int, default=None, metavar="N",
                   help="at step N, checkpoint then hang silently (once per data dir)")
    p.add_argument("--bug", action="store_true", help="crash at start-up (a config-key bug)")
    p.add_argument("--data", default=DEFAULT_DATA, help="digits csv.gz")
    args = p.parse_args(argv)
    if not args.lr > 0 or not math.isfinite(args.lr):
        p.error("--lr must be a positive number")
    for name in ("epochs", "batch", "hidden", "report_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 < args.val_frac < 1.0:
        p.error("--val-frac must be between 0 and 1")
    return args


def build_config(args):
    cfg = {"lr": args.lr, "seed": args.seed, "batch": args.batch, "hidden": args.hidden,
           "val_frac": args.val_frac}
    if args.bug:
        # Simulated half-finished refactor: the config key was renamed here, but the trainer
        # below still reads cfg["lr"] -> KeyError before any training happens.
        cfg["learning_rate"] = cfg.pop("lr")
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = build_config(args)
    lr = cfg["lr"]

    task = os.environ.get("MUSTER_TASK", "local")
    attempt = os.environ.get("MUSTER_ATTEMPT", "?")
    status = StatusWriter(os.environ.get("MUSTER_STATUS_FILE") or None)
    data_dir = os.environ.get("MUSTER_DATA_DIR")
    if not data_dir:
        data_dir = tempfile.mkdtemp(prefix="ml-sweep-")
        print(f"warning: MUSTER_DATA_DIR not set; checkpoints go to {data_dir}", file=sys.stderr)
    os.makedirs(data_dir, exist_ok=True)
    ck_path = os.path.join(data_dir, "checkpoint.json")
    marker = os.path.join(data_dir, HANG_MARKER)

    # Training state, also read by the SIGTERM handler.
    # "known": the step is valid (checkpoint loaded); "training": inside the training loop,
    # where SIGTERM is deferred to the end of the current step so a final checkpoint is
    # consistent and the step reported on the way out is never behind the resumed one.
    st = {"step": 0, "epoch": 0, "known": False, "training": False, "stop": False}

    def stop_line():
        m = {"step": st["step"], "epoch": st["epoch"]} if st["known"] else {}
        status.emit("running", "stopping on SIGTERM", m)

    def on_sigterm(signum, frame):
        if status.silenced:  # hung: die without a word
            raise SystemExit(143)
        if st["training"]:
            st["stop"] = True
            return
        stop_line()
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_sigterm)

    rows = load_digits(args.data)
    train, val = split(rows, cfg["val_frac"], cfg["seed"])
    steps_per_epoch = -(-len(train) // cfg["batch"])
    total_steps = args.epochs * steps_per_epoch

    rng = random.Random(cfg["seed"] * 1_000_003 + 7)  # weight init, then epoch shuffles
    model = MLP(cfg["hidden"], rng)
    order, order_epoch = None, -1
    last = {}

    ck = read_checkpoint(ck_path, cfg)
    if ck is not None:
        model.load_json(ck["weights"])
        st["step"] = int(ck["step"])
        order_epoch = int(ck["order_epoch"])
        order = ck["order"]
        v, internal, gauss = ck["rng_state"]
        rng.setstate((v, tuple(internal), gauss))
        last = ck.get("last", {})
    st["epoch"] = min(st["step"] // steps_per_epoch + 1, args.epochs)
    st["known"] = True

    def epoch_of(step):
        # 1-based epoch that the step belongs to (step counts completed steps)
        return max(1, min(-(-step // steps_per_epoch), args.epochs))

    def checkpoint():
        write_json_atomic(ck_path, {
            "version": CHECKPOINT_VERSION, "config": cfg, "step": st["step"],
            "epoch": st["epoch"], "order_epoch": order_epoch, "order": order,
            "rng_state": list(rng.getstate()), "weights": model.to_json(), "last": last,
            "saved_at": time.time(),
        })

    if ck is not None:
        msg = f"resumed from step {st['step']}"
    else:
        msg = (f"starting: lr {lr} seed {cfg['seed']} hidden {cfg['hidden']} batch {cfg['batch']}"
               f" epochs {args.epochs} ({total_steps} steps, {len(train)} train / {len(val)} val)")
    status.emit("starting", msg, {"step": st["step"], "epoch": st["epoch"]})
    print(f"[{task} #{attempt}] {msg}", flush=True)

    loss_sum, loss_n, warned_nonfinite = 0.0, 0, False
    hang_armed = args.hang_at_step is not None and not os.path.exists(marker)
    st["training"] = True
    while st["step"] < total_steps:
        e, pos = divmod(st["step"], steps_per_epoch)
        if e != order_epoch:
            order = list(range(len(train)))
            rng.shuffle(order)
            order_epoch = e
        batch = [train[i] for i in order[pos * cfg["batch"]:(pos + 1) * cfg["batch"]]]
        loss = model.train_step(batch, lr)
        st["step"] += 1
        st["epoch"] = epoch_of(st["step"])
        loss_sum += loss
        loss_n += 1
        if not math.isfinite(loss) and not warned_nonfinite:
            warned_nonfinite = True
            print(f"warning: non-finite loss {loss} at step {st['step']}", file=sys.stderr,
                  flush=True)

        if hang_armed and st["step"] == args.hang_at_step:
            # Checkpoint first, so the next attempt resumes from here, then go silent forever.
            checkpoint()
            with open(marker, "w") as f:
                f.write(f"hung at step {st['step']} (attempt {attempt}, pid {os.getpid()})\n")
            status.silenced = True
            while True:
                time.sleep(3600)

        if st["step"] % args.report_every == 0 or st["step"] == total_steps:
            val_acc = model.accuracy(val)
            last = {"step": st["step"], "epoch": st["epoch"], "loss": round(loss_sum / loss_n, 5),
                    "val_acc": round(val_acc, 4)}
            loss_sum, loss_n = 0.0, 0
            checkpoint()
            if st["step"] < total_steps:
                status.emit("running", f"epoch {st['epoch']} step {st['step']}", last)
            print(f"[{task} #{attempt}] epoch {st['epoch']}/{args.epochs} "
                  f"step {st['step']}/{total_steps} loss {last['loss']:.4f} "
                  f"val_acc {val_acc:.4f}", flush=True)

        if st["stop"]:
            checkpoint()
            stop_line()
            print(f"[{task} #{attempt}] SIGTERM: checkpointed step {st['step']}, exiting", flush=True)
            return 143
    st["training"] = False

    if not last or last.get("step") != st["step"]:  # e.g. resumed from a finished checkpoint
        last = dict(last, step=st["step"], epoch=st["epoch"], val_acc=round(model.accuracy(val), 4))
    status.emit("done", f"finished: val_acc {last['val_acc']:.4f}", last)
    print(f"[{task} #{attempt}] finished: val_acc {last['val_acc']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
