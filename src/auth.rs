//! API keys: the keys file, and the check every protocol makes.
//!
//! Owns: [`KeyStore`] (the keys of `server.api_keys_file`, re-read on
//! SIGHUP). Must not touch: how a protocol carries the key or answers a
//! refusal (`http/`, `grpc/`).
// SCAFFOLD (issue 23): the API-key helper replaces this stub.

use crate::config::Config;
use crate::error::StartError;

/// The API keys in force. With no `server.api_keys_file`, every request
/// is let through.
#[derive(Debug, Default)]
pub struct KeyStore {}

impl KeyStore {
    /// Reads `server.api_keys_file` (none: keys are off).
    pub fn load(config: &Config) -> Result<KeyStore, StartError> {
        let _ = config;
        Ok(KeyStore::default())
    }

    /// Re-reads the keys file (SIGHUP).
    pub fn reload(&self) {}
}
