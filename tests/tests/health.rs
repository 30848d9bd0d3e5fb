//! The controller's health rules on real children: a NaN metric stops the task, and a silent
//! child is restarted and resumes from the checkpoint in its data dir.

use muster_e2e::{
    attempt_of, is_event, pid_alive, processes_with_env, reason, Fleet, FleetOptions, TASK_DEADLINE,
};

const NAN_TASK: &str = r#"
name = "diverges"
shell = true
command = ['''
echo '{"state":"running","metrics":{"step":1,"loss":0.5}}' >> "$MUSTER_STATUS_FILE"
echo '{"state":"running","metrics":{"step":2,"loss":NaN}}' >> "$MUSTER_STATUS_FILE"
sleep 1000
''']
[health]
heartbeat_timeout = "60s"
nan_metrics = ["loss"]
[stop]
grace = "1s"
"#;

#[test]
fn nan_metric_fails_the_task_and_ends_its_processes() {
    let fleet = Fleet::start(1, FleetOptions::default());

    fleet.submit_toml("diverges", NAN_TASK);
    let pid = fleet.wait_for_attempt_pid("diverges", 1, TASK_DEADLINE);

    let failed = fleet.wait_for_event(|e| is_event(e, "task.failed", "diverges"), TASK_DEADLINE);
    assert_eq!(reason(&failed), "metric_nan", "{failed}");
    let unhealthy = fleet.events(|e| is_event(e, "task.unhealthy", "diverges"));
    assert!(
        unhealthy.iter().any(|e| reason(e) == "metric_nan"),
        "a task.unhealthy metric_nan event: {unhealthy:#?}"
    );
    assert!(
        !pid_alive(pid),
        "the child {pid} is still alive after task.failed"
    );
    let data_dir = fleet.task_dir("node-1", "diverges").join("data");
    let left = processes_with_env("MUSTER_DATA_DIR", data_dir.to_str().expect("UTF-8 path"));
    assert!(left.is_empty(), "processes of the task survived: {left:?}");
    let task = fleet.show("diverges");
    assert_eq!(task["state"], "failed", "{task:#}");
    assert_eq!(
        task["attempts"].as_array().map(Vec::len),
        Some(1),
        "not restarted: {task:#}"
    );
}

/// Counts steps into $MUSTER_DATA_DIR/ckpt and resumes from it; attempt 1 goes silent
/// (alive, no status lines) after step 5.
const HANGS_ONCE: &str = r#"
name = "hangs-once"
shell = true
command = ['''
ckpt="$MUSTER_DATA_DIR/ckpt"
step=$(cat "$ckpt" 2>/dev/null || echo 0)
echo "{\"state\":\"starting\",\"message\":\"resumed\",\"metrics\":{\"step\":$step}}" >> "$MUSTER_STATUS_FILE"
while true; do
  step=$((step + 1))
  echo "$step" > "$ckpt.tmp" && mv "$ckpt.tmp" "$ckpt"
  echo "{\"state\":\"running\",\"metrics\":{\"step\":$step}}" >> "$MUSTER_STATUS_FILE"
  if [ "$MUSTER_ATTEMPT" = 1 ] && [ "$step" -ge 5 ]; then exec sleep 1000; fi
  sleep 0.2
done
''']
[restart]
backoff_initial = "200ms"
[health]
heartbeat_timeout = "2s"
[stop]
grace = "1s"
"#;

#[test]
fn silent_task_is_restarted_and_resumes_from_its_checkpoint() {
    let fleet = Fleet::start(1, FleetOptions::default());

    fleet.submit_toml("hangs-once", HANGS_ONCE);

    let unhealthy = fleet.wait_for_event(
        |e| is_event(e, "task.unhealthy", "hangs-once"),
        TASK_DEADLINE,
    );
    assert_eq!(reason(&unhealthy), "heartbeat_timeout", "{unhealthy}");
    let restarting = fleet.wait_for_event(
        |e| {
            is_event(e, "task.restarting", "hangs-once")
                && e["seq"].as_u64() > unhealthy["seq"].as_u64()
        },
        TASK_DEADLINE,
    );
    assert_eq!(reason(&restarting), "heartbeat_timeout", "{restarting}");
    fleet.wait_for_event(
        |e| is_event(e, "attempt.started", "hangs-once") && attempt_of(e) == 2,
        TASK_DEADLINE,
    );
    let resumed = fleet.wait_for_event(
        |e| is_event(e, "task.report", "hangs-once") && attempt_of(e) == 2,
        TASK_DEADLINE,
    );

    let step = resumed["data"]["metrics"]["step"].as_f64().unwrap_or(-1.0);
    assert!(
        step >= 5.0,
        "attempt 2 started over instead of resuming: {resumed}"
    );
    let attempt_1_exit = fleet.events(|e| is_event(e, "attempt.exited", "hangs-once"));
    assert_eq!(
        attempt_1_exit.len(),
        1,
        "attempt 1 ended once: {attempt_1_exit:#?}"
    );
    assert_eq!(attempt_of(&attempt_1_exit[0]), 1);
    let task = fleet.wait_for_task_state("hangs-once", "running", TASK_DEADLINE);
    assert!(
        task["metrics"]["step"].as_f64().unwrap_or(0.0) >= 5.0,
        "live metrics went back: {task:#}"
    );
}

const ASKS_FOR_HELP: &str = r#"
name = "stuck"
shell = true
command = ['''
echo '{"state":"needs_help","message":"which dataset?"}' >> "$MUSTER_STATUS_FILE"
sleep 1000
''']
[stop]
grace = "1s"
"#;

#[test]
fn needs_help_report_opens_an_incident_that_can_be_acked() {
    let fleet = Fleet::start(1, FleetOptions::default());

    fleet.submit_toml("stuck", ASKS_FOR_HELP);
    let task = fleet.wait_for_task_state("stuck", "needs_help", TASK_DEADLINE);
    let opened = fleet.wait_for_event(
        |e| is_event(e, "incident.opened", "stuck") && reason(e) == "needs_help",
        TASK_DEADLINE,
    );
    let incidents = fleet.muster_json(&["incidents", "--json"]);
    let listed = incidents
        .as_array()
        .and_then(|all| all.iter().find(|i| i["task"] == "stuck").cloned())
        .unwrap_or_else(|| panic!("muster incidents lists no incident for stuck: {incidents:#}"));
    let id = listed["id"].as_u64().expect("an incident id").to_string();

    fleet.muster_ok(&["ack", &id]);

    assert_eq!(task["message"], "which dataset?", "{task:#}");
    assert_eq!(listed["reason"], "needs_help", "{listed:#}");
    assert_eq!(
        opened["data"]["incident"].as_u64().map(|i| i.to_string()),
        Some(id.clone())
    );
    let acked = fleet.wait_for_event(|e| is_event(e, "incident.acked", "stuck"), TASK_DEADLINE);
    assert_eq!(
        acked["data"]["incident"].as_u64().map(|i| i.to_string()),
        Some(id)
    );
}
