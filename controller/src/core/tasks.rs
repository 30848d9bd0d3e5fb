//! Task lifecycle in the controller: placement, attempt events from nodes, and the
//! operator's stop and restart.

use std::time::Instant;

use muster_proto::v1::{self, command::Action};

use super::Core;
use crate::event::{metrics_json, now_ms, rfc3339, Severity};
use crate::model::TaskState;

impl Core {
    /// Places pending tasks, in submission order, on the ready node with the most free
    /// slots that fits each. Stops early once no node has a free slot.
    pub(super) fn place_pending(&mut self) {
        let mut waiting = std::collections::VecDeque::new();
        while let Some(name) = self.pending.pop_front() {
            if !self
                .nodes
                .values()
                .any(|n| n.free_slots() > 0 && n.session.is_some())
            {
                waiting.push_back(name);
                break;
            }
            let Some(task) = self.tasks.get(&name) else {
                continue;
            };
            if task.state != TaskState::Pending {
                continue;
            }
            if task.live.not_before.is_some_and(|t| t > Instant::now()) {
                waiting.push_back(name);
                continue;
            }
            // Back on its last node when it fits there (its local files are there), else the
            // ready node with the most free slots.
            let previous = self
                .nodes
                .get(&task.node)
                .filter(|n| n.fits(task))
                .map(|n| n.name.clone());
            let best = previous.or_else(|| {
                self.nodes
                    .values()
                    .filter(|n| n.fits(task))
                    .max_by_key(|n| (n.free_slots(), std::cmp::Reverse(n.name.clone())))
                    .map(|n| n.name.clone())
            });
            match best {
                Some(node) => self.place(&name, &node),
                None => {
                    self.explain_waiting(&name);
                    waiting.push_back(name);
                }
            }
        }
        waiting.append(&mut self.pending);
        self.pending = waiting;
        self.batch.place = false;
    }

    /// Says on a pending task why no node takes it, once per reason.
    fn explain_waiting(&mut self, name: &str) {
        let task = &self.tasks[name];
        let res = task.spec.resources.unwrap_or_default();
        let labels = task.spec.placement.as_ref().map(|p| {
            let mut l: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            l.sort();
            l.join(",")
        });
        let could_ever = self.nodes.values().any(|n| {
            n.capacity.slots >= task.slots()
                && n.capacity.gpus >= res.gpus
                && n.capacity.memory_mb >= res.memory_mb
                && task
                    .spec
                    .placement
                    .as_ref()
                    .is_none_or(|p| p.labels.iter().all(|(k, v)| n.labels.get(k) == Some(v)))
        });
        let needs = format!(
            "slots={} gpus={} memory_mb={}{}",
            task.slots(),
            res.gpus,
            res.memory_mb,
            labels
                .filter(|l| !l.is_empty())
                .map_or(String::new(), |l| format!(" labels {l}"))
        );
        let message = if could_ever {
            format!("waiting for a ready node with free {needs}")
        } else {
            format!("no node could ever fit it: needs {needs}")
        };
        let reason = if could_ever {
            "waiting"
        } else {
            "unschedulable"
        };
        if task.message != message {
            let task = self.tasks.get_mut(name).expect("task exists");
            task.message = message;
            task.reason = reason.to_string();
            self.touch(name);
        }
    }

    fn place(&mut self, name: &str, node: &str) {
        let task = self.tasks.get_mut(name).expect("placed task exists");
        task.node = node.to_string();
        task.attempt += 1;
        task.live.lost_at = None;
        task.live.current = None;
        task.set_state(TaskState::Starting, "placed");
        let record = task.clone();
        self.nodes
            .get_mut(node)
            .expect("placement node exists")
            .reserve(&record, 1);
        self.touch(name);

        let event = self.task_event(
            name,
            "task.placed",
            Severity::Info,
            format!("placed on {node}"),
        );
        self.emit(event);
        let start = self.start_command(name);
        self.command(node, start);
    }

    pub(super) fn start_command(&self, name: &str) -> Action {
        let task = &self.tasks[name];
        let mut env = std::collections::HashMap::new();
        if let Some(key) = &self.task_key {
            // Lets the task start and manage children of its own, and nothing else.
            env.insert("MUSTER_TOKEN".to_string(), key.token(name));
        }
        Action::Start(v1::StartTask {
            spec: Some(task.spec.clone()),
            attempt: task.attempt,
            env,
        })
    }

    pub(super) fn on_started(&mut self, name: &str, attempt: u32, pid: u32, ts_ms: i64) {
        let Some(task) = self.tasks.get_mut(name) else {
            return;
        };
        if attempt < task.attempt || !task.state.holds_node() {
            return;
        }
        task.attempt = attempt;
        task.live.heartbeat = Instant::now();
        task.live.progress = None;
        let current = v1::Attempt {
            task: name.to_string(),
            attempt,
            node: task.node.clone(),
            pid,
            started_ms: ts_ms,
            ..Default::default()
        };
        task.live.current = Some(current.clone());
        if task.state != TaskState::Stopping {
            task.set_state(TaskState::Running, "started");
        }
        self.batch.attempts.push(current);
        self.metrics.attempts_started += 1;
        self.touch(name);

        let event = self
            .task_event(
                name,
                "attempt.started",
                Severity::Info,
                format!("started pid {pid}"),
            )
            .with("pid", pid)
            .with("at", rfc3339(ts_ms));
        self.emit(event);
        self.schedule_health(name);
        self.resolve_incident(name, "", "spawn_error", "an attempt started");
    }

    pub(super) fn on_exited(
        &mut self,
        name: &str,
        attempt: u32,
        exited: v1::AttemptExited,
        ts_ms: i64,
    ) {
        let Some(task) = self.tasks.get_mut(name) else {
            return;
        };
        if attempt < task.attempt {
            return;
        }
        task.attempt = attempt;
        let mut ended = task
            .live
            .current
            .take()
            .filter(|a| a.attempt == attempt)
            .unwrap_or(v1::Attempt {
                task: name.to_string(),
                attempt,
                node: task.node.clone(),
                ..Default::default()
            });
        ended.ended_ms = ts_ms;
        ended.exit_code = exited.exit_code;
        ended.signal = exited.signal;
        ended.end_reason = exited.reason.clone();
        ended.error = exited.error.clone();
        self.batch.attempts.push(ended);

        let (what, severity) = match (exited.exit_code, exited.signal, exited.error.is_empty()) {
            (_, _, false) => (
                format!("could not start: {}", exited.error),
                Severity::Error,
            ),
            (Some(0), _, _) => ("exited with code 0".to_string(), Severity::Info),
            (Some(code), _, _) => (format!("exited with code {code}"), Severity::Warning),
            (None, Some(sig), _) => (format!("killed by signal {sig}"), Severity::Warning),
            _ => ("exited".to_string(), Severity::Warning),
        };
        let stopped_by_us = exited.next == "stopped";
        let mut event = self
            .task_event(
                name,
                "attempt.exited",
                if stopped_by_us {
                    Severity::Info
                } else {
                    severity
                },
                what.clone(),
            )
            .with("reason", exited.reason.clone())
            .with("runtime_ms", exited.runtime_ms)
            .with("at", rfc3339(ts_ms))
            .with("log_tail", exited.log_tail.clone());
        if let Some(code) = exited.exit_code {
            event = event.with("exit_code", code);
        }
        if let Some(sig) = exited.signal {
            event = event.with("signal", sig);
        }
        if exited.exit_code != Some(0) && exited.next != "stopped" {
            self.metrics.attempts_failed += 1;
        }
        if exited.next == "backoff" {
            self.metrics.restarts += 1;
        }
        if !exited.error.is_empty() {
            event = event.with("error", exited.error.clone());
        }
        self.emit(event);
        if let Some(task) = self.tasks.get_mut(name) {
            task.live.log_tail = exited.log_tail.clone();
        }
        if !exited.error.is_empty() {
            // The program did not even start: a person must fix the path, the workdir or
            // the permissions; the node keeps retrying with backoff meanwhile.
            self.open_incident(
                name,
                "",
                "spawn_error",
                Severity::Error,
                &format!("{}: {}", exited.class, exited.error),
            );
        }
        if !exited.rule.is_empty() {
            self.on_exit_rule(name, &exited);
        }

        match exited.next.as_str() {
            "backoff" => {
                let task = self.tasks.get_mut(name).expect("task exists");
                task.restarts += 1;
                task.set_state(TaskState::Backoff, &exited.reason);
                task.message = what;
                if exited.reason == "wait" {
                    // A rate-limit style wait: the task is blocked, not crashing.
                    task.set_state(TaskState::Blocked, "wait");
                    task.message = format!(
                        "waiting {}s before the next attempt",
                        exited.backoff_ms / 1000
                    );
                }
                if self.is_held(name) {
                    let task = self.tasks.get_mut(name).expect("task exists");
                    task.message = "restart held: an incident of this task is acknowledged (muster ack ID --undo, or resolve it)".into();
                }
                let over_intensity = self.count_restart(name);
                let event = self
                    .task_event(
                        name,
                        "task.restarting",
                        Severity::Warning,
                        format!("restarting in {}ms", exited.backoff_ms),
                    )
                    .with("reason", exited.reason.clone())
                    .with("backoff_ms", exited.backoff_ms)
                    .with("restarts_in_window", exited.restarts_in_window);
                self.emit(event);
                if over_intensity && self.tasks[name].state != TaskState::Stopping {
                    // Its subtree restarted too often: it waits for a person instead.
                    self.request_stop(name, super::tree::RESTART_INTENSITY);
                }
            }
            "crash_loop" => {
                let max = self.tasks[name].rules.restart.max_restarts;
                let restarts = exited.restarts_in_window.max(max);
                let message = format!(
                    "{restarts} restart{} within the window, giving up: {what}",
                    if restarts == 1 { "" } else { "s" }
                );
                self.release(name, TaskState::CrashLoop, "crash_loop");
                let event = self
                    .task_event(name, "task.crash_loop", Severity::Error, message.clone())
                    .with("reason", "crash_loop")
                    .with("restarts", exited.restarts_in_window);
                self.emit(event);
                self.open_incident(name, "", "crash_loop", Severity::Error, &message);
            }
            "succeeded" => {
                self.release(name, TaskState::Succeeded, "exit_code");
                let event = self.task_event(name, "task.succeeded", Severity::Info, "succeeded");
                self.emit(event);
                self.resolve_task_incidents(name, "task succeeded");
            }
            "failed" => {
                self.release(name, TaskState::Failed, &exited.reason);
                let event = self
                    .task_event(name, "task.failed", Severity::Error, what)
                    .with("reason", exited.reason.clone());
                self.emit(event);
            }
            _ => {
                // It records the end and what follows from it (children included).
                self.on_settled(name, attempt, "stopped", &exited.reason);
                return;
            }
        }
        self.touch(name);
        if !super::tree::living(self.tasks[name].state) {
            self.task_ended(name);
        }
    }

    /// The task ended by request (stop, controller health action, node shutdown).
    pub(super) fn on_settled(&mut self, name: &str, _attempt: u32, _state: &str, reason: &str) {
        let Some(task) = self.tasks.get(name) else {
            return;
        };
        if task.state.is_final()
            || task.state == TaskState::CrashLoop
            || task.state == TaskState::Pending
        {
            return;
        }
        let stop_reason = if task.stop_reason.is_empty() {
            reason.to_string()
        } else {
            task.stop_reason.clone()
        };
        match stop_reason.as_str() {
            // Stops the controller decided for health (metric_nan, a rule) end failed;
            // stops asked for by an operator or a shutdown end stopped.
            reason if !ends_stopped(reason) => {
                let message = format!("stopped for {reason}");
                self.release(name, TaskState::Failed, reason);
                let event = self
                    .task_event(name, "task.failed", Severity::Error, message)
                    .with("reason", reason.to_string());
                self.emit(event);
            }
            "node_shutdown" | "lease_expired" | "node_drain" => {
                // The node is going away; place the task again elsewhere, after a tick, so
                // that nodes shutting down at the same moment have said they are draining.
                self.release(name, TaskState::Pending, "node_shutdown");
                let task = self.tasks.get_mut(name).expect("task exists");
                task.live.not_before = Some(Instant::now() + self.cfg.tick);
                self.pending.push_back(name.to_string());
            }
            _ => {
                self.release(name, TaskState::Stopped, &stop_reason);
                let event = self
                    .task_event(
                        name,
                        "task.stopped",
                        Severity::Info,
                        format!("stopped ({stop_reason})"),
                    )
                    .with("reason", stop_reason.clone());
                self.emit(event);
                self.resolve_task_incidents(name, "task stopped");
            }
        }
        self.touch(name);
        if !super::tree::living(self.tasks[name].state) {
            self.task_ended(name);
        }
    }

    /// Moves a task off its node into `state`, freeing its resources.
    fn release(&mut self, name: &str, state: TaskState, reason: &str) {
        let task = self.tasks.get_mut(name).expect("released task exists");
        let held = task.state.holds_node();
        task.set_state(state, reason);
        task.stop_reason.clear();
        task.live.current = None;
        let record = task.clone();
        if held {
            if let Some(node) = self.nodes.get_mut(&record.node) {
                node.reserve(&record, -1);
            }
            self.batch.place = true;
        }
        self.touch(name);
    }

    /// The attempt vanished with its node (lost or agent restarted): place the task again.
    pub(super) fn attempt_lost(&mut self, name: &str, reason: &str) {
        let Some(task) = self.tasks.get(name) else {
            return;
        };
        if !task.state.holds_node() {
            return;
        }
        if task.state == TaskState::Stopping {
            self.on_settled(name, task.attempt, "stopped", reason);
            return;
        }
        let mut ended = task.live.current.clone().unwrap_or_default();
        ended.task = name.to_string();
        ended.attempt = task.attempt;
        ended.node = task.node.clone();
        ended.ended_ms = now_ms();
        ended.end_reason = reason.to_string();
        self.batch.attempts.push(ended);
        let event = self
            .task_event(
                name,
                "task.restarting",
                Severity::Warning,
                format!("attempt lost ({reason}); placing again"),
            )
            .with("reason", reason);
        self.emit(event);
        self.release(name, TaskState::Pending, reason);
        self.tasks.get_mut(name).expect("task exists").restarts += 1;
        self.pending.push_back(name.to_string());
    }

    pub(super) fn on_report(&mut self, name: &str, attempt: u32, report: v1::Report, ts_ms: i64) {
        let sample = self.cfg.report_sample;
        let Some(task) = self.tasks.get_mut(name) else {
            return;
        };
        if attempt != task.attempt || !task.state.holds_node() {
            return;
        }
        let now = Instant::now();
        task.live.heartbeat = now;
        task.last_report_ms = ts_ms;
        if !report.message.is_empty() {
            task.message = report.message.clone();
        }
        for (k, v) in &report.metrics {
            task.metrics.insert(k.clone(), *v);
        }
        // A change of the child's state is written at once, unless the child flips its state
        // faster than the bucket allows; then it is sampled like any other report.
        let state_changed = !report.state.is_empty()
            && report.state != task.report_state
            && task.live.take_change(now);
        if !report.state.is_empty() {
            task.report_state = report.state.clone();
        }
        let progress_moved = match (&task.rules.health.progress_metric, task.live.progress) {
            (Some(metric), last) => match (report.metrics.get(metric), last) {
                (Some(&v), Some((prev, _))) if v > prev => Some(v),
                (Some(&v), None) => Some(v),
                _ => None,
            },
            _ => None,
        };
        if let Some(v) = progress_moved {
            task.live.progress = Some((v, now));
        }
        let due = task
            .live
            .sampled_at
            .is_none_or(|t| now.duration_since(t) >= sample);
        let mut sample_later = None;
        if state_changed || due {
            task.live.sampled_at = Some(now);
            task.live.unsampled = false;
        } else if !task.live.unsampled {
            // Skipped for now; the latest report still lands once the interval is over.
            task.live.unsampled = true;
            sample_later = task.live.sampled_at.map(|t| t + sample);
        }
        let nan = non_finite(&task.rules.health.nan_metrics, &report.metrics);
        self.touch(name);
        if let Some(at) = sample_later {
            self.schedule(at, super::Check::Sample, name);
        }

        if state_changed || due {
            let data_metrics = metrics_json(&report.metrics);
            let event = self
                .task_event(name, "task.report", Severity::Info, report.message.clone())
                .with("state", report.state.clone())
                .with("metrics", data_metrics)
                .with("coalesced", report.coalesced);
            self.emit(event);
        }
        if progress_moved.is_some() && self.tasks[name].state == TaskState::Stalled {
            self.tasks
                .get_mut(name)
                .expect("task exists")
                .set_state(TaskState::Running, "progress");
            self.resolve_incident(name, "", "progress_stalled", "progress resumed");
        }
        self.apply_child_state(name, &report.state);
        if let Some(metric) = nan {
            if self.tasks[name].state != TaskState::Stopping {
                self.metric_nan(name, &metric);
            }
        } else if let Some(message) = self.diverged(name, &report.metrics) {
            if self.tasks[name].state != TaskState::Stopping {
                let event = self
                    .task_event(name, "task.unhealthy", Severity::Error, message.clone())
                    .with("reason", "metric_diverged")
                    .with("metric", "loss")
                    .with("action", "stop");
                self.emit(event);
                self.open_incident(name, "", "metric_diverged", Severity::Error, &message);
                self.request_stop(name, "metric_diverged");
            }
        }
    }

    /// The child's word about itself moves the task's state.
    fn apply_child_state(&mut self, name: &str, child_state: &str) {
        let task = &self.tasks[name];
        if task.state == TaskState::Stopping || !task.state.holds_node() {
            return;
        }
        let next = match child_state {
            "running" | "starting" | "done" | "failed" if task.state == TaskState::Stalled => {
                return
            }
            "running" | "done" | "failed" => TaskState::Running,
            "starting" => TaskState::Running,
            "blocked" => TaskState::Blocked,
            "needs_help" => TaskState::NeedsHelp,
            _ => return,
        };
        let previous = task.state;
        if next != TaskState::NeedsHelp && !child_state.is_empty() {
            // Also after a restart: the new attempt says it is no longer stuck.
            self.resolve_incident(name, "", "needs_help", "task reports it is no longer stuck");
        }
        if previous == next {
            return;
        }
        let message = self.tasks[name].message.clone();
        self.tasks
            .get_mut(name)
            .expect("task exists")
            .set_state(next, "report");
        if next == TaskState::NeedsHelp {
            self.open_incident(
                name,
                "",
                "needs_help",
                Severity::Error,
                &format!("{name} needs help: {message}"),
            );
        }
    }

    fn metric_nan(&mut self, name: &str, metric: &str) {
        let value = self.tasks[name]
            .metrics
            .get(metric)
            .copied()
            .unwrap_or(f64::NAN);
        let message = format!("metric {metric} is {value}; stopping");
        let event = self
            .task_event(name, "task.unhealthy", Severity::Error, message.clone())
            .with("reason", "metric_nan")
            .with("metric", metric)
            .with("action", "stop");
        self.emit(event);
        self.open_incident(name, "", "metric_nan", Severity::Error, &message);
        self.request_stop(name, "metric_nan");
    }

    /// Asks the task's node to stop it; `reason` decides the final state on exit.
    pub(super) fn request_stop(&mut self, name: &str, reason: &str) {
        let task = self.tasks.get_mut(name).expect("stopped task exists");
        task.stop_reason = reason.to_string();
        task.set_state(TaskState::Stopping, reason);
        let node = task.node.clone();
        let stop = v1::StopTask {
            task: name.to_string(),
            reason: reason.to_string(),
            attempt: 0,
        };
        self.touch(name);
        self.command(&node, Action::Stop(stop));
    }

    pub(super) fn request_restart(&mut self, name: &str, reason: &str) {
        let node = self.tasks[name].node.clone();
        self.tasks
            .get_mut(name)
            .expect("task exists")
            .live
            .heartbeat = Instant::now();
        let restart = v1::RestartTask {
            task: name.to_string(),
            reason: reason.to_string(),
        };
        self.command(&node, Action::Restart(restart));
    }
}

/// Whether a stop for `reason` ends the task `stopped` (asked for by a person, a shutdown or
/// the tree); stops the controller decided for health end it `failed`.
pub(super) fn ends_stopped(reason: &str) -> bool {
    matches!(
        reason,
        "operator"
            | "shutdown"
            | "fenced"
            | "node_shutdown"
            | "lease_expired"
            | "node_drain"
            | "parent_ended"
            | ""
    )
}

/// The first watched metric that is NaN or infinite; an empty watch list watches all.
fn non_finite(
    watched: &[String],
    metrics: &std::collections::HashMap<String, f64>,
) -> Option<String> {
    let mut names: Vec<&String> = metrics
        .keys()
        .filter(|k| watched.is_empty() || watched.contains(k))
        .collect();
    names.sort();
    names
        .into_iter()
        .find(|k| !metrics[*k].is_finite())
        .cloned()
}
