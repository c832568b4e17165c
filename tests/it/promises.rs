//! Promises of the README and DESIGN that no other test exercised: unordered
//! and bounded delivery, dead-lettering by age, the kept answer, `unwatch`
//! and reloads, finished runs, the state file's mode, the `dead`, `replay`,
//! `tail` and `--log-format` flags, `cancelReason`, and upstream backoff.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use runhook::simulate::scenario::ScriptedRun;
use runhook::simulate::{Fault, FaultKind, Simulator};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::receiver::{Answer, Receiver, SECRET};
use crate::support::*;

fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runhook"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("runhook runs")
}

/// Runs a command that must succeed; its stdout.
fn cli_ok(config: &Path, args: &[&str]) -> String {
    let output = cli(config, args);
    assert!(
        output.status.success(),
        "runhook {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `runhook dead --json` with these filters.
fn dead_letters(config: &Path, filters: &[&str]) -> Vec<Value> {
    try_dead_letters(config, filters).unwrap_or_else(|e| panic!("{e}"))
}

/// [`dead_letters`], for a wait that may begin before the daemon made the
/// state database.
fn try_dead_letters(config: &Path, filters: &[&str]) -> Result<Vec<Value>, String> {
    let mut args = vec!["dead", "--json"];
    args.extend_from_slice(filters);
    let output = cli(config, &args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "runhook {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    serde_json::from_str::<Vec<Value>>(&stdout)
        .map_err(|e| format!("dead --json prints a JSON array: {e}: {stdout}"))
}

/// A webhook sink `name` posting to `receiver` at `/name`, routed everything.
fn webhook_sink(name: &str, receiver: &Receiver, keys: &str) -> String {
    format!(
        "\n[sinks.{name}]\ntype = \"webhook\"\nurl = \"http://{}/{name}\"\nsecret = \"{SECRET}\"\n\
         initial_backoff = \"100ms\"\nmax_backoff = \"500ms\"\n{keys}\n\n[[routes]]\nsinks = [\"{name}\"]\n",
        receiver.addr
    )
}

fn slow_run(id: &str, events: usize, interval_ms: u64) -> ScriptedRun {
    let mut run = scripted(id, numbered(events));
    run.interval = Duration::from_millis(interval_ms);
    run
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

async fn wait_cursor(env: &Env, run: &str, at_least: i64) -> i64 {
    wait_for(&format!("{run}'s cursor at {at_least}"), || async {
        match env.run_row(run).await {
            Some(row) if row.cursor >= at_least => Ok(row.cursor),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// Requests the simulator answered about `run`, whatever the endpoint.
fn upstream_requests(sim: &Simulator, run: &str) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r.run_id.as_deref() == Some(run))
        .count()
}

on_both! {
    async fn an_unordered_sink_gets_a_runs_events_in_parallel(backend: Backend) {
        let sim = sim_with(vec![scripted("run-par", numbered(6))]).await;
        let receiver = Receiver::start().await;
        receiver.set_delay(Duration::from_millis(400));
        let mut env = Env::on(backend, &sim, &["run-par"]);
        env.extra = webhook_sink("ops", &receiver, "ordered = false\nconcurrency = 4");
        let daemon = env.start();
        let accepted = wait_accepted(&receiver, 7).await;
        daemon.stop().await;
        let (peak, per_run) = receiver.peaks();
        assert!(
            per_run["run-par"] >= 2,
            "ordered = false: one run's events go out in parallel, yet at most {} were in flight at once",
            per_run["run-par"]
        );
        assert!(
            peak <= 4,
            "concurrency = 4 bounds what is in flight: {peak}"
        );
        let ids: HashSet<&str> = accepted.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), 7, "each event delivered once: {ids:?}");
        assert_eq!(accepted.len(), 7, "nothing delivered twice");
    }
}

on_both! {
    async fn concurrency_bounds_the_runs_delivered_at_once_and_each_stays_in_order(backend: Backend) {
        let runs: Vec<String> = (0..5).map(|i| format!("run-c{i}")).collect();
        let refs: Vec<&str> = runs.iter().map(String::as_str).collect();
        let sim = sim_with(refs.iter().map(|r| scripted(r, numbered(2))).collect()).await;
        let receiver = Receiver::start().await;
        receiver.set_delay(Duration::from_millis(300));
        let mut env = Env::on(backend, &sim, &refs);
        env.extra = webhook_sink("ops", &receiver, "concurrency = 2");
        let daemon = env.start();
        let accepted = wait_accepted(&receiver, 5 * 3).await;
        daemon.stop().await;
        let (peak, per_run) = receiver.peaks();
        assert!(
            peak <= 2,
            "concurrency = 2: at most two runs delivered at once, saw {peak} requests at once"
        );
        assert_eq!(peak, 2, "concurrency = 2: two runs are delivered at once");
        for run in &refs {
            assert_eq!(per_run[*run], 1, "{run}: ordered, one request at a time");
            let ids: Vec<&str> = accepted
                .iter()
                .map(|r| r.id.as_str())
                .filter(|id| id.starts_with(&format!("{run}:")))
                .collect();
            let expected = [
                format!("{run}:1"),
                format!("{run}:2"),
                format!("{run}:finished:2"),
            ];
            assert_eq!(ids, expected, "{run}: in order, once each");
        }
    }
}

on_both! {
    async fn max_age_dead_letters_a_delivery_that_keeps_failing(backend: Backend) {
        let sim = sim_with(vec![scripted("run-old", numbered(1))]).await;
        let receiver = Receiver::start().await;
        receiver.set_default(Some(Answer::Status(500)));
        let mut env = Env::on(backend, &sim, &["run-old"]);
        env.extra = webhook_sink("ops", &receiver, "max_attempts = 1000\nmax_age = \"2s\"");
        let config = env.write_config();
        let daemon = env.start();
        let letter = wait_for_within(
            Duration::from_secs(60),
            "run-old:1 dead-lettered by max_age",
            || async {
                let letters = try_dead_letters(&config, &[])?;
                let tries = receiver.requests().len();
                letters
                    .into_iter()
                    .find(|l| l["id"] == "run-old:1")
                    .ok_or_else(|| format!("{tries} attempts, no dead letter"))
            },
        )
        .await;
        daemon.stop().await;
        let attempts = letter["attempts"].as_i64().unwrap();
        assert!(
            (3..1000).contains(&attempts),
            "dead-lettered by max_age, not max_attempts: {letter}"
        );
        let tries: Vec<_> = receiver
            .requests()
            .into_iter()
            .filter(|r| r.id == "run-old:1")
            .collect();
        let span = tries.last().unwrap().at - tries[0].at;
        assert!(
            span >= Duration::from_millis(1500),
            "retried until max_age (2 s) before giving up, gave up after {span:?}"
        );
        assert_eq!(letter["last_status"], 500);
    }
}

on_both! {
    async fn a_receivers_endless_answer_is_read_up_to_4_kib_and_kept_cut_short(backend: Backend) {
        let sim = sim_with(vec![scripted("run-cap", numbered(1))]).await;
        let receiver = Receiver::start().await;
        receiver.set_default(Some(Answer::Endless(500)));
        let mut env = Env::on(backend, &sim, &["run-cap"]);
        env.extra = webhook_sink("ops", &receiver, "max_attempts = 1\ntimeout = \"20s\"");
        let config = env.write_config();
        let daemon = env.start();
        let letter = wait_for_within(Duration::from_secs(60), "run-cap:1 dead", || async {
            try_dead_letters(&config, &[])?
                .into_iter()
                .find(|l| l["id"] == "run-cap:1")
                .ok_or_else(|| "no dead letter yet".to_owned())
        })
        .await;
        daemon.stop().await;
        let error = letter["last_error"].as_str().unwrap();
        assert!(
            error.starts_with("HTTP 500: xxxxxxxx"),
            "the answer is read (up to the cap) and kept with the attempt: {error:?}"
        );
        assert!(
            error.len() <= 4096 + 32,
            "kept up to 4 KiB, not {} bytes",
            error.len()
        );
        assert!(error.ends_with('…'), "cut short, and says so: {error:?}");
    }
}

on_both! {
    async fn unwatch_still_delivers_what_was_recorded(backend: Backend) {
        let sim = sim_with(vec![slow_run("run-unw", 60, 150)]).await;
        let receiver = Receiver::start().await;
        receiver.set_default(Some(Answer::Status(503)));
        let mut env = Env::on(backend, &sim, &[]);
        env.extra = webhook_sink("ops", &receiver, "");
        let config = env.write_config();
        cli_ok(&config, &["watch", "run-unw"]);
        let daemon = env.start();
        wait_cursor(&env, "run-unw", 3).await;
        cli_ok(&config, &["unwatch", "run-unw"]);
        wait_for("run-unw unwatched", || async {
            match env.run_row("run-unw").await {
                Some(row) if !row.watched => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        receiver.set_default(None);
        let reader = env.reads().await.unwrap();
        let (cursor, accepted) = wait_for_within(
            Duration::from_secs(60),
            "every recorded event of run-unw delivered after unwatch",
            || async {
                let sinks = reader.sinks().await.map_err(|e| e.to_string())?;
                let ops = sinks.iter().find(|s| s.sink == "ops").cloned();
                let cursor = env.run_row("run-unw").await.map_or(0, |r| r.cursor);
                let accepted = receiver.accepted();
                match ops {
                    Some(ops) if ops.pending == 0 && accepted.len() as i64 >= cursor => {
                        Ok((cursor, accepted))
                    }
                    other => Err(format!(
                        "cursor {cursor}, {} accepted, sink {other:?}",
                        accepted.len()
                    )),
                }
            },
        )
        .await;
        daemon.stop().await;
        assert!(cursor < 60, "unwatch stopped ingest: cursor {cursor}");
        let ids: Vec<&str> = accepted.iter().map(|r| r.id.as_str()).collect();
        let expected: Vec<String> = (1..=cursor).map(|s| format!("run-unw:{s}")).collect();
        assert_eq!(ids, expected, "what was recorded, once each, in order");
    }
}

on_both! {
    async fn a_run_removed_from_the_config_stops_on_reload(backend: Backend) {
        let sim = sim_with(vec![
            slow_run("run-gone", 200, 100),
            slow_run("run-clock", 200, 100),
        ])
        .await;
        let mut env = Env::on(backend, &sim, &["run-gone"]);
        // The clock: a run watched beside the config, which the reload keeps.
        let store = env.open_state()
            .await
            .expect("state opens");
        store
            .subscribe("run-clock".into(), Default::default(), "watch", None)
            .await
            .unwrap();
        drop(store);
        let (reloads, reloaded) = tokio::sync::mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(runhook::daemon::run_reloadable(
            Arc::new(env.config()),
            shutdown.clone(),
            reloaded,
        ));
        let daemon = Daemon { shutdown, task };
        wait_cursor(&env, "run-gone", 2).await;
        env.runs.clear();
        reloads.send(env.config()).await.unwrap();
        wait_for("run-gone no longer watched", || async {
            match env.run_row("run-gone").await {
                Some(row) if !row.watched => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        // The supervisor looks every 500 ms and a follower in the middle of a
        // request may finish it: let 2 s pass (twenty of run-clock's events), then
        // run-gone must be quiet while run-clock moves on another ten.
        let clock = wait_cursor(&env, "run-clock", 1).await;
        let clock = wait_cursor(&env, "run-clock", clock + 20).await;
        let gone_before = upstream_requests(&sim, "run-gone");
        let gone_cursor = env.run_row("run-gone").await.unwrap().cursor;
        wait_cursor(&env, "run-clock", clock + 10).await;
        let gone_after = upstream_requests(&sim, "run-gone");
        daemon.stop().await;
        assert!(
            gone_after <= gone_before + 1,
            "run-gone was removed from the config, yet asked for {} more times while run-clock moved on",
            gone_after - gone_before
        );
        let row = env.run_row("run-gone").await.unwrap();
        assert!(
            row.cursor == gone_cursor,
            "run-gone's ingest stopped: cursor {} (was {gone_cursor})",
            row.cursor
        );
    }
}

on_both! {
    async fn a_finished_run_is_not_followed_again(backend: Backend) {
        let sim = sim_with(vec![
            scripted("run-done", numbered(3)),
            slow_run("run-clock", 300, 100),
        ])
        .await;
        let env = Env::on(backend, &sim, &["run-done", "run-clock"]);
        let daemon = env.start();
        env.wait_finished(&["run-done"]).await;
        wait_for("run-done's follower ended", || async {
            match env.run_row("run-done").await {
                Some(row) if row.state == "finished" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        let clock = wait_cursor(&env, "run-clock", 1).await;
        let done_before = upstream_requests(&sim, "run-done");
        wait_cursor(&env, "run-clock", clock + 10).await;
        let done_after = upstream_requests(&sim, "run-done");
        assert_eq!(
            done_after, done_before,
            "run-done finished, yet was asked for again while run-clock moved on"
        );
        daemon.stop().await;
        let daemon = env.start();
        let clock = wait_cursor(&env, "run-clock", clock + 11).await;
        wait_cursor(&env, "run-clock", clock + 10).await;
        let after_restart = upstream_requests(&sim, "run-done");
        daemon.stop().await;
        assert_eq!(
            after_restart, done_before,
            "a restart does not follow the finished run-done again"
        );
        let finished = env
            .lines()
            .iter()
            .filter(|l| l["runId"] == "run-done" && l["type"] == "run_finished")
            .count();
        assert_eq!(finished, 1, "one run_finished for run-done");
    }
}

// SQLite only: the permissions of the state file.
#[tokio::test]
async fn the_state_database_is_created_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/runhook.db");
    let store = crate::support::open_state(&path)
        .await
        .expect("state opens");
    store
        .subscribe("run-mode".into(), Default::default(), "watch", None)
        .await
        .unwrap();
    for file in ["runhook.db", "runhook.db-wal", "runhook.db-shm"] {
        let file = dir.path().join("state").join(file);
        let mode = std::fs::metadata(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "{} is mode {:o}: labels, errors and payloads are for the owner only",
            file.display(),
            mode & 0o777
        );
    }
}

on_both! {
    async fn dead_and_replay_filter_by_sink_run_and_id_and_purge_for_good(backend: Backend) {
        let sim = sim_with(vec![
            scripted("run-x", numbered(1)),
            scripted("run-y", numbered(1)),
        ])
        .await;
        let receiver = Receiver::start().await;
        receiver.set_default(Some(Answer::Status(500)));
        let mut env = Env::on(backend, &sim, &["run-x", "run-y"]);
        env.extra = webhook_sink("a", &receiver, "max_attempts = 1")
            + &webhook_sink("b", &receiver, "max_attempts = 1");
        let config = env.write_config();
        let daemon = env.start();
        wait_for("eight dead letters", || async {
            let letters = try_dead_letters(&config, &[])?;
            if letters.len() == 8 {
                Ok(())
            } else {
                Err(format!("{letters:?}"))
            }
        })
        .await;
        // `dead` filters.
        let of = |letters: Vec<Value>| -> Vec<(String, String)> {
            let mut pairs: Vec<(String, String)> = letters
                .iter()
                .map(|l| {
                    (
                        l["sink"].as_str().unwrap().into(),
                        l["id"].as_str().unwrap().into(),
                    )
                })
                .collect();
            pairs.sort();
            pairs
        };
        let pair = |sink: &str, id: &str| (sink.to_owned(), id.to_owned());
        assert_eq!(
            of(dead_letters(&config, &["--sink", "b", "--run", "run-y"])),
            [pair("b", "run-y:1"), pair("b", "run-y:finished:1")],
            "dead --sink b --run run-y"
        );
        let of_a = of(dead_letters(&config, &["--sink", "a"]));
        assert!(
            of_a.len() == 4 && of_a.iter().all(|(s, _)| s == "a"),
            "dead --sink a: {of_a:?}"
        );
        let of_x = of(dead_letters(&config, &["--run", "run-x"]));
        assert!(
            of_x.len() == 4 && of_x.iter().all(|(_, id)| id.starts_with("run-x:")),
            "dead --run run-x: {of_x:?}"
        );
        // `replay --id` (with --sink) queues that one letter again.
        receiver.set_default(None);
        let out = cli_ok(&config, &["replay", "--id", "run-x:1", "--sink", "a"]);
        assert!(
            out.contains("queued 1 "),
            "replay --id run-x:1 --sink a: {out}"
        );
        let accepted = wait_accepted(&receiver, 1).await;
        assert_eq!(
            (accepted[0].path.as_str(), accepted[0].id.as_str()),
            ("/a", "run-x:1")
        );
        // `replay --run` queues that run's letters of every sink.
        let out = cli_ok(&config, &["replay", "--run", "run-y"]);
        assert!(out.contains("queued 4 "), "replay --run run-y: {out}");
        let accepted = wait_accepted(&receiver, 5).await;
        let mut replayed: Vec<(String, String)> = accepted[1..]
            .iter()
            .map(|r| (r.path.clone(), r.id.clone()))
            .collect();
        replayed.sort();
        let expected: Vec<(String, String)> = [
            ("/a", "run-y:1"),
            ("/a", "run-y:finished:1"),
            ("/b", "run-y:1"),
            ("/b", "run-y:finished:1"),
        ]
        .iter()
        .map(|(p, i)| (p.to_string(), i.to_string()))
        .collect();
        assert_eq!(replayed, expected, "replay --run run-y, same ids");
        assert_eq!(
            of(dead_letters(&config, &[])),
            [
                pair("a", "run-x:finished:1"),
                pair("b", "run-x:1"),
                pair("b", "run-x:finished:1")
            ],
            "the replayed letters left the list, the others stayed"
        );
        // `dead --purge` with filters deletes only what matches.
        let out = cli_ok(&config, &["dead", "--purge", "--sink", "b"]);
        assert!(out.contains("purged 2 "), "dead --purge --sink b: {out}");
        let out = cli_ok(&config, &["dead", "--purge", "--run", "run-y"]);
        assert!(out.contains("purged 0 "), "dead --purge --run run-y: {out}");
        assert_eq!(
            of(dead_letters(&config, &[])),
            [pair("a", "run-x:finished:1")]
        );
        let out = cli_ok(&config, &["dead", "--purge", "--run", "run-x"]);
        assert!(out.contains("purged 1 "), "dead --purge --run run-x: {out}");
        assert!(dead_letters(&config, &[]).is_empty());
        let out = cli_ok(&config, &["replay"]);
        assert!(
            out.contains("queued 0 "),
            "purged letters are gone for good: {out}"
        );
        daemon.stop().await;
    }
}

on_both! {
    async fn tail_type_prints_only_that_event_type(backend: Backend) {
        use std::io::BufRead;
        let sim = sim_with(vec![
            scripted("run-ta", numbered(3)),
            scripted("run-tb", numbered(2)),
        ])
        .await;
        let env = Env::on(backend, &sim, &["run-ta", "run-tb"]);
        let config = env.write_config();
        drop(
            env.open_state()
                .await
                .expect("state opens"),
        );
        let mut tail = Command::new(env!("CARGO_BIN_EXE_runhook"))
            .arg("--config")
            .arg(&config)
            .args(["tail", "--json", "--type", "run_finished"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = tail.stdout.take().unwrap();
        let reading = std::thread::spawn(move || {
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .take(2)
                .collect::<Vec<String>>()
        });
        let daemon = env.start();
        wait_for("tail's two lines", || {
            let done = reading.is_finished();
            async move {
                if done {
                    Ok(())
                } else {
                    Err("tail still reading".into())
                }
            }
        })
        .await;
        tail.kill().unwrap();
        tail.wait().unwrap();
        daemon.stop().await;
        let lines: Vec<Value> = reading
            .join()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let types: Vec<&Value> = lines.iter().map(|l| &l["type"]).collect();
        assert_eq!(
            types,
            ["run_finished", "run_finished"],
            "--type run_finished: {lines:?}"
        );
        let runs: HashSet<&str> = lines.iter().map(|l| l["runId"].as_str().unwrap()).collect();
        assert_eq!(runs, HashSet::from(["run-ta", "run-tb"]));
    }
}

on_both! {
    async fn log_format_json_writes_one_json_object_per_log_line(backend: Backend) {
        let sim = sim_with(vec![scripted("run-log", numbered(2))]).await;
        let env = Env::on(backend, &sim, &["run-log"]);
        let config = env.write_config();
        let log_path = env.dir.path().join("daemon.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_runhook"))
            .arg("--config")
            .arg(&config)
            .args(["--log-format", "json", "run"])
            .env("RUNHOOK_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        env.wait_finished(&["run-log"]).await;
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = wait_for("the daemon to exit on SIGTERM", || {
            let exited = child.try_wait();
            async move {
                match exited {
                    Ok(Some(status)) => Ok(status),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
        assert!(exit.success(), "{exit:?}");
        let log = std::fs::read_to_string(&log_path).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert!(lines.len() >= 2, "some log lines: {log}");
        for line in &lines {
            let entry: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("--log-format json: a log line is not JSON ({e}): {line}"));
            assert!(
                entry["level"].is_string() && entry["fields"]["message"].is_string(),
                "a JSON log line has a level and a message: {line}"
            );
        }
        assert!(
            lines
                .iter()
                .any(|l| l.contains("\"message\":\"runhook started\"")),
            "{log}"
        );
    }
}

on_both! {
    async fn a_cancelled_run_finishes_with_its_cancel_reason_by_stream_and_by_poll(backend: Backend) {
        let cancelled = |id: &str| {
            let mut run = scripted(id, numbered(2));
            run.final_status = "cancelled".into();
            run.cancel_reason = Some(format!("{id}: stopped by the user"));
            run
        };
        let sim = sim_with(vec![cancelled("run-cs"), cancelled("run-cp")]).await;
        // The cookie only, so that `auto` streams; run-cp polls.
        let mut env = Env::on(backend, &sim, &["run-cs", "run-cp"]);
        env.token = String::new();
        env.api = format!(
            "session_cookie = \"{}\"\npoll_interval = \"50ms\"\n",
            sim.session()
        );
        env.poll_runs = vec!["run-cp".into()];
        let daemon = env.start();
        let lines = env.wait_finished(&["run-cs", "run-cp"]).await;
        daemon.stop().await;
        for (run, transport) in [("run-cs", "sse"), ("run-cp", "poll")] {
            let row = env.run_row(run).await.unwrap();
            assert_eq!(
                row.transport.map(runhook::config::Transport::name),
                Some(transport),
                "{run}"
            );
            let finished = lines
                .iter()
                .find(|l| l["runId"] == run && l["type"] == "run_finished")
                .unwrap();
            assert_eq!(finished["id"], format!("{run}:finished:2"));
            let payload = &finished["payload"];
            assert_eq!(payload["status"], "cancelled", "{run}: {finished}");
            assert_eq!(
                payload["cancelReason"],
                format!("{run}: stopped by the user"),
                "{run} ({transport}): cancelReason in run_finished: {finished}"
            );
            assert_eq!(payload["lastSequence"], 2, "{run}: {finished}");
        }
    }
}

on_both! {
    async fn upstream_errors_back_off_longer_each_time(backend: Backend) {
        let sim = sim_with(vec![scripted("run-back", numbered(2))]).await;
        sim.inject(Fault {
            run: Some("run-back".into()),
            endpoint: Some("events".into()),
            count: Some(5),
            kind: FaultKind::Status {
                status: 500,
                retry_after: None,
            },
        });
        let env = Env::on(backend, &sim, &["run-back"]);
        let daemon = env.start();
        env.wait_finished(&["run-back"]).await;
        daemon.stop().await;
        let polls: Vec<_> = sim
            .requests()
            .into_iter()
            .filter(|r| r.endpoint == "events" && r.run_id.as_deref() == Some("run-back"))
            .collect();
        let statuses: Vec<u16> = polls.iter().take(6).map(|r| r.status).collect();
        assert_eq!(statuses, [500, 500, 500, 500, 500, 200]);
        let gaps: Vec<u64> = polls
            .windows(2)
            .take(5)
            .map(|w| w[1].at_ms - w[0].at_ms)
            .collect();
        // 200 ms doubling (jitter only adds): each wait at least the last one's floor doubled.
        for (i, gap) in gaps.iter().enumerate() {
            let floor = 200u64 << i;
            assert!(
                *gap >= floor * 9 / 10,
                "the wait after error {} should be at least {floor} ms (backoff grows), was {gap} ms: {gaps:?}",
                i + 1
            );
        }
    }
}

// SQLite only: `--state` as a file path; the URL form on PostgreSQL is pg_ops.rs's.
#[tokio::test]
async fn state_commands_need_only_the_state_path() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state/runhook.db");
    let missing = dir.path().join("no-such-config.toml");
    let state_cli = |args: &[&str]| -> String {
        let output = Command::new(env!("CARGO_BIN_EXE_runhook"))
            .arg("--config")
            .arg(&missing)
            .arg("--state")
            .arg(&db)
            .args(args)
            .output()
            .expect("runhook runs");
        assert!(
            output.status.success(),
            "runhook --state {} {args:?} without a config file: {}",
            db.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let out = state_cli(&["watch", "run-s", "--label", "team=oslo"]);
    assert!(out.contains("watching run-s"), "{out}");
    let status: Value = serde_json::from_str(&state_cli(&["status", "--json"])).unwrap();
    assert_eq!(status["runs"][0]["run_id"], "run-s", "{status}");
    assert_eq!(status["runs"][0]["watched"], true, "{status}");
    assert_eq!(state_cli(&["dead", "--json"]).trim(), "[]");
    assert!(state_cli(&["replay", "--run", "run-s"]).contains("queued 0 "));
    assert!(state_cli(&["dead", "--purge"]).contains("purged 0 "));
    state_cli(&["unwatch", "run-s"]);
    let status: Value = serde_json::from_str(&state_cli(&["status", "--json"])).unwrap();
    assert_eq!(status["runs"][0]["watched"], false, "{status}");
}
