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
    payload: std::borrow::Cow<'a, str>,
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
        super::notify::notify_work(&tx, &batch.run_id, &recorded.routed).await?;
        // The crash test's kill with the ingest transaction open, as the
        // SQLite writer's before its group commit.
        crate::crashpoint::hit("store.before_commit");
        tx.commit().await?;
        Ok(recorded)
    }
}

async fn record(tx: &Transaction<'_>, batch: &Batch) -> Result<Recorded, PgStoreError> {
    let now = now_ms();
    let mut cursor = locked_cursor(tx, &batch.run_id).await?;
    let mut rows = Vec::with_capacity(batch.events.len() + 1);
    let mut dropped = 0;
    for event in &batch.events {
        if event.sequence <= cursor {
            dropped += 1;
            continue;
        }
        rows.push(EventRow {
            id: format!("{}:{}", batch.run_id, event.sequence),
            sequence: Some(event.sequence),
            event_type: &event.event_type,
            payload: event.payload.get().into(),
            created_at: event.created_at.as_deref(),
            sinks: &event.sinks,
        });
        cursor = event.sequence;
    }
    // As on SQLite: the finish ends at the cursor the events reached.
    let finished_seq = batch.finish.as_ref().map(|finish| {
        rows.push(EventRow {
            id: format!("{}:finished:{cursor}", batch.run_id),
            sequence: None,
            event_type: "run_finished",
            payload: finished_payload(finish, cursor).into(),
            created_at: None,
            sinks: &finish.sinks,
        });
        cursor
    });
    let inserted = insert_events(tx, batch, &rows, now).await?;
    let routed = insert_deliveries(tx, &batch.run_id, &inserted, now).await?;
    advance_run(tx, batch, cursor, inserted.len(), finished_seq, now).await?;
    Ok(Recorded {
        cursor,
        recorded: inserted.len(),
        dropped,
        routed,
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
    match row {
        Some(row) => Ok(row.try_get(0)?),
        None => Err(PgStoreError::UnknownRun(run_id.to_owned())),
    }
}

/// Inserts the events in one statement, in batch order; an id already
/// recorded (a `run_finished` seen again) is skipped. Returns each inserted
/// row's `rowid` with its event, in batch order.
///
/// `rowid` is the delivery order within a run, so it must follow the batch
/// order: the identity is drawn row by row as the ordered `SELECT` yields
/// them, and should that ever not hold, the batch is refused rather than
/// delivered out of order.
async fn insert_events<'r, 'a>(
    tx: &Transaction<'_>,
    batch: &Batch,
    rows: &'r [EventRow<'a>],
    now: i64,
) -> Result<Vec<(i64, &'r EventRow<'a>)>, PgStoreError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let insert = tx
        .prepare_cached(
            "INSERT INTO events (id, run_id, sequence, event_type, payload, created_at,
                                 run_status, phase, seen_at)
             SELECT e.id, $6, e.sequence, e.event_type, e.payload, e.created_at, $7, $8, $9
             FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[])
                  WITH ORDINALITY AS e(id, sequence, event_type, payload, created_at, n)
             ORDER BY e.n
             ON CONFLICT (id) DO NOTHING
             RETURNING rowid, id",
        )
        .await?;
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let sequences: Vec<Option<i64>> = rows.iter().map(|r| r.sequence).collect();
    let types: Vec<&str> = rows.iter().map(|r| r.event_type).collect();
    let payloads: Vec<&str> = rows.iter().map(|r| &*r.payload).collect();
    let created: Vec<Option<&str>> = rows.iter().map(|r| r.created_at).collect();
    let returned = tx
        .query(
            &insert,
            &[
                &ids,
                &sequences,
                &types,
                &payloads,
                &created,
                &batch.run_id,
                &batch.run_status,
                &batch.phase,
                &now,
            ],
        )
        .await?;
    let rowids = returned
        .iter()
        .map(|r| Ok((r.try_get(1)?, r.try_get(0)?)))
        .collect::<Result<std::collections::HashMap<&str, i64>, tokio_postgres::Error>>()?;
    let inserted: Vec<(i64, &EventRow<'_>)> = rows
        .iter()
        .filter_map(|row| rowids.get(row.id.as_str()).map(|rowid| (*rowid, row)))
        .collect();
    if !inserted.windows(2).all(|pair| pair[0].0 < pair[1].0) {
        return Err(PgStoreError::OutOfOrder(batch.run_id.clone()));
    }
    Ok(inserted)
}

/// One delivery per inserted event and sink, in one statement. Returns the
/// sinks that got deliveries, each once, in first-routed order.
async fn insert_deliveries(
    tx: &Transaction<'_>,
    run_id: &str,
    inserted: &[(i64, &EventRow<'_>)],
    now: i64,
) -> Result<Vec<Arc<str>>, PgStoreError> {
    let mut routed: Vec<Arc<str>> = Vec::new();
    let (mut sinks, mut events) = (Vec::new(), Vec::new());
    for (rowid, row) in inserted {
        for sink in row.sinks {
            sinks.push(&**sink);
            events.push(*rowid);
            if !routed.contains(sink) {
                routed.push(sink.clone());
            }
        }
    }
    if sinks.is_empty() {
        return Ok(routed);
    }
    let insert = tx
        .prepare_cached(
            "INSERT INTO deliveries (sink, event, run_id, next_attempt_at, queued_at)
             SELECT d.sink, d.event, $3, $4, $4
             FROM unnest($1::text[], $2::bigint[]) AS d(sink, event)
             ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(&insert, &[&sinks, &events, &run_id, &now])
        .await?;
    Ok(routed)
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
