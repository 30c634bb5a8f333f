//! Priority levels (issue 23) against the real server.
//!
//! Proves that:
//! - a level-1 request sent after level-2 requests filled the queue is
//!   computed before them (its answer arrives while they still wait), in a
//!   batch of its own: no level-2 row rides beside it;
//! - a level whose queue is full is refused with 429 `overloaded`
//!   (`tokitai_queue_rejections_total{priority="2"}`) while level 1 is still
//!   admitted;
//! - a level-2 request queued past `batching.max_priority_wait_ms` rides
//!   ahead of a newer level-1 request;
//! - the level is named by `X-Request-Priority` on `/infer`, `parameters.
//!   priority` on v2 and the `priority` parameter on gRPC; none, 0 or a level
//!   past `priority_levels` is the default level; a malformed header is 400.
//!
//! Owns: these tests. Must not touch: the engine's code, `tests/common`.
//!
//! Determinism: "queued" is made certain with `batching.max_queue_delay_us`
//! (a partial batch is held that long, far longer than the test needs);
//! a batch goes at once only when it is full. Order is observed through
//! which answers have arrived and `/metrics` (queue depth per level, rows
//! computed), never through wall-clock thresholds.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::{Fixture, Metrics, Reply, TestServer, agent, batch_body, fixture_config, post};
use tokitai_serve::config::{Config, PriorityLevelConfig};
use tokitai_serve::model::LayerNormMode;

/// A partial batch is held this long: far longer than any step here takes.
const HOLD_US: u64 = 1_000_000;

/// nano-s11 on one worker, batches of 8 held until full, two levels: level 2
/// at most `level2_queue` rows queued and 2 rows per batch.
fn two_levels(level2_queue: usize) -> Config {
    let mut config = fixture_config("nano-s11", LayerNormMode::Identity);
    config.workers.count = 1;
    config.batching.max_batch_rows = 8;
    // No request larger than the smallest level queue here.
    config.batching.max_request_rows = 6;
    config.batching.max_queue_delay_us = HOLD_US;
    config.batching.regroup_delay_pct = 0;
    config.batching.priority_levels = 2;
    config.batching.default_priority_level = 2;
    config.batching.levels.insert(
        "2".into(),
        PriorityLevelConfig {
            max_queue_rows: Some(level2_queue),
            max_batch_rows: Some(2),
            timeout_ms: None,
        },
    );
    config
}

fn depth(m: &Metrics, level: &str) -> f64 {
    m.sum("tokitai_queue_depth_rows", &[("priority", level)])
}

/// Posts `rows` fixture rows to `/infer` at `level` on a thread of its own.
fn send(server: &TestServer, fixture: &Arc<Fixture>, rows: usize, level: &str) -> JoinHandle<Reply> {
    let url = server.url("/infer");
    let body = batch_body(&fixture.inputs[..rows]);
    let level = level.to_string();
    std::thread::spawn(move || post(&agent(), &url, &body, &[("X-Request-Priority", &level)]))
}

fn check(fixture: &Fixture, reply: &Reply, rows: usize, what: &str) {
    assert_eq!(reply.status, 200, "{what}: {}", reply.text());
    let rows: Vec<usize> = (0..rows).collect();
    fixture.check(LayerNormMode::Identity, &reply.json(), &rows, what);
}

#[test]
fn level_one_overtakes_a_full_level_two_queue_and_is_admitted_past_its_limit() {
    let fixture = Arc::new(Fixture::load("nano-s11"));
    let server = TestServer::start(two_levels(6));
    // Three level-2 requests of 2 rows fill level 2's 6 rows, held (6 < 8).
    let bulk: Vec<_> = (0..3).map(|_| send(&server, &fixture, 2, "2")).collect();
    server.wait_metrics("level 2 full", |m| depth(m, "2") == 6.0);
    // One more level-2 row is refused at once...
    let refused = post(
        &agent(),
        &server.url("/infer"),
        &batch_body(&fixture.inputs[..1]),
        &[("X-Request-Priority", "2")],
    );
    refused.assert_error(429, "overloaded", "level 2 past its max_queue_rows");
    // ...while level 1 is admitted: its 2 rows make the queue hold a full
    // batch, which goes at once and carries level 1 only.
    let live = send(&server, &fixture, 2, "1").join().expect("live client");
    check(&fixture, &live, 2, "level-1 request");
    let m = server.metrics();
    assert_eq!(depth(&m, "2"), 6.0, "every level-2 request still waits");
    assert_eq!(m.sum("tokitai_rows_computed_total", &[]), 2.0, "the live rows alone");
    assert!(
        bulk.iter().all(|b| !b.is_finished()),
        "no level-2 request was answered before the live one"
    );
    assert_eq!(m.sum("tokitai_queue_rejections_total", &[("priority", "2")]), 1.0);
    assert_eq!(m.sum("tokitai_queue_rejections_total", &[("priority", "1")]), 0.0);
    assert_eq!(m.sum("tokitai_queue_wait_seconds_count", &[("priority", "1")]), 1.0);
    // The held level-2 requests are computed in the end.
    for b in bulk {
        check(&fixture, &b.join().expect("bulk client"), 2, "level-2 request");
    }
    server.shutdown();
}

#[test]
fn a_request_waiting_past_max_priority_wait_rides_ahead_of_newer_level_one_work() {
    const WAIT_MS: u64 = 100;
    let fixture = Arc::new(Fixture::load("nano-s11"));
    let mut config = two_levels(64);
    config.batching.max_priority_wait_ms = WAIT_MS;
    config.batching.levels.get_mut("2").unwrap().max_batch_rows = None;
    config.batching.max_batch_rows = 4;
    let server = TestServer::start(config);
    let sent = Instant::now();
    let old = send(&server, &fixture, 2, "2");
    server.wait_metrics("the level-2 request queued", |m| depth(m, "2") == 2.0);
    // Its wait passes max_priority_wait_ms (the server took it after
    // `sent`); then 3 level-1 rows make the queue hold a full batch of 4.
    let promoted_at = sent + Duration::from_millis(WAIT_MS + 50);
    std::thread::sleep(promoted_at.saturating_duration_since(Instant::now()));
    let live = send(&server, &fixture, 3, "1");
    // Promoted and older: its 2 rows go first and 2 of the 3 live rows with
    // them; the live request's last row is held, so the old one is answered
    // first. (Unpromoted, the live request's 3 rows would ride first.)
    check(&fixture, &old.join().expect("old client"), 2, "promoted request");
    let m = server.metrics();
    assert!(!live.is_finished(), "the level-1 request waits for its last row");
    assert_eq!((depth(&m, "1"), depth(&m, "2")), (1.0, 0.0));
    check(&fixture, &live.join().expect("live client"), 3, "level-1 request");
    server.shutdown();
}

/// Requests answered so far at each level (queue wait observations).
fn answered(m: &Metrics) -> (f64, f64) {
    let at = |l| m.sum("tokitai_queue_wait_seconds_count", &[("priority", l)]);
    (at("1"), at("2"))
}

#[test]
fn the_level_is_named_by_header_v2_parameter_and_grpc_parameter() {
    let fixture = Fixture::load("nano-s11");
    let mut config = two_levels(64);
    config.batching.max_queue_delay_us = 0;
    let server = TestServer::start(config);
    let a = agent();
    let url = server.url("/infer");
    let body = batch_body(&fixture.inputs[..1]);
    let mut expected = (0.0, 0.0);
    // Header: none, 0 and past the last level are the default (2).
    for (header, level) in [
        (None, 2),
        (Some("0"), 2),
        (Some("9"), 2),
        (Some("1"), 1),
        (Some("2"), 2),
    ] {
        let headers: Vec<(&str, &str)> = header.map(|h| ("X-Request-Priority", h)).into_iter().collect();
        assert_eq!(post(&a, &url, &body, &headers).status, 200, "{header:?}");
        if level == 1 {
            expected.0 += 1.0
        } else {
            expected.1 += 1.0
        }
        assert_eq!(answered(&server.metrics()), expected, "header {header:?}");
    }
    for bad in ["high", "-1", "1.5", "99999999999"] {
        let reply = post(&a, &url, &body, &[("X-Request-Priority", bad)]);
        assert_eq!(reply.status, 400, "X-Request-Priority: {bad}: {}", reply.text());
    }
    // v2: parameters.priority.
    let d = fixture.inputs[0].len();
    let v2 = serde_json::json!({
        "parameters": { "priority": 1 },
        "inputs": [{ "name": "features", "shape": [1, d], "datatype": "FP32", "data": fixture.inputs[0] }],
    });
    let v2_url = server.url("/v2/models/tokitai-moe/infer");
    assert_eq!(post(&a, &v2_url, &v2.to_string(), &[]).status, 200);
    expected.0 += 1.0;
    assert_eq!(answered(&server.metrics()), expected, "v2 priority 1");
    // gRPC: the priority parameter (int64, as tritonclient sends it).
    grpc_at_level_one(&server);
    expected.0 += 1.0;
    assert_eq!(answered(&server.metrics()), expected, "gRPC priority 1");
    server.shutdown();
}

/// One gRPC `ModelInfer` with `priority` = 1.
fn grpc_at_level_one(server: &TestServer) {
    use tokitai_serve::grpc::pb::InferParameter;
    use tokitai_serve::grpc::pb::infer_parameter::ParameterChoice;
    let mut request = crate::common::grpc::rows_request(1);
    request.parameters.insert(
        "priority".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(1)),
        },
    );
    let addr = server.grpc_addr();
    crate::common::grpc::runtime().block_on(async move {
        let mut client = crate::common::grpc::client(addr).await;
        client.model_infer(request).await.expect("gRPC infer at level 1");
    });
}
