//! The keeper process: accepts the agent on a Unix socket, spawns and reaps children,
//! drains their output, and remembers exits while no agent listens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::{start_time, ChildInfo, LaunchSpec, Message, Request};
use crate::logs::{self, LogFile, LogLimits};
use crate::process::{self, Exit, Launch};

/// Lines queued for a slow or absent agent are dropped past this; files keep everything.
const LINE_QUEUE: usize = 10_000;
/// With no child and no agent for this long, the keeper exits.
const IDLE_EXIT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct State {
    children: HashMap<String, ChildInfo>,
    /// Children with a lease, by attempt key.
    leases: HashMap<String, Lease>,
    /// When the agent last heard from the controller, as it told us.
    last_contact: Option<Instant>,
    /// The connected agent, if any: output lines (bounded, dropped when full) and
    /// everything else (never dropped).
    agent: Option<AgentLink>,
    retiring: bool,
}

struct Lease {
    pid: u32,
    lease: Duration,
    grace: Duration,
    /// When the keeper sent SIGTERM for the lease, and whether SIGKILL followed.
    terminated: Option<Instant>,
    killed: bool,
}

#[derive(Clone)]
struct AgentLink {
    lines: mpsc::Sender<Message>,
    control: mpsc::UnboundedSender<Message>,
}

type Shared = Arc<Mutex<State>>;

fn send(state: &Shared, message: Message) {
    let agent = state.lock().expect("keeper state poisoned").agent.clone();
    if let Some(agent) = agent {
        match message {
            Message::Line { .. } => {
                let _ = agent.lines.try_send(message);
            }
            other => {
                let _ = agent.control.send(other);
            }
        }
    }
}

/// Runs the keeper for `data_dir` until it is idle or retired.
pub async fn run(data_dir: PathBuf) -> std::io::Result<()> {
    let socket = super::socket_path(&data_dir);
    if UnixStream::connect(&socket).await.is_ok() {
        tracing::info!(socket = %socket.display(), "a keeper already runs here");
        return Ok(());
    }
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    // Become the subreaper before any child exists.
    process::start_reaper();
    tracing::info!(socket = %socket.display(), "keeper started");

    let state: Shared = Arc::default();
    let mut idle_since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, state.clone()));
                }
                // Out of descriptors, for instance: the children still need their keeper.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept an agent connection");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        enforce_leases(&state);
        let (busy, retiring) = {
            let s = state.lock().expect("keeper state poisoned");
            let running = s.children.values().any(|c| !c.exited);
            (
                running || s.agent.as_ref().is_some_and(|a| !a.control.is_closed()),
                s.retiring && !running,
            )
        };
        if busy {
            idle_since = tokio::time::Instant::now();
        }
        if retiring || idle_since.elapsed() > IDLE_EXIT {
            tracing::info!("keeper exiting: no child left");
            let _ = std::fs::remove_file(&socket);
            return Ok(());
        }
    }
}

/// Stops every child whose lease ran out: SIGTERM to its tree at the lease, SIGKILL after its
/// grace. The agent does the same when it can; this holds while it cannot.
fn enforce_leases(state: &Shared) {
    let mut s = state.lock().expect("keeper state poisoned");
    let State {
        children,
        leases,
        last_contact,
        ..
    } = &mut *s;
    let Some(silent) = last_contact.map(|t| t.elapsed()) else {
        return;
    };
    leases.retain(|key, _| children.get(key).is_some_and(|c| !c.exited));
    for (key, lease) in leases.iter_mut() {
        if silent <= lease.lease || lease.killed {
            continue;
        }
        match lease.terminated {
            None => {
                tracing::warn!(key = %key, silent_s = silent.as_secs(), "lease expired and no agent stopped the child; the keeper stops it");
                process::signal_tree(lease.pid, key, Signal::SIGTERM);
                lease.terminated = Some(Instant::now());
            }
            Some(at) if at.elapsed() >= lease.grace => {
                process::signal_tree(lease.pid, key, Signal::SIGKILL);
                lease.killed = true;
            }
            Some(_) => {}
        }
    }
}

/// One agent connection; a newer one replaces it.
async fn serve(stream: UnixStream, state: Shared) {
    let (read, mut write) = stream.into_split();
    let (lines_tx, mut lines_rx) = mpsc::channel::<Message>(LINE_QUEUE);
    let (tx, mut control_rx) = mpsc::unbounded_channel::<Message>();
    state.lock().expect("keeper state poisoned").agent = Some(AgentLink {
        lines: lines_tx,
        control: tx.clone(),
    });
    tracing::info!("agent connected");

    let writer = tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                biased;
                m = control_rx.recv() => m,
                m = lines_rx.recv() => m,
            };
            let Some(message) = message else { return };
            let mut line = serde_json::to_vec(&message).expect("keeper messages serialize");
            line.push(b'\n');
            if write.write_all(&line).await.is_err() {
                return;
            }
        }
    });
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match serde_json::from_str::<Request>(&line) {
            Ok(request) => handle(request, &state, &tx).await,
            Err(e) => tracing::warn!(error = %e, "bad request from the agent"),
        }
    }
    {
        let mut s = state.lock().expect("keeper state poisoned");
        if s.agent
            .as_ref()
            .is_some_and(|a| a.control.same_channel(&tx))
        {
            s.agent = None;
        }
    }
    writer.abort();
    tracing::info!("agent disconnected");
}

async fn handle(request: Request, state: &Shared, reply: &mpsc::UnboundedSender<Message>) {
    match request {
        Request::Spawn { id, launch } => {
            let message = spawn(*launch, state.clone());
            let message = match message {
                Ok((pid, start_time)) => Message::Spawned {
                    id,
                    pid,
                    start_time,
                },
                Err(e) => Message::SpawnFailed {
                    id,
                    kind: e.kind.to_string(),
                    message: e.message,
                },
            };
            let _ = reply.send(message);
        }
        Request::List { id } => {
            let s = state.lock().expect("keeper state poisoned");
            let children = s.children.values().cloned().collect();
            let silent_ms = s.last_contact.map(|t| t.elapsed().as_millis() as u64);
            drop(s);
            let _ = reply.send(Message::Children {
                id,
                children,
                silent_ms,
            });
        }
        Request::Forget { key } => {
            let mut s = state.lock().expect("keeper state poisoned");
            if s.children.get(&key).is_some_and(|c| c.exited) {
                s.children.remove(&key);
            }
        }
        Request::Retire => state.lock().expect("keeper state poisoned").retiring = true,
        Request::Contact { silent_ms } => contact(state, silent_ms),
    }
}

/// The agent heard from the controller `silent_ms` ago. Contact only moves forward.
fn contact(state: &Shared, silent_ms: u64) {
    let at = Instant::now()
        .checked_sub(Duration::from_millis(silent_ms))
        .unwrap_or_else(Instant::now);
    let mut s = state.lock().expect("keeper state poisoned");
    if s.last_contact.is_none_or(|last| at > last) {
        s.last_contact = Some(at);
    }
}

fn spawn(spec: LaunchSpec, state: Shared) -> Result<(u32, u64), process::SpawnError> {
    if let Some(silent_ms) = spec.silent_ms {
        contact(&state, silent_ms);
    }
    let launch = Launch {
        argv: spec.argv.clone(),
        shell: spec.shell,
        env: spec.env.clone(),
        workdir: PathBuf::from(&spec.workdir),
        attempt_key: spec.key.clone(),
        user: (!spec.user.is_empty()).then(|| spec.user.clone()),
    };
    let spawned = process::spawn(&launch)?;
    let pid = spawned.pid;
    let start = start_time(pid).unwrap_or(0);
    let mut s = state.lock().expect("keeper state poisoned");
    if spec.lease_ms > 0 {
        s.leases.insert(
            spec.key.clone(),
            Lease {
                pid,
                lease: Duration::from_millis(spec.lease_ms),
                grace: Duration::from_millis(spec.grace_ms),
                terminated: None,
                killed: false,
            },
        );
    }
    s.children.insert(
        spec.key.clone(),
        ChildInfo {
            key: spec.key.clone(),
            pid,
            start_time: start,
            exit_code: None,
            signal: None,
            exited: false,
        },
    );
    drop(s);

    let limits = LogLimits {
        max_file_bytes: spec.max_file_bytes,
        max_line_bytes: spec.max_line_bytes,
        ..Default::default()
    };
    let outputs: [(&'static str, std::os::fd::OwnedFd, &str); 2] = [
        ("stdout", spawned.stdout.into(), &spec.stdout_log),
        ("stderr", spawned.stderr.into(), &spec.stderr_log),
    ];
    let mut drains = Vec::new();
    for (stream, fd, path) in outputs {
        let file = LogFile::open(Path::new(path).to_path_buf(), limits);
        let (key, on_line_state) = (spec.key.clone(), state.clone());
        let on_line = move |line: &str| {
            send(
                &on_line_state,
                Message::Line {
                    key: key.clone(),
                    stream: stream.into(),
                    line: line.to_string(),
                },
            );
        };
        let (key, on_drop_state) = (spec.key.clone(), state.clone());
        let on_drop = move |error: &str| {
            send(
                &on_drop_state,
                Message::Dropped {
                    key,
                    stream: stream.into(),
                    error: error.to_string(),
                },
            );
        };
        drains.push(tokio::spawn(logs::drain(fd, file, on_line, on_drop)));
    }

    let key = spec.key;
    let exit = spawned.exit;
    tokio::spawn(async move {
        let exit = exit.await.ok();
        // Output written just before the exit arrives first.
        for drain in drains {
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        }
        let (exit_code, signal) = match exit {
            Some(Exit::Code(c)) => (Some(c), None),
            Some(Exit::Signal(s)) => (None, Some(s)),
            None => (None, None),
        };
        {
            let mut s = state.lock().expect("keeper state poisoned");
            if let Some(child) = s.children.get_mut(&key) {
                child.exit_code = exit_code;
                child.signal = signal;
                child.exited = true;
            }
        }
        send(
            &state,
            Message::Exit {
                key,
                exit_code,
                signal,
            },
        );
    });
    Ok((pid, start))
}
