//! The gRPC server: its own small tokio runtime, the HTTP/2 listener and
//! its limits, per-call observation, and the graceful stop.
//!
//! Owns: the `tokitai-grpc` threads (a multi-thread tokio runtime of
//! `grpc.threads` workers; the engine's batcher and workers are actors on
//! other threads, reached through `Engine::infer`, whose message send and
//! reply channel do not care which runtime awaits them), the accept loop
//! (over the TCP listener and, when `grpc.unix_socket` is set, the Unix
//! socket's: one loop, so both share every limit below)
//! and the connection classes ([`Slots`]: at most `grpc.max_connections`
//! connections that spoke, and apart from them at most
//! `grpc.max_handshaking_connections` still in their handshake, which
//! `handshake.rs` bounds in time), HTTP/2 settings (most
//! concurrent streams, header list size, keep-alive pings, reset-stream
//! limits), the message size limit (`server.max_body_bytes`), the per-call
//! metrics (`tokitai_grpc_requests_total` by method and status code), a
//! backstop that ends a unary call whose message never arrives, and the
//! drain on shutdown (no new connections, GOAWAY to open ones, calls in
//! flight get `server.shutdown_timeout_secs`). hyper serves the generated
//! tonic service directly, so no tonic layer answers a passed
//! `grpc-timeout` with CANCELLED before the engine answers
//! DEADLINE_EXCEEDED. Must not touch: what an RPC answers (`service.rs`).

use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tonic::{Code, Status};

use super::deadline::{GRPC_TIMEOUT, MAX_TIMEOUT, parse_grpc_timeout};
use super::handshake::{Handshakes, Replay, read_preface};
use super::held::{HeldData, StreamExecutor, current_stream};
use super::model::Served;
use super::pb::grpc_inference_service_server::GrpcInferenceServiceServer;
use super::service::{InferenceService, check_call};
use super::status::code_name;
use crate::config::Config;
use crate::engine::Engine;
use crate::engine::held::HeldAnswers;
use crate::grpc::status::GrpcError;
use crate::labels::GrpcMethod;
use crate::metrics::Metrics;

/// Reset streams a client may leave unanswered before its connection is
/// closed (a rapid-reset flood).
const MAX_PENDING_RESETS: usize = 32;

/// What the listener and every call are bounded by.
#[derive(Debug, Clone)]
struct Limits {
    max_message_bytes: usize,
    max_header_bytes: u32,
    max_concurrent_streams: u32,
    max_connections: usize,
    handshake_timeout: Duration,
    max_handshaking: usize,
    keepalive_interval: Option<Duration>,
    keepalive_timeout: Duration,
    body_timeout: Duration,
    default_timeout: Duration,
    shutdown_timeout: Duration,
    /// `server.send_timeout_ms`.
    send_timeout: Duration,
}

impl Limits {
    fn from_config(config: &Config) -> Limits {
        let g = &config.grpc;
        Limits {
            max_message_bytes: config.server.max_body_bytes,
            max_header_bytes: u32::try_from(config.server.max_header_bytes).unwrap_or(u32::MAX),
            max_concurrent_streams: g.max_concurrent_streams,
            max_connections: g.max_connections,
            handshake_timeout: Duration::from_millis(g.handshake_timeout_ms),
            max_handshaking: g.max_handshaking_connections,
            keepalive_interval: (g.keepalive_interval_secs > 0).then(|| Duration::from_secs(g.keepalive_interval_secs)),
            keepalive_timeout: Duration::from_secs(g.keepalive_timeout_secs),
            body_timeout: config.body_timeout(),
            default_timeout: config.default_timeout(),
            shutdown_timeout: Duration::from_secs(config.server.shutdown_timeout_secs),
            send_timeout: config.send_timeout(),
        }
    }
}

/// A running gRPC server; [`GrpcServer::stop`] drains it.
pub struct GrpcServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    stopped: Option<oneshot::Receiver<()>>,
}

impl GrpcServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets calls in flight finish (within
    /// `server.shutdown_timeout_secs`), and resolves once the runtime is done.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(stopped) = self.stopped.take() {
            let _ = stopped.await;
        }
    }
}

/// Starts serving `engine` on `listener`, and on `unix` (`grpc.unix_socket`)
/// when given, in threads of its own.
pub fn start(
    listener: TcpListener,
    unix: Option<UnixListener>,
    engine: Engine,
    config: &Config,
) -> std::io::Result<GrpcServer> {
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    if let Some(unix) = &unix {
        unix.set_nonblocking(true)?;
    }
    let limits = Limits::from_config(config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.grpc.threads)
        .thread_name("tokitai-grpc")
        .enable_all()
        .build()?;
    let (stop_tx, stop_rx) = oneshot::channel();
    let (stopped_tx, stopped_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("tokitai-grpc-accept".into())
        .spawn(move || {
            let served = Served::new(engine, limits.default_timeout);
            if let Err(e) = runtime.block_on(serve(listener, unix, served, limits, stop_rx)) {
                tracing::error!(error = %e, "the gRPC server stopped");
            }
            // Calls still running past the drain are cut off here.
            runtime.shutdown_timeout(Duration::from_millis(100));
            let _ = stopped_tx.send(());
        })?;
    Ok(GrpcServer {
        addr,
        stop: Some(stop_tx),
        stopped: Some(stopped_rx),
    })
}

/// The connection classes: every accepted socket holds a `socket` slot
/// (`max_connections` + `max_handshaking`, so past it new connections wait
/// in the backlog); one still in its handshake is in `handshakes` (at most
/// `max_handshaking`, the oldest closed for a new one, each for at most
/// `handshake_timeout`); one that spoke waits for a `live` slot
/// (`max_connections`) and is then served. Silent sockets can therefore
/// never hold a slot that live traffic needs.
#[derive(Clone)]
struct Slots {
    socket: Arc<Semaphore>,
    live: Arc<Semaphore>,
    handshakes: Arc<Handshakes>,
}

impl Slots {
    fn new(limits: &Limits) -> Slots {
        Slots {
            socket: Arc::new(Semaphore::new(limits.max_connections + limits.max_handshaking)),
            live: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Handshakes::new(limits.max_handshaking),
        }
    }

    /// Stopping: handshakes in progress and connections waiting for a live
    /// slot end at once.
    fn close(&self) {
        self.handshakes.close_all();
        self.live.close();
    }
}

/// A connection of either listener.
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// The next connection on the TCP listener or the Unix socket's (both take
/// the same slots).
async fn accept(tcp: &tokio::net::TcpListener, unix: Option<&tokio::net::UnixListener>) -> std::io::Result<Accepted> {
    let unix = async {
        match unix {
            Some(unix) => unix.accept().await.map(|(s, _)| Accepted::Unix(s)),
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        a = tcp.accept() => a.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            Accepted::Tcp(s)
        }),
        a = unix => a,
    }
}

/// The accept loop, then the drain.
async fn serve(
    listener: TcpListener,
    unix: Option<UnixListener>,
    served: Served,
    limits: Limits,
    mut stop: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let unix = unix.map(tokio::net::UnixListener::from_std).transpose()?;
    let metrics = Arc::clone(served.metrics());
    let held = Arc::clone(served.held());
    let keys = served.clone();
    let service = GrpcInferenceServiceServer::new(InferenceService::new(served))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
    let observed = Observed {
        inner: service,
        keys,
        metrics,
        limits: limits.clone(),
        held: Arc::clone(&held),
    };
    let executor = StreamExecutor {
        send_timeout: limits.send_timeout,
        held,
    };
    let mut http2 = hyper::server::conn::http2::Builder::new(executor);
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_PENDING_RESETS)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    let graceful = GracefulShutdown::new();
    let slots = Slots::new(&limits);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots.socket).acquire_owned() => p.expect("the socket semaphore is never closed"),
            _ = &mut stop => break,
        };
        let accepted = tokio::select! {
            a = accept(&listener, unix.as_ref()) => a,
            _ = &mut stop => break,
        };
        let socket = match accepted {
            Ok(socket) => socket,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "gRPC accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let connection = Connection {
            slots: slots.clone(),
            http2: http2.clone(),
            service: observed.clone(),
            watcher: graceful.watcher(),
            handshake_timeout: limits.handshake_timeout,
        };
        match socket {
            Accepted::Tcp(tcp) => tokio::spawn(connection.run(tcp, permit)),
            Accepted::Unix(unix) => tokio::spawn(connection.run(unix, permit)),
        };
    }
    drop((listener, unix));
    slots.close();
    tracing::info!("gRPC: draining");
    if tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("gRPC: calls still running after server.shutdown_timeout_secs were cut off");
    }
    Ok(())
}

/// One accepted connection: its handshake, its wait for a live slot, then
/// HTTP/2 served by hyper.
struct Connection<S> {
    slots: Slots,
    http2: hyper::server::conn::http2::Builder<StreamExecutor>,
    service: S,
    watcher: Watcher,
    handshake_timeout: Duration,
}

impl<S> Connection<S>
where
    S: hyper::service::HttpService<Incoming> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as Body>::Data: Send,
    <S::ResBody as Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Holds `socket` (a slot of the socket class) until the connection
    /// (`io`: TCP or the Unix socket's) ends.
    async fn run<T>(self, mut io: T, socket: OwnedSemaphorePermit)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut ticket = self.slots.handshakes.begin();
        let preface = tokio::select! {
            read = tokio::time::timeout(self.handshake_timeout, read_preface(&mut io)) => read,
            () = ticket.evicted() => return,
        };
        let preface = match preface {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "gRPC: connection closed in its handshake");
                return;
            }
            Err(_elapsed) => {
                tracing::debug!(
                    timeout_ms = self.handshake_timeout.as_millis() as u64,
                    "gRPC: connection closed: no HTTP/2 preface and SETTINGS within grpc.handshake_timeout_ms"
                );
                return;
            }
        };
        if !ticket.finish() {
            return;
        }
        // It spoke: from here it is live traffic, which waits for a slot of
        // its own class (closed only when the server stops).
        let Ok(live) = Arc::clone(&self.slots.live).acquire_owned().await else {
            return;
        };
        let io = TokioIo::new(Replay::new(preface, io));
        let connection = self.http2.serve_connection(io, self.service);
        let _ = self.watcher.watch(connection).await;
        drop((live, socket));
    }
}

// ---- per-call observation ---------------------------------------------------

/// The tonic service, with every call counted by method and status code
/// and every unary call bounded in time.
#[derive(Clone)]
struct Observed<S> {
    inner: S,
    /// The engine's API keys, checked before a call's message is read.
    keys: Served,
    metrics: Arc<Metrics>,
    limits: Limits,
    held: Arc<HeldAnswers>,
}

impl<S> Observed<S> {
    /// The call's deadline: `grpc-timeout`, or the default.
    fn timeout(&self, headers: &http::HeaderMap) -> Duration {
        headers
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map_or(self.limits.default_timeout, |t| t.min(MAX_TIMEOUT))
    }

    /// A call without an API key with `method`'s scope, refused on its head
    /// before its message is read (`service.rs`'s check).
    fn refuse_unauthorized(
        &self,
        method: GrpcMethod,
        headers: &http::HeaderMap,
    ) -> Option<http::Response<tonic::body::Body>> {
        check_call(&self.keys, method, headers).err().map(Status::into_http)
    }

    /// UNAVAILABLE for an inference call while the answers waiting for
    /// their clients hold all of `server.max_pending_answer_bytes`.
    fn refuse_when_full(&self, method: GrpcMethod) -> Option<http::Response<tonic::body::Body>> {
        let inference = matches!(method, GrpcMethod::ModelInfer | GrpcMethod::ModelStreamInfer);
        let refusal = self.held.admit().err().filter(|_| inference)?;
        Some(
            GrpcError::Engine(refusal)
                .into_status(method, &self.metrics)
                .into_http(),
        )
    }

    /// Longest a unary call may take: its deadline, plus the time its
    /// message has to arrive. Past it the call is ended (the engine answers
    /// DEADLINE_EXCEEDED at the deadline itself; this catches a message that
    /// never arrives). Streams are bounded by their own requests instead.
    fn backstop(&self, method: GrpcMethod, headers: &http::HeaderMap) -> Option<Duration> {
        if method == GrpcMethod::ModelStreamInfer {
            return None;
        }
        Some(self.timeout(headers) + self.limits.body_timeout)
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl<S> hyper::service::Service<http::Request<Incoming>> for Observed<S>
where
    S: tonic::codegen::Service<
            http::Request<Incoming>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<ObservedBody>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        let start = Instant::now();
        let method = GrpcMethod::from_path(req.uri().path());
        let backstop = self.backstop(method, req.headers());
        let deadline = start + self.timeout(req.headers());
        let metrics = Arc::clone(&self.metrics);
        // The generated service is always ready (`poll_ready` is a no-op).
        let refusal = self
            .refuse_unauthorized(method, req.headers())
            .or_else(|| self.refuse_when_full(method));
        let call = match refusal {
            Some(refusal) => Err(refusal),
            None => Ok(self.inner.clone().call(req)),
        };
        Box::pin(async move {
            // Polled on the stream's own task, where its send state lives.
            let held = HeldData::new(current_stream(deadline));
            let response = match (call, backstop) {
                (Err(refusal), _) => refusal,
                (Ok(call), None) => call.await?,
                (Ok(call), Some(limit)) => match tokio::time::timeout(limit, call).await {
                    Ok(response) => response?,
                    Err(_) => Status::deadline_exceeded(format!(
                        "the request message did not arrive within {} ms",
                        limit.as_millis()
                    ))
                    .into_http(),
                },
            };
            let watch = CallWatch { metrics, method, start };
            // An error answered at once carries its status in the headers
            // ("trailers-only"); otherwise it comes in the trailers.
            Ok(match grpc_status(response.headers()) {
                Some(code) => {
                    watch.count(code);
                    response.map(|inner| ObservedBody {
                        inner,
                        watch: None,
                        held,
                    })
                }
                None => response.map(|inner| ObservedBody {
                    inner,
                    watch: Some(watch),
                    held,
                }),
            })
        })
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from_i32(value))
}

/// One call, counted once when its status is known.
struct CallWatch {
    metrics: Arc<Metrics>,
    method: GrpcMethod,
    start: Instant,
}

impl CallWatch {
    fn count(self, code: Code) {
        self.metrics
            .observe_grpc_request(self.method, code_name(code), self.start.elapsed());
    }
}

/// A response body that counts its call when the trailers go out, or as
/// CANCELLED when the client leaves first, and hands its data over in
/// pieces counted as held until hyper takes them (`held.rs`).
pub struct ObservedBody {
    inner: tonic::body::Body,
    watch: Option<CallWatch>,
    held: HeldData,
}

impl Body for ObservedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Some(piece) = self.held.next_piece() {
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(Frame::data(self.held.start(data))))),
                Err(frame) => {
                    self.held.done();
                    if let Some(code) = frame.trailers_ref().and_then(grpc_status)
                        && let Some(watch) = self.watch.take()
                    {
                        watch.count(code);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
            },
            Poll::Ready(Some(Err(status))) => {
                self.held.done();
                if let Some(watch) = self.watch.take() {
                    watch.count(status.code());
                }
                Poll::Ready(Some(Err(status)))
            }
            Poll::Ready(None) => {
                self.held.done();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.held.has_rest() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.held.has_rest() {
            return http_body::SizeHint::default();
        }
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if let Some(watch) = self.watch.take() {
            watch.count(Code::Cancelled);
        }
    }
}
