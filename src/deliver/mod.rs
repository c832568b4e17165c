//! The delivery engine: pending deliveries -> sinks, outcome -> done, retry
//! or dead letter, all recorded in the store so that backoff survives
//! restarts. A file fails as a whole and is fed in batches (`file`); HTTP
//! sinks are fed run by run, in per-run order (`runs`).

pub mod file;
mod retry;
pub mod runs;

pub use retry::{exhausted, retry_delay};
