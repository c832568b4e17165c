//! The Agent Runs API and nothing else: wire types, the HTTP client and its
//! error classes. Knows nothing of SQLite or sinks.

pub mod client;
pub mod frame;
pub mod stream;
pub mod types;

pub use client::{Client, ErrorClass, UpstreamError};
pub use types::{Event, EventsPage};
