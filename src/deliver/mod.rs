//! The delivery engine: pending deliveries -> sinks, outcome -> done, retry
//! or dead letter, all recorded in the store so that backoff survives
//! restarts. A file fails as a whole and is fed in batches (`file`); HTTP
//! sinks are fed run by run, in per-run order (`runs`).

pub mod file;
mod retry;
pub mod runs;

pub use retry::{exhausted, retry_delay};

/// Counts deliveries done and observes their latency (recorded -> delivered).
fn count_delivered(sink: &str, delivered: &[crate::store::Pending]) {
    let metrics = crate::metrics::metrics();
    metrics
        .deliveries
        .with_label_values(&[sink, "delivered"])
        .inc_by(delivered.len() as u64);
    let latency = metrics.delivery_latency.with_label_values(&[sink]);
    let now = crate::store::now_ms();
    for pending in delivered {
        latency.observe((now - pending.seen_at).max(0) as f64 / 1000.0);
    }
}
