//! Triton's `GRPCInferenceService`, proven with Triton's own gRPC tools
//! against the real server on ephemeral ports:
//!
//! - `tritonclient[grpc]`'s `InferenceServerClient` (tests/triton/grpc_check.py):
//!   liveness, readiness, server and model metadata, model config, inference
//!   on both public fixtures in both LayerNorm modes within the core
//!   tolerances and bit-identical to HTTP `/infer` and `/v2` for the same
//!   rows, `async_stream_infer` with 64 requests on one stream, a malformed
//!   request getting INVALID_ARGUMENT, and the statistics extension;
//! - a deadline that passes while the rows wait getting DEADLINE_EXCEEDED;
//! - `perf_analyzer -i grpc`, unary and `--streaming`, without errors.
//!
//! The tools live in the venv `.ci/run` makes (see `crate::common::triton`).

use crate::common::{
    FIXTURES, TestServer, assert_pass, base_config, fixture_config, nano_dims, perf_analyzer_smoke, run_python,
};
use tokitai_serve::model::LayerNormMode;

const MODEL: &str = "tokitai-moe";

fn run_grpc_check(fixture: &str, mode: LayerNormMode, logits_key: &str) {
    let server = TestServer::start(fixture_config(fixture, mode));
    let grpc = server.grpc_addr().to_string();
    let http = server.addr().to_string();
    let dir = format!("{FIXTURES}/{fixture}");
    let out = run_python("grpc_check.py", &[&grpc, &http, MODEL, &dir, logits_key]);
    assert_pass(&format!("grpc_check.py ({fixture}, {mode})"), &out);
    let m = server.metrics();
    let ok = |route: &str| m.sum("tokitai_grpc_requests_total", &[("route", route), ("code", "OK")]);
    assert!(ok("/inference.GRPCInferenceService/ModelInfer") >= 3.0, "{}", m.text);
    assert!(
        ok("/inference.GRPCInferenceService/ModelStreamInfer") >= 1.0,
        "{}",
        m.text
    );
    assert!(ok("/inference.GRPCInferenceService/ModelConfig") >= 1.0, "{}", m.text);
    let stream_ok = m.sum("tokitai_grpc_stream_messages_total", &[("code", "OK")]);
    assert_eq!(stream_ok, 65.0, "streamed answers");
    let invalid = m.sum(
        "tokitai_grpc_requests_total",
        &[
            ("route", "/inference.GRPCInferenceService/ModelInfer"),
            ("code", "INVALID_ARGUMENT"),
        ],
    );
    assert_eq!(invalid, 1.0);
    server.shutdown();
}

#[test]
fn tritonclient_grpc_matches_fixtures_in_identity_mode() {
    for fixture in crate::common::FIXTURE_NAMES {
        run_grpc_check(fixture, LayerNormMode::Identity, "logits_ln_identity");
    }
}

#[test]
fn tritonclient_grpc_matches_fixtures_in_stored_mode() {
    run_grpc_check("nano-s12", LayerNormMode::Stored, "logits");
}

#[test]
fn tritonclient_grpc_deadline_that_passes_gets_deadline_exceeded() {
    let mut config = base_config();
    // Partial batches are held 300 ms: the client's 50 ms deadline passes first.
    config.batching.max_queue_delay_us = 300_000;
    config.batching.regroup_delay_pct = 0;
    let server = TestServer::start(config);
    let grpc = server.grpc_addr().to_string();
    let in_dim = nano_dims().input.to_string();
    let out = run_python("grpc_check.py", &["--deadline", &grpc, MODEL, &in_dim]);
    assert_pass("grpc_check.py --deadline", &out);
    // The expired request's row was dropped, never computed (the client
    // leaves at its deadline too, so either reason may be the one counted).
    let m = server.wait_metrics("the expired row dropped", |m| {
        m.sum("tokitai_rows_dropped_total", &[("reason", "timeout")])
            + m.sum("tokitai_rows_dropped_total", &[("reason", "cancelled")])
            >= 1.0
    });
    assert_eq!(
        m.sum("tokitai_rows_computed_total", &[]),
        1.0,
        "only the second request computed"
    );
    server.shutdown();
}

#[test]
fn perf_analyzer_completes_over_grpc_unary_and_streaming() {
    let server = TestServer::start(base_config());
    let url = server.grpc_addr().to_string();
    for streaming in [false, true] {
        let mut args = vec!["-m", MODEL, "-u", &url, "-i", "grpc", "--concurrency-range", "1:4:3"];
        if streaming {
            args.push("--streaming");
        }
        perf_analyzer_smoke(&args);
    }
    let m = server.metrics();
    let route = |r: &str, code: &str| m.sum("tokitai_grpc_requests_total", &[("route", r), ("code", code)]);
    assert!(
        route("/inference.GRPCInferenceService/ModelInfer", "OK") > 0.0,
        "{}",
        m.text
    );
    assert!(m.sum("tokitai_grpc_stream_messages_total", &[("code", "OK")]) > 0.0);
    let failed: f64 = ["INVALID_ARGUMENT", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"]
        .iter()
        .map(|c| route("/inference.GRPCInferenceService/ModelInfer", c))
        .sum();
    assert_eq!(failed, 0.0, "{}", m.text);
    server.shutdown();
}
