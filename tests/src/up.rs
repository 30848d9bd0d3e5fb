//! `muster up` as an operator runs it, for the example tests.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::process::{
    binary_dir, kill_processes_with_env, processes_with_arg_containing, processes_with_env,
    signal_pid, wait_child,
};

/// `muster up` on a data dir, stopped and cleaned up on drop whatever happened.
pub struct Up {
    child: Option<Child>,
    pub data_dir: std::path::PathBuf,
}

impl Up {
    /// Starts `muster up --exit-when-done` with `args` from the workspace, its data dir
    /// under `root`.
    pub fn start(root: &Path, args: &[&str]) -> Up {
        let data_dir = root.join("fleet");
        let out = File::create(root.join("up.out")).expect("creating up.out");
        let err = File::create(root.join("up.err")).expect("creating up.err");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ lives in the workspace");
        let child = Command::new(binary_dir().join("muster"))
            .current_dir(workspace)
            // Run the built binary as an operator would: with CARGO set, `muster up` takes
            // itself for `cargo run` and rebuilds the daemons first.
            .env_remove("CARGO")
            .env_remove("MUSTER_CONTROLLER")
            .args(["up", "--exit-when-done", "--data-dir"])
            .arg(&data_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting muster up");
        Up {
            child: Some(child),
            data_dir,
        }
    }

    /// Waits for `muster up` to exit on its own, and asserts that it exited 0 within
    /// `deadline` and left no process of the fleet behind.
    pub fn run_to_end(&mut self, deadline: Duration) {
        let status = self.wait(deadline);
        let root = self
            .data_dir
            .parent()
            .expect("the data dir is below the root");
        let report = format!(
            "stdout:\n{}\nstderr:\n{}\ncontroller log:\n{}",
            file_tail(&root.join("up.out"), 40),
            file_tail(&root.join("up.err"), 20),
            file_tail(&self.data_dir.join("logs/controller.log"), 20)
        );
        let status = status
            .unwrap_or_else(|| panic!("muster up ran past {}s\n{report}", deadline.as_secs()));
        assert!(status.success(), "muster up exited {status}\n{report}");
        let left = self.leftovers();
        assert!(
            left.is_empty(),
            "processes of the fleet outlived muster up: {left:?}"
        );
    }

    /// Waits for `muster up` to exit on its own; None if it ran past the deadline.
    pub fn wait(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("muster up was started");
        let status = crate::process::poll_until(deadline, || child.try_wait().ok().flatten());
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Processes of the fleet still alive.
    pub fn leftovers(&self) -> Vec<i32> {
        let dir = self.data_dir.display().to_string();
        let mut pids = processes_with_env("MUSTER_DATA_DIR", &format!("{dir}/"));
        pids.extend(processes_with_arg_containing(&dir));
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM stops the node agents (and their tasks), then the controller.
            signal_pid(child.id() as i32, Signal::SIGTERM);
            wait_child(&mut child, Duration::from_secs(120));
        }
        let dir = self.data_dir.display().to_string();
        kill_processes_with_env(
            "MUSTER_DATA_DIR",
            &format!("{dir}/"),
            Duration::from_secs(10),
        );
        for pid in processes_with_arg_containing(&dir) {
            signal_pid(pid, Signal::SIGKILL);
        }
    }
}

/// The last `lines` lines of a file (empty if it cannot be read).
pub fn file_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
