//! Child processes: spawning an attempt, reaping every child (orphans included), and
//! taking down an attempt's whole process tree.
//!
//! The agent is a child subreaper, so descendants that daemonize or start their own session
//! are re-parented to it instead of init. One reaper thread owns every `wait`: it peeks at a
//! dead child with `WNOWAIT`, then reaps it under the registry lock, so the exit status of an
//! attempt's main process always reaches the runner waiting for it and an orphan is reaped
//! without stealing anyone's status.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// Environment variable that marks every process of one attempt, inherited by descendants,
/// so a descendant that left the process group can still be found and stopped.
pub const ATTEMPT_KEY_VAR: &str = "MUSTER_ATTEMPT_KEY";

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

/// What to start for one attempt.
pub struct Launch {
    pub argv: Vec<String>,
    pub shell: bool,
    pub env: Vec<(String, String)>,
    pub workdir: PathBuf,
    pub attempt_key: String,
    /// Run as this user, with its groups (the agent must be root).
    pub user: Option<String>,
}

/// A started attempt's main process and its output pipes.
pub struct Spawned {
    pub pid: u32,
    pub exit: oneshot::Receiver<Exit>,
    pub stdout: std::process::ChildStdout,
    pub stderr: std::process::ChildStderr,
}

#[derive(Default)]
struct Registry {
    waiters: HashMap<i32, oneshot::Sender<Exit>>,
    children: usize,
}

struct Reaper {
    registry: Mutex<Registry>,
    wake: Condvar,
}

fn reaper() -> &'static Arc<Reaper> {
    static REAPER: OnceLock<Arc<Reaper>> = OnceLock::new();
    REAPER.get_or_init(|| {
        // Orphaned descendants of our children come to us rather than to init.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e, "could not become a child subreaper; orphans go to init");
        }
        let reaper = Arc::new(Reaper {
            registry: Mutex::new(Registry::default()),
            wake: Condvar::new(),
        });
        let r = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reap_forever(&r))
            .expect("spawning the reaper thread");
        reaper
    })
}

/// Makes this process the subreaper and starts the reaper thread (idempotent).
pub fn start_reaper() {
    let _ = reaper();
}

fn reap_forever(reaper: &Reaper) {
    loop {
        let peeked = waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT);
        let pid = match peeked {
            Ok(status) => match status.pid() {
                Some(pid) => pid,
                None => continue,
            },
            Err(nix::errno::Errno::ECHILD) => {
                // No children at all: sleep until a spawn adds one.
                let guard = reaper.registry.lock().expect("reaper registry poisoned");
                let _unused = reaper
                    .wake
                    .wait_timeout_while(guard, Duration::from_secs(5), |r| r.children == 0)
                    .expect("reaper registry poisoned");
                continue;
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "waitid failed in the reaper");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };

        // Reap under the lock: a spawn in progress holds it, so a child whose exec failed
        // is reaped by the standard library first and our waitpid then finds nothing.
        let mut registry = reaper.registry.lock().expect("reaper registry poisoned");
        let exit = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Exit::Code(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => Exit::Signal(signal as i32),
            _ => continue,
        };
        if let Some(waiter) = registry.waiters.remove(&pid.as_raw()) {
            registry.children = registry.children.saturating_sub(1);
            let _ = waiter.send(exit);
        } else {
            tracing::debug!(pid = pid.as_raw(), ?exit, "reaped an orphan");
        }
    }
}

/// The kinds of spawn errors, as the inbox and the `spawn_error` incident name them.
pub const SPAWN_ERROR_KINDS: [&str; 5] = [
    "missing_workdir",
    "missing_binary",
    "not_executable",
    "fd_limit",
    "unknown_user",
];

/// Why an attempt could not start: a kind for people and rules, and the message with the
/// path and the OS error.
#[derive(Debug, Clone)]
pub struct SpawnError {
    /// One of [`SPAWN_ERROR_KINDS`], or spawn_error
    pub kind: &'static str,
    pub message: String,
}

impl SpawnError {
    fn from_io(launch: &Launch, e: &io::Error) -> SpawnError {
        let program = if launch.shell {
            "/bin/sh"
        } else {
            launch.argv[0].as_str()
        };
        let (kind, what) = match (e.kind(), e.raw_os_error()) {
            (_, Some(libc::EMFILE | libc::ENFILE)) => {
                ("fd_limit", "the open-file limit is reached".to_string())
            }
            (io::ErrorKind::NotFound, _) => {
                ("missing_binary", format!("program {program:?} not found"))
            }
            (io::ErrorKind::PermissionDenied, _) => (
                "not_executable",
                format!("program {program:?} is not executable"),
            ),
            _ => ("spawn_error", format!("cannot start {program:?}")),
        };
        SpawnError {
            kind,
            message: format!("{what} (workdir {}): {e}", launch.workdir.display()),
        }
    }
}

/// Starts an attempt's main process in a process group of its own.
pub fn spawn(launch: &Launch) -> Result<Spawned, SpawnError> {
    let user = match &launch.user {
        Some(name) => Some(resolve_user(name)?),
        None => None,
    };
    // A missing workdir fails exec with the same ENOENT as a missing binary; tell them apart.
    match std::fs::metadata(&launch.workdir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(SpawnError {
                kind: "missing_workdir",
                message: format!("workdir {} is not a directory", launch.workdir.display()),
            })
        }
        Err(e) => {
            return Err(SpawnError {
                kind: "missing_workdir",
                message: format!("workdir {}: {e}", launch.workdir.display()),
            })
        }
    }
    spawn_process(launch, user.as_ref()).map_err(|e| SpawnError::from_io(launch, &e))
}

/// Sets close-on-exec on every descriptor above stderr, between fork and exec.
#[allow(unsafe_code)]
fn mark_inherited_fds_cloexec() {
    // close_range(2) with CLOSE_RANGE_CLOEXEC (4), Linux 5.11 and later.
    // SAFETY: a plain syscall with integer arguments.
    let done = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32) } == 0;
    if !done {
        for fd in 3..4096 {
            // SAFETY: fcntl on a descriptor that may not exist only fails with EBADF.
            unsafe {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
}

/// A task's user, resolved before the fork.
pub struct RunAs {
    pub name: String,
    pub dir: PathBuf,
    pub uid: nix::unistd::Uid,
    pub gid: nix::unistd::Gid,
    /// The user's supplementary groups, as initgroups(3) would set them.
    pub groups: Vec<nix::unistd::Gid>,
}

fn resolve_user(name: &str) -> Result<RunAs, SpawnError> {
    let user = match nix::unistd::User::from_name(name) {
        Ok(Some(user)) => user,
        Ok(None) => {
            return Err(SpawnError {
                kind: "unknown_user",
                message: format!("user {name:?} does not exist on this node"),
            })
        }
        Err(e) => {
            return Err(SpawnError {
                kind: "unknown_user",
                message: format!("looking up user {name:?}: {e}"),
            })
        }
    };
    let cname = std::ffi::CString::new(name).map_err(|_| SpawnError {
        kind: "unknown_user",
        message: format!("user {name:?} has a NUL byte"),
    })?;
    let groups = nix::unistd::getgrouplist(&cname, user.gid).map_err(|e| SpawnError {
        kind: "unknown_user",
        message: format!("groups of user {name:?}: {e}"),
    })?;
    Ok(RunAs {
        name: user.name,
        dir: user.dir,
        uid: user.uid,
        gid: user.gid,
        groups,
    })
}

fn spawn_process(launch: &Launch, user: Option<&RunAs>) -> io::Result<Spawned> {
    let (program, args): (OsString, Vec<String>) = if launch.shell {
        let mut args = vec!["-c".to_string()];
        args.extend(launch.argv.iter().cloned());
        ("/bin/sh".into(), args)
    } else {
        (launch.argv[0].clone().into(), launch.argv[1..].to_vec())
    };

    let mut command = Command::new(&program);
    if let Some(user) = user {
        // The user's home and names first, so the task's own env may still override them.
        command
            .env("USER", &user.name)
            .env("LOGNAME", &user.name)
            .env("HOME", &user.dir);
    }
    command
        .args(&args)
        .current_dir(&launch.workdir)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .env(ATTEMPT_KEY_VAR, &launch.attempt_key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: only async-signal-safe syscalls run between fork and exec here. Whatever the
    // agent or keeper inherited without close-on-exec (a parent's jobserver pipes, a
    // supervisor's sockets) must not reach a task.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            mark_inherited_fds_cloexec();
            Ok(())
        });
    }
    if let Some(user) = user {
        let (uid, gid, groups) = (user.uid, user.gid, user.groups.clone());
        // SAFETY: between fork and exec only async-signal-safe work may run. The group list
        // was resolved before the fork (NSS lookups allocate and lock); what runs here are
        // three plain syscalls, in the order that drops privileges for good.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                nix::unistd::setgroups(&groups).map_err(std::io::Error::from)?;
                nix::unistd::setgid(gid).map_err(std::io::Error::from)?;
                nix::unistd::setuid(uid).map_err(std::io::Error::from)?;
                Ok(())
            });
        }
    }

    let reaper = reaper();
    let mut registry = reaper.registry.lock().expect("reaper registry poisoned");
    let mut child = command.spawn()?;
    let (tx, rx) = oneshot::channel();
    registry.waiters.insert(child.id() as i32, tx);
    registry.children += 1;
    reaper.wake.notify_all();
    drop(registry);

    Ok(Spawned {
        pid: child.id(),
        exit: rx,
        stdout: child.stdout.take().expect("stdout is piped"),
        stderr: child.stderr.take().expect("stderr is piped"),
    })
}

/// Every live process of an attempt: its process group, the descendants of its main
/// process, and any process carrying its attempt key.
pub fn tree_members(main_pid: u32, attempt_key: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let marker = format!("{ATTEMPT_KEY_VAR}={attempt_key}");
    let mut parents: HashMap<i32, i32> = HashMap::new();
    let mut members = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Some((ppid, pgid, zombie)) = stat_fields(pid) else {
            continue;
        };
        if zombie {
            continue;
        }
        parents.insert(pid, ppid);
        if pgid == main_pid as i32 || pid == main_pid as i32 || has_marker(pid, &marker) {
            members.push(pid);
        }
    }

    // Descendants by parent link (catches a child that cleared its environment).
    for &pid in parents.keys() {
        let mut cursor = pid;
        for _ in 0..64 {
            match parents.get(&cursor) {
                Some(&ppid) if ppid == main_pid as i32 => {
                    members.push(pid);
                    break;
                }
                Some(&ppid) if ppid > 1 => cursor = ppid,
                _ => break,
            }
        }
    }
    members.sort_unstable();
    members.dedup();
    members
}

/// (ppid, pgid, is_zombie) from /proc/PID/stat.
fn stat_fields(pid: i32) -> Option<(i32, i32, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    Some((ppid, pgid, state == "Z" || state == "X"))
}

/// SIGKILLs every process whose attempt key starts with `prefix`, except the keys in
/// `keep`; returns how many were killed.
pub fn kill_keys_with_prefix(prefix: &str, keep: &std::collections::HashSet<String>) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let var = format!("{ATTEMPT_KEY_VAR}=");
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let key = environ
            .split(|&b| b == 0)
            .find_map(|v| v.strip_prefix(var.as_bytes()))
            .map(|k| String::from_utf8_lossy(k).into_owned());
        if key.is_some_and(|k| k.starts_with(prefix) && !keep.contains(&k)) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}

fn has_marker(pid: i32, marker: &str) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    environ
        .split(|&b| b == 0)
        .any(|var| var == marker.as_bytes())
}

/// Sends `signal` to every process of the attempt; returns how many were signalled.
pub fn signal_tree(main_pid: u32, attempt_key: &str, signal: Signal) -> usize {
    let _ = kill(Pid::from_raw(-(main_pid as i32)), signal);
    let members = tree_members(main_pid, attempt_key);
    for &pid in &members {
        let _ = kill(Pid::from_raw(pid), signal);
    }
    members.len()
}

/// Stops an attempt's whole tree: SIGTERM to every member, SIGKILL to what is left after
/// `grace`. Returns once no member is alive, or after a hard bound past the grace.
pub async fn stop_tree(main_pid: u32, attempt_key: &str, grace: Duration) {
    let start = Instant::now();
    let hard_bound = grace + Duration::from_secs(10);
    let mut signal = Signal::SIGTERM;
    let mut poll = Duration::from_millis(10);
    loop {
        let key = attempt_key.to_string();
        let alive = tokio::task::spawn_blocking(move || signal_tree(main_pid, &key, signal))
            .await
            .unwrap_or(0);
        if alive == 0 || start.elapsed() > hard_bound {
            if alive > 0 {
                tracing::warn!(pid = main_pid, alive, "processes survived SIGKILL");
            }
            return;
        }
        if start.elapsed() >= grace {
            signal = Signal::SIGKILL;
        } else {
            // Re-send nothing until the grace runs out; a zero signal only checks.
            signal = Signal::SIGCONT;
        }
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(Duration::from_millis(200));
    }
}
