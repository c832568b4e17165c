//! Recording: the ingest transaction (events, their deliveries and the
//! run's cursor, together) and the reads of recorded events (`tail`).

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::value::RawValue;

use super::deliveries::{Pending, pending_row};
use super::{Reader, RunState, Store, StoreError, now_ms};

/// An upstream event ready to record, with the sinks routing chose.
#[derive(Debug)]
pub struct NewEvent {
    pub sequence: i64,
    pub event_type: String,
    pub payload: Box<RawValue>,
    pub created_at: Option<String>,
    pub sinks: Vec<Arc<str>>,
}

/// The run reached a final status: record one `run_finished`.
#[derive(Debug)]
pub struct Finish {
    pub status: String,
    pub error_message: Option<String>,
    pub cancel_reason: Option<String>,
    pub sinks: Vec<Arc<str>>,
}

/// One ingest step of one run: events (ascending sequence), the run's status
/// and phase as seen, and perhaps its end.
#[derive(Debug)]
pub struct Batch {
    pub run_id: String,
    pub events: Vec<NewEvent>,
    pub run_status: Option<String>,
    pub phase: Option<String>,
    pub finish: Option<Finish>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The run's cursor after the batch.
    pub cursor: i64,
    /// Events newly recorded (a `run_finished` included).
    pub recorded: usize,
    /// Events at or below the cursor, dropped.
    pub dropped: usize,
    /// The sinks that got new deliveries.
    pub routed: Vec<Arc<str>>,
}

/// Published after a commit that queued deliveries, so delivery loops start
/// on a run without scanning the table.
#[derive(Debug, Clone)]
pub struct NewWork {
    pub run_id: Arc<str>,
    pub sinks: Vec<Arc<str>>,
}

impl Store {
    /// The core operation (DESIGN.md guarantee 1): the batch's new events,
    /// their deliveries and the advanced cursor, in one transaction. Events
    /// not above the stored cursor are dropped, whatever the server sent.
    pub async fn record_batch(&self, batch: Batch) -> Result<Recorded, StoreError> {
        let run_id: Arc<str> = Arc::from(batch.run_id.as_str());
        let recorded = self.write(move |conn| record_batch(conn, &batch)).await?;
        if !recorded.routed.is_empty() {
            // Nobody listening (a command-line process) is fine.
            let _ = self.new_work.send(NewWork {
                run_id,
                sinks: recorded.routed.clone(),
            });
        }
        Ok(recorded)
    }
}

impl Reader {
    /// The newest event row, where `tail` starts.
    pub async fn last_event_row(&self) -> Result<i64, StoreError> {
        self.read(|conn| {
            conn.query_row("SELECT COALESCE(MAX(rowid), 0) FROM events", [], |r| {
                r.get(0)
            })
        })
        .await
    }

    /// Events recorded after row `after`, optionally of one run or type.
    pub async fn events_after(
        &self,
        after: i64,
        run: Option<String>,
        event_type: Option<String>,
        limit: usize,
    ) -> Result<Vec<Pending>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT e.rowid, e.id, e.run_id, e.sequence, e.event_type, e.payload, e.created_at,
                        e.run_status, e.phase, r.labels, 0, 0, e.seen_at, e.seen_at
                 FROM events e LEFT JOIN runs r ON r.run_id = e.run_id
                 WHERE e.rowid > ?1 AND (?2 IS NULL OR e.run_id = ?2) AND (?3 IS NULL OR e.event_type = ?3)
                 ORDER BY e.rowid LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![after, run, event_type, limit as i64], pending_row)?;
            rows.collect()
        })
        .await
    }
}

fn record_batch(conn: &Connection, batch: &Batch) -> Result<Recorded, rusqlite::Error> {
    let now = now_ms();
    let mut cursor: i64 = conn
        .prepare_cached("SELECT cursor FROM runs WHERE run_id = ?1")?
        .query_row([&batch.run_id], |r| r.get(0))
        .optional()?
        .ok_or(rusqlite::Error::QueryReturnedNoRows)?;
    let mut recorded = 0;
    let mut dropped = 0;
    let mut routed: Vec<Arc<str>> = Vec::new();
    let mut insert_event = conn.prepare_cached(
        "INSERT INTO events (id, run_id, sequence, event_type, payload, created_at,
                             run_status, phase, seen_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (id) DO NOTHING",
    )?;
    let mut insert_delivery = conn.prepare_cached(
        "INSERT INTO deliveries (sink, event, run_id, next_attempt_at, queued_at)
         VALUES (?1, ?2, ?3, ?4, ?4)
         ON CONFLICT DO NOTHING",
    )?;
    let mut record = |id: &str,
                      sequence: Option<i64>,
                      event_type: &str,
                      payload: &str,
                      created_at: Option<&str>,
                      sinks: &[Arc<str>]|
     -> Result<bool, rusqlite::Error> {
        let inserted = insert_event.execute(params![
            id,
            batch.run_id,
            sequence,
            event_type,
            payload,
            created_at,
            batch.run_status,
            batch.phase,
            now
        ])?;
        if inserted == 0 {
            return Ok(false);
        }
        let event = conn.last_insert_rowid();
        for sink in sinks {
            insert_delivery.execute(params![&**sink, event, batch.run_id, now])?;
            if !routed.contains(sink) {
                routed.push(sink.clone());
            }
        }
        Ok(true)
    };

    for event in &batch.events {
        if event.sequence <= cursor {
            dropped += 1;
            continue;
        }
        let id = format!("{}:{}", batch.run_id, event.sequence);
        if record(
            &id,
            Some(event.sequence),
            &event.event_type,
            event.payload.get(),
            event.created_at.as_deref(),
            &event.sinks,
        )? {
            recorded += 1;
        }
        cursor = event.sequence;
    }

    let mut finished_seq = None;
    if let Some(finish) = &batch.finish {
        let id = format!("{}:finished:{cursor}", batch.run_id);
        let payload = finished_payload(finish, cursor);
        if record(&id, None, "run_finished", &payload, None, &finish.sinks)? {
            recorded += 1;
        }
        finished_seq = Some(cursor);
    }

    conn.prepare_cached(
        "UPDATE runs SET cursor = ?2,
            run_status = COALESCE(?3, run_status), phase = COALESCE(?4, phase),
            last_event_at = CASE WHEN ?5 > 0 THEN ?6 ELSE last_event_at END,
            finished_seq = COALESCE(?7, finished_seq),
            finished_at = CASE WHEN ?7 IS NOT NULL THEN ?6 ELSE finished_at END,
            upstream_seq = CASE WHEN ?7 IS NOT NULL THEN ?2 ELSE upstream_seq END,
            state = ?8,
            last_error = NULL, updated_at = ?6
         WHERE run_id = ?1",
    )?
    .execute(params![
        batch.run_id,
        cursor,
        batch.run_status,
        batch.phase,
        recorded as i64,
        now,
        finished_seq,
        if finished_seq.is_some() {
            RunState::Finished
        } else {
            RunState::Following
        }
    ])?;
    Ok(Recorded {
        cursor,
        recorded,
        dropped,
        routed,
    })
}

/// `{"status", "errorMessage"?, "cancelReason"?, "lastSequence"}` in that order.
fn finished_payload(finish: &Finish, last_sequence: i64) -> String {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Payload<'a> {
        status: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        error_message: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cancel_reason: Option<&'a str>,
        last_sequence: i64,
    }
    serde_json::to_string(&Payload {
        status: &finish.status,
        error_message: finish.error_message.as_deref(),
        cancel_reason: finish.cancel_reason.as_deref(),
        last_sequence,
    })
    .unwrap_or_else(|_| "{}".to_owned())
}
