//! The shared harness as one module, for the two test binaries still at the
//! top level (`prometheus_live`, `autoscaling_queries`). The binaries in
//! folders (`tests/http`, `tests/grpc`, `tests/model`, `tests/deploy`) each
//! include only the pieces they use (their `main.rs` lists them); see
//! `tests/README.md`. One concern a file:
//!
//! - [`server`]: the engine under test: [`TestServer`] in process (on the
//!   library's `embed::ServerThread`), [`ProcessServer`] as the real binary.
//! - [`http`]: requests over ureq ([`agent`], [`get`], [`post`]) and the
//!   answer they give ([`Reply`]); clients started together.
//! - [`raw`]: HTTP over a bare `TcpStream`, for what ureq cannot send or
//!   cannot tell apart ([`raw_exchange`], [`RawOutcome`]).
//! - [`fixtures`]: where the upstream fixtures live ([`FIXTURES`]), their
//!   `expected.json` ([`Fixture`]), the tolerances, and request bodies.
//! - [`deploy`]: the deploy/ manifests, rendered ([`rendered`]).
//! - [`prom`]: a small Prometheus text parser ([`Metrics`]).
//! - [`prometheus`]: a real `prometheus` server ([`Prometheus`]), the tool
//!   lookup ([`tool`]) and a bounded poll ([`wait_for`]).
//! - [`slow`]: clients that stop reading ([`slow::slow_reader`]).
//! - `process`: a server process's CPU time and memory from `/proc`, and
//!   `grpc`: gRPC clients (neither is used by the two binaries here).
//! - [`triton`]: Triton's Python client and perf_analyzer ([`venv`],
//!   [`run_python`], [`perf_analyzer_smoke`]).
//!
//! Every wait here is bounded; nothing asserts a wall-clock duration.

// The two binaries that include the whole harness each use a part of it;
// the binaries in folders include only their pieces.
#![allow(dead_code)]

pub mod deploy;
pub mod fixtures;
pub mod http;
pub mod prom;
pub mod prometheus;
pub mod raw;
pub mod server;
pub mod slow;
pub mod triton;

// The whole harness as `common::Name`, whichever part a test binary uses.
#[allow(unused_imports)]
pub use {fixtures::*, http::*, prom::*, prometheus::*, raw::*, server::*, triton::*};
