//! Shared harness for the HTTP and CLI integration tests.
//!
//! - [`TestServer`]: an in-process server on `127.0.0.1:0` (its own actix
//!   `System` on a thread), ready once `GET /readyz` answers 200; stopped and
//!   joined on [`TestServer::shutdown`] or drop.
//! - [`ProcessServer`]: the real binary as a child process (for signal
//!   tests), its address read from the `listening on http://ADDR` line; killed
//!   on drop.
//! - HTTP helpers: [`agent`] + [`get`] / [`post`] over ureq (keep-alive), and
//!   [`raw_exchange`] over a bare `TcpStream` for what ureq cannot send
//!   (broken framing, huge declared bodies) or cannot tell apart (a request
//!   that failed before any response byte versus a truncated response).
//! - [`Fixture`]: the upstream fixtures' `expected.json`, and the output checks.
//! - [`Metrics`]: a small Prometheus text parser.
//!
//! Every wait here is bounded; nothing asserts a wall-clock duration.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokitai_serve::config::Config;
use tokitai_serve::model::LayerNormMode;

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures");
pub const FIXTURE_NAMES: [&str; 2] = ["nano-s11", "nano-s12"];
pub const BIN: &str = env!("CARGO_BIN_EXE_tokitai-serve");

/// Largest accepted |logit - expected|.
pub const LOGIT_TOL: f64 = 2e-5;
/// Largest accepted |router weight - expected|.
pub const ROUTER_TOL: f64 = 1e-6;

// ---- in-process server ----------------------------------------------------

/// A server running `tokitai_serve::run` on its own thread.
pub struct TestServer {
    pub addr: SocketAddr,
    pub base: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

/// `Config::default()` with test-friendly settings: a short graceful
/// shutdown so a test never waits long on an idle keep-alive connection.
pub fn base_config() -> Config {
    let mut config = Config::default();
    config.server.bind = "127.0.0.1:0".into();
    config.server.shutdown_timeout_secs = 2;
    config
}

/// [`base_config`] serving the fixture `name` in LayerNorm `mode`.
pub fn fixture_config(name: &str, mode: LayerNormMode) -> Config {
    let mut config = base_config();
    let dir = fixture_dir(name);
    config.model.arch = Some(dir.join("arch.json"));
    config.model.checkpoint = Some(dir.join("checkpoint.tkp1"));
    config.model.layernorm = mode;
    config
}

impl TestServer {
    /// Starts a server with `config` and waits until it is ready.
    pub fn start(config: Config) -> TestServer {
        config.validate().expect("test config is valid");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("test-server-{}", addr.port()))
            .spawn(move || {
                actix_rt::System::new()
                    .block_on(tokitai_serve::run(listener, config, async move {
                        rx.await.ok();
                    }))
                    .map_err(|e| e.to_string())
            })
            .expect("spawn server thread");
        let mut server = TestServer {
            addr,
            base: format!("http://{addr}"),
            shutdown: Some(tx),
            thread: Some(thread),
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let agent = agent();
        for _ in 0..1500 {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                let result = self.thread.take().unwrap().join();
                panic!("server exited before it was ready: {result:?}");
            }
            if let Ok(r) = try_get(&agent, &self.url("/readyz")) {
                if r.status == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server on {} was not ready after 1500 polls", self.addr);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET /metrics`, parsed.
    pub fn metrics(&self) -> Metrics {
        let r = get(&agent(), &self.url("/metrics"));
        assert_eq!(r.status, 200, "GET /metrics");
        Metrics::parse(&r.text())
    }

    /// Polls `/metrics` until `done` holds (bounded); returns the last sample.
    pub fn wait_metrics(&self, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
        for _ in 0..500 {
            let m = self.metrics();
            if done(&m) {
                return m;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("metrics never showed: {what}\n{}", self.metrics().text);
    }

    /// Stops the server gracefully and joins its thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let result = thread.join();
            if !std::thread::panicking() {
                result
                    .expect("server thread panicked")
                    .expect("server returned an error");
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- subprocess server ----------------------------------------------------

/// The `tokitai-serve` binary serving on a free port.
pub struct ProcessServer {
    pub child: Child,
    pub addr: SocketAddr,
    pub base: String,
}

impl ProcessServer {
    /// Spawns the binary with `args` and `env` (plus `TOKITAI_MODEL_BIND_ADDR=127.0.0.1:0`)
    /// and reads stdout until it says where it listens.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> ProcessServer {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("TOKITAI_MODEL_BIND_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tokitai-serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Read stdout on a thread so a server that never prints cannot hang the test.
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    let _ = tx.send(addr.trim().to_string());
                    break;
                }
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("the binary never printed `listening on http://ADDR`");
            }
        };
        let addr: SocketAddr = addr.parse().expect("a socket address after `listening on http://`");
        ProcessServer {
            child,
            addr,
            base: format!("http://{addr}"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "TERM") with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ProcessServer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---- HTTP over ureq ---------------------------------------------------------

/// A complete HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts the engine's error shape: status, `{"error": non-empty, "type": kind}`.
    pub fn assert_error(&self, status: u16, kind: &str, context: &str) {
        assert_eq!(
            self.status,
            status,
            "{context}: status (body {:?})",
            String::from_utf8_lossy(&self.body)
        );
        let v = self.json();
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{context}: no `error` string in {v}"));
        assert!(!msg.trim().is_empty(), "{context}: empty error message");
        assert_eq!(v["type"], kind, "{context}: error type in {v}");
    }
}

/// A keep-alive agent with bounded timeouts.
pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .build()
}

fn reply_of(response: ureq::Response) -> Result<Reply, String> {
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .map(|n| {
            let v = response.header(&n).unwrap_or("").to_string();
            (n.to_ascii_lowercase(), v)
        })
        .collect();
    let mut body = Vec::new();
    response
        .into_reader()
        .read_to_end(&mut body)
        .map_err(|e| format!("reading the body: {e}"))?;
    Ok(Reply { status, headers, body })
}

/// A transport failure (no complete answer), as text.
pub type HttpError = String;

/// A ureq result as a [`Reply`] (4xx/5xx included) or a transport failure.
pub fn finish(result: Result<ureq::Response, ureq::Error>) -> Result<Reply, HttpError> {
    match result {
        Ok(r) | Err(ureq::Error::Status(_, r)) => reply_of(r),
        Err(e) => Err(e.to_string()),
    }
}

pub fn try_get(agent: &ureq::Agent, url: &str) -> Result<Reply, HttpError> {
    finish(agent.get(url).call())
}

pub fn get(agent: &ureq::Agent, url: &str) -> Reply {
    try_get(agent, url).unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// `POST` with `Content-Type: application/json` and `headers`.
pub fn try_post(agent: &ureq::Agent, url: &str, body: &str, headers: &[(&str, &str)]) -> Result<Reply, HttpError> {
    let mut req = agent.post(url).set("Content-Type", "application/json");
    for (k, v) in headers {
        req = req.set(k, v);
    }
    finish(req.send_string(body))
}

pub fn post(agent: &ureq::Agent, url: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
    try_post(agent, url, body, headers).unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

// ---- raw HTTP over TcpStream ------------------------------------------------

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
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
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
pub fn read_response(stream: &mut TcpStream, write_error: Option<String>) -> RawOutcome {
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

// ---- fixtures ---------------------------------------------------------------

pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

/// One fixture's `expected.json`.
pub struct Fixture {
    pub name: String,
    pub arch: PathBuf,
    pub checkpoint: PathBuf,
    /// 64 rows of 96 values, exactly as stored (f32 values written as JSON).
    pub inputs: Vec<Vec<f64>>,
    pub logits: Vec<Vec<f64>>,
    pub logits_ln_identity: Vec<Vec<f64>>,
    pub router_weights: Vec<Vec<f64>>,
    pub top_k_indices: Vec<Vec<usize>>,
    pub top_k_strict: Vec<bool>,
}

fn matrix(v: &Value, field: &str) -> Vec<Vec<f64>> {
    v[field]
        .as_array()
        .unwrap_or_else(|| panic!("expected.json: `{field}` is not an array"))
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect()
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let dir = fixture_dir(name);
        let text = std::fs::read_to_string(dir.join("expected.json")).expect("read expected.json");
        let v: Value = serde_json::from_str(&text).expect("parse expected.json");
        let f = Fixture {
            name: name.to_string(),
            arch: dir.join("arch.json"),
            checkpoint: dir.join("checkpoint.tkp1"),
            inputs: matrix(&v, "inputs"),
            logits: matrix(&v, "logits"),
            logits_ln_identity: matrix(&v, "logits_ln_identity"),
            router_weights: matrix(&v, "router_weights"),
            top_k_indices: matrix(&v, "top_k_indices")
                .into_iter()
                .map(|r| r.into_iter().map(|x| x as usize).collect())
                .collect(),
            top_k_strict: v["top_k_strict"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_bool().unwrap())
                .collect(),
        };
        assert_eq!(f.inputs.len(), 64);
        assert!(f.inputs.iter().all(|r| r.len() == 96));
        assert_eq!(f.logits.len(), 64);
        f
    }

    pub fn expected_logits(&self, mode: LayerNormMode) -> &[Vec<f64>] {
        match mode {
            LayerNormMode::Identity => &self.logits_ln_identity,
            LayerNormMode::Stored => &self.logits,
        }
    }

    /// Checks output rows (`logits`, `router_weights` as parsed JSON arrays of
    /// rows) against fixture rows `rows`, within the tolerances.
    pub fn check(&self, mode: LayerNormMode, answer: &Value, rows: &[usize], context: &str) {
        let logits = answer["logits"]
            .as_array()
            .unwrap_or_else(|| panic!("{context}: no logits in {answer}"));
        let weights = answer["router_weights"]
            .as_array()
            .unwrap_or_else(|| panic!("{context}: no router_weights"));
        assert_eq!(logits.len(), rows.len(), "{context}: one logits row per input row");
        assert_eq!(
            weights.len(),
            rows.len(),
            "{context}: one router_weights row per input row"
        );
        let expected = self.expected_logits(mode);
        for (i, &r) in rows.iter().enumerate() {
            let got = f32_row(&logits[i], 20, context);
            let diff = max_abs_diff(&got, &expected[r]);
            assert!(
                diff <= LOGIT_TOL,
                "{context}: fixture {} row {r} ({mode}): max |logit diff| {diff:e}",
                self.name
            );
            let w = f32_row(&weights[i], 4, context);
            let diff = max_abs_diff(&w, &self.router_weights[r]);
            assert!(
                diff <= ROUTER_TOL,
                "{context}: fixture {} row {r}: max |router weight diff| {diff:e}",
                self.name
            );
            if self.top_k_strict[r] {
                let mut nonzero: Vec<usize> = (0..4).filter(|&e| w[e] != 0.0).collect();
                let mut want = self.top_k_indices[r].clone();
                nonzero.sort_unstable();
                want.sort_unstable();
                assert_eq!(
                    nonzero, want,
                    "{context}: fixture {} row {r}: experts with nonzero weight",
                    self.name
                );
            }
        }
    }
}

/// A JSON array of `len` numbers as the f32 values they were written from.
pub fn f32_row(v: &Value, len: usize, context: &str) -> Vec<f64> {
    let row = v
        .as_array()
        .unwrap_or_else(|| panic!("{context}: row is not an array: {v}"));
    assert_eq!(row.len(), len, "{context}: row length");
    row.iter()
        .map(|x| f64::from(x.as_f64().unwrap_or_else(|| panic!("{context}: not a number: {x}")) as f32))
        .collect()
}

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// `{"features": [row]}`.
pub fn single_body(row: &[f64]) -> String {
    serde_json::json!({ "features": row }).to_string()
}

/// `{"features": [[row], ...]}`.
pub fn batch_body<R: AsRef<[f64]>>(rows: &[R]) -> String {
    let rows: Vec<&[f64]> = rows.iter().map(|r| r.as_ref()).collect();
    serde_json::json!({ "features": rows }).to_string()
}

/// A deterministic pseudo-random generator (SplitMix64) for test inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A row of 96 f32-representable values in [-3, 3).
    pub fn row(&mut self) -> Vec<f64> {
        (0..96)
            .map(|_| f64::from(((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0))
            .collect()
    }
}

// ---- metrics ----------------------------------------------------------------

/// A parsed Prometheus text exposition.
pub struct Metrics {
    pub text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or(f64::NAN),
            };
            let (name, labels) = match key.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap_or(rest);
                    let labels = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .filter_map(|p| p.split_once('='))
                        .map(|(k, v)| (k.trim().to_string(), v.trim_matches('"').to_string()))
                        .collect();
                    (name.to_string(), labels)
                }
                None => (key.to_string(), BTreeMap::new()),
            };
            samples.push((name, labels, value));
        }
        Metrics {
            text: text.to_string(),
            samples,
        }
    }

    /// Sum of every sample of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).is_some_and(|x| x == v)))
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Whether a sample of `name` exists at all.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }

    /// `(status, count)` of `tokitai_http_requests_total` for `route`.
    pub fn requests_by_status(&self, route: &str) -> BTreeMap<u16, u64> {
        let mut out = BTreeMap::new();
        for (n, l, v) in &self.samples {
            if n == "tokitai_http_requests_total" && l.get("route").is_some_and(|r| r == route) {
                let status: u16 = l["status"].parse().unwrap();
                *out.entry(status).or_default() += *v as u64;
            }
        }
        out
    }
}
