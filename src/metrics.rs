//! Prometheus metrics: declared once, in one registry, shared by `Arc`.
//!
//! Owns: every metric's name, help, labels and buckets, and the text exposition
//! for `GET /metrics`. Handlers, the batcher and workers only call the typed
//! recording methods here; nothing registers a metric anywhere else.
//!
//! Conventions: names `tokitai_*`, base units (`_seconds`, `_bytes`), counters
//! end in `_total`, histograms rather than summaries, and label values only
//! from fixed vocabularies (route templates, failure kinds, worker ids, expert
//! ids), never from user input. The label vocabularies are the enums of
//! `labels.rs`.

use std::time::Duration;

use crate::labels::{DropReason, Endpoint, FailureReason, GrpcMethod, Route};

use prometheus::{
    Counter, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 10 microseconds to 10 seconds (1-2.5-5 steps).
fn latency_buckets() -> Vec<f64> {
    let mut b = Vec::new();
    let mut decade = 1e-5;
    while decade < 10.0 {
        b.extend([decade, decade * 2.5, decade * 5.0]);
        decade *= 10.0;
    }
    b.push(10.0);
    b
}

/// Powers of two from 1 to 65536, for batch sizes.
fn pow2_buckets() -> Vec<f64> {
    (0..=16).map(|i| f64::from(1u32 << i)).collect()
}

/// All of the engine's metrics.
pub struct Metrics {
    registry: Registry,
    recording: bool,
    pub http_requests: IntCounterVec,
    pub grpc_requests: IntCounterVec,
    pub grpc_stream_messages: IntCounterVec,
    pub request_failures: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_wait: Histogram,
    pub compute_time: Histogram,
    pub rows_computed: IntCounterVec,
    pub batches: IntCounterVec,
    pub batch_rows: Histogram,
    pub batch_requests: Histogram,
    pub rows_dropped: IntCounterVec,
    pub queue_depth_rows: IntGauge,
    pub inflight_requests: IntGauge,
    pub workers: IntGauge,
    pub worker_busy: prometheus::CounterVec,
    pub worker_restarts: IntCounterVec,
    pub expert_rows: IntCounterVec,
    pub router_top1_weight: Histogram,
    pub model_info: IntGaugeVec,
    pub model_load_seconds: Gauge,
    pub model_version: IntGaugeVec,
    pub model_loads: IntCounterVec,
    pub model_load_failures: IntCounterVec,
    pub model_answers: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub ready: IntGauge,
    pub config_max_queue_rows: IntGauge,
    pub config_max_batch_rows: IntGauge,
    pub device_memory_bytes: GaugeVec,
}

impl Metrics {
    /// Declares and registers every metric. Called once per server.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let lat = latency_buckets();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definitions are static and valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("each metric is registered once");
                m
            }};
        }
        let metrics = Metrics {
            recording: true,
            http_requests: reg!(IntCounterVec::new(
                Opts::new(
                    "tokitai_http_requests_total",
                    "HTTP requests answered, by route template and status code."
                ),
                &["route", "status"],
            )),
            grpc_requests: reg!(IntCounterVec::new(
                Opts::new(
                    "tokitai_grpc_requests_total",
                    "gRPC calls answered, by method path and gRPC status code name."
                ),
                &["route", "code"],
            )),
            grpc_stream_messages: reg!(IntCounterVec::new(
                Opts::new(
                    "tokitai_grpc_stream_messages_total",
                    "Inference answers sent on ModelStreamInfer streams, by gRPC status code name (OK, or the code of the error_message sent)."
                ),
                &["code"],
            )),
            request_failures: reg!(IntCounterVec::new(
                Opts::new(
                    "tokitai_request_failures_total",
                    "Requests that got no model answer, by route and reason."
                ),
                &["route", "reason"],
            )),
            request_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "tokitai_request_duration_seconds",
                    "Time from request start to answer, by route."
                )
                .buckets(lat.clone()),
                &["route"],
            )),
            queue_wait: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "tokitai_queue_wait_seconds",
                    "Time a request's rows waited before their batch started."
                )
                .buckets(lat.clone()),
            )),
            compute_time: reg!(Histogram::with_opts(
                HistogramOpts::new("tokitai_compute_seconds", "Forward time of one batch on a worker.")
                    .buckets(lat.clone()),
            )),
            rows_computed: reg!(IntCounterVec::new(
                Opts::new("tokitai_rows_computed_total", "Rows computed, by worker."),
                &["worker"],
            )),
            batches: reg!(IntCounterVec::new(
                Opts::new("tokitai_batches_total", "Batches computed, by worker."),
                &["worker"],
            )),
            batch_rows: reg!(Histogram::with_opts(
                HistogramOpts::new("tokitai_batch_size_rows", "Rows per computed batch.").buckets(pow2_buckets()),
            )),
            batch_requests: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "tokitai_batch_size_requests",
                    "Requests (or request parts) per computed batch."
                )
                .buckets(pow2_buckets()),
            )),
            rows_dropped: reg!(IntCounterVec::new(
                Opts::new(
                    "tokitai_rows_dropped_total",
                    "Queued rows dropped before compute, by reason."
                ),
                &["reason"],
            )),
            queue_depth_rows: reg!(IntGauge::new(
                "tokitai_queue_depth_rows",
                "Rows waiting in the batcher's queue."
            )),
            inflight_requests: reg!(IntGauge::new(
                "tokitai_inflight_requests",
                "Inference requests accepted and not yet answered."
            )),
            workers: reg!(IntGauge::new(
                "tokitai_workers",
                "Worker actors (sessions) in the pool."
            )),
            worker_busy: reg!(prometheus::CounterVec::new(
                Opts::new(
                    "tokitai_worker_busy_seconds_total",
                    "Seconds each worker spent computing; rate() is utilisation."
                ),
                &["worker"],
            )),
            worker_restarts: reg!(IntCounterVec::new(
                Opts::new(
                    "tokitai_worker_restarts_total",
                    "Worker sessions rebuilt after a fault while computing a batch, or worker actors replaced after one ended, by worker."
                ),
                &["worker"],
            )),
            expert_rows: reg!(IntCounterVec::new(
                Opts::new(
                    "tokitai_expert_rows_total",
                    "Rows routed to each expert (each row counts once per selected expert)."
                ),
                &["expert"],
            )),
            router_top1_weight: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "tokitai_router_top1_weight",
                    "The router's largest expert weight per row (its confidence)."
                )
                .buckets(vec![0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]),
            )),
            model_info: reg!(IntGaugeVec::new(
                Opts::new("tokitai_model_info", "Each served model version (value 1)."),
                &[
                    "model",
                    "model_version",
                    "size",
                    "layernorm",
                    "weight_precision",
                    "param_count",
                    "checkpoint",
                    "backend",
                    "devices",
                    "isa"
                ],
            )),
            model_load_seconds: reg!(Gauge::new(
                "tokitai_model_load_seconds",
                "Time taken to load and prepare the most recently loaded model version."
            )),
            model_version: reg!(IntGaugeVec::new(
                Opts::new(
                    "tokitai_model_version",
                    "The version each loaded model serves (its repository folder, or the checkpoint's step)."
                ),
                &["model"],
            )),
            model_loads: reg!(IntCounterVec::new(
                Opts::new(
                    "tokitai_model_loads_total",
                    "Model versions loaded and put in service, by model."
                ),
                &["model"],
            )),
            model_load_failures: reg!(IntCounterVec::new(
                Opts::new(
                    "tokitai_model_load_failures_total",
                    "Model versions that failed to load (bad files, bad arch, failed warm-up); the previous version kept serving."
                ),
                &["model"],
            )),
            model_answers: reg!(IntCounterVec::new(
                Opts::new(
                    "tokitai_model_answers_total",
                    "Inference requests answered, by the model and version that computed them."
                ),
                &["model", "version"],
            )),
            build_info: reg!(IntGaugeVec::new(
                Opts::new("tokitai_build_info", "Build of the engine (value 1)."),
                &["version"],
            )),
            ready: reg!(IntGauge::new(
                "tokitai_ready",
                "1 when the model is loaded, workers warmed up and not draining."
            )),
            config_max_queue_rows: reg!(IntGauge::new(
                "tokitai_queue_capacity_rows",
                "Configured batching.max_queue_rows."
            )),
            config_max_batch_rows: reg!(IntGauge::new(
                "tokitai_max_batch_rows",
                "Configured batching.max_batch_rows."
            )),
            device_memory_bytes: reg!(GaugeVec::new(
                Opts::new(
                    "tokitai_device_memory_used_bytes",
                    "Memory used on each compute device."
                ),
                &["device"],
            )),
            registry,
        };
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            metrics
                .registry
                .register(Box::new(pc))
                .expect("process collector registered once");
        }
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        metrics
    }

    /// Creates the per-worker and per-expert series up front, so dashboards
    /// show zeros rather than gaps before the first batch.
    pub fn init_pool(&self, workers: usize, experts: usize, max_queue_rows: usize, max_batch_rows: usize) {
        self.workers.set(workers as i64);
        for w in 0..workers {
            let id = w.to_string();
            self.rows_computed.with_label_values(&[&id]);
            self.batches.with_label_values(&[&id]);
            self.worker_busy.with_label_values(&[&id]);
            self.worker_restarts.with_label_values(&[&id]);
        }
        for e in 0..experts {
            self.expert_rows.with_label_values(&[&e.to_string()]);
        }
        for reason in DropReason::ALL {
            self.rows_dropped.with_label_values(&[reason.as_str()]);
        }
        for reason in FailureReason::ALL {
            self.request_failures
                .with_label_values(&[Route::Infer.as_str(), reason.as_str()]);
        }
        self.config_max_queue_rows.set(max_queue_rows as i64);
        self.config_max_batch_rows.set(max_batch_rows as i64);
    }

    /// Whether request metrics are recorded (`metrics.record`).
    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// The answer counter of one model version, resolved once per version.
    pub fn model_answers(&self, model: &str, version: u64) -> IntCounter {
        self.model_answers.with_label_values(&[model, &version.to_string()])
    }

    /// A model's load-failure series, created at zero so dashboards and
    /// alerts see it before the first failure.
    pub fn model_known(&self, model: &str) {
        self.model_load_failures.with_label_values(&[model]);
        self.model_loads.with_label_values(&[model]);
    }

    /// A version of `model` failed to load.
    pub fn model_load_failed(&self, model: &str) {
        self.model_load_failures.with_label_values(&[model]).inc();
    }

    /// `description` is now the version `model` serves, in place of
    /// `previous` (whose series are removed: only loaded versions have them).
    pub fn model_served(
        &self,
        d: &crate::engine::ModelDescription,
        previous: Option<&crate::engine::ModelDescription>,
    ) {
        if let Some(p) = previous {
            self.model_retired(p);
        }
        self.model_loads.with_label_values(&[&d.name]).inc();
        self.model_version.with_label_values(&[&d.name]).set(d.version as i64);
        self.model_info.with_label_values(&model_info_labels(d)).set(1);
    }

    /// Version `d` no longer serves: its series go.
    pub fn model_retired(&self, d: &crate::engine::ModelDescription) {
        let _ = self.model_info.remove_label_values(&model_info_labels(d));
        let _ = self
            .model_answers
            .remove_label_values(&[&d.name, &d.version.to_string()]);
    }

    /// `model` was unloaded (serves no version): its version gauge goes.
    pub fn model_unloaded(&self, d: &crate::engine::ModelDescription) {
        self.model_retired(d);
        let _ = self.model_version.remove_label_values(&[&d.name]);
    }

    /// Turns recording on or off. Off exists only to measure what recording
    /// costs (`metrics.record = false`); `/metrics` then shows zeros.
    pub fn set_recording(&mut self, on: bool) {
        self.recording = on;
    }

    /// One answered HTTP request (`status` as its three digits).
    pub fn observe_request(&self, route: Route, status: &str, elapsed: Duration) {
        if !self.recording {
            return;
        }
        let route = route.as_str();
        self.http_requests.with_label_values(&[route, status]).inc();
        self.request_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }

    /// One answered gRPC call (`code` as the status code's name, e.g. `OK`).
    pub fn observe_grpc_request(&self, method: GrpcMethod, code: &str, elapsed: Duration) {
        if !self.recording {
            return;
        }
        let route = method.as_str();
        self.grpc_requests.with_label_values(&[route, code]).inc();
        self.request_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }

    /// One inference answer sent on a gRPC stream.
    pub fn observe_stream_message(&self, code: &str) {
        if self.recording {
            self.grpc_stream_messages.with_label_values(&[code]).inc();
        }
    }

    /// One request that got no model answer.
    pub fn observe_failure(&self, route: impl Into<Endpoint>, reason: FailureReason) {
        if self.recording {
            self.request_failures
                .with_label_values(&[route.into().as_str(), reason.as_str()])
                .inc();
        }
    }

    /// Batches computed so far, all workers together (`execution_count` of
    /// the statistics extension).
    pub fn batches_total(&self) -> u64 {
        let workers = self.workers.get().max(0) as usize;
        (0..workers)
            .map(|w| self.batches.with_label_values(&[&w.to_string()]).get())
            .sum()
    }

    /// Time a request waited before its first rows started computing.
    pub fn observe_queue_wait(&self, wait: Duration) {
        if self.recording {
            self.queue_wait.observe(wait.as_secs_f64());
        }
    }

    /// An inference request was accepted (+1) or finished (-1).
    pub fn add_inflight(&self, delta: i64) {
        if self.recording {
            self.inflight_requests.add(delta);
        }
    }

    pub fn set_queue_depth(&self, rows: usize) {
        if self.recording {
            self.queue_depth_rows.set(rows as i64);
        }
    }

    /// The counters of rows dropped before compute, one per reason,
    /// resolved once (the batcher and each worker hold a copy).
    pub fn drop_counters(&self) -> DropCounters {
        DropCounters {
            recording: self.recording,
            by_reason: DropReason::ALL
                .iter()
                .map(|r| self.rows_dropped.with_label_values(&[r.as_str()]))
                .collect(),
        }
    }

    /// Worker `id`'s actor was replaced after it ended.
    pub fn worker_restarted(&self, id: usize) {
        self.worker_restarts.with_label_values(&[&id.to_string()]).inc();
    }

    /// The handles worker `id` records into, resolved once so the per-batch
    /// path does no label lookups or allocation.
    pub fn worker(&self, id: usize, experts: usize) -> WorkerMetrics {
        let label = id.to_string();
        WorkerMetrics {
            recording: self.recording,
            dropped: self.drop_counters(),
            rows: self.rows_computed.with_label_values(&[&label]),
            batches: self.batches.with_label_values(&[&label]),
            busy: self.worker_busy.with_label_values(&[&label]),
            restarts: self.worker_restarts.with_label_values(&[&label]),
            experts: (0..experts)
                .map(|e| self.expert_rows.with_label_values(&[&e.to_string()]))
                .collect(),
            batch_rows: self.batch_rows.clone(),
            batch_requests: self.batch_requests.clone(),
            compute: self.compute_time.clone(),
            top1: self.router_top1_weight.clone(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        out
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The `tokitai_model_info` label values of a served version.
fn model_info_labels(d: &crate::engine::ModelDescription) -> [String; 10] {
    [
        d.name.clone(),
        d.version.to_string(),
        d.size.to_string(),
        d.layernorm.as_str().to_string(),
        d.weight_precision.as_str().to_string(),
        d.param_count.to_string(),
        d.checkpoint.clone(),
        d.backend.to_string(),
        d.devices.clone(),
        d.isa.to_string(),
    ]
}

/// `tokitai_rows_dropped_total`, one handle per [`DropReason`].
#[derive(Clone)]
pub struct DropCounters {
    recording: bool,
    by_reason: Vec<IntCounter>,
}

impl DropCounters {
    /// `rows` rows were dropped before compute, for `reason`.
    pub fn add(&self, reason: DropReason, rows: usize) {
        if !self.recording {
            return;
        }
        let index = DropReason::ALL.iter().position(|r| *r == reason);
        if let Some(counter) = index.and_then(|i| self.by_reason.get(i)) {
            counter.inc_by(rows as u64);
        }
    }
}

/// One worker's metric handles (see [`Metrics::worker`]).
pub struct WorkerMetrics {
    recording: bool,
    /// Rows this worker dropped instead of computing.
    pub dropped: DropCounters,
    rows: IntCounter,
    batches: IntCounter,
    busy: Counter,
    restarts: IntCounter,
    experts: Vec<IntCounter>,
    batch_rows: Histogram,
    batch_requests: Histogram,
    compute: Histogram,
    top1: Histogram,
}

impl WorkerMetrics {
    /// One computed batch of `rows` rows from `requests` requests (or parts).
    pub fn observe_batch(&self, rows: usize, requests: usize, compute: Duration) {
        if !self.recording {
            return;
        }
        self.rows.inc_by(rows as u64);
        self.batches.inc();
        self.batch_rows.observe(rows as f64);
        self.batch_requests.observe(requests as f64);
        self.compute.observe(compute.as_secs_f64());
        self.busy.inc_by(compute.as_secs_f64());
    }

    /// Router health for one batch: rows per selected expert and each row's
    /// top-1 weight. Counted locally, then flushed once per batch, so the
    /// shared atomics are touched a handful of times, not once per row.
    pub fn observe_routing(&self, top_k: &[u32], router_weights: &[f32], n_experts: usize) {
        if !self.recording {
            return;
        }
        let mut counts = vec![0u64; self.experts.len()];
        for &e in top_k {
            if let Some(c) = counts.get_mut(e as usize) {
                *c += 1;
            }
        }
        for (counter, &c) in self.experts.iter().zip(&counts) {
            if c > 0 {
                counter.inc_by(c);
            }
        }
        let top1 = self.top1.local();
        for row in router_weights.chunks(n_experts.max(1)) {
            top1.observe(f64::from(row.iter().copied().fold(0.0f32, f32::max)));
        }
        top1.flush();
    }

    /// The worker rebuilt its session after a fault.
    pub fn restart(&self) {
        self.restarts.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family_and_no_user_labels() {
        let m = Metrics::new();
        m.init_pool(2, 4, 100, 10);
        m.observe_request(Route::Infer, "200", Duration::from_micros(50));
        m.observe_request(Route::from_template("/../etc/passwd"), "404", Duration::from_micros(5));
        m.drop_counters().add(DropReason::Failed, 3);
        let w = m.worker(0, 4);
        w.observe_batch(3, 2, Duration::from_micros(100));
        w.observe_routing(&[0, 1, 0, 2], &[0.6, 0.4, 0.0, 0.0, 0.7, 0.0, 0.3, 0.0], 4);
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "tokitai_http_requests_total{route=\"/infer\",status=\"200\"} 1",
            "tokitai_http_requests_total{route=\"other\",status=\"404\"} 1",
            "tokitai_expert_rows_total{expert=\"0\"} 2",
            "tokitai_expert_rows_total{expert=\"3\"} 0",
            "tokitai_batch_size_rows_bucket{le=\"4\"} 1",
            "tokitai_router_top1_weight_count 2",
            "tokitai_workers 2",
            "tokitai_rows_dropped_total{reason=\"failed\"} 3",
            "tokitai_rows_dropped_total{reason=\"timeout\"} 0",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
        assert!(!text.contains("passwd"));
    }

    #[test]
    fn recording_off_records_nothing() {
        let mut m = Metrics::new();
        m.set_recording(false);
        m.init_pool(1, 4, 100, 10);
        m.observe_request(Route::Infer, "200", Duration::from_micros(50));
        m.drop_counters().add(DropReason::Timeout, 3);
        let w = m.worker(0, 4);
        w.observe_batch(3, 2, Duration::from_micros(100));
        w.observe_routing(&[0, 1], &[0.6, 0.4, 0.0, 0.0], 4);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(!text.contains("tokitai_http_requests_total{"));
        assert!(text.contains("tokitai_rows_computed_total{worker=\"0\"} 0"));
        assert!(text.contains("tokitai_router_top1_weight_count 0"));
        assert!(text.contains("tokitai_rows_dropped_total{reason=\"timeout\"} 0"));
    }

    #[test]
    fn latency_buckets_span_10us_to_10s() {
        let b = latency_buckets();
        assert!((b[0] - 1e-5).abs() < 1e-12);
        assert_eq!(*b.last().unwrap(), 10.0);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }
}
