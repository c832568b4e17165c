//! The Agent Runs API's wire types, shared by the client and the simulator.
//! Parsing is liberal, as the API's documentation asks: unknown fields are
//! ignored, and the event `payload` is kept as the exact bytes received.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A run's status as the Agent Runs API documents it. The wire keeps it as
/// text (and so do stored rows and route facts): a status this runhook does
/// not know yet is passed on unchanged, never rejected; this type is for the
/// decisions runhook makes on the known ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub const ALL: [Self; 5] = [
        Self::Pending,
        Self::Running,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    /// As the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }

    /// Whether `text` is this status.
    pub fn is(self, text: &str) -> bool {
        self.as_str() == text
    }

    /// A run in a final status emits no more events (unless retried).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// Whether `status` is a final one; an unknown status is not.
pub fn is_final(status: &str) -> bool {
    RunStatus::parse(status).is_some_and(RunStatus::is_final)
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
    /// Why the page's events stop short: the first event above `since`
    /// that could not be decoded. `events` holds only what came before it,
    /// so the cursor can never pass it (README.md, guarantee 8).
    #[serde(skip)]
    pub undecodable: Option<String>,
}

/// Reads a poll answer event by event. A page with an event that cannot be
/// decoded keeps the good events below it (and says why in `undecodable`)
/// instead of failing whole, so a run records what it can and shows the bad
/// event instead of retrying the same page forever. An undecodable event
/// whose `sequence` is readable and not above `since` is already recorded:
/// it is skipped.
pub fn decode_page(body: &[u8], since: i64) -> Result<EventsPage, serde_json::Error> {
    #[derive(Deserialize)]
    struct RawPage {
        #[serde(default)]
        events: Vec<Box<RawValue>>,
        #[serde(rename = "runStatus", default)]
        run_status: Option<String>,
        #[serde(rename = "currentPhase", default)]
        current_phase: Option<String>,
    }
    /// Just the sequence of an event that is otherwise unreadable.
    #[derive(Deserialize)]
    struct SequenceOnly {
        sequence: i64,
    }
    let raw: RawPage = serde_json::from_slice(body)?;
    let mut events = Vec::with_capacity(raw.events.len());
    // The lowest bad sequence: nothing at or above it may be kept.
    let mut ceiling: Option<i64> = None;
    // Where the first item without a readable sequence stands in the page.
    let mut unreadable_at: Option<usize> = None;
    let mut undecodable = None;
    for text in &raw.events {
        let error = match serde_json::from_str::<Event>(text.get()) {
            Ok(event) => {
                events.push(event);
                continue;
            }
            Err(error) => error,
        };
        let sequence = serde_json::from_str::<SequenceOnly>(text.get())
            .ok()
            .map(|s| s.sequence);
        let why = match sequence {
            Some(sequence) if sequence <= since => continue,
            Some(sequence) => {
                ceiling = Some(ceiling.map_or(sequence, |c| c.min(sequence)));
                format!("the event with sequence {sequence} cannot be decoded: {error}")
            }
            None => {
                unreadable_at.get_or_insert(events.len());
                let start: String = text.get().chars().take(120).collect();
                format!("an event cannot be decoded ({error}); it starts {start:?}")
            }
        };
        undecodable.get_or_insert(why);
    }
    if let Some(at) = unreadable_at {
        // Its sequence is unknown: on an ascending page it lies above what
        // stands before it; on any other page it could be anywhere.
        let ascending = events.windows(2).all(|w| w[0].sequence < w[1].sequence);
        events.truncate(if ascending { at } else { 0 });
    }
    if let Some(ceiling) = ceiling {
        events.retain(|e| e.sequence < ceiling);
    }
    Ok(EventsPage {
        events,
        run_status: raw.run_status,
        current_phase: raw.current_phase,
        undecodable,
    })
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

    /// Only completed, failed and cancelled end a run; a status upstream
    /// adds later is not taken for an end (the run would stop being
    /// followed while it still emits events).
    #[test]
    fn only_the_documented_final_statuses_are_final() {
        let finals: Vec<&str> = RunStatus::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .map(RunStatus::as_str)
            .collect();
        assert_eq!(finals, ["completed", "failed", "cancelled"]);
        assert!(is_final("failed"));
        assert!(!is_final("running"));
        assert!(!is_final("archived"), "an unknown status is not final");
        assert_eq!(RunStatus::parse("Failed"), None);
    }

    #[test]
    fn payload_bytes_are_kept_exactly() {
        let body = r#"{"events":[{"sequence":3,"eventType":"X","payload":{"b":1.10,"a":"é\u00e9"}}],"runStatus":"running","extra":1}"#;
        let page: EventsPage = serde_json::from_str(body).unwrap();
        assert_eq!(page.events[0].payload.get(), r#"{"b":1.10,"a":"é\u00e9"}"#);
        assert_eq!(page.events[0].created_at, None);
        assert_eq!(page.current_phase, None);
    }

    #[test]
    fn a_bad_event_keeps_the_good_ones_below_it() {
        let body = br#"{"events":[{"sequence":2,"eventType":1},{"sequence":3,"eventType":"A"},{"sequence":5,"eventType":"B"},{"sequence":4,"eventType":42},{"sequence":6,"eventType":"C"}],"runStatus":"running"}"#;
        let page = decode_page(body, 2).unwrap();
        let kept: Vec<i64> = page.events.iter().map(|e| e.sequence).collect();
        assert_eq!(kept, [3], "5 came before the bad 4 but is above it");
        assert!(page.undecodable.unwrap().contains("sequence 4"));
        let page =
            decode_page(br#"{"events":[{"sequence":1,"eventType":"A"},"junk"]}"#, 0).unwrap();
        assert_eq!(page.events.len(), 1);
        assert!(page.undecodable.unwrap().contains("junk"));
        let page = decode_page(br#"{"events":[{"sequence":1,"eventType":"A"}]}"#, 0).unwrap();
        assert_eq!((page.events.len(), page.undecodable), (1, None));
        assert!(decode_page(b"<html>", 0).is_err());
    }

    /// Page order is not sequence order (ingest sorts): a good event after
    /// the bad one may be below it, and must not be dropped; an unreadable
    /// item on an unsorted page could be any sequence, so nothing is kept.
    #[test]
    fn an_unsorted_page_keeps_what_lies_below_the_bad_event_wherever_it_stands() {
        let body = br#"{"events":[{"sequence":6,"eventType":"A"},{"sequence":7,"eventType":42},{"sequence":5,"eventType":"B"}]}"#;
        let mut kept: Vec<i64> = decode_page(body, 4)
            .unwrap()
            .events
            .iter()
            .map(|e| e.sequence)
            .collect();
        kept.sort();
        assert_eq!(kept, [5, 6]);
        let body =
            br#"{"events":[{"sequence":7,"eventType":"A"},"junk",{"sequence":6,"eventType":"B"}]}"#;
        let page = decode_page(body, 4).unwrap();
        assert!(page.events.is_empty(), "{:?}", page.events);
        assert!(page.undecodable.is_some());
        let body =
            br#"{"events":[{"sequence":5,"eventType":"A"},"junk",{"sequence":7,"eventType":"B"}]}"#;
        let kept: Vec<i64> = decode_page(body, 4)
            .unwrap()
            .events
            .iter()
            .map(|e| e.sequence)
            .collect();
        assert_eq!(kept, [5], "an ascending page: what stands before the junk");
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
