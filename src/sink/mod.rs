//! Sinks send and report an outcome; the delivery engine records it.

pub mod file;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::store::Pending;

/// The JSON envelope of one event, as the file sink writes it: payload and
/// labels go out as the exact bytes stored.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    run_id: &'a str,
    sequence: Option<i64>,
    created_at: Option<&'a str>,
    payload: &'a RawValue,
    run_status: Option<&'a str>,
    current_phase: Option<&'a str>,
    labels: &'a RawValue,
}

/// Appends the envelope of `event` to `out` as one JSON line.
pub fn write_envelope_line(event: &Pending, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let payload: &RawValue = serde_json::from_str(&event.payload)?;
    let labels: &RawValue = serde_json::from_str(&event.labels)?;
    serde_json::to_writer(
        &mut *out,
        &Envelope {
            id: &event.id,
            event_type: &event.event_type,
            run_id: &event.run_id,
            sequence: event.sequence,
            created_at: event.created_at.as_deref(),
            payload,
            run_status: event.run_status.as_deref(),
            current_phase: event.phase.as_deref(),
            labels,
        },
    )?;
    out.push(b'\n');
    Ok(())
}
