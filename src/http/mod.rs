//! The HTTP actors (actix-web): routes, request checks, error mapping, and
//! the request-id / metrics middleware.
//!
//! Owns: the app's routing table and per-request observation (request id,
//! tracing span, request count and duration by route template and status,
//! failures by kind). Must not touch: inference (handed to the batcher as a
//! typed job), batching policy, or metric definitions (see `metrics.rs`).

pub mod error;
pub mod extract;
pub mod routes;
pub mod v2;

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, HttpServer, web};
use tracing::Instrument;

use self::error::FailureKind;
use crate::config::Config;
use crate::engine::Engine;

/// Per-request limits the handlers read.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub max_body_bytes: usize,
    pub max_request_rows: usize,
    pub default_timeout: Duration,
}

impl HttpSettings {
    pub fn from_config(config: &Config) -> HttpSettings {
        HttpSettings {
            max_body_bytes: config.server.max_body_bytes,
            max_request_rows: config.batching.max_request_rows,
            default_timeout: config.default_timeout(),
        }
    }
}

/// Registers every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/infer")
            .route(web::post().to(routes::infer))
            .default_service(web::to(routes::method_not_allowed)),
    )
    .service(web::resource("/healthz").route(web::get().to(routes::healthz)))
    .service(web::resource("/readyz").route(web::get().to(routes::readyz)))
    .service(web::resource("/metrics").route(web::get().to(routes::metrics)))
    .configure(v2::configure);
}

/// Builds the HTTP server on an already bound listener. Signals are not
/// handled here: the caller's shutdown future drives a graceful stop.
pub fn server(listener: TcpListener, engine: Engine, config: &Config) -> std::io::Result<Server> {
    let settings = web::Data::new(HttpSettings::from_config(config));
    let engine = web::Data::new(engine);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(engine.clone())
            .app_data(settings.clone())
            .wrap(from_fn(observe))
            .configure(configure)
            .default_service(web::to(routes::not_found))
    })
    .workers(config.server.http_workers)
    .shutdown_timeout(config.server.shutdown_timeout_secs)
    // A client that closes its connection while its request waits must
    // cancel the request (its rows are then dropped, not computed). actix
    // allows HTTP/1 half-closure by default, which keeps the handler running
    // after the client's EOF, so nothing was ever cancelled. hyper, under
    // the old sidecar, does not allow half-closure either.
    .h1_allow_half_closed(false)
    .disable_signals()
    .listen(listener)?
    .run();
    Ok(server)
}

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(0);

/// The client's `X-Request-Id` when it is short printable ASCII, else a new one.
fn request_id(req: &ServiceRequest) -> HeaderValue {
    let given = req
        .headers()
        .get("x-request-id")
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic()));
    match given {
        Some(v) => v.clone(),
        None => {
            let seq = REQUEST_SEQ.fetch_add(1, Ordering::Relaxed);
            let id = format!("{:08x}-{seq:012x}", std::process::id());
            HeaderValue::from_str(&id).expect("hex is a valid header value")
        }
    }
}

/// Request id, tracing span, and request metrics for every route.
async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody + 'static>, actix_web::Error> {
    let start = Instant::now();
    let id = request_id(&req);
    let engine = req.app_data::<web::Data<Engine>>().cloned();
    let span = tracing::info_span!(
        "request",
        id = id.to_str().unwrap_or(""),
        method = %req.method(),
        path = req.path()
    );
    let mut res = next.call(req).instrument(span.clone()).await?;
    res.headers_mut().insert(HeaderName::from_static("x-request-id"), id);
    let status = res.status();
    let route = res.request().match_pattern().unwrap_or_else(|| "other".to_string());
    if let Some(engine) = engine {
        let metrics = &engine.metrics;
        metrics.observe_request(&route, status.as_str(), start.elapsed());
        if let Some(FailureKind(kind)) = res.response().extensions().get::<FailureKind>().copied() {
            metrics.observe_failure(&route, kind);
        }
    }
    span.in_scope(|| {
        tracing::debug!(
            status = status.as_u16(),
            elapsed_us = start.elapsed().as_micros() as u64,
            "answered"
        );
    });
    Ok(res)
}
