//! The states the store keeps, as types, each with its one mapping to and
//! from SQL. Code outside this file names a variant, never the stored text
//! or number, so a typo is a compile error rather than a run that `status`
//! shows in a state nothing else recognises.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Serialize, Serializer};

use crate::config::Transport;

/// The stored number of each [`DeliveryState`], as a literal. SQL that must
/// name a state as a constant (the partial indexes `deliveries_pending`,
/// `deliveries_done` and `deliveries_dead` are used only when a query's
/// `WHERE` states the index's literal) builds it with `concat!`; the enum's
/// discriminants come from here too, so the two cannot drift apart.
macro_rules! delivery_state {
    (pending) => {
        0
    };
    (done) => {
        1
    };
    (dead) => {
        2
    };
}

/// Where a delivery is: waiting for its sink, delivered, or given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Not yet delivered; `next_attempt_at` says when it is due.
    Pending = delivery_state!(pending),
    /// The sink accepted it.
    Done = delivery_state!(done),
    /// Given up on: in the dead-letter list until replayed or purged.
    Dead = delivery_state!(dead),
}

impl ToSql for DeliveryState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(*self as i64))
    }
}

impl FromSql for DeliveryState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value.as_i64()? {
            delivery_state!(pending) => Ok(Self::Pending),
            delivery_state!(done) => Ok(Self::Done),
            delivery_state!(dead) => Ok(Self::Dead),
            other => Err(FromSqlError::OutOfRange(other)),
        }
    }
}

/// What ingest is doing with a run, as `status` and the `runhook_runs`
/// metric show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunState {
    /// Subscribed; no follower has reported yet.
    Starting,
    /// Events flow (or the run is idle) on the active transport.
    Following,
    /// `run_finished` recorded at the run's last sequence.
    Finished,
    /// The credential was refused (401); retried slowly.
    AuthFailed,
    /// Upstream confirmed 404 over the whole window: stopped until `watch`.
    NotFound,
    /// 403: this credential may not read the run; stopped until `watch`.
    Forbidden,
    /// An event upstream cannot be decoded; retried slowly.
    Stalled,
    /// A final status arrived before the cursor reached the run's end.
    CatchingUp,
    /// A transient upstream error; retried with backoff.
    Retrying,
    /// The stream dropped; reconnecting from the cursor.
    Reconnecting,
}

impl RunState {
    pub const ALL: [Self; 10] = [
        Self::Starting,
        Self::Following,
        Self::Finished,
        Self::AuthFailed,
        Self::NotFound,
        Self::Forbidden,
        Self::Stalled,
        Self::CatchingUp,
        Self::Retrying,
        Self::Reconnecting,
    ];

    /// See [`RunState::is_ended`].
    pub const ENDED: [Self; 2] = [Self::NotFound, Self::Forbidden];

    /// As stored in `runs.state` and shown by `status` and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Following => "following",
            Self::Finished => "finished",
            Self::AuthFailed => "auth_failed",
            Self::NotFound => "not_found",
            Self::Forbidden => "forbidden",
            Self::Stalled => "stalled",
            Self::CatchingUp => "catching_up",
            Self::Retrying => "retrying",
            Self::Reconnecting => "reconnecting",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }

    /// Stopped by a 403 or a confirmed 404: ingest does not start the run
    /// again by itself; `watch` (or a daemon restart) gives it another
    /// chance. A finished run's task decides itself whether it lingers.
    pub fn is_ended(self) -> bool {
        Self::ENDED.contains(&self)
    }

    /// Being followed, so the age of its last event means something.
    pub fn is_following(self) -> bool {
        matches!(self, Self::Following | Self::Reconnecting | Self::Retrying)
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tests and tools compare a row's state with what `status` prints.
impl PartialEq<&str> for RunState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for RunState {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl Serialize for RunState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl ToSql for RunState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

/// A state this build does not know (written by a newer runhook before a
/// downgrade: a new state bumps no schema version, or by hand) reads as
/// `starting`, never as an error: one such row must not stop every run from
/// being read, and so followed. Following it again from its cursor is
/// always safe, and its next write stores a state this build knows.
impl FromSql for RunState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        Ok(Self::parse(value.as_str()?).unwrap_or(Self::Starting))
    }
}

/// A transport in `runs.transport` (requested) or `runs.active_transport`
/// (in use), stored as the config spells it.
pub(crate) struct StoredTransport(pub Transport);

impl ToSql for StoredTransport {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.0.name()))
    }
}

/// A transport this build does not know reads as `auto` (the config's
/// choice), for the same reason as an unknown [`RunState`].
impl FromSql for StoredTransport {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        Ok(Self(
            Transport::parse(value.as_str()?).unwrap_or(Transport::Auto),
        ))
    }
}

/// `status --json` shows a transport as the config spells it.
pub(crate) fn serialize_transport<S: Serializer>(
    transport: &Option<Transport>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match transport {
        Some(t) => serializer.serialize_some(t.name()),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;

    fn round_trip<T: ToSql + FromSql>(value: T) -> T {
        let conn = Connection::open_in_memory().unwrap();
        conn.query_row("SELECT ?1", [value], |r| r.get(0)).unwrap()
    }

    /// The stored numbers are in every existing database and in the schema's
    /// partial indexes: they never change.
    #[test]
    fn delivery_states_keep_their_numbers() {
        for (state, number) in [
            (DeliveryState::Pending, 0),
            (DeliveryState::Done, 1),
            (DeliveryState::Dead, 2),
        ] {
            assert_eq!(state as i64, number);
            assert_eq!(round_trip(state), state);
        }
        let conn = Connection::open_in_memory().unwrap();
        let unknown: rusqlite::Result<DeliveryState> = conn.query_row("SELECT 3", [], |r| r.get(0));
        assert!(unknown.is_err(), "3 is no delivery state");
    }

    /// The schema's partial indexes (frozen in their migration) spell the
    /// states as numbers; a query reaches them only when it states the same
    /// number, so the enum and the indexes must agree.
    #[test]
    fn the_partial_indexes_name_the_delivery_states() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        for (index, state) in [
            ("deliveries_pending", DeliveryState::Pending),
            ("deliveries_pending_by_run", DeliveryState::Pending),
            ("deliveries_done", DeliveryState::Done),
            ("deliveries_dead", DeliveryState::Dead),
        ] {
            let sql: String = conn
                .query_row(
                    "SELECT sql FROM sqlite_master WHERE name = ?1",
                    [index],
                    |r| r.get(0),
                )
                .unwrap();
            assert!(
                sql.ends_with(&format!("WHERE state = {}", state as i64)),
                "{index}: {sql}"
            );
        }
    }

    /// Each run state reads back as itself, and each has its own text.
    #[test]
    fn run_states_round_trip_through_sql() {
        let mut texts = std::collections::HashSet::new();
        for state in RunState::ALL {
            assert_eq!(round_trip(state), state);
            assert!(texts.insert(state.as_str()), "{state} twice");
        }
        assert_eq!(RunState::AuthFailed.as_str(), "auth_failed");
        assert_eq!(RunState::parse("following"), Some(RunState::Following));
        assert_eq!(RunState::parse("Following"), None);
    }

    #[test]
    fn transports_round_trip_through_sql() {
        for transport in [Transport::Auto, Transport::Sse, Transport::Poll] {
            assert_eq!(round_trip(StoredTransport(transport)).0, transport);
        }
    }
}
