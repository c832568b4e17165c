//! `[state]` (where runhook keeps cursors, events and the outbox), `[cluster]`
//! (this replica, when the state is shared) and the optional `[server]`. The doc comments on the fields are the reference for
//! their keys; `config.example.toml` says the same.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::check::{Cx, Result};
use super::raw::{RawCluster, RawConfig, RawServer, RawState, RawStateOnly};
use super::{ApiConfig, ConfigError, Secret};
use crate::store::Location;
use crate::store::pg::Replica;

/// `state.path`.
pub const DEFAULT_STATE_PATH: &str = "/var/lib/runhook/runhook.db";
/// `state.retain`.
pub const DEFAULT_RETAIN: Duration = Duration::from_secs(7 * 24 * 3600);
/// `state.shutdown_grace`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// `cluster.lease_ttl`: a dead replica's runs move to the others within
/// this (and a tick).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);
/// The shortest `cluster.lease_ttl`: leases are renewed every third of it,
/// and a renewal is a round trip to the database that must fit.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(3);
/// `cluster.node` when the host has no usable name.
const FALLBACK_NODE: &str = "runhook";
/// How many runs above its fair share a replica may hold: one spares the
/// replicas a shed-and-claim each time the count of runs moves by one.
const SHARE_SLACK: usize = 1;
/// `server.listen`: loopback, as metrics are not for the world.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9464,
));

/// The shortest `server.token` taken: the watch endpoints may face a
/// network, and a short token is guessed.
pub const MIN_WATCH_TOKEN_LEN: usize = 16;

/// `[state]`.
#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    /// `path`: the SQLite database (cursors, events, the delivery outbox),
    /// created 0600. Default [`DEFAULT_STATE_PATH`]. Or `url` / `url_file`:
    /// a PostgreSQL database (`postgres://user@host:5432/db`, or libpq's
    /// `host=... dbname=...` pairs) shared by several replicas; `url_file`
    /// keeps a password out of the config. One of `path` and `url`.
    pub location: Location,
    /// `retain`: delivered events are pruned after this; dead letters are
    /// kept. A finished run with no event left then leaves the runs table
    /// for a tombstone (`store::retention`). At least
    /// `api.finished_linger`. Default [`DEFAULT_RETAIN`].
    pub retain: Duration,
    /// `shutdown_grace`: on SIGTERM, the time in-flight deliveries get to
    /// finish. Default [`DEFAULT_SHUTDOWN_GRACE`].
    pub shutdown_grace: Duration,
}

/// `[cluster]`: this replica, when the state is PostgreSQL (ignored on
/// SQLite, where one daemon owns every run).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// `node`: this replica's name, unique among those sharing the
    /// database; what `status` shows as a run's owner and what a file
    /// sink's `node` names. Default: the host name.
    pub node: String,
    /// `lease_ttl`: how long a run's lease lasts unrenewed (renewed every
    /// third of it); a stopped or cut-off replica's runs move to the others
    /// after it. At least [`MIN_LEASE_TTL`]. Default [`DEFAULT_LEASE_TTL`].
    pub lease_ttl: Duration,
}

impl ClusterConfig {
    /// What the PostgreSQL store needs to know of this replica.
    pub fn replica(&self) -> Replica {
        Replica {
            node: self.node.clone(),
            lease_ttl: self.lease_ttl,
            share_slack: SHARE_SLACK,
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node: host_name(),
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }
}

/// The host name, the default `cluster.node`: distinct per machine, and
/// what an operator recognises in `status`.
fn host_name() -> String {
    let name = gethostname::gethostname()
        .to_string_lossy()
        .trim()
        .to_owned();
    if name.is_empty() {
        FALLBACK_NODE.to_owned()
    } else {
        name
    }
}

/// `[server]`: `/metrics`, `/healthz`, `/readyz`; off unless the table is
/// present.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// `listen`: address:port. Default [`DEFAULT_LISTEN`].
    pub listen: SocketAddr,
    /// `token` or `token_file`: the bearer token of `PUT` and `DELETE
    /// /v1/watch/{runId}`, which let the machine that starts runs have
    /// runhook follow them. No token, no such endpoints: the server then
    /// changes nothing. No default.
    pub watch_token: Option<Secret>,
}

impl StateConfig {
    /// Reads only `[state]` of a config file, for the commands that need
    /// nothing but the state database (`status`, `dead`, `replay`, `tail`,
    /// `watch`, ...). Outside the service unit the `*_file` secrets under
    /// `/run/credentials/` and the unit's environment are not there, and
    /// these commands must work anyway: so the rest of the file is only
    /// parsed as TOML, never resolved. `[state]` itself is validated as
    /// [`super::Config::load`] does, with the same errors and locations.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = super::read_config_file(path)?;
        Self::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// [`StateConfig::load`] on config text; `env` resolves `${VAR}` in
    /// `[state]` only.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        super::check::parse_with(text, path, env, |cx, raw: RawStateOnly| {
            cx.state(&raw.state)
        })
    }
}

impl Cx<'_> {
    pub(super) fn state(&self, raw: &RawState) -> Result<StateConfig> {
        Ok(StateConfig {
            location: self.location(raw)?,
            retain: self.duration(raw.retain.as_ref(), "state.retain", DEFAULT_RETAIN)?,
            shutdown_grace: self.duration(
                raw.shutdown_grace.as_ref(),
                "state.shutdown_grace",
                DEFAULT_SHUTDOWN_GRACE,
            )?,
        })
    }

    /// `state.path`, or `state.url` / `state.url_file`; never both, so a
    /// config cannot leave the reader guessing which state is live.
    fn location(&self, raw: &RawState) -> Result<Location> {
        let given = (raw.url.as_ref().map(|at| (at, "state.url")))
            .or_else(|| raw.url_file.as_ref().map(|at| (at, "state.url_file")));
        let url = self.secret(raw.url.as_ref(), raw.url_file.as_ref(), "state.url")?;
        let (Some(url), Some((at, key))) = (url, given) else {
            return Ok(Location::Sqlite(match &raw.path {
                Some(p) => PathBuf::from(self.non_empty(p, "state.path")?),
                None => PathBuf::from(DEFAULT_STATE_PATH),
            }));
        };
        if let Some(path) = &raw.path {
            return Err(self.error(
                path,
                "state.path",
                "set `state.path` (SQLite) or `state.url` (PostgreSQL), not both",
            ));
        }
        // The text is never quoted back: it may hold a password.
        let parsed = url.expose().parse::<tokio_postgres::Config>().map_err(|error| {
            self.error(
                at,
                key,
                format!("not a PostgreSQL URL (postgres://user@host:5432/db) or key=value pairs: {error}"),
            )
        })?;
        if key == "state.url" && parsed.get_password().is_some() {
            self.warn(
                at,
                key,
                "the URL holds a password in the config file; `state.url_file` keeps it in a file only runhook reads",
            );
        }
        Ok(Location::Postgres(url.expose().to_owned()))
    }

    pub(super) fn cluster(&self, raw: &RawCluster) -> Result<ClusterConfig> {
        let node = match &raw.node {
            Some(node) => {
                let name = self.non_empty(node, "cluster.node")?;
                if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(self.error(
                        node,
                        "cluster.node",
                        "a node name has no spaces or control characters",
                    ));
                }
                name
            }
            None => host_name(),
        };
        let lease_ttl = self.duration_at_least(
            raw.lease_ttl.as_ref(),
            "cluster.lease_ttl",
            DEFAULT_LEASE_TTL,
            MIN_LEASE_TTL,
        )?;
        Ok(ClusterConfig { node, lease_ttl })
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
        let watch_token = self.secret(
            server.token.as_ref(),
            server.token_file.as_ref(),
            "server.token",
        )?;
        let given_at = (server.token.as_ref().map(|at| (at, "server.token"))).or_else(|| {
            server
                .token_file
                .as_ref()
                .map(|at| (at, "server.token_file"))
        });
        if let (Some(token), Some((at, key))) = (&watch_token, given_at)
            && token.expose().len() < MIN_WATCH_TOKEN_LEN
        {
            return Err(self.error(
                at,
                key,
                format!("the token must be at least {MIN_WATCH_TOKEN_LEN} characters"),
            ));
        }
        Ok(Some(ServerConfig {
            listen,
            watch_token,
        }))
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// What the README recommends for a service: secrets in systemd
    /// credentials and the environment, neither there outside the unit.
    const SERVICE_CONFIG: &str = r#"
[api]
token = "${TRAVELMODE_TOKEN}"
session_cookie_file = "/run/credentials/runhook.service/absent-session"

[state]
path = "${STATE_DIR:-/var/lib/runhook}/runhook.db"
retain = "3d"

[sinks.chat]
type = "slack"
webhook_url_file = "/run/credentials/runhook.service/absent-slack"

[[routes]]
sinks = ["chat"]
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn state_only_loading_resolves_no_secret_and_no_variable_outside_state() {
        let path = Path::new("runhook.toml");
        assert!(
            crate::config::Config::parse(SERVICE_CONFIG, path, &no_env).is_err(),
            "the full config needs the secrets and the token"
        );
        let state = StateConfig::parse(SERVICE_CONFIG, path, &no_env).expect("[state] alone");
        assert_eq!(
            state.location,
            Location::Sqlite("/var/lib/runhook/runhook.db".into())
        );
        assert_eq!(state.retain, Duration::from_secs(3 * 86400));
    }

    #[test]
    fn state_only_loading_expands_variables_in_state() {
        let env = |name: &str| (name == "STATE_DIR").then(|| "/srv/rh".to_owned());
        let state = StateConfig::parse(SERVICE_CONFIG, Path::new("c.toml"), &env).unwrap();
        assert_eq!(
            state.location,
            Location::Sqlite("/srv/rh/runhook.db".into())
        );
    }

    #[test]
    fn state_only_loading_reports_state_errors_where_the_full_load_does() {
        let text = "[api]\ntoken = \"t\"\n[state]\nretain = \"soon\"\n";
        let path = Path::new("c.toml");
        let full = crate::config::Config::parse(text, path, &no_env).unwrap_err();
        let alone = StateConfig::parse(text, path, &no_env).unwrap_err();
        assert_eq!(alone, full);
        assert_eq!((alone.line, alone.column), (4, 10), "{alone}");
        assert_eq!(alone.key, "state.retain");
    }

    #[test]
    fn state_only_loading_refuses_unknown_state_keys_and_bad_toml() {
        let path = Path::new("c.toml");
        let unknown = StateConfig::parse("[state]\npaht = \"/x\"\n", path, &no_env).unwrap_err();
        assert_eq!((unknown.line, unknown.key.as_str()), (2, "state.paht"));
        let broken = StateConfig::parse("[api\n[state]\n", path, &no_env).unwrap_err();
        assert_eq!(broken.line, 1, "{broken}");
    }

    #[test]
    fn state_only_loading_defaults_without_a_state_table() {
        let state = StateConfig::parse("[api]\ntoken = \"t\"\n", Path::new("c"), &no_env).unwrap();
        assert_eq!(state.location, Location::Sqlite(DEFAULT_STATE_PATH.into()));
    }
}
