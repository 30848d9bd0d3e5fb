//! The keeper: one small process per node that is the parent of every task process and
//! outlives the agent, so a node agent can be killed and started again without stopping,
//! restarting or duplicating any child (the design of runsvdir and s6-svscan).
//!
//! The keeper spawns children, drains their output into the log files, reaps them and keeps
//! their exit status until the agent has taken it. It also holds the controller's lease as a
//! backstop: a child whose lease ran out is stopped by the keeper even while the agent is
//! dead or frozen, so the replacement the controller places never runs beside it. The agent talks to it over a Unix socket
//! in the node's data dir, one JSON message per line; everything else (restart policy,
//! status files, stopping process trees, the controller session) stays in the agent.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

/// Everything the keeper needs to start one attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// The attempt key, also set as MUSTER_ATTEMPT_KEY in the child's environment.
    pub key: String,
    pub argv: Vec<String>,
    pub shell: bool,
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub stdout_log: String,
    pub stderr_log: String,
    pub max_file_bytes: u64,
    pub max_line_bytes: usize,
    /// Run as this user; empty: as the agent.
    #[serde(default)]
    pub user: String,
    /// Out of contact with the controller this long (as the agent last said), the keeper
    /// stops the child itself, also when the agent is dead or frozen; 0: never.
    #[serde(default)]
    pub lease_ms: u64,
    /// SIGTERM to SIGKILL when the keeper stops a child for its lease.
    #[serde(default)]
    pub grace_ms: u64,
    /// How long ago the agent heard from the controller, when it asked for this spawn (None:
    /// never); the lease clock starts no later than this.
    #[serde(default)]
    pub silent_ms: Option<u64>,
}

/// One child the keeper knows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildInfo {
    pub key: String,
    pub pid: u32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, the
    /// process's identity.
    pub start_time: u64,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub exited: bool,
}

/// Agent to keeper.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Spawn {
        id: u64,
        launch: Box<LaunchSpec>,
    },
    List {
        id: u64,
    },
    /// The agent has recorded this child's exit; the keeper may forget it.
    Forget {
        key: String,
    },
    /// The agent is shutting down for good: exit once no child is left.
    Retire,
    /// The agent heard from the controller `silent_ms` ago.
    Contact {
        silent_ms: u64,
    },
}

/// Keeper to agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Message {
    Spawned {
        id: u64,
        pid: u32,
        start_time: u64,
    },
    SpawnFailed {
        id: u64,
        kind: String,
        message: String,
    },
    Children {
        id: u64,
        children: Vec<ChildInfo>,
        /// How long ago the last agent heard from the controller, if one ever told.
        #[serde(default)]
        silent_ms: Option<u64>,
    },
    Exit {
        key: String,
        exit_code: Option<i32>,
        signal: Option<i32>,
    },
    Line {
        key: String,
        stream: String,
        line: String,
    },
    Dropped {
        key: String,
        stream: String,
        error: String,
    },
}

/// Start time of a process in clock ticks since boot, from /proc/PID/stat.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    // Field 22 overall; `rest` starts at field 3.
    rest.split(' ').nth(19)?.parse().ok()
}

/// The socket path in a node's data dir.
pub fn socket_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("keeper.sock")
}
