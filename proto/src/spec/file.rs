//! TOML task and sweep files, and the expansion of a `[matrix]` into tasks.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;

use super::validate::{validate, FieldError};
use crate::v1;

/// Why a spec file was rejected. Nothing from a file with an error is submitted.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("{0}")]
    Toml(String),
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepDoc {
    task: Vec<TaskDoc>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskDoc {
    name: String,
    command: Vec<String>,
    #[serde(default)]
    shell: bool,
    #[serde(default)]
    workdir: String,
    #[serde(default)]
    env: HashMap<String, String>,
    #[serde(default)]
    labels: HashMap<String, String>,
    resources: Option<ResourcesDoc>,
    placement: Option<PlacementDoc>,
    restart: Option<RestartDoc>,
    health: Option<HealthDoc>,
    stop: Option<StopDoc>,
    escalation: Option<EscalationDoc>,
    #[serde(default)]
    on_disconnect: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    parent_close: String,
    limits: Option<LimitsDoc>,
    matrix: Option<BTreeMap<String, Vec<MatrixValue>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesDoc {
    #[serde(default)]
    slots: u32,
    #[serde(default)]
    gpus: u32,
    #[serde(default)]
    memory_mb: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlacementDoc {
    #[serde(default)]
    labels: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestartDoc {
    #[serde(default)]
    policy: String,
    #[serde(default)]
    backoff_initial: String,
    #[serde(default)]
    backoff_max: String,
    max_restarts: Option<u32>,
    #[serde(default)]
    window: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthDoc {
    #[serde(default)]
    heartbeat_timeout: String,
    #[serde(default)]
    progress_metric: String,
    #[serde(default)]
    progress_timeout: String,
    #[serde(default)]
    nan_metrics: Vec<String>,
    #[serde(default)]
    fail_patterns: Vec<String>,
    #[serde(default)]
    packs: Vec<String>,
    #[serde(default)]
    rules: Vec<RuleDoc>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    name: String,
    on: String,
    #[serde(default)]
    pattern: String,
    #[serde(default)]
    exit_codes: Vec<i32>,
    #[serde(default)]
    signals: Vec<i32>,
    #[serde(default)]
    oom: bool,
    action: String,
    #[serde(default)]
    severity: String,
    #[serde(default)]
    wait: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EscalationDoc {
    #[serde(default)]
    slack_channel: String,
    #[serde(default)]
    slack_user: String,
    pagerduty: Option<bool>,
    #[serde(default)]
    severity: String,
    #[serde(default)]
    parent_timeout: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsDoc {
    max_children: Option<u32>,
    max_depth: Option<u32>,
    max_descendants: Option<u32>,
    max_running: Option<u32>,
    #[serde(default)]
    budget: String,
    max_restarts: Option<u32>,
    #[serde(default)]
    restart_window: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopDoc {
    #[serde(default)]
    grace: String,
}

/// Matrix values may be written as strings or numbers; both substitute as text.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum MatrixValue {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl MatrixValue {
    fn text(&self) -> String {
        match self {
            MatrixValue::Text(s) => s.clone(),
            MatrixValue::Int(i) => i.to_string(),
            MatrixValue::Float(f) => f.to_string(),
            MatrixValue::Bool(b) => b.to_string(),
        }
    }
}

/// A sweep expanding to more tasks than this is almost surely a mistake.
const MAX_EXPANDED_TASKS: usize = 10_000;

/// Parses a task or sweep file into validated specs.
///
/// A relative `workdir` is resolved against `base_dir` (the file's directory), as
/// docker-compose resolves paths against the compose file, so a sweep can be submitted
/// from anywhere.
pub fn parse_file(text: &str, base_dir: &Path) -> Result<Vec<v1::TaskSpec>, ParseError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
    let docs = if table.contains_key("task") {
        let sweep: SweepDoc = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        sweep.task
    } else {
        vec![toml::from_str::<TaskDoc>(text).map_err(|e| toml_error(text, &e))?]
    };

    let mut specs = Vec::new();
    let mut errors = Vec::new();
    for (index, doc) in docs.into_iter().enumerate() {
        let prefix = if table.contains_key("task") {
            format!("task[{index}].")
        } else {
            String::new()
        };
        match expand(doc, &prefix) {
            Ok(expanded) => specs.extend(expanded),
            Err(e) => errors.push(e),
        }
        if specs.len() > MAX_EXPANDED_TASKS {
            return Err(ParseError::Invalid(vec![FieldError::new(
                "matrix",
                format!("expands to more than {MAX_EXPANDED_TASKS} tasks"),
            )]));
        }
    }

    let mut seen = std::collections::HashSet::new();
    for spec in &mut specs {
        if !spec.workdir.is_empty() && Path::new(&spec.workdir).is_relative() {
            spec.workdir = base_dir.join(&spec.workdir).to_string_lossy().into_owned();
        }
        if let Err(errs) = validate(spec) {
            errors.extend(errs.into_iter().map(|e| e.within(&spec.name)));
        }
        if !seen.insert(spec.name.clone()) {
            errors.push(FieldError::new(
                "name",
                format!("{:?} appears twice in the file", spec.name),
            ));
        }
    }
    if errors.is_empty() {
        Ok(specs)
    } else {
        Err(ParseError::Invalid(errors))
    }
}

/// One line: where in the file, and what is wrong (toml's own text spans several lines).
fn toml_error(text: &str, e: &toml::de::Error) -> ParseError {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            ParseError::Toml(format!("line {line}: {message}"))
        }
        None => ParseError::Toml(message),
    }
}

fn expand(mut doc: TaskDoc, prefix: &str) -> Result<Vec<v1::TaskSpec>, FieldError> {
    let Some(matrix) = doc.matrix.take() else {
        return Ok(vec![doc.into_spec()]);
    };

    let mut combos: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for (key, values) in &matrix {
        if values.is_empty() {
            return Err(FieldError::new(
                format!("{prefix}matrix.{key}"),
                "is an empty list",
            ));
        }
        combos = combos
            .into_iter()
            .flat_map(|combo| {
                values.iter().map(move |v| {
                    let mut next = combo.clone();
                    next.push((key.clone(), v.text()));
                    next
                })
            })
            .collect();
        if combos.len() > MAX_EXPANDED_TASKS {
            return Err(FieldError::new(
                format!("{prefix}matrix"),
                format!("expands to more than {MAX_EXPANDED_TASKS} tasks"),
            ));
        }
    }

    let base = doc.into_spec();
    Ok(combos
        .iter()
        .map(|combo| {
            let sub = |s: &str| substitute(s, combo);
            let mut spec = base.clone();
            spec.name = sub(&spec.name);
            spec.workdir = sub(&spec.workdir);
            spec.command = spec.command.iter().map(|a| sub(a)).collect();
            spec.env = spec.env.iter().map(|(k, v)| (k.clone(), sub(v))).collect();
            spec.labels = spec
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), sub(v)))
                .collect();
            spec
        })
        .collect())
}

fn substitute(text: &str, combo: &[(String, String)]) -> String {
    let mut out = text.to_string();
    for (key, value) in combo {
        out = out.replace(&format!("{{{key}}}"), value);
    }
    out
}

impl TaskDoc {
    fn into_spec(self) -> v1::TaskSpec {
        v1::TaskSpec {
            name: self.name,
            command: self.command,
            shell: self.shell,
            workdir: self.workdir,
            env: self.env,
            labels: self.labels,
            resources: self.resources.map(|r| v1::Resources {
                slots: r.slots,
                gpus: r.gpus,
                memory_mb: r.memory_mb,
            }),
            placement: self.placement.map(|p| v1::Placement { labels: p.labels }),
            restart: self.restart.map(|r| v1::RestartSpec {
                policy: r.policy,
                backoff_initial: r.backoff_initial,
                backoff_max: r.backoff_max,
                max_restarts: r.max_restarts,
                window: r.window,
            }),
            health: self.health.map(|h| v1::HealthSpec {
                heartbeat_timeout: h.heartbeat_timeout,
                progress_metric: h.progress_metric,
                progress_timeout: h.progress_timeout,
                nan_metrics: h.nan_metrics,
                fail_patterns: h.fail_patterns,
                packs: h.packs,
                rules: h
                    .rules
                    .into_iter()
                    .map(|r| v1::HealthRule {
                        name: r.name,
                        on: r.on,
                        pattern: r.pattern,
                        exit_codes: r.exit_codes,
                        signals: r.signals,
                        oom: r.oom,
                        action: r.action,
                        severity: r.severity,
                        wait: r.wait,
                    })
                    .collect(),
            }),
            stop: self.stop.map(|s| v1::StopSpec { grace: s.grace }),
            escalation: self.escalation.map(|e| v1::EscalationSpec {
                slack_channel: e.slack_channel,
                slack_user: e.slack_user,
                pagerduty: e.pagerduty,
                severity: e.severity,
                parent_timeout: e.parent_timeout,
            }),
            on_disconnect: self.on_disconnect,
            user: self.user,
            parent_close: self.parent_close,
            limits: self.limits.map(|l| v1::SubtreeLimits {
                max_children: l.max_children,
                max_depth: l.max_depth,
                max_descendants: l.max_descendants,
                max_running: l.max_running,
                budget: l.budget,
                max_restarts: l.max_restarts,
                restart_window: l.restart_window,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWEEP: &str = r#"
[[task]]
name = "sweep-lr{lr}-s{seed}"
command = ["python3", "train.py", "--lr", "{lr}", "--seed", "{seed}"]
workdir = "."
env = { SEED = "{seed}" }
[task.matrix]
lr = ["0.1", "0.3"]
seed = [1, 2, 3]
[task.restart]
policy = "on-failure"
backoff_initial = "1s"

[[task]]
name = "single"
command = ["sleep", "1"]
"#;

    #[test]
    fn sweep_expands_matrix_and_resolves_workdir() {
        let specs = parse_file(SWEEP, Path::new("/srv/exp")).unwrap();

        assert_eq!(specs.len(), 7);
        let first = &specs[0];
        assert_eq!(first.name, "sweep-lr0.1-s1");
        assert_eq!(
            first.command,
            ["python3", "train.py", "--lr", "0.1", "--seed", "1"]
        );
        assert_eq!(first.env["SEED"], "1");
        assert_eq!(first.workdir, "/srv/exp/.");
        assert_eq!(specs[6].name, "single");
    }

    #[test]
    fn tree_keys_are_read_and_checked() {
        let text = "name = \"plan\"\ncommand = [\"x\"]\nparent_close = \"keep\"\n[limits]\nmax_children = 4\nmax_depth = 2\nbudget = \"10m\"\nmax_restarts = 5\nrestart_window = \"1m\"\n[escalation]\nparent_timeout = \"30s\"\n";
        let spec = &parse_file(text, Path::new("/")).unwrap()[0];
        assert_eq!(spec.parent_close, "keep");
        let limits = spec.limits.as_ref().unwrap();
        assert_eq!(
            (limits.max_children, limits.max_depth, limits.max_restarts),
            (Some(4), Some(2), Some(5))
        );
        assert_eq!(limits.budget, "10m");
        assert_eq!(spec.escalation.as_ref().unwrap().parent_timeout, "30s");

        let bad = "name = \"plan\"\ncommand = [\"x\"]\nparent_close = \"orphan\"\n[limits]\nmax_restarts = 5\nbudget = \"0s\"\nmax_depth = 99\n";
        let err = parse_file(bad, Path::new("/")).unwrap_err().to_string();
        for field in [
            "parent_close",
            "limits.restart_window",
            "limits.budget",
            "limits.max_depth",
        ] {
            assert!(err.contains(field), "{field}: {err}");
        }
        let typo = "name = \"plan\"\ncommand = [\"x\"]\n[limits]\nmax_kids = 1\n";
        let err = parse_file(typo, Path::new("/")).unwrap_err().to_string();
        assert!(err.contains("max_kids"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = parse_file(
            "name = \"a\"\ncommand = [\"x\"]\ncomand = 1\n",
            Path::new("/"),
        )
        .unwrap_err();

        assert!(err.to_string().contains("comand"), "{err}");
        assert!(err.to_string().starts_with("line 3: "), "{err}");
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }

    #[test]
    fn one_bad_task_rejects_the_file_and_names_the_field() {
        let text = "[[task]]\nname = \"ok\"\ncommand = [\"x\"]\n[[task]]\nname = \"Bad Name\"\ncommand = [\"x\"]\n[task.restart]\nbackoff_max = \"soon\"\n";

        let err = parse_file(text, Path::new("/")).unwrap_err().to_string();

        assert!(err.contains("name"), "{err}");
        assert!(err.contains("restart.backoff_max"), "{err}");
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let text = "[[task]]\nname = \"a\"\ncommand = [\"x\"]\n[[task]]\nname = \"a\"\ncommand = [\"y\"]\n";

        let err = parse_file(text, Path::new("/")).unwrap_err().to_string();

        assert!(err.contains("appears twice"), "{err}");
    }
}
