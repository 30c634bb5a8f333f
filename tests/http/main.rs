//! The HTTP front end against real clients, one binary: the routes (the old
//! sidecar's `/infer` and the Open Inference Protocol's v2), concurrency,
//! failures, malformed and hostile requests, clients that stop reading, web
//! pages and declared shapes.
//!
//! Owns: one module per concern (each was a test binary of its own). Must
//! not touch: the engine's code (`tokitai_serve`); the shared harness is
//! `tests/common`. Tests run in parallel threads of this one process:
//! every memory or CPU figure a test asserts is read from a server process
//! of its own (`ProcessServer`), never from this process.

/// The parts of the shared harness (`tests/common`) this binary uses.
#[path = "../common"]
mod common {
    // No test here reads a fixture's weights, flat inputs or the list of fixture sets.
    #[allow(dead_code)]
    pub mod fixtures;
    pub mod grpc;
    pub mod http;
    pub mod process;
    // No label listings (the two-model monitoring tests use those).
    #[allow(dead_code)]
    pub mod prom;
    pub mod raw;
    // No test here reads ProcessServer's gRPC address.
    #[allow(dead_code)]
    pub mod server;
    pub mod slow;

    pub use {fixtures::*, http::*, prom::*, raw::*, server::*};
}

mod api_keys;
mod declared_shapes;
mod hostile_clients;
mod http_compat;
mod http_concurrency;
mod http_failures;
mod http_malformed;
mod priority_levels;
mod slow_readers;
mod unix_socket;
mod v2_protocol;
mod web_pages;
