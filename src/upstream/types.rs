//! The Agent Runs API's wire types, shared by the client and the simulator.
//! Parsing is liberal (upstream-api.md): unknown fields are ignored, and the
//! event `payload` is kept as the exact bytes received.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Final statuses: a run in one of them emits no more events (unless retried).
pub const FINAL_STATUSES: [&str; 3] = ["completed", "failed", "cancelled"];

pub fn is_final(status: &str) -> bool {
    FINAL_STATUSES.contains(&status)
}

/// One run event as the API sends it.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Event {
    pub sequence: i64,
    #[serde(rename = "eventType")]
    pub event_type: String,
    /// Kept raw: these bytes reach the sinks unchanged.
    #[serde(default = "null_payload")]
    pub payload: Box<RawValue>,
    #[serde(rename = "createdAt", default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

fn null_payload() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is JSON")
}

/// `GET /v1/agent-runs/{id}/events?since=N`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct EventsPage {
    #[serde(default)]
    pub events: Vec<Event>,
    #[serde(rename = "runStatus", default)]
    pub run_status: Option<String>,
    #[serde(rename = "currentPhase", default)]
    pub current_phase: Option<String>,
}

/// The `run` object of `GET /v1/agent-runs/{id}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RunInfo {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(rename = "lastEventSequence", default)]
    pub last_event_sequence: i64,
    #[serde(
        rename = "errorMessage",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub error_message: Option<String>,
    #[serde(
        rename = "cancelReason",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cancel_reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RunEnvelope {
    pub run: RunInfo,
}

/// `{"error": string | [{path, message}]}`, flattened to one line.
pub fn error_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: serde_json::Value,
    }
    let parsed: ErrorBody = serde_json::from_slice(body).ok()?;
    Some(match parsed.error {
        serde_json::Value::String(s) => s,
        serde_json::Value::Array(issues) => issues
            .iter()
            .map(|issue| {
                let path = issue["path"]
                    .as_array()
                    .map(|p| {
                        p.iter()
                            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                            .collect::<Vec<_>>()
                            .join(".")
                    })
                    .unwrap_or_default();
                let message = issue["message"].as_str().unwrap_or("invalid");
                if path.is_empty() {
                    message.to_owned()
                } else {
                    format!("{path}: {message}")
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_bytes_are_kept_exactly() {
        let body = r#"{"events":[{"sequence":3,"eventType":"X","payload":{"b":1.10,"a":"é\u00e9"}}],"runStatus":"running","extra":1}"#;
        let page: EventsPage = serde_json::from_str(body).unwrap();
        assert_eq!(page.events[0].payload.get(), r#"{"b":1.10,"a":"é\u00e9"}"#);
        assert_eq!(page.events[0].created_at, None);
        assert_eq!(page.current_phase, None);
    }

    #[test]
    fn error_bodies_of_both_forms() {
        assert_eq!(
            error_message(br#"{"error":"Forbidden"}"#).unwrap(),
            "Forbidden"
        );
        assert_eq!(
            error_message(br#"{"error":[{"path":["tripId"],"message":"Required"}]}"#).unwrap(),
            "tripId: Required"
        );
        assert_eq!(error_message(b"<html>bad gateway</html>"), None);
    }
}
