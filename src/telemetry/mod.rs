//! OpenTelemetry traces: what a traced request records, and the exporter's
//! start and stop.
//!
//! Owns: reading a W3C `traceparent`/`tracestate` off a request
//! ([`incoming`], through the OTel `TraceContextPropagator`), the request's
//! server span ([`RequestTrace`]) and its children (queue wait, batch
//! compute, answer), their names and attribute keys; and [`Telemetry`], the
//! tracer provider of `[tracing]` (parent-based ratio sampling, the
//! bounded OTLP/HTTP export of `export.rs`), started with the server and
//! flushed at its end (one per process: the last one started is the one
//! requests use). With tracing off, [`incoming`] is one relaxed atomic
//! load and nothing is parsed or allocated. Must not touch: how a protocol
//! reads its headers (each passes a lookup), batching, status mapping.

mod export;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracer;

pub use self::export::Telemetry;

/// Span and attribute names (the README lists them).
pub mod names {
    /// The queue wait: from submission until the request's first rows computed.
    pub const QUEUE_SPAN: &str = "queue";
    /// The forward of the batch(es) that computed the request's rows.
    pub const COMPUTE_SPAN: &str = "compute";
    /// Building the answer (serialisation) once it is computed.
    pub const ANSWER_SPAN: &str = "answer";
    pub const MODEL: &str = "tokitai.model";
    pub const MODEL_VERSION: &str = "tokitai.model.version";
    /// The priority level the request was queued at (1 = highest).
    pub const PRIORITY: &str = "tokitai.priority";
    pub const ROWS: &str = "tokitai.rows";
    /// Rows of the largest batch that computed the request's rows.
    pub const BATCH_ROWS: &str = "tokitai.batch.rows";
    /// The route label of the metrics (an HTTP route template or gRPC method).
    pub const ROUTE: &str = "tokitai.route";
    pub const HTTP_METHOD: &str = "http.request.method";
    pub const HTTP_ROUTE: &str = "http.route";
    pub const HTTP_STATUS: &str = "http.response.status_code";
    pub const RPC_SYSTEM: &str = "rpc.system";
    pub const RPC_METHOD: &str = "rpc.method";
    pub const GRPC_STATUS: &str = "rpc.grpc.status_code";
}

/// Whether spans are being made (a [`Telemetry`] with an endpoint runs).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The running tracer, while [`ACTIVE`].
static TRACER: RwLock<Option<SdkTracer>> = RwLock::new(None);

/// The trace context a request arrived with (its `traceparent`, or none:
/// a new root), and the tracer to continue it with.
#[derive(Clone)]
pub struct Parent {
    cx: Context,
    tracer: SdkTracer,
}

/// What a protocol says of a request when its span starts.
pub enum Protocol {
    /// An HTTP request: its method and route template.
    Http { method: &'static str, route: &'static str },
    /// A gRPC call: its method path (`/inference.GRPCInferenceService/X`).
    Grpc { method: &'static str },
}

/// How a traced request ended.
pub enum Outcome<'a> {
    /// An HTTP status (4xx/5xx mark the span as failed, with `error`).
    Http { status: u16, error: Option<&'a str> },
    /// A gRPC status code (0 is OK), with the error's message.
    Grpc { code: i32, error: Option<&'a str> },
}

/// What the engine knows of a request once it is answered (or failed).
pub struct EngineFacts<'a> {
    pub model: &'a str,
    pub version: u64,
    /// The priority level it was queued at.
    pub level: u32,
    pub rows: usize,
    /// When the engine took it.
    pub started: Instant,
    /// `(queue_wait, compute, batch_rows)` of a computed answer.
    pub computed: Option<(Duration, Duration, usize)>,
}

/// Headers seen through a protocol's lookup (that live for `'h`).
struct Carrier<'h, F>(F, std::marker::PhantomData<&'h str>);

impl<'h, F: Fn(&str) -> Option<&'h str>> Extractor for Carrier<'h, F> {
    fn get(&self, key: &str) -> Option<&str> {
        (self.0)(key)
    }

    fn keys(&self) -> Vec<&str> {
        Vec::new()
    }
}

/// The trace context of a request whose headers `get` looks up
/// (`traceparent`, `tracestate`), or `None` when tracing is off (then
/// nothing is read).
pub fn incoming<'h>(get: impl Fn(&str) -> Option<&'h str>) -> Option<Parent> {
    if !ACTIVE.load(Ordering::Relaxed) {
        return None;
    }
    let tracer = TRACER.read().unwrap_or_else(|e| e.into_inner()).clone()?;
    let cx =
        TraceContextPropagator::new().extract_with_context(&Context::new(), &Carrier(get, std::marker::PhantomData));
    Some(Parent { cx, tracer })
}

impl Parent {
    /// Starts the request's server span; `None` when it is not sampled
    /// (the parent said so, or the ratio left it out).
    pub fn request(&self, protocol: Protocol) -> Option<RequestTrace> {
        let (name, attributes) = match protocol {
            Protocol::Http { method, route } => (
                format!("{method} {route}"),
                vec![
                    KeyValue::new(names::HTTP_METHOD, method),
                    KeyValue::new(names::HTTP_ROUTE, route),
                    KeyValue::new(names::ROUTE, route),
                ],
            ),
            Protocol::Grpc { method } => (
                method.trim_start_matches('/').to_string(),
                vec![
                    KeyValue::new(names::RPC_SYSTEM, "grpc"),
                    KeyValue::new(names::RPC_METHOD, method),
                    KeyValue::new(names::ROUTE, method),
                ],
            ),
        };
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &self.cx);
        if !span.is_recording() {
            return None;
        }
        Some(RequestTrace(Arc::new(Traced {
            cx: self.cx.with_span(span),
            tracer: self.tracer.clone(),
        })))
    }
}

/// A sampled request: its server span, parent of its other spans. A trace
/// dropped unfinished (the client left) still ends its span. One pointer:
/// what a request carries in its options.
#[derive(Clone)]
pub struct RequestTrace(Arc<Traced>);

/// The request span's context and the tracer of its children.
struct Traced {
    cx: Context,
    tracer: SdkTracer,
}

impl std::fmt::Debug for RequestTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestTrace")
            .field("span", self.0.cx.span().span_context())
            .finish()
    }
}

impl RequestTrace {
    /// Records what the engine did: the request span's model, version,
    /// priority and rows, and (for a computed answer) its queue and compute
    /// spans, placed after the fact from their measured durations.
    pub fn engine(&self, facts: &EngineFacts) {
        let common = [
            KeyValue::new(names::MODEL, facts.model.to_string()),
            KeyValue::new(names::MODEL_VERSION, facts.version as i64),
            KeyValue::new(names::PRIORITY, i64::from(facts.level)),
        ];
        let span = self.0.cx.span();
        span.set_attributes(common.iter().cloned());
        span.set_attribute(KeyValue::new(names::ROWS, facts.rows as i64));
        let Some((queue_wait, compute, batch_rows)) = facts.computed else {
            return;
        };
        let start = SystemTime::now() - facts.started.elapsed();
        self.child(names::QUEUE_SPAN, start, queue_wait, common.to_vec());
        let mut attributes = common.to_vec();
        attributes.push(KeyValue::new(names::BATCH_ROWS, batch_rows as i64));
        self.child(names::COMPUTE_SPAN, start + queue_wait, compute, attributes);
    }

    /// A finished child span from `start`, lasting `length`.
    fn child(&self, name: &'static str, start: SystemTime, length: Duration, attributes: Vec<KeyValue>) {
        let tracer = &self.0.tracer;
        let mut span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(attributes)
            .start_with_context(tracer, &self.0.cx);
        span.end_with_timestamp(start + length);
    }

    /// The answer's span: it ends when the returned guard is dropped.
    pub fn answer(&self) -> AnswerSpan {
        let tracer = &self.0.tracer;
        let span = tracer
            .span_builder(names::ANSWER_SPAN)
            .with_kind(SpanKind::Internal)
            .start_with_context(tracer, &self.0.cx);
        AnswerSpan(span)
    }

    /// Ends the request span with its status.
    pub fn finish(self, outcome: Outcome) {
        let span = self.0.cx.span();
        let (failed, error) = match outcome {
            Outcome::Http { status, error } => {
                span.set_attribute(KeyValue::new(names::HTTP_STATUS, i64::from(status)));
                (status >= 400, error)
            }
            Outcome::Grpc { code, error } => {
                span.set_attribute(KeyValue::new(names::GRPC_STATUS, i64::from(code)));
                (code != 0, error)
            }
        };
        if failed {
            let message: String = error.unwrap_or("").chars().take(512).collect();
            span.set_status(Status::error(message));
        }
        span.end();
    }
}

/// The answer's span, ended on drop.
pub struct AnswerSpan(#[allow(dead_code)] opentelemetry_sdk::trace::Span);

/// Makes `tracer` the one [`incoming`] hands out (`None`: tracing off).
fn install(tracer: Option<SdkTracer>) {
    let on = tracer.is_some();
    *TRACER.write().unwrap_or_else(|e| e.into_inner()) = tracer;
    ACTIVE.store(on, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn the_propagator_reads_a_w3c_traceparent() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let get = |k: &str| (k == "traceparent").then_some(header);
        let cx = TraceContextPropagator::new().extract(&Carrier(get, std::marker::PhantomData));
        let sc = cx.span().span_context().clone();
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
    }

    #[test]
    fn a_request_carries_one_pointer_of_trace() {
        assert_eq!(size_of::<Option<RequestTrace>>(), size_of::<usize>());
    }

    #[test]
    fn nothing_is_read_while_tracing_is_off() {
        let read = std::cell::Cell::new(false);
        let parent = incoming(|_| {
            read.set(true);
            None
        });
        assert!(parent.is_none() && !read.get());
    }
}
