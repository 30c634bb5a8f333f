//! Hostile clients against the real server on port 0: every abuse is
//! refused with a 4xx (a JSON error wherever the engine, not the HTTP codec,
//! answers), nothing panics, memory stays bounded, and afterwards the same
//! valid request gets the same answer as before the abuse.
//!
//! Proves that:
//! - v2 `outputs` naming an output twice, 10,000 times, or ~290,000 times
//!   in a 16 MB-class body (once an allocation of 262 GB and an abort) is a
//!   fast 400, and the process's peak RSS stays bounded (the real binary,
//!   `/proc/PID/status`);
//! - 300 connections that declare a 16 MB body and stall it get 408 and are
//!   closed after `server.body_timeout_ms`, while `/healthz`, `/readyz` and
//!   valid requests keep being answered, and the process's peak RSS stays
//!   within base + 64 MB (body buffers grow as bytes arrive, never to the
//!   declared length); a client that stalls half-way through its headers,
//!   and one that never sends a byte, are closed after
//!   `server.header_timeout_ms`;
//! - `Expect: 100-continue` with a declared body over `server.max_body_bytes`
//!   (or a browser-form content type) is answered 413 (415) with no
//!   `100 Continue` before it, an allowed one gets `100 Continue` and then
//!   its answer; a too-large body sent without `Expect` still lets the client
//!   read the 413 (raw TCP, Python's `http.client`, curl) and its bytes are
//!   never parsed as further requests;
//! - browser-form content types (`text/plain`, urlencoded, multipart) POSTed
//!   to `/infer`, the v2 infer route and an unknown path get 415 with a JSON
//!   error, while v2 accepts `application/json`, `application/octet-stream`
//!   and no content type;
//! - a panic while answers are handed out gets that request 500 and the next
//!   one 200; a worker whose actor ends gets that request 500, is replaced
//!   (`tokitai_worker_restarts_total` grows), and readiness and answers come
//!   back;
//! - malformed framing (bogus `Content-Length`, conflicting framing headers,
//!   broken chunked encoding, a 100 KB header line, garbage) gets a 4xx or a
//!   closed connection, never a second request smuggled out of a body.
//!
//! "Zero panics": the real binary's stderr is captured and must contain no
//! `panicked`; for the in-process servers a panic hook counts panics on
//! the engine's threads (the fault-injection panics, which say "fault
//! injection", excepted). Every wait is a bounded poll; timings
//! are printed, and only where the behaviour itself is a timeout is one
//! bounded, generously (ten times the configured timeout).

use std::cell::Cell;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::grpc::CLIENT_RUNTIME_THREAD;
use crate::common::process::status_bytes;
use crate::common::{
    BIN, Fixture, Metrics, ProcessServer, Reply, TestServer, agent, fixture_config, fixture_dir, get, post,
    raw_exchange, raw_request, single_body, try_get,
};
use serde_json::{Value, json};
use tokitai_serve::config::Config;
use tokitai_serve::model::LayerNormMode;
use tokitai_serve::{FAULT_INJECTION_ANSWER_PANIC_VALUE, FAULT_INJECTION_EXIT_VALUE};

const FIXTURE: &str = "nano-s11";
const MODE: LayerNormMode = LayerNormMode::Identity;
const V2_INFER: &str = "/v2/models/tokitai-moe/infer";
const MIB: u64 = 1024 * 1024;
/// `server.max_body_bytes` by default: the largest body a client may declare.
const MAX_BODY_DEFAULT: usize = 16 * 1024 * 1024;
/// The small body limit of the in-process servers (refusals stay cheap).
const SMALL_MAX_BODY: usize = 64 * 1024;
/// A too-large body on a v2 route: Triton's invalid-argument status
/// (`V2Error` in src/http/error.rs), from the handler and from the `Expect`
/// gate alike (`/infer` answers 413).
const V2_TOO_LARGE: u16 = 400;
/// How long any single read on a raw socket may block.
const READ_LIMIT: Duration = Duration::from_secs(30);
/// How often a bounded poll looks again.
const POLL: Duration = Duration::from_millis(10);

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

// ---- panics on the server's threads -----------------------------------------

/// The panics counted on the engine's threads: thread, message, location.
static SERVER_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

thread_local! {
    /// Set on the test's own threads: their panics are test failures, not
    /// the server's.
    static CLIENT_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Whether a panic on the calling thread is the engine's. This binary's
/// other tests run in the same process, so a thread is the engine's only
/// when it is not a client's ([`client_thread`]), not a test's own (the
/// test harness names those after the test, `module::test`), not a test
/// client runtime's ([`CLIENT_RUNTIME_THREAD`]), and named at all (the
/// engine names every thread it starts: actix's, tokio's, `tokitai-*`,
/// `worker-*`; a thread a test spawns is unnamed). A panic on another
/// test's in-process engine counts too: it is the engine's wherever it is.
fn on_an_engine_thread() -> bool {
    let thread = std::thread::current();
    let named_not_a_test = thread
        .name()
        .is_some_and(|name| !name.contains("::") && !name.starts_with(CLIENT_RUNTIME_THREAD));
    !CLIENT_THREAD.with(Cell::get) && named_not_a_test
}

/// Marks the calling thread as the client's and installs (once) the hook
/// that records panics on the engine's threads ([`on_an_engine_thread`]).
fn client_thread() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if on_an_engine_thread() && !msg.starts_with("fault injection") {
                let thread = std::thread::current();
                let at = info.location().map(|l| l.to_string()).unwrap_or_default();
                let seen = format!("thread {:?} at {at}: {msg}", thread.name().unwrap_or(""));
                SERVER_PANICS.lock().unwrap_or_else(|e| e.into_inner()).push(seen);
            }
            default(info);
        }));
    });
    CLIENT_THREAD.with(|c| c.set(true));
}

fn assert_no_server_panics(context: &str) {
    let seen = SERVER_PANICS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        seen.is_empty(),
        "{context}: a server thread panicked ({} in this process):\n{}",
        seen.len(),
        seen.join("\n")
    );
}

// ---- the real binary, its stderr captured, and its memory ---------------------

/// The binary serving [`FIXTURE`], its stderr in a file (for panics).
struct Binary {
    server: ProcessServer,
    stderr: tempfile::NamedTempFile,
}

impl Binary {
    fn start(env: &[(&str, &str)]) -> Binary {
        let dir = fixture_dir(FIXTURE);
        let stderr = tempfile::NamedTempFile::new().expect("a temporary file for stderr");
        let mut cmd = Command::new(BIN);
        cmd.arg("--arch")
            .arg(dir.join("arch.json"))
            .arg("--checkpoint")
            .arg(dir.join("checkpoint.tkp1"))
            .stderr(stderr.reopen().expect("reopen the stderr file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let binary = Binary {
            server: ProcessServer::start_with(cmd),
            stderr,
        };
        binary.wait_ready();
        binary
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    fn pid(&self) -> u32 {
        self.server.pid()
    }

    fn wait_ready(&self) {
        let agent = agent();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if try_get(&agent, &url(self.addr(), "/readyz")).is_ok_and(|r| r.status == 200) {
                return;
            }
            std::thread::sleep(POLL);
        }
        panic!("the binary on {} was not ready within 60 s", self.addr());
    }

    /// The process is still running, and has printed no panic.
    fn assert_alive_without_panics(&mut self, context: &str) {
        let exited = self.server.child.try_wait().expect("try_wait");
        let log = std::fs::read_to_string(self.stderr.path()).unwrap_or_default();
        assert!(
            exited.is_none(),
            "{context}: the server exited ({exited:?}); stderr:\n{log}"
        );
        let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
        assert!(
            panics.is_empty(),
            "{context}: the server panicked: {panics:?}\nstderr:\n{log}"
        );
    }

    fn metrics(&self) -> Metrics {
        let r = get(&agent(), &url(self.addr(), "/metrics"));
        assert_eq!(r.status, 200, "GET /metrics");
        Metrics::parse(&r.text())
    }
}

/// Memory of a process, in bytes, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy)]
struct Mem {
    rss: u64,
    /// Peak RSS (since start, or since [`reset_peak`]).
    hwm: u64,
    size: u64,
}

fn mem(pid: u32) -> Mem {
    Mem {
        rss: status_bytes(pid, "VmRSS:"),
        hwm: status_bytes(pid, "VmHWM:"),
        size: status_bytes(pid, "VmSize:"),
    }
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS; false where
/// the kernel does not allow it (the peak then includes start-up).
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Samples a process's RSS and virtual size until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(u64, u64)>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            client_thread();
            let (mut rss, mut size) = (0, 0);
            while !flag.load(Ordering::Acquire) {
                let m = mem(pid);
                rss = rss.max(m.rss);
                size = size.max(m.size);
                std::thread::sleep(Duration::from_millis(5));
            }
            (rss, size)
        });
        Sampler { stop, handle }
    }

    /// The largest RSS and virtual size seen.
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Release);
        self.handle.join().expect("memory sampler")
    }
}

// ---- the same valid request, before and after ---------------------------------

/// A valid `/infer` and v2 request and the answers they got before the abuse.
struct Reference {
    infer_body: String,
    infer: Value,
    v2_body: String,
    v2: Value,
}

impl Reference {
    fn take(addr: SocketAddr, fixture: &Fixture) -> Reference {
        let agent = agent();
        let infer_body = single_body(&fixture.inputs[7]);
        let reply = post(&agent, &url(addr, "/infer"), &infer_body, &[]);
        assert_eq!(reply.status, 200, "the reference /infer request: {}", reply.text());
        let infer = reply.json();
        fixture.check(MODE, &infer, &[7], "the reference /infer answer");
        let v2_body = v2_json_body(&[&fixture.inputs[3], &fixture.inputs[4]], "");
        let reply = post(&agent, &url(addr, V2_INFER), &v2_body, &[]);
        assert_eq!(reply.status, 200, "the reference v2 request: {}", reply.text());
        let v2 = reply.json();
        assert_eq!(v2["outputs"].as_array().map(Vec::len), Some(2), "v2 answer: {v2}");
        Reference {
            infer_body,
            infer,
            v2_body,
            v2,
        }
    }

    /// The same requests get the same answers.
    fn assert_unchanged(&self, addr: SocketAddr, context: &str) {
        let agent = agent();
        let reply = post(&agent, &url(addr, "/infer"), &self.infer_body, &[]);
        assert_eq!(reply.status, 200, "{context}: /infer: {}", reply.text());
        assert_eq!(reply.json(), self.infer, "{context}: the /infer answer changed");
        self.assert_v2_unchanged(addr, &[], self.v2_body.as_bytes(), context);
    }

    /// A v2 request with `headers` and `body` gets the reference v2 answer.
    fn assert_v2_unchanged(&self, addr: SocketAddr, headers: &[(&str, &str)], body: &[u8], context: &str) {
        let mut all = vec![("Connection", "close")];
        all.extend_from_slice(headers);
        let request = raw_v2(&all, body);
        let reply = raw_exchange(addr, &request).expect_response(context);
        assert_eq!(
            reply.status,
            200,
            "{context}: v2: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.json(), self.v2, "{context}: the v2 answer changed");
    }
}

/// `POST` to the v2 infer route with exactly `headers` (no content type
/// unless given).
fn raw_v2(headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!("POST {V2_INFER} HTTP/1.1\r\nHost: localhost\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Numbers as JSON text, each row in brackets.
fn rows_json(rows: &[&Vec<f64>]) -> String {
    let mut out = String::from("[");
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('[');
        for (j, x) in row.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str(&x.to_string());
        }
        out.push(']');
    }
    out.push(']');
    out
}

/// A v2 JSON request for `rows`, with `extra` (`,"outputs": ...`) appended
/// inside the top-level object.
fn v2_json_body(rows: &[&Vec<f64>], extra: &str) -> String {
    let width = rows[0].len();
    format!(
        r#"{{"inputs":[{{"name":"features","shape":[{},{width}],"datatype":"FP32","data":{}}}]{extra}}}"#,
        rows.len(),
        rows_json(rows)
    )
}

/// `"outputs": [...]` naming `name` `times` times (`binary_data` on each).
fn repeated_outputs(name: &str, times: usize) -> String {
    let one = format!(r#"{{"name":"{name}","parameters":{{"binary_data":true}}}}"#);
    format!(r#""outputs":[{}]"#, vec![one; times].join(","))
}

/// A JSON error reply: `status` and a non-empty `error` string, returned.
fn assert_json_error(reply: &Reply, status: u16, context: &str) -> String {
    assert_eq!(
        reply.status,
        status,
        "{context}: status (body {:?})",
        String::from_utf8_lossy(&reply.body)
    );
    let v: Value = serde_json::from_slice(&reply.body).unwrap_or_else(|e| {
        panic!(
            "{context}: the {status} body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&reply.body)
        )
    });
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: no `error` string in {v}"));
    assert!(!msg.trim().is_empty(), "{context}: empty error message");
    msg.to_string()
}

// ---- 1. v2 outputs named more than once -------------------------------------------

/// A v2 body that names an output more than once, its name, and its binary
/// header's length (for `Inference-Header-Content-Length`) where it is one.
type RepeatedOutputs = (String, Vec<u8>, Option<usize>);

/// The bodies that name outputs more than once: twice, 10,000 times before
/// or after 4096 rows, and a 16 MB-class binary body that repeats `logits`
/// until it is just under the body limit.
fn repeated_output_cases(fixture: &Fixture) -> Vec<RepeatedOutputs> {
    let max_rows = 4096; // batching.max_request_rows by default
    let many: Vec<&Vec<f64>> = (0..max_rows).map(|i| &fixture.inputs[i % 64]).collect();
    let one = [&fixture.inputs[0]];
    let width = fixture.dims.input;
    // The binary form: 4096 rows of raw FP32 after a header that repeats
    // `logits` until the body is just under the 16 MiB limit.
    let binary_payload: Vec<u8> = many
        .iter()
        .flat_map(|r| r.iter())
        .flat_map(|&x| (x as f32).to_le_bytes())
        .collect();
    let entry_len = r#"{"name":"logits","parameters":{"binary_data":true}},"#.len();
    let fill = (MAX_BODY_DEFAULT - binary_payload.len() - 1024) / entry_len;
    let binary_header = format!(
        r#"{{"inputs":[{{"name":"features","shape":[{max_rows},{width}],"datatype":"FP32","parameters":{{"binary_data_size":{}}}}}],{}}}"#,
        binary_payload.len(),
        repeated_outputs("logits", fill)
    );
    let mut binary_body = binary_header.clone().into_bytes();
    binary_body.extend_from_slice(&binary_payload);
    assert!(binary_body.len() <= MAX_BODY_DEFAULT);

    vec![
        (
            "logits twice".into(),
            v2_json_body(&one, r#","outputs":[{"name":"logits"},{"name":"logits"}]"#).into_bytes(),
            None,
        ),
        (
            "router_weights twice, logits between".into(),
            v2_json_body(
                &one,
                r#","outputs":[{"name":"router_weights"},{"name":"logits"},{"name":"router_weights"}]"#,
            )
            .into_bytes(),
            None,
        ),
        (
            "4096 rows, then logits 10,000 times".into(),
            v2_json_body(&many, &format!(",{}", repeated_outputs("logits", 10_000))).into_bytes(),
            None,
        ),
        (
            "logits 10,000 times, then 4096 rows".into(),
            format!(
                r#"{{{},"inputs":[{{"name":"features","shape":[{max_rows},{width}],"datatype":"FP32","data":{}}}]}}"#,
                repeated_outputs("logits", 10_000),
                rows_json(&many)
            )
            .into_bytes(),
            None,
        ),
        (
            format!("4096 binary rows, logits {fill} times (16 MB class)"),
            binary_body,
            Some(binary_header.len()),
        ),
    ]
}

/// Posts each case; each is a 400 naming the repetition, and the server
/// lives on. The largest body sent.
fn assert_repeated_outputs_refused(server: &mut Binary, cases: &[RepeatedOutputs]) -> usize {
    let addr = server.addr();
    let mut largest = 0;
    for (name, body, header_len) in cases {
        largest = largest.max(body.len());
        let header_len = header_len.map(|n| n.to_string());
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(n) = &header_len {
            headers.push(("Inference-Header-Content-Length", n));
        }
        let request = raw_request("POST", V2_INFER, &headers, body);
        let start = Instant::now();
        let reply = raw_exchange(addr, &request).expect_response(name);
        let took = start.elapsed();
        let msg = assert_json_error(&reply, 400, name);
        assert!(msg.contains("more than once"), "{name}: {msg:?}");
        eprintln!("v2 outputs: {name} ({} bytes): 400 in {took:?}: {msg}", body.len());
        server.assert_alive_without_panics(name);
    }
    largest
}

/// The body itself is buffered (16 MB) and parsed once: the peak RSS is a
/// few times the `largest` body at most, nowhere near one answer per
/// repeated output.
fn assert_memory_bounded_by_the_body(base: Mem, after: Mem, sampled: (u64, u64), reset: bool, largest: usize) {
    let (sampled_rss, sampled_size) = sampled;
    let peak = after.hwm.max(sampled_rss);
    eprintln!(
        "v2 outputs: RSS before {}, peak {} (VmHWM {}, peak reset: {reset}; sampled {}), largest body {}; \
         virtual before {}, sampled peak {}",
        mib(base.rss),
        mib(peak),
        mib(after.hwm),
        mib(sampled_rss),
        mib(largest as u64),
        mib(base.size),
        mib(sampled_size)
    );
    // The body itself is buffered (16 MB) and parsed once: a few times the
    // body at most, nowhere near one answer per repeated output.
    let bound = base.rss + 4 * largest as u64 + 64 * MIB;
    assert!(
        peak < bound,
        "peak RSS {} over {} (RSS before {}, largest body {})",
        mib(peak),
        mib(bound),
        mib(base.rss),
        mib(largest as u64)
    );
}

#[test]
fn v2_outputs_named_twice_or_ten_thousand_times_are_a_fast_400_with_bounded_memory() {
    client_thread();
    let fixture = Fixture::load(FIXTURE);
    let mut server = Binary::start(&[]);
    let addr = server.addr();
    let reference = Reference::take(addr, &fixture);
    let cases = repeated_output_cases(&fixture);
    let pid = server.pid();
    let base = mem(pid);
    let reset = reset_peak(pid);
    let sampler = Sampler::start(pid);
    let largest = assert_repeated_outputs_refused(&mut server, &cases);
    let sampled = sampler.finish();
    let after = mem(pid);
    assert_memory_bounded_by_the_body(base, after, sampled, reset, largest);
    reference.assert_unchanged(addr, "after the repeated outputs");
    server.assert_alive_without_panics("after the repeated outputs");
}

// ---- 2. slow clients ----------------------------------------------------------------

/// One client connection that stalls, and what came of it.
struct Stalled {
    what: String,
    stream: TcpStream,
    opened: Instant,
    bytes: Vec<u8>,
    /// Since `opened`: when the first response byte came, and when the
    /// connection was closed (EOF or reset).
    first_byte: Option<Duration>,
    closed: Option<Duration>,
    error: Option<String>,
}

impl Stalled {
    fn open(addr: SocketAddr, what: String, request: &[u8]) -> Stalled {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        stream.set_write_timeout(Some(READ_LIMIT)).unwrap();
        let opened = Instant::now();
        stream.write_all(request).expect("write the stalling request");
        stream.set_nonblocking(true).unwrap();
        Stalled {
            what,
            stream,
            opened,
            bytes: Vec::new(),
            first_byte: None,
            closed: None,
            error: None,
        }
    }

    /// Reads what has arrived, without blocking; true once closed.
    fn poll(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        while self.closed.is_none() {
            match self.stream.read(&mut buf) {
                Ok(0) => self.closed = Some(self.opened.elapsed()),
                Ok(n) => {
                    self.first_byte.get_or_insert(self.opened.elapsed());
                    self.bytes.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.error = Some(e.to_string());
                    self.closed = Some(self.opened.elapsed());
                }
            }
        }
        self.closed.is_some()
    }

    /// Nothing has come back yet.
    fn silent(&mut self) -> bool {
        !self.poll() && self.bytes.is_empty()
    }
}

/// Polls every connection until each is closed or `deadline` passes.
fn wait_closed(mut conns: Vec<&mut Stalled>, deadline: Instant) {
    loop {
        let mut open = 0;
        for c in conns.iter_mut() {
            if !c.poll() {
                open += 1;
            }
        }
        if open == 0 || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(POLL);
    }
}

fn spread(times: &mut [Duration]) -> String {
    times.sort_unstable();
    match times {
        [] => "none".into(),
        _ => format!(
            "min {:?}, median {:?}, max {:?}",
            times[0],
            times[times.len() / 2],
            times[times.len() - 1]
        ),
    }
}

/// How many uploads stall at once.
const STALLED: usize = 300;
/// `server.body_timeout_ms` and `server.header_timeout_ms` of the stalled-upload test.
const BODY_TIMEOUT_MS: u64 = 2000;
const HEADER_TIMEOUT_MS: u64 = 1000;

/// [`STALLED`] uploads that declare the largest body and stall, half to
/// `/infer` and half to v2, half of each after a 4 KiB prefix of a body.
fn open_stalled_uploads(addr: SocketAddr) -> Vec<Stalled> {
    // A prefix of a real body, sent by half the clients before they stall.
    let prefix = {
        let mut p = String::from(r#"{"features": [["#);
        while p.len() < 4096 {
            p.push_str("0.5,");
        }
        p
    };
    (0..STALLED)
        .map(|i| {
            let path = if i % 2 == 0 { "/infer" } else { V2_INFER };
            let sends_prefix = (i / 2) % 2 == 0;
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {MAX_BODY_DEFAULT}\r\n\r\n"
            );
            let mut request = head.into_bytes();
            if sends_prefix {
                request.extend_from_slice(prefix.as_bytes());
            }
            let what = format!("stalled upload {i} to {path} ({} body bytes sent)", request.len());
            Stalled::open(addr, what, &request)
        })
        .collect()
}

/// Clients that stall in their headers, or never send a byte.
fn open_header_stalls(addr: SocketAddr) -> Vec<Stalled> {
    vec![
        Stalled::open(
            addr,
            "half the headers".into(),
            b"POST /infer HTTP/1.1\r\nHost: localhost\r\nContent-Ty",
        ),
        Stalled::open(addr, "the request line only".into(), b"GET /healthz HTTP/1.1\r\n"),
        Stalled::open(addr, "nothing at all".into(), b""),
    ]
}

/// While the uploads stall, health, readiness and both infer routes are
/// answered, and the same request gets the same answer.
fn assert_served_while_stalled(addr: SocketAddr, reference: &Reference, stalled: &mut [Stalled], start: Instant) {
    let silent_before = stalled.iter_mut().map(Stalled::silent).filter(|&s| s).count();
    let agent = agent();
    let health = get(&agent, &url(addr, "/healthz"));
    assert_eq!(health.status, 200, "/healthz while uploads stall");
    assert_eq!(health.json()["status"], "ok");
    let ready = get(&agent, &url(addr, "/readyz"));
    assert_eq!(ready.status, 200, "/readyz while uploads stall: {}", ready.text());
    reference.assert_unchanged(addr, "while uploads stall");
    let silent_after = stalled.iter_mut().map(Stalled::silent).filter(|&s| s).count();
    eprintln!(
        "slow clients: /healthz, /readyz, /infer and v2 answered while {silent_before} (before) / \
         {silent_after} (after) of {STALLED} uploads were still waiting, {:?} after the first opened",
        start.elapsed()
    );
}

/// Each stalled upload was closed within ten times `server.body_timeout_ms`
/// of opening, after a complete 408 with a JSON error or with nothing.
fn assert_uploads_got_408_and_closed(stalled: &[Stalled]) {
    let body_limit = Duration::from_millis(10 * BODY_TIMEOUT_MS);
    let mut closes = Vec::new();
    let mut first_bytes = Vec::new();
    let (mut with_408, mut bare_close) = (0, 0);
    for c in stalled {
        let closed = c.closed.filter(|&t| t <= body_limit).unwrap_or_else(|| {
            panic!(
                "{}: not closed within {body_limit:?} (10 x server.body_timeout_ms) of opening; closed: {:?}; \
                 got {:?}",
                c.what,
                c.closed,
                String::from_utf8_lossy(&c.bytes)
            )
        });
        closes.push(closed);
        if c.bytes.is_empty() {
            bare_close += 1;
            continue;
        }
        first_bytes.push(c.first_byte.unwrap());
        let reply = parse_reply(&c.bytes).map(|(r, _)| r).unwrap_or_else(|| {
            panic!(
                "{}: an incomplete response before the close ({:?}): {:?}",
                c.what,
                c.error,
                String::from_utf8_lossy(&c.bytes)
            )
        });
        assert_json_error(&reply, 408, &c.what);
        with_408 += 1;
    }
    eprintln!(
        "slow clients: {with_408} got 408, {bare_close} were closed without one; 408 after {}; closed after {} \
         (server.body_timeout_ms = {BODY_TIMEOUT_MS})",
        spread(&mut first_bytes),
        spread(&mut closes)
    );
}

/// Each header stall was closed within ten times `server.header_timeout_ms`
/// of opening, with nothing or a 4xx.
fn assert_header_stalls_closed(header_stalls: &[Stalled]) {
    let header_limit = Duration::from_millis(10 * HEADER_TIMEOUT_MS);
    for c in header_stalls {
        let closed = c.closed.filter(|&t| t <= header_limit).unwrap_or_else(|| {
            panic!(
                "{}: not closed within {header_limit:?} (10 x server.header_timeout_ms) of opening; closed: {:?}",
                c.what, c.closed
            )
        });
        if !c.bytes.is_empty() {
            let reply = parse_reply(&c.bytes).map(|(r, _)| r).unwrap_or_else(|| {
                panic!(
                    "{}: an incomplete response: {:?}",
                    c.what,
                    String::from_utf8_lossy(&c.bytes)
                )
            });
            assert!(
                (400..500).contains(&reply.status),
                "{}: status {} (body {:?})",
                c.what,
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
        eprintln!(
            "slow clients: {}: closed after {closed:?} with {:?} (server.header_timeout_ms = {HEADER_TIMEOUT_MS})",
            c.what,
            String::from_utf8_lossy(&c.bytes)
                .lines()
                .next()
                .unwrap_or("no response")
        );
    }
}

/// The server's peak RSS stayed within its base + 64 MiB and its virtual
/// size did not reserve the declared bodies. `reset`: whether the peak was
/// reset before the test; `sampled`: the largest RSS and size sampled.
fn assert_memory_bounded_under_stalls(base: Mem, after: Mem, sampled: (u64, u64), reset: bool) {
    let (sampled_rss, sampled_size) = sampled;
    let peak = after.hwm.max(sampled_rss);
    eprintln!(
        "slow clients: RSS before {}, peak {} with {STALLED} stalled uploads of a declared {} (VmHWM {}, peak \
         reset: {reset}; sampled {}); virtual size before {}, sampled peak {}",
        mib(base.rss),
        mib(peak),
        mib(MAX_BODY_DEFAULT as u64),
        mib(after.hwm),
        mib(sampled_rss),
        mib(base.size),
        mib(sampled_size)
    );
    assert!(
        peak < base.rss + 64 * MIB,
        "peak RSS {} with {STALLED} stalled uploads: over base {} + 64 MiB",
        mib(peak),
        mib(base.rss)
    );
    // Reserving each declared body would need 300 x 16 MiB of address space.
    assert!(
        sampled_size < base.size + (STALLED as u64 * MAX_BODY_DEFAULT as u64) / 4,
        "virtual size grew from {} to {} with {STALLED} stalled uploads: declared bodies are reserved",
        mib(base.size),
        mib(sampled_size)
    );
}

/// Waits (bounded) until every stalled upload is counted as a body timeout
/// beyond `before`.
fn assert_body_timeouts_counted(server: &Binary, before: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let counted = loop {
        let n = server
            .metrics()
            .sum("tokitai_request_failures_total", &[("reason", "body_timeout")])
            - before;
        if n >= STALLED as f64 || Instant::now() >= deadline {
            break n;
        }
        std::thread::sleep(POLL);
    };
    assert_eq!(counted, STALLED as f64, "body timeouts counted");
}

#[test]
fn stalled_uploads_get_408_and_are_closed_while_the_server_keeps_answering() {
    client_thread();
    let fixture = Fixture::load(FIXTURE);
    let mut server = Binary::start(&[
        ("TOKITAI_SERVER_BODY_TIMEOUT_MS", &BODY_TIMEOUT_MS.to_string()),
        ("TOKITAI_SERVER_HEADER_TIMEOUT_MS", &HEADER_TIMEOUT_MS.to_string()),
    ]);
    let addr = server.addr();
    let reference = Reference::take(addr, &fixture);
    let failures_before = server
        .metrics()
        .sum("tokitai_request_failures_total", &[("reason", "body_timeout")]);
    let pid = server.pid();
    let base = mem(pid);
    let reset = reset_peak(pid);
    let sampler = Sampler::start(pid);

    let start = Instant::now();
    let mut stalled = open_stalled_uploads(addr);
    let all_open = start.elapsed();
    let mut header_stalls = open_header_stalls(addr);
    eprintln!("slow clients: {STALLED} uploads of a declared {MAX_BODY_DEFAULT} bytes opened in {all_open:?}");
    assert_served_while_stalled(addr, &reference, &mut stalled, start);

    // Each stalled upload gets 408 and is closed (bounded: ten times the
    // configured timeout after the last one opened).
    let deadline = Instant::now() + Duration::from_millis(10 * BODY_TIMEOUT_MS);
    wait_closed(stalled.iter_mut().chain(header_stalls.iter_mut()).collect(), deadline);
    let sampled = sampler.finish();
    let after = mem(pid);
    assert_uploads_got_408_and_closed(&stalled);
    assert_header_stalls_closed(&header_stalls);
    assert_memory_bounded_under_stalls(base, after, sampled, reset);
    assert_body_timeouts_counted(&server, failures_before);

    reference.assert_unchanged(addr, "after the stalled uploads");
    assert_eq!(get(&agent(), &url(addr, "/readyz")).status, 200);
    server.assert_alive_without_panics("after the stalled uploads");
    eprintln!("slow clients: the whole test took {:?}", start.elapsed());
}

// ---- 3. Expect: 100-continue and refused large bodies ----------------------------------

/// A complete response at the start of `buf` (`Content-Length` framing, as
/// the engine sends), and the bytes it took.
fn parse_reply(buf: &[u8]) -> Option<(Reply, usize)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len = match headers.iter().find(|(k, _)| k == "content-length") {
        Some((_, v)) => v.parse::<usize>().ok()?,
        None => 0,
    };
    let body = buf.get(head_end + 4..head_end + 4 + len)?.to_vec();
    Some((Reply { status, headers, body }, head_end + 4 + len))
}

/// Every complete response in `buf`, in order (what a pipelining client
/// would see), and the bytes they took.
fn parse_replies(buf: &[u8]) -> (Vec<Reply>, usize) {
    let (mut out, mut at) = (Vec::new(), 0);
    while let Some((reply, used)) = parse_reply(&buf[at..]) {
        out.push(reply);
        at += used;
    }
    (out, at)
}

/// Reads until the peer closes, `limit` passes, or `enough` holds for the
/// bytes so far; returns the bytes and whether the connection was closed.
fn read_until(stream: &mut TcpStream, limit: Duration, enough: impl Fn(&[u8]) -> bool) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while !enough(&buf) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (buf, false);
        }
        stream.set_read_timeout(Some(left.min(READ_LIMIT))).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => return (buf, true),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return (buf, false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return (buf, true),
        }
    }
    (buf, false)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    stream.set_write_timeout(Some(READ_LIMIT)).unwrap();
    stream
}

/// Sends `head` (with `Expect: 100-continue`) and no body; the refusal must
/// come with no `100 Continue` before it, and the connection then closes.
fn expect_refused(addr: SocketAddr, head: &str, status: u16, context: &str) -> Reply {
    let mut stream = connect(addr);
    stream.write_all(head.as_bytes()).expect("write the head");
    let (bytes, _) = read_until(&mut stream, Duration::from_secs(10), |b| parse_reply(b).is_some());
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        !text.starts_with("HTTP/1.1 100"),
        "{context}: `100 Continue` came before the refusal: {text:?}"
    );
    let (reply, used) = parse_reply(&bytes).unwrap_or_else(|| panic!("{context}: no complete response: {text:?}"));
    assert_json_error(&reply, status, context);
    // The refusal closes the connection (the body was never read).
    let (rest, closed) = read_until(&mut stream, Duration::from_secs(10), |_| false);
    assert!(closed, "{context}: the connection stayed open after the refusal");
    assert!(
        bytes[used..].is_empty() && rest.is_empty(),
        "{context}: more bytes after the refusal: {:?}",
        String::from_utf8_lossy(&[&bytes[used..], &rest[..]].concat())
    );
    reply
}

/// Sends `head` (with `Expect: 100-continue`), waits for `100 Continue`,
/// then sends `body`; returns the final answer.
fn expect_continued(addr: SocketAddr, head: &str, body: &[u8], context: &str) -> Reply {
    let mut stream = connect(addr);
    stream.write_all(head.as_bytes()).expect("write the head");
    let (bytes, _) = read_until(&mut stream, Duration::from_secs(10), |b| {
        b.windows(4).any(|w| w == b"\r\n\r\n")
    });
    let text = String::from_utf8_lossy(&bytes).to_string();
    assert!(
        text.starts_with("HTTP/1.1 100 Continue\r\n\r\n"),
        "{context}: expected `100 Continue` first, got {text:?}"
    );
    stream.write_all(body).expect("write the body");
    let rest = bytes["HTTP/1.1 100 Continue\r\n\r\n".len()..].to_vec();
    let (more, _) = read_until(&mut stream, READ_LIMIT, |b| {
        parse_reply(&[&rest[..], b].concat()).is_some()
    });
    let all = [&rest[..], &more[..]].concat();
    parse_reply(&all)
        .unwrap_or_else(|| panic!("{context}: no complete answer: {:?}", String::from_utf8_lossy(&all)))
        .0
}

fn expect_head(path: &str, content_type: &str, length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
    )
}

fn small_body_config() -> Config {
    let mut config = fixture_config(FIXTURE, MODE);
    config.server.max_body_bytes = SMALL_MAX_BODY;
    config
}

/// Runs `program` with `args`, bounded by `limit`; its exit code and stdout.
fn run_bounded(program: &str, args: &[&str], limit: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(POLL);
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A naive client: `http.client` sends the whole body, then reads the
/// answer (as urllib3 does, it still reads when the send failed).
const PYTHON_CLIENT: &str = r#"
import http.client, json, sys
host, port, path, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
body = b'{"features": [' + b'0.5,' * (size // 4) + b'0.5]}'
conn = http.client.HTTPConnection(host, port, timeout=30)
send_error = None
try:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
except OSError as e:
    send_error = repr(e)
try:
    r = conn.getresponse()
    print(json.dumps({"status": r.status, "body": r.read().decode("utf-8", "replace"), "send_error": send_error}))
except Exception as e:
    print(json.dumps({"status": None, "read_error": repr(e), "send_error": send_error}))
"#;

/// `Expect: 100-continue` over the limit, or with a browser-form type: refused
/// with its status, no `100 Continue` before it.
fn expect_over_limit_or_form_types_is_refused(addr: SocketAddr) {
    let over = SMALL_MAX_BODY + 1;
    for (path, content_type, length, status) in [
        ("/infer", "application/json", over, 413),
        ("/infer", "application/json", MAX_BODY_DEFAULT, 413),
        ("/infer", "application/json", usize::MAX, 413),
        (V2_INFER, "application/json", over, V2_TOO_LARGE),
        (V2_INFER, "application/octet-stream", over, V2_TOO_LARGE),
        ("/infer", "text/plain", 100, 415),
        (V2_INFER, "application/x-www-form-urlencoded", 100, 415),
        ("/no-such-path", "multipart/form-data; boundary=x", 100, 415),
    ] {
        let context = format!("Expect: 100-continue, POST {path} {content_type} of {length} bytes");
        let reply = expect_refused(addr, &expect_head(path, content_type, length), status, &context);
        eprintln!(
            "expect: {context}: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
    }
}

/// An allowed `Expect: 100-continue`: `100 Continue`, then the same answer
/// as without it, on `/infer` and v2.
fn expect_allowed_is_continued(addr: SocketAddr, reference: &Reference) {
    let body = reference.infer_body.as_bytes();
    let head = expect_head("/infer", "application/json", body.len());
    let reply = expect_continued(addr, &head, body, "Expect: 100-continue on /infer");
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.json(), reference.infer, "the continued /infer answer");
    let body = reference.v2_body.as_bytes();
    let head = expect_head(V2_INFER, "application/json", body.len());
    let reply = expect_continued(addr, &head, body, "Expect: 100-continue on v2");
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.json(), reference.v2, "the continued v2 answer");
}

/// Too large, sent whole without Expect (raw TCP): the client reads the
/// refusal, and the body is never parsed as further requests.
fn large_raw_bodies_get_a_readable_refusal(addr: SocketAddr) {
    let pipelined = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let smuggling: Vec<u8> = pipelined.iter().copied().cycle().take(1024 * 1024).collect();
    for path in ["/infer", V2_INFER] {
        let context = format!("a 1 MiB body of pipelined requests to {path} (limit {SMALL_MAX_BODY})");
        let mut stream = connect(addr);
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            smuggling.len()
        );
        let write = stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(&smuggling));
        let (bytes, closed) = read_until(&mut stream, Duration::from_secs(10), |_| false);
        let (replies, _) = parse_replies(&bytes);
        eprintln!(
            "large body: {context}: write {:?}, {} response(s), closed: {closed}, first: {:?}",
            write.as_ref().err(),
            replies.len(),
            String::from_utf8_lossy(&bytes).lines().next()
        );
        let status = if path == "/infer" { 413 } else { V2_TOO_LARGE };
        let first = replies
            .first()
            .unwrap_or_else(|| panic!("{context}: no response (write {write:?}): {bytes:?}"));
        assert_json_error(first, status, &context);
        assert_eq!(replies.len(), 1, "{context}: the body was answered as requests");
        assert!(closed, "{context}: the connection stayed open with the body unread");
    }
}

/// Python's http.client, as a user would run it, reads the refusal of a
/// too-large body.
fn python_client_reads_the_refusal(addr: SocketAddr) {
    let host = addr.ip().to_string();
    let port = addr.port().to_string();
    for (path, size) in [
        ("/infer", 1024 * 1024),
        ("/infer", 20 * 1024 * 1024),
        (V2_INFER, 1024 * 1024),
    ] {
        let context = format!("python http.client, {size} bytes to {path} (limit {SMALL_MAX_BODY})");
        let size_arg = size.to_string();
        let (code, out, err) = run_bounded(
            "python3",
            &["-c", PYTHON_CLIENT, &host, &port, path, &size_arg],
            Duration::from_secs(60),
        );
        eprintln!("large body: {context}: {}", out.trim());
        assert_eq!(code, Some(0), "{context}: python failed: {err}");
        let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{context}: {e}: {out}"));
        let want = if path == "/infer" { 413 } else { V2_TOO_LARGE };
        assert_eq!(
            v["status"], want,
            "{context}: the client could not read the refusal: {v}"
        );
        let body: Value = serde_json::from_str(v["body"].as_str().unwrap()).expect("a JSON error body");
        assert!(
            body["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{context}: {body}"
        );
    }
}

/// curl, with and without `Expect`, reads the 413 of a too-large body
/// (skipped, saying so, where there is no curl).
fn curl_reads_the_refusal(addr: SocketAddr) {
    match Command::new("curl").arg("--version").output() {
        Ok(o) if o.status.success() => {
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), vec![b' '; 1024 * 1024]).unwrap();
            let data = format!("@{}", file.path().display());
            let target = url(addr, "/infer");
            for (expect, name) in [("Expect:", "without Expect"), ("Expect: 100-continue", "with Expect")] {
                let context = format!("curl, 1 MiB to /infer {name} (limit {SMALL_MAX_BODY})");
                let args = [
                    "-sS",
                    "--max-time",
                    "30",
                    "-H",
                    "Content-Type: application/json",
                    "-H",
                    expect,
                    "--data-binary",
                    &data,
                    "-w",
                    "\n%{http_code}",
                    &target,
                ];
                let (code, out, err) = run_bounded("curl", &args, Duration::from_secs(60));
                eprintln!("large body: {context}: exit {code:?}, {:?} {}", out.trim(), err.trim());
                let (body, status) = out.trim().rsplit_once('\n').unwrap_or(("", out.trim()));
                assert_eq!(status, "413", "{context}: curl exit {code:?}: {err} (output {out:?})");
                let body: Value =
                    serde_json::from_str(body).unwrap_or_else(|e| panic!("{context}: not JSON ({e}): {body:?}"));
                assert_eq!(body["type"], "too_large", "{context}: {body}");
            }
        }
        _ => eprintln!("large body: SKIPPED the curl sub-check: no `curl` on PATH"),
    }
}

#[test]
fn expect_continue_is_gated_and_refused_large_bodies_are_readable() {
    client_thread();
    let fixture = Fixture::load(FIXTURE);
    let server = TestServer::start(small_body_config());
    let addr = server.addr();
    let reference = Reference::take(addr, &fixture);
    expect_over_limit_or_form_types_is_refused(addr);
    expect_allowed_is_continued(addr, &reference);
    large_raw_bodies_get_a_readable_refusal(addr);
    python_client_reads_the_refusal(addr);
    curl_reads_the_refusal(addr);
    reference.assert_unchanged(addr, "after the Expect and large-body clients");
    assert_no_server_panics("Expect and large bodies");
    server.shutdown();
}

// ---- 4. browser-form content types -------------------------------------------------

#[test]
fn browser_form_content_types_get_415_and_v2_content_types_still_work() {
    client_thread();
    let fixture = Fixture::load(FIXTURE);
    let server = TestServer::start(fixture_config(FIXTURE, MODE));
    let addr = server.addr();
    let reference = Reference::take(addr, &fixture);
    let body = reference.infer_body.clone();

    for path in ["/infer", V2_INFER, "/no-such-path"] {
        for content_type in [
            "text/plain",
            "Text/Plain; charset=utf-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ] {
            let context = format!("POST {path} with Content-Type: {content_type}");
            let request = raw_request("POST", path, &[("Content-Type", content_type)], body.as_bytes());
            let reply = raw_exchange(addr, &request).expect_response(&context);
            assert_json_error(&reply, 415, &context);
        }
    }
    // What tritonclient sends: JSON as application/json or with no content
    // type, binary tensors as application/octet-stream.
    let v2 = reference.v2_body.as_bytes();
    reference.assert_v2_unchanged(addr, &[("Content-Type", "application/json")], v2, "v2 application/json");
    reference.assert_v2_unchanged(addr, &[], v2, "v2 with no content type");
    reference.assert_v2_unchanged(
        addr,
        &[("Content-Type", "application/octet-stream")],
        v2,
        "v2 JSON as application/octet-stream",
    );
    let payload: Vec<u8> = [&fixture.inputs[3], &fixture.inputs[4]]
        .iter()
        .flat_map(|r| r.iter())
        .flat_map(|&x| (x as f32).to_le_bytes())
        .collect();
    let header = json!({ "inputs": [{ "name": "features", "shape": [2, fixture.dims.input], "datatype": "FP32",
                                      "parameters": { "binary_data_size": payload.len() } }] })
    .to_string();
    let header_len = header.len().to_string();
    let mut binary = header.into_bytes();
    binary.extend_from_slice(&payload);
    reference.assert_v2_unchanged(
        addr,
        &[
            ("Content-Type", "application/octet-stream"),
            ("Inference-Header-Content-Length", &header_len),
        ],
        &binary,
        "v2 binary tensors as application/octet-stream",
    );

    reference.assert_unchanged(addr, "after the browser-form requests");
    assert_no_server_panics("browser-form content types");
    server.shutdown();
}

// ---- 5. worker faults -----------------------------------------------------------------

fn restarts(m: &Metrics) -> f64 {
    m.sum("tokitai_worker_restarts_total", &[])
}

/// Polls `/readyz` until 200 (bounded); 503 in between is allowed.
fn wait_ready_again(addr: SocketAddr, context: &str) -> Duration {
    let agent = agent();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(30);
    loop {
        match try_get(&agent, &url(addr, "/readyz")) {
            Ok(r) if r.status == 200 => return start.elapsed(),
            Ok(r) => assert_eq!(r.status, 503, "{context}: /readyz: {}", r.text()),
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "{context}: /readyz not 200 again within 30 s"
        );
        std::thread::sleep(POLL);
    }
}

#[test]
fn worker_faults_answer_500_and_the_pool_recovers() {
    client_thread();
    let fixture = Fixture::load(FIXTURE);
    let mut config = fixture_config(FIXTURE, MODE);
    config.workers.count = 1;
    let server = TestServer::start(config);
    let addr = server.addr();
    let reference = Reference::take(addr, &fixture);
    let agent = agent();
    let poisoned = |value: f32| {
        let mut row = fixture.inputs[7].clone();
        row[0] = f64::from(value);
        row
    };

    // A panic while the answers are handed out: 500, then 200.
    let before = restarts(&server.metrics());
    let body = single_body(&poisoned(FAULT_INJECTION_ANSWER_PANIC_VALUE));
    let reply = post(&agent, &url(addr, "/infer"), &body, &[]);
    reply.assert_error(500, "internal", "a panic while answers are handed out (/infer)");
    reference.assert_unchanged(addr, "after the answer panic on /infer");
    let v2 = v2_json_body(&[&poisoned(FAULT_INJECTION_ANSWER_PANIC_VALUE)], "");
    let reply = post(&agent, &url(addr, V2_INFER), &v2, &[]);
    assert_json_error(&reply, 500, "a panic while answers are handed out (v2)");
    reference.assert_unchanged(addr, "after the answer panic on v2");
    let after = server.wait_metrics("two session rebuilds", |m| restarts(m) >= before + 2.0);
    assert_eq!(restarts(&after), before + 2.0, "one rebuild per answer panic");

    // The worker's actor ends: that request 500, the worker is replaced.
    let mut problems = Vec::new();
    for (n, path) in ["/infer", V2_INFER].into_iter().enumerate() {
        let context = format!("a worker that ends ({path})");
        let before = restarts(&server.metrics());
        let row = poisoned(FAULT_INJECTION_EXIT_VALUE);
        let reply = if path == "/infer" {
            post(&agent, &url(addr, path), &single_body(&row), &[])
        } else {
            post(&agent, &url(addr, path), &v2_json_body(&[&row], ""), &[])
        };
        eprintln!(
            "worker faults: {context}: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
                .chars()
                .take(200)
                .collect::<String>()
        );
        let after = server.wait_metrics(&format!("{context}: a restart"), |m| restarts(m) > before);
        let took = wait_ready_again(addr, &context);
        eprintln!(
            "worker faults: {context}: restarts {before} -> {}, ready again after {took:?} (replacement {})",
            restarts(&after),
            n + 1
        );
        assert_eq!(restarts(&after), before + 1.0, "{context}: one replacement");
        reference.assert_unchanged(addr, &format!("after {context}"));
        // Checked last, and for both routes, so the recovery is checked
        // whatever this request got.
        if reply.status == 500 {
            assert_json_error(&reply, 500, &context);
        } else {
            problems.push(format!(
                "{context}: the request whose batch ended the worker got {}, not 500: {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
                    .chars()
                    .take(120)
                    .collect::<String>()
            ));
        }
    }
    assert!(problems.is_empty(), "worker faults:\n{}", problems.join("\n"));
    assert_eq!(get(&agent, &url(addr, "/readyz")).status, 200);
    assert_no_server_panics("worker faults");
    server.shutdown();
}

// ---- 6. malformed framing -----------------------------------------------------------

/// How a malformed request is sent, and what may come back.
#[derive(Clone, Copy, PartialEq)]
enum Framing {
    /// The server cannot tell where the request ends: at most one 4xx
    /// response, then the connection is closed (anything more would be
    /// bytes of this request answered as another).
    Broken,
    /// Like `Broken`, and the client half-closes after sending (a body
    /// cut short by EOF): nothing computed from the partial body (no 200).
    CutShort,
    /// A chunked body whose chunk is cut short by the client's own
    /// half-close. actix-http's dispatcher ends the payload normally at a
    /// read EOF (`payload.feed_eof()` in `h1/dispatcher.rs`) instead of
    /// failing it, so the engine cannot tell the body was cut: the known
    /// limitation (README, "Limits, timeouts and hostile input"). What is
    /// asserted: a 4xx or a close, or else exactly one answer, computed from
    /// exactly the bytes that arrived (here a whole valid body), then close.
    ChunkCutShort,
    /// The framing is sound but the request is refused: a 4xx, and a
    /// request pipelined after it is either answered correctly or not at
    /// all (closed).
    Refused,
}

/// A request that must be answered as itself when pipelined after a refused one.
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

/// The malformed framings, each named, with what the server may do with it,
/// built around the valid `/infer` body `body`.
fn framing_cases(body: &str) -> Vec<(&'static str, Framing, Vec<u8>)> {
    let post = |extra: &str, tail: &[u8]| {
        let mut r = format!("POST /infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{extra}\r\n")
            .into_bytes();
        r.extend_from_slice(tail);
        r
    };
    let big = "a".repeat(100 * 1024);
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let len = body.len();
    let b = body.as_bytes();
    let over_limit_chunked = [
        format!("{:x}\r\n", SMALL_MAX_BODY + 1).as_bytes(),
        &vec![b' '; SMALL_MAX_BODY + 1],
        b"\r\n0\r\n\r\n",
    ]
    .concat();
    let chunked_body = [format!("{len:x}\r\n").as_bytes(), b, b"\r\n"].concat();
    use Framing::*;
    vec![
        ("Content-Length: abc", Broken, post("Content-Length: abc\r\n", b)),
        ("Content-Length: -5", Broken, post("Content-Length: -5\r\n", b)),
        (
            "Content-Length past u64",
            Broken,
            post("Content-Length: 99999999999999999999999999\r\n", b),
        ),
        (
            "two different Content-Lengths",
            Broken,
            post(&format!("Content-Length: {len}\r\nContent-Length: 3\r\n"), b),
        ),
        (
            "Content-Length and chunked, a request smuggled after",
            Broken,
            post(
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                &[b"0\r\n\r\n".as_slice(), HEALTHZ].concat(),
            ),
        ),
        (
            "chunk size not hex",
            Broken,
            post("Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "chunk size past u64",
            Broken,
            post(
                "Transfer-Encoding: chunked\r\n",
                b"fffffffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunk without its CRLF",
            Broken,
            post("Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX0\r\n\r\n"),
        ),
        (
            "a header line without a colon",
            Broken,
            post("NoColonHere\r\nContent-Length: 2\r\n", b"{}"),
        ),
        (
            "a TLS ClientHello",
            Broken,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\x00\x00".to_vec(),
        ),
        (
            "a binary request line",
            Broken,
            b"\x00\xff\xfe GARBAGE\r\n\r\n".to_vec(),
        ),
        (
            "HTTP/9.9",
            Broken,
            b"GET /healthz HTTP/9.9\r\nHost: localhost\r\n\r\n".to_vec(),
        ),
        (
            "a chunk larger than what is sent, then EOF",
            CutShort,
            post("Transfer-Encoding: chunked\r\n", b"100000\r\n{\"features\": ["),
        ),
        (
            "a whole JSON body in a chunk declared larger, then EOF",
            ChunkCutShort,
            post(
                "Transfer-Encoding: chunked\r\n",
                &[format!("{:x}\r\n", len + 64).as_bytes(), b].concat(),
            ),
        ),
        (
            "a whole JSON body, Content-Length 64 more, then EOF",
            CutShort,
            post(&format!("Content-Length: {}\r\n", len + 64), b),
        ),
        (
            "a whole JSON body in chunks, no last chunk, then EOF",
            ChunkCutShort,
            post("Transfer-Encoding: chunked\r\n", &chunked_body),
        ),
        (
            "chunked over the body limit",
            Refused,
            post("Transfer-Encoding: chunked\r\n", &over_limit_chunked),
        ),
        (
            "a 100 KB path",
            Refused,
            format!("GET /{big} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes(),
        ),
        (
            "a 100 KB header line",
            Refused,
            post(&format!("Content-Length: {len}\r\nX-Big: {big}\r\n"), b),
        ),
        (
            "200 headers",
            Refused,
            post(&format!("Content-Length: {len}\r\n{many_headers}"), b),
        ),
    ]
}

/// Sends `request` on a fresh connection (half-closing it where the
/// framing is cut short, pipelining [`HEALTHZ`] where it is refused) and
/// reads (bounded) until the server closes: the bytes, whether it closed,
/// and the write error, if any.
fn send_framing_case(addr: SocketAddr, framing: Framing, request: &[u8]) -> (Vec<u8>, bool, Option<std::io::Error>) {
    use Framing::*;
    let mut stream = connect(addr);
    let mut write = stream.write_all(request).err();
    match framing {
        CutShort | ChunkCutShort => {
            let _ = stream.shutdown(Shutdown::Write);
        }
        Refused => write = write.or_else(|| stream.write_all(HEALTHZ).err()),
        Broken => {}
    }
    let (bytes, closed) = read_until(&mut stream, Duration::from_secs(10), |_| false);
    (bytes, closed, write)
}

/// What is wrong with the server's `bytes` (and whether it `closed`) for a
/// request framed as `framing`: nothing, or each problem in words.
/// `reference` is the answer the whole valid body gets.
fn framing_problems(framing: Framing, bytes: &[u8], closed: bool, reference: &Value) -> Vec<String> {
    use Framing::*;
    let mut problems = Vec::new();
    let (replies, used) = parse_replies(bytes);
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    if used < bytes.len() {
        problems.push(format!("an incomplete response: {:?}", String::from_utf8_lossy(bytes)));
    }
    // The one 200 the chunk gap allows is the answer to the whole body sent.
    let answer_to_body = |r: &&Reply| {
        framing == ChunkCutShort
            && r.status == 200
            && serde_json::from_slice::<Value>(&r.body).ok().as_ref() == Some(reference)
    };
    if let Some(first) = replies
        .first()
        .filter(|r| !(400..500).contains(&r.status) && !answer_to_body(r))
    {
        problems.push(format!(
            "status {} (body {:?}), not a 4xx",
            first.status,
            String::from_utf8_lossy(&first.body)
                .chars()
                .take(120)
                .collect::<String>()
        ));
    }
    match framing {
        // Bytes after a malformed request may be refused (the engine
        // poisons a connection framed ambiguously), never served.
        Broken | CutShort | ChunkCutShort if replies.iter().skip(1).any(|r| !(400..500).contains(&r.status)) => {
            problems.push(format!(
                "{} responses on one connection (statuses {statuses:?}): bytes after the malformed request were \
                 answered as another request",
                replies.len()
            ))
        }
        Refused if replies.len() > 2 || replies.get(1).is_some_and(|r| r.status != 200) => problems.push(format!(
            "statuses {statuses:?}: the request pipelined after the refused one was not answered as itself"
        )),
        _ => {}
    }
    if !closed {
        problems.push("the connection stayed open".into());
    }
    problems
}

#[test]
fn malformed_framing_gets_4xx_or_a_closed_connection() {
    client_thread();
    let fixture = Fixture::load(FIXTURE);
    let server = TestServer::start(small_body_config());
    let addr = server.addr();
    let reference = Reference::take(addr, &fixture);
    let mut problems = Vec::new();
    for (name, framing, request) in framing_cases(&reference.infer_body) {
        let (bytes, closed, write) = send_framing_case(addr, framing, &request);
        let (replies, _) = parse_replies(&bytes);
        let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
        eprintln!(
            "framing: {name}: statuses {statuses:?}, closed: {closed}, write error: {write:?}{}",
            replies
                .first()
                .map(|r| format!(", first body {:?}", String::from_utf8_lossy(&r.body)))
                .unwrap_or_default()
        );
        // Every case runs before the verdict, so one failure shows them all.
        let found = framing_problems(framing, &bytes, closed, &reference.infer);
        problems.extend(found.into_iter().map(|what| format!("{name}: {what}")));
        reference.assert_unchanged(addr, &format!("after {name}"));
    }
    assert!(problems.is_empty(), "malformed framing:\n{}", problems.join("\n"));
    assert_eq!(get(&agent(), &url(addr, "/healthz")).status, 200);
    assert_no_server_panics("malformed framing");
    server.shutdown();
}
