//! The schema, versioned with `PRAGMA user_version`. Each migration runs once,
//! in order; the pending ones run inside one transaction.

use rusqlite::Connection;

/// Migration N brings the schema from version N to N+1.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the outbox.
    r#"
    CREATE TABLE runs (
        run_id        TEXT PRIMARY KEY,
        labels        TEXT NOT NULL DEFAULT '{}',   -- JSON object
        origin        TEXT NOT NULL,                -- 'config' | 'watch'
        watched       INTEGER NOT NULL DEFAULT 1,
        transport     TEXT,                         -- requested: auto | sse | poll
        active_transport TEXT,                      -- what ingest uses now
        cursor        INTEGER NOT NULL DEFAULT 0,   -- highest sequence recorded
        run_status    TEXT,
        phase         TEXT,
        state         TEXT NOT NULL DEFAULT 'starting',
        last_error    TEXT,
        finished_seq  INTEGER,                      -- lastSequence of the last run_finished
        finished_at   INTEGER,
        last_event_at INTEGER,                      -- unix ms, last event recorded
        upstream_seq  INTEGER,                      -- lastEventSequence from a run lookup
        updated_at    INTEGER NOT NULL
    );
    CREATE TABLE events (
        rowid       INTEGER PRIMARY KEY,            -- ingest order
        id          TEXT NOT NULL UNIQUE,           -- {runId}:{sequence} or {runId}:finished:{n}
        run_id      TEXT NOT NULL,
        sequence    INTEGER,                        -- NULL for run_finished
        event_type  TEXT NOT NULL,
        payload     TEXT NOT NULL,                  -- bytes as received
        created_at  TEXT,
        run_status  TEXT,
        phase       TEXT,
        seen_at     INTEGER NOT NULL                -- unix ms
    );
    CREATE TABLE deliveries (
        sink            TEXT NOT NULL,
        event           INTEGER NOT NULL,           -- events.rowid
        run_id          TEXT NOT NULL,
        state           INTEGER NOT NULL DEFAULT 0, -- 0 pending, 1 done, 2 dead
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,           -- unix ms
        queued_at       INTEGER NOT NULL,           -- queued or replayed; max_age counts from here
        last_status     INTEGER,
        last_error      TEXT,
        done_at         INTEGER,
        PRIMARY KEY (sink, event)
    ) WITHOUT ROWID;
    -- Partial indexes over pending deliveries only: small, and a delivery
    -- leaves them when it is done or dead. Queries name them (INDEXED BY):
    -- without statistics the planner would walk the primary key through
    -- every delivery ever done.
    CREATE INDEX deliveries_pending ON deliveries(sink, event) WHERE state = 0;
    CREATE INDEX deliveries_pending_by_run ON deliveries(sink, run_id, event) WHERE state = 0;
    CREATE TABLE sinks (
        name            TEXT PRIMARY KEY,
        file_offset     INTEGER,                    -- file sink: bytes marked done
        last_success_at INTEGER,
        down            INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE slack_threads (
        sink    TEXT NOT NULL,
        run_id  TEXT NOT NULL,
        channel TEXT NOT NULL,
        ts      TEXT NOT NULL,                      -- the root message; replies carry it as thread_ts
        PRIMARY KEY (sink, run_id)
    ) WITHOUT ROWID;
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('control', 0);
    "#,
    // 1 -> 2: indexes for maintenance, which shares the single writer with
    // ingest and delivery and so must reach its rows without a table scan.
    r#"
    -- Delivered deliveries by age: what prune removes.
    CREATE INDEX deliveries_done ON deliveries(done_at) WHERE state = 1;
    -- Dead letters only: what replay and dead --purge act on.
    CREATE INDEX deliveries_dead ON deliveries(sink, run_id, event) WHERE state = 2;
    -- Whether an event still has deliveries: prune keeps those events.
    CREATE INDEX deliveries_by_event ON deliveries(event);
    "#,
    // 2 -> 3: tombstones of finished runs pruned from `runs` after
    // `state.retain`. The runs row is the cursor; once it is gone, the
    // tombstone is what keeps a run watched again (the config after a
    // restart, `watch`, `PUT /v1/watch`) from starting over at sequence 0.
    r#"
    CREATE TABLE pruned_runs (
        run_id       TEXT PRIMARY KEY,
        cursor       INTEGER NOT NULL,              -- highest sequence recorded
        finished_seq INTEGER,                       -- lastSequence of the last run_finished
        run_status   TEXT,                          -- completed | failed | cancelled
        finished_at  INTEGER NOT NULL,              -- unix ms, last run_finished recorded
        pruned_at    INTEGER NOT NULL               -- unix ms
    ) WITHOUT ROWID;
    "#,
];

pub const VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database to the current version. A database from a newer
/// runhook is refused rather than guessed at. The version is read again
/// under the write lock (`BEGIN IMMEDIATE`): two processes opening a fresh
/// database at once (the daemon's first start and a `runhook watch`) must
/// not both run a migration.
pub fn migrate(conn: &mut Connection) -> Result<(), super::StoreError> {
    let version = |conn: &Connection| -> Result<i64, rusqlite::Error> {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
    };
    let current = version(conn)?;
    if current > VERSION {
        return Err(super::StoreError::TooNew {
            found: current,
            known: VERSION,
        });
    }
    if current == VERSION {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let current = version(&tx)?;
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version as i64 + 1)?;
    }
    tx.commit()?;
    Ok(())
}

/// The query plan of `sql`, one line per step, its parameters unbound: the
/// store's tests pin the plans of the statements that must not walk a table.
#[cfg(test)]
pub(super) fn query_plan(conn: &Connection, sql: &str) -> Vec<String> {
    let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
    let unbound = vec![rusqlite::types::Null; stmt.parameter_count()];
    stmt.query_map(rusqlite::params_from_iter(unbound), |r| {
        r.get::<_, String>(3)
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use super::*;

    static SECOND_WAITS: AtomicBool = AtomicBool::new(false);

    fn note_waiting(_retries: i32) -> bool {
        SECOND_WAITS.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1));
        true
    }

    /// The daemon's first start and a `runhook watch` typed at the same
    /// moment both open a fresh database: the one that waits for the other's
    /// migration must see it done, not run it a second time.
    #[test]
    fn a_migration_waits_for_one_already_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let first = Connection::open(&path).unwrap();
        first.pragma_update(None, "journal_mode", "WAL").unwrap();
        let mut second = Connection::open(&path).unwrap();
        second.busy_handler(Some(note_waiting)).unwrap();
        first.execute_batch("BEGIN IMMEDIATE").unwrap();
        let migrating = std::thread::spawn(move || migrate(&mut second));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !SECOND_WAITS.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the second never waited for the lock"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        for sql in MIGRATIONS {
            first.execute_batch(sql).unwrap();
        }
        first.pragma_update(None, "user_version", VERSION).unwrap();
        first.execute_batch("COMMIT").unwrap();
        migrating
            .join()
            .unwrap()
            .expect("the second sees the migration done");
        let version: i64 = first
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, VERSION);
    }
}
