//! The HIP backend's stand-in when the crate is built without the `hip`
//! feature: the same API, and a constructor that always fails with
//! [`NOT_COMPILED`], so nothing outside `backend::hip` needs a `cfg`.
//!
//! Owns: only that. Must not touch: anything else.

use super::{HipOptions, NOT_COMPILED};
use crate::backend::{Backend, BackendError, Session, SessionConfig};
use crate::model::{Dims, LayerNormMode, MoeWeights};

/// Never constructed in a build without HIP support.
pub struct HipBackend {
    dims: Dims,
}

impl HipBackend {
    /// Always `Err`: this build has no HIP support.
    pub fn new(_weights: &MoeWeights, _mode: LayerNormMode, _options: &HipOptions) -> Result<HipBackend, BackendError> {
        Err(BackendError::Unavailable(NOT_COMPILED.to_string()))
    }
}

impl Backend for HipBackend {
    fn name(&self) -> &'static str {
        "hip"
    }

    fn describe(&self) -> String {
        format!("hip ({NOT_COMPILED})")
    }

    fn dims(&self) -> Dims {
        self.dims
    }

    fn create_session(&self, _config: SessionConfig) -> Result<Box<dyn Session>, BackendError> {
        Err(BackendError::Unavailable(NOT_COMPILED.to_string()))
    }
}
