//! Leases: which replica works which run, and the fencing token its writes
//! carry.
//!
//! The protocol (times in the server's clock, `now()`, never a replica's, so
//! clock skew cannot hand one run to two owners):
//! - **claim**: one statement picks unowned or expired lease rows of runs
//!   with work (`FOR UPDATE SKIP LOCKED`: replicas claiming at once take
//!   different rows), sets the owner, raises the epoch and sets `expires_at
//!   = now() + ttl`. A run has work while it is watched (ingest and its
//!   deliveries) or, unwatched, while it has pending deliveries a run lease
//!   covers (a `replay` of its dead letters, a `backfill`, retries due
//!   later): otherwise no replica would ever deliver those.
//! - **renew**: pushes `expires_at` on, only where owner and epoch still
//!   match; a lease missing from the answer was lost. A lease whose run has
//!   no work left is released by the same statement rather than renewed
//!   (missing from the answer too): an unwatched run's lease ends once its
//!   last delivery is done or dead.
//! - **release** (shedding, shutdown): clears the owner and expires the
//!   lease now, so another replica claims it at once. Shedding takes two
//!   steps: the lease is first reported lost (the run's work stops here)
//!   and still renewed, and released at a later tick once the run's work
//!   has ended (or once a send started before the shed must have ended: a
//!   ttl, or the longest sink timeout if longer): else
//!   the new owner would send while this one's delivery is in flight, and
//!   the event would go out twice with no fault at all.
//! - **fence**: every write for a run checks owner and epoch in its own
//!   transaction (`PgStore` methods taking a [`Lease`]), so a replica that
//!   lost its lease, however long it was paused, commits nothing.
//! - **fair share**: a replica holds at most `ceil(runs / live replicas)` +
//!   slack, live replicas being those whose heartbeat row is younger than a
//!   ttl; one holding more sheds the excess, which the others then claim.
//!
//! [`LeaseKeeper`] runs these steps for one replica, a tick at a time.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{PgStore, PgStoreError};

/// The sinks whose pending deliveries a run's lease covers, as a `WITH`
/// clause: every sink with a pending delivery except those a node holds
/// now (`sink_leases`: a file sink in a cluster is delivered by its node,
/// under its own lease, whether or not anyone holds the run). Only a held
/// sink lease counts: a lease row outlives its sink (a file sink renamed
/// into a webhook keeps it), and a row that no live node holds must not
/// leave that sink's backlog to nobody. While a file sink's node restarts
/// its runs may be claimed for nothing; that costs a lease, never an
/// event. A loose index scan
/// of `deliveries_pending (sink, event)`: one seek per sink, however long
/// the backlogs, so [`has_work!`] is a seek per sink per run.
macro_rules! run_sinks {
    () => {
        "WITH RECURSIVE pending_sinks(sink) AS (
            SELECT min(sink) FROM deliveries WHERE state = 0
            UNION ALL
            SELECT (SELECT min(d.sink) FROM deliveries d WHERE d.state = 0 AND d.sink > p.sink)
            FROM pending_sinks p WHERE p.sink IS NOT NULL),
         run_sinks AS (
            SELECT p.sink FROM pending_sinks p
            WHERE p.sink IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM sink_leases s WHERE s.sink = p.sink
                                AND s.owner IS NOT NULL AND s.expires_at > now())) "
    };
}

/// Whether the run (`r`, joined from `runs`) has work a lease covers:
/// watched, or pending deliveries to a [`run_sinks!`] sink (a seek of
/// `deliveries_pending_by_run` per sink). Needs [`run_sinks!`] in the
/// statement's `WITH`.
macro_rules! has_work {
    () => {
        "(r.watched OR EXISTS (
            SELECT 1 FROM run_sinks s JOIN deliveries d
              ON d.sink = s.sink AND d.run_id = r.run_id AND d.state = 0))"
    };
}

/// Releases the leases named by run (`$2`) and epoch (`$3`) still owned
/// by node `$1`: unowned and expired now.
const RELEASE: &str = "UPDATE leases SET owner = NULL, expires_at = now()
     FROM unnest($2::text[], $3::bigint[]) AS held(run_id, epoch)
     WHERE leases.run_id = held.run_id AND leases.epoch = held.epoch
       AND leases.owner = $1";

/// A run this replica owns, and the epoch that fences its writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lease {
    pub run_id: Arc<str>,
    pub epoch: i64,
}

/// How runs divide among the live replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Runs with work: watched, or with pending deliveries a run lease
    /// covers (each has a lease row).
    pub runs: usize,
    /// Replicas whose heartbeat is younger than a lease ttl (at least 1).
    pub replicas: usize,
    /// `ceil(runs / replicas)`: what each replica aims to hold.
    pub target: usize,
}

impl PgStore {
    pub(super) fn ttl_ms(&self) -> i64 {
        i64::try_from(self.replica.lease_ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// Says this replica is alive, for the others' fair share.
    pub async fn heartbeat(&self) -> Result<(), PgStoreError> {
        let client = self.lease_pool.get().await?;
        client
            .execute(
                "INSERT INTO replicas (node, heartbeat_at) VALUES ($1, now())
                 ON CONFLICT (node) DO UPDATE SET heartbeat_at = now()",
                &[&self.node()],
            )
            .await?;
        Ok(())
    }

    /// How many runs each live replica should hold now: the runs with work
    /// (watched, or with pending deliveries) over the live replicas.
    pub async fn fair_share(&self) -> Result<Share, PgStoreError> {
        let client = self.lease_pool.get().await?;
        let row = client
            .query_one(
                concat!(
                    run_sinks!(),
                    "SELECT (SELECT count(*) FROM leases l JOIN runs r ON r.run_id = l.run_id
                             WHERE ",
                    has_work!(),
                    "),
                        (SELECT count(*) FROM replicas
                         WHERE heartbeat_at > now() - $1::bigint * interval '1 millisecond')"
                ),
                &[&self.ttl_ms()],
            )
            .await?;
        let runs = usize::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0);
        let replicas = usize::try_from(row.try_get::<_, i64>(1)?)
            .unwrap_or(0)
            .max(1);
        Ok(Share {
            runs,
            replicas,
            target: runs.div_ceil(replicas),
        })
    }

    /// Claims up to `limit` runs with work (watched, or unwatched with
    /// pending deliveries) whose lease is unowned or expired, each with its
    /// epoch raised: the token this replica's writes carry. Whoever works a
    /// claimed run must start its ingest only if it is watched.
    pub async fn claim(&self, limit: usize) -> Result<Vec<Lease>, PgStoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.lease_pool.get().await?;
        let rows = client
            .query(
                concat!(
                    run_sinks!(),
                    "UPDATE leases SET owner = $1, epoch = leases.epoch + 1,
                        expires_at = now() + $2::bigint * interval '1 millisecond'
                     FROM (SELECT l.run_id FROM leases l JOIN runs r ON r.run_id = l.run_id
                           WHERE (l.owner IS NULL OR l.expires_at <= now()) AND ",
                    has_work!(),
                    " ORDER BY l.run_id LIMIT $3
                           FOR UPDATE OF l SKIP LOCKED) AS pick
                     WHERE leases.run_id = pick.run_id
                     RETURNING leases.run_id, leases.epoch"
                ),
                &[&self.node(), &self.ttl_ms(), &limit],
            )
            .await?;
        lease_rows(&rows)
    }

    /// Renews `held` for another ttl where owner and epoch still match and
    /// the run still has work; a held lease whose run has none (unwatched,
    /// nothing pending) is released instead. Returns the leases renewed;
    /// any other was lost or released: stop its run's work.
    pub async fn renew(&self, held: &[Lease]) -> Result<Vec<Lease>, PgStoreError> {
        let (runs, epochs) = columns(held);
        let client = self.lease_pool.get().await?;
        let rows = client
            .query(
                concat!(
                    run_sinks!(),
                    "UPDATE leases SET
                        owner = CASE WHEN h.worked THEN leases.owner END,
                        expires_at = CASE WHEN h.worked
                            THEN now() + $4::bigint * interval '1 millisecond'
                            ELSE now() END
                     FROM (SELECT held.run_id, held.epoch, ",
                    has_work!(),
                    " AS worked
                           FROM unnest($2::text[], $3::bigint[]) AS held(run_id, epoch)
                           JOIN runs r ON r.run_id = held.run_id) AS h
                     WHERE leases.run_id = h.run_id AND leases.epoch = h.epoch
                       AND leases.owner = $1
                     RETURNING leases.run_id, leases.epoch, h.worked"
                ),
                &[&self.node(), &runs, &epochs, &self.ttl_ms()],
            )
            .await?;
        let mut renewed = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<_, bool>(2)? {
                renewed.extend(lease_rows(std::slice::from_ref(row))?);
            }
        }
        Ok(renewed)
    }

    /// Gives leases up: unowned and expired now, so another replica claims
    /// them at its next tick, and this one's writes are refused at once.
    pub async fn release(&self, held: &[Lease]) -> Result<(), PgStoreError> {
        let (runs, epochs) = columns(held);
        let client = self.lease_pool.get().await?;
        client
            .execute(RELEASE, &[&self.node(), &runs, &epochs])
            .await?;
        Ok(())
    }

    /// Shutdown of one process: the leases it holds released (by epoch)
    /// and its node's heartbeat row gone. Only those: another process
    /// running under the same node name (two on one host, whose name is
    /// the default node) keeps its own, rather than having them taken over
    /// while it still trusts them and sends. A lease whose claim answer
    /// this process never read (a tick timed out) expires after a ttl.
    pub async fn leave_holding(&self, held: &[Lease]) -> Result<(), PgStoreError> {
        let (runs, epochs) = columns(held);
        let mut client = self.lease_pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(RELEASE, &[&self.node(), &runs, &epochs]).await?;
        tx.execute("DELETE FROM replicas WHERE node = $1", &[&self.node()])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Shutdown: every lease of this node released and its heartbeat row
    /// gone, so the others take the runs over and count one replica fewer at
    /// once rather than after a ttl.
    pub async fn leave(&self) -> Result<(), PgStoreError> {
        let mut client = self.lease_pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "UPDATE leases SET owner = NULL, expires_at = now() WHERE owner = $1",
            &[&self.node()],
        )
        .await?;
        tx.execute("DELETE FROM replicas WHERE node = $1", &[&self.node()])
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

fn lease_rows(rows: &[tokio_postgres::Row]) -> Result<Vec<Lease>, PgStoreError> {
    let lease = |row: &tokio_postgres::Row| {
        Ok(Lease {
            run_id: Arc::from(row.try_get::<_, &str>(0)?),
            epoch: row.try_get(1)?,
        })
    };
    rows.iter().map(lease).collect()
}

fn lease(run_id: &Arc<str>, epoch: i64) -> Lease {
    Lease {
        run_id: run_id.clone(),
        epoch,
    }
}

fn leases(of: &BTreeMap<Arc<str>, (i64, Instant)>) -> Vec<Lease> {
    of.iter()
        .map(|(run_id, (epoch, _))| lease(run_id, *epoch))
        .collect()
}

fn columns(leases: &[Lease]) -> (Vec<&str>, Vec<i64>) {
    leases.iter().map(|l| (&*l.run_id, l.epoch)).unzip()
}

/// What a tick changed: runs to start working, runs to stop working.
#[derive(Debug, Default)]
pub struct LeaseChanges {
    pub gained: Vec<Lease>,
    /// Taken over by another replica, or shed to one: stop the run's work
    /// (its writes would be refused anyway).
    pub lost: Vec<Lease>,
    /// Why the tick stopped short (the database is unreachable): what it
    /// changed before is still reported above.
    pub error: Option<PgStoreError>,
}

/// One replica's leases, kept by calling [`LeaseKeeper::tick`] every
/// `lease_ttl / 3`.
pub struct LeaseKeeper {
    store: PgStore,
    /// Leases shed (reported lost, so their runs' work stops) but not yet
    /// released, with their epoch and when they were shed: renewed until
    /// [`LeaseKeeper::releasing_when`]'s check says their run's work ended.
    shedding: BTreeMap<Arc<str>, (i64, Instant)>,
    /// Whether a run's work here has ended (no delivery under way); every
    /// run's, unless the daemon says otherwise.
    work_ended: Box<dyn Fn(&str) -> bool + Send + Sync>,
    /// How long a send started before a shed may still be in flight (the
    /// longest sink timeout): see [`LeaseKeeper::sends_last_at_most`].
    longest_send: Duration,
    /// Off once the process drains: it renews what its last deliveries
    /// write under, and takes nothing it would no longer work.
    claiming: bool,
    /// Each held run's epoch and the moment this replica stops trusting the
    /// lease unless renewed: two thirds of a ttl after the renewal was sent,
    /// so work stops before the server can let the lease expire.
    held: BTreeMap<Arc<str>, (i64, Instant)>,
}

impl LeaseKeeper {
    pub fn new(store: PgStore) -> Self {
        Self {
            store,
            shedding: BTreeMap::new(),
            work_ended: Box::new(|_| true),
            longest_send: Duration::ZERO,
            held: BTreeMap::new(),
            claiming: true,
        }
    }

    /// From now on a tick renews and sheds but claims nothing (shutdown:
    /// a run claimed during the drain would wait for the leave rather than
    /// go to a live replica at its next tick).
    pub fn stop_claiming(&mut self) {
        self.claiming = false;
    }

    /// Releases a shed lease only once `work_ended` says its run's work
    /// ended (the daemon: no delivery chain of the run under way).
    pub fn releasing_when(
        mut self,
        work_ended: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.work_ended = Box::new(work_ended);
        self
    }

    /// A shed lease whose run's work has not ended is released anyway once
    /// a send started before the shed must have ended: its sink's timeout
    /// (`longest`, the longest of the sinks') or a ttl, whichever is
    /// longer. Released a ttl after the shed while a send of up to a sink
    /// timeout was in flight, the next owner sent that delivery again
    /// beside it.
    pub fn sends_last_at_most(mut self, longest: Duration) -> Self {
        self.longest_send = longest;
        self
    }

    pub fn held(&self) -> Vec<Lease> {
        self.held
            .iter()
            .map(|(run_id, (epoch, _))| Lease {
                run_id: run_id.clone(),
                epoch: *epoch,
            })
            .collect()
    }

    /// The leases held, each with the moment this replica stops trusting
    /// it unless renewed meanwhile: workers check it per write, so a
    /// replica that was paused (SIGSTOP, a long GC-like stall) stops before
    /// its lease task has even run again.
    pub fn held_until(&self) -> Vec<(Lease, Instant)> {
        self.held
            .iter()
            .map(|(run_id, (epoch, until))| {
                let lease = Lease {
                    run_id: run_id.clone(),
                    epoch: *epoch,
                };
                (lease, *until)
            })
            .collect()
    }

    /// Heartbeat, renew, shed what is above the fair share, claim up to it.
    /// What changed is reported even when a step fails; call
    /// [`LeaseKeeper::overdue`] every tick regardless, to stop runs whose
    /// leases could not be renewed in time.
    pub async fn tick(&mut self) -> LeaseChanges {
        let mut changes = LeaseChanges::default();
        if let Err(error) = self.steps(&mut changes).await {
            changes.error = Some(error);
        }
        changes
    }

    async fn steps(&mut self, changes: &mut LeaseChanges) -> Result<(), PgStoreError> {
        let sent = Instant::now();
        self.store.heartbeat().await?;
        let trusted_until = sent + self.trust();
        self.release_shed().await?;
        self.renew(trusted_until, changes).await?;
        let share = self.store.fair_share().await?;
        let allowed = share.target + self.store.replica.share_slack;
        self.shed_above(allowed, changes);
        if !self.claiming {
            return Ok(());
        }
        let claimed = self
            .store
            .claim(allowed.saturating_sub(self.held.len()))
            .await?;
        for lease in claimed {
            self.held
                .insert(lease.run_id.clone(), (lease.epoch, trusted_until));
            changes.gained.push(lease);
        }
        Ok(())
    }

    /// Renews every held lease; those the database did not renew are lost.
    async fn renew(
        &mut self,
        trusted_until: Instant,
        changes: &mut LeaseChanges,
    ) -> Result<(), PgStoreError> {
        let held = self.held();
        let shed = leases(&self.shedding);
        if held.is_empty() && shed.is_empty() {
            return Ok(());
        }
        let asked: Vec<Lease> = held.iter().chain(&shed).cloned().collect();
        let renewed: HashSet<Lease> = self.store.renew(&asked).await?.into_iter().collect();
        // Lost already reported, when shed.
        self.shedding
            .retain(|run_id, (epoch, _)| renewed.contains(&lease(run_id, *epoch)));
        for lease in held {
            if renewed.contains(&lease) {
                self.held.insert(lease.run_id, (lease.epoch, trusted_until));
            } else {
                self.held.remove(&lease.run_id);
                changes.lost.push(lease);
            }
        }
        Ok(())
    }

    /// Sheds the leases above `allowed` (the highest run ids), so the
    /// replicas below their share claim them: reported lost now, so their
    /// runs' work stops, and released by [`Self::release_shed`] once it has.
    fn shed_above(&mut self, allowed: usize, changes: &mut LeaseChanges) {
        let excess: Vec<Lease> = self.held().into_iter().skip(allowed).collect();
        let now = Instant::now();
        for lease in excess {
            self.held.remove(&lease.run_id);
            self.shedding
                .insert(lease.run_id.clone(), (lease.epoch, now));
            changes.lost.push(lease);
        }
    }

    /// Releases the shed leases whose run's work ended here, or that were
    /// shed long enough ago that a send started before must have ended (a
    /// ttl, or the longest sink timeout if longer): work stuck elsewhere (a
    /// Slack rate limit wait, which asks again before sending) must not
    /// keep the run from its next owner for longer.
    async fn release_shed(&mut self) -> Result<(), PgStoreError> {
        let ttl = self.store.replica.lease_ttl.max(self.longest_send);
        let done: Vec<Lease> = self
            .shedding
            .iter()
            .filter(|(run_id, (_, shed))| (self.work_ended)(run_id) || shed.elapsed() >= ttl)
            .map(|(run_id, (epoch, _))| lease(run_id, *epoch))
            .collect();
        if done.is_empty() {
            return Ok(());
        }
        self.store.release(&done).await?;
        for lease in done {
            self.shedding.remove(&lease.run_id);
        }
        Ok(())
    }

    /// Leases not renewed within two thirds of a ttl (the database was
    /// unreachable): dropped here, to be stopped by the caller, before
    /// another replica can take them over.
    pub fn overdue(&mut self) -> Vec<Lease> {
        let now = Instant::now();
        let overdue: Vec<Lease> = self
            .held
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(run_id, (epoch, _))| Lease {
                run_id: run_id.clone(),
                epoch: *epoch,
            })
            .collect();
        for lease in &overdue {
            self.held.remove(&lease.run_id);
        }
        overdue
    }

    /// On SIGTERM, after the runs' work stopped: every lease this keeper
    /// holds released, those being shed too, the heartbeat row removed.
    pub async fn shutdown(self) -> Result<(), PgStoreError> {
        let mut held = self.held();
        held.extend(leases(&self.shedding));
        self.store.leave_holding(&held).await
    }

    fn trust(&self) -> Duration {
        self.store.replica.lease_ttl * 2 / 3
    }
}
