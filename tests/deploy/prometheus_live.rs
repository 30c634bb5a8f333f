//! Monitoring assets checked with the real tools: `promtool` on the
//! Prometheus config, the alerting rules and their unit tests, and on a live
//! `/metrics` scrape; a real `prometheus` scraping an in-process engine that
//! serves TWO models from a model repository, each driven with a known
//! number of requests on every inference route (the sidecar's /infer, v2
//! HTTP, gRPC ModelInfer and ModelStreamInfer): every per-version series
//! (`{model, version}` labels) and the v2 statistics of each model read what
//! that model was sent, on /metrics and through Prometheus; every query of
//! the Grafana dashboard has data, and keeps to one model when `$model`
//! names one; the queue alert's expression names the busy model of two.
//!
//! Needs Debian's `prometheus` package (`apt-get install prometheus`), which
//! provides both `prometheus` and `promtool`; `PROMETHEUS` and `PROMTOOL` may
//! name other binaries. Without them these tests fail, never skip.
//!
//! Owns: nothing but tests. Must not touch: the engine's behaviour.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::two_models::{ModelPlan, Sent, TwoModels, expected_per_version, of_version};
use crate::common::{Prometheus, SCRAPE_TIMEOUT, TestServer, agent, nano_dims, tool, wait_for};
use serde_json::{Value, json};

use crate::common::two_models;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Substituted for Grafana's `$__rate_interval` (the live scrape runs every 1s).
const RATE_INTERVAL: &str = "10s";
/// Substituted for Grafana's `$__range`.
const RANGE: &str = "5m";

fn root() -> &'static Path {
    Path::new(ROOT)
}

// ---- tools -----------------------------------------------------------------

fn promtool() -> PathBuf {
    tool("promtool", "PROMTOOL")
}

/// Runs promtool with `args` (and `stdin`), returning its output; fails the
/// test with that output unless it exits 0.
fn run_promtool(args: &[&str], stdin: Option<&[u8]>) -> String {
    let mut child = Command::new(promtool())
        .args(args)
        .current_dir(root())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input).expect("promtool reads its stdin");
    }
    let out = child.wait_with_output().expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    text
}

// ---- the engine: two models, in-process -------------------------------------

/// The default model (`/infer` goes to it): one worker, small batches, so
/// its requests split into several.
const ALPHA: ModelPlan = ModelPlan {
    name: "alpha",
    version: 1,
    workers: 1,
    max_batch_rows: 8,
    max_queue_rows: 256,
    max_queue_delay_us: 0,
    seed: 11,
};
/// The second model: its own pool (two workers, other limits) and version.
const BETA: ModelPlan = ModelPlan {
    name: "beta",
    version: 3,
    workers: 2,
    max_batch_rows: 32,
    max_queue_rows: 512,
    max_queue_delay_us: 0,
    seed: 12,
};

/// Rows per request each model is sent, by route; one request at a time
/// per model, both models at once.
const ALPHA_LOAD: [(&str, &[usize]); 3] = [("/infer", &[1, 3, 8, 13]), ("v2", &[2, 9, 5]), ("grpc", &[4, 17])];
const BETA_LOAD: [(&str, &[usize]); 3] = [("v2", &[16, 40, 1]), ("grpc", &[33, 7]), ("stream", &[2, 5, 64])];

fn start_engine() -> TwoModels {
    TwoModels::start(&[ALPHA, BETA], |config| {
        config.server.http_workers = 2;
        config.server.shutdown_timeout_secs = 5;
    })
}

/// POSTs to /infer and returns the status (error statuses included).
fn post_infer(engine: &TestServer, content_type: &str, body: &str) -> u16 {
    match agent()
        .post(&engine.url("/infer"))
        .set("content-type", content_type)
        .send_string(body)
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("/infer transport error: {e}"),
    }
}

/// What the load sent: per model, the valid requests; on /infer, the
/// statuses (the invalid requests reach no model).
#[derive(Default, Debug)]
struct Load {
    by_model: BTreeMap<&'static str, Sent>,
    /// /infer, by status.
    infer_by_status: BTreeMap<u16, u64>,
    /// Requests per route label (HTTP route template or gRPC method path), all 200 / OK.
    by_route: BTreeMap<&'static str, u64>,
}

const V2_INFER: &str = "/v2/models/{model}/infer";
const GRPC_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
const GRPC_STREAM: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

/// Both models driven at once, each one request at a time on every route
/// of its plan (ALPHA_LOAD, BETA_LOAD); then invalid (400), too large (413)
/// and wrong media type (415) requests on /infer. Every status is checked.
fn drive_load(models: &TwoModels) -> Load {
    let mut load = Load::default();
    let sent: Vec<(&'static str, Sent)> = std::thread::scope(|s| {
        let handles: Vec<_> = [(ALPHA.name, ALPHA_LOAD), (BETA.name, BETA_LOAD)]
            .into_iter()
            .map(|(name, plan)| {
                s.spawn(move || {
                    let mut sent = Sent::default();
                    for (route, sizes) in plan {
                        two_models::drive(models, name, route, sizes, &mut sent);
                    }
                    (name, sent)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("load thread")).collect()
    });
    load.by_model.extend(sent);
    for (route, sizes) in ALPHA_LOAD.iter().chain(&BETA_LOAD) {
        let label = match *route {
            "/infer" => "/infer",
            "v2" => V2_INFER,
            "grpc" => GRPC_INFER,
            _ => GRPC_STREAM,
        };
        // A stream is one call, whatever it carries.
        let calls = if label == GRPC_STREAM { 1 } else { sizes.len() as u64 };
        *load.by_route.entry(label).or_default() += calls;
    }
    *load.infer_by_status.entry(200).or_default() += ALPHA_LOAD[0].1.len() as u64;

    let engine = &models.server;
    let width = nano_dims().input;
    let body = |rows: usize, len: usize| json!({ "features": vec![vec![0.5f32; len]; rows] }).to_string();
    let cases: [(&str, String, u16); 8] = [
        ("application/json", "{not json".to_string(), 400),
        ("application/json", body(1, width - 1), 400),
        ("application/json", json!({ "features": "x" }).to_string(), 400),
        ("application/json", json!({ "rows": [] }).to_string(), 400),
        ("application/json", body(ALPHA.max_queue_rows + 1, width), 413),
        ("application/json", body(ALPHA.max_queue_rows * 4, width), 413),
        ("text/plain", body(1, width), 415),
        ("application/x-www-form-urlencoded", "features=1".to_string(), 415),
    ];
    for (content_type, body, expected) in &cases {
        let status = post_infer(engine, content_type, body);
        assert_eq!(status, *expected, "{content_type} {:.60}", body);
        *load.infer_by_status.entry(status).or_default() += 1;
    }
    load
}

// ---- a real Prometheus -----------------------------------------------------

/// Prometheus scraping one engine every `interval` with the shipped rules.
fn start_prometheus(target: SocketAddr, interval: &str) -> Prometheus {
    let rules = root().join("config/alerts.yml");
    Prometheus::start(|_| {
        format!(
            "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: tokitai-serve\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: [\"{target}\"]\n"
        )
    })
}

/// The `expr` of alert `name` in config/alerts.yml (a `|` block).
fn alert_expr(name: &str) -> String {
    let rules = std::fs::read_to_string(root().join("config/alerts.yml")).unwrap();
    let block = rules
        .split("- alert: ")
        .find(|b| b.lines().next() == Some(name))
        .unwrap_or_else(|| panic!("no alert {name}"));
    let mut lines = block.lines().skip_while(|l| !l.trim_start().starts_with("expr: |"));
    lines.next().expect("the expression is a | block");
    lines
        .take_while(|l| l.starts_with("          "))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

/// An instant query's series: labels and value.
fn series(prom: &Prometheus, query: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    prom.query(query)
        .unwrap_or_else(|e| panic!("{query}: {e}"))
        .iter()
        .map(|s| {
            let labels = serde_json::from_value(s["metric"].clone()).unwrap();
            (labels, s["value"][1].as_str().unwrap().parse().unwrap())
        })
        .collect()
}

// ---- the dashboard ---------------------------------------------------------

fn dashboard() -> Value {
    let path = root().join("dashboards/tokitai-serve.json");
    let text = std::fs::read_to_string(&path).expect("dashboards/tokitai-serve.json exists");
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<Value> {
    fn walk(list: &Value, out: &mut Vec<Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p.clone());
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// (panel title, refId, expr) of every query in the dashboard.
fn panel_queries(dashboard: &Value) -> Vec<(String, String, String)> {
    panels(dashboard)
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| {
                    let expr = t["expr"].as_str()?;
                    Some((
                        title.clone(),
                        t["refId"].as_str().unwrap_or("?").to_string(),
                        expr.to_string(),
                    ))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A dashboard query as Grafana would send it for one instance and the
/// `model` variable's value (a regex: ".+" is All).
fn substitute(expr: &str, instance: &str, model: &str) -> String {
    expr.replace("${instance}", instance)
        .replace("$instance", instance)
        .replace("${model}", model)
        .replace("$model", model)
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__range", RANGE)
        .replace("$__interval", "2s")
}

/// Metric-like identifiers (`tokitai_*`, `process_*`) in `text`, with the
/// byte offset just past each.
fn metric_idents(text: &str) -> Vec<(String, usize)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':') {
                i += 1;
            }
            let word = &text[start..i];
            if word.starts_with("tokitai_") || word.starts_with("process_") {
                out.push((word.to_string(), i));
            }
        } else if c == b'"' {
            // Skip string literals: label values are not metric names.
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else {
            i += 1;
        }
    }
    out
}

/// Every series name a two-model engine exports once it has served every
/// inference route, read from its own `/metrics` (its `# TYPE` lines, so a
/// family counts even with no sample), process collector included.
fn exported_names() -> BTreeSet<String> {
    let models = start_engine();
    drive_load(&models);
    let names = models.server.metrics().series_names();
    models.server.shutdown();
    assert!(
        names.contains("process_cpu_seconds_total"),
        "the process collector is registered"
    );
    names
}

/// The series carried per model version (`{model, version}` labels; the
/// contract of issue 22): a dashboard query on one must filter on `$model`.
const PER_VERSION: [&str; 17] = [
    "tokitai_queue_depth_rows",
    "tokitai_queue_rejections_total",
    "tokitai_queue_capacity_rows",
    "tokitai_max_batch_rows",
    "tokitai_workers",
    "tokitai_batches_total",
    "tokitai_rows_computed_total",
    "tokitai_worker_busy_seconds_total",
    "tokitai_worker_restarts_total",
    "tokitai_batch_size_rows",
    "tokitai_batch_size_requests",
    "tokitai_queue_wait_seconds",
    "tokitai_compute_seconds",
    "tokitai_rows_dropped_total",
    "tokitai_expert_rows_total",
    "tokitai_router_top1_weight",
    "tokitai_model_answers_total",
];

/// A series name without its histogram suffix.
fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s).filter(|f| PER_VERSION.contains(f)))
        .unwrap_or(name)
}

// ---- tests: promtool on the shipped files ----------------------------------

#[test]
fn promtool_check_config_accepts_prometheus_yml() {
    let out = run_promtool(&["check", "config", "config/prometheus.yml"], None);
    assert!(out.contains("SUCCESS"), "{out}");
    let text = std::fs::read_to_string(root().join("config/prometheus.yml")).unwrap();
    assert!(
        text.contains("job_name: tokitai-serve"),
        "scrape job is named tokitai-serve"
    );
    assert!(text.contains("127.0.0.1:9100"), "scrapes the engine's default address");
}

#[test]
fn promtool_check_rules_accepts_alerts_yml() {
    let out = run_promtool(&["check", "rules", "config/alerts.yml"], None);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn promtool_test_rules_passes_alerts_test_yml() {
    let out = run_promtool(&["test", "rules", "config/alerts.test.yml"], None);
    assert!(out.contains("SUCCESS"), "{out}");
    // One firing and one quiet case per rule.
    let rules = std::fs::read_to_string(root().join("config/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(root().join("config/alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 6, "alerts.yml has the required rules: {alerts:?}");
    for alert in alerts {
        let blocks: Vec<&str> = tests
            .split("alertname: ")
            .skip(1)
            .filter(|b| b.starts_with(alert))
            .collect();
        let firing = blocks.iter().filter(|b| b.contains("exp_labels")).count();
        let quiet = blocks
            .iter()
            .filter(|b| b.lines().nth(1).is_some_and(|l| l.contains("exp_alerts: []")))
            .count();
        assert!(
            firing >= 1 && quiet >= 1,
            "{alert}: {firing} firing and {quiet} quiet test cases"
        );
    }
}

#[test]
fn alerts_and_dashboard_use_only_series_a_two_model_engine_exports() {
    let names = exported_names();
    let rules = std::fs::read_to_string(root().join("config/alerts.yml")).unwrap();
    for (name, _) in metric_idents(&rules) {
        assert!(
            names.contains(&name),
            "alerts.yml uses {name}, which the engine does not export"
        );
    }
    for (title, ref_id, expr) in &panel_queries(&dashboard()) {
        for (name, _) in metric_idents(expr) {
            assert!(
                names.contains(&name),
                "{title} {ref_id}: {name} is not exported by the engine"
            );
        }
    }
}

#[test]
fn alert_rules_carry_severity_and_annotations_and_aggregate_per_model() {
    let rules = std::fs::read_to_string(root().join("config/alerts.yml")).unwrap();
    for block in rules.split("- alert: ").skip(1) {
        let alert = block.lines().next().unwrap();
        for needed in ["severity: ", "summary: ", "description: "] {
            assert!(block.contains(needed), "{alert} lacks {needed}");
        }
    }
    for needed in [
        "up{job=\"tokitai-serve\"} == 0",
        "tokitai_queue_capacity_rows",
        "tokitai_worker_restarts_total",
        "tokitai_expert_rows_total",
        "tokitai_request_duration_seconds_bucket",
        "status=~\"5..\"",
        "tokitai_model_load_failures_total",
    ] {
        assert!(rules.contains(needed), "alerts.yml has no rule on {needed}");
    }
    // Per-model series are summed per model, never over models.
    let queue = alert_expr("TokitaiServeQueueNearlyFull");
    assert_eq!(queue.matches("sum by (job, instance, model)").count(), 2, "{queue}");
    let router = alert_expr("TokitaiServeRouterCollapse");
    assert!(router.contains("sum by (instance, model, expert)"), "{router}");
    assert!(router.contains("on (instance, model) group_left"), "{router}");
}

// ---- tests: the dashboard's shape ------------------------------------------

#[test]
fn dashboard_has_current_schema_variables_and_described_panels() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().unwrap_or(0) >= 39,
        "schemaVersion 39 or later"
    );
    assert_eq!(d["uid"], "tokitai-serve");
    let vars = d["templating"]["list"].as_array().expect("template variables");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let instance = var("instance");
    assert_eq!(instance["type"], "query");
    assert_eq!(instance["datasource"]["uid"], "${datasource}");
    assert!(
        instance["query"]
            .to_string()
            .contains("label_values(tokitai_build_info, instance)"),
        "instance comes from label_values(tokitai_build_info, instance)"
    );
    // The model selector: every served model of the selected instances,
    // several at once or All.
    let model = var("model");
    assert_eq!(model["type"], "query");
    assert_eq!(model["datasource"]["uid"], "${datasource}");
    assert!(
        model["query"]
            .to_string()
            .contains("label_values(tokitai_model_info{instance=~\\\"$instance\\\"}, model)"),
        "model comes from label_values(tokitai_model_info{{instance=~\"$instance\"}}, model): {}",
        model["query"]
    );
    assert_eq!(
        (&model["multi"], &model["includeAll"], &model["allValue"]),
        (&json!(true), &json!(true), &json!(".+")),
        "model is multi-select with All"
    );

    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id in {title}"
        );
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{title} has a gridPos");
        if p["type"] == "row" {
            continue;
        }
        let desc = p["description"].as_str().unwrap_or("");
        assert!(desc.len() >= 40, "{title} needs a description saying what it answers");
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title} uses the datasource variable"
        );
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        for t in targets.unwrap_or_else(|| panic!("{title} has no queries")) {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{title} {} uses the datasource variable",
                t["refId"]
            );
        }
    }
}

/// Per-version series must be filtered on the model and grouped by model
/// (or by le/expert/worker inside it), never summed over models unless the
/// panel shows a distribution of the selected models together.
fn check_model_filter(title: &str, ref_id: &str, expr: &str, name: &str, selector: &str) {
    if !PER_VERSION.contains(&family(name)) {
        return;
    }
    assert!(
        selector.contains("model=~\"$model\""),
        "{title} {ref_id}: {name} is per model but not filtered on model=~\"$model\": {expr}"
    );
    let heatmap_or_total = expr.starts_with("sum by (le) (") || expr.starts_with("sum(increase(");
    assert!(
        heatmap_or_total || expr.contains("by (model") || expr.contains("by (instance, model"),
        "{title} {ref_id}: {name} is not kept apart per model: {expr}"
    );
}

#[test]
fn dashboard_queries_filter_by_instance_and_per_model_series_by_model() {
    let queries = panel_queries(&dashboard());
    let mut used = BTreeSet::new();
    for (title, ref_id, expr) in &queries {
        let idents = metric_idents(expr);
        assert!(!idents.is_empty(), "{title} {ref_id}: no engine metric in {expr}");
        for (name, end) in idents {
            let rest = &expr[end..];
            let selector = rest.strip_prefix('{').and_then(|r| r.split('}').next()).unwrap_or("");
            assert!(
                selector.contains("instance=~\"$instance\""),
                "{title} {ref_id}: {name} is not filtered on instance=~\"$instance\": {expr}"
            );
            check_model_filter(title, ref_id, expr, &name, selector);
            used.insert(
                name.trim_end_matches("_bucket")
                    .trim_end_matches("_sum")
                    .trim_end_matches("_count")
                    .to_string(),
            );
        }
    }
    for needed in PER_VERSION.iter().copied().chain([
        "tokitai_http_requests_total",
        "tokitai_grpc_requests_total",
        "tokitai_grpc_stream_messages_total",
        "tokitai_request_failures_total",
        "tokitai_request_duration_seconds",
        "tokitai_inflight_requests",
        "tokitai_model_info",
        "tokitai_model_version",
        "tokitai_model_loads_total",
        "tokitai_model_load_failures_total",
        "tokitai_model_load_seconds",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ]) {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
    let all = queries.iter().map(|q| q.2.as_str()).collect::<Vec<_>>().join("\n");
    for q in ["0.5", "0.95", "0.99"] {
        assert!(
            all.contains(&format!(
                "histogram_quantile({q}, sum by (le) (rate(tokitai_request_duration_seconds_bucket{{"
            )),
            "latency p{q} panel"
        );
    }
    // A panel for every route: the sidecar's /infer, the v2 inference
    // routes, gRPC by method and code, the gRPC stream, latency by route.
    for needed in [
        "route=\"/infer\"",
        "route=~\"/v2/models/.+/infer\"",
        "sum by (route, code) (rate(tokitai_grpc_requests_total{",
        "route=\"/inference.GRPCInferenceService/ModelInfer\"",
        "sum by (route, le) (rate(tokitai_request_duration_seconds_bucket{",
        "sum by (route, status) (rate(tokitai_http_requests_total{",
    ] {
        assert!(all.contains(needed), "no panel query has {needed}");
    }
}

#[test]
fn grafana_provisioning_points_at_prometheus_and_the_dashboards_folder() {
    let ds = std::fs::read_to_string(root().join("config/grafana/datasources/prometheus.yml")).unwrap();
    for needed in ["apiVersion: 1", "type: prometheus", "url: http", "isDefault: true"] {
        assert!(ds.contains(needed), "datasource provisioning lacks {needed}");
    }
    let dash = std::fs::read_to_string(root().join("config/grafana/dashboards/tokitai-serve.yml")).unwrap();
    for needed in ["apiVersion: 1", "providers:", "type: file", "path: "] {
        assert!(dash.contains(needed), "dashboard provisioning lacks {needed}");
    }
}

// ---- tests: live -------------------------------------------------------------

#[test]
fn promtool_check_metrics_accepts_a_live_two_model_scrape() {
    let models = start_engine();
    drive_load(&models);
    let body = agent()
        .get(&models.server.url("/metrics"))
        .call()
        .expect("/metrics answers")
        .into_string()
        .unwrap();
    for family in [
        "tokitai_http_requests_total",
        "tokitai_router_top1_weight_bucket",
        "process_cpu_seconds_total",
    ] {
        assert!(body.contains(family), "/metrics lacks {family}");
    }
    run_promtool(&["check", "metrics"], Some(body.as_bytes()));
}

/// The engine's own /metrics after the load: every per-version series of
/// each model reads what that model was sent (and only that), each model's
/// workers are its own, and the v2 statistics agree.
fn check_own_metrics(models: &TwoModels, load: &Load) {
    let m = models.server.metrics();
    for plan in &models.plans {
        let sent = &load.by_model[plan.name];
        for (name, want) in expected_per_version(plan, sent) {
            let got = of_version(&m, name, plan);
            assert_eq!(got, want, "{name} of {} v{} on /metrics", plan.name, plan.version);
        }
        let [(_, model), (_, version)] = plan.labels();
        let labels = [("model", model.as_str()), ("version", version.as_str())];
        let workers: Vec<String> = (0..plan.workers).map(|w| w.to_string()).collect();
        for name in [
            "tokitai_batches_total",
            "tokitai_worker_busy_seconds_total",
            "tokitai_worker_restarts_total",
        ] {
            let ids = m.label_values(name, "worker", &labels);
            assert_eq!(
                ids.into_iter().collect::<Vec<_>>(),
                workers,
                "{name}: {}'s workers",
                plan.name
            );
        }
        let experts = m.label_values("tokitai_expert_rows_total", "expert", &labels);
        assert_eq!(experts.len(), nano_dims().experts, "{}'s experts", plan.name);
        assert_eq!(
            m.label_values("tokitai_model_info", "model_version", &[("model", plan.name)]),
            BTreeSet::from([version.clone()]),
            "{}'s served version",
            plan.name
        );
        assert_eq!(
            m.sum("tokitai_model_version", &[("model", plan.name)]),
            plan.version as f64
        );
        assert_eq!(m.sum("tokitai_model_loads_total", &[("model", plan.name)]), 1.0);
        assert!(m.sum("tokitai_model_load_seconds", &[("model", plan.name)]) > 0.0);
        // The statistics extension: rows inferred and batches executed, per model.
        assert_eq!(
            models.v2_stats(plan.name),
            (sent.rows(), sent.batches(plan)),
            "GET /v2/models/{}/stats (inference_count, execution_count)",
            plan.name
        );
    }
    // No per-version series without its model and version.
    for name in PER_VERSION {
        for suffix in ["", "_count"] {
            let n = format!("{name}{suffix}");
            let all = m.sum(&n, &[]);
            let labelled: f64 = models.plans.iter().map(|p| of_version(&m, &n, p)).sum();
            // Summed in another order (busy seconds are fractions): equal
            // but for the last bits.
            assert!(
                (all - labelled).abs() <= 1e-9 * all.abs().max(1.0),
                "{n}: every sample carries a served model and version ({all} vs {labelled})"
            );
        }
    }
}

/// The same series through Prometheus, as the dashboard and alerts read them.
fn check_scraped(prom: &Prometheus, models: &TwoModels, load: &Load) {
    for plan in &models.plans {
        let sent = &load.by_model[plan.name];
        let sel = format!("model=\"{}\",version=\"{}\"", plan.name, plan.version);
        for (name, want) in expected_per_version(plan, sent) {
            let q = format!("sum({name}{{{sel}}})");
            assert_eq!(prom.scalar(&q), Some(want), "{q}");
        }
        let q = format!("count(tokitai_batches_total{{{sel}}})");
        assert_eq!(prom.scalar(&q), Some(plan.workers as f64), "{q}: its own workers");
    }
    for (route, count) in &load.by_route {
        let q = if route.starts_with("/inference.") {
            format!("sum(tokitai_grpc_requests_total{{route=\"{route}\",code=\"OK\"}})")
        } else {
            format!("sum(tokitai_http_requests_total{{route=\"{route}\",status=\"200\"}})")
        };
        assert_eq!(prom.scalar(&q), Some(*count as f64), "{q}");
    }
    let streamed = BETA_LOAD.iter().find(|(r, _)| *r == "stream").unwrap().1.len();
    let q = "sum(tokitai_grpc_stream_messages_total{code=\"OK\"})";
    assert_eq!(prom.scalar(q), Some(streamed as f64), "{q}");
    for (status, count) in &load.infer_by_status {
        let q = format!("sum(tokitai_http_requests_total{{route=\"/infer\",status=\"{status}\"}})");
        assert_eq!(prom.scalar(&q), Some(*count as f64), "{q}");
    }
    for (reason, status) in [("invalid", 400), ("too_large", 413), ("unsupported_media_type", 415)] {
        let q = format!("sum(tokitai_request_failures_total{{route=\"/infer\",reason=\"{reason}\"}})");
        assert_eq!(prom.scalar(&q), Some(load.infer_by_status[&status] as f64), "{q}");
    }
}

/// Every panel query, as Grafana sends it with All models selected, has
/// data; with one model selected, no series of a per-model query names
/// another model.
fn check_dashboard_queries(prom: &Prometheus, instance: &str, models: &TwoModels) {
    let queries = panel_queries(&dashboard());
    assert!(queries.len() >= 30, "the dashboard has its panels");
    let mut failures = Vec::new();
    for (title, ref_id, expr) in &queries {
        let promql = substitute(expr, instance, ".+");
        assert!(
            !promql.contains('$'),
            "{title} {ref_id}: unsubstituted variable in {promql}"
        );
        match prom.query(&promql) {
            Ok(result) if !result.is_empty() => {}
            Ok(_) => failures.push(format!("{title} [{ref_id}]: no series for {promql}")),
            Err(e) => failures.push(format!("{title} [{ref_id}]: {e} for {promql}")),
        }
        if !expr.contains("$model") {
            continue;
        }
        for plan in &models.plans {
            let promql = substitute(expr, instance, plan.name);
            let result = prom.query(&promql).unwrap_or_else(|e| panic!("{promql}: {e}"));
            let others: Vec<&Value> = result
                .iter()
                .filter(|s| s["metric"]["model"].as_str().is_some_and(|m| m != plan.name))
                .collect();
            if result.is_empty() || !others.is_empty() {
                failures.push(format!("{title} [{ref_id}] for model {}: {result:?}", plan.name));
            }
        }
    }
    assert!(failures.is_empty(), "dashboard queries:\n{}", failures.join("\n"));
}

/// Every alerting rule loaded and evaluates cleanly; the queue alert's
/// expression gives one quiet series per model, nothing over models.
fn check_rules(prom: &Prometheus, models: &TwoModels) {
    let alerts = std::fs::read_to_string(root().join("config/alerts.yml")).unwrap();
    let expected: BTreeSet<String> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::to_string)
        .collect();
    let rules = wait_for("every rule to be evaluated", SCRAPE_TIMEOUT, || {
        let data = prom.api("rules", &[]).ok()?;
        let rules: Vec<Value> = data["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules
            .iter()
            .all(|r| r["lastEvaluation"].as_str().is_some_and(|t| !t.starts_with("0001")));
        (evaluated && rules.len() == expected.len()).then_some(rules)
    });
    let names: BTreeSet<String> = rules
        .iter()
        .map(|r| r["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, expected, "the rules Prometheus loaded");
    for r in &rules {
        assert_eq!(
            r["health"],
            "ok",
            "rule {} does not evaluate: {}\n{}",
            r["name"],
            r["lastError"],
            prom.log()
        );
    }
    let expr = alert_expr("TokitaiServeQueueNearlyFull");
    let fill = expr.rsplit_once('>').expect("a threshold").0;
    // One series per model, each below the threshold (the load, one request
    // at a time per model, may have queued a request's rows at a scrape).
    let per_model: BTreeMap<String, f64> = series(prom, fill)
        .into_iter()
        .map(|(l, v)| (l.get("model").cloned().unwrap_or_default(), v))
        .collect();
    let names: Vec<&str> = per_model.keys().map(String::as_str).collect();
    let want: Vec<&str> = models.plans.iter().map(|p| p.name).collect();
    assert_eq!(names, want, "queue fill per model: {fill}");
    assert!(
        per_model.values().all(|v| (0.0..0.8).contains(v)),
        "queue fill per model: {per_model:?}"
    );
    let down = prom.query("ALERTS{alertname=\"TokitaiServeDown\"}").unwrap();
    assert!(down.is_empty(), "TokitaiServeDown is active: {down:?}");
}

#[test]
fn live_prometheus_scrapes_two_models_every_series_and_dashboard_query_matches_the_load() {
    let models = start_engine();
    let engine = &models.server;
    let prom = start_prometheus(engine.addr(), "1s");
    let instance = engine.addr().to_string();
    let up = format!("up{{job=\"tokitai-serve\",instance=\"{instance}\"}}");
    wait_for("the first successful scrape", SCRAPE_TIMEOUT, || {
        (prom.scalar(&up) == Some(1.0)).then_some(())
    });

    let load = drive_load(&models);
    check_own_metrics(&models, &load);

    // Prometheus has scraped the end of the load.
    let total: u64 = load.by_model.values().map(Sent::rows).sum();
    wait_for("Prometheus to scrape every computed row", SCRAPE_TIMEOUT, || {
        prom.scalar("sum(tokitai_rows_computed_total)")
            .filter(|v| *v >= total as f64)
    });
    wait_for("Prometheus to scrape every /infer request", SCRAPE_TIMEOUT, || {
        let want: u64 = load.infer_by_status.values().sum();
        prom.scalar("sum(tokitai_http_requests_total{route=\"/infer\"})")
            .filter(|v| *v >= want as f64)
    });
    check_scraped(&prom, &models, &load);
    // Series first seen during the load need a few samples inside the rate
    // window before rate() has two points to work with.
    for family in [
        "tokitai_http_requests_total",
        "tokitai_grpc_requests_total",
        "tokitai_grpc_stream_messages_total",
    ] {
        let samples = format!("min(count_over_time({family}[{RATE_INTERVAL}]))");
        wait_for("three scrapes of every series the load created", SCRAPE_TIMEOUT, || {
            prom.scalar(&samples).filter(|n| *n >= 3.0)
        });
    }
    // The variables' queries find this engine and both models.
    let instances = prom
        .api("label/instance/values", &[("match[]", "tokitai_build_info")])
        .unwrap();
    assert_eq!(
        instances,
        json!([instance]),
        "label_values(tokitai_build_info, instance)"
    );
    let selector = format!("tokitai_model_info{{instance=~\"{instance}\"}}");
    let names = prom.api("label/model/values", &[("match[]", &selector)]).unwrap();
    assert_eq!(
        names,
        json!([ALPHA.name, BETA.name]),
        "label_values(tokitai_model_info, model)"
    );

    check_dashboard_queries(&prom, &instance, &models);
    check_rules(&prom, &models);
}

/// A model whose batches wait (max_queue_delay_us) with 56 of its 64 queue
/// rows held, beside an idle model with a large queue: the queue alert's
/// expression, in a real Prometheus, names the busy model and only it.
#[test]
fn queue_alert_expression_names_only_the_busy_model_of_two() {
    let busy = ModelPlan {
        name: "busy",
        version: 2,
        workers: 1,
        max_batch_rows: 64,
        max_queue_rows: 64,
        max_queue_delay_us: 1_000_000,
        seed: 21,
    };
    let idle = ModelPlan {
        name: "idle",
        version: 1,
        workers: 1,
        max_batch_rows: 64,
        max_queue_rows: 4096,
        max_queue_delay_us: 0,
        seed: 22,
    };
    let models = TwoModels::start(&[busy, idle], |_| {});
    let prom = start_prometheus(models.server.addr(), "200ms");
    let expr = alert_expr("TokitaiServeQueueNearlyFull");
    let firing = std::sync::atomic::AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        // 56 rows, held up to 1 s each time (the batch is not full), again
        // and again until Prometheus has seen the queue at 87.5%.
        s.spawn(|| {
            let a = agent();
            let mut sent = 0;
            while !firing.load(std::sync::atomic::Ordering::Relaxed) && sent < 60 {
                assert_eq!(two_models::v2_infer(&a, &models.server, busy.name, 56, sent), 200);
                sent += 1;
            }
        });
        let result = wait_for("the queue alert's expression to hold", SCRAPE_TIMEOUT, || {
            let r = series(&prom, &expr);
            (!r.is_empty()).then_some(r)
        });
        firing.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    });
    assert_eq!(result.len(), 1, "one model's queue is full: {result:?}");
    let (labels, value) = &result[0];
    assert_eq!(labels.get("model").map(String::as_str), Some(busy.name), "{labels:?}");
    assert_eq!(labels.get("instance"), Some(&models.server.addr().to_string()));
    assert!(
        !labels.contains_key("version"),
        "summed over the model's versions: {labels:?}"
    );
    assert_eq!(*value, 56.0 / 64.0, "the busy model's peak fill");
    // Over both models' queues the same peak would read 56 / 4160: the
    // per-model sum is what keeps it visible.
    let pooled = "max_over_time(sum(tokitai_queue_depth_rows)[1m:200ms]) / sum(tokitai_queue_capacity_rows)";
    // Polled: a scrape that misses its 200 ms timeout on a loaded machine
    // marks the engine's series stale, and an instant query then finds no
    // capacity until the next scrape succeeds.
    let p = wait_for("the pooled fill over both models", SCRAPE_TIMEOUT, || {
        prom.scalar(pooled)
    });
    assert!(p < 0.8, "pooled over both models the queue looks {p}");
}
