//! PostgreSQL as the shared state of several replicas (issue 14): the
//! foundation, not yet wired into the daemon.
//!
//! The same data-path operations as the SQLite store, with the same
//! guarantees (one transaction for events + deliveries + cursor; an event at
//! or below the cursor dropped), plus leases: a run is worked by the one
//! replica holding its lease, and every write for a run carries that
//! lease's epoch (the fencing token), checked inside the write's own
//! transaction, so a replica that lost its lease commits nothing for the
//! run ([`PgStoreError::LeaseLost`]). Operations take the same arguments and
//! return the same types as [`super::Store`] and [`super::Reader`] where
//! they can, plus the [`Lease`] for fenced writes, so one interface can later
//! sit over both backends.

mod access;
mod dead;
mod deliveries;
mod lease;
mod notify;
mod reads;
mod record;
mod requeue;
mod retention;
mod runs;
mod schema;
mod sink_lease;
mod sinks;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Transaction};
use tokio_postgres::NoTls;

pub(super) use access::check_access;
pub use lease::{Lease, LeaseChanges, LeaseKeeper, Share};
pub use reads::ReplicaRow;
pub use schema::VERSION as SCHEMA_VERSION;
pub use sink_lease::SinkLease;

/// Connections per store for the data path: ingest and delivery at once.
const POOL_SIZE: usize = 8;
/// Connections of the leases alone (the run lease keeper, a node's file
/// sink lease): a renewal that waited for a data connection under load
/// timed out, and the runs stopped and moved. Opened on first use, so
/// `runhook status` and the other ops commands open none.
const LEASE_POOL_SIZE: usize = 2;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PgStoreError {
    /// The URL is not one PostgreSQL understands. The URL itself is not
    /// repeated: it may hold a password.
    #[error("state url: {0}")]
    Url(String),
    #[error("PostgreSQL: {}", describe(.0))]
    Postgres(Arc<tokio_postgres::Error>),
    #[error("PostgreSQL connection pool: {0}")]
    Pool(String),
    #[error(
        "PostgreSQL schema version {found} is newer than this runhook knows ({known}); upgrade runhook"
    )]
    TooNew { found: i64, known: i64 },
    /// A read-only command found a database no runhook has migrated: most
    /// likely the wrong database, and creating the schema there from a
    /// command would hide that.
    #[error(
        "no runhook state in this database (no schema_migrations table): start `runhook run` with this state first, or check the URL"
    )]
    NoSchema,
    /// A read-only command of a newer build than the replicas that migrated
    /// the schema: reading would meet tables it does not expect, and it
    /// must not migrate under them.
    #[error(
        "PostgreSQL schema version {found} is older than this runhook knows ({known}); start `runhook run` of this version first (it migrates), or use the runhook the replicas run"
    )]
    TooOld { found: i64, known: i64 },
    /// Another replica took the run over (or this one released it): stop
    /// working the run; nothing of this write was committed.
    #[error("run {run_id}: lease epoch {epoch} is no longer held by this replica")]
    LeaseLost { run_id: Arc<str>, epoch: i64 },
    /// Another process took the node's sink over (or this one released
    /// it): stop writing the sink; nothing of this write was committed.
    #[error("sink {sink}: lease epoch {epoch} is no longer held by this process")]
    SinkLeaseLost { sink: Arc<str>, epoch: i64 },
    /// The database numbered a batch's events out of their order, which
    /// would deliver them out of order: the batch was not recorded.
    #[error("run {0}: events were numbered out of batch order; the batch was not recorded")]
    OutOfOrder(String),
    /// A batch for a run nobody subscribed to: there is no cursor to advance.
    #[error("run {0} is not subscribed")]
    UnknownRun(String),
    /// The connection that listens for other replicas' notifications.
    #[error("PostgreSQL notifications: {0}")]
    Listen(String),
}

impl From<tokio_postgres::Error> for PgStoreError {
    fn from(error: tokio_postgres::Error) -> Self {
        Self::Postgres(Arc::new(error))
    }
}

impl From<deadpool_postgres::PoolError> for PgStoreError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            deadpool_postgres::PoolError::Backend(error) => error.into(),
            other => Self::Pool(other.to_string()),
        }
    }
}

/// The error with what caused it: tokio-postgres's own text stops at "db
/// error" or "error connecting to server", which tells a user nothing to act
/// on; the server's message and SQLSTATE, or the I/O error, do.
fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            text.push_str(": ");
            text.push_str(detail);
        }
        return text;
    }
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// A replica frozen inside a write transaction (SIGSTOP, a VM paused, a
/// partition after BEGIN) keeps its row locks for as long as its TCP
/// connection lives: the run's new owner would wait on them, its lease
/// renewals behind its own waiting write, and every run of the cluster
/// would stall with it. The server ends such a session after a third of a
/// lease ttl idle inside a transaction (at least a second), rolling it back:
/// the frozen owner's write is lost, as its lease is.
fn release_a_frozen_writers_locks(config: &mut tokio_postgres::Config, lease_ttl: Duration) {
    let idle_ms = (lease_ttl / 3).max(Duration::from_secs(1)).as_millis();
    let setting = format!("-c idle_in_transaction_session_timeout={idle_ms}");
    let options = match config.get_options() {
        Some(given) if !given.is_empty() => format!("{given} {setting}"),
        _ => setting,
    };
    config.options(&options);
}

/// This replica's place in the cluster.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Unique among the replicas sharing the database (the host name).
    pub node: String,
    /// How long a lease lasts unrenewed: a dead replica's runs move after it.
    pub lease_ttl: Duration,
    /// How many runs above its fair share a replica may hold: more is less
    /// churn when replicas come and go, 0 the most even spread.
    pub share_slack: usize,
}

/// The state in PostgreSQL, as one replica sees it. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// Heartbeat, claim, renew and release, apart from `pool`, so they
    /// never queue behind data-path writes.
    lease_pool: Pool,
    replica: Arc<Replica>,
    /// `commits` and `new_work`, fed by LISTEN/NOTIFY.
    notify: Arc<notify::Notifier>,
}

impl std::fmt::Debug for PgStore {
    /// Names the node only: the pool's config would show the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("node", &self.replica.node)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects (a URL, `postgres://user@host/db`, or key=value pairs,
    /// `host=/run/postgresql dbname=runhook`) and brings the schema to this
    /// build's version. Fails when the server cannot be reached, so a
    /// misconfigured replica says so at start.
    pub async fn open(url: &str, replica: Replica) -> Result<Self, PgStoreError> {
        let store = Self::connect(url, replica)?;
        schema::migrate(&store.pool).await?;
        Ok(store)
    }

    /// Connects to a database the replicas have already migrated, changing
    /// nothing: for the commands that only read (`status`, `dead`, `tail`,
    /// `top`), which run beside replicas possibly of another version.
    /// Refuses a database without runhook's schema, or at another version.
    pub async fn open_existing(url: &str, replica: Replica) -> Result<Self, PgStoreError> {
        let store = Self::connect(url, replica)?;
        schema::check_version(&store.pool).await?;
        Ok(store)
    }

    /// The pool, not yet connected (deadpool connects on first use).
    fn connect(url: &str, replica: Replica) -> Result<Self, PgStoreError> {
        let mut config =
            tokio_postgres::Config::from_str(url).map_err(|e| PgStoreError::Url(describe(&e)))?;
        release_a_frozen_writers_locks(&mut config, replica.lease_ttl);
        let notify = Arc::new(notify::Notifier::new(config.clone()));
        let pool = self::pool(config.clone(), POOL_SIZE)?;
        let lease_pool = self::pool(config, LEASE_POOL_SIZE)?;
        Ok(Self {
            pool,
            lease_pool,
            replica: Arc::new(replica),
            notify,
        })
    }

    pub fn node(&self) -> &str {
        &self.replica.node
    }

    /// Proves the database answers and can commit: a round trip through a
    /// pooled connection, as the SQLite store's ping goes through its writer.
    pub async fn ping(&self) -> Result<(), PgStoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.query_one("SELECT 1", &[]).await?;
        tx.commit().await?;
        Ok(())
    }
}

fn pool(config: tokio_postgres::Config, size: usize) -> Result<Pool, PgStoreError> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .build()
        .map_err(|e| PgStoreError::Pool(e.to_string()))
}

/// The fencing check, inside the caller's transaction: the lease row must
/// still name this replica and this epoch. `FOR KEY SHARE` holds it until
/// the transaction ends, so a takeover, whose claim locks the row `FOR
/// UPDATE` (skipping it while locked), cannot slip in between check and
/// commit; while this replica's own renewals and releases, plain `UPDATE`s
/// of non-key columns, do not wait for its writes in flight (a busy owner
/// renewing behind its own ingest and marks would lose leases it deserves).
/// The sink fence keeps `FOR SHARE`: a sink's claim is an upsert, which
/// locks only as strongly as a plain update.
async fn fence(tx: &Transaction<'_>, node: &str, lease: &Lease) -> Result<(), PgStoreError> {
    let held = tx
        .query_opt(
            "SELECT 1 FROM leases WHERE run_id = $1 AND epoch = $2 AND owner = $3 FOR KEY SHARE",
            &[&&*lease.run_id, &lease.epoch, &node],
        )
        .await?;
    match held {
        Some(_) => Ok(()),
        None => Err(PgStoreError::LeaseLost {
            run_id: lease.run_id.clone(),
            epoch: lease.epoch,
        }),
    }
}
