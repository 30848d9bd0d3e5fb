//! `muster up` runs the whole examples/ml-sweep fleet to the end: every planted failure is
//! caught and named in the inbox, the good runs succeed, and nothing is left running.
//!
//! This file is its own test binary, so Cargo runs it alone, after or before the others:
//! the sweep keeps both cores of a small machine busy for minutes.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use muster_e2e::inbox::{read_inbox_dir, tail};
use muster_e2e::process::{binary_dir, kill_processes_with_env, signal_pid, wait_child};
use muster_e2e::{attempt_of, is_event, processes_with_arg_containing, processes_with_env, reason};

const SWEEP_DEADLINE: Duration = Duration::from_secs(8 * 60);

/// `muster up` on a data dir, stopped and cleaned up on drop whatever happened.
struct Up {
    child: Option<Child>,
    data_dir: std::path::PathBuf,
}

impl Up {
    fn start(root: &Path) -> Up {
        let data_dir = root.join("fleet");
        let out = File::create(root.join("up.out")).expect("creating up.out");
        let err = File::create(root.join("up.err")).expect("creating up.err");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ lives in the workspace");
        let child = Command::new(binary_dir().join("muster"))
            .current_dir(workspace)
            // Run the built binary as an operator would: with CARGO set, `muster up` takes
            // itself for `cargo run` and rebuilds the daemons first.
            .env_remove("CARGO")
            .env_remove("MUSTER_CONTROLLER")
            .args(["up", "--exit-when-done", "--data-dir"])
            .arg(&data_dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting muster up");
        Up {
            child: Some(child),
            data_dir,
        }
    }

    /// Waits for `muster up` to exit on its own; None if it ran past the deadline.
    fn wait(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("muster up was started");
        let status = muster_e2e::poll_until(deadline, || child.try_wait().ok().flatten());
        if status.is_some() {
            self.child = None;
        }
        status
    }

    fn leftovers(&self) -> Vec<i32> {
        let dir = self.data_dir.display().to_string();
        let mut pids = processes_with_env("MUSTER_DATA_DIR", &format!("{dir}/"));
        pids.extend(processes_with_arg_containing(&dir));
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM stops the node agents (and their tasks), then the controller.
            signal_pid(child.id() as i32, Signal::SIGTERM);
            wait_child(&mut child, Duration::from_secs(120));
        }
        let dir = self.data_dir.display().to_string();
        kill_processes_with_env(
            "MUSTER_DATA_DIR",
            &format!("{dir}/"),
            Duration::from_secs(10),
        );
        for pid in processes_with_arg_containing(&dir) {
            signal_pid(pid, Signal::SIGKILL);
        }
    }
}

fn file_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn muster_up_runs_the_ml_sweep_to_the_end() {
    let root = tempfile::Builder::new()
        .prefix("muster-e2e-up-")
        .tempdir()
        .expect("a temp dir");
    let mut up = Up::start(root.path());

    let status = up.wait(SWEEP_DEADLINE);

    let report = || {
        format!(
            "stdout:\n{}\nstderr:\n{}\ncontroller log:\n{}",
            file_tail(&root.path().join("up.out"), 40),
            file_tail(&root.path().join("up.err"), 20),
            file_tail(&up.data_dir.join("logs/controller.log"), 20)
        )
    };
    let status = status.unwrap_or_else(|| {
        panic!(
            "muster up ran past {}s\n{}",
            SWEEP_DEADLINE.as_secs(),
            report()
        )
    });
    assert!(status.success(), "muster up exited {status}\n{}", report());
    let left = up.leftovers();
    assert!(
        left.is_empty(),
        "processes of the fleet outlived muster up: {left:?}"
    );

    let inbox = read_inbox_dir(&up.data_dir.join("controller/inbox"));
    let has = |check: &dyn Fn(&Value) -> bool, what: &str| {
        assert!(
            inbox.iter().any(check),
            "no {what} in the inbox:\n{}",
            tail(&inbox, 60)
        );
    };
    has(
        &|e| is_event(e, "task.failed", "diverge-lr50") && reason(e) == "metric_nan",
        "task.failed metric_nan for diverge-lr50",
    );
    has(
        &|e| is_event(e, "task.crash_loop", "buggy-start"),
        "task.crash_loop for buggy-start",
    );
    assert_hang_resumed(&inbox);
    let succeeded: BTreeSet<&str> = inbox
        .iter()
        .filter(|e| e["kind"] == "task.succeeded")
        .filter_map(|e| e["task"].as_str())
        .filter(|t| t.starts_with("sweep-"))
        .collect();
    assert_eq!(
        succeeded.len(),
        12,
        "sweep runs that succeeded: {succeeded:?}"
    );
}

/// hang-s1 went silent, was restarted on heartbeat_timeout, resumed from its checkpoint and
/// finished.
fn assert_hang_resumed(inbox: &[Value]) {
    let unhealthy = inbox
        .iter()
        .find(|e| is_event(e, "task.unhealthy", "hang-s1"))
        .unwrap_or_else(|| panic!("hang-s1 was never unhealthy:\n{}", tail(inbox, 60)));
    assert_eq!(reason(unhealthy), "heartbeat_timeout", "{unhealthy}");
    let after: Vec<&Value> = inbox
        .iter()
        .filter(|e| e["seq"].as_u64() > unhealthy["seq"].as_u64())
        .collect();
    let resumed = after
        .iter()
        .find(|e| is_event(e, "task.report", "hang-s1") && attempt_of(e) >= 2)
        .unwrap_or_else(|| panic!("no report from hang-s1 after its restart"));
    let step = resumed["data"]["metrics"]["step"].as_f64().unwrap_or(0.0);
    assert!(
        step > 0.0,
        "hang-s1 started over instead of resuming: {resumed}"
    );
    assert!(
        after
            .iter()
            .any(|e| is_event(e, "task.succeeded", "hang-s1")),
        "hang-s1 did not succeed after its restart"
    );
}
