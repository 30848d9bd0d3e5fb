//! `muster-node-agent`: read flags, start the agent, stop its tasks on the first signal and
//! kill them on the second.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use muster_node_agent::{logs::LogLimits, process, Agent, Config};
use muster_proto::v1::Capacity;

#[derive(Debug, Parser)]
#[command(
    name = "muster-node-agent",
    version,
    about = "Starts and supervises Muster tasks on this machine"
)]
struct Args {
    /// Controller URL, http://host:port or https://host:port.
    #[arg(long, env = "MUSTER_CONTROLLER")]
    controller: String,
    /// Node name, unique in the fleet ([a-z0-9._-]).
    #[arg(long)]
    name: String,
    /// Where task logs, status files and task data live.
    #[arg(long, default_value = "./.muster-node")]
    data_dir: PathBuf,
    /// Task slots offered (default: number of CPUs).
    #[arg(long)]
    slots: Option<u32>,
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// Memory offered to tasks in MiB (default: the machine's total).
    #[arg(long)]
    memory_mb: Option<u64>,
    /// Node labels, k=v,k2=v2.
    #[arg(long, value_parser = parse_labels, default_value = "")]
    labels: HashMap<String, String>,
    /// Cap of each log file before it is rotated, in bytes.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    log_max_bytes: u64,
    /// Shared directory for task data (MUSTER_DATA_DIR = DIR/<task>), e.g. on shared
    /// storage so that a task moved to another node finds its checkpoints.
    #[arg(long)]
    task_data_dir: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

fn parse_labels(s: &str) -> Result<HashMap<String, String>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("label {pair:?} is not key=value"))?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn total_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(&args.log_format);
    raise_open_file_limit();

    let config = Config {
        controller: args.controller,
        name: args.name,
        data_dir: args.data_dir,
        capacity: Capacity {
            slots: args.slots.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
            }),
            gpus: args.gpus,
            memory_mb: args.memory_mb.unwrap_or_else(total_memory_mb),
        },
        labels: args.labels,
        task_data_root: args.task_data_dir,
        log_limits: LogLimits {
            max_file_bytes: args.log_max_bytes.max(4096),
            ..Default::default()
        },
    };
    if let Err(errors) = config.validate() {
        for e in errors {
            eprintln!("muster-node-agent: {e}");
        }
        return ExitCode::from(2);
    }

    let runtime = tokio::runtime::Runtime::new().expect("building the tokio runtime");
    runtime.block_on(async move {
        tracing::info!(node = %config.name, controller = %config.controller, slots = config.capacity.slots, "node agent starting");
        let agent = Agent::new(config);
        let instance = agent.instance().to_string();
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            let _ = first_tx.send(());
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            let killed = process::kill_instance(&instance);
            tracing::warn!(killed, "second signal: killed every task process, exiting now");
            std::process::exit(130);
        });
        agent.run(async { let _ = first_rx.await; }).await;
        ExitCode::SUCCESS
    })
}

/// Many children mean many pipes and log files: lift the soft open-file limit to the hard
/// one before anything starts.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
        },
        _ => {}
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MUSTER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
