//! Gathering a distributed value back to one logical host tensor.

use meshflow_ops::ops::add::Add;
use meshflow_ops::{Context, Op, Tensor, TensorMeta};
use meshflow_placement::{local_region, Layout, Sbp};

use crate::exec::layout::{put_box, take_box};
use crate::{Error, Result};

/// The logical tensor from the shards of every rank (`shards[rank]`) under `layout`: split
/// regions are placed, broadcast copies taken once (coordinate 0), partial sums added.
pub fn assemble(meta: &TensorMeta, layout: &Layout, shards: &[Option<Tensor>]) -> Result<Tensor> {
    let placement = &layout.placement;
    let axes = layout.nd_sbp.axes();
    let partial = axes.contains(&Sbp::PartialSum);
    let mut out = Tensor::zeros(meta.shape.clone(), meta.dtype);
    for index in 0..placement.size() {
        let coordinates = placement.coordinates_of_index(index);
        let replica = axes.iter().zip(&coordinates).any(|(s, c)| *s == Sbp::Broadcast && *c != 0);
        if replica {
            continue;
        }
        let rank = placement.ranks()[index];
        let shard = shards.get(rank).and_then(Option::as_ref).ok_or_else(|| {
            Error::Runtime(format!(
                "rank {rank} returned no shard of a {} {} value",
                meta.shape, meta.dtype
            ))
        })?;
        let region =
            local_region(meta.shape.dims(), &layout.nd_sbp, placement.hierarchy(), &coordinates)?;
        if shard.dims() != region.shape.as_slice() {
            return Err(Error::Runtime(format!(
                "rank {rank} returned a shard of shape {:?}, expected {:?} under {layout}",
                shard.dims(),
                region.shape
            )));
        }
        let part = if partial {
            let held = take_box(&out, &region.offsets, &region.shape)?;
            Add.forward(&Context::single_thread(), &[held, shard.clone()])?.remove(0)
        } else {
            shard.clone()
        };
        put_box(&mut out, &region.offsets, &part)?;
    }
    Ok(out)
}
