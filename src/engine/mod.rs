//! The engine: the one entry point every protocol calls, and what is served.
//!
//! Owns: [`Engine`] (the running engine as the protocol layers see it) and
//! [`Engine::infer`], the single submit path: resolve the target model
//! version ([`ModelTarget`]), readiness, the in-flight count, handing the
//! job to that version's batcher and waiting for its answer, which says who
//! computed it ([`InferAnswer`]); the repository operations other protocols
//! call ([`Engine::repository_index`], [`Engine::load_model`],
//! [`Engine::unload_model`], [`Engine::reload`]); [`ModelDescription`]; one
//! version's bring-up in [`startup`] and its life in [`version`]. Must not
//! touch: wire formats (the protocol layers parse and validate into an
//! [`InferInput`], then call `infer`), batching rules (batcher), kernels
//! (backends), which version serves (the repository).

pub mod held;
pub mod startup;
pub mod version;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use self::held::{DrainSignal, HeldAnswers};
pub use self::startup::{build_backend, load_model, pool_shape, prepare, start_pool, timed};
use self::version::ServedVersion;
pub use crate::batcher::job::InferOutput;
use crate::batcher::job::Job;
use crate::config::Config;
use crate::error::{RequestError, ServeError, StartError};
use crate::input::{InferInput, InputLimits};
use crate::labels::{Endpoint, FailureReason};
use crate::metrics::Metrics;
use crate::model::{Dims, LayerNormMode, WeightPrecision};
pub use crate::repository::controller::Outcome as LoadOutcome;
use crate::repository::{Controller, IndexEntry, Registry, RepositoryError};

/// What one served model version is, as `/healthz`, `/v2` metadata, the
/// log and the `tokitai_model_info` metric describe it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDescription {
    /// Its name: the repository folder, or `model.name`.
    pub name: String,
    /// Its version: the repository folder's number, or the checkpoint's step.
    pub version: u64,
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
    /// The instruction set the kernels run on (`Backend::isa`).
    pub isa: &'static str,
    #[serde(skip)]
    pub dims: Dims,
}

/// Which model (and version) a request is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelTarget<'a> {
    /// `None`: the default model (`model.name`, or the only model).
    pub name: Option<&'a str>,
    /// `None`: whichever version serves.
    pub version: Option<u64>,
}

impl<'a> ModelTarget<'a> {
    /// The default model, its served version.
    pub const DEFAULT: ModelTarget<'static> = ModelTarget {
        name: None,
        version: None,
    };

    /// Model `name`, whichever version serves (or exactly `version`).
    pub fn named(name: &'a str, version: Option<u64>) -> ModelTarget<'a> {
        ModelTarget {
            name: Some(name),
            version,
        }
    }
}

/// How one inference request is to be served.
#[derive(Debug, Clone, Copy)]
pub struct InferOptions {
    /// Rows not computed within this are dropped and the request fails.
    pub timeout: Duration,
    /// The protocol route it came in on (labels the `cancelled` count).
    pub route: Endpoint,
}

/// An answer, and the model version that computed it.
#[derive(Debug)]
pub struct InferAnswer {
    pub output: InferOutput,
    /// Name, version and shapes of the version that computed `output`.
    pub model: Arc<ModelDescription>,
}

/// The running engine, as the protocol layers see it. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub metrics: Arc<Metrics>,
    /// The served version of each model.
    pub registry: Arc<Registry>,
    /// Loads, swaps and unloads versions.
    pub controller: Arc<Controller>,
    /// Answer bytes computed but not yet taken by their clients, against
    /// `server.max_pending_answer_bytes` (every protocol's).
    pub held: Arc<HeldAnswers>,
    /// Raised by [`Engine::start_draining`]; open connections watch it.
    pub drain: DrainSignal,
}

impl Engine {
    /// Loads the configured models and starts their pools (and, in `poll`
    /// mode, the repository poller). Must run inside an actix `System`.
    pub async fn start(config: &Config, metrics: Arc<Metrics>) -> Result<Engine, StartError> {
        let registry = Arc::new(Registry::new(&config.model.name));
        let controller = Arc::new(Controller::new(config, Arc::clone(&registry), Arc::clone(&metrics)));
        controller.start_up().await?;
        if config.model.control_mode == crate::config::ControlMode::Poll {
            crate::repository::controller::spawn_poller(
                Arc::clone(&controller),
                Arc::clone(&registry),
                config.repository_poll(),
            );
        }
        Ok(Engine {
            metrics,
            registry,
            controller,
            held: HeldAnswers::new(config.server.max_pending_answer_bytes),
            drain: DrainSignal::default(),
        })
    }

    /// The version that would serve `target` now.
    pub fn resolve(&self, target: &ModelTarget) -> Result<Arc<ServedVersion>, ServeError> {
        self.registry.resolve(target)
    }

    /// What serves `target` (its metadata).
    pub fn describe(&self, target: &ModelTarget) -> Result<Arc<ModelDescription>, ServeError> {
        Ok(Arc::clone(&self.resolve(target)?.description))
    }

    /// Computes `input` on `version` (what [`Engine::resolve`] gave for the
    /// request's target; the protocol parsed the input against its
    /// `limits`): the one submit path of every protocol. The version's
    /// batcher admits the job or rejects it (queue full, draining) through
    /// the job's own channel, so the caller waits on one channel and is
    /// woken once. The version is held until the answer arrives: a swap
    /// meanwhile does not touch this request.
    pub async fn infer(
        &self,
        version: Arc<ServedVersion>,
        input: InferInput,
        options: InferOptions,
    ) -> Result<InferAnswer, ServeError> {
        let (start, rows) = (Instant::now(), input.n_rows());
        let result = self.submit(&version, input, options).await;
        match &result {
            Ok(out) => version
                .stats
                .record_success(rows, start.elapsed(), out.queue_wait, out.compute),
            Err(_) => version.stats.record_failure(start.elapsed()),
        }
        let output = result?;
        version.count_answer();
        Ok(InferAnswer {
            output,
            model: Arc::clone(&version.description),
        })
    }

    async fn submit(
        &self,
        version: &ServedVersion,
        input: InferInput,
        options: InferOptions,
    ) -> Result<InferOutput, ServeError> {
        check_fits(&input, &version.limits)?;
        let (job, reply) = Job::new(input, options.timeout);
        let inflight = InflightGuard::new(&self.metrics, options.route);
        version.batcher.submit(job);
        let outcome = reply
            .await
            .map_err(|_| ServeError::Internal("the request was dropped before it was answered".into()))
            .and_then(|answer| answer);
        inflight.finish();
        let output = outcome?;
        self.metrics.observe_queue_wait(output.queue_wait);
        Ok(output)
    }

    /// Triton's repository index (with `ready_only`, the `READY` rows).
    pub fn repository_index(&self, ready_only: bool) -> Vec<IndexEntry> {
        self.registry.index(ready_only)
    }

    /// Loads (or re-reads) model `name`: `explicit` mode only.
    pub async fn load_model(&self, name: &str) -> Result<LoadOutcome, RepositoryError> {
        self.controller.load(name).await
    }

    /// Unloads model `name` once its accepted requests are answered:
    /// `explicit` mode only.
    pub async fn unload_model(&self, name: &str) -> Result<(), RepositoryError> {
        self.controller.unload(name).await
    }

    /// Re-reads the repository (or the `--arch/--checkpoint` files): SIGHUP.
    pub async fn reload(&self) {
        self.controller.refresh("SIGHUP").await;
    }

    /// Every served version.
    pub fn served(&self) -> Vec<Arc<ServedVersion>> {
        self.registry.served()
    }

    pub fn is_ready(&self) -> bool {
        self.registry.is_ready()
    }

    /// Shutting down: every version stops taking work; nothing loads.
    pub fn start_draining(&self) {
        self.registry.start_draining();
        self.drain.raise();
    }
}

/// An input parsed for one version must fit the version that computes it
/// (a model unloaded and loaded again may have changed shape in between).
fn check_fits(input: &InferInput, limits: &InputLimits) -> Result<(), ServeError> {
    if input.row_len() != limits.row_len {
        return Err(ServeError::Request(RequestError::Invalid(format!(
            "rows have {} values, the model's input has {}",
            input.row_len(),
            limits.row_len
        ))));
    }
    limits.check_rows(input.n_rows())?;
    Ok(())
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
