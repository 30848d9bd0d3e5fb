//! `muster up`: a local fleet — one controller and N node agents as separate processes on
//! loopback ports chosen free — running an example, with a live table, stopped cleanly.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

use muster_proto::v1;

use crate::client::{self, Failure};
use crate::output;

pub struct UpArgs {
    pub data_dir: PathBuf,
    pub nodes: u32,
    pub slots: u32,
    pub example: Option<String>,
    pub exit_when_done: bool,
    /// Run the fleet with mTLS: a development CA and certificates in DATA_DIR/certs.
    pub tls: bool,
}

/// One daemon of the fleet.
struct Daemon {
    name: String,
    child: Child,
}

impl Daemon {
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
    }

    /// Waits for the daemon to exit; SIGKILL after `deadline`.
    async fn wait(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > deadline {
                eprintln!(
                    "muster up: {} did not stop in {}s; killing it",
                    self.name,
                    deadline.as_secs()
                );
                let _ = self.child.kill();
                return self.child.wait().ok();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub async fn run(args: UpArgs) -> Result<(), Failure> {
    let data_dir = absolute(&args.data_dir)?;
    let bin_dir = daemon_binaries()?;
    let logs_dir = data_dir.join("logs");
    std::fs::create_dir_all(&logs_dir)
        .map_err(|e| Failure::failed(format!("creating {}: {e}", logs_dir.display())))?;
    let addr_file = data_dir.join("controller").join("controller.addr");
    if let Ok(url) = std::fs::read_to_string(&addr_file) {
        if client::connect(url.trim()).await.is_ok() {
            return Err(Failure::failed(format!(
                "a fleet already runs from {} at {}; stop it first",
                data_dir.display(),
                url.trim()
            )));
        }
        let _ = std::fs::remove_file(&addr_file);
    }
    let example = match &args.example {
        Some(name) => Some(find_example(name)?),
        None => None,
    };

    let mut daemons = Vec::new();
    let result = async {
        let certs = data_dir.join("certs");
        let mut controller_args: Vec<String> =
            vec!["--listen".into(), "127.0.0.1:0".into(), "--data-dir".into(), data_dir.join("controller").display().to_string()];
        if args.tls {
            crate::certs::init(&certs)?;
            crate::certs::issue(&certs, crate::certs::Subject::Controller("127.0.0.1".into()))?;
            crate::certs::issue(&certs, crate::certs::Subject::Operator { role: "operator".into(), name: "local".into() })?;
            // The local user runs the whole fleet: admin, so cordon and drain work too.
            crate::certs::issue(&certs, crate::certs::Subject::Operator { role: "admin".into(), name: "local".into() })?;
            for (flag, file) in [("--tls-cert", "controller-127.0.0.1.pem"), ("--tls-key", "controller-127.0.0.1-key.pem"), ("--tls-client-ca", "ca.pem")] {
                controller_args.extend([flag.to_string(), certs.join(file).display().to_string()]);
            }
        }
        let controller = spawn_daemon("controller", &bin_dir.join("muster-controller"), &controller_args, &logs_dir)?;
        daemons.push(controller);
        let url = wait_for_addr(&addr_file, &mut daemons[0]).await?;
        eprintln!("muster up: controller at {url} (logs in {})", logs_dir.display());
        for i in 1..=args.nodes {
            let name = format!("node-{i}");
            let node_args = vec![
                "--controller".into(),
                url.clone(),
                "--name".into(),
                name.clone(),
                "--data-dir".into(),
                data_dir.join("nodes").join(&name).display().to_string(),
                "--slots".into(),
                args.slots.to_string(),
                "--labels".into(),
                format!("fleet=local,node={name}"),
                // One machine: every node shares task data, so a task placed on another node
                // after a restart resumes from its checkpoint.
                "--task-data-dir".into(),
                data_dir.join("task-data").display().to_string(),
            ];
            let mut node_args = node_args;
            if args.tls {
                crate::certs::issue(&certs, crate::certs::Subject::Node(name.clone()))?;
                for (flag, file) in [("--tls-ca", "ca.pem".to_string()), ("--tls-cert", format!("node-{name}.pem")), ("--tls-key", format!("node-{name}-key.pem"))] {
                    node_args.extend([flag.to_string(), certs.join(file).display().to_string()]);
                }
            }
            daemons.push(spawn_daemon(&name, &bin_dir.join("muster-node-agent"), &node_args, &logs_dir)?);
        }
        let mut client = client::connect(&url).await?;
        wait_for_nodes(&mut client, args.nodes, &mut daemons).await?;
        eprintln!("muster up: {} nodes ready; export MUSTER_CONTROLLER={url} to use `muster` from another shell", args.nodes);

        let submitted = match &example {
            Some(path) => submit_example(&mut client, path).await?,
            None => Vec::new(),
        };
        watch(&mut client, &submitted, &mut daemons, args.exit_when_done).await
    }
    .await;

    shutdown(&mut daemons, &data_dir).await;
    result
}

fn absolute(path: &Path) -> Result<PathBuf, Failure> {
    std::path::absolute(path)
        .map_err(|e| Failure::usage(format!("--data-dir {}: {e}", path.display())))
}

/// The daemons live beside this binary. When this binary was started from a Cargo
/// workspace (`cargo run`), they are built first, so one command builds everything.
fn daemon_binaries() -> Result<PathBuf, Failure> {
    let exe = std::env::current_exe()
        .map_err(|e| Failure::failed(format!("finding this binary: {e}")))?;
    let dir = exe
        .parent()
        .expect("an executable has a directory")
        .to_path_buf();
    let names = ["muster-controller", "muster-node-agent"];
    let missing = names.iter().any(|n| !dir.join(n).exists());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf);
    let from_cargo = std::env::var_os("CARGO").is_some();
    if let Some(workspace) =
        workspace.filter(|w| (missing || from_cargo) && w.join("Cargo.toml").exists())
    {
        let release = dir.ends_with("release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.current_dir(&workspace).args([
            "build",
            "--bin",
            "muster-controller",
            "--bin",
            "muster-node-agent",
        ]);
        if release {
            build.arg("--release");
        }
        eprintln!("muster up: building the daemons");
        let status = build
            .status()
            .map_err(|e| Failure::failed(format!("running cargo build: {e}")))?;
        if !status.success() {
            return Err(Failure::failed(
                "building muster-controller and muster-node-agent failed",
            ));
        }
    }
    if let Some(n) = names.iter().find(|n| !dir.join(n).exists()) {
        return Err(Failure::failed(format!(
            "{n} not found beside {}; build it with `cargo build --release --bins`",
            exe.display()
        )));
    }
    Ok(dir)
}

fn spawn_daemon(
    name: &str,
    bin: &Path,
    args: &[String],
    logs_dir: &Path,
) -> Result<Daemon, Failure> {
    let log_path = logs_dir.join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Failure::failed(format!("opening {}: {e}", log_path.display())))?;
    let mut command = Command::new(bin);
    // Tasks start children of their own with `muster`: this very binary comes first on
    // their PATH.
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        let mut path = std::ffi::OsString::from(dir);
        if let Some(old) = std::env::var_os("PATH") {
            path.push(":");
            path.push(old);
        }
        command.env("PATH", path);
    }
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| Failure::failed(e.to_string()))?,
        )
        .stderr(log)
        // Its own process group: Ctrl-C reaches only `muster up`, which then stops the
        // fleet in order (node agents first, so tasks end cleanly, then the controller).
        .process_group(0);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
    // parent; it makes the daemon get SIGTERM (and drain) if `muster up` itself dies.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| Failure::failed(format!("starting {}: {e}", bin.display())))?;
    Ok(Daemon {
        name: name.to_string(),
        child,
    })
}

async fn wait_for_addr(addr_file: &Path, controller: &mut Daemon) -> Result<String, Failure> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(url) = std::fs::read_to_string(addr_file) {
            if !url.trim().is_empty() {
                return Ok(url.trim().to_string());
            }
        }
        if !controller.alive() {
            return Err(Failure::failed(
                "the controller exited at start; see its log",
            ));
        }
        if Instant::now() > deadline {
            return Err(Failure::failed(
                "the controller did not start listening within 30s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_nodes(
    client: &mut client::Client,
    want: u32,
    daemons: &mut [Daemon],
) -> Result<(), Failure> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = client
            .list_nodes(v1::ListNodesRequest {})
            .await?
            .into_inner()
            .nodes;
        // A node left cordoned by an earlier run is connected all the same.
        let connected = nodes
            .iter()
            .filter(|n| matches!(n.state.as_str(), "ready" | "cordoned"))
            .count() as u32;
        if connected >= want {
            return Ok(());
        }
        if let Some(name) = first_dead(daemons) {
            return Err(Failure::failed(format!(
                "{name} exited at start; see its log"
            )));
        }
        if Instant::now() > deadline {
            return Err(Failure::failed(format!(
                "only {} of {want} nodes connected within 30s",
                nodes.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Finds `examples/NAME/sweep.toml` from the current directory, else in the workspace this
/// binary was built from.
fn find_example(name: &str) -> Result<PathBuf, Failure> {
    if muster_proto::spec::check_name(name).is_err() {
        return Err(Failure::usage(format!(
            "--example {name:?} is not an example name"
        )));
    }
    let relative = Path::new("examples").join(name).join("sweep.toml");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|w| w.join(&relative));
    [Some(relative.clone()), workspace]
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .ok_or_else(|| {
            Failure::usage(format!(
                "example {name:?} not found (looked for {})",
                relative.display()
            ))
        })
}

async fn submit_example(client: &mut client::Client, path: &Path) -> Result<Vec<String>, Failure> {
    let specs = crate::load_specs(path)?;
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    match client
        .submit(v1::SubmitRequest {
            tasks: specs,
            parent: String::new(),
        })
        .await
    {
        Ok(_) => eprintln!(
            "muster up: submitted {} tasks from {}",
            names.len(),
            path.display()
        ),
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            eprintln!(
                "muster up: the tasks of {} exist already in this data dir; watching them",
                path.display()
            );
        }
        Err(status) => return Err(status.into()),
    }
    Ok(names)
}

/// Shows the live table until Ctrl-C, a daemon dies, or (with `exit_when_done`) every
/// submitted task and all it started has settled.
async fn watch(
    client: &mut client::Client,
    submitted: &[String],
    daemons: &mut [Daemon],
    exit_when_done: bool,
) -> Result<(), Failure> {
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Failure::failed(e.to_string()))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| Failure::failed(e.to_string()))?;
    let tty = std::io::stdout().is_terminal();
    let mut last_states: HashMap<String, String> = HashMap::new();
    let started = Instant::now();
    loop {
        if let Some(name) = first_dead(daemons) {
            return Err(Failure::failed(format!(
                "{name} died; stopping the fleet (see its log)"
            )));
        }
        let tasks = client
            .list_tasks(v1::ListTasksRequest::default())
            .await?
            .into_inner()
            .tasks;
        let nodes = client
            .list_nodes(v1::ListNodesRequest {})
            .await?
            .into_inner()
            .nodes;
        if tty {
            print_screen(&tasks, &nodes, started);
        } else {
            print_changes(&tasks, &mut last_states);
        }

        let settled = |t: &v1::Task| {
            matches!(
                t.state.as_str(),
                "succeeded" | "failed" | "stopped" | "crash_loop"
            )
        };
        // The submitted tasks and everything they started; with nothing submitted here (no
        // example, or a data dir picked up again), every task of the fleet.
        let mine: Vec<&v1::Task> = tasks
            .iter()
            .filter(|t| submitted.is_empty() || submitted.contains(&t.root))
            .collect();
        if exit_when_done && !mine.is_empty() && mine.iter().all(|t| settled(t)) {
            println!("{}", summary(&tasks, started));
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = int.recv() => { eprintln!("\nmuster up: stopping the fleet"); return Ok(()); }
            _ = term.recv() => { eprintln!("muster up: stopping the fleet"); return Ok(()); }
        }
    }
}

fn first_dead(daemons: &mut [Daemon]) -> Option<String> {
    daemons
        .iter_mut()
        .find_map(|d| (!d.alive()).then(|| d.name.clone()))
}

fn summary(tasks: &[v1::Task], started: Instant) -> String {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in tasks {
        *counts.entry(t.state.as_str()).or_default() += 1;
    }
    let mut parts: Vec<_> = counts
        .into_iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    parts.sort();
    format!(
        "{} tasks after {}s: {}",
        tasks.len(),
        started.elapsed().as_secs(),
        parts.join(", ")
    )
}

fn print_screen(tasks: &[v1::Task], nodes: &[v1::Node], started: Instant) {
    let width = terminal_width();
    let ready = nodes.iter().filter(|n| n.state == "ready").count();
    let mut out = String::from("\x1b[H\x1b[2J");
    out.push_str(&format!(
        "muster up — {ready}/{} nodes ready — {}   (Ctrl-C stops the fleet)\n\n",
        nodes.len(),
        summary(tasks, started)
    ));
    out.push_str(&output::tasks_table(tasks, width));
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

/// Without a terminal, one line per task state change.
fn print_changes(tasks: &[v1::Task], last: &mut HashMap<String, String>) {
    for t in tasks {
        let name = t.spec.as_ref().map_or(String::new(), |s| s.name.clone());
        if last.get(&name) != Some(&t.state) {
            println!(
                "{name:<24} {:<11} {:<8} attempt {:<3} {} {}",
                t.state,
                t.node,
                t.attempt,
                output::metrics_short(&t.metrics, 4),
                t.message
            );
            last.insert(name, t.state.clone());
        }
    }
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(160)
}

/// Node agents first (they stop their tasks within each task's grace), then the controller.
/// A second Ctrl-C tells the node agents to kill their tasks at once.
async fn shutdown(daemons: &mut [Daemon], data_dir: &Path) {
    let (controller, nodes) = match daemons.split_first_mut() {
        Some(split) => split,
        None => return,
    };
    for node in nodes.iter() {
        node.signal(Signal::SIGTERM);
    }
    let mut int = signal(SignalKind::interrupt()).ok();
    let mut forced = false;
    for i in 0..nodes.len() {
        loop {
            tokio::select! {
                _ = nodes[i].wait(Duration::from_secs(90)) => break,
                Some(()) = async { int.as_mut()?.recv().await }, if !forced => {
                    eprintln!("muster up: killing every task now");
                    forced = true;
                    // A node agent's second signal kills its tasks without grace.
                    for node in nodes.iter() {
                        node.signal(Signal::SIGTERM);
                    }
                }
            }
        }
    }
    controller.signal(Signal::SIGTERM);
    controller.wait(Duration::from_secs(15)).await;
    let left = kill_leftovers(data_dir);
    if left > 0 {
        eprintln!("muster up: killed {left} processes a dead node agent left behind");
    }
    eprintln!("muster up: fleet stopped");
}

/// A node agent that died (SIGKILL) leaves its keeper and tasks running; the fleet's own
/// processes are known by their data dir, in the keepers' arguments and the tasks'
/// environment.
fn kill_leftovers(data_dir: &Path) -> usize {
    let nodes = format!("{}/nodes/", data_dir.display());
    let marker = format!("MUSTER_DATA_DIR={}/", data_dir.display());
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let keeper = cmdline.split(|&b| b == 0).any(|a| a == b"keeper")
            && cmdline
                .split(|&b| b == 0)
                .any(|a| a.starts_with(nodes.as_bytes()));
        let task = environ
            .split(|&b| b == 0)
            .any(|v| v.starts_with(marker.as_bytes()));
        if keeper || task {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}
