//! The one place where errors become gRPC statuses.
//!
//! Owns: [`GrpcError`] (what can go wrong with a call: the engine's
//! [`EngineError`], a version that names nothing, a malformed call header,
//! an RPC this build does not serve, a repository call refused), the one
//! mapping of an [`ErrorKind`] to a status [`Code`] ([`code_of`]: the code
//! Triton uses for the same condition: INVALID_ARGUMENT for the client's
//! input, NOT_FOUND for an unknown model, UNAVAILABLE for a full queue or
//! an engine that is not ready (both retryable), DEADLINE_EXCEEDED,
//! INTERNAL), an API-key refusal's code (UNAUTHENTICATED without a usable
//! key, PERMISSION_DENIED for a key without the method's scope), and the
//! status sent. Each error's [`FailureReason`] (and an API-key refusal's
//! [`AuthFailure`](crate::labels::AuthFailure)) is counted here too, so no
//! handler forgets it. Must not touch: deciding
//! whether something is an error; HTTP's framing errors (never reach gRPC).

use tonic::{Code, Status};

use crate::auth::AuthError;
use crate::engine::RepositoryError;
use crate::error::{EngineError, ErrorKind, RequestError};
use crate::labels::{FailureReason, GrpcMethod};
use crate::metrics::Metrics;
use crate::oip::{self, UnknownVersion};

/// Why a gRPC call got no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrpcError {
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// The version asked for is not a number.
    #[error("{0}")]
    UnknownVersion(#[from] UnknownVersion),
    /// A call header that does not parse (`grpc-timeout`).
    #[error("{0}")]
    InvalidArgument(String),
    /// A repository call (index, load, unload) that could not be done.
    #[error("{0}")]
    Repository(#[from] RepositoryError),
    /// Refused by the API-key check (`auth.rs`).
    #[error("{0}")]
    Auth(#[from] AuthError),
}

impl From<RequestError> for GrpcError {
    fn from(e: RequestError) -> GrpcError {
        GrpcError::Engine(EngineError::Request(e))
    }
}

/// The status code of an error kind.
pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Unavailable | ErrorKind::ResourceExhausted => Code::Unavailable,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::Internal => Code::Internal,
    }
}

impl GrpcError {
    /// The status code for this error.
    pub fn code(&self) -> Code {
        match self {
            GrpcError::Engine(e) => code_of(e.kind()),
            GrpcError::UnknownVersion(_) => code_of(ErrorKind::NotFound),
            GrpcError::InvalidArgument(_) => code_of(ErrorKind::InvalidArgument),
            GrpcError::Repository(e) => code_of(oip::repository_kind(e)),
            GrpcError::Auth(AuthError::MissingScope { .. }) => Code::PermissionDenied,
            GrpcError::Auth(_) => Code::Unauthenticated,
        }
    }

    /// The failure metric's reason.
    pub fn reason(&self) -> FailureReason {
        match self {
            GrpcError::Engine(e) => e.reason(),
            GrpcError::UnknownVersion(_) => FailureReason::NotFound,
            GrpcError::InvalidArgument(_) => FailureReason::Invalid,
            GrpcError::Repository(e) => oip::repository_reason(e),
            GrpcError::Auth(AuthError::MissingScope { .. }) => FailureReason::Forbidden,
            GrpcError::Auth(_) => FailureReason::Unauthorized,
        }
    }

    /// The status sent for this error on `method`, counting the failure.
    pub fn into_status(self, method: GrpcMethod, metrics: &Metrics) -> Status {
        metrics.observe_failure(method, self.reason());
        if let GrpcError::Auth(e) = &self {
            metrics.observe_auth_failure(e.failure());
        }
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

    #[test]
    fn tritons_codes_for_the_same_conditions() {
        let code = |e: EngineError| GrpcError::from(e).code();
        assert_eq!(code(RequestError::Protocol("x".into()).into()), Code::InvalidArgument);
        let too_many = RequestError::TooManyRows { rows: 9, limit: 8 };
        assert_eq!(code(EngineError::Request(too_many)), Code::InvalidArgument);
        let full = EngineError::Overloaded {
            queued_rows: 1,
            limit: 1,
            retry_after_secs: 1,
        };
        assert_eq!(code(full), Code::Unavailable);
        assert_eq!(code(EngineError::NotReady("draining")), Code::Unavailable);
        assert_eq!(
            code(EngineError::DeadlineExceeded { timeout_ms: 1 }),
            Code::DeadlineExceeded
        );
        assert_eq!(code(EngineError::Internal("x".into())), Code::Internal);
        assert_eq!(GrpcError::InvalidArgument("t".into()).code(), Code::InvalidArgument);
        let metrics = Metrics::new();
        let unknown = oip::target("m", Some("x")).unwrap_err();
        let status = GrpcError::from(unknown).into_status(GrpcMethod::ModelInfer, &metrics);
        assert_eq!(
            (status.code(), status.message()),
            (Code::NotFound, "Request for unknown model: 'm' version x is not found")
        );
        assert_eq!(code_name(status.code()), "NOT_FOUND");
        let auth = |e: AuthError| GrpcError::from(e).into_status(GrpcMethod::ModelInfer, &metrics).code();
        assert_eq!(auth(AuthError::MissingKey), Code::Unauthenticated);
        assert_eq!(auth(AuthError::Malformed), Code::Unauthenticated);
        assert_eq!(auth(AuthError::UnknownKey), Code::Unauthenticated);
        let key = crate::auth::KeyId::of(&[0; 32]);
        let needed = crate::labels::Scope::Infer;
        assert_eq!(auth(AuthError::MissingScope { key, needed }), Code::PermissionDenied);
    }
}
