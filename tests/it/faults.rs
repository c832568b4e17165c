//! Everything going wrong at once, while the runs are live: the upstream
//! drops streams, sends error frames, 500/503, 429 with Retry-After, answers
//! slowly, replays stale events, has gaps, pages a backlog bigger than a
//! page; the receiver fails 30% of requests and goes away for a while during
//! ingest. Nothing is lost and nothing is ingested twice.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use runhook::simulate::scenario::ScriptedEvent;
use runhook::simulate::{Fault, FaultKind, Scenario};

use crate::receiver::{Answer, Receiver, SECRET};
use crate::support::*;

fn with_gaps(n: i64) -> Vec<ScriptedEvent> {
    (1..=n)
        .map(|i| ScriptedEvent {
            event_type: if i % 5 == 0 {
                "ARTIFACT_CREATED".into()
            } else {
                "PHASE_STARTED".into()
            },
            payload: format!(r#"{{"i":{i},"f":0.10}}"#),
            // Every tenth event jumps three sequences.
            sequence: Some(i + 3 * (i / 10)),
            created_at: i % 7 != 0,
        })
        .collect()
}

/// Events are emitted this far apart: a run lasts `EVENTS * INTERVAL` (9 s),
/// past the first successful request (a poll meets four error answers, one
/// a 429 with `Retry-After: 1`, and backs off: 2 to 5 s).
const INTERVAL: Duration = Duration::from_millis(150);
const EVENTS: i64 = 60;
/// Smaller than a run, and than the backlog the first good poll finds.
const PAGE_SIZE: usize = 8;

fn fault(run: &str, endpoint: &str, count: Option<u32>, kind: FaultKind) -> Fault {
    Fault {
        run: Some(run.into()),
        endpoint: Some(endpoint.into()),
        count,
        kind,
    }
}

on_both! {
    async fn the_fault_matrix_loses_nothing_and_ingests_nothing_twice(backend: Backend) {
        let sse_runs = ["fm-s1", "fm-s2", "fm-s3"];
        let poll_runs = ["fm-p1", "fm-p2", "fm-p3"];
        let finished_early = ["fm-s3", "fm-p3"];
        let mut runs = Vec::new();
        let mut faults = Vec::new();
        for id in sse_runs.iter().chain(&poll_runs) {
            let mut run = scripted(id, with_gaps(EVENTS));
            // The third of each kind has finished when the faults are over: its
            // backlog is paged (and streamed) from a completed run.
            run.interval = if finished_early.contains(id) {
                Duration::from_millis(4)
            } else {
                INTERVAL
            };
            runs.push(run);
        }
        for id in sse_runs {
            faults.extend([
                fault(
                    id,
                    "stream",
                    Some(1),
                    FaultKind::Status {
                        status: 503,
                        retry_after: None,
                    },
                ),
                fault(
                    id,
                    "stream",
                    Some(1),
                    FaultKind::Status {
                        status: 429,
                        retry_after: Some(1),
                    },
                ),
                fault(id, "stream", Some(2), FaultKind::Slow { delay_ms: 300 }),
                fault(id, "stream", Some(3), FaultKind::DropStream { after: 7 }),
                fault(id, "stream", Some(2), FaultKind::ErrorFrame { after: 5 }),
                fault(id, "stream", None, FaultKind::Resend),
            ]);
        }
        for id in poll_runs {
            faults.extend([
                fault(
                    id,
                    "events",
                    Some(2),
                    FaultKind::Status {
                        status: 500,
                        retry_after: None,
                    },
                ),
                fault(
                    id,
                    "events",
                    Some(1),
                    FaultKind::Status {
                        status: 502,
                        retry_after: None,
                    },
                ),
                fault(
                    id,
                    "events",
                    Some(1),
                    FaultKind::Status {
                        status: 429,
                        retry_after: Some(1),
                    },
                ),
                fault(id, "events", Some(3), FaultKind::Slow { delay_ms: 200 }),
                fault(id, "events", Some(3), FaultKind::IgnoreSince),
                fault(id, "events", None, FaultKind::Resend),
            ]);
        }
        let sim = start_sim(Scenario {
            page_size: PAGE_SIZE,
            heartbeat: Duration::from_millis(300),
            runs,
            faults,
            ..Scenario::default()
        })
        .await;
        let receiver = Receiver::start().await;
        receiver.set_fail_percent(30);
        let all: Vec<&str> = sse_runs.iter().chain(&poll_runs).copied().collect();
        let mut env = Env::on(backend, &sim, &all);
        env.poll_runs = poll_runs.iter().map(|r| r.to_string()).collect();
        env.api = format!(
            "session_cookie = \"{}\"\npoll_interval = \"50ms\"\nstream_idle_timeout = \"2s\"\n",
            sim.session()
        );
        env.extra = format!(
            "\n[sinks.ops]\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\ninitial_backoff = \"20ms\"\nmax_backoff = \"300ms\"\nmax_attempts = 10000\n\n[[routes]]\nsinks = [\"ops\"]\n",
            receiver.url()
        );
        let daemon = env.start();
        // The receiver goes away for a while mid-run, while ingest goes on.
        wait_for("some deliveries", || async {
            let n = receiver.accepted().len();
            if n >= 20 { Ok(()) } else { Err(format!("{n}")) }
        })
        .await;
        receiver.set_default(Some(Answer::Status(503)));
        let gone_at = receiver.requests().len();
        let ingested_at_outage = env.lines().len();
        wait_for("the outage noticed while ingest goes on", || async {
            let n = receiver.requests().len();
            let ingested = env.lines().len();
            if n >= gone_at + 10 && ingested >= ingested_at_outage + 20 {
                Ok(())
            } else {
                Err(format!(
                    "{} requests, {} events ingested during the outage",
                    n - gone_at,
                    ingested - ingested_at_outage
                ))
            }
        })
        .await;
        let live_after_outage = all
            .iter()
            .filter(|run| sim.status(run).as_deref() == Some("running"))
            .count();
        receiver.set_default(None);

        let lines = env.wait_finished(&all).await;
        let expected = all.len() * (EVENTS as usize + 1);
        wait_for("every webhook delivery", || async {
            let distinct: HashSet<String> = receiver.accepted().into_iter().map(|r| r.id).collect();
            if distinct.len() == expected {
                Ok(())
            } else {
                Err(format!("{} of {expected}", distinct.len()))
            }
        })
        .await;
        daemon.stop().await;
        assert_eq!(sim.faults_left(), 0, "every counted fault was served");

        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        for run in &all {
            assert_run_exactly_once(&sim, &lines, run, &raw);
        }
        assert_eq!(lines.len(), expected, "nothing ingested twice");
        let accepted = receiver.accepted();
        assert_eq!(accepted.len(), expected, "no repeats without a crash");
        let mut per_run: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for request in &accepted {
            let run = request.id.split(':').next().unwrap().to_owned();
            per_run.entry(run).or_default().push(request.id.clone());
        }
        for (run, delivered) in per_run {
            let mut want: Vec<String> = sim
                .script(&run)
                .iter()
                .map(|e| format!("{run}:{}", e.0))
                .collect();
            want.push(format!(
                "{run}:finished:{}",
                sim.script(&run).last().unwrap().0
            ));
            assert_eq!(delivered, want, "run {run}: in order, once");
        }
        assert!(
            live_after_outage > 0,
            "the receiver outage ended while runs were still live upstream"
        );
        let log = sim.requests();
        for run in &all {
            let first_ok = log
                .iter()
                .find(|r| {
                    r.run_id.as_deref() == Some(*run)
                        && r.status == 200
                        && (r.endpoint == "stream" || r.endpoint == "events")
                })
                .unwrap_or_else(|| panic!("{run}: a successful request"));
            let emitted = if finished_early.contains(run) {
                EVENTS as u64
            } else {
                first_ok.at_ms / INTERVAL.as_millis() as u64
            };
            assert!(
                finished_early.contains(run) || emitted < EVENTS as u64,
                "{run}: the first successful request ({} ms) finds the run still live \
                 ({emitted} of {EVENTS} events emitted)",
                first_ok.at_ms
            );
            if poll_runs.contains(run) {
                assert!(
                    emitted > PAGE_SIZE as u64,
                    "{run}: the first successful poll ({} ms) finds a backlog of more than a page \
                     ({emitted} events emitted, pages of {PAGE_SIZE})",
                    first_ok.at_ms
                );
            }
        }
        for status in [500, 502, 503, 429] {
            assert!(
                log.iter().any(|r| r.status == status),
                "the upstream answered {status} at some point"
            );
        }
        for run in sse_runs {
            let connections = log
                .iter()
                .filter(|r| r.endpoint == "stream" && r.run_id.as_deref() == Some(run))
                .count();
            assert!(
                connections >= 6,
                "{run}: the stream was dropped and reopened ({connections})"
            );
        }
        let failed = receiver
            .requests()
            .iter()
            .filter(|r| r.answered >= 500)
            .count();
        assert!(failed > 100, "the receiver did fail a lot ({failed})");
    }
}
