//! The Open Inference Protocol (KServe v2) routes over real HTTP, beyond what
//! Triton's client exercises (tests/grpc/triton_client.rs): JSON and binary
//! requests give bit-identical answers to `/infer`, `id` is echoed, requested
//! outputs are honoured, and each malformed request gets the protocol's
//! `{"error": ...}` with Triton's status code for the same condition.

use crate::common::{Fixture, Reply, TestServer, agent, base_config, finish, fixture_config, get, nano_dims, post};
use serde_json::{Value, json};
use tokitai_serve::model::{Dims, LayerNormMode};

const MODEL: &str = "tokitai-moe";
/// Bytes per FP32 element in binary tensor data.
const F32_BYTES: usize = size_of::<f32>();

fn binary_request(header: &Value, payload: &[u8]) -> (Vec<u8>, String) {
    let head = serde_json::to_vec(header).unwrap();
    let mut body = head.clone();
    body.extend_from_slice(payload);
    (body, head.len().to_string())
}

fn post_binary(url: &str, body: &[u8], header_len: &str) -> Reply {
    let request = agent()
        .post(url)
        .set("Content-Type", "application/octet-stream")
        .set("Inference-Header-Content-Length", header_len);
    finish(request.send_bytes(body)).unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(F32_BYTES)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Rows of the bit-for-bit test.
const ROWS: usize = 5;

/// `/infer`'s logits for `rows`, flattened.
fn legacy_logits(a: &ureq::Agent, server: &TestServer, rows: &[Vec<f32>]) -> Vec<f32> {
    let legacy = post(a, &server.url("/infer"), &json!({ "features": rows }).to_string(), &[]).json();
    legacy["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().clone())
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

/// The v2 JSON route's logits for `rows` (nested data, one requested
/// output, the id echoed, the model and `version` named), flattened.
fn v2_json_logits(a: &ureq::Agent, server: &TestServer, rows: &[Vec<f32>], d: Dims, version: &str) -> Vec<f32> {
    let request = json!({
        "id": "req-7",
        "inputs": [{ "name": "features", "shape": [ROWS, d.input], "datatype": "FP32", "data": rows }],
        "outputs": [{ "name": "logits" }],
    });
    let reply = post(
        a,
        &server.url(&format!("/v2/models/{MODEL}/infer")),
        &request.to_string(),
        &[],
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let v = reply.json();
    assert_eq!(v["id"], "req-7");
    assert_eq!(v["model_name"], MODEL);
    assert_eq!(v["model_version"], version);
    let outputs = v["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "only the requested output");
    assert_eq!(outputs[0]["name"], "logits");
    assert_eq!(outputs[0]["shape"], json!([ROWS, d.output]));
    outputs[0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

/// The versioned v2 route's answer to `rows`, binary in and binary out: its
/// logits and router weights, flattened.
fn v2_binary_answer(server: &TestServer, rows: &[Vec<f32>], d: Dims, version: &str) -> (Vec<f32>, Vec<f32>) {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let payload: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = json!({
        "inputs": [{ "name": "features", "shape": [ROWS, d.input], "datatype": "FP32",
                     "parameters": { "binary_data_size": payload.len() } }],
        "parameters": { "binary_data_output": true },
    });
    let (body, len) = binary_request(&header, &payload);
    let reply = post_binary(
        &server.url(&format!("/v2/models/{MODEL}/versions/{version}/infer")),
        &body,
        &len,
    );
    assert_eq!(reply.status, 200, "{:?}", String::from_utf8_lossy(&reply.body));
    let head_len: usize = reply
        .header("inference-header-content-length")
        .expect("binary answer")
        .parse()
        .unwrap();
    let head: Value = serde_json::from_slice(&reply.body[..head_len]).unwrap();
    let outs = head["outputs"].as_array().unwrap();
    let logits_bytes = ROWS * d.output * F32_BYTES;
    assert_eq!(outs[0]["parameters"]["binary_data_size"], logits_bytes);
    assert_eq!(outs[1]["parameters"]["binary_data_size"], ROWS * d.experts * F32_BYTES);
    let binary_logits = f32s(&reply.body[head_len..head_len + logits_bytes]);
    let router = f32s(&reply.body[head_len + logits_bytes..]);
    assert_eq!(router.len(), ROWS * d.experts);
    (binary_logits, router)
}

#[test]
fn json_and_binary_answers_equal_infer_bit_for_bit() {
    let fixture = Fixture::load("nano-s11");
    let server = TestServer::start(fixture_config("nano-s11", LayerNormMode::Identity));
    let a = agent();
    let d = fixture.dims;
    let rows: Vec<Vec<f32>> = fixture
        .inputs
        .iter()
        .take(ROWS)
        .map(|r| r.iter().map(|&v| v as f32).collect())
        .collect();
    let version = get(&a, &server.url(&format!("/v2/models/{MODEL}"))).json()["versions"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(version, "0", "a fixture's version is its checkpoint step");
    let legacy = legacy_logits(&a, &server, &rows);
    let json_logits = v2_json_logits(&a, &server, &rows, d, &version);
    assert_eq!(json_logits, legacy, "v2 JSON answer differs from /infer");
    let (binary_logits, router) = v2_binary_answer(&server, &rows, d, &version);
    assert_eq!(binary_logits, legacy, "v2 binary answer differs from /infer");
    let as_rows = |v: &[f32], w: usize| -> Value { v.chunks(w).map(|r| json!(r)).collect() };
    let answer = json!({ "logits": as_rows(&binary_logits, d.output), "router_weights": as_rows(&router, d.experts) });
    let first_rows: Vec<usize> = (0..ROWS).collect();
    fixture.check(LayerNormMode::Identity, &answer, &first_rows, "v2 binary");
    server.shutdown();
}

#[test]
fn metadata_health_and_config_routes() {
    let server = TestServer::start(base_config());
    let a = agent();
    // The demo model.
    let d = nano_dims();
    let meta = get(&a, &server.url("/v2")).json();
    assert!(
        meta["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("binary_tensor_data"))
    );
    assert_eq!(get(&a, &server.url("/v2/health/live")).status, 200);
    assert_eq!(get(&a, &server.url("/v2/health/ready")).status, 200);
    assert_eq!(get(&a, &server.url(&format!("/v2/models/{MODEL}/ready"))).status, 200);
    let m = get(&a, &server.url(&format!("/v2/models/{MODEL}"))).json();
    assert_eq!(
        m["inputs"][0],
        json!({ "name": "features", "datatype": "FP32", "shape": [-1, d.input] })
    );
    assert_eq!(
        m["outputs"][1],
        json!({ "name": "router_weights", "datatype": "FP32", "shape": [-1, d.experts] })
    );
    let c = get(&a, &server.url(&format!("/v2/models/{MODEL}/config"))).json();
    assert_eq!(c["max_batch_size"], 4096);
    assert_eq!(c["input"][0]["dims"], json!([d.input]));
    let missing = get(&a, &server.url("/v2/models/other"));
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"].as_str().unwrap().contains("unknown model"));
    assert_eq!(
        get(&a, &server.url(&format!("/v2/models/{MODEL}/versions/999/ready"))).status,
        404
    );
    server.shutdown();
}

#[test]
fn malformed_v2_requests_get_the_protocol_error_and_triton_status() {
    let mut config = base_config();
    config.batching.max_request_rows = 8;
    config.batching.max_queue_rows = 8;
    let server = TestServer::start(config);
    let a = agent();
    let url = server.url(&format!("/v2/models/{MODEL}/infer"));
    // Features per row of the demo model.
    let w = nano_dims().input;
    let row = vec![0.25f32; w];
    let needs_two_rows = format!("needs {}", 2 * w);
    let input = |shape: Value, datatype: &str, data: Value| {
        json!({ "inputs": [{ "name": "features", "shape": shape, "datatype": datatype, "data": data }] }).to_string()
    };
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("broken JSON", "{\"inputs\": [".into(), 400, "parse"),
        ("no inputs", json!({ "inputs": [] }).to_string(), 400, "expected 1 input"),
        ("wrong input name", json!({ "inputs": [{ "name": "x", "shape": [1, w], "datatype": "FP32", "data": row }] }).to_string(), 400, "unexpected inference input"),
        ("FP16", input(json!([1, w]), "FP16", json!(row)), 400, "only FP32"),
        ("shape one too narrow", input(json!([1, w - 1]), "FP32", json!(row)), 400, "shape"),
        ("shape rank 1", input(json!([w]), "FP32", json!(row)), 400, "shape"),
        ("data shorter than shape", input(json!([2, w]), "FP32", json!(row)), 400, &needs_two_rows),
        ("non-number data", input(json!([1, w]), "FP32", json!(vec!["a"; w])), 400, "not a number"),
        ("too many rows", input(json!([9, w]), "FP32", json!(vec![row.clone(); 9])), 400, "limit"),
        ("unknown output", json!({ "inputs": [{ "name": "features", "shape": [1, w], "datatype": "FP32", "data": row }], "outputs": [{ "name": "probs" }] }).to_string(), 400, "unexpected inference output"),
        ("no data", json!({ "inputs": [{ "name": "features", "shape": [1, w], "datatype": "FP32" }] }).to_string(), 400, "neither data"),
    ];
    for (name, body, status, needle) in cases {
        let reply = post(&a, &url, &body, &[]);
        assert_eq!(reply.status, status, "{name}: {}", String::from_utf8_lossy(&reply.body));
        let msg = reply.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no error string"))
            .to_string();
        assert!(msg.contains(needle), "{name}: {msg:?} lacks {needle:?}");
    }
    // One row's worth of shape, with `payload` as its binary data.
    let one_row_binary = |payload: &[u8]| {
        let header = json!({ "inputs": [{ "name": "features", "shape": [1, w], "datatype": "FP32",
                                          "parameters": { "binary_data_size": payload.len() } }] });
        binary_request(&header, payload)
    };
    // Binary size that disagrees with the shape.
    let (body, len) = one_row_binary(&vec![0u8; (w - 1) * F32_BYTES]);
    let reply = post_binary(&url, &body, &len);
    assert_eq!(reply.status, 400);
    assert!(reply.json()["error"].as_str().unwrap().contains("binary_data_size"));
    // Header length past the body.
    let reply = post_binary(&url, &body, "100000");
    assert_eq!(reply.status, 400);
    // A non-finite value in binary data.
    let mut payload: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
    payload[0..F32_BYTES].copy_from_slice(&f32::NAN.to_le_bytes());
    let (body, len) = one_row_binary(&payload);
    let reply = post_binary(&url, &body, &len);
    assert_eq!(reply.status, 400);
    assert!(reply.json()["error"].as_str().unwrap().contains("not finite"));
    // Still healthy and correct afterwards.
    let ok = post(&a, &url, &input(json!([1, w]), "FP32", json!(row)), &[]);
    assert_eq!(ok.status, 200);
    let failures = server.metrics();
    assert!(
        failures
            .text
            .contains("tokitai_request_failures_total{reason=\"invalid\",route=\"/v2/models/{model}/infer\"}"),
        "v2 failures are counted under the v2 route"
    );
    server.shutdown();
}
