//! Building one model version: load the model, build the backend, warm up
//! one session per worker ([`prepare`], off the request path), then start
//! its batcher and worker pool ([`start_pool`]).
//!
//! Owns: that order (model -> backend -> sessions, each warmed up ->
//! batcher -> pool of workers) and the choices made once per version
//! (backend, pool shape, batching policy, its metric series). A model,
//! backend or warm-up that fails stops the version's load with its reason
//! (at start-up: start-up). Must not touch: request handling (protocol
//! layers and `Engine::infer`), batching rules (batcher), kernels
//! (backends), which version serves (the repository).

use std::sync::Arc;

use super::ModelDescription;
use super::pool::{Pool, PoolParts};
use super::version::{ServedVersion, VersionParts};
use crate::backend::cpu::{CpuBackend, CpuIsa, CpuOptions};
use crate::backend::hip::{self, HipOptions};
use crate::backend::{Backend, BackendError, ForwardOutput, PoolShape, Session, SessionConfig};
use crate::batcher::Batcher;
use crate::batcher::policy::{BatchPolicy, LevelLimits};
use crate::config::{BackendChoice, Config};
use crate::error::StartError;
use crate::input::InputLimits;
use crate::metrics::{Metrics, VersionMetrics, VersionShape};
use crate::model::{LayerNormMode, LoadedModel, ModelSource, MoeWeights, WeightPrecision};
use crate::readiness::Readiness;
use crate::stats::InferStats;

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
    let weight_precision = config.model.weight_precision;
    let backend = choose_backend(model.weights, layernorm, config)?;
    let description = ModelDescription {
        name: config.model.name.clone(),
        version: u64::from(step),
        size,
        layernorm,
        weight_precision,
        param_count: dims.param_count(),
        arch,
        checkpoint,
        checkpoint_step: step,
        fingerprint,
        demo,
        backend: backend.name(),
        devices: backend.describe(),
        isa: backend.isa(),
        dims,
    };
    Ok((backend, description))
}

/// Builds the backend `workers.backend` names: `cpu`; `hip` (an error when
/// this build has no HIP support or no device is usable); `auto` (HIP when a
/// device is usable, else the CPU; the log says which and why). With
/// `model.weight_precision = "f16"` or `"bf16"`, `hip` is an error (the HIP
/// kernels are f32 only) and `auto` serves on the CPU; a weight that is not
/// finite after rounding is an error naming its tensor. The CPU kernels are
/// the ones `workers.cpu_isa` names (validated against the CPU at load).
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
    let precision = config.model.weight_precision;
    let cpu = |weights: MoeWeights| -> Result<Arc<dyn Backend>, BackendError> {
        let options = CpuOptions {
            precision,
            isa: w.cpu_isa,
            ..CpuOptions::default()
        };
        let backend = CpuBackend::with_options(weights, layernorm, options)?;
        tracing::info!(
            isa = backend.isa_name(),
            cpu_isa = %w.cpu_isa,
            available = %CpuIsa::available().iter().map(|i| i.as_str()).collect::<Vec<_>>().join(","),
            "cpu kernels selected"
        );
        Ok(Arc::new(backend))
    };
    if precision != WeightPrecision::F32 {
        return match w.backend {
            BackendChoice::Cpu => cpu(weights),
            BackendChoice::Hip => Err(BackendError::Unavailable(format!(
                "model.weight_precision = \"{precision}\" is not supported by the hip backend \
                 (use weight_precision = \"f32\", or workers.backend = \"cpu\")"
            ))),
            BackendChoice::Auto => {
                tracing::info!(
                    "workers.backend = auto with model.weight_precision = {precision}: using the CPU backend \
                     ({precision} weights are not supported by the hip backend)"
                );
                cpu(weights)
            }
        };
    }
    match w.backend {
        BackendChoice::Cpu => cpu(weights),
        BackendChoice::Hip => match hip::new_backend(&weights, layernorm, &options) {
            Ok(b) => Ok(Arc::new(b)),
            Err(e) => Err(BackendError::Unavailable(format!(
                "workers.backend = \"hip\": {e} (use \"auto\" or \"cpu\" to serve on the CPU)"
            ))),
        },
        BackendChoice::Auto => match hip::new_backend(&weights, layernorm, &options) {
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
                cpu(weights)
            }
        },
    }
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

/// A model version read, packed and warmed up: everything a pool needs
/// before it serves. Built off the request path ([`prepare`] blocks).
pub struct Prepared {
    pub backend: Arc<dyn Backend>,
    pub description: ModelDescription,
    /// One warmed-up session per worker.
    pub sessions: Vec<Box<dyn Session>>,
    pub session_config: SessionConfig,
    pub policy: BatchPolicy,
    pub limits: InputLimits,
}

/// Builds the backend for `model` under `config` (the model's effective
/// settings), names it `name` version `version`, and creates and warms up
/// one session per worker. Blocking (reads nothing, but packs weights and
/// runs forwards): call it on a blocking thread. A backend that cannot serve
/// fails here with its own error, never as a pool that is not ready.
pub fn prepare(model: LoadedModel, config: &Config, name: &str, version: u64) -> Result<Prepared, StartError> {
    let (backend, mut description) = build_backend(model, config)?;
    description.name = name.to_string();
    description.version = version;
    let shape = pool_shape(backend.as_ref(), config);
    let session_config = SessionConfig {
        threads: shape.threads_per_worker,
    };
    tracing::info!(
        model = name,
        version,
        workers = shape.workers,
        threads_per_worker = shape.threads_per_worker,
        "worker pool (workers.count / threads_per_worker 0 = the backend's choice)"
    );
    let sessions = (0..shape.workers)
        .map(|_| backend.create_session(session_config))
        .collect::<Result<Vec<_>, _>>()?;
    let sessions = warm_up(sessions, backend.as_ref())?;
    let limits = InputLimits {
        row_len: description.dims.input,
        max_rows: config.batching.max_request_rows,
    };
    Ok(Prepared {
        backend,
        description,
        sessions,
        session_config,
        policy: batch_policy(config),
        limits,
    })
}

/// Starts the batcher and the pool (one worker actor per prepared session,
/// each on its own thread), with the version's metric series and
/// statistics: the version is serving when this returns. Cheap (no
/// compute).
pub fn start_pool(prepared: Prepared, metrics: &Arc<Metrics>) -> Result<ServedVersion, StartError> {
    let Prepared {
        backend,
        description,
        sessions,
        session_config,
        policy,
        limits,
    } = prepared;
    let readiness = Arc::new(Readiness::new(sessions.len()));
    let level_queue_rows: Vec<usize> = policy.levels.iter().map(|l| l.max_queue_rows).collect();
    let version_metrics = VersionMetrics::with_levels(
        metrics,
        VersionShape {
            model: description.name.clone(),
            version: description.version,
            workers: sessions.len(),
            experts: description.dims.experts,
            max_queue_rows: level_queue_rows.iter().sum(),
            max_batch_rows: policy.max_batch_rows,
        },
        &level_queue_rows,
    );
    let stats = Arc::new(InferStats::default());
    let batcher = match Batcher::start(policy.clone(), Arc::clone(&version_metrics), Arc::clone(&readiness)) {
        Ok(batcher) => batcher,
        Err(e) => {
            version_metrics.remove();
            return Err(e.into());
        }
    };
    let parts = PoolParts {
        backend: Arc::clone(&backend),
        sessions,
        session_config,
        readiness: Arc::clone(&readiness),
        stats: Arc::clone(&stats),
        metrics: Arc::clone(&version_metrics),
    };
    let (pool, freed) = match Pool::start(parts, &batcher) {
        Ok(started) => started,
        Err(e) => {
            version_metrics.remove();
            return Err(e.into());
        }
    };
    let parts = VersionParts {
        description: Arc::new(description),
        batcher,
        backend,
        readiness,
        limits,
        stats,
        metrics: version_metrics,
        policy,
        pool,
        freed,
    };
    Ok(ServedVersion::new(parts))
}

/// One forward of a single zero row on each session, in parallel: sizes the
/// scratch buffers and touches the weights before the worker serves. The
/// first failure stops start-up, naming the worker.
fn warm_up(sessions: Vec<Box<dyn Session>>, backend: &dyn Backend) -> Result<Vec<Box<dyn Session>>, StartError> {
    let zero_row = vec![0.0f32; backend.dims().input];
    std::thread::scope(|scope| {
        let runs: Vec<_> = sessions
            .into_iter()
            .map(|mut session| {
                let row = &zero_row;
                scope.spawn(move || {
                    let result = session.forward(row, &mut ForwardOutput::default());
                    result.map(|()| session)
                })
            })
            .collect();
        runs.into_iter()
            .enumerate()
            .map(|(worker, run)| {
                let result = run
                    .join()
                    .unwrap_or_else(|_| Err(BackendError::Device("the warm-up forward panicked".into())));
                result.map_err(|error| StartError::WarmUp { worker, error })
            })
            .collect()
    })
}

/// The batching policy from `[batching]`: each priority level's limits
/// from its `[batching.levels.N]` table, the globals where it sets none.
fn batch_policy(config: &Config) -> BatchPolicy {
    let b = &config.batching;
    let levels = (1..=b.priority_levels.max(1))
        .map(|n| {
            let level = b.level(n);
            LevelLimits {
                max_queue_rows: level.max_queue_rows,
                max_batch_rows: level.max_batch_rows,
                timeout: level.timeout,
            }
        })
        .collect();
    BatchPolicy {
        max_batch_rows: b.max_batch_rows,
        max_queue_delay: config.max_queue_delay(),
        regroup_fraction: f64::from(b.regroup_delay_pct) / 100.0,
        levels,
        default_level: b.default_priority_level,
        max_priority_wait: std::time::Duration::from_millis(b.max_priority_wait_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Dims, ModelSize};

    /// A session that fails every forward when `broken`, and with a `gate`
    /// computes one forward per permit received.
    #[derive(Default)]
    struct FakeSession {
        broken: bool,
        gate: Option<std::sync::mpsc::Receiver<()>>,
        _weights: Option<SlowWeights>,
    }

    /// Stands for the packed weights a real session holds; lets go of them
    /// slowly, so a pool-end signal sent before its session dropped would
    /// be seen early.
    struct SlowWeights {
        _held: Arc<()>,
    }

    impl Drop for SlowWeights {
        fn drop(&mut self) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    impl FakeSession {
        fn working() -> Box<dyn Session> {
            Box::new(FakeSession::default())
        }
    }

    impl Session for FakeSession {
        fn forward(&mut self, input: &[f32], out: &mut ForwardOutput) -> Result<(), BackendError> {
            if let Some(gate) = &self.gate {
                gate.recv()
                    .map_err(|_| BackendError::Device("the gate closed".into()))?;
            }
            if self.broken {
                return Err(BackendError::Device("no device memory left".into()));
            }
            out.prepare(&Dims::for_size(ModelSize::Nano), input).map(|_| ())
        }
    }

    struct FakeBackend;

    impl Backend for FakeBackend {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn describe(&self) -> String {
            "fake".into()
        }
        fn dims(&self) -> Dims {
            Dims::for_size(ModelSize::Nano)
        }
        fn create_session(&self, _config: SessionConfig) -> Result<Box<dyn Session>, BackendError> {
            Ok(FakeSession::working())
        }
    }

    #[test]
    fn a_failed_warm_up_stops_start_up_naming_the_worker_and_the_reason() {
        let sessions: Vec<Box<dyn Session>> = vec![
            FakeSession::working(),
            Box::new(FakeSession {
                broken: true,
                ..FakeSession::default()
            }),
        ];
        let err = warm_up(sessions, &FakeBackend).err().expect("warm-up must fail");
        assert!(matches!(err, StartError::WarmUp { worker: 1, .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("worker 1") && text.contains("no device memory left"),
            "{text}"
        );

        let sessions: Vec<Box<dyn Session>> = (0..3).map(|_| FakeSession::working()).collect();
        assert_eq!(warm_up(sessions, &FakeBackend).map(|s| s.len()).ok(), Some(3));
    }

    /// A version of the fake backend with these sessions, ready to start.
    fn fake_prepared(sessions: Vec<Box<dyn Session>>) -> Prepared {
        let dims = Dims::for_size(ModelSize::Nano);
        let description = ModelDescription {
            name: "fake".into(),
            version: 3,
            size: "Nano",
            layernorm: LayerNormMode::Identity,
            weight_precision: WeightPrecision::F32,
            param_count: dims.param_count(),
            arch: "builtin:demo".into(),
            checkpoint: "builtin:demo".into(),
            checkpoint_step: 3,
            fingerprint: None,
            demo: true,
            backend: "fake",
            devices: "fake".into(),
            isa: "none",
            dims,
        };
        let session_config = SessionConfig { threads: 1 };
        Prepared {
            backend: Arc::new(FakeBackend),
            description,
            sessions,
            session_config,
            policy: BatchPolicy::one_level(8, std::time::Duration::ZERO, 64, 0.0),
            limits: InputLimits {
                row_len: dims.input,
                max_rows: 8,
            },
        }
    }

    /// Step: one request of 3 rows is computed as one execution.
    async fn one_request_is_one_execution(served: &ServedVersion) {
        let reply = submit(served, 3);
        let output = reply.await.expect("answered").expect("computed");
        assert_eq!(output.logits.len(), 3 * served.description().dims.output);
        assert_eq!(served.stats().snapshot().execution_count, 1);
    }

    #[test]
    fn a_version_replaces_a_worker_that_ended_and_signals_its_retirement() {
        actix_rt::System::new().block_on(async {
            let metrics = Arc::new(Metrics::new());
            let text = || String::from_utf8(metrics.render()).unwrap();
            let weights = Arc::new(());
            let holding = || -> Box<dyn Session> {
                Box::new(FakeSession {
                    _weights: Some(SlowWeights {
                        _held: Arc::clone(&weights),
                    }),
                    ..FakeSession::default()
                })
            };
            let sessions = vec![holding(), holding()];
            let served = start_pool(fake_prepared(sessions), &metrics).expect("the pool starts");
            assert!(served.readiness().is_ready());
            assert!(text().contains("tokitai_workers{model=\"fake\",version=\"3\"} 2"));
            one_request_is_one_execution(&served).await;

            // Worker 0's actor ends (it stops serving as it unwinds): the
            // pool replaces it and counts the restart.
            served.readiness().worker_lost();
            served.pool().report_exit(0);
            assert_eq!(served.readiness().serving_workers(), 2);
            let restarts = "tokitai_worker_restarts_total{model=\"fake\",version=\"3\",worker=\"0\"} 1";
            assert!(text().contains(restarts), "{}", text());

            // The last holder lets go: retired, series gone, both signals fire.
            let mut retirement = served.retirement().expect("the retirement is taken once");
            assert!(served.retirement().is_none());
            let readiness = Arc::clone(&served.readiness);
            drop(served);
            assert_eq!(readiness.version_state(), crate::readiness::VersionState::Retired);
            assert!(!text().contains("model=\"fake\""), "{}", text());
            let limit = std::time::Duration::from_secs(10);
            tokio::time::timeout(limit, retirement.drained())
                .await
                .expect("drained");
            tokio::time::timeout(limit, retirement.freed())
                .await
                .expect("the pool ended");
            let held = Arc::strong_count(&weights);
            assert_eq!(held, 1, "every session's weights were dropped before the pool's end");
        });
    }

    /// A job of `rows` rows for `served`, submitted to its batcher.
    fn submit(served: &ServedVersion, rows: usize) -> tokio::sync::oneshot::Receiver<crate::batcher::job::JobReply> {
        let values = vec![0.5; rows * served.limits().row_len];
        let input = crate::input::InferInput::new(values, served.limits()).unwrap();
        let (job, reply) = crate::batcher::job::Job::new(input, std::time::Duration::from_secs(60), 1);
        served.submit(job);
        reply
    }

    #[test]
    fn a_batch_of_three_requests_is_one_execution_of_its_version() {
        actix_rt::System::new().block_on(async {
            let metrics = Arc::new(Metrics::new());
            let (permits, gate) = std::sync::mpsc::channel();
            let session = Box::new(FakeSession {
                gate: Some(gate),
                ..FakeSession::default()
            });
            let served = start_pool(fake_prepared(vec![session]), &metrics).expect("the pool starts");
            // The one worker takes the first request and waits at the gate;
            // the next three queue behind it and go out as one batch.
            let first = submit(&served, 1);
            let queued: Vec<_> = (0..3).map(|_| submit(&served, 1)).collect();
            permits.send(()).unwrap();
            permits.send(()).unwrap();
            first.await.unwrap().expect("computed");
            for reply in queued {
                reply.await.unwrap().expect("computed");
            }
            assert_eq!(served.stats().snapshot().execution_count, 2);
            let text = String::from_utf8(metrics.render()).unwrap();
            let batches = "tokitai_batches_total{model=\"fake\",version=\"3\",worker=\"0\"} 2";
            let sizes = "tokitai_batch_size_requests_bucket{model=\"fake\",version=\"3\",le=\"2\"} 1";
            assert!(text.contains(batches) && text.contains(sizes), "{text}");
        });
    }
}
