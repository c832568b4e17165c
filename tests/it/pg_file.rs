//! Deliveries no run's lease covers, on PostgreSQL against a real server
//! (`pg_support`): a file sink in a cluster, held by its node through a
//! sink lease (two processes of one node cannot both commit for it, nor
//! reconcile without it), and an unwatched run's pending deliveries, which
//! some replica must claim and whose lease must end when they are done.
//! Without PostgreSQL they pass after printing "skipped: no PostgreSQL"
//! (unless `RUNHOOK_REQUIRE_PG=1`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use runhook::config::DeliveryPolicy;
use runhook::deliver::file::run_file_sink;
use runhook::sink::file::FileSink;
use runhook::store::pg::{Lease, PgStore};
use runhook::store::{DeadFilter, Failure, Fence, Location, State, StateError, now_ms};
use tokio_util::sync::CancellationToken;

use crate::pg_support::PgServer;
use crate::support::pg_store::{batch, replica};
use crate::support::wait_for;

const RUN: &str = "9f2a1c7e-0000-4000-8000-0000000000f1";
const OTHER: &str = "9f2a1c7e-0000-4000-8000-0000000000f2";
const FILE: &str = "archive";
const HOOK: &str = "hook";
/// Short, so a "paused" holder's lease expires within a test.
const SHORT_TTL: Duration = Duration::from_secs(2);

/// The state as one process of `node` opens it.
async fn state(pg: &PgServer, node: &str, lease_ttl: Duration) -> State {
    State::open(&Location::Postgres(pg.url()), replica(node, lease_ttl))
        .await
        .expect("open the PostgreSQL state")
}

fn pg_of(state: &State) -> &PgStore {
    state.postgres().expect("a PostgreSQL state")
}

/// Subscribes to `runs`, claims them on `state` and records `sequences` of
/// each, routed to `sinks`. Returns the run leases.
async fn recorded(
    state: &State,
    runs: &[&str],
    sequences: std::ops::RangeInclusive<i64>,
    sinks: &[&str],
) -> BTreeMap<String, Lease> {
    for run in runs {
        state
            .subscribe(run.to_string(), BTreeMap::new(), "watch", None)
            .await
            .expect("subscribe");
    }
    let leases: BTreeMap<String, Lease> = pg_of(state)
        .claim(runs.len())
        .await
        .expect("claim")
        .into_iter()
        .map(|l| (l.run_id.to_string(), l))
        .collect();
    for run in runs {
        let fence = Fence::Lease(leases[*run].clone());
        state
            .record_batch(&fence, batch(run, sequences.clone(), sinks))
            .await
            .expect("record");
    }
    leases
}

/// The pending delivery rows of `sink`, in ingest order.
async fn pending(state: &State, sink: &str) -> Vec<i64> {
    let rows = state.pending_in_order(sink, 1000).await.expect("pending");
    rows.iter().map(|p| p.event).collect()
}

fn failure(events: Vec<i64>, dead: bool) -> Failure {
    Failure {
        events,
        status: None,
        error: "disk full".into(),
        next_attempt_at: now_ms() + 60_000,
        dead,
    }
}

/// Claims the sink on `state` once nobody else holds it (the holder's lease
/// expired: it stopped renewing, as a paused process does).
async fn claim_when_free(state: &State, sink: &str) -> Fence {
    wait_for("the sink's lease to be free", || async {
        match state.claim_sink(sink).await {
            Ok(Some(fence)) => Ok(fence),
            Ok(None) => Err("still held".to_string()),
            Err(error) => Err(error.to_string()),
        }
    })
    .await
}

fn sink_refused(result: Result<impl std::fmt::Debug, StateError>) {
    assert!(
        matches!(result, Err(StateError::SinkLeaseLost { .. })),
        "{result:?}"
    );
}

/// Two processes that both believe they are the file sink's node (the
/// same name given twice, or one paused past its lease): while one holds
/// the sink the other gets no fence; once it has taken the sink over, the
/// first one's marks, failures and reconciliation across runs are refused
/// and none of them lands, while the new holder's do.
#[tokio::test]
async fn a_second_claimer_of_a_file_sink_is_refused_and_commits_nothing() {
    let Some(pg) = PgServer::start() else { return };
    let first = state(&pg, "node-a", SHORT_TTL).await;
    let second = state(&pg, "node-a", SHORT_TTL).await;
    recorded(&first, &[RUN, OTHER], 1..=2, &[FILE]).await;
    // In ingest order: RUN:1, RUN:2, OTHER:1, OTHER:2.
    let rows = pending(&first, FILE).await;
    assert_eq!(rows.len(), 4, "two runs' rows: {rows:?}");
    let (firsts, seconds) = (vec![rows[0], rows[2]], vec![rows[1], rows[3]]);

    let held = first.claim_sink(FILE).await.expect("claim").expect("free");
    assert_eq!(
        second.claim_sink(FILE).await.expect("claim"),
        None,
        "held by the first process, though the node's name is the same"
    );
    // One mark spans both runs' rows: the sink's lease fences them all.
    first
        .mark_delivered(&held, FILE.into(), firsts, Some(10))
        .await
        .expect("the holder marks across runs");
    assert_eq!(pending(&first, FILE).await, seconds);

    // The first process stops renewing (paused); the second takes over.
    let taken = claim_when_free(&second, FILE).await;
    assert!(!first.renew_sink(&held).await.expect("renew"), "lost");
    sink_refused(
        first
            .mark_delivered(&held, FILE.into(), seconds.clone(), Some(99))
            .await,
    );
    sink_refused(
        first
            .record_failure(&held, FILE.into(), failure(seconds.clone(), true))
            .await,
    );
    let lines = vec![format!("{RUN}:2"), format!("{OTHER}:2")];
    sink_refused(
        first
            .mark_found_delivered(&held, FILE.into(), lines.clone(), 99)
            .await,
    );
    assert_eq!(pending(&first, FILE).await, seconds, "nothing landed");
    assert!(
        first
            .dead_letters(None, None)
            .await
            .expect("dead")
            .is_empty()
    );
    assert_eq!(first.sink_offset(FILE).await.expect("offset"), Some(10));

    let found = second
        .mark_found_delivered(&taken, FILE.into(), lines, 20)
        .await
        .expect("the new holder reconciles");
    assert_eq!(found, 2);
    assert!(pending(&second, FILE).await.is_empty());
    assert_eq!(second.sink_offset(FILE).await.expect("offset"), Some(20));
}

/// A file sink's reconciliation marks lines delivered across runs: without
/// the sink's own lease it is refused and marks nothing, whether it comes
/// with no lease, a run's lease, another sink's or a released one.
#[tokio::test]
async fn a_file_sinks_recovery_is_refused_without_its_fence() {
    let Some(pg) = PgServer::start() else { return };
    let state = state(&pg, "node-a", Duration::from_secs(60)).await;
    let leases = recorded(&state, &[RUN], 1..=2, &[FILE]).await;
    let lines = || vec![format!("{RUN}:1"), format!("{RUN}:2")];
    let recover = |fence: Fence| {
        let state = state.clone();
        async move {
            state
                .mark_found_delivered(&fence, FILE.into(), lines(), 77)
                .await
        }
    };

    let unfenced = recover(Fence::Exclusive).await;
    assert!(
        matches!(unfenced, Err(StateError::Unfenced { .. })),
        "{unfenced:?}"
    );
    let by_run = recover(Fence::Lease(leases[RUN].clone())).await;
    assert!(
        matches!(by_run, Err(StateError::Unfenced { .. })),
        "a run's lease does not fence a sink: {by_run:?}"
    );
    let elsewhere = state.claim_sink("other-file").await.expect("claim");
    sink_refused(recover(elsewhere.expect("free")).await);
    let released = state.claim_sink(FILE).await.expect("claim").expect("free");
    state.release_sink(&released).await.expect("release");
    sink_refused(recover(released).await);
    assert_eq!(pending(&state, FILE).await.len(), 2, "nothing marked");
    assert_eq!(state.sink_offset(FILE).await.expect("offset"), None);

    let held = state.claim_sink(FILE).await.expect("claim").expect("free");
    assert_eq!(recover(held).await.expect("the holder reconciles"), 2);
    assert_eq!(state.sink_offset(FILE).await.expect("offset"), Some(77));
}

fn lines_in(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            value["id"].as_str().expect("an id").to_owned()
        })
        .collect()
}

/// Two file loops of one node on two files (two machines given the same
/// name): one holds the sink and writes every line; the other writes none.
/// Stopped cleanly, the holder releases the sink and the other takes over
/// at once and writes what comes next.
#[tokio::test]
async fn two_file_loops_of_one_node_write_one_file() {
    let Some(pg) = PgServer::start() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = DeliveryPolicy {
        max_attempts: 3,
        max_age: Duration::from_secs(600),
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
    };
    let mut loops = Vec::new();
    for name in ["a.jsonl", "b.jsonl"] {
        let state = state(&pg, "node-a", SHORT_TTL).await;
        let path = dir.path().join(name);
        let file = Arc::new(FileSink::open(&path).expect("open the file"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_file_sink(
            FILE.into(),
            file,
            policy.clone(),
            state,
            stop.clone(),
        ));
        loops.push((path, stop, task));
    }
    let writer = state(&pg, "writer", Duration::from_secs(60)).await;
    let leases = recorded(&writer, &[RUN, OTHER], 1..=3, &[FILE]).await;
    let drained = || async {
        let left = pending(&writer, FILE).await;
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{} pending", left.len()))
        }
    };
    wait_for("the file sink to write every event", drained).await;
    let written: Vec<usize> = loops.iter().map(|(p, ..)| lines_in(p).len()).collect();
    assert!(
        written == [6, 0] || written == [0, 6],
        "one file has every line, once: {written:?}"
    );

    let holder = usize::from(written[0] == 0);
    let (_, stop, task) = loops.remove(holder);
    stop.cancel();
    task.await.expect("the loop ends").expect("cleanly");
    let fence = Fence::Lease(leases[RUN].clone());
    writer
        .record_batch(&fence, batch(RUN, 4..=5, &[FILE]))
        .await
        .expect("record more");
    wait_for("the other loop to take the sink over", drained).await;
    let (path, stop, task) = loops.remove(0);
    assert_eq!(
        lines_in(&path),
        [format!("{RUN}:4"), format!("{RUN}:5")],
        "the new holder writes only what came after"
    );
    stop.cancel();
    task.await.expect("the loop ends").expect("cleanly");
}

/// Who holds the lease of `run` now, as the table says (`None`: nobody).
async fn owner(pg: &PgServer, run: &str) -> Option<String> {
    let client = pg.client().await;
    let row = client
        .query_one("SELECT owner FROM leases WHERE run_id = $1", &[&run])
        .await
        .expect("the lease row");
    row.get(0)
}

/// `runhook replay` of an unwatched run's dead letter: no replica follows
/// the run, yet one claims it because it has a pending delivery, sees the
/// row and delivers it under its lease; while a retry waits its backoff the
/// lease is kept, and once nothing is pending it is released, not renewed.
#[tokio::test]
async fn a_replayed_dead_letter_of_an_unwatched_run_is_claimed_until_delivered() {
    let Some(pg) = PgServer::start() else { return };
    let first = state(&pg, "replica-a", Duration::from_secs(60)).await;
    let leases = recorded(&first, &[RUN], 1..=2, &[HOOK]).await;
    let fence = Fence::Lease(leases[RUN].clone());
    let rows = pending(&first, HOOK).await;
    first
        .mark_delivered(&fence, HOOK.into(), vec![rows[0]], None)
        .await
        .expect("delivered");
    first
        .record_failure(&fence, HOOK.into(), failure(vec![rows[1]], true))
        .await
        .expect("dead");
    assert!(first.unsubscribe(RUN.into()).await.expect("unwatch"));
    pg_of(&first).leave().await.expect("leave");

    let second = state(&pg, "replica-b", Duration::from_secs(60)).await;
    let pg2 = pg_of(&second);
    assert_eq!(pg2.fair_share().await.expect("share").runs, 0);
    assert!(pg2.claim(10).await.expect("claim").is_empty(), "no work");

    let replayed = DeadFilter {
        run: Some(RUN.into()),
        ..DeadFilter::default()
    };
    assert_eq!(second.replay(replayed).await.expect("replay"), 1);
    assert_eq!(pg2.fair_share().await.expect("share").runs, 1);
    let claimed = pg2.claim(10).await.expect("claim");
    assert_eq!(claimed.len(), 1, "the unwatched run with work: {claimed:?}");
    let lease = claimed[0].clone();
    assert_eq!(&*lease.run_id, RUN);
    let visible = second
        .pending_for_run(HOOK, RUN, 10)
        .await
        .expect("pending");
    assert_eq!(
        visible.iter().map(|p| p.event).collect::<Vec<_>>(),
        [rows[1]]
    );

    let fence = Fence::Lease(lease.clone());
    second
        .record_failure(&fence, HOOK.into(), failure(vec![rows[1]], false))
        .await
        .expect("a retry, due in a minute");
    assert_eq!(
        pg2.renew(std::slice::from_ref(&lease))
            .await
            .expect("renew"),
        std::slice::from_ref(&lease),
        "a retry waiting its backoff is work: the lease is kept"
    );
    second
        .mark_delivered(&fence, HOOK.into(), vec![rows[1]], None)
        .await
        .expect("delivered under the lease");
    assert!(
        pg2.renew(std::slice::from_ref(&lease))
            .await
            .expect("renew")
            .is_empty(),
        "nothing left: not renewed"
    );
    assert_eq!(owner(&pg, RUN).await, None, "released, not left to expire");
    assert!(pg2.claim(10).await.expect("claim").is_empty());
    assert_eq!(pg2.fair_share().await.expect("share").runs, 0);
}

/// A file sink's node delivers its rows under the sink's lease, whoever
/// holds the run: an unwatched run whose only pending deliveries are to a
/// node's file sink keeps no run lease, while one to an HTTP sink does.
#[tokio::test]
async fn only_pending_deliveries_a_run_lease_covers_claim_an_unwatched_run() {
    let Some(pg) = PgServer::start() else { return };
    let state = state(&pg, "replica-a", Duration::from_secs(60)).await;
    recorded(&state, &[RUN], 1..=1, &[FILE]).await;
    recorded(&state, &[OTHER], 1..=1, &[FILE, HOOK]).await;
    state.claim_sink(FILE).await.expect("claim").expect("free");
    for run in [RUN, OTHER] {
        assert!(state.unsubscribe(run.into()).await.expect("unwatch"));
    }
    let pg1 = pg_of(&state);
    pg1.leave().await.expect("release every run");

    let claimed = pg1.claim(10).await.expect("claim");
    let runs: Vec<&str> = claimed.iter().map(|l| &*l.run_id).collect();
    assert_eq!(runs, [OTHER], "only the run with an HTTP delivery pending");
    assert_eq!(pg1.fair_share().await.expect("share").runs, 1);
}

/// A file sink in a cluster runs only on the replica its `node` names (the
/// daemon starts no loop for it elsewhere); on SQLite, one machine, every
/// file sink runs, whatever it names.
#[tokio::test]
async fn a_file_sink_is_written_only_by_the_node_it_names() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = Location::Sqlite(dir.path().join("state.db"));
    let sqlite = State::open(&sqlite, replica("node-a", SHORT_TTL))
        .await
        .expect("open SQLite");
    for node in [Some("node-a"), Some("node-b"), None] {
        assert!(sqlite.writes_sink_of(node), "{node:?} on SQLite");
    }
    let Some(pg) = PgServer::start() else { return };
    let state = state(&pg, "node-a", SHORT_TTL).await;
    assert!(state.writes_sink_of(Some("node-a")));
    assert!(!state.writes_sink_of(Some("node-b")));
    assert!(
        !state.writes_sink_of(None),
        "no node: nowhere (check refuses it)"
    );
}
