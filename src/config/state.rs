//! `[state]` (where runhook keeps cursors, events and the outbox) and the
//! optional `[server]`. The doc comments on the fields are the reference for
//! their keys; `config.example.toml` says the same.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::ApiConfig;
use super::check::{Cx, Result};
use super::raw::{RawConfig, RawServer, RawState};

/// `state.path`.
pub const DEFAULT_STATE_PATH: &str = "/var/lib/runhook/runhook.db";
/// `state.retain`.
pub const DEFAULT_RETAIN: Duration = Duration::from_secs(7 * 24 * 3600);
/// `state.shutdown_grace`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// `server.listen`: loopback, as metrics are not for the world.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9464,
));

/// `[state]`.
#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    /// `path`: the SQLite database (cursors, events, the delivery outbox),
    /// created 0600. Default [`DEFAULT_STATE_PATH`].
    pub path: PathBuf,
    /// `retain`: delivered events are pruned after this; dead letters are
    /// kept. At least `api.finished_linger`. Default [`DEFAULT_RETAIN`].
    pub retain: Duration,
    /// `shutdown_grace`: on SIGTERM, the time in-flight deliveries get to
    /// finish. Default [`DEFAULT_SHUTDOWN_GRACE`].
    pub shutdown_grace: Duration,
}

/// `[server]`: `/metrics`, `/healthz`, `/readyz`; off unless the table is
/// present.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// `listen`: address:port. Default [`DEFAULT_LISTEN`].
    pub listen: SocketAddr,
}

impl Cx<'_> {
    pub(super) fn state(&self, raw: &RawState) -> Result<StateConfig> {
        Ok(StateConfig {
            path: match &raw.path {
                Some(p) => PathBuf::from(self.non_empty(p, "state.path")?),
                None => PathBuf::from(DEFAULT_STATE_PATH),
            },
            retain: self.duration(raw.retain.as_ref(), "state.retain", DEFAULT_RETAIN)?,
            shutdown_grace: self.duration(
                raw.shutdown_grace.as_ref(),
                "state.shutdown_grace",
                DEFAULT_SHUTDOWN_GRACE,
            )?,
        })
    }

    pub(super) fn server(&self, raw: Option<&RawServer>) -> Result<Option<ServerConfig>> {
        let Some(server) = raw else {
            return Ok(None);
        };
        let listen = match &server.listen {
            Some(l) => {
                let text = self.non_empty(l, "server.listen")?;
                text.parse().map_err(|e| {
                    self.error(l, "server.listen", format!("not an address:port: {e}"))
                })?
            }
            None => DEFAULT_LISTEN,
        };
        Ok(Some(ServerConfig { listen }))
    }

    /// A failed run is looked at again for `finished_linger` (it may be
    /// retried upstream). Were its `run_finished` pruned meanwhile, seeing
    /// the same finish again would record it anew and deliver that id a
    /// second time. So `retain` must cover the linger.
    pub(super) fn check_retain_covers_linger(
        &self,
        raw: &RawConfig,
        state: &StateConfig,
        api: &ApiConfig,
    ) -> Result<()> {
        if state.retain >= api.finished_linger {
            return Ok(());
        }
        let (at, key, message) = match (&raw.state.retain, &raw.api.finished_linger) {
            (Some(retain), _) => (
                retain,
                "state.retain",
                format!(
                    "must be at least api.finished_linger ({})",
                    humantime::format_duration(api.finished_linger)
                ),
            ),
            (None, Some(linger)) => (
                linger,
                "api.finished_linger",
                format!(
                    "must not be longer than state.retain ({})",
                    humantime::format_duration(state.retain)
                ),
            ),
            (None, None) => return Ok(()),
        };
        Err(self.error(at, key, message))
    }
}
