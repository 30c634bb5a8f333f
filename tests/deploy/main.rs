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
    // GETs only, answers read by status and text.
    #[allow(dead_code)]
    pub mod http;
    // Needed by server; no metrics are read here yet.
    #[allow(dead_code)]
    pub mod prom;
    // TestServer only: no child process, no metrics.
    #[allow(dead_code)]
    pub mod server;

    pub use {http::*, server::*};
}

mod deploy_manifests;
