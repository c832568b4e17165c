//! Sink leases: the fence of a sink that one node writes (a file sink in a
//! cluster), whose writes span every run and so cannot be fenced by any
//! run's lease.
//!
//! Why a lease and not just the config's `node = "name"`: a name is only a
//! claim about oneself. Two processes may both believe they are the node
//! (the same name given to two machines by mistake, or a process paused
//! past its turn while a restarted one carries on), and each would mark
//! its own file's lines delivered in the shared state. A per-sink row with
//! an epoch, as `leases` keeps for runs, makes that impossible:
//! - **claim**: one statement takes the row only when it is unowned or
//!   expired (`now()`, the server's clock), raising the epoch. A second
//!   process with the same node name finds it owned and waits; a restart
//!   after a crash waits out the dead process's ttl (a clean stop releases
//!   at once).
//! - **renew** every ttl / 3 where owner and epoch still match; the loop
//!   stops writing when it could not renew for two thirds of a ttl, before
//!   the server can let the lease go.
//! - **fence**: every write of the sink's loop (`mark_sink_delivered`,
//!   `record_sink_failure`, `mark_found_delivered`) reads the row `FOR
//!   SHARE` with its epoch in its own transaction: a stale holder commits
//!   nothing ([`PgStoreError::SinkLeaseLost`]), and a claim waits for a
//!   write in flight to commit or roll back.
//!
//! What the fence cannot undo is a line the stale holder had already
//! appended to its own file: it stays there unmarked, and the new holder
//! delivers the event again under the same id (at-least-once, as a stale
//! run owner's send).

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Transaction;

use super::super::{DeliveryState, Failure, now_ms};
use super::deliveries::{set_delivered, set_failed};
use super::{PgStore, PgStoreError};

const PENDING: i16 = DeliveryState::Pending as i16;
const DONE: i16 = DeliveryState::Done as i16;
const DEAD: i16 = DeliveryState::Dead as i16;

/// A sink this node writes, and the epoch that fences its writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SinkLease {
    pub sink: Arc<str>,
    pub epoch: i64,
}

impl PgStore {
    /// How long a lease (a run's or a sink's) lasts unrenewed.
    pub fn lease_ttl(&self) -> Duration {
        self.replica.lease_ttl
    }

    /// Takes the sink's lease for this node when nobody holds it (unowned
    /// or expired), with a raised epoch; `None` while another process holds
    /// it, whatever its node's name.
    pub async fn claim_sink(&self, sink: &str) -> Result<Option<SinkLease>, PgStoreError> {
        let client = self.lease_pool.get().await?;
        let row = client
            .query_opt(
                "INSERT INTO sink_leases AS l (sink, owner, epoch, expires_at)
                 VALUES ($1, $2, 1, now() + $3::bigint * interval '1 millisecond')
                 ON CONFLICT (sink) DO UPDATE SET owner = excluded.owner,
                    epoch = l.epoch + 1, expires_at = excluded.expires_at
                 WHERE l.owner IS NULL OR l.expires_at <= now()
                 RETURNING l.epoch",
                &[&sink, &self.node(), &self.ttl_ms()],
            )
            .await?;
        Ok(match row {
            Some(row) => Some(SinkLease {
                sink: Arc::from(sink),
                epoch: row.try_get(0)?,
            }),
            None => None,
        })
    }

    /// Renews the sink's lease for another ttl. `false`: it was lost (taken
    /// over after it expired, or released).
    pub async fn renew_sink(&self, lease: &SinkLease) -> Result<bool, PgStoreError> {
        let client = self.lease_pool.get().await?;
        let renewed = client
            .execute(
                "UPDATE sink_leases SET expires_at = now() + $4::bigint * interval '1 millisecond'
                 WHERE sink = $1 AND epoch = $2 AND owner = $3",
                &[&&*lease.sink, &lease.epoch, &self.node(), &self.ttl_ms()],
            )
            .await?;
        Ok(renewed > 0)
    }

    /// Gives the sink up (a clean stop): unowned and expired now, so the
    /// node's next process claims it at once.
    pub async fn release_sink(&self, lease: &SinkLease) -> Result<(), PgStoreError> {
        let client = self.lease_pool.get().await?;
        client
            .execute(
                "UPDATE sink_leases SET owner = NULL, expires_at = now()
                 WHERE sink = $1 AND epoch = $2 AND owner = $3",
                &[&&*lease.sink, &lease.epoch, &self.node()],
            )
            .await?;
        Ok(())
    }

    /// Deliveries of the lease's sink that reached it, whatever their runs,
    /// with the sink's output `offset` in the same transaction. Refused,
    /// nothing written, when the sink's lease was lost.
    pub async fn mark_sink_delivered(
        &self,
        lease: &SinkLease,
        events: Vec<i64>,
        offset: Option<u64>,
    ) -> Result<(), PgStoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        fence_sink(&tx, self.node(), lease).await?;
        set_delivered(&tx, &lease.sink, None, &events, offset).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A failed attempt of deliveries of the lease's sink: counted and
    /// scheduled, or dead-lettered. Refused when the sink's lease was lost.
    pub async fn record_sink_failure(
        &self,
        lease: &SinkLease,
        failure: Failure,
    ) -> Result<(), PgStoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        fence_sink(&tx, self.node(), lease).await?;
        set_failed(&tx, &lease.sink, None, &failure).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The sink found these events already written past its recorded offset
    /// (a file sink at start-up: written, then a crash before they were
    /// marked done): they are delivered, and `offset` is where the sink now
    /// stands, in one transaction. A dead letter among them is delivered
    /// too: the sink has it. Fenced like the sink's other writes: a process
    /// whose lease was refused must not mark its file's lines by
    /// reconciling instead. Returns how many deliveries it marked.
    pub async fn mark_found_delivered(
        &self,
        lease: &SinkLease,
        found: Vec<String>,
        offset: u64,
    ) -> Result<usize, PgStoreError> {
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        fence_sink(&tx, self.node(), lease).await?;
        let marked = tx
            .execute(
                "UPDATE deliveries d SET state = $3, attempts = d.attempts + 1, done_at = $4,
                    last_status = NULL, last_error = NULL
                 FROM events e
                 WHERE e.id = ANY($2) AND d.event = e.rowid AND d.sink = $1
                   AND d.state IN ($5, $6)",
                &[&&*lease.sink, &found, &DONE, &now_ms(), &PENDING, &DEAD],
            )
            .await?;
        tx.execute(
            "INSERT INTO sinks (name, file_offset) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET file_offset = excluded.file_offset",
            &[&&*lease.sink, &offset],
        )
        .await?;
        tx.commit().await?;
        Ok(usize::try_from(marked).unwrap_or(usize::MAX))
    }
}

/// The sink's fencing check, inside the caller's transaction, as [`super::fence`]
/// checks a run's: owner and epoch must match, and `FOR SHARE` keeps a claim
/// from slipping in between check and commit.
async fn fence_sink(
    tx: &Transaction<'_>,
    node: &str,
    lease: &SinkLease,
) -> Result<(), PgStoreError> {
    let held = tx
        .query_opt(
            "SELECT 1 FROM sink_leases WHERE sink = $1 AND epoch = $2 AND owner = $3 FOR SHARE",
            &[&&*lease.sink, &lease.epoch, &node],
        )
        .await?;
    match held {
        Some(_) => Ok(()),
        None => Err(PgStoreError::SinkLeaseLost {
            sink: lease.sink.clone(),
            epoch: lease.epoch,
        }),
    }
}
