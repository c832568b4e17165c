//! One integration-test binary (as ripgrep does): real HTTP on 127.0.0.1
//! with ephemeral ports, real SQLite files in temp dirs, real receivers.

mod catch_up;
mod chaos;
mod cli;
mod cluster;
mod contrib;
mod crash;
mod dev_loop;
mod faults;
mod hostile;
mod observability;
mod operator_safety;
mod ops_cli;
mod packaging;
mod pg;
mod pg_runs;
mod pg_state;
mod pg_support;
mod pipeline;
mod polling;
mod promises;
mod props;
mod receiver;
mod retention;
mod service;
mod service_promises;
mod slack;
mod sse;
mod state;
mod status_top;
mod stopped;
mod store;
mod supervision;
mod support;
mod watch_http;
mod webhook;
