//! The engine's typed errors.
//!
//! Owns: [`ServeError`], everything that can go wrong with one request, and
//! its [`FailureReason`] (the JSON body's `type` and the failure metric's
//! `reason`); [`StartError`], why the server could not start. The mapping to
//! a protocol's status lives in exactly one place per protocol
//! (`http/error.rs`). Model-loading errors are [`ModelError`]; configuration
//! errors are [`crate::config::ConfigError`].

use crate::backend::BackendError;
use crate::labels::FailureReason;

pub use crate::input::RequestError;
pub use crate::model::error::ModelError;

/// Why a request did not get an answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Request(#[from] RequestError),
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body did not arrive within {timeout_ms} ms")]
    BodyTimeout { timeout_ms: u64 },
    #[error("the request's headers are larger than the limit of {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("the request has both Content-Length and Transfer-Encoding: its body length is ambiguous")]
    AmbiguousLength,
    #[error("the request body ended after {received} of its declared {declared} bytes")]
    BodyIncomplete { declared: usize, received: usize },
    #[error(
        "unsupported content type {found:?}: send `Content-Type: application/json` (or, on /v2, `application/octet-stream` for binary tensors)"
    )]
    UnsupportedMediaType { found: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("queue is full ({queued_rows} rows queued, limit {limit}); retry after {retry_after_secs} s")]
    Overloaded {
        queued_rows: usize,
        limit: usize,
        retry_after_secs: u64,
    },
    /// Answers already computed for clients that do not take them hold the
    /// whole `server.max_pending_answer_bytes`: nothing more is computed.
    #[error(
        "answers waiting for their clients hold {held} bytes, the limit is {limit} \
         (server.max_pending_answer_bytes); retry later"
    )]
    AnswersHeld { held: usize, limit: usize },
    #[error("server is not ready: {0}")]
    NotReady(&'static str),
    #[error("deadline of {timeout_ms} ms passed before the request was computed")]
    DeadlineExceeded { timeout_ms: u64 },
    #[error("no route for {0}")]
    NotFound(String),
    /// The model (or that version of it) is not in the repository.
    #[error("Request for unknown model: '{model}'{} is not found", version_text(*version))]
    UnknownModel { model: String, version: Option<u64> },
    /// The model is known but serves no version now (unloaded, or every
    /// load failed), or the version asked for is not the one served.
    #[error("model '{model}' is not ready: {reason}")]
    ModelNotReady { model: String, reason: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("internal error: forward failed: {0}")]
    Backend(BackendError),
    #[error("internal error: {0}")]
    Internal(String),
    /// A request a web page made, or a DNS-rebinding `Host` (`http/browser.rs`).
    #[error("forbidden: {0}")]
    Forbidden(String),
}

impl ServeError {
    /// Why the request failed, as a fixed label.
    pub fn reason(&self) -> FailureReason {
        match self {
            ServeError::Request(RequestError::TooManyRows { .. }) | ServeError::BodyTooLarge { .. } => {
                FailureReason::TooLarge
            }
            ServeError::HeadersTooLarge { .. } => FailureReason::TooLarge,
            ServeError::Request(_)
            | ServeError::BadRequest(_)
            | ServeError::AmbiguousLength
            | ServeError::BodyIncomplete { .. } => FailureReason::Invalid,
            ServeError::UnsupportedMediaType { .. } => FailureReason::UnsupportedMediaType,
            ServeError::BodyTimeout { .. } => FailureReason::BodyTimeout,
            ServeError::Overloaded { .. } | ServeError::AnswersHeld { .. } => FailureReason::Overloaded,
            ServeError::NotReady(_) => FailureReason::NotReady,
            ServeError::DeadlineExceeded { .. } => FailureReason::Timeout,
            ServeError::NotFound(_) | ServeError::UnknownModel { .. } => FailureReason::NotFound,
            ServeError::ModelNotReady { .. } => FailureReason::NotReady,
            ServeError::MethodNotAllowed { .. } => FailureReason::MethodNotAllowed,
            ServeError::Backend(_) | ServeError::Internal(_) => FailureReason::Internal,
            ServeError::Forbidden(_) => FailureReason::Forbidden,
        }
    }
}

fn version_text(version: Option<u64>) -> String {
    version.map(|v| format!(" version {v}")).unwrap_or_default()
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("failed to load the model: {0}")]
    Model(#[from] ModelError),
    #[error("failed to start the backend: {0}")]
    Backend(#[from] BackendError),
    #[error("worker {worker} failed its warm-up forward: {error}")]
    WarmUp { worker: usize, error: BackendError },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("model repository: {0}")]
    Repository(String),
}
