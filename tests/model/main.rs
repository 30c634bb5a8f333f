//! Models, one binary: the CPU and HIP backends against the upstream
//! fixtures and the reference forward, f16/bf16 weights, a Medium model,
//! model files (reader, writer, synthetic weights), the model repository
//! under load, and the offline `infer` / `synth` subcommands.
//!
//! Owns: one module per concern (each was a test binary of its own). Must
//! not touch: the engine's code (`tokitai_serve`); the shared harness is
//! `tests/common`. Memory figures are read from a server process of its
//! own (`ProcessServer`), never from this process.

/// The parts of the shared harness (`tests/common`) this binary uses.
#[path = "../common"]
mod common {
    // Rng::below (a random pick) is not used here.
    #[allow(dead_code)]
    pub mod fixtures;
    // No concurrent clients here.
    #[allow(dead_code)]
    pub mod http;
    // Memory is bounded here, CPU time is not.
    #[allow(dead_code)]
    pub mod process;
    // Sums only: no presence checks, no status breakdowns, no raw text.
    #[allow(dead_code)]
    pub mod prom;
    // No gRPC address, metrics polls or exit waits here.
    #[allow(dead_code)]
    pub mod server;

    pub use {fixtures::*, http::*, prom::*, server::*};
}

mod cli_infer;
mod cpu_forward;
mod f16_weights;
mod hip_backend;
mod medium_forward;
mod model_files;
mod model_repository;
mod support;
mod synth_roundtrip;
