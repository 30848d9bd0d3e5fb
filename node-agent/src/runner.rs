//! One task's life on this node: start an attempt, watch it, and apply the restart policy
//! locally, so a crashed child restarts in milliseconds even with no controller.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use regex::RegexSet;
use tokio::sync::mpsc;
use tracing::Instrument;

use muster_proto::spec::{Policy, Rules};
use muster_proto::v1::{
    node_event::Kind, AttemptExited, AttemptStarted, LogMatch, Settled, TaskSpec,
};

use crate::logs::{self, LogFile, Tail};
use crate::outbox::now_ms;
use crate::process::{self, Exit, Launch};
use crate::status::StatusTail;
use crate::Context;

/// A run at least this long resets the backoff to its initial value.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
const STATUS_POLL: Duration = Duration::from_millis(200);

/// What the controller (or the agent's own shutdown) asks of a running task.
#[derive(Debug)]
pub enum Control {
    /// Stop for good. `attempt` 0 means whatever attempt runs.
    Stop { reason: String, attempt: u32 },
    /// Stop the current attempt and start the next at once.
    Restart { reason: String },
}

/// What the rest of the agent can see of a runner.
#[derive(Debug, Clone, Default)]
pub struct RunStatus {
    pub attempt: u32,
    pub pid: u32,
    pub started_ms: i64,
    pub phase: &'static str,
}

pub struct Runner {
    pub spec: TaskSpec,
    pub rules: Rules,
    pub extra_env: Vec<(String, String)>,
    pub ctx: Arc<Context>,
    pub status: Arc<Mutex<RunStatus>>,
}

enum Requested {
    Stop(String),
    Restart(String),
}

struct AttemptEnd {
    exit: Option<Exit>,
    runtime: Duration,
    spawn_error: Option<String>,
    requested: Option<Requested>,
    tail: Vec<String>,
}

impl Runner {
    /// Runs attempts from `first_attempt` until the task reaches a final state; returns
    /// the last attempt number.
    pub async fn run(
        self,
        first_attempt: u32,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) -> u32 {
        let name = self.spec.name.clone();
        let task_dir = self.ctx.task_dir(&name);
        if let Err(e) = std::fs::create_dir_all(task_dir.join("data")) {
            tracing::error!(task = %name, error = %e, "cannot create the task directory");
        }

        let mut attempt = first_attempt;
        let mut restarts: VecDeque<Instant> = VecDeque::new();
        let mut failures: u32 = 0;
        loop {
            let span = tracing::info_span!("attempt", task = %name, attempt);
            let end = self
                .run_attempt(attempt, &task_dir, &mut control)
                .instrument(span)
                .await;
            let (next, reason, backoff) = self.decide(&end, &mut restarts, &mut failures);
            tracing::info!(task = %name, attempt, ?end.exit, next, reason, "attempt exited");

            let restarts_in_window = restarts.len() as u32;
            self.ctx.outbox.push(
                &name,
                attempt,
                Kind::Exited(AttemptExited {
                    exit_code: match end.exit {
                        Some(Exit::Code(c)) => Some(c),
                        _ => None,
                    },
                    signal: match end.exit {
                        Some(Exit::Signal(s)) => Some(s),
                        _ => None,
                    },
                    reason: reason.clone(),
                    next: next.to_string(),
                    backoff_ms: backoff.as_millis() as u64,
                    runtime_ms: end.runtime.as_millis() as u64,
                    restarts_in_window,
                    error: end.spawn_error.clone().unwrap_or_default(),
                    log_tail: end.tail,
                }),
            );
            if next != "backoff" {
                return attempt;
            }

            self.set_phase(attempt + 1, 0, "backoff");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                msg = control.recv() => match msg {
                    Some(Control::Restart { .. }) => {}
                    other => {
                        let reason = match other {
                            Some(Control::Stop { reason, .. }) => reason,
                            _ => "shutdown".to_string(),
                        };
                        let settled = Settled { state: "stopped".into(), reason };
                        self.ctx.outbox.push(&name, attempt, Kind::Settled(settled));
                        return attempt;
                    }
                }
            }
            attempt += 1;
        }
    }

    /// Picks what follows an exit: (next state, reason, backoff before the next attempt).
    fn decide(
        &self,
        end: &AttemptEnd,
        restarts: &mut VecDeque<Instant>,
        failures: &mut u32,
    ) -> (&'static str, String, Duration) {
        let exit_reason = match (end.exit, &end.spawn_error) {
            (_, Some(_)) => "spawn_error",
            (Some(Exit::Signal(_)), _) => "signal",
            _ => "exit_code",
        };
        let restart_reason = match &end.requested {
            Some(Requested::Stop(reason)) => return ("stopped", reason.clone(), Duration::ZERO),
            Some(Requested::Restart(reason)) => Some(reason.clone()),
            None => None,
        };
        let succeeded = end.exit.is_some_and(Exit::success);
        let wanted = restart_reason.is_some()
            || match self.rules.restart.policy {
                Policy::Always => true,
                Policy::OnFailure => !succeeded,
                Policy::Never => false,
            };
        if !wanted {
            let next = if succeeded { "succeeded" } else { "failed" };
            return (next, exit_reason.to_string(), Duration::ZERO);
        }

        let now = Instant::now();
        let window = self.rules.restart.window;
        while restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            restarts.pop_front();
        }
        if restarts.len() as u32 >= self.rules.restart.max_restarts {
            return ("crash_loop", exit_reason.to_string(), Duration::ZERO);
        }
        restarts.push_back(now);

        if let Some(reason) = restart_reason {
            return ("backoff", reason, Duration::ZERO);
        }
        if end.runtime >= HEALTHY_RUN {
            *failures = 0;
        }
        let backoff = backoff(&self.rules, *failures);
        *failures = failures.saturating_add(1);
        ("backoff", exit_reason.to_string(), backoff)
    }

    async fn run_attempt(
        &self,
        attempt: u32,
        task_dir: &std::path::Path,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> AttemptEnd {
        let name = &self.spec.name;
        let status_path = task_dir.join("status.jsonl");
        // Each attempt starts a fresh status file; the previous one is kept beside it.
        let _ = std::fs::rename(&status_path, task_dir.join("status.prev.jsonl"));
        let _ = std::fs::File::create(&status_path);

        let attempt_key = format!("{}/{}/{}", self.ctx.instance, name, attempt);
        let launch = Launch {
            argv: self.spec.command.clone(),
            shell: self.spec.shell,
            env: self.child_env(attempt, task_dir, &status_path),
            workdir: if self.spec.workdir.is_empty() {
                task_dir.to_path_buf()
            } else {
                PathBuf::from(&self.spec.workdir)
            },
            attempt_key: attempt_key.clone(),
        };
        let started = Instant::now();
        let spawned = match process::spawn(&launch) {
            Ok(s) => s,
            Err(e) => {
                let error = format!(
                    "cannot start {:?} in {}: {e}",
                    launch.argv[0],
                    launch.workdir.display()
                );
                tracing::warn!(task = %name, attempt, %error, "spawn failed");
                return AttemptEnd {
                    exit: None,
                    runtime: Duration::ZERO,
                    spawn_error: Some(error),
                    requested: None,
                    tail: Vec::new(),
                };
            }
        };
        let pid = spawned.pid;
        tracing::info!(task = %name, attempt, pid, "attempt started");
        self.set_phase(attempt, pid, "running");
        self.ctx
            .outbox
            .push(name, attempt, Kind::Started(AttemptStarted { pid }));

        let tail: Tail = Default::default();
        let matcher = Arc::new(PatternMatcher::new(&self.rules.health.fail_patterns));
        let drains = [
            ("stdout", spawned.stdout.into()),
            ("stderr", spawned.stderr.into()),
        ]
        .map(|(stream, fd): (&str, std::os::fd::OwnedFd)| {
            let file = LogFile::open(logs::log_path(task_dir, stream), self.ctx.log_limits);
            let matcher = matcher.clone();
            let outbox = self.ctx.outbox.clone();
            let task = name.clone();
            tokio::spawn(logs::drain(fd, file, tail.clone(), move |line| {
                if let Some(pattern) = matcher.check(line) {
                    outbox.push(
                        &task,
                        attempt,
                        Kind::LogMatch(LogMatch {
                            pattern,
                            line: line.to_string(),
                            stream: stream.into(),
                        }),
                    );
                }
            }))
        });

        let mut status = StatusTail::new(status_path);
        let mut poll = tokio::time::interval(STATUS_POLL);
        let mut exit_rx = spawned.exit;
        let mut requested = None;
        let exit = loop {
            tokio::select! {
                exit = &mut exit_rx => break exit.ok(),
                _ = poll.tick() => self.forward_reports(&mut status, attempt, &matcher),
                msg = control.recv() => {
                    let (req, stop_it) = match msg {
                        Some(Control::Stop { reason, attempt: only }) => (Requested::Stop(reason), only == 0 || only == attempt),
                        Some(Control::Restart { reason }) => (Requested::Restart(reason), true),
                        None => (Requested::Stop("shutdown".into()), true),
                    };
                    if !stop_it {
                        continue;
                    }
                    self.set_phase(attempt, pid, "stopping");
                    requested = Some(req);
                    process::stop_tree(pid, &attempt_key, self.rules.grace).await;
                    break (&mut exit_rx).await.ok();
                }
            }
        };
        let runtime = started.elapsed();
        self.forward_reports(&mut status, attempt, &matcher);

        // Whatever the main process left behind goes with it.
        process::stop_tree(pid, &attempt_key, Duration::from_secs(2)).await;
        for drain in drains {
            match tokio::time::timeout(Duration::from_secs(5), drain).await {
                Ok(Ok(Ok(dropped))) if dropped > 0 => {
                    tracing::warn!(task = %name, attempt, dropped, "log bytes dropped: log file not writable");
                }
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(task = %name, attempt, "output pipe still open after the attempt ended")
                }
            }
        }
        let tail = tail
            .lock()
            .expect("log tail poisoned")
            .iter()
            .cloned()
            .collect();
        AttemptEnd {
            exit,
            runtime,
            spawn_error: None,
            requested,
            tail,
        }
    }

    fn forward_reports(&self, status: &mut StatusTail, attempt: u32, matcher: &PatternMatcher) {
        for report in status.poll() {
            if let Some(pattern) = matcher.check(&report.message) {
                self.ctx.outbox.push(
                    &self.spec.name,
                    attempt,
                    Kind::LogMatch(LogMatch {
                        pattern,
                        line: report.message.clone(),
                        stream: "status".into(),
                    }),
                );
            }
            self.ctx
                .outbox
                .push(&self.spec.name, attempt, Kind::Report(report));
        }
    }

    fn child_env(
        &self,
        attempt: u32,
        task_dir: &std::path::Path,
        status_path: &std::path::Path,
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.extend(self.extra_env.iter().cloned());
        env.extend([
            ("MUSTER_TASK".into(), self.spec.name.clone()),
            ("MUSTER_ATTEMPT".into(), attempt.to_string()),
            ("MUSTER_NODE".into(), self.ctx.node.clone()),
            (
                "MUSTER_STATUS_FILE".into(),
                status_path.to_string_lossy().into_owned(),
            ),
            (
                "MUSTER_DATA_DIR".into(),
                task_dir.join("data").to_string_lossy().into_owned(),
            ),
            ("MUSTER_CONTROLLER".into(), self.ctx.controller.clone()),
        ]);
        env
    }

    fn set_phase(&self, attempt: u32, pid: u32, phase: &'static str) {
        let mut status = self.status.lock().expect("run status poisoned");
        *status = RunStatus {
            attempt,
            pid,
            started_ms: if pid == 0 { 0 } else { now_ms() },
            phase,
        };
    }
}

/// Exponential backoff from the initial delay, capped, with ±20% jitter so restarts of many
/// tasks spread out.
fn backoff(rules: &Rules, failures: u32) -> Duration {
    let base = rules.restart.backoff_initial.as_secs_f64() * 2f64.powi(failures.min(32) as i32);
    let capped = base.min(rules.restart.backoff_max.as_secs_f64());
    let jitter = rand::thread_rng().gen_range(0.8..1.2);
    Duration::from_secs_f64((capped * jitter).min(rules.restart.backoff_max.as_secs_f64()))
}

/// The task's fail patterns; each reports once per attempt.
struct PatternMatcher {
    set: Option<RegexSet>,
    patterns: Vec<String>,
    seen: Mutex<HashSet<usize>>,
}

impl PatternMatcher {
    fn new(patterns: &[String]) -> Self {
        PatternMatcher {
            set: (!patterns.is_empty())
                .then(|| RegexSet::new(patterns).ok())
                .flatten(),
            patterns: patterns.to_vec(),
            seen: Mutex::new(HashSet::new()),
        }
    }

    fn check(&self, line: &str) -> Option<String> {
        let set = self.set.as_ref()?;
        let first = set.matches(line).into_iter().next()?;
        let fresh = self
            .seen
            .lock()
            .expect("pattern state poisoned")
            .insert(first);
        fresh.then(|| self.patterns[first].clone())
    }
}
