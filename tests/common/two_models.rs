//! Two models in one model repository, served by one in-process engine and
//! driven with a known number of requests on every inference route, for the
//! monitoring tests (tests/deploy/prometheus_live.rs and
//! tests/deploy/autoscaling_queries.rs, through tests/deploy/main.rs's
//! `common` module).
//!
//! Owns: [`ModelPlan`] (a model's name, version and pool settings, written
//! as its repository folder and `config.toml`), [`TwoModels`] (the
//! repository and the engine serving it), the senders ([`v2_infer`],
//! [`grpc_infer`], [`grpc_stream_infer`]) and [`Sent`] (what a model was
//! sent, and what its series and statistics must then read). Must not touch:
//! the engine (only its public routes) or another test's fixtures.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde_json::json;
use tokitai_serve::config::{Config, ControlMode};
use tokitai_serve::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use tokitai_serve::grpc::pb::model_infer_request::InferInputTensor;
use tokitai_serve::grpc::pb::{self, ModelInferRequest};
use tokitai_serve::model::{ModelSize, write_model_dir};
use tonic::transport::Channel;

use crate::common::{TestServer, agent, base_config, get, nano_dims, post, prom::Metrics};

/// One model of the repository: its folder `NAME/VERSION` (a synthetic Nano
/// model from `seed`) and its own pool settings (`NAME/config.toml`).
#[derive(Clone, Copy, Debug)]
pub struct ModelPlan {
    pub name: &'static str,
    pub version: u64,
    pub workers: usize,
    pub max_batch_rows: usize,
    pub max_queue_rows: usize,
    /// `batching.max_queue_delay_us`: how long a batch that is not full waits.
    pub max_queue_delay_us: u64,
    pub seed: u64,
}

impl ModelPlan {
    /// The model's `config.toml`: its pool, one thread per worker, no regroup
    /// delay (so a lone client's requests are computed one batch after another).
    pub fn config_toml(&self) -> String {
        format!(
            "[batching]\nmax_batch_rows = {}\nmax_queue_rows = {}\nmax_request_rows = {}\nmax_queue_delay_us = {}\n\
             regroup_delay_pct = 0\n\n[workers]\ncount = {}\nthreads_per_worker = 1\n",
            self.max_batch_rows, self.max_queue_rows, self.max_queue_rows, self.max_queue_delay_us, self.workers
        )
    }

    /// Writes the model's version folder and `config.toml` under `repo`.
    pub fn write(&self, repo: &Path) {
        let dir = repo.join(self.name);
        write_model_dir(&dir.join(self.version.to_string()), ModelSize::Nano, self.seed, false)
            .expect("write a synthetic model");
        std::fs::write(dir.join("config.toml"), self.config_toml()).unwrap();
    }

    /// The label values of this model's per-version series.
    pub fn labels(&self) -> [(&'static str, String); 2] {
        [("model", self.name.to_string()), ("version", self.version.to_string())]
    }
}

/// A model repository of the `plans` and the engine serving it (`none`
/// control mode: every model loads at start-up). `/infer` goes to `plans[0]`.
pub struct TwoModels {
    pub server: TestServer,
    pub plans: Vec<ModelPlan>,
    _repo: tempfile::TempDir,
}

impl TwoModels {
    /// Starts the engine on a repository of `plans`; `tweak` adjusts the
    /// server's own settings first.
    pub fn start(plans: &[ModelPlan], tweak: impl FnOnce(&mut Config)) -> TwoModels {
        let repo = tempfile::tempdir().expect("temp dir");
        for plan in plans {
            plan.write(repo.path());
        }
        let mut config = base_config();
        config.model.repository = Some(repo.path().to_path_buf());
        config.model.control_mode = ControlMode::None;
        config.model.name = plans[0].name.to_string();
        tweak(&mut config);
        let server = TestServer::start(config);
        TwoModels {
            server,
            plans: plans.to_vec(),
            _repo: repo,
        }
    }

    /// `GET /v2/models/NAME/stats`: (inference_count, execution_count), summed
    /// over the versions listed.
    pub fn v2_stats(&self, name: &str) -> (u64, u64) {
        let r = get(&agent(), &self.server.url(&format!("/v2/models/{name}/stats")));
        assert_eq!(r.status, 200, "stats of {name}: {}", r.text());
        let stats = r.json();
        let versions = stats["model_stats"].as_array().expect("model_stats");
        assert!(!versions.is_empty(), "{name} has statistics: {stats}");
        versions.iter().fold((0, 0), |(i, e), v| {
            assert_eq!(v["name"], name, "{stats}");
            let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
            (i + n("inference_count"), e + n("execution_count"))
        })
    }
}

/// Rows of the demo width, deterministic in `seed`.
pub fn rows(n: usize, seed: usize) -> Vec<Vec<f32>> {
    let width = nano_dims().input;
    (0..n)
        .map(|r| {
            (0..width)
                .map(|i| (((seed * 31 + r * 7 + i) % 17) as f32 - 8.0) / 8.0)
                .collect()
        })
        .collect()
}

/// The sidecar body (`/infer`).
pub fn sidecar_body(n: usize, seed: usize) -> String {
    json!({ "features": rows(n, seed) }).to_string()
}

/// `POST /v2/models/MODEL/infer` with `n` rows; the status.
pub fn v2_infer(agent: &ureq::Agent, server: &TestServer, model: &str, n: usize, seed: usize) -> u16 {
    let data: Vec<f32> = rows(n, seed).concat();
    let body = json!({ "inputs": [{
        "name": "features", "shape": [n, nano_dims().input], "datatype": "FP32", "data": data
    }] });
    post(
        agent,
        &server.url(&format!("/v2/models/{model}/infer")),
        &body.to_string(),
        &[],
    )
    .status
}

fn grpc_request(model: &str, n: usize, seed: usize) -> ModelInferRequest {
    let raw: Vec<u8> = rows(n, seed).concat().iter().flat_map(|v| v.to_le_bytes()).collect();
    ModelInferRequest {
        model_name: model.into(),
        id: format!("m{seed}"),
        inputs: vec![InferInputTensor {
            name: "features".into(),
            datatype: "FP32".into(),
            shape: vec![n as i64, nano_dims().input as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

async fn client(addr: SocketAddr) -> GrpcInferenceServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the gRPC port");
    GrpcInferenceServiceClient::new(channel)
}

/// gRPC `ModelInfer` calls, one after another, each of `sizes[i]` rows;
/// every one must succeed.
pub fn grpc_infer(addr: SocketAddr, model: &str, sizes: &[usize]) {
    runtime().block_on(async {
        let mut c = client(addr).await;
        for (i, &n) in sizes.iter().enumerate() {
            c.model_infer(grpc_request(model, n, 500 + i))
                .await
                .unwrap_or_else(|e| panic!("ModelInfer {model} ({n} rows): {e}"));
        }
    });
}

/// One `ModelStreamInfer` stream carrying requests of `sizes[i]` rows; every
/// answer must carry no error.
pub fn grpc_stream_infer(addr: SocketAddr, model: &str, sizes: &[usize]) {
    let requests: Vec<ModelInferRequest> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| grpc_request(model, n, 700 + i))
        .collect();
    runtime().block_on(async {
        let mut c = client(addr).await;
        let mut answers = c
            .model_stream_infer(futures_util::stream::iter(requests))
            .await
            .expect("ModelStreamInfer opens")
            .into_inner();
        let mut seen = 0;
        while let Some(answer) = answers.message().await.expect("the stream answers") {
            let answer: pb::ModelStreamInferResponse = answer;
            assert!(
                answer.error_message.is_empty(),
                "stream answer: {}",
                answer.error_message
            );
            seen += 1;
        }
        assert_eq!(seen, sizes.len(), "one stream answer per request");
    });
}

/// What one model was sent, every request answered 200 (or OK), one at a
/// time: the numbers its series and statistics must then read.
#[derive(Clone, Debug, Default)]
pub struct Sent {
    /// Rows of each request, in order.
    pub requests: Vec<usize>,
}

impl Sent {
    pub fn rows(&self) -> u64 {
        self.requests.iter().sum::<usize>() as u64
    }

    pub fn count(&self) -> u64 {
        self.requests.len() as u64
    }

    /// Batches computed: sent one at a time, so no request shares a batch
    /// and each is split into ceil(rows / max_batch_rows) batches.
    pub fn batches(&self, plan: &ModelPlan) -> u64 {
        self.requests
            .iter()
            .map(|n| n.div_ceil(plan.max_batch_rows) as u64)
            .sum()
    }
}

/// Drives `model` one request at a time with `sizes` on the protocol
/// `route` picks: "/infer" (the sidecar route, `plans[0]` only), "v2", "grpc"
/// or "stream". Appends to `sent`.
pub fn drive(models: &TwoModels, model: &str, route: &str, sizes: &[usize], sent: &mut Sent) {
    let server = &models.server;
    let a = agent();
    match route {
        "/infer" => {
            assert_eq!(model, models.plans[0].name, "/infer serves the default model");
            for (i, &n) in sizes.iter().enumerate() {
                let r = post(&a, &server.url("/infer"), &sidecar_body(n, i), &[]);
                assert_eq!(r.status, 200, "/infer ({n} rows): {}", r.text());
            }
        }
        "v2" => {
            for (i, &n) in sizes.iter().enumerate() {
                assert_eq!(
                    v2_infer(&a, server, model, n, 100 + i),
                    200,
                    "v2 infer {model} ({n} rows)"
                );
            }
        }
        "grpc" => grpc_infer(server.grpc_addr(), model, sizes),
        "stream" => grpc_stream_infer(server.grpc_addr(), model, sizes),
        other => panic!("no route {other}"),
    }
    sent.requests.extend_from_slice(sizes);
}

/// The sum of `name` over the series of `plan`'s version (any other labels).
pub fn of_version(m: &Metrics, name: &str, plan: &ModelPlan) -> f64 {
    let [(mk, mv), (vk, vv)] = plan.labels();
    m.sum(name, &[(mk, &mv), (vk, &vv)])
}

/// Every per-version series of `plan` on the engine's own /metrics, as
/// (series, expected value), for what `sent` sent: the pool's settings and
/// the counts the requests made.
pub fn expected_per_version(plan: &ModelPlan, sent: &Sent) -> BTreeMap<&'static str, f64> {
    BTreeMap::from([
        ("tokitai_queue_capacity_rows", plan.max_queue_rows as f64),
        ("tokitai_max_batch_rows", plan.max_batch_rows as f64),
        ("tokitai_workers", plan.workers as f64),
        ("tokitai_queue_depth_rows", 0.0),
        ("tokitai_batches_total", sent.batches(plan) as f64),
        ("tokitai_rows_computed_total", sent.rows() as f64),
        ("tokitai_queue_wait_seconds_count", sent.count() as f64),
        ("tokitai_compute_seconds_count", sent.batches(plan) as f64),
        ("tokitai_batch_size_rows_count", sent.batches(plan) as f64),
        ("tokitai_batch_size_rows_sum", sent.rows() as f64),
        // One request (part) per batch: sent one at a time.
        ("tokitai_batch_size_requests_sum", sent.batches(plan) as f64),
        ("tokitai_router_top1_weight_count", sent.rows() as f64),
        // Top-2 routing: every row selects two experts.
        ("tokitai_expert_rows_total", 2.0 * sent.rows() as f64),
        ("tokitai_rows_dropped_total", 0.0),
        ("tokitai_worker_restarts_total", 0.0),
        ("tokitai_model_answers_total", sent.count() as f64),
    ])
}
