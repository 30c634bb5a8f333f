//! Opening the files the engine is given by path: only regular files, and
//! small ones read under a size cap.
//!
//! Owns: [`open_regular_file`] (the checkpoint, and the step before every
//! read here), [`read_regular_file`] (`arch.json` and the `--config` file),
//! and [`FileError`], whose messages carry no path (each caller names the
//! path and what the file is). Must not touch: what the bytes mean.
//!
//! A path that is not a regular file is refused before it is read: a FIFO
//! would block start-up until a writer appears (opening one for reading
//! blocks), and a device such as `/dev/zero` never ends. The type is checked
//! with `stat` (following symlinks) *before* the open, and again with
//! `fstat` on what was opened, which on Unix is opened non-blocking and
//! without becoming a controlling terminal, so a path swapped for a FIFO
//! between the two checks cannot hang the open either. A capped read stops
//! one byte past the cap whatever the file's size said, so a file that grows
//! while it is read is still bounded.

use std::fs::{File, FileType};
use std::io::Read;
use std::path::Path;

/// Why a file was not read. Carries no path: the caller adds it.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// `stat`, open or read failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Refused before (or instead of) reading it.
    #[error("{0}")]
    Refused(#[from] FileRefusal),
}

/// A file refused for what it is, not for an I/O failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileRefusal {
    /// Not a regular file: a FIFO, a device, a directory, a socket.
    #[error("{}", not_regular(kind))]
    NotRegular {
        /// "a FIFO", "a character device", "a block device", "a directory",
        /// "a socket"; `None` for any other kind.
        kind: Option<&'static str>,
    },
    /// Over the size cap. `len` is the size `stat` gave, when that was
    /// already over; `None` when the file grew past the cap while read.
    #[error("{}", too_large(*cap, *len))]
    TooLarge { cap: u64, len: Option<u64> },
}

fn not_regular(kind: &Option<&'static str>) -> String {
    match kind {
        Some(kind) => format!("is {kind}, not a regular file"),
        None => "is not a regular file".to_owned(),
    }
}

fn too_large(cap: u64, len: Option<u64>) -> String {
    match len {
        Some(len) => format!("is {len} bytes, larger than the {} limit", human_bytes(cap)),
        None => format!("is larger than the {} limit", human_bytes(cap)),
    }
}

/// `1048576` -> "1 MiB", `1024` -> "1 KiB", else "N bytes".
fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n}-byte"),
    }
}

/// What a non-regular file type is, for [`FileRefusal::NotRegular`].
fn kind_of(t: &FileType) -> Option<&'static str> {
    if t.is_dir() {
        return Some("a directory");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return Some("a FIFO");
        }
        if t.is_char_device() {
            return Some("a character device");
        }
        if t.is_block_device() {
            return Some("a block device");
        }
        if t.is_socket() {
            return Some("a socket");
        }
    }
    None
}

fn require_regular(t: &FileType) -> Result<(), FileRefusal> {
    if t.is_file() {
        Ok(())
    } else {
        Err(FileRefusal::NotRegular { kind: kind_of(t) })
    }
}

/// Opens `path` for reading if it is a regular file (after following
/// symlinks); returns the file and its length. Never blocks on a FIFO and
/// never reads a device.
pub fn open_regular_file(path: &Path) -> Result<(File, u64), FileError> {
    // stat before open: opening a FIFO for reading blocks until a writer appears.
    require_regular(&std::fs::metadata(path)?.file_type())?;
    let file = open_read(path)?;
    // fstat what was opened: the path may have been replaced in between.
    let meta = file.metadata()?;
    require_regular(&meta.file_type())?;
    #[cfg(unix)]
    clear_nonblocking(&file)?;
    Ok((file, meta.len()))
}

/// Reads all of the regular file at `path`, refusing it unless it is at most
/// `cap` bytes. At most `cap + 1` bytes are ever read.
pub fn read_regular_file(path: &Path, cap: u64) -> Result<Vec<u8>, FileError> {
    let (file, len) = open_regular_file(path)?;
    if len > cap {
        return Err(FileRefusal::TooLarge { cap, len: Some(len) }.into());
    }
    let limit = cap.saturating_add(1);
    // `len <= cap`; one more byte so a file that has not grown needs no realloc.
    let mut bytes = Vec::with_capacity(usize::try_from(len.saturating_add(1)).unwrap_or(0));
    file.take(limit).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(FileRefusal::TooLarge { cap, len: None }.into());
    }
    Ok(bytes)
}

#[cfg(unix)]
fn open_read(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

#[cfg(not(unix))]
fn open_read(path: &Path) -> std::io::Result<File> {
    File::open(path)
}

/// Back to blocking reads once the file is known to be regular (where
/// `O_NONBLOCK` means nothing on local file systems, but a network or FUSE
/// file system may still see it).
#[cfg(unix)]
fn clear_nonblocking(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is an open descriptor owned by `file` for the whole call;
    // F_GETFL/F_SETFL only read and set its status flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_written_for_people() {
        assert_eq!(human_bytes(1 << 20), "1 MiB");
        assert_eq!(human_bytes(16 << 20), "16 MiB");
        assert_eq!(human_bytes(4096), "4 KiB");
        assert_eq!(human_bytes(1000), "1000-byte");
        let e = FileRefusal::TooLarge {
            cap: 1 << 20,
            len: Some(2 << 20),
        };
        assert_eq!(e.to_string(), "is 2097152 bytes, larger than the 1 MiB limit");
        let e = FileRefusal::TooLarge {
            cap: 1 << 20,
            len: None,
        };
        assert_eq!(e.to_string(), "is larger than the 1 MiB limit");
    }

    #[test]
    fn reads_a_regular_file_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"12345").unwrap();
        assert_eq!(read_regular_file(&p, 5).unwrap(), b"12345");
        let e = read_regular_file(&p, 4).unwrap_err();
        assert!(matches!(
            e,
            FileError::Refused(FileRefusal::TooLarge { cap: 4, len: Some(5) })
        ));
        let e = read_regular_file(dir.path(), 5).unwrap_err();
        assert_eq!(e.to_string(), "is a directory, not a regular file");
        let e = read_regular_file(&dir.path().join("missing"), 5).unwrap_err();
        assert!(matches!(e, FileError::Io(ref io) if io.kind() == std::io::ErrorKind::NotFound));
    }

    #[cfg(unix)]
    #[test]
    fn devices_and_fifos_are_refused_without_reading() {
        let e = read_regular_file(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "is a character device, not a regular file");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular_file(&fifo).unwrap_err();
        assert_eq!(e.to_string(), "is a FIFO, not a regular file");
        // A symlink to a regular file is followed.
        let target = dir.path().join("target");
        std::fs::write(&target, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(read_regular_file(&link, 1).unwrap(), b"x");
    }
}
