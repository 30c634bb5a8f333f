//! Helpers the model binary's modules share (the harness for every binary
//! is `tests/common`).
//!
//! Owns: [`mkfifo`]. Must not touch: the engine's code.

use std::path::Path;

/// Makes a FIFO at `path` (a file the model and config readers must refuse
/// at once instead of blocking on it).
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().expect("UTF-8 path")).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}: {}", path.display(), std::io::Error::last_os_error());
}
