//! Dead letters: deliveries given up on, listed by `runhook dead`, queued
//! again by `replay` (same ids) or deleted by `dead --purge`.

use rusqlite::params;
use serde::Serialize;

use super::retention::MAINTENANCE_CHUNK;
use super::runs::bump_control;
use super::{Reader, Store, StoreError, now_ms};

/// Which dead letters `replay` and `dead --purge` act on; `None` = any.
#[derive(Debug, Clone, Default)]
pub struct DeadFilter {
    pub sink: Option<String>,
    pub run: Option<String>,
    pub id: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub sink: String,
    pub run_id: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub dead_at: Option<i64>,
}

impl Store {
    /// Queues dead letters again, with the same ids and fresh attempts.
    /// Returns how many. Works in chunks of [`MAINTENANCE_CHUNK`], each its
    /// own writer job, so a large dead-letter list does not hold the writer;
    /// a run's dead letters are queued in event order.
    pub async fn replay(&self, filter: DeadFilter) -> Result<usize, StoreError> {
        self.in_chunks(move |conn| {
            let replayed = conn.prepare_cached(REPLAY_DEAD)?.execute(params![
                filter.sink,
                filter.run,
                filter.id,
                now_ms(),
                MAINTENANCE_CHUNK as i64
            ])?;
            bump_control(conn)?;
            Ok(replayed)
        })
        .await
    }

    /// Deletes dead letters for good. Returns how many. In chunks, as
    /// [`Store::replay`].
    pub async fn purge_dead(&self, filter: DeadFilter) -> Result<usize, StoreError> {
        self.in_chunks(move |conn| {
            conn.prepare_cached(PURGE_DEAD)?.execute(params![
                filter.sink,
                filter.run,
                filter.id,
                MAINTENANCE_CHUNK as i64
            ])
        })
        .await
    }
}

impl Reader {
    pub async fn dead_letters(
        &self,
        sink: Option<String>,
        run: Option<String>,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare(concat!(
                "SELECT e.id, d.sink, d.run_id, d.attempts, d.last_status, d.last_error, d.done_at
                 FROM deliveries d JOIN events e ON e.rowid = d.event
                 WHERE d.state = ",
                delivery_state!(dead),
                " AND (?1 IS NULL OR d.sink = ?1) AND (?2 IS NULL OR d.run_id = ?2)
                 ORDER BY d.sink, d.event"
            ))?;
            let rows = stmt.query_map(params![sink, run], |row| {
                Ok(DeadLetter {
                    id: row.get(0)?,
                    sink: row.get(1)?,
                    run_id: row.get(2)?,
                    attempts: row.get(3)?,
                    last_status: row.get(4)?,
                    last_error: row.get(5)?,
                    dead_at: row.get(6)?,
                })
            })?;
            rows.collect()
        })
        .await
    }
}

/// Maintenance statements, named so that a test can check their query
/// plans: each reaches its rows through an index, a chunk at a time.
pub(super) const REPLAY_DEAD: &str = concat!(
    "UPDATE deliveries SET state = ",
    delivery_state!(pending),
    ", attempts = 0, next_attempt_at = ?4, queued_at = ?4,
        done_at = NULL
     WHERE (sink, event) IN (
        SELECT sink, event FROM deliveries INDEXED BY deliveries_dead
        WHERE state = ",
    delivery_state!(dead),
    " AND (?1 IS NULL OR sink = ?1) AND (?2 IS NULL OR run_id = ?2)
          AND (?3 IS NULL OR event = (SELECT rowid FROM events WHERE id = ?3))
        ORDER BY sink, run_id, event LIMIT ?5)"
);

pub(super) const PURGE_DEAD: &str = concat!(
    "DELETE FROM deliveries
     WHERE (sink, event) IN (
        SELECT sink, event FROM deliveries INDEXED BY deliveries_dead
        WHERE state = ",
    delivery_state!(dead),
    " AND (?1 IS NULL OR sink = ?1) AND (?2 IS NULL OR run_id = ?2)
          AND (?3 IS NULL OR event = (SELECT rowid FROM events WHERE id = ?3))
        LIMIT ?4)"
);
