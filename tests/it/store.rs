//! The store under contention and a file sink that cannot write.

use std::time::{Duration, Instant};

use runhook::store::{Reader, Store};

use crate::support::*;

#[tokio::test]
async fn a_write_lock_held_past_the_busy_timeout_delays_writes_but_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = Store::open(&path).unwrap();
    // Another process (say `runhook watch`) holds the write lock for longer
    // than the writer's 10 s busy timeout: its group cannot even begin.
    let holder = {
        let path = path.clone();
        std::thread::spawn(move || {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            std::thread::sleep(Duration::from_secs(11));
            conn.execute_batch("COMMIT").unwrap();
        })
    };
    // Let the holder take the lock first.
    wait_for("the other writer's lock", || async {
        let conn = rusqlite::Connection::open(&path).map_err(|e| e.to_string())?;
        match conn.execute_batch("BEGIN IMMEDIATE") {
            Err(_) => Ok(()),
            Ok(()) => {
                conn.execute_batch("ROLLBACK").map_err(|e| e.to_string())?;
                Err("not locked yet".into())
            }
        }
    })
    .await;
    let started = Instant::now();
    store
        .subscribe("r1".into(), Default::default(), "watch", None)
        .await
        .expect("the write lands once the lock is free");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "it did wait for the lock"
    );
    holder.join().unwrap();
    let runs = Reader::open(&path).unwrap().runs().await.unwrap();
    assert_eq!(runs.len(), 1);
}

#[tokio::test]
async fn a_file_sink_that_cannot_write_retries_then_dead_letters() {
    if !std::path::Path::new("/dev/full").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs on Linux, which has /dev/full"
        );
        eprintln!("SKIPPED: no /dev/full here");
        return;
    }
    let sim = sim_with(vec![scripted("run-full", numbered(2))]).await;
    let mut env = Env::new(&sim, &["run-full"]);
    env.extra = "\n[sinks.full]\ntype = \"file\"\npath = \"/dev/full\"\nmax_attempts = 3\ninitial_backoff = \"10ms\"\n\n[[routes]]\nsinks = [\"full\"]\n".into();
    let daemon = env.start();
    let reader = wait_for("the state database", || async {
        Reader::open(&env.state_path()).map_err(|e| e.to_string())
    })
    .await;
    let dead = wait_for("all three dead-lettered", || async {
        let dead = reader
            .dead_letters(Some("full".into()), None)
            .await
            .map_err(|e| e.to_string())?;
        if dead.len() == 3 {
            Ok(dead)
        } else {
            Err(format!("{dead:?}"))
        }
    })
    .await;
    env.wait_finished(&["run-full"]).await;
    daemon.stop().await;
    assert!(dead.iter().all(|d| d.attempts == 3), "{dead:?}");
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("No space left"),
        "{dead:?}"
    );
    // The other sink was not held up by the broken one.
    assert_eq!(env.final_lines().len(), 3);
}

/// README.md, guarantee 7: one daemon per state database. A second `runhook
/// run` on the same state exits at once, naming the state and the holder;
/// the commands that only read or change state keep working beside it.
#[tokio::test]
async fn a_second_daemon_on_one_state_database_exits_at_once_naming_the_holder() {
    use std::process::{Command, Stdio};
    let sim = start_sim(runhook::simulate::Scenario::demo()).await;
    let env = Env::new(&sim, &[]);
    let config = env.write_config();
    let runhook = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_runhook"));
        command
            .arg("--config")
            .arg(&config)
            .env("RUNHOOK_LOG", "error");
        command
    };
    let mut first = KillOnDrop(
        runhook()
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("runhook starts"),
    );
    wait_for("the first daemon's state database, migrated", || async {
        let conn = rusqlite::Connection::open_with_flags(
            env.state_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .map_err(|e| e.to_string())?;
        match conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)) {
            Ok(version) if version > 0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    let mut second = KillOnDrop(
        runhook()
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runhook starts"),
    );
    let exited = wait_for_within(Duration::from_secs(30), "the second daemon to exit", || {
        let status = second.0.try_wait();
        async move {
            match status {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("still running beside the first".into()),
                Err(error) => Err(error.to_string()),
            }
        }
    })
    .await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!exited.success(), "{stderr}");
    assert!(
        stderr.contains(&env.state_path().display().to_string()),
        "names the state path: {stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {}", first.0.id())),
        "names the holder's pid: {stderr}"
    );

    let status = runhook().args(["status", "--json"]).output().unwrap();
    assert!(
        status.status.success(),
        "status beside the daemon: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let watch = runhook()
        .args(["watch", "demo-rome-0001"])
        .output()
        .unwrap();
    assert!(
        watch.status.success(),
        "watch beside the daemon: {}",
        String::from_utf8_lossy(&watch.stderr)
    );

    Command::new("kill")
        .args(["-TERM", &first.0.id().to_string()])
        .status()
        .unwrap();
    assert!(first.0.wait().unwrap().success());
}

/// A child process that does not outlive a failing test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
