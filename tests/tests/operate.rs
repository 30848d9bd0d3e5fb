//! Operator verbs on tasks and nodes: signal, cordon, drain, and paged listing.

use muster_e2e::{is_event, wait_until, Fleet, FleetOptions, TASK_DEADLINE};

const TRAPS_USR1: &str = r#"
name = "listener"
shell = true
command = ['''
trap 'echo "{\"state\":\"running\",\"message\":\"got USR1\"}" >> "$MUSTER_STATUS_FILE"' USR1
echo '{"state":"running","message":"waiting"}' >> "$MUSTER_STATUS_FILE"
while true; do sleep 0.2; done
''']
"#;

#[test]
fn signal_reaches_the_task() {
    let fleet = Fleet::start(1, FleetOptions::default());
    fleet.submit_toml("listener", TRAPS_USR1);
    fleet.wait_for_event(
        |e| is_event(e, "task.report", "listener") && e["message"] == "waiting",
        TASK_DEADLINE,
    );

    fleet.muster_ok(&["signal", "listener", "USR1"]);

    fleet.wait_for_event(
        |e| is_event(e, "task.report", "listener") && e["message"] == "got USR1",
        TASK_DEADLINE,
    );
    let bad = fleet.muster(&["signal", "listener", "NOPE"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}

#[test]
fn drain_moves_tasks_off_a_cordoned_node() {
    let fleet = Fleet::start(2, FleetOptions::default());
    fleet.muster_ok(&["cordon", "node-2"]);
    for i in 0..3 {
        fleet.submit_toml(
            &format!("w{i}"),
            &format!("name = \"w{i}\"\ncommand = [\"sleep\", \"600\"]\n[stop]\ngrace = \"1s\"\n"),
        );
    }
    for i in 0..3 {
        let task = fleet.wait_for_task_state(&format!("w{i}"), "running", TASK_DEADLINE);
        assert_eq!(
            task["node"], "node-1",
            "a cordoned node takes nothing: {task}"
        );
    }

    fleet.muster_ok(&["uncordon", "node-2"]);
    fleet.muster_ok(&["drain", "node-1"]);

    wait_until("every task to run on node-2", TASK_DEADLINE, || {
        (0..3)
            .all(|i| {
                let t = fleet.show(&format!("w{i}"));
                t["state"] == "running" && t["node"] == "node-2"
            })
            .then_some(())
    });
    let nodes = fleet.muster_json(&["nodes", "--json"]);
    let node1 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node-1")
        .unwrap()
        .clone();
    assert_eq!(node1["state"], "cordoned", "{node1}");
    assert_eq!(node1["tasks"], 0, "{node1}");
}
