//! Health rules acted on by the controller: output rules the node matched, exit rules it
//! applied, and metric rules (NaN/Inf, divergence) the controller checks itself.

use std::time::{Duration, Instant};

use muster_proto::spec::health::Action;
use muster_proto::v1;

use super::Core;
use crate::event::Severity;
use crate::model::TaskState;

impl Core {
    /// An output rule matched a log line or report message on the node.
    pub(super) fn on_log_match(&mut self, name: &str, attempt: u32, m: v1::LogMatch) {
        let Some(task) = self.tasks.get(name) else {
            return;
        };
        if attempt != task.attempt || !task.state.holds_node() || task.state == TaskState::Stopping
        {
            return;
        }
        // Agents that predate rule actions send only a pattern: it meant restart.
        let action = Action::parse(&m.action).unwrap_or(Action::Restart);
        let rule = if m.rule.is_empty() {
            "fail_pattern".to_string()
        } else {
            m.rule.clone()
        };
        let sev = Severity::from_name(&m.severity);
        let held = self.is_held(name);
        let message = format!("{} matched rule {rule} ({})", m.stream, action.as_str());
        let event = self
            .task_event(name, "task.unhealthy", sev, message.clone())
            .with("reason", "log_pattern")
            .with("rule", rule.clone())
            .with("pattern", m.pattern.clone())
            .with("line", m.line.clone())
            .with("stream", m.stream.clone())
            .with(
                "action",
                if held && action == Action::Restart {
                    "none (held)"
                } else {
                    action.as_str()
                },
            )
            .with("wait_ms", m.wait_ms);
        self.emit(event);

        let detail = format!("{rule}: {}", m.line);
        match action {
            Action::Restart if held => {}
            Action::Restart => {
                if self.tasks[name].state.is_alive() {
                    self.request_restart(name, "log_pattern");
                }
            }
            Action::Stop => {
                self.open_incident(name, "", &rule, sev, &detail);
                self.request_stop(name, &rule);
            }
            Action::Escalate => self.open_incident(name, "", &rule, sev, &detail),
            Action::Wait => {
                let wait = Duration::from_millis(m.wait_ms);
                let task = self.tasks.get_mut(name).expect("task exists");
                if task.state.is_alive() {
                    task.set_state(TaskState::Blocked, &rule);
                }
                task.message = format!("waiting {}s ({rule})", wait.as_secs());
                // No heartbeat is expected before the wait is over.
                task.live.heartbeat = Instant::now() + wait;
                self.touch(name);
            }
        }
    }

    /// The node applied an exit rule; stop and escalate rules need a person.
    pub(super) fn on_exit_rule(&mut self, name: &str, exited: &v1::AttemptExited) {
        let action = Action::parse(&exited.action).unwrap_or(Action::Escalate);
        let sev = Severity::from_name(&exited.severity);
        let event = self
            .task_event(
                name,
                "task.unhealthy",
                sev,
                format!("exit matched rule {} ({})", exited.rule, action.as_str()),
            )
            .with("reason", exited.class.clone())
            .with("rule", exited.rule.clone())
            .with("action", action.as_str());
        self.emit(event);
        if matches!(action, Action::Stop | Action::Escalate) {
            let code = exited.exit_code.map_or_else(
                || format!("signal {}", exited.signal.unwrap_or(0)),
                |c| format!("exit code {c}"),
            );
            self.open_incident(
                name,
                "",
                &exited.rule,
                sev,
                &format!("{}: {code} ({})", exited.rule, exited.class),
            );
        }
    }

    /// `ml` pack: a loss far above its best value so far is divergence. Returns the message
    /// when the task diverged.
    pub(super) fn diverged(
        &mut self,
        name: &str,
        metrics: &std::collections::HashMap<String, f64>,
    ) -> Option<String> {
        let task = self.tasks.get_mut(name)?;
        let factor = task.rules.health.flags.diverge_factor?;
        let loss = *metrics.get("loss")?;
        if !loss.is_finite() {
            return None;
        }
        let best = task.live.loss_best.map_or(loss, |b: f64| b.min(loss));
        task.live.loss_best = Some(best);
        task.live.loss_reports += 1;
        (task.live.loss_reports >= 3 && best > 0.0 && loss > factor * best)
            .then(|| format!("loss {loss} is more than {factor}x its best {best}"))
    }
}
