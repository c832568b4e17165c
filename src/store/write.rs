//! Everything that changes the database. Each public method is one job in
//! the writer's group transaction.

use std::collections::BTreeMap;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::value::RawValue;

use super::{Store, StoreError, now_ms};

/// An upstream event ready to record, with the sinks routing chose.
#[derive(Debug)]
pub struct NewEvent {
    pub sequence: i64,
    pub event_type: String,
    pub payload: Box<RawValue>,
    pub created_at: Option<String>,
    pub sinks: Vec<Arc<str>>,
}

/// The run reached a final status: record one `run_finished`.
#[derive(Debug)]
pub struct Finish {
    pub status: String,
    pub error_message: Option<String>,
    pub cancel_reason: Option<String>,
    pub sinks: Vec<Arc<str>>,
}

/// One ingest step of one run: events (ascending sequence), the run's status
/// and phase as seen, and perhaps its end.
#[derive(Debug)]
pub struct Batch {
    pub run_id: String,
    pub events: Vec<NewEvent>,
    pub run_status: Option<String>,
    pub phase: Option<String>,
    pub finish: Option<Finish>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The run's cursor after the batch.
    pub cursor: i64,
    /// Events newly recorded (a `run_finished` included).
    pub recorded: usize,
    /// Events at or below the cursor, dropped.
    pub dropped: usize,
    /// The sinks that got new deliveries.
    pub routed: Vec<Arc<str>>,
}

/// Published after a commit that queued deliveries, so delivery loops start
/// on a run without scanning the table.
#[derive(Debug, Clone)]
pub struct NewWork {
    pub run_id: Arc<str>,
    pub sinks: Vec<Arc<str>>,
}

impl Store {
    /// The core operation (DESIGN.md guarantee 1): the batch's new events,
    /// their deliveries and the advanced cursor, in one transaction. Events
    /// not above the stored cursor are dropped, whatever the server sent.
    pub async fn record_batch(&self, batch: Batch) -> Result<Recorded, StoreError> {
        let run_id: Arc<str> = Arc::from(batch.run_id.as_str());
        let recorded = self.write(move |conn| record_batch(conn, &batch)).await?;
        if !recorded.routed.is_empty() {
            // Nobody listening (a command-line process) is fine.
            let _ = self.new_work.send(NewWork {
                run_id,
                sinks: recorded.routed.clone(),
            });
        }
        Ok(recorded)
    }

    /// Subscribes to a run (or refreshes its labels), keeping its cursor. A
    /// run stopped by a 403 or a confirmed 404 (`daemon::ENDED_STATES`) is
    /// given another chance: `watch` again is how a user retries it.
    pub async fn subscribe(
        &self,
        run_id: String,
        labels: BTreeMap<String, String>,
        origin: &'static str,
        transport: Option<&'static str>,
    ) -> Result<(), StoreError> {
        let labels = serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into());
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO runs (run_id, labels, origin, watched, transport, updated_at)
                 VALUES (?1, ?2, ?3, 1, ?4, ?5)
                 ON CONFLICT (run_id) DO UPDATE SET labels = excluded.labels,
                    origin = excluded.origin, watched = 1, transport = excluded.transport,
                    state = CASE WHEN state IN ('not_found', 'forbidden')
                        THEN 'starting' ELSE state END,
                    last_error = CASE WHEN state IN ('not_found', 'forbidden')
                        THEN NULL ELSE last_error END",
            )?
            .execute(params![run_id, labels, origin, transport, now_ms()])?;
            bump_control(conn)
        })
        .await
    }

    /// At daemon start, runs stopped by a 403 or a confirmed 404 get another
    /// chance, as `watch` gives them: a restart is how an operator says
    /// "try everything again". Returns how many.
    pub async fn retry_stopped_runs(&self) -> Result<usize, StoreError> {
        self.write(move |conn| {
            conn.execute(
                "UPDATE runs SET state = 'starting', last_error = NULL, updated_at = ?1
                 WHERE watched = 1 AND state IN ('not_found', 'forbidden')",
                [now_ms()],
            )
        })
        .await
    }

    /// Stops following a run; its recorded events still get delivered.
    /// Returns whether the run was known.
    pub async fn unsubscribe(&self, run_id: String) -> Result<bool, StoreError> {
        self.write(move |conn| {
            let changed = conn.execute(
                "UPDATE runs SET watched = 0, updated_at = ?2 WHERE run_id = ?1",
                params![run_id, now_ms()],
            )?;
            bump_control(conn)?;
            Ok(changed > 0)
        })
        .await
    }

    /// Config runs no longer in the config stop being followed.
    pub async fn unsubscribe_config_runs_except(
        &self,
        keep: Vec<String>,
    ) -> Result<(), StoreError> {
        let keep: std::collections::HashSet<String> = keep.into_iter().collect();
        self.write(move |conn| {
            let mut stale = Vec::new();
            {
                let mut stmt = conn
                    .prepare("SELECT run_id FROM runs WHERE origin = 'config' AND watched = 1")?;
                let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
                for id in rows {
                    let id = id?;
                    if !keep.contains(&id) {
                        stale.push(id);
                    }
                }
            }
            let now = now_ms();
            for id in &stale {
                conn.execute(
                    "UPDATE runs SET watched = 0, updated_at = ?2 WHERE run_id = ?1",
                    params![id, now],
                )?;
            }
            // As `unsubscribe`: the supervisor stops their followers.
            if !stale.is_empty() {
                bump_control(conn)?;
            }
            Ok(())
        })
        .await
    }

    /// What ingest is doing with a run, for `status`.
    pub async fn set_run_state(
        &self,
        run_id: String,
        state: &'static str,
        last_error: Option<String>,
        active_transport: Option<&'static str>,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE runs SET state = ?2, last_error = ?3,
                    active_transport = COALESCE(?4, active_transport), updated_at = ?5
                 WHERE run_id = ?1",
            )?
            .execute(params![
                run_id,
                state,
                last_error,
                active_transport,
                now_ms()
            ])?;
            Ok(())
        })
        .await
    }

    /// How far upstream the run is (`lastEventSequence`), for the lag in
    /// `status`.
    pub async fn set_upstream_seq(
        &self,
        run_id: String,
        last_event_sequence: i64,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.prepare_cached("UPDATE runs SET upstream_seq = ?2 WHERE run_id = ?1")?
                .execute(params![run_id, last_event_sequence])?;
            Ok(())
        })
        .await
    }

    /// Deliveries that reached their sink. For a file sink, `file_offset` is
    /// the file length after the write, kept for the restart reconciliation.
    pub async fn mark_delivered(
        &self,
        sink: Arc<str>,
        events: Vec<i64>,
        file_offset: Option<u64>,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let now = now_ms();
            let mut update = conn.prepare_cached(
                "UPDATE deliveries SET state = 1, attempts = attempts + 1, done_at = ?3,
                    last_status = NULL, last_error = NULL
                 WHERE sink = ?1 AND event = ?2 AND state = 0",
            )?;
            for event in &events {
                update.execute(params![&*sink, event, now])?;
            }
            conn.prepare_cached(
                "INSERT INTO sinks (name, file_offset, last_success_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET
                    file_offset = COALESCE(excluded.file_offset, file_offset),
                    last_success_at = excluded.last_success_at, down = 0",
            )?
            .execute(params![&*sink, file_offset.map(|o| o as i64), now])?;
            Ok(())
        })
        .await
    }

    /// A failed attempt: count it and schedule the next, or dead-letter.
    pub async fn record_failure(&self, sink: Arc<str>, failure: Failure) -> Result<(), StoreError> {
        self.write(move |conn| {
            let mut update = conn.prepare_cached(
                "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?3,
                    last_status = ?4, last_error = ?5, state = ?6, done_at = ?7
                 WHERE sink = ?1 AND event = ?2 AND state = 0",
            )?;
            let (state, done_at) = if failure.dead {
                (2, Some(now_ms()))
            } else {
                (0, None)
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

    /// Remembers a Slack thread root so later events (and restarts) reply
    /// in the same thread.
    pub async fn save_slack_thread(
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

    /// A no-op through the writer: proves it is alive and can commit.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.write(|conn| conn.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }

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

    /// A sink answered again: its backlog is due now rather than at each
    /// delivery's own backoff.
    pub async fn release_backoff(&self, sink: Arc<str>) -> Result<usize, StoreError> {
        self.write(move |conn| {
            conn.execute(
                "UPDATE deliveries INDEXED BY deliveries_pending SET next_attempt_at = ?2
                 WHERE sink = ?1 AND state = 0 AND next_attempt_at > ?2",
                params![&*sink, now_ms()],
            )
        })
        .await
    }

    /// Queues dead letters again, with the same ids and fresh attempts.
    /// Returns how many. Works in chunks of [`MAINTENANCE_CHUNK`], each its
    /// own writer job, so a large dead-letter list does not hold the writer;
    /// a run's dead letters are queued in event order.
    pub async fn replay(&self, filter: DeadFilter) -> Result<usize, StoreError> {
        let mut replayed = 0;
        loop {
            let filter = filter.clone();
            let chunk = self
                .write(move |conn| {
                    let replayed = conn.prepare_cached(REPLAY_DEAD)?.execute(params![
                        filter.sink,
                        filter.run,
                        filter.id,
                        now_ms(),
                        MAINTENANCE_CHUNK as i64
                    ])?;
                    bump_control(conn)?;
                    Ok(replayed)
                })
                .await?;
            replayed += chunk;
            if chunk < MAINTENANCE_CHUNK {
                return Ok(replayed);
            }
        }
    }

    /// Deletes dead letters for good. Returns how many. In chunks, as
    /// [`Store::replay`].
    pub async fn purge_dead(&self, filter: DeadFilter) -> Result<usize, StoreError> {
        let mut purged = 0;
        loop {
            let filter = filter.clone();
            let chunk = self
                .write(move |conn| {
                    conn.prepare_cached(PURGE_DEAD)?.execute(params![
                        filter.sink,
                        filter.run,
                        filter.id,
                        MAINTENANCE_CHUNK as i64
                    ])
                })
                .await?;
            purged += chunk;
            if chunk < MAINTENANCE_CHUNK {
                return Ok(purged);
            }
        }
    }

    /// Drops deliveries done before `cutoff` (unix ms), then events seen
    /// before it that no delivery refers to any more (dead letters and
    /// pending deliveries keep theirs). Returns (deliveries, events). Works
    /// in chunks of [`MAINTENANCE_CHUNK`] rows, each its own writer job, so
    /// ingest and delivery get the writer in between.
    pub async fn prune(&self, cutoff: i64) -> Result<(usize, usize), StoreError> {
        let mut deliveries = 0;
        loop {
            let chunk = self
                .write(move |conn| {
                    conn.prepare_cached(PRUNE_DELIVERIES)?
                        .execute(params![cutoff, MAINTENANCE_CHUNK as i64])
                })
                .await?;
            deliveries += chunk;
            if chunk < MAINTENANCE_CHUNK {
                break;
            }
        }
        let mut events = 0;
        let mut after = 0;
        loop {
            let (deleted, next) = self
                .write(move |conn| prune_events_after(conn, cutoff, after))
                .await?;
            events += deleted;
            match next {
                Some(last) => after = last,
                None => return Ok((deliveries, events)),
            }
        }
    }

    /// File sink start-up: lines found in the file past the recorded offset
    /// are deliveries that were written but not yet marked done. A dead
    /// letter among them (its batch failed after writing it, and the failed
    /// write could not be cut back) is done too: its line is there.
    pub async fn reconcile_file(
        &self,
        sink: Arc<str>,
        ids_in_file: Vec<String>,
        file_offset: u64,
    ) -> Result<usize, StoreError> {
        self.write(move |conn| {
            let now = now_ms();
            let mut marked = 0;
            let mut update = conn.prepare_cached(
                "UPDATE deliveries SET state = 1, attempts = attempts + 1, done_at = ?3,
                    last_status = NULL, last_error = NULL
                 WHERE sink = ?1 AND state IN (0, 2)
                   AND event = (SELECT rowid FROM events WHERE id = ?2)",
            )?;
            for id in &ids_in_file {
                marked += update.execute(params![&*sink, id, now])?;
            }
            conn.prepare_cached(
                "INSERT INTO sinks (name, file_offset) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET file_offset = excluded.file_offset",
            )?
            .execute(params![&*sink, file_offset as i64])?;
            Ok(marked)
        })
        .await
    }
}

/// Rows one maintenance job (prune, replay, purge) touches at most: small
/// enough that the writer is back for ingest and delivery within a few
/// milliseconds, large enough that a big prune takes few transactions.
pub const MAINTENANCE_CHUNK: usize = 5_000;

/// Maintenance statements, named so that a test can check their query
/// plans: each reaches its rows through an index, a chunk at a time.
const REPLAY_DEAD: &str =
    "UPDATE deliveries SET state = 0, attempts = 0, next_attempt_at = ?4, queued_at = ?4,
        done_at = NULL
     WHERE (sink, event) IN (
        SELECT sink, event FROM deliveries INDEXED BY deliveries_dead
        WHERE state = 2 AND (?1 IS NULL OR sink = ?1) AND (?2 IS NULL OR run_id = ?2)
          AND (?3 IS NULL OR event = (SELECT rowid FROM events WHERE id = ?3))
        ORDER BY sink, run_id, event LIMIT ?5)";
const PURGE_DEAD: &str = "DELETE FROM deliveries
     WHERE (sink, event) IN (
        SELECT sink, event FROM deliveries INDEXED BY deliveries_dead
        WHERE state = 2 AND (?1 IS NULL OR sink = ?1) AND (?2 IS NULL OR run_id = ?2)
          AND (?3 IS NULL OR event = (SELECT rowid FROM events WHERE id = ?3))
        LIMIT ?4)";
const PRUNE_DELIVERIES: &str = "DELETE FROM deliveries
     WHERE (sink, event) IN (
        SELECT sink, event FROM deliveries INDEXED BY deliveries_done
        WHERE state = 1 AND done_at < ?1 LIMIT ?2)";
/// The next events in ingest order, each with whether a delivery still
/// refers to it.
const PRUNE_EVENTS: &str = "SELECT rowid, seen_at,
        EXISTS (SELECT 1 FROM deliveries INDEXED BY deliveries_by_event WHERE event = events.rowid)
     FROM events WHERE rowid > ?1 ORDER BY rowid LIMIT ?2";

/// One chunk of the events prune: walks up to [`MAINTENANCE_CHUNK`] events
/// after rowid `after` in ingest order, deleting those seen before `cutoff`
/// that no delivery refers to. Returns how many it deleted and, unless the
/// walk is over, where the next chunk starts. Ingest order is age order, so
/// the walk ends at the first event seen at or after `cutoff` (after a
/// clock step backwards, older ones beyond it wait for the next prune).
fn prune_events_after(
    conn: &Connection,
    cutoff: i64,
    after: i64,
) -> Result<(usize, Option<i64>), rusqlite::Error> {
    let mut walk = conn.prepare_cached(PRUNE_EVENTS)?;
    let mut rows = walk.query(params![after, MAINTENANCE_CHUNK as i64])?;
    let mut unreferenced = Vec::new();
    let mut walked = 0;
    let mut last = after;
    while let Some(row) = rows.next()? {
        let (rowid, seen_at, referenced): (i64, i64, bool) =
            (row.get(0)?, row.get(1)?, row.get(2)?);
        if seen_at >= cutoff {
            walked = 0;
            break;
        }
        walked += 1;
        last = rowid;
        if !referenced {
            unreferenced.push(rowid);
        }
    }
    drop(rows);
    let mut delete = conn.prepare_cached("DELETE FROM events WHERE rowid = ?1")?;
    for rowid in &unreferenced {
        delete.execute([rowid])?;
    }
    let next = (walked == MAINTENANCE_CHUNK).then_some(last);
    Ok((unreferenced.len(), next))
}

/// Which dead letters `replay` and `dead --purge` act on; `None` = any.
#[derive(Debug, Clone, Default)]
pub struct DeadFilter {
    pub sink: Option<String>,
    pub run: Option<String>,
    pub id: Option<String>,
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

fn bump_control(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'control'",
        [],
    )?;
    Ok(())
}

fn record_batch(conn: &Connection, batch: &Batch) -> Result<Recorded, rusqlite::Error> {
    let now = now_ms();
    let mut cursor: i64 = conn
        .prepare_cached("SELECT cursor FROM runs WHERE run_id = ?1")?
        .query_row([&batch.run_id], |r| r.get(0))
        .optional()?
        .ok_or(rusqlite::Error::QueryReturnedNoRows)?;
    let mut recorded = 0;
    let mut dropped = 0;
    let mut routed: Vec<Arc<str>> = Vec::new();
    let mut insert_event = conn.prepare_cached(
        "INSERT INTO events (id, run_id, sequence, event_type, payload, created_at,
                             run_status, phase, seen_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (id) DO NOTHING",
    )?;
    let mut insert_delivery = conn.prepare_cached(
        "INSERT INTO deliveries (sink, event, run_id, next_attempt_at, queued_at)
         VALUES (?1, ?2, ?3, ?4, ?4)
         ON CONFLICT DO NOTHING",
    )?;
    let mut record = |id: &str,
                      sequence: Option<i64>,
                      event_type: &str,
                      payload: &str,
                      created_at: Option<&str>,
                      sinks: &[Arc<str>]|
     -> Result<bool, rusqlite::Error> {
        let inserted = insert_event.execute(params![
            id,
            batch.run_id,
            sequence,
            event_type,
            payload,
            created_at,
            batch.run_status,
            batch.phase,
            now
        ])?;
        if inserted == 0 {
            return Ok(false);
        }
        let event = conn.last_insert_rowid();
        for sink in sinks {
            insert_delivery.execute(params![&**sink, event, batch.run_id, now])?;
            if !routed.contains(sink) {
                routed.push(sink.clone());
            }
        }
        Ok(true)
    };

    for event in &batch.events {
        if event.sequence <= cursor {
            dropped += 1;
            continue;
        }
        let id = format!("{}:{}", batch.run_id, event.sequence);
        if record(
            &id,
            Some(event.sequence),
            &event.event_type,
            event.payload.get(),
            event.created_at.as_deref(),
            &event.sinks,
        )? {
            recorded += 1;
        }
        cursor = event.sequence;
    }

    let mut finished_seq = None;
    if let Some(finish) = &batch.finish {
        let id = format!("{}:finished:{cursor}", batch.run_id);
        let payload = finished_payload(finish, cursor);
        if record(&id, None, "run_finished", &payload, None, &finish.sinks)? {
            recorded += 1;
        }
        finished_seq = Some(cursor);
    }

    conn.prepare_cached(
        "UPDATE runs SET cursor = ?2,
            run_status = COALESCE(?3, run_status), phase = COALESCE(?4, phase),
            last_event_at = CASE WHEN ?5 > 0 THEN ?6 ELSE last_event_at END,
            finished_seq = COALESCE(?7, finished_seq),
            finished_at = CASE WHEN ?7 IS NOT NULL THEN ?6 ELSE finished_at END,
            upstream_seq = CASE WHEN ?7 IS NOT NULL THEN ?2 ELSE upstream_seq END,
            state = CASE WHEN ?7 IS NOT NULL THEN 'finished' ELSE 'following' END,
            last_error = NULL, updated_at = ?6
         WHERE run_id = ?1",
    )?
    .execute(params![
        batch.run_id,
        cursor,
        batch.run_status,
        batch.phase,
        recorded as i64,
        now,
        finished_seq
    ])?;
    Ok(Recorded {
        cursor,
        recorded,
        dropped,
        routed,
    })
}

/// `{"status", "errorMessage"?, "cancelReason"?, "lastSequence"}` in that order.
fn finished_payload(finish: &Finish, last_sequence: i64) -> String {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Payload<'a> {
        status: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        error_message: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cancel_reason: Option<&'a str>,
        last_sequence: i64,
    }
    serde_json::to_string(&Payload {
        status: &finish.status,
        error_message: finish.error_message.as_deref(),
        cancel_reason: finish.cancel_reason.as_deref(),
        last_sequence,
    })
    .unwrap_or_else(|_| "{}".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The query plan of `sql`, one line per step.
    fn plan(conn: &Connection, sql: &str) -> Vec<String> {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let unbound = vec![rusqlite::types::Null; stmt.parameter_count()];
        stmt.query_map(rusqlite::params_from_iter(unbound), |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    /// Maintenance shares the single writer with ingest and delivery: on a
    /// large state database a statement that walks every delivery holds the
    /// writer long enough to trip the watchdog. Each must reach its rows
    /// through an index (a partial one where it walks), never a table scan.
    #[test]
    fn maintenance_statements_reach_their_rows_through_indexes() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        for (name, sql, index) in [
            ("prune deliveries", PRUNE_DELIVERIES, "deliveries_done"),
            ("prune events", PRUNE_EVENTS, "deliveries_by_event"),
            ("replay", REPLAY_DEAD, "deliveries_dead"),
            ("purge", PURGE_DEAD, "deliveries_dead"),
        ] {
            let steps = plan(&conn, sql);
            assert!(
                steps.iter().any(|s| s.contains(index)),
                "{name} uses {index}: {steps:#?}"
            );
            for step in &steps {
                let table_scan = ["SCAN deliveries", "SCAN events", "SCAN d", "SCAN e"]
                    .iter()
                    .any(|scan| step == scan || step.starts_with(&format!("{scan} ")))
                    && !step.contains(" USING ");
                assert!(!table_scan, "{name} scans a table: {steps:#?}");
            }
            assert!(
                sql.contains("LIMIT"),
                "{name} works in bounded chunks: {sql}"
            );
        }
    }
}
