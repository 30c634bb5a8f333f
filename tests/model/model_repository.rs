//! The model repository under load: versions dropped into a polled
//! repository while 32 clients send a steady stream (zero non-200 answers,
//! every answer bit-equal to the offline forward of the version its
//! `x-model-version` names, failed versions listed `UNAVAILABLE` while the
//! previous one serves); explicit mode's load / unload API, SIGHUP, and an
//! unload under load; and memory after a swap.
//!
//! Model files are real: `write_model_dir` writes the training runner's
//! `arch.json` + `checkpoint.tkp1`. A version is written beside the
//! repository and renamed into place, as the README says to.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::process::rss_bytes;
use crate::common::*;
use serde_json::{Value, json};
use tokitai_serve::backend::cpu::{CpuBackend, CpuOptions};
use tokitai_serve::backend::{Backend, ForwardOutput, SessionConfig};
use tokitai_serve::config::ControlMode;
use tokitai_serve::model::{LayerNormMode, ModelSize, load_model, write_model_dir};

/// Rows the clients send, by index.
const ROWS: usize = 8;

fn rows() -> Vec<Vec<f64>> {
    let mut rng = Rng(0x5eed);
    (0..ROWS).map(|_| rng.row(96)).collect()
}

/// Writes a synthetic `size` model (weights from `seed`) as `repo/model/version`,
/// through a staging folder renamed into place. Returns the version folder.
fn stage(repo: &Path, model: &str, version: u64, size: ModelSize, seed: u64) -> PathBuf {
    let staging = repo.join(format!(".staging-{model}-{version}"));
    write_model_dir(&staging, size, seed, false).expect("write a synthetic model");
    publish(repo, model, version, &staging)
}

/// Renames a prepared folder into `repo/model/version`.
fn publish(repo: &Path, model: &str, version: u64, staging: &Path) -> PathBuf {
    let dest = repo.join(model).join(version.to_string());
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::rename(staging, &dest).expect("rename the version into place");
    dest
}

/// The offline forward's logits of every row, as bits, for the model in `dir`.
fn offline_bits(dir: &Path, rows: &[Vec<f64>]) -> Vec<Vec<u32>> {
    let model = load_model(&dir.join("arch.json"), &dir.join("checkpoint.tkp1")).expect("load offline");
    let backend = CpuBackend::with_options(model.weights, LayerNormMode::Identity, CpuOptions::default()).unwrap();
    let mut session = backend.create_session(SessionConfig { threads: 1 }).unwrap();
    rows.iter()
        .map(|row| {
            let x: Vec<f32> = row.iter().map(|&v| v as f32).collect();
            let mut out = ForwardOutput::default();
            session.forward(&x, &mut out).unwrap();
            out.logits.iter().map(|v| v.to_bits()).collect()
        })
        .collect()
}

/// The logits of a `/infer` (or v2) answer as bits.
fn answer_bits(v: &Value) -> Vec<u32> {
    let logits = if v["logits"].is_array() {
        v["logits"].clone()
    } else {
        v["outputs"][0]["data"].clone()
    };
    let flat: Vec<f64> = match &logits {
        Value::Array(a) if a.first().is_some_and(Value::is_array) => {
            a[0].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
        }
        Value::Array(a) => a.iter().map(|x| x.as_f64().unwrap()).collect(),
        other => panic!("no logits in {other}"),
    };
    flat.iter().map(|&x| (x as f32).to_bits()).collect()
}

fn index(agent: &ureq::Agent, base: &str, ready_only: bool) -> Vec<Value> {
    let r = post(
        agent,
        &format!("{base}/v2/repository/index"),
        &json!({ "ready": ready_only }).to_string(),
        &[],
    );
    assert_eq!(r.status, 200, "index: {}", r.text());
    r.json().as_array().cloned().expect("the index is an array")
}

fn entry(rows: &[Value], name: &str, version: u64) -> Option<Value> {
    rows.iter()
        .find(|e| e["name"] == name && e["version"].as_str() == Some(version.to_string().as_str()))
        .cloned()
}

/// Polls `f` every 20 ms until it returns `Some`, at most `limit`.
fn wait_until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the clients saw, checked as they go.
#[derive(Default)]
struct Seen {
    problems: Mutex<Vec<String>>,
    /// version -> answers
    by_version: Mutex<BTreeMap<u64, usize>>,
    /// When each version was first seen.
    first: Mutex<BTreeMap<u64, Instant>>,
    answered: AtomicUsize,
}

impl Seen {
    fn problem(&self, p: String) {
        let mut list = self.problems.lock().unwrap();
        if list.len() < 20 {
            list.push(p);
        }
    }
}

/// Each version's offline answers to the test rows, as bits.
type ExpectedBits = BTreeMap<u64, Vec<Vec<u32>>>;

/// Version 1 of model `quality` published in `repo`, versions 2 and 3
/// staged beside it (not yet published); each version's offline answers to
/// `rows`, as bits.
fn stage_quality_versions(repo: &Path, rows: &[Vec<f64>]) -> (ExpectedBits, Vec<(u64, PathBuf)>) {
    let mut expected = ExpectedBits::new();
    let v1 = stage(repo, "quality", 1, ModelSize::Nano, 11);
    expected.insert(1, offline_bits(&v1, rows));
    // Versions 2 and 3, written now (outside the repository) so the clients
    // can check their answers the moment they appear.
    let staged: Vec<(u64, PathBuf)> = [(2u64, 22u64), (3, 33)]
        .iter()
        .map(|&(v, seed)| {
            let dir = repo.join(format!(".staging-quality-{v}"));
            write_model_dir(&dir, ModelSize::Nano, seed, false).unwrap();
            expected.insert(v, offline_bits(&dir, rows));
            (v, dir)
        })
        .collect();
    assert_ne!(expected[&1], expected[&2], "versions differ");
    (expected, staged)
}

/// A server polling `repo` every `poll`, one worker.
fn polled_server(repo: &Path, poll: Duration) -> TestServer {
    let mut config = base_config();
    config.model.repository = Some(repo.to_path_buf());
    config.model.control_mode = ControlMode::Poll;
    config.model.repository_poll_secs = poll.as_secs_f64();
    config.workers.count = 1;
    TestServer::start(config)
}

/// Load / unload are for explicit mode: refused here; the repository
/// extension is announced.
fn assert_poll_mode_refuses_unload(control: &ureq::Agent, server: &TestServer) {
    let r = post(control, &server.url("/v2/repository/models/quality/unload"), "", &[]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("not allowed"), "{}", r.text());
    let extensions = get(control, &server.url("/v2")).json()["extensions"].clone();
    assert!(
        extensions.as_array().unwrap().contains(&json!("model_repository")),
        "{extensions}"
    );
}

/// Client `c` of the swap test: posts the rows in turn to `{base}/infer`
/// until `stop`, checking each answer against its version's `expected`
/// bits and counting it in `seen`.
fn swap_client(c: usize, stop: &AtomicBool, seen: &Seen, bodies: &[String], expected: &ExpectedBits, base: &str) {
    let agent = agent();
    let mut i = c;
    while !stop.load(Ordering::Relaxed) {
        i = (i + 1) % ROWS;
        let r = match try_post(&agent, &format!("{base}/infer"), &bodies[i], &[]) {
            Ok(r) => r,
            Err(e) => {
                seen.problem(format!("client {c}: transport error {e}"));
                continue;
            }
        };
        if r.status != 200 {
            seen.problem(format!("client {c}: status {} {}", r.status, r.text()));
            continue;
        }
        let version: u64 = r.header("x-model-version").and_then(|v| v.parse().ok()).unwrap_or(0);
        if r.header("x-model-name") != Some("quality") {
            seen.problem(format!("client {c}: x-model-name {:?}", r.header("x-model-name")));
        }
        match expected.get(&version) {
            Some(want) if want[i] == answer_bits(&r.json()) => {}
            Some(_) => seen.problem(format!("client {c}: row {i} differs from version {version}'s forward")),
            None => seen.problem(format!("client {c}: answer from version {version}")),
        }
        *seen.by_version.lock().unwrap().entry(version).or_default() += 1;
        seen.first.lock().unwrap().entry(version).or_insert_with(Instant::now);
        seen.answered.fetch_add(1, Ordering::Relaxed);
    }
}

/// Publishes each staged version in turn: each serves within two poll
/// intervals of appearing, plus its own load time (which the server
/// reports), and is then answered from a while.
fn publish_and_time_good_versions(
    repo: &Path,
    staged: &[(u64, PathBuf)],
    server: &TestServer,
    seen: &Seen,
    poll: Duration,
) {
    let answered = || seen.answered.load(Ordering::Relaxed);
    for (version, dir) in staged {
        let dropped = Instant::now();
        publish(repo, "quality", *version, dir);
        let first = wait_until(
            &format!("an answer from version {version}"),
            Duration::from_secs(60),
            || seen.first.lock().unwrap().get(version).copied(),
        );
        let load = server.metrics().sum("tokitai_model_load_seconds", &[]);
        let switch = first.duration_since(dropped);
        eprintln!("version {version}: first answer {switch:?} after it appeared (load {load:.3} s)");
        assert!(
            switch <= 2 * poll + Duration::from_secs_f64(load) + Duration::from_secs(2),
            "version {version} took {switch:?} to serve (poll {poll:?}, load {load:.3} s)"
        );
        let at = answered();
        wait_until("more answers", Duration::from_secs(60), || {
            (answered() > at + 100).then_some(())
        });
    }
}

/// Publishes a corrupt checkpoint (version 4), then an arch that does not
/// match its checkpoint (version 5): both fail, version 3 keeps serving
/// and neither is retried.
fn publish_broken_versions(repo: &Path, control: &ureq::Agent, base: &str, seen: &Seen, poll: Duration) {
    let answered = || seen.answered.load(Ordering::Relaxed);
    let bad = repo.join(".staging-quality-4");
    write_model_dir(&bad, ModelSize::Nano, 44, false).unwrap();
    let ckpt = bad.join("checkpoint.tkp1");
    let len = std::fs::metadata(&ckpt).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ckpt)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    publish(repo, "quality", 4, &bad);
    let mismatch = repo.join(".staging-quality-5");
    write_model_dir(&mismatch, ModelSize::Nano, 55, false).unwrap();
    let tiny_arch = tokitai_serve::model::Arch::for_size(ModelSize::Tiny, 55).to_json_pretty();
    std::fs::write(mismatch.join("arch.json"), tiny_arch).unwrap();
    for (version, dir) in [(4u64, None), (5, Some(&mismatch))] {
        if let Some(dir) = dir {
            publish(repo, "quality", version, dir);
        }
        let failed = wait_until(&format!("version {version} to fail"), Duration::from_secs(60), || {
            entry(&index(control, base, false), "quality", version).filter(|e| e["state"] == "UNAVAILABLE")
        });
        assert!(!failed["reason"].as_str().unwrap().is_empty(), "{failed}");
        eprintln!("version {version}: {failed}");
        // Two more poll intervals of traffic: still version 3, not retried.
        let at = answered();
        std::thread::sleep(2 * poll);
        wait_until("more answers", Duration::from_secs(60), || {
            (answered() > at + 100).then_some(())
        });
    }
}

/// After the swaps: the index says version 3 serves, 1 and 2 were
/// unloaded, 4 and 5 failed; the metrics and health agree.
fn assert_repository_after_swaps(control: &ureq::Agent, server: &TestServer) {
    let base = server.url("");
    let all = index(control, &base, false);
    let ready = index(control, &base, true);
    assert_eq!(ready.len(), 1, "{ready:?}");
    assert_eq!(
        (ready[0]["name"].clone(), ready[0]["version"].clone()),
        (json!("quality"), json!("3"))
    );
    for v in [1, 2] {
        let e = entry(&all, "quality", v).unwrap_or_else(|| panic!("version {v} in {all:?}"));
        assert_eq!(
            (e["state"].clone(), e["reason"].clone()),
            (json!("UNAVAILABLE"), json!("unloaded"))
        );
    }
    let corrupt = entry(&all, "quality", 4).unwrap();
    let arch = entry(&all, "quality", 5).unwrap();
    assert!(corrupt["reason"].as_str().unwrap().contains("checkpoint"), "{corrupt}");
    assert_eq!(arch["state"], "UNAVAILABLE", "{arch}");
    let m = server.metrics();
    assert_eq!(m.sum("tokitai_model_load_failures_total", &[("model", "quality")]), 2.0);
    assert_eq!(m.sum("tokitai_model_version", &[("model", "quality")]), 3.0);
    assert_eq!(m.sum("tokitai_model_loads_total", &[("model", "quality")]), 3.0);
    let health = get(control, &server.url("/healthz")).json();
    assert_eq!(health["models"][0]["model_version"], 3, "{health}");
    assert_eq!(health["default_model"], "quality", "{health}");
    // The retired versions' series go once their last requests are
    // answered; the served one's stay.
    let url = server.url("/metrics");
    wait_metrics_at(&url, "versions 1 and 2's series removed", |m| {
        [1, 2]
            .iter()
            .all(|&v| version_series(&m.text, "quality", Some(v)).is_empty())
    });
    let served = version_series(&metrics_at(&url).text, "quality", Some(3));
    for family in [
        "tokitai_queue_capacity_rows",
        "tokitai_workers",
        "tokitai_batches_total",
        "tokitai_model_info",
    ] {
        assert!(
            served.iter().any(|s| s.starts_with(family)),
            "{family} of version 3 in {served:#?}"
        );
    }
}

/// The samples on `/metrics` (`text`) of `model` (of one `version`, when
/// given), leaving out its per-model load series, which outlive versions.
fn version_series(text: &str, model: &str, version: Option<u64>) -> Vec<String> {
    const PER_MODEL: [&str; 3] = [
        "tokitai_model_loads_total",
        "tokitai_model_load_failures_total",
        "tokitai_model_load_seconds",
    ];
    let model = format!("model=\"{model}\"");
    // `model_version="N"` (tokitai_model_info) contains `version="N"` too.
    let version = version.map(|v| format!("version=\"{v}\""));
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(&model))
        .filter(|l| !PER_MODEL.iter().any(|p| l.starts_with(p)))
        .filter(|l| version.as_ref().is_none_or(|v| l.contains(v)))
        .map(str::to_string)
        .collect()
}

/// A version that does not serve is Triton's "not ready" on the versioned
/// route, an unknown one (or model) is 404, and version 3 answers as the
/// offline forward did (`want`: its bits for `row`).
fn assert_versioned_routes(control: &ureq::Agent, server: &TestServer, row: &[f64], want: &[u32]) {
    // A version that does not serve: Triton's "not ready" on the versioned
    // route; an unknown one is 404.
    let body = json!({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 96], "data": row}]}).to_string();
    let r = post(control, &server.url("/v2/models/quality/versions/2/infer"), &body, &[]);
    assert_eq!(r.status, 503, "{}", r.text());
    let r = post(control, &server.url("/v2/models/quality/versions/9/infer"), &body, &[]);
    assert_eq!(r.status, 404, "{}", r.text());
    let r = post(control, &server.url("/v2/models/other/infer"), &body, &[]);
    assert_eq!(r.status, 404, "{}", r.text());
    let r = post(control, &server.url("/v2/models/quality/versions/3/infer"), &body, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        (r.json()["model_name"].clone(), r.json()["model_version"].clone()),
        (json!("quality"), json!("3"))
    );
    assert_eq!(answer_bits(&r.json()), want);
}

#[test]
fn polled_repository_swaps_versions_under_32_clients_without_a_lost_or_wrong_answer() {
    let poll = Duration::from_millis(200);
    let repo = tempfile::tempdir().unwrap();
    let rows = rows();
    let (expected, staged) = stage_quality_versions(repo.path(), &rows);
    let server = polled_server(repo.path(), poll);
    let base = server.url("");
    let control = agent();
    assert_poll_mode_refuses_unload(&control, &server);

    let stop = AtomicBool::new(false);
    let seen = Seen::default();
    let bodies: Vec<String> = rows.iter().map(|r| single_body(r)).collect();
    std::thread::scope(|s| {
        for c in 0..32 {
            let (stop, seen, bodies, expected, base) = (&stop, &seen, &bodies, &expected, &base);
            s.spawn(move || swap_client(c, stop, seen, bodies, expected, base));
        }
        wait_until("answers from version 1", Duration::from_secs(60), || {
            (seen.answered.load(Ordering::Relaxed) > 200).then_some(())
        });
        publish_and_time_good_versions(repo.path(), &staged, &server, &seen, poll);
        publish_broken_versions(repo.path(), &control, &base, &seen, poll);
        stop.store(true, Ordering::Relaxed);
    });

    let problems = seen.problems.lock().unwrap();
    assert!(problems.is_empty(), "{} problems, first: {problems:#?}", problems.len());
    let by_version = seen.by_version.lock().unwrap().clone();
    eprintln!("answers by version: {by_version:?}");
    assert_eq!(
        by_version.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3],
        "{by_version:?}"
    );
    assert_repository_after_swaps(&control, &server);
    assert_versioned_routes(&control, &server, &rows[0], &expected[&3][0]);
    server.shutdown();
}

/// The binary in explicit mode, with two models.
fn explicit_server(repo: &Path) -> ProcessServer {
    ProcessServer::start(
        &[
            "--model-repository",
            repo.to_str().unwrap(),
            "--model-control-mode",
            "explicit",
            "--workers",
            "1",
        ],
        &[("TOKITAI_SERVER_SHUTDOWN_TIMEOUT_SECS", "10")],
    )
}

fn v2_body(rows: &[Vec<f64>]) -> String {
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    json!({"inputs": [{"name": "features", "datatype": "FP32", "shape": [rows.len(), 96], "data": flat}]}).to_string()
}

/// What the clients of beta saw while it was unloaded under them.
#[derive(Default)]
struct UnloadUnderLoad {
    stop: AtomicBool,
    /// Set once the unload request returned.
    unloaded: AtomicBool,
    ok: AtomicUsize,
    refused: AtomicUsize,
    /// Refusals of requests sent after the unload returned.
    after: AtomicUsize,
    problems: Mutex<Vec<String>>,
}

/// Client `c`: posts `body` to beta until told to stop; an answer must be
/// beta's (`beta_bits`) and come before the unload returned, a refusal must
/// be the documented 503.
fn beta_client(c: usize, u: &UnloadUnderLoad, server: &ProcessServer, body: &str, beta_bits: &[Vec<u32>]) {
    let agent = agent();
    while !u.stop.load(Ordering::Relaxed) {
        let was_unloaded = u.unloaded.load(Ordering::Acquire);
        match try_post(&agent, &server.url("/v2/models/beta/infer"), body, &[]) {
            Ok(r) if r.status == 200 => {
                if answer_bits(&r.json())[..20] != beta_bits[0][..] {
                    u.problems.lock().unwrap().push(format!("client {c}: wrong answer"));
                }
                if was_unloaded {
                    u.problems
                        .lock()
                        .unwrap()
                        .push(format!("client {c}: 200 after the unload returned"));
                }
                u.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) if r.status == 503 && r.text().contains("model 'beta' is not ready") => {
                u.refused.fetch_add(1, Ordering::Relaxed);
                if was_unloaded {
                    u.after.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(r) => u
                .problems
                .lock()
                .unwrap()
                .push(format!("client {c}: {} {}", r.status, r.text())),
            Err(e) => u.problems.lock().unwrap().push(format!("client {c}: {e}")),
        }
    }
}

/// Waits for the explicit-mode server; both models are ready and `/infer`
/// has no default model (neither is `model.name`).
fn wait_two_models_ready(a: &ureq::Agent, server: &ProcessServer, first_row: &[f64]) {
    wait_until("ready", Duration::from_secs(60), || {
        (get(a, &server.url("/readyz")).status == 200).then_some(())
    });
    let ready: BTreeSet<String> = index(a, &server.url(""), true)
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ready, BTreeSet::from(["alpha".to_string(), "beta".to_string()]));
    let r = post(a, &server.url("/infer"), &single_body(first_row), &[]);
    r.assert_error(404, "not_found", "/infer without a default model");
}

/// Beta's row of the repository index.
fn beta_row(a: &ureq::Agent, server: &ProcessServer) -> Value {
    let rows = index(a, &server.url(""), false);
    rows.iter().find(|e| e["name"] == "beta").cloned().unwrap()
}

/// Unloads beta while 4 clients keep it busy with 32-row requests: what it
/// accepted is answered (bit-exact), later requests get the documented 503;
/// then the index says unloaded and the ready route answers as Triton's.
fn unload_beta_under_load(a: &ureq::Agent, server: &ProcessServer, rows: &[Vec<f64>], beta_bits: &[Vec<u32>]) {
    let u = UnloadUnderLoad::default();
    let body = v2_body(&rows.iter().cycle().take(32).cloned().collect::<Vec<_>>());
    std::thread::scope(|s| {
        for c in 0..4 {
            let (u, body) = (&u, &body);
            s.spawn(move || beta_client(c, u, server, body, beta_bits));
        }
        wait_until("answers from beta", Duration::from_secs(60), || {
            (u.ok.load(Ordering::Relaxed) >= 8).then_some(())
        });
        let r = post(a, &server.url("/v2/repository/models/beta/unload"), "{}", &[]);
        assert_eq!(r.status, 200, "unload: {}", r.text());
        u.unloaded.store(true, Ordering::Release);
        wait_until("refusals after the unload", Duration::from_secs(60), || {
            (u.after.load(Ordering::Relaxed) >= 8).then_some(())
        });
        u.stop.store(true, Ordering::Relaxed);
    });
    let (ok, refused) = (u.ok.load(Ordering::Relaxed), u.refused.load(Ordering::Relaxed));
    let problems = u.problems.into_inner().unwrap();
    assert!(problems.is_empty(), "{problems:#?}");
    eprintln!("beta under load: {ok} answered, {refused} refused after the unload");
    let e = beta_row(a, server);
    assert_eq!(
        (e["state"].clone(), e["reason"].clone()),
        (json!("UNAVAILABLE"), json!("unloaded")),
        "{e}"
    );
    let r = post(a, &server.url("/v2/models/beta/ready"), "", &[]);
    assert_eq!(r.status, 405);
    assert_eq!(get(a, &server.url("/v2/models/beta/ready")).status, 400);
    // Every series of beta's version goes, `tokitai_model_version` too; its
    // per-model load counters stay.
    let url = server.url("/metrics");
    let m = wait_metrics_at(&url, "beta's version series removed", |m| {
        version_series(&m.text, "beta", None).is_empty()
    });
    assert_eq!(m.sum("tokitai_model_loads_total", &[("model", "beta")]), 1.0);
}

/// SIGHUP re-reads the loaded models: alpha's version 2 loads, beta
/// (unloaded) stays unloaded.
fn sighup_loads_alpha_2_and_not_beta(a: &ureq::Agent, server: &ProcessServer, repo: &Path, rows: &[Vec<f64>]) {
    let alpha2 = stage(repo, "alpha", 2, ModelSize::Nano, 3);
    let alpha2_bits = offline_bits(&alpha2, rows);
    server.signal("HUP");
    let r = wait_until("alpha version 2 after SIGHUP", Duration::from_secs(60), || {
        let r = post(a, &server.url("/v2/models/alpha/infer"), &v2_body(&rows[..1]), &[]);
        (r.status == 200 && r.header("x-model-version") == Some("2")).then_some(r)
    });
    assert_eq!(answer_bits(&r.json()), alpha2_bits[0]);
    assert_eq!(beta_row(a, server)["state"], "UNAVAILABLE");
}

/// Beta loads again through the API (bit-equal to its offline forward);
/// loading or unloading an unknown model is 404, each naming its action.
fn load_beta_again_and_refuse_unknown_models(
    a: &ureq::Agent,
    server: &ProcessServer,
    rows: &[Vec<f64>],
    beta_bits: &[Vec<u32>],
) {
    let r = post(a, &server.url("/v2/repository/models/beta/load"), "", &[]);
    assert_eq!(r.status, 200, "load: {}", r.text());
    let r = post(a, &server.url("/v2/models/beta/infer"), &v2_body(&rows[..1]), &[]);
    assert_eq!(
        (r.status, r.header("x-model-version")),
        (200, Some("1")),
        "{}",
        r.text()
    );
    assert_eq!(answer_bits(&r.json()), beta_bits[0]);
    let r = post(a, &server.url("/v2/repository/models/nope/load"), "", &[]);
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("failed to load 'nope'"), "{}", r.text());
    // The unload route's errors speak of unloading (issue 21, item 6).
    let r = post(a, &server.url("/v2/repository/models/nope/unload"), "", &[]);
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("failed to unload 'nope'"), "{}", r.text());
    assert!(!r.text().contains("failed to load"), "{}", r.text());
}

/// A load whose files are bad fails with the reason, and what served
/// serves: alpha 2 and beta 1.
fn bad_load_keeps_what_served(a: &ureq::Agent, server: &ProcessServer, repo: &Path, rows: &[Vec<f64>]) {
    let bad = repo.join(".staging-alpha-3");
    write_model_dir(&bad, ModelSize::Nano, 4, false).unwrap();
    std::fs::write(bad.join("checkpoint.tkp1"), b"TKP1 but not really").unwrap();
    publish(repo, "alpha", 3, &bad);
    let r = post(a, &server.url("/v2/repository/models/alpha/load"), "", &[]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("load failed for model 'alpha'"), "{}", r.text());
    let r = post(a, &server.url("/v2/models/alpha/infer"), &v2_body(&rows[..1]), &[]);
    assert_eq!((r.status, r.header("x-model-version")), (200, Some("2")));
    let health = get(a, &server.url("/healthz")).json();
    let loaded: Vec<(String, u64)> = health["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["model_version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        loaded,
        vec![("alpha".to_string(), 2), ("beta".to_string(), 1)],
        "{health}"
    );
}

#[test]
fn explicit_mode_loads_and_unloads_through_the_api_and_sighup_and_drains_an_unload_under_load() {
    let repo = tempfile::tempdir().unwrap();
    let rows = rows();
    stage(repo.path(), "alpha", 1, ModelSize::Nano, 1);
    let beta = stage(repo.path(), "beta", 1, ModelSize::Nano, 2);
    let beta_bits = offline_bits(&beta, &rows);
    let server = explicit_server(repo.path());
    let a = agent();
    wait_two_models_ready(&a, &server, &rows[0]);
    unload_beta_under_load(&a, &server, &rows, &beta_bits);
    sighup_loads_alpha_2_and_not_beta(&a, &server, repo.path(), &rows);
    load_beta_again_and_refuse_unknown_models(&a, &server, &rows, &beta_bits);
    bad_load_keeps_what_served(&a, &server, repo.path(), &rows);
}

#[test]
fn after_a_swap_and_drain_memory_returns_to_about_one_model() {
    let repo = tempfile::tempdir().unwrap();
    let v1 = stage(repo.path(), "big", 1, ModelSize::Tiny, 1);
    let model_bytes = std::fs::metadata(v1.join("checkpoint.tkp1")).unwrap().len();
    let server = ProcessServer::start(
        &[
            "--model-repository",
            repo.path().to_str().unwrap(),
            "--model-control-mode",
            "poll",
            "--repository-poll-secs",
            "0.2",
            "--workers",
            "1",
            "--threads-per-worker",
            "1",
        ],
        &[],
    );
    let a = agent();
    wait_until("ready", Duration::from_secs(120), || {
        (get(&a, &server.url("/readyz")).status == 200).then_some(())
    });
    let body = single_body(&rows()[0]);
    let answer = |a: &ureq::Agent| post(a, &server.url("/infer"), &body, &[]);
    assert_eq!(answer(&a).status, 200);
    let before = rss_bytes(server.pid());
    stage(repo.path(), "big", 2, ModelSize::Tiny, 2);
    let mut peak = before;
    wait_until("version 2 serving", Duration::from_secs(120), || {
        peak = peak.max(rss_bytes(server.pid()));
        let r = answer(&a);
        (r.header("x-model-version") == Some("2")).then_some(())
    });
    // Version 1's memory is given back once its last batch is done (bounded wait).
    let after = wait_until("version 1's memory to be freed", Duration::from_secs(60), || {
        let now = rss_bytes(server.pid());
        (now < before + model_bytes / 2).then_some(now)
    });
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "model {:.0} MiB: RSS before {:.0} MiB, peak during {:.0} MiB, after {:.0} MiB",
        mib(model_bytes),
        mib(before),
        mib(peak),
        mib(after)
    );
    assert!(before > model_bytes, "one model is resident: {before} vs {model_bytes}");
    assert_eq!(answer(&a).header("x-model-version"), Some("2"));
}

#[test]
fn sighup_re_reads_the_arch_and_checkpoint_files_and_unchanged_files_are_a_no_op() {
    use tokitai_serve::model::{synth_weights, write_checkpoint};
    let dir = tempfile::tempdir().unwrap();
    let (arch, _, ckpt) = write_model_dir(dir.path(), ModelSize::Nano, 1, false).unwrap();
    let rows = rows();
    let server = ProcessServer::start(
        &[
            "--arch",
            dir.path().join("arch.json").to_str().unwrap(),
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--workers",
            "1",
        ],
        &[],
    );
    let a = agent();
    let infer = || post(&a, &server.url("/infer"), &single_body(&rows[0]), &[]);
    let r = infer();
    // One model (`model.name`), one version: the checkpoint's step.
    assert_eq!(
        (r.header("x-model-name"), r.header("x-model-version")),
        (Some("tokitai-moe"), Some("1000"))
    );
    let loads = || Metrics::parse(&get(&a, &server.url("/metrics")).text()).sum("tokitai_model_loads_total", &[]);
    assert_eq!(loads(), 1.0);
    // Unchanged files: SIGHUP loads nothing.
    server.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(loads(), 1.0);
    // A new checkpoint (another step) renamed over the old one: SIGHUP serves it.
    let next = dir.path().join("next.tkp1");
    write_checkpoint(&next, &synth_weights(arch.dims(), 2), 2000, "{}", false).unwrap();
    std::fs::rename(&next, &ckpt).unwrap();
    let want = offline_bits(dir.path(), &rows);
    server.signal("HUP");
    let r = wait_until("the new checkpoint after SIGHUP", Duration::from_secs(60), || {
        let r = infer();
        (r.header("x-model-version") == Some("2000")).then_some(r)
    });
    assert_eq!(answer_bits(&r.json()), want[0]);
    assert_eq!(loads(), 2.0);
}

/// A gRPC client of the engine under test.
type GrpcClient =
    tokitai_serve::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient<tonic::transport::Channel>;

/// A `ModelInfer` request for `alpha`: one row, as raw FP32.
fn alpha_request(row: &[f64]) -> tokitai_serve::grpc::pb::ModelInferRequest {
    use tokitai_serve::grpc::pb::ModelInferRequest;
    use tokitai_serve::grpc::pb::model_infer_request::InferInputTensor;
    ModelInferRequest {
        model_name: "alpha".into(),
        inputs: vec![InferInputTensor {
            name: "features".into(),
            datatype: "FP32".into(),
            shape: vec![1, 96],
            ..Default::default()
        }],
        raw_input_contents: vec![
            row.iter()
                .flat_map(|&v| (v as f32).to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        ],
        ..Default::default()
    }
}

/// The repository index over gRPC (only the ready models if `ready`): each
/// model's name, version and state.
async fn grpc_index(c: &mut GrpcClient, ready: bool) -> Vec<(String, String, String)> {
    let req = tokitai_serve::grpc::pb::RepositoryIndexRequest {
        ready,
        ..Default::default()
    };
    let index = c.repository_index(req).await.unwrap().into_inner();
    index.models.into_iter().map(|m| (m.name, m.version, m.state)).collect()
}

/// Whether `alpha` is ready, over gRPC.
async fn alpha_ready(c: &mut GrpcClient) -> bool {
    let req = tokitai_serve::grpc::pb::ModelReadyRequest {
        name: "alpha".into(),
        version: String::new(),
    };
    c.model_ready(req).await.expect("a known model").into_inner().ready
}

/// Unloads alpha over gRPC: it is then not ready, answers UNAVAILABLE and is
/// listed as not ready.
async fn grpc_unload_alpha(c: &mut GrpcClient, row: &[f64]) {
    let unload = tokitai_serve::grpc::pb::RepositoryModelUnloadRequest {
        model_name: "alpha".into(),
        ..Default::default()
    };
    c.repository_model_unload(unload).await.expect("unload");
    assert!(!alpha_ready(c).await);
    let status = c.model_infer(alpha_request(row)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let listed = grpc_index(c, false).await;
    assert!(listed.iter().all(|(_, _, state)| state != "READY"), "{listed:?}");
    assert!(grpc_index(c, true).await.is_empty());
}

/// Loads alpha again over gRPC: it is ready and answers bit-equal to the
/// offline forward (`want`: its logits' bits for `row`); a model the
/// repository does not have is NOT_FOUND.
async fn grpc_load_alpha_and_not_an_unknown_model(c: &mut GrpcClient, row: &[f64], want: &[u32]) {
    let load = |name: &str| tokitai_serve::grpc::pb::RepositoryModelLoadRequest {
        model_name: name.into(),
        ..Default::default()
    };
    c.repository_model_load(load("alpha")).await.expect("load");
    assert!(alpha_ready(c).await);
    let answer = c
        .model_infer(alpha_request(row))
        .await
        .expect("served again")
        .into_inner();
    assert_eq!(answer.model_version, "1");
    let logits: Vec<u32> = answer.raw_output_contents[0]
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(logits, want);
    let status = c.repository_model_load(load("nope")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
}

/// Triton's repository RPCs over gRPC, on a server in explicit mode: the
/// index, an unload (the model then answers UNAVAILABLE and is not ready), a
/// load (it answers again, bit-equal to the offline forward), and a load of
/// a model the repository does not have (NOT_FOUND).
#[test]
fn explicit_mode_through_grpc_repository_index_load_and_unload() {
    let repo = tempfile::tempdir().unwrap();
    let rows = rows();
    let alpha = stage(repo.path(), "alpha", 1, ModelSize::Nano, 1);
    let alpha_bits = offline_bits(&alpha, &rows[..1]);
    let server = explicit_server(repo.path());
    let grpc = server.grpc_addr.expect("gRPC is on");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .expect("connect to the gRPC port");
        let mut c = GrpcClient::new(channel);
        let listed = grpc_index(&mut c, false).await;
        assert_eq!(listed, vec![("alpha".into(), "1".into(), "READY".into())]);
        grpc_unload_alpha(&mut c, &rows[0]).await;
        grpc_load_alpha_and_not_an_unknown_model(&mut c, &rows[0], &alpha_bits[0]).await;
    });
    let _ = server;
}
