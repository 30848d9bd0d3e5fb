//! `muster-controller`: read flags and config, open state, serve until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use muster_controller::{config, Controller, Options, TlsFiles};

#[derive(Debug, Parser)]
#[command(name = "muster-controller", version, about = "The Muster controller")]
struct Args {
    /// Address to listen on; port 0 picks a free port (written to DATA_DIR/controller.addr).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Where the state database and the inbox live.
    #[arg(long, default_value = "./.muster/controller")]
    data_dir: PathBuf,
    /// Serve Prometheus /metrics over HTTP here (port 0: a free port, written to
    /// DATA_DIR/metrics.addr).
    #[arg(long)]
    http: Option<String>,
    /// The controller's TLS certificate (PEM); with --tls-key, serve TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA of client certificates (nodes, operators): mTLS, identities from certificates.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Allow plaintext on an address that is not loopback.
    #[arg(long)]
    insecure: bool,
    /// Config file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(&args.log_format);

    let settings = match &args.config {
        Some(path) => match config::load(path) {
            Ok(s) => s,
            Err(errors) => {
                for e in errors {
                    eprintln!("muster-controller: config error: {e}");
                }
                return ExitCode::from(2);
            }
        },
        None => config::Settings::default(),
    };

    let tls = match (args.tls_cert.clone(), args.tls_key.clone()) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert,
            key,
            client_ca: args.tls_client_ca.clone(),
        }),
        _ => None,
    };
    if tls.is_none() && !args.insecure && !is_loopback(&args.listen) {
        eprintln!("muster-controller: --listen {} is not loopback: serve TLS (--tls-cert, --tls-key) or pass --insecure", args.listen);
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Runtime::new().expect("building the tokio runtime");
    runtime.block_on(async move {
        let options = Options {
            listen: args.listen,
            http: args.http,
            tls,
            data_dir: args.data_dir,
            settings,
        };
        let controller = match Controller::open(options).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("muster-controller: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
        let shutdown = async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        };
        match controller.serve(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("muster-controller: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Plaintext is fine on loopback only.
fn is_loopback(listen: &str) -> bool {
    let host = listen
        .rsplit_once(':')
        .map_or(listen, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
