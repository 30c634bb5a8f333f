//! Request checks that come before parsing: content type, body size, and the
//! per-request deadline header.
//!
//! Owns: reading a body under a byte limit and a time limit (rejecting on
//! `Content-Length` before reading anything), the browser-form content-type
//! rule, and the `X-Request-Timeout-Ms` rule. Must not touch: the body's
//! meaning (see `sidecar_json.rs`, `v2/request.rs`).

use std::time::Duration;

use actix_web::HttpRequest;
use actix_web::http::Method;
use actix_web::http::header::{self, HeaderMap};
use actix_web::web::{self, BytesMut};
use futures_util::StreamExt;

use crate::http::error::HttpError;

/// Header that sets one request's deadline, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-request-timeout-ms";
/// Longest deadline a client may ask for.
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// Requires `Content-Type: application/json` (parameters such as `charset`
/// allowed), as the old sidecar's JSON extractor did.
pub fn require_json(req: &HttpRequest) -> Result<(), HttpError> {
    let found = req
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("<non-ASCII>"));
    let essence = found.map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some("application/json") => Ok(()),
        _ => Err(HttpError::UnsupportedMediaType {
            found: found.unwrap_or("<none>").to_string(),
        }),
    }
}

/// Header `name` as a whole number in `range`: `None` when absent,
/// `Some(Err(()))` when present but not such a number.
pub fn numeric_header(
    headers: &HeaderMap,
    name: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Option<Result<u64, ()>> {
    let value = headers.get(name)?;
    let number = value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok());
    Some(number.filter(|n| range.contains(n)).ok_or(()))
}

/// The request's own timeout, `X-Request-Timeout-Ms` (`None`: the
/// engine's default for its priority level).
pub fn request_timeout(req: &HttpRequest) -> Result<Option<Duration>, HttpError> {
    match numeric_header(req.headers(), TIMEOUT_HEADER, 1..=MAX_TIMEOUT_MS) {
        None => Ok(None),
        Some(Ok(ms)) => Ok(Some(Duration::from_millis(ms))),
        Some(Err(())) => Err(HttpError::BadRequest(format!(
            "X-Request-Timeout-Ms must be a whole number of milliseconds from 1 to {MAX_TIMEOUT_MS}"
        ))),
    }
}

/// `/infer`'s priority header (1 is the highest level).
pub const PRIORITY_HEADER: &str = "x-request-priority";

/// The priority level `/infer` asks for: `X-Request-Priority`, 0 when
/// absent (the default level; so is a level past
/// `batching.priority_levels`, Triton's rule).
pub fn request_priority(req: &HttpRequest) -> Result<u64, HttpError> {
    match numeric_header(req.headers(), PRIORITY_HEADER, 0..=u64::from(u32::MAX)) {
        None => Ok(0),
        Some(Ok(level)) => Ok(level),
        Some(Err(())) => Err(HttpError::BadRequest(format!(
            "X-Request-Priority must be a whole number from 0 to {} (1 is the highest level; 0: the default)",
            u32::MAX
        ))),
    }
}

/// Content types a browser page may POST cross-site without a CORS
/// preflight. The engine listens on loopback, where any page the host's user
/// opens could reach it, so a POST carrying one of them is refused on every
/// route before its body is read.
const BROWSER_FORM_TYPES: [&str; 3] = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"];

/// `Err(415)` for a POST whose content type a browser form could send.
pub fn reject_browser_forms(method: &Method, headers: &HeaderMap) -> Result<(), HttpError> {
    if method != Method::POST {
        return Ok(());
    }
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or("");
    let essence = text.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if BROWSER_FORM_TYPES.contains(&essence.as_str()) {
        return Err(HttpError::UnsupportedMediaType {
            found: text.chars().take(100).collect(),
        });
    }
    Ok(())
}

/// `Err` for a request whose head is larger than `max_header_bytes` (431),
/// or whose body length is ambiguous: both `Content-Length` and
/// `Transfer-Encoding` (RFC 9112 6.1: a request could be smuggled in the
/// part of the body one reading ignores). Both close the connection.
pub fn check_head(headers: &HeaderMap, max_header_bytes: usize) -> Result<(), HttpError> {
    if headers.contains_key(header::CONTENT_LENGTH) && headers.contains_key(header::TRANSFER_ENCODING) {
        return Err(HttpError::AmbiguousLength);
    }
    let size: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if size > max_header_bytes {
        return Err(HttpError::HeadersTooLarge {
            limit: max_header_bytes,
        });
    }
    Ok(())
}

/// The declared `Content-Length`, or `Err(400)` when it is not a number.
pub fn declared_length(headers: &HeaderMap) -> Result<Option<usize>, HttpError> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .map(Some)
            .ok_or_else(|| HttpError::BadRequest("Content-Length is not a number".into())),
    }
}

/// `Err(413)` when the declared length is over `limit`.
pub fn check_declared_length(headers: &HeaderMap, limit: usize) -> Result<(), HttpError> {
    match declared_length(headers)? {
        Some(n) if n > limit => Err(HttpError::BodyTooLarge { limit }),
        _ => Ok(()),
    }
}

/// The first buffer reserved for a body: bodies grow as their bytes arrive,
/// never to a size a client declared before sending it.
const FIRST_BODY_BUFFER: usize = 64 * 1024;

/// Most bytes of a refused body read and thrown away before the 413 is
/// sent. A client such as Python's `http.client` sends its whole body before
/// it reads an answer: closing on it mid-upload leaves it a broken pipe, not
/// the 413. Past this (or past the body timeout) the connection is closed.
const MAX_DRAIN_BYTES: usize = 64 * 1024 * 1024;

/// Reads the whole body, at most `limit` bytes, within `timeout` of the
/// call. A declared `Content-Length` over the limit is refused before a byte
/// of the body is stored; a body that has not arrived in time gets 408. Both
/// close the connection (the rest of such a body is never read as a request).
pub async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    timeout: Duration,
) -> Result<BytesMut, HttpError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let declared = declared_length(req.headers())?;
    if declared.is_some_and(|n| n > limit) {
        drain(&mut payload, deadline).await;
        return Err(HttpError::BodyTooLarge { limit });
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(FIRST_BODY_BUFFER).min(FIRST_BODY_BUFFER));
    loop {
        let chunk = match tokio::time::timeout_at(deadline, payload.next()).await {
            Err(_elapsed) => {
                return Err(HttpError::BodyTimeout {
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            Ok(None) if declared.is_some_and(|n| n != body.len()) => {
                // The client closed its side before the declared length
                // arrived: a cut-short body is never computed.
                return Err(HttpError::BodyIncomplete {
                    declared: declared.unwrap_or(0),
                    received: body.len(),
                });
            }
            Ok(None) => return Ok(body),
            Ok(Some(chunk)) => {
                chunk.map_err(|e| HttpError::BadRequest(format!("could not read the request body: {e}")))?
            }
        };
        if body.len() + chunk.len() > limit {
            drop(body);
            drain(&mut payload, deadline).await;
            return Err(HttpError::BodyTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
}

/// Reads and discards the rest of a refused body, up to [`MAX_DRAIN_BYTES`]
/// or `deadline`, so the client gets to read the refusal.
async fn drain(payload: &mut web::Payload, deadline: tokio::time::Instant) {
    let mut drained = 0usize;
    while drained <= MAX_DRAIN_BYTES {
        match tokio::time::timeout_at(deadline, payload.next()).await {
            Ok(Some(Ok(chunk))) => drained += chunk.len(),
            _ => return,
        }
    }
}
