//! Slack messages: an incoming webhook (one channel, plain follow-ups) or a bot token
//! (`chat.postMessage`, then `chat.update` and thread replies on ack and resolve).

use serde_json::{json, Value};

use super::{commands, Notice, NoticeIncident, Step};

/// Slack renders at most 3000 characters in a section block.
const SECTION_MAX: usize = 2900;
const LISTED_INCIDENTS: usize = 20;

/// The message text, readable at a glance: what, where, why, the last lines, what to run.
pub fn text(notice: &Notice) -> String {
    let icon = match notice.step {
        Step::Trigger | Step::Remind => match notice.severity.as_str() {
            "critical" => ":rotating_light:",
            "warning" | "info" => ":warning:",
            _ => ":red_circle:",
        },
        Step::Acknowledge => ":eyes:",
        Step::Resolve => ":white_check_mark:",
    };
    let mut out = format!("{icon} *{}*", escape(&notice.summary()));
    if notice.step == Step::Acknowledge && !notice.actor.is_empty() {
        out.push_str(&format!(" (by {})", escape(&notice.actor)));
    }
    if notice.incidents.len() == 1 {
        out.push('\n');
        out.push_str(&incident_lines(&notice.incidents[0], true));
    } else {
        for i in notice.incidents.iter().take(LISTED_INCIDENTS) {
            out.push('\n');
            out.push_str(&incident_lines(i, false));
        }
        if notice.incidents.len() > LISTED_INCIDENTS {
            out.push_str(&format!(
                "\n…and {} more (`muster incidents`)",
                notice.incidents.len() - LISTED_INCIDENTS
            ));
        }
    }
    super::truncate(&out, SECTION_MAX)
}

fn incident_lines(i: &NoticeIncident, full: bool) -> String {
    let subject = if i.task.is_empty() {
        format!("node `{}`", i.node)
    } else {
        format!("`{}` on `{}` (attempt {})", i.task, i.node, i.attempt)
    };
    let mut out = format!(
        "• #{} {subject} — {}: {}",
        i.id,
        i.reason,
        escape(&i.message)
    );
    if full {
        if !i.log_tail.is_empty() {
            let lines: Vec<&String> = i
                .log_tail
                .iter()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            out.push_str("\n```");
            for l in lines {
                out.push('\n');
                out.push_str(&l.replace("```", "'''"));
            }
            out.push_str("\n```");
        }
        out.push_str(&format!(
            "\n{}",
            commands(i)
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join("  ")
        ));
    }
    out
}

/// Body for an incoming webhook.
pub fn webhook_body(notice: &Notice) -> Value {
    let text = text(notice);
    json!({ "text": text, "blocks": [{ "type": "section", "text": { "type": "mrkdwn", "text": text } }] })
}

/// Body for `chat.postMessage` (a thread reply when `thread_ts` is given).
pub fn post_body(notice: &Notice, channel: &str, thread_ts: Option<&str>) -> Value {
    let text = text(notice);
    let mut body = json!({ "channel": channel, "text": text, "blocks": [{ "type": "section", "text": { "type": "mrkdwn", "text": text } }] });
    if let Some(ts) = thread_ts {
        body["thread_ts"] = json!(ts);
    }
    body
}

/// Body for `chat.update` of the group's first message.
pub fn update_body(notice: &Notice, channel: &str, ts: &str) -> Value {
    let text = text(notice);
    json!({ "channel": channel, "ts": ts, "text": text, "blocks": [{ "type": "section", "text": { "type": "mrkdwn", "text": text } }] })
}

/// Slack's mrkdwn needs &, < and > escaped.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::Dest;

    #[test]
    fn message_names_task_node_reason_lines_and_commands() {
        let notice = Notice {
            delivery: 1,
            group: 1,
            dest: Dest::Slack,
            step: Step::Trigger,
            dedup_key: "k".into(),
            channel: String::new(),
            severity: "error".into(),
            ts: String::new(),
            incidents: vec![NoticeIncident {
                id: 4,
                task: "train-a".into(),
                node: "node-2".into(),
                attempt: 5,
                reason: "crash_loop".into(),
                severity: "error".into(),
                message: "5 restarts <fast>".into(),
                root: String::new(),
                log_tail: vec!["Traceback".into(), "KeyError: 'lr'".into()],
                state: "open".into(),
            }],
            slack_ref: None,
            actor: String::new(),
        };

        let t = text(&notice);

        assert!(t.contains("`train-a` on `node-2`"), "{t}");
        assert!(t.contains("crash_loop"));
        assert!(t.contains("KeyError"));
        assert!(t.contains("`muster ack 4`"));
        assert!(t.contains("&lt;fast&gt;"));
    }
}
