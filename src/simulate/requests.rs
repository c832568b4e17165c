//! The request log: every request the simulator answered, so that a test can
//! check what the daemon asked for (`since`, how often, in what order).

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One request the simulator answered, for tests to inspect.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoggedRequest {
    pub endpoint: String,
    pub run_id: Option<String>,
    pub since: Option<i64>,
    pub status: u16,
    /// Milliseconds since the simulator started.
    pub at_ms: u64,
}

#[derive(Debug)]
pub(super) struct RequestLog {
    started: Instant,
    requests: Mutex<Vec<LoggedRequest>>,
}

impl RequestLog {
    /// A log whose `at_ms` count from `started`.
    pub(super) fn new(started: Instant) -> Self {
        Self {
            started,
            requests: Mutex::new(Vec::new()),
        }
    }

    /// A panic elsewhere must not stop the fake upstream answering.
    fn lock(&self) -> MutexGuard<'_, Vec<LoggedRequest>> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn record(
        &self,
        endpoint: &str,
        run_id: Option<&str>,
        since: Option<i64>,
        status: u16,
    ) {
        let mut requests = self.lock();
        // Stamped under the lock, so the log is in `at_ms` order.
        let at_ms = self.started.elapsed().as_millis() as u64;
        requests.push(LoggedRequest {
            endpoint: endpoint.into(),
            run_id: run_id.map(str::to_owned),
            since,
            status,
            at_ms,
        });
    }

    pub(super) fn snapshot(&self) -> Vec<LoggedRequest> {
        self.lock().clone()
    }
}
