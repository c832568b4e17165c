//! Read queries: what the delivery loops fetch, what `status` and `dead`
//! show. They run on their own connections, beside the writer (WAL).

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;

use super::{Reader, StoreError};

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

/// A run ingest should follow.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchedRun {
    pub run_id: String,
    pub labels: BTreeMap<String, String>,
    pub transport: Option<String>,
    pub state: String,
    pub cursor: i64,
    pub run_status: Option<String>,
    /// When the last `run_finished` was recorded (unix ms).
    pub finished_at: Option<i64>,
}

/// One line of `runhook status`.
#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub run_id: String,
    pub watched: bool,
    pub cursor: i64,
    pub status: Option<String>,
    pub phase: Option<String>,
    pub transport: Option<String>,
    pub state: String,
    pub last_error: Option<String>,
    /// `lastEventSequence - cursor` from the last run lookup.
    pub lag: Option<i64>,
    pub last_event_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SinkRow {
    pub sink: String,
    pub pending: i64,
    /// Pending deliveries that failed at least once.
    pub retrying: i64,
    pub done: i64,
    pub dead: i64,
    pub down: bool,
    pub last_success_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub sink: String,
    pub run_id: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub dead_at: Option<i64>,
}

const PENDING_COLUMNS: &str = "d.event, e.id, e.run_id, e.sequence, e.event_type, e.payload,
    e.created_at, e.run_status, e.phase, r.labels, d.attempts, d.next_attempt_at, e.seen_at, d.queued_at";

fn pending_row(row: &Row<'_>) -> Result<Pending, rusqlite::Error> {
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
            let sql = format!(
                "SELECT {PENDING_COLUMNS} FROM deliveries d INDEXED BY deliveries_pending
                 JOIN events e ON e.rowid = d.event
                 LEFT JOIN runs r ON r.run_id = d.run_id
                 WHERE d.sink = ?1 AND d.state = 0 ORDER BY d.event LIMIT ?2"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
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
            let mut stmt = conn.prepare_cached(
                "SELECT DISTINCT run_id FROM deliveries INDEXED BY deliveries_pending_by_run
                 WHERE sink = ?1 AND state = 0",
            )?;
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
            let sql = format!(
                "SELECT {PENDING_COLUMNS} FROM deliveries d INDEXED BY deliveries_pending_by_run
                 JOIN events e ON e.rowid = d.event
                 LEFT JOIN runs r ON r.run_id = d.run_id
                 WHERE d.sink = ?1 AND d.run_id = ?2 AND d.state = 0 ORDER BY d.event LIMIT ?3"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![sink, run_id, limit as i64], pending_row)?;
            rows.collect()
        })
        .await
    }

    /// The thread root a Slack sink keeps for a run: (channel, ts).
    pub async fn slack_thread(
        &self,
        sink: &str,
        run_id: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let (sink, run_id) = (sink.to_owned(), run_id.to_owned());
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT channel, ts FROM slack_threads WHERE sink = ?1 AND run_id = ?2",
            )?
            .query_row(params![sink, run_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
        })
        .await
    }

    /// The newest event row, where `tail` starts.
    pub async fn last_event_row(&self) -> Result<i64, StoreError> {
        self.read(|conn| {
            conn.query_row("SELECT COALESCE(MAX(rowid), 0) FROM events", [], |r| {
                r.get(0)
            })
        })
        .await
    }

    /// Events recorded after row `after`, optionally of one run or type.
    pub async fn events_after(
        &self,
        after: i64,
        run: Option<String>,
        event_type: Option<String>,
        limit: usize,
    ) -> Result<Vec<Pending>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT e.rowid, e.id, e.run_id, e.sequence, e.event_type, e.payload, e.created_at,
                        e.run_status, e.phase, r.labels, 0, 0, e.seen_at, e.seen_at
                 FROM events e LEFT JOIN runs r ON r.run_id = e.run_id
                 WHERE e.rowid > ?1 AND (?2 IS NULL OR e.run_id = ?2) AND (?3 IS NULL OR e.event_type = ?3)
                 ORDER BY e.rowid LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![after, run, event_type, limit as i64], pending_row)?;
            rows.collect()
        })
        .await
    }

    /// Changes whenever `watch`, `unwatch` or `replay` wrote something.
    pub async fn control_generation(&self) -> Result<i64, StoreError> {
        self.read(|conn| {
            conn.query_row("SELECT value FROM meta WHERE key = 'control'", [], |r| {
                r.get(0)
            })
        })
        .await
    }

    pub async fn watched_runs(&self) -> Result<Vec<WatchedRun>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT run_id, labels, transport, state, cursor, run_status, finished_at
                 FROM runs WHERE watched = 1 ORDER BY run_id",
            )?;
            let rows = stmt.query_map([], |row| {
                let labels: String = row.get(1)?;
                Ok(WatchedRun {
                    run_id: row.get(0)?,
                    labels: serde_json::from_str(&labels).unwrap_or_default(),
                    transport: row.get(2)?,
                    state: row.get(3)?,
                    cursor: row.get(4)?,
                    run_status: row.get(5)?,
                    finished_at: row.get(6)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    pub async fn runs(&self) -> Result<Vec<RunRow>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT run_id, watched, cursor, run_status, phase, active_transport, state,
                        last_error, upstream_seq - cursor, last_event_at
                 FROM runs ORDER BY run_id",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok(RunRow {
                    run_id: row.get(0)?,
                    watched: row.get(1)?,
                    cursor: row.get(2)?,
                    status: row.get(3)?,
                    phase: row.get(4)?,
                    transport: row.get(5)?,
                    state: row.get(6)?,
                    last_error: row.get(7)?,
                    lag: row.get(8)?,
                    last_event_at: row.get(9)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    pub async fn sinks(&self) -> Result<Vec<SinkRow>, StoreError> {
        self.read(sink_rows).await
    }

    /// When the first pending delivery of each sink (in ingest order) was
    /// queued or replayed, unix ms: what
    /// `runhook_oldest_pending_delivery_age_seconds` shows. One index seek
    /// per sink, as a scrape must stay cheap on a backlog of millions (the
    /// exact minimum of `queued_at` scans it: 0.5 s for 500,000 rows).
    pub async fn oldest_pending(
        &self,
        sinks: Vec<String>,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT queued_at FROM deliveries INDEXED BY deliveries_pending
                 WHERE sink = ?1 AND state = 0 ORDER BY event LIMIT 1",
            )?;
            let mut oldest = Vec::new();
            for sink in sinks {
                if let Some(at) = stmt.query_row([&sink], |r| r.get(0)).optional()? {
                    oldest.push((sink, at));
                }
            }
            Ok(oldest)
        })
        .await
    }

    pub async fn dead_letters(
        &self,
        sink: Option<String>,
        run: Option<String>,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT e.id, d.sink, d.run_id, d.attempts, d.last_status, d.last_error, d.done_at
                 FROM deliveries d JOIN events e ON e.rowid = d.event
                 WHERE d.state = 2 AND (?1 IS NULL OR d.sink = ?1) AND (?2 IS NULL OR d.run_id = ?2)
                 ORDER BY d.sink, d.event",
            )?;
            let rows = stmt.query_map(params![sink, run], |row| {
                Ok(DeadLetter {
                    id: row.get(0)?,
                    sink: row.get(1)?,
                    run_id: row.get(2)?,
                    attempts: row.get(3)?,
                    last_status: row.get(4)?,
                    last_error: row.get(5)?,
                    dead_at: row.get(6)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// The stored file offset of a file sink.
    pub async fn file_offset(&self, sink: &str) -> Result<Option<u64>, StoreError> {
        let sink = sink.to_owned();
        self.read(move |conn| {
            conn.query_row(
                "SELECT file_offset FROM sinks WHERE name = ?1",
                [sink],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()
            .map(|o| o.flatten().map(|v| v as u64))
        })
        .await
    }

    /// Deliveries of one sink not yet done or dead (uses the pending index).
    pub async fn pending_count(&self, sink: &str) -> Result<i64, StoreError> {
        let sink = sink.to_owned();
        self.read(move |conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM deliveries INDEXED BY deliveries_pending
                 WHERE sink = ?1 AND state = 0",
                [sink],
                |r| r.get(0),
            )
        })
        .await
    }

    /// Deliveries not yet done or dead, over all sinks.
    pub async fn pending_total(&self) -> Result<i64, StoreError> {
        self.read(|conn| {
            conn.query_row("SELECT COUNT(*) FROM deliveries WHERE state = 0", [], |r| {
                r.get(0)
            })
        })
        .await
    }
}

fn sink_rows(conn: &Connection) -> Result<Vec<SinkRow>, rusqlite::Error> {
    let mut stmt = conn.prepare(
        "SELECT d.sink,
                SUM(d.state = 0), SUM(d.state = 0 AND d.attempts > 0), SUM(d.state = 1), SUM(d.state = 2),
                COALESCE(s.down, 0), s.last_success_at
         FROM deliveries d LEFT JOIN sinks s ON s.name = d.sink
         GROUP BY d.sink ORDER BY d.sink",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok(SinkRow {
            sink: row.get(0)?,
            pending: row.get(1)?,
            retrying: row.get(2)?,
            done: row.get(3)?,
            dead: row.get(4)?,
            down: row.get(5)?,
            last_success_at: row.get(6)?,
        })
    })?;
    rows.collect()
}
