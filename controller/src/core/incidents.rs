//! Incidents: open once per (task or node, reason), refreshed while open, acknowledged by
//! people, resolved when the cause clears. Acknowledging a task's incident holds its
//! automatic restarts until the incident is resolved or un-acknowledged.

use muster_proto::v1::{self, command::Action};

use super::{ApiError, Core};
use crate::event::{now_ms, Event, Severity};
use crate::model::Incident;

impl Core {
    /// Starts the incident for (task, node, reason) or refreshes the open one.
    pub(super) fn open_incident(
        &mut self,
        task: &str,
        node: &str,
        reason: &str,
        severity: Severity,
        message: &str,
    ) {
        let key = (task.to_string(), node.to_string(), reason.to_string());
        let now = now_ms();
        if let Some(id) = self.open_incidents.get(&key).copied() {
            if let Some(incident) = self.incidents.get_mut(&id) {
                incident.message = message.to_string();
                incident.updated_ms = now;
                self.batch.incidents.push(incident.clone());
                return;
            }
        }
        // A task's escalation may set the severity of all its incidents.
        let severity_name = self
            .tasks
            .get(task)
            .and_then(|t| t.spec.escalation.as_ref())
            .map(|e| e.severity.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| severity.as_str().to_string());

        // A task with a living parent tells the parent first; people only after its timeout.
        let parent_hold = self.parent_hold(task);
        let id = self.next_incident;
        self.next_incident += 1;
        self.batch
            .meta
            .push(("next_incident", self.next_incident as i64));
        let incident = Incident {
            id,
            task: task.to_string(),
            node: node.to_string(),
            reason: reason.to_string(),
            state: "open".into(),
            severity: severity_name.clone(),
            message: message.to_string(),
            opened_ms: now,
            updated_ms: now,
            resolved_ms: 0,
            escalate_ms: parent_hold
                .as_ref()
                .map_or(0, |(_, wait)| now + wait.as_millis() as i64),
        };
        let event = if task.is_empty() {
            Event::new("incident.opened", severity, message).node(node)
        } else {
            self.task_event(task, "incident.opened", severity, message)
        };
        let mut event = event
            .with("incident", id)
            .with("reason", reason)
            .with("severity", severity_name);
        if let Some((parent, wait)) = &parent_hold {
            event = event
                .with("escalate_to", parent.clone())
                .with("parent_timeout_ms", wait.as_millis() as u64);
        }
        self.emit(event);
        self.batch.incidents.push(incident.clone());
        self.open_incidents.insert(key, id);
        self.incidents.insert(id, incident);
        if parent_hold.is_none() {
            self.alert_opened(id);
        }
    }

    /// The living parent an incident of `task` goes to first, and how long it has to
    /// acknowledge it; None when people are to be told at once.
    fn parent_hold(&self, task: &str) -> Option<(String, std::time::Duration)> {
        let record = self.tasks.get(task)?;
        let parent = self.tasks.get(&record.parent)?;
        if !super::tree::living(parent.state) {
            return None;
        }
        let wait = record
            .spec
            .escalation
            .as_ref()
            .and_then(|e| muster_proto::duration::parse(&e.parent_timeout).ok())
            .unwrap_or(self.alert_config.parent_timeout);
        (!wait.is_zero()).then(|| (record.parent.clone(), wait))
    }

    /// Incidents their task's parent did not acknowledge in time go to people now.
    pub(super) fn escalate_unacked(&mut self) {
        let now = now_ms();
        let due: Vec<u64> = self
            .incidents
            .values()
            .filter(|i| i.escalate_ms > 0 && i.escalate_ms <= now && i.state == "open")
            .map(|i| i.id)
            .collect();
        for id in due {
            let incident = self.incidents.get_mut(&id).expect("due incident exists");
            incident.escalate_ms = 0;
            let incident = incident.clone();
            self.batch.incidents.push(incident.clone());
            let parent = self
                .tasks
                .get(&incident.task)
                .map(|t| t.parent.clone())
                .unwrap_or_default();
            tracing::info!(
                incident = id,
                task = incident.task.as_str(),
                parent = parent.as_str(),
                "parent did not acknowledge an incident in time; telling people"
            );
            let event = self
                .task_event(
                    &incident.task,
                    "incident.escalated",
                    Severity::from_name(&incident.severity),
                    format!("incident {id} not acknowledged by {parent} in time: telling people"),
                )
                .with("incident", id)
                .with("reason", incident.reason.clone());
            self.emit(event);
            self.alert_opened(id);
        }
    }

    /// The earliest moment an incident held for a parent is due, in Unix ms.
    pub(super) fn escalate_deadline_ms(&self) -> Option<i64> {
        self.incidents
            .values()
            .filter(|i| i.escalate_ms > 0 && i.state == "open")
            .map(|i| i.escalate_ms)
            .min()
    }

    pub(super) fn resolve_incident(&mut self, task: &str, node: &str, reason: &str, why: &str) {
        let key = (task.to_string(), node.to_string(), reason.to_string());
        if let Some(id) = self.open_incidents.get(&key).copied() {
            self.resolve_by_id(id, why);
        }
    }

    fn resolve_by_id(&mut self, id: u64, why: &str) {
        let Some(mut incident) = self.incidents.remove(&id) else {
            return;
        };
        self.open_incidents.remove(&(
            incident.task.clone(),
            incident.node.clone(),
            incident.reason.clone(),
        ));
        let was_acked = incident.state == "acked";
        if incident.reason == super::tree::RESTART_INTENSITY {
            // A person looked at the subtree: its restarts are counted afresh.
            self.restart_times.remove(&incident.task);
        }
        incident.state = "resolved".into();
        incident.resolved_ms = now_ms();
        incident.updated_ms = incident.resolved_ms;
        let message = format!("{} resolved: {why}", incident.reason);
        let event = if incident.task.is_empty() {
            Event::new("incident.resolved", Severity::Info, message).node(&incident.node)
        } else {
            self.task_event(&incident.task, "incident.resolved", Severity::Info, message)
        };
        self.emit(
            event
                .with("incident", id)
                .with("reason", incident.reason.clone()),
        );
        self.batch.incidents.push(incident.clone());
        self.resolved.insert(id, incident.clone());
        while self.resolved.len() > 10_000 {
            self.resolved.pop_first();
        }
        if was_acked {
            self.update_hold(&incident.task);
        }
        self.alert_resolved(id);
    }

    /// Resolves every open incident of a task (it ended or was restarted by an operator).
    pub(super) fn resolve_task_incidents(&mut self, task: &str, why: &str) {
        let ids: Vec<u64> = self
            .open_incidents
            .iter()
            .filter(|((t, _, _), _)| t == task)
            .map(|(_, id)| *id)
            .collect();
        for id in ids {
            self.resolve_by_id(id, why);
        }
    }

    pub(super) fn ack(
        &mut self,
        id: u64,
        caller: &str,
        acked: bool,
    ) -> Result<v1::Incident, ApiError> {
        let incident = self.incidents.get_mut(&id).ok_or_else(|| {
            ApiError::NotFound(format!("incident {id} not found or already resolved"))
        })?;
        let (from, to) = if acked {
            ("open", "acked")
        } else {
            ("acked", "open")
        };
        if incident.state == from {
            incident.state = to.into();
            incident.updated_ms = now_ms();
            let incident = incident.clone();
            self.batch.incidents.push(incident.clone());
            let verb = if acked {
                "acknowledged"
            } else {
                "un-acknowledged"
            };
            let event = self
                .task_event(
                    &incident.task,
                    "incident.acked",
                    Severity::Info,
                    format!("incident {id} {verb} by {caller}"),
                )
                .node(&incident.node)
                .attempt(0)
                .with("incident", id)
                .with("reason", incident.reason.clone())
                .with("acked", acked)
                .with("caller", caller);
            self.emit(event);
            self.update_hold(&incident.task);
            if acked {
                self.alert_acked(id, caller);
            } else {
                self.alert_unacked(id);
            }
        }
        Ok(self.incidents[&id].to_proto())
    }

    pub(super) fn resolve_request(
        &mut self,
        id: u64,
        caller: &str,
    ) -> Result<v1::Incident, ApiError> {
        if let Some(done) = self.resolved.get(&id) {
            return Ok(done.to_proto());
        }
        if !self.incidents.contains_key(&id) {
            return Err(ApiError::NotFound(format!("incident {id} not found")));
        }
        self.resolve_by_id(id, &format!("resolved by {caller}"));
        Ok(self.resolved[&id].to_proto())
    }

    /// Whether an operator acknowledged an open incident of this task.
    pub(super) fn is_held(&self, task: &str) -> bool {
        !task.is_empty()
            && self.open_incidents.iter().any(|((t, _, _), id)| {
                t == task && self.incidents.get(id).is_some_and(|i| i.state == "acked")
            })
    }

    /// Tells the task's node whether to hold restarts, after an ack, un-ack or resolve.
    pub(super) fn update_hold(&mut self, task: &str) {
        let Some(node) = self
            .tasks
            .get(task)
            .map(|t| t.node.clone())
            .filter(|n| !n.is_empty())
        else {
            return;
        };
        let hold = self.is_held(task);
        let reason = if hold {
            "incident acknowledged"
        } else {
            "incident cleared"
        };
        self.command(
            &node,
            Action::Hold(v1::HoldTask {
                task: task.to_string(),
                hold,
                reason: reason.into(),
            }),
        );
    }
}
