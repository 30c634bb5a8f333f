//! OpenTelemetry traces: the exporter's start and stop.
//!
//! Owns: [`Telemetry`] (the OTLP/HTTP exporter of `[tracing]`, started
//! with the server and flushed at its end). Must not touch: what a span
//! records (the engine and the protocols make them).
// SCAFFOLD (issue 23): the tracing helper replaces this stub.

use std::sync::Arc;

use crate::config::TracingConfig;
use crate::error::StartError;
use crate::metrics::Metrics;

/// The running exporter (nothing when `tracing.otlp_endpoint` is empty).
pub struct Telemetry {}

impl Telemetry {
    /// Starts exporting as `config` says.
    pub fn start(config: &TracingConfig, metrics: &Arc<Metrics>) -> Result<Telemetry, StartError> {
        let _ = (config, metrics);
        Ok(Telemetry {})
    }

    /// Exports what is queued (within `tracing.export_timeout_ms`) and stops.
    pub fn shutdown(self) {}
}
