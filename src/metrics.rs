//! Prometheus metrics: counters and histograms updated where things happen,
//! gauges filled from the store when `/metrics` is scraped. The exposition is
//! the Prometheus text format (`promtool check metrics` clean).
//!
//! No series is labelled by run: 10,000 runs must not make 10,000 series.
//! Runs show as aggregates (runs by state, the longest silence among
//! followed runs). Counters are created at 0 for every label set known at
//! start, so that `increase()` sees the first event too.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder, exponential_buckets,
};

/// Outcomes of `runhook_deliveries_total`.
pub const OUTCOMES: [&str; 3] = ["delivered", "retry", "dead"];
/// Transports of `runhook_events_ingested_total`.
pub const TRANSPORTS: [&str; 2] = ["poll", "sse"];
/// Status classes of `runhook_upstream_requests_total` (`error`: no answer).
pub const CLASSES: [&str; 4] = ["2xx", "4xx", "5xx", "error"];
/// Changes of `runhook_lease_changes_total`: claimed, taken over or shed,
/// and dropped by this replica because it could not renew in time.
pub const LEASE_CHANGES: [&str; 3] = ["gained", "lost", "overdue"];

pub struct Metrics {
    /// `transport`: poll | sse.
    pub events_ingested: IntCounterVec,
    /// `sink`, `outcome`: delivered | retry | dead.
    pub deliveries: IntCounterVec,
    /// `sink`: from event recorded to delivered.
    pub delivery_latency: HistogramVec,
    /// `class`: 2xx, 4xx, 5xx, error (no answer).
    pub upstream_requests: IntCounterVec,
    /// Until the answer's status line (or the failure) of a poll or lookup.
    pub upstream_duration: Histogram,
    pub stream_reconnects: IntCounter,
    pub pending: IntGaugeVec,
    pub dead: IntGaugeVec,
    /// `sink`: age of the first pending delivery in ingest order (since
    /// queued or replayed): an index seek, where the exact oldest is a scan.
    pub oldest_pending_age: GaugeVec,
    pub sink_up: IntGaugeVec,
    /// `sink`: delivery loops restarted after they could not start, ended or panicked.
    pub sink_restarts: IntCounterVec,
    /// `state`: following, reconnecting, finished, auth_failed, ...
    pub runs: IntGaugeVec,
    /// Seconds since the last event of the followed run silent the longest.
    pub longest_run_silence: Gauge,
    /// Runs whose leases this replica holds (PostgreSQL; 0 on SQLite).
    pub leases_held: IntGauge,
    /// `change`: gained, lost, overdue.
    pub lease_changes: IntCounterVec,
    /// `node`: this replica's `[cluster] node`, 1 on PostgreSQL, so every
    /// series of a scrape can be joined to the replica that exported it.
    node_info: IntGaugeVec,
    registry: Registry,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric")
}

impl Metrics {
    fn new() -> Self {
        let metrics = Self {
            events_ingested: counter(
                "runhook_events_ingested_total",
                "Upstream events recorded, by transport.",
                &["transport"],
            ),
            deliveries: counter(
                "runhook_deliveries_total",
                "Delivery attempts by sink and outcome.",
                &["sink", "outcome"],
            ),
            delivery_latency: histogram(
                "runhook_delivery_latency_seconds",
                "Seconds from event recorded to delivered, by sink.",
                &["sink"],
                exponential_buckets(0.001, 2.0, 20).expect("valid buckets"),
            ),
            upstream_requests: counter(
                "runhook_upstream_requests_total",
                "Upstream requests by status class.",
                &["class"],
            ),
            upstream_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "runhook_upstream_request_duration_seconds",
                    "Seconds from sending a poll or run lookup to its status line (or failure).",
                )
                .buckets(exponential_buckets(0.005, 2.0, 14).expect("valid buckets")),
            )
            .expect("valid metric"),
            stream_reconnects: IntCounter::new(
                "runhook_stream_reconnects_total",
                "Live stream reconnects.",
            )
            .expect("valid metric"),
            pending: gauge(
                "runhook_pending_deliveries",
                "Deliveries waiting, by sink.",
                &["sink"],
            ),
            dead: gauge("runhook_dead_letters", "Dead letters, by sink.", &["sink"]),
            oldest_pending_age: GaugeVec::new(
                Opts::new(
                    "runhook_oldest_pending_delivery_age_seconds",
                    "Seconds since the first pending delivery (in ingest order) of each sink was queued or replayed; 0 when none waits.",
                ),
                &["sink"],
            )
            .expect("valid metric"),
            sink_up: gauge(
                "runhook_sink_up",
                "1 while the sink answers, 0 while marked down.",
                &["sink"],
            ),
            sink_restarts: counter(
                "runhook_sink_restarts_total",
                "Delivery loops restarted after they could not start, ended or panicked, by sink.",
                &["sink"],
            ),
            runs: gauge("runhook_runs", "Watched runs by ingest state.", &["state"]),
            longest_run_silence: Gauge::new(
                "runhook_longest_run_silence_seconds",
                "Seconds since the last event of the followed run that has been silent the longest (0 when none is followed).",
            )
            .expect("valid metric"),
            leases_held: IntGauge::new(
                "runhook_leases_held",
                "Runs whose leases this replica holds (PostgreSQL state; 0 on SQLite).",
            )
            .expect("valid metric"),
            lease_changes: counter(
                "runhook_lease_changes_total",
                "Leases gained, lost (taken over or shed) and dropped as overdue (not renewed in time) by this replica.",
                &["change"],
            ),
            node_info: gauge(
                "runhook_node_info",
                "Always 1 on a PostgreSQL state; the label names this replica ([cluster] node).",
                &["node"],
            ),
            registry: Registry::new(),
        };
        metrics.register_all();
        metrics.start_at_zero();
        metrics
    }

    fn register_all(&self) {
        let build_info = IntGaugeVec::new(
            Opts::new(
                "runhook_build_info",
                "Always 1; the labels say which runhook is running.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.events_ingested.clone()),
            Box::new(self.deliveries.clone()),
            Box::new(self.delivery_latency.clone()),
            Box::new(self.upstream_requests.clone()),
            Box::new(self.upstream_duration.clone()),
            Box::new(self.stream_reconnects.clone()),
            Box::new(self.pending.clone()),
            Box::new(self.dead.clone()),
            Box::new(self.oldest_pending_age.clone()),
            Box::new(self.sink_up.clone()),
            Box::new(self.sink_restarts.clone()),
            Box::new(self.runs.clone()),
            Box::new(self.longest_run_silence.clone()),
            Box::new(self.leases_held.clone()),
            Box::new(self.lease_changes.clone()),
            Box::new(self.node_info.clone()),
            Box::new(build_info),
            Box::new(process_collector()),
        ];
        for collector in collectors {
            self.registry
                .register(collector)
                .expect("metric names are unique");
        }
    }

    /// Label sets known before anything happened, exported at 0.
    fn start_at_zero(&self) {
        for transport in TRANSPORTS {
            self.events_ingested.with_label_values(&[transport]);
        }
        for class in CLASSES {
            self.upstream_requests.with_label_values(&[class]);
        }
        for change in LEASE_CHANGES {
            self.lease_changes.with_label_values(&[change]);
        }
    }

    /// This process is a replica named `node` of a cluster.
    pub fn cluster_node(&self, node: &str) {
        self.node_info.reset();
        self.node_info.with_label_values(&[node]).set(1);
    }

    /// A configured sink: its counters exist at 0 from now on.
    pub fn sink_configured(&self, sink: &str) {
        for outcome in OUTCOMES {
            self.deliveries.with_label_values(&[sink, outcome]);
        }
        self.sink_restarts.with_label_values(&[sink]);
        self.delivery_latency.with_label_values(&[sink]);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// One upstream answer by status (`None`: no answer).
    pub fn upstream_answer(&self, status: Option<u16>) {
        let class = match status {
            Some(s) => format!("{}xx", s / 100),
            None => "error".to_owned(),
        };
        self.upstream_requests
            .with_label_values(&[class.as_str()])
            .inc();
    }

    /// How long an upstream request took to answer (or fail).
    pub fn upstream_took(&self, elapsed: Duration) {
        self.upstream_duration.observe(elapsed.as_secs_f64());
    }

    pub fn delivery(&self, sink: &str, outcome: &str) {
        self.deliveries.with_label_values(&[sink, outcome]).inc();
    }
}

/// CPU, memory, open files and start time of this process
/// (`process_*`, Linux only: other systems export none).
#[cfg(target_os = "linux")]
fn process_collector() -> prometheus::process_collector::ProcessCollector {
    prometheus::process_collector::ProcessCollector::for_self()
}

#[cfg(not(target_os = "linux"))]
fn process_collector() -> IntCounter {
    IntCounter::new("runhook_process_metrics_unsupported", "Unused.").expect("valid metric")
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_start_at_zero_for_every_known_label_set() {
        let metrics = Metrics::new();
        metrics.sink_configured("ops");
        let text = metrics.encode();
        for line in [
            "runhook_events_ingested_total{transport=\"poll\"} 0",
            "runhook_events_ingested_total{transport=\"sse\"} 0",
            "runhook_upstream_requests_total{class=\"4xx\"} 0",
            "runhook_upstream_requests_total{class=\"error\"} 0",
            "runhook_deliveries_total{outcome=\"dead\",sink=\"ops\"} 0",
            "runhook_deliveries_total{outcome=\"retry\",sink=\"ops\"} 0",
            "runhook_deliveries_total{outcome=\"delivered\",sink=\"ops\"} 0",
            "runhook_sink_restarts_total{sink=\"ops\"} 0",
            "runhook_delivery_latency_seconds_count{sink=\"ops\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn a_replica_names_its_node() {
        let metrics = Metrics::new();
        assert!(!metrics.encode().contains("runhook_node_info{"));
        metrics.cluster_node("runhook-a");
        let text = metrics.encode();
        let line = "runhook_node_info{node=\"runhook-a\"} 1";
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        assert!(
            text.lines()
                .any(|l| l == "runhook_lease_changes_total{change=\"overdue\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn build_info_and_process_metrics_are_exported() {
        let text = Metrics::new().encode();
        let build = format!(
            "runhook_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.lines().any(|l| l == build), "no {build:?} in\n{text}");
        if cfg!(target_os = "linux") {
            assert!(text.contains("process_resident_memory_bytes "), "{text}");
        }
    }
}
