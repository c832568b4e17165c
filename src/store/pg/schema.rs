//! The PostgreSQL schema, versioned in `schema_migrations` (one row per
//! applied step). Mirrors the SQLite schema (`store/schema.rs`) table for
//! table, so one store interface can sit over both; adds what only a cluster
//! needs: `leases` (who owns a run, under which epoch) and `replicas` (the
//! heartbeats fair share counts).

use deadpool_postgres::Pool;

use super::PgStoreError;

/// Any fixed number: the advisory lock every replica's migration takes, so
/// replicas starting together migrate once.
const MIGRATION_LOCK: i64 = 0x7275_6e68_6f6f_6b01; // "runhook" + 1

/// Migration N brings the schema from version N to N+1.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the outbox (as SQLite's 0 -> 2) and the lease tables.
    r#"
    CREATE TABLE runs (
        run_id        text PRIMARY KEY,
        labels        text NOT NULL DEFAULT '{}',   -- JSON object
        origin        text NOT NULL,                -- 'config' | 'watch'
        watched       boolean NOT NULL DEFAULT true,
        transport     text,                         -- requested: auto | sse | poll
        active_transport text,                      -- what ingest uses now
        cursor        bigint NOT NULL DEFAULT 0,    -- highest sequence recorded
        run_status    text,
        phase         text,
        state         text NOT NULL DEFAULT 'starting',
        last_error    text,
        finished_seq  bigint,                       -- lastSequence of the last run_finished
        finished_at   bigint,
        last_event_at bigint,                       -- unix ms, last event recorded
        upstream_seq  bigint,                       -- lastEventSequence from a run lookup
        updated_at    bigint NOT NULL
    );
    CREATE TABLE events (
        rowid       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- ingest order within a run
        id          text NOT NULL UNIQUE,           -- {runId}:{sequence} or {runId}:finished:{n}
        run_id      text NOT NULL,
        sequence    bigint,                         -- NULL for run_finished
        event_type  text NOT NULL,
        payload     text NOT NULL,                  -- bytes as received: text, never jsonb
        created_at  text,
        run_status  text,
        phase       text,
        seen_at     bigint NOT NULL                 -- unix ms
    );
    CREATE TABLE deliveries (
        sink            text NOT NULL,
        event           bigint NOT NULL,            -- events.rowid
        run_id          text NOT NULL,
        state           smallint NOT NULL DEFAULT 0, -- 0 pending, 1 done, 2 dead
        attempts        integer NOT NULL DEFAULT 0,
        next_attempt_at bigint NOT NULL,            -- unix ms
        queued_at       bigint NOT NULL,            -- queued or replayed; max_age counts from here
        last_status     integer,
        last_error      text,
        done_at         bigint,
        PRIMARY KEY (sink, event)
    );
    CREATE INDEX deliveries_pending ON deliveries(sink, event) WHERE state = 0;
    CREATE INDEX deliveries_pending_by_run ON deliveries(sink, run_id, event) WHERE state = 0;
    CREATE INDEX deliveries_done ON deliveries(done_at) WHERE state = 1;
    CREATE INDEX deliveries_dead ON deliveries(sink, run_id, event) WHERE state = 2;
    CREATE INDEX deliveries_by_event ON deliveries(event);
    CREATE TABLE sinks (
        name            text PRIMARY KEY,
        file_offset     bigint,                     -- file sink: bytes marked done
        last_success_at bigint,
        down            boolean NOT NULL DEFAULT false
    );
    CREATE TABLE slack_threads (
        sink    text NOT NULL,
        run_id  text NOT NULL,
        channel text NOT NULL,
        ts      text NOT NULL,                      -- the root message; replies carry it as thread_ts
        PRIMARY KEY (sink, run_id)
    );
    CREATE TABLE meta (
        key   text PRIMARY KEY,
        value bigint NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('control', 0);
    -- One row per run, made with the run. Expiry is in the server's clock
    -- (now()), never a replica's; epoch is the fencing token, raised at
    -- every claim.
    CREATE TABLE leases (
        run_id     text PRIMARY KEY REFERENCES runs (run_id) ON DELETE CASCADE,
        owner      text,
        epoch      bigint NOT NULL DEFAULT 0,
        expires_at timestamptz NOT NULL DEFAULT '-infinity'
    );
    CREATE INDEX leases_by_owner ON leases(owner);
    -- One row per live replica, renewed with its leases: fair share counts
    -- the rows younger than a lease ttl.
    CREATE TABLE replicas (
        node         text PRIMARY KEY,
        heartbeat_at timestamptz NOT NULL,
        started_at   timestamptz NOT NULL DEFAULT now()
    );
    "#,
    // 1 -> 2: tombstones of finished runs pruned from `runs` (as SQLite's
    // 2 -> 3): once the runs row, the cursor, is gone, the tombstone keeps a
    // run watched again from starting over at sequence 0. And a run's
    // events by run: `backfill` looks up the newest event of a run a sink
    // has a row for. (The id range `{run}:`..`{run};` that SQLite seeks
    // depends on the collation here, so it is not relied on.)
    r#"
    CREATE TABLE pruned_runs (
        run_id       text PRIMARY KEY,
        cursor       bigint NOT NULL,               -- highest sequence recorded
        finished_seq bigint,                        -- lastSequence of the last run_finished
        run_status   text,                          -- completed | failed | cancelled
        finished_at  bigint NOT NULL,               -- unix ms, last run_finished recorded
        pruned_at    bigint NOT NULL                -- unix ms
    );
    CREATE INDEX events_by_run ON events(run_id, rowid);
    "#,
    // 2 -> 3: sinks owned by a node rather than by runs' leases (a file
    // sink in a cluster writes one machine's disk). One lease row per such
    // sink, made by its node's first claim, fenced as `leases` fences a run
    // (`sink_lease.rs`). A sink with a row here is also what a run lease
    // does not cover: its pending deliveries keep no run claimed.
    r#"
    CREATE TABLE sink_leases (
        sink       text PRIMARY KEY,
        owner      text,
        epoch      bigint NOT NULL DEFAULT 0,
        expires_at timestamptz NOT NULL DEFAULT '-infinity'
    );
    "#,
];

pub const VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database to the current version, in one transaction holding
/// an advisory transaction lock: a replica that starts while another
/// migrates waits, then finds the work done. A database from a newer runhook
/// is refused rather than guessed at.
pub async fn migrate(pool: &Pool) -> Result<(), PgStoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let current: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::bigint FROM schema_migrations",
            &[],
        )
        .await?
        .try_get(0)?;
    if current > VERSION {
        return Err(PgStoreError::TooNew {
            found: current,
            known: VERSION,
        });
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(sql).await?;
        let applied = version as i32 + 1;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&applied],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
