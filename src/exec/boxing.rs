//! Runs boxing plans (from `meshflow-placement`) on real tensors, one rank at a time.
//!
//! Each rank calls [`apply_plan`] for the same plans in the same order; collective steps go
//! through the [`Comms`] of the rank (one communicator per mesh-axis group, one for the world).
//! Steps that `meshflow-comm` implements on dim 0 move the step's tensor axis to the front and
//! back. Local steps (slice, zero-fill) and cross-placement copies work on regions, so they agree
//! exactly with `meshflow_placement::local_region` for uneven and nested splits.

use std::collections::HashMap;

use meshflow_comm::{Communicator, ReduceOp};
use meshflow_ops::{DType, Tensor};
use meshflow_placement::{
    local_region, transfer_pieces, BoxingPlan, BoxingStep, Layout, Placement, Region, Sbp, StepKind,
};

use super::layout::{axis_from_front, axis_to_front, concat, put_box, take_box};
use crate::{Error, Result};

/// The communicators of one rank: one per group (listed by its ranks), and one over the world
/// for point-to-point copies.
pub struct Comms {
    /// This rank.
    pub rank: usize,
    /// Communicators by the ranks of their group, in group order.
    pub groups: HashMap<Vec<usize>, Box<dyn Communicator>>,
    /// A communicator over every rank of the world (member index = rank).
    pub world: Box<dyn Communicator>,
}

impl Comms {
    fn group(&mut self, ranks: &[usize]) -> Result<&mut Box<dyn Communicator>> {
        let rank = self.rank;
        self.groups.get_mut(ranks).ok_or_else(|| {
            Error::Runtime(format!("rank {rank}: no communicator for group {ranks:?}"))
        })
    }
}

/// Applies `plan` to this rank's shard `local` (`None` when the rank is not in the source
/// placement) and returns its shard of the target layout (`None` when it is not in the target).
pub fn apply_plan(
    plan: &BoxingPlan,
    dtype: DType,
    local: Option<Tensor>,
    comms: &mut Comms,
) -> Result<Option<Tensor>> {
    let mut current = local;
    for step in &plan.steps {
        current = apply_step(&plan.logical, dtype, step, current, comms)
            .map_err(|e| step_error(step, e))?;
    }
    Ok(current)
}

/// The ranks of the group on `mesh_axis` of the device at `coordinates` of `placement`, in
/// group order (a member's index is its coordinate on `mesh_axis`).
pub fn group_ranks(placement: &Placement, coordinates: &[usize], mesh_axis: usize) -> Vec<usize> {
    let index = placement.index_of_coordinates(coordinates);
    let ranks = placement.ranks();
    placement.group_of_index(index, mesh_axis).into_iter().map(|i| ranks[i]).collect()
}

/// `error` of a plan's `step`, naming the step.
pub fn step_error(step: &BoxingStep, error: Error) -> Error {
    Error::Boxing { step: step.to_string(), source: Box::new(error) }
}

/// The box a `LocalSlice` step keeps of `rank`'s shard: its offsets in the shard and its
/// shape (`None` when `rank` is not in the step's placement or the step is not a slice).
pub fn local_slice(
    logical: &[usize],
    step: &BoxingStep,
    rank: usize,
) -> Result<Option<(Vec<usize>, Vec<usize>)>> {
    let StepKind::LocalSlice { .. } = step.kind else { return Ok(None) };
    let placement = &step.before.placement;
    let Some(coordinates) = placement.coordinates(rank) else { return Ok(None) };
    let region = |layout: &Layout| {
        local_region(logical, &layout.nd_sbp, placement.hierarchy(), &coordinates)
    };
    let (before, after) = (region(&step.before)?, region(&step.after)?);
    Ok(Some((relative(&after, &before), after.shape)))
}

/// Applies one step of a plan to this rank's shard on the host (see [`apply_plan`]).
pub fn apply_step(
    logical: &[usize],
    dtype: DType,
    step: &BoxingStep,
    local: Option<Tensor>,
    comms: &mut Comms,
) -> Result<Option<Tensor>> {
    if matches!(step.kind, StepKind::SendRecv | StepKind::SliceCopy) {
        return copy_across(logical, dtype, &step.before, &step.after, local, comms);
    }
    let Some(local) = local else {
        return Ok(None);
    };
    let placement = &step.before.placement;
    let Some(coordinates) = placement.coordinates(comms.rank) else {
        return Ok(None);
    };
    let region = |layout: &Layout| {
        local_region(logical, &layout.nd_sbp, placement.hierarchy(), &coordinates)
    };
    let group = |axis: usize| group_ranks(placement, &coordinates, axis);
    let out = match step.kind {
        StepKind::AllReduce { mesh_axis } => {
            comms.group(&group(mesh_axis))?.all_reduce(&local, ReduceOp::Sum)?
        }
        StepKind::ReduceScatter { mesh_axis, tensor_axis } => {
            let front = axis_to_front(&local, tensor_axis)?;
            let reduced = comms.group(&group(mesh_axis))?.reduce_scatter(&front, ReduceOp::Sum)?;
            axis_from_front(&reduced, tensor_axis)?
        }
        StepKind::AllGather { mesh_axis, tensor_axis } => {
            let front = axis_to_front(&local, tensor_axis)?;
            let gathered = comms.group(&group(mesh_axis))?.all_gather(&front)?;
            axis_from_front(&gathered, tensor_axis)?
        }
        StepKind::AllToAll { mesh_axis, from_axis, to_axis } => {
            let members = group(mesh_axis);
            let front = axis_to_front(&local, to_axis)?;
            let exchanged = comms.group(&members)?.all_to_all(&front)?;
            let piece = exchanged.dims()[0] / members.len();
            let mut parts = Vec::with_capacity(members.len());
            for i in 0..members.len() {
                let mut offsets = vec![0; exchanged.dims().len()];
                offsets[0] = i * piece;
                let mut shape = exchanged.dims().to_vec();
                shape[0] = piece;
                parts.push(axis_from_front(&take_box(&exchanged, &offsets, &shape)?, to_axis)?);
            }
            concat(&parts, from_axis)?
        }
        StepKind::LocalSlice { .. } => {
            let (offsets, shape) = local_slice(logical, step, comms.rank)?
                .ok_or_else(|| Error::Runtime(format!("{step}: not a slice of this rank")))?;
            take_box(&local, &offsets, &shape)?
        }
        StepKind::ZeroFill { mesh_axis, from } => {
            let keep = coordinates[mesh_axis] == 0;
            match from {
                Sbp::Split(_) => {
                    let (before, after) = (region(&step.before)?, region(&step.after)?);
                    let mut out = Tensor::zeros(after.shape.clone(), local.dtype());
                    put_box(&mut out, &relative(&before, &after), &local)?;
                    out
                }
                _ if keep => local,
                _ => Tensor::zeros(local.shape().clone(), local.dtype()),
            }
        }
        StepKind::SendRecv | StepKind::SliceCopy => unreachable!("handled above"),
    };
    Ok(Some(out))
}

/// Offsets of `inner` relative to `outer` (both logical regions, `inner` inside `outer`).
fn relative(inner: &Region, outer: &Region) -> Vec<usize> {
    inner.offsets.iter().zip(&outer.offsets).map(|(i, o)| i - o).collect()
}

/// Copies between two placements: every source device sends the regions each target device
/// needs; targets assemble their shard (zeros where a PartialSum axis holds nothing).
fn copy_across(
    logical: &[usize],
    dtype: DType,
    source: &Layout,
    target: &Layout,
    local: Option<Tensor>,
    comms: &mut Comms,
) -> Result<Option<Tensor>> {
    let pieces = transfer_pieces(logical, source, target)?;
    let me = comms.rank;
    let source_region = |index: usize| {
        let c = source.placement.coordinates_of_index(index);
        local_region(logical, &source.nd_sbp, source.placement.hierarchy(), &c)
    };
    // Sends first (buffered), in target order.
    if let (Some(local), Some(my_coordinates)) = (&local, source.placement.coordinates(me)) {
        let my_index = source.placement.index_of_coordinates(&my_coordinates);
        let mine = source_region(my_index)?;
        for (t, wanted) in pieces.iter().enumerate() {
            let to = target.placement.ranks()[t];
            for piece in wanted.iter().filter(|p| p.source_index == my_index && to != me) {
                let part = take_box(local, &relative(&piece.region, &mine), &piece.region.shape)?;
                comms.world.send(&part, to)?;
            }
        }
    }
    let Some(my_coordinates) = target.placement.coordinates(me) else {
        return Ok(None);
    };
    let t = target.placement.index_of_coordinates(&my_coordinates);
    let plain = target.nd_sbp.without_partial();
    let mine = local_region(logical, &plain, target.placement.hierarchy(), &my_coordinates)?;
    let mut out = Tensor::zeros(mine.shape.clone(), dtype);
    for piece in &pieces[t] {
        let from = source.placement.ranks()[piece.source_index];
        let part = if from == me {
            let local =
                local.as_ref().ok_or_else(|| Error::Runtime("copy: missing local shard".into()))?;
            let held = source_region(piece.source_index)?;
            take_box(local, &relative(&piece.region, &held), &piece.region.shape)?
        } else {
            comms.world.recv(from)?
        };
        put_box(&mut out, &relative(&piece.region, &mine), &part)?;
    }
    Ok(Some(out))
}
