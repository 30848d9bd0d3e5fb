//! Incidents as notifications: grouped per destination within a short window, recorded in
//! the durable outbox in the same commit as the incident, handed to the delivery workers
//! only after that commit, and marked when delivered. Acks, resolves and reminders follow
//! the group.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Core;
use crate::alert::{self, deliver::Attempted, Dest, Notice, NoticeIncident, Step};
use crate::event::{now_ms, rfc3339, Event, Severity};

/// Incidents that go out together to one destination (and Slack channel).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Group {
    pub id: u64,
    pub dest: Dest,
    pub channel: String,
    pub members: Vec<u64>,
    /// forming, open, acked, resolved
    pub state: String,
    pub dedup_key: String,
    pub severity: String,
    pub slack_ref: Option<(String, String)>,
    pub created_ms: i64,
    pub next_reminder_ms: i64,
}

/// One notification in the outbox.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: u64,
    pub notice: Notice,
    /// pending, sent, failed
    pub state: String,
    pub attempts: u32,
    pub error: String,
}

/// The alerting part of the core.
#[derive(Default)]
pub struct Alerting {
    pub queues: HashMap<Dest, mpsc::UnboundedSender<Notice>>,
    pub groups: HashMap<u64, Group>,
    /// The group still collecting incidents for (destination, channel).
    forming: HashMap<(Dest, String), u64>,
    pub deliveries: HashMap<u64, Delivery>,
    pub next_group: u64,
    pub next_delivery: u64,
    /// Loaded pending deliveries, sent once the workers run.
    pub resend: Vec<Notice>,
}

const SEVERITY_ORDER: [&str; 4] = ["info", "warning", "error", "critical"];

fn worse(a: &str, b: &str) -> String {
    let rank = |s: &str| SEVERITY_ORDER.iter().position(|x| *x == s).unwrap_or(2);
    if rank(b) > rank(a) {
        b.to_string()
    } else {
        a.to_string()
    }
}

impl Alerting {
    /// Restores groups and the outbox after a restart; ids continue after `max_group` and
    /// `max_delivery`, the largest ever stored.
    pub fn restore(
        &mut self,
        groups: Vec<Group>,
        deliveries: Vec<Delivery>,
        max_group: u64,
        max_delivery: u64,
    ) {
        self.next_group = max_group + 1;
        self.next_delivery = max_delivery + 1;
        for g in groups {
            self.next_group = self.next_group.max(g.id + 1);
            if g.state == "forming" {
                self.forming.insert((g.dest, g.channel.clone()), g.id);
            }
            self.groups.insert(g.id, g);
        }
        let mut pending: Vec<&Delivery> =
            deliveries.iter().filter(|d| d.state == "pending").collect();
        pending.sort_by_key(|d| d.id);
        self.resend = pending.iter().map(|d| d.notice.clone()).collect();
        for d in deliveries {
            self.next_delivery = self.next_delivery.max(d.id + 1);
            if d.state == "pending" {
                self.deliveries.insert(d.id, d);
            }
        }
        self.next_group = self.next_group.max(1);
        self.next_delivery = self.next_delivery.max(1);
    }
}

impl Core {
    /// Hands the workers their queues and sends what was pending before a restart.
    pub fn attach_alert_queues(&mut self, queues: HashMap<Dest, mpsc::UnboundedSender<Notice>>) {
        self.alerts.queues = queues;
        for notice in std::mem::take(&mut self.alerts.resend) {
            tracing::info!(
                delivery = notice.delivery,
                dest = notice.dest.as_str(),
                "re-sending a pending notification"
            );
            self.batch.notices.push(notice);
        }
    }

    /// A new incident joins the forming group of each destination it is routed to.
    pub(super) fn alert_opened(&mut self, id: u64) {
        let incident = self.incidents[&id].clone();
        let escalation = self
            .tasks
            .get(&incident.task)
            .and_then(|t| t.spec.escalation.clone())
            .unwrap_or_default();
        let dests = alert::route(
            &self.alert_config,
            &incident.reason,
            &incident.severity,
            escalation.pagerduty != Some(false),
        );
        let now = now_ms();
        for dest in dests {
            let channel = match dest {
                Dest::Slack if !escalation.slack_user.is_empty() => escalation.slack_user.clone(),
                Dest::Slack => escalation.slack_channel.clone(),
                Dest::Pagerduty => String::new(),
            };
            let key = (dest, channel.clone());
            let group_id = match self.alerts.forming.get(&key) {
                Some(&g) => g,
                None => {
                    let g = self.alerts.next_group;
                    self.alerts.next_group += 1;
                    let notice_incident = self
                        .notice_incident(id)
                        .expect("the incident was just opened");
                    self.alerts.groups.insert(
                        g,
                        Group {
                            id: g,
                            dest,
                            channel,
                            members: Vec::new(),
                            state: "forming".into(),
                            dedup_key: alert::dedup_key(g, &notice_incident),
                            severity: incident.severity.clone(),
                            slack_ref: None,
                            created_ms: now,
                            next_reminder_ms: 0,
                        },
                    );
                    self.alerts.forming.insert(key, g);
                    g
                }
            };
            let group = self
                .alerts
                .groups
                .get_mut(&group_id)
                .expect("forming group exists");
            group.members.push(id);
            group.severity = worse(&group.severity, &incident.severity);
            self.batch.groups.push(group.clone());
        }
    }

    pub(super) fn alert_acked(&mut self, id: u64, caller: &str) {
        for gid in self.groups_of(id) {
            let group = &self.alerts.groups[&gid];
            if group.state != "open" {
                continue;
            }
            let all_acked = group
                .members
                .iter()
                .all(|m| self.incidents.get(m).is_none_or(|i| i.state == "acked"));
            if all_acked {
                self.set_group_state(gid, "acked");
                self.enqueue(gid, Step::Acknowledge, caller);
            }
        }
    }

    pub(super) fn alert_unacked(&mut self, id: u64) {
        for gid in self.groups_of(id) {
            if self.alerts.groups[&gid].state == "acked" {
                self.set_group_state(gid, "open");
            }
        }
    }

    pub(super) fn alert_resolved(&mut self, id: u64) {
        for gid in self.groups_of(id) {
            let group = &self.alerts.groups[&gid];
            let all_resolved = group
                .members
                .iter()
                .all(|m| !self.incidents.contains_key(m));
            if !all_resolved || group.state == "resolved" {
                continue;
            }
            if group.state == "forming" {
                // Cleared before anyone was told: nothing to send.
                self.alerts
                    .forming
                    .remove(&(group.dest, group.channel.clone()));
                self.set_group_state(gid, "resolved");
            } else {
                self.set_group_state(gid, "resolved");
                self.enqueue(gid, Step::Resolve, "");
            }
        }
    }

    /// Seals groups whose window passed and sends due reminders. Called every loop turn.
    pub(super) fn alert_tick(&mut self) {
        self.escalate_unacked();
        let now = now_ms();
        let window = self.alert_config.group_window.as_millis() as i64;
        let due: Vec<u64> = self
            .alerts
            .forming
            .values()
            .copied()
            .filter(|g| self.alerts.groups[g].created_ms + window <= now)
            .collect();
        for gid in due {
            let group = self
                .alerts
                .groups
                .get_mut(&gid)
                .expect("forming group exists");
            self.alerts
                .forming
                .remove(&(group.dest, group.channel.clone()));
            group.state = "open".into();
            let remind = self.alert_config.remind_every.as_millis() as i64;
            group.next_reminder_ms = if remind > 0 { now + remind } else { 0 };
            self.batch.groups.push(group.clone());
            self.enqueue(gid, Step::Trigger, "");
        }

        let remind = self.alert_config.remind_every.as_millis() as i64;
        if remind > 0 {
            let reminders: Vec<u64> = self
                .alerts
                .groups
                .values()
                .filter(|g| {
                    g.state == "open" && g.next_reminder_ms > 0 && g.next_reminder_ms <= now
                })
                .map(|g| g.id)
                .collect();
            for gid in reminders {
                let group = self.alerts.groups.get_mut(&gid).expect("group exists");
                // Keep the schedule: the next reminder is due one period after this one was.
                while group.next_reminder_ms <= now {
                    group.next_reminder_ms += remind;
                }
                self.batch.groups.push(group.clone());
                self.enqueue(gid, Step::Remind, "");
            }
        }
        // Resolved groups are kept only until their last notification is out.
        let sending: std::collections::HashSet<u64> = self
            .alerts
            .deliveries
            .values()
            .map(|d| d.notice.group)
            .collect();
        let done: Vec<u64> = self
            .alerts
            .groups
            .values()
            .filter(|g| g.state == "resolved" && !sending.contains(&g.id))
            .map(|g| g.id)
            .collect();
        for gid in done {
            self.alerts.groups.remove(&gid);
        }
    }

    /// The earliest moment a forming group must be sealed, in Unix ms.
    pub(super) fn alert_deadline_ms(&self) -> Option<i64> {
        let window = self.alert_config.group_window.as_millis() as i64;
        self.alerts
            .forming
            .values()
            .map(|g| self.alerts.groups[g].created_ms + window)
            .chain(self.escalate_deadline_ms())
            .min()
    }

    /// A delivery attempt's outcome from a worker.
    pub(super) fn on_alert_attempt(&mut self, a: Attempted) {
        *self
            .metrics
            .alerts
            .entry((a.dest.as_str(), a.ok))
            .or_default() += 1;
        let mut event = Event::new(
            if a.ok { "alert.sent" } else { "alert.failed" },
            if a.ok {
                Severity::Info
            } else if a.will_retry {
                Severity::Warning
            } else {
                Severity::Error
            },
            if a.ok {
                format!("{} {} delivered", a.dest.as_str(), a.step.as_str())
            } else {
                format!(
                    "{} {} failed: {}",
                    a.dest.as_str(),
                    a.step.as_str(),
                    a.error
                )
            },
        )
        .with("destination", a.dest.as_str())
        .with("action", a.step.as_str())
        .with("delivery", a.delivery)
        .with("group", a.group)
        .with("attempt", a.attempt)
        .with("status", a.status);
        if let Some(group) = self.alerts.groups.get(&a.group) {
            event = event
                .with("incidents", group.members.clone())
                .with("dedup_key", group.dedup_key.clone());
        }
        if !a.ok {
            event = event
                .with("error", a.error.clone())
                .with("will_retry", a.will_retry);
        }
        self.emit(event);

        if let Some(d) = self.alerts.deliveries.get_mut(&a.delivery) {
            d.attempts = a.attempt;
            d.error = a.error.clone();
            if a.ok || !a.will_retry {
                d.state = if a.ok { "sent".into() } else { "failed".into() };
            }
            self.batch.deliveries.push(d.clone());
            if d.state != "pending" {
                self.alerts.deliveries.remove(&a.delivery);
            }
        }
        if let (Some(reference), Some(group)) = (a.slack_ref, self.alerts.groups.get_mut(&a.group))
        {
            if group.slack_ref.is_none() {
                group.slack_ref = Some(reference);
                self.batch.groups.push(group.clone());
            }
        }
    }

    fn groups_of(&self, incident: u64) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .alerts
            .groups
            .values()
            .filter(|g| g.members.contains(&incident))
            .map(|g| g.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    fn set_group_state(&mut self, gid: u64, state: &str) {
        let group = self.alerts.groups.get_mut(&gid).expect("group exists");
        group.state = state.to_string();
        self.batch.groups.push(group.clone());
    }

    /// Records a notification for the group; it is sent after the batch commits.
    fn enqueue(&mut self, gid: u64, step: Step, actor: &str) {
        let group = self.alerts.groups[&gid].clone();
        let mut incidents: Vec<NoticeIncident> = group
            .members
            .iter()
            .filter_map(|&m| self.notice_incident(m))
            .collect();
        if step == Step::Trigger || step == Step::Remind {
            // Say only what is still wrong; members resolved within the window drop out.
            incidents.retain(|i| i.state != "resolved");
        }
        if incidents.is_empty() {
            return;
        }
        let id = self.alerts.next_delivery;
        self.alerts.next_delivery += 1;
        let notice = Notice {
            delivery: id,
            group: gid,
            dest: group.dest,
            step,
            dedup_key: group.dedup_key.clone(),
            channel: group.channel.clone(),
            severity: group.severity.clone(),
            ts: rfc3339(now_ms()),
            incidents,
            slack_ref: group.slack_ref.clone(),
            actor: actor.to_string(),
        };
        let delivery = Delivery {
            id,
            notice: notice.clone(),
            state: "pending".into(),
            attempts: 0,
            error: String::new(),
        };
        self.batch.deliveries.push(delivery.clone());
        self.alerts.deliveries.insert(id, delivery);
        self.batch.notices.push(notice);
    }

    /// An incident as notifications show it; None once it is forgotten (resolved long ago).
    fn notice_incident(&self, id: u64) -> Option<NoticeIncident> {
        let incident = self.incidents.get(&id).or_else(|| self.resolved.get(&id))?;
        let task = self.tasks.get(&incident.task);
        Some(NoticeIncident {
            id,
            task: incident.task.clone(),
            node: if incident.node.is_empty() {
                task.map_or(String::new(), |t| t.node.clone())
            } else {
                incident.node.clone()
            },
            attempt: task.map_or(0, |t| t.attempt),
            reason: incident.reason.clone(),
            severity: incident.severity.clone(),
            message: incident.message.clone(),
            root: task.map_or(String::new(), |t| {
                if t.parent.is_empty() {
                    String::new()
                } else {
                    t.root.clone()
                }
            }),
            log_tail: task.map_or(Vec::new(), |t| t.live.log_tail.clone()),
            state: incident.state.clone(),
        })
    }
}
