//! The export of finished spans: a bounded queue and one export thread.
//!
//! Owns: [`Telemetry`] (the SDK tracer provider of `[tracing]`: service
//! name, parent-based ratio sampler, and [`BoundedProcessor`]), the queue of
//! finished spans (at most `tracing.max_queue_spans`; a span that finds it
//! full is dropped and counted in `tokitai_trace_spans_dropped_total`, never
//! waited for), and the thread that sends them in batches of at most
//! `tracing.max_export_batch_spans` with opentelemetry-otlp's OTLP/HTTP
//! protobuf exporter (a batch that fails is counted as dropped; failures
//! are logged at most once a minute), flushed on shutdown within
//! `tracing.export_timeout_ms`. The SDK's own batch processor is not used:
//! it does not say how many spans it dropped. Must not touch: what a span
//! records (`mod.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use opentelemetry::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor};

use crate::config::TracingConfig;
use crate::error::StartError;
use crate::metrics::Metrics;

/// How long a partial batch waits for more spans before it is sent.
const EXPORT_DELAY: Duration = Duration::from_secs(1);
/// At most one export-failure line per this long.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The running exporter (nothing when `tracing.otlp_endpoint` is empty).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    timeout: Duration,
}

impl Telemetry {
    /// Starts exporting as `config` says: installs the tracer the protocols
    /// continue incoming traces with. Off (nothing started, nothing
    /// installed) when no endpoint is set.
    pub fn start(config: &TracingConfig, metrics: &Arc<Metrics>) -> Result<Telemetry, StartError> {
        let timeout = Duration::from_millis(config.export_timeout_ms);
        if !config.enabled() {
            return Ok(Telemetry {
                provider: None,
                timeout,
            });
        }
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let processor = BoundedProcessor::start(config, &resource, Arc::clone(metrics))?;
        let ratio = Sampler::TraceIdRatioBased(config.sample_ratio);
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(ratio)))
            .with_resource(resource)
            .with_span_processor(processor)
            .build();
        super::install(Some(provider.tracer("tokitai-serve")));
        tracing::info!(
            endpoint = %config.otlp_endpoint,
            sample_ratio = config.sample_ratio,
            "exporting traces over OTLP/HTTP"
        );
        Ok(Telemetry {
            provider: Some(provider),
            timeout,
        })
    }

    /// Exports what is queued (within `tracing.export_timeout_ms`) and stops.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Stops making spans, then flushes and stops the export (once).
    fn stop(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        super::install(None);
        if let Err(e) = provider.shutdown_with_timeout(self.timeout) {
            tracing::warn!(error = %e, "traces not all exported at shutdown");
        }
    }
}

/// A server that failed to start after its exporter did stops it too.
impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A request of the processor to its export thread.
enum Control {
    /// Send everything queued, then answer.
    Flush(Sender<()>),
    /// Send everything queued, answer and stop.
    Shutdown(Sender<()>),
}

/// A span processor with a bounded queue that drops (and counts) rather
/// than blocks, and an export thread.
struct BoundedProcessor {
    spans: Sender<SpanData>,
    control: Sender<Control>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for BoundedProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedProcessor")
            .field("queued", &self.spans.len())
            .finish()
    }
}

impl BoundedProcessor {
    /// Builds the OTLP/HTTP exporter on a thread of its own (reqwest's
    /// blocking client must not be made or dropped on an async runtime's
    /// thread) and starts exporting there.
    fn start(config: &TracingConfig, resource: &Resource, metrics: Arc<Metrics>) -> Result<Self, StartError> {
        let (spans, queue) = bounded(config.max_queue_spans);
        let (control, orders) = bounded(1);
        let (built_tx, built) = bounded(1);
        let exporter_thread = ExportThread {
            queue,
            orders,
            batch: config.max_export_batch_spans,
            metrics: Arc::clone(&metrics),
        };
        let (endpoint, timeout) = (
            config.otlp_endpoint.clone(),
            Duration::from_millis(config.export_timeout_ms),
        );
        let resource = resource.clone();
        std::thread::Builder::new().name("otlp-export".into()).spawn(move || {
            let built = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(endpoint)
                .with_timeout(timeout)
                .build();
            match built {
                Ok(mut exporter) => {
                    exporter.set_resource(&resource);
                    let _ = built_tx.send(Ok(()));
                    exporter_thread.run(&exporter);
                }
                Err(e) => {
                    let _ = built_tx.send(Err(e.to_string()));
                }
            }
        })?;
        match built.recv() {
            Ok(Ok(())) => Ok(BoundedProcessor {
                spans,
                control,
                metrics,
            }),
            Ok(Err(e)) => Err(std::io::Error::other(format!("tracing: the OTLP/HTTP exporter: {e}")).into()),
            Err(_) => Err(std::io::Error::other("the OTLP exporter thread ended").into()),
        }
    }

    /// Asks the export thread for `order` and waits up to `timeout`.
    fn ask(&self, order: fn(Sender<()>) -> Control, timeout: Duration) -> OTelSdkResult {
        let (tx, rx) = bounded(1);
        let deadline = Instant::now() + timeout;
        self.control
            .send_deadline(order(tx), deadline)
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        rx.recv_deadline(deadline).map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        match self.spans.try_send(span) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.metrics.trace_spans_dropped(1),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Control::Flush, Duration::from_secs(30))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let result = self.ask(Control::Shutdown, timeout);
        if result.is_err() {
            // What the thread had not taken yet will not be sent now.
            self.metrics.trace_spans_dropped(self.spans.len() as u64);
        }
        result
    }
}

/// The export thread's state.
struct ExportThread {
    queue: Receiver<SpanData>,
    orders: Receiver<Control>,
    batch: usize,
    metrics: Arc<Metrics>,
}

impl ExportThread {
    /// Sends full batches as they fill, a partial one after
    /// [`EXPORT_DELAY`], everything on a flush or shutdown order.
    fn run(self, exporter: &impl SpanExporter) {
        let mut failures = Failures::default();
        let mut pending: Vec<SpanData> = Vec::with_capacity(self.batch);
        let mut due = Instant::now() + EXPORT_DELAY;
        loop {
            crossbeam_channel::select! {
                recv(self.queue) -> span => {
                    let Ok(span) = span else { return };
                    if pending.is_empty() {
                        due = Instant::now() + EXPORT_DELAY;
                    }
                    pending.push(span);
                    if pending.len() >= self.batch {
                        self.send(exporter, &mut pending, &mut failures);
                    }
                }
                recv(self.orders) -> order => {
                    let stop = matches!(order, Err(_) | Ok(Control::Shutdown(_)));
                    pending.extend(self.queue.try_iter());
                    while !pending.is_empty() {
                        self.send(exporter, &mut pending, &mut failures);
                    }
                    if let Ok(Control::Flush(done) | Control::Shutdown(done)) = order {
                        let _ = done.send(());
                    }
                    if stop {
                        let _ = exporter.shutdown();
                        return;
                    }
                }
                default(due.saturating_duration_since(Instant::now())) => {
                    if !pending.is_empty() {
                        self.send(exporter, &mut pending, &mut failures);
                    }
                    due = Instant::now() + EXPORT_DELAY;
                }
            }
        }
    }

    /// Exports up to one batch of `pending`; a failed batch is counted as
    /// dropped.
    fn send(&self, exporter: &impl SpanExporter, pending: &mut Vec<SpanData>, failures: &mut Failures) {
        let n = pending.len().min(self.batch);
        let batch: Vec<SpanData> = pending.drain(..n).collect();
        if let Err(e) = futures_executor::block_on(exporter.export(batch)) {
            self.metrics.trace_spans_dropped(n as u64);
            failures.record(n, &e);
        }
    }
}

/// Export failures since the last line about them.
#[derive(Default)]
struct Failures {
    last_logged: Option<Instant>,
    unlogged_spans: usize,
}

impl Failures {
    fn record(&mut self, spans: usize, error: &OTelSdkError) {
        self.unlogged_spans += spans;
        if self.last_logged.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return;
        }
        tracing::warn!(
            error = %error,
            dropped_spans = self.unlogged_spans,
            "trace export failed (spans dropped; logged at most once a minute)"
        );
        self.last_logged = Some(Instant::now());
        self.unlogged_spans = 0;
    }
}
