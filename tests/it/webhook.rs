//! Webhook delivery: Standard Webhooks signatures, per-run order through
//! outages, the probe, Retry-After, redirects, dead letters and replay,
//! retry state across restarts.

use std::process::Command;
use std::time::Duration;

use runhook::simulate::Scenario;

use crate::receiver::{Answer, OLD_SECRET, Receiver, SECRET};
use crate::support::*;

fn webhook_env(
    backend: Backend,
    sim: &runhook::simulate::Simulator,
    runs: &[&str],
    receiver: &Receiver,
    sink_keys: &str,
) -> Env {
    let mut env = Env::on(backend, sim, runs);
    env.extra = format!(
        "\n[sinks.ops]\ntype = \"webhook\"\nurl = \"{}\"\nheaders = {{ \"x-team\" = \"ops\" }}\n\
         initial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n{sink_keys}\n\n[[routes]]\nsinks = [\"ops\"]\n",
        receiver.url()
    );
    if !sink_keys.contains("secret") {
        env.extra = env.extra.replace(
            "[sinks.ops]\n",
            &format!("[sinks.ops]\nsecret = \"{SECRET}\"\n"),
        );
    }
    env
}

fn runhook(config: &std::path::Path, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_runhook"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "runhook {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn wait_accepted(receiver: &Receiver, count: usize) -> Vec<crate::receiver::Received> {
    wait_for(&format!("{count} deliveries accepted"), || async {
        let accepted = receiver.accepted();
        if accepted.len() >= count {
            Ok(accepted)
        } else {
            Err(format!("{} accepted", accepted.len()))
        }
    })
    .await
}

/// For each run, the accepted sequences come in order, each once.
fn assert_per_run_order(accepted: &[crate::receiver::Received], runs: &[&str], per_run: usize) {
    for run in runs {
        let ids: Vec<String> = accepted
            .iter()
            .map(|r| r.id.clone())
            .filter(|id| id.starts_with(&format!("{run}:")))
            .collect();
        let mut expected: Vec<String> = (1..=per_run).map(|s| format!("{run}:{s}")).collect();
        expected.push(format!("{run}:finished:{per_run}"));
        assert_eq!(ids, expected, "run {run}: in order, once each");
    }
}

on_both! {
    async fn deliveries_verify_with_the_reference_library_during_rotation(backend: Backend) {
        let sim = sim_with(vec![scripted("run-sig", numbered(3))]).await;
        let receiver = Receiver::start().await;
        let env = webhook_env(
            backend,
            &sim,
            &["run-sig"],
            &receiver,
            &format!("secrets = [\"{SECRET}\", \"{OLD_SECRET}\"]"),
        );
        let daemon = env.start();
        let accepted = wait_accepted(&receiver, 4).await;
        daemon.stop().await;
        for request in &accepted {
            assert!(
                request.verified_new && request.verified_old,
                "both signatures verify: {}",
                request.signature
            );
            assert_eq!(request.signature.split(' ').count(), 2);
            assert!(
                request.user_agent.starts_with("runhook/"),
                "{}",
                request.user_agent
            );
            assert_eq!(request.content_type, "application/json");
            assert_eq!(request.extra_header.as_deref(), Some("ops"));
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            assert!((now - request.timestamp.parse::<i64>().unwrap()).abs() < 60);
        }
        let first = accepted[0].json();
        assert_eq!(accepted[0].id, "run-sig:1");
        assert_eq!(first["type"], "PHASE_STARTED");
        assert_eq!(first["data"]["id"], "run-sig:1");
        assert_eq!(first["data"]["runId"], "run-sig");
        assert_eq!(first["data"]["sequence"], 1);
        assert_eq!(first["data"]["eventType"], "PHASE_STARTED");
        assert_eq!(first["data"]["labels"]["team"], "rome");
        assert!(first["timestamp"].is_string());
        let raw = String::from_utf8(accepted[0].body.to_vec()).unwrap();
        assert!(
            raw.contains(r#""payload":{"i":0,"x":1.10}"#),
            "payload bytes intact: {raw}"
        );
        let finished = accepted[3].json();
        assert_eq!(finished["type"], "run_finished");
        assert_eq!(finished["data"]["sequence"], serde_json::Value::Null);
        assert_eq!(finished["data"]["payload"]["lastSequence"], 3);
    }
}

/// The most requests the receiver was answering at once, among these (each
/// spans its arrival to its answer).
fn peak_concurrency(requests: &[&crate::receiver::Received]) -> usize {
    requests
        .iter()
        .map(|r| {
            requests
                .iter()
                .filter(|o| o.arrived <= r.arrived && r.arrived < o.at)
                .count()
        })
        .max()
        .unwrap_or(0)
}

on_both! {
    async fn an_outage_is_probed_not_hammered_and_then_drains_in_order(backend: Backend) {
        const DOWN_FOR: Duration = Duration::from_secs(4);
        // Requests the chains started before the sink was marked down may
        // still arrive for a moment; the window opens after that.
        const SETTLE: Duration = Duration::from_secs(1);
        let runs: Vec<String> = (0..8).map(|i| format!("run-o{i}")).collect();
        let refs: Vec<&str> = runs.iter().map(String::as_str).collect();
        let scenario = Scenario {
            runs: refs.iter().map(|r| scripted(r, numbered(5))).collect(),
            ..Scenario::default()
        };
        let sim = start_sim(scenario).await;
        let receiver = Receiver::start().await;
        receiver.set_default(Some(Answer::Status(503)));
        // Slow answers, so that requests sent at once overlap at the receiver.
        receiver.set_delay(Duration::from_millis(100));
        let env = webhook_env(backend, &sim, &refs, &receiver, "");
        let daemon = env.start();
        let reader = wait_for("the state database", || async {
            env.reads()
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        wait_for("the sink marked down", || async {
            let sinks = reader.sinks().await.map_err(|e| e.to_string())?;
            match sinks.iter().find(|s| s.sink == "ops") {
                Some(s) if s.down => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        // The receiver stays down for a fixed time (observed, not waited on).
        let marked_down = std::time::Instant::now();
        tokio::time::sleep(DOWN_FOR).await;
        receiver.set_default(None);
        let recovered = std::time::Instant::now();
        let accepted = wait_accepted(&receiver, 8 * 6).await;
        let drained_in = recovered.elapsed();
        daemon.stop().await;
        let requests = receiver.requests();
        let window = (marked_down + SETTLE)..recovered;
        let while_down: Vec<&crate::receiver::Received> = requests
            .iter()
            .filter(|r| window.contains(&r.arrived))
            .collect();
        // Probes go out one at a time, at least 100 ms apart (the answer's
        // delay) plus a jittered backoff that soon reaches up to 1 s: some 7
        // in 3 s. Sixteen is far above that and far below 8 runs retrying on
        // their own (dozens).
        assert!(
            !while_down.is_empty() && while_down.len() <= 16,
            "{} requests in the {:?} the sink was down: not probed, or hammered",
            while_down.len(),
            DOWN_FOR - SETTLE
        );
        assert_eq!(
            peak_concurrency(&while_down),
            1,
            "one probe at a time while the sink is down"
        );
        assert!(
            drained_in < Duration::from_secs(20),
            "the backlog drains soon after the sink answers: {drained_in:?}"
        );
        assert_per_run_order(&accepted, &refs, 5);
        // Every failed attempt carried the id of an event later delivered.
        let delivered: std::collections::HashSet<String> =
            accepted.iter().map(|r| r.id.clone()).collect();
        assert!(requests.iter().all(|r| delivered.contains(&r.id)));
        assert_eq!(receiver.accepted().len(), 8 * 6, "nothing delivered twice");
        let sinks = reader.sinks().await.unwrap();
        let ops = sinks.iter().find(|s| s.sink == "ops").unwrap();
        assert!(!ops.down && ops.pending == 0 && ops.done == 48);
    }
}

on_both! {
    async fn retry_after_on_429_is_honoured_and_the_id_stays_the_same(backend: Backend) {
        let sim = sim_with(vec![scripted("run-429", numbered(1))]).await;
        let receiver = Receiver::start().await;
        receiver.script([Answer::TooMany(2)]);
        let env = webhook_env(backend, &sim, &["run-429"], &receiver, "");
        let daemon = env.start();
        wait_accepted(&receiver, 2).await;
        daemon.stop().await;
        let requests = receiver.requests();
        assert_eq!(requests[0].answered, 429);
        assert_eq!(requests[0].id, requests[1].id);
        assert_ne!(
            requests[0].timestamp, requests[1].timestamp,
            "a fresh timestamp per attempt"
        );
        assert_ne!(
            requests[0].signature, requests[1].signature,
            "a fresh signature per attempt"
        );
        assert_eq!(
            requests[0].body, requests[1].body,
            "the same body on every attempt"
        );
        let waited = requests[1].at - requests[0].at;
        assert!(
            waited >= Duration::from_secs(2),
            "Retry-After: 2 honoured, waited {waited:?}"
        );
    }
}

on_both! {
    async fn redirects_are_not_followed(backend: Backend) {
        let sim = sim_with(vec![scripted("run-302", numbered(1))]).await;
        let receiver = Receiver::start().await;
        // The receiver answers every method: a followed redirect would show up
        // as a request to /elsewhere (and be accepted).
        receiver.set_default(Some(Answer::Redirect));
        let env = webhook_env(backend, &sim, &["run-302"], &receiver, "max_attempts = 2");
        let config = env.write_config();
        let daemon = env.start();
        let dead = wait_dead_letters(&config, 2, "both deliveries dead after two redirects each").await;
        daemon.stop().await;
        let seen: Vec<(String, String, u16, String)> = receiver
            .requests()
            .iter()
            .map(|r| (r.method.clone(), r.path.clone(), r.answered, r.id.clone()))
            .collect();
        let attempt = |id: &str| ("POST".to_owned(), "/hooks".to_owned(), 302, id.to_owned());
        assert_eq!(
            seen,
            [
                attempt("run-302:1"),
                attempt("run-302:1"),
                attempt("run-302:finished:1"),
                attempt("run-302:finished:1"),
            ],
            "exactly the POSTs, none following the redirect"
        );
        for letter in dead.as_array().unwrap() {
            assert_eq!(letter["attempts"], 2, "{letter}");
            assert_eq!(letter["last_status"], 302, "the 302 is kept: {letter}");
            assert!(
                letter["last_error"]
                    .as_str()
                    .unwrap()
                    .contains("redirects are not followed"),
                "{letter}"
            );
        }
    }
}

on_both! {
    async fn permanent_failures_dead_letter_and_replay_delivers_the_same_ids(backend: Backend) {
        let sim = sim_with(vec![scripted("run-dead", numbered(2))]).await;
        let receiver = Receiver::start().await;
        receiver.set_default(Some(Answer::Status(500)));
        let env = webhook_env(backend, &sim, &["run-dead"], &receiver, "max_attempts = 2");
        let config = env.write_config();
        let daemon = env.start();
        let dead = wait_dead_letters(&config, 3, "three dead letters").await;
        assert_eq!(dead[0]["id"], "run-dead:1");
        assert_eq!(dead[0]["attempts"], 2);
        assert_eq!(dead[0]["last_status"], 500);
        assert!(
            dead[0]["last_error"]
                .as_str()
                .unwrap()
                .contains("receiver says 500")
        );
        let before: Vec<String> = receiver.requests().iter().map(|r| r.id.clone()).collect();
        receiver.set_default(None);
        let out = runhook(&config, &["replay", "--sink", "ops"]);
        assert!(out.contains("queued 3"), "{out}");
        let accepted = wait_accepted(&receiver, 3).await;
        daemon.stop().await;
        let ids: Vec<&str> = accepted.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["run-dead:1", "run-dead:2", "run-dead:finished:2"]);
        assert!(
            ids.iter().all(|id| before.iter().any(|b| b == id)),
            "replay keeps the ids"
        );
        assert!(runhook(&config, &["dead", "--json"]).trim() == "[]");
    }
}

on_both! {
    async fn retry_state_survives_a_restart(backend: Backend) {
        let sim = sim_with(vec![scripted("run-rs", numbered(1))]).await;
        let receiver = Receiver::start().await;
        receiver.script([Answer::ErrorRetryAfter(3)]);
        let env = webhook_env(backend, &sim, &["run-rs"], &receiver, "");
        let daemon = env.start_process();
        let reader = wait_for("the state database", || async {
            env.reads()
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        wait_for("the failed attempt recorded", || async {
            let sinks = reader.sinks().await.map_err(|e| e.to_string())?;
            match sinks.iter().find(|s| s.sink == "ops") {
                Some(s) if s.retrying == 1 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        daemon.crash().await;
        let daemon = env.start_process();
        wait_accepted(&receiver, 2).await;
        daemon.stop().await;
        let requests = receiver.requests();
        assert_eq!(requests[0].id, "run-rs:1");
        assert_eq!(
            requests[1].id, "run-rs:1",
            "the same event, retried after the restart"
        );
        let waited = requests[1].at - requests[0].at;
        assert!(
            waited >= Duration::from_secs(3),
            "no immediate retry after restart: {waited:?}"
        );
    }
}

/// `runhook dead --json`, asked until it lists exactly `count` letters.
async fn wait_dead_letters(
    config: &std::path::Path,
    count: usize,
    what: &str,
) -> serde_json::Value {
    wait_for(what, || async {
        let out = Command::new(env!("CARGO_BIN_EXE_runhook"))
            .arg("--config")
            .arg(config)
            .args(["dead", "--json"])
            .output()
            .unwrap();
        let letters: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        if letters.as_array().is_some_and(|a| a.len() == count) {
            Ok(letters)
        } else {
            Err(letters.to_string())
        }
    })
    .await
}
