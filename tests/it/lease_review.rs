//! Review of the daemon's wiring to leases (issue 14): a sink's dispatcher
//! on a real PostgreSQL state, driven by an [`Ownership`] the test
//! publishes to, as the lease task would.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runhook::config::{Config, SinkKind};
use runhook::deliver::runs::{SinkRuntime, run_http_sink};
use runhook::ownership::Ownership;
use runhook::sink::Sender;
use runhook::sink::webhook::WebhookSink;
use runhook::store::pg::{Lease, PgStore, Replica};
use runhook::store::{Batch, Fence, NewEvent, State};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::pg_support::PgDatabase;
use crate::receiver::{Receiver, SECRET};
use crate::support::wait_for_within;

const RUN: &str = "9f2a1c7e-0000-4000-8000-0000000000r2";
const SINK: &str = "ops";

async fn open(pg: &PgDatabase) -> PgStore {
    let replica = Replica {
        node: "a".into(),
        lease_ttl: Duration::from_secs(60),
        share_slack: 0,
    };
    PgStore::open(&pg.url(), replica)
        .await
        .expect("open the PostgreSQL store")
}

fn batch(sequences: impl IntoIterator<Item = i64>) -> Batch {
    Batch {
        run_id: RUN.into(),
        events: sequences
            .into_iter()
            .map(|sequence| NewEvent {
                sequence,
                event_type: "PHASE_STARTED".into(),
                payload: RawValue::from_string(format!("{{\"n\": {sequence}}}")).expect("json"),
                created_at: None,
                sinks: vec![Arc::from(SINK)],
            })
            .collect(),
        run_status: Some("running".into()),
        phase: None,
        finish: None,
        stalled: None,
    }
}

fn webhook_sink(state: &State, url: &str, ownership: Ownership) -> Arc<SinkRuntime> {
    sink_runtime(state, url, ownership, true, 4)
}

fn sink_runtime(
    state: &State,
    url: &str,
    ownership: Ownership,
    ordered: bool,
    concurrency: usize,
) -> Arc<SinkRuntime> {
    let text = format!(
        "[api]\ntoken = \"t\"\n[sinks.{SINK}]\ntype = \"webhook\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n[[routes]]\nsinks = [\"{SINK}\"]\n"
    );
    let config = Config::parse(&text, Path::new("t.toml"), &|_| None).expect("config");
    let sink = &config.sinks[SINK];
    let SinkKind::Webhook(webhook) = &sink.kind else {
        panic!("a webhook sink")
    };
    Arc::new(SinkRuntime {
        name: sink.name.clone(),
        sender: Sender::Webhook(WebhookSink::new(webhook).expect("client")),
        policy: sink.delivery.clone(),
        ordered,
        pipeline: false,
        concurrency,
        state: state.clone(),
        ownership,
        shutdown: CancellationToken::new(),
    })
}

/// `RUN` watched, its lease claimed, and events `sequences` recorded under
/// it: the state every delivery test here starts from.
async fn watched_with_events(
    pg: &PgDatabase,
    sequences: std::ops::RangeInclusive<i64>,
) -> (State, Lease) {
    let store = open(pg).await;
    store
        .subscribe(RUN.into(), BTreeMap::new(), "watch", None)
        .await
        .expect("subscribe");
    let lease: Lease = store.claim(1).await.expect("claim").remove(0);
    let state = State::Postgres(store);
    state
        .record_batch(&Fence::Lease(lease.clone()), batch(sequences))
        .await
        .expect("record under the lease");
    (state, lease)
}

/// A replica whose lease renewal came late (its trust lapsed for a moment,
/// the database slow) while the run's work became known: the dispatcher
/// saw the run's pending deliveries (its start-up scan, or a new-work
/// notice) while the lease was listed but not trusted. When the renewal
/// comes (the same lease, trusted again) the run's deliveries must go out;
/// they used to be dropped from the board, so an unwatched or finished
/// run's backlog waited for ever on the replica that kept renewing its
/// lease (the run has work, so the lease is never released).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_seen_while_a_lease_renewal_is_late_is_delivered_once_it_is_renewed() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let (state, lease) = watched_with_events(&pg, 1..=3).await;

    let (publisher, ownership) = Ownership::leased();
    // Listed, but its trust lapsed: the renewal is late.
    publisher.publish([(lease.clone(), Instant::now() - Duration::from_millis(1))]);
    let receiver = Receiver::start().await;
    let sink = webhook_sink(&state, &receiver.url(), ownership);
    let stop = sink.shutdown.clone();
    let dispatcher = tokio::spawn(run_http_sink(sink));
    // The dispatcher's first scan (and a notice for one more event) meet
    // the lapsed lease.
    tokio::time::sleep(Duration::from_millis(300)).await;
    state
        .record_batch(&Fence::Lease(lease.clone()), batch(4..=4))
        .await
        .expect("record under the lease");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.requests().is_empty(), "nothing sent while lapsed");

    // The renewal: the same lease, trusted again.
    publisher.publish([(lease, Instant::now() + Duration::from_secs(60))]);
    let ids = wait_for_within(
        Duration::from_secs(20),
        "the run's four deliveries after the renewal",
        || {
            let receiver = receiver.clone();
            async move {
                let ids: Vec<String> = receiver.accepted().into_iter().map(|r| r.id).collect();
                if ids.len() >= 4 {
                    Ok(ids)
                } else {
                    Err(format!("delivered so far: {ids:?}"))
                }
            }
        },
    )
    .await;
    stop.cancel();
    dispatcher
        .await
        .expect("join")
        .expect("the loop ends cleanly");
    let expected: Vec<String> = (1..=4).map(|n| format!("{RUN}:{n}")).collect();
    assert_eq!(ids, expected, "each once, in order");
}

/// An unordered sink (`ordered = false`) sends a run's batch of due
/// deliveries `concurrency` at a time. Its lease's trust must be checked
/// before each send, as an ordered chain does, not once for the batch: a
/// batch of up to 64 against a slow receiver outlasts the trust, and every
/// send started after it may come after another replica took the run over
/// (a repeat the new owner also sends). Here the trust lapses during the
/// batch and comes back with a renewal later: nothing may arrive between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unordered_sink_sends_nothing_once_its_lease_is_no_longer_trusted() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let (state, lease) = watched_with_events(&pg, 1..=6).await;

    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_secs(1));
    let (publisher, ownership) = Ownership::leased();
    let trusted_until = Instant::now() + Duration::from_millis(1500);
    publisher.publish([(lease.clone(), trusted_until)]);
    let sink = sink_runtime(&state, &receiver.url(), ownership, false, 1);
    let stop = sink.shutdown.clone();
    let dispatcher = tokio::spawn(run_http_sink(sink));

    // The renewal comes late: the trust lapsed from `trusted_until` until
    // now (the scenario's timing, not a wait for a condition).
    tokio::time::sleep_until((trusted_until + Duration::from_millis(2500)).into()).await;
    let renewed_at = Instant::now();
    publisher.publish([(lease, Instant::now() + Duration::from_secs(60))]);
    let requests = wait_for_within(Duration::from_secs(30), "all six delivered", || {
        let receiver = receiver.clone();
        async move {
            let ids: std::collections::HashSet<String> =
                receiver.accepted().into_iter().map(|r| r.id).collect();
            if ids.len() == 6 {
                Ok(receiver.requests())
            } else {
                Err(format!("delivered so far: {ids:?}"))
            }
        }
    })
    .await;
    stop.cancel();
    dispatcher
        .await
        .expect("join")
        .expect("the loop ends cleanly");
    // A send checked just before the trust ended arrives a little after.
    let slack = Duration::from_millis(250);
    let untrusted: Vec<(String, Duration)> = requests
        .iter()
        .filter(|r| r.arrived > trusted_until + slack && r.arrived < renewed_at)
        .map(|r| (r.id.clone(), r.arrived - trusted_until))
        .collect();
    assert!(
        untrusted.is_empty(),
        "sent while the lease was not trusted (after its end): {untrusted:?}"
    );
}

/// The run's lease row: owner and epoch.
async fn lease_row(client: &tokio_postgres::Client, run: &str) -> (Option<String>, i64) {
    let row = client
        .query_one("SELECT owner, epoch FROM leases WHERE run_id = $1", &[&run])
        .await
        .expect("the run's lease row");
    (row.get(0), row.get(1))
}

/// Two `runhook run` under one node name: `[cluster] node` defaults to the
/// host name, so two replicas on one machine, or one started twice by
/// mistake (on SQLite the daemon lock refuses the second; on PostgreSQL
/// nothing does). Leases are owned by node name, and `leave` (SIGTERM)
/// releases every lease of the node: the second process's stop gives the
/// first one's runs up while the first still trusts them (up to two thirds
/// of a ttl) and goes on ingesting and sending them, beside whichever
/// replica claims them next. Its writes are refused (the epoch moves), but
/// its sends are made after the takeover. A process now releases only the
/// leases it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_second_process_of_one_node_leaves_the_first_ones_leases_alone() {
    use crate::support::{Process, event, scripted, sim_with};
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let receiver = Receiver::start().await;
    let run = "run-00";
    let events = (0..300)
        .map(|i| event("PHASE_STARTED", &format!(r#"{{"i":{i}}}"#)))
        .collect();
    let mut scripted_run = scripted(run, events);
    scripted_run.interval = Duration::from_millis(100);
    let sim = sim_with(vec![scripted_run]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = |file: &str, port: u16| {
        let text = format!(
            "[api]\nbase_url = \"{}\"\ntoken = \"{}\"\ntransport = \"poll\"\npoll_interval = \"50ms\"\n\n\
             [state]\nurl = \"{}\"\nshutdown_grace = \"5s\"\n\n\
             [cluster]\nnode = \"a\"\nlease_ttl = \"3s\"\n\n\
             [server]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [sinks.hook]\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\n\
             [[routes]]\nsinks = [\"hook\"]\n",
            sim.url(),
            sim.token(),
            pg.postgres_url(),
            receiver.url(),
        );
        let path = dir.path().join(file);
        std::fs::write(&path, text).expect("write config");
        path
    };
    let healthy = |port: u16| async move {
        let url = format!("http://127.0.0.1:{port}/healthz");
        match reqwest::get(&url).await {
            Ok(answer) if answer.status().is_success() => Ok(()),
            Ok(answer) => Err(format!("{}", answer.status())),
            Err(error) => Err(error.to_string()),
        }
    };
    let (port_1, port_2) = (
        crate::observability::free_port(),
        crate::observability::free_port(),
    );
    let first = Process::start(&config("first.toml", port_1));
    wait_for_within(Duration::from_secs(30), "the first up", || healthy(port_1)).await;
    let state = State::open(
        &runhook::store::Location::Postgres(pg.url()),
        Replica::bystander(),
    )
    .await
    .expect("open the state");
    state
        .subscribe(run.into(), BTreeMap::new(), "watch", None)
        .await
        .expect("watch");
    let client = pg.client().await;
    let held = wait_for_within(
        Duration::from_secs(30),
        "the first holding the run",
        || async {
            match lease_row(&client, run).await {
                (Some(owner), epoch) if owner == "a" => Ok(epoch),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    let second = Process::start(&config("second.toml", port_2));
    wait_for_within(Duration::from_secs(30), "the second up", || healthy(port_2)).await;
    second.stop().await;
    let after = lease_row(&client, run).await;
    first.stop().await;
    assert_eq!(
        after,
        (Some("a".to_owned()), held),
        "the first process's lease was given up (or retaken under a new epoch) by the second's stop"
    );
}

/// SIGTERM: ingest stops, in-flight deliveries drain (up to
/// `shutdown_grace`), then the replica leaves. Its lease task ticks through
/// the drain to keep the leases its chains write under; it must not claim
/// runs meanwhile: nothing here works them any more (the supervisor and
/// the dispatchers have stopped), so a run claimed during the drain would
/// wait for the leave (up to the grace) instead of going to a live replica
/// at its next tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_claims_no_new_runs() {
    use crate::support::{Process, event, scripted, sim_with, write_replica_config};
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let receiver = Receiver::start().await;
    let (busy, newcomer) = ("run-00", "run-01");
    let script = |run: &str| {
        let events = (0..50)
            .map(|i| event("PHASE_STARTED", &format!(r#"{{"i":{i}}}"#)))
            .collect();
        let mut scripted_run = scripted(run, events);
        scripted_run.interval = Duration::from_millis(100);
        scripted_run
    };
    let sim = sim_with(vec![script(busy), script(newcomer)]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    // shutdown_grace 5 s; a tick every second.
    let config = write_replica_config(
        dir.path(),
        "a",
        &pg.postgres_url(),
        "3s",
        &sim,
        &receiver.url(),
    );
    let a = Process::start(&config);
    let state = State::open(
        &runhook::store::Location::Postgres(pg.url()),
        Replica::bystander(),
    )
    .await
    .expect("open the state");
    state
        .subscribe(busy.into(), BTreeMap::new(), "watch", None)
        .await
        .expect("watch");
    wait_for_within(Duration::from_secs(30), "a delivery in flight", || {
        let receiver = receiver.clone();
        async move {
            if receiver.requests().is_empty() {
                Err("none yet".to_owned())
            } else {
                Ok(())
            }
        }
    })
    .await;
    // Slow answers from now on: the drain lasts a few ticks.
    receiver.set_delay(Duration::from_secs(4));
    wait_for_within(Duration::from_secs(30), "a slow delivery in flight", || {
        let receiver = receiver.clone();
        async move {
            if receiver.requests().iter().any(|r| r.answered == 0) {
                Ok(())
            } else {
                Err("none unanswered yet".to_owned())
            }
        }
    })
    .await;
    let stopping = tokio::spawn(a.stop());
    // The drain has begun once the replica stopped fetching (ingest stops
    // first); the newcomer is watched during it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    state
        .subscribe(newcomer.into(), BTreeMap::new(), "watch", None)
        .await
        .expect("watch");
    let client = pg.client().await;
    let mut claimed_while_draining = None;
    while !stopping.is_finished() {
        if let Ok(row) = client
            .query_one("SELECT owner FROM leases WHERE run_id = $1", &[&newcomer])
            .await
        {
            let owner: Option<String> = row.get(0);
            if owner.is_some() {
                claimed_while_draining = owner;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stopping.await.expect("a exits 0");
    assert_eq!(
        claimed_while_draining, None,
        "a claimed a run during its drain"
    );
}

/// Fair share: a replica above its share sheds leases to the others. A
/// shed run's chain may be in the middle of a send; the lease must outlive
/// that send's outcome (the shedder's mark accepted) and move at the next
/// tick, or the receiver gets the delivery again from the next owner: a
/// repeat no kill or pause caused (the failover test's per-run bound
/// caught one: `fo-33`, shed when a replica joined).
#[tokio::test]
async fn a_shed_lease_outlives_its_chains_last_outcome_and_moves_at_the_next_tick() {
    use runhook::store::pg::LeaseKeeper;
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let replica = |node: &str| Replica {
        node: node.into(),
        lease_ttl: Duration::from_secs(60),
        share_slack: 0,
    };
    let a = PgStore::open(&pg.url(), replica("a"))
        .await
        .expect("open a");
    let b = PgStore::open(&pg.url(), replica("b"))
        .await
        .expect("open b");
    let (first, second) = (RUN, "run-z");
    assert!(first < second, "the higher run id is shed");
    for run in [first, second] {
        a.subscribe(run.into(), BTreeMap::new(), "watch", None)
            .await
            .expect("subscribe");
    }
    let mut keeper_a = LeaseKeeper::new(a.clone());
    let gained = keeper_a.tick().await.gained;
    assert_eq!(gained.len(), 2, "a alone holds both: {gained:?}");
    let shed = gained
        .iter()
        .find(|l| &*l.run_id == second)
        .expect("the second run's lease")
        .clone();
    let state_a = State::Postgres(a.clone());
    let mut one = batch(1..=1);
    one.run_id = second.into();
    state_a
        .record_batch(&Fence::Lease(shed.clone()), one)
        .await
        .expect("record");
    let in_flight: Vec<i64> = state_a
        .pending_for_run(SINK, second, 10)
        .await
        .expect("pending")
        .iter()
        .map(|p| p.event)
        .collect();

    // b joins: a's share is one run now.
    let mut keeper_b = LeaseKeeper::new(b.clone());
    assert!(keeper_b.tick().await.gained.is_empty(), "both held by a");
    let changes = keeper_a.tick().await;
    assert_eq!(changes.lost, vec![shed.clone()], "a sheds the second run");

    // The chain that was sending when a shed the run records its outcome.
    state_a
        .mark_delivered(&Fence::Lease(shed.clone()), SINK.into(), in_flight, None)
        .await
        .expect("the shed run's last outcome is accepted: its lease moves at the next tick");

    keeper_a.tick().await;
    let moved = keeper_b.tick().await.gained;
    assert_eq!(
        moved.iter().map(|l| &*l.run_id).collect::<Vec<_>>(),
        vec![second],
        "b takes the shed run at its next tick"
    );
}

/// A shed run's chain may be in a send when the run is shed, and a send
/// lasts up to its sink's timeout (a webhook's defaults to 10 s, Slack's
/// is 10 s) while `lease_ttl` may be as short as 3 s. Released a ttl after
/// the shed, the lease went to the next owner while that send was still
/// in flight: it sent the same delivery again beside it, a repeat no
/// fault caused (the failover test's per-run bound counts those). The shed
/// lease stays until its work ended or a send started before the shed must
/// have ended.
#[tokio::test]
async fn a_shed_lease_stays_while_a_send_started_before_the_shed_may_be_in_flight() {
    use runhook::store::pg::LeaseKeeper;
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let ttl = Duration::from_secs(3);
    let longest_send = Duration::from_secs(5);
    let replica = |node: &str| Replica {
        node: node.into(),
        lease_ttl: ttl,
        share_slack: 0,
    };
    let a = PgStore::open(&pg.url(), replica("a"))
        .await
        .expect("open a");
    let b = PgStore::open(&pg.url(), replica("b"))
        .await
        .expect("open b");
    let (first, second) = (RUN, "run-z");
    for run in [first, second] {
        a.subscribe(run.into(), BTreeMap::new(), "watch", None)
            .await
            .expect("subscribe");
    }
    // The shed run's chain is still sending (its work never ends here).
    let mut keeper_a = LeaseKeeper::new(a.clone())
        .releasing_when(|_| false)
        .sends_last_at_most(longest_send);
    assert_eq!(keeper_a.tick().await.gained.len(), 2, "a alone holds both");
    let mut keeper_b = LeaseKeeper::new(b.clone());
    assert!(keeper_b.tick().await.gained.is_empty(), "both held by a");
    let shed_at = Instant::now();
    let changes = keeper_a.tick().await;
    assert_eq!(changes.lost.len(), 1, "a sheds the second run: {changes:?}");

    // Ticking at the lease cadence, as the lease tasks do.
    let mut ticks = tokio::time::interval(ttl / 3);
    let moved_at = loop {
        ticks.tick().await;
        keeper_a.tick().await;
        if !keeper_b.tick().await.gained.is_empty() {
            break shed_at.elapsed();
        }
        assert!(
            shed_at.elapsed() < longest_send + ttl * 2,
            "the shed run never moved"
        );
    };
    assert!(
        moved_at >= longest_send,
        "the shed run moved {moved_at:?} after the shed, while a send started before it \
         may last {longest_send:?}"
    );
}
