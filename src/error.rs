//! The engine's typed errors.
//!
//! Owns: [`ServeError`], everything that can go wrong with one request, and
//! its stable machine-readable `kind` (also the `reason` label of the failure
//! metric). The mapping to HTTP status lives in exactly one place,
//! `http/error.rs`. Model-loading errors are [`crate::model::error::ModelError`];
//! start-up configuration errors are [`crate::config::ConfigError`].

use crate::api::RequestError;

pub use crate::model::error::ModelError;

/// Why a request did not get an answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Request(#[from] RequestError),
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("unsupported content type {found:?}: send `Content-Type: application/json`")]
    UnsupportedMediaType { found: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("queue is full ({queued_rows} rows queued, limit {limit}); retry after {retry_after_secs} s")]
    Overloaded {
        queued_rows: usize,
        limit: usize,
        retry_after_secs: u64,
    },
    #[error("server is not ready: {0}")]
    NotReady(&'static str),
    #[error("deadline of {timeout_ms} ms passed before the request was computed")]
    DeadlineExceeded { timeout_ms: u64 },
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    /// Stable failure kind: the JSON body's `type` and the metrics' `reason`.
    pub fn kind(&self) -> &'static str {
        match self {
            ServeError::Request(RequestError::TooManyRows { .. }) | ServeError::BodyTooLarge { .. } => "too_large",
            ServeError::Request(_) | ServeError::BadRequest(_) => "invalid",
            ServeError::UnsupportedMediaType { .. } => "unsupported_media_type",
            ServeError::Overloaded { .. } => "overloaded",
            ServeError::NotReady(_) => "not_ready",
            ServeError::DeadlineExceeded { .. } => "timeout",
            ServeError::NotFound(_) => "not_found",
            ServeError::MethodNotAllowed { .. } => "method_not_allowed",
            ServeError::Internal(_) => "internal",
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("failed to load the model: {0}")]
    Model(#[from] ModelError),
    #[error("failed to start the backend: {0}")]
    Backend(#[from] crate::backend::BackendError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
