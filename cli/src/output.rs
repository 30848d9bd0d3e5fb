//! What the CLI prints: aligned tables for people, JSON documents for programs.

use std::collections::HashMap;
use std::fmt::Write;

use serde_json::{json, Map, Value};

use muster_proto::v1;

/// A metric for JSON: NaN and infinities as strings, as in the inbox.
pub fn metric_json(v: f64) -> Value {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        (if v > 0.0 { "Infinity" } else { "-Infinity" }).into()
    } else {
        serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
    }
}

fn sorted<V: Clone>(map: &HashMap<String, V>) -> Vec<(String, V)> {
    let mut v: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn metrics_json(metrics: &HashMap<String, f64>) -> Value {
    Value::Object(
        sorted(metrics)
            .into_iter()
            .map(|(k, v)| (k, metric_json(v)))
            .collect(),
    )
}

fn labels_json(labels: &HashMap<String, String>) -> Value {
    Value::Object(
        sorted(labels)
            .into_iter()
            .map(|(k, v)| (k, Value::from(v)))
            .collect(),
    )
}

pub fn task_json(task: &v1::Task) -> Value {
    let spec = task.spec.clone().unwrap_or_default();
    let mut object = json!({
        "name": spec.name,
        "state": task.state,
        "node": task.node,
        "attempt": task.attempt,
        "parent": task.parent,
        "root": task.root,
        "labels": labels_json(&spec.labels),
        "metrics": metrics_json(&task.metrics),
        "message": task.message,
        "reason": task.reason,
        "report_state": task.report_state,
        "restarts": task.restarts,
        "command": spec.command,
        "created_ms": task.created_ms,
        "updated_ms": task.updated_ms,
        "last_report_ms": task.last_report_ms,
    });
    if !task.attempts.is_empty() {
        object["attempts"] = Value::Array(task.attempts.iter().map(attempt_json).collect());
    }
    if !spec.parent_close.is_empty() {
        object["parent_close"] = spec.parent_close.clone().into();
    }
    if let Some(limits) = &spec.limits {
        object["limits"] = limits_json(limits);
    }
    object
}

/// The limits a task set on its subtree, only those that are set.
fn limits_json(limits: &v1::SubtreeLimits) -> Value {
    let mut object = Map::new();
    for (key, value) in [
        ("max_children", limits.max_children),
        ("max_depth", limits.max_depth),
        ("max_descendants", limits.max_descendants),
        ("max_running", limits.max_running),
        ("max_restarts", limits.max_restarts),
    ] {
        if let Some(v) = value {
            object.insert(key.into(), v.into());
        }
    }
    for (key, value) in [
        ("budget", &limits.budget),
        ("restart_window", &limits.restart_window),
    ] {
        if !value.is_empty() {
            object.insert(key.into(), value.clone().into());
        }
    }
    Value::Object(object)
}

fn attempt_json(a: &v1::Attempt) -> Value {
    let mut object = Map::new();
    object.insert("attempt".into(), a.attempt.into());
    object.insert("node".into(), a.node.clone().into());
    object.insert("pid".into(), a.pid.into());
    object.insert("started_ms".into(), a.started_ms.into());
    object.insert("ended_ms".into(), a.ended_ms.into());
    object.insert(
        "exit_code".into(),
        a.exit_code.map_or(Value::Null, Value::from),
    );
    object.insert("signal".into(), a.signal.map_or(Value::Null, Value::from));
    object.insert("end_reason".into(), a.end_reason.clone().into());
    object.insert("error".into(), a.error.clone().into());
    Value::Object(object)
}

pub fn node_json(node: &v1::Node) -> Value {
    let cap = node.capacity.unwrap_or_default();
    let used = node.used.unwrap_or_default();
    json!({
        "name": node.name,
        "state": node.state,
        "capacity": {"slots": cap.slots, "gpus": cap.gpus, "memory_mb": cap.memory_mb},
        "used": {"slots": used.slots, "gpus": used.gpus, "memory_mb": used.memory_mb},
        "labels": labels_json(&node.labels),
        "tasks": node.tasks,
        "version": node.version,
        "last_seen_ms": node.last_seen_ms,
    })
}

/// An event as its inbox line.
pub fn event_json(e: &v1::Event) -> Value {
    let mut object = Map::new();
    object.insert("seq".into(), e.seq.into());
    object.insert("ts".into(), e.ts.clone().into());
    object.insert("kind".into(), e.kind.clone().into());
    object.insert("severity".into(), e.severity.clone().into());
    if !e.task.is_empty() {
        object.insert("task".into(), e.task.clone().into());
    }
    if !e.node.is_empty() {
        object.insert("node".into(), e.node.clone().into());
    }
    if e.attempt != 0 {
        object.insert("attempt".into(), e.attempt.into());
    }
    object.insert("message".into(), e.message.clone().into());
    object.insert(
        "data".into(),
        serde_json::from_str(&e.data_json).unwrap_or(Value::Object(Map::new())),
    );
    if !e.parent.is_empty() {
        object.insert("parent".into(), e.parent.clone().into());
        object.insert("root".into(), e.root.clone().into());
    }
    Value::Object(object)
}

pub fn incident_json(i: &v1::Incident) -> Value {
    json!({
        "id": i.id, "task": i.task, "node": i.node, "reason": i.reason, "state": i.state,
        "severity": i.severity, "message": i.message, "opened_ms": i.opened_ms,
        "updated_ms": i.updated_ms, "resolved_ms": i.resolved_ms,
    })
}

/// A few metrics, compact: "step=300 loss=0.41".
pub fn metrics_short(metrics: &HashMap<String, f64>, max: usize) -> String {
    sorted(metrics)
        .into_iter()
        .take(max)
        .map(|(k, v)| format!("{k}={}", number(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.abs() >= 0.01 && v.abs() < 1e6 {
        format!("{v:.4}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        format!("{v:.3e}")
    }
}

/// "12s", "5m", "3h", "2d" since `ms`.
pub fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let s = ((now - ms) / 1000).max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn cut(s: &str, max: usize) -> String {
    let s = s.replace(['\n', '\r', '\t'], " ");
    if s.chars().count() <= max {
        return s;
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// An aligned table; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let all = std::iter::once(header.iter().map(|h| h.to_string()).collect::<Vec<_>>())
        .chain(rows.iter().cloned());
    for row in all {
        let last = row.len() - 1;
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ", w = widths[i]);
            }
        }
        let trimmed = out.trim_end().len();
        out.truncate(trimmed);
        out.push('\n');
    }
    out
}

pub fn tasks_table(tasks: &[v1::Task], width: usize) -> String {
    // A flat fleet keeps its narrower table; the parent column comes with the first child.
    let nested = tasks.iter().any(|t| !t.parent.is_empty());
    let dash = |s: &str| {
        if s.is_empty() {
            "-".into()
        } else {
            s.to_string()
        }
    };
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            let name = t.spec.as_ref().map_or("", |s| s.name.as_str());
            let node = if t.state == "pending" { "" } else { &t.node };
            let mut row = vec![name.to_string(), t.state.clone(), dash(node)];
            if nested {
                row.push(dash(&t.parent));
            }
            row.extend([
                t.attempt.to_string(),
                ago(t.updated_ms),
                metrics_short(&t.metrics, 4),
                t.message.clone(),
            ]);
            row
        })
        .collect();
    let mut header = vec!["NAME", "STATE", "NODE"];
    if nested {
        header.push("PARENT");
    }
    header.extend(["ATTEMPT", "SINCE", "METRICS", "MESSAGE"]);
    let text = table(&header, &rows);
    // The state column starts after the widest name and two spaces.
    let state_at = rows
        .iter()
        .map(|r| r[0].chars().count())
        .chain(std::iter::once(4))
        .max()
        .unwrap_or(4)
        + 2;
    let color = use_color();
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let line = cut(line, width);
            match (color, i.checked_sub(1).and_then(|r| rows.get(r))) {
                (true, Some(row)) => paint_state(&line, state_at, &row[1]),
                _ => line,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Colour only on a terminal, and never with NO_COLOR set.
pub fn use_color() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stdout()) && std::env::var_os("NO_COLOR").is_none()
}

/// The terminal colour of a task state: green, red, magenta or yellow.
fn state_color(state: &str) -> Option<&'static str> {
    match state {
        "running" | "succeeded" => Some("32"),
        "failed" | "crash_loop" => Some("31"),
        "needs_help" => Some("35"),
        "backoff" | "stalled" | "blocked" | "stopping" | "pending" | "starting" => Some("33"),
        _ => None,
    }
}

/// A task state in its colour, for a caller that has checked [`use_color`].
pub fn painted(state: &str) -> String {
    match state_color(state) {
        Some(code) => format!("\x1b[{code}m{state}\x1b[0m"),
        None => state.to_string(),
    }
}

fn paint_state(line: &str, at: usize, state: &str) -> String {
    let start: usize = line.char_indices().nth(at).map_or(line.len(), |(b, _)| b);
    match line.get(start..).filter(|rest| rest.starts_with(state)) {
        Some(_) => format!(
            "{}{}{}",
            &line[..start],
            painted(state),
            &line[start + state.len()..]
        ),
        None => line.to_string(),
    }
}

pub fn nodes_table(nodes: &[v1::Node]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let cap = n.capacity.unwrap_or_default();
            let used = n.used.unwrap_or_default();
            let mut labels: Vec<_> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            vec![
                n.name.clone(),
                n.state.clone(),
                format!("{}/{}", used.slots, cap.slots),
                format!("{}/{}", used.gpus, cap.gpus),
                format!("{}/{}", used.memory_mb, cap.memory_mb),
                n.tasks.to_string(),
                ago(n.last_seen_ms),
                labels.join(","),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATE",
            "SLOTS",
            "GPUS",
            "MEMORY_MB",
            "TASKS",
            "SEEN",
            "LABELS",
        ],
        &rows,
    )
}

pub fn event_line(e: &v1::Event) -> String {
    let time = e.ts.get(11..23).unwrap_or(&e.ts);
    let subject = match (e.task.is_empty(), e.node.is_empty()) {
        (false, _) if e.attempt > 0 => format!("{}#{}", e.task, e.attempt),
        (false, _) => e.task.clone(),
        (true, false) => e.node.clone(),
        _ => "-".into(),
    };
    format!(
        "{:>6} {time} {:<18} {:<28} {}",
        e.seq,
        e.kind,
        subject,
        cut(&e.message, 200)
    )
}

pub fn show_task(t: &v1::Task) -> String {
    let spec = t.spec.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "name:      {}", spec.name);
    let _ = writeln!(
        out,
        "state:     {} ({})",
        t.state,
        if t.reason.is_empty() { "-" } else { &t.reason }
    );
    let _ = writeln!(
        out,
        "node:      {}",
        if t.node.is_empty() { "-" } else { &t.node }
    );
    let _ = writeln!(out, "attempt:   {} (restarts {})", t.attempt, t.restarts);
    let _ = writeln!(out, "command:   {}", spec.command.join(" "));
    if !spec.workdir.is_empty() {
        let _ = writeln!(out, "workdir:   {}", spec.workdir);
    }
    if !t.parent.is_empty() {
        let close = if spec.parent_close.is_empty() {
            "stop"
        } else {
            &spec.parent_close
        };
        let _ = writeln!(
            out,
            "parent:    {} (root {}; when it ends: {close})",
            t.parent, t.root
        );
    }
    if let Some(limits) = &spec.limits {
        if let Value::Object(set) = limits_json(limits) {
            let text: Vec<String> = set
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().map_or(v.to_string(), str::to_string)))
                .collect();
            let _ = writeln!(out, "limits:    {}", text.join(" "));
        }
    }
    if t.last_report_ms > 0 {
        let state = if t.report_state.is_empty() {
            "(no state)"
        } else {
            t.report_state.as_str()
        };
        let _ = writeln!(out, "report:    {state}, {} ago", ago(t.last_report_ms));
    } else {
        let _ = writeln!(out, "report:    none yet");
    }
    let _ = writeln!(out, "metrics:   {}", metrics_short(&t.metrics, 32));
    let _ = writeln!(out, "message:   {}", t.message);
    if !t.attempts.is_empty() {
        let rows: Vec<Vec<String>> = t
            .attempts
            .iter()
            .map(|a| {
                let end = match (a.exit_code, a.signal) {
                    (Some(c), _) => format!("exit {c}"),
                    (None, Some(s)) => format!("signal {s}"),
                    _ if a.ended_ms == 0 => "running".into(),
                    _ => "-".into(),
                };
                vec![
                    a.attempt.to_string(),
                    a.node.clone(),
                    a.pid.to_string(),
                    ago(a.started_ms),
                    end,
                    a.end_reason.clone(),
                    a.error.clone(),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &[
                "ATTEMPT", "NODE", "PID", "STARTED", "END", "REASON", "ERROR",
            ],
            &rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str, parent: &str) -> v1::Task {
        v1::Task {
            spec: Some(v1::TaskSpec {
                name: name.into(),
                ..Default::default()
            }),
            state: "pending".into(),
            parent: parent.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_parent_column_appears_with_the_first_child() {
        let flat = tasks_table(&[task("solo", "")], 200);
        let nested = tasks_table(&[task("boss", ""), task("kid", "boss")], 200);

        assert!(!flat.contains("PARENT"), "{flat}");
        let header = nested.lines().next().expect("a header line");
        assert!(
            header.starts_with("NAME  STATE    NODE  PARENT  ATTEMPT"),
            "{nested}"
        );
        let kid = nested.lines().nth(2).expect("the child's line");
        assert!(
            kid.starts_with("kid") && kid.contains("-     boss"),
            "{nested}"
        );
    }
}
