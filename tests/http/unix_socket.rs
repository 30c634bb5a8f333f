//! The Unix domain socket listeners (issue 23): `server.unix_socket` serves
//! the same HTTP routes as TCP, `grpc.unix_socket` the same gRPC service,
//! each file gets its `*_mode` permission bits, a stale socket file is
//! replaced, a live one or a file that is not a socket fails start-up
//! naming the setting (and is left alone), and the files are removed on
//! shutdown: the in-process stop, SIGTERM to the real binary (after the
//! drain: a request already sent on the socket is answered), and a
//! start-up that fails after the bind. The connection guard holds there
//! too: an answer the client does not read is closed after its send
//! deadline.
//!
//! Raw HTTP goes through `std::os::unix::net::UnixStream` with `Host:
//! localhost` (the Host rule is a loopback bind's); curl `--unix-socket`
//! is used where installed (skipped, saying so, elsewhere; required in CI).
//! gRPC uses the tonic client through a Unix stream connector, and
//! tritonclient (`tests/triton/uds_check.py`, with the venv `.ci/run` makes).

use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::common::grpc::{GrpcClient, rows_request, runtime};
use crate::common::slow::{peer_closed, unread_bytes};
use crate::common::*;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokitai_serve::config::Config;
use tokitai_serve::embed::ServerThread;
use tokitai_serve::grpc::pb::ServerReadyRequest;
use tokitai_serve::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;

/// Longest wait for a server to answer on its socket or to exit.
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);

/// `base_config` with both sockets in `dir`, the HTTP one with mode 600.
fn socket_config(dir: &Path) -> Config {
    let mut config = base_config();
    config.workers.count = 1;
    config.server.unix_socket = Some(dir.join("http.sock"));
    config.server.unix_socket_mode = "600".into();
    config.grpc.unix_socket = Some(dir.join("grpc.sock"));
    config.grpc.unix_socket_mode = "0640".into();
    config
}

fn sidecar_body() -> String {
    json!({ "features": vec![0.25; nano_dims().input] }).to_string()
}

fn v2_body() -> String {
    let d = nano_dims().input;
    json!({"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, d], "data": vec![0.5; 2 * d]}]}).to_string()
}

// ---- HTTP over the socket ---------------------------------------------------

/// Reads one response from `stream` (bounded by its read timeout), with
/// the raw-socket harness's parser.
fn read_reply(stream: &mut UnixStream) -> std::io::Result<Reply> {
    match read_response(stream, None) {
        RawOutcome::Response(reply) => Ok(reply),
        other => Err(std::io::Error::other(format!("no complete response: {other:?}"))),
    }
}

fn connect(path: &Path) -> std::io::Result<UnixStream> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.set_write_timeout(Some(WAIT))?;
    Ok(stream)
}

/// One raw request (`raw_request`: `Host: localhost`, `Connection: close`)
/// over a new connection to the socket at `path`.
fn uds_exchange(path: &Path, request: &[u8]) -> std::io::Result<Reply> {
    let mut stream = connect(path)?;
    stream.write_all(request)?;
    read_reply(&mut stream)
}

fn uds(path: &Path, method: &str, route: &str, body: &str) -> Reply {
    let request = raw_request(method, route, &[("Content-Type", "application/json")], body.as_bytes());
    uds_exchange(path, &request).unwrap_or_else(|e| panic!("{method} {route} over {}: {e}", path.display()))
}

fn tcp(server: &TestServer, method: &str, route: &str, body: &str) -> Reply {
    let request = raw_request(method, route, &[("Content-Type", "application/json")], body.as_bytes());
    raw_exchange(server.addr(), &request).expect_response(&format!("{method} {route} over TCP"))
}

/// Polls `GET /readyz` on the socket until it answers 200 (bounded).
fn wait_ready_on(path: &Path) {
    let start = Instant::now();
    while start.elapsed() < WAIT {
        if uds_exchange(path, &raw_request("GET", "/readyz", &[], b"")).is_ok_and(|r| r.status == 200) {
            return;
        }
        std::thread::sleep(POLL);
    }
    panic!("{} never answered /readyz with 200", path.display());
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat the socket").permissions().mode() & 0o777
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[test]
fn every_route_family_answers_on_the_socket_as_on_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let config = socket_config(dir.path());
    let http_sock = dir.path().join("http.sock");
    let grpc_sock = dir.path().join("grpc.sock");
    let server = TestServer::start(config);
    assert_eq!(mode_of(&http_sock), 0o600, "server.unix_socket_mode");
    assert_eq!(mode_of(&grpc_sock), 0o640, "grpc.unix_socket_mode");

    // The sidecar's /infer and v2 infer: the same bytes as over TCP.
    for (route, body) in [("/infer", sidecar_body()), ("/v2/models/tokitai-moe/infer", v2_body())] {
        let over_uds = uds(&http_sock, "POST", route, &body);
        let over_tcp = tcp(&server, "POST", route, &body);
        assert_eq!(over_uds.status, 200, "{route}: {}", over_uds.text());
        assert_eq!(
            over_uds.body, over_tcp.body,
            "{route}: the socket's answer differs from TCP's"
        );
    }
    for route in [
        "/healthz",
        "/readyz",
        "/v2/health/ready",
        "/v2",
        "/v2/models/tokitai-moe",
    ] {
        let r = uds(&http_sock, "GET", route, "");
        assert_eq!(r.status, 200, "GET {route}: {}", r.text());
    }
    // The socket's requests are observed like TCP's: one /infer of each.
    let metrics = Metrics::parse(&uds(&http_sock, "GET", "/metrics", "").text());
    let infer_ok = metrics.requests_by_status("/infer").get(&200).copied();
    assert_eq!(infer_ok, Some(2), "/metrics over the socket:\n{}", metrics.text);
    uds(&http_sock, "GET", "/nowhere", "").assert_error(404, "not_found", "an unknown route");
    // The Host rule of a loopback bind: a rebinding page's name is refused.
    let rebinding = String::from_utf8(raw_request("GET", "/readyz", &[], b""))
        .unwrap()
        .replace("Host: localhost", "Host: evil.example");
    uds_exchange(&http_sock, rebinding.as_bytes()).unwrap().assert_error(
        403,
        "forbidden",
        "Host: evil.example on the socket",
    );
    curl_over_the_socket(&server, &http_sock);
    grpc_over_the_socket(&server, &grpc_sock);

    server.shutdown();
    assert!(!http_sock.exists(), "the HTTP socket file is removed on stop");
    assert!(!grpc_sock.exists(), "the gRPC socket file is removed on stop");
}

/// Whether curl is here; in CI its absence fails.
fn have_curl() -> bool {
    let found = Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CI").is_err(), "curl is required in CI");
        eprintln!("skipped: curl --unix-socket (no curl)");
    }
    found
}

/// `curl --unix-socket` (its own `Host: localhost`) gets TCP's answer.
fn curl_over_the_socket(server: &TestServer, path: &Path) {
    if !have_curl() {
        return;
    }
    let body = sidecar_body();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "--unix-socket"])
        .arg(path)
        .args(["-H", "Content-Type: application/json", "--data-binary", &body])
        .arg("http://localhost/infer")
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        out.stdout,
        tcp(server, "POST", "/infer", &body).body,
        "curl over the socket vs TCP"
    );
}

/// A tonic connector that dials the Unix socket whatever the URI says.
#[derive(Clone)]
struct UnixConnector(PathBuf);

impl tonic::codegen::Service<::http::Uri> for UnixConnector {
    type Response = TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: ::http::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) })
    }
}

async fn unix_client(path: &Path) -> GrpcClient {
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(UnixConnector(path.to_path_buf()))
        .await
        .expect("connect to the gRPC socket");
    GrpcInferenceServiceClient::new(channel)
}

/// ModelInfer over the socket answers what it answers over TCP.
fn grpc_over_the_socket(server: &TestServer, path: &Path) {
    let rt = runtime();
    rt.block_on(async {
        let mut over_uds = unix_client(path).await;
        let mut over_tcp = crate::common::grpc::client(server.grpc_addr()).await;
        let ready = over_uds.server_ready(ServerReadyRequest {}).await.expect("ServerReady");
        assert!(ready.into_inner().ready);
        let a = over_uds
            .model_infer(rows_request(3))
            .await
            .expect("ModelInfer over the socket");
        let b = over_tcp
            .model_infer(rows_request(3))
            .await
            .expect("ModelInfer over TCP");
        let (a, b) = (a.into_inner(), b.into_inner());
        assert!(!a.raw_output_contents.is_empty());
        assert_eq!(
            a.raw_output_contents, b.raw_output_contents,
            "gRPC outputs, socket vs TCP"
        );
    });
}

/// A v2 binary request for `rows` rows of 0.25, answered as JSON (about
/// 270 bytes a row).
fn big_v2_request(rows: usize) -> Vec<u8> {
    let d = nano_dims().input;
    let payload: Vec<u8> = std::iter::repeat_n(0.25f32.to_le_bytes(), rows * d).flatten().collect();
    let header = json!({ "inputs": [{ "name": "features", "shape": [rows, d], "datatype": "FP32",
        "parameters": { "binary_data_size": payload.len() } }] })
    .to_string();
    let mut out = format!(
        "POST /v2/models/tokitai-moe/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n\
         Inference-Header-Content-Length: {}\r\nContent-Length: {}\r\n\r\n",
        header.len(),
        header.len() + payload.len()
    )
    .into_bytes();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&payload);
    out
}

/// The connection guard holds on the socket as on TCP: an answer the
/// client does not read is closed once it has not drained within
/// `server.send_timeout_ms` (its request's deadline here, the later one).
#[test]
fn an_unread_answer_on_the_socket_is_closed_after_its_send_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = socket_config(dir.path());
    config.server.send_timeout_ms = 300;
    config.server.request_timeout_ms = 6000;
    let path = dir.path().join("http.sock");
    let server = TestServer::start(config);
    let mut stream = connect(&path).unwrap();
    // About 1 MiB of answer: far more than the socket buffers hold.
    stream.write_all(&big_v2_request(4096)).expect("send the request");
    let start = Instant::now();
    while unread_bytes(&stream) == 0 {
        assert!(start.elapsed() < WAIT * 2, "no answer began to arrive");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        peer_closed(&stream, WAIT),
        "an unread answer on the socket was not closed"
    );
    println!(
        "unread answer closed {:.2} s after it began",
        start.elapsed().as_secs_f64()
    );
    // The server serves on, on both transports.
    assert_eq!(uds(&path, "GET", "/readyz", "").status, 200);
    assert_eq!(tcp(&server, "GET", "/readyz", "").status, 200);
    drop(stream);
    server.shutdown();
}

/// The Python environment with tritonclient (`TOKITAI_TRITON_VENV`, else
/// `target/triton-venv`, as `.ci/run` makes it); `None`, saying so, where
/// there is none (required in CI).
fn triton_python() -> Option<PathBuf> {
    let dir = std::env::var_os("TOKITAI_TRITON_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/triton-venv")));
    let python = dir.join("bin/python");
    if python.exists() {
        return Some(python);
    }
    assert!(
        std::env::var("CI").is_err(),
        "no tritonclient venv at {}",
        dir.display()
    );
    eprintln!(
        "skipped: tritonclient over the Unix socket (no venv at {})",
        dir.display()
    );
    None
}

/// Triton's own gRPC client over the socket (with `grpc.default_authority
/// = localhost`: see `tests/triton/uds_check.py`) answers what it answers
/// over TCP.
#[test]
fn tritonclient_grpc_over_the_socket() {
    let Some(python) = triton_python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(socket_config(dir.path()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/triton/uds_check.py");
    let out = Command::new(python)
        .arg(script)
        .arg(dir.path().join("grpc.sock"))
        .arg(server.grpc_addr().to_string())
        .arg("tokitai-moe")
        .output()
        .expect("run uds_check.py");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("PASS"),
        "uds_check.py:\n{stdout}\n{stderr}"
    );
    server.shutdown();
}

// ---- the socket file's lifecycle ---------------------------------------------

/// `ServerThread::spawn`'s error for `config` (it must not start).
fn spawn_error(config: Config) -> std::io::Error {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    match ServerThread::spawn("uds-refused", listener, config) {
        Ok(_) => panic!("the server started"),
        Err(e) => e,
    }
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refuses_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("http.sock");
    let mut config = socket_config(dir.path());
    config.grpc.unix_socket = None;

    // Another process's live socket: start-up fails naming the setting,
    // and that socket keeps working.
    let live = UnixListener::bind(&path).unwrap();
    let error = spawn_error(config.clone());
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse, "{error}");
    assert!(error.to_string().contains("server.unix_socket"), "{error}");
    drop(UnixStream::connect(&path).expect("the live socket still accepts"));
    drop(live);

    // Its process is gone, its file stays: stale, replaced.
    assert!(is_socket(&path));
    let server = TestServer::start(config);
    assert_eq!(uds(&path, "POST", "/infer", &sidecar_body()).status, 200);
    server.shutdown();
    assert!(!path.exists());
}

#[test]
fn a_file_that_is_not_a_socket_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grpc.sock");
    std::fs::write(&path, b"not a socket").unwrap();
    let config = socket_config(dir.path());
    let error = spawn_error(config);
    assert!(error.to_string().contains("grpc.unix_socket"), "{error}");
    assert!(error.to_string().contains("not a socket"), "{error}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    // The HTTP socket, bound just before, was removed again.
    assert!(!dir.path().join("http.sock").exists());
}

#[test]
fn the_socket_is_removed_when_start_up_fails_after_the_bind() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = socket_config(dir.path());
    config.model.arch = Some(dir.path().join("missing-arch.json"));
    config.model.checkpoint = Some(dir.path().join("missing-checkpoint.tkp1"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = ServerThread::spawn("uds-failing", listener, config).expect("the sockets bind");
    assert!(is_socket(server.unix_socket().unwrap()));
    let error = server.stop().expect_err("the model cannot load");
    assert!(error.contains("model"), "{error}");
    assert!(
        !dir.path().join("http.sock").exists(),
        "HTTP socket left after a failed start"
    );
    assert!(
        !dir.path().join("grpc.sock").exists(),
        "gRPC socket left after a failed start"
    );
}

/// The real binary with both sockets in `dir`.
fn binary_command(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("TOKITAI_SERVER_UNIX_SOCKET", dir.join("http.sock"))
        .env("TOKITAI_GRPC_UNIX_SOCKET", dir.join("grpc.sock"))
        // A quoted string: an environment value is read as TOML first.
        .env("TOKITAI_SERVER_UNIX_SOCKET_MODE", "\"600\"")
        .env("TOKITAI_SERVER_SHUTDOWN_TIMEOUT_SECS", "10")
        .env("TOKITAI_WORKERS_COUNT", "1")
        .stderr(Stdio::inherit());
    cmd
}

/// [`binary_command`], with a lone row held in the queue for a second (so
/// a test can see it queued before it is computed).
fn holding_binary_command(dir: &Path) -> Command {
    let mut cmd = binary_command(dir);
    cmd.env("TOKITAI_BATCHING_MAX_QUEUE_DELAY_US", "1000000");
    cmd
}

#[test]
fn sigterm_answers_what_was_sent_on_the_socket_then_removes_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let (http_sock, grpc_sock) = (dir.path().join("http.sock"), dir.path().join("grpc.sock"));
    let mut server = ProcessServer::start_with(holding_binary_command(dir.path()));
    wait_ready_on(&http_sock);
    assert_eq!(mode_of(&http_sock), 0o600);
    assert!(is_socket(&grpc_sock));

    // A keep-alive connection, accepted and served once; its second
    // request is sent just before SIGTERM and must still be answered.
    let mut stream = connect(&http_sock).unwrap();
    let body = sidecar_body();
    let keep_alive = raw_request(
        "POST",
        "/infer",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    );
    let keep_alive = String::from_utf8(keep_alive)
        .unwrap()
        .replace("Connection: close\r\n", "");
    stream.write_all(keep_alive.as_bytes()).unwrap();
    let first = read_reply(&mut stream).expect("the first answer");
    assert_eq!(first.status, 200);
    stream.write_all(keep_alive.as_bytes()).unwrap();
    // SIGTERM only once the engine has accepted it (a request read after
    // SIGTERM is refused 503 by design): the queue delay holds its lone row
    // for a second, and /metrics shows it queued.
    wait_metrics_at(&server.url("/metrics"), "the second request queued", |m| {
        m.sum("tokitai_queue_depth_rows", &[]) == 1.0
    });
    server.signal("TERM");
    let second = read_reply(&mut stream).expect("the request sent before SIGTERM is answered");
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(second.body, first.body);

    let status = server.wait_exit(WAIT).expect("the server exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(!http_sock.exists(), "the HTTP socket file is removed on SIGTERM");
    assert!(!grpc_sock.exists(), "the gRPC socket file is removed on SIGTERM");
}

#[test]
fn the_binary_refuses_to_start_on_a_live_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("http.sock");
    let _live = UnixListener::bind(&path).unwrap();
    let mut child = binary_command(dir.path())
        .env("TOKITAI_MODEL_BIND_ADDR", "127.0.0.1:0")
        .env("TOKITAI_GRPC_BIND", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tokitai-serve");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            panic!("the binary did not refuse to start");
        }
        std::thread::sleep(POLL);
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("server.unix_socket") && stderr.contains("another process is listening"),
        "{stderr}"
    );
    assert!(is_socket(&path), "the live socket is left alone");
    assert!(!dir.path().join("grpc.sock").exists());
}
