//! Runs the upstream refuses: a 404 is believed only when it lasts, `watch`
//! gives a stopped run another chance, and a run whose stream is missing
//! (404/405) while its `GET` works is polled instead of stopped.

use std::time::Duration;

use runhook::simulate::{Fault, FaultKind, Simulator};

use crate::support::*;

fn status_fault(run: &str, endpoint: Option<&str>, status: u16, count: Option<u32>) -> Fault {
    Fault {
        run: Some(run.into()),
        endpoint: endpoint.map(str::to_owned),
        count,
        kind: FaultKind::Status {
            status,
            retry_after: None,
        },
    }
}

/// Polling, with 404s confirmed over `window`.
fn env_confirming(backend: Backend, sim: &Simulator, runs: &[&str], window: &str) -> Env {
    let mut env = Env::on(backend, sim, runs);
    env.api
        .push_str(&format!("not_found_confirm = \"{window}\"\n"));
    env
}

async fn wait_state(env: &Env, run: &str, state: &str) {
    wait_for(state, || async {
        match env.run_row(run).await {
            Some(row) if row.state == state => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

on_both! {
    async fn a_404_for_a_moment_does_not_lose_the_run(backend: Backend) {
        let sim = sim_with(vec![scripted("run-deploy", numbered(5))]).await;
        sim.inject(status_fault("run-deploy", Some("events"), 404, Some(2)));
        let env = env_confirming(backend, &sim, &["run-deploy"], "3s");
        let daemon = env.start();
        let lines = finished_within_20s(&env, "run-deploy", "the run finished despite two 404s").await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        assert_run_exactly_once(&sim, &lines, "run-deploy", &raw);
    }
}

on_both! {
    async fn watch_again_restarts_a_stopped_run(backend: Backend) {
        let sim = sim_with(vec![scripted("run-back", numbered(4))]).await;
        sim.inject(status_fault("run-back", None, 404, None));
        let env = env_confirming(backend, &sim, &["run-back"], "100ms");
        let daemon = env.start();
        wait_state(&env, "run-back", "not_found").await;
        sim.clear_faults();
        // What `runhook watch run-back` does, beside the running daemon.
        let store = env.open_state()
            .await
            .expect("state opens");
        store
            .subscribe("run-back".into(), Default::default(), "watch", None)
            .await
            .expect("watch");
        let lines = finished_within_20s(&env, "run-back", "the watched-again run finished").await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        assert_run_exactly_once(&sim, &lines, "run-back", &raw);
    }
}

on_both! {
    async fn a_stream_answering_404_or_405_for_a_run_that_exists_is_polled(backend: Backend) {
        let sim = sim_with(vec![
            scripted("run-s404", numbered(4)),
            scripted("run-s405", numbered(4)),
        ])
        .await;
        sim.inject(status_fault("run-s404", Some("stream"), 404, None));
        sim.inject(status_fault("run-s405", Some("stream"), 405, None));
        // The cookie only: polling falls back on it.
        let mut env = Env::on(backend, &sim, &["run-s404", "run-s405"]);
        env.token = String::new();
        env.api = format!(
            "session_cookie = \"{}\"\npoll_interval = \"50ms\"\n",
            sim.session()
        );
        let daemon = env.start();
        let lines = wait_for_within(
            Duration::from_secs(20),
            "both runs finished by polling",
            || async {
                let lines = env.lines();
                let finished = lines.iter().filter(|l| l["type"] == "run_finished").count();
                if finished == 2 {
                    Ok(lines)
                } else {
                    Err(format!("{:?}", env.runs().await))
                }
            },
        )
        .await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        for run in ["run-s404", "run-s405"] {
            assert_run_exactly_once(&sim, &lines, run, &raw);
            let row = env.run_row(run).await.unwrap();
            assert_eq!(
                row.transport.map(runhook::config::Transport::name),
                Some("poll"),
                "{run}"
            );
        }
    }
}

on_both! {
    async fn a_restart_retries_a_stopped_run(backend: Backend) {
        let sim = sim_with(vec![scripted("run-restart", numbered(3))]).await;
        sim.inject(status_fault("run-restart", None, 404, None));
        let env = env_confirming(backend, &sim, &[], "100ms");
        // Watched with `watch`, not from the config: a restart must still retry it.
        let store = env.open_state()
            .await
            .expect("state opens");
        store
            .subscribe("run-restart".into(), Default::default(), "watch", None)
            .await
            .expect("watch");
        drop(store);
        let daemon = env.start();
        wait_state(&env, "run-restart", "not_found").await;
        daemon.stop().await;
        sim.clear_faults();
        let daemon = env.start();
        let lines = finished_within_20s(
            &env,
            "run-restart",
            "the stopped run finished after a restart",
        )
        .await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        assert_run_exactly_once(&sim, &lines, "run-restart", &raw);
    }
}

/// Waits (20 s at most) for the run's `run_finished` in the file; shows the
/// run's row while it is not there.
async fn finished_within_20s(env: &Env, run: &str, what: &str) -> Vec<serde_json::Value> {
    wait_for_within(Duration::from_secs(20), what, || async {
        let lines = env.lines();
        let row = env.run_row(run).await;
        if lines.iter().any(|l| l["type"] == "run_finished") {
            Ok(lines)
        } else {
            Err(format!("{row:?}"))
        }
    })
    .await
}
