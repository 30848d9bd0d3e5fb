//! The controller's config file (`--config FILE`, TOML). Unknown keys are errors.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::core::CoreConfig;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    controller: ControllerSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControllerSection {
    tick: Option<String>,
    heartbeat_interval: Option<String>,
    node_timeout: Option<String>,
    reschedule_after: Option<String>,
    report_sample: Option<String>,
    inbox_segment_mb: Option<u64>,
}

/// Everything the config file sets.
#[derive(Debug, Clone)]
pub struct Settings {
    pub core: CoreConfig,
    pub inbox_segment_bytes: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            core: CoreConfig::default(),
            inbox_segment_bytes: 64 << 20,
        }
    }
}

/// Reads and checks a config file; every problem is reported, each naming its key.
pub fn load(path: &Path) -> Result<Settings, Vec<String>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
    parse(&text).map_err(|errors| {
        errors
            .into_iter()
            .map(|e| format!("{}: {e}", path.display()))
            .collect()
    })
}

pub fn parse(text: &str) -> Result<Settings, Vec<String>> {
    let file: File = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
    let mut settings = Settings::default();
    let mut errors = Vec::new();
    let c = file.controller;
    let mut set = |key: &str, value: &Option<String>, target: &mut Duration| {
        if let Some(v) = value {
            match muster_proto::duration::parse(v) {
                Ok(d) if !d.is_zero() => *target = d,
                Ok(_) => errors.push(format!("controller.{key} must be longer than 0s")),
                Err(e) => errors.push(format!("controller.{key} is an {e}")),
            }
        }
    };
    set("tick", &c.tick, &mut settings.core.tick);
    set(
        "heartbeat_interval",
        &c.heartbeat_interval,
        &mut settings.core.heartbeat_interval,
    );
    set(
        "node_timeout",
        &c.node_timeout,
        &mut settings.core.node_timeout,
    );
    set(
        "reschedule_after",
        &c.reschedule_after,
        &mut settings.core.reschedule_after,
    );
    set(
        "report_sample",
        &c.report_sample,
        &mut settings.core.report_sample,
    );
    if let Some(mb) = c.inbox_segment_mb {
        if mb == 0 {
            errors.push("controller.inbox_segment_mb must be at least 1".to_string());
        }
        settings.inbox_segment_bytes = mb.max(1) << 20;
    }
    if settings.core.node_timeout <= settings.core.heartbeat_interval * 2 {
        errors.push(
            "controller.node_timeout must be more than twice controller.heartbeat_interval"
                .to_string(),
        );
    }
    if errors.is_empty() {
        Ok(settings)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_unknown_keys() {
        let s = parse("[controller]\nnode_timeout = \"3s\"\n").unwrap();
        assert_eq!(s.core.node_timeout, Duration::from_secs(3));

        let err = parse("[controller]\nnode_timout = \"3s\"\n").unwrap_err();
        assert!(err[0].contains("node_timout"), "{err:?}");

        let err = parse("[controller]\ntick = \"soon\"\nreport_sample = \"0s\"\n").unwrap_err();
        assert_eq!(err.len(), 2, "{err:?}");
        assert!(err[0].contains("controller.tick"));
    }
}
