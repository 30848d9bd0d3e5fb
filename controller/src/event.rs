//! Inbox events: one JSON line each, in the format DESIGN.md fixes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use muster_proto::v1;

/// One thing the controller recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub ts: String,
    pub kind: String,
    pub severity: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub task: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt: u32,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub data: Map<String, Value>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub root: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// How much a person should care.
#[derive(Debug, Clone, Copy)]
pub enum Severity {
    Info,
    Warning,
    Error,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }

    /// The severity a name stands for; unknown names are errors.
    pub fn from_name(name: &str) -> Severity {
        match name {
            "info" => Severity::Info,
            "warning" => Severity::Warning,
            "critical" => Severity::Critical,
            _ => Severity::Error,
        }
    }
}

impl Event {
    /// A new event; `seq` and `ts` are set when it is appended.
    pub fn new(kind: &str, severity: Severity, message: impl Into<String>) -> Event {
        Event {
            seq: 0,
            ts: String::new(),
            kind: kind.to_string(),
            severity: severity.as_str().to_string(),
            task: String::new(),
            node: String::new(),
            attempt: 0,
            message: message.into(),
            data: Map::new(),
            parent: String::new(),
            root: String::new(),
        }
    }

    pub fn node(mut self, node: &str) -> Event {
        self.node = node.to_string();
        self
    }

    pub fn attempt(mut self, attempt: u32) -> Event {
        self.attempt = attempt;
        self
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Event {
        self.data.insert(key.to_string(), value.into());
        self
    }

    pub fn to_proto(&self) -> v1::Event {
        v1::Event {
            seq: self.seq,
            ts: self.ts.clone(),
            kind: self.kind.clone(),
            severity: self.severity.clone(),
            task: self.task.clone(),
            node: self.node.clone(),
            attempt: self.attempt,
            message: self.message.clone(),
            data_json: Value::Object(self.data.clone()).to_string(),
            parent: self.parent.clone(),
            root: self.root.clone(),
        }
    }
}

/// A metric value for JSON: finite numbers as numbers, NaN and infinities as the strings
/// "NaN", "Infinity" and "-Infinity" (JSON has no such numbers).
pub fn metric_json(v: f64) -> Value {
    if v.is_nan() {
        Value::from("NaN")
    } else if v.is_infinite() {
        Value::from(if v > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
    }
}

pub fn metrics_json<'a>(metrics: impl IntoIterator<Item = (&'a String, &'a f64)>) -> Value {
    let mut sorted: Vec<_> = metrics.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    Value::Object(
        sorted
            .into_iter()
            .map(|(k, v)| (k.clone(), metric_json(*v)))
            .collect(),
    )
}

/// Milliseconds since the Unix epoch, as RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f).unwrap_or_default()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_has_design_fields_and_skips_empty_lineage() {
        let mut e = Event::new("attempt.exited", Severity::Warning, "exited with code 1")
            .node("node-2")
            .attempt(3)
            .with("exit_code", 1);
        e.seq = 1042;
        e.ts = rfc3339(0);
        e.task = "sweep-lr0.3-s1".into();

        let line = serde_json::to_string(&e).unwrap();

        assert_eq!(
            line,
            r#"{"seq":1042,"ts":"1970-01-01T00:00:00.000Z","kind":"attempt.exited","severity":"warning","task":"sweep-lr0.3-s1","node":"node-2","attempt":3,"message":"exited with code 1","data":{"exit_code":1}}"#
        );
    }

    #[test]
    fn non_finite_metrics_become_strings() {
        assert_eq!(metric_json(f64::NAN), Value::from("NaN"));
        assert_eq!(metric_json(f64::NEG_INFINITY), Value::from("-Infinity"));
        assert_eq!(metric_json(0.5), Value::from(0.5));
    }
}
