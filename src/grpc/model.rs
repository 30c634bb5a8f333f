//! The engine as the gRPC service sees it: the one adapter through which
//! every call reaches [`Engine`].
//!
//! Owns: which model version a request names (`model_name` and
//! `model_version`, resolved by the engine's registry: NOT_FOUND for an
//! unknown one, UNAVAILABLE for one that serves nothing now), each version's
//! metadata, configuration and statistics as Triton's messages, inference
//! through [`Engine::infer`] (the one submit path), and the repository
//! calls; nothing else in `grpc/` touches the engine. Must not touch: wire
//! parsing (`request.rs`), status codes (`status.rs`).

use std::sync::Arc;
use std::time::Duration;

use super::pb::model_metadata_response::TensorMetadata;
use super::pb::model_version_policy::{Latest, PolicyChoice};
use super::pb::{self, model_config};
use super::request::parse_infer;
use super::response::{Answerer, infer_response};
use super::status::GrpcError;
use crate::engine::version::ServedVersion;
use crate::engine::{Engine, InferOptions, ModelTarget};
use crate::error::ServeError;
use crate::labels::GrpcMethod;
use crate::metrics::Metrics;
use crate::oip::{self, FP32, INPUT, OutputName, PLATFORM};

/// The served engine, for the gRPC service.
#[derive(Clone)]
pub struct Served {
    engine: Engine,
    /// A call's deadline without `grpc-timeout` (`server.request_timeout_ms`).
    pub default_timeout: Duration,
    /// The actix arbiter that repository loads and unloads run on: they
    /// start and stop a version's actors, which live on actix arbiters, not
    /// on gRPC's tokio runtime.
    control: actix_rt::ArbiterHandle,
}

/// A model (and optional version) a call names.
pub struct Named<'a> {
    pub name: &'a str,
    /// Empty: the version the model serves now.
    pub version: &'a str,
}

impl Named<'_> {
    fn target(&self) -> Result<ModelTarget<'_>, GrpcError> {
        let shown = |s: &str| s.chars().take(64).collect::<String>();
        let version = match self.version {
            "" => None,
            v => Some(v.parse::<u64>().map_err(|_| {
                GrpcError::NotFound(format!(
                    "Request for unknown model: '{}' version {} is not found",
                    shown(self.name),
                    shown(v)
                ))
            })?),
        };
        Ok(ModelTarget::named(self.name, version))
    }
}

impl Served {
    pub fn new(engine: Engine, default_timeout: Duration, control: actix_rt::ArbiterHandle) -> Served {
        Served {
            engine,
            default_timeout,
            control,
        }
    }

    /// Runs `op` on the engine, on the control arbiter, and waits for it.
    async fn on_control<T: Send + 'static, F>(
        &self,
        op: impl FnOnce(Engine) -> F + Send + 'static,
    ) -> Result<T, GrpcError>
    where
        F: std::future::Future<Output = T> + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let engine = self.engine.clone();
        // The closure is sent; the future it makes runs where it is made.
        let spawned = self.control.spawn_fn(move || {
            actix_rt::spawn(async move {
                let _ = tx.send(op(engine).await);
            });
        });
        if !spawned {
            return Err(ServeError::NotReady("shutting down").into());
        }
        rx.await
            .map_err(|_| ServeError::Internal("the repository call was dropped".into()).into())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.engine.metrics
    }

    /// The account of answer bytes waiting for their clients.
    pub fn held(&self) -> &Arc<crate::engine::held::HeldAnswers> {
        &self.engine.held
    }

    /// Ready as HTTP's `/readyz` and `/v2/health/ready` say.
    pub fn is_ready(&self) -> bool {
        self.engine.is_ready()
    }

    /// The version serving `named` now.
    pub fn resolve(&self, named: &Named) -> Result<Arc<ServedVersion>, GrpcError> {
        Ok(self.engine.resolve(&named.target()?)?)
    }

    /// Whether `named` serves now: `Ok(false)` for a known model that does
    /// not (Triton's "not ready"), NOT_FOUND for an unknown one.
    pub fn model_ready(&self, named: &Named) -> Result<bool, GrpcError> {
        match self.resolve(named) {
            Ok(version) => Ok(version.readiness.is_ready()),
            Err(GrpcError::Serve(ServeError::ModelNotReady { .. })) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every version served now (statistics for "all models").
    pub fn all_served(&self) -> Vec<Arc<ServedVersion>> {
        self.engine.served()
    }

    /// Computes `req` on the version serving the model it names, within
    /// `timeout`, through the engine's one submit path. The version is
    /// resolved once: `req` is parsed against its limits and computed by it.
    pub async fn infer(
        &self,
        req: pb::ModelInferRequest,
        timeout: Duration,
        method: GrpcMethod,
    ) -> Result<pb::ModelInferResponse, GrpcError> {
        let named = Named {
            name: &req.model_name,
            version: &req.model_version,
        };
        let version = self.resolve(&named)?;
        let call = parse_infer(req, &version.limits)?;
        let options = InferOptions {
            timeout,
            route: method.into(),
        };
        let answer = self.engine.infer(version, call.input, options).await?;
        let version = oip::version_of(&answer.model);
        let who = Answerer {
            model: &answer.model.name,
            version: &version,
            id: call.id,
        };
        Ok(infer_response(who, &call.outputs, &answer.output, &answer.model.dims))
    }

    /// The model repository's index (`ready`: the `READY` rows only).
    pub async fn repository_index(
        &self,
        req: pb::RepositoryIndexRequest,
    ) -> Result<pb::RepositoryIndexResponse, GrpcError> {
        let models = self
            .engine
            .repository_index(req.ready)
            .into_iter()
            .map(|e| pb::repository_index_response::ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state.as_str().to_string(),
                reason: e.reason,
            })
            .collect();
        Ok(pb::RepositoryIndexResponse { models })
    }

    /// Loads (or re-reads) a model: `explicit` mode only.
    pub async fn repository_load(
        &self,
        req: pb::RepositoryModelLoadRequest,
    ) -> Result<pb::RepositoryModelLoadResponse, GrpcError> {
        let name = req.model_name;
        self.on_control(move |engine| async move { engine.load_model(&name).await })
            .await??;
        Ok(pb::RepositoryModelLoadResponse {})
    }

    /// Unloads a model once its accepted requests are answered: `explicit`
    /// mode only.
    pub async fn repository_unload(
        &self,
        req: pb::RepositoryModelUnloadRequest,
    ) -> Result<pb::RepositoryModelUnloadResponse, GrpcError> {
        let name = req.model_name;
        self.on_control(move |engine| async move { engine.unload_model(&name).await })
            .await??;
        Ok(pb::RepositoryModelUnloadResponse {})
    }
}

/// Each output's row width.
fn output_dims(version: &ServedVersion) -> [(OutputName, usize); 2] {
    let d = version.description.dims;
    [(OutputName::Logits, d.output), (OutputName::RouterWeights, d.experts)]
}

/// Triton's model metadata for `version`.
pub fn metadata(version: &ServedVersion) -> pb::ModelMetadataResponse {
    let d = version.description.dims;
    let tensor = |name: &str, width: usize| TensorMetadata {
        name: name.to_string(),
        datatype: FP32.to_string(),
        shape: vec![-1, width as i64],
    };
    pb::ModelMetadataResponse {
        name: version.description.name.clone(),
        versions: vec![oip::version_of(&version.description)],
        platform: PLATFORM.to_string(),
        inputs: vec![tensor(INPUT, d.input)],
        outputs: output_dims(version).map(|(o, w)| tensor(o.as_str(), w)).to_vec(),
    }
}

/// Triton's model configuration: batching on, up to the row limit.
pub fn config(version: &ServedVersion) -> pb::ModelConfig {
    let m = &version.description;
    let fp32 = pb::DataType::TypeFp32 as i32;
    pb::ModelConfig {
        name: m.name.clone(),
        platform: PLATFORM.to_string(),
        backend: m.backend.to_string(),
        version_policy: Some(pb::ModelVersionPolicy {
            policy_choice: Some(PolicyChoice::Latest(Latest { num_versions: 1 })),
        }),
        max_batch_size: i32::try_from(version.limits.max_rows).unwrap_or(i32::MAX),
        input: vec![pb::ModelInput {
            name: INPUT.to_string(),
            data_type: fp32,
            dims: vec![m.dims.input as i64],
            ..Default::default()
        }],
        output: output_dims(version)
            .map(|(o, w)| pb::ModelOutput {
                name: o.as_str().to_string(),
                data_type: fp32,
                dims: vec![w as i64],
            })
            .to_vec(),
        scheduling_choice: Some(model_config::SchedulingChoice::DynamicBatching(
            pb::ModelDynamicBatching::default(),
        )),
        model_transaction_policy: Some(pb::ModelTransactionPolicy { decoupled: false }),
    }
}

/// The statistics extension's counters of `version` (the same as HTTP's
/// `/stats`).
pub fn statistics(version: &ServedVersion, metrics: &Metrics) -> pb::ModelStatistics {
    let s = version.stats.snapshot(metrics.batches_total());
    let d = |(count, ns): (u64, u64)| Some(pb::StatisticDuration { count, ns });
    pb::ModelStatistics {
        name: version.description.name.clone(),
        version: oip::version_of(&version.description),
        last_inference: s.last_inference_ms,
        inference_count: s.inference_count,
        execution_count: s.execution_count,
        inference_stats: Some(pb::InferStatistics {
            success: d(s.success),
            fail: d(s.fail),
            queue: d(s.queue),
            compute_input: d(s.compute_input()),
            compute_infer: d(s.compute_infer),
            compute_output: d(s.compute_output()),
            cache_hit: d((0, 0)),
            cache_miss: d((0, 0)),
        }),
        batch_stats: Vec::new(),
    }
}
