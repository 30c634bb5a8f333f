//! The repository index: what `POST /v2/repository/index` lists.
//!
//! Owns: [`IndexEntry`] (Triton's `{"name", "version", "state", "reason"}`)
//! and [`VersionRecord`], what the registry remembers of each version it
//! tried. Must not touch: deciding states (the controller does), the wire
//! format (the protocol layers serialise these).

use serde::Serialize;

use super::layout::FileStamp;
use crate::labels::ModelState;

/// One row of the repository index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IndexEntry {
    pub name: String,
    /// The version number; empty for a model with no version tried.
    pub version: String,
    #[serde(serialize_with = "state_text")]
    pub state: ModelState,
    /// Why it is not `READY` (empty when it is).
    pub reason: String,
}

fn state_text<S: serde::Serializer>(state: &ModelState, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(state.as_str())
}

impl IndexEntry {
    pub fn is_ready(&self) -> bool {
        self.state == ModelState::Ready
    }
}

/// What is known of one version the registry has tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    pub state: ModelState,
    pub reason: String,
    /// The files it was (or is being) loaded from: a failed version is not
    /// tried again until they change.
    pub stamp: FileStamp,
}
