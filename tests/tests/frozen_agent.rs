//! A node agent frozen (SIGSTOP) past the controller's lease cannot stop its tasks itself:
//! the node's keeper does, so the replacement the controller places on another node never
//! runs beside the old attempt.

use std::time::Duration;

use nix::sys::signal::Signal;

use muster_e2e::process::signal_pid;
use muster_e2e::{attempt_of, is_event, pid_alive, poll_until, Fleet, FleetOptions, TASK_DEADLINE};

const CONFIG: &str = r#"[controller]
tick = "250ms"
heartbeat_interval = "500ms"
node_timeout = "2s"
reschedule_after = "1s"
lease = "3s"
report_sample = "1s"
"#;

const STEADY: &str = r#"
name = "steady"
shell = true
command = ['''
while true; do
  echo '{"state":"running"}' >> "$MUSTER_STATUS_FILE"
  sleep 0.2
done
''']
[stop]
grace = "1s"
"#;

#[test]
fn a_frozen_agents_task_is_stopped_before_its_replacement_starts() {
    let fleet = Fleet::start(
        2,
        FleetOptions {
            controller_config: CONFIG.to_string(),
            ..FleetOptions::default()
        },
    );
    fleet.submit_toml("steady", STEADY);
    let pid = fleet.wait_for_attempt_pid("steady", 1, TASK_DEADLINE);
    let node = fleet.show("steady")["node"]
        .as_str()
        .expect("steady runs on a node")
        .to_string();

    let agent = fleet.node_agent_pid(&node);
    let frozen_at = std::time::Instant::now();
    // The fleet's teardown continues a stopped agent if the test fails before SIGCONT.
    signal_pid(agent, Signal::SIGSTOP);

    // Watch both: the old process must be gone before attempt 2 starts anywhere.
    let mut overlap = None;
    let gone = poll_until(Duration::from_secs(30), || {
        let replaced = fleet
            .read_inbox()
            .iter()
            .any(|e| is_event(e, "attempt.started", "steady") && attempt_of(e) >= 2);
        let alive = pid_alive(pid);
        if replaced && alive {
            overlap.get_or_insert(frozen_at.elapsed());
        }
        (!alive).then_some(())
    });
    assert!(
        overlap.is_none(),
        "attempt 2 started while attempt 1 (pid {pid}) still ran, {overlap:?} after the freeze; keeper log:\n{}",
        std::fs::read_to_string(fleet.dir().join("nodes").join(&node).join("keeper.log")).unwrap_or_default()
    );
    assert!(
        gone.is_some(),
        "pid {pid} outlived the lease while its agent was frozen"
    );

    // The controller places it again; once the agent is back there is one copy.
    let started = fleet.wait_for_event(
        |e| is_event(e, "attempt.started", "steady") && attempt_of(e) >= 2,
        TASK_DEADLINE,
    );
    signal_pid(agent, Signal::SIGCONT);
    fleet.wait_for_nodes_ready(2);
    let running = fleet.wait_for_task_state("steady", "running", TASK_DEADLINE);
    assert_eq!(running["attempt"], started["attempt"], "{running}");
    // Every process of the task belongs to the replacement (the shell and its `sleep`).
    let procs = fleet.task_processes("steady");
    assert!(
        !procs.is_empty()
            && procs
                .iter()
                .all(|p| Some(p.attempt) == running["attempt"].as_u64()),
        "processes of another attempt: {procs:?}"
    );
}
