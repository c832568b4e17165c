//! End-to-end benchmark over the simulator's high-throughput mode on
//! 127.0.0.1. `cargo bench --bench e2e` prints a table. Each scenario runs
//! `RUNHOOK_BENCH_REPS` times (default 3) and reports the median; the
//! machines are shared and noisy, so compare medians and ratios.
//!
//! (a) 1 run x 200,000 events, polling -> file sink: events/s
//! (b) 200 runs x 1,000 events -> webhook to a local receiver: deliveries/s
//! (c) SSE event emitted -> webhook received, at 200 events/s: p50, p99
//! (d) 10,000 SSE runs subscribed and idle: peak RSS and CPU of the daemon
//! (e) a 1,000,000-event backlog with the sink down: peak RSS; drain rate
//! (f) 1 run x 100,000 events -> webhook, one ordered chain: deliveries/s
//! (b2), (f2) as (b) and (f), the webhook sink with `pipeline = true`
//! (g) 200 runs x 1,000 events -> webhook with the state on PostgreSQL:
//!     one replica, and three sharing the runs by lease (release binaries
//!     as child processes, a throwaway server started as the tests start
//!     theirs; skipped, saying so, without PostgreSQL)
//!
//! Every row prints the settings it ran with. A scenario also checks what
//! it measured: the file holds every event once (a), the receiver saw every
//! `webhook-id` (b, c, e, f), each run's events first arrived in sequence
//! order, and a sample of signatures verifies; a failed
//! check, or a scenario stuck past its deadline, panics: the bench exits
//! non-zero.
//!
//! `RUNHOOK_BENCH=a,c` runs some (the default is all six; `b2,f2,g` are
//! asked for by name); `RUNHOOK_BENCH_SCALE=0.1` shrinks them.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use runhook::config::{Config, Transport};
use runhook::simulate::scenario::Bulk;
use runhook::simulate::{Scenario, Simulator};
use runhook::store::pg::Replica;
use runhook::store::{Location, Reads, RunState};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The tests' throwaway PostgreSQL server, for (g).
#[path = "../tests/it/pg_support.rs"]
#[allow(dead_code)]
mod pg_support;

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
/// The receiver verifies the signature of one request in this many.
const SIGNATURE_SAMPLE: u64 = 100;
/// The simulator's default page (`Scenario::default().page_size`).
const SIM_DEFAULT_PAGE: usize = 500;

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn scaled(n: usize) -> usize {
    ((n as f64 * env_f64("RUNHOOK_BENCH_SCALE", 1.0)) as usize).max(1)
}

fn reps() -> usize {
    (env_f64("RUNHOOK_BENCH_REPS", 3.0) as usize).max(1)
}

/// What a scenario runs with; printed next to its figure.
#[derive(Clone, Copy)]
struct Settings {
    /// Events per poll answer (and per SSE catch-up page) of the simulator.
    page_size: usize,
    /// `[api] poll_interval`.
    poll_interval: Duration,
    /// `[api] max_concurrency`.
    max_concurrency: usize,
    /// `[sinks.out] concurrency` (webhook sinks only).
    sink_concurrency: Option<usize>,
    /// Time between a run's events at the simulator (zero: all out at once).
    spacing: Duration,
    /// Times the scenario runs (the figure is the median).
    reps: usize,
    /// `[sinks.out] pipeline = true` (webhook sinks only).
    pipeline: bool,
}

impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let page = if self.page_size == SIM_DEFAULT_PAGE {
            format!("page {} (simulator default)", self.page_size)
        } else {
            format!(
                "page {} ({}x the simulator default)",
                self.page_size,
                self.page_size as f64 / SIM_DEFAULT_PAGE as f64
            )
        };
        write!(
            f,
            "{page}, poll_interval {}, max_concurrency {}",
            humantime::format_duration(self.poll_interval),
            self.max_concurrency
        )?;
        if let Some(c) = self.sink_concurrency {
            write!(f, ", webhook concurrency {c}")?;
        }
        if self.pipeline {
            write!(f, ", pipeline = true")?;
        }
        write!(
            f,
            ", events {} apart, reps {}",
            humantime::format_duration(self.spacing),
            self.reps
        )
    }
}

const POLL: Duration = Duration::from_millis(20);

fn settings_a() -> Settings {
    Settings {
        page_size: 5000,
        poll_interval: POLL,
        max_concurrency: 256,
        sink_concurrency: None,
        spacing: Duration::ZERO,
        reps: reps(),
        pipeline: false,
    }
}

fn settings_b() -> Settings {
    Settings {
        page_size: 1000,
        sink_concurrency: Some(64),
        ..settings_a()
    }
}

fn settings_c() -> Settings {
    Settings {
        page_size: SIM_DEFAULT_PAGE,
        sink_concurrency: Some(64),
        spacing: Duration::from_millis(5),
        ..settings_a()
    }
}

fn settings_d() -> Settings {
    Settings {
        page_size: SIM_DEFAULT_PAGE,
        spacing: Duration::from_secs(3600),
        reps: 1,
        ..settings_a()
    }
}

fn settings_e() -> Settings {
    Settings {
        page_size: 5000,
        sink_concurrency: Some(64),
        reps: 1,
        ..settings_a()
    }
}

fn settings_f() -> Settings {
    Settings {
        page_size: 5000,
        sink_concurrency: Some(64),
        ..settings_a()
    }
}

/// Polls `check` until it says done; a scenario stuck past `limit` panics
/// with what it waited for and the last state `check` reported.
async fn wait_until(
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + limit;
    loop {
        let seen = match check().await {
            Ok(()) => return,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}; last seen: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A deadline for a scenario doing `work` events: generous for a loaded
/// 2-core machine (2 ms an event, 500 events/s), plus two minutes.
fn limit(work: usize) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(2) * work as u32
}

/// The ids runhook gives the events of `sim`'s runs of `events` events
/// each: `{run}:{sequence}`, and `{run}:finished:{last}` for the end.
fn expected_ids(sim: &Simulator, events: usize) -> HashSet<String> {
    sim.run_ids()
        .iter()
        .flat_map(|run| {
            (1..=events)
                .map(move |seq| format!("{run}:{seq}"))
                .chain(std::iter::once(format!("{run}:finished:{events}")))
        })
        .collect()
}

/// Panics unless `found` is exactly `expected`, naming a few differences.
fn check_ids(scenario: &str, found: &HashSet<String>, expected: &HashSet<String>) {
    let sample = |ids: Vec<&String>| ids.into_iter().take(5).cloned().collect::<Vec<_>>();
    let missing = sample(expected.difference(found).collect());
    let unexpected = sample(found.difference(expected).collect());
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "{scenario}: {} distinct ids delivered, {} expected; missing e.g. {missing:?}, unexpected e.g. {unexpected:?}",
        found.len(),
        expected.len()
    );
}

/// A receiver that accepts everything (or answers 503 while `down`). It
/// keeps every distinct `webhook-id` (with its first arrival time while
/// `timed`), and hands one request in [`SIGNATURE_SAMPLE`] to a task that
/// verifies its signature with the reference `standardwebhooks` crate and
/// parses its body.
struct Sink {
    /// 2xx answers, repeats included.
    received: AtomicU64,
    /// Distinct `webhook-id`s answered 2xx.
    distinct: AtomicU64,
    ids: Mutex<HashSet<String>>,
    /// Per run, the sequence of the latest first arrival (`run_finished`
    /// counts as after every event).
    last_seq: Mutex<HashMap<String, u64>>,
    /// First arrivals that came before an earlier event of their run, and
    /// the first such id.
    out_of_order: AtomicU64,
    first_out_of_order: Mutex<Option<String>>,
    down: AtomicBool,
    /// Keep the first arrival of each event (scenario c only).
    timed: AtomicBool,
    arrivals: Mutex<Vec<(String, SystemTime)>>,
    samples: mpsc::UnboundedSender<(HeaderMap, Bytes)>,
    sampled: AtomicU64,
    verified: AtomicU64,
    /// The first sampled request that failed its check, and why.
    bad_sample: Mutex<Option<String>>,
}

impl Sink {
    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn distinct(&self) -> u64 {
        self.distinct.load(Ordering::Relaxed)
    }

    /// Panics unless every run's events first arrived in sequence order.
    fn check_order(&self, scenario: &str) {
        let late = self.out_of_order.load(Ordering::Relaxed);
        assert!(
            late == 0,
            "{scenario}: {late} events first arrived after a later event of their run, e.g. {:?}",
            self.first_out_of_order.lock().unwrap()
        );
    }

    /// Books the first arrival of `id` against its run's order.
    fn book_order(&self, id: &str) {
        let Some((run, seq)) = run_and_sequence(id) else {
            return;
        };
        let mut last = self.last_seq.lock().unwrap();
        let previous = last.entry(run.to_owned()).or_insert(0);
        if seq < *previous {
            self.out_of_order.fetch_add(1, Ordering::Relaxed);
            self.first_out_of_order
                .lock()
                .unwrap()
                .get_or_insert_with(|| id.to_owned());
        }
        *previous = (*previous).max(seq);
    }

    /// Waits for every sampled request to be checked; panics on a bad one.
    async fn check_signatures(&self, scenario: &str) {
        wait_until(
            &format!("{scenario}: signature checks"),
            Duration::from_secs(60),
            async || {
                let bad = self.bad_sample.lock().unwrap().clone();
                let (sampled, verified) = (
                    self.sampled.load(Ordering::Relaxed),
                    self.verified.load(Ordering::Relaxed),
                );
                assert!(
                    bad.is_none(),
                    "{scenario}: a sampled request fails its check: {}",
                    bad.as_deref().unwrap_or_default()
                );
                (verified == sampled)
                    .then_some(())
                    .ok_or(format!("{verified} of {sampled} verified"))
            },
        )
        .await;
        assert!(
            self.verified.load(Ordering::Relaxed) > 0,
            "{scenario}: no signature was checked"
        );
    }
}

/// `{run}:{sequence}` -> (run, sequence); `{run}:finished:{last}` ->
/// (run, after every sequence).
fn run_and_sequence(id: &str) -> Option<(&str, u64)> {
    let (head, last) = id.rsplit_once(':')?;
    let last: u64 = last.parse().ok()?;
    Some(match head.strip_suffix(":finished") {
        Some(run) => (run, u64::MAX),
        None => (head, last),
    })
}

async fn receive(State(sink): State<Arc<Sink>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if sink.down.load(Ordering::Relaxed) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let arrived = SystemTime::now();
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if sink.received.fetch_add(1, Ordering::Relaxed) % SIGNATURE_SAMPLE == 0 {
        sink.sampled.fetch_add(1, Ordering::Relaxed);
        let _ = sink.samples.send((headers, body));
    }
    let first = sink.ids.lock().unwrap().insert(id.clone());
    if first {
        sink.book_order(&id);
        sink.distinct.fetch_add(1, Ordering::Relaxed);
        if sink.timed.load(Ordering::Relaxed) {
            sink.arrivals.lock().unwrap().push((id, arrived));
        }
    }
    StatusCode::NO_CONTENT
}

/// Checks the sampled requests, off the request path.
async fn verify_samples(sink: Arc<Sink>, mut samples: mpsc::UnboundedReceiver<(HeaderMap, Bytes)>) {
    let webhook = standardwebhooks::Webhook::new(SECRET).expect("secret");
    while let Some((headers, body)) = samples.recv().await {
        if let Err(problem) = check_sample(&webhook, &headers, &body) {
            *sink.bad_sample.lock().unwrap() = Some(problem);
        }
        sink.verified.fetch_add(1, Ordering::Relaxed);
    }
}

/// A request as a receiver would take it: the signature verifies, and the
/// body is the JSON envelope of the event its `webhook-id` names.
fn check_sample(
    webhook: &standardwebhooks::Webhook,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    webhook
        .verify(body, headers)
        .map_err(|e| format!("bad signature on webhook-id {id:?}: {e:?}"))?;
    let envelope: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("webhook-id {id:?}: body is not JSON: {e}"))?;
    let data_id = envelope["data"]["id"].as_str().unwrap_or_default();
    if data_id != id || envelope["type"].as_str().is_none() {
        return Err(format!(
            "webhook-id {id:?}: body names event {data_id:?} (type {})",
            envelope["type"]
        ));
    }
    Ok(())
}

async fn start_receiver() -> (SocketAddr, Arc<Sink>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sink = Arc::new(Sink {
        received: AtomicU64::new(0),
        distinct: AtomicU64::new(0),
        ids: Mutex::default(),
        last_seq: Mutex::default(),
        out_of_order: AtomicU64::new(0),
        first_out_of_order: Mutex::default(),
        down: AtomicBool::new(false),
        timed: AtomicBool::new(false),
        arrivals: Mutex::default(),
        samples: tx,
        sampled: AtomicU64::new(0),
        verified: AtomicU64::new(0),
        bad_sample: Mutex::default(),
    });
    tokio::spawn(verify_samples(sink.clone(), rx));
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(sink.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, sink)
}

/// The simulator in bulk mode: `runs` x `events`, `settings.spacing` apart.
async fn bulk_sim(
    runs: usize,
    events: usize,
    settings: &Settings,
    prefix: &str,
    heartbeat: Duration,
) -> Simulator {
    let bulk = Bulk {
        runs,
        events,
        interval: settings.spacing,
        prefix: prefix.into(),
    };
    let scenario = Scenario {
        page_size: settings.page_size,
        heartbeat,
        bulk: Some(bulk),
        ..Scenario::default()
    };
    Simulator::start(([127, 0, 0, 1], 0).into(), scenario)
        .await
        .expect("simulator")
}

/// A config for `sim`'s runs with one sink.
fn config_text(
    sim: &Simulator,
    dir: &Path,
    transport: &str,
    sink: &str,
    settings: &Settings,
) -> String {
    let runs: String = sim
        .run_ids()
        .iter()
        .map(|id| format!("[[runs]]\nid = \"{id}\"\n"))
        .collect();
    format!(
        "[api]\nbase_url = \"{}\"\ntoken = \"{}\"\nsession_cookie = \"{}\"\ntransport = \"{transport}\"\n\
         poll_interval = \"{}\"\nmax_concurrency = {}\n[state]\npath = \"{}\"\n{runs}\n{sink}\n[[routes]]\nsinks = [\"out\"]\n",
        sim.url(),
        sim.token(),
        sim.session(),
        humantime::format_duration(settings.poll_interval),
        settings.max_concurrency,
        dir.join("runhook.db").display(),
    )
}

fn webhook_sink(receiver: SocketAddr, settings: &Settings) -> String {
    format!(
        "[sinks.out]\ntype = \"webhook\"\nurl = \"http://{receiver}/hook\"\nsecret = \"{SECRET}\"\n\
         concurrency = {}\ninitial_backoff = \"200ms\"\nmax_backoff = \"2s\"\nmax_attempts = 1000000\nmax_age = \"7d\"\n\
         pipeline = {}\n",
        settings
            .sink_concurrency
            .expect("a webhook scenario sets its concurrency"),
        settings.pipeline
    )
}

fn file_sink(path: &Path) -> String {
    format!(
        "[sinks.out]\ntype = \"file\"\npath = \"{}\"\n",
        path.display()
    )
}

fn parse(text: &str, dir: &Path) -> Arc<Config> {
    Arc::new(Config::parse(text, &dir.join("bench.toml"), &|_| None).expect("config"))
}

async fn reader(dir: &Path) -> Reads {
    let path = dir.join("runhook.db");
    wait_until(
        "the daemon to create its database",
        Duration::from_secs(60),
        async || {
            path.exists()
                .then_some(())
                .ok_or(format!("no {}", path.display()))
        },
    )
    .await;
    Reads::open(&Location::Sqlite(path), Replica::bystander())
        .await
        .expect("reader")
}

/// Every run finished and nothing pending for the sink; cheap queries, so
/// that watching does not slow what is watched.
async fn drained(reader: &Reads) -> Result<(), String> {
    let runs = reader.runs().await.unwrap_or_default();
    let finished = runs
        .iter()
        .filter(|r| r.state == RunState::Finished)
        .count();
    let pending = reader.pending_count("out").await;
    if !runs.is_empty() && finished == runs.len() && pending.as_ref().is_ok_and(|n| *n == 0) {
        Ok(())
    } else {
        Err(format!(
            "{finished} of {} runs finished, pending {pending:?}",
            runs.len()
        ))
    }
}

/// Panics unless the JSON Lines file at `path` holds each expected event
/// exactly once, every line complete.
fn check_file(path: &Path, expected: &HashSet<String>) {
    let text = std::fs::read_to_string(path).expect("the file sink's output");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "(a): the file ends in a torn line"
    );
    let mut found = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("(a): line {} is not JSON ({e}): {line:.200}", n + 1));
        let id = value["id"].as_str().unwrap_or_default().to_owned();
        assert!(found.insert(id.clone()), "(a): {id:?} written twice");
    }
    check_ids("(a)", &found, expected);
}

/// (a) events/s, polling -> file; the file is checked after the clock stops.
async fn polling_to_file(settings: &Settings) -> f64 {
    let events = scaled(200_000);
    let sim = bulk_sim(1, events, settings, "bench", Duration::from_secs(5)).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let text = config_text(&sim, dir.path(), "poll", &file_sink(&out), settings);
    let config = parse(&text, dir.path());
    let shutdown = CancellationToken::new();
    let start = Instant::now();
    let daemon = tokio::spawn(runhook::daemon::run(config, shutdown.clone()));
    let reader = reader(dir.path()).await;
    wait_until(
        "(a): the run to be written out",
        limit(events),
        async || drained(&reader).await,
    )
    .await;
    let rate = (events + 1) as f64 / start.elapsed().as_secs_f64();
    shutdown.cancel();
    let _ = daemon.await;
    check_file(&out, &expected_ids(&sim, events));
    rate
}

/// What (b) measured: deliveries/s, and 2xx answers beyond one per event.
struct Deliveries {
    rate: f64,
    repeats: u64,
}

/// (b) and (f): deliveries/s (distinct `webhook-id`s), `runs` x `events`
/// -> webhook. (b) spreads them over many runs; (f) is one ordered chain,
/// so its rate is bound by one round trip per event.
async fn webhooks(scenario: &str, runs: usize, events: usize, settings: &Settings) -> Deliveries {
    let sim = bulk_sim(runs, events, settings, "hook", Duration::from_secs(5)).await;
    let (addr, sink) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        &sim,
        dir.path(),
        "poll",
        &webhook_sink(addr, settings),
        settings,
    );
    let config = parse(&text, dir.path());
    let shutdown = CancellationToken::new();
    let start = Instant::now();
    let daemon = tokio::spawn(runhook::daemon::run(config, shutdown.clone()));
    let total = (runs * (events + 1)) as u64;
    wait_until(
        &format!("{scenario}: every event delivered"),
        limit(runs * events),
        async || {
            let distinct = sink.distinct();
            (distinct >= total)
                .then_some(())
                .ok_or(format!("{distinct} of {total} distinct webhook-ids"))
        },
    )
    .await;
    let rate = total as f64 / start.elapsed().as_secs_f64();
    shutdown.cancel();
    let _ = daemon.await;
    check_ids(
        scenario,
        &sink.ids.lock().unwrap(),
        &expected_ids(&sim, events),
    );
    sink.check_signatures(scenario).await;
    sink.check_order(scenario);
    Deliveries {
        rate,
        repeats: sink.received() - sink.distinct(),
    }
}

/// What (c) measured: latency quantiles over the events emitted once the
/// stream was up, and how many events were left out as emitted before.
struct Latency {
    p50_ms: f64,
    p99_ms: f64,
    kept: usize,
    dropped: usize,
}

/// (c) latency from emission at the simulator to arrival at the receiver,
/// SSE at 200 events/s -> webhook. An event's emission time is computed
/// from its sequence (the simulator emits event `n` at `n x spacing` after
/// it starts): `createdAt` has only millisecond precision.
async fn sse_latency(settings: &Settings) -> Latency {
    let events = scaled(2000);
    let sim_started = SystemTime::now();
    let sim = bulk_sim(1, events, settings, "live", Duration::from_secs(5)).await;
    let (addr, sink) = start_receiver().await;
    sink.timed.store(true, Ordering::Relaxed);
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        &sim,
        dir.path(),
        "sse",
        &webhook_sink(addr, settings),
        settings,
    );
    let config = parse(&text, dir.path());
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(runhook::daemon::run(config, shutdown.clone()));
    let total = events as u64 + 1;
    let work = settings.spacing * events as u32;
    wait_until(
        "(c): every event delivered",
        limit(events) + work,
        async || {
            let distinct = sink.distinct();
            (distinct >= total)
                .then_some(())
                .ok_or(format!("{distinct} of {total} distinct webhook-ids"))
        },
    )
    .await;
    shutdown.cancel();
    let _ = daemon.await;
    check_ids(
        "(c)",
        &sink.ids.lock().unwrap(),
        &expected_ids(&sim, events),
    );
    sink.check_signatures("(c)").await;
    sink.check_order("(c)");
    // The stream's first connection, in ms since the simulator started
    // (rounded down: an event emitted in that millisecond is left out too).
    let connected = sim
        .requests()
        .iter()
        .find(|r| r.endpoint == "stream" && r.status == 200)
        .map(|r| Duration::from_millis(r.at_ms + 1))
        .expect("(c): the daemon never opened a stream");
    let arrivals = sink.arrivals.lock().unwrap().clone();
    let mut latencies = Vec::new();
    let mut dropped = 0;
    for (id, arrived) in arrivals {
        // `{run}:{sequence}`; the `run_finished` event has no emission time.
        let Some(seq) = id.split_once(':').and_then(|(_, s)| s.parse::<u32>().ok()) else {
            continue;
        };
        let emitted = settings.spacing * seq;
        if emitted <= connected {
            dropped += 1;
            continue;
        }
        let latency = arrived
            .duration_since(sim_started + emitted)
            .unwrap_or_default();
        latencies.push(latency.as_micros() as u64);
    }
    assert!(
        !latencies.is_empty(),
        "(c): all {dropped} events were emitted before the stream connected"
    );
    latencies.sort_unstable();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    Latency {
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        kept: latencies.len(),
        dropped,
    }
}

/// The release binary as a child process, so RSS and CPU are its own. It
/// is killed if the scenario panics.
struct Child {
    process: std::process::Child,
}

impl Child {
    fn spawn(config: &Path) -> Self {
        let process = std::process::Command::new(env!("CARGO_BIN_EXE_runhook"))
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("RUNHOOK_LOG", "error")
            .spawn()
            .expect("runhook");
        Self { process }
    }

    fn status_field(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The peak resident set so far (`VmHWM`), in MB.
    fn peak_mb(&self) -> f64 {
        self.status_field("VmHWM:") as f64 / 1024.0
    }

    /// CPU seconds used so far (user + system).
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.process.id()))
            .unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            + fields
                .get(12)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        ticks / 100.0
    }

    /// Asserts the daemon is still up (a daemon that died measures nothing).
    fn assert_running(&mut self, scenario: &str) {
        let exited = self.process.try_wait().ok().flatten();
        assert!(exited.is_none(), "{scenario}: runhook exited: {exited:?}");
    }

    fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.process.id().to_string()])
            .status();
        let _ = self.process.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if matches!(self.process.try_wait(), Ok(None)) {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("bench.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// (d) peak RSS (MB) over the whole scenario and CPU (% of a core) while
/// idle, with 10,000 SSE runs.
async fn idle_streams(settings: &Settings) -> (f64, f64) {
    let runs = scaled(10_000);
    let sim = bulk_sim(runs, 1, settings, "idle", Duration::from_secs(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let text = config_text(&sim, dir.path(), "sse", &file_sink(&out), settings);
    let mut child = Child::spawn(&write_config(dir.path(), &text));
    let reader = reader(dir.path()).await;
    wait_until("(d): every run subscribed", limit(runs), async || {
        let runs_now = reader.runs().await.unwrap_or_default();
        let following = runs_now
            .iter()
            .filter(|r| r.transport == Some(Transport::Sse) && r.state == RunState::Following)
            .count();
        (following == runs)
            .then_some(())
            .ok_or(format!("{following} of {runs} streams following"))
    })
    .await;
    // Let start-up settle (first lag lookups), then measure a quiet half
    // minute: fixed spans of the scenario, not waits for a condition.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (cpu0, t0) = (child.cpu_seconds(), Instant::now());
    tokio::time::sleep(Duration::from_secs(30)).await;
    let cpu = (child.cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    child.assert_running("(d)");
    let peak = child.peak_mb();
    child.stop();
    (peak, cpu)
}

/// What (e) measured.
struct Backlog {
    /// `VmHWM` once the backlog is drained: the peak of the whole scenario.
    peak_mb: f64,
    /// Deliveries/s once the sink is back.
    rate: f64,
    events: usize,
}

/// (e) peak RSS holding a backlog with the sink down, then draining it;
/// drain rate once the sink is back (deliveries/s).
async fn backlog(settings: &Settings) -> Backlog {
    let (runs, events) = (100, scaled(1_000_000) / 100);
    let sim = bulk_sim(runs, events, settings, "backlog", Duration::from_secs(5)).await;
    let (addr, sink) = start_receiver().await;
    sink.down.store(true, Ordering::Relaxed);
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        &sim,
        dir.path(),
        "poll",
        &webhook_sink(addr, settings),
        settings,
    );
    let mut child = Child::spawn(&write_config(dir.path(), &text));
    let reader = reader(dir.path()).await;
    let total = runs * (events + 1);
    wait_until("(e): the backlog to build up", limit(total), async || {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pending = reader.pending_count("out").await.unwrap_or(0);
        (pending >= total as i64)
            .then_some(())
            .ok_or(format!("{pending} of {total} pending"))
    })
    .await;
    sink.down.store(false, Ordering::Relaxed);
    let start = Instant::now();
    wait_until("(e): the backlog to drain", limit(total), async || {
        let distinct = sink.distinct();
        (distinct >= total as u64)
            .then_some(())
            .ok_or(format!("{distinct} of {total} distinct webhook-ids"))
    })
    .await;
    let rate = total as f64 / start.elapsed().as_secs_f64();
    child.assert_running("(e)");
    let peak_mb = child.peak_mb();
    child.stop();
    check_ids(
        "(e)",
        &sink.ids.lock().unwrap(),
        &expected_ids(&sim, events),
    );
    sink.check_signatures("(e)").await;
    sink.check_order("(e)");
    Backlog {
        peak_mb,
        rate,
        events: total,
    }
}

/// (g) as (b), with the state on PostgreSQL and `replicas` release binaries
/// sharing the runs (child processes, as a cluster runs them: each its own
/// pool, lease keeper and delivery loops). The clock starts before the
/// first replica does, so it includes the claims.
async fn webhooks_on_postgres(
    pg: &pg_support::PgServer,
    replicas: usize,
    runs: usize,
    events: usize,
    settings: &Settings,
) -> Deliveries {
    let sim = bulk_sim(runs, events, settings, "pg", Duration::from_secs(5)).await;
    let (addr, sink) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let database = format!("bench_{}", SCENARIO_G_DB.fetch_add(1, Ordering::Relaxed));
    let admin = pg.client().await;
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .await
        .expect("create the bench database");
    let url = pg
        .url()
        .replace("dbname=postgres", &format!("dbname={database}"));
    let sqlite_state = format!(
        "[state]\npath = \"{}\"\n",
        dir.path().join("runhook.db").display()
    );
    let start = Instant::now();
    let children: Vec<Child> = (0..replicas)
        .map(|n| {
            let text = config_text(
                &sim,
                dir.path(),
                "poll",
                &webhook_sink(addr, settings),
                settings,
            )
            .replace(
                &sqlite_state,
                &format!("[state]\nurl = \"{url}\"\n\n[cluster]\nnode = \"g{n}\"\n"),
            );
            let config = dir.path().join(format!("g{n}.toml"));
            std::fs::write(&config, text).unwrap();
            Child::spawn(&config)
        })
        .collect();
    let total = (runs * (events + 1)) as u64;
    wait_until(
        &format!("(g) {replicas} replicas: every event delivered"),
        limit(runs * events),
        async || {
            let distinct = sink.distinct();
            (distinct >= total)
                .then_some(())
                .ok_or(format!("{distinct} of {total} distinct webhook-ids"))
        },
    )
    .await;
    let rate = total as f64 / start.elapsed().as_secs_f64();
    for child in children {
        child.stop();
    }
    check_ids(
        "(g)",
        &sink.ids.lock().unwrap(),
        &expected_ids(&sim, events),
    );
    sink.check_signatures("(g)").await;
    sink.check_order("(g)");
    Deliveries {
        rate,
        repeats: sink.received() - sink.distinct(),
    }
}

/// Each (g) round gets a database of its own on the one server.
static SCENARIO_G_DB: AtomicU64 = AtomicU64::new(0);

fn scenario_g(runtime: &tokio::runtime::Runtime) {
    let Some(pg) = pg_support::PgServer::start() else {
        println!("| (g) | skipped: no PostgreSQL | | |");
        return;
    };
    let settings = settings_b();
    for replicas in [1, 3] {
        let all: Vec<Deliveries> = (0..settings.reps)
            .map(|_| {
                runtime.block_on(webhooks_on_postgres(
                    &pg,
                    replicas,
                    scaled(200),
                    1000,
                    &settings,
                ))
            })
            .collect();
        let rates: Vec<f64> = all.iter().map(|d| d.rate).collect();
        let repeats: Vec<u64> = all.iter().map(|d| d.repeats).collect();
        println!(
            "| (g) {} runs x 1,000 events -> webhook, PostgreSQL, {replicas} replica(s); checks as (b) | {:.0} deliveries/s ({rates:.0?}; repeated deliveries {repeats:?}) | {settings}, lease_ttl 15 s | |",
            scaled(200),
            median(rates.clone())
        );
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let wanted = std::env::var("RUNHOOK_BENCH").unwrap_or_else(|_| "a,b,c,d,e,f".into());
    let want = |s: &str| wanted.split(',').any(|w| w.trim() == s);
    println!("| scenario | result (median of the reps) | settings | target |\n|---|---|---|---|");
    if want("a") {
        let settings = settings_a();
        let all: Vec<f64> = (0..settings.reps)
            .map(|_| runtime.block_on(polling_to_file(&settings)))
            .collect();
        println!(
            "| (a) 1 run x {} events, polling -> file; every line checked | {:.0} events/s ({all:.0?}) | {settings} | >= 120,000 |",
            scaled(200_000),
            median(all.clone())
        );
    }
    for (name, pipeline) in [("b", false), ("b2", true)] {
        if !want(name) {
            continue;
        }
        let settings = Settings {
            pipeline,
            ..settings_b()
        };
        let label = format!("({name})");
        let all: Vec<Deliveries> = (0..settings.reps)
            .map(|_| runtime.block_on(webhooks(&label, scaled(200), 1000, &settings)))
            .collect();
        let rates: Vec<f64> = all.iter().map(|d| d.rate).collect();
        let repeats: Vec<u64> = all.iter().map(|d| d.repeats).collect();
        println!(
            "| {label} {} runs x 1,000 events -> webhook; distinct webhook-ids; 1 request in {SIGNATURE_SAMPLE} verified and parsed | {:.0} deliveries/s ({rates:.0?}; repeated deliveries {repeats:?}) | {settings} | >= 30,000 |",
            scaled(200),
            median(rates.clone())
        );
    }
    if want("c") {
        let settings = settings_c();
        let all: Vec<Latency> = (0..settings.reps)
            .map(|_| runtime.block_on(sse_latency(&settings)))
            .collect();
        let p50 = median(all.iter().map(|l| l.p50_ms).collect());
        let p99 = median(all.iter().map(|l| l.p99_ms).collect());
        let counts: Vec<(usize, usize)> = all.iter().map(|l| (l.kept, l.dropped)).collect();
        println!(
            "| (c) SSE emitted -> webhook received, {} events at 200 events/s | p50 {p50:.2} ms, p99 {p99:.2} ms ((kept, emitted before the stream connected): {counts:?}) | {settings} | p99 <= 5 ms |",
            scaled(2000)
        );
    }
    if want("d") {
        let settings = settings_d();
        let (peak, cpu) = runtime.block_on(idle_streams(&settings));
        println!(
            "| (d) {} SSE runs subscribed, idle | {peak:.0} MB peak RSS, {cpu:.1}% of a core | {settings} | <= 200 MB, < 5% |",
            scaled(10_000)
        );
    }
    if want("e") {
        let settings = settings_e();
        let b = runtime.block_on(backlog(&settings));
        println!(
            "| (e) {} events backlog, sink down, then drained | {:.0} MB peak RSS (whole scenario); drains at {:.0} deliveries/s | {settings} | <= 100 MB; drain >= 30,000/s |",
            b.events, b.peak_mb, b.rate
        );
    }
    for (name, pipeline) in [("f", false), ("f2", true)] {
        if !want(name) {
            continue;
        }
        let settings = Settings {
            pipeline,
            ..settings_f()
        };
        let label = format!("({name})");
        let events = scaled(100_000);
        let all: Vec<Deliveries> = (0..settings.reps)
            .map(|_| runtime.block_on(webhooks(&label, 1, events, &settings)))
            .collect();
        let rates: Vec<f64> = all.iter().map(|d| d.rate).collect();
        let repeats: Vec<u64> = all.iter().map(|d| d.repeats).collect();
        println!(
            "| {label} 1 run x {events} events -> webhook, one ordered chain; checks as (b) | {:.0} deliveries/s ({rates:.0?}; repeated deliveries {repeats:?}) | {settings} | >= 10,000 |",
            median(rates.clone())
        );
    }
    if want("g") {
        scenario_g(&runtime);
    }
}
