//! Output rules on this node: log lines and report messages matched against a task's
//! health rules as they arrive.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regex::RegexSet;

use muster_proto::spec::health::{self, Action, Rule, Trigger};
use muster_proto::v1::LogMatch;

/// The same rule reports again only after this, so a chatty child cannot flood the
/// controller and a recurring condition is still seen.
const REFIRE_AFTER: Duration = Duration::from_secs(60);
const MAX_LINE_IN_EVENT: usize = 1024;

pub struct RuleMatcher {
    set: Option<RegexSet>,
    rules: Vec<Rule>,
    last_fired: Mutex<HashMap<usize, Instant>>,
    wait_until: Arc<Mutex<Option<Instant>>>,
}

impl RuleMatcher {
    /// `wait_until` is where a matching `wait` rule records until when restarts must wait.
    pub fn new(rules: &[Rule], wait_until: Arc<Mutex<Option<Instant>>>) -> Self {
        let output: Vec<Rule> = rules
            .iter()
            .filter(|r| matches!(r.trigger, Trigger::Output(_)))
            .cloned()
            .collect();
        let patterns: Vec<&str> = output
            .iter()
            .map(|r| match &r.trigger {
                Trigger::Output(p) => p.as_str(),
                Trigger::Exit { .. } => unreachable!("filtered to output rules"),
            })
            .collect();
        RuleMatcher {
            set: (!patterns.is_empty())
                .then(|| RegexSet::new(&patterns).ok())
                .flatten(),
            rules: output,
            last_fired: Mutex::new(HashMap::new()),
            wait_until,
        }
    }

    /// The first rule a line matches, unless that rule fired within the last minute.
    pub fn check(&self, line: &str, stream: &str) -> Option<LogMatch> {
        let set = self.set.as_ref()?;
        let index = set.matches(line).into_iter().next()?;
        let now = Instant::now();
        {
            let mut fired = self.last_fired.lock().expect("rule state poisoned");
            if fired
                .get(&index)
                .is_some_and(|t| now.duration_since(*t) < REFIRE_AFTER)
            {
                return None;
            }
            fired.insert(index, now);
        }

        let rule = &self.rules[index];
        let wait = (rule.action == Action::Wait).then(|| {
            health::wait_in_line(line)
                .or(rule.wait)
                .unwrap_or(REFIRE_AFTER)
        });
        if let Some(wait) = wait {
            *self.wait_until.lock().expect("wait state poisoned") = Some(now + wait);
        }
        let Trigger::Output(pattern) = &rule.trigger else {
            unreachable!("only output rules are kept")
        };
        let mut shown = line.to_string();
        if shown.len() > MAX_LINE_IN_EVENT {
            let mut end = MAX_LINE_IN_EVENT;
            while !shown.is_char_boundary(end) {
                end -= 1;
            }
            shown.truncate(end);
        }
        Some(LogMatch {
            pattern: pattern.clone(),
            line: shown,
            stream: stream.to_string(),
            rule: rule.name.clone(),
            action: rule.action.as_str().to_string(),
            severity: rule.severity.clone(),
            wait_ms: wait.map_or(0, |w| w.as_millis() as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_proto::v1;

    #[test]
    fn wait_rule_records_the_reset_time_from_the_line() {
        let health = v1::HealthSpec {
            packs: vec!["llm-agent".into()],
            ..Default::default()
        };
        let (rules, _) = health::resolve(&health);
        let wait_until = Arc::new(Mutex::new(None));
        let matcher = RuleMatcher::new(&rules, wait_until.clone());

        let found = matcher
            .check(
                "RateLimitError: rate limit exceeded, retry after 7s",
                "stderr",
            )
            .unwrap();
        let again = matcher.check(
            "RateLimitError: rate limit exceeded, retry after 7s",
            "stderr",
        );

        assert_eq!(found.rule, "rate_limited");
        assert_eq!(found.wait_ms, 7000);
        assert!(wait_until.lock().unwrap().is_some());
        assert!(again.is_none(), "a rule fires at most once a minute");
    }
}
