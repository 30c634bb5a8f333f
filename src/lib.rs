//! tokitai-serve: an actor-based concurrent serving engine for the
//! tokitai-operator Mixture-of-Experts quality-decision models.
//!
//! The request path, and the reply path back:
//!
//! ```text
//!  client ──HTTP──▶ http/ (actix-web handlers on the HTTP threads: check the
//!    ▲                │   request, parse it into a validated InferInput,
//!    │                │   no compute; sidecar_json.rs and http/v2/ are the
//!    │                │   wire formats)
//!    │                │  Engine::infer(input, options)   (engine/: the one
//!    │                ▼                                   submit path)
//!    │             batcher/ (one actor: bounded queue, batching policy,
//!    │                │      deadlines; admits or rejects at once)
//!    │                │  RunBatch(rows of one or more requests)
//!    │                ▼
//!    │             worker/ (one actor per CPU worker / GPU stream, each on
//!    │                │     its own thread, owning a backend Session)
//!    │                │  Session::forward (backend/: cpu, hip; shared
//!    │                │                    packed weights)
//!    │                ├──▶ BatchDone ──▶ batcher (the worker is free again)
//!    │                ▼
//!    └──── each request's own reply channel (Job) ◀── its rows of the output
//! ```
//!
//! `Engine::infer` first resolves which model version serves the request
//! (`repository/`: the repository on disk, the served version of each model,
//! loads and swaps off the request path), then submits to that version's own
//! batcher and workers; a request finishes on the version that accepted it.
//!
//! Around it: `input.rs` is the one validated input type; `labels.rs` the
//! fixed vocabularies (routes, failure and drop reasons); `readiness.rs` the
//! starting / ready / draining state everyone reads; `model/` reads the
//! training runner's `arch.json` and `checkpoint.tkp1`; `engine/startup.rs`
//! assembles one version's model, backend, batcher and workers; `metrics.rs` owns the
//! Prometheus registry; `config.rs` the layered settings; `embed.rs` runs
//! the engine on a thread of its own. [`run`] takes a bound listener, a
//! config and a shutdown future, so tests serve on port 0.

pub mod backend;
pub mod batcher;
pub mod cli;
pub mod config;
pub mod embed;
pub mod engine;
pub mod error;
pub mod http;
pub mod input;
pub mod labels;
pub mod mailbox;
pub mod metrics;
pub mod model;
pub mod os;
pub mod readiness;
pub mod repository;
pub mod sidecar_json;
pub mod worker;

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};

use crate::config::Config;
use crate::engine::Engine;
use crate::error::StartError;
use crate::metrics::Metrics;

/// Serves on `listener` until `shutdown` completes, then drains: readiness
/// turns 503, no new connections are accepted, and requests already accepted
/// finish within `server.shutdown_timeout_secs`. Must run inside an actix
/// `System` (see `main.rs`, or [`embed::ServerThread`]).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + 'static,
) -> Result<(), StartError> {
    run_with_reloads(listener, config, shutdown, futures_util::stream::pending()).await
}

/// [`run`], re-reading the models (the repository, or the `--arch /
/// --checkpoint` files) each time `reloads` yields: the binary feeds it
/// SIGHUP.
pub async fn run_with_reloads(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + 'static,
    reloads: impl Stream<Item = ()> + Unpin + 'static,
) -> Result<(), StartError> {
    let addr = listener.local_addr()?;
    let mut metrics = Metrics::new();
    metrics.set_recording(config.metrics.record);
    let metrics = Arc::new(metrics);
    tracing::info!(
        control_mode = config.model.control_mode.as_str(),
        repository = ?config.model.repository,
        "loading models"
    );
    let engine = Engine::start(&config, Arc::clone(&metrics)).await?;
    raise_open_files_limit(&config);
    let server = http::server(listener, engine.clone(), &config)?;
    println!("listening on http://{addr}");
    tracing::info!(%addr, "listening");

    let reloader = engine.clone();
    actix_rt::spawn(async move {
        let mut reloads = reloads;
        while reloads.next().await.is_some() {
            tracing::info!("SIGHUP: re-reading the models");
            reloader.reload().await;
        }
    });
    let handle = server.handle();
    actix_rt::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested: draining");
        engine.start_draining();
        handle.stop(true).await;
    });
    server.await?;
    tracing::info!("stopped");
    Ok(())
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
