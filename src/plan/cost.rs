//! The cost model: how long each actor of a lowered program acts on a described cluster.
//!
//! - A kernel: the roofline of its per-rank op, `overhead + max(compute, bytes / memory
//!   bandwidth)`, where compute prices the op's matrix-product FLOPs (`Op::matrix_flops`: all
//!   of a product's, most of a fused attention's) at the matrix roof and the rest of
//!   `Op::flops` at the vector roof, both of the localized op on the rank's local shapes; bytes
//!   are its local inputs and outputs. A view (`Op::is_view`: a reshape) costs the overhead
//!   alone.
//! - A boxing step: per communicating step of its plan, the α–β time of the ring algorithm over
//!   the link its group uses (inside a node or across nodes): `hops · α + bytes_per_rank / β`,
//!   with `2(p−1)` hops for an all-reduce, `p−1` for a reduce-scatter, all-gather or
//!   all-to-all and one for a send/recv or slice copy; local steps (slices, zero fills) cost a
//!   memory pass.
//! - A gradient accumulation: `pieces − 1` element-wise additions; with measured kernels, the
//!   profiled addition of the shard's shape, warm: the runtime adds each piece's shard to the
//!   sum as its kernel writes it ([`KernelProfile::measure_sums`]).
//! - Leaves, joins and ends take no time; messages take none either (latency is in the acts).
//!
//! A kernel with measured times ([`KernelProfile`]: warm and cold) is priced between the two by
//! the fraction of its input bytes that are out of cache when it acts ([`cold_fractions`]):
//! walking each (rank, stream) chain of actors in the order it runs, the bytes the chain touched
//! (inputs plus outputs of its acts) since an input was last touched (written or read), plus
//! the input's own bytes (a tensor re-read from its start: each byte saw the rest of the tensor
//! touched after it), are its reuse distance `d`, and `min(d / cache, 1)` of its bytes count as
//! cold, with `cache` the
//! device's [`DeviceSpec::cache_bytes`](super::cluster::DeviceSpec::cache_bytes). An input the
//! chain has not touched before (a variable or fed input, a shard another stream received) is
//! cold: parameters read once per step were written long before. A boxing act's output that
//! other devices wrote in part ([`written_elsewhere`]: `(p − 1)/p` of a `p`-member collective's,
//! all of a transfer's) is that much cold to the chain's next reader. The distance sums bytes,
//! repeated ones too (an upper bound of the distinct bytes an LRU cache would hold), and counts
//! the static chain order, not the interleaving of micro-batches at run time.

use std::collections::HashMap;

use meshflow_actor::{ActorId, CostModel};
use meshflow_placement::{BoxingPlan, BoxingStep, StepKind};

use super::cluster::Cluster;
use super::profile::KernelProfile;
use crate::compile::actors::{local_meta, step_slots, ActorProgram, Work};
use crate::compile::{Program, Slot, Step};

/// Per-actor act durations in nanoseconds, and what they add up to.
#[derive(Clone, Debug, PartialEq)]
pub struct ActCosts {
    /// Per actor, its act's duration (ns).
    pub durations: Vec<u64>,
}

impl CostModel for ActCosts {
    fn act_duration(&self, actor: ActorId, _sequence: u64) -> u64 {
        self.durations.get(actor.index()).copied().unwrap_or(0)
    }

    fn latency(&self, _from: ActorId, _to: ActorId) -> u64 {
        0
    }
}

/// What one act of a kind costs: compute (kernels, accumulation) or communication.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Breakdown {
    /// Seconds of kernels on the busiest rank.
    pub compute: f64,
    /// Seconds of boxing on the busiest rank.
    pub communication: f64,
}

impl ActCosts {
    /// The duration of every actor of `actors` (lowered from `program`) on `cluster`.
    pub fn new(program: &Program, actors: &ActorProgram, cluster: &Cluster) -> Self {
        Self::with_kernels(program, actors, cluster, None)
    }

    /// Like [`ActCosts::new`], with kernel times from `measured` (the profile and a slowdown
    /// factor for devices that share cores) where it has them, plus the per-kernel overhead.
    pub fn with_kernels(
        program: &Program,
        actors: &ActorProgram,
        cluster: &Cluster,
        measured: Option<(&KernelProfile, f64)>,
    ) -> Self {
        let cold = cold_fractions(program, actors, cluster.device.cache_bytes);
        let durations = actors
            .plan
            .actors
            .iter()
            .zip(cold)
            .map(|(spec, cold)| {
                let (work, rank) = (spec.payload.work, spec.payload.rank);
                let act = Act { work, rank, cold };
                let seconds = act_seconds(program, actors, cluster, act, measured);
                (seconds * 1e9).round() as u64
            })
            .collect();
        ActCosts { durations }
    }

    /// Per-rank sums of compute and communication act time, the largest of each.
    pub fn breakdown(&self, program: &Program, actors: &ActorProgram) -> Breakdown {
        self.per_rank(program, actors).values().fold(Breakdown::default(), |most, b| Breakdown {
            compute: most.compute.max(b.compute),
            communication: most.communication.max(b.communication),
        })
    }

    /// Compute act time (kernels, accumulations) summed over every rank of `actors`: the work
    /// a step gives the machine's cores.
    pub fn total_compute(&self, program: &Program, actors: &ActorProgram) -> f64 {
        self.per_rank(program, actors).values().map(|b| b.compute).sum()
    }

    fn per_rank(&self, program: &Program, actors: &ActorProgram) -> HashMap<usize, Breakdown> {
        let mut per_rank: HashMap<usize, Breakdown> = HashMap::new();
        for (spec, &ns) in actors.plan.actors.iter().zip(&self.durations) {
            let entry = per_rank.entry(spec.payload.rank).or_default();
            let seconds = ns as f64 / 1e9;
            match spec.payload.work {
                Work::Step { step } if matches!(program.steps[step], Step::Boxing { .. }) => {
                    entry.communication += seconds
                }
                Work::Step { .. } | Work::Accumulate { .. } => entry.compute += seconds,
                Work::Join { .. } | Work::End => {}
            }
        }
        per_rank
    }
}

/// Per actor of `actors`, the fraction (0 to 1) of the bytes its act reads that are out of a
/// `cache_bytes` cache when it acts (see the module doc); 1 for actors on no chain.
pub fn cold_fractions(program: &Program, actors: &ActorProgram, cache_bytes: f64) -> Vec<f64> {
    let mut cold = vec![1.0; actors.plan.actors.len()];
    for ((rank, _), chain) in &actors.chains {
        // Per slot, the chain's bytes touched when it was last touched, and the fraction of
        // its bytes other devices wrote (a collective's output) since this chain touched it.
        let mut last: HashMap<Slot, f64> = HashMap::new();
        let mut foreign: HashMap<Slot, f64> = HashMap::new();
        let mut touched = 0.0;
        for id in chain {
            let work = actors.plan.actors[id.index()].payload.work;
            let (reads, writes) = match work {
                Work::Step { step } if matches!(program.steps[step], Step::Leaf { .. }) => continue,
                Work::Step { step } => step_slots(&program.steps[step]),
                Work::Accumulate { slot } => (vec![slot], vec![slot]),
                Work::Join { .. } | Work::End => continue,
            };
            let bytes = |slot: &Slot| slot_bytes(program, &[*slot], *rank) as f64;
            let (mut read, mut evicted) = (0.0, 0.0);
            for slot in &reads {
                // A tensor read from its start after it was last touched whole: each byte's
                // reuse distance is the bytes touched since plus the tensor's own.
                let distance = last.get(slot).map_or(f64::INFINITY, |at| touched - at);
                let away = ((distance + bytes(slot)) / cache_bytes.max(1.0)).min(1.0);
                read += bytes(slot);
                evicted += bytes(slot) * away.max(foreign.get(slot).copied().unwrap_or(0.0));
            }
            if read > 0.0 {
                cold[id.index()] = evicted / read;
            }
            touched += reads.iter().chain(&writes).map(bytes).sum::<f64>();
            for slot in reads.iter().chain(&writes) {
                last.insert(*slot, touched);
                foreign.remove(slot);
            }
            if let Work::Step { step } = work {
                if let Step::Boxing { plan, .. } = &program.steps[step] {
                    for slot in writes {
                        foreign.insert(slot, written_elsewhere(plan));
                    }
                }
            }
        }
    }
    cold
}

/// The fraction of a boxing plan's output on one rank that other devices wrote: a collective
/// of `p` members assembles its output from every member's part (an in-process all-reduce
/// has each member reduce `1/p` of it into the shared result, an all-gather copies each part),
/// so `(p − 1)/p` of it is in the other members' caches, not this core's; a transfer from
/// another device, all of it; a reduce-scatter (each member reduces its own part), local
/// slices and fills, none. The largest over the plan's steps.
pub fn written_elsewhere(plan: &BoxingPlan) -> f64 {
    plan.steps
        .iter()
        .map(|step| match step.kind {
            StepKind::LocalSlice { .. } | StepKind::ZeroFill { .. } => 0.0,
            // Each member reduces its own part from the others' inputs: written here.
            StepKind::ReduceScatter { .. } => 0.0,
            StepKind::SendRecv | StepKind::SliceCopy => 1.0,
            StepKind::AllReduce { .. } | StepKind::AllGather { .. } | StepKind::AllToAll { .. } => {
                let p = step.group_size.max(1) as f64;
                (p - 1.0) / p
            }
        })
        .fold(0.0, f64::max)
}

/// One act to price: what, on which rank, and the fraction of its input out of cache.
#[derive(Clone, Copy)]
struct Act {
    work: Work,
    rank: usize,
    cold: f64,
}

fn act_seconds(
    program: &Program,
    actors: &ActorProgram,
    cluster: &Cluster,
    act: Act,
    measured: Option<(&KernelProfile, f64)>,
) -> f64 {
    let Act { work, rank, cold } = act;
    match work {
        Work::Step { step } => match &program.steps[step] {
            Step::Leaf { .. } => 0.0,
            Step::Kernel { node, inputs, outputs, ops } => {
                let placement = &program.graph.node(*node).placement;
                let Some(index) = placement.ranks().iter().position(|&r| r == rank) else {
                    return 0.0;
                };
                let metas: Vec<_> =
                    inputs.iter().filter_map(|s| local_meta(program, *s, rank)).collect();
                let measured = measured.and_then(|(profile, slowdown)| {
                    Some(profile.times(&ops[index], &metas)?.at(cold) * slowdown)
                });
                if let Some(seconds) = measured {
                    return cluster.device.kernel_overhead + seconds;
                }
                let op = &ops[index];
                if op.is_view() {
                    return cluster.device.kernel_overhead;
                }
                let (flops, matrix) = (op.flops(&metas), op.matrix_flops(&metas));
                let bytes = slot_bytes(program, inputs, rank) + slot_bytes(program, outputs, rank);
                cluster.device.kernel_seconds(flops, matrix, bytes)
            }
            Step::Boxing { from, to, plan } => {
                boxing_seconds(program, cluster, *from, *to, plan, rank)
            }
        },
        Work::Accumulate { slot } => {
            let bytes = slot_bytes(program, &[slot], rank);
            let additions = u64::from(actors.pieces.saturating_sub(1));
            let profiled = measured.and_then(|(profile, slowdown)| {
                let times = profile.sum_times(&local_meta(program, slot, rank)?)?;
                Some(additions as f64 * times.warm * slowdown)
            });
            profiled.unwrap_or_else(|| {
                cluster.device.kernel_seconds(bytes / 4 * additions, 0, 3 * bytes * additions)
            })
        }
        Work::Join { .. } | Work::End => 0.0,
    }
}

/// Bytes of the local shards of `slots` on `rank`.
pub fn slot_bytes(program: &Program, slots: &[Slot], rank: usize) -> u64 {
    slots
        .iter()
        .filter_map(|s| local_meta(program, *s, rank))
        .map(|meta| (meta.shape.numel() * meta.dtype.size()) as u64)
        .sum()
}

/// Seconds of a boxing plan on `rank`.
pub fn boxing_seconds(
    program: &Program,
    cluster: &Cluster,
    from: Slot,
    to: Slot,
    plan: &BoxingPlan,
    rank: usize,
) -> f64 {
    let device = &cluster.device;
    let scale = device.element_bytes / 4.0;
    let local = slot_bytes(program, &[from], rank).max(slot_bytes(program, &[to], rank));
    let mut seconds = device.kernel_overhead;
    for step in &plan.steps {
        if step.kind.is_local() {
            seconds += local as f64 * scale / device.memory_bandwidth;
            continue;
        }
        let (hops, group) = ring(step, rank);
        let link = cluster.link(&group);
        seconds += hops as f64 * link.latency + step.bytes_per_rank as f64 * scale / link.bandwidth;
    }
    seconds
}

/// The ring algorithm's hops for one step and the ranks of `rank`'s group.
pub fn ring(step: &BoxingStep, rank: usize) -> (u64, Vec<usize>) {
    let p = step.group_size.max(1) as u64;
    let placement = &step.before.placement;
    let group_on = |axis: usize| -> Vec<usize> {
        match placement.ranks().iter().position(|&r| r == rank) {
            Some(index) => placement
                .group_of_index(index, axis)
                .into_iter()
                .map(|i| placement.ranks()[i])
                .collect(),
            None => vec![rank],
        }
    };
    match step.kind {
        StepKind::AllReduce { mesh_axis } => (2 * (p - 1), group_on(mesh_axis)),
        StepKind::ReduceScatter { mesh_axis, .. }
        | StepKind::AllGather { mesh_axis, .. }
        | StepKind::AllToAll { mesh_axis, .. } => (p - 1, group_on(mesh_axis)),
        StepKind::SendRecv | StepKind::SliceCopy => {
            let target = &step.after.placement;
            let mut ranks = vec![rank];
            if let Some(index) = target.ranks().iter().position(|&r| r == rank) {
                if let Some(&source) = placement.ranks().get(index) {
                    ranks.push(source);
                }
            }
            (1, ranks)
        }
        StepKind::LocalSlice { .. } | StepKind::ZeroFill { .. } => (0, vec![rank]),
    }
}
