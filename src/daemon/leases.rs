//! The lease task of a replica on PostgreSQL: ticks the [`LeaseKeeper`]
//! every `lease_ttl / 3` and publishes what it holds to [`Ownership`], so
//! ingest and delivery start on gained runs and stop on lost or overdue
//! ones. It keeps ticking through the drain (the runs' last outcomes are
//! written under their leases), and only then leaves: every lease released
//! and the heartbeat row removed, so the other replicas take the runs at
//! their next tick rather than after a ttl.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::ownership::{LeasePublisher, Ownership};
use crate::store::pg::{LeaseKeeper, PgStore};

/// The running lease task. Dropped without [`Leases::leave`] (the daemon
/// failed), it stops ticking and its leases expire after a ttl.
pub(super) struct Leases {
    stop: CancellationToken,
    draining: CancellationToken,
    task: AbortOnDropHandle<(LeaseKeeper, LeasePublisher)>,
}

impl Leases {
    /// Starts ticking at once; the returned [`Ownership`] holds nothing
    /// until the first tick has claimed.
    /// `longest_send`: the longest sink timeout, how long a send started
    /// before a shed may still be in flight.
    pub(super) fn start(
        store: PgStore,
        lease_ttl: Duration,
        longest_send: Duration,
    ) -> (Self, Ownership) {
        let (publisher, ownership) = Ownership::leased();
        let stop = CancellationToken::new();
        // A shed lease is released once its run's delivery chains ended, or
        // once a send they started must have ended: a shed is published at
        // the end of its tick (a third of a ttl at most), sends stop then.
        let keeper = LeaseKeeper::new(store)
            .releasing_when(publisher.work_ended())
            .sends_last_at_most(longest_send + lease_ttl / 3);
        let draining = CancellationToken::new();
        let task = AbortOnDropHandle::new(tokio::spawn(keep_leases(
            keeper,
            publisher,
            lease_ttl / 3,
            lease_ttl * 2 / 3,
            stop.clone(),
            draining.clone(),
        )));
        (
            Self {
                stop,
                draining,
                task,
            },
            ownership,
        )
    }

    /// The drain begins (ingest stopped, the dispatchers stopping): the
    /// leases held are renewed until the leave, no run is claimed.
    pub(super) fn drain(&self) {
        self.draining.cancel();
    }

    /// After ingest stopped and deliveries drained: stops ticking and gives
    /// every lease up.
    pub(super) async fn leave(self) {
        self.stop.cancel();
        let (keeper, publisher) = match self.task.await {
            Ok(ended) => ended,
            Err(error) => {
                tracing::error!(%error, "the lease task failed; the leases expire after lease_ttl");
                return;
            }
        };
        publisher.publish([]);
        match keeper.shutdown().await {
            Ok(()) => tracing::info!("leases released; the other replicas take the runs over"),
            Err(error) => {
                tracing::warn!(%error, "cannot release the leases; they expire after lease_ttl")
            }
        }
    }
}

/// Ticks until `stop`, one tick every `every` (a third of a ttl). A tick is
/// bounded by `trust` (two thirds of a ttl, how long a renewal sent at its
/// start is trusted): a slow one that renews within it still keeps the
/// runs (cut at `every`, a busy database's ticks timed out and every run
/// stopped and moved), and past it nothing it brings back would be trusted
/// anyway. The workers check each lease's trust per call, so a stuck tick
/// never lets a run be worked past its trust; the overdue check after it
/// only drops what lapsed.
async fn keep_leases(
    mut keeper: LeaseKeeper,
    publisher: LeasePublisher,
    every: Duration,
    trust: Duration,
    stop: CancellationToken,
    draining: CancellationToken,
) -> (LeaseKeeper, LeasePublisher) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        if draining.is_cancelled() {
            keeper.stop_claiming();
        }
        match tokio::time::timeout(trust, keeper.tick()).await {
            Ok(changes) => {
                count_changes("gained", changes.gained.len());
                count_changes("lost", changes.lost.len());
                for lease in &changes.gained {
                    tracing::info!(run_id = %lease.run_id, epoch = lease.epoch, "lease gained; working the run");
                }
                for lease in &changes.lost {
                    tracing::info!(run_id = %lease.run_id, epoch = lease.epoch, "lease lost; stopping the run's work");
                }
                if let Some(error) = changes.error {
                    tracing::warn!(%error, "lease tick failed; trying again at the next");
                }
            }
            Err(_) => tracing::warn!(?trust, "lease tick timed out; trying again at the next"),
        }
        let overdue = keeper.overdue();
        count_changes("overdue", overdue.len());
        for lease in overdue {
            tracing::warn!(run_id = %lease.run_id, epoch = lease.epoch, "lease not renewed in time; stopping the run's work");
        }
        publisher.publish(keeper.held_until());
        crate::metrics::metrics()
            .leases_held
            .set(keeper.held().len() as i64);
    }
    (keeper, publisher)
}

fn count_changes(change: &str, leases: usize) {
    crate::metrics::metrics()
        .lease_changes
        .with_label_values(&[change])
        .inc_by(leases as u64);
}
