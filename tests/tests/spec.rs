//! Task specs at the edges: bad files are refused whole with an error naming the field,
//! the gRPC API refuses the same, and `muster run` hands the child its argv unchanged.

use muster_proto::v1;
use serde_json::Value;

use muster_e2e::{Fleet, FleetOptions, TASK_DEADLINE};

/// A spec file with one error, and the field its error message must name.
struct BadSpec {
    file: &'static str,
    text: &'static str,
    field: &'static str,
}

const BAD_SPECS: &[BadSpec] = &[
    BadSpec {
        file: "unknown-key",
        text: "name = \"colourful\"\ncommand = [\"true\"]\ncolour = \"blue\"\n",
        field: "colour",
    },
    BadSpec {
        file: "unknown-nested-key",
        text: "name = \"nested\"\ncommand = [\"true\"]\n[restart]\npolcy = \"always\"\n",
        field: "polcy",
    },
    BadSpec {
        file: "bad-duration",
        text: "name = \"slow\"\ncommand = [\"true\"]\n[health]\nheartbeat_timeout = \"soon\"\n",
        field: "heartbeat_timeout",
    },
    BadSpec {
        file: "bad-name",
        text: "name = \"Bad Name!\"\ncommand = [\"true\"]\n",
        field: "name",
    },
    BadSpec {
        file: "second-task-bad",
        text: r#"
[[task]]
name = "fine-first"
command = ["true"]

[[task]]
name = "broken-second"
command = ["true"]
[task.stop]
grace = "10 parsecs"
"#,
        field: "grace",
    },
];

#[test]
fn rejected_spec_files_name_the_field_and_submit_nothing() {
    let fleet = Fleet::start(1, FleetOptions::default());

    let problems: Vec<String> = BAD_SPECS
        .iter()
        .flat_map(|bad| submit_problems(&fleet, bad))
        .collect();

    assert!(
        problems.is_empty(),
        "bad spec files:\n{}",
        problems.join("\n")
    );
}

/// Submits a bad spec file and lists every way the outcome differs from the contract:
/// exit 2, one line on stderr naming the field, nothing submitted.
fn submit_problems(fleet: &Fleet, bad: &BadSpec) -> Vec<String> {
    let output = fleet.try_submit_toml(bad.file, bad.text);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut problems = Vec::new();
    if output.status.code() != Some(2) {
        problems.push(format!("{}: exit {} instead of 2", bad.file, output.status));
    }
    if !stderr.contains(bad.field) {
        problems.push(format!(
            "{}: error does not name {}: {stderr}",
            bad.file, bad.field
        ));
    }
    if stderr.trim_end().lines().count() != 1 {
        problems.push(format!("{}: error is not one line:\n{stderr}", bad.file));
    }
    let tasks = fleet.tasks();
    if !tasks.is_empty() {
        problems.push(format!("{}: submitted {tasks:?}", bad.file));
    }
    problems
}

#[test]
fn api_rejects_a_bad_task_naming_the_field_and_submits_nothing() {
    let fleet = Fleet::start(1, FleetOptions::default());
    let good = v1::TaskSpec {
        name: "fine".into(),
        command: vec!["true".into()],
        workdir: "/".into(),
        ..Default::default()
    };
    let bad = v1::TaskSpec {
        name: "Not A Name".into(),
        ..good.clone()
    };

    let status = submit_over_grpc(fleet.url(), vec![good, bad]).expect_err("a bad name");

    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("name"),
        "names the field: {status:?}"
    );
    assert_eq!(fleet.tasks(), Vec::<Value>::new(), "all or nothing");
}

fn submit_over_grpc(url: &str, tasks: Vec<v1::TaskSpec>) -> Result<Vec<String>, tonic::Status> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .expect("the controller URL is a URL")
            .connect()
            .await
            .expect("connecting to the controller");
        let mut client = v1::fleet_service_client::FleetServiceClient::new(channel);
        let response = client
            .submit(v1::SubmitRequest {
                tasks,
                parent: String::new(),
            })
            .await?;
        Ok(response.into_inner().names)
    })
}

#[test]
fn cli_exit_codes_tell_not_found_from_usage() {
    let fleet = Fleet::start(1, FleetOptions::default());
    fleet.submit_toml(
        "once",
        "name = \"once\"\ncommand = [\"sleep\", \"1000\"]\n[stop]\ngrace = \"1s\"\n",
    );

    let missing = fleet.muster(&["show", "no-such-task"]);
    let stop_missing = fleet.muster(&["stop", "no-such-task"]);
    let twice = fleet.try_submit_toml("once-again", "name = \"once\"\ncommand = [\"true\"]\n");

    assert_eq!(missing.status.code(), Some(3), "{missing:?}");
    assert_eq!(stop_missing.status.code(), Some(3), "{stop_missing:?}");
    assert_eq!(
        twice.status.code(),
        Some(2),
        "a duplicate name is refused: {twice:?}"
    );
    assert!(
        String::from_utf8_lossy(&twice.stderr).contains("once"),
        "{twice:?}"
    );
    assert_eq!(fleet.tasks().len(), 1);
}

/// Arguments a shell would mangle, each of which must reach the child byte for byte.
const TRICKY_ARGS: &[&str] = &[
    "two words",
    "say \"hi\" and 'bye'",
    "$HOME",
    "*",
    "; rm -rf /nowhere",
    "back\\slash",
    "",
    "line\nbreak",
    "--",
];

const WRITES_ARGV: &str = "import json, os, sys; \
    open(os.path.join(os.environ['MUSTER_DATA_DIR'], 'argv.json'), 'w')\
    .write(json.dumps(sys.argv[1:]))";

#[test]
fn run_passes_every_argument_unchanged() {
    let fleet = Fleet::start(1, FleetOptions::default());
    let mut args = vec![
        "run",
        "--name",
        "argv",
        "--restart",
        "never",
        "--",
        "python3",
        "-c",
    ];
    args.push(WRITES_ARGV);
    args.extend(TRICKY_ARGS);

    fleet.muster_ok(&args);

    let task = fleet.wait_for_task_state("argv", "succeeded", TASK_DEADLINE);
    let written = std::fs::read_to_string(fleet.task_dir("node-1", "argv").join("data/argv.json"))
        .expect("the child wrote its argv");
    let argv: Vec<String> = serde_json::from_str(&written).expect("argv.json is JSON");
    assert_eq!(argv, TRICKY_ARGS, "argv as the child saw it");
    assert_eq!(task["command"][3], TRICKY_ARGS[0], "{task:#}");
}
