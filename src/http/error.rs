//! The one place where engine errors become HTTP responses.
//!
//! Owns: status codes, the JSON error body `{"error": "...", "type": "..."}`
//! and error headers (`Retry-After`). Must not touch: deciding *whether*
//! something is an error; that happens where it is detected.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};

use crate::error::{RequestError, ServeError};
use crate::labels::FailureReason;
use crate::repository::RepositoryError;

// An error response carries its `FailureReason` in its extensions, so the
// metrics middleware counts the failure without parsing the body.

impl ServeError {
    /// The connection must not carry another request after this answer: the
    /// rest of a stalled, refused or ambiguously framed body may still
    /// arrive, and must never be read as the next request.
    fn closes_connection(&self) -> bool {
        matches!(
            self,
            ServeError::BodyTimeout { .. }
                | ServeError::BodyTooLarge { .. }
                | ServeError::HeadersTooLarge { .. }
                | ServeError::AmbiguousLength
                | ServeError::BodyIncomplete { .. }
        )
    }
}

impl ResponseError for ServeError {
    fn status_code(&self) -> StatusCode {
        match self {
            ServeError::Request(RequestError::TooManyRows { .. }) | ServeError::BodyTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ServeError::Request(_) | ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServeError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ServeError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ServeError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ServeError::AmbiguousLength | ServeError::BodyIncomplete { .. } => StatusCode::BAD_REQUEST,
            ServeError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ServeError::NotReady(_) | ServeError::ModelNotReady { .. } | ServeError::AnswersHeld { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ServeError::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
            ServeError::NotFound(_) | ServeError::UnknownModel { .. } => StatusCode::NOT_FOUND,
            ServeError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ServeError::Backend(_) | ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ServeError::Forbidden(_) => StatusCode::FORBIDDEN,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let body = serde_json::json!({ "error": self.to_string(), "type": self.reason().as_str() });
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ServeError::Overloaded { retry_after_secs, .. } => {
                response.insert_header((header::RETRY_AFTER, HeaderValue::from(*retry_after_secs)));
            }
            ServeError::NotReady(_) | ServeError::ModelNotReady { .. } | ServeError::AnswersHeld { .. } => {
                response.insert_header((header::RETRY_AFTER, HeaderValue::from(1u64)));
            }
            // The rest of a stalled or refused body may still arrive: never
            // read it as the next request.
            _ if self.closes_connection() => {
                response.force_close();
            }
            _ => {}
        }
        let mut response = response.json(body);
        response.extensions_mut().insert(self.reason());
        response
    }
}

/// An error on the Open Inference Protocol (`/v2`) routes: the body is the
/// protocol's `{"error": "..."}` and the status is the one Triton uses for
/// the same condition (its `HttpCodeFromError`: invalid argument 400, not
/// found 404, unavailable 503, internal 500). Queue-full and deadline are
/// "unavailable" there, so 503 rather than `/infer`'s 429 and 504.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum V2Error {
    #[error("{0}")]
    Serve(#[from] ServeError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Repository(#[from] RepositoryError),
}

impl From<RequestError> for V2Error {
    fn from(e: RequestError) -> V2Error {
        V2Error::Serve(ServeError::Request(e))
    }
}

impl V2Error {
    fn reason(&self) -> FailureReason {
        match self {
            V2Error::Serve(e) => e.reason(),
            V2Error::NotFound(_) => FailureReason::NotFound,
            V2Error::Repository(e) => match e {
                RepositoryError::UnknownModel { .. } => FailureReason::NotFound,
                RepositoryError::NotAllowed(_) | RepositoryError::Draining => FailureReason::NotReady,
                RepositoryError::LoadFailed { .. } => FailureReason::Invalid,
                RepositoryError::Unreadable(_) => FailureReason::Internal,
            },
        }
    }
}

impl ResponseError for V2Error {
    fn status_code(&self) -> StatusCode {
        match self {
            V2Error::NotFound(_) => StatusCode::NOT_FOUND,
            // Triton's codes: NOT_FOUND, UNAVAILABLE, INVALID_ARG, INTERNAL.
            V2Error::Repository(e) => match e {
                RepositoryError::UnknownModel { .. } => StatusCode::NOT_FOUND,
                RepositoryError::NotAllowed(_) | RepositoryError::Draining => StatusCode::SERVICE_UNAVAILABLE,
                RepositoryError::LoadFailed { .. } => StatusCode::BAD_REQUEST,
                RepositoryError::Unreadable(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            V2Error::Serve(e) => match e {
                ServeError::Request(_) | ServeError::BadRequest(_) | ServeError::BodyTooLarge { .. } => {
                    StatusCode::BAD_REQUEST
                }
                // Browser-form types are refused as on every route; 415 says why.
                ServeError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ServeError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
                ServeError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                ServeError::AmbiguousLength | ServeError::BodyIncomplete { .. } => StatusCode::BAD_REQUEST,
                ServeError::Overloaded { .. }
                | ServeError::AnswersHeld { .. }
                | ServeError::NotReady(_)
                | ServeError::ModelNotReady { .. }
                | ServeError::DeadlineExceeded { .. } => StatusCode::SERVICE_UNAVAILABLE,
                ServeError::NotFound(_) | ServeError::UnknownModel { .. } => StatusCode::NOT_FOUND,
                ServeError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
                ServeError::Backend(_) | ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
                // Not Triton's (it has no such rule), but what the refusal is.
                ServeError::Forbidden(_) => StatusCode::FORBIDDEN,
            },
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            V2Error::Serve(ServeError::Overloaded { retry_after_secs, .. }) => {
                response.insert_header((header::RETRY_AFTER, HeaderValue::from(*retry_after_secs)));
            }
            V2Error::Serve(ServeError::AnswersHeld { .. }) => {
                response.insert_header((header::RETRY_AFTER, HeaderValue::from(1u64)));
            }
            V2Error::Serve(e) if e.closes_connection() => {
                response.force_close();
            }
            _ => {}
        }
        let mut response = response.json(serde_json::json!({ "error": self.to_string() }));
        response.extensions_mut().insert(self.reason());
        response
    }
}
