//! SSE frames of the live stream. The guides name the frame types but not
//! their fields, so parsing is liberal: the event may be nested (under
//! `event`) or flattened into the frame; unknown frame types and fields are
//! kept as such, never errors.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::types::Event;

/// One parsed `data:` payload.
#[derive(Debug)]
pub enum Frame {
    Connected,
    RunEvent(Event),
    Status {
        status: Option<String>,
        phase: Option<String>,
    },
    Finished(Finished),
    /// The server reports a problem in-band.
    Error(String),
    /// A frame type this version does not know.
    Unknown(String),
}

#[derive(Debug, Default, Deserialize, PartialEq)]
pub struct Finished {
    #[serde(alias = "runStatus")]
    pub status: Option<String>,
    #[serde(rename = "errorMessage")]
    pub error_message: Option<String>,
    #[serde(rename = "cancelReason")]
    pub cancel_reason: Option<String>,
    #[serde(rename = "lastSequence", alias = "lastEventSequence")]
    pub last_sequence: Option<i64>,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[error("unparseable stream frame ({reason}); it starts {start:?}")]
pub struct FrameError {
    pub reason: String,
    /// The first bytes, for the log.
    pub start: String,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
    #[serde(default, alias = "runStatus")]
    status: Option<String>,
    #[serde(default, alias = "currentPhase")]
    phase: Option<String>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<String>,
}

/// Parses the `data` of one SSE message.
pub fn parse(data: &str) -> Result<Frame, FrameError> {
    let fail = |reason: String| FrameError {
        reason,
        start: data.chars().take(120).collect(),
    };
    let head: Head<'_> = serde_json::from_str(data).map_err(|e| fail(e.to_string()))?;
    Ok(match head.kind.as_str() {
        "connected" => Frame::Connected,
        "run_event" => {
            // Nested under `event`, or the frame is the event itself.
            let source = head.event.map_or(data, RawValue::get);
            Frame::RunEvent(
                serde_json::from_str(source).map_err(|e| fail(format!("run_event: {e}")))?,
            )
        }
        "status" => Frame::Status {
            status: head.status,
            phase: head.phase,
        },
        "run_finished" => {
            let finished: Finished =
                serde_json::from_str(data).map_err(|e| fail(format!("run_finished: {e}")))?;
            Frame::Finished(finished)
        }
        "error" => Frame::Error(
            head.message
                .or_else(|| {
                    head.error
                        .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_owned))
                })
                .unwrap_or_else(|| "stream error".to_owned()),
        ),
        other => Frame::Unknown(other.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_flattened_events() {
        let nested =
            r#"{"type":"run_event","event":{"sequence":4,"eventType":"X","payload":{"a":1.10}}}"#;
        let Frame::RunEvent(event) = parse(nested).unwrap() else {
            panic!()
        };
        assert_eq!((event.sequence, event.payload.get()), (4, r#"{"a":1.10}"#));
        let flat = r#"{"type":"run_event","sequence":5,"eventType":"Y","payload":{"z":[1.0]},"createdAt":"t","extra":true}"#;
        let Frame::RunEvent(event) = parse(flat).unwrap() else {
            panic!()
        };
        assert_eq!(
            (
                event.sequence,
                event.payload.get(),
                event.created_at.as_deref()
            ),
            (5, r#"{"z":[1.0]}"#, Some("t"))
        );
    }

    #[test]
    fn other_frames() {
        assert!(matches!(
            parse(r#"{"type":"connected","runId":"r"}"#).unwrap(),
            Frame::Connected
        ));
        let Frame::Status { status, phase } =
            parse(r#"{"type":"status","status":"running","phase":"plan"}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (status.as_deref(), phase.as_deref()),
            (Some("running"), Some("plan"))
        );
        let Frame::Finished(f) = parse(
            r#"{"type":"run_finished","status":"failed","errorMessage":"boom","lastSequence":9}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (
                f.status.as_deref(),
                f.error_message.as_deref(),
                f.last_sequence
            ),
            (Some("failed"), Some("boom"), Some(9))
        );
        let Frame::Error(message) = parse(r#"{"type":"error","error":"bad things"}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(message, "bad things");
        assert!(
            matches!(parse(r#"{"type":"new_kind","x":1}"#).unwrap(), Frame::Unknown(k) if k == "new_kind")
        );
    }

    #[test]
    fn malformed_frames_are_errors_with_their_start() {
        let error = parse("{not json").unwrap_err();
        assert_eq!(error.start, "{not json");
        assert!(
            parse(r#"{"type":"run_event","event":{"eventType":"X"}}"#).is_err(),
            "no sequence"
        );
        assert!(parse(r#"{"no":"type"}"#).is_err());
    }
}
