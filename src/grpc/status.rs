//! The one place where engine errors become gRPC statuses.
//!
//! Owns: [`GrpcError`] (what can go wrong with a call: the engine's
//! [`ServeError`], an unknown model, an RPC this build does not serve, a
//! repository call refused) and
//! its mapping to a [`tonic::Status`] with the code Triton uses for the same
//! condition: INVALID_ARGUMENT for the client's input, NOT_FOUND for an
//! unknown model, UNAVAILABLE for a full queue or an engine that is not
//! ready (both retryable), DEADLINE_EXCEEDED, INTERNAL. Each error's
//! [`FailureReason`] is counted here too, so no handler forgets it. Must not
//! touch: deciding whether something is an error.

use tonic::{Code, Status};

use crate::error::ServeError;
use crate::labels::{FailureReason, GrpcMethod};
use crate::metrics::Metrics;
use crate::repository::RepositoryError;

/// Why a gRPC call got no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrpcError {
    #[error("{0}")]
    Serve(#[from] ServeError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unimplemented(&'static str),
    /// A repository call (index, load, unload) that could not be done.
    #[error("{0}")]
    Repository(#[from] RepositoryError),
}

impl GrpcError {
    /// The status code for this error.
    pub fn code(&self) -> Code {
        match self {
            GrpcError::NotFound(_) => Code::NotFound,
            GrpcError::Unimplemented(_) => Code::Unimplemented,
            GrpcError::Repository(e) => match e {
                RepositoryError::UnknownModel { .. } => Code::NotFound,
                RepositoryError::NotAllowed(_) | RepositoryError::Draining => Code::Unavailable,
                RepositoryError::LoadFailed { .. } => Code::InvalidArgument,
                RepositoryError::Unreadable(_) => Code::Internal,
            },
            GrpcError::Serve(e) => match e {
                ServeError::Request(_)
                | ServeError::BadRequest(_)
                | ServeError::BodyTooLarge { .. }
                | ServeError::HeadersTooLarge { .. }
                | ServeError::UnsupportedMediaType { .. }
                | ServeError::AmbiguousLength
                | ServeError::BodyIncomplete { .. } => Code::InvalidArgument,
                ServeError::Overloaded { .. } | ServeError::AnswersHeld { .. } | ServeError::NotReady(_) => {
                    Code::Unavailable
                }
                ServeError::DeadlineExceeded { .. } | ServeError::BodyTimeout { .. } => Code::DeadlineExceeded,
                ServeError::NotFound(_) | ServeError::UnknownModel { .. } => Code::NotFound,
                ServeError::ModelNotReady { .. } => Code::Unavailable,
                ServeError::MethodNotAllowed { .. } => Code::Unimplemented,
                ServeError::Backend(_) | ServeError::Internal(_) => Code::Internal,
                ServeError::Forbidden(_) => Code::PermissionDenied,
            },
        }
    }

    /// The failure metric's reason.
    pub fn reason(&self) -> FailureReason {
        match self {
            GrpcError::Serve(e) => e.reason(),
            GrpcError::NotFound(_) => FailureReason::NotFound,
            GrpcError::Unimplemented(_) => FailureReason::MethodNotAllowed,
            GrpcError::Repository(RepositoryError::UnknownModel { .. }) => FailureReason::NotFound,
            GrpcError::Repository(RepositoryError::LoadFailed { .. }) => FailureReason::Invalid,
            GrpcError::Repository(_) => FailureReason::NotReady,
        }
    }

    /// The status sent for this error on `method`, counting the failure.
    pub fn into_status(self, method: GrpcMethod, metrics: &Metrics) -> Status {
        metrics.observe_failure(method, self.reason());
        Status::new(self.code(), self.to_string())
    }
}

/// The name of a status code as the metrics label it (`OK`, `NOT_FOUND`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::RequestError;

    #[test]
    fn tritons_codes_for_the_same_conditions() {
        let code = |e: ServeError| GrpcError::from(e).code();
        assert_eq!(code(ServeError::BadRequest("x".into())), Code::InvalidArgument);
        let too_many = RequestError::TooManyRows { rows: 9, limit: 8 };
        assert_eq!(code(ServeError::Request(too_many)), Code::InvalidArgument);
        let full = ServeError::Overloaded {
            queued_rows: 1,
            limit: 1,
            retry_after_secs: 1,
        };
        assert_eq!(code(full), Code::Unavailable);
        assert_eq!(code(ServeError::NotReady("draining")), Code::Unavailable);
        assert_eq!(
            code(ServeError::DeadlineExceeded { timeout_ms: 1 }),
            Code::DeadlineExceeded
        );
        assert_eq!(code(ServeError::Internal("x".into())), Code::Internal);
        assert_eq!(GrpcError::NotFound("m".into()).code(), Code::NotFound);
        assert_eq!(GrpcError::Unimplemented("x").code(), Code::Unimplemented);
        let metrics = Metrics::new();
        let status = GrpcError::NotFound("no model".into()).into_status(GrpcMethod::ModelInfer, &metrics);
        assert_eq!((status.code(), status.message()), (Code::NotFound, "no model"));
        assert_eq!(code_name(status.code()), "NOT_FOUND");
    }
}
