//! Arithmetic on declared shapes (issue 21): a shape whose byte size
//! overflows used to wrap (`[2^57 + 1, 96]` of FP32 is 3 * 2^64 + 384 bytes,
//! read as one row's 384 and answered 200 when the row limit was raised).
//! Now every product is checked: over HTTP v2 (binary and JSON) and gRPC
//! (raw and typed contents) such a shape is a 400 / INVALID_ARGUMENT naming
//! the shape, whatever the row limit, and nothing is computed. Settings
//! past their bounds (a row limit near `u64::MAX`) are refused at start-up
//! (exit 2) and in a model's `config.toml` (its load fails naming the
//! setting and the bound).

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::grpc::{client, runtime};
use crate::common::*;
use bytes::Bytes;
use serde_json::json;
use tokitai_serve::config::{ControlMode, MAX_REQUEST_ROWS};
use tokitai_serve::grpc::pb::model_infer_request::InferInputTensor;
use tokitai_serve::grpc::pb::{InferTensorContents, ModelInferRequest};
use tokitai_serve::model::{ModelSize, write_model_dir};
use tonic::Code;

/// 2^57 + 1 rows: times 96 values times 4 bytes wraps to 384 bytes.
const ROWS: i64 = (1 << 57) + 1;
const SHAPE_TEXT: &str = "[144115188075855873, 96]";

fn one_row_bytes() -> Vec<u8> {
    (0..nano_dims().input).flat_map(|_| 0.5f32.to_le_bytes()).collect()
}

/// A v2 binary request: the JSON header declaring `shape`, then `binary`.
fn v2_binary(shape: &[i64], binary: &[u8]) -> (Vec<u8>, usize) {
    let header = json!({"inputs": [{
        "name": "features", "datatype": "FP32", "shape": shape,
        "parameters": {"binary_data_size": binary.len()}
    }]})
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(binary);
    (body, header.len())
}

fn rows_computed(server: &TestServer) -> f64 {
    server.metrics().sum("tokitai_rows_computed_total", &[])
}

/// Over HTTP, binary and JSON: a 400 naming the shape.
fn assert_http_refuses_the_overflow(agent: &ureq::Agent, url: &str, d: i64) {
    // Binary: one row of bytes, binary_data_size 384 (what the size wrapped to).
    let (body, header_len) = v2_binary(&[ROWS, d], &one_row_bytes());
    let r = agent
        .post(url)
        .set("Inference-Header-Content-Length", &header_len.to_string())
        .set("Content-Type", "application/octet-stream")
        .send_bytes(&body);
    let r = finish(r).expect("an answer");
    let error = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert_eq!(r.status, 400, "{error}");
    assert!(error.contains(SHAPE_TEXT) && error.contains("overflows"), "{error}");
    // JSON data: one row of values.
    let body = json!({"inputs": [{"name": "features", "datatype": "FP32", "shape": [ROWS, d],
        "data": vec![0.5; d as usize]}]});
    let r = try_post(agent, url, &body.to_string(), &[("Content-Type", "application/json")]).unwrap();
    let error = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert_eq!(r.status, 400, "{error}");
    assert!(error.contains(SHAPE_TEXT), "{error}");
}

/// The overflowing shape as `ModelInfer` requests, raw and typed contents.
fn overflowing_grpc_requests(d: i64) -> [(&'static str, ModelInferRequest); 2] {
    let tensor = InferInputTensor {
        name: "features".into(),
        datatype: "FP32".into(),
        shape: vec![ROWS, d],
        ..Default::default()
    };
    let raw = ModelInferRequest {
        model_name: "tokitai-moe".into(),
        inputs: vec![tensor.clone()],
        raw_input_contents: vec![Bytes::from(one_row_bytes())],
        ..Default::default()
    };
    let mut typed_tensor = tensor;
    typed_tensor.contents = Some(InferTensorContents {
        fp32_contents: vec![0.5; d as usize],
        ..Default::default()
    });
    let typed = ModelInferRequest {
        model_name: "tokitai-moe".into(),
        inputs: vec![typed_tensor],
        ..Default::default()
    };
    [("raw", raw), ("typed", typed)]
}

/// Over gRPC: INVALID_ARGUMENT naming the shape.
fn assert_grpc_refuses_the_overflow(server: &TestServer, d: i64) {
    runtime().block_on(async {
        let mut c = client(server.grpc_addr()).await;
        for (what, req) in overflowing_grpc_requests(d) {
            let status = c.model_infer(req).await.expect_err(what);
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
            assert!(status.message().contains(SHAPE_TEXT), "{what}: {}", status.message());
        }
    });
}

#[test]
fn overflowing_shapes_are_400_over_http_and_invalid_argument_over_grpc_naming_the_shape() {
    let mut config = base_config();
    // The highest row limit allowed: the shape is refused for its size, not
    // for the limit (which it also passes by far).
    config.batching.max_request_rows = MAX_REQUEST_ROWS;
    config.batching.max_queue_rows = MAX_REQUEST_ROWS;
    let server = TestServer::start(config);
    let before = rows_computed(&server);
    let agent = agent();
    let url = server.url("/v2/models/tokitai-moe/infer");
    let d = nano_dims().input as i64;
    assert_http_refuses_the_overflow(&agent, &url, d);
    assert_grpc_refuses_the_overflow(&server, d);
    assert_eq!(rows_computed(&server), before, "an overflowing shape was computed");
    // A real request of the same form still works.
    let (body, header_len) = v2_binary(&[1, d], &one_row_bytes());
    let r = agent
        .post(&url)
        .set("Inference-Header-Content-Length", &header_len.to_string())
        .send_bytes(&body);
    assert_eq!(finish(r).expect("an answer").status, 200);
    server.shutdown();
}

#[test]
fn a_row_limit_past_its_bound_is_refused_at_start_up_and_in_a_model_config() {
    // The command line: exit 2, naming the setting and the bound.
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--max-request-rows",
            "18446744073709551615",
        ])
        .env("TOKITAI_GRPC_BIND", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tokitai-serve");
    let exited = (0..3000).find_map(|_| {
        let status = child.try_wait().unwrap();
        if status.is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        status
    });
    let Some(status) = exited else {
        let _ = child.kill();
        panic!("tokitai-serve with an out-of-bound row limit did not exit");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("batching.max_request_rows") && stderr.contains("1..=1048576"),
        "{stderr}"
    );

    // A model's config.toml: that model's load fails, naming the setting.
    let repo = tempfile::tempdir().unwrap();
    write_model_dir(&repo.path().join("m").join("1"), ModelSize::Nano, 3, false).unwrap();
    write_model_dir(&repo.path().join("ok").join("1"), ModelSize::Nano, 4, false).unwrap();
    std::fs::write(
        repo.path().join("m").join("config.toml"),
        "[batching]\nmax_request_rows = 9223372036854775807\n",
    )
    .unwrap();
    let mut config = base_config();
    config.model.repository = Some(repo.path().to_path_buf());
    config.model.control_mode = ControlMode::None;
    config.model.name = "ok".into();
    config.workers.count = 1;
    let server = TestServer::start(config);
    let index = post(
        &agent(),
        &server.url("/v2/repository/index"),
        "{}",
        &[("Content-Type", "application/json")],
    );
    let rows = index.json();
    let m = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "m")
        .unwrap_or_else(|| panic!("model m in the index: {rows}"));
    let reason = m["reason"].as_str().unwrap_or_default();
    assert_eq!(m["state"], "UNAVAILABLE", "{m}");
    assert!(
        reason.contains("config.toml")
            && reason.contains("batching.max_request_rows")
            && reason.contains("1..=1048576"),
        "{reason}"
    );
    server.shutdown();
}
