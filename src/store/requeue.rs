//! Stored events queued again by the time they were recorded: `runhook
//! replay --since` (the same delivery rows, so the same ids) and `runhook
//! backfill` (new delivery rows for a sink that was added after the events
//! were recorded). Both reach only what retention kept: delivered events
//! are pruned after `state.retain`.
//!
//! Both walk the events in ingest order, a chunk of [`MAINTENANCE_CHUNK`]
//! per writer job, so they never hold the writer long. Ingest order is age
//! order, so a walk ends at the first event seen at or after the range's end
//! (as the prune's walk does). Rows are queued in event order within each
//! run: the delivery loops take a run's pending deliveries by event, so
//! per-run order holds for what is queued. A delivery that is pending
//! already is never touched and never doubled: a sink has one row per event.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rusqlite::{Connection, params};

use super::retention::MAINTENANCE_CHUNK;
use super::runs::bump_control;
use super::{Store, StoreError, now_ms};

/// Events recorded (`seen_at`, unix ms) in `since..until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub since: i64,
    pub until: i64,
}

/// What `replay --since` queues again.
#[derive(Debug, Clone)]
pub struct RequeueFilter {
    pub range: TimeRange,
    pub sink: Option<String>,
    pub run: Option<String>,
    /// Delivered ones too, not only dead letters: a receiver that lost its
    /// database gets the range again, under the same ids.
    pub delivered: bool,
}

/// A stored event with what routing looks at, for a backfill.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub event_type: String,
    pub run_id: String,
    /// The run's labels now (the runs table keeps only the current ones).
    pub labels: BTreeMap<String, String>,
    pub run_status: Option<String>,
    pub phase: Option<String>,
}

/// What a backfill did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backfilled {
    /// Deliveries queued for the sink.
    pub queued: usize,
    /// Events its routes match, left out because the sink already has a
    /// later event of their run (queued, sent or dead): sent now, they would
    /// break its per-run order.
    pub skipped: usize,
    /// Events its routes match, left out because they were recorded before
    /// the last prune's cutoff: their delivered rows may be gone, so whether
    /// the sink received them cannot be told.
    pub before_prune: usize,
}

/// How far a walk got: the last event it looked at, or the end.
type Next = Option<i64>;

impl Store {
    /// Queues again, with the same ids and fresh attempts, the deliveries of
    /// events recorded in the range that are dead (and delivered, with
    /// `delivered`). Returns how many.
    pub async fn requeue_range(&self, filter: RequeueFilter) -> Result<usize, StoreError> {
        let mut queued = 0;
        let mut after = 0;
        loop {
            let filter = filter.clone();
            let (chunk, next) = self
                .write(move |conn| requeue_chunk(conn, &filter, after))
                .await?;
            queued += chunk;
            match next {
                Some(last) => after = last,
                None => return Ok(queued),
            }
        }
    }

    /// Gives `sink` a delivery of every event recorded in the range (of
    /// `run`, when named) that `routed` says it would get, unless it has one
    /// already, whatever its state. Returns how many were queued.
    pub async fn backfill<F>(
        &self,
        sink: Arc<str>,
        range: TimeRange,
        run: Option<String>,
        routed: F,
    ) -> Result<Backfilled, StoreError>
    where
        F: Fn(&StoredEvent) -> bool + Send + Sync + 'static,
    {
        let routed = Arc::new(routed);
        let mut done = Backfilled::default();
        let mut after = 0;
        loop {
            let (sink, run, routed) = (sink.clone(), run.clone(), routed.clone());
            let (chunk, next) = self
                .write(move |conn| {
                    backfill_chunk(conn, &sink, range, run.as_deref(), &*routed, after)
                })
                .await?;
            done.queued += chunk.queued;
            done.skipped += chunk.skipped;
            done.before_prune += chunk.before_prune;
            match next {
                Some(last) => after = last,
                None => return Ok(done),
            }
        }
    }
}

/// One event's deliveries back to pending (of sink `?2`, when given): the
/// dead ones, and the delivered ones when `?4`. A pending one is not
/// touched.
const REQUEUE_EVENT: &str = concat!(
    "UPDATE deliveries INDEXED BY deliveries_by_event SET state = ",
    delivery_state!(pending),
    ", attempts = 0, next_attempt_at = ?3, queued_at = ?3, done_at = NULL
     WHERE event = ?1 AND (?2 IS NULL OR sink = ?2)
       AND (state = ",
    delivery_state!(dead),
    " OR (?4 AND state = ",
    delivery_state!(done),
    "))"
);

/// The next events in ingest order after `?1`, with what routing needs.
const WALK_EVENTS: &str = "SELECT e.rowid, e.seen_at, e.run_id, e.event_type, e.run_status,
        e.phase, r.labels
     FROM events e LEFT JOIN runs r ON r.run_id = e.run_id
     WHERE e.rowid > ?1 ORDER BY e.rowid LIMIT ?2";

/// One event of a walk.
struct Walked {
    rowid: i64,
    seen_at: i64,
    event: StoredEvent,
}

/// Up to [`MAINTENANCE_CHUNK`] events after `after` recorded in `range`, and
/// where the next chunk starts.
fn walk(
    conn: &Connection,
    range: TimeRange,
    run: Option<&str>,
    after: i64,
) -> Result<(Vec<Walked>, Next), rusqlite::Error> {
    let mut stmt = conn.prepare_cached(WALK_EVENTS)?;
    let mut rows = stmt.query(params![after, MAINTENANCE_CHUNK as i64])?;
    let mut found = Vec::new();
    let (mut walked, mut last) = (0, after);
    while let Some(row) = rows.next()? {
        let (rowid, seen_at): (i64, i64) = (row.get(0)?, row.get(1)?);
        if seen_at >= range.until {
            return Ok((found, None));
        }
        walked += 1;
        last = rowid;
        let run_id: String = row.get(2)?;
        if seen_at < range.since || run.is_some_and(|r| r != run_id) {
            continue;
        }
        let labels: Option<String> = row.get(6)?;
        found.push(Walked {
            rowid,
            seen_at,
            event: StoredEvent {
                run_id,
                event_type: row.get(3)?,
                run_status: row.get(4)?,
                phase: row.get(5)?,
                labels: labels
                    .and_then(|l| serde_json::from_str(&l).ok())
                    .unwrap_or_default(),
            },
        });
    }
    Ok((found, (walked == MAINTENANCE_CHUNK).then_some(last)))
}

fn requeue_chunk(
    conn: &Connection,
    filter: &RequeueFilter,
    after: i64,
) -> Result<(usize, Next), rusqlite::Error> {
    let (events, next) = walk(conn, filter.range, filter.run.as_deref(), after)?;
    let mut requeue = conn.prepare_cached(REQUEUE_EVENT)?;
    let now = now_ms();
    let mut queued = 0;
    for walked in &events {
        queued += requeue.execute(params![walked.rowid, filter.sink, now, filter.delivered])?;
    }
    if queued > 0 {
        bump_control(conn)?;
    }
    Ok((queued, next))
}

fn backfill_chunk(
    conn: &Connection,
    sink: &str,
    range: TimeRange,
    run: Option<&str>,
    routed: &dyn Fn(&StoredEvent) -> bool,
    after: i64,
) -> Result<(Backfilled, Next), rusqlite::Error> {
    // Recorded before the last prune's cutoff: its delivered rows may be
    // gone, so "the sink has none" would be a guess (it may have received it).
    let pruned_before = super::retention::pruned_before(conn)?;
    let (events, next) = walk(conn, range, run, after)?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO deliveries (sink, event, run_id, next_attempt_at, queued_at)
         VALUES (?1, ?2, ?3, ?4, ?4)
         ON CONFLICT DO NOTHING",
    )?;
    let now = now_ms();
    let mut done = Backfilled::default();
    let mut newest: HashMap<&str, Option<i64>> = HashMap::new();
    let mut has_row =
        conn.prepare_cached("SELECT 1 FROM deliveries WHERE sink = ?1 AND event = ?2")?;
    for walked in events.iter().filter(|w| routed(&w.event)) {
        let run_id = walked.event.run_id.as_str();
        let before_prune = walked.seen_at < pruned_before;
        let newest = match newest.get(run_id) {
            Some(found) => *found,
            None => {
                let found = newest_with_a_row(conn, sink, run_id)?;
                newest.insert(run_id, found);
                found
            }
        };
        let out_of_order = newest.is_some_and(|newest| walked.rowid < newest);
        if before_prune || out_of_order {
            // One the sink has already is neither queued nor left out.
            if !has_row.exists(params![sink, walked.rowid])? {
                if before_prune {
                    done.before_prune += 1;
                } else {
                    done.skipped += 1;
                }
            }
            continue;
        }
        done.queued += insert.execute(params![sink, walked.rowid, run_id, now])?;
    }
    if done.queued > 0 {
        bump_control(conn)?;
    }
    Ok((done, next))
}

/// The newest event of `run_id` that `sink` has a delivery row for, in any
/// state (pending, maybe in flight right now, done or dead): a backfilled
/// event older than it would reach the sink after a later event of its run
/// (guarantee 4), so it is skipped. Read inside the chunk's transaction, so
/// no delivery can slip in between. Through the run's event ids (their
/// unique index) and the deliveries' key: done rows have no index by run.
fn newest_with_a_row(
    conn: &Connection,
    sink: &str,
    run_id: &str,
) -> Result<Option<i64>, rusqlite::Error> {
    conn.prepare_cached(
        "SELECT MAX(e.rowid) FROM events e
         WHERE e.id >= ?2 || ':' AND e.id < ?2 || ';' AND e.run_id = ?2
           AND EXISTS (SELECT 1 FROM deliveries d WHERE d.sink = ?1 AND d.event = e.rowid)",
    )?
    .query_row(params![sink, run_id], |row| row.get(0))
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;
    use crate::store::{Batch, DeadFilter, Failure, NewEvent, Reader};

    const RUN: &str = "run-1";

    async fn store_with_events(types: &[&str], sinks: &[&str]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let labels = BTreeMap::from([("team".to_owned(), "rome".to_owned())]);
        store
            .subscribe(RUN.into(), labels, "watch", None)
            .await
            .unwrap();
        let events = types
            .iter()
            .enumerate()
            .map(|(i, event_type)| NewEvent {
                sequence: i as i64 + 1,
                event_type: (*event_type).to_owned(),
                payload: RawValue::from_string(format!("{{\"n\":{i}}}")).unwrap(),
                created_at: None,
                sinks: sinks.iter().map(|s| Arc::from(*s)).collect(),
            })
            .collect();
        store
            .record_batch(Batch {
                run_id: RUN.into(),
                events,
                run_status: Some("running".into()),
                phase: None,
                finish: None,
                stalled: None,
            })
            .await
            .unwrap();
        (dir, store)
    }

    /// Event N (1-based) was seen at N seconds.
    async fn seen_at_their_sequence(store: &Store) {
        store
            .write(|conn| conn.execute("UPDATE events SET seen_at = sequence * 1000", []))
            .await
            .unwrap();
    }

    async fn pending_ids(reader: &Reader, sink: &str) -> Vec<String> {
        let pending = reader.pending_in_order(sink, 100_000).await.unwrap();
        pending.into_iter().map(|p| p.id).collect()
    }

    fn range(since_s: i64, until_s: i64) -> TimeRange {
        TimeRange {
            since: since_s * 1000,
            until: until_s * 1000,
        }
    }

    async fn kill(store: &Store, sink: &str, events: Vec<i64>) {
        let failure = Failure {
            events,
            status: Some(500),
            error: "down".into(),
            next_attempt_at: 0,
            dead: true,
        };
        store
            .record_failure(Arc::from(sink), failure)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn requeue_range_takes_dead_letters_and_delivered_ones_only_when_asked() {
        let (_dir, store) = store_with_events(&["A"; 5], &["a"]).await;
        seen_at_their_sequence(&store).await;
        let reader = store.reader().unwrap();
        // Rows 1..=5: 1 done (out of range), 2 dead, 3 pending with an
        // attempt, 4 done, 5 dead (out of range).
        store
            .mark_delivered(Arc::from("a"), vec![1, 4], None)
            .await
            .unwrap();
        kill(&store, "a", vec![2, 5]).await;
        let retry = Failure {
            events: vec![3],
            status: Some(503),
            error: "busy".into(),
            next_attempt_at: 0,
            dead: false,
        };
        store.record_failure(Arc::from("a"), retry).await.unwrap();
        let filter = |delivered| RequeueFilter {
            range: range(2, 5),
            sink: None,
            run: None,
            delivered,
        };

        assert_eq!(store.requeue_range(filter(false)).await.unwrap(), 1);
        assert_eq!(pending_ids(&reader, "a").await, ["run-1:2", "run-1:3"]);
        assert_eq!(store.requeue_range(filter(true)).await.unwrap(), 1);
        let pending = reader.pending_in_order("a", 10).await.unwrap();
        let ids: Vec<&str> = pending.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["run-1:2", "run-1:3", "run-1:4"], "in event order");
        assert_eq!(
            pending[1].attempts, 1,
            "a pending delivery is left as it was"
        );
        assert_eq!(pending[0].attempts, 0, "a requeued one starts afresh");
        let dead = reader.dead_letters(None, None).await.unwrap();
        assert_eq!(dead.len(), 1, "event 5 was seen after the range: {dead:?}");
    }

    #[tokio::test]
    async fn requeue_range_keeps_to_the_sink_and_run_asked_for() {
        let (_dir, store) = store_with_events(&["A"; 2], &["a", "b"]).await;
        kill(&store, "a", vec![1, 2]).await;
        kill(&store, "b", vec![1, 2]).await;
        let everything = range(0, i64::MAX / 1000);
        let only = |sink: &str, run: &str| RequeueFilter {
            range: everything,
            sink: Some(sink.into()),
            run: Some(run.into()),
            delivered: false,
        };
        assert_eq!(store.requeue_range(only("a", "run-2")).await.unwrap(), 0);
        assert_eq!(store.requeue_range(only("a", RUN)).await.unwrap(), 2);
        let replayed = store.replay(DeadFilter::default()).await.unwrap();
        assert_eq!(replayed, 2, "b's dead letters were left alone");
    }

    #[tokio::test]
    async fn backfill_queues_what_routing_picks_once_in_event_order() {
        let (_dir, store) = store_with_events(&["A", "B", "A", "A", "B", "A"], &["old"]).await;
        seen_at_their_sequence(&store).await;
        let reader = store.reader().unwrap();
        let wants_a = |event: &StoredEvent| {
            event.event_type == "A" && event.labels.get("team").map(String::as_str) == Some("rome")
        };
        let queued = store
            .backfill(Arc::from("new"), range(2, 6), None, wants_a)
            .await
            .unwrap()
            .queued;
        assert_eq!(queued, 2, "events 3 and 4: A, seen in the range");
        assert_eq!(pending_ids(&reader, "new").await, ["run-1:3", "run-1:4"]);
        // Again over a wider range: 3 and 4 are not doubled, 6 joins; 1 is
        // left out, as the sink has later events of its run already (3 was
        // sent): sent now, it would come after them.
        store
            .mark_delivered(Arc::from("new"), vec![3], None)
            .await
            .unwrap();
        let done = store
            .backfill(Arc::from("new"), range(0, 7), None, wants_a)
            .await
            .unwrap();
        assert_eq!(
            done,
            Backfilled {
                queued: 1,
                skipped: 1,
                before_prune: 0
            }
        );
        assert_eq!(pending_ids(&reader, "new").await, ["run-1:4", "run-1:6"]);
        let none = store
            .backfill(Arc::from("new"), range(0, 7), Some("run-2".into()), wants_a)
            .await
            .unwrap();
        assert_eq!(none, Backfilled::default(), "another run");
    }

    /// Left out for the prune only when the sink has no row for the event:
    /// a dead letter it still holds is "already had", not a guess.
    #[tokio::test]
    async fn backfill_counts_only_rowless_events_as_before_the_prune() {
        let (_dir, store) = store_with_events(&["A", "A", "A"], &["a"]).await;
        kill(&store, "a", vec![1]).await;
        store
            .mark_delivered(Arc::from("a"), vec![2, 3], None)
            .await
            .unwrap();
        store.prune(now_ms() + 60_000).await.unwrap();
        let everything = range(0, i64::MAX / 1000);
        let done = store
            .backfill(Arc::from("a"), everything, None, |_| true)
            .await
            .unwrap();
        assert_eq!(done, Backfilled::default(), "r:1 is a's dead letter");
    }

    #[tokio::test]
    async fn backfill_and_requeue_walk_past_one_chunk() {
        let n = MAINTENANCE_CHUNK + 7;
        let (_dir, store) = store_with_events(&vec!["A"; n], &["a"]).await;
        let everything = range(0, i64::MAX / 1000);
        let queued = store
            .backfill(Arc::from("b"), everything, None, |_| true)
            .await
            .unwrap()
            .queued;
        assert_eq!(queued, n);
        let rows: Vec<i64> = (1..=n as i64).collect();
        store
            .mark_delivered(Arc::from("b"), rows, None)
            .await
            .unwrap();
        let filter = RequeueFilter {
            range: everything,
            sink: Some("b".into()),
            run: None,
            delivered: true,
        };
        assert_eq!(store.requeue_range(filter).await.unwrap(), n);
    }
}
