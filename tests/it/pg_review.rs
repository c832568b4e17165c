//! Findings of the review of issue 14's PostgreSQL work (REVIEW1), each
//! proven against a real server (`pg_support`): a way an event could be
//! lost, doubled or reordered, shown by a test that failed before its fix.
//! Without PostgreSQL they pass after printing "skipped: no PostgreSQL"
//! (unless `RUNHOOK_REQUIRE_PG=1`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use runhook::store::pg::{Lease, PgStore, Replica};
use runhook::store::{Batch, NewEvent, TailCursor};
use serde_json::value::RawValue;

use crate::pg_support::PgServer;
use crate::support::wait_for;

const RUN: &str = "7c1d0e2a-0000-4000-8000-000000000001";
const OTHER: &str = "7c1d0e2a-0000-4000-8000-000000000002";
const SINK: &str = "review";
const NODE: &str = "runhook-a";

/// A replica owning `runs` (subscribed and claimed).
async fn replica(pg: &PgServer, runs: &[&str]) -> (PgStore, BTreeMap<String, Lease>) {
    let store = PgStore::open(
        &pg.url(),
        Replica {
            node: NODE.into(),
            lease_ttl: Duration::from_secs(60),
            share_slack: 0,
        },
    )
    .await
    .expect("open the PostgreSQL store");
    for run in runs {
        store
            .subscribe((*run).into(), BTreeMap::new(), "watch", None)
            .await
            .expect("subscribe");
    }
    store.heartbeat().await.expect("heartbeat");
    let leases = store.claim(runs.len()).await.expect("claim");
    assert_eq!(leases.len(), runs.len(), "{leases:?}");
    let leases = leases
        .into_iter()
        .map(|l| (l.run_id.to_string(), l))
        .collect();
    (store, leases)
}

fn batch(run: &str, sequences: impl IntoIterator<Item = i64>, sink: &str) -> Batch {
    Batch {
        run_id: run.into(),
        events: sequences
            .into_iter()
            .map(|sequence| NewEvent {
                sequence,
                event_type: "PHASE_STARTED".into(),
                payload: RawValue::from_string(format!("{{\"n\":{sequence}}}")).expect("json"),
                created_at: None,
                sinks: vec![Arc::from(sink)],
            })
            .collect(),
        run_status: Some("running".into()),
        phase: Some("compose".into()),
        finish: None,
        stalled: None,
    }
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// A slow ingest transaction: a trigger on the deliveries of `run` waits
/// for an advisory lock the test holds, so that run's `record_batch` has
/// drawn its event rows but cannot commit (as in `pg_ops`).
async fn hold_batches_of(client: &tokio_postgres::Client, run: &str) {
    client
        .batch_execute(&format!(
            "CREATE FUNCTION hold_batch() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.run_id = '{run}' THEN PERFORM pg_advisory_xact_lock(4242); END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER hold_batch BEFORE INSERT ON deliveries
                 FOR EACH ROW EXECUTE FUNCTION hold_batch();"
        ))
        .await
        .expect("the holding trigger");
}

/// Until the slow batch waits on the test's advisory lock.
async fn wait_for_held(observer: &tokio_postgres::Client) {
    wait_for("the slow batch to draw its rows", || async {
        let waiting = count(
            observer,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .await;
        if waiting == 1 {
            Ok(())
        } else {
            Err("not waiting yet".to_owned())
        }
    })
    .await;
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
    holder
        .batch_execute("BEGIN; SELECT pg_advisory_xact_lock(4242);")
        .await
        .expect("hold the lock");
    let slow = tokio::spawn({
        let store = store.clone();
        let lease = leases[OTHER].clone();
        async move { store.record_batch(&lease, batch(OTHER, 1..=5, SINK)).await }
    });
    wait_for_held(&pg.client().await).await;
    store
        .record_batch(&leases[RUN], batch(RUN, 1..=3, SINK))
        .await
        .expect("the fast batch commits");

    let mut cursor = TailCursor::default();
    let mut printed: Vec<String> = Vec::new();
    let first = store
        .tail_next(&mut cursor, None, None, 10)
        .await
        .expect("tail reads");
    printed.extend(first.into_iter().map(|e| e.id));
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
        let events = store
            .tail_next(&mut cursor, None, None, 2)
            .await
            .expect("tail reads");
        printed.extend(events.into_iter().map(|e| e.id));
    }
    bystander.batch_execute("COMMIT").await.expect("end it");
    for _ in 0..2 {
        let events = store
            .tail_next(&mut cursor, None, None, 2)
            .await
            .expect("tail reads");
        printed.extend(events.into_iter().map(|e| e.id));
    }
    let unique: BTreeSet<&String> = printed.iter().collect();
    assert_eq!(unique.len(), printed.len(), "once each: {printed:?}");
    let want: BTreeSet<String> = (1..=5)
        .map(|s| format!("{OTHER}:{s}"))
        .chain((1..=3).map(|s| format!("{RUN}:{s}")))
        .collect();
    let got: BTreeSet<String> = printed.iter().cloned().collect();
    assert_eq!(got, want, "every event handed out: {printed:?}");
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
    holder
        .batch_execute("BEGIN; SELECT pg_advisory_xact_lock(4242);")
        .await
        .expect("hold the lock");
    let slow = tokio::spawn({
        let store = store.clone();
        let lease = leases[OTHER].clone();
        async move { store.record_batch(&lease, batch(OTHER, 1..=5, SINK)).await }
    });
    wait_for_held(&observer).await;
    gate.batch_execute("COMMIT")
        .await
        .expect("let the fast batch go");
    fast.await
        .expect("the fast batch ran")
        .expect("the fast batch commits");

    let mut cursor = TailCursor::default();
    let mut printed: Vec<String> = Vec::new();
    let first = store
        .tail_next(&mut cursor, None, None, 100)
        .await
        .expect("tail reads");
    printed.extend(first.into_iter().map(|e| e.id));
    holder.batch_execute("COMMIT").await.expect("release");
    slow.await
        .expect("the slow batch ran")
        .expect("the slow batch commits");
    for _ in 0..3 {
        let events = store
            .tail_next(&mut cursor, None, None, 100)
            .await
            .expect("tail reads");
        printed.extend(events.into_iter().map(|e| e.id));
    }
    let unique: BTreeSet<&String> = printed.iter().collect();
    assert_eq!(unique.len(), printed.len(), "once each: {printed:?}");
    let want: BTreeSet<String> = (1..=5)
        .map(|s| format!("{OTHER}:{s}"))
        .chain((1..=3).map(|s| format!("{RUN}:{s}")))
        .collect();
    let got: BTreeSet<String> = printed.iter().cloned().collect();
    assert_eq!(got, want, "every event handed out: {printed:?}");
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
