//! The Muster controller: node sessions, placement, the health loop, the state store, the
//! inbox and the operator API.

#![forbid(unsafe_code)]

pub mod alert;
pub mod auth;
pub mod config;
pub mod core;
pub mod event;
pub mod inbox;
pub mod lineage;
pub mod model;
pub mod service;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use muster_proto::v1::{
    fleet_service_server::FleetServiceServer, node_service_server::NodeServiceServer,
};

use crate::config::Settings;
use crate::core::{Core, CoreHandle, Input};
use crate::inbox::Inbox;
use crate::store::Store;

/// Largest gRPC message accepted (a submit of many tasks, a log chunk).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Why the controller could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening state: {0}")]
    Core(#[from] crate::core::CoreError),
    #[error("state database: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("inbox: {0}")]
    Inbox(#[from] crate::inbox::InboxError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS file {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// PEM files for TLS: the controller's certificate and key, and the CA that signs client
/// certificates (nodes, operators).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

pub struct Options {
    pub listen: String,
    pub tls: Option<TlsFiles>,
    /// Where to serve Prometheus `/metrics` over HTTP (none: not served).
    pub http: Option<String>,
    pub data_dir: PathBuf,
    pub settings: Settings,
}

/// A controller whose state is open and whose port is bound.
pub struct Controller {
    listener: TcpListener,
    core: Core,
    inbox: Arc<Inbox>,
    addr: SocketAddr,
    data_dir: PathBuf,
    alerts: config::Alerts,
    auth: Arc<auth::Auth>,
    http: Option<TcpListener>,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl Controller {
    /// Opens the store and inbox and binds the port; nothing is served yet.
    pub async fn open(options: Options) -> Result<Controller, StartError> {
        let dir = &options.data_dir;
        std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let inbox = Arc::new(Inbox::open(
            &dir.join("inbox"),
            options.settings.inbox_segment_bytes,
        )?);
        let store = Store::open(&dir.join("state.db"))?;
        let key_path = dir.join("task-token.key");
        let task_key =
            auth::TaskKey::load_or_create(&key_path).map_err(|source| StartError::DataDir {
                path: key_path.clone(),
                source,
            })?;
        let core = Core::open(
            options.settings.core.clone(),
            options.settings.alerts.clone(),
            store,
            inbox.clone(),
        )?
        .with_task_key(task_key.clone());
        let listener =
            TcpListener::bind(&options.listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: options.listen.clone(),
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: options.listen.clone(),
            source,
        })?;
        let http = match &options.http {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| StartError::Listen {
                            addr: addr.clone(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let tls = match &options.tls {
            Some(files) => Some(tls_config(files)?),
            None => None,
        };
        let mut auth = options.settings.auth;
        auth.mtls = options.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        auth.task_key = Some(task_key.clone());
        Ok(Controller {
            listener,
            core,
            inbox,
            addr,
            data_dir: options.data_dir,
            alerts: options.settings.alerts,
            auth: Arc::new(auth),
            http,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` resolves, then drains: stops taking requests, lets the core
    /// commit its last batch, and returns.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let (core, inputs) = CoreHandle::channel();
        let mut queues = std::collections::HashMap::new();
        if let Some(slack) = self.alerts.slack.clone() {
            queues.insert(
                alert::Dest::Slack,
                alert::deliver::spawn_slack(slack, core.clone()),
            );
        }
        if let Some(pagerduty) = self.alerts.pagerduty.clone() {
            queues.insert(
                alert::Dest::Pagerduty,
                alert::deliver::spawn_pagerduty(pagerduty, core.clone()),
            );
        }
        let mut state = self.core;
        let lineage = state.lineage();
        state.attach_handle(core.clone());
        state.attach_alert_queues(queues);
        let core_thread = state.spawn(inputs);
        let (health, health_service) = tonic_health::server::health_reporter();
        // Each reflection version also lists the other, so every client sees every service.
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(muster_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .build_v1()
            .expect("reflection descriptors are valid");
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(muster_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("reflection descriptors are valid");

        let fleet = FleetServiceServer::new(service::fleet::Fleet::new(
            core.clone(),
            self.inbox.clone(),
            self.auth.clone(),
            lineage,
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let nodes = NodeServiceServer::new(service::node::NodeSessions::new(
            core.clone(),
            self.auth.clone(),
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        health
            .set_serving::<FleetServiceServer<service::fleet::Fleet>>()
            .await;
        health
            .set_serving::<NodeServiceServer<service::node::NodeSessions>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;

        if let Some(listener) = self.http {
            let scrape_core = core.clone();
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(http = %addr, "serving /metrics");
                let _ = std::fs::write(
                    self.data_dir.join("metrics.addr"),
                    format!("http://{addr}/metrics\n"),
                );
            }
            tokio::spawn(muster_proto::metrics::serve(listener, move || {
                let core = scrape_core.clone();
                async move {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    if !core.send(Input::Request(crate::core::Request::Metrics { reply: tx })) {
                        return String::new();
                    }
                    match rx.await {
                        Ok(Ok(text)) => text,
                        _ => String::new(),
                    }
                }
            }));
        }
        let url = if self.tls.is_some() {
            format!("https://{}", self.addr)
        } else {
            format!("http://{}", self.addr)
        };
        // `muster` and tests find a controller listening on port 0 through this file.
        let addr_file = self.data_dir.join("controller.addr");
        let _ = std::fs::write(&addr_file, format!("{url}\n"));
        tracing::info!(listen = %self.addr, data_dir = %self.data_dir.display(), "controller serving");

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls)?;
        }
        let server = builder
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(fleet)
            .add_service(nodes)
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.listener), async {
                let _ = stop_rx.await;
            });
        let server = tokio::spawn(server);

        shutdown.await;
        tracing::info!("shutting down");
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        if core.send(Input::Shutdown(done_tx)) {
            let _ = done_rx.await;
        }
        let _ = stop_tx.send(());
        // Long-lived streams (node sessions, watches) would hold a graceful shutdown open.
        if tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .is_err()
        {
            tracing::debug!("streams still open at shutdown; closing them");
        }
        let _ = core_thread.join();
        let _ = std::fs::remove_file(addr_file);
        tracing::info!("controller stopped");
        Ok(())
    }
}

fn tls_config(files: &TlsFiles) -> Result<tonic::transport::ServerTlsConfig, StartError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| StartError::TlsFile {
            path: path.clone(),
            source,
        })
    };
    let identity = tonic::transport::Identity::from_pem(read(&files.cert)?, read(&files.key)?);
    let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &files.client_ca {
        // Optional: operators may come with a token instead; node sessions and callers
        // without a token still need a certificate (see `auth`).
        config = config
            .client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?))
            .client_auth_optional(true);
    }
    Ok(config)
}
