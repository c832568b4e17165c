//! Replicas on one PostgreSQL state (issue 14): `runhook run` processes
//! sharing runs by lease, each following its runs from a simulator of its
//! own (so each simulator's request log says which replica fetched what)
//! and delivering to one receiver. Without PostgreSQL they pass after
//! printing "skipped: no PostgreSQL".

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use runhook::simulate::Simulator;
use runhook::simulate::scenario::ScriptedEvent;
use runhook::store::pg::Replica;
use runhook::store::{Location, RunState, State};

use crate::pg_support::PgServer;
use crate::receiver::{Answer, Receiver, SECRET};
use crate::support::{Process, event, scripted, sim_with, wait_for, write_replica_config};

/// Short, so takeovers happen within a test: a tick every second.
const LEASE_TTL: Duration = Duration::from_secs(3);
const LEASE_TTL_TEXT: &str = "3s";

/// The database, the receiver, and a bystander's view of the state.
struct Cluster {
    pg: PgServer,
    dir: tempfile::TempDir,
    receiver: Receiver,
    state: State,
}

impl Cluster {
    async fn start(pg: PgServer) -> Self {
        let receiver = Receiver::start().await;
        receiver.trust(SECRET);
        let state = State::open(&Location::Postgres(pg.url()), Replica::bystander())
            .await
            .expect("open the PostgreSQL state");
        Self {
            pg,
            dir: tempfile::tempdir().expect("temp dir"),
            receiver,
            state,
        }
    }

    /// `runhook run` as `node`, following its runs from `sim`.
    fn replica(&self, node: &str, sim: &Simulator) -> Process {
        let config = write_replica_config(
            self.dir.path(),
            node,
            &url_of(&self.pg),
            LEASE_TTL_TEXT,
            sim,
            &self.receiver.url(),
        );
        Process::start(&config)
    }

    async fn wait_replicas(&self, nodes: &[&str]) {
        let client = self.pg.client().await;
        let nodes: BTreeSet<String> = nodes.iter().map(|n| n.to_string()).collect();
        wait_for("the replicas' heartbeats", || async {
            let live: BTreeSet<String> = client
                .query("SELECT node FROM replicas", &[])
                .await
                .map_err(|e| e.to_string())?
                .iter()
                .map(|row| row.get(0))
                .collect();
            if nodes.is_subset(&live) {
                Ok(())
            } else {
                Err(format!("live: {live:?}"))
            }
        })
        .await
    }

    /// `runhook watch` for each run, as an operator would.
    async fn watch(&self, runs: &[String]) {
        for run in runs {
            self.state
                .subscribe(run.clone(), Default::default(), "watch", None)
                .await
                .expect("watch");
        }
    }

    /// Each run's lease owner now (`None`: released or never claimed).
    async fn owners(&self) -> BTreeMap<String, Option<String>> {
        let client = self.pg.client().await;
        client
            .query("SELECT run_id, owner FROM leases", &[])
            .await
            .expect("read leases")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }

    async fn wait_owned(
        &self,
        what: &str,
        check: impl Fn(&BTreeMap<String, Option<String>>) -> bool,
    ) {
        wait_for(what, || async {
            let owners = self.owners().await;
            if check(&owners) {
                Ok(owners)
            } else {
                Err(format!("{owners:?}"))
            }
        })
        .await;
    }

    /// Waits until every run's events and `run_finished` were accepted,
    /// and returns the accepted webhooks as (id, run, sequence, payload).
    async fn wait_delivered(&self, runs: &[String], events: usize) -> Vec<Delivered> {
        wait_for("every event of every run delivered", || async {
            let delivered = delivered(&self.receiver);
            let ids: BTreeSet<&str> = delivered.iter().map(|d| d.id.as_str()).collect();
            let finished = runs.iter().all(|run| {
                delivered
                    .iter()
                    .any(|d| d.run == *run && d.id.contains(":finished:"))
            });
            if finished && ids.len() == runs.len() * (events + 1) {
                Ok(delivered)
            } else {
                Err(format!(
                    "{} distinct ids of {}",
                    ids.len(),
                    runs.len() * (events + 1)
                ))
            }
        })
        .await
    }
}

/// One accepted webhook.
#[derive(Debug, Clone)]
struct Delivered {
    id: String,
    run: String,
    sequence: Option<i64>,
    payload: serde_json::Value,
}

fn delivered(receiver: &Receiver) -> Vec<Delivered> {
    receiver
        .accepted()
        .iter()
        .map(|r| {
            let body = r.json();
            Delivered {
                id: r.id.clone(),
                run: body["data"]["runId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                sequence: body["data"]["sequence"].as_i64(),
                payload: body["data"]["payload"].clone(),
            }
        })
        .collect()
}

/// The PostgreSQL URL of the test server, as a user writes `[state] url`.
fn url_of(pg: &PgServer) -> String {
    let dir = pg
        .url()
        .split_whitespace()
        .find_map(|pair| pair.strip_prefix("host="))
        .expect("a socket directory")
        .replace('/', "%2F");
    format!("postgresql://runhook@{dir}/postgres")
}

fn run_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("run-{i:02}")).collect()
}

/// `events` events per run, each payload naming `from` (which simulator,
/// so which replica, fetched it), one every `interval`.
async fn simulator(runs: &[String], events: usize, from: &str, interval: Duration) -> Simulator {
    let script = |run: &String| {
        let events: Vec<ScriptedEvent> = (0..events)
            .map(|i| event("PHASE_STARTED", &format!(r#"{{"i":{i},"from":"{from}"}}"#)))
            .collect();
        let mut run = scripted(run, events);
        run.interval = interval;
        run
    };
    sim_with(runs.iter().map(script).collect()).await
}

/// Which runs a simulator was asked about.
fn fetched(sim: &Simulator) -> BTreeSet<String> {
    sim.requests()
        .into_iter()
        .filter_map(|request| request.run_id)
        .collect()
}

fn requests_for(sim: &Simulator, runs: &BTreeSet<String>) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r.run_id.as_ref().is_some_and(|run| runs.contains(run)))
        .count()
}

/// Every event once in the first deliveries of each id, in per-run order,
/// `run_finished` last; repeats only under the same id. Returns how many
/// requests were repeats.
fn assert_complete_in_order(delivered: &[Delivered], runs: &[String], events: usize) -> usize {
    let mut first: HashMap<&str, &Delivered> = HashMap::new();
    let mut by_run: BTreeMap<&str, Vec<&Delivered>> = BTreeMap::new();
    for d in delivered {
        if first.insert(&d.id, d).is_none() {
            by_run.entry(&d.run).or_default().push(d);
        }
    }
    for run in runs {
        let seen = by_run.get(run.as_str()).cloned().unwrap_or_default();
        let sequences: Vec<i64> = seen.iter().filter_map(|d| d.sequence).collect();
        let expected: Vec<i64> = (1..=events as i64).collect();
        assert_eq!(sequences, expected, "{run}: every event once, in order");
        assert!(
            seen.last().is_some_and(|d| d.id.contains(":finished:")),
            "{run}: run_finished last"
        );
    }
    delivered.len() - first.len()
}

/// Two replicas on one database: each run is ingested by one of them,
/// the runs are spread across both, and every event reaches the webhook
/// once, in per-run order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_runs_and_deliver_every_event_once_in_order() {
    let Some(pg) = PgServer::start() else { return };
    let cluster = Cluster::start(pg).await;
    let runs = run_ids(6);
    let events = 30;
    let sim_a = simulator(&runs, events, "a", Duration::ZERO).await;
    let sim_b = simulator(&runs, events, "b", Duration::ZERO).await;
    let a = cluster.replica("a", &sim_a);
    let b = cluster.replica("b", &sim_b);
    cluster.wait_replicas(&["a", "b"]).await;
    cluster.watch(&runs).await;

    let delivered = cluster.wait_delivered(&runs, events).await;
    let repeats = assert_complete_in_order(&delivered, &runs, events);
    assert_eq!(repeats, 0, "no replica died: nothing is sent twice");
    let (by_a, by_b) = (fetched(&sim_a), fetched(&sim_b));
    println!("ingested by a: {by_a:?}; by b: {by_b:?}");
    assert!(
        by_a.is_disjoint(&by_b),
        "a run ingested by both replicas: {:?}",
        by_a.intersection(&by_b).collect::<Vec<_>>()
    );
    let all: BTreeSet<String> = runs.iter().cloned().collect();
    assert_eq!(&by_a | &by_b, all, "every run ingested");
    assert!(
        !by_a.is_empty() && !by_b.is_empty(),
        "runs spread across both"
    );
    for d in &delivered {
        let from = d.payload["from"].as_str();
        let expected = if by_a.contains(&d.run) { "a" } else { "b" };
        if d.sequence.is_some() {
            assert_eq!(from, Some(expected), "{}: fetched by its owner", d.id);
        }
    }
    a.stop().await;
    b.stop().await;
}

/// SIGTERM on one replica: it drains, releases its leases, and the other
/// takes its runs at its next tick (well under `lease_ttl`); nothing is
/// lost or sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_by_sigterm_hands_its_runs_over_within_a_tick() {
    let Some(pg) = PgServer::start() else { return };
    let cluster = Cluster::start(pg).await;
    let runs = run_ids(4);
    let events = 40;
    let interval = Duration::from_millis(150);
    let sim_a = simulator(&runs, events, "a", interval).await;
    let sim_b = simulator(&runs, events, "b", interval).await;
    let a = cluster.replica("a", &sim_a);
    let b = cluster.replica("b", &sim_b);
    cluster.wait_replicas(&["a", "b"]).await;
    cluster.watch(&runs).await;
    cluster
        .wait_owned("both replicas holding runs", |owners| {
            let held = |node: &str| owners.values().any(|o| o.as_deref() == Some(node));
            owners.len() == runs.len() && held("a") && held("b")
        })
        .await;
    wait_for("a delivering", || async {
        let n = delivered(&cluster.receiver)
            .iter()
            .filter(|d| d.payload["from"] == "a")
            .count();
        if n > 0 {
            Ok(())
        } else {
            Err("nothing from a yet".to_owned())
        }
    })
    .await;

    a.stop().await;
    let stopped = Instant::now();
    cluster
        .wait_owned("b holding every run", |owners| {
            owners.values().all(|o| o.as_deref() == Some("b"))
        })
        .await;
    let handed_over = stopped.elapsed();
    println!("runs taken over {handed_over:?} after a exited (lease_ttl {LEASE_TTL:?})");
    assert!(
        handed_over < LEASE_TTL * 2 / 3,
        "the runs moved after {handed_over:?}: not at b's next tick, but only once a's leases expired"
    );

    let delivered = cluster.wait_delivered(&runs, events).await;
    let repeats = assert_complete_in_order(&delivered, &runs, events);
    assert_eq!(repeats, 0, "a drained before it left: nothing sent twice");
    b.stop().await;
}

/// A replica paused (SIGSTOP) past `lease_ttl` loses its runs to the other;
/// resumed (SIGCONT), it stops working them and commits nothing for them:
/// every event stored once, those above the cursor at the takeover fetched
/// by the new owner. Replica a's simulator runs ahead of b's, so a stale a
/// that went on ingesting would record events b has not fetched yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_lease_was_taken_over_commits_nothing_for_those_runs() {
    let Some(pg) = PgServer::start() else { return };
    let cluster = Cluster::start(pg).await;
    let runs = run_ids(2);
    let events = 40;
    let sim_a = simulator(&runs, events, "a", Duration::from_millis(100)).await;
    let sim_b = simulator(&runs, events, "b", Duration::from_millis(250)).await;
    // a first, so it holds the runs; b joins below its fair share and
    // claims nothing until a's leases expire.
    let a = cluster.replica("a", &sim_a);
    cluster.wait_replicas(&["a"]).await;
    cluster.watch(&runs).await;
    cluster
        .wait_owned("a holding every run", |owners| {
            owners.len() == runs.len() && owners.values().all(|o| o.as_deref() == Some("a"))
        })
        .await;
    let b = cluster.replica("b", &sim_b);
    cluster.wait_replicas(&["a", "b"]).await;
    wait_for("a ingesting", || async {
        let cursors = cursors(&cluster.state).await;
        if cursors.values().all(|c| *c > 0) {
            Ok(())
        } else {
            Err(format!("{cursors:?}"))
        }
    })
    .await;

    a.signal("STOP");
    cluster
        .wait_owned("b taking every run over", |owners| {
            owners.values().all(|o| o.as_deref() == Some("b"))
        })
        .await;
    // b claimed each run only once a's last write had ended (the claim
    // skips a lease row a write holds): from here on, a commits nothing.
    let at_takeover = cursors(&cluster.state).await;
    a.signal("CONT");
    // a's lease task runs at once on resume; two heartbeats later it has
    // renewed (and lost) its leases and told its workers.
    let client = cluster.pg.client().await;
    for beat in 0..2 {
        let before: Option<std::time::SystemTime> = heartbeat(&client, "a").await;
        wait_for("a's heartbeat after the resume", || async {
            let now = heartbeat(&client, "a").await;
            if now > before {
                Ok(())
            } else {
                Err(format!("beat {beat}: {now:?}"))
            }
        })
        .await;
    }
    let taken: BTreeSet<String> = runs.iter().cloned().collect();
    let asked_after_resume = requests_for(&sim_a, &taken);

    let delivered = cluster.wait_delivered(&runs, events).await;
    assert_complete_in_order(&delivered, &runs, events);
    assert_eq!(
        requests_for(&sim_a, &taken),
        asked_after_resume,
        "a went on fetching runs another replica owns"
    );
    let stored = stored_events(&client).await;
    for (run, sequence, from) in &stored {
        if *sequence > at_takeover[run] {
            assert_eq!(
                from, "b",
                "{run}:{sequence} above the cursor at the takeover ({}) committed by a after b took over",
                at_takeover[run]
            );
        }
    }
    let once: BTreeSet<(&String, &i64)> = stored.iter().map(|(r, s, _)| (r, s)).collect();
    assert_eq!(once.len(), stored.len(), "an event stored twice");
    assert_eq!(stored.len(), runs.len() * events, "every event stored");
    a.stop().await;
    b.stop().await;
}

/// A run's backlog changes hands with its lease: the replica that takes
/// a finished run over (no event will ever come again to wake its sink)
/// looks for the run's pending deliveries as soon as it holds the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_taken_over_is_delivered_without_a_new_event() {
    let Some(pg) = PgServer::start() else { return };
    let cluster = Cluster::start(pg).await;
    let runs = run_ids(2);
    let events = 10;
    let sim_a = simulator(&runs, events, "a", Duration::ZERO).await;
    let sim_b = simulator(&runs, events, "b", Duration::ZERO).await;
    cluster.receiver.set_default(Some(Answer::Status(503)));
    let a = cluster.replica("a", &sim_a);
    cluster.wait_replicas(&["a"]).await;
    cluster.watch(&runs).await;
    wait_for(
        "a ingesting every run to its end, the webhook refusing them",
        || async {
            let rows = cluster
                .state
                .reads()
                .runs()
                .await
                .map_err(|e| e.to_string())?;
            let finished =
                rows.len() == runs.len() && rows.iter().all(|r| r.state == RunState::Finished);
            if finished && !cluster.receiver.requests().is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{:?}",
                    rows.iter()
                        .map(|r| (&r.run_id, r.state))
                        .collect::<Vec<_>>()
                ))
            }
        },
    )
    .await;
    a.stop().await;

    cluster.receiver.set_default(None);
    let b = cluster.replica("b", &sim_b);
    let delivered = cluster.wait_delivered(&runs, events).await;
    assert_complete_in_order(&delivered, &runs, events);
    assert!(fetched(&sim_b).is_empty(), "b had nothing to ingest");
    b.stop().await;
}

async fn cursors(state: &State) -> BTreeMap<String, i64> {
    state
        .reads()
        .runs()
        .await
        .expect("read runs")
        .into_iter()
        .map(|run| (run.run_id, run.cursor))
        .collect()
}

async fn heartbeat(client: &tokio_postgres::Client, node: &str) -> Option<std::time::SystemTime> {
    client
        .query_opt(
            "SELECT heartbeat_at FROM replicas WHERE node = $1",
            &[&node],
        )
        .await
        .expect("read heartbeat")
        .map(|row| row.get(0))
}

/// (run, sequence, which simulator's payload) of every upstream event stored.
async fn stored_events(client: &tokio_postgres::Client) -> Vec<(String, i64, String)> {
    client
        .query(
            "SELECT run_id, sequence, payload FROM events WHERE sequence IS NOT NULL",
            &[],
        )
        .await
        .expect("read events")
        .iter()
        .map(|row| {
            let payload: serde_json::Value =
                serde_json::from_str(row.get::<_, &str>(2)).expect("payload JSON");
            let from = payload["from"].as_str().unwrap_or_default().to_owned();
            (row.get(0), row.get(1), from)
        })
        .collect()
}
