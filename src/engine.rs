//! Engine assembly: load the model, build the backend, start the batcher and
//! the worker pool, and hold the state the HTTP layer reads.
//!
//! Owns: start-up order (model -> backend -> batcher -> workers), readiness
//! and draining flags, and the model's description for `/healthz` and
//! metrics. Must not touch: request handling (HTTP layer), batching rules
//! (batcher) or kernels (backends).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use actix::prelude::*;
use serde::Serialize;

use crate::backend::cpu::CpuBackend;
use crate::backend::hip::{self, HipOptions};
use crate::backend::{Backend, BackendError, PoolShape, SessionConfig};
use crate::batcher::policy::BatchPolicy;
use crate::batcher::{AttachWorkers, Batcher};
use crate::config::Config;
use crate::error::ModelError;
use crate::metrics::Metrics;
use crate::model::{Dims, LayerNormMode, LoadedModel, ModelSource, MoeWeights};
use crate::worker::Worker;

/// Readiness and draining, shared lock-free by the HTTP actors, the batcher
/// and the workers.
pub struct EngineState {
    workers: usize,
    ready_workers: AtomicUsize,
    draining: AtomicBool,
}

impl EngineState {
    pub fn new(workers: usize) -> EngineState {
        EngineState {
            workers,
            ready_workers: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        }
    }

    /// A worker finished its warm-up batch.
    pub fn worker_ready(&self) {
        self.ready_workers.fetch_add(1, Ordering::AcqRel);
    }

    /// Model loaded, every worker warmed up, and not draining.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.ready_workers.load(Ordering::Acquire) >= self.workers
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn workers(&self) -> usize {
        self.workers
    }
}

/// What is being served, as `/healthz`, the start-up log and the
/// `tokitai_model_info` metric describe it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDescription {
    /// Name on the `/v2` routes (`model.name`).
    pub name: String,
    pub size: &'static str,
    pub layernorm: LayerNormMode,
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

/// Loads the configured model, or the built-in demo model when none is given.
pub fn load_model(config: &Config) -> Result<LoadedModel, ModelError> {
    match (&config.model.arch, &config.model.checkpoint) {
        (Some(arch), Some(checkpoint)) => crate::model::load_model(arch, checkpoint),
        _ => Ok(crate::model::synth::demo_model()),
    }
}

/// Builds the configured backend from the model, consuming its weights (the
/// backend packs them once; workers share them).
/// A backend that cannot be built (`hip` without a usable device) is an
/// error naming the setting, so start-up stops with the reason.
pub fn build_backend(
    model: LoadedModel,
    config: &Config,
) -> Result<(Arc<dyn Backend>, ModelDescription), BackendError> {
    let dims = model.arch.dims();
    let (arch, checkpoint, demo) = match &model.source {
        ModelSource::Files { arch, checkpoint } => {
            (arch.display().to_string(), checkpoint.display().to_string(), false)
        }
        ModelSource::Demo => ("builtin:demo".to_string(), "builtin:demo".to_string(), true),
    };
    let layernorm = config.model.layernorm;
    let size = model.arch.size.as_str();
    let fingerprint = model.arch.fingerprint.clone();
    let step = model.step;
    let backend = choose_backend(model.weights, layernorm, config)?;
    let description = ModelDescription {
        name: config.model.name.clone(),
        size,
        layernorm,
        param_count: dims.param_count(),
        arch,
        checkpoint,
        checkpoint_step: step,
        fingerprint,
        demo,
        backend: backend.name(),
        devices: backend.describe(),
        dims,
    };
    Ok((backend, description))
}

/// Builds the backend `workers.backend` names: `cpu`; `hip` (an error when
/// this build has no HIP support or no device is usable); `auto` (HIP when a
/// device is usable, else the CPU; the log says which and why).
pub fn choose_backend(
    weights: MoeWeights,
    layernorm: LayerNormMode,
    config: &Config,
) -> Result<Arc<dyn Backend>, BackendError> {
    let w = &config.workers;
    let options = HipOptions {
        gpus: w.gpus.clone(),
        streams_per_gpu: w.streams_per_gpu,
    };
    match w.backend.as_str() {
        "cpu" => Ok(Arc::new(CpuBackend::new(weights, layernorm))),
        "hip" => match hip::new_backend(&weights, layernorm, &options) {
            Ok(b) => Ok(Arc::new(b)),
            Err(e) => Err(BackendError::Unavailable(format!(
                "workers.backend = \"hip\": {e} (use \"auto\" or \"cpu\" to serve on the CPU)"
            ))),
        },
        _ => match hip::new_backend(&weights, layernorm, &options) {
            Ok(b) => {
                tracing::info!(devices = %b.describe(), "workers.backend = auto: using the HIP backend");
                Ok(Arc::new(b))
            }
            Err(e) => {
                // A device that is present but failed to initialise is worth a warning.
                if hip::device_count().is_ok_and(|n| n > 0) {
                    tracing::warn!(reason = %e, "workers.backend = auto: HIP device present but unusable, using the CPU backend");
                } else {
                    tracing::info!(reason = %e, "workers.backend = auto: no usable HIP device, using the CPU backend");
                }
                Ok(Arc::new(CpuBackend::new(weights, layernorm)))
            }
        },
    }
}

/// The running engine, as the HTTP layer sees it.
#[derive(Clone)]
pub struct Engine {
    pub batcher: Addr<Batcher>,
    /// For device metrics at scrape time; compute goes through the workers.
    pub backend: Arc<dyn Backend>,
    pub state: Arc<EngineState>,
    pub metrics: Arc<Metrics>,
    pub model: Arc<ModelDescription>,
}

/// The pool shape: the configured values, with 0 meaning the backend's
/// choice for this machine's cores.
pub fn pool_shape(backend: &dyn Backend, config: &Config) -> PoolShape {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let preferred = backend.pool_shape(cores);
    let pick = |configured: usize, preferred: usize| if configured == 0 { preferred } else { configured };
    PoolShape {
        workers: pick(config.workers.count, preferred.workers),
        threads_per_worker: pick(config.workers.threads_per_worker, preferred.threads_per_worker),
    }
}

/// Starts the batcher and one worker actor per configured worker, each on
/// its own thread with its own session. Must run inside an actix `System`.
pub fn start(
    backend: Arc<dyn Backend>,
    model: ModelDescription,
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<Engine, crate::backend::BackendError> {
    let shape = pool_shape(backend.as_ref(), config);
    let workers = shape.workers;
    let session_config = SessionConfig {
        threads: shape.threads_per_worker,
    };
    tracing::info!(
        workers,
        threads_per_worker = shape.threads_per_worker,
        "worker pool (workers.count / threads_per_worker 0 = the backend's choice)"
    );
    // Sessions are created here, before any actor starts, so a backend that
    // cannot serve fails start-up with its own error instead of a dead pool.
    let sessions = (0..workers)
        .map(|_| backend.create_session(session_config))
        .collect::<Result<Vec<_>, _>>()?;
    let state = Arc::new(EngineState::new(workers));
    let policy = BatchPolicy {
        max_batch_rows: config.batching.max_batch_rows,
        max_queue_delay: config.max_queue_delay(),
        max_queue_rows: config.batching.max_queue_rows,
        regroup_fraction: f64::from(config.batching.regroup_delay_pct) / 100.0,
    };
    metrics.init_pool(
        workers,
        model.dims.experts,
        policy.max_queue_rows,
        policy.max_batch_rows,
    );
    metrics
        .model_info
        .with_label_values(&[
            model.size,
            model.layernorm.as_str(),
            &model.param_count.to_string(),
            &model.checkpoint,
            model.backend,
            &model.devices,
        ])
        .set(1);

    let batcher = Batcher::new(policy, Arc::clone(&metrics), Arc::clone(&state)).start();
    let addrs = sessions
        .into_iter()
        .enumerate()
        .map(|(id, session)| {
            // SyncArbiter's factory is `Fn`; the pre-built session is handed
            // over once, and a restart of the actor (never expected: panics are
            // caught inside it) would build a fresh one.
            let slot = parking_lot::Mutex::new(Some(session));
            let (backend, metrics, state) = (Arc::clone(&backend), Arc::clone(&metrics), Arc::clone(&state));
            let done = batcher.clone().recipient();
            SyncArbiter::start(1, move || {
                let session = slot.lock().take().unwrap_or_else(|| {
                    backend
                        .create_session(session_config)
                        .expect("the backend created this session before")
                });
                Worker::new(
                    id,
                    Arc::clone(&backend),
                    session,
                    session_config,
                    done.clone(),
                    Arc::clone(&metrics),
                    Arc::clone(&state),
                )
            })
        })
        .collect();
    batcher.do_send(AttachWorkers(addrs));
    Ok(Engine {
        batcher,
        backend,
        state,
        metrics,
        model: Arc::new(model),
    })
}

/// Times `f`, for the model-load metric and log.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, std::time::Duration) {
    let start = Instant::now();
    let value = f();
    (value, start.elapsed())
}
