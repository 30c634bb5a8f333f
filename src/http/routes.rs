//! Route handlers. Each one only checks, parses and hands over: inference
//! goes to [`Engine::infer`] as a validated input; nothing here computes or
//! locks a model.
//!
//! Owns: `/infer` (the old sidecar's contract plus `x-queue-time-us`,
//! `x-compute-time-us`, `x-model-name` and `x-model-version`), `/healthz`, `/readyz` and `/metrics`. Must not touch:
//! status mapping (`http/error.rs`), batching (the batcher), the wire format
//! (`sidecar_json.rs`).

use actix_web::http::header::ContentType;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde_json::json;

use super::extract::{read_body, request_priority, request_timeout, require_json};
use super::{HttpSettings, model_headers, timing_headers};
use crate::engine::{Engine, InferOptions, ModelTarget, RequestTrace, VersionHealth};
use crate::http::error::HttpError;
use crate::labels::Route;
use crate::readiness::State;
use crate::sidecar_json::{parse_infer_request, write_infer_response};
use crate::telemetry::{self, Outcome, Protocol};

/// `POST /infer`: `{"features": [row]}` or `{"features": [[row], ...]}`, to
/// the default model (`model.name`, or the only model).
pub async fn infer(
    req: HttpRequest,
    payload: web::Payload,
    engine: web::Data<Engine>,
    settings: web::Data<HttpSettings>,
) -> Result<HttpResponse, HttpError> {
    let trace = request_trace(&req, Route::Infer);
    let result = answer_infer(&req, payload, &engine, &settings, trace.as_ref()).await;
    finish_trace(trace, &result);
    result
}

async fn answer_infer(
    req: &HttpRequest,
    payload: web::Payload,
    engine: &Engine,
    settings: &HttpSettings,
    trace: Option<&RequestTrace>,
) -> Result<HttpResponse, HttpError> {
    require_json(req)?;
    let timeout = request_timeout(req)?;
    let priority = request_priority(req)?;
    let body = read_body(req, payload, settings.max_body_bytes, settings.body_timeout).await?;
    engine.held().admit()?;
    let version = engine.resolve(&ModelTarget::DEFAULT)?;
    let request = parse_infer_request(&body, version.limits())?;
    drop(body);
    let options = InferOptions {
        timeout,
        priority,
        route: Route::Infer.into(),
        trace: trace.cloned(),
    };
    let answer = engine.infer(version, request.input, options).await?;
    let answering = trace.map(RequestTrace::answer);
    let (output, dims) = (&answer.output, answer.model.dims);
    let body = write_infer_response(&output.logits, dims.output, &output.router_weights, dims.experts);
    let mut response = HttpResponse::Ok();
    response.content_type(ContentType::json());
    timing_headers(&mut response, output);
    model_headers(&mut response, &answer.model);
    let response = response.body(body);
    drop(answering);
    Ok(response)
}

/// The sampled trace of an HTTP request on `route` (its `traceparent`
/// continued), or `None` (tracing off: nothing is read).
pub(crate) fn request_trace(req: &HttpRequest, route: Route) -> Option<RequestTrace> {
    let parent = telemetry::incoming(|name| req.headers().get(name).and_then(|v| v.to_str().ok()))?;
    parent.request(Protocol::Http {
        method: "POST",
        route: route.as_str(),
    })
}

/// Ends a request's span with the status its handler's `result` answers.
pub(crate) fn finish_trace<E: ResponseError>(trace: Option<RequestTrace>, result: &Result<HttpResponse, E>) {
    let Some(trace) = trace else { return };
    match result {
        Ok(response) => trace.finish(Outcome::Http {
            status: response.status().as_u16(),
            error: None,
        }),
        Err(e) => {
            let message = e.to_string();
            trace.finish(Outcome::Http {
                status: e.status_code().as_u16(),
                error: Some(&message),
            });
        }
    }
}

/// `GET /healthz`: the old sidecar's fields for the default model, plus
/// every loaded model and version.
pub async fn healthz(engine: web::Data<Engine>) -> HttpResponse {
    let health = engine.health();
    let mut body = serde_json::Map::new();
    body.insert("status".into(), json!("ok"));
    if let Some(v) = health.default_version()
        && let serde_json::Value::Object(fields) = sidecar_fields(v)
    {
        body.extend(fields);
    }
    let models: Vec<serde_json::Value> = health
        .versions
        .iter()
        .map(|v| {
            let mut m = sidecar_fields(v);
            m["name"] = json!(v.description.name);
            m["model_version"] = json!(v.description.version);
            m
        })
        .collect();
    body.insert("default_model".into(), json!(health.default_model));
    body.insert("models".into(), json!(models));
    body.insert("ready".into(), json!(health.ready));
    body.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    HttpResponse::Ok().json(body)
}

/// The old sidecar's `/healthz` fields, for one served version.
fn sidecar_fields(v: &VersionHealth) -> serde_json::Value {
    let m = &v.description;
    json!({
        "arch": m.arch,
        "checkpoint": m.checkpoint,
        "in_dim": m.dims.input,
        "out_dim": m.dims.output,
        "n_experts": m.dims.experts,
        "top_k": m.dims.top_k,
        "size": m.size,
        "layernorm": m.layernorm,
        "weight_precision": m.weight_precision,
        "param_count": m.param_count,
        "checkpoint_step": m.checkpoint_step,
        "demo_model": m.demo,
        "backend": m.backend,
        "devices": m.devices,
        "isa": m.isa,
        "workers": v.workers,
    })
}

/// `GET /readyz`: 200 once every loaded model version's workers have run
/// their warm-up batch (and at least one model is loaded); 503 while
/// starting or draining.
pub async fn readyz(engine: web::Data<Engine>) -> HttpResponse {
    match engine.state() {
        State::Ready => HttpResponse::Ok().json(json!({ "status": State::Ready.as_str() })),
        not_ready => HttpResponse::ServiceUnavailable()
            .insert_header(("retry-after", "1"))
            .json(json!({ "status": not_ready.as_str() })),
    }
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(engine: web::Data<Engine>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(engine.render_metrics())
}

/// Unknown paths.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, HttpError> {
    Err(HttpError::NotFound(req.path().chars().take(200).collect()))
}

/// Known paths, wrong method.
pub async fn method_not_allowed(req: HttpRequest) -> Result<HttpResponse, HttpError> {
    Err(HttpError::MethodNotAllowed {
        method: req.method().to_string(),
        path: req.path().chars().take(200).collect(),
    })
}
