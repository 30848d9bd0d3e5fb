//! `muster`: the operator command line, the local fleet launcher and the child's reporter.

// Unsafe code is denied except for the one `pre_exec` in `up`, which says why.
#![deny(unsafe_code)]

mod certs;
mod client;
mod output;
mod report;
mod rules;
mod run;
mod tree;
mod up;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_stream::StreamExt;

use muster_proto::v1;

use crate::client::Failure;

#[derive(Debug, Parser)]
#[command(
    name = "muster",
    version,
    about = "Keep a fleet of long-running agents alive",
    propagate_version = true
)]
struct Cli {
    /// Controller URL (default: $MUSTER_CONTROLLER, then the local `muster up` fleet).
    #[arg(long, global = true, env = "MUSTER_CONTROLLER")]
    controller: Option<String>,
    /// Data dir of the local fleet, where `muster up` keeps state and logs.
    #[arg(long, global = true, default_value = "./.muster")]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a local fleet (controller and node agents) and run an example.
    Up {
        /// Number of node agents.
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Slots per node agent.
        #[arg(long, default_value_t = 4)]
        slots: u32,
        /// Example to run, from examples/NAME/sweep.toml.
        #[arg(long, default_value = "ml-sweep", conflicts_with = "no_example")]
        example: String,
        /// Start the fleet without submitting an example.
        #[arg(long)]
        no_example: bool,
        /// Exit 0 once every submitted task, and every task it started, has settled (final
        /// state or crash_loop); with --no-example, every task of the fleet.
        #[arg(long)]
        exit_when_done: bool,
        /// Run the fleet with mTLS (a development CA and certificates in DATA_DIR/certs).
        #[arg(long)]
        tls: bool,
    },
    /// Submit a task or sweep file (TOML); nothing is submitted if any task has an error.
    Submit {
        file: PathBuf,
        /// Make the tasks children of this task.
        #[arg(long, value_name = "TASK")]
        parent: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run a command as a task: muster run --name NAME [options] -- CMD ARGS...
    Run(Box<run::RunArgs>),
    /// List tasks.
    Ls {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        node: Option<String>,
        /// Only tasks with this label, key=value (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Only the direct children of this task.
        #[arg(long)]
        parent: Option<String>,
        /// Only the tasks of the tree whose root is this task.
        #[arg(long)]
        root: Option<String>,
        /// Only this task and all its descendants.
        #[arg(long, value_name = "TASK")]
        subtree: Option<String>,
        #[arg(long)]
        json: bool,
        /// Redraw every 2 seconds until Ctrl-C.
        #[arg(long, short)]
        watch: bool,
    },
    /// Draw tasks as the tree of who started whom, with counts per subtree.
    Tree {
        /// Only this task and its descendants (default: every task).
        task: Option<String>,
        #[arg(long)]
        json: bool,
        /// Redraw every 2 seconds until Ctrl-C.
        #[arg(long, short)]
        watch: bool,
    },
    /// Show one task with its attempts.
    Show {
        task: String,
        #[arg(long)]
        json: bool,
    },
    /// List nodes.
    Nodes {
        #[arg(long)]
        json: bool,
        /// Redraw every 2 seconds until Ctrl-C.
        #[arg(long, short)]
        watch: bool,
    },
    /// Print a task's output.
    Logs {
        task: String,
        /// Keep printing new output.
        #[arg(long, short)]
        follow: bool,
        /// Show stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// Bytes from the end to start with.
        #[arg(long, default_value_t = 16384)]
        tail: u64,
    },
    /// Stop a task and its whole subtree (`keep` children too).
    Stop {
        task: String,
        #[arg(long)]
        json: bool,
    },
    /// Restart a task and every task below it (ended ones are placed again).
    Restart {
        task: String,
        #[arg(long)]
        json: bool,
    },
    /// Send a signal to a task's running process group: muster signal TASK USR1
    Signal {
        task: String,
        /// A name (TERM, HUP, USR1, ...) or a number.
        signal: String,
        #[arg(long)]
        json: bool,
    },
    /// Place no new task on a node.
    Cordon {
        node: String,
        #[arg(long)]
        json: bool,
    },
    /// Let tasks be placed on a cordoned node again.
    Uncordon {
        node: String,
        #[arg(long)]
        json: bool,
    },
    /// Cordon a node and move its tasks elsewhere.
    Drain {
        node: String,
        #[arg(long)]
        json: bool,
    },
    /// Read the inbox: every event the controller recorded.
    Inbox {
        /// Keep printing new events.
        #[arg(long, short)]
        follow: bool,
        /// First sequence number (default: the last 50 events).
        #[arg(long)]
        since: Option<u64>,
        #[arg(long)]
        task: Option<String>,
        /// Only events about this task and all its descendants.
        #[arg(long, value_name = "TASK")]
        subtree: Option<String>,
        /// Event kind, or a prefix such as "task" or "incident".
        #[arg(long)]
        kind: Option<String>,
        /// Inbox lines as JSON, one per line.
        #[arg(long)]
        json: bool,
    },
    /// List open incidents.
    Incidents {
        /// Include resolved incidents.
        #[arg(long)]
        all: bool,
        /// Only incidents of this task and all its descendants.
        #[arg(long, value_name = "TASK")]
        subtree: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Acknowledge an incident: stops reminders and holds the task's automatic restarts.
    Ack {
        id: u64,
        /// Take the acknowledgement back.
        #[arg(long)]
        undo: bool,
        #[arg(long)]
        json: bool,
    },
    /// Resolve an incident by hand.
    Resolve {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Health rules.
    #[command(subcommand)]
    Rules(RulesCmd),
    /// Print a shell completion script: muster completions bash > /etc/bash_completion.d/muster
    Completions { shell: clap_complete::Shell },
    /// Development certificates for mTLS.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Inside a task: append a status line to $MUSTER_STATUS_FILE.
    Report {
        /// starting, running, blocked, needs_help, done or failed.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        message: Option<String>,
        /// A metric, key=value (repeatable).
        #[arg(long = "metric")]
        metrics: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Make a development CA (DIR/ca.pem, DIR/ca-key.pem).
    Init {
        /// Default: DATA_DIR/certs.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Issue a certificate signed by the CA.
    #[command(group(clap::ArgGroup::new("subject").required(true).args(["node", "controller", "operator"])))]
    Issue {
        /// For a node agent: its identity is node:NAME.
        #[arg(long)]
        node: Option<String>,
        /// For the controller, valid for HOST, localhost and 127.0.0.1.
        #[arg(long)]
        controller: Option<String>,
        /// For an operator: identity ROLE:NAME.
        #[arg(long)]
        operator: Option<String>,
        /// The operator's role: viewer, operator or admin.
        #[arg(long, default_value = "operator")]
        role: String,
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Make a new random token; prints it once, and the config entry that holds its hash.
    New {
        #[arg(long)]
        name: String,
        /// viewer, operator, admin or node.
        #[arg(long)]
        role: String,
    },
}

#[derive(Debug, Subcommand)]
enum RulesCmd {
    /// Validate the rules of a task or sweep file and say what each would do.
    Check {
        file: PathBuf,
        /// Also say which rule this output line triggers.
        #[arg(long)]
        line: Option<String>,
        /// Also say which rule this exit code triggers.
        #[arg(long)]
        exit_code: Option<i32>,
        /// Also say which rule death by this signal number triggers.
        #[arg(long)]
        signal: Option<i32>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("muster: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let _ = client::CERTS_DIR.set(cli.data_dir.join("certs"));
    let connect = || async {
        client::connect(&client::resolve(cli.controller.as_deref(), &cli.data_dir)?).await
    };
    let (controller, data_dir) = (cli.controller.clone(), cli.data_dir.clone());
    let streaming = |follow: bool| async move {
        let url = client::resolve(controller.as_deref(), &data_dir)?;
        if follow {
            client::connect_streaming(&url).await
        } else {
            client::connect(&url).await
        }
    };
    match cli.command {
        Cmd::Up {
            nodes,
            slots,
            example,
            no_example,
            exit_when_done,
            tls,
        } => {
            if nodes == 0 || slots == 0 {
                return Err(Failure::usage("--nodes and --slots must be at least 1"));
            }
            let example = (!no_example).then_some(example);
            up::run(up::UpArgs {
                data_dir: cli.data_dir.clone(),
                nodes,
                slots,
                example,
                exit_when_done,
                tls,
            })
            .await
        }
        Cmd::Report {
            state,
            message,
            metrics,
        } => report::run(state, message, metrics),
        Cmd::Submit { file, parent, json } => {
            let specs = load_specs(&file)?;
            let names = connect()
                .await?
                .submit(v1::SubmitRequest {
                    tasks: specs,
                    parent: parent.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .names;
            if json {
                print_json(&serde_json::json!({ "submitted": names }));
            } else {
                println!(
                    "submitted {} task{}: {}",
                    names.len(),
                    if names.len() == 1 { "" } else { "s" },
                    names.join(", ")
                );
            }
            Ok(())
        }
        Cmd::Run(args) => {
            let json = args.json;
            let request = run::request(*args)?;
            let names = connect().await?.submit(request).await?.into_inner().names;
            if json {
                print_json(&serde_json::json!({ "submitted": names }));
            } else {
                println!("submitted {}", names.join(", "));
            }
            Ok(())
        }
        Cmd::Ls {
            state,
            node,
            labels,
            parent,
            root,
            subtree,
            json,
            watch,
        } => {
            let filter = v1::ListTasksRequest {
                state: state.unwrap_or_default(),
                node: node.unwrap_or_default(),
                labels: pairs("--label", &labels)?,
                parent: parent.unwrap_or_default(),
                root: root.unwrap_or_default(),
                subtree: subtree.unwrap_or_default(),
                ..Default::default()
            };
            let client = connect().await?;
            repeat(watch, || {
                let (mut client, filter) = (client.clone(), filter.clone());
                async move {
                    let tasks = list_tasks(&mut client, filter).await?;
                    Ok(if json {
                        serde_json::to_string_pretty(&serde_json::Value::Array(
                            tasks.iter().map(output::task_json).collect(),
                        ))
                        .expect("JSON values serialize")
                            + "\n"
                    } else {
                        output::tasks_table(&tasks, terminal_width())
                    })
                }
            })
            .await
        }
        Cmd::Tree { task, json, watch } => {
            let client = connect().await?;
            repeat(watch, || {
                let (mut client, task) = (client.clone(), task.clone());
                async move {
                    let filter = v1::ListTasksRequest {
                        subtree: task.clone().unwrap_or_default(),
                        ..Default::default()
                    };
                    let mut forest = tree::forest(list_tasks(&mut client, filter).await?);
                    if let Some(name) = task {
                        // Picked out here too, so a controller that ignores `subtree`
                        // still draws only the asked-for tree.
                        let top = tree::subtree(forest, &name).ok_or_else(|| {
                            Failure::new(Failure::NOT_FOUND, format!("task {name} not found"))
                        })?;
                        forest = vec![top];
                    }
                    Ok(if json {
                        serde_json::to_string_pretty(&tree::json(&forest))
                            .expect("JSON values serialize")
                            + "\n"
                    } else {
                        tree::render(&forest, output::use_color())
                    })
                }
            })
            .await
        }
        Cmd::Show { task, json } => {
            let task = connect()
                .await?
                .get_task(v1::GetTaskRequest { name: task })
                .await?
                .into_inner();
            if json {
                print_json(&output::task_json(&task));
            } else {
                print!("{}", output::show_task(&task));
            }
            Ok(())
        }
        Cmd::Nodes { json, watch } => {
            let client = connect().await?;
            repeat(watch, || {
                let mut client = client.clone();
                async move {
                    let nodes = client
                        .list_nodes(v1::ListNodesRequest {})
                        .await?
                        .into_inner()
                        .nodes;
                    Ok(if json {
                        serde_json::to_string_pretty(&serde_json::Value::Array(
                            nodes.iter().map(output::node_json).collect(),
                        ))
                        .expect("JSON values serialize")
                            + "\n"
                    } else {
                        output::nodes_table(&nodes)
                    })
                }
            })
            .await
        }
        Cmd::Logs {
            task,
            follow,
            stderr,
            tail,
        } => {
            let request = v1::TailLogsRequest {
                task,
                stream: if stderr { "stderr" } else { "stdout" }.into(),
                tail_bytes: tail.max(1),
                follow,
            };
            let mut stream = streaming(follow)
                .await?
                .tail_logs(request)
                .await?
                .into_inner();
            let mut stdout = std::io::stdout();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                if stdout
                    .write_all(&chunk.data)
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    break;
                }
            }
            Ok(())
        }
        Cmd::Stop { task, json } => {
            let task = connect()
                .await?
                .stop_task(v1::StopTaskRequest { name: task })
                .await?
                .into_inner()
                .task
                .unwrap_or_default();
            print_task_result(&task, json, "stop");
            Ok(())
        }
        Cmd::Restart { task, json } => {
            let task = connect()
                .await?
                .restart_task(v1::RestartTaskRequest { name: task })
                .await?
                .into_inner()
                .task
                .unwrap_or_default();
            print_task_result(&task, json, "restart");
            Ok(())
        }
        Cmd::Inbox {
            follow,
            since,
            task,
            subtree,
            kind,
            json,
        } => {
            let url = client::resolve(cli.controller.as_deref(), &cli.data_dir)?;
            let filter = InboxFilter {
                task: task.unwrap_or_default(),
                kind: kind.unwrap_or_default(),
                subtree: subtree.unwrap_or_default(),
            };
            inbox(&url, follow, since, filter, json).await
        }
        Cmd::Incidents { all, subtree, json } => {
            let incidents = connect()
                .await?
                .list_incidents(v1::ListIncidentsRequest {
                    all,
                    subtree: subtree.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .incidents;
            if json {
                print_json(&serde_json::Value::Array(
                    incidents.iter().map(output::incident_json).collect(),
                ));
            } else {
                let rows: Vec<Vec<String>> = incidents
                    .iter()
                    .map(|i| {
                        let subject = if i.task.is_empty() {
                            i.node.clone()
                        } else {
                            i.task.clone()
                        };
                        vec![
                            i.id.to_string(),
                            i.state.clone(),
                            i.severity.clone(),
                            i.reason.clone(),
                            subject,
                            output::ago(i.opened_ms),
                            i.message.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    output::table(
                        &["ID", "STATE", "SEVERITY", "REASON", "SUBJECT", "OPENED", "MESSAGE"],
                        &rows
                    )
                );
            }
            Ok(())
        }
        Cmd::Ack { id, undo, json } => {
            let incident = connect()
                .await?
                .ack_incident(v1::AckIncidentRequest { id, undo })
                .await?
                .into_inner();
            print_incident(&incident, json);
            Ok(())
        }
        Cmd::Resolve { id, json } => {
            let incident = connect()
                .await?
                .resolve_incident(v1::ResolveIncidentRequest { id })
                .await?
                .into_inner();
            print_incident(&incident, json);
            Ok(())
        }
        Cmd::Signal { task, signal, json } => {
            let task = connect()
                .await?
                .signal_task(v1::SignalTaskRequest { name: task, signal })
                .await?
                .into_inner();
            print_task_result(&task, json, "signal");
            Ok(())
        }
        Cmd::Cordon { node, json } => node_verb(connect().await?, node, json, "cordon").await,
        Cmd::Uncordon { node, json } => node_verb(connect().await?, node, json, "uncordon").await,
        Cmd::Drain { node, json } => node_verb(connect().await?, node, json, "drain").await,
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "muster",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Cmd::Certs(CertsCmd::Init { dir }) => {
            certs::init(&dir.unwrap_or_else(|| cli.data_dir.join("certs")))
        }
        Cmd::Certs(CertsCmd::Issue {
            node,
            controller,
            operator,
            role,
            dir,
        }) => {
            let dir = dir.unwrap_or_else(|| cli.data_dir.join("certs"));
            let subject = match (node, controller, operator) {
                (Some(name), _, _) => {
                    muster_proto::spec::check_name(&name)
                        .map_err(|p| Failure::usage(format!("--node {p}")))?;
                    certs::Subject::Node(name)
                }
                (_, Some(host), _) if host.contains("://") => {
                    return Err(Failure::usage(format!(
                        "certs issue --controller takes the controller's host name, not a URL ({host}); the global --controller does not apply to certs"
                    )));
                }
                (_, Some(host), _) => certs::Subject::Controller(host),
                (_, _, Some(name)) => {
                    if !["viewer", "operator", "admin"].contains(&role.as_str()) {
                        return Err(Failure::usage(format!(
                            "--role {role:?} is not viewer, operator or admin"
                        )));
                    }
                    certs::Subject::Operator { role, name }
                }
                _ => unreachable!("clap requires one subject"),
            };
            certs::issue(&dir, subject).map(|_| ())
        }
        Cmd::Token(TokenCmd::New { name, role }) => {
            if !["viewer", "operator", "admin", "node"].contains(&role.as_str()) {
                return Err(Failure::usage(format!(
                    "--role {role:?} is not viewer, operator, admin or node"
                )));
            }
            if name.is_empty() || name.chars().any(|c| c.is_control() || c == '"') {
                return Err(Failure::usage(
                    "--name must be non-empty, without quotes or control characters",
                ));
            }
            let token: String = (0..32)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect();
            let hash: String = <sha2::Sha256 as sha2::Digest>::digest(token.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            println!("token (shown once; give it as MUSTER_TOKEN, or --token for a node agent):\n{token}\n");
            println!("add to the controller config:\n[[auth.tokens]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{hash}\"");
            Ok(())
        }
        Cmd::Rules(RulesCmd::Check {
            file,
            line,
            exit_code,
            signal,
        }) => rules::check(&file, line.as_deref(), exit_code, signal),
    }
}

async fn node_verb(
    mut client: client::Client,
    name: String,
    json: bool,
    verb: &str,
) -> Result<(), Failure> {
    let request_name = name.clone();
    let mut node = match verb {
        "drain" => {
            client
                .drain_node(v1::DrainNodeRequest { name: request_name })
                .await?
        }
        "uncordon" => {
            client
                .cordon_node(v1::CordonNodeRequest {
                    name: request_name,
                    undo: true,
                })
                .await?
        }
        _ => {
            client
                .cordon_node(v1::CordonNodeRequest {
                    name: request_name,
                    undo: false,
                })
                .await?
        }
    }
    .into_inner();
    if verb == "drain" && node.tasks > 0 {
        node = wait_drained(&mut client, &name, node.tasks).await?;
    }
    if json {
        print_json(&output::node_json(&node));
    } else {
        println!(
            "node {}: {verb} done; state now {} with {} tasks",
            node.name, node.state, node.tasks
        );
    }
    Ok(())
}

/// Shows a drain's progress until the node holds no task (Ctrl-C leaves it draining).
async fn wait_drained(
    client: &mut client::Client,
    name: &str,
    total: u32,
) -> Result<v1::Node, Failure> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut shown = u32::MAX;
    loop {
        let nodes = client
            .list_nodes(v1::ListNodesRequest {})
            .await?
            .into_inner()
            .nodes;
        let node = nodes
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| Failure::new(Failure::NOT_FOUND, format!("node {name} is gone")))?;
        if node.tasks != shown {
            shown = node.tasks;
            let moved = total.saturating_sub(node.tasks);
            if tty {
                eprint!("\rdraining {name}: {moved}/{total} tasks moved ");
            } else {
                eprintln!("draining {name}: {moved}/{total} tasks moved");
            }
        }
        if node.tasks == 0 {
            if tty {
                eprintln!();
            }
            return Ok(node);
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(node),
        }
    }
}

/// Prints what `render` returns once, or (with `watch`) every 2 seconds until Ctrl-C,
/// redrawing in place on a terminal.
async fn repeat<F, Fut>(watch: bool, render: F) -> Result<(), Failure>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<String, Failure>>,
{
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let text = match render().await {
            Ok(text) => text,
            // Watching rides out a controller restart; a single look reports the failure.
            Err(e) if watch => format!("muster: {} (retrying)\n", e.message),
            Err(e) => return Err(e),
        };
        let mut stdout = std::io::stdout();
        if watch && tty {
            let _ = write!(stdout, "\x1b[H\x1b[2J");
        }
        let _ = stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush());
        if !watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(200)
}

fn print_incident(incident: &v1::Incident, json: bool) {
    if json {
        print_json(&output::incident_json(incident));
    } else {
        println!("incident {} {}", incident.id, incident.state);
    }
}

fn print_task_result(task: &v1::Task, json: bool, verb: &str) {
    if json {
        print_json(&output::task_json(task));
    } else {
        let name = task.spec.as_ref().map_or("", |s| s.name.as_str());
        println!("{name}: {verb} requested; state now {}", task.state);
    }
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialize")
    );
}

/// Which inbox events `muster inbox` shows; an empty field does not filter.
struct InboxFilter {
    task: String,
    kind: String,
    subtree: String,
}

impl InboxFilter {
    fn is_empty(&self) -> bool {
        self.task.is_empty() && self.kind.is_empty() && self.subtree.is_empty()
    }

    fn read(&self, from_seq: u64, limit: u32) -> v1::ReadInboxRequest {
        v1::ReadInboxRequest {
            from_seq,
            limit,
            task: self.task.clone(),
            kind: self.kind.clone(),
            subtree: self.subtree.clone(),
        }
    }

    fn watch(&self, from_seq: u64) -> v1::WatchRequest {
        v1::WatchRequest {
            from_seq,
            task: self.task.clone(),
            kind: self.kind.clone(),
            subtree: self.subtree.clone(),
        }
    }
}

async fn inbox(
    url: &str,
    follow: bool,
    since: Option<u64>,
    filter: InboxFilter,
    json: bool,
) -> Result<(), Failure> {
    let print = |e: &v1::Event| {
        let line = if json {
            output::event_json(e).to_string()
        } else {
            output::event_line(e)
        };
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_ok()
    };
    if let (true, Some(seq)) = (follow, since) {
        // Straight to the stream, which keeps trying while the controller is away.
        return follow_inbox(url, seq, &filter, print).await;
    }
    let mut client = client::connect(url).await?;
    // A task's token is a filter too: the controller bounds it to the task's subtree.
    let task_token = std::env::var("MUSTER_TOKEN").is_ok_and(|t| t.trim().starts_with("mtt."));
    if since.is_none() && (!filter.is_empty() || task_token) {
        // Filtered without a start: the last 50 matching events of the whole inbox.
        let mut next = 1;
        // Everything up to the inbox's end at the first page is read by the paging below,
        // so a follow starts after it rather than scanning it again.
        let mut scanned_to = None;
        let mut last: std::collections::VecDeque<v1::Event> = std::collections::VecDeque::new();
        loop {
            let page = client
                .read_inbox(filter.read(next, 1000))
                .await?
                .into_inner();
            scanned_to.get_or_insert(page.last_seq);
            for event in page.events.iter().cloned() {
                next = event.seq + 1;
                if last.len() == 50 {
                    last.pop_front();
                }
                last.push_back(event);
            }
            if page.events.len() < 1000 {
                break;
            }
        }
        for event in &last {
            if !print(event) {
                return Ok(());
            }
        }
        if follow {
            let from = next.max(scanned_to.unwrap_or(0) + 1);
            return follow_inbox(url, from, &filter, print).await;
        }
        return Ok(());
    }
    let mut next = match since {
        Some(seq) => seq,
        None => {
            let request = v1::ReadInboxRequest {
                from_seq: u64::MAX,
                limit: 1,
                ..Default::default()
            };
            let last = client.read_inbox(request).await?.into_inner().last_seq;
            last.saturating_sub(49).max(1)
        }
    };
    if follow {
        return follow_inbox(url, next, &filter, print).await;
    }
    loop {
        let page = client
            .read_inbox(filter.read(next, 1000))
            .await?
            .into_inner();
        for event in &page.events {
            if !print(event) {
                return Ok(());
            }
            next = event.seq + 1;
        }
        if page.events.len() < 1000 {
            return Ok(());
        }
    }
}

/// Follows the inbox from `next`, across controller restarts: on a broken stream it
/// reconnects and resumes after the last event printed, so nothing is lost or repeated.
async fn follow_inbox(
    url: &str,
    mut next: u64,
    filter: &InboxFilter,
    print: impl Fn(&v1::Event) -> bool,
) -> Result<(), Failure> {
    let mut delay = std::time::Duration::from_millis(200);
    let mut warned = false;
    loop {
        let stream = match client::connect_streaming(url).await {
            Ok(mut client) => client
                .watch(filter.watch(next))
                .await
                .map(tonic::Response::into_inner),
            Err(f) => Err(tonic::Status::unavailable(f.message)),
        };
        match stream {
            Ok(mut stream) => {
                if warned {
                    eprintln!("muster: reconnected; resuming at seq {next}");
                    warned = false;
                }
                delay = std::time::Duration::from_millis(200);
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(event) => {
                            next = event.seq + 1;
                            if !print(&event) {
                                return Ok(());
                            }
                        }
                        Err(status) if status.code() == tonic::Code::ResourceExhausted => break,
                        Err(status) if status.code() == tonic::Code::InvalidArgument => {
                            return Err(status.into())
                        }
                        Err(_) => break,
                    }
                }
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::InvalidArgument
                        | tonic::Code::NotFound
                        | tonic::Code::PermissionDenied
                        | tonic::Code::Unauthenticated
                ) =>
            {
                return Err(status.into());
            }
            Err(_) => {}
        }
        if !warned {
            eprintln!("muster: lost the controller at {url}; reconnecting (Ctrl-C to stop)");
            warned = true;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(5));
    }
}

/// Reads a task or sweep file; relative workdirs are resolved against its directory.
pub fn load_specs(path: &Path) -> Result<Vec<v1::TaskSpec>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))?;
    let base = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/"));
    muster_proto::spec::parse_file(&text, &base)
        .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))
}

/// Every task the filter matches, across pages.
async fn list_tasks(
    client: &mut client::Client,
    mut filter: v1::ListTasksRequest,
) -> Result<Vec<v1::Task>, Failure> {
    let mut tasks = Vec::new();
    loop {
        let page = client.list_tasks(filter.clone()).await?.into_inner();
        tasks.extend(page.tasks);
        // A token that does not move on would loop for ever; the list so far is all there is.
        if page.next_page_token.is_empty() || page.next_page_token == filter.page_token {
            return Ok(tasks);
        }
        filter.page_token = page.next_page_token;
    }
}

fn pairs(flag: &str, items: &[String]) -> Result<HashMap<String, String>, Failure> {
    items
        .iter()
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| Failure::usage(format!("{flag} {item:?} is not key=value")))
        })
        .collect()
}
