//! Local (per-device) shapes and offsets of a logical tensor under an nd-SBP.
//!
//! Mesh axes apply in order, outermost first: a split on mesh axis `k` divides the range that
//! the outer axes left along its tensor axis, so `(S(0), S(0))` on a `[2, 2]` mesh cuts axis 0
//! in two, then each half in two again (nested splits). Splits are balanced: with `len`
//! elements over `p` devices the first `len % p` devices hold one more. Broadcast and PartialSum
//! keep the range (a partial sum holds an addend of the full region).

use crate::{Error, NdSbp, Placement, Result, Sbp};

/// A box of a logical tensor: the offset and the length along each axis.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    /// Offset along each axis.
    pub offsets: Vec<usize>,
    /// Length along each axis (the local shape).
    pub shape: Vec<usize>,
}

impl Region {
    /// The whole tensor of the given shape.
    pub fn full(shape: &[usize]) -> Self {
        Region { offsets: vec![0; shape.len()], shape: shape.to_vec() }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The common part of two regions of the same tensor, `None` when empty.
    pub fn intersect(&self, other: &Region) -> Option<Region> {
        let mut offsets = Vec::with_capacity(self.shape.len());
        let mut shape = Vec::with_capacity(self.shape.len());
        for axis in 0..self.shape.len() {
            let start = self.offsets[axis].max(other.offsets[axis]);
            let end = (self.offsets[axis] + self.shape[axis])
                .min(other.offsets[axis] + other.shape[axis]);
            if end <= start {
                return None;
            }
            offsets.push(start);
            shape.push(end - start);
        }
        Some(Region { offsets, shape })
    }

    /// This region cut to part `index` of `parts` along `axis` (balanced).
    pub fn split(&self, axis: usize, parts: usize, index: usize) -> Region {
        let (start, len) = balanced_range(self.shape[axis], parts, index);
        let mut region = self.clone();
        region.offsets[axis] += start;
        region.shape[axis] = len;
        region
    }
}

/// Start and length of part `index` when `len` elements are split over `parts` devices: the
/// first `len % parts` parts hold one more element.
///
/// ```
/// use meshflow_placement::balanced_range;
/// let parts: Vec<_> = (0..3).map(|i| balanced_range(7, 3, i)).collect();
/// assert_eq!(parts, [(0, 3), (3, 2), (5, 2)]);
/// ```
pub fn balanced_range(len: usize, parts: usize, index: usize) -> (usize, usize) {
    let base = len / parts;
    let extra = len % parts;
    let start = index * base + index.min(extra);
    (start, base + usize::from(index < extra))
}

/// Checks that `nd_sbp` has one SBP per mesh axis of `placement` and splits only axes that a
/// tensor of shape `logical` has; `context` names the op or edge in the error.
pub fn check_layout(
    context: &str,
    logical: &[usize],
    nd_sbp: &NdSbp,
    placement: &Placement,
) -> Result<()> {
    if nd_sbp.len() != placement.mesh_axes() {
        return Err(Error::MeshAxes {
            context: context.to_string(),
            nd_sbp: nd_sbp.clone(),
            got: nd_sbp.len(),
            placement: placement.to_string(),
            expected: placement.mesh_axes(),
        });
    }
    nd_sbp.check_rank(context, logical)
}

/// The region of a tensor of shape `logical` that the device at mesh `coordinates` holds under
/// `nd_sbp` on a mesh of shape `hierarchy` (nested balanced splits, outer mesh axes first).
pub fn local_region(
    logical: &[usize],
    nd_sbp: &NdSbp,
    hierarchy: &[usize],
    coordinates: &[usize],
) -> Result<Region> {
    nd_sbp.check_rank("local_region", logical)?;
    let mut region = Region::full(logical);
    for ((sbp, &parts), &index) in nd_sbp.axes().iter().zip(hierarchy).zip(coordinates) {
        if let Sbp::Split(axis) = *sbp {
            region = region.split(axis, parts, index);
        }
    }
    Ok(region)
}

/// The local shape that the device at mesh `coordinates` holds (see [`local_region`]).
pub fn local_shape(
    logical: &[usize],
    nd_sbp: &NdSbp,
    hierarchy: &[usize],
    coordinates: &[usize],
) -> Result<Vec<usize>> {
    Ok(local_region(logical, nd_sbp, hierarchy, coordinates)?.shape)
}

impl Placement {
    /// The region each device holds, in row-major device order; checks the layout first.
    pub fn regions(&self, logical: &[usize], nd_sbp: &NdSbp) -> Result<Vec<Region>> {
        check_layout("regions", logical, nd_sbp, self)?;
        (0..self.size())
            .map(|index| {
                let coordinates = self.coordinates_of_index(index);
                local_region(logical, nd_sbp, self.hierarchy(), &coordinates)
            })
            .collect()
    }
}
