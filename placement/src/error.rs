//! The one error type of `meshflow-placement`.

use crate::NdSbp;

/// Everything that can go wrong with placements, layouts, signatures and selection.
///
/// Variants name the op, its input SBPs and the candidate signatures where there is an op, and
/// the placement text where there is a placement, so that a log line says what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    // --- placements ---
    /// Placement text that does not parse.
    #[error("malformed placement `{text}`: {reason}")]
    PlacementSyntax {
        /// The text as given.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A mesh that cannot exist (no ranks, a duplicate rank, ranks that do not fill the hierarchy).
    #[error("invalid placement mesh {hierarchy:?} over ranks {ranks:?}: {reason}")]
    InvalidPlacement {
        /// The requested hierarchy.
        hierarchy: Vec<usize>,
        /// The requested ranks.
        ranks: Vec<usize>,
        /// What is wrong.
        reason: String,
    },
    /// A rank or coordinate that the placement does not hold.
    #[error("placement {placement}: {reason}")]
    NotInPlacement {
        /// The placement, as text.
        placement: String,
        /// The rank, coordinate or mesh axis that is missing.
        reason: String,
    },

    // --- layouts ---
    /// A split along a tensor axis the tensor does not have.
    #[error(
        "{context}: split axis {axis} out of range for a tensor of shape {shape:?} under {nd_sbp}"
    )]
    SplitAxisOutOfRange {
        /// Where it happened: an op name, an edge, a boxing request.
        context: String,
        /// The split axis.
        axis: usize,
        /// The logical shape.
        shape: Vec<usize>,
        /// The nd-SBP holding the split.
        nd_sbp: NdSbp,
    },
    /// An nd-SBP with another number of mesh axes than its placement.
    #[error(
        "{context}: nd-SBP {nd_sbp} has {got} mesh axes, placement {placement} has {expected}"
    )]
    MeshAxes {
        /// Where it happened.
        context: String,
        /// The nd-SBP.
        nd_sbp: NdSbp,
        /// Its number of axes.
        got: usize,
        /// The placement, as text.
        placement: String,
        /// The placement's number of mesh axes.
        expected: usize,
    },

    // --- signatures and selection ---
    /// An op whose (fixed) input SBPs admit none of its candidate signatures.
    #[error(
        "op `{op}`: no signature admits input SBPs [{inputs}] (candidates: {candidates}): {reason}"
    )]
    NoSignature {
        /// The op.
        op: String,
        /// The SBPs of its inputs (fixed by the user or by producers), `?` where free.
        inputs: String,
        /// Its candidate signatures.
        candidates: String,
        /// Why none fits.
        reason: String,
    },
    /// A signature or edge whose placement disagrees with the op's.
    #[error(
        "op `{op}`: placement mismatch: {reason} (input SBPs [{inputs}]; candidates: {candidates})"
    )]
    PlacementMismatch {
        /// The op.
        op: String,
        /// The SBPs of its inputs.
        inputs: String,
        /// Its candidate signatures.
        candidates: String,
        /// What disagrees.
        reason: String,
    },
    /// A signature that is malformed for the op (wrong arity, split axis out of range).
    #[error("op `{op}`: invalid signature {signature}: {reason} (candidates: {candidates})")]
    InvalidSignature {
        /// The op.
        op: String,
        /// The signature, as text.
        signature: String,
        /// Its candidate signatures.
        candidates: String,
        /// What is wrong.
        reason: String,
    },
    /// A graph that cannot be ordered or that refers to ops it does not hold.
    #[error("graph: {reason}")]
    Graph {
        /// What is wrong.
        reason: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
