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

use std::collections::BTreeSet;

use tokio_postgres::IsolationLevel;

use super::super::state::TailCursor;
use super::super::{DeliveryState, Pending};
use super::deliveries::{pending_row, pending_select};
use super::{PgStore, PgStoreError};

const PENDING: i16 = DeliveryState::Pending as i16;

/// One replica as `status` shows it: the row it heartbeats, and how many
/// runs it holds a current lease on.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReplicaRow {
    pub node: String,
    /// Its last heartbeat (unix ms).
    pub heartbeat_at: i64,
    /// When it (last) started (unix ms).
    pub started_at: i64,
    /// Runs whose lease it holds and that has not expired.
    pub leases: i64,
    /// Seconds since its heartbeat, in the server's clock (a replica
    /// renews every third of its lease ttl; far more means it is gone).
    pub heartbeat_age_s: i64,
}

/// A limit as PostgreSQL takes it.
fn limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Recorded events as [`pending_row`] reads them (no delivery: attempts
/// and due time 0, queued when seen), for `tail`'s reads; a macro so each
/// query stays one `&'static str` through `concat!`.
macro_rules! events_select {
    () => {
        "SELECT e.rowid, e.id, e.run_id, e.sequence, e.event_type, e.payload,
                e.created_at, e.run_status, e.phase, r.labels, 0::integer,
                0::bigint, e.seen_at, e.seen_at
         FROM events e LEFT JOIN runs r ON r.run_id = e.run_id"
    };
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
            .prepare_cached(concat!(
                events_select!(),
                " WHERE e.rowid > $1 AND ($2::text IS NULL OR e.run_id = $2)
                   AND ($3::text IS NULL OR e.event_type = $3)
                 ORDER BY e.rowid LIMIT $4"
            ))
            .await?;
        let rows = client
            .query(&query, &[&after, &run, &event_type, &limit(limit_rows)])
            .await?;
        Ok(rows.iter().map(pending_row).collect::<Result<_, _>>()?)
    }

    /// Where `tail` starts: after the newest committed event, and after
    /// whatever the transactions in flight now commit below it (they began
    /// before `tail` did).
    pub async fn tail_start(&self) -> Result<TailCursor, PgStoreError> {
        Ok(TailCursor::at(self.last_event_row().await?))
    }

    /// The events committed since the last call, each handed out once,
    /// none passed over.
    ///
    /// A row number is drawn when a row is inserted, not when its
    /// transaction commits: a batch of one run may commit row 11 while
    /// another's row 10 is still in flight, and a reader that moved past 11
    /// would never see 10. So the cursor only moves up to a row once every
    /// transaction that was in flight when that row was read has ended
    /// (PostgreSQL's snapshot lists them); until then rows above it are
    /// read again and those already handed out are left out. This relies on
    /// an ingest transaction holding a transaction id before it draws row
    /// numbers, which `record_batch`'s fence (a row lock) gives it.
    pub async fn tail_next(
        &self,
        cursor: &mut TailCursor,
        run: Option<String>,
        event_type: Option<String>,
        limit_rows: usize,
    ) -> Result<Vec<Pending>, PgStoreError> {
        let mut client = self.pool.get().await?;
        // One snapshot for the transactions in flight and the rows read.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        // The snapshot lists only the transactions in flight below its
        // `xmax`; those with a later id are in flight too, unlisted, and
        // may have drawn a row below one this read sees. Taking an id of
        // its own (after the snapshot, which the first statement fixes)
        // bounds them: every id from `xmax` up to it is in flight.
        let own: i64 = tx
            .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
            .await?
            .try_get(0)?;
        let seen = tx
            .query_one(
                "SELECT ARRAY(SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) x
                              UNION ALL
                              SELECT g::text FROM generate_series(
                                  pg_snapshot_xmax(pg_current_snapshot())::text::bigint,
                                  $1::bigint - 1) g),
                        COALESCE((SELECT MAX(rowid) FROM events), 0)::bigint",
                &[&own],
            )
            .await?;
        let in_flight: BTreeSet<String> = seen.try_get::<_, Vec<String>>(0)?.into_iter().collect();
        let newest: i64 = seen.try_get(1)?;
        let handed: Vec<i64> = cursor.handed.iter().copied().collect();
        let query = tx
            .prepare_cached(concat!(
                events_select!(),
                " WHERE e.rowid > $1 AND NOT (e.rowid = ANY($5))
                   AND ($2::text IS NULL OR e.run_id = $2)
                   AND ($3::text IS NULL OR e.event_type = $3)
                 ORDER BY e.rowid LIMIT $4"
            ))
            .await?;
        let rows = tx
            .query(
                &query,
                &[
                    &cursor.after,
                    &run,
                    &event_type,
                    &limit(limit_rows),
                    &handed,
                ],
            )
            .await?;
        tx.commit().await?;
        let events: Vec<Pending> = rows.iter().map(pending_row).collect::<Result<_, _>>()?;
        // Every visible row up to here is handed out (now or before).
        let read_to = match events.last() {
            Some(last) if events.len() >= limit_rows => last.event,
            _ => newest.max(cursor.after),
        };
        cursor.advance(&events, read_to, in_flight);
        Ok(events)
    }

    /// Every replica that ever heartbeat in this database, with its current
    /// leases; ages in the server's clock, so the command's clock is
    /// irrelevant.
    pub async fn replicas(&self) -> Result<Vec<ReplicaRow>, PgStoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT p.node,
                        (extract(epoch FROM p.heartbeat_at) * 1000)::bigint,
                        (extract(epoch FROM p.started_at) * 1000)::bigint,
                        (SELECT count(*) FROM leases l
                         WHERE l.owner = p.node AND l.expires_at > now()),
                        GREATEST(extract(epoch FROM now() - p.heartbeat_at), 0)::bigint
                 FROM replicas p ORDER BY p.node",
                &[],
            )
            .await?;
        let replica = |row: &tokio_postgres::Row| -> Result<ReplicaRow, tokio_postgres::Error> {
            Ok(ReplicaRow {
                node: row.try_get(0)?,
                heartbeat_at: row.try_get(1)?,
                started_at: row.try_get(2)?,
                leases: row.try_get(3)?,
                heartbeat_age_s: row.try_get(4)?,
            })
        };
        Ok(rows.iter().map(replica).collect::<Result<_, _>>()?)
    }
}
