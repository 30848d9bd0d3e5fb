//! Who is whose parent, shared read-only with the API edge so that inbox reads, watches and
//! task tokens can be bounded to a subtree without a round trip through the core. The core
//! is the only writer; tasks are never removed, so a link once seen stays true.

use std::collections::HashMap;
use std::sync::RwLock;

#[derive(Debug, Default)]
pub struct Lineage {
    parents: RwLock<HashMap<String, String>>,
}

impl Lineage {
    pub fn link(&self, child: &str, parent: &str) {
        self.parents
            .write()
            .expect("lineage lock poisoned")
            .insert(child.to_string(), parent.to_string());
    }

    /// Whether `task` is `ancestor` or below it.
    pub fn within(&self, task: &str, ancestor: &str) -> bool {
        if task == ancestor {
            return true;
        }
        let parents = self.parents.read().expect("lineage lock poisoned");
        let mut current = task;
        // Bounded by the tree's depth; the guard only protects against a corrupt store.
        for _ in 0..4096 {
            match parents.get(current) {
                Some(parent) if parent == ancestor => return true,
                Some(parent) => current = parent,
                None => return false,
            }
        }
        false
    }

    /// Whether `task` is strictly below `ancestor`.
    pub fn below(&self, task: &str, ancestor: &str) -> bool {
        task != ancestor && self.within(task, ancestor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_follows_parents_to_the_root() {
        let l = Lineage::default();
        l.link("worker", "planner");
        l.link("helper", "worker");
        assert!(l.within("helper", "planner"));
        assert!(l.within("planner", "planner"));
        assert!(!l.below("planner", "planner"));
        assert!(l.below("helper", "worker"));
        assert!(!l.within("planner", "helper"));
        assert!(!l.within("stranger", "planner"));
    }
}
