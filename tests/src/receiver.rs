//! Fake Slack and PagerDuty endpoints on loopback: small HTTP/1.1 servers that check each
//! request the way the real service does, answer like it, record what they got and when,
//! and misbehave on request (throttle, fail, hang) so tests can drive the delivery workers.
//!
//! A [`Receiver`] serves until it is dropped; dropping it ends every thread it started,
//! also a connection it holds open without answering.

mod http;
mod service;

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::poll_until;
use crate::FAST_CONTROLLER;

/// The PagerDuty routing key every test config uses (32 characters, like a real one).
pub const ROUTING_KEY: &str = "R0ut1ngKey0fMusterE2eTests000001";

/// The Slack bot token every bot-mode test config uses.
pub const BOT_TOKEN: &str = "xoxb-1111-2222-muster-e2e";

/// Which service a receiver plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// PagerDuty Events API v2 (`POST /v2/enqueue`).
    PagerDuty,
    /// A Slack incoming webhook (`POST /services/...`).
    SlackWebhook,
    /// The Slack Web API with a bot token (`chat.postMessage`, `chat.update`).
    SlackBot,
}

/// How the receiver answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// As the real service answers a request: success if it is valid, its error if not.
    Normal,
    /// 429 Too Many Requests with `Retry-After: retry_after_s`.
    Throttle { retry_after_s: u64 },
    /// 500 Internal Server Error.
    ServerError,
    /// 400 Bad Request, as the service answers a request it will never accept.
    Reject,
    /// Read the request and never answer, holding the connection open.
    Hang,
}

/// One request as the receiver got it.
#[derive(Debug, Clone)]
pub struct Request {
    /// When its last byte arrived.
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// Header names in lowercase.
    pub headers: HashMap<String, String>,
    /// The body as JSON, or Null if it is none.
    pub body: Value,
    /// The HTTP status answered; None while (or if) it was never answered.
    pub status: Option<u16>,
    /// What the real service would have rejected; empty for a valid request.
    pub problems: Vec<String>,
}

impl Request {
    /// Answered with success, and valid.
    pub fn delivered(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s)) && self.problems.is_empty()
    }

    /// PagerDuty: trigger, acknowledge or resolve.
    pub fn event_action(&self) -> &str {
        self.body["event_action"].as_str().unwrap_or("")
    }

    /// PagerDuty: the event's dedup key.
    pub fn dedup_key(&self) -> &str {
        self.body["dedup_key"].as_str().unwrap_or("")
    }

    /// Slack: the message text.
    pub fn text(&self) -> &str {
        self.body["text"].as_str().unwrap_or("")
    }

    /// Slack Web API: the method called (`chat.postMessage`, `chat.update`), or "".
    pub fn slack_method(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or("")
    }

    /// PagerDuty trigger: the task names of the incidents it lists.
    pub fn incident_tasks(&self) -> Vec<String> {
        self.body["payload"]["custom_details"]["incidents"]
            .as_array()
            .map(|all| {
                all.iter()
                    .filter_map(|i| i["task"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// What the scripted answers are and what arrived; shared with the server threads.
#[derive(Default)]
struct State {
    script: VecDeque<Answer>,
    otherwise: Option<Answer>,
    requests: Vec<Request>,
    /// Slack bot: channel id of every message posted, by ts.
    posted: HashMap<String, String>,
    next_ts: u64,
}

struct Shared {
    service: Service,
    state: Mutex<State>,
    stop: AtomicBool,
    /// Signalled at shutdown, so a hanging answer ends at once.
    stopped: (Mutex<bool>, Condvar),
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("receiver state poisoned")
    }
}

/// A fake Slack or PagerDuty endpoint on 127.0.0.1, on a port the OS picked.
pub struct Receiver {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
}

impl Receiver {
    pub fn pagerduty() -> Receiver {
        Receiver::start(Service::PagerDuty)
    }

    pub fn slack_webhook() -> Receiver {
        Receiver::start(Service::SlackWebhook)
    }

    pub fn slack_bot() -> Receiver {
        Receiver::start(Service::SlackBot)
    }

    fn start(service: Service) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a receiver on loopback");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        listener
            .set_nonblocking(true)
            .expect("making the listener non-blocking");
        let shared = Arc::new(Shared {
            service,
            state: Mutex::new(State {
                next_ts: 1,
                ..State::default()
            }),
            stop: AtomicBool::new(false),
            stopped: (Mutex::new(false), Condvar::new()),
        });
        let server = {
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("receiver-{}", addr.port()))
                .spawn(move || http::accept_loop(listener, shared))
                .expect("starting a receiver thread")
        };
        Receiver {
            shared,
            addr,
            server: Some(server),
        }
    }

    /// The URL to configure: PagerDuty `events_url`, Slack `webhook_url` or `api_url`.
    pub fn url(&self) -> String {
        let path = match self.shared.service {
            Service::PagerDuty => "/v2/enqueue",
            Service::SlackWebhook => "/services/T0MUSTER/B0E2E/hook",
            Service::SlackBot => "/api",
        };
        format!("http://{}{path}", self.addr)
    }

    /// The controller config section for this receiver, with `extra` lines appended.
    pub fn config_section(&self, extra: &str) -> String {
        let head = match self.shared.service {
            Service::PagerDuty => format!(
                "[alerts.pagerduty]\nrouting_key = \"{ROUTING_KEY}\"\nevents_url = \"{}\"\n",
                self.url()
            ),
            Service::SlackWebhook => {
                format!("[alerts.slack]\nwebhook_url = \"{}\"\n", self.url())
            }
            Service::SlackBot => format!(
                "[alerts.slack]\nbot_token = \"{BOT_TOKEN}\"\ndefault_channel = \"#alerts\"\n\
                 api_url = \"{}\"\n",
                self.url()
            ),
        };
        format!("{head}{extra}\n")
    }

    /// The next `count` requests get `answer`, before anything set with [`answer_always`].
    ///
    /// [`answer_always`]: Receiver::answer_always
    pub fn answer_next(&self, count: usize, answer: Answer) {
        let mut state = self.shared.state();
        state.script.extend(std::iter::repeat_n(answer, count));
    }

    /// Every request after the scripted ones gets `answer` (Normal to behave again).
    pub fn answer_always(&self, answer: Answer) {
        self.shared.state().otherwise = Some(answer);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.state().requests.clone()
    }

    /// The requests so far that were answered with success.
    pub fn delivered(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(Request::delivered)
            .collect()
    }

    /// Waits until `check` finds what it looks for in the requests so far.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[Request]) -> Option<T>,
    ) -> T {
        poll_until(timeout, || check(&self.requests())).unwrap_or_else(|| {
            panic!(
                "{:?} receiver: no {what} within {}s; it got:\n{}",
                self.shared.service,
                timeout.as_secs(),
                describe(&self.requests())
            )
        })
    }

    /// Waits for the first request that matches and was delivered, and returns it.
    pub fn wait_for_delivered(
        &self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&Request) -> bool,
    ) -> Request {
        self.wait_for(what, timeout, |all| {
            all.iter().find(|r| r.delivered() && matches(r)).cloned()
        })
    }

    /// Watches the requests for `window` and panics as soon as `holds` is false for them.
    pub fn assert_holds_for(
        &self,
        what: &str,
        window: Duration,
        holds: impl Fn(&[Request]) -> bool,
    ) {
        let broken = poll_until(window, || {
            let all = self.requests();
            (!holds(&all)).then_some(all)
        });
        if let Some(all) = broken {
            panic!(
                "{:?} receiver: expected {what}; it got:\n{}",
                self.shared.service,
                describe(&all)
            );
        }
    }

    /// Panics if the real service would have rejected any request so far.
    pub fn assert_all_valid(&self) {
        let bad: Vec<Request> = self
            .requests()
            .into_iter()
            .filter(|r| !r.problems.is_empty())
            .collect();
        assert!(
            bad.is_empty(),
            "{:?} receiver got requests the real service rejects: {bad:#?}",
            self.shared.service
        );
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let (flag, signal) = &self.shared.stopped;
        *flag.lock().expect("receiver stop flag poisoned") = true;
        signal.notify_all();
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// A controller config: the harness's fast controller, then `[alerts]` with `alerts` keys,
/// then the receivers' sections (and any route tables) in `sections`.
pub fn controller_config(alerts: &str, sections: &[String]) -> String {
    format!(
        "{FAST_CONTROLLER}\n[alerts]\n{alerts}\n{}",
        sections.join("\n")
    )
}

/// One request per line, for failure messages.
pub fn describe(requests: &[Request]) -> String {
    let Some(first) = requests.first() else {
        return "  (nothing)".into();
    };
    requests
        .iter()
        .map(|r| {
            format!(
                "  +{:.2}s {} {} -> {:?} {:?} {}",
                r.at.duration_since(first.at).as_secs_f64(),
                r.method,
                r.path,
                r.status,
                r.problems,
                r.body
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
