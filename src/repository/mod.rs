//! The model repository: which models and versions exist on disk, which one
//! of each serves, and how a new version replaces it without a lost request.
//!
//! Owns: the on-disk layout (Triton's: `DIR/<model>/<version>/arch.json` and
//! `checkpoint.tkp1`, an optional `DIR/<model>/config.toml`) in [`layout`];
//! a model's own settings file in [`model_config`]; the index entries and
//! their states in [`index`]; the served version of each model and the one
//! atomic switch between versions in [`registry`]; and when and what to load
//! or unload (start-up, SIGHUP, polling, the load/unload API) in
//! [`controller`]. The old `--arch/--checkpoint` flags and the demo model are
//! a repository of one model with one version (its checkpoint step).
//!
//! Layer: below the engine facade (which calls it), above `served/` (which
//! it calls down into to build, start and retire versions); it never
//! imports the engine. Must not touch: requests (the engine resolves a
//! target through the registry, then submits to that version's batcher),
//! how a version is built or retired (`served/`), status codes (each
//! protocol maps [`RepositoryError`] in its one place).

pub mod controller;
pub mod index;
pub mod layout;
pub mod model_config;
pub mod registry;

pub use self::controller::Controller;
pub use self::index::IndexEntry;
pub use self::registry::Registry;

use crate::config::ControlMode;

/// Why a repository request (load, unload, index) failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RepositoryError {
    /// No such model folder in the repository (or not the served model);
    /// `action` is what was asked (`load` or `unload`).
    #[error("failed to {action} '{model}': no such model in the model repository")]
    UnknownModel { action: &'static str, model: String },
    /// Load and unload are for `explicit` mode only.
    #[error(
        "explicit model load / unload is not allowed in model control mode `{}` (start with --model-control-mode explicit)",
        .0.as_str()
    )]
    NotAllowed(ControlMode),
    /// The new version did not load; whatever served before still serves.
    #[error("load failed for model '{model}': {reason}")]
    LoadFailed { model: String, reason: String },
    /// Shutting down: nothing is loaded any more.
    #[error("the server is shutting down")]
    Draining,
    /// The repository folder could not be read.
    #[error("model repository {0}")]
    Unreadable(String),
}
