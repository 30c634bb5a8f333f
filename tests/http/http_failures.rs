//! Failure behaviour of the HTTP path, each made deterministic.
//!
//! Proves that:
//! - overload: with a queue that holds one request, a flood of requests is
//!   answered with 200 or 429 only (none lost or hung), 429s do occur and
//!   carry `Retry-After` and `{"error", "type": "overloaded"}`, and the
//!   server's `tokitai_http_requests_total` agrees with what clients counted;
//! - deadline: a request whose `X-Request-Timeout-Ms` passes while it waits
//!   in the queue gets 504 `timeout`, and its rows are dropped
//!   (`tokitai_rows_dropped_total{reason="timeout"}`), never computed;
//! - client disconnect: requests whose client closed the socket while they
//!   were queued are dropped as `cancelled`, not computed, and the server
//!   goes on answering;
//! - worker panic: a panic inside a forward answers that request 500
//!   `internal`, the worker rebuilds its session
//!   (`tokitai_worker_restarts_total` +1), and the next request is correct;
//! - SIGTERM under load (the real binary): every response a client got is
//!   complete (200 with a full, correct body, or 503 while draining); a
//!   request only ever fails before any response byte; the process exits 0
//!   within its shutdown timeout.
//!
//! Determinism: "queued" is made certain with `batching.max_queue_delay_us`
//! (a partial batch is held for that long, far longer than the 1 ms
//! deadlines used and longer than the test needs to observe the queue), and
//! every wait on the server is a bounded poll of `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{
    Fixture, Metrics, ProcessServer, RawOutcome, Reply, TestServer, agent, batch_body, close, concurrent_clients,
    fixture_config, get, post, raw_exchange, raw_json_request, send_and_abandon, single_body, try_get,
};
use tokitai_serve::config::Config;
use tokitai_serve::model::LayerNormMode;

fn rows_computed(m: &Metrics) -> f64 {
    m.sum("tokitai_rows_computed_total", &[])
}

fn rows_dropped(m: &Metrics, reason: &str) -> f64 {
    m.sum("tokitai_rows_dropped_total", &[("reason", reason)])
}

/// nano-s11 (identity LayerNorm) on one worker that holds a partial batch
/// `hold_us` before computing it.
fn one_worker_holding_batches(hold_us: u64) -> Config {
    let mut config = fixture_config("nano-s11", LayerNormMode::Identity);
    config.workers.count = 1;
    config.batching.max_queue_delay_us = hold_us;
    config
}

/// Waits until `rows` more rows than in `before` are counted as dropped for
/// `reason`, then asserts that exactly that many were, that no row at all was
/// computed since `before`, and that `requests` requests failed for `reason`
/// on `/infer`. `what` names the rows. Returns the last scrape.
fn assert_dropped_not_computed(
    server: &TestServer,
    before: &Metrics,
    reason: &str,
    rows: usize,
    requests: usize,
    what: &str,
) -> Metrics {
    let dropped_since = |m: &Metrics| rows_dropped(m, reason) - rows_dropped(before, reason);
    let after = server.wait_metrics(&format!("{what} dropped as {reason}"), |m| {
        dropped_since(m) >= rows as f64
    });
    assert_eq!(dropped_since(&after), rows as f64, "{what} dropped as {reason}");
    assert_eq!(rows_computed(&after), rows_computed(before), "{what} were computed");
    assert_eq!(
        after.sum(
            "tokitai_request_failures_total",
            &[("route", "/infer"), ("reason", reason)]
        ),
        requests as f64,
        "requests failed as {reason}"
    );
    after
}

#[test]
fn overload_answers_every_request_with_200_or_429() {
    let fixture = Fixture::load("nano-s11");
    // A batch is never full (256 > 8 queued rows at most), so an admitted
    // request stays queued for 1 s: while it does, the queue is full and
    // every other request must be refused.
    let mut config = one_worker_holding_batches(1_000_000);
    config.batching.max_request_rows = 8;
    config.batching.max_queue_rows = 8;
    let server = TestServer::start(config);
    let url = server.url("/infer");
    let body = Arc::new(batch_body(&fixture.inputs[..8]));

    // One request fills the queue...
    let first = {
        let (url, body) = (url.clone(), Arc::clone(&body));
        std::thread::spawn(move || post(&agent(), &url, &body, &[]))
    };
    server.wait_metrics("the first request queued", |m| {
        m.sum("tokitai_queue_depth_rows", &[]) == 8.0
    });

    // ...then a flood from 16 clients.
    const CLIENTS: usize = 16;
    const EACH: usize = 3;
    let mut replies: Vec<Reply> = concurrent_clients(CLIENTS, |_, agent| {
        (0..EACH).map(|_| post(agent, &url, &body, &[])).collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect();
    replies.push(first.join().expect("first client"));

    let (mut ok, mut refused) = (0u64, 0u64);
    for reply in &replies {
        match reply.status {
            200 => {
                ok += 1;
                fixture.check(
                    LayerNormMode::Identity,
                    &reply.json(),
                    &(0..8).collect::<Vec<_>>(),
                    "admitted request",
                );
            }
            429 => {
                refused += 1;
                reply.assert_error(429, "overloaded", "refused request");
                let retry: u64 = reply
                    .header("retry-after")
                    .expect("429 has Retry-After")
                    .parse()
                    .expect("whole seconds");
                assert!(retry >= 1, "Retry-After {retry}");
            }
            other => panic!("unexpected status {other}: {}", reply.text()),
        }
    }
    assert_eq!(replies.len(), CLIENTS * EACH + 1);
    assert!(ok >= 1, "the first request was answered");
    assert!(refused >= 1, "a full queue refused nothing");

    let counted = server.metrics().requests_by_status("/infer");
    let expected: std::collections::BTreeMap<u16, u64> = [(200, ok), (429, refused)]
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .collect();
    assert_eq!(counted, expected, "server's request counts by status vs the clients'");
    server.shutdown();
}

#[test]
fn deadline_passed_in_queue_gets_504_and_rows_are_not_computed() {
    let fixture = Fixture::load("nano-s11");
    // Partial batches are held 300 ms: a 1 ms deadline always passes first.
    let server = TestServer::start(one_worker_holding_batches(300_000));
    let agent = agent();
    let url = server.url("/infer");
    let before = server.metrics();

    const REQUESTS: usize = 4;
    const ROWS: usize = 3;
    for i in 0..REQUESTS {
        let body = batch_body(&fixture.inputs[i..i + ROWS]);
        let reply = post(&agent, &url, &body, &[("X-Request-Timeout-Ms", "1")]);
        reply.assert_error(504, "timeout", &format!("request {i} with a 1 ms deadline"));
    }
    let after = assert_dropped_not_computed(
        &server,
        &before,
        "timeout",
        REQUESTS * ROWS,
        REQUESTS,
        "the expired rows",
    );

    // A request with the default deadline still gets its answer, and only its
    // rows are computed.
    let reply = post(&agent, &url, &batch_body(&fixture.inputs[10..12]), &[]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    fixture.check(LayerNormMode::Identity, &reply.json(), &[10, 11], "after the timeouts");
    let last = server.metrics();
    assert_eq!(rows_computed(&last) - rows_computed(&before), 2.0);
    assert_eq!(rows_dropped(&last, "timeout"), rows_dropped(&after, "timeout"));
    server.shutdown();
}

#[test]
fn disconnected_clients_rows_are_dropped_not_computed() {
    let fixture = Fixture::load("nano-s11");
    // Hold partial batches 1 s: long enough to see them queued and leave.
    let server = TestServer::start(one_worker_holding_batches(1_000_000));
    let before = server.metrics();

    const CLIENTS: usize = 3;
    const ROWS: usize = 2;
    let body = batch_body(&fixture.inputs[20..20 + ROWS]);
    let request = raw_json_request("POST", "/infer", body.as_bytes());
    let streams: Vec<_> = (0..CLIENTS)
        .map(|_| send_and_abandon(server.addr(), &request))
        .collect();
    server.wait_metrics("every abandoned request queued", |m| {
        m.sum("tokitai_queue_depth_rows", &[]) == (CLIENTS * ROWS) as f64
    });
    streams.into_iter().for_each(close);

    let after = assert_dropped_not_computed(
        &server,
        &before,
        "cancelled",
        CLIENTS * ROWS,
        CLIENTS,
        "the rows of clients that left",
    );
    assert_eq!(after.sum("tokitai_inflight_requests", &[]), 0.0);

    // The server still answers.
    let reply = post(&agent(), &server.url("/infer"), &single_body(&fixture.inputs[5]), &[]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    fixture.check(LayerNormMode::Identity, &reply.json(), &[5], "after the disconnects");
    server.shutdown();
}

#[test]
fn worker_panic_answers_500_and_the_worker_recovers() {
    let fixture = Fixture::load("nano-s12");
    let mut config = fixture_config("nano-s12", LayerNormMode::Stored);
    config.workers.count = 1;
    let server = TestServer::start(config);
    let agent = agent();
    let url = server.url("/infer");
    let restarts = |m: &Metrics| m.sum("tokitai_worker_restarts_total", &[]);
    let before = server.metrics();
    assert_eq!(restarts(&before), 0.0);

    let mut poison = fixture.inputs[3].clone();
    poison[0] = f64::from(tokitai_serve::FAULT_INJECTION_PANIC_VALUE);
    let reply = post(&agent, &url, &single_body(&poison), &[]);
    reply.assert_error(500, "internal", "a forward that panics");

    for r in [3, 0, 63] {
        let reply = post(&agent, &url, &single_body(&fixture.inputs[r]), &[]);
        assert_eq!(reply.status, 200, "after the panic: {}", reply.text());
        fixture.check(LayerNormMode::Stored, &reply.json(), &[r], "after the panic");
    }
    let reply = post(&agent, &url, &batch_body(&fixture.inputs), &[]);
    assert_eq!(reply.status, 200);
    fixture.check(
        LayerNormMode::Stored,
        &reply.json(),
        &fixture.all_rows(),
        "batch after the panic",
    );

    let after = server.metrics();
    assert_eq!(restarts(&after) - restarts(&before), 1.0, "one session rebuilt");
    assert_eq!(after.requests_by_status("/infer").get(&500), Some(&1));
    assert_eq!(
        get(&agent, &server.url("/readyz")).status,
        200,
        "still ready after recovering"
    );
    server.shutdown();
}

/// What one client request during the SIGTERM test ended as.
#[derive(Debug)]
enum Seen {
    Answer,
    Draining,
    /// Failed before any response byte, after SIGTERM.
    NoResponse,
}

/// What the SIGTERM test's clients share with it.
#[derive(Default)]
struct UnderSigterm {
    /// Set just before SIGTERM is sent.
    signalled: AtomicBool,
    stop: AtomicBool,
    answered: AtomicUsize,
    problems: Mutex<Vec<String>>,
}

/// Client `c` of the SIGTERM test: 4-row requests over raw TCP until told
/// to stop or refused after the signal. Each answer must match the fixture;
/// a 503 must be a draining one after the signal; a connection may fail
/// only after the signal. What each request ended as, in order.
fn sigterm_client(c: usize, fixture: &Fixture, addr: SocketAddr, shared: &UnderSigterm) -> Vec<Seen> {
    let mut seen = Vec::new();
    let mut i = 0usize;
    while !shared.stop.load(Ordering::Acquire) && seen.len() < 100_000 {
        let rows: Vec<usize> = (0..4).map(|k| (c * 16 + i + k) % 64).collect();
        i += 1;
        let inputs: Vec<&Vec<f64>> = rows.iter().map(|&r| &fixture.inputs[r]).collect();
        let body = batch_body(&inputs);
        let after_signal = shared.signalled.load(Ordering::Acquire);
        let request = raw_json_request("POST", "/infer", body.as_bytes());
        match raw_exchange(addr, &request) {
            RawOutcome::Response(reply) if reply.status == 200 => {
                let answer: serde_json::Value = match serde_json::from_slice(&reply.body) {
                    Ok(v) => v,
                    Err(e) => {
                        shared
                            .problems
                            .lock()
                            .unwrap()
                            .push(format!("200 with an unparseable body: {e}"));
                        continue;
                    }
                };
                fixture.check(LayerNormMode::Identity, &answer, &rows, "answer during shutdown");
                shared.answered.fetch_add(1, Ordering::AcqRel);
                seen.push(Seen::Answer);
            }
            RawOutcome::Response(reply) if reply.status == 503 => {
                reply.assert_error(503, "not_ready", "503 while draining");
                if !shared.signalled.load(Ordering::Acquire) {
                    shared.problems.lock().unwrap().push("503 before SIGTERM".into());
                }
                seen.push(Seen::Draining);
            }
            RawOutcome::Response(reply) => {
                shared
                    .problems
                    .lock()
                    .unwrap()
                    .push(format!("status {}: {}", reply.status, reply.text()));
            }
            RawOutcome::Partial { bytes, error } => {
                shared.problems.lock().unwrap().push(format!(
                    "truncated response ({error}): {:?}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
            RawOutcome::NoResponse(error) => {
                let after = after_signal || shared.signalled.load(Ordering::Acquire);
                if !after {
                    shared
                        .problems
                        .lock()
                        .unwrap()
                        .push(format!("failed before SIGTERM: {error}"));
                }
                seen.push(Seen::NoResponse);
                if after {
                    // The server stopped accepting: this client is done.
                    break;
                }
            }
        }
    }
    seen
}

/// Best effort: a kept-alive connection may see readiness turn 503
/// (`draining`) after SIGTERM; whether it did.
fn saw_readiness_drain(readiness: &ureq::Agent, server: &ProcessServer) -> bool {
    for _ in 0..20 {
        match try_get(readiness, &server.url("/readyz")) {
            Ok(r) if r.status == 503 => {
                assert_eq!(r.json()["status"], "draining");
                return true;
            }
            Ok(r) => assert_eq!(r.status, 200, "readyz answers 200 or 503"),
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn sigterm_under_load_drains_and_exits_cleanly() {
    let fixture = Arc::new(Fixture::load("nano-s11"));
    let arch = fixture.arch.display().to_string();
    let checkpoint = fixture.checkpoint.display().to_string();
    let mut server = ProcessServer::start(
        &["--arch", &arch, "--checkpoint", &checkpoint, "--workers", "2"],
        &[("TOKITAI_SERVER_SHUTDOWN_TIMEOUT_SECS", "10")],
    );
    let addr = server.addr;
    let readiness = agent();
    assert_eq!(get(&readiness, &server.url("/readyz")).status, 200);

    const CLIENTS: usize = 4;
    let shared = Arc::new(UnderSigterm::default());
    let handles: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (fixture, shared) = (Arc::clone(&fixture), Arc::clone(&shared));
            std::thread::spawn(move || sigterm_client(c, &fixture, addr, &shared))
        })
        .collect();

    // Let load build up, then ask the server to stop.
    for _ in 0..3000 {
        if shared.answered.load(Ordering::Acquire) >= 20 || handles.iter().all(|h| h.is_finished()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        shared.answered.load(Ordering::Acquire) >= 20,
        "clients were answered before SIGTERM"
    );
    shared.signalled.store(true, Ordering::Release);
    server.signal("TERM");
    let saw_draining_readyz = saw_readiness_drain(&readiness, &server);
    drop(readiness);

    let status = server.wait_exit(Duration::from_secs(10 + 20));
    shared.stop.store(true, Ordering::Release);
    let seen: Vec<Seen> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect();
    let status = status.expect("the server did not exit after SIGTERM within its shutdown timeout");
    assert!(status.success(), "exit status after SIGTERM: {status:?}");

    let problems = shared.problems.lock().unwrap();
    assert!(problems.is_empty(), "bad outcomes: {problems:#?}");
    let answers = seen.iter().filter(|s| matches!(s, Seen::Answer)).count();
    let draining = seen.iter().filter(|s| matches!(s, Seen::Draining)).count();
    let failed = seen.iter().filter(|s| matches!(s, Seen::NoResponse)).count();
    assert!(answers >= 20);
    eprintln!(
        "SIGTERM under load: {answers} answers, {draining} draining 503s, {failed} refused after the signal, \
         readyz 503 observed: {saw_draining_readyz}"
    );
}
