//! The engine against its peers (ONNX Runtime, OpenVINO) and against the
//! machine's own limits, in one command (issue 20, item 4).
//!
//! Owns: `cargo bench --bench peers`: the peak-FMA and DRAM-read probes
//! (`peers/probes.rs`), the engine's forward at each weight precision x each
//! instruction set this CPU has, the Python peers run back to back in the
//! same invocation (`peers/runner.rs`), the tables, and (with `--accuracy`)
//! the accuracy comparison on the peers' own weights (`peers/accuracy.rs`,
//! `peers/accuracy.py`). Must not touch: the engine, the peer scripts.
//!
//! ## Run
//!
//! ```text
//! bash benches/peers/setup.sh                      # once: target/peers-venv (onnxruntime, openvino, onnx, numpy)
//! cargo bench --bench peers                        # Nano + Tiny, all modes, peers, probes
//! cargo bench --bench peers -- --quick             # fewer, shorter repetitions (~5 minutes)
//! cargo bench --bench peers -- --sizes tiny --accuracy
//! TOKITAI_BENCH_DIR=/data cargo bench --bench peers -- --sizes tiny,full,nano --accuracy
//! ```
//!
//! Each size runs the engine, then the peers, then (with `--accuracy`) the
//! accuracy rows, and prints its tables; all tables are printed again at the
//! end. On a 2-core machine the last command takes about half an hour (Full:
//! writing its 3.2 GB of synthetic weights once, packing each mode, and each
//! peer building its 3.2 GB ONNX graph).
//!
//! Flags: `--sizes nano,tiny,medium,full` (run in that order; default
//! `nano,tiny`, plus `full` when `TOKITAI_BENCH_DIR` is set or with
//! `--full`); `--quick`;
//! `--accuracy` (also the accuracy table) or `--accuracy-only`;
//! `--no-peers`, `--no-probes`; `--precisions f32,f16,bf16`;
//! `--isas avx512,avx2,scalar`; `--batches 1,16,64,256`.
//! Environment: `TOKITAI_BENCH_DIR` (Full's synthetic model files, ~3.2 GB,
//! written once under `DIR/full/`; without it `--full` uses
//! `target/peers/models`), `TOKITAI_PEERS_PYTHON` (default
//! `target/peers-venv/bin/python`), `TOKITAI_PEERS_DIR` (default
//! `../shared/peers`). Without the Python environment the peers and the
//! accuracy comparison are skipped with the reason and the command that
//! makes it.
//!
//! ## What is measured
//!
//! - Engine: synthetic weights (`synth_weights`, seed 42; Full from its
//!   files), LayerNorm `stored` (the peers' math), one backend at a time
//!   (built, measured, dropped: Full's f32 copy alone is 3.2 GB). Each
//!   precision (f32, f16, bf16) x each ISA of `CpuIsa::available()` (scalar
//!   on Nano only), batches 1/16/64/256 (Full 1/16/64), sessions of 1 and 2
//!   threads (Full: the serving default only), plus the serving pool shape
//!   when it has several workers (Nano: 2 single-threaded workers, one
//!   session each, driven at once). rows/s is the median of `reps` timed
//!   repetitions of at least `min_rep` each (5 x 0.5 s; `--quick` 3 x 0.2 s).
//! - Peers: `ort_moe.py --variant topk` and `ov_moe.py` (f32, and bf16 where
//!   the CPU has AVX512_BF16) on the same sizes and batches, threads 1 and 2;
//!   their `rows/s=` lines are parsed and the best of the two thread counts
//!   is taken, as the issue's tables do. Their weights are random normal
//!   (`make_weights`), the engine's synthetic uniform: the work per row is the
//!   same (top-2 of 4 experts); the routing of a given batch differs.
//! - Summary tables: the engine on the best ISA (`auto`), best of 1 and 2
//!   threads in one session; ratios engine f32 / best f32 peer, engine f16
//!   / best f32 peer, engine bf16 / OpenVINO bf16.
//! - Limits: GFLOP/s (2 flops per multiply-add of the 2 selected experts per
//!   row, router excluded) against the peak of the multiply-add the mode
//!   uses (`fma_avx512`, `fma_avx2`, or `dpbf16_avx512` for bf16 on
//!   AVX512_BF16) at the same thread count; weight GB/s (packed bytes of the
//!   experts a batch uses, read once per forward) against the DRAM read rate
//!   at the same thread count ("in cache" when they fit the last-level
//!   cache). The probes run before the first size and after each one; a
//!   limit is the best any of those runs measured (the machine is shared).
//! - Results also go to `target/peers/run-<unix time>.jsonl`, one JSON
//!   object per probe, engine point, peer point and accuracy row.
//!
//! The machines are shared and noisy: compare ratios from one run, not
//! absolute numbers across runs.

#[path = "peers/accuracy.rs"]
mod accuracy;
mod common;
#[path = "peers/probes.rs"]
mod probes;
#[path = "peers/runner.rs"]
mod runner;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokitai_serve::backend::cpu::{CpuBackend, CpuIsa, CpuOptions, SplitPolicy};
use tokitai_serve::backend::{Backend, ForwardOutput, Session, SessionConfig};
use tokitai_serve::model::{Dims, LayerNormMode, ModelSize, WeightPrecision};

use probes::Probe;
use runner::{Peer, PeerEnv, PeerResult};

const USAGE: &str = "usage: cargo bench --bench peers -- [--sizes nano,tiny,medium,full] [--full] [--quick] \
[--accuracy | --accuracy-only] [--no-peers] [--no-probes] [--precisions f32,f16,bf16] \
[--isas avx512,avx2,scalar] [--batches 1,16,64,256]";

const PRECISIONS: [WeightPrecision; 3] = [WeightPrecision::F32, WeightPrecision::F16, WeightPrecision::Bf16];

struct Opts {
    sizes: Vec<ModelSize>,
    quick: bool,
    speed: bool,
    accuracy: bool,
    peers: bool,
    probes: bool,
    precisions: Vec<WeightPrecision>,
    isas: Option<Vec<CpuIsa>>,
    batches: Option<Vec<usize>>,
    full_dir: Option<PathBuf>,
}

fn list<T>(v: &str, parse: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    v.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| parse(s.trim()))
        .collect()
}

fn parse_size(s: &str) -> Result<ModelSize, String> {
    match s {
        "nano" => Ok(ModelSize::Nano),
        "tiny" => Ok(ModelSize::Tiny),
        "medium" => Ok(ModelSize::Medium),
        "full" => Ok(ModelSize::Full),
        other => Err(format!("unknown size {other:?} (nano, tiny, medium, full)")),
    }
}

fn parse_args(target: &Path) -> Result<Opts, String> {
    let bench_dir = std::env::var_os("TOKITAI_BENCH_DIR").map(PathBuf::from);
    let mut o = Opts {
        sizes: vec![ModelSize::Nano, ModelSize::Tiny],
        quick: false,
        speed: true,
        accuracy: false,
        peers: true,
        probes: true,
        precisions: PRECISIONS.to_vec(),
        isas: None,
        batches: None,
        full_dir: None,
    };
    let mut sizes_given = false;
    let mut full = bench_dir.is_some();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            // What `cargo bench` passes to every harness = false bench.
            "--bench" => {}
            "--sizes" => {
                o.sizes = list(&value()?, parse_size)?;
                sizes_given = true;
            }
            "--full" => full = true,
            "--quick" => o.quick = true,
            "--accuracy" => o.accuracy = true,
            "--accuracy-only" => {
                o.accuracy = true;
                o.speed = false;
            }
            "--no-peers" => o.peers = false,
            "--no-probes" => o.probes = false,
            "--precisions" => o.precisions = list(&value()?, |s| s.parse())?,
            "--isas" => o.isas = Some(list(&value()?, |s| s.parse())?),
            "--batches" => o.batches = Some(list(&value()?, |s| s.parse::<usize>().map_err(|e| e.to_string()))?),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if full && !sizes_given && !o.sizes.contains(&ModelSize::Full) {
        o.sizes.push(ModelSize::Full);
    }
    if o.sizes.contains(&ModelSize::Full) {
        o.full_dir = Some(bench_dir.unwrap_or_else(|| target.join("peers/models")));
    }
    Ok(o)
}

/// Timing settings of one invocation.
#[derive(Clone, Copy)]
struct Timing {
    reps: usize,
    min_rep: Duration,
}

/// One engine point.
#[derive(Debug, Clone, serde::Serialize)]
struct EngineResult {
    size: String,
    precision: String,
    isa: String,
    /// The ISA is the best this CPU has (what `auto` serves with).
    auto: bool,
    workers: usize,
    threads: usize,
    /// The pool shape `Backend::pool_shape` picks for this machine.
    serving_default: bool,
    batch: usize,
    rows_s: f64,
    rows_s_min: f64,
    rows_s_max: f64,
    gflops: f64,
    weight_gbs: f64,
    rows_per_expert: Vec<usize>,
}

/// rows/s of `reps` repetitions: every session runs `iters` forwards of `x`
/// per repetition, each on its own thread when there are several.
fn time_sessions(sessions: &mut [Box<dyn Session>], x: &[f32], batch: usize, t: Timing) -> Vec<f64> {
    let mut out = ForwardOutput::default();
    for s in sessions.iter_mut() {
        for _ in 0..2 {
            s.forward(x, &mut out).expect("forward");
        }
    }
    let t0 = Instant::now();
    for _ in 0..3 {
        sessions[0].forward(x, &mut out).expect("forward");
    }
    let per = t0.elapsed().as_secs_f64() / 3.0;
    let iters = ((t.min_rep.as_secs_f64() / per.max(1e-7)).ceil() as usize).max(1);
    let workers = sessions.len();
    (0..t.reps)
        .map(|_| {
            let t0 = Instant::now();
            if workers == 1 {
                for _ in 0..iters {
                    sessions[0].forward(x, &mut out).expect("forward");
                }
            } else {
                std::thread::scope(|sc| {
                    for s in sessions.iter_mut() {
                        sc.spawn(move || {
                            let mut o = ForwardOutput::default();
                            for _ in 0..iters {
                                s.forward(x, &mut o).expect("forward");
                            }
                        });
                    }
                });
            }
            (workers * iters * batch) as f64 / t0.elapsed().as_secs_f64()
        })
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() { f64::NAN } else { s[s.len() / 2] }
}

fn batches_for(size: ModelSize, o: &Opts) -> Vec<usize> {
    let all: Vec<usize> = match size {
        ModelSize::Full => vec![1, 16, 64],
        _ => vec![1, 16, 64, 256],
    };
    match &o.batches {
        Some(b) => b
            .iter()
            .copied()
            .filter(|x| all.contains(x) || size != ModelSize::Full)
            .collect(),
        None => all,
    }
}

fn isas_for(size: ModelSize, o: &Opts) -> Vec<CpuIsa> {
    let avail = CpuIsa::available();
    let wanted: Vec<CpuIsa> = match &o.isas {
        Some(v) => avail.iter().copied().filter(|i| v.contains(i)).collect(),
        // Scalar is cheap on Nano only (Tiny's bf16 emulation in scalar code is minutes).
        None => avail
            .iter()
            .copied()
            .filter(|&i| i != CpuIsa::Scalar || size == ModelSize::Nano)
            .collect(),
    };
    wanted
}

/// Appends JSON objects to `target/peers/run-<unix>.jsonl`.
struct Jsonl {
    file: Option<std::fs::File>,
    path: PathBuf,
    run: u64,
}

impl Jsonl {
    fn open(target: &Path) -> Jsonl {
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let dir = target.join("peers");
        let path = dir.join(format!("run-{run}.jsonl"));
        let file = std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::File::create(&path))
            .map_err(|e| println!("(not writing {}: {e})", path.display()))
            .ok();
        Jsonl { file, path, run }
    }

    fn write(&mut self, kind: &str, v: &impl serde::Serialize) {
        let Some(f) = self.file.as_mut() else { return };
        let mut v = serde_json::to_value(v).expect("serialisable");
        if let Some(m) = v.as_object_mut() {
            m.insert("kind".into(), kind.into());
            m.insert("run".into(), self.run.into());
        }
        let _ = writeln!(f, "{v}");
    }
}

/// The engine's points for `size`, one backend at a time.
fn bench_engine(size: ModelSize, o: &Opts, t: Timing, jsonl: &mut Jsonl) -> Vec<EngineResult> {
    let dims = Dims::for_size(size);
    let name = size.as_str().to_lowercase();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let batches = batches_for(size, o);
    let isas = isas_for(size, o);
    let best_isa = CpuIsa::available()[0];
    let mut results = Vec::new();
    // Nano and Tiny are made once and cloned; Full is read from its files per backend.
    let base = if size == ModelSize::Full {
        None
    } else {
        common::weights_for(size, None)
    };
    for &precision in &o.precisions {
        for &isa in &isas {
            let t0 = Instant::now();
            let rss0 = common::rss_bytes();
            let Some(weights) = base
                .clone()
                .or_else(|| common::weights_for(size, o.full_dir.as_deref()))
            else {
                return results;
            };
            let options = CpuOptions {
                isa,
                precision,
                split: SplitPolicy::Auto,
            };
            let backend = match CpuBackend::with_options(weights, LayerNormMode::Stored, options) {
                Ok(b) => b,
                Err(e) => {
                    println!("{name} {precision} {isa}: skipped ({e})");
                    continue;
                }
            };
            let pool = backend.pool_shape(cores);
            println!(
                "{name} {precision} {}: built in {:.1} s, packed expert weights {:.1} MB, RSS +{:.0} MB, serving pool {}x{}",
                backend.isa_name(),
                t0.elapsed().as_secs_f64(),
                backend.weight_bytes() as f64 / 1e6,
                common::rss_bytes().saturating_sub(rss0) as f64 / 1e6,
                pool.workers,
                pool.threads_per_worker
            );
            // (workers, threads per worker)
            let mut shapes: Vec<(usize, usize)> = if size == ModelSize::Full {
                vec![(1, pool.threads_per_worker)]
            } else {
                vec![(1, 1), (1, 2.min(cores.max(1)))]
            };
            if pool.workers > 1 {
                shapes.push((pool.workers, pool.threads_per_worker));
            }
            shapes.dedup();
            for &batch in &batches {
                let x = common::inputs(batch, dims.input, 9);
                for &(workers, threads) in &shapes {
                    let mut sessions: Vec<Box<dyn Session>> = (0..workers)
                        .map(|_| backend.create_session(SessionConfig { threads }).expect("session"))
                        .collect();
                    let mut out = ForwardOutput::default();
                    sessions[0].forward(&x, &mut out).expect("forward");
                    let rows = common::rows_per_expert(&dims, &out);
                    let reps = time_sessions(&mut sessions, &x, batch, t);
                    let rows_s = median(&reps);
                    let per_s = rows_s / batch as f64;
                    let r = EngineResult {
                        size: name.clone(),
                        precision: precision.to_string(),
                        isa: backend.isa_name().to_string(),
                        auto: isa == best_isa,
                        workers,
                        threads,
                        serving_default: workers == pool.workers && threads == pool.threads_per_worker,
                        batch,
                        rows_s,
                        rows_s_min: reps.iter().copied().fold(f64::INFINITY, f64::min),
                        rows_s_max: reps.iter().copied().fold(0.0, f64::max),
                        gflops: common::expert_flops(&dims, &rows) * per_s / 1e9,
                        weight_gbs: common::weight_bytes_read(&backend, &rows) * per_s / 1e9,
                        rows_per_expert: rows,
                    };
                    println!(
                        "  engine {name} {} {} {}x{} b{batch}: {:.1} rows/s [{:.1}..{:.1}] {:.1} GFLOP/s {:.1} GB/s",
                        r.precision,
                        r.isa,
                        workers,
                        threads,
                        r.rows_s,
                        r.rows_s_min,
                        r.rows_s_max,
                        r.gflops,
                        r.weight_gbs
                    );
                    jsonl.write("engine", &r);
                    results.push(r);
                }
            }
        }
    }
    results
}

/// The peers' points for `size` (empty with a printed reason when they cannot run).
fn bench_peers(env: &PeerEnv, size: ModelSize, o: &Opts, quick: bool, jsonl: &mut Jsonl) -> Vec<PeerResult> {
    let name = size.as_str().to_lowercase();
    let batches = batches_for(size, o);
    let (reps, min_rep_s) = if quick { (3, 0.3) } else { (5, 1.0) };
    let mut peers = vec![Peer::OrtF32];
    if env.has_ov {
        peers.push(Peer::OvF32);
        if runner::ov_bf16_meaningful() {
            peers.push(Peer::OvBf16);
        } else {
            println!("OpenVINO bf16: skipped (this CPU lacks AVX512_BF16; OpenVINO would silently run f32)");
        }
    } else {
        println!("OpenVINO: skipped ({} cannot import openvino)", env.python.display());
    }
    let mut out = Vec::new();
    for p in peers {
        let t0 = Instant::now();
        match env.bench(p, &name, &batches, reps, min_rep_s) {
            Ok(rs) => {
                println!("  {} {name}: {:.0} s", p.label(), t0.elapsed().as_secs_f64());
                for r in &rs {
                    jsonl.write("peer", r);
                }
                out.extend(rs);
            }
            Err(e) => println!("  {} {name}: failed: {e}", p.label()),
        }
    }
    out
}

fn fmt_rate(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    if v < 100.0 {
        return format!("{v:.1}");
    }
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The best rate any probe run measured for `name` on `threads` threads.
fn peak(probes: &[Probe], name: &str, threads: usize) -> Option<f64> {
    probes
        .iter()
        .filter(|p| p.name == name && p.threads == threads)
        .map(|p| p.value)
        .reduce(f64::max)
}

/// The worst run's rate (how far the shared machine drifted).
fn low(probes: &[Probe], name: &str, threads: usize) -> Option<f64> {
    probes
        .iter()
        .filter(|p| p.name == name && p.threads == threads)
        .map(|p| p.value)
        .reduce(f64::min)
}

/// Which multiply-add peak a mode is held against.
fn flop_peak_name(isa: &str, precision: &str) -> Option<&'static str> {
    match (isa, precision) {
        ("avx512_bf16", "bf16") => Some("dpbf16_avx512"),
        (i, _) if i.starts_with("avx512") => Some("fma_avx512"),
        ("avx2", _) => Some("fma_avx2"),
        _ => None,
    }
}

/// Best (rows/s, threads) of a peer at each batch.
fn best_peer(peers: &[PeerResult], key: &str) -> BTreeMap<usize, (f64, usize)> {
    let mut m: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
    for p in peers.iter().filter(|p| p.peer == key) {
        let e = m.entry(p.batch).or_insert((0.0, p.threads));
        if p.rows_s > e.0 {
            *e = (p.rows_s, p.threads);
        }
    }
    m
}

/// Best single-session engine point of (precision, auto ISA) at each batch.
fn best_engine<'a>(eng: &'a [EngineResult], precision: &str) -> BTreeMap<usize, &'a EngineResult> {
    let mut m: BTreeMap<usize, &EngineResult> = BTreeMap::new();
    for r in eng
        .iter()
        .filter(|r| r.auto && r.workers == 1 && r.precision == precision)
    {
        let e = m.entry(r.batch).or_insert(r);
        if r.rows_s > e.rows_s {
            *e = r;
        }
    }
    m
}

fn print_size_tables(size: ModelSize, eng: &[EngineResult], peers: &[PeerResult], probes: &[Probe], t: Timing) {
    let name = size.as_str();
    let mut batches: Vec<usize> = eng
        .iter()
        .map(|r| r.batch)
        .chain(peers.iter().map(|p| p.batch))
        .collect();
    batches.sort_unstable();
    batches.dedup();
    let head = |first: &str| {
        let cols: String = batches.iter().map(|b| format!(" B{b} |")).collect();
        println!("| {first} |{cols}");
        println!("|---|{}", "---|".repeat(batches.len()));
    };
    let cells = |f: &dyn Fn(usize) -> Option<String>| -> String {
        batches
            .iter()
            .map(|&b| format!(" {} |", f(b).unwrap_or_else(|| "-".into())))
            .collect()
    };

    println!(
        "\n### {name}: every mode, rows/s (median of {} x >= {:.1} s; workers x threads)\n",
        t.reps,
        t.min_rep.as_secs_f64()
    );
    head(&format!("{name} mode"));
    let mut modes: Vec<(String, String, usize, usize, bool)> = Vec::new();
    for r in eng {
        let k = (
            r.precision.clone(),
            r.isa.clone(),
            r.workers,
            r.threads,
            r.serving_default,
        );
        if !modes.contains(&k) {
            modes.push(k);
        }
    }
    for (prec, isa, w, th, def) in &modes {
        let f = |b: usize| {
            eng.iter()
                .find(|r| &r.precision == prec && &r.isa == isa && r.workers == *w && r.threads == *th && r.batch == b)
                .map(|r| fmt_rate(r.rows_s))
        };
        let mark = if *def { " (serving default)" } else { "" };
        println!("| engine {prec} {isa} {w}x{th}{mark} |{}", cells(&f));
    }
    for p in [Peer::OrtF32, Peer::OvF32, Peer::OvBf16] {
        for th in [1, 2] {
            let f = |b: usize| {
                peers
                    .iter()
                    .find(|r| r.peer == p.key() && r.threads == th && r.batch == b)
                    .map(|r| fmt_rate(r.rows_s))
            };
            if batches.iter().any(|&b| f(b).is_some()) {
                println!("| {} 1x{th} |{}", p.label(), cells(&f));
            }
        }
    }

    let e = |p: &str| best_engine(eng, p);
    let (ef32, ef16, ebf16) = (e("f32"), e("f16"), e("bf16"));
    let ort = best_peer(peers, Peer::OrtF32.key());
    let ovf = best_peer(peers, Peer::OvF32.key());
    let ovb = best_peer(peers, Peer::OvBf16.key());
    let best_f32_peer = |b: usize| -> Option<f64> {
        match (ort.get(&b), ovf.get(&b)) {
            (Some(a), Some(c)) => Some(a.0.max(c.0)),
            (Some(a), None) | (None, Some(a)) => Some(a.0),
            _ => None,
        }
    };
    let isa = eng.iter().find(|r| r.auto).map_or("-", |r| r.isa.as_str());
    println!(
        "\n### {name}: summary, rows/s (engine on {isa}, best of 1 and 2 threads in one session; peers best of 1 and 2 threads)\n"
    );
    head(name);
    let row = |label: &str, m: &BTreeMap<usize, &EngineResult>| {
        let f = |b: usize| m.get(&b).map(|r| format!("{} ({}t)", fmt_rate(r.rows_s), r.threads));
        println!("| {label} |{}", cells(&f));
    };
    let prow = |label: &str, m: &BTreeMap<usize, (f64, usize)>| {
        let f = |b: usize| m.get(&b).map(|r| format!("{} ({}t)", fmt_rate(r.0), r.1));
        println!("| {label} |{}", cells(&f));
    };
    row("engine f32", &ef32);
    prow("ORT f32 (topk)", &ort);
    prow("OpenVINO f32", &ovf);
    println!("| best f32 peer |{}", cells(&|b: usize| best_f32_peer(b).map(fmt_rate)));
    row("engine f16 weights", &ef16);
    row("engine bf16", &ebf16);
    prow("OpenVINO bf16", &ovb);
    let ratio = |num: &BTreeMap<usize, &EngineResult>, den: &dyn Fn(usize) -> Option<f64>| {
        cells(&|b: usize| Some(format!("{:.2}x", num.get(&b)?.rows_s / den(b)?)))
    };
    println!("| **engine f32 / best f32 peer** |{}", ratio(&ef32, &best_f32_peer));
    println!("| engine f16 / best f32 peer |{}", ratio(&ef16, &best_f32_peer));
    println!(
        "| engine f16 / engine f32 |{}",
        ratio(&ef16, &|b| ef32.get(&b).map(|r| r.rows_s))
    );
    println!(
        "| **engine bf16 / OpenVINO bf16** |{}",
        ratio(&ebf16, &|b| ovb.get(&b).map(|r| r.0))
    );
    println!("| engine bf16 / best f32 peer |{}", ratio(&ebf16, &best_f32_peer));

    let dims = Dims::for_size(size);
    let flops_row = common::expert_flops(&dims, &[2]);
    let llc = last_level_cache_bytes();
    println!(
        "\n### {name}: distance to the machine's limits (GFLOP/s vs the multiply-add peak at the same threads; weight GB/s vs DRAM read at the same threads)\n"
    );
    println!("| {name} | batch | threads | rows/s | GFLOP/s | % of peak (probe) | weight GB/s | % of DRAM read |");
    println!("|---|---|---|---|---|---|---|---|");
    for &b in &batches {
        for (label, m) in [("engine f32", &ef32), ("engine f16", &ef16), ("engine bf16", &ebf16)] {
            let Some(r) = m.get(&b) else { continue };
            let th = r.workers * r.threads;
            let fp = flop_peak_name(&r.isa, &r.precision).and_then(|n| Some((n, peak(probes, n, th)?)));
            let dram = peak(probes, "dram_read", th);
            println!(
                "| {label} ({}) | {b} | {th} | {} | {:.1} | {} | {:.1} | {} |",
                r.isa,
                fmt_rate(r.rows_s),
                r.gflops,
                fp.map_or("-".into(), |(n, p)| format!("{:.0}% ({n})", 100.0 * r.gflops / p)),
                r.weight_gbs,
                match dram {
                    // Weights that fit the last-level cache are not read from DRAM.
                    _ if r.weight_gbs * 1e9 * b as f64 / r.rows_s <= llc as f64 => "in cache".to_string(),
                    Some(d) => format!("{:.0}%", 100.0 * r.weight_gbs / d),
                    None => "-".into(),
                }
            );
        }
        let f32_peak = if peak(probes, "fma_avx512", 1).is_some() {
            "fma_avx512"
        } else {
            "fma_avx2"
        };
        for (p, m, pk) in [
            (Peer::OrtF32, &ort, f32_peak),
            (Peer::OvF32, &ovf, f32_peak),
            (Peer::OvBf16, &ovb, "dpbf16_avx512"),
        ] {
            let Some(&(rs, th)) = m.get(&b) else { continue };
            let gf = rs * flops_row / 1e9;
            println!(
                "| {} | {b} | {th} | {} | {gf:.1} | {} | - | - |",
                p.label(),
                fmt_rate(rs),
                peak(probes, pk, th).map_or("-".into(), |v| format!("{:.0}% ({pk})", 100.0 * gf / v))
            );
        }
    }
}

/// The largest cache of CPU 0 (sysfs), else 32 MiB.
fn last_level_cache_bytes() -> u64 {
    (0..8)
        .filter_map(|i| std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size")).ok())
        .filter_map(|s| {
            let s = s.trim();
            let (num, mult) = match s.strip_suffix('K') {
                Some(n) => (n, 1 << 10),
                None => match s.strip_suffix('M') {
                    Some(n) => (n, 1 << 20),
                    None => (s, 1),
                },
            };
            num.parse::<u64>().ok().map(|n| n * mult)
        })
        .max()
        .unwrap_or(32 << 20)
}

fn print_probes(probes: &[Probe]) {
    if probes.is_empty() {
        return;
    }
    let runs = probes
        .iter()
        .filter(|p| p.name == "dram_read" && p.threads == 1)
        .count();
    println!(
        "\n### Machine limits: best of {runs} probe run(s), each the best of {} rounds (lowest run in brackets)\n",
        probes::ROUNDS
    );
    println!("| probe | 1 thread | 2 threads |");
    println!("|---|---|---|");
    let mut names: Vec<&str> = Vec::new();
    for p in probes {
        if !names.contains(&p.name) {
            names.push(p.name);
        }
    }
    for n in names {
        let unit = probes.iter().find(|p| p.name == n).map_or("", |p| p.unit);
        let v = |th| match (peak(probes, n, th), low(probes, n, th)) {
            (Some(v), Some(l)) if runs > 1 => format!("{v:.1} {unit} [{l:.1}]"),
            (Some(v), _) => format!("{v:.1} {unit}"),
            _ => "-".into(),
        };
        println!("| {n} | {} | {} |", v(1), v(2));
    }
}

fn main() {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| manifest.join("target"), PathBuf::from);
    let o = match parse_args(&target) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let t = if o.quick {
        Timing {
            reps: 3,
            min_rep: Duration::from_millis(200),
        }
    } else {
        Timing {
            reps: 5,
            min_rep: Duration::from_millis(500),
        }
    };
    let mut jsonl = Jsonl::open(&target);
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown", str::trim)
        .to_string();
    let mut flags: Vec<&str> = cpu
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().filter(|f| f.starts_with("avx512")).collect())
        .unwrap_or_default();
    flags.sort_unstable();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "# peers bench: cpu {model:?}, {cores} cores, {}; engine ISAs {:?}",
        if flags.is_empty() {
            "no avx512".to_string()
        } else {
            flags.join(" ")
        },
        CpuIsa::available().iter().map(|i| i.as_str()).collect::<Vec<_>>()
    );
    jsonl.write(
        "machine",
        &serde_json::json!({"cpu": model, "cores": cores, "avx512": flags, "quick": o.quick}),
    );

    let env = if o.peers || o.accuracy {
        match PeerEnv::find(&manifest, &target) {
            Ok(e) => Some(e),
            Err(reason) => {
                println!("peers skipped: {reason}");
                None
            }
        }
    } else {
        None
    };

    // The probes run before the first size and again after each: the
    // machine is shared, so a limit is the best any run saw.
    let mut probe_results = Vec::new();
    let probing = o.probes && o.speed;
    let run_probes = |all: &mut Vec<Probe>, jsonl: &mut Jsonl| {
        let dur = Duration::from_millis(if o.quick { 100 } else { 200 });
        let t0 = Instant::now();
        let mut fresh = probes::fma_peaks(dur);
        fresh.extend(probes::dram_read(if o.quick { 256 } else { 1024 }, dur));
        let line: Vec<String> = fresh
            .iter()
            .map(|p| format!("{} {}t {:.1}", p.name, p.threads, p.value))
            .collect();
        println!("probes ({:.0} s): {}", t0.elapsed().as_secs_f64(), line.join(", "));
        for p in &fresh {
            jsonl.write("probe", p);
        }
        all.extend(fresh);
    };
    if probing {
        run_probes(&mut probe_results, &mut jsonl);
        print_probes(&probe_results);
    }

    if o.accuracy && env.is_none() {
        println!("accuracy skipped: it needs the peers' Python environment (see above)");
    }
    // Size by size: the engine, then the peers, then the accuracy rows.
    let mut tables = Vec::new();
    let mut acc_rows = Vec::new();
    for &size in &o.sizes {
        if o.speed {
            println!("\n## {} (engine)", size.as_str());
            let eng = bench_engine(size, &o, t, &mut jsonl);
            let peers = match (&env, o.peers) {
                (Some(env), true) => {
                    println!("## {} (peers)", size.as_str());
                    bench_peers(env, size, &o, o.quick, &mut jsonl)
                }
                _ => Vec::new(),
            };
            if probing {
                run_probes(&mut probe_results, &mut jsonl);
            }
            print_size_tables(size, &eng, &peers, &probe_results, t);
            tables.push((size, eng, peers));
        }
        if let (true, Some(env)) = (o.accuracy, &env) {
            let isas: Vec<CpuIsa> = isas_for(size, &o)
                .into_iter()
                .filter(|&i| i != CpuIsa::Scalar || size != ModelSize::Full)
                .collect();
            let t0 = Instant::now();
            match accuracy::run(env, size, &target.join("peers/accuracy"), 256, &isas) {
                Ok(rows) => {
                    println!("accuracy {}: {:.0} s", size.as_str(), t0.elapsed().as_secs_f64());
                    for r in &rows {
                        jsonl.write("accuracy", r);
                    }
                    acc_rows.extend(rows);
                }
                Err(e) => println!("accuracy {}: failed: {e}", size.as_str()),
            }
        }
    }

    // Everything once more at the end, so the tables sit together.
    if tables.len() > 1 || (!tables.is_empty() && !acc_rows.is_empty()) {
        println!("\n## All tables");
        print_probes(&probe_results);
        for (size, eng, peers) in &tables {
            print_size_tables(*size, eng, peers, &probe_results, t);
        }
    }
    if !acc_rows.is_empty() {
        accuracy::print_table(&acc_rows);
    }
    if jsonl.file.is_some() {
        println!("\nresults: {}", jsonl.path.display());
    }
}
