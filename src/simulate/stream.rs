//! The stream endpoint: one task per SSE connection feeds it the run's
//! events as they come out, heartbeats while none do, `run_finished` at the
//! end, and the stream faults (drops, stalls, error frames, bad bytes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use super::faults::{Damage, FaultKind, Unfired};
use super::frame::{self, run_event_frame, sse_frame};
use super::handlers::{Shared, Since, admit, slow_fault};
use super::scenario::StreamStyle;
use super::state::Sim;

type Tx = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// `GET /v1/agent-runs/{id}/stream?since=N`.
pub(super) async fn stream(
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

/// The client went away.
struct Gone;

/// One connection's sending side, writing bytes in the scenario's style.
struct Wire {
    tx: Tx,
    style: StreamStyle,
}

impl Wire {
    /// Sends `bytes`, after a `: ping` comment with `comments`, in 7-byte
    /// writes with `split` (so a client must join frames across reads).
    async fn send(&self, bytes: Bytes) -> Result<(), Gone> {
        if self.style.comments {
            self.put(Bytes::from_static(b": ping\n")).await?;
        }
        if !self.style.split {
            return self.put(bytes).await;
        }
        for piece in bytes.chunks(7) {
            self.put(Bytes::copy_from_slice(piece)).await?;
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    async fn put(&self, bytes: Bytes) -> Result<(), Gone> {
        self.tx.send(Ok(bytes)).await.map_err(|_| Gone)
    }
}

/// Feeds one stream connection until the run finishes, a fault ends it, or
/// the client goes away.
async fn serve_stream(sim: Arc<Sim>, id: String, since: i64, tx: Tx) {
    let wire = Wire {
        tx,
        style: sim.style.clone(),
    };
    if wire
        .send(Bytes::from_static(frame::PREAMBLE))
        .await
        .is_err()
        || wire.send(sse_frame(&frame::connected(&id))).await.is_err()
    {
        return;
    }
    // One way of ending per connection: the first such fault that matches.
    // Taken now, given back if the connection ends before it fires.
    let ending = sim.faults.take("stream", &id, FaultKind::ends_stream);
    if sim.faults.take_flag("stream", &id, &FaultKind::Resend) {
        let Some(stale) = stale_frames(&sim, &id, since) else {
            return;
        };
        for frame in stale {
            if wire.send(sse_frame(&frame)).await.is_err() {
                return;
            }
        }
    }
    let mut unfired = Unfired {
        faults: &sim.faults,
        run_id: &id,
        kind: ending.clone(),
    };
    let damage = Damage::take(&sim.faults, "stream", &id);
    let mut cursor = since;
    let mut sent = 0usize;
    loop {
        let Some(due) = due(&sim, &id, cursor, &damage, Instant::now()) else {
            return;
        };
        for (sequence, frame) in due.frames {
            if let Some(kind) = ending.as_ref().filter(|k| k.fires_after() <= sent) {
                unfired.kind = None;
                end_with(kind, &frame, &wire).await;
                return;
            }
            if wire.send(sse_frame(&frame)).await.is_err() {
                return;
            }
            sent += 1;
            cursor = sequence;
        }
        if let Some(frame) = due.finished {
            let _ = wire.send(sse_frame(&frame)).await;
            return;
        }
        if wait_for_next(&sim, &id, due.next, &wire).await.is_err() {
            return;
        }
    }
}

/// The `Resend` fault: the two events before `since` again, as a confused
/// proxy might replay them; `None` for an unknown run.
fn stale_frames(sim: &Sim, id: &str, since: i64) -> Option<Vec<String>> {
    let runs = sim.lock_runs();
    let run = runs.get(id)?;
    let visible = run.visible_events(Instant::now());
    let upto = visible.partition_point(|e| e.sequence <= since);
    Some(
        visible[upto.saturating_sub(2)..upto]
            .iter()
            .map(|e| run_event_frame(e, &sim.style))
            .collect(),
    )
}

/// What a connection has to send now.
struct Due {
    /// The events after the cursor, with their sequences.
    frames: Vec<(i64, String)>,
    /// `run_finished`, once the run's status is final.
    finished: Option<String>,
    /// When the next event comes out.
    next: Option<Instant>,
}

/// `None` for an unknown run.
fn due(sim: &Sim, id: &str, cursor: i64, damage: &Damage, now: Instant) -> Option<Due> {
    let runs = sim.lock_runs();
    let run = runs.get(id)?;
    let visible = run.visible_events(now);
    let first = visible.partition_point(|e| e.sequence <= cursor);
    let frames = visible[first..]
        .iter()
        .filter(|e| damage.keeps(e))
        .map(|e| (e.sequence, damage.frame(e, &sim.style)))
        .collect();
    Some(Due {
        frames,
        finished: frame::run_finished(run, id, now, damage),
        next: run.next_emit(now),
    })
}

/// Ends the connection as the stream-ending fault `kind` says, in place of
/// sending `frame`.
async fn end_with(kind: &FaultKind, frame: &str, wire: &Wire) {
    match kind {
        FaultKind::DropStream { .. } => {
            let bytes = sse_frame(frame);
            let _ = wire.send(bytes.slice(..bytes.len() / 2)).await;
            // Let what was sent reach the socket before the reset, as on a
            // real network.
            while wire.tx.capacity() < wire.tx.max_capacity() {
                tokio::task::yield_now().await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = wire
                .tx
                .send(Err(std::io::Error::other("injected drop")))
                .await;
        }
        FaultKind::Stall { .. } => {
            // Silent, connection open, until the client goes away.
            wire.tx.closed().await;
        }
        FaultKind::InvalidUtf8 { .. } => {
            let _ = wire.send(Bytes::from_static(frame::INVALID_UTF8)).await;
            wire.tx.closed().await;
        }
        FaultKind::ErrorFrame { .. } => {
            let _ = wire.send(sse_frame(frame::ERROR)).await;
        }
        _ => {}
    }
}

/// Waits until the run's next event is due, or sends a `status` heartbeat
/// if the heartbeat interval passes first.
async fn wait_for_next(
    sim: &Sim,
    id: &str,
    next: Option<Instant>,
    wire: &Wire,
) -> Result<(), Gone> {
    let heartbeat = tokio::time::sleep(sim.heartbeat);
    let wake = async {
        match next {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = wake => Ok(()),
        _ = heartbeat => {
            let status = sim
                .lock_runs()
                .get(id)
                .map(|run| frame::status(run, Instant::now()));
            match status {
                Some(status) => wire.send(sse_frame(&status)).await,
                None => Ok(()),
            }
        }
    }
}
