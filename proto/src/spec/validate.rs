//! Validation of a task spec: every problem is collected and named by its field.

use std::fmt;

use super::health::{Action, PACKS, SEVERITIES};
use crate::duration;
use crate::v1;

/// Bounds on every input, so one bad spec cannot exhaust the controller or a node.
pub struct Limits;

impl Limits {
    pub const NAME_LEN: usize = 128;
    pub const ARGS: usize = 4_096;
    pub const ARGV_BYTES: usize = 256 * 1024;
    pub const ENV_VARS: usize = 1_024;
    pub const ENV_BYTES: usize = 256 * 1024;
    pub const LABELS: usize = 64;
    pub const LABEL_LEN: usize = 256;
    pub const PATTERNS: usize = 64;
    pub const PATTERN_LEN: usize = 1_024;
    pub const TASKS_PER_SUBMIT: usize = 10_000;
}

/// One problem with one field of a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// Prefixes the field with the task it belongs to, for errors about many tasks.
    pub fn within(self, task: &str) -> Self {
        if task.is_empty() {
            return self;
        }
        FieldError {
            field: format!("{task}: {}", self.field),
            problem: self.problem,
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field, self.problem)
    }
}

/// Checks a spec; returns every problem found, or nothing.
pub fn validate(spec: &v1::TaskSpec) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut bad = |field: &str, problem: String| errors.push(FieldError::new(field, problem));

    if let Err(problem) = check_name(&spec.name) {
        bad("name", problem);
    }
    check_command(spec, &mut bad);
    check_env(spec, &mut bad);
    check_labels("labels", &spec.labels, &mut bad);
    if let Some(placement) = &spec.placement {
        check_labels("placement.labels", &placement.labels, &mut bad);
    }
    if !spec.workdir.is_empty() && !spec.workdir.starts_with('/') {
        bad(
            "workdir",
            format!("must be an absolute path, got {:?}", spec.workdir),
        );
    }
    if spec.workdir.contains('\0') {
        bad("workdir", "contains a NUL byte".into());
    }
    if let Some(resources) = &spec.resources {
        if resources.slots > 1_024 {
            bad(
                "resources.slots",
                format!("is {}, at most 1024", resources.slots),
            );
        }
    }
    check_restart(spec.restart.as_ref(), &mut bad);
    check_health(spec.health.as_ref(), &mut bad);
    if let Some(stop) = &spec.stop {
        check_duration("stop.grace", &stop.grace, &mut bad);
    }
    if !spec.user.is_empty()
        && (spec.user.len() > 32
            || !spec
                .user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            || spec.user.starts_with('-'))
    {
        bad("user", format!("{:?} is not a valid user name", spec.user));
    }
    if spec.on_disconnect != "keep" {
        if let Some(d) = check_duration("on_disconnect", &spec.on_disconnect, &mut bad) {
            if d.is_zero() {
                bad(
                    "on_disconnect",
                    "must be \"keep\" or a duration above 0s".into(),
                );
            }
        }
    }
    if let Some(e) = &spec.escalation {
        if !e.severity.is_empty() && !SEVERITIES.contains(&e.severity.as_str()) {
            bad(
                "escalation.severity",
                format!(
                    "is {:?}; expected one of {}",
                    e.severity,
                    SEVERITIES.join(", ")
                ),
            );
        }
        check_duration("escalation.parent_timeout", &e.parent_timeout, &mut bad);
        for (field, value) in [
            ("escalation.slack_channel", &e.slack_channel),
            ("escalation.slack_user", &e.slack_user),
        ] {
            if value.len() > 128 || value.chars().any(char::is_control) {
                bad(
                    field,
                    "must be at most 128 characters without control characters".into(),
                );
            }
        }
    }
    if !matches!(spec.parent_close.as_str(), "" | "stop" | "keep") {
        bad(
            "parent_close",
            format!("is {:?}; expected \"stop\" or \"keep\"", spec.parent_close),
        );
    }
    if let Some(limits) = &spec.limits {
        check_limits(limits, &mut bad);
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Subtree limits: counts above zero and within bounds, durations above zero, and a
/// restart intensity given as a pair.
fn check_limits(limits: &v1::SubtreeLimits, bad: &mut impl FnMut(&str, String)) {
    for (field, value, max) in [
        ("limits.max_children", limits.max_children, 1_000_000),
        ("limits.max_depth", limits.max_depth, 64),
        ("limits.max_descendants", limits.max_descendants, 10_000_000),
        ("limits.max_running", limits.max_running, 10_000_000),
        ("limits.max_restarts", limits.max_restarts, 1_000_000),
    ] {
        if let Some(v) = value {
            if v > max {
                bad(field, format!("is {v}, at most {max}"));
            }
        }
    }
    for (field, value) in [
        ("limits.budget", &limits.budget),
        ("limits.restart_window", &limits.restart_window),
    ] {
        if check_duration(field, value, bad).is_some_and(|d| d.is_zero()) {
            bad(field, "must be above 0s".into());
        }
    }
    match (limits.max_restarts, limits.restart_window.is_empty()) {
        (Some(_), true) => bad(
            "limits.restart_window",
            "is needed with limits.max_restarts (for example \"5m\")".into(),
        ),
        (None, false) => bad(
            "limits.max_restarts",
            "is needed with limits.restart_window".into(),
        ),
        _ => {}
    }
}

/// Names are `[a-z0-9._-]`, start with a letter or digit, and are at most 128 characters;
/// they become directory names on nodes, so `.` and `..` must never pass.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > Limits::NAME_LEN {
        return Err(format!(
            "is {} characters, at most {}",
            name.len(),
            Limits::NAME_LEN
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return Err(format!(
            "{name:?} must start with a lowercase letter or a digit"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{name:?} has {c:?}; allowed are a-z, 0-9, '.', '_' and '-'"
        ));
    }
    Ok(())
}

fn check_command(spec: &v1::TaskSpec, bad: &mut impl FnMut(&str, String)) {
    if spec.command.is_empty() || spec.command[0].is_empty() {
        bad(
            "command",
            "is empty; give the program and its arguments".into(),
        );
        return;
    }
    if spec.command.len() > Limits::ARGS {
        bad(
            "command",
            format!(
                "has {} arguments, at most {}",
                spec.command.len(),
                Limits::ARGS
            ),
        );
    }
    let bytes: usize = spec.command.iter().map(|a| a.len() + 1).sum();
    if bytes > Limits::ARGV_BYTES {
        bad(
            "command",
            format!("is {bytes} bytes, at most {}", Limits::ARGV_BYTES),
        );
    }
    if let Some(i) = spec.command.iter().position(|a| a.contains('\0')) {
        bad(&format!("command[{i}]"), "contains a NUL byte".into());
    }
}

fn check_env(spec: &v1::TaskSpec, bad: &mut impl FnMut(&str, String)) {
    if spec.env.len() > Limits::ENV_VARS {
        bad(
            "env",
            format!(
                "has {} variables, at most {}",
                spec.env.len(),
                Limits::ENV_VARS
            ),
        );
    }
    let bytes: usize = spec.env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if bytes > Limits::ENV_BYTES {
        bad(
            "env",
            format!("is {bytes} bytes, at most {}", Limits::ENV_BYTES),
        );
    }
    let mut keys: Vec<_> = spec.env.iter().collect();
    keys.sort();
    for (key, value) in keys {
        let valid = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            bad(
                &format!("env.{key}"),
                "is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)".into(),
            );
        } else if key.starts_with("MUSTER_") {
            bad(
                &format!("env.{key}"),
                "is reserved: the node agent sets MUSTER_* variables".into(),
            );
        }
        if value.contains('\0') {
            bad(&format!("env.{key}"), "contains a NUL byte".into());
        }
    }
}

fn check_labels(
    field: &str,
    labels: &std::collections::HashMap<String, String>,
    bad: &mut impl FnMut(&str, String),
) {
    if labels.len() > Limits::LABELS {
        bad(
            field,
            format!("has {} labels, at most {}", labels.len(), Limits::LABELS),
        );
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= Limits::LABEL_LEN
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !key_ok {
            bad(
                &format!("{field}.{key}"),
                format!(
                    "is not a valid label key ([A-Za-z0-9._/-], at most {} characters)",
                    Limits::LABEL_LEN
                ),
            );
        }
        if value.len() > Limits::LABEL_LEN || value.chars().any(|c| c.is_control()) {
            bad(
                &format!("{field}.{key}"),
                format!(
                    "value must be at most {} characters without control characters",
                    Limits::LABEL_LEN
                ),
            );
        }
    }
}

fn check_restart(restart: Option<&v1::RestartSpec>, bad: &mut impl FnMut(&str, String)) {
    let Some(r) = restart else { return };
    if !matches!(r.policy.as_str(), "" | "always" | "on-failure" | "never") {
        bad(
            "restart.policy",
            format!("is {:?}; expected always, on-failure or never", r.policy),
        );
    }
    let initial = check_duration("restart.backoff_initial", &r.backoff_initial, bad);
    let max = check_duration("restart.backoff_max", &r.backoff_max, bad);
    if let (Some(initial), Some(max)) = (initial, max) {
        if initial > max {
            bad(
                "restart.backoff_initial",
                "is longer than restart.backoff_max".into(),
            );
        }
    }
    if let Some(window) = check_duration("restart.window", &r.window, bad) {
        if window.is_zero() {
            bad("restart.window", "must be longer than 0s".into());
        }
    }
    if r.max_restarts.is_some_and(|n| n > 100_000) {
        bad("restart.max_restarts", "is more than 100000".into());
    }
}

fn check_health(health: Option<&v1::HealthSpec>, bad: &mut impl FnMut(&str, String)) {
    let Some(h) = health else { return };
    check_duration("health.heartbeat_timeout", &h.heartbeat_timeout, bad);
    let progress = check_duration("health.progress_timeout", &h.progress_timeout, bad);
    if progress.is_some() && h.progress_metric.is_empty() {
        bad(
            "health.progress_metric",
            "must be set when health.progress_timeout is".into(),
        );
    }
    if h.fail_patterns.len() > Limits::PATTERNS {
        bad(
            "health.fail_patterns",
            format!(
                "has {} patterns, at most {}",
                h.fail_patterns.len(),
                Limits::PATTERNS
            ),
        );
    }
    for (i, pack) in h.packs.iter().enumerate() {
        if !PACKS.contains(&pack.as_str()) {
            bad(
                &format!("health.packs[{i}]"),
                format!(
                    "{pack:?} is not a rule pack; known packs: {}",
                    PACKS.join(", ")
                ),
            );
        }
    }
    if h.rules.len() > Limits::PATTERNS {
        bad(
            "health.rules",
            format!("has {} rules, at most {}", h.rules.len(), Limits::PATTERNS),
        );
    }
    let mut names = std::collections::HashSet::new();
    for (i, rule) in h.rules.iter().enumerate() {
        check_rule(&format!("health.rules[{i}]"), rule, bad);
        if !names.insert(rule.name.as_str()) {
            bad(
                &format!("health.rules[{i}].name"),
                format!("{:?} is used by an earlier rule", rule.name),
            );
        }
        if RESERVED_REASONS.contains(&rule.name.as_str()) {
            bad(
                &format!("health.rules[{i}].name"),
                format!("{:?} is a built-in reason; pick another name", rule.name),
            );
        }
    }
    let mut packs = std::collections::HashSet::new();
    for (i, pack) in h.packs.iter().enumerate() {
        if !packs.insert(pack.as_str()) {
            bad(
                &format!("health.packs[{i}]"),
                format!("{pack:?} is listed twice"),
            );
        }
    }
    for (i, pattern) in h.fail_patterns.iter().enumerate() {
        let field = format!("health.fail_patterns[{i}]");
        if pattern.len() > Limits::PATTERN_LEN {
            bad(
                &field,
                format!("is longer than {} bytes", Limits::PATTERN_LEN),
            );
        } else if let Err(e) = regex::Regex::new(pattern) {
            bad(&field, format!("is not a valid regular expression: {e}"));
        }
    }
}

/// Reasons Muster itself uses; a rule named so would be mistaken for them.
const RESERVED_REASONS: [&str; 12] = [
    "exit_code",
    "signal",
    "crash_loop",
    "heartbeat_timeout",
    "progress_stalled",
    "metric_nan",
    "metric_diverged",
    "log_pattern",
    "node_lost",
    "needs_help",
    "operator",
    "spawn_error",
];

fn check_rule(field: &str, rule: &v1::HealthRule, bad: &mut impl FnMut(&str, String)) {
    if rule.on == "output" && (!rule.exit_codes.is_empty() || !rule.signals.is_empty() || rule.oom)
    {
        bad(
            field,
            "with on = \"output\" takes no exit_codes, signals or oom".into(),
        );
    }
    if rule.on == "exit" && !rule.pattern.is_empty() {
        bad(
            &format!("{field}.pattern"),
            "is for on = \"output\" rules".into(),
        );
    }
    if let Some(code) = rule.exit_codes.iter().find(|c| !(0..=255).contains(*c)) {
        bad(
            &format!("{field}.exit_codes"),
            format!("has {code}; exit codes are 0-255"),
        );
    }
    if let Some(sig) = rule.signals.iter().find(|s| !(1..=64).contains(*s)) {
        bad(
            &format!("{field}.signals"),
            format!("has {sig}; signals are 1-64"),
        );
    }
    if !rule.wait.is_empty() && rule.action != "wait" {
        bad(
            &format!("{field}.wait"),
            "is only for action = \"wait\"".into(),
        );
    }
    if let Err(problem) = check_name(&rule.name) {
        bad(&format!("{field}.name"), problem);
    }
    match rule.on.as_str() {
        "output" => {
            if rule.pattern.is_empty() {
                bad(
                    &format!("{field}.pattern"),
                    "is required when on = \"output\"".into(),
                );
            } else if rule.pattern.len() > Limits::PATTERN_LEN {
                bad(
                    &format!("{field}.pattern"),
                    format!("is longer than {} bytes", Limits::PATTERN_LEN),
                );
            } else if let Err(e) = regex::Regex::new(&rule.pattern) {
                bad(
                    &format!("{field}.pattern"),
                    format!("is not a valid regular expression: {e}"),
                );
            }
        }
        "exit" => {
            if rule.exit_codes.is_empty() && rule.signals.is_empty() && !rule.oom {
                bad(
                    field,
                    "with on = \"exit\" needs exit_codes, signals or oom = true".into(),
                );
            }
        }
        other => bad(
            &format!("{field}.on"),
            format!("is {other:?}; expected \"output\" or \"exit\""),
        ),
    }
    if Action::parse(&rule.action).is_none() {
        bad(
            &format!("{field}.action"),
            format!(
                "is {:?}; expected one of {}",
                rule.action,
                Action::NAMES.join(", ")
            ),
        );
    }
    if !rule.severity.is_empty() && !SEVERITIES.contains(&rule.severity.as_str()) {
        bad(
            &format!("{field}.severity"),
            format!(
                "is {:?}; expected one of {}",
                rule.severity,
                SEVERITIES.join(", ")
            ),
        );
    }
    check_duration(&format!("{field}.wait"), &rule.wait, bad);
}

/// Checks an optional duration field; returns the value when it is set and valid.
fn check_duration(
    field: &str,
    value: &str,
    bad: &mut impl FnMut(&str, String),
) -> Option<std::time::Duration> {
    if value.is_empty() {
        return None;
    }
    match duration::parse(value) {
        Ok(d) => Some(d),
        Err(e) => {
            bad(field, format!("is an {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> v1::TaskSpec {
        v1::TaskSpec {
            name: name.into(),
            command: vec!["true".into()],
            ..Default::default()
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(validate(&spec("sweep-lr0.1-s1")).is_ok());
        for bad in ["", ".", "..", "-x", "A", "a b", "a/b", &"a".repeat(129)] {
            assert!(validate(&spec(bad)).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn all_problems_are_reported_together() {
        let mut s = spec("ok");
        s.command.clear();
        s.env.insert("MUSTER_TASK".into(), "x".into());
        s.restart = Some(v1::RestartSpec {
            policy: "sometimes".into(),
            ..Default::default()
        });

        let fields: Vec<_> = validate(&s)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();

        assert_eq!(fields, ["command", "env.MUSTER_TASK", "restart.policy"]);
    }

    #[test]
    fn bad_regex_is_named() {
        let mut s = spec("ok");
        s.health = Some(v1::HealthSpec {
            fail_patterns: vec!["(unclosed".into()],
            ..Default::default()
        });

        let errors = validate(&s).unwrap_err();

        assert_eq!(errors[0].field, "health.fail_patterns[0]");
    }
}
