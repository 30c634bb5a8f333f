//! deploy/ and the monitoring around it, checked without a cluster, one
//! binary: the Kubernetes overlays, the Dockerfile and the configuration
//! they carry.
//!
//! Owns: one module per concern. Must not touch: the engine's code
//! (`tokitai_serve`); the shared harness is `tests/common`.

/// The parts of the shared harness (`tests/common`) this binary uses.
#[path = "../common"]
mod common {
    pub mod deploy;
    // ureq requests and answers, for every binary; this one uses part of them.
    #[allow(dead_code)]
    pub mod http;
    // The Prometheus text parser, for every binary; this one uses part of it.
    #[allow(dead_code)]
    pub mod prom;
    // TestServer and ProcessServer, for every binary; this one uses part of them.
    #[allow(dead_code)]
    pub mod server;

    pub use {http::*, server::*};
}

mod deploy_manifests;
