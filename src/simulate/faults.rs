//! Fault injection: the faults a scenario or `POST /_sim/faults` adds, how a
//! request uses one up, and the damage a fault does to the events served.

use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::frame::run_event_frame;
use super::run::SimEvent;
use super::scenario::StreamStyle;

/// A fault to inject, per run or global, for `count` matching requests
/// (forever when absent).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Fault {
    /// Only requests for this run.
    #[serde(default)]
    pub run: Option<String>,
    /// Only this endpoint: "events", "stream" or "run".
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(flatten)]
    pub kind: FaultKind,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// Answer with this status and an `{"error"}` body (HTML for 502).
    Status {
        status: u16,
        #[serde(default)]
        retry_after: Option<u64>,
    },
    /// Answer after this many milliseconds.
    Slow { delay_ms: u64 },
    /// Poll answers (and new streams) also carry the two events before `since`.
    Resend,
    /// Poll answers start from sequence 0 whatever `since` says.
    IgnoreSince,
    /// Streams end abruptly, mid-frame, after this many events.
    DropStream { after: usize },
    /// Streams send an in-band `error` frame after this many events, then end.
    ErrorFrame { after: usize },
    /// Streams go silent (no frames, no heartbeats) after this many events.
    Stall { after: usize },
    /// Poll pages and streams serve the event with this sequence in a form
    /// that cannot be decoded (`eventType` a number), to test that the
    /// cursor never passes it.
    BadEvent { sequence: i64 },
    /// Poll pages and streams leave out the events from this sequence on,
    /// while the run's status, `lastEventSequence` and `run_finished` still
    /// count them: a finish announced past what was served.
    Withhold { from: i64 },
    /// Streams send a frame with bytes that are not UTF-8 after this many
    /// events, then go silent.
    InvalidUtf8 { after: usize },
    /// Poll answers are padded with whitespace to this many bytes, sent in
    /// chunks without a `Content-Length`: an answer too large to buffer.
    BigAnswer { bytes: u64 },
    /// Streams end with a bare `{"type":"run_finished"}`: no status, no
    /// `lastSequence`, no error message: the upstream does not promise
    /// any of them, so a client must cope without.
    BareFinish,
}

impl FaultKind {
    /// Whether this fault ends a stream connection (at most one per
    /// connection fires).
    pub(super) fn ends_stream(&self) -> bool {
        matches!(
            self,
            Self::DropStream { .. }
                | Self::ErrorFrame { .. }
                | Self::Stall { .. }
                | Self::InvalidUtf8 { .. }
        )
    }

    /// After how many events a stream-ending fault fires.
    pub(super) fn fires_after(&self) -> usize {
        match self {
            Self::DropStream { after }
            | Self::ErrorFrame { after }
            | Self::Stall { after }
            | Self::InvalidUtf8 { after } => *after,
            _ => usize::MAX,
        }
    }
}

/// The faults as they stand; counted ones are used up request by request.
#[derive(Debug, Default)]
pub(super) struct Faults(Mutex<Vec<Fault>>);

impl Faults {
    pub(super) fn new(faults: Vec<Fault>) -> Self {
        Self(Mutex::new(faults))
    }

    /// A panic elsewhere must not stop the fake upstream answering.
    fn lock(&self) -> MutexGuard<'_, Vec<Fault>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn add(&self, fault: Fault) {
        self.lock().push(fault);
    }

    pub(super) fn clear(&self) {
        self.lock().clear();
    }

    pub(super) fn snapshot(&self) -> Vec<Fault> {
        self.lock().clone()
    }

    /// How many uses of counted faults are left.
    pub(super) fn left(&self) -> u32 {
        self.lock().iter().filter_map(|f| f.count).sum()
    }

    /// The first fault matching the request, used up by one.
    pub(super) fn take(
        &self,
        endpoint: &str,
        run_id: &str,
        want: impl Fn(&FaultKind) -> bool,
    ) -> Option<FaultKind> {
        let mut faults = self.lock();
        let index = faults.iter().position(|f| {
            f.run.as_deref().is_none_or(|r| r == run_id)
                && f.endpoint.as_deref().is_none_or(|e| e == endpoint)
                && f.count != Some(0)
                && want(&f.kind)
        })?;
        let fault = &mut faults[index];
        if let Some(count) = &mut fault.count {
            *count -= 1;
        }
        Some(fault.kind.clone())
    }

    /// Uses up one `kind` fault (one without fields) if one matches.
    pub(super) fn take_flag(&self, endpoint: &str, run_id: &str, kind: &FaultKind) -> bool {
        self.take(endpoint, run_id, |k| k == kind).is_some()
    }

    /// Gives back one use of a counted fault taken for a stream connection
    /// that ended before the fault fired.
    fn give_back(&self, endpoint: &str, run_id: &str, kind: &FaultKind) {
        let mut faults = self.lock();
        let counted = faults.iter_mut().find(|f| {
            f.run.as_deref().is_none_or(|r| r == run_id)
                && f.endpoint.as_deref().is_none_or(|e| e == endpoint)
                && f.count.is_some()
                && f.kind == *kind
        });
        if let Some(fault) = counted {
            fault.count = fault.count.map(|c| c + 1);
        }
    }
}

/// A stream-ending fault taken for a connection and not fired yet: given
/// back when the connection ends first, so `Faults::left` counts only
/// faults that fired.
pub(super) struct Unfired<'a> {
    pub(super) faults: &'a Faults,
    pub(super) run_id: &'a str,
    pub(super) kind: Option<FaultKind>,
}

impl Drop for Unfired<'_> {
    fn drop(&mut self) {
        if let Some(kind) = &self.kind {
            self.faults.give_back("stream", self.run_id, kind);
        }
    }
}

/// The `BadEvent`, `Withhold` and `BareFinish` faults one poll answer or one
/// stream connection carries: which events it leaves out or garbles.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Damage {
    bad: Option<i64>,
    withhold: Option<i64>,
    pub(super) bare_finish: bool,
}

impl Damage {
    pub(super) fn take(faults: &Faults, endpoint: &str, run_id: &str) -> Self {
        let bad = faults.take(endpoint, run_id, |k| {
            matches!(k, FaultKind::BadEvent { .. })
        });
        let withhold = faults.take(endpoint, run_id, |k| {
            matches!(k, FaultKind::Withhold { .. })
        });
        let bare_finish = faults.take_flag(endpoint, run_id, &FaultKind::BareFinish);
        Self {
            bare_finish,
            bad: match bad {
                Some(FaultKind::BadEvent { sequence }) => Some(sequence),
                _ => None,
            },
            withhold: match withhold {
                Some(FaultKind::Withhold { from }) => Some(from),
                _ => None,
            },
        }
    }

    /// Whether the event is served at all.
    pub(super) fn keeps(&self, event: &SimEvent) -> bool {
        self.withhold.is_none_or(|from| event.sequence < from)
    }

    /// The event's JSON, or an undecodable version of it.
    pub(super) fn event_json(&self, event: &SimEvent) -> String {
        if self.bad == Some(event.sequence) {
            format!(
                r#"{{"sequence":{},"eventType":42,"payload":{{}}}}"#,
                event.sequence
            )
        } else {
            event.to_json()
        }
    }

    /// The event's stream frame, or an undecodable one.
    pub(super) fn frame(&self, event: &SimEvent, style: &StreamStyle) -> String {
        if self.bad == Some(event.sequence) {
            format!(
                r#"{{"type":"run_event","event":{}}}"#,
                self.event_json(event)
            )
        } else {
            run_event_frame(event, style)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(run: &str, endpoint: &str, count: u32) -> Fault {
        Fault {
            run: Some(run.into()),
            endpoint: Some(endpoint.into()),
            count: Some(count),
            kind: FaultKind::Stall { after: 1 },
        }
    }

    #[test]
    fn a_counted_fault_matches_its_run_and_endpoint_until_used_up() {
        let faults = Faults::new(vec![counted("run-a", "stream", 2)]);
        assert_eq!(faults.take("stream", "run-b", |_| true), None, "other run");
        assert_eq!(
            faults.take("events", "run-a", |_| true),
            None,
            "other endpoint"
        );
        assert_eq!(faults.left(), 2);
        for _ in 0..2 {
            let taken = faults.take("stream", "run-a", FaultKind::ends_stream);
            assert_eq!(taken, Some(FaultKind::Stall { after: 1 }));
        }
        assert_eq!(faults.left(), 0);
        assert_eq!(faults.take("stream", "run-a", |_| true), None, "used up");
    }

    #[test]
    fn an_unfired_stream_fault_is_given_back_and_a_fired_one_is_not() {
        let faults = Faults::new(vec![counted("run-a", "stream", 2)]);
        for fired in [false, true] {
            let kind = faults.take("stream", "run-a", |_| true);
            let mut unfired = Unfired {
                faults: &faults,
                run_id: "run-a",
                kind,
            };
            if fired {
                unfired.kind = None;
            }
        }
        assert_eq!(faults.left(), 1, "only the fired use is gone");
    }
}
