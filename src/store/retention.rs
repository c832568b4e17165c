//! Retention: delivered deliveries and the events nothing refers to any
//! more are pruned after `[state] retain`, a chunk at a time.
//!
//! Run rows are never pruned, finished or not: a row holds the run's
//! cursor, and the cursor is what makes watching a run again (`watch`,
//! `PUT /v1/watch/{runId}`, a `[[runs]]` entry after a restart) resume
//! rather than start over at sequence 0 and deliver every event a second
//! time, once the events that would have caught the duplicates are pruned.

use rusqlite::{Connection, params};

use super::{Store, StoreError};

/// Rows one maintenance job (prune, replay, purge) touches at most: small
/// enough that the writer is back for ingest and delivery within a few
/// milliseconds, large enough that a big prune takes few transactions.
pub const MAINTENANCE_CHUNK: usize = 5_000;

impl Store {
    /// Runs `chunk` as one writer job after another until one touches
    /// fewer than [`MAINTENANCE_CHUNK`] rows (each statement is bounded by
    /// it); returns the rows touched in all. Ingest and delivery get the
    /// writer between chunks.
    pub(super) async fn in_chunks<F>(&self, chunk: F) -> Result<usize, StoreError>
    where
        F: Fn(&Connection) -> Result<usize, rusqlite::Error> + Clone + Send + 'static,
    {
        let mut total = 0;
        loop {
            let done = self.write(chunk.clone()).await?;
            total += done;
            if done < MAINTENANCE_CHUNK {
                return Ok(total);
            }
        }
    }

    /// Drops deliveries done before `cutoff` (unix ms), then events seen
    /// before it that no delivery refers to any more (dead letters and
    /// pending deliveries keep theirs). Returns (deliveries, events). Works
    /// in chunks of [`MAINTENANCE_CHUNK`] rows, each its own writer job, so
    /// ingest and delivery get the writer in between.
    pub async fn prune(&self, cutoff: i64) -> Result<(usize, usize), StoreError> {
        self.write(move |conn| note_pruned_before(conn, cutoff))
            .await?;
        let deliveries = self
            .in_chunks(move |conn| {
                conn.prepare_cached(PRUNE_DELIVERIES)?
                    .execute(params![cutoff, MAINTENANCE_CHUNK as i64])
            })
            .await?;
        let mut events = 0;
        let mut after = 0;
        loop {
            let (deleted, next) = self
                .write(move |conn| prune_events_after(conn, cutoff, after))
                .await?;
            events += deleted;
            match next {
                Some(last) => after = last,
                None => return Ok((deliveries, events)),
            }
        }
    }
}

/// Remembers the newest cutoff a prune used (before deleting anything):
/// an event recorded before it may have lost its delivered rows, so
/// `backfill` can no longer tell which sinks received it.
fn note_pruned_before(conn: &Connection, cutoff: i64) -> Result<(), rusqlite::Error> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('pruned_before', ?1)
         ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
        [cutoff],
    )?;
    Ok(())
}

/// The newest cutoff a prune used (unix ms), or 0 if none ran.
pub(super) fn pruned_before(conn: &Connection) -> Result<i64, rusqlite::Error> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'pruned_before'",
            [],
            |row| row.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

const PRUNE_DELIVERIES: &str = concat!(
    "DELETE FROM deliveries
     WHERE (sink, event) IN (
        SELECT sink, event FROM deliveries INDEXED BY deliveries_done
        WHERE state = ",
    delivery_state!(done),
    " AND done_at < ?1 LIMIT ?2)"
);

/// The next events in ingest order, each with whether a delivery still
/// refers to it.
const PRUNE_EVENTS: &str = "SELECT rowid, seen_at,
        EXISTS (SELECT 1 FROM deliveries INDEXED BY deliveries_by_event WHERE event = events.rowid)
     FROM events WHERE rowid > ?1 ORDER BY rowid LIMIT ?2";

/// One chunk of the events prune: walks up to [`MAINTENANCE_CHUNK`] events
/// after rowid `after` in ingest order, deleting those seen before `cutoff`
/// that no delivery refers to. Returns how many it deleted and, unless the
/// walk is over, where the next chunk starts. Ingest order is age order, so
/// the walk ends at the first event seen at or after `cutoff` (after a
/// clock step backwards, older ones beyond it wait for the next prune).
fn prune_events_after(
    conn: &Connection,
    cutoff: i64,
    after: i64,
) -> Result<(usize, Option<i64>), rusqlite::Error> {
    let mut walk = conn.prepare_cached(PRUNE_EVENTS)?;
    let mut rows = walk.query(params![after, MAINTENANCE_CHUNK as i64])?;
    let mut unreferenced = Vec::new();
    let mut walked = 0;
    let mut last = after;
    while let Some(row) = rows.next()? {
        let (rowid, seen_at, referenced): (i64, i64, bool) =
            (row.get(0)?, row.get(1)?, row.get(2)?);
        if seen_at >= cutoff {
            walked = 0;
            break;
        }
        walked += 1;
        last = rowid;
        if !referenced {
            unreferenced.push(rowid);
        }
    }
    drop(rows);
    let mut delete = conn.prepare_cached("DELETE FROM events WHERE rowid = ?1")?;
    for rowid in &unreferenced {
        delete.execute([rowid])?;
    }
    let next = (walked == MAINTENANCE_CHUNK).then_some(last);
    Ok((unreferenced.len(), next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::dead::{PURGE_DEAD, REPLAY_DEAD};

    /// The query plan of `sql`, one line per step.
    fn plan(conn: &Connection, sql: &str) -> Vec<String> {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let unbound = vec![rusqlite::types::Null; stmt.parameter_count()];
        stmt.query_map(rusqlite::params_from_iter(unbound), |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    /// Maintenance shares the single writer with ingest and delivery: on a
    /// large state database a statement that walks every delivery holds the
    /// writer long enough to trip the watchdog. Each must reach its rows
    /// through an index (a partial one where it walks), never a table scan.
    #[test]
    fn maintenance_statements_reach_their_rows_through_indexes() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        for (name, sql, index) in [
            ("prune deliveries", PRUNE_DELIVERIES, "deliveries_done"),
            ("prune events", PRUNE_EVENTS, "deliveries_by_event"),
            ("replay", REPLAY_DEAD, "deliveries_dead"),
            ("purge", PURGE_DEAD, "deliveries_dead"),
        ] {
            let steps = plan(&conn, sql);
            assert!(
                steps.iter().any(|s| s.contains(index)),
                "{name} uses {index}: {steps:#?}"
            );
            for step in &steps {
                let table_scan = ["SCAN deliveries", "SCAN events", "SCAN d", "SCAN e"]
                    .iter()
                    .any(|scan| step == scan || step.starts_with(&format!("{scan} ")))
                    && !step.contains(" USING ");
                assert!(!table_scan, "{name} scans a table: {steps:#?}");
            }
            assert!(
                sql.contains("LIMIT"),
                "{name} works in bounded chunks: {sql}"
            );
        }
    }
}
