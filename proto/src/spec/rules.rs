//! A validated spec resolved into the typed rules the node agent and controller act on,
//! with every default filled in.

use std::time::Duration;

use crate::duration;
use crate::v1;

/// When an exited attempt is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone)]
pub struct RestartRules {
    pub policy: Policy,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Restarts allowed within `window`; one more is a crash loop.
    pub max_restarts: u32,
    pub window: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct HealthRules {
    pub heartbeat_timeout: Option<Duration>,
    pub progress_metric: Option<String>,
    pub progress_timeout: Option<Duration>,
    /// Metrics checked for NaN and Inf; empty means every metric.
    pub nan_metrics: Vec<String>,
    /// The task's own rules, its fail patterns, then its packs' rules.
    pub rules: Vec<super::health::Rule>,
    pub flags: super::health::PackFlags,
}

/// What a node does with a task when it loses the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDisconnect {
    /// Keep running; the controller never places a replacement while the node is away.
    Keep,
    /// Stop after this long out of contact (None: the controller's lease).
    StopAfter(Option<Duration>),
}

/// Everything a part needs to act on a task, resolved from its spec.
#[derive(Debug, Clone)]
pub struct Rules {
    pub on_disconnect: OnDisconnect,
    pub restart: RestartRules,
    pub health: HealthRules,
    pub grace: Duration,
    pub slots: u32,
}

impl Rules {
    pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
    pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
    pub const DEFAULT_MAX_RESTARTS: u32 = 5;
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(600);
    pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

    /// Resolves a spec that passed [`super::validate`]; invalid fields fall back to defaults.
    pub fn from_spec(spec: &v1::TaskSpec) -> Rules {
        let dur = |s: &str| (!s.is_empty()).then(|| duration::parse(s).ok()).flatten();
        let restart = spec.restart.clone().unwrap_or_default();
        let health = spec.health.clone().unwrap_or_default();
        let (rules, flags) = super::health::resolve(&health);
        let policy = match restart.policy.as_str() {
            "always" => Policy::Always,
            "never" => Policy::Never,
            _ => Policy::OnFailure,
        };

        Rules {
            on_disconnect: match spec.on_disconnect.as_str() {
                "keep" => OnDisconnect::Keep,
                other => OnDisconnect::StopAfter(dur(other).filter(|d| !d.is_zero())),
            },
            restart: RestartRules {
                policy,
                backoff_initial: dur(&restart.backoff_initial)
                    .unwrap_or(Self::DEFAULT_BACKOFF_INITIAL),
                backoff_max: dur(&restart.backoff_max).unwrap_or(Self::DEFAULT_BACKOFF_MAX),
                max_restarts: restart.max_restarts.unwrap_or(Self::DEFAULT_MAX_RESTARTS),
                window: dur(&restart.window).unwrap_or(Self::DEFAULT_WINDOW),
            },
            health: HealthRules {
                heartbeat_timeout: dur(&health.heartbeat_timeout).filter(|d| !d.is_zero()),
                progress_metric: Some(health.progress_metric).filter(|m| !m.is_empty()),
                progress_timeout: dur(&health.progress_timeout).filter(|d| !d.is_zero()),
                nan_metrics: health.nan_metrics,
                rules,
                flags,
            },
            grace: spec
                .stop
                .as_ref()
                .and_then(|s| dur(&s.grace))
                .unwrap_or(Self::DEFAULT_GRACE),
            slots: spec.resources.as_ref().map_or(1, |r| r.slots.max(1)),
        }
    }
}
