//! SQLite: the only owner of the database.
//!
//! One dedicated thread holds the write connection and group-commits
//! whatever is queued (DESIGN.md: batching is the difference between 38k and
//! 330k rows/s). Each queued job runs in its own savepoint, so one failing
//! job does not undo its neighbours; replies go out only after COMMIT, so a
//! caller never acts on a write that could still be lost (`synchronous=FULL`:
//! not even to a power loss). Readers open their own connections (WAL).

mod lock;
mod read;
#[cfg(test)]
mod record_tests;
mod schema;
mod write;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use lock::DaemonLock;
pub use read::{DeadLetter, Pending, RunRow, SinkRow, WatchedRun};
pub use write::{Batch, DeadFilter, Failure, Finish, NewEvent, NewWork, Recorded};

/// Most jobs folded into one transaction.
const GROUP_COMMIT_MAX: usize = 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("state database: {0}")]
    Sqlite(Arc<rusqlite::Error>),
    #[error("state database {path}: {error}")]
    Open {
        path: PathBuf,
        error: Arc<std::io::Error>,
    },
    #[error(
        "state database schema version {found} is newer than this runhook knows ({known}); upgrade runhook"
    )]
    TooNew { found: i64, known: i64 },
    #[error(
        "state database {path} is in use by another runhook daemon (pid {holder}); one daemon per state database"
    )]
    Locked { path: PathBuf, holder: String },
    #[error("the state database writer has stopped")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        Self::Sqlite(Arc::new(error))
    }
}

type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Completion + Send>;

/// Handle to the state database: async writes through the writer thread.
/// Cheap to clone.
#[derive(Clone)]
pub struct Store {
    path: Arc<Path>,
    jobs: mpsc::Sender<Job>,
    /// Bumped after every commit, so delivery loops wake without polling.
    committed: watch::Receiver<u64>,
    /// Which runs got deliveries for which sinks.
    new_work: broadcast::Sender<NewWork>,
}

impl Store {
    /// Opens (creating, mode 0600) and migrates the database, then starts the
    /// writer thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = open_connection(path, true)?;
        schema::migrate(&mut conn)?;
        let (jobs, queue) = mpsc::channel::<Job>(4096);
        let (bump, committed) = watch::channel(0u64);
        std::thread::Builder::new()
            .name("runhook-store".into())
            .spawn(move || writer_loop(conn, queue, bump))
            .map_err(|error| StoreError::Open {
                path: path.to_owned(),
                error: Arc::new(error),
            })?;
        Ok(Self {
            path: Arc::from(path),
            jobs,
            committed,
            new_work: broadcast::channel(4096).0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new read connection.
    pub fn reader(&self) -> Result<Reader, StoreError> {
        Ok(Reader {
            conn: Arc::new(Mutex::new(open_connection(&self.path, false)?)),
        })
    }

    /// Runs that got new deliveries, as they are committed.
    pub fn new_work(&self) -> broadcast::Receiver<NewWork> {
        self.new_work.subscribe()
    }

    /// Changes after every commit.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Runs `job` inside the next group transaction; resolves after COMMIT.
    async fn write<T, F>(&self, job: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = in_savepoint(conn, job);
            Box::new(move |commit| {
                let _ = reply.send(commit.and(result));
            })
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// A read connection; queries run on the blocking pool.
#[derive(Clone)]
pub struct Reader {
    conn: Arc<Mutex<Connection>>,
}

impl Reader {
    /// A read connection beside a daemon (for `status`, `dead`, `tail`). The
    /// database must exist.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Open {
                path: path.to_owned(),
                error: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no state database here yet: has `runhook run` started with this config?",
                )),
            });
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(open_connection(path, false)?)),
        })
    }

    async fn read<T, F>(&self, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            query(&conn).map_err(StoreError::from)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }
}

fn in_savepoint<T>(
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

fn writer_loop(conn: Connection, mut queue: mpsc::Receiver<Job>, bump: watch::Sender<u64>) {
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
    }
    // Every handle is gone (shutdown): fold the WAL back into the database
    // file, so a backup or the next start sees one file.
    if let Err(error) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
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
fn open_connection(path: &Path, create: bool) -> Result<Connection, StoreError> {
    if create {
        create_private_file(path)?;
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
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
pub fn create_private_file(path: &Path) -> Result<(), StoreError> {
    let io = |error: std::io::Error| StoreError::Open {
        path: path.to_owned(),
        error: Arc::new(error),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map_err(io)?;
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DESIGN.md guarantee 7: a commit the writer replied to survives a power
    /// loss, so the writer must fsync every commit (FULL = 2), not only at
    /// checkpoints (NORMAL = 1).
    #[tokio::test]
    async fn the_writer_syncs_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let synchronous: i64 = store
            .write(|conn| conn.query_row("PRAGMA synchronous", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(synchronous, 2, "PRAGMA synchronous on the writer is FULL");
    }
}
