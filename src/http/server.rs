//! The HTTP server: listener, connection limits and timeouts, and the
//! checks made before a body is read.
//!
//! Owns: building the actix server on a bound listener (worker threads, the
//! connection cap, header / keep-alive timeouts, graceful stop; every
//! accepted connection goes through `conn.rs`'s guard) and the
//! `Expect: 100-continue` gate: a request that will be refused for its
//! declared size (413; 400 on v2 routes, as their handlers answer it), its
//! head (431, ambiguous length), a web page's origin or a rebinding `Host`
//! (403, `browser.rs`) or a browser-form content type (415) is
//! refused before `100 Continue`, so the client never uploads a body that would be
//! thrown away. Such a refusal closes the connection (an unread body must
//! never be parsed as the next request). Must not touch: routes and their
//! handlers (`http/mod.rs`), what a body means.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::{ConnectionType, HttpMessage as _, HttpService, KeepAlive, Request};
use actix_server::Server;
use actix_service::{IntoServiceFactory as _, ServiceFactoryExt as _, fn_service, map_config};
use actix_web::dev::AppConfig;
use actix_web::{App, ResponseError, web};

use super::browser::BrowserGuard;
use super::conn::{ConnSettings, GuardedIo, guard};
use super::error::V2Error;
use super::extract::{check_declared_length, check_head, reject_browser_forms};
use super::{HttpSettings, configure, observe, routes};
use crate::config::Config;
use crate::engine::Engine;
use crate::http::error::HttpError;
use crate::labels::Route;
use crate::metrics::Metrics;

/// Builds the HTTP server on an already bound listener. Signals are not
/// handled here: the caller's shutdown future drives a graceful stop.
pub fn server(listener: TcpListener, engine: Engine, config: &Config) -> std::io::Result<Server> {
    let settings = web::Data::new(HttpSettings::from_config(config));
    let local_addr = listener.local_addr()?;
    // On the listener's real address: a port-0 or loopback bind is what
    // decides whether `Host` is checked.
    let browser = BrowserGuard::new(config, local_addr);
    let gate = ExpectGate {
        max_body_bytes: config.server.max_body_bytes,
        max_header_bytes: config.server.max_header_bytes,
        browser: browser.clone(),
        metrics: Arc::clone(engine.metrics()),
    };
    let browser = web::Data::new(browser);
    let engine = web::Data::new(engine);
    let header_timeout = config.header_timeout();
    let keep_alive = match config.server.keep_alive_secs {
        0 => KeepAlive::Disabled,
        secs => KeepAlive::Timeout(Duration::from_secs(secs)),
    };
    let conn_settings = ConnSettings {
        send_timeout: config.send_timeout(),
        held: Arc::clone(engine.held()),
        drain: engine.drain().clone(),
    };
    let http_workers = config.server.http_workers;
    let per_worker = config.server.max_connections.div_ceil(http_workers).max(1);
    let server = Server::build()
        .workers(http_workers)
        .max_concurrent_connections(per_worker)
        .shutdown_timeout(config.server.shutdown_timeout_secs)
        .disable_signals()
        .listen("tokitai-http", listener, move || {
            let (engine, settings, gate) = (engine.clone(), settings.clone(), gate.clone());
            let conn_settings = conn_settings.clone();
            let app = App::new()
                .app_data(engine)
                .app_data(settings)
                .app_data(browser.clone())
                .wrap(actix_web::middleware::from_fn(observe))
                .configure(configure)
                .default_service(web::to(routes::not_found))
                .into_factory()
                .map_err(|err: actix_web::Error| err.error_response());
            let http = HttpService::build()
                .keep_alive(keep_alive)
                .client_request_timeout(header_timeout)
                .client_disconnect_timeout(Duration::from_secs(1))
                // A client that closes its connection while its request
                // waits must cancel the request (its rows are then dropped,
                // not computed). actix allows HTTP/1 half-closure by default,
                // which keeps the handler running after the client's EOF, so
                // nothing was ever cancelled. hyper, under the old sidecar,
                // does not allow half-closure either.
                .h1_allow_half_closed(false)
                .local_addr(local_addr)
                .on_connect_ext(|io: &GuardedIo, ext: &mut actix_http::Extensions| {
                    ext.insert(ConnectionGuard::default());
                    ext.insert(io.handle());
                })
                .expect(fn_service(move |req: Request| {
                    let gate = gate.clone();
                    async move { gate.check(req) }
                }))
                .finish(map_config(app, |_| AppConfig::default()));
            // Every connection through its guard (slow readers, send
            // timeout, drain), instead of actix-http's plain `.tcp()`.
            guard(http, conn_settings)
        })?
        .run();
    Ok(server)
}

/// Per-connection state: set once a request on the connection was framed
/// ambiguously. actix-http may already have parsed bytes after such a
/// request as the next pipelined request; every later request on the
/// connection is then refused instead of served (no request is smuggled).
#[derive(Clone, Default)]
pub struct ConnectionGuard(Arc<std::sync::atomic::AtomicBool>);

impl ConnectionGuard {
    pub fn poison(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_poisoned(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The checks answered before `100 Continue`.
#[derive(Clone)]
struct ExpectGate {
    max_body_bytes: usize,
    max_header_bytes: usize,
    browser: BrowserGuard,
    metrics: Arc<Metrics>,
}

impl ExpectGate {
    /// The request, to be continued; or the refusal, sent instead of
    /// `100 Continue`, with the connection closed after it.
    fn check(&self, req: Request) -> Result<Request, actix_web::Error> {
        let start = Instant::now();
        let headers = req.headers();
        let verdict = check_head(headers, self.max_header_bytes)
            .and_then(|()| self.browser.check(headers))
            .and_then(|()| reject_browser_forms(req.method(), headers))
            .and_then(|()| check_declared_length(headers, self.max_body_bytes));
        let Err(error) = verdict else {
            return Ok(req);
        };
        let route = Route::for_path(req.path());
        // The same answer the route's own protocol gives for it.
        let mut response = if route.is_v2() {
            ResponseError::error_response(&V2Error::Http(error.clone()))
        } else {
            ResponseError::error_response(&error)
        };
        response.head_mut().set_connection_type(ConnectionType::Close);
        self.metrics
            .observe_request(route, response.status().as_str(), start.elapsed());
        self.metrics.observe_failure(route, error.reason());
        Err(actix_web::error::InternalError::from_response(Refused(error), response).into())
    }
}

/// A request refused at the `Expect` gate (the response is already built).
#[derive(Debug)]
struct Refused(HttpError);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
