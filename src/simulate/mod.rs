//! A local fake of the Agent Runs API with scripted runs and fault
//! injection: the other side of the wire, for trying runhook, tests and
//! benchmarks. Shares only the wire types (`src/upstream/types.rs`) with
//! the client.
//!
//! `scenario.rs` says what is served, `run.rs` models a run on a clock,
//! `faults.rs` injects faults, `requests.rs` logs what was asked,
//! `handlers.rs` and `stream.rs` answer HTTP (`frame.rs` writes the stream's
//! frames) over the shared state in `state.rs`, and `simulator.rs` is the
//! handle that starts it all.

mod faults;
mod frame;
mod handlers;
mod requests;
mod run;
pub mod scenario;
mod simulator;
mod state;
mod stream;

pub use faults::{Fault, FaultKind};
pub use requests::LoggedRequest;
pub use scenario::Scenario;
pub use simulator::Simulator;

/// The user every accepted credential belongs to.
pub const USER: &str = "user-1";
/// A bearer token the simulator accepts as another user (for 403 tests).
pub const OTHER_USER_TOKEN: &str = "other-user-token";
