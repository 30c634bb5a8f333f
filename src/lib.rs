//! tokitai-serve: an actor-based concurrent serving engine for the
//! tokitai-operator Mixture-of-Experts quality-decision models.
//!
//! The request path:
//!
//! ```text
//!  client ──HTTP──▶ http/ (actix-web actors: parse, validate, no compute)
//!                     │  Submit(Job { rows, deadline, reply channel })
//!                     ▼
//!                  batcher/ (one actor: bounded queue, batching policy,
//!                     │      deadlines; admits or rejects at once)
//!                     │  RunBatch(rows of one or more requests)
//!                     ▼
//!                  worker/ (one actor per CPU worker / GPU stream, each on its
//!                     │     own thread, owning a backend Session)
//!                     │  Session::forward (backend/: cpu, shared packed weights)
//!                     ▼
//!                  each request's reply channel ──▶ its HTTP actor ──▶ client
//! ```
//!
//! Around it: `model/` reads the training runner's `arch.json` and
//! `checkpoint.tkp1`; `engine.rs` assembles model, backend, batcher and
//! workers; `metrics.rs` owns the Prometheus registry; `config.rs` the
//! layered settings. [`run`] takes a bound listener, a config and a shutdown
//! future, so tests serve on port 0.

pub mod api;
pub mod backend;
pub mod batcher;
pub mod cli;
pub mod config;
pub mod embed;
pub mod engine;
pub mod error;
pub mod http;
pub mod metrics;
pub mod model;
pub mod worker;

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;

use crate::config::Config;
use crate::error::StartError;
use crate::metrics::Metrics;

/// Serves on `listener` until `shutdown` completes, then drains: readiness
/// turns 503, no new connections are accepted, and requests already accepted
/// finish within `server.shutdown_timeout_secs`. Must run inside an actix
/// `System` (see `main.rs`, or the tests' helpers).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + 'static,
) -> Result<(), StartError> {
    let addr = listener.local_addr()?;
    let mut metrics = Metrics::new();
    metrics.set_recording(config.metrics.record);
    let metrics = Arc::new(metrics);
    // Load and prepare (pack weights / upload to devices): both count as load time.
    let (prepared, load_time) = engine::timed(|| -> Result<_, StartError> {
        let model = engine::load_model(&config)?;
        Ok(engine::build_backend(model, &config)?)
    });
    let (backend, description) = prepared?;
    metrics.model_load_seconds.set(load_time.as_secs_f64());
    tracing::info!(
        size = description.size,
        layernorm = %description.layernorm,
        param_count = description.param_count,
        arch = %description.arch,
        checkpoint = %description.checkpoint,
        backend = description.backend,
        devices = %description.devices,
        load_ms = load_time.as_millis() as u64,
        "model loaded"
    );
    if description.demo {
        tracing::warn!("no --arch/--checkpoint given: serving the built-in demo model (Nano, deterministic weights)");
    }
    tracing::info!(
        "LayerNorm mode: {} ({})",
        description.layernorm,
        match description.layernorm {
            model::LayerNormMode::Identity =>
                "gamma=1, beta=0: what the old sidecar served and the model was trained with",
            model::LayerNormMode::Stored => "the checkpoint's stored gamma/beta: upstream's fp32 reference",
        }
    );
    let engine = engine::start(backend, description, &config, Arc::clone(&metrics))?;
    let state = Arc::clone(&engine.state);
    let server = http::server(listener, engine, &config)?;
    println!("listening on http://{addr}");
    tracing::info!(%addr, "listening");

    let handle = server.handle();
    actix_rt::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested: draining");
        state.start_draining();
        handle.stop(true).await;
    });
    server.await?;
    tracing::info!("stopped");
    Ok(())
}
