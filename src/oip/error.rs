//! The Open Inference Protocol's own refusals and the kind of every error
//! its transports answer.
//!
//! Owns: [`UnknownVersion`] (a version that is not a number names nothing:
//! NOT_FOUND) and the one mapping of a [`RepositoryError`] to its
//! [`ErrorKind`] and [`FailureReason`] ([`repository_kind`],
//! [`repository_reason`]), so HTTP and gRPC answer a repository call's
//! failure the same way. Must not touch: status codes (each transport maps
//! a kind to its status in its own one place), wire formats.

use crate::engine::RepositoryError;
use crate::error::ErrorKind;
use crate::input::clip;
use crate::labels::FailureReason;

/// A model version that is not a number: no version has that name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Request for unknown model: '{model}' version {version} is not found")]
pub struct UnknownVersion {
    /// The model's name, clipped for the message.
    pub model: String,
    /// The version as asked, clipped for the message.
    pub version: String,
}

impl UnknownVersion {
    pub(crate) fn new(model: &str, version: &str) -> UnknownVersion {
        UnknownVersion {
            model: clip(model),
            version: clip(version),
        }
    }
}

/// The kind of a repository call's failure (Triton's codes: NOT_FOUND,
/// UNAVAILABLE, INVALID_ARG, INTERNAL).
pub fn repository_kind(e: &RepositoryError) -> ErrorKind {
    match e {
        RepositoryError::UnknownModel { .. } => ErrorKind::NotFound,
        RepositoryError::NotAllowed(_) | RepositoryError::Draining => ErrorKind::Unavailable,
        RepositoryError::LoadFailed { .. } => ErrorKind::InvalidArgument,
        RepositoryError::Unreadable(_) => ErrorKind::Internal,
    }
}

/// The failure metric's reason for a repository call's failure.
pub fn repository_reason(e: &RepositoryError) -> FailureReason {
    match e {
        RepositoryError::UnknownModel { .. } => FailureReason::NotFound,
        RepositoryError::NotAllowed(_) | RepositoryError::Draining => FailureReason::NotReady,
        RepositoryError::LoadFailed { .. } => FailureReason::Invalid,
        RepositoryError::Unreadable(_) => FailureReason::Internal,
    }
}
