//! Stored events queued again by the time they were recorded, on
//! PostgreSQL: `replay --since` (the same delivery rows, so the same ids)
//! and `backfill` (new rows for a sink added after the events were
//! recorded), as `store/requeue.rs` does on SQLite.
//!
//! Both walk the events by `rowid`, a chunk of [`MAINTENANCE_CHUNK`] per
//! transaction. Within a run `rowid` is ingest order (the lease serialises
//! a run's batches), so a run's rows are queued in event order, and a
//! chunk that queues part of a run commits before the next queues the
//! rest: per-run order holds for what is queued. Across runs `rowid` is not
//! time order here (replicas record at once, each stamping `seen_at` with
//! its own clock), so unlike SQLite's, the walk does not end at the first
//! event seen after the range: it goes to the end and filters, since an
//! event of the range may lie past one that is not.
//!
//! Operator commands, so not fenced; they touch no pending row, and a
//! backfill locks the runs it queues for against their ingest (see
//! [`PgStore::backfill`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use deadpool_postgres::Transaction;

use super::super::retention::MAINTENANCE_CHUNK;
use super::super::{Backfilled, RequeueFilter, StoredEvent, TimeRange, now_ms};
use super::runs::bump_control;
use super::{PgStore, PgStoreError};

/// How far a walk got: the last event it looked at, or the end.
type Next = Option<i64>;

/// One event of a walk.
struct Walked {
    rowid: i64,
    seen_at: i64,
    event: StoredEvent,
}

impl PgStore {
    /// Queues again, with the same ids and fresh attempts, the deliveries of
    /// events recorded in the range that are dead (and delivered, with
    /// `delivered`). A pending delivery is left as it is. Returns how many.
    pub async fn requeue_range(&self, filter: RequeueFilter) -> Result<usize, PgStoreError> {
        let mut queued = 0;
        let mut after = 0;
        loop {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let (chunk, next) = requeue_chunk(&tx, &filter, after).await?;
            tx.commit().await?;
            queued += chunk;
            match next {
                Some(last) => after = last,
                None => return Ok(queued),
            }
        }
    }

    /// Gives `sink` a delivery of every event recorded in the range (of
    /// `run`, when named) that `routed` says it would get, unless it has one
    /// already, whatever its state; as on SQLite, an event older than one
    /// the sink has a row for in its run is left out (`skipped`: it would
    /// reach the sink out of order), and so is one recorded before the last
    /// prune's cutoff (`before_prune`: whether the sink received it cannot
    /// be told).
    ///
    /// SQLite's single writer keeps ingest out between "the newest row the
    /// sink has for the run" and the insert. Here each chunk locks the runs
    /// it queues for (`FOR SHARE`, in run id order) first; ingest locks its
    /// run's row to advance the cursor, so no delivery of a later event can
    /// be recorded for the run, and sent, while the chunk decides.
    pub async fn backfill<F>(
        &self,
        sink: Arc<str>,
        range: TimeRange,
        run: Option<String>,
        routed: F,
    ) -> Result<Backfilled, PgStoreError>
    where
        F: Fn(&StoredEvent) -> bool + Send + Sync,
    {
        let mut done = Backfilled::default();
        let mut after = 0;
        loop {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let (chunk, next) =
                backfill_chunk(&tx, &sink, range, run.as_deref(), &routed, after).await?;
            tx.commit().await?;
            done.queued += chunk.queued;
            done.skipped += chunk.skipped;
            done.before_prune += chunk.before_prune;
            match next {
                Some(last) => after = last,
                None => return Ok(done),
            }
        }
    }
}

/// The events of the range (and run) among the [`MAINTENANCE_CHUNK`] after
/// `after` by rowid, and where the next chunk starts.
async fn walk(
    tx: &Transaction<'_>,
    range: TimeRange,
    run: Option<&str>,
    after: i64,
) -> Result<(Vec<Walked>, Next), PgStoreError> {
    let chunk = i64::try_from(MAINTENANCE_CHUNK).unwrap_or(i64::MAX);
    let rows = tx
        .query(
            "SELECT e.rowid, e.seen_at, e.run_id, e.event_type, e.run_status, e.phase, r.labels
             FROM events e LEFT JOIN runs r ON r.run_id = e.run_id
             WHERE e.rowid > $1 ORDER BY e.rowid LIMIT $2",
            &[&after, &chunk],
        )
        .await?;
    let next = match rows.last() {
        Some(last) if rows.len() == MAINTENANCE_CHUNK => Some(last.try_get(0)?),
        _ => None,
    };
    let mut found = Vec::new();
    for row in &rows {
        let seen_at: i64 = row.try_get(1)?;
        let run_id: String = row.try_get(2)?;
        if seen_at < range.since || seen_at >= range.until || run.is_some_and(|r| r != run_id) {
            continue;
        }
        found.push(Walked {
            rowid: row.try_get(0)?,
            seen_at,
            event: StoredEvent {
                run_id,
                event_type: row.try_get(3)?,
                run_status: row.try_get(4)?,
                phase: row.try_get(5)?,
                labels: row
                    .try_get::<_, Option<&str>>(6)?
                    .and_then(|l| serde_json::from_str(l).ok())
                    .unwrap_or_default(),
            },
        });
    }
    Ok((found, next))
}

async fn requeue_chunk(
    tx: &Transaction<'_>,
    filter: &RequeueFilter,
    after: i64,
) -> Result<(usize, Next), PgStoreError> {
    let (events, next) = walk(tx, filter.range, filter.run.as_deref(), after).await?;
    if events.is_empty() {
        return Ok((0, next));
    }
    let rowids: Vec<i64> = events.iter().map(|w| w.rowid).collect();
    let queued = tx
        .execute(
            concat!(
                "UPDATE deliveries SET state = ",
                delivery_state!(pending),
                ", attempts = 0, next_attempt_at = $3, queued_at = $3, done_at = NULL
                 WHERE event = ANY($1) AND ($2::text IS NULL OR sink = $2)
                   AND (state = ",
                delivery_state!(dead),
                " OR ($4 AND state = ",
                delivery_state!(done),
                "))"
            ),
            &[&rowids, &filter.sink, &now_ms(), &filter.delivered],
        )
        .await?;
    if queued > 0 {
        bump_control(tx).await?;
    }
    Ok((usize::try_from(queued).unwrap_or(usize::MAX), next))
}

async fn backfill_chunk(
    tx: &Transaction<'_>,
    sink: &str,
    range: TimeRange,
    run: Option<&str>,
    routed: &(dyn Fn(&StoredEvent) -> bool + Send + Sync),
    after: i64,
) -> Result<(Backfilled, Next), PgStoreError> {
    let pruned_before = pruned_before(tx).await?;
    let (events, next) = walk(tx, range, run, after).await?;
    let events: Vec<Walked> = events.into_iter().filter(|w| routed(&w.event)).collect();
    let mut done = Backfilled::default();
    if events.is_empty() {
        return Ok((done, next));
    }
    let mut runs: Vec<&str> = events.iter().map(|w| w.event.run_id.as_str()).collect();
    runs.sort_unstable();
    runs.dedup();
    tx.query(
        "SELECT 1 FROM runs WHERE run_id = ANY($1) ORDER BY run_id FOR SHARE",
        &[&runs],
    )
    .await?;
    let mut newest: HashMap<&str, Option<i64>> = HashMap::new();
    for run_id in &runs {
        newest.insert(run_id, newest_with_a_row(tx, sink, run_id).await?);
    }
    let rowids: Vec<i64> = events.iter().map(|w| w.rowid).collect();
    let has_row: HashSet<i64> = tx
        .query(
            "SELECT event FROM deliveries WHERE sink = $1 AND event = ANY($2)",
            &[&sink, &rowids],
        )
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    let (mut insert_events, mut insert_runs) = (Vec::new(), Vec::new());
    for walked in &events {
        let run_id = walked.event.run_id.as_str();
        let before_prune = walked.seen_at < pruned_before;
        let out_of_order = newest
            .get(run_id)
            .copied()
            .flatten()
            .is_some_and(|newest| walked.rowid < newest);
        if has_row.contains(&walked.rowid) {
            // One the sink has already is neither queued nor left out.
            continue;
        }
        if before_prune {
            done.before_prune += 1;
        } else if out_of_order {
            done.skipped += 1;
        } else {
            insert_events.push(walked.rowid);
            insert_runs.push(run_id);
        }
    }
    if !insert_events.is_empty() {
        let queued = tx
            .execute(
                "INSERT INTO deliveries (sink, event, run_id, next_attempt_at, queued_at)
                 SELECT $1, d.event, d.run_id, $4, $4
                 FROM unnest($2::bigint[], $3::text[]) AS d(event, run_id)
                 ON CONFLICT DO NOTHING",
                &[&sink, &insert_events, &insert_runs, &now_ms()],
            )
            .await?;
        done.queued = usize::try_from(queued).unwrap_or(usize::MAX);
    }
    if done.queued > 0 {
        bump_control(tx).await?;
    }
    Ok((done, next))
}

/// The newest cutoff a prune used (unix ms), or 0 if none ran: an event
/// recorded before it may have lost its delivered rows.
async fn pruned_before(tx: &Transaction<'_>) -> Result<i64, PgStoreError> {
    let row = tx
        .query_opt("SELECT value FROM meta WHERE key = 'pruned_before'", &[])
        .await?;
    Ok(match row {
        Some(row) => row.try_get(0)?,
        None => 0,
    })
}

/// The newest event of `run_id` that `sink` has a delivery row for, in any
/// state (pending, maybe in flight right now, done or dead): a backfilled
/// event older than it would reach the sink after a later event of its run
/// (guarantee 4). Backwards through the run's events (`events_by_run`),
/// each probed in the deliveries' key: done rows have no index by run.
async fn newest_with_a_row(
    tx: &Transaction<'_>,
    sink: &str,
    run_id: &str,
) -> Result<Option<i64>, PgStoreError> {
    let row = tx
        .query_opt(
            "SELECT e.rowid FROM events e
             WHERE e.run_id = $2
               AND EXISTS (SELECT 1 FROM deliveries d WHERE d.sink = $1 AND d.event = e.rowid)
             ORDER BY e.rowid DESC LIMIT 1",
            &[&sink, &run_id],
        )
        .await?;
    Ok(match row {
        Some(row) => Some(row.try_get(0)?),
        None => None,
    })
}
