//! Deliveries: what a sink has to send next, and the outcome of each
//! attempt (delivered, retry later, dead).

use std::sync::Arc;

use rusqlite::{Row, params};

use super::{DeliveryState, Reader, Store, StoreError, now_ms};

/// A delivery waiting for its sink, with the event it carries.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The event's row: ingest order, the delivery's key within a sink.
    pub event: i64,
    pub id: String,
    pub run_id: String,
    pub sequence: Option<i64>,
    pub event_type: String,
    /// Raw JSON, as received.
    pub payload: String,
    pub created_at: Option<String>,
    pub run_status: Option<String>,
    pub phase: Option<String>,
    /// The run's labels, a JSON object.
    pub labels: String,
    pub attempts: u32,
    pub next_attempt_at: i64,
    /// When runhook recorded the event (unix ms).
    pub seen_at: i64,
    /// When the delivery was queued or replayed (unix ms); `max_age` counts
    /// from here.
    pub queued_at: i64,
}

#[cfg(test)]
impl Pending {
    /// Event `event` of run `r` (id `r:{event}`, type `T`, payload `{}`),
    /// never tried: what unit tests start from, changing a field or two.
    pub(crate) fn sample(event: i64) -> Self {
        Self {
            event,
            id: format!("r:{event}"),
            run_id: "r".into(),
            sequence: Some(event),
            event_type: "T".into(),
            payload: "{}".into(),
            created_at: None,
            run_status: None,
            phase: None,
            labels: "{}".into(),
            attempts: 0,
            next_attempt_at: 0,
            seen_at: 0,
            queued_at: 0,
        }
    }
}

/// A failed delivery attempt of one or more deliveries of a sink.
#[derive(Debug, Clone)]
pub struct Failure {
    pub events: Vec<i64>,
    pub status: Option<u16>,
    pub error: String,
    pub next_attempt_at: i64,
    /// Give up: move to the dead-letter list.
    pub dead: bool,
}

/// The columns [`pending_row`] reads, as a literal for `concat!`.
macro_rules! pending_columns {
    () => {
        "d.event, e.id, e.run_id, e.sequence, e.event_type, e.payload,
    e.created_at, e.run_status, e.phase, r.labels, d.attempts, d.next_attempt_at, e.seen_at, d.queued_at"
    };
}

const PENDING_IN_ORDER: &str = concat!(
    "SELECT ",
    pending_columns!(),
    " FROM deliveries d INDEXED BY deliveries_pending
     JOIN events e ON e.rowid = d.event
     LEFT JOIN runs r ON r.run_id = d.run_id
     WHERE d.sink = ?1 AND d.state = ",
    delivery_state!(pending),
    " ORDER BY d.event LIMIT ?2"
);
const PENDING_FOR_RUN: &str = concat!(
    "SELECT ",
    pending_columns!(),
    " FROM deliveries d INDEXED BY deliveries_pending_by_run
     JOIN events e ON e.rowid = d.event
     LEFT JOIN runs r ON r.run_id = d.run_id
     WHERE d.sink = ?1 AND d.run_id = ?2 AND d.state = ",
    delivery_state!(pending),
    " ORDER BY d.event LIMIT ?3"
);

const MARK_DONE: &str = concat!(
    "UPDATE deliveries SET state = ",
    delivery_state!(done),
    ", attempts = attempts + 1, done_at = ?3,
        last_status = NULL, last_error = NULL
     WHERE sink = ?1 AND event = ?2 AND state = ",
    delivery_state!(pending)
);
const MARK_FAILED: &str = concat!(
    "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?3,
        last_status = ?4, last_error = ?5, state = ?6, done_at = ?7
     WHERE sink = ?1 AND event = ?2 AND state = ",
    delivery_state!(pending)
);
const RELEASE_BACKOFF: &str = concat!(
    "UPDATE deliveries INDEXED BY deliveries_pending SET next_attempt_at = ?2
     WHERE sink = ?1 AND state = ",
    delivery_state!(pending),
    " AND next_attempt_at > ?2"
);
const RUNS_WITH_PENDING: &str = concat!(
    "SELECT DISTINCT run_id FROM deliveries INDEXED BY deliveries_pending_by_run
     WHERE sink = ?1 AND state = ",
    delivery_state!(pending)
);
const PENDING_COUNT: &str = concat!(
    "SELECT COUNT(*) FROM deliveries INDEXED BY deliveries_pending
     WHERE sink = ?1 AND state = ",
    delivery_state!(pending)
);

pub(super) fn pending_row(row: &Row<'_>) -> Result<Pending, rusqlite::Error> {
    Ok(Pending {
        event: row.get(0)?,
        id: row.get(1)?,
        run_id: row.get(2)?,
        sequence: row.get(3)?,
        event_type: row.get(4)?,
        payload: row.get(5)?,
        created_at: row.get(6)?,
        run_status: row.get(7)?,
        phase: row.get(8)?,
        labels: row
            .get::<_, Option<String>>(9)?
            .unwrap_or_else(|| "{}".into()),
        attempts: row.get(10)?,
        next_attempt_at: row.get(11)?,
        seen_at: row.get(12)?,
        queued_at: row.get(13)?,
    })
}

impl Store {
    /// Deliveries that reached their sink. `offset` is how far the sink's
    /// output now stands (a file sink's length after the write), committed
    /// with the deliveries it covers so a restart can tell what lies past it.
    pub async fn mark_delivered(
        &self,
        sink: Arc<str>,
        events: Vec<i64>,
        offset: Option<u64>,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let now = now_ms();
            let mut update = conn.prepare_cached(MARK_DONE)?;
            for event in &events {
                update.execute(params![&*sink, event, now])?;
            }
            conn.prepare_cached(
                "INSERT INTO sinks (name, file_offset, last_success_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET
                    file_offset = COALESCE(excluded.file_offset, file_offset),
                    last_success_at = excluded.last_success_at, down = 0",
            )?
            .execute(params![&*sink, offset.map(|o| o as i64), now])?;
            Ok(())
        })
        .await
    }

    /// A failed attempt: count it and schedule the next, or dead-letter.
    pub async fn record_failure(&self, sink: Arc<str>, failure: Failure) -> Result<(), StoreError> {
        self.write(move |conn| {
            let mut update = conn.prepare_cached(MARK_FAILED)?;
            let (state, done_at) = if failure.dead {
                (DeliveryState::Dead, Some(now_ms()))
            } else {
                (DeliveryState::Pending, None)
            };
            for event in &failure.events {
                update.execute(params![
                    &*sink,
                    event,
                    failure.next_attempt_at,
                    failure.status,
                    failure.error,
                    state,
                    done_at
                ])?;
            }
            Ok(())
        })
        .await
    }

    /// A sink answered again: its backlog is due now rather than at each
    /// delivery's own backoff.
    pub async fn release_backoff(&self, sink: Arc<str>) -> Result<usize, StoreError> {
        self.write(move |conn| conn.execute(RELEASE_BACKOFF, params![&*sink, now_ms()]))
            .await
    }
}

impl Reader {
    /// The first `limit` pending deliveries of a sink in ingest order, due or
    /// not: a sink that fails as a whole (a file) retries its head first.
    pub async fn pending_in_order(
        &self,
        sink: &str,
        limit: usize,
    ) -> Result<Vec<Pending>, StoreError> {
        let sink = sink.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(PENDING_IN_ORDER)?;
            let rows = stmt.query_map(params![sink, limit as i64], pending_row)?;
            rows.collect()
        })
        .await
    }

    /// The runs with pending deliveries for a sink (a full scan: used at
    /// start and after a replay, not per event).
    pub async fn runs_with_pending(&self, sink: &str) -> Result<Vec<String>, StoreError> {
        let sink = sink.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(RUNS_WITH_PENDING)?;
            let rows = stmt.query_map([sink], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    /// The first `limit` pending deliveries of one run for one sink, in order.
    pub async fn pending_for_run(
        &self,
        sink: &str,
        run_id: &str,
        limit: usize,
    ) -> Result<Vec<Pending>, StoreError> {
        let (sink, run_id) = (sink.to_owned(), run_id.to_owned());
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(PENDING_FOR_RUN)?;
            let rows = stmt.query_map(params![sink, run_id, limit as i64], pending_row)?;
            rows.collect()
        })
        .await
    }

    /// Deliveries of one sink not yet done or dead (uses the pending index).
    pub async fn pending_count(&self, sink: &str) -> Result<i64, StoreError> {
        let sink = sink.to_owned();
        self.read(move |conn| conn.query_row(PENDING_COUNT, [sink], |r| r.get(0)))
            .await
    }

    /// Deliveries not yet done or dead, over all sinks.
    pub async fn pending_total(&self) -> Result<i64, StoreError> {
        self.read(|conn| {
            conn.query_row(
                concat!(
                    "SELECT COUNT(*) FROM deliveries WHERE state = ",
                    delivery_state!(pending)
                ),
                [],
                |r| r.get(0),
            )
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;

    /// Every delivery passes through these statements, several times: each
    /// must reach its rows through the index it was written for (the
    /// primary key for a mark, a partial index over pending deliveries for
    /// the rest) and never walk the deliveries done so far, nor sort. An
    /// index dropped or reshaped to dirty fewer pages per mark has to keep
    /// this true.
    #[test]
    fn delivery_statements_use_their_indexes() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        for (name, sql, index) in [
            (
                "pending in order",
                PENDING_IN_ORDER,
                "USING INDEX deliveries_pending (",
            ),
            (
                "pending for run",
                PENDING_FOR_RUN,
                "USING INDEX deliveries_pending_by_run (",
            ),
            (
                "mark done",
                MARK_DONE,
                "USING PRIMARY KEY (sink=? AND event=?)",
            ),
            (
                "mark failed",
                MARK_FAILED,
                "USING PRIMARY KEY (sink=? AND event=?)",
            ),
            (
                "release backoff",
                RELEASE_BACKOFF,
                "USING INDEX deliveries_pending (sink=?)",
            ),
            (
                "runs with pending",
                RUNS_WITH_PENDING,
                "USING COVERING INDEX deliveries_pending_by_run (sink=?)",
            ),
            (
                "pending count",
                PENDING_COUNT,
                "USING COVERING INDEX deliveries_pending (sink=?)",
            ),
        ] {
            let steps = super::super::schema::query_plan(&conn, sql);
            assert!(
                steps.iter().any(|s| s.contains(index)),
                "{name} uses {index}: {steps:#?}"
            );
            for step in &steps {
                let walks_deliveries = (step.starts_with("SCAN d")
                    || step.starts_with("SCAN deliveries"))
                    && !step.contains("INDEX deliveries_pending");
                assert!(!walks_deliveries, "{name} walks the deliveries: {steps:#?}");
                assert!(!step.contains("TEMP B-TREE"), "{name} sorts: {steps:#?}");
            }
        }
    }
}
