//! Retention: delivered events are pruned after `state.retain`; dead
//! letters stay until replayed or purged; finished runs with nothing left
//! to deliver leave the runs table for a tombstone that keeps them from
//! being ingested again (after a restart, or watched again).

use crate::support::{Backend, on_both};
use runhook::store::{Batch, DeadFilter, Failure, Fence, NewEvent, State, now_ms};
use serde_json::value::RawValue;

fn events(run: &str, range: std::ops::RangeInclusive<i64>) -> Batch {
    Batch {
        run_id: run.into(),
        events: range
            .map(|sequence| NewEvent {
                sequence,
                event_type: "X".into(),
                payload: RawValue::from_string("{}".into()).unwrap(),
                created_at: None,
                sinks: vec!["ops".into()],
            })
            .collect(),
        run_status: Some("running".into()),
        phase: None,
        finish: None,
        stalled: None,
    }
}

// SQLite only: store-level under Fence::Exclusive; prune, dead letters and
// purge on both backends are state.rs's.
#[tokio::test]
async fn delivered_events_are_pruned_and_dead_letters_kept_until_purged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = crate::support::open_state(&path).await.unwrap();
    store
        .subscribe("r".into(), Default::default(), "watch", None)
        .await
        .unwrap();
    store
        .record_batch(&Fence::Exclusive, events("r", 1..=4))
        .await
        .unwrap();
    let reader = crate::support::reads(&path).await.unwrap();
    let pending = reader.pending_for_run("ops", "r", 10).await.unwrap();
    let rows: Vec<i64> = pending.iter().map(|p| p.event).collect();
    // 1 and 2 delivered, 3 dead, 4 still pending.
    store
        .mark_delivered(&Fence::Exclusive, "ops".into(), rows[..2].to_vec(), None)
        .await
        .unwrap();
    let dead = Failure {
        events: vec![rows[2]],
        status: Some(500),
        error: "boom".into(),
        next_attempt_at: 0,
        dead: true,
    };
    store
        .record_failure(&Fence::Exclusive, "ops".into(), dead)
        .await
        .unwrap();

    // Nothing is old enough yet.
    assert_eq!(store.prune(now_ms() - 60_000).await.unwrap(), (0, 0));
    // Everything is, now: only the delivered ones go.
    assert_eq!(store.prune(now_ms() + 60_000).await.unwrap(), (2, 2));
    let sinks = reader.sinks().await.unwrap();
    assert_eq!((sinks[0].done, sinks[0].dead, sinks[0].pending), (0, 1, 1));
    assert_eq!(reader.dead_letters(None, None).await.unwrap()[0].id, "r:3");
    assert_eq!(
        reader.pending_for_run("ops", "r", 10).await.unwrap()[0].id,
        "r:4"
    );

    // The cursor is untouched: pruned events are not ingested again.
    let again = store
        .record_batch(&Fence::Exclusive, events("r", 1..=4))
        .await
        .unwrap();
    assert_eq!((again.recorded, again.dropped, again.cursor), (0, 4, 4));

    let purged = store
        .purge_dead(DeadFilter {
            sink: Some("ops".into()),
            ..DeadFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(purged, 1);
    assert!(reader.dead_letters(None, None).await.unwrap().is_empty());
}

/// `count(*)` of a table, straight from the file.
fn count(path: &std::path::Path, table: &str) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

/// The store's commit counter; it moves once per writer transaction.
fn commits(store: &State) -> u64 {
    *store.commits().borrow()
}

/// Waits until the millisecond clock has passed `t`, so rows written next
/// are stamped after it.
async fn clock_past(t: i64) {
    crate::support::wait_for("the clock to move on", || async move {
        if now_ms() > t {
            Ok(())
        } else {
            Err(format!("still {t}"))
        }
    })
    .await;
}

fn bulk(run: &str, range: std::ops::RangeInclusive<i64>, sinks: &[&str]) -> Batch {
    let mut batch = events(run, range);
    for event in &mut batch.events {
        event.sinks = sinks.iter().map(|s| (*s).into()).collect();
    }
    batch
}

/// Maintenance on a large state database (200,000 deliveries) keeps what it
/// must, and works in bounded chunks, each its own writer transaction, so
/// ingest and delivery get the writer in between (the watchdog's ping too).
// SQLite only: it counts the SQLite writer's transactions per chunk.
#[tokio::test]
async fn maintenance_on_a_large_database_is_right_and_works_in_chunks() {
    const EVENTS: i64 = 100_000;
    const CHUNK: u64 = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = crate::support::open_state(&path).await.unwrap();
    for run in ["r", "n", "m"] {
        store
            .subscribe(run.into(), Default::default(), "watch", None)
            .await
            .unwrap();
    }
    // Run r: every event to sinks a and b (200,000 deliveries); run n: 1,000
    // events routed nowhere.
    for start in (1..=EVENTS).step_by(10_000) {
        store
            .record_batch(
                &Fence::Exclusive,
                bulk("r", start..=start + 9_999, &["a", "b"]),
            )
            .await
            .unwrap();
    }
    store
        .record_batch(&Fence::Exclusive, bulk("n", 1..=1_000, &[]))
        .await
        .unwrap();
    let rowid = |sequence: i64| sequence; // r's events were recorded first
    // Before the cutoff: a has everything delivered, b events 1..=60,000;
    // b's 60,001..=80,000 are dead.
    store
        .mark_delivered(
            &Fence::Exclusive,
            "a".into(),
            (rowid(1)..=rowid(EVENTS)).collect(),
            None,
        )
        .await
        .unwrap();
    store
        .mark_delivered(
            &Fence::Exclusive,
            "b".into(),
            (rowid(1)..=rowid(60_000)).collect(),
            None,
        )
        .await
        .unwrap();
    let dead = |events: Vec<i64>| Failure {
        events,
        status: Some(500),
        error: "boom".into(),
        next_attempt_at: 0,
        dead: true,
    };
    store
        .record_failure(
            &Fence::Exclusive,
            "b".into(),
            dead((rowid(60_001)..=rowid(80_000)).collect()),
        )
        .await
        .unwrap();
    clock_past(now_ms()).await;
    let cutoff = now_ms();
    clock_past(cutoff).await;
    // After the cutoff: b's 80,001..=90,000 delivered; 90,001.. stay
    // pending; run m records 10 events routed nowhere.
    store
        .mark_delivered(
            &Fence::Exclusive,
            "b".into(),
            (rowid(80_001)..=rowid(90_000)).collect(),
            None,
        )
        .await
        .unwrap();
    store
        .record_batch(&Fence::Exclusive, bulk("m", 1..=10, &[]))
        .await
        .unwrap();

    let before = commits(&store);
    let (deliveries, events) = store.prune(cutoff).await.unwrap();
    let transactions = commits(&store) - before;
    assert_eq!(deliveries, 160_000, "a's 100,000 and b's first 60,000");
    assert_eq!(events, 61_000, "r's 1..=60,000 and all of n");
    assert!(
        transactions >= 160_000 / CHUNK,
        "prune ran as {transactions} writer transactions; expected chunks of at most {CHUNK} rows"
    );
    assert_eq!(count(&path, "deliveries"), 40_000);
    assert_eq!(count(&path, "events"), 40_010);
    let reader = crate::support::reads(&path).await.unwrap();
    let sinks = reader.sinks().await.unwrap();
    let b = sinks.iter().find(|s| s.sink == "b").unwrap();
    assert_eq!((b.done, b.dead, b.pending), (10_000, 20_000, 10_000));
    assert!(
        sinks
            .iter()
            .all(|s| s.sink != "a" || s.done + s.pending + s.dead == 0)
    );
    // A second prune finds nothing more.
    assert_eq!(store.prune(cutoff).await.unwrap(), (0, 0));

    let only_b = || DeadFilter {
        sink: Some("b".into()),
        ..DeadFilter::default()
    };
    let before = commits(&store);
    assert_eq!(store.replay(only_b()).await.unwrap(), 20_000);
    let transactions = commits(&store) - before;
    assert!(
        transactions >= 20_000 / CHUNK,
        "replay ran as {transactions} writer transactions"
    );
    assert!(reader.dead_letters(None, None).await.unwrap().is_empty());
    let b = reader.sinks().await.unwrap();
    let b = b.iter().find(|s| s.sink == "b").unwrap();
    assert_eq!((b.dead, b.pending), (0, 30_000));

    store
        .record_failure(
            &Fence::Exclusive,
            "b".into(),
            dead((rowid(60_001)..=rowid(80_000)).collect()),
        )
        .await
        .unwrap();
    let before = commits(&store);
    assert_eq!(store.purge_dead(only_b()).await.unwrap(), 20_000);
    let transactions = commits(&store) - before;
    assert!(
        transactions >= 20_000 / CHUNK,
        "purge ran as {transactions} writer transactions"
    );
    assert_eq!(count(&path, "deliveries"), 20_000);
}

/// `retain` this short (and `finished_linger` within it, as the config
/// requires) so a test can let a finished run age past it.
const SHORT_RETAIN: &str = "1s";

/// Starts the daemon on `env` with [`SHORT_RETAIN`]; its prune pass runs
/// at start.
fn start_short_retain(env: &crate::support::Env) -> crate::support::Daemon {
    let text = env.config_text().replace(
        "shutdown_grace = \"5s\"",
        &format!("shutdown_grace = \"5s\"\nretain = \"{SHORT_RETAIN}\""),
    );
    let config =
        runhook::config::Config::parse(&text, &env.dir.path().join("runhook.toml"), &|_| None)
            .expect("valid config");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(runhook::daemon::run(
        std::sync::Arc::new(config),
        shutdown.clone(),
    ));
    crate::support::Daemon { shutdown, task }
}

/// The simulator's requests about `run`.
fn requests_for(sim: &runhook::simulate::Simulator, run: &str) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r.run_id.as_deref() == Some(run))
        .count()
}

/// The file's lines of `run`, asserting each event id appears once.
fn lines_of(env: &crate::support::Env, run: &str) -> usize {
    let ids: Vec<String> = env
        .final_lines()
        .iter()
        .filter(|l| l["runId"] == run)
        .map(|l| l["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "{run} delivered once each: {ids:?}"
    );
    ids.len()
}

/// `runhook --state STATE ARGS...`, its stdout.
fn cli(env: &crate::support::Env, args: &[&str]) -> String {
    let state = env.state_arg();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_runhook"))
        .args(["--state", state.as_str()])
        .args(args)
        .env("RUNHOOK_LOG", "error")
        .output()
        .expect("runhook runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "runhook {args:?}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A simulator with runs `r1` (5 events) and `r2` (3 events), both
/// completing at once; a daemon has followed `r1` to its end and delivered
/// it, and a second daemon start, past [`SHORT_RETAIN`], pruned it.
async fn with_r1_pruned(
    backend: crate::support::Backend,
) -> (runhook::simulate::Simulator, crate::support::Env) {
    use crate::support::{numbered, scripted, sim_with, wait_for};
    let sim = sim_with(vec![
        scripted("r1", numbered(5)),
        scripted("r2", numbered(3)),
    ])
    .await;
    let mut env = crate::support::Env::on(backend, &sim, &["r1"]);
    env.api
        .push_str(&format!("finished_linger = \"{SHORT_RETAIN}\"\n"));
    let daemon = start_short_retain(&env);
    env.wait_finished(&["r1"]).await;
    daemon.stop().await;
    assert_eq!(lines_of(&env, "r1"), 6, "5 events and run_finished");
    clock_past(now_ms() + 1_000).await;

    let daemon = start_short_retain(&env);
    let reader = env.reads().await.unwrap();
    wait_for("the prune at start to move r1 to its tombstone", || async {
        match reader.pruned_run("r1".into()).await {
            Ok(Some(pruned)) => Ok(pruned),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    daemon.stop().await;
    assert!(env.run_row("r1").await.is_none(), "r1 left the runs table");
    (sim, env)
}

on_both! {
    /// The runs row is the cursor: were a pruned run in the config subscribed
    /// again without its tombstone, the restart would fetch it from sequence 0
    /// and deliver every event a second time.
    async fn a_pruned_finished_run_in_the_config_is_not_ingested_again_after_a_restart(backend: Backend) {
        let (sim, mut env) = with_r1_pruned(backend).await;
        let asked = requests_for(&sim, "r1");
        env.runs = vec!["r1".into(), "r2".into()];
        let daemon = start_short_retain(&env);
        // r2 followed to its end: the daemon has subscribed its config runs
        // and started what it follows.
        env.wait_finished(&["r2"]).await;
        daemon.stop().await;

        assert_eq!(
            requests_for(&sim, "r1"),
            asked,
            "no request for the pruned run: {:?}",
            sim.requests()
        );
        assert_eq!(lines_of(&env, "r1"), 6, "r1 not delivered again");
        assert_eq!(lines_of(&env, "r2"), 4);
        let one = cli(&env, &["status", "--run", "r1"]);
        assert!(one.contains("finished (pruned)"), "{one}");
        assert!(one.contains("completed"), "{one}");
        let all = cli(&env, &["status"]);
        assert!(
            all.lines()
                .next()
                .unwrap_or_default()
                .contains("1 finished runs pruned"),
            "{all}"
        );
    }
}

on_both! {
    /// `runhook watch` and `PUT /v1/watch` of a pruned run say so and change
    /// nothing: no follower, no fetch from sequence 0, no delivery again.
    async fn watching_a_pruned_run_again_does_not_deliver_it_again(backend: Backend) {
        const TOKEN: &str = "retain-token-0123456789";
        let (sim, mut env) = with_r1_pruned(backend).await;
        let asked = requests_for(&sim, "r1");
        env.runs = Vec::new();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        env.extra = format!("\n[server]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n");
        let daemon = start_short_retain(&env);
        let answer = cli(&env, &["watch", "r1"]);
        assert!(answer.contains("pruned"), "{answer}");
        let client = reqwest::Client::new();
        let put = crate::support::wait_for("PUT /v1/watch/r1 answered", || async {
            let sent = client
                .put(format!("http://127.0.0.1:{port}/v1/watch/r1"))
                .bearer_auth(TOKEN)
                .send()
                .await;
            match sent {
                Ok(answer) if answer.status().is_success() => answer
                    .json::<serde_json::Value>()
                    .await
                    .map_err(|e| e.to_string()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        assert_eq!(put["watching"], false, "{put}");
        assert_eq!(put["state"], "finished (pruned)", "{put}");
        // Watched after r1: once r2 is delivered, the daemon has looked at the
        // watched runs since r1's `watch`.
        assert!(cli(&env, &["watch", "r2"]).contains("watching r2"));
        env.wait_finished(&["r2"]).await;
        daemon.stop().await;

        assert_eq!(
            requests_for(&sim, "r1"),
            asked,
            "no request for the pruned run: {:?}",
            sim.requests()
        );
        assert_eq!(lines_of(&env, "r1"), 6, "r1 not delivered again");
        assert!(
            env.run_row("r1").await.is_none(),
            "r1 stays out of the runs table"
        );
    }
}
