//! Building one rank's shard of a variable, in the layout the loading session gives it, from the
//! regions a checkpoint stores (saved under any other layout): every stored region that meets
//! the rank's region contributes their intersection. When the layouts match, a stored region
//! equals the wanted one and is taken as is, without a copy.

use meshflow_ops::{DType, Tensor as HostTensor};
use meshflow_placement::Region;

use crate::exec::layout::{put_box, take_box};
use crate::session::shards::{RankAssignments, VariableSpec};
use crate::Result;

/// A variable to load and the stored regions of its logical tensor (which tile it exactly).
pub struct Pieces {
    /// The variable in the loading session.
    pub spec: VariableSpec,
    /// The stored regions and their values.
    pub stored: Vec<(Region, HostTensor)>,
}

/// The shards `rank` holds of every variable in `plan`, built from the stored regions.
pub fn rank_shards(rank: usize, plan: &[Pieces]) -> Result<RankAssignments> {
    let mut out = Vec::new();
    for pieces in plan {
        let Some(target) = pieces.spec.region(rank)? else { continue };
        let shard = region_from(&target, pieces.spec.meta.dtype, &pieces.stored)?;
        out.push((pieces.spec.name.clone(), shard));
    }
    Ok(out)
}

/// The values of `target` from stored regions that tile the logical tensor.
pub fn region_from(
    target: &Region,
    dtype: DType,
    stored: &[(Region, HostTensor)],
) -> Result<HostTensor> {
    if let Some((_, tensor)) = stored.iter().find(|(region, _)| region == target) {
        return Ok(tensor.clone());
    }
    let mut out = HostTensor::zeros(target.shape.clone(), dtype);
    for (region, tensor) in stored {
        let Some(common) = region.intersect(target) else { continue };
        let relative = |base: &Region| -> Vec<usize> {
            common.offsets.iter().zip(&base.offsets).map(|(c, b)| c - b).collect()
        };
        let piece = take_box(tensor, &relative(region), &common.shape)?;
        put_box(&mut out, &relative(target), &piece)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(offsets: &[usize], shape: &[usize]) -> Region {
        Region { offsets: offsets.to_vec(), shape: shape.to_vec() }
    }

    /// Rows split in two (as saved on two devices) give columns 1..3 of rows 1..3.
    #[test]
    fn a_region_across_stored_pieces() {
        let whole: Vec<f32> = (0..16).map(|x| x as f32).collect();
        let top = HostTensor::from_vec(whole[..8].to_vec(), [2, 4]).unwrap();
        let bottom = HostTensor::from_vec(whole[8..].to_vec(), [2, 4]).unwrap();
        let stored = [(region(&[0, 0], &[2, 4]), top), (region(&[2, 0], &[2, 4]), bottom)];
        let got = region_from(&region(&[1, 1], &[2, 2]), DType::F32, &stored).unwrap();
        assert_eq!(got.dims(), &[2, 2]);
        assert_eq!(got.to_vec::<f32>().unwrap(), [5.0, 6.0, 9.0, 10.0]);
        let same = region_from(&region(&[2, 0], &[2, 4]), DType::F32, &stored).unwrap();
        assert_eq!(same.to_vec::<f32>().unwrap(), whole[8..]);
    }
}
