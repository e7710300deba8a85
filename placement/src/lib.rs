//! How global tensors live on a mesh of devices.
//!
//! - [`Placement`]: a device type and a mesh of ranks (hierarchy such as `[4]` or `[2, 2]`).
//! - [`Sbp`] / [`NdSbp`]: Split(axis), Broadcast or PartialSum on each mesh axis.
//! - [`Signature`]: the SBP of every input and output of one op that makes the per-device
//!   computation exact. Ops (in `meshflow-ops`) declare their 1-D signatures; nd signatures are the
//!   product over mesh axes.

mod sbp;
mod signature;

pub use sbp::{NdSbp, Sbp};
pub use signature::{NdSignature, Signature};
