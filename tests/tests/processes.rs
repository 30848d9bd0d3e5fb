//! Stopping a task ends every process it started: grandchildren in their own session, and
//! children that ignore SIGTERM once their grace runs out.

use std::time::{Duration, Instant};

use muster_e2e::{is_event, pid_alive, processes_with_env, Fleet, FleetOptions, TASK_DEADLINE};

/// Starts one grandchild in a session of its own and one in the task's process group,
/// records their pids, reports, and waits.
const SPAWNS_GRANDCHILDREN: &str = r#"
name = "spawner"
shell = true
command = ['''
setsid sleep 1000 &
echo $! > "$MUSTER_DATA_DIR/pids.tmp"
sleep 1000 &
echo $! >> "$MUSTER_DATA_DIR/pids.tmp"
mv "$MUSTER_DATA_DIR/pids.tmp" "$MUSTER_DATA_DIR/pids"
echo '{"state":"running","message":"spawned"}' >> "$MUSTER_STATUS_FILE"
wait
''']
[stop]
grace = "2s"
"#;

/// Reads the attempt key a running process carries.
fn attempt_key(pid: i32) -> String {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("reading environ");
    environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(b"MUSTER_ATTEMPT_KEY="))
        .map(|key| String::from_utf8_lossy(key).into_owned())
        .expect("every attempt process carries MUSTER_ATTEMPT_KEY")
}

#[test]
fn stop_leaves_no_process_behind() {
    let fleet = Fleet::start(1, FleetOptions::default());
    fleet.submit_toml("spawner", SPAWNS_GRANDCHILDREN);
    let main_pid = fleet.wait_for_attempt_pid("spawner", 1, TASK_DEADLINE);
    let pids_file = fleet
        .task_dir("node-1", "spawner")
        .join("data")
        .join("pids");
    let pids: Vec<i32> = fleet
        .wait_for_file(&pids_file, TASK_DEADLINE, |text| text.lines().count() == 2)
        .lines()
        .map(|l| l.trim().parse().expect("a pid per line"))
        .collect();
    assert!(
        pids.iter().all(|&p| pid_alive(p)),
        "grandchildren {pids:?} are running"
    );
    let key = attempt_key(pids[0]);

    fleet.muster_ok(&["stop", "spawner"]);

    fleet.wait_for_event(|e| is_event(e, "task.stopped", "spawner"), TASK_DEADLINE);
    for pid in pids.iter().chain([&main_pid]) {
        assert!(
            !pid_alive(*pid),
            "process {pid} of the stopped task is alive"
        );
    }
    let left = processes_with_env("MUSTER_ATTEMPT_KEY", &key);
    assert!(
        left.is_empty(),
        "processes with attempt key {key} are alive: {left:?}"
    );
    assert_eq!(fleet.show("spawner")["state"], "stopped");
}

const IGNORES_SIGTERM: &str = r#"
name = "stubborn"
shell = true
command = ['''
trap '' TERM
echo '{"state":"running","message":"ignoring SIGTERM"}' >> "$MUSTER_STATUS_FILE"
while true; do sleep 0.2; done
''']
[stop]
grace = "1s"
"#;

#[test]
fn child_ignoring_sigterm_is_killed_after_its_grace() {
    let fleet = Fleet::start(1, FleetOptions::default());
    fleet.submit_toml("stubborn", IGNORES_SIGTERM);
    let pid = fleet.wait_for_attempt_pid("stubborn", 1, TASK_DEADLINE);
    fleet.wait_for_event(
        |e| is_event(e, "task.report", "stubborn") && e["message"] == "ignoring SIGTERM",
        TASK_DEADLINE,
    );
    let key = attempt_key(pid);

    let stop_sent = Instant::now();
    fleet.muster_ok(&["stop", "stubborn"]);
    fleet.wait_for_event(|e| is_event(e, "task.stopped", "stubborn"), TASK_DEADLINE);
    let took = stop_sent.elapsed();

    assert!(
        took >= Duration::from_millis(900),
        "stopped after {took:?}, before its 1s grace ran out"
    );
    assert!(!pid_alive(pid), "the child {pid} survived its grace");
    let left = processes_with_env("MUSTER_ATTEMPT_KEY", &key);
    assert!(
        left.is_empty(),
        "processes with attempt key {key} are alive: {left:?}"
    );
    let exited = fleet
        .events(|e| is_event(e, "attempt.exited", "stubborn"))
        .pop()
        .expect("attempt.exited for the stopped attempt");
    assert_eq!(exited["data"]["signal"], 9, "ended by SIGKILL: {exited}");
}

#[test]
fn node_agent_sigterm_stops_its_tasks_and_exits_0() {
    let mut fleet = Fleet::start(1, FleetOptions::default());
    fleet.submit_toml("spawner", SPAWNS_GRANDCHILDREN);
    let main_pid = fleet.wait_for_attempt_pid("spawner", 1, TASK_DEADLINE);
    let pids_file = fleet
        .task_dir("node-1", "spawner")
        .join("data")
        .join("pids");
    fleet.wait_for_file(&pids_file, TASK_DEADLINE, |text| text.lines().count() == 2);
    let key = attempt_key(main_pid);

    let status = fleet.kill_node_agent("node-1", nix::sys::signal::Signal::SIGTERM);

    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM exits 0: {status:?}"
    );
    let left = processes_with_env("MUSTER_ATTEMPT_KEY", &key);
    assert!(
        left.is_empty(),
        "the agent left its task's processes: {left:?}"
    );
}

#[test]
fn task_user_gets_its_uid_and_supplementary_groups() {
    let Some(expected) = command_output("id", &["-G", "nobody"]) else {
        return; // no `nobody` user on this machine: nothing to check
    };
    if command_output("id", &["-u"]).as_deref() != Some("0") {
        return; // switching users needs a root agent
    }
    let uid = command_output("id", &["-u", "nobody"]).expect("nobody has a uid");
    let fleet = Fleet::start(1, FleetOptions::default());
    let spec = r#"
name = "as-nobody"
shell = true
user = "nobody"
command = ['echo "$(id -u) $(id -G) $USER" > "$MUSTER_DATA_DIR/who"; echo "{\"state\":\"done\"}" >> "$MUSTER_STATUS_FILE"']
[restart]
policy = "never"
"#;

    fleet.submit_toml("as-nobody", spec);
    fleet.wait_for_task_state("as-nobody", "succeeded", TASK_DEADLINE);

    let who = std::fs::read_to_string(fleet.task_dir("node-1", "as-nobody").join("data/who"))
        .expect("the task wrote who it ran as");
    assert_eq!(
        who.trim(),
        format!("{uid} {expected} nobody"),
        "uid, groups (as `id -G nobody` lists them) and USER"
    );
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn environment_reaches_the_child_byte_for_byte() {
    let fleet = Fleet::start(1, FleetOptions::default());
    let value = r#"a "quoted" $HOME `cmd` 'single' \back tab	end"#;
    let spec = format!(
        r#"
name = "env-check"
command = ["python3", "-c", "import os; open(os.path.join(os.environ['MUSTER_DATA_DIR'], 'v'), 'w').write(os.environ['ODD'])"]
env = {{ ODD = {value:?} }}
[restart]
policy = "never"
"#
    );

    fleet.submit_toml("env-check", &spec);
    fleet.wait_for_task_state("env-check", "succeeded", TASK_DEADLINE);

    let got = std::fs::read_to_string(fleet.task_dir("node-1", "env-check").join("data/v"))
        .expect("the child wrote the value");
    assert_eq!(got, value, "no shell, no interpolation");
}

#[test]
fn a_node_flooded_with_output_and_cpu_work_is_not_declared_lost() {
    let fleet = Fleet::start(1, FleetOptions::default());
    // Two children: one writes as fast as it can, one burns CPU; the machine has two cores.
    let spec = r#"
[[task]]
name = "flood"
command = ["sh", "-c", "timeout 8 yes 'a line of output that goes on and on' || true"]
[task.restart]
policy = "never"
[[task]]
name = "burn"
command = ["sh", "-c", "timeout 8 sh -c 'while :; do :; done' || true"]
[task.restart]
policy = "never"
"#;

    fleet.submit_toml("load", spec);
    fleet.wait_for_task_state("flood", "succeeded", TASK_DEADLINE);
    fleet.wait_for_task_state("burn", "succeeded", TASK_DEADLINE);

    let lost = fleet.events(|e| e["kind"] == "node.lost");
    assert!(
        lost.is_empty(),
        "the loaded node kept its heartbeats: {lost:?}"
    );
    let stdout = std::fs::metadata(fleet.task_dir("node-1", "flood").join("stdout.log"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(stdout > 0, "the flood was drained into its log");
}
