//! Forward throughput of the CPU backend with f32 and f16 weights: Nano and
//! Tiny (batch 1/16/64/256, threads 1/2) and Full (batch 1/16/64, 2 threads,
//! fewer samples), with achieved GFLOP/s and weight GB/s, and for f32 Nano and
//! Tiny a reference sgemm (the `gemm` crate) at the same shapes.
//!
//! Owns: nothing but measurement. Groups are `{size}-{precision}`; filter with
//! criterion's argument, e.g. `cargo bench --bench forward -- nano` or
//! `-- tiny-f16/b1/`. Full runs only with `TOKITAI_BENCH_DIR` set: its
//! synthetic files (~3.2 GB) are written there once (`DIR/full/`) and reused,
//! and each precision's load time (read + pack) and resident memory are
//! printed.
//!
//! GFLOP/s count only the experts actually computed (2 flops per MAC of each
//! selected expert's layers, router excluded); GB/s is the packed weight
//! bytes of the experts a batch uses (each read once per forward) over the
//! time; rows/s is criterion's throughput line and also printed in the
//! summary.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use tokitai_serve::backend::cpu::{CpuBackend, CpuOptions};
use tokitai_serve::backend::{Backend, ForwardOutput, SessionConfig};
use tokitai_serve::model::{Dims, LayerNormMode, ModelSize, WeightPrecision};

mod common;
use common::{expert_flops, expert_layers, inputs, rows_per_expert, rss_bytes, weight_bytes_read};

const BATCHES: [usize; 4] = [1, 16, 64, 256];
const THREADS: [usize; 2] = [1, 2];
const FULL_BATCHES: [usize; 3] = [1, 16, 64];
const FULL_THREADS: [usize; 1] = [2];

/// One reference product: rows `m`, `a [m, k]`, `b [k, n]`, `c [m, n]`.
type GemmCase = (usize, Vec<f32>, Vec<f32>, Vec<f32>);

/// Reference sgemm GFLOP/s over the same (M, K, N) shapes, best of 3 rounds.
fn reference_gemm_gflops(d: &Dims, rows: &[usize], threads: usize) -> f64 {
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let layers = expert_layers(d);
    let bufs: Vec<GemmCase> = rows
        .iter()
        .filter(|&&m| m > 0)
        .flat_map(|&m| {
            layers
                .iter()
                .map(move |&(k, n)| (m, inputs(m, k, 1), inputs(k, n, 2), vec![0.0f32; m * n]))
        })
        .collect();
    let flops = expert_flops(d, rows);
    let run = |bufs: &mut Vec<GemmCase>| {
        for (m, a, b, c) in bufs.iter_mut() {
            let (m, k, n) = (*m, a.len() / *m, c.len() / *m);
            // SAFETY: row-major a [m,k], b [k,n], c [m,n], strides match the lengths.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
        }
    };
    let mut bufs = bufs;
    run(&mut bufs);
    let t0 = Instant::now();
    let mut iters = 0u32;
    while t0.elapsed() < Duration::from_millis(100) || iters < 2 {
        run(&mut bufs);
        iters += 1;
    }
    let per = t0.elapsed().as_secs_f64() / iters as f64;
    let mut best = per;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..iters {
            run(&mut bufs);
        }
        best = best.min(t.elapsed().as_secs_f64() / iters as f64);
    }
    flops / best / 1e9
}

fn bench_size(c: &mut Criterion, size: ModelSize, precision: WeightPrecision, summary: &mut Vec<String>) {
    let name = format!("{}-{precision}", size.as_str().to_lowercase());
    // Criterion's filter is applied per benchmark id; skip building the
    // weights (340 MB for Tiny, 3.2 GB for Full) when no id of this group can match.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let group_of = |f: &str| f.split('/').next().unwrap_or("").to_string();
    if !filter.is_empty() && !filter.iter().any(|f| name.contains(&group_of(f)) || f.contains(&name)) {
        return;
    }
    let dims = Dims::for_size(size);
    let rss0 = rss_bytes();
    let t0 = Instant::now();
    let bench_dir = std::env::var_os("TOKITAI_BENCH_DIR").map(std::path::PathBuf::from);
    let Some(weights) = common::weights_for(size, bench_dir.as_deref()) else {
        return;
    };
    let options = CpuOptions {
        precision,
        ..CpuOptions::default()
    };
    let backend = CpuBackend::with_options(weights, LayerNormMode::Identity, options).unwrap();
    let load = t0.elapsed();
    let line = format!(
        "{name}: load (read/synth + pack) {:.1} s, packed expert weights {:.1} MB, RSS +{:.0} MB",
        load.as_secs_f64(),
        backend.weight_bytes() as f64 / 1e6,
        (rss_bytes().saturating_sub(rss0)) as f64 / 1e6
    );
    println!("{line}");
    summary.push(format!("<!-- {line} -->"));
    let mut group = c.benchmark_group(&name);
    match size {
        ModelSize::Nano => group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1)),
        ModelSize::Full => group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2)),
        _ => group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3)),
    };
    let (batches, threads_list): (&[usize], &[usize]) = match size {
        ModelSize::Full => (&FULL_BATCHES, &FULL_THREADS),
        _ => (&BATCHES, &THREADS),
    };
    for &batch in batches {
        let x = inputs(batch, dims.input, 9);
        for &threads in threads_list {
            let mut session = backend.create_session(SessionConfig { threads }).unwrap();
            let mut out = ForwardOutput::default();
            session.forward(&x, &mut out).unwrap();
            let rows = rows_per_expert(&dims, &out);
            let samples = RefCell::new(Vec::<f64>::new());
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(format!("b{batch}/t{threads}"), |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    for _ in 0..iters {
                        session.forward(&x, &mut out).unwrap();
                    }
                    let el = t.elapsed();
                    samples.borrow_mut().push(el.as_secs_f64() / iters as f64);
                    el
                })
            });
            let mut s = samples.into_inner();
            if s.is_empty() {
                continue;
            }
            s.sort_by(f64::total_cmp);
            let med = s[s.len() / 2];
            let gf = expert_flops(&dims, &rows) / med / 1e9;
            let gbs = weight_bytes_read(&backend, &rows) / med / 1e9;
            // The reference sgemm is the same for both precisions, and at
            // Full's shapes would need another 3.2 GB: f32 Nano/Tiny only.
            let rgf = if precision == WeightPrecision::F32 && size != ModelSize::Full {
                format!("{:.1}", reference_gemm_gflops(&dims, &rows, threads))
            } else {
                "-".to_string()
            };
            let line = format!(
                "| {name} | {batch} | {threads} | {:.1} | {gf:.1} | {gbs:.1} | {rgf} | {rows:?} |",
                batch as f64 / med
            );
            println!("{line}");
            summary.push(line);
        }
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let mut summary = Vec::new();
    for size in [ModelSize::Nano, ModelSize::Tiny, ModelSize::Full] {
        for precision in [WeightPrecision::F32, WeightPrecision::F16] {
            bench_size(&mut c, size, precision, &mut summary);
        }
    }
    c.final_summary();
    println!(
        "\n| model | batch | threads | rows/s (median) | GFLOP/s | weight GB/s | ref gemm GFLOP/s | rows per expert |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for l in summary {
        println!("{l}");
    }
}
