//! `NodeService.Connect`: one bidirectional stream per node agent, bridged to the core.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use muster_proto::v1::{self, node_message::Body, node_service_server::NodeService};

use crate::core::{CoreHandle, Input, SessionHandle};

/// Messages buffered towards one node before the session counts as stuck.
const OUTBOUND_BUFFER: usize = 4096;

pub struct NodeSessions {
    core: CoreHandle,
    auth: Arc<crate::auth::Auth>,
    next_id: Arc<AtomicU64>,
}

impl NodeSessions {
    pub fn new(core: CoreHandle, auth: Arc<crate::auth::Auth>) -> Self {
        NodeSessions {
            core,
            auth,
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }
}

type Outbound = Pin<Box<dyn Stream<Item = Result<v1::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl NodeService for NodeSessions {
    type ConnectStream = Outbound;

    async fn connect(
        &self,
        request: Request<Streaming<v1::NodeMessage>>,
    ) -> Result<Response<Outbound>, Status> {
        self.auth.check(&request, crate::auth::Role::Node)?;
        // A node's identity is its certificate: it may only speak for itself.
        let certified = crate::auth::peer_common_name(&request).filter(|_| self.auth.mtls);
        let mut inbound = request.into_inner();
        let hello = match inbound.next().await {
            Some(Ok(v1::NodeMessage {
                body: Some(Body::Hello(hello)),
            })) => hello,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "first message of a session must be Hello",
                ))
            }
        };
        if let Err(problem) = muster_proto::spec::check_name(&hello.node) {
            return Err(Status::invalid_argument(format!("hello.node {problem}")));
        }
        if let Some(cn) = certified {
            if cn != format!("node:{}", hello.node) {
                return Err(Status::permission_denied(format!(
                    "certificate {cn:?} may not speak for node {}",
                    hello.node
                )));
            }
        }

        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::channel(OUTBOUND_BUFFER);
        let node = hello.node.clone();
        let session = SessionHandle { id, tx };
        if !self.core.send(Input::Hello { session, hello }) {
            return Err(Status::unavailable("controller is shutting down"));
        }

        let core = self.core.clone();
        let span = tracing::info_span!("node_session", node = %node, session = id);
        tokio::spawn(
            async move {
                loop {
                    match inbound.next().await {
                        Some(Ok(v1::NodeMessage {
                            body: Some(Body::Batch(batch)),
                        })) => {
                            if !core.send(Input::Batch {
                                session_id: id,
                                node: node.clone(),
                                batch,
                            }) {
                                break;
                            }
                        }
                        Some(Ok(_)) => tracing::debug!("ignoring a second Hello"),
                        Some(Err(status)) => {
                            tracing::debug!(error = %status, "node stream error");
                            break;
                        }
                        None => break,
                    }
                }
                core.send(Input::Closed {
                    session_id: id,
                    node,
                });
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
