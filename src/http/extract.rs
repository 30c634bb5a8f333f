//! Request checks that come before parsing: content type, body size, and the
//! per-request deadline header.
//!
//! Owns: reading a body under a byte limit (rejecting on `Content-Length`
//! before reading anything) and the `X-Request-Timeout-Ms` rule. Must not
//! touch: the body's meaning (see `api.rs`).

use std::time::Duration;

use actix_web::HttpRequest;
use actix_web::http::header;
use actix_web::web::{self, BytesMut};
use futures_util::StreamExt;

use crate::error::ServeError;

/// Header that sets one request's deadline, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-request-timeout-ms";
/// Longest deadline a client may ask for.
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// Requires `Content-Type: application/json` (parameters such as `charset`
/// allowed), as the old sidecar's JSON extractor did.
pub fn require_json(req: &HttpRequest) -> Result<(), ServeError> {
    let found = req
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("<non-ASCII>"));
    let essence = found.map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some("application/json") => Ok(()),
        _ => Err(ServeError::UnsupportedMediaType {
            found: found.unwrap_or("<none>").to_string(),
        }),
    }
}

/// The request's timeout: `X-Request-Timeout-Ms`, or `default`.
pub fn request_timeout(req: &HttpRequest, default: Duration) -> Result<Duration, ServeError> {
    let Some(value) = req.headers().get(TIMEOUT_HEADER) else {
        return Ok(default);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| (1..=MAX_TIMEOUT_MS).contains(ms))
        .map(Duration::from_millis)
        .ok_or_else(|| {
            ServeError::BadRequest(format!(
                "X-Request-Timeout-Ms must be a whole number of milliseconds from 1 to {MAX_TIMEOUT_MS}"
            ))
        })
}

/// Reads the whole body, at most `limit` bytes. A declared `Content-Length`
/// over the limit is rejected before a byte of the body is read.
pub async fn read_body(req: &HttpRequest, mut payload: web::Payload, limit: usize) -> Result<BytesMut, ServeError> {
    let declared = match req.headers().get(header::CONTENT_LENGTH) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .ok_or_else(|| ServeError::BadRequest("Content-Length is not a number".into()))?,
        ),
        None => None,
    };
    if declared.is_some_and(|n| n > limit) {
        return Err(ServeError::BodyTooLarge { limit });
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(8 * 1024).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ServeError::BadRequest(format!("could not read the request body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ServeError::BodyTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
