//! The tasks this node runs: starts runners on command, routes stop and restart to them,
//! and lists what runs for the Hello of every session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use muster_proto::spec::{self, Rules};
use muster_proto::v1::{
    node_event::Kind, HoldTask, RestartTask, RunningAttempt, Settled, StartTask, StopTask,
};

use crate::runner::{Control, RunStatus, Runner};
use crate::Context;

struct Handle {
    control: mpsc::UnboundedSender<Control>,
    status: Arc<Mutex<RunStatus>>,
}

pub struct Supervisor {
    ctx: Arc<Context>,
    tasks: Mutex<HashMap<String, Handle>>,
    /// Last attempt of each task that ended here, so a Start sent again after a reconnect
    /// does not run a finished attempt twice.
    finished: Mutex<HashMap<String, u32>>,
    idle: tokio::sync::Notify,
    shutting_down: std::sync::atomic::AtomicBool,
}

impl Supervisor {
    pub fn new(ctx: Arc<Context>) -> Arc<Self> {
        Arc::new(Supervisor {
            ctx,
            tasks: Mutex::new(HashMap::new()),
            finished: Mutex::new(HashMap::new()),
            idle: tokio::sync::Notify::new(),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
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

        let (control, rx) = mpsc::unbounded_channel();
        let status = Arc::new(Mutex::new(RunStatus {
            attempt: cmd.attempt,
            phase: "starting",
            ..Default::default()
        }));
        let runner = Runner {
            rules: Rules::from_spec(&spec),
            spec,
            extra_env: cmd.env.into_iter().collect(),
            ctx: self.ctx.clone(),
            status: status.clone(),
            held: Default::default(),
            wait_until: Default::default(),
        };
        tasks.insert(name.clone(), Handle { control, status });
        let this = self.clone();
        tokio::spawn(async move {
            let last = runner.run(cmd.attempt, rx).await;
            this.finish(&name, last);
        });
        Ok(())
    }

    fn finish(&self, name: &str, attempt: u32) {
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

    pub fn hold(&self, cmd: HoldTask) {
        let tasks = self.tasks.lock().expect("task table poisoned");
        if let Some(handle) = tasks.get(&cmd.task) {
            let _ = handle.control.send(Control::Hold(cmd.hold));
        }
    }

    /// What runs now, for Hello.
    pub fn running(&self) -> Vec<RunningAttempt> {
        let tasks = self.tasks.lock().expect("task table poisoned");
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
                }
            })
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
