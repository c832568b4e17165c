//! The operator's commands outside the service unit (issue 13): the
//! state-only commands read `[state]` and nothing else, `check` names the
//! secret file it could not read, output into a closed pipe ends quietly,
//! `route` answers which sinks an event would reach, and replay/backfill by
//! time.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Environment variables the configs below name; removed from every child,
/// as they would be missing outside the unit.
const UNIT_ONLY_VARS: [&str; 3] = ["TRAVELMODE_TOKEN", "RUNHOOK_WEBHOOK_SECRET", "OPS_IT_TOKEN"];

fn runhook(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_runhook"));
    command.args(args).env_remove("RUNHOOK_CONFIG");
    for var in UNIT_ONLY_VARS {
        command.env_remove(var);
    }
    command
}

fn run(mut command: impl std::borrow::BorrowMut<Command>) -> Output {
    command.borrow_mut().output().expect("runhook runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A config as the README recommends for a service, here outside it: the
/// token from the unit's environment, secrets from systemd credentials that
/// this machine does not have.
fn service_config(dir: &Path) -> (PathBuf, PathBuf) {
    let state = dir.join("state").join("runhook.db");
    let path = dir.join("runhook.toml");
    std::fs::write(
        &path,
        format!(
            r#"[api]
token = "${{OPS_IT_TOKEN}}"
session_cookie_file = "{dir}/credentials/session"

[state]
path = "{state}"

[sinks.ops]
type = "webhook"
url = "https://hooks.example.com/x"
secret_file = "{dir}/credentials/webhook-secret"

[[routes]]
sinks = ["ops"]
"#,
            dir = dir.display(),
            state = state.display()
        ),
    )
    .unwrap();
    (path, state)
}

#[test]
fn state_commands_run_without_the_units_secrets_or_environment() {
    let dir = tempfile::tempdir().unwrap();
    let (config, state) = service_config(dir.path());
    let config = config.to_str().unwrap();
    let run_id = "9f2a1c7e-0000-4000-8000-000000000001";
    for args in [
        vec!["watch", run_id, "--label", "team=rome"],
        vec!["status"],
        vec!["status", "--json"],
        vec!["dead"],
        vec!["dead", "--json"],
        vec!["replay"],
        vec!["replay", "--since", "1h", "--delivered"],
        vec!["backfill", "ops", "--since", "1h"],
        vec!["dead", "--purge"],
        vec!["unwatch", run_id],
    ] {
        let output = run(runhook(&["--config", config]).args(&args));
        assert!(
            output.status.success(),
            "runhook {args:?}: {:?}\n{}",
            output.status,
            text(&output.stderr)
        );
    }
    assert!(state.exists(), "watch created the state database");
    let before_retention = run(runhook(&[
        "--config",
        config,
        "replay",
        "--since",
        "30d",
        "--delivered",
    ]));
    let stderr = text(&before_retention.stderr);
    assert!(
        stderr.contains("before the retention horizon (state.retain = 7days)"),
        "replay says what retention took: {stderr}"
    );
    let status = run(runhook(&["--config", config, "status"]));
    assert!(text(&status.stdout).contains(run_id));
}

#[test]
fn state_flag_needs_no_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("runhook.db");
    let missing = dir.path().join("no-such-config.toml");
    for args in [
        vec!["watch", "run-1"],
        vec!["status"],
        vec!["dead"],
        vec!["replay"],
    ] {
        let output = run(runhook(&[
            "--config",
            missing.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
        ])
        .args(&args));
        assert!(
            output.status.success(),
            "runhook {args:?}: {}",
            text(&output.stderr)
        );
    }
}

/// The reading commands open the state read-only: on a mistyped path they
/// say there is no database there, and leave none behind (a created empty
/// one would hide the typo from the next command and from the daemon).
#[test]
fn reading_commands_create_no_state_database() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("typo.db");
    for command in ["status", "dead", "tail"] {
        let output = run(runhook(&["--state", state.to_str().unwrap(), command]));
        assert!(!output.status.success(), "runhook {command} succeeded");
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains("no state database here yet"),
            "runhook {command}: {stderr}"
        );
        assert!(!state.exists(), "runhook {command} created {state:?}");
    }
}

#[test]
fn a_bad_state_table_is_a_config_error_at_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("runhook.toml");
    std::fs::write(
        &path,
        "[api]\ntoken = \"${OPS_IT_TOKEN}\"\n[state]\nretain = \"soon\"\n",
    )
    .unwrap();
    let output = run(runhook(&["--config", path.to_str().unwrap(), "status"]));
    assert_eq!(output.status.code(), Some(78), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:4:10: state.retain", path.display())),
        "{stderr}"
    );
}

#[test]
fn check_names_the_secret_file_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = service_config(dir.path());
    let output =
        run(runhook(&["--config", config.to_str().unwrap(), "check"]).env("OPS_IT_TOKEN", "t"));
    assert_eq!(output.status.code(), Some(78), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    let session = dir.path().join("credentials").join("session");
    assert!(
        stderr.contains("api.session_cookie_file")
            && stderr.contains(&format!("cannot read secret file {}", session.display())),
        "{stderr}"
    );
}

/// The issue's own case: the shipped example, outside a unit. `status`
/// gets as far as the state database (absent here); `check` still checks
/// the secrets and names the credential file it could not read.
#[test]
fn the_shipped_example_config_outside_the_unit() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let session = "/run/credentials/runhook.service/session";
    if Path::new(session).exists() {
        return; // a machine running the unit: nothing to show here
    }
    let status = run(runhook(&["--config", example, "status"]));
    let stderr = text(&status.stderr);
    assert_ne!(status.status.code(), Some(78), "{stderr}");
    if !Path::new("/var/lib/runhook/runhook.db").exists() {
        assert!(stderr.contains("/var/lib/runhook/runhook.db"), "{stderr}");
    }

    let check = run(runhook(&["--config", example, "check"])
        .env("TRAVELMODE_TOKEN", "t")
        .env(
            "RUNHOOK_WEBHOOK_SECRET",
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
        ));
    let stderr = text(&check.stderr);
    assert_eq!(check.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot read secret file {session}")),
        "{stderr}"
    );
}

/// Runs `runhook args` with its standard output a pipe whose reader is
/// already gone, and returns its exit status and standard error.
fn into_closed_pipe(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = runhook(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runhook starts");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("runhook ends");
    (output.status, text(&output.stderr))
}

#[tokio::test]
async fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("runhook.db");
    // More output than a pipe buffers (64 KiB), so that a write fails even
    // if the reader closed only after the first lines.
    let store = crate::support::open_state(&state).await.unwrap();
    let mut watches = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let store = store.clone();
        watches.spawn(async move {
            store
                .subscribe(
                    format!("9f2a1c7e-0000-4000-8000-{i:012}"),
                    Default::default(),
                    "watch",
                    None,
                )
                .await
        });
    }
    while let Some(done) = watches.join_next().await {
        done.unwrap().unwrap();
    }
    drop(store);
    let state = state.to_str().unwrap();
    for args in [
        vec!["--state", state, "status"],
        vec!["--state", state, "status", "--json"],
        vec!["--state", state, "dead", "--json"],
        vec!["completions", "bash"],
    ] {
        let (status, stderr) = into_closed_pipe(&args);
        assert!(
            !stderr.contains("panicked") && stderr.is_empty(),
            "runhook {args:?} said: {stderr}"
        );
        assert!(status.success(), "runhook {args:?}: {status:?}");
    }
}

/// DESIGN.md's routing example, with the service's secrets absent.
fn routing_config(dir: &Path) -> PathBuf {
    let path = dir.join("runhook.toml");
    std::fs::write(
        &path,
        format!(
            r#"[api]
token = "${{OPS_IT_TOKEN}}"
[state]
path = "{dir}/runhook.db"
[sinks.ops]
type = "webhook"
url = "https://hooks.example.com/x"
secret_file = "{dir}/credentials/webhook-secret"
[sinks.chat]
type = "slack"
webhook_url_file = "{dir}/credentials/slack"
[sinks.archive]
type = "file"
path = "{dir}/events.jsonl"
[[routes]]
event_types = ["PHASE_*", "ARTIFACT_*"]
sinks = ["archive"]
[[routes]]
event_types = ["run_finished"]
statuses = ["failed", "cancelled"]
sinks = ["chat", "ops"]
[[routes]]
event_types = ["ARTIFACT_*"]
labels = {{ team = "rome" }}
sinks = ["ops"]
[[routes]]
runs = ["run-7"]
phases = ["compose"]
sinks = ["archive"]
"#,
            dir = dir.display()
        ),
    )
    .unwrap();
    path
}

fn route(config: &Path, args: &[&str]) -> (Output, String) {
    let output = run(runhook(&["--config", config.to_str().unwrap(), "route"]).args(args));
    let stdout = text(&output.stdout);
    (output, stdout)
}

#[test]
fn route_prints_the_matching_routes_and_their_sinks() {
    let dir = tempfile::tempdir().unwrap();
    let config = routing_config(dir.path());
    let (output, stdout) = route(
        &config,
        &[
            "--type",
            "run_finished",
            "--status",
            "failed",
            "--label",
            "team=rome",
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(stdout.contains("#2 "), "{stdout}");
    assert!(
        !stdout.contains("#1 ") && !stdout.contains("#3 "),
        "{stdout}"
    );
    assert!(stdout.contains("\nsinks: chat, ops\n"), "{stdout}");

    let (_, stdout) = route(
        &config,
        &["--type", "ARTIFACT_CREATED", "--label", "team=rome"],
    );
    assert!(stdout.contains("#1 ") && stdout.contains("#3 "), "{stdout}");
    assert!(stdout.contains("labels.team=rome"), "{stdout}");
    assert!(stdout.contains("\nsinks: archive, ops\n"), "{stdout}");

    let (_, stdout) = route(
        &config,
        &["--type", "X", "--run", "run-7", "--phase", "compose"],
    );
    assert!(
        stdout.contains("#4 ") && stdout.contains("\nsinks: archive\n"),
        "{stdout}"
    );
}

#[test]
fn route_says_so_when_no_sink_would_get_the_event() {
    let dir = tempfile::tempdir().unwrap();
    let config = routing_config(dir.path());
    for args in [
        vec!["--type", "run_finished", "--status", "completed"],
        // A `runs` filter needs --run to match.
        vec!["--type", "X", "--phase", "compose"],
    ] {
        let (output, stdout) = route(&config, &args);
        assert!(output.status.success(), "{}", text(&output.stderr));
        assert!(stdout.contains("no route matches"), "{args:?}: {stdout}");
        assert!(!stdout.contains("sinks:"), "{stdout}");
    }
}

#[test]
fn route_refuses_a_status_the_upstream_does_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let config = routing_config(dir.path());
    let (output, _) = route(&config, &["--type", "run_finished", "--status", "faild"]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("unknown status `faild`"), "{stderr}");
}

mod by_time {
    //! `replay --since` and `backfill` with a real daemon, simulator and
    //! webhook receiver.

    use super::*;
    use crate::receiver::{Receiver, SECRET};
    use crate::support::*;

    const RUN: &str = "9f2a1c7e-0000-4000-8000-00000000b001";

    fn hook(receiver: &Receiver, route: &str) -> String {
        format!(
            "\n[sinks.hook]\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\
             initial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n\n[[routes]]\n{route}sinks = [\"hook\"]\n",
            receiver.url()
        )
    }

    async fn accepted_ids(receiver: &Receiver, count: usize) -> Vec<String> {
        wait_for(&format!("{count} deliveries accepted"), || async {
            let ids: Vec<String> = receiver.accepted().iter().map(|r| r.id.clone()).collect();
            if ids.len() >= count {
                Ok(ids)
            } else {
                Err(format!("{ids:?}"))
            }
        })
        .await
    }

    /// Waits until `hook` has nothing pending: what the receiver accepted is
    /// recorded as delivered (a replay before that would miss the last one).
    async fn all_recorded_delivered(env: &Env) {
        wait_for("hook's deliveries recorded done", || async {
            let reader = crate::support::reads(&env.state_path())
                .await
                .map_err(|e| e.to_string())?;
            let sinks = reader.sinks().await.map_err(|e| e.to_string())?;
            match sinks.iter().find(|s| s.sink == "hook") {
                Some(hook) if hook.pending == 0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await
    }

    fn cli(config: &Path, args: &[&str]) -> String {
        let output = run(runhook(&["--config", config.to_str().unwrap()]).args(args));
        assert!(
            output.status.success(),
            "runhook {args:?}: {}",
            text(&output.stderr)
        );
        text(&output.stdout)
    }

    /// A receiver that lost its database gets the range again, beside the
    /// running daemon, under the same ids and in the same order.
    #[tokio::test]
    async fn replay_since_delivered_sends_the_range_again_under_the_same_ids() {
        let sim = sim_with(vec![scripted(RUN, numbered(4))]).await;
        let receiver = Receiver::start().await;
        let mut env = Env::new(&sim, &[RUN]);
        env.extra = hook(&receiver, "");
        let config = env.write_config();
        let daemon = env.start();
        let first = accepted_ids(&receiver, 5).await;
        assert_eq!(first.last().unwrap(), &format!("{RUN}:finished:4"));
        all_recorded_delivered(&env).await;

        let out = cli(&config, &["replay", "--sink", "hook", "--since", "1h"]);
        assert!(out.contains("queued 0 dead deliveries"), "{out}");
        let out = cli(
            &config,
            &["replay", "--sink", "hook", "--since", "1h", "--delivered"],
        );
        assert!(
            out.contains("queued 5 dead or delivered deliveries"),
            "{out}"
        );
        let all = accepted_ids(&receiver, 10).await;
        assert_eq!(all[5..], first[..], "the same ids, in the same order");
        all_recorded_delivered(&env).await;
        let out = cli(
            &config,
            &["replay", "--since", "2h", "--until", "1h", "--delivered"],
        );
        assert!(out.contains("queued 0 "), "nothing recorded then: {out}");
        let since = humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() - std::time::Duration::from_secs(3600),
        )
        .to_string();
        let out = cli(
            &config,
            &["replay", "--sink", "hook", "--since", &since, "--delivered"],
        );
        assert!(out.contains("queued 5 "), "since an RFC 3339 time: {out}");
        let all = accepted_ids(&receiver, 15).await;
        assert_eq!(all[10..], first[..]);
        for (args, complaint) in [
            (["--since", "yesterday"], "--since \"yesterday\""),
            (["--since", "1m"], "--since must be before --until"),
        ] {
            let output = run(runhook(&["--config", config.to_str().unwrap(), "replay"])
                .args(args)
                .args(["--until", "2m"]));
            let stderr = text(&output.stderr);
            assert!(
                !output.status.success() && stderr.contains(complaint),
                "{stderr}"
            );
        }
        daemon.stop().await;
        assert_eq!(env.final_lines().len(), 5, "the archive was not asked");
    }

    /// A sink added after the events were recorded gets what its route
    /// matches, once, however often backfill runs.
    #[tokio::test]
    async fn backfill_gives_a_sink_added_later_what_its_routes_match() {
        let sim = sim_with(vec![scripted(RUN, numbered(4))]).await;
        let receiver = Receiver::start().await;
        let mut env = Env::new(&sim, &[RUN]);
        let daemon = env.start();
        env.wait_finished(&[RUN]).await;
        daemon.stop().await;

        env.extra = hook(&receiver, "event_types = [\"run_finished\"]\n");
        let config = env.write_config();
        let out = cli(&config, &["backfill", "hook", "--since", "1h"]);
        assert!(out.contains("queued 1 events for hook"), "{out}");
        let out = cli(&config, &["backfill", "hook", "--since", "1h"]);
        assert!(out.contains("queued 0 events"), "not twice: {out}");
        let output = run(runhook(&[
            "--config",
            config.to_str().unwrap(),
            "backfill",
            "nosuch",
            "--since",
            "1h",
        ]));
        assert!(!output.status.success());
        assert!(text(&output.stderr).contains("`nosuch`"));

        let daemon = env.start();
        let ids = accepted_ids(&receiver, 1).await;
        assert_eq!(ids, [format!("{RUN}:finished:4")]);
        daemon.stop().await;
        assert_eq!(receiver.accepted().len(), 1);
        assert_eq!(env.final_lines().len(), 5, "the archive kept its lines");
    }
}
