//! What a Slack message says: a line a person reads at a glance per event
//! type, or the user's template; Block Kit with a plain `text` fallback,
//! inside Slack's limits.
//!
//! Slack reads `<...>` in mrkdwn (and in the `text` fallback) as a mention or
//! a link: upstream text such as an error message saying `<!channel>` would
//! ping a whole channel. So every string that comes from upstream or from
//! labels is escaped (`&`, `<`, `>` as Slack's formatting rules ask), in the
//! default wording and, by default, in template variables.

use std::borrow::Cow;

use minijinja::value::Value as TemplateValue;
use minijinja::{AutoEscape, Environment, Output, State};
use serde::Serialize;
use serde_json::{Value, json};

use crate::sink::Event;
use crate::text::ellipsize_before;

/// Slack's limit on a section's text.
const SECTION_LIMIT: usize = 3000;
/// Slack's limit on blocks per message.
const BLOCK_LIMIT: usize = 50;

/// A message body for `chat.postMessage`, `chat.update` or an incoming
/// webhook.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub text: String,
    pub blocks: Vec<Value>,
}

/// The auto-escape mode of Slack templates: variables are escaped for mrkdwn.
const SLACK_ESCAPE: &str = "slack-mrkdwn";

/// A template environment whose variables are escaped for mrkdwn unless
/// marked `|safe`: a template author writes Slack markup, the data in it
/// cannot.
pub fn template_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::Custom(SLACK_ESCAPE.into()));
    env.set_formatter(format_for_slack);
    env
}

fn format_for_slack(
    out: &mut Output<'_>,
    state: &mut State<'_, '_>,
    value: &TemplateValue,
) -> Result<(), minijinja::Error> {
    match state.auto_escape() {
        AutoEscape::Custom(name) if name == SLACK_ESCAPE => {
            let text = value.to_string();
            let text = if value.is_safe() {
                Cow::Borrowed(text.as_str())
            } else {
                escape(&text)
            };
            out.write_str(&text).map_err(minijinja::Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// `&`, `<` and `>` as Slack's formatting rules want them escaped; nothing
/// else needs it.
fn escape(text: &str) -> Cow<'_, str> {
    if !text.contains(['&', '<', '>']) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The variables a template may use: [`Context`]'s fields (a test keeps the
/// two the same). `check` refuses a template that reads any other.
pub const TEMPLATE_VARIABLES: &[&str] = &[
    "id",
    "run_id",
    "event_type",
    "sequence",
    "status",
    "phase",
    "created_at",
    "payload",
    "labels",
    "error_message",
    "artifact_type",
];

/// What templates and default messages may use. Built raw from the event;
/// [`Context::escaped`] is what the default wording prints.
#[derive(Debug, Serialize)]
struct Context {
    id: String,
    run_id: String,
    event_type: String,
    sequence: Option<i64>,
    status: Option<String>,
    phase: Option<String>,
    created_at: Option<String>,
    payload: Value,
    labels: Value,
    error_message: Option<String>,
    artifact_type: Option<String>,
}

impl Context {
    fn of(event: &Event<'_>) -> Self {
        let payload: Value = serde_json::from_str(event.payload).unwrap_or(Value::Null);
        let text = |key: &str| payload.get(key).and_then(Value::as_str).map(str::to_owned);
        let finished = event.event_type == "run_finished";
        Self {
            id: event.id.to_owned(),
            run_id: event.run_id.to_owned(),
            event_type: event.event_type.to_owned(),
            sequence: event.sequence,
            status: if finished {
                text("status")
            } else {
                event.run_status.map(str::to_owned)
            },
            phase: event.phase.map(str::to_owned),
            created_at: event.created_at.map(str::to_owned),
            error_message: text("errorMessage").or_else(|| text("cancelReason")),
            artifact_type: text("artifactType"),
            labels: serde_json::from_str(event.labels).unwrap_or(Value::Null),
            payload,
        }
    }

    /// Every string (payload and labels included) escaped for mrkdwn.
    fn escaped(&self) -> Self {
        let text = |s: &str| escape(s).into_owned();
        let optional = |s: &Option<String>| s.as_deref().map(text);
        Self {
            id: text(&self.id),
            run_id: text(&self.run_id),
            event_type: text(&self.event_type),
            sequence: self.sequence,
            status: optional(&self.status),
            phase: optional(&self.phase),
            created_at: optional(&self.created_at),
            payload: escape_json(&self.payload),
            labels: escape_json(&self.labels),
            error_message: optional(&self.error_message),
            artifact_type: optional(&self.artifact_type),
        }
    }
}

/// A JSON value with every string and key escaped for mrkdwn.
fn escape_json(value: &Value) -> Value {
    match value {
        Value::String(s) => Value::String(escape(s).into_owned()),
        Value::Array(items) => Value::Array(items.iter().map(escape_json).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (escape(k).into_owned(), escape_json(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The message for one event: the template for its type if there is one,
/// else the default wording.
pub fn render(event: &Event<'_>, templates: &Environment<'static>) -> Message {
    let raw = Context::of(event);
    let custom = templates.get_template(event.event_type).ok().and_then(|template| {
        template
            .render(minijinja::value::Serde(&raw))
            .map_err(|error| tracing::warn!(id = %event.id, %error, "slack template failed; using the default message"))
            .ok()
    });
    let context = raw.escaped();
    let text = custom.unwrap_or_else(|| default_text(&context));
    let details = details(&context);
    build(text, Some(details))
}

/// The root message of a run's thread: its live status.
pub fn thread_root(event: &Event<'_>) -> Message {
    let context = Context::of(event).escaped();
    let status = context.status.as_deref().unwrap_or("running");
    let mut text = format!(
        "{} Run `{}` is *{status}*",
        status_icon(status),
        context.run_id
    );
    if let Some(phase) = context.phase.as_deref().filter(|_| status == "running") {
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

fn default_text(c: &Context) -> String {
    let run = format!("`{}`", c.run_id);
    match c.event_type.as_str() {
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
                .or(c.phase.as_deref())
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

fn details(c: &Context) -> String {
    let mut parts = Vec::new();
    if let Some(sequence) = c.sequence {
        parts.push(format!("#{sequence}"));
    }
    parts.push(c.event_type.clone());
    if let Some(status) = &c.status {
        parts.push(status.clone());
    }
    if let Some(phase) = &c.phase {
        parts.push(format!("phase {phase}"));
    }
    if let Some(labels) = labels_line(c) {
        parts.push(labels);
    }
    parts.join(" · ")
}

fn labels_line(c: &Context) -> Option<String> {
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

/// Statuses as the Agent Runs API spells them: the final ones get their own
/// icon, any other (one this runhook does not know included) is under way.
fn status_icon(status: &str) -> &'static str {
    match status {
        "completed" => ":white_check_mark:",
        "failed" => ":x:",
        "cancelled" => ":no_entry_sign:",
        _ => ":hourglass_flowing_sand:",
    }
}

/// At most `limit` characters, with an ellipsis when cut. A cut never
/// splits an escape such as `&amp;`: a half entity would show as litter.
fn truncate(text: &str, limit: usize) -> String {
    if text.chars().nth(limit).is_none() {
        return text.to_owned();
    }
    // The ellipsis takes the last place.
    ellipsize_before(text, limit.saturating_sub(1), |head| {
        match head.rfind('&') {
            Some(amp) if head.len() - amp < "&amp;".len() && !head[amp..].contains(';') => {
                &head[..amp]
            }
            _ => head,
        }
    })
    .into_owned()
}

#[cfg(test)]
mod tests;
