//! CI smoke run of the load generator's own code (benches/loadgen/): start the
//! engine on the demo model, a 1-second closed loop with 4 clients and a
//! 1-second open loop at a low rate, then check the accounting, the metrics
//! scrape and the JSON report. No timing assertions: this runs in debug on a
//! shared machine.

#[allow(dead_code)]
#[path = "../benches/loadgen/client.rs"]
mod client;
#[allow(dead_code)]
#[path = "../benches/loadgen/report.rs"]
mod report;
#[allow(dead_code)]
#[path = "../benches/loadgen/servers.rs"]
mod servers;
#[allow(dead_code)]
#[path = "../benches/loadgen/stats.rs"]
mod stats;

use std::sync::Arc;
use std::time::Duration;

use client::{Mix, Target, Workload};
use report::{Check, Report, ScenarioResult};
use stats::MetricsSnapshot;
use tokitai_serve::config::Config;

fn demo_config() -> Config {
    let mut c = Config::default();
    c.server.bind = "127.0.0.1:0".into();
    c.grpc.enabled = false;
    c.server.http_workers = 1;
    c.server.shutdown_timeout_secs = 5;
    c.workers.count = 1;
    c
}

fn assert_accounted(r: &stats::RunStats) {
    assert!(r.sent > 0, "nothing sent: {r:?}");
    assert_eq!(r.answered + r.rejected + r.other_status + r.lost, r.sent, "{r:?}");
    assert!(r.accounted());
    assert_eq!(r.lost, 0, "{r:?}");
    assert_eq!(r.other_status, 0, "{r:?}");
    assert_eq!(r.latency.count, r.answered);
}

#[test]
fn metrics_text_is_summed_over_labels() {
    let text = "# HELP a x\n# TYPE a counter\na_total{w=\"0\"} 3\na_total{w=\"1\",r=\"{}\\\" x\"} 4\nb_sum 1.5\nb_count 2 1700000000\nbad\n";
    let m = MetricsSnapshot::parse(text);
    assert_eq!(m.get("a_total"), 7.0);
    assert_eq!(m.get("b_sum"), 1.5);
    assert_eq!(m.get("b_count"), 2.0);
    assert_eq!(m.get("missing"), 0.0);
}

#[test]
fn workloads_are_valid_requests() {
    let dims = tokitai_serve::model::Dims::for_size(tokitai_serve::model::ModelSize::Nano);
    for mix in [Mix::Single, Mix::multi()] {
        let wl = Workload::new(mix, dims.input, 3);
        for b in &wl.bodies {
            let limits = tokitai_serve::input::InputLimits {
                row_len: dims.input,
                max_rows: 4096,
            };
            let f = tokitai_serve::sidecar_json::parse_infer_request(&b.bytes, &limits).expect("valid body");
            assert_eq!(f.input.n_rows(), b.rows);
        }
    }
}

#[test]
fn closed_and_open_loops_against_the_engine() {
    let config = demo_config();
    let engine = servers::start_engine(config.clone());
    let dims = tokitai_serve::model::Dims::for_size(tokitai_serve::model::ModelSize::Nano);
    let single = Arc::new(Workload::new(Mix::Single, dims.input, 8));
    let multi = Arc::new(Workload::new(Mix::multi(), dims.input, 2));
    let tgt = Target {
        base_url: engine.base_url.clone(),
        scrape_metrics: true,
        warmup: Duration::from_millis(200),
        duration: Duration::from_secs(1),
        client_timeout: Duration::from_secs(30),
    };
    let mut report = Report::new("smoke");

    let run = client::closed_loop(&tgt, Arc::clone(&single), 4);
    assert_accounted(&run.stats);
    assert_eq!(run.stats.rows_answered, run.stats.answered);
    let r = ScenarioResult::from_run("nano", "engine", "closed", "single", "c4", &run, 1);
    let split = r.server_split.expect("metrics scraped before and after");
    assert!(split.batches > 0, "{split:?}");
    assert!(split.avg_batch_rows >= 1.0, "{split:?}");
    assert!(split.rows_computed > 0, "{split:?}");
    report.push(r);

    let run = client::closed_loop(&tgt, Arc::clone(&multi), 2);
    assert_accounted(&run.stats);
    assert!(run.stats.rows_answered >= run.stats.answered);
    report.push(ScenarioResult::from_run(
        "nano", "engine", "closed", "multi", "c2", &run, 1,
    ));

    let run = client::open_loop(&tgt, Arc::clone(&single), 40.0, 4);
    assert_accounted(&run.stats);
    // 1.2 s of tickets at 40/s, the first 0.2 s not counted: 40 measured.
    assert!((38..=42).contains(&run.stats.sent), "{:?}", run.stats);
    assert!(run.stats.send_lateness.is_some());
    let mut r = ScenarioResult::from_run("nano", "engine", "open", "single", "40/s", &run, 1);
    r.rate_per_s = Some(40.0);
    assert!(r.server_split.expect("scraped").batches > 0);
    report.push(r);
    engine.stop();

    // The baselines run on the same backend.
    let backend = servers::baseline_backend(&config);
    let old = servers::start_old_design(&backend, 1, 1, 4096);
    let run = client::closed_loop(
        &Target {
            base_url: old.base_url.clone(),
            scrape_metrics: false,
            ..tgt.clone()
        },
        Arc::clone(&single),
        2,
    );
    assert_accounted(&run.stats);
    assert!(run.metrics_before.is_none());
    report.push(ScenarioResult::from_run(
        "nano",
        "old-design",
        "closed",
        "single",
        "c2",
        &run,
        1,
    ));
    old.stop();
    let floor = servers::start_floor(&backend, &[1], 1, 4096);
    let run = client::closed_loop(
        &Target {
            base_url: floor.base_url.clone(),
            scrape_metrics: false,
            ..tgt
        },
        Arc::clone(&single),
        2,
    );
    assert_accounted(&run.stats);
    floor.stop();
    let ceiling = servers::offline_ceiling(&backend, 1, 1, 4, Duration::from_millis(200));
    assert!(ceiling.batches > 0 && ceiling.rows_per_s > 0.0);

    report.check(Check::at_least("smoke ratio", 2.0, 1.0, "x".into()));
    report.check(Check::na("smoke n/a", "<= 1", "no data".into()));
    let json = report.to_json();
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    assert_eq!(v["scenarios"].as_array().map(Vec::len), Some(4));
    assert!(v["scenarios"][0]["server_split"]["batches"].as_u64().unwrap() > 0);
    assert!(v["checks"][1]["value"].is_null());
    let dir = tempfile::tempdir().unwrap();
    report
        .write(&dir.path().join("sub/loadgen.json"))
        .expect("write report");
}
