//! Tokens and roles: once any token is configured, every call needs one, each role may do
//! what it includes and no more, and mutating calls name their caller in the inbox.

use std::process::{Command, Output};

use muster_e2e::{is_event, Fleet, FleetOptions, FAST_CONTROLLER, TASK_DEADLINE};

const VIEWER: &str = "viewer-token-for-the-auth-test";
const OPERATOR: &str = "operator-token-for-the-auth-test";
const NODE: &str = "node-token-for-the-auth-test";

fn sha256_hex(token: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import hashlib, sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())",
            token,
        ])
        .output()
        .expect("running python3");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn config() -> String {
    let mut config = FAST_CONTROLLER.to_string();
    for (name, role, token) in [
        ("vera", "viewer", VIEWER),
        ("otto", "operator", OPERATOR),
        ("nodes", "node", NODE),
    ] {
        config.push_str(&format!(
            "\n[[auth.tokens]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
            sha256_hex(token)
        ));
    }
    config
}

/// Runs the CLI against the fleet with `token` (or none) in MUSTER_TOKEN.
fn muster_as(fleet: &Fleet, token: Option<&str>, args: &[&str]) -> Output {
    let bin = fleet_bin("muster");
    let mut command = Command::new(bin);
    command
        .arg("--controller")
        .arg(fleet.url())
        .args(args)
        .env_remove("MUSTER_TOKEN");
    if let Some(token) = token {
        command.env("MUSTER_TOKEN", token);
    }
    command.output().expect("running muster")
}

fn fleet_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/release")
        .join(name)
}

#[test]
fn tokens_and_roles_guard_every_call() {
    // The harness's node agents and CLI calls take their tokens from the environment (one
    // test in this binary, so setting them here races nothing).
    std::env::set_var("MUSTER_NODE_TOKEN", NODE);
    // The harness's own CLI calls (readiness, show) act as the operator.
    std::env::set_var("MUSTER_TOKEN", OPERATOR);
    let fleet = Fleet::start(
        1,
        FleetOptions {
            controller_config: config(),
            ..FleetOptions::default()
        },
    );

    let anonymous = muster_as(&fleet, None, &["ls"]);
    assert_eq!(anonymous.status.code(), Some(4), "no token: {anonymous:?}");
    assert!(
        String::from_utf8_lossy(&anonymous.stderr).contains("token"),
        "{anonymous:?}"
    );
    let wrong = muster_as(&fleet, Some("not-a-token"), &["ls"]);
    assert_eq!(wrong.status.code(), Some(4), "{wrong:?}");

    let viewer_ls = muster_as(&fleet, Some(VIEWER), &["ls", "--json"]);
    assert!(viewer_ls.status.success(), "{viewer_ls:?}");
    let viewer_run = muster_as(
        &fleet,
        Some(VIEWER),
        &["run", "--name", "by-vera", "--", "sleep", "600"],
    );
    assert_eq!(viewer_run.status.code(), Some(4), "{viewer_run:?}");
    assert!(
        String::from_utf8_lossy(&viewer_run.stderr).contains("viewer"),
        "names the role: {viewer_run:?}"
    );

    let operator_run = muster_as(
        &fleet,
        Some(OPERATOR),
        &["run", "--name", "by-otto", "--", "sleep", "600"],
    );
    assert!(operator_run.status.success(), "{operator_run:?}");
    fleet.wait_for_task_state("by-otto", "running", TASK_DEADLINE);
    let stop = muster_as(&fleet, Some(OPERATOR), &["stop", "by-otto"]);
    assert!(stop.status.success(), "{stop:?}");
    let action = fleet.wait_for_event(|e| is_event(e, "operator.action", "by-otto"), TASK_DEADLINE);
    assert_eq!(
        action["data"]["caller"], "otto",
        "the caller is named: {action}"
    );
    let submitted =
        fleet.wait_for_event(|e| is_event(e, "task.submitted", "by-otto"), TASK_DEADLINE);
    assert!(
        submitted["message"]
            .as_str()
            .unwrap_or_default()
            .contains("otto"),
        "{submitted}"
    );

    let node_ls = muster_as(&fleet, Some(NODE), &["ls"]);
    assert_eq!(
        node_ls.status.code(),
        Some(4),
        "a node token is no operator token: {node_ls:?}"
    );
    let nodes = muster_as(&fleet, Some(VIEWER), &["nodes", "--json"]);
    assert!(
        String::from_utf8_lossy(&nodes.stdout).contains("\"ready\""),
        "the node agent connected with its token: {nodes:?}"
    );
}
