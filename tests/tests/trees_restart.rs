//! A task tree survives crashes: parent links, limits, a task's token and an incident held
//! for a parent are all still there when the controller comes back, and a parent's
//! `$MUSTER_INBOX` file catches up on what happened while its node agent was away.

use std::time::Duration;

use nix::sys::signal::Signal;

use muster_e2e::{is_event, reason, seq_of, wait_until, Fleet, FleetOptions, TASK_DEADLINE};

/// The root: waits for the test's go file, then lists its subtree with its own token.
fn root_spec(go: &str, out: &str) -> String {
    format!(
        r#"
name = "root"
shell = true
command = ['''
while [ ! -e {go} ]; do sleep 0.1; done
muster ls --json > {out}.tmp 2>&1 && mv {out}.tmp {out}
exec sleep 600
''']
[limits]
max_children = 2
[stop]
grace = "1s"
"#
    )
}

#[test]
fn a_tree_survives_a_controller_crash() {
    let mut fleet = Fleet::start(2, FleetOptions::default());
    let go = fleet.dir().join("go");
    let out = fleet.dir().join("listing.json");
    fleet.submit_toml(
        "root",
        &root_spec(&go.display().to_string(), &out.display().to_string()),
    );
    fleet.wait_for_task_state("root", "running", TASK_DEADLINE);
    fleet.muster_ok(&[
        "run", "--parent", "root", "--name", "calm", "--grace", "1s", "--", "sleep", "600",
    ]);
    // A child whose crash loop is held 8 s for its parent, which never acknowledges it.
    fleet.muster_ok(&[
        "run",
        "--parent",
        "root",
        "--name",
        "crashy",
        "--restart",
        "on-failure",
        "--max-restarts",
        "0",
        "--parent-timeout",
        "8s",
        "--",
        "sh",
        "-c",
        "exit 3",
    ]);
    let opened = fleet.wait_for_event(
        |e| is_event(e, "incident.opened", "crashy") && reason(e) == "crash_loop",
        TASK_DEADLINE,
    );
    assert_eq!(opened["data"]["escalate_to"], "root", "{opened}");
    fleet.wait_for_task_state("calm", "running", TASK_DEADLINE);

    fleet.kill_controller(Signal::SIGKILL);
    fleet.start_controller();
    fleet.wait_for_nodes_ready(2);

    // Parent links and the limit are remembered: a third child is refused.
    let children = fleet.muster_json(&["ls", "--parent", "root", "--json"]);
    let names: Vec<&str> = children
        .as_array()
        .expect("ls --json prints an array")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["calm", "crashy"]);
    let third = fleet.muster(&[
        "run", "--parent", "root", "--name", "third", "--", "sleep", "600",
    ]);
    let text = String::from_utf8_lossy(&third.stderr);
    assert_eq!(third.status.code(), Some(1), "{text}");
    assert!(text.contains("max_children"), "{text}");

    // The root's token, handed out before the crash, is still good.
    std::fs::write(&go, "").expect("writing the go file");
    let listing = wait_until("the root's own listing", TASK_DEADLINE, || {
        std::fs::read_to_string(&out).ok()
    });
    let listing: serde_json::Value = serde_json::from_str(&listing)
        .unwrap_or_else(|e| panic!("the root's listing is not JSON ({e}): {listing}"));
    let mut seen: Vec<&str> = listing
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, ["calm", "crashy", "root"]);

    // The incident held for the parent goes to people once its time is up, after the crash.
    let escalated = fleet.wait_for_event(
        |e| is_event(e, "incident.escalated", "crashy"),
        Duration::from_secs(30),
    );
    assert!(seq_of(&escalated) > seq_of(&opened));
    assert_eq!(escalated["parent"], "root", "{escalated}");

    // And the cascade still knows the tree.
    fleet.muster_ok(&["stop", "root"]);
    for task in ["root", "calm", "crashy"] {
        fleet.wait_for_task_state(task, "stopped", TASK_DEADLINE);
    }
    wait_until("no process of the tree", TASK_DEADLINE, || {
        fleet.all_task_processes().is_empty().then_some(())
    });
}

/// The parent: pinned to node-1, starts a child on node-2 that exits once `go` exists.
fn lead_spec(go: &str) -> String {
    format!(
        r#"
name = "lead"
shell = true
command = ['''
muster run --name kid --node-label node=node-2 --restart never -- sh -c 'while [ ! -e {go} ]; do sleep 0.1; done'
exec sleep 600
''']
[placement]
labels = {{ node = "node-1" }}
[stop]
grace = "1s"
"#
    )
}

/// The seq, kind and task of each line of an inbox file.
fn file_events(path: &std::path::Path) -> Vec<(u64, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let e: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            (
                seq_of(&e),
                e["kind"].as_str().unwrap_or("").to_string(),
                e["task"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn a_parents_inbox_file_catches_up_after_its_agent_was_away() {
    let mut fleet = Fleet::start(2, FleetOptions::default());
    let go = fleet.dir().join("go");
    fleet.submit_toml("lead", &lead_spec(&go.display().to_string()));
    let file = fleet.task_dir("node-1", "lead").join("inbox.jsonl");
    wait_until("kid's start in lead's inbox file", TASK_DEADLINE, || {
        file_events(&file)
            .iter()
            .any(|(_, kind, task)| kind == "attempt.started" && task == "kid")
            .then_some(())
    });

    // node-1's agent dies; lead keeps running under its keeper. kid ends meanwhile.
    fleet.kill_node_agent("node-1", Signal::SIGKILL);
    std::fs::write(&go, "").expect("writing the go file");
    let succeeded = fleet.wait_for_event(|e| is_event(e, "task.succeeded", "kid"), TASK_DEADLINE);
    assert!(
        !file_events(&file)
            .iter()
            .any(|(seq, _, _)| *seq == seq_of(&succeeded)),
        "delivered with no agent to write it?"
    );

    fleet.start_node_agent("node-1", 4);
    wait_until("kid's end in lead's inbox file", TASK_DEADLINE, || {
        file_events(&file)
            .iter()
            .any(|(seq, _, _)| *seq == seq_of(&succeeded))
            .then_some(())
    });
    let events = file_events(&file);
    let seqs: Vec<u64> = events.iter().map(|(seq, _, _)| *seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "the file is not in seq order or has repeats: {seqs:?}"
    );
    // Nothing about kid that the controller wrote is missing from the file.
    for seq in fleet.events(|e| e["task"] == "kid").iter().map(seq_of) {
        assert!(
            seqs.contains(&seq),
            "event {seq} about kid is missing: {events:?}"
        );
    }
    assert_eq!(fleet.show("lead")["attempt"], 1, "lead was not restarted");
}
