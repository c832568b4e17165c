//! The run model: a scripted run's events laid out on a clock, so that its
//! status, phase and visible events follow from the time alone, plus the
//! control actions that move it (start, stop/cancel, retry).

use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use super::scenario::{ScriptedEvent, ScriptedRun};

#[derive(Debug)]
pub(super) struct SimEvent {
    pub(super) sequence: i64,
    pub(super) event_type: String,
    pub(super) payload: String,
    pub(super) created_at: Option<String>,
    /// Emitted this long after the run started.
    after: Duration,
    /// The run's phase once this event is out.
    phase: Option<String>,
}

impl SimEvent {
    /// The event object with its payload bytes untouched (never through
    /// `serde_json::Value`, which would re-serialise them).
    pub(super) fn to_json(&self) -> String {
        let mut out = format!(
            r#"{{"sequence":{},"eventType":{},"payload":{}"#,
            self.sequence,
            json!(self.event_type),
            self.payload
        );
        if let Some(created) = &self.created_at {
            out.push_str(&format!(r#","createdAt":{}"#, json!(created)));
        }
        out.push('}');
        out
    }
}

#[derive(Debug)]
pub(super) struct SimRun {
    pub(super) owner: String,
    pub(super) events: Vec<SimEvent>,
    interval: Duration,
    started: Option<Instant>,
    final_status: String,
    cancelled: bool,
    error_message: Option<String>,
    cancel_reason: Option<String>,
    retry_events: Vec<ScriptedEvent>,
    retry_final_status: Option<String>,
    created_at: String,
}

impl SimRun {
    pub(super) fn new(script: &ScriptedRun, clock: Instant) -> Self {
        let mut run = Self {
            owner: script.owner.clone(),
            events: Vec::new(),
            interval: script.interval,
            started: script.started.then_some(clock),
            final_status: script.final_status.clone(),
            cancelled: false,
            error_message: script.error_message.clone(),
            cancel_reason: script.cancel_reason.clone(),
            retry_events: script.retry_events.clone(),
            retry_final_status: script.retry_final_status.clone(),
            created_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        };
        run.append(&script.events, Duration::ZERO);
        run
    }

    fn append(&mut self, script: &[ScriptedEvent], start: Duration) {
        let wall = SystemTime::now();
        let mut phase = self.events.last().and_then(|e| e.phase.clone());
        for (i, scripted) in script.iter().enumerate() {
            let last = self.events.last().map_or(0, |e| e.sequence);
            let sequence = scripted.sequence.filter(|s| *s > last).unwrap_or(last + 1);
            let after = start + self.interval * (i as u32 + 1);
            if scripted.event_type == "PHASE_STARTED"
                && let Ok(value) = serde_json::from_str::<serde_json::Value>(&scripted.payload)
                && let Some(p) = value["phase"].as_str()
            {
                phase = Some(p.to_owned());
            }
            self.events.push(SimEvent {
                sequence,
                event_type: scripted.event_type.clone(),
                payload: scripted.payload.clone(),
                created_at: scripted
                    .created_at
                    .then(|| humantime::format_rfc3339_millis(wall + after).to_string()),
                after,
                phase: phase.clone(),
            });
        }
    }

    /// How many events are out by `now`.
    pub(super) fn visible(&self, now: Instant) -> usize {
        match self.started {
            None => 0,
            Some(start) => {
                let elapsed = now.saturating_duration_since(start);
                self.events.partition_point(|e| e.after <= elapsed)
            }
        }
    }

    /// The events out by `now`.
    pub(super) fn visible_events(&self, now: Instant) -> &[SimEvent] {
        &self.events[..self.visible(now)]
    }

    pub(super) fn status(&self, now: Instant) -> &str {
        if self.cancelled {
            "cancelled"
        } else if self.started.is_none() {
            "pending"
        } else if self.visible(now) == self.events.len() {
            &self.final_status
        } else {
            "running"
        }
    }

    pub(super) fn phase(&self, now: Instant) -> Option<&str> {
        let visible = self.visible(now);
        visible
            .checked_sub(1)
            .and_then(|i| self.events[i].phase.as_deref())
    }

    pub(super) fn last_sequence(&self, now: Instant) -> i64 {
        let visible = self.visible(now);
        visible
            .checked_sub(1)
            .map_or(0, |i| self.events[i].sequence)
    }

    /// When the next event comes out, if one is still due.
    pub(super) fn next_emit(&self, now: Instant) -> Option<Instant> {
        let start = self.started?;
        self.events.get(self.visible(now)).map(|e| start + e.after)
    }

    pub(super) fn info(&self, id: &str, now: Instant) -> serde_json::Value {
        let status = self.status(now);
        let mut run = json!({
            "id": id,
            "tripId": 42,
            "userId": self.owner,
            "status": status,
            "phase": self.phase(now),
            "lastEventSequence": self.last_sequence(now),
            "createdAt": self.created_at,
        });
        if status == "failed" {
            run["errorMessage"] = json!(self.error_message.as_deref().unwrap_or("Run failed"));
        }
        if status == "cancelled"
            && let Some(reason) = &self.cancel_reason
        {
            run["cancelReason"] = json!(reason);
        }
        run
    }

    /// Applies a control action as the upstream would; the error is the
    /// message of its 400 answer.
    pub(super) fn control(
        &mut self,
        action: &str,
        reason: Option<String>,
        now: Instant,
    ) -> Result<(), &'static str> {
        let status = self.status(now).to_owned();
        match (action, status.as_str()) {
            ("start", "pending") => {
                self.started = Some(now);
                Ok(())
            }
            ("start", _) => Err("Cannot start a run that is already running"),
            ("stop" | "cancel", "running" | "pending") => {
                self.cancelled = true;
                self.cancel_reason = reason.or(self.cancel_reason.take());
                Ok(())
            }
            ("retry", "failed") => {
                self.retry(now);
                Ok(())
            }
            ("stop" | "cancel" | "retry", _) => Err("Action not valid for the run's status"),
            _ => Err("Unknown action"),
        }
    }

    /// A failed run resumes: its retry events (or a lone `done` phase when
    /// the script has none) come out from now on, once.
    fn retry(&mut self, now: Instant) {
        let elapsed = self
            .started
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        let more = std::mem::take(&mut self.retry_events);
        let more = if more.is_empty() {
            vec![ScriptedEvent {
                event_type: "PHASE_STARTED".into(),
                payload: r#"{"phase":"done"}"#.into(),
                sequence: None,
                created_at: true,
            }]
        } else {
            more
        };
        self.append(&more, elapsed);
        self.final_status = self
            .retry_final_status
            .clone()
            .unwrap_or_else(|| "completed".into());
        if self.final_status != "failed" {
            self.error_message = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::Scenario;

    fn script(toml: &str) -> ScriptedRun {
        let mut scenario = Scenario::from_toml(toml).unwrap();
        scenario.runs.remove(0)
    }

    #[test]
    fn control_starts_cancels_and_retries_only_from_the_right_status() {
        let now = Instant::now();
        let mut pending = SimRun::new(
            &script(
                "[[runs]]\nid = 'p'\nstarted = false\ninterval = '1h'\nevents = [{ type = 'T' }]",
            ),
            now,
        );
        assert_eq!(pending.status(now), "pending");
        assert_eq!(
            pending.control("retry", None, now),
            Err("Action not valid for the run's status")
        );
        assert_eq!(pending.control("start", None, now), Ok(()));
        assert_eq!(pending.status(now), "running");
        assert_eq!(
            pending.control("start", None, now),
            Err("Cannot start a run that is already running")
        );
        assert_eq!(
            pending.control("cancel", Some("enough".into()), now),
            Ok(())
        );
        assert_eq!(pending.info("p", now)["cancelReason"], "enough");
        assert_eq!(pending.control("pause", None, now), Err("Unknown action"));
    }

    #[test]
    fn a_retried_failed_run_emits_a_done_phase_after_its_events_and_completes() {
        let now = Instant::now();
        let toml = "[[runs]]\nid = 'f'\nfinal_status = 'failed'\nerror_message = 'boom'\n\
                    events = [{ type = 'PHASE_STARTED', payload = '{\"phase\":\"plan\"}', sequence = 4 }]";
        let mut run = SimRun::new(&script(toml), now);
        assert_eq!(run.status(now), "failed");
        assert_eq!(run.info("f", now)["errorMessage"], "boom");
        assert_eq!(run.control("retry", None, now), Ok(()));
        let sequences: Vec<i64> = run.visible_events(now).iter().map(|e| e.sequence).collect();
        assert_eq!(sequences, [4, 5]);
        assert_eq!(run.status(now), "completed");
        assert_eq!(run.phase(now), Some("done"));
        assert_eq!(run.info("f", now).get("errorMessage"), None);
    }
}
