//! The agent's side of the keeper: start it if none runs, send requests, and route its
//! messages (exits and output lines) to the runner of each attempt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use super::{ChildInfo, LaunchSpec, Message, Request};
use crate::process::{Exit, SpawnError};

/// Output of one attempt, as the keeper forwards it.
#[derive(Debug)]
pub enum Output {
    Line { stream: String, line: String },
    Dropped { stream: String, error: String },
}

/// What the agent receives about one attempt.
pub struct Watch {
    pub exit: oneshot::Receiver<Exit>,
    pub output: mpsc::UnboundedReceiver<Output>,
}

#[derive(Default)]
struct Routes {
    exits: HashMap<String, oneshot::Sender<Exit>>,
    outputs: HashMap<String, mpsc::UnboundedSender<Output>>,
    replies: HashMap<u64, oneshot::Sender<Message>>,
}

/// Why the keeper cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("starting the keeper {exe}: {source}")]
    Start {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("the keeper did not open {0} within 10s")]
    NoSocket(PathBuf),
    #[error("the keeper connection is gone")]
    Gone,
}

pub struct Keeper {
    writer: mpsc::UnboundedSender<Vec<u8>>,
    routes: Arc<Mutex<Routes>>,
    next_id: AtomicU64,
    /// Closed when the connection to the keeper breaks.
    pub gone: tokio::sync::watch::Receiver<bool>,
}

impl Keeper {
    /// Connects to the node's keeper, starting it (detached, in its own session) if none
    /// answers.
    pub async fn connect_or_start(data_dir: &Path) -> Result<Keeper, KeeperError> {
        let socket = super::socket_path(data_dir);
        if let Ok(stream) = UnixStream::connect(&socket).await {
            tracing::info!("connected to the running keeper");
            return Ok(Keeper::over(stream));
        }
        let exe = std::env::current_exe().map_err(|source| KeeperError::Start {
            exe: PathBuf::from("muster-node-agent"),
            source,
        })?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("keeper.log"))
            .map_err(|source| KeeperError::Start {
                exe: exe.clone(),
                source,
            })?;
        let mut command = std::process::Command::new(&exe);
        command
            .arg("keeper")
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|source| KeeperError::Start {
                exe: exe.clone(),
                source,
            })?)
            .stderr(log);
        // Its own process group: signals meant for the agent (a terminal's Ctrl-C, a
        // supervisor's SIGTERM to the group) must not reach the keeper and its children.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        command.spawn().map_err(|source| KeeperError::Start {
            exe: exe.clone(),
            source,
        })?;

        for _ in 0..200 {
            if let Ok(stream) = UnixStream::connect(&socket).await {
                tracing::info!("started a keeper");
                return Ok(Keeper::over(stream));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(KeeperError::NoSocket(socket))
    }

    fn over(stream: UnixStream) -> Keeper {
        let (read, mut write) = stream.into_split();
        let (writer, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
        let routes: Arc<Mutex<Routes>> = Arc::default();
        let (gone_tx, gone) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Some(bytes) = outgoing.recv().await {
                if write.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        let reader_routes = routes.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Message>(&line) {
                    Ok(message) => route(&reader_routes, message),
                    Err(e) => tracing::warn!(error = %e, "bad message from the keeper"),
                }
            }
            tracing::error!("lost the connection to the keeper");
            let _ = gone_tx.send(true);
        });
        Keeper {
            writer,
            routes,
            next_id: AtomicU64::new(1),
            gone,
        }
    }

    fn send(&self, request: &Request) -> Result<(), KeeperError> {
        let mut bytes = serde_json::to_vec(request).expect("keeper requests serialize");
        bytes.push(b'\n');
        self.writer.send(bytes).map_err(|_| KeeperError::Gone)
    }

    async fn ask(&self, make: impl FnOnce(u64) -> Request) -> Result<Message, KeeperError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.routes
            .lock()
            .expect("keeper routes poisoned")
            .replies
            .insert(id, tx);
        self.send(&make(id))?;
        rx.await.map_err(|_| KeeperError::Gone)
    }

    /// Registers for an attempt's exit and output; call before spawning or adopting it.
    pub fn watch(&self, key: &str) -> Watch {
        let (exit_tx, exit) = oneshot::channel();
        let (output_tx, output) = mpsc::unbounded_channel();
        let mut routes = self.routes.lock().expect("keeper routes poisoned");
        routes.exits.insert(key.to_string(), exit_tx);
        routes.outputs.insert(key.to_string(), output_tx);
        Watch { exit, output }
    }

    /// Starts an attempt in the keeper; returns its pid and start time.
    pub async fn spawn(&self, launch: LaunchSpec) -> Result<(u32, u64), SpawnError> {
        let gone = |_| SpawnError {
            kind: "spawn_error",
            message: "the keeper is gone".into(),
        };
        match self
            .ask(|id| Request::Spawn {
                id,
                launch: Box::new(launch),
            })
            .await
            .map_err(gone)?
        {
            Message::Spawned {
                pid, start_time, ..
            } => Ok((pid, start_time)),
            Message::SpawnFailed { kind, message, .. } => Err(SpawnError {
                kind: kind_name(&kind),
                message,
            }),
            other => Err(SpawnError {
                kind: "spawn_error",
                message: format!("unexpected keeper answer {other:?}"),
            }),
        }
    }

    /// Every child the keeper knows, running or exited and not yet forgotten, and how long
    /// ago the previous agent last heard from the controller (if it ever said).
    pub async fn list(&self) -> Result<(Vec<ChildInfo>, Option<std::time::Duration>), KeeperError> {
        match self.ask(|id| Request::List { id }).await? {
            Message::Children {
                children,
                silent_ms,
                ..
            } => Ok((children, silent_ms.map(std::time::Duration::from_millis))),
            _ => Err(KeeperError::Gone),
        }
    }

    /// The agent has recorded the exit: the keeper may drop it. Its routes go too, also the
    /// exit route of an attempt whose exit never came (it failed to spawn, or had ended
    /// before it was adopted).
    pub fn forget(&self, key: &str) {
        let mut routes = self.routes.lock().expect("keeper routes poisoned");
        routes.outputs.remove(key);
        routes.exits.remove(key);
        drop(routes);
        let _ = self.send(&Request::Forget {
            key: key.to_string(),
        });
    }

    /// Tells the keeper when the controller was last heard from, for its lease backstop.
    pub fn contact(&self, silent: std::time::Duration) {
        let _ = self.send(&Request::Contact {
            silent_ms: silent.as_millis() as u64,
        });
    }

    /// The agent is going away for good: the keeper exits once no child is left.
    pub fn retire(&self) {
        let _ = self.send(&Request::Retire);
    }
}

/// The kind a keeper named, as a static name (unknown ones are plain spawn errors).
fn kind_name(kind: &str) -> &'static str {
    crate::process::SPAWN_ERROR_KINDS
        .into_iter()
        .find(|k| *k == kind)
        .unwrap_or("spawn_error")
}

fn route(routes: &Mutex<Routes>, message: Message) {
    let mut routes = routes.lock().expect("keeper routes poisoned");
    match message {
        Message::Spawned { id, .. }
        | Message::SpawnFailed { id, .. }
        | Message::Children { id, .. } => {
            if let Some(reply) = routes.replies.remove(&id) {
                let _ = reply.send(message);
            }
        }
        Message::Exit {
            key,
            exit_code,
            signal,
        } => {
            let exit = match (exit_code, signal) {
                (Some(c), _) => Exit::Code(c),
                (None, Some(s)) => Exit::Signal(s),
                (None, None) => Exit::Signal(0),
            };
            if let Some(tx) = routes.exits.remove(&key) {
                let _ = tx.send(exit);
            }
        }
        Message::Line { key, stream, line } => {
            if let Some(tx) = routes.outputs.get(&key) {
                let _ = tx.send(Output::Line { stream, line });
            }
        }
        Message::Dropped { key, stream, error } => {
            if let Some(tx) = routes.outputs.get(&key) {
                let _ = tx.send(Output::Dropped { stream, error });
            }
        }
    }
}
