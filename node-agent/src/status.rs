//! The child's status file: JSON lines the child appends about itself, read as they come.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use serde_json::Value;

use muster_proto::v1::Report;

/// States a child may give itself.
pub const CHILD_STATES: [&str; 6] = [
    "starting",
    "running",
    "blocked",
    "needs_help",
    "done",
    "failed",
];

const MAX_LINE: usize = 64 * 1024;
const MAX_MESSAGE: usize = 4 * 1024;
const MAX_METRICS: usize = 64;
const MAX_METRIC_NAME: usize = 128;

/// Follows one attempt's status file from where it was last read.
pub struct StatusTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// Set while the rest of an over-long line is being skipped.
    skipping: bool,
}

impl StatusTail {
    pub fn new(path: PathBuf) -> Self {
        StatusTail {
            path,
            offset: 0,
            partial: Vec::new(),
            skipping: false,
        }
    }

    /// Reads what was appended since the last call and parses each complete line.
    pub fn poll(&mut self) -> Vec<Report> {
        let Ok(mut file) = File::open(&self.path) else {
            return Vec::new();
        };
        let len = file.metadata().map_or(0, |m| m.len());
        if len < self.offset {
            // Truncated by the child: follow from the start again.
            self.offset = 0;
            self.partial.clear();
        }
        if len == self.offset || file.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        if file
            .take((len - self.offset).min(4 << 20))
            .read_to_end(&mut buf)
            .is_err()
        {
            return Vec::new();
        }
        self.offset += buf.len() as u64;

        let mut reports = Vec::new();
        for &b in &buf {
            if b == b'\n' {
                if !self.skipping && !self.partial.is_empty() {
                    reports.push(parse_line(&self.partial));
                }
                self.partial.clear();
                self.skipping = false;
            } else if !self.skipping {
                self.partial.push(b);
                if self.partial.len() > MAX_LINE {
                    // Keep the start as a truncated plain message and drop the rest.
                    let mut report = parse_line(&self.partial[..MAX_MESSAGE]);
                    report.message.push_str(" [truncated]");
                    reports.push(report);
                    self.partial.clear();
                    self.skipping = true;
                }
            }
        }
        reports
    }
}

/// Parses one status line. A JSON object gives state, message and metrics; anything else
/// is a plain message. Python writes NaN and Infinity as bare tokens, which are accepted.
pub fn parse_line(line: &[u8]) -> Report {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    let object = if text.starts_with('{') {
        serde_json::from_str::<Value>(text)
            .or_else(|_| serde_json::from_str::<Value>(&quote_non_finite(text)))
            .ok()
            .and_then(|v| match v {
                Value::Object(map) => Some(map),
                _ => None,
            })
    } else {
        None
    };
    let Some(object) = object else {
        return Report {
            message: truncate(text, MAX_MESSAGE),
            ..Default::default()
        };
    };

    let state = match object.get("state").and_then(Value::as_str) {
        Some(s) if CHILD_STATES.contains(&s) => s.to_string(),
        _ => String::new(),
    };
    let message = object
        .get("message")
        .and_then(Value::as_str)
        .map_or(String::new(), |m| truncate(m, MAX_MESSAGE));
    let mut metrics = HashMap::new();
    if let Some(Value::Object(map)) = object.get("metrics") {
        for (name, value) in map.iter().take(MAX_METRICS) {
            if name.len() > MAX_METRIC_NAME {
                continue;
            }
            if let Some(v) = metric_value(value) {
                metrics.insert(name.clone(), v);
            }
        }
    }
    Report {
        state,
        message,
        metrics,
        coalesced: 0,
    }
}

fn metric_value(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "nan" => Some(f64::NAN),
            "inf" | "infinity" | "+infinity" => Some(f64::INFINITY),
            "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
            other => other.parse().ok(),
        },
        _ => None,
    }
}

/// Rewrites the bare tokens NaN, Infinity and -Infinity outside strings as strings.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(token) = token {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} [truncated]", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_json_report() {
        let r = parse_line(
            br#"{"state":"running","message":"epoch 3","metrics":{"step":300,"loss":0.41}}"#,
        );

        assert_eq!(r.state, "running");
        assert_eq!(r.message, "epoch 3");
        assert_eq!(r.metrics["step"], 300.0);
    }

    #[test]
    fn accepts_python_nan_tokens_but_not_inside_strings() {
        let r = parse_line(
            br#"{"state":"running","message":"NaN soon","metrics":{"loss":NaN,"g":-Infinity}}"#,
        );

        assert!(r.metrics["loss"].is_nan());
        assert_eq!(r.metrics["g"], f64::NEG_INFINITY);
        assert_eq!(r.message, "NaN soon");
    }

    #[test]
    fn plain_and_invalid_lines_are_messages() {
        assert_eq!(parse_line(b"just text").message, "just text");
        assert_eq!(parse_line(b"{broken").message, "{broken");
        assert_eq!(parse_line(b"bad \xff byte").message, "bad \u{fffd} byte");
        assert_eq!(parse_line(br#"{"state":"dancing"}"#).state, "");
    }

    #[test]
    fn tail_follows_appends_and_keeps_partial_lines() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.jsonl");
        let mut tail = StatusTail::new(path.clone());
        let mut f = std::fs::File::create(&path).unwrap();

        f.write_all(b"{\"state\":\"running\"}\n{\"mess").unwrap();
        let first = tail.poll();
        f.write_all(b"age\":\"x\"}\n").unwrap();
        let second = tail.poll();

        assert_eq!(first.len(), 1);
        assert_eq!(second[0].message, "x");
    }
}
