//! The PostgreSQL store against a real server (`pg_support`): migrations,
//! the ingest transaction's exactly-once, and leases with fencing between
//! replicas. Each test gets a database of its own on the binary's one server
//! (see `pg_support`); without PostgreSQL installed
//! they pass after printing "skipped: no PostgreSQL" (unless
//! `RUNHOOK_REQUIRE_PG=1`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use runhook::store::pg::{Lease, LeaseKeeper, PgStore, PgStoreError, SCHEMA_VERSION};
use runhook::store::{Batch, Failure, Finish, Recorded, now_ms};

use crate::pg_support::{PgDatabase, PgServer};
use crate::support::pg_store::{self, count, open, pending_rows, replica, subscribe};
use crate::support::wait_for;

const RUN: &str = "9f2a1c7e-0000-4000-8000-000000000001";
const SINK: &str = "ops";

/// Events `sequences` of `run` for the sink; the payloads' raw text
/// (`1.10`, a space) must come back to the byte.
fn batch(run: &str, sequences: impl IntoIterator<Item = i64>) -> Batch {
    pg_store::batch_with_payload(run, sequences, &[SINK], |sequence| {
        format!("{{\"n\": {sequence}, \"x\":1.10}}")
    })
}

/// The one lease of `store`'s node on `RUN`, claimed now.
async fn claim_one(store: &PgStore) -> Lease {
    let mut claimed = store.claim(1).await.expect("claim");
    assert_eq!(claimed.len(), 1, "one run to claim: {claimed:?}");
    claimed.remove(0)
}

async fn cursor(client: &tokio_postgres::Client, run: &str) -> i64 {
    client
        .query_one("SELECT cursor FROM runs WHERE run_id = $1", &[&run])
        .await
        .expect("cursor")
        .get(0)
}

#[tokio::test]
async fn the_test_server_listens_on_its_socket_only_with_fsync_on() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let client = pg.client().await;
    for (setting, expected) in [("fsync", "on"), ("listen_addresses", "")] {
        let value: String = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .expect(setting)
            .get(0);
        assert_eq!(value, expected, "{setting}");
    }
}

/// Tests share one server: what one writes must be invisible to another,
/// and a test's database must go with it (or the server's disk grows with
/// every test of the binary).
#[tokio::test]
async fn each_test_gets_a_database_of_its_own_dropped_after() {
    let (Some(one), Some(other)) = (PgDatabase::create().await, PgDatabase::create().await) else {
        return;
    };
    one.client()
        .await
        .batch_execute("CREATE TABLE mine (n int)")
        .await
        .expect("create a table");
    let seen = count(
        &other.client().await,
        "SELECT count(*) FROM pg_tables WHERE tablename = 'mine'",
    )
    .await;
    assert_eq!(seen, 0, "another test's table is not visible");
    let name: String = one
        .client()
        .await
        .query_one("SELECT current_database()", &[])
        .await
        .expect("current_database")
        .get(0);
    let (by_url, connection) = tokio_postgres::connect(&one.postgres_url(), tokio_postgres::NoTls)
        .await
        .expect("connect with the postgres:// form --state takes");
    tokio::spawn(connection);
    let reached: String = by_url
        .query_one("SELECT current_database()", &[])
        .await
        .expect("current_database")
        .get(0);
    assert_eq!(reached, name, "{}", one.postgres_url());
    drop(by_url);
    let client = other.client().await;
    drop(one);
    let left = client
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .expect("pg_database")
        .get::<_, i64>(0);
    assert_eq!(left, 0, "{name} dropped with its handle");
}

/// The escape hatch for a test that stops or reconfigures its server: the
/// server is its own, and stopped and removed when dropped.
#[tokio::test]
async fn a_server_of_its_own_is_stopped_and_removed_when_dropped() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.url();
    let data = server.data_dir();
    server
        .client()
        .await
        .batch_execute("SELECT 1")
        .await
        .expect("its server answers");
    server.pg_ctl(&["reload"]);
    drop(server);
    assert!(!data.exists(), "{} removed", data.display());
    assert!(
        tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .is_err(),
        "stopped"
    );
}

/// Replicas started together must not run a migration twice (the second
/// would fail on tables that exist, or worse, half-apply).
#[tokio::test]
async fn migrations_run_once_when_four_stores_open_together() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let url = pg.url();
    let start = Arc::new(tokio::sync::Barrier::new(4));
    let opening: Vec<_> = (0..4)
        .map(|n| {
            let (url, start) = (url.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                PgStore::open(&url, replica(&format!("r{n}"), Duration::from_secs(15))).await
            })
        })
        .collect();
    for (n, task) in opening.into_iter().enumerate() {
        let opened = task.await.expect("task");
        assert!(opened.is_ok(), "store {n}: {:?}", opened.err());
    }
    let client = pg.client().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM schema_migrations").await,
        SCHEMA_VERSION,
        "each migration applied once"
    );
}

/// Guarantee 1: the cursor, not the event's unique id, drops what was
/// already recorded; so a re-sent batch records nothing even after its
/// events were pruned, and the cursor never moves back.
#[tokio::test]
async fn a_batch_sent_again_after_the_cursor_moved_records_nothing() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = open(&pg.url(), "a", Duration::from_secs(15)).await;
    subscribe(&store, RUN).await;
    let lease = claim_one(&store).await;
    let first = store.record_batch(&lease, batch(RUN, 1..=3)).await;
    assert_eq!(
        first.expect("record"),
        Recorded {
            cursor: 3,
            recorded: 3,
            dropped: 0,
            routed: vec![Arc::from(SINK)]
        }
    );
    let client = pg.client().await;
    // As retention would, once delivered.
    client
        .batch_execute("DELETE FROM deliveries; DELETE FROM events;")
        .await
        .expect("prune");
    let again = store.record_batch(&lease, batch(RUN, 1..=3)).await;
    assert_eq!(
        again.expect("record again"),
        Recorded {
            cursor: 3,
            recorded: 0,
            dropped: 3,
            routed: vec![]
        }
    );
    assert_eq!(count(&client, "SELECT count(*) FROM events").await, 0);
    assert_eq!(count(&client, "SELECT count(*) FROM deliveries").await, 0);
    assert_eq!(cursor(&client, RUN).await, 3, "the cursor never moves back");
}

#[tokio::test]
async fn a_batch_straddling_the_cursor_records_only_the_new_part() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = open(&pg.url(), "a", Duration::from_secs(15)).await;
    subscribe(&store, RUN).await;
    let lease = claim_one(&store).await;
    store
        .record_batch(&lease, batch(RUN, 1..=3))
        .await
        .expect("record 1..3");
    let straddling = store
        .record_batch(&lease, batch(RUN, 2..=6))
        .await
        .expect("record 2..6");
    assert_eq!(
        (straddling.cursor, straddling.recorded, straddling.dropped),
        (6, 3, 2)
    );
    let pending = store
        .pending_for_run(SINK, RUN, 100)
        .await
        .expect("pending");
    let ids: Vec<&str> = pending.iter().map(|p| p.id.as_str()).collect();
    let expected: Vec<String> = (1..=6).map(|n| format!("{RUN}:{n}")).collect();
    assert_eq!(ids, expected, "each event once, in order");
    assert_eq!(
        pending[0].payload, r#"{"n": 1, "x":1.10}"#,
        "payload bytes as received"
    );
}

/// Outcomes are fenced per run, so they may touch only that run's rows:
/// event rows of another run named under this lease stay as they were.
#[tokio::test]
async fn delivery_outcomes_move_only_the_leased_runs_rows() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = open(&pg.url(), "a", Duration::from_secs(15)).await;
    const OTHER: &str = "9f2a1c7e-0000-4000-8000-000000000002";
    subscribe(&store, RUN).await;
    subscribe(&store, OTHER).await;
    let leases = store.claim(2).await.expect("claim");
    let lease_of = |run: &str| leases.iter().find(|l| &*l.run_id == run).expect("lease");
    let (lease, other_lease) = (lease_of(RUN), lease_of(OTHER));
    store
        .record_batch(lease, batch(RUN, 1..=3))
        .await
        .expect("record");
    store
        .record_batch(other_lease, batch(OTHER, 1..=3))
        .await
        .expect("record the other");
    let (events, others) = (
        pending_rows(&store, SINK, RUN, 10).await,
        pending_rows(&store, SINK, OTHER, 10).await,
    );
    store
        .mark_delivered(lease, SINK.into(), vec![events[0], others[0]], None)
        .await
        .expect("delivered");
    let failure = |events: Vec<i64>, dead: bool| Failure {
        events,
        status: Some(503),
        error: "busy".into(),
        next_attempt_at: now_ms() + 60_000,
        dead,
    };
    store
        .record_failure(
            lease,
            SINK.into(),
            failure(vec![events[1], others[1]], true),
        )
        .await
        .expect("dead");
    store
        .record_failure(
            lease,
            SINK.into(),
            failure(vec![events[2], others[2]], false),
        )
        .await
        .expect("retry");
    let pending = store.pending_for_run(SINK, RUN, 10).await.expect("pending");
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!((pending[0].event, pending[0].attempts), (events[2], 1));
    let client = pg.client().await;
    let states = |run: &'static str| {
        let client = &client;
        async move {
            client
                .query(
                    "SELECT state, attempts FROM deliveries WHERE run_id = $1 ORDER BY event",
                    &[&run],
                )
                .await
                .expect("deliveries")
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect::<Vec<(i16, i32)>>()
        }
    };
    assert_eq!(states(RUN).await, vec![(1, 1), (2, 1), (0, 1)]);
    assert_eq!(
        states(OTHER).await,
        vec![(0, 0), (0, 0), (0, 0)],
        "the other run's deliveries are untouched"
    );
}

#[tokio::test]
async fn a_claimed_run_cannot_be_claimed_by_another_replica() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let a = open(&pg.url(), "a", Duration::from_secs(60)).await;
    let b = open(&pg.url(), "b", Duration::from_secs(60)).await;
    subscribe(&a, RUN).await;
    let lease = claim_one(&a).await;
    assert_eq!(lease.epoch, 1);
    assert_eq!(b.claim(10).await.expect("claim"), vec![], "b gets nothing");
    assert_eq!(a.claim(10).await.expect("claim"), vec![], "nor a, twice");
}

/// A replica that stops renewing (dead, paused) loses the run after the
/// ttl in the server's clock; the next owner's epoch is one higher.
#[tokio::test]
async fn after_the_ttl_another_replica_takes_over_with_the_next_epoch() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let ttl = Duration::from_secs(1);
    let a = open(&pg.url(), "a", ttl).await;
    let b = open(&pg.url(), "b", ttl).await;
    subscribe(&a, RUN).await;
    let claimed_at = Instant::now();
    let first = claim_one(&a).await;
    assert_eq!(b.claim(1).await.expect("claim"), vec![], "a holds it");
    let taken = wait_for("b to take the run over", || async {
        let claimed = b.claim(1).await.map_err(|e| e.to_string())?;
        claimed.into_iter().next().ok_or("not yet".to_string())
    })
    .await;
    assert!(
        claimed_at.elapsed() >= ttl,
        "taken over after {:?}, before the ttl",
        claimed_at.elapsed()
    );
    assert_eq!(taken.epoch, first.epoch + 1);
    assert_eq!(a.renew(&[first]).await.expect("renew"), vec![], "a lost it");
}

/// The fencing token at work: after a takeover, nothing the old owner sends
/// for the run commits, not a batch, not a delivery outcome.
#[tokio::test]
async fn a_replica_that_lost_its_lease_commits_nothing() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let ttl = Duration::from_millis(500);
    let a = open(&pg.url(), "a", ttl).await;
    let b = open(&pg.url(), "b", ttl).await;
    subscribe(&a, RUN).await;
    let old = claim_one(&a).await;
    a.record_batch(&old, batch(RUN, 1..=2))
        .await
        .expect("a records while it holds the lease");
    let new = wait_for("b to take the run over", || async {
        let claimed = b.claim(1).await.map_err(|e| e.to_string())?;
        claimed.into_iter().next().ok_or("not yet".to_string())
    })
    .await;
    assert_eq!(new.epoch, old.epoch + 1);
    let events = pending_rows(&b, SINK, RUN, 10).await;

    let lost = |result: Result<_, PgStoreError>, what: &str| match result {
        Err(PgStoreError::LeaseLost { run_id, epoch }) => {
            assert_eq!((&*run_id, epoch), (RUN, old.epoch), "{what}")
        }
        other => panic!("{what} from the old owner: {other:?}"),
    };
    lost(
        a.record_batch(&old, batch(RUN, 3..=4)).await.map(|_| ()),
        "record_batch",
    );
    lost(
        a.mark_delivered(&old, SINK.into(), events.clone(), Some(10))
            .await,
        "mark_delivered",
    );
    lost(
        a.record_failure(
            &old,
            SINK.into(),
            Failure {
                events: events.clone(),
                status: None,
                error: "late".into(),
                next_attempt_at: 0,
                dead: true,
            },
        )
        .await,
        "record_failure",
    );

    let client = pg.client().await;
    assert_eq!(cursor(&client, RUN).await, 2, "the cursor stayed");
    assert_eq!(count(&client, "SELECT count(*) FROM events").await, 2);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM deliveries WHERE state = 0 AND attempts = 0"
        )
        .await,
        2,
        "both deliveries untouched"
    );
    assert_eq!(count(&client, "SELECT count(*) FROM sinks").await, 0);
    // The new owner carries on from the committed cursor.
    let recorded = b.record_batch(&new, batch(RUN, 1..=4)).await.expect("b");
    assert_eq!((recorded.cursor, recorded.recorded), (4, 2));
    b.mark_delivered(&new, SINK.into(), events, None)
        .await
        .expect("b marks delivered");
}

/// Shutdown releases: another replica takes the run at its next claim, not
/// after a ttl, and the leaver's writes are refused from then on.
#[tokio::test]
async fn a_released_lease_is_taken_over_at_once() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let ttl = Duration::from_secs(60);
    let a = open(&pg.url(), "a", ttl).await;
    let b = open(&pg.url(), "b", ttl).await;
    subscribe(&a, RUN).await;
    let mut keeper = LeaseKeeper::new(a.clone());
    let gained = ticked(&mut keeper).await.gained;
    assert_eq!(gained.len(), 1);
    assert_eq!(b.claim(1).await.expect("claim"), vec![], "a holds it");
    keeper.shutdown().await.expect("shutdown");
    let taken = b.claim(1).await.expect("claim");
    assert_eq!(taken.len(), 1, "b takes it at once: {taken:?}");
    assert_eq!(taken[0].epoch, gained[0].epoch + 1);
    assert!(matches!(
        a.record_batch(&gained[0], batch(RUN, 1..=1)).await,
        Err(PgStoreError::LeaseLost { .. })
    ));
}

/// A tick that must go through.
async fn ticked(keeper: &mut LeaseKeeper) -> runhook::store::pg::LeaseChanges {
    let changes = keeper.tick().await;
    if let Some(error) = &changes.error {
        panic!("tick: {error}");
    }
    changes
}

/// Ticks each keeper in turn every `period`, at most `ticks` times, until
/// they hold `want` runs each; checks at every tick that no run is held by
/// two. Returns how many each held, tick by tick.
async fn tick_until(
    keepers: &mut [&mut LeaseKeeper],
    want: &[usize],
    ticks: usize,
    period: Duration,
) -> Vec<Vec<usize>> {
    let mut interval = tokio::time::interval(period);
    let mut seen = Vec::new();
    for _ in 0..ticks {
        interval.tick().await;
        for keeper in keepers.iter_mut() {
            ticked(keeper).await;
        }
        let held: Vec<Vec<Lease>> = keepers.iter().map(|k| k.held()).collect();
        let mut runs: Vec<&str> = held.iter().flatten().map(|l| &*l.run_id).collect();
        let count = runs.len();
        runs.sort();
        runs.dedup();
        assert_eq!(runs.len(), count, "a run held by two: {held:?}");
        seen.push(held.iter().map(Vec::len).collect());
        if seen.last().map(Vec::as_slice) == Some(want) {
            break;
        }
    }
    seen
}

/// Fair share: a replica alone takes every run; when a second one starts,
/// the first sheds down to its share and the second claims it, within a few
/// lease periods, never with a run held by both.
#[tokio::test]
async fn two_replicas_share_ten_runs_five_and_five() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let ttl = Duration::from_millis(900);
    let a = open(&pg.url(), "a", ttl).await;
    let b = open(&pg.url(), "b", ttl).await;
    for n in 0..10 {
        subscribe(&a, &format!("run-{n}")).await;
    }
    let mut keeper_a = LeaseKeeper::new(a);
    ticked(&mut keeper_a).await;
    assert_eq!(keeper_a.held().len(), 10, "alone, a takes every run");
    let mut keeper_b = LeaseKeeper::new(b);
    let mut keepers = [&mut keeper_b, &mut keeper_a];
    let seen = tick_until(&mut keepers, &[5, 5], 12, ttl / 3).await;
    assert_eq!(
        seen.last().map(Vec::as_slice),
        Some(&[5, 5][..]),
        "held by b and a, tick by tick (four lease periods): {seen:?}"
    );
    let client = pg.client().await;
    let owners: Vec<(String, i64)> = client
        .query(
            "SELECT owner, count(*) FROM leases WHERE expires_at > now()
             GROUP BY owner ORDER BY owner",
            &[],
        )
        .await
        .expect("owners")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(owners, vec![("a".to_owned(), 5), ("b".to_owned(), 5)]);
}

/// Shedding takes two steps: a lease shed to another replica is reported
/// lost at once (its run's work stops here) but released in the database
/// only once that work ended. Released at once, the new owner sent while
/// the old owner's delivery was in flight, whose mark was then refused: the
/// event went out twice with no crash, kill or timeout (failover finding B).
#[tokio::test]
async fn a_shed_lease_is_released_only_once_its_runs_work_ended() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let ttl = Duration::from_secs(5);
    let a = open(&pg.url(), "a", ttl).await;
    let b = open(&pg.url(), "b", ttl).await;
    for n in 0..4 {
        subscribe(&a, &format!("run-{n}")).await;
    }
    let working = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let still_working = working.clone();
    let mut keeper_a = LeaseKeeper::new(a)
        .releasing_when(move |_| !still_working.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(
        ticked(&mut keeper_a).await.gained.len(),
        4,
        "alone, a takes every run"
    );
    let mut keeper_b = LeaseKeeper::new(b);
    ticked(&mut keeper_b).await;
    let shed = ticked(&mut keeper_a).await.lost;
    assert_eq!(shed.len(), 2, "a sheds down to its share: {shed:?}");
    for _ in 0..3 {
        let claimed = ticked(&mut keeper_b).await.gained;
        assert_eq!(
            claimed,
            vec![],
            "claimed while a's deliveries were under way"
        );
        ticked(&mut keeper_a).await;
    }
    let client = pg.client().await;
    let owners: Vec<(String, Option<String>, i64)> = client
        .query(
            "SELECT run_id, owner, epoch FROM leases WHERE run_id IN ('run-2', 'run-3')
             ORDER BY run_id",
            &[],
        )
        .await
        .expect("leases")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let held_by_a: Vec<(String, Option<String>, i64)> = shed
        .iter()
        .map(|l| (l.run_id.to_string(), Some("a".to_owned()), l.epoch))
        .collect();
    assert_eq!(owners, held_by_a, "still a's, renewed, until its work ends");

    working.store(false, std::sync::atomic::Ordering::SeqCst);
    ticked(&mut keeper_a).await;
    let claimed = ticked(&mut keeper_b).await.gained;
    let moved: Vec<(Arc<str>, i64)> = shed
        .iter()
        .map(|l| (l.run_id.clone(), l.epoch + 1))
        .collect();
    let claimed: Vec<(Arc<str>, i64)> = claimed.into_iter().map(|l| (l.run_id, l.epoch)).collect();
    assert_eq!(claimed, moved, "released once the work ended, then claimed");
}

/// Lease ticks never queue behind the data path: with every data
/// connection of the store waiting in the database (here on a lock of
/// `events`, which no lease statement touches; in the failover test on
/// delivery writes under load), the keeper still heartbeats, renews and
/// claims. On the shared pool its ticks timed out on all three replicas at
/// once, and their runs stopped and moved (failover finding C).
#[tokio::test]
async fn lease_ticks_go_through_while_every_data_connection_is_busy() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let ttl = Duration::from_secs(3);
    let a = open(&pg.url(), "a", ttl).await;
    subscribe(&a, RUN).await;
    let mut keeper = LeaseKeeper::new(a.clone());
    assert_eq!(ticked(&mut keeper).await.gained.len(), 1);
    subscribe(&a, "run-later").await;

    let mut locker = pg.client().await;
    let lock = locker.transaction().await.expect("begin");
    lock.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE", &[])
        .await
        .expect("lock events");
    let stuck: Vec<_> = (0..16)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move { a.pending_for_run("hook", RUN, 10).await })
        })
        .collect();
    wait_for(
        "the data path to fill the pool, waiting on the lock",
        || async {
            let waiting: i64 = pg
                .client()
                .await
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND datname = current_database()",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if waiting >= 8 {
                Ok(())
            } else {
                Err(format!("{waiting} waiting"))
            }
        },
    )
    .await;

    let changes = tokio::time::timeout(ttl / 3, keeper.tick())
        .await
        .expect("a lease tick queued behind the data path");
    assert!(changes.error.is_none(), "{:?}", changes.error);
    assert_eq!(changes.lost, vec![], "the held lease renewed");
    assert_eq!(changes.gained.len(), 1, "the new run claimed: {changes:?}");

    lock.rollback().await.expect("unlock");
    for read in stuck {
        read.await
            .expect("join")
            .expect("the reads go on once unlocked");
    }
}

/// A replica that cannot reach the database stops trusting its leases two
/// thirds of a ttl after its last renewal was sent: before the server can
/// let them expire and hand the runs to another replica.
#[tokio::test]
async fn a_replica_cut_off_from_the_database_stops_its_runs_before_the_lease_expires() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    // Overdue at 2 s: a second of margin for stopping the server on a busy
    // machine.
    let ttl = Duration::from_secs(3);
    let a = open(&pg.url(), "a", ttl).await;
    subscribe(&a, RUN).await;
    let mut keeper = LeaseKeeper::new(a);
    let renewing = Instant::now();
    ticked(&mut keeper).await;
    assert_eq!(keeper.held().len(), 1);
    drop(pg);
    assert!(keeper.tick().await.error.is_some(), "the server is gone");
    assert_eq!(
        keeper.overdue(),
        vec![],
        "still trusted right after a renewal"
    );
    let overdue = wait_for("the lease to be overdue", || {
        let overdue = keeper.overdue();
        async move {
            match overdue.is_empty() {
                true => Err("held".to_string()),
                false => Ok(overdue),
            }
        }
    })
    .await;
    assert!(
        renewing.elapsed() < ttl,
        "stopped {:?} after the renewal: past the ttl",
        renewing.elapsed()
    );
    assert_eq!(overdue.len(), 1);
    assert_eq!(keeper.held(), vec![]);
}

/// Replicas claiming at the same moment each get different runs: the claim
/// locks the rows it picks, and the others skip them rather than take them
/// a second time.
#[tokio::test]
async fn replicas_claiming_at_once_never_get_the_same_run() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let ttl = Duration::from_secs(60);
    let mut stores = Vec::new();
    for n in 0..4 {
        stores.push(open(&pg.url(), &format!("r{n}"), ttl).await);
    }
    for n in 0..40 {
        subscribe(&stores[0], &format!("run-{n:02}")).await;
    }
    let start = Arc::new(tokio::sync::Barrier::new(stores.len()));
    let claiming: Vec<_> = stores
        .into_iter()
        .map(|store| {
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                store.claim(40).await
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for task in claiming {
        claimed.extend(task.await.expect("task").expect("claim"));
    }
    claimed.sort();
    let runs: Vec<&str> = claimed.iter().map(|l| &*l.run_id).collect();
    let expected: Vec<String> = (0..40).map(|n| format!("run-{n:02}")).collect();
    assert_eq!(runs, expected, "each run claimed once");
    assert!(claimed.iter().all(|l| l.epoch == 1), "{claimed:?}");
}

/// The run's end is recorded once, at the cursor, and the run is finished;
/// the same end seen again (a re-poll) records nothing more.
#[tokio::test]
async fn a_finish_records_one_run_finished_at_the_cursor() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = open(&pg.url(), "a", Duration::from_secs(15)).await;
    subscribe(&store, RUN).await;
    let lease = claim_one(&store).await;
    let finishing = |sequences: std::ops::RangeInclusive<i64>| Batch {
        finish: Some(Finish {
            status: "failed".into(),
            error_message: Some("boom".into()),
            cancel_reason: None,
            sinks: vec![Arc::from(SINK)],
        }),
        ..batch(RUN, sequences)
    };
    let first = store
        .record_batch(&lease, finishing(1..=2))
        .await
        .expect("record");
    assert_eq!((first.cursor, first.recorded), (2, 3));
    let again = store
        .record_batch(&lease, finishing(1..=2))
        .await
        .expect("again");
    assert_eq!((again.recorded, again.dropped), (0, 2));
    let pending = store.pending_for_run(SINK, RUN, 10).await.expect("pending");
    let last = pending.last().expect("deliveries");
    assert_eq!(pending.len(), 3, "{pending:?}");
    assert_eq!(last.id, format!("{RUN}:finished:2"));
    assert_eq!(last.sequence, None);
    assert_eq!(
        last.payload,
        r#"{"status":"failed","errorMessage":"boom","lastSequence":2}"#
    );
    let client = pg.client().await;
    let state: String = client
        .query_one("SELECT state FROM runs WHERE run_id = $1", &[&RUN])
        .await
        .expect("run")
        .get(0);
    assert_eq!(state, "finished");
}

/// A replica that dies (no shutdown, no more renewals) stops counting after
/// a ttl, and its runs move to the survivor, each under the next epoch.
#[tokio::test]
async fn a_dead_replicas_runs_move_to_the_survivor_after_the_ttl() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let ttl = Duration::from_millis(900);
    let a = open(&pg.url(), "a", ttl).await;
    let b = open(&pg.url(), "b", ttl).await;
    for n in 0..10 {
        subscribe(&a, &format!("run-{n}")).await;
    }
    let (mut keeper_a, mut keeper_b) = (LeaseKeeper::new(a), LeaseKeeper::new(b));
    let seen = tick_until(&mut [&mut keeper_a, &mut keeper_b], &[5, 5], 12, ttl / 3).await;
    assert_eq!(
        seen.last().map(Vec::as_slice),
        Some(&[5, 5][..]),
        "{seen:?}"
    );
    let died_at = Instant::now();
    let orphaned = keeper_a.held();
    drop(keeper_a);
    let seen = tick_until(&mut [&mut keeper_b], &[10], 12, ttl / 3).await;
    assert_eq!(
        seen.last().map(Vec::as_slice),
        Some(&[10][..]),
        "b alone, tick by tick (four lease periods): {seen:?}"
    );
    assert!(
        died_at.elapsed() >= ttl * 2 / 3,
        "taken over after {:?}: before a's leases could expire",
        died_at.elapsed()
    );
    let held = keeper_b.held();
    for lease in orphaned {
        let now = held
            .iter()
            .find(|l| l.run_id == lease.run_id)
            .expect("moved");
        assert_eq!(now.epoch, lease.epoch + 1, "{}", lease.run_id);
    }
}

/// A replica that cannot reach its database says why at start, and never
/// repeats the URL, which may hold a password. Needs no server.
#[tokio::test]
async fn an_unreachable_or_malformed_url_is_refused_with_the_reason() {
    let nowhere = tempfile::tempdir().expect("temp dir");
    let url = format!(
        "host={} user=runhook dbname=runhook",
        nowhere.path().display()
    );
    let refused = PgStore::open(&url, replica("a", Duration::from_secs(15)))
        .await
        .expect_err("no server there");
    let text = refused.to_string();
    assert!(
        text.contains("error connecting to server") && text.contains("No such file"),
        "{text}"
    );
    let malformed = "postgres://runhook:s3cret@db:notaport/runhook";
    let refused = PgStore::open(malformed, replica("a", Duration::from_secs(15)))
        .await
        .expect_err("not a port");
    let text = refused.to_string();
    assert!(matches!(refused, PgStoreError::Url(_)), "{refused:?}");
    assert!(text.contains("port") && !text.contains("s3cret"), "{text}");
}

/// A keeper that ticks late finds its run taken over: reported lost, so the
/// caller stops it, and not renewed or held any more.
#[tokio::test]
async fn a_keeper_reports_a_run_taken_over_as_lost() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let ttl = Duration::from_millis(500);
    let a = open(&pg.url(), "a", ttl).await;
    let b = open(&pg.url(), "b", ttl).await;
    subscribe(&a, RUN).await;
    let mut keeper = LeaseKeeper::new(a);
    let gained = ticked(&mut keeper).await.gained;
    assert_eq!(gained.len(), 1);
    wait_for("b to take the run over", || async {
        let claimed = b.claim(1).await.map_err(|e| e.to_string())?;
        claimed.into_iter().next().ok_or("not yet".to_string())
    })
    .await;
    let changes = ticked(&mut keeper).await;
    assert_eq!(changes.lost, gained, "{changes:?}");
    assert_eq!(changes.gained, vec![], "b holds it now");
    assert_eq!(keeper.held(), vec![]);
}

/// A renewal does not wait for the owner's own writes in flight: the fence
/// locks the lease row `FOR KEY SHARE`, which an `UPDATE` of its expiry does
/// not conflict with, so a replica busy ingesting and delivering many runs
/// still renews in time. A takeover still waits: its claim locks the row
/// `FOR UPDATE`, and skips it while the write is in flight. Red (the
/// renewal stuck behind the batch) while the fence locked `FOR SHARE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_does_not_wait_for_a_write_in_flight_but_a_takeover_does() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let ttl = Duration::from_secs(60);
    let a = open(&pg.url(), "a", ttl).await;
    let b = open(&pg.url(), "b", ttl).await;
    subscribe(&a, RUN).await;
    let lease = claim_one(&a).await;
    let holder = pg.client().await;
    pg_store::hold_batches_of(&holder, RUN).await;
    let in_flight = pg_store::start_held(&holder, &a, &lease, batch(RUN, 1..=1)).await;
    let observer = pg.client().await;
    pg_store::wait_for_held(&observer).await;

    let renewed = tokio::time::timeout(
        Duration::from_secs(5),
        a.renew(std::slice::from_ref(&lease)),
    )
    .await
    .expect("the renewal waited for the write in flight")
    .expect("renew");
    assert_eq!(renewed, vec![lease.clone()]);
    // As if the lease had expired meanwhile: a takeover must still wait.
    tokio::time::timeout(
        Duration::from_secs(5),
        observer.execute(
            "UPDATE leases SET expires_at = now() - interval '1 second'",
            &[],
        ),
    )
    .await
    .expect("an expiry update does not wait either")
    .expect("expire");
    assert_eq!(
        b.claim(1).await.expect("claim"),
        vec![],
        "no takeover while the owner's write is in flight"
    );

    holder.batch_execute("COMMIT").await.expect("release");
    in_flight
        .await
        .expect("the batch ran")
        .expect("the fenced batch commits");
    let taken = b.claim(1).await.expect("claim");
    assert_eq!(taken.len(), 1, "then the takeover: {taken:?}");
    assert_eq!(taken[0].epoch, lease.epoch + 1);
    let stale = a.record_batch(&lease, batch(RUN, 2..=2)).await;
    assert!(
        matches!(stale, Err(PgStoreError::LeaseLost { .. })),
        "{stale:?}"
    );
}
