//! The controller's inbox read straight from its files, as a person or a manager agent would.

use std::path::Path;

use serde_json::Value;

/// Every complete line of the inbox segments in `dir`, in file order, each as raw bytes.
/// A last line without its newline is still being written and is left out.
pub fn inbox_lines(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut segments: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("inbox-") && n.ends_with(".jsonl"))
        })
        .collect();
    // Segment names carry the first seq in 20 digits, so name order is seq order.
    segments.sort();

    let mut lines = Vec::new();
    for path in segments {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let end = bytes.iter().rposition(|&b| b == b'\n').unwrap_or(0);
        let complete = &bytes[..end];
        lines.extend(
            complete
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(<[u8]>::to_vec),
        );
    }
    lines
}

/// Every event of the inbox in `dir`. Panics on a line that is not a JSON object: the
/// inbox promises one JSON document per line.
pub fn read_inbox_dir(dir: &Path) -> Vec<Value> {
    inbox_lines(dir)
        .iter()
        .map(|line| match serde_json::from_slice::<Value>(line) {
            Ok(v @ Value::Object(_)) => v,
            _ => panic!(
                "inbox line is not a JSON object: {}",
                String::from_utf8_lossy(line)
            ),
        })
        .collect()
}

/// True for an event of `kind` about `task`.
pub fn is_event(e: &Value, kind: &str, task: &str) -> bool {
    e["kind"] == kind && e["task"] == task
}

/// `data.reason` of an event, or "".
pub fn reason(e: &Value) -> &str {
    e["data"]["reason"].as_str().unwrap_or("")
}

/// The attempt number an event is about, or 0.
pub fn attempt_of(e: &Value) -> u64 {
    e["attempt"].as_u64().unwrap_or(0)
}

/// The seq of an event.
pub fn seq_of(e: &Value) -> u64 {
    e["seq"]
        .as_u64()
        .expect("every inbox event has a numeric seq")
}

/// The last `n` events, one per line, for failure messages.
pub fn tail(events: &[Value], n: usize) -> String {
    events[events.len().saturating_sub(n)..]
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// An event's `ts` in Unix milliseconds.
pub fn ts_ms(e: &Value) -> i64 {
    let ts = e["ts"].as_str().unwrap_or("");
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or_else(|_| panic!("an inbox event without an RFC 3339 ts: {e}"))
}
