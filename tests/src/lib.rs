//! End-to-end harness: real Muster binaries on loopback, checked through the CLI and the inbox.
//!
//! Every wait is a condition polled against a deadline; the deadlines are generous because
//! the suite runs on small, loaded machines. A [`Fleet`] stops every process it started when
//! it is dropped, also when a test panics.

pub mod fleet;
pub mod inbox;
pub mod process;
pub mod proxy;
pub mod receiver;
pub mod up;

use std::time::Duration;

pub use fleet::{Fleet, FleetOptions, TaskProcess, FAST_CONTROLLER};
pub use inbox::{attempt_of, is_event, reason, seq_of, ts_ms};
pub use process::{
    pid_alive, poll_until, processes_with_arg_containing, processes_with_env, wait_until,
};

/// For a daemon to start serving, or a fleet to become ready.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// For one CLI call to finish.
pub const CLI_DEADLINE: Duration = Duration::from_secs(30);

/// For a task to get where a test drives it (placed, restarted, stopped, ...).
pub const TASK_DEADLINE: Duration = Duration::from_secs(60);
