//! The one place where the collective for an SBP conversion and its cost are chosen.
//!
//! Costs are the bytes one rank receives with ring algorithms, for a group of `p` devices on one
//! mesh axis and a group tensor of `|T|` bytes (what one device holds once the group's axis is
//! gathered: its local tensor with that mesh axis set to Broadcast):
//!
//! | conversion | step | bytes per rank |
//! | --- | --- | --- |
//! | `P -> B` | all-reduce (ring reduce-scatter then all-gather) | `2(p−1)/p · |T|` |
//! | `P -> S(a)` | reduce-scatter | `(p−1)/p · |T|` |
//! | `S(a) -> B` | all-gather | `(p−1)/p · |T|` |
//! | `S(a) -> S(b)` | all-to-all (each rank holds `|T|/p`, keeps `1/p` of it) | `(p−1)/p² · |T|` |
//! | `B -> S(a)` | local slice | `0` |
//! | `B -> P` | zero-fill (coordinate 0 keeps its copy, the others hold zeros) | `0` |
//! | `S(a) -> P` | zero-fill (each pads its slice with zeros to the full region) | `0` |
//!
//! Across placements a send/recv or slice-copy moves, to each target rank, the bytes of its
//! region that no source replica on the same device holds.

use crate::Sbp;

use super::StepKind;

/// The step that turns mesh axis `mesh_axis` from `from` into `to` on one placement, or `None`
/// when they are equal.
pub fn axis_step(mesh_axis: usize, from: Sbp, to: Sbp) -> Option<StepKind> {
    use Sbp::{Broadcast as B, PartialSum as P, Split as S};
    let kind = match (from, to) {
        _ if from == to => return None,
        (P, B) => StepKind::AllReduce { mesh_axis },
        (P, S(tensor_axis)) => StepKind::ReduceScatter { mesh_axis, tensor_axis },
        (S(tensor_axis), B) => StepKind::AllGather { mesh_axis, tensor_axis },
        (S(from_axis), S(to_axis)) => StepKind::AllToAll { mesh_axis, from_axis, to_axis },
        (B, S(tensor_axis)) => StepKind::LocalSlice { mesh_axis, tensor_axis },
        (B | S(_), P) => StepKind::ZeroFill { mesh_axis, from },
        (B, B) | (P, P) => return None,
    };
    Some(kind)
}

/// Bytes one rank receives for a step on a group of `group_size` devices whose group tensor
/// holds `group_bytes` bytes (see the table in the module doc).
pub fn axis_step_bytes(kind: &StepKind, group_size: usize, group_bytes: u64) -> u64 {
    let p = group_size as u64;
    let share = |numerator: u64, denominator: u64| (group_bytes * numerator).div_ceil(denominator);
    match kind {
        StepKind::AllReduce { .. } => share(2 * (p - 1), p),
        StepKind::ReduceScatter { .. } | StepKind::AllGather { .. } => share(p - 1, p),
        StepKind::AllToAll { .. } => share(p - 1, p * p),
        StepKind::LocalSlice { .. }
        | StepKind::ZeroFill { .. }
        | StepKind::SendRecv
        | StepKind::SliceCopy => 0,
    }
}
