//! The gRPC protocol: Triton's `inference.GRPCInferenceService`, so
//! `tritonclient.grpc` and `perf_analyzer -i grpc` work unchanged.
//!
//! Owns: the generated messages and service ([`pb`], from proto/*.proto at
//! build time, no system `protoc`), the handlers (`service.rs`,
//! `stream.rs`), request parsing and answers (`request.rs`, `response.rs`),
//! deadlines (`deadline.rs`), the HTTP/2 handshake a connection must finish
//! in time (`handshake.rs`), the status mapping (`status.rs`, the one
//! place), the adapter through which every call reaches the engine
//! (`model.rs`) and the server with its own runtime and limits
//! (`server.rs`), and the bound on answers a client does not take
//! (`held.rs`). The protocol itself (model resolution, tensor rules, metadata, config, statistics) is the core shared with HTTP v2 (`oip/`).
//! Must not touch: batching, compute, the HTTP layer.

pub(crate) mod deadline;
pub(crate) mod handshake;
pub(crate) mod held;
pub(crate) mod model;
// The generated messages and client: the tests' gRPC clients use them.
pub mod pb;
pub(crate) mod request;
pub(crate) mod response;
pub(crate) mod server;
pub(crate) mod service;
pub(crate) mod status;
pub(crate) mod stream;

pub(crate) use self::server::start;
