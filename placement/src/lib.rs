//! How global tensors live on a mesh of devices, and what it costs to move them.
//!
//! - [`Placement`]: a device type and a mesh of ranks (hierarchy such as `[4]` or `[2, 2]`),
//!   written as text: `cpu:0-3`, `cuda:[[0,1],[2,3]]`.
//! - [`Sbp`] / [`NdSbp`]: Split(axis), Broadcast or PartialSum on each mesh axis; [`local_region`]
//!   gives the exact local shape and offsets on every device (balanced, nested splits).
//! - [`Signature`]: the SBP of every input and output of one op that makes the per-device
//!   computation exact. Ops (in `meshflow-ops`) declare their 1-D signatures; nd signatures are
//!   the product over mesh axes ([`nd_signatures`]).
//! - [`plan_boxing`]: the steps (all-reduce, reduce-scatter, all-gather, all-to-all, local
//!   slice, zero-fill, send/recv, slice-copy) from one [`Layout`] to another, with the bytes
//!   each moves; [`reference`](mod@reference) executes plans on dense tensors to check them.
//! - [`select`]: a signature per op of a graph, greedy or searched, with a report.

pub mod boxing;
mod error;
mod layout;
mod placement;
pub mod reference;
mod sbp;

pub mod select;
mod signature;

pub use boxing::{plan_boxing, transfer_pieces, BoxingPlan, BoxingStep, Layout, Piece, StepKind};
pub use error::{Error, Result};
pub use layout::{balanced_range, check_layout, local_region, local_shape, Region};
pub use placement::{DeviceType, Placement};
pub use sbp::{NdSbp, Sbp};
pub use select::CostConfig;
pub use signature::{find_signature, list_text, nd_signatures, NdSignature, Signature};
