//! Findings of the review of issue 14's PostgreSQL work (REVIEW1), each
//! proven against a real server (`pg_support`): a way an event could be
//! lost, doubled or reordered, shown by a test that failed before its fix.
//! Without PostgreSQL they pass after printing "skipped: no PostgreSQL"
//! (unless `RUNHOOK_REQUIRE_PG=1`).

use std::collections::{BTreeMap, BTreeSet};

use runhook::store::pg::{Lease, PgStore};
use runhook::store::{Batch, TailCursor};

use crate::pg_support::PgServer;
use crate::support::pg_store::{
    self as pg_store, count, hold_batches_of, start_held, wait_for_held,
};
use crate::support::wait_for;

const RUN: &str = "7c1d0e2a-0000-4000-8000-000000000001";
const OTHER: &str = "7c1d0e2a-0000-4000-8000-000000000002";
const SINK: &str = "review";
const NODE: &str = "runhook-a";

/// A replica owning `runs` (subscribed and claimed).
async fn replica(pg: &PgServer, runs: &[&str]) -> (PgStore, BTreeMap<String, Lease>) {
    pg_store::replica_owning(&pg.url(), NODE, runs).await
}

/// Events `sequences` of `run` for `sink`, in phase `compose`.
fn batch(run: &str, sequences: impl IntoIterator<Item = i64>, sink: &str) -> Batch {
    Batch {
        phase: Some("compose".into()),
        ..pg_store::batch(run, sequences, &[sink])
    }
}

/// One `tail` read of at most `limit` rows; the ids it hands out are
/// added to `printed`.
async fn read_tail(
    store: &PgStore,
    cursor: &mut TailCursor,
    limit: usize,
    printed: &mut Vec<String>,
) {
    let events = store
        .tail_next(cursor, None, None, limit)
        .await
        .expect("tail reads");
    printed.extend(events.into_iter().map(|e| e.id));
}

/// The slow batch (`OTHER` 1..=5) and the fast one (`RUN` 1..=3) were
/// handed out, every event once.
fn assert_both_batches_once(printed: &[String]) {
    let unique: BTreeSet<&String> = printed.iter().collect();
    assert_eq!(unique.len(), printed.len(), "once each: {printed:?}");
    let want: BTreeSet<String> = (1..=5)
        .map(|s| format!("{OTHER}:{s}"))
        .chain((1..=3).map(|s| format!("{RUN}:{s}")))
        .collect();
    let got: BTreeSet<String> = printed.iter().cloned().collect();
    assert_eq!(got, want, "every event handed out: {printed:?}");
}

/// A slow batch draws rows 1..=5 and commits after a fast batch's rows
/// 6..=8 were handed out; another transaction (any write anywhere on the
/// server) is still in flight when `tail` reads again with a limit smaller
/// than the slow batch. Every event must be handed out, once: the read that
/// finds the slow batch ended may move the cursor only past the rows it
/// actually returned, not past everything the earlier read had seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_hands_out_a_late_batch_larger_than_its_read_limit() {
    let Some(pg) = PgServer::start() else { return };
    let (store, leases) = replica(&pg, &[RUN, OTHER]).await;
    let holder = pg.client().await;
    hold_batches_of(&holder, OTHER).await;
    let slow = start_held(&holder, &store, &leases[OTHER], batch(OTHER, 1..=5, SINK)).await;
    wait_for_held(&pg.client().await).await;
    store
        .record_batch(&leases[RUN], batch(RUN, 1..=3, SINK))
        .await
        .expect("the fast batch commits");

    let mut cursor = TailCursor::default();
    let mut printed: Vec<String> = Vec::new();
    read_tail(&store, &mut cursor, 10, &mut printed).await;
    assert_eq!(printed.len(), 3, "the fast batch: {printed:?}");

    // Some other transaction with an id, in flight across the next reads.
    let bystander = pg.client().await;
    bystander
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .expect("a transaction in flight");
    holder.batch_execute("COMMIT").await.expect("release");
    slow.await
        .expect("the slow batch ran")
        .expect("the slow batch commits");
    // A later transaction ends, so the bystander's id is below the
    // snapshot's horizon and listed as in flight.
    store.heartbeat().await.expect("heartbeat");
    for _ in 0..5 {
        read_tail(&store, &mut cursor, 2, &mut printed).await;
    }
    bystander.batch_execute("COMMIT").await.expect("end it");
    for _ in 0..2 {
        read_tail(&store, &mut cursor, 2, &mut printed).await;
    }
    assert_both_batches_once(&printed);
}

/// PostgreSQL lists in a snapshot's in-flight transactions only those
/// below its `xmax` (one past the newest that has ended): a transaction
/// whose id came later is in flight too, and not listed. Here the slow
/// batch takes its id after the fast one (so above it), draws rows 1..=5,
/// and is still open when the fast batch, which drew rows 6..=8 after it,
/// has ended: the snapshot lists nobody in flight, and `tail` must still
/// not move past rows 1..=5 before the slow batch commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_waits_for_a_batch_whose_id_is_above_the_snapshots_horizon() {
    let Some(pg) = PgServer::start() else { return };
    let (store, leases) = replica(&pg, &[RUN, OTHER]).await;
    let holder = pg.client().await;
    hold_batches_of(&holder, OTHER).await;
    // The fast batch takes its id at its fence, then waits for RUN's row.
    let gate = pg.client().await;
    gate.batch_execute(&format!(
        "BEGIN; SELECT 1 FROM runs WHERE run_id = '{RUN}' FOR UPDATE;"
    ))
    .await
    .expect("hold the fast run's row");
    let fast = tokio::spawn({
        let store = store.clone();
        let lease = leases[RUN].clone();
        async move { store.record_batch(&lease, batch(RUN, 1..=3, SINK)).await }
    });
    let observer = pg.client().await;
    wait_for("the fast batch to wait for its run's row", || async {
        let waiting = count(
            &observer,
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype <> 'advisory'",
        )
        .await;
        if waiting >= 1 {
            Ok(())
        } else {
            Err("not waiting yet".to_owned())
        }
    })
    .await;
    let slow = start_held(&holder, &store, &leases[OTHER], batch(OTHER, 1..=5, SINK)).await;
    wait_for_held(&observer).await;
    gate.batch_execute("COMMIT")
        .await
        .expect("let the fast batch go");
    fast.await
        .expect("the fast batch ran")
        .expect("the fast batch commits");

    let mut cursor = TailCursor::default();
    let mut printed: Vec<String> = Vec::new();
    read_tail(&store, &mut cursor, 100, &mut printed).await;
    holder.batch_execute("COMMIT").await.expect("release");
    slow.await
        .expect("the slow batch ran")
        .expect("the slow batch commits");
    for _ in 0..3 {
        read_tail(&store, &mut cursor, 100, &mut printed).await;
    }
    assert_both_batches_once(&printed);
}

/// A `sink_leases` row is never removed. A sink that was once a file sink
/// in the cluster and is now an HTTP sink of the same name (`archive` moved
/// from a file to a webhook) must still have its unwatched runs' backlog
/// claimed: only a sink lease someone holds now keeps a run unclaimed.
/// Red (the run's lease released by renew, its retry pending for ever)
/// while the claim left out every sink with a lease row.
#[tokio::test]
async fn a_former_file_sinks_pending_retries_keep_their_unwatched_run_claimed() {
    let Some(pg) = PgServer::start() else { return };
    let (store, leases) = replica(&pg, &[RUN]).await;
    // The sink was a file sink of this node once: its lease row stays.
    let held = store.claim_sink(SINK).await.expect("claim").expect("free");
    store.release_sink(&held).await.expect("release");
    // Now an HTTP sink: the run's owner records and tries to deliver.
    let lease = leases[RUN].clone();
    store
        .record_batch(&lease, batch(RUN, 1..=1, SINK))
        .await
        .expect("recorded");
    assert!(store.unsubscribe(RUN.into()).await.expect("unwatch"));
    let renewed = store
        .renew(std::slice::from_ref(&lease))
        .await
        .expect("renew");
    assert_eq!(
        renewed,
        [lease],
        "a pending delivery to an HTTP sink is work: the lease is kept"
    );
}
