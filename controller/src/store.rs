//! The state store: tasks, attempts, incidents and nodes in one SQLite database (WAL),
//! written in one transaction per batch of work (group commit).

use std::collections::HashMap;
use std::path::Path;

use prost::Message;
use rusqlite::{params, Connection, OptionalExtension};

use muster_proto::v1;

use crate::core::{Delivery, Group};
use crate::model::{Incident, NodeMemory, TaskRecord, TaskState};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state database holds a task spec that does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    name TEXT PRIMARY KEY, spec BLOB NOT NULL, state TEXT NOT NULL, node TEXT NOT NULL,
    attempt INTEGER NOT NULL, parent TEXT NOT NULL, root TEXT NOT NULL, metrics TEXT NOT NULL,
    message TEXT NOT NULL, reason TEXT NOT NULL, report_state TEXT NOT NULL,
    restarts INTEGER NOT NULL, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
    last_report_ms INTEGER NOT NULL, stop_reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
    task TEXT NOT NULL, attempt INTEGER NOT NULL, node TEXT NOT NULL, pid INTEGER NOT NULL,
    started_ms INTEGER NOT NULL, ended_ms INTEGER NOT NULL, exit_code INTEGER, signal INTEGER,
    end_reason TEXT NOT NULL, error TEXT NOT NULL, PRIMARY KEY (task, attempt));
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY, task TEXT NOT NULL, node TEXT NOT NULL, reason TEXT NOT NULL,
    state TEXT NOT NULL, severity TEXT NOT NULL, message TEXT NOT NULL,
    opened_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL, resolved_ms INTEGER NOT NULL,
    escalate_ms INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, instance TEXT NOT NULL, acked_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS node_flags (name TEXT PRIMARY KEY, cordoned INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, line TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alert_groups (id INTEGER PRIMARY KEY, state TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alert_deliveries (
    id INTEGER PRIMARY KEY, state TEXT NOT NULL, attempts INTEGER NOT NULL, error TEXT NOT NULL,
    notice TEXT NOT NULL);
";

/// Everything a batch changed, written together.
#[derive(Default)]
pub struct Changes<'a> {
    pub tasks: Vec<TaskRecord>,
    pub attempts: Vec<v1::Attempt>,
    pub incidents: Vec<Incident>,
    pub nodes: Vec<(String, NodeMemory)>,
    pub meta: Vec<(&'static str, i64)>,
    pub groups: Vec<Group>,
    pub deliveries: Vec<Delivery>,
    pub events: &'a [crate::event::Event],
    pub cordons: Vec<(String, bool)>,
}

impl Changes<'_> {
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
            && self.attempts.is_empty()
            && self.incidents.is_empty()
            && self.nodes.is_empty()
            && self.meta.is_empty()
            && self.groups.is_empty()
            && self.deliveries.is_empty()
            && self.events.is_empty()
            && self.cordons.is_empty()
    }
}

/// What the controller had when it stopped.
pub struct Loaded {
    pub tasks: Vec<TaskRecord>,
    pub incidents: Vec<Incident>,
    pub nodes: HashMap<String, NodeMemory>,
    pub meta: HashMap<String, i64>,
    pub groups: Vec<Group>,
    pub deliveries: Vec<Delivery>,
}

pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Every commit is durable before the controller acts on it (one fsync per batch).
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        // Databases from before task trees lack the parent escalation deadline.
        let has_escalate: bool = conn
            .prepare(
                "SELECT COUNT(*) FROM pragma_table_info('incidents') WHERE name = 'escalate_ms'",
            )?
            .query_row([], |r| r.get::<_, i64>(0))?
            > 0;
        if !has_escalate {
            conn.execute_batch(
                "ALTER TABLE incidents ADD COLUMN escalate_ms INTEGER NOT NULL DEFAULT 0",
            )?;
        }
        Ok(Store { conn })
    }

    pub fn load(&self) -> Result<Loaded, StoreError> {
        let meta = self
            .conn
            .prepare("SELECT key, value FROM meta")?
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<HashMap<_, _>, _>>()?;

        let mut tasks = Vec::new();
        let mut stmt = self.conn.prepare(
            "SELECT spec, state, node, attempt, parent, root, metrics, message, reason, report_state,
                    restarts, created_ms, updated_ms, last_report_ms, stop_reason FROM tasks",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let spec = v1::TaskSpec::decode(r.get::<_, Vec<u8>>(0)?.as_slice())?;
            let metrics: HashMap<String, f64> =
                serde_json::from_str::<HashMap<String, serde_json::Value>>(&r.get::<_, String>(6)?)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(k, v)| decode_metric(&v).map(|f| (k, f)))
                    .collect();
            let mut task = TaskRecord::new(spec, r.get(4)?, r.get(5)?, r.get(11)?);
            task.state = TaskState::parse(&r.get::<_, String>(1)?).unwrap_or(TaskState::Pending);
            task.node = r.get(2)?;
            task.attempt = r.get(3)?;
            task.metrics = metrics;
            task.message = r.get(7)?;
            task.reason = r.get(8)?;
            task.report_state = r.get(9)?;
            task.restarts = r.get(10)?;
            task.updated_ms = r.get(12)?;
            task.last_report_ms = r.get(13)?;
            task.stop_reason = r.get(14)?;
            tasks.push(task);
        }

        let incidents = self
            .conn
            .prepare("SELECT id, task, node, reason, state, severity, message, opened_ms, updated_ms, resolved_ms, escalate_ms FROM incidents WHERE state != 'resolved' OR id IN (SELECT id FROM incidents WHERE state = 'resolved' ORDER BY id DESC LIMIT 10000)")?
            .query_map([], |r| {
                Ok(Incident {
                    id: r.get::<_, i64>(0)? as u64,
                    task: r.get(1)?,
                    node: r.get(2)?,
                    reason: r.get(3)?,
                    state: r.get(4)?,
                    severity: r.get(5)?,
                    message: r.get(6)?,
                    opened_ms: r.get(7)?,
                    updated_ms: r.get(8)?,
                    resolved_ms: r.get(9)?,
                    escalate_ms: r.get(10)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;

        let nodes = self
            .conn
            .prepare("SELECT name, instance, acked_seq FROM nodes")?
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    NodeMemory {
                        instance: r.get(1)?,
                        acked_seq: r.get::<_, i64>(2)? as u64,
                    },
                ))
            })?
            .collect::<Result<HashMap<_, _>, _>>()?;

        let groups = self
            .conn
            .prepare("SELECT body FROM alert_groups WHERE state != 'resolved' OR id IN (SELECT DISTINCT json_extract(notice, '$.group') FROM alert_deliveries WHERE state = 'pending')")?
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter_map(|body| serde_json::from_str::<Group>(&body).ok())
            .collect();
        let deliveries = self
            .conn
            .prepare("SELECT id, state, attempts, error, notice FROM alert_deliveries WHERE state = 'pending' ORDER BY id")?
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, u32>(2)?, r.get::<_, String>(3)?, r.get::<_, String>(4)?)))?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter_map(|(id, state, attempts, error, notice)| {
                let notice = serde_json::from_str(&notice).ok()?;
                Some(Delivery { id: id as u64, notice, state, attempts, error })
            })
            .collect();
        let max_delivery: Option<i64> =
            self.conn
                .query_row("SELECT MAX(id) FROM alert_deliveries", [], |r| r.get(0))?;
        let max_group: Option<i64> =
            self.conn
                .query_row("SELECT MAX(id) FROM alert_groups", [], |r| r.get(0))?;
        let mut meta = meta;
        meta.insert("max_delivery".into(), max_delivery.unwrap_or(0));
        meta.insert("max_group".into(), max_group.unwrap_or(0));

        Ok(Loaded {
            tasks,
            incidents,
            nodes,
            meta,
            groups,
            deliveries,
        })
    }

    /// Writes a batch's changes in one transaction.
    pub fn commit(&mut self, changes: &Changes<'_>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        {
            let mut put_task = tx.prepare_cached(
                "INSERT OR REPLACE INTO tasks VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?;
            for t in &changes.tasks {
                put_task.execute(params![
                    t.spec.name,
                    t.spec.encode_to_vec(),
                    t.state.as_str(),
                    t.node,
                    t.attempt,
                    t.parent,
                    t.root,
                    crate::event::metrics_json(&t.metrics).to_string(),
                    t.message,
                    t.reason,
                    t.report_state,
                    t.restarts,
                    t.created_ms,
                    t.updated_ms,
                    t.last_report_ms,
                    t.stop_reason,
                ])?;
            }
            let mut put_attempt = tx.prepare_cached(
                "INSERT OR REPLACE INTO attempts VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for a in &changes.attempts {
                put_attempt.execute(params![
                    a.task,
                    a.attempt,
                    a.node,
                    a.pid,
                    a.started_ms,
                    a.ended_ms,
                    a.exit_code,
                    a.signal,
                    a.end_reason,
                    a.error
                ])?;
            }
            let mut put_incident = tx.prepare_cached(
                "INSERT OR REPLACE INTO incidents VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?;
            for i in &changes.incidents {
                put_incident.execute(params![
                    i.id as i64,
                    i.task,
                    i.node,
                    i.reason,
                    i.state,
                    i.severity,
                    i.message,
                    i.opened_ms,
                    i.updated_ms,
                    i.resolved_ms,
                    i.escalate_ms
                ])?;
            }
            let mut put_node =
                tx.prepare_cached("INSERT OR REPLACE INTO nodes VALUES (?1, ?2, ?3)")?;
            for (name, n) in &changes.nodes {
                put_node.execute(params![name, n.instance, n.acked_seq as i64])?;
            }
            let mut put_group =
                tx.prepare_cached("INSERT OR REPLACE INTO alert_groups VALUES (?1, ?2, ?3)")?;
            for g in &changes.groups {
                put_group.execute(params![
                    g.id as i64,
                    g.state,
                    serde_json::to_string(g).expect("groups serialize")
                ])?;
            }
            let mut put_delivery = tx.prepare_cached(
                "INSERT OR REPLACE INTO alert_deliveries VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for d in &changes.deliveries {
                let notice = serde_json::to_string(&d.notice).expect("notices serialize");
                put_delivery.execute(params![d.id as i64, d.state, d.attempts, d.error, notice])?;
            }
            let mut put_event =
                tx.prepare_cached("INSERT OR REPLACE INTO events VALUES (?1, ?2)")?;
            for e in changes.events {
                put_event.execute(params![
                    e.seq as i64,
                    serde_json::to_string(e).expect("events serialize")
                ])?;
            }
            if let Some(last) = changes.events.last() {
                // The inbox is the record; the table only bridges a crash between the two
                // writes, so it keeps a recent window.
                if last.seq % 1024 < changes.events.len() as u64 {
                    tx.execute(
                        "DELETE FROM events WHERE seq < ?1",
                        [last.seq.saturating_sub(100_000) as i64],
                    )?;
                }
            }
            let mut put_cordon =
                tx.prepare_cached("INSERT OR REPLACE INTO node_flags VALUES (?1, ?2)")?;
            for (name, cordoned) in &changes.cordons {
                put_cordon.execute(params![name, *cordoned as i64])?;
            }
            let mut put_meta = tx.prepare_cached("INSERT OR REPLACE INTO meta VALUES (?1, ?2)")?;
            for (key, value) in &changes.meta {
                put_meta.execute(params![key, value])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Nodes an operator cordoned.
    pub fn cordoned(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM node_flags WHERE cordoned = 1")?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(names)
    }

    /// Events committed after `seq`, to mend an inbox that missed them in a crash.
    pub fn events_after(&self, seq: u64) -> Result<Vec<crate::event::Event>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT line FROM events WHERE seq > ?1 ORDER BY seq")?;
        let lines = stmt
            .query_map([seq as i64], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    pub fn attempts(&self, task: &str) -> Result<Vec<v1::Attempt>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT task, attempt, node, pid, started_ms, ended_ms, exit_code, signal, end_reason, error
             FROM attempts WHERE task = ?1 ORDER BY attempt",
        )?;
        let rows = stmt.query_map([task], attempt_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub fn attempt(&self, task: &str, attempt: u32) -> Result<Option<v1::Attempt>, StoreError> {
        Ok(self.attempts_one(task, attempt).optional()?)
    }

    fn attempts_one(&self, task: &str, attempt: u32) -> rusqlite::Result<v1::Attempt> {
        self.conn.query_row(
            "SELECT task, attempt, node, pid, started_ms, ended_ms, exit_code, signal, end_reason, error
             FROM attempts WHERE task = ?1 AND attempt = ?2",
            params![task, attempt],
            attempt_row,
        )
    }
}

fn attempt_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<v1::Attempt> {
    Ok(v1::Attempt {
        task: r.get(0)?,
        attempt: r.get(1)?,
        node: r.get(2)?,
        pid: r.get(3)?,
        started_ms: r.get(4)?,
        ended_ms: r.get(5)?,
        exit_code: r.get(6)?,
        signal: r.get(7)?,
        end_reason: r.get(8)?,
        error: r.get(9)?,
    })
}

fn decode_metric(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) if s == "NaN" => Some(f64::NAN),
        serde_json::Value::String(s) if s == "Infinity" => Some(f64::INFINITY),
        serde_json::Value::String(s) if s == "-Infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}
