//! A call's deadline: the client's `grpc-timeout`, else the server's
//! default (`server.request_timeout_ms`).
//!
//! Owns: parsing `grpc-timeout` (1 to 8 digits and a unit: `H` hours, `M`
//! minutes, `S` seconds, `m` ms, `u` µs, `n` ns) and the cap on it. The
//! handler hands the result to the engine as the request's timeout, so rows
//! still queued when the client's deadline passes are dropped and the call
//! gets DEADLINE_EXCEEDED. Must not touch: timers (the batcher enforces it).

use std::time::Duration;

use tonic::metadata::MetadataMap;

use super::status::GrpcError;

/// The header gRPC clients send their deadline in.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";
/// Longest deadline honoured; a longer one is cut to this.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The call's timeout: its `grpc-timeout` (capped at [`MAX_TIMEOUT`]), or
/// `default` without one. A malformed value is the client's error.
pub fn call_timeout(metadata: &MetadataMap, default: Duration) -> Result<Duration, GrpcError> {
    Ok(explicit_timeout(metadata)?.unwrap_or(default))
}

/// The call's own timeout: its `grpc-timeout` (capped at [`MAX_TIMEOUT`]),
/// `None` without one. A malformed value is the client's error.
pub fn explicit_timeout(metadata: &MetadataMap) -> Result<Option<Duration>, GrpcError> {
    let Some(value) = metadata.get(GRPC_TIMEOUT) else {
        return Ok(None);
    };
    let parsed = value.to_str().ok().and_then(parse_grpc_timeout);
    match parsed {
        Some(t) => Ok(Some(t.min(MAX_TIMEOUT))),
        None => Err(GrpcError::InvalidArgument(
            "grpc-timeout must be 1 to 8 digits followed by H, M, S, m, u or n".into(),
        )),
    }
}

/// `grpc-timeout`'s value as a duration, or `None` when malformed.
pub fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    let (unit, digits) = text.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_rejects_the_rest() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_grpc_timeout("0n"), Some(Duration::ZERO));
        for bad in ["", "m", "123456789m", "1x", "-1S", "1.5S", "１S", "1é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn missing_is_the_default_and_long_ones_are_capped() {
        let default = Duration::from_secs(30);
        let mut m = MetadataMap::new();
        assert_eq!(call_timeout(&m, default), Ok(default));
        m.insert(GRPC_TIMEOUT, "20m".parse().unwrap());
        assert_eq!(call_timeout(&m, default), Ok(Duration::from_millis(20)));
        m.insert(GRPC_TIMEOUT, "99999999H".parse().unwrap());
        assert_eq!(call_timeout(&m, default), Ok(MAX_TIMEOUT));
        m.insert(GRPC_TIMEOUT, "soon".parse().unwrap());
        assert!(call_timeout(&m, default).is_err());
    }
}
