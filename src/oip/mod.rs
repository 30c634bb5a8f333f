//! The Open Inference Protocol core: what the protocol means, shared by its
//! two transports, HTTP (`http/v2/`) and gRPC (`grpc/`), which only parse
//! their wire format, cap its memory and render these values.
//!
//! Owns: the server's metadata ([`SERVER_NAME`], [`EXTENSIONS`]); model
//! resolution, metadata, configuration and statistics (`model.rs`); the
//! tensor rules and the answer's tensors (`tensor.rs`); the protocol's own
//! refusals and the kind of a repository call's failure (`error.rs`). Must
//! not touch: wire formats (JSON, protobuf), status codes (each transport
//! maps an error's kind in its one place), compute (the engine), the input
//! rules (`input.rs`: `InferInput::new`).

pub mod error;
pub mod model;
pub mod tensor;

pub use self::error::{UnknownVersion, repository_kind, repository_reason};
pub use self::model::{TensorInfo, config, metadata, statistics, target, version_of};
pub use self::tensor::{
    Declared, FP32, FP32_BYTES, INPUT, OutputName, add_output, check_count, check_input, declared_shape, le_bytes,
    output_tensors, raw_values, requested_outputs,
};

/// The server's name in its metadata (`GET /v2`, `ServerMetadata`).
pub const SERVER_NAME: &str = "tokitai-serve";

/// The protocol extensions the server supports (`GET /v2`, `ServerMetadata`).
pub const EXTENSIONS: [&str; 4] = [
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "statistics",
];
