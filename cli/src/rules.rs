//! `muster rules check`: what a task's health rules are and what each would do.

use std::path::Path;

use muster_proto::spec::health::{Action, Trigger};
use muster_proto::spec::Rules;

use crate::client::Failure;

pub fn check(
    file: &Path,
    line: Option<&str>,
    exit_code: Option<i32>,
    signal: Option<i32>,
) -> Result<(), Failure> {
    let specs = crate::load_specs(file)?;
    for spec in &specs {
        let rules = Rules::from_spec(spec);
        let health = &rules.health;
        println!("{}:", spec.name);
        match health.heartbeat_timeout {
            Some(t) => println!(
                "  heartbeat_timeout {}: no status line that long restarts the task",
                muster_proto::duration::format(t)
            ),
            None => println!("  no heartbeat_timeout: silence alone never restarts the task"),
        }
        if let (Some(metric), Some(t)) = (&health.progress_metric, health.progress_timeout) {
            println!(
                "  progress: {metric} not advancing for {} marks it stalled and opens an incident",
                muster_proto::duration::format(t)
            );
        }
        let watched = if health.nan_metrics.is_empty() {
            "any metric".to_string()
        } else {
            health.nan_metrics.join(", ")
        };
        println!("  metric_nan: NaN or Inf in {watched} stops it (failed) and opens an incident");
        if let Some(f) = health.flags.diverge_factor {
            println!("  metric_diverged [ml]: loss above {f}x its best stops it (failed) and opens an incident");
        }
        if health.flags.never_restart_blocked {
            println!(
                "  [llm-agent]: silent while blocked or needs_help escalates instead of restarting"
            );
        }
        for rule in &health.rules {
            println!("  {}", rule.describe());
        }

        if let Some(line) = line {
            let hit = health.rules.iter().find(|r| match &r.trigger {
                Trigger::Output(p) => regex::Regex::new(p).is_ok_and(|re| re.is_match(line)),
                Trigger::Exit { .. } => false,
            });
            match hit {
                Some(r) => println!("  => the line matches {}: {}", r.name, verdict(r.action)),
                None => println!("  => the line matches no rule"),
            }
        }
        if exit_code.is_some() || signal.is_some() {
            let oom = signal == Some(9) || exit_code == Some(137);
            match health
                .rules
                .iter()
                .find(|r| r.matches_exit(exit_code, signal, oom))
            {
                Some(r) => println!("  => that exit matches {}: {}", r.name, verdict(r.action)),
                None => println!(
                    "  => that exit matches no rule: the restart policy ({:?}) decides",
                    rules.restart.policy
                ),
            }
        }
    }
    Ok(())
}

fn verdict(action: Action) -> &'static str {
    match action {
        Action::Restart => "restart",
        Action::Stop => "stop (failed) and open an incident",
        Action::Escalate => "open an incident, leave it running",
        Action::Wait => "hold restarts until the wait is over",
    }
}
