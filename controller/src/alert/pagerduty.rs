//! PagerDuty Events API v2: one event per notification, keyed by the group's dedup key.

use serde_json::{json, Value};

use super::{commands, Notice, Step};

const SUMMARY_MAX: usize = 1024;
const DETAILS_MAX_INCIDENTS: usize = 50;

/// The request body for a notice.
pub fn event(notice: &Notice, routing_key: &str, source: &str) -> Value {
    let action = match notice.step {
        Step::Trigger | Step::Remind => "trigger",
        Step::Acknowledge => "acknowledge",
        Step::Resolve => "resolve",
    };
    if action != "trigger" {
        return json!({ "routing_key": routing_key, "event_action": action, "dedup_key": notice.dedup_key });
    }

    let first = &notice.incidents[0];
    let incidents: Vec<Value> = notice
        .incidents
        .iter()
        .take(DETAILS_MAX_INCIDENTS)
        .map(|i| {
            json!({
                "incident": i.id, "task": i.task, "node": i.node, "attempt": i.attempt,
                "reason": i.reason, "message": i.message, "last_log_lines": i.log_tail,
                "commands": commands(i),
            })
        })
        .collect();
    let mut details = json!({
        "incidents": incidents,
        "count": notice.incidents.len(),
        "task": first.task,
        "node": first.node,
        "attempt": first.attempt,
        "reason": first.reason,
        "last_log_lines": first.log_tail,
        "commands": commands(first),
    });
    if notice.step == Step::Remind {
        details["reminder"] = json!(true);
    }
    let component = if first.task.is_empty() {
        first.node.clone()
    } else {
        first.task.clone()
    };
    let group = if !first.root.is_empty() {
        first.root.clone()
    } else {
        first.node.clone()
    };
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": notice.dedup_key,
        "client": "Muster",
        "payload": {
            "summary": super::truncate(&notice.summary(), SUMMARY_MAX),
            "source": if first.node.is_empty() { source.to_string() } else { first.node.clone() },
            // PagerDuty knows critical, error, warning and info, as Muster does.
            "severity": crate::event::Severity::from_name(&notice.severity).as_str(),
            "timestamp": notice.ts,
            "component": component,
            "group": group,
            "class": first.reason,
            "custom_details": details,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{Dest, NoticeIncident};

    fn notice(step: Step, n: usize) -> Notice {
        Notice {
            delivery: 1,
            group: 2,
            dest: Dest::Pagerduty,
            step,
            dedup_key: "muster/2/t/crash_loop".into(),
            channel: String::new(),
            severity: "error".into(),
            ts: "2026-12-04T15:00:00.000Z".into(),
            incidents: (0..n)
                .map(|i| NoticeIncident {
                    id: i as u64 + 1,
                    task: format!("t{i}"),
                    node: "node-1".into(),
                    attempt: 3,
                    reason: "crash_loop".into(),
                    severity: "error".into(),
                    message: "x".repeat(2000),
                    root: String::new(),
                    log_tail: vec!["boom".into()],
                    state: "open".into(),
                })
                .collect(),
            slack_ref: None,
            actor: String::new(),
        }
    }

    #[test]
    fn trigger_has_the_required_fields_within_limits() {
        let e = event(&notice(Step::Trigger, 1), "key", "ctl");

        assert_eq!(e["event_action"], "trigger");
        assert_eq!(e["dedup_key"], "muster/2/t/crash_loop");
        let p = &e["payload"];
        assert!(p["summary"].as_str().unwrap().chars().count() <= 1024);
        assert_eq!(p["source"], "node-1");
        assert_eq!(p["severity"], "error");
        assert_eq!(p["custom_details"]["commands"][0], "muster show t0");
    }

    #[test]
    fn resolve_is_only_the_key() {
        let e = event(&notice(Step::Resolve, 3), "key", "ctl");

        assert_eq!(
            e,
            json!({"routing_key": "key", "event_action": "resolve", "dedup_key": "muster/2/t/crash_loop"})
        );
    }
}
