//! Children that cannot start, and what a child inherits: distinct spawn errors with their
//! path and OS error, backed off and never a crash loop; no descriptor of the agent or the
//! keeper leaks into a child.

use std::os::unix::fs::PermissionsExt;

use muster_e2e::{is_event, reason, wait_until, Fleet, FleetOptions, TASK_DEADLINE};

fn spec(name: &str, command: &str, workdir: &str) -> String {
    format!(
        r#"
name = "{name}"
command = [{command}]
workdir = "{workdir}"
[restart]
backoff_initial = "100ms"
backoff_max = "200ms"
max_restarts = 1
"#
    )
}

#[test]
fn spawn_failures_are_named_backed_off_and_never_a_crash_loop() {
    let fleet = Fleet::start(1, FleetOptions::default());
    let dir = fleet.dir().display().to_string();
    let no_exec = fleet.dir().join("not-executable.sh");
    std::fs::write(&no_exec, "#!/bin/sh\necho hi\n").expect("writing a script");
    std::fs::set_permissions(&no_exec, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    fleet.submit_toml(
        "no-binary",
        &spec("no-binary", r#""/nonexistent/muster-e2e-binary""#, &dir),
    );
    fleet.submit_toml(
        "no-workdir",
        &spec("no-workdir", r#""true""#, "/nonexistent/muster-e2e-dir"),
    );
    fleet.submit_toml(
        "no-exec",
        &spec(
            "no-exec",
            &format!("{:?}", no_exec.display().to_string()),
            &dir,
        ),
    );
    fleet.submit_toml(
        "healthy",
        "name = \"healthy\"\ncommand = [\"sleep\", \"600\"]\n",
    );

    for (task, kind, path) in [
        (
            "no-binary",
            "missing_binary",
            "/nonexistent/muster-e2e-binary".to_string(),
        ),
        (
            "no-workdir",
            "missing_workdir",
            "/nonexistent/muster-e2e-dir".to_string(),
        ),
        ("no-exec", "not_executable", no_exec.display().to_string()),
    ] {
        let exited = fleet.wait_for_event(|e| is_event(e, "attempt.exited", task), TASK_DEADLINE);
        let error = exited["data"]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(&path),
            "{task}: the error names the path: {exited}"
        );
        assert!(
            error.contains("os error"),
            "{task}: the error carries the OS error: {exited}"
        );
        let incident =
            fleet.wait_for_event(|e| is_event(e, "incident.opened", task), TASK_DEADLINE);
        assert_eq!(reason(&incident), "spawn_error", "{incident}");
        assert!(
            incident["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with(kind),
            "{incident}"
        );
        // Far more failures than max_restarts allows a crashing program: still no crash loop.
        wait_until(
            &format!("{task} to fail to start four times"),
            TASK_DEADLINE,
            || (fleet.events(|e| is_event(e, "attempt.exited", task)).len() >= 4).then_some(()),
        );
        let restarting = fleet.events(|e| is_event(e, "task.restarting", task));
        assert!(
            restarting.len() >= 3
                && restarting
                    .iter()
                    .all(|e| e["data"]["backoff_ms"].as_u64() > Some(0)),
            "backed off: {restarting:?}"
        );
        assert!(
            fleet
                .events(|e| is_event(e, "task.crash_loop", task))
                .is_empty(),
            "{task} is no crash loop"
        );
    }
    let healthy = fleet.show("healthy");
    assert_eq!(
        healthy["state"], "running",
        "other tasks are not affected: {healthy:#}"
    );
    assert_eq!(healthy["attempt"], 1, "{healthy:#}");
}

#[test]
fn a_child_inherits_no_descriptor_of_the_agent_or_keeper() {
    let fleet = Fleet::start(1, FleetOptions::default());
    let spec = r#"
name = "fds"
command = ["python3", "-c", "import os; fds = sorted(int(f) for f in os.listdir('/proc/self/fd')); open(os.path.join(os.environ['MUSTER_DATA_DIR'], 'fds'), 'w').write(' '.join(map(str, fds)))"]
[restart]
policy = "never"
"#;

    fleet.submit_toml("fds", spec);
    fleet.wait_for_task_state("fds", "succeeded", TASK_DEADLINE);

    let listed = std::fs::read_to_string(fleet.task_dir("node-1", "fds").join("data/fds"))
        .expect("the child listed its fds");
    let fds: Vec<i32> = listed
        .split_whitespace()
        .map(|f| f.parse().expect("an fd number"))
        .collect();
    // stdin, stdout, stderr, and the one the listing itself opened.
    assert!(
        fds.len() <= 4 && fds.starts_with(&[0, 1, 2]),
        "the child has only its own descriptors: {fds:?}"
    );
}
