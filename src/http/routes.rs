//! Route handlers. Each one only checks, parses and hands over: inference
//! goes to the batcher as a typed [`Job`]; nothing here computes or locks a
//! model.
//!
//! Owns: `/infer` (the old sidecar's contract plus `x-queue-time-us` and
//! `x-compute-time-us`), `/healthz`, `/readyz` and `/metrics`. Must not touch:
//! status mapping (`http/error.rs`) or batching (the batcher).

use std::sync::Arc;

use actix_web::http::header::ContentType;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use super::HttpSettings;
use super::extract::{read_body, request_timeout, require_json};
use crate::api::{parse_infer_request, write_infer_response};
use crate::batcher::Submit;
use crate::batcher::job::{Job, JobOutput};
use crate::engine::Engine;
use crate::error::ServeError;
use crate::metrics::Metrics;

/// `POST /infer`: `{"features": [row]}` or `{"features": [[row], ...]}`.
pub async fn infer(
    req: HttpRequest,
    payload: web::Payload,
    engine: web::Data<Engine>,
    settings: web::Data<HttpSettings>,
) -> Result<HttpResponse, ServeError> {
    if !engine.state.is_ready() {
        let why = if engine.state.is_draining() {
            "draining"
        } else {
            "starting"
        };
        return Err(ServeError::NotReady(why));
    }
    require_json(&req)?;
    let timeout = request_timeout(&req, settings.default_timeout)?;
    let body = read_body(&req, payload, settings.max_body_bytes).await?;
    let dims = engine.model.dims;
    let features = parse_infer_request(&body, dims.input, settings.max_request_rows)?;
    drop(body);

    let output = compute(&engine, features.rows, features.n_rows, timeout, "/infer").await?;
    let body = write_infer_response(&output.logits, dims.output, &output.router_weights, dims.experts);
    Ok(HttpResponse::Ok()
        .content_type(ContentType::json())
        .insert_header(("x-queue-time-us", output.queue_wait.as_micros().to_string()))
        .insert_header(("x-compute-time-us", output.compute.as_micros().to_string()))
        .body(body))
}

/// Hands `n_rows` validated rows to the batcher as one job and waits for
/// its answer. Shared by `/infer` and the v2 infer route (`route` names the
/// caller for the `cancelled` count).
pub(super) async fn compute(
    engine: &Engine,
    rows: Vec<f32>,
    n_rows: usize,
    timeout: std::time::Duration,
    route: &'static str,
) -> Result<JobOutput, ServeError> {
    let (job, reply) = Job::new(rows, n_rows, timeout);
    let inflight = InflightGuard::new(&engine.metrics, route);
    // Fire and forget: the batcher answers a rejection (429, 503) through the
    // job's own channel at once, so the HTTP thread waits on one channel and
    // is woken once per request, not twice.
    engine.batcher.do_send(Submit(job));
    let outcome = reply
        .await
        .map_err(|_| ServeError::Internal("the request was dropped before it was answered".into()))
        .and_then(|answer| answer);
    inflight.finish();
    let output = outcome?;
    engine.metrics.observe_queue_wait(output.queue_wait);
    Ok(output)
}

/// Tracks an accepted inference request: the in-flight gauge, and a
/// `cancelled` failure when the client leaves before its answer (actix then
/// drops the handler's future, and this guard with it, before `finish`).
/// Answers and errors are counted by the middleware instead.
struct InflightGuard {
    metrics: Arc<Metrics>,
    route: &'static str,
    finished: bool,
}

impl InflightGuard {
    fn new(metrics: &Arc<Metrics>, route: &'static str) -> InflightGuard {
        metrics.add_inflight(1);
        InflightGuard {
            metrics: Arc::clone(metrics),
            route,
            finished: false,
        }
    }

    /// The engine answered (with output or an error).
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.metrics.add_inflight(-1);
        if !self.finished {
            self.metrics.observe_failure(self.route, "cancelled");
        }
    }
}

/// `GET /healthz`: the old sidecar's fields, plus what is being served.
pub async fn healthz(engine: web::Data<Engine>) -> HttpResponse {
    let m = &engine.model;
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
        "param_count": m.param_count,
        "checkpoint_step": m.checkpoint_step,
        "demo_model": m.demo,
        "backend": m.backend,
        "devices": m.devices,
        "workers": engine.state.workers(),
        "ready": engine.state.is_ready(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// `GET /readyz`: 200 once the model is loaded and every worker has run its
/// warm-up batch; 503 while starting or draining.
pub async fn readyz(engine: web::Data<Engine>) -> HttpResponse {
    if engine.state.is_ready() {
        HttpResponse::Ok().json(json!({ "status": "ready" }))
    } else {
        let status = if engine.state.is_draining() {
            "draining"
        } else {
            "starting"
        };
        HttpResponse::ServiceUnavailable()
            .insert_header(("retry-after", "1"))
            .json(json!({ "status": status }))
    }
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(engine: web::Data<Engine>) -> HttpResponse {
    engine.metrics.ready.set(i64::from(engine.state.is_ready()));
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
