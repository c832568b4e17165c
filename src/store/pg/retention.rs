//! Retention on PostgreSQL, as `store/retention.rs` does it on SQLite:
//! delivered deliveries and the events nothing refers to any more are
//! pruned after `[state] retain`, a chunk at a time, each chunk its own
//! transaction; then finished runs with nothing left to deliver leave the
//! runs table for a tombstone in `pruned_runs`, so watching one again never
//! ingests it from cursor 0.
//!
//! SQLite has one writer, so a check and the delete that follows it cannot
//! be raced; here other replicas write meanwhile, so each delete locks what
//! it checks first:
//! - a delivered row is deleted only if it is still delivered once locked
//!   (`replay --since --delivered` may have queued it again);
//! - an event is deleted only if, once locked, no delivery refers to it (a
//!   writer that adds a delivery to a stored event locks the event `FOR KEY
//!   SHARE` first, so one of the two waits for the other);
//! - a run goes only if, once its row is locked, it is still finished
//!   before the cutoff and none of its events is left (a batch in flight
//!   holds the row `FOR UPDATE` until it commits, so its events are seen).
//!
//! Two replicas pruning at once do no harm: each deletes what is still
//! there.

use super::super::retention::MAINTENANCE_CHUNK;
use super::super::{DeliveryState, RunState, now_ms};
use super::{PgStore, PgStoreError};

const DONE: i16 = DeliveryState::Done as i16;

fn chunk() -> i64 {
    i64::try_from(MAINTENANCE_CHUNK).unwrap_or(i64::MAX)
}

impl PgStore {
    /// Drops deliveries done before `cutoff` (unix ms), then events seen
    /// before it that no delivery refers to any more (dead letters and
    /// pending deliveries keep theirs). Returns (deliveries, events). Works
    /// in chunks of [`MAINTENANCE_CHUNK`] rows, each its own transaction.
    /// Records the cutoff (`meta.pruned_before`) before deleting anything:
    /// an event recorded before it may have lost its delivered rows, so
    /// `backfill` can no longer tell which sinks received it.
    pub async fn prune(&self, cutoff: i64) -> Result<(usize, usize), PgStoreError> {
        self.note_pruned_before(cutoff).await?;
        let mut deliveries = 0;
        loop {
            let deleted = self.prune_deliveries_chunk(cutoff).await?;
            deliveries += deleted;
            if deleted < MAINTENANCE_CHUNK {
                break;
            }
        }
        let mut events = 0;
        let mut after = 0;
        loop {
            let (deleted, next) = self.prune_events_after(cutoff, after).await?;
            events += deleted;
            match next {
                Some(last) => after = last,
                None => return Ok((deliveries, events)),
            }
        }
    }

    /// Moves runs that finished before `cutoff` (unix ms) and have no
    /// event left (run it after [`PgStore::prune`]) from the runs table to
    /// their tombstones, each run's move one transaction; their leases go
    /// with the row. Returns how many. As on SQLite, `cutoff` must lie
    /// before every run's `finished_linger`. Walks the runs in chunks of
    /// [`MAINTENANCE_CHUNK`].
    pub async fn prune_finished_runs(&self, cutoff: i64) -> Result<usize, PgStoreError> {
        let mut pruned = 0;
        let mut after = String::new();
        loop {
            let (candidates, next) = self.finished_runs_after(cutoff, &after).await?;
            for run_id in &candidates {
                if self.move_to_tombstone(run_id, cutoff).await? {
                    pruned += 1;
                }
            }
            match next {
                Some(last) => after = last,
                None => return Ok(pruned),
            }
        }
    }

    async fn note_pruned_before(&self, cutoff: i64) -> Result<(), PgStoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO meta (key, value) VALUES ('pruned_before', $1)
                 ON CONFLICT (key) DO UPDATE SET value = GREATEST(meta.value, excluded.value)",
                &[&cutoff],
            )
            .await?;
        Ok(())
    }

    /// One chunk of delivered rows done before `cutoff`. `FOR UPDATE`
    /// re-checks a row another transaction changed meanwhile, so one queued
    /// again is skipped, not deleted.
    async fn prune_deliveries_chunk(&self, cutoff: i64) -> Result<usize, PgStoreError> {
        let client = self.pool.get().await?;
        let deleted = client
            .execute(
                "WITH doomed AS (
                    SELECT sink, event FROM deliveries
                    WHERE state = $1 AND done_at < $2 LIMIT $3 FOR UPDATE)
                 DELETE FROM deliveries d USING doomed
                 WHERE d.sink = doomed.sink AND d.event = doomed.event AND d.state = $1",
                &[&DONE, &cutoff, &chunk()],
            )
            .await?;
        Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
    }

    /// One chunk of the events prune: walks up to [`MAINTENANCE_CHUNK`]
    /// events after row `after` in ingest order and deletes those seen
    /// before `cutoff` that no delivery refers to. Returns how many it
    /// deleted and, unless the walk is over, where the next chunk starts.
    /// As on SQLite, the walk ends at the first event seen at or after
    /// `cutoff`; older ones beyond it wait for the next prune.
    async fn prune_events_after(
        &self,
        cutoff: i64,
        after: i64,
    ) -> Result<(usize, Option<i64>), PgStoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let walked = tx
            .query(
                "SELECT rowid, seen_at FROM events WHERE rowid > $1 ORDER BY rowid LIMIT $2",
                &[&after, &chunk()],
            )
            .await?;
        let mut old = Vec::with_capacity(walked.len());
        let mut young = false;
        for row in &walked {
            let (rowid, seen_at): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            if seen_at >= cutoff {
                young = true;
                break;
            }
            old.push(rowid);
        }
        // Locked first, then checked by a later statement, which (read
        // committed) sees every delivery committed before the lock was had.
        tx.execute(
            "SELECT 1 FROM events WHERE rowid = ANY($1) FOR UPDATE",
            &[&old],
        )
        .await?;
        let deleted = tx
            .execute(
                "DELETE FROM events e WHERE e.rowid = ANY($1)
                   AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event = e.rowid)",
                &[&old],
            )
            .await?;
        tx.commit().await?;
        let next = (!young && walked.len() == MAINTENANCE_CHUNK)
            .then(|| old.last().copied())
            .flatten();
        Ok((usize::try_from(deleted).unwrap_or(usize::MAX), next))
    }

    /// The next [`MAINTENANCE_CHUNK`] runs by id after `after`: those that
    /// finished before `cutoff`, and, unless the walk is over, where the
    /// next chunk starts.
    async fn finished_runs_after(
        &self,
        cutoff: i64,
        after: &str,
    ) -> Result<(Vec<String>, Option<String>), PgStoreError> {
        let client = self.pool.get().await?;
        let walked = client
            .query(
                "SELECT run_id, state = $3 AND finished_at < $4 FROM runs
                 WHERE run_id > $1 ORDER BY run_id LIMIT $2",
                &[&after, &chunk(), &RunState::Finished.as_str(), &cutoff],
            )
            .await?;
        let mut finished = Vec::new();
        let mut last = None;
        for row in &walked {
            let run_id: String = row.try_get(0)?;
            if row.try_get::<_, Option<bool>>(1)?.unwrap_or(false) {
                finished.push(run_id.clone());
            }
            last = Some(run_id);
        }
        let next = last.filter(|_| walked.len() == MAINTENANCE_CHUNK);
        Ok((finished, next))
    }

    /// The run's row becomes its tombstone, in one transaction, if, with the
    /// row locked, it still finished before `cutoff` and none of its events
    /// is left. Bumps the control generation, so every replica's run
    /// supervisor lets the run go. Returns whether it moved.
    async fn move_to_tombstone(&self, run_id: &str, cutoff: i64) -> Result<bool, PgStoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let still = tx
            .query_opt(
                "SELECT 1 FROM runs WHERE run_id = $1 AND state = $2 AND finished_at < $3
                 FOR UPDATE",
                &[&run_id, &RunState::Finished.as_str(), &cutoff],
            )
            .await?;
        if still.is_none() {
            return Ok(false);
        }
        let has_events: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM events WHERE run_id = $1)",
                &[&run_id],
            )
            .await?
            .try_get(0)?;
        if has_events {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO pruned_runs (run_id, cursor, finished_seq, run_status, finished_at, pruned_at)
             SELECT run_id, cursor, finished_seq, run_status, finished_at, $2
             FROM runs WHERE run_id = $1
             ON CONFLICT (run_id) DO UPDATE SET
                cursor = GREATEST(pruned_runs.cursor, excluded.cursor),
                finished_seq = excluded.finished_seq, run_status = excluded.run_status,
                finished_at = excluded.finished_at, pruned_at = excluded.pruned_at",
            &[&run_id, &now_ms()],
        )
        .await?;
        tx.execute("DELETE FROM runs WHERE run_id = $1", &[&run_id])
            .await?;
        tx.execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'control'",
            &[],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}
