//! A node that goes silent is declared lost, its task is placed on another node, and when
//! it comes back it is told to stop the replaced attempt: the task does not run twice.

use nix::sys::signal::Signal;

use muster_e2e::process::signal_pid;
use muster_e2e::{
    attempt_of, is_event, pid_alive, seq_of, wait_until, Fleet, FleetOptions, TASK_DEADLINE,
};

const QUICK_LOSS: &str = r#"[controller]
tick = "250ms"
heartbeat_interval = "500ms"
node_timeout = "3s"
reschedule_after = "2s"
lease = "2s"
report_sample = "1s"
"#;

const ROAMER: &str = r#"
name = "roamer"
shell = true
command = ['''
while true; do
  echo '{"state":"running"}' >> "$MUSTER_STATUS_FILE"
  sleep 0.5
done
''']
[stop]
grace = "1s"
"#;

fn other(node: &str) -> &'static str {
    if node == "node-1" {
        "node-2"
    } else {
        "node-1"
    }
}

#[test]
fn lost_node_task_moves_and_the_old_attempt_is_fenced_on_return() {
    let options = FleetOptions {
        controller_config: QUICK_LOSS.to_string(),
        ..FleetOptions::default()
    };
    let fleet = Fleet::start(2, options);
    fleet.submit_toml("roamer", ROAMER);
    let first = fleet.wait_for_event(
        |e| is_event(e, "attempt.started", "roamer") && attempt_of(e) == 1,
        TASK_DEADLINE,
    );
    let old_node = first["node"]
        .as_str()
        .expect("attempt.started names its node")
        .to_string();
    let old_pid = first["data"]["pid"]
        .as_i64()
        .expect("attempt.started has a pid") as i32;
    let agent = fleet.node_agent_pid(&old_node);

    // Freeze the agent: no heartbeats, but its child keeps running, as in a partition.
    signal_pid(agent, Signal::SIGSTOP);
    let lost = fleet.wait_for_event(
        |e| e["kind"] == "node.lost" && e["node"] == old_node.as_str(),
        TASK_DEADLINE,
    );
    let moved = fleet.wait_for_event(
        |e| is_event(e, "attempt.started", "roamer") && attempt_of(e) == 2,
        TASK_DEADLINE,
    );
    signal_pid(agent, Signal::SIGCONT);

    assert_eq!(
        moved["node"],
        other(&old_node),
        "placed on the other node: {moved}"
    );
    let returned = fleet.wait_for_event(
        |e| {
            seq_of(e) > seq_of(&lost)
                && e["kind"] == "node.returned"
                && e["node"] == old_node.as_str()
        },
        TASK_DEADLINE,
    );
    wait_until("the replaced attempt to be stopped", TASK_DEADLINE, || {
        (!pid_alive(old_pid)).then_some(())
    });
    // Out of contact longer than its lease, the old node stopped the attempt itself; had it
    // still run on return, the controller would have fenced it. Either way it is recorded.
    let fenced = returned["data"]["fenced"]
        .as_array()
        .is_some_and(|f| f.iter().any(|a| a["task"] == "roamer"));
    wait_until(
        "the old attempt's end to be recorded",
        TASK_DEADLINE,
        || {
            let ended = fleet.events(|e| {
                is_event(e, "attempt.exited", "roamer")
                    && attempt_of(e) == 1
                    && e["node"] == old_node.as_str()
            });
            (fenced || !ended.is_empty()).then_some(())
        },
    );
    let task = fleet.show("roamer");
    assert_eq!(task["state"], "running", "{task:#}");
    assert_eq!(task["node"], other(&old_node), "{task:#}");
    assert_eq!(task["attempt"], 2, "{task:#}");
    let new_pid = moved["data"]["pid"].as_i64().expect("a pid") as i32;
    assert!(pid_alive(new_pid), "the new attempt {new_pid} is running");
}
