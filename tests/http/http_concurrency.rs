//! Concurrent clients get exactly their own answers.
//!
//! Proves that with 64 concurrent keep-alive clients sending a deterministic
//! mix of single rows and batches of 1..=8 rows (fixture rows and random
//! rows), every answer is bit-identical (the same JSON numbers) to the answer
//! the same request got when sent alone, one at a time, against the same
//! server: batching across requests neither mixes rows between clients nor
//! changes a single bit of any row. It also proves that requests really were
//! batched together (`tokitai_batch_size_requests` saw a batch of more than
//! one request), so the comparison is not vacuous.

use crate::common::{
    Fixture, Metrics, Rng, TestServer, agent, batch_body, concurrent_clients, fixture_config, post, single_body,
};
use serde_json::Value;
use tokitai_serve::model::LayerNormMode;

const CLIENTS: usize = 64;
const REQUESTS_PER_CLIENT: usize = 4;

/// The request plan: for each client, its request bodies in order.
fn plan(fixture: &Fixture) -> Vec<Vec<String>> {
    let mut rng = Rng(0x5EED_1234);
    (0..CLIENTS)
        .map(|_| {
            (0..REQUESTS_PER_CLIENT)
                .map(|_| {
                    let row = |rng: &mut Rng| {
                        if rng.below(2) == 0 {
                            fixture.inputs[rng.below(fixture.inputs.len())].clone()
                        } else {
                            rng.row(fixture.dims.input)
                        }
                    };
                    if rng.below(3) == 0 {
                        single_body(&row(&mut rng))
                    } else {
                        let n = 1 + rng.below(8);
                        let rows: Vec<Vec<f64>> = (0..n).map(|_| row(&mut rng)).collect();
                        batch_body(&rows)
                    }
                })
                .collect()
        })
        .collect()
}

/// The JSON answer to `body`, which must be a 200.
fn answer(agent: &ureq::Agent, url: &str, body: &str, who: &str) -> Value {
    let reply = post(agent, url, body, &[]);
    assert_eq!(reply.status, 200, "{who}: {}", reply.text());
    reply.json()
}

/// Sequential reference answers to the `plan`, one request at a time.
fn sequential_answers(plan: &[Vec<String>], url: &str) -> Vec<Vec<Value>> {
    let agent = agent();
    plan.iter()
        .map(|client| {
            client
                .iter()
                .map(|body| answer(&agent, url, body, "sequential"))
                .collect()
        })
        .collect()
}

/// Sanity: the fixture rows in the `plan` answered correctly when alone.
fn assert_sequential_answers_match_the_fixture(fixture: &Fixture, plan: &[Vec<String>], sequential: &[Vec<Value>]) {
    for (c, client) in plan.iter().enumerate() {
        for (i, body) in client.iter().enumerate() {
            let sent: Value = serde_json::from_str(body).unwrap();
            let rows: Vec<Vec<f64>> = match &sent["features"][0] {
                Value::Array(_) => serde_json::from_value(sent["features"].clone()).unwrap(),
                _ => vec![serde_json::from_value(sent["features"].clone()).unwrap()],
            };
            assert_eq!(sequential[c][i]["logits"].as_array().unwrap().len(), rows.len());
            for (j, row) in rows.iter().enumerate() {
                if let Some(r) = fixture.inputs.iter().position(|x| x == row) {
                    let one = serde_json::json!({
                        "logits": [sequential[c][i]["logits"][j].clone()],
                        "router_weights": [sequential[c][i]["router_weights"][j].clone()],
                    });
                    fixture.check(LayerNormMode::Identity, &one, &[r], "sequential answer");
                }
            }
        }
    }
}

/// Requests were really batched together between the `before` and `after`
/// scrapes, and every one was answered 200.
fn assert_requests_shared_batches(before: &Metrics, after: &Metrics) {
    let le1 = after.sum("tokitai_batch_size_requests_bucket", &[("le", "1")])
        - before.sum("tokitai_batch_size_requests_bucket", &[("le", "1")]);
    let total =
        after.sum("tokitai_batch_size_requests_count", &[]) - before.sum("tokitai_batch_size_requests_count", &[]);
    assert!(total > 0.0, "batches were computed");
    assert!(
        le1 < total,
        "no batch held more than one request ({le1} of {total} batches had one)"
    );
    let answered = after.requests_by_status("/infer");
    assert_eq!(
        answered.get(&200).copied(),
        Some((2 * CLIENTS * REQUESTS_PER_CLIENT) as u64)
    );
    assert_eq!(answered.len(), 1, "only 200s: {answered:?}");
}

#[test]
fn concurrent_clients_get_their_own_bit_identical_answers() {
    let fixture = Fixture::load("nano-s12");
    let mut config = fixture_config("nano-s12", LayerNormMode::Identity);
    config.workers.count = 2;
    config.workers.threads_per_worker = 1;
    // Partial batches wait up to 2 ms for company, so requests from
    // different clients share batches even on a loaded machine.
    config.batching.max_queue_delay_us = 2000;
    let server = TestServer::start(config);
    let url = server.url("/infer");
    let plan = plan(&fixture);
    let sequential = sequential_answers(&plan, &url);
    assert_sequential_answers_match_the_fixture(&fixture, &plan, &sequential);
    let before = server.metrics();

    // The same requests from 64 concurrent clients, each on its own connection.
    let concurrent: Vec<Vec<Value>> = concurrent_clients(CLIENTS, |c, agent| {
        plan[c]
            .iter()
            .map(|body| answer(agent, &url, body, &format!("client {c}")))
            .collect()
    });
    for c in 0..CLIENTS {
        for i in 0..REQUESTS_PER_CLIENT {
            assert_eq!(
                concurrent[c][i], sequential[c][i],
                "client {c} request {i}: concurrent answer differs from the sequential one"
            );
        }
    }
    assert_requests_shared_batches(&before, &server.metrics());
    server.shutdown();
}
