//! Checkpoint load benchmark: `read_checkpoint` speed against the page-cache
//! read floor.
//!
//! Owns: the `checkpoint_load` bench target (this file; it was
//! `benches/load.rs`, bench `load`). Writes a Tiny checkpoint with AdamW
//! state (~1 GB) once, into `TOKITAI_BENCH_DIR` if set (kept and reused
//! across runs) or a temp dir, then measures in the same run (a) reading the
//! whole file sequentially with a 1 MiB buffer once it is in the page cache
//! and (b) `read_checkpoint` on it, and prints the ratio b/a (target: at most
//! 1.5).
//! Must not touch: the forward benchmark (`benches/forward.rs`).
//!
//! Run: `cargo bench --bench checkpoint_load`

use std::fs::File;
use std::hint::black_box;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::Criterion;
use tokitai_serve::model::{Arch, Dims, ModelSize, read_checkpoint, write_model_dir};

const SEED: u64 = 7;

/// Reads `path` start to end into a reused 1 MiB buffer; returns the bytes read.
fn sequential_read(path: &Path, buf: &mut [u8]) -> u64 {
    let mut f = File::open(path).expect("open checkpoint");
    let mut total = 0u64;
    loop {
        let n = f.read(buf).expect("read checkpoint");
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

fn prepare() -> (Option<tempfile::TempDir>, PathBuf, Dims) {
    let (tmp, dir) = match std::env::var_os("TOKITAI_BENCH_DIR") {
        Some(d) => (None, PathBuf::from(d).join("tiny-adam")),
        None => {
            let t = tempfile::tempdir().expect("temp dir");
            let d = t.path().join("tiny-adam");
            (Some(t), d)
        }
    };
    let ckpt = dir.join("checkpoint.tkp1");
    let dims = Dims::for_size(ModelSize::Tiny);
    let reusable = Arch::load(&dir.join("arch.json")).is_ok_and(|a| a == Arch::for_size(ModelSize::Tiny, SEED))
        && read_checkpoint(&ckpt, &dims).is_ok();
    if !reusable {
        let t = Instant::now();
        write_model_dir(&dir, ModelSize::Tiny, SEED, true).expect("write Tiny checkpoint");
        eprintln!("wrote {} in {:.2?}", ckpt.display(), t.elapsed());
    }
    (tmp, ckpt, dims)
}

fn mean(c: &mut impl FnMut(), iters: u32) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        c();
    }
    t.elapsed() / iters
}

fn main() {
    let (_tmp, ckpt, dims) = prepare();
    let len = std::fs::metadata(&ckpt).expect("stat").len();
    let mut buf = vec![0u8; 1 << 20];
    // Warm the page cache (and the allocator) before either measurement.
    for _ in 0..2 {
        assert_eq!(sequential_read(&ckpt, &mut buf), len);
    }
    drop(read_checkpoint(&ckpt, &dims).expect("load"));

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10))
        .configure_from_args();
    let mut g = c.benchmark_group("load_tiny_adam");
    g.throughput(criterion::Throughput::Bytes(len));
    g.bench_function("sequential_read_1MiB", |b| {
        b.iter(|| black_box(sequential_read(&ckpt, &mut buf)))
    });
    g.bench_function("read_checkpoint", |b| {
        b.iter(|| black_box(read_checkpoint(&ckpt, &dims).expect("load")))
    });
    g.finish();

    // The ratio, measured back to back in this run (criterion's own figures
    // above are the detailed ones).
    let mut seq = || {
        black_box(sequential_read(&ckpt, &mut buf));
    };
    let mut load = || {
        black_box(read_checkpoint(&ckpt, &dims).expect("load"));
    };
    let (a, b) = (mean(&mut seq, 10), mean(&mut load, 10));
    let gib = len as f64 / (1u64 << 30) as f64;
    println!(
        "load_tiny_adam: file {len} bytes ({gib:.2} GiB); sequential read {a:.2?} ({:.2} GiB/s); \
         read_checkpoint {b:.2?}; ratio b/a = {:.2} (target <= 1.5)",
        gib / a.as_secs_f64(),
        b.as_secs_f64() / a.as_secs_f64()
    );
    c.final_summary();
}
