//! The gRPC service (Triton's `GRPCInferenceService`) and the Open
//! Inference Protocol as Triton's own clients see it, one binary: hostile
//! and careless HTTP/2 clients, Triton's gRPC tools, Triton's HTTP client
//! and perf_analyzer.
//!
//! Owns: one module per concern (each was a test binary of its own). Must
//! not touch: the engine's code (`tokitai_serve`); the shared harness is
//! `tests/common`. Memory figures are read from a server process of its
//! own (`ProcessServer`), never from this process.

/// The parts of the shared harness (`tests/common`) this binary uses.
#[path = "../common"]
mod common {
    // The fixtures, request bodies and tolerances, for every binary; this one uses part of them.
    #[allow(dead_code)]
    pub mod fixtures;
    pub mod grpc;
    // ureq requests and answers, for every binary; this one uses part of them.
    #[allow(dead_code)]
    pub mod http;
    // The /proc figures; this binary bounds memory only, not CPU time.
    #[allow(dead_code)]
    pub mod process;
    // The Prometheus text parser, for every binary; this one uses part of it.
    #[allow(dead_code)]
    pub mod prom;
    pub mod server;
    pub mod triton;

    pub use {fixtures::*, http::*, prom::*, server::*, triton::*};
}

mod grpc_hostile;
mod grpc_triton;
mod triton_client;
