//! Task trees: parent links, the limits a subtree puts on what is submitted into it, what
//! happens to children when their parent ends, subtree budgets and the restart intensity of
//! a subtree.
//!
//! A limit set on a task binds its whole subtree: a submission is checked against the
//! limits of every ancestor of the new task, so a descendant cannot loosen what an ancestor
//! set. `max_children` is inherited by value: each task's children are bounded by the
//! tightest `max_children` on its chain.

use std::time::{Duration, Instant};

use muster_proto::{duration, v1};

use super::{ApiError, Check, Core};
use crate::event::{now_ms, Severity};
use crate::model::TaskState;

/// Incident reason of a subtree whose restarts went over its intensity.
pub(super) const RESTART_INTENSITY: &str = "restart_intensity";

/// A task that can still have children: not ended, not given up on.
pub(super) fn living(state: TaskState) -> bool {
    !state.is_final() && state != TaskState::CrashLoop
}

fn refused(message: String) -> ApiError {
    ApiError::LimitReached(format!("submission refused: {message}"))
}

impl Core {
    /// The task's ancestors, its parent first.
    pub(super) fn ancestors(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut current = name;
        while let Some(task) = self.tasks.get(current) {
            if task.parent.is_empty() || out.len() > self.tasks.len() {
                break;
            }
            out.push(task.parent.clone());
            current = &task.parent;
        }
        out
    }

    /// Every task below `name`, parents before their children.
    pub(super) fn descendants(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![name];
        while let Some(next) = stack.pop() {
            if let Some(children) = self.children.get(next) {
                for child in children {
                    out.push(child.clone());
                    stack.push(child);
                }
            }
        }
        out
    }

    fn limits(&self, name: &str) -> Option<&v1::SubtreeLimits> {
        self.tasks.get(name).and_then(|t| t.spec.limits.as_ref())
    }

    /// Records a new parent link (at submission and when the model is loaded).
    pub(super) fn link(&mut self, child: &str, parent: &str) {
        if parent.is_empty() {
            return;
        }
        self.children
            .entry(parent.to_string())
            .or_default()
            .push(child.to_string());
        self.lineage.link(child, parent);
        *self
            .descendant_counts
            .entry(parent.to_string())
            .or_default() += 1;
        for ancestor in self.ancestors(parent) {
            *self.descendant_counts.entry(ancestor).or_default() += 1;
        }
    }

    /// The parent of tasks submitted by `caller`: the requested one, or the calling task
    /// itself. A task may submit only into its own subtree, and only under a living task.
    pub(super) fn parent_for(
        &self,
        requested: &str,
        scope: Option<&str>,
    ) -> Result<String, ApiError> {
        let parent = match scope {
            Some(task) if requested.is_empty() => task.to_string(),
            Some(task) if !self.lineage.within(requested, task) => {
                return Err(ApiError::PermissionDenied(format!(
                    "the token of task {task} may submit only into its own subtree, not under {requested}"
                )))
            }
            _ => requested.to_string(),
        };
        if parent.is_empty() {
            return Ok(parent);
        }
        let record = self
            .tasks
            .get(&parent)
            .ok_or_else(|| ApiError::NotFound(format!("parent task {parent} not found")))?;
        if !living(record.state) {
            return Err(ApiError::FailedPrecondition(format!(
                "parent task {parent} has ended ({}); it can have no new children",
                record.state.as_str()
            )));
        }
        Ok(parent)
    }

    /// Whether `adding` more children of `parent` fit every limit of its chain; the error
    /// names the limit, where it was set and how full it is.
    pub(super) fn check_limits(&self, parent: &str, adding: u32) -> Result<(), ApiError> {
        let mut chain = vec![parent.to_string()];
        chain.extend(self.ancestors(parent));
        // The tightest max_children on the chain bounds every task below it.
        let tightest_max_children = chain
            .iter()
            .filter_map(|a| {
                self.limits(a)
                    .and_then(|l| l.max_children)
                    .map(|max| (max, a))
            })
            .min();
        let batch = if adding > 1 {
            format!("; this submission adds {adding}")
        } else {
            String::new()
        };
        if let Some((max, holder)) = tightest_max_children {
            let have = self.children.get(parent).map_or(0, Vec::len) as u32;
            if have + adding > max {
                return Err(refused(format!(
                    "limit max_children = {max} (set on {holder}) reached: {parent} has {have} {}{batch}",
                    if have == 1 { "child" } else { "children" }
                )));
            }
        }
        let now = now_ms();
        for (distance, ancestor) in chain.iter().enumerate() {
            let Some(limits) = self.limits(ancestor) else {
                continue;
            };
            let depth = distance as u32 + 1;
            if let Some(max) = limits.max_depth {
                if depth > max {
                    return Err(refused(format!(
                        "limit max_depth = {max} of {ancestor} reached: a child of {parent} would be at depth {depth} below {ancestor}"
                    )));
                }
            }
            if let Some(max) = limits.max_descendants {
                let have = self.descendant_counts.get(ancestor).copied().unwrap_or(0);
                if have + adding > max {
                    return Err(refused(format!(
                        "limit max_descendants = {max} of {ancestor} reached: it has {have} descendants{batch}"
                    )));
                }
            }
            if let Some(max) = limits.max_running {
                let live = self
                    .descendants(ancestor)
                    .iter()
                    .filter(|d| self.tasks.get(*d).is_some_and(|t| living(t.state)))
                    .count() as u32;
                if live + adding > max {
                    return Err(refused(format!(
                        "limit max_running = {max} of {ancestor} reached: {live} of its descendants have not ended{batch}"
                    )));
                }
            }
            if let Ok(budget) = duration::parse(&limits.budget) {
                let created = self.tasks[ancestor].created_ms;
                if now >= created + budget.as_millis() as i64 {
                    return Err(refused(format!(
                        "limit budget = {} of {ancestor} is spent",
                        limits.budget
                    )));
                }
            }
        }
        Ok(())
    }

    /// Ends a task that is not running anything, or asks its node to stop it. `reason`
    /// decides its final state, as for any stop.
    pub(super) fn stop_one(&mut self, name: &str, reason: &str) {
        let Some(task) = self.tasks.get(name) else {
            return;
        };
        let state = task.state;
        if state.is_final() || state == TaskState::Stopping {
            return;
        }
        if state.holds_node() {
            self.request_stop(name, reason);
            return;
        }
        // Pending or in a crash loop: nothing runs, it ends here.
        self.pending.retain(|p| p != name);
        let (final_state, kind, severity, word) = if super::tasks::ends_stopped(reason) {
            (
                TaskState::Stopped,
                "task.stopped",
                Severity::Info,
                "stopped",
            )
        } else {
            (TaskState::Failed, "task.failed", Severity::Error, "failed")
        };
        let task = self.tasks.get_mut(name).expect("task exists");
        task.set_state(final_state, reason);
        task.stop_reason.clear();
        self.touch(name);
        let event = self
            .task_event(name, kind, severity, format!("{word} ({reason})"))
            .with("reason", reason);
        self.emit(event);
        self.resolve_task_incidents(name, "task ended");
        self.task_ended(name);
    }

    /// A task ended (or gave up in a crash loop): its children follow their parent-close
    /// policy, all the way down; a `keep` child and its subtree stay.
    pub(super) fn task_ended(&mut self, name: &str) {
        self.restart_times.remove(name);
        let mut stack = vec![name.to_string()];
        while let Some(next) = stack.pop() {
            let children = self.children.get(&next).cloned().unwrap_or_default();
            for child in children {
                let Some(task) = self.tasks.get(&child) else {
                    continue;
                };
                if task.spec.parent_close == "keep" {
                    continue;
                }
                self.stop_one(&child, "parent_ended");
                stack.push(child);
            }
        }
    }

    /// Counts an automatic restart of `name` against the restart intensity of every subtree
    /// it is in. Returns true when the task must not restart: a subtree it is in went over
    /// its intensity and its incident is open.
    pub(super) fn count_restart(&mut self, name: &str) -> bool {
        let now = Instant::now();
        let mut chain = vec![name.to_string()];
        chain.extend(self.ancestors(name));
        let mut tripped = None;
        for ancestor in &chain {
            let Some(limits) = self.limits(ancestor) else {
                continue;
            };
            let (Some(max), Ok(window)) =
                (limits.max_restarts, duration::parse(&limits.restart_window))
            else {
                continue;
            };
            let times = self.restart_times.entry(ancestor.clone()).or_default();
            times.push_back(now);
            while times
                .front()
                .is_some_and(|t| now.duration_since(*t) > window)
            {
                times.pop_front();
            }
            if times.len() as u32 > max && tripped.is_none() {
                tripped = Some((ancestor.clone(), times.len(), max, window));
            }
        }
        if let Some((ancestor, count, max, window)) = tripped {
            self.trip_intensity(&ancestor, count, max, window);
        }
        chain.iter().any(|a| self.intensity_open(a))
    }

    fn intensity_open(&self, name: &str) -> bool {
        self.open_incidents.contains_key(&(
            name.to_string(),
            String::new(),
            RESTART_INTENSITY.to_string(),
        ))
    }

    /// One incident on the subtree's root, and every task of the subtree waiting to restart
    /// is stopped instead.
    fn trip_intensity(&mut self, root: &str, count: usize, max: u32, window: Duration) {
        if self.intensity_open(root) {
            return;
        }
        let message = format!(
            "{count} restarts in the subtree of {root} within {}, more than limits.max_restarts = {max}: its tasks are not restarted until this incident is resolved",
            duration::format(window)
        );
        tracing::info!(
            task = root,
            restarts = count,
            "subtree restart intensity exceeded"
        );
        self.open_incident(root, "", RESTART_INTENSITY, Severity::Error, &message);
        let mut subtree = vec![root.to_string()];
        subtree.extend(self.descendants(root));
        for task in subtree {
            if self
                .tasks
                .get(&task)
                .is_some_and(|t| t.state == TaskState::Backoff)
            {
                self.request_stop(&task, RESTART_INTENSITY);
            }
        }
    }

    /// Arms the wall-clock budget of a task's subtree, if it has one.
    pub(super) fn schedule_budget(&mut self, name: &str) {
        let Some(task) = self.tasks.get(name) else {
            return;
        };
        let Some(budget) = task
            .spec
            .limits
            .as_ref()
            .and_then(|l| duration::parse(&l.budget).ok())
        else {
            return;
        };
        if task.state.is_final() {
            return;
        }
        let due_ms = task.created_ms + budget.as_millis() as i64;
        let wait = Duration::from_millis((due_ms - now_ms()).max(0) as u64);
        self.schedule(Instant::now() + wait, Check::Budget, name);
    }

    /// The budget of a subtree is spent: everything in it that still runs is stopped.
    pub(super) fn check_budget(&mut self, name: &str) {
        let Some(task) = self.tasks.get(name) else {
            return;
        };
        let budget = task
            .spec
            .limits
            .as_ref()
            .map(|l| l.budget.clone())
            .unwrap_or_default();
        let mut subtree = vec![name.to_string()];
        subtree.extend(self.descendants(name));
        let running: Vec<String> = subtree
            .into_iter()
            .filter(|t| self.tasks.get(t).is_some_and(|t| !t.state.is_final()))
            .collect();
        if running.is_empty() {
            return;
        }
        tracing::info!(task = name, tasks = running.len(), "subtree budget spent");
        let event = self
            .task_event(
                name,
                "task.unhealthy",
                Severity::Warning,
                format!(
                    "budget {budget} of the subtree is spent: stopping {} tasks",
                    running.len()
                ),
            )
            .with("reason", "budget")
            .with("tasks", running.len());
        self.emit(event);
        for task in running {
            self.stop_one(&task, "budget");
        }
    }

    /// A restart asked for by an operator acts on the subtree: running tasks restart, ended
    /// ones are placed again.
    pub(super) fn restart_one(&mut self, name: &str) {
        let Some(task) = self.tasks.get(name) else {
            return;
        };
        let state = task.state;
        if matches!(state, TaskState::Stopping | TaskState::Pending) {
            return;
        }
        self.resolve_task_incidents(name, "restarted by an operator");
        if state.holds_node() {
            // Running, or in backoff on its node: the node starts the next attempt now.
            self.request_restart(name, "operator");
        } else {
            // Final or crash loop: place it again, fresh.
            let task = self.tasks.get_mut(name).expect("task exists");
            task.set_state(TaskState::Pending, "operator");
            task.stop_reason.clear();
            self.touch(name);
            self.pending.push_back(name.to_string());
            self.batch.place = true;
            self.schedule_budget(name);
        }
    }
}
