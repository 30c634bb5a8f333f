//! `inference.GRPCInferenceService`: one handler per RPC.
//!
//! Owns: what each RPC answers, and which API-key scope each RPC needs
//! ([`access`]: checked on the call's `authorization` metadata before
//! anything else; a stream's when it opens, before any of its messages is
//! read). Handlers only check, parse and hand over:
//! the model and inference go through the [`Served`] adapter, errors become
//! statuses in `status.rs`. RPCs the proto does not declare are answered
//! UNIMPLEMENTED by the generated server. Must not touch: the engine
//! directly, status codes, transport limits (`server.rs`).

use tonic::{Request, Response, Status, Streaming};

use super::deadline::{call_timeout, explicit_timeout};
use super::model::{self, Named, Served};
use super::pb::grpc_inference_service_server::GrpcInferenceService;
use super::pb::{self, ModelInferRequest};
use super::status::GrpcError;
use super::stream::{self, ResponseStream};
use crate::auth::Access;
use crate::labels::GrpcMethod;
use crate::oip::{EXTENSIONS, SERVER_NAME};

/// The service's state: the engine, through its adapter.
pub struct InferenceService {
    served: Served,
}

impl InferenceService {
    pub fn new(served: Served) -> InferenceService {
        InferenceService { served }
    }

    /// The API-key check for `method` on the call's metadata.
    fn authorize<T>(&self, r: &Request<T>, method: GrpcMethod) -> Result<(), Status> {
        check_call(&self.served, method, r.metadata().as_ref())
    }

    /// `result` as a response, its error as `method`'s status.
    fn answer<T>(&self, method: GrpcMethod, result: Result<T, GrpcError>) -> Result<Response<T>, Status> {
        result
            .map(Response::new)
            .map_err(|e| e.into_status(method, self.served.metrics()))
    }
}

/// The metadata that carries the API key.
const AUTHORIZATION: &str = "authorization";

/// The API-key check for a call of `method` with `headers` (HTTP/2 headers
/// or the call's metadata): one `authorization: Bearer <key>`. A refusal is
/// `method`'s status, counted. Needs only the call's head, so it can run
/// before the call's message is read.
pub(crate) fn check_call(served: &Served, method: GrpcMethod, headers: &http::HeaderMap) -> Result<(), Status> {
    let values = headers.get_all(AUTHORIZATION).into_iter().map(|v| v.as_bytes());
    match served.keys().check(values, access(method)) {
        Ok(_) => Ok(()),
        Err(e) => Err(GrpcError::from(e).into_status(method, served.metrics())),
    }
}

/// What `method` asks to do, for the API-key check (`auth.rs`). The match
/// is exhaustive: a new RPC cannot be added without choosing.
fn access(method: GrpcMethod) -> Access {
    match method {
        // The probes; `Other` never reaches a handler (UNIMPLEMENTED).
        GrpcMethod::ServerLive | GrpcMethod::ServerReady | GrpcMethod::ModelReady | GrpcMethod::Other => Access::Health,
        GrpcMethod::ServerMetadata
        | GrpcMethod::ModelMetadata
        | GrpcMethod::ModelConfig
        | GrpcMethod::ModelStatistics => Access::Metadata,
        GrpcMethod::ModelInfer | GrpcMethod::ModelStreamInfer => Access::Infer,
        GrpcMethod::RepositoryIndex | GrpcMethod::RepositoryModelLoad | GrpcMethod::RepositoryModelUnload => {
            Access::Repository
        }
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(&self, _: Request<pb::ServerLiveRequest>) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        let ready = self.served.is_ready();
        Ok(Response::new(pb::ServerReadyResponse { ready }))
    }

    async fn model_ready(&self, r: Request<pb::ModelReadyRequest>) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = r.into_inner();
        let named = Named {
            name: &r.name,
            version: &r.version,
        };
        let result = self
            .served
            .model_ready(&named)
            .map(|ready| pb::ModelReadyResponse { ready });
        self.answer(GrpcMethod::ModelReady, result)
    }

    async fn server_metadata(
        &self,
        r: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        self.authorize(&r, GrpcMethod::ServerMetadata)?;
        Ok(Response::new(pb::ServerMetadataResponse {
            name: SERVER_NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: EXTENSIONS.map(str::to_string).to_vec(),
        }))
    }

    async fn model_metadata(
        &self,
        r: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        self.authorize(&r, GrpcMethod::ModelMetadata)?;
        let r = r.into_inner();
        let named = Named {
            name: &r.name,
            version: &r.version,
        };
        let result = self.served.resolve(&named).map(|v| model::metadata(&v));
        self.answer(GrpcMethod::ModelMetadata, result)
    }

    async fn model_infer(&self, r: Request<ModelInferRequest>) -> Result<Response<pb::ModelInferResponse>, Status> {
        let method = GrpcMethod::ModelInfer;
        self.authorize(&r, method)?;
        let result = async {
            let timeout = explicit_timeout(r.metadata())?;
            let parent = model::trace_parent(r.metadata());
            self.served
                .infer(r.into_inner(), timeout, method, parent.as_ref())
                .await
        }
        .await;
        self.answer(method, result)
    }

    type ModelStreamInferStream = ResponseStream;

    async fn model_stream_infer(
        &self,
        r: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        self.authorize(&r, GrpcMethod::ModelStreamInfer)?;
        let deadline = call_timeout(r.metadata(), self.served.default_timeout)
            .map_err(|e| e.into_status(GrpcMethod::ModelStreamInfer, self.served.metrics()))?;
        let explicit = r.metadata().contains_key(super::deadline::GRPC_TIMEOUT);
        let parent = model::trace_parent(r.metadata());
        Ok(Response::new(stream::serve(
            self.served.clone(),
            r.into_inner(),
            explicit.then_some(deadline),
            parent,
        )))
    }

    async fn model_config(
        &self,
        r: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        self.authorize(&r, GrpcMethod::ModelConfig)?;
        let r = r.into_inner();
        let named = Named {
            name: &r.name,
            version: &r.version,
        };
        let result = self.served.resolve(&named).map(|v| pb::ModelConfigResponse {
            config: Some(model::config(&v)),
        });
        self.answer(GrpcMethod::ModelConfig, result)
    }

    async fn model_statistics(
        &self,
        r: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        self.authorize(&r, GrpcMethod::ModelStatistics)?;
        let r = r.into_inner();
        // An empty name asks for every model served.
        let versions = if r.name.is_empty() {
            Ok(self.served.all_served())
        } else {
            let named = Named {
                name: &r.name,
                version: &r.version,
            };
            self.served.resolve(&named).map(|v| vec![v])
        };
        let result = versions.map(|versions| pb::ModelStatisticsResponse {
            model_stats: versions.iter().map(|v| self.served.statistics(v)).collect(),
        });
        self.answer(GrpcMethod::ModelStatistics, result)
    }

    async fn repository_index(
        &self,
        r: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        self.authorize(&r, GrpcMethod::RepositoryIndex)?;
        let result = self.served.repository_index(r.into_inner()).await;
        self.answer(GrpcMethod::RepositoryIndex, result)
    }

    async fn repository_model_load(
        &self,
        r: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        self.authorize(&r, GrpcMethod::RepositoryModelLoad)?;
        let result = self.served.repository_load(r.into_inner()).await;
        self.answer(GrpcMethod::RepositoryModelLoad, result)
    }

    async fn repository_model_unload(
        &self,
        r: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        self.authorize(&r, GrpcMethod::RepositoryModelUnload)?;
        let result = self.served.repository_unload(r.into_inner()).await;
        self.answer(GrpcMethod::RepositoryModelUnload, result)
    }
}
