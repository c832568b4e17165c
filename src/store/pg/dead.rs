//! Dead letters on PostgreSQL: listed by `runhook dead`, queued again by
//! `replay` (same ids) or deleted by `dead --purge`, as `store/dead.rs` does
//! on SQLite.
//!
//! Operator commands, so not fenced: they change only dead rows, which no
//! owner's write touches (outcomes update pending rows only), and the
//! owner's delivery loop sees a replayed row as one more pending delivery
//! of its run, taken in event order.

use super::super::retention::MAINTENANCE_CHUNK;
use super::super::{DeadFilter, DeadLetter, now_ms};
use super::runs::bump_control;
use super::{PgStore, PgStoreError};

/// A chunk of dead letters, picked through `deliveries_dead` in (sink, run,
/// event) order: each chunk queues a prefix of a run's letters, in event
/// order, before the next chunk queues the rest (as on SQLite). Rows are
/// not skipped when locked: skipping one would queue a later event of its
/// run before it.
/// The state is a literal (`delivery_state!`), not a parameter: the
/// planner uses the partial index only for a `WHERE` that states its
/// predicate. The outer `state` test keeps a row another replay queued
/// meanwhile as it is.
const REPLAY_DEAD: &str = concat!(
    "UPDATE deliveries SET state = ",
    delivery_state!(pending),
    ", attempts = 0, next_attempt_at = $4, queued_at = $4, done_at = NULL
     WHERE (sink, event) IN (
        SELECT sink, event FROM deliveries
        WHERE state = ",
    delivery_state!(dead),
    " AND ($1::text IS NULL OR sink = $1)
          AND ($2::text IS NULL OR run_id = $2)
          AND ($3::text IS NULL OR event = (SELECT rowid FROM events WHERE id = $3))
        ORDER BY sink, run_id, event LIMIT $5
        FOR UPDATE)
       AND state = ",
    delivery_state!(dead)
);

const PURGE_DEAD: &str = concat!(
    "DELETE FROM deliveries
     WHERE (sink, event) IN (
        SELECT sink, event FROM deliveries
        WHERE state = ",
    delivery_state!(dead),
    " AND ($1::text IS NULL OR sink = $1)
          AND ($2::text IS NULL OR run_id = $2)
          AND ($3::text IS NULL OR event = (SELECT rowid FROM events WHERE id = $3))
        LIMIT $4
        FOR UPDATE)
       AND state = ",
    delivery_state!(dead)
);

impl PgStore {
    /// Queues dead letters again, with the same ids and fresh attempts.
    /// Returns how many. A chunk of [`MAINTENANCE_CHUNK`] per transaction, so
    /// a large dead-letter list holds no lock for long; a run's dead letters
    /// are queued in event order.
    pub async fn replay(&self, filter: DeadFilter) -> Result<usize, PgStoreError> {
        let chunk = i64::try_from(MAINTENANCE_CHUNK).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let replayed = tx
                .execute(
                    REPLAY_DEAD,
                    &[&filter.sink, &filter.run, &filter.id, &now_ms(), &chunk],
                )
                .await?;
            bump_control(&tx).await?;
            tx.commit().await?;
            let replayed = usize::try_from(replayed).unwrap_or(usize::MAX);
            total += replayed;
            if replayed < MAINTENANCE_CHUNK {
                return Ok(total);
            }
        }
    }

    /// Deletes dead letters for good. Returns how many. In chunks, as
    /// [`PgStore::replay`].
    pub async fn purge_dead(&self, filter: DeadFilter) -> Result<usize, PgStoreError> {
        let chunk = i64::try_from(MAINTENANCE_CHUNK).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let client = self.pool.get().await?;
            let purged = client
                .execute(PURGE_DEAD, &[&filter.sink, &filter.run, &filter.id, &chunk])
                .await?;
            let purged = usize::try_from(purged).unwrap_or(usize::MAX);
            total += purged;
            if purged < MAINTENANCE_CHUNK {
                return Ok(total);
            }
        }
    }

    /// The dead letters, of one sink and one run when named, by sink and
    /// event.
    pub async fn dead_letters(
        &self,
        sink: Option<String>,
        run: Option<String>,
    ) -> Result<Vec<DeadLetter>, PgStoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                concat!(
                    "SELECT e.id, d.sink, d.run_id, d.attempts, d.last_status, d.last_error,
                        d.done_at
                     FROM deliveries d JOIN events e ON e.rowid = d.event
                     WHERE d.state = ",
                    delivery_state!(dead),
                    " AND ($1::text IS NULL OR d.sink = $1)
                       AND ($2::text IS NULL OR d.run_id = $2)
                     ORDER BY d.sink, d.event"
                ),
                &[&sink, &run],
            )
            .await?;
        let letter = |row: &tokio_postgres::Row| -> Result<DeadLetter, tokio_postgres::Error> {
            Ok(DeadLetter {
                id: row.try_get(0)?,
                sink: row.try_get(1)?,
                run_id: row.try_get(2)?,
                attempts: i64::from(row.try_get::<_, i32>(3)?),
                last_status: row.try_get::<_, Option<i32>>(4)?.map(i64::from),
                last_error: row.try_get(5)?,
                dead_at: row.try_get(6)?,
            })
        };
        Ok(rows.iter().map(letter).collect::<Result<_, _>>()?)
    }
}
