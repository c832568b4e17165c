//! The store's promises, held on both backends through the one interface
//! ([`State`]): each test body runs once on SQLite in a temp dir and once on
//! a throwaway PostgreSQL server (skipped, saying so, where none is
//! installed; `RUNHOOK_REQUIRE_PG=1` makes that a failure). On PostgreSQL the
//! body's data-path writes carry a lease on their run, claimed for it.
//!
//! Ported from `src/store/record_tests.rs`, `src/store/requeue.rs` and
//! `src/store/retention.rs` (those stay: they also reach SQLite internals
//! the copies cannot). Not ported: `tests/it/store.rs` (SQLite's write lock
//! and busy timeout, the daemon lock, and a daemon-level file sink test),
//! the SQL-plan and state-number tests (SQLite's `EXPLAIN QUERY PLAN`,
//! `states.rs`), `the_writer_syncs_every_commit` (a SQLite pragma; the
//! PostgreSQL test server's fsync is checked in `pg.rs`) and
//! `the_runs_prune_walks_every_run_in_chunks` (it counts the SQLite writer's
//! group commits; PostgreSQL's `commits` only changes on queued work).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runhook::store::pg::{Lease, Replica};
use runhook::store::{
    Backfilled, Batch, DeadFilter, Failure, Fence, Finish, Location, MAINTENANCE_CHUNK, NewEvent,
    NewWork, Recorded, RequeueFilter, State, StateError, StoredEvent, Subscribed, TimeRange,
    now_ms,
};
use serde_json::value::RawValue;
use tokio::sync::broadcast;

use crate::pg_support::PgDatabase;
use crate::support::{OnBackend, on_both};

/// One backend under test, and what the body needs to drive it alike.
pub struct Backend {
    /// Dropped first: the store goes before its server or directory.
    pub state: State,
    place: Place,
    /// PostgreSQL: the leases claimed so far, by run.
    leases: Mutex<BTreeMap<String, Lease>>,
}

enum Place {
    Sqlite {
        path: PathBuf,
        _dir: tempfile::TempDir,
    },
    Postgres(PgDatabase),
}

impl Backend {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let location = Location::Sqlite(path.clone());
        let state = State::open(&location, replica()).await.unwrap();
        Self {
            state,
            place: Place::Sqlite { path, _dir: dir },
            leases: Mutex::default(),
        }
    }

    async fn postgres(server: PgDatabase) -> Self {
        let location = Location::Postgres(server.url());
        let state = State::open(&location, replica()).await.unwrap();
        // Notifications sent before the listener listens are lost: wait for
        // it (it bumps `commits` once it listens), so every body starts
        // hearing from its first write on, as on SQLite.
        let mut commits = state.commits();
        tokio::time::timeout(Duration::from_secs(30), commits.changed())
            .await
            .expect("the PostgreSQL listener listens within 30 s")
            .unwrap();
        Self {
            state,
            place: Place::Postgres(server),
            leases: Mutex::default(),
        }
    }

    fn is_postgres(&self) -> bool {
        matches!(self.place, Place::Postgres(_))
    }

    /// What the owner of `run` passes with its writes: nothing on SQLite
    /// (the daemon lock), the run's lease on PostgreSQL (claimed here the
    /// first time; the run must be subscribed).
    pub async fn fence(&self, run: &str) -> Fence {
        let Some(pg) = self.state.postgres() else {
            return Fence::Exclusive;
        };
        if let Some(lease) = self.lease(run) {
            return Fence::Lease(lease);
        }
        let claimed = pg.claim(10_000).await.unwrap();
        let mut leases = self.leases.lock().unwrap();
        for lease in claimed {
            leases.insert(lease.run_id.to_string(), lease);
        }
        let lease = leases.get(run).cloned();
        Fence::Lease(lease.unwrap_or_else(|| panic!("no lease claimable for {run}")))
    }

    fn lease(&self, run: &str) -> Option<Lease> {
        self.leases.lock().unwrap().get(run).cloned()
    }

    /// Runs `sql` on the database directly, behind the store's back: test
    /// set-up the interface rightly has no operation for.
    pub async fn sql(&self, sql: &str) {
        match &self.place {
            Place::Sqlite { path, .. } => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
                conn.execute_batch(sql).unwrap();
            }
            Place::Postgres(server) => server.client().await.batch_execute(sql).await.unwrap(),
        }
    }
}

impl OnBackend for Backend {
    async fn on(backend: crate::support::Backend) -> Self {
        match backend {
            crate::support::Backend::Sqlite => Self::sqlite().await,
            crate::support::Backend::Postgres(db) => Self::postgres(db).await,
        }
    }
}

fn replica() -> Replica {
    Replica {
        node: "test-node".into(),
        // Far longer than any test: a lease never expires under a body.
        lease_ttl: Duration::from_secs(600),
        share_slack: 10_000,
    }
}

// ---- recording (from src/store/record_tests.rs) ----

const RUN: &str = "run-1";
/// A second run whose batch marks a point in the stream of announcements.
const MARKER: &str = "zz-marker";

async fn with_run(b: &Backend, run: &str, labels: BTreeMap<String, String>) {
    b.state
        .subscribe(run.into(), labels, "watch", None)
        .await
        .unwrap();
}

fn event(sequence: i64, sinks: &[&str]) -> NewEvent {
    NewEvent {
        sequence,
        event_type: "STEP".into(),
        payload: RawValue::from_string(format!(r#"{{"n":{sequence}}}"#)).unwrap(),
        created_at: None,
        sinks: names(sinks),
    }
}

fn batch_of(run: &str, events: Vec<NewEvent>, finish: Option<Finish>) -> Batch {
    Batch {
        run_id: run.into(),
        events,
        run_status: Some("running".into()),
        phase: None,
        finish,
        stalled: None,
    }
}

fn batch(events: Vec<NewEvent>, finish: Option<Finish>) -> Batch {
    batch_of(RUN, events, finish)
}

fn failed(sinks: &[&str]) -> Finish {
    Finish {
        status: "failed".into(),
        error_message: Some("boom".into()),
        cancel_reason: None,
        sinks: names(sinks),
    }
}

fn names(names: &[&str]) -> Vec<Arc<str>> {
    names.iter().map(|s| Arc::from(*s)).collect()
}

async fn record(b: &Backend, batch: Batch) -> Recorded {
    let fence = b.fence(&batch.run_id).await;
    b.state.record_batch(&fence, batch).await.unwrap()
}

/// Every event recorded for `RUN`, as (id, sequence, payload).
async fn recorded_events(b: &Backend) -> Vec<(String, Option<i64>, String)> {
    b.state
        .events_after(0, Some(RUN.into()), None, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.sequence, e.payload))
        .collect()
}

/// The next announcement, within a deadline: PostgreSQL's arrive through
/// the listening connection, after the commit.
async fn next_work(work: &mut broadcast::Receiver<NewWork>) -> NewWork {
    tokio::time::timeout(Duration::from_secs(10), work.recv())
        .await
        .expect("an announcement within 10 s")
        .unwrap()
}

/// Records a batch of another run and asserts its announcement is the next
/// one heard: whatever was to be announced before it has been, so nothing
/// else was (announcements arrive in commit order on both backends).
async fn next_is_the_marker(b: &Backend, work: &mut broadcast::Receiver<NewWork>) {
    with_run(b, MARKER, BTreeMap::new()).await;
    record(b, batch_of(MARKER, vec![event(1, &["marker"])], None)).await;
    let heard = next_work(work).await;
    assert_eq!(
        (&*heard.run_id, heard.sinks),
        (MARKER, names(&["marker"])),
        "nothing announced between"
    );
}

on_both! {
    /// Delivery loops wake on this announcement rather than scanning the
    /// table: a batch that queued deliveries must name its run and each
    /// sink it queued for, once.
    async fn a_batch_that_queues_deliveries_announces_its_run_and_each_sink_once(b: &Backend) {
        with_run(b, RUN, BTreeMap::new()).await;
        let mut work = b.state.new_work();
        let recorded = record(b, batch(vec![event(1, &["ops", "chat"]), event(2, &["chat"])], None)).await;
        assert_eq!(recorded.routed, names(&["ops", "chat"]));
        let heard = next_work(&mut work).await;
        assert_eq!(&*heard.run_id, RUN);
        assert_eq!(heard.sinks, names(&["ops", "chat"]));
        next_is_the_marker(b, &mut work).await;
    }
}

on_both! {
    /// Nothing queued, nothing announced: an empty announcement would wake
    /// every delivery loop of the run for nothing.
    async fn a_batch_that_routes_nowhere_announces_nothing(b: &Backend) {
        with_run(b, RUN, BTreeMap::new()).await;
        let mut work = b.state.new_work();
        let recorded = record(b, batch(vec![event(1, &[])], None)).await;
        assert_eq!(recorded.recorded, 1, "the event is recorded all the same");
        assert!(recorded.routed.is_empty());
        next_is_the_marker(b, &mut work).await;
        assert_eq!(recorded_events(b).await.len(), 1);
    }
}

on_both! {
    /// DESIGN.md guarantee 1: an event whose sequence is not above the
    /// cursor is dropped whatever the server sent, and counted as dropped,
    /// while the new ones are recorded and counted.
    async fn events_at_or_below_the_cursor_are_dropped_and_counted(b: &Backend) {
        with_run(b, RUN, BTreeMap::new()).await;
        let first = record(b, batch(vec![event(1, &["ops"]), event(2, &["ops"]), event(3, &["ops"])], None)).await;
        assert_eq!(first, Recorded { cursor: 3, recorded: 3, dropped: 0, routed: names(&["ops"]) });
        // The server sends 2 and 3 again, then 4 and 5.
        let again = record(
            b,
            batch(vec![event(2, &["ops"]), event(3, &["ops"]), event(4, &["ops"]), event(5, &["ops"])], None),
        )
        .await;
        assert_eq!(again, Recorded { cursor: 5, recorded: 2, dropped: 2, routed: names(&["ops"]) });
        let ids: Vec<String> = recorded_events(b).await.into_iter().map(|(id, _, _)| id).collect();
        let expected: Vec<String> = (1..=5).map(|n| format!("{RUN}:{n}")).collect();
        assert_eq!(ids, expected, "each event once, in order");
        let pending = b.state.pending_for_run("ops", RUN, 100).await.unwrap();
        assert_eq!(pending.len(), 5, "one delivery per event");
    }
}

on_both! {
    /// A whole batch already recorded (a page fetched twice) changes
    /// nothing and says so: nothing recorded, every event dropped, cursor
    /// kept, nothing announced.
    async fn a_batch_entirely_at_or_below_the_cursor_records_nothing(b: &Backend) {
        with_run(b, RUN, BTreeMap::new()).await;
        // Listening from before the first batch: on PostgreSQL its
        // announcement arrives after the commit, so a receiver opened just
        // after it may still hear it.
        let mut work = b.state.new_work();
        record(b, batch(vec![event(1, &["ops"]), event(2, &["ops"])], None)).await;
        assert_eq!(&*next_work(&mut work).await.run_id, RUN, "the first batch's");
        let again = record(b, batch(vec![event(1, &["ops"]), event(2, &["ops"])], None)).await;
        assert_eq!(again, Recorded { cursor: 2, recorded: 0, dropped: 2, routed: vec![] });
        next_is_the_marker(b, &mut work).await;
        assert_eq!(recorded_events(b).await.len(), 2);
    }
}

on_both! {
    /// DESIGN.md, event ids and payloads: a finish records one
    /// `run_finished` whose id and `lastSequence` are the cursor after the
    /// batch's events, with no sequence, the payload fields in the
    /// documented order.
    async fn a_finish_records_one_run_finished_at_the_cursor(b: &Backend) {
        with_run(b, RUN, BTreeMap::new()).await;
        let recorded = record(b, batch(vec![event(1, &["ops"]), event(2, &["ops"])], Some(failed(&["chat"])))).await;
        assert_eq!(recorded, Recorded { cursor: 2, recorded: 3, dropped: 0, routed: names(&["ops", "chat"]) });
        let events = recorded_events(b).await;
        assert_eq!(
            events.last(),
            Some(&(
                format!("{RUN}:finished:2"),
                None,
                r#"{"status":"failed","errorMessage":"boom","lastSequence":2}"#.to_owned()
            ))
        );
        let chat = b.state.pending_for_run("chat", RUN, 10).await.unwrap();
        assert_eq!(chat.len(), 1, "the finish goes to its own sinks only");
        assert_eq!(chat[0].event_type, "run_finished");
        let run = &b.state.watched_runs().await.unwrap()[0];
        assert_eq!((run.state.as_str(), run.cursor), ("finished", 2));
    }
}

on_both! {
    /// A finish seen again at the same cursor (the `finished_recheck` poll)
    /// must not record a second `run_finished`: its id is taken.
    async fn a_finish_seen_again_at_the_same_cursor_records_nothing(b: &Backend) {
        with_run(b, RUN, BTreeMap::new()).await;
        // Listening from before the first batch, whose announcement may
        // arrive late on PostgreSQL.
        let mut work = b.state.new_work();
        record(b, batch(vec![event(1, &["ops"])], Some(failed(&["chat"])))).await;
        assert_eq!(&*next_work(&mut work).await.run_id, RUN, "the first batch's");
        let again = record(b, batch(vec![], Some(failed(&["chat"])))).await;
        assert_eq!(again, Recorded { cursor: 1, recorded: 0, dropped: 0, routed: vec![] });
        next_is_the_marker(b, &mut work).await;
        assert_eq!(recorded_events(b).await.len(), 2);
        assert_eq!(b.state.pending_count("chat").await.unwrap(), 1);
    }
}

// ---- by time (from src/store/requeue.rs) ----

/// `RUN` (labelled team=rome) with one event per type, each routed to
/// `sinks`.
async fn with_events(b: &Backend, types: &[&str], sinks: &[&str]) {
    let labels = BTreeMap::from([("team".to_owned(), "rome".to_owned())]);
    with_run(b, RUN, labels).await;
    let events = types
        .iter()
        .enumerate()
        .map(|(i, event_type)| NewEvent {
            event_type: (*event_type).to_owned(),
            ..event(i as i64 + 1, sinks)
        })
        .collect();
    record(b, batch(events, None)).await;
}

/// Event N (1-based) was seen at N seconds.
async fn seen_at_their_sequence(b: &Backend) {
    b.sql("UPDATE events SET seen_at = sequence * 1000").await;
}

async fn pending_ids(b: &Backend, sink: &str) -> Vec<String> {
    let pending = b.state.pending_in_order(sink, 100_000).await.unwrap();
    pending.into_iter().map(|p| p.id).collect()
}

/// The store's row numbers of `RUN`'s events `sequences`, as deliveries
/// name them (not assumed to be the sequences: PostgreSQL numbers events
/// from an identity shared by every run).
async fn rows(b: &Backend, sequences: &[i64]) -> Vec<i64> {
    let events = b
        .state
        .events_after(0, Some(RUN.into()), None, 100_000)
        .await
        .unwrap();
    sequences
        .iter()
        .map(|s| {
            events
                .iter()
                .find(|e| e.sequence == Some(*s))
                .unwrap_or_else(|| panic!("event {s} recorded"))
                .event
        })
        .collect()
}

fn range(since_s: i64, until_s: i64) -> TimeRange {
    TimeRange {
        since: since_s * 1000,
        until: until_s * 1000,
    }
}

async fn delivered(b: &Backend, run: &str, sink: &str, events: Vec<i64>) {
    let fence = b.fence(run).await;
    b.state
        .mark_delivered(&fence, Arc::from(sink), events, None)
        .await
        .unwrap();
}

async fn failure(b: &Backend, run: &str, sink: &str, failure: Failure) {
    let fence = b.fence(run).await;
    b.state
        .record_failure(&fence, Arc::from(sink), failure)
        .await
        .unwrap();
}

async fn kill(b: &Backend, sink: &str, events: Vec<i64>) {
    let dead = Failure {
        events,
        status: Some(500),
        error: "down".into(),
        next_attempt_at: 0,
        dead: true,
    };
    failure(b, RUN, sink, dead).await;
}

on_both! {
    async fn requeue_range_takes_dead_letters_and_delivered_ones_only_when_asked(b: &Backend) {
        with_events(b, &["A"; 5], &["a"]).await;
        seen_at_their_sequence(b).await;
        // Events 1..=5: 1 done (out of range), 2 dead, 3 pending with an
        // attempt, 4 done, 5 dead (out of range).
        delivered(b, RUN, "a", rows(b, &[1, 4]).await).await;
        kill(b, "a", rows(b, &[2, 5]).await).await;
        let retry = Failure {
            events: rows(b, &[3]).await,
            status: Some(503),
            error: "busy".into(),
            next_attempt_at: 0,
            dead: false,
        };
        failure(b, RUN, "a", retry).await;
        let filter = |delivered| RequeueFilter { range: range(2, 5), sink: None, run: None, delivered };

        assert_eq!(b.state.requeue_range(filter(false)).await.unwrap(), 1);
        assert_eq!(pending_ids(b, "a").await, ["run-1:2", "run-1:3"]);
        assert_eq!(b.state.requeue_range(filter(true)).await.unwrap(), 1);
        let pending = b.state.pending_in_order("a", 10).await.unwrap();
        let ids: Vec<&str> = pending.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["run-1:2", "run-1:3", "run-1:4"], "in event order");
        assert_eq!(pending[1].attempts, 1, "a pending delivery is left as it was");
        assert_eq!(pending[0].attempts, 0, "a requeued one starts afresh");
        let dead = b.state.dead_letters(None, None).await.unwrap();
        assert_eq!(dead.len(), 1, "event 5 was seen after the range: {dead:?}");
    }
}

on_both! {
    async fn requeue_range_keeps_to_the_sink_and_run_asked_for(b: &Backend) {
        with_events(b, &["A"; 2], &["a", "b"]).await;
        let both = rows(b, &[1, 2]).await;
        kill(b, "a", both.clone()).await;
        kill(b, "b", both).await;
        let everything = range(0, i64::MAX / 1000);
        let only = |sink: &str, run: &str| RequeueFilter {
            range: everything,
            sink: Some(sink.into()),
            run: Some(run.into()),
            delivered: false,
        };
        assert_eq!(b.state.requeue_range(only("a", "run-2")).await.unwrap(), 0);
        assert_eq!(b.state.requeue_range(only("a", RUN)).await.unwrap(), 2);
        let replayed = b.state.replay(DeadFilter::default()).await.unwrap();
        assert_eq!(replayed, 2, "b's dead letters were left alone");
    }
}

on_both! {
    async fn backfill_queues_what_routing_picks_once_in_event_order(b: &Backend) {
        with_events(b, &["A", "B", "A", "A", "B", "A"], &["old"]).await;
        seen_at_their_sequence(b).await;
        let wants_a = |event: &StoredEvent| {
            event.event_type == "A" && event.labels.get("team").map(String::as_str) == Some("rome")
        };
        let queued = b.state.backfill(Arc::from("new"), range(2, 6), None, wants_a).await.unwrap().queued;
        assert_eq!(queued, 2, "events 3 and 4: A, seen in the range");
        assert_eq!(pending_ids(b, "new").await, ["run-1:3", "run-1:4"]);
        // Again over a wider range: 3 and 4 are not doubled, 6 joins; 1 is
        // left out, as the sink has later events of its run already (3 was
        // sent): sent now, it would come after them.
        delivered(b, RUN, "new", rows(b, &[3]).await).await;
        let done = b.state.backfill(Arc::from("new"), range(0, 7), None, wants_a).await.unwrap();
        assert_eq!(done, Backfilled { queued: 1, skipped: 1, before_prune: 0 });
        assert_eq!(pending_ids(b, "new").await, ["run-1:4", "run-1:6"]);
        let none = b
            .state
            .backfill(Arc::from("new"), range(0, 7), Some("run-2".into()), wants_a)
            .await
            .unwrap();
        assert_eq!(none, Backfilled::default(), "another run");
    }
}

on_both! {
    /// Left out for the prune only when the sink has no row for the event:
    /// a dead letter it still holds is "already had", not a guess.
    async fn backfill_counts_only_rowless_events_as_before_the_prune(b: &Backend) {
        with_events(b, &["A", "A", "A"], &["a"]).await;
        kill(b, "a", rows(b, &[1]).await).await;
        delivered(b, RUN, "a", rows(b, &[2, 3]).await).await;
        b.state.prune(now_ms() + 60_000).await.unwrap();
        let everything = range(0, i64::MAX / 1000);
        let done = b.state.backfill(Arc::from("a"), everything, None, |_| true).await.unwrap();
        assert_eq!(done, Backfilled::default(), "r:1 is a's dead letter");
    }
}

on_both! {
    async fn backfill_and_requeue_walk_past_one_chunk(b: &Backend) {
        let n = MAINTENANCE_CHUNK + 7;
        with_events(b, &vec!["A"; n], &["a"]).await;
        let everything = range(0, i64::MAX / 1000);
        let queued = b.state.backfill(Arc::from("b"), everything, None, |_| true).await.unwrap().queued;
        assert_eq!(queued, n);
        let sequences: Vec<i64> = (1..=n as i64).collect();
        delivered(b, RUN, "b", rows(b, &sequences).await).await;
        let filter = RequeueFilter { range: everything, sink: Some("b".into()), run: None, delivered: true };
        assert_eq!(b.state.requeue_range(filter).await.unwrap(), n);
    }
}

// ---- retention (from src/store/retention.rs) ----

/// Waits until the millisecond clock has passed `t`.
async fn clock_past(t: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while now_ms() <= t {
        assert!(
            std::time::Instant::now() < deadline,
            "the clock stands still"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Event 1 of `run` to sink `ops`, and its end when `finish` says so.
fn one_event(run: &str, finish: Option<&str>) -> Batch {
    Batch {
        run_status: Some(finish.unwrap_or("running").into()),
        ..batch_of(
            run,
            vec![event(1, &["ops"])],
            finish.map(|status| Finish {
                status: status.into(),
                error_message: None,
                cancel_reason: None,
                sinks: names(&["ops"]),
            }),
        )
    }
}

/// Records `run` (finished or not) and leaves its deliveries to `ops` as
/// `leave` says: all delivered, or its first event dead or pending.
async fn recorded(b: &Backend, run: &str, finish: Option<&str>, leave: &str) {
    b.state
        .subscribe(run.into(), Default::default(), "config", None)
        .await
        .unwrap();
    record(b, one_event(run, finish)).await;
    let rows: Vec<i64> = b
        .state
        .pending_for_run("ops", run, 10)
        .await
        .unwrap()
        .iter()
        .map(|p| p.event)
        .collect();
    let (first, rest) = rows.split_at(1);
    match leave {
        "delivered" => delivered(b, run, "ops", rows.clone()).await,
        "dead" => {
            let dead = Failure {
                events: first.to_vec(),
                status: Some(500),
                error: "boom".into(),
                next_attempt_at: 0,
                dead: true,
            };
            failure(b, run, "ops", dead).await;
            delivered(b, run, "ops", rest.to_vec()).await;
        }
        _ => delivered(b, run, "ops", rest.to_vec()).await,
    }
}

on_both! {
    /// A finished run past the cutoff with nothing left to deliver leaves
    /// the runs table for a tombstone once its events are pruned; a dead
    /// letter, a pending delivery, a delivery done after the cutoff, a
    /// finish after the cutoff or a run not finished keep the row. Watching
    /// a pruned run again leaves it pruned.
    async fn prune_moves_only_old_finished_runs_with_nothing_left_to_deliver(b: &Backend) {
        recorded(b, "done", Some("completed"), "delivered").await;
        recorded(b, "done2", Some("completed"), "pending").await;
        recorded(b, "dead", Some("failed"), "dead").await;
        recorded(b, "pending", Some("completed"), "pending").await;
        recorded(b, "late", Some("completed"), "pending").await;
        recorded(b, "running", None, "delivered").await;
        clock_past(now_ms()).await;
        let cutoff = now_ms();
        clock_past(cutoff).await;
        recorded(b, "young", Some("completed"), "delivered").await;
        for run in ["late", "done2"] {
            let open = b.state.pending_for_run("ops", run, 10).await.unwrap();
            delivered(b, run, "ops", open.iter().map(|p| p.event).collect()).await;
        }

        // Its events still stored (not pruned yet): "done" stays too.
        assert_eq!(b.state.prune_finished_runs(cutoff).await.unwrap(), 0);
        b.state.prune(cutoff).await.unwrap();
        assert_eq!(b.state.prune_finished_runs(cutoff).await.unwrap(), 1);
        let left: Vec<String> = b.state.runs().await.unwrap().into_iter().map(|r| r.run_id).collect();
        assert_eq!(
            left,
            ["dead", "done2", "late", "pending", "running", "young"],
            "done2 shares a prefix with done, and was delivered after the cutoff"
        );
        let tombstone = b.state.pruned_run("done".into()).await.unwrap().expect("a tombstone");
        assert_eq!((tombstone.cursor, tombstone.status.as_deref()), (1, Some("completed")));
        assert!(tombstone.finished_at < cutoff && tombstone.pruned_at >= cutoff);

        for origin in ["config", "watch"] {
            let again = b.state.subscribe("done".into(), Default::default(), origin, None).await.unwrap();
            assert_eq!(again, Subscribed::Pruned(tombstone.clone()));
        }
        assert!(b.state.runs().await.unwrap().iter().all(|r| r.run_id != "done"));
        let fence = b.fence("done").await;
        assert!(
            b.state.record_batch(&fence, one_event("done", None)).await.is_err(),
            "nothing records a pruned run from cursor 0"
        );
        assert!(b.state.unsubscribe("done".into()).await.unwrap(), "known");

        // Nothing more goes, and the tombstone stays.
        assert_eq!(b.state.prune_finished_runs(cutoff).await.unwrap(), 0);
        assert_eq!(b.state.pruned_count().await.unwrap(), 1);
    }
}

// ---- the interface's own promises ----

on_both! {
    /// A sink that answers again gets its backlog now, not at each
    /// delivery's own backoff: a replica's delivery loop must be able to
    /// ask this of either backend.
    async fn release_backoff_makes_a_sinks_backed_off_deliveries_due_now(b: &Backend) {
        with_events(b, &["A"; 3], &["a", "other"]).await;
        let later = now_ms() + 3_600_000;
        let backoff = |events| Failure {
            events,
            status: Some(503),
            error: "busy".into(),
            next_attempt_at: later,
            dead: false,
        };
        failure(b, RUN, "a", backoff(rows(b, &[1, 2]).await)).await;
        failure(b, RUN, "other", backoff(rows(b, &[1]).await)).await;
        let before = now_ms();
        assert_eq!(b.state.release_backoff(Arc::from("a")).await.unwrap(), 2);
        let due = |pending: Vec<runhook::store::Pending>| -> Vec<bool> {
            pending.iter().map(|p| p.next_attempt_at <= now_ms()).collect()
        };
        let a = b.state.pending_in_order("a", 10).await.unwrap();
        assert_eq!(due(a.clone()), [true, true, true], "{a:?}");
        assert!(a.iter().all(|p| p.next_attempt_at >= 0 && p.attempts <= 1));
        assert!(a[0].next_attempt_at >= before - 1, "due now, not rewound: {a:?}");
        let other = b.state.pending_in_order("other", 10).await.unwrap();
        assert_eq!(due(other), [false, true, true], "another sink's backoff stands");
        assert_eq!(b.state.release_backoff(Arc::from("a")).await.unwrap(), 0, "nothing left to release");
    }
}

on_both! {
    /// `/readyz` and the watchdog ask the state to prove it can commit.
    async fn ping_answers(b: &Backend) {
        b.state.ping().await.unwrap();
    }
}

on_both! {
    /// The fence a backend does not use is refused, typed, and nothing is
    /// written: PostgreSQL never takes an unfenced write of a run's data
    /// path, SQLite never takes a lease (one came from another store).
    async fn a_write_with_the_other_backends_fence_is_refused_and_writes_nothing(b: &Backend) {
        with_run(b, RUN, BTreeMap::new()).await;
        let wrong = if b.is_postgres() {
            Fence::Exclusive
        } else {
            Fence::Lease(Lease { run_id: Arc::from(RUN), epoch: 1 })
        };
        let refused = |result: Result<_, StateError>| match result {
            Err(StateError::Unfenced { write }) if b.is_postgres() => write,
            Err(StateError::LeaseOnSqlite { write }) if !b.is_postgres() => write,
            other => panic!("not refused as the wrong fence: {other:?}"),
        };
        let recorded = b.state.record_batch(&wrong, batch(vec![event(1, &["ops"])], None)).await;
        assert_eq!(refused(recorded.map(|_| ())), "record_batch");
        let state = runhook::store::RunState::Stalled;
        let set = b.state.set_run_state(&wrong, RUN.into(), state, Some("x".into()), None).await;
        assert_eq!(refused(set), "set_run_state");
        assert_eq!(refused(b.state.set_upstream_seq(&wrong, RUN.into(), 9).await), "set_upstream_seq");
        let root = b.state.save_thread_root(&wrong, "chat".into(), RUN.into(), "C1".into(), "1.2".into()).await;
        assert_eq!(refused(root), "save_thread_root");
        assert!(recorded_events(b).await.is_empty(), "no event written");
        assert_eq!(b.state.thread_root("chat", RUN).await.unwrap(), None);
        let run = &b.state.runs().await.unwrap()[0];
        assert_eq!((run.last_error.as_deref(), run.lag, run.state.as_str()), (None, None, "starting"), "{run:?}");

        // Now with the right fence: something to mark.
        record(b, batch(vec![event(1, &["ops"])], None)).await;
        let row = rows(b, &[1]).await;
        let marked = b.state.mark_delivered(&wrong, "ops".into(), row.clone(), None).await;
        assert_eq!(refused(marked), "mark_delivered");
        let dead = Failure { events: row, status: None, error: "x".into(), next_attempt_at: 0, dead: true };
        assert_eq!(refused(b.state.record_failure(&wrong, "ops".into(), dead).await), "record_failure");
        assert_eq!(b.state.pending_count("ops").await.unwrap(), 1, "still pending, untouched");
    }
}

/// PostgreSQL only (SQLite has no leases to lose): a lease given up comes
/// back from every fenced write as `StateError::LeaseLost`, the variant a
/// run's owner matches to stop the run, whichever backend error carried it;
/// a lease on one run fences no other run.
#[tokio::test]
async fn a_lost_lease_comes_back_as_lease_lost_and_writes_nothing() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let b = Backend::postgres(db).await;
    with_run(&b, RUN, BTreeMap::new()).await;
    with_run(&b, MARKER, BTreeMap::new()).await;
    let fence = b.fence(RUN).await;
    let other = b.fence(MARKER).await;
    let lost = |result: Result<(), StateError>, run: &str| match result {
        Err(StateError::LeaseLost { run_id, .. }) => assert_eq!(&*run_id, run),
        other => panic!("not LeaseLost: {other:?}"),
    };
    let misfenced = b
        .state
        .record_batch(&other, batch(vec![event(1, &["ops"])], None))
        .await;
    lost(misfenced.map(|_| ()), RUN);
    let misfenced = b.state.set_upstream_seq(&other, RUN.into(), 3).await;
    lost(misfenced, RUN);

    record(&b, batch(vec![event(1, &["ops"])], None)).await;
    let Fence::Lease(lease) = &fence else {
        unreachable!()
    };
    let pg = b.state.postgres().expect("a PostgreSQL state");
    pg.release(std::slice::from_ref(lease)).await.unwrap();
    let recorded = b
        .state
        .record_batch(&fence, batch(vec![event(2, &["ops"])], None))
        .await;
    lost(recorded.map(|_| ()), RUN);
    let row = rows(&b, &[1]).await;
    lost(
        b.state
            .mark_delivered(&fence, "ops".into(), row, None)
            .await,
        RUN,
    );
    assert_eq!(recorded_events(&b).await.len(), 1, "event 2 not written");
    assert_eq!(b.state.pending_count("ops").await.unwrap(), 1);
}

// ---- parity: the rest of the operations table, alike on both ----

on_both! {
    /// `watch`, `unwatch`, a config reload and a restart, as the
    /// supervisor sees them: who is watched with which labels, a generation
    /// that moves on every change, stopped runs given another chance.
    async fn subscriptions_and_their_generation_behave_alike(b: &Backend) {
        let generation = b.state.control_generation().await.unwrap();
        let labels = BTreeMap::from([("team".to_owned(), "rome".to_owned())]);
        let watching = b.state.subscribe("w1".into(), labels.clone(), "watch", None).await.unwrap();
        assert_eq!(watching, Subscribed::Watching);
        b.state.subscribe("c1".into(), BTreeMap::new(), "config", None).await.unwrap();
        b.state.subscribe("c2".into(), BTreeMap::new(), "config", None).await.unwrap();
        let after = b.state.control_generation().await.unwrap();
        assert!(after > generation, "{generation} -> {after}");
        let watched = b.state.watched_runs().await.unwrap();
        let ids: Vec<&str> = watched.iter().map(|r| r.run_id.as_str()).collect();
        assert_eq!(ids, ["c1", "c2", "w1"]);
        assert_eq!(watched[2].labels, labels);
        assert_eq!((watched[2].state.as_str(), watched[2].cursor), ("starting", 0));

        b.state.unsubscribe_config_runs_except(vec!["c2".into()]).await.unwrap();
        let ids: Vec<String> = b.state.watched_runs().await.unwrap().into_iter().map(|r| r.run_id).collect();
        assert_eq!(ids, ["c2", "w1"], "c1 left the config");
        assert!(b.state.unsubscribe("w1".into()).await.unwrap(), "known");
        assert!(!b.state.unsubscribe("nobody".into()).await.unwrap(), "unknown");
        let runs: Vec<(String, bool)> = b.state.runs().await.unwrap().into_iter().map(|r| (r.run_id, r.watched)).collect();
        assert_eq!(
            runs,
            [("c1".into(), false), ("c2".into(), true), ("w1".into(), false)],
            "unwatched runs keep their rows"
        );

        let fence = b.fence("c2").await;
        let not_found = runhook::store::RunState::NotFound;
        b.state.set_run_state(&fence, "c2".into(), not_found, Some("404".into()), None).await.unwrap();
        b.state.set_upstream_seq(&fence, "c2".into(), 7).await.unwrap();
        let c2 = b.state.runs().await.unwrap().into_iter().find(|r| r.run_id == "c2").unwrap();
        assert_eq!((c2.state.as_str(), c2.last_error.as_deref(), c2.lag), ("not_found", Some("404"), Some(7)));
        assert_eq!(b.state.retry_stopped_runs().await.unwrap(), 1);
        let c2 = b.state.runs().await.unwrap().into_iter().find(|r| r.run_id == "c2").unwrap();
        assert_eq!((c2.state.as_str(), c2.last_error.as_deref()), ("starting", None));
    }
}

on_both! {
    /// `runhook dead` and `replay` see and do the same on both.
    async fn dead_letters_replay_and_purge_behave_alike(b: &Backend) {
        with_events(b, &["A"; 3], &["a", "b"]).await;
        kill(b, "a", rows(b, &[1, 2]).await).await;
        kill(b, "b", rows(b, &[3]).await).await;
        let dead = b.state.dead_letters(Some("a".into()), None).await.unwrap();
        let seen: Vec<_> = dead
            .iter()
            .map(|d| (d.id.as_str(), d.run_id.as_str(), d.attempts, d.last_status, d.last_error.as_deref()))
            .collect();
        assert_eq!(seen, [("run-1:1", RUN, 1, Some(500), Some("down")), ("run-1:2", RUN, 1, Some(500), Some("down"))]);
        assert!(dead.iter().all(|d| d.dead_at.is_some()));
        assert!(b.state.dead_letters(None, Some("run-2".into())).await.unwrap().is_empty());
        assert_eq!(b.state.dead_letters(None, None).await.unwrap().len(), 3);

        let generation = b.state.control_generation().await.unwrap();
        let one = DeadFilter { id: Some("run-1:2".into()), ..DeadFilter::default() };
        assert_eq!(b.state.replay(one).await.unwrap(), 1);
        assert!(b.state.control_generation().await.unwrap() > generation, "replay wakes the supervisors");
        assert_eq!(pending_ids(b, "a").await, ["run-1:2", "run-1:3"]);
        let purged = b.state.purge_dead(DeadFilter { sink: Some("a".into()), ..DeadFilter::default() }).await.unwrap();
        assert_eq!(purged, 1);
        let left: Vec<String> = b.state.dead_letters(None, None).await.unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(left, ["run-1:3"]);
    }
}

on_both! {
    /// What `status`, `top`, metrics and the file and Slack sinks read and
    /// write beside the data path, alike on both.
    async fn sink_state_and_backlog_reads_behave_alike(b: &Backend) {
        with_events(b, &["A", "B", "A"], &["a"]).await;
        assert_eq!(b.state.pending_total().await.unwrap(), 3);
        assert_eq!(b.state.runs_with_pending("a").await.unwrap(), [RUN]);
        assert!(b.state.runs_with_pending("b").await.unwrap().is_empty());
        let oldest = b.state.oldest_pending(vec!["a".into(), "b".into()]).await.unwrap();
        assert_eq!(oldest.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(), ["a"], "{oldest:?}");
        let last = b.state.last_event_row().await.unwrap();
        assert_eq!(last, *rows(b, &[3]).await.last().unwrap());
        let bs = b.state.events_after(0, None, Some("B".into()), 10).await.unwrap();
        assert_eq!(bs.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["run-1:2"]);
        let after_first = b.state.events_after(rows(b, &[1]).await[0], None, None, 1).await.unwrap();
        assert_eq!(after_first.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["run-1:2"]);

        b.state.set_sink_down(Arc::from("a"), true).await.unwrap();
        let sinks = b.state.sinks().await.unwrap();
        let a = sinks.iter().find(|s| s.sink == "a").expect("sink a listed");
        assert_eq!((a.pending, a.done, a.dead, a.down), (3, 0, 0, true));
        assert_eq!(b.state.sink_offset("a").await.unwrap(), None);
        let sink_fence = b.state.claim_sink("a").await.unwrap().expect("sink a is free");
        let found = b.state.mark_found_delivered(&sink_fence, Arc::from("a"), vec!["run-1:1".into(), "run-1:9".into()], 42).await.unwrap();
        assert_eq!(found, 1, "only a recorded event is marked");
        assert_eq!(b.state.sink_offset("a").await.unwrap(), Some(42));
        delivered(b, RUN, "a", rows(b, &[2]).await).await;
        let sinks = b.state.sinks().await.unwrap();
        let a = sinks.iter().find(|s| s.sink == "a").unwrap();
        assert_eq!((a.pending, a.done, a.down), (1, 2, false), "a success brings it up");
        assert!(a.last_success_at.is_some());

        let fence = b.fence(RUN).await;
        assert_eq!(b.state.thread_root("chat", RUN).await.unwrap(), None);
        b.state.save_thread_root(&fence, "chat".into(), RUN.into(), "C1".into(), "1.1".into()).await.unwrap();
        b.state.save_thread_root(&fence, "chat".into(), RUN.into(), "C1".into(), "2.2".into()).await.unwrap();
        assert_eq!(b.state.thread_root("chat", RUN).await.unwrap(), Some(("C1".into(), "2.2".into())));
    }
}
