//! The controller's in-memory model of the fleet: tasks, nodes and incidents.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use muster_proto::spec::Rules;
use muster_proto::v1;

use crate::event::now_ms;

/// A task's state, lowercase on every surface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    Pending,
    Starting,
    Running,
    Stalled,
    Blocked,
    NeedsHelp,
    Backoff,
    CrashLoop,
    Stopping,
    Succeeded,
    Failed,
    Stopped,
}

impl TaskState {
    pub const ALL: [TaskState; 12] = [
        TaskState::Pending,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Stalled,
        TaskState::Blocked,
        TaskState::NeedsHelp,
        TaskState::Backoff,
        TaskState::CrashLoop,
        TaskState::Stopping,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Stalled => "stalled",
            TaskState::Blocked => "blocked",
            TaskState::NeedsHelp => "needs_help",
            TaskState::Backoff => "backoff",
            TaskState::CrashLoop => "crash_loop",
            TaskState::Stopping => "stopping",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Nothing more happens to the task without an operator.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Stopped
        )
    }

    /// A process of the task is (or is about to be) on a node and holds its slots.
    pub fn holds_node(self) -> bool {
        matches!(
            self,
            TaskState::Starting
                | TaskState::Running
                | TaskState::Stalled
                | TaskState::Blocked
                | TaskState::NeedsHelp
                | TaskState::Backoff
                | TaskState::Stopping
        )
    }

    /// A live process reports for the task.
    pub fn is_alive(self) -> bool {
        matches!(
            self,
            TaskState::Running | TaskState::Stalled | TaskState::Blocked | TaskState::NeedsHelp
        )
    }
}

/// One task as the controller keeps it.
#[derive(Debug, Clone)]
pub struct TaskRecord {
    pub spec: v1::TaskSpec,
    pub rules: Rules,
    pub state: TaskState,
    /// The node of the current or last attempt.
    pub node: String,
    pub attempt: u32,
    pub parent: String,
    pub root: String,
    pub metrics: HashMap<String, f64>,
    pub message: String,
    pub reason: String,
    pub report_state: String,
    pub restarts: u32,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub last_report_ms: i64,
    /// Why the controller asked the task to stop; decides its final state.
    pub stop_reason: String,
    pub live: Live,
}

/// What only matters while this controller process runs.
#[derive(Debug, Clone)]
pub struct Live {
    pub current: Option<v1::Attempt>,
    /// Last status line (any line is a heartbeat), by this controller's clock.
    pub heartbeat: Instant,
    /// Last time the progress metric moved, and its value then.
    pub progress: Option<(f64, Instant)>,
    pub heartbeat_scheduled: bool,
    pub progress_scheduled: bool,
    /// Last report written to the inbox, for sampling.
    pub sampled_at: Option<Instant>,
    /// A report arrived since the last sampled one and is not in the inbox yet.
    pub unsampled: bool,
    /// When the node of the attempt was lost.
    pub lost_at: Option<Instant>,
    /// A pending task is not placed before this.
    pub not_before: Option<Instant>,
    /// Last output lines of the last attempt that ended, for notifications.
    pub log_tail: Vec<String>,
    /// Best loss seen and reports counted, for the `ml` pack's divergence rule.
    pub loss_best: Option<f64>,
    pub loss_reports: u32,
    /// Token bucket for reports that change the child's state: a burst of them reaches the
    /// inbox line for line, a child flipping its state faster than that is sampled.
    pub change_tokens: f64,
    pub change_refilled: Instant,
}

impl Live {
    const CHANGE_BURST: f64 = 20.0;
    const CHANGES_PER_SECOND: f64 = 2.0;

    /// Whether a report that changes the child's state may be written at once.
    pub fn take_change(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.change_refilled).as_secs_f64();
        self.change_tokens =
            (self.change_tokens + refill * Self::CHANGES_PER_SECOND).min(Self::CHANGE_BURST);
        self.change_refilled = now;
        if self.change_tokens >= 1.0 {
            self.change_tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl TaskRecord {
    pub fn new(spec: v1::TaskSpec, parent: String, root: String, created_ms: i64) -> TaskRecord {
        TaskRecord {
            rules: Rules::from_spec(&spec),
            root: if root.is_empty() {
                spec.name.clone()
            } else {
                root
            },
            spec,
            state: TaskState::Pending,
            node: String::new(),
            attempt: 0,
            parent,
            metrics: HashMap::new(),
            message: String::new(),
            reason: String::new(),
            report_state: String::new(),
            restarts: 0,
            created_ms,
            updated_ms: created_ms,
            last_report_ms: 0,
            stop_reason: String::new(),
            live: Live {
                current: None,
                heartbeat: Instant::now(),
                progress: None,
                heartbeat_scheduled: false,
                progress_scheduled: false,
                sampled_at: None,
                unsampled: false,
                lost_at: None,
                not_before: None,
                log_tail: Vec::new(),
                loss_best: None,
                loss_reports: 0,
                change_tokens: Live::CHANGE_BURST,
                change_refilled: Instant::now(),
            },
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn slots(&self) -> u32 {
        self.rules.slots
    }

    pub fn to_proto(&self) -> v1::Task {
        v1::Task {
            spec: Some(self.spec.clone()),
            state: self.state.as_str().to_string(),
            node: self.node.clone(),
            attempt: self.attempt,
            parent: self.parent.clone(),
            root: self.root.clone(),
            metrics: self.metrics.clone(),
            message: self.message.clone(),
            reason: self.reason.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            restarts: self.restarts,
            report_state: self.report_state.clone(),
            last_report_ms: self.last_report_ms,
            attempts: Vec::new(),
        }
    }

    pub fn set_state(&mut self, state: TaskState, reason: &str) {
        self.state = state;
        self.reason = reason.to_string();
        self.updated_ms = now_ms();
    }
}

/// A node's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Ready,
    Suspect,
    Lost,
    /// Shutting down: keeps its session, takes no new task.
    Draining,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Suspect => "suspect",
            NodeState::Lost => "lost",
            NodeState::Draining => "draining",
        }
    }
}

/// What the store remembers of a node across controller restarts.
#[derive(Debug, Clone, Default)]
pub struct NodeMemory {
    pub instance: String,
    pub acked_seq: u64,
}

/// A connected (or once connected) node.
pub struct NodeRecord {
    pub name: String,
    pub state: NodeState,
    pub capacity: v1::Capacity,
    pub used: v1::Capacity,
    pub labels: HashMap<String, String>,
    pub version: String,
    pub memory: NodeMemory,
    pub last_seen: Instant,
    pub last_seen_ms: i64,
    pub session: Option<crate::core::SessionHandle>,
    pub tasks: HashSet<String>,
    /// Times the node came back after being lost, for damping a flapping node.
    pub returns: std::collections::VecDeque<Instant>,
    /// A flapping node takes no new task before this.
    pub damped_until: Option<Instant>,
    /// An operator said: place nothing more here.
    pub cordoned: bool,
}

impl NodeRecord {
    /// A node known from the store, not yet heard from by this controller process: it has
    /// one node_timeout to reconnect.
    pub fn restored(name: String) -> NodeRecord {
        NodeRecord {
            name,
            state: NodeState::Suspect,
            capacity: v1::Capacity::default(),
            used: v1::Capacity::default(),
            labels: HashMap::new(),
            version: String::new(),
            memory: NodeMemory::default(),
            last_seen: Instant::now(),
            last_seen_ms: now_ms(),
            session: None,
            tasks: HashSet::new(),
            returns: Default::default(),
            damped_until: None,
            cordoned: false,
        }
    }

    pub fn to_proto(&self) -> v1::Node {
        v1::Node {
            name: self.name.clone(),
            state: if self.cordoned && self.state == NodeState::Ready {
                "cordoned".into()
            } else {
                self.state.as_str().to_string()
            },
            capacity: Some(self.capacity),
            used: Some(self.used),
            labels: self.labels.clone(),
            version: self.version.clone(),
            last_seen_ms: self.last_seen_ms,
            tasks: self.tasks.len() as u32,
        }
    }

    pub fn free_slots(&self) -> u32 {
        self.capacity.slots.saturating_sub(self.used.slots)
    }

    /// Whether a task fits here now.
    pub fn fits(&self, task: &TaskRecord) -> bool {
        let res = task.spec.resources.unwrap_or_default();
        let labels_match = task
            .spec
            .placement
            .as_ref()
            .is_none_or(|p| p.labels.iter().all(|(k, v)| self.labels.get(k) == Some(v)));
        self.state == NodeState::Ready
            && self.session.is_some()
            && self.damped_until.is_none_or(|t| t <= Instant::now())
            && !self.cordoned
            && labels_match
            && self.free_slots() >= task.slots()
            && self.capacity.gpus.saturating_sub(self.used.gpus) >= res.gpus
            && self.capacity.memory_mb.saturating_sub(self.used.memory_mb) >= res.memory_mb
    }

    pub fn reserve(&mut self, task: &TaskRecord, sign: i64) {
        let res = task.spec.resources.unwrap_or_default();
        let apply = |used: u64, n: u64| {
            if sign > 0 {
                used + n
            } else {
                used.saturating_sub(n)
            }
        };
        self.used.slots = apply(u64::from(self.used.slots), u64::from(task.slots())) as u32;
        self.used.gpus = apply(u64::from(self.used.gpus), u64::from(res.gpus)) as u32;
        self.used.memory_mb = apply(self.used.memory_mb, res.memory_mb);
        if sign > 0 {
            self.tasks.insert(task.name().to_string());
        } else {
            self.tasks.remove(task.name());
        }
    }
}

/// Something that needs a person.
#[derive(Debug, Clone)]
pub struct Incident {
    pub id: u64,
    pub task: String,
    pub node: String,
    pub reason: String,
    /// open, acked, resolved
    pub state: String,
    pub severity: String,
    pub message: String,
    pub opened_ms: i64,
    pub updated_ms: i64,
    pub resolved_ms: i64,
    /// Unix ms when an incident held for the task's parent goes to people unless the
    /// parent acknowledged it; 0 when it is not held (any more).
    pub escalate_ms: i64,
}

impl Incident {
    pub fn to_proto(&self) -> v1::Incident {
        v1::Incident {
            id: self.id,
            task: self.task.clone(),
            node: self.node.clone(),
            reason: self.reason.clone(),
            state: self.state.clone(),
            severity: self.severity.clone(),
            message: self.message.clone(),
            opened_ms: self.opened_ms,
            updated_ms: self.updated_ms,
            resolved_ms: self.resolved_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_changes_pass_in_a_burst_then_at_the_refill_rate() {
        let spec = v1::TaskSpec {
            name: "flip".into(),
            command: vec!["true".into()],
            ..Default::default()
        };
        let mut task = TaskRecord::new(spec, String::new(), String::new(), 0);
        let start = task.live.change_refilled;
        let passed = (0..100).filter(|_| task.live.take_change(start)).count();
        assert_eq!(passed, 20);
        // Two a second come back.
        let later = start + std::time::Duration::from_secs(1);
        let passed = (0..100).filter(|_| task.live.take_change(later)).count();
        assert_eq!(passed, 2);
    }
}
