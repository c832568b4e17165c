//! Deliveries on PostgreSQL: what a sink sends next for a run, and the
//! outcome of each attempt, fenced by the run's lease as `store/deliveries.rs`
//! records them on SQLite.

use std::sync::Arc;

use deadpool_postgres::Transaction;
use tokio_postgres::Row;

use super::super::{DeliveryState, Failure, Pending, now_ms};
use super::{Lease, PgStore, PgStoreError, fence};

const PENDING: i16 = DeliveryState::Pending as i16;
const DONE: i16 = DeliveryState::Done as i16;
const DEAD: i16 = DeliveryState::Dead as i16;

/// What a [`Pending`] is read from (the columns [`pending_row`] reads, in
/// its order), for every query of pending deliveries; a macro so each query
/// stays one `&'static str` through `concat!`.
macro_rules! pending_select {
    () => {
        "SELECT d.event, e.id, e.run_id, e.sequence, e.event_type, e.payload,
                e.created_at, e.run_status, e.phase, r.labels, d.attempts,
                d.next_attempt_at, e.seen_at, d.queued_at
         FROM deliveries d
         JOIN events e ON e.rowid = d.event
         LEFT JOIN runs r ON r.run_id = d.run_id"
    };
}
pub(super) use pending_select;

pub(super) fn pending_row(row: &Row) -> Result<Pending, tokio_postgres::Error> {
    Ok(Pending {
        event: row.try_get(0)?,
        id: row.try_get(1)?,
        run_id: row.try_get(2)?,
        sequence: row.try_get(3)?,
        event_type: row.try_get(4)?,
        payload: row.try_get(5)?,
        created_at: row.try_get(6)?,
        run_status: row.try_get(7)?,
        phase: row.try_get(8)?,
        labels: row
            .try_get::<_, Option<String>>(9)?
            .unwrap_or_else(|| "{}".into()),
        attempts: u32::try_from(row.try_get::<_, i32>(10)?).unwrap_or(0),
        next_attempt_at: row.try_get(11)?,
        seen_at: row.try_get(12)?,
        queued_at: row.try_get(13)?,
    })
}

/// The sink answered: its last success, its output offset (a file sink's
/// length) when given, and up again; in the transaction that marks the
/// deliveries it covers.
pub(super) async fn record_success(
    tx: &Transaction<'_>,
    sink: &str,
    offset: Option<i64>,
    now: i64,
) -> Result<(), PgStoreError> {
    tx.execute(
        "INSERT INTO sinks (name, file_offset, last_success_at) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE SET
            file_offset = COALESCE(excluded.file_offset, sinks.file_offset),
            last_success_at = excluded.last_success_at, down = false",
        &[&sink, &offset, &now],
    )
    .await?;
    Ok(())
}

/// Which of a sink's deliveries a fenced write may touch: the lease's run's
/// only (a run lease), or any run's (a node's sink lease).
pub(super) type RunScope<'a> = Option<&'a str>;

/// Marks pending deliveries done and records the sink's success, inside
/// the caller's fenced transaction.
pub(super) async fn set_delivered(
    tx: &Transaction<'_>,
    sink: &str,
    run: RunScope<'_>,
    events: &[i64],
    offset: Option<u64>,
) -> Result<(), PgStoreError> {
    let now = now_ms();
    let offset = offset.map(|o| i64::try_from(o).unwrap_or(i64::MAX));
    tx.execute(
        "UPDATE deliveries SET state = $4, attempts = attempts + 1, done_at = $5,
            last_status = NULL, last_error = NULL
         WHERE sink = $1 AND ($2::text IS NULL OR run_id = $2) AND event = ANY($3)
           AND state = $6",
        &[&sink, &run, &events, &DONE, &now, &PENDING],
    )
    .await?;
    record_success(tx, sink, offset, now).await
}

/// Counts a failed attempt of pending deliveries and schedules or
/// dead-letters them, inside the caller's fenced transaction.
pub(super) async fn set_failed(
    tx: &Transaction<'_>,
    sink: &str,
    run: RunScope<'_>,
    failure: &Failure,
) -> Result<(), PgStoreError> {
    let (state, done_at) = if failure.dead {
        (DEAD, Some(now_ms()))
    } else {
        (PENDING, None)
    };
    let status = failure.status.map(i32::from);
    tx.execute(
        "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = $4,
            last_status = $5, last_error = $6, state = $7, done_at = $8
         WHERE sink = $1 AND ($2::text IS NULL OR run_id = $2) AND event = ANY($3)
           AND state = $9",
        &[
            &sink,
            &run,
            &failure.events,
            &failure.next_attempt_at,
            &status,
            &failure.error,
            &state,
            &done_at,
            &PENDING,
        ],
    )
    .await?;
    Ok(())
}

impl PgStore {
    /// The first `limit` pending deliveries of one run for one sink, in
    /// order. A read: any replica may look; only the owner acts on them.
    pub async fn pending_for_run(
        &self,
        sink: &str,
        run_id: &str,
        limit: usize,
    ) -> Result<Vec<Pending>, PgStoreError> {
        let client = self.pool.get().await?;
        let query = client
            .prepare_cached(concat!(
                pending_select!(),
                " WHERE d.sink = $1 AND d.run_id = $2 AND d.state = 0
                 ORDER BY d.event LIMIT $3"
            ))
            .await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client.query(&query, &[&sink, &run_id, &limit]).await?;
        Ok(rows.iter().map(pending_row).collect::<Result<_, _>>()?)
    }

    /// Deliveries of the lease's run that reached their sink, with the sink's
    /// output `offset` (a file sink's length) in the same transaction.
    /// Refused, nothing written, when the lease was lost: the new owner sends
    /// them again under the same ids (at-least-once holds).
    pub async fn mark_delivered(
        &self,
        lease: &Lease,
        sink: Arc<str>,
        events: Vec<i64>,
        offset: Option<u64>,
    ) -> Result<(), PgStoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        fence(&tx, self.node(), lease).await?;
        set_delivered(&tx, &sink, Some(&lease.run_id), &events, offset).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A failed attempt of deliveries of the lease's run: counted and
    /// scheduled, or dead-lettered. Refused when the lease was lost.
    pub async fn record_failure(
        &self,
        lease: &Lease,
        sink: Arc<str>,
        failure: Failure,
    ) -> Result<(), PgStoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        fence(&tx, self.node(), lease).await?;
        set_failed(&tx, &sink, Some(&lease.run_id), &failure).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A sink answered again: its backlog is due now rather than at each
    /// delivery's own backoff. Not fenced: it spans every run of the sink
    /// and only makes deliveries due sooner; each owner still sends its
    /// own runs' in order.
    pub async fn release_backoff(&self, sink: Arc<str>) -> Result<usize, PgStoreError> {
        let client = self.pool.get().await?;
        // `state = 0` spelled out, as `pending_for_run` does: the partial
        // index `deliveries_pending` then matches whatever plan is chosen.
        let released = client
            .execute(
                "UPDATE deliveries SET next_attempt_at = $2
                 WHERE sink = $1 AND state = 0 AND next_attempt_at > $2",
                &[&&*sink, &now_ms()],
            )
            .await?;
        Ok(usize::try_from(released).unwrap_or(usize::MAX))
    }
}
