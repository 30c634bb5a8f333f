//! The engine as the gRPC service sees it: the one adapter through which
//! every call reaches [`Engine`].
//!
//! Owns: which model a request names (NOT_FOUND for any other), the model's
//! metadata, configuration and statistics as Triton's messages, inference
//! through [`Engine::infer`] (the one submit path), and the repository
//! calls. When the engine serves several models (the model-repository
//! work), the selector goes in [`Served::check`] and [`Served::infer`], and
//! `repository_*` call the engine's repository functions; nothing else in
//! `grpc/` touches the engine. Must not touch: wire parsing (`request.rs`),
//! status codes (`status.rs`).

use std::sync::Arc;
use std::time::Duration;

use super::pb::model_metadata_response::TensorMetadata;
use super::pb::model_version_policy::{Latest, PolicyChoice};
use super::pb::{self, model_config};
use super::request::InferCall;
use super::response::{Answerer, infer_response};
use super::status::GrpcError;
use crate::engine::{Engine, InferOptions};
use crate::input::InputLimits;
use crate::labels::GrpcMethod;
use crate::metrics::Metrics;
use crate::oip::{self, FP32, INPUT, OutputName, PLATFORM};

/// The served engine, for the gRPC service.
#[derive(Clone)]
pub struct Served {
    engine: Engine,
    /// A call's deadline without `grpc-timeout` (`server.request_timeout_ms`).
    pub default_timeout: Duration,
}

impl Served {
    pub fn new(engine: Engine, default_timeout: Duration) -> Served {
        Served {
            engine,
            default_timeout,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.engine.metrics
    }

    pub fn limits(&self) -> &InputLimits {
        &self.engine.limits
    }

    /// Ready as HTTP's `/readyz` and `/v2/health/ready` say.
    pub fn is_ready(&self) -> bool {
        self.engine.readiness.is_ready()
    }

    pub fn version(&self) -> String {
        oip::version_of(&self.engine.description)
    }

    /// `Ok` when `name` (and `version`, unless empty) is the served model.
    pub fn check(&self, name: &str, version: &str) -> Result<(), GrpcError> {
        let served = self.version();
        let shown = |s: &str| s.chars().take(64).collect::<String>();
        if name != self.engine.description.name {
            return Err(GrpcError::NotFound(format!(
                "Request for unknown model: '{}' is not found",
                shown(name)
            )));
        }
        if !version.is_empty() && version != served {
            return Err(GrpcError::NotFound(format!(
                "Request for unknown model: '{}' version {} is not found (the served version is {served})",
                shown(name),
                shown(version)
            )));
        }
        Ok(())
    }

    /// Each output's row width.
    fn output_dims(&self) -> [(OutputName, usize); 2] {
        let d = self.engine.description.dims;
        [(OutputName::Logits, d.output), (OutputName::RouterWeights, d.experts)]
    }

    pub fn metadata(&self) -> pb::ModelMetadataResponse {
        let d = self.engine.description.dims;
        let tensor = |name: &str, width: usize| TensorMetadata {
            name: name.to_string(),
            datatype: FP32.to_string(),
            shape: vec![-1, width as i64],
        };
        pb::ModelMetadataResponse {
            name: self.engine.description.name.clone(),
            versions: vec![self.version()],
            platform: PLATFORM.to_string(),
            inputs: vec![tensor(INPUT, d.input)],
            outputs: self.output_dims().map(|(o, w)| tensor(o.as_str(), w)).to_vec(),
        }
    }

    /// Triton's model configuration: batching on, up to the row limit.
    pub fn config(&self) -> pb::ModelConfig {
        let m = &self.engine.description;
        let fp32 = pb::DataType::TypeFp32 as i32;
        pb::ModelConfig {
            name: m.name.clone(),
            platform: PLATFORM.to_string(),
            backend: m.backend.to_string(),
            version_policy: Some(pb::ModelVersionPolicy {
                policy_choice: Some(PolicyChoice::Latest(Latest { num_versions: 1 })),
            }),
            max_batch_size: i32::try_from(self.engine.limits.max_rows).unwrap_or(i32::MAX),
            input: vec![pb::ModelInput {
                name: INPUT.to_string(),
                data_type: fp32,
                dims: vec![m.dims.input as i64],
                ..Default::default()
            }],
            output: self
                .output_dims()
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

    /// The statistics extension's counters (the same as HTTP's `/stats`).
    pub fn statistics(&self) -> pb::ModelStatistics {
        let s = self.engine.stats.snapshot(self.engine.metrics.batches_total());
        let d = |(count, ns): (u64, u64)| Some(pb::StatisticDuration { count, ns });
        pb::ModelStatistics {
            name: self.engine.description.name.clone(),
            version: self.version(),
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

    /// Computes `call` within `timeout` through the engine's one submit path.
    pub async fn infer(
        &self,
        call: InferCall,
        timeout: Duration,
        method: GrpcMethod,
    ) -> Result<pb::ModelInferResponse, GrpcError> {
        let options = InferOptions {
            timeout,
            route: method.into(),
        };
        let output = self.engine.infer(call.input, options).await?;
        let version = self.version();
        let who = Answerer {
            model: &self.engine.description.name,
            version: &version,
            id: call.id,
        };
        Ok(infer_response(
            who,
            &call.outputs,
            &output,
            &self.engine.description.dims,
        ))
    }

    /// The model repository's index. Wire to the engine's `repository_index`
    /// once it has one.
    pub async fn repository_index(
        &self,
        _req: pb::RepositoryIndexRequest,
    ) -> Result<pb::RepositoryIndexResponse, GrpcError> {
        Err(GrpcError::Unimplemented(REPOSITORY_UNAVAILABLE))
    }

    /// Loads a model. Wire to the engine's `load_model` once it has one.
    pub async fn repository_load(
        &self,
        _req: pb::RepositoryModelLoadRequest,
    ) -> Result<pb::RepositoryModelLoadResponse, GrpcError> {
        Err(GrpcError::Unimplemented(REPOSITORY_UNAVAILABLE))
    }

    /// Unloads a model. Wire to the engine's `unload_model` once it has one.
    pub async fn repository_unload(
        &self,
        _req: pb::RepositoryModelUnloadRequest,
    ) -> Result<pb::RepositoryModelUnloadResponse, GrpcError> {
        Err(GrpcError::Unimplemented(REPOSITORY_UNAVAILABLE))
    }
}

const REPOSITORY_UNAVAILABLE: &str = "model repository control is not available: this server serves one model";
