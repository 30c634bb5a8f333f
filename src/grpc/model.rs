//! The engine as the gRPC service sees it: the one adapter through which
//! every call reaches [`Engine`].
//!
//! Owns: the call's model (`model_name` and `model_version`, resolved by
//! the protocol core, `oip::target`, and the engine's registry: NOT_FOUND
//! for an unknown one, UNAVAILABLE for one that serves nothing now), the
//! protocol core's metadata, configuration and statistics rendered as
//! Triton's messages, inference through [`Engine::infer`] (the one submit
//! path), and the repository calls; nothing else in `grpc/` touches the
//! engine. Must not touch: wire parsing (`request.rs`), status codes
//! (`status.rs`), what metadata, config and statistics say (`oip/`).

use std::sync::Arc;
use std::time::Duration;

use super::pb::model_metadata_response::TensorMetadata;
use super::pb::model_version_policy::{Latest, PolicyChoice};
use super::pb::{self, model_config};
use super::request::parse_infer;
use super::response::{Answerer, infer_response};
use super::status::GrpcError;
use crate::engine::ServedVersion;
use crate::engine::{Engine, InferOptions, ModelTarget, RequestTrace};
use crate::error::EngineError;
use crate::labels::GrpcMethod;
use crate::metrics::Metrics;
use crate::oip::{self, TensorInfo};
use crate::telemetry::{self, Outcome, Parent, Protocol};

/// The served engine, for the gRPC service.
#[derive(Clone)]
pub struct Served {
    engine: Engine,
    /// A call's deadline without `grpc-timeout` (`server.request_timeout_ms`).
    pub default_timeout: Duration,
}

/// A model (and optional version) a call names.
pub struct Named<'a> {
    pub name: &'a str,
    /// Empty: the version the model serves now.
    pub version: &'a str,
}

impl Named<'_> {
    fn target(&self) -> Result<ModelTarget<'_>, GrpcError> {
        Ok(oip::target(self.name, Some(self.version))?)
    }
}

impl Served {
    pub fn new(engine: Engine, default_timeout: Duration) -> Served {
        Served {
            engine,
            default_timeout,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        self.engine.metrics()
    }

    /// The API keys calls are checked against (`auth.rs`).
    pub fn keys(&self) -> &crate::auth::KeyStore {
        self.engine.keys()
    }

    /// The account of answer bytes waiting for their clients.
    pub fn held(&self) -> &Arc<crate::engine::held::HeldAnswers> {
        self.engine.held()
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
            Ok(version) => Ok(version.readiness().is_ready()),
            Err(GrpcError::Engine(EngineError::ModelNotReady { .. })) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The statistics extension's counters of `version`.
    pub fn statistics(&self, version: &ServedVersion) -> pb::ModelStatistics {
        statistics(version)
    }

    /// Every version served now (statistics for "all models").
    pub fn all_served(&self) -> Vec<Arc<ServedVersion>> {
        self.engine.served()
    }

    /// Computes `req` on the version serving the model it names, within
    /// `timeout`, through the engine's one submit path. The version is
    /// resolved once: `req` is parsed against its limits and computed by it.
    /// `parent`: the call's trace context (`None`: tracing is off).
    pub async fn infer(
        &self,
        req: pb::ModelInferRequest,
        timeout: Option<Duration>,
        method: GrpcMethod,
        parent: Option<&Parent>,
    ) -> Result<pb::ModelInferResponse, GrpcError> {
        let trace = parent.and_then(|p| {
            p.request(Protocol::Grpc {
                method: method.as_str(),
            })
        });
        let result = self.answer_infer(req, timeout, method, trace.as_ref()).await;
        if let Some(trace) = trace {
            let code = result.as_ref().err().map_or(0, |e| e.code() as i32);
            let message = result.as_ref().err().map(ToString::to_string);
            trace.finish(Outcome::Grpc {
                code,
                error: message.as_deref(),
            });
        }
        result
    }

    async fn answer_infer(
        &self,
        req: pb::ModelInferRequest,
        timeout: Option<Duration>,
        method: GrpcMethod,
        trace: Option<&RequestTrace>,
    ) -> Result<pb::ModelInferResponse, GrpcError> {
        let named = Named {
            name: &req.model_name,
            version: &req.model_version,
        };
        let version = self.resolve(&named)?;
        let call = parse_infer(req, version.limits())?;
        let options = InferOptions {
            timeout,
            priority: call.priority,
            route: method.into(),
            trace: trace.cloned(),
        };
        let answer = self.engine.infer(version, call.input, options).await?;
        let _answering = trace.map(RequestTrace::answer);
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
        self.engine.load_model(&req.model_name).await?;
        Ok(pb::RepositoryModelLoadResponse {})
    }

    /// Unloads a model once its accepted requests are answered: `explicit`
    /// mode only.
    pub async fn repository_unload(
        &self,
        req: pb::RepositoryModelUnloadRequest,
    ) -> Result<pb::RepositoryModelUnloadResponse, GrpcError> {
        self.engine.unload_model(&req.model_name).await?;
        Ok(pb::RepositoryModelUnloadResponse {})
    }
}

/// The trace context a call's metadata carries (`traceparent`,
/// `tracestate`); `None` when tracing is off (nothing is read).
pub fn trace_parent(metadata: &tonic::metadata::MetadataMap) -> Option<Parent> {
    telemetry::incoming(|name| metadata.get(name).and_then(|v| v.to_str().ok()))
}

/// A tensor of the metadata.
fn metadata_tensor(t: &TensorInfo) -> TensorMetadata {
    TensorMetadata {
        name: t.name.to_string(),
        datatype: t.datatype.to_string(),
        shape: t.shape().to_vec(),
    }
}

/// Triton's model metadata for `version`.
pub fn metadata(version: &ServedVersion) -> pb::ModelMetadataResponse {
    let m = oip::metadata(version.description());
    pb::ModelMetadataResponse {
        name: m.name.to_string(),
        versions: m.versions,
        platform: m.platform.to_string(),
        inputs: m.inputs.iter().map(metadata_tensor).collect(),
        outputs: m.outputs.iter().map(metadata_tensor).collect(),
    }
}

/// Triton's model configuration: batching on, up to the row limit.
pub fn config(version: &ServedVersion) -> pb::ModelConfig {
    let c = oip::config(version);
    let fp32 = pb::DataType::TypeFp32 as i32;
    pb::ModelConfig {
        name: c.name.to_string(),
        platform: c.platform.to_string(),
        backend: c.backend.to_string(),
        version_policy: Some(pb::ModelVersionPolicy {
            policy_choice: Some(PolicyChoice::Latest(Latest {
                num_versions: c.latest_versions,
            })),
        }),
        max_batch_size: i32::try_from(c.max_batch_size).unwrap_or(i32::MAX),
        input: c
            .inputs
            .iter()
            .map(|t| pb::ModelInput {
                name: t.name.to_string(),
                data_type: fp32,
                dims: vec![t.width as i64],
                ..Default::default()
            })
            .collect(),
        output: c
            .outputs
            .iter()
            .map(|t| pb::ModelOutput {
                name: t.name.to_string(),
                data_type: fp32,
                dims: vec![t.width as i64],
            })
            .collect(),
        scheduling_choice: Some(model_config::SchedulingChoice::DynamicBatching(
            pb::ModelDynamicBatching::default(),
        )),
        model_transaction_policy: Some(pb::ModelTransactionPolicy { decoupled: false }),
    }
}

/// The statistics extension's counters of `version` (the same as HTTP's
/// `/stats`, from the protocol core).
pub fn statistics(version: &ServedVersion) -> pb::ModelStatistics {
    let s = oip::statistics(version);
    let d = |(count, ns): (u64, u64)| Some(pb::StatisticDuration { count, ns });
    let c = &s.counts;
    pb::ModelStatistics {
        name: s.name,
        version: s.version,
        last_inference: s.counts.last_inference_ms,
        inference_count: s.counts.inference_count,
        execution_count: s.counts.execution_count,
        // By name, from the same counters HTTP renders through
        // `ModelStatistics::durations` (no cache: its counts are zero).
        inference_stats: Some(pb::InferStatistics {
            success: d(c.success),
            fail: d(c.fail),
            queue: d(c.queue),
            compute_input: d(c.compute_input()),
            compute_infer: d(c.compute_infer),
            compute_output: d(c.compute_output()),
            cache_hit: d((0, 0)),
            cache_miss: d((0, 0)),
        }),
        batch_stats: Vec::new(),
    }
}
