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
    /// Longer output lines are split (with a "[line split]" marker) for matching and tails.
    #[arg(long, default_value_t = 8 * 1024)]
    log_max_line_bytes: usize,
    /// Shared directory for task data (MUSTER_DATA_DIR = DIR/<task>), e.g. on shared
    /// storage so that a task moved to another node finds its checkpoints.
    #[arg(long)]
    task_data_dir: Option<PathBuf>,
    /// Serve Prometheus /metrics over HTTP here (port 0: a free port, written to
    /// DATA_DIR/metrics.addr).
    #[arg(long)]
    http: Option<String>,
    /// Bearer token (role node) when the controller requires tokens.
    #[arg(long, env = "MUSTER_NODE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// For an https:// controller: the CA of its certificate (PEM).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM, common name node:NAME) and key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow a plaintext http:// controller that is not on loopback.
    #[arg(long)]
    insecure: bool,
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
    // `muster-node-agent keeper --data-dir DIR`: the per-node keeper the agent starts.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("keeper") {
        return keeper_main(&argv[2..]);
    }
    let args = Args::parse();
    init_tracing(&args.log_format);
    raise_open_file_limit();

    let config = Config {
        controller: args.controller,
        name: args.name,
        // Children run in other directories: every path handed to them must be absolute.
        data_dir: std::path::absolute(&args.data_dir).unwrap_or(args.data_dir),
        capacity: Capacity {
            slots: args.slots.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
            }),
            gpus: args.gpus,
            memory_mb: args.memory_mb.unwrap_or_else(total_memory_mb),
        },
        labels: args.labels,
        task_data_root: args
            .task_data_dir
            .map(|d| std::path::absolute(&d).unwrap_or(d)),
        token: args.token,
        tls: args.tls_ca.map(|ca| muster_node_agent::TlsFiles {
            ca,
            cert: args.tls_cert,
            key: args.tls_key,
        }),
        insecure: args.insecure,
        log_limits: LogLimits {
            max_file_bytes: args.log_max_bytes.max(4096),
            max_line_bytes: args.log_max_line_bytes.clamp(64, 1 << 20),
            ..Default::default()
        },
    };
    if let Err(errors) = config.validate() {
        for e in errors {
            eprintln!("muster-node-agent: {e}");
        }
        return ExitCode::from(2);
    }

    let (http, data_dir) = (args.http.clone(), config.data_dir.clone());
    let runtime = tokio::runtime::Runtime::new().expect("building the tokio runtime");
    runtime.block_on(async move {
        tracing::info!(node = %config.name, controller = %config.controller, slots = config.capacity.slots, "node agent starting");
        let agent = match Agent::start(config).await {
            Ok(agent) => agent,
            Err(e) => {
                eprintln!("muster-node-agent: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(addr) = &http {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    if let Ok(local) = listener.local_addr() {
                        tracing::info!(http = %local, "serving /metrics");
                        let _ = std::fs::write(data_dir.join("metrics.addr"), format!("http://{local}/metrics\n"));
                    }
                    agent.serve_metrics(listener);
                }
                Err(e) => {
                    eprintln!("muster-node-agent: --http {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let prefix = agent.key_prefix();
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            let _ = first_tx.send(());
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            let killed = process::kill_keys_with_prefix(&prefix, &Default::default());
            tracing::warn!(killed, "second signal: killed every task process, exiting now");
            std::process::exit(130);
        });
        match agent.run(async { let _ = first_rx.await; }).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("muster-node-agent: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn keeper_main(args: &[String]) -> ExitCode {
    let data_dir = match args {
        [flag, dir] if flag == "--data-dir" => PathBuf::from(dir),
        _ => {
            eprintln!("usage: muster-node-agent keeper --data-dir DIR");
            return ExitCode::from(2);
        }
    };
    init_tracing("text");
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    // The keeper ignores SIGINT and SIGTERM meant for a process group it left; it ends when
    // the agent retires it or when it has been idle.
    match runtime.block_on(muster_node_agent::keeper::server::run(data_dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("muster-node-agent keeper: {e}");
            ExitCode::FAILURE
        }
    }
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
