//! The error type of the `meshflow` crate.

/// Everything that can go wrong building, compiling or running a program.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An op rejected its inputs (shape, dtype, axis …); the message names the op and the shapes.
    #[error(transparent)]
    Ops(#[from] meshflow_ops::Error),
    /// A malformed program: values of different graphs or placements, duplicate names, bad SBPs.
    #[error("graph: {0}")]
    Graph(String),
    /// A failure while running a step: a kernel, a collective, a peer; the message names it.
    #[error("runtime: {0}")]
    Runtime(String),
    /// A boxing step that failed on this rank.
    #[error("boxing {step}: {source}")]
    Boxing {
        /// The step, as the plan prints it.
        step: String,
        /// Why it failed.
        source: Box<Error>,
    },
    /// A communication failure (a peer vanished, a frame was malformed, a timeout).
    #[error(transparent)]
    Comm(#[from] meshflow_comm::Error),
    /// A placement or boxing error: layouts that do not fit, an op with no usable signature.
    #[error(transparent)]
    Placement(#[from] meshflow_placement::Error),
    /// Training data that cannot be used (a missing file, a wrong layout, an unknown character).
    #[error("data: {0}")]
    Data(String),
}

impl Error {
    /// True when the error is a wait that ran out of time (a consequence of a failure elsewhere
    /// more often than a cause).
    pub fn is_timeout(&self) -> bool {
        match self {
            Error::Comm(e) => matches!(e, meshflow_comm::Error::Timeout { .. }),
            Error::Boxing { source, .. } => source.is_timeout(),
            _ => false,
        }
    }
}

/// Result with the meshflow [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
