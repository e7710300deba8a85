//! The error type of checkpoints: every variant names the file and, where one is concerned, the
//! tensor.

use std::path::PathBuf;

/// What can go wrong saving or loading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read, written, synced or renamed.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The system's reason.
        source: std::io::Error,
    },
    /// A destination that a save will not replace: saving swaps the whole directory for the new
    /// checkpoint and deletes the old one, so it must be absent, empty, or a checkpoint.
    #[error(
        "checkpoint {path}: {reason}; not replaced (a save replaces the whole directory, so it \
         saves only where nothing is, into an empty directory or over a checkpoint)"
    )]
    Refused {
        /// The destination.
        path: PathBuf,
        /// What is there.
        reason: String,
    },
    /// `index.json` is unreadable or inconsistent (bad JSON, unknown dtype, a region outside the
    /// tensor, shards that do not tile it, a file name that is not a plain name).
    #[error("checkpoint index {path}: {reason}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor that does not fit: a shape or dtype that differs between the checkpoint and the
    /// session, or a shard file whose tensor is not what the index says.
    #[error("checkpoint {path}: tensor {tensor}: {reason}")]
    Tensor {
        /// The file that holds (or describes) the tensor.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The mismatch, with both sides.
        reason: String,
    },
    /// Variables of the session that the checkpoint does not hold.
    #[error(
        "checkpoint {path}: missing tensors {names:?} (the session has them, the file does not)"
    )]
    Missing {
        /// The index or file.
        path: PathBuf,
        /// The missing names.
        names: Vec<String>,
    },
    /// Tensors of the checkpoint that the session has no variable for.
    #[error("checkpoint {path}: unexpected tensors {names:?} (the session has no such variables)")]
    Unexpected {
        /// The index or file.
        path: PathBuf,
        /// The unexpected names.
        names: Vec<String>,
    },
    /// A safetensors file that cannot be read or written (the message names the file).
    #[error(transparent)]
    File(#[from] meshflow_ops::Error),
    /// The session refused (a device stopped, a variable that cannot be stored shard by shard).
    #[error("checkpoint: {0}")]
    Session(#[from] crate::Error),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// Result with the checkpoint [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
