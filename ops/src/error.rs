//! The one error type of `meshflow-ops`.

use meshflow_placement::Sbp;

use crate::{DType, Shape};

/// Everything that can go wrong in tensor creation, shape inference and kernels.
///
/// Variants name the op and the offending shapes, dtypes or axes, so that an error read in a log
/// says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- shape and dtype inference ---
    /// Input shapes that the op cannot combine.
    #[error("{op}: incompatible shapes {shapes:?}: {reason}")]
    Shape {
        /// The op.
        op: &'static str,
        /// The input shapes.
        shapes: Vec<Shape>,
        /// What is wrong with them.
        reason: String,
    },
    /// Input dtypes that the op does not accept.
    #[error("{op}: unsupported dtypes {}: {reason}", dtype_list(.dtypes))]
    DType {
        /// The op.
        op: &'static str,
        /// The input dtypes.
        dtypes: Vec<DType>,
        /// What is wrong with them.
        reason: String,
    },
    /// An axis that the tensor does not have.
    #[error("{op}: axis {axis} out of range for shape {shape}")]
    Axis {
        /// The op.
        op: &'static str,
        /// The requested axis.
        axis: isize,
        /// The shape it was applied to.
        shape: Shape,
    },
    /// The wrong number of inputs.
    #[error("{op}: expected {expected} inputs, got {got}")]
    Arity {
        /// The op.
        op: &'static str,
        /// How many it takes.
        expected: usize,
        /// How many it got.
        got: usize,
    },
    /// The wrong number of inputs to an op with one optional input.
    #[error("{op}: expected {fewest} or {most} inputs, got {got}")]
    ArityEither {
        /// The op.
        op: &'static str,
        /// How many it takes without its optional input.
        fewest: usize,
        /// How many it takes with it.
        most: usize,
        /// How many it got.
        got: usize,
    },
    /// An attribute value that makes no sense (negative probability, zero size …).
    #[error("{op}: invalid argument: {reason}")]
    Argument {
        /// The op.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A value that is out of its allowed range at run time (a token id ≥ vocab …).
    #[error("{op}: {reason}")]
    Value {
        /// The op.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An SBP signature that does not apply to this op and these inputs.
    #[error("{op}: signature {inputs:?} -> {outputs:?} is not valid: {reason}")]
    Signature {
        /// The op.
        op: &'static str,
        /// Input SBPs.
        inputs: Vec<Sbp>,
        /// Output SBPs.
        outputs: Vec<Sbp>,
        /// Why not.
        reason: String,
    },

    // --- tensors and storage ---
    /// Data whose length does not match the shape.
    #[error("tensor: {len} elements given for shape {shape} ({numel} elements)")]
    DataLength {
        /// Elements given.
        len: usize,
        /// The shape.
        shape: Shape,
        /// Elements the shape needs.
        numel: usize,
    },
    /// A typed view of a tensor of another dtype.
    #[error("tensor: viewed as {requested} but holds {actual}")]
    ViewDType {
        /// The dtype asked for.
        requested: DType,
        /// The dtype the tensor has.
        actual: DType,
    },
    /// A device that this build or this machine cannot use.
    #[error("device {device}: {reason}")]
    Device {
        /// The device, e.g. `cuda:0`.
        device: String,
        /// Why it is not available.
        reason: String,
    },

    // --- files ---
    /// A safetensors file that could not be read or written.
    #[error("safetensors {path}: {reason}")]
    Safetensors {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// An I/O error on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// `[f32, i64]`: dtypes by their lower-case names.
fn dtype_list(dtypes: &[DType]) -> String {
    let names: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
    format!("[{}]", names.join(", "))
}

/// Result with the ops [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::Shape`].
    pub fn shape(op: &'static str, shapes: &[&Shape], reason: impl Into<String>) -> Self {
        Error::Shape {
            op,
            shapes: shapes.iter().map(|s| (*s).clone()).collect(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::DType`].
    pub fn dtype(op: &'static str, dtypes: &[DType], reason: impl Into<String>) -> Self {
        Error::DType { op, dtypes: dtypes.to_vec(), reason: reason.into() }
    }

    /// Shorthand for [`Error::Argument`].
    pub fn argument(op: &'static str, reason: impl Into<String>) -> Self {
        Error::Argument { op, reason: reason.into() }
    }
}
