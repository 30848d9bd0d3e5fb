//! Network partitions between node agents and the controller, made with a proxy the test
//! cuts and heals: a cut-off node stops its tasks when its lease runs out, before their
//! replacements start; most nodes cut at once is the controller's own partition and moves
//! nothing; a task that says `on_disconnect = "keep"` is never replaced.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use muster_e2e::proxy::Proxy;
use muster_e2e::{
    attempt_of, is_event, pid_alive, poll_until, seq_of, wait_until, Fleet, FleetOptions,
    TASK_DEADLINE,
};

/// The controller's node timeout below; a node is lost after it, suspect after half.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// The controller's heartbeat interval below.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

fn controller_config(lease: &str) -> FleetOptions {
    FleetOptions {
        controller_config: format!(
            r#"[controller]
tick = "250ms"
heartbeat_interval = "500ms"
node_timeout = "5s"
reschedule_after = "1s"
lease = "{lease}"
report_sample = "1s"
"#
        ),
        ..FleetOptions::default()
    }
}

/// A task that reports a growing step five times a second. `top` holds top-level keys.
fn reporter(name: &str, top: &str, placement: &str) -> String {
    format!(
        r#"
name = "{name}"
{top}
shell = true
command = ['''
step=0
while true; do
  step=$((step + 1))
  echo "{{\"state\":\"running\",\"metrics\":{{\"step\":$step}}}}" >> "$MUSTER_STATUS_FILE"
  sleep 0.2
done
''']
[stop]
grace = "1s"
{placement}
"#
    )
}

/// A long-running task that reports only now and then, like most of a real fleet: its node
/// then sends batches on its own heartbeat rhythm, not at one moment shared with the others.
fn quiet(name: &str, placement: &str) -> String {
    format!(
        r#"
name = "{name}"
shell = true
command = ['''
while true; do
  echo '{{"state":"running"}}' >> "$MUSTER_STATUS_FILE"
  sleep 20
done
''']
[stop]
grace = "1s"
{placement}
"#
    )
}

fn last_seq(fleet: &Fleet) -> u64 {
    fleet.read_inbox().last().map_or(0, seq_of)
}

/// The attempts of `task` that have a live process right now.
fn live_attempts(fleet: &Fleet, task: &str) -> BTreeSet<u64> {
    fleet
        .task_processes(task)
        .iter()
        .map(|p| p.attempt)
        .collect()
}

/// Starts a fleet whose first node, `node-cut`, reaches the controller through `proxy`,
/// submits `specs` (they can only land there), then adds `node-near`, connected directly.
fn start_fleet_with_tasks_on_cut_node(lease: &str, specs: &[(&str, String)]) -> (Fleet, Proxy) {
    let mut fleet = Fleet::start(0, controller_config(lease));
    let proxy = Proxy::to_url(fleet.url());
    fleet.start_node_agent_via("node-cut", 4, &proxy.url());
    fleet.wait_for_nodes_ready(1);
    for (name, spec) in specs {
        fleet.submit_toml(name, spec);
        fleet.wait_for_attempt_pid(name, 1, TASK_DEADLINE);
    }
    fleet.start_node_agent("node-near", 4);
    fleet.wait_for_nodes_ready(2);
    (fleet, proxy)
}

fn is_after(e: &Value, seq: u64) -> bool {
    seq_of(e) > seq
}

#[test]
fn cut_off_node_stops_its_task_before_the_replacement_starts() {
    let task = "leased";
    let spec = reporter(task, r#"on_disconnect = "2s""#, "");
    let (fleet, proxy) = start_fleet_with_tasks_on_cut_node("60s", &[(task, spec)]);
    let old_pid = fleet.wait_for_attempt_pid(task, 1, TASK_DEADLINE);
    let before = last_seq(&fleet);

    proxy.cut();

    // Until the replacement starts, two attempts never run at once; when it starts, the old
    // child is already gone.
    let mut both_alive = Vec::new();
    let replacement = poll_until(Duration::from_secs(90), || {
        let live = live_attempts(&fleet, task);
        if live.len() > 1 {
            both_alive.push(live);
        }
        let started = fleet
            .events(|e| {
                is_after(e, before) && is_event(e, "attempt.started", task) && attempt_of(e) == 2
            })
            .pop()?;
        Some((started, pid_alive(old_pid), live_attempts(&fleet, task)))
    });
    let Some((started, old_alive_then, live_then)) = replacement else {
        panic!(
            "no replacement within 90s; inbox tail:\n{}",
            muster_e2e::inbox::tail(&fleet.read_inbox(), 30)
        );
    };
    let lost = fleet
        .events(|e| is_after(e, before) && e["kind"] == "node.lost" && e["node"] == "node-cut");
    assert!(
        !old_alive_then,
        "old child {old_pid} alive when attempt 2 started: {started}"
    );
    assert!(
        both_alive.is_empty(),
        "two attempts alive at once: {both_alive:?}"
    );
    assert!(
        live_then.iter().all(|&a| a == 2),
        "only attempt 2 may run once it started: {live_then:?}"
    );
    assert_eq!(
        started["node"], "node-near",
        "replacement on the other node: {started}"
    );
    assert_eq!(lost.len(), 1, "node-cut lost once: {lost:?}");
    assert!(
        seq_of(&lost[0]) < seq_of(&started),
        "lost before replaced: {lost:?}"
    );

    proxy.heal();
    fleet.wait_for_event(
        |e| is_after(e, before) && e["kind"] == "node.returned" && e["node"] == "node-cut",
        TASK_DEADLINE,
    );
    let old_end = fleet.wait_for_event(
        |e| is_after(e, before) && is_event(e, "attempt.exited", task) && attempt_of(e) == 1,
        TASK_DEADLINE,
    );
    let shown = fleet.wait_for_task_state(task, "running", TASK_DEADLINE);
    let running = fleet.task_processes(task);

    assert_eq!(old_end["data"]["replaced"], true, "{old_end}");
    assert_eq!(old_end["node"], "node-cut", "{old_end}");
    assert_eq!(shown["attempt"], 2, "{shown:#}");
    assert_eq!(shown["node"], "node-near", "{shown:#}");
    let new_pid = started["data"]["pid"]
        .as_i64()
        .expect("attempt.started has a pid") as i32;
    assert!(
        running.iter().all(|p| p.attempt == 2) && running.iter().any(|p| p.pid == new_pid),
        "exactly attempt 2 runs, child {new_pid}: {running:?}"
    );
}

#[test]
fn most_nodes_cut_at_once_is_a_controller_partition_that_moves_nothing() {
    let nodes = ["node-1", "node-2", "node-3"];
    let mut fleet = Fleet::start(0, controller_config("60s"));
    let proxy = Proxy::to_url(fleet.url());
    // Nodes of a real fleet heartbeat at unrelated moments; agents started together would
    // share one rhythm. Each starts a third of a heartbeat interval after the one before.
    for node in nodes {
        fleet.start_node_agent_via(node, 4, &proxy.url());
        fleet.wait_for_event(
            |e| e["kind"] == "node.joined" && e["node"] == node,
            TASK_DEADLINE,
        );
        std::thread::sleep(HEARTBEAT_INTERVAL / 3);
    }
    fleet.wait_for_nodes_ready(nodes.len());
    let mut pids = Vec::new();
    for node in nodes {
        let task = format!("on-{node}");
        let placement = format!("[placement]\nlabels = {{ node = \"{node}\" }}");
        fleet.submit_toml(&task, &quiet(&task, &placement));
        pids.push((
            task.clone(),
            fleet.wait_for_attempt_pid(&task, 1, TASK_DEADLINE),
        ));
    }
    let before = last_seq(&fleet);
    let moved = |e: &Value| {
        is_after(e, before)
            && [
                "node.lost",
                "task.restarting",
                "attempt.started",
                "attempt.exited",
            ]
            .contains(&e["kind"].as_str().unwrap_or(""))
    };

    proxy.cut();
    let cut_at = Instant::now();
    // The partition incident must come first: a node.lost before it moved that node's tasks.
    let opened = fleet.wait_for_event(
        |e| {
            is_after(e, before)
                && (e["kind"] == "node.lost"
                    || e["kind"] == "incident.opened"
                        && e["data"]["reason"] == "controller_partition")
        },
        TASK_DEADLINE,
    );
    assert_eq!(
        opened["kind"],
        "incident.opened",
        "a node was declared lost instead of a controller partition: {opened}\ninbox tail:\n{}",
        muster_e2e::inbox::tail(&fleet.read_inbox(), 12)
    );
    // Stay cut well past the node timeout; nothing may be declared lost or moved meanwhile.
    let stay_cut = (NODE_TIMEOUT + Duration::from_secs(4)).saturating_sub(cut_at.elapsed());
    let moved_while_cut = poll_until(stay_cut, || fleet.events(moved).pop());
    proxy.heal();
    fleet.wait_for_event(
        |e| {
            is_after(e, before)
                && e["kind"] == "incident.resolved"
                && e["data"]["incident"] == opened["data"]["incident"]
        },
        TASK_DEADLINE,
    );
    fleet.wait_for_nodes_ready(nodes.len());

    assert_eq!(opened["severity"], "critical", "{opened}");
    assert!(
        opened["task"].as_str().unwrap_or("").is_empty()
            && opened["node"].as_str().unwrap_or("").is_empty(),
        "the partition incident names no task or node: {opened}"
    );
    assert!(
        moved_while_cut.is_none(),
        "moved during the partition: {moved_while_cut:?}"
    );
    let moved_at_all = fleet.events(moved);
    assert!(
        moved_at_all.is_empty(),
        "lost or moved after the cut: {moved_at_all:#?}"
    );
    let partitions = fleet.events(|e| {
        e["kind"] == "incident.opened" && e["data"]["reason"] == "controller_partition"
    });
    assert_eq!(
        partitions.len(),
        1,
        "one partition incident: {partitions:#?}"
    );
    for (task, pid) in &pids {
        let shown = fleet.show(task);
        assert!(pid_alive(*pid), "{task}'s child {pid} still runs");
        assert_eq!(shown["attempt"], 1, "{shown:#}");
        assert_eq!(shown["state"], "running", "{shown:#}");
        assert_eq!(live_attempts(&fleet, task), BTreeSet::from([1]), "{task}");
    }
}

#[test]
fn keep_task_of_a_cut_off_node_is_never_replaced() {
    let keep = "kept";
    let leased = "leased-beside";
    let specs = [
        (keep, reporter(keep, r#"on_disconnect = "keep""#, "")),
        // Uses the controller's 2s lease: its replacement shows the lease has run out.
        (leased, reporter(leased, "", "")),
    ];
    let (fleet, proxy) = start_fleet_with_tasks_on_cut_node("2s", &specs);
    let keep_pid = fleet.wait_for_attempt_pid(keep, 1, TASK_DEADLINE);
    let before = last_seq(&fleet);
    let keep_moved = |e: &Value| {
        is_after(e, before)
            && (e["kind"] == "attempt.started" || e["kind"] == "task.restarting")
            && e["task"] == keep
    };

    proxy.cut();
    let lost = fleet.wait_for_event(
        |e| is_after(e, before) && e["kind"] == "node.lost" && e["node"] == "node-cut",
        TASK_DEADLINE,
    );
    let lost_at = Instant::now();
    fleet.wait_for_event(
        |e| is_after(e, before) && is_event(e, "attempt.started", leased) && attempt_of(e) == 2,
        Duration::from_secs(90),
    );
    // Well past lease + grace + margin after the loss, the keep task must still be alone.
    let window = Duration::from_secs(12).saturating_sub(lost_at.elapsed());
    let violation = poll_until(window, || {
        if !pid_alive(keep_pid) {
            return Some(format!("the kept child {keep_pid} died"));
        }
        fleet.events(keep_moved).pop().map(|e| e.to_string())
    });
    proxy.heal();
    let returned = fleet.wait_for_event(
        |e| is_after(e, before) && e["kind"] == "node.returned" && e["node"] == "node-cut",
        TASK_DEADLINE,
    );
    fleet.wait_for_event(
        |e| seq_of(e) > seq_of(&returned) && is_event(e, "task.report", keep),
        TASK_DEADLINE,
    );
    let shown = wait_until("the kept task to show running", TASK_DEADLINE, || {
        let shown = fleet.show(keep);
        (shown["state"] == "running").then_some(shown)
    });

    assert!(
        violation.is_none(),
        "kept task while node was lost ({lost}): {violation:?}"
    );
    assert!(pid_alive(keep_pid), "the kept child {keep_pid} still runs");
    assert_eq!(shown["attempt"], 1, "{shown:#}");
    assert_eq!(shown["node"], "node-cut", "{shown:#}");
    let running = fleet.task_processes(keep);
    assert!(
        running.iter().all(|p| p.attempt == 1) && running.iter().any(|p| p.pid == keep_pid),
        "only attempt 1 of the kept task runs: {running:?}"
    );
    let moved = fleet.events(keep_moved);
    assert!(moved.is_empty(), "the kept task was moved: {moved:#?}");
    let fenced = &returned["data"]["fenced"];
    assert!(
        fenced
            .as_array()
            .is_none_or(|f| f.iter().all(|a| a["task"] != keep)),
        "the kept task was fenced: {returned}"
    );
}

#[test]
fn event_recorded_before_a_controller_kill_is_not_recorded_again_when_its_ack_was_lost() {
    let task = "exits-once";
    let spec = format!(
        r#"
name = "{task}"
shell = true
command = ["sleep 2; exit 4"]
[restart]
policy = "never"
"#
    );
    let mut fleet = Fleet::start(0, controller_config("60s"));
    let proxy = Proxy::to_url(fleet.url());
    fleet.start_node_agent_via("node-1", 4, &proxy.url());
    fleet.wait_for_nodes_ready(1);
    fleet.submit_toml(task, &spec);
    fleet.wait_for_attempt_pid(task, 1, TASK_DEADLINE);

    // The controller hears the exit and records it, but its ack never reaches the node:
    // the node still holds the event when the controller dies.
    proxy.drop_replies();
    fleet.wait_for_event(|e| is_event(e, "attempt.exited", task), TASK_DEADLINE);
    fleet.kill_controller(nix::sys::signal::Signal::SIGKILL);
    let before = last_seq(&fleet);
    proxy.heal();
    fleet.start_controller();
    fleet.wait_for_event(
        |e| is_after(e, before) && e["kind"] == "node.joined" && e["node"] == "node-1",
        TASK_DEADLINE,
    );
    fleet.wait_for_nodes_ready(1);
    // The node sends again what it holds before it reports a task started after the Hello.
    let after_hello = last_seq(&fleet);
    fleet.submit_toml(
        "marker",
        "name = \"marker\"\ncommand = [\"sleep\", \"60\"]\n",
    );
    fleet.wait_for_event(
        |e| is_after(e, after_hello) && is_event(e, "attempt.started", "marker"),
        TASK_DEADLINE,
    );

    let exits = fleet.events(|e| is_event(e, "attempt.exited", task));
    let ends = fleet.events(|e| is_event(e, "task.failed", task));
    assert_eq!(exits.len(), 1, "the exit is recorded once: {exits:#?}");
    assert_eq!(ends.len(), 1, "the task fails once: {ends:#?}");
}
