//! The PostgreSQL store's state beside the data path, against a real server
//! (`pg_support`): retention, sink state and Slack thread roots, the reads
//! of backlogs and `tail`, and LISTEN/NOTIFY between replicas. Each test
//! holds the PostgreSQL operation to the meaning of the SQLite store's
//! tests for it (`tests/it/retention.rs`, `store/retention.rs`,
//! `store/sinks.rs`, `deliver/file.rs`). Without PostgreSQL they pass after
//! printing "skipped: no PostgreSQL" (unless `RUNHOOK_REQUIRE_PG=1`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use runhook::store::pg::{Lease, PgStore, PgStoreError, Replica};
use runhook::store::{Batch, Failure, Finish, NewEvent, NewWork, now_ms};
use serde_json::value::RawValue;
use tokio::sync::broadcast;

use crate::pg_support::PgDatabase;
use crate::support::wait_for;

const RUN: &str = "9f2a1c7e-0000-4000-8000-000000000001";
const OTHER: &str = "9f2a1c7e-0000-4000-8000-000000000002";
const SINK: &str = "ops";
/// How long a notification may take to arrive.
const HEARING: Duration = Duration::from_secs(20);

async fn open(pg: &PgDatabase, node: &str, lease_ttl: Duration) -> PgStore {
    let replica = Replica {
        node: node.into(),
        lease_ttl,
        share_slack: 0,
    };
    PgStore::open(&pg.url(), replica)
        .await
        .expect("open the PostgreSQL store")
}

async fn subscribe(store: &PgStore, run: &str, labels: BTreeMap<String, String>) {
    store
        .subscribe(run.into(), labels, "watch", None)
        .await
        .expect("subscribe");
}

/// Subscribes to `runs` and claims them all on `store`.
async fn owned(store: &PgStore, runs: &[&str]) -> BTreeMap<String, Lease> {
    for run in runs {
        subscribe(store, run, BTreeMap::new()).await;
    }
    let leases = store.claim(runs.len()).await.expect("claim");
    assert_eq!(leases.len(), runs.len(), "{leases:?}");
    leases
        .into_iter()
        .map(|l| (l.run_id.to_string(), l))
        .collect()
}

fn batch(run: &str, sequences: impl IntoIterator<Item = i64>, sinks: &[&str]) -> Batch {
    Batch {
        run_id: run.into(),
        events: sequences
            .into_iter()
            .map(|sequence| NewEvent {
                sequence,
                event_type: "PHASE_STARTED".into(),
                payload: RawValue::from_string(format!("{{\"n\": {sequence}, \"x\":1.10}}"))
                    .expect("json"),
                created_at: None,
                sinks: sinks.iter().map(|s| Arc::from(*s)).collect(),
            })
            .collect(),
        run_status: Some("running".into()),
        phase: None,
        finish: None,
        stalled: None,
    }
}

fn finishing(run: &str, sequences: std::ops::RangeInclusive<i64>) -> Batch {
    Batch {
        run_status: Some("completed".into()),
        finish: Some(Finish {
            status: "completed".into(),
            error_message: None,
            cancel_reason: None,
            sinks: vec![Arc::from(SINK)],
        }),
        ..batch(run, sequences, &[SINK])
    }
}

fn failure(events: Vec<i64>, dead: bool) -> Failure {
    Failure {
        events,
        status: Some(500),
        error: "boom".into(),
        next_attempt_at: now_ms() + 60_000,
        dead,
    }
}

/// The pending delivery rows of a run for a sink, in order.
async fn pending_rows(store: &PgStore, sink: &str, run: &str) -> Vec<i64> {
    let pending = store
        .pending_for_run(sink, run, 100)
        .await
        .expect("pending");
    pending.iter().map(|p| p.event).collect()
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

async fn strings(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let rows = client.query(sql, &[]).await.expect(sql);
    rows.iter().map(|r| r.get(0)).collect()
}

/// Waits until the millisecond clock has passed `t`.
async fn clock_past(t: i64) {
    wait_for("the clock to move on", || async move {
        if now_ms() > t {
            Ok(())
        } else {
            Err(format!("still {t}"))
        }
    })
    .await;
}

/// The next notice on `work`, within [`HEARING`].
async fn heard(work: &mut broadcast::Receiver<NewWork>) -> NewWork {
    tokio::time::timeout(HEARING, work.recv())
        .await
        .expect("a notice within the deadline")
        .expect("the channel is open")
}

/// The commit counter moved, within [`HEARING`].
async fn bumped(commits: &mut tokio::sync::watch::Receiver<u64>) {
    tokio::time::timeout(HEARING, commits.changed())
        .await
        .expect("a bump within the deadline")
        .expect("the channel is open");
}

/// As `retention.rs`'s first test on SQLite: delivered rows and the events
/// nothing refers to go after the cutoff; a dead letter and a pending
/// delivery keep theirs; the cursor stays, so pruned events are not
/// ingested again; the newest cutoff is recorded, never an older one.
#[tokio::test]
async fn prune_drops_old_delivered_rows_and_unreferenced_events_only() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = open(&pg, "a", Duration::from_secs(60)).await;
    let leases = owned(&store, &[RUN]).await;
    let lease = &leases[RUN];
    store
        .record_batch(lease, batch(RUN, 1..=4, &[SINK]))
        .await
        .expect("record");
    let rows = pending_rows(&store, SINK, RUN).await;
    // 1 and 2 delivered, 3 dead, 4 still pending.
    store
        .mark_delivered(lease, SINK.into(), rows[..2].to_vec(), None)
        .await
        .expect("delivered");
    store
        .record_failure(lease, SINK.into(), failure(vec![rows[2]], true))
        .await
        .expect("dead");

    assert_eq!(store.prune(now_ms() - 60_000).await.expect("prune"), (0, 0));
    let cutoff = now_ms() + 60_000;
    assert_eq!(store.prune(cutoff).await.expect("prune"), (2, 2));
    let sinks = store.sinks().await.expect("sinks");
    assert_eq!((sinks[0].done, sinks[0].dead, sinks[0].pending), (0, 1, 1));
    let client = pg.client().await;
    assert_eq!(
        strings(&client, "SELECT id FROM events ORDER BY rowid").await,
        [format!("{RUN}:3"), format!("{RUN}:4")]
    );
    let pruned_before = "SELECT value FROM meta WHERE key = 'pruned_before'";
    assert_eq!(count(&client, pruned_before).await, cutoff);
    store.prune(cutoff - 1).await.expect("an older prune");
    assert_eq!(
        count(&client, pruned_before).await,
        cutoff,
        "an older cutoff does not move it back"
    );

    let again = store
        .record_batch(lease, batch(RUN, 1..=4, &[SINK]))
        .await
        .expect("again");
    assert_eq!((again.recorded, again.dropped, again.cursor), (0, 4, 4));
}

/// More rows than one chunk: every one is reached, chunk after chunk.
#[tokio::test]
async fn prune_reaches_every_row_past_one_chunk() {
    const EVENTS: i64 = 12_000;
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = open(&pg, "a", Duration::from_secs(60)).await;
    let leases = owned(&store, &[RUN]).await;
    let lease = &leases[RUN];
    for start in (1..=EVENTS).step_by(3_000) {
        store
            .record_batch(lease, batch(RUN, start..=start + 2_999, &[SINK]))
            .await
            .expect("record");
    }
    let all = store
        .pending_for_run(SINK, RUN, EVENTS as usize)
        .await
        .expect("pending");
    store
        .mark_delivered(
            lease,
            SINK.into(),
            all.iter().map(|p| p.event).collect(),
            None,
        )
        .await
        .expect("delivered");
    let (deliveries, events) = store.prune(now_ms() + 60_000).await.expect("prune");
    assert_eq!((deliveries, events), (EVENTS as usize, EVENTS as usize));
    let client = pg.client().await;
    assert_eq!(count(&client, "SELECT count(*) FROM events").await, 0);
    assert_eq!(count(&client, "SELECT count(*) FROM deliveries").await, 0);
}

/// Records `run` (finished or not) and leaves its deliveries as `leave`
/// says: all delivered, or its first event dead or pending.
async fn recorded(store: &PgStore, lease: &Lease, finish: bool, leave: &str) {
    let run = &*lease.run_id;
    let batch = if finish {
        finishing(run, 1..=1)
    } else {
        batch(run, 1..=1, &[SINK])
    };
    store.record_batch(lease, batch).await.expect("record");
    let rows = pending_rows(store, SINK, run).await;
    let (first, rest) = rows.split_at(1);
    let delivered = match leave {
        "delivered" => rows.clone(),
        "dead" => {
            store
                .record_failure(lease, SINK.into(), failure(first.to_vec(), true))
                .await
                .expect("dead");
            rest.to_vec()
        }
        _ => rest.to_vec(),
    };
    store
        .mark_delivered(lease, SINK.into(), delivered, None)
        .await
        .expect("delivered");
}

/// As SQLite's `prune_moves_only_old_finished_runs_with_nothing_left_to_deliver`:
/// a finished run past the cutoff with no event left becomes a tombstone
/// (cursor, status, finish) and its lease goes with it; a dead letter, a
/// pending delivery, a delivery done after the cutoff, a finish after it or
/// a run not finished keep the row.
#[tokio::test]
async fn the_runs_prune_moves_only_old_finished_runs_with_nothing_left() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = open(&pg, "a", Duration::from_secs(60)).await;
    let runs = [
        "done", "done2", "dead", "pending", "late", "running", "young",
    ];
    let leases = owned(&store, &runs).await;
    recorded(&store, &leases["done"], true, "delivered").await;
    recorded(&store, &leases["done2"], true, "pending").await;
    recorded(&store, &leases["dead"], true, "dead").await;
    recorded(&store, &leases["pending"], true, "pending").await;
    recorded(&store, &leases["late"], true, "pending").await;
    recorded(&store, &leases["running"], false, "delivered").await;
    clock_past(now_ms()).await;
    let cutoff = now_ms();
    clock_past(cutoff).await;
    recorded(&store, &leases["young"], true, "delivered").await;
    for run in ["late", "done2"] {
        let open = pending_rows(&store, SINK, run).await;
        store
            .mark_delivered(&leases[run], SINK.into(), open, None)
            .await
            .expect("delivered after the cutoff");
    }
    let client = pg.client().await;
    let control = "SELECT value FROM meta WHERE key = 'control'";
    let generation = count(&client, control).await;

    assert_eq!(store.prune_finished_runs(cutoff).await.expect("runs"), 0);
    store.prune(cutoff).await.expect("prune");
    assert_eq!(store.prune_finished_runs(cutoff).await.expect("runs"), 1);
    assert_eq!(
        strings(
            &client,
            "SELECT run_id FROM runs ORDER BY run_id COLLATE \"C\""
        )
        .await,
        ["dead", "done2", "late", "pending", "running", "young"]
    );
    let tombstone = client
        .query_one(
            "SELECT cursor, finished_seq, run_status, finished_at, pruned_at
             FROM pruned_runs WHERE run_id = 'done'",
            &[],
        )
        .await
        .expect("a tombstone");
    let (cursor, finished_seq, status): (i64, Option<i64>, Option<String>) =
        (tombstone.get(0), tombstone.get(1), tombstone.get(2));
    assert_eq!(
        (cursor, finished_seq, status.as_deref()),
        (1, Some(1), Some("completed"))
    );
    let (finished_at, pruned_at): (i64, i64) = (tombstone.get(3), tombstone.get(4));
    assert!(finished_at < cutoff && pruned_at >= cutoff);
    assert_eq!(
        count(&client, "SELECT count(*) FROM leases WHERE run_id = 'done'").await,
        0,
        "no replica claims a pruned run"
    );
    assert_eq!(
        count(&client, control).await,
        generation + 1,
        "run supervisors look again"
    );

    assert_eq!(store.prune_finished_runs(cutoff).await.expect("runs"), 0);
    assert_eq!(count(&client, "SELECT count(*) FROM pruned_runs").await, 1);
}

/// SQLite's single writer cannot run a batch while it prunes; here another
/// replica can. A batch in flight for a finished run (upstream retried it)
/// holds the run's row: the prune waits for it, then sees its event and
/// keeps the run, rather than deleting the row the batch just recorded
/// under.
#[tokio::test]
async fn a_batch_in_flight_keeps_its_run_from_the_runs_prune() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = open(&pg, "a", Duration::from_secs(60)).await;
    let leases = owned(&store, &["done"]).await;
    recorded(&store, &leases["done"], true, "delivered").await;
    clock_past(now_ms()).await;
    let cutoff = now_ms();
    store.prune(cutoff).await.expect("prune");

    // What record_batch does, held open: the run's row locked, an event in.
    let mut writer = pg.client().await;
    let batch = writer.transaction().await.expect("begin");
    batch
        .batch_execute(
            "SELECT cursor FROM runs WHERE run_id = 'done' FOR UPDATE;
             INSERT INTO events (id, run_id, sequence, event_type, payload, seen_at)
             VALUES ('done:2', 'done', 2, 'X', '{}', 0);",
        )
        .await
        .expect("a batch in flight");
    let pruning = tokio::spawn({
        let store = store.clone();
        async move { store.prune_finished_runs(cutoff).await }
    });
    let client = pg.client().await;
    wait_for("the prune to wait for the batch's lock", || async {
        let waiting = count(
            &client,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .await;
        if waiting > 0 {
            Ok(())
        } else {
            Err("no waiter".to_string())
        }
    })
    .await;
    batch.commit().await.expect("commit the batch");
    let pruned = pruning.await.expect("task").expect("prune runs");
    assert_eq!(pruned, 0, "the run has an event again");
    assert_eq!(
        count(&client, "SELECT count(*) FROM runs WHERE run_id = 'done'").await,
        1
    );
    assert_eq!(count(&client, "SELECT count(*) FROM pruned_runs").await, 0);
}

/// `status`'s sink rows as SQLite gives them (pending, retrying, done, dead,
/// down, last success; ordered byte for byte), and the oldest pending
/// delivery per sink in ingest order, in the order asked.
#[tokio::test]
async fn sink_rows_and_the_oldest_pending_read_as_on_sqlite() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = open(&pg, "a", Duration::from_secs(60)).await;
    let leases = owned(&store, &[RUN, OTHER]).await;
    store
        .record_batch(&leases[RUN], batch(RUN, 1..=3, &["a", "B"]))
        .await
        .expect("record");
    store
        .record_batch(&leases[OTHER], batch(OTHER, 1..=1, &["a"]))
        .await
        .expect("record the other");
    let a = pending_rows(&store, "a", RUN).await;
    let b = pending_rows(&store, "B", RUN).await;
    store
        .mark_delivered(&leases[RUN], "a".into(), vec![a[0]], None)
        .await
        .expect("delivered");
    store
        .record_failure(&leases[RUN], "a".into(), failure(vec![a[1]], false))
        .await
        .expect("retry");
    store
        .record_failure(&leases[RUN], "B".into(), failure(vec![b[0]], true))
        .await
        .expect("dead");
    store.set_sink_down("B".into(), true).await.expect("down");

    let rows = store.sinks().await.expect("sinks");
    let seen: Vec<_> = rows
        .iter()
        .map(|s| {
            (
                s.sink.as_str(),
                s.pending,
                s.retrying,
                s.done,
                s.dead,
                s.down,
                s.last_success_at.is_some(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("B", 2, 0, 0, 1, true, false),
            ("a", 3, 1, 1, 0, false, true),
        ]
    );
    store.set_sink_down("B".into(), false).await.expect("up");
    assert!(!store.sinks().await.expect("sinks")[0].down);

    // queued_at falls as the rows rise: the first in ingest order is the
    // one asked for, not the earliest queued.
    pg.client()
        .await
        .batch_execute("UPDATE deliveries SET queued_at = 1000000 - event")
        .await
        .expect("queued_at");
    let oldest = store
        .oldest_pending(vec!["nothing".into(), "a".into(), "B".into()])
        .await
        .expect("oldest");
    assert_eq!(
        oldest,
        [
            ("a".to_string(), 1_000_000 - a[1]),
            ("B".to_string(), 1_000_000 - b[1])
        ]
    );
    assert_eq!(store.sink_offset("a").await.expect("offset"), None);
    assert_eq!(store.sink_offset("nothing").await.expect("offset"), None);
}

/// As a file sink's start-up on SQLite: events found written past the
/// recorded offset are delivered (a dead letter among them too: the sink
/// has it) with the new offset, in one transaction; other sinks' rows and
/// rows already done are left alone.
#[tokio::test]
async fn found_deliveries_are_marked_done_with_the_offset() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = open(&pg, "a", Duration::from_secs(60)).await;
    let leases = owned(&store, &[RUN]).await;
    let lease = &leases[RUN];
    store
        .record_batch(lease, batch(RUN, 1..=4, &["archive", SINK]))
        .await
        .expect("record");
    let rows = pending_rows(&store, "archive", RUN).await;
    store
        .mark_delivered(lease, "archive".into(), vec![rows[0]], Some(100))
        .await
        .expect("delivered");
    store
        .record_failure(lease, "archive".into(), failure(vec![rows[1]], true))
        .await
        .expect("dead");
    let found = [1, 2, 3]
        .iter()
        .map(|n| format!("{RUN}:{n}"))
        .chain([format!("{OTHER}:9")])
        .collect();
    let archive = store
        .claim_sink("archive")
        .await
        .expect("claim")
        .expect("nobody holds the sink");
    let marked = store
        .mark_found_delivered(&archive, found, 1234)
        .await
        .expect("found");
    assert_eq!(
        marked, 2,
        "the dead 2 and the pending 3; 1 was done already"
    );
    assert_eq!(
        store.sink_offset("archive").await.expect("offset"),
        Some(1234)
    );
    let client = pg.client().await;
    let states = |sink: &'static str| {
        let client = &client;
        async move {
            client
                .query(
                    "SELECT state, attempts FROM deliveries WHERE sink = $1 ORDER BY event",
                    &[&sink],
                )
                .await
                .expect("deliveries")
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect::<Vec<(i16, i32)>>()
        }
    };
    assert_eq!(states("archive").await, [(1, 1), (1, 2), (1, 1), (0, 0)]);
    assert_eq!(states(SINK).await, [(0, 0); 4], "another sink's rows");
}

/// Slack thread roots in a cluster: the run's owner keeps them, any replica
/// reads them, and a replica that lost the run cannot replace the root the
/// new owner threads under.
#[tokio::test]
async fn a_thread_root_is_kept_only_by_the_runs_owner() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let ttl = Duration::from_millis(500);
    let a = open(&pg, "a", ttl).await;
    let b = open(&pg, "b", ttl).await;
    let old = owned(&a, &[RUN]).await.remove(RUN).expect("lease");
    let save = |store: &PgStore, lease: &Lease, run: &str, ts: &str| {
        let (store, lease) = (store.clone(), lease.clone());
        let (run, ts) = (run.to_string(), ts.to_string());
        async move {
            store
                .save_thread_root(&lease, "chat".into(), run, "C1".into(), ts)
                .await
        }
    };
    save(&a, &old, RUN, "1.1")
        .await
        .expect("the owner keeps it");
    let root = || async { b.thread_root("chat", RUN).await.expect("read") };
    assert_eq!(root().await, Some(("C1".into(), "1.1".into())));
    assert!(
        matches!(
            save(&a, &old, OTHER, "9.9").await,
            Err(PgStoreError::LeaseLost { .. })
        ),
        "a lease fences its own run only"
    );
    assert_eq!(b.thread_root("chat", OTHER).await.expect("read"), None);

    let new = wait_for("b to take the run over", || async {
        let claimed = b.claim(1).await.map_err(|e| e.to_string())?;
        claimed.into_iter().next().ok_or("not yet".to_string())
    })
    .await;
    let late = save(&a, &old, RUN, "2.2").await;
    assert!(
        matches!(late, Err(PgStoreError::LeaseLost { .. })),
        "{late:?}"
    );
    assert_eq!(root().await, Some(("C1".into(), "1.1".into())));
    save(&b, &new, RUN, "3.3").await.expect("the new owner");
    assert_eq!(root().await, Some(("C1".into(), "3.3".into())));
}

/// A sink's backlog across runs in ingest order (due or not), the runs it
/// has work for, and the counts, as SQLite reads them; payload bytes and
/// labels as stored.
#[tokio::test]
async fn backlog_reads_follow_ingest_order_across_runs() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = open(&pg, "a", Duration::from_secs(60)).await;
    let labels = BTreeMap::from([("team".to_string(), "rome".to_string())]);
    subscribe(&store, RUN, labels).await;
    subscribe(&store, OTHER, BTreeMap::new()).await;
    let leases: BTreeMap<String, Lease> = (store.claim(2).await.expect("claim"))
        .into_iter()
        .map(|l| (l.run_id.to_string(), l))
        .collect();
    let (run, other) = (&leases[RUN], &leases[OTHER]);
    store
        .record_batch(run, batch(RUN, 1..=2, &[SINK]))
        .await
        .expect("r");
    store
        .record_batch(other, batch(OTHER, 1..=2, &[SINK]))
        .await
        .expect("o");
    store
        .record_batch(run, batch(RUN, 3..=3, &[SINK, "archive"]))
        .await
        .expect("r3");
    let first = pending_rows(&store, SINK, RUN).await[0];
    store
        .record_failure(run, SINK.into(), failure(vec![first], false))
        .await
        .expect("not due for a minute");

    let ids = |pending: Vec<runhook::store::Pending>| -> Vec<String> {
        pending.into_iter().map(|p| p.id).collect()
    };
    let backlog = store.pending_in_order(SINK, 10).await.expect("backlog");
    assert_eq!(backlog[0].payload, r#"{"n": 1, "x":1.10}"#);
    assert_eq!(backlog[0].labels, r#"{"team":"rome"}"#);
    assert_eq!(backlog[0].attempts, 1, "due or not, the head comes first");
    assert_eq!(
        ids(backlog),
        [
            format!("{RUN}:1"),
            format!("{RUN}:2"),
            format!("{OTHER}:1"),
            format!("{OTHER}:2"),
            format!("{RUN}:3")
        ]
    );
    assert_eq!(store.pending_in_order(SINK, 2).await.expect("two").len(), 2);
    let mut runs = store.runs_with_pending(SINK).await.expect("runs");
    runs.sort();
    assert_eq!(runs, [RUN, OTHER]);
    assert_eq!(
        store.runs_with_pending("archive").await.expect("runs"),
        [RUN]
    );
    assert_eq!(store.pending_count(SINK).await.expect("count"), 5);
    assert_eq!(store.pending_total().await.expect("total"), 6);

    let others = pending_rows(&store, SINK, OTHER).await;
    store
        .mark_delivered(other, SINK.into(), others, None)
        .await
        .expect("delivered");
    assert_eq!(store.runs_with_pending(SINK).await.expect("runs"), [RUN]);
    assert_eq!(store.pending_count(SINK).await.expect("count"), 3);
    assert_eq!(store.pending_total().await.expect("total"), 4);
    assert_eq!(store.pending_count("nothing").await.expect("count"), 0);
}

/// `tail`: where it starts, and the events after a row, by run and type.
#[tokio::test]
async fn tail_reads_the_events_after_a_row_by_run_and_type() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = open(&pg, "a", Duration::from_secs(60)).await;
    assert_eq!(store.last_event_row().await.expect("empty"), 0);
    let leases = owned(&store, &[RUN, OTHER]).await;
    store
        .record_batch(&leases[RUN], batch(RUN, 1..=2, &[SINK]))
        .await
        .expect("r");
    store
        .record_batch(&leases[OTHER], finishing(OTHER, 1..=1))
        .await
        .expect("o");
    let all = store.events_after(0, None, None, 10).await.expect("all");
    let ids: Vec<&str> = all.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            format!("{RUN}:1"),
            format!("{RUN}:2"),
            format!("{OTHER}:1"),
            format!("{OTHER}:finished:1")
        ]
    );
    assert!(
        all.iter()
            .all(|p| p.attempts == 0 && p.queued_at == p.seen_at)
    );
    let last = store.last_event_row().await.expect("last");
    assert_eq!(last, all[3].event);
    assert!(
        store
            .events_after(last, None, None, 10)
            .await
            .expect("none")
            .is_empty()
    );
    let after_first = store
        .events_after(all[0].event, None, None, 2)
        .await
        .expect("2");
    assert_eq!(after_first.len(), 2);
    assert_eq!(after_first[0].id, format!("{RUN}:2"));
    let other = store
        .events_after(0, Some(OTHER.into()), None, 10)
        .await
        .expect("by run");
    assert_eq!(other.len(), 2);
    let finished = store
        .events_after(0, None, Some("run_finished".into()), 10)
        .await
        .expect("by type");
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].id, format!("{OTHER}:finished:1"));
}

/// Fails, at COMMIT, any transaction that recorded an event of `run`: a
/// batch that got through every statement (its NOTIFY too) and then rolled
/// back.
async fn refuse_at_commit(pg: &PgDatabase, run: &str) {
    let sql = format!(
        "CREATE FUNCTION refuse_run() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
            IF NEW.run_id = '{run}' THEN RAISE EXCEPTION 'refused at commit'; END IF;
            RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON events
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_run();"
    );
    pg.client()
        .await
        .batch_execute(&sql)
        .await
        .expect("trigger");
}

/// Another replica hears of work the moment it is committed (LISTEN/NOTIFY),
/// and hears nothing of a batch that rolled back, even one that rolled back
/// at COMMIT, after its NOTIFY was sent.
#[tokio::test]
async fn a_second_replica_hears_committed_work_and_nothing_rolled_back() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let a = open(&pg, "a", Duration::from_secs(60)).await;
    let b = open(&pg, "b", Duration::from_secs(60)).await;
    let leases = owned(&a, &[RUN, OTHER]).await;
    let mut commits = b.commits();
    let mut work = b.new_work();
    bumped(&mut commits).await; // b listens now
    refuse_at_commit(&pg, OTHER).await;

    let refused = a
        .record_batch(&leases[OTHER], batch(OTHER, 1..=2, &[SINK]))
        .await;
    assert!(refused.is_err(), "{refused:?}");
    a.record_batch(&leases[RUN], batch(RUN, 1..=2, &[SINK, "chat"]))
        .await
        .expect("record");
    // Notices arrive in commit order: had the refused batch's been sent,
    // it would come first.
    let notice = heard(&mut work).await;
    let sinks: Vec<&str> = notice.sinks.iter().map(|s| &**s).collect();
    assert_eq!((&*notice.run_id, sinks), (RUN, vec![SINK, "chat"]));
    bumped(&mut commits).await;
    assert!(work.try_recv().is_err(), "one notice for one commit");
}

/// Work committed while a store was not listening (before it first asked,
/// or while its connection was down) is named when it starts listening, so
/// no delivery loop waits on it; a lost listening connection comes back by
/// itself and bumps the counter.
#[tokio::test]
async fn a_listener_catches_up_on_what_it_missed_and_reconnects() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let a = open(&pg, "a", Duration::from_secs(60)).await;
    let b = open(&pg, "b", Duration::from_secs(60)).await;
    let leases = owned(&a, &[RUN, OTHER]).await;
    a.record_batch(&leases[RUN], batch(RUN, 1..=2, &[SINK]))
        .await
        .expect("record before b listens");
    let mut commits = b.commits();
    let mut work = b.new_work();
    let missed = heard(&mut work).await;
    assert_eq!(&*missed.run_id, RUN);
    bumped(&mut commits).await;

    let client = pg.client().await;
    let listeners =
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'runhook-listen'
         AND datname = current_database()";
    let terminated = count(
        &client,
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = 'runhook-listen' AND datname = current_database()) AS t",
    )
    .await;
    assert_eq!(terminated, 1, "b's one listening connection");
    bumped(&mut commits).await; // listening again
    wait_for("b to listen again", || async {
        match count(&client, listeners).await {
            1 => Ok(()),
            n => Err(format!("{n} listeners")),
        }
    })
    .await;
    // What it names again on reconnecting, then what is new.
    while work.try_recv().is_ok() {}
    a.record_batch(&leases[OTHER], batch(OTHER, 1..=1, &[SINK]))
        .await
        .expect("record after the reconnect");
    wait_for("b to hear the other run", || {
        let notice = work.try_recv();
        async move {
            match notice {
                Ok(n) if &*n.run_id == OTHER => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
}

/// A notice longer than NOTIFY carries (a run routed to very many sinks)
/// neither fails the batch nor goes unheard: it goes out empty, and each
/// listener looks for itself at every run with pending deliveries.
#[tokio::test]
async fn a_notice_too_long_for_notify_still_wakes_every_sink() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let a = open(&pg, "a", Duration::from_secs(60)).await;
    let b = open(&pg, "b", Duration::from_secs(60)).await;
    let leases = owned(&a, &[RUN]).await;
    let mut commits = b.commits();
    let mut work = b.new_work();
    bumped(&mut commits).await; // b listens now
    let names: Vec<String> = (0..400)
        .map(|n| format!("sink-with-a-long-name-{n:03}"))
        .collect();
    let sinks: Vec<&str> = names.iter().map(String::as_str).collect();
    a.record_batch(&leases[RUN], batch(RUN, 1..=1, &sinks))
        .await
        .expect("a batch routed to 400 sinks");
    let notice = heard(&mut work).await;
    assert_eq!(&*notice.run_id, RUN);
    let mut heard_sinks: Vec<&str> = notice.sinks.iter().map(|s| &**s).collect();
    heard_sinks.sort();
    assert_eq!(heard_sinks, sinks);
}
