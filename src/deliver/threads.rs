//! The delivery engine's side of the Slack thread protocol: each Slack
//! sink's thread roots (and the notes written before posting one) kept in
//! the state database, so a sink never holds the store.

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::sink::slack::{ThreadBook, ThreadBookError, ThreadRoot};
use crate::store::{Fence, State};

/// One sink's thread roots, by run.
pub struct StoredThreads {
    sink: Arc<str>,
    state: State,
    /// What a root is saved under: a root is a run's data, written only by
    /// the run's owner. The sink's `ThreadBook` calls carry no fence, so
    /// the fence comes with the book from whoever starts the sink.
    fence: Fence,
}

impl StoredThreads {
    pub fn new(sink: Arc<str>, state: State, fence: Fence) -> Self {
        Self { sink, state, fence }
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
            self.state
                .save_thread_root(
                    &self.fence,
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
