//! The HTTP layer (actix-web): routes, request checks, error mapping, and
//! the request-id / metrics middleware.
//!
//! Owns: the app's routing table (one resource per [`Route`], registered
//! from the enum so a route and its metric label cannot drift apart) and
//! per-request observation (request id, tracing span, request count and
//! duration by route and status, failures by reason, the request marked in
//! flight on its connection, a large answer handed over in pieces; see
//! `conn.rs`), and which API-key scope each route needs ([`access`]: the key
//! is checked on the request's head, so a refused request's body is never
//! read). The handlers run on
//! actix-web's HTTP worker threads; they are not actors. Must not touch:
//! inference (handed to [`Engine::infer`] as a validated input), batching
//! policy, or metric definitions (see `metrics.rs`).

pub(crate) mod browser;
pub(crate) mod conn;
pub mod error;
pub(crate) mod extract;
pub(crate) mod routes;
pub(crate) mod server;
pub mod v2;

pub(crate) use self::server::server;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::ConnectionType;
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpResponseBuilder, ResponseError, web};
use tracing::Instrument;

use self::browser::BrowserGuard;
use self::conn::{ConnHandle, InFlight, Pieces};
use self::extract::{TIMEOUT_HEADER, check_head, numeric_header, reject_browser_forms};
use self::server::ConnectionGuard;
use crate::auth::{Access, KeyId};
use crate::config::Config;
use crate::engine::{Engine, InferOutput, ModelDescription};
use crate::http::error::{HttpError, V2Error};
use crate::labels::{FailureReason, Route};

/// Per-request limits the handlers read (the row limit is the engine's).
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub max_body_bytes: usize,
    /// Time a body has to arrive (`server.body_timeout_ms`).
    pub body_timeout: Duration,
    pub max_header_bytes: usize,
    pub default_timeout: Duration,
}

impl HttpSettings {
    pub fn from_config(config: &Config) -> HttpSettings {
        HttpSettings {
            max_body_bytes: config.server.max_body_bytes,
            body_timeout: config.body_timeout(),
            max_header_bytes: config.server.max_header_bytes,
            default_timeout: config.default_timeout(),
        }
    }
}

/// Registers every route: one resource per [`Route`] template.
pub fn configure(cfg: &mut web::ServiceConfig) {
    // actix tries resources in registration order, and each route with a
    // `{name}` segment is a regex match: the inference routes go first, so
    // the hot path is not matched against every metadata route before its
    // own (the templates do not overlap, so the order changes no answer).
    let hot = [Route::Infer, Route::V2Infer, Route::V2VersionInfer];
    let rest = Route::ALL.iter().copied().filter(|r| !hot.contains(r));
    for route in hot.into_iter().chain(rest) {
        if let Some(resource) = resource(route) {
            cfg.service(resource);
        }
    }
}

/// The resource serving `route` (`None` for [`Route::Other`], which is what
/// matched nothing). The match is exhaustive, so a new route label without a
/// handler does not compile.
fn resource(route: Route) -> Option<actix_web::Resource> {
    let r = web::resource(route.as_str());
    Some(match route {
        Route::Infer => r
            .route(web::post().to(routes::infer))
            .default_service(web::to(routes::method_not_allowed)),
        Route::Healthz => r.route(web::get().to(routes::healthz)),
        Route::Readyz => r.route(web::get().to(routes::readyz)),
        Route::Metrics => r.route(web::get().to(routes::metrics)),
        Route::V2Server => r.route(web::get().to(v2::server_metadata)),
        Route::V2Live => r.route(web::get().to(v2::live)),
        Route::V2Ready => r.route(web::get().to(v2::ready)),
        Route::V2Model | Route::V2ModelVersion => r.route(web::get().to(v2::model_metadata)),
        Route::V2ModelReady | Route::V2ModelVersionReady => r.route(web::get().to(v2::model_ready)),
        Route::V2ModelConfig | Route::V2ModelVersionConfig => r.route(web::get().to(v2::model_config)),
        Route::V2Infer | Route::V2VersionInfer => r.route(web::post().to(v2::infer)),
        Route::V2RepositoryIndex => r.route(web::post().to(v2::repository::index)),
        Route::V2RepositoryLoad => r.route(web::post().to(v2::repository::load)),
        Route::V2RepositoryUnload => r.route(web::post().to(v2::repository::unload)),
        Route::V2ModelStats | Route::V2ModelVersionStats => r.route(web::get().to(v2::model_stats)),
        Route::Other => return None,
    })
}

/// The engine's own timing headers on an inference answer, the same on
/// every protocol: `x-queue-time-us` and `x-compute-time-us`.
pub fn timing_headers<'b>(response: &'b mut HttpResponseBuilder, output: &InferOutput) -> &'b mut HttpResponseBuilder {
    response
        .insert_header(("x-queue-time-us", output.queue_wait.as_micros() as u64))
        .insert_header(("x-compute-time-us", output.compute.as_micros() as u64))
}

/// Who computed an inference answer: `x-model-name` and `x-model-version`.
pub fn model_headers<'b>(
    response: &'b mut HttpResponseBuilder,
    model: &ModelDescription,
) -> &'b mut HttpResponseBuilder {
    let name = HeaderValue::from_str(&model.name).unwrap_or_else(|_| HeaderValue::from_static("?"));
    response
        .insert_header(("x-model-name", name))
        .insert_header(("x-model-version", model.version))
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

/// The refusal due on the request's head alone, if any. A request framed
/// ambiguously poisons its connection: actix-http may already have parsed
/// the bytes after it as another request, and that one must not be served.
fn refuse_on_head(req: &ServiceRequest, max_header_bytes: usize) -> Result<(), HttpError> {
    let guard = req.conn_data::<ConnectionGuard>();
    if guard.is_some_and(ConnectionGuard::is_poisoned) {
        return Err(HttpError::AmbiguousLength);
    }
    let browser = req.app_data::<web::Data<BrowserGuard>>();
    let verdict = check_head(req.headers(), max_header_bytes)
        .and_then(|()| browser.map_or(Ok(()), |b| b.check(req.headers())))
        .and_then(|()| reject_browser_forms(req.method(), req.headers()));
    if let (Err(HttpError::AmbiguousLength), Some(guard)) = (&verdict, guard) {
        guard.poison();
    }
    verdict
}

/// What `route` asks to do, for the API-key check (`auth.rs`). The match
/// is exhaustive: a new route cannot be added without choosing.
fn access(route: Route) -> Access {
    match route {
        Route::Infer | Route::V2Infer | Route::V2VersionInfer => Access::Infer,
        // The probes (a model's readiness too, as on gRPC); a path that
        // matches no route is 404 with or without a key.
        Route::Healthz
        | Route::Readyz
        | Route::V2Live
        | Route::V2Ready
        | Route::V2ModelReady
        | Route::V2ModelVersionReady
        | Route::Other => Access::Health,
        Route::Metrics => Access::Metrics,
        Route::V2Server
        | Route::V2Model
        | Route::V2ModelVersion
        | Route::V2ModelConfig
        | Route::V2ModelVersionConfig
        | Route::V2ModelStats
        | Route::V2ModelVersionStats => Access::Metadata,
        Route::V2RepositoryIndex | Route::V2RepositoryLoad | Route::V2RepositoryUnload => Access::Repository,
    }
}

/// The API-key check on a request's head (`Authorization: Bearer <key>`)
/// for `route` (matched on the path actix routes on): the accepted key's id
/// (`None`: no key needed), or the refusal, counted by its reason.
pub(crate) fn check_key(engine: &Engine, route: Route, headers: &HeaderMap) -> Result<Option<KeyId>, HttpError> {
    let values = headers.get_all(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    engine.keys().check(values, access(route)).map_err(|e| {
        engine.metrics().observe_auth_failure(e.failure());
        HttpError::Auth(e)
    })
}

/// The answer to a request refused before routing: an API-key refusal in
/// its route's protocol's error format, the transport's own refusals as
/// they always were. A request with a body is answered `Connection: close`:
/// its body is never read, and actix closes a connection whose request body
/// it has not all seen, so a client must not send another request on it.
fn refusal_response(req: &ServiceRequest, route: Route, refusal: HttpError) -> actix_web::HttpResponse {
    let mut response = match refusal {
        HttpError::Auth(_) if route.is_v2() => V2Error::Http(refusal).error_response(),
        _ => refusal.error_response(),
    };
    let headers = req.headers();
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || extract::declared_length(headers).map_or(true, |n| n.is_some_and(|n| n > 0));
    if has_body {
        response.head_mut().set_connection_type(ConnectionType::Close);
    }
    response
}

/// Marks the request in flight on its connection: a draining server waits
/// for it, and its answer may take until its deadline to drain. (The
/// inference handlers refuse a request while held answers fill
/// `server.max_pending_answer_bytes`, once its body is read: a body left
/// unread would close the connection before the client read the 503.)
fn admit(req: &ServiceRequest, start: Instant) -> Option<InFlight> {
    let settings = req.app_data::<web::Data<HttpSettings>>();
    let default = settings.map_or(Duration::ZERO, |s| s.default_timeout);
    // A malformed header is the handler's 400; here it only stretches nothing.
    let timeout = match numeric_header(req.headers(), TIMEOUT_HEADER, 1..=extract::MAX_TIMEOUT_MS) {
        Some(Ok(ms)) => Duration::from_millis(ms),
        _ => default,
    };
    req.conn_data::<ConnHandle>().map(|c| c.start_request(start + timeout))
}

/// Request id, tracing span, the refusals made on the head alone (too large,
/// ambiguous body length, a web page's request or a rebinding `Host`,
/// browser-form content type, no API key with the route's scope) or on the
/// answers held for slow readers, and request metrics for every route.
async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let start = Instant::now();
    let id = request_id(&req);
    let engine = req.app_data::<web::Data<Engine>>().cloned();
    // The path actix's router matches (percent-decoded but for `%2F`, `%25`
    // and `%2B`), not the raw one: `/%69nfer` is routed to `/infer`, so its
    // label and the scope it needs must be `/infer`'s too.
    let route = Route::for_path(req.match_info().as_str());
    let span = tracing::info_span!(
        "request",
        id = id.to_str().unwrap_or(""),
        method = %req.method(),
        path = req.path(),
        key = tracing::field::Empty
    );
    let max_header_bytes = req
        .app_data::<web::Data<HttpSettings>>()
        .map_or(usize::MAX, |s| s.max_header_bytes);
    let refusal = refuse_on_head(&req, max_header_bytes).and_then(|()| match &engine {
        Some(engine) => check_key(engine, route, req.headers()).map(|key| {
            if let Some(key) = key {
                span.record("key", tracing::field::display(key));
            }
        }),
        None => Ok(()),
    });
    let _in_flight = admit(&req, start);
    let mut res = match refusal {
        // Refused before routing, so no handler (and no extractor) runs.
        Err(refusal) => {
            let response = refusal_response(&req, route, refusal);
            req.into_response(response)
        }
        Ok(()) => {
            let res = next.call(req).instrument(span.clone()).await?;
            match &engine {
                // A large answer is written in pieces (see `conn.rs`).
                Some(engine) => res.map_body(|_, body| Pieces::wrap(body, engine.held())),
                None => res.map_into_boxed_body(),
            }
        }
    };
    res.headers_mut().insert(HeaderName::from_static("x-request-id"), id);
    let status = res.status();
    if let Some(engine) = engine {
        let metrics = engine.metrics();
        metrics.observe_request(route, status.as_str(), start.elapsed());
        if let Some(reason) = res.response().extensions().get::<FailureReason>().copied() {
            metrics.observe_failure(route, reason);
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

#[cfg(test)]
mod tests {
    use actix_web::{App, test};

    use super::*;

    /// A concrete path for a route template.
    fn sample_path(route: Route) -> String {
        match route {
            Route::Other => "/no-such-route".to_string(),
            _ => route.as_str().replace("{model}", "m").replace("{version}", "1"),
        }
    }

    #[actix_web::test]
    async fn every_route_label_has_a_route_and_every_route_its_label() {
        let app = test::init_service(App::new().configure(configure)).await;
        for &route in Route::ALL {
            let req = test::TestRequest::get().uri(&sample_path(route)).to_request();
            let res = test::call_service(&app, req).await;
            let matched = res.request().match_pattern();
            if route == Route::Other {
                assert_eq!(matched, None, "{route:?} must match nothing");
            } else {
                assert_eq!(matched.as_deref(), Some(route.as_str()), "{route:?}");
                assert_eq!(Route::from_template(&matched.unwrap()), route);
            }
            // The label the middleware uses agrees with actix's routing.
            assert_eq!(Route::for_path(&sample_path(route)), route, "{route:?}");
            if route == Route::Other {
                continue;
            }
            for near_miss in [format!("{}/", sample_path(route)), format!("/x{}", sample_path(route))] {
                assert_ne!(Route::for_path(&near_miss), route, "{near_miss}");
            }
        }
    }
}
