//! A controller restart, killed or clean, loses no task and restarts no child: the node
//! agents keep their children and reconcile when the controller is back.

use std::collections::HashMap;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use muster_e2e::{
    attempt_of, is_event, pid_alive, poll_until, seq_of, Fleet, FleetOptions, TASK_DEADLINE,
};

const TASKS: [&str; 3] = ["worker-a", "worker-b", "worker-c"];

/// Three long-running tasks that report a growing step every half second.
fn workers_spec() -> String {
    TASKS
        .iter()
        .map(|name| {
            format!(
                r#"
[[task]]
name = "{name}"
shell = true
command = ['''
step=0
while true; do
  step=$((step + 1))
  echo "{{\"state\":\"running\",\"metrics\":{{\"step\":$step}}}}" >> "$MUSTER_STATUS_FILE"
  sleep 0.5
done
''']
[task.stop]
grace = "1s"
"#
            )
        })
        .collect()
}

fn start_workers(fleet: &Fleet) -> HashMap<&'static str, i32> {
    fleet.submit_toml("workers", &workers_spec());
    TASKS
        .iter()
        .map(|&task| (task, fleet.wait_for_attempt_pid(task, 1, TASK_DEADLINE)))
        .collect()
}

fn last_seq(fleet: &Fleet) -> u64 {
    fleet.read_inbox().last().map_or(0, seq_of)
}

/// Waits until the restarted controller has heard from the node and from every task.
fn wait_for_reconnect(fleet: &Fleet, after_seq: u64) {
    fleet.wait_for_event(
        |e| {
            seq_of(e) > after_seq
                && (e["kind"] == "node.joined" || e["kind"] == "node.returned")
                && e["node"] == "node-1"
        },
        TASK_DEADLINE,
    );
    fleet.wait_for_nodes_ready(1);
    for task in TASKS {
        fleet.wait_for_event(
            |e| seq_of(e) > after_seq && is_event(e, "task.report", task),
            TASK_DEADLINE,
        );
    }
}

fn assert_nothing_lost(fleet: &Fleet, pids: &HashMap<&str, i32>, after_seq: u64) {
    let tasks = fleet.tasks();
    for task in TASKS {
        let listed: Vec<&Value> = tasks.iter().filter(|t| t["name"] == task).collect();
        assert_eq!(listed.len(), 1, "{task} is listed once: {tasks:#?}");
        assert_eq!(listed[0]["state"], "running", "{:#}", listed[0]);
        assert_eq!(listed[0]["attempt"], 1, "{:#}", listed[0]);
        assert!(pid_alive(pids[task]), "{task}'s child {} died", pids[task]);
    }

    // Give a wrongly restarted task time to show up before concluding none was.
    let restarted = poll_until(Duration::from_secs(3), || {
        fleet
            .events(|e| {
                seq_of(e) > after_seq
                    && (e["kind"] == "attempt.started" || e["kind"] == "attempt.exited")
            })
            .pop()
    });
    assert!(restarted.is_none(), "a child was restarted: {restarted:?}");

    let seqs: Vec<u64> = fleet.read_inbox().iter().map(seq_of).collect();
    let out_of_order: Vec<_> = seqs.windows(2).filter(|w| w[0] >= w[1]).collect();
    assert!(
        out_of_order.is_empty(),
        "inbox seq not strictly increasing: {out_of_order:?}"
    );
}

#[test]
fn killed_controller_comes_back_with_every_task_and_child() {
    let mut fleet = Fleet::start(1, FleetOptions::default());
    let pids = start_workers(&fleet);
    let before = last_seq(&fleet);

    fleet.kill_controller(Signal::SIGKILL);
    fleet.start_controller();

    wait_for_reconnect(&fleet, before);
    assert_nothing_lost(&fleet, &pids, before);
}

#[test]
fn cleanly_stopped_controller_comes_back_with_every_task_and_child() {
    let mut fleet = Fleet::start(1, FleetOptions::default());
    let pids = start_workers(&fleet);
    let before = last_seq(&fleet);

    let status = fleet.kill_controller(Signal::SIGTERM);
    let addr_left = fleet.controller_dir().join("controller.addr").exists();
    fleet.start_controller();

    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM exits 0: {status:?}"
    );
    assert!(!addr_left, "controller.addr is removed on a clean exit");
    wait_for_reconnect(&fleet, before);
    assert_nothing_lost(&fleet, &pids, before);
    let attempts: Vec<u64> = fleet
        .events(|e| e["kind"] == "attempt.started")
        .iter()
        .map(attempt_of)
        .collect();
    assert_eq!(
        attempts,
        [1, 1, 1],
        "one attempt per task in the whole inbox"
    );
}
