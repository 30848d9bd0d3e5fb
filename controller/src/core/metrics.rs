//! The controller's Prometheus metrics: counters kept as things happen, gauges read from
//! the model when scraped.

use std::collections::HashMap;

use muster_proto::metrics::{render, Family, Histogram};

use super::Core;
use crate::model::TaskState;

/// Seconds; an fsync on a laptop SSD takes about a millisecond.
const APPEND_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

pub struct Counters {
    pub attempts_started: u64,
    pub attempts_failed: u64,
    pub restarts: u64,
    pub events: u64,
    pub node_events: u64,
    pub alerts: HashMap<(&'static str, bool), u64>,
    pub inbox_append: Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            attempts_started: 0,
            attempts_failed: 0,
            restarts: 0,
            events: 0,
            node_events: 0,
            alerts: HashMap::new(),
            inbox_append: Histogram::new(APPEND_BUCKETS),
        }
    }
}

impl Core {
    pub(super) fn render_metrics(&self) -> String {
        let c = &self.metrics;
        let mut tasks = Family::new("muster_tasks", "gauge", "Tasks by state.");
        for state in TaskState::ALL {
            let n = self.tasks.values().filter(|t| t.state == state).count();
            tasks = tasks.with(&[("state", state.as_str())], n as f64);
        }
        let mut nodes = Family::new("muster_nodes", "gauge", "Nodes by state.");
        // As `muster nodes` shows them: a cordoned ready node counts as cordoned.
        for state in ["ready", "suspect", "lost", "draining", "cordoned"] {
            let n = self
                .nodes
                .values()
                .filter(|n| n.to_proto().state == state)
                .count();
            nodes = nodes.with(&[("state", state)], n as f64);
        }
        let sessions = self.nodes.values().filter(|n| n.session.is_some()).count();
        let mut alerts = Family::new(
            "muster_alert_deliveries_total",
            "counter",
            "Notification delivery attempts by destination and outcome.",
        );
        for dest in ["slack", "pagerduty"] {
            for (ok, outcome) in [(true, "sent"), (false, "failed")] {
                alerts = alerts.with(
                    &[("destination", dest), ("outcome", outcome)],
                    *c.alerts.get(&(dest, ok)).unwrap_or(&0) as f64,
                );
            }
        }
        render(&[
            tasks,
            nodes,
            Family::new(
                "muster_node_sessions",
                "gauge",
                "Connected node agent sessions.",
            )
            .with(&[], sessions as f64),
            Family::new("muster_incidents_open", "gauge", "Open incidents.")
                .with(&[], self.incidents.len() as f64),
            Family::new(
                "muster_attempts_started_total",
                "counter",
                "Attempts started.",
            )
            .with(&[], c.attempts_started as f64),
            Family::new(
                "muster_attempts_failed_total",
                "counter",
                "Attempts that exited non-zero, by signal, or could not start.",
            )
            .with(&[], c.attempts_failed as f64),
            Family::new(
                "muster_restarts_total",
                "counter",
                "Restarts of tasks by their nodes.",
            )
            .with(&[], c.restarts as f64),
            Family::new(
                "muster_node_events_total",
                "counter",
                "Events received from node agents.",
            )
            .with(&[], c.node_events as f64),
            Family::new(
                "muster_inbox_events_total",
                "counter",
                "Events appended to the inbox.",
            )
            .with(&[], c.events as f64),
            c.inbox_append.family(
                "muster_inbox_append_seconds",
                "Time to append and fsync one batch of inbox events.",
            ),
            alerts,
            Family::new(
                "muster_inbox_last_seq",
                "gauge",
                "The last inbox sequence number.",
            )
            .with(&[], self.inbox.last_seq() as f64),
        ])
    }
}
