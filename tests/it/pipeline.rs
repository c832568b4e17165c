//! A webhook sink with `pipeline = true`: the built binary, the simulator
//! and a real receiver, as in `crash.rs` (whose world and helpers these
//! tests use). Pipelined, a run's event N+1 goes out once N is answered and
//! done-marks are committed in batches behind the chain, so these tests hold
//! it to what it still promises: every event delivered, first arrivals in
//! per-run order, no repeat without a crash, after a crash at most a window
//! of already-accepted ids again, a failure stopping the chain until it is
//! retried and answered, and a drain (SIGTERM) that records every answer.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use rand::RngExt;
use runhook::deliver::runs::PIPELINE_WINDOW;

use crate::crash::{Spawned, World, assert_integrity, assert_killed, pending_heads};
use crate::receiver::{Answer, Received, SECRET};
use crate::support::*;

/// `crash.rs`'s world (live runs, half streamed, half polled; a webhook sink
/// and a file sink) with the webhook sink pipelined and a receiver that
/// fails nothing.
async fn pipelined_world(
    backend: Backend,
    prefix: &str,
    runs: usize,
    events: usize,
    interval: Duration,
) -> World {
    let mut world = World::start(backend, prefix, runs, events, interval).await;
    world.receiver.set_fail_percent(0);
    world.env.extra = world.env.extra.replace(
        "type = \"webhook\"\n",
        "type = \"webhook\"\npipeline = true\n",
    );
    assert!(world.env.extra.contains("pipeline = true"));
    world.config = world.env.write_config();
    world
}

/// Every webhook id the world's runs should produce, in per-run order.
fn wanted(world: &World, run: &str) -> Vec<String> {
    let mut want: Vec<String> = (1..=world.events).map(|s| format!("{run}:{s}")).collect();
    want.push(format!("{run}:finished:{}", world.events));
    want
}

fn distinct_accepted(world: &World) -> usize {
    let ids: HashSet<String> = world
        .receiver
        .accepted()
        .into_iter()
        .map(|r| r.id)
        .collect();
    ids.len()
}

/// Waits until every event reached the receiver.
async fn wait_all_accepted(world: &World) {
    let expected = world.ids.len() * (world.events + 1);
    wait_for("every webhook delivery", || async {
        let distinct = distinct_accepted(world);
        if distinct == expected {
            Ok(())
        } else {
            Err(format!("{distinct} of {expected}"))
        }
    })
    .await;
}

/// SIGTERM, then the daemon must drain and exit 0; waited for by polling,
/// so that the receiver and simulator on this runtime keep answering.
async fn terminate(child: &mut Spawned) {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(sent.success());
    let status = wait_for("the daemon to drain and exit", || {
        let exited = child.0.try_wait().expect("try_wait");
        async move { exited.ok_or_else(|| "still running".to_owned()) }
    })
    .await;
    assert!(status.success(), "runhook exits 0 on SIGTERM: {status}");
}

/// Each run's accepted ids, in arrival order.
fn per_run(accepted: &[Received]) -> BTreeMap<String, Vec<String>> {
    let mut runs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for request in accepted {
        let run = request.id.split(':').next().unwrap_or_default().to_owned();
        runs.entry(run).or_default().push(request.id.clone());
    }
    runs
}

/// Each run's ids in the order they were first accepted.
fn first_arrivals(ids: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    ids.iter().filter(|id| seen.insert(*id)).cloned().collect()
}

on_both! {
    async fn pipelined_delivers_every_event_once_in_order_across_sigterms(backend: Backend) {
        let mut world = pipelined_world(backend, "pipe", 8, 300, Duration::from_millis(2)).await;
        // A slow receiver keeps every chain busy with a backlog, so that each
        // SIGTERM finds answered deliveries not yet marked.
        world.receiver.set_delay(Duration::from_millis(1));
        let total = world.ids.len() * (world.events + 1);
        for stop in 1..=2 {
            let mut child = world.spawn(None);
            let target = total * stop / 3;
            wait_for("deliveries before the SIGTERM", || async {
                let distinct = distinct_accepted(&world);
                if distinct >= target {
                    Ok(())
                } else {
                    Err(format!("{distinct} of {target}"))
                }
            })
            .await;
            terminate(&mut child).await;
            println!(
                "SIGTERM {stop} after {} deliveries",
                distinct_accepted(&world)
            );
        }
        let mut child = world.spawn(None);
        wait_all_accepted(&world).await;
        terminate(&mut child).await;

        let accepted = world.receiver.accepted();
        for (run, ids) in per_run(&accepted) {
            assert_eq!(
                ids,
                wanted(&world, &run),
                "run {run}: every event once, in order, though the daemon was stopped twice (seed {})",
                world.seed
            );
        }
        assert_eq!(accepted.len(), total, "no repeat without a crash");
        assert!(
            accepted.iter().all(|r| r.verified_new),
            "every delivery is signed"
        );
    }
}

on_both! {
    /// The drain ends after `shutdown_grace` (5 s in these configs) even when a
    /// receiver hangs; what the chains had answered before must be recorded
    /// by then, not left in memory behind the hung request.
    async fn pipelined_sigterm_with_a_hung_receiver_still_marks_every_answer(backend: Backend) {
        let mut world = pipelined_world(backend, "pipehang", 16, 200, Duration::from_millis(2)).await;
        world.receiver.set_delay(Duration::from_millis(1));
        let total = world.ids.len() * (world.events + 1);
        let mut child = world.spawn(None);
        wait_for("some deliveries", || async {
            let distinct = distinct_accepted(&world);
            if distinct >= total / 3 {
                Ok(())
            } else {
                Err(format!("{distinct} of {}", total / 3))
            }
        })
        .await;
        // Every chain's next request hangs past the grace.
        world.receiver.set_delay(Duration::from_secs(30));
        let hung = world.receiver.requests().len() + world.ids.len();
        wait_for("a request of every run hanging", || async {
            let seen = world.receiver.requests().len();
            if seen >= hung {
                Ok(())
            } else {
                Err(format!("{seen} of {hung} requests"))
            }
        })
        .await;
        terminate(&mut child).await;
        world.receiver.set_delay(Duration::ZERO);
        let mut child = world.spawn(None);
        wait_all_accepted(&world).await;
        terminate(&mut child).await;

        let accepted = world.receiver.accepted();
        let mut seen = HashSet::new();
        for request in &accepted {
            assert!(
                seen.insert(&request.id),
                "{} accepted before the SIGTERM and sent again after it (seed {})",
                request.id,
                world.seed
            );
        }
        for (run, ids) in per_run(&accepted) {
            assert_eq!(
                ids,
                wanted(&world, &run),
                "run {run}: every event once, in order"
            );
        }
    }
}

on_both! {
    async fn pipelined_sigkill_after_a_2xx_repeats_at_most_a_window_of_accepted_ids(backend: Backend) {
        // Two runs with long backlogs: each chain answers well over a window's
        // worth of deliveries per life, so an unbounded window would show.
        let mut world = pipelined_world(backend, "pipekill", 2, 800, Duration::from_millis(1)).await;
        let kills = 4;
        // Where each daemon's requests end in the receiver's log.
        let mut lives = vec![0];
        for kill in 0..kills {
            let nth = world.rng.random_range(100..=250);
            let armed = format!("http.before_mark:{nth}");
            let mut child = world.spawn(Some(&armed));
            let status = wait_for(&format!("the daemon to die at {armed}"), || {
                let exited = child.0.try_wait().expect("try_wait");
                async move { exited.ok_or_else(|| "still running".to_owned()) }
            })
            .await;
            assert_killed(status, &format!("kill {kill} at {armed}"));
            lives.push(world.receiver.requests().len());
            let accepted: HashSet<String> = world
                .receiver
                .accepted()
                .into_iter()
                .map(|r| r.id)
                .collect();
            let heads = pending_heads(&world.env).await;
            assert!(
                heads.iter().any(|p| accepted.contains(&p.id)),
                "{armed}: the kill left a delivery the receiver accepted still pending"
            );
            assert_integrity(&world.env);
        }
        let mut child = world.spawn(None);
        wait_all_accepted(&world).await;
        terminate(&mut child).await;
        let requests = world.receiver.requests();
        lives.push(requests.len());
        let seed = world.seed;

        let refs: Vec<&str> = world.ids.iter().map(String::as_str).collect();
        let lines = world.env.wait_finished(&refs).await;
        let raw = std::fs::read_to_string(world.env.events_path()).unwrap();
        for run in &refs {
            assert_run_exactly_once(&world.sim, &lines, run, &raw);
        }
        assert_integrity(&world.env);

        // Life by life: no id twice within one daemon's life, and what a life
        // repeats was accepted in an earlier one, at most a window per run.
        let mut before: HashSet<String> = HashSet::new();
        let mut repeats = 0;
        for (life, bounds) in lives.windows(2).enumerate() {
            let accepted: Vec<Received> = requests[bounds[0]..bounds[1]]
                .iter()
                .filter(|r| (200..300).contains(&r.answered))
                .cloned()
                .collect();
            for (run, ids) in per_run(&accepted) {
                let mut seen = HashSet::new();
                for id in &ids {
                    assert!(
                        seen.insert(id),
                        "life {life}: {id} accepted twice by one daemon (seed {seed})"
                    );
                }
                let again: Vec<&String> = ids.iter().filter(|id| before.contains(*id)).collect();
                assert!(
                    again.len() <= PIPELINE_WINDOW,
                    "life {life}, run {run}: {} repeats after one kill, more than the window of {PIPELINE_WINDOW} (seed {seed})",
                    again.len()
                );
                repeats += again.len();
            }
            before.extend(accepted.into_iter().map(|r| r.id));
        }
        println!("{repeats} repeated deliveries over {kills} kills");
        assert!(
            repeats >= kills,
            "each kill after a 2xx repeats that delivery (seed {seed})"
        );

        for (run, ids) in per_run(&world.receiver.accepted()) {
            assert!(
                ids.len() - first_arrivals(&ids).len() <= kills * PIPELINE_WINDOW,
                "run {run}: repeats beyond {kills} kills x {PIPELINE_WINDOW} (seed {seed})"
            );
            assert_eq!(
                first_arrivals(&ids),
                wanted(&world, &run),
                "run {run}: every event, first arrivals in per-run order (seed {seed})"
            );
        }
        assert!(world.receiver.accepted().iter().all(|r| r.verified_new));
    }
}

on_both! {
    async fn pipelined_failure_stops_the_chain_until_retried_and_answered(backend: Backend) {
        let run = "b7c1d2e3-0000-4000-8000-00000000000c";
        let sim = sim_with(vec![scripted(run, numbered(30))]).await;
        let receiver = crate::receiver::Receiver::start().await;
        // The 10th request (event 10: one run, one chain) fails once.
        receiver.script(std::iter::repeat_n(Answer::Status(204), 9).chain([Answer::Status(500)]));
        let mut env = Env::on(backend, &sim, &[run]);
        env.extra = format!(
            "\n[sinks.ops]\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\
             pipeline = true\ninitial_backoff = \"300ms\"\nmax_backoff = \"300ms\"\n\n\
             [[routes]]\nsinks = [\"ops\"]\n",
            receiver.url()
        );
        let daemon = env.start_process();
        wait_for("every event at the receiver", || async {
            let accepted: HashSet<String> = receiver.accepted().into_iter().map(|r| r.id).collect();
            if accepted.len() == 31 {
                Ok(())
            } else {
                Err(format!("{} of 31", accepted.len()))
            }
        })
        .await;
        daemon.stop().await;

        let requests = receiver.requests();
        let failed = requests
            .iter()
            .position(|r| r.answered == 500)
            .expect("the scripted 500 was answered");
        assert_eq!(
            requests[failed].id,
            format!("{run}:10"),
            "the 10th request failed"
        );
        let retry = &requests[failed + 1];
        assert_eq!(
            (retry.id.as_str(), retry.answered),
            (format!("{run}:10").as_str(), 204),
            "the next request is the failed event again, answered: {:?}",
            requests
                .iter()
                .map(|r| (&r.id, r.answered))
                .collect::<Vec<_>>()
        );
        for later in &requests[failed + 1..] {
            let sequence: usize = later
                .id
                .rsplit(':')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(usize::MAX);
            if sequence > 10 {
                assert!(
                    later.arrived >= retry.at,
                    "{} was sent before {run}:10 was retried and answered",
                    later.id
                );
            }
        }
        let ids: Vec<String> = receiver.accepted().into_iter().map(|r| r.id).collect();
        let mut want: Vec<String> = (1..=30).map(|s| format!("{run}:{s}")).collect();
        want.push(format!("{run}:finished:30"));
        assert_eq!(ids, want, "every event once, in order");
    }
}

on_both! {
    /// Killed right after the first 2xx that follows a dead-lettered delivery:
    /// the dead letter must be on disk already, since event N+1 may be sent
    /// only once N's failure is recorded (else a restart would send N after
    /// N+1).
    async fn pipelined_dead_letter_is_recorded_before_the_next_send(backend: Backend) {
        let run = "b7c1d2e3-0000-4000-8000-00000000000d";
        let sim = sim_with(vec![scripted(run, numbered(20))]).await;
        let receiver = crate::receiver::Receiver::start().await;
        // Event 10 fails once, and one attempt is all it gets.
        receiver.script(std::iter::repeat_n(Answer::Status(204), 9).chain([Answer::Status(500)]));
        let mut env = Env::on(backend, &sim, &[run]);
        env.extra = format!(
            "\n[sinks.ops]\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\
             pipeline = true\nmax_attempts = 1\n\n[[routes]]\nsinks = [\"ops\"]\n",
            receiver.url()
        );
        let config = env.write_config();
        // The 10th 2xx is event 11's.
        let mut child = spawn_daemon(&config, Some("http.before_mark:10"));
        let status = wait_for("the daemon to die after event 11's 2xx", || {
            let exited = child.0.try_wait().expect("try_wait");
            async move { exited.ok_or_else(|| "still running".to_owned()) }
        })
        .await;
        assert_killed(status, "http.before_mark:10");
        let reader = env.reads()
            .await
            .expect("state database");
        let dead: Vec<String> = reader
            .dead_letters(Some("ops".into()), None)
            .await
            .expect("dead letters")
            .into_iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(
            dead,
            [format!("{run}:10")],
            "event 10's dead letter was committed before event 11 went out"
        );

        let mut child = spawn_daemon(&config, None);
        wait_for("every other event at the receiver", || async {
            let accepted: HashSet<String> = receiver.accepted().into_iter().map(|r| r.id).collect();
            if accepted.len() == 20 {
                Ok(())
            } else {
                Err(format!("{} of 20", accepted.len()))
            }
        })
        .await;
        terminate(&mut child).await;
        let ids: Vec<String> = receiver.accepted().into_iter().map(|r| r.id).collect();
        let want: Vec<String> = (1..=20)
            .filter(|s| *s != 10)
            .map(|s| format!("{run}:{s}"))
            .chain([format!("{run}:finished:20")])
            .collect();
        assert_eq!(
            first_arrivals(&ids),
            want,
            "first arrivals in order, 10 dead"
        );
        let tens = receiver
            .requests()
            .iter()
            .filter(|r| r.id == format!("{run}:10"))
            .count();
        assert_eq!(tens, 1, "a dead letter is not sent again");
    }
}

/// The built daemon on `config`, with `crash_at` armed if given.
fn spawn_daemon(config: &std::path::Path, crash_at: Option<&str>) -> Spawned {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_runhook"));
    command
        .arg("--config")
        .arg(config)
        .arg("run")
        .env("RUNHOOK_LOG", "error")
        .env_remove("RUNHOOK_CRASH_AT")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    if let Some(point) = crash_at {
        command.env("RUNHOOK_CRASH_AT", point);
    }
    Spawned(command.spawn().expect("runhook starts"))
}
