//! `model.weight_precision = "f16"` end to end: a fixture served over HTTP in
//! f16 (answers within 5e-3 of the fp32 oracle), the precision shown in
//! `/healthz`, the v2 model metadata and `tokitai_model_info`; and start-up
//! refusing, exit 1 with the reason, a weight that f16 cannot hold (named by
//! tensor) and f16 on the hip backend.
//!
//! Owns: nothing but tests. Must not touch: fixtures (read-only).

mod common;

use std::process::{Command, Stdio};

use common::{BIN, Fixture, TestServer, agent, batch_body, f32_row, fixture_config, get, max_abs_diff, post};
use tokitai_serve::model::synth::synth_weights;
use tokitai_serve::model::{Arch, LayerNormMode, ModelSize, WeightPrecision, write_checkpoint};

#[test]
fn f16_fixture_over_http_and_the_precision_everywhere_it_is_described() {
    let name = "nano-s12";
    let fixture = Fixture::load(name);
    for mode in [LayerNormMode::Identity, LayerNormMode::Stored] {
        let mut config = fixture_config(name, mode);
        config.model.weight_precision = WeightPrecision::F16;
        let server = TestServer::start(config);
        let agent = agent();
        let health = get(&agent, &server.url("/healthz")).json();
        assert_eq!(health["weight_precision"], "f16", "{health}");
        assert!(health["devices"].as_str().unwrap().contains("f16 weights"), "{health}");
        let meta = get(&agent, &server.url("/v2/models/tokitai-moe")).json();
        assert_eq!(meta["parameters"]["weight_precision"], "f16", "{meta}");
        let metrics = server.metrics();
        assert_eq!(metrics.sum("tokitai_model_info", &[("weight_precision", "f16")]), 1.0);

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
        assert!(worst <= 5e-3, "{name} {mode}: f16 max |logit diff| {worst:e}");
        server.shutdown();
    }
}

#[test]
fn f32_is_the_default_and_is_described() {
    let server = TestServer::start(common::base_config());
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
    // f16 on the hip backend: refused before any device is touched.
    let out = run(
        &[&["serve"], &model[..], &["--weight-precision", "f16"]].concat(),
        &[("TOKITAI_WORKERS_BACKEND", "hip")],
    );
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not supported by the hip backend"), "{err}");
    // A bad value is a usage error naming the setting.
    let out = run(
        &[&["serve"], &model[..]].concat(),
        &[("TOKITAI_MODEL_WEIGHT_PRECISION", "bf16")],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr_of(&out).contains("weight_precision"), "{}", stderr_of(&out));
}
