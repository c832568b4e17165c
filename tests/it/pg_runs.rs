//! The PostgreSQL store's runs, dead letters and requeues against a real
//! server (`pg_support`), held to what the SQLite store promises for each
//! (`store/runs.rs`, `store/dead.rs`, `store/requeue.rs` and their tests),
//! plus what only several connections can break: a prune or an ingest
//! committing in the middle of an operator command. Without PostgreSQL
//! they pass after printing "skipped: no PostgreSQL".

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use runhook::store::pg::{Lease, PgStore, PgStoreError, Replica};
use runhook::store::{
    Backfilled, Batch, DeadFilter, Failure, NewEvent, PrunedRun, RequeueFilter, RunState,
    StoredEvent, Subscribed, TimeRange,
};
use serde_json::value::RawValue;

use crate::pg_support::PgDatabase;
use crate::support::wait_for;

const RUN: &str = "run-1";
const OTHER: &str = "run-2";
/// Rows one maintenance transaction touches (`store::retention`).
const CHUNK: usize = 5_000;

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

async fn store(pg: &PgDatabase) -> PgStore {
    open(pg, "a", Duration::from_secs(60)).await
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn subscribe_as(store: &PgStore, run: &str, origin: &'static str) -> Subscribed {
    store
        .subscribe(run.into(), labels(&[("team", "rome")]), origin, None)
        .await
        .expect("subscribe")
}

/// Events 1..=n of `run` with these types, each routed to `sinks`.
fn typed_batch(run: &str, first: i64, types: &[&str], sinks: &[&str]) -> Batch {
    Batch {
        run_id: run.into(),
        events: types
            .iter()
            .enumerate()
            .map(|(i, event_type)| NewEvent {
                sequence: first + i as i64,
                event_type: (*event_type).to_owned(),
                payload: RawValue::from_string(format!("{{\"n\":{i}}}")).expect("json"),
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

/// The lease of `store`'s node on `run`, claimed now (the only claimable one).
async fn claim(store: &PgStore, run: &str) -> Lease {
    let claimed = store.claim(1).await.expect("claim");
    assert_eq!(claimed.len(), 1, "one run to claim: {claimed:?}");
    assert_eq!(&*claimed[0].run_id, run);
    claimed[0].clone()
}

/// A store with `RUN` subscribed (labels team=rome), its lease, and events
/// 1..=types.len() recorded, each routed to `sinks`.
async fn with_events(pg: &PgDatabase, types: &[&str], sinks: &[&str]) -> (PgStore, Lease) {
    let store = store(pg).await;
    subscribe_as(&store, RUN, "watch").await;
    let lease = claim(&store, RUN).await;
    store
        .record_batch(&lease, typed_batch(RUN, 1, types, sinks))
        .await
        .expect("record");
    (store, lease)
}

/// What is committed, read past the store under test.
async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// The rowid of `{RUN}:{sequence}`.
async fn rowid(client: &tokio_postgres::Client, sequence: i64) -> i64 {
    let id = format!("{RUN}:{sequence}");
    client
        .query_one("SELECT rowid FROM events WHERE id = $1", &[&id])
        .await
        .expect("rowid")
        .get(0)
}

async fn rowids(client: &tokio_postgres::Client, sequences: &[i64]) -> Vec<i64> {
    let mut rows = Vec::new();
    for sequence in sequences {
        rows.push(rowid(client, *sequence).await);
    }
    rows
}

/// Event N of every run was seen at N seconds.
async fn seen_at_their_sequence(client: &tokio_postgres::Client) {
    client
        .execute("UPDATE events SET seen_at = sequence * 1000", &[])
        .await
        .expect("seen_at");
}

fn range(since_s: i64, until_s: i64) -> TimeRange {
    TimeRange {
        since: since_s * 1000,
        until: until_s * 1000,
    }
}

fn everything() -> TimeRange {
    TimeRange {
        since: 0,
        until: i64::MAX,
    }
}

async fn pending_ids(store: &PgStore, sink: &str, run: &str) -> Vec<String> {
    let pending = store
        .pending_for_run(sink, run, 100_000)
        .await
        .expect("pending");
    pending.into_iter().map(|p| p.id).collect()
}

async fn kill(store: &PgStore, lease: &Lease, sink: &str, events: Vec<i64>) {
    let failure = Failure {
        events,
        status: Some(500),
        error: "down".into(),
        next_attempt_at: 0,
        dead: true,
    };
    store
        .record_failure(lease, Arc::from(sink), failure)
        .await
        .expect("dead");
}

async fn generation(store: &PgStore) -> i64 {
    store.control_generation().await.expect("generation")
}

/// Until another session waits on a row lock: the command under test is
/// blocked behind the transaction the test holds open.
async fn someone_waits_on_a_lock(client: &tokio_postgres::Client) {
    wait_for("a session waiting on a lock", || async {
        let waiting = count(
            client,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .await;
        if waiting > 0 {
            Ok(())
        } else {
            Err("nobody waits".to_string())
        }
    })
    .await;
}

/// As retention leaves a finished run: its tombstone in, its row out.
const PRUNE_RUN: &str = "INSERT INTO pruned_runs
        (run_id, cursor, finished_seq, run_status, finished_at, pruned_at)
     SELECT run_id, cursor, finished_seq, 'completed', 1000, 2000 FROM runs WHERE run_id = $1";

// ---- runs -------------------------------------------------------------

/// As SQLite's `subscribe`: the cursor is kept, labels refreshed, and a run
/// stopped by a 403 or 404 gets another chance; every subscribe tells the
/// supervisors (control generation).
#[tokio::test]
async fn subscribing_again_keeps_the_cursor_and_gives_a_stopped_run_another_chance() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let (store, lease) = with_events(&pg, &["A"; 3], &["a"]).await;
    store
        .set_run_state(&lease, RunState::Forbidden, Some("403".into()), None)
        .await
        .expect("state");
    let before = generation(&store).await;
    let again = store
        .subscribe(RUN.into(), labels(&[("team", "oslo")]), "watch", None)
        .await
        .expect("subscribe");
    assert_eq!(again, Subscribed::Watching);
    assert!(
        generation(&store).await > before,
        "the supervisors look again"
    );
    let watched = store.watched_runs().await.expect("watched");
    assert_eq!(watched.len(), 1, "{watched:?}");
    let run = &watched[0];
    assert_eq!(
        (run.cursor, run.state, run.labels.clone()),
        (3, RunState::Starting, labels(&[("team", "oslo")])),
        "cursor kept, labels refreshed, stopped run restarted"
    );
    let rows = store.runs().await.expect("runs");
    assert_eq!(rows[0].last_error, None, "the 403 is forgotten");
    // A run that is working is left in its state.
    store
        .set_run_state(&lease, RunState::Following, None, None)
        .await
        .expect("state");
    subscribe_as(&store, RUN, "watch").await;
    let watched = store.watched_runs().await.expect("watched");
    assert_eq!(watched[0].state, RunState::Following);
}

/// The invariant "a pruned run stays pruned": subscribing to it (config,
/// `watch`, `PUT /v1/watch`) answers with its tombstone and creates no row
/// at cursor 0, and no lease that a replica would claim and ingest.
#[tokio::test]
async fn a_pruned_run_is_not_subscribed_again() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let (store, _lease) = with_events(&pg, &["A"; 3], &[]).await;
    let client = pg.client().await;
    client
        .batch_execute(&format!(
            "BEGIN; {}; DELETE FROM runs WHERE run_id = '{RUN}'; DELETE FROM events; COMMIT;",
            PRUNE_RUN.replace("$1", &format!("'{RUN}'"))
        ))
        .await
        .expect("prune");
    let before = generation(&store).await;
    let answer = subscribe_as(&store, RUN, "config").await;
    assert_eq!(
        answer,
        Subscribed::Pruned(PrunedRun {
            run_id: RUN.into(),
            cursor: 3,
            status: Some("completed".into()),
            finished_at: 1000,
            pruned_at: 2000,
        })
    );
    assert_eq!(count(&client, "SELECT count(*) FROM runs").await, 0);
    assert_eq!(count(&client, "SELECT count(*) FROM leases").await, 0);
    assert_eq!(generation(&store).await, before, "nothing changed");
    assert_eq!(
        store
            .pruned_run(RUN.into())
            .await
            .expect("pruned")
            .map(|p| p.cursor),
        Some(3)
    );
    assert_eq!(store.pruned_count().await.expect("count"), 1);
}

/// SQLite's single writer cannot prune between subscribe's tombstone read
/// and its insert; PostgreSQL can, on another connection. A prune that
/// commits while subscribe waits on it must still win.
#[tokio::test]
async fn a_subscribe_racing_a_prune_sees_the_tombstone() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let (store, _lease) = with_events(&pg, &["A"; 3], &[]).await;
    let mut pruner = pg.client().await;
    let prune = pruner.transaction().await.expect("begin");
    prune.execute(PRUNE_RUN, &[&RUN]).await.expect("tombstone");
    prune
        .execute("DELETE FROM runs WHERE run_id = $1", &[&RUN])
        .await
        .expect("delete the row");
    let subscribing = {
        let store = store.clone();
        tokio::spawn(async move { subscribe_as(&store, RUN, "watch").await })
    };
    let observer = pg.client().await;
    someone_waits_on_a_lock(&observer).await;
    prune.commit().await.expect("commit the prune");
    let answer = subscribing.await.expect("task");
    assert!(
        matches!(answer, Subscribed::Pruned(ref p) if p.cursor == 3),
        "{answer:?}"
    );
    assert_eq!(
        count(&observer, "SELECT count(*) FROM runs").await,
        0,
        "no row at cursor 0"
    );
}

#[tokio::test]
async fn unsubscribe_says_whether_the_run_was_known_and_keeps_its_row() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = store(&pg).await;
    subscribe_as(&store, RUN, "watch").await;
    let before = generation(&store).await;
    assert!(store.unsubscribe(RUN.into()).await.expect("unsubscribe"));
    assert!(generation(&store).await > before, "the follower is stopped");
    assert_eq!(store.watched_runs().await.expect("watched"), vec![]);
    let rows = store.runs().await.expect("runs");
    assert!(rows.len() == 1 && !rows[0].watched, "{rows:?}");
    assert!(!store.unsubscribe("nobody".into()).await.expect("unknown"));
    let client = pg.client().await;
    client
        .execute(
            "INSERT INTO pruned_runs (run_id, cursor, finished_at, pruned_at)
             VALUES ('gone', 5, 1, 2)",
            &[],
        )
        .await
        .expect("tombstone");
    assert!(
        store.unsubscribe("gone".into()).await.expect("pruned"),
        "a pruned run is known"
    );
}

#[tokio::test]
async fn config_runs_dropped_from_the_config_stop_being_watched_and_no_others() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = store(&pg).await;
    for run in ["c1", "c2", "c3"] {
        subscribe_as(&store, run, "config").await;
    }
    subscribe_as(&store, "w1", "watch").await;
    let before = generation(&store).await;
    store
        .unsubscribe_config_runs_except(vec!["c1".into(), "c3".into()])
        .await
        .expect("unsubscribe");
    let watched: Vec<String> = store
        .watched_runs()
        .await
        .expect("watched")
        .into_iter()
        .map(|r| r.run_id)
        .collect();
    assert_eq!(watched, ["c1", "c3", "w1"]);
    let after = generation(&store).await;
    assert!(after > before, "the supervisors look again");
    store
        .unsubscribe_config_runs_except(vec!["c1".into(), "c3".into()])
        .await
        .expect("again");
    assert_eq!(generation(&store).await, after, "nothing changed this time");
}

#[tokio::test]
async fn a_restart_retries_only_watched_runs_stopped_by_a_403_or_404() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = store(&pg).await;
    for run in ["forbidden", "not-found", "unwatched", "stalled"] {
        subscribe_as(&store, run, "watch").await;
    }
    let leases = store.claim(4).await.expect("claim");
    let lease = |run: &str| {
        leases
            .iter()
            .find(|l| &*l.run_id == run)
            .expect("lease")
            .clone()
    };
    for (run, state) in [
        ("forbidden", RunState::Forbidden),
        ("not-found", RunState::NotFound),
        ("unwatched", RunState::NotFound),
        ("stalled", RunState::Stalled),
    ] {
        store
            .set_run_state(&lease(run), state, Some("why".into()), None)
            .await
            .expect("state");
    }
    store
        .unsubscribe("unwatched".into())
        .await
        .expect("unwatch");
    assert_eq!(store.retry_stopped_runs().await.expect("retry"), 2);
    let states: Vec<(String, RunState)> = store
        .runs()
        .await
        .expect("runs")
        .into_iter()
        .map(|r| (r.run_id, r.state))
        .collect();
    assert_eq!(
        states,
        [
            ("forbidden".into(), RunState::Starting),
            ("not-found".into(), RunState::Starting),
            ("stalled".into(), RunState::Stalled),
            ("unwatched".into(), RunState::NotFound),
        ]
    );
}

/// What the owner reports is fenced: after a takeover the old owner's state
/// and lag are refused, and the new owner's stand.
#[tokio::test]
async fn run_state_and_upstream_sequence_come_only_from_the_lease_holder() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let (a, old) = with_events(&pg, &["A"; 3], &[]).await;
    let b = open(&pg, "b", Duration::from_secs(60)).await;
    a.release(std::slice::from_ref(&old))
        .await
        .expect("release");
    let new = claim(&b, RUN).await;
    b.set_run_state(&new, RunState::Reconnecting, Some("eof".into()), None)
        .await
        .expect("b's state");
    b.set_upstream_seq(&new, 10).await.expect("b's lag");
    let refused = a.set_run_state(&old, RunState::Following, None, None).await;
    assert!(
        matches!(refused, Err(PgStoreError::LeaseLost { .. })),
        "{refused:?}"
    );
    let refused = a.set_upstream_seq(&old, 99).await;
    assert!(
        matches!(refused, Err(PgStoreError::LeaseLost { .. })),
        "{refused:?}"
    );
    let row = b.runs().await.expect("runs").remove(0);
    assert_eq!(
        (row.state, row.last_error.as_deref(), row.lag),
        (RunState::Reconnecting, Some("eof"), Some(7)),
        "b's report stands: lag = 10 - cursor 3"
    );
}

/// Issue 14: `status` shows which replica owns each run and its last
/// heartbeat; a lease past its expiry is nobody's.
#[tokio::test]
async fn runs_show_the_owner_of_a_live_lease_and_its_heartbeat() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let a = open(&pg, "a", Duration::from_secs(1)).await;
    subscribe_as(&a, RUN, "watch").await;
    subscribe_as(&a, OTHER, "watch").await;
    a.heartbeat().await.expect("heartbeat");
    let lease = a.claim(1).await.expect("claim").remove(0);
    let rows = a.runs().await.expect("runs");
    let owner = rows[0].owner.clone().expect("an owner");
    assert_eq!((owner.node.as_str(), owner.epoch), ("a", lease.epoch));
    let heartbeat = owner.heartbeat_at.expect("a heartbeat");
    let now = runhook::store::now_ms();
    assert!(
        (now - heartbeat).abs() < 60_000,
        "heartbeat {heartbeat} in unix ms, now {now}"
    );
    assert_eq!(rows[1].owner, None, "{OTHER} is unclaimed");
    let json = serde_json::to_value(&rows[1]).expect("json");
    assert!(json.get("owner").is_none(), "no owner key: {json}");
    wait_for("the unrenewed lease to expire", || async {
        match a.runs().await.map_err(|e| e.to_string())?.remove(0).owner {
            None => Ok(()),
            Some(owner) => Err(format!("{owner:?}")),
        }
    })
    .await;
}

// ---- dead letters -----------------------------------------------------

/// Ported from `dead_and_replay_filter_by_sink_run_and_id_and_purge_for_good`:
/// `dead` filters by sink and run, `replay` by sink, run and id, queued
/// again under the same ids with fresh attempts; `purge` deletes for good.
#[tokio::test]
async fn dead_letters_filter_replay_under_the_same_ids_and_purge_for_good() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = store(&pg).await;
    subscribe_as(&store, RUN, "watch").await;
    subscribe_as(&store, OTHER, "watch").await;
    let leases = store.claim(2).await.expect("claim");
    let client = pg.client().await;
    for lease in &leases {
        store
            .record_batch(lease, typed_batch(&lease.run_id, 1, &["A"; 2], &["a", "b"]))
            .await
            .expect("record");
        let events: Vec<i64> = store
            .pending_for_run("a", &lease.run_id, 10)
            .await
            .expect("pending")
            .iter()
            .map(|p| p.event)
            .collect();
        kill(&store, lease, "a", events.clone()).await;
        kill(&store, lease, "b", events).await;
    }
    let pairs = |letters: Vec<runhook::store::DeadLetter>| -> Vec<(String, String)> {
        letters.into_iter().map(|l| (l.sink, l.id)).collect()
    };
    let pair = |sink: &str, id: &str| (sink.to_owned(), id.to_owned());
    assert_eq!(store.dead_letters(None, None).await.expect("dead").len(), 8);
    assert_eq!(
        pairs(
            store
                .dead_letters(Some("b".into()), Some(OTHER.into()))
                .await
                .expect("dead")
        ),
        [pair("b", "run-2:1"), pair("b", "run-2:2")]
    );
    let letter = store
        .dead_letters(None, None)
        .await
        .expect("dead")
        .remove(0);
    assert_eq!(
        (
            letter.attempts,
            letter.last_status,
            letter.last_error.as_deref()
        ),
        (1, Some(500), Some("down"))
    );
    assert!(letter.dead_at.is_some());

    let before = generation(&store).await;
    let one = DeadFilter {
        sink: Some("a".into()),
        run: None,
        id: Some("run-1:2".into()),
    };
    assert_eq!(store.replay(one).await.expect("replay"), 1);
    assert!(
        generation(&store).await > before,
        "the delivery loops look again"
    );
    let pending = store.pending_for_run("a", RUN, 10).await.expect("pending");
    assert_eq!(
        pending
            .iter()
            .map(|p| (p.id.as_str(), p.attempts))
            .collect::<Vec<_>>(),
        [("run-1:2", 0)],
        "the same id, fresh attempts"
    );
    let of_run = DeadFilter {
        run: Some(OTHER.into()),
        ..DeadFilter::default()
    };
    assert_eq!(store.replay(of_run).await.expect("replay"), 4);
    assert_eq!(
        pending_ids(&store, "b", OTHER).await,
        ["run-2:1", "run-2:2"]
    );

    let of_b = DeadFilter {
        sink: Some("b".into()),
        ..DeadFilter::default()
    };
    assert_eq!(store.purge_dead(of_b).await.expect("purge"), 2);
    assert_eq!(
        pairs(store.dead_letters(None, None).await.expect("dead")),
        [pair("a", "run-1:1")]
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM deliveries WHERE sink = 'b'").await,
        2,
        "b's pending ones are not dead letters: kept"
    );
    assert_eq!(
        store
            .purge_dead(DeadFilter::default())
            .await
            .expect("purge"),
        1
    );
    assert!(
        store
            .dead_letters(None, None)
            .await
            .expect("dead")
            .is_empty()
    );
}

/// Replay and purge go a chunk per transaction and must not stop after
/// the first.
#[tokio::test]
async fn replay_and_purge_go_past_one_chunk() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let n = CHUNK + 7;
    let (store, _lease) = with_events(&pg, &vec!["A"; n], &["a", "b"]).await;
    let client = pg.client().await;
    client
        .execute("UPDATE deliveries SET state = 2, done_at = 1", &[])
        .await
        .expect("all dead");
    let of = |sink: &str| DeadFilter {
        sink: Some(sink.into()),
        ..DeadFilter::default()
    };
    assert_eq!(store.replay(of("a")).await.expect("replay"), n);
    let pending = store
        .pending_for_run("a", RUN, n + 1)
        .await
        .expect("pending");
    assert_eq!(pending.len(), n, "every letter queued");
    assert_eq!(store.purge_dead(of("b")).await.expect("purge"), n);
    assert_eq!(
        count(&client, "SELECT count(*) FROM deliveries WHERE sink = 'b'").await,
        0
    );
}

// ---- by time ----------------------------------------------------------

/// Ported from SQLite's test of the same name.
#[tokio::test]
async fn requeue_range_takes_dead_letters_and_delivered_ones_only_when_asked() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let (store, lease) = with_events(&pg, &["A"; 5], &["a"]).await;
    let client = pg.client().await;
    seen_at_their_sequence(&client).await;
    let r = rowids(&client, &[1, 2, 3, 4, 5]).await;
    // 1 done (out of range), 2 dead, 3 pending with an attempt, 4 done,
    // 5 dead (out of range).
    store
        .mark_delivered(&lease, Arc::from("a"), vec![r[0], r[3]], None)
        .await
        .expect("delivered");
    kill(&store, &lease, "a", vec![r[1], r[4]]).await;
    let retry = Failure {
        events: vec![r[2]],
        status: Some(503),
        error: "busy".into(),
        next_attempt_at: 0,
        dead: false,
    };
    store
        .record_failure(&lease, Arc::from("a"), retry)
        .await
        .expect("retry");
    let filter = |delivered| RequeueFilter {
        range: range(2, 5),
        sink: None,
        run: None,
        delivered,
    };
    let before = generation(&store).await;
    assert_eq!(
        store.requeue_range(filter(false)).await.expect("requeue"),
        1
    );
    assert!(generation(&store).await > before);
    assert_eq!(pending_ids(&store, "a", RUN).await, ["run-1:2", "run-1:3"]);
    assert_eq!(store.requeue_range(filter(true)).await.expect("requeue"), 1);
    let pending = store.pending_for_run("a", RUN, 10).await.expect("pending");
    let ids: Vec<&str> = pending.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["run-1:2", "run-1:3", "run-1:4"], "in event order");
    assert_eq!(
        pending[1].attempts, 1,
        "a pending delivery is left as it was"
    );
    assert_eq!(pending[0].attempts, 0, "a requeued one starts afresh");
    let dead = store.dead_letters(None, None).await.expect("dead");
    assert_eq!(dead.len(), 1, "event 5 was seen after the range: {dead:?}");
}

/// Ported from SQLite's test of the same name.
#[tokio::test]
async fn requeue_range_keeps_to_the_sink_and_run_asked_for() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let (store, lease) = with_events(&pg, &["A"; 2], &["a", "b"]).await;
    let client = pg.client().await;
    let r = rowids(&client, &[1, 2]).await;
    kill(&store, &lease, "a", r.clone()).await;
    kill(&store, &lease, "b", r).await;
    let only = |sink: &str, run: &str| RequeueFilter {
        range: everything(),
        sink: Some(sink.into()),
        run: Some(run.into()),
        delivered: false,
    };
    assert_eq!(
        store.requeue_range(only("a", OTHER)).await.expect("none"),
        0
    );
    assert_eq!(store.requeue_range(only("a", RUN)).await.expect("a"), 2);
    let replayed = store.replay(DeadFilter::default()).await.expect("replay");
    assert_eq!(replayed, 2, "b's dead letters were left alone");
}

/// Replicas stamp `seen_at` with their own clocks and commit rowids out of
/// order across runs, so an event of the range may come after one seen
/// past its end: SQLite's walk may stop there, this one must not.
#[tokio::test]
async fn requeue_range_finds_an_event_of_the_range_past_a_later_one() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let (store, lease) = with_events(&pg, &["A"; 3], &["a"]).await;
    let client = pg.client().await;
    let r = rowids(&client, &[1, 2, 3]).await;
    // 2 was stamped by a clock ahead: past the range; 3 in it.
    client
        .execute(
            "UPDATE events SET seen_at = CASE sequence WHEN 2 THEN 9000 ELSE 1000 END",
            &[],
        )
        .await
        .expect("seen_at");
    kill(&store, &lease, "a", r).await;
    let filter = RequeueFilter {
        range: range(0, 5),
        sink: None,
        run: None,
        delivered: false,
    };
    assert_eq!(store.requeue_range(filter).await.expect("requeue"), 2);
    assert_eq!(pending_ids(&store, "a", RUN).await, ["run-1:1", "run-1:3"]);
}

/// Ported from SQLite's test of the same name.
#[tokio::test]
async fn backfill_queues_what_routing_picks_once_in_event_order() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let (store, lease) = with_events(&pg, &["A", "B", "A", "A", "B", "A"], &["old"]).await;
    let client = pg.client().await;
    seen_at_their_sequence(&client).await;
    let wants_a = |event: &StoredEvent| {
        event.event_type == "A" && event.labels.get("team").map(String::as_str) == Some("rome")
    };
    let before = generation(&store).await;
    let queued = store
        .backfill(Arc::from("new"), range(2, 6), None, wants_a)
        .await
        .expect("backfill")
        .queued;
    assert_eq!(queued, 2, "events 3 and 4: A, seen in the range");
    assert!(generation(&store).await > before);
    assert_eq!(
        pending_ids(&store, "new", RUN).await,
        ["run-1:3", "run-1:4"]
    );
    // Again over a wider range: 3 and 4 are not doubled, 6 joins; 1 is
    // left out, as the sink has later events of its run already (3 was
    // sent): sent now, it would come after them.
    let third = rowid(&client, 3).await;
    store
        .mark_delivered(&lease, Arc::from("new"), vec![third], None)
        .await
        .expect("delivered");
    let done = store
        .backfill(Arc::from("new"), range(0, 7), None, wants_a)
        .await
        .expect("backfill");
    assert_eq!(
        done,
        Backfilled {
            queued: 1,
            skipped: 1,
            before_prune: 0
        }
    );
    assert_eq!(
        pending_ids(&store, "new", RUN).await,
        ["run-1:4", "run-1:6"]
    );
    let none = store
        .backfill(Arc::from("new"), range(0, 7), Some(OTHER.into()), wants_a)
        .await
        .expect("backfill");
    assert_eq!(none, Backfilled::default(), "another run");
}

/// Ported from `backfill_counts_only_rowless_events_as_before_the_prune`
/// and `backfill_does_not_resend_what_the_sink_received_before_retention_
/// pruned_its_rows` (the prune done by hand, as retention leaves it: the
/// cutoff noted, delivered rows gone).
#[tokio::test]
async fn backfill_leaves_out_events_recorded_before_the_prune_cutoff() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let (store, lease) = with_events(&pg, &["A", "A", "A"], &["a", "ops"]).await;
    let client = pg.client().await;
    let r = rowids(&client, &[1, 2, 3]).await;
    // `a` received all three; `ops` dead-lettered 1 and received 2 and 3.
    store
        .mark_delivered(&lease, Arc::from("a"), r.clone(), None)
        .await
        .expect("delivered");
    kill(&store, &lease, "ops", vec![r[0]]).await;
    store
        .mark_delivered(&lease, Arc::from("ops"), vec![r[1], r[2]], None)
        .await
        .expect("delivered");
    let cutoff = runhook::store::now_ms() + 60_000;
    client
        .execute(
            "INSERT INTO meta (key, value) VALUES ('pruned_before', $1)",
            &[&cutoff],
        )
        .await
        .expect("cutoff");
    client
        .batch_execute(
            "DELETE FROM deliveries WHERE state = 1;
             DELETE FROM events e WHERE NOT EXISTS
                (SELECT 1 FROM deliveries d WHERE d.event = e.rowid);",
        )
        .await
        .expect("prune");
    // Event 1 stays for ops's dead letter: `a` has no row for it any more,
    // but received it; ops has its dead letter, which is not a guess.
    let for_a = store
        .backfill(Arc::from("a"), everything(), None, |_| true)
        .await
        .expect("backfill a");
    assert_eq!(
        for_a,
        Backfilled {
            queued: 0,
            skipped: 0,
            before_prune: 1
        }
    );
    let for_ops = store
        .backfill(Arc::from("ops"), everything(), None, |_| true)
        .await
        .expect("backfill ops");
    assert_eq!(for_ops, Backfilled::default(), "r:1 is ops's dead letter");
    assert_eq!(pending_ids(&store, "a", RUN).await, Vec::<String>::new());
}

/// Ported from `backfill_keeps_per_run_order_for_a_sink_that_went_live_first`.
#[tokio::test]
async fn backfill_leaves_out_what_would_follow_a_later_event_of_its_run() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let (store, lease) = with_events(&pg, &["A", "A"], &["a"]).await;
    store
        .record_batch(&lease, typed_batch(RUN, 3, &["A"], &["a", "late"]))
        .await
        .expect("live");
    let sent = store.pending_for_run("late", RUN, 10).await.expect("late");
    assert_eq!(sent.len(), 1);
    store
        .mark_delivered(&lease, Arc::from("late"), vec![sent[0].event], None)
        .await
        .expect("sent");
    let done = store
        .backfill(Arc::from("late"), everything(), None, |_| true)
        .await
        .expect("backfill");
    assert_eq!((done.queued, done.skipped), (0, 2), "1 and 2 left out");
    assert_eq!(pending_ids(&store, "late", RUN).await, Vec::<String>::new());
}

/// An ingest of the run in flight (its row locked, a later event's
/// delivery for the sink not yet committed) must not slip between the
/// backfill's look at the sink's rows and its insert: the later event would
/// be sent before the older ones queued behind it.
#[tokio::test]
async fn backfill_waits_for_an_ingest_of_the_run_in_flight() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let (store, _lease) = with_events(&pg, &["A", "A", "A"], &["a"]).await;
    let mut ingest = pg.client().await;
    let third = rowid(&ingest, 3).await;
    let tx = ingest.transaction().await.expect("begin");
    // What record_batch does: the run's row locked, then its deliveries.
    tx.execute(
        "SELECT cursor FROM runs WHERE run_id = $1 FOR UPDATE",
        &[&RUN],
    )
    .await
    .expect("lock the run");
    tx.execute(
        "INSERT INTO deliveries (sink, event, run_id, next_attempt_at, queued_at)
         VALUES ('new', $1, $2, 0, 0)",
        &[&third, &RUN],
    )
    .await
    .expect("a live delivery");
    let backfilling = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .backfill(Arc::from("new"), everything(), None, |_| true)
                .await
        })
    };
    let observer = pg.client().await;
    someone_waits_on_a_lock(&observer).await;
    tx.commit().await.expect("commit the ingest");
    let done = backfilling.await.expect("task").expect("backfill");
    assert_eq!(
        done,
        Backfilled {
            queued: 0,
            skipped: 2,
            before_prune: 0
        },
        "1 and 2 would follow 3"
    );
}

/// Ported from SQLite's `backfill_and_requeue_walk_past_one_chunk`.
#[tokio::test]
async fn backfill_and_requeue_walk_past_one_chunk() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let n = CHUNK + 7;
    let (store, lease) = with_events(&pg, &vec!["A"; n], &["a"]).await;
    let queued = store
        .backfill(Arc::from("b"), everything(), None, |_| true)
        .await
        .expect("backfill")
        .queued;
    assert_eq!(queued, n);
    let rows: Vec<i64> = store
        .pending_for_run("b", RUN, n + 1)
        .await
        .expect("pending")
        .iter()
        .map(|p| p.event)
        .collect();
    store
        .mark_delivered(&lease, Arc::from("b"), rows, None)
        .await
        .expect("delivered");
    let filter = RequeueFilter {
        range: everything(),
        sink: Some("b".into()),
        run: None,
        delivered: true,
    };
    assert_eq!(store.requeue_range(filter).await.expect("requeue"), n);
}
