//! `muster up --example agent-tree` runs the planner example to the end: workers started
//! from inside the planner on other nodes, a worker with helpers of its own (depth 3), a
//! flaky worker whose crash loop reaches the planner first and is acknowledged and replaced,
//! and the combined result written. Nothing is left running.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use muster_e2e::inbox::{read_inbox_dir, tail};
use muster_e2e::up::Up;
use muster_e2e::{is_event, reason};

const EXAMPLE_DEADLINE: Duration = Duration::from_secs(5 * 60);

#[test]
fn muster_up_runs_the_agent_tree_example_to_the_end() {
    let root = tempfile::Builder::new()
        .prefix("muster-e2e-tree-")
        .tempdir()
        .expect("a temp dir");
    let mut up = Up::start(root.path(), &["--example", "agent-tree"]);

    up.run_to_end(EXAMPLE_DEADLINE);

    let inbox = read_inbox_dir(&up.data_dir.join("controller/inbox"));
    let context = || tail(&inbox, 80);

    // The tree: who started whom, and where it ran.
    let mut parents = BTreeMap::new();
    let mut nodes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in &inbox {
        let task = e["task"].as_str().unwrap_or_default().to_string();
        if task.is_empty() {
            continue;
        }
        if task != "planner" {
            assert_eq!(e["root"], "planner", "an event without lineage: {e}");
            parents.insert(task.clone(), e["parent"].as_str().unwrap_or("").to_string());
        }
        if e["kind"] == "task.placed" {
            nodes
                .entry(task)
                .or_default()
                .insert(e["node"].as_str().unwrap_or("").to_string());
        }
    }
    let helpers: Vec<&String> = parents
        .iter()
        .filter(|(_, parent)| *parent != "planner")
        .map(|(task, _)| task)
        .collect();
    assert!(
        helpers.len() >= 2,
        "no worker started helpers of its own: {parents:?}"
    );
    for helper in &helpers {
        let worker = &parents[*helper];
        assert_eq!(parents[worker], "planner", "{helper} is not at depth 3");
    }
    let all_nodes: BTreeSet<&String> = nodes.values().flatten().collect();
    assert!(
        all_nodes.len() >= 2,
        "children were not spread over the fleet: {nodes:?}"
    );

    // The flaky worker's crash loop went to the planner first, which acked and replaced it.
    let opened = inbox
        .iter()
        .find(|e| e["kind"] == "incident.opened" && reason(e) == "crash_loop")
        .unwrap_or_else(|| panic!("no crash loop incident:\n{}", context()));
    assert_eq!(opened["data"]["escalate_to"], "planner", "{opened}");
    let flaky = opened["task"].as_str().unwrap_or_default();
    assert!(
        inbox
            .iter()
            .any(|e| is_event(e, "incident.acked", flaky) && e["data"]["caller"] == "task:planner"),
        "the planner did not ack {flaky}'s incident:\n{}",
        context()
    );
    assert!(
        !inbox.iter().any(|e| e["kind"] == "incident.escalated"),
        "an incident went to people although the planner acked it:\n{}",
        context()
    );
    let replaced = parents.keys().any(|t| t.starts_with(flaky) && t != flaky);
    assert!(replaced, "{flaky} was not replaced: {parents:?}");

    // The planner finished with the combined result.
    assert!(
        inbox
            .iter()
            .any(|e| is_event(e, "task.succeeded", "planner")),
        "the planner did not succeed:\n{}",
        context()
    );
    let result: Value = serde_json::from_str(
        &std::fs::read_to_string(up.data_dir.join("task-data/planner/result.json"))
            .expect("the planner's result.json"),
    )
    .expect("result.json is JSON");
    let accuracy = result["best"]["accuracy"].as_f64().unwrap_or(0.0);
    assert!(
        accuracy > 0.9,
        "the search found no good classifier: {result}"
    );
    assert_eq!(result["lost_slices"], serde_json::json!({}), "{result}");
    assert_eq!(result["replacements"], 1, "{result}");
}
