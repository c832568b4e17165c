//! Which sinks an event goes to. Pure: no I/O, no clock. Decided once at
//! ingest and stored with the deliveries, so a later config change never
//! re-routes an event already recorded.

use std::collections::BTreeMap;
use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};

/// A glob in `event_types` that does not compile.
#[derive(Debug, thiserror::Error)]
#[error("`{pattern}` is not a valid glob: {source}")]
pub struct GlobError {
    /// Its place in the list, so that config errors can point at it.
    pub index: usize,
    pub pattern: String,
    #[source]
    pub source: globset::Error,
}

/// A route's `event_types`, compiled once when the config is validated:
/// routing runs per event, so it must not parse globs.
#[derive(Debug, Clone)]
pub struct EventTypes {
    patterns: Vec<String>,
    set: GlobSet,
}

impl EventTypes {
    /// `*` is any text, `?` one character, `[A-Z]` a class, `{A,B}` either.
    pub fn new(patterns: Vec<String>) -> Result<Self, GlobError> {
        let mut builder = GlobSetBuilder::new();
        for (index, pattern) in patterns.iter().enumerate() {
            let glob = Glob::new(pattern).map_err(|source| GlobError {
                index,
                pattern: pattern.clone(),
                source,
            })?;
            builder.add(glob);
        }
        let set = builder.build().map_err(|source| GlobError {
            index: 0,
            pattern: patterns.join(", "),
            source,
        })?;
        Ok(Self { patterns, set })
    }

    /// The globs as written.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// No glob matches every type.
    pub fn matches(&self, event_type: &str) -> bool {
        self.patterns.is_empty() || self.set.is_match(event_type)
    }
}

/// The compiled set follows from the patterns.
impl PartialEq for EventTypes {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}

/// One `[[routes]]` entry, validated. An empty filter matches everything;
/// filters AND together, the values of one filter OR.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Globs over the event type (`ARTIFACT_*`).
    pub event_types: EventTypes,
    pub runs: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Run status when the event was seen.
    pub statuses: Vec<String>,
    /// Run phase when the event was seen.
    pub phases: Vec<String>,
    pub sinks: Vec<Arc<str>>,
}

/// What routing may look at.
#[derive(Debug, Clone, Copy)]
pub struct EventFacts<'a> {
    pub event_type: &'a str,
    pub run_id: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub status: Option<&'a str>,
    pub phase: Option<&'a str>,
}

impl Route {
    pub fn matches(&self, event: &EventFacts<'_>) -> bool {
        let any_of = |values: &[String], value: Option<&str>| {
            values.is_empty() || value.is_some_and(|v| values.iter().any(|x| x == v))
        };
        self.event_types.matches(event.event_type)
            && any_of(&self.runs, Some(event.run_id))
            && self
                .labels
                .iter()
                .all(|(k, v)| event.labels.get(k) == Some(v))
            && any_of(&self.statuses, event.status)
            && any_of(&self.phases, event.phase)
    }

    /// A short human description of the filters, for `runhook check`.
    pub fn describe_filters(&self) -> String {
        let mut parts = Vec::new();
        let mut list = |name: &str, values: &[String]| {
            if !values.is_empty() {
                parts.push(format!("{name}={}", values.join(",")));
            }
        };
        list("event_types", self.event_types.patterns());
        list("runs", &self.runs);
        list("statuses", &self.statuses);
        list("phases", &self.phases);
        for (k, v) in &self.labels {
            parts.push(format!("labels.{k}={v}"));
        }
        if parts.is_empty() {
            "everything".to_owned()
        } else {
            parts.join(" ")
        }
    }
}

/// The routing table.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Self {
        Self { routes }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The sinks every matching route names, each once, in name order.
    pub fn sinks_for(&self, event: &EventFacts<'_>) -> Vec<Arc<str>> {
        let mut sinks: Vec<Arc<str>> = Vec::new();
        for route in self.routes.iter().filter(|r| r.matches(event)) {
            for sink in &route.sinks {
                if !sinks.contains(sink) {
                    sinks.push(sink.clone());
                }
            }
        }
        sinks.sort();
        sinks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(sinks: &[&str]) -> Route {
        Route {
            event_types: EventTypes::new(vec![]).unwrap(),
            runs: vec![],
            labels: BTreeMap::new(),
            statuses: vec![],
            phases: vec![],
            sinks: sinks.iter().map(|s| Arc::from(*s)).collect(),
        }
    }

    fn facts<'a>(event_type: &'a str, labels: &'a BTreeMap<String, String>) -> EventFacts<'a> {
        EventFacts {
            event_type,
            run_id: "run-1",
            labels,
            status: Some("running"),
            phase: Some("plan"),
        }
    }

    #[test]
    fn no_filter_matches_everything() {
        let labels = BTreeMap::new();
        assert!(route(&["a"]).matches(&facts("ANYTHING_NEW", &labels)));
    }

    #[test]
    fn filters_and_together_values_or() {
        let mut r = route(&["a"]);
        r.event_types = EventTypes::new(vec!["ARTIFACT_*".into(), "run_finished".into()]).unwrap();
        r.labels = BTreeMap::from([("team".into(), "rome".into())]);
        let rome = BTreeMap::from([("team".to_owned(), "rome".to_owned())]);
        let oslo = BTreeMap::from([("team".to_owned(), "oslo".to_owned())]);
        assert!(r.matches(&facts("ARTIFACT_CREATED", &rome)));
        assert!(r.matches(&facts("run_finished", &rome)));
        assert!(!r.matches(&facts("PHASE_STARTED", &rome)));
        assert!(!r.matches(&facts("ARTIFACT_CREATED", &oslo)));
    }

    #[test]
    fn status_and_phase_filters_need_a_value() {
        let labels = BTreeMap::new();
        let mut r = route(&["a"]);
        r.statuses = vec!["failed".into()];
        assert!(!r.matches(&facts("X", &labels)));
        let mut seen = facts("X", &labels);
        seen.status = Some("failed");
        assert!(r.matches(&seen));
        r.phases = vec!["plan".into()];
        seen.phase = None;
        assert!(!r.matches(&seen));
    }

    #[test]
    fn each_sink_once_however_many_routes_match() {
        let labels = BTreeMap::new();
        let router = Router::new(vec![route(&["b", "a"]), route(&["a"]), route(&["c"])]);
        let sinks = router.sinks_for(&facts("X", &labels));
        let names: Vec<&str> = sinks.iter().map(|s| &**s).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }
}
