//! The job secret: how the launcher hands it to the workers.
//!
//! Choice: a file of mode 0600 (inside a directory of mode 0700) whose *path* the workers get in
//! `MESHFLOW_SECRET_FILE`. The secret itself is never in a command line (visible to every user in
//! `ps`), never in an environment variable (a child's environment is copied into everything it
//! starts and often dumped into logs), and never printed. A file also survives `--max-restarts`
//! and serves every local worker, which an inherited pipe (readable once) would not.
//!
//! On one node the launcher makes a fresh random secret per job (32 bytes from the OS generator,
//! hex) and removes it when it exits. With several nodes every launcher must hold the same secret,
//! so the user passes `--secret-file` (e.g. on a shared home directory, made with
//! `umask 077; openssl rand -hex 32 > ~/.meshflow/job.secret`). A file readable by group or others
//! is refused, as ssh refuses such keys.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

/// The fewest bytes a secret may have.
pub const MIN_SECRET_BYTES: usize = 16;
/// The most bytes a secret file may have.
pub const MAX_SECRET_BYTES: usize = 4096;
/// The environment variable that carries the secret file's path to workers.
pub const SECRET_FILE_VARIABLE: &str = "MESHFLOW_SECRET_FILE";

/// Why the job secret could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// A multi-node job without `--secret-file`.
    #[error(
        "--secret-file is not set: a job on {nnodes} nodes needs the same secret on every node; \
         make one with `umask 077; openssl rand -hex 32 > job.secret` on a shared path and pass \
         --secret-file job.secret"
    )]
    MissingForMultiNode {
        /// The number of nodes.
        nnodes: usize,
    },
    /// The file could not be read or written.
    #[error("secret file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is readable by others, or too short or too long.
    #[error("secret file {path}: {reason}")]
    Unusable {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The secret file of this job: the user's, or a fresh one removed on drop.
#[derive(Debug)]
pub struct JobSecretFile {
    path: PathBuf,
    _directory: Option<tempfile::TempDir>,
}

impl JobSecretFile {
    /// Checks the user's file, or makes a fresh one when there is one node and no file.
    pub fn for_job(given: Option<&Path>, nnodes: usize) -> Result<Self, SecretError> {
        match given {
            Some(path) => {
                read(path)?;
                let path = std::path::absolute(path)
                    .map_err(|source| SecretError::Io { path: path.to_path_buf(), source })?;
                Ok(JobSecretFile { path, _directory: None })
            }
            None if nnodes == 1 => Self::fresh(),
            None => Err(SecretError::MissingForMultiNode { nnodes }),
        }
    }

    /// Makes a fresh random secret in a private temporary directory.
    pub fn fresh() -> Result<Self, SecretError> {
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SecretError::Io { path, source }
        };
        let directory = tempfile::Builder::new()
            .prefix("meshflow-job-")
            .tempdir()
            .map_err(io_error(&std::env::temp_dir()))?;
        let path = directory.path().join("secret");
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let text: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error(&path))?;
        file.write_all(text.as_bytes()).map_err(io_error(&path))?;
        Ok(JobSecretFile { path, _directory: Some(directory) })
    }

    /// Where the secret is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a secret file: private (no group or other permission bits), 16 to 4096 bytes once
/// surrounding whitespace is trimmed.
pub fn read(path: &Path) -> Result<Vec<u8>, SecretError> {
    let io_error = |source| SecretError::Io { path: path.to_path_buf(), source };
    let unusable = |reason: String| SecretError::Unusable { path: path.to_path_buf(), reason };
    let metadata = std::fs::metadata(path).map_err(io_error)?;
    let mode = metadata.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(unusable(format!(
            "mode {:o} lets others read it; run `chmod 600` on it",
            mode & 0o777
        )));
    }
    if metadata.len() > MAX_SECRET_BYTES as u64 {
        return Err(unusable(format!("longer than {MAX_SECRET_BYTES} bytes")));
    }
    let bytes = std::fs::read(path).map_err(io_error)?;
    let trimmed = bytes.trim_ascii();
    if trimmed.len() < MIN_SECRET_BYTES {
        return Err(unusable(format!("shorter than {MIN_SECRET_BYTES} bytes")));
    }
    Ok(trimmed.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_secrets_are_private_random_and_removed_on_drop() {
        let first = JobSecretFile::fresh().unwrap();
        let second = JobSecretFile::fresh().unwrap();
        let mode = std::fs::metadata(first.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let first_secret = read(first.path()).unwrap();
        assert_eq!(first_secret.len(), 64);
        assert_ne!(first_secret, read(second.path()).unwrap());
        let path = first.path().to_path_buf();
        drop(first);
        assert!(!path.exists());
    }

    #[test]
    fn readable_short_or_missing_files_are_refused() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("secret");
        std::fs::write(&path, "0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(read(&path), Err(SecretError::Unusable { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read(&path).unwrap(), b"0123456789abcdef0123");
        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(read(&path), Err(SecretError::Unusable { .. })));
        let missing = directory.path().join("absent");
        assert!(matches!(read(&missing), Err(SecretError::Io { .. })));
        assert!(matches!(
            JobSecretFile::for_job(None, 2),
            Err(SecretError::MissingForMultiNode { nnodes: 2 })
        ));
    }
}
