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
    // Only the fixtures' paths, config and Nano's dims are read here.
    #[allow(dead_code)]
    pub mod fixtures;
    pub mod grpc;
    // Only GETs here: no POST, no concurrent clients.
    #[allow(dead_code)]
    pub mod http;
    // Memory is bounded here, CPU time is not.
    #[allow(dead_code)]
    pub mod process;
    // Sums only: no presence checks, no status breakdowns.
    #[allow(dead_code)]
    pub mod prom;
    pub mod server;
    pub mod triton;

    pub use {fixtures::*, http::*, prom::*, server::*, triton::*};
}

mod api_keys;
mod grpc_hostile;
mod grpc_triton;
mod triton_client;
