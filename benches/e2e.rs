//! End-to-end benchmark over the simulator's high-throughput mode on
//! 127.0.0.1. `cargo bench --bench e2e` prints a table. Each scenario runs
//! `RUNHOOK_BENCH_REPS` times (default 3) and reports the median; the
//! machines are shared and noisy, so compare medians and ratios.
//!
//! (a) 1 run x 200,000 events, polling -> file sink: events/s
//! (b) 200 runs x 1,000 events -> webhook to a local receiver: deliveries/s
//! (c) SSE event emitted -> webhook received, at 200 events/s: p50, p99
//! (d) 10,000 SSE runs subscribed and idle: RSS and CPU of the daemon
//! (e) a 1,000,000-event backlog with the sink down: RSS; then drain rate
//!
//! `RUNHOOK_BENCH=a,c` runs some; `RUNHOOK_BENCH_SCALE=0.1` shrinks them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use runhook::config::Config;
use runhook::simulate::scenario::Bulk;
use runhook::simulate::{Scenario, Simulator};
use runhook::store::Reader;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn scaled(n: usize) -> usize {
    ((n as f64 * env_f64("RUNHOOK_BENCH_SCALE", 1.0)) as usize).max(1)
}

/// A receiver that accepts everything (or answers 503 while `down`), and
/// keeps the latency of each request from the event's `createdAt`.
#[derive(Default)]
struct Sink {
    received: AtomicU64,
    down: AtomicBool,
    /// Parse bodies for latency (scenario c only: parsing costs CPU the
    /// daemon shares on a 2-core machine).
    timed: AtomicBool,
    latencies_us: std::sync::Mutex<Vec<u64>>,
}

async fn receive(State(sink): State<Arc<Sink>>, body: Bytes) -> StatusCode {
    if sink.down.load(Ordering::Relaxed) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let now = SystemTime::now();
    if sink.timed.load(Ordering::Relaxed)
        && let Ok(value) = serde_json::from_slice::<serde_json::Value>(&body)
        && let Some(created) = value["data"]["createdAt"].as_str()
        && let Ok(at) = humantime::parse_rfc3339(created)
        && let Ok(latency) = now.duration_since(at)
    {
        sink.latencies_us
            .lock()
            .unwrap()
            .push(latency.as_micros() as u64);
    }
    sink.received.fetch_add(1, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

async fn start_receiver() -> (SocketAddr, Arc<Sink>) {
    let sink = Arc::new(Sink::default());
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(sink.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, sink)
}

/// The simulator in bulk mode: `runs` x `events`, `interval` apart.
async fn bulk_sim(
    runs: usize,
    events: usize,
    interval: Duration,
    prefix: &str,
    page_size: usize,
    heartbeat: Duration,
) -> Simulator {
    let bulk = Bulk {
        runs,
        events,
        interval,
        prefix: prefix.into(),
    };
    let scenario = Scenario {
        page_size,
        heartbeat,
        bulk: Some(bulk),
        ..Scenario::default()
    };
    Simulator::start(([127, 0, 0, 1], 0).into(), scenario)
        .await
        .expect("simulator")
}

/// A config for `sim`'s runs with one sink.
fn config_text(sim: &Simulator, dir: &Path, transport: &str, sink: &str) -> String {
    let runs: String = sim
        .run_ids()
        .iter()
        .map(|id| format!("[[runs]]\nid = \"{id}\"\n"))
        .collect();
    format!(
        "[api]\nbase_url = \"{}\"\ntoken = \"{}\"\nsession_cookie = \"{}\"\ntransport = \"{transport}\"\n\
         poll_interval = \"20ms\"\nmax_concurrency = 256\n[state]\npath = \"{}\"\n{runs}\n{sink}\n[[routes]]\nsinks = [\"out\"]\n",
        sim.url(),
        sim.token(),
        sim.session(),
        dir.join("runhook.db").display(),
    )
}

fn webhook_sink(receiver: SocketAddr) -> String {
    format!(
        "[sinks.out]\ntype = \"webhook\"\nurl = \"http://{receiver}/hook\"\nsecret = \"{SECRET}\"\n\
         concurrency = 64\ninitial_backoff = \"200ms\"\nmax_backoff = \"2s\"\nmax_attempts = 1000000\nmax_age = \"7d\"\n"
    )
}

fn parse(text: &str, dir: &Path) -> Arc<Config> {
    Arc::new(Config::parse(text, &dir.join("bench.toml"), &|_| None).expect("config"))
}

async fn wait_until(mut done: impl AsyncFnMut() -> bool) {
    while !done().await {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn reader(dir: &Path) -> Reader {
    let path = dir.join("runhook.db");
    while !path.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Reader::open(&path).expect("reader")
}

/// Every run finished and nothing pending for the sink; cheap queries, so
/// that watching does not slow what is watched.
async fn drained(reader: &Reader) -> bool {
    let runs = reader.runs().await.unwrap_or_default();
    !runs.is_empty()
        && runs.iter().all(|r| r.state == "finished")
        && reader.pending_count("out").await.is_ok_and(|n| n == 0)
}

/// (a) events/s, polling -> file.
async fn polling_to_file() -> f64 {
    let events = scaled(200_000);
    let sim = bulk_sim(
        1,
        events,
        Duration::ZERO,
        "bench",
        5000,
        Duration::from_secs(5),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sink = format!(
        "[sinks.out]\ntype = \"file\"\npath = \"{}\"\n",
        dir.path().join("out.jsonl").display()
    );
    let config = parse(&config_text(&sim, dir.path(), "poll", &sink), dir.path());
    let shutdown = CancellationToken::new();
    let start = Instant::now();
    let daemon = tokio::spawn(runhook::daemon::run(config, shutdown.clone()));
    let reader = reader(dir.path()).await;
    wait_until(async || drained(&reader).await).await;
    let rate = (events + 1) as f64 / start.elapsed().as_secs_f64();
    shutdown.cancel();
    let _ = daemon.await;
    rate
}

/// (b) deliveries/s, 200 runs -> webhook.
async fn webhooks() -> f64 {
    let (runs, events) = (scaled(200), 1000);
    let sim = bulk_sim(
        runs,
        events,
        Duration::ZERO,
        "hook",
        1000,
        Duration::from_secs(5),
    )
    .await;
    let (addr, sink) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let config = parse(
        &config_text(&sim, dir.path(), "poll", &webhook_sink(addr)),
        dir.path(),
    );
    let shutdown = CancellationToken::new();
    let start = Instant::now();
    let daemon = tokio::spawn(runhook::daemon::run(config, shutdown.clone()));
    let total = (runs * (events + 1)) as u64;
    wait_until(async || sink.received.load(Ordering::Relaxed) >= total).await;
    let rate = total as f64 / start.elapsed().as_secs_f64();
    shutdown.cancel();
    let _ = daemon.await;
    rate
}

/// (c) p50 and p99 in ms, SSE at 200 events/s -> webhook.
async fn sse_latency() -> (f64, f64) {
    let events = scaled(2000);
    let sim = bulk_sim(
        1,
        events,
        Duration::from_millis(5),
        "live",
        500,
        Duration::from_secs(5),
    )
    .await;
    let (addr, sink) = start_receiver().await;
    sink.timed.store(true, Ordering::Relaxed);
    let dir = tempfile::tempdir().unwrap();
    let config = parse(
        &config_text(&sim, dir.path(), "sse", &webhook_sink(addr)),
        dir.path(),
    );
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(runhook::daemon::run(config, shutdown.clone()));
    wait_until(async || sink.received.load(Ordering::Relaxed) > events as u64).await;
    shutdown.cancel();
    let _ = daemon.await;
    let mut latencies = sink.latencies_us.lock().unwrap().clone();
    // The first events were emitted before the stream connected.
    let skip = latencies.len() / 10;
    latencies.drain(..skip);
    latencies.sort_unstable();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    (pick(0.5), pick(0.99))
}

/// The release binary as a child process, so RSS and CPU are its own.
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

    fn rss_mb(&self) -> f64 {
        self.status_field("VmRSS:") as f64 / 1024.0
    }

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

    fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.process.id().to_string()])
            .status();
        let _ = self.process.wait();
    }
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("bench.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// (d) RSS (MB) and CPU (% of a core) with 10,000 idle SSE runs.
async fn idle_streams() -> (f64, f64) {
    let runs = scaled(10_000);
    let sim = bulk_sim(
        runs,
        1,
        Duration::from_secs(3600),
        "idle",
        500,
        Duration::from_secs(30),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sink = format!(
        "[sinks.out]\ntype = \"file\"\npath = \"{}\"\n",
        dir.path().join("out.jsonl").display()
    );
    let config = write_config(dir.path(), &config_text(&sim, dir.path(), "sse", &sink));
    let child = Child::spawn(&config);
    let reader = reader(dir.path()).await;
    wait_until(async || {
        let runs_now = reader.runs().await.unwrap_or_default();
        runs_now
            .iter()
            .filter(|r| r.transport.as_deref() == Some("sse") && r.state == "following")
            .count()
            == runs
    })
    .await;
    // Let start-up settle (first lag lookups), then measure a quiet minute.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (cpu0, t0) = (child.cpu_seconds(), Instant::now());
    tokio::time::sleep(Duration::from_secs(30)).await;
    let cpu = (child.cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let rss = child.rss_mb();
    child.stop();
    (rss, cpu)
}

/// (e) RSS (MB, peak) holding a backlog with the sink down; drain rate once
/// it is back (deliveries/s).
async fn backlog() -> (f64, f64, usize) {
    let (runs, events) = (100, scaled(1_000_000) / 100);
    let sim = bulk_sim(
        runs,
        events,
        Duration::ZERO,
        "backlog",
        5000,
        Duration::from_secs(5),
    )
    .await;
    let (addr, sink) = start_receiver().await;
    sink.down.store(true, Ordering::Relaxed);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &config_text(&sim, dir.path(), "poll", &webhook_sink(addr)),
    );
    let child = Child::spawn(&config);
    let reader = reader(dir.path()).await;
    let total = (runs * (events + 1)) as i64;
    wait_until(async || {
        tokio::time::sleep(Duration::from_millis(500)).await;
        reader.pending_count("out").await.unwrap_or(0) >= total
    })
    .await;
    let peak = child.peak_mb();
    sink.down.store(false, Ordering::Relaxed);
    let start = Instant::now();
    wait_until(async || sink.received.load(Ordering::Relaxed) as i64 >= total).await;
    let rate = total as f64 / start.elapsed().as_secs_f64();
    child.stop();
    (peak, rate, runs * (events + 1))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let reps = env_f64("RUNHOOK_BENCH_REPS", 3.0) as usize;
    let wanted = std::env::var("RUNHOOK_BENCH").unwrap_or_else(|_| "a,b,c,d,e".into());
    let want = |s: &str| wanted.split(',').any(|w| w.trim() == s);
    let repeat = |f: &dyn Fn() -> f64| -> (f64, Vec<f64>) {
        let runs: Vec<f64> = (0..reps).map(|_| f()).collect();
        (median(runs.clone()), runs)
    };
    println!("| scenario | result (median of {reps}) | target |");
    println!("|---|---|---|");
    if want("a") {
        let (m, all) = repeat(&|| runtime.block_on(polling_to_file()));
        println!(
            "| (a) 1 run x {} events, polling -> file | {m:.0} events/s ({all:.0?}) | >= 100,000 |",
            scaled(200_000)
        );
    }
    if want("b") {
        let (m, all) = repeat(&|| runtime.block_on(webhooks()));
        println!(
            "| (b) {} runs x 1,000 events -> webhook | {m:.0} deliveries/s ({all:.0?}) | >= 30,000 |",
            scaled(200)
        );
    }
    if want("c") {
        let results: Vec<(f64, f64)> = (0..reps).map(|_| runtime.block_on(sse_latency())).collect();
        let p50 = median(results.iter().map(|r| r.0).collect());
        let p99 = median(results.iter().map(|r| r.1).collect());
        println!(
            "| (c) SSE emitted -> webhook received, 200 events/s | p50 {p50:.2} ms, p99 {p99:.2} ms | p99 <= 5 ms |"
        );
    }
    if want("d") {
        let (rss, cpu) = runtime.block_on(idle_streams());
        println!(
            "| (d) {} SSE runs subscribed, idle | {rss:.0} MB RSS, {cpu:.1}% of a core | <= 256 MB, < 5% |",
            scaled(10_000)
        );
    }
    if want("e") {
        let (peak, rate, n) = runtime.block_on(backlog());
        println!(
            "| (e) {n} events backlog, sink down | {peak:.0} MB peak RSS; drains at {rate:.0} deliveries/s | <= 100 MB |"
        );
    }
}
