//! The Open Inference Protocol (KServe v2) routes, with the binary tensor
//! data extension and Triton's model-configuration extension.
//!
//! Owns: `/v2` server metadata and health, model metadata/readiness/config/
//! statistics, and `POST /v2/models/{model}[/versions/{version}]/infer` in
//! JSON and binary form, each for the model (and version) its path names;
//! Triton's model repository extension is `repository.rs`. Inference goes
//! through the same batcher, workers, limits,
//! deadlines and metrics as `/infer` (the `route` label tells them apart).
//! Must not touch: batching or compute; status codes live in `http/error.rs`
//! (`V2Error`, Triton's codes for the same conditions). The infer request's
//! parsing is `request.rs`, its answer `response.rs`.
//!
//! Wire details (KServe v2 + Triton's binary extension): a request body is a
//! JSON header, optionally followed by raw little-endian tensor bytes; the
//! `Inference-Header-Content-Length` header gives the JSON part's length.
//! Inputs carrying `"parameters": {"binary_data_size": N}` take their data
//! from those bytes, in input order. Outputs requested with
//! `"binary_data": true` (or all, with `"binary_data_output": true`) are
//! answered the same way.

pub(crate) mod repository;
pub(crate) mod request;
// The parser, for the fuzz tests.
pub use self::request::{V2Request, parse_request};
mod response;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use self::response::{Answerer, write_response};
use super::HttpSettings;
use super::error::V2Error;
use super::extract::{numeric_header, read_body, request_timeout};
use crate::engine::{Engine, InferOptions, ModelTarget, RequestTrace};
use crate::error::{EngineError, RequestError};
use crate::http::routes::{finish_trace, request_trace};
use crate::labels::Route;
use crate::oip::{self, EXTENSIONS, FP32, SERVER_NAME, TensorInfo};

/// Header giving the length of the JSON part of a binary request/response.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// `{model}` and the optional `{version}` of a path.
#[derive(Deserialize)]
pub struct ModelPath {
    model: String,
    version: Option<String>,
}

impl ModelPath {
    /// The model version the path names (the protocol core's resolution).
    fn target(&self) -> Result<ModelTarget<'_>, V2Error> {
        Ok(oip::target(&self.model, self.version.as_deref())?)
    }
}

fn invalid(msg: impl Into<String>) -> V2Error {
    V2Error::from(RequestError::Protocol(msg.into()))
}

/// `GET /v2`
pub async fn server_metadata() -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "name": SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": EXTENSIONS,
    }))
}

/// `GET /v2/health/live`
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().finish()
}

/// `GET /v2/health/ready`. Triton answers "not ready" with 400; so does this
/// engine on `/v2` routes (`/readyz` keeps 503 for load balancers).
pub async fn ready(engine: web::Data<Engine>) -> HttpResponse {
    if engine.is_ready() {
        HttpResponse::Ok().finish()
    } else {
        HttpResponse::BadRequest().finish()
    }
}

/// `GET /v2/models/{model}[/versions/{version}]/ready`: 200 when that
/// version serves, 400 (Triton's "not ready") when it is known but does
/// not, 404 when unknown.
pub async fn model_ready(engine: web::Data<Engine>, path: web::Path<ModelPath>) -> Result<HttpResponse, V2Error> {
    match engine.resolve(&path.target()?) {
        Ok(_) => Ok(HttpResponse::Ok().finish()),
        Err(e @ EngineError::UnknownModel { .. }) => Err(e.into()),
        Err(_) => Ok(HttpResponse::BadRequest().finish()),
    }
}

/// A tensor of the metadata: `{name, datatype, shape}`.
fn metadata_tensor(t: &TensorInfo) -> serde_json::Value {
    json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape() })
}

/// A tensor of the configuration: `{name, data_type, dims}`.
fn config_tensor(t: &TensorInfo) -> serde_json::Value {
    json!({ "name": t.name, "data_type": "TYPE_FP32", "dims": [t.width] })
}

/// `GET /v2/models/{model}[/versions/{version}]`
pub async fn model_metadata(engine: web::Data<Engine>, path: web::Path<ModelPath>) -> Result<HttpResponse, V2Error> {
    let description = engine.describe(&path.target()?)?;
    let m = oip::metadata(&description);
    let d = m.description;
    Ok(HttpResponse::Ok().json(json!({
        "name": m.name,
        "versions": m.versions,
        "platform": m.platform,
        "inputs": m.inputs.iter().map(metadata_tensor).collect::<Vec<_>>(),
        "outputs": m.outputs.iter().map(metadata_tensor).collect::<Vec<_>>(),
        "parameters": {
            "accepted_datatypes": [FP32],
            "layernorm": d.layernorm,
            "weight_precision": d.weight_precision,
            "isa": d.isa,
            "size": d.size,
            "checkpoint_step": d.checkpoint_step,
        },
    })))
}

/// `GET /v2/models/{model}[/versions/{version}]/config`: Triton's
/// model-configuration extension (perf_analyzer reads it).
pub async fn model_config(engine: web::Data<Engine>, path: web::Path<ModelPath>) -> Result<HttpResponse, V2Error> {
    let version = engine.resolve(&path.target()?)?;
    let c = oip::config(&version);
    Ok(HttpResponse::Ok().json(json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "max_batch_size": c.max_batch_size,
        "input": c.inputs.iter().map(config_tensor).collect::<Vec<_>>(),
        "output": c.outputs.iter().map(config_tensor).collect::<Vec<_>>(),
        "dynamic_batching": {},
        "version_policy": { "latest": { "num_versions": c.latest_versions } },
    })))
}

/// `GET /v2/models/{model}[/versions/{version}]/stats`: Triton's statistics
/// extension, from the same counters as gRPC's `ModelStatistics`.
pub async fn model_stats(engine: web::Data<Engine>, path: web::Path<ModelPath>) -> Result<HttpResponse, V2Error> {
    let version = engine.resolve(&path.target()?)?;
    let s = oip::statistics(&version);
    let inference_stats: serde_json::Map<String, serde_json::Value> = s
        .durations()
        .into_iter()
        .map(|(name, (count, ns))| (name.to_string(), json!({ "count": count, "ns": ns })))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "model_stats": [{
            "name": s.name,
            "version": s.version,
            "last_inference": s.counts.last_inference_ms,
            "inference_count": s.counts.inference_count,
            "execution_count": s.counts.execution_count,
            "inference_stats": inference_stats,
            "batch_stats": [],
        }],
    })))
}

/// `POST /v2/models/{model}[/versions/{version}]/infer`.
pub async fn infer(
    req: HttpRequest,
    payload: web::Payload,
    engine: web::Data<Engine>,
    settings: web::Data<HttpSettings>,
    path: web::Path<ModelPath>,
) -> Result<HttpResponse, V2Error> {
    let route = match path.version {
        Some(_) => Route::V2VersionInfer,
        None => Route::V2Infer,
    };
    let trace = request_trace(&req, route);
    let result = answer_infer(&req, payload, &engine, &settings, &path, trace.as_ref()).await;
    finish_trace(trace, &result);
    result
}

async fn answer_infer(
    req: &HttpRequest,
    payload: web::Payload,
    engine: &Engine,
    settings: &HttpSettings,
    path: &ModelPath,
    trace: Option<&RequestTrace>,
) -> Result<HttpResponse, V2Error> {
    let timeout = request_timeout(req)?;
    // The body is read first: an answer that leaves it unread closes the
    // connection, and a keep-alive client would see that as a failure.
    let body = read_body(req, payload, settings.max_body_bytes, settings.body_timeout).await?;
    engine.held().admit()?;
    let version = engine.resolve(&path.target()?)?;
    let json_len = json_part_len(req, body.len())?;
    let (json_part, binary_part) = body.split_at(json_len);
    let request = parse_request(json_part, binary_part, version.limits())?;
    drop(body);

    let options = InferOptions {
        timeout,
        priority: request.priority,
        route: Route::V2Infer.into(),
        trace: trace.cloned(),
    };
    let answer = engine.infer(version, request.input, options).await?;
    let answering = trace.map(RequestTrace::answer);
    let version = oip::version_of(&answer.model);
    let who = Answerer {
        model: &answer.model.name,
        version: &version,
        id: request.id.as_deref(),
    };
    let mut response = HttpResponse::Ok();
    super::timing_headers(&mut response, &answer.output);
    super::model_headers(&mut response, &answer.model);
    let response = write_response(response, &who, &request.outputs, &answer.output, &answer.model.dims);
    drop(answering);
    Ok(response)
}

/// The length of the body's JSON part: `Inference-Header-Content-Length`
/// when given (binary tensor data follows it), else the whole body.
fn json_part_len(req: &HttpRequest, body_len: usize) -> Result<usize, V2Error> {
    match numeric_header(req.headers(), HEADER_LENGTH, 0..=body_len as u64) {
        None => Ok(body_len),
        Some(Ok(n)) => Ok(n as usize),
        Some(Err(())) => Err(invalid(format!(
            "{HEADER_LENGTH} must be a number no larger than the body ({body_len} bytes)"
        ))),
    }
}
