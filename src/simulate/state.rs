//! The state every handler shares: the runs, the faults, the request log and
//! the scenario's settings, and who a request authenticates as.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use axum::http::{HeaderMap, header};

use super::faults::Faults;
use super::requests::RequestLog;
use super::run::SimRun;
use super::scenario::StreamStyle;
use super::{OTHER_USER_TOKEN, USER};

pub(super) struct Sim {
    pub(super) token: String,
    pub(super) session: String,
    pub(super) page_size: usize,
    pub(super) heartbeat: Duration,
    pub(super) style: StreamStyle,
    pub(super) runs: Mutex<HashMap<String, SimRun>>,
    pub(super) faults: Faults,
    pub(super) log: RequestLog,
    pub(super) next_id: Mutex<u64>,
}

impl Sim {
    /// A panic elsewhere must not stop the fake upstream answering.
    pub(super) fn lock_runs(&self) -> MutexGuard<'_, HashMap<String, SimRun>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn record(
        &self,
        endpoint: &str,
        run_id: Option<&str>,
        since: Option<i64>,
        status: u16,
    ) {
        self.log.record(endpoint, run_id, since, status);
    }

    /// The next id `POST /v1/agent-runs` hands out.
    pub(super) fn new_run_id(&self) -> String {
        let mut next = self.next_id.lock().unwrap_or_else(|p| p.into_inner());
        *next += 1;
        format!("sim-run-{:04}", *next - 1)
    }

    /// The user a request authenticates as; `cookie_only` for the stream.
    pub(super) fn user(&self, headers: &HeaderMap, cookie_only: bool) -> Option<&'static str> {
        let cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().strip_prefix("session_token="))
            .any(|v| v == self.session);
        if cookie {
            return Some(USER);
        }
        if cookie_only {
            return None;
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match bearer {
            Some(t) if t == self.token => Some(USER),
            Some(OTHER_USER_TOKEN) => Some("user-2"),
            _ => None,
        }
    }
}
