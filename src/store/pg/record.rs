//! The ingest transaction on PostgreSQL: a batch's new events, their
//! deliveries and the run's advanced cursor, in one transaction fenced by
//! the run's lease, as `store/record.rs` does on SQLite.

use std::sync::Arc;

use deadpool_postgres::Transaction;

use super::super::record::finished_payload;
use super::super::{Batch, Recorded, RunState, now_ms};
use super::{Lease, PgStore, PgStoreError, fence};

/// One event to record, upstream or the synthetic `run_finished`.
struct EventRow<'a> {
    id: String,
    sequence: Option<i64>,
    event_type: &'a str,
    payload: &'a str,
    created_at: Option<&'a str>,
    sinks: &'a [Arc<str>],
}

impl PgStore {
    /// README.md, guarantee 1, on PostgreSQL: events above the stored cursor,
    /// their deliveries and the new cursor commit together, or nothing does.
    /// Refused with [`PgStoreError::LeaseLost`] (nothing written) when
    /// `lease` is no longer this replica's.
    pub async fn record_batch(
        &self,
        lease: &Lease,
        batch: Batch,
    ) -> Result<Recorded, PgStoreError> {
        if *lease.run_id != *batch.run_id {
            // A lease fences its own run only: this replica holds none for
            // the batch's run under that epoch.
            return Err(PgStoreError::LeaseLost {
                run_id: Arc::from(batch.run_id.as_str()),
                epoch: lease.epoch,
            });
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        fence(&tx, self.node(), lease).await?;
        let recorded = record(&tx, &batch).await?;
        tx.commit().await?;
        Ok(recorded)
    }
}

async fn record(tx: &Transaction<'_>, batch: &Batch) -> Result<Recorded, PgStoreError> {
    let now = now_ms();
    let mut cursor = locked_cursor(tx, &batch.run_id).await?;
    let mut inserted = Inserted::default();
    let mut dropped = 0;
    for event in &batch.events {
        if event.sequence <= cursor {
            dropped += 1;
            continue;
        }
        let row = EventRow {
            id: format!("{}:{}", batch.run_id, event.sequence),
            sequence: Some(event.sequence),
            event_type: &event.event_type,
            payload: event.payload.get(),
            created_at: event.created_at.as_deref(),
            sinks: &event.sinks,
        };
        inserted.insert(tx, batch, &row, now).await?;
        cursor = event.sequence;
    }
    // As on SQLite: the finish ends at the cursor the events reached.
    let finished_seq = match &batch.finish {
        Some(finish) => {
            let payload = finished_payload(finish, cursor);
            let row = EventRow {
                id: format!("{}:finished:{cursor}", batch.run_id),
                sequence: None,
                event_type: "run_finished",
                payload: &payload,
                created_at: None,
                sinks: &finish.sinks,
            };
            inserted.insert(tx, batch, &row, now).await?;
            Some(cursor)
        }
        None => None,
    };
    advance_run(tx, batch, cursor, inserted.recorded, finished_seq, now).await?;
    Ok(Recorded {
        cursor,
        recorded: inserted.recorded,
        dropped,
        routed: inserted.routed,
    })
}

/// The run's committed cursor, its row locked until the transaction ends:
/// two writers of one run (which the lease already prevents) would queue
/// here rather than both read the same cursor.
async fn locked_cursor(tx: &Transaction<'_>, run_id: &str) -> Result<i64, PgStoreError> {
    let row = tx
        .query_opt(
            "SELECT cursor FROM runs WHERE run_id = $1 FOR UPDATE",
            &[&run_id],
        )
        .await?;
    row.map(|r| r.get(0))
        .ok_or_else(|| PgStoreError::UnknownRun(run_id.to_owned()))
}

/// What a batch inserted so far.
#[derive(Default)]
struct Inserted {
    recorded: usize,
    /// The sinks that got deliveries, each once, in first-routed order.
    routed: Vec<Arc<str>>,
}

impl Inserted {
    /// The event and one delivery per sink. An id already recorded (a
    /// `run_finished` seen again) gets no second set of deliveries.
    async fn insert(
        &mut self,
        tx: &Transaction<'_>,
        batch: &Batch,
        event: &EventRow<'_>,
        now: i64,
    ) -> Result<(), PgStoreError> {
        let insert_event = tx
            .prepare_cached(
                "INSERT INTO events (id, run_id, sequence, event_type, payload, created_at,
                                     run_status, phase, seen_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (id) DO NOTHING
                 RETURNING rowid",
            )
            .await?;
        let row = tx
            .query_opt(
                &insert_event,
                &[
                    &event.id,
                    &batch.run_id,
                    &event.sequence,
                    &event.event_type,
                    &event.payload,
                    &event.created_at,
                    &batch.run_status,
                    &batch.phase,
                    &now,
                ],
            )
            .await?;
        let Some(row) = row else {
            return Ok(());
        };
        self.recorded += 1;
        let rowid: i64 = row.get(0);
        let sinks: Vec<&str> = event.sinks.iter().map(|s| &**s).collect();
        let insert_deliveries = tx
            .prepare_cached(
                "INSERT INTO deliveries (sink, event, run_id, next_attempt_at, queued_at)
                 SELECT sink, $2, $3, $4, $4 FROM unnest($1::text[]) AS sink
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        tx.execute(&insert_deliveries, &[&sinks, &rowid, &batch.run_id, &now])
            .await?;
        for sink in event.sinks {
            if !self.routed.contains(sink) {
                self.routed.push(sink.clone());
            }
        }
        Ok(())
    }
}

/// The run's row after a batch, as on SQLite: the new cursor and what was
/// seen, and `finished` (with `finished_seq`) when the batch ended the run.
async fn advance_run(
    tx: &Transaction<'_>,
    batch: &Batch,
    cursor: i64,
    recorded: usize,
    finished_seq: Option<i64>,
    now: i64,
) -> Result<(), PgStoreError> {
    let state = match (finished_seq, &batch.stalled) {
        (Some(_), _) => RunState::Finished,
        (None, Some(_)) => RunState::Stalled,
        (None, None) => RunState::Following,
    };
    let update = tx
        .prepare_cached(
            "UPDATE runs SET cursor = $2,
                run_status = COALESCE($3, run_status), phase = COALESCE($4, phase),
                last_event_at = CASE WHEN $5 THEN $6 ELSE last_event_at END,
                finished_seq = COALESCE($7, finished_seq),
                finished_at = CASE WHEN $7::bigint IS NOT NULL THEN $6 ELSE finished_at END,
                upstream_seq = CASE WHEN $7::bigint IS NOT NULL THEN $2 ELSE upstream_seq END,
                state = $8,
                last_error = $9, updated_at = $6
             WHERE run_id = $1",
        )
        .await?;
    tx.execute(
        &update,
        &[
            &batch.run_id,
            &cursor,
            &batch.run_status,
            &batch.phase,
            &(recorded > 0),
            &now,
            &finished_seq,
            &state.as_str(),
            &batch.stalled.as_deref().filter(|_| finished_seq.is_none()),
        ],
    )
    .await?;
    Ok(())
}
