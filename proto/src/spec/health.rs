//! Health rules: what a task's output or exit means and what Muster does about it, with the
//! built-in rule packs a task enables by name.

use std::time::Duration;

use crate::duration;
use crate::v1;

/// What a matching rule makes Muster do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Restart the task (counts toward its crash loop).
    Restart,
    /// Stop the task for good: it ends `failed` with the rule as reason.
    Stop,
    /// Leave the task alone and open an incident.
    Escalate,
    /// Do not restart before a wait (a provider's rate-limit reset); not a crash.
    Wait,
}

impl Action {
    pub const NAMES: [&'static str; 4] = ["restart", "stop", "escalate", "wait"];

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "restart" => Some(Action::Restart),
            "stop" => Some(Action::Stop),
            "escalate" => Some(Action::Escalate),
            "wait" => Some(Action::Wait),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Restart => "restart",
            Action::Stop => "stop",
            Action::Escalate => "escalate",
            Action::Wait => "wait",
        }
    }
}

pub const SEVERITIES: [&str; 4] = ["info", "warning", "error", "critical"];
pub const PACKS: [&str; 2] = ["ml", "llm-agent"];

/// What a rule looks at.
#[derive(Debug, Clone)]
pub enum Trigger {
    /// A regular expression on log lines and report messages.
    Output(String),
    /// Exit codes, signals, or a suspected OOM kill.
    Exit {
        codes: Vec<i32>,
        signals: Vec<i32>,
        oom: bool,
    },
}

/// One resolved rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub trigger: Trigger,
    pub action: Action,
    pub severity: String,
    pub wait: Option<Duration>,
    /// Which pack it came from, or "task".
    pub source: &'static str,
}

/// Settings a pack adds besides rules.
#[derive(Debug, Clone, Default)]
pub struct PackFlags {
    /// `ml`: a loss more than this factor above its best value is divergence.
    pub diverge_factor: Option<f64>,
    /// `llm-agent`: a task that says it is blocked or needs help is never restarted for
    /// silence; its silence is escalated instead.
    pub never_restart_blocked: bool,
}

fn output(name: &str, pattern: &str, action: Action, severity: &str, source: &'static str) -> Rule {
    Rule {
        name: name.into(),
        trigger: Trigger::Output(pattern.into()),
        action,
        severity: severity.into(),
        wait: None,
        source,
    }
}

/// The rules and flags of a built-in pack.
pub fn pack(name: &str) -> Option<(Vec<Rule>, PackFlags)> {
    match name {
        "ml" => Some((
            vec![
                output(
                    "cuda_oom",
                    r"CUDA out of memory|CUDA error: out of memory|OutOfMemoryError",
                    Action::Restart,
                    "error",
                    "ml",
                ),
                output(
                    "nccl_timeout",
                    r"NCCL.{0,80}(timeout|timed out)|Watchdog caught collective operation timeout",
                    Action::Restart,
                    "warning",
                    "ml",
                ),
                output(
                    "gpu_xid",
                    r"NVRM: Xid|GPU has fallen off the bus",
                    Action::Escalate,
                    "critical",
                    "ml",
                ),
                output(
                    "preempted",
                    r"(?i)\b(preempted|preemption notice|spot instance interruption)\b",
                    Action::Restart,
                    "warning",
                    "ml",
                ),
                Rule {
                    name: "oom_kill".into(),
                    trigger: Trigger::Exit {
                        codes: vec![],
                        signals: vec![],
                        oom: true,
                    },
                    action: Action::Restart,
                    severity: "error".into(),
                    wait: None,
                    source: "ml",
                },
            ],
            PackFlags {
                diverge_factor: Some(10.0),
                ..Default::default()
            },
        )),
        "llm-agent" => Some((
            vec![
                Rule {
                    name: "rate_limited".into(),
                    trigger: Trigger::Output(
                        r"(?i)rate.?limit(ed)?|too many requests|\b429\b".into(),
                    ),
                    action: Action::Wait,
                    severity: "info".into(),
                    wait: Some(Duration::from_secs(60)),
                    source: "llm-agent",
                },
                output(
                    "credentials_expired",
                    r"(?i)(invalid|expired|revoked|incorrect)[ _-]?(api[ _-]?key|token|credentials?)|\b401 unauthorized\b|authentication_error",
                    Action::Stop,
                    "critical",
                    "llm-agent",
                ),
            ],
            PackFlags {
                never_restart_blocked: true,
                ..Default::default()
            },
        )),
        _ => None,
    }
}

/// All rules of a health spec: its own first (they win), then `fail_patterns`, then packs.
pub fn resolve(health: &v1::HealthSpec) -> (Vec<Rule>, PackFlags) {
    let mut rules: Vec<Rule> = health.rules.iter().filter_map(rule_from_proto).collect();
    for (i, pattern) in health.fail_patterns.iter().enumerate() {
        rules.push(output(
            &format!("fail_pattern_{i}"),
            pattern,
            Action::Restart,
            "error",
            "task",
        ));
    }
    let mut flags = PackFlags::default();
    for name in &health.packs {
        if let Some((pack_rules, pack_flags)) = pack(name) {
            rules.extend(pack_rules);
            flags.diverge_factor = flags.diverge_factor.or(pack_flags.diverge_factor);
            flags.never_restart_blocked |= pack_flags.never_restart_blocked;
        }
    }
    (rules, flags)
}

fn rule_from_proto(r: &v1::HealthRule) -> Option<Rule> {
    let trigger = match r.on.as_str() {
        "output" => Trigger::Output(r.pattern.clone()),
        "exit" => Trigger::Exit {
            codes: r.exit_codes.clone(),
            signals: r.signals.clone(),
            oom: r.oom,
        },
        _ => return None,
    };
    Some(Rule {
        name: r.name.clone(),
        trigger,
        action: Action::parse(&r.action)?,
        severity: if r.severity.is_empty() {
            "error".into()
        } else {
            r.severity.clone()
        },
        wait: (!r.wait.is_empty())
            .then(|| duration::parse(&r.wait).ok())
            .flatten(),
        source: "task",
    })
}

impl Rule {
    /// Whether an exit matches this rule. `oom` is the agent's suspicion of an OOM kill.
    pub fn matches_exit(&self, code: Option<i32>, signal: Option<i32>, oom: bool) -> bool {
        match &self.trigger {
            Trigger::Exit {
                codes,
                signals,
                oom: want_oom,
            } => {
                code.is_some_and(|c| codes.contains(&c))
                    || signal.is_some_and(|s| signals.contains(&s))
                    || (*want_oom && oom)
            }
            Trigger::Output(_) => false,
        }
    }

    /// A one-line description for `muster rules check`.
    pub fn describe(&self) -> String {
        let on = match &self.trigger {
            Trigger::Output(p) => format!("output matching /{p}/"),
            Trigger::Exit {
                codes,
                signals,
                oom,
            } => {
                let mut parts = Vec::new();
                if !codes.is_empty() {
                    parts.push(format!("exit code in {codes:?}"));
                }
                if !signals.is_empty() {
                    parts.push(format!("signal in {signals:?}"));
                }
                if *oom {
                    parts.push("an OOM kill".into());
                }
                parts.join(" or ")
            }
        };
        let what = match self.action {
            Action::Restart => "restart the task (counts toward its crash loop)".to_string(),
            Action::Stop => "stop the task for good (failed) and open an incident".to_string(),
            Action::Escalate => "leave it running and open an incident".to_string(),
            Action::Wait => format!(
                "hold restarts for the wait the line names, else {}, and mark it blocked",
                self.wait.map_or("60s".into(), duration::format)
            ),
        };
        format!(
            "{} [{}]: on {on}, {what}; severity {}",
            self.name, self.source, self.severity
        )
    }
}

/// A wait a line names: "retry after 30s", "reset in 2 minutes", "try again in 12.5 seconds".
pub fn wait_in_line(line: &str) -> Option<Duration> {
    static WAIT: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = WAIT.get_or_init(|| {
        regex::Regex::new(r"(?i)(?:retry|reset|try again|wait)\w*\s*(?:after|in)?\s*:?\s*(\d+(?:\.\d+)?)\s*(ms|milliseconds?|s|secs?|seconds?|m|mins?|minutes?|h|hours?)?\b")
            .expect("the wait pattern is valid")
    });
    let caps = re.captures(line)?;
    let value: f64 = caps[1].parse().ok()?;
    let unit = caps.get(2).map_or("s", |m| m.as_str()).to_ascii_lowercase();
    let secs = match unit.chars().next() {
        Some('m') if unit.starts_with("ms") || unit.starts_with("milli") => value / 1000.0,
        Some('m') => value * 60.0,
        Some('h') => value * 3600.0,
        _ => value,
    };
    (0.0..86_400.0)
        .contains(&secs)
        .then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_resolve_after_task_rules() {
        let health = v1::HealthSpec {
            packs: vec!["ml".into()],
            rules: vec![v1::HealthRule {
                name: "mine".into(),
                on: "exit".into(),
                exit_codes: vec![3],
                action: "stop".into(),
                ..Default::default()
            }],
            ..Default::default()
        };

        let (rules, flags) = resolve(&health);

        assert_eq!(rules[0].name, "mine");
        assert!(rules.iter().any(|r| r.name == "cuda_oom"));
        assert_eq!(flags.diverge_factor, Some(10.0));
        assert!(rules[0].matches_exit(Some(3), None, false));
    }

    #[test]
    fn wait_is_read_from_the_line() {
        assert_eq!(
            wait_in_line("429: rate limited, retry after 30s"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            wait_in_line("limit reached; resets in 2 minutes"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            wait_in_line("Rate limit hit. Please try again in 1.5s."),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(wait_in_line("rate limit"), None);
    }

    #[test]
    fn pack_patterns_match_real_messages() {
        let (ml, _) = pack("ml").unwrap();
        let (llm, _) = pack("llm-agent").unwrap();
        let hit = |rules: &[Rule], name: &str, line: &str| {
            let rule = rules.iter().find(|r| r.name == name).unwrap();
            let Trigger::Output(p) = &rule.trigger else {
                panic!()
            };
            regex::Regex::new(p).unwrap().is_match(line)
        };

        assert!(hit(
            &ml,
            "cuda_oom",
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
        ));
        assert!(hit(
            &ml,
            "nccl_timeout",
            "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1)"
        ));
        assert!(hit(
            &ml,
            "gpu_xid",
            "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus."
        ));
        assert!(hit(
            &llm,
            "rate_limited",
            "anthropic.RateLimitError: Error code: 429 - rate_limit_error"
        ));
        assert!(hit(
            &llm,
            "credentials_expired",
            "AuthenticationError: invalid api key provided"
        ));
        assert!(!hit(&llm, "credentials_expired", "loaded 3 tokens"));
    }
}
