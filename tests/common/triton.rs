//! Triton's own tools for the tests: the virtual environment with
//! `tritonclient[http,grpc]==2.51.0` and its bundled `perf_analyzer`.
//!
//! Owns: where the venv is ([`venv`]: `TOKITAI_TRITON_VENV`, else
//! `target/triton-venv`, which `.ci/run` creates), how a check script is
//! run and judged ([`run_python`], [`assert_pass`]), and how perf_analyzer
//! is run ([`perf_analyzer_smoke`]: with the CUDA runtime library it loads
//! at start-up on its path; it needs no GPU). Missing tools fail the test
//! with what to install: nothing is skipped.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The venv's directory (its `bin/python` exists).
pub fn venv() -> PathBuf {
    let dir = std::env::var_os("TOKITAI_TRITON_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/triton-venv")));
    let python = dir.join("bin/python");
    assert!(
        python.exists(),
        "no Python virtual environment with tritonclient at {} — run .ci/run, or: python3 -m venv {0} && \
         {0}/bin/pip install 'tritonclient[http,grpc]==2.51.0' nvidia-cuda-runtime-cu12 && apt-get install libb64-0d",
        dir.display()
    );
    dir
}

/// Runs `tests/triton/{script}` with the venv's Python and `args`.
pub fn run_python(script: &str, args: &[&str]) -> Output {
    let path = format!("{}/tests/triton/{script}", env!("CARGO_MANIFEST_DIR"));
    Command::new(venv().join("bin/python"))
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"))
}

/// Asserts that a check script's run (`what`) succeeded and printed `PASS`.
pub fn assert_pass(what: &str, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("PASS"), "{what}:\n{stdout}\n{stderr}");
}

/// A perf_analyzer smoke run with `args` (model, URL, protocol, load):
/// short measurements, any stability accepted (a shared 2-core machine).
/// Asserts it completed, measured a throughput and reported no error.
pub fn perf_analyzer_smoke(args: &[&str]) {
    let mut all = args.to_vec();
    all.extend(["--measurement-interval", "1000", "--max-trials", "5"]);
    all.extend(["--stability-percentage", "1000"]);
    let out = perf_analyzer(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let what = format!("perf_analyzer {}", args.join(" "));
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("Throughput"), "{what}: no throughput line:\n{stdout}");
    assert!(
        !stdout.to_lowercase().contains("error"),
        "{what} reported errors:\n{stdout}\n{stderr}"
    );
}

/// perf_analyzer with `args`, its output.
fn perf_analyzer(args: &[&str]) -> Output {
    let venv = venv();
    let binary = venv.join("bin/perf_analyzer");
    assert!(
        binary.exists(),
        "{} missing: tritonclient==2.51.0 bundles it",
        binary.display()
    );
    let cuda_rt = std::fs::read_dir(venv.join("lib"))
        .expect("venv lib dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/nvidia/cuda_runtime/lib"))
        .find(|p| p.exists())
        .expect("nvidia-cuda-runtime-cu12 is installed in the venv");
    Command::new(&binary)
        .env("LD_LIBRARY_PATH", &cuda_rt)
        .args(args)
        .output()
        .expect("run perf_analyzer")
}
