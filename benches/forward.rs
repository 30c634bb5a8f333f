//! Forward throughput of the CPU backend (Nano and Tiny, batch 1/16/64/256,
//! threads 1/2), with achieved GFLOP/s beside a reference sgemm (the `gemm`
//! crate) at the same shapes.
//!
//! Owns: nothing but measurement. Filter with criterion's argument, e.g.
//! `cargo bench --bench forward -- nano` or `-- tiny/b1/`.
//!
//! GFLOP/s count only the experts actually computed (2 flops per MAC of each
//! selected expert's layers, router excluded); rows/s is criterion's
//! throughput line and also printed in the summary.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use tokitai_serve::backend::cpu::CpuBackend;
use tokitai_serve::backend::{Backend, ForwardOutput, SessionConfig};
use tokitai_serve::model::synth::synth_weights;
use tokitai_serve::model::{Dims, LayerNormMode, ModelSize};

const BATCHES: [usize; 4] = [1, 16, 64, 256];
const THREADS: [usize; 2] = [1, 2];

fn inputs(rows: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..rows * width)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Sum of 4 uniforms: roughly normal, like the peer's inputs.
            (0..4)
                .map(|i| ((s >> (16 * i)) & 0xFFFF) as f32 / 65536.0 - 0.5)
                .sum::<f32>()
                * 1.7
        })
        .collect()
}

/// Layer shapes `(k, n)` of one expert.
fn expert_layers(d: &Dims) -> Vec<(usize, usize)> {
    let mut v = vec![(d.input, d.hidden)];
    v.extend(std::iter::repeat_n((d.hidden, d.hidden), d.depth));
    v.push((d.hidden, d.output));
    v
}

/// Rows per expert for this batch (from the forward's own routing).
fn rows_per_expert(d: &Dims, out: &ForwardOutput) -> Vec<usize> {
    let mut m = vec![0; d.experts];
    for &e in &out.top_k {
        m[e as usize] += 1;
    }
    m
}

fn expert_flops(d: &Dims, rows: &[usize]) -> f64 {
    let per_row: usize = expert_layers(d).iter().map(|(k, n)| 2 * k * n).sum();
    rows.iter().map(|&m| (m * per_row) as f64).sum()
}

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

fn bench_size(c: &mut Criterion, size: ModelSize, summary: &mut Vec<String>) {
    let name = size.as_str().to_lowercase();
    // Criterion's filter is applied per benchmark id; skip building the Tiny
    // weights (340 MB) when no id of this size can match.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str()) || f.contains(&name)) {
        return;
    }
    let dims = Dims::for_size(size);
    let backend = CpuBackend::new(synth_weights(dims, 42), LayerNormMode::Identity);
    let mut group = c.benchmark_group(&name);
    match size {
        ModelSize::Nano => group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1)),
        _ => group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3)),
    };
    for &batch in &BATCHES {
        let x = inputs(batch, dims.input, 9);
        for &threads in &THREADS {
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
            let rgf = reference_gemm_gflops(&dims, &rows, threads);
            let line = format!(
                "| {name} | {batch} | {threads} | {:.0} | {gf:.1} | {rgf:.1} | {rows:?} |",
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
    bench_size(&mut c, ModelSize::Nano, &mut summary);
    bench_size(&mut c, ModelSize::Tiny, &mut summary);
    c.final_summary();
    println!("\n| model | batch | threads | rows/s (median) | GFLOP/s | ref gemm GFLOP/s | rows per expert |");
    println!("|---|---|---|---|---|---|---|");
    for l in summary {
        println!("{l}");
    }
}
