//! Old-sidecar compatibility of the HTTP API.
//!
//! Proves, for both upstream fixtures and both LayerNorm modes, that
//! `POST /infer` answers the sidecar's contract with the fp32 reference's
//! numbers: each of the 64 rows alone (flat form) and all 64 in one batch
//! match `logits_ln_identity` (identity) or `logits` (stored) within 2e-5,
//! router weights within 1e-6, the nonzero router weights sit exactly at
//! `top_k_indices` where the fixture says the top-k is strict, and the
//! single-row and batch answers are the same JSON numbers. Also the answer's
//! shape and headers (timings, request id and its echo), `/healthz` (the
//! sidecar's fields plus what is served), `/readyz` and `/metrics`.

use crate::common::{Fixture, TestServer, agent, batch_body, fixture_config, get, post, single_body};
use serde_json::Value;
use tokitai_serve::model::LayerNormMode;

/// Each row of `fixture` alone, in the flat single-row form, to `url`:
/// JSON with the timing and request-id headers, only logits and router
/// weights, matching the fixture. The answers, in row order.
fn single_rows_answered(agent: &ureq::Agent, url: &str, fixture: &Fixture, mode: LayerNormMode) -> Vec<Value> {
    let name = &fixture.name;
    let mut singles: Vec<Value> = Vec::new();
    for (r, row) in fixture.inputs.iter().enumerate() {
        let reply = post(agent, url, &single_body(row), &[]);
        assert_eq!(reply.status, 200, "{name} row {r}: {}", reply.text());
        assert!(
            reply
                .header("content-type")
                .is_some_and(|v| v.starts_with("application/json")),
            "content type {:?}",
            reply.header("content-type")
        );
        for h in ["x-queue-time-us", "x-compute-time-us"] {
            let v = reply.header(h).unwrap_or_else(|| panic!("{name} row {r}: missing {h}"));
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{h} is not a whole number: {v:?}"));
        }
        assert!(
            reply.header("x-request-id").is_some_and(|v| !v.is_empty()),
            "missing x-request-id"
        );
        let answer = reply.json();
        assert_eq!(
            answer.as_object().unwrap().len(),
            2,
            "only logits and router_weights: {answer}"
        );
        fixture.check(mode, &answer, &[r], &format!("{name} {mode} single row {r}"));
        singles.push(answer);
    }
    singles
}

/// The same numbers whichever form and whatever the companions: each
/// single-row answer equals its row of the whole `batch`.
fn assert_singles_equal_the_batch(name: &str, mode: LayerNormMode, singles: &[Value], batch: &Value) {
    for (r, single) in singles.iter().enumerate() {
        assert_eq!(
            single["logits"][0], batch["logits"][r],
            "{name} {mode} row {r}: single vs batch logits"
        );
        assert_eq!(
            single["router_weights"][0], batch["router_weights"][r],
            "{name} {mode} row {r}: single vs batch router weights"
        );
    }
}

/// A batch in another order gets its rows back in that order.
fn assert_reordered_batch_keeps_its_order(agent: &ureq::Agent, url: &str, fixture: &Fixture, batch: &Value) {
    let name = &fixture.name;
    let order: Vec<usize> = fixture.all_rows().into_iter().rev().step_by(3).collect();
    let rows: Vec<&Vec<f64>> = order.iter().map(|&r| &fixture.inputs[r]).collect();
    let reply = post(agent, url, &batch_body(&rows), &[]);
    assert_eq!(reply.status, 200);
    let reordered = reply.json();
    for (i, &r) in order.iter().enumerate() {
        assert_eq!(
            reordered["logits"][i], batch["logits"][r],
            "{name}: reordered batch row {i} (fixture row {r})"
        );
    }
}

/// `/healthz`: the sidecar's fields, the paths as given, and what is served.
fn assert_sidecar_health(agent: &ureq::Agent, server: &TestServer, fixture: &Fixture, mode: LayerNormMode) {
    let health = get(agent, &server.url("/healthz"));
    assert_eq!(health.status, 200);
    let h = health.json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["arch"], fixture.arch.display().to_string());
    assert_eq!(h["checkpoint"], fixture.checkpoint.display().to_string());
    assert_eq!(h["in_dim"], fixture.dims.input);
    assert_eq!(h["out_dim"], fixture.dims.output);
    assert_eq!(h["n_experts"], fixture.dims.experts);
    assert_eq!(h["size"], "Nano");
    assert_eq!(h["layernorm"], mode.as_str());
    assert_eq!(h["param_count"], 195_540);
    assert_eq!(h["workers"], 2);
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
}

fn check_fixture_mode(name: &str, mode: LayerNormMode) {
    let fixture = Fixture::load(name);
    let server = TestServer::start(fixture_config(name, mode));
    let agent = agent();
    let url = server.url("/infer");
    let singles = single_rows_answered(&agent, &url, &fixture, mode);
    // All 64 rows in one batch.
    let reply = post(&agent, &url, &batch_body(&fixture.inputs), &[]);
    assert_eq!(reply.status, 200, "{name} batch: {}", reply.text());
    let batch = reply.json();
    fixture.check(mode, &batch, &fixture.all_rows(), &format!("{name} {mode} batch"));
    assert_singles_equal_the_batch(name, mode, &singles, &batch);
    assert_reordered_batch_keeps_its_order(&agent, &url, &fixture, &batch);
    assert_sidecar_health(&agent, &server, &fixture, mode);
    server.shutdown();
}

#[test]
fn nano_s11_identity_layernorm() {
    check_fixture_mode("nano-s11", LayerNormMode::Identity);
}

#[test]
fn nano_s11_stored_layernorm() {
    check_fixture_mode("nano-s11", LayerNormMode::Stored);
}

#[test]
fn nano_s12_identity_layernorm() {
    check_fixture_mode("nano-s12", LayerNormMode::Identity);
}

#[test]
fn nano_s12_stored_layernorm() {
    check_fixture_mode("nano-s12", LayerNormMode::Stored);
}

#[test]
fn request_id_readyz_and_metrics() {
    let fixture = Fixture::load("nano-s11");
    let server = TestServer::start(fixture_config("nano-s11", LayerNormMode::Identity));
    let agent = agent();

    // The client's X-Request-Id is echoed; without one the server makes one up.
    let body = single_body(&fixture.inputs[8]);
    let reply = post(
        &agent,
        &server.url("/infer"),
        &body,
        &[("X-Request-Id", "client-id-42")],
    );
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-request-id"), Some("client-id-42"));
    let a = post(&agent, &server.url("/infer"), &body, &[]);
    let b = post(&agent, &server.url("/infer"), &body, &[]);
    let (ida, idb) = (a.header("x-request-id").unwrap(), b.header("x-request-id").unwrap());
    assert_ne!(ida, idb, "generated request ids are unique");
    assert_ne!(ida, "client-id-42");
    // Errors carry the id too.
    let bad = post(&agent, &server.url("/infer"), "{", &[("X-Request-Id", "bad-one")]);
    assert_eq!(bad.status, 400);
    assert_eq!(bad.header("x-request-id"), Some("bad-one"));

    let ready = get(&agent, &server.url("/readyz"));
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ready");

    let metrics = get(&agent, &server.url("/metrics"));
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "Prometheus text"
    );
    let text = metrics.text();
    for family in [
        "tokitai_http_requests_total",
        "tokitai_request_duration_seconds",
        "tokitai_queue_depth_rows",
        "tokitai_batch_size_rows",
    ] {
        assert!(text.contains(&format!("# TYPE {family} ")), "/metrics lacks {family}");
    }
    let m = crate::common::Metrics::parse(&text);
    assert_eq!(
        m.requests_by_status("/infer").get(&200),
        Some(&3),
        "three answered inferences"
    );
    assert_eq!(m.requests_by_status("/infer").get(&400), Some(&1));
    assert!(m.sum("tokitai_request_duration_seconds_count", &[("route", "/infer")]) >= 4.0);
    assert!(m.has("tokitai_batch_size_rows_bucket"));
    server.shutdown();
}
