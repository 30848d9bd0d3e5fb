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
    #[serde(default)]
    alerts: AlertsSection,
    #[serde(default)]
    auth: AuthSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthSection {
    #[serde(default)]
    tokens: Vec<TokenSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenSection {
    name: String,
    role: String,
    sha256: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertsSection {
    group_window: Option<String>,
    remind_every: Option<String>,
    parent_timeout: Option<String>,
    slack: Option<SlackSection>,
    pagerduty: Option<PagerDutySection>,
    #[serde(default)]
    route: Vec<RouteSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlackSection {
    webhook_url: Option<String>,
    webhook_url_env: Option<String>,
    bot_token: Option<String>,
    bot_token_env: Option<String>,
    default_channel: Option<String>,
    api_url: Option<String>,
    timeout: Option<String>,
    per_second: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PagerDutySection {
    routing_key: Option<String>,
    routing_key_env: Option<String>,
    events_url: Option<String>,
    timeout: Option<String>,
    per_minute: Option<f64>,
    source: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSection {
    #[serde(default)]
    reasons: Vec<String>,
    #[serde(default)]
    severities: Vec<String>,
    to: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControllerSection {
    tick: Option<String>,
    heartbeat_interval: Option<String>,
    node_timeout: Option<String>,
    reschedule_after: Option<String>,
    lease: Option<String>,
    report_sample: Option<String>,
    inbox_segment_mb: Option<u64>,
}

/// Everything the config file sets.
#[derive(Debug, Clone)]
pub struct Settings {
    pub core: CoreConfig,
    pub inbox_segment_bytes: u64,
    pub alerts: Alerts,
    pub auth: crate::auth::Auth,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            core: CoreConfig::default(),
            inbox_segment_bytes: 64 << 20,
            alerts: Alerts::default(),
            auth: crate::auth::Auth::default(),
        }
    }
}

/// Where incidents go and how.
#[derive(Debug, Clone)]
pub struct Alerts {
    /// Incidents opened within this window go out as one notification.
    pub group_window: Duration,
    /// Open, unacknowledged notifications are repeated this often (zero: never).
    pub remind_every: Duration,
    /// An incident of a task with a living parent goes to the parent first; people are told
    /// only if the parent has not acknowledged it within this time (zero: at once). A
    /// task's `escalation.parent_timeout` overrides it.
    pub parent_timeout: Duration,
    pub slack: Option<Slack>,
    pub pagerduty: Option<PagerDuty>,
    /// Empty: every incident goes to every configured destination.
    pub routes: Vec<Route>,
}

impl Default for Alerts {
    fn default() -> Self {
        Alerts {
            group_window: Duration::from_secs(1),
            remind_every: Duration::from_secs(30 * 60),
            parent_timeout: Duration::from_secs(5 * 60),
            slack: None,
            pagerduty: None,
            routes: Vec::new(),
        }
    }
}

#[derive(Clone)]
pub struct Slack {
    pub webhook_url: Option<String>,
    pub bot_token: Option<String>,
    pub default_channel: String,
    pub api_url: String,
    pub timeout: Duration,
    pub per_second: f64,
}

// Secrets stay out of logs and debug output.
impl std::fmt::Debug for Slack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slack")
            .field("webhook_url", &self.webhook_url.as_ref().map(|_| "<set>"))
            .field("bot_token", &self.bot_token.as_ref().map(|_| "<set>"))
            .field("default_channel", &self.default_channel)
            .field("api_url", &self.api_url)
            .finish()
    }
}

#[derive(Clone)]
pub struct PagerDuty {
    pub routing_key: String,
    pub events_url: String,
    pub timeout: Duration,
    pub per_minute: f64,
    pub source: String,
}

impl std::fmt::Debug for PagerDuty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagerDuty")
            .field("routing_key", &"<set>")
            .field("events_url", &self.events_url)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub reasons: Vec<String>,
    pub severities: Vec<String>,
    pub to: Vec<String>,
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
    set("lease", &c.lease, &mut settings.core.lease);
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
    parse_alerts(file.alerts, &mut settings.alerts, &mut errors);
    for (i, t) in file.auth.tokens.into_iter().enumerate() {
        let role = crate::auth::Role::parse(&t.role);
        let hash = crate::auth::parse_hex(&t.sha256.to_ascii_lowercase());
        if role.is_none() {
            errors.push(format!(
                "auth.tokens[{i}].role is {:?}; expected viewer, operator, admin or node",
                t.role
            ));
        }
        if hash.is_none() {
            errors.push(format!("auth.tokens[{i}].sha256 must be 64 hex digits (the SHA-256 of the token; `muster token new` prints it)"));
        }
        if t.name.is_empty() {
            errors.push(format!("auth.tokens[{i}].name is empty"));
        }
        if let (Some(role), Some(sha256)) = (role, hash) {
            settings.auth.tokens.push(crate::auth::Token {
                name: t.name,
                role,
                sha256,
            });
        }
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

/// A secret from the file or from the environment variable the file names.
fn secret(
    errors: &mut Vec<String>,
    key: &str,
    value: Option<String>,
    env: Option<String>,
) -> Option<String> {
    match (value, env) {
        (Some(v), None) => Some(v),
        (None, Some(var)) => match std::env::var(&var) {
            Ok(v) if !v.is_empty() => Some(v),
            _ => {
                errors.push(format!(
                    "{key}_env names {var}, which is not set in the environment"
                ));
                None
            }
        },
        (Some(_), Some(_)) => {
            errors.push(format!("{key} and {key}_env are both set; use one"));
            None
        }
        (None, None) => None,
    }
}

fn parse_alerts(a: AlertsSection, out: &mut Alerts, errors: &mut Vec<String>) {
    let mut duration =
        |key: &str, value: Option<String>, default: Duration, zero_ok: bool| -> Duration {
            let Some(v) = value else { return default };
            match muster_proto::duration::parse(&v) {
                Ok(d) if zero_ok || !d.is_zero() => d,
                Ok(_) => {
                    errors.push(format!("{key} must be longer than 0s"));
                    default
                }
                Err(e) => {
                    errors.push(format!("{key} is an {e}"));
                    default
                }
            }
        };
    out.group_window = duration(
        "alerts.group_window",
        a.group_window,
        out.group_window,
        true,
    );
    out.remind_every = duration(
        "alerts.remind_every",
        a.remind_every,
        out.remind_every,
        true,
    );
    out.parent_timeout = duration(
        "alerts.parent_timeout",
        a.parent_timeout,
        out.parent_timeout,
        true,
    );
    if let Some(s) = a.slack {
        let webhook_url = secret(
            errors,
            "alerts.slack.webhook_url",
            s.webhook_url,
            s.webhook_url_env,
        );
        let bot_token = secret(
            errors,
            "alerts.slack.bot_token",
            s.bot_token,
            s.bot_token_env,
        );
        let default_channel = s.default_channel.unwrap_or_default();
        let mut timeout = Duration::from_secs(10);
        let mut per_second = 1.0;
        if let Some(t) = s.timeout {
            match muster_proto::duration::parse(&t) {
                Ok(d) if !d.is_zero() => timeout = d,
                _ => errors.push(format!(
                    "alerts.slack.timeout {t:?} is not a duration above 0s"
                )),
            }
        }
        if let Some(r) = s.per_second {
            if r.is_finite() && r > 0.0 {
                per_second = r;
            } else {
                errors.push("alerts.slack.per_second must be above 0".into());
            }
        }
        if webhook_url.is_none() && bot_token.is_none() {
            errors.push("alerts.slack needs webhook_url (or webhook_url_env), or bot_token (or bot_token_env) with default_channel".into());
        }
        if bot_token.is_some() && default_channel.is_empty() {
            errors.push("alerts.slack.default_channel is required with bot_token".into());
        }
        let api_url = s.api_url.unwrap_or_else(|| "https://slack.com/api".into());
        for (key, url) in [
            ("alerts.slack.webhook_url", webhook_url.as_deref()),
            ("alerts.slack.api_url", Some(api_url.as_str())),
        ] {
            if let Some(url) = url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    errors.push(format!("{key} must be an http:// or https:// URL"));
                }
            }
        }
        out.slack = Some(Slack {
            webhook_url,
            bot_token,
            default_channel,
            api_url: api_url.trim_end_matches('/').to_string(),
            timeout,
            per_second,
        });
    }

    if let Some(p) = a.pagerduty {
        let routing_key = secret(
            errors,
            "alerts.pagerduty.routing_key",
            p.routing_key,
            p.routing_key_env,
        );
        if routing_key.is_none() {
            errors.push("alerts.pagerduty needs routing_key or routing_key_env".into());
        }
        let events_url = p
            .events_url
            .unwrap_or_else(|| "https://events.pagerduty.com/v2/enqueue".into());
        if !(events_url.starts_with("http://") || events_url.starts_with("https://")) {
            errors.push("alerts.pagerduty.events_url must be an http:// or https:// URL".into());
        }
        let mut timeout = Duration::from_secs(10);
        if let Some(t) = p.timeout {
            match muster_proto::duration::parse(&t) {
                Ok(d) if !d.is_zero() => timeout = d,
                _ => errors.push(format!(
                    "alerts.pagerduty.timeout {t:?} is not a duration above 0s"
                )),
            }
        }
        let per_minute = p.per_minute.unwrap_or(120.0);
        if !(per_minute.is_finite() && per_minute > 0.0) {
            errors.push("alerts.pagerduty.per_minute must be above 0".into());
        }
        out.pagerduty = Some(PagerDuty {
            routing_key: routing_key.unwrap_or_default(),
            events_url,
            timeout,
            per_minute,
            source: p.source.unwrap_or_else(|| "muster-controller".into()),
        });
    }

    for (i, r) in a.route.into_iter().enumerate() {
        if r.to.is_empty() {
            errors.push(format!("alerts.route[{i}].to is empty"));
        }
        for to in &r.to {
            let configured = match to.as_str() {
                "slack" => out.slack.is_some(),
                "pagerduty" => out.pagerduty.is_some(),
                _ => {
                    errors.push(format!(
                        "alerts.route[{i}].to has {to:?}; expected \"slack\" or \"pagerduty\""
                    ));
                    continue;
                }
            };
            if !configured {
                errors.push(format!(
                    "alerts.route[{i}].to names {to}, but [alerts.{to}] is not configured"
                ));
            }
        }
        for s in &r.severities {
            if !muster_proto::spec::health::SEVERITIES.contains(&s.as_str()) {
                errors.push(format!("alerts.route[{i}].severities has {s:?}; expected info, warning, error or critical"));
            }
        }
        out.routes.push(Route {
            reasons: r.reasons,
            severities: r.severities,
            to: r.to,
        });
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

    #[test]
    fn alerts_config_is_checked_and_names_keys() {
        let ok = parse(
            "[alerts.slack]\nwebhook_url = \"http://127.0.0.1:1/hook\"\n[alerts.pagerduty]\nrouting_key = \"k\"\n[[alerts.route]]\nreasons = [\"crash_loop\"]\nto = [\"slack\", \"pagerduty\"]\n",
        )
        .unwrap();
        assert_eq!(ok.alerts.routes.len(), 1);
        assert!(
            format!("{:?}", ok.alerts).contains("<set>"),
            "secrets are not printed"
        );

        let err = parse("[alerts.slack]\nbot_token = \"x\"\n[[alerts.route]]\nto = [\"pagerduty\", \"email\"]\n").unwrap_err();
        let all = err.join("\n");
        assert!(all.contains("default_channel"), "{all}");
        assert!(
            all.contains("[alerts.pagerduty] is not configured"),
            "{all}"
        );
        assert!(all.contains("\"email\""), "{all}");

        let err = parse("[alerts.pagerduty]\nrouting_key_env = \"MUSTER_TEST_SURELY_UNSET_VAR\"\n")
            .unwrap_err();
        assert!(err[0].contains("MUSTER_TEST_SURELY_UNSET_VAR"), "{err:?}");
    }
}
