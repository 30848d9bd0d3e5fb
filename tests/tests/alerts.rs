//! Escalation on the real binaries: incidents go to fake Slack and PagerDuty endpoints that
//! check every request like the real services, grouped, rate-limited, retried, kept in the
//! durable outbox across a controller kill, and acknowledged or resolved by operators.

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use muster_e2e::process::{binary_dir, run_with_deadline, signal_pid};
use muster_e2e::receiver::{controller_config, describe, Answer, Receiver, Request, ROUTING_KEY};
use muster_e2e::{
    attempt_of, is_event, pid_alive, poll_until, reason, seq_of, ts_ms, Fleet, FleetOptions,
};
use muster_e2e::{CLI_DEADLINE, TASK_DEADLINE};

/// For a notification to reach a receiver (grouping window, pacing and retries included).
const ALERT_DEADLINE: Duration = Duration::from_secs(60);
/// How long a test watches for something that must not happen.
const QUIET: Duration = Duration::from_secs(4);
/// Alert timings of every test: a one-second grouping window and no reminders.
const ALERTS: &str = "group_window = \"1s\"\nremind_every = \"0s\"\n";

fn alerting_fleet(nodes: u32, slots: u32, sections: &[String]) -> Fleet {
    alerting_fleet_with(ALERTS, nodes, slots, sections)
}

/// A fleet whose `[alerts]` table holds `alerts` (group_window, remind_every).
fn alerting_fleet_with(alerts: &str, nodes: u32, slots: u32, sections: &[String]) -> Fleet {
    Fleet::start(
        nodes,
        FleetOptions {
            slots,
            controller_config: controller_config(alerts, sections),
        },
    )
}

/// A task that fails at once and is a crash loop at its first exit.
fn crash_loop_task(name: &str) -> String {
    format!(
        r#"
name = "{name}"
command = ["sh", "-c", "echo 'KeyError: lr' >&2; exit 1"]
[restart]
policy = "on-failure"
max_restarts = 0
backoff_initial = "100ms"
[stop]
grace = "1s"
"#
    )
}

/// The incident.opened event of the task's incident for `reason`.
fn wait_for_incident(fleet: &Fleet, task: &str, why: &str) -> Value {
    fleet.wait_for_event(
        |e| is_event(e, "incident.opened", task) && reason(e) == why,
        TASK_DEADLINE,
    )
}

fn incident_id(opened: &Value) -> String {
    opened["data"]["incident"]
        .as_u64()
        .unwrap_or_else(|| panic!("incident.opened without an incident id: {opened}"))
        .to_string()
}

/// alert.sent and alert.failed events for one destination, in inbox order.
fn alert_events(fleet: &Fleet, destination: &str) -> Vec<Value> {
    fleet.events(|e| {
        (e["kind"] == "alert.sent" || e["kind"] == "alert.failed")
            && e["data"]["destination"] == destination
    })
}

fn is_trigger_for(r: &Request, task: &str) -> bool {
    r.event_action() == "trigger" && r.incident_tasks().iter().any(|t| t == task)
}

fn count(requests: &[Request], matches: impl Fn(&Request) -> bool) -> usize {
    requests.iter().filter(|r| matches(r)).count()
}

#[test]
fn crash_loop_pages_once_and_resolve_closes_that_page() {
    let pd = Receiver::pagerduty();
    let slack = Receiver::slack_webhook();
    let fleet = alerting_fleet(1, 4, &[pd.config_section(""), slack.config_section("")]);

    fleet.submit_toml("crasher", &crash_loop_task("crasher"));
    let opened = wait_for_incident(&fleet, "crasher", "crash_loop");
    let id = incident_id(&opened);
    let trigger = pd.wait_for_delivered("a trigger", ALERT_DEADLINE, |r| {
        r.event_action() == "trigger"
    });
    let message = slack.wait_for_delivered("a message", ALERT_DEADLINE, |_| true);
    fleet.muster_ok(&["resolve", &id]);
    let resolve = pd.wait_for_delivered("a resolve", ALERT_DEADLINE, |r| {
        r.event_action() == "resolve"
    });
    slack.wait_for_delivered("a resolved message", ALERT_DEADLINE, |r| {
        r.text().contains("resolved")
    });

    pd.assert_holds_for("one trigger and one resolve", QUIET, |all| {
        all.len() == 2 && all.iter().all(Request::delivered)
    });
    pd.assert_all_valid();
    slack.assert_all_valid();
    assert_eq!(trigger.dedup_key(), resolve.dedup_key());
    let payload = &trigger.body["payload"];
    let details = &payload["custom_details"];
    assert_eq!(details["task"], "crasher", "{:#}", trigger.body);
    assert_eq!(details["node"], "node-1", "{:#}", trigger.body);
    assert_eq!(details["reason"], "crash_loop", "{:#}", trigger.body);
    assert_eq!(payload["severity"], "error", "{:#}", trigger.body);
    let summary = payload["summary"].as_str().unwrap_or("");
    assert!(summary.contains("crasher"), "{summary}");
    let commands = details["commands"].to_string();
    assert!(
        commands.contains(&format!("muster resolve {id}")),
        "{commands}"
    );
    assert!(
        details["last_log_lines"]
            .to_string()
            .contains("KeyError: lr"),
        "{:#}",
        trigger.body
    );
    let text = message.text();
    for wanted in [
        "crasher",
        "node-1",
        "crash_loop",
        &format!("muster ack {id}"),
        &format!("muster resolve {id}"),
        "muster restart crasher",
    ] {
        assert!(
            text.contains(wanted),
            "the message lacks {wanted:?}: {text}"
        );
    }
    let sent = alert_events(&fleet, "pagerduty");
    let actions: Vec<(&Value, &Value)> = sent
        .iter()
        .map(|e| (&e["kind"], &e["data"]["action"]))
        .collect();
    assert_eq!(
        actions,
        [
            (&Value::from("alert.sent"), &Value::from("trigger")),
            (&Value::from("alert.sent"), &Value::from("resolve")),
        ],
        "{sent:#?}"
    );
    assert_eq!(sent[0]["data"]["dedup_key"], trigger.dedup_key());
    assert_eq!(sent[0]["data"]["status"], 202);
    assert_eq!(
        sent[0]["data"]["incidents"],
        serde_json::json!([opened["data"]["incident"]])
    );
    let all = fleet.muster_json(&["incidents", "--all", "--json"]);
    let listed = all.as_array().and_then(|list| list.first());
    assert_eq!(
        listed.map(|i| &i["state"]),
        Some(&Value::from("resolved")),
        "{all:#}"
    );
}

#[test]
fn incidents_opened_apart_get_their_own_dedup_keys() {
    let pd = Receiver::pagerduty();
    let fleet = alerting_fleet(1, 4, &[pd.config_section("")]);

    fleet.submit_toml("first", &crash_loop_task("first"));
    let first = pd.wait_for_delivered("a trigger for first", ALERT_DEADLINE, |r| {
        is_trigger_for(r, "first")
    });
    fleet.submit_toml("second", &crash_loop_task("second"));
    let second = pd.wait_for_delivered("a trigger for second", ALERT_DEADLINE, |r| {
        is_trigger_for(r, "second")
    });

    assert_ne!(first.dedup_key(), second.dedup_key());
    assert_eq!(first.incident_tasks(), ["first"]);
    assert_eq!(second.incident_tasks(), ["second"]);
    pd.assert_all_valid();
}

const BURST: usize = 30;

/// BURST tasks that all crash-loop at their first exit.
fn burst_spec() -> String {
    (0..BURST)
        .map(|i| {
            format!(
                r#"
[[task]]
name = "burst-{i:02}"
command = ["sh", "-c", "exit 1"]
[task.restart]
max_restarts = 0
backoff_initial = "100ms"
"#
            )
        })
        .collect()
}

/// How much later than its neighbour a request may cross a loaded machine's loopback.
const JITTER: Duration = Duration::from_millis(250);

/// Panics if the requests came faster than one every `interval`, pair by pair and over the
/// whole run, allowing each measurement one JITTER of scheduling delay.
fn assert_paced(what: &str, requests: &[Request], interval: Duration) {
    for pair in requests.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap + JITTER >= interval,
            "{what}: two requests {gap:?} apart, the limit allows one every {interval:?}:\n{}",
            describe(requests)
        );
    }
    if let (Some(first), Some(last)) = (requests.first(), requests.last()) {
        let span = last.at.duration_since(first.at);
        let least = interval * (requests.len() as u32 - 1);
        assert!(
            span + JITTER >= least,
            "{what}: {} requests within {span:?}:\n{}",
            requests.len(),
            describe(requests)
        );
    }
}

#[test]
fn burst_of_crash_loops_is_grouped_and_paced() {
    let pd = Receiver::pagerduty();
    let slack = Receiver::slack_webhook();
    let fleet = alerting_fleet(2, 16, &[pd.config_section(""), slack.config_section("")]);

    fleet.submit_toml("burst", &burst_spec());
    let opened = poll_until(TASK_DEADLINE, || {
        let all = fleet.events(|e| e["kind"] == "incident.opened" && reason(e) == "crash_loop");
        (all.len() == BURST).then_some(all)
    })
    .unwrap_or_else(|| panic!("not all {BURST} tasks opened a crash_loop incident"));
    let ids: BTreeSet<u64> = opened
        .iter()
        .filter_map(|e| e["data"]["incident"].as_u64())
        .collect();
    let triggers = pd.wait_for("triggers naming every task", ALERT_DEADLINE, |all| {
        let triggers: Vec<Request> = all
            .iter()
            .filter(|r| r.delivered() && r.event_action() == "trigger")
            .cloned()
            .collect();
        let tasks: BTreeSet<String> = triggers.iter().flat_map(Request::incident_tasks).collect();
        (tasks.len() == BURST).then_some(triggers)
    });
    let slack_sent = poll_until(ALERT_DEADLINE, || {
        let sent: Vec<Value> = alert_events(&fleet, "slack")
            .into_iter()
            .filter(|e| e["kind"] == "alert.sent" && e["data"]["action"] == "trigger")
            .collect();
        let covered: BTreeSet<u64> = sent
            .iter()
            .flat_map(|e| {
                e["data"]["incidents"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|i| i.as_u64())
            .collect();
        (covered == ids).then_some(sent)
    })
    .unwrap_or_else(|| {
        panic!(
            "Slack did not get every incident: {:#?}",
            alert_events(&fleet, "slack")
        )
    });
    for i in 0..BURST {
        fleet.muster_ok(&["stop", &format!("burst-{i:02}")]);
    }
    pd.wait_for("a resolve per trigger", ALERT_DEADLINE, |all| {
        (count(all, |r| r.delivered() && r.event_action() == "resolve") == triggers.len())
            .then_some(())
    });
    slack.wait_for("a resolved message per message", ALERT_DEADLINE, |all| {
        (count(all, |r| r.delivered() && r.text().contains("[resolved]")) == slack_sent.len())
            .then_some(())
    });

    assert!(
        triggers.len() <= 10,
        "{BURST} incidents within a few seconds became {} PagerDuty triggers",
        triggers.len()
    );
    assert!(
        slack_sent.len() <= 10,
        "{BURST} incidents became {} Slack messages",
        slack_sent.len()
    );
    let keys: BTreeSet<&str> = triggers.iter().map(Request::dedup_key).collect();
    assert_eq!(keys.len(), triggers.len(), "one dedup key per group");
    assert!(
        pd.requests().iter().all(Request::delivered),
        "every PagerDuty event was accepted"
    );
    assert!(
        slack.requests().iter().all(Request::delivered),
        "every Slack message was accepted"
    );
    assert_paced(
        "PagerDuty, 120 a minute",
        &pd.requests(),
        Duration::from_millis(500),
    );
    assert_paced(
        "Slack, 1 a second",
        &slack.requests(),
        Duration::from_secs(1),
    );
}

#[test]
fn throttled_page_is_retried_after_retry_after_and_delivered_once() {
    let pd = Receiver::pagerduty();
    pd.answer_next(2, Answer::Throttle { retry_after_s: 1 });
    let fleet = alerting_fleet(1, 4, &[pd.config_section("")]);

    fleet.submit_toml("crasher", &crash_loop_task("crasher"));
    pd.wait_for_delivered("a trigger after two 429s", ALERT_DEADLINE, |r| {
        r.event_action() == "trigger"
    });
    fleet.wait_for_event(
        |e| e["kind"] == "alert.sent" && e["data"]["destination"] == "pagerduty",
        TASK_DEADLINE,
    );

    pd.assert_holds_for("three attempts, then nothing", QUIET, |all| all.len() == 3);
    let requests = pd.requests();
    let statuses: Vec<Option<u16>> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [Some(429), Some(429), Some(202)]);
    assert!(
        requests
            .iter()
            .all(|r| r.dedup_key() == requests[0].dedup_key()),
        "every attempt is the same event"
    );
    for pair in requests.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap + JITTER >= Duration::from_secs(1),
            "a retry came {gap:?} after a 429 with Retry-After: 1"
        );
    }
    let attempts: Vec<(String, u64, Value, u64)> = alert_events(&fleet, "pagerduty")
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or("").to_string(),
                e["data"]["attempt"].as_u64().unwrap_or(0),
                e["data"]["will_retry"].clone(),
                e["data"]["status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        [
            ("alert.failed".to_string(), 1, Value::Bool(true), 429),
            ("alert.failed".to_string(), 2, Value::Bool(true), 429),
            ("alert.sent".to_string(), 3, Value::Null, 202),
        ]
    );
}

#[test]
fn hanging_slack_delays_neither_pagerduty_nor_node_loss() {
    let slack = Receiver::slack_webhook();
    slack.answer_always(Answer::Hang);
    let pd = Receiver::pagerduty();
    let mut fleet = alerting_fleet(
        2,
        4,
        &[
            slack.config_section("timeout = \"60s\""),
            pd.config_section(""),
        ],
    );

    fleet.submit_toml("crasher", &crash_loop_task("crasher"));
    let hung = slack.wait_for("the message it holds", ALERT_DEADLINE, |all| {
        all.first().cloned()
    });
    pd.wait_for_delivered("the crash_loop trigger", ALERT_DEADLINE, |r| {
        is_trigger_for(r, "crasher")
    });
    let slack_while_paged = slack.requests();
    fleet.kill_node_agent("node-2", Signal::SIGKILL);
    fleet.wait_for_event(
        |e| e["kind"] == "node.lost" && e["node"] == "node-2",
        TASK_DEADLINE,
    );
    pd.wait_for_delivered("the node_lost trigger", ALERT_DEADLINE, |r| {
        r.event_action() == "trigger"
            && r.body["payload"]["custom_details"]["reason"] == "node_lost"
    });

    assert!(
        hung.at.elapsed() < Duration::from_secs(60),
        "the test took longer than Slack's 60s timeout, so it proves nothing"
    );
    assert_eq!(slack_while_paged.len(), 1, "one Slack request, held");
    assert_eq!(slack_while_paged[0].status, None);
    let slack_now = slack.requests();
    assert_eq!(
        slack_now.len(),
        1,
        "Slack's queue waits on its first request"
    );
    assert_eq!(slack_now[0].status, None);
    assert!(
        alert_events(&fleet, "slack").is_empty(),
        "no Slack outcome while its request hangs: {:#?}",
        alert_events(&fleet, "slack")
    );
    pd.assert_all_valid();
}

#[test]
fn controller_kill_loses_no_pending_page_and_repeats_no_delivered_one() {
    let pd = Receiver::pagerduty();
    let mut fleet = alerting_fleet(1, 4, &[pd.config_section("")]);
    fleet.submit_toml("before", &crash_loop_task("before"));
    let delivered = pd.wait_for_delivered("the trigger for before", ALERT_DEADLINE, |r| {
        is_trigger_for(r, "before")
    });
    fleet.wait_for_event(|e| e["kind"] == "alert.sent", TASK_DEADLINE);
    // A CLI call is handled after the commit that recorded the delivery.
    fleet.muster_ok(&["incidents"]);

    pd.answer_always(Answer::ServerError);
    fleet.submit_toml("during", &crash_loop_task("during"));
    let failed = fleet.wait_for_event(
        |e| e["kind"] == "alert.failed" && e["data"]["attempt"] == 2,
        ALERT_DEADLINE,
    );
    let retried = pd.requests();
    let pending_key = failed["data"]["dedup_key"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let last_before_kill = fleet.read_inbox().last().map_or(0, seq_of);
    fleet.kill_controller(Signal::SIGKILL);
    pd.answer_always(Answer::Normal);
    fleet.start_controller();

    let resent = pd.wait_for_delivered("the pending trigger", ALERT_DEADLINE, |r| {
        is_trigger_for(r, "during")
    });
    fleet.wait_for_event(
        |e| seq_of(e) > last_before_kill && e["kind"] == "alert.sent",
        TASK_DEADLINE,
    );
    pd.assert_holds_for("each trigger delivered once", QUIET, |all| {
        count(all, |r| {
            r.delivered() && r.dedup_key() == resent.dedup_key()
        }) == 1
            && count(all, |r| r.dedup_key() == delivered.dedup_key()) == 1
    });
    assert_eq!(failed["data"]["will_retry"], true, "{failed}");
    assert_eq!(failed["data"]["status"], 500, "{failed}");
    let gap = retried[2].at.duration_since(retried[1].at);
    assert!(
        gap + JITTER >= Duration::from_secs(1),
        "retried a 500 after {gap:?}, not 1s"
    );
    assert_eq!(resent.dedup_key(), pending_key);
    assert_ne!(resent.dedup_key(), delivered.dedup_key());
    pd.assert_all_valid();
}

/// Attempt 1 asks for help at length (2800 characters, past PagerDuty's summary limit),
/// then fails once the test creates $MUSTER_DATA_DIR/go; later attempts run quietly.
const ASKS_THEN_FAILS: &str = r#"
name = "helpless"
shell = true
command = ['''
if [ "$MUSTER_ATTEMPT" = 1 ]; then
  question=$(for i in $(seq 1 200); do printf '¿qué dataset? '; done)
  echo "{\"state\":\"needs_help\",\"message\":\"$question\"}" >> "$MUSTER_STATUS_FILE"
  while [ ! -e "$MUSTER_DATA_DIR/go" ]; do sleep 0.1; done
  exit 1
fi
echo '{"state":"running","message":"resumed"}' >> "$MUSTER_STATUS_FILE"
exec sleep 1000
''']
[restart]
policy = "always"
backoff_initial = "200ms"
[stop]
grace = "1s"
"#;

#[test]
fn acked_incident_holds_restarts_until_the_ack_is_undone() {
    let pd = Receiver::pagerduty();
    let slack = Receiver::slack_webhook();
    let fleet = alerting_fleet(1, 4, &[pd.config_section(""), slack.config_section("")]);
    fleet.submit_toml("helpless", ASKS_THEN_FAILS);
    let id = incident_id(&wait_for_incident(&fleet, "helpless", "needs_help"));
    let trigger = pd.wait_for_delivered("the needs_help trigger", ALERT_DEADLINE, |r| {
        is_trigger_for(r, "helpless")
    });

    fleet.muster_ok(&["ack", &id]);
    let ack = pd.wait_for_delivered("an acknowledge", ALERT_DEADLINE, |r| {
        r.event_action() == "acknowledge"
    });
    let go = fleet.task_dir("node-1", "helpless").join("data").join("go");
    std::fs::write(&go, "").expect("writing the go file");
    fleet.wait_for_event(
        |e| is_event(e, "attempt.exited", "helpless") && attempt_of(e) == 1,
        TASK_DEADLINE,
    );
    let restarted_while_held = poll_until(QUIET * 2, || {
        fleet
            .events(|e| is_event(e, "attempt.started", "helpless") && attempt_of(e) == 2)
            .pop()
    });
    let held = fleet.show("helpless");
    fleet.muster_ok(&["ack", &id, "--undo"]);
    fleet.wait_for_event(
        |e| is_event(e, "attempt.started", "helpless") && attempt_of(e) == 2,
        TASK_DEADLINE,
    );

    assert_eq!(ack.dedup_key(), trigger.dedup_key());
    assert!(
        restarted_while_held.is_none(),
        "restarted while its incident was acked: {restarted_while_held:?}"
    );
    assert_eq!(held["state"], "backoff", "{held:#}");
    pd.assert_all_valid();
    slack.wait_for_delivered("the needs_help message", ALERT_DEADLINE, |r| {
        r.text().contains("helpless")
    });
    slack.assert_all_valid();
}

/// Attempt 1 asks for help and fails; attempt 2 runs and says so.
const ASKS_THEN_RECOVERS: &str = r#"
name = "recovers"
shell = true
command = ['''
if [ "$MUSTER_ATTEMPT" = 1 ]; then
  echo '{"state":"needs_help","message":"which dataset?"}' >> "$MUSTER_STATUS_FILE"
  while [ ! -e "$MUSTER_DATA_DIR/go" ]; do sleep 0.1; done
  exit 1
fi
while true; do
  echo '{"state":"running","message":"found it"}' >> "$MUSTER_STATUS_FILE"
  sleep 0.5
done
''']
[restart]
policy = "always"
backoff_initial = "200ms"
[stop]
grace = "1s"
"#;

#[test]
fn needs_help_incident_resolves_when_the_next_attempt_runs() {
    let pd = Receiver::pagerduty();
    let fleet = alerting_fleet(1, 4, &[pd.config_section("")]);
    fleet.submit_toml("recovers", ASKS_THEN_RECOVERS);
    let id = incident_id(&wait_for_incident(&fleet, "recovers", "needs_help"));
    let trigger = pd.wait_for_delivered("the needs_help trigger", ALERT_DEADLINE, |r| {
        is_trigger_for(r, "recovers")
    });

    let go = fleet.task_dir("node-1", "recovers").join("data").join("go");
    std::fs::write(&go, "").expect("writing the go file");
    fleet.wait_for_event(
        |e| is_event(e, "task.report", "recovers") && attempt_of(e) == 2,
        TASK_DEADLINE,
    );

    let resolved = poll_until(Duration::from_secs(30), || {
        fleet
            .events(|e| {
                is_event(e, "incident.resolved", "recovers")
                    && e["data"]["incident"].as_u64().map(|i| i.to_string()) == Some(id.clone())
            })
            .pop()
    });
    assert!(
        resolved.is_some(),
        "needs_help incident {id} stays open after attempt 2 reports running; incidents: {:#}",
        fleet.muster_json(&["incidents", "--json"])
    );
    pd.wait_for_delivered("a resolve", ALERT_DEADLINE, |r| {
        r.event_action() == "resolve" && r.dedup_key() == trigger.dedup_key()
    });
}

#[test]
fn slack_bot_posts_to_the_task_channel_and_threads_the_resolve() {
    let slack = Receiver::slack_bot();
    let fleet = alerting_fleet(1, 4, &[slack.config_section("")]);
    let in_channel = format!(
        "{}[escalation]\nslack_channel = \"#ml-runs\"\n",
        crash_loop_task("to-channel")
    );
    let in_dm = format!(
        "{}[escalation]\nslack_user = \"U123ABC\"\n",
        crash_loop_task("to-dm")
    );

    fleet.submit_toml("to-channel", &in_channel);
    fleet.submit_toml("to-dm", &in_dm);
    let id = incident_id(&wait_for_incident(&fleet, "to-channel", "crash_loop"));
    let post = slack.wait_for_delivered("a post to #ml-runs", ALERT_DEADLINE, |r| {
        r.slack_method() == "chat.postMessage" && r.body["channel"] == "#ml-runs"
    });
    let dm = slack.wait_for_delivered("a direct message", ALERT_DEADLINE, |r| {
        r.slack_method() == "chat.postMessage" && r.body["channel"] == "U123ABC"
    });
    fleet.muster_ok(&["resolve", &id]);
    let update = slack.wait_for_delivered("a chat.update", ALERT_DEADLINE, |r| {
        r.slack_method() == "chat.update"
    });
    let reply = slack.wait_for_delivered("a thread reply", ALERT_DEADLINE, |r| {
        r.slack_method() == "chat.postMessage" && r.body.get("thread_ts").is_some()
    });

    slack.assert_all_valid();
    assert!(post.text().contains("to-channel"), "{}", post.text());
    assert!(!post.text().contains("to-dm"), "{}", post.text());
    assert!(dm.text().contains("to-dm"), "{}", dm.text());
    assert_eq!(update.body["channel"], "CMLRUNS", "{:#}", update.body);
    assert!(update.text().contains("resolved"), "{}", update.text());
    assert_eq!(reply.body["channel"], "CMLRUNS", "{:#}", reply.body);
    assert_eq!(reply.body["thread_ts"], update.body["ts"]);
    assert_eq!(
        post.headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {}", muster_e2e::receiver::BOT_TOKEN).as_str())
    );
}

#[test]
fn task_that_opts_out_of_pagerduty_is_only_posted_to_slack() {
    let pd = Receiver::pagerduty();
    let slack = Receiver::slack_webhook();
    let fleet = alerting_fleet(1, 4, &[pd.config_section(""), slack.config_section("")]);
    let quiet = format!(
        "{}[escalation]\npagerduty = false\n",
        crash_loop_task("no-pager")
    );

    fleet.submit_toml("no-pager", &quiet);
    fleet.submit_toml("pager", &crash_loop_task("pager"));
    wait_for_incident(&fleet, "no-pager", "crash_loop");
    slack.wait_for_delivered("a message naming no-pager", ALERT_DEADLINE, |r| {
        r.text().contains("no-pager")
    });
    pd.wait_for_delivered("the trigger for pager", ALERT_DEADLINE, |r| {
        is_trigger_for(r, "pager")
    });

    pd.assert_holds_for("no event about no-pager", QUIET, |all| {
        !all.iter().any(|r| {
            r.incident_tasks().iter().any(|t| t == "no-pager")
                || r.body["payload"]["summary"]
                    .as_str()
                    .is_some_and(|s| s.contains("no-pager"))
        })
    });
    pd.assert_all_valid();
    slack.assert_all_valid();
}

#[test]
fn incident_resolved_within_the_window_is_never_sent() {
    let pd = Receiver::pagerduty();
    let slack = Receiver::slack_webhook();
    let window = Duration::from_secs(8);
    let fleet = alerting_fleet_with(
        "group_window = \"8s\"\nremind_every = \"0s\"\n",
        1,
        4,
        &[pd.config_section(""), slack.config_section("")],
    );

    fleet.submit_toml("crasher", &crash_loop_task("crasher"));
    let opened = wait_for_incident(&fleet, "crasher", "crash_loop");
    fleet.muster_ok(&["resolve", &incident_id(&opened)]);
    let resolved = fleet.wait_for_event(
        |e| is_event(e, "incident.resolved", "crasher"),
        TASK_DEADLINE,
    );

    let open_for = ts_ms(&resolved) - ts_ms(&opened);
    assert!(
        open_for < window.as_millis() as i64,
        "the machine took {open_for}ms to resolve, longer than the window: inconclusive"
    );
    pd.assert_holds_for("nothing", window + QUIET, |all| all.is_empty());
    assert!(
        slack.requests().is_empty(),
        "{}",
        describe(&slack.requests())
    );
    let outcomes = fleet.events(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("alert.")));
    assert!(outcomes.is_empty(), "{outcomes:#?}");
}

#[test]
fn reminders_repeat_the_trigger_until_acked() {
    let pd = Receiver::pagerduty();
    let fleet = alerting_fleet_with(
        "group_window = \"1s\"\nremind_every = \"3s\"\n",
        1,
        4,
        &[pd.config_section("")],
    );

    fleet.submit_toml("crasher", &crash_loop_task("crasher"));
    let id = incident_id(&wait_for_incident(&fleet, "crasher", "crash_loop"));
    let first = pd.wait_for_delivered("a trigger", ALERT_DEADLINE, |r| {
        r.event_action() == "trigger"
    });
    let reminder = pd.wait_for_delivered("a reminder", ALERT_DEADLINE, |r| {
        r.event_action() == "trigger" && r.body["payload"]["custom_details"]["reminder"] == true
    });
    fleet.muster_ok(&["ack", &id]);
    let ack = pd.wait_for_delivered("an acknowledge", ALERT_DEADLINE, |r| {
        r.event_action() == "acknowledge"
    });

    assert_eq!(reminder.dedup_key(), first.dedup_key());
    let gap = reminder.at.duration_since(first.at);
    assert!(
        gap >= Duration::from_millis(2500),
        "reminded after {gap:?}, every 3s asked"
    );
    assert_eq!(ack.dedup_key(), first.dedup_key());
    let acked_at = ack.at;
    pd.assert_holds_for("no reminder after the ack", QUIET * 2, |all| {
        !all.iter()
            .any(|r| r.at > acked_at && r.event_action() == "trigger")
    });
    pd.assert_all_valid();
}

/// Two tasks in one sweep file that crash-loop at once, so their incidents share a group.
fn crash_loop_pair(a: &str, b: &str) -> String {
    [a, b]
        .iter()
        .map(|name| {
            let task = crash_loop_task(name)
                .replace("\n[restart]", "\n[task.restart]")
                .replace("\n[stop]", "\n[task.stop]");
            format!("[[task]]{task}")
        })
        .collect()
}

#[test]
fn group_is_acknowledged_and_resolved_only_once_every_member_is() {
    let pd = Receiver::pagerduty();
    let fleet = alerting_fleet_with(
        "group_window = \"3s\"\nremind_every = \"0s\"\n",
        1,
        4,
        &[pd.config_section("")],
    );

    fleet.submit_toml("pair", &crash_loop_pair("left", "right"));
    let left = incident_id(&wait_for_incident(&fleet, "left", "crash_loop"));
    let right = incident_id(&wait_for_incident(&fleet, "right", "crash_loop"));
    let trigger = pd.wait_for_delivered("one trigger for both", ALERT_DEADLINE, |r| {
        r.event_action() == "trigger"
    });
    assert_eq!(
        trigger.incident_tasks().len(),
        2,
        "one group: {:#}",
        trigger.body
    );

    fleet.muster_ok(&["ack", &left]);
    pd.assert_holds_for("no acknowledge while right is open", QUIET, |all| {
        !all.iter().any(|r| r.event_action() == "acknowledge")
    });
    fleet.muster_ok(&["ack", &right]);
    let ack = pd.wait_for_delivered("an acknowledge", ALERT_DEADLINE, |r| {
        r.event_action() == "acknowledge"
    });
    fleet.muster_ok(&["resolve", &left]);
    pd.assert_holds_for("no resolve while right is open", QUIET, |all| {
        !all.iter().any(|r| r.event_action() == "resolve")
    });
    fleet.muster_ok(&["resolve", &right]);
    let resolve = pd.wait_for_delivered("a resolve", ALERT_DEADLINE, |r| {
        r.event_action() == "resolve"
    });

    assert_eq!(ack.dedup_key(), trigger.dedup_key());
    assert_eq!(resolve.dedup_key(), trigger.dedup_key());
    pd.assert_holds_for("one event per step", QUIET, |all| all.len() == 3);
    pd.assert_all_valid();
}

/// Asks for help once and waits.
fn asks_for_help_task(name: &str) -> String {
    format!(
        r#"
name = "{name}"
shell = true
command = ['''
echo '{{"state":"needs_help","message":"which dataset?"}}' >> "$MUSTER_STATUS_FILE"
exec sleep 1000
''']
[stop]
grace = "1s"
"#
    )
}

#[test]
fn routes_send_each_reason_only_where_configured() {
    let pd = Receiver::pagerduty();
    let slack = Receiver::slack_webhook();
    let routes = "[[alerts.route]]\nreasons = [\"crash_loop\"]\nto = [\"pagerduty\"]\n\
                  [[alerts.route]]\nreasons = [\"needs_help\"]\nto = [\"slack\"]\n";
    let fleet = alerting_fleet(
        1,
        4,
        &[
            pd.config_section(""),
            slack.config_section(""),
            routes.to_string(),
        ],
    );

    fleet.submit_toml("crasher", &crash_loop_task("crasher"));
    fleet.submit_toml("asker", &asks_for_help_task("asker"));
    wait_for_incident(&fleet, "crasher", "crash_loop");
    wait_for_incident(&fleet, "asker", "needs_help");
    pd.wait_for_delivered("the crash_loop trigger", ALERT_DEADLINE, |r| {
        is_trigger_for(r, "crasher")
    });
    slack.wait_for_delivered("the needs_help message", ALERT_DEADLINE, |r| {
        r.text().contains("asker")
    });

    pd.assert_holds_for("nothing about asker", QUIET, |all| {
        !all.iter().any(|r| is_trigger_for(r, "asker"))
    });
    assert!(
        !slack
            .requests()
            .iter()
            .any(|r| r.text().contains("crasher")),
        "Slack got the crash loop: {}",
        describe(&slack.requests())
    );
}

#[test]
fn controller_kill_inside_the_group_window_still_pages() {
    let pd = Receiver::pagerduty();
    let mut fleet = alerting_fleet_with(
        "group_window = \"5s\"\nremind_every = \"0s\"\n",
        1,
        4,
        &[pd.config_section("")],
    );

    fleet.submit_toml("crasher", &crash_loop_task("crasher"));
    wait_for_incident(&fleet, "crasher", "crash_loop");
    fleet.kill_controller(Signal::SIGKILL);
    let before_restart = pd.requests();
    fleet.start_controller();
    let trigger = pd.wait_for_delivered("the trigger", ALERT_DEADLINE, |r| {
        is_trigger_for(r, "crasher")
    });

    assert!(
        before_restart.is_empty(),
        "the window closed before the kill: inconclusive:\n{}",
        describe(&before_restart)
    );
    pd.assert_holds_for("one trigger", QUIET, |all| {
        count(all, |r| r.dedup_key() == trigger.dedup_key()) == 1
    });
    pd.assert_all_valid();
}

#[test]
fn rejected_page_is_not_retried_and_the_queue_moves_on() {
    let pd = Receiver::pagerduty();
    pd.answer_next(1, Answer::Reject);
    let fleet = alerting_fleet(1, 4, &[pd.config_section("")]);

    fleet.submit_toml("first", &crash_loop_task("first"));
    let failed = fleet.wait_for_event(|e| e["kind"] == "alert.failed", ALERT_DEADLINE);
    pd.assert_holds_for("no retry of a 400", QUIET, |all| all.len() == 1);
    fleet.submit_toml("second", &crash_loop_task("second"));
    pd.wait_for_delivered("the trigger for second", ALERT_DEADLINE, |r| {
        is_trigger_for(r, "second")
    });

    assert_eq!(failed["data"]["status"], 400, "{failed}");
    assert_eq!(failed["data"]["will_retry"], false, "{failed}");
    assert_eq!(failed["data"]["attempt"], 1, "{failed}");
    assert!(is_trigger_for(&pd.requests()[0], "first"));
}

/// Asks for help and goes silent; without a hold its heartbeat timeout restarts it.
const ASKS_THEN_GOES_SILENT: &str = r#"
name = "silent"
shell = true
command = ['''
echo '{"state":"needs_help","message":"which dataset?"}' >> "$MUSTER_STATUS_FILE"
exec sleep 1000
''']
[restart]
policy = "always"
backoff_initial = "200ms"
[health]
heartbeat_timeout = "8s"
[stop]
grace = "1s"
"#;

#[test]
fn acked_incident_holds_the_heartbeat_restart() {
    let fleet = alerting_fleet(1, 4, &[]);
    fleet.submit_toml("silent", ASKS_THEN_GOES_SILENT);
    let pid = fleet.wait_for_attempt_pid("silent", 1, TASK_DEADLINE);
    let opened = wait_for_incident(&fleet, "silent", "needs_help");

    fleet.muster_ok(&["ack", &incident_id(&opened)]);
    let acked = fleet.wait_for_event(|e| is_event(e, "incident.acked", "silent"), TASK_DEADLINE);
    let escalated = fleet.wait_for_event(
        |e| is_event(e, "task.unhealthy", "silent") && reason(e) == "heartbeat_timeout",
        TASK_DEADLINE,
    );
    let restarted = poll_until(QUIET, || {
        fleet
            .events(|e| is_event(e, "attempt.started", "silent") && attempt_of(e) > 1)
            .pop()
    });

    let acked_after = ts_ms(&acked) - ts_ms(&opened);
    assert!(
        acked_after < 8000,
        "acked {acked_after}ms after the incident, past the heartbeat timeout: inconclusive"
    );
    assert_eq!(escalated["data"]["action"], "escalate", "{escalated}");
    assert!(restarted.is_none(), "restarted while held: {restarted:?}");
    assert!(pid_alive(pid), "the child {pid} was stopped");
    wait_for_incident(&fleet, "silent", "heartbeat_timeout");
}

#[test]
fn group_with_a_member_resolved_before_a_restart_still_resolves() {
    let pd = Receiver::pagerduty();
    let mut fleet = alerting_fleet_with(
        "group_window = \"3s\"\nremind_every = \"0s\"\n",
        1,
        4,
        &[pd.config_section("")],
    );
    fleet.submit_toml("pair", &crash_loop_pair("left", "right"));
    let left = incident_id(&wait_for_incident(&fleet, "left", "crash_loop"));
    let right = incident_id(&wait_for_incident(&fleet, "right", "crash_loop"));
    let trigger = pd.wait_for_delivered("one trigger for both", ALERT_DEADLINE, |r| {
        r.event_action() == "trigger"
    });
    assert_eq!(
        trigger.incident_tasks().len(),
        2,
        "one group: {:#}",
        trigger.body
    );
    fleet.muster_ok(&["resolve", &left]);

    fleet.kill_controller(Signal::SIGKILL);
    fleet.start_controller();
    fleet.wait_for_nodes_ready(1);
    fleet.muster_ok(&["resolve", &right]);

    let resolve = pd.wait_for_delivered("a resolve", ALERT_DEADLINE, |r| {
        r.event_action() == "resolve"
    });
    assert_eq!(resolve.dedup_key(), trigger.dedup_key());
    let incidents = fleet.muster_json(&["incidents", "--json"]);
    assert_eq!(
        incidents,
        serde_json::json!([]),
        "the controller still answers"
    );
}

#[test]
fn lost_node_pages_and_its_return_resolves_the_page() {
    let pd = Receiver::pagerduty();
    let fleet = alerting_fleet(2, 4, &[pd.config_section("")]);

    signal_pid(fleet.node_agent_pid("node-2"), Signal::SIGSTOP);
    fleet.wait_for_event(
        |e| e["kind"] == "node.lost" && e["node"] == "node-2",
        TASK_DEADLINE,
    );
    let trigger = pd.wait_for_delivered("the node_lost trigger", ALERT_DEADLINE, |r| {
        r.event_action() == "trigger"
    });
    signal_pid(fleet.node_agent_pid("node-2"), Signal::SIGCONT);
    fleet.wait_for_event(
        |e| e["kind"] == "node.returned" && e["node"] == "node-2",
        TASK_DEADLINE,
    );
    let resolve = pd.wait_for_delivered("a resolve", ALERT_DEADLINE, |r| {
        r.event_action() == "resolve"
    });

    let details = &trigger.body["payload"]["custom_details"];
    assert_eq!(details["reason"], "node_lost", "{:#}", trigger.body);
    assert_eq!(details["node"], "node-2", "{:#}", trigger.body);
    assert!(
        details["commands"].to_string().contains("muster nodes"),
        "{:#}",
        trigger.body
    );
    assert_eq!(resolve.dedup_key(), trigger.dedup_key());
    pd.assert_all_valid();
}

#[test]
fn failed_deliveries_keep_secrets_out_of_the_inbox_and_logs() {
    let pd = Receiver::pagerduty();
    pd.answer_always(Answer::ServerError);
    // A port that was free a moment ago: nothing answers there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("finding a free port");
    let secret_path = "/services/T0MUSTER/B0SECRET/xoxsecretwebhookpath";
    let slack = format!("[alerts.slack]\nwebhook_url = \"http://{closed}{secret_path}\"\n");
    let fleet = alerting_fleet(1, 4, &[pd.config_section(""), slack]);

    fleet.submit_toml("crasher", &crash_loop_task("crasher"));
    fleet.wait_for_event(
        |e| e["kind"] == "alert.failed" && e["data"]["destination"] == "slack",
        ALERT_DEADLINE,
    );
    fleet.wait_for_event(
        |e| e["kind"] == "alert.failed" && e["data"]["destination"] == "pagerduty",
        ALERT_DEADLINE,
    );

    let inbox: String = fleet
        .read_inbox()
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let log = std::fs::read_to_string(fleet.dir().join("logs").join("controller.log"))
        .unwrap_or_default();
    for secret in [ROUTING_KEY, "xoxsecretwebhookpath"] {
        assert!(
            !inbox.contains(secret),
            "the inbox holds {secret}:\n{inbox}"
        );
        assert!(
            !log.contains(secret),
            "the controller log holds {secret}:\n{log}"
        );
    }
}

/// Runs the controller with `config` and returns its exit status and stderr; it must exit
/// on its own (a config error stops it before it serves).
fn run_controller_with(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let path = dir.path().join("controller.toml");
    std::fs::write(&path, config).expect("writing the config");
    let mut command = std::process::Command::new(binary_dir().join("muster-controller"));
    command
        .env_remove("MUSTER_E2E_UNSET_ROUTING_KEY")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(dir.path().join("controller"))
        .arg("--config")
        .arg(&path);
    let output = run_with_deadline(&mut command, CLI_DEADLINE);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_alert_config_exits_2_naming_the_key() {
    let cases = [
        (
            "[alerts.pagerduty]\nrouting_key = \"k\"\n[[alerts.route]]\nreasons = [\"crash_loop\"]\nto = [\"slack\"]\n",
            "alerts.route[0].to",
        ),
        (
            "[alerts.slack]\nbot_token = \"xoxb-1\"\n",
            "alerts.slack.default_channel",
        ),
        (
            "[alerts.pagerduty]\nrouting_key_env = \"MUSTER_E2E_UNSET_ROUTING_KEY\"\n",
            "MUSTER_E2E_UNSET_ROUTING_KEY",
        ),
    ];

    for (alerts, key) in cases {
        let (code, stderr) = run_controller_with(alerts);

        assert_eq!(code, Some(2), "config {alerts:?}: {stderr}");
        assert!(
            stderr.contains(key),
            "the error for {alerts:?} does not name {key}: {stderr}"
        );
    }
}
