//! What recording metrics costs on the request path, in nanoseconds.
//!
//! Owns: the micro-benchmark behind the issue-4 overhead figure. Measures the
//! exact calls the engine makes per request (middleware count + duration,
//! queue wait, in-flight gauge up and down) and per batch (a worker's batch
//! and routing record for a 12-row batch, the average batch the Nano load
//! test formed). BENCHMARKS.md divides these by the measured CPU time per
//! request. Throughput A/B runs (`metrics.record = false`) are too noisy on
//! the shared 2-core machines to resolve a few percent; this is not.
//!
//! Run: `cargo bench --bench metrics`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tokitai_serve::labels::Route;
use tokitai_serve::metrics::{Metrics, VersionMetrics, VersionShape};

fn recording(c: &mut Criterion) {
    let metrics = Arc::new(Metrics::new());
    let shape = VersionShape {
        model: "nano".into(),
        version: 1,
        workers: 2,
        experts: 4,
        max_queue_rows: 8192,
        max_batch_rows: 256,
    };
    let version = VersionMetrics::new(&metrics, shape);
    let worker = version.worker(0);
    let rows = 12;
    let top_k: Vec<u32> = (0..rows * 2).map(|i| (i % 4) as u32).collect();
    let weights: Vec<f32> = (0..rows).flat_map(|_| [0.6f32, 0.4, 0.0, 0.0]).collect();

    let mut g = c.benchmark_group("metrics");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("per_request", |b| {
        b.iter(|| {
            metrics.add_inflight(1);
            version.observe_queue_wait(black_box(Duration::from_micros(40)));
            metrics.add_inflight(-1);
            // The middleware resolves the matched template to its label.
            let route = Route::from_template(black_box("/infer"));
            metrics.observe_request(route, black_box("200"), Duration::from_micros(90));
        })
    });
    g.bench_function("per_batch_12_rows", |b| {
        b.iter(|| {
            worker.observe_batch(black_box(rows), black_box(rows), Duration::from_micros(150));
            worker.observe_routing(black_box(&top_k), black_box(&weights), 4);
        })
    });
    g.finish();
}

criterion_group!(benches, recording);
criterion_main!(benches);
