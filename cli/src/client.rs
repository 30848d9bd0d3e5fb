//! Reaching the controller: the address from the flag, the environment or the local fleet,
//! and gRPC errors turned into one readable line and an exit code.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use muster_proto::v1::fleet_service_client::FleetServiceClient;

/// A failure the CLI reports: message for stderr, process exit code.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl Failure {
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NOT_FOUND: u8 = 3;
    pub const DENIED: u8 = 4;

    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code,
        }
    }

    pub fn failed(message: impl Into<String>) -> Failure {
        Failure::new(Self::FAILED, message)
    }

    pub fn usage(message: impl Into<String>) -> Failure {
        Failure::new(Self::USAGE, message)
    }
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Failure {
        use tonic::Code;
        let code = match status.code() {
            Code::InvalidArgument | Code::AlreadyExists => Failure::USAGE,
            Code::NotFound => Failure::NOT_FOUND,
            Code::PermissionDenied | Code::Unauthenticated => Failure::DENIED,
            _ => Failure::FAILED,
        };
        let message = match status.code() {
            Code::Cancelled | Code::DeadlineExceeded
                if status.message().contains("Timeout")
                    || status.code() == Code::DeadlineExceeded =>
            {
                "the controller did not answer within 30s".to_string()
            }
            Code::Unavailable
                if status.message().contains("transport") || status.message().is_empty() =>
            {
                "controller unreachable (is it running? see --controller)".to_string()
            }
            // A plaintext call to a TLS port fails deep in HTTP/2.
            _ if status.message().contains("h2 protocol error") => format!(
                "{} (does the controller speak TLS? use an https:// URL)",
                status.message()
            ),
            _ => status.message().to_string(),
        };
        Failure { message, code }
    }
}

/// Adds `authorization: Bearer $MUSTER_TOKEN` to every call when the variable is set.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    fn from_env() -> Result<Bearer, Failure> {
        match std::env::var("MUSTER_TOKEN") {
            Ok(token) if !token.trim().is_empty() => format!("Bearer {}", token.trim())
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| Failure::usage("MUSTER_TOKEN has characters a header cannot carry")),
            _ => Ok(Bearer(None)),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type Client =
    FleetServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// The controller URL: `--controller`, else `MUSTER_CONTROLLER` (both via clap), else the
/// local fleet that `muster up` runs from `data_dir`.
pub fn resolve(flag: Option<&str>, data_dir: &Path) -> Result<String, Failure> {
    if let Some(url) = flag.filter(|u| !u.is_empty()) {
        return Ok(url.to_string());
    }
    let addr_file = data_dir.join("controller").join("controller.addr");
    match std::fs::read_to_string(&addr_file) {
        Ok(url) => Ok(url.trim().to_string()),
        Err(_) => Err(Failure::usage(format!(
            "no controller given: pass --controller URL, set MUSTER_CONTROLLER, or start a local fleet with `muster up` (looked for {})",
            addr_file.display()
        ))),
    }
}

/// A client whose calls give up after 30 s, so a stuck controller never hangs the CLI.
pub async fn connect(url: &str) -> Result<Client, Failure> {
    connect_with(url, Some(Duration::from_secs(30))).await
}

/// A client for long streams (`--follow`): no deadline on a call.
pub async fn connect_streaming(url: &str) -> Result<Client, Failure> {
    connect_with(url, None).await
}

async fn connect_with(url: &str, timeout: Option<Duration>) -> Result<Client, Failure> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|_| {
            Failure::usage(format!(
                "controller address {url:?} is not a URL like http://127.0.0.1:7070"
            ))
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if let Some(t) = timeout {
        endpoint = endpoint.timeout(t);
    }
    if url.starts_with("https://") {
        endpoint = endpoint
            .tls_config(tls_config()?)
            .map_err(|e| Failure::usage(format!("TLS for {url}: {e}")))?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        Failure::failed(format!(
            "cannot reach the controller at {url}: {}",
            root_cause(&e)
        ))
    })?;
    Ok(
        FleetServiceClient::with_interceptor(channel, Bearer::from_env()?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20),
    )
}

/// Where `muster up` keeps its certificates; set once by `main` from `--data-dir`.
pub static CERTS_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The CA from `$MUSTER_CA` (else the local fleet's), and a client certificate from
/// `$MUSTER_CERT` and `$MUSTER_KEY` (else the local fleet's operator certificate, if any).
fn tls_config() -> Result<tonic::transport::ClientTlsConfig, Failure> {
    let dir = CERTS_DIR
        .get()
        .cloned()
        .unwrap_or_else(|| std::path::PathBuf::from(".muster/certs"));
    let path = |var: &str, file: &str| {
        std::env::var_os(var)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| dir.join(file))
    };
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| {
            Failure::usage(format!(
                "{}: {e} (set MUSTER_CA, MUSTER_CERT, MUSTER_KEY)",
                p.display()
            ))
        })
    };
    let ca = path("MUSTER_CA", "ca.pem");
    let mut config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(&ca)?));
    if std::env::var_os("MUSTER_CERT").is_some() || std::env::var_os("MUSTER_KEY").is_some() {
        // Named explicitly: they must be there.
        let (cert, key) = (
            path("MUSTER_CERT", "admin-local.pem"),
            path("MUSTER_KEY", "admin-local-key.pem"),
        );
        config = config.identity(tonic::transport::Identity::from_pem(
            read(&cert)?,
            read(&key)?,
        ));
    } else if dir.join("admin-local.pem").exists() {
        // The local fleet of `muster up --tls`: its user is admin.
        let (cert, key) = (dir.join("admin-local.pem"), dir.join("admin-local-key.pem"));
        config = config.identity(tonic::transport::Identity::from_pem(
            read(&cert)?,
            read(&key)?,
        ));
    }
    Ok(config)
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
