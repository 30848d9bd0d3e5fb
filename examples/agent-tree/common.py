"""What planner.py and worker.py share: status lines, the `muster` CLI, atomic JSON files,
and a tail of $MUSTER_INBOX. Python 3 standard library only."""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[{os.environ.get('MUSTER_TASK', 'local')}] {msg}", flush=True)


class Status:
    """Appends {"state", "message", "metrics"} lines to $MUSTER_STATUS_FILE (stdout if unset).
    One os.write per line on an O_APPEND fd: never buffered, never torn."""

    def __init__(self):
        path = os.environ.get("MUSTER_STATUS_FILE")
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None
        self.last = 0.0

    def __call__(self, state, message, **metrics):
        line = json.dumps({"state": state, "message": message, "metrics": metrics}) + "\n"
        if self.fd is None:
            sys.stdout.write(line)
            sys.stdout.flush()
        else:
            os.write(self.fd, line.encode())
        self.last = time.monotonic()

    def due(self, every):
        return time.monotonic() - self.last >= every


def write_json(path, obj):
    """Write obj to path atomically (temp file + rename), so a reader never sees half a file."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- muster CLI


class MusterError(Exception):
    def __init__(self, argv, rc, stderr, permanent):
        self.rc, self.stderr, self.permanent = rc, stderr, permanent
        super().__init__(f"`{' '.join(argv[:3])} ...` exit {rc}: {stderr}")


# Worth a retry: the controller is restarting, or the network hiccuped.
TRANSIENT = re.compile(r"unreachable|cannot reach|connection refused|connection reset|"
                       r"did not answer|timed? ?out|unavailable|shutting down|try again", re.I)
# Retrying cannot help: a subtree limit refused it, or the token may not do it.
# (exit 1 with "submission refused: limit max_depth = 2 of planner reached: ..." or "parent
# task X has ended"; exit 2, 3 and 4 are usage, not found and permission errors)
REFUSED = re.compile(r"submission refused|limit|budget|has ended|no new children|"
                     r"permission|denied|unauthenticated", re.I)


def muster(*args, tries=4, timeout=20, json_out=False):
    """Run `muster ARGS`; return its stdout (parsed when json_out). Transient failures are
    retried with a short backoff; a refusal (exit 2 usage, 3 not found, 4 permission, or a
    message naming a limit) raises at once with permanent=True."""
    argv = ["muster", *args]
    for attempt in range(1, tries + 1):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            rc, err = p.returncode, p.stderr.strip()
        except subprocess.TimeoutExpired:
            rc, err = None, f"no answer within {timeout}s"
        except FileNotFoundError:
            raise MusterError(argv, 127, "`muster` is not on PATH", True)
        if rc == 0:
            try:
                return json.loads(p.stdout) if json_out else p.stdout
            except ValueError as e:
                rc, err = 0, f"unreadable JSON from muster: {e}"
        permanent = rc in (2, 3, 4) or (REFUSED.search(err) and not TRANSIENT.search(err))
        if permanent or attempt == tries:
            raise MusterError(argv, rc, err, bool(permanent))
        print(f"muster {args[0]} failed (exit {rc}: {err}); retry {attempt}/{tries - 1}",
              file=sys.stderr, flush=True)
        time.sleep(0.5 * 2 ** (attempt - 1))


def children(parent):
    """Ground truth: {name: task} of parent's direct children, from `muster ls`."""
    return {t["name"]: t for t in muster("ls", "--parent", parent, "--json", json_out=True)}


def start_child(name, argv, *, workdir=HERE, restart="on-failure", max_restarts=2,
                backoff=("500ms", "2s"), limits=(), labels=()):
    """`muster run` a child of the calling task. Returns False if it existed already (a
    retried submission that had gone through counts as existing: names are unique)."""
    cmd = ["run", "--name", name, "--workdir", workdir, "--restart", restart,
           "--max-restarts", str(max_restarts), "--backoff-initial", backoff[0],
           "--backoff-max", backoff[1], "--heartbeat-timeout", "60s",
           "--parent-close", "stop", "--parent-timeout", "30s", "--env", "PYTHONUNBUFFERED=1"]
    for kv in labels:
        cmd += ["--label", kv]
    for kv in limits:
        cmd += ["--limit", kv]
    try:
        muster(*cmd, "--", *argv)
        return True
    except MusterError as e:
        if "already exists" in e.stderr:
            return False
        raise


FINAL = {"succeeded", "failed", "stopped"}
GAVE_UP = {"failed", "stopped", "crash_loop"}  # nothing of this task runs any more


def escalate(task, state, known_ids=(), acked=None):
    """A parent's answer to a child that gave up: ack the open incidents of the child's
    subtree (so the parent_timeout does not page people), then stop the child (and its
    subtree). Failures are logged, not fatal: the caller replaces the child anyway."""
    acked = set() if acked is None else acked
    ids = set(known_ids)
    try:
        for inc in muster("incidents", "--subtree", task, "--json", json_out=True):
            if inc.get("state") == "open":
                ids.add(inc["id"])
    except MusterError as e:
        log(f"cannot list incidents of {task}: {e}")
    for i in sorted(ids - acked, key=str):
        try:
            muster("ack", str(i))
            acked.add(i)
            log(f"acked incident {i} of {task}")
        except MusterError as e:
            log(f"could not ack incident {i}: {e}")
    if state not in FINAL:
        try:
            muster("stop", task)
            log(f"stopped {task} (was {state})")
        except MusterError as e:
            log(f"could not stop {task}: {e}")


# ----------------------------------------------------------------------------- inbox


class Inbox:
    """Tails $MUSTER_INBOX (JSON lines about our descendants), yielding each seq once.
    The file may not exist before the first event; the agent writes each seq once, and the
    dedupe by seq only guards against a file replaced under us."""

    def __init__(self, path):
        self.path, self.offset, self.partial, self.seen, self.inode = path, 0, b"", set(), None

    def new_events(self):
        if not self.path:
            return []
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self.inode or st.st_size < self.offset:  # new, rotated, cut
                    self.offset, self.partial, self.inode = 0, b"", st.st_ino
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        events = []
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if not isinstance(ev, dict) or ev.get("seq") in self.seen:
                continue
            self.seen.add(ev.get("seq"))
            events.append(ev)
        return events
