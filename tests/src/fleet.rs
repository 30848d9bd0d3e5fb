//! A fleet on loopback for one test: a controller and node agents from target/release in a
//! temp dir, driven through the `muster` CLI and the inbox files, and torn down on drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use tempfile::TempDir;

use crate::inbox;
use crate::process::{
    binary_dir, kill_processes_with_env, poll_until, processes_with_arg_containing,
    processes_with_env, run_with_deadline, signal_pid, wait_child, wait_until,
};
use crate::{CLI_DEADLINE, START_DEADLINE};

/// Controller timings short enough for tests, with room for a slow, loaded machine.
pub const FAST_CONTROLLER: &str = r#"[controller]
tick = "250ms"
heartbeat_interval = "500ms"
node_timeout = "5s"
reschedule_after = "30s"
report_sample = "1s"
"#;

/// How a fleet is started.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Slots per node agent.
    pub slots: u32,
    /// The controller's config file.
    pub controller_config: String,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            slots: 4,
            controller_config: FAST_CONTROLLER.to_string(),
        }
    }
}

/// A live process started for a task's attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskProcess {
    pub pid: i32,
    pub task: String,
    pub attempt: u64,
}

struct Agent {
    name: String,
    child: Child,
}

/// A running fleet. Dropping it stops every process it started, tasks included.
pub struct Fleet {
    dir: Option<TempDir>,
    root: PathBuf,
    bins: PathBuf,
    controller: Option<Child>,
    port: u16,
    url: String,
    agents: Vec<Agent>,
}

impl Fleet {
    /// Starts a controller and `nodes` node agents (node-1, node-2, ...), and waits until
    /// the controller lists every node as ready.
    pub fn start(nodes: u32, options: FleetOptions) -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("muster-e2e-")
            .tempdir()
            .expect("creating the fleet's temp dir");
        let root = dir.path().to_path_buf();
        for sub in ["logs", "specs", "controller"] {
            std::fs::create_dir_all(root.join(sub)).expect("creating the fleet's folders");
        }
        std::fs::write(root.join("controller.toml"), &options.controller_config)
            .expect("writing the controller config");

        let mut fleet = Fleet {
            dir: Some(dir),
            root,
            bins: binary_dir(),
            controller: None,
            port: 0,
            url: String::new(),
            agents: Vec::new(),
        };
        fleet.start_controller();
        for i in 1..=nodes {
            fleet.start_node_agent(&format!("node-{i}"), options.slots);
        }
        fleet.wait_for_nodes_ready(nodes as usize);
        fleet
    }

    /// The controller's URL (the same across controller restarts).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The fleet's temp dir; every process of the fleet keeps its files below it.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    pub fn controller_dir(&self) -> PathBuf {
        self.root.join("controller")
    }

    /// The folder a node agent keeps for one task (stdout.log, stderr.log, data/, ...).
    pub fn task_dir(&self, node: &str, task: &str) -> PathBuf {
        self.root.join("nodes").join(node).join("tasks").join(task)
    }

    /// Starts the controller on the fleet's port (a free one the first time) and waits for
    /// it to serve. A stale controller.addr from a killed controller is removed first.
    pub fn start_controller(&mut self) {
        assert!(
            self.controller.is_none(),
            "the controller is running already"
        );
        let addr_file = self.controller_dir().join("controller.addr");
        let _ = std::fs::remove_file(&addr_file);

        // The port of a controller killed a moment ago can be busy for a short while.
        let started = poll_until(START_DEADLINE, || {
            let mut child = self.spawn_controller();
            let url = poll_until(START_DEADLINE, || {
                if let Ok(Some(_)) = child.try_wait() {
                    return Some(None);
                }
                let text = std::fs::read_to_string(&addr_file).ok()?;
                let url = text.trim();
                (!url.is_empty()).then(|| Some(url.to_string()))
            })
            .flatten();
            match url {
                Some(url) => Some((child, url)),
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    None
                }
            }
        });
        let Some((child, url)) = started else {
            panic!(
                "the controller did not start serving; its log:\n{}",
                self.log_tail("controller", 40)
            );
        };
        if self.port == 0 {
            self.port = port_of(&url);
        }
        assert_eq!(
            port_of(&url),
            self.port,
            "the controller came back on another port"
        );
        self.url = url;
        self.controller = Some(child);
    }

    fn spawn_controller(&self) -> Child {
        let mut command = Command::new(self.bins.join("muster-controller"));
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.controller_dir())
            .arg("--config")
            .arg(self.root.join("controller.toml"))
            // Metrics on a free port; its URL lands in DATA_DIR/metrics.addr.
            .arg("--http")
            .arg("127.0.0.1:0");
        self.spawn_daemon(command, "controller")
    }

    /// Starts a node agent (again) with its usual data dir.
    pub fn start_node_agent(&mut self, name: &str, slots: u32) {
        let url = self.url.clone();
        self.start_node_agent_via(name, slots, &url);
    }

    /// Starts a node agent that reaches the controller at `controller_url` (a proxy).
    pub fn start_node_agent_via(&mut self, name: &str, slots: u32, controller_url: &str) {
        let mut command = Command::new(self.bins.join("muster-node-agent"));
        command
            .arg("--controller")
            .arg(controller_url)
            .arg("--name")
            .arg(name)
            .arg("--data-dir")
            .arg(self.root.join("nodes").join(name))
            .arg("--slots")
            .arg(slots.to_string())
            .arg("--labels")
            .arg(format!("fleet=e2e,node={name}"))
            .arg("--http")
            .arg("127.0.0.1:0");
        let child = self.spawn_daemon(command, name);
        self.agents.push(Agent {
            name: name.to_string(),
            child,
        });
    }

    fn spawn_daemon(&self, mut command: Command, log_name: &str) -> Child {
        let log_path = self.root.join("logs").join(format!("{log_name}.log"));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("opening a daemon log");
        // Tasks run `muster` to start children: the binaries under test come first on PATH.
        let mut path = std::ffi::OsString::from(&self.bins);
        if let Some(old) = std::env::var_os("PATH") {
            path.push(":");
            path.push(old);
        }
        command
            .env_remove("MUSTER_CONTROLLER")
            .env_remove("MUSTER_TOKEN")
            .env("PATH", path)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning a log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {log_name}: {e}"))
    }

    /// Signals the controller and waits for it to exit (SIGKILL after the deadline).
    pub fn kill_controller(&mut self, signal: Signal) -> Option<ExitStatus> {
        let mut child = self.controller.take().expect("the controller is running");
        signal_pid(child.id() as i32, signal);
        wait_child(&mut child, START_DEADLINE)
    }

    /// Signals a node agent and waits for it to exit (SIGKILL after the deadline).
    pub fn kill_node_agent(&mut self, name: &str, signal: Signal) -> Option<ExitStatus> {
        let index = self
            .agents
            .iter()
            .position(|a| a.name == name)
            .unwrap_or_else(|| panic!("no running node agent {name}"));
        let mut agent = self.agents.remove(index);
        signal_pid(agent.child.id() as i32, signal);
        wait_child(&mut agent.child, Duration::from_secs(30))
    }

    /// The pid of a running node agent.
    pub fn node_agent_pid(&self, name: &str) -> i32 {
        self.agents
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.child.id() as i32)
            .unwrap_or_else(|| panic!("no running node agent {name}"))
    }

    pub fn controller_pid(&self) -> Option<u32> {
        self.controller.as_ref().map(Child::id)
    }

    /// The live processes of this fleet that belong to `task` (its child and whatever the
    /// child started), each with the attempt number it was started for.
    pub fn task_processes(&self, task: &str) -> Vec<TaskProcess> {
        self.all_task_processes()
            .into_iter()
            .filter(|p| p.task == task)
            .collect()
    }

    /// Every live process of this fleet that a node agent started for a task, found by the
    /// MUSTER_* variables of its environment.
    pub fn all_task_processes(&self) -> Vec<TaskProcess> {
        let prefix = format!("{}/", self.root.display());
        processes_with_env("MUSTER_DATA_DIR", &prefix)
            .into_iter()
            .filter_map(|pid| {
                let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
                let var = |key: &str| {
                    env.split(|&b| b == 0).find_map(|v| {
                        v.strip_prefix(format!("{key}=").as_bytes())
                            .map(|value| String::from_utf8_lossy(value).into_owned())
                    })
                };
                Some(TaskProcess {
                    pid,
                    task: var("MUSTER_TASK")?,
                    attempt: var("MUSTER_ATTEMPT")?.parse().ok()?,
                })
            })
            .collect()
    }

    /// Waits until `muster nodes --json` lists `count` nodes, all ready.
    pub fn wait_for_nodes_ready(&self, count: usize) {
        let mut last = Value::Null;
        let ready = poll_until(START_DEADLINE, || {
            let output = self.muster(&["nodes", "--json"]);
            last = serde_json::from_slice(&output.stdout).ok()?;
            let nodes = last.as_array()?;
            let ready = nodes.iter().filter(|n| n["state"] == "ready").count();
            (nodes.len() == count && ready == count).then_some(())
        });
        assert!(ready.is_some(), "nodes did not all become ready: {last:#}");
    }

    /// Runs the CLI against this fleet's controller.
    pub fn muster(&self, args: &[&str]) -> Output {
        let mut command = Command::new(self.bins.join("muster"));
        command
            .env_remove("MUSTER_CONTROLLER")
            .current_dir(&self.root)
            .arg("--controller")
            .arg(&self.url)
            .args(args);
        run_with_deadline(&mut command, CLI_DEADLINE)
    }

    /// Runs the CLI and returns its stdout; panics with its stderr if it fails.
    pub fn muster_ok(&self, args: &[&str]) -> String {
        let output = self.muster(args);
        assert!(
            output.status.success(),
            "muster {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs the CLI with `--json` output and parses it.
    pub fn muster_json(&self, args: &[&str]) -> Value {
        let stdout = self.muster_ok(args);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("muster {args:?} printed no JSON ({e}): {stdout}"))
    }

    /// Writes `text` to specs/NAME.toml in the fleet dir and returns the file's path.
    pub fn write_spec(&self, name: &str, text: &str) -> PathBuf {
        let path = self.root.join("specs").join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("writing a spec file");
        path
    }

    /// `muster submit` of a spec file, whatever its outcome.
    pub fn try_submit_toml(&self, name: &str, text: &str) -> Output {
        let path = self.write_spec(name, text);
        self.muster(&["submit", path.to_str().expect("temp paths are UTF-8")])
    }

    /// `muster submit` of a spec file that must be accepted.
    pub fn submit_toml(&self, name: &str, text: &str) {
        let path = self.write_spec(name, text);
        self.muster_ok(&["submit", path.to_str().expect("temp paths are UTF-8")]);
    }

    /// `muster show TASK --json`.
    pub fn show(&self, task: &str) -> Value {
        self.muster_json(&["show", task, "--json"])
    }

    /// `muster ls --json`.
    pub fn tasks(&self) -> Vec<Value> {
        match self.muster_json(&["ls", "--json"]) {
            Value::Array(tasks) => tasks,
            other => panic!("muster ls --json printed no array: {other}"),
        }
    }

    /// Waits until `muster show` reports `state` for the task; returns the task then.
    pub fn wait_for_task_state(&self, task: &str, state: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        let found = poll_until(timeout, || {
            last = self.show(task);
            (last["state"] == state).then(|| last.clone())
        });
        found.unwrap_or_else(|| {
            panic!(
                "task {task} did not reach state {state} within {}s; last seen: {last:#}\n\
                 inbox tail:\n{}",
                timeout.as_secs(),
                inbox::tail(&self.read_inbox(), 30)
            )
        })
    }

    /// Every event of the inbox, parsed from the files under the controller's data dir.
    pub fn read_inbox(&self) -> Vec<Value> {
        inbox::read_inbox_dir(&self.controller_dir().join("inbox"))
    }

    /// The inbox events that match.
    pub fn events(&self, matches: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.read_inbox()
            .into_iter()
            .filter(|e| matches(e))
            .collect()
    }

    /// The first inbox event that matches, waiting for it; panics with the inbox tail.
    pub fn wait_for_event(&self, matches: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        let found = poll_until(timeout, || self.read_inbox().into_iter().find(&matches));
        found.unwrap_or_else(|| {
            panic!(
                "no matching inbox event within {}s; inbox tail:\n{}",
                timeout.as_secs(),
                inbox::tail(&self.read_inbox(), 40)
            )
        })
    }

    /// The pid of a task's attempt, from its attempt.started event.
    pub fn wait_for_attempt_pid(&self, task: &str, attempt: u64, timeout: Duration) -> i32 {
        let started = self.wait_for_event(
            |e| inbox::is_event(e, "attempt.started", task) && inbox::attempt_of(e) == attempt,
            timeout,
        );
        let pid = started["data"]["pid"].as_i64();
        pid.filter(|&p| p > 0)
            .unwrap_or_else(|| panic!("attempt.started without a pid: {started}")) as i32
    }

    /// Waits for a file that a task writes, and returns its contents once `ready` accepts
    /// them (a writer may not be done yet).
    pub fn wait_for_file(
        &self,
        path: &Path,
        timeout: Duration,
        ready: impl Fn(&str) -> bool,
    ) -> String {
        wait_until(&format!("{}", path.display()), timeout, || {
            std::fs::read_to_string(path).ok().filter(|t| ready(t))
        })
    }

    /// The last `lines` lines of a daemon's log (controller, node-1, ...).
    pub fn log_tail(&self, daemon: &str, lines: usize) -> String {
        let path = self.root.join("logs").join(format!("{daemon}.log"));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn stop_everything(&mut self) {
        // Node agents first, so they stop their tasks; each test task has a short grace.
        for agent in &self.agents {
            signal_pid(agent.child.id() as i32, Signal::SIGTERM);
            // A test may have left it stopped (SIGSTOP) to cut it off.
            signal_pid(agent.child.id() as i32, Signal::SIGCONT);
        }
        for agent in &mut self.agents {
            if wait_child(&mut agent.child, Duration::from_secs(30)).is_none() {
                eprintln!("{} did not stop on SIGTERM; killed it", agent.name);
            }
        }
        if let Some(mut controller) = self.controller.take() {
            signal_pid(controller.id() as i32, Signal::SIGTERM);
            if wait_child(&mut controller, Duration::from_secs(15)).is_none() {
                eprintln!("the controller did not stop on SIGTERM; killed it");
            }
        }

        // Whatever a task left behind (a detached grandchild, an agent that was killed)
        // carries its task's data dir in its environment.
        let prefix = format!("{}/", self.root.display());
        let left = kill_processes_with_env("MUSTER_DATA_DIR", &prefix, Duration::from_secs(10));
        if left > 0 {
            eprintln!("killed {left} task processes left behind");
        }
        // A node's keeper retires after a clean agent stop; after a killed agent it would
        // linger until idle, so it goes too.
        for pid in processes_with_arg_containing(&prefix) {
            signal_pid(pid, Signal::SIGKILL);
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for name in std::iter::once("controller".to_string())
                .chain(self.agents.iter().map(|a| a.name.clone()))
            {
                eprintln!("--- {name} log (tail) ---\n{}", self.log_tail(&name, 25));
            }
        }
        self.stop_everything();
        if std::env::var_os("MUSTER_E2E_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("keeping {}", dir.keep().display());
            }
        }
    }
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("controller URL without a port: {url}"))
}
