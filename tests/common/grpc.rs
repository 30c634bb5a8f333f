//! gRPC clients of the engine under test.
//!
//! Owns: the tokio runtime the gRPC tests drive their clients on
//! ([`runtime`]), a connected `GrpcInferenceService` client ([`client`]),
//! and a well-formed `ModelInfer` request ([`rows_request`]). Must not
//! touch: the engine's gRPC service (`tokitai_serve::grpc`).

use std::net::SocketAddr;

use bytes::Bytes;
use tokitai_serve::grpc::pb::ModelInferRequest;
use tokitai_serve::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use tokitai_serve::grpc::pb::model_infer_request::InferInputTensor;
use tonic::transport::Channel;

use super::fixtures::nano_dims;

/// The model every test server serves by default.
pub const MODEL: &str = "tokitai-moe";

/// A two-thread runtime for a test's gRPC clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A client connected to the gRPC port at `addr`. It may send more than the
/// server takes (64 MiB): the server must be the one that refuses it.
pub async fn client(addr: SocketAddr) -> GrpcInferenceServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the gRPC port");
    GrpcInferenceServiceClient::new(channel).max_encoding_message_size(64 << 20)
}

/// A well-formed `ModelInfer` request for [`MODEL`]: `rows` rows of 0.25,
/// as raw FP32.
pub fn rows_request(rows: usize) -> ModelInferRequest {
    let d = nano_dims().input;
    let raw: Vec<u8> = std::iter::repeat_n(0.25f32.to_le_bytes(), rows * d).flatten().collect();
    ModelInferRequest {
        model_name: MODEL.into(),
        inputs: vec![InferInputTensor {
            name: "features".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, d as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(raw)],
        ..Default::default()
    }
}
