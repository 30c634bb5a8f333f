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

use crate::common::{FIXTURES, TestServer, fixture_config, perf_analyzer, run_python};
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
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tritonclient check failed ({fixture}, {mode}):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("PASS"), "{stdout}");
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
    let out = perf_analyzer(&[
        "-m",
        "tokitai-moe",
        "-u",
        &server.addr().to_string(),
        "-i",
        "http",
        "--concurrency-range",
        "1:2",
        "--measurement-interval",
        "1000",
        "--max-trials",
        "5",
        // A smoke run on a shared 2-core machine: accept any stability.
        "--stability-percentage",
        "1000",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "perf_analyzer failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("Throughput"), "no throughput line:\n{stdout}");
    assert!(
        !stdout.to_lowercase().contains("error"),
        "perf_analyzer reported errors:\n{stdout}\n{stderr}"
    );
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
