//! One task's life on this node: start an attempt, watch it, and apply the restart policy
//! locally, so a crashed child restarts in milliseconds even with no controller.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::mpsc;
use tracing::Instrument;

use std::sync::atomic::{AtomicBool, Ordering};

use muster_proto::spec::health::{Action, Rule};
use muster_proto::spec::{Policy, Rules};
use muster_proto::v1::{
    node_event::Kind, AttemptExited, AttemptStarted, LogDropped, Settled, TaskSpec,
};

use crate::keeper::client::Output;
use crate::keeper::LaunchSpec;
use crate::logs;
use crate::outbox::now_ms;
use crate::process::{self, Exit};
use crate::rules::RuleMatcher;
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
    /// While held, the task is not restarted after it exits.
    Hold(bool),
}

/// What the rest of the agent can see of a runner.
#[derive(Debug, Clone, Default)]
pub struct RunStatus {
    pub attempt: u32,
    pub pid: u32,
    pub started_ms: i64,
    pub phase: &'static str,
    /// An operator signalled this attempt (its SIGKILL is no OOM suspicion).
    pub signalled: bool,
}

pub struct Runner {
    pub spec: TaskSpec,
    pub rules: Rules,
    pub extra_env: Vec<(String, String)>,
    pub ctx: Arc<Context>,
    pub status: Arc<Mutex<RunStatus>>,
    pub held: AtomicBool,
    /// Set by a `wait` rule: no restart before this.
    pub wait_until: Arc<Mutex<Option<Instant>>>,
}

enum Requested {
    Stop(String),
    Restart(String),
}

/// An attempt found running (or exited) under the keeper when the agent started.
#[derive(Debug, Clone)]
pub struct Adopted {
    pub key: String,
    pub pid: u32,
    pub started_ms: i64,
    /// It exited while no agent was running.
    pub exit: Option<Exit>,
}

/// The files that let a new agent re-adopt this task: its start command and its attempt.
pub fn record_attempt(task_dir: &std::path::Path, attempt: u32, key: &str) {
    let record = serde_json::json!({ "attempt": attempt, "key": key, "started_ms": now_ms() });
    if let Err(e) = write_atomically(
        &task_dir.join("attempt.json"),
        record.to_string().as_bytes(),
    ) {
        tracing::warn!(dir = %task_dir.display(), error = %e, "cannot record the attempt; it cannot be re-adopted");
    }
}

/// Lets a task's user write its status file and data dir.
fn give_to_user(user: &str, paths: &[&std::path::Path]) {
    let Ok(Some(user)) = nix::unistd::User::from_name(user) else {
        return;
    };
    for path in paths {
        if let Err(e) = nix::unistd::chown(*path, Some(user.uid), Some(user.gid)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot hand the path to the task's user");
        }
    }
}

/// Writes a file whole or not at all.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

struct Decision {
    next: &'static str,
    reason: String,
    backoff: Duration,
    rule: Option<Rule>,
    class: &'static str,
}

struct AttemptEnd {
    exit: Option<Exit>,
    runtime: Duration,
    spawn_error: Option<process::SpawnError>,
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
        mut adopted: Option<Adopted>,
    ) -> u32 {
        let name = self.spec.name.clone();
        let task_dir = self.ctx.task_dir(&name);
        if let Err(e) = std::fs::create_dir_all(self.ctx.task_data_dir(&name))
            .and_then(|()| std::fs::create_dir_all(&task_dir))
        {
            tracing::error!(task = %name, error = %e, "cannot create the task directory");
        }

        let mut attempt = first_attempt;
        let mut restarts: VecDeque<Instant> = VecDeque::new();
        let mut failures: u32 = 0;
        loop {
            let span = tracing::info_span!("attempt", task = %name, attempt);
            let end = self
                .run_attempt(attempt, &task_dir, &mut control, adopted.take())
                .instrument(span)
                .await;
            let d = self.decide(&end, &mut restarts, &mut failures);
            tracing::info!(task = %name, attempt, ?end.exit, next = d.next, reason = %d.reason, "attempt exited");

            let rule = d.rule.as_ref();
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
                    reason: d.reason.clone(),
                    next: d.next.to_string(),
                    backoff_ms: d.backoff.as_millis() as u64,
                    runtime_ms: end.runtime.as_millis() as u64,
                    restarts_in_window: restarts.len() as u32,
                    error: end
                        .spawn_error
                        .as_ref()
                        .map_or(String::new(), |e| e.message.clone()),
                    log_tail: end.tail,
                    rule: rule.map_or(String::new(), |r| r.name.clone()),
                    action: rule.map_or(String::new(), |r| r.action.as_str().to_string()),
                    severity: rule.map_or(String::new(), |r| r.severity.clone()),
                    class: d.class.to_string(),
                }),
            );
            if end.requested.is_none() && end.exit.is_some_and(|e| !e.success()) {
                self.ctx
                    .stats
                    .attempts_failed
                    .fetch_add(1, Ordering::Relaxed);
            }
            if d.next != "backoff" {
                return attempt;
            }
            self.ctx.stats.restarts.fetch_add(1, Ordering::Relaxed);

            self.set_phase(attempt + 1, 0, "backoff");
            if let Some(reason) = self.wait_before_restart(d.backoff, &mut control).await {
                let settled = Settled {
                    state: "stopped".into(),
                    reason,
                };
                self.ctx.outbox.push(&name, attempt, Kind::Settled(settled));
                return attempt;
            }
            attempt += 1;
        }
    }

    /// Sleeps out the backoff, and longer while the task is held. Returns the stop reason if
    /// the task was stopped meanwhile; an operator restart ends the wait at once.
    async fn wait_before_restart(
        &self,
        backoff: Duration,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Option<String> {
        let deadline = tokio::time::Instant::now() + backoff;
        loop {
            let held = self.held.load(Ordering::SeqCst);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline), if !held => return None,
                msg = control.recv() => match msg {
                    Some(Control::Restart { .. }) => return None,
                    Some(Control::Hold(hold)) => self.held.store(hold, Ordering::SeqCst),
                    Some(Control::Stop { reason, .. }) => return Some(reason),
                    None => return Some("shutdown".into()),
                },
            }
        }
    }

    /// Picks what follows an exit: the next state, its reason, the backoff before the next
    /// attempt, and the exit rule that decided it.
    fn decide(
        &self,
        end: &AttemptEnd,
        restarts: &mut VecDeque<Instant>,
        failures: &mut u32,
    ) -> Decision {
        let code = match end.exit {
            Some(Exit::Code(c)) => Some(c),
            _ => None,
        };
        let signal = match end.exit {
            Some(Exit::Signal(s)) => Some(s),
            _ => None,
        };
        // A SIGKILL (or the shell's 137) that nobody here sent is most likely the kernel's
        // OOM killer; without cgroup events this stays a suspicion, named as such.
        let signalled = self.status.lock().expect("run status poisoned").signalled;
        let oom = end.requested.is_none() && !signalled && (signal == Some(9) || code == Some(137));
        let class = match (end.exit, &end.spawn_error) {
            (_, Some(e)) => e.kind,
            _ if oom => "oom_kill",
            (Some(Exit::Signal(_)), _) => "signal",
            _ => "exit_code",
        };
        let decision =
            |next: &'static str, reason: String, backoff: Duration, rule: Option<Rule>| Decision {
                next,
                reason,
                backoff,
                rule,
                class,
            };

        if end.spawn_error.is_some() {
            // Not a crash of the program: retry with backoff, never a crash loop, and let the
            // controller tell a person.
            let delay = backoff(&self.rules, *failures);
            *failures = failures.saturating_add(1);
            return decision("backoff", "spawn_error".into(), delay, None);
        }
        if end.requested.is_none()
            && self
                .lease()
                .is_some_and(|lease| self.ctx.silent_for() > lease)
        {
            // Ended while out of contact past the lease (the keeper stopped it, or it just
            // ended): the controller places it again; restarting here could run it twice.
            return decision("stopped", "lease_expired".into(), Duration::ZERO, None);
        }
        let restart_reason = match &end.requested {
            Some(Requested::Stop(reason)) => {
                return decision("stopped", reason.clone(), Duration::ZERO, None)
            }
            Some(Requested::Restart(reason)) => Some(reason.clone()),
            None => None,
        };
        let rule = if restart_reason.is_none() && end.spawn_error.is_none() {
            self.rules
                .health
                .rules
                .iter()
                .find(|r| r.matches_exit(code, signal, oom))
                .cloned()
        } else {
            None
        };
        let action = rule.as_ref().map(|r| r.action);
        let reason = rule
            .as_ref()
            .map_or_else(|| class.to_string(), |r| r.name.clone());
        let succeeded = end.exit.is_some_and(Exit::success);
        if action == Some(Action::Stop) {
            return decision("failed", reason, Duration::ZERO, rule);
        }

        // A rate-limit style wait: restart after it, and it is no crash.
        let wait = self.wait_until.lock().expect("wait state poisoned").take();
        let wait = wait
            .map(|until| until.saturating_duration_since(Instant::now()))
            .filter(|w| !w.is_zero());
        if let Some(wait) = wait.filter(|_| restart_reason.is_none() && !succeeded) {
            return decision("backoff", "wait".into(), wait, rule);
        }

        let wanted = restart_reason.is_some()
            || matches!(action, Some(Action::Restart | Action::Wait))
            || match self.rules.restart.policy {
                Policy::Always => true,
                Policy::OnFailure => !succeeded,
                Policy::Never => false,
            };
        if !wanted {
            let next = if succeeded { "succeeded" } else { "failed" };
            return decision(next, reason, Duration::ZERO, rule);
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
            return decision("crash_loop", reason, Duration::ZERO, rule);
        }
        restarts.push_back(now);

        if let Some(reason) = restart_reason {
            // An operator's restart is immediate; a health restart backs off like a crash,
            // so a rule that fires at start-up cannot spin.
            let delay = if reason == "operator" {
                Duration::ZERO
            } else {
                backoff(&self.rules, *failures)
            };
            if reason != "operator" {
                *failures = failures.saturating_add(1);
            }
            return decision("backoff", reason, delay, None);
        }
        if end.runtime >= HEALTHY_RUN {
            *failures = 0;
        }
        let delay = match rule
            .as_ref()
            .and_then(|r| r.wait)
            .filter(|_| action == Some(Action::Wait))
        {
            Some(wait) => wait,
            None => backoff(&self.rules, *failures),
        };
        *failures = failures.saturating_add(1);
        decision("backoff", reason, delay, rule)
    }

    async fn run_attempt(
        &self,
        attempt: u32,
        task_dir: &std::path::Path,
        control: &mut mpsc::UnboundedReceiver<Control>,
        adopted: Option<Adopted>,
    ) -> AttemptEnd {
        let name = &self.spec.name;
        let status_path = task_dir.join("status.jsonl");
        let keeper = &self.ctx.keeper;
        let (attempt_key, pid, started, mut watch, known_exit) = match adopted {
            Some(a) => {
                tracing::info!(task = %name, attempt, pid = a.pid, "re-adopted a running attempt");
                let watch = keeper.watch(&a.key);
                let since = Duration::from_millis((now_ms() - a.started_ms).max(0) as u64);
                let started = Instant::now()
                    .checked_sub(since)
                    .unwrap_or_else(Instant::now);
                (a.key, a.pid, started, watch, a.exit)
            }
            None => {
                // Each attempt starts a fresh status file; the previous one is kept beside it.
                let _ = std::fs::rename(&status_path, task_dir.join("status.prev.jsonl"));
                let _ = std::fs::File::create(&status_path);
                let key = format!(
                    "{}{}:{attempt}:{:08x}",
                    self.ctx.key_prefix(),
                    name,
                    rand::random::<u32>()
                );
                record_attempt(task_dir, attempt, &key);
                let workdir = if self.spec.workdir.is_empty() {
                    task_dir.to_path_buf()
                } else {
                    PathBuf::from(&self.spec.workdir)
                };
                let launch = LaunchSpec {
                    key: key.clone(),
                    argv: self.spec.command.clone(),
                    shell: self.spec.shell,
                    env: self.child_env(attempt, &status_path),
                    workdir: workdir.to_string_lossy().into_owned(),
                    stdout_log: logs::log_path(task_dir, "stdout")
                        .to_string_lossy()
                        .into_owned(),
                    stderr_log: logs::log_path(task_dir, "stderr")
                        .to_string_lossy()
                        .into_owned(),
                    max_file_bytes: self.ctx.log_limits.max_file_bytes,
                    max_line_bytes: self.ctx.log_limits.max_line_bytes,
                    user: self.spec.user.clone(),
                    lease_ms: self.lease().map_or(0, |l| l.as_millis() as u64),
                    grace_ms: self.rules.grace.as_millis() as u64,
                    silent_ms: {
                        let heard = self.ctx.contact.lock().expect("contact poisoned").heard;
                        heard.then(|| self.ctx.silent_for().as_millis() as u64)
                    },
                };
                if !self.spec.user.is_empty() {
                    give_to_user(
                        &self.spec.user,
                        &[&status_path, &self.ctx.task_data_dir(name)],
                    );
                }
                let watch = keeper.watch(&key);
                let started = Instant::now();
                match keeper.spawn(launch).await {
                    Ok((pid, _)) => {
                        tracing::info!(task = %name, attempt, pid, "attempt started");
                        self.ctx
                            .outbox
                            .push(name, attempt, Kind::Started(AttemptStarted { pid }));
                        self.ctx
                            .stats
                            .attempts_started
                            .fetch_add(1, Ordering::Relaxed);
                        (key, pid, started, watch, None)
                    }
                    Err(e) => {
                        tracing::warn!(task = %name, attempt, kind = e.kind, error = %e.message, "spawn failed");
                        self.ctx
                            .stats
                            .spawn_failures
                            .fetch_add(1, Ordering::Relaxed);
                        keeper.forget(&key);
                        return AttemptEnd {
                            exit: None,
                            runtime: Duration::ZERO,
                            spawn_error: Some(e),
                            requested: None,
                            tail: Vec::new(),
                        };
                    }
                }
            }
        };
        self.set_phase(attempt, pid, "running");

        let matcher = RuleMatcher::new(&self.rules.health.rules, self.wait_until.clone());
        let mut tail = VecDeque::new();
        let mut dropped_reported = false;
        let mut status = StatusTail::new(status_path);
        let mut poll = tokio::time::interval(STATUS_POLL);
        let mut requested = None;
        let mut exit_rx = watch.exit;
        let exit = loop {
            if let Some(exit) = known_exit {
                break Some(exit);
            }
            tokio::select! {
                exit = &mut exit_rx => break exit.ok(),
                Some(output) = watch.output.recv() => self.on_output(output, attempt, &matcher, &mut tail, &mut dropped_reported),
                _ = poll.tick() => self.forward_reports(&mut status, attempt, &matcher),
                msg = control.recv() => {
                    let (req, stop_it) = match msg {
                        Some(Control::Stop { reason, attempt: only }) => (Requested::Stop(reason), only == 0 || only == attempt),
                        Some(Control::Restart { reason }) => (Requested::Restart(reason), true),
                        Some(Control::Hold(hold)) => {
                            self.held.store(hold, Ordering::SeqCst);
                            continue;
                        }
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
        while let Ok(output) = watch.output.try_recv() {
            self.on_output(output, attempt, &matcher, &mut tail, &mut dropped_reported);
        }
        self.forward_reports(&mut status, attempt, &matcher);

        // Whatever the main process left behind goes with it.
        process::stop_tree(pid, &attempt_key, Duration::from_secs(2)).await;
        keeper.forget(&attempt_key);
        AttemptEnd {
            exit,
            runtime,
            spawn_error: None,
            requested,
            tail: tail.into(),
        }
    }

    /// One line (or a dropped-output notice) from the keeper.
    fn on_output(
        &self,
        output: Output,
        attempt: u32,
        matcher: &RuleMatcher,
        tail: &mut VecDeque<String>,
        dropped_reported: &mut bool,
    ) {
        match output {
            Output::Line { stream, line } => {
                if let Some(found) = matcher.check(&line, &stream) {
                    self.ctx
                        .outbox
                        .push(&self.spec.name, attempt, Kind::LogMatch(found));
                }
                if tail.len() == self.ctx.log_limits.tail_lines {
                    tail.pop_front();
                }
                // Tails travel in events and notifications: keep each line short.
                let line = if line.len() > 512 {
                    format!("{}…", &line[..line.floor_char_boundary(512)])
                } else {
                    line
                };
                tail.push_back(line);
            }
            Output::Dropped { stream, error } => {
                if !std::mem::replace(dropped_reported, true) {
                    self.ctx.outbox.push(
                        &self.spec.name,
                        attempt,
                        Kind::LogDropped(LogDropped { stream, error }),
                    );
                }
            }
        }
    }

    fn forward_reports(&self, status: &mut StatusTail, attempt: u32, matcher: &RuleMatcher) {
        for report in status.poll() {
            if let Some(found) = matcher.check(&report.message, "status") {
                self.ctx
                    .outbox
                    .push(&self.spec.name, attempt, Kind::LogMatch(found));
            }
            self.ctx
                .outbox
                .push(&self.spec.name, attempt, Kind::Report(report));
        }
    }

    /// How long this task may run out of contact with the controller; None: for ever.
    fn lease(&self) -> Option<Duration> {
        match self.rules.on_disconnect {
            muster_proto::spec::OnDisconnect::Keep => None,
            muster_proto::spec::OnDisconnect::StopAfter(d) => {
                Some(d.unwrap_or_else(|| self.ctx.contact.lock().expect("contact poisoned").lease))
            }
        }
    }

    fn child_env(&self, attempt: u32, status_path: &std::path::Path) -> Vec<(String, String)> {
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
                self.ctx
                    .task_data_dir(&self.spec.name)
                    .to_string_lossy()
                    .into_owned(),
            ),
            ("MUSTER_CONTROLLER".into(), self.ctx.controller.clone()),
            (
                "MUSTER_INBOX".into(),
                self.ctx
                    .task_inbox(&self.spec.name)
                    .to_string_lossy()
                    .into_owned(),
            ),
        ]);
        if let Some(ca) = &self.ctx.tls_ca {
            env.push(("MUSTER_CA".into(), ca.to_string_lossy().into_owned()));
        }
        env
    }

    fn set_phase(&self, attempt: u32, pid: u32, phase: &'static str) {
        let mut status = self.status.lock().expect("run status poisoned");
        *status = RunStatus {
            attempt,
            pid,
            started_ms: if pid == 0 { 0 } else { now_ms() },
            phase,
            signalled: status.signalled && status.attempt == attempt,
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
