//! Stream framing: the JSON of each SSE frame the stream endpoint sends and
//! how it goes on the wire, in the shapes a real upstream may use.

use std::time::Instant;

use axum::body::Bytes;
use serde_json::json;

use super::faults::Damage;
use super::run::{SimEvent, SimRun};
use super::scenario::StreamStyle;

/// What a connection starts with, before the `connected` frame.
pub(super) const PREAMBLE: &[u8] = b"retry: 1000\n: welcome\n\n";

/// A frame whose bytes are not UTF-8 (the `InvalidUtf8` fault).
pub(super) const INVALID_UTF8: &[u8] = b"data: {\"type\":\"status\",\"x\":\"\xff\xfe\"}\n\n";

/// The in-band `error` frame (the `ErrorFrame` fault).
pub(super) const ERROR: &str = r#"{"type":"error","error":"Injected stream error"}"#;

/// SSE framing: one `data:` line per line of the JSON.
pub(super) fn sse_frame(data: &str) -> Bytes {
    let mut frame = String::with_capacity(data.len() + 16);
    for line in data.lines() {
        frame.push_str("data: ");
        frame.push_str(line);
        frame.push('\n');
    }
    frame.push('\n');
    Bytes::from(frame)
}

pub(super) fn connected(run_id: &str) -> String {
    json!({"type": "connected", "runId": run_id}).to_string()
}

/// A `run_event` frame: the event nested under `event` or flattened; with
/// `multiline`, a line break between tokens (valid JSON, several `data:`
/// lines on the wire, payload bytes untouched).
pub(super) fn run_event_frame(event: &SimEvent, style: &StreamStyle) -> String {
    let event = event.to_json();
    let separator = if style.multiline { ",\n" } else { "," };
    if style.flat {
        format!(r#"{{"type":"run_event"{separator}{}"#, &event[1..])
    } else {
        format!(r#"{{"type":"run_event"{separator}"event":{event}}}"#)
    }
}

/// The `run_finished` frame once the run's status is final, bare under the
/// `BareFinish` fault.
pub(super) fn run_finished(
    run: &SimRun,
    id: &str,
    now: Instant,
    damage: &Damage,
) -> Option<String> {
    let status = run.status(now);
    if !crate::upstream::types::is_final(status) {
        return None;
    }
    if damage.bare_finish {
        return Some(json!({"type": "run_finished"}).to_string());
    }
    let mut frame = json!({
        "type": "run_finished",
        "status": status,
        "lastSequence": run.last_sequence(now),
    });
    if let Some(message) = run.info(id, now).get("errorMessage") {
        frame["errorMessage"] = message.clone();
    }
    Some(frame.to_string())
}

/// The `status` heartbeat frame.
pub(super) fn status(run: &SimRun, now: Instant) -> String {
    json!({"type": "status", "status": run.status(now), "phase": run.phase(now)}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::Scenario;

    fn event(payload: &str) -> SimEvent {
        let toml = format!(
            "[[runs]]\nid = 'r'\nevents = [{{ type = 'T', payload = '{payload}', created_at = false }}]"
        );
        let script = Scenario::from_toml(&toml).unwrap().runs.remove(0);
        let mut run = SimRun::new(&script, Instant::now());
        run.events.remove(0)
    }

    #[test]
    fn run_event_frames_nest_or_flatten_and_keep_payload_bytes() {
        let event = event(r#"{"z":1.10,"a":"café"}"#);
        let nested = run_event_frame(&event, &StreamStyle::default());
        assert_eq!(
            nested,
            r#"{"type":"run_event","event":{"sequence":1,"eventType":"T","payload":{"z":1.10,"a":"café"}}}"#
        );
        let flat = StreamStyle {
            flat: true,
            multiline: true,
            ..StreamStyle::default()
        };
        assert_eq!(
            run_event_frame(&event, &flat),
            "{\"type\":\"run_event\",\n\"sequence\":1,\"eventType\":\"T\",\"payload\":{\"z\":1.10,\"a\":\"café\"}}"
        );
    }

    #[test]
    fn sse_frames_put_each_line_on_its_own_data_line() {
        assert_eq!(
            &sse_frame("{\"a\":1,\n\"b\":2}")[..],
            b"data: {\"a\":1,\ndata: \"b\":2}\n\n"
        );
    }
}
