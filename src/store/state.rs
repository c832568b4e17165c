//! One interface over both state backends: the embedded SQLite store and the
//! shared PostgreSQL store (issue 14). Callers ask [`State`] for the
//! operations of the table in `store/mod.rs` and never name a backend, so
//! the daemon and the commands can run on either.
//!
//! The data-path writes of a run (`record_batch`, `mark_delivered`,
//! `record_failure`, `set_run_state`, `set_upstream_seq`,
//! `save_thread_root`) take a [`Fence`]: the proof that the caller owns the
//! run. On SQLite the daemon's exclusive lock on the state database is that
//! proof ([`Fence::Exclusive`]); on PostgreSQL it is the run's lease
//! ([`Fence::Lease`]), checked inside the write's transaction. A write
//! reaching PostgreSQL without a lease is refused ([`StateError::Unfenced`])
//! rather than committed unfenced. A file sink spans every run, so its loop
//! holds the sink instead ([`State::claim_sink`]): [`Fence::Sink`] on
//! PostgreSQL, the same [`Fence::Exclusive`] on SQLite.
//!
//! Claiming, renewing and releasing leases are not here: they exist only
//! where several replicas share the state, so they stay on
//! [`PgStore`]/[`super::pg::LeaseKeeper`] (reach it with
//! [`State::postgres`]). On SQLite one daemon owns every run for its whole
//! life; a claim that always succeeded would hand out epochs that fence
//! nothing and make a reader believe there was a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use super::pg::{Lease, PgStore, PgStoreError, Replica, ReplicaRow, SinkLease};
use super::{
    Backfilled, Batch, DeadFilter, DeadLetter, Failure, NewWork, Pending, PrunedRun, Reader,
    Recorded, RequeueFilter, RunRow, RunState, SinkRow, Store, StoreError, StoredEvent, Subscribed,
    TimeRange, WatchedRun,
};
use crate::config::Transport;

pub use super::retention::MAINTENANCE_CHUNK;

/// Where the state lives, as a user names it: a file path, or a PostgreSQL
/// URL. `Debug` never shows the URL: it may carry a password.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    /// A `postgres://` URL or `host=... dbname=...` pairs.
    Postgres(String),
}

impl Location {
    /// `postgres://` and `postgresql://` URLs are PostgreSQL; anything else
    /// is a SQLite file path (a path may hold `=`, so key=value pairs are
    /// only taken when built as [`Location::Postgres`] directly).
    pub fn parse(text: &str) -> Self {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Self::Postgres(text.to_owned())
        } else {
            Self::Sqlite(PathBuf::from(text))
        }
    }

    /// The SQLite file, where the state is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Self::Sqlite(path) => Some(path),
            Self::Postgres(_) => None,
        }
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Self::Postgres(_) => f.write_str("Postgres(<redacted>)"),
        }
    }
}

/// What logs and `check` show: the file, or the database without its
/// password (a URL's user, host, port and name; of key=value pairs only
/// that they are).
impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "{}", path.display()),
            Self::Postgres(url) => match reqwest::Url::parse(url) {
                Ok(mut url) => {
                    // Fails only for URLs that cannot have a password.
                    let _ = url.set_password(None);
                    url.set_query(None);
                    write!(f, "{url}")
                }
                Err(_) => f.write_str("PostgreSQL (key=value connection string)"),
            },
        }
    }
}

/// What a run's owner passes with each data-path write, so that only the
/// owner's writes land.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fence {
    /// SQLite: the daemon holds the state database's exclusive lock
    /// ([`super::DaemonLock`]) for its lifetime, so it owns every run and no
    /// other writer of the data path can exist.
    Exclusive,
    /// PostgreSQL: the run's lease, whose epoch every write checks in its
    /// own transaction.
    Lease(Lease),
    /// PostgreSQL: the lease of a sink its node writes (a file sink), for
    /// that sink's writes across every run; no run's write takes it.
    Sink(SinkLease),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Sqlite(StoreError),
    #[error(transparent)]
    Postgres(PgStoreError),
    /// Another replica took the run over (or this one released it): stop
    /// working the run; nothing of the write was committed. Lifted out of
    /// [`PgStoreError`] so callers match it without naming a backend.
    #[error("run {run_id}: lease epoch {epoch} is no longer held by this replica")]
    LeaseLost { run_id: Arc<str>, epoch: i64 },
    /// Another process took the node's sink over (or this one released it):
    /// stop writing the sink and claim it again; nothing was committed.
    #[error("sink {sink}: lease epoch {epoch} is no longer held by this process")]
    SinkLeaseLost { sink: Arc<str>, epoch: i64 },
    /// A data-path write reached the shared state without its lease (the
    /// run's, or for a file sink's writes the sink's): a bug in the caller,
    /// refused so nothing is ever written unfenced.
    #[error("{write} on the PostgreSQL state needs its lease; refused, nothing written")]
    Unfenced { write: &'static str },
    /// A lease handed to the SQLite state: it came from another store, so
    /// the caller is confused about which state it works on.
    #[error(
        "{write} on the SQLite state is fenced by the daemon lock, not by a lease; refused, nothing written"
    )]
    LeaseOnSqlite { write: &'static str },
}

impl StateError {
    /// The write was refused for its fence, not for the database: trying
    /// it again can only be refused again.
    pub fn fence_refused(&self) -> bool {
        matches!(
            self,
            Self::LeaseLost { .. }
                | Self::SinkLeaseLost { .. }
                | Self::Unfenced { .. }
                | Self::LeaseOnSqlite { .. }
        )
    }
}

impl From<StoreError> for StateError {
    fn from(error: StoreError) -> Self {
        Self::Sqlite(error)
    }
}

impl From<PgStoreError> for StateError {
    fn from(error: PgStoreError) -> Self {
        match error {
            PgStoreError::LeaseLost { run_id, epoch } => Self::LeaseLost { run_id, epoch },
            PgStoreError::SinkLeaseLost { sink, epoch } => Self::SinkLeaseLost { sink, epoch },
            other => Self::Postgres(other),
        }
    }
}

/// The SQLite backend: the writer thread's handle and one read connection.
#[derive(Clone)]
pub struct Sqlite {
    pub store: Store,
    pub reader: Reader,
}

/// The state, on whichever backend the location named. Cheap to clone.
///
/// An enum rather than a trait object: the backends are two and known, so a
/// `match` per call costs nothing (no box per returned future, no vtable),
/// the async methods stay plain `async fn` (`backfill` keeps its generic
/// routing closure, which a `dyn` trait could not take), and a caller that
/// truly needs one backend (the lease keeper) gets it by name.
#[derive(Clone)]
pub enum State {
    Sqlite(Sqlite),
    Postgres(PgStore),
}

/// Delegates a method with the same arguments on both backends.
macro_rules! both {
    ($self:ident.$method:ident($($arg:expr),*)) => {
        match $self {
            State::Sqlite(sqlite) => Ok(sqlite.store.$method($($arg),*).await?),
            State::Postgres(pg) => Ok(pg.$method($($arg),*).await?),
        }
    };
}

/// Delegates a read: the SQLite reader, or the PostgreSQL store.
macro_rules! read {
    ($self:ident.$method:ident($($arg:expr),*)) => {
        match $self {
            State::Sqlite(sqlite) => Ok(sqlite.reader.$method($($arg),*).await?),
            State::Postgres(pg) => Ok(pg.$method($($arg),*).await?),
        }
    };
}

impl State {
    /// Opens the state at `location`, creating and migrating it. `replica`
    /// is this process's place in a cluster; the SQLite backend has no
    /// cluster and ignores it. The daemon lock is not taken here: the daemon
    /// takes it ([`super::DaemonLock`]) before it writes as the owner, and
    /// commands open the state beside a daemon.
    pub async fn open(location: &Location, replica: Replica) -> Result<Self, StateError> {
        match location {
            Location::Sqlite(path) => Ok(Self::Sqlite(open_sqlite(path.clone()).await?)),
            Location::Postgres(url) => Ok(Self::Postgres(PgStore::open(url, replica).await?)),
        }
    }

    /// The PostgreSQL store, for what only a cluster has (leases, the
    /// replicas' heartbeats).
    pub fn postgres(&self) -> Option<&PgStore> {
        match self {
            Self::Postgres(pg) => Some(pg),
            Self::Sqlite(_) => None,
        }
    }

    /// The same state with a read connection of its own (SQLite), for a
    /// task that reads often (a delivery loop, the metrics, the runs
    /// supervisor): SQLite's reader serialises its queries on one
    /// connection, so tasks sharing one would wait on each other. The
    /// PostgreSQL pool already gives each query a connection.
    pub fn with_own_reader(&self) -> Result<Self, StateError> {
        match self {
            Self::Sqlite(sqlite) => Ok(Self::Sqlite(Sqlite {
                store: sqlite.store.clone(),
                reader: sqlite.store.reader()?,
            })),
            Self::Postgres(pg) => Ok(Self::Postgres(pg.clone())),
        }
    }

    /// The read side alone, sharing this state's connections.
    pub fn reads(&self) -> Reads {
        match self {
            Self::Sqlite(sqlite) => Reads::Sqlite(sqlite.reader.clone()),
            Self::Postgres(pg) => Reads::Postgres(pg.clone()),
        }
    }

    /// "sqlite" or "postgres", for logs and `status`.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// Runs that got new deliveries, as they are committed (on PostgreSQL:
    /// by any replica).
    pub fn new_work(&self) -> broadcast::Receiver<NewWork> {
        match self {
            Self::Sqlite(sqlite) => sqlite.store.new_work(),
            Self::Postgres(pg) => pg.new_work(),
        }
    }

    /// Changes after commits: every one on SQLite; on PostgreSQL those that
    /// queued deliveries, and each time the listener (re)starts.
    pub fn commits(&self) -> watch::Receiver<u64> {
        match self {
            Self::Sqlite(sqlite) => sqlite.store.commits(),
            Self::Postgres(pg) => pg.commits(),
        }
    }

    /// Proves the state can commit (SQLite: through the writer thread).
    pub async fn ping(&self) -> Result<(), StateError> {
        both!(self.ping())
    }
}

/// Migrations and the writer thread's start block: off the async threads.
async fn open_sqlite(path: PathBuf) -> Result<Sqlite, StoreError> {
    tokio::task::spawn_blocking(move || Sqlite::open_path(&path))
        .await
        .map_err(|_| StoreError::Closed)?
}

/// The data-path writes: fenced by the run's owner.
impl State {
    /// README.md, guarantee 1: events above the cursor, their deliveries and
    /// the new cursor, in one transaction.
    pub async fn record_batch(&self, fence: &Fence, batch: Batch) -> Result<Recorded, StateError> {
        match self {
            Self::Sqlite(sqlite) => {
                exclusive(fence, "record_batch")?;
                Ok(sqlite.store.record_batch(batch).await?)
            }
            Self::Postgres(pg) => {
                let lease = lease_on(fence, &batch.run_id, "record_batch")?;
                Ok(pg.record_batch(lease, batch).await?)
            }
        }
    }

    /// Deliveries that reached their sink, with the sink's output offset.
    /// On PostgreSQL a run's lease marks only that run's deliveries among
    /// `events`; a sink's lease ([`Fence::Sink`]) marks its sink's, of any
    /// run.
    pub async fn mark_delivered(
        &self,
        fence: &Fence,
        sink: Arc<str>,
        events: Vec<i64>,
        offset: Option<u64>,
    ) -> Result<(), StateError> {
        match self {
            Self::Sqlite(sqlite) => {
                exclusive(fence, "mark_delivered")?;
                Ok(sqlite.store.mark_delivered(sink, events, offset).await?)
            }
            Self::Postgres(pg) => match fence {
                Fence::Sink(held) => {
                    let held = sink_lease_on(held, &sink)?;
                    Ok(pg.mark_sink_delivered(held, events, offset).await?)
                }
                _ => {
                    let lease = any_lease(fence, "mark_delivered")?;
                    Ok(pg.mark_delivered(lease, sink, events, offset).await?)
                }
            },
        }
    }

    /// A failed attempt: counted and scheduled, or dead-lettered. On
    /// PostgreSQL, only the lease's run's deliveries among the events (a
    /// sink's lease: its sink's, of any run).
    pub async fn record_failure(
        &self,
        fence: &Fence,
        sink: Arc<str>,
        failure: Failure,
    ) -> Result<(), StateError> {
        match self {
            Self::Sqlite(sqlite) => {
                exclusive(fence, "record_failure")?;
                Ok(sqlite.store.record_failure(sink, failure).await?)
            }
            Self::Postgres(pg) => match fence {
                Fence::Sink(held) => {
                    let held = sink_lease_on(held, &sink)?;
                    Ok(pg.record_sink_failure(held, failure).await?)
                }
                _ => {
                    let lease = any_lease(fence, "record_failure")?;
                    Ok(pg.record_failure(lease, sink, failure).await?)
                }
            },
        }
    }

    /// What ingest is doing with the run, for `status`.
    pub async fn set_run_state(
        &self,
        fence: &Fence,
        run_id: String,
        state: RunState,
        last_error: Option<String>,
        active_transport: Option<Transport>,
    ) -> Result<(), StateError> {
        match self {
            Self::Sqlite(sqlite) => {
                exclusive(fence, "set_run_state")?;
                Ok(sqlite
                    .store
                    .set_run_state(run_id, state, last_error, active_transport)
                    .await?)
            }
            Self::Postgres(pg) => {
                let lease = lease_on(fence, &run_id, "set_run_state")?;
                Ok(pg
                    .set_run_state(lease, state, last_error, active_transport)
                    .await?)
            }
        }
    }

    /// How far upstream the run is, for the lag in `status`.
    pub async fn set_upstream_seq(
        &self,
        fence: &Fence,
        run_id: String,
        last_event_sequence: i64,
    ) -> Result<(), StateError> {
        match self {
            Self::Sqlite(sqlite) => {
                exclusive(fence, "set_upstream_seq")?;
                Ok(sqlite
                    .store
                    .set_upstream_seq(run_id, last_event_sequence)
                    .await?)
            }
            Self::Postgres(pg) => {
                let lease = lease_on(fence, &run_id, "set_upstream_seq")?;
                Ok(pg.set_upstream_seq(lease, last_event_sequence).await?)
            }
        }
    }

    /// The message a sink threads the run's events under (a Slack root).
    pub async fn save_thread_root(
        &self,
        fence: &Fence,
        sink: Arc<str>,
        run_id: String,
        channel: String,
        ts: String,
    ) -> Result<(), StateError> {
        match self {
            Self::Sqlite(sqlite) => {
                exclusive(fence, "save_thread_root")?;
                Ok(sqlite
                    .store
                    .save_thread_root(sink, run_id, channel, ts)
                    .await?)
            }
            Self::Postgres(pg) => {
                let lease = lease_on(fence, &run_id, "save_thread_root")?;
                Ok(pg
                    .save_thread_root(lease, sink, run_id, channel, ts)
                    .await?)
            }
        }
    }
}

/// The SQLite fence: the daemon lock, never a lease.
fn exclusive(fence: &Fence, write: &'static str) -> Result<(), StateError> {
    match fence {
        Fence::Exclusive => Ok(()),
        Fence::Lease(_) | Fence::Sink(_) => Err(StateError::LeaseOnSqlite { write }),
    }
}

/// The PostgreSQL fence of a run's write: a lease, whichever run it is on
/// (the store keeps the write to that run). A sink's lease fences no run.
fn any_lease<'a>(fence: &'a Fence, write: &'static str) -> Result<&'a Lease, StateError> {
    match fence {
        Fence::Lease(lease) => Ok(lease),
        Fence::Exclusive | Fence::Sink(_) => Err(StateError::Unfenced { write }),
    }
}

/// A sink's lease fences that sink's writes only: on another sink it fences
/// nothing, as if lost.
fn sink_lease_on<'a>(held: &'a SinkLease, sink: &str) -> Result<&'a SinkLease, StateError> {
    if *held.sink != *sink {
        return Err(StateError::SinkLeaseLost {
            sink: Arc::from(sink),
            epoch: held.epoch,
        });
    }
    Ok(held)
}

/// The PostgreSQL fence for a write naming `run_id`: a lease on another run
/// fences nothing here, as if lost.
fn lease_on<'a>(
    fence: &'a Fence,
    run_id: &str,
    write: &'static str,
) -> Result<&'a Lease, StateError> {
    let lease = any_lease(fence, write)?;
    if *lease.run_id != *run_id {
        return Err(StateError::LeaseLost {
            run_id: Arc::from(run_id),
            epoch: lease.epoch,
        });
    }
    Ok(lease)
}

/// A sink one node writes (a file sink): its writes span every run, so its
/// loop holds the sink rather than runs, and fences them with what
/// [`State::claim_sink`] gave it.
impl State {
    /// Whether a sink that names `node` is written by this process. SQLite
    /// is one machine: every sink is, whatever it names. On PostgreSQL only
    /// the replica whose node it names (a sink naming none runs nowhere:
    /// `check` refuses it there).
    pub fn writes_sink_of(&self, node: Option<&str>) -> bool {
        match self {
            Self::Sqlite(_) => true,
            Self::Postgres(pg) => node == Some(pg.node()),
        }
    }

    /// The fence of a node's sink: on SQLite the daemon lock
    /// ([`Fence::Exclusive`], as for every write); on PostgreSQL the sink's
    /// lease for this node, `None` while another process holds it.
    pub async fn claim_sink(&self, sink: &str) -> Result<Option<Fence>, StateError> {
        match self {
            Self::Sqlite(_) => Ok(Some(Fence::Exclusive)),
            Self::Postgres(pg) => Ok(pg.claim_sink(sink).await?.map(Fence::Sink)),
        }
    }

    /// How long a sink's lease lasts unrenewed: renew it every third of
    /// that. `None` on SQLite, whose fence lasts the daemon's life.
    pub fn sink_lease_ttl(&self) -> Option<Duration> {
        match self {
            Self::Sqlite(_) => None,
            Self::Postgres(pg) => Some(pg.lease_ttl()),
        }
    }

    /// Renews what [`State::claim_sink`] gave; `false` when it was lost.
    pub async fn renew_sink(&self, fence: &Fence) -> Result<bool, StateError> {
        match (self, fence) {
            (Self::Sqlite(_), _) => {
                exclusive(fence, "renew_sink")?;
                Ok(true)
            }
            (Self::Postgres(pg), Fence::Sink(held)) => Ok(pg.renew_sink(held).await?),
            (Self::Postgres(_), _) => Err(StateError::Unfenced {
                write: "renew_sink",
            }),
        }
    }

    /// Gives the sink up at a clean stop, so the node's next process claims
    /// it at once. Nothing to give up on SQLite.
    pub async fn release_sink(&self, fence: &Fence) -> Result<(), StateError> {
        match (self, fence) {
            (Self::Postgres(pg), Fence::Sink(held)) => Ok(pg.release_sink(held).await?),
            _ => Ok(()),
        }
    }

    /// A file sink's reconciliation at start: lines found in the file past
    /// its offset are delivered. Fenced by the sink, as its other writes:
    /// a process refused a `mark_delivered` must not mark the same lines by
    /// reconciling.
    pub async fn mark_found_delivered(
        &self,
        fence: &Fence,
        sink: Arc<str>,
        found: Vec<String>,
        offset: u64,
    ) -> Result<usize, StateError> {
        match self {
            Self::Sqlite(sqlite) => {
                exclusive(fence, "mark_found_delivered")?;
                Ok(sqlite
                    .store
                    .mark_found_delivered(sink, found, offset)
                    .await?)
            }
            Self::Postgres(pg) => match fence {
                Fence::Sink(held) => {
                    let held = sink_lease_on(held, &sink)?;
                    Ok(pg.mark_found_delivered(held, found, offset).await?)
                }
                _ => Err(StateError::Unfenced {
                    write: "mark_found_delivered",
                }),
            },
        }
    }
}

/// Subscriptions, sink state, dead letters and maintenance: not a run
/// owner's writes, so not fenced (commands run them from any machine).
impl State {
    pub async fn subscribe(
        &self,
        run_id: String,
        labels: BTreeMap<String, String>,
        origin: &'static str,
        transport: Option<Transport>,
    ) -> Result<Subscribed, StateError> {
        both!(self.subscribe(run_id, labels, origin, transport))
    }

    pub async fn unsubscribe(&self, run_id: String) -> Result<bool, StateError> {
        both!(self.unsubscribe(run_id))
    }

    pub async fn unsubscribe_config_runs_except(
        &self,
        keep: Vec<String>,
    ) -> Result<(), StateError> {
        both!(self.unsubscribe_config_runs_except(keep))
    }

    pub async fn retry_stopped_runs(&self) -> Result<usize, StateError> {
        both!(self.retry_stopped_runs())
    }

    /// A sink answered again: its backlog is due now. Sink-wide, not a run's
    /// write: it only makes deliveries due sooner, never changes an outcome.
    pub async fn release_backoff(&self, sink: Arc<str>) -> Result<usize, StateError> {
        both!(self.release_backoff(sink))
    }

    pub async fn set_sink_down(&self, sink: Arc<str>, down: bool) -> Result<(), StateError> {
        both!(self.set_sink_down(sink, down))
    }

    pub async fn replay(&self, filter: DeadFilter) -> Result<usize, StateError> {
        both!(self.replay(filter))
    }

    pub async fn purge_dead(&self, filter: DeadFilter) -> Result<usize, StateError> {
        both!(self.purge_dead(filter))
    }

    pub async fn requeue_range(&self, filter: RequeueFilter) -> Result<usize, StateError> {
        both!(self.requeue_range(filter))
    }

    pub async fn backfill<F>(
        &self,
        sink: Arc<str>,
        range: TimeRange,
        run: Option<String>,
        routed: F,
    ) -> Result<Backfilled, StateError>
    where
        F: Fn(&StoredEvent) -> bool + Send + Sync + 'static,
    {
        both!(self.backfill(sink, range, run, routed))
    }

    pub async fn prune(&self, cutoff: i64) -> Result<(usize, usize), StateError> {
        both!(self.prune(cutoff))
    }

    pub async fn prune_finished_runs(&self, cutoff: i64) -> Result<usize, StateError> {
        both!(self.prune_finished_runs(cutoff))
    }
}

/// The read side alone: what `status`, `dead`, `tail`, `top` and the demo
/// need beside a running daemon. On SQLite it opens only a read
/// connection, as those commands always have: it creates no database (a
/// missing one is an error that says so), migrates nothing under a running
/// daemon and starts no writer. Cheap to clone.
#[derive(Clone)]
pub enum Reads {
    Sqlite(Reader),
    Postgres(PgStore),
}

/// Delegates a read to whichever backend.
macro_rules! reads {
    ($self:ident.$method:ident($($arg:expr),*)) => {
        match $self {
            Reads::Sqlite(reader) => Ok(reader.$method($($arg),*).await?),
            Reads::Postgres(pg) => Ok(pg.$method($($arg),*).await?),
        }
    };
}

impl Reads {
    /// Opens the read side of an existing state, changing nothing: a
    /// missing SQLite file is an error, and so is a PostgreSQL database
    /// without runhook's schema or at another version (a read command beside
    /// replicas of another build must not migrate theirs). `replica` as in
    /// [`State::open`].
    pub async fn open(location: &Location, replica: Replica) -> Result<Self, StateError> {
        match location {
            Location::Sqlite(path) => Ok(Self::Sqlite(Reader::open(path)?)),
            Location::Postgres(url) => {
                Ok(Self::Postgres(PgStore::open_existing(url, replica).await?))
            }
        }
    }
}

/// The reads of committed rows that [`State`] and [`Reads`] both offer,
/// written once: each line becomes a method of both, handing the call to
/// the backend's reader (SQLite's read connection, or the PostgreSQL pool).
macro_rules! read_methods {
    ($(fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        /// Reads: committed rows only, on either backend.
        impl State {
            $(pub async fn $name(&self, $($arg: $ty),*) -> Result<$ret, StateError> {
                read!(self.$name($($arg),*))
            })*
        }

        impl Reads {
            $(pub async fn $name(&self, $($arg: $ty),*) -> Result<$ret, StateError> {
                reads!(self.$name($($arg),*))
            })*
        }
    };
}

read_methods! {
    fn last_event_row() -> i64;
    fn events_after(
        after: i64,
        run: Option<String>,
        event_type: Option<String>,
        limit: usize
    ) -> Vec<Pending>;
    fn watched_runs() -> Vec<WatchedRun>;
    fn runs() -> Vec<RunRow>;
    fn pruned_run(run_id: String) -> Option<PrunedRun>;
    fn pruned_count() -> i64;
    fn control_generation() -> i64;
    fn pending_in_order(sink: &str, limit: usize) -> Vec<Pending>;
    fn pending_for_run(sink: &str, run_id: &str, limit: usize) -> Vec<Pending>;
    fn runs_with_pending(sink: &str) -> Vec<String>;
    fn pending_count(sink: &str) -> i64;
    fn pending_total() -> i64;
    fn dead_letters(sink: Option<String>, run: Option<String>) -> Vec<DeadLetter>;
    fn sinks() -> Vec<SinkRow>;
    fn oldest_pending(sinks: Vec<String>) -> Vec<(String, i64)>;
    fn sink_offset(sink: &str) -> Option<u64>;
    fn thread_root(sink: &str, run_id: &str) -> Option<(String, String)>;
}

/// Where `tail` is in the events, between two reads
/// ([`Reads::tail_next`]). On SQLite (one writer, rows numbered in commit
/// order) the last row handed out; on PostgreSQL rows may commit out of
/// number order, so it also remembers what it handed out above the point
/// it is sure of, and which transactions it waits for.
#[derive(Debug, Clone, Default)]
pub struct TailCursor {
    /// Every row at or below this was handed out, or never will be.
    pub(in crate::store) after: i64,
    /// Rows above `after` already handed out: left out when read again.
    pub(in crate::store) handed: BTreeSet<i64>,
    /// The transactions in flight at an earlier read, and the row that
    /// read had seen everything up to: once they have all ended, nothing
    /// more can commit at or below it.
    pub(in crate::store) waiting: Option<(BTreeSet<String>, i64)>,
}

impl TailCursor {
    /// After row `after`, waiting for nothing yet.
    pub(in crate::store) fn at(after: i64) -> Self {
        Self {
            after,
            ..Self::default()
        }
    }

    /// Takes in one read's rows (all of those visible up to `read_to`) and
    /// the transactions in flight when it was taken.
    pub(in crate::store) fn advance(
        &mut self,
        events: &[Pending],
        read_to: i64,
        in_flight: BTreeSet<String>,
    ) {
        self.handed.extend(events.iter().map(|e| e.event));
        let settled = match &self.waiting {
            // Ended: not in flight any more (and they were before).
            Some((waited, upto)) if waited.is_disjoint(&in_flight) => Some(*upto),
            Some(_) => None,
            None => Some(self.after),
        };
        if in_flight.is_empty() {
            // Nobody can still commit a row numbered before this read.
            self.after = self.after.max(read_to);
            self.waiting = None;
        } else if let Some(upto) = settled {
            // Rows up to `upto` can no longer change, but a read its limit
            // cut short handed out only those up to `read_to`: the rest are
            // read next time, and the ended wait settles again until then.
            self.after = self.after.max(upto.min(read_to));
            if read_to >= upto {
                self.waiting = Some((in_flight, read_to));
            }
        }
        let after = self.after;
        self.handed.retain(|&row| row > after);
    }
}

impl Reads {
    /// "sqlite" or "postgres", as [`State::backend`].
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// The replicas sharing the state and their heartbeats: `None` on
    /// SQLite, where one daemon is the only one and there is nothing to
    /// show.
    pub async fn replicas(&self) -> Result<Option<Vec<ReplicaRow>>, StateError> {
        match self {
            Self::Sqlite(_) => Ok(None),
            Self::Postgres(pg) => Ok(Some(pg.replicas().await?)),
        }
    }

    /// Where `tail` starts: after the newest committed event.
    pub async fn tail_start(&self) -> Result<TailCursor, StateError> {
        match self {
            Reads::Sqlite(reader) => Ok(TailCursor::at(reader.last_event_row().await?)),
            Reads::Postgres(pg) => Ok(pg.tail_start().await?),
        }
    }

    /// The events recorded since the last call (optionally of one run or
    /// type), in row order, each once, none passed over.
    pub async fn tail_next(
        &self,
        cursor: &mut TailCursor,
        run: Option<String>,
        event_type: Option<String>,
        limit: usize,
    ) -> Result<Vec<Pending>, StateError> {
        match self {
            Reads::Sqlite(reader) => {
                // One writer: rows become visible in number order.
                let events = reader
                    .events_after(cursor.after, run, event_type, limit)
                    .await?;
                if let Some(last) = events.last() {
                    cursor.after = cursor.after.max(last.event);
                }
                Ok(events)
            }
            Reads::Postgres(pg) => Ok(pg.tail_next(cursor, run, event_type, limit).await?),
        }
    }
}

impl Replica {
    /// A process that opens the state without being one of the cluster's
    /// replicas (a command beside the daemon, the demo): it claims no lease
    /// and sends no heartbeat. SQLite ignores the replica; PostgreSQL opens
    /// with this name.
    pub fn bystander() -> Self {
        Self {
            node: "runhook-command".into(),
            lease_ttl: std::time::Duration::from_secs(15),
            share_slack: 0,
        }
    }
}

impl Sqlite {
    /// Opens (creating and migrating) the database file at `path`.
    pub fn open_path(path: &Path) -> Result<Self, StoreError> {
        let store = Store::open(path)?;
        let reader = store.reader()?;
        Ok(Self { store, reader })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--state` takes either, so the scheme alone decides: a file named
    /// like a URL's tail stays a file.
    #[test]
    fn a_postgres_url_names_postgres_and_anything_else_a_file() {
        let url = "postgres://runhook:secret@db.internal:5432/runhook";
        assert_eq!(Location::parse(url), Location::Postgres(url.into()));
        let long = "postgresql://db/runhook";
        assert_eq!(Location::parse(long), Location::Postgres(long.into()));
        for path in ["/var/lib/runhook/runhook.db", "state.db", "postgres.db"] {
            assert_eq!(Location::parse(path), Location::Sqlite(path.into()));
        }
    }

    /// A URL may carry a password: logging a location must not leak it.
    #[test]
    fn a_postgres_location_never_shows_its_url_in_debug() {
        let location = Location::parse("postgres://runhook:secret@db/runhook");
        let shown = format!("{location:?}");
        assert!(
            !shown.contains("secret") && !shown.contains("db"),
            "{shown}"
        );
    }

    /// Users and tests read the SQLite errors' words (`status` on a missing
    /// database, a daemon already running, a newer schema): going through
    /// `State` must not change a word of them, nor of their causes.
    #[test]
    fn a_sqlite_error_reads_as_it_did_before_state() {
        let errors = [
            StoreError::Open {
                path: "/var/lib/runhook/runhook.db".into(),
                error: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no state database here yet: has `runhook run` started with this config?",
                )),
            },
            StoreError::TooNew { found: 9, known: 8 },
            StoreError::Locked {
                path: "runhook.db".into(),
                holder: "4242".into(),
            },
            StoreError::Closed,
            StoreError::from(rusqlite::Error::InvalidQuery),
        ];
        for error in errors {
            let before = anyhow::Error::new(error.clone());
            let after = anyhow::Error::new(StateError::from(error));
            assert_eq!(format!("{after}"), format!("{before}"));
            assert_eq!(format!("{after:#}"), format!("{before:#}"));
        }
    }

    /// The daemon's reading tasks each had a read connection of their own;
    /// sharing one would make a scrape wait on a delivery loop's reads.
    #[test]
    fn with_own_reader_opens_a_connection_a_clone_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::Sqlite(Sqlite::open_path(&dir.path().join("state.db")).unwrap());
        let conn = |state: &State| match state {
            State::Sqlite(sqlite) => sqlite.reader.conn.clone(),
            State::Postgres(_) => unreachable!("a SQLite state"),
        };
        assert!(Arc::ptr_eq(&conn(&state), &conn(&state.clone())));
        let own = state.with_own_reader().unwrap();
        assert!(!Arc::ptr_eq(&conn(&state), &conn(&own)));
    }

    fn rows(rows: &[i64]) -> Vec<Pending> {
        rows.iter().map(|&event| Pending::sample(event)).collect()
    }

    fn xids(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|id| id.to_string()).collect()
    }

    /// Row 11's transaction is still in flight when 10 and 12 are read:
    /// the cursor stays below 11 until that transaction has ended, then
    /// moves past everything the read had seen; with nobody in flight it
    /// moves at once.
    #[test]
    fn the_tail_cursor_moves_only_past_rows_no_transaction_in_flight_can_fill() {
        let mut cursor = TailCursor::at(9);
        cursor.advance(&rows(&[10, 12]), 12, xids(&["701"]));
        assert_eq!(cursor.after, 9, "701 may still commit row 11");
        assert_eq!(cursor.handed, [10, 12].into());
        cursor.advance(&[], 12, xids(&["701", "702"]));
        assert_eq!(cursor.after, 9, "701 has not ended");
        cursor.advance(&rows(&[11]), 13, xids(&["702"]));
        assert_eq!(cursor.after, 12, "what the first read saw is settled");
        assert_eq!(cursor.handed, BTreeSet::new());
        cursor.advance(&rows(&[13]), 13, BTreeSet::new());
        assert_eq!(cursor.after, 13, "nobody in flight");
        assert!(cursor.waiting.is_none());
    }

    /// The transaction that drew rows 1..=5 has ended, but the read that
    /// finds it so is cut short by its limit at row 2: the cursor settles
    /// at 2, not at the 8 the earlier read had seen, and goes on settling
    /// as later reads return rows 3..=5.
    #[test]
    fn a_read_cut_short_by_its_limit_settles_only_as_far_as_it_read() {
        let mut cursor = TailCursor::at(0);
        cursor.advance(&rows(&[6, 7, 8]), 8, xids(&["701"]));
        assert_eq!(cursor.after, 0, "701 may still commit rows 1..=5");
        cursor.advance(&rows(&[1, 2]), 2, xids(&["702"]));
        assert_eq!(cursor.after, 2, "only what this read returned");
        cursor.advance(&rows(&[3, 4]), 4, xids(&["702"]));
        assert_eq!(cursor.after, 4);
        cursor.advance(&rows(&[5]), 8, xids(&["702"]));
        assert_eq!(cursor.after, 8, "everything the first read saw");
        assert_eq!(cursor.handed, BTreeSet::new());
    }

    /// The variant an owner matches to stop a run must not hide inside the
    /// backend's error.
    #[test]
    fn lease_lost_is_lifted_out_of_the_postgres_error() {
        let lost = PgStoreError::LeaseLost {
            run_id: Arc::from("r"),
            epoch: 3,
        };
        assert!(matches!(
            StateError::from(lost),
            StateError::LeaseLost { epoch: 3, .. }
        ));
    }
}
