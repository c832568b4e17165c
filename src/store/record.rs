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
    /// Why the run cannot go on past these events (upstream serves one it
    /// cannot decode): the run is left `stalled` with this reason in the
    /// same transaction, so it never reads `following` in between.
    pub stalled: Option<String>,
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
    /// The core operation (README.md, guarantee 1): the batch's new events,
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
    let mut cursor = stored_cursor(conn, &batch.run_id)?;
    let mut rows = EventRows::prepare(conn, batch, now)?;
    let mut dropped = 0;
    for event in &batch.events {
        if event.sequence <= cursor {
            dropped += 1;
            continue;
        }
        rows.insert(&EventRow {
            id: &format!("{}:{}", batch.run_id, event.sequence),
            sequence: Some(event.sequence),
            event_type: &event.event_type,
            payload: event.payload.get(),
            created_at: event.created_at.as_deref(),
            sinks: &event.sinks,
        })?;
        cursor = event.sequence;
    }
    // Ends at the cursor the events above reached: ingest records a finish
    // only once the cursor is at the run's last sequence.
    let finished_seq = match &batch.finish {
        Some(finish) => {
            rows.insert(&EventRow {
                id: &format!("{}:finished:{cursor}", batch.run_id),
                sequence: None,
                event_type: "run_finished",
                payload: &finished_payload(finish, cursor),
                created_at: None,
                sinks: &finish.sinks,
            })?;
            Some(cursor)
        }
        None => None,
    };
    let EventRows {
        recorded, routed, ..
    } = rows;
    advance_run(conn, batch, cursor, recorded, finished_seq, now)?;
    Ok(Recorded {
        cursor,
        recorded,
        dropped,
        routed,
    })
}

/// The run's cursor as committed. A batch for a run nobody subscribed to is
/// refused: there is no cursor to advance.
fn stored_cursor(conn: &Connection, run_id: &str) -> Result<i64, rusqlite::Error> {
    conn.prepare_cached("SELECT cursor FROM runs WHERE run_id = ?1")?
        .query_row([run_id], |r| r.get(0))
        .optional()?
        .ok_or(rusqlite::Error::QueryReturnedNoRows)
}

/// One event to record, upstream or the synthetic `run_finished`.
struct EventRow<'a> {
    id: &'a str,
    sequence: Option<i64>,
    event_type: &'a str,
    payload: &'a str,
    created_at: Option<&'a str>,
    sinks: &'a [Arc<str>],
}

/// Inserts a batch's events and their deliveries, counting what was new.
struct EventRows<'c, 'b> {
    conn: &'c Connection,
    batch: &'b Batch,
    now: i64,
    insert_event: rusqlite::CachedStatement<'c>,
    insert_delivery: rusqlite::CachedStatement<'c>,
    /// Events newly inserted.
    recorded: usize,
    /// The sinks that got deliveries, each once, in first-routed order.
    routed: Vec<Arc<str>>,
}

impl<'c, 'b> EventRows<'c, 'b> {
    fn prepare(conn: &'c Connection, batch: &'b Batch, now: i64) -> Result<Self, rusqlite::Error> {
        Ok(Self {
            conn,
            batch,
            now,
            insert_event: conn.prepare_cached(
                "INSERT INTO events (id, run_id, sequence, event_type, payload, created_at,
                                     run_status, phase, seen_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (id) DO NOTHING",
            )?,
            insert_delivery: conn.prepare_cached(
                "INSERT INTO deliveries (sink, event, run_id, next_attempt_at, queued_at)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT DO NOTHING",
            )?,
            recorded: 0,
            routed: Vec::new(),
        })
    }

    /// The event and one delivery per sink. An id already recorded (a
    /// `run_finished` seen again) gets no second set of deliveries.
    fn insert(&mut self, event: &EventRow<'_>) -> Result<(), rusqlite::Error> {
        let batch = self.batch;
        let inserted = self.insert_event.execute(params![
            event.id,
            batch.run_id,
            event.sequence,
            event.event_type,
            event.payload,
            event.created_at,
            batch.run_status,
            batch.phase,
            self.now
        ])?;
        if inserted == 0 {
            return Ok(());
        }
        self.recorded += 1;
        let rowid = self.conn.last_insert_rowid();
        for sink in event.sinks {
            self.insert_delivery
                .execute(params![&**sink, rowid, batch.run_id, self.now])?;
            if !self.routed.contains(sink) {
                self.routed.push(sink.clone());
            }
        }
        Ok(())
    }
}

/// The run's row after a batch: the new cursor and what was seen, and
/// `finished` (with `finished_seq`) when the batch ended the run.
fn advance_run(
    conn: &Connection,
    batch: &Batch,
    cursor: i64,
    recorded: usize,
    finished_seq: Option<i64>,
    now: i64,
) -> Result<(), rusqlite::Error> {
    let state = match (finished_seq, &batch.stalled) {
        (Some(_), _) => RunState::Finished,
        (None, Some(_)) => RunState::Stalled,
        (None, None) => RunState::Following,
    };
    conn.prepare_cached(
        "UPDATE runs SET cursor = ?2,
            run_status = COALESCE(?3, run_status), phase = COALESCE(?4, phase),
            last_event_at = CASE WHEN ?5 > 0 THEN ?6 ELSE last_event_at END,
            finished_seq = COALESCE(?7, finished_seq),
            finished_at = CASE WHEN ?7 IS NOT NULL THEN ?6 ELSE finished_at END,
            upstream_seq = CASE WHEN ?7 IS NOT NULL THEN ?2 ELSE upstream_seq END,
            state = ?8,
            last_error = ?9, updated_at = ?6
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
        state,
        batch.stalled.as_deref().filter(|_| finished_seq.is_none())
    ])?;
    Ok(())
}

/// `{"status", "errorMessage"?, "cancelReason"?, "lastSequence"}` in that order.
pub(super) fn finished_payload(finish: &Finish, last_sequence: i64) -> String {
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
