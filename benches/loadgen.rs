//! Load generator for the serving engine, with its baselines and targets.
//!
//! Owns: `cargo bench --bench loadgen`: the suite's phases per model and its
//! target checks. Starts the real engine in process (through
//! `tokitai_serve::embed::ServerThread`: `tokitai_serve::run` on its own
//! thread and actix `System`; `cargo bench` builds it, like this harness, with
//! the release-derived `bench` profile) on a free port, loading the model from
//! files (`model.arch` / `model.checkpoint`, written once under
//! `--model-dir`), and drives it over keep-alive HTTP/1.1 in closed and open
//! loops. Baselines run in the same invocation on the same kernels: the old
//! sidecar's design (one mutex, one session, compute inline), the offline
//! forward ceiling at the batch sizes the engine formed, and (Nano) the
//! framework floor. Prints one line per scenario, the target ratios as CHECK
//! lines, and writes a JSON file.
//! Must not touch: the engine itself, the other benches.
//!
//! Run:
//!   cargo bench --bench loadgen -- --suite full --out target/loadgen.json
//!   cargo bench --bench loadgen -- --suite quick          # ~2 minutes
//!   cargo bench --bench loadgen -- --sweep --models nano   # config table
//!   cargo bench --bench loadgen -- --priority --models tiny # priority levels
//! Engine settings: --workers --threads-per-worker --max-batch-rows
//! --max-queue-delay-us --max-queue-rows --http-workers, or --config FILE.

#[path = "loadgen/client.rs"]
mod client;
#[path = "loadgen/priority.rs"]
mod priority;
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
use tokitai_serve::backend::Backend;
use tokitai_serve::config::{Config, Override};
use tokitai_serve::model::{Arch, Dims, ModelSize, read_checkpoint, write_model_dir};

use client::{LoadRun, Mix, Target, Workload};
use report::{Check, Report, ScenarioResult};
use servers::Ceiling;

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
    /// Instead of the suite: the priority-levels scenario (live client at
    /// level 1 idle, sharing one level with bulk, and on its own level).
    #[arg(long)]
    priority: bool,
    /// --priority: the live client's paced rate (single rows, req/s).
    #[arg(long, default_value_t = 20.0)]
    live_rate: f64,
    /// --priority: closed-loop bulk clients at level 2.
    #[arg(long, default_value_t = 8)]
    bulk_clients: usize,
    /// --priority: rows per bulk request.
    #[arg(long, default_value_t = 64)]
    bulk_rows: usize,
    /// --priority: `[batching.levels.2] max_batch_rows` in the
    /// separate-levels phase.
    #[arg(long, default_value_t = 32)]
    bulk_batch_rows: usize,
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
        c.grpc.bind = "127.0.0.1:0".into();
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
struct Srv {
    name: &'static str,
    tgt: Target,
    /// Engine workers (for utilisation); 1 for the baselines.
    workers: usize,
    settings: serde_json::Value,
}

/// The record of a load run against `srv` with workload `wl`, before the
/// mode's own fields are set.
fn scenario(m: &ModelFiles, srv: &Srv, mode: &str, wl: &Workload, label: &str, run: &LoadRun) -> ScenarioResult {
    ScenarioResult::from_run(m.name, srv.name, mode, &wl.mix.name(), label, run, srv.workers)
        .with_settings(srv.settings.clone())
}

/// A closed loop of `clients` against `srv`, recorded and printed.
fn closed(report: &mut Report, m: &ModelFiles, srv: &Srv, wl: &Arc<Workload>, clients: usize) -> ScenarioResult {
    let run = client::closed_loop(&srv.tgt, Arc::clone(wl), clients);
    let mut r = scenario(m, srv, "closed", wl, &format!("c{clients}"), &run);
    r.clients = Some(clients);
    report.push(r).clone()
}

/// An open loop at `factor` x `capacity` req/s over `conns` connections
/// against `srv`, recorded and printed.
fn open(
    report: &mut Report,
    m: &ModelFiles,
    srv: &Srv,
    wl: &Arc<Workload>,
    capacity: f64,
    factor: f64,
    conns: usize,
) -> ScenarioResult {
    let rate = capacity * factor;
    let run = client::open_loop(&srv.tgt, Arc::clone(wl), rate, conns);
    let mut r = scenario(m, srv, "open", wl, &format!("{factor}x"), &run);
    r.rate_per_s = Some(rate);
    r.conns = Some(conns);
    report.push(r).clone()
}

/// What every phase of one model's suite shares.
struct ModelSuite<'a> {
    args: &'a Args,
    t: &'a Timing,
    m: &'a ModelFiles,
    config: Config,
    dims: Dims,
    single: Arc<Workload>,
    multi: Arc<Workload>,
    /// Closed-loop clients of the main runs.
    clients: usize,
    /// The baselines' backend: the engine's model on the same kernels.
    backend: Arc<dyn Backend>,
    /// The engine's pool shape, resolved as the engine resolves it.
    workers: usize,
    threads_per_worker: usize,
}

impl<'a> ModelSuite<'a> {
    fn new(args: &'a Args, t: &'a Timing, m: &'a ModelFiles) -> ModelSuite<'a> {
        let config = args.engine_config(m);
        let dims = Dims::for_size(m.size);
        let single = Arc::new(Workload::new(Mix::Single, dims.input, 64));
        let multi = Arc::new(Workload::new(Mix::multi(), dims.input, 8));
        // The baselines' backend, built first so the engine's pool shape (0 =
        // the backend's choice) resolves exactly as the engine resolves it.
        let backend = servers::baseline_backend(&config);
        let shape = tokitai_serve::served::pool_shape(backend.as_ref(), &config);
        ModelSuite {
            args,
            t,
            m,
            config,
            dims,
            single,
            multi,
            clients: closed_clients(m.size),
            backend,
            workers: shape.workers,
            threads_per_worker: shape.threads_per_worker,
        }
    }

    fn print_header(&self) {
        println!(
            "== {}: engine {} workers x {} threads, max_batch_rows {}, max_queue_delay_us {}, max_queue_rows {}, http_workers {}",
            self.m.name,
            self.workers,
            self.threads_per_worker,
            self.config.batching.max_batch_rows,
            self.config.batching.max_queue_delay_us,
            self.config.batching.max_queue_rows,
            self.config.server.http_workers
        );
    }

    /// The engine at `base_url`: `/metrics` scraped, its config as settings.
    fn engine_srv(&self, base_url: &str) -> Srv {
        Srv {
            name: "engine",
            tgt: target(base_url, true, self.t, self.args),
            workers: self.workers,
            settings: engine_settings(&self.config),
        }
    }

    /// A baseline at `base_url`: one worker, no `/metrics`.
    fn baseline_srv(&self, name: &'static str, base_url: &str, settings: serde_json::Value) -> Srv {
        Srv {
            name,
            tgt: target(base_url, false, self.t, self.args),
            workers: 1,
            settings,
        }
    }
}

/// The suite for one model: engine scenarios, then the baselines, then the
/// target checks.
fn run_model(args: &Args, t: &Timing, m: &ModelFiles, report: &mut Report) {
    let suite = ModelSuite::new(args, t, m);
    suite.print_header();
    let engine = run_engine_scenarios(&suite, report);
    let baselines = run_baselines(&suite, &engine.closed, report);
    let clients = suite.clients;
    // The baselines' backend is not needed for the checks.
    drop(suite);
    check_throughput(report, m, clients, &engine, &baselines);
    check_latency(report, m, &engine, &baselines);
}

/// The engine scenarios the checks read.
struct EngineRuns {
    /// Single-row closed loop at the suite's clients.
    closed: ScenarioResult,
    /// The same on the binary Open Inference Protocol route (Nano only).
    v2: Option<ScenarioResult>,
    /// Single-row closed loop, one client.
    sequential: ScenarioResult,
    /// Open loops at 0.8x and 3x the closed loop's throughput.
    open_08x: ScenarioResult,
    open_3x: ScenarioResult,
}

/// The engine: closed loops (single-row, v2 binary on Nano, multi-row, one
/// client), then the open loops.
fn run_engine_scenarios(s: &ModelSuite, report: &mut Report) -> EngineRuns {
    let m = s.m;
    let engine = servers::start_engine(s.config.clone());
    let srv = s.engine_srv(&engine.base_url);
    let closed_single = closed(report, m, &srv, &s.single, s.clients);
    // The binary Open Inference Protocol path, same clients, same run (Nano).
    let v2 = (m.size == ModelSize::Nano).then(|| {
        let binary = Arc::new(Workload::new(Mix::V2Binary, s.dims.input, 64));
        closed(report, m, &srv, &binary, s.clients)
    });
    closed(report, m, &srv, &s.multi, multi_clients(m.size));
    let sequential = closed(report, m, &srv, &s.single, 1);
    let capacity = closed_single.stats().requests_per_s;
    let conns = open_conns(s.args);
    note_if_queue_cannot_fill(&s.config, &s.single, conns);
    let open_08x = open(report, m, &srv, &s.single, capacity, 0.8, conns);
    let open_3x = open(report, m, &srv, &s.single, capacity, 3.0, conns);
    engine.stop();
    EngineRuns {
        closed: closed_single,
        v2,
        sequential,
        open_08x,
        open_3x,
    }
}

/// Says when `conns` open-loop connections are fewer than the requests the
/// engine queues before it rejects (so the 3x run cannot draw a 429).
fn note_if_queue_cannot_fill(config: &Config, single: &Workload, conns: usize) {
    let fill = config.batching.max_queue_rows as f64 / single.mean_rows();
    if (conns as f64) < fill {
        println!(
            "note: {conns} open-loop connections cannot fill the engine's queue (max_queue_rows {}): under \
             overload the client's backlog (send lateness), not a 429, absorbs the excess; for the 3x check use \
             --max-queue-rows below {conns} (or more --open-conns)",
            config.batching.max_queue_rows
        );
    }
}

/// The baseline scenarios the checks read.
struct BaselineRuns {
    /// The old design, single-row closed loop at the suite's clients.
    old_closed: ScenarioResult,
    /// The old design, one client.
    old_sequential: ScenarioResult,
    /// The offline forward at the engine's average batch (`batch` rows).
    ceiling: Ceiling,
    batch: usize,
    /// The framework floor at the suite's clients (Nano only).
    floor: Option<ScenarioResult>,
}

/// The baselines on the same kernels: the old design, the offline ceiling at
/// the batch size the engine's closed loop formed, and (Nano) the floor.
fn run_baselines(s: &ModelSuite, engine_closed: &ScenarioResult, report: &mut Report) -> BaselineRuns {
    let (old_closed, old_sequential) = run_old_design(s, report);
    let split = engine_closed.server_split.unwrap_or_default();
    let batch = split.avg_batch_rows.round().max(1.0) as usize;
    let ceiling = run_ceiling(s, batch, report);
    let floor = (s.m.size == ModelSize::Nano).then(|| run_floor(s, report));
    BaselineRuns {
        old_closed,
        old_sequential,
        ceiling,
        batch,
        floor,
    }
}

/// The old sidecar's design: closed loop at the suite's clients, then one
/// client.
fn run_old_design(s: &ModelSuite, report: &mut Report) -> (ScenarioResult, ScenarioResult) {
    let http_workers = s.config.server.http_workers;
    let old = servers::start_old_design(
        &s.backend,
        s.args.old_threads,
        http_workers,
        s.config.batching.max_request_rows,
    );
    let settings = serde_json::json!({
        "session_threads": s.args.old_threads,
        "http_workers": http_workers,
    });
    let srv = s.baseline_srv("old-design", &old.base_url, settings);
    let old_closed = closed(report, s.m, &srv, &s.single, s.clients);
    let old_sequential = closed(report, s.m, &srv, &s.single, 1);
    old.stop();
    (old_closed, old_sequential)
}

/// The offline forward ceiling at `batch` rows, on the engine's pool shape.
fn run_ceiling(s: &ModelSuite, batch: usize, report: &mut Report) -> Ceiling {
    let m = s.m;
    let ceiling = servers::offline_ceiling(&s.backend, s.workers, s.threads_per_worker, batch, s.t.ceiling);
    report.push(ScenarioResult {
        name: format!("{}/ceiling/offline/b{batch}", m.name),
        model: m.name.into(),
        server: "ceiling".into(),
        mode: "offline".into(),
        mix: "single".into(),
        clients: None,
        rate_per_s: None,
        conns: None,
        settings: serde_json::json!({ "sessions": s.workers, "threads_per_session": s.threads_per_worker }),
        client: None,
        server_split: None,
        ceiling: Some(ceiling),
    });
    ceiling
}

/// The framework floor (parse, canned answer), closed loop at the suite's
/// clients; it is canned for every row count of the suite's mixes.
fn run_floor(s: &ModelSuite, report: &mut Report) -> ScenarioResult {
    let mut counts = vec![1];
    if let Mix::Rows(r) = &s.multi.mix {
        counts.extend(r);
    }
    let http_workers = s.config.server.http_workers;
    let fl = servers::start_floor(&s.backend, &counts, http_workers, s.config.batching.max_request_rows);
    let srv = s.baseline_srv(
        "floor",
        &fl.base_url,
        serde_json::json!({ "http_workers": http_workers }),
    );
    let r = closed(report, s.m, &srv, &s.single, s.clients);
    fl.stop();
    r
}

/// `a / b`, NaN when `b` is not positive.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

/// `check` as it stands on Tiny; on other models printed for information
/// only (no target, no verdict).
fn graded_on_tiny(size: ModelSize, check: Check) -> Check {
    if size == ModelSize::Tiny {
        check
    } else {
        Check {
            target: "(info)".into(),
            pass: None,
            ..check
        }
    }
}

/// Throughput targets: engine vs old design and vs the offline ceiling
/// (graded on Tiny), the v2 binary route vs JSON, engine vs framework floor.
fn check_throughput(report: &mut Report, m: &ModelFiles, c: usize, e: &EngineRuns, b: &BaselineRuns) {
    let n = m.name;
    let es = e.closed.stats();
    let os = b.old_closed.stats();
    let detail = format!("{:.1} vs {:.1} req/s, c={c}", es.requests_per_s, os.requests_per_s);
    let tput_old = ratio(es.requests_per_s, os.requests_per_s);
    let name = format!("{n}: engine/old-design throughput");
    report.check(graded_on_tiny(m.size, Check::at_least(&name, tput_old, 10.0, detail)));
    let ceiling = &b.ceiling;
    let detail = format!(
        "{:.1} vs {:.1} rows/s offline at batch {} ({} x {} threads)",
        es.rows_per_s, ceiling.rows_per_s, b.batch, ceiling.sessions, ceiling.threads_per_session
    );
    let eff = ratio(es.rows_per_s, ceiling.rows_per_s);
    let name = format!("{n}: engine/offline-ceiling rows/s");
    report.check(graded_on_tiny(m.size, Check::at_least(&name, eff, 0.75, detail)));
    if let Some(v2) = &e.v2 {
        let bs = v2.stats();
        report.check(Check::at_least(
            &format!("{n}: v2 binary/JSON /infer throughput"),
            ratio(bs.requests_per_s, es.requests_per_s),
            2.0,
            format!(
                "{:.1} vs {:.1} req/s, p99 {:.3} vs {:.3} ms, c={c}",
                bs.requests_per_s, es.requests_per_s, bs.latency.p99_ms, es.latency.p99_ms
            ),
        ));
    }
    if let Some(fl) = &b.floor {
        let f = fl.stats();
        report.check(Check::at_least(
            &format!("{n}: engine/framework-floor throughput"),
            ratio(es.requests_per_s, f.requests_per_s),
            0.6,
            format!("{:.1} vs {:.1} req/s, c={c}", es.requests_per_s, f.requests_per_s),
        ));
    }
}

/// Latency targets: sequential p50 vs the old design, and the open loop at
/// 3x capacity (nothing lost, fast 429s, accepted p99 vs 0.8x).
fn check_latency(report: &mut Report, m: &ModelFiles, e: &EngineRuns, b: &BaselineRuns) {
    let n = m.name;
    let (ep50, op50) = (
        e.sequential.stats().latency.p50_ms,
        b.old_sequential.stats().latency.p50_ms,
    );
    report.check(Check::at_most(
        &format!("{n}: sequential p50 engine/old-design"),
        ratio(ep50, op50),
        1.1,
        format!("{ep50:.3} vs {op50:.3} ms, one client"),
    ));
    let (o80, o3) = (e.open_08x.stats(), e.open_3x.stats());
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
    let name = format!("{n}: open 3x 429 p99 latency (ms, from send)");
    report.check(if o3.rejected > 0 {
        Check::at_most(
            &name,
            o3.rejected_service_latency.p99_ms,
            1.0,
            format!(
                "{} rejections; from intended send time p99 {:.3} ms",
                o3.rejected, o3.rejected_latency.p99_ms
            ),
        )
    } else {
        Check::na(
            &name,
            "<= 1",
            "no 429 at 3x capacity: the queue never filled (see send lateness / latency)".into(),
        )
    });
    let saturated = if lateness_p99(o3) > 10.0 {
        " (client pool saturated: the engine did not shed the excess)"
    } else {
        ""
    };
    report.check(Check::at_most(
        &format!("{n}: open p99 accepted 3x/0.8x"),
        ratio(o3.latency.p99_ms, o80.latency.p99_ms),
        2.0,
        format!(
            "{:.3} vs {:.3} ms at {:.0} vs {:.0} req/s offered; client send lateness p99 {:.3} vs {:.3} ms{saturated}",
            o3.latency.p99_ms,
            o80.latency.p99_ms,
            e.open_3x.rate_per_s.unwrap_or(0.0),
            e.open_08x.rate_per_s.unwrap_or(0.0),
            lateness_p99(o3),
            lateness_p99(o80),
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
    } else if args.priority {
        "priority".to_string()
    } else {
        args.suite.clone()
    };
    assert!(
        args.sweep || args.priority || ["quick", "full"].contains(&args.suite.as_str()),
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
        } else if args.priority {
            priority::run(&args, &t, &m, &mut report);
        } else {
            run_model(&args, &t, &m, &mut report);
        }
    }
    report
        .write(&args.out)
        .unwrap_or_else(|e| panic!("writing {}: {e}", args.out.display()));
    println!("wrote {}", args.out.display());
}
