//! `muster report`: a status line for shell scripts, appended to `$MUSTER_STATUS_FILE`.

use std::io::Write;

use serde_json::{Map, Value};

use crate::client::Failure;

const STATES: [&str; 6] = [
    "starting",
    "running",
    "blocked",
    "needs_help",
    "done",
    "failed",
];

pub fn run(
    state: Option<String>,
    message: Option<String>,
    metrics: Vec<String>,
) -> Result<(), Failure> {
    let path = std::env::var_os("MUSTER_STATUS_FILE").ok_or_else(|| {
        Failure::usage("MUSTER_STATUS_FILE is not set: `muster report` runs inside a Muster task")
    })?;
    let line = build_line(state, message, metrics)?;
    // One write of one whole line with O_APPEND: concurrent writers never interleave.
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Failure::failed(format!("opening {}: {e}", path.to_string_lossy())))?;
    file.write_all(line.as_bytes())
        .map_err(|e| Failure::failed(format!("writing {}: {e}", path.to_string_lossy())))
}

fn build_line(
    state: Option<String>,
    message: Option<String>,
    metrics: Vec<String>,
) -> Result<String, Failure> {
    let mut object = Map::new();
    if let Some(state) = state {
        if !STATES.contains(&state.as_str()) {
            return Err(Failure::usage(format!(
                "--state {state:?} is not one of {}",
                STATES.join(", ")
            )));
        }
        object.insert("state".into(), state.into());
    }
    if let Some(message) = message {
        object.insert("message".into(), message.into());
    }
    let mut values = Map::new();
    for metric in metrics {
        let (key, value) = metric
            .split_once('=')
            .ok_or_else(|| Failure::usage(format!("--metric {metric:?} is not key=value")))?;
        let number: f64 = value
            .trim()
            .parse()
            .map_err(|_| Failure::usage(format!("--metric {key}: {value:?} is not a number")))?;
        let json = serde_json::Number::from_f64(number)
            .map_or_else(|| Value::from(value.trim()), Value::Number);
        values.insert(key.trim().to_string(), json);
    }
    if !values.is_empty() {
        object.insert("metrics".into(), Value::Object(values));
    }
    if object.is_empty() {
        return Err(Failure::usage(
            "nothing to report: give --state, --message or --metric",
        ));
    }
    Ok(format!("{}\n", Value::Object(object)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_status_line() {
        let line = build_line(
            Some("running".into()),
            Some("epoch 3".into()),
            vec!["step=300".into(), "loss=nan".into()],
        )
        .unwrap();

        let v: Value = serde_json::from_str(&line).unwrap();
        assert!(line.ends_with('\n'));
        assert_eq!(v["state"], "running");
        assert_eq!(v["message"], "epoch 3");
        assert_eq!(v["metrics"]["step"], 300.0);
        assert_eq!(v["metrics"]["loss"], "nan");
    }

    #[test]
    fn rejects_unknown_state_and_bad_metric() {
        assert_eq!(
            build_line(Some("dancing".into()), None, vec![])
                .unwrap_err()
                .code,
            Failure::USAGE
        );
        assert!(build_line(None, None, vec!["x=abc".into()])
            .unwrap_err()
            .message
            .contains("not a number"));
    }
}
