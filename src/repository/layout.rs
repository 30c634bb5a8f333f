//! The repository on disk: model folders, version folders, and the stamp
//! that says whether a version's files changed.
//!
//! Owns: reading `DIR/<model>/<version>/` (a model folder's name is a valid
//! model name, a version folder's name a positive integer; anything else is
//! skipped, with a debug log), where a version's files are, and
//! [`FileStamp`] (each file's size, modification time and inode: two equal
//! stamps mean the same files, so loading them again is a no-op). Must not
//! touch: the files' contents (the model reader parses them when a version is
//! loaded), what is served.
//!
//! A new version is best written elsewhere and renamed into place (one
//! atomic rename of its folder); a version read half-written fails to load,
//! and is tried again once its files change.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::RepositoryError;
use crate::config::model_name_ok;

/// The files of a version folder.
pub const ARCH_FILE: &str = "arch.json";
pub const CHECKPOINT_FILE: &str = "checkpoint.tkp1";
/// A model's own settings, beside its version folders.
pub const MODEL_CONFIG_FILE: &str = "config.toml";

/// A model folder, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDir {
    pub name: String,
    pub path: PathBuf,
    /// Version numbers found, ascending.
    pub versions: Vec<u64>,
}

impl ModelDir {
    pub fn version_path(&self, version: u64) -> PathBuf {
        self.path.join(version.to_string())
    }

    pub fn config_path(&self) -> PathBuf {
        self.path.join(MODEL_CONFIG_FILE)
    }
}

/// Every model folder under `root`, by name.
pub fn scan(root: &Path) -> Result<Vec<ModelDir>, RepositoryError> {
    let entries = std::fs::read_dir(root).map_err(|e| unreadable(root, &e))?;
    let mut models = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| unreadable(root, &e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !model_name_ok(&name) || !is_dir(&entry.path()) {
            tracing::debug!(entry = %entry.path().display(), "not a model folder; skipped");
            continue;
        }
        models.push(scan_model(root, &name)?);
    }
    models.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(models)
}

/// The model folder `root/name`, or `None` when there is none.
pub fn find_model(root: &Path, name: &str) -> Result<Option<ModelDir>, RepositoryError> {
    if !model_name_ok(name) || !is_dir(&root.join(name)) {
        return Ok(None);
    }
    scan_model(root, name).map(Some)
}

fn scan_model(root: &Path, name: &str) -> Result<ModelDir, RepositoryError> {
    let path = root.join(name);
    let entries = std::fs::read_dir(&path).map_err(|e| unreadable(&path, &e))?;
    let mut versions: Vec<u64> = entries
        .filter_map(Result::ok)
        .filter(|e| is_dir(&e.path()))
        .filter_map(|e| e.file_name().to_str().and_then(parse_version))
        .collect();
    versions.sort_unstable();
    Ok(ModelDir {
        name: name.to_string(),
        path,
        versions,
    })
}

/// A version folder's name as its number: digits only, no leading zero, > 0.
pub fn parse_version(name: &str) -> Option<u64> {
    if name.is_empty() || name.starts_with('0') || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok()
}

fn is_dir(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_dir())
}

fn unreadable(path: &Path, e: &std::io::Error) -> RepositoryError {
    RepositoryError::Unreadable(format!("{}: {e}", path.display()))
}

/// Identity of a set of files: for each, its path and (when it exists) size,
/// modification time and inode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileStamp(Vec<(PathBuf, Option<FileId>)>);

/// A file's size, modification time and inode.
type FileId = (u64, SystemTime, u64);

impl FileStamp {
    /// The stamp of `paths` now (a missing file is part of the stamp too).
    pub fn of(paths: &[&Path]) -> FileStamp {
        FileStamp(
            paths
                .iter()
                .map(|p| {
                    let meta = std::fs::metadata(p).ok();
                    let id = meta.and_then(|m| Some((m.len(), m.modified().ok()?, inode(&m))));
                    (p.to_path_buf(), id)
                })
                .collect(),
        )
    }

    /// A stamp for the built-in demo model (never changes).
    pub fn builtin() -> FileStamp {
        FileStamp(Vec::new())
    }
}

#[cfg(unix)]
fn inode(m: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(m)
}

#[cfg(not(unix))]
fn inode(_m: &std::fs::Metadata) -> u64 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_positive_integers_and_models_valid_names() {
        assert_eq!(parse_version("1"), Some(1));
        assert_eq!(parse_version("120"), Some(120));
        for bad in ["0", "01", "", "-1", "1a", "v1", "1.0"] {
            assert_eq!(parse_version(bad), None, "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        for d in [
            "quality/1",
            "quality/7",
            "quality/x",
            "quality/007",
            ".hidden/1",
            "b a/1",
        ] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("quality/3"), b"a file, not a folder").unwrap();
        std::fs::write(dir.path().join("README"), b"x").unwrap();
        let models = scan(dir.path()).unwrap();
        assert_eq!(models.len(), 1, "{models:?}");
        assert_eq!(
            (models[0].name.as_str(), models[0].versions.clone()),
            ("quality", vec![1, 7])
        );
        assert!(find_model(dir.path(), "nope").unwrap().is_none());
        assert!(find_model(dir.path(), "..").unwrap().is_none());
        assert!(scan(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_stamp_changes_when_a_file_does() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"one").unwrap();
        let a = FileStamp::of(&[&f]);
        assert_eq!(a, FileStamp::of(&[&f]));
        std::fs::write(&f, b"three").unwrap();
        assert_ne!(a, FileStamp::of(&[&f]));
        std::fs::remove_file(&f).unwrap();
        assert_ne!(a, FileStamp::of(&[&f]));
    }
}
