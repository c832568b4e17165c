//! The built binary, killed with SIGKILL at random moments and restarted on
//! the same state: every event reaches every sink; webhook repeats only with
//! the same id and no more than the kills; the file exactly once, in order.
//!
//! `RUNHOOK_CRASH_SEED` replays a run; `RUNHOOK_SOAK=1` makes it longer.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::{RngExt, SeedableRng};
use runhook::simulate::Scenario;
use runhook::simulate::scenario::Bulk;

use crate::receiver::{Receiver, SECRET};
use crate::support::*;

fn spawn_daemon(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_runhook"))
        .args(["--config", &config.display().to_string(), "run"])
        .env("RUNHOOK_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("runhook starts")
}

#[tokio::test]
async fn sigkill_at_random_moments_loses_nothing_and_repeats_only_ids() {
    let soak = std::env::var_os("RUNHOOK_SOAK").is_some();
    let (runs, events, kills) = if soak {
        (200, 1000, 100)
    } else {
        (50, 200, 20)
    };
    let seed: u64 = std::env::var("RUNHOOK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("crash test seed: {seed} (RUNHOOK_CRASH_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let bulk = Bulk {
        runs,
        events,
        interval: Duration::from_millis(1),
        prefix: "kill".into(),
    };
    let sim = start_sim(Scenario {
        page_size: 50,
        bulk: Some(bulk),
        ..Scenario::default()
    })
    .await;
    let ids = sim.run_ids();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let receiver = Receiver::start().await;
    let mut env = Env::new(&sim, &refs);
    env.extra = format!(
        "\n[sinks.ops]\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\ninitial_backoff = \"50ms\"\nconcurrency = 1\n\n[[routes]]\nsinks = [\"ops\"]\n",
        receiver.url()
    );
    let config = env.write_config();
    for _ in 0..kills {
        let mut child = spawn_daemon(&config);
        tokio::time::sleep(Duration::from_millis(rng.random_range(30..400))).await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }
    let mut child = spawn_daemon(&config);
    let started = std::time::Instant::now();
    let expected = runs * (events + 1);
    let lines = env.wait_finished(&refs).await;
    println!("file complete after {:?}", started.elapsed());
    // One delivery at a time in a debug build: give it room on a busy machine.
    wait_for_within(
        Duration::from_secs(600),
        "every webhook delivery",
        || async {
            let distinct: std::collections::HashSet<String> =
                receiver.accepted().into_iter().map(|r| r.id).collect();
            if distinct.len() == expected {
                Ok(())
            } else {
                Err(format!("{} of {expected}", distinct.len()))
            }
        },
    )
    .await;
    println!("webhooks complete after {:?}", started.elapsed());
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());

    let raw = std::fs::read_to_string(env.events_path()).unwrap();
    for run in &refs {
        assert_run_exactly_once(&sim, &lines, run, &raw);
    }
    assert_eq!(lines.len(), expected, "the file holds each event once");

    // A kill can catch a delivery in flight: accepted by the receiver, not
    // yet recorded. With `concurrency = 1` one is in flight at a time, so
    // there are at most as many repeats as kills (with more concurrency,
    // one per run in flight), and a repeat is the same id, right after itself.
    let accepted = receiver.accepted();
    let repeats = accepted.len() - expected;
    println!("{repeats} repeated deliveries over {kills} kills");
    let mut per_run: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for request in &accepted {
        let run = request.id.split(':').next().unwrap().to_owned();
        per_run.entry(run).or_default().push(request.id.clone());
    }
    assert!(
        repeats <= kills,
        "{repeats} repeats for {kills} kills (seed {seed})"
    );
    for (run, mut delivered) in per_run {
        let sent = delivered.len();
        delivered.dedup();
        assert!(
            sent - delivered.len() <= kills,
            "run {run}: {} repeats for {kills} kills (seed {seed})",
            sent - delivered.len()
        );
        let mut want: Vec<String> = (1..=events).map(|s| format!("{run}:{s}")).collect();
        want.push(format!("{run}:finished:{events}"));
        assert_eq!(delivered, want, "run {run}: per-run order (seed {seed})");
    }
    for request in &accepted {
        assert!(request.verified_new, "every delivery is signed");
    }
}
