//! `muster up` runs the whole examples/ml-sweep fleet to the end: every planted failure is
//! caught and named in the inbox, the good runs succeed, and nothing is left running.
//!
//! This file is its own test binary, so Cargo runs it alone, after or before the others:
//! the sweep keeps both cores of a small machine busy for minutes.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use muster_e2e::inbox::{read_inbox_dir, tail};
use muster_e2e::up::Up;
use muster_e2e::{attempt_of, is_event, reason};

const SWEEP_DEADLINE: Duration = Duration::from_secs(8 * 60);

#[test]
fn muster_up_runs_the_ml_sweep_to_the_end() {
    let root = tempfile::Builder::new()
        .prefix("muster-e2e-up-")
        .tempdir()
        .expect("a temp dir");
    let mut up = Up::start(root.path(), &[]);

    up.run_to_end(SWEEP_DEADLINE);

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
