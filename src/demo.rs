//! `runhook demo`: the simulator, the daemon and a file sink in one process
//! on a temp dir, printing events as they are delivered. The first thing a
//! new user runs; needs no config and no network.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::daemon::{self, DaemonError};
use crate::simulate::{Scenario, Simulator};
use crate::store::pg::Replica;
use crate::store::{Location, Reads, StateError};

/// The demo gives up if the runs have not all been delivered by then.
const DEADLINE: Duration = Duration::from_secs(60);

/// The demo's state database, in its temp dir.
const STATE_FILE: &str = "runhook.db";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo: {0}")]
    Io(#[from] std::io::Error),
    #[error("demo config: {0}")]
    Config(#[from] ConfigError),
    #[error("demo: {0}")]
    Daemon(#[from] DaemonError),
    #[error("demo: {0}")]
    State(#[from] StateError),
    #[error("demo: the runs were not all delivered within {0:?}")]
    Timeout(Duration),
}

/// One line of the file sink, as far as the demo prints it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Line {
    run_id: String,
    sequence: Option<i64>,
    #[serde(rename = "type")]
    event_type: String,
    payload: serde_json::Value,
    run_status: Option<String>,
    current_phase: Option<String>,
}

/// Runs the demo, printing to `out`. Returns the delivered lines per run.
pub async fn run(out: &mut (dyn Write + Send)) -> Result<BTreeMap<String, usize>, DemoError> {
    let dir = tempfile::tempdir()?;
    let sim = Simulator::start(([127, 0, 0, 1], 0).into(), Scenario::demo()).await?;
    let config = Arc::new(demo_config(&sim, dir.path())?);
    let events_path = dir.path().join("events.jsonl");
    writeln!(
        out,
        "runhook demo: simulator on {}, state in {}\n  following {} runs by polling; delivering to {}\n",
        sim.url(),
        dir.path().display(),
        config.runs.len(),
        events_path.display()
    )?;

    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(daemon::run(config.clone(), shutdown.clone()));
    let state_path = dir.path().join(STATE_FILE);
    let result = tokio::time::timeout(DEADLINE, follow_file(&events_path, &state_path, out)).await;
    shutdown.cancel();
    let stopped = daemon.await.map_err(std::io::Error::other)?;
    stopped?;
    let counts = result.map_err(|_| DemoError::Timeout(DEADLINE))??;
    Ok(counts)
}

fn demo_config(sim: &Simulator, dir: &Path) -> Result<Config, ConfigError> {
    let runs: String = sim
        .run_ids()
        .iter()
        .map(|id| format!("[[runs]]\nid = \"{id}\"\nlabels = {{ source = \"demo\" }}\n"))
        .collect();
    let text = format!(
        r#"
[api]
base_url = "{url}"
token = "{token}"
transport = "poll"
poll_interval = "100ms"

[state]
path = "{state}"

{runs}
[sinks.archive]
type = "file"
path = "{events}"

[[routes]]
sinks = ["archive"]
"#,
        url = sim.url(),
        token = sim.token(),
        state = dir.join(STATE_FILE).display(),
        events = dir.join("events.jsonl").display(),
    );
    Config::parse(&text, &dir.join("demo.toml"), &|_| None)
}

/// Prints each line the file sink writes; returns once every run finished
/// and nothing is left to deliver.
async fn follow_file(
    path: &Path,
    state: &Path,
    out: &mut (dyn Write + Send),
) -> Result<BTreeMap<String, usize>, DemoError> {
    // The daemon creates the database; wait for it.
    while !state.exists() || !path.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store_reader =
        Reads::open(&Location::Sqlite(state.to_owned()), Replica::bystander()).await?;
    let file = std::fs::File::open(path)?;
    let mut lines = std::io::BufReader::new(file);
    let mut counts = BTreeMap::new();
    let mut finished: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut buffer = String::new();
    loop {
        buffer.clear();
        let read = lines.read_line(&mut buffer)?;
        if read > 0 && buffer.ends_with('\n') {
            if let Ok(line) = serde_json::from_str::<Line>(&buffer) {
                *counts.entry(line.run_id.clone()).or_insert(0) += 1;
                writeln!(out, "{}", describe(&line))?;
                if line.event_type == "run_finished" {
                    finished.insert(line.run_id.clone(), line.payload);
                }
            }
            continue;
        }
        let runs = store_reader.runs().await?;
        let all_finished = runs.iter().all(|r| finished.contains_key(&r.run_id));
        if all_finished && store_reader.pending_total().await? == 0 {
            summarise(out, &counts, &finished)?;
            return Ok(counts);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn describe(line: &Line) -> String {
    let seq = line
        .sequence
        .map_or("  -".to_owned(), |s| format!("{s:>3}"));
    let detail = match line.event_type.as_str() {
        "run_finished" => {
            let status = line.payload["status"].as_str().unwrap_or("?");
            match line.payload["errorMessage"]
                .as_str()
                .or(line.payload["cancelReason"].as_str())
            {
                Some(why) => format!("{status}: {why}"),
                None => status.to_owned(),
            }
        }
        "PHASE_STARTED" => format!("phase {}", line.payload["phase"].as_str().unwrap_or("?")),
        "ARTIFACT_CREATED" => format!(
            "artifact {}",
            line.payload["artifactType"].as_str().unwrap_or("?")
        ),
        _ => format!(
            "{}/{}",
            line.run_status.as_deref().unwrap_or("-"),
            line.current_phase.as_deref().unwrap_or("-")
        ),
    };
    format!(
        "  {:<16} #{seq}  {:<17} {detail}",
        line.run_id, line.event_type
    )
}

fn summarise(
    out: &mut (dyn Write + Send),
    counts: &BTreeMap<String, usize>,
    finished: &BTreeMap<String, serde_json::Value>,
) -> std::io::Result<()> {
    writeln!(out, "\nsummary (every event delivered once, in order):")?;
    for (run_id, payload) in finished {
        let why = payload["errorMessage"]
            .as_str()
            .or(payload["cancelReason"].as_str())
            .map(|w| format!(" ({w})"))
            .unwrap_or_default();
        writeln!(
            out,
            "  {run_id:<16} {:<9} {:>2} events, last sequence {}{why}",
            payload["status"].as_str().unwrap_or("?"),
            counts.get(run_id).copied().unwrap_or(0),
            payload["lastSequence"],
        )?;
    }
    Ok(())
}
