//! `FleetService`, the operator API. Every error becomes a gRPC status here, in one place.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{broadcast, oneshot};
use tonic::{Request, Response, Status};

use muster_proto::spec;
use muster_proto::v1::{self, fleet_service_server::FleetService};

use crate::auth::{Auth, Caller, Role};
use crate::core::{self as core_, ApiError, CoreHandle, Input};
use crate::event::Event;
use crate::inbox::Inbox;
use crate::lineage::Lineage;

/// Events one Watch may lag behind before it is cut off with a resume point.
const WATCH_BUFFER: usize = 1024;
const READ_LIMIT: u32 = 10_000;

pub struct Fleet {
    core: CoreHandle,
    inbox: Arc<Inbox>,
    auth: Arc<Auth>,
    lineage: Arc<Lineage>,
}

impl Fleet {
    pub fn new(
        core: CoreHandle,
        inbox: Arc<Inbox>,
        auth: Arc<Auth>,
        lineage: Arc<Lineage>,
    ) -> Self {
        Fleet {
            core,
            inbox,
            auth,
            lineage,
        }
    }

    /// The subtree a read is bounded to: the one asked for, which a task's token must keep
    /// within its own subtree (and gets by default).
    fn bound(&self, caller: &Caller, subtree: String) -> Result<String, Status> {
        match &caller.task {
            Some(task) if subtree.is_empty() => Ok(task.clone()),
            Some(task) if !self.lineage.within(&subtree, task) => Err(Status::permission_denied(
                format!("the token of task {task} may read only its own subtree, not {subtree}"),
            )),
            _ => Ok(subtree),
        }
    }

    /// A subtree filter must name a task: a typo is an error, not an empty answer (or a
    /// watch that waits for ever).
    async fn subtree_exists(&self, subtree: &str) -> Result<(), Status> {
        if subtree.is_empty() {
            return Ok(());
        }
        check_task_name("subtree", subtree)?;
        let name = subtree.to_string();
        self.ask(|reply| core_::Request::Get { name, reply })
            .await
            .map(|_| ())
    }

    /// A task's token may read its own subtree.
    fn may_read(&self, caller: &Caller, task: &str) -> Result<(), Status> {
        match &caller.task {
            Some(scope) if !self.lineage.within(task, scope) => Err(Status::permission_denied(
                format!("the token of task {scope} may read only its own subtree, not {task}"),
            )),
            _ => Ok(()),
        }
    }

    /// A task's token may stop, restart and signal its descendants, not itself.
    fn may_act(&self, caller: &Caller, task: &str) -> Result<(), Status> {
        match &caller.task {
            Some(scope) if !self.lineage.below(task, scope) => Err(Status::permission_denied(
                format!("the token of task {scope} may act only on its descendants, not on {task}"),
            )),
            _ => Ok(()),
        }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(core_::Reply<T>) -> core_::Request,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        if !self.core.send(Input::Request(make(tx))) {
            return Err(Status::unavailable("controller is shutting down"));
        }
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(result)) => result.map_err(status),
            Ok(Err(_)) => Err(Status::unavailable("controller is shutting down")),
            Err(_) => Err(Status::deadline_exceeded(
                "controller did not answer in 30s",
            )),
        }
    }
}

fn status(e: ApiError) -> Status {
    match e {
        ApiError::NotFound(m) => Status::not_found(m),
        ApiError::AlreadyExists(m) => Status::already_exists(m),
        ApiError::Invalid(m) => Status::invalid_argument(m),
        ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
        ApiError::Unavailable(m) => Status::unavailable(m),
        ApiError::PermissionDenied(m) => Status::permission_denied(m),
        ApiError::LimitReached(m) => Status::resource_exhausted(m),
        ApiError::Internal(m) => Status::internal(m),
    }
}

fn check_node_name(name: &str) -> Result<(), Status> {
    spec::check_name(name).map_err(|p| Status::invalid_argument(format!("name {p}")))
}

/// A signal by name ("TERM", "SIGUSR1") or number.
fn parse_signal(s: &str) -> Option<i32> {
    let s = s.trim().to_ascii_uppercase();
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = s.strip_prefix("SIG").unwrap_or(&s);
    let number = match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ABRT" => 6,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "ALRM" => 14,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        "TSTP" => 20,
        "WINCH" => 28,
        _ => return None,
    };
    Some(number)
}

fn check_task_name(field: &str, name: &str) -> Result<(), Status> {
    spec::check_name(name).map_err(|p| Status::invalid_argument(format!("{field} {p}")))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::Event, Status>> + Send>>;
type LogStream = Pin<Box<dyn Stream<Item = Result<v1::LogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl FleetService for Fleet {
    async fn submit(
        &self,
        request: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitResponse>, Status> {
        let caller = self.auth.identify(&request, Role::Operator)?;
        let v1::SubmitRequest {
            tasks: specs,
            parent,
        } = request.into_inner();
        if !parent.is_empty() {
            check_task_name("parent", &parent)?;
        }
        if specs.is_empty() {
            return Err(Status::invalid_argument(
                "tasks is empty: submit at least one task",
            ));
        }
        if specs.len() > spec::Limits::TASKS_PER_SUBMIT {
            return Err(Status::invalid_argument(format!(
                "tasks has {} entries, at most {} per submit",
                specs.len(),
                spec::Limits::TASKS_PER_SUBMIT
            )));
        }
        let mut problems = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            if let Err(errors) = spec::validate(s) {
                let who = if s.name.is_empty() {
                    format!("tasks[{i}]")
                } else {
                    s.name.clone()
                };
                problems.extend(errors.into_iter().map(|e| e.within(&who).to_string()));
            }
        }
        if !problems.is_empty() {
            return Err(Status::invalid_argument(problems.join("; ")));
        }
        let names = self
            .ask(|reply| core_::Request::Submit {
                specs,
                parent,
                caller: caller.name,
                scope: caller.task,
                reply,
            })
            .await?;
        Ok(Response::new(v1::SubmitResponse { names }))
    }

    async fn get_task(
        &self,
        request: Request<v1::GetTaskRequest>,
    ) -> Result<Response<v1::Task>, Status> {
        let caller = self.auth.identify(&request, Role::Viewer)?;
        let name = request.into_inner().name;
        check_task_name("name", &name)?;
        self.may_read(&caller, &name)?;
        let task = self
            .ask(|reply| core_::Request::Get { name, reply })
            .await?;
        Ok(Response::new(task))
    }

    async fn list_tasks(
        &self,
        request: Request<v1::ListTasksRequest>,
    ) -> Result<Response<v1::ListTasksResponse>, Status> {
        let caller = self.auth.identify(&request, Role::Viewer)?;
        let mut filter = request.into_inner();
        filter.subtree = self.bound(&caller, std::mem::take(&mut filter.subtree))?;
        self.subtree_exists(&filter.subtree).await?;
        if !filter.state.is_empty() && crate::model::TaskState::parse(&filter.state).is_none() {
            return Err(Status::invalid_argument(format!(
                "state {:?} is not a task state",
                filter.state
            )));
        }
        let (tasks, next_page_token) = self
            .ask(|reply| core_::Request::List { filter, reply })
            .await?;
        Ok(Response::new(v1::ListTasksResponse {
            tasks,
            next_page_token,
        }))
    }

    async fn stop_task(
        &self,
        request: Request<v1::StopTaskRequest>,
    ) -> Result<Response<v1::StopTaskResponse>, Status> {
        let caller = self.auth.identify(&request, Role::Operator)?;
        let name = request.into_inner().name;
        check_task_name("name", &name)?;
        self.may_act(&caller, &name)?;
        let task = self
            .ask(|reply| core_::Request::Stop {
                name,
                caller: caller.name,
                reply,
            })
            .await?;
        Ok(Response::new(v1::StopTaskResponse { task: Some(task) }))
    }

    async fn restart_task(
        &self,
        request: Request<v1::RestartTaskRequest>,
    ) -> Result<Response<v1::RestartTaskResponse>, Status> {
        let caller = self.auth.identify(&request, Role::Operator)?;
        let name = request.into_inner().name;
        check_task_name("name", &name)?;
        self.may_act(&caller, &name)?;
        let task = self
            .ask(|reply| core_::Request::Restart {
                name,
                caller: caller.name,
                reply,
            })
            .await?;
        Ok(Response::new(v1::RestartTaskResponse { task: Some(task) }))
    }

    async fn list_nodes(
        &self,
        request: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesResponse>, Status> {
        self.auth.check(&request, Role::Viewer)?;
        let nodes = self.ask(|reply| core_::Request::Nodes { reply }).await?;
        Ok(Response::new(v1::ListNodesResponse { nodes }))
    }

    async fn read_inbox(
        &self,
        request: Request<v1::ReadInboxRequest>,
    ) -> Result<Response<v1::ReadInboxResponse>, Status> {
        let caller = self.auth.identify(&request, Role::Viewer)?;
        let mut r = request.into_inner();
        r.subtree = self.bound(&caller, std::mem::take(&mut r.subtree))?;
        self.subtree_exists(&r.subtree).await?;
        let lineage = self.lineage.clone();
        let limit = if r.limit == 0 {
            1000
        } else {
            r.limit.min(READ_LIMIT)
        } as usize;
        let inbox = self.inbox.clone();
        let events = tokio::task::spawn_blocking(move || {
            inbox.read(r.from_seq, limit, |e| {
                matches(e, &r.task, &r.kind) && in_subtree(&lineage, e, &r.subtree)
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(v1::ReadInboxResponse {
            events: events.iter().map(Event::to_proto).collect(),
            last_seq: self.inbox.last_seq(),
        }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let caller = self.auth.identify(&request, Role::Viewer)?;
        let mut r = request.into_inner();
        r.subtree = self.bound(&caller, std::mem::take(&mut r.subtree))?;
        self.subtree_exists(&r.subtree).await?;
        let lineage = self.lineage.clone();
        // Subscribe before reading history, so nothing falls between the two.
        let mut live = self.inbox.subscribe();
        let inbox = self.inbox.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            let mut next = if r.from_seq == 0 {
                inbox.last_seq() + 1
            } else {
                r.from_seq
            };
            // History first, in pages.
            loop {
                let page = {
                    let inbox = inbox.clone();
                    let (task, kind, subtree) = (r.task.clone(), r.kind.clone(), r.subtree.clone());
                    let lineage = lineage.clone();
                    tokio::task::spawn_blocking(move || {
                        inbox.read(next, 1000, |e| {
                            matches(e, &task, &kind) && in_subtree(&lineage, e, &subtree)
                        })
                    })
                    .await
                };
                let Ok(Ok(page)) = page else { return };
                let done = page.len() < 1000;
                for event in page {
                    next = event.seq + 1;
                    if tx.send(Ok(event.to_proto())).await.is_err() {
                        return;
                    }
                }
                if done {
                    break;
                }
            }
            loop {
                match live.recv().await {
                    Ok(event) => {
                        if event.seq < next
                            || !matches(&event, &r.task, &r.kind)
                            || !in_subtree(&lineage, &event, &r.subtree)
                        {
                            continue;
                        }
                        next = event.seq + 1;
                        if tx.send(Ok(event.to_proto())).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let message = format!("watcher fell behind; resume with from_seq {next}");
                        let _ = tx.send(Err(Status::resource_exhausted(message))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_incidents(
        &self,
        request: Request<v1::ListIncidentsRequest>,
    ) -> Result<Response<v1::ListIncidentsResponse>, Status> {
        let caller = self.auth.identify(&request, Role::Viewer)?;
        let r = request.into_inner();
        let all = r.all;
        let subtree = self.bound(&caller, r.subtree)?;
        self.subtree_exists(&subtree).await?;
        let mut incidents = self
            .ask(|reply| core_::Request::Incidents { all, reply })
            .await?;
        if !subtree.is_empty() {
            incidents.retain(|i| !i.task.is_empty() && self.lineage.within(&i.task, &subtree));
        }
        Ok(Response::new(v1::ListIncidentsResponse { incidents }))
    }

    async fn ack_incident(
        &self,
        request: Request<v1::AckIncidentRequest>,
    ) -> Result<Response<v1::Incident>, Status> {
        let caller = self.auth.identify(&request, Role::Operator)?;
        let r = request.into_inner();
        let (id, acked) = (r.id, !r.undo);
        if id == 0 {
            return Err(Status::invalid_argument("id is required"));
        }
        let incident = self
            .ask(|reply| core_::Request::Ack {
                id,
                acked,
                caller: caller.name,
                scope: caller.task,
                reply,
            })
            .await?;
        Ok(Response::new(incident))
    }

    async fn resolve_incident(
        &self,
        request: Request<v1::ResolveIncidentRequest>,
    ) -> Result<Response<v1::Incident>, Status> {
        let caller = self.auth.identify(&request, Role::Operator)?;
        let id = request.into_inner().id;
        if id == 0 {
            return Err(Status::invalid_argument("id is required"));
        }
        let incident = self
            .ask(|reply| core_::Request::Resolve {
                id,
                caller: caller.name,
                scope: caller.task,
                reply,
            })
            .await?;
        Ok(Response::new(incident))
    }

    async fn signal_task(
        &self,
        request: Request<v1::SignalTaskRequest>,
    ) -> Result<Response<v1::Task>, Status> {
        let caller = self.auth.identify(&request, Role::Operator)?;
        let r = request.into_inner();
        check_task_name("name", &r.name)?;
        self.may_act(&caller, &r.name)?;
        let caller = caller.name;
        let signal = parse_signal(&r.signal).ok_or_else(|| {
            Status::invalid_argument(format!(
                "signal {:?} is not a signal name (TERM, HUP, USR1, ...) or number 1-64",
                r.signal
            ))
        })?;
        let name = r.name;
        let task = self
            .ask(|reply| core_::Request::Signal {
                name,
                signal,
                caller,
                reply,
            })
            .await?;
        Ok(Response::new(task))
    }

    async fn cordon_node(
        &self,
        request: Request<v1::CordonNodeRequest>,
    ) -> Result<Response<v1::Node>, Status> {
        let caller = self.auth.check(&request, Role::Admin)?;
        let r = request.into_inner();
        check_node_name(&r.name)?;
        let (node, cordon) = (r.name, !r.undo);
        let node = self
            .ask(|reply| core_::Request::Cordon {
                node,
                cordon,
                drain: false,
                caller,
                reply,
            })
            .await?;
        Ok(Response::new(node))
    }

    async fn drain_node(
        &self,
        request: Request<v1::DrainNodeRequest>,
    ) -> Result<Response<v1::Node>, Status> {
        let caller = self.auth.check(&request, Role::Admin)?;
        let node = request.into_inner().name;
        check_node_name(&node)?;
        let node = self
            .ask(|reply| core_::Request::Cordon {
                node,
                cordon: true,
                drain: true,
                caller,
                reply,
            })
            .await?;
        Ok(Response::new(node))
    }

    type TailLogsStream = LogStream;

    async fn tail_logs(
        &self,
        request: Request<v1::TailLogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        let caller = self.auth.identify(&request, Role::Viewer)?;
        let r = request.into_inner();
        check_task_name("task", &r.task)?;
        self.may_read(&caller, &r.task)?;
        let stream = match r.stream.as_str() {
            "" | "stdout" => "stdout",
            "stderr" => "stderr",
            other => {
                return Err(Status::invalid_argument(format!(
                    "stream {other:?} is not stdout or stderr"
                )))
            }
        };
        let tail = if r.tail_bytes == 0 {
            16 * 1024
        } else {
            r.tail_bytes.min(16 << 20)
        };
        let fetch = |offset: i64| {
            let request = v1::LogRequest {
                id: 0,
                task: r.task.clone(),
                stream: stream.into(),
                offset,
                max_bytes: 256 * 1024,
            };
            self.ask(move |reply| core_::Request::Log { request, reply })
        };
        // The first chunk answers errors (unknown task, node away) before the stream starts.
        let first = fetch(-(tail as i64)).await?;
        let core = self.core.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (task, follow) = (r.task.clone(), r.follow);
        tokio::spawn(async move {
            let mut offset = first.next_offset;
            let mut remaining = tail.saturating_sub(first.data.len() as u64);
            let had_data = !first.data.is_empty();
            if had_data && tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                if !follow && remaining == 0 {
                    return;
                }
                let (reply, rx_chunk) = oneshot::channel();
                let request = v1::LogRequest {
                    id: 0,
                    task: task.clone(),
                    stream: stream.into(),
                    offset: offset as i64,
                    max_bytes: 256 * 1024,
                };
                if !core.send(Input::Request(core_::Request::Log { request, reply })) {
                    return;
                }
                let chunk = match tokio::time::timeout(Duration::from_secs(30), rx_chunk).await {
                    Ok(Ok(Ok(chunk))) => chunk,
                    Ok(Ok(Err(e))) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                    _ => return,
                };
                let empty = chunk.data.is_empty();
                remaining = remaining.saturating_sub(chunk.data.len() as u64);
                offset = chunk.next_offset;
                if !empty && tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
                if empty {
                    if !follow {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = tx.closed() => return,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

fn matches(event: &Event, task: &str, kind: &str) -> bool {
    (task.is_empty() || event.task == task)
        && (kind.is_empty() || event.kind == kind || event.kind.starts_with(&format!("{kind}.")))
}

/// Whether an event is about a task within `subtree` (empty: any event).
fn in_subtree(lineage: &Lineage, event: &Event, subtree: &str) -> bool {
    subtree.is_empty() || (!event.task.is_empty() && lineage.within(&event.task, subtree))
}
