//! Scripted runs for the simulator: the built-in demo, a TOML scenario file,
//! or a bulk high-throughput workload.

use std::time::Duration;

use serde::Deserialize;

use super::Fault;

/// What the simulator serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Bearer token accepted (as user `user-1`).
    #[serde(default = "default_token")]
    pub token: String,
    /// Session cookie value accepted (as user `user-1`).
    #[serde(default = "default_session")]
    pub session: String,
    /// Most events in one poll response.
    #[serde(default = "default_page_size")]
    pub page_size: usize,
    /// Seconds between SSE `status` heartbeats.
    #[serde(default = "default_heartbeat", with = "humantime_serde_compat")]
    pub heartbeat: Duration,
    /// How stream frames are written.
    #[serde(default)]
    pub stream: StreamStyle,
    /// Serve every payload pretty-printed, a member per line with CRLF
    /// breaks, in poll answers and stream frames (where each line becomes
    /// its own `data:` line), as some servers do. The same JSON values.
    #[serde(default)]
    pub pretty_payloads: bool,
    #[serde(default)]
    pub runs: Vec<ScriptedRun>,
    #[serde(default)]
    pub bulk: Option<Bulk>,
    #[serde(default)]
    pub faults: Vec<Fault>,
}

/// The shapes a real stream may take, for parity tests.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamStyle {
    /// `run_event` frames carry the event's fields flattened, not under `event`.
    #[serde(default)]
    pub flat: bool,
    /// Frames span several `data:` lines.
    #[serde(default)]
    pub multiline: bool,
    /// Each frame goes out in small pieces, separate writes.
    #[serde(default)]
    pub split: bool,
    /// `: ping` comment lines between frames.
    #[serde(default)]
    pub comments: bool,
}

/// N runs x M events, no delays unless `interval` says so.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bulk {
    pub runs: usize,
    pub events: usize,
    #[serde(default, with = "humantime_serde_compat")]
    pub interval: Duration,
    #[serde(default = "default_bulk_prefix")]
    pub prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedRun {
    pub id: String,
    /// Owner; a run of another user answers 403.
    #[serde(default = "default_user")]
    pub owner: String,
    /// Time between events.
    #[serde(default, with = "humantime_serde_compat")]
    pub interval: Duration,
    /// Status once every event is out.
    #[serde(default = "default_final")]
    pub final_status: String,
    pub error_message: Option<String>,
    pub cancel_reason: Option<String>,
    /// False: the run stays `pending` until a `start` control action.
    #[serde(default = "yes")]
    pub started: bool,
    #[serde(default)]
    pub events: Vec<ScriptedEvent>,
    /// Events emitted after a `retry` control action on the failed run.
    #[serde(default)]
    pub retry_events: Vec<ScriptedEvent>,
    /// Status a retried run ends with (default `completed`); `failed` lets
    /// it be retried again.
    #[serde(default)]
    pub retry_final_status: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedEvent {
    #[serde(rename = "type")]
    pub event_type: String,
    /// Raw JSON text, served byte for byte.
    #[serde(default = "empty_object")]
    pub payload: String,
    /// Explicit sequence (to make gaps); default: previous + 1.
    pub sequence: Option<i64>,
    /// False: the event has no `createdAt`.
    #[serde(default = "yes")]
    pub created_at: bool,
}

fn default_token() -> String {
    "sim-token".into()
}
fn default_session() -> String {
    "sim-session".into()
}
fn default_page_size() -> usize {
    500
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(5)
}
fn default_bulk_prefix() -> String {
    "bulk".into()
}
fn default_user() -> String {
    super::USER.into()
}
fn default_final() -> String {
    "completed".into()
}
fn empty_object() -> String {
    "{}".into()
}
fn yes() -> bool {
    true
}

/// Durations as `"150ms"` strings.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            token: default_token(),
            session: default_session(),
            page_size: default_page_size(),
            heartbeat: default_heartbeat(),
            stream: StreamStyle::default(),
            pretty_payloads: false,
            runs: Vec::new(),
            bulk: None,
            faults: Vec::new(),
        }
    }
}

impl Scenario {
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The built-in demo: runs that complete, fail and get cancelled, with
    /// a sequence gap, an unknown event type and an event without
    /// `createdAt`.
    pub fn demo() -> Self {
        let step = Duration::from_millis(120);
        let mut rome = run("demo-rome-0001", step, demo_phases("rome"));
        rome.final_status = "completed".into();
        let mut oslo = run(
            "demo-oslo-0002",
            step,
            demo_phases("oslo").into_iter().take(5).collect(),
        );
        oslo.final_status = "failed".into();
        oslo.error_message = Some("Flight search timed out".into());
        let mut kyoto = run(
            "demo-kyoto-0003",
            step,
            demo_phases("kyoto").into_iter().take(3).collect(),
        );
        kyoto.final_status = "cancelled".into();
        kyoto.cancel_reason = Some("User cancelled the plan".into());
        let lima = run("demo-lima-0004", step, lima_events());
        Self {
            runs: vec![rome, oslo, kyoto, lima],
            ..Self::default()
        }
    }
}

/// A demo run's events: the eight phases, with two artifacts on the way
/// (one with a non-ASCII payload and keys out of order, to show payload
/// bytes pass through untouched).
fn demo_phases(run: &str) -> Vec<ScriptedEvent> {
    let mut events = Vec::new();
    for (i, phase) in [
        "understand",
        "plan",
        "retrieve",
        "reason",
        "act",
        "compose",
        "deliver",
        "done",
    ]
    .iter()
    .enumerate()
    {
        events.push(event("PHASE_STARTED", &format!(r#"{{"phase":"{phase}"}}"#)));
        if i == 3 {
            events.push(event(
                "ARTIFACT_CREATED",
                &format!(
                    r#"{{"artifactType":"candidates","trip":"{run}","score":1.10,"note":"café ☕","z":1,"a":2}}"#
                ),
            ));
        }
        if i == 5 {
            events.push(event(
                "ARTIFACT_CREATED",
                r#"{"artifactType":"proposals","count":3}"#,
            ));
        }
    }
    events
}

/// The demo run that shows the odd cases: a sequence gap, an unknown event
/// type (`TOOL_CALLED`) and an event without `createdAt`.
fn lima_events() -> Vec<ScriptedEvent> {
    let mut events = vec![
        event("PHASE_STARTED", r#"{"phase":"understand"}"#),
        event("PHASE_STARTED", r#"{"phase":"plan"}"#),
    ];
    let mut gap = event("PHASE_STARTED", r#"{"phase":"retrieve"}"#);
    gap.sequence = Some(5);
    events.push(gap);
    events.push(event(
        "TOOL_CALLED",
        r#"{"tool":"hotel_search","args":{"city":"Lima","nights":3}}"#,
    ));
    let mut undated = event("ARTIFACT_CREATED", r#"{"artifactType":"entities"}"#);
    undated.created_at = false;
    events.push(undated);
    events.push(event("PHASE_STARTED", r#"{"phase":"done"}"#));
    events
}

fn event(event_type: &str, payload: &str) -> ScriptedEvent {
    ScriptedEvent {
        event_type: event_type.into(),
        payload: payload.into(),
        sequence: None,
        created_at: true,
    }
}

fn run(id: &str, interval: Duration, events: Vec<ScriptedEvent>) -> ScriptedRun {
    ScriptedRun {
        id: id.into(),
        owner: default_user(),
        interval,
        final_status: default_final(),
        error_message: None,
        cancel_reason: None,
        started: true,
        events,
        retry_events: Vec::new(),
        retry_final_status: None,
    }
}

/// The runs of a bulk workload.
pub(super) fn bulk_runs(bulk: &Bulk) -> Vec<ScriptedRun> {
    const TYPES: [&str; 3] = ["PHASE_STARTED", "ARTIFACT_CREATED", "TOOL_CALLED"];
    (0..bulk.runs)
        .map(|r| {
            let events = (0..bulk.events)
                .map(|i| {
                    event(
                        TYPES[i % 3],
                        &format!(r#"{{"n":{i},"run":{r},"ratio":0.10}}"#),
                    )
                })
                .collect();
            run(&format!("{}-{r:05}", bulk.prefix), bulk.interval, events)
        })
        .collect()
}

/// `raw` JSON text with a CRLF and two spaces of indent after every `{`,
/// `[` and `,` outside strings: the same JSON value over several lines,
/// every other byte untouched.
fn pretty(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() * 2);
    let (mut in_string, mut escaped, mut depth) = (false, false, 0usize);
    for c in raw.chars() {
        out.push(c);
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if matches!(c, '{' | '[' | ',') {
            out.push_str("\r\n");
            out.push_str(&"  ".repeat(depth));
        }
    }
    out
}

/// `script` with its payloads (retries' too) [`pretty`]-printed.
pub(super) fn prettified(script: &ScriptedRun) -> ScriptedRun {
    let mut script = script.clone();
    for event in script.events.iter_mut().chain(&mut script.retry_events) {
        event.payload = pretty(&event.payload);
    }
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_keeps_the_json_value_and_breaks_lines_outside_strings() {
        for raw in [
            r#"{"b":1.10,"a":"x,{[\"\\","z":[1,{"y":[]}],"e":{}}"#,
            "[]",
            "7",
        ] {
            let printed = pretty(raw);
            let value = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
            assert_eq!(value(&printed), value(raw), "{printed}");
            let stripped: String = printed.split("\r\n").map(|l| l.trim_start()).collect();
            assert_eq!(
                stripped,
                raw.replace(' ', ""),
                "only breaks and indent added"
            );
        }
        assert!(pretty(r#"{"a":1,"b":2}"#).contains("\r\n"));
        assert!(!pretty(r#"{"a":"x,y"}"#).contains("x,\r"));
    }
}
