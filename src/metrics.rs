//! Prometheus metrics: declared once, in one registry, shared by `Arc`.
//!
//! Owns: every metric's name, help, labels and buckets, and the text exposition
//! for `GET /metrics`. Handlers, the batcher and workers only call the typed
//! recording methods here; nothing registers a metric anywhere else.
//!
//! Three kinds of series: server-wide ones on [`Metrics`] (requests,
//! failures, in-flight, readiness, build, device memory); per model ones
//! that survive version changes (loads, load failures, load time; the
//! served version number, gone on unload); and per model version ones,
//! labelled `{model, version}` before any label of their own, held by the
//! version's [`VersionMetrics`] and removed when that version retires.
//! Must not touch: engine, served versions or the repository: callers hand
//! in neutral values ([`VersionShape`], [`ModelInfo`], names, numbers).
//!
//! Conventions: names `tokitai_*`, base units (`_seconds`, `_bytes`), counters
//! end in `_total`, histograms rather than summaries, and label values only
//! from fixed vocabularies (route templates, failure kinds, worker ids, expert
//! ids) or the configured model names and versions, never from user input.
//! The label vocabularies are the enums of `labels.rs`. The queue's series
//! (depth, capacity, wait, rejections) also carry `priority`, the request's
//! resolved level `1..=batching.priority_levels` (never what the client
//! sent: a level out of range is the default level): one series per level,
//! `priority="1"` alone with one level, so `sum by (model)` is the old
//! number.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::labels::{AuthFailure, DropReason, Endpoint, FailureReason, GrpcMethod, Route};

use prometheus::core::Collector;
use prometheus::{
    Counter, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
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

/// Labels of every per-version series, before any of its own.
const VERSION: [&str; 2] = ["model", "version"];

/// Labels of a version's per-priority-level queue series.
const LEVEL: [&str; 3] = ["model", "version", "priority"];

/// All of the engine's metrics: the server-wide series, the per-model ones,
/// and the families whose series each served version adds and removes
/// through its [`VersionMetrics`].
pub struct Metrics {
    registry: Registry,
    recording: bool,
    http_requests: IntCounterVec,
    grpc_requests: IntCounterVec,
    grpc_stream_messages: IntCounterVec,
    request_failures: IntCounterVec,
    request_duration: HistogramVec,
    inflight_requests: IntGauge,
    auth_failures: IntCounterVec,
    trace_spans_dropped: prometheus::IntCounter,
    model_info: IntGaugeVec,
    model_load_seconds: GaugeVec,
    model_version: IntGaugeVec,
    model_loads: IntCounterVec,
    model_load_failures: IntCounterVec,
    build_info: IntGaugeVec,
    ready: IntGauge,
    device_memory_bytes: GaugeVec,
    /// The per-version families: each served version's [`VersionMetrics`]
    /// adds its `{model, version}` series to them and removes them.
    families: VersionFamilies,
    /// Which [`VersionMetrics`] owns each `{model, version}` label pair now
    /// (a version re-read under the same number takes the pair over; the
    /// one it replaced must not remove the series when it retires).
    owners: Mutex<HashMap<(String, u64), u64>>,
    next_owner: AtomicU64,
}

impl Metrics {
    /// Declares and registers every metric. Called once per server.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let lat = latency_buckets();
        let model = ModelFamilies::register(&registry);
        let (auth_failures, trace_spans_dropped) = guard_families(&registry);
        let metrics = Metrics {
            recording: true,
            http_requests: counters(
                &registry,
                "tokitai_http_requests_total",
                "HTTP requests answered, by route template and status code.",
                &["route", "status"],
            ),
            grpc_requests: counters(
                &registry,
                "tokitai_grpc_requests_total",
                "gRPC calls answered, by method path and gRPC status code name.",
                &["route", "code"],
            ),
            grpc_stream_messages: counters(
                &registry,
                "tokitai_grpc_stream_messages_total",
                "Inference answers sent on ModelStreamInfer streams, by gRPC status code name (OK, or the code of the error_message sent).",
                &["code"],
            ),
            request_failures: counters(
                &registry,
                "tokitai_request_failures_total",
                "Requests that got no model answer, by route and reason.",
                &["route", "reason"],
            ),
            request_duration: histograms(
                &registry,
                "tokitai_request_duration_seconds",
                "Time from request start to answer, by route.",
                lat.clone(),
                &["route"],
            ),
            inflight_requests: reg(
                &registry,
                IntGauge::new(
                    "tokitai_inflight_requests",
                    "Inference requests accepted and not yet answered.",
                ),
            ),
            auth_failures,
            trace_spans_dropped,
            model_info: model.info,
            model_load_seconds: model.load_seconds,
            model_version: model.version,
            model_loads: model.loads,
            model_load_failures: model.load_failures,
            build_info: int_gauges(
                &registry,
                "tokitai_build_info",
                "Build of the engine (value 1).",
                &["version"],
            ),
            ready: reg(
                &registry,
                IntGauge::new(
                    "tokitai_ready",
                    "1 when the model is loaded, workers warmed up and not draining.",
                ),
            ),
            device_memory_bytes: gauges(
                &registry,
                "tokitai_device_memory_used_bytes",
                "Memory used on each compute device.",
                &["device"],
            ),
            families: VersionFamilies::register(&registry),
            registry,
            owners: Mutex::new(HashMap::new()),
            next_owner: AtomicU64::new(0),
        };
        metrics.init_series();
        metrics
    }

    /// The process collector, the build's info, and the request failure
    /// series at zero (rather than gaps before the first failure).
    fn init_series(&self) {
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            self.registry
                .register(Box::new(pc))
                .expect("process collector registered once");
        }
        self.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for reason in FailureReason::ALL {
            self.request_failures
                .with_label_values(&[Route::Infer.as_str(), reason.as_str()]);
        }
        for reason in AuthFailure::ALL {
            self.auth_failures.with_label_values(&[reason.as_str()]);
        }
    }

    /// Whether request metrics are recorded (`metrics.record`).
    pub fn is_recording(&self) -> bool {
        self.recording
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

    /// A version of `model` took `took` to load and prepare.
    pub fn model_load_time(&self, model: &str, took: Duration) {
        self.model_load_seconds
            .with_label_values(&[model])
            .set(took.as_secs_f64());
    }

    /// `info` is now the version its model serves, in place of `previous`
    /// (whose info series is removed: only served versions have one).
    pub fn model_served(&self, info: &ModelInfo, previous: Option<&ModelInfo>) {
        if let Some(p) = previous {
            self.model_retired(p);
        }
        self.model_loads.with_label_values(&[&info.model]).inc();
        self.model_version
            .with_label_values(&[&info.model])
            .set(info.version as i64);
        self.model_info.with_label_values(&info.labels()).set(1);
    }

    /// Version `info` no longer serves: its info series goes (its other
    /// series, answers included, go when it retires: `VersionMetrics::remove`).
    pub fn model_retired(&self, info: &ModelInfo) {
        let _ = self.model_info.remove_label_values(&info.labels());
    }

    /// The model was unloaded (serves no version): its version gauge goes.
    pub fn model_unloaded(&self, info: &ModelInfo) {
        self.model_retired(info);
        let _ = self.model_version.remove_label_values(&[&info.model]);
    }

    /// `tokitai_ready`: whether the server takes inference requests now.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// `tokitai_device_memory_used_bytes` of one compute device.
    pub fn set_device_memory(&self, device: &str, bytes: u64) {
        self.device_memory_bytes.with_label_values(&[device]).set(bytes as f64);
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

    /// One request refused by the API-key check. Counted even when
    /// `metrics.record` is off: refusals are a security signal.
    pub fn observe_auth_failure(&self, reason: AuthFailure) {
        self.auth_failures.with_label_values(&[reason.as_str()]).inc();
    }

    /// `n` trace spans that will never be exported.
    pub fn trace_spans_dropped(&self, n: u64) {
        self.trace_spans_dropped.inc_by(n);
    }

    /// An inference request was accepted (+1) or finished (-1).
    pub fn add_inflight(&self, delta: i64) {
        if self.recording {
            self.inflight_requests.add(delta);
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
}

/// Registers `metric` in `registry`: every definition is static and valid,
/// and registered once.
fn reg<C: Collector + Clone + 'static>(registry: &Registry, metric: prometheus::Result<C>) -> C {
    let metric = metric.expect("metric definitions are static and valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

/// The API-key refusals and the trace spans dropped (server-wide).
fn guard_families(registry: &Registry) -> (IntCounterVec, prometheus::IntCounter) {
    let auth_failures = counters(
        registry,
        "tokitai_auth_failures_total",
        "Requests refused by the API-key check (server.api_keys_file), by reason.",
        &["reason"],
    );
    let trace_spans_dropped = reg(
        registry,
        prometheus::IntCounter::new(
            "tokitai_trace_spans_dropped_total",
            "Trace spans dropped because the export queue (tracing.max_queue_spans) was full or the export failed.",
        ),
    );
    (auth_failures, trace_spans_dropped)
}

fn counters(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(r, IntCounterVec::new(Opts::new(name, help), labels))
}

fn float_counters(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::CounterVec {
    reg(r, prometheus::CounterVec::new(Opts::new(name, help), labels))
}

fn int_gauges(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    reg(r, IntGaugeVec::new(Opts::new(name, help), labels))
}

fn gauges(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    reg(r, GaugeVec::new(Opts::new(name, help), labels))
}

fn histograms(r: &Registry, name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]) -> HistogramVec {
    reg(
        r,
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels),
    )
}

/// The per-model families (they survive version changes).
struct ModelFamilies {
    info: IntGaugeVec,
    load_seconds: GaugeVec,
    version: IntGaugeVec,
    loads: IntCounterVec,
    load_failures: IntCounterVec,
}

impl ModelFamilies {
    fn register(registry: &Registry) -> ModelFamilies {
        ModelFamilies {
            info: int_gauges(
                registry,
                "tokitai_model_info",
                "Each served model version (value 1).",
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
                    "isa",
                ],
            ),
            load_seconds: gauges(
                registry,
                "tokitai_model_load_seconds",
                "Time taken to load and prepare each model's most recently loaded version.",
                &["model"],
            ),
            version: int_gauges(
                registry,
                "tokitai_model_version",
                "The version each loaded model serves (its repository folder, or the checkpoint's step).",
                &["model"],
            ),
            loads: counters(
                registry,
                "tokitai_model_loads_total",
                "Model versions loaded and put in service, by model.",
                &["model"],
            ),
            load_failures: counters(
                registry,
                "tokitai_model_load_failures_total",
                "Model versions that failed to load (bad files, bad arch, failed warm-up); the previous version kept serving.",
                &["model"],
            ),
        }
    }
}

/// The families whose series belong to one model version each (labels
/// `model`, `version` first).
struct VersionFamilies {
    /// Queue, admission and answers.
    queue: QueueFamilies,
    /// Workers and the batches they compute.
    work: WorkFamilies,
}

/// A version's queue, admission and answer families.
struct QueueFamilies {
    queue_wait: HistogramVec,
    queue_rejections: IntCounterVec,
    rows_dropped: IntCounterVec,
    queue_depth_rows: IntGaugeVec,
    workers: IntGaugeVec,
    model_answers: IntCounterVec,
    config_max_queue_rows: IntGaugeVec,
    config_max_batch_rows: IntGaugeVec,
}

/// A version's worker and batch families.
struct WorkFamilies {
    compute_time: HistogramVec,
    rows_computed: IntCounterVec,
    batches: IntCounterVec,
    batch_rows: HistogramVec,
    batch_requests: HistogramVec,
    worker_busy: prometheus::CounterVec,
    worker_restarts: IntCounterVec,
    expert_rows: IntCounterVec,
    router_top1_weight: HistogramVec,
}

impl VersionFamilies {
    fn register(registry: &Registry) -> VersionFamilies {
        VersionFamilies {
            queue: QueueFamilies::register(registry),
            work: WorkFamilies::register(registry),
        }
    }
}

impl QueueFamilies {
    fn register(registry: &Registry) -> QueueFamilies {
        let lat = latency_buckets();
        QueueFamilies {
            queue_wait: histograms(
                registry,
                "tokitai_queue_wait_seconds",
                "Time a request's rows waited before their batch started, by model version and priority level.",
                lat.clone(),
                &LEVEL,
            ),
            queue_rejections: counters(
                registry,
                "tokitai_queue_rejections_total",
                "Requests refused at once because their priority level's queue was full (429 / UNAVAILABLE), by model version and priority level.",
                &LEVEL,
            ),
            rows_dropped: counters(
                registry,
                "tokitai_rows_dropped_total",
                "Queued rows dropped before compute, by model version and reason.",
                &["model", "version", "reason"],
            ),
            queue_depth_rows: int_gauges(
                registry,
                "tokitai_queue_depth_rows",
                "Rows waiting in a model version's batcher queue, by priority level.",
                &LEVEL,
            ),
            workers: int_gauges(
                registry,
                "tokitai_workers",
                "Worker actors (sessions) in a model version's pool.",
                &VERSION,
            ),
            model_answers: counters(
                registry,
                "tokitai_model_answers_total",
                "Inference requests answered, by the model and version that computed them.",
                &["model", "version"],
            ),
            config_max_queue_rows: int_gauges(
                registry,
                "tokitai_queue_capacity_rows",
                "A model version's batching.max_queue_rows, by priority level (its [batching.levels.N] max_queue_rows).",
                &LEVEL,
            ),
            config_max_batch_rows: int_gauges(
                registry,
                "tokitai_max_batch_rows",
                "A model version's batching.max_batch_rows.",
                &VERSION,
            ),
        }
    }
}

impl WorkFamilies {
    fn register(registry: &Registry) -> WorkFamilies {
        let lat = latency_buckets();
        WorkFamilies {
            compute_time: histograms(
                registry,
                "tokitai_compute_seconds",
                "Forward time of one batch on a worker, by model version.",
                lat.clone(),
                &VERSION,
            ),
            rows_computed: counters(
                registry,
                "tokitai_rows_computed_total",
                "Rows computed, by model version and worker.",
                &["model", "version", "worker"],
            ),
            batches: counters(
                registry,
                "tokitai_batches_total",
                "Batches computed, by model version and worker.",
                &["model", "version", "worker"],
            ),
            batch_rows: histograms(
                registry,
                "tokitai_batch_size_rows",
                "Rows per computed batch, by model version.",
                pow2_buckets(),
                &VERSION,
            ),
            batch_requests: histograms(
                registry,
                "tokitai_batch_size_requests",
                "Requests (or request parts) per computed batch, by model version.",
                pow2_buckets(),
                &VERSION,
            ),
            worker_busy: float_counters(
                registry,
                "tokitai_worker_busy_seconds_total",
                "Seconds each worker spent computing, by model version and worker; rate() is utilisation.",
                &["model", "version", "worker"],
            ),
            worker_restarts: counters(
                registry,
                "tokitai_worker_restarts_total",
                "Worker sessions rebuilt after a fault while computing a batch, or worker actors replaced after one ended, by model version and worker.",
                &["model", "version", "worker"],
            ),
            expert_rows: counters(
                registry,
                "tokitai_expert_rows_total",
                "Rows routed to each expert, by model version (each row counts once per selected expert).",
                &["model", "version", "expert"],
            ),
            router_top1_weight: histograms(
                registry,
                "tokitai_router_top1_weight",
                "The router's largest expert weight per row (its confidence), by model version.",
                vec![0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0],
                &VERSION,
            ),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// What `tokitai_model_info` says of one served version: its label values,
/// as neutral text (the served version builds it from its description).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub model: String,
    pub version: u64,
    pub size: String,
    pub layernorm: String,
    pub weight_precision: String,
    pub param_count: u64,
    pub checkpoint: String,
    pub backend: String,
    pub devices: String,
    pub isa: String,
}

impl ModelInfo {
    /// The `tokitai_model_info` label values, in its label order.
    fn labels(&self) -> [String; 10] {
        [
            self.model.clone(),
            self.version.to_string(),
            self.size.clone(),
            self.layernorm.clone(),
            self.weight_precision.clone(),
            self.param_count.to_string(),
            self.checkpoint.clone(),
            self.backend.clone(),
            self.devices.clone(),
            self.isa.clone(),
        ]
    }
}

/// The shape of one served version, as its metrics need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionShape {
    pub model: String,
    pub version: u64,
    pub workers: usize,
    pub experts: usize,
    pub max_queue_rows: usize,
    pub max_batch_rows: usize,
}

/// One served version's series: every per-version family labelled
/// `{model, version}`, created when the version is built (zeros rather than
/// gaps), recorded into by its engine path, batcher and workers, and removed
/// by [`VersionMetrics::remove`] when the version retires. Cheap to share
/// (`Arc`); the hot paths hold resolved handles, never label lookups.
pub struct VersionMetrics {
    metrics: Arc<Metrics>,
    shape: VersionShape,
    /// The label value of `shape.version`.
    version: String,
    /// This handle's claim on the `{model, version}` pair (see `owners`).
    owner: u64,
    recording: bool,
    /// Level `i + 1`'s queue series.
    levels: Vec<LevelHandles>,
    answers: IntCounter,
    dropped: DropCounters,
}

/// One priority level's queue series of a version.
struct LevelHandles {
    depth: IntGauge,
    wait: Histogram,
    rejections: IntCounter,
}

impl VersionMetrics {
    /// The series of the version `shape` describes with one priority level
    /// (its capacity `shape.max_queue_rows`).
    pub fn new(metrics: &Arc<Metrics>, shape: VersionShape) -> Arc<VersionMetrics> {
        let capacity = [shape.max_queue_rows];
        VersionMetrics::with_levels(metrics, shape, &capacity)
    }

    /// The series of the version `shape` describes, created now (gauges set
    /// to its pool and policy; counters at zero), with one set of queue
    /// series per priority level, `level_queue_rows[i]` level `i + 1`'s
    /// `max_queue_rows` (at least one level).
    pub fn with_levels(metrics: &Arc<Metrics>, shape: VersionShape, level_queue_rows: &[usize]) -> Arc<VersionMetrics> {
        let m = metrics;
        let version = shape.version.to_string();
        let v = [shape.model.as_str(), version.as_str()];
        // Held while the series are made, so a retiring or replaced handle
        // of the same pair cannot remove them halfway.
        let mut owners = m.owners.lock();
        let owner = m.next_owner.fetch_add(1, Ordering::Relaxed);
        if let Some(previous) = owners.insert((shape.model.clone(), shape.version), owner) {
            // A version re-read under the same number takes the pair over.
            // The one it replaces may still be finishing requests: its
            // series go first, so its batcher and workers record into
            // detached handles, never into the new version's gauges.
            tracing::debug!(model = %shape.model, version, previous, "version series taken over");
            remove_series(m, &shape, &version);
        }
        m.families.queue.workers.with_label_values(&v).set(shape.workers as i64);
        let levels = level_handles(m, v, level_queue_rows);
        m.families
            .queue
            .config_max_batch_rows
            .with_label_values(&v)
            .set(shape.max_batch_rows as i64);
        for h in [
            &m.families.work.compute_time,
            &m.families.work.batch_rows,
            &m.families.work.batch_requests,
            &m.families.work.router_top1_weight,
        ] {
            h.with_label_values(&v);
        }
        let handle = VersionMetrics {
            levels,
            answers: m.families.queue.model_answers.with_label_values(&v),
            dropped: DropCounters {
                recording: m.recording,
                by_reason: DropReason::ALL
                    .iter()
                    .map(|r| {
                        m.families
                            .queue
                            .rows_dropped
                            .with_label_values(&[v[0], v[1], r.as_str()])
                    })
                    .collect(),
            },
            recording: m.recording,
            metrics: Arc::clone(m),
            owner,
            version,
            shape,
        };
        for id in 0..handle.shape.workers {
            drop(handle.worker_handles(id));
        }
        drop(owners);
        Arc::new(handle)
    }

    /// The model and version these series are labelled with.
    pub fn shape(&self) -> &VersionShape {
        &self.shape
    }

    fn labels(&self) -> [&str; 2] {
        [self.shape.model.as_str(), self.version.as_str()]
    }

    /// Level `level`'s series (clamped to the levels there are).
    fn level(&self, level: u32) -> &LevelHandles {
        let i = (level.max(1) as usize - 1).min(self.levels.len() - 1);
        &self.levels[i]
    }

    /// Rows waiting in this version's level-1 queue now (a one-level version).
    pub fn set_queue_depth(&self, rows: usize) {
        self.set_level_depths(&[rows]);
    }

    /// Rows waiting at each priority level now, level 1 first.
    pub fn set_level_depths(&self, rows_by_level: &[usize]) {
        if self.recording {
            for (handles, &rows) in self.levels.iter().zip(rows_by_level) {
                handles.depth.set(rows as i64);
            }
        }
    }

    /// Time a level-1 request waited (a one-level version; see
    /// [`VersionMetrics::observe_level_queue_wait`]).
    pub fn observe_queue_wait(&self, wait: Duration) {
        self.observe_level_queue_wait(1, wait);
    }

    /// Time a request at priority `level` waited before its first rows
    /// started computing.
    pub fn observe_level_queue_wait(&self, level: u32, wait: Duration) {
        if self.recording {
            self.level(level).wait.observe(wait.as_secs_f64());
        }
    }

    /// A request at priority `level` was refused: its level's queue was full.
    pub fn count_rejection(&self, level: u32) {
        if self.recording {
            self.level(level).rejections.inc();
        }
    }

    /// One request answered by this version.
    pub fn count_answer(&self) {
        if self.recording {
            self.answers.inc();
        }
    }

    /// The counters of rows dropped before compute, one per reason (the
    /// batcher and each worker hold a copy).
    pub fn drop_counters(&self) -> DropCounters {
        self.dropped.clone()
    }

    /// Whether these series are still this handle's (not retired, not taken
    /// over by a re-read of the same version); `owners` is the map, locked.
    fn owns(&self, owners: &HashMap<(String, u64), u64>) -> bool {
        owners.get(&(self.shape.model.clone(), self.shape.version)) == Some(&self.owner)
    }

    /// Worker `id`'s actor was replaced after it ended (nothing once the
    /// version retired: its series are gone and stay gone).
    pub fn worker_restarted(&self, id: usize) {
        let owners = self.metrics.owners.lock();
        if !self.owns(&owners) {
            return;
        }
        let [model, version] = self.labels();
        self.metrics
            .families
            .work
            .worker_restarts
            .with_label_values(&[model, version, &id.to_string()])
            .inc();
    }

    /// The handles worker `id` records into, resolved once so the per-batch
    /// path does no label lookups or allocation. A replacement worker
    /// started as its version retires gets detached handles: the retired
    /// version's series are not made again.
    pub fn worker(&self, id: usize) -> WorkerMetrics {
        let owners = self.metrics.owners.lock();
        if self.owns(&owners) {
            self.worker_handles(id)
        } else {
            WorkerMetrics::detached(self.drop_counters())
        }
    }

    /// Worker `id`'s handles, made (or found) in the families.
    fn worker_handles(&self, id: usize) -> WorkerMetrics {
        let m = &self.metrics;
        let [model, version] = self.labels();
        let worker = id.to_string();
        let w = [model, version, worker.as_str()];
        WorkerMetrics {
            recording: self.recording,
            dropped: self.drop_counters(),
            rows: m.families.work.rows_computed.with_label_values(&w),
            batches: m.families.work.batches.with_label_values(&w),
            busy: m.families.work.worker_busy.with_label_values(&w),
            restarts: m.families.work.worker_restarts.with_label_values(&w),
            experts: (0..self.shape.experts)
                .map(|e| {
                    m.families
                        .work
                        .expert_rows
                        .with_label_values(&[model, version, &e.to_string()])
                })
                .collect(),
            batch_rows: m.families.work.batch_rows.with_label_values(&[model, version]),
            batch_requests: m.families.work.batch_requests.with_label_values(&[model, version]),
            compute: m.families.work.compute_time.with_label_values(&[model, version]),
            top1: m.families.work.router_top1_weight.with_label_values(&[model, version]),
        }
    }

    /// The version retired: every one of its series goes from `/metrics`
    /// (handles still held record into nothing). A version that was
    /// replaced by a re-read under the same number leaves the series to it.
    pub fn remove(&self) {
        let mut owners = self.metrics.owners.lock();
        if !self.owns(&owners) {
            return;
        }
        owners.remove(&(self.shape.model.clone(), self.shape.version));
        remove_series(&self.metrics, &self.shape, &self.version);
    }
}

/// Removes every series of the version `shape` describes (`version` its
/// label value). Called with `owners` locked.
fn remove_series(m: &Metrics, shape: &VersionShape, version: &str) {
    let v = [shape.model.as_str(), version];
    for g in [&m.families.queue.workers, &m.families.queue.config_max_batch_rows] {
        let _ = g.remove_label_values(&v);
    }
    remove_level_series(m, v);
    let _ = m.families.queue.model_answers.remove_label_values(&v);
    for h in [
        &m.families.work.compute_time,
        &m.families.work.batch_rows,
        &m.families.work.batch_requests,
        &m.families.work.router_top1_weight,
    ] {
        let _ = h.remove_label_values(&v);
    }
    for reason in DropReason::ALL {
        let _ = m
            .families
            .queue
            .rows_dropped
            .remove_label_values(&[v[0], v[1], reason.as_str()]);
    }
    for id in 0..shape.workers {
        remove_worker_series(m, v, id, shape.experts);
    }
}

/// Level series for a version `v` (`[model, version]`) with one level per
/// entry of `level_queue_rows` (its capacity), made now: capacity set,
/// depth, wait and rejections at zero.
fn level_handles(m: &Metrics, v: [&str; 2], level_queue_rows: &[usize]) -> Vec<LevelHandles> {
    let q = &m.families.queue;
    let capacities = if level_queue_rows.is_empty() {
        &[0][..]
    } else {
        level_queue_rows
    };
    capacities
        .iter()
        .enumerate()
        .map(|(i, &capacity)| {
            let level = (i + 1).to_string();
            let l = [v[0], v[1], level.as_str()];
            q.config_max_queue_rows.with_label_values(&l).set(capacity as i64);
            LevelHandles {
                depth: q.queue_depth_rows.with_label_values(&l),
                wait: q.queue_wait.with_label_values(&l),
                rejections: q.queue_rejections.with_label_values(&l),
            }
        })
        .collect()
}

/// Removes the per-level queue series of version `v`, whatever number of
/// levels it had (a version re-read under the same number may have had
/// another).
fn remove_level_series(m: &Metrics, v: [&str; 2]) {
    let q = &m.families.queue;
    for level in 1..=crate::config::MAX_PRIORITY_LEVELS {
        let level = level.to_string();
        let l = [v[0], v[1], level.as_str()];
        let _ = q.queue_depth_rows.remove_label_values(&l);
        let _ = q.config_max_queue_rows.remove_label_values(&l);
        let _ = q.queue_wait.remove_label_values(&l);
        let _ = q.queue_rejections.remove_label_values(&l);
    }
}

/// Removes worker `id`'s series of version `v` (`[model, version]`), and
/// the version's expert series (which every worker records into).
fn remove_worker_series(m: &Metrics, v: [&str; 2], id: usize, experts: usize) {
    let w = [v[0], v[1], &id.to_string()];
    let _ = m.families.work.rows_computed.remove_label_values(&w);
    let _ = m.families.work.batches.remove_label_values(&w);
    let _ = m.families.work.worker_busy.remove_label_values(&w);
    let _ = m.families.work.worker_restarts.remove_label_values(&w);
    for e in 0..experts {
        let _ = m
            .families
            .work
            .expert_rows
            .remove_label_values(&[v[0], v[1], &e.to_string()]);
    }
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

/// One worker's metric handles (see [`VersionMetrics::worker`]).
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
    /// Handles in no registry, recording nothing: for a worker of a version
    /// whose series are gone (retired, or taken over by a re-read of the
    /// same version, whose series these must not touch).
    fn detached(dropped: DropCounters) -> WorkerMetrics {
        let counter = || IntCounter::new("tokitai_detached", "a retired version's").expect("a valid name");
        let histogram = || {
            Histogram::with_opts(HistogramOpts::new("tokitai_detached", "a retired version's")).expect("a valid name")
        };
        WorkerMetrics {
            recording: false,
            dropped,
            rows: counter(),
            batches: counter(),
            busy: Counter::new("tokitai_detached", "a retired version's").expect("a valid name"),
            restarts: counter(),
            experts: Vec::new(),
            batch_rows: histogram(),
            batch_requests: histogram(),
            compute: histogram(),
            top1: histogram(),
        }
    }

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

    fn shape(model: &str, version: u64) -> VersionShape {
        VersionShape {
            model: model.into(),
            version,
            workers: 2,
            experts: 4,
            max_queue_rows: 100,
            max_batch_rows: 10,
        }
    }

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.render()).unwrap()
    }

    #[test]
    fn exposition_has_every_family_and_no_user_labels() {
        let m = Arc::new(Metrics::new());
        let v = VersionMetrics::new(&m, shape("a", 3));
        m.observe_request(Route::Infer, "200", Duration::from_micros(50));
        m.observe_request(Route::from_template("/../etc/passwd"), "404", Duration::from_micros(5));
        v.drop_counters().add(DropReason::Failed, 3);
        let w = v.worker(0);
        w.observe_batch(3, 2, Duration::from_micros(100));
        w.observe_routing(&[0, 1, 0, 2], &[0.6, 0.4, 0.0, 0.0, 0.7, 0.0, 0.3, 0.0], 4);
        let text = text(&m);
        for name in [
            "tokitai_http_requests_total{route=\"/infer\",status=\"200\"} 1",
            "tokitai_http_requests_total{route=\"other\",status=\"404\"} 1",
            "tokitai_expert_rows_total{expert=\"0\",model=\"a\",version=\"3\"} 2",
            "tokitai_expert_rows_total{expert=\"3\",model=\"a\",version=\"3\"} 0",
            "tokitai_batch_size_rows_bucket{model=\"a\",version=\"3\",le=\"4\"} 1",
            "tokitai_router_top1_weight_count{model=\"a\",version=\"3\"} 2",
            "tokitai_workers{model=\"a\",version=\"3\"} 2",
            "tokitai_queue_capacity_rows{model=\"a\",priority=\"1\",version=\"3\"} 100",
            "tokitai_queue_rejections_total{model=\"a\",priority=\"1\",version=\"3\"} 0",
            "tokitai_max_batch_rows{model=\"a\",version=\"3\"} 10",
            "tokitai_batches_total{model=\"a\",version=\"3\",worker=\"1\"} 0",
            "tokitai_rows_dropped_total{model=\"a\",reason=\"failed\",version=\"3\"} 3",
            "tokitai_rows_dropped_total{model=\"a\",reason=\"timeout\",version=\"3\"} 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(!text.contains("passwd"));
    }

    #[test]
    fn two_versions_have_their_own_series_and_retiring_one_removes_only_its() {
        let m = Arc::new(Metrics::new());
        let a = VersionMetrics::new(&m, shape("a", 1));
        let b = VersionMetrics::new(
            &m,
            VersionShape {
                workers: 1,
                ..shape("b", 7)
            },
        );
        a.set_queue_depth(5);
        b.set_queue_depth(2);
        a.worker(0).observe_batch(3, 1, Duration::from_micros(10));
        b.worker(0).observe_batch(1, 1, Duration::from_micros(10));
        b.worker(0).observe_batch(1, 1, Duration::from_micros(10));
        b.worker_restarted(0);
        b.observe_queue_wait(Duration::from_micros(3));
        let t = text(&m);
        for line in [
            "tokitai_queue_depth_rows{model=\"a\",priority=\"1\",version=\"1\"} 5",
            "tokitai_queue_depth_rows{model=\"b\",priority=\"1\",version=\"7\"} 2",
            "tokitai_workers{model=\"b\",version=\"7\"} 1",
            "tokitai_batches_total{model=\"a\",version=\"1\",worker=\"0\"} 1",
            "tokitai_batches_total{model=\"b\",version=\"7\",worker=\"0\"} 2",
            "tokitai_worker_restarts_total{model=\"a\",version=\"1\",worker=\"0\"} 0",
            "tokitai_worker_restarts_total{model=\"b\",version=\"7\",worker=\"0\"} 1",
            "tokitai_queue_wait_seconds_count{model=\"a\",priority=\"1\",version=\"1\"} 0",
            "tokitai_queue_wait_seconds_count{model=\"b\",priority=\"1\",version=\"7\"} 1",
        ] {
            assert!(t.contains(line), "missing {line} in\n{t}");
        }
        a.remove();
        let t = text(&m);
        assert!(!t.contains("model=\"a\""), "a's series are gone:\n{t}");
        assert!(
            t.contains("tokitai_batches_total{model=\"b\",version=\"7\",worker=\"0\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("tokitai_queue_depth_rows{model=\"b\",priority=\"1\",version=\"7\"} 2"),
            "{t}"
        );
    }

    #[test]
    fn a_version_replaced_under_the_same_number_leaves_the_series_to_its_successor() {
        let m = Arc::new(Metrics::new());
        let old = VersionMetrics::new(&m, shape("a", 1));
        let new = VersionMetrics::new(&m, shape("a", 1));
        new.worker(1).observe_batch(2, 1, Duration::from_micros(10));
        old.remove();
        let t = text(&m);
        assert!(
            t.contains("tokitai_batches_total{model=\"a\",version=\"1\",worker=\"1\"} 1"),
            "{t}"
        );
        new.remove();
        assert!(!text(&m).contains("model=\"a\""));
    }

    #[test]
    fn a_replaced_or_retired_version_records_into_nothing_and_makes_no_series_again() {
        let m = Arc::new(Metrics::new());
        let old = VersionMetrics::new(&m, shape("a", 1));
        let old_worker = old.worker(0);
        let new = VersionMetrics::new(&m, shape("a", 1));
        new.set_queue_depth(7);
        // The replaced version, still finishing: none of it reaches the
        // successor's series.
        old.set_queue_depth(0);
        old_worker.observe_batch(5, 1, Duration::from_micros(10));
        old.worker_restarted(0);
        let t = text(&m);
        for line in [
            "tokitai_queue_depth_rows{model=\"a\",priority=\"1\",version=\"1\"} 7",
            "tokitai_batches_total{model=\"a\",version=\"1\",worker=\"0\"} 0",
            "tokitai_worker_restarts_total{model=\"a\",version=\"1\",worker=\"0\"} 0",
        ] {
            assert!(t.contains(line), "missing {line} in\n{t}");
        }
        // A worker replaced after its version retired gets no series back.
        new.remove();
        let late = new.worker(0);
        late.observe_batch(1, 1, Duration::from_micros(10));
        new.worker_restarted(0);
        assert!(!text(&m).contains("model=\"a\""), "{}", text(&m));
    }

    #[test]
    fn per_model_load_series_survive_a_version_change() {
        let m = Metrics::new();
        let info = |version| ModelInfo {
            model: "a".into(),
            version,
            size: "Nano".into(),
            layernorm: "identity".into(),
            weight_precision: "f32".into(),
            param_count: 1,
            checkpoint: "x".into(),
            backend: "cpu".into(),
            devices: "cpu".into(),
            isa: "avx2".into(),
        };
        m.model_known("a");
        m.model_served(&info(1), None);
        m.model_load_time("a", Duration::from_millis(5));
        m.model_served(&info(2), Some(&info(1)));
        let t = text(&m);
        assert!(t.contains("tokitai_model_loads_total{model=\"a\"} 2"), "{t}");
        assert!(t.contains("tokitai_model_version{model=\"a\"} 2"), "{t}");
        assert!(t.contains("tokitai_model_load_seconds{model=\"a\"} 0.005"), "{t}");
        assert!(!t.contains("model_version=\"1\""), "{t}");
        m.model_unloaded(&info(2));
        let t = text(&m);
        assert!(!t.contains("tokitai_model_version{"), "{t}");
        assert!(t.contains("tokitai_model_loads_total{model=\"a\"} 2"), "{t}");
    }

    #[test]
    fn recording_off_records_nothing() {
        let mut m = Metrics::new();
        m.set_recording(false);
        let m = Arc::new(m);
        let v = VersionMetrics::new(
            &m,
            VersionShape {
                workers: 1,
                ..shape("a", 1)
            },
        );
        m.observe_request(Route::Infer, "200", Duration::from_micros(50));
        v.drop_counters().add(DropReason::Timeout, 3);
        let w = v.worker(0);
        w.observe_batch(3, 2, Duration::from_micros(100));
        w.observe_routing(&[0, 1], &[0.6, 0.4, 0.0, 0.0], 4);
        let text = text(&m);
        assert!(!text.contains("tokitai_http_requests_total{"));
        assert!(text.contains("tokitai_rows_computed_total{model=\"a\",version=\"1\",worker=\"0\"} 0"));
        assert!(text.contains("tokitai_router_top1_weight_count{model=\"a\",version=\"1\"} 0"));
        assert!(text.contains("tokitai_rows_dropped_total{model=\"a\",reason=\"timeout\",version=\"1\"} 0"));
    }

    #[test]
    fn queue_series_are_per_priority_level_and_all_go_with_the_version() {
        let m = Arc::new(Metrics::new());
        let v = VersionMetrics::with_levels(&m, shape("a", 1), &[100, 30]);
        v.set_level_depths(&[4, 9]);
        v.observe_level_queue_wait(2, Duration::from_micros(40));
        v.count_rejection(2);
        // A level past the last is clamped, never a new series.
        v.count_rejection(9);
        let t = text(&m);
        for line in [
            "tokitai_queue_depth_rows{model=\"a\",priority=\"1\",version=\"1\"} 4",
            "tokitai_queue_depth_rows{model=\"a\",priority=\"2\",version=\"1\"} 9",
            "tokitai_queue_capacity_rows{model=\"a\",priority=\"2\",version=\"1\"} 30",
            "tokitai_queue_wait_seconds_count{model=\"a\",priority=\"1\",version=\"1\"} 0",
            "tokitai_queue_wait_seconds_count{model=\"a\",priority=\"2\",version=\"1\"} 1",
            "tokitai_queue_rejections_total{model=\"a\",priority=\"2\",version=\"1\"} 2",
        ] {
            assert!(t.contains(line), "missing {line} in\n{t}");
        }
        assert!(!t.contains("priority=\"3\""), "{t}");
        v.remove();
        assert!(!text(&m).contains("model=\"a\""), "{}", text(&m));
    }

    #[test]
    fn latency_buckets_span_10us_to_10s() {
        let b = latency_buckets();
        assert!((b[0] - 1e-5).abs() < 1e-12);
        assert_eq!(*b.last().unwrap(), 10.0);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }
}
