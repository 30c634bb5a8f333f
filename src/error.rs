//! The engine's typed errors.
//!
//! Owns: [`EngineError`], every outcome of a request the engine decides
//! (the client's input, a full queue, a deadline, an unknown model, a
//! backend failure), with its Triton-like [`ErrorKind`] (the one fact each
//! protocol maps to its status, in one place per protocol: `http/error.rs`,
//! `grpc/status.rs`) and its [`FailureReason`] (the JSON body's `type` and
//! the failure metric's `reason`); [`StartError`], why the server could not
//! start. Model-loading errors are [`ModelError`]; configuration errors are
//! [`crate::config::ConfigError`]. Must not touch: transport concerns (HTTP
//! framing, routes, media types: `http/error.rs` has its own error type
//! wrapping this one; gRPC's is `grpc/status.rs`), status codes.

use crate::backend::BackendError;
use crate::labels::FailureReason;

pub use crate::input::RequestError;
pub use crate::model::error::ModelError;

/// What kind of failure an error is, in Triton's terms (its
/// `TRITONSERVER_Error_Code`, plus the two gRPC codes Triton's frontends
/// use for a full queue and a passed deadline). Each protocol maps a kind to
/// its status in exactly one function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The client's request is wrong; retrying it unchanged fails again.
    InvalidArgument,
    /// The model, version or route asked for does not exist.
    NotFound,
    /// The server or the model cannot take it now; retry later.
    Unavailable,
    /// The queue is full; retry after the time the error gives.
    ResourceExhausted,
    /// The request's deadline passed before it was computed.
    DeadlineExceeded,
    /// The server failed; not the client's fault.
    Internal,
}

/// Why a request did not get an answer: an engine outcome, whichever
/// protocol carried the request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Request(#[from] RequestError),
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
    /// The model (or that version of it) is not in the repository.
    #[error("Request for unknown model: '{model}'{} is not found", version_text(*version))]
    UnknownModel { model: String, version: Option<u64> },
    /// The model is known but serves no version now (unloaded, or every
    /// load failed), or the version asked for is not the one served.
    #[error("model '{model}' is not ready: {reason}")]
    ModelNotReady { model: String, reason: String },
    #[error("internal error: forward failed: {0}")]
    Backend(BackendError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// What kind of failure this is; each protocol's status comes from it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Request(_) => ErrorKind::InvalidArgument,
            EngineError::Overloaded { .. } => ErrorKind::ResourceExhausted,
            EngineError::AnswersHeld { .. } | EngineError::NotReady(_) | EngineError::ModelNotReady { .. } => {
                ErrorKind::Unavailable
            }
            EngineError::DeadlineExceeded { .. } => ErrorKind::DeadlineExceeded,
            EngineError::UnknownModel { .. } => ErrorKind::NotFound,
            EngineError::Backend(_) | EngineError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// Why the request failed, as a fixed label.
    pub fn reason(&self) -> FailureReason {
        match self {
            EngineError::Request(e) => e.reason(),
            EngineError::Overloaded { .. } | EngineError::AnswersHeld { .. } => FailureReason::Overloaded,
            EngineError::NotReady(_) | EngineError::ModelNotReady { .. } => FailureReason::NotReady,
            EngineError::DeadlineExceeded { .. } => FailureReason::Timeout,
            EngineError::UnknownModel { .. } => FailureReason::NotFound,
            EngineError::Backend(_) | EngineError::Internal(_) => FailureReason::Internal,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_reasons_of_engine_outcomes() {
        let too_many = EngineError::Request(RequestError::TooManyRows { rows: 9, limit: 8 });
        assert_eq!(
            (too_many.kind(), too_many.reason()),
            (ErrorKind::InvalidArgument, FailureReason::TooLarge)
        );
        let full = EngineError::Overloaded {
            queued_rows: 1,
            limit: 1,
            retry_after_secs: 1,
        };
        assert_eq!(
            (full.kind(), full.reason()),
            (ErrorKind::ResourceExhausted, FailureReason::Overloaded)
        );
        assert_eq!(EngineError::NotReady("draining").kind(), ErrorKind::Unavailable);
        let late = EngineError::DeadlineExceeded { timeout_ms: 1 };
        assert_eq!(
            (late.kind(), late.reason()),
            (ErrorKind::DeadlineExceeded, FailureReason::Timeout)
        );
        let unknown = EngineError::UnknownModel {
            model: "m".into(),
            version: Some(3),
        };
        assert_eq!(unknown.kind(), ErrorKind::NotFound);
        assert_eq!(
            unknown.to_string(),
            "Request for unknown model: 'm' version 3 is not found"
        );
        assert_eq!(EngineError::Internal("x".into()).kind(), ErrorKind::Internal);
    }
}
