//! Retention: delivered deliveries and the events nothing refers to any
//! more are pruned after `[state] retain`, a chunk at a time; then finished
//! runs with nothing left to deliver.
//!
//! A run row holds the run's cursor, and the cursor is what makes watching
//! a run again (`watch`, `PUT /v1/watch/{runId}`, a `[[runs]]` entry after a
//! restart) resume rather than start over at sequence 0 and deliver every
//! event a second time, once the events that would have caught the
//! duplicates are pruned. So a pruned run leaves a tombstone (`pruned_runs`:
//! its cursor, final status and when it finished), which
//! [`Store::subscribe`] consults before it creates a row. Only finished runs
//! go, and only once none of their events is left: no pending delivery and
//! no dead letter (those need the run: its labels, `replay`), and no event
//! delivered within `retain` (replay by time and `backfill` can reach it).

use rusqlite::{Connection, params};

use super::runs::bump_control;
use super::{RunState, Store, StoreError, now_ms};

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

impl Store {
    /// Moves runs that finished before `cutoff` (unix ms) and have no
    /// event left (run it after [`Store::prune`]: no pending delivery, no
    /// dead letter, nothing delivered since `cutoff`) from the runs table
    /// to their tombstones. Returns how many. `cutoff` must lie before the
    /// `finished_linger` of every run (the config holds `retain` to at
    /// least the linger), so no run is pruned while a failed one may still
    /// be retried upstream. Walks the runs in chunks of
    /// [`MAINTENANCE_CHUNK`], each its own writer job.
    pub async fn prune_finished_runs(&self, cutoff: i64) -> Result<usize, StoreError> {
        let mut pruned = 0;
        let mut after = String::new();
        loop {
            let (moved, next) = self
                .write(move |conn| prune_runs_after(conn, cutoff, &after))
                .await?;
            pruned += moved;
            match next {
                Some(last) => after = last,
                None => return Ok(pruned),
            }
        }
    }
}

/// The next runs by id, with what decides whether they may be pruned.
const WALK_RUNS: &str = "SELECT run_id, state, finished_at FROM runs
     WHERE run_id > ?1 ORDER BY run_id LIMIT ?2";

/// Whether any event of a run is still stored. Event ids are derived,
/// `{runId}:{sequence}` and `{runId}:finished:{n}`, so a run's events are
/// one range of the unique index on `id`: a seek, not a walk.
const RUN_HAS_EVENTS: &str = "SELECT EXISTS (SELECT 1 FROM events
        WHERE id >= ?1 || ':' AND id < ?1 || ';')";

/// One chunk of the runs prune: walks up to [`MAINTENANCE_CHUNK`] runs
/// after `after` by id and moves those that may go to `pruned_runs`: a
/// finished run goes once none of its events is left. A pending delivery
/// or a dead letter keeps its event, so it keeps its run; so does an event
/// delivered less than `retain` ago, which `replay --since --delivered` and
/// `backfill` can still queue and which then needs the run's labels.
/// Returns how many it moved and, unless the walk is over, where the next
/// chunk starts.
fn prune_runs_after(
    conn: &Connection,
    cutoff: i64,
    after: &str,
) -> Result<(usize, Option<String>), rusqlite::Error> {
    let mut finished = Vec::new();
    let mut walked = 0;
    let mut last = None;
    {
        let mut walk = conn.prepare_cached(WALK_RUNS)?;
        let mut rows = walk.query(params![after, MAINTENANCE_CHUNK as i64])?;
        while let Some(row) = rows.next()? {
            let (run_id, state, finished_at): (String, RunState, Option<i64>) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            walked += 1;
            if state == RunState::Finished && finished_at.is_some_and(|at| at < cutoff) {
                finished.push(run_id.clone());
            }
            last = Some(run_id);
        }
    }
    let mut has_events = conn.prepare_cached(RUN_HAS_EVENTS)?;
    let mut moved = 0;
    let now = now_ms();
    for run_id in &finished {
        if !has_events.query_row([run_id], |r| r.get::<_, bool>(0))? {
            move_to_tombstone(conn, run_id, now)?;
            moved += 1;
        }
    }
    if moved > 0 {
        // The daemon's run supervisor looks again: a pruned run is no
        // longer watched, so no follower is kept (or started) for it.
        bump_control(conn)?;
    }
    let next = if walked == MAINTENANCE_CHUNK {
        last
    } else {
        None
    };
    Ok((moved, next))
}

/// The run's row becomes its tombstone, in one transaction.
fn move_to_tombstone(conn: &Connection, run_id: &str, now: i64) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(
        "INSERT INTO pruned_runs (run_id, cursor, finished_seq, run_status, finished_at, pruned_at)
         SELECT run_id, cursor, finished_seq, run_status, finished_at, ?2
         FROM runs WHERE run_id = ?1
         ON CONFLICT (run_id) DO UPDATE SET cursor = MAX(cursor, excluded.cursor),
            finished_seq = excluded.finished_seq, run_status = excluded.run_status,
            finished_at = excluded.finished_at, pruned_at = excluded.pruned_at",
    )?
    .execute(params![run_id, now])?;
    conn.prepare_cached("DELETE FROM runs WHERE run_id = ?1")?
        .execute([run_id])?;
    Ok(())
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
            ("prune runs", WALK_RUNS, "sqlite_autoindex_runs_1"),
        ] {
            let steps = super::super::schema::query_plan(&conn, sql);
            assert!(
                steps.iter().any(|s| s.contains(index)),
                "{name} uses {index}: {steps:#?}"
            );
            for step in &steps {
                let table_scan = [
                    "SCAN deliveries",
                    "SCAN events",
                    "SCAN runs",
                    "SCAN d",
                    "SCAN e",
                ]
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

    /// The runs prune asks, per finished run, whether any of its events is
    /// left: a seek into the unique index on the event id, never a walk of
    /// the events.
    #[test]
    fn the_runs_prune_finds_a_runs_events_through_the_id_index() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        let steps = super::super::schema::query_plan(&conn, RUN_HAS_EVENTS);
        assert!(
            steps
                .iter()
                .any(|s| s.contains("sqlite_autoindex_events_1 (id>? AND id<?)")),
            "a range of the id index: {steps:#?}"
        );
        assert!(
            !steps.iter().any(|s| s.starts_with("SCAN events")),
            "{steps:#?}"
        );
    }

    /// Waits until the millisecond clock has passed `t`.
    async fn clock_past(t: i64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while now_ms() <= t {
            assert!(
                std::time::Instant::now() < deadline,
                "the clock stands still"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Event 1 of `run` to sink `ops`, and its end when `finish` says so.
    fn batch(run: &str, finish: Option<&str>) -> crate::store::Batch {
        use crate::store::{Batch, Finish, NewEvent};
        Batch {
            run_id: run.into(),
            events: vec![NewEvent {
                sequence: 1,
                event_type: "STEP".into(),
                payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
                created_at: None,
                sinks: vec!["ops".into()],
            }],
            run_status: Some(finish.unwrap_or("running").into()),
            phase: None,
            finish: finish.map(|status| Finish {
                status: status.into(),
                error_message: None,
                cancel_reason: None,
                sinks: vec!["ops".into()],
            }),
            stalled: None,
        }
    }

    /// Records `run` (finished or not) and leaves its deliveries to `ops`
    /// as `leave` says: all delivered, or its first event dead or pending.
    async fn recorded(store: &Store, run: &str, finish: Option<&str>, leave: &str) {
        use crate::store::Failure;
        store
            .subscribe(run.into(), Default::default(), "config", None)
            .await
            .unwrap();
        store.record_batch(batch(run, finish)).await.unwrap();
        let reader = store.reader().unwrap();
        let rows: Vec<i64> = reader
            .pending_for_run("ops", run, 10)
            .await
            .unwrap()
            .iter()
            .map(|p| p.event)
            .collect();
        let (first, rest) = rows.split_at(1);
        match leave {
            "delivered" => {
                store
                    .mark_delivered("ops".into(), rows.clone(), None)
                    .await
                    .unwrap();
            }
            "dead" => {
                let failure = Failure {
                    events: first.to_vec(),
                    status: Some(500),
                    error: "boom".into(),
                    next_attempt_at: 0,
                    dead: true,
                };
                store.record_failure("ops".into(), failure).await.unwrap();
                store
                    .mark_delivered("ops".into(), rest.to_vec(), None)
                    .await
                    .unwrap();
            }
            _ => {
                store
                    .mark_delivered("ops".into(), rest.to_vec(), None)
                    .await
                    .unwrap();
            }
        }
    }

    /// A finished run past the cutoff with nothing left to deliver leaves
    /// the runs table for a tombstone once its events are pruned; a dead
    /// letter (replay needs the run), a pending delivery, a delivery done
    /// after the cutoff (replay by time can still reach it), a finish after
    /// the cutoff or a run not finished keep the row. Watching a pruned run
    /// again leaves it pruned: no row at cursor 0 from which everything
    /// would be ingested again.
    #[tokio::test]
    async fn prune_moves_only_old_finished_runs_with_nothing_left_to_deliver() {
        use crate::store::Subscribed;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let reader = store.reader().unwrap();
        recorded(&store, "done", Some("completed"), "delivered").await;
        recorded(&store, "done2", Some("completed"), "pending").await;
        recorded(&store, "dead", Some("failed"), "dead").await;
        recorded(&store, "pending", Some("completed"), "pending").await;
        recorded(&store, "late", Some("completed"), "pending").await;
        recorded(&store, "running", None, "delivered").await;
        clock_past(now_ms()).await;
        let cutoff = now_ms();
        clock_past(cutoff).await;
        recorded(&store, "young", Some("completed"), "delivered").await;
        for run in ["late", "done2"] {
            let open = reader.pending_for_run("ops", run, 10).await.unwrap();
            let open = open.iter().map(|p| p.event).collect();
            store
                .mark_delivered("ops".into(), open, None)
                .await
                .unwrap();
        }

        // Its events still stored (not pruned yet): "done" stays too.
        assert_eq!(store.prune_finished_runs(cutoff).await.unwrap(), 0);
        store.prune(cutoff).await.unwrap();
        assert_eq!(store.prune_finished_runs(cutoff).await.unwrap(), 1);
        let left: Vec<String> = reader
            .runs()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.run_id)
            .collect();
        assert_eq!(
            left,
            ["dead", "done2", "late", "pending", "running", "young"],
            "done2 shares a prefix with done, and was delivered after the cutoff"
        );
        let tombstone = reader
            .pruned_run("done".into())
            .await
            .unwrap()
            .expect("a tombstone");
        assert_eq!(
            (tombstone.cursor, tombstone.status.as_deref()),
            (1, Some("completed"))
        );
        assert!(tombstone.finished_at < cutoff && tombstone.pruned_at >= cutoff);

        for origin in ["config", "watch"] {
            let again = store
                .subscribe("done".into(), Default::default(), origin, None)
                .await
                .unwrap();
            assert_eq!(again, Subscribed::Pruned(tombstone.clone()));
        }
        assert!(
            reader
                .runs()
                .await
                .unwrap()
                .iter()
                .all(|r| r.run_id != "done")
        );
        assert!(
            store.record_batch(batch("done", None)).await.is_err(),
            "nothing records a pruned run from cursor 0"
        );
        assert!(store.unsubscribe("done".into()).await.unwrap(), "known");

        // Nothing more goes, and the tombstone stays.
        assert_eq!(store.prune_finished_runs(cutoff).await.unwrap(), 0);
        assert_eq!(reader.pruned_count().await.unwrap(), 1);
    }

    /// More finished runs than one chunk walks: every one is reached, each
    /// chunk its own writer transaction, so the writer is never held long.
    #[tokio::test]
    async fn the_runs_prune_walks_every_run_in_chunks() {
        const RUNS: usize = 3 * MAINTENANCE_CHUNK + 10;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        store
            .write(|conn| {
                let mut insert = conn.prepare(
                    "INSERT INTO runs (run_id, origin, cursor, state, finished_at, updated_at)
                     VALUES (?1, 'watch', 3, ?2, 1, 1)",
                )?;
                for n in 0..RUNS {
                    insert.execute(params![format!("run-{n:05}"), RunState::Finished])?;
                }
                Ok(())
            })
            .await
            .unwrap();
        let before = *store.commits().borrow();
        assert_eq!(store.prune_finished_runs(2).await.unwrap(), RUNS);
        let transactions = *store.commits().borrow() - before;
        // Four chunks; the last commit may not have been counted yet.
        assert!(transactions >= 3, "{transactions} writer transactions");
        let reader = store.reader().unwrap();
        assert!(reader.runs().await.unwrap().is_empty());
        assert_eq!(reader.pruned_count().await.unwrap(), RUNS as i64);
    }
}
