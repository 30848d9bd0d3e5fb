//! What the real services accept and answer: PagerDuty's Events API v2, a Slack incoming
//! webhook and Slack's Web API, each checked field by field as the service checks them.

use std::collections::HashMap;

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{Answer, Service, Shared, BOT_TOKEN, ROUTING_KEY};

/// An HTTP answer.
pub(super) struct Reply {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub content_type: &'static str,
    pub body: String,
}

/// What the real service would reject in a request; empty for a valid one.
pub(super) fn check(
    service: Service,
    path: &str,
    headers: &HashMap<String, String>,
    body: &Value,
    posted: &HashMap<String, String>,
) -> Vec<String> {
    match service {
        Service::PagerDuty => check_pagerduty(path, body),
        Service::SlackWebhook => check_slack_webhook(path, body),
        Service::SlackBot => check_slack_bot(path, headers, body, posted),
    }
}

/// The answer to the recorded request `index`.
pub(super) fn reply(shared: &Shared, index: usize, answer: Answer) -> Reply {
    let json = |status: u16, body: Value| Reply {
        status,
        retry_after: None,
        content_type: "application/json",
        body: body.to_string(),
    };
    match answer {
        Answer::Throttle { retry_after_s } => Reply {
            retry_after: Some(retry_after_s),
            ..match shared.service {
                Service::PagerDuty => json(429, json!({"status": "throttle event"})),
                Service::SlackWebhook => Reply {
                    status: 429,
                    retry_after: None,
                    content_type: "text/plain",
                    body: "rate_limited".into(),
                },
                Service::SlackBot => json(429, json!({"ok": false, "error": "ratelimited"})),
            }
        },
        Answer::ServerError => Reply {
            status: 500,
            retry_after: None,
            content_type: "text/plain",
            body: "internal server error".into(),
        },
        Answer::Reject => match shared.service {
            Service::PagerDuty => json(
                400,
                json!({"status": "invalid event", "message": "Event object is invalid",
                       "errors": ["rejected by the test"]}),
            ),
            Service::SlackWebhook => Reply {
                status: 400,
                retry_after: None,
                content_type: "text/html",
                body: "invalid_payload".into(),
            },
            Service::SlackBot => json(200, json!({"ok": false, "error": "invalid_arguments"})),
        },
        Answer::Hang => unreachable!("a hanging request gets no reply"),
        Answer::Normal => normal_reply(shared, index, json),
    }
}

/// What the real service answers: its success for a valid request, its error otherwise.
fn normal_reply(shared: &Shared, index: usize, json: impl Fn(u16, Value) -> Reply) -> Reply {
    let mut state = shared.state();
    let request = state.requests[index].clone();
    let problems = request.problems.join("; ");
    match shared.service {
        Service::PagerDuty if problems.is_empty() => json(
            202,
            json!({"status": "success", "message": "Event processed",
                   "dedup_key": request.dedup_key()}),
        ),
        Service::PagerDuty => json(
            400,
            json!({"status": "invalid event", "message": "Event object is invalid",
                   "errors": request.problems}),
        ),
        Service::SlackWebhook => Reply {
            status: if problems.is_empty() { 200 } else { 400 },
            retry_after: None,
            content_type: "text/html",
            body: if problems.is_empty() {
                "ok".into()
            } else {
                "invalid_payload".into()
            },
        },
        Service::SlackBot if !problems.is_empty() => {
            let error = request
                .problems
                .iter()
                .find_map(|p| p.split_once(": ").map(|(code, _)| code.to_string()))
                .unwrap_or_else(|| "invalid_arguments".into());
            json(200, json!({"ok": false, "error": error}))
        }
        Service::SlackBot => {
            let channel = channel_id(request.body["channel"].as_str().unwrap_or(""));
            let ts = if request.slack_method() == "chat.update" {
                request.body["ts"].as_str().unwrap_or("").to_string()
            } else {
                let ts = format!("1765000000.{:06}", state.next_ts);
                state.next_ts += 1;
                state.posted.insert(ts.clone(), channel.clone());
                ts
            };
            json(
                200,
                json!({"ok": true, "channel": channel, "ts": ts,
                       "message": {"text": request.body["text"], "ts": ts}}),
            )
        }
    }
}

/// Slack answers with channel ids: C… for a channel name, D… for a direct message to U….
fn channel_id(channel: &str) -> String {
    let id: String = channel
        .trim_start_matches('#')
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_uppercase();
    match channel.chars().next() {
        Some('#') => format!("C{id}"),
        Some('U') | Some('W') => format!("D{id}"),
        _ => channel.to_string(),
    }
}

fn check_pagerduty(path: &str, body: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if path != "/v2/enqueue" {
        problems.push(format!("path {path}, expected /v2/enqueue"));
    }
    let routing_key = body["routing_key"].as_str().unwrap_or("");
    if routing_key.is_empty() {
        problems.push("routing_key is missing".into());
    } else if routing_key != ROUTING_KEY {
        problems.push(format!(
            "routing_key {routing_key:?} is not the configured one"
        ));
    }
    let action = body["event_action"].as_str().unwrap_or("");
    if !matches!(action, "trigger" | "acknowledge" | "resolve") {
        problems.push(format!(
            "event_action {action:?}, expected trigger, acknowledge or resolve"
        ));
    }
    match body["dedup_key"].as_str() {
        None | Some("") => problems.push("dedup_key is missing".into()),
        Some(key) if key.len() > 255 => problems.push(format!(
            "dedup_key is {} characters, at most 255",
            key.len()
        )),
        Some(key) if key.contains(ROUTING_KEY) => {
            problems.push("dedup_key contains the routing key".into())
        }
        Some(_) => {}
    }
    if action != "trigger" {
        return problems;
    }

    let payload = &body["payload"];
    if !payload.is_object() {
        problems.push("payload is missing".into());
        return problems;
    }
    match payload["summary"].as_str() {
        None | Some("") => problems.push("payload.summary is missing".into()),
        Some(s) if s.chars().count() > 1024 => problems.push(format!(
            "payload.summary is {} characters, at most 1024",
            s.chars().count()
        )),
        Some(_) => {}
    }
    if payload["source"].as_str().is_none_or(str::is_empty) {
        problems.push("payload.source is missing".into());
    }
    let severity = payload["severity"].as_str().unwrap_or("");
    if !matches!(severity, "critical" | "error" | "warning" | "info") {
        problems.push(format!(
            "payload.severity {severity:?}, expected critical, error, warning or info"
        ));
    }
    if let Some(ts) = payload.get("timestamp") {
        let parsed = ts
            .as_str()
            .map(|t| OffsetDateTime::parse(t, &Rfc3339).is_ok());
        if parsed != Some(true) {
            problems.push(format!("payload.timestamp {ts} is not RFC 3339"));
        }
    }
    for key in ["component", "group", "class"] {
        if payload.get(key).is_some_and(|v| !v.is_string()) {
            problems.push(format!("payload.{key} is not a string"));
        }
    }
    if payload
        .get("custom_details")
        .is_some_and(|v| !v.is_object())
    {
        problems.push("payload.custom_details is not an object".into());
    }
    problems
}

fn check_slack_webhook(path: &str, body: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if !path.starts_with("/services/") {
        problems.push(format!("path {path}, expected /services/..."));
    }
    if body["text"].as_str().is_none_or(|t| t.trim().is_empty()) {
        problems.push("no_text: text is missing or empty".into());
    }
    problems.extend(check_blocks(body));
    problems
}

/// Slack rejects more than 50 blocks, and a section whose text passes 3000 characters.
fn check_blocks(body: &Value) -> Vec<String> {
    let Some(blocks) = body.get("blocks") else {
        return Vec::new();
    };
    let Some(blocks) = blocks.as_array().filter(|b| b.len() <= 50) else {
        return vec!["invalid_blocks: blocks is not an array of at most 50".into()];
    };
    blocks
        .iter()
        .filter_map(|block| {
            let chars = block["text"]["text"].as_str().map(|t| t.chars().count());
            match chars {
                Some(n) if n > 3000 => Some(format!(
                    "invalid_blocks: a section text of {n} characters, at most 3000"
                )),
                _ => None,
            }
        })
        .collect()
}

fn check_slack_bot(
    path: &str,
    headers: &HashMap<String, String>,
    body: &Value,
    posted: &HashMap<String, String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    match headers.get("authorization") {
        None => problems.push("not_authed: no Authorization header".into()),
        Some(auth) if *auth != format!("Bearer {BOT_TOKEN}") => {
            problems.push(format!("invalid_auth: Authorization {auth:?}"))
        }
        Some(_) => {}
    }
    let method = path.rsplit('/').next().unwrap_or("");
    if !path.starts_with("/api/") || !matches!(method, "chat.postMessage" | "chat.update") {
        problems.push(format!("unknown_method: {path}"));
    }
    let channel = body["channel"].as_str().unwrap_or("");
    if channel.is_empty() {
        problems.push("channel_not_found: channel is missing".into());
    }
    if body["text"].as_str().is_none_or(|t| t.trim().is_empty()) {
        problems.push("no_text: text is missing or empty".into());
    }
    problems.extend(check_blocks(body));
    if method == "chat.update" {
        match body["ts"].as_str() {
            None | Some("") => problems.push("message_not_found: ts is missing".into()),
            Some(ts) => match posted.get(ts) {
                None => problems.push(format!("message_not_found: no message with ts {ts}")),
                Some(id) if id != channel => problems.push(format!(
                    "channel_not_found: update names {channel:?}, the message is in {id:?}"
                )),
                Some(_) => {}
            },
        }
    }
    if let Some(thread) = body.get("thread_ts") {
        if !thread.as_str().is_some_and(|ts| posted.contains_key(ts)) {
            problems.push(format!("thread_not_found: thread_ts {thread}"));
        }
    }
    problems
}
