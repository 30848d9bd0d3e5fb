//! Hostile output: a megabyte of stderr without a newline, and bytes that are not UTF-8 in
//! logs and status lines. The task keeps running and every reader keeps working.

use muster_e2e::inbox::inbox_lines;
use muster_e2e::{Fleet, FleetOptions, TASK_DEADLINE};

const MEGABYTE: usize = 1 << 20;

const FLOODS_STDERR: &str = r#"
name = "flood"
command = ["python3", "-c", '''
import json, os, sys, time
sys.stderr.buffer.write(b"x" * 1048576)
sys.stderr.buffer.flush()
with open(os.environ["MUSTER_STATUS_FILE"], "a") as f:
    f.write(json.dumps({"state": "running", "message": "wrote a megabyte"}) + "\n")
time.sleep(1000)
''']
[stop]
grace = "1s"
"#;

#[test]
fn megabyte_of_stderr_without_newline_is_logged_and_harmless() {
    let fleet = Fleet::start(1, FleetOptions::default());

    fleet.submit_toml("flood", FLOODS_STDERR);
    let task = wait_for_message(&fleet, "flood", "wrote a megabyte");

    assert_eq!(task["state"], "running", "{task:#}");
    let stderr_log = fleet.task_dir("node-1", "flood").join("stderr.log");
    let written = fleet.wait_for_file(&stderr_log, TASK_DEADLINE, |text| text.len() >= MEGABYTE);
    assert_eq!(
        written.bytes().filter(|&b| b == b'x').count(),
        MEGABYTE,
        "stderr.log holds every byte"
    );
    let tail = fleet.muster(&["logs", "flood", "--stderr"]);
    assert!(
        tail.status.success(),
        "{}",
        String::from_utf8_lossy(&tail.stderr)
    );
    assert!(
        !tail.stdout.is_empty(),
        "muster logs --stderr printed nothing"
    );
    assert!(
        tail.stdout.iter().all(|&b| b == b'x'),
        "only the child's bytes"
    );
    let whole = fleet.muster(&["logs", "flood", "--stderr", "--tail", "2000000"]);
    assert!(
        whole.status.success(),
        "{}",
        String::from_utf8_lossy(&whole.stderr)
    );
    assert_eq!(
        whole.stdout.len(),
        MEGABYTE,
        "--tail beyond the size gives the whole log"
    );
    assert_eq!(fleet.show("flood")["state"], "running");
}

/// Writes \xff\xfe to stdout, then a JSON status line and a plain status line that both
/// hold invalid UTF-8.
const WRITES_INVALID_UTF8: &str = r#"
name = "garbled"
shell = true
command = ['''
printf 'hello \377\376 world\n'
printf '{"state":"running","message":"bad \377\376 bytes","metrics":{"step":1}}\n' >> "$MUSTER_STATUS_FILE"
printf 'plain \377 line\n' >> "$MUSTER_STATUS_FILE"
printf '{"state":"running","message":"after garbage"}\n' >> "$MUSTER_STATUS_FILE"
sleep 1000
''']
[stop]
grace = "1s"
"#;

#[test]
fn invalid_utf8_in_logs_and_status_lines_breaks_nothing() {
    let fleet = Fleet::start(1, FleetOptions::default());

    fleet.submit_toml("garbled", WRITES_INVALID_UTF8);
    let task = wait_for_message(&fleet, "garbled", "after garbage");

    assert_eq!(task["state"], "running", "{task:#}");
    for line in inbox_lines(&fleet.controller_dir().join("inbox")) {
        let text = std::str::from_utf8(&line).expect("inbox lines are UTF-8");
        serde_json::from_str::<serde_json::Value>(text)
            .unwrap_or_else(|e| panic!("inbox line is not JSON ({e}): {text}"));
    }
    // Lines read in one poll may be coalesced into one report; the metric of the garbled
    // JSON line survives either way, which shows it was read as JSON.
    assert_eq!(
        task["metrics"]["step"], 1.0,
        "the garbled JSON line was parsed: {task:#}"
    );
    let logs = fleet.muster(&["logs", "garbled"]);
    assert!(
        logs.status.success(),
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    let expected: &[u8] = b"hello \xff\xfe world\n";
    assert!(
        logs.stdout.windows(expected.len()).any(|w| w == expected),
        "muster logs prints the child's bytes unchanged: {:?}",
        String::from_utf8_lossy(&logs.stdout)
    );
    let json_lines = fleet.muster_ok(&["inbox", "--json", "--since", "1"]);
    for line in json_lines.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("muster inbox --json line is not JSON ({e}): {line}"));
    }
    assert_eq!(fleet.show("garbled")["state"], "running");
}

fn wait_for_message(fleet: &Fleet, task: &str, message: &str) -> serde_json::Value {
    muster_e2e::wait_until(
        &format!("{task} to report {message:?}"),
        TASK_DEADLINE,
        || {
            let shown = fleet.show(task);
            (shown["message"] == message).then_some(shown)
        },
    )
}
