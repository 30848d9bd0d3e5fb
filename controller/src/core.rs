//! The controller's core: one thread that owns the fleet model and applies every input in
//! batches. A batch's events are appended to the inbox and fsynced, and its state changes
//! committed to SQLite, before any command, ack or reply of that batch leaves (group
//! commit: an event is on disk before the controller acts on it).

mod api;
mod health;
mod nodes;
mod tasks;

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
    Shutdown(oneshot::Sender<()>),
}

/// A cheap handle to send inputs to the core.
#[derive(Clone)]
pub struct CoreHandle {
    tx: mpsc::Sender<Input>,
}

impl CoreHandle {
    pub fn send(&self, input: Input) -> bool {
        self.tx.send(input).is_ok()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Check {
    Heartbeat,
    Progress,
    Reschedule,
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
    pub fn open(cfg: CoreConfig, store: Store, inbox: Arc<Inbox>) -> Result<Core, CoreError> {
        let loaded = store.load()?;
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
            store,
        };
        for mut task in loaded.tasks {
            task.live.current = core.store.attempt(task.name(), task.attempt)?;
            if task.state == TaskState::Pending {
                core.pending.push_back(task.name().to_string());
            }
            core.tasks.insert(task.name().to_string(), task);
        }
        for incident in loaded.incidents {
            core.next_incident = core.next_incident.max(incident.id + 1);
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
                .or_insert_with(|| NodeRecord {
                    name,
                    state: crate::model::NodeState::Ready,
                    capacity: v1::Capacity::default(),
                    used: v1::Capacity::default(),
                    labels: HashMap::new(),
                    version: String::new(),
                    memory: Default::default(),
                    last_seen: Instant::now(),
                    last_seen_ms: now_ms(),
                    session: None,
                    tasks: HashSet::new(),
                });
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

    /// Starts the core on its own thread.
    pub fn spawn(self) -> (CoreHandle, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("core".into())
            .spawn(move || self.run(rx))
            .expect("spawning the core thread");
        (CoreHandle { tx }, thread)
    }

    fn run(mut self, rx: mpsc::Receiver<Input>) {
        let mut next_tick = Instant::now() + self.cfg.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
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
                next_tick = Instant::now() + self.cfg.tick;
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
            Input::Shutdown(_) => {}
        }
    }

    /// Group commit: inbox first (fsync), then the database, then everything the batch
    /// decided to do.
    fn commit(&mut self) -> Result<(), CoreError> {
        let mut batch = std::mem::take(&mut self.batch);
        if !batch.events.is_empty() {
            self.inbox.append(&mut batch.events)?;
            batch.meta.push(("seq", self.inbox.last_seq() as i64));
        }
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
        };
        self.store.commit(&changes)?;
        self.inbox.publish(batch.events);

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

/// Starts the incident for (task, node, reason) or refreshes the open one.
impl Core {
    fn open_incident(
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
            severity: severity.as_str().into(),
            message: message.to_string(),
            opened_ms: now,
            updated_ms: now,
            resolved_ms: 0,
        };
        let mut event = if task.is_empty() {
            Event::new("incident.opened", severity, message).node(node)
        } else {
            self.task_event(task, "incident.opened", severity, message)
        };
        event = event.with("incident", id).with("reason", reason);
        self.emit(event);
        self.batch.incidents.push(incident.clone());
        self.open_incidents.insert(key, id);
        self.incidents.insert(id, incident);
    }

    fn resolve_incident(&mut self, task: &str, node: &str, reason: &str, why: &str) {
        let key = (task.to_string(), node.to_string(), reason.to_string());
        let Some(id) = self.open_incidents.remove(&key) else {
            return;
        };
        let Some(mut incident) = self.incidents.remove(&id) else {
            return;
        };
        incident.state = "resolved".into();
        incident.resolved_ms = now_ms();
        incident.updated_ms = incident.resolved_ms;
        let message = format!("{reason} resolved: {why}");
        let event = if task.is_empty() {
            Event::new("incident.resolved", Severity::Info, message).node(node)
        } else {
            self.task_event(task, "incident.resolved", Severity::Info, message)
        };
        self.emit(event.with("incident", id).with("reason", reason));
        self.batch.incidents.push(incident);
    }

    /// Resolves every open incident of a task (it ended or was restarted by an operator).
    fn resolve_task_incidents(&mut self, task: &str, why: &str) {
        let keys: Vec<_> = self
            .open_incidents
            .keys()
            .filter(|(t, _, _)| t == task)
            .cloned()
            .collect();
        for (t, n, r) in keys {
            self.resolve_incident(&t, &n, &r, why);
        }
    }
}
