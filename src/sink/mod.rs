//! Sinks send and report an [`Outcome`]; the delivery engine records it.
//! Whether an answer is worth retrying is decided here, per sink, in one
//! pure function each (`webhook::classify`).
//!
//! A sink sees an [`Event`], what happened, and never the delivery row
//! behind it (attempts, due times): retry state is the engine's. Nothing
//! here reads or writes the state database; what a sink must remember
//! (a Slack thread per run) it asks of the engine through a trait
//! ([`slack::ThreadBook`]).

pub mod file;
pub mod sign;
pub mod slack;
pub mod webhook;

use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::http::USER_AGENT;

/// After a 429 without `Retry-After` (README.md, Webhook: 60 s).
const DEFAULT_429_WAIT: Duration = Duration::from_secs(60);
/// How much of a receiver's answer is read, and kept (cut) with the attempt
/// for `runhook dead`: enough for an error message, bounded whatever the
/// receiver sends.
const ANSWER_CAP: usize = 4096;

/// Connecting may take the whole timeout, but never more than 10 s.
fn connect_timeout(timeout: Duration) -> Duration {
    timeout.min(Duration::from_secs(10))
}

/// The HTTP client of a sink. Redirects are never followed: a 3xx is a
/// failure the operator must see (README.md, Webhook), and following one
/// would send a signed body somewhere the config does not name.
fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(connect_timeout(timeout))
        .build()
}

/// One event as a sink sees it. Payload and labels are the JSON text as
/// recorded, so that every sink passes on the bytes received.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub id: &'a str,
    pub run_id: &'a str,
    /// `None` for the synthetic `run_finished`.
    pub sequence: Option<i64>,
    pub event_type: &'a str,
    pub payload: &'a str,
    /// The run's labels, a JSON object.
    pub labels: &'a str,
    pub created_at: Option<&'a str>,
    /// When runhook recorded the event (unix ms): the time a webhook shows
    /// when upstream gave none.
    pub seen_at: i64,
    /// The run's status and phase when the event was seen.
    pub run_status: Option<&'a str>,
    pub phase: Option<&'a str>,
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered,
    /// Worth another attempt, not before `after` if the sink said so.
    Retry {
        status: Option<u16>,
        error: String,
        after: Option<Duration>,
    },
    /// Retrying cannot help: dead-letter at once.
    Permanent {
        status: Option<u16>,
        error: String,
    },
}

/// A sink that takes one delivery at a time (the HTTP ones). One per sink,
/// held behind an `Arc`, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Sender {
    Webhook(webhook::WebhookSink),
    Slack(slack::SlackSink),
}

impl Sender {
    pub async fn send(&self, event: &Event<'_>) -> Outcome {
        match self {
            Self::Webhook(sink) => sink.send(event).await,
            Self::Slack(sink) => sink.send(event).await,
        }
    }
}

/// The fields every envelope carries, payload and labels as stored bytes.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EventFields<'a> {
    pub id: &'a str,
    pub run_id: &'a str,
    pub sequence: Option<i64>,
    pub event_type: &'a str,
    pub payload: &'a RawValue,
    pub created_at: Option<&'a str>,
    pub run_status: Option<&'a str>,
    pub current_phase: Option<&'a str>,
    pub labels: &'a RawValue,
}

impl<'a> EventFields<'a> {
    fn of(event: &Event<'a>) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: event.id,
            run_id: event.run_id,
            sequence: event.sequence,
            event_type: event.event_type,
            payload: serde_json::from_str(event.payload)?,
            created_at: event.created_at,
            run_status: event.run_status,
            current_phase: event.phase,
            labels: serde_json::from_str(event.labels)?,
        })
    }
}

/// The file sink's line: `type` in place of `eventType`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FileLine<'a> {
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
    /// Only `runhook send-test` sets it; absent from every real line.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    test: bool,
}

/// Appends the envelope of `event` to `out` as one JSON line. A payload
/// received pretty-printed carries raw CR/LF, which in JSON text can only be
/// insignificant whitespace (strings escape them): they are dropped here, so
/// that the line stays one line; every other byte is written as received.
pub fn write_envelope_line(event: &Event<'_>, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    write_line(event, false, out)
}

/// The line of a test event (`runhook send-test`): a real line plus
/// `"test": true`.
pub fn write_test_line(event: &Event<'_>, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    write_line(event, true, out)
}

fn write_line(event: &Event<'_>, test: bool, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let f = EventFields::of(event)?;
    let one_line = single_line(f.payload)?;
    let line = FileLine {
        id: f.id,
        event_type: f.event_type,
        run_id: f.run_id,
        sequence: f.sequence,
        created_at: f.created_at,
        payload: one_line.as_deref().unwrap_or(f.payload),
        run_status: f.run_status,
        current_phase: f.current_phase,
        labels: f.labels,
        test,
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.push(b'\n');
    Ok(())
}

/// `payload` without its raw CR and LF bytes, or `None` when it has none
/// (the common case: nothing is copied).
fn single_line(payload: &RawValue) -> Result<Option<Box<RawValue>>, serde_json::Error> {
    let text = payload.get();
    if !text.contains(['\r', '\n']) {
        return Ok(None);
    }
    let joined: String = text.chars().filter(|c| !matches!(c, '\r' | '\n')).collect();
    RawValue::from_string(joined).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sinks send and report: the state database and the upstream client
    /// are out of their reach (ARCHITECTURE.md), so a shortcut through
    /// either fails here rather than in review.
    #[test]
    fn sinks_import_nothing_from_the_store_or_upstream() {
        fn sources(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    sources(&path, found);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    found.push(path);
                }
            }
        }
        let mut files = Vec::new();
        sources(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/sink"),
            &mut files,
        );
        assert!(files.len() >= 5, "the sink sources: {files:?}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            // Spelt apart so that this test does not find itself.
            for forbidden in ["store", "upstream"].map(|module| format!("crate::{module}")) {
                assert!(
                    !text.contains(&forbidden),
                    "{} names {forbidden}",
                    file.display()
                );
            }
        }
    }

    #[test]
    fn single_line_drops_raw_breaks_and_keeps_every_other_byte() {
        let pretty = "{\r\n  \"a\": \"x\\ny\",\n  \"b\": [1.10,\n 2]\r\n}";
        let raw: Box<RawValue> = serde_json::from_str(pretty).unwrap();
        let line = single_line(&raw).unwrap().unwrap();
        assert_eq!(line.get(), "{  \"a\": \"x\\ny\",  \"b\": [1.10, 2]}");
        let value = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap();
        assert_eq!(value(line.get()), value(pretty));
        let flat: Box<RawValue> = serde_json::from_str(r#"{"a":"x\ny"}"#).unwrap();
        assert!(
            single_line(&flat).unwrap().is_none(),
            "escaped breaks are not raw"
        );
    }
}
