//! tokitai-serve: an actor-based concurrent serving engine for the
//! tokitai-operator Mixture-of-Experts quality-decision models.
//!
//! The layers, top-down (a module imports only modules below it;
//! `scripts/check-module-cycles.py` checks there is no circle):
//!
//! ```text
//!  cli, embed            start the server, or run one request offline
//!  http/, grpc/          protocols: parse, cap memory, render
//!  oip                   the Open Inference Protocol rules both share
//!  engine/               the facade the protocols call: infer, health,
//!                        render_metrics, held answers, drain signal
//!  repository/           which versions serve: layout, load / unload,
//!                        the registry's one switch per model
//!  served/               one served version: description, build,
//!                        ServedVersion, its supervised Pool, VersionState
//!  batcher/, worker/,    one version's queue and batching policy, its
//!  mailbox               workers, the actor mechanism they run on
//!  backend/              kernels (cpu, hip) behind Session::forward
//!  model/                arch.json, checkpoints, weights
//! ```
//! Leaves anyone may import: config, error, labels, metrics, input, stats,
//! readiness, os (they import only each other, `backend`'s and `model`'s
//! error types and vocabularies, never a layer above).
//!
//! The request path, and the reply path back:
//!
//! ```text
//!  client ──HTTP──▶ http/ (actix-web handlers on the HTTP threads: check the
//!    ▲                │   request, parse it into a validated InferInput,
//!    │                │   no compute; sidecar_json.rs and http/v2/ are the
//!    │                │   wire formats)
//!    │                │  Engine::resolve(target)   (engine/ -> repository/:
//!    │                │                             the served version)
//!    │                │  Engine::infer(version, input, options)
//!    │                ▼                            (engine/: the one submit path)
//!    │             batcher/ (one actor per served version: bounded queue,
//!    │                │      batching policy, deadlines; admits or rejects
//!    │                │      at once; no thread of its own: it runs on the
//!    │                │      thread that sends to it, see mailbox/)
//!    │                │  RunBatch(rows of one or more requests)
//!    │                ▼
//!    │             worker/ (one actor per CPU worker / GPU stream, each on
//!    │                │     its own thread, owning a backend Session; the
//!    │                │     version's Pool in served/ starts and replaces them)
//!    │                │  Session::forward (backend/: cpu, hip; shared
//!    │                │                    packed weights)
//!    │                ├──▶ BatchDone ──▶ batcher (on the worker's own thread:
//!    │                │                 the next batch, if any, is taken
//!    │                │                 right there)
//!    │                ▼
//!    └──── each request's own reply channel (Job) ◀── its rows of the output
//! ```
//!
//! `Engine::infer` submits to the version the request resolved to (the
//! repository loads and swaps versions off the request path, calling down
//! into `served/` to build them); a request finishes on the version that
//! accepted it, and a retired version's last `Drop` signals the repository
//! (no polling). gRPC (`grpc/`: Triton's `GRPCInferenceService`, on a tokio
//! runtime of its own) parses into the same `InferInput` and calls the same
//! `Engine::infer`; `oip/` is the Open Inference Protocol core both of its
//! transports render, and `stats.rs` each version's statistics extension
//! counters.
//!
//! Around it: `input.rs` is the one validated input type; `labels.rs` the
//! fixed vocabularies (routes, failure and drop reasons); `readiness.rs` a
//! version's state (loading / ready / draining / retired) and workers;
//! `model/` reads the training runner's `arch.json` and `checkpoint.tkp1`
//! (and says "files, else the demo model" once); `metrics.rs` owns the
//! Prometheus registry (server-wide, per model, and per model version
//! series); `config.rs` the layered settings; `embed.rs` runs
//! the engine on a thread of its own. [`run`] takes a bound listener, a
//! config and a shutdown future ([`serve`] takes the gRPC listener too), so
//! tests serve on port 0.

// The public API, like mini-redis's: serving ([`run`], [`serve`],
// [`Listeners`], [`config`], [`embed`], [`cli`] for the binary, [`error`]
// for their errors), and the parts tests and benches drive directly: the
// model files and kernels ([`model`], [`backend`], [`served`]'s loaders),
// the validated input and the wire parsers ([`input`], [`sidecar_json`],
// [`http`]'s v2 parser and errors), gRPC's generated client ([`grpc`]'s
// `pb`), and the metric vocabulary ([`labels`], [`metrics`]). Everything
// else is the engine's own.
pub mod backend;
pub mod cli;
pub mod config;
pub mod embed;
pub mod error;
pub mod grpc;
pub mod http;
pub mod input;
pub mod labels;
pub mod metrics;
pub mod model;
pub mod served;
pub mod sidecar_json;

pub(crate) mod auth;
pub(crate) mod batcher;
pub(crate) mod engine;
pub(crate) mod mailbox;
pub(crate) mod oip;
pub(crate) mod os;
pub(crate) mod readiness;
pub(crate) mod repository;
pub(crate) mod stats;
pub(crate) mod telemetry;
pub(crate) mod unix_socket;
pub(crate) mod worker;

pub use crate::unix_socket::{SocketFile, UnixSocket, UnixSocketError};

/// The values that make a worker fail on purpose, with the
/// `fault-injection` feature (the tests of worker faults send them).
#[cfg(feature = "fault-injection")]
pub use crate::worker::{FAULT_INJECTION_ANSWER_PANIC_VALUE, FAULT_INJECTION_EXIT_VALUE, FAULT_INJECTION_PANIC_VALUE};

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};

use crate::config::Config;
use crate::engine::Engine;
use crate::error::StartError;
use crate::metrics::Metrics;

/// The bound sockets the server serves on. A Unix socket's file is removed
/// when its [`UnixSocket`] drops: at the end of [`serve`] (after the
/// drain), or as soon as start-up fails.
pub struct Listeners {
    pub http: TcpListener,
    /// `None`: no gRPC (`grpc.enabled = false`).
    pub grpc: Option<TcpListener>,
    /// `server.unix_socket`, bound: the HTTP routes there too.
    pub http_unix: Option<UnixSocket>,
    /// `grpc.unix_socket`, bound (gRPC enabled only).
    pub grpc_unix: Option<UnixSocket>,
}

impl Listeners {
    /// `http`, and what the config adds: `grpc.bind` when gRPC is enabled,
    /// `server.unix_socket` and `grpc.unix_socket` when set (a stale socket
    /// file there is replaced; a live one, or a file that is not a socket,
    /// fails with an error naming the setting). Whatever was bound before
    /// an error is released, socket files removed.
    pub fn bind(http: TcpListener, config: &Config) -> std::io::Result<Listeners> {
        let grpc = if config.grpc.enabled {
            let addr = config.grpc_bind_addr();
            let listener = TcpListener::bind(addr)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen for gRPC on {addr}: {e}")))?;
            Some(listener)
        } else {
            None
        };
        let http_unix = bind_unix(
            "server.unix_socket",
            config.server.unix_socket.as_deref(),
            &config.server.unix_socket_mode,
        )?;
        let grpc_unix = match config.grpc.unix_socket.as_deref() {
            Some(path) if !config.grpc.enabled => {
                tracing::warn!(path = %path.display(), "grpc.unix_socket is set but grpc.enabled = false: not served");
                None
            }
            path => bind_unix("grpc.unix_socket", path, &config.grpc.unix_socket_mode)?,
        };
        Ok(Listeners {
            http,
            grpc,
            http_unix,
            grpc_unix,
        })
    }
}

/// The socket `setting` names, bound with the permission bits of `mode`.
fn bind_unix(setting: &'static str, path: Option<&std::path::Path>, mode: &str) -> std::io::Result<Option<UnixSocket>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let mode = config::unix_socket_mode(mode).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{setting}_mode {mode:?} is not octal permission bits"),
        )
    })?;
    Ok(Some(UnixSocket::bind(setting, path, mode)?))
}

/// Serves HTTP on `listener` (and gRPC on `grpc.bind` when enabled, and
/// the Unix sockets when set) until `shutdown` completes; see [`serve`].
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + 'static,
) -> Result<(), StartError> {
    let listeners = Listeners::bind(listener, &config)?;
    serve(listeners, config, shutdown, futures_util::stream::pending()).await
}

/// Serves until `shutdown` completes, re-reading the models (the
/// repository, or the `--arch / --checkpoint` files) each time `reloads`
/// yields (the binary feeds it SIGHUP); then drains both protocols:
/// readiness turns 503 (gRPC's `ServerReady` false), no new connections are
/// accepted, and requests already accepted finish within
/// `server.shutdown_timeout_secs`; the Unix socket files are removed last.
/// Prints `listening on grpc://ADDR` (when gRPC is on), `listening on
/// grpc+unix:PATH` and `listening on http+unix:PATH` (when set), then
/// `listening on http://ADDR`. Must run inside an actix
/// `System` (see `main.rs`, or [`embed::ServerThread`]): the HTTP server is
/// actix-web's. The engine itself needs no actix arbiter.
pub async fn serve(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()> + 'static,
    reloads: impl Stream<Item = ()> + Unpin + 'static,
) -> Result<(), StartError> {
    let Listeners {
        http: listener,
        grpc: grpc_listener,
        http_unix,
        grpc_unix,
    } = listeners;
    let addr = listener.local_addr()?;
    // The files stay until this returns (any early return too): removed
    // after the drain below, or as soon as start-up fails.
    let (http_unix, http_unix_file) = split_unix(http_unix);
    let (grpc_unix, grpc_unix_file) = split_unix(grpc_unix);
    let mut metrics = Metrics::new();
    metrics.set_recording(config.metrics.record);
    let metrics = Arc::new(metrics);
    let telemetry = telemetry::Telemetry::start(&config.tracing, &metrics)?;
    tracing::info!(
        control_mode = config.model.control_mode.as_str(),
        repository = ?config.model.repository,
        "loading models"
    );
    let engine = Engine::start(&config, Arc::clone(&metrics)).await?;
    raise_open_files_limit(&config);
    let grpc = match grpc_listener {
        Some(l) => Some(start_grpc(l, grpc_unix, grpc_unix_file.as_ref(), &engine, &config)?),
        None => None,
    };
    let server = http::server(listener, http_unix, engine.clone(), &config)?;
    if let Some(file) = &http_unix_file {
        println!("listening on http+unix:{}", file.path().display());
        tracing::info!(path = %file.path().display(), "listening on the Unix socket");
    }
    println!("listening on http://{addr}");
    tracing::info!(%addr, "listening");

    spawn_reloader(engine.clone(), reloads);
    let handle = server.handle();
    let drain_limit = Duration::from_secs(config.server.shutdown_timeout_secs);
    let (grpc_done, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    actix_rt::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested: draining");
        engine.start_draining();
        let grpc_stop = async {
            if let Some(grpc) = grpc {
                grpc.stop().await;
            }
        };
        let http_stop = drain_http(handle, engine.drain().clone(), drain_limit);
        futures_util::future::join(http_stop, grpc_stop).await;
        let _ = grpc_done.send(());
    });
    server.await?;
    // The HTTP side stopped only through the task above: wait for gRPC's drain too.
    let _ = grpc_stopped.await;
    telemetry.shutdown();
    drop((http_unix_file, grpc_unix_file));
    tracing::info!("stopped");
    Ok(())
}

/// Starts gRPC on `listener` (and `unix`, whose file is `unix_file`) and
/// prints where it listens.
fn start_grpc(
    listener: TcpListener,
    unix: Option<std::os::unix::net::UnixListener>,
    unix_file: Option<&SocketFile>,
    engine: &Engine,
    config: &Config,
) -> Result<grpc::server::GrpcServer, StartError> {
    let server = grpc::start(listener, unix, engine.clone(), config)?;
    println!("listening on grpc://{}", server.addr());
    tracing::info!(addr = %server.addr(), "gRPC listening");
    if let Some(file) = unix_file {
        println!("listening on grpc+unix:{}", file.path().display());
        tracing::info!(path = %file.path().display(), "gRPC listening on the Unix socket");
    }
    Ok(server)
}

/// Re-reads the API keys and the models each time `reloads` yields (SIGHUP).
fn spawn_reloader(engine: Engine, mut reloads: impl Stream<Item = ()> + Unpin + 'static) {
    actix_rt::spawn(async move {
        while reloads.next().await.is_some() {
            tracing::info!("SIGHUP: re-reading the API keys and the models");
            engine.reload().await;
        }
    });
}

/// The listener to serve, and the file to remove once served.
fn split_unix(socket: Option<UnixSocket>) -> (Option<std::os::unix::net::UnixListener>, Option<SocketFile>) {
    match socket {
        Some(UnixSocket { listener, file }) => (Some(listener), Some(file)),
        None => (None, None),
    }
}

/// Stops the HTTP server once its connections have drained (idle ones close
/// at once; those with a request finish it), at most `limit` later. The
/// server stops accepting first and is stopped only after the drain:
/// actix-server's accept thread, once stopped, drops the channels its
/// workers receive connections on, and a worker that sees that before its
/// own stop message ends at once, dropping the requests it still serves
/// (actix-server 2.6; a SIGTERM test lost a request in flight that way on a
/// loaded machine).
async fn drain_http(handle: actix_server::ServerHandle, drain: engine::held::DrainSignal, limit: Duration) {
    handle.pause().await;
    let drained = tokio::time::timeout(limit, drain.connections_closed()).await.is_ok();
    if !drained {
        tracing::warn!(
            limit_secs = limit.as_secs(),
            "connections still open after server.shutdown_timeout_secs: closing them"
        );
    }
    // Graceful when nothing is left to wait for; past the limit, at once.
    handle.stop(drained).await;
}

/// Raises the open-files limit and warns when it is near `server.max_connections`.
fn raise_open_files_limit(config: &Config) {
    match os::raise_open_files_limit() {
        Ok((soft, hard)) => {
            tracing::info!(soft, hard, "open-files limit (soft raised to hard)");
            let wanted = config.server.max_connections as u64 + 64;
            if soft < wanted {
                tracing::warn!(
                    open_files = soft,
                    max_connections = config.server.max_connections,
                    "server.max_connections is near or above the open-files limit: past it, new \
                     connections (health probes too) fail instead of waiting; lower the setting \
                     or raise the hard limit"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }
}
