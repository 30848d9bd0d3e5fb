//! Delivery workers: one per destination, each with its own queue, timeout, rate limit and
//! retries, so a destination that hangs or fails delays neither the controller loop nor the
//! other destination. Every attempt's outcome goes back to the core, which records it.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use super::{pagerduty, slack, Dest, Notice, Step};
use crate::config::{PagerDuty, Slack};

/// Attempts before a notification counts as failed for good.
pub const MAX_ATTEMPTS: u32 = 12;
const RETRY_INITIAL: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// A Retry-After longer than this is capped, so one answer cannot park a queue for hours.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// The outcome of one delivery attempt, reported to the core.
#[derive(Debug, Clone)]
pub struct Attempted {
    pub delivery: u64,
    pub group: u64,
    pub dest: Dest,
    pub step: Step,
    pub attempt: u32,
    pub ok: bool,
    /// Another attempt follows.
    pub will_retry: bool,
    pub status: u16,
    pub error: String,
    pub slack_ref: Option<(String, String)>,
}

/// Where outcomes go.
pub trait Report: Send + Sync + 'static {
    fn report(&self, attempted: Attempted);
}

enum Config {
    Slack(Slack),
    Pagerduty(PagerDuty),
}

/// A failed attempt: what went wrong and whether to try again (and when).
struct Failure {
    status: u16,
    error: String,
    retry: bool,
    retry_after: Option<Duration>,
}

/// Starts the Slack worker; returns its queue.
pub fn spawn_slack(config: Slack, report: impl Report) -> mpsc::UnboundedSender<Notice> {
    spawn(Config::Slack(config), report)
}

/// Starts the PagerDuty worker; returns its queue.
pub fn spawn_pagerduty(config: PagerDuty, report: impl Report) -> mpsc::UnboundedSender<Notice> {
    spawn(Config::Pagerduty(config), report)
}

fn spawn(config: Config, report: impl Report) -> mpsc::UnboundedSender<Notice> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (dest, timeout) = match &config {
        Config::Slack(c) => (Dest::Slack, c.timeout),
        Config::Pagerduty(c) => (Dest::Pagerduty, c.timeout),
    };
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("muster/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("building the HTTP client");
    let span = tracing::info_span!("alert_delivery", dest = dest.as_str());
    tokio::spawn(
        Worker {
            config,
            client,
            report,
            slack_refs: HashMap::new(),
            next_send: HashMap::new(),
        }
        .run(rx)
        .instrument(span),
    );
    tx
}

struct Worker<R> {
    config: Config,
    client: reqwest::Client,
    report: R,
    /// First message of each group, for updates and thread replies.
    slack_refs: HashMap<u64, (String, String)>,
    /// Rate limit: earliest next send per channel (Slack) or per key (PagerDuty).
    next_send: HashMap<String, Instant>,
}

impl<R: Report> Worker<R> {
    async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Notice>) {
        // In order, one at a time: a resolve never overtakes its trigger.
        while let Some(mut notice) = queue.recv().await {
            if notice.slack_ref.is_none() {
                notice.slack_ref = self.slack_refs.get(&notice.group).cloned();
            }
            self.deliver(notice).await;
        }
    }

    async fn deliver(&mut self, notice: Notice) {
        let mut delay = RETRY_INITIAL;
        for attempt in 1..=MAX_ATTEMPTS {
            self.pace(&notice).await;
            let result = self.send(&notice).await;
            let attempted =
                |ok: bool,
                 will_retry: bool,
                 status: u16,
                 error: String,
                 slack_ref: Option<(String, String)>| Attempted {
                    delivery: notice.delivery,
                    group: notice.group,
                    dest: notice.dest,
                    step: notice.step,
                    attempt,
                    ok,
                    will_retry,
                    status,
                    error,
                    slack_ref,
                };
            match result {
                Ok((status, slack_ref)) => {
                    if let Some(r) = &slack_ref {
                        self.slack_refs.insert(notice.group, r.clone());
                    }
                    tracing::info!(
                        delivery = notice.delivery,
                        step = notice.step.as_str(),
                        attempt,
                        "alert delivered"
                    );
                    self.report
                        .report(attempted(true, false, status, String::new(), slack_ref));
                    return;
                }
                Err(f) => {
                    let will_retry = f.retry && attempt < MAX_ATTEMPTS;
                    tracing::warn!(delivery = notice.delivery, attempt, status = f.status, error = %f.error, will_retry, "alert delivery failed");
                    self.report
                        .report(attempted(false, will_retry, f.status, f.error, None));
                    if !will_retry {
                        return;
                    }
                    let wait = f.retry_after.map_or(delay, |d| d.min(RETRY_AFTER_MAX));
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Waits for the destination's rate limit: Slack about one message a second per
    /// channel, PagerDuty about 120 events a minute per routing key.
    async fn pace(&mut self, notice: &Notice) {
        let (key, interval) = match &self.config {
            Config::Slack(c) => (
                notice.channel.clone(),
                Duration::from_secs_f64(1.0 / c.per_second),
            ),
            Config::Pagerduty(c) => (String::new(), Duration::from_secs_f64(60.0 / c.per_minute)),
        };
        let now = Instant::now();
        let at = self.next_send.get(&key).copied().unwrap_or(now).max(now);
        tokio::time::sleep_until(at).await;
        self.next_send.insert(key, at + interval);
    }

    async fn send(&self, notice: &Notice) -> Result<(u16, Option<(String, String)>), Failure> {
        match &self.config {
            Config::Pagerduty(c) => {
                let body = pagerduty::event(notice, &c.routing_key, &c.source);
                let (status, _) = self.post(&c.events_url, None, &body).await?;
                Ok((status, None))
            }
            Config::Slack(c) => match (&c.bot_token, &c.webhook_url) {
                (Some(token), _) => self.send_bot(c, token, notice).await,
                (None, Some(url)) => {
                    let (status, _) = self.post(url, None, &slack::webhook_body(notice)).await?;
                    Ok((status, None))
                }
                (None, None) => Err(Failure {
                    status: 0,
                    error: "slack has no webhook_url or bot_token".into(),
                    retry: false,
                    retry_after: None,
                }),
            },
        }
    }

    /// Bot token mode: post on trigger; on later steps update the first message and reply
    /// in its thread (or post anew if the first message never got through).
    async fn send_bot(
        &self,
        c: &Slack,
        token: &str,
        notice: &Notice,
    ) -> Result<(u16, Option<(String, String)>), Failure> {
        let channel = if notice.channel.is_empty() {
            c.default_channel.as_str()
        } else {
            notice.channel.as_str()
        };
        let post = format!("{}/chat.postMessage", c.api_url);
        match (&notice.slack_ref, notice.step) {
            (Some((chan, ts)), Step::Acknowledge | Step::Resolve | Step::Remind) => {
                if notice.step != Step::Remind {
                    let update = format!("{}/chat.update", c.api_url);
                    self.post(&update, Some(token), &slack::update_body(notice, chan, ts))
                        .await?;
                }
                let (status, _) = self
                    .post(
                        &post,
                        Some(token),
                        &slack::post_body(notice, chan, Some(ts)),
                    )
                    .await?;
                Ok((status, Some((chan.clone(), ts.clone()))))
            }
            _ => {
                let (status, body) = self
                    .post(&post, Some(token), &slack::post_body(notice, channel, None))
                    .await?;
                let reference = match (body["channel"].as_str(), body["ts"].as_str()) {
                    (Some(chan), Some(ts)) => Some((chan.to_string(), ts.to_string())),
                    _ => None,
                };
                Ok((status, reference))
            }
        }
    }

    /// POSTs JSON; maps the answer to success or a failure that says whether to retry.
    async fn post(
        &self,
        url: &str,
        token: Option<&str>,
        body: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value), Failure> {
        let mut request = self.client.post(url).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| Failure {
            status: 0,
            error: if e.is_timeout() {
                "timed out".into()
            } else {
                format!("request failed: {}", root_cause(&e))
            },
            retry: true,
            retry_after: None,
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response.text().await.unwrap_or_default();
        let json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        let code = status.as_u16();
        if status.is_success() {
            // Slack's Web API says "ok": false with HTTP 200 for its own errors.
            if token.is_some() && json["ok"] == serde_json::Value::Bool(false) {
                let error = json["error"]
                    .as_str()
                    .unwrap_or("unknown error")
                    .to_string();
                let retry = matches!(
                    error.as_str(),
                    "ratelimited"
                        | "internal_error"
                        | "fatal_error"
                        | "service_unavailable"
                        | "request_timeout"
                );
                return Err(Failure {
                    status: code,
                    error: format!("slack: {error}"),
                    retry,
                    retry_after,
                });
            }
            return Ok((code, json));
        }
        let detail: String = text.chars().take(300).collect();
        Err(Failure {
            status: code,
            error: format!("HTTP {code}: {detail}"),
            // Throttling, timeouts and server errors pass; other client errors will not.
            retry: code == 429 || code == 408 || status.is_server_error(),
            retry_after,
        })
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
