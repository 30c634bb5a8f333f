//! `model.weight_precision = "f16"` and `"bf16"` end to end: a fixture served
//! over HTTP (answers within 5e-3 / 3e-2 of the fp32 oracle), the precision
//! and the CPU kernels (`isa`) shown in `/healthz`, the v2 model metadata and
//! `tokitai_model_info`; `--cpu-isa` serving every path the CPU has, with the
//! same bits on AVX2 and AVX-512; and start-up refusing, exit 1 with the
//! reason, a weight that f16 cannot hold (named by tensor) and f16 or bf16 on
//! the hip backend.
//!
//! Owns: nothing but tests. Must not touch: fixtures (read-only).

use std::process::{Command, Stdio};

use crate::common::{BIN, Fixture, TestServer, agent, batch_body, f32_row, fixture_config, get, max_abs_diff, post};
use tokitai_serve::backend::cpu::CpuIsa;
use tokitai_serve::model::synth::synth_weights;
use tokitai_serve::model::{Arch, LayerNormMode, ModelSize, WeightPrecision, write_checkpoint};

#[test]
fn f16_and_bf16_fixtures_over_http_and_the_precision_everywhere_it_is_described() {
    for (precision, tolerance) in [(WeightPrecision::F16, 5e-3), (WeightPrecision::Bf16, 3e-2)] {
        for mode in [LayerNormMode::Identity, LayerNormMode::Stored] {
            serve_fixture_in(precision, mode, tolerance);
        }
    }
}

fn serve_fixture_in(precision: WeightPrecision, mode: LayerNormMode, tolerance: f64) {
    let name = "nano-s12";
    let fixture = Fixture::load(name);
    let p = precision.as_str();
    {
        let mut config = fixture_config(name, mode);
        config.model.weight_precision = precision;
        let server = TestServer::start(config);
        let agent = agent();
        let health = get(&agent, &server.url("/healthz")).json();
        assert_eq!(health["weight_precision"], p, "{health}");
        assert!(
            health["devices"].as_str().unwrap().contains(&format!("{p} weights")),
            "{health}"
        );
        let isa = health["isa"].as_str().unwrap().to_string();
        assert!(
            ["avx512_bf16", "avx512", "avx2", "scalar"].contains(&isa.as_str()),
            "{health}"
        );
        let meta = get(&agent, &server.url("/v2/models/tokitai-moe")).json();
        assert_eq!(meta["parameters"]["weight_precision"], p, "{meta}");
        assert_eq!(meta["parameters"]["isa"], isa.as_str(), "{meta}");
        let metrics = server.metrics();
        assert_eq!(
            metrics.sum("tokitai_model_info", &[("weight_precision", p), ("isa", &isa)]),
            1.0
        );

        let reply = post(&agent, &server.url("/infer"), &batch_body(&fixture.inputs), &[]);
        assert_eq!(reply.status, 200, "{}", reply.text());
        let answer = reply.json();
        let mut worst = 0.0f64;
        for (r, want) in fixture.expected_logits(mode).iter().enumerate() {
            let got = f32_row(&answer["logits"][r], fixture.dims.output, "logits");
            worst = worst.max(max_abs_diff(&got, want));
            let rw = f32_row(&answer["router_weights"][r], fixture.dims.experts, "router_weights");
            assert!(
                max_abs_diff(&rw, &fixture.router_weights[r]) <= 1e-6,
                "row {r} router weights"
            );
        }
        assert!(worst <= tolerance, "{name} {mode}: {p} max |logit diff| {worst:e}");
        server.shutdown();
    }
}

/// `--cpu-isa` serves on every path this CPU has and says which in
/// `/healthz`; AVX2 and AVX-512 answer with the same bits in every precision
/// (a fleet of mixed machines answers alike); a value that names no path is
/// a usage error (exit 2) naming it.
#[test]
fn cpu_isa_serves_every_path_the_cpu_has_with_the_same_bits() {
    let fixture = Fixture::load("nano-s11");
    let body = batch_body(&fixture.inputs);
    for precision in ["f32", "f16", "bf16"] {
        let mut answers: Vec<(CpuIsa, String)> = Vec::new();
        for isa in CpuIsa::available() {
            let server = crate::common::ProcessServer::start(
                &["serve", "--cpu-isa", isa.as_str(), "--weight-precision", precision],
                &[("TOKITAI_WORKERS_BACKEND", "cpu")],
            );
            let agent = agent();
            let health = get(&agent, &server.url("/healthz")).json();
            let served = health["isa"].as_str().unwrap();
            assert!(served.starts_with(isa.as_str()), "--cpu-isa {isa}: served {served}");
            let reply = post(&agent, &server.url("/infer"), &body, &[]);
            assert_eq!(reply.status, 200, "{}", reply.text());
            answers.push((isa, reply.text()));
            drop(server);
        }
        let vector: Vec<&(CpuIsa, String)> = answers.iter().filter(|(i, _)| *i != CpuIsa::Scalar).collect();
        for pair in vector.windows(2) {
            assert_eq!(
                pair[0].1, pair[1].1,
                "{precision}: {} and {} answered differently",
                pair[0].0, pair[1].0
            );
        }
        if vector.len() < 2 {
            eprintln!("SKIP {precision} AVX2/AVX-512 identity over HTTP: this CPU has only {answers:?}");
        }
    }
    let out = Command::new(BIN)
        .args(["infer", "--cpu-isa", "sse9"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("sse9"), "{}", stderr_of(&out));
}

#[test]
fn f32_is_the_default_and_is_described() {
    let server = TestServer::start(crate::common::base_config());
    let health = get(&agent(), &server.url("/healthz")).json();
    assert_eq!(health["weight_precision"], "f32", "{health}");
    server.shutdown();
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn start_up_refuses_what_f16_cannot_serve() {
    let dir = tempfile::tempdir().unwrap();
    let arch = Arch::for_size(ModelSize::Nano, 5);
    let arch_path = dir.path().join("arch.json");
    std::fs::write(&arch_path, arch.to_json_pretty()).unwrap();
    let mut weights = synth_weights(arch.dims(), 5);
    // Block 1 of expert 2: checkpoint record expert_2.param_4.
    weights.experts[2].blocks[1].linear.weight[9] = 1.0e5;
    let ckpt = dir.path().join("checkpoint.tkp1");
    write_checkpoint(&ckpt, &weights, 1, "{}", false).unwrap();
    let (arch_s, ckpt_s) = (arch_path.to_str().unwrap(), ckpt.to_str().unwrap());
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("TOKITAI_MODEL_BIND_ADDR", "127.0.0.1:0")
            .env("TOKITAI_GRPC_BIND", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run tokitai-serve")
    };
    let model = ["--arch", arch_s, "--checkpoint", ckpt_s];
    // serve, by flag and by environment; infer.
    let serve_flag = [&["serve"], &model[..], &["--weight-precision", "f16"]].concat();
    let body = dir.path().join("body.json");
    std::fs::write(&body, format!("{{\"features\": {:?}}}", vec![0.5f32; 96])).unwrap();
    let body = body.to_str().unwrap();
    let infer_flag = [&["infer"], &model[..], &["--weight-precision", "f16", "--input", body]].concat();
    let serve_env = [&["serve"], &model[..]].concat();
    for (args, env) in [
        (&serve_flag[..], &[][..]),
        (&serve_env[..], &[("TOKITAI_MODEL_WEIGHT_PRECISION", "f16")][..]),
        (&infer_flag[..], &[][..]),
    ] {
        let mut cmd_env = env.to_vec();
        cmd_env.push(("TOKITAI_WORKERS_BACKEND", "cpu"));
        let out = run(args, &cmd_env);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?} {env:?}: {err}");
        assert!(
            err.contains("expert_2.param_4") && err.contains("not finite in f16"),
            "{err}"
        );
    }
    // f16 and bf16 on the hip backend: refused by name before any device
    // is touched.
    for precision in ["f16", "bf16"] {
        let out = run(
            &[&["serve"], &model[..], &["--weight-precision", precision]].concat(),
            &[("TOKITAI_WORKERS_BACKEND", "hip")],
        );
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("not supported by the hip backend") && err.contains(&format!("\"{precision}\"")),
            "{err}"
        );
    }
    // A bad value is a usage error naming the setting.
    let out = run(
        &[&["serve"], &model[..]].concat(),
        &[("TOKITAI_MODEL_WEIGHT_PRECISION", "bf8")],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr_of(&out).contains("weight_precision"), "{}", stderr_of(&out));
}
