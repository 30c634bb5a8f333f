//! The autoscaling queries of deploy/, as shipped, evaluated against a real
//! Prometheus scraping two real engines through the shipped scrape job: the
//! prometheus-adapter rule's metricsQuery (its template filled in as the
//! adapter fills it for an HPA's pods) and the KEDA ScaledObject's query.
//! They must return one series per pod, labelled by the scrape job's `pod`
//! label, exactly 0 before any request, and rise with queueing: the pod under
//! a queue-building load reads far above the pod serving one client at a time.
//! The heavy pod serves TWO models from a model repository (series labelled
//! `{model, version}`): one under the queue-building load, the other served
//! one request at a time; the pod's value is the max over its models of each
//! model's queue wait per request (prometheus-adapter-rules.yaml says why),
//! so the busy model is not diluted by the quick one.
//!
//! The scrape job's kubernetes_sd_configs is swapped for file_sd_configs
//! whose targets carry the `__meta_kubernetes_*` labels Kubernetes discovery
//! gives an engine pod (and two decoys it must drop), so the job's own
//! relabelling makes the labels the queries group by. Needs Debian's
//! `prometheus` package and the deploy checks' tools
//! (`deploy/check/install.sh`); without them these tests fail, never skip.
//!
//! Owns: nothing but tests. Must not touch: the engine's behaviour.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::common::deploy::{self, object, rendered, yaml_file};
use crate::common::two_models::{self, ModelPlan, TwoModels};
use crate::common::{
    Prometheus, SCRAPE_TIMEOUT, TestServer, agent, base_config, concurrent_clients, nano_dims, post, tool, wait_for,
};
use serde_json::{Value, json};

const SCRAPE_JOB: &str = "deploy/kubernetes/overlays/monitoring/prometheus-scrape-job.yml";
const NAMESPACE: &str = "tokitai";
/// Pod names as a Deployment's ReplicaSet makes them.
const LIGHT_POD: &str = "tokitai-serve-6b7d9c8f5-l1ght";
const HEAVY_POD: &str = "tokitai-serve-6b7d9c8f5-h3avy";

/// Heavy load: more rows in flight than the one worker computes per batch,
/// so requests wait behind earlier requests' batches.
const HEAVY_CLIENTS: usize = 6;
const HEAVY_REQUESTS: usize = 4;
const HEAVY_ROWS: usize = 512;
const HEAVY_BATCH_ROWS: usize = 64;
/// Light load: one client, one small request at a time: nothing queues.
const LIGHT_REQUESTS: usize = 30;
const LIGHT_ROWS: usize = 8;

/// The heavy pod's models: `busy` takes the heavy load on one worker of one
/// thread (its compute is the bottleneck), `quick` the light load beside it.
const BUSY: ModelPlan = ModelPlan {
    name: "busy",
    version: 1,
    workers: 1,
    max_batch_rows: HEAVY_BATCH_ROWS,
    max_queue_rows: 4096,
    max_queue_delay_us: 0,
    seed: 31,
};
const QUICK: ModelPlan = ModelPlan {
    name: "quick",
    version: 2,
    workers: 1,
    max_batch_rows: 256,
    max_queue_rows: 4096,
    max_queue_delay_us: 0,
    seed: 32,
};

/// The shipped scrape job with Kubernetes discovery swapped for a file of
/// targets (`targets.json` in `dir`), scraping every second.
fn scrape_job_with_file_discovery(dir: &Path) -> String {
    let job = std::fs::read_to_string(deploy::repo_root().join(SCRAPE_JOB)).unwrap();
    let sd = "    kubernetes_sd_configs:\n      - role: pod\n";
    assert!(
        job.contains(sd),
        "{SCRAPE_JOB} discovers pods through the Kubernetes API"
    );
    let file_sd = format!(
        "    file_sd_configs:\n      - files: [{:?}]\n        refresh_interval: 1s\n",
        dir.join("targets.json")
    );
    let timing = ["    scrape_interval: 15s\n", "    scrape_timeout: 5s\n"];
    assert!(
        timing.iter().all(|t| job.contains(t)),
        "{SCRAPE_JOB}: the expected interval lines"
    );
    let config = job
        .replace(sd, &file_sd)
        .replace(timing[0], "    scrape_interval: 1s\n")
        .replace(timing[1], "    scrape_timeout: 1s\n");
    format!("global:\n  evaluation_interval: 1s\n{config}")
}

/// A target as Kubernetes pod discovery describes one container port.
fn pod_target(addr: &str, pod: &str, container: &str, port_name: &str, phase: &str) -> Value {
    json!({"targets": [addr], "labels": {
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_container_name": container,
        "__meta_kubernetes_pod_container_port_name": port_name,
        "__meta_kubernetes_pod_phase": phase,
    }})
}

fn start_prometheus(light: &TestServer, heavy: &TestServer) -> Prometheus {
    let (l, h) = (light.addr().to_string(), heavy.addr().to_string());
    let targets = json!([
        pod_target(&l, LIGHT_POD, "tokitai-serve", "http", "Running"),
        pod_target(&h, HEAVY_POD, "tokitai-serve", "tokitai-http", "Running"),
        // Decoys the job must drop: another container's port, a pod not running.
        pod_target(&l, "search-7f9c6d5b8-x1", "search", "http", "Running"),
        pod_target(&h, "tokitai-serve-6b7d9c8f5-p3nd", "tokitai-serve", "http", "Pending"),
    ]);
    Prometheus::start(|dir| {
        std::fs::write(dir.join("targets.json"), targets.to_string()).unwrap();
        scrape_job_with_file_discovery(dir)
    })
}

/// The adapter rule's metricsQuery as prometheus-adapter sends it for an
/// HPA over these two pods.
fn adapter_query() -> String {
    let rule = &yaml_file("deploy/kubernetes/overlays/service/prometheus-adapter-rules.yaml")["rules"][0];
    let template = rule["metricsQuery"].as_str().expect("metricsQuery");
    let matchers = format!("namespace=\"{NAMESPACE}\",pod=~\"{LIGHT_POD}|{HEAVY_POD}\"");
    let query = template
        .replace("<<.LabelMatchers>>", &matchers)
        .replace("<<.GroupBy>>", "pod");
    assert!(!query.contains("<<"), "every template field filled: {query}");
    query
}

/// The KEDA ScaledObject's query, as rendered.
fn keda_query() -> String {
    let docs = rendered("service-keda");
    let scaled = object(&docs, "ScaledObject", "tokitai-serve");
    scaled["spec"]["triggers"][0]["metadata"]["query"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `query` at `time`: each series' labels and value.
fn eval(prom: &Prometheus, query: &str, time: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let data = prom
        .api("query", &[("query", query), ("time", time)])
        .unwrap_or_else(|e| panic!("{query}: {e}"));
    assert_eq!(data["resultType"], "vector", "{query}");
    data["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let labels = serde_json::from_value(s["metric"].clone()).unwrap();
            (labels, s["value"][1].as_str().unwrap().parse().unwrap())
        })
        .collect()
}

/// Per pod: the value of the adapter query's series, which must be one per pod.
fn per_pod(result: &[(BTreeMap<String, String>, f64)]) -> BTreeMap<String, f64> {
    assert_eq!(result.len(), 2, "one series per pod: {result:?}");
    result
        .iter()
        .map(|(labels, v)| {
            assert_eq!(
                labels.keys().collect::<Vec<_>>(),
                ["pod"],
                "grouped by pod alone: {labels:?}"
            );
            (labels["pod"].clone(), *v)
        })
        .collect()
}

fn now(prom: &Prometheus) -> String {
    // Prometheus's own clock, so the two queries of a comparison agree.
    let result = prom.query("time()").unwrap();
    result[0][1].as_str().unwrap().to_string()
}

fn rows_body(rows: usize, seed: usize) -> String {
    let width = nano_dims().input;
    let rows: Vec<Vec<f32>> = (0..rows)
        .map(|r| {
            (0..width)
                .map(|i| (((seed + r * 7 + i) % 13) as f32 - 6.0) / 6.0)
                .collect()
        })
        .collect();
    json!({ "features": rows }).to_string()
}

/// Sum and count of `name` on the engine's own /metrics, over the series
/// whose labels include `labels`.
fn own(engine: &TestServer, name: &str, labels: &[(&str, &str)]) -> (f64, f64) {
    let m = engine.metrics();
    (
        m.sum(&format!("{name}_sum"), labels),
        m.sum(&format!("{name}_count"), labels),
    )
}

/// The light pod: the demo model on one worker of one thread.
fn light_engine() -> TestServer {
    let mut config = base_config();
    config.workers.count = 1;
    config.workers.threads_per_worker = 1;
    config.batching.max_batch_rows = 256;
    TestServer::start(config)
}

#[test]
fn scrape_job_passes_promtool_with_file_discovery() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("targets.json"), "[]").unwrap();
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, scrape_job_with_file_discovery(dir.path())).unwrap();
    let out = Command::new(tool("promtool", "PROMTOOL"))
        .args(["check", "config"])
        .arg(&path)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("SUCCESS"),
        "promtool check config:\n{text}"
    );
}

/// Sends the loads at once: the light load to the light pod (/infer) and to
/// the heavy pod's quick model (v2), the heavy load to the heavy pod's busy
/// model (v2). Every answer must be a 200.
fn drive_load(light: &TestServer, heavy: &TestServer) {
    std::thread::scope(|s| {
        s.spawn(|| {
            let agent = agent();
            for i in 0..LIGHT_REQUESTS {
                let r = post(&agent, &light.url("/infer"), &rows_body(LIGHT_ROWS, i), &[]);
                assert_eq!(r.status, 200, "light request {i}");
            }
        });
        s.spawn(|| {
            let agent = agent();
            for i in 0..LIGHT_REQUESTS {
                let status = two_models::v2_infer(&agent, heavy, QUICK.name, LIGHT_ROWS, i);
                assert_eq!(status, 200, "quick model request {i}");
            }
        });
        concurrent_clients(HEAVY_CLIENTS, |c, agent| {
            for i in 0..HEAVY_REQUESTS {
                let status = two_models::v2_infer(agent, heavy, BUSY.name, HEAVY_ROWS, c * 100 + i);
                assert_eq!(status, 200, "heavy client {c} request {i}");
            }
        });
    });
}

/// Per (pod, model): each model's mean queue wait per request, the inner
/// part of both queries.
fn per_model(prom: &Prometheus, time: &str) -> BTreeMap<(String, String), f64> {
    let m = "namespace=\"tokitai\"";
    let q = format!(
        "sum by (pod, model) (rate(tokitai_queue_wait_seconds_sum{{{m}}}[1m])) \
         / clamp_min(sum by (pod, model) (rate(tokitai_queue_wait_seconds_count{{{m}}}[1m])), 1e-9)"
    );
    eval(prom, &q, time)
        .into_iter()
        .map(|(l, v)| ((l["pod"].clone(), l.get("model").cloned().unwrap_or_default()), v))
        .collect()
}

/// Waits until three scrapes of both engines are in, and checks the scrape
/// job kept the two engines and dropped the decoys, labelled as Kubernetes
/// discovery would have them.
fn wait_for_both_pods(prom: &Prometheus) {
    wait_for("three scrapes of both engines", SCRAPE_TIMEOUT, || {
        let r = eval(prom, "count_over_time(up{job=\"tokitai-serve\"}[1m]) >= 3", &now(prom));
        (r.len() == 2).then_some(())
    });
    let up = eval(prom, "up{job=\"tokitai-serve\"}", &now(prom));
    let mut pods: Vec<&str> = up.iter().map(|(l, _)| l["pod"].as_str()).collect();
    pods.sort_unstable();
    assert_eq!(pods, [HEAVY_POD, LIGHT_POD], "the scrape job's targets: {up:?}");
    assert!(
        up.iter()
            .all(|(l, v)| *v == 1.0 && l["namespace"] == NAMESPACE && l["container"] == "tokitai-serve")
    );
}

#[test]
fn autoscaling_queries_give_one_series_per_pod_zero_idle_and_rise_with_queueing() {
    let light = light_engine();
    let heavy = TwoModels::start(&[BUSY, QUICK], |_| {});
    let prom = start_prometheus(&light, &heavy.server);
    let (adapter, keda) = (adapter_query(), keda_query());
    wait_for_both_pods(&prom);

    // Idle: no request yet, both exactly 0 (not NaN, not missing), though
    // the heavy pod serves two models.
    let t = now(&prom);
    let idle = per_pod(&eval(&prom, &adapter, &t));
    assert_eq!(idle.values().copied().collect::<Vec<_>>(), [0.0, 0.0], "idle: {idle:?}");
    let k = eval(&prom, &keda, &t);
    assert_eq!((k.len(), k[0].1), (1, 0.0), "KEDA's query idle: {k:?}");
    let models = per_model(&prom, &t);
    assert!(
        models.contains_key(&(HEAVY_POD.to_string(), BUSY.name.to_string()))
            && models.contains_key(&(HEAVY_POD.to_string(), QUICK.name.to_string())),
        "the heavy pod's two models each have their queue-wait series at zero: {models:?}"
    );

    drive_load(&light, &heavy.server);
    for (server, pod) in [(&light, LIGHT_POD), (&heavy.server, HEAVY_POD)] {
        let (_, count) = own(server, "tokitai_queue_wait_seconds", &[]);
        let q = format!("sum(tokitai_queue_wait_seconds_count{{pod=\"{pod}\"}})");
        wait_for("Prometheus to scrape every request", SCRAPE_TIMEOUT, || {
            prom.scalar(&q).filter(|v| *v >= count)
        });
    }
    let t = now(&prom);
    let loaded = per_pod(&eval(&prom, &adapter, &t));
    let models = per_model(&prom, &t);
    let (light_v, heavy_v) = (loaded[LIGHT_POD], loaded[HEAVY_POD]);
    let model_v = |name: &str| models[&(HEAVY_POD.to_string(), name.to_string())];
    let (busy_v, quick_v) = (model_v(BUSY.name), model_v(QUICK.name));
    let busy_labels = [("model", BUSY.name)];
    let (compute_sum, batches) = own(&heavy.server, "tokitai_compute_seconds", &busy_labels);
    let batch = compute_sum / batches;
    let (wait_sum, requests) = own(&heavy.server, "tokitai_queue_wait_seconds", &busy_labels);
    println!(
        "queue wait per request: light pod {:.3} ms; heavy pod {:.3} ms (busy model {:.3} ms, engine's own mean \
         {:.3} ms over {requests} requests; quick model {:.3} ms); busy model's mean batch compute {:.3} ms over \
         {batches} batches",
        light_v * 1e3,
        heavy_v * 1e3,
        busy_v * 1e3,
        wait_sum / requests * 1e3,
        quick_v * 1e3,
        batch * 1e3
    );
    // The pod reads its most-queued model: the max over its models.
    assert_eq!(
        heavy_v,
        busy_v.max(quick_v),
        "the heavy pod's value is the max over its models"
    );
    assert_eq!(light_v, models[&(LIGHT_POD.to_string(), "tokitai-moe".to_string())]);
    // Rising with queueing: the busy model's requests wait behind several
    // batches of other requests; the quick model's and the light pod's
    // behind none.
    assert!(
        busy_v > 2.0 * batch,
        "the busy model waits {busy_v} s, less than two batches ({batch} s each)"
    );
    assert!(
        quick_v < busy_v / 5.0,
        "quick model {quick_v} s against busy model {busy_v} s"
    );
    assert!(
        light_v < heavy_v / 5.0,
        "light pod {light_v} s against heavy pod {heavy_v} s"
    );
    // KEDA's one number is the sum of the per-pod values (AverageValue
    // divides it by the replicas).
    let k = eval(&prom, &keda, &t);
    assert_eq!(k.len(), 1, "KEDA's query gives one series: {k:?}");
    let sum = light_v + heavy_v;
    assert!(
        (k[0].1 - sum).abs() <= 1e-9 * sum,
        "KEDA {} vs the adapter's {light_v} + {heavy_v}",
        k[0].1
    );
    light.shutdown();
    heavy.server.shutdown();
}
