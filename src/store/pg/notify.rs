//! Notifications on PostgreSQL: [`PgStore::commits`] and
//! [`PgStore::new_work`], the same channels the SQLite store feeds, fed here
//! by LISTEN/NOTIFY so a delivery loop on any replica wakes when any replica
//! commits work, without polling.
//!
//! A write that queues deliveries sends its NOTIFY inside its own
//! transaction ([`notify_work`]): PostgreSQL delivers it only on commit, so a
//! rolled-back batch wakes nobody, and a notice never names rows a reader
//! cannot see yet. One dedicated connection per store listens (started the
//! first time someone asks for a channel, so a command that only reads opens
//! none). Notifications sent while it was not listening are lost, so every
//! time it starts listening (the first time, and after a reconnect) it names
//! every run with pending deliveries and bumps [`PgStore::commits`]: nobody
//! waits on work that was committed while the connection was down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Transaction;
use futures::StreamExt;
use tokio::sync::{Notify, broadcast, watch};
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

use super::super::{DeliveryState, NewWork};
use super::{PgStore, PgStoreError};

/// The channel every notice goes on.
const CHANNEL: &str = "runhook_work";
/// How the listening connection shows in `pg_stat_activity`.
const APPLICATION_NAME: &str = "runhook-listen";
/// As the SQLite store's: a delivery loop that falls this far behind gets
/// `Lagged` and rescans.
const CAPACITY: usize = 4096;
/// A NOTIFY payload must stay under 8,000 bytes; a longer notice goes out
/// empty, which listeners take as "look at everything".
const MAX_PAYLOAD: usize = 7_900;
/// How often the listening connection proves it is alive: a partition that
/// drops no TCP connection would otherwise leave it deaf until the kernel's
/// keepalive (two hours by default) gives up.
const PING_EVERY: Duration = Duration::from_secs(15);
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: doubles from the first to the last.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_LAST: Duration = Duration::from_secs(5);

const PENDING: i16 = DeliveryState::Pending as i16;

/// Tells every replica's listener, on commit, that `run_id` got deliveries
/// for `sinks`. Call it inside the transaction that queued them.
pub(super) async fn notify_work(
    tx: &Transaction<'_>,
    run_id: &str,
    sinks: &[Arc<str>],
) -> Result<(), PgStoreError> {
    if sinks.is_empty() {
        return Ok(());
    }
    let mut notice: Vec<&str> = Vec::with_capacity(sinks.len() + 1);
    notice.push(run_id);
    notice.extend(sinks.iter().map(|s| &**s));
    let payload = serde_json::to_string(&notice)
        .ok()
        .filter(|p| p.len() <= MAX_PAYLOAD)
        .unwrap_or_default();
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await?;
    Ok(())
}

/// Tells every replica's listener, on commit, that deliveries may have been
/// queued anywhere (a replay, a backfill): each one looks at every run with
/// pending deliveries. Call it inside the transaction that queued them.
#[allow(dead_code)] // for replay, requeue and backfill (pg/dead.rs, pg/requeue.rs)
pub(super) async fn notify_changed(tx: &Transaction<'_>) -> Result<(), PgStoreError> {
    tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
    Ok(())
}

/// A store's notification channels, and the listener that feeds them.
pub(super) struct Notifier {
    config: tokio_postgres::Config,
    commits: watch::Sender<u64>,
    new_work: broadcast::Sender<NewWork>,
    started: Mutex<bool>,
    stop: CancellationToken,
}

impl Notifier {
    pub(super) fn new(mut config: tokio_postgres::Config) -> Self {
        config.application_name(APPLICATION_NAME);
        Self {
            config,
            commits: watch::channel(0).0,
            new_work: broadcast::channel(CAPACITY).0,
            started: Mutex::new(false),
            stop: CancellationToken::new(),
        }
    }

    /// Starts the listener once, from within a tokio runtime (outside one
    /// the channels simply never fire).
    fn listen(&self) {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        if *started {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let feed = Feed {
            commits: self.commits.clone(),
            new_work: self.new_work.clone(),
            resync: Arc::new(Notify::new()),
        };
        runtime.spawn(listen(self.config.clone(), feed, self.stop.clone()));
        *started = true;
    }
}

impl Drop for Notifier {
    /// The last clone of the store is gone: so is its listener.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl PgStore {
    /// Runs that got new deliveries, on any replica, as they are committed.
    pub fn new_work(&self) -> broadcast::Receiver<NewWork> {
        let receiver = self.notify.new_work.subscribe();
        self.notify.listen();
        receiver
    }

    /// Changes after every commit that queued deliveries (on any replica),
    /// and each time the listener (re)starts listening, since it may have
    /// missed some.
    pub fn commits(&self) -> watch::Receiver<u64> {
        let receiver = self.notify.commits.subscribe();
        self.notify.listen();
        receiver
    }
}

/// Where the listener's news goes.
#[derive(Clone)]
struct Feed {
    commits: watch::Sender<u64>,
    new_work: broadcast::Sender<NewWork>,
    /// A notice without a run (or one that did not parse): look at all.
    resync: Arc<Notify>,
}

impl Feed {
    fn bump(&self) {
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// One notification: its run's new work, or a resync when it names none.
    fn heard(&self, payload: &str) {
        match serde_json::from_str::<Vec<String>>(payload) {
            Ok(names) if names.len() > 1 => {
                let mut names = names.into_iter().map(Arc::<str>::from);
                if let Some(run_id) = names.next() {
                    // Nobody listening (yet) is fine.
                    let _ = self.new_work.send(NewWork {
                        run_id,
                        sinks: names.collect(),
                    });
                }
                self.bump();
            }
            _ => self.resync.notify_one(),
        }
    }
}

/// Listens until `stop`, reconnecting with backoff whenever the connection
/// is lost or cannot be made.
async fn listen(config: tokio_postgres::Config, feed: Feed, stop: CancellationToken) {
    let mut wait = RECONNECT_FIRST;
    loop {
        let ended = tokio::select! {
            () = stop.cancelled() => return,
            ended = session(&config, &feed, &stop) => ended,
        };
        match ended {
            Ok(()) => return,
            Err(SessionEnd::Lost(error)) => {
                tracing::warn!(%error, "PostgreSQL: lost the notification connection; reconnecting");
                wait = RECONNECT_FIRST;
            }
            Err(SessionEnd::Refused(error)) => {
                tracing::warn!(%error, ?wait, "PostgreSQL: cannot listen for notifications; retrying");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(RECONNECT_LAST);
    }
}

/// Why a listening session ended.
enum SessionEnd {
    /// It never got to listen.
    Refused(PgStoreError),
    /// It listened, then the connection went.
    Lost(PgStoreError),
}

/// One connection: LISTEN, then catch up on what may have been missed, then
/// feed notifications until the connection is lost or `stop`.
async fn session(
    config: &tokio_postgres::Config,
    feed: &Feed,
    stop: &CancellationToken,
) -> Result<(), SessionEnd> {
    let refused = |e: tokio_postgres::Error| SessionEnd::Refused(e.into());
    let (client, mut connection) = config.connect(NoTls).await.map_err(refused)?;
    let driver_feed = feed.clone();
    // Polls the connection (which carries the client's queries too) and
    // hands on each notification; ends when the connection does.
    let mut driver = tokio::spawn(async move {
        loop {
            match futures::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => driver_feed.heard(n.payload()),
                Some(Ok(_)) => {}
                Some(Err(error)) => return PgStoreError::from(error),
                None => return PgStoreError::Listen("the connection closed".into()),
            }
        }
    });
    let _abort = AbortOnDrop(driver.abort_handle());
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .map_err(refused)?;
    let lost = |e: PgStoreError| SessionEnd::Lost(e);
    resync(&client, feed).await.map_err(lost)?;
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.reset();
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            ended = &mut driver => {
                let error = ended.unwrap_or_else(|e| PgStoreError::Listen(e.to_string()));
                return Err(SessionEnd::Lost(error));
            }
            () = feed.resync.notified() => resync(&client, feed).await.map_err(lost)?,
            _ = ping.tick() => {
                match tokio::time::timeout(PING_TIMEOUT, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => return Err(lost(error.into())),
                    Err(_) => return Err(lost(PgStoreError::Listen(format!("no answer to a ping in {PING_TIMEOUT:?}")))),
                }
            }
        }
    }
}

/// Names every run with pending deliveries (one notice per run, streamed:
/// a receiver that falls behind gets `Lagged` and rescans, as it would on
/// SQLite), then bumps the commit counter.
async fn resync(client: &Client, feed: &Feed) -> Result<(), PgStoreError> {
    let rows = client
        .query_raw(
            "SELECT run_id, array_agg(DISTINCT sink) FROM deliveries
             WHERE state = $1 GROUP BY run_id",
            [&PENDING],
        )
        .await?;
    let mut rows = std::pin::pin!(rows);
    while let Some(row) = rows.next().await {
        let row = row?;
        let run_id: String = row.try_get(0)?;
        let sinks: Vec<String> = row.try_get(1)?;
        let _ = feed.new_work.send(NewWork {
            run_id: Arc::from(run_id),
            sinks: sinks.into_iter().map(Arc::from).collect(),
        });
    }
    feed.bump();
    Ok(())
}

/// Ends the connection's driver with the session, however it ends.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
