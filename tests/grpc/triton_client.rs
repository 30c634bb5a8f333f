//! The Open Inference Protocol (KServe v2) routes, proven with Triton's own
//! tools against the real server on an ephemeral port:
//!
//! - `tritonclient[http]`'s `InferenceServerClient` (tests/triton/client_check.py):
//!   readiness, model metadata and config, and inference on the public
//!   fixtures in JSON and binary mode within the core tolerances, in both
//!   LayerNorm modes;
//! - a short `perf_analyzer` run over HTTP with binary data, which must
//!   complete without errors.
//!
//! The Python side lives in a virtual environment that `.ci/run` makes at
//! `target/triton-venv` (or `TOKITAI_TRITON_VENV`): `tritonclient[http]==2.51.0`
//! (the last release whose bundled perf_analyzer runs on Debian 12's glibc)
//! and `nvidia-cuda-runtime-cu12` (perf_analyzer loads the CUDA runtime at
//! start-up; it needs no GPU), plus Debian's `libb64-0d`. Without them these
//! tests fail and say what to install: they are never skipped.

use crate::common::{FIXTURES, TestServer, assert_pass, fixture_config, perf_analyzer_smoke, run_python};
use tokitai_serve::model::LayerNormMode;

fn run_client_check(fixture: &str, mode: LayerNormMode, logits_key: &str) {
    let server = TestServer::start(fixture_config(fixture, mode));
    let out = run_python(
        "client_check.py",
        &[
            &server.addr().to_string(),
            "tokitai-moe",
            &format!("{FIXTURES}/{fixture}"),
            logits_key,
        ],
    );
    assert_pass(&format!("client_check.py ({fixture}, {mode})"), &out);
    // The binary and JSON requests went through the v2 route, counted apart from /infer.
    let m = server.metrics();
    assert!(
        m.text
            .contains("tokitai_http_requests_total{route=\"/v2/models/{model}/infer\",status=\"200\"}"),
        "v2 inference not counted under its route"
    );
    server.shutdown();
}

#[test]
fn tritonclient_matches_fixtures_in_identity_mode() {
    for fixture in crate::common::FIXTURE_NAMES {
        run_client_check(fixture, LayerNormMode::Identity, "logits_ln_identity");
    }
}

#[test]
fn tritonclient_matches_fixtures_in_stored_mode() {
    run_client_check("nano-s12", LayerNormMode::Stored, "logits");
}

#[test]
fn perf_analyzer_completes_over_http_with_binary_data() {
    let server = TestServer::start(crate::common::base_config());
    let addr = server.addr().to_string();
    perf_analyzer_smoke(&[
        "-m",
        "tokitai-moe",
        "-u",
        &addr,
        "-i",
        "http",
        "--concurrency-range",
        "1:2",
    ]);
    let m = server.metrics();
    let answered = m.text.lines().any(|l| {
        l.starts_with("tokitai_http_requests_total{route=\"/v2/models/{model}/infer\",status=\"200\"}")
            && l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
    });
    assert!(answered, "perf_analyzer's requests were not answered by the v2 route");
    server.shutdown();
}
