//! The Muster node agent: starts and supervises child processes on one worker and streams
//! their status to the controller.

// Unsafe code is denied except for the one `pre_exec` in `process`, which says why.
#![deny(unsafe_code)]

pub mod keeper;
pub mod logs;
pub mod outbox;
pub mod process;
pub mod rules;
pub mod runner;
pub mod session;
pub mod status;
pub mod supervisor;
pub mod task_inbox;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use muster_proto::v1::Capacity;

use crate::logs::LogLimits;
use crate::outbox::Outbox;
use crate::session::Session;
use crate::supervisor::Supervisor;

/// How the agent was started.
#[derive(Debug, Clone)]
pub struct Config {
    pub controller: String,
    pub name: String,
    pub data_dir: PathBuf,
    pub capacity: Capacity,
    pub labels: HashMap<String, String>,
    pub log_limits: LogLimits,
    /// Bearer token for the controller (role `node`), when it requires tokens.
    pub token: Option<String>,
    /// For an https:// controller: the CA that signed its certificate, and this node's
    /// certificate and key (its identity, `node:NAME`).
    pub tls: Option<TlsFiles>,
    /// Allow a plaintext http:// controller that is not on loopback.
    pub insecure: bool,
    /// Where `MUSTER_DATA_DIR` of each task lives (`ROOT/<task>`); shared storage here lets a
    /// task resume its checkpoints on another node. Default: inside each task's directory.
    pub task_data_root: Option<PathBuf>,
}

/// PEM files for mTLS with the controller.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// What every part of the agent shares.
pub struct Context {
    pub node: String,
    pub controller: String,
    pub instance: String,
    pub data_dir: PathBuf,
    pub labels: HashMap<String, String>,
    pub log_limits: LogLimits,
    pub outbox: Arc<Outbox>,
    pub task_data_root: Option<PathBuf>,
    pub token: Option<String>,
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// The controller's CA file, handed to children as MUSTER_CA for their own calls.
    pub tls_ca: Option<PathBuf>,
    /// The last seq written to each task's `MUSTER_INBOX` file.
    pub inbox_seqs: std::sync::Mutex<HashMap<String, u64>>,
    pub keeper: Arc<keeper::client::Keeper>,
    /// A random id made once per data dir.
    pub data_dir_id: String,
    /// When the controller was last heard from, and the lease it granted.
    pub contact: std::sync::Mutex<Contact>,
    pub stats: Stats,
}

/// Counters for the node's `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub attempts_started: std::sync::atomic::AtomicU64,
    pub attempts_failed: std::sync::atomic::AtomicU64,
    pub restarts: std::sync::atomic::AtomicU64,
    pub spawn_failures: std::sync::atomic::AtomicU64,
    pub connected: std::sync::atomic::AtomicBool,
}

/// The node's contact with the controller, for the lease.
#[derive(Debug, Clone, Copy)]
pub struct Contact {
    pub last: std::time::Instant,
    pub lease: Duration,
    /// This agent has heard from the controller at least once.
    pub heard: bool,
}

impl Context {
    /// How long the controller has been silent.
    pub fn silent_for(&self) -> Duration {
        self.contact
            .lock()
            .expect("contact poisoned")
            .last
            .elapsed()
    }

    pub fn heard_from_controller(&self) {
        let mut contact = self.contact.lock().expect("contact poisoned");
        contact.last = std::time::Instant::now();
        contact.heard = true;
    }
}

impl Context {
    /// The directory of a task's logs, status file and data; names are validated, so they
    /// are safe path components.
    pub fn task_dir(&self, task: &str) -> PathBuf {
        self.data_dir.join("tasks").join(task)
    }

    /// Every attempt key of this node starts with this; keys survive agent restarts. The
    /// data dir's own id keeps two agents of one machine apart even with one node name.
    pub fn key_prefix(&self) -> String {
        format!("muster:{}:{}:", self.node, self.data_dir_id)
    }

    /// The task's `MUSTER_INBOX`: events about its descendants, one JSON line each.
    pub fn task_inbox(&self, task: &str) -> PathBuf {
        self.task_dir(task).join("inbox.jsonl")
    }

    /// The task's `MUSTER_DATA_DIR`, kept across restarts.
    pub fn task_data_dir(&self, task: &str) -> PathBuf {
        match &self.task_data_root {
            Some(root) => root.join(task),
            None => self.task_dir(task).join("data"),
        }
    }
}

/// A config problem found before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--name {0}")]
    Name(String),
    #[error("--controller {0:?} is not an http:// or https:// URL")]
    Controller(String),
    #[error("--controller {0} is plaintext and not on loopback: use https:// with --tls-ca, or pass --insecure")]
    Plaintext(String),
    #[error(
        "--controller {0} is https://: give --tls-ca (the CA of the controller's certificate)"
    )]
    NoCa(String),
    #[error("{flag} {path}: {source}")]
    TlsFile {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--data-dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Config {
    /// Checks the config; every problem is reported together.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut errors = Vec::new();
        if let Err(problem) = muster_proto::spec::check_name(&self.name) {
            errors.push(ConfigError::Name(problem));
        }
        if !(self.controller.starts_with("http://") || self.controller.starts_with("https://")) {
            errors.push(ConfigError::Controller(self.controller.clone()));
        }
        if let Some(host) = self.controller.strip_prefix("http://") {
            let host = host.split(['/', ':']).next().unwrap_or_default();
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
                || host.starts_with('[');
            if !loopback && !self.insecure {
                errors.push(ConfigError::Plaintext(self.controller.clone()));
            }
        }
        if self.controller.starts_with("https://") && self.tls.is_none() {
            errors.push(ConfigError::NoCa(self.controller.clone()));
        }
        if let Some(tls) = &self.tls {
            let files = [
                ("--tls-ca", Some(&tls.ca)),
                ("--tls-cert", tls.cert.as_ref()),
                ("--tls-key", tls.key.as_ref()),
            ];
            for (flag, path) in files {
                if let Some(path) = path {
                    if let Err(source) = std::fs::File::open(path) {
                        errors.push(ConfigError::TlsFile {
                            flag,
                            path: path.clone(),
                            source,
                        });
                    }
                }
            }
        }
        if let Err(source) = std::fs::create_dir_all(self.data_dir.join("tasks")) {
            errors.push(ConfigError::DataDir {
                path: self.data_dir.clone(),
                source,
            });
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// The data dir's id, made on first use.
fn data_dir_id(dir: &std::path::Path) -> String {
    let file = dir.join("node.id");
    if let Ok(id) = std::fs::read_to_string(&file) {
        if !id.trim().is_empty() {
            return id.trim().to_string();
        }
    }
    let id = format!("{:08x}", rand::random::<u32>());
    if let Err(e) = std::fs::write(&file, &id) {
        tracing::warn!(path = %file.display(), error = %e, "cannot record the data dir id");
    }
    id
}

/// A running agent.
pub struct Agent {
    ctx: Arc<Context>,
    supervisor: Arc<Supervisor>,
    capacity: Capacity,
}

impl Agent {
    /// Connects to the node's keeper (starting it if needed) and re-adopts every attempt
    /// that survived a previous agent: running ones keep running, ones that exited meanwhile
    /// report their real exit.
    pub async fn start(config: Config) -> Result<Agent, keeper::client::KeeperError> {
        let instance = format!("{:016x}", rand::random::<u64>());
        let tls = match &config.tls {
            Some(files) => {
                Some(
                    client_tls(files).map_err(|e| keeper::client::KeeperError::Start {
                        exe: files.ca.clone(),
                        source: e,
                    })?,
                )
            }
            None => None,
        };
        let keeper = Arc::new(keeper::client::Keeper::connect_or_start(&config.data_dir).await?);
        let data_dir_id = data_dir_id(&config.data_dir);
        let tls_ca = config.tls.as_ref().map(|t| t.ca.clone());
        let ctx = Arc::new(Context {
            node: config.name,
            controller: config.controller,
            instance,
            data_dir: config.data_dir,
            labels: config.labels,
            log_limits: config.log_limits,
            outbox: Arc::new(Outbox::new()),
            task_data_root: config.task_data_root,
            token: config.token,
            tls,
            tls_ca,
            inbox_seqs: Default::default(),
            keeper,
            data_dir_id,
            // Until a Welcome says otherwise: the controller's default lease.
            stats: Stats::default(),
            contact: std::sync::Mutex::new(Contact {
                last: std::time::Instant::now(),
                lease: Duration::from_secs(30),
                heard: false,
            }),
        });
        let supervisor = Supervisor::new(ctx.clone());
        let (children, silent) = ctx.keeper.list().await?;
        if let Some(silent) = silent {
            // The lease clock goes on across an agent restart: a new agent must not give
            // tasks a fresh lease the controller never granted.
            let mut contact = ctx.contact.lock().expect("contact poisoned");
            contact.last = std::time::Instant::now()
                .checked_sub(silent)
                .unwrap_or_else(std::time::Instant::now);
            contact.heard = true;
        }
        supervisor.adopt_all(children);
        Ok(Agent {
            supervisor,
            ctx,
            capacity: config.capacity,
        })
    }

    /// Serves Prometheus `/metrics` on `listener` for as long as the runtime runs.
    pub fn serve_metrics(&self, listener: tokio::net::TcpListener) {
        let (ctx, supervisor) = (self.ctx.clone(), self.supervisor.clone());
        tokio::spawn(muster_proto::metrics::serve(listener, move || {
            let text = metrics(&ctx, &supervisor);
            async move { text }
        }));
    }

    /// The prefix of every attempt key of this node, for a forced kill of all its tasks.
    pub fn key_prefix(&self) -> String {
        self.ctx.key_prefix()
    }

    /// Runs until `shutdown` resolves, then stops every task (SIGTERM, grace, SIGKILL),
    /// reports their ends to the controller if it can, and returns. Returns early with an
    /// error if the keeper goes away (its children can no longer be supervised).
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), keeper::client::KeeperError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let session = Arc::new(Session {
            ctx: self.ctx.clone(),
            supervisor: self.supervisor.clone(),
            capacity: self.capacity,
        });
        let running = tokio::spawn({
            let session = session.clone();
            async move { session.run(stop_rx).await }
        });

        let lease_watch = tokio::spawn({
            let supervisor = self.supervisor.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tick.tick().await;
                    supervisor.enforce_lease();
                    supervisor.tell_keeper_contact();
                }
            }
        });
        let mut gone = self.ctx.keeper.gone.clone();
        tokio::select! {
            _ = shutdown => {}
            _ = gone.wait_for(|g| *g) => {
                tracing::error!("the keeper died; exiting so that a new agent and keeper take over");
                return Err(keeper::client::KeeperError::Gone);
            }
        }
        lease_watch.abort();
        tracing::info!(
            tasks = self.supervisor.len(),
            "shutting down: stopping tasks"
        );
        let stopped = self
            .supervisor
            .stop_all("node_shutdown", Duration::from_secs(120))
            .await;
        if !stopped {
            tracing::warn!("some tasks did not stop in time");
        }
        self.ctx.keeper.retire();
        // The keeper leaves once its last child is gone; wait for it, so that nothing of the
        // node outlives the agent's clean exit.
        let mut gone = self.ctx.keeper.gone.clone();
        let _ = tokio::time::timeout(Duration::from_secs(3), gone.wait_for(|g| *g)).await;
        // Give the session a moment to deliver the tasks' ends before it closes.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while !self.ctx.outbox.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop_tx.send(true);
        let _ = running.await;
        tracing::info!(unsent = self.ctx.outbox.len(), "node agent stopped");
        Ok(())
    }
}

fn metrics(ctx: &Context, supervisor: &Supervisor) -> String {
    use muster_proto::metrics::{render, Family};
    use std::sync::atomic::Ordering::Relaxed;
    let mut tasks = Family::new("muster_node_tasks", "gauge", "Tasks on this node by phase.");
    // Not `running()`: a scrape must not read inbox files nor touch what Hello reports.
    let phases = supervisor.phases();
    for phase in ["starting", "running", "backoff", "stopping"] {
        let n = phases.iter().filter(|p| **p == phase).count();
        tasks = tasks.with(&[("phase", phase)], n as f64);
    }
    let s = &ctx.stats;
    render(&[
        tasks,
        Family::new(
            "muster_node_attempts_started_total",
            "counter",
            "Attempts started on this node.",
        )
        .with(&[], s.attempts_started.load(Relaxed) as f64),
        Family::new(
            "muster_node_attempts_failed_total",
            "counter",
            "Attempts that exited non-zero or by a signal nobody asked for.",
        )
        .with(&[], s.attempts_failed.load(Relaxed) as f64),
        Family::new(
            "muster_node_restarts_total",
            "counter",
            "Restarts this node's agent decided.",
        )
        .with(&[], s.restarts.load(Relaxed) as f64),
        Family::new(
            "muster_node_spawn_failures_total",
            "counter",
            "Attempts that could not start.",
        )
        .with(&[], s.spawn_failures.load(Relaxed) as f64),
        Family::new(
            "muster_node_outbox_events",
            "gauge",
            "Events waiting for the controller's acknowledgement.",
        )
        .with(&[], ctx.outbox.len() as f64),
        Family::new(
            "muster_node_controller_connected",
            "gauge",
            "1 while a session with the controller is up.",
        )
        .with(&[], if s.connected.load(Relaxed) { 1.0 } else { 0.0 }),
        Family::new(
            "muster_node_controller_silence_seconds",
            "gauge",
            "Seconds since the controller was last heard from.",
        )
        .with(&[], ctx.silent_for().as_secs_f64()),
    ])
}

/// The client side of mTLS: trust the controller's CA, present this node's certificate.
fn client_tls(files: &TlsFiles) -> std::io::Result<tonic::transport::ClientTlsConfig> {
    let mut config = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(std::fs::read(&files.ca)?),
    );
    if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
        config = config.identity(tonic::transport::Identity::from_pem(
            std::fs::read(cert)?,
            std::fs::read(key)?,
        ));
    }
    Ok(config)
}
