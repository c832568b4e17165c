//! The single writer: one dedicated thread owns the write connection and
//! group-commits whatever jobs are queued, each in its own savepoint, and
//! replies to each job only after COMMIT.

use std::path::Path;
use std::sync::Arc;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, watch};

use super::StoreError;
use super::checkpoint::{WalKeeper, checkpoint};

/// How long a statement waits for a lock another connection holds.
pub(super) const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most jobs folded into one transaction.
const GROUP_COMMIT_MAX: usize = 1024;

pub(super) type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
pub(super) type Job = Box<dyn FnOnce(&Connection) -> Completion + Send>;

pub(super) fn in_savepoint<T>(
    conn: &Connection,
    job: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
) -> Result<T, StoreError> {
    // Cached statements: these run around every job, so parse them once.
    let run = |sql: &str| conn.prepare_cached(sql).and_then(|mut s| s.execute([]));
    run("SAVEPOINT job")?;
    match job(conn) {
        Ok(value) => {
            run("RELEASE job")?;
            Ok(value)
        }
        Err(error) => {
            run("ROLLBACK TO job")?;
            run("RELEASE job")?;
            Err(error.into())
        }
    }
}

pub(super) fn writer_loop(
    conn: Connection,
    mut queue: mpsc::Receiver<Job>,
    bump: watch::Sender<u64>,
    mut wal: WalKeeper,
) {
    while let Some(first) = queue.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < GROUP_COMMIT_MAX {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        for (done, result) in run_group(&conn, jobs) {
            done(result);
        }
        bump.send_modify(|n| *n = n.wrapping_add(1));
        wal.after_commit(&conn);
    }
    // Every handle is gone (shutdown): fold the WAL back into the database
    // file, so a backup or the next start sees one file.
    wal.stop();
    if let Err(error) = checkpoint(&conn, "TRUNCATE") {
        tracing::warn!(%error, "WAL checkpoint at shutdown failed; SQLite completes it on the next start");
    }
}

/// Runs queued jobs in one transaction and pairs each completion with the
/// commit's outcome. If the transaction cannot even begin (another process
/// holds the write lock past the busy timeout), each job runs on its own, so
/// every caller gets its real result rather than a silent drop.
fn run_group(conn: &Connection, jobs: Vec<Job>) -> Vec<(Completion, Result<(), StoreError>)> {
    if let Err(error) = conn.execute_batch("BEGIN IMMEDIATE") {
        tracing::warn!(%error, "cannot begin a group transaction; running its jobs one by one");
        // Outside a transaction each job's savepoint commits by itself. One
        // whose release (its commit) failed reported the error; its open
        // transaction must not swallow the jobs after it.
        return jobs
            .into_iter()
            .map(|job| {
                let done = job(conn);
                if !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                (done, Ok(()))
            })
            .collect();
    }
    let completions: Vec<Completion> = jobs.into_iter().map(|job| job(conn)).collect();
    crate::crashpoint::hit("store.before_commit");
    let commit = conn.execute_batch("COMMIT").map_err(StoreError::from);
    if commit.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    completions
        .into_iter()
        .map(|done| (done, commit.clone()))
        .collect()
}

/// Opens a connection with runhook's settings; the writer also creates the
/// file (mode 0600) and its directory.
pub(super) fn open_connection(path: &Path, create: bool) -> Result<Connection, StoreError> {
    if create {
        create_private_file(path)?;
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: every commit is fsync'd before the writer replies, so what a
    // sink has seen (a file line, a delivered mark, a Slack thread) cannot be
    // undone by a power loss; group commit pays the fsync once per group.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    if create {
        // The writer's page cache keeps the hot indexes in memory (16 MiB,
        // bounded); readers keep SQLite's default.
        conn.pragma_update(None, "cache_size", -16 * 1024)?;
    }
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Creates `path` (and its directory) readable by its owner only, if it does
/// not exist. SQLite gives its -wal and -shm files the same mode.
pub(super) fn create_private_file(path: &Path) -> Result<(), StoreError> {
    let io = |error: std::io::Error| StoreError::Open {
        path: path.to_owned(),
        error: Arc::new(error),
    };
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    crate::files::open_private(path, &mut options).map_err(io)?;
    Ok(())
}
