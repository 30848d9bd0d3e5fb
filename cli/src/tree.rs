//! `muster tree`: tasks as the org chart of who started whom, with counts per subtree.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

use serde_json::{json, Value};

use muster_proto::v1;

use crate::output;

/// How the tasks of a subtree (a task and all its descendants) stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Not ended: pending, starting, running, stalled, blocked, needs_help, backoff,
    /// stopping.
    pub running: u32,
    /// Running, and nothing wrong with it.
    pub healthy: u32,
    pub stalled: u32,
    pub blocked: u32,
    pub needs_help: u32,
    /// failed or crash_loop.
    pub failed: u32,
    /// succeeded or stopped.
    pub done: u32,
}

impl Counts {
    fn of(state: &str) -> Counts {
        let mut counts = Counts::default();
        match state {
            "pending" | "starting" | "running" | "stalled" | "blocked" | "needs_help"
            | "backoff" | "stopping" => counts.running = 1,
            "failed" | "crash_loop" => counts.failed = 1,
            "succeeded" | "stopped" => counts.done = 1,
            _ => {}
        }
        match state {
            "running" => counts.healthy = 1,
            "stalled" => counts.stalled = 1,
            "blocked" => counts.blocked = 1,
            "needs_help" => counts.needs_help = 1,
            _ => {}
        }
        counts
    }

    fn add(&mut self, other: Counts) {
        self.running += other.running;
        self.healthy += other.healthy;
        self.stalled += other.stalled;
        self.blocked += other.blocked;
        self.needs_help += other.needs_help;
        self.failed += other.failed;
        self.done += other.done;
    }

    /// "running 3 (healthy 2, stalled 1), failed 1": the counts that are not zero.
    fn summary(&self) -> String {
        let mut parts = Vec::new();
        if self.running > 0 {
            let detail: Vec<String> = [
                ("healthy", self.healthy),
                ("stalled", self.stalled),
                ("blocked", self.blocked),
                ("needs_help", self.needs_help),
            ]
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(word, n)| format!("{word} {n}"))
            .collect();
            let detail = if detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", detail.join(", "))
            };
            parts.push(format!("running {}{detail}", self.running));
        }
        for (word, n) in [("failed", self.failed), ("done", self.done)] {
            if n > 0 {
                parts.push(format!("{word} {n}"));
            }
        }
        parts.join(", ")
    }

    fn json(&self) -> Value {
        json!({
            "running": self.running,
            "healthy": self.healthy,
            "stalled": self.stalled,
            "blocked": self.blocked,
            "needs_help": self.needs_help,
            "failed": self.failed,
            "done": self.done,
        })
    }
}

/// A task with its children, oldest first, and the counts over all of them.
#[derive(Debug, Clone)]
pub struct Tree {
    pub task: v1::Task,
    pub counts: Counts,
    pub children: Vec<Tree>,
}

impl Tree {
    pub fn name(&self) -> &str {
        name(&self.task)
    }
}

fn name(task: &v1::Task) -> &str {
    task.spec.as_ref().map_or("", |s| s.name.as_str())
}

/// Children and roots are drawn in the order they were created.
fn order(task: &v1::Task) -> (i64, &str) {
    (task.created_ms, name(task))
}

/// The tasks as trees, roots oldest first. A task is a root when it has no parent or its
/// parent is not among `tasks` (a subtree's top, or a parent already forgotten).
pub fn forest(tasks: Vec<v1::Task>) -> Vec<Tree> {
    let names: HashSet<&str> = tasks.iter().map(name).collect();
    let mut roots = Vec::new();
    let mut children: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, task) in tasks.iter().enumerate() {
        if task.parent.is_empty() || task.parent == name(task) || !names.contains(&*task.parent) {
            roots.push(i);
        } else {
            children.entry(task.parent.clone()).or_default().push(i);
        }
    }
    for list in children.values_mut() {
        list.sort_by(|a, b| order(&tasks[*a]).cmp(&order(&tasks[*b])));
    }

    roots.sort_by(|a, b| order(&tasks[*a]).cmp(&order(&tasks[*b])));

    // Tasks on a parent cycle reach no root. After the real roots, every task not yet
    // placed starts a tree of its own, oldest first: each cycle is cut at its oldest task
    // and every task is drawn exactly once, whatever the controller sent.
    let mut all: Vec<usize> = (0..tasks.len()).collect();
    all.sort_by(|a, b| order(&tasks[*a]).cmp(&order(&tasks[*b])));
    let mut slots: Vec<Option<v1::Task>> = tasks.into_iter().map(Some).collect();
    roots
        .into_iter()
        .chain(all)
        .filter_map(|i| grow(i, &mut slots, &children))
        .collect()
}

/// The tree below `slots[i]`, taking each task out of `slots` as it is placed.
fn grow(
    i: usize,
    slots: &mut [Option<v1::Task>],
    children: &HashMap<String, Vec<usize>>,
) -> Option<Tree> {
    let task = slots[i].take()?;
    let below: Vec<Tree> = children
        .get(name(&task))
        .into_iter()
        .flatten()
        .filter_map(|&child| grow(child, slots, children))
        .collect();
    let mut counts = Counts::of(&task.state);
    for child in &below {
        counts.add(child.counts);
    }
    Some(Tree {
        task,
        counts,
        children: below,
    })
}

/// The tree whose top is the task `name`, wherever it is in the forest.
pub fn subtree(forest: Vec<Tree>, name: &str) -> Option<Tree> {
    let mut stack = forest;
    while let Some(tree) = stack.pop() {
        if tree.name() == name {
            return Some(tree);
        }
        stack.extend(tree.children);
    }
    None
}

/// The forest as the JSON array of `muster tree --json`.
pub fn json(forest: &[Tree]) -> Value {
    Value::Array(forest.iter().map(tree_json).collect())
}

fn tree_json(tree: &Tree) -> Value {
    let task = &tree.task;
    json!({
        "name": tree.name(),
        "state": task.state,
        "node": task.node,
        "attempt": task.attempt,
        "parent": task.parent,
        "root": task.root,
        "message": task.message,
        "counts": tree.counts.json(),
        "children": json(&tree.children),
    })
}

/// One drawn line before alignment.
struct Row<'a> {
    branch: String,
    tree: &'a Tree,
}

/// The forest drawn with box-drawing connectors, one aligned line per task: name, state,
/// node, and for a task with descendants the counts over its subtree.
pub fn render(forest: &[Tree], color: bool) -> String {
    let mut rows = Vec::new();
    for tree in forest {
        rows.push(Row {
            branch: String::new(),
            tree,
        });
        lay_out(tree, "", &mut rows);
    }
    let widest = |cell: fn(&Row) -> usize| rows.iter().map(cell).max().unwrap_or(0);
    let name_width = widest(|r| r.branch.chars().count() + r.tree.name().chars().count());
    let state_width = widest(|r| r.tree.task.state.chars().count());
    let node_width = widest(|r| node(r.tree).chars().count());

    let mut out = String::new();
    for row in &rows {
        let task = &row.tree.task;
        let name = format!("{}{}", row.branch, row.tree.name());
        let pad = state_width.saturating_sub(task.state.chars().count());
        let state = if color {
            output::painted(&task.state)
        } else {
            task.state.clone()
        };
        let counts = if row.tree.children.is_empty() {
            String::new()
        } else {
            row.tree.counts.summary()
        };
        // Widths count characters, so the connectors pad like any other letter; the
        // state is padded apart because its colour codes take no room on screen.
        let mut line = format!(
            "{name:<name_width$}  {state}{:pad$}  {:<node_width$}  {counts}",
            "",
            node(row.tree),
        );
        line.truncate(line.trim_end().len());
        let _ = writeln!(out, "{line}");
    }
    out
}

/// Adds the rows below `tree`; `stem` is what the lines of its children start with.
fn lay_out<'a>(tree: &'a Tree, stem: &str, rows: &mut Vec<Row<'a>>) {
    let last = tree.children.len().saturating_sub(1);
    for (i, child) in tree.children.iter().enumerate() {
        let (joint, rail) = if i == last {
            ("└─ ", "   ")
        } else {
            ("├─ ", "│  ")
        };
        rows.push(Row {
            branch: format!("{stem}{joint}"),
            tree: child,
        });
        lay_out(child, &format!("{stem}{rail}"), rows);
    }
}

fn node(tree: &Tree) -> &str {
    // A pending task is on no node yet, whatever its last attempt ran on.
    if tree.task.node.is_empty() || tree.task.state == "pending" {
        "-"
    } else {
        &tree.task.node
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str, parent: &str, state: &str, created_ms: i64) -> v1::Task {
        v1::Task {
            spec: Some(v1::TaskSpec {
                name: name.into(),
                ..Default::default()
            }),
            state: state.into(),
            node: if state == "running" || state == "stalled" {
                "node-1".into()
            } else {
                String::new()
            },
            parent: parent.into(),
            root: if parent.is_empty() { "" } else { "boss" }.into(),
            created_ms,
            ..Default::default()
        }
    }

    /// boss ── lead-a ── worker-a1, worker-a2; boss ── lead-b; listed out of order.
    fn org() -> Vec<v1::Task> {
        vec![
            task("worker-a2", "lead-a", "failed", 5),
            task("lead-b", "boss", "succeeded", 3),
            task("boss", "", "running", 1),
            task("worker-a1", "lead-a", "stalled", 4),
            task("lead-a", "boss", "running", 2),
        ]
    }

    fn names(forest: &[Tree]) -> Vec<&str> {
        forest.iter().map(Tree::name).collect()
    }

    #[test]
    fn children_hang_under_their_parent_oldest_first() {
        let forest = forest(org());

        assert_eq!(names(&forest), ["boss"]);
        assert_eq!(names(&forest[0].children), ["lead-a", "lead-b"]);
        assert_eq!(
            names(&forest[0].children[0].children),
            ["worker-a1", "worker-a2"]
        );
        assert!(forest[0].children[1].children.is_empty());
    }

    #[test]
    fn siblings_created_together_are_ordered_by_name() {
        let tasks = vec![
            task("boss", "", "running", 1),
            task("b", "boss", "running", 2),
            task("a", "boss", "running", 2),
        ];

        let forest = forest(tasks);

        assert_eq!(names(&forest[0].children), ["a", "b"]);
    }

    #[test]
    fn counts_cover_the_task_and_all_its_descendants() {
        let forest = forest(org());

        let boss = forest[0].counts;
        assert_eq!(
            boss,
            Counts {
                running: 3,
                healthy: 2,
                stalled: 1,
                blocked: 0,
                needs_help: 0,
                failed: 1,
                done: 1,
            }
        );
        let lead_a = forest[0].children[0].counts;
        assert_eq!((lead_a.running, lead_a.healthy), (2, 1));
        assert_eq!((lead_a.failed, lead_a.done), (1, 0));
    }

    #[test]
    fn states_fall_into_their_buckets() {
        let bucket = |state: &str| Counts::of(state);

        assert_eq!(bucket("backoff").running, 1);
        assert_eq!(bucket("stopping").running, 1);
        assert_eq!(bucket("needs_help").needs_help, 1);
        assert_eq!(bucket("blocked").blocked, 1);
        assert_eq!(bucket("crash_loop").failed, 1);
        assert_eq!(bucket("stopped").done, 1);
        // Pending has not ended: it counts as running, not as healthy.
        assert_eq!(
            bucket("pending"),
            Counts {
                running: 1,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn a_task_whose_parent_is_not_listed_is_a_root() {
        let tasks = vec![
            task("orphan", "gone", "running", 2),
            task("boss", "", "running", 1),
            task("kid", "orphan", "running", 3),
        ];

        let forest = forest(tasks);

        assert_eq!(names(&forest), ["boss", "orphan"]);
        assert_eq!(names(&forest[1].children), ["kid"]);
        assert_eq!(
            forest[1].task.parent, "gone",
            "the parent is still reported"
        );
    }

    #[test]
    fn a_parent_cycle_is_cut_so_every_task_is_drawn_once() {
        let tasks = vec![
            task("x", "y", "running", 1),
            task("y", "x", "running", 2),
            task("self", "self", "running", 3),
        ];

        let forest = forest(tasks);

        assert_eq!(names(&forest), ["self", "x"]);
        assert_eq!(names(&forest[1].children), ["y"]);
    }

    #[test]
    fn a_three_level_tree_is_drawn_with_connectors_and_counts() {
        let text = render(&forest(org()), false);

        let expected = "\
boss             running    node-1  running 3 (healthy 2, stalled 1), failed 1, done 1
├─ lead-a        running    node-1  running 2 (healthy 1, stalled 1), failed 1
│  ├─ worker-a1  stalled    node-1
│  └─ worker-a2  failed     -
└─ lead-b        succeeded  -
";
        assert_eq!(text, expected);
    }

    #[test]
    fn subtree_finds_a_task_anywhere_in_the_forest() {
        let lead_a = subtree(forest(org()), "lead-a").expect("lead-a is there");

        assert_eq!(lead_a.name(), "lead-a");
        assert_eq!(names(&lead_a.children), ["worker-a1", "worker-a2"]);
        assert!(subtree(forest(org()), "nobody").is_none());
    }

    #[test]
    fn json_nests_children_with_their_counts() {
        let value = json(&forest(org()));

        let boss = &value[0];
        assert_eq!(boss["name"], "boss");
        assert_eq!(boss["counts"]["running"], 3);
        assert_eq!(boss["counts"]["done"], 1);
        let worker = &boss["children"][0]["children"][1];
        assert_eq!(worker["name"], "worker-a2");
        assert_eq!(worker["parent"], "lead-a");
        assert_eq!(worker["root"], "boss");
        assert_eq!(worker["counts"]["failed"], 1);
        assert_eq!(worker["children"], json!([]));
        for key in ["state", "node", "attempt", "message"] {
            assert!(boss.get(key).is_some(), "{key} is in {boss}");
        }
    }
}
