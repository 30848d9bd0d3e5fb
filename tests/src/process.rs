//! Processes as the tests see them: liveness from /proc, finding processes by environment or
//! argument, running a command with a deadline, and waiting on a condition with a deadline.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How often a deadline loop looks at its condition again.
const POLL: Duration = Duration::from_millis(100);

/// Calls `check` until it returns `Some`, or `None` once `timeout` has passed.
pub fn poll_until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// Like [`poll_until`], but panics naming `what` when the deadline passes.
pub fn wait_until<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, check)
        .unwrap_or_else(|| panic!("timed out after {}s waiting for {what}", timeout.as_secs()))
}

/// True while the process exists and is neither a zombie nor dead.
pub fn pid_alive(pid: i32) -> bool {
    matches!(process_state(pid), Some(state) if state != 'Z' && state != 'X')
}

/// The state letter of /proc/PID/stat (R, S, D, Z, ...).
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the state follows the last ')'.
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

fn all_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// NUL-separated fields of /proc/PID/`file` (environ or cmdline).
fn proc_fields(pid: i32, file: &str) -> Vec<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/{file}"))
        .map(|bytes| bytes.split(|&b| b == 0).map(<[u8]>::to_vec).collect())
        .unwrap_or_default()
}

/// Live processes whose environment holds `key=VALUE` with VALUE starting with `value_prefix`.
pub fn processes_with_env(key: &str, value_prefix: &str) -> Vec<i32> {
    let wanted = format!("{key}={value_prefix}");
    all_pids()
        .into_iter()
        .filter(|&pid| {
            proc_fields(pid, "environ")
                .iter()
                .any(|var| var.starts_with(wanted.as_bytes()))
        })
        .filter(|&pid| pid_alive(pid))
        .collect()
}

/// Live processes with an argument that contains `needle` (for daemons started elsewhere).
pub fn processes_with_arg_containing(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            proc_fields(pid, "cmdline")
                .iter()
                .any(|arg| String::from_utf8_lossy(arg).contains(needle))
        })
        .filter(|&pid| pid_alive(pid))
        .collect()
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
pub fn signal_pid(pid: i32, signal: Signal) {
    let _ = kill(Pid::from_raw(pid), signal);
}

/// SIGKILLs every live process whose environment has `key` starting with `value_prefix`,
/// until none is left or `timeout` passes. Returns how many were found the first time.
pub fn kill_processes_with_env(key: &str, value_prefix: &str, timeout: Duration) -> usize {
    let first = processes_with_env(key, value_prefix);
    let _ = poll_until(timeout, || {
        let left = processes_with_env(key, value_prefix);
        left.iter()
            .for_each(|&pid| signal_pid(pid, Signal::SIGKILL));
        left.is_empty().then_some(())
    });
    first.len()
}

/// Waits for a child to exit; after `timeout` it is SIGKILLed and reaped.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    if let Some(status) = poll_until(timeout, || child.try_wait().ok().flatten()) {
        return Some(status);
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Runs `command` to completion with its output captured; kills it and panics after
/// `timeout`, so a hung CLI call fails the test instead of hanging it.
pub fn run_with_deadline(command: &mut Command, timeout: Duration) -> Output {
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {description}: {e}"));
    let stdout = drain(child.stdout.take().expect("stdout is piped"));
    let stderr = drain(child.stderr.take().expect("stderr is piped"));

    let Some(status) = wait_child(&mut child, timeout) else {
        panic!("{description} did not finish within {}s", timeout.as_secs());
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// The directory holding the product binaries: target/release beside target/release/deps.
pub fn binary_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/PROFILE/deps");
    for name in ["muster", "muster-controller", "muster-node-agent"] {
        assert!(
            dir.join(name).exists(),
            "{name} is missing in {}; run `cargo build --release --bins` first",
            dir.display()
        );
    }
    dir.to_path_buf()
}

/// A child process killed and reaped when dropped, also when a test panics.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
