//! Sink state: whether a sink is down, its last success, a file sink's
//! offset and a Slack sink's thread roots.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::{Reader, Store, StoreError, now_ms};

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

impl Store {
    /// A sink marked down (or up again), for `status`.
    pub async fn set_sink_down(&self, sink: Arc<str>, down: bool) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO sinks (name, down) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET down = excluded.down",
                params![&*sink, down],
            )?;
            Ok(())
        })
        .await
    }

    /// Remembers the message a sink threads a run's events under (a Slack
    /// root message), so later events and restarts reply in the same thread.
    pub async fn save_thread_root(
        &self,
        sink: Arc<str>,
        run_id: String,
        channel: String,
        ts: String,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO slack_threads (sink, run_id, channel, ts) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (sink, run_id) DO UPDATE SET channel = excluded.channel, ts = excluded.ts",
                params![&*sink, run_id, channel, ts],
            )?;
            Ok(())
        })
        .await
    }

    /// A sink found these events already written past its recorded offset
    /// (a file sink at start-up: written, then a crash before they were
    /// marked done): they are delivered, and `offset` is where the sink now
    /// stands. A dead letter among them (its batch failed after writing it,
    /// and the failed write could not be cut back) is delivered too: the
    /// sink has it.
    pub async fn mark_found_delivered(
        &self,
        sink: Arc<str>,
        found: Vec<String>,
        offset: u64,
    ) -> Result<usize, StoreError> {
        self.write(move |conn| {
            let now = now_ms();
            let mut marked = 0;
            let mut update = conn.prepare_cached(concat!(
                "UPDATE deliveries SET state = ",
                delivery_state!(done),
                ", attempts = attempts + 1, done_at = ?3,
                    last_status = NULL, last_error = NULL
                 WHERE sink = ?1 AND state IN (",
                delivery_state!(pending),
                ", ",
                delivery_state!(dead),
                ")
                   AND event = (SELECT rowid FROM events WHERE id = ?2)"
            ))?;
            for id in &found {
                marked += update.execute(params![&*sink, id, now])?;
            }
            conn.prepare_cached(
                "INSERT INTO sinks (name, file_offset) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET file_offset = excluded.file_offset",
            )?
            .execute(params![&*sink, offset as i64])?;
            Ok(marked)
        })
        .await
    }
}

impl Reader {
    pub async fn sinks(&self) -> Result<Vec<SinkRow>, StoreError> {
        self.read(sink_rows).await
    }

    /// How far a sink's output is known delivered (a file sink's length in
    /// bytes), as recorded with the deliveries it covers.
    pub async fn sink_offset(&self, sink: &str) -> Result<Option<u64>, StoreError> {
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
            let mut stmt = conn.prepare_cached(concat!(
                "SELECT queued_at FROM deliveries INDEXED BY deliveries_pending
                 WHERE sink = ?1 AND state = ",
                delivery_state!(pending),
                " ORDER BY event LIMIT 1"
            ))?;
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

    /// The thread root a sink keeps for a run: (channel, ts).
    pub async fn thread_root(
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
}

fn sink_rows(conn: &Connection) -> Result<Vec<SinkRow>, rusqlite::Error> {
    let mut stmt = conn.prepare(concat!(
        "SELECT d.sink,
                SUM(d.state = ",
        delivery_state!(pending),
        "), SUM(d.state = ",
        delivery_state!(pending),
        " AND d.attempts > 0), SUM(d.state = ",
        delivery_state!(done),
        "), SUM(d.state = ",
        delivery_state!(dead),
        "),
                COALESCE(s.down, 0), s.last_success_at
         FROM deliveries d LEFT JOIN sinks s ON s.name = d.sink
         GROUP BY d.sink ORDER BY d.sink"
    ))?;
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
