//! The node agent's restart policy as a user sees it: backoff between attempts, and a crash
//! loop that gives up and opens an incident.

use std::time::Duration;

use muster_e2e::{attempt_of, is_event, poll_until, reason, Fleet, FleetOptions, TASK_DEADLINE};

fn crashing_task(
    name: &str,
    backoff_initial: &str,
    backoff_max: &str,
    max_restarts: u32,
) -> String {
    format!(
        r#"
name = "{name}"
command = ["sh", "-c", "exit 3"]
[restart]
policy = "on-failure"
backoff_initial = "{backoff_initial}"
backoff_max = "{backoff_max}"
max_restarts = {max_restarts}
window = "10m"
[stop]
grace = "1s"
"#
    )
}

#[test]
fn crashing_task_is_restarted_after_its_backoff() {
    let fleet = Fleet::start(1, FleetOptions::default());

    fleet.submit_toml("crasher", &crashing_task("crasher", "300ms", "2s", 10));

    let started_again = fleet.wait_for_event(
        |e| is_event(e, "attempt.started", "crasher") && attempt_of(e) == 2,
        TASK_DEADLINE,
    );
    let inbox = fleet.read_inbox();
    let exited = inbox
        .iter()
        .find(|e| is_event(e, "attempt.exited", "crasher") && attempt_of(e) == 1)
        .expect("attempt 1 exited before attempt 2 started");
    assert_eq!(exited["data"]["exit_code"], 3, "{exited}");
    assert_eq!(reason(exited), "exit_code", "{exited}");
    let restarting = inbox
        .iter()
        .find(|e| is_event(e, "task.restarting", "crasher"))
        .expect("a task.restarting event before attempt 2");
    let backoff_ms = restarting["data"]["backoff_ms"].as_u64().unwrap_or(0);
    // 300ms with at most 20% jitter.
    assert!(
        (240..=360).contains(&backoff_ms),
        "backoff_ms {backoff_ms} is not 300ms +-20%: {restarting}"
    );
    assert!(
        restarting["seq"].as_u64() < started_again["seq"].as_u64(),
        "task.restarting comes before the next attempt.started"
    );

    let task = fleet.show("crasher");
    let attempts = task["attempts"].as_array().expect("show lists attempts");
    let first_end = attempts[0]["ended_ms"]
        .as_i64()
        .expect("attempt 1 ended_ms");
    let second_start = attempts[1]["started_ms"]
        .as_i64()
        .expect("attempt 2 started_ms");
    assert!(
        second_start - first_end >= 240,
        "attempt 2 started {}ms after attempt 1 ended; the backoff is 300ms: {task:#}",
        second_start - first_end
    );
}

#[test]
fn crash_loop_gives_up_after_max_restarts() {
    let fleet = Fleet::start(1, FleetOptions::default());

    fleet.submit_toml("looper", &crashing_task("looper", "50ms", "100ms", 2));

    let task = fleet.wait_for_task_state("looper", "crash_loop", TASK_DEADLINE);
    fleet.wait_for_event(|e| is_event(e, "task.crash_loop", "looper"), TASK_DEADLINE);
    let incident = fleet.wait_for_event(
        |e| is_event(e, "incident.opened", "looper") && reason(e) == "crash_loop",
        TASK_DEADLINE,
    );
    assert_eq!(incident["data"]["reason"], "crash_loop");
    assert_eq!(
        task["attempts"].as_array().map(Vec::len),
        Some(3),
        "{task:#}"
    );

    // Nothing starts it again: look for a fourth attempt for a while.
    let later_start = poll_until(Duration::from_secs(3), || {
        fleet
            .events(|e| is_event(e, "attempt.started", "looper"))
            .into_iter()
            .find(|e| attempt_of(e) > 3)
    });
    assert!(
        later_start.is_none(),
        "started again after crash_loop: {later_start:?}"
    );
    let starts = fleet.events(|e| is_event(e, "attempt.started", "looper"));
    assert_eq!(starts.len(), 3, "exactly 3 attempts: {starts:#?}");
    assert_eq!(fleet.show("looper")["state"], "crash_loop");
}
