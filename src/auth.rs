//! API keys: the keys file, and the check every protocol makes.
//!
//! Owns: [`KeyStore`] (the keys of `server.api_keys_file`, re-read on
//! SIGHUP, and the scopes the metadata and metrics routes need), the keys
//! file's format and limits ([`parse_keys`]), the `Bearer <key>` credential
//! ([`bearer`]), the comparison of a presented key with the known ones, the
//! key id a log may show ([`KeyId`]) and why a check refused ([`AuthError`]).
//! Must not touch: how a protocol carries the key or answers a refusal
//! (`http/`, `grpc/`: each maps its routes to an [`Access`] and an
//! [`AuthError`] to its status), the metrics.
//!
//! Keys file: one key per line, `KEY SCOPE[,SCOPE...]` (scopes `infer`,
//! `repository`, `metadata`, `metrics`); `#` at the start of a line or after
//! whitespace starts a comment; blank lines are skipped. A key is 16 to 256
//! printable ASCII characters (no whitespace, not starting with `#`). The
//! file is a regular file of at most 1 MiB with at most 10,000 keys and at
//! least one. An error names the line and what is wrong with it, never the
//! text of the line (it may hold a key).
//!
//! No key is kept or compared as text: the store holds each key's SHA-256,
//! and a presented key's digest is compared with every known digest without
//! an early exit (the time taken does not depend on which bytes match, nor
//! on which key matched). A log shows a key only as its [`KeyId`], the first
//! 8 hex digits of its SHA-256 (`printf %s KEY | sha256sum | cut -c1-8`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::error::StartError;
use crate::labels::{AuthFailure, Scope};
use crate::model::files::{FileError, read_regular_file};

/// Largest keys file read (bytes).
pub const MAX_KEYS_FILE_BYTES: u64 = 1 << 20;
/// Most keys in a keys file.
pub const MAX_KEYS: usize = 10_000;
/// Shortest key accepted in the keys file (characters).
pub const MIN_KEY_LEN: usize = 16;
/// Longest key accepted (characters); a longer presented key is unknown.
pub const MAX_KEY_LEN: usize = 256;

/// What a request asks to do, for the key check: each protocol maps its
/// routes (or RPCs) to one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Liveness and readiness (the probes): never needs a key.
    Health,
    /// Inference: needs `infer`.
    Infer,
    /// Repository index, load and unload: needs `repository`.
    Repository,
    /// Server and model metadata, config and statistics:
    /// `server.metadata_scope`.
    Metadata,
    /// `/metrics`: `server.metrics_scope`.
    Metrics,
}

/// A key as logs may show it: the first 4 bytes (8 hex digits) of its SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyId([u8; 4]);

impl KeyId {
    /// The id of the key whose SHA-256 is `digest`.
    pub(crate) fn of(digest: &[u8; 32]) -> KeyId {
        KeyId([digest[0], digest[1], digest[2], digest[3]])
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Why the key check refused a request. The messages never hold a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("an API key is needed: send `Authorization: Bearer <key>`")]
    MissingKey,
    #[error("the authorization is not one `Bearer <key>` (a key is printable ASCII)")]
    Malformed,
    #[error("unknown API key")]
    UnknownKey,
    #[error("API key {key} does not have the `{needed}` scope")]
    MissingScope { key: KeyId, needed: Scope },
}

impl AuthError {
    /// The `tokitai_auth_failures_total` reason.
    pub fn failure(&self) -> AuthFailure {
        match self {
            AuthError::MissingKey => AuthFailure::MissingKey,
            AuthError::Malformed => AuthFailure::Malformed,
            AuthError::UnknownKey => AuthFailure::UnknownKey,
            AuthError::MissingScope { .. } => AuthFailure::MissingScope,
        }
    }
}

/// Why a keys file was refused. Names a line, never its text.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    #[error("{0}")]
    Read(#[from] FileError),
    #[error("line {line}: {problem}")]
    Line { line: usize, problem: LineProblem },
    #[error("no keys in the file (write one `KEY SCOPE[,SCOPE...]` per line)")]
    Empty,
    #[error("more than {MAX_KEYS} keys")]
    TooMany,
}

/// What is wrong with one line of a keys file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineProblem {
    #[error("a character that is not printable ASCII")]
    NotAscii,
    #[error("no scope after the key (write `KEY SCOPE[,SCOPE...]`)")]
    NoScope,
    #[error("the key is {len} characters long: a key is {MIN_KEY_LEN} to {MAX_KEY_LEN}")]
    KeyLength { len: usize },
    #[error("scope {position} is not one of infer, repository, metadata, metrics (scopes are separated by commas)")]
    UnknownScope { position: usize },
    #[error("the same key as line {0}")]
    Duplicate(usize),
}

/// One known key: its digest and its scopes (bits of [`scope_bit`]).
#[derive(Debug, Clone)]
struct Entry {
    digest: [u8; 32],
    scopes: u8,
}

/// The keys in force.
#[derive(Debug, Default)]
pub struct KeyTable {
    entries: Vec<Entry>,
}

impl KeyTable {
    /// How many keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The scopes of the key whose digest is `digest`, comparing it with
    /// every known digest, each in full: no exit on the first differing
    /// byte nor on the key that matched.
    fn lookup(&self, digest: &[u8; 32]) -> Option<u8> {
        let (mut found, mut scopes) = (0u8, 0u8);
        for entry in &self.entries {
            let equal = ct_eq(&entry.digest, digest);
            // 0xff when equal, else 0: selects the scopes without a branch.
            let mask = 0u8.wrapping_sub(equal);
            found |= equal;
            scopes |= entry.scopes & mask;
        }
        (std::hint::black_box(found) == 1).then_some(scopes)
    }
}

/// 1 when `a == b`, else 0, looking at every byte.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> u8 {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    let diff = u16::from(std::hint::black_box(diff));
    // diff - 1 borrows into the high byte only when diff is 0.
    ((diff.wrapping_sub(1) >> 8) & 1) as u8
}

/// A scope's bit in an entry's scope set.
fn scope_bit(scope: Scope) -> u8 {
    match scope {
        Scope::Infer => 1,
        Scope::Repository => 2,
        Scope::Metadata => 4,
        Scope::Metrics => 8,
    }
}

/// The keys of `server.api_keys_file`, and the scope each [`Access`] needs.
/// With no file, every request is let through.
#[derive(Debug, Default)]
pub struct KeyStore {
    /// `None`: keys are off.
    path: Option<PathBuf>,
    metadata_scope: Option<Scope>,
    metrics_scope: Option<Scope>,
    /// Swapped whole on a reload, so a check sees the old keys or the new.
    table: RwLock<Arc<KeyTable>>,
}

impl KeyStore {
    /// Reads `server.api_keys_file` (none: keys are off). A file that is
    /// missing or does not parse stops the start-up, saying why.
    pub fn load(config: &Config) -> Result<KeyStore, StartError> {
        let server = &config.server;
        let table = match &server.api_keys_file {
            None => KeyTable::default(),
            Some(path) => {
                let table = read_keys(path).map_err(|e| {
                    let message = format!("server.api_keys_file {}: {e}", path.display());
                    StartError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, message))
                })?;
                tracing::info!(path = %path.display(), keys = table.len(), "API keys loaded");
                table
            }
        };
        Ok(KeyStore {
            path: server.api_keys_file.clone(),
            metadata_scope: server.metadata_scope.scope(),
            metrics_scope: server.metrics_scope.scope(),
            table: RwLock::new(Arc::new(table)),
        })
    }

    /// Whether keys are checked at all (`server.api_keys_file` is set).
    pub fn enabled(&self) -> bool {
        self.path.is_some()
    }

    /// How many keys are in force.
    pub fn len(&self) -> usize {
        self.table.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-reads the keys file (SIGHUP) and swaps the new keys in at once; a
    /// file that cannot be read or parsed leaves the old keys in force, and
    /// the log says why (never with a key's text).
    pub fn reload(&self) {
        let Some(path) = &self.path else { return };
        match read_keys(path) {
            Ok(table) => {
                let keys = table.len();
                *self.table.write() = Arc::new(table);
                tracing::info!(path = %path.display(), keys, "API keys re-read");
            }
            Err(error) => tracing::warn!(
                path = %path.display(),
                %error,
                kept = self.len(),
                "API keys file not re-read: the keys loaded before stay in force"
            ),
        }
    }

    /// The scope `access` needs; `None` when it is open (keys off, a probe,
    /// or a scope setting of `none`).
    pub fn needed(&self, access: Access) -> Option<Scope> {
        self.path.as_ref()?;
        match access {
            Access::Health => None,
            Access::Infer => Some(Scope::Infer),
            Access::Repository => Some(Scope::Repository),
            Access::Metadata => self.metadata_scope,
            Access::Metrics => self.metrics_scope,
        }
    }

    /// Checks a request's credentials for `access`: `authorization` is every
    /// value of its `Authorization` header (gRPC: `authorization` metadata),
    /// of which there must be exactly one, `Bearer <key>`. `Ok(None)` when
    /// no key is needed; `Ok(Some(id))` for a known key with the scope.
    pub fn check<'a>(
        &self,
        authorization: impl IntoIterator<Item = &'a [u8]>,
        access: Access,
    ) -> Result<Option<KeyId>, AuthError> {
        let Some(needed) = self.needed(access) else {
            return Ok(None);
        };
        let mut values = authorization.into_iter();
        let value = values.next().ok_or(AuthError::MissingKey)?;
        if values.next().is_some() {
            return Err(AuthError::Malformed);
        }
        let key = bearer(value)?;
        if key.len() > MAX_KEY_LEN {
            return Err(AuthError::UnknownKey);
        }
        let digest: [u8; 32] = Sha256::digest(key).into();
        let id = KeyId::of(&digest);
        let table = Arc::clone(&self.table.read());
        let Some(scopes) = table.lookup(&digest) else {
            tracing::debug!(key = %id, "unknown API key");
            return Err(AuthError::UnknownKey);
        };
        if scopes & scope_bit(needed) == 0 {
            return Err(AuthError::MissingScope { key: id, needed });
        }
        Ok(Some(id))
    }
}

/// The key of a `Bearer <key>` credential (RFC 6750: the scheme in any
/// case, one or more spaces, a token of printable ASCII).
pub fn bearer(value: &[u8]) -> Result<&[u8], AuthError> {
    const SCHEME: &[u8] = b"bearer ";
    let head = value.get(..SCHEME.len()).ok_or(AuthError::Malformed)?;
    if !head.eq_ignore_ascii_case(SCHEME) {
        return Err(AuthError::Malformed);
    }
    let rest = &value[SCHEME.len()..];
    let start = rest.iter().position(|&b| b != b' ').ok_or(AuthError::Malformed)?;
    let token = rest[start..].trim_ascii_end();
    if token.iter().all(|&b| b.is_ascii_graphic()) {
        Ok(token)
    } else {
        Err(AuthError::Malformed)
    }
}

/// Reads and parses the keys file at `path` (a regular file of at most
/// [`MAX_KEYS_FILE_BYTES`]).
pub fn read_keys(path: &Path) -> Result<KeyTable, KeysFileError> {
    let bytes = read_regular_file(path, MAX_KEYS_FILE_BYTES)?;
    parse_keys(&bytes)
}

/// Parses a keys file's text.
pub fn parse_keys(text: &[u8]) -> Result<KeyTable, KeysFileError> {
    let mut entries = Vec::new();
    // Each key's digest and the line it is on, to name a key listed twice.
    let mut lines = std::collections::HashMap::new();
    for (index, line) in text.split(|&b| b == b'\n').enumerate() {
        let number = index + 1;
        let entry = parse_line(line).map_err(|problem| KeysFileError::Line { line: number, problem })?;
        let Some(entry) = entry else { continue };
        if let Some(&first) = lines.get(&entry.digest) {
            let problem = LineProblem::Duplicate(first);
            return Err(KeysFileError::Line { line: number, problem });
        }
        if entries.len() == MAX_KEYS {
            return Err(KeysFileError::TooMany);
        }
        lines.insert(entry.digest, number);
        entries.push(entry);
    }
    if entries.is_empty() {
        return Err(KeysFileError::Empty);
    }
    Ok(KeyTable { entries })
}

/// One line: `None` for a blank or comment line.
fn parse_line(line: &[u8]) -> Result<Option<Entry>, LineProblem> {
    let line = without_comment(line).trim_ascii();
    if line.is_empty() {
        return Ok(None);
    }
    if !line.iter().all(|&b| b.is_ascii_graphic() || b == b' ' || b == b'\t') {
        return Err(LineProblem::NotAscii);
    }
    let split = line
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .ok_or(LineProblem::NoScope)?;
    let (key, scopes) = (&line[..split], line[split..].trim_ascii());
    if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()) {
        return Err(LineProblem::KeyLength { len: key.len() });
    }
    let mut bits = 0u8;
    for (index, scope) in scopes.split(|&b| b == b',').enumerate() {
        let scope = std::str::from_utf8(scope.trim_ascii())
            .ok()
            .and_then(Scope::parse)
            .ok_or(LineProblem::UnknownScope { position: index + 1 })?;
        bits |= scope_bit(scope);
    }
    Ok(Some(Entry {
        digest: Sha256::digest(key).into(),
        scopes: bits,
    }))
}

/// The line up to a `#` that starts it or follows whitespace (a `#` inside
/// a key is part of the key).
fn without_comment(line: &[u8]) -> &[u8] {
    let comment = line
        .iter()
        .enumerate()
        .find(|&(i, &b)| b == b'#' && (i == 0 || line[i - 1].is_ascii_whitespace()));
    match comment {
        Some((i, _)) => &line[..i],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ScopeSetting;

    const INFER_KEY: &str = "infer-key-0123456789abcdef";
    const ADMIN_KEY: &str = "admin#key-0123456789abcdef";

    fn store(text: &str) -> KeyStore {
        let mut config = Config::default();
        config.server.metrics_scope = ScopeSetting::None;
        KeyStore {
            path: Some(PathBuf::from("/keys")),
            metadata_scope: config.server.metadata_scope.scope(),
            metrics_scope: config.server.metrics_scope.scope(),
            table: RwLock::new(Arc::new(parse_keys(text.as_bytes()).unwrap())),
        }
    }

    fn check(keys: &KeyStore, header: Option<&str>, access: Access) -> Result<Option<KeyId>, AuthError> {
        keys.check(header.map(str::as_bytes), access)
    }

    fn line_error(text: &str) -> String {
        parse_keys(text.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn parses_keys_scopes_comments_and_blank_lines() {
        let text = format!(
            "# keys\n\n{INFER_KEY} infer   # the search service\r\n\t{ADMIN_KEY}  infer, repository,metadata,metrics\n"
        );
        let keys = store(&text);
        assert_eq!(keys.len(), 2);
        let bearer = |k: &str| format!("Bearer {k}");
        let infer = bearer(INFER_KEY);
        assert!(check(&keys, Some(&infer), Access::Infer).unwrap().is_some());
        let refused = check(&keys, Some(&infer), Access::Repository).unwrap_err();
        assert_eq!(refused.failure(), AuthFailure::MissingScope);
        let admin = bearer(ADMIN_KEY);
        for access in [Access::Infer, Access::Repository, Access::Metadata] {
            assert!(check(&keys, Some(&admin), access).unwrap().is_some(), "{access:?}");
        }
        // Probes, and a scope setting of `none`, need no key at all.
        assert_eq!(check(&keys, None, Access::Health), Ok(None));
        assert_eq!(check(&keys, None, Access::Metrics), Ok(None));
    }

    #[test]
    fn refusals_name_their_reason() {
        let keys = store(&format!("{INFER_KEY} infer\n"));
        let reason = |h: Option<&str>| check(&keys, h, Access::Infer).unwrap_err().failure();
        assert_eq!(reason(None), AuthFailure::MissingKey);
        for malformed in [
            "Basic abc",
            "Bearer",
            "Bearer ",
            "Bearer a b",
            "Bearerx abc",
            "bearer\tabc",
        ] {
            assert_eq!(reason(Some(malformed)), AuthFailure::Malformed, "{malformed:?}");
        }
        let long = format!("Bearer {}", "k".repeat(MAX_KEY_LEN + 1));
        for unknown in ["Bearer infer-key-0123456789abcdeF", "Bearer infer-key", long.as_str()] {
            assert_eq!(reason(Some(unknown)), AuthFailure::UnknownKey, "{unknown:?}");
        }
        // The scheme in any case, several spaces (RFC 6750, 7235).
        let lax = format!("bEaReR   {INFER_KEY}");
        assert!(check(&keys, Some(&lax), Access::Infer).is_ok());
        // Two Authorization headers are refused, whatever they hold.
        let good = format!("Bearer {INFER_KEY}");
        let two = keys.check([good.as_bytes(), good.as_bytes()], Access::Infer);
        assert_eq!(two.unwrap_err().failure(), AuthFailure::Malformed);
        let missing = AuthError::MissingScope {
            key: KeyId([0xab, 0, 1, 0xff]),
            needed: Scope::Repository,
        };
        assert_eq!(
            missing.to_string(),
            "API key ab0001ff does not have the `repository` scope"
        );
    }

    #[test]
    fn key_id_is_the_sha256_prefix() {
        // printf %s abc | sha256sum: ba7816bf...
        let digest: [u8; 32] = Sha256::digest(b"abc").into();
        assert_eq!(KeyId::of(&digest).to_string(), "ba7816bf");
        let keys = store(&format!("{INFER_KEY} infer\n"));
        let id = check(&keys, Some(&format!("Bearer {INFER_KEY}")), Access::Infer)
            .unwrap()
            .unwrap();
        let digest: [u8; 32] = Sha256::digest(INFER_KEY.as_bytes()).into();
        assert_eq!(id, KeyId::of(&digest));
    }

    #[test]
    fn constant_time_equality_looks_at_every_byte() {
        let a = [7u8; 32];
        assert_eq!(ct_eq(&a, &a), 1);
        for i in 0..32 {
            for bit in 0..8 {
                let mut b = a;
                b[i] ^= 1 << bit;
                assert_eq!(ct_eq(&a, &b), 0, "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn bad_lines_are_named_without_their_text() {
        let secret = "s3cret-s3cret-s3cret";
        let cases = [
            (format!("# c\n{secret}\n"), "line 2: no scope"),
            (
                format!("short infer\n{secret} infer"),
                "line 1: the key is 5 characters",
            ),
            (format!("{secret} infer,admin\n"), "line 1: scope 2 is not one of"),
            (format!("{secret} infer metrics\n"), "line 1: scope 1 is not one of"),
            (format!("{secret} infer,\n"), "line 1: scope 2 is not one of"),
            (
                format!("{secret} infer\n\n{secret} metrics\n"),
                "line 3: the same key as line 1",
            ),
            (
                format!("{secret}\u{e9} infer\n"),
                "line 1: a character that is not printable ASCII",
            ),
            (
                format!("{secret}\u{1} infer\n"),
                "line 1: a character that is not printable ASCII",
            ),
            (
                format!("{} infer\n", "k".repeat(MAX_KEY_LEN + 1)),
                "line 1: the key is 257",
            ),
            ("# only comments\n\n".to_string(), "no keys in the file"),
        ];
        for (text, want) in cases {
            let error = line_error(&text);
            assert!(error.starts_with(want), "{text:?}: {error}");
            assert!(!error.contains("s3cret"), "the error quotes a key: {error}");
        }
        let many: String = (0..=MAX_KEYS).map(|i| format!("key-{i:020} infer\n")).collect();
        assert_eq!(line_error(&many), format!("more than {MAX_KEYS} keys"));
    }

    #[test]
    fn reload_swaps_keys_and_a_broken_file_keeps_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("{INFER_KEY} infer\n")).unwrap();
        let mut config = Config::default();
        config.server.api_keys_file = Some(path.clone());
        let keys = KeyStore::load(&config).unwrap();
        let (old, new) = (format!("Bearer {INFER_KEY}"), format!("Bearer {ADMIN_KEY}"));
        assert!(check(&keys, Some(&old), Access::Infer).is_ok());
        std::fs::write(&path, format!("{ADMIN_KEY} infer\n")).unwrap();
        keys.reload();
        assert_eq!(
            check(&keys, Some(&old), Access::Infer).unwrap_err(),
            AuthError::UnknownKey
        );
        assert!(check(&keys, Some(&new), Access::Infer).is_ok());
        std::fs::write(&path, "broken-line-without-scope-0123\n").unwrap();
        keys.reload();
        assert!(
            check(&keys, Some(&new), Access::Infer).is_ok(),
            "a broken file keeps the old keys"
        );
        std::fs::remove_file(&path).unwrap();
        keys.reload();
        assert!(
            check(&keys, Some(&new), Access::Infer).is_ok(),
            "a missing file keeps the old keys"
        );
    }

    #[test]
    fn start_up_refuses_a_missing_or_invalid_file_and_no_file_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        assert!(!KeyStore::load(&config).unwrap().enabled());
        let off = KeyStore::load(&config).unwrap();
        assert_eq!(off.check(None, Access::Infer), Ok(None));
        let path = dir.path().join("missing");
        config.server.api_keys_file = Some(path.clone());
        let error = KeyStore::load(&config).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("server.api_keys_file {}: ", path.display())),
            "{error}"
        );
        std::fs::write(&path, "x infer\n").unwrap();
        let error = KeyStore::load(&config).unwrap_err().to_string();
        assert!(
            error.ends_with("line 1: the key is 1 characters long: a key is 16 to 256"),
            "{error}"
        );
        config.server.api_keys_file = Some(dir.path().to_path_buf());
        let error = KeyStore::load(&config).unwrap_err().to_string();
        assert!(error.contains("directory"), "{error}");
    }
}
