//! Moving a tensor between two different placements: which source device sends which region
//! to which target device.

use std::collections::HashMap;

use crate::{local_region, Layout, Region, Result, Sbp};

/// One region a target device copies from one source device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Row-major position of the source device in the source placement.
    pub source_index: usize,
    /// The region, in logical coordinates.
    pub region: Region,
    /// True when source and target are the same device (a local copy, no bytes on the wire).
    pub local: bool,
}

/// For every target device (row-major), the pieces it copies.
///
/// When both layouts have one mesh shape and one nd-SBP (a send/recv), device `i` copies the
/// whole local tensor of source device `i`, partial sums included. Otherwise `source` must hold
/// no partial sum, and a target device whose coordinate on a PartialSum mesh axis is not 0
/// copies nothing: it holds zeros, and coordinate 0 holds the value (the B→P rule).
pub fn transfer_pieces(
    logical: &[usize],
    source: &Layout,
    target: &Layout,
) -> Result<Vec<Vec<Piece>>> {
    let same_mesh = source.placement.hierarchy() == target.placement.hierarchy();
    if same_mesh && source.nd_sbp == target.nd_sbp {
        let regions = source.placement.regions(logical, &source.nd_sbp.without_partial())?;
        let pieces = regions.into_iter().enumerate().map(|(index, region)| {
            let local = source.placement.ranks()[index] == target.placement.ranks()[index]
                && source.placement.device() == target.placement.device();
            vec![Piece { source_index: index, region, local }]
        });
        return Ok(pieces.collect());
    }
    let holders = distinct_regions(logical, source)?;
    let target_plain = target.nd_sbp.without_partial();
    let placement = &target.placement;
    let mut all = Vec::with_capacity(placement.size());
    for index in 0..placement.size() {
        let coordinates = placement.coordinates_of_index(index);
        let zero = target.nd_sbp.axes().iter().zip(&coordinates);
        if zero.into_iter().any(|(&sbp, &c)| sbp == Sbp::PartialSum && c != 0) {
            all.push(Vec::new());
            continue;
        }
        let wanted = local_region(logical, &target_plain, placement.hierarchy(), &coordinates)?;
        let rank = placement.ranks()[index];
        let pieces = holders.iter().filter_map(|(region, indices)| {
            let common = region.intersect(&wanted)?;
            let same = indices.iter().copied().find(|&i| {
                source.placement.ranks()[i] == rank
                    && source.placement.device() == placement.device()
            });
            let source_index = same.unwrap_or(indices[index % indices.len()]);
            Some(Piece { source_index, region: common, local: same.is_some() })
        });
        all.push(pieces.collect());
    }
    Ok(all)
}

/// The distinct regions of a non-partial layout, each with the devices holding a copy, in
/// order of first appearance.
fn distinct_regions(logical: &[usize], source: &Layout) -> Result<Vec<(Region, Vec<usize>)>> {
    let regions = source.placement.regions(logical, &source.nd_sbp)?;
    let mut order: Vec<(Region, Vec<usize>)> = Vec::new();
    let mut position: HashMap<Region, usize> = HashMap::new();
    for (index, region) in regions.into_iter().enumerate() {
        match position.get(&region) {
            Some(&at) => order[at].1.push(index),
            None => {
                position.insert(region.clone(), order.len());
                order.push((region, vec![index]));
            }
        }
    }
    Ok(order)
}

/// The most bytes any target device receives over the wire.
pub fn transfer_bytes(pieces: &[Vec<Piece>], dtype_size: usize) -> u64 {
    let received = pieces.iter().map(|list| {
        list.iter().filter(|piece| !piece.local).map(|piece| piece.region.numel()).sum::<usize>()
    });
    (received.max().unwrap_or(0) * dtype_size) as u64
}
