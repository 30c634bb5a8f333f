//! The engine: the one entry point every protocol calls, and what is served.
//!
//! Owns: [`Engine`] (the running engine as the protocol layers see it) and
//! [`Engine::infer`], the single submit path: readiness, the in-flight
//! count, handing the job to the batcher and waiting for its answer;
//! [`ModelDescription`]; start-up in [`startup`]. Must not touch: wire
//! formats (the protocol layers parse and validate into an
//! [`InferInput`], then call `infer`), batching rules (batcher) or kernels
//! (backends).

pub mod startup;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use serde::Serialize;

pub use self::startup::{build_backend, load_model, pool_shape, start, timed};
use crate::backend::Backend;
pub use crate::batcher::job::InferOutput;
use crate::batcher::job::Job;
use crate::batcher::{Batcher, Submit};
use crate::error::ServeError;
use crate::input::{InferInput, InputLimits};
use crate::labels::{Endpoint, FailureReason};
use crate::metrics::Metrics;
use crate::model::{Dims, LayerNormMode, WeightPrecision};
use crate::readiness::Readiness;
use crate::stats::InferStats;

/// What is being served, as `/healthz`, the start-up log and the
/// `tokitai_model_info` metric describe it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDescription {
    /// Name on the `/v2` routes (`model.name`).
    pub name: String,
    pub size: &'static str,
    pub layernorm: LayerNormMode,
    /// How the expert weights are held (`model.weight_precision`).
    pub weight_precision: WeightPrecision,
    pub param_count: u64,
    /// `arch.json` path, or `"builtin:demo"` for the demo model.
    pub arch: String,
    /// `checkpoint.tkp1` path, or `"builtin:demo"` for the demo model.
    pub checkpoint: String,
    pub checkpoint_step: u32,
    pub fingerprint: Option<String>,
    pub demo: bool,
    pub backend: &'static str,
    pub devices: String,
    #[serde(skip)]
    pub dims: Dims,
}

/// How one inference request is to be served.
#[derive(Debug, Clone, Copy)]
pub struct InferOptions {
    /// Rows not computed within this are dropped and the request fails.
    pub timeout: Duration,
    /// The protocol route it came in on (labels the `cancelled` count).
    pub route: Endpoint,
}

/// The running engine, as the protocol layers see it.
#[derive(Clone)]
pub struct Engine {
    pub batcher: Addr<Batcher>,
    /// For device metrics at scrape time; compute goes through the workers.
    pub backend: Arc<dyn Backend>,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub description: Arc<ModelDescription>,
    /// What a valid input looks like (`batching.max_request_rows`).
    pub limits: InputLimits,
    /// The statistics extension's counters (recorded here, in `infer`).
    pub stats: Arc<InferStats>,
}

impl Engine {
    /// Computes `input`: the one submit path of every protocol. Fails at once
    /// when the engine is not ready; otherwise the batcher admits the job or
    /// rejects it (queue full, draining) through the job's own channel, so
    /// the caller waits on one channel and is woken once.
    pub async fn infer(&self, input: InferInput, options: InferOptions) -> Result<InferOutput, ServeError> {
        let (start, rows) = (Instant::now(), input.n_rows());
        let result = self.submit(input, options).await;
        match &result {
            Ok(out) => self
                .stats
                .record_success(rows, start.elapsed(), out.queue_wait, out.compute),
            Err(_) => self.stats.record_failure(start.elapsed()),
        }
        result
    }

    async fn submit(&self, input: InferInput, options: InferOptions) -> Result<InferOutput, ServeError> {
        self.readiness.check()?;
        let (job, reply) = Job::new(input, options.timeout);
        let inflight = InflightGuard::new(&self.metrics, options.route);
        self.batcher.do_send(Submit(job));
        let outcome = reply
            .await
            .map_err(|_| ServeError::Internal("the request was dropped before it was answered".into()))
            .and_then(|answer| answer);
        inflight.finish();
        let output = outcome?;
        self.metrics.observe_queue_wait(output.queue_wait);
        Ok(output)
    }
}

/// Tracks an accepted inference request: the in-flight gauge, and a
/// `cancelled` failure when the client leaves before its answer (the
/// protocol layer then drops the `infer` future, and this guard with it,
/// before `finish`). Answers and errors are counted by the protocol layer.
struct InflightGuard {
    metrics: Arc<Metrics>,
    route: Endpoint,
    finished: bool,
}

impl InflightGuard {
    fn new(metrics: &Arc<Metrics>, route: Endpoint) -> InflightGuard {
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
            self.metrics.observe_failure(self.route, FailureReason::Cancelled);
        }
    }
}
