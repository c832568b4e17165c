//! Which runs this process may work, and under which [`Fence`] its writes
//! for them go. The run supervisor (ingest), the HTTP sinks' dispatchers
//! and their Slack threads all ask here, so they agree on what the process
//! owns at any moment, and learn together when that changes.
//!
//! On SQLite the daemon's exclusive lock on the state database makes it
//! the owner of every run for its life: every answer is
//! [`Fence::Exclusive`], and nothing ever changes. On PostgreSQL the lease
//! task publishes the leases this replica holds after each tick
//! ([`LeasePublisher`]); a run is worked only while its lease is held, and
//! under that lease's epoch. Each lease comes with the moment the replica
//! stops trusting it unless renewed, checked per call: a replica resumed
//! after a pause longer than that stops before its lease task runs again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::store::Fence;
use crate::store::pg::Lease;

/// The leases held, by run, each trusted until its instant: what the lease
/// task last published.
pub type Held = Arc<BTreeMap<Arc<str>, (Lease, Instant)>>;

/// Answers "may this process work run R, and under which fence". Cheap to
/// clone and to ask (a read lock and a map lookup on PostgreSQL).
#[derive(Clone)]
pub struct Ownership {
    leases: Option<watch::Receiver<Held>>,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.leases {
            None => f.write_str("Ownership::Exclusive"),
            Some(leases) => write!(f, "Ownership::Leases({} held)", leases.borrow().len()),
        }
    }
}

/// The lease task's end of an [`Ownership`]: what it publishes after each
/// tick is what every worker sees next.
pub struct LeasePublisher {
    leases: watch::Sender<Held>,
}

impl Ownership {
    /// SQLite: the daemon lock owns every run.
    pub fn exclusive() -> Self {
        Self { leases: None }
    }

    /// PostgreSQL: nothing held until the lease task publishes.
    pub fn leased() -> (LeasePublisher, Self) {
        let (leases, receiver) = watch::channel(Held::default());
        (
            LeasePublisher { leases },
            Self {
                leases: Some(receiver),
            },
        )
    }

    /// Whether the run's lease is among those held, trusted or not (its
    /// trust may come back with the next renewal). Always on SQLite.
    pub fn listed(&self, run_id: &str) -> bool {
        self.leases
            .as_ref()
            .is_none_or(|leases| leases.borrow().contains_key(run_id))
    }

    /// Whether this process owns every run (SQLite's daemon lock).
    pub fn is_exclusive(&self) -> bool {
        self.leases.is_none()
    }

    /// The fence to work `run_id` under now, or `None` when another
    /// replica (or none) owns it.
    pub fn fence(&self, run_id: &str) -> Option<Fence> {
        match &self.leases {
            None => Some(Fence::Exclusive),
            Some(leases) => leases
                .borrow()
                .get(run_id)
                .filter(|(_, until)| Instant::now() < *until)
                .map(|(lease, _)| Fence::Lease(lease.clone())),
        }
    }

    /// Whether work started under `fence` may go on: its lease is still
    /// the one held (not lost, not overdue, not replaced by a newer epoch).
    pub fn still_holds(&self, fence: &Fence) -> bool {
        match (fence, &self.leases) {
            (Fence::Exclusive, None) => true,
            (Fence::Lease(lease), Some(leases)) => leases
                .borrow()
                .get(&lease.run_id)
                .is_some_and(|(held, until)| held == lease && Instant::now() < *until),
            _ => false,
        }
    }

    /// Follows what this process owns, for a worker that must react to
    /// gained and lost runs.
    pub fn changes(&self) -> OwnershipChanges {
        OwnershipChanges {
            leases: self.leases.clone(),
            seen: self.leases.as_ref().map(|l| l.borrow().clone()),
        }
    }
}

impl LeasePublisher {
    /// Publishes the leases held now, each trusted until its instant.
    /// Every publication wakes the workers, a renewal too (an empty
    /// [`Change`]): work set aside while a lease's trust had lapsed (a slow
    /// tick) resumes when it is renewed, though no lease changed.
    pub fn publish(&self, held: impl IntoIterator<Item = (Lease, Instant)>) {
        let held: BTreeMap<Arc<str>, (Lease, Instant)> = held
            .into_iter()
            .map(|(lease, until)| (lease.run_id.clone(), (lease, until)))
            .collect();
        self.leases.send_replace(Arc::new(held));
    }
}

/// What changed between two looks at the leases held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Held now and not before, or held now under a newer epoch.
    pub gained: Vec<Lease>,
    /// Held before and not now (or now under another epoch).
    pub lost: Vec<Lease>,
}

impl Change {
    /// A renewal: the same leases as before.
    pub fn is_empty(&self) -> bool {
        self.gained.is_empty() && self.lost.is_empty()
    }
}

/// A worker's view of [`Ownership`] changes.
pub struct OwnershipChanges {
    leases: Option<watch::Receiver<Held>>,
    seen: Option<Held>,
}

impl OwnershipChanges {
    /// Waits for the next publication and says what changed (nothing, for
    /// a renewal). Never returns on
    /// SQLite (nothing changes); on PostgreSQL, never after the lease task
    /// ended (the daemon is stopping).
    pub async fn next(&mut self) -> Change {
        let Some(leases) = &mut self.leases else {
            return std::future::pending().await;
        };
        if leases.changed().await.is_err() {
            return std::future::pending().await;
        }
        let now = leases.borrow_and_update().clone();
        let before = self.seen.replace(now.clone()).unwrap_or_default();
        diff(&before, &now)
    }
}

type Leases = BTreeMap<Arc<str>, (Lease, Instant)>;

/// Leases in `of` that `other` does not hold under the same epoch.
fn missing(of: &Leases, other: &Leases) -> Vec<Lease> {
    of.values()
        .filter(|(lease, _)| other.get(&lease.run_id).map(|(l, _)| l) != Some(lease))
        .map(|(lease, _)| lease.clone())
        .collect()
}

fn diff(before: &Leases, now: &Leases) -> Change {
    Change {
        gained: missing(now, before),
        lost: missing(before, now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(run: &str, epoch: i64) -> Lease {
        Lease {
            run_id: run.into(),
            epoch,
        }
    }

    /// A lease trusted for a while yet.
    fn trusted(run: &str, epoch: i64) -> (Lease, Instant) {
        (
            lease(run, epoch),
            Instant::now() + std::time::Duration::from_secs(60),
        )
    }

    #[test]
    fn on_sqlite_every_run_is_owned_under_the_daemon_lock() {
        let ownership = Ownership::exclusive();
        assert_eq!(ownership.fence("any"), Some(Fence::Exclusive));
        assert!(ownership.still_holds(&Fence::Exclusive));
        assert!(!ownership.still_holds(&Fence::Lease(lease("r", 1))));
    }

    #[test]
    fn with_leases_only_held_runs_are_owned_and_under_their_epoch() {
        let (publisher, ownership) = Ownership::leased();
        assert_eq!(ownership.fence("r1"), None, "nothing held before a tick");
        publisher.publish([trusted("r1", 3)]);
        assert_eq!(ownership.fence("r1"), Some(Fence::Lease(lease("r1", 3))));
        assert_eq!(ownership.fence("r2"), None);
        assert!(!ownership.still_holds(&Fence::Exclusive));
        assert!(ownership.still_holds(&Fence::Lease(lease("r1", 3))));
        publisher.publish([trusted("r1", 4)]);
        assert!(
            !ownership.still_holds(&Fence::Lease(lease("r1", 3))),
            "an older epoch of a run held again is not the lease held"
        );
    }

    #[tokio::test]
    async fn changes_name_gained_and_lost_leases_and_new_epochs() {
        let (publisher, ownership) = Ownership::leased();
        let mut changes = ownership.changes();
        publisher.publish([trusted("a", 1), trusted("b", 1)]);
        assert_eq!(
            changes.next().await,
            Change {
                gained: vec![lease("a", 1), lease("b", 1)],
                lost: vec![],
            }
        );
        publisher.publish([trusted("b", 2), trusted("c", 1)]);
        assert_eq!(
            changes.next().await,
            Change {
                gained: vec![lease("b", 2), lease("c", 1)],
                lost: vec![lease("a", 1), lease("b", 1)],
            }
        );
    }

    /// A renewal wakes the workers with nothing changed, and gives back
    /// the trust of a lease whose renewal came late.
    #[tokio::test]
    async fn a_renewal_is_an_empty_change_that_restores_trust() {
        let (publisher, ownership) = Ownership::leased();
        let mut changes = ownership.changes();
        let lapsed = Instant::now() - std::time::Duration::from_millis(1);
        publisher.publish([(lease("a", 1), lapsed)]);
        changes.next().await;
        assert_eq!(ownership.fence("a"), None, "lapsed");
        assert!(ownership.listed("a"));
        publisher.publish([trusted("a", 1)]);
        assert!(changes.next().await.is_empty());
        assert_eq!(ownership.fence("a"), Some(Fence::Lease(lease("a", 1))));
    }

    /// A replica paused past its trust (SIGSTOP) stops working the run at
    /// its first look after it resumes, before its lease task ran again.
    #[test]
    fn a_lease_past_its_trust_is_no_longer_held() {
        let (publisher, ownership) = Ownership::leased();
        let past = Instant::now() - std::time::Duration::from_millis(1);
        publisher.publish([(lease("r1", 1), past)]);
        assert_eq!(ownership.fence("r1"), None);
        assert!(!ownership.still_holds(&Fence::Lease(lease("r1", 1))));
    }
}
