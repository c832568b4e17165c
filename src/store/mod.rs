//! SQLite: the only owner of the database.
//!
//! One dedicated thread holds the write connection and group-commits
//! whatever is queued (batching is the difference between 38k and
//! 330k rows/s). Each queued job runs in its own savepoint, so one failing
//! job does not undo its neighbours; replies go out only after COMMIT, so a
//! caller never acts on a write that could still be lost (`synchronous=FULL`:
//! not even to a power loss). Readers open their own connections (WAL).
//!
//! # Operations
//!
//! What the rest of runhook asks of its state, and so what a second backend
//! (PostgreSQL) has to provide with the same guarantees. Writes
//! are [`Store`] methods, each one transaction (or, for maintenance, one per
//! chunk); reads are [`Reader`] methods and see only committed rows.
//!
//! | concern | writes | reads |
//! |---|---|---|
//! | recording (`record.rs`) | `record_batch`: events above the cursor, their deliveries and the new cursor, atomically | `last_event_row`, `events_after` (`tail`) |
//! | runs (`runs.rs`) | `subscribe` (a pruned run's tombstone wins: it stays pruned), `unsubscribe`, `unsubscribe_config_runs_except`, `retry_stopped_runs`, `set_run_state`, `set_upstream_seq` | `watched_runs`, `runs` (`status`), `pruned_run`, `pruned_count` (`status`), `control_generation` (bumped by `subscribe`, `unsubscribe`, `replay`, `requeue_range`, `backfill`, `prune_finished_runs`) |
//! | deliveries (`deliveries.rs`) | `mark_delivered` (with the sink's offset), `record_failure` (retry or dead), `release_backoff` | `pending_in_order`, `pending_for_run`, `runs_with_pending`, `pending_count`, `pending_total` |
//! | dead letters (`dead.rs`) | `replay` (same ids), `purge_dead` | `dead_letters` |
//! | by time (`requeue.rs`) | `requeue_range` (dead, or also delivered, deliveries of events recorded in a range: same ids), `backfill` (a sink's missing deliveries where a given routing says so) | |
//! | retention (`retention.rs`) | `prune` (delivered deliveries, then unreferenced events), `prune_finished_runs` (finished runs none of whose events is left, so no pending delivery or dead letter: row to tombstone, atomically) | |
//! | sink state (`sinks.rs`) | `set_sink_down`, `save_thread_root`, `mark_found_delivered` | `sinks` (`status`), `oldest_pending` (metrics, `status`, `top`), `sink_offset`, `thread_root` |
//! | liveness | `ping` (the writer commits) | |
//!
//! Notifications rather than data: [`Store::commits`] changes after every
//! commit and [`Store::new_work`] names the runs that got deliveries, so
//! delivery loops wake without polling (LISTEN/NOTIFY in PostgreSQL).
//! States cross this boundary as [`RunState`] and [`DeliveryState`]; their
//! one SQL mapping is `states.rs`.

#[macro_use]
mod states;
mod access;
mod checkpoint;
mod dead;
mod deliveries;
mod lock;
pub mod pg;
mod record;
#[cfg(test)]
mod record_tests;
mod requeue;
mod retention;
mod runs;
mod schema;
mod sinks;
mod state;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use access::{Access, AccessError, check_access};
pub use dead::{DeadFilter, DeadLetter};
pub use deliveries::{Failure, Pending};
pub use lock::DaemonLock;
pub use record::{Batch, Finish, NewEvent, NewWork, Recorded};
pub use requeue::{Backfilled, RequeueFilter, StoredEvent, TimeRange};
pub use runs::{PrunedRun, RunOwner, RunRow, Subscribed, WatchedRun};
pub use sinks::SinkRow;
pub use state::{Fence, Location, MAINTENANCE_CHUNK, Reads, Sqlite, State, StateError, TailCursor};
pub use states::{DeliveryState, RunState};

use checkpoint::{WalBounds, WalKeeper};
use writer::{Job, in_savepoint, open_connection, writer_loop};

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
        Self::open_with(path, WalBounds::default())
    }

    fn open_with(path: &Path, wal: WalBounds) -> Result<Self, StoreError> {
        let mut conn = open_connection(path, true)?;
        schema::migrate(&mut conn)?;
        let wal = WalKeeper::attach(&mut conn, path, wal)?;
        let (jobs, queue) = mpsc::channel::<Job>(4096);
        let (bump, committed) = watch::channel(0u64);
        std::thread::Builder::new()
            .name("runhook-store".into())
            .spawn(move || writer_loop(conn, queue, bump, wal))
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

    /// A no-op through the writer: proves it is alive and can commit.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.write(|conn| conn.query_row("SELECT 1", [], |_| Ok(())))
            .await
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

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// README.md, guarantee 7: a commit the writer replied to survives a power
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
