//! The task spec: TOML files, their validation, and the resolved rules the parts act on.
//!
//! The proto `TaskSpec` carries the same fields as the TOML file, with durations as strings.
//! Both the CLI (before sending) and the controller (on receipt) validate with [`validate`],
//! so an error is reported the same way whichever door the spec came through.

mod file;
pub mod health;
mod rules;
mod validate;

pub use file::{parse_file, ParseError};
pub use rules::{HealthRules, OnDisconnect, Policy, RestartRules, Rules};
pub use validate::{check_name, validate, FieldError, Limits};
