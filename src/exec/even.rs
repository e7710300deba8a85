//! Collective boxing steps as NCCL runs them: one collective on dim 0 whose members all send
//! pieces of one size, between two axis reorders of the rank's own tensors.
//!
//! The host executor ([`super::boxing`]) moves a step's tensor axis to the front with host
//! copies and lets the communicator cut dim 0 into (possibly uneven) chunks. On a GPU the same
//! step runs on device memory when every member's pieces have one size ([`EvenStep::of`]
//! says when): [`EvenStep::prepare`] views the shard with the group's axis split out and
//! permutes it to the front ([`Reorder`]), the collective runs on that flat buffer, and
//! [`EvenStep::finish`] views what arrived as `[members, ...]` and permutes the members' axis
//! to where the step's tensor axis concatenates them. A permutation that keeps every axis in
//! place is skipped, so a split on axis 0 moves no bytes besides the collective's.
//!
//! Every member of a group decides from what the members share: the step, the group's extent of
//! the target layout, and the shard's length on an axis the group does not split (the reduced
//! axis of a reduce-scatter, the `to` axis of an all-to-all), never from the length of its own
//! piece of a split axis. So all members take the same path: one NCCL call, or the host path
//! for all of them.

use meshflow_ops::Tensor;
use meshflow_placement::{local_region, BoxingStep, Region, StepKind};

use crate::{Error, Result};

/// The collective of an [`EvenStep`]: NCCL's, on dim 0 of a buffer every member sends in the
/// same size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvenCollective {
    /// Every member receives the sum.
    AllReduce,
    /// Every member receives all buffers, member by member.
    AllGather,
    /// Member `j` receives chunk `j` of the sum.
    ReduceScatter,
    /// Member `j` receives chunk `j` of every member's buffer, member by member.
    AllToAll,
}

/// A view of a tensor under other dims, then a permutation of its axes (output axis `k` is
/// axis `perm[k]` of the view).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reorder {
    /// The dims the tensor is viewed with (same element count).
    pub view: Vec<usize>,
    /// The permutation of the view's axes.
    pub perm: Vec<usize>,
}

impl Reorder {
    /// True when the permutation keeps every axis in place (the reorder is a view).
    pub fn is_view(&self) -> bool {
        self.perm.iter().enumerate().all(|(k, &axis)| k == axis)
    }

    /// `tensor` reordered; `permute` runs a permutation where the tensor lives.
    fn apply(
        &self,
        tensor: &Tensor,
        permute: &mut dyn FnMut(&Tensor, &[usize]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let viewed = tensor.reshaped(self.view.clone())?;
        if self.is_view() {
            Ok(viewed)
        } else {
            permute(&viewed, &self.perm)
        }
    }
}

/// One collective boxing step of one rank as an even collective.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvenStep {
    /// The ranks of the rank's group, in group order.
    pub group: Vec<usize>,
    /// The collective over `group`.
    pub collective: EvenCollective,
    /// From the rank's shard to the buffer it sends.
    pub before: Reorder,
    /// From the buffer it receives to ...
    pub after: Reorder,
    /// ... its shard of the step's target layout, these dims.
    pub out: Vec<usize>,
}

/// `axes` with axis 0 moved to position `to` (the others keep their order).
fn front_to(rank: usize, to: usize) -> Vec<usize> {
    (1..=to).chain([0]).chain(to + 1..rank).collect()
}

/// `axes` with axis `from` moved to the front.
fn to_front(rank: usize, from: usize) -> Vec<usize> {
    [from].into_iter().chain((0..rank).filter(|&a| a != from)).collect()
}

/// `dims` with axis `axis` cut into `(parts, dims[axis] / parts)`.
fn split_axis(dims: &[usize], axis: usize, parts: usize) -> Vec<usize> {
    let mut view = dims[..axis].to_vec();
    view.extend([parts, dims[axis] / parts]);
    view.extend_from_slice(&dims[axis + 1..]);
    view
}

impl EvenStep {
    /// `step` for `rank`, whose shard has `dims`, as an even collective: `None` when the step
    /// is not a collective, when `rank` is not in its placement, or when some member's piece
    /// would differ in size (an axis that does not divide by the group: the host path cuts
    /// uneven chunks).
    pub fn of(
        logical: &[usize],
        step: &BoxingStep,
        rank: usize,
        dims: &[usize],
    ) -> Result<Option<EvenStep>> {
        let placement = &step.before.placement;
        let Some(coordinates) = placement.coordinates(rank) else { return Ok(None) };
        let mesh_axis = match step.kind {
            StepKind::AllReduce { mesh_axis }
            | StepKind::ReduceScatter { mesh_axis, .. }
            | StepKind::AllGather { mesh_axis, .. }
            | StepKind::AllToAll { mesh_axis, .. } => mesh_axis,
            _ => return Ok(None),
        };
        let index = placement.index_of_coordinates(&coordinates);
        let ranks = placement.ranks();
        let group: Vec<usize> =
            placement.group_of_index(index, mesh_axis).into_iter().map(|i| ranks[i]).collect();
        let n = group.len();
        // The group's extent of the target layout, the same for every member.
        let after: Region = local_region(
            logical,
            &step.after.nd_sbp,
            step.after.placement.hierarchy(),
            &coordinates,
        )?;
        let rank_of = dims.len();
        let same =
            |view: &[usize]| Reorder { view: view.to_vec(), perm: (0..view.len()).collect() };
        let check = |axis: usize| {
            if axis < rank_of {
                Ok(())
            } else {
                Err(Error::Runtime(format!(
                    "boxing step {step}: tensor axis {axis} of a rank-{rank_of} shard"
                )))
            }
        };
        let even = match step.kind {
            StepKind::AllReduce { .. } => Some(EvenStep {
                group,
                collective: EvenCollective::AllReduce,
                before: same(dims),
                after: same(dims),
                out: dims.to_vec(),
            }),
            StepKind::AllGather { tensor_axis: k, .. } => {
                check(k)?;
                (after.shape[k] % n == 0).then(|| {
                    let mut view = vec![n];
                    view.extend_from_slice(dims);
                    let mut out = dims.to_vec();
                    out[k] *= n;
                    EvenStep {
                        group,
                        collective: EvenCollective::AllGather,
                        before: same(dims),
                        after: Reorder { perm: front_to(rank_of + 1, k), view },
                        out,
                    }
                })
            }
            StepKind::ReduceScatter { tensor_axis: k, .. } => {
                check(k)?;
                (dims[k] % n == 0).then(|| {
                    let mut out = dims.to_vec();
                    out[k] /= n;
                    EvenStep {
                        group,
                        collective: EvenCollective::ReduceScatter,
                        before: Reorder {
                            view: split_axis(dims, k, n),
                            perm: to_front(rank_of + 1, k),
                        },
                        after: same(&out),
                        out,
                    }
                })
            }
            StepKind::AllToAll { from_axis: f, to_axis: t, .. } => {
                check(f)?;
                check(t)?;
                (f != t && dims[t] % n == 0 && after.shape[f] % n == 0).then(|| {
                    // What member i sends member j: its shard's chunk j of the `to` axis.
                    let mut piece = dims.to_vec();
                    piece[t] /= n;
                    let mut view = vec![n];
                    view.extend_from_slice(&piece);
                    let mut out = piece;
                    out[f] *= n;
                    EvenStep {
                        group,
                        collective: EvenCollective::AllToAll,
                        before: Reorder {
                            view: split_axis(dims, t, n),
                            perm: to_front(rank_of + 1, t),
                        },
                        after: Reorder { perm: front_to(rank_of + 1, f), view },
                        out,
                    }
                })
            }
            _ => None,
        };
        Ok(even)
    }

    /// The buffer this rank sends: its shard reordered (`permute` runs where it lives).
    pub fn prepare(
        &self,
        local: &Tensor,
        permute: &mut dyn FnMut(&Tensor, &[usize]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.before.apply(local, permute)
    }

    /// This rank's shard of the target layout from the buffer the collective gave it.
    pub fn finish(
        &self,
        received: &Tensor,
        permute: &mut dyn FnMut(&Tensor, &[usize]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.after.apply(received, permute)?.reshaped(self.out.clone()).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshflow_ops::ops::permute::Permute;
    use meshflow_ops::{Context, Op};
    use meshflow_placement::reference::{DenseTensor, Sharded};
    use meshflow_placement::{plan_boxing, DeviceType, Layout, NdSbp, Placement, Sbp};

    fn to_tensor(dense: &DenseTensor) -> Tensor {
        let data = dense.data.iter().map(|&v| v as f32).collect();
        Tensor::from_vec(data, dense.shape.clone()).expect("a tensor")
    }

    fn cpu_permute(tensor: &Tensor, perm: &[usize]) -> Result<Tensor> {
        assert_eq!(tensor.device(), meshflow_ops::Device::Cpu);
        let op = Permute { perm: perm.to_vec() };
        Ok(op.forward(&Context::default(), std::slice::from_ref(tensor))?.remove(0))
    }

    /// What each member of a group receives from `sent` (one buffer per member, in group
    /// order), as NCCL's collectives define it on flat buffers.
    pub(crate) fn simulate(collective: EvenCollective, sent: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let n = sent.len();
        let len = sent[0].len();
        assert!(sent.iter().all(|s| s.len() == len), "uneven buffers");
        let sum: Vec<f32> = (0..len).map(|i| sent.iter().map(|s| s[i]).sum()).collect();
        let chunk = |buffer: &[f32], j: usize| buffer[j * len / n..(j + 1) * len / n].to_vec();
        (0..n)
            .map(|j| match collective {
                EvenCollective::AllReduce => sum.clone(),
                EvenCollective::AllGather => sent.concat(),
                EvenCollective::ReduceScatter => chunk(&sum, j),
                EvenCollective::AllToAll => sent.iter().flat_map(|s| chunk(s, j)).collect(),
            })
            .collect()
    }

    /// Where the test keeps its tensors: `place` moves a host tensor there, `permute` permutes
    /// one there.
    struct Where<'a> {
        place: &'a dyn Fn(Tensor) -> Tensor,
        permute: &'a mut dyn FnMut(&Tensor, &[usize]) -> Result<Tensor>,
    }

    /// Runs `step` on every rank of `before` through [`EvenStep`] with simulated collectives;
    /// `None` when the step is not even.
    fn run_even(
        logical: &[usize],
        step: &BoxingStep,
        before: &Sharded,
        at: &mut Where,
    ) -> Option<Vec<Tensor>> {
        let placement = &step.before.placement;
        let ranks = placement.ranks();
        let steps: Vec<Option<EvenStep>> = (0..ranks.len())
            .map(|i| {
                EvenStep::of(logical, step, ranks[i], &before.locals[i].shape).expect("a plan")
            })
            .collect();
        // (The shapes below divide alike in every group, so the whole mesh decides alike.)
        let decided = steps.iter().filter(|s| s.is_some()).count();
        assert!(decided == 0 || decided == ranks.len(), "{step}: members disagree on the path");
        let steps: Vec<EvenStep> = steps.into_iter().collect::<Option<_>>()?;
        let sent: Vec<Tensor> = steps
            .iter()
            .zip(&before.locals)
            .map(|(s, local)| {
                let local = (at.place)(to_tensor(local));
                s.prepare(&local, &mut *at.permute).expect("prepare")
            })
            .collect();
        let mut out = vec![None; ranks.len()];
        for (i, s) in steps.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            let members: Vec<usize> = s
                .group
                .iter()
                .map(|r| ranks.iter().position(|x| x == r).expect("a member"))
                .collect();
            let host = |t: &Tensor| meshflow_ops::cuda::to_host(t).expect("on the host");
            let buffers: Vec<Vec<f32>> =
                members.iter().map(|&m| host(&sent[m]).to_vec::<f32>().expect("f32")).collect();
            for (&m, got) in members.iter().zip(simulate(s.collective, &buffers)) {
                let received = (at.place)(Tensor::from_vec(got.clone(), [got.len()]).expect("in"));
                let shard = steps[m].finish(&received, &mut *at.permute).expect("finish");
                out[m] = Some(host(&shard));
            }
        }
        Some(out.into_iter().map(|t| t.expect("every rank")).collect())
    }

    fn layouts(mesh: &[usize], rank: usize) -> Vec<Layout> {
        let devices = mesh.iter().product::<usize>();
        let placement = Placement::new(DeviceType::Cpu, mesh.to_vec(), (0..devices).collect())
            .expect("a placement");
        let mut choices = vec![Sbp::Broadcast, Sbp::PartialSum];
        choices.extend((0..rank).map(Sbp::Split));
        let mut all: Vec<Vec<Sbp>> = vec![vec![]];
        for _ in mesh {
            all = all
                .into_iter()
                .flat_map(|prefix| {
                    choices.iter().map(move |&s| {
                        let mut next = prefix.clone();
                        next.push(s);
                        next
                    })
                })
                .collect();
        }
        all.into_iter().map(|sbp| Layout::new(placement.clone(), NdSbp(sbp))).collect()
    }

    /// Every collective step of every plan between two layouts of a few meshes, run as an even
    /// collective (tensors and permutations per `at`, collectives simulated), gives every rank
    /// exactly the shard the reference executor gives it; steps over axes that do not divide
    /// stay on the host path. Returns (even, host) steps per step kind.
    fn check_every_plan(
        at: &mut Where,
    ) -> std::collections::BTreeMap<&'static str, (usize, usize)> {
        let mut kinds = std::collections::BTreeMap::<&str, (usize, usize)>::new();
        for (mesh, logical) in [
            (vec![2], vec![4, 6, 8]),
            (vec![4], vec![4, 8, 12]),
            (vec![2, 2], vec![4, 8, 4]),
            (vec![2], vec![3, 5, 4]),
            (vec![3], vec![6, 5, 3]),
        ] {
            let numel = logical.iter().product::<usize>();
            let dense = DenseTensor::new(logical.clone(), (0..numel).map(|i| i as f64).collect());
            let all = layouts(&mesh, logical.len());
            for source in &all {
                for target in &all {
                    let plan = plan_boxing(&logical, 4, source, target).expect("a plan");
                    let mut addend = 0.0;
                    let mut random = || {
                        addend += 1.0;
                        addend
                    };
                    let mut state = Sharded::shard(&dense, source, &mut random).expect("shards");
                    for step in &plan.steps {
                        let expected = state.clone().apply(step).expect("reference");
                        let tally = kinds.entry(step.kind.name()).or_default();
                        if let Some(got) = run_even(&logical, step, &state, at) {
                            tally.0 += 1;
                            for (i, (got, want)) in got.iter().zip(&expected.locals).enumerate() {
                                assert_eq!(got.dims(), want.shape, "{step} on device {i}");
                                let got = got.to_vec::<f32>().expect("f32");
                                for (g, w) in got.iter().zip(&want.data) {
                                    assert!(
                                        (*g as f64 - w).abs() < 1e-3,
                                        "{source} -> {target}, {step} on device {i}: {g} != {w}"
                                    );
                                }
                            }
                        } else {
                            tally.1 += 1;
                        }
                        state = expected;
                    }
                }
            }
        }
        // Each collective ran evenly somewhere, and uneven ones stayed on the host path.
        for name in ["all-reduce", "all-gather", "reduce-scatter", "all-to-all"] {
            let (even, _) = kinds.get(name).copied().unwrap_or_default();
            assert!(even > 0, "no {name} step ran as an even collective: {kinds:?}");
        }
        for name in ["all-gather", "reduce-scatter", "all-to-all"] {
            let (_, host) = kinds.get(name).copied().unwrap_or_default();
            assert!(host > 0, "no uneven {name} step stayed on the host path: {kinds:?}");
        }
        kinds
    }

    #[test]
    fn even_steps_give_every_rank_the_reference_shard() {
        check_every_plan(&mut Where { place: &|t| t, permute: &mut cpu_permute });
    }

    /// The same on a GPU's memory with its permute kernels (run by the GPU check; skipped
    /// without a usable GPU).
    #[cfg(feature = "cuda")]
    #[test]
    fn even_steps_on_a_gpu_give_every_rank_the_reference_shard() {
        let device = match meshflow_ops::cuda::CudaDevice::new(0) {
            Ok(device) => device,
            Err(error) => return eprintln!("skipped, no usable GPU: {error}"),
        };
        let place = |t: Tensor| device.to_device(&t).expect("uploaded");
        let mut permute = |t: &Tensor, perm: &[usize]| -> Result<Tensor> {
            assert!(t.device() != meshflow_ops::Device::Cpu, "a host tensor");
            let op = Permute { perm: perm.to_vec() };
            Ok(device.forward(&op, std::slice::from_ref(t))?.remove(0))
        };
        let kinds = check_every_plan(&mut Where { place: &place, permute: &mut permute });
        println!("GPU-CHECK boxing even steps on the GPU (even, host): {kinds:?}");
    }

    #[test]
    fn reorders_move_the_named_axes() {
        assert_eq!(front_to(4, 2), vec![1, 2, 0, 3]);
        assert_eq!(front_to(3, 0), vec![0, 1, 2]);
        assert_eq!(to_front(4, 2), vec![2, 0, 1, 3]);
        assert_eq!(split_axis(&[4, 6, 8], 1, 3), vec![4, 3, 2, 8]);
        assert!(Reorder { view: vec![2, 3], perm: vec![0, 1] }.is_view());
        assert!(!Reorder { view: vec![2, 3], perm: vec![1, 0] }.is_view());
    }
}
