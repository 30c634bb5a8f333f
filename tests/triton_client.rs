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

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{FIXTURES, TestServer, fixture_config};
use tokitai_serve::model::LayerNormMode;

fn venv() -> PathBuf {
    let dir = std::env::var_os("TOKITAI_TRITON_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/triton-venv")));
    let python = dir.join("bin/python");
    assert!(
        python.exists(),
        "no Python virtual environment with tritonclient at {} — run .ci/run, or: python3 -m venv {0} && \
         {0}/bin/pip install 'tritonclient[http]==2.51.0' nvidia-cuda-runtime-cu12 && apt-get install libb64-0d",
        dir.display()
    );
    dir
}

fn run_client_check(fixture: &str, mode: LayerNormMode, logits_key: &str) {
    let venv = venv();
    let server = TestServer::start(fixture_config(fixture, mode));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/triton/client_check.py");
    let out = Command::new(venv.join("bin/python"))
        .args([
            script,
            &server.addr().to_string(),
            "tokitai-moe",
            &format!("{FIXTURES}/{fixture}"),
            logits_key,
        ])
        .output()
        .expect("run client_check.py");
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
    for fixture in common::FIXTURE_NAMES {
        run_client_check(fixture, LayerNormMode::Identity, "logits_ln_identity");
    }
}

#[test]
fn tritonclient_matches_fixtures_in_stored_mode() {
    run_client_check("nano-s12", LayerNormMode::Stored, "logits");
}

#[test]
fn perf_analyzer_completes_over_http_with_binary_data() {
    let venv = venv();
    let perf_analyzer = venv.join("bin/perf_analyzer");
    assert!(
        perf_analyzer.exists(),
        "{} missing: tritonclient==2.51.0 bundles it",
        perf_analyzer.display()
    );
    let cuda_rt = std::fs::read_dir(venv.join("lib"))
        .expect("venv lib dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/nvidia/cuda_runtime/lib"))
        .find(|p| p.exists())
        .expect("nvidia-cuda-runtime-cu12 is installed in the venv");
    let server = TestServer::start(common::base_config());
    let out = Command::new(&perf_analyzer)
        .env("LD_LIBRARY_PATH", &cuda_rt)
        .args([
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
        ])
        .output()
        .expect("run perf_analyzer");
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
