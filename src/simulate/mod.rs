//! A local fake of the Agent Runs API (upstream-api.md) with scripted runs
//! and fault injection: the other side of the wire, for trying runhook,
//! tests and benchmarks. Shares only the wire types with the client.

pub mod scenario;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

pub use scenario::Scenario;
use scenario::{ScriptedEvent, ScriptedRun, StreamStyle};

/// The user every accepted credential belongs to.
pub const USER: &str = "user-1";
/// A bearer token the simulator accepts as another user (for 403 tests).
pub const OTHER_USER_TOKEN: &str = "other-user-token";

/// A fault to inject, per run or global, for `count` matching requests
/// (forever when absent).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Fault {
    /// Only requests for this run.
    #[serde(default)]
    pub run: Option<String>,
    /// Only this endpoint: "events", "stream" or "run".
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(flatten)]
    pub kind: FaultKind,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// Answer with this status and an `{"error"}` body (HTML for 502).
    Status {
        status: u16,
        #[serde(default)]
        retry_after: Option<u64>,
    },
    /// Answer after this many milliseconds.
    Slow { delay_ms: u64 },
    /// Poll answers (and new streams) also carry the two events before `since`.
    Resend,
    /// Poll answers start from sequence 0 whatever `since` says.
    IgnoreSince,
    /// Streams end abruptly, mid-frame, after this many events.
    DropStream { after: usize },
    /// Streams send an in-band `error` frame after this many events, then end.
    ErrorFrame { after: usize },
    /// Streams go silent (no frames, no heartbeats) after this many events.
    Stall { after: usize },
    /// Poll pages and streams serve the event with this sequence in a form
    /// that cannot be decoded (`eventType` a number), to test that the
    /// cursor never passes it.
    BadEvent { sequence: i64 },
    /// Poll pages and streams leave out the events from this sequence on,
    /// while the run's status, `lastEventSequence` and `run_finished` still
    /// count them: a finish announced past what was served.
    Withhold { from: i64 },
    /// Streams send a frame with bytes that are not UTF-8 after this many
    /// events, then go silent.
    InvalidUtf8 { after: usize },
    /// Poll answers are padded with whitespace to this many bytes, sent in
    /// chunks without a `Content-Length`: an answer too large to buffer.
    BigAnswer { bytes: u64 },
    /// Streams end with a bare `{"type":"run_finished"}`: no status, no
    /// `lastSequence`, no error message (the guides do not name its fields).
    BareFinish,
}

/// One request the simulator answered, for tests to inspect.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoggedRequest {
    pub endpoint: String,
    pub run_id: Option<String>,
    pub since: Option<i64>,
    pub status: u16,
    /// Milliseconds since the simulator started.
    pub at_ms: u64,
}

#[derive(Debug)]
struct SimEvent {
    sequence: i64,
    event_type: String,
    payload: String,
    created_at: Option<String>,
    /// Emitted this long after the run started.
    after: Duration,
    /// The run's phase once this event is out.
    phase: Option<String>,
}

#[derive(Debug)]
struct SimRun {
    owner: String,
    events: Vec<SimEvent>,
    interval: Duration,
    started: Option<Instant>,
    final_status: String,
    cancelled: bool,
    error_message: Option<String>,
    cancel_reason: Option<String>,
    retry_events: Vec<ScriptedEvent>,
    retry_final_status: Option<String>,
    created_at: String,
}

impl SimRun {
    fn new(script: &ScriptedRun, clock: Instant) -> Self {
        let mut run = Self {
            owner: script.owner.clone(),
            events: Vec::new(),
            interval: script.interval,
            started: script.started.then_some(clock),
            final_status: script.final_status.clone(),
            cancelled: false,
            error_message: script.error_message.clone(),
            cancel_reason: script.cancel_reason.clone(),
            retry_events: script.retry_events.clone(),
            retry_final_status: script.retry_final_status.clone(),
            created_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        };
        run.append(&script.events, Duration::ZERO);
        run
    }

    fn append(&mut self, script: &[ScriptedEvent], start: Duration) {
        let wall = std::time::SystemTime::now();
        let mut phase = self.events.last().and_then(|e| e.phase.clone());
        for (i, scripted) in script.iter().enumerate() {
            let last = self.events.last().map_or(0, |e| e.sequence);
            let sequence = scripted.sequence.filter(|s| *s > last).unwrap_or(last + 1);
            let after = start + self.interval * (i as u32 + 1);
            if scripted.event_type == "PHASE_STARTED"
                && let Ok(value) = serde_json::from_str::<serde_json::Value>(&scripted.payload)
                && let Some(p) = value["phase"].as_str()
            {
                phase = Some(p.to_owned());
            }
            self.events.push(SimEvent {
                sequence,
                event_type: scripted.event_type.clone(),
                payload: scripted.payload.clone(),
                created_at: scripted
                    .created_at
                    .then(|| humantime::format_rfc3339_millis(wall + after).to_string()),
                after,
                phase: phase.clone(),
            });
        }
    }

    /// How many events are out by `now`.
    fn visible(&self, now: Instant) -> usize {
        match self.started {
            None => 0,
            Some(start) => {
                let elapsed = now.saturating_duration_since(start);
                self.events.partition_point(|e| e.after <= elapsed)
            }
        }
    }

    fn status(&self, now: Instant) -> &str {
        if self.cancelled {
            "cancelled"
        } else if self.started.is_none() {
            "pending"
        } else if self.visible(now) == self.events.len() {
            &self.final_status
        } else {
            "running"
        }
    }

    fn phase(&self, now: Instant) -> Option<&str> {
        let visible = self.visible(now);
        visible
            .checked_sub(1)
            .and_then(|i| self.events[i].phase.as_deref())
    }

    fn last_sequence(&self, now: Instant) -> i64 {
        let visible = self.visible(now);
        visible
            .checked_sub(1)
            .map_or(0, |i| self.events[i].sequence)
    }

    /// When the next event comes out, if one is still due.
    fn next_emit(&self, now: Instant) -> Option<Instant> {
        let start = self.started?;
        self.events.get(self.visible(now)).map(|e| start + e.after)
    }

    fn info(&self, id: &str, now: Instant) -> serde_json::Value {
        let status = self.status(now);
        let mut run = json!({
            "id": id,
            "tripId": 42,
            "userId": self.owner,
            "status": status,
            "phase": self.phase(now),
            "lastEventSequence": self.last_sequence(now),
            "createdAt": self.created_at,
        });
        if status == "failed" {
            run["errorMessage"] = json!(self.error_message.as_deref().unwrap_or("Run failed"));
        }
        if status == "cancelled"
            && let Some(reason) = &self.cancel_reason
        {
            run["cancelReason"] = json!(reason);
        }
        run
    }
}

/// The `BadEvent` and `Withhold` faults one poll answer or one stream
/// connection carries: which events it leaves out or garbles.
#[derive(Debug, Default, Clone, Copy)]
struct Damage {
    bad: Option<i64>,
    withhold: Option<i64>,
    bare_finish: bool,
}

impl Damage {
    fn take(sim: &Sim, endpoint: &str, run_id: &str) -> Self {
        let bad = sim.take_fault(endpoint, run_id, |k| {
            matches!(k, FaultKind::BadEvent { .. })
        });
        let withhold = sim.take_fault(endpoint, run_id, |k| {
            matches!(k, FaultKind::Withhold { .. })
        });
        let bare_finish = sim
            .take_fault(endpoint, run_id, |k| *k == FaultKind::BareFinish)
            .is_some();
        Self {
            bare_finish,
            bad: match bad {
                Some(FaultKind::BadEvent { sequence }) => Some(sequence),
                _ => None,
            },
            withhold: match withhold {
                Some(FaultKind::Withhold { from }) => Some(from),
                _ => None,
            },
        }
    }

    /// Whether the event is served at all.
    fn keeps(&self, event: &SimEvent) -> bool {
        self.withhold.is_none_or(|from| event.sequence < from)
    }

    /// The event's JSON, or an undecodable version of it.
    fn event_json(&self, event: &SimEvent) -> String {
        if self.bad == Some(event.sequence) {
            format!(
                r#"{{"sequence":{},"eventType":42,"payload":{{}}}}"#,
                event.sequence
            )
        } else {
            event_json(event)
        }
    }

    /// The event's stream frame, or an undecodable one.
    fn frame(&self, event: &SimEvent, style: &StreamStyle) -> String {
        if self.bad == Some(event.sequence) {
            format!(
                r#"{{"type":"run_event","event":{}}}"#,
                self.event_json(event)
            )
        } else {
            run_event_frame(event, style)
        }
    }
}

/// Writes one event object with its payload bytes untouched.
fn event_json(event: &SimEvent) -> String {
    let mut out = format!(
        r#"{{"sequence":{},"eventType":{},"payload":{}"#,
        event.sequence,
        json!(event.event_type),
        event.payload
    );
    if let Some(created) = &event.created_at {
        out.push_str(&format!(r#","createdAt":{}"#, json!(created)));
    }
    out.push('}');
    out
}

struct Sim {
    started: Instant,
    token: String,
    session: String,
    page_size: usize,
    heartbeat: Duration,
    style: StreamStyle,
    runs: Mutex<HashMap<String, SimRun>>,
    faults: Mutex<Vec<Fault>>,
    log: Mutex<Vec<LoggedRequest>>,
    next_id: Mutex<u64>,
}

impl Sim {
    fn lock_runs(&self) -> std::sync::MutexGuard<'_, HashMap<String, SimRun>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, endpoint: &str, run_id: Option<&str>, since: Option<i64>, status: u16) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(LoggedRequest {
                endpoint: endpoint.into(),
                run_id: run_id.map(str::to_owned),
                since,
                status,
                at_ms: self.started.elapsed().as_millis() as u64,
            });
    }

    /// The first fault matching the request, used up by one.
    fn take_fault(
        &self,
        endpoint: &str,
        run_id: &str,
        want: impl Fn(&FaultKind) -> bool,
    ) -> Option<FaultKind> {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let index = faults.iter().position(|f| {
            f.run.as_deref().is_none_or(|r| r == run_id)
                && f.endpoint.as_deref().is_none_or(|e| e == endpoint)
                && f.count != Some(0)
                && want(&f.kind)
        })?;
        let fault = &mut faults[index];
        if let Some(count) = &mut fault.count {
            *count -= 1;
        }
        Some(fault.kind.clone())
    }

    fn faults_left(&self) -> u32 {
        let faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults.iter().filter_map(|f| f.count).sum()
    }

    /// Gives back one use of a counted fault taken for a stream connection
    /// that ended before the fault fired.
    fn give_back(&self, endpoint: &str, run_id: &str, kind: &FaultKind) {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let counted = faults.iter_mut().find(|f| {
            f.run.as_deref().is_none_or(|r| r == run_id)
                && f.endpoint.as_deref().is_none_or(|e| e == endpoint)
                && f.count.is_some()
                && f.kind == *kind
        });
        if let Some(fault) = counted {
            fault.count = fault.count.map(|c| c + 1);
        }
    }

    /// The user a request authenticates as; `cookie_only` for the stream.
    fn user(&self, headers: &HeaderMap, cookie_only: bool) -> Option<&'static str> {
        let cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().strip_prefix("session_token="))
            .any(|v| v == self.session);
        if cookie {
            return Some(USER);
        }
        if cookie_only {
            return None;
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match bearer {
            Some(t) if t == self.token => Some(USER),
            Some(OTHER_USER_TOKEN) => Some("user-2"),
            _ => None,
        }
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

fn fault_response(status: u16, retry_after: Option<u64>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = if status == 502 {
        (
            code,
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body>502 Bad Gateway</body></html>",
        )
            .into_response()
    } else {
        error(code, code.canonical_reason().unwrap_or("Injected fault"))
    };
    if let Some(seconds) = retry_after
        && let Ok(value) = seconds.to_string().parse()
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

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
        let mut runs = HashMap::new();
        let bulk = scenario
            .bulk
            .as_ref()
            .map(scenario::bulk_runs)
            .unwrap_or_default();
        for script in scenario.runs.iter().chain(&bulk) {
            let run = if scenario.pretty_payloads {
                SimRun::new(&scenario::prettified(script), clock)
            } else {
                SimRun::new(script, clock)
            };
            runs.insert(script.id.clone(), run);
        }
        let sim = Arc::new(Sim {
            started: clock,
            token: scenario.token,
            session: scenario.session,
            page_size: scenario.page_size.max(1),
            heartbeat: scenario.heartbeat,
            style: scenario.stream,
            runs: Mutex::new(runs),
            faults: Mutex::new(scenario.faults),
            log: Mutex::new(Vec::new()),
            next_id: Mutex::new(1),
        });
        let app = Router::new()
            .route("/v1/agent-runs", post(create_run))
            .route("/v1/agent-runs/{id}", get(get_run))
            .route("/v1/agent-runs/{id}/control", post(control))
            .route("/v1/agent-runs/{id}/events", get(events))
            .route("/v1/agent-runs/{id}/stream", get(stream))
            .route("/_sim/requests", get(requests))
            .route("/_sim/faults", post(add_fault).get(list_faults))
            .with_state(sim.clone());
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "simulator stopped");
            }
        });
        Ok(Self { addr, sim, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
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
        self.sim
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn inject(&self, fault: Fault) {
        self.sim
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fault);
    }

    /// How many uses of counted faults (those with a `count`) are still
    /// waiting to fire; faults without a count are not included.
    pub fn faults_left(&self) -> u32 {
        self.sim.faults_left()
    }

    pub fn clear_faults(&self) {
        self.sim
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
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

type Shared = State<Arc<Sim>>;

#[derive(Deserialize)]
struct CreateRun {
    #[serde(rename = "tripId")]
    trip_id: Option<serde_json::Value>,
}

async fn create_run(State(sim): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let Some(user) = sim.user(&headers, false) else {
        sim.record("create", None, None, 401);
        return error(StatusCode::UNAUTHORIZED, "Authentication required");
    };
    let Ok(CreateRun { trip_id: Some(_) }) = serde_json::from_slice(&body) else {
        sim.record("create", None, None, 400);
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": [{"path": ["tripId"], "message": "Required"}]})),
        )
            .into_response();
    };
    let id = {
        let mut next = sim.next_id.lock().unwrap_or_else(|p| p.into_inner());
        *next += 1;
        format!("sim-run-{:04}", *next - 1)
    };
    let mut script = Scenario::demo().runs.remove(0);
    script.id = id.clone();
    script.owner = user.into();
    script.started = false;
    let now = Instant::now();
    let run = SimRun::new(&script, now);
    let info = run.info(&id, now);
    sim.lock_runs().insert(id.clone(), run);
    sim.record("create", Some(&id), None, 201);
    (StatusCode::CREATED, axum::Json(json!({ "run": info }))).into_response()
}

/// Authentication, ownership and injected status faults, common to the
/// per-run endpoints. The error is the response to send.
#[allow(clippy::result_large_err)]
fn admit(
    sim: &Sim,
    endpoint: &str,
    id: &str,
    headers: &HeaderMap,
    since: Option<i64>,
) -> Result<(), Response> {
    let cookie_only = endpoint == "stream";
    let refuse = |status: StatusCode, message: &str| {
        sim.record(endpoint, Some(id), since, status.as_u16());
        Err(error(status, message))
    };
    let Some(user) = sim.user(headers, cookie_only) else {
        return refuse(StatusCode::UNAUTHORIZED, "Authentication required");
    };
    if let Some(FaultKind::Status {
        status,
        retry_after,
    }) = sim.take_fault(endpoint, id, |k| matches!(k, FaultKind::Status { .. }))
    {
        sim.record(endpoint, Some(id), since, status);
        return Err(fault_response(status, retry_after));
    }
    match sim.lock_runs().get(id).map(|r| r.owner.clone()) {
        None => refuse(StatusCode::NOT_FOUND, "Run not found"),
        Some(owner) if owner != user => refuse(StatusCode::FORBIDDEN, "Forbidden"),
        Some(_) => Ok(()),
    }
}

async fn slow_fault(sim: &Sim, endpoint: &str, id: &str) {
    if let Some(FaultKind::Slow { delay_ms }) =
        sim.take_fault(endpoint, id, |k| matches!(k, FaultKind::Slow { .. }))
    {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }
}

async fn get_run(State(sim): Shared, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(response) = admit(&sim, "run", &id, &headers, None) {
        return response;
    }
    slow_fault(&sim, "run", &id).await;
    let now = Instant::now();
    let info = match sim.lock_runs().get(&id) {
        Some(run) => run.info(&id, now),
        None => return error(StatusCode::NOT_FOUND, "Run not found"),
    };
    sim.record("run", Some(&id), None, 200);
    axum::Json(json!({
        "run": info,
        "artifacts": [],
        "revisionDrift": {"hasDrift": false, "snapshotRevision": 1, "currentRevision": 1},
    }))
    .into_response()
}

#[derive(Deserialize)]
struct ControlBody {
    action: String,
    #[serde(default)]
    reason: Option<String>,
}

async fn control(
    State(sim): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(response) = admit(&sim, "control", &id, &headers, None) {
        return response;
    }
    let Ok(body) = serde_json::from_slice::<ControlBody>(&body) else {
        return error(StatusCode::BAD_REQUEST, "Invalid body");
    };
    let now = Instant::now();
    let mut runs = sim.lock_runs();
    let Some(run) = runs.get_mut(&id) else {
        return error(StatusCode::NOT_FOUND, "Run not found");
    };
    let status = run.status(now).to_owned();
    let outcome = match (body.action.as_str(), status.as_str()) {
        ("start", "pending") => {
            run.started = Some(now);
            Ok(())
        }
        ("start", _) => Err("Cannot start a run that is already running"),
        ("stop" | "cancel", "running" | "pending") => {
            run.cancelled = true;
            run.cancel_reason = body.reason.or(run.cancel_reason.take());
            Ok(())
        }
        ("retry", "failed") => {
            let elapsed = run
                .started
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
            let more = std::mem::take(&mut run.retry_events);
            let more = if more.is_empty() {
                vec![ScriptedEvent {
                    event_type: "PHASE_STARTED".into(),
                    payload: r#"{"phase":"done"}"#.into(),
                    sequence: None,
                    created_at: true,
                }]
            } else {
                more
            };
            run.append(&more, elapsed);
            run.final_status = run
                .retry_final_status
                .clone()
                .unwrap_or_else(|| "completed".into());
            if run.final_status != "failed" {
                run.error_message = None;
            }
            Ok(())
        }
        ("stop" | "cancel" | "retry", _) => Err("Action not valid for the run's status"),
        _ => Err("Unknown action"),
    };
    match outcome {
        Ok(()) => {
            let info = run.info(&id, now);
            drop(runs);
            sim.record("control", Some(&id), None, 200);
            axum::Json(json!({ "run": info })).into_response()
        }
        Err(message) => {
            drop(runs);
            sim.record("control", Some(&id), None, 400);
            error(StatusCode::BAD_REQUEST, message)
        }
    }
}

#[derive(Deserialize)]
struct Since {
    since: Option<i64>,
}

async fn events(
    State(sim): Shared,
    Path(id): Path<String>,
    Query(q): Query<Since>,
    headers: HeaderMap,
) -> Response {
    let asked = q.since.unwrap_or(0);
    if let Err(response) = admit(&sim, "events", &id, &headers, Some(asked)) {
        return response;
    }
    slow_fault(&sim, "events", &id).await;
    let ignore_since = sim
        .take_fault("events", &id, |k| *k == FaultKind::IgnoreSince)
        .is_some();
    let resend = sim
        .take_fault("events", &id, |k| *k == FaultKind::Resend)
        .is_some();
    let damage = Damage::take(&sim, "events", &id);
    let big = sim.take_fault("events", &id, |k| matches!(k, FaultKind::BigAnswer { .. }));
    let since = if ignore_since { 0 } else { asked };
    let now = Instant::now();
    let body = {
        let runs = sim.lock_runs();
        let Some(run) = runs.get(&id) else {
            return error(StatusCode::NOT_FOUND, "Run not found");
        };
        let visible: Vec<&SimEvent> = run.events[..run.visible(now)]
            .iter()
            .filter(|e| damage.keeps(e))
            .collect();
        let first_new = visible.partition_point(|e| e.sequence <= since);
        let first = if resend {
            first_new.saturating_sub(2)
        } else {
            first_new
        };
        let last = (first_new + sim.page_size).min(visible.len());
        let events: Vec<String> = visible[first..last]
            .iter()
            .map(|e| damage.event_json(e))
            .collect();
        // While a page is cut short, report the run as still running.
        let status = if last < visible.len() {
            "running"
        } else {
            run.status(now)
        };
        format!(
            r#"{{"events":[{}],"runStatus":{},"currentPhase":{}}}"#,
            events.join(","),
            json!(status),
            json!(run.phase(now))
        )
    };
    sim.record("events", Some(&id), Some(asked), 200);
    if let Some(FaultKind::BigAnswer { bytes }) = big {
        return padded(body, bytes);
    }
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `body` with whitespace before its closing brace up to `bytes` in all,
/// streamed in 64 KiB chunks (nothing that size is held in memory here).
fn padded(mut body: String, bytes: u64) -> Response {
    use futures::StreamExt;
    static SPACES: [u8; 64 * 1024] = [b' '; 64 * 1024];
    body.pop();
    let mut left = bytes.saturating_sub(body.len() as u64 + 1);
    let head = futures::stream::iter([Bytes::from(body)]);
    let pad = futures::stream::iter(std::iter::from_fn(move || {
        let n = left.min(SPACES.len() as u64) as usize;
        left -= n as u64;
        (n > 0).then(|| Bytes::from_static(&SPACES[..n]))
    }));
    let tail = futures::stream::iter([Bytes::from_static(b"}")]);
    let chunks = head.chain(pad).chain(tail).map(Ok::<_, std::io::Error>);
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(chunks))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn stream(
    State(sim): Shared,
    Path(id): Path<String>,
    Query(q): Query<Since>,
    headers: HeaderMap,
) -> Response {
    let since = q.since.unwrap_or(0);
    if let Err(response) = admit(&sim, "stream", &id, &headers, Some(since)) {
        return response;
    }
    slow_fault(&sim, "stream", &id).await;
    sim.record("stream", Some(&id), Some(since), 200);
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(serve_stream(sim.clone(), id, since, tx));
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A `run_event` frame: the event nested under `event` or flattened; with
/// `multiline`, a line break between tokens (valid JSON, several `data:`
/// lines on the wire, payload bytes untouched).
fn run_event_frame(event: &SimEvent, style: &StreamStyle) -> String {
    let event = event_json(event);
    let separator = if style.multiline { ",\n" } else { "," };
    if style.flat {
        format!(r#"{{"type":"run_event"{separator}{}"#, &event[1..])
    } else {
        format!(r#"{{"type":"run_event"{separator}"event":{event}}}"#)
    }
}

/// SSE framing: one `data:` line per line of the JSON.
fn sse_frame(data: &str) -> Bytes {
    let mut frame = String::with_capacity(data.len() + 16);
    for line in data.lines() {
        frame.push_str("data: ");
        frame.push_str(line);
        frame.push('\n');
    }
    frame.push('\n');
    Bytes::from(frame)
}

/// Feeds one stream connection until the run finishes, a fault ends it, or
/// the client goes away.
async fn serve_stream(
    sim: Arc<Sim>,
    id: String,
    since: i64,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let style = sim.style.clone();
    let send = |bytes: Bytes| {
        let tx = tx.clone();
        let style = style.clone();
        async move {
            if style.comments {
                tx.send(Ok(Bytes::from_static(b": ping\n"))).await?;
            }
            if !style.split {
                return tx.send(Ok(bytes)).await;
            }
            for piece in bytes.chunks(7) {
                tx.send(Ok(Bytes::copy_from_slice(piece))).await?;
                tokio::task::yield_now().await;
            }
            Ok(())
        }
    };
    if send(Bytes::from_static(b"retry: 1000\n: welcome\n\n"))
        .await
        .is_err()
    {
        return;
    }
    if send(sse_frame(
        &json!({"type": "connected", "runId": id}).to_string(),
    ))
    .await
    .is_err()
    {
        return;
    }
    // One way of ending per connection: the first such fault that matches.
    // Taken now, given back if the connection ends before it fires.
    let ending = sim.take_fault("stream", &id, |k| {
        matches!(
            k,
            FaultKind::DropStream { .. }
                | FaultKind::ErrorFrame { .. }
                | FaultKind::Stall { .. }
                | FaultKind::InvalidUtf8 { .. }
        )
    });
    if sim
        .take_fault("stream", &id, |k| *k == FaultKind::Resend)
        .is_some()
    {
        // Replay the two events before `since`, as a confused proxy might.
        let stale: Vec<String> = {
            let runs = sim.lock_runs();
            let Some(run) = runs.get(&id) else { return };
            let visible = &run.events[..run.visible(Instant::now())];
            let upto = visible.partition_point(|e| e.sequence <= since);
            visible[upto.saturating_sub(2)..upto]
                .iter()
                .map(|e| run_event_frame(e, &sim.style))
                .collect()
        };
        for frame in stale {
            if send(sse_frame(&frame)).await.is_err() {
                return;
            }
        }
    }
    let mut unfired = Unfired {
        sim: &sim,
        run_id: &id,
        kind: ending.clone(),
    };
    let damage = Damage::take(&sim, "stream", &id);
    let mut cursor = since;
    let mut sent = 0usize;
    loop {
        let now = Instant::now();
        let (frames, finished, next) = {
            let runs = sim.lock_runs();
            let Some(run) = runs.get(&id) else { return };
            let visible = &run.events[..run.visible(now)];
            let first = visible.partition_point(|e| e.sequence <= cursor);
            let frames: Vec<(i64, String)> = visible[first..]
                .iter()
                .filter(|e| damage.keeps(e))
                .map(|e| (e.sequence, damage.frame(e, &sim.style)))
                .collect();
            let status = run.status(now);
            let finished = crate::upstream::types::is_final(status).then(|| {
                if damage.bare_finish {
                    return json!({"type": "run_finished"}).to_string();
                }
                let mut frame = json!({"type": "run_finished", "status": status, "lastSequence": run.last_sequence(now)});
                if let Some(message) = run.info(&id, now).get("errorMessage") {
                    frame["errorMessage"] = message.clone();
                }
                frame.to_string()
            });
            (frames, finished, run.next_emit(now))
        };
        for (sequence, frame) in frames {
            if ending.as_ref().is_some_and(|k| fires_after(k) <= sent) {
                unfired.kind = None;
            }
            match ending {
                Some(FaultKind::DropStream { after }) if sent >= after => {
                    let bytes = sse_frame(&frame);
                    let _ = send(bytes.slice(..bytes.len() / 2)).await;
                    // Let what was sent reach the socket before the reset,
                    // as on a real network.
                    while tx.capacity() < tx.max_capacity() {
                        tokio::task::yield_now().await;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let _ = tx.send(Err(std::io::Error::other("injected drop"))).await;
                    return;
                }
                Some(FaultKind::Stall { after }) if sent >= after => {
                    // Silent, connection open, until the client goes away.
                    tx.closed().await;
                    return;
                }
                Some(FaultKind::InvalidUtf8 { after }) if sent >= after => {
                    let _ = send(Bytes::from_static(
                        b"data: {\"type\":\"status\",\"x\":\"\xff\xfe\"}\n\n",
                    ))
                    .await;
                    tx.closed().await;
                    return;
                }
                Some(FaultKind::ErrorFrame { after }) if sent >= after => {
                    let error = r#"{"type":"error","error":"Injected stream error"}"#;
                    let _ = send(sse_frame(error)).await;
                    return;
                }
                _ => {}
            }
            if send(sse_frame(&frame)).await.is_err() {
                return;
            }
            sent += 1;
            cursor = sequence;
        }
        if let Some(frame) = finished {
            let _ = send(sse_frame(&frame)).await;
            return;
        }
        let heartbeat = tokio::time::sleep(sim.heartbeat);
        let wake = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = wake => {}
            _ = heartbeat => {
                let status = {
                    let runs = sim.lock_runs();
                    runs.get(&id).map(|r| json!({"type": "status", "status": r.status(Instant::now()), "phase": r.phase(Instant::now())}))
                };
                if let Some(status) = status
                    && send(sse_frame(&status.to_string())).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

async fn requests(State(sim): Shared) -> Response {
    let log = sim.log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    axum::Json(log).into_response()
}

async fn add_fault(State(sim): Shared, axum::Json(fault): axum::Json<Fault>) -> Response {
    sim.faults
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(fault);
    StatusCode::NO_CONTENT.into_response()
}

/// `GET /_sim/faults`: the injected faults as they stand, and how many uses
/// of counted faults are left (`left`; 0 once every counted fault fired).
async fn list_faults(State(sim): Shared) -> Response {
    let faults = sim.faults.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let left = sim.faults_left();
    axum::Json(serde_json::json!({ "left": left, "faults": faults })).into_response()
}

/// A stream-ending fault taken for a connection and not fired yet: given
/// back when the connection ends first, so `faults_left` counts only faults
/// that fired.
struct Unfired<'a> {
    sim: &'a Sim,
    run_id: &'a str,
    kind: Option<FaultKind>,
}

impl Drop for Unfired<'_> {
    fn drop(&mut self) {
        if let Some(kind) = &self.kind {
            self.sim.give_back("stream", self.run_id, kind);
        }
    }
}

/// After how many events a stream-ending fault fires.
fn fires_after(kind: &FaultKind) -> usize {
    match kind {
        FaultKind::DropStream { after }
        | FaultKind::ErrorFrame { after }
        | FaultKind::Stall { after }
        | FaultKind::InvalidUtf8 { after } => *after,
        _ => usize::MAX,
    }
}
