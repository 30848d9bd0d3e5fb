//! Operator requests as the core carries them out. Errors are typed here and turned into
//! gRPC statuses at the service edge.

use tokio::sync::oneshot;

use muster_proto::v1;

use super::Core;
use crate::event::{now_ms, Event, Severity};
use crate::model::{TaskRecord, TaskState};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// A subtree limit refused the request.
    #[error("{0}")]
    LimitReached(String),
    #[error("{0}")]
    Internal(String),
}

pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// One operator request; its reply is sent once the request's effects are durable.
pub enum Request {
    Submit {
        specs: Vec<v1::TaskSpec>,
        /// The requested parent (empty: none, or the calling task).
        parent: String,
        caller: String,
        /// A task's token bounds the request to that task's subtree.
        scope: Option<String>,
        reply: Reply<Vec<String>>,
    },
    Get {
        name: String,
        reply: Reply<v1::Task>,
    },
    List {
        filter: v1::ListTasksRequest,
        reply: Reply<(Vec<v1::Task>, String)>,
    },
    Stop {
        name: String,
        caller: String,
        reply: Reply<v1::Task>,
    },
    Restart {
        name: String,
        caller: String,
        reply: Reply<v1::Task>,
    },
    Nodes {
        reply: Reply<Vec<v1::Node>>,
    },
    Incidents {
        all: bool,
        reply: Reply<Vec<v1::Incident>>,
    },
    Ack {
        id: u64,
        acked: bool,
        caller: String,
        scope: Option<String>,
        reply: Reply<v1::Incident>,
    },
    Resolve {
        id: u64,
        caller: String,
        scope: Option<String>,
        reply: Reply<v1::Incident>,
    },
    Log {
        request: v1::LogRequest,
        reply: Reply<v1::LogChunk>,
    },
    Signal {
        name: String,
        signal: i32,
        caller: String,
        reply: Reply<v1::Task>,
    },
    Cordon {
        node: String,
        cordon: bool,
        drain: bool,
        caller: String,
        reply: Reply<v1::Node>,
    },
    /// The Prometheus text of the controller's metrics.
    Metrics {
        reply: Reply<String>,
    },
}

impl Core {
    pub(super) fn on_request(&mut self, request: Request) {
        match request {
            Request::Submit {
                specs,
                parent,
                caller,
                scope,
                reply,
            } => {
                let result = self.submit(specs, &parent, &caller, scope.as_deref());
                self.reply(reply, result);
            }
            Request::Get { name, reply } => {
                let result = self.get(&name);
                self.reply(reply, result);
            }
            Request::List { filter, reply } => {
                let result = Ok(self.list(&filter));
                self.reply(reply, result);
            }
            Request::Stop {
                name,
                caller,
                reply,
            } => {
                let result = self.stop(&name, &caller);
                self.reply(reply, result);
            }
            Request::Restart {
                name,
                caller,
                reply,
            } => {
                let result = self.restart(&name, &caller);
                self.reply(reply, result);
            }
            Request::Nodes { reply } => {
                let mut nodes: Vec<_> = self.nodes.values().map(|n| n.to_proto()).collect();
                nodes.sort_by(|a, b| a.name.cmp(&b.name));
                self.reply(reply, Ok(nodes));
            }
            Request::Incidents { all, reply } => {
                let resolved = self.resolved.values().filter(|_| all);
                let mut incidents: Vec<_> = self
                    .incidents
                    .values()
                    .chain(resolved)
                    .map(|i| i.to_proto())
                    .collect();
                incidents.sort_by_key(|i| i.id);
                self.reply(reply, Ok(incidents));
            }
            Request::Ack {
                id,
                acked,
                caller,
                scope,
                reply,
            } => {
                let result = self
                    .incident_in_scope(id, scope.as_deref())
                    .and_then(|()| self.ack(id, &caller, acked));
                self.reply(reply, result);
            }
            Request::Resolve {
                id,
                caller,
                scope,
                reply,
            } => {
                let result = self
                    .incident_in_scope(id, scope.as_deref())
                    .and_then(|()| self.resolve_request(id, &caller));
                self.reply(reply, result);
            }
            Request::Log { request, reply } => self.log(request, reply),
            Request::Signal {
                name,
                signal,
                caller,
                reply,
            } => {
                let result = self.signal(&name, signal, &caller);
                self.reply(reply, result);
            }
            Request::Cordon {
                node,
                cordon,
                drain,
                caller,
                reply,
            } => {
                let result = self.cordon(&node, cordon, drain, &caller);
                self.reply(reply, result);
            }
            Request::Metrics { reply } => {
                let _ = reply.send(Ok(self.render_metrics()));
            }
        }
    }

    /// Replies go out after the batch is committed.
    fn reply<T: Send + 'static>(&mut self, reply: Reply<T>, result: Result<T, ApiError>) {
        self.batch.after.push(Box::new(move || {
            let _ = reply.send(result);
        }));
    }

    /// A task's token may act on the incidents of its descendants only.
    fn incident_in_scope(&self, id: u64, scope: Option<&str>) -> Result<(), ApiError> {
        let Some(scope) = scope else {
            return Ok(());
        };
        let task = self
            .incidents
            .get(&id)
            .or_else(|| self.resolved.get(&id))
            .map(|i| i.task.as_str())
            .ok_or_else(|| ApiError::NotFound(format!("incident {id} not found")))?;
        if task.is_empty() || !self.lineage.below(task, scope) {
            return Err(ApiError::PermissionDenied(format!(
                "incident {id} is not about a descendant of task {scope}"
            )));
        }
        Ok(())
    }

    fn submit(
        &mut self,
        specs: Vec<v1::TaskSpec>,
        parent: &str,
        caller: &str,
        scope: Option<&str>,
    ) -> Result<Vec<String>, ApiError> {
        // All or nothing: check every spec before changing anything.
        let parent = self.parent_for(parent, scope)?;
        if !parent.is_empty() {
            self.check_limits(&parent, specs.len() as u32)?;
        }
        let root = self
            .tasks
            .get(&parent)
            .map(|p| p.root.clone())
            .unwrap_or_default();
        let mut names = std::collections::HashSet::new();
        for spec in &specs {
            if self.tasks.contains_key(&spec.name) {
                return Err(ApiError::AlreadyExists(format!(
                    "task {} already exists",
                    spec.name
                )));
            }
            if !names.insert(spec.name.clone()) {
                return Err(ApiError::Invalid(format!(
                    "tasks: name {} appears twice",
                    spec.name
                )));
            }
        }
        let now = now_ms();
        let mut out = Vec::with_capacity(specs.len());
        for spec in specs {
            let name = spec.name.clone();
            let task = TaskRecord::new(spec, parent.clone(), root.clone(), now);
            self.tasks.insert(name.clone(), task);
            self.link(&name, &parent);
            self.schedule_budget(&name);
            self.touch(&name);
            self.pending.push_back(name.clone());
            let command = self.tasks[&name].spec.command.join(" ");
            let event = self
                .task_event(
                    &name,
                    "task.submitted",
                    Severity::Info,
                    format!("submitted by {caller}"),
                )
                .with("command", command);
            self.emit(event);
            out.push(name);
        }
        self.batch.place = true;
        Ok(out)
    }

    fn get(&self, name: &str) -> Result<v1::Task, ApiError> {
        let task = self.tasks.get(name).ok_or_else(|| not_found(name))?;
        let mut proto = task.to_proto();
        proto.attempts = self
            .store
            .attempts(name)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(proto)
    }

    /// Tasks matching the filter, oldest first; with a page size, one page after the token
    /// ("created_ms:name" of the last task of the previous page).
    fn list(&self, filter: &v1::ListTasksRequest) -> (Vec<v1::Task>, String) {
        let after = filter
            .page_token
            .split_once(':')
            .and_then(|(ms, name)| Some((ms.parse::<i64>().ok()?, name.to_string())));
        let mut out: Vec<&TaskRecord> = self
            .tasks
            .values()
            .filter(|t| filter.state.is_empty() || t.state.as_str() == filter.state)
            .filter(|t| filter.node.is_empty() || t.node == filter.node)
            .filter(|t| filter.parent.is_empty() || t.parent == filter.parent)
            .filter(|t| filter.root.is_empty() || t.root == filter.root)
            .filter(|t| filter.subtree.is_empty() || self.lineage.within(t.name(), &filter.subtree))
            .filter(|t| {
                filter
                    .labels
                    .iter()
                    .all(|(k, v)| t.spec.labels.get(k) == Some(v))
            })
            .filter(|t| {
                after
                    .as_ref()
                    .is_none_or(|(ms, name)| (t.created_ms, t.name()) > (*ms, name.as_str()))
            })
            .collect();
        out.sort_by(|a, b| (a.created_ms, a.name()).cmp(&(b.created_ms, b.name())));
        let mut next = String::new();
        if filter.page_size > 0 && out.len() > filter.page_size as usize {
            out.truncate(filter.page_size as usize);
            let last = out.last().expect("a non-empty page");
            next = format!("{}:{}", last.created_ms, last.name());
        }
        (out.into_iter().map(TaskRecord::to_proto).collect(), next)
    }

    /// The `operator.action` event of a call; `subtree` counts the descendants a stop or
    /// restart acted on.
    fn operator_action(&mut self, caller: &str, action: &str, task: &str, subtree: Option<usize>) {
        let mut event = self
            .task_event(
                task,
                "operator.action",
                Severity::Info,
                format!("{caller}: {action} {task}"),
            )
            .with("action", action)
            .with("caller", caller)
            .with("reason", "operator");
        if let Some(n) = subtree {
            event = event.with("subtree", n);
        }
        self.emit(event);
    }

    fn stop(&mut self, name: &str, caller: &str) -> Result<v1::Task, ApiError> {
        let task = self.tasks.get(name).ok_or_else(|| not_found(name))?;
        let state = task.state;
        // The whole subtree stops, `keep` children too: the operator asked for all of it.
        // An ended task may still have `keep` children running.
        let descendants: Vec<String> = self
            .descendants(name)
            .into_iter()
            .filter(|d| self.tasks.get(d).is_some_and(|t| !t.state.is_final()))
            .collect();
        if state.is_final() && descendants.is_empty() {
            return Ok(self.tasks[name].to_proto());
        }
        self.operator_action(caller, "stop", name, Some(descendants.len()));
        for task in descendants.iter().rev() {
            self.stop_one(task, "operator");
        }
        self.stop_one(name, "operator");
        Ok(self.tasks[name].to_proto())
    }

    fn restart(&mut self, name: &str, caller: &str) -> Result<v1::Task, ApiError> {
        let task = self.tasks.get(name).ok_or_else(|| not_found(name))?;
        let state = task.state;
        match state {
            TaskState::Stopping => {
                return Err(ApiError::FailedPrecondition(format!(
                    "task {name} is stopping; restart it once it stopped"
                )))
            }
            TaskState::Pending => return Ok(task.to_proto()),
            _ => {}
        }
        // An ended child of an ended parent stays ended: it would run without a living
        // ancestor. Restarting the parent restarts it too.
        if !super::tree::living(state) && task.spec.parent_close != "keep" {
            if let Some(parent) = self.tasks.get(&task.parent) {
                if !super::tree::living(parent.state) {
                    return Err(ApiError::FailedPrecondition(format!(
                        "the parent of {name}, {}, has ended ({}): restart {} to restart its subtree",
                        task.parent,
                        parent.state.as_str(),
                        task.parent
                    )));
                }
            }
        }
        let descendants = self.descendants(name);
        self.operator_action(caller, "restart", name, Some(descendants.len()));
        self.restart_one(name);
        for task in descendants {
            self.restart_one(&task);
        }
        Ok(self.tasks[name].to_proto())
    }

    fn signal(&mut self, name: &str, signal: i32, caller: &str) -> Result<v1::Task, ApiError> {
        let task = self.tasks.get(name).ok_or_else(|| not_found(name))?;
        if !task.state.holds_node() || task.live.current.as_ref().is_none_or(|a| a.pid == 0) {
            return Err(ApiError::FailedPrecondition(format!(
                "task {name} has no running process (state {})",
                task.state.as_str()
            )));
        }
        let node = task.node.clone();
        self.operator_action(caller, &format!("signal {signal}"), name, None);
        let action = v1::command::Action::Signal(v1::SignalTask {
            task: name.to_string(),
            signal,
        });
        if !self.command(&node, action) {
            return Err(ApiError::Unavailable(format!(
                "node {node} of task {name} is not connected"
            )));
        }
        Ok(self.tasks[name].to_proto())
    }

    /// Cordons (or uncordons) a node; a drain also moves its tasks elsewhere.
    fn cordon(
        &mut self,
        node: &str,
        cordon: bool,
        drain: bool,
        caller: &str,
    ) -> Result<v1::Node, ApiError> {
        let record = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| ApiError::NotFound(format!("node {node} not found")))?;
        record.cordoned = cordon;
        let tasks: Vec<String> = if drain {
            record.tasks.iter().cloned().collect()
        } else {
            Vec::new()
        };
        self.batch.cordons.push((node.to_string(), cordon));
        let action = match (cordon, drain) {
            (_, true) => "drain",
            (true, false) => "cordon",
            (false, false) => "uncordon",
        };
        let message = format!("{caller}: {action} node {node}");
        self.emit(
            Event::new("operator.action", Severity::Info, message)
                .node(node)
                .with("action", action)
                .with("caller", caller)
                .with("tasks", tasks.len()),
        );
        for task in tasks {
            if self
                .tasks
                .get(&task)
                .is_some_and(|t| t.state.holds_node() && t.state != TaskState::Stopping)
            {
                self.request_stop(&task, "node_drain");
            }
        }
        Ok(self.nodes[node].to_proto())
    }

    fn log(&mut self, mut request: v1::LogRequest, reply: Reply<v1::LogChunk>) {
        let Some(task) = self.tasks.get(&request.task) else {
            let _ = reply.send(Err(not_found(&request.task)));
            return;
        };
        if task.node.is_empty() {
            let _ = reply.send(Ok(v1::LogChunk::default()));
            return;
        }
        let node = task.node.clone();
        request.id = self.next_log_request;
        self.next_log_request += 1;
        let message = v1::ControllerMessage {
            body: Some(v1::controller_message::Body::LogRequest(request.clone())),
        };
        if self.send_to(&node, message) {
            self.log_waiters.insert(request.id, reply);
        } else {
            let _ = reply.send(Err(ApiError::Unavailable(format!(
                "node {node} holding the logs of {} is not connected",
                request.task
            ))));
        }
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("task {name} not found"))
}
