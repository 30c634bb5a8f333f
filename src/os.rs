//! What the engine asks of the operating system at start-up.
//!
//! Owns: raising the soft open-files limit to the hard limit, so a burst of
//! connections meets `server.max_connections` (a clear, configured bound)
//! long before the process runs out of file descriptors (which would stop
//! it accepting anyone, health probes included); and handing memory freed
//! by a retired model version back to the OS ([`release_freed_memory`]). All of the engine's
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
