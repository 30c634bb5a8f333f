//! The Unix domain socket files the server listens on (`server.unix_socket`,
//! `grpc.unix_socket`): for a caller on the same host, without TCP.
//!
//! Owns: binding one ([`UnixSocket::bind`]): a file already at the path is
//! replaced only when it is a socket nothing listens on (a connect is
//! refused: the stale file of a process that ended); a socket that accepts
//! fails start-up naming the setting (another server owns it), and a file
//! that is not a socket is never deleted (start-up fails instead). Then the
//! file's permission bits are set from the `*_mode` setting (who may
//! connect: the directory's own permissions are what protect the instant
//! between the bind and the `chmod`). And removing it ([`SocketFile`]):
//! when the listener's owner drops it, after the drain on shutdown, or at
//! once when start-up fails after the bind; only if the path is still the
//! file this process bound (a newer server that replaced it keeps its own).
//! Must not touch: what is served on the socket (`http/`, `grpc/`), the
//! settings' validation (`config.rs`).

use std::io;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::os::{SocketProbe, probe_unix_socket};

/// Why a socket file could not be bound. Every message names the setting
/// and the path.
#[derive(Debug, thiserror::Error)]
pub enum UnixSocketError {
    #[error(
        "{setting} = {path:?}: another process is listening on this socket; stop it or choose \
         another path"
    )]
    InUse { setting: &'static str, path: PathBuf },
    #[error(
        "{setting} = {path:?}: the path exists and is not a socket; it was left alone (remove it \
         or choose another path)"
    )]
    NotASocket { setting: &'static str, path: PathBuf },
    #[error("{setting} = {path:?}: cannot tell whether anything listens on the existing socket: {source}")]
    Probe {
        setting: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{setting} = {path:?}: cannot remove the stale socket: {source}")]
    RemoveStale {
        setting: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{setting} = {path:?}: cannot listen: {source}")]
    Bind {
        setting: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{setting} = {path:?}: cannot set its mode to {mode:o}: {source}")]
    Mode {
        setting: &'static str,
        path: PathBuf,
        mode: u32,
        source: io::Error,
    },
}

impl From<UnixSocketError> for io::Error {
    fn from(e: UnixSocketError) -> io::Error {
        let kind = match &e {
            UnixSocketError::InUse { .. } => io::ErrorKind::AddrInUse,
            UnixSocketError::NotASocket { .. } => io::ErrorKind::AlreadyExists,
            UnixSocketError::Probe { source, .. }
            | UnixSocketError::RemoveStale { source, .. }
            | UnixSocketError::Bind { source, .. }
            | UnixSocketError::Mode { source, .. } => source.kind(),
        };
        io::Error::new(kind, e)
    }
}

/// A bound socket and its file.
#[derive(Debug)]
pub struct UnixSocket {
    pub listener: UnixListener,
    pub file: SocketFile,
}

impl UnixSocket {
    /// Binds `path` (`setting` names it in errors) with permission bits
    /// `mode`, replacing a stale socket file there (see the module).
    pub fn bind(setting: &'static str, path: &Path, mode: u32) -> Result<UnixSocket, UnixSocketError> {
        clear_stale(setting, path)?;
        let listener = UnixListener::bind(path).map_err(|source| UnixSocketError::Bind {
            setting,
            path: path.to_path_buf(),
            source,
        })?;
        // From here the file is ours: any failure below removes it.
        let file = SocketFile::bound(path).map_err(|source| UnixSocketError::Bind {
            setting,
            path: path.to_path_buf(),
            source,
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
            UnixSocketError::Mode {
                setting,
                path: path.to_path_buf(),
                mode,
                source,
            }
        })?;
        Ok(UnixSocket { listener, file })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

/// Makes room for a bind at `path`: nothing there, or a stale socket that
/// is removed. Another server's live socket and any other file are errors.
fn clear_stale(setting: &'static str, path: &Path) -> Result<(), UnixSocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(UnixSocketError::Probe {
                setting,
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(UnixSocketError::NotASocket {
            setting,
            path: path.to_path_buf(),
        });
    }
    let probe = probe_unix_socket(path).map_err(|source| UnixSocketError::Probe {
        setting,
        path: path.to_path_buf(),
        source,
    })?;
    match probe {
        SocketProbe::Listening => Err(UnixSocketError::InUse {
            setting,
            path: path.to_path_buf(),
        }),
        SocketProbe::Missing => Ok(()),
        SocketProbe::Refused => {
            tracing::info!(setting, path = %path.display(), "replacing a stale socket file nothing listens on");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(UnixSocketError::RemoveStale {
                    setting,
                    path: path.to_path_buf(),
                    source,
                }),
            }
        }
    }
}

/// The socket file this process bound; removed when this drops, if the
/// path still names that same file.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// The file just bound at `path`.
    fn bound(path: &Path) -> io::Result<SocketFile> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still names the file this process bound.
    fn still_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if !self.still_ours() {
            tracing::debug!(path = %self.path.display(), "the socket file is gone or no longer ours: left alone");
            return;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => tracing::debug!(path = %self.path.display(), "socket file removed"),
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "could not remove the socket file"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn binds_with_the_mode_and_removes_the_file_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let socket = UnixSocket::bind("server.unix_socket", &path, 0o600).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        drop(socket);
        assert!(!path.exists());
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let live = UnixListener::bind(&path).unwrap();
        let err = UnixSocket::bind("grpc.unix_socket", &path, 0o660).unwrap_err();
        assert!(matches!(err, UnixSocketError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("grpc.unix_socket"), "{err}");
        // The refusal left the live socket working.
        drop(std::os::unix::net::UnixStream::connect(&path).unwrap());
        drop(live);
        // The listener is gone, its file stays: stale.
        assert!(path.exists());
        let socket = UnixSocket::bind("grpc.unix_socket", &path, 0o660).unwrap();
        drop(std::os::unix::net::UnixStream::connect(&path).unwrap());
        drop(socket);
    }

    #[test]
    fn a_regular_file_is_never_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        std::fs::write(&path, b"keep me").unwrap();
        let err = UnixSocket::bind("server.unix_socket", &path, 0o660).unwrap_err();
        assert!(matches!(err, UnixSocketError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn a_file_replaced_by_someone_else_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let socket = UnixSocket::bind("server.unix_socket", &path, 0o660).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"new owner").unwrap();
        drop(socket);
        assert_eq!(std::fs::read(&path).unwrap(), b"new owner");
    }
}
