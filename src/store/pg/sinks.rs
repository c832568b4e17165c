//! Sink state on PostgreSQL: whether a sink is down, its last success, a
//! file sink's offset and a Slack sink's thread roots, as `store/sinks.rs`
//! keeps them on SQLite.
//!
//! A thread root belongs to a run, and only the run's owner delivers its
//! events, so only the owner writes it: [`PgStore::save_thread_root`] is
//! fenced by the lease like `mark_delivered`, and a replica that lost the
//! run cannot overwrite the root the new owner threads under. The rest is
//! the sink's, not a run's: a file sink is written by its one `node`, under
//! that sink's lease (`sink_lease.rs`, where its writes live), and "down" is
//! what the last replica to try found.

use std::sync::Arc;

use tokio_postgres::Row;

use super::super::{DeliveryState, SinkRow};
use super::{Lease, PgStore, PgStoreError, fence};

const PENDING: i16 = DeliveryState::Pending as i16;
const DONE: i16 = DeliveryState::Done as i16;
const DEAD: i16 = DeliveryState::Dead as i16;

impl PgStore {
    /// A sink marked down (or up again), for `status`.
    pub async fn set_sink_down(&self, sink: Arc<str>, down: bool) -> Result<(), PgStoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO sinks (name, down) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET down = excluded.down",
                &[&&*sink, &down],
            )
            .await?;
        Ok(())
    }

    /// Remembers the message a sink threads a run's events under (a Slack
    /// root message), so later events, restarts and the next owner reply in
    /// the same thread. Refused, nothing written, unless `lease` is this
    /// replica's lease on `run_id`.
    pub async fn save_thread_root(
        &self,
        lease: &Lease,
        sink: Arc<str>,
        run_id: String,
        channel: String,
        ts: String,
    ) -> Result<(), PgStoreError> {
        if *lease.run_id != *run_id {
            // A lease fences its own run only.
            return Err(PgStoreError::LeaseLost {
                run_id: Arc::from(run_id),
                epoch: lease.epoch,
            });
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        fence(&tx, self.node(), lease).await?;
        tx.execute(
            "INSERT INTO slack_threads (sink, run_id, channel, ts) VALUES ($1, $2, $3, $4)
             ON CONFLICT (sink, run_id) DO UPDATE SET channel = excluded.channel, ts = excluded.ts",
            &[&&*sink, &run_id, &channel, &ts],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Each sink with deliveries: its counts, whether it is down and its
    /// last success, for `status`. Ordered by name byte for byte, as
    /// SQLite orders them, whatever the database's collation.
    pub async fn sinks(&self) -> Result<Vec<SinkRow>, PgStoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT d.sink,
                        count(*) FILTER (WHERE d.state = $1),
                        count(*) FILTER (WHERE d.state = $1 AND d.attempts > 0),
                        count(*) FILTER (WHERE d.state = $2),
                        count(*) FILTER (WHERE d.state = $3),
                        COALESCE(bool_or(s.down), false), max(s.last_success_at)
                 FROM deliveries d LEFT JOIN sinks s ON s.name = d.sink
                 GROUP BY d.sink ORDER BY d.sink COLLATE \"C\"",
                &[&PENDING, &DONE, &DEAD],
            )
            .await?;
        Ok(rows.iter().map(sink_row).collect::<Result<_, _>>()?)
    }

    /// How far a sink's output is known delivered (a file sink's length in
    /// bytes), as recorded with the deliveries it covers.
    pub async fn sink_offset(&self, sink: &str) -> Result<Option<u64>, PgStoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt("SELECT file_offset FROM sinks WHERE name = $1", &[&sink])
            .await?;
        let offset = match row {
            Some(row) => row.try_get::<_, Option<i64>>(0)?,
            None => None,
        };
        Ok(offset.map(|o| u64::try_from(o).unwrap_or(0)))
    }

    /// When the first pending delivery of each sink (in ingest order) was
    /// queued or replayed, unix ms, for the sinks that have one, in the order
    /// asked: one seek of the pending index per sink, so a scrape stays
    /// cheap on a backlog of millions.
    pub async fn oldest_pending(
        &self,
        sinks: Vec<String>,
    ) -> Result<Vec<(String, i64)>, PgStoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT s.sink, o.queued_at
                 FROM unnest($1::text[]) WITH ORDINALITY AS s(sink, n)
                 CROSS JOIN LATERAL (
                    SELECT queued_at FROM deliveries
                    WHERE sink = s.sink AND state = $2 ORDER BY event LIMIT 1) AS o
                 ORDER BY s.n",
                &[&sinks, &PENDING],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()?)
    }

    /// The thread root a sink keeps for a run: (channel, ts).
    pub async fn thread_root(
        &self,
        sink: &str,
        run_id: &str,
    ) -> Result<Option<(String, String)>, PgStoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT channel, ts FROM slack_threads WHERE sink = $1 AND run_id = $2",
                &[&sink, &run_id],
            )
            .await?;
        Ok(match row {
            Some(row) => Some((row.try_get(0)?, row.try_get(1)?)),
            None => None,
        })
    }
}

fn sink_row(row: &Row) -> Result<SinkRow, tokio_postgres::Error> {
    Ok(SinkRow {
        sink: row.try_get(0)?,
        pending: row.try_get(1)?,
        retrying: row.try_get(2)?,
        done: row.try_get(3)?,
        dead: row.try_get(4)?,
        down: row.try_get(5)?,
        last_success_at: row.try_get(6)?,
    })
}
