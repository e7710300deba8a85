//! Gathering a distributed value back to one logical host tensor.

use std::collections::HashSet;

use meshflow_ops::ops::add::Add;
use meshflow_ops::{Context, Op, Tensor, TensorMeta};
use meshflow_placement::{local_region, Layout, Sbp};

use crate::exec::layout::{put_box, take_box};
use crate::{Error, Result};

/// The logical tensor from the shards of every rank (`shards[rank]`, `None` where a rank's shard
/// is not at hand, e.g. in another process) under `layout`: split regions are placed, broadcast
/// copies taken once (from the first replica present), partial sums added.
pub fn assemble(meta: &TensorMeta, layout: &Layout, shards: &[Option<Tensor>]) -> Result<Tensor> {
    let placement = &layout.placement;
    let axes = layout.nd_sbp.axes();
    let partial = axes.contains(&Sbp::PartialSum);
    let mut out = Tensor::zeros(meta.shape.clone(), meta.dtype);
    let mut placed = HashSet::new();
    let mut missing = None;
    for index in 0..placement.size() {
        let coordinates = placement.coordinates_of_index(index);
        let region_key = region_key(axes, &coordinates);
        if placed.contains(&region_key) {
            continue;
        }
        let rank = placement.ranks()[index];
        let Some(shard) = shards.get(rank).and_then(Option::as_ref) else {
            missing.get_or_insert(rank);
            continue;
        };
        placed.insert(region_key);
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
    let regions: HashSet<Vec<usize>> = (0..placement.size())
        .map(|index| region_key(axes, &placement.coordinates_of_index(index)))
        .collect();
    match missing {
        Some(rank) if placed.len() < regions.len() => Err(Error::Runtime(format!(
            "rank {rank} returned no shard of a {} {} value under {layout}",
            meta.shape, meta.dtype
        ))),
        _ => Ok(out),
    }
}

/// Which region a device at `coordinates` holds: replicas of one region differ only in their
/// coordinates on broadcast axes, which are zeroed here.
fn region_key(axes: &[Sbp], coordinates: &[usize]) -> Vec<usize> {
    let pairs = axes.iter().zip(coordinates);
    pairs.map(|(s, &c)| if *s == Sbp::Broadcast { 0 } else { c }).collect()
}
