//! The file sink's loop: its backlog in ingest order (which is per-run
//! order), a batch per write and fsync.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::retry::failure_rows;
use crate::config::DeliveryPolicy;
use crate::sink::file::FileSink;
use crate::sink::{Event, Outcome, write_envelope_line};
use crate::store::{Fence, Pending, State, StateError, now_ms};

/// Deliveries fetched and written per file write.
const FILE_BATCH: usize = 2048;
/// Payload bytes written per file write, at most (and at least one line):
/// large payloads make smaller batches rather than a huge write buffer.
const FILE_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Delivers a file sink's backlog in ingest order (which is per-run order),
/// a batch per write and fsync. A file fails as a whole, so its head waits out
/// the backoff and everything behind it waits too.
///
/// The sink is held, not a run: its batches span runs. On SQLite the daemon
/// lock is the fence, as for every write. On PostgreSQL the loop first
/// claims the sink's lease (waiting while another process of the same node
/// holds it), renews it while it writes, and when the lease is lost (a write
/// refused, or no renewal for two thirds of a ttl) stops writing and claims
/// again; at shutdown it releases the lease for the node's next process.
///
/// A store error does not end the loop: it backs off, then reconciles with
/// the file's tail again (lines written but not yet marked done are marked,
/// not written twice) and carries on. Returns at shutdown.
pub async fn run_file_sink(
    name: Arc<str>,
    file: Arc<FileSink>,
    policy: DeliveryPolicy,
    state: State,
    shutdown: CancellationToken,
) -> Result<(), StateError> {
    loop {
        let Some(fence) = claim_sink(&name, &state, &shutdown).await else {
            return Ok(());
        };
        // Cancelled when the lease is lost, or once the writing has ended.
        let held = CancellationToken::new();
        let writing = async {
            let result =
                deliver_while_held(&name, &file, &policy, &state, &fence, &held, &shutdown).await;
            held.cancel();
            result
        };
        let (result, ()) = tokio::join!(writing, keep_sink(&name, &state, &fence, &held));
        match result {
            Ok(()) if shutdown.is_cancelled() => {
                if let Err(error) = state.release_sink(&fence).await {
                    tracing::warn!(sink = %name, %error, "file sink: could not release its lease; the node's next process waits for it to expire");
                }
                return Ok(());
            }
            Ok(()) => {}
            Err(error) if error.fence_refused() => {
                tracing::warn!(sink = %name, %error, "file sink: lease lost; stopped writing, claiming it again");
            }
            Err(error) => return Err(error),
        }
    }
}

/// The sink's fence, once no other process holds it; `None` at shutdown.
async fn claim_sink(name: &Arc<str>, state: &State, shutdown: &CancellationToken) -> Option<Fence> {
    let mut waiting = false;
    let mut store_errors = 0;
    loop {
        let wait = match state.claim_sink(name).await {
            Ok(Some(fence)) => {
                if waiting {
                    tracing::info!(sink = %name, "file sink: lease claimed; writing");
                }
                return Some(fence);
            }
            Ok(None) => {
                if !waiting {
                    tracing::info!(sink = %name, "file sink: another process of this node holds its lease; waiting for it to end");
                    waiting = true;
                }
                store_errors = 0;
                renew_every(state)
            }
            Err(error) => {
                store_errors += 1;
                let wait = super::store_backoff(store_errors);
                tracing::warn!(sink = %name, %error, ?wait, "file sink: cannot claim its lease; retrying");
                wait
            }
        };
        if crate::ingest::sleep_or_cancel(wait, shutdown).await {
            return None;
        }
    }
}

/// How often a sink's lease is renewed (and a held one claimed again).
fn renew_every(state: &State) -> Duration {
    state
        .sink_lease_ttl()
        .map_or(Duration::from_secs(1), |ttl| ttl / 3)
}

/// Renews the sink's lease until `held` is cancelled; cancels it when the
/// lease was lost or could not be renewed within two thirds of a ttl of the
/// last renewal sent, before the server can hand it to another process.
/// On SQLite there is nothing to renew.
async fn keep_sink(name: &Arc<str>, state: &State, fence: &Fence, held: &CancellationToken) {
    let Some(ttl) = state.sink_lease_ttl() else {
        held.cancelled().await;
        return;
    };
    let trust = ttl * 2 / 3;
    let mut trusted_until = tokio::time::Instant::now() + trust;
    loop {
        if crate::ingest::sleep_or_cancel(ttl / 3, held).await {
            return;
        }
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout_at(trusted_until, state.renew_sink(fence)).await {
            Ok(Ok(true)) => trusted_until = sent + trust,
            Ok(Ok(false)) => {
                tracing::warn!(sink = %name, "file sink: lease taken over by another process; stopping");
                held.cancel();
                return;
            }
            Ok(Err(error)) if tokio::time::Instant::now() < trusted_until => {
                tracing::warn!(sink = %name, %error, "file sink: cannot renew its lease; retrying");
            }
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(sink = %name, "file sink: lease not renewed in time; stopping before it can expire");
                held.cancel();
                return;
            }
        }
    }
}

/// Writes under `fence` until shutdown (`Ok`), the lease is lost (`Ok`,
/// `held` cancelled) or a write is refused for its fence (`Err`). A store
/// error backs off and starts over with a reconciliation.
async fn deliver_while_held(
    name: &Arc<str>,
    file: &Arc<FileSink>,
    policy: &DeliveryPolicy,
    state: &State,
    fence: &Fence,
    held: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), StateError> {
    let mut store_errors = 0;
    loop {
        let started = tokio::time::Instant::now();
        let error = match deliver_file(name, file, policy, state, fence, held, shutdown).await {
            Ok(()) => return Ok(()),
            Err(error) if error.fence_refused() => return Err(error),
            Err(error) => error,
        };
        if started.elapsed() > STORE_ERRORS_FORGOTTEN {
            store_errors = 0;
        }
        store_errors += 1;
        let wait = super::store_backoff(store_errors);
        tracing::warn!(sink = %name, %error, ?wait, "file sink: state database error; reconciling with the file and retrying");
        if crate::ingest::sleep_or_cancel(wait, shutdown).await {
            return Ok(());
        }
    }
}

/// A pass that ran this long without a store error starts the backoff afresh.
const STORE_ERRORS_FORGOTTEN: Duration = Duration::from_secs(30);

/// Reconciles with the file's tail, then writes batches until shutdown
/// or the lease is lost (`Ok`), or a store error.
async fn deliver_file(
    name: &Arc<str>,
    file: &Arc<FileSink>,
    policy: &DeliveryPolicy,
    state: &State,
    fence: &Fence,
    held: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), StateError> {
    recover_file(name, file, state, fence).await?;
    let mut commits = state.commits();
    loop {
        if held.is_cancelled() {
            // Lost: whoever holds the sink now writes; a batch written here
            // could not be marked anyway.
            return Ok(());
        }
        commits.borrow_and_update();
        if file.needs_recovery() {
            // A failed write could not be cut back: reconcile before writing.
            recover_file(name, file, state, fence).await?;
            if file.needs_recovery()
                && crate::ingest::sleep_or_cancel(RECOVERY_RETRY, shutdown).await
            {
                return Ok(());
            }
            continue;
        }
        let batch = state.pending_in_order(name, FILE_BATCH).await?;
        let Some(head) = batch.first() else {
            tokio::select! {
                _ = commits.changed() => continue,
                // A replay from the command line commits in another process.
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                _ = shutdown.cancelled() => return Ok(()),
            }
        };
        let wait = head.next_attempt_at - now_ms();
        if wait > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => continue,
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
        write_file_batch(name, file, policy, state, fence, batch).await?;
    }
}

/// How soon a file whose tail could not be reconciled is tried again.
const RECOVERY_RETRY: Duration = Duration::from_secs(1);

async fn recover_file(
    name: &Arc<str>,
    file: &Arc<FileSink>,
    state: &State,
    fence: &Fence,
) -> Result<(), StateError> {
    let offset = state.sink_offset(name).await?;
    let sink = file.clone();
    let recovery = match tokio::task::spawn_blocking(move || sink.recover(offset)).await {
        Ok(Ok(recovery)) => recovery,
        Ok(Err(error)) => {
            tracing::error!(sink = %name, %error, "file sink: cannot read the file tail");
            return Ok(());
        }
        Err(_) => return Ok(()),
    };
    if recovery.torn_bytes > 0 {
        tracing::warn!(sink = %name, bytes = recovery.torn_bytes, "file sink: cut a torn last line");
    }
    let marked = state
        .mark_found_delivered(fence, name.clone(), recovery.ids, recovery.offset)
        .await?;
    if marked > 0 {
        tracing::info!(sink = %name, marked, "file sink: lines written before a crash marked done");
    }
    Ok(())
}

/// Writes one batch with one fsync and records the outcome.
async fn write_file_batch(
    name: &Arc<str>,
    file: &Arc<FileSink>,
    policy: &DeliveryPolicy,
    state: &State,
    fence: &Fence,
    mut batch: Vec<Pending>,
) -> Result<(), StateError> {
    // The rest stays pending, first in the next batch.
    batch.truncate(within_bytes(&batch, FILE_BATCH_BYTES));
    let (lines, events) = encode_batch(name, policy, state, fence, &batch).await?;
    let sink = file.clone();
    let written = tokio::task::spawn_blocking(move || sink.append(&lines))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    match written {
        Ok(offset) => record_written(name, state, fence, batch, events, offset).await,
        Err(error) => {
            record_write_failure(name, policy, state, fence, &batch, &events, error).await
        }
    }
}

/// The batch's lines, and the events they carry (ascending). An event that
/// cannot be encoded is dead-lettered here, so the rest still goes out.
async fn encode_batch(
    name: &Arc<str>,
    policy: &DeliveryPolicy,
    state: &State,
    fence: &Fence,
    batch: &[Pending],
) -> Result<(Vec<u8>, Vec<i64>), StateError> {
    let mut lines = Vec::with_capacity(batch.len() * 256);
    let mut events = Vec::with_capacity(batch.len());
    for pending in batch {
        let start = lines.len();
        if let Err(error) = write_envelope_line(&Event::from(pending), &mut lines) {
            // Stored payloads were JSON when recorded; this is corruption.
            lines.truncate(start);
            tracing::error!(sink = %name, id = %pending.id, %error, "cannot encode event; dead-lettering it");
            let outcome = Outcome::Permanent {
                status: None,
                error: format!("cannot encode event: {error}"),
            };
            let attempt = pending.attempts + 1;
            for failure in failure_rows(policy, outcome, attempt, &[pending], now_ms()) {
                state.record_failure(fence, name.clone(), failure).await?;
            }
            continue;
        }
        events.push(pending.event);
    }
    Ok((lines, events))
}

/// The lines are in the file up to `offset`: marks their deliveries done.
async fn record_written(
    name: &Arc<str>,
    state: &State,
    fence: &Fence,
    batch: Vec<Pending>,
    events: Vec<i64>,
    offset: u64,
) -> Result<(), StateError> {
    crate::crashpoint::hit("file.before_mark");
    // Exactly the rows written: a range would also take a delivery
    // that `runhook replay` made pending meanwhile, without its line.
    state
        .mark_delivered(fence, name.clone(), events.clone(), Some(offset))
        .await?;
    // Lines that could not be encoded were dead-lettered above.
    let delivered: Vec<Pending> = batch
        .into_iter()
        .filter(|p| events.binary_search(&p.event).is_ok())
        .collect();
    super::count_delivered(name, &delivered);
    Ok(())
}

/// The batch failed as a whole, but each delivery counts its own attempts
/// and age: only those that have run out are dead-lettered.
async fn record_write_failure(
    name: &Arc<str>,
    policy: &DeliveryPolicy,
    state: &State,
    fence: &Fence,
    batch: &[Pending],
    events: &[i64],
    error: std::io::Error,
) -> Result<(), StateError> {
    let attempts = batch[0].attempts + 1;
    let written: Vec<&Pending> = batch
        .iter()
        .filter(|p| events.binary_search(&p.event).is_ok())
        .collect();
    let outcome = Outcome::Retry {
        status: None,
        error: error.to_string(),
        after: None,
    };
    let failures = failure_rows(policy, outcome, attempts, &written, now_ms());
    let dead: usize = failures
        .iter()
        .filter(|f| f.dead)
        .map(|f| f.events.len())
        .sum();
    tracing::warn!(sink = %name, %error, attempts, dead, "file sink: write failed");
    for failure in failures {
        let metrics = crate::metrics::metrics();
        metrics
            .deliveries
            .with_label_values(&[&**name, if failure.dead { "dead" } else { "retry" }])
            .inc_by(failure.events.len() as u64);
        state.record_failure(fence, name.clone(), failure).await?;
    }
    Ok(())
}

/// How many deliveries from the head of `batch` fit in `cap` payload bytes;
/// at least one, so a payload larger than `cap` still goes out alone.
fn within_bytes(batch: &[Pending], cap: usize) -> usize {
    let mut total = 0usize;
    let fits = batch
        .iter()
        .take_while(|pending| {
            total = total.saturating_add(pending.payload.len());
            total <= cap
        })
        .count();
    fits.max(batch.len().min(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Failure;

    fn pending(payload_bytes: usize) -> Pending {
        Pending {
            payload: format!("\"{}\"", "x".repeat(payload_bytes.saturating_sub(2))),
            ..Pending::sample(1)
        }
    }

    #[test]
    fn a_batch_is_bounded_in_payload_bytes() {
        let small: Vec<Pending> = (0..100).map(|_| pending(10)).collect();
        assert_eq!(within_bytes(&small, 1000), 100);
        let big: Vec<Pending> = (0..10).map(|_| pending(400)).collect();
        assert_eq!(within_bytes(&big, 1000), 2);
        assert_eq!(
            within_bytes(&[pending(5000), pending(1)], 1000),
            1,
            "one, however large"
        );
        assert_eq!(within_bytes(&[], 1000), 0);
    }

    /// A store in a temp dir with one file sink, `archive`, and these
    /// events recorded in this order, each routed to it.
    async fn store_with(events: &[(&str, i64)]) -> (tempfile::TempDir, State, Arc<str>) {
        use crate::store::{Batch, NewEvent, Sqlite};
        let dir = tempfile::tempdir().unwrap();
        let state = State::Sqlite(Sqlite::open_path(&dir.path().join("state.db")).unwrap());
        let name: Arc<str> = Arc::from("archive");
        for (run, sequence) in events {
            state
                .subscribe(run.to_string(), Default::default(), "watch", None)
                .await
                .unwrap();
            let event = NewEvent {
                sequence: *sequence,
                event_type: "T".into(),
                payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
                created_at: None,
                sinks: vec![name.clone()],
            };
            let batch = Batch {
                run_id: run.to_string(),
                events: vec![event],
                run_status: None,
                phase: None,
                finish: None,
                stalled: None,
            };
            state.record_batch(&Fence::Exclusive, batch).await.unwrap();
        }
        (dir, state, name)
    }

    fn dead(event: i64) -> Failure {
        Failure {
            events: vec![event],
            status: None,
            error: "gone".into(),
            next_attempt_at: 0,
            dead: true,
        }
    }

    /// `runhook replay` commits in another process while a batch is being
    /// written: a dead letter of another run, whose row lies between the
    /// batch's first and last, turns pending again. The batch must mark only
    /// the deliveries it wrote, or the replayed one is "done" without a line.
    #[tokio::test]
    async fn a_batch_marks_only_what_it_wrote() {
        use crate::store::DeadFilter;
        // Rows in ingest order: a:1, b:1, a:2.
        let (dir, state, name) = store_with(&[("run-a", 1), ("run-b", 1), ("run-a", 2)]).await;
        let b1 = state.pending_in_order(&name, 10).await.unwrap()[1].clone();
        assert_eq!(b1.id, "run-b:1");
        state
            .record_failure(&Fence::Exclusive, name.clone(), dead(b1.event))
            .await
            .unwrap();
        let batch = state.pending_in_order(&name, 10).await.unwrap();
        assert_eq!(batch.len(), 2, "a:1 and a:2");
        let replay = DeadFilter {
            run: Some("run-b".into()),
            ..DeadFilter::default()
        };
        assert_eq!(state.replay(replay).await.unwrap(), 1);

        let path = dir.path().join("events.jsonl");
        let file = Arc::new(FileSink::open(&path).unwrap());
        let policy = DeliveryPolicy {
            max_attempts: 3,
            max_age: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
        };
        write_file_batch(&name, &file, &policy, &state, &Fence::Exclusive, batch)
            .await
            .unwrap();
        let still: Vec<String> = state
            .pending_in_order(&name, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(
            still,
            ["run-b:1"],
            "the replayed delivery waits for its line"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
    }

    /// A failed batch whose cut-back failed too leaves whole lines in the
    /// file; one of them may belong to a delivery dead-lettered by that same
    /// failure. Reconciling finds it in the file: it is done, not dead, or a
    /// replay would write it a second time, after later events of its run.
    #[tokio::test]
    async fn a_dead_letter_found_in_the_file_is_done() {
        let (dir, state, name) = store_with(&[("run-a", 1)]).await;
        let pending = state.pending_in_order(&name, 10).await.unwrap();
        state
            .record_failure(&Fence::Exclusive, name.clone(), dead(pending[0].event))
            .await
            .unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"id\":\"run-a:1\"}\n").unwrap();
        let file = Arc::new(FileSink::open(&path).unwrap());
        recover_file(&name, &file, &state, &Fence::Exclusive)
            .await
            .unwrap();
        let dead = state.dead_letters(None, None).await.unwrap();
        assert!(dead.is_empty(), "the line is in the file: {dead:?}");
    }
}
