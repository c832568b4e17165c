//! The delivery engine's side of the Slack thread protocol: each Slack
//! sink's thread roots (and the notes written before posting one) kept in
//! the state database, so a sink never holds the store.

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::sink::slack::{ThreadBook, ThreadBookError, ThreadRoot};
use crate::store::{Reader, Store};

/// One sink's thread roots, by run.
pub struct StoredThreads {
    sink: Arc<str>,
    store: Store,
    reader: Reader,
}

impl StoredThreads {
    pub fn new(sink: Arc<str>, store: Store, reader: Reader) -> Self {
        Self {
            sink,
            store,
            reader,
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
                .reader
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
            self.store
                .save_thread_root(self.sink.clone(), run_id.to_owned(), root.channel, root.ts)
                .await
                .map_err(ThreadBookError::new)
        })
    }
}
