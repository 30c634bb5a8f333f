//! The gRPC service against hostile and careless clients, over real HTTP/2
//! on ephemeral ports (a tonic client, and raw HTTP/2 frames via `h2`):
//! oversized messages, wrong datatypes, overflowing shapes, raw contents
//! whose length disagrees with the shape, duplicate outputs, unknown models
//! and methods, malformed deadlines, a deadline that passes in the queue, a
//! call the client abandons, and a client that opens every stream it may and
//! stalls. Each gets a client-class status (never a panic, never INTERNAL),
//! its rows are not computed, memory stays bounded, and the server keeps
//! serving others. Sockets that never speak are closed after the handshake
//! timeout and never keep a real client out. Also: the statistics extension agrees between HTTP and
//! gRPC, and SIGTERM drains gRPC calls in flight.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::grpc::{GrpcClient, INFER, MODEL, client, rows_request, runtime, send_raw_infer};
use crate::common::process::rss_bytes;
use crate::common::{Metrics, ProcessServer, TestServer, agent, base_config, get, nano_dims, wait_metrics_at};
use bytes::Bytes;
use tokitai_serve::config::Config;
use tokitai_serve::grpc::pb::model_infer_request::InferRequestedOutputTensor;
use tokitai_serve::grpc::pb::{self, ModelInferRequest};
use tonic::Code;

fn raw(values: &[f32]) -> Bytes {
    values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()
}

/// [`rows_request`] with the request id `h`.
fn request(rows: usize) -> ModelInferRequest {
    ModelInferRequest {
        id: "h".into(),
        ..rows_request(rows)
    }
}

fn grpc_count(m: &Metrics, route: &str, code: &str) -> f64 {
    m.sum("tokitai_grpc_requests_total", &[("route", route), ("code", code)])
}

/// The malformed `ModelInfer` requests, each with what it is and the code
/// it must get.
fn malformed_infer_cases() -> Vec<(&'static str, ModelInferRequest, Code)> {
    let d = nano_dims().input as i64;
    let mut cases: Vec<(&str, ModelInferRequest, Code)> = Vec::new();
    // 96 KiB of raw contents: over server.max_body_bytes (64 KiB).
    let mut big = request(1);
    big.raw_input_contents = vec![Bytes::from(vec![0u8; 96 * 1024])];
    cases.push(("oversized", big, Code::OutOfRange));
    let mut r = request(1);
    r.inputs[0].datatype = "INT32".into();
    cases.push(("wrong datatype", r, Code::InvalidArgument));
    for shape in [
        vec![i64::MAX, d],
        vec![1 << 62, 1 << 62],
        vec![-1, d],
        vec![1, d, 1],
        vec![],
    ] {
        let mut r = request(1);
        r.inputs[0].shape = shape;
        cases.push(("bad shape", r, Code::InvalidArgument));
    }
    let mut r = request(2);
    r.raw_input_contents = vec![raw(&vec![0.0; 2 * d as usize - 1])];
    cases.push(("raw length disagrees with the shape", r, Code::InvalidArgument));
    let mut r = request(1);
    r.raw_input_contents.push(raw(&[1.0]));
    cases.push(("two raw contents for one input", r, Code::InvalidArgument));
    let mut r = request(1);
    let out = |n: &str| InferRequestedOutputTensor {
        name: n.into(),
        ..Default::default()
    };
    r.outputs = vec![out("logits"), out("logits")];
    cases.push(("duplicate outputs", r, Code::InvalidArgument));
    let mut r = request(1);
    r.outputs = vec![out("hidden_state")];
    cases.push(("unknown output", r, Code::InvalidArgument));
    let mut r = request(1);
    r.raw_input_contents = vec![raw(&vec![f32::NAN; d as usize])];
    cases.push(("non-finite values", r, Code::InvalidArgument));
    let mut r = request(1);
    r.model_name = "other".into();
    cases.push(("unknown model", r, Code::NotFound));
    let mut r = request(1);
    r.model_version = "999999".into();
    cases.push(("unknown version", r, Code::NotFound));
    cases.push(("too many rows", request(65), Code::InvalidArgument));
    cases
}

/// The repository index lists the served model; loading is for `explicit`
/// mode only (this server runs in `none`): UNAVAILABLE.
async fn assert_index_and_no_load_in_none_mode(c: &mut GrpcClient) {
    let index = c
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .expect("the repository index")
        .into_inner();
    let rows: Vec<_> = index
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.state.as_str()))
        .collect();
    assert_eq!(rows, vec![("tokitai-moe", "READY")]);
    let load = pb::RepositoryModelLoadRequest {
        model_name: "tokitai-moe".into(),
        ..Default::default()
    };
    let status = c.repository_model_load(load).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

/// Only the good request computed; every refusal was counted under its
/// code, none as an internal error.
fn assert_refusals_counted(server: &TestServer) {
    let m = server.metrics();
    assert_eq!(
        m.sum("tokitai_rows_computed_total", &[]),
        3.0,
        "only the good request computed"
    );
    assert_eq!(
        grpc_count(&m, INFER, "INTERNAL") + grpc_count(&m, INFER, "UNKNOWN"),
        0.0
    );
    assert_eq!(grpc_count(&m, INFER, "OUT_OF_RANGE"), 1.0, "{}", m.text);
    assert_eq!(grpc_count(&m, INFER, "NOT_FOUND"), 2.0);
    assert!(grpc_count(&m, INFER, "INVALID_ARGUMENT") >= 12.0);
}

#[test]
fn malformed_requests_get_client_errors_and_the_server_keeps_serving() {
    let mut config = base_config();
    config.server.max_body_bytes = 64 * 1024;
    config.batching.max_request_rows = 64;
    config.batching.max_queue_rows = 64;
    let server = TestServer::start(config);
    runtime().block_on(async {
        let mut c = client(server.grpc_addr()).await;
        for (what, req, want) in malformed_infer_cases() {
            let status = c.model_infer(req).await.expect_err(what);
            assert_eq!(status.code(), want, "{what}: {status:?}");
        }
        // A malformed deadline is the client's error too.
        let mut req = tonic::Request::new(request(1));
        req.metadata_mut().insert("grpc-timeout", "soon".parse().unwrap());
        assert_eq!(c.model_infer(req).await.unwrap_err().code(), Code::InvalidArgument);
        assert_index_and_no_load_in_none_mode(&mut c).await;
        // The same connection still serves.
        let answer = c.model_infer(request(3)).await.expect("a good request").into_inner();
        assert_eq!((answer.id.as_str(), answer.raw_output_contents.len()), ("h", 2));
        assert_eq!(answer.outputs[0].shape, vec![3, nano_dims().output as i64]);
    });
    assert_refusals_counted(&server);
    server.shutdown();
}

fn held_config() -> Config {
    let mut config = base_config();
    // Partial batches are held 300 ms, longer than the deadlines below.
    config.batching.max_queue_delay_us = 300_000;
    config.batching.regroup_delay_pct = 0;
    config
}

#[test]
fn a_passed_deadline_is_deadline_exceeded_and_an_abandoned_call_is_not_computed() {
    let server = TestServer::start(held_config());
    let rt = runtime();
    rt.block_on(async {
        let c = client(server.grpc_addr()).await;
        // Over raw HTTP/2, since tonic's client enforces a deadline itself:
        // the status is the server's.
        let status = raw_unary(server.grpc_addr(), &request(2), "20m").await;
        assert_eq!(status, "4", "DEADLINE_EXCEEDED");
        // A call the client abandons: its future dropped while the rows wait.
        let mut abandoned = c.clone();
        let call = tokio::spawn(async move { abandoned.model_infer(request(3)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        call.abort();
    });
    let m = server.wait_metrics("the abandoned rows dropped as cancelled", |m| {
        m.sum("tokitai_rows_dropped_total", &[("reason", "cancelled")]) >= 3.0
    });
    assert_eq!(m.sum("tokitai_rows_dropped_total", &[("reason", "timeout")]), 2.0);
    assert_eq!(m.sum("tokitai_rows_computed_total", &[]), 0.0);
    assert_eq!(grpc_count(&m, INFER, "DEADLINE_EXCEEDED"), 1.0);
    assert_eq!(
        m.sum(
            "tokitai_request_failures_total",
            &[("route", INFER), ("reason", "cancelled")]
        ),
        1.0
    );
    server.shutdown();
}

/// One unary `ModelInfer` over raw HTTP/2 with `grpc-timeout: {timeout}`:
/// the `grpc-status` the server answers with.
async fn raw_unary(addr: SocketAddr, req: &ModelInferRequest, timeout: &str) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let response = send_raw_infer(&mut h2, addr, req, timeout);
    let response = response.await.expect("an answer");
    if let Some(status) = response.headers().get("grpc-status") {
        return status.to_str().unwrap().to_string();
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        data.unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    trailers["grpc-status"].to_str().unwrap().to_string()
}

#[test]
fn a_client_that_opens_every_stream_and_stalls_is_bounded_and_ended() {
    // A process of its own: its memory is the server's alone (this test
    // binary's other tests run servers of their own at the same time).
    let mut server = ProcessServer::start(
        &[],
        &[
            ("TOKITAI_GRPC_MAX_CONCURRENT_STREAMS", "100"),
            ("TOKITAI_SERVER_REQUEST_TIMEOUT_MS", "500"),
            ("TOKITAI_SERVER_BODY_TIMEOUT_MS", "500"),
        ],
    );
    let grpc_addr = server.grpc_addr.expect("gRPC is on");
    let rt = runtime();
    let before = rss_bytes(server.pid());
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(grpc_addr).await.unwrap();
        let (h2, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
        tokio::spawn(connection);
        // One full call first, so the server's SETTINGS (its stream limit) are in.
        let live = http::Request::post(format!(
            "http://{}/inference.GRPCInferenceService/ServerLive",
            grpc_addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
        let mut h2 = h2.ready().await.expect("connection alive");
        let (live, mut body) = h2.send_request(live, false).unwrap();
        body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true).unwrap();
        assert_eq!(live.await.expect("ServerLive answered").status(), 200);
        // 300 calls: each declares a 60 KiB message, sends 1 KiB of it and
        // stalls. The server lets 100 be open at once; h2 holds the rest
        // until a slot frees.
        let mut stalled = Vec::new();
        for _ in 0..300 {
            h2 = h2.ready().await.expect("connection alive");
            let req = http::Request::post(format!("http://{}{INFER}", grpc_addr))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let (response, mut body) = h2.send_request(req, false).expect("open a stream");
            let mut frame = vec![0u8, 0, 0, 0xF0, 0];
            frame.extend(vec![7u8; 1024]);
            body.send_data(Bytes::from(frame), false)
                .expect("send part of a message");
            stalled.push((response, body));
        }
        // Another client is still served while they stall.
        let mut c = client(grpc_addr).await;
        c.model_infer(request(1))
            .await
            .expect("served beside the stalled streams");
        // Every stalled call is ended by the server (its message never came,
        // 1 s after it opened).
        for (response, _body) in stalled.drain(..) {
            let response = tokio::time::timeout(Duration::from_secs(10), response)
                .await
                .expect("the server ends a stalled call")
                .expect("an answer, not a reset");
            let status = response.headers().get("grpc-status").expect("a trailers-only status");
            assert_eq!(status, "4", "DEADLINE_EXCEEDED");
        }
    });
    let grown = rss_bytes(server.pid()).saturating_sub(before);
    assert!(grown < 128 << 20, "RSS grew by {} MiB", grown >> 20);
    let m = wait_metrics_at(&server.url("/metrics"), "stalled calls counted", |m| {
        grpc_count(m, INFER, "DEADLINE_EXCEEDED") >= 300.0
    });
    assert_eq!(m.sum("tokitai_rows_computed_total", &[]), 1.0);
    let _ = server.child.kill();
    let _ = server.child.wait();
}

#[test]
fn statistics_agree_between_http_and_grpc_and_health_agrees_with_http() {
    let server = TestServer::start(base_config());
    let rt = runtime();
    let (grpc_stats, ready) = rt.block_on(async {
        let mut c = client(server.grpc_addr()).await;
        for rows in [1, 4] {
            c.model_infer(request(rows)).await.unwrap();
        }
        let req = pb::ModelStatisticsRequest {
            name: MODEL.into(),
            version: String::new(),
        };
        let stats = c.model_statistics(req).await.unwrap().into_inner().model_stats;
        let ready = c
            .server_ready(pb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready;
        let meta = c
            .server_metadata(pb::ServerMetadataRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(meta.extensions.iter().any(|e| e == "statistics"));
        (stats, ready)
    });
    assert!(ready);
    assert_eq!(grpc_stats.len(), 1);
    let g = &grpc_stats[0];
    assert_eq!(
        (
            g.inference_count,
            g.inference_stats.as_ref().unwrap().success.unwrap().count
        ),
        (5, 2)
    );
    let a = agent();
    let r = get(&a, &server.url(&format!("/v2/models/{MODEL}/stats")));
    assert_eq!(r.status, 200);
    let h: serde_json::Value = r.json();
    let h = &h["model_stats"][0];
    assert_eq!(h["inference_count"], 5);
    assert_eq!(h["inference_stats"]["success"]["count"], 2);
    assert_eq!(h["name"], MODEL);
    assert_eq!(h["version"], g.version.as_str());
    let v2: serde_json::Value = get(&a, &server.url("/v2")).json();
    assert!(v2["extensions"].as_array().unwrap().iter().any(|e| e == "statistics"));
    assert_eq!(get(&a, &server.url("/v2/models/other/stats")).status, 404);
    server.shutdown();
}

#[test]
fn sigterm_drains_grpc_calls_in_flight() {
    let mut server = ProcessServer::start(
        &["--max-queue-delay-us", "300000"],
        &[("TOKITAI_BATCHING_REGROUP_DELAY_PCT", "0")],
    );
    let addr = server.grpc_addr.expect("the binary serves gRPC by default");
    let rt = runtime();
    rt.block_on(async {
        let mut c = client(addr).await;
        let mut in_flight = c.clone();
        // Held 300 ms in the queue: still in flight when SIGTERM arrives.
        let call = tokio::spawn(async move { in_flight.model_infer(request(2)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.signal("TERM");
        let answer = call.await.unwrap().expect("the call in flight is answered");
        assert_eq!(answer.into_inner().raw_output_contents.len(), 2);
        // Draining: not ready any more, or no longer accepting at all.
        match c.server_ready(pb::ServerReadyRequest {}).await {
            Ok(r) => assert!(!r.into_inner().ready),
            Err(s) => assert_ne!(s.code(), Code::Ok),
        }
    });
    let status = server.wait_exit(Duration::from_secs(20)).expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// How long a silent socket lasts: from its connect until the server closes
/// it (EOF or reset); `None` when it was still open after `bound`.
fn time_until_closed(mut socket: std::net::TcpStream, opened: std::time::Instant, bound: Duration) -> Option<Duration> {
    use std::io::Read;
    socket.set_read_timeout(Some(bound)).unwrap();
    let mut byte = [0u8; 64];
    loop {
        match socket.read(&mut byte) {
            Ok(0) => return Some(opened.elapsed()),
            // The server's SETTINGS frame: HTTP/2 servers speak at once.
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return None;
            }
            Err(_) => return Some(opened.elapsed()),
        }
    }
}

/// Issue 21: `grpc.max_connections` sockets that never speak used to hold
/// every slot, and a real client went unanswered for over a minute. Now a
/// connection still in its handshake is in a class of its own (the oldest
/// closed for a newer one) and is closed after `grpc.handshake_timeout_ms`.
#[test]
fn silent_connections_cannot_lock_out_grpc_and_are_closed_after_the_handshake_timeout() {
    const MAX_CONNECTIONS: usize = 32;
    let handshake_timeout = Duration::from_millis(1000);
    let mut config = base_config();
    config.grpc.max_connections = MAX_CONNECTIONS;
    config.grpc.max_handshaking_connections = 8;
    config.grpc.handshake_timeout_ms = handshake_timeout.as_millis() as u64;
    let server = TestServer::start(config);
    let addr = server.grpc_addr();
    let silent: Vec<_> = (0..MAX_CONNECTIONS)
        .map(|_| (std::net::TcpStream::connect(addr).unwrap(), std::time::Instant::now()))
        .collect();
    // A real client, behind every silent socket in the accept queue. The
    // bound is far above what it takes (milliseconds), and far below the
    // minute it took before.
    let started = std::time::Instant::now();
    let answered = runtime().block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            client(addr).await.model_infer(request(1)).await
        })
        .await
    });
    let real_call = started.elapsed();
    let answer = answered.expect("the real call was answered while silent sockets were open");
    assert_eq!(answer.expect("the real call succeeded").into_inner().outputs.len(), 2);
    // Every silent socket is closed: the ones made room for at once, the
    // newest ones when the handshake timeout passes (never before it: the
    // timer starts after their connect).
    let bound = Duration::from_secs(30);
    let closed: Vec<Duration> = silent
        .into_iter()
        .map(|(socket, opened)| time_until_closed(socket, opened, bound).expect("a silent socket was closed"))
        .collect();
    let slowest = closed.iter().max().unwrap();
    assert!(*slowest >= handshake_timeout, "{closed:?}");
    let mut sorted = closed.clone();
    sorted.sort();
    eprintln!(
        "real call answered in {} ms with {MAX_CONNECTIONS} silent sockets open; silent sockets closed after \
         {} ms (first), {} ms (median), {} ms (last); grpc.handshake_timeout_ms = {}",
        real_call.as_millis(),
        sorted[0].as_millis(),
        sorted[sorted.len() / 2].as_millis(),
        slowest.as_millis(),
        handshake_timeout.as_millis()
    );
    // The server keeps serving.
    runtime().block_on(async {
        let mut c = client(addr).await;
        c.model_infer(request(1))
            .await
            .expect("served after the silent sockets");
    });
    server.shutdown();
}
