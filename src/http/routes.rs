//! Route handlers. Each one only checks, parses and hands over: inference
//! goes to [`Engine::infer`] as a validated input; nothing here computes or
//! locks a model.
//!
//! Owns: `/infer` (the old sidecar's contract plus `x-queue-time-us` and
//! `x-compute-time-us`), `/healthz`, `/readyz` and `/metrics`. Must not touch:
//! status mapping (`http/error.rs`), batching (the batcher), the wire format
//! (`sidecar_json.rs`).

use actix_web::http::header::ContentType;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use super::extract::{read_body, request_timeout, require_json};
use super::{HttpSettings, timing_headers};
use crate::engine::{Engine, InferOptions};
use crate::error::ServeError;
use crate::labels::Route;
use crate::readiness::State;
use crate::sidecar_json::{parse_infer_request, write_infer_response};

/// `POST /infer`: `{"features": [row]}` or `{"features": [[row], ...]}`.
pub async fn infer(
    req: HttpRequest,
    payload: web::Payload,
    engine: web::Data<Engine>,
    settings: web::Data<HttpSettings>,
) -> Result<HttpResponse, ServeError> {
    require_json(&req)?;
    let timeout = request_timeout(&req, settings.default_timeout)?;
    let body = read_body(&req, payload, settings.max_body_bytes, settings.body_timeout).await?;
    let request = parse_infer_request(&body, &engine.limits)?;
    drop(body);
    let options = InferOptions {
        timeout,
        route: Route::Infer.into(),
    };
    let output = engine.infer(request.input, options).await?;
    let dims = engine.description.dims;
    let body = write_infer_response(&output.logits, dims.output, &output.router_weights, dims.experts);
    Ok(timing_headers(HttpResponse::Ok().content_type(ContentType::json()), &output).body(body))
}

/// `GET /healthz`: the old sidecar's fields, plus what is being served.
pub async fn healthz(engine: web::Data<Engine>) -> HttpResponse {
    let m = &engine.description;
    HttpResponse::Ok().json(json!({
        "status": "ok",
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
        "workers": engine.readiness.workers(),
        "ready": engine.readiness.is_ready(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// `GET /readyz`: 200 once the model is loaded and every worker has run its
/// warm-up batch; 503 while starting or draining.
pub async fn readyz(engine: web::Data<Engine>) -> HttpResponse {
    match engine.readiness.state() {
        State::Ready => HttpResponse::Ok().json(json!({ "status": State::Ready.as_str() })),
        not_ready => HttpResponse::ServiceUnavailable()
            .insert_header(("retry-after", "1"))
            .json(json!({ "status": not_ready.as_str() })),
    }
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(engine: web::Data<Engine>) -> HttpResponse {
    engine.metrics.ready.set(i64::from(engine.readiness.is_ready()));
    for (device, bytes) in engine.backend.device_memory_used() {
        engine
            .metrics
            .device_memory_bytes
            .with_label_values(&[&device])
            .set(bytes as f64);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(engine.metrics.render())
}

/// Unknown paths.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ServeError> {
    Err(ServeError::NotFound(req.path().chars().take(200).collect()))
}

/// Known paths, wrong method.
pub async fn method_not_allowed(req: HttpRequest) -> Result<HttpResponse, ServeError> {
    Err(ServeError::MethodNotAllowed {
        method: req.method().to_string(),
        path: req.path().chars().take(200).collect(),
    })
}
