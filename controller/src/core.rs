//! The controller's core: one thread that owns the fleet model and applies every input in
//! batches. A batch's events are appended to the inbox and fsynced, and its state changes
//! committed to SQLite, before any command, ack or reply of that batch leaves (group
//! commit: an event is on disk before the controller acts on it).

mod alerts;
mod api;
mod health;
mod incidents;
mod metrics;
mod nodes;
mod rules;
mod tasks;
mod tree;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use muster_proto::v1;

use crate::event::{now_ms, Event, Severity};
use crate::inbox::Inbox;
use crate::model::{Incident, NodeRecord, TaskRecord, TaskState};
use crate::store::{Changes, Store};

pub use alerts::{Delivery, Group};
pub use api::{ApiError, Reply, Request};

/// Timings of the controller loop.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub tick: Duration,
    pub heartbeat_interval: Duration,
    /// A node silent this long is lost (suspect after half of it).
    pub node_timeout: Duration,
    /// How long after its node was lost a task is placed elsewhere.
    pub reschedule_after: Duration,
    /// A node out of contact this long stops its tasks (unless they say keep); replacements
    /// are placed only after it, plus their grace.
    pub lease: Duration,
    /// At most one unchanged-state report per task per this interval reaches the inbox.
    pub report_sample: Duration,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            tick: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(1),
            node_timeout: Duration::from_secs(5),
            reschedule_after: Duration::from_secs(10),
            lease: Duration::from_secs(60),
            report_sample: Duration::from_secs(10),
        }
    }
}

/// The sending side of a node's session stream.
#[derive(Clone)]
pub struct SessionHandle {
    pub id: u64,
    pub tx: tokio::sync::mpsc::Sender<Result<v1::ControllerMessage, tonic::Status>>,
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionHandle({})", self.id)
    }
}

/// Everything the core reacts to.
pub enum Input {
    Hello {
        session: SessionHandle,
        hello: v1::Hello,
    },
    Batch {
        session_id: u64,
        node: String,
        batch: v1::NodeBatch,
    },
    Closed {
        session_id: u64,
        node: String,
    },
    Request(Request),
    AlertAttempt(crate::alert::deliver::Attempted),
    /// Inbox lines a task's `MUSTER_INBOX` file missed while its node was away, read off
    /// the core thread.
    Replayed {
        session_id: u64,
        node: String,
        task: String,
        lines: Vec<String>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// A cheap handle to send inputs to the core.
#[derive(Clone)]
pub struct CoreHandle {
    tx: mpsc::Sender<Input>,
}

impl CoreHandle {
    /// A channel to the core; the core runs once [`Core::spawn`] is given the receiver.
    pub fn channel() -> (CoreHandle, mpsc::Receiver<Input>) {
        let (tx, rx) = mpsc::channel();
        (CoreHandle { tx }, rx)
    }

    pub fn send(&self, input: Input) -> bool {
        self.tx.send(input).is_ok()
    }
}

impl crate::alert::deliver::Report for CoreHandle {
    fn report(&self, attempted: crate::alert::deliver::Attempted) {
        self.send(Input::AlertAttempt(attempted));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Check {
    Heartbeat,
    Progress,
    Reschedule,
    /// Write the latest report of a task whose reports were skipped by sampling.
    Sample,
    /// The wall-clock budget of a task's subtree is due.
    Budget,
}

/// What one batch produced, released only after it is durable.
#[derive(Default)]
struct Batch {
    events: Vec<Event>,
    dirty_tasks: HashSet<String>,
    attempts: Vec<v1::Attempt>,
    incidents: Vec<Incident>,
    nodes: HashSet<String>,
    meta: Vec<(&'static str, i64)>,
    sends: Vec<(SessionHandle, v1::ControllerMessage)>,
    after: Vec<Box<dyn FnOnce() + Send>>,
    acks: HashMap<String, u64>,
    place: bool,
    groups: Vec<Group>,
    deliveries: Vec<Delivery>,
    notices: Vec<crate::alert::Notice>,
    cordons: Vec<(String, bool)>,
}

pub struct Core {
    cfg: CoreConfig,
    store: Store,
    inbox: Arc<Inbox>,
    tasks: HashMap<String, TaskRecord>,
    nodes: HashMap<String, NodeRecord>,
    incidents: HashMap<u64, Incident>,
    open_incidents: HashMap<(String, String, String), u64>,
    pending: VecDeque<String>,
    deadlines: BinaryHeap<Reverse<(Instant, Check, String)>>,
    next_incident: u64,
    epoch: u64,
    next_command: u64,
    next_log_request: u64,
    log_waiters: HashMap<u64, Reply<v1::LogChunk>>,
    node_memory: HashMap<String, crate::model::NodeMemory>,
    batch: Batch,
    alert_config: crate::config::Alerts,
    alerts: alerts::Alerting,
    metrics: metrics::Counters,
    /// Set while most nodes are silent at once: the controller's own network is suspect.
    partition_since: Option<Instant>,
    /// Recently resolved incidents, for `incidents --all` and repeated resolves.
    resolved: std::collections::BTreeMap<u64, Incident>,
    /// Children of each task, oldest first.
    children: HashMap<String, Vec<String>>,
    /// Tasks ever created below each task.
    descendant_counts: HashMap<String, u32>,
    /// Recent automatic restarts in the subtree of each task with a restart intensity.
    restart_times: HashMap<String, VecDeque<Instant>>,
    /// Parent links shared with the API edge.
    lineage: Arc<crate::lineage::Lineage>,
    /// Signs the tokens tasks get as MUSTER_TOKEN.
    task_key: Option<crate::auth::TaskKey>,
    /// Replays of `MUSTER_INBOX` files in flight, by (session, task), with the live lines
    /// held back until the replay is sent, so the file stays in seq order.
    replays: HashMap<(u64, String), Vec<String>>,
    /// The core's own input, for work done on other threads.
    handle: Option<CoreHandle>,
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Inbox(#[from] crate::inbox::InboxError),
}

impl Core {
    /// Loads the model from the store. Tasks that were on nodes stay as they were: their
    /// nodes reconnect and reconcile, so a controller restart restarts no healthy child.
    pub fn open(
        cfg: CoreConfig,
        alert_config: crate::config::Alerts,
        store: Store,
        inbox: Arc<Inbox>,
    ) -> Result<Core, CoreError> {
        let loaded = store.load()?;
        // Events the database has but the inbox lost in a crash between the two writes.
        let missing = store.events_after(inbox.last_seq())?;
        if !missing.is_empty() {
            tracing::warn!(
                events = missing.len(),
                "restoring inbox events committed before a crash"
            );
            inbox.append(&missing)?;
        }
        let mut core = Core {
            cfg,
            inbox,
            tasks: HashMap::new(),
            nodes: HashMap::new(),
            incidents: HashMap::new(),
            open_incidents: HashMap::new(),
            pending: VecDeque::new(),
            deadlines: BinaryHeap::new(),
            next_incident: loaded
                .meta
                .get("next_incident")
                .copied()
                .unwrap_or(1)
                .max(1) as u64,
            epoch: loaded.meta.get("epoch").copied().unwrap_or(0) as u64,
            next_command: 1,
            next_log_request: 1,
            log_waiters: HashMap::new(),
            node_memory: loaded.nodes,
            batch: Batch::default(),
            alert_config,
            alerts: alerts::Alerting::default(),
            resolved: Default::default(),
            partition_since: None,
            metrics: metrics::Counters::default(),
            children: HashMap::new(),
            descendant_counts: HashMap::new(),
            restart_times: HashMap::new(),
            lineage: Arc::default(),
            task_key: None,
            replays: HashMap::new(),
            handle: None,
            store,
        };
        for mut task in loaded.tasks {
            task.live.current = core.store.attempt(task.name(), task.attempt)?;
            if task.state == TaskState::Pending {
                core.pending.push_back(task.name().to_string());
            }
            core.tasks.insert(task.name().to_string(), task);
        }
        let mut links: Vec<(i64, String, String)> = core
            .tasks
            .values()
            .filter(|t| !t.parent.is_empty())
            .map(|t| (t.created_ms, t.name().to_string(), t.parent.clone()))
            .collect();
        links.sort();
        for (_, child, parent) in links {
            core.link(&child, &parent);
        }
        let budgeted: Vec<String> = core
            .tasks
            .values()
            .filter(|t| t.spec.limits.as_ref().is_some_and(|l| !l.budget.is_empty()))
            .map(|t| t.name().to_string())
            .collect();
        for name in budgeted {
            core.schedule_budget(&name);
        }
        let max_group = loaded.meta.get("max_group").copied().unwrap_or(0) as u64;
        let max_delivery = loaded.meta.get("max_delivery").copied().unwrap_or(0) as u64;
        core.alerts
            .restore(loaded.groups, loaded.deliveries, max_group, max_delivery);
        for incident in loaded.incidents {
            core.next_incident = core.next_incident.max(incident.id + 1);
            if incident.state == "resolved" {
                core.resolved.insert(incident.id, incident);
                continue;
            }
            core.open_incidents.insert(
                (
                    incident.task.clone(),
                    incident.node.clone(),
                    incident.reason.clone(),
                ),
                incident.id,
            );
            core.incidents.insert(incident.id, incident);
        }
        for name in core.store.cordoned()? {
            core.nodes
                .entry(name.clone())
                .or_insert_with(|| NodeRecord::restored(name))
                .cordoned = true;
        }
        // Nodes that held tasks get one node_timeout to reconnect before their tasks are
        // treated as lost.
        let names: Vec<String> = core
            .tasks
            .values()
            .filter(|t| t.state.holds_node())
            .map(|t| t.node.clone())
            .collect();
        for name in names {
            core.nodes
                .entry(name.clone())
                .or_insert_with(|| NodeRecord::restored(name));
        }
        let held: Vec<(String, String)> = core
            .tasks
            .values()
            .filter(|t| t.state.holds_node())
            .map(|t| (t.node.clone(), t.name().to_string()))
            .collect();
        for (node, task) in held {
            let record = core.tasks.get(&task).expect("task just listed").clone();
            if let Some(n) = core.nodes.get_mut(&node) {
                n.reserve(&record, 1);
            }
            core.schedule_health(&task);
        }
        tracing::info!(
            tasks = core.tasks.len(),
            incidents = core.incidents.len(),
            last_seq = core.inbox.last_seq(),
            "state loaded"
        );
        Ok(core)
    }

    /// Gives the core the key that signs task tokens.
    pub fn with_task_key(mut self, key: crate::auth::TaskKey) -> Core {
        self.task_key = Some(key);
        self
    }

    /// Gives the core a handle to its own input, for work it hands to other threads.
    pub fn attach_handle(&mut self, handle: CoreHandle) {
        self.handle = Some(handle);
    }

    /// The parent links, for the API edge.
    pub fn lineage(&self) -> Arc<crate::lineage::Lineage> {
        self.lineage.clone()
    }

    /// Starts the core on its own thread, reading `rx` (from [`CoreHandle::channel`]).
    pub fn spawn(self, rx: mpsc::Receiver<Input>) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("core".into())
            .spawn(move || self.run(rx))
            .expect("spawning the core thread")
    }

    fn run(mut self, rx: mpsc::Receiver<Input>) {
        let mut next_tick = Instant::now() + self.cfg.tick;
        loop {
            let mut wake = next_tick;
            if let Some(ms) = self.alert_deadline_ms() {
                let until = Duration::from_millis((ms - now_ms()).max(0) as u64);
                wake = wake.min(Instant::now() + until);
            }
            let wait = wake.saturating_duration_since(Instant::now());
            let mut inputs = Vec::new();
            match rx.recv_timeout(wait) {
                Ok(input) => inputs.push(input),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while inputs.len() < 4096 {
                match rx.try_recv() {
                    Ok(input) => inputs.push(input),
                    Err(_) => break,
                }
            }

            let mut shutdown = None;
            for input in inputs {
                match input {
                    Input::Shutdown(done) => shutdown = Some(done),
                    other => self.handle(other),
                }
            }
            if Instant::now() >= next_tick {
                self.tick();
                self.alert_tick();
                next_tick = Instant::now() + self.cfg.tick;
            } else if self.alert_deadline_ms().is_some_and(|ms| ms <= now_ms()) {
                self.alert_tick();
            }
            if self.batch.place {
                self.place_pending();
            }
            if let Err(e) = self.commit() {
                // Without durable state the controller must not act: stop here and let the
                // supervisor of this process restart it.
                tracing::error!(error = %e, "cannot persist state; controller core stops");
                std::process::exit(1);
            }
            if let Some(done) = shutdown {
                tracing::info!("core stopped");
                let _ = done.send(());
                return;
            }
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Hello { session, hello } => self.on_hello(session, hello),
            Input::Batch {
                session_id,
                node,
                batch,
            } => self.on_batch(session_id, &node, batch),
            Input::Closed { session_id, node } => self.on_closed(session_id, &node),
            Input::Request(request) => self.on_request(request),
            Input::AlertAttempt(attempted) => self.on_alert_attempt(attempted),
            Input::Replayed {
                session_id,
                node,
                task,
                lines,
            } => self.on_replayed(session_id, &node, &task, lines),
            Input::Shutdown(_) => {}
        }
    }

    /// Group commit: inbox first (fsync), then the database, then everything the batch
    /// decided to do.
    fn commit(&mut self) -> Result<(), CoreError> {
        let mut batch = std::mem::take(&mut self.batch);
        self.inbox.number(&mut batch.events);
        let changes = Changes {
            tasks: batch
                .dirty_tasks
                .iter()
                .filter_map(|n| self.tasks.get(n))
                .cloned()
                .collect(),
            attempts: batch.attempts,
            incidents: batch.incidents,
            nodes: batch
                .nodes
                .iter()
                .filter_map(|n| self.nodes.get(n).map(|r| (n.clone(), r.memory.clone())))
                .collect(),
            meta: batch.meta,
            groups: batch.groups,
            deliveries: batch.deliveries,
            events: &batch.events,
            cordons: batch.cordons,
        };
        // The events are durable in the database with the state they explain, then in the
        // inbox; a crash between the two is mended at start from the database.
        self.store.commit(&changes)?;
        let appending = Instant::now();
        self.inbox.append(&batch.events)?;
        if !batch.events.is_empty() {
            self.metrics
                .inbox_append
                .observe(appending.elapsed().as_secs_f64());
            self.metrics.events += batch.events.len() as u64;
        }
        self.deliver_to_ancestors(&batch.events);
        self.inbox.publish(batch.events);
        for notice in batch.notices {
            match self.alerts.queues.get(&notice.dest) {
                Some(queue) => {
                    let _ = queue.send(notice);
                }
                None => tracing::warn!(
                    dest = notice.dest.as_str(),
                    "no delivery worker for a notification"
                ),
            }
        }

        for (session, message) in batch.sends {
            self.send_now(&session, message);
        }
        for (node, through) in batch.acks {
            if let Some(session) = self.nodes.get(&node).and_then(|n| n.session.clone()) {
                self.send_now(
                    &session,
                    v1::ControllerMessage {
                        body: Some(v1::controller_message::Body::Ack(v1::Ack {
                            through_seq: through,
                        })),
                    },
                );
            }
        }
        for action in batch.after {
            action();
        }
        Ok(())
    }

    /// Copies each event about a task in a tree to the nodes running the task's ancestors,
    /// for their `$MUSTER_INBOX` files. A node that is away catches up when it reconnects
    /// (`replay_task_inboxes`).
    fn deliver_to_ancestors(&mut self, events: &[Event]) {
        let mut lines: HashMap<(String, String), Vec<String>> = HashMap::new();
        for event in events.iter().filter(|e| !e.parent.is_empty()) {
            let mut line = None;
            for ancestor in self.ancestors(&event.task) {
                let Some(t) = self.tasks.get(&ancestor) else {
                    continue;
                };
                if !t.state.holds_node() || t.node.is_empty() {
                    continue;
                }
                let line = line
                    .get_or_insert_with(|| serde_json::to_string(event).expect("events serialize"));
                lines
                    .entry((t.node.clone(), ancestor))
                    .or_default()
                    .push(line.clone());
            }
        }
        for ((node, task), lines) in lines {
            let Some(session) = self.nodes.get(&node).and_then(|n| n.session.clone()) else {
                continue;
            };
            if let Some(held) = self.replays.get_mut(&(session.id, task.clone())) {
                held.extend(lines);
                continue;
            }
            self.send_now(&session, deliver(task, lines));
        }
    }

    /// After a node's (re)connect: reads, off the core thread, what each task's
    /// `MUSTER_INBOX` file missed, from the seq the node says the file ends at.
    fn replay_task_inboxes(&mut self, session: &SessionHandle, node: &str, hello: &v1::Hello) {
        let Some(handle) = self.handle.clone() else {
            return;
        };
        let last = self.inbox.last_seq();
        for attempt in &hello.attempts {
            // A file that never got a line has no known start; a task with no child has
            // nothing to catch up on.
            if attempt.inbox_seq == 0
                || attempt.inbox_seq >= last
                || !self.children.contains_key(&attempt.task)
            {
                continue;
            }
            let task = attempt.task.clone();
            self.replays.insert((session.id, task.clone()), Vec::new());
            let (inbox, lineage) = (self.inbox.clone(), self.lineage.clone());
            let (from, session_id, node) = (attempt.inbox_seq + 1, session.id, node.to_string());
            let handle = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("inbox-replay".into())
                .spawn(move || {
                    let lines = match inbox.read(from, REPLAY_LIMIT, |e| {
                        !e.task.is_empty() && lineage.below(&e.task, &task)
                    }) {
                        Ok(events) => events
                            .iter()
                            .map(|e| serde_json::to_string(e).expect("events serialize"))
                            .collect(),
                        Err(e) => {
                            tracing::warn!(task = %task, error = %e, "cannot read the inbox to catch a task's inbox file up");
                            Vec::new()
                        }
                    };
                    handle.send(Input::Replayed {
                        session_id,
                        node,
                        task,
                        lines,
                    });
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start an inbox replay");
                self.replays.remove(&(session.id, attempt.task.clone()));
            }
        }
    }

    /// Sends a replay, then the live lines held back meanwhile (the node skips repeats).
    fn on_replayed(&mut self, session_id: u64, node: &str, task: &str, lines: Vec<String>) {
        let held = self
            .replays
            .remove(&(session_id, task.to_string()))
            .unwrap_or_default();
        let Some(session) = self
            .nodes
            .get(node)
            .and_then(|n| n.session.clone())
            .filter(|s| s.id == session_id)
        else {
            return;
        };
        tracing::debug!(
            task,
            replayed = lines.len(),
            held = held.len(),
            "task inbox file caught up"
        );
        for batch in [lines, held] {
            if !batch.is_empty() {
                self.batch
                    .sends
                    .push((session.clone(), deliver(task.to_string(), batch)));
            }
        }
    }

    fn send_now(&mut self, session: &SessionHandle, message: v1::ControllerMessage) {
        if session.tx.try_send(Ok(message)).is_err() {
            // A session that cannot keep up is dropped; the node reconnects and reconciles.
            tracing::warn!(
                session = session.id,
                "node session is not keeping up; closing it"
            );
            for node in self.nodes.values_mut() {
                if node.session.as_ref().is_some_and(|s| s.id == session.id) {
                    node.session = None;
                }
            }
        }
    }

    /// Queues a message to a node's current session, sent after the batch commits.
    fn send_to(&mut self, node: &str, message: v1::ControllerMessage) -> bool {
        match self.nodes.get(node).and_then(|n| n.session.clone()) {
            Some(session) => {
                self.batch.sends.push((session, message));
                true
            }
            None => false,
        }
    }

    fn command(&mut self, node: &str, action: v1::command::Action) -> bool {
        let id = self.next_command;
        self.next_command += 1;
        let message = v1::ControllerMessage {
            body: Some(v1::controller_message::Body::Command(v1::Command {
                id,
                action: Some(action),
            })),
        };
        self.send_to(node, message)
    }

    fn emit(&mut self, event: Event) {
        self.batch.events.push(event);
    }

    /// An event about a task, carrying its node, attempt and lineage.
    fn task_event(
        &self,
        task: &str,
        kind: &str,
        severity: Severity,
        message: impl Into<String>,
    ) -> Event {
        let mut event = Event::new(kind, severity, message);
        event.task = task.to_string();
        if let Some(t) = self.tasks.get(task) {
            event.node = t.node.clone();
            event.attempt = t.attempt;
            if !t.parent.is_empty() {
                event.parent = t.parent.clone();
                event.root = t.root.clone();
            }
        }
        event
    }

    fn touch(&mut self, task: &str) {
        self.batch.dirty_tasks.insert(task.to_string());
    }

    fn schedule(&mut self, at: Instant, check: Check, task: &str) {
        self.deadlines.push(Reverse((at, check, task.to_string())));
    }

    fn tick(&mut self) {
        self.check_nodes();
        self.run_deadlines();
        if !self.pending.is_empty() {
            self.batch.place = true;
        }
    }
}

/// At most this many events are replayed into one task's inbox file after a reconnect.
const REPLAY_LIMIT: usize = 10_000;

fn deliver(task: String, lines: Vec<String>) -> v1::ControllerMessage {
    v1::ControllerMessage {
        body: Some(v1::controller_message::Body::Deliver(v1::Deliver {
            task,
            lines,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Severity;

    #[test]
    fn events_committed_but_not_appended_are_mended_into_the_inbox() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Arc::new(Inbox::open(&dir.path().join("inbox"), 1 << 20).unwrap());
        let mut store = Store::open(&dir.path().join("state.db")).unwrap();
        let mut first = vec![Event::new("task.submitted", Severity::Info, "a")];
        inbox.number(&mut first);
        inbox.append(&first).unwrap();
        // A crash after the database commit of the next batch, before its inbox append.
        let mut lost = vec![
            Event::new("task.placed", Severity::Info, "b"),
            Event::new("attempt.started", Severity::Info, "c"),
        ];
        inbox.number(&mut lost);
        let changes = Changes {
            tasks: vec![],
            attempts: vec![],
            incidents: vec![],
            nodes: vec![],
            meta: vec![],
            groups: vec![],
            deliveries: vec![],
            events: &lost,
            cordons: vec![],
        };
        store.commit(&changes).unwrap();
        drop(inbox);

        let inbox = Arc::new(Inbox::open(&dir.path().join("inbox"), 1 << 20).unwrap());
        let _core = Core::open(
            CoreConfig::default(),
            crate::config::Alerts::default(),
            store,
            inbox.clone(),
        )
        .unwrap();

        let kinds: Vec<(u64, String)> = inbox
            .read(0, 10, |_| true)
            .unwrap()
            .into_iter()
            .map(|e| (e.seq, e.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                (1, "task.submitted".into()),
                (2, "task.placed".into()),
                (3, "attempt.started".into())
            ]
        );
    }
}
