//! End-to-end benchmark over the simulator's high-throughput mode on
//! 127.0.0.1. `cargo bench --bench e2e` prints a table; medians of a few
//! repetitions, since the machines are shared and noisy.
//!
//! RUNHOOK_BENCH_EVENTS sets the size of (a) (default 200000);
//! RUNHOOK_BENCH_REPS the repetitions (default 3).

use std::sync::Arc;
use std::time::{Duration, Instant};

use runhook::config::Config;
use runhook::simulate::scenario::Bulk;
use runhook::simulate::{Scenario, Simulator};
use runhook::store::Reader;
use tokio_util::sync::CancellationToken;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (a) 1 run x N events, polling -> file sink: events/s from daemon start to
/// the last delivery marked done.
async fn polling_to_file(events: usize) -> f64 {
    let bulk = Bulk {
        runs: 1,
        events,
        interval: Duration::ZERO,
        prefix: "bench".into(),
    };
    let scenario = Scenario {
        page_size: 5000,
        bulk: Some(bulk),
        ..Scenario::default()
    };
    let sim = Simulator::start(([127, 0, 0, 1], 0).into(), scenario)
        .await
        .expect("simulator");
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("runhook.db");
    let text = format!(
        "[api]\nbase_url = \"{}\"\ntoken = \"{}\"\ntransport = \"poll\"\npoll_interval = \"20ms\"\n\
         [state]\npath = \"{}\"\n[[runs]]\nid = \"bench-00000\"\n\
         [sinks.archive]\ntype = \"file\"\npath = \"{}\"\n[[routes]]\nsinks = [\"archive\"]\n",
        sim.url(),
        sim.token(),
        state.display(),
        dir.path().join("events.jsonl").display()
    );
    let config = Config::parse(&text, &dir.path().join("bench.toml"), &|_| None).expect("config");
    let shutdown = CancellationToken::new();
    let start = Instant::now();
    let daemon = tokio::spawn(runhook::daemon::run(Arc::new(config), shutdown.clone()));
    while !state.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reader = Reader::open(&state).expect("reader");
    loop {
        let sinks = reader.sinks().await.expect("sinks");
        if sinks.first().is_some_and(|s| s.done as usize == events + 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed();
    shutdown.cancel();
    let _ = daemon.await;
    (events + 1) as f64 / elapsed.as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let reps = env_usize("RUNHOOK_BENCH_REPS", 3);
    let events = env_usize("RUNHOOK_BENCH_EVENTS", 200_000);
    let runs: Vec<f64> = (0..reps)
        .map(|_| runtime.block_on(polling_to_file(events)))
        .collect();
    println!("| scenario | median | runs |");
    println!("|---|---|---|");
    println!(
        "| (a) 1 run x {events} events, polling -> file | {:.0} events/s | {} |",
        median(runs.clone()),
        runs.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
