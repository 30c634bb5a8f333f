//! Load generator for the serving engine, with its baselines and targets.
//!
//! Owns: `cargo bench --bench loadgen`. Starts the real engine in process
//! (`tokitai_serve::run` on its own thread and actix `System`; `cargo bench`
//! builds it, like this harness, with the release-derived `bench` profile)
//! on a free port, loading the model from files (`model.arch` /
//! `model.checkpoint`, written once under `--model-dir`), and drives it over
//! keep-alive HTTP/1.1 in closed and open loops. Baselines run in the same
//! invocation on the same kernels: the old sidecar's design (one mutex, one
//! session, compute inline), the offline forward ceiling at the batch sizes
//! the engine formed, and (Nano) the framework floor. Prints one line per
//! scenario, the target ratios as CHECK lines, and writes a JSON file.
//! Must not touch: the engine itself, the other benches.
//!
//! Run:
//!   cargo bench --bench loadgen -- --suite full --out target/loadgen.json
//!   cargo bench --bench loadgen -- --suite quick          # ~2 minutes
//!   cargo bench --bench loadgen -- --sweep --models nano   # config table
//! Engine settings: --workers --threads-per-worker --max-batch-rows
//! --max-queue-delay-us --max-queue-rows --http-workers, or --config FILE.

#[path = "loadgen/client.rs"]
mod client;
#[path = "loadgen/report.rs"]
mod report;
#[path = "loadgen/servers.rs"]
mod servers;
#[path = "loadgen/stats.rs"]
mod stats;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokitai_serve::config::{Config, Override};
use tokitai_serve::model::{Arch, Dims, ModelSize, read_checkpoint, write_model_dir};

use client::{LoadRun, Mix, Target, Workload};
use report::{Check, Report, ScenarioResult};

/// Seed of the synthetic models the harness writes.
const SEED: u64 = 7;

#[derive(Parser, Debug)]
#[command(about = "tokitai-serve load generator (closed/open loop, baselines, targets)")]
struct Args {
    /// `quick` (short windows) or `full` (the lead's measurement run).
    #[arg(long, default_value = "quick")]
    suite: String,
    /// Instead of the suite: short closed-loop runs over a grid of engine
    /// configs (workers x threads, queue delay, HTTP workers), as a table.
    #[arg(long)]
    sweep: bool,
    /// Comma-separated: nano, tiny.
    #[arg(long, default_value = "nano,tiny")]
    models: String,
    /// JSON result file.
    #[arg(long, default_value = "target/loadgen.json")]
    out: PathBuf,
    /// Where the synthetic model files are written once and reused.
    #[arg(long, env = "TOKITAI_BENCH_DIR", default_value = "target/loadgen-models")]
    model_dir: PathBuf,
    /// Measurement window per scenario, seconds (default: by suite).
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up before each window, seconds (default: by suite).
    #[arg(long)]
    warmup: Option<f64>,
    /// Base engine config (TOML), before the flags below.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    workers: Option<usize>,
    #[arg(long)]
    threads_per_worker: Option<usize>,
    #[arg(long)]
    max_batch_rows: Option<usize>,
    #[arg(long)]
    max_queue_delay_us: Option<u64>,
    #[arg(long)]
    max_queue_rows: Option<usize>,
    /// Defaults to the config's, lowered to `--max-queue-rows` if that is smaller.
    #[arg(long)]
    max_request_rows: Option<usize>,
    #[arg(long)]
    http_workers: Option<usize>,
    /// Session threads of the old design's single session.
    #[arg(long, default_value_t = 2)]
    old_threads: usize,
    /// Open-loop connection threads (default 128).
    #[arg(long)]
    open_conns: Option<usize>,
    /// A request unanswered after this long counts as lost.
    #[arg(long, default_value_t = 10_000)]
    client_timeout_ms: u64,
    /// Passed by `cargo bench` to harness = false targets; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

struct Timing {
    warmup: Duration,
    duration: Duration,
    ceiling: Duration,
}

impl Args {
    fn timing(&self) -> Timing {
        let (w, d, c) = match (self.suite.as_str(), self.sweep) {
            (_, true) => (1.0, 3.0, 2.0),
            ("full", _) => (3.0, 15.0, 6.0),
            _ => (1.0, 3.0, 2.0),
        };
        let warmup = self.warmup.unwrap_or(w);
        let duration = self.duration.unwrap_or(d);
        Timing {
            warmup: Duration::from_secs_f64(warmup),
            duration: Duration::from_secs_f64(duration),
            ceiling: Duration::from_secs_f64(self.duration.map_or(c, |d| d.min(c.max(d / 2.0)))),
        }
    }

    fn overrides(&self) -> Vec<Override> {
        let int = |v: usize| toml::Value::Integer(v as i64);
        let mut o: Vec<Override> = Vec::new();
        let mut add = |k: &'static str, v: Option<toml::Value>| {
            if let Some(v) = v {
                o.push((k, v));
            }
        };
        add("workers.count", self.workers.map(int));
        add("workers.threads_per_worker", self.threads_per_worker.map(int));
        add("batching.max_batch_rows", self.max_batch_rows.map(int));
        add(
            "batching.max_queue_delay_us",
            self.max_queue_delay_us.map(|v| toml::Value::Integer(v as i64)),
        );
        add("batching.max_queue_rows", self.max_queue_rows.map(int));
        add("batching.max_request_rows", self.max_request_rows.map(int));
        add("server.http_workers", self.http_workers.map(int));
        o
    }

    /// The engine config for a model: file < flags, then the model paths
    /// and a port-0 bind (the listener is bound by the harness).
    fn engine_config(&self, model: &ModelFiles) -> Config {
        let load = |o: &[Override]| {
            Config::load(self.config.as_deref(), Vec::<(String, String)>::new(), o)
                .unwrap_or_else(|e| panic!("engine config: {e}"))
        };
        let mut overrides = self.overrides();
        if let (Some(q), None) = (self.max_queue_rows, self.max_request_rows) {
            // A queue smaller than the largest request is invalid: shrink the
            // request limit with it (the mixes send at most 32 rows).
            if q < load(&[]).batching.max_request_rows {
                overrides.push(("batching.max_request_rows", toml::Value::Integer(q as i64)));
            }
        }
        let mut c = load(&overrides);
        c.server.bind = "127.0.0.1:0".into();
        c.model.arch = Some(model.arch.clone());
        c.model.checkpoint = Some(model.checkpoint.clone());
        c
    }
}

struct ModelFiles {
    size: ModelSize,
    name: &'static str,
    arch: PathBuf,
    checkpoint: PathBuf,
}

/// Writes (or reuses) the model directory for `size` under `root`.
fn model_files(root: &Path, size: ModelSize) -> ModelFiles {
    let name = match size {
        ModelSize::Nano => "nano",
        ModelSize::Tiny => "tiny",
        other => panic!("the load generator serves Nano and Tiny, not {other}"),
    };
    let dir = root.join(name);
    let arch = dir.join("arch.json");
    let checkpoint = dir.join("checkpoint.tkp1");
    let reusable = Arch::load(&arch).is_ok_and(|a| a == Arch::for_size(size, SEED))
        && read_checkpoint(&checkpoint, &Dims::for_size(size)).is_ok();
    if !reusable {
        let t = std::time::Instant::now();
        write_model_dir(&dir, size, SEED, false).expect("write model dir");
        eprintln!("wrote {} model to {} in {:.1?}", name, dir.display(), t.elapsed());
    }
    ModelFiles {
        size,
        name,
        arch,
        checkpoint,
    }
}

/// Per-model client counts from the targets.
fn closed_clients(size: ModelSize) -> usize {
    if size == ModelSize::Nano { 64 } else { 32 }
}
fn multi_clients(size: ModelSize) -> usize {
    if size == ModelSize::Nano { 16 } else { 8 }
}

fn target(base_url: &str, engine: bool, t: &Timing, args: &Args) -> Target {
    Target {
        base_url: base_url.to_string(),
        scrape_metrics: engine,
        warmup: t.warmup,
        duration: t.duration,
        client_timeout: Duration::from_millis(args.client_timeout_ms),
    }
}

fn engine_settings(c: &Config) -> serde_json::Value {
    serde_json::to_value(c).expect("config serialises")
}

/// Open-loop connection threads. Each is a blocking client thread; on two
/// shared cores a few hundred of them already cost the server CPU, so the
/// default is modest (128): enough for the 0.8x run (Little's law: rate x
/// latency), and for the 3x run only if `max_queue_rows` is small enough that
/// the engine's queue, not the client pool, fills first (see the note the
/// suite prints).
fn open_conns(args: &Args) -> usize {
    args.open_conns.unwrap_or(128).max(1)
}

/// A server under test, as the scenarios see it.
struct Srv<'a> {
    name: &'a str,
    tgt: Target,
    /// Engine workers (for utilisation); 1 for the baselines.
    workers: usize,
    settings: serde_json::Value,
}

fn closed(report: &mut Report, m: &ModelFiles, srv: &Srv, wl: &Arc<Workload>, clients: usize) -> ScenarioResult {
    let run: LoadRun = client::closed_loop(&srv.tgt, Arc::clone(wl), clients);
    let mix = wl.mix.name();
    let mut r = ScenarioResult::from_run(
        m.name,
        srv.name,
        "closed",
        &mix,
        &format!("c{clients}"),
        &run,
        srv.workers,
    )
    .with_settings(srv.settings.clone());
    r.clients = Some(clients);
    report.push(r).clone()
}

/// The suite for one model: engine scenarios, then the baselines, then the
/// target checks.
fn run_model(args: &Args, t: &Timing, m: &ModelFiles, report: &mut Report) {
    let config = args.engine_config(m);
    let dims = Dims::for_size(m.size);
    let single = Arc::new(Workload::new(Mix::Single, dims.input, 64));
    let multi = Arc::new(Workload::new(Mix::multi(), dims.input, 8));
    let c = closed_clients(m.size);
    // The baselines' backend, built first so the engine's pool shape (0 =
    // the backend's choice) resolves exactly as the engine resolves it.
    let backend = servers::baseline_backend(&config);
    let shape = tokitai_serve::engine::pool_shape(backend.as_ref(), &config);
    let workers = shape.workers;
    let settings = engine_settings(&config);
    println!(
        "== {}: engine {} workers x {} threads, max_batch_rows {}, max_queue_delay_us {}, max_queue_rows {}, http_workers {}",
        m.name,
        workers,
        shape.threads_per_worker,
        config.batching.max_batch_rows,
        config.batching.max_queue_delay_us,
        config.batching.max_queue_rows,
        config.server.http_workers
    );

    // ---- the engine ----
    let engine = servers::start_engine(config.clone());
    let srv = Srv {
        name: "engine",
        tgt: target(&engine.base_url, true, t, args),
        workers,
        settings: settings.clone(),
    };
    let e_closed = closed(report, m, &srv, &single, c);
    // The binary Open Inference Protocol path, same clients, same run (Nano).
    let v2 = (m.size == ModelSize::Nano).then(|| {
        let binary = Arc::new(Workload::new(Mix::V2Binary, dims.input, 64));
        closed(report, m, &srv, &binary, c)
    });
    closed(report, m, &srv, &multi, multi_clients(m.size));
    let e_seq = closed(report, m, &srv, &single, 1);
    let capacity = e_closed.stats().requests_per_s;
    let conns = open_conns(args);
    // Requests the engine queues before it rejects.
    let fill = config.batching.max_queue_rows as f64 / single.mean_rows();
    if (conns as f64) < fill {
        println!(
            "note: {conns} open-loop connections cannot fill the engine's queue (max_queue_rows {}): under \
             overload the client's backlog (send lateness), not a 429, absorbs the excess; for the 3x check use \
             --max-queue-rows below {conns} (or more --open-conns)",
            config.batching.max_queue_rows
        );
    }
    let mut open = Vec::new();
    for factor in [0.8, 3.0] {
        let rate = capacity * factor;
        let run = client::open_loop(&srv.tgt, Arc::clone(&single), rate, conns);
        let mut r = ScenarioResult::from_run(m.name, "engine", "open", "single", &format!("{factor}x"), &run, workers);
        r.rate_per_s = Some(rate);
        r.conns = Some(conns);
        open.push(report.push(r.with_settings(settings.clone())).clone());
    }
    engine.stop();

    // ---- baselines on the same kernels ----
    let old = servers::start_old_design(
        &backend,
        args.old_threads,
        config.server.http_workers,
        config.batching.max_request_rows,
    );
    let srv = Srv {
        name: "old-design",
        tgt: target(&old.base_url, false, t, args),
        workers: 1,
        settings: serde_json::json!({
            "session_threads": args.old_threads,
            "http_workers": config.server.http_workers,
        }),
    };
    let o_closed = closed(report, m, &srv, &single, c);
    let o_seq = closed(report, m, &srv, &single, 1);
    old.stop();

    let split = e_closed.server_split.unwrap_or_default();
    let batch = split.avg_batch_rows.round().max(1.0) as usize;
    let ceiling = servers::offline_ceiling(&backend, workers, shape.threads_per_worker, batch, t.ceiling);
    report.push(ScenarioResult {
        name: format!("{}/ceiling/offline/b{batch}", m.name),
        model: m.name.into(),
        server: "ceiling".into(),
        mode: "offline".into(),
        mix: "single".into(),
        clients: None,
        rate_per_s: None,
        conns: None,
        settings: serde_json::json!({ "sessions": workers, "threads_per_session": shape.threads_per_worker }),
        client: None,
        server_split: None,
        ceiling: Some(ceiling),
    });

    let floor = (m.size == ModelSize::Nano).then(|| {
        let mut counts = vec![1];
        if let Mix::Rows(r) = &multi.mix {
            counts.extend(r);
        }
        let fl = servers::start_floor(
            &backend,
            &counts,
            config.server.http_workers,
            config.batching.max_request_rows,
        );
        let srv = Srv {
            name: "floor",
            tgt: target(&fl.base_url, false, t, args),
            workers: 1,
            settings: serde_json::json!({ "http_workers": config.server.http_workers }),
        };
        let r = closed(report, m, &srv, &single, c);
        fl.stop();
        r
    });
    drop(backend);

    // ---- targets ----
    let n = m.name;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let e = e_closed.stats();
    let tput_old = ratio(e.requests_per_s, o_closed.stats().requests_per_s);
    let detail = format!(
        "{:.1} vs {:.1} req/s, c={c}",
        e.requests_per_s,
        o_closed.stats().requests_per_s
    );
    report.check(if m.size == ModelSize::Tiny {
        Check::at_least(&format!("{n}: engine/old-design throughput"), tput_old, 10.0, detail)
    } else {
        Check {
            target: "(info)".into(),
            pass: None,
            ..Check::at_least(&format!("{n}: engine/old-design throughput"), tput_old, 10.0, detail)
        }
    });
    let eff = ratio(e.rows_per_s, ceiling.rows_per_s);
    let detail = format!(
        "{:.1} vs {:.1} rows/s offline at batch {batch} ({} x {} threads)",
        e.rows_per_s, ceiling.rows_per_s, ceiling.sessions, ceiling.threads_per_session
    );
    report.check(if m.size == ModelSize::Tiny {
        Check::at_least(&format!("{n}: engine/offline-ceiling rows/s"), eff, 0.75, detail)
    } else {
        Check {
            target: "(info)".into(),
            pass: None,
            ..Check::at_least(&format!("{n}: engine/offline-ceiling rows/s"), eff, 0.75, detail)
        }
    });
    if let Some(v2) = &v2 {
        let b = v2.stats();
        report.check(Check::at_least(
            &format!("{n}: v2 binary/JSON /infer throughput"),
            ratio(b.requests_per_s, e.requests_per_s),
            2.0,
            format!(
                "{:.1} vs {:.1} req/s, p99 {:.3} vs {:.3} ms, c={c}",
                b.requests_per_s, e.requests_per_s, b.latency.p99_ms, e.latency.p99_ms
            ),
        ));
    }
    if let Some(fl) = &floor {
        let f = fl.stats();
        report.check(Check::at_least(
            &format!("{n}: engine/framework-floor throughput"),
            ratio(e.requests_per_s, f.requests_per_s),
            0.6,
            format!("{:.1} vs {:.1} req/s, c={c}", e.requests_per_s, f.requests_per_s),
        ));
    }
    let (ep50, op50) = (e_seq.stats().latency.p50_ms, o_seq.stats().latency.p50_ms);
    report.check(Check::at_most(
        &format!("{n}: sequential p50 engine/old-design"),
        ratio(ep50, op50),
        1.1,
        format!("{ep50:.3} vs {op50:.3} ms, one client"),
    ));
    let (o80, o3) = (open[0].stats(), open[1].stats());
    report.check(Check {
        pass: Some(o3.lost == 0 && o3.accounted()),
        ..Check::at_most(
            &format!("{n}: open 3x lost requests"),
            o3.lost as f64,
            0.0,
            format!(
                "sent {} = {} answered + {} rejected + {} other + {} lost",
                o3.sent, o3.answered, o3.rejected, o3.other_status, o3.lost
            ),
        )
    });
    if o3.rejected > 0 {
        report.check(Check::at_most(
            &format!("{n}: open 3x 429 p99 latency (ms, from send)"),
            o3.rejected_service_latency.p99_ms,
            1.0,
            format!(
                "{} rejections; from intended send time p99 {:.3} ms",
                o3.rejected, o3.rejected_latency.p99_ms
            ),
        ));
    } else {
        report.check(Check::na(
            &format!("{n}: open 3x 429 p99 latency (ms, from send)"),
            "<= 1",
            "no 429 at 3x capacity: the queue never filled (see send lateness / latency)".into(),
        ));
    }
    report.check(Check::at_most(
        &format!("{n}: open p99 accepted 3x/0.8x"),
        ratio(o3.latency.p99_ms, o80.latency.p99_ms),
        2.0,
        format!(
            "{:.3} vs {:.3} ms at {:.0} vs {:.0} req/s offered; client send lateness p99 {:.3} vs {:.3} ms{}",
            o3.latency.p99_ms,
            o80.latency.p99_ms,
            open[1].rate_per_s.unwrap_or(0.0),
            open[0].rate_per_s.unwrap_or(0.0),
            lateness_p99(o3),
            lateness_p99(o80),
            if lateness_p99(o3) > 10.0 {
                " (client pool saturated: the engine did not shed the excess)"
            } else {
                ""
            }
        ),
    ));
}

fn lateness_p99(r: &stats::RunStats) -> f64 {
    r.send_lateness.map_or(0.0, |l| l.p99_ms)
}

/// Short closed-loop runs over a grid of engine configs, as a table.
fn sweep(args: &Args, t: &Timing, m: &ModelFiles, report: &mut Report) {
    let dims = Dims::for_size(m.size);
    let single = Arc::new(Workload::new(Mix::Single, dims.input, 64));
    let c = closed_clients(m.size);
    println!(
        "== sweep {}: closed loop, single-row, {c} clients, {:.1} s windows",
        m.name,
        t.duration.as_secs_f64()
    );
    println!(
        "{:>3} {:>3} {:>7} {:>4} | {:>9} {:>10} {:>9} {:>9} | {:>7} {:>9} {:>9} {:>5}",
        "W", "T", "delay", "http", "req/s", "rows/s", "p50 ms", "p99 ms", "b.rows", "queue ms", "comp ms", "util"
    );
    for (w, th) in [(1, 2), (2, 1)] {
        for delay in [0u64, 200] {
            for http in [1usize, 2] {
                let mut config = args.engine_config(m);
                config.workers.count = w;
                config.workers.threads_per_worker = th;
                config.batching.max_queue_delay_us = delay;
                config.server.http_workers = http;
                let engine = servers::start_engine(config.clone());
                let tgt = target(&engine.base_url, true, t, args);
                let run = client::closed_loop(&tgt, Arc::clone(&single), c);
                engine.stop();
                let label = format!("c{c}/w{w}t{th}/d{delay}/h{http}");
                let mut r = ScenarioResult::from_run(m.name, "engine", "closed", "single", &label, &run, w)
                    .with_settings(engine_settings(&config));
                r.clients = Some(c);
                let s = r.stats();
                let sp = r.server_split.unwrap_or_default();
                println!(
                    "{w:>3} {th:>3} {delay:>7} {http:>4} | {:>9.1} {:>10.1} {:>9.3} {:>9.3} | {:>7.1} {:>9.3} {:>9.3} {:>4.0}%",
                    s.requests_per_s,
                    s.rows_per_s,
                    s.latency.p50_ms,
                    s.latency.p99_ms,
                    sp.avg_batch_rows,
                    sp.queue_wait_avg_ms,
                    sp.compute_avg_ms,
                    100.0 * sp.worker_utilisation
                );
                report.scenarios.push(r);
            }
        }
    }
}

fn main() {
    let args = Args::parse();
    let t = args.timing();
    let suite = if args.sweep {
        "sweep".to_string()
    } else {
        args.suite.clone()
    };
    assert!(
        args.sweep || ["quick", "full"].contains(&args.suite.as_str()),
        "--suite is quick or full"
    );
    let mut report = Report::new(&suite);
    report.notes.push(
        "engine runs in process via tokitai_serve::run on its own thread and actix System, built with the \
         bench profile (release-derived); clients are blocking ureq agents on plain threads in the same process"
            .into(),
    );
    println!(
        "loadgen: suite {suite}, warm-up {:.1} s, window {:.1} s, {} cores (client and server share them)",
        t.warmup.as_secs_f64(),
        t.duration.as_secs_f64(),
        report.cores
    );
    for name in args.models.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let size = match name.to_ascii_lowercase().as_str() {
            "nano" => ModelSize::Nano,
            "tiny" => ModelSize::Tiny,
            other => panic!("unknown model {other:?} (nano, tiny)"),
        };
        let m = model_files(&args.model_dir, size);
        if args.sweep {
            sweep(&args, &t, &m, &mut report);
        } else {
            run_model(&args, &t, &m, &mut report);
        }
    }
    report
        .write(&args.out)
        .unwrap_or_else(|e| panic!("writing {}: {e}", args.out.display()));
    println!("wrote {}", args.out.display());
}
