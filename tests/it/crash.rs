//! The built binary, killed with SIGKILL mid-run and restarted on the same
//! state: nothing missing, nothing doubled in the file.

use std::process::{Child, Command, Stdio};

use runhook::simulate::Scenario;
use runhook::simulate::scenario::Bulk;

use crate::support::*;

fn spawn_daemon(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_runhook"))
        .args(["--config", &config.display().to_string(), "run"])
        .env("RUNHOOK_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("runhook starts")
}

#[tokio::test]
async fn sigkill_mid_run_then_restart_delivers_every_event_once() {
    let bulk = Bulk {
        runs: 5,
        events: 300,
        interval: std::time::Duration::from_millis(2),
        prefix: "kill".into(),
    };
    let sim = start_sim(Scenario {
        page_size: 20,
        bulk: Some(bulk),
        ..Scenario::default()
    })
    .await;
    let ids = sim.run_ids();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let env = Env::new(&sim, &refs);
    let config = env.write_config();
    for threshold in [100, 500, 1000] {
        let mut child = spawn_daemon(&config);
        wait_for("progress before the kill", || async {
            let n = env.lines().len();
            if n >= threshold {
                Ok(())
            } else {
                Err(format!("{n} lines"))
            }
        })
        .await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }
    let mut child = spawn_daemon(&config);
    let lines = env.wait_finished(&refs).await;
    // SIGTERM: drains and exits 0.
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    assert!(child.wait().expect("exit").success(), "SIGTERM exits 0");
    let raw = std::fs::read_to_string(env.events_path()).unwrap();
    for run in &refs {
        assert_run_exactly_once(&sim, &lines, run, &raw);
    }
}
