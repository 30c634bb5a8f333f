//! deploy/ and the monitoring around it, checked without a cluster, one
//! binary: the Kubernetes overlays, the Dockerfile and the configuration
//! they carry.
//!
//! Owns: one module per concern. Must not touch: the engine's code
//! (`tokitai_serve`); the shared harness is `tests/common`.

#[path = "../common/mod.rs"]
mod common;

mod deploy_manifests;
