//! The command line: `check` exit codes, `watch` beside a running daemon,
//! `status`.

use std::process::Command;

use runhook::simulate::Scenario;

use crate::support::*;

fn runhook(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_runhook"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("runhook runs")
}

#[test]
fn check_exits_78_and_names_file_line_column_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[api]\ntoken = \"t\"\npoll_intervl = \"2s\"\n").unwrap();
    let output = runhook(&path, &["check"]);
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:3:1: api.poll_intervl", path.display())),
        "{stderr}"
    );
    let output = runhook(&dir.path().join("missing.toml"), &["check"]);
    assert_eq!(output.status.code(), Some(78));
}

#[test]
fn check_warns_about_a_template_no_route_can_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("runhook.toml");
    std::fs::write(
        &path,
        "[api]\ntoken = \"t\"\n[sinks.chat]\ntype = \"slack\"\n\
         webhook_url = \"https://hooks.slack.com/x\"\n\
         templates = { ARTIFACT_CREATED = \"new\" }\n\
         [[routes]]\nevent_types = [\"run_finished\"]\nsinks = [\"chat\"]\n",
    )
    .unwrap();
    let output = runhook(&path, &["check"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "warning: {}:6:34: sinks.chat.templates.ARTIFACT_CREATED",
            path.display()
        )),
        "{stderr}"
    );
}

#[test]
fn check_prints_the_routing_table_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("slack"),
        "https://hooks.slack.com/services/SECRETPATH\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
        .unwrap()
        .replace(
            "/run/credentials/runhook.service",
            &dir.path().display().to_string(),
        );
    std::fs::write(dir.path().join("session"), "cookie-secret\n").unwrap();
    let path = dir.path().join("runhook.toml");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_runhook"))
        .arg("--config")
        .arg(&path)
        .arg("check")
        .env("TRAVELMODE_TOKEN", "token-secret")
        .env(
            "RUNHOOK_WEBHOOK_SECRET",
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("everything"), "{stdout}");
    assert!(stdout.contains("-> chat, ops"), "{stdout}");
    for secret in ["SECRETPATH", "cookie-secret", "token-secret", "C2FVsBQ"] {
        assert!(!stdout.contains(secret), "{secret} leaked: {stdout}");
    }
}

on_both! {
    async fn watch_on_a_running_daemon_starts_delivering_that_run(backend: Backend) {
        let sim = start_sim(Scenario::demo()).await;
        let env = Env::on(backend, &sim, &[]);
        let config = env.write_config();
        let daemon = env.start();
        wait_for("the daemon's state database", || async {
            if env.daemon_opened_state().await {
                Ok(())
            } else {
                Err("no database yet".into())
            }
        })
        .await;
        let output = runhook(
            &config,
            &["watch", "demo-kyoto-0003", "--label", "team=kyoto"],
        );
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let lines = env.wait_finished(&["demo-kyoto-0003"]).await;
        assert_eq!(lines[0]["labels"]["team"], "kyoto");
        // A line is in the file (fsync'd) just before its delivery is marked done.
        let status = wait_for("status: nothing pending", || async {
            let output = runhook(&config, &["status", "--json"]);
            let status: serde_json::Value =
                serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())?;
            if status["sinks"][0]["pending"] == 0 {
                Ok(status)
            } else {
                Err(status.to_string())
            }
        })
        .await;
        assert_eq!(status["runs"][0]["run_id"], "demo-kyoto-0003");
        assert_eq!(status["runs"][0]["state"], "finished");
        assert_eq!(status["sinks"][0]["sink"], "archive");
        assert_eq!(status["sinks"][0]["done"], 4);
        let output = runhook(&config, &["unwatch", "demo-kyoto-0003"]);
        assert!(output.status.success());
        daemon.stop().await;
    }
}

on_both! {
    async fn tail_prints_events_as_they_are_recorded(backend: Backend) {
        use std::io::BufRead;
        let sim = start_sim(Scenario::demo()).await;
        let env = Env::on(backend, &sim, &[]);
        let config = env.write_config();
        // The state database must exist for `tail`; `unwatch` of nothing creates it.
        let _ = runhook(&config, &["unwatch", "nothing"]);
        let mut tail = Command::new(env!("CARGO_BIN_EXE_runhook"))
            .arg("--config")
            .arg(&config)
            .args(["tail", "--json", "--run", "demo-oslo-0002"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = tail.stdout.take().unwrap();
        let reading = std::thread::spawn(move || {
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .take(6)
                .collect::<Vec<String>>()
        });
        let daemon = env.start();
        assert!(
            runhook(&config, &["watch", "demo-oslo-0002"])
                .status
                .success()
        );
        assert!(
            runhook(&config, &["watch", "demo-rome-0001"])
                .status
                .success()
        );
        wait_for("tail's six lines", || {
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
        let lines: Vec<serde_json::Value> = reading
            .join()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(
            lines.iter().all(|l| l["runId"] == "demo-oslo-0002"),
            "--run filters"
        );
        assert_eq!(lines[0]["id"], "demo-oslo-0002:1");
        assert_eq!(lines[5]["type"], "run_finished");
    }
}
