//! Node sessions: Hello and reconciliation, batches of node events, liveness by this
//! controller's own monotonic receive times.

use std::collections::HashSet;
use std::time::Instant;

use muster_proto::v1::{self, command::Action, node_event::Kind};

use super::{Core, SessionHandle};
use crate::event::{now_ms, Event, Severity};
use crate::model::{NodeRecord, NodeState, TaskState};
use muster_proto::spec::OnDisconnect;
use std::time::Duration;

impl Core {
    pub(super) fn on_hello(&mut self, session: SessionHandle, hello: v1::Hello) {
        let name = hello.node.clone();
        if let Some(current) = self.nodes.get(&name) {
            let live = current.session.as_ref().is_some_and(|s| s.id != session.id)
                && current.memory.instance != hello.instance
                && current.last_seen.elapsed() < self.cfg.node_timeout / 2;
            if live {
                // Two agents with one name would take the session from each other forever.
                tracing::warn!(node = %name, "refusing a second agent with the name of a connected node");
                let refusal = tonic::Status::already_exists(format!(
                    "node name {name} is in use by another connected agent"
                ));
                let _ = session.tx.try_send(Err(refusal));
                return;
            }
        }
        let previous = self.node_memory.get(&name).cloned().unwrap_or_default();
        let same_instance = previous.instance == hello.instance;
        self.epoch += 1;
        self.batch.meta.push(("epoch", self.epoch as i64));

        let existed = self.nodes.contains_key(&name);
        let node = self
            .nodes
            .entry(name.clone())
            // Its state, contact and capacity are set from the Hello below.
            .or_insert_with(|| NodeRecord::restored(name.clone()));
        let was_lost = node.state == NodeState::Lost;
        if was_lost {
            // Three returns within ten minutes: a flapping node; give it no new task for five.
            let now = Instant::now();
            node.returns.push_back(now);
            while node
                .returns
                .front()
                .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(600))
            {
                node.returns.pop_front();
            }
            if node.returns.len() >= 3 {
                node.damped_until = Some(now + Duration::from_secs(300));
                tracing::warn!(node = %name, returns = node.returns.len(), "flapping node: no new tasks for 5 minutes");
            }
        }
        node.capacity = hello.capacity.unwrap_or_default();
        node.labels = hello.labels.clone();
        node.version = hello.version.clone();
        node.last_seen = Instant::now();
        node.last_seen_ms = now_ms();
        node.state = NodeState::Ready;
        node.session = Some(session.clone());
        // The same agent instance resumes from what the store remembers (the record itself
        // may be new after a controller restart); a new instance starts its seqs afresh.
        node.memory = if same_instance {
            previous
        } else {
            crate::model::NodeMemory {
                instance: hello.instance.clone(),
                acked_seq: 0,
            }
        };
        let acked_seq = node.memory.acked_seq;
        self.node_memory.insert(name.clone(), node.memory.clone());
        self.batch.nodes.insert(name.clone());

        self.batch.sends.push((
            session.clone(),
            v1::ControllerMessage {
                body: Some(v1::controller_message::Body::Welcome(v1::Welcome {
                    epoch: self.epoch,
                    heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u32,
                    lease_ms: self.cfg.lease.as_millis() as u32,
                    acked_seq,
                })),
            },
        ));
        // Attempts replaced while the node was away are stopped (fencing) and named in the
        // node's event.
        let fenced = self.reconcile(&name, &hello.attempts, same_instance);
        let kind = if was_lost {
            "node.returned"
        } else {
            "node.joined"
        };
        let capacity = hello.capacity.unwrap_or_default();
        let event = Event::new(
            kind,
            if was_lost {
                Severity::Warning
            } else {
                Severity::Info
            },
            format!("node {name} connected"),
        )
        .node(&name)
        .with("slots", capacity.slots)
        .with("gpus", capacity.gpus)
        .with("memory_mb", capacity.memory_mb)
        .with("version", hello.version.clone())
        .with("running", hello.attempts.len())
        .with("restarted_agent", existed && !same_instance)
        .with("fenced", fenced);
        self.emit(event);
        if was_lost {
            self.resolve_incident("", &name, "node_lost", "node reconnected");
        }
        tracing::info!(node = %name, epoch = self.epoch, running = hello.attempts.len(), "node session started");
        self.replay_task_inboxes(&session, &name, &hello);

        self.batch.place = true;
    }

    /// Compares what the node runs with what the controller believes, and mends both sides.
    fn reconcile(
        &mut self,
        node: &str,
        running: &[v1::RunningAttempt],
        same_instance: bool,
    ) -> Vec<serde_json::Value> {
        let mut fenced = Vec::new();
        let reported: HashSet<&str> = running.iter().map(|a| a.task.as_str()).collect();
        for attempt in running {
            let belongs = self.tasks.get(&attempt.task).is_some_and(|t| {
                t.node == node && t.state.holds_node() && t.attempt <= attempt.attempt
            });
            if belongs {
                let Some(t) = self.tasks.get_mut(&attempt.task) else {
                    continue;
                };
                // A returning node's tasks were pending re-placement; they are back.
                t.live.lost_at = None;
                t.live.heartbeat = Instant::now();
                let held = t.state.holds_node();
                if t.state == TaskState::Stopping {
                    // The stop may have been lost with the old session: ask again.
                    let stop = v1::StopTask {
                        task: attempt.task.clone(),
                        reason: t.stop_reason.clone(),
                        attempt: 0,
                    };
                    self.command(node, Action::Stop(stop));
                }
                if held && self.is_held(&attempt.task) {
                    // A new agent knows nothing of an earlier hold.
                    self.update_hold(&attempt.task);
                }
                continue;
            }
            // The task was replaced, stopped or forgotten while the node was away: fence it.
            tracing::warn!(node, task = %attempt.task, attempt = attempt.attempt, "fencing a replaced attempt");
            let now_at = self.tasks.get(&attempt.task).map_or(String::new(), |t| {
                format!("{} attempt {}", t.node, t.attempt)
            });
            fenced.push(serde_json::json!({ "task": attempt.task, "attempt": attempt.attempt, "pid": attempt.pid, "replaced_by": now_at }));
            self.command(
                node,
                Action::Stop(v1::StopTask {
                    task: attempt.task.clone(),
                    reason: "fenced".into(),
                    attempt: attempt.attempt,
                }),
            );
        }

        let believed: Vec<String> = self
            .tasks
            .values()
            .filter(|t| t.node == node && t.state.holds_node() && !reported.contains(t.name()))
            .map(|t| t.name().to_string())
            .collect();
        for name in believed {
            let task = &self.tasks[&name];
            if same_instance {
                // Events about it are on their way again; a Start that may have been lost is
                // sent again (the node ignores a Start for an attempt it already ran).
                if task.state == TaskState::Starting {
                    let start = self.start_command(&name);
                    self.command(node, start);
                }
            } else {
                self.attempt_lost(&name, "node_restarted");
            }
        }
        fenced
    }

    pub(super) fn on_batch(&mut self, session_id: u64, node: &str, batch: v1::NodeBatch) {
        let Some(record) = self.nodes.get_mut(node) else {
            return;
        };
        if record.session.as_ref().is_none_or(|s| s.id != session_id) {
            return;
        }
        record.last_seen = Instant::now();
        record.last_seen_ms = now_ms();
        if record.state == NodeState::Suspect {
            record.state = NodeState::Ready;
        }

        if batch.draining && record.state != NodeState::Draining {
            record.state = NodeState::Draining;
            tracing::info!(node, "node draining");
        }

        let mut acked = record.memory.acked_seq;
        for event in batch.events {
            if event.seq <= acked {
                continue;
            }
            acked = event.seq;
            self.metrics.node_events += 1;
            self.on_node_event(node, event);
        }
        if let Some(record) = self.nodes.get_mut(node) {
            if acked > record.memory.acked_seq {
                record.memory.acked_seq = acked;
                self.node_memory
                    .insert(node.to_string(), record.memory.clone());
                self.batch.nodes.insert(node.to_string());
            }
            // Every batch is answered, heartbeats too: the node measures its lease by it.
            self.batch
                .acks
                .insert(node.to_string(), record.memory.acked_seq);
        }
        for result in batch.results {
            if !result.ok {
                tracing::warn!(node, command = result.id, error = %result.error, "node rejected a command");
            }
        }
        for log in batch.logs {
            if let Some(reply) = self.log_waiters.remove(&log.id) {
                let result = if log.error.is_empty() {
                    Ok(log.chunk.unwrap_or_default())
                } else {
                    Err(super::ApiError::Unavailable(log.error))
                };
                self.batch.after.push(Box::new(move || {
                    let _ = reply.send(result);
                }));
            }
        }
    }

    fn on_node_event(&mut self, node: &str, event: v1::NodeEvent) {
        let Some(task) = self.tasks.get(&event.task) else {
            tracing::debug!(node, task = %event.task, "event for an unknown task");
            return;
        };
        // A node that no longer owns the task (it was replaced) changes nothing, but the end
        // of its old attempt is recorded.
        if task.node != node {
            let reason = match &event.kind {
                Some(Kind::Exited(e)) => e.reason.clone(),
                Some(Kind::Settled(s)) => s.reason.clone(),
                _ => return,
            };
            let message = format!(
                "replaced attempt {} on {node} ended ({reason})",
                event.attempt
            );
            let e = self
                .task_event(&event.task, "attempt.exited", Severity::Info, message)
                .node(node)
                .attempt(event.attempt);
            self.emit(e.with("reason", reason).with("replaced", true));
            return;
        }
        match event.kind {
            Some(Kind::Started(started)) => {
                self.on_started(&event.task, event.attempt, started.pid, event.ts_ms)
            }
            Some(Kind::Exited(exited)) => {
                self.on_exited(&event.task, event.attempt, exited, event.ts_ms)
            }
            Some(Kind::Report(report)) => {
                self.on_report(&event.task, event.attempt, report, event.ts_ms)
            }
            Some(Kind::LogMatch(m)) => self.on_log_match(&event.task, event.attempt, m),
            Some(Kind::Settled(s)) => {
                self.on_settled(&event.task, event.attempt, &s.state, &s.reason)
            }
            Some(Kind::LogDropped(d)) => {
                let message = format!("{} output is being dropped: {}", d.stream, d.error);
                let event = self
                    .task_event(&event.task, "task.unhealthy", Severity::Warning, message)
                    .with("reason", "log_dropped")
                    .with("stream", d.stream)
                    .with("action", "none");
                self.emit(event);
            }
            None => {}
        }
    }

    pub(super) fn on_closed(&mut self, session_id: u64, node: &str) {
        if let Some(record) = self.nodes.get_mut(node) {
            if record.session.as_ref().is_some_and(|s| s.id == session_id) {
                record.session = None;
                tracing::info!(node, "node session closed");
            }
        }
    }

    /// Marks silent nodes suspect, then lost, and schedules their tasks for re-placement
    /// once their lease has run out. If most nodes fall silent at once, the controller's own
    /// network is the likelier fault: nothing is declared lost or moved, one incident says so,
    /// and every node gets a fresh grace period when contact returns.
    pub(super) fn check_nodes(&mut self) {
        let now = Instant::now();
        let timeout = self.cfg.node_timeout;
        let mut silent_nodes = Vec::new();
        let mut alive = 0;
        // Nodes that went quiet at the same moment cross the timeout a tick apart: count
        // every node already suspect, not only the ones crossing now.
        let mut quiet = 0;
        for node in self.nodes.values_mut() {
            let silent = now.duration_since(node.last_seen);
            match node.state {
                // A draining node that closed its session left on purpose: no incident.
                NodeState::Draining if node.session.is_none() && node.tasks.is_empty() => continue,
                NodeState::Ready | NodeState::Draining if silent > timeout / 2 => {
                    node.state = NodeState::Suspect
                }
                NodeState::Suspect if silent > timeout => silent_nodes.push(node.name.clone()),
                _ => {}
            }
            if node.state != NodeState::Lost {
                alive += 1;
            }
            if node.state == NodeState::Suspect {
                quiet += 1;
            }
        }
        self.check_partition(silent_nodes.len(), quiet, alive, now);
        if self.partition_since.is_some() {
            return;
        }

        for name in silent_nodes {
            let node = self.nodes.get_mut(&name).expect("listed node exists");
            node.state = NodeState::Lost;
            node.session = None;
            let last_seen = node.last_seen;
            let tasks: Vec<String> = node.tasks.iter().cloned().collect();
            tracing::warn!(node = %name, tasks = tasks.len(), "node lost");
            let message = format!(
                "node {name} silent for {}s; {} tasks affected",
                timeout.as_secs(),
                tasks.len()
            );
            self.emit(
                Event::new("node.lost", Severity::Error, message.clone())
                    .node(&name)
                    .with("reason", "node_lost")
                    .with("tasks", tasks.len()),
            );
            self.open_incident("", &name, "node_lost", Severity::Error, &message);
            for task in tasks {
                let Some(t) = self.tasks.get_mut(&task) else {
                    continue;
                };
                t.live.lost_at = Some(now);
                // The node stops the task once its lease runs out (counted from its last
                // contact, which is no earlier than our last_seen); only then, plus the stop
                // grace and a margin, may it run elsewhere.
                let at = match t.rules.on_disconnect {
                    OnDisconnect::Keep => {
                        tracing::info!(task = %task, node = %name, "on_disconnect = keep: not placing a replacement");
                        continue;
                    }
                    OnDisconnect::StopAfter(d) => {
                        last_seen
                            + d.unwrap_or(self.cfg.lease)
                            + t.rules.grace
                            + Duration::from_secs(2)
                    }
                };
                self.schedule(
                    at.max(now + self.cfg.reschedule_after),
                    super::Check::Reschedule,
                    &task,
                );
            }
        }
    }

    /// Opens or clears the controller-connectivity incident.
    fn check_partition(&mut self, crossing: usize, silent: usize, alive: usize, now: Instant) {
        let most = crossing >= 1 && silent >= 2 && silent * 2 > alive;
        match (most, self.partition_since) {
            (true, None) => {
                self.partition_since = Some(now);
                let message = format!("{silent} of {alive} nodes fell silent at once: suspecting the controller's own network; moving no task");
                tracing::error!(silent, alive, "most nodes silent at once");
                self.open_incident("", "", "controller_partition", Severity::Critical, &message);
            }
            (false, Some(_)) if silent == 0 => {
                self.partition_since = None;
                // Contact is back: every node starts from a clean slate.
                for node in self.nodes.values_mut() {
                    node.last_seen = now;
                }
                self.resolve_incident("", "", "controller_partition", "nodes are heard again");
            }
            _ => {}
        }
    }
}
