//! A reference, in-memory execution of boxing plans on small dense `f64` tensors.
//!
//! It exists to check plans: shard a logical tensor per a layout ([`Sharded::shard`]), apply a
//! plan's steps with the semantics each [`StepKind`] promises ([`Sharded::apply`]), and compare
//! every device's data with the logical tensor ([`Sharded::mismatch`]). The same helpers split
//! inputs and assemble outputs in the op conformance suite.

use crate::{
    balanced_range, local_region, transfer_pieces, BoxingPlan, BoxingStep, Layout, Region, Result,
    Sbp, StepKind,
};

/// A dense row-major `f64` tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseTensor {
    /// The dimensions.
    pub shape: Vec<usize>,
    /// The elements, row-major; `data.len()` is the product of `shape`.
    pub data: Vec<f64>,
}

impl DenseTensor {
    /// A tensor from its shape and data.
    ///
    /// # Panics
    /// When `data.len()` is not the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Self {
        assert_eq!(data.len(), shape.iter().product::<usize>(), "data length and shape differ");
        DenseTensor { shape, data }
    }

    /// A zero tensor.
    pub fn zeros(shape: &[usize]) -> Self {
        DenseTensor { shape: shape.to_vec(), data: vec![0.0; shape.iter().product()] }
    }

    /// The elements inside `region` (in this tensor's coordinates).
    pub fn slice(&self, region: &Region) -> DenseTensor {
        let mut out = DenseTensor::zeros(&region.shape);
        for_each_index(&region.shape, |position, index| {
            out.data[position] = self.data[self.flat(&region.offsets, index)];
        });
        out
    }

    /// Writes `source` into `region` (in this tensor's coordinates).
    pub fn write(&mut self, region: &Region, source: &DenseTensor) {
        for_each_index(&region.shape, |position, index| {
            let at = self.flat(&region.offsets, index);
            self.data[at] = source.data[position];
        });
    }

    /// Part `index` of `parts` along `axis` (balanced split).
    pub fn split(&self, axis: usize, parts: usize, index: usize) -> DenseTensor {
        self.slice(&Region::full(&self.shape).split(axis, parts, index))
    }

    /// The tensors concatenated along `axis` (they agree on every other axis).
    pub fn concat(axis: usize, parts: &[DenseTensor]) -> DenseTensor {
        let mut shape = parts[0].shape.clone();
        shape[axis] = parts.iter().map(|part| part.shape[axis]).sum();
        let mut out = DenseTensor::zeros(&shape);
        let mut offset = 0;
        for part in parts {
            let mut region = Region::full(&part.shape);
            region.offsets[axis] = offset;
            out.write(&region, part);
            offset += part.shape[axis];
        }
        out
    }

    /// Element-wise sum of tensors of one shape.
    pub fn sum(parts: &[DenseTensor]) -> DenseTensor {
        let mut out = DenseTensor::zeros(&parts[0].shape);
        for part in parts {
            out.data.iter_mut().zip(&part.data).for_each(|(o, v)| *o += v);
        }
        out
    }

    /// The largest absolute element difference, or infinity when the shapes differ.
    pub fn max_abs_diff(&self, other: &DenseTensor) -> f64 {
        if self.shape != other.shape {
            return f64::INFINITY;
        }
        self.data.iter().zip(&other.data).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
    }

    fn flat(&self, offsets: &[usize], index: &[usize]) -> usize {
        let mut flat = 0;
        for axis in 0..self.shape.len() {
            flat = flat * self.shape[axis] + offsets[axis] + index[axis];
        }
        flat
    }
}

/// Calls `f(position, index)` for every multi-index of `shape` in row-major order.
fn for_each_index(shape: &[usize], mut f: impl FnMut(usize, &[usize])) {
    let count: usize = shape.iter().product();
    let mut index = vec![0; shape.len()];
    for position in 0..count {
        f(position, &index);
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
}

/// A logical tensor as it lives on every device of a layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Sharded {
    /// The layout.
    pub layout: Layout,
    /// The logical shape.
    pub logical: Vec<usize>,
    /// One local tensor per device, row-major over the mesh.
    pub locals: Vec<DenseTensor>,
}

impl Sharded {
    /// Splits `logical` per `layout`. On PartialSum mesh axes the value is split into random
    /// addends drawn from `random` (the last member holds the value minus the others); the
    /// addends depend only on a device's coordinates on the partial axes, so every copy along
    /// a Broadcast axis is identical.
    pub fn shard(
        logical: &DenseTensor,
        layout: &Layout,
        random: &mut dyn FnMut() -> f64,
    ) -> Result<Sharded> {
        let placement = &layout.placement;
        let plain = layout.nd_sbp.without_partial();
        let regions = placement.regions(&logical.shape, &plain)?;
        let partial_axes: Vec<usize> = (0..layout.nd_sbp.len())
            .filter(|&k| layout.nd_sbp.axes()[k] == Sbp::PartialSum)
            .collect();
        // addends[code] for the mixed-radix code of the partial coordinates.
        let mut addends = vec![logical.clone()];
        for &k in &partial_axes {
            let parts = placement.hierarchy()[k];
            addends =
                addends.iter().flat_map(|value| split_addends(value, parts, random)).collect();
        }
        let locals = regions
            .iter()
            .enumerate()
            .map(|(index, region)| {
                let coordinates = placement.coordinates_of_index(index);
                let code = partial_axes
                    .iter()
                    .fold(0, |code, &k| code * placement.hierarchy()[k] + coordinates[k]);
                addends[code].slice(region)
            })
            .collect();
        Ok(Sharded { layout: layout.clone(), logical: logical.shape.clone(), locals })
    }

    /// Applies every step of `plan`.
    pub fn apply_plan(mut self, plan: &BoxingPlan) -> Result<Sharded> {
        for step in &plan.steps {
            self = self.apply(step)?;
        }
        Ok(self)
    }

    /// Applies one step with the semantics its kind promises.
    pub fn apply(mut self, step: &BoxingStep) -> Result<Sharded> {
        match step.kind {
            StepKind::SendRecv | StepKind::SliceCopy => return self.transfer(&step.after),
            StepKind::AllReduce { mesh_axis } => self.per_group(mesh_axis, |locals| {
                let total = DenseTensor::sum(locals);
                vec![total; locals.len()]
            }),
            StepKind::ReduceScatter { mesh_axis, tensor_axis } => {
                self.per_group(mesh_axis, |locals| {
                    let total = DenseTensor::sum(locals);
                    (0..locals.len()).map(|i| total.split(tensor_axis, locals.len(), i)).collect()
                })
            }
            StepKind::AllGather { mesh_axis, tensor_axis } => self.per_group(mesh_axis, |locals| {
                vec![DenseTensor::concat(tensor_axis, locals); locals.len()]
            }),
            StepKind::AllToAll { mesh_axis, from_axis, to_axis } => {
                self.per_group(mesh_axis, |locals| {
                    let full = DenseTensor::concat(from_axis, locals);
                    (0..locals.len()).map(|i| full.split(to_axis, locals.len(), i)).collect()
                })
            }
            StepKind::LocalSlice { mesh_axis, tensor_axis } => {
                self.per_group(mesh_axis, |locals| {
                    let p = locals.len();
                    locals.iter().enumerate().map(|(i, t)| t.split(tensor_axis, p, i)).collect()
                })
            }
            StepKind::ZeroFill { mesh_axis, from } => {
                self.per_group(mesh_axis, |locals| zero_fill(locals, from))
            }
        }
        self.layout = step.after.clone();
        Ok(self)
    }

    /// Replaces the locals of each group along `mesh_axis` with `f(group's locals)`.
    fn per_group(&mut self, mesh_axis: usize, f: impl Fn(&[DenseTensor]) -> Vec<DenseTensor>) {
        for group in self.layout.placement.group_indices(mesh_axis) {
            let members: Vec<DenseTensor> =
                group.iter().map(|&index| self.locals[index].clone()).collect();
            for (index, local) in group.into_iter().zip(f(&members)) {
                self.locals[index] = local;
            }
        }
    }

    /// Every target device copies its pieces from the source devices.
    fn transfer(self, target: &Layout) -> Result<Sharded> {
        let pieces = transfer_pieces(&self.logical, &self.layout, target)?;
        let target_plain = target.nd_sbp.without_partial();
        let source_regions = self.layout.placement.regions(&self.logical, &self.layout.nd_sbp)?;
        let target_regions = target.placement.regions(&self.logical, &target_plain)?;
        let locals = target_regions
            .iter()
            .zip(&pieces)
            .map(|(wanted, list)| {
                let mut local = DenseTensor::zeros(&wanted.shape);
                for piece in list {
                    let source = &source_regions[piece.source_index];
                    let data =
                        self.locals[piece.source_index].slice(&relative(&piece.region, source));
                    local.write(&relative(&piece.region, wanted), &data);
                }
                local
            })
            .collect();
        Ok(Sharded { layout: target.clone(), logical: self.logical, locals })
    }

    /// `None` when every device holds what the layout says (each copy of a broadcast checked,
    /// partial sums summed), or a description of the first device that does not.
    pub fn mismatch(&self, logical: &DenseTensor, tolerance: f64) -> Option<String> {
        let placement = &self.layout.placement;
        let nd_sbp = &self.layout.nd_sbp;
        let partial_axes: Vec<usize> =
            (0..nd_sbp.len()).filter(|&k| nd_sbp.axes()[k] == Sbp::PartialSum).collect();
        for index in 0..placement.size() {
            let coordinates = placement.coordinates_of_index(index);
            if partial_axes.iter().any(|&k| coordinates[k] != 0) {
                continue;
            }
            let region =
                match local_region(&logical.shape, nd_sbp, placement.hierarchy(), &coordinates) {
                    Ok(region) => region,
                    Err(error) => return Some(error.to_string()),
                };
            let addends = self.partial_group(index, &partial_axes);
            let shapes_agree = addends.iter().all(|&i| self.locals[i].shape == region.shape);
            if !shapes_agree {
                return Some(format!("device {index}: local shape is not {:?}", region.shape));
            }
            let members: Vec<DenseTensor> =
                addends.iter().map(|&i| self.locals[i].clone()).collect();
            let diff = DenseTensor::sum(&members).max_abs_diff(&logical.slice(&region));
            if diff > tolerance {
                return Some(format!("device {index} (region {region:?}) is off by {diff}"));
            }
        }
        None
    }

    /// The devices that share `index`'s coordinates except on the partial mesh axes.
    fn partial_group(&self, index: usize, partial_axes: &[usize]) -> Vec<usize> {
        let mut members = vec![index];
        for &k in partial_axes {
            members = members
                .iter()
                .flat_map(|&member| self.layout.placement.group_of_index(member, k))
                .collect();
        }
        members
    }
}

/// `region` in the coordinates of `outer` (which contains it).
fn relative(region: &Region, outer: &Region) -> Region {
    let offsets = region.offsets.iter().zip(&outer.offsets).map(|(r, o)| r - o).collect();
    Region { offsets, shape: region.shape.clone() }
}

/// `parts` random tensors of `value`'s shape that sum to it.
fn split_addends(
    value: &DenseTensor,
    parts: usize,
    random: &mut dyn FnMut() -> f64,
) -> Vec<DenseTensor> {
    let mut rest = value.clone();
    let mut addends = Vec::with_capacity(parts);
    for _ in 1..parts {
        let addend: Vec<f64> = value.data.iter().map(|_| random()).collect();
        rest.data.iter_mut().zip(&addend).for_each(|(r, a)| *r -= a);
        addends.push(DenseTensor::new(value.shape.clone(), addend));
    }
    addends.push(rest);
    addends
}

/// `B -> P`: member 0 keeps its copy; `S(a) -> P`: each member pads its slice with zeros.
fn zero_fill(locals: &[DenseTensor], from: Sbp) -> Vec<DenseTensor> {
    let Sbp::Split(axis) = from else {
        let zeros = DenseTensor::zeros(&locals[0].shape);
        let mut out = vec![zeros; locals.len()];
        out[0] = locals[0].clone();
        return out;
    };
    let total: usize = locals.iter().map(|local| local.shape[axis]).sum();
    let mut offset = 0;
    locals
        .iter()
        .map(|local| {
            let mut shape = local.shape.clone();
            shape[axis] = total;
            let mut padded = DenseTensor::zeros(&shape);
            let mut region = Region::full(&local.shape);
            region.offsets[axis] = offset;
            padded.write(&region, local);
            offset += local.shape[axis];
            padded
        })
        .collect()
}

/// Balanced part sizes, re-exported for callers that split by hand.
pub fn part_sizes(len: usize, parts: usize) -> Vec<usize> {
    (0..parts).map(|index| balanced_range(len, parts, index).1).collect()
}
