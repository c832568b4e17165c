//! runhook: follows Travelmode agent runs and fans their events out to
//! webhooks, Slack and files, exactly once per event and sink.
//!
//! The data path, one module each:
//! `upstream` (poll | sse) -> `ingest` -> `store` (events + deliveries +
//! cursor in one transaction) -> `deliver` -> `sink` -> `store` (mark done).
//! `route` decides the sinks at ingest; `simulate` is the fake upstream.

pub mod config;
pub mod crashpoint;
pub mod daemon;
pub mod deliver;
pub mod demo;
pub mod files;
pub mod http;
pub mod ingest;
pub mod jitter;
pub mod logging;
pub mod metrics;
pub mod ownership;
pub mod route;
pub mod server;
pub mod simulate;
pub mod sink;
pub mod store;
pub mod text;
pub mod upstream;
