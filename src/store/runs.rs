//! Runs: subscriptions (`watch`, `unwatch`, the config's runs), what ingest
//! reports about each run, and the control generation that tells the daemon
//! a subscription changed.
//!
//! A finished run pruned after `state.retain` (`retention.rs`) leaves the
//! runs table and a tombstone in `pruned_runs`. Subscribing consults the
//! tombstone first: the runs row is the cursor, and a run subscribed
//! without it would start over at sequence 0 and deliver everything again.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::states::{StoredTransport, serialize_transport};
use super::{Reader, RunState, Store, StoreError, now_ms};
use crate::config::Transport;

/// A run ingest should follow.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchedRun {
    pub run_id: String,
    pub labels: BTreeMap<String, String>,
    pub transport: Option<Transport>,
    pub state: RunState,
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
    /// The transport in use (never `auto`).
    #[serde(serialize_with = "serialize_transport")]
    pub transport: Option<Transport>,
    pub state: RunState,
    pub last_error: Option<String>,
    /// `lastEventSequence - cursor` from the last run lookup.
    pub lag: Option<i64>,
    pub last_event_at: Option<i64>,
    /// PostgreSQL only (`None` on SQLite, and left out of `status --json`):
    /// the replica holding the run's lease now, and its last heartbeat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<RunOwner>,
}

/// Who works a run in a cluster, for `status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunOwner {
    pub node: String,
    /// The lease's fencing token.
    pub epoch: i64,
    /// The node's last heartbeat (unix ms); `None` when its row is gone.
    pub heartbeat_at: Option<i64>,
}

/// A finished run pruned from the runs table after `state.retain`: what
/// its tombstone keeps, for `status` and for whoever watches it again.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrunedRun {
    pub run_id: String,
    /// The cursor when it was pruned.
    pub cursor: i64,
    /// The run's final status (`completed`, `failed`, `cancelled`).
    pub status: Option<String>,
    /// When its last `run_finished` was recorded (unix ms).
    pub finished_at: i64,
    /// When it left the runs table (unix ms).
    pub pruned_at: i64,
}

/// What [`Store::subscribe`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Subscribed {
    /// The run is (still) watched: a follower ingests it from its cursor.
    Watching,
    /// The run finished and was pruned: it is not followed again. Its events
    /// were delivered; following it would start over at sequence 0 and
    /// deliver them all a second time, and a finished run past
    /// `finished_linger` gets no new ones (a follower would end at once,
    /// as it does for a finished run still in the table).
    Pruned(PrunedRun),
}

impl Store {
    /// Subscribes to a run (or refreshes its labels), keeping its cursor. A
    /// run stopped by a 403 or a confirmed 404 ([`RunState::is_ended`]) is
    /// given another chance: `watch` again is how a user retries it. A
    /// pruned run is left as it is: see [`Subscribed::Pruned`].
    pub async fn subscribe(
        &self,
        run_id: String,
        labels: BTreeMap<String, String>,
        origin: &'static str,
        transport: Option<Transport>,
    ) -> Result<Subscribed, StoreError> {
        let labels = serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into());
        self.write(move |conn| {
            // In the same transaction as the insert, and prune runs on the
            // same writer: a run cannot be pruned between the two.
            if let Some(pruned) = pruned_run(conn, &run_id)? {
                return Ok(Subscribed::Pruned(pruned));
            }
            conn.prepare_cached(
                "INSERT INTO runs (run_id, labels, origin, watched, transport, updated_at)
                 VALUES (?1, ?2, ?3, 1, ?4, ?5)
                 ON CONFLICT (run_id) DO UPDATE SET labels = excluded.labels,
                    origin = excluded.origin, watched = 1, transport = excluded.transport,
                    state = CASE WHEN state IN (?6, ?7) THEN ?8 ELSE state END,
                    last_error = CASE WHEN state IN (?6, ?7) THEN NULL ELSE last_error END",
            )?
            .execute(params![
                run_id,
                labels,
                origin,
                transport.map(StoredTransport),
                now_ms(),
                RunState::ENDED[0],
                RunState::ENDED[1],
                RunState::Starting
            ])?;
            bump_control(conn)?;
            Ok(Subscribed::Watching)
        })
        .await
    }

    /// At daemon start, runs stopped by a 403 or a confirmed 404 get another
    /// chance, as `watch` gives them: a restart is how an operator says
    /// "try everything again". Returns how many.
    pub async fn retry_stopped_runs(&self) -> Result<usize, StoreError> {
        self.write(move |conn| {
            conn.execute(
                "UPDATE runs SET state = ?2, last_error = NULL, updated_at = ?1
                 WHERE watched = 1 AND state IN (?3, ?4)",
                params![
                    now_ms(),
                    RunState::Starting,
                    RunState::ENDED[0],
                    RunState::ENDED[1]
                ],
            )
        })
        .await
    }

    /// Stops following a run; its recorded events still get delivered.
    /// Returns whether the run was known (a pruned run is: it is followed
    /// by nothing already, and its tombstone stays).
    pub async fn unsubscribe(&self, run_id: String) -> Result<bool, StoreError> {
        self.write(move |conn| {
            let changed = conn.execute(
                "UPDATE runs SET watched = 0, updated_at = ?2 WHERE run_id = ?1",
                params![run_id, now_ms()],
            )?;
            bump_control(conn)?;
            Ok(changed > 0 || pruned_run(conn, &run_id)?.is_some())
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
        state: RunState,
        last_error: Option<String>,
        active_transport: Option<Transport>,
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
                active_transport.map(StoredTransport),
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
}

impl Reader {
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
                    transport: row.get::<_, Option<StoredTransport>>(2)?.map(|t| t.0),
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

    /// The tombstone of a run pruned from the runs table, if it was.
    pub async fn pruned_run(&self, run_id: String) -> Result<Option<PrunedRun>, StoreError> {
        self.read(move |conn| pruned_run(conn, &run_id)).await
    }

    /// How many finished runs were pruned from the runs table: `status`
    /// counts them rather than listing them.
    pub async fn pruned_count(&self) -> Result<i64, StoreError> {
        self.read(|conn| conn.query_row("SELECT count(*) FROM pruned_runs", [], |r| r.get(0)))
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
                    transport: row.get::<_, Option<StoredTransport>>(5)?.map(|t| t.0),
                    state: row.get(6)?,
                    last_error: row.get(7)?,
                    lag: row.get(8)?,
                    last_event_at: row.get(9)?,
                    owner: None,
                })
            })?;
            rows.collect()
        })
        .await
    }
}

pub(super) fn pruned_run(
    conn: &Connection,
    run_id: &str,
) -> Result<Option<PrunedRun>, rusqlite::Error> {
    conn.prepare_cached(
        "SELECT run_id, cursor, run_status, finished_at, pruned_at
         FROM pruned_runs WHERE run_id = ?1",
    )?
    .query_row([run_id], |row| {
        Ok(PrunedRun {
            run_id: row.get(0)?,
            cursor: row.get(1)?,
            status: row.get(2)?,
            finished_at: row.get(3)?,
            pruned_at: row.get(4)?,
        })
    })
    .optional()
}

pub(super) fn bump_control(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'control'",
        [],
    )?;
    Ok(())
}
