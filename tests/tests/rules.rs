//! Health rules and the built-in packs on real children: what an output line or an exit
//! makes Muster do (restart, stop, escalate, wait), and `muster rules check`.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use muster_e2e::process::{binary_dir, run_with_deadline};
use muster_e2e::{
    attempt_of, is_event, pid_alive, poll_until, reason, ts_ms, Fleet, FleetOptions, CLI_DEADLINE,
    TASK_DEADLINE,
};

/// How long a test watches for something that must not happen.
const QUIET: Duration = Duration::from_secs(5);

fn fleet() -> Fleet {
    Fleet::start(1, FleetOptions::default())
}

/// A task running `script` under sh with the given extra TOML (restart, health, ...).
fn task(name: &str, script: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nshell = true\ncommand = ['''\n{script}\n''']\n{extra}\n[stop]\ngrace = \"1s\"\n"
    )
}

/// Waits for the task.unhealthy event that names `rule`.
fn wait_for_rule(fleet: &Fleet, task: &str, rule: &str) -> Value {
    fleet.wait_for_event(
        |e| is_event(e, "task.unhealthy", task) && e["data"]["rule"] == rule,
        TASK_DEADLINE,
    )
}

fn wait_for_incident(fleet: &Fleet, task: &str, why: &str) -> Value {
    fleet.wait_for_event(
        |e| is_event(e, "incident.opened", task) && reason(e) == why,
        TASK_DEADLINE,
    )
}

/// The incident `muster incidents --json` lists for the task and reason.
fn listed_incident(fleet: &Fleet, task: &str, why: &str) -> Value {
    let all = fleet.muster_json(&["incidents", "--json"]);
    all.as_array()
        .and_then(|list| {
            list.iter()
                .find(|i| i["task"] == task && i["reason"] == why)
                .cloned()
        })
        .unwrap_or_else(|| panic!("muster incidents lists no {why} incident of {task}: {all:#}"))
}

fn started_attempts(fleet: &Fleet, task: &str) -> Vec<u64> {
    fleet
        .events(|e| is_event(e, "attempt.started", task))
        .iter()
        .map(attempt_of)
        .collect()
}

/// Watches for `window` that the task starts no attempt after `attempt`.
fn assert_no_attempt_after(fleet: &Fleet, task: &str, attempt: u64, window: Duration) {
    let next = poll_until(window, || {
        fleet
            .events(|e| is_event(e, "attempt.started", task) && attempt_of(e) > attempt)
            .pop()
    });
    assert!(next.is_none(), "{task} started another attempt: {next:?}");
}

#[test]
fn cuda_oom_line_restarts_the_task() {
    let fleet = fleet();
    let spec = task(
        "trainer",
        r#"if [ "$MUSTER_ATTEMPT" = 1 ]; then
  echo 'torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB' >&2
fi
exec sleep 1000"#,
        "[health]\npacks = [\"ml\"]\n",
    );

    fleet.submit_toml("trainer", &spec);
    let unhealthy = wait_for_rule(&fleet, "trainer", "cuda_oom");
    fleet.wait_for_event(
        |e| is_event(e, "attempt.started", "trainer") && attempt_of(e) == 2,
        TASK_DEADLINE,
    );

    assert_eq!(reason(&unhealthy), "log_pattern", "{unhealthy}");
    assert_eq!(unhealthy["data"]["action"], "restart", "{unhealthy}");
    assert_eq!(attempt_of(&unhealthy), 1, "{unhealthy}");
    let restarting = fleet.events(|e| is_event(e, "task.restarting", "trainer"));
    assert!(
        restarting.iter().any(|e| reason(e) == "log_pattern"),
        "a task.restarting log_pattern event: {restarting:#?}"
    );
    fleet.wait_for_task_state("trainer", "running", TASK_DEADLINE);
}

#[test]
fn gpu_xid_line_opens_a_critical_incident_and_leaves_the_task_running() {
    let fleet = fleet();
    let spec = task(
        "xid",
        r#"echo 'NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus.'
echo '{"state":"running","message":"still training"}' >> "$MUSTER_STATUS_FILE"
exec sleep 1000"#,
        "[health]\npacks = [\"ml\"]\n",
    );

    fleet.submit_toml("xid", &spec);
    let pid = fleet.wait_for_attempt_pid("xid", 1, TASK_DEADLINE);
    let unhealthy = wait_for_rule(&fleet, "xid", "gpu_xid");
    let opened = wait_for_incident(&fleet, "xid", "gpu_xid");
    assert_no_attempt_after(&fleet, "xid", 1, QUIET);

    assert_eq!(unhealthy["data"]["action"], "escalate", "{unhealthy}");
    assert_eq!(opened["data"]["severity"], "critical", "{opened}");
    assert_eq!(
        listed_incident(&fleet, "xid", "gpu_xid")["severity"],
        "critical"
    );
    assert!(pid_alive(pid), "the child {pid} was stopped");
    assert_eq!(fleet.show("xid")["state"], "running");
    let exited = fleet.events(|e| is_event(e, "attempt.exited", "xid"));
    assert!(exited.is_empty(), "the task exited: {exited:#?}");
}

#[test]
fn diverging_loss_fails_the_task_with_metric_diverged() {
    let fleet = fleet();
    let spec = task(
        "diverges",
        r#"step=0
for loss in 1.0 0.8 0.6 0.5 0.45; do
  step=$((step + 1))
  echo "{\"state\":\"running\",\"metrics\":{\"step\":$step,\"loss\":$loss}}" >> "$MUSTER_STATUS_FILE"
  sleep 0.3
done
while true; do
  step=$((step + 1))
  echo "{\"state\":\"running\",\"metrics\":{\"step\":$step,\"loss\":60.0}}" >> "$MUSTER_STATUS_FILE"
  sleep 0.3
done"#,
        "[health]\npacks = [\"ml\"]\n",
    );

    fleet.submit_toml("diverges", &spec);
    let pid = fleet.wait_for_attempt_pid("diverges", 1, TASK_DEADLINE);
    let unhealthy = fleet.wait_for_event(
        |e| is_event(e, "task.unhealthy", "diverges") && reason(e) == "metric_diverged",
        TASK_DEADLINE,
    );
    let failed = fleet.wait_for_event(|e| is_event(e, "task.failed", "diverges"), TASK_DEADLINE);

    assert_eq!(unhealthy["data"]["action"], "stop", "{unhealthy}");
    assert_eq!(reason(&failed), "metric_diverged", "{failed}");
    assert_eq!(fleet.show("diverges")["state"], "failed");
    assert!(!pid_alive(pid), "the child {pid} outlived task.failed");
    assert_eq!(started_attempts(&fleet, "diverges"), [1], "not restarted");
}

#[test]
fn rate_limit_line_blocks_and_holds_the_next_attempt_without_a_crash_loop() {
    let fleet = fleet();
    // Attempt 1 is told to wait 8s and fails once the test has seen it blocked; with
    // max_restarts 0 any exit counted as a crash would be a crash loop.
    let spec = task(
        "agent",
        r#"if [ "$MUSTER_ATTEMPT" = 1 ]; then
  echo 'anthropic.RateLimitError: rate limit exceeded, retry after 8s' >&2
  while [ ! -e "$MUSTER_DATA_DIR/go" ]; do sleep 0.1; done
  exit 1
fi
echo '{"state":"running","message":"back at work"}' >> "$MUSTER_STATUS_FILE"
exec sleep 1000"#,
        "[restart]\npolicy = \"on-failure\"\nmax_restarts = 0\nbackoff_initial = \"100ms\"\n\
         [health]\npacks = [\"llm-agent\"]\n",
    );

    fleet.submit_toml("agent", &spec);
    let unhealthy = wait_for_rule(&fleet, "agent", "rate_limited");
    let blocked = fleet.wait_for_task_state("agent", "blocked", TASK_DEADLINE);
    let go = fleet.task_dir("node-1", "agent").join("data").join("go");
    std::fs::write(&go, "").expect("writing the go file");
    let exited = fleet.wait_for_event(
        |e| is_event(e, "attempt.exited", "agent") && attempt_of(e) == 1,
        TASK_DEADLINE,
    );
    let second = fleet.wait_for_event(
        |e| is_event(e, "attempt.started", "agent") && attempt_of(e) == 2,
        TASK_DEADLINE,
    );

    assert_eq!(unhealthy["data"]["action"], "wait", "{unhealthy}");
    assert_eq!(unhealthy["data"]["wait_ms"], 8000, "{unhealthy}");
    assert_eq!(blocked["state"], "blocked");
    let waited = ts_ms(&second) - ts_ms(&unhealthy);
    assert!(
        waited >= 6_000,
        "attempt 2 started {waited} ms after the rate limit line said to wait 8s"
    );
    assert_eq!(exited["data"]["exit_code"], 1, "{exited}");
    let crash_loops = fleet.events(|e| is_event(e, "task.crash_loop", "agent"));
    assert!(
        crash_loops.is_empty(),
        "a wait counted as a crash: {crash_loops:#?}"
    );
    let restarting = fleet.events(|e| is_event(e, "task.restarting", "agent"));
    assert!(
        restarting
            .iter()
            .all(|e| e["data"]["restarts_in_window"] == 0)
            && !restarting.is_empty(),
        "the wait counted toward the crash loop: {restarting:#?}"
    );
    fleet.wait_for_task_state("agent", "running", TASK_DEADLINE);
}

#[test]
fn invalid_api_key_fails_the_task_with_a_critical_incident() {
    let fleet = fleet();
    let spec = task(
        "agent",
        r#"echo 'anthropic.AuthenticationError: invalid api key provided' >&2
exec sleep 1000"#,
        "[health]\npacks = [\"llm-agent\"]\n",
    );

    fleet.submit_toml("agent", &spec);
    let pid = fleet.wait_for_attempt_pid("agent", 1, TASK_DEADLINE);
    let failed = fleet.wait_for_event(|e| is_event(e, "task.failed", "agent"), TASK_DEADLINE);
    let opened = wait_for_incident(&fleet, "agent", "credentials_expired");

    assert_eq!(reason(&failed), "credentials_expired", "{failed}");
    assert_eq!(opened["data"]["severity"], "critical", "{opened}");
    let listed = listed_incident(&fleet, "agent", "credentials_expired");
    assert_eq!(listed["severity"], "critical", "{listed:#}");
    assert_eq!(fleet.show("agent")["state"], "failed");
    assert!(!pid_alive(pid), "the child {pid} outlived task.failed");
    assert_eq!(started_attempts(&fleet, "agent"), [1], "not restarted");
}

#[test]
fn status_file_message_is_matched_like_a_log_line() {
    let fleet = fleet();
    let spec = task(
        "agent",
        r#"echo '{"state":"running","message":"provider said: 401 Unauthorized"}' >> "$MUSTER_STATUS_FILE"
exec sleep 1000"#,
        "[health]\npacks = [\"llm-agent\"]\n",
    );

    fleet.submit_toml("agent", &spec);
    let unhealthy = wait_for_rule(&fleet, "agent", "credentials_expired");
    let failed = fleet.wait_for_event(|e| is_event(e, "task.failed", "agent"), TASK_DEADLINE);

    assert_eq!(unhealthy["data"]["stream"], "status", "{unhealthy}");
    assert_eq!(reason(&failed), "credentials_expired", "{failed}");
}

/// `bad-input` exits 3, which its own rule says is final; `flaky` exits 4, which its rule
/// escalates and its policy restarts; `oom-victim` dies by a SIGKILL nobody sent, which the
/// ml pack restarts even though its policy is never.
const EXIT_RULE_TASKS: &str = r#"
[[task]]
name = "bad-input"
command = ["sh", "-c", "exit 3"]
[task.restart]
policy = "on-failure"
backoff_initial = "100ms"
[[task.health.rules]]
name = "bad_input"
on = "exit"
exit_codes = [3]
action = "stop"

[[task]]
name = "flaky"
shell = true
command = ['''
if [ "$MUSTER_ATTEMPT" = 1 ]; then exit 4; fi
exec sleep 1000
''']
[task.restart]
policy = "on-failure"
backoff_initial = "100ms"
[[task.health.rules]]
name = "flaky_upstream"
on = "exit"
exit_codes = [4]
action = "escalate"
severity = "warning"
[task.stop]
grace = "1s"

[[task]]
name = "oom-victim"
shell = true
command = ['''
if [ "$MUSTER_ATTEMPT" = 1 ]; then kill -9 $$; fi
exec sleep 1000
''']
[task.restart]
policy = "never"
[task.health]
packs = ["ml"]
[task.stop]
grace = "1s"
"#;

#[test]
fn exit_rules_stop_or_restart_whatever_the_policy_says() {
    let fleet = fleet();

    fleet.submit_toml("exit-rules", EXIT_RULE_TASKS);
    let failed = fleet.wait_for_event(|e| is_event(e, "task.failed", "bad-input"), TASK_DEADLINE);
    let opened = wait_for_incident(&fleet, "bad-input", "bad_input");
    fleet.wait_for_event(
        |e| is_event(e, "attempt.started", "oom-victim") && attempt_of(e) == 2,
        TASK_DEADLINE,
    );
    let oom = wait_for_rule(&fleet, "oom-victim", "oom_kill");
    let escalated = wait_for_incident(&fleet, "flaky", "flaky_upstream");
    fleet.wait_for_event(
        |e| is_event(e, "attempt.started", "flaky") && attempt_of(e) == 2,
        TASK_DEADLINE,
    );
    assert_no_attempt_after(&fleet, "bad-input", 1, QUIET);

    assert_eq!(reason(&failed), "bad_input", "{failed}");
    assert_eq!(fleet.show("bad-input")["state"], "failed");
    assert_eq!(opened["data"]["reason"], "bad_input", "{opened}");
    assert_eq!(reason(&oom), "oom_kill", "{oom}");
    assert_eq!(oom["data"]["action"], "restart", "{oom}");
    let killed = fleet.wait_for_event(
        |e| is_event(e, "attempt.exited", "oom-victim") && attempt_of(e) == 1,
        TASK_DEADLINE,
    );
    assert_eq!(killed["data"]["signal"], 9, "{killed}");
    assert_eq!(escalated["data"]["severity"], "warning", "{escalated}");
}

#[test]
fn silent_blocked_agent_is_escalated_not_restarted() {
    let fleet = fleet();
    let spec = task(
        "waiting",
        r#"echo '{"state":"blocked","message":"waiting for review"}' >> "$MUSTER_STATUS_FILE"
exec sleep 1000"#,
        "[health]\npacks = [\"llm-agent\"]\nheartbeat_timeout = \"2s\"\n",
    );

    fleet.submit_toml("waiting", &spec);
    let pid = fleet.wait_for_attempt_pid("waiting", 1, TASK_DEADLINE);
    fleet.wait_for_task_state("waiting", "blocked", TASK_DEADLINE);
    let unhealthy = fleet.wait_for_event(
        |e| is_event(e, "task.unhealthy", "waiting") && reason(e) == "heartbeat_timeout",
        TASK_DEADLINE,
    );
    wait_for_incident(&fleet, "waiting", "heartbeat_timeout");
    assert_no_attempt_after(&fleet, "waiting", 1, QUIET);

    assert_eq!(unhealthy["data"]["action"], "escalate", "{unhealthy}");
    assert!(pid_alive(pid), "the child {pid} was stopped");
    assert_eq!(fleet.show("waiting")["state"], "blocked");
}

/// `muster rules check` on a spec file written to a temp dir.
fn rules_check(spec: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let path = dir.path().join("task.toml");
    std::fs::write(&path, spec).expect("writing the spec");
    rules_check_file(&path, args)
}

fn rules_check_file(path: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(binary_dir().join("muster"));
    command
        .env_remove("MUSTER_CONTROLLER")
        .args(["rules", "check"])
        .arg(path)
        .args(args);
    run_with_deadline(&mut command, CLI_DEADLINE)
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "muster rules check failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

const PACKED_TASK: &str = r#"
name = "trainer"
command = ["python3", "train.py"]
[health]
packs = ["ml", "llm-agent"]
[[health.rules]]
name = "bad_input"
on = "exit"
exit_codes = [3]
action = "stop"
"#;

#[test]
fn rules_check_lists_the_rules_and_names_the_one_a_line_or_exit_triggers() {
    let listed = stdout_of(&rules_check(PACKED_TASK, &[]));
    let oom_line = stdout_of(&rules_check(
        PACKED_TASK,
        &[
            "--line",
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        ],
    ));
    let harmless = stdout_of(&rules_check(PACKED_TASK, &["--line", "epoch 3 done"]));
    let exit_3 = stdout_of(&rules_check(PACKED_TASK, &["--exit-code", "3"]));
    let killed = stdout_of(&rules_check(PACKED_TASK, &["--signal", "9"]));

    for rule in [
        "bad_input",
        "cuda_oom",
        "nccl_timeout",
        "gpu_xid",
        "preempted",
        "oom_kill",
        "rate_limited",
        "credentials_expired",
    ] {
        assert!(listed.contains(rule), "{rule} is not listed:\n{listed}");
    }
    assert!(oom_line.contains("matches cuda_oom"), "{oom_line}");
    assert!(harmless.contains("matches no rule"), "{harmless}");
    assert!(exit_3.contains("matches bad_input"), "{exit_3}");
    assert!(killed.contains("matches oom_kill"), "{killed}");
}

#[test]
fn rules_check_rejects_a_bad_rule_naming_the_field() {
    let rule = |body: &str| {
        format!("name = \"t\"\ncommand = [\"true\"]\n[[health.rules]]\nname = \"r\"\n{body}\n")
    };
    let cases = [
        (
            rule("on = \"output\"\npattern = \"CUDA (out of memory\"\naction = \"restart\""),
            "health.rules[0].pattern",
        ),
        (
            rule("on = \"output\"\npattern = \"boom\"\naction = \"reboot\""),
            "health.rules[0].action",
        ),
        (
            rule("on = \"stdout\"\npattern = \"boom\"\naction = \"restart\""),
            "health.rules[0].on",
        ),
        (
            "name = \"t\"\ncommand = [\"true\"]\n[health]\npacks = [\"tensorflow\"]\n".to_string(),
            "health.packs[0]",
        ),
    ];

    for (spec, field) in cases {
        let output = rules_check(&spec, &[]);

        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{spec}\nstderr: {stderr}");
        assert!(
            stderr.contains(field),
            "the error does not name {field}: {stderr}"
        );
    }
}
