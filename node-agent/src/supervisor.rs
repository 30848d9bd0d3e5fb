//! The tasks this node runs: starts runners on command, routes stop and restart to them,
//! and lists what runs for the Hello of every session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use muster_proto::spec::{self, OnDisconnect, Rules};
use muster_proto::v1::{
    node_event::Kind, HoldTask, RestartTask, RunningAttempt, Settled, StartTask, StopTask,
};

use prost::Message;

use crate::keeper::ChildInfo;
use crate::process::{self, Exit};
use crate::runner::{write_atomically, Adopted, Control, RunStatus, Runner};
use crate::Context;

struct Handle {
    control: mpsc::UnboundedSender<Control>,
    status: Arc<Mutex<RunStatus>>,
    on_disconnect: OnDisconnect,
    lease_stopped: bool,
}

pub struct Supervisor {
    ctx: Arc<Context>,
    tasks: Mutex<HashMap<String, Handle>>,
    /// Last attempt of each task that ended here, so a Start sent again after a reconnect
    /// does not run a finished attempt twice.
    finished: Mutex<HashMap<String, u32>>,
    idle: tokio::sync::Notify,
    shutting_down: std::sync::atomic::AtomicBool,
    exited_while_away: Mutex<HashMap<String, u32>>,
}

impl Supervisor {
    pub fn new(ctx: Arc<Context>) -> Arc<Self> {
        Arc::new(Supervisor {
            ctx,
            tasks: Mutex::new(HashMap::new()),
            finished: Mutex::new(HashMap::new()),
            idle: tokio::sync::Notify::new(),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            exited_while_away: Mutex::new(HashMap::new()),
        })
    }

    /// Starts a task unless it already runs here or already ran this attempt.
    pub fn start(self: &Arc<Self>, cmd: StartTask) -> Result<(), String> {
        let spec = cmd.spec.ok_or("start command without a spec")?;
        spec::validate(&spec).map_err(|errs| {
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let name = spec.name.clone();
        let mut tasks = self.tasks.lock().expect("task table poisoned");
        if self.is_shutting_down() {
            // Hand the task back at once so the controller places it elsewhere.
            let settled = Settled {
                state: "stopped".into(),
                reason: "node_shutdown".into(),
            };
            self.ctx
                .outbox
                .push(&name, cmd.attempt, Kind::Settled(settled));
            return Err("node is shutting down".into());
        }
        if let Some(handle) = tasks.get(&name) {
            let running = handle.status.lock().expect("run status poisoned").attempt;
            return if running >= cmd.attempt {
                Ok(())
            } else {
                Err(format!("task {name} already runs attempt {running} here"))
            };
        }
        if self
            .finished
            .lock()
            .expect("finished table poisoned")
            .get(&name)
            .is_some_and(|&a| a >= cmd.attempt)
        {
            return Ok(());
        }

        // Recorded so that a new agent can re-adopt the task after this one dies.
        let task_dir = self.ctx.task_dir(&name);
        let _ = std::fs::create_dir_all(&task_dir);
        let record = StartTask {
            spec: Some(spec.clone()),
            attempt: cmd.attempt,
            env: cmd.env.clone(),
        };
        if let Err(e) = write_atomically(&task_dir.join("start.pb"), &record.encode_to_vec()) {
            tracing::warn!(task = %name, error = %e, "cannot record the task; it cannot be re-adopted");
        }
        self.launch(&mut tasks, spec, cmd.attempt, cmd.env, None);
        Ok(())
    }

    /// Starts the runner of a task (spawning, or re-adopting `adopted`).
    fn launch(
        self: &Arc<Self>,
        tasks: &mut HashMap<String, Handle>,
        spec: muster_proto::v1::TaskSpec,
        attempt: u32,
        env: HashMap<String, String>,
        adopted: Option<Adopted>,
    ) {
        let name = spec.name.clone();
        let (control, rx) = mpsc::unbounded_channel();
        let status = Arc::new(Mutex::new(RunStatus {
            attempt,
            phase: "starting",
            ..Default::default()
        }));
        let runner = Runner {
            rules: Rules::from_spec(&spec),
            spec,
            extra_env: env.into_iter().collect(),
            ctx: self.ctx.clone(),
            status: status.clone(),
            held: Default::default(),
            wait_until: Default::default(),
        };
        let on_disconnect = runner.rules.on_disconnect;
        tasks.insert(
            name.clone(),
            Handle {
                control,
                status,
                on_disconnect,
                lease_stopped: false,
            },
        );
        let this = self.clone();
        tokio::spawn(async move {
            let last = runner.run(attempt, rx, adopted).await;
            this.finish(&name, last);
        });
    }

    /// Re-adopts what a previous agent left under the keeper: each task whose records name a
    /// child the keeper still knows, checked by pid and process start time. Children nobody
    /// claims, and task processes the keeper lost track of, are killed.
    pub fn adopt_all(self: &Arc<Self>, children: Vec<ChildInfo>) {
        let by_key: HashMap<String, ChildInfo> =
            children.into_iter().map(|c| (c.key.clone(), c)).collect();
        let mut claimed = std::collections::HashSet::new();
        let mut tasks = self.tasks.lock().expect("task table poisoned");
        let dirs = std::fs::read_dir(self.ctx.data_dir.join("tasks"))
            .into_iter()
            .flatten()
            .flatten();
        for dir in dirs.map(|e| e.path()) {
            let Some((start, attempt, key, started_ms)) = read_records(&dir) else {
                continue;
            };
            let Some(spec) = start.spec else { continue };
            let adopted = match by_key.get(&key) {
                Some(child) if child.exited => {
                    let exit = match (child.exit_code, child.signal) {
                        (Some(c), _) => Exit::Code(c),
                        (None, Some(s)) => Exit::Signal(s),
                        (None, None) => Exit::Signal(0),
                    };
                    self.exited_while_away
                        .lock()
                        .expect("adoption state poisoned")
                        .insert(spec.name.clone(), attempt);
                    Some(Adopted {
                        key: key.clone(),
                        pid: child.pid,
                        started_ms,
                        exit: Some(exit),
                    })
                }
                Some(child) if crate::keeper::start_time(child.pid) == Some(child.start_time) => {
                    Some(Adopted {
                        key: key.clone(),
                        pid: child.pid,
                        started_ms,
                        exit: None,
                    })
                }
                _ => None,
            };
            match adopted {
                Some(adopted) => {
                    claimed.insert(key);
                    self.launch(&mut tasks, spec, attempt, start.env, Some(adopted));
                }
                None => {
                    tracing::info!(task = %spec.name, attempt, "a recorded attempt is gone; the controller places it again");
                    remove_records(&dir);
                }
            }
        }
        drop(tasks);

        for child in by_key.values().filter(|c| !claimed.contains(&c.key)) {
            if !child.exited {
                tracing::warn!(key = %child.key, pid = child.pid, "killing a child no task claims");
                process::signal_tree(child.pid, &child.key, nix::sys::signal::Signal::SIGKILL);
            }
            self.ctx.keeper.forget(&child.key);
        }
        let known: std::collections::HashSet<String> = by_key.keys().cloned().collect();
        let killed = process::kill_keys_with_prefix(&self.ctx.key_prefix(), &known);
        if killed > 0 {
            tracing::warn!(
                killed,
                "killed task processes no keeper knows (left by a keeper that died)"
            );
        }
    }

    fn finish(&self, name: &str, attempt: u32) {
        remove_records(&self.ctx.task_dir(name));
        self.finished
            .lock()
            .expect("finished table poisoned")
            .insert(name.to_string(), attempt);
        let mut tasks = self.tasks.lock().expect("task table poisoned");
        tasks.remove(name);
        if tasks.is_empty() {
            self.idle.notify_waiters();
        }
    }

    pub fn stop(&self, cmd: StopTask) {
        let tasks = self.tasks.lock().expect("task table poisoned");
        match tasks.get(&cmd.task) {
            Some(handle) => {
                let _ = handle.control.send(Control::Stop {
                    reason: cmd.reason,
                    attempt: cmd.attempt,
                });
            }
            None => {
                // Nothing runs here: say so, so the controller can settle its record.
                let settled = Settled {
                    state: "stopped".into(),
                    reason: cmd.reason,
                };
                self.ctx
                    .outbox
                    .push(&cmd.task, cmd.attempt, Kind::Settled(settled));
            }
        }
    }

    pub fn restart(&self, cmd: RestartTask) -> Result<(), String> {
        let tasks = self.tasks.lock().expect("task table poisoned");
        let handle = tasks
            .get(&cmd.task)
            .ok_or_else(|| format!("task {} does not run here", cmd.task))?;
        handle
            .control
            .send(Control::Restart { reason: cmd.reason })
            .map_err(|_| format!("task {} is ending", cmd.task))
    }

    /// Sends a signal to the running attempt's process group.
    pub fn signal(&self, task: &str, signal: i32) -> Result<(), String> {
        let tasks = self.tasks.lock().expect("task table poisoned");
        let pid = tasks
            .get(task)
            .map(|h| {
                let mut status = h.status.lock().expect("run status poisoned");
                status.signalled = true;
                status.pid
            })
            .filter(|&p| p > 0);
        let pid = pid.ok_or_else(|| format!("task {task} has no running process here"))?;
        let signal = nix::sys::signal::Signal::try_from(signal)
            .map_err(|e| format!("signal {signal}: {e}"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(-(pid as i32)), signal)
            .or_else(|_| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal))
            .map_err(|e| format!("signalling {task}: {e}"))
    }

    pub fn hold(&self, cmd: HoldTask) {
        let tasks = self.tasks.lock().expect("task table poisoned");
        if let Some(handle) = tasks.get(&cmd.task) {
            let _ = handle.control.send(Control::Hold(cmd.hold));
        }
    }

    /// Out of contact with the controller for longer than a task's lease: stop it, so that
    /// the replacement the controller places after the lease never runs beside it.
    pub fn enforce_lease(&self) {
        let silent = self.ctx.silent_for();
        let lease = self.ctx.contact.lock().expect("contact poisoned").lease;
        let mut tasks = self.tasks.lock().expect("task table poisoned");
        for (name, handle) in tasks.iter_mut() {
            let limit = match handle.on_disconnect {
                OnDisconnect::Keep => continue,
                OnDisconnect::StopAfter(d) => d.unwrap_or(lease),
            };
            if silent > limit && !handle.lease_stopped {
                handle.lease_stopped = true;
                tracing::warn!(task = %name, silent_s = silent.as_secs(), "lease expired: stopping the task");
                let _ = handle.control.send(Control::Stop {
                    reason: "lease_expired".into(),
                    attempt: 0,
                });
            }
        }
    }

    /// Passes the last contact with the controller on to the keeper, which stops children
    /// whose lease ran out even if this agent cannot (frozen, killed). Only after this agent
    /// heard from the controller itself: a fresh agent knows nothing yet.
    pub fn tell_keeper_contact(&self) {
        let heard = self.ctx.contact.lock().expect("contact poisoned").heard;
        if heard {
            self.ctx.keeper.contact(self.ctx.silent_for());
        }
    }

    /// What runs now, for Hello. Until a controller welcomed this agent, Hello also names
    /// attempts that exited while no agent ran, so the controller waits for their exit
    /// instead of calling them lost.
    pub fn running(&self) -> Vec<RunningAttempt> {
        let away: Vec<(String, u32)> = self
            .exited_while_away
            .lock()
            .expect("adoption state poisoned")
            .iter()
            .map(|(name, attempt)| (name.clone(), *attempt))
            .collect();
        let tasks = self.tasks.lock().expect("task table poisoned");
        let reported: Vec<RunningAttempt> = away
            .iter()
            .filter(|(name, _)| !tasks.contains_key(name))
            .map(|(name, attempt)| RunningAttempt {
                task: name.clone(),
                attempt: *attempt,
                state: "exited".into(),
                ..Default::default()
            })
            .collect();
        tasks
            .iter()
            .map(|(name, handle)| {
                let status = handle.status.lock().expect("run status poisoned");
                RunningAttempt {
                    task: name.clone(),
                    attempt: status.attempt,
                    pid: status.pid,
                    started_ms: status.started_ms,
                    state: status.phase.to_string(),
                    inbox_seq: crate::task_inbox::last_seq(&self.ctx, name),
                }
            })
            .chain(reported)
            .collect()
    }

    /// A controller welcomed a Hello that named the attempts that exited while no agent
    /// ran: it knows them now.
    pub fn welcomed(&self) {
        self.exited_while_away
            .lock()
            .expect("adoption state poisoned")
            .clear();
    }

    /// The phase of every task here (starting, running, backoff, stopping), for metrics.
    pub fn phases(&self) -> Vec<&'static str> {
        self.tasks
            .lock()
            .expect("task table poisoned")
            .values()
            .map(|handle| handle.status.lock().expect("run status poisoned").phase)
            .collect()
    }

    /// Slots used by running tasks.
    pub fn len(&self) -> usize {
        self.tasks.lock().expect("task table poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Refuses new tasks, stops every task and waits, at most `deadline`, until all have
    /// ended.
    pub async fn stop_all(&self, reason: &str, deadline: Duration) -> bool {
        // Set under the task table lock, so no start slips in between.
        {
            let _tasks = self.tasks.lock().expect("task table poisoned");
            self.shutting_down
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let wait = async {
            loop {
                let idle = self.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                {
                    let tasks = self.tasks.lock().expect("task table poisoned");
                    if tasks.is_empty() {
                        return;
                    }
                    for handle in tasks.values() {
                        let _ = handle.control.send(Control::Stop {
                            reason: reason.to_string(),
                            attempt: 0,
                        });
                    }
                }
                idle.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }
}

/// The start command and attempt a task dir records: (start, attempt, key, started_ms).
fn read_records(dir: &std::path::Path) -> Option<(StartTask, u32, String, i64)> {
    let start = StartTask::decode(std::fs::read(dir.join("start.pb")).ok()?.as_slice()).ok()?;
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("attempt.json")).ok()?).ok()?;
    let attempt = u32::try_from(record["attempt"].as_u64()?).ok()?;
    let key = record["key"].as_str()?.to_string();
    Some((
        start,
        attempt,
        key,
        record["started_ms"].as_i64().unwrap_or(0),
    ))
}

fn remove_records(dir: &std::path::Path) {
    let _ = std::fs::remove_file(dir.join("start.pb"));
    let _ = std::fs::remove_file(dir.join("attempt.json"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_proto::v1::{HealthSpec, RestartSpec, TaskSpec};

    #[test]
    fn records_survive_the_round_trip_with_every_policy_field() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TaskSpec {
            name: "t".into(),
            command: vec!["sleep".into(), "1".into()],
            restart: Some(RestartSpec {
                policy: "always".into(),
                backoff_initial: "250ms".into(),
                max_restarts: Some(7),
                ..Default::default()
            }),
            health: Some(HealthSpec {
                heartbeat_timeout: "9s".into(),
                packs: vec!["ml".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let start = StartTask {
            spec: Some(spec.clone()),
            attempt: 3,
            env: [("MUSTER_X".to_string(), "1".to_string())].into(),
        };
        write_atomically(&dir.path().join("start.pb"), &start.encode_to_vec()).unwrap();
        crate::runner::record_attempt(dir.path(), 4, "muster:n:t:4:abc");

        let (read, attempt, key, _) = read_records(dir.path()).unwrap();

        assert_eq!(read.spec.unwrap(), spec);
        assert_eq!(read.env["MUSTER_X"], "1");
        assert_eq!((attempt, key.as_str()), (4, "muster:n:t:4:abc"));
    }
}
