//! Runs on PostgreSQL: subscriptions, what ingest reports about each run,
//! the control generation, and who owns each run, as `store/runs.rs` keeps
//! them on SQLite.
//!
//! Operator commands (`subscribe`, `unsubscribe`) are not fenced: any
//! replica, or `runhook watch` on any machine, may change a subscription.
//! What a run's owner reports from its data path (`set_run_state`,
//! `set_upstream_seq`) carries its [`Lease`]: a replica that lost the run
//! must not overwrite what the new owner reports.
//!
//! SQLite serialises every write on one writer, so `subscribe` can read the
//! tombstone and then insert. Here a prune on another connection can move
//! the run to `pruned_runs` between the two, so `subscribe` writes first and
//! reads the tombstone after, in the same transaction: see
//! [`PgStore::subscribe`].

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::super::{PrunedRun, RunOwner, RunRow, RunState, Subscribed, WatchedRun, now_ms};
use super::{Lease, PgStore, PgStoreError, fence};
use crate::config::Transport;

impl PgStore {
    /// Subscribes to a run (or refreshes its labels), keeping its cursor, and
    /// gives it a lease row, unowned until a replica claims it. As SQLite's
    /// `subscribe`: a run stopped by a 403 or a confirmed 404 gets another
    /// chance, and a pruned run is left as it is ([`Subscribed::Pruned`]).
    ///
    /// The row is written before the tombstone is read. A prune moves a run
    /// (tombstone in, row out) in one transaction; whichever way it
    /// interleaves with this one, the read sees it: if the prune committed
    /// first, the insert waited on its deleted row and the tombstone is
    /// visible to the later statement, so this transaction rolls back; if
    /// this one locked the row first, the prune's delete waits for it, as if
    /// the run had been subscribed just before it was pruned.
    pub async fn subscribe(
        &self,
        run_id: String,
        labels: BTreeMap<String, String>,
        origin: &'static str,
        transport: Option<Transport>,
    ) -> Result<Subscribed, PgStoreError> {
        let labels = serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into());
        let ended = [RunState::ENDED[0].as_str(), RunState::ENDED[1].as_str()];
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO runs (run_id, labels, origin, watched, transport, updated_at)
             VALUES ($1, $2, $3, true, $4, $5)
             ON CONFLICT (run_id) DO UPDATE SET labels = excluded.labels,
                origin = excluded.origin, watched = true, transport = excluded.transport,
                state = CASE WHEN runs.state IN ($6, $7) THEN $8 ELSE runs.state END,
                last_error = CASE WHEN runs.state IN ($6, $7) THEN NULL ELSE runs.last_error END",
            &[
                &run_id,
                &labels,
                &origin,
                &transport.map(Transport::name),
                &now_ms(),
                &ended[0],
                &ended[1],
                &RunState::Starting.as_str(),
            ],
        )
        .await?;
        if let Some(pruned) = pruned_run(&tx, &run_id).await? {
            // Nothing of this transaction stays: no row at cursor 0.
            tx.rollback().await?;
            return Ok(Subscribed::Pruned(pruned));
        }
        tx.execute(
            "INSERT INTO leases (run_id) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&run_id],
        )
        .await?;
        bump_control(&tx).await?;
        tx.commit().await?;
        Ok(Subscribed::Watching)
    }

    /// At daemon start, runs stopped by a 403 or a confirmed 404 get another
    /// chance, as `watch` gives them. Returns how many.
    pub async fn retry_stopped_runs(&self) -> Result<usize, PgStoreError> {
        let client = self.pool.get().await?;
        let changed = client
            .execute(
                "UPDATE runs SET state = $2, last_error = NULL, updated_at = $1
                 WHERE watched AND state IN ($3, $4)",
                &[
                    &now_ms(),
                    &RunState::Starting.as_str(),
                    &RunState::ENDED[0].as_str(),
                    &RunState::ENDED[1].as_str(),
                ],
            )
            .await?;
        Ok(usize::try_from(changed).unwrap_or(usize::MAX))
    }

    /// Stops following a run; its recorded events still get delivered.
    /// Returns whether the run was known (a pruned run is: its tombstone
    /// stays). The lease is left as it is: the owner still delivers what
    /// the run has pending.
    pub async fn unsubscribe(&self, run_id: String) -> Result<bool, PgStoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let changed = tx
            .execute(
                "UPDATE runs SET watched = false, updated_at = $2 WHERE run_id = $1",
                &[&run_id, &now_ms()],
            )
            .await?;
        bump_control(&tx).await?;
        let known = changed > 0 || pruned_run(&tx, &run_id).await?.is_some();
        tx.commit().await?;
        Ok(known)
    }

    /// Config runs no longer in the config stop being followed. The rows
    /// are locked in run id order, as every statement here that locks more
    /// than one run does, so two of them cannot deadlock.
    pub async fn unsubscribe_config_runs_except(
        &self,
        keep: Vec<String>,
    ) -> Result<(), PgStoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let changed = tx
            .execute(
                "UPDATE runs SET watched = false, updated_at = $2
                 WHERE run_id IN (
                    SELECT run_id FROM runs
                    WHERE origin = 'config' AND watched AND NOT (run_id = ANY($1))
                    ORDER BY run_id FOR UPDATE)",
                &[&keep, &now_ms()],
            )
            .await?;
        // As `unsubscribe`: the supervisors stop their followers.
        if changed > 0 {
            bump_control(&tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// What ingest is doing with the lease's run, for `status`. Refused
    /// ([`PgStoreError::LeaseLost`]) when the lease was lost: the new
    /// owner's report stands.
    pub async fn set_run_state(
        &self,
        lease: &Lease,
        state: RunState,
        last_error: Option<String>,
        active_transport: Option<Transport>,
    ) -> Result<(), PgStoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        fence(&tx, self.node(), lease).await?;
        tx.execute(
            "UPDATE runs SET state = $2, last_error = $3,
                active_transport = COALESCE($4, active_transport), updated_at = $5
             WHERE run_id = $1",
            &[
                &&*lease.run_id,
                &state.as_str(),
                &last_error,
                &active_transport.map(Transport::name),
                &now_ms(),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// How far upstream the lease's run is (`lastEventSequence`), for the
    /// lag in `status`. Refused when the lease was lost.
    pub async fn set_upstream_seq(
        &self,
        lease: &Lease,
        last_event_sequence: i64,
    ) -> Result<(), PgStoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        fence(&tx, self.node(), lease).await?;
        tx.execute(
            "UPDATE runs SET upstream_seq = $2 WHERE run_id = $1",
            &[&&*lease.run_id, &last_event_sequence],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Changes whenever a subscription changed or something was queued
    /// again (`watch`, `unwatch`, `replay`, `requeue_range`, `backfill`,
    /// the runs prune).
    pub async fn control_generation(&self) -> Result<i64, PgStoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one("SELECT value FROM meta WHERE key = 'control'", &[])
            .await?;
        Ok(row.try_get(0)?)
    }

    pub async fn watched_runs(&self) -> Result<Vec<WatchedRun>, PgStoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT run_id, labels, transport, state, cursor, run_status, finished_at
                 FROM runs WHERE watched ORDER BY run_id",
                &[],
            )
            .await?;
        let watched = |row: &Row| -> Result<WatchedRun, tokio_postgres::Error> {
            Ok(WatchedRun {
                run_id: row.try_get(0)?,
                labels: serde_json::from_str(row.try_get(1)?).unwrap_or_default(),
                transport: transport(row.try_get(2)?),
                state: state(row.try_get(3)?),
                cursor: row.try_get(4)?,
                run_status: row.try_get(5)?,
                finished_at: row.try_get(6)?,
            })
        };
        Ok(rows.iter().map(watched).collect::<Result<_, _>>()?)
    }

    /// The tombstone of a run pruned from the runs table, if it was.
    pub async fn pruned_run(&self, run_id: String) -> Result<Option<PrunedRun>, PgStoreError> {
        let client = self.pool.get().await?;
        pruned_run(&client, &run_id).await
    }

    /// How many finished runs were pruned from the runs table.
    pub async fn pruned_count(&self) -> Result<i64, PgStoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one("SELECT count(*) FROM pruned_runs", &[])
            .await?;
        Ok(row.try_get(0)?)
    }

    /// One row per run for `status`, with the replica whose lease on it is
    /// current (an expired lease is nobody's: the next claim takes it) and
    /// that replica's last heartbeat.
    pub async fn runs(&self) -> Result<Vec<RunRow>, PgStoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT r.run_id, r.watched, r.cursor, r.run_status, r.phase,
                        r.active_transport, r.state, r.last_error,
                        r.upstream_seq - r.cursor, r.last_event_at,
                        l.owner, l.epoch,
                        (extract(epoch FROM p.heartbeat_at) * 1000)::bigint
                 FROM runs r
                 LEFT JOIN leases l ON l.run_id = r.run_id
                    AND l.owner IS NOT NULL AND l.expires_at > now()
                 LEFT JOIN replicas p ON p.node = l.owner
                 ORDER BY r.run_id",
                &[],
            )
            .await?;
        let run = |row: &Row| -> Result<RunRow, tokio_postgres::Error> {
            let owner = row
                .try_get::<_, Option<String>>(10)?
                .map(|node| -> Result<RunOwner, tokio_postgres::Error> {
                    Ok(RunOwner {
                        node,
                        epoch: row.try_get(11)?,
                        heartbeat_at: row.try_get(12)?,
                    })
                })
                .transpose()?;
            Ok(RunRow {
                run_id: row.try_get(0)?,
                watched: row.try_get(1)?,
                cursor: row.try_get(2)?,
                status: row.try_get(3)?,
                phase: row.try_get(4)?,
                transport: transport(row.try_get(5)?),
                state: state(row.try_get(6)?),
                last_error: row.try_get(7)?,
                lag: row.try_get(8)?,
                last_event_at: row.try_get(9)?,
                owner,
            })
        };
        Ok(rows.iter().map(run).collect::<Result<_, _>>()?)
    }
}

/// A state this build does not know reads as `starting`, as on SQLite
/// (`states.rs`): one such row must not stop every run from being read.
fn state(stored: &str) -> RunState {
    RunState::parse(stored).unwrap_or(RunState::Starting)
}

/// A transport this build does not know reads as `auto`, as on SQLite.
fn transport(stored: Option<&str>) -> Option<Transport> {
    stored.map(|t| Transport::parse(t).unwrap_or(Transport::Auto))
}

pub(super) async fn pruned_run<C: GenericClient>(
    client: &C,
    run_id: &str,
) -> Result<Option<PrunedRun>, PgStoreError> {
    let row = client
        .query_opt(
            "SELECT run_id, cursor, run_status, finished_at, pruned_at
             FROM pruned_runs WHERE run_id = $1",
            &[&run_id],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(PrunedRun {
        run_id: row.try_get(0)?,
        cursor: row.try_get(1)?,
        status: row.try_get(2)?,
        finished_at: row.try_get(3)?,
        pruned_at: row.try_get(4)?,
    }))
}

/// Tells every replica's run supervisor to look at the subscriptions again.
pub(super) async fn bump_control<C: GenericClient>(client: &C) -> Result<(), PgStoreError> {
    client
        .execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'control'",
            &[],
        )
        .await?;
    Ok(())
}
