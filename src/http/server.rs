//! The HTTP server: listener, connection limits and timeouts, and the
//! checks made before a body is read.
//!
//! Owns: building the actix server on the bound listeners (TCP, and
//! `server.unix_socket`'s when set: worker threads, the connection cap,
//! header / keep-alive timeouts, graceful stop; every accepted connection
//! of either goes through `conn.rs`'s guard) and the
//! `Expect: 100-continue` gate: a request that will be refused for its
//! declared size (413; 400 on v2 routes, as their handlers answer it), its
//! head (431, ambiguous length), a web page's origin or a rebinding `Host`
//! (403, `browser.rs`) or a browser-form content type (415) is
//! refused before `100 Continue`, so the client never uploads a body that would be
//! thrown away. Such a refusal closes the connection (an unread body must
//! never be parsed as the next request). Must not touch: routes and their
//! handlers (`http/mod.rs`), what a body means.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::error::DispatchError;
use actix_http::{ConnectionType, HttpMessage as _, HttpService, KeepAlive, Request};
use actix_server::Server;
use actix_service::{IntoServiceFactory as _, Service, ServiceFactory, ServiceFactoryExt as _, fn_service, map_config};
use actix_web::dev::AppConfig;
use actix_web::{App, ResponseError, web};

use super::browser::BrowserGuard;
use super::conn::{ConnSettings, GuardFactory, GuardedIo, HttpIo, guard};
use super::error::V2Error;
use super::extract::{check_declared_length, check_head, reject_browser_forms};
use super::{HttpSettings, check_key, configure, observe, routes};
use crate::config::Config;
use crate::engine::Engine;
use crate::http::error::HttpError;
use crate::labels::Route;

/// Builds the HTTP server on already bound listeners: TCP, and the Unix
/// socket when one is given. Both serve the same routes through the same
/// connection guard, share the workers and `server.max_connections` (a
/// worker's connection cap counts both), and stop together. Signals are
/// not handled here: the caller's shutdown future drives a graceful stop.
pub fn server(
    listener: TcpListener,
    unix: Option<UnixListener>,
    engine: Engine,
    config: &Config,
) -> std::io::Result<Server> {
    let local_addr = listener.local_addr()?;
    let shared = Shared::new(engine, config);
    // On the listener's real address: a port-0 or loopback bind is what
    // decides whether `Host` is checked.
    let tcp = shared.endpoint(BrowserGuard::new(config, local_addr), Some(local_addr));
    let http_workers = config.server.http_workers;
    let per_worker = config.server.max_connections.div_ceil(http_workers).max(1);
    // One closure type for both listeners: its service accepts either
    // kind of connection (`conn::Accepted`).
    let factory = |endpoint: Endpoint| move || endpoint.service();
    let mut builder = Server::build()
        .workers(http_workers)
        .max_concurrent_connections(per_worker)
        .shutdown_timeout(config.server.shutdown_timeout_secs)
        .disable_signals()
        .listen("tokitai-http", listener, factory(tcp))?;
    if let Some(unix) = unix {
        // Only a process on this host reaches it: `Host` is checked as on a
        // loopback bind (curl --unix-socket sends `Host: localhost`).
        let endpoint = shared.endpoint(BrowserGuard::for_unix_socket(config), None);
        builder = builder.listen_uds("tokitai-http-unix", unix, factory(endpoint))?;
    }
    Ok(builder.run())
}

/// What every listener's connections share.
struct Shared {
    engine: web::Data<Engine>,
    settings: web::Data<HttpSettings>,
    conn_settings: ConnSettings,
    keep_alive: KeepAlive,
    header_timeout: Duration,
    max_body_bytes: usize,
    max_header_bytes: usize,
}

impl Shared {
    fn new(engine: Engine, config: &Config) -> Shared {
        let conn_settings = ConnSettings {
            send_timeout: config.send_timeout(),
            held: Arc::clone(engine.held()),
            drain: engine.drain().clone(),
        };
        Shared {
            settings: web::Data::new(HttpSettings::from_config(config)),
            engine: web::Data::new(engine),
            conn_settings,
            keep_alive: match config.server.keep_alive_secs {
                0 => KeepAlive::Disabled,
                secs => KeepAlive::Timeout(Duration::from_secs(secs)),
            },
            header_timeout: config.header_timeout(),
            max_body_bytes: config.server.max_body_bytes,
            max_header_bytes: config.server.max_header_bytes,
        }
    }

    /// One listener's side: its `Host` rule and its local address.
    fn endpoint(&self, browser: BrowserGuard, local_addr: Option<SocketAddr>) -> Endpoint {
        Endpoint {
            engine: self.engine.clone(),
            settings: self.settings.clone(),
            gate: ExpectGate {
                max_body_bytes: self.max_body_bytes,
                max_header_bytes: self.max_header_bytes,
                browser: browser.clone(),
                engine: (**self.engine).clone(),
            },
            browser: web::Data::new(browser),
            conn_settings: self.conn_settings.clone(),
            keep_alive: self.keep_alive,
            header_timeout: self.header_timeout,
            local_addr,
        }
    }
}

/// What one listener's workers build their service from.
#[derive(Clone)]
struct Endpoint {
    engine: web::Data<Engine>,
    settings: web::Data<HttpSettings>,
    browser: web::Data<BrowserGuard>,
    gate: ExpectGate,
    conn_settings: ConnSettings,
    keep_alive: KeepAlive,
    header_timeout: Duration,
    /// `None` on the Unix socket.
    local_addr: Option<SocketAddr>,
}

impl Endpoint {
    /// One worker's service: the app behind actix-http's HTTP/1 service,
    /// behind the connection guard.
    fn service(
        &self,
    ) -> GuardFactory<
        impl ServiceFactory<
            HttpIo,
            Config = (),
            Response = (),
            Error = DispatchError,
            InitError = (),
            Future: 'static,
            Service: Service<HttpIo, Future: 'static>,
        > + use<>,
    > {
        let gate = self.gate.clone();
        let app = App::new()
            .app_data(self.engine.clone())
            .app_data(self.settings.clone())
            .app_data(self.browser.clone())
            .wrap(actix_web::middleware::from_fn(observe))
            .configure(configure)
            .default_service(web::to(routes::not_found))
            .into_factory()
            .map_err(|err: actix_web::Error| err.error_response());
        let mut http = HttpService::build()
            .keep_alive(self.keep_alive)
            .client_request_timeout(self.header_timeout)
            .client_disconnect_timeout(Duration::from_secs(1))
            // A client that closes its connection while its request
            // waits must cancel the request (its rows are then dropped,
            // not computed). actix allows HTTP/1 half-closure by default,
            // which keeps the handler running after the client's EOF, so
            // nothing was ever cancelled. hyper, under the old sidecar,
            // does not allow half-closure either.
            .h1_allow_half_closed(false);
        if let Some(addr) = self.local_addr {
            http = http.local_addr(addr);
        }
        let http = http
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
        guard(http, self.conn_settings.clone())
    }
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
    /// Its API keys (a request without one is refused before its body)
    /// and its metrics.
    engine: Engine,
}

impl ExpectGate {
    /// The request, to be continued; or the refusal, sent instead of
    /// `100 Continue`, with the connection closed after it.
    fn check(&self, req: Request) -> Result<Request, actix_web::Error> {
        let start = Instant::now();
        let headers = req.headers();
        // The route the router will match (percent-decoded, as `observe`'s).
        let route = Route::for_path(actix_web::dev::Url::new(req.uri().clone()).path());
        let verdict = check_head(headers, self.max_header_bytes)
            .and_then(|()| self.browser.check(headers))
            .and_then(|()| reject_browser_forms(req.method(), headers))
            .and_then(|()| check_key(&self.engine, route, headers).map(drop))
            .and_then(|()| check_declared_length(headers, self.max_body_bytes));
        let Err(error) = verdict else {
            return Ok(req);
        };
        // The same answer the route's own protocol gives for it.
        let mut response = if route.is_v2() {
            ResponseError::error_response(&V2Error::Http(error.clone()))
        } else {
            ResponseError::error_response(&error)
        };
        response.head_mut().set_connection_type(ConnectionType::Close);
        let metrics = self.engine.metrics();
        metrics.observe_request(route, response.status().as_str(), start.elapsed());
        metrics.observe_failure(route, error.reason());
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
