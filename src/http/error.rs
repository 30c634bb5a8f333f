//! The one place where errors become HTTP responses.
//!
//! Owns: [`HttpError`], what can go wrong with a request on HTTP (the
//! engine's [`EngineError`], or the transport's own refusals: framing,
//! sizes, media type, no route, method, a browser's request), and
//! [`V2Error`], the same on the Open Inference Protocol routes (plus an
//! unknown version and a repository call's failure); the one mapping of an
//! [`ErrorKind`] to a status for each protocol served over HTTP
//! ([`sidecar_status`] for `/infer` and the plain routes, [`v2_status`] for
//! `/v2`, Triton's `HttpCodeFromError`); status codes of the transport's
//! own refusals; the JSON error bodies and error headers (`Retry-After`,
//! `Connection: close`, `WWW-Authenticate`); an API-key refusal's status
//! (401 without a usable key, 403 for a key without the route's scope). Must not touch: deciding *whether* something is an
//! error; that happens where it is detected.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, HttpResponseBuilder, ResponseError};

use crate::auth::AuthError;
use crate::engine::RepositoryError;
use crate::error::{EngineError, ErrorKind, RequestError};
use crate::labels::FailureReason;
use crate::oip::{self, UnknownVersion};

// An error response carries its `FailureReason` in its extensions, so the
// metrics middleware counts the failure without parsing the body.

/// Why an HTTP request did not get an answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Engine(#[from] EngineError),
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
    /// A header or body the transport could not read.
    #[error("{0}")]
    BadRequest(String),
    /// No route for the path.
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// A request a web page made, or a DNS-rebinding `Host` (`http/browser.rs`).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Refused by the API-key check (`auth.rs`), before the body is read.
    #[error("{0}")]
    Auth(#[from] AuthError),
}

/// The realm of the `WWW-Authenticate` challenge.
pub const AUTH_REALM: &str = "tokitai-serve";

impl From<RequestError> for HttpError {
    fn from(e: RequestError) -> HttpError {
        HttpError::Engine(EngineError::Request(e))
    }
}

impl HttpError {
    /// Why the request failed, as a fixed label.
    pub fn reason(&self) -> FailureReason {
        match self {
            HttpError::Engine(e) => e.reason(),
            HttpError::BodyTooLarge { .. } | HttpError::HeadersTooLarge { .. } => FailureReason::TooLarge,
            HttpError::BadRequest(_) | HttpError::AmbiguousLength | HttpError::BodyIncomplete { .. } => {
                FailureReason::Invalid
            }
            HttpError::UnsupportedMediaType { .. } => FailureReason::UnsupportedMediaType,
            HttpError::BodyTimeout { .. } => FailureReason::BodyTimeout,
            HttpError::NotFound(_) => FailureReason::NotFound,
            HttpError::MethodNotAllowed { .. } => FailureReason::MethodNotAllowed,
            HttpError::Forbidden(_) | HttpError::Auth(AuthError::MissingScope { .. }) => FailureReason::Forbidden,
            HttpError::Auth(_) => FailureReason::Unauthorized,
        }
    }

    /// The connection must not carry another request after this answer: the
    /// rest of a stalled, refused or ambiguously framed body may still
    /// arrive, and must never be read as the next request.
    pub(crate) fn closes_connection(&self) -> bool {
        matches!(
            self,
            HttpError::BodyTimeout { .. }
                | HttpError::BodyTooLarge { .. }
                | HttpError::HeadersTooLarge { .. }
                | HttpError::AmbiguousLength
                | HttpError::BodyIncomplete { .. }
        )
    }

    /// `Retry-After` on an engine outcome worth retrying, or
    /// `Connection: close` on a refusal that leaves a body unread.
    fn headers(&self, response: &mut HttpResponseBuilder, retry_unready: bool) {
        match self {
            HttpError::Engine(EngineError::Overloaded { retry_after_secs, .. }) => {
                response.insert_header((header::RETRY_AFTER, HeaderValue::from(*retry_after_secs)));
            }
            HttpError::Engine(EngineError::AnswersHeld { .. }) => {
                response.insert_header((header::RETRY_AFTER, HeaderValue::from(1u64)));
            }
            HttpError::Engine(EngineError::NotReady(_) | EngineError::ModelNotReady { .. }) if retry_unready => {
                response.insert_header((header::RETRY_AFTER, HeaderValue::from(1u64)));
            }
            HttpError::Auth(e) => {
                response.insert_header((header::WWW_AUTHENTICATE, challenge(e)));
            }
            // The rest of a stalled or refused body may still arrive: never
            // read it as the next request.
            _ if self.closes_connection() => {
                response.force_close();
            }
            _ => {}
        }
    }
}

/// The `WWW-Authenticate` challenge of an API-key refusal (RFC 6750,
/// section 3: the error code when a key was sent).
fn challenge(e: &AuthError) -> HeaderValue {
    let realm = format!("Bearer realm=\"{AUTH_REALM}\"");
    let text = match e {
        AuthError::MissingKey => realm,
        AuthError::Malformed => format!("{realm}, error=\"invalid_request\""),
        AuthError::UnknownKey => format!("{realm}, error=\"invalid_token\""),
        AuthError::MissingScope { needed, .. } => {
            format!("{realm}, error=\"insufficient_scope\", scope=\"{needed}\"")
        }
    };
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
}

/// `/infer`'s and the plain routes' status for an error kind: the old
/// sidecar's (429 for a full queue, 504 for a deadline, 413 for too many
/// rows).
pub fn sidecar_status(kind: ErrorKind, reason: FailureReason) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument if reason == FailureReason::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `/v2`'s status for an error kind: Triton's `HttpCodeFromError`
/// (invalid argument 400, not found 404, unavailable 503, internal 500).
/// A full queue and a deadline are "unavailable" there, so 503 rather than
/// `/infer`'s 429 and 504.
pub fn v2_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Unavailable | ErrorKind::ResourceExhausted | ErrorKind::DeadlineExceeded => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl ResponseError for HttpError {
    /// An engine outcome's status is its kind's; a transport refusal's is
    /// the same on every route but for a body over the limit (413 here, 400
    /// on `/v2`, see [`V2Error`]).
    fn status_code(&self) -> StatusCode {
        match self {
            HttpError::Engine(e) => sidecar_status(e.kind(), e.reason()),
            HttpError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::BadRequest(_) | HttpError::AmbiguousLength | HttpError::BodyIncomplete { .. } => {
                StatusCode::BAD_REQUEST
            }
            HttpError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            HttpError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            HttpError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HttpError::NotFound(_) => StatusCode::NOT_FOUND,
            HttpError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            // Not Triton's (it has no such rule), but what the refusal is.
            HttpError::Forbidden(_) => StatusCode::FORBIDDEN,
            // RFC 6750: a key that is known but lacks the scope is 403; no
            // usable key is 401 (on every route, v2 included: Triton has
            // no rule of its own for either).
            HttpError::Auth(AuthError::MissingScope { .. }) => StatusCode::FORBIDDEN,
            HttpError::Auth(_) => StatusCode::UNAUTHORIZED,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let body = serde_json::json!({ "error": self.to_string(), "type": self.reason().as_str() });
        let mut response = HttpResponse::build(self.status_code());
        self.headers(&mut response, true);
        let mut response = response.json(body);
        response.extensions_mut().insert(self.reason());
        response
    }
}

/// An error on the Open Inference Protocol (`/v2`) routes: the body is the
/// protocol's `{"error": "..."}` and the status is [`v2_status`] of the
/// error's kind.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum V2Error {
    #[error("{0}")]
    Http(#[from] HttpError),
    /// The version asked for is not a number.
    #[error("{0}")]
    UnknownVersion(#[from] UnknownVersion),
    #[error("{0}")]
    Repository(#[from] RepositoryError),
}

impl From<EngineError> for V2Error {
    fn from(e: EngineError) -> V2Error {
        V2Error::Http(HttpError::Engine(e))
    }
}

impl From<RequestError> for V2Error {
    fn from(e: RequestError) -> V2Error {
        V2Error::from(EngineError::Request(e))
    }
}

impl V2Error {
    fn reason(&self) -> FailureReason {
        match self {
            V2Error::Http(e) => e.reason(),
            V2Error::UnknownVersion(_) => FailureReason::NotFound,
            V2Error::Repository(e) => oip::repository_reason(e),
        }
    }
}

impl ResponseError for V2Error {
    fn status_code(&self) -> StatusCode {
        match self {
            V2Error::Http(HttpError::Engine(e)) => v2_status(e.kind()),
            // Triton answers a body over its limit as an invalid argument.
            V2Error::Http(HttpError::BodyTooLarge { .. }) => v2_status(ErrorKind::InvalidArgument),
            V2Error::Http(e) => e.status_code(),
            V2Error::UnknownVersion(_) => v2_status(ErrorKind::NotFound),
            V2Error::Repository(e) => v2_status(oip::repository_kind(e)),
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if let V2Error::Http(e) = self {
            e.headers(&mut response, false);
        }
        let mut response = response.json(serde_json::json!({ "error": self.to_string() }));
        response.extensions_mut().insert(self.reason());
        response
    }
}
