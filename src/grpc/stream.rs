//! `ModelStreamInfer`: a bidirectional stream of inference requests.
//!
//! Owns: reading a stream's requests, computing up to
//! [`MAX_INFLIGHT_PER_STREAM`] of them at once (each through the same
//! adapter and engine path as `ModelInfer`) and writing their answers in
//! request order. A request that fails is answered in the stream with
//! `error_message` (and its `id`) and the stream stays open; only a broken
//! stream (a message that cannot be decoded, e.g. over the size limit) ends
//! the call, with that status, after the answers already due. When the
//! client goes away, the requests still waiting are dropped with the task,
//! so their rows are not computed. Must not touch: validation
//! (`request.rs`), status codes (`status.rs`).

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesOrdered, Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::model::Served;
use super::pb::{ModelInferRequest, ModelInferResponse, ModelStreamInferResponse};
use super::status::code_name;
use crate::labels::GrpcMethod;
use crate::telemetry::Parent;

/// Most requests of one stream computed at once; the stream is not read
/// further until one of them is answered.
pub const MAX_INFLIGHT_PER_STREAM: usize = 256;
/// Answers buffered for a client that reads slowly.
const ANSWER_BUFFER: usize = 16;

/// The answers of one stream.
pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

/// Serves `inbound` on a task of its own. `deadline`, the call's
/// `grpc-timeout` when given, bounds every request's timeout; `parent`, the
/// call's trace context, is each request's parent (`None`: tracing off).
pub fn serve(
    served: Served,
    inbound: Streaming<ModelInferRequest>,
    deadline: Option<Duration>,
    parent: Option<Parent>,
) -> ResponseStream {
    let (tx, mut rx) = mpsc::channel(ANSWER_BUFFER);
    let deadline = deadline.map(|d| Instant::now() + d);
    tokio::spawn(drive(served, inbound, tx, deadline, parent));
    Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

type Answers = mpsc::Sender<Result<ModelStreamInferResponse, Status>>;

async fn drive(
    served: Served,
    mut inbound: Streaming<ModelInferRequest>,
    tx: Answers,
    deadline: Option<Instant>,
    parent: Option<Parent>,
) {
    let mut pending = FuturesOrdered::new();
    let mut broken: Option<Status> = None;
    let mut reading = true;
    while reading || !pending.is_empty() {
        tokio::select! {
            biased;
            // The client went away: dropping `pending` cancels its requests.
            () = tx.closed() => return,
            Some(answer) = pending.next(), if !pending.is_empty() => {
                if tx.send(Ok(answer)).await.is_err() {
                    return;
                }
            }
            message = inbound.message(), if reading && pending.len() < MAX_INFLIGHT_PER_STREAM => match message {
                Ok(Some(req)) => {
                    let timeout = match deadline {
                        Some(d) => Some(d.saturating_duration_since(Instant::now()).min(served.default_timeout)),
                        None => None,
                    };
                    pending.push_back(answer_one(served.clone(), req, timeout, parent.clone()));
                }
                Ok(None) => reading = false,
                Err(status) => {
                    reading = false;
                    broken = Some(status);
                }
            },
        }
    }
    if let Some(status) = broken {
        let _ = tx.send(Err(status)).await;
    }
}

/// One streamed request's answer: its output, or its error as `error_message`.
async fn answer_one(
    served: Served,
    req: ModelInferRequest,
    timeout: Option<Duration>,
    parent: Option<Parent>,
) -> ModelStreamInferResponse {
    let method = GrpcMethod::ModelStreamInfer;
    let id = req.id.clone();
    let result = served.infer(req, timeout, method, parent.as_ref()).await;
    let metrics = served.metrics();
    match result {
        Ok(response) => {
            metrics.observe_stream_message("OK");
            ModelStreamInferResponse {
                error_message: String::new(),
                infer_response: Some(response),
            }
        }
        Err(e) => {
            metrics.observe_stream_message(code_name(e.code()));
            let message = e.into_status(method, metrics).message().to_string();
            ModelStreamInferResponse {
                error_message: message,
                infer_response: Some(ModelInferResponse {
                    id,
                    ..Default::default()
                }),
            }
        }
    }
}
