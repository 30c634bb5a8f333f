//! The gRPC service (Triton's `GRPCInferenceService`) and the Open
//! Inference Protocol as Triton's own clients see it, one binary: hostile
//! and careless HTTP/2 clients, Triton's gRPC tools, Triton's HTTP client
//! and perf_analyzer.
//!
//! Owns: one module per concern (each was a test binary of its own). Must
//! not touch: the engine's code (`tokitai_serve`); the shared harness is
//! `tests/common`. Memory figures are read from a server process of its
//! own (`ProcessServer`), never from this process.

#[path = "../common/mod.rs"]
mod common;

mod grpc_hostile;
mod grpc_triton;
mod triton_client;
