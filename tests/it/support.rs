//! Shared fixtures: a simulator, a daemon on a temp dir (its state in SQLite
//! there, or in a PostgreSQL database of its own: [`Backend`]), the file it
//! writes, and waiting for conditions with a deadline (never a bare sleep).
//! [`on_both!`] runs one test body on each backend.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runhook::config::Config;
use runhook::simulate::scenario::{ScriptedEvent, ScriptedRun};
use runhook::simulate::{Scenario, Simulator};
use runhook::store::pg::Replica;
use runhook::store::{Location, Reads, RunRow, State, StateError};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::pg_support::PgDatabase;

/// The cluster node a daemon under test runs as on PostgreSQL; a file sink
/// there must name it to be written.
pub const NODE: &str = "it-node";

/// Where a daemon under test keeps its state.
pub enum Backend {
    /// `[state] path`: a file in the test's temp dir (the default).
    Sqlite,
    /// `[state] url`: a database of the test's own on the shared server,
    /// with `[cluster] node = NODE`.
    Postgres(PgDatabase),
}

impl Backend {
    /// `None` (after saying so) where no PostgreSQL is installed.
    pub async fn postgres() -> Option<Self> {
        PgDatabase::create().await.map(Self::Postgres)
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }
}

/// What a test body of [`on_both!`] takes, made from the backend under test:
/// the [`Backend`] itself for a daemon test, a store on it for a store test.
pub trait OnBackend: Sized {
    async fn on(backend: Backend) -> Self;
}

impl OnBackend for Backend {
    async fn on(backend: Backend) -> Self {
        backend
    }
}

/// Writes `async fn name(b: T) { body }` (or `b: &T`) as two tests,
/// `name::sqlite` and `name::postgres`, each running the body on a `T`
/// made ([`OnBackend`]) from its backend; the PostgreSQL one returns early,
/// saying so, where PostgreSQL is not installed (see `pg_support`).
/// `#[postgres_ignore = "why"]` first ignores the PostgreSQL one only.
macro_rules! on_both {
    (#[postgres_ignore = $why:literal] $(#[$meta:meta])* async fn $name:ident $args:tt $body:block) => {
        $crate::support::on_both!(@tests [#[ignore = $why]] $(#[$meta])* async fn $name $args $body);
    };
    (@tests [$($pg:tt)*] $(#[$meta:meta])* async fn $name:ident($b:ident: &$ty:ty) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[allow(unused_imports)]
            use $crate::support::OnBackend as _;

            async fn body($b: &$ty) $body

            #[tokio::test]
            async fn sqlite() {
                body(&<$ty>::on($crate::support::Backend::Sqlite).await).await;
            }

            #[tokio::test]
            $($pg)*
            async fn postgres() {
                let Some(backend) = $crate::support::Backend::postgres().await else { return };
                body(&<$ty>::on(backend).await).await;
            }
        }
    };
    (@tests [$($pg:tt)*] $(#[$meta:meta])* async fn $name:ident($b:ident: $ty:ty) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[allow(unused_imports)]
            use $crate::support::OnBackend as _;

            async fn body($b: $ty) $body

            #[tokio::test]
            async fn sqlite() {
                body(<$ty>::on($crate::support::Backend::Sqlite).await).await;
            }

            #[tokio::test]
            $($pg)*
            async fn postgres() {
                let Some(backend) = $crate::support::Backend::postgres().await else { return };
                body(<$ty>::on(backend).await).await;
            }
        }
    };
    ($(#[$meta:meta])* async fn $name:ident $args:tt $body:block) => {
        $crate::support::on_both!(@tests [] $(#[$meta])* async fn $name $args $body);
    };
}
pub(crate) use on_both;

/// The state database read beside the daemon, as `status` reads it: read
/// only, and an error when it does not exist yet.
pub async fn reads(path: &Path) -> Result<Reads, StateError> {
    Reads::open(&Location::Sqlite(path.to_owned()), Replica::bystander()).await
}

/// The state database opened to write, as `watch` or the daemon opens it
/// (created and migrated). A test writing a run's data path plays the
/// daemon, so it writes under `Fence::Exclusive`.
pub async fn open_state(path: &Path) -> Result<State, StateError> {
    State::open(&Location::Sqlite(path.to_owned()), Replica::bystander()).await
}

/// Long enough for the heaviest test on a busy 2-core machine; tests return
/// as soon as their condition holds.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// Polls `check` until it returns `Some`, or panics after `DEADLINE` with
/// what `describe` says was seen last.
pub async fn wait_for<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    wait_for_within(DEADLINE, what, check).await
}

/// [`wait_for`] with its own deadline, for the longest tests.
pub async fn wait_for_within<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) if start.elapsed() > deadline => {
                panic!("timed out waiting for {what}; last seen: {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A simulator serving just these runs.
pub async fn sim_with(runs: Vec<ScriptedRun>) -> Simulator {
    start_sim(Scenario {
        runs,
        ..Scenario::default()
    })
    .await
}

pub async fn start_sim(scenario: Scenario) -> Simulator {
    Simulator::start(([127, 0, 0, 1], 0).into(), scenario)
        .await
        .expect("simulator starts")
}

/// A state dir with a config pointing at a simulator.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub base_url: String,
    pub token: String,
    pub runs: Vec<String>,
    /// Runs that poll whatever `api.transport` says.
    pub poll_runs: Vec<String>,
    /// The `[api]` keys besides `base_url` and `token` (transport, cookie, timers).
    pub api: String,
    /// Extra TOML appended to the generated config.
    pub extra: String,
    /// Where the daemon keeps its state.
    pub backend: Backend,
}

impl Env {
    /// An env whose state is SQLite in its temp dir.
    pub fn new(sim: &Simulator, runs: &[&str]) -> Self {
        Self::on(Backend::Sqlite, sim, runs)
    }

    /// An env whose state is on `backend`.
    pub fn on(backend: Backend, sim: &Simulator, runs: &[&str]) -> Self {
        Self {
            backend,
            dir: tempfile::tempdir().expect("temp dir"),
            base_url: sim.url(),
            token: sim.token().to_owned(),
            runs: runs.iter().map(|r| r.to_string()).collect(),
            poll_runs: Vec::new(),
            api: "transport = \"poll\"\npoll_interval = \"50ms\"\n".into(),
            extra: String::new(),
        }
    }

    pub fn events_path(&self) -> PathBuf {
        self.dir.path().join("events.jsonl")
    }

    /// The SQLite state file (where a SQLite daemon of this env keeps its
    /// state; nothing is there on PostgreSQL).
    pub fn state_path(&self) -> PathBuf {
        self.dir.path().join("state/runhook.db")
    }

    /// Where the daemon keeps its state, as the store opens it.
    pub fn location(&self) -> Location {
        match &self.backend {
            Backend::Sqlite => Location::Sqlite(self.state_path()),
            Backend::Postgres(db) => Location::Postgres(db.url()),
        }
    }

    /// Whether the daemon has opened its state: the file exists on SQLite;
    /// on PostgreSQL, where the schema may exist before (any command creates
    /// it), its heartbeat row, which it writes only once it has brought the
    /// watched runs in line with its config.
    #[allow(dead_code)]
    pub async fn daemon_opened_state(&self) -> bool {
        match &self.backend {
            Backend::Sqlite => self.state_path().exists(),
            Backend::Postgres(db) => db
                .client()
                .await
                .query_one("SELECT count(*) FROM replicas WHERE node = $1", &[&NODE])
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) > 0),
        }
    }

    /// What `--state` takes for this env's state: the file, or a
    /// `postgres://` URL.
    #[allow(dead_code)]
    pub fn state_arg(&self) -> String {
        match &self.backend {
            Backend::Sqlite => self.state_path().display().to_string(),
            Backend::Postgres(db) => db.postgres_url(),
        }
    }

    /// The state read beside the daemon, as `status` reads it.
    pub async fn reads(&self) -> Result<Reads, StateError> {
        Reads::open(&self.location(), Replica::bystander()).await
    }

    /// [`Env::reads`] once the daemon has created the state: a test that
    /// starts the daemon and then reads beside it waits here first.
    pub async fn wait_reads(&self) -> Reads {
        wait_for("the state database", || async {
            self.reads().await.map_err(|e| e.to_string())
        })
        .await
    }

    /// The state opened to write, as `watch` opens it.
    #[allow(dead_code)]
    pub async fn open_state(&self) -> Result<State, StateError> {
        State::open(&self.location(), Replica::bystander()).await
    }

    /// Runs `sql` on the state behind the store's back: test set-up (or a
    /// fault) the store rightly has no operation for. The statement must
    /// be valid on the backend's dialect.
    #[allow(dead_code)]
    pub async fn sql(&self, sql: &str) {
        match &self.backend {
            Backend::Sqlite => {
                let conn = rusqlite::Connection::open(self.state_path()).expect("open state");
                conn.busy_timeout(Duration::from_secs(10))
                    .expect("busy timeout");
                conn.execute_batch(sql)
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            Backend::Postgres(db) => db
                .client()
                .await
                .batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
        }
    }

    /// The first column of the one row `sql` selects, as text, read behind
    /// the store's back.
    #[allow(dead_code)]
    pub async fn sql_text(&self, sql: &str) -> String {
        match &self.backend {
            Backend::Sqlite => {
                let conn = rusqlite::Connection::open(self.state_path()).expect("open state");
                conn.query_row(sql, [], |r| r.get(0))
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
            Backend::Postgres(db) => db
                .client()
                .await
                .query_one(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .get(0),
        }
    }

    /// The `[state]` table (and on PostgreSQL the `[cluster]` one).
    fn state_toml(&self) -> String {
        match &self.backend {
            Backend::Sqlite => format!(
                "[state]\npath = \"{}\"\nshutdown_grace = \"5s\"\n",
                self.state_path().display()
            ),
            // lease_ttl: the shortest allowed, for a killed daemon's
            // successor waits it out before it takes the runs again.
            Backend::Postgres(db) => format!(
                "[state]\nurl = \"{}\"\nshutdown_grace = \"5s\"\n\n\
                 [cluster]\nnode = \"{NODE}\"\nlease_ttl = \"3s\"\n",
                db.url()
            ),
        }
    }

    /// The `archive` file sink every env writes, and its route.
    fn archive_toml(&self) -> String {
        format!(
            "[sinks.archive]\ntype = \"file\"\npath = \"{}\"\n{}\n[[routes]]\nsinks = [\"archive\"]\n",
            self.events_path().display(),
            self.file_sink_node()
        )
    }

    /// What a file sink's table needs on this backend: on PostgreSQL the
    /// node that writes it (a file is on one machine's disk).
    pub fn file_sink_node(&self) -> String {
        match self.backend {
            Backend::Sqlite => String::new(),
            Backend::Postgres(_) => format!("node = \"{NODE}\"\n"),
        }
    }

    pub fn config_text(&self) -> String {
        let runs: String = self
            .runs
            .iter()
            .map(|id| {
                let transport = if self.poll_runs.contains(id) {
                    "transport = \"poll\"\n"
                } else {
                    ""
                };
                format!("[[runs]]\nid = \"{id}\"\nlabels = {{ team = \"rome\" }}\n{transport}")
            })
            .collect();
        format!(
            "[api]\nbase_url = \"{}\"\n{}{}\n{}\n{runs}\n{}{}",
            self.base_url,
            if self.token.is_empty() {
                String::new()
            } else {
                format!("token = \"{}\"\n", self.token)
            },
            self.api,
            self.state_toml(),
            self.archive_toml(),
            self.extra
        )
    }

    /// Writes the config to `runhook.toml` in the dir and returns its path.
    pub fn write_config(&self) -> PathBuf {
        let path = self.dir.path().join("runhook.toml");
        std::fs::write(&path, self.config_text()).expect("write config");
        path
    }

    pub fn config(&self) -> Config {
        Config::parse(
            &self.config_text(),
            &self.dir.path().join("runhook.toml"),
            &|_| None,
        )
        .expect("valid config")
    }

    /// Starts the daemon in this process.
    pub fn start(&self) -> Daemon {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(runhook::daemon::run(
            Arc::new(self.config()),
            shutdown.clone(),
        ));
        Daemon { shutdown, task }
    }

    /// The file sink's lines, parsed (a last line still being written is
    /// left out: for use while the daemon runs).
    pub fn lines(&self) -> Vec<Value> {
        read_lines(&self.events_path())
    }

    /// The file sink's lines once the daemon stopped: see [`final_lines`].
    pub fn final_lines(&self) -> Vec<Value> {
        final_lines(&self.events_path())
    }

    pub async fn runs(&self) -> Vec<RunRow> {
        match self.reads().await {
            Ok(reader) => reader.runs().await.unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    pub async fn run_row(&self, run_id: &str) -> Option<RunRow> {
        self.runs().await.into_iter().find(|r| r.run_id == run_id)
    }

    /// Waits until the file holds a `run_finished` for each run.
    pub async fn wait_finished(&self, runs: &[&str]) -> Vec<Value> {
        wait_for("run_finished of every run in the file", || async {
            let lines = self.lines();
            let done = runs.iter().all(|run| {
                lines
                    .iter()
                    .any(|l| l["runId"] == *run && l["type"] == "run_finished")
            });
            if done {
                Ok(lines)
            } else {
                Err(format!("{} lines", lines.len()))
            }
        })
        .await
    }
}

/// The complete lines of a JSON Lines file; a last line still being written
/// (no newline yet) is left for the next look. Every complete line must parse.
pub fn read_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// Every line of a JSON Lines file whose writer has stopped: the file must
/// end with a newline (no torn last line) and every line must parse.
pub fn final_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{}: a torn last line after the writer stopped: {:?}",
        path.display(),
        text.rsplit('\n').next()
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// A daemon running in this process.
pub struct Daemon {
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), runhook::daemon::DaemonError>>,
}

impl Daemon {
    /// A clean stop (SIGTERM's path).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("daemon task")
            .expect("daemon stops cleanly");
    }
}

/// The built binary (`runhook run`) on this env's config: what a crash test
/// kills. The process is killed if still running when dropped.
pub struct Process {
    child: Option<std::process::Child>,
}

impl Env {
    /// Writes the config and starts the built binary on it.
    pub fn start_process(&self) -> Process {
        Process::start(&self.write_config())
    }
}

/// The config of one replica of a cluster on the PostgreSQL state at
/// `state_url`: node `node`, following the runs watched in the database
/// from `sim`, every event to the webhook `hook` (signed with
/// `receiver::SECRET`). Written to `dir/NODE.toml`.
pub fn write_replica_config(
    dir: &Path,
    node: &str,
    state_url: &str,
    lease_ttl: &str,
    sim: &Simulator,
    hook: &str,
) -> PathBuf {
    let text = format!(
        "[api]\nbase_url = \"{}\"\ntoken = \"{}\"\ntransport = \"poll\"\npoll_interval = \"50ms\"\n\n\
         [state]\nurl = \"{state_url}\"\nshutdown_grace = \"5s\"\n\n\
         [cluster]\nnode = \"{node}\"\nlease_ttl = \"{lease_ttl}\"\n\n\
         [sinks.hook]\ntype = \"webhook\"\nurl = \"{hook}\"\nsecret = \"{}\"\n\n\
         [[routes]]\nsinks = [\"hook\"]\n",
        sim.url(),
        sim.token(),
        crate::receiver::SECRET,
    );
    let path = dir.join(format!("{node}.toml"));
    std::fs::write(&path, text).expect("write replica config");
    path
}

impl Process {
    /// The built binary, `runhook run` on `config`.
    pub fn start(config: &Path) -> Self {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_runhook"))
            .args(["--config", &config.display().to_string(), "run"])
            .env("RUNHOOK_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("runhook starts");
        Process { child: Some(child) }
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the running process.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("running");
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -{signal}");
    }

    /// SIGKILL: the process ends wherever it is (a write half done, a
    /// transaction open, a request in flight). Reaped off the runtime.
    pub async fn crash(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        reap(child).await;
    }

    /// SIGTERM, then the process must drain and exit 0. Waited for off the
    /// runtime, so that fixtures on it keep answering the drain.
    pub async fn stop(mut self) {
        let child = self.child.take().expect("running");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(sent.success());
        let status = reap(child).await;
        assert!(status.success(), "runhook exits 0 on SIGTERM: {status}");
    }
}

async fn reap(mut child: std::process::Child) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || child.wait().expect("wait for runhook"))
        .await
        .expect("waiting task")
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Asserts that the file holds exactly the events of `run` in the
/// simulator's script, once each, in order, bytes intact, then one
/// `run_finished`.
pub fn assert_run_exactly_once(sim: &Simulator, lines: &[Value], run: &str, raw: &str) {
    let script = sim.script(run);
    let of_run: Vec<&Value> = lines.iter().filter(|l| l["runId"] == run).collect();
    let sequences: Vec<i64> = of_run
        .iter()
        .filter_map(|l| l["sequence"].as_i64())
        .collect();
    let expected: Vec<i64> = script.iter().map(|e| e.0).collect();
    assert_eq!(sequences, expected, "run {run}: every event once, in order");
    let finished: Vec<&&Value> = of_run
        .iter()
        .filter(|l| l["type"] == "run_finished")
        .collect();
    assert_eq!(finished.len(), 1, "run {run}: one run_finished");
    assert_eq!(
        of_run.last().map(|l| &l["type"]),
        Some(&Value::from("run_finished")),
        "run_finished comes last"
    );
    let run_marker = format!("\"runId\":\"{run}\"");
    let run_lines: Vec<&str> = raw.lines().filter(|l| l.contains(&run_marker)).collect();
    for (sequence, _, payload, _) in &script {
        let needle = format!("\"id\":\"{run}:{sequence}\"");
        let found: Vec<&&str> = run_lines.iter().filter(|l| l.contains(&needle)).collect();
        let [line] = found[..] else {
            panic!(
                "{needle} once in the file, found {}: {found:?}",
                found.len()
            )
        };
        assert!(
            line.contains(&format!("\"payload\":{payload},")),
            "payload bytes of {run}:{sequence} intact: {line}"
        );
    }
}

/// A run that emits `events` at once and completes.
pub fn scripted(id: &str, events: Vec<ScriptedEvent>) -> ScriptedRun {
    let mut run = Scenario::demo().runs.remove(0);
    run.id = id.into();
    run.interval = std::time::Duration::ZERO;
    run.events = events;
    run
}

pub fn event(event_type: &str, payload: &str) -> ScriptedEvent {
    ScriptedEvent {
        event_type: event_type.into(),
        payload: payload.into(),
        sequence: None,
        created_at: true,
    }
}

pub fn numbered(n: usize) -> Vec<ScriptedEvent> {
    (0..n)
        .map(|i| event("PHASE_STARTED", &format!(r#"{{"i":{i},"x":1.10}}"#)))
        .collect()
}

/// Collects a child's piped stderr, line by line, into a shared string: the
/// daemon's log, for assertions and failure messages.
pub fn capture_stderr(child: &mut std::process::Child) -> Arc<std::sync::Mutex<String>> {
    use std::io::{BufRead, BufReader};
    let log = Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = child.stderr.take().expect("piped stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    log
}

/// `runhook --config CONFIG send-test ARGS...`, off the runtime so that the
/// fixtures on it (a receiver, a fake Slack) can answer.
pub async fn send_test(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_runhook"));
    command
        .arg("--config")
        .arg(config)
        .arg("send-test")
        .args(args);
    tokio::task::spawn_blocking(move || command.output().expect("runhook runs"))
        .await
        .expect("send-test finished")
}

/// `runhook --config CONFIG tail ARGS...` in the background, its first
/// lines read on a thread of their own (tail never ends by itself).
pub struct TailLines {
    child: std::process::Child,
    reading: std::thread::JoinHandle<Vec<String>>,
}

impl TailLines {
    /// Starts `tail` with `args`, reading its first `lines` lines.
    pub fn start(config: &Path, args: &[&str], lines: usize) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_runhook"))
            .arg("--config")
            .arg(config)
            .arg("tail")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reading = std::thread::spawn(move || {
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .take(lines)
                .collect::<Vec<String>>()
        });
        Self { child, reading }
    }

    /// Waits (`what`) until its lines are read, then ends `tail`.
    pub async fn wait_read(&mut self, what: &str) {
        wait_for(what, || {
            let done = self.reading.is_finished();
            async move {
                if done {
                    Ok(())
                } else {
                    Err("tail still reading".into())
                }
            }
        })
        .await;
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// The lines read, each a JSON value (`tail --json`).
    pub fn lines(self) -> Vec<Value> {
        self.reading
            .join()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// The envelope ids `receiver` accepted, each once however often it was
/// sent: what "every event arrived" is counted on (redelivery after a crash
/// is allowed, loss is not).
pub fn distinct_accepted_ids(
    receiver: &crate::receiver::Receiver,
) -> std::collections::HashSet<String> {
    receiver.accepted().into_iter().map(|r| r.id).collect()
}

/// One event for a store's `record_batch`, routed to `sinks`.
pub fn new_event(
    sequence: i64,
    event_type: &str,
    payload: String,
    sinks: &[&str],
) -> runhook::store::NewEvent {
    runhook::store::NewEvent {
        sequence,
        event_type: event_type.to_owned(),
        payload: serde_json::value::RawValue::from_string(payload).expect("json"),
        created_at: None,
        sinks: sinks.iter().map(|s| Arc::from(*s)).collect(),
    }
}

/// `events` of `run` as one batch; the run running, no phase.
pub fn batch_of_events(run: &str, events: Vec<runhook::store::NewEvent>) -> runhook::store::Batch {
    runhook::store::Batch {
        run_id: run.into(),
        events,
        run_status: Some("running".into()),
        phase: None,
        finish: None,
        stalled: None,
    }
}

/// What the PostgreSQL test modules (`pg`, `pg_ops`, `pg_review`,
/// `pg_state`, `pg_file`, `pg_runs`) build their cases from, written once so
/// a change to how a replica opens or a batch looks reaches them all.
pub mod pg_store {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use runhook::store::pg::{Lease, PgStore, PgStoreError, Replica};
    use runhook::store::{Batch, Recorded};

    use super::{batch_of_events, new_event, wait_for};

    /// A replica that takes no share of another's runs beyond its own
    /// (`share_slack` 0), so a test decides exactly which runs it claims.
    pub fn replica(node: &str, lease_ttl: Duration) -> Replica {
        Replica {
            node: node.into(),
            lease_ttl,
            share_slack: 0,
        }
    }

    /// The store as `node` opens it on the database at `url`.
    pub async fn open(url: &str, node: &str, lease_ttl: Duration) -> PgStore {
        PgStore::open(url, replica(node, lease_ttl))
            .await
            .expect("open the PostgreSQL store")
    }

    /// `run` subscribed as `watch` would (no labels).
    pub async fn subscribe(store: &PgStore, run: &str) {
        store
            .subscribe(run.into(), BTreeMap::new(), "watch", None)
            .await
            .expect("subscribe");
    }

    /// Claims exactly `runs` (the claimable ones), by run id.
    pub async fn claim_all(store: &PgStore, runs: &[&str]) -> BTreeMap<String, Lease> {
        let leases = store.claim(runs.len()).await.expect("claim");
        assert_eq!(leases.len(), runs.len(), "{leases:?}");
        leases
            .into_iter()
            .map(|l| (l.run_id.to_string(), l))
            .collect()
    }

    /// Subscribes to `runs` and claims them all on `store`.
    pub async fn owned(store: &PgStore, runs: &[&str]) -> BTreeMap<String, Lease> {
        for run in runs {
            subscribe(store, run).await;
        }
        claim_all(store, runs).await
    }

    /// A replica as the daemon would be: heartbeating, owning `runs`
    /// (subscribed and claimed) for a minute.
    pub async fn replica_owning(
        url: &str,
        node: &str,
        runs: &[&str],
    ) -> (PgStore, BTreeMap<String, Lease>) {
        let store = open(url, node, Duration::from_secs(60)).await;
        for run in runs {
            subscribe(&store, run).await;
        }
        store.heartbeat().await.expect("heartbeat");
        let leases = claim_all(&store, runs).await;
        (store, leases)
    }

    /// Events `sequences` of `run` (`PHASE_STARTED`, payload `{"n":N}`),
    /// each routed to `sinks`; the run running, no phase.
    pub fn batch(run: &str, sequences: impl IntoIterator<Item = i64>, sinks: &[&str]) -> Batch {
        batch_with_payload(run, sequences, sinks, |sequence| {
            format!("{{\"n\":{sequence}}}")
        })
    }

    /// [`batch`] with each event's payload text from `payload`: a test of
    /// raw payloads kept to the byte chooses its own.
    pub fn batch_with_payload(
        run: &str,
        sequences: impl IntoIterator<Item = i64>,
        sinks: &[&str],
        payload: impl Fn(i64) -> String,
    ) -> Batch {
        let events = sequences
            .into_iter()
            .map(|sequence| new_event(sequence, "PHASE_STARTED", payload(sequence), sinks))
            .collect();
        batch_of_events(run, events)
    }

    /// The pending delivery rows of `run` for `sink`, in order (at most
    /// `limit`).
    pub async fn pending_rows(store: &PgStore, sink: &str, run: &str, limit: usize) -> Vec<i64> {
        let pending = store
            .pending_for_run(sink, run, limit)
            .await
            .expect("pending");
        pending.iter().map(|p| p.event).collect()
    }

    /// What is committed, read past the store under test.
    pub async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
        client.query_one(sql, &[]).await.expect(sql).get(0)
    }

    /// The test's own stand-in for a slow ingest transaction: a trigger on
    /// the deliveries of `run` waits for an advisory lock the test holds, so
    /// that run's `record_batch` has drawn its event rows but cannot commit.
    pub async fn hold_batches_of(client: &tokio_postgres::Client, run: &str) {
        client
            .batch_execute(&format!(
                "CREATE FUNCTION hold_batch() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     IF NEW.run_id = '{run}' THEN PERFORM pg_advisory_xact_lock(4242); END IF;
                     RETURN NEW;
                 END $$;
                 CREATE TRIGGER hold_batch BEFORE INSERT ON deliveries
                     FOR EACH ROW EXECUTE FUNCTION hold_batch();"
            ))
            .await
            .expect("the holding trigger");
    }

    /// Takes the advisory lock on `holder` (after [`hold_batches_of`]) and
    /// starts recording `batch` under `lease`: it draws its rows, then waits
    /// for the lock until `holder` commits.
    pub async fn start_held(
        holder: &tokio_postgres::Client,
        store: &PgStore,
        lease: &Lease,
        batch: Batch,
    ) -> tokio::task::JoinHandle<Result<Recorded, PgStoreError>> {
        holder
            .batch_execute("BEGIN; SELECT pg_advisory_xact_lock(4242);")
            .await
            .expect("hold the lock");
        let store = store.clone();
        let lease = lease.clone();
        tokio::spawn(async move { store.record_batch(&lease, batch).await })
    }

    /// Until the slow batch of [`hold_batches_of`] waits on the test's
    /// advisory lock.
    pub async fn wait_for_held(observer: &tokio_postgres::Client) {
        wait_for("the slow batch to draw its rows", || async {
            let waiting = count(
                observer,
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
            )
            .await;
            if waiting == 1 {
                Ok(())
            } else {
                Err("not waiting yet".to_owned())
            }
        })
        .await;
    }
}

/// `runhook run` as a child whose stderr is appended to a log file, for the
/// tests that kill, pause and restart daemons (failover, chaos): spawned
/// again on the same config and log after each kill, and killed when
/// dropped, paused or not.
pub struct LoggedDaemon {
    /// Who this is, in messages ("replica a", "the daemon").
    pub name: String,
    pub config: PathBuf,
    pub log: PathBuf,
    /// `RUNHOOK_LOG` at each start.
    filter: &'static str,
    child: Option<std::process::Child>,
}

impl LoggedDaemon {
    /// Not started yet: [`LoggedDaemon::spawn`] starts it.
    pub fn new(
        name: impl Into<String>,
        config: PathBuf,
        log: PathBuf,
        filter: &'static str,
    ) -> Self {
        Self {
            name: name.into(),
            config,
            log,
            filter,
            child: None,
        }
    }

    pub fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_runhook"))
            .args(["--config", &self.config.display().to_string(), "run"])
            .env("RUNHOOK_LOG", self.filter)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(log))
            .spawn()
            .expect("runhook starts");
        self.child = Some(child);
    }

    pub fn pid(&self) -> String {
        let child = self.child.as_ref().expect("daemon running");
        child.id().to_string()
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.pid()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {}", self.name);
    }

    /// SIGKILL, reaped; nothing running afterwards.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reaped");
        }
    }

    /// Panics with the log's tail when the daemon exited on its own.
    pub fn assert_alive(&mut self) {
        let child = self.child.as_mut().expect("daemon running");
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{} exited by itself ({status}); its log:\n{}",
                self.name,
                self.log_tail()
            );
        }
    }

    /// The log's last 40 lines.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGTERM; the exit status within a deadline.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let mut child = self.child.take().expect("daemon running");
        let what = format!("{} to exit after SIGTERM", self.name);
        wait_for(&what, || {
            let exited = child.try_wait();
            async move {
                match exited {
                    Ok(Some(status)) => Ok(status),
                    Ok(None) => Err("still running".into()),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await
    }
}

impl Drop for LoggedDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused child cannot die of SIGKILL any slower, but make sure.
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
