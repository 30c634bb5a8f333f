//! The engine facade: the one entry point every protocol calls.
//!
//! Owns: [`Engine`] (the running engine as the protocol layers see it) and
//! [`Engine::infer`], the single submit path: resolve the target model
//! version ([`ModelTarget`]), the request's priority level and deadline
//! (resolved against that version's `[batching]`), the in-flight count,
//! handing the job to that version's batcher and waiting for its answer,
//! which says who computed it ([`InferAnswer`]), and, for a traced request,
//! its queue and compute spans (`telemetry/` makes them); what the protocols read of the server
//! ([`Engine::health`], [`Engine::render_metrics`], [`Engine::metrics`],
//! answers held for slow readers and the drain signal in [`held`], the
//! API keys the protocols check, [`Engine::keys`]); and the
//! repository operations the protocols call ([`Engine::repository_index`],
//! [`Engine::load_model`], [`Engine::unload_model`], [`Engine::reload`]),
//! handed to the repository. Layer: above the repository (which versions
//! serve) and, through it, `served/` (one version: description, build,
//! pool, life); `ModelDescription` and `ModelTarget` live there and are
//! re-exported here. Must not touch: wire formats (the protocol layers
//! parse and validate into an [`InferInput`], then call `infer`), batching
//! rules (batcher), kernels (backends), which version serves (the
//! repository), how a version is built or retired (`served/`).

pub mod held;

use std::sync::Arc;
use std::time::{Duration, Instant};

use self::held::{DrainSignal, HeldAnswers};
use crate::auth::KeyStore;
pub use crate::batcher::job::InferOutput;
use crate::batcher::job::Job;
use crate::config::Config;
use crate::error::{EngineError, StartError};
use crate::input::InferInput;
use crate::labels::{Endpoint, FailureReason};
use crate::metrics::Metrics;
use crate::readiness::State;
pub use crate::repository::RepositoryError;
pub use crate::repository::controller::Outcome as LoadOutcome;
use crate::repository::{Controller, IndexEntry, Registry};
pub(crate) use crate::served::ServedVersion;
pub use crate::served::{ModelDescription, ModelTarget};
use crate::telemetry::EngineFacts;
/// A request's sampled trace (what [`InferOptions::trace`] carries).
pub use crate::telemetry::RequestTrace;

/// How one inference request is to be served: what its protocol read off
/// the request, not yet resolved against the version's settings.
#[derive(Debug, Clone)]
pub struct InferOptions {
    /// The client's own timeout (`X-Request-Timeout-Ms`, `grpc-timeout`);
    /// `None`: its priority level's default, else
    /// `server.request_timeout_ms`. Rows not computed within it are
    /// dropped and the request fails.
    pub timeout: Option<Duration>,
    /// The priority level asked for (`priority` parameter,
    /// `X-Request-Priority`; 1 is the highest, 0 names none).
    pub priority: u64,
    /// The protocol route it came in on (labels the `cancelled` count).
    pub route: Endpoint,
    /// Its sampled trace (`None` when tracing is off or it is not
    /// sampled): the engine adds its queue and compute spans.
    pub trace: Option<RequestTrace>,
}

/// An answer, and the model version that computed it.
#[derive(Debug)]
pub struct InferAnswer {
    pub output: InferOutput,
    /// Name, version and shapes of the version that computed `output`.
    pub model: Arc<ModelDescription>,
}

/// Records what the engine did for a traced request (its queue and
/// compute spans; the model, version, level and rows on its span).
fn record_trace(
    trace: &RequestTrace,
    version: &ServedVersion,
    priority: u64,
    rows: usize,
    started: Instant,
    result: &Result<InferOutput, EngineError>,
) {
    let description = version.description();
    trace.engine(&EngineFacts {
        model: &description.name,
        version: description.version,
        level: version.priority_level(priority),
        rows,
        started,
        computed: result
            .as_ref()
            .ok()
            .map(|out| (out.queue_wait, out.compute, out.batch_rows)),
    });
}

/// The running engine, as the protocol layers see it. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    metrics: Arc<Metrics>,
    /// The served version of each model.
    registry: Arc<Registry>,
    /// Loads, swaps and unloads versions.
    controller: Arc<Controller>,
    /// Answer bytes computed but not yet taken by their clients, against
    /// `server.max_pending_answer_bytes` (every protocol's).
    held: Arc<HeldAnswers>,
    /// Raised by [`Engine::start_draining`]; open connections watch it.
    drain: DrainSignal,
    /// `server.request_timeout_ms`: a request's deadline when neither it
    /// nor its priority level names one.
    default_timeout: Duration,
    /// The API keys (`server.api_keys_file`), re-read with the models.
    keys: Arc<KeyStore>,
}

impl Engine {
    /// Loads the configured models and starts their pools (and, in `poll`
    /// mode, the repository poller). Must run inside a tokio runtime.
    pub async fn start(config: &Config, metrics: Arc<Metrics>) -> Result<Engine, StartError> {
        // The keys first: a missing or broken keys file stops the start-up
        // before a model is read.
        let keys = Arc::new(KeyStore::load(config)?);
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
            default_timeout: config.default_timeout(),
            keys,
            metrics,
            registry,
            controller,
            held: HeldAnswers::new(config.server.max_pending_answer_bytes),
            drain: DrainSignal::default(),
        })
    }

    /// The version that would serve `target` now.
    pub fn resolve(&self, target: &ModelTarget) -> Result<Arc<ServedVersion>, EngineError> {
        self.registry.resolve(target)
    }

    /// What serves `target` (its metadata).
    pub fn describe(&self, target: &ModelTarget) -> Result<Arc<ModelDescription>, EngineError> {
        Ok(Arc::clone(self.resolve(target)?.description()))
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
        mut options: InferOptions,
    ) -> Result<InferAnswer, EngineError> {
        let (start, rows) = (Instant::now(), input.n_rows());
        let (trace, priority) = (options.trace.take(), options.priority);
        let result = self.submit(&version, input, options).await;
        if let Some(trace) = &trace {
            record_trace(trace, &version, priority, rows, start, &result);
        }
        match &result {
            Ok(out) => version
                .stats()
                .record_success(rows, start.elapsed(), out.queue_wait, out.compute),
            Err(_) => version.stats().record_failure(start.elapsed()),
        }
        let output = result?;
        version.count_answer();
        Ok(InferAnswer {
            output,
            model: Arc::clone(version.description()),
        })
    }

    async fn submit(
        &self,
        version: &ServedVersion,
        input: InferInput,
        options: InferOptions,
    ) -> Result<InferOutput, EngineError> {
        input.fits(version.limits())?;
        let level = version.priority_level(options.priority);
        let timeout = options
            .timeout
            .or_else(|| version.level_timeout(level))
            .unwrap_or(self.default_timeout);
        let (job, reply) = Job::new(input, timeout, level);
        let inflight = InflightGuard::new(&self.metrics, options.route);
        version.submit(job);
        let outcome = reply
            .await
            .map_err(|_| EngineError::Internal("the request was dropped before it was answered".into()))
            .and_then(|answer| answer);
        inflight.finish();
        let output = outcome?;
        version.metrics().observe_level_queue_wait(level, output.queue_wait);
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

    /// Re-reads the API keys and the repository (or the `--arch/--checkpoint`
    /// files): SIGHUP. Keys that fail to parse leave the old ones in force.
    pub async fn reload(&self) {
        self.keys.reload();
        self.controller.refresh("SIGHUP").await;
    }

    /// The API keys the protocols check requests against.
    pub fn keys(&self) -> &KeyStore {
        &self.keys
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

    /// The server's metrics (what the protocol layers record requests into).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Answer bytes computed but not yet taken, against their budget.
    pub fn held(&self) -> &Arc<HeldAnswers> {
        &self.held
    }

    /// Raised when the server starts draining; open connections watch it.
    pub fn drain(&self) -> &DrainSignal {
        &self.drain
    }

    /// `/readyz`'s word now: ready, starting, recovering or draining.
    pub fn state(&self) -> State {
        self.registry.state()
    }

    /// What `/healthz` reports: readiness, the default model and every
    /// served version, as they are now.
    pub fn health(&self) -> Health {
        let versions = self
            .served()
            .into_iter()
            .map(|v| VersionHealth {
                description: Arc::clone(v.description()),
                workers: v.readiness().workers(),
            })
            .collect();
        Health {
            ready: self.is_ready(),
            default_model: self.registry.default_model(),
            versions,
        }
    }

    /// The `/metrics` body (Prometheus text exposition), with the gauges
    /// read at scrape time (`tokitai_ready`, device memory) brought up to
    /// date first.
    pub fn render_metrics(&self) -> Vec<u8> {
        self.metrics.set_ready(self.is_ready());
        for version in self.served() {
            for (device, bytes) in version.device_memory_used() {
                self.metrics.set_device_memory(&device, bytes);
            }
        }
        self.metrics.render()
    }
}

/// The server's health at one moment (see [`Engine::health`]).
#[derive(Debug, Clone)]
pub struct Health {
    /// Every served version ready, at least one served, not draining.
    pub ready: bool,
    /// The model `/infer` goes to (`model.name`, or the only model).
    pub default_model: Option<String>,
    /// Every served version, by model name.
    pub versions: Vec<VersionHealth>,
}

impl Health {
    /// The served version of the default model, if one serves.
    pub fn default_version(&self) -> Option<&VersionHealth> {
        let default = self.default_model.as_deref()?;
        self.versions.iter().find(|v| v.description.name == default)
    }
}

/// One served version's health.
#[derive(Debug, Clone)]
pub struct VersionHealth {
    pub description: Arc<ModelDescription>,
    /// Workers in its pool.
    pub workers: usize,
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
