//! Health deadlines: heartbeat timeout, progress stall and re-placement after node loss.
//!
//! Each task has at most one pending deadline per check. A popped deadline is compared
//! with the task's current state and pushed again at its true due time if the task moved
//! meanwhile, so the cost per tick follows the deadlines that come due, not the number of
//! tasks, and a report costs no heap operation at all.

use std::cmp::Reverse;
use std::time::Instant;

use super::{Check, Core};
use crate::event::Severity;
use crate::model::TaskState;

impl Core {
    /// Arms the health checks of a task that just started (or was loaded running).
    pub(super) fn schedule_health(&mut self, name: &str) {
        let Some(task) = self.tasks.get_mut(name) else {
            return;
        };
        let now = Instant::now();
        task.live.heartbeat = now;
        let mut arm = Vec::new();
        if let Some(timeout) = task.rules.health.heartbeat_timeout {
            if !task.live.heartbeat_scheduled {
                task.live.heartbeat_scheduled = true;
                arm.push((now + timeout, Check::Heartbeat));
            }
        }
        if let Some(timeout) = task.rules.health.progress_timeout {
            if !task.live.progress_scheduled {
                task.live.progress_scheduled = true;
                arm.push((now + timeout, Check::Progress));
            }
        }
        for (at, check) in arm {
            self.schedule(at, check, name);
        }
    }

    pub(super) fn run_deadlines(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, _, _))) = self.deadlines.peek() {
            if *at > now {
                break;
            }
            let Reverse((_, check, name)) = self.deadlines.pop().expect("peeked deadline");
            match check {
                Check::Heartbeat => self.check_heartbeat(&name, now),
                Check::Progress => self.check_progress(&name, now),
                Check::Reschedule => self.check_reschedule(&name),
                Check::Sample => self.write_latest_report(&name),
                Check::Budget => self.check_budget(&name),
            }
        }
    }

    fn check_heartbeat(&mut self, name: &str, now: Instant) {
        let Some(task) = self.tasks.get_mut(name) else {
            return;
        };
        let Some(timeout) = task
            .rules
            .health
            .heartbeat_timeout
            .filter(|_| task.state.holds_node())
        else {
            task.live.heartbeat_scheduled = false;
            return;
        };
        let due = task.live.heartbeat + timeout;
        if due > now || !task.state.is_alive() || task.live.lost_at.is_some() {
            // Not silent long enough, or not in a state that reports: look again later.
            let again = if due > now { due } else { now + timeout };
            self.schedule(again, Check::Heartbeat, name);
            return;
        }
        let silent = now.duration_since(task.live.heartbeat).as_secs();
        let blocked = matches!(task.state, TaskState::Blocked | TaskState::NeedsHelp);
        let never_restart = blocked && task.rules.health.flags.never_restart_blocked;
        let state = task.state;
        if never_restart || self.is_held(name) {
            // The child said it waits on someone, or a person holds it: tell, do not restart.
            self.tasks
                .get_mut(name)
                .expect("task exists")
                .live
                .heartbeat = now;
            self.schedule(now + timeout, Check::Heartbeat, name);
            let message = format!(
                "no status line for {silent}s while {}; not restarting",
                state.as_str()
            );
            let event = self
                .task_event(name, "task.unhealthy", Severity::Warning, message.clone())
                .with("reason", "heartbeat_timeout")
                .with("silent_s", silent)
                .with("action", "escalate");
            self.emit(event);
            self.open_incident(name, "", "heartbeat_timeout", Severity::Warning, &message);
            return;
        }

        self.tasks
            .get_mut(name)
            .expect("task exists")
            .live
            .heartbeat = now;
        self.schedule(now + timeout, Check::Heartbeat, name);

        let message = format!(
            "no status line for {silent}s (heartbeat_timeout {}s); restarting",
            timeout.as_secs()
        );
        let event = self
            .task_event(name, "task.unhealthy", Severity::Warning, message)
            .with("reason", "heartbeat_timeout")
            .with("silent_s", silent)
            .with("action", "restart");
        self.emit(event);
        self.request_restart(name, "heartbeat_timeout");
    }

    fn check_progress(&mut self, name: &str, now: Instant) {
        let Some(task) = self.tasks.get_mut(name) else {
            return;
        };
        let Some(timeout) = task
            .rules
            .health
            .progress_timeout
            .filter(|_| task.state.holds_node())
        else {
            task.live.progress_scheduled = false;
            return;
        };
        let since = task.live.progress.map_or(task.live.heartbeat, |(_, t)| t);
        let due = since + timeout;
        if due > now || task.state != TaskState::Running {
            self.schedule(
                if due > now { due } else { now + timeout },
                Check::Progress,
                name,
            );
            return;
        }
        let metric = task
            .rules
            .health
            .progress_metric
            .clone()
            .unwrap_or_default();
        task.set_state(TaskState::Stalled, "progress_stalled");
        self.touch(name);
        self.schedule(now + timeout, Check::Progress, name);

        let message = format!(
            "{metric} has not advanced for {}s",
            now.duration_since(since).as_secs()
        );
        let event = self
            .task_event(name, "task.unhealthy", Severity::Warning, message.clone())
            .with("reason", "progress_stalled")
            .with("metric", metric)
            .with("action", "escalate");
        self.emit(event);
        self.open_incident(name, "", "progress_stalled", Severity::Warning, &message);
    }

    fn write_latest_report(&mut self, name: &str) {
        let Some(task) = self.tasks.get_mut(name) else {
            return;
        };
        if !task.live.unsampled || !task.state.holds_node() {
            return;
        }
        task.live.unsampled = false;
        task.live.sampled_at = Some(Instant::now());
        let (message, state, metrics) = (
            task.message.clone(),
            task.report_state.clone(),
            crate::event::metrics_json(&task.metrics),
        );
        let event = self
            .task_event(name, "task.report", Severity::Info, message)
            .with("state", state)
            .with("metrics", metrics)
            .with("latest", true);
        self.emit(event);
    }

    fn check_reschedule(&mut self, name: &str) {
        let Some(task) = self.tasks.get(name) else {
            return;
        };
        let node_lost = self
            .nodes
            .get(&task.node)
            .is_none_or(|n| n.state == crate::model::NodeState::Lost);
        if task.live.lost_at.is_some() && node_lost && task.state.holds_node() {
            self.attempt_lost(name, "node_lost");
        }
    }
}
