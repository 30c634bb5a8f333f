//! deploy/ and the monitoring around it, one binary: the Kubernetes
//! overlays, the Dockerfile and the configuration they carry, checked
//! without a cluster; the alert rules, dashboard and autoscaling queries
//! against a real Prometheus scraping an engine that serves two models.
//!
//! Owns: one module per concern. Must not touch: the engine's code
//! (`tokitai_serve`); the shared harness is `tests/common`.

/// The parts of the shared harness (`tests/common`) this binary uses.
#[path = "../common"]
mod common {
    pub mod deploy;
    // GETs only, answers read by status and text.
    #[allow(dead_code)]
    pub mod http;
    // Only Nano's dims, rows and bodies are read here.
    #[allow(dead_code)]
    pub mod fixtures;
    // The runtime, a client and a request (otlp_traces.rs): no raw HTTP/2.
    #[allow(dead_code)]
    pub mod grpc;
    // Sums only: no presence checks, status breakdowns or raw text.
    #[allow(dead_code)]
    pub mod prom;
    pub mod prometheus;
    // TestServer and ProcessServer (otlp_traces.rs); not every helper.
    #[allow(dead_code)]
    pub mod server;
    pub mod two_models;

    pub use {fixtures::*, http::*, prometheus::*, server::*};
}

mod autoscaling_queries;
mod deploy_manifests;
mod otlp_traces;
mod prometheus_live;
