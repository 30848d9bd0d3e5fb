//! The session with the controller: dial out, say Hello, stream batched events and
//! heartbeats, carry out commands, and reconnect with backoff when the link breaks.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

use muster_proto::v1::{
    command::Action, controller_message::Body, node_message,
    node_service_client::NodeServiceClient, Capacity, CommandResult, ControllerMessage, Hello,
    LogChunk, LogReply, LogRequest, NodeBatch, NodeMessage,
};

use crate::logs;
use crate::supervisor::Supervisor;
use crate::Context;

const MAX_BATCH_EVENTS: usize = 2_000;
const MAX_LOG_CHUNK: usize = 256 * 1024;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot reach the controller: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("controller refused the session: {0}")]
    Refused(#[from] tonic::Status),
    #[error("controller closed the session")]
    Closed,
}

pub struct Session {
    pub ctx: Arc<Context>,
    pub supervisor: Arc<Supervisor>,
    pub capacity: Capacity,
}

impl Session {
    /// Keeps a session up until `shutdown` turns true, reconnecting with capped, jittered
    /// backoff so a fleet does not reconnect in one herd after a controller restart.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let mut delay = Duration::from_millis(100);
        loop {
            let mut established = false;
            match self.exchange(&mut shutdown, &mut established).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(controller = %self.ctx.controller, error = %e, "controller session ended")
                }
            }
            // A session that got as far as Welcome resets the backoff; failed dials grow it.
            if established {
                delay = Duration::from_millis(100);
            }
            let jittered = delay.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
            tokio::select! {
                _ = tokio::time::sleep(jittered) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// One session, until it breaks (an error) or the agent shuts down (Ok). `established`
    /// turns true once the controller's Welcome arrived.
    async fn exchange(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        established: &mut bool,
    ) -> Result<(), SessionError> {
        let channel = tokio::select! {
            c = self.channel() => c?,
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let mut client = NodeServiceClient::new(channel).max_decoding_message_size(64 << 20);

        let (tx, rx) = mpsc::channel::<NodeMessage>(16);
        let hello = Hello {
            node: self.ctx.node.clone(),
            capacity: Some(self.capacity),
            labels: self.ctx.labels.clone(),
            version: muster_proto::VERSION.to_string(),
            instance: self.ctx.instance.clone(),
            attempts: self.supervisor.running(),
        };
        tx.send(NodeMessage {
            body: Some(node_message::Body::Hello(hello)),
        })
        .await
        .map_err(|_| SessionError::Closed)?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = &self.ctx.token {
            let value = format!("Bearer {token}").parse().map_err(|_| {
                SessionError::Refused(tonic::Status::invalid_argument(
                    "the node token has characters a header cannot carry",
                ))
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        let mut inbound = client.connect(request).await?.into_inner();

        let welcome = match inbound.next().await {
            Some(Ok(ControllerMessage {
                body: Some(Body::Welcome(w)),
            })) => w,
            Some(Err(status)) => return Err(status.into()),
            _ => return Err(SessionError::Closed),
        };
        *established = true;
        self.supervisor.welcomed();
        self.ctx.outbox.rewind(welcome.acked_seq);
        {
            let mut contact = self.ctx.contact.lock().expect("contact poisoned");
            contact.last = std::time::Instant::now();
            if welcome.lease_ms > 0 {
                contact.lease = Duration::from_millis(u64::from(welcome.lease_ms));
            }
        }
        let heartbeat =
            Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.clamp(100, 60_000)));
        tracing::info!(controller = %self.ctx.controller, epoch = welcome.epoch, "connected to controller");
        self.ctx
            .stats
            .connected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _connected = Connected(&self.ctx);

        let (extra_tx, mut extra_rx) = mpsc::unbounded_channel::<Extra>();
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut extras = Vec::new();
            tokio::select! {
                msg = inbound.next() => match msg {
                    Some(Ok(msg)) => { self.ctx.heard_from_controller(); self.handle(msg, &extra_tx); continue; }
                    Some(Err(status)) => return Err(status.into()),
                    None => return Err(SessionError::Closed),
                },
                _ = self.ctx.outbox.notify.notified() => {}
                _ = ticker.tick() => {}
                Some(extra) = extra_rx.recv() => extras.push(extra),
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
            }
            while let Ok(extra) = extra_rx.try_recv() {
                extras.push(extra);
            }
            self.send_batch(&tx, extras).await?;
        }
    }

    async fn send_batch(
        &self,
        tx: &mpsc::Sender<NodeMessage>,
        extras: Vec<Extra>,
    ) -> Result<(), SessionError> {
        let mut batch = NodeBatch {
            events: self.ctx.outbox.take_unsent(MAX_BATCH_EVENTS),
            draining: self.supervisor.is_shutting_down(),
            ..Default::default()
        };
        for extra in extras {
            match extra {
                Extra::Result(r) => batch.results.push(r),
                Extra::Log(l) => batch.logs.push(l),
            }
        }
        tx.send(NodeMessage {
            body: Some(node_message::Body::Batch(batch)),
        })
        .await
        .map_err(|_| SessionError::Closed)
    }

    fn handle(&self, msg: ControllerMessage, extras: &mpsc::UnboundedSender<Extra>) {
        match msg.body {
            Some(Body::Command(cmd)) => {
                let id = cmd.id;
                let result = match cmd.action {
                    Some(Action::Start(start)) => self.supervisor.start(start),
                    Some(Action::Stop(stop)) => {
                        self.supervisor.stop(stop);
                        Ok(())
                    }
                    Some(Action::Restart(restart)) => self.supervisor.restart(restart),
                    Some(Action::Signal(signal)) => {
                        self.supervisor.signal(&signal.task, signal.signal)
                    }
                    Some(Action::Hold(hold)) => {
                        self.supervisor.hold(hold);
                        Ok(())
                    }
                    None => Err("empty command".to_string()),
                };
                if let Err(error) = &result {
                    tracing::warn!(command = id, %error, "command failed");
                }
                let _ = extras.send(Extra::Result(CommandResult {
                    id,
                    ok: result.is_ok(),
                    error: result.err().unwrap_or_default(),
                }));
            }
            Some(Body::Ack(ack)) => self.ctx.outbox.ack(ack.through_seq),
            Some(Body::LogRequest(request)) => {
                let ctx = self.ctx.clone();
                let extras = extras.clone();
                tokio::task::spawn_blocking(move || {
                    let _ = extras.send(Extra::Log(read_log(&ctx, request)));
                });
            }
            Some(Body::Deliver(deliver)) => {
                if let Err(e) = crate::task_inbox::append(&self.ctx, &deliver) {
                    tracing::warn!(task = %deliver.task, error = %e, "cannot write a task's inbox file");
                }
            }
            Some(Body::Welcome(_)) | None => {}
        }
    }

    async fn channel(&self) -> Result<Channel, SessionError> {
        let endpoint = Endpoint::from_shared(self.ctx.controller.clone())?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10));
        let endpoint = match &self.ctx.tls {
            Some(tls) => endpoint.tls_config(tls.clone())?,
            None => endpoint,
        };
        Ok(endpoint.connect().await?)
    }
}

/// Clears the connected flag when a session ends, however it ends.
struct Connected<'a>(&'a Context);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0
            .stats
            .connected
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

enum Extra {
    Result(CommandResult),
    Log(LogReply),
}

fn read_log(ctx: &Context, request: LogRequest) -> LogReply {
    let stream = if request.stream == "stderr" {
        "stderr"
    } else {
        "stdout"
    };
    if let Err(problem) = muster_proto::spec::check_name(&request.task) {
        return LogReply {
            id: request.id,
            error: format!("task name {problem}"),
            ..Default::default()
        };
    }
    let path = logs::log_path(&ctx.task_dir(&request.task), stream);
    let max = (request.max_bytes as usize).clamp(1, MAX_LOG_CHUNK);
    match logs::read_chunk(&path, request.offset, max) {
        Ok((data, offset, next_offset)) => LogReply {
            id: request.id,
            chunk: Some(LogChunk {
                data,
                offset,
                next_offset,
                stream: stream.into(),
            }),
            error: String::new(),
        },
        Err(e) => LogReply {
            id: request.id,
            error: format!("reading {}: {e}", path.display()),
            ..Default::default()
        },
    }
}
