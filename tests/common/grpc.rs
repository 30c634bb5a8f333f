//! gRPC clients of the engine under test.
//!
//! Owns: the tokio runtime the gRPC tests drive their clients on
//! ([`runtime`]), a connected `GrpcInferenceService` client ([`client`]),
//! a well-formed `ModelInfer` request ([`rows_request`]), and one call sent
//! over a raw HTTP/2 connection the test controls ([`send_raw_infer`]).
//! Must not touch: the engine's gRPC service (`tokitai_serve::grpc`).

use std::net::SocketAddr;

use bytes::Bytes;
use prost::Message as _;
use tokitai_serve::grpc::pb::ModelInferRequest;
use tokitai_serve::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use tokitai_serve::grpc::pb::model_infer_request::InferInputTensor;
use tonic::transport::Channel;

use super::fixtures::nano_dims;

/// The model every test server serves by default.
pub const MODEL: &str = "tokitai-moe";
/// `ModelInfer`'s path.
pub const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// A client of the engine's gRPC service.
pub type GrpcClient = GrpcInferenceServiceClient<Channel>;

/// The name of a test client runtime's threads: a panic hook that counts
/// the engine's panics tells these apart by it (a runtime's default name,
/// `tokio-runtime-worker`, is also what the engine's own blocking threads
/// are called).
pub const CLIENT_RUNTIME_THREAD: &str = "test-client-runtime";

/// A two-thread runtime for a test's gRPC clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(CLIENT_RUNTIME_THREAD)
        .enable_all()
        .build()
        .unwrap()
}

/// A client connected to the gRPC port at `addr`. It may send more than the
/// server takes (64 MiB): the server must be the one that refuses it.
pub async fn client(addr: SocketAddr) -> GrpcClient {
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

/// Sends `req` as one `ModelInfer` call with `grpc-timeout: {timeout}` on
/// the raw HTTP/2 connection `h2` to `addr` (whatever its flow control);
/// the answer's head, to be awaited by the caller.
pub fn send_raw_infer(
    h2: &mut h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    req: &ModelInferRequest,
    timeout: &str,
) -> h2::client::ResponseFuture {
    let head = http::Request::post(format!("http://{addr}{INFER}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .unwrap();
    let (response, mut body) = h2.send_request(head, false).unwrap();
    let message = req.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend((message.len() as u32).to_be_bytes());
    frame.extend(message);
    body.send_data(Bytes::from(frame), true)
        .expect("send the request message");
    response
}
