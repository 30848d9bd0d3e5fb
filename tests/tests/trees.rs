//! Task trees on the real binaries: tasks that start children with `muster` and their own
//! token, lineage on every event and in the parent's `$MUSTER_INBOX`, cascading stops and
//! `keep` children, subtree limits, restart intensity, parent-first escalation and the scope
//! of a task's token.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use muster_e2e::receiver::{controller_config, describe, Receiver};
use muster_e2e::{
    attempt_of, is_event, pid_alive, poll_until, reason, seq_of, ts_ms, wait_until, Fleet,
    FleetOptions, TASK_DEADLINE,
};

/// For a notification to reach a receiver (grouping window and pacing included).
const ALERT_DEADLINE: Duration = Duration::from_secs(60);
/// How long a test watches for something that must not happen.
const QUIET: Duration = Duration::from_secs(2);
/// Alert timings: a one-second grouping window and no reminders.
const ALERTS: &str = "group_window = \"1s\"\nremind_every = \"0s\"\n";

fn slots(slots: u32) -> FleetOptions {
    FleetOptions {
        slots,
        ..FleetOptions::default()
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The state of a task as `muster show` reports it.
fn state(fleet: &Fleet, task: &str) -> String {
    fleet.show(task)["state"].as_str().unwrap_or("").to_string()
}

fn is_final(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "stopped")
}

/// Waits until every task is in a final state; returns their states in order.
fn wait_all_final(fleet: &Fleet, tasks: &[&str]) -> Vec<String> {
    let mut last = Vec::new();
    poll_until(TASK_DEADLINE, || {
        last = tasks.iter().map(|t| state(fleet, t)).collect::<Vec<_>>();
        last.iter().all(|s| is_final(s)).then(|| last.clone())
    })
    .unwrap_or_else(|| {
        panic!(
            "tasks {tasks:?} did not all end within {}s; states: {last:?}\n{}",
            TASK_DEADLINE.as_secs(),
            muster_e2e::inbox::tail(&fleet.read_inbox(), 40)
        )
    })
}

/// The node a running task is on.
fn node_of(fleet: &Fleet, task: &str) -> String {
    let shown = fleet.wait_for_task_state(task, "running", TASK_DEADLINE);
    shown["node"]
        .as_str()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| panic!("a running task without a node: {shown:#}"))
        .to_string()
}

/// The events of a task's `$MUSTER_INBOX` file (complete lines only).
fn task_inbox(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("{}: a line that is not JSON ({e}): {l}", path.display())
            })
        })
        .collect()
}

/// Waits until a task's log file (stdout.log, stderr.log) holds `wanted`; returns the text.
fn wait_for_log(fleet: &Fleet, node: &str, task: &str, file: &str, wanted: &str) -> String {
    let path = fleet.task_dir(node, task).join(file);
    fleet.wait_for_file(&path, TASK_DEADLINE, |text| text.contains(wanted))
}

/// The names of the tasks of a JSON array.
fn names(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list:#}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap_or("").to_string())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Asserts that `muster show TASK` finds no such task.
fn assert_absent(fleet: &Fleet, task: &str) {
    let shown = fleet.muster(&["show", task, "--json"]);
    assert_eq!(
        shown.status.code(),
        Some(3),
        "{task} must not exist: {}{}",
        String::from_utf8_lossy(&shown.stdout),
        stderr(&shown)
    );
}

/// Asserts a refused submission: it failed, and its stderr names `limit`.
fn assert_refused(output: &Output, limit: &str) {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(1), "a refusal exits 1: {text}");
    assert!(
        text.contains("submission refused") && text.contains(limit),
        "the refusal names {limit}: {text}"
    );
}

/// Asserts that every inbox event about `task` names its parent and root.
fn assert_lineage(fleet: &Fleet, task: &str, parent: &str, root: &str) {
    let events = fleet.events(|e| e["task"] == task);
    assert!(!events.is_empty(), "no events about {task}");
    for e in &events {
        assert_eq!(
            (e["parent"].as_str(), e["root"].as_str()),
            (Some(parent), Some(root)),
            "an event about {task} without its lineage: {e}"
        );
    }
}

/// A folder below the fleet dir for files that tasks write for the test.
fn out_dir(fleet: &Fleet) -> PathBuf {
    let dir = fleet.dir().join("out");
    std::fs::create_dir_all(&dir).expect("creating the out dir");
    dir
}

/// A path as a TOML basic string.
fn toml_str(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

const PLANNER: &str = r#"
name = "planner"
shell = true
command = ['''
echo "inbox=$MUSTER_INBOX"
muster run --name c1 --grace 1s -- sleep 600 || echo "c1 refused"
muster run --name c2 --grace 1s -- sleep 600 || echo "c2 refused"
echo "children submitted"
exec sleep 600
''']
[stop]
grace = "1s"
"#;

#[test]
fn children_started_from_inside_a_task_land_on_other_nodes() {
    let fleet = Fleet::start(3, slots(1));
    fleet.submit_toml("planner", PLANNER);
    let planner_node = node_of(&fleet, "planner");
    let c1 = fleet.wait_for_task_state("c1", "running", TASK_DEADLINE);
    let c2 = fleet.wait_for_task_state("c2", "running", TASK_DEADLINE);

    for child in [&c1, &c2] {
        assert_eq!(child["parent"], "planner", "{child:#}");
        assert_eq!(child["root"], "planner", "{child:#}");
        assert_ne!(
            child["node"], planner_node,
            "one slot per node: a child runs beside its parent: {child:#}"
        );
    }
    assert_ne!(c1["node"], c2["node"], "{c1:#}\n{c2:#}");
    let planner = fleet.show("planner");
    assert_eq!(planner["parent"].as_str().unwrap_or(""), "", "{planner:#}");

    // Lineage on every event about a child.
    for child in ["c1", "c2"] {
        fleet.wait_for_event(|e| is_event(e, "attempt.started", child), TASK_DEADLINE);
    }
    let about_children = fleet.events(|e| e["task"] == "c1" || e["task"] == "c2");
    for kind in ["task.submitted", "task.placed", "attempt.started"] {
        assert!(
            about_children.iter().any(|e| e["kind"] == kind),
            "no {kind} about the children: {about_children:#?}"
        );
    }
    for e in &about_children {
        assert_eq!(e["parent"], "planner", "an event without its parent: {e}");
        assert_eq!(e["root"], "planner", "an event without its root: {e}");
    }

    // The planner's MUSTER_INBOX, on its own node, gets the events about its children.
    let stdout = wait_for_log(&fleet, &planner_node, "planner", "stdout.log", "inbox=");
    let inbox_path = fleet.task_dir(&planner_node, "planner").join("inbox.jsonl");
    let announced = stdout
        .lines()
        .find_map(|l| l.strip_prefix("inbox="))
        .unwrap_or("");
    assert_eq!(
        Path::new(announced),
        inbox_path,
        "MUSTER_INBOX is the task's inbox.jsonl on its node"
    );
    let lines = wait_until(
        "attempt.started of c1 and c2 in the planner's MUSTER_INBOX",
        TASK_DEADLINE,
        || {
            let lines = task_inbox(&inbox_path);
            ["c1", "c2"]
                .iter()
                .all(|c| lines.iter().any(|e| is_event(e, "attempt.started", c)))
                .then_some(lines)
        },
    );
    let controller: Vec<Value> = fleet.read_inbox();
    let mut last_seq = 0;
    for line in &lines {
        let seq = seq_of(line);
        assert!(seq > last_seq, "MUSTER_INBOX out of order: {lines:#?}");
        last_seq = seq;
        assert!(
            line["task"] == "c1" || line["task"] == "c2",
            "MUSTER_INBOX holds only events about descendants: {line}"
        );
        assert_eq!(line["parent"], "planner", "{line}");
        assert_eq!(line["root"], "planner", "{line}");
        let same = controller.iter().find(|e| seq_of(e) == seq);
        assert_eq!(
            same,
            Some(line),
            "a MUSTER_INBOX line is the controller's event of that seq"
        );
    }

    // Listing by parent, root and subtree.
    let by_parent = fleet.muster_json(&["ls", "--parent", "planner", "--json"]);
    assert_eq!(names(&by_parent), set(&["c1", "c2"]), "{by_parent:#}");
    let by_root = fleet.muster_json(&["ls", "--root", "planner", "--json"]);
    assert!(
        names(&by_root).is_superset(&set(&["c1", "c2"])),
        "{by_root:#}"
    );
    let subtree = fleet.muster_json(&["ls", "--subtree", "planner", "--json"]);
    assert_eq!(
        names(&subtree),
        set(&["planner", "c1", "c2"]),
        "{subtree:#}"
    );
    let inbox = fleet.muster_ok(&["inbox", "--subtree", "planner", "--since", "1", "--json"]);
    let events: Vec<Value> = inbox
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        events
            .iter()
            .all(|e| ["planner", "c1", "c2"].iter().any(|t| e["task"] == *t)),
        "inbox --subtree planner: {events:#?}"
    );
    for task in ["planner", "c1", "c2"] {
        assert!(
            events.iter().any(|e| is_event(e, "attempt.started", task)),
            "inbox --subtree planner lacks {task}: {events:#?}"
        );
    }

    // The tree with its counts.
    let tree = fleet.muster_json(&["tree", "planner", "--json"]);
    let roots = tree.as_array().expect("tree --json prints an array");
    assert_eq!(roots.len(), 1, "{tree:#}");
    let root = &roots[0];
    assert_eq!(root["name"], "planner", "{tree:#}");
    assert_eq!(root["state"], "running", "{tree:#}");
    assert_eq!(root["node"], planner_node.as_str(), "{tree:#}");
    assert_eq!(names(&root["children"]), set(&["c1", "c2"]), "{tree:#}");
    assert_eq!(root["counts"]["running"], 3, "{tree:#}");
    assert_eq!(root["counts"]["healthy"], 3, "{tree:#}");
    assert_eq!(root["counts"]["failed"], 0, "{tree:#}");
    assert_eq!(root["counts"]["done"], 0, "{tree:#}");
    for child in root["children"].as_array().unwrap() {
        assert_eq!(child["parent"], "planner", "{child:#}");
        assert_eq!(child["root"], "planner", "{child:#}");
        assert_eq!(child["counts"]["running"], 1, "{child:#}");
        assert_eq!(child["children"].as_array().map(Vec::len), Some(0));
    }
}

const TOP: &str = r#"
name = "top"
shell = true
command = ['''
muster run --name mid --grace 1s --shell -- 'muster run --name leaf --parent-close keep --grace 1s -- sleep 600 || echo "leaf refused"; exec sleep 600' || echo "mid refused"
exec sleep 600
''']
[stop]
grace = "1s"
"#;

#[test]
fn stop_of_a_root_stops_its_whole_tree() {
    let fleet = Fleet::start(2, FleetOptions::default());
    fleet.submit_toml("top", TOP);
    let tree = ["top", "mid", "leaf"];
    for task in tree {
        fleet.wait_for_task_state(task, "running", TASK_DEADLINE);
    }
    let mid = fleet.show("mid");
    let leaf = fleet.show("leaf");
    assert_eq!(
        (&mid["parent"], &mid["root"]),
        (&"top".into(), &"top".into())
    );
    assert_eq!(
        (&leaf["parent"], &leaf["root"]),
        (&"mid".into(), &"top".into()),
        "{leaf:#}"
    );
    let drawn = fleet.muster_json(&["tree", "--json"]);
    let top = drawn
        .as_array()
        .and_then(|roots| roots.iter().find(|r| r["name"] == "top"))
        .unwrap_or_else(|| panic!("top is no root of the tree: {drawn:#}"));
    assert_eq!(top["children"][0]["name"], "mid", "{drawn:#}");
    assert_eq!(
        top["children"][0]["children"][0]["name"], "leaf",
        "{drawn:#}"
    );
    assert_eq!(top["counts"]["running"], 3, "{drawn:#}");
    // Each ancestor's MUSTER_INBOX gets the events about all its descendants, and only them.
    let inbox_of = |task: &str| {
        let node = node_of(&fleet, task);
        fleet.task_dir(&node, task).join("inbox.jsonl")
    };
    let (top_inbox, mid_inbox) = (inbox_of("top"), inbox_of("mid"));
    wait_until("mid and leaf in top's MUSTER_INBOX", TASK_DEADLINE, || {
        let lines = task_inbox(&top_inbox);
        ["mid", "leaf"]
            .iter()
            .all(|t| lines.iter().any(|e| is_event(e, "attempt.started", t)))
            .then_some(())
    });
    let mid_lines = wait_until("leaf in mid's MUSTER_INBOX", TASK_DEADLINE, || {
        let lines = task_inbox(&mid_inbox);
        lines
            .iter()
            .any(|e| is_event(e, "attempt.started", "leaf"))
            .then_some(lines)
    });
    assert!(
        mid_lines.iter().all(|e| e["task"] == "leaf"),
        "mid's MUSTER_INBOX holds only events about its descendants: {mid_lines:#?}"
    );
    let top_lines = task_inbox(&top_inbox);
    assert!(
        top_lines
            .iter()
            .all(|e| e["task"] == "mid" || e["task"] == "leaf"),
        "{top_lines:#?}"
    );
    let leaf_line = top_lines
        .iter()
        .find(|e| e["task"] == "leaf")
        .expect("a line about leaf");
    assert_eq!(
        (&leaf_line["parent"], &leaf_line["root"]),
        (&"mid".into(), &"top".into()),
        "{leaf_line}"
    );

    let live = |task: &str| !fleet.task_processes(task).is_empty();
    assert!(
        tree.iter().all(|t| live(t)),
        "every task of the tree has a process"
    );

    fleet.muster_ok(&["stop", "top"]);

    let states = wait_all_final(&fleet, &tree);
    assert_eq!(
        states,
        ["stopped", "stopped", "stopped"],
        "keep children too"
    );
    let left: Vec<_> = fleet
        .all_task_processes()
        .into_iter()
        .filter(|p| tree.contains(&p.task.as_str()))
        .collect();
    assert!(left.is_empty(), "processes of a stopped tree: {left:?}");
    let drawn = fleet.muster_json(&["tree", "top", "--json"]);
    assert_eq!(drawn[0]["counts"]["done"], 3, "{drawn:#}");
    assert_eq!(drawn[0]["counts"]["running"], 0, "{drawn:#}");

    // A restart of the root places the whole ended tree again.
    fleet.muster_ok(&["restart", "top"]);
    for task in tree {
        let again = fleet.wait_for_task_state(task, "running", TASK_DEADLINE);
        assert_eq!(again["attempt"], 2, "{again:#}");
    }
    assert!(
        tree.iter().all(|t| live(t)),
        "every task of the tree runs again"
    );
    assert_lineage(&fleet, "mid", "top", "top");
    assert_lineage(&fleet, "leaf", "mid", "top");
}

const BOSS: &str = r#"
name = "boss"
shell = true
command = ['''
muster run --name stay --parent-close keep --grace 1s -- sleep 600 || exit 3
muster run --name go --grace 1s -- sleep 600 || exit 3
i=0
until [ "$(grep -c '"attempt.started"' "$MUSTER_INBOX" 2>/dev/null)" -ge 2 ]; do
  i=$((i + 1)); [ "$i" -gt 600 ] && exit 4
  sleep 0.1
done
echo "both children started; leaving"
exit 0
''']
[restart]
policy = "on-failure"
"#;

/// A parent that gives up in a crash loop once its child runs.
const FLOP: &str = r#"
name = "flop"
shell = true
command = ['''
muster run --name orphan --grace 1s -- sleep 600 || exit 3
i=0
until grep -q '"attempt.started"' "$MUSTER_INBOX" 2>/dev/null; do
  i=$((i + 1)); [ "$i" -gt 600 ] && exit 4
  sleep 0.1
done
exit 1
''']
[restart]
policy = "on-failure"
max_restarts = 0
"#;

#[test]
fn keep_child_outlives_its_parent_and_stop_child_does_not() {
    let fleet = Fleet::start(1, FleetOptions::default());
    fleet.submit_toml("boss", BOSS);
    let stay_pid = fleet.wait_for_attempt_pid("stay", 1, TASK_DEADLINE);
    let go_pid = fleet.wait_for_attempt_pid("go", 1, TASK_DEADLINE);

    fleet.wait_for_task_state("boss", "succeeded", TASK_DEADLINE);
    let go = fleet.wait_for_task_state("go", "stopped", TASK_DEADLINE);
    let stopped = fleet.wait_for_event(|e| is_event(e, "task.stopped", "go"), TASK_DEADLINE);
    assert_eq!(reason(&stopped), "parent_ended", "{stopped}\n{go:#}");
    assert_eq!(stopped["parent"], "boss", "{stopped}");
    assert!(!pid_alive(go_pid), "go's process outlived its stop");
    assert!(fleet.task_processes("go").is_empty());

    // The keep child was left alone: same attempt, same process, still running.
    let stay = fleet.show("stay");
    assert_eq!(stay["state"], "running", "{stay:#}");
    assert_eq!(stay["attempt"], 1, "{stay:#}");
    assert!(pid_alive(stay_pid), "the keep child's process is gone");
    assert_eq!(
        fleet
            .task_processes("stay")
            .iter()
            .map(|p| p.pid)
            .collect::<Vec<_>>(),
        [stay_pid]
    );
    assert!(
        fleet
            .events(|e| e["task"] == "stay"
                && (e["kind"] == "task.stopped" || e["kind"] == "attempt.exited"))
            .is_empty(),
        "the keep child was touched"
    );
    // A parent in a crash loop has ended too.
    fleet.submit_toml("flop", FLOP);
    let orphan_pid = fleet.wait_for_attempt_pid("orphan", 1, TASK_DEADLINE);
    fleet.wait_for_task_state("flop", "crash_loop", TASK_DEADLINE);
    fleet.wait_for_task_state("orphan", "stopped", TASK_DEADLINE);
    let stopped = fleet.wait_for_event(|e| is_event(e, "task.stopped", "orphan"), TASK_DEADLINE);
    assert_eq!(reason(&stopped), "parent_ended", "{stopped}");
    assert!(!pid_alive(orphan_pid), "orphan's process outlived its stop");
    assert_eq!(fleet.show("stay")["state"], "running");

    // An operator's stop of the ended parent takes its keep child too.
    fleet.muster_ok(&["stop", "boss"]);
    fleet.wait_for_task_state("stay", "stopped", TASK_DEADLINE);
    assert!(
        !pid_alive(stay_pid),
        "the keep child's process outlived the stop"
    );
    assert_lineage(&fleet, "stay", "boss", "boss");
    assert_lineage(&fleet, "go", "boss", "boss");
}

#[test]
fn each_limit_refuses_the_submission_that_crosses_it() {
    let fleet = Fleet::start(2, slots(8));
    let run = |line: &str| fleet.muster(&line.split_whitespace().collect::<Vec<_>>());
    let run_ok = |line: &str| {
        let output = run(line);
        assert!(
            output.status.success(),
            "muster {line}: {}",
            stderr(&output)
        );
    };

    // budget, armed first: it takes the longest. Once it is spent, the root's stop begins
    // with SIGTERM; the root then tries one more child and ignores the signal for its grace.
    fleet.submit_toml(
        "spent",
        r#"
name = "spent"
shell = true
command = ['''
trap 'muster run --name late -- true 2>> "$MUSTER_DATA_DIR/late.err"; echo "late exit=$?" >> "$MUSTER_DATA_DIR/late.out"' TERM
while true; do sleep 0.2; done
''']
[limits]
budget = "5s"
[stop]
grace = "5s"
"#,
    );
    run_ok("run --parent spent --name b1 --grace 1s -- sleep 600");
    let spent_node = node_of(&fleet, "spent");

    // max_children, from inside a task.
    fleet.submit_toml(
        "kids",
        r#"
name = "kids"
shell = true
command = ['''
for k in k1 k2 k3; do
  muster run --name $k --grace 1s -- sleep 600
  echo "$k exit=$?"
done
exec sleep 600
''']
[limits]
max_children = 2
[stop]
grace = "1s"
"#,
    );
    let kids_node = node_of(&fleet, "kids");
    let out = wait_for_log(&fleet, &kids_node, "kids", "stdout.log", "k3 exit=");
    assert!(
        out.contains("k1 exit=0") && out.contains("k2 exit=0"),
        "{out}"
    );
    assert!(
        out.contains("k3 exit=1"),
        "k3 was refused with exit 1: {out}"
    );
    let err = std::fs::read_to_string(fleet.task_dir(&kids_node, "kids").join("stderr.log"))
        .unwrap_or_default();
    assert!(
        err.contains("submission refused") && err.contains("max_children"),
        "the task's stderr names the limit: {err}"
    );
    assert_absent(&fleet, "k3");
    let kids = fleet.muster_json(&["ls", "--parent", "kids", "--json"]);
    assert_eq!(names(&kids), set(&["k1", "k2"]));
    // The nearest max_children on the chain bounds a grandchild's siblings too.
    run_ok("run --parent k1 --name g1 -- sleep 600");
    run_ok("run --parent k1 --name g2 -- sleep 600");
    let refused = run("run --parent k1 --name g3 -- sleep 600");
    assert_refused(&refused, "max_children");
    assert!(
        stderr(&refused).contains("kids"),
        "the refusal names where the limit was set: {}",
        stderr(&refused)
    );
    assert_absent(&fleet, "g3");

    // max_depth: a child is allowed, a grandchild is not.
    run_ok("run --name deep --limit max_depth=1 --grace 1s -- sleep 600");
    run_ok("run --parent deep --name d1 --grace 1s -- sleep 600");
    assert_refused(&run("run --parent d1 --name d2 -- sleep 600"), "max_depth");
    assert_absent(&fleet, "d2");

    // max_descendants counts descendants that have ended too.
    run_ok("run --name desc --limit max_descendants=2 --grace 1s -- sleep 600");
    run_ok("run --parent desc --name e1 --restart never -- true");
    run_ok("run --parent desc --name e2 --grace 1s -- sleep 600");
    fleet.wait_for_task_state("e1", "succeeded", TASK_DEADLINE);
    assert_refused(
        &run("run --parent e2 --name e3 -- sleep 600"),
        "max_descendants",
    );
    assert_absent(&fleet, "e3");

    // max_running counts only descendants that have not ended.
    run_ok("run --name live --limit max_running=2 --grace 1s -- sleep 600");
    run_ok("run --parent live --name r1 --restart never -- true");
    fleet.wait_for_task_state("r1", "succeeded", TASK_DEADLINE);
    let ended = run("run --parent r1 --name r1x -- sleep 600");
    assert!(
        !ended.status.success() && stderr(&ended).contains("has ended"),
        "a task that ended takes no children: {ended:?}"
    );
    assert_absent(&fleet, "r1x");
    run_ok("run --parent live --name r2 --grace 1s -- sleep 600");
    run_ok("run --parent live --name r3 --grace 1s -- sleep 600");
    assert_refused(
        &run("run --parent live --name r4 -- sleep 600"),
        "max_running",
    );
    assert_absent(&fleet, "r4");

    // budget: spent, the subtree is stopped, and nothing more may be submitted into it.
    let unhealthy = fleet.wait_for_event(
        |e| is_event(e, "task.unhealthy", "spent") && reason(e) == "budget",
        TASK_DEADLINE,
    );
    let b1 = fleet.wait_for_task_state("b1", "failed", TASK_DEADLINE);
    let data = fleet.task_dir(&spent_node, "spent").join("data");
    let late = fleet.wait_for_file(&data.join("late.out"), TASK_DEADLINE, |t| {
        t.contains("late exit=")
    });
    let late_err = std::fs::read_to_string(data.join("late.err")).unwrap_or_default();
    // The stop may signal the shell more than once; its first try is the one that counts.
    assert_eq!(
        late.lines().next(),
        Some("late exit=1"),
        "{late}\n{late_err}\n{unhealthy}"
    );
    assert!(
        late_err.contains("submission refused") && late_err.contains("budget"),
        "the refusal names the budget: {late_err}"
    );
    assert_absent(&fleet, "late");
    fleet.wait_for_task_state("spent", "failed", TASK_DEADLINE);
    for task in ["spent", "b1"] {
        let failed = fleet.wait_for_event(|e| is_event(e, "task.failed", task), TASK_DEADLINE);
        assert_eq!(reason(&failed), "budget", "{failed}\n{b1:#}");
        assert!(fleet.task_processes(task).is_empty(), "{task} still runs");
    }
    // The limits touched nothing outside their subtrees.
    for task in [
        "kids", "k1", "k2", "deep", "d1", "desc", "e2", "live", "r2", "r3",
    ] {
        assert_eq!(state(&fleet, task), "running", "{task}");
    }
}

const WORKERS: &str = r#"
name = "w{n}"
command = ["sh", "-c", "exit 1"]
[matrix]
n = [1, 2, 3]
[restart]
policy = "always"
backoff_initial = "100ms"
backoff_max = "200ms"
max_restarts = 1000
window = "10m"
[stop]
grace = "1s"
"#;

#[test]
fn restart_intensity_opens_one_incident_and_stops_the_crashing_subtree() {
    let fleet = Fleet::start(1, FleetOptions::default());
    fleet.submit_toml(
        "sup",
        r#"
name = "sup"
command = ["sleep", "600"]
[limits]
max_restarts = 3
restart_window = "1m"
[stop]
grace = "1s"
"#,
    );
    fleet.wait_for_task_state("sup", "running", TASK_DEADLINE);
    let path = fleet.write_spec("workers", WORKERS);
    fleet.muster_ok(&["submit", path.to_str().unwrap(), "--parent", "sup"]);

    let opened = fleet.wait_for_event(
        |e| e["kind"] == "incident.opened" && reason(e) == "restart_intensity",
        TASK_DEADLINE,
    );
    assert_eq!(
        opened["task"], "sup",
        "the incident is the subtree root's: {opened}"
    );
    let workers = ["w1", "w2", "w3"];
    let states = wait_all_final(&fleet, &workers);
    assert_eq!(states, ["failed", "failed", "failed"]);

    let intensity =
        fleet.events(|e| e["kind"] == "incident.opened" && reason(e) == "restart_intensity");
    assert_eq!(intensity.len(), 1, "one incident: {intensity:#?}");
    for w in workers {
        let failed = fleet.wait_for_event(|e| is_event(e, "task.failed", w), TASK_DEADLINE);
        assert_eq!(reason(&failed), "restart_intensity", "{failed}");
        assert_eq!(failed["parent"], "sup", "{failed}");
        assert!(
            fleet.task_processes(w).is_empty(),
            "{w} still has processes"
        );
        let crash_loops =
            fleet.events(|e| is_event(e, "incident.opened", w) && reason(e) == "crash_loop");
        assert!(crash_loops.is_empty(), "{crash_loops:#?}");
    }
    let restarting = fleet.events(|e| e["kind"] == "task.restarting");
    assert!(
        restarting.len() >= 4,
        "more than 3 restarts tripped it: {restarting:#?}"
    );
    assert_eq!(
        state(&fleet, "sup"),
        "running",
        "the root itself did not crash"
    );
    // While the incident is open, a crash anywhere in the subtree ends the task.
    fleet.muster_ok(&[
        "run",
        "--parent",
        "sup",
        "--name",
        "w4",
        "--restart",
        "always",
        "--backoff-initial",
        "1s",
        "--",
        "sh",
        "-c",
        "exit 1",
    ]);
    let w4 = wait_all_final(&fleet, &["w4"]);
    assert_eq!(w4, ["failed"]);
    let failed = fleet.wait_for_event(|e| is_event(e, "task.failed", "w4"), TASK_DEADLINE);
    assert_eq!(reason(&failed), "restart_intensity", "{failed}");
    assert_eq!(fleet.show("w4")["attempt"], 1, "w4 was restarted");
    let intensity =
        fleet.events(|e| e["kind"] == "incident.opened" && reason(e) == "restart_intensity");
    assert_eq!(intensity.len(), 1, "still one incident: {intensity:#?}");

    let listed = fleet.muster_json(&["incidents", "--subtree", "sup", "--json"]);
    let listed = listed.as_array().expect("incidents --json prints an array");
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["task"], "sup", "{listed:#?}");
    assert_eq!(listed[0]["reason"], "restart_intensity", "{listed:#?}");

    // Resolving it counts the subtree's restarts afresh: a new crasher restarts again.
    let id = listed[0]["id"]
        .as_u64()
        .expect("an incident id")
        .to_string();
    fleet.muster_ok(&["resolve", &id]);
    fleet.muster_ok(&[
        "run",
        "--parent",
        "sup",
        "--name",
        "w5",
        "--restart",
        "always",
        "--backoff-initial",
        "100ms",
        "--backoff-max",
        "200ms",
        "--",
        "sh",
        "-c",
        "exit 1",
    ]);
    fleet.wait_for_event(
        |e| is_event(e, "attempt.started", "w5") && attempt_of(e) >= 3,
        TASK_DEADLINE,
    );
}

/// The parent acks every incident of `quiet` from its inbox with its own token, then starts
/// `loud`, whose incident it leaves alone.
const LEAD: &str = r#"
name = "lead"
shell = true
command = ['''
muster run --name quiet --restart on-failure --max-restarts 0 --backoff-initial 100ms --parent-timeout 5s -- sh -c 'exit 1' || exit 3
i=0
while true; do
  id=$(grep '"incident.opened"' "$MUSTER_INBOX" 2>/dev/null | grep '"task":"quiet"' | grep -o '"incident":[0-9]*' | head -n 1 | cut -d: -f2)
  if [ -n "$id" ]; then
    muster ack "$id" || exit 4
    echo "acked $id"
    break
  fi
  i=$((i + 1)); [ "$i" -gt 600 ] && exit 5
  sleep 0.1
done
muster run --name loud --restart on-failure --max-restarts 0 --backoff-initial 100ms --parent-timeout 5s -- sh -c 'exit 1' || exit 3
exec sleep 600
''']
[stop]
grace = "1s"
"#;

#[test]
fn incidents_go_to_the_parent_first_and_to_people_only_unacknowledged() {
    let slack = Receiver::slack_webhook();
    let fleet = Fleet::start(
        1,
        FleetOptions {
            slots: 4,
            controller_config: controller_config(ALERTS, &[slack.config_section("")]),
        },
    );
    fleet.submit_toml("lead", LEAD);
    let lead_node = node_of(&fleet, "lead");
    let inbox_path = fleet.task_dir(&lead_node, "lead").join("inbox.jsonl");
    let held = |task: &str| {
        let opened = fleet.wait_for_event(
            |e| is_event(e, "incident.opened", task) && reason(e) == "crash_loop",
            TASK_DEADLINE,
        );
        assert_eq!(opened["data"]["escalate_to"], "lead", "{opened}");
        assert_eq!(opened["data"]["parent_timeout_ms"], 5000, "{opened}");
        assert_eq!(opened["parent"], "lead", "{opened}");
        // In the parent's MUSTER_INBOX before anything reaches people.
        wait_until(
            &format!("{task}'s incident.opened in lead's MUSTER_INBOX"),
            TASK_DEADLINE,
            || {
                task_inbox(&inbox_path)
                    .into_iter()
                    .any(|e| seq_of(&e) == seq_of(&opened))
                    .then_some(())
            },
        );
        let told = slack.requests();
        assert!(
            told.is_empty(),
            "Slack was told before the parent had the incident:\n{}",
            describe(&told)
        );
        opened
    };

    let quiet = held("quiet");
    let quiet_id = quiet["data"]["incident"].clone();
    let acked = fleet.wait_for_event(
        |e| e["kind"] == "incident.acked" && e["data"]["incident"] == quiet_id,
        TASK_DEADLINE,
    );
    assert_eq!(acked["task"], "quiet", "{acked}");
    assert_eq!(
        acked["data"]["caller"], "task:lead",
        "the parent acked with its own token: {acked}"
    );

    // The control: the same timeout, opened later, not acknowledged.
    let loud = held("loud");
    let loud_id = loud["data"]["incident"].clone();
    let escalated = fleet.wait_for_event(
        |e| e["kind"] == "incident.escalated" && e["data"]["incident"] == loud_id,
        TASK_DEADLINE,
    );
    assert_eq!(escalated["task"], "loud", "{escalated}");
    let held_ms = ts_ms(&escalated) - ts_ms(&loud);
    assert!(
        held_ms >= 4900,
        "escalated {held_ms} ms after it opened, before the parent's 5s"
    );
    let message = slack.wait_for_delivered("a message about loud", ALERT_DEADLINE, |r| {
        r.text().contains("loud")
    });
    let sent = fleet.wait_for_event(
        |e| {
            e["kind"] == "alert.sent"
                && e["data"]["destination"] == "slack"
                && e["data"]["incidents"]
                    .as_array()
                    .is_some_and(|ids| ids.contains(&loud_id))
        },
        TASK_DEADLINE,
    );
    assert!(
        seq_of(&sent) > seq_of(&escalated),
        "sent to Slack before it was escalated: {sent}\n{escalated}"
    );

    // The acked incident, due before the control, never went to people.
    slack.assert_holds_for("no message about quiet", QUIET, |all| {
        all.iter().all(|r| !r.text().contains("quiet"))
    });
    let quiet_escalated =
        fleet.events(|e| e["kind"] == "incident.escalated" && e["data"]["incident"] == quiet_id);
    assert!(quiet_escalated.is_empty(), "{quiet_escalated:#?}");
    let quiet_alerts = fleet.events(|e| {
        e["kind"] == "alert.sent"
            && e["data"]["incidents"]
                .as_array()
                .is_some_and(|ids| ids.contains(&quiet_id))
    });
    assert!(quiet_alerts.is_empty(), "{quiet_alerts:#?}");
    assert!(message.text().contains("loud"));
    slack.assert_all_valid();
}

#[test]
fn a_task_token_reaches_only_its_own_subtree() {
    let fleet = Fleet::start(1, FleetOptions::default());
    let out = out_dir(&fleet);
    fleet.muster_ok(&[
        "run", "--name", "other", "--grace", "1s", "--", "sleep", "600",
    ]);
    fleet.wait_for_task_state("other", "running", TASK_DEADLINE);
    fleet.submit_toml(
        "scoped",
        &format!(
            r#"
name = "scoped"
shell = true
env = {{ OUT = {out} }}
command = ['''
muster run --name mine --grace 1s -- sleep 600; echo "run_mine=$?" >> "$OUT/codes"
muster ls --json > "$OUT/ls.json" 2> "$OUT/ls.err"; echo "ls=$?" >> "$OUT/codes"
muster stop other 2> "$OUT/stop_other.err"; echo "stop_other=$?" >> "$OUT/codes"
muster stop scoped 2> "$OUT/stop_self.err"; echo "stop_self=$?" >> "$OUT/codes"
muster nodes 2> "$OUT/nodes.err"; echo "nodes=$?" >> "$OUT/codes"
muster cordon node-1 2> "$OUT/cordon.err"; echo "cordon=$?" >> "$OUT/codes"
muster drain node-1 2> "$OUT/drain.err"; echo "drain=$?" >> "$OUT/codes"
muster restart other 2> "$OUT/restart_other.err"; echo "restart_other=$?" >> "$OUT/codes"
muster run --parent other --name intruder -- sleep 600 2> "$OUT/run_other.err"; echo "run_other=$?" >> "$OUT/codes"
muster show other --json > "$OUT/show_other.json" 2> "$OUT/show_other.err"; echo "show_other=$?" >> "$OUT/codes"
muster stop mine 2> "$OUT/stop_mine.err"; echo "stop_mine=$?" >> "$OUT/codes"
echo "end" >> "$OUT/codes"
exec sleep 600
''']
[stop]
grace = "1s"
"#,
            out = toml_str(&out)
        ),
    );
    let codes = fleet.wait_for_file(&out.join("codes"), TASK_DEADLINE, |t| t.contains("end"));
    let code = |what: &str| -> i32 {
        codes
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{what}=")))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no exit code for {what}: {codes}"))
    };
    let err = |what: &str| std::fs::read_to_string(out.join(format!("{what}.err"))).unwrap();

    assert_eq!(code("run_mine"), 0, "{codes}");
    assert_eq!(code("ls"), 0, "{}", err("ls"));
    let listed: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("ls.json")).unwrap())
            .expect("ls --json prints JSON");
    assert_eq!(
        names(&listed),
        set(&["scoped", "mine"]),
        "ls lists the task's own subtree: {listed:#}"
    );

    for what in ["stop_other", "stop_self", "restart_other"] {
        assert_eq!(code(what), 4, "{what}: {}", err(what));
        assert!(
            err(what).contains("may act only on its descendants"),
            "{what}: {}",
            err(what)
        );
    }
    assert_eq!(code("nodes"), 4, "{}", err("nodes"));
    assert_eq!(code("cordon"), 4, "{}", err("cordon"));
    assert_eq!(code("drain"), 4, "{}", err("drain"));
    assert_eq!(code("run_other"), 4, "{}", err("run_other"));
    assert_ne!(code("show_other"), 0, "{}", err("show_other"));
    assert_eq!(code("stop_mine"), 0, "{}", err("stop_mine"));

    // Nothing the token was refused happened.
    let other = fleet.show("other");
    assert_eq!(other["state"], "running", "{other:#}");
    assert_eq!(other["attempt"], 1, "{other:#}");
    assert_eq!(state(&fleet, "scoped"), "running");
    assert_absent(&fleet, "intruder");
    let nodes = fleet.muster_json(&["nodes", "--json"]);
    assert_eq!(nodes[0]["state"], "ready", "{nodes:#}");
    let mine = fleet.wait_for_task_state("mine", "stopped", TASK_DEADLINE);
    assert_eq!(mine["parent"], "scoped", "{mine:#}");
}

#[test]
fn a_descendant_cannot_loosen_max_children() {
    let fleet = Fleet::start(1, slots(8));
    let run = |args: &[&str]| {
        let mut all = vec!["run", "--grace", "1s"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--", "sleep", "600"]);
        fleet.muster(&all)
    };
    assert!(run(&["--name", "lo", "--limit", "max_children=2"])
        .status
        .success());
    let loose = run(&[
        "--name",
        "lo-c",
        "--parent",
        "lo",
        "--limit",
        "max_children=100",
    ]);
    assert!(loose.status.success(), "{}", stderr(&loose));
    for kid in ["lo-c-1", "lo-c-2"] {
        let ok = run(&["--name", kid, "--parent", "lo-c"]);
        assert!(ok.status.success(), "{}", stderr(&ok));
    }
    let third = run(&["--name", "lo-c-3", "--parent", "lo-c"]);
    assert_refused(&third, "max_children = 2 (set on lo)");
    assert_absent(&fleet, "lo-c-3");
}

const READER: &str = r#"
name = "reader"
shell = true
command = ['''
muster run --name reader-kid -- true
while ! muster ls --json | grep -q '"succeeded"'; do sleep 0.2; done
muster inbox --json > inbox.out.tmp && mv inbox.out.tmp inbox.out
exec sleep 600
''']
[stop]
grace = "1s"
"#;

#[test]
fn inbox_under_a_task_token_is_the_subtree() {
    let fleet = Fleet::start(1, slots(4));
    fleet.muster_ok(&["run", "--name", "bystander", "--", "true"]);
    let dir = out_dir(&fleet);
    fleet.submit_toml(
        "reader",
        &READER.replace(
            "shell = true",
            &format!("shell = true\nworkdir = {}", toml_str(&dir)),
        ),
    );
    let text = wait_until("the reader's inbox listing", TASK_DEADLINE, || {
        std::fs::read_to_string(dir.join("inbox.out")).ok()
    });
    let tasks: BTreeSet<String> = text
        .lines()
        .map(|l| {
            let e: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            e["task"].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert!(
        tasks.contains("reader-kid"),
        "no event of its child: {text}"
    );
    assert!(
        tasks.iter().all(|t| t == "reader" || t == "reader-kid"),
        "events outside the subtree: {tasks:?}"
    );
}

const FLIPPER: &str = r#"
name = "flipper"
shell = true
command = ['''
muster run --name flipper-kid -- python3 -c '
import os
with open(os.environ["MUSTER_STATUS_FILE"], "a") as f:
    for i in range(1000):
        f.write("{\"state\":\"%s\",\"message\":\"flip %d\"}\n" % ("blocked" if i % 2 else "running", i))
    f.write("{\"state\":\"blocked\",\"message\":\"settled\"}\n")
import time
time.sleep(600)
'
exec sleep 600
''']
[stop]
grace = "1s"
"#;

#[test]
fn a_child_flipping_its_state_cannot_flood_the_inboxes() {
    let fleet = Fleet::start(1, slots(4));
    fleet.submit_toml("flipper", FLIPPER);
    // The last line lands, sampled, once its interval is over.
    fleet.wait_for_event(
        |e| is_event(e, "task.report", "flipper-kid") && e["message"] == "settled",
        TASK_DEADLINE,
    );
    let reports = fleet.events(|e| is_event(e, "task.report", "flipper-kid"));
    assert!(
        reports.len() < 100,
        "{} report events for 1001 status lines",
        reports.len()
    );
    let file = fleet
        .task_dir(&node_of(&fleet, "flipper"), "flipper")
        .join("inbox.jsonl");
    wait_until(
        "the settled report in the parent's file",
        TASK_DEADLINE,
        || {
            task_inbox(&file)
                .iter()
                .any(|e| is_event(e, "task.report", "flipper-kid") && e["message"] == "settled")
                .then_some(())
        },
    );
    let delivered = task_inbox(&file)
        .iter()
        .filter(|e| is_event(e, "task.report", "flipper-kid"))
        .count();
    assert!(delivered < 100, "{delivered} reports in the parent's file");
    assert_eq!(fleet.show("flipper-kid")["state"], "blocked");
}
