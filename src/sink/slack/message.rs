//! What a Slack message says: a line a person reads at a glance per event
//! type, or the user's template; Block Kit with a plain `text` fallback,
//! inside Slack's limits.

use minijinja::Environment;
use serde::Serialize;
use serde_json::{Value, json};

use crate::store::Pending;

/// Slack's limit on a section's text.
pub const SECTION_LIMIT: usize = 3000;
/// Slack's limit on blocks per message.
pub const BLOCK_LIMIT: usize = 50;

/// A message body for `chat.postMessage`, `chat.update` or an incoming
/// webhook.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub text: String,
    pub blocks: Vec<Value>,
}

/// What templates and default messages may use.
#[derive(Debug, Serialize)]
struct Context<'a> {
    id: &'a str,
    run_id: &'a str,
    event_type: &'a str,
    sequence: Option<i64>,
    status: Option<String>,
    phase: Option<&'a str>,
    created_at: Option<&'a str>,
    payload: Value,
    labels: Value,
    error_message: Option<String>,
    artifact_type: Option<String>,
}

impl<'a> Context<'a> {
    fn of(event: &'a Pending) -> Self {
        let payload: Value = serde_json::from_str(&event.payload).unwrap_or(Value::Null);
        let text = |key: &str| payload.get(key).and_then(Value::as_str).map(str::to_owned);
        let finished = event.event_type == "run_finished";
        Self {
            id: &event.id,
            run_id: &event.run_id,
            event_type: &event.event_type,
            sequence: event.sequence,
            status: if finished {
                text("status")
            } else {
                event.run_status.clone()
            },
            phase: event.phase.as_deref(),
            created_at: event.created_at.as_deref(),
            error_message: text("errorMessage").or_else(|| text("cancelReason")),
            artifact_type: text("artifactType"),
            labels: serde_json::from_str(&event.labels).unwrap_or(Value::Null),
            payload,
        }
    }
}

/// The message for one event: the template for its type if there is one,
/// else the default wording.
pub fn render(event: &Pending, templates: &Environment<'static>) -> Message {
    let context = Context::of(event);
    let custom = templates.get_template(&event.event_type).ok().and_then(|template| {
        template
            .render(minijinja::value::Serde(&context))
            .map_err(|error| tracing::warn!(id = %event.id, %error, "slack template failed; using the default message"))
            .ok()
    });
    let text = custom.unwrap_or_else(|| default_text(&context));
    let details = details(&context);
    build(text, Some(details))
}

/// The root message of a run's thread: its live status.
pub fn thread_root(event: &Pending) -> Message {
    let context = Context::of(event);
    let status = context.status.as_deref().unwrap_or("running");
    let mut text = format!(
        "{} Run `{}` is *{status}*",
        status_icon(status),
        context.run_id
    );
    if let Some(phase) = context.phase.filter(|_| status == "running") {
        text.push_str(&format!(" (phase *{phase}*)"));
    }
    if let Some(why) = &context.error_message {
        text.push_str(&format!(": {why}"));
    }
    build(text, labels_line(&context))
}

fn build(text: String, context_line: Option<String>) -> Message {
    let section = truncate(&text, SECTION_LIMIT);
    let mut blocks = vec![json!({"type": "section", "text": {"type": "mrkdwn", "text": section}})];
    if let Some(line) = context_line.filter(|l| !l.is_empty()) {
        blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": truncate(&line, SECTION_LIMIT)}]}));
    }
    blocks.truncate(BLOCK_LIMIT);
    Message {
        text: truncate(&text, SECTION_LIMIT),
        blocks,
    }
}

fn default_text(c: &Context<'_>) -> String {
    let run = format!("`{}`", c.run_id);
    match c.event_type {
        "run_finished" => {
            let status = c.status.as_deref().unwrap_or("finished");
            let mut text = format!("{} Run {run} *{status}*", status_icon(status));
            if let Some(why) = &c.error_message {
                text.push_str(&format!(": {why}"));
            }
            text
        }
        "PHASE_STARTED" => {
            let phase = c
                .payload
                .get("phase")
                .and_then(Value::as_str)
                .or(c.phase)
                .unwrap_or("?");
            format!(":arrow_forward: Run {run}: phase *{phase}* started")
        }
        "ARTIFACT_CREATED" => {
            format!(
                ":package: Run {run}: artifact *{}* created",
                c.artifact_type.as_deref().unwrap_or("?")
            )
        }
        other => format!(":information_source: Run {run}: {other}"),
    }
}

fn details(c: &Context<'_>) -> String {
    let mut parts = Vec::new();
    if let Some(sequence) = c.sequence {
        parts.push(format!("#{sequence}"));
    }
    parts.push(c.event_type.to_owned());
    if let Some(status) = &c.status {
        parts.push(status.clone());
    }
    if let Some(phase) = c.phase {
        parts.push(format!("phase {phase}"));
    }
    if let Some(labels) = labels_line(c) {
        parts.push(labels);
    }
    parts.join(" · ")
}

fn labels_line(c: &Context<'_>) -> Option<String> {
    let labels = c.labels.as_object()?;
    let line: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                v.as_str().map_or_else(|| v.to_string(), str::to_owned)
            )
        })
        .collect();
    (!line.is_empty()).then(|| line.join(" "))
}

fn status_icon(status: &str) -> &'static str {
    match status {
        "completed" => ":white_check_mark:",
        "failed" => ":x:",
        "cancelled" => ":no_entry_sign:",
        _ => ":hourglass_flowing_sand:",
    }
}

/// At most `limit` characters, with an ellipsis when cut.
pub fn truncate(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit.saturating_sub(1)) {
        Some((i, _)) if text[i..].chars().count() > 1 => format!("{}…", &text[..i]),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn pending(event_type: &str, payload: &str) -> Pending {
        Pending {
            event: 1,
            id: "run-1:3".into(),
            run_id: "run-1".into(),
            sequence: Some(3),
            event_type: event_type.into(),
            payload: payload.into(),
            created_at: None,
            run_status: Some("running".into()),
            phase: Some("plan".into()),
            labels: r#"{"team":"rome"}"#.into(),
            attempts: 0,
            next_attempt_at: 0,
            seen_at: 0,
            queued_at: 0,
        }
    }

    #[test]
    fn defaults_read_at_a_glance() {
        let env = Environment::new();
        let failed = render(
            &pending(
                "run_finished",
                r#"{"status":"failed","errorMessage":"Flight search timed out","lastSequence":5}"#,
            ),
            &env,
        );
        assert_eq!(
            failed.text,
            ":x: Run `run-1` *failed*: Flight search timed out"
        );
        let phase = render(&pending("PHASE_STARTED", r#"{"phase":"compose"}"#), &env);
        assert!(phase.text.contains("phase *compose* started"));
        let artifact = render(
            &pending("ARTIFACT_CREATED", r#"{"artifactType":"proposals"}"#),
            &env,
        );
        assert!(artifact.text.contains("artifact *proposals*"));
        let other = render(&pending("TOOL_CALLED", "{}"), &env);
        assert!(other.text.contains("TOOL_CALLED"));
        assert!(
            other.blocks[1]["elements"][0]["text"]
                .as_str()
                .unwrap()
                .contains("team=rome")
        );
    }

    #[test]
    fn templates_replace_the_default() {
        let mut env = Environment::new();
        env.add_template_owned(
            "run_finished".to_owned(),
            "{{ run_id }} ended {{ status }} at #{{ payload.lastSequence }}".to_owned(),
        )
        .unwrap();
        let message = render(
            &pending("run_finished", r#"{"status":"completed","lastSequence":9}"#),
            &env,
        );
        assert_eq!(message.text, "run-1 ended completed at #9");
    }

    #[test]
    fn limits_hold_for_huge_text() {
        let mut env = Environment::new();
        env.add_template_owned("X".to_owned(), "{{ payload.big }}".to_owned())
            .unwrap();
        let big = "é".repeat(10_000);
        let message = render(&pending("X", &format!(r#"{{"big":"{big}"}}"#)), &env);
        let section = message.blocks[0]["text"]["text"].as_str().unwrap();
        assert_eq!(section.chars().count(), SECTION_LIMIT);
        assert!(message.text.chars().count() <= SECTION_LIMIT);
        assert!(message.blocks.len() <= BLOCK_LIMIT);
    }

    #[test]
    fn truncate_counts_characters() {
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abcd", 3), "ab…");
        assert_eq!(truncate("ééééé", 4).chars().count(), 4);
    }
}
