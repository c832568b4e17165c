//! Tasks owned by the daemon: aborted when their owner is dropped.

/// A spawned task that dies with its owner: if the daemon future is dropped
/// (a panic, a test simulating a crash), nothing it started runs on.
pub(super) struct Owned<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> Owned<T> {
    pub(super) fn new(handle: tokio::task::JoinHandle<T>) -> Self {
        Self(Some(handle))
    }

    /// Waits for the task; `None` if it panicked or was aborted.
    pub(super) async fn join(self) -> Option<T> {
        self.join_result().await.ok()
    }

    /// Waits for the task, with its panic if it panicked. The handle stays
    /// owned while waiting, so dropping the waiter still aborts the task.
    pub(super) async fn join_result(mut self) -> Result<T, tokio::task::JoinError> {
        let result = match self.0.as_mut() {
            Some(handle) => handle.await,
            None => std::future::pending().await,
        };
        self.0 = None;
        result
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if let Some(handle) = &self.0 {
            handle.abort();
        }
    }
}
