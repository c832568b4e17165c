//! Prometheus metrics: counters and histograms updated where things happen,
//! gauges filled from the store when `/metrics` is scraped. The exposition is
//! the Prometheus text format (`promtool check metrics` clean).

use std::sync::OnceLock;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder, exponential_buckets,
};

pub struct Metrics {
    /// `transport`: poll | sse.
    pub events_ingested: IntCounterVec,
    /// `sink`, `outcome`: delivered | retry | dead.
    pub deliveries: IntCounterVec,
    /// `sink`: from event recorded to delivered.
    pub delivery_latency: HistogramVec,
    /// `class`: 2xx, 4xx, 5xx, error (no answer).
    pub upstream_requests: IntCounterVec,
    pub stream_reconnects: IntCounter,
    pub pending: IntGaugeVec,
    pub dead: IntGaugeVec,
    pub sink_up: IntGaugeVec,
    /// `sink`: delivery loops restarted after they could not start, ended or panicked.
    pub sink_restarts: IntCounterVec,
    /// `state`: following, reconnecting, finished, auth_failed, ...
    pub runs: IntGaugeVec,
    /// `run_id`: seconds since the run's last event, while it is followed.
    pub last_event_age: GaugeVec,
    registry: Registry,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
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
            delivery_latency: HistogramVec::new(
                HistogramOpts::new(
                    "runhook_delivery_latency_seconds",
                    "Seconds from event recorded to delivered, by sink.",
                )
                .buckets(exponential_buckets(0.001, 2.0, 20).expect("valid buckets")),
                &["sink"],
            )
            .expect("valid metric"),
            upstream_requests: counter(
                "runhook_upstream_requests_total",
                "Upstream requests by status class.",
                &["class"],
            ),
            stream_reconnects: IntCounter::new("runhook_stream_reconnects_total", "Live stream reconnects.")
                .expect("valid metric"),
            pending: gauge("runhook_pending_deliveries", "Deliveries waiting, by sink.", &["sink"]),
            dead: gauge("runhook_dead_letters", "Dead letters, by sink.", &["sink"]),
            sink_up: gauge("runhook_sink_up", "1 while the sink answers, 0 while marked down.", &["sink"]),
            sink_restarts: counter(
                "runhook_sink_restarts_total",
                "Delivery loops restarted after they could not start, ended or panicked, by sink.",
                &["sink"],
            ),
            runs: gauge("runhook_runs", "Watched runs by ingest state.", &["state"]),
            last_event_age: GaugeVec::new(
                Opts::new(
                    "runhook_run_last_event_age_seconds",
                    "Seconds since the last event of each followed run (a silent stall shows here).",
                ),
                &["run_id"],
            )
            .expect("valid metric"),
            registry: Registry::new(),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 11] = [
            Box::new(metrics.events_ingested.clone()),
            Box::new(metrics.deliveries.clone()),
            Box::new(metrics.delivery_latency.clone()),
            Box::new(metrics.upstream_requests.clone()),
            Box::new(metrics.stream_reconnects.clone()),
            Box::new(metrics.pending.clone()),
            Box::new(metrics.dead.clone()),
            Box::new(metrics.sink_up.clone()),
            Box::new(metrics.sink_restarts.clone()),
            Box::new(metrics.runs.clone()),
            Box::new(metrics.last_event_age.clone()),
        ];
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("metric names are unique");
        }
        metrics
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    pub fn upstream_answer(&self, status: Option<u16>) {
        let class = match status {
            Some(s) => format!("{}xx", s / 100),
            None => "error".to_owned(),
        };
        self.upstream_requests
            .with_label_values(&[class.as_str()])
            .inc();
    }

    pub fn delivery(&self, sink: &str, outcome: &str) {
        self.deliveries.with_label_values(&[sink, outcome]).inc();
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
