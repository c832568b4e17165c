//! The public handle: starts the simulator on a socket and lets a test or
//! benchmark read and steer it in-process (runs, faults, request log).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::routing::{get, post};

use super::faults::{Fault, Faults};
use super::handlers::{add_fault, control, create_run, events, get_run, list_faults, requests};
use super::requests::{LoggedRequest, RequestLog};
use super::run::SimRun;
use super::scenario::{self, Scenario};
use super::state::Sim;
use super::stream::stream;

/// A running simulator.
pub struct Simulator {
    addr: SocketAddr,
    sim: Arc<Sim>,
    server: tokio::task::JoinHandle<()>,
}

impl Simulator {
    /// Binds `listen` (port 0 for an ephemeral one) and serves `scenario`.
    pub async fn start(listen: SocketAddr, scenario: Scenario) -> std::io::Result<Self> {
        let clock = Instant::now();
        let runs = scripted_runs(&scenario, clock);
        let sim = Arc::new(Sim {
            token: scenario.token,
            session: scenario.session,
            page_size: scenario.page_size.max(1),
            heartbeat: scenario.heartbeat,
            style: scenario.stream,
            runs: Mutex::new(runs),
            faults: Faults::new(scenario.faults),
            log: RequestLog::new(clock),
            next_id: Mutex::new(1),
        });
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let app = router(sim.clone());
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "simulator stopped");
            }
        });
        Ok(Self { addr, sim, server })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn token(&self) -> &str {
        &self.sim.token
    }

    pub fn session(&self) -> &str {
        &self.sim.session
    }

    pub fn run_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.sim.lock_runs().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.sim.log.snapshot()
    }

    pub fn inject(&self, fault: Fault) {
        self.sim.faults.add(fault);
    }

    /// How many uses of counted faults (those with a `count`) are still
    /// waiting to fire; faults without a count are not included.
    pub fn faults_left(&self) -> u32 {
        self.sim.faults.left()
    }

    pub fn clear_faults(&self) {
        self.sim.faults.clear();
    }

    /// The events a run will have emitted once it is done: (sequence, type,
    /// payload bytes, createdAt).
    pub fn script(&self, run_id: &str) -> Vec<(i64, String, String, Option<String>)> {
        self.sim
            .lock_runs()
            .get(run_id)
            .map(|run| {
                run.events
                    .iter()
                    .map(|e| {
                        (
                            e.sequence,
                            e.event_type.clone(),
                            e.payload.clone(),
                            e.created_at.clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The status a run has now.
    pub fn status(&self, run_id: &str) -> Option<String> {
        self.sim
            .lock_runs()
            .get(run_id)
            .map(|r| r.status(Instant::now()).to_owned())
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The scenario's runs and its bulk workload's, all starting at `clock`.
fn scripted_runs(scenario: &Scenario, clock: Instant) -> HashMap<String, SimRun> {
    let bulk = scenario
        .bulk
        .as_ref()
        .map(scenario::bulk_runs)
        .unwrap_or_default();
    let mut runs = HashMap::new();
    for script in scenario.runs.iter().chain(&bulk) {
        let run = if scenario.pretty_payloads {
            SimRun::new(&scenario::prettified(script), clock)
        } else {
            SimRun::new(script, clock)
        };
        runs.insert(script.id.clone(), run);
    }
    runs
}

fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/v1/agent-runs", post(create_run))
        .route("/v1/agent-runs/{id}", get(get_run))
        .route("/v1/agent-runs/{id}/control", post(control))
        .route("/v1/agent-runs/{id}/events", get(events))
        .route("/v1/agent-runs/{id}/stream", get(stream))
        .route("/_sim/requests", get(requests))
        .route("/_sim/faults", post(add_fault).get(list_faults))
        .with_state(sim)
}
