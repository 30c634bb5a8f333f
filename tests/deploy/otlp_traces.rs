//! OpenTelemetry traces from the real binary, received by a real OTLP/HTTP
//! receiver: `tests/otlp_receiver.py`, which decodes the protobuf with
//! PyPI's `opentelemetry-proto` (the venv at `TOKITAI_OTEL_VENV`, else
//! `target/otel-venv`, which `.ci/run` creates) and writes each span as a
//! JSON line.
//!
//! Owns: that a request sent with a W3C `traceparent` (HTTP `/infer`, gRPC
//! `ModelInfer` and `ModelStreamInfer`) comes back as a server span of that
//! trace whose parent is the caller's span, with its queue, compute and
//! answer spans under it and the model, version, priority, rows and batch
//! size as attributes (a failed request: its span, status ERROR); that sampling follows the caller (a sampled parent
//! is traced at `sample_ratio` 0, an unsampled one is not); and that with
//! no collector listening requests are still answered and the spans are
//! counted in `tokitai_trace_spans_dropped_total`. Must not touch: the
//! engine's code.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tonic::Request;

use crate::common::grpc::{self, MODEL};
use crate::common::{ProcessServer, Rng, agent, batch_body, get, nano_dims, post, wait_metrics_at};

/// The caller's trace and span (what its `traceparent` names).
const HTTP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const HTTP_PARENT: &str = "00f067aa0ba902b7";
const GRPC_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const GRPC_PARENT: &str = "b7ad6b7169203331";
const STREAM_TRACE: &str = "5a1f0e3b7c9d4e2f8a6b1c0d9e8f7a6b";
const STREAM_PARENT: &str = "1122334455667788";
const FAILED_TRACE: &str = "7e57ed0000000000000000000000beef";
/// A trace the caller did not sample (flags 00): the server must not either.
const UNSAMPLED_TRACE: &str = "11111111111111111111111111111111";

/// OTLP's `SPAN_KIND_SERVER` and `SPAN_KIND_INTERNAL`.
const SERVER: i64 = 2;
const INTERNAL: i64 = 1;

fn traceparent(trace: &str, span: &str, flags: &str) -> String {
    format!("00-{trace}-{span}-{flags}")
}

/// The venv with `opentelemetry-proto`.
fn otel_python() -> PathBuf {
    let dir = std::env::var_os("TOKITAI_OTEL_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/otel-venv")));
    let python = dir.join("bin/python");
    assert!(
        python.exists(),
        "no Python virtual environment with opentelemetry-proto at {} — run .ci/run, or: python3 -m venv {0} && \
         {0}/bin/pip install 'opentelemetry-proto==1.45.2'",
        dir.display()
    );
    python
}

/// `tests/otlp_receiver.py` on a free port, writing spans to a file.
struct Receiver {
    child: Child,
    port: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("spans.jsonl");
        let mut child = Command::new(otel_python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp_receiver.py"))
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tests/otlp_receiver.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("the receiver's first line");
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the receiver said {line:?}, not `listening on PORT`"));
        Receiver {
            child,
            port,
            out,
            _dir: dir,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/v1/traces", self.port)
    }

    /// Every span received so far.
    fn spans(&self) -> Vec<Value> {
        read_spans(&self.out)
    }

    /// Polls (bounded) until `done` holds of the spans received.
    fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the receiver never got {what}; it has:\n{:#?}", self.spans());
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_spans(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| l.ends_with('}'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn of_trace<'a>(spans: &'a [Value], trace: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["trace_id"] == trace).collect()
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

/// The ready binary, exporting to `endpoint` with `env` besides.
fn traced_server(endpoint: &str, env: &[(&str, &str)]) -> ProcessServer {
    let mut all = vec![("TOKITAI_TRACING_OTLP_ENDPOINT", endpoint)];
    all.extend_from_slice(env);
    let server = ProcessServer::start(&[], &all);
    let ready = agent();
    let start = Instant::now();
    while get(&ready, &server.url("/readyz")).status != 200 {
        assert!(start.elapsed() < Duration::from_secs(60), "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// The request span of `trace` (its parent the caller's `parent`) and its
/// children by name, checked for what every traced request must show.
fn request_and_children<'a>(
    spans: &'a [Value],
    trace: &str,
    parent: &str,
    name: &str,
) -> Vec<(&'a Value, [&'a Value; 3])> {
    let mine = of_trace(spans, trace);
    let requests: Vec<&Value> = mine.iter().copied().filter(|s| s["kind"] == SERVER).collect();
    assert!(!requests.is_empty(), "no server span in trace {trace}: {mine:#?}");
    requests
        .into_iter()
        .map(|request| {
            assert_eq!(
                request["parent_span_id"], parent,
                "the caller's span is the parent: {request:#}"
            );
            assert_eq!(request["name"], name, "{request:#}");
            assert_eq!(request["service"], "tokitai-serve");
            assert_eq!(request["status_code"], 0, "unset status on success: {request:#}");
            let child = |child: &str| {
                let found: Vec<&Value> = mine
                    .iter()
                    .copied()
                    .filter(|s| s["name"] == child && s["parent_span_id"] == request["span_id"])
                    .collect();
                assert_eq!(found.len(), 1, "one {child} span under {request:#}: {mine:#?}");
                assert_eq!(found[0]["kind"], INTERNAL);
                found[0]
            };
            (request, [child("queue"), child("compute"), child("answer")])
        })
        .collect()
}

/// What the request and compute spans say of the model, priority and rows.
fn check_attributes(request: &Value, children: &[&Value; 3], version: u64, rows: i64) {
    let [queue, compute, answer] = children;
    for span in [request, queue, compute] {
        assert_eq!(attr(span, "tokitai.model"), MODEL, "{span:#}");
        assert_eq!(attr(span, "tokitai.model.version"), version, "{span:#}");
        assert_eq!(attr(span, "tokitai.priority"), 1, "{span:#}");
    }
    assert_eq!(attr(request, "tokitai.rows"), rows, "{request:#}");
    // Alone on the server: its batch is its own rows.
    assert_eq!(attr(compute, "tokitai.batch.rows"), rows, "{compute:#}");
    // Queue wait, then compute, both inside the request (1 ms for rounding).
    let ns = |s: &Value, k: &str| s[k].as_u64().unwrap();
    let slack = 1_000_000;
    assert!(
        ns(queue, "start_ns") + slack >= ns(request, "start_ns"),
        "{queue:#} in {request:#}"
    );
    assert!(
        ns(queue, "end_ns") <= ns(compute, "start_ns") + slack,
        "{queue:#} before {compute:#}"
    );
    assert!(
        ns(compute, "end_ns") <= ns(answer, "start_ns") + slack,
        "{compute:#} before {answer:#}"
    );
    assert!(
        ns(answer, "end_ns") <= ns(request, "end_ns") + slack,
        "{answer:#} in {request:#}"
    );
}

#[test]
fn spans_continue_the_callers_trace_over_http_and_grpc() {
    let receiver = Receiver::start();
    // Ratio 0: only a caller's sampled trace is traced (parent-based).
    let server = traced_server(&receiver.endpoint(), &[("TOKITAI_TRACING_SAMPLE_RATIO", "0")]);
    let http = agent();
    let mut rng = Rng(23);
    let rows: Vec<Vec<f64>> = (0..3).map(|_| rng.row(nano_dims().input)).collect();
    let url = server.url("/infer");

    // Not traced: no traceparent (a root at ratio 0), and an unsampled one.
    assert_eq!(post(&http, &url, &batch_body(&rows), &[]).status, 200);
    let unsampled = traceparent(UNSAMPLED_TRACE, HTTP_PARENT, "00");
    assert_eq!(
        post(&http, &url, &batch_body(&rows), &[("traceparent", &unsampled)]).status,
        200
    );

    let sampled = traceparent(HTTP_TRACE, HTTP_PARENT, "01");
    let headers = [
        ("traceparent", sampled.as_str()),
        ("tracestate", "vendor=opaque"),
        ("X-Request-Priority", "1"),
    ];
    let reply = post(&http, &url, &batch_body(&rows), &headers);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let version: u64 = reply.header("x-model-version").unwrap().parse().unwrap();
    // A request that fails: its span says so, with the status.
    let failing = traceparent(FAILED_TRACE, HTTP_PARENT, "01");
    let reply = post(&http, &url, "{\"features\": [1.0]}", &[("traceparent", &failing)]);
    assert_eq!(reply.status, 400, "{}", reply.text());

    let rt = grpc::runtime();
    let grpc_addr = server.grpc_addr.expect("gRPC is on");
    rt.block_on(async {
        let mut client = grpc::client(grpc_addr).await;
        let mut call = Request::new(grpc::rows_request(1));
        let parent = traceparent(GRPC_TRACE, GRPC_PARENT, "01");
        call.metadata_mut().insert("traceparent", parent.parse().unwrap());
        let answer = client.model_infer(call).await.expect("ModelInfer").into_inner();
        assert_eq!(answer.model_version, version.to_string());

        let stream = futures_util::stream::iter(vec![grpc::rows_request(1), grpc::rows_request(1)]);
        let mut call = Request::new(stream);
        let parent = traceparent(STREAM_TRACE, STREAM_PARENT, "01");
        call.metadata_mut().insert("traceparent", parent.parse().unwrap());
        let mut answers = client
            .model_stream_infer(call)
            .await
            .expect("ModelStreamInfer")
            .into_inner();
        for _ in 0..2 {
            let answer = answers
                .message()
                .await
                .expect("a streamed answer")
                .expect("two answers");
            assert_eq!(answer.error_message, "");
        }
    });

    // Two streamed requests, each with its request, queue, compute and answer spans.
    let spans = receiver.wait_for("the HTTP, gRPC and stream spans", |spans| {
        of_trace(spans, HTTP_TRACE).len() >= 4
            && of_trace(spans, GRPC_TRACE).len() >= 4
            && of_trace(spans, STREAM_TRACE).len() >= 8
            && !of_trace(spans, FAILED_TRACE).is_empty()
    });

    let http_spans = request_and_children(&spans, HTTP_TRACE, HTTP_PARENT, "POST /infer");
    assert_eq!(http_spans.len(), 1);
    let (request, children) = &http_spans[0];
    check_attributes(request, children, version, 3);
    assert_eq!(attr(request, "http.response.status_code"), 200);
    assert_eq!(attr(request, "tokitai.route"), "/infer");

    let unary = "inference.GRPCInferenceService/ModelInfer";
    let grpc_spans = request_and_children(&spans, GRPC_TRACE, GRPC_PARENT, unary);
    assert_eq!(grpc_spans.len(), 1);
    let (request, children) = &grpc_spans[0];
    check_attributes(request, children, version, 1);
    assert_eq!(attr(request, "rpc.grpc.status_code"), 0);

    let streamed = "inference.GRPCInferenceService/ModelStreamInfer";
    let stream_spans = request_and_children(&spans, STREAM_TRACE, STREAM_PARENT, streamed);
    assert_eq!(stream_spans.len(), 2, "one request span per streamed request");
    for (request, children) in &stream_spans {
        check_attributes(request, children, version, 1);
    }

    // The failed request: its server span only, status ERROR (2) with the message.
    let failed = of_trace(&spans, FAILED_TRACE);
    assert_eq!(failed.len(), 1, "nothing computed, so no child span: {failed:#?}");
    assert_eq!(failed[0]["parent_span_id"], HTTP_PARENT);
    assert_eq!(failed[0]["status_code"], 2, "{:#}", failed[0]);
    assert_ne!(failed[0]["status_message"], "", "{:#}", failed[0]);
    assert_eq!(attr(failed[0], "http.response.status_code"), 400);

    // Nothing of the two requests the caller did not sample.
    let traces: BTreeSet<&str> = spans.iter().map(|s| s["trace_id"].as_str().unwrap()).collect();
    let expected = BTreeSet::from([HTTP_TRACE, GRPC_TRACE, STREAM_TRACE, FAILED_TRACE]);
    assert_eq!(traces, expected, "only the sampled callers' traces");

    // With a collector that answers, shutdown flushes and exits cleanly.
    let mut server = server;
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(30)).expect("exits after SIGTERM");
    assert!(status.success(), "{status}");
    // Each span arrived once.
    let spans = receiver.spans();
    let ids: BTreeSet<&str> = spans.iter().map(|s| s["span_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), spans.len(), "a span arrived twice: {spans:#?}");
}

#[test]
fn without_a_collector_requests_are_served_and_spans_counted_as_dropped() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}/v1/traces", closed.local_addr().unwrap());
    drop(closed);
    let mut server = traced_server(
        &endpoint,
        &[
            ("TOKITAI_TRACING_MAX_QUEUE_SPANS", "8"),
            ("TOKITAI_TRACING_MAX_EXPORT_BATCH_SPANS", "4"),
            ("TOKITAI_TRACING_EXPORT_TIMEOUT_MS", "300"),
        ],
    );
    let http = agent();
    let mut rng = Rng(7);
    let url = server.url("/infer");
    for i in 0..100 {
        let rows = [rng.row(nano_dims().input)];
        let parent = traceparent(HTTP_TRACE, HTTP_PARENT, "01");
        let reply = post(&http, &url, &batch_body(&rows), &[("traceparent", &parent)]);
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
    }
    // 400 spans against a queue of 8 and an export that always fails.
    let metrics = wait_metrics_at(&server.url("/metrics"), "spans counted as dropped", |m| {
        m.sum("tokitai_trace_spans_dropped_total", &[]) >= 1.0
    });
    let dropped = metrics.sum("tokitai_trace_spans_dropped_total", &[]);
    assert!(dropped <= 400.0, "at most every span is dropped, once: {dropped}");
    assert_eq!(get(&http, &server.url("/readyz")).status, 200);
    // Shutdown gives up on the collector within tracing.export_timeout_ms.
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(30)).expect("exits after SIGTERM");
    assert!(status.success(), "{status}");
}
