//! Replacing a directory or a file atomically: everything is written into a temporary sibling,
//! synced (files, then the directory), and only then put in place by a rename. Until that
//! rename the previous contents stay where they were, whole; a crash at any point leaves either
//! the old or the new version, plus at worst a stale temporary sibling that the next save
//! removes.
//!
//! A directory cannot be renamed over a non-empty one, so on Linux the two are swapped with
//! `renameat2(RENAME_EXCHANGE)` (one atomic step) and the old one, now at the temporary name, is
//! removed. Elsewhere (or on a file system without the exchange) the old directory is first
//! renamed aside, then the new one into place; between the two renames the path is briefly
//! absent, but both versions stay complete on disk.
//!
//! One writer per checkpoint path at a time (temporary siblings of a path are cleaned as stale).

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::error::{Error, Result};

/// A fresh, empty temporary sibling directory of `target` (stale ones from earlier saves of the
/// same target are removed first).
pub fn temporary_sibling(target: &Path) -> Result<PathBuf> {
    let (parent, name) = parent_and_name(target)?;
    std::fs::create_dir_all(&parent).map_err(Error::io(&parent))?;
    remove_stale(&parent, &name)?;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut temporary = stale_prefix(&name);
    temporary.push(format!("{}-{nanos}", std::process::id()));
    let path = parent.join(temporary);
    std::fs::create_dir(&path).map_err(Error::io(&path))?;
    Ok(path)
}

/// Writes `bytes` to a new file at `path` and syncs it to disk.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(Error::io(path))?;
    file.write_all(bytes).map_err(Error::io(path))?;
    file.sync_all().map_err(Error::io(path))
}

/// Syncs a directory's entries (its list of names) to disk.
pub fn sync_directory(path: &Path) -> Result<()> {
    File::open(path).and_then(|d| d.sync_all()).map_err(Error::io(path))
}

/// Puts the complete, synced directory `temporary` at `target`, replacing what was there.
pub fn publish_directory(temporary: &Path, target: &Path) -> Result<()> {
    sync_directory(temporary)?;
    let (parent, _) = parent_and_name(target)?;
    if std::fs::symlink_metadata(target).is_err() {
        std::fs::rename(temporary, target).map_err(Error::io(target))?;
        return sync_directory(&parent);
    }
    if exchange(temporary, target).is_ok() {
        sync_directory(&parent)?;
        // `temporary` now holds the previous checkpoint.
        return std::fs::remove_dir_all(temporary).map_err(Error::io(temporary));
    }
    let mut aside = temporary.as_os_str().to_os_string();
    aside.push("-old");
    let aside = PathBuf::from(aside);
    std::fs::rename(target, &aside).map_err(Error::io(target))?;
    if let Err(source) = std::fs::rename(temporary, target) {
        let _ = std::fs::rename(&aside, target);
        return Err(Error::Io { path: target.to_path_buf(), source });
    }
    sync_directory(&parent)?;
    std::fs::remove_dir_all(&aside).map_err(Error::io(&aside))
}

/// Writes `bytes` to `target` atomically (a synced temporary sibling renamed over it).
pub fn replace_file(target: &Path, bytes: &[u8]) -> Result<()> {
    let (parent, name) = parent_and_name(target)?;
    let mut temporary = stale_prefix(&name);
    temporary.push(std::process::id().to_string());
    let temporary = parent.join(temporary);
    write_synced(&temporary, bytes)?;
    if let Err(source) = std::fs::rename(&temporary, target) {
        let _ = std::fs::remove_file(&temporary);
        return Err(Error::Io { path: target.to_path_buf(), source });
    }
    sync_directory(&parent)
}

/// The prefix of temporary siblings of `name`: `.{name}.tmp-`.
fn stale_prefix(name: &OsString) -> OsString {
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(".tmp-");
    prefix
}

fn remove_stale(parent: &Path, name: &OsString) -> Result<()> {
    let prefix = stale_prefix(name);
    let prefix = prefix.to_string_lossy();
    let entries = std::fs::read_dir(parent).map_err(Error::io(parent))?;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix.as_ref()) {
            let path = entry.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(Error::io(&path))?;
        }
    }
    Ok(())
}

fn parent_and_name(target: &Path) -> Result<(PathBuf, OsString)> {
    let name = target.file_name().ok_or_else(|| Error::Io {
        path: target.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path has no name"),
    })?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_os_string()))
}

/// Swaps two paths in one atomic step.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(std::io::Error::from)
}

/// Swaps two paths in one atomic step (not available here: the caller falls back).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}
