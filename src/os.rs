//! What the engine asks of the operating system at start-up.
//!
//! Owns: raising the soft open-files limit to the hard limit, so a burst of
//! connections meets `server.max_connections` (a clear, configured bound)
//! long before the process runs out of file descriptors (which would stop
//! it accepting anyone, health probes included); and handing memory freed
//! by a retired model version back to the OS ([`release_freed_memory`]); and
//! asking whether anything listens on a Unix socket file ([`probe_unix_socket`],
//! a non-blocking connect). All of the engine's
//! `unsafe` for the OS is here. Must not touch: anything else.

/// The soft and hard `RLIMIT_NOFILE`, after raising the soft limit to the
/// hard one; `Err` with the OS error when it could not be read or raised.
#[cfg(unix)]
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes one `rlimit` through a valid, exclusive
    // pointer to a live local, and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `setrlimit` only reads the `rlimit` behind a valid pointer
        // to a live local; raising the soft limit up to the hard one needs no
        // privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    // rlim_t is u64 on Linux, but not on every Unix.
    #[allow(clippy::unnecessary_cast)]
    Ok((limit.rlim_cur as u64, limit.rlim_max as u64))
}

/// No such limit to raise off Unix.
#[cfg(not(unix))]
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "not a Unix system",
    ))
}

/// Returns freed heap memory to the OS, after a model version's weights were
/// dropped. glibc serves large allocations with `mmap` and unmaps them on
/// free, but it raises that threshold as large blocks are freed (up to 32
/// MiB), so a version's medium-sized tensors can end up on the heap, where
/// free memory stays in the process until trimmed: `malloc_trim(0)` gives
/// it back. Elsewhere (other allocators or systems) this does nothing.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_freed_memory() {
    // SAFETY: `malloc_trim` only walks glibc's own arenas; it takes no
    // pointers and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_freed_memory() {}

/// What a connect to an existing Unix socket file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketProbe {
    /// A process accepts on it (or its backlog is full: it is alive).
    Listening,
    /// Nothing listens on it: a stale file left by a process that ended.
    Refused,
    /// The path no longer exists.
    Missing,
}

/// Connects to the Unix stream socket at `path` without blocking (a live
/// listener with a full backlog answers `EAGAIN` instead of making the
/// caller wait) and says what answered; `Err` for any other failure
/// (permission denied, a path too long).
#[cfg(unix)]
pub fn probe_unix_socket(path: &std::path::Path) -> std::io::Result<SocketProbe> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    // SAFETY: `sockaddr_un` is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a Unix socket path (1 to 107 bytes)",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (to, from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    // SAFETY: `socket` takes no pointers; a non-negative result is a new
    // descriptor this function owns from here on.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a valid descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is a live, initialised `sockaddr_un` of at least `len`
    // bytes (the path and its NUL fit, checked above); `fd` is open.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(SocketProbe::Listening);
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EAGAIN | libc::EINPROGRESS) => Ok(SocketProbe::Listening),
        Some(libc::ECONNREFUSED) => Ok(SocketProbe::Refused),
        Some(libc::ENOENT) => Ok(SocketProbe::Missing),
        _ => Err(error),
    }
}
