//! `muster run`: a submit request for one task, built from command-line flags.

use std::path::PathBuf;

use muster_proto::v1;

use crate::client::Failure;
use crate::pairs;

/// The keys `--limit` takes, as the `[limits]` table of a task file names them.
const LIMIT_KEYS: &str =
    "max_children, max_depth, max_descendants, max_running, budget, max_restarts, restart_window";

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[arg(long)]
    name: String,
    /// Working directory (default: the current one).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Environment variable, KEY=VALUE (repeatable).
    #[arg(long = "env")]
    env: Vec<String>,
    /// Task label, key=value (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Node label the task needs, key=value (repeatable).
    #[arg(long = "node-label")]
    node_labels: Vec<String>,
    #[arg(long)]
    slots: Option<u32>,
    /// always, on-failure or never.
    #[arg(long)]
    restart: Option<String>,
    #[arg(long)]
    max_restarts: Option<u32>,
    #[arg(long)]
    backoff_initial: Option<String>,
    #[arg(long)]
    backoff_max: Option<String>,
    #[arg(long)]
    heartbeat_timeout: Option<String>,
    /// When the node loses the controller: "keep" running, or stop after this duration.
    #[arg(long)]
    on_disconnect: Option<String>,
    /// Run as this user (the node agent must run as root).
    #[arg(long)]
    user: Option<String>,
    /// Stop grace before SIGKILL.
    #[arg(long)]
    grace: Option<String>,
    /// Make the task a child of this task (inside a task, the controller makes it a child
    /// of that task by its token).
    #[arg(long, value_name = "TASK")]
    parent: Option<String>,
    /// When the parent ends: stop this task too (the default), or keep it running.
    #[arg(long, value_parser = ["stop", "keep"])]
    parent_close: Option<String>,
    /// A bound on this task's subtree, KEY=VALUE (repeatable); KEY is max_children,
    /// max_depth, max_descendants, max_running, budget, max_restarts or restart_window.
    #[arg(long = "limit", value_name = "KEY=VALUE")]
    limits: Vec<String>,
    /// How long the parent has to acknowledge an incident of this task before people are
    /// told ("0s": at once).
    #[arg(long, value_name = "DUR")]
    parent_timeout: Option<String>,
    /// Run the command through sh -c.
    #[arg(long)]
    shell: bool,
    #[arg(long)]
    pub json: bool,
    /// The command and its arguments, after --.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// The request `muster run` sends. Without `--parent` the parent is left to the controller,
/// which takes it from the caller's token; `$MUSTER_TASK` is never read for it.
pub fn request(args: RunArgs) -> Result<v1::SubmitRequest, Failure> {
    let parent = args.parent.clone().unwrap_or_default();
    Ok(v1::SubmitRequest {
        tasks: vec![spec(args)?],
        parent,
    })
}

fn spec(args: RunArgs) -> Result<v1::TaskSpec, Failure> {
    let workdir = match args.workdir {
        Some(dir) => std::path::absolute(&dir)
            .map_err(|e| Failure::usage(format!("--workdir {}: {e}", dir.display())))?,
        None => std::env::current_dir()
            .map_err(|e| Failure::failed(format!("current directory: {e}")))?,
    };
    let restart = (args.restart.is_some()
        || args.max_restarts.is_some()
        || args.backoff_initial.is_some()
        || args.backoff_max.is_some())
    .then(|| v1::RestartSpec {
        policy: args.restart.unwrap_or_default(),
        backoff_initial: args.backoff_initial.unwrap_or_default(),
        backoff_max: args.backoff_max.unwrap_or_default(),
        max_restarts: args.max_restarts,
        window: String::new(),
    });
    let escalation = args
        .parent_timeout
        .map(|timeout| {
            duration("--parent-timeout", &timeout)?;
            Ok::<_, Failure>(v1::EscalationSpec {
                parent_timeout: timeout,
                ..Default::default()
            })
        })
        .transpose()?;
    let spec = v1::TaskSpec {
        name: args.name,
        command: args.command,
        shell: args.shell,
        workdir: workdir.to_string_lossy().into_owned(),
        env: pairs("--env", &args.env)?,
        labels: pairs("--label", &args.labels)?,
        resources: args.slots.map(|slots| v1::Resources {
            slots,
            ..Default::default()
        }),
        placement: (!args.node_labels.is_empty())
            .then(|| {
                Ok::<_, Failure>(v1::Placement {
                    labels: pairs("--node-label", &args.node_labels)?,
                })
            })
            .transpose()?,
        restart,
        health: args.heartbeat_timeout.map(|t| v1::HealthSpec {
            heartbeat_timeout: t,
            ..Default::default()
        }),
        stop: args.grace.map(|grace| v1::StopSpec { grace }),
        escalation,
        on_disconnect: args.on_disconnect.unwrap_or_default(),
        user: args.user.unwrap_or_default(),
        parent_close: args.parent_close.unwrap_or_default(),
        limits: subtree_limits(&args.limits)?,
    };
    muster_proto::spec::validate(&spec).map_err(|errors| {
        Failure::usage(
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    Ok(spec)
}

/// The `--limit KEY=VALUE` flags as subtree limits; none given, no limits sent.
fn subtree_limits(items: &[String]) -> Result<Option<v1::SubtreeLimits>, Failure> {
    if items.is_empty() {
        return Ok(None);
    }
    let mut limits = v1::SubtreeLimits::default();
    let mut seen = Vec::new();
    for item in items {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| Failure::usage(format!("--limit {item:?} is not KEY=VALUE")))?;
        // A second value for a key would silently win; say so instead.
        if seen.contains(&key) {
            return Err(Failure::usage(format!("--limit {key} is given twice")));
        }
        seen.push(key);
        let flag = format!("--limit {key}");
        match key {
            "max_children" => limits.max_children = Some(count(&flag, value)?),
            "max_depth" => limits.max_depth = Some(count(&flag, value)?),
            "max_descendants" => limits.max_descendants = Some(count(&flag, value)?),
            "max_running" => limits.max_running = Some(count(&flag, value)?),
            "max_restarts" => limits.max_restarts = Some(count(&flag, value)?),
            "budget" => limits.budget = duration(&flag, value)?,
            "restart_window" => limits.restart_window = duration(&flag, value)?,
            _ => {
                return Err(Failure::usage(format!(
                    "--limit {key:?} is not a limit; expected one of {LIMIT_KEYS}"
                )))
            }
        }
    }
    Ok(Some(limits))
}

fn count(flag: &str, value: &str) -> Result<u32, Failure> {
    value
        .parse()
        .map_err(|_| Failure::usage(format!("{flag}: {value:?} is not a whole number")))
}

/// A duration flag, checked here so that the error names the flag.
fn duration(flag: &str, value: &str) -> Result<String, Failure> {
    muster_proto::duration::parse(value).map_err(|e| Failure::usage(format!("{flag}: {e}")))?;
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cmd {
        #[command(flatten)]
        run: RunArgs,
    }

    fn run(flags: &[&str]) -> Result<v1::SubmitRequest, Failure> {
        let argv = ["run", "--name", "child", "--workdir", "/tmp"]
            .iter()
            .chain(flags)
            .chain(&["--", "sleep", "60"]);
        request(Cmd::try_parse_from(argv).expect("flags parse").run)
    }

    fn limits(flags: &[&str]) -> Result<Option<v1::SubtreeLimits>, Failure> {
        let items: Vec<String> = flags.iter().map(ToString::to_string).collect();
        subtree_limits(&items)
    }

    #[test]
    fn every_limit_key_fills_its_field() {
        let limits = limits(&[
            "max_children=4",
            "max_depth=2",
            "max_descendants=100",
            "max_running=10",
            "budget=2h",
            "max_restarts=5",
            "restart_window=10m",
        ]);

        let limits = limits.expect("valid limits").expect("limits given");
        assert_eq!(limits.max_children, Some(4));
        assert_eq!(limits.max_depth, Some(2));
        assert_eq!(limits.max_descendants, Some(100));
        assert_eq!(limits.max_running, Some(10));
        assert_eq!(limits.budget, "2h");
        assert_eq!(limits.max_restarts, Some(5));
        assert_eq!(limits.restart_window, "10m");
    }

    #[test]
    fn no_limit_flag_sends_no_limits() {
        assert_eq!(limits(&[]).expect("nothing to reject"), None);
    }

    #[test]
    fn a_bad_limit_is_a_usage_error_naming_the_key() {
        for (flag, names) in [
            ("max_kids=3", "max_kids"),
            ("max_depth=two", "max_depth"),
            ("max_running=-1", "max_running"),
            ("budget=forever", "budget"),
            ("restart_window=", "restart_window"),
            ("max_children", "max_children"),
        ] {
            let failure = limits(&[flag]).expect_err(flag);

            assert_eq!(failure.code, Failure::USAGE, "{flag}");
            assert!(
                failure.message.contains(names),
                "{flag}: {}",
                failure.message
            );
        }
        let twice = limits(&["max_depth=1", "max_depth=2"]).expect_err("a key twice");
        assert!(twice.message.contains("twice"), "{}", twice.message);
    }

    #[test]
    fn parent_flags_reach_the_request_and_the_spec() {
        let request = run(&[
            "--parent",
            "boss",
            "--parent-close",
            "keep",
            "--parent-timeout",
            "5m",
            "--limit",
            "max_children=3",
        ])
        .expect("a valid run");

        assert_eq!(request.parent, "boss");
        let spec = &request.tasks[0];
        assert_eq!(spec.parent_close, "keep");
        let escalation = spec.escalation.as_ref().expect("escalation set");
        assert_eq!(escalation.parent_timeout, "5m");
        let limits = spec.limits.as_ref().expect("limits set");
        assert_eq!(limits.max_children, Some(3));
    }

    #[test]
    fn without_parent_flags_nothing_is_invented() {
        let request = run(&[]).expect("a valid run");

        assert_eq!(
            request.parent, "",
            "the controller takes the parent from the token"
        );
        let spec = &request.tasks[0];
        assert_eq!(spec.parent_close, "");
        assert!(spec.limits.is_none() && spec.escalation.is_none());
    }

    #[test]
    fn parent_close_takes_only_stop_or_keep() {
        let argv = [
            "run",
            "--name",
            "c",
            "--parent-close",
            "later",
            "--",
            "true",
        ];

        let error = Cmd::try_parse_from(argv).expect_err("not stop or keep");

        assert_eq!(error.kind(), clap::error::ErrorKind::InvalidValue);
    }

    #[test]
    fn a_bad_parent_timeout_names_the_flag() {
        let failure = run(&["--parent-timeout", "soon"]).expect_err("not a duration");

        assert_eq!(failure.code, Failure::USAGE);
        assert!(
            failure.message.contains("--parent-timeout"),
            "{}",
            failure.message
        );
    }
}
