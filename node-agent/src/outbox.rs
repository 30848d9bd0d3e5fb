//! Events waiting for the controller: numbered, batched, kept until acknowledged, and sent
//! again after a reconnect. Reports about the same attempt are coalesced while unsent.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;

use muster_proto::v1::{node_event::Kind, NodeEvent, Report};

/// A bound on memory while the controller is away; the oldest events go first.
const MAX_EVENTS: usize = 200_000;

#[derive(Default)]
struct Inner {
    events: VecDeque<NodeEvent>,
    next_seq: u64,
    /// Events with seq at or below this have been handed to the current session.
    sent_through: u64,
    /// Unsent report per (task, attempt), by seq, for coalescing.
    pending_reports: HashMap<(String, u32), u64>,
    dropped: u64,
}

/// The agent's queue of events for the controller.
#[derive(Default)]
pub struct Outbox {
    inner: Mutex<Inner>,
    pub notify: Notify,
}

impl Outbox {
    pub fn new() -> Self {
        Outbox {
            inner: Mutex::new(Inner {
                next_seq: 1,
                ..Default::default()
            }),
            notify: Notify::new(),
        }
    }

    /// Queues an event about `task`'s `attempt`.
    pub fn push(&self, task: &str, attempt: u32, kind: Kind) {
        let mut inner = self.inner.lock().expect("outbox poisoned");
        let key = (task.to_string(), attempt);
        if let Kind::Report(report) = &kind {
            if inner.coalesce(&key, report) {
                return;
            }
        }

        let seq = inner.next_seq;
        inner.next_seq += 1;
        if matches!(kind, Kind::Report(_)) {
            inner.pending_reports.insert(key, seq);
        } else {
            // Order matters across kinds: a later report must not fold into one sent
            // before an exit.
            inner.pending_reports.remove(&key);
        }
        inner.events.push_back(NodeEvent {
            seq,
            task: task.to_string(),
            attempt,
            ts_ms: now_ms(),
            kind: Some(kind),
        });
        if inner.events.len() > MAX_EVENTS {
            inner.events.pop_front();
            inner.dropped += 1;
            if inner.dropped.is_power_of_two() {
                tracing::warn!(
                    dropped = inner.dropped,
                    "outbox full while the controller is away; dropping oldest events"
                );
            }
        }
        drop(inner);
        self.notify.notify_one();
    }

    /// Unsent events, at most `max`; they count as sent until [`Outbox::rewind`].
    pub fn take_unsent(&self, max: usize) -> Vec<NodeEvent> {
        let mut inner = self.inner.lock().expect("outbox poisoned");
        let from = inner.sent_through;
        let batch: Vec<NodeEvent> = inner
            .events
            .iter()
            .filter(|e| e.seq > from)
            .take(max)
            .cloned()
            .collect();
        if let Some(last) = batch.last() {
            inner.sent_through = last.seq;
        }
        for event in &batch {
            if matches!(event.kind, Some(Kind::Report(_))) {
                let key = (event.task.clone(), event.attempt);
                if inner.pending_reports.get(&key) == Some(&event.seq) {
                    inner.pending_reports.remove(&key);
                }
            }
        }
        batch
    }

    /// Forgets events the controller has made durable.
    pub fn ack(&self, through: u64) {
        let mut inner = self.inner.lock().expect("outbox poisoned");
        while inner.events.front().is_some_and(|e| e.seq <= through) {
            inner.events.pop_front();
        }
    }

    /// A new session starts: everything not yet acknowledged will be sent again.
    pub fn rewind(&self, acked: u64) {
        self.ack(acked);
        let mut inner = self.inner.lock().expect("outbox poisoned");
        inner.sent_through = acked;
        inner.pending_reports.clear();
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("outbox poisoned").events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Folds a report into the unsent one for the same attempt when its state is the same,
    /// keeping the newest message and metrics. A state change is never folded.
    fn coalesce(&mut self, key: &(String, u32), report: &Report) -> bool {
        let Some(&seq) = self.pending_reports.get(key) else {
            return false;
        };
        let Some(event) = self.events.iter_mut().rev().find(|e| e.seq == seq) else {
            return false;
        };
        let Some(Kind::Report(pending)) = event.kind.as_mut() else {
            return false;
        };
        if pending.state != report.state && !report.state.is_empty() {
            return false;
        }
        let folded = pending.coalesced + 1;
        let state = std::mem::take(&mut pending.state);
        let mut metrics = std::mem::take(&mut pending.metrics);
        metrics.extend(report.metrics.clone());
        *pending = Report {
            state,
            message: if report.message.is_empty() {
                std::mem::take(&mut pending.message)
            } else {
                report.message.clone()
            },
            metrics,
            coalesced: folded,
        };
        event.ts_ms = now_ms();
        true
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_proto::v1::AttemptStarted;

    fn report(state: &str, step: f64) -> Kind {
        let mut r = Report {
            state: state.into(),
            ..Default::default()
        };
        r.metrics.insert("step".into(), step);
        Kind::Report(r)
    }

    #[test]
    fn same_state_reports_coalesce_until_sent() {
        let outbox = Outbox::new();

        outbox.push("t", 1, report("running", 1.0));
        outbox.push("t", 1, report("running", 2.0));
        outbox.push("t", 1, report("needs_help", 3.0));
        let batch = outbox.take_unsent(100);

        assert_eq!(batch.len(), 2);
        let Some(Kind::Report(first)) = &batch[0].kind else {
            panic!()
        };
        assert_eq!(first.metrics["step"], 2.0);
        assert_eq!(first.coalesced, 1);
    }

    #[test]
    fn unacked_events_are_sent_again_after_rewind() {
        let outbox = Outbox::new();
        outbox.push("t", 1, Kind::Started(AttemptStarted { pid: 7 }));
        outbox.push("t", 1, report("running", 1.0));
        let first = outbox.take_unsent(100);

        outbox.rewind(first[0].seq);
        let again = outbox.take_unsent(100);

        assert_eq!(again.len(), 1);
        assert_eq!(again[0].seq, first[1].seq);
    }
}
