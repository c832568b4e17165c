//! Leases: which replica works which run, and the fencing token its writes
//! carry.
//!
//! The protocol (times in the server's clock, `now()`, never a replica's, so
//! clock skew cannot hand one run to two owners):
//! - **claim**: one statement picks unowned or expired lease rows `FOR
//!   UPDATE SKIP LOCKED` (replicas claiming at once take different rows),
//!   sets the owner, raises the epoch and sets `expires_at = now() + ttl`.
//! - **renew**: pushes `expires_at` on, only where owner and epoch still
//!   match; a lease missing from the answer was lost.
//! - **release** (shedding, shutdown): clears the owner and expires the
//!   lease now, so another replica claims it at once.
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

/// A run this replica owns, and the epoch that fences its writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lease {
    pub run_id: Arc<str>,
    pub epoch: i64,
}

/// How runs divide among the live replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Watched runs (each has a lease row).
    pub runs: usize,
    /// Replicas whose heartbeat is younger than a lease ttl (at least 1).
    pub replicas: usize,
    /// `ceil(runs / replicas)`: what each replica aims to hold.
    pub target: usize,
}

impl PgStore {
    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.replica.lease_ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// Says this replica is alive, for the others' fair share.
    pub async fn heartbeat(&self) -> Result<(), PgStoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO replicas (node, heartbeat_at) VALUES ($1, now())
                 ON CONFLICT (node) DO UPDATE SET heartbeat_at = now()",
                &[&self.node()],
            )
            .await?;
        Ok(())
    }

    /// How many runs each live replica should hold now.
    pub async fn fair_share(&self) -> Result<Share, PgStoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM leases l JOIN runs r ON r.run_id = l.run_id
                         WHERE r.watched),
                        (SELECT count(*) FROM replicas
                         WHERE heartbeat_at > now() - $1::bigint * interval '1 millisecond')",
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

    /// Claims up to `limit` watched runs whose lease is unowned or expired,
    /// each with its epoch raised: the token this replica's writes carry.
    pub async fn claim(&self, limit: usize) -> Result<Vec<Lease>, PgStoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "UPDATE leases SET owner = $1, epoch = leases.epoch + 1,
                    expires_at = now() + $2::bigint * interval '1 millisecond'
                 FROM (SELECT l.run_id FROM leases l JOIN runs r ON r.run_id = l.run_id
                       WHERE r.watched AND (l.owner IS NULL OR l.expires_at <= now())
                       ORDER BY l.run_id LIMIT $3
                       FOR UPDATE OF l SKIP LOCKED) AS pick
                 WHERE leases.run_id = pick.run_id
                 RETURNING leases.run_id, leases.epoch",
                &[&self.node(), &self.ttl_ms(), &limit],
            )
            .await?;
        lease_rows(&rows)
    }

    /// Renews `held` for another ttl where owner and epoch still match.
    /// Returns the leases renewed; any other was lost.
    pub async fn renew(&self, held: &[Lease]) -> Result<Vec<Lease>, PgStoreError> {
        let (runs, epochs) = columns(held);
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "UPDATE leases SET expires_at = now() + $4::bigint * interval '1 millisecond'
                 FROM unnest($2::text[], $3::bigint[]) AS held(run_id, epoch)
                 WHERE leases.run_id = held.run_id AND leases.epoch = held.epoch
                   AND leases.owner = $1
                 RETURNING leases.run_id, leases.epoch",
                &[&self.node(), &runs, &epochs, &self.ttl_ms()],
            )
            .await?;
        lease_rows(&rows)
    }

    /// Gives leases up: unowned and expired now, so another replica claims
    /// them at its next tick, and this one's writes are refused at once.
    pub async fn release(&self, held: &[Lease]) -> Result<(), PgStoreError> {
        let (runs, epochs) = columns(held);
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE leases SET owner = NULL, expires_at = now()
                 FROM unnest($2::text[], $3::bigint[]) AS held(run_id, epoch)
                 WHERE leases.run_id = held.run_id AND leases.epoch = held.epoch
                   AND leases.owner = $1",
                &[&self.node(), &runs, &epochs],
            )
            .await?;
        Ok(())
    }

    /// Shutdown: every lease of this node released and its heartbeat row
    /// gone, so the others take the runs over and count one replica fewer at
    /// once rather than after a ttl.
    pub async fn leave(&self) -> Result<(), PgStoreError> {
        let mut client = self.pool.get().await?;
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
    /// Each held run's epoch and the moment this replica stops trusting the
    /// lease unless renewed: two thirds of a ttl after the renewal was sent,
    /// so work stops before the server can let the lease expire.
    held: BTreeMap<Arc<str>, (i64, Instant)>,
}

impl LeaseKeeper {
    pub fn new(store: PgStore) -> Self {
        Self {
            store,
            held: BTreeMap::new(),
        }
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
        self.renew(trusted_until, changes).await?;
        let share = self.store.fair_share().await?;
        let allowed = share.target + self.store.replica.share_slack;
        self.shed_above(allowed, changes).await?;
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
        if held.is_empty() {
            return Ok(());
        }
        let renewed: HashSet<Lease> = self.store.renew(&held).await?.into_iter().collect();
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

    /// Releases the leases above `allowed` (the highest run ids), so the
    /// replicas below their share claim them.
    async fn shed_above(
        &mut self,
        allowed: usize,
        changes: &mut LeaseChanges,
    ) -> Result<(), PgStoreError> {
        let excess: Vec<Lease> = self.held().into_iter().skip(allowed).collect();
        if excess.is_empty() {
            return Ok(());
        }
        self.store.release(&excess).await?;
        for lease in excess {
            self.held.remove(&lease.run_id);
            changes.lost.push(lease);
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

    /// On SIGTERM, after the runs' work stopped: everything released, the
    /// heartbeat row removed.
    pub async fn shutdown(self) -> Result<(), PgStoreError> {
        self.store.leave().await
    }

    fn trust(&self) -> Duration {
        self.store.replica.lease_ttl * 2 / 3
    }
}
