//! A node agent killed with SIGKILL and started again: its children keep running under the
//! node's keeper, are re-adopted, and a child that exited meanwhile reports its real exit.

use muster_e2e::{
    attempt_of, is_event, pid_alive, processes_with_env, seq_of, wait_until, Fleet, FleetOptions,
    TASK_DEADLINE,
};
use nix::sys::signal::Signal;

const STEADY: &str = r#"
name = "steady"
shell = true
command = ['''
i=0
while true; do
  i=$((i+1))
  echo "{\"state\":\"running\",\"metrics\":{\"step\":$i}}" >> "$MUSTER_STATUS_FILE"
  sleep 0.2
done
''']
"#;

const SHORT: &str = r#"
name = "short"
shell = true
command = ["sleep 3; exit 5"]
[restart]
policy = "never"
"#;

#[test]
fn killed_node_agent_comes_back_without_touching_its_children() {
    let mut fleet = Fleet::start(1, FleetOptions::default());
    fleet.submit_toml("steady", STEADY);
    fleet.submit_toml("short", SHORT);
    let steady_pid = fleet.wait_for_attempt_pid("steady", 1, TASK_DEADLINE);
    let short_pid = fleet.wait_for_attempt_pid("short", 1, TASK_DEADLINE);

    fleet.kill_node_agent("node-1", Signal::SIGKILL);
    // The short child ends while no agent runs.
    wait_until("the short child to exit on its own", TASK_DEADLINE, || {
        (!pid_alive(short_pid)).then_some(())
    });
    let before = fleet.read_inbox().last().map_or(0, seq_of);
    fleet.start_node_agent("node-1", 4);

    let exited = fleet.wait_for_event(
        |e| is_event(e, "attempt.exited", "short") && seq_of(e) > before,
        TASK_DEADLINE,
    );
    assert_eq!(
        exited["data"]["exit_code"], 5,
        "the real exit code: {exited}"
    );
    fleet.wait_for_task_state("short", "failed", TASK_DEADLINE);
    fleet.wait_for_event(
        |e| is_event(e, "task.report", "steady") && seq_of(e) > before,
        TASK_DEADLINE,
    );
    assert!(
        pid_alive(steady_pid),
        "the steady child {steady_pid} kept running"
    );
    let steady = fleet.show("steady");
    assert_eq!(steady["state"], "running", "{steady:#}");
    assert_eq!(steady["attempt"], 1, "not restarted: {steady:#}");
    let restarts = fleet.events(|e| is_event(e, "attempt.started", "steady") && attempt_of(e) > 1);
    assert!(
        restarts.is_empty(),
        "steady was started again: {restarts:?}"
    );
    let key = std::fs::read(format!("/proc/{steady_pid}/environ"))
        .ok()
        .and_then(|env| {
            env.split(|&b| b == 0).find_map(|v| {
                v.strip_prefix(b"MUSTER_ATTEMPT_KEY=")
                    .map(|k| String::from_utf8_lossy(k).into_owned())
            })
        })
        .expect("the child carries its attempt key");
    let shells: Vec<i32> = processes_with_env("MUSTER_ATTEMPT_KEY", &key)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sh")
        })
        .collect();
    assert_eq!(shells, [steady_pid], "exactly one copy of steady runs");
}
