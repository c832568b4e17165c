//! The HTTP handlers of the API subset runhook uses (create, get, control,
//! poll) and of the simulator's own `/_sim` endpoints; the stream endpoint
//! is in `stream.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::Scenario;
use super::faults::{Damage, Fault, FaultKind};
use super::run::{SimEvent, SimRun};
use super::state::Sim;

pub(super) type Shared = State<Arc<Sim>>;

pub(super) fn error(status: StatusCode, message: &str) -> Response {
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

/// Authentication, ownership and injected status faults, common to the
/// per-run endpoints. The error is the response to send.
#[allow(clippy::result_large_err)]
pub(super) fn admit(
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
    }) = sim
        .faults
        .take(endpoint, id, |k| matches!(k, FaultKind::Status { .. }))
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

pub(super) async fn slow_fault(sim: &Sim, endpoint: &str, id: &str) {
    if let Some(FaultKind::Slow { delay_ms }) = sim
        .faults
        .take(endpoint, id, |k| matches!(k, FaultKind::Slow { .. }))
    {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }
}

#[derive(Deserialize)]
struct CreateRun {
    #[serde(rename = "tripId")]
    trip_id: Option<serde_json::Value>,
}

/// `POST /v1/agent-runs`: a copy of the demo's first run, pending until a
/// `start` control action.
pub(super) async fn create_run(State(sim): Shared, headers: HeaderMap, body: Bytes) -> Response {
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
    let id = sim.new_run_id();
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

pub(super) async fn get_run(
    State(sim): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
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

pub(super) async fn control(
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
    match run.control(&body.action, body.reason, now) {
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
pub(super) struct Since {
    pub(super) since: Option<i64>,
}

/// The poll-answer faults one request carries.
struct PollFaults {
    ignore_since: bool,
    resend: bool,
    damage: Damage,
    big: Option<FaultKind>,
}

impl PollFaults {
    fn take(sim: &Sim, id: &str) -> Self {
        Self {
            ignore_since: sim.faults.take_flag("events", id, &FaultKind::IgnoreSince),
            resend: sim.faults.take_flag("events", id, &FaultKind::Resend),
            damage: Damage::take(&sim.faults, "events", id),
            big: sim
                .faults
                .take("events", id, |k| matches!(k, FaultKind::BigAnswer { .. })),
        }
    }
}

/// `GET /v1/agent-runs/{id}/events?since=N`: one page of events after `since`.
pub(super) async fn events(
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
    let faults = PollFaults::take(&sim, &id);
    let since = if faults.ignore_since { 0 } else { asked };
    let Some(body) = poll_page(&sim, &id, since, &faults) else {
        return error(StatusCode::NOT_FOUND, "Run not found");
    };
    sim.record("events", Some(&id), Some(asked), 200);
    if let Some(FaultKind::BigAnswer { bytes }) = faults.big {
        return padded(body, bytes);
    }
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The poll answer's JSON, `None` for an unknown run.
fn poll_page(sim: &Sim, id: &str, since: i64, faults: &PollFaults) -> Option<String> {
    let now = Instant::now();
    let runs = sim.lock_runs();
    let run = runs.get(id)?;
    let visible: Vec<&SimEvent> = run
        .visible_events(now)
        .iter()
        .filter(|e| faults.damage.keeps(e))
        .collect();
    let first_new = visible.partition_point(|e| e.sequence <= since);
    let first = if faults.resend {
        first_new.saturating_sub(2)
    } else {
        first_new
    };
    let last = (first_new + sim.page_size).min(visible.len());
    let events: Vec<String> = visible[first..last]
        .iter()
        .map(|e| faults.damage.event_json(e))
        .collect();
    // While a page is cut short, report the run as still running.
    let status = if last < visible.len() {
        "running"
    } else {
        run.status(now)
    };
    Some(format!(
        r#"{{"events":[{}],"runStatus":{},"currentPhase":{}}}"#,
        events.join(","),
        json!(status),
        json!(run.phase(now))
    ))
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

/// `GET /_sim/requests`: the request log.
pub(super) async fn requests(State(sim): Shared) -> Response {
    axum::Json(sim.log.snapshot()).into_response()
}

/// `POST /_sim/faults`: one more fault, as a scenario's `[[faults]]` writes it.
pub(super) async fn add_fault(
    State(sim): Shared,
    axum::Json(fault): axum::Json<Fault>,
) -> Response {
    sim.faults.add(fault);
    StatusCode::NO_CONTENT.into_response()
}

/// `GET /_sim/faults`: the injected faults as they stand, and how many uses
/// of counted faults are left (`left`; 0 once every counted fault fired).
pub(super) async fn list_faults(State(sim): Shared) -> Response {
    let faults = sim.faults.snapshot();
    let left = sim.faults.left();
    axum::Json(json!({ "left": left, "faults": faults })).into_response()
}
