//! The delivery engine's side of the Slack thread protocol: each Slack
//! sink's thread roots (and the notes written before posting one) kept in
//! the state database, so a sink never holds the store.

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::ownership::Ownership;
use crate::sink::slack::{ThreadBook, ThreadBookError, ThreadRoot};
use crate::store::{State, StateError};

/// One sink's thread roots, by run.
pub struct StoredThreads {
    sink: Arc<str>,
    state: State,
    /// Who owns each run: a root is a run's data, saved only under the
    /// run's fence. The sink's `ThreadBook` calls carry none, and one fence
    /// for the whole sink would be one run's lease on PostgreSQL, so each
    /// `keep` asks for its run's.
    ownership: Ownership,
}

impl StoredThreads {
    pub fn new(sink: Arc<str>, state: State, ownership: Ownership) -> Self {
        Self {
            sink,
            state,
            ownership,
        }
    }
}

impl ThreadBook for StoredThreads {
    fn thread<'a>(
        &'a self,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ThreadRoot>, ThreadBookError>> {
        Box::pin(async move {
            let kept = self
                .state
                .thread_root(&self.sink, run_id)
                .await
                .map_err(ThreadBookError::new)?;
            Ok(kept.map(|(channel, ts)| ThreadRoot { channel, ts }))
        })
    }

    /// The run's fence now, trust included: a lease past two thirds of a
    /// ttl without renewal (a pause) is no longer this process's.
    fn may_send(&self, run_id: &str) -> bool {
        self.ownership.fence(run_id).is_some()
    }

    fn keep<'a>(
        &'a self,
        run_id: &'a str,
        root: ThreadRoot,
    ) -> BoxFuture<'a, Result<(), ThreadBookError>> {
        Box::pin(async move {
            // Not held (lost since the chain started): refused like a write
            // under a lost lease; the run's new owner posts or keeps it.
            let fence = self.ownership.fence(run_id).ok_or_else(|| {
                ThreadBookError::new(StateError::Unfenced {
                    write: "save_thread_root",
                })
            })?;
            self.state
                .save_thread_root(
                    &fence,
                    self.sink.clone(),
                    run_id.to_owned(),
                    root.channel,
                    root.ts,
                )
                .await
                .map_err(ThreadBookError::new)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Sqlite;

    /// A run this replica does not hold (lost since its chain started, or
    /// never held): its root is not saved, whatever fence the sink began
    /// with; one sink-wide fence would have saved it.
    #[tokio::test]
    async fn a_root_is_kept_only_under_the_runs_own_fence() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::Sqlite(Sqlite::open_path(&dir.path().join("state.db")).unwrap());
        let (_publisher, nothing_held) = Ownership::leased();
        let threads = StoredThreads::new("chat".into(), state.clone(), nothing_held);
        let root = || ThreadRoot {
            channel: "C1".into(),
            ts: "1.1".into(),
        };
        let refused = threads.keep("r1", root()).await;
        assert!(refused.is_err(), "kept without the run's fence");
        assert!(threads.thread("r1").await.unwrap().is_none());

        let exclusive = StoredThreads::new("chat".into(), state, Ownership::exclusive());
        exclusive.keep("r1", root()).await.unwrap();
        let kept = exclusive.thread("r1").await.unwrap();
        assert_eq!(kept.map(|r| r.ts), Some("1.1".to_owned()));
    }

    /// The sink asks right before each Slack call: a lease whose trust
    /// lapsed (a pause past two thirds of a ttl) is no longer the run's.
    #[tokio::test]
    async fn a_run_may_be_sent_for_only_while_its_lease_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::Sqlite(Sqlite::open_path(&dir.path().join("state.db")).unwrap());
        let (publisher, ownership) = Ownership::leased();
        let threads = StoredThreads::new("chat".into(), state.clone(), ownership);
        let lease = |epoch| crate::store::pg::Lease {
            run_id: "r1".into(),
            epoch,
        };
        let now = std::time::Instant::now();
        publisher.publish([(lease(1), now + std::time::Duration::from_secs(60))]);
        assert!(threads.may_send("r1"));
        assert!(!threads.may_send("r2"), "never held");
        publisher.publish([(lease(1), now - std::time::Duration::from_millis(1))]);
        assert!(!threads.may_send("r1"), "its trust lapsed");
        let exclusive = StoredThreads::new("chat".into(), state, Ownership::exclusive());
        assert!(exclusive.may_send("r1"));
    }
}
