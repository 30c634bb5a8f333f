//! The Open Inference Protocol (KServe v2) routes, with the binary tensor
//! data extension and Triton's model-configuration extension.
//!
//! Owns: `/v2` server metadata and health, model metadata/readiness/config,
//! and `POST /v2/models/{model}[/versions/{version}]/infer` in JSON and
//! binary form. Inference goes through the same batcher, workers, limits,
//! deadlines and metrics as `/infer` (the `route` label tells them apart).
//! Must not touch: batching or compute; status codes live in `http/error.rs`
//! (`V2Error`, Triton's codes for the same conditions).
//!
//! Wire details (KServe v2 + Triton's binary extension): a request body is a
//! JSON header, optionally followed by raw little-endian tensor bytes; the
//! `Inference-Header-Content-Length` header gives the JSON part's length.
//! Inputs carrying `"parameters": {"binary_data_size": N}` take their data
//! from those bytes, in input order. Outputs requested with
//! `"binary_data": true` (or all, with `"binary_data_output": true`) are
//! answered the same way.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::HttpSettings;
use super::error::V2Error;
use super::extract::{read_body, request_timeout};
use crate::engine::Engine;
use crate::error::ServeError;

/// Header giving the length of the JSON part of a binary request/response.
pub const HEADER_LENGTH: &str = "inference-header-content-length";
/// The only tensor type the engine computes in; others are rejected by name.
const FP32: &str = "FP32";
const INPUT: &str = "features";
const OUTPUTS: [&str; 2] = ["logits", "router_weights"];

/// Registers the v2 routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v2", web::get().to(server_metadata))
        .route("/v2/health/live", web::get().to(live))
        .route("/v2/health/ready", web::get().to(ready))
        .route("/v2/models/{model}", web::get().to(model_metadata))
        .route("/v2/models/{model}/versions/{version}", web::get().to(model_metadata))
        .route("/v2/models/{model}/ready", web::get().to(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            web::get().to(model_ready),
        )
        .route("/v2/models/{model}/config", web::get().to(model_config))
        .route(
            "/v2/models/{model}/versions/{version}/config",
            web::get().to(model_config),
        )
        .route("/v2/models/{model}/infer", web::post().to(infer))
        .route("/v2/models/{model}/versions/{version}/infer", web::post().to(infer));
}

/// `{model}` and the optional `{version}` of a path.
#[derive(Deserialize)]
struct ModelPath {
    model: String,
    version: Option<String>,
}

/// The model's version on these routes: the checkpoint's training step.
fn version_of(engine: &Engine) -> String {
    engine.model.checkpoint_step.to_string()
}

/// Checks that the path names the served model (and its version, if given).
fn check_model(engine: &Engine, path: &ModelPath) -> Result<(), V2Error> {
    let version = version_of(engine);
    if path.model != engine.model.name {
        return Err(V2Error::NotFound(format!(
            "Request for unknown model: '{}' is not found",
            path.model
        )));
    }
    match &path.version {
        Some(v) if !v.is_empty() && *v != version => Err(V2Error::NotFound(format!(
            "Request for unknown model: '{}' version {v} is not found (the served version is {version})",
            path.model
        ))),
        _ => Ok(()),
    }
}

async fn server_metadata() -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "name": "tokitai-serve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_configuration"],
    }))
}

async fn live() -> HttpResponse {
    HttpResponse::Ok().finish()
}

/// Triton answers "not ready" with 400; so does this engine on `/v2` routes
/// (`/readyz` keeps 503 for load balancers).
async fn ready(engine: web::Data<Engine>) -> HttpResponse {
    if engine.state.is_ready() {
        HttpResponse::Ok().finish()
    } else {
        HttpResponse::BadRequest().finish()
    }
}

async fn model_ready(engine: web::Data<Engine>, path: web::Path<ModelPath>) -> Result<HttpResponse, V2Error> {
    check_model(&engine, &path)?;
    Ok(ready(engine).await)
}

async fn model_metadata(engine: web::Data<Engine>, path: web::Path<ModelPath>) -> Result<HttpResponse, V2Error> {
    check_model(&engine, &path)?;
    let d = engine.model.dims;
    Ok(HttpResponse::Ok().json(json!({
        "name": engine.model.name,
        "versions": [version_of(&engine)],
        "platform": "tokitai_moe",
        "inputs": [{ "name": INPUT, "datatype": FP32, "shape": [-1, d.input] }],
        "outputs": [
            { "name": "logits", "datatype": FP32, "shape": [-1, d.output] },
            { "name": "router_weights", "datatype": FP32, "shape": [-1, d.experts] },
        ],
        "parameters": {
            "accepted_datatypes": [FP32],
            "layernorm": engine.model.layernorm,
            "size": engine.model.size,
        },
    })))
}

/// Triton's model-configuration extension (perf_analyzer reads it).
async fn model_config(
    engine: web::Data<Engine>,
    settings: web::Data<HttpSettings>,
    path: web::Path<ModelPath>,
) -> Result<HttpResponse, V2Error> {
    check_model(&engine, &path)?;
    let d = engine.model.dims;
    Ok(HttpResponse::Ok().json(json!({
        "name": engine.model.name,
        "platform": "tokitai_moe",
        "backend": engine.model.backend,
        "max_batch_size": settings.max_request_rows,
        "input": [{ "name": INPUT, "data_type": "TYPE_FP32", "dims": [d.input] }],
        "output": [
            { "name": "logits", "data_type": "TYPE_FP32", "dims": [d.output] },
            { "name": "router_weights", "data_type": "TYPE_FP32", "dims": [d.experts] },
        ],
        "dynamic_batching": {},
        "version_policy": { "latest": { "num_versions": 1 } },
    })))
}

// ---- inference --------------------------------------------------------------

#[derive(Deserialize)]
struct InferHeader {
    id: Option<Value>,
    #[serde(default)]
    parameters: RequestParameters,
    #[serde(default)]
    inputs: Vec<InputTensor>,
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize, Default)]
struct RequestParameters {
    #[serde(default)]
    binary_data_output: bool,
}

#[derive(Deserialize)]
struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: TensorParameters,
    data: Option<Value>,
}

#[derive(Deserialize, Default)]
struct TensorParameters {
    binary_data_size: Option<u64>,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: OutputParameters,
}

#[derive(Deserialize, Default)]
struct OutputParameters {
    binary_data: Option<bool>,
}

/// `POST /v2/models/{model}[/versions/{version}]/infer`.
async fn infer(
    req: HttpRequest,
    payload: web::Payload,
    engine: web::Data<Engine>,
    settings: web::Data<HttpSettings>,
    path: web::Path<ModelPath>,
) -> Result<HttpResponse, V2Error> {
    check_model(&engine, &path)?;
    if !engine.state.is_ready() {
        let why = if engine.state.is_draining() {
            "draining"
        } else {
            "starting"
        };
        return Err(ServeError::NotReady(why).into());
    }
    let timeout = request_timeout(&req, settings.default_timeout)?;
    let body = read_body(&req, payload, settings.max_body_bytes).await?;
    let json_len = match req.headers().get(HEADER_LENGTH) {
        None => body.len(),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&n| n <= body.len())
            .ok_or_else(|| {
                invalid(format!(
                    "{HEADER_LENGTH} must be a number no larger than the body ({} bytes)",
                    body.len()
                ))
            })?,
    };
    let (json_part, binary_part) = body.split_at(json_len);
    let header: InferHeader =
        serde_json::from_slice(json_part).map_err(|e| invalid(format!("failed to parse the request JSON: {e}")))?;
    let dims = engine.model.dims;
    let (rows, n_rows) = read_input(&header, binary_part, dims.input, settings.max_request_rows)?;
    let outputs = requested_outputs(&header)?;
    drop(body);

    let output = super::routes::compute(&engine, rows, n_rows, timeout, "/v2/models/{model}/infer").await?;

    let tensors: Vec<(&str, &[f32], usize, bool)> = outputs
        .iter()
        .map(|&(name, binary)| match name {
            "logits" => (name, &output.logits[..], dims.output, binary),
            _ => (name, &output.router_weights[..], dims.experts, binary),
        })
        .collect();
    let mut response = write_response(
        &engine.model.name,
        &version_of(&engine),
        header.id.as_ref(),
        n_rows,
        &tensors,
    );
    response.headers_mut().insert(
        header::HeaderName::from_static("x-queue-time-us"),
        HeaderValue::from(output.queue_wait.as_micros() as u64),
    );
    response.headers_mut().insert(
        header::HeaderName::from_static("x-compute-time-us"),
        HeaderValue::from(output.compute.as_micros() as u64),
    );
    Ok(response)
}

fn invalid(msg: impl Into<String>) -> V2Error {
    V2Error::Serve(ServeError::BadRequest(msg.into()))
}

/// The `features` input as flat rows, from JSON `data` or binary bytes.
fn read_input(
    header: &InferHeader,
    binary: &[u8],
    row_len: usize,
    max_rows: usize,
) -> Result<(Vec<f32>, usize), V2Error> {
    let [input] = header.inputs.as_slice() else {
        return Err(invalid(format!(
            "expected 1 input ('{INPUT}') but got {}",
            header.inputs.len()
        )));
    };
    if input.name != INPUT {
        return Err(invalid(format!(
            "unexpected inference input '{}': the model's input is '{INPUT}'",
            input.name
        )));
    }
    if input.datatype != FP32 {
        return Err(invalid(format!(
            "input '{INPUT}' has datatype {}, but only {FP32} is accepted",
            input.datatype
        )));
    }
    let n_rows = match input.shape.as_slice() {
        [n, d] if *n >= 1 && *d == row_len as i64 => *n as usize,
        _ => {
            return Err(invalid(format!(
                "input '{INPUT}' has shape {:?}, expected [batch, {row_len}] with batch >= 1",
                input.shape
            )));
        }
    };
    if n_rows > max_rows {
        return Err(V2Error::Serve(ServeError::Request(
            crate::api::RequestError::TooManyRows {
                rows: n_rows,
                limit: max_rows,
            },
        )));
    }
    let expected = n_rows * row_len;
    let rows = match (input.parameters.binary_data_size, &input.data) {
        (Some(_), Some(_)) => return Err(invalid(format!("input '{INPUT}' has both binary_data_size and data"))),
        (Some(size), None) => {
            if size != binary.len() as u64 || size != (expected * 4) as u64 {
                return Err(invalid(format!(
                    "input '{INPUT}' binary_data_size is {size}, the binary part is {} bytes, and shape {:?} needs {} bytes",
                    binary.len(),
                    input.shape,
                    expected * 4
                )));
            }
            let rows: Vec<f32> = binary
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if let Some(i) = rows.iter().position(|v| !v.is_finite()) {
                return Err(invalid(format!("input '{INPUT}' element {i} is not finite")));
            }
            rows
        }
        (None, Some(data)) => {
            if !binary.is_empty() {
                return Err(invalid(format!(
                    "{} unexpected binary bytes after the JSON header",
                    binary.len()
                )));
            }
            let mut rows = Vec::with_capacity(expected);
            flatten(data, &mut rows, expected)?;
            if rows.len() != expected {
                return Err(invalid(format!(
                    "input '{INPUT}' has {} values, but shape {:?} needs {expected}",
                    rows.len(),
                    input.shape
                )));
            }
            rows
        }
        (None, None) => {
            return Err(invalid(format!(
                "input '{INPUT}' has neither data nor binary_data_size"
            )));
        }
    };
    Ok((rows, n_rows))
}

/// Flattens (possibly nested) JSON `data` into `out`, stopping past `limit`.
fn flatten(value: &Value, out: &mut Vec<f32>, limit: usize) -> Result<(), V2Error> {
    match value {
        Value::Array(items) => {
            for item in items {
                if out.len() > limit {
                    break;
                }
                flatten(item, out, limit)?;
            }
            Ok(())
        }
        Value::Number(n) => {
            let v = n.as_f64().unwrap_or(f64::NAN) as f32;
            if !v.is_finite() {
                return Err(invalid(format!(
                    "input '{INPUT}' element {} ({n}) is not a finite FP32 value",
                    out.len()
                )));
            }
            out.push(v);
            Ok(())
        }
        other => Err(invalid(format!(
            "input '{INPUT}' element {} is not a number: {}",
            out.len(),
            match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::String(_) => "a string",
                _ => "an object",
            }
        ))),
    }
}

/// Which outputs to return, and whether each goes in binary form.
fn requested_outputs(header: &InferHeader) -> Result<Vec<(&'static str, bool)>, V2Error> {
    let default_binary = header.parameters.binary_data_output;
    match &header.outputs {
        None => Ok(OUTPUTS.iter().map(|&n| (n, default_binary)).collect()),
        Some(list) => list
            .iter()
            .map(|o| {
                let name = OUTPUTS.iter().copied().find(|n| *n == o.name).ok_or_else(|| {
                    invalid(format!(
                        "unexpected inference output '{}': outputs are {:?}",
                        o.name, OUTPUTS
                    ))
                })?;
                Ok((name, o.parameters.binary_data.unwrap_or(default_binary)))
            })
            .collect(),
    }
}

#[derive(Serialize)]
struct OutputTensor<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: [usize; 2],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a [f32]>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

/// The JSON part of an answer, written straight from typed fields (no
/// intermediate `serde_json::Value` tree on the hot path).
#[derive(Serialize)]
struct ResponseHead<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    outputs: Vec<OutputTensor<'a>>,
}

/// Writes the v2 answer; binary outputs follow the JSON header.
fn write_response(
    model: &str,
    version: &str,
    id: Option<&Value>,
    n_rows: usize,
    tensors: &[(&str, &[f32], usize, bool)],
) -> HttpResponse {
    let outputs: Vec<OutputTensor> = tensors
        .iter()
        .map(|&(name, values, width, binary)| OutputTensor {
            name,
            datatype: FP32,
            shape: [n_rows, width],
            parameters: binary.then_some(BinarySize {
                binary_data_size: values.len() * 4,
            }),
            data: (!binary).then_some(values),
        })
        .collect();
    let head = ResponseHead {
        model_name: model,
        model_version: version,
        id,
        outputs,
    };
    let head = serde_json::to_vec(&head).expect("serialising to a Vec cannot fail");
    let binary_len: usize = tensors.iter().filter(|t| t.3).map(|t| t.1.len() * 4).sum();
    if binary_len == 0 {
        return HttpResponse::Ok().content_type("application/json").body(head);
    }
    let mut body = Vec::with_capacity(head.len() + binary_len);
    body.extend_from_slice(&head);
    for &(_, values, _, binary) in tensors {
        if binary {
            for v in values {
                body.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    HttpResponse::Ok()
        .content_type("application/octet-stream")
        .insert_header((HEADER_LENGTH, head.len().to_string()))
        .body(body)
}
