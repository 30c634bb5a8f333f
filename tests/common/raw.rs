//! HTTP over a bare `TcpStream`, for what ureq cannot send (broken framing,
//! huge declared bodies, a client that gives up) or cannot tell apart (a
//! request that failed before any response byte versus a truncated
//! response).
//!
//! Owns: building raw requests ([`raw_request`], [`raw_json_request`]), one
//! exchange ([`raw_exchange`]) and what came of it ([`RawOutcome`]), reading
//! and parsing one response with its `Content-Length` or chunked framing
//! ([`read_response`]), and abandoned connections ([`send_and_abandon`]).
//! Every connect and read here is bounded by a timeout.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use super::http::Reply;

/// What came back on a raw connection.
#[derive(Debug)]
pub enum RawOutcome {
    /// A complete response (headers and a body of the announced length).
    Response(Reply),
    /// Not one response byte arrived (refused, reset or closed first).
    NoResponse(String),
    /// Some response bytes arrived but not a complete response.
    Partial { bytes: Vec<u8>, error: String },
}

impl RawOutcome {
    pub fn expect_response(self, context: &str) -> Reply {
        match self {
            RawOutcome::Response(r) => r,
            other => panic!("{context}: no complete response: {other:?}"),
        }
    }
}

/// Builds a request with `Connection: close` and a `Content-Length`.
pub fn raw_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding"))
    {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// [`raw_request`] with `Content-Type: application/json`.
pub fn raw_json_request(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    raw_request(method, path, &[("Content-Type", "application/json")], body)
}

/// Connects, writes `request` (write errors are tolerated: the server may
/// answer and close before reading everything), and reads one response.
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawOutcome {
    let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => return RawOutcome::NoResponse(format!("connect: {e}")),
    };
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let write_error = stream.write_all(request).err();
    read_response(&mut stream, write_error.map(|e| format!("write: {e}")))
}

/// Reads one HTTP/1.1 response from `stream`.
pub fn read_response(stream: &mut impl Read, write_error: Option<String>) -> RawOutcome {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(reply) = parse_response(&buf) {
            return RawOutcome::Response(reply);
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                let error = format!(
                    "read: {e}{}",
                    write_error.map(|w| format!(" (after {w})")).unwrap_or_default()
                );
                return if buf.is_empty() {
                    RawOutcome::NoResponse(error)
                } else {
                    RawOutcome::Partial { bytes: buf, error }
                };
            }
        }
    }
    match parse_response(&buf) {
        Some(reply) => RawOutcome::Response(reply),
        None if buf.is_empty() => RawOutcome::NoResponse(format!(
            "closed{}",
            write_error.map(|w| format!(" (after {w})")).unwrap_or_default()
        )),
        None => RawOutcome::Partial {
            bytes: buf,
            error: "closed mid-response".into(),
        },
    }
}

/// A complete response at the start of `buf`, or `None` if more bytes are needed.
fn parse_response(buf: &[u8]) -> Option<Reply> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &buf[head_end + 4..];
    let find = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let body = if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        decode_chunked(rest)?
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().ok()?;
        if rest.len() < len {
            return None;
        }
        rest[..len].to_vec()
    } else {
        // No framing: only complete at EOF, which the caller handles by
        // calling again; treat what is there as the body only then.
        return None;
    };
    Some(Reply { status, headers, body })
}

fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        if data.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Opens a connection, sends `request`, and closes it at once without
/// reading (a client that gives up).
pub fn send_and_abandon(addr: SocketAddr, request: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    stream.write_all(request).expect("write request");
    stream
}

pub fn close(stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Both);
    drop(stream);
}
