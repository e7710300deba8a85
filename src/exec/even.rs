//! Collective boxing steps as NCCL runs them: one collective on dim 0 whose members all send
//! buffers of one size, between reorders of the rank's own tensors.
//!
//! The host executor ([`super::boxing`]) moves a step's tensor axis to the front with host
//! copies and lets the communicator cut dim 0 into balanced chunks, which differ by one when the
//! axis does not divide by the group. On a GPU the same step runs on device memory as one NCCL
//! collective ([`EvenStep`]): [`EvenStep::prepare`] turns the shard into the buffer it sends
//! (a piece of a split axis padded with zeros to the longest member's, an axis to be scattered
//! cut into one padded block per member, the members' axis permuted to the front), and
//! [`EvenStep::finish`] turns the buffer it receives into its shard (the members' axis
//! permuted to where the step concatenates, the padding cut off). When the axis divides by
//! the group there is no padding, and on axis 0 no permutation either: the collective's bytes
//! are the only ones moved.
//!
//! Every member of a group decides from what the members share: the step, the group's extent of
//! the target layout, and the shard's length on an axis the group does not split (the reduced
//! axis of a reduce-scatter, the `to` axis of an all-to-all). So all members take the same
//! path: one NCCL call, or the host path for all of them (only for an axis shorter than the
//! group, where some members hold nothing).

use meshflow_comm::reduce::chunk;
use meshflow_ops::ops::concat::Concat;
use meshflow_ops::ops::narrow::{Narrow, Pad};
use meshflow_ops::ops::permute::Permute;
use meshflow_ops::{Op, Tensor};
use meshflow_placement::{local_region, BoxingStep, Region, StepKind};

use super::boxing::group_ranks;
use crate::{Error, Result};

/// Runs one op where the rank keeps its tensors (the host's kernels, or a GPU's).
pub type Run<'a> = dyn FnMut(&dyn Op, &[Tensor]) -> Result<Tensor> + 'a;

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

/// An axis of `len` cut into balanced chunks over `n` members (the first `len % n` chunks one
/// longer), as the layouts and the communicators cut it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunks {
    /// The axis's length.
    pub len: usize,
    /// Members.
    pub n: usize,
}

impl Chunks {
    /// The longest chunk, which every member's is padded to.
    pub fn padded(self) -> usize {
        self.len.div_ceil(self.n)
    }

    /// Member `i`'s chunk length.
    pub fn size(self, i: usize) -> usize {
        chunk(self.len, self.n, i).len()
    }

    /// True when some member's chunk is empty (an axis shorter than the group).
    fn leaves_some_empty(self) -> bool {
        self.len < self.n
    }

    /// True when every chunk has the same length (no padding).
    pub fn is_even(self) -> bool {
        self.len.is_multiple_of(self.n)
    }
}

/// What a collective step does to the shard's axes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Axes {
    /// Nothing: a sum of equal shards.
    Same,
    /// The members' pieces of `axis` concatenated.
    Gather { axis: usize, chunks: Chunks },
    /// `axis` summed and cut into the members' chunks.
    Scatter { axis: usize, chunks: Chunks },
    /// `to` cut into the members' chunks, the members' pieces of `from` concatenated.
    Exchange { from: usize, from_chunks: Chunks, to: usize, to_chunks: Chunks },
}

impl Axes {
    /// The chunkings of the axes the step cuts or concatenates.
    fn chunks(&self) -> Vec<Chunks> {
        match *self {
            Axes::Same => vec![],
            Axes::Gather { chunks, .. } | Axes::Scatter { chunks, .. } => vec![chunks],
            Axes::Exchange { from_chunks, to_chunks, .. } => vec![from_chunks, to_chunks],
        }
    }
}

/// One collective boxing step of one rank as one NCCL collective.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvenStep {
    /// The ranks of the rank's group, in group order.
    pub group: Vec<usize>,
    /// The rank's index in `group`.
    pub member: usize,
    /// The collective over `group`.
    pub collective: EvenCollective,
    /// The rank's shard's dims before the step.
    dims: Vec<usize>,
    axes: Axes,
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

/// `dims` with axes `axis` and `axis + 1` merged.
fn merge_axes(dims: &[usize], axis: usize) -> Vec<usize> {
    let mut out = dims[..axis].to_vec();
    out.push(dims[axis] * dims[axis + 1]);
    out.extend_from_slice(&dims[axis + 2..]);
    out
}

/// `dims` with `dims[axis] = len`.
fn with(dims: &[usize], axis: usize, len: usize) -> Vec<usize> {
    let mut out = dims.to_vec();
    out[axis] = len;
    out
}

fn is_identity(perm: &[usize]) -> bool {
    perm.iter().enumerate().all(|(k, &axis)| k == axis)
}

fn permute(run: &mut Run, t: Tensor, perm: &[usize]) -> Result<Tensor> {
    if is_identity(perm) {
        return Ok(t);
    }
    run(&Permute { perm: perm.to_vec() }, &[t])
}

fn narrow(run: &mut Run, t: Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    if start == 0 && t.dims()[axis] == len {
        return Ok(t);
    }
    run(&Narrow { axis: axis as isize, start, len }, &[t])
}

/// The box of `t` at `offsets` of `shape` (a local slice, `B -> S`): one narrow per axis it
/// cuts, run by `run` where `t` lives.
pub fn narrow_box(run: &mut Run, t: Tensor, offsets: &[usize], shape: &[usize]) -> Result<Tensor> {
    let mut out = t;
    for (axis, (&start, &len)) in offsets.iter().zip(shape).enumerate() {
        out = narrow(run, out, axis, start, len)?;
    }
    Ok(out)
}

/// `t` padded with zeros after its end on `axis` to `total`.
fn pad(run: &mut Run, t: Tensor, axis: usize, total: usize) -> Result<Tensor> {
    if t.dims()[axis] == total {
        return Ok(t);
    }
    run(&Pad { axis: axis as isize, start: 0, total }, &[t])
}

/// `t`'s `axis` (of `chunks.len`) as two axes `[n, padded]`: member `i`'s chunk in block `i`,
/// zeros after it.
fn blocks(run: &mut Run, t: Tensor, axis: usize, chunks: Chunks) -> Result<Tensor> {
    let (n, c) = (chunks.n, chunks.padded());
    let dims = t.dims().to_vec();
    if chunks.is_even() {
        return Ok(t.reshaped(split_axis(&dims, axis, n))?);
    }
    let long = chunks.len % n;
    let head = narrow(run, t.clone(), axis, 0, long * c)?;
    let head = head.reshaped(split_axis(&with(&dims, axis, long * c), axis, long))?;
    let tail = narrow(run, t, axis, long * c, (n - long) * (c - 1))?;
    let tail =
        tail.reshaped(split_axis(&with(&dims, axis, (n - long) * (c - 1)), axis, n - long))?;
    let tail = pad(run, tail, axis + 1, c)?;
    run(&Concat { axis: axis as isize }, &[head, tail])
}

/// The inverse of [`blocks`]: axes `[axis, axis + 1] = [n, padded]` back into one axis of
/// `chunks.len`, each block's padding cut off.
fn unblocks(run: &mut Run, t: Tensor, axis: usize, chunks: Chunks) -> Result<Tensor> {
    let (n, c) = (chunks.n, chunks.padded());
    if chunks.is_even() {
        let merged = merge_axes(t.dims(), axis);
        return Ok(t.reshaped(merged)?);
    }
    let long = chunks.len % n;
    let head = narrow(run, t.clone(), axis, 0, long)?;
    let head = head.reshaped(merge_axes(head.dims(), axis))?;
    let tail = narrow(run, t, axis, long, n - long)?;
    let tail = narrow(run, tail, axis + 1, 0, c - 1)?;
    let tail = tail.reshaped(merge_axes(tail.dims(), axis))?;
    run(&Concat { axis: axis as isize }, &[head, tail])
}

impl EvenStep {
    /// `step` for `rank`, whose shard has `dims`, as one NCCL collective: `None` when the step
    /// is not a collective, when `rank` is not in its placement, or when a split axis is
    /// shorter than the group (some members hold nothing: the host path runs it).
    pub fn of(
        logical: &[usize],
        step: &BoxingStep,
        rank: usize,
        dims: &[usize],
    ) -> Result<Option<EvenStep>> {
        let placement = &step.before.placement;
        let Some(coordinates) = placement.coordinates(rank) else { return Ok(None) };
        let (mesh_axis, collective) = match step.kind {
            StepKind::AllReduce { mesh_axis } => (mesh_axis, EvenCollective::AllReduce),
            StepKind::ReduceScatter { mesh_axis, .. } => (mesh_axis, EvenCollective::ReduceScatter),
            StepKind::AllGather { mesh_axis, .. } => (mesh_axis, EvenCollective::AllGather),
            StepKind::AllToAll { mesh_axis, .. } => (mesh_axis, EvenCollective::AllToAll),
            _ => return Ok(None),
        };
        let group = group_ranks(placement, &coordinates, mesh_axis);
        let n = group.len();
        let member = coordinates[mesh_axis];
        // The group's extent of the target layout, the same for every member.
        let after: Region = local_region(
            logical,
            &step.after.nd_sbp,
            step.after.placement.hierarchy(),
            &coordinates,
        )?;
        let check = |axis: usize| {
            if axis < dims.len() {
                Ok(())
            } else {
                let rank_of = dims.len();
                Err(Error::Runtime(format!(
                    "boxing step {step}: tensor axis {axis} of a rank-{rank_of} shard"
                )))
            }
        };
        let chunks = |len: usize| Chunks { len, n };
        let axes = match step.kind {
            StepKind::AllGather { tensor_axis: k, .. } => {
                check(k)?;
                Axes::Gather { axis: k, chunks: chunks(after.shape[k]) }
            }
            StepKind::ReduceScatter { tensor_axis: k, .. } => {
                check(k)?;
                Axes::Scatter { axis: k, chunks: chunks(dims[k]) }
            }
            StepKind::AllToAll { from_axis: f, to_axis: t, .. } => {
                check(f)?;
                check(t)?;
                if f == t {
                    return Ok(None);
                }
                Axes::Exchange {
                    from: f,
                    from_chunks: chunks(after.shape[f]),
                    to: t,
                    to_chunks: chunks(dims[t]),
                }
            }
            _ => Axes::Same,
        };
        if axes.chunks().into_iter().any(Chunks::leaves_some_empty) {
            return Ok(None);
        }
        Ok(Some(EvenStep { group, member, collective, dims: dims.to_vec(), axes }))
    }

    /// True when no member's piece is padded.
    pub fn is_even(&self) -> bool {
        self.axes.chunks().into_iter().all(Chunks::is_even)
    }

    /// The buffer this rank sends, from its shard (`run` runs the reorders where it lives).
    pub fn prepare(&self, local: &Tensor, run: &mut Run) -> Result<Tensor> {
        let rank = self.dims.len();
        let local = local.reshaped(self.dims.clone())?;
        match self.axes {
            Axes::Same => Ok(local),
            Axes::Gather { axis, chunks } => pad(run, local, axis, chunks.padded()),
            Axes::Scatter { axis, chunks } => {
                let blocked = blocks(run, local, axis, chunks)?;
                permute(run, blocked, &to_front(rank + 1, axis))
            }
            Axes::Exchange { from, from_chunks, to, to_chunks } => {
                let padded = pad(run, local, from, from_chunks.padded())?;
                let blocked = blocks(run, padded, to, to_chunks)?;
                permute(run, blocked, &to_front(rank + 1, to))
            }
        }
    }

    /// This rank's shard of the target layout from the buffer the collective gave it.
    pub fn finish(&self, received: &Tensor, run: &mut Run) -> Result<Tensor> {
        let rank = self.dims.len();
        let members = |piece: &[usize]| {
            let mut dims = vec![self.group.len()];
            dims.extend_from_slice(piece);
            dims
        };
        match self.axes {
            Axes::Same => Ok(received.reshaped(self.dims.clone())?),
            Axes::Gather { axis, chunks } => {
                let piece = with(&self.dims, axis, chunks.padded());
                let gathered = received.reshaped(members(&piece))?;
                let gathered = permute(run, gathered, &front_to(rank + 1, axis))?;
                unblocks(run, gathered, axis, chunks)
            }
            Axes::Scatter { axis, chunks } => {
                let piece = with(&self.dims, axis, chunks.padded());
                let mine = received.reshaped(piece)?;
                narrow(run, mine, axis, 0, chunks.size(self.member))
            }
            Axes::Exchange { from, from_chunks, to, to_chunks } => {
                let piece =
                    with(&with(&self.dims, from, from_chunks.padded()), to, to_chunks.padded());
                let exchanged = received.reshaped(members(&piece))?;
                let exchanged = narrow(run, exchanged, to + 1, 0, to_chunks.size(self.member))?;
                let exchanged = permute(run, exchanged, &front_to(rank + 1, from))?;
                unblocks(run, exchanged, from, from_chunks)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshflow_ops::Context;
    use meshflow_placement::reference::{DenseTensor, Sharded};
    use meshflow_placement::{plan_boxing, DeviceType, Layout, NdSbp, Placement, Sbp};

    fn to_tensor(dense: &DenseTensor) -> Tensor {
        let data = dense.data.iter().map(|&v| v as f32).collect();
        Tensor::from_vec(data, dense.shape.clone()).expect("a tensor")
    }

    fn cpu_run(op: &dyn Op, inputs: &[Tensor]) -> Result<Tensor> {
        assert!(inputs.iter().all(|t| t.device() == meshflow_ops::Device::Cpu), "{op:?}");
        Ok(op.forward(&Context::default(), inputs)?.remove(0))
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

    /// Where the test keeps its tensors: `place` moves a host tensor there, `run` runs an op
    /// there.
    struct Where<'a, 'b> {
        place: &'a dyn Fn(Tensor) -> Tensor,
        run: &'a mut Run<'b>,
    }

    /// What a step did on one rank.
    enum Ran {
        /// The device path (one collective, with (`true`) or without padded pieces, or a
        /// local slice as narrows): the rank's shard.
        Nccl(Tensor, bool),
        /// The host path (its group's axis is shorter than the group).
        Host,
    }

    /// Runs `step` on every rank of `before` through [`EvenStep`] with simulated collectives,
    /// group by group; the members of a group must agree on the path.
    fn run_even(
        logical: &[usize],
        step: &BoxingStep,
        before: &Sharded,
        at: &mut Where,
    ) -> Vec<Ran> {
        let placement = &step.before.placement;
        let ranks = placement.ranks();
        let steps: Vec<Option<EvenStep>> = (0..ranks.len())
            .map(|i| {
                EvenStep::of(logical, step, ranks[i], &before.locals[i].shape).expect("a plan")
            })
            .collect();
        let index_of = |rank: &usize| ranks.iter().position(|x| x == rank).expect("a member");
        let host = |t: &Tensor| meshflow_ops::cuda::to_host(t).expect("on the host");
        let mut out: Vec<Option<Ran>> = (0..ranks.len()).map(|_| None).collect();
        for i in 0..ranks.len() {
            if out[i].is_some() {
                continue;
            }
            let Some(first) = &steps[i] else {
                // A local slice runs as narrows where the shard lives (`narrow_box`), as a GPU
                // rank runs it; the rest takes the host path.
                let slice = crate::exec::boxing::local_slice(logical, step, ranks[i]);
                out[i] = Some(match slice.expect("a slice") {
                    Some((offsets, shape)) => {
                        let local = (at.place)(to_tensor(&before.locals[i]));
                        let sliced = narrow_box(&mut *at.run, local, &offsets, &shape);
                        Ran::Nccl(host(&sliced.expect("narrows")), false)
                    }
                    None => Ran::Host,
                });
                continue;
            };
            let members: Vec<usize> = first.group.iter().map(index_of).collect();
            let group: Vec<&EvenStep> = members
                .iter()
                .map(|&m| {
                    let disagree = || panic!("{step}: the members of a group disagree on the path");
                    steps[m].as_ref().unwrap_or_else(disagree)
                })
                .collect();
            let buffers: Vec<Vec<f32>> = members
                .iter()
                .zip(&group)
                .map(|(&m, s)| {
                    let local = (at.place)(to_tensor(&before.locals[m]));
                    let sent = s.prepare(&local, &mut *at.run).expect("prepare");
                    host(&sent).to_vec::<f32>().expect("f32")
                })
                .collect();
            for ((&m, s), got) in
                members.iter().zip(&group).zip(simulate(first.collective, &buffers))
            {
                let received = (at.place)(Tensor::from_vec(got.clone(), [got.len()]).expect("in"));
                let shard = s.finish(&received, &mut *at.run).expect("finish");
                out[m] = Some(Ran::Nccl(host(&shard), !s.is_even()));
            }
        }
        out.into_iter().map(|r| r.expect("every rank")).collect()
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
    /// exactly the shard the reference executor gives it, padded pieces too; steps over an axis
    /// shorter than the group stay on the host path. Returns, per step kind, the ranks' steps
    /// run unpadded, padded and on the host.
    fn check_every_plan(at: &mut Where) -> std::collections::BTreeMap<&'static str, [usize; 3]> {
        let mut kinds = std::collections::BTreeMap::<&str, [usize; 3]>::new();
        for (mesh, logical) in [
            (vec![2], vec![4, 6, 8]),
            (vec![4], vec![4, 8, 12]),
            (vec![2, 2], vec![4, 8, 4]),
            (vec![2], vec![3, 5, 4]),
            (vec![3], vec![6, 5, 3]),
            (vec![4], vec![3, 6, 2]),
            (vec![2, 3], vec![5, 7, 3]),
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
                        let ran = run_even(&logical, step, &state, at);
                        for (i, (ran, want)) in ran.iter().zip(&expected.locals).enumerate() {
                            let Ran::Nccl(got, padded) = ran else {
                                tally[2] += 1;
                                continue;
                            };
                            tally[usize::from(*padded)] += 1;
                            assert_eq!(got.dims(), want.shape, "{step} on device {i}");
                            let got = got.to_vec::<f32>().expect("f32");
                            for (g, w) in got.iter().zip(&want.data) {
                                assert!(
                                    (*g as f64 - w).abs() < 1e-3,
                                    "{source} -> {target}, {step} on device {i}: {g} != {w}"
                                );
                            }
                        }
                        state = expected;
                    }
                }
            }
        }
        // Each collective ran without padding and with it, and the steps over an axis shorter
        // than the group stayed on the host path.
        for name in ["all-gather", "reduce-scatter", "all-to-all"] {
            let [even, padded, host] = kinds.get(name).copied().unwrap_or_default();
            assert!(even > 0, "no {name} step ran unpadded: {kinds:?}");
            assert!(padded > 0, "no {name} step ran padded: {kinds:?}");
            assert!(host > 0, "no {name} step over a short axis stayed on the host: {kinds:?}");
        }
        assert!(kinds.get("all-reduce").is_some_and(|t| t[0] > 0 && t[1] + t[2] == 0));
        assert!(kinds.get("local-slice").is_some_and(|t| t[0] > 0 && t[1] + t[2] == 0));
        kinds
    }

    #[test]
    fn even_steps_give_every_rank_the_reference_shard() {
        check_every_plan(&mut Where { place: &|t| t, run: &mut cpu_run });
    }

    /// The same on a GPU's memory with its kernels (run by the GPU check; skipped without a
    /// usable GPU).
    #[cfg(feature = "cuda")]
    #[test]
    fn even_steps_on_a_gpu_give_every_rank_the_reference_shard() {
        let device = match meshflow_ops::cuda::CudaDevice::new(0) {
            Ok(device) => device,
            Err(error) => return eprintln!("skipped, no usable GPU: {error}"),
        };
        let place = |t: Tensor| device.to_device(&t).expect("uploaded");
        let mut run = |op: &dyn Op, inputs: &[Tensor]| -> Result<Tensor> {
            assert!(inputs.iter().all(|t| t.device() != meshflow_ops::Device::Cpu), "{op:?}");
            Ok(device.forward(op, inputs)?.remove(0))
        };
        let kinds = check_every_plan(&mut Where { place: &place, run: &mut run });
        println!("GPU-CHECK boxing collective steps on the GPU (even, padded, host): {kinds:?}");
    }

    #[test]
    fn reorders_move_the_named_axes() {
        assert_eq!(front_to(4, 2), vec![1, 2, 0, 3]);
        assert_eq!(front_to(3, 0), vec![0, 1, 2]);
        assert_eq!(to_front(4, 2), vec![2, 0, 1, 3]);
        assert_eq!(split_axis(&[4, 6, 8], 1, 3), vec![4, 3, 2, 8]);
        assert_eq!(merge_axes(&[4, 3, 2, 8], 1), vec![4, 6, 8]);
        assert!(is_identity(&[0, 1, 2]) && !is_identity(&[1, 0, 2]));
    }

    #[test]
    fn chunks_pad_to_the_longest_and_cover_the_axis() {
        for (len, n) in [(10, 4), (7, 3), (8, 4), (5, 2), (3, 3), (2, 3)] {
            let chunks = Chunks { len, n };
            let sizes: Vec<usize> = (0..n).map(|i| chunks.size(i)).collect();
            assert_eq!(sizes.iter().sum::<usize>(), len);
            assert_eq!(sizes.iter().max().copied(), Some(chunks.padded()));
            assert_eq!(chunks.is_even(), sizes.iter().all(|&s| s == chunks.padded()));
            assert_eq!(chunks.leaves_some_empty(), sizes.contains(&0));
        }
    }

    /// Blocks put each member's chunk first in its padded block, zeros after, and unblocking
    /// gives the axis back.
    #[test]
    fn blocks_pad_each_chunk_and_unblock_back() {
        let x =
            Tensor::from_vec((1..=14).map(|v| v as f32).collect::<Vec<_>>(), [2, 7]).expect("x");
        let chunks = Chunks { len: 7, n: 3 };
        let blocked = blocks(&mut cpu_run, x.clone(), 1, chunks).expect("blocks");
        assert_eq!(blocked.dims(), &[2, 3, 3]);
        let row0: Vec<f32> = blocked.to_vec::<f32>().expect("f32")[..9].to_vec();
        assert_eq!(row0, vec![1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 6.0, 7.0, 0.0]);
        let back = unblocks(&mut cpu_run, blocked, 1, chunks).expect("unblocks");
        assert_eq!(back.dims(), x.dims());
        assert_eq!(back.to_vec::<f32>().expect("f32"), x.to_vec::<f32>().expect("f32"));
    }
}
