//! Monitoring assets checked with the real tools: `promtool` on the
//! Prometheus config, the alerting rules and their unit tests, and on a live
//! `/metrics` scrape; a real `prometheus` scraping an in-process engine under
//! load, with every query of the Grafana dashboard evaluated against it.
//!
//! Needs Debian's `prometheus` package (`apt-get install prometheus`), which
//! provides both `prometheus` and `promtool`; `PROMETHEUS` and `PROMTOOL` may
//! name other binaries. Without them these tests fail, never skip.
//!
//! Owns: nothing but tests. Must not touch: the engine's behaviour.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Prometheus, SCRAPE_TIMEOUT, TestServer, agent, base_config, nano_dims, tool, wait_for};
use serde_json::{Value, json};
use tokitai_serve::labels::{DropReason, FailureReason, Route};
use tokitai_serve::metrics::Metrics;

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

// ---- the engine, in-process ------------------------------------------------

/// Limits the load below relies on.
const MAX_REQUEST_ROWS: usize = 8;

/// The engine on the demo model, serving on a loopback port in its own
/// thread; shut down (gracefully) and checked to have stopped cleanly on drop.
fn start_engine() -> TestServer {
    let mut config = base_config();
    config.server.http_workers = 2;
    config.server.shutdown_timeout_secs = 5;
    config.batching.max_request_rows = MAX_REQUEST_ROWS;
    config.batching.max_queue_rows = 4096;
    config.workers.count = 2;
    config.workers.threads_per_worker = 1;
    TestServer::start(config)
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

fn rows_body(n_rows: usize, row_len: usize, seed: usize) -> String {
    let rows: Vec<Vec<f32>> = (0..n_rows)
        .map(|r| {
            (0..row_len)
                .map(|i| (((seed * 31 + r * 7 + i) % 17) as f32 - 8.0) / 8.0)
                .collect()
        })
        .collect();
    json!({ "features": rows }).to_string()
}

/// What the load sent to /infer, by the status each request got.
#[derive(Default, Debug)]
struct Sent {
    by_status: BTreeMap<u16, u64>,
}

impl Sent {
    fn total(&self) -> u64 {
        self.by_status.values().sum()
    }
}

/// Valid requests from a few threads (so batches coalesce), then invalid
/// (400), too large (413) and wrong media type (415) ones; every answer's
/// status is checked.
fn drive_load(engine: &TestServer) -> Sent {
    const THREADS: usize = 4;
    // Features per row of the demo model.
    let width = nano_dims().input;
    const VALID_PER_THREAD: usize = 10;
    let mut sent = Sent::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || {
                    for i in 0..VALID_PER_THREAD {
                        let n_rows = 1 + (t + i) % 4;
                        let status = post_infer(engine, "application/json", &rows_body(n_rows, width, t * 100 + i));
                        assert_eq!(status, 200, "valid request ({n_rows} rows) got {status}");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("load thread");
        }
    });
    *sent.by_status.entry(200).or_default() += (THREADS * VALID_PER_THREAD) as u64;

    let cases: [(&str, String, u16); 8] = [
        ("application/json", "{not json".to_string(), 400),
        ("application/json", rows_body(1, width - 1, 1), 400),
        ("application/json", json!({ "features": "x" }).to_string(), 400),
        ("application/json", json!({ "rows": [] }).to_string(), 400),
        ("application/json", rows_body(MAX_REQUEST_ROWS + 1, width, 2), 413),
        ("application/json", rows_body(MAX_REQUEST_ROWS * 4, width, 3), 413),
        ("text/plain", rows_body(1, width, 4), 415),
        ("application/x-www-form-urlencoded", "features=1".to_string(), 415),
    ];
    for (content_type, body, expected) in &cases {
        let status = post_infer(engine, content_type, body);
        assert_eq!(status, *expected, "{content_type} {:.60}", body);
        *sent.by_status.entry(status).or_default() += 1;
    }
    sent
}

// ---- a real Prometheus -----------------------------------------------------

/// Prometheus scraping one engine every second with the shipped rules.
fn start_prometheus(target: SocketAddr) -> Prometheus {
    let rules = root().join("config/alerts.yml");
    Prometheus::start(|_| {
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: tokitai-serve\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: [\"{target}\"]\n"
        )
    })
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

/// A dashboard query as Grafana would send it for one instance.
fn substitute(expr: &str, instance: &str) -> String {
    expr.replace("${instance}", instance)
        .replace("$instance", instance)
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

/// Every series name the engine can expose, read from its own registry
/// (not its source text): every family, after one of each recording, with
/// histograms expanded to their `_bucket`/`_sum`/`_count` series, plus the
/// process collector's families.
fn exported_names() -> BTreeSet<String> {
    use prometheus::proto::MetricType;
    let metrics = Metrics::new();
    metrics.init_pool(1, 4, 100, 10);
    metrics.observe_request(Route::Infer, "200", Duration::from_micros(10));
    metrics.observe_failure(Route::Infer, FailureReason::Invalid);
    metrics.drop_counters().add(DropReason::Timeout, 1);
    metrics.observe_queue_wait(Duration::from_micros(10));
    metrics
        .model_info
        .with_label_values(&["m", "1", "Nano", "identity", "f32", "1", "x", "cpu", "cpu", "avx2"])
        .set(1);
    metrics.model_known("m");
    metrics.model_version.with_label_values(&["m"]).set(1);
    metrics.model_answers("m", 1).inc();
    metrics.device_memory_bytes.with_label_values(&["0"]).set(0.0);
    let worker = metrics.worker(0, 4);
    worker.observe_batch(1, 1, Duration::from_micros(10));
    worker.observe_routing(&[0, 1], &[0.6, 0.4, 0.0, 0.0], 4);
    let mut names = BTreeSet::new();
    let mut histograms = 0;
    for family in metrics.registry().gather() {
        let name = family.name().to_string();
        if family.get_field_type() == MetricType::HISTOGRAM {
            histograms += 1;
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        } else {
            names.insert(name);
        }
    }
    assert!(histograms >= 6, "the registry holds the engine's histograms");
    assert!(
        names.contains("process_cpu_seconds_total"),
        "the process collector is registered"
    );
    names
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
fn alert_rules_use_exported_metrics_and_carry_severity_and_annotations() {
    let names = exported_names();
    let rules = std::fs::read_to_string(root().join("config/alerts.yml")).unwrap();
    for (name, _) in metric_idents(&rules) {
        assert!(
            names.contains(&name),
            "alerts.yml uses {name}, which the engine does not export"
        );
    }
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

#[test]
fn dashboard_queries_use_only_exported_metrics_filtered_by_instance() {
    let names = exported_names();
    let queries = panel_queries(&dashboard());
    let mut used = BTreeSet::new();
    for (title, ref_id, expr) in &queries {
        let idents = metric_idents(expr);
        assert!(!idents.is_empty(), "{title} {ref_id}: no engine metric in {expr}");
        for (name, end) in idents {
            assert!(
                names.contains(&name),
                "{title} {ref_id}: {name} is not exported by the engine"
            );
            let rest = &expr[end..];
            let selector = rest.strip_prefix('{').and_then(|r| r.split('}').next());
            assert!(
                selector.is_some_and(|s| s.contains("instance=~\"$instance\"")),
                "{title} {ref_id}: {name} is not filtered on instance=~\"$instance\": {expr}"
            );
            used.insert(
                name.trim_end_matches("_bucket")
                    .trim_end_matches("_sum")
                    .trim_end_matches("_count")
                    .to_string(),
            );
        }
    }
    for needed in [
        "tokitai_http_requests_total",
        "tokitai_request_failures_total",
        "tokitai_request_duration_seconds",
        "tokitai_queue_wait_seconds",
        "tokitai_compute_seconds",
        "tokitai_batch_size_rows",
        "tokitai_batch_size_requests",
        "tokitai_queue_depth_rows",
        "tokitai_queue_capacity_rows",
        "tokitai_inflight_requests",
        "tokitai_worker_busy_seconds_total",
        "tokitai_worker_restarts_total",
        "tokitai_expert_rows_total",
        "tokitai_router_top1_weight",
        "tokitai_model_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
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
fn promtool_check_metrics_accepts_a_live_scrape() {
    let engine = start_engine();
    drive_load(&engine);
    let body = agent()
        .get(&engine.url("/metrics"))
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

#[test]
fn live_prometheus_scrapes_the_engine_and_every_dashboard_query_has_data() {
    let engine = start_engine();
    let prom = start_prometheus(engine.addr());
    let instance = engine.addr().to_string();
    let up = format!("up{{job=\"tokitai-serve\",instance=\"{instance}\"}}");
    wait_for("the first successful scrape", SCRAPE_TIMEOUT, || {
        (prom.scalar(&up) == Some(1.0)).then_some(())
    });

    let sent = drive_load(&engine);

    // The counter Prometheus scraped matches what was sent, status by status.
    let total = "sum(tokitai_http_requests_total{route=\"/infer\"})";
    let seen = wait_for("Prometheus to scrape every /infer request", SCRAPE_TIMEOUT, || {
        prom.scalar(total).filter(|v| *v >= sent.total() as f64)
    });
    assert_eq!(
        seen,
        sent.total() as f64,
        "Prometheus counted {seen} /infer requests, the test sent {}",
        sent.total()
    );
    for (status, count) in &sent.by_status {
        let q = format!("sum(tokitai_http_requests_total{{route=\"/infer\",status=\"{status}\"}})");
        assert_eq!(prom.scalar(&q), Some(*count as f64), "{q}");
    }
    for (reason, status) in [("invalid", 400), ("too_large", 413), ("unsupported_media_type", 415)] {
        let q = format!("sum(tokitai_request_failures_total{{route=\"/infer\",reason=\"{reason}\"}})");
        assert_eq!(prom.scalar(&q), Some(sent.by_status[&status] as f64), "{q}");
    }
    // Series first seen during the load need a few samples inside the rate
    // window before rate() has two points to work with.
    let samples = format!("min(count_over_time(tokitai_http_requests_total{{route=\"/infer\"}}[{RATE_INTERVAL}]))");
    wait_for("three scrapes of every /infer series", SCRAPE_TIMEOUT, || {
        prom.scalar(&samples).filter(|n| *n >= 3.0)
    });
    // The instance variable's query finds this engine.
    let instances = prom
        .api("label/instance/values", &[("match[]", "tokitai_build_info")])
        .unwrap();
    assert_eq!(
        instances,
        json!([instance]),
        "label_values(tokitai_build_info, instance)"
    );

    // Every panel query, as Grafana would send it, returns at least one series.
    let queries = panel_queries(&dashboard());
    assert!(queries.len() >= 20, "the dashboard has its panels");
    let mut failures = Vec::new();
    for (title, ref_id, expr) in &queries {
        let promql = substitute(expr, &instance);
        assert!(
            !promql.contains('$'),
            "{title} {ref_id}: unsubstituted variable in {promql}"
        );
        match prom.query(&promql) {
            Ok(result) if !result.is_empty() => {}
            Ok(_) => failures.push(format!("{title} [{ref_id}]: no series for {promql}")),
            Err(e) => failures.push(format!("{title} [{ref_id}]: {e} for {promql}")),
        }
    }
    assert!(
        failures.is_empty(),
        "dashboard queries without data:\n{}",
        failures.join("\n")
    );

    // Every alerting rule loaded and evaluates cleanly against real data.
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
    // The engine is up, so the down alert is quiet.
    let down = prom.query("ALERTS{alertname=\"TokitaiServeDown\"}").unwrap();
    assert!(down.is_empty(), "TokitaiServeDown is active: {down:?}");
}
