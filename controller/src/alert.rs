//! Escalation to people: which incidents go where, what a notification says, and the
//! delivery workers that send it to Slack and PagerDuty.

pub mod deliver;
pub mod pagerduty;
pub mod slack;

use serde::{Deserialize, Serialize};

use crate::config::Alerts;

/// A destination for notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dest {
    Slack,
    Pagerduty,
}

impl Dest {
    pub fn as_str(self) -> &'static str {
        match self {
            Dest::Slack => "slack",
            Dest::Pagerduty => "pagerduty",
        }
    }

    pub fn parse(s: &str) -> Option<Dest> {
        match s {
            "slack" => Some(Dest::Slack),
            "pagerduty" => Some(Dest::Pagerduty),
            _ => None,
        }
    }
}

/// What a notification does to the incident (group) it is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    Trigger,
    Acknowledge,
    Resolve,
    Remind,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Trigger => "trigger",
            Step::Acknowledge => "acknowledge",
            Step::Resolve => "resolve",
            Step::Remind => "remind",
        }
    }
}

/// One incident as a notification shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NoticeIncident {
    pub id: u64,
    pub task: String,
    pub node: String,
    pub attempt: u32,
    pub reason: String,
    pub severity: String,
    pub message: String,
    pub root: String,
    pub log_tail: Vec<String>,
    pub state: String,
}

/// A notification, rendered once and stored in the outbox so a retry or a restart sends
/// exactly the same thing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Notice {
    pub delivery: u64,
    pub group: u64,
    pub dest: Dest,
    pub step: Step,
    pub dedup_key: String,
    /// Slack channel or user (bot token mode); empty for the default.
    pub channel: String,
    pub severity: String,
    pub ts: String,
    pub incidents: Vec<NoticeIncident>,
    /// Slack message of the group's trigger, once known: (channel id, ts).
    pub slack_ref: Option<(String, String)>,
    /// Who acknowledged, for ack notices.
    pub actor: String,
}

impl Notice {
    /// One line a person reads first.
    pub fn summary(&self) -> String {
        let first = &self.incidents[0];
        let what = |i: &NoticeIncident| {
            let subject = if i.task.is_empty() {
                format!("node {}", i.node)
            } else {
                i.task.clone()
            };
            format!("{subject}: {}", i.reason)
        };
        let head = match self.step {
            Step::Trigger => "",
            Step::Acknowledge => "[acknowledged] ",
            Step::Resolve => "[resolved] ",
            Step::Remind => "[still open] ",
        };
        if self.incidents.len() == 1 {
            format!("{head}{} — {}", what(first), first.message)
        } else {
            format!(
                "{head}{} incidents: {} and {} more",
                self.incidents.len(),
                what(first),
                self.incidents.len() - 1
            )
        }
    }
}

/// At most `max` characters, with an ellipsis when cut (Slack's and PagerDuty's limits).
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// The `muster` commands that act on an incident, for people reading a page at 3 a.m.
pub fn commands(i: &NoticeIncident) -> Vec<String> {
    let mut out = Vec::new();
    if !i.task.is_empty() {
        out.push(format!("muster show {}", i.task));
        out.push(format!("muster logs {} --stderr", i.task));
        out.push(format!("muster restart {}", i.task));
    } else {
        out.push("muster nodes".to_string());
    }
    out.push(format!("muster ack {}", i.id));
    out.push(format!("muster resolve {}", i.id));
    out
}

/// Where an incident goes: the routes (or every destination when there are none), less
/// what the task's own escalation turns off.
pub fn route(config: &Alerts, reason: &str, severity: &str, pagerduty_allowed: bool) -> Vec<Dest> {
    let mut out = Vec::new();
    let mut add = |d: Dest| {
        let configured = match d {
            Dest::Slack => config.slack.is_some(),
            Dest::Pagerduty => config.pagerduty.is_some() && pagerduty_allowed,
        };
        if configured && !out.contains(&d) {
            out.push(d);
        }
    };
    if config.routes.is_empty() {
        add(Dest::Slack);
        add(Dest::Pagerduty);
    }
    for r in &config.routes {
        let reason_ok = r.reasons.is_empty() || r.reasons.iter().any(|x| x == reason);
        let severity_ok = r.severities.is_empty() || r.severities.iter().any(|x| x == severity);
        if reason_ok && severity_ok {
            r.to.iter()
                .filter_map(|t| Dest::parse(t))
                .for_each(&mut add);
        }
    }
    out
}

/// A PagerDuty dedup key from an incident group's identity: stable, never a secret, at most
/// 255 characters.
pub fn dedup_key(group: u64, first: &NoticeIncident) -> String {
    let subject = if first.task.is_empty() {
        format!("node-{}", first.node)
    } else {
        first.task.clone()
    };
    let mut key = format!("muster/{group}/{subject}/{}", first.reason);
    key.truncate(255);
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PagerDuty, Route};

    fn config(routes: Vec<Route>) -> Alerts {
        Alerts {
            pagerduty: Some(PagerDuty {
                routing_key: "k".into(),
                events_url: "http://x".into(),
                timeout: std::time::Duration::from_secs(1),
                per_minute: 120.0,
                source: "s".into(),
            }),
            routes,
            ..Default::default()
        }
    }

    #[test]
    fn routes_pick_destinations_by_reason_and_task_opt_out() {
        let routes = vec![Route {
            reasons: vec!["crash_loop".into()],
            severities: vec![],
            to: vec!["pagerduty".into()],
        }];
        let c = config(routes);

        assert_eq!(route(&c, "crash_loop", "error", true), [Dest::Pagerduty]);
        assert!(route(&c, "needs_help", "error", true).is_empty());
        assert!(route(&c, "crash_loop", "error", false).is_empty());
        assert_eq!(
            route(&config(vec![]), "anything", "info", true),
            [Dest::Pagerduty]
        );
    }

    #[test]
    fn dedup_key_is_bounded() {
        let i = NoticeIncident {
            id: 1,
            task: "t".repeat(300),
            node: String::new(),
            attempt: 1,
            reason: "crash_loop".into(),
            severity: "error".into(),
            message: String::new(),
            root: String::new(),
            log_tail: vec![],
            state: "open".into(),
        };
        assert_eq!(dedup_key(7, &i).len(), 255);
    }
}
