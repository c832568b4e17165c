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
}
