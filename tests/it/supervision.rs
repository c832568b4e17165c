//! Supervision of the daemon's loops: a delivery loop survives a held write
//! lock, a file sink that cannot be reopened on reload does not take the
//! daemon down, a failed file write leaves no bytes behind, and
//! `unwatch`/`watch` in quick succession leaves exactly one follower.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runhook::simulate::{Fault, FaultKind};
use tokio_util::sync::CancellationToken;

use crate::receiver::{Receiver, SECRET};
use crate::support::*;

fn runhook(config: &Path, args: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_runhook"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("runhook runs");
    assert!(
        output.status.success(),
        "runhook {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A daemon in a child process whose log lines the test can read.
struct LoggedDaemon {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl LoggedDaemon {
    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .env("RUNHOOK_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runhook starts");
        let log = capture_stderr(&mut child);
        Self { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    async fn wait_log(&self, needle: &str, times: usize) {
        wait_for(&format!("{times} x {needle:?} in the log"), || async {
            let log = self.log();
            if log.matches(needle).count() >= times {
                Ok(())
            } else {
                Err(log)
            }
        })
        .await
    }

    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().expect("daemon exits");
        let log = self.log();
        assert!(status.success(), "daemon exit {status}: {log}");
        log
    }
}

impl Drop for LoggedDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn events_requests(sim: &runhook::simulate::Simulator, run: &str, endpoint: &str) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r.endpoint == endpoint && r.run_id.as_deref() == Some(run))
        .count()
}

on_both! {
    async fn unwatch_then_watch_at_once_leaves_exactly_one_follower(backend: Backend) {
        let mut run = scripted("run-w", numbered(3000));
        run.interval = Duration::from_millis(100);
        let sim = sim_with(vec![run]).await;
        // Every run lookup takes 4 s. A follower looks the run up right after its
        // first page, so an unwatched follower takes a while to end: the window
        // in which `watch` starts a new one.
        sim.inject(Fault {
            run: Some("run-w".into()),
            endpoint: Some("run".into()),
            count: None,
            kind: FaultKind::Slow { delay_ms: 4000 },
        });
        let env = Env::on(backend, &sim, &[]);
        let config = env.write_config();
        let mut command = Command::new(env!("CARGO_BIN_EXE_runhook"));
        command.arg("--config").arg(&config).arg("run");
        let daemon = LoggedDaemon::spawn(command);
        daemon.wait_log("runhook started", 1).await;
        runhook(&config, &["watch", "run-w"]);
        wait_for("run-w's first page", || async {
            match events_requests(&sim, "run-w", "events") {
                0 => Err("no page yet".into()),
                _ => Ok(()),
            }
        })
        .await;
        runhook(&config, &["unwatch", "run-w"]);
        daemon.wait_log("unwatched; stopping ingest", 1).await;
        runhook(&config, &["watch", "run-w"]);
        // Both followers' lookups answered: the old follower has ended by now.
        wait_for("both followers' run lookups", || async {
            match events_requests(&sim, "run-w", "run") {
                n if n >= 2 => Ok(()),
                n => Err(format!("{n} lookups")),
            }
        })
        .await;
        runhook(&config, &["unwatch", "run-w"]);
        // The one follower stops: the simulator sees no more pages for the run.
        let mut last = (usize::MAX, Instant::now());
        wait_for_within(
            Duration::from_secs(20),
            "run-w's pages to stop after the second unwatch",
            || {
                let count = events_requests(&sim, "run-w", "events");
                if count != last.0 {
                    last = (count, Instant::now());
                }
                let quiet = last.1.elapsed();
                async move {
                    if quiet >= Duration::from_secs(2) {
                        Ok(())
                    } else {
                        Err(format!("{count} pages so far, the last {quiet:?} ago"))
                    }
                }
            },
        )
        .await;
        let log = daemon.stop();
        assert_eq!(
            log.matches("unwatched; stopping ingest").count(),
            2,
            "{log}"
        );
    }
}

// SQLite only: it holds SQLite's write lock under the daemon.
#[tokio::test]
async fn a_write_lock_held_25_s_during_delivery_then_everything_drains_once() {
    let mut run = scripted("run-l", numbered(120));
    run.interval = Duration::from_millis(100);
    let sim = sim_with(vec![run]).await;
    let receiver = Receiver::start().await;
    let mut env = Env::new(&sim, &["run-l"]);
    env.extra = format!(
        "\n[sinks.ops]\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\
         initial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n\n[[routes]]\nsinks = [\"ops\"]\n",
        receiver.url()
    );
    let daemon = env.start();
    wait_for("deliveries in flight", || async {
        match receiver.accepted().len() {
            n if n >= 5 => Ok(()),
            n => Err(format!("{n} accepted")),
        }
    })
    .await;
    // `runhook replay` on a big database: the write lock, held for longer
    // than the writer's busy timeout, twice over.
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = {
        let path = env.state_path();
        std::thread::spawn(move || {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.busy_timeout(Duration::from_secs(30)).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            locked_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_secs(25));
            conn.execute_batch("COMMIT").unwrap();
        })
    };
    locked_rx.recv().unwrap();
    tokio::task::spawn_blocking(move || holder.join().unwrap())
        .await
        .unwrap();
    assert!(!daemon.task.is_finished(), "the daemon outlived the lock");
    env.wait_finished(&["run-l"]).await;
    let accepted = wait_for("every event at the receiver", || async {
        let accepted = receiver.accepted();
        if accepted.len() >= 121 {
            Ok(accepted)
        } else {
            Err(format!("{} accepted", accepted.len()))
        }
    })
    .await;
    daemon.stop().await;
    let ids: Vec<String> = accepted.iter().map(|r| r.id.clone()).collect();
    let mut expected: Vec<String> = (1..=120).map(|s| format!("run-l:{s}")).collect();
    expected.push("run-l:finished:120".into());
    assert_eq!(ids, expected, "each event once, in order");
    let raw = std::fs::read_to_string(env.events_path()).unwrap();
    assert_run_exactly_once(&sim, &env.final_lines(), "run-l", &raw);
}

on_both! {
    async fn a_file_sink_that_cannot_be_reopened_on_reload_fails_alone_and_recovers(backend: Backend) {
        let mut run = scripted("run-r", numbered(60));
        run.interval = Duration::from_millis(100);
        let sim = sim_with(vec![run]).await;
        let mut env = Env::on(backend, &sim, &["run-r"]);
        let other = env.dir.path().join("other.jsonl");
        env.extra = format!(
            "\n[sinks.other]\ntype = \"file\"\npath = \"{}\"\n{}\n[[routes]]\nsinks = [\"other\"]\n\
             [delivery]\ninitial_backoff = \"100ms\"\nmax_backoff = \"500ms\"\n",
            other.display(),
            env.file_sink_node()
        );
        let (reloads, reloaded) = tokio::sync::mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let daemon = tokio::spawn(runhook::daemon::run_reloadable(
            Arc::new(env.config()),
            shutdown.clone(),
            reloaded,
        ));
        wait_for("some events in the archive", || async {
            match env.lines().len() {
                n if n >= 3 => Ok(()),
                n => Err(format!("{n} lines")),
            }
        })
        .await;
        // logrotate moved the file away and what now stands at the path cannot
        // be opened for writing.
        let rotated = env.dir.path().join("events.jsonl.1");
        std::fs::rename(env.events_path(), &rotated).unwrap();
        std::fs::create_dir(env.events_path()).unwrap();
        reloads.send(env.config()).await.unwrap();
        let reader = wait_for("the state database", || async {
            env.reads()
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        wait_for("archive shown down in status", || async {
            let sinks = reader.sinks().await.map_err(|e| e.to_string())?;
            match sinks.iter().find(|s| s.sink == "archive") {
                Some(s) if s.down => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        assert!(!daemon.is_finished(), "the daemon keeps running");
        // Ingest and the other sink carry on meanwhile.
        wait_for("run-r complete on the other sink", || async {
            let lines = read_lines(&other);
            if lines.iter().any(|l| l["type"] == "run_finished") {
                Ok(())
            } else {
                Err(format!("{} lines", lines.len()))
            }
        })
        .await;
        // The operator fixes the path: the sink reopens by itself and drains.
        std::fs::remove_dir(env.events_path()).unwrap();
        env.wait_finished(&["run-r"]).await;
        wait_for("archive up again", || async {
            let sinks = reader.sinks().await.map_err(|e| e.to_string())?;
            match sinks.iter().find(|s| s.sink == "archive") {
                Some(s) if !s.down && s.pending == 0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        shutdown.cancel();
        daemon.await.unwrap().unwrap();
        let mut all = final_lines(&rotated);
        all.extend(env.final_lines());
        let mut raw = std::fs::read_to_string(&rotated).unwrap();
        raw.push_str(&std::fs::read_to_string(env.events_path()).unwrap());
        assert_run_exactly_once(&sim, &all, "run-r", &raw);
        let raw_other = std::fs::read_to_string(&other).unwrap();
        assert_run_exactly_once(&sim, &final_lines(&other), "run-r", &raw_other);
    }
}

/// The file size limit (RLIMIT_FSIZE) the partial-write test runs the daemon
/// under: far above what the state database reaches in the test.
const FSIZE_LIMIT: u64 = 32 << 20;

on_both! {
    async fn a_partial_file_write_is_cut_back_and_written_once_later(backend: Backend) {
        let has_prlimit = Command::new("prlimit")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_prlimit {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs on Linux, which has prlimit (util-linux)"
            );
            eprintln!("SKIPPED: no prlimit here");
            return;
        }
        let sim = sim_with(vec![scripted("run-p", numbered(40))]).await;
        let mut env = Env::on(backend, &sim, &["run-p"]);
        env.extra = "[delivery]\ninitial_backoff = \"50ms\"\nmax_backoff = \"200ms\"\n".into();
        // The file already stands a little below the size limit: the first batch
        // is written in part, then the write fails (EFBIG), as on a full disk.
        let filler_line = format!(
            "{{\"id\":\"old:1\",\"pad\":\"{}\"}}\n",
            "x".repeat(FSIZE_LIMIT as usize - 300)
        );
        std::fs::write(env.events_path(), &filler_line).unwrap();
        let config = env.write_config();
        let mut command = Command::new("sh");
        command.arg("-c").arg(format!(
            "trap '' XFSZ; exec prlimit --fsize={FSIZE_LIMIT}:unlimited -- '{}' --config '{}' run",
            env!("CARGO_BIN_EXE_runhook"),
            config.display()
        ));
        let daemon = LoggedDaemon::spawn(command);
        let reader = wait_for("the state database", || async {
            env.reads()
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        wait_for("a failed write", || async {
            let sinks = reader.sinks().await.map_err(|e| e.to_string())?;
            match sinks.iter().find(|s| s.sink == "archive") {
                Some(s) if s.retrying > 0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        // Space comes back.
        let pid = daemon.child.id().to_string();
        let raised = Command::new("prlimit")
            .args(["--pid", &pid, "--fsize=unlimited:unlimited"])
            .status()
            .unwrap();
        assert!(raised.success());
        env.wait_finished(&["run-p"]).await;
        let log = daemon.stop();
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        let after = raw
            .strip_prefix(filler_line.as_str())
            .expect("the old content is intact");
        assert!(after.ends_with('\n'), "no torn line: {log}");
        let lines = env.final_lines();
        assert_run_exactly_once(&sim, &lines[1..], "run-p", after);
    }
}
