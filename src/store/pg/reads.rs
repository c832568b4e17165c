//! Reads on PostgreSQL: a sink's backlog in ingest order, the runs it has
//! work for, its counts, and the recorded events `tail` follows, as
//! `store/deliveries.rs` and `store/record.rs` read them on SQLite. Reads
//! are not fenced: any replica (or a command on any machine) may look; only
//! a run's owner acts on what it finds.
//!
//! `events.rowid` is an identity: ascending within a run (its lease and row
//! lock serialise its batches), but two runs recorded at once may commit
//! their rows out of number order, so a reader that saw row N may later find
//! a row below N of another run (`tail` across runs, a file sink's backlog).

use super::super::{DeliveryState, Pending};
use super::deliveries::{pending_row, pending_select};
use super::{PgStore, PgStoreError};

const PENDING: i16 = DeliveryState::Pending as i16;

/// A limit as PostgreSQL takes it.
fn limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl PgStore {
    /// The first `limit` pending deliveries of a sink in ingest order, due or
    /// not: a sink that fails as a whole (a file) retries its head first.
    pub async fn pending_in_order(
        &self,
        sink: &str,
        limit_rows: usize,
    ) -> Result<Vec<Pending>, PgStoreError> {
        let client = self.pool.get().await?;
        let query = client
            .prepare_cached(concat!(
                pending_select!(),
                " WHERE d.sink = $1 AND d.state = $2
                 ORDER BY d.event LIMIT $3"
            ))
            .await?;
        let rows = client
            .query(&query, &[&sink, &PENDING, &limit(limit_rows)])
            .await?;
        Ok(rows.iter().map(pending_row).collect::<Result<_, _>>()?)
    }

    /// The runs with pending deliveries for a sink (a walk of the sink's
    /// pending index: used at start and after a replay, not per event).
    pub async fn runs_with_pending(&self, sink: &str) -> Result<Vec<String>, PgStoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT DISTINCT run_id FROM deliveries WHERE sink = $1 AND state = $2",
                &[&sink, &PENDING],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?)
    }

    /// Deliveries of one sink not yet done or dead.
    pub async fn pending_count(&self, sink: &str) -> Result<i64, PgStoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM deliveries WHERE sink = $1 AND state = $2",
                &[&sink, &PENDING],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Deliveries not yet done or dead, over all sinks.
    pub async fn pending_total(&self) -> Result<i64, PgStoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM deliveries WHERE state = $1",
                &[&PENDING],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// The newest event row, where `tail` starts.
    pub async fn last_event_row(&self) -> Result<i64, PgStoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one("SELECT COALESCE(MAX(rowid), 0)::bigint FROM events", &[])
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Events recorded after row `after`, optionally of one run or type, as
    /// [`Pending`] rows (no attempts; queued when seen) for `tail`.
    pub async fn events_after(
        &self,
        after: i64,
        run: Option<String>,
        event_type: Option<String>,
        limit_rows: usize,
    ) -> Result<Vec<Pending>, PgStoreError> {
        let client = self.pool.get().await?;
        let query = client
            .prepare_cached(
                "SELECT e.rowid, e.id, e.run_id, e.sequence, e.event_type, e.payload,
                        e.created_at, e.run_status, e.phase, r.labels, 0::integer,
                        0::bigint, e.seen_at, e.seen_at
                 FROM events e LEFT JOIN runs r ON r.run_id = e.run_id
                 WHERE e.rowid > $1 AND ($2::text IS NULL OR e.run_id = $2)
                   AND ($3::text IS NULL OR e.event_type = $3)
                 ORDER BY e.rowid LIMIT $4",
            )
            .await?;
        let rows = client
            .query(&query, &[&after, &run, &event_type, &limit(limit_rows)])
            .await?;
        Ok(rows.iter().map(pending_row).collect::<Result<_, _>>()?)
    }
}
