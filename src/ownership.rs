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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::watch;

use crate::store::Fence;
use crate::store::pg::Lease;

/// The leases held, by run, each trusted until its instant: what the lease
/// task last published.
pub type Held = Arc<BTreeMap<Arc<str>, (Lease, Instant)>>;

/// How many pieces of work (delivery chains) are under way per run, so
/// that a lease is given up in the database only once its run's work has
/// ended (see [`LeasePublisher::work_ended`]).
type WorkCounts = Arc<Mutex<HashMap<Arc<str>, usize>>>;

/// Answers "may this process work run R, and under which fence". Cheap to
/// clone and to ask (a read lock and a map lookup on PostgreSQL).
#[derive(Clone)]
pub struct Ownership {
    leases: Option<watch::Receiver<Held>>,
    /// `None` on SQLite: nothing is ever given up.
    working: Option<WorkCounts>,
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
    working: WorkCounts,
}

/// A piece of a run's work under way (a delivery chain): while one lives,
/// [`LeasePublisher::work_ended`] says no for its run. Dropped when the
/// work ends, however it ends.
pub struct Working {
    counts: Option<WorkCounts>,
    run_id: Arc<str>,
}

impl Drop for Working {
    fn drop(&mut self) {
        let Some(counts) = &self.counts else { return };
        let mut counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.run_id) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.run_id);
            }
        }
    }
}

impl Ownership {
    /// SQLite: the daemon lock owns every run.
    pub fn exclusive() -> Self {
        Self {
            leases: None,
            working: None,
        }
    }

    /// PostgreSQL: nothing held until the lease task publishes.
    pub fn leased() -> (LeasePublisher, Self) {
        let (leases, receiver) = watch::channel(Held::default());
        let working = WorkCounts::default();
        (
            LeasePublisher {
                leases,
                working: working.clone(),
            },
            Self {
                leases: Some(receiver),
                working: Some(working),
            },
        )
    }

    /// Registers a piece of the run's work (a delivery chain), until the
    /// guard is dropped. Taken before the work asks for its fence, so the
    /// lease task, which publishes a shed lease as lost and releases it
    /// only once its work ended, cannot miss work that started meanwhile.
    pub fn working(&self, run_id: &Arc<str>) -> Working {
        if let Some(counts) = &self.working {
            let mut counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
            *counts.entry(run_id.clone()).or_default() += 1;
        }
        Working {
            counts: self.working.clone(),
            run_id: run_id.clone(),
        }
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

    /// Whether no work of a run is under way here: a lease shed to another
    /// replica is released in the database only then, so the run's new
    /// owner never sends while this one's delivery is in flight (whose
    /// mark would be refused, and the event sent twice without a fault).
    pub fn work_ended(&self) -> impl Fn(&str) -> bool + Send + Sync + 'static {
        let counts = self.working.clone();
        move |run_id| {
            !counts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(run_id)
        }
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

    #[test]
    fn work_ends_when_its_last_guard_is_dropped() {
        let (publisher, ownership) = Ownership::leased();
        let ended = publisher.work_ended();
        let run: Arc<str> = "r1".into();
        assert!(ended("r1"));
        let first = ownership.working(&run);
        let second = ownership.clone().working(&run);
        assert!(!ended("r1"));
        assert!(ended("r2"));
        drop(first);
        assert!(!ended("r1"), "one chain still runs");
        drop(second);
        assert!(ended("r1"));
    }
}
