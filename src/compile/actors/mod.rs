//! Lowering a [`Program`] to an actor [`Plan`]: the first half of running the session on actors,
//! and what the planner's simulator runs.
//!
//! One actor per (step, rank) (and per piece, for steps that run once per micro-batch):
//!
//! - a leaf is a [`ActorKind::Source`](meshflow_actor::ActorKind::Source) (an input, fed every piece) or a [`ActorKind::Variable`](meshflow_actor::ActorKind::Variable)
//!   (a parameter or constant, read once per step; a parameter whose new value is listed in
//!   [`ActorConfig::updates`] takes it as its update input, so the next step reads it only after
//!   this step wrote it);
//! - a kernel or boxing step is a [`ActorKind::Compute`](meshflow_actor::ActorKind::Compute) actor on its rank's stream;
//! - a boxing step whose plan communicates gets, per group of ranks that exchange data, a
//!   [`Work::Join`] actor that reads the source slot of every member and feeds every member's
//!   boxing actor: a collective's act starts only when all its group's ranks hold their input;
//! - with `pieces > 1`, every rank sums the pieces of each value in [`ActorConfig::accumulate`]
//!   (the gradients) in a [`Work::Accumulate`] actor before the steps that read it, which run
//!   once per step;
//! - every rank ends in a [`ActorKind::Sink`](meshflow_actor::ActorKind::Sink) ([`Work::End`]) that reads the last actor of each
//!   of its streams.
//!
//! Edges: one per (writer, slot) to the actors that read that shard, and one "order" edge from
//! each actor to the next on the same stream of the same rank, so a stream runs its acts in one
//! fixed order: the steps before the pieces, the pieces' forwards and backwards in the
//! [`PieceOrder`] (1F1B by default: with [`ActorConfig::forward`] naming the loss, stage `s` of
//! a pipeline of `S` stages runs `S − s − 1` forwards ahead and then alternates, so stages
//! overlap and stage `s` holds at most `S − s` pieces' activations), the sums, the steps after
//! (each part in program order). Every rank of a collective's group runs the same order, so
//! collectives are issued in one order everywhere. Every edge has one register: one step of
//! `pieces` pieces is one piece of the plan ([`Simulator::run_step`](meshflow_actor::Simulator)
//! with 1); what bounds the pieces in flight is the order, since every piece has actors of its
//! own. With [`ActorConfig::joins`] off (the session), no edge leaves a rank.

use std::collections::BTreeSet;

use meshflow_actor::{ActorId, DeviceId, Plan};
use meshflow_ops::{TensorMeta, Value};
use meshflow_placement::{local_region, BoxingPlan, Layout};

mod lowering;

use super::{Program, Slot, Step};
use crate::Result;

/// How many device streams each rank has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Streams {
    /// One stream runs kernels and communication in program order (the session today).
    #[default]
    Single,
    /// Kernels on one stream, communicating boxing on a second one (collectives overlap with
    /// compute, as NCCL streams do).
    ComputeAndComm,
}

impl Streams {
    /// Streams per rank.
    pub fn count(self) -> u32 {
        match self {
            Streams::Single => 1,
            Streams::ComputeAndComm => 2,
        }
    }
}

/// In which order each rank runs the forward and backward of its pieces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PieceOrder {
    /// Piece after piece: the forward and backward of piece 0, then of piece 1, … (no overlap
    /// between pipeline stages; one piece's activations alive at a time).
    Sequential,
    /// Every piece's forward, then every piece's backward (GPipe): stage `s + 1` runs the
    /// forward of piece `k` while stage `s` runs that of piece `k + 1`; all pieces' activations
    /// stay alive until their backward.
    GPipe,
    /// One forward, one backward (PipeDream-flush, Megatron's 1F1B): stage `s` of `S` runs
    /// `S − s − 1` forwards ahead, then alternates, so it holds at most `S − s` pieces'
    /// activations. Falls back to [`PieceOrder::GPipe`] when a transfer between stages goes
    /// against the pipeline's direction (point-to-point copies must meet in one order on both
    /// sides), and acts as [`PieceOrder::Sequential`] on a program of one stage.
    #[default]
    OneForwardOneBackward,
}

/// How to lower a program to actors.
#[derive(Clone, Debug)]
pub struct ActorConfig {
    /// Micro-batches per step. Default 1.
    pub pieces: u32,
    /// The order of the pieces' forwards and backwards on each rank. Default
    /// [`PieceOrder::OneForwardOneBackward`].
    pub order: PieceOrder,
    /// The value whose writing step ends the forward (the loss): per-piece steps up to it in
    /// program order are the forward, later ones the backward. `None` (the default): every
    /// per-piece step counts as forward, and pieces run one after another.
    pub forward: Option<Value>,
    /// Whether a communicating boxing step waits, in a [`Work::Join`] actor, for the source of
    /// every member of its group (default). Without joins every edge stays on one rank: the
    /// collective itself is the meeting point (a session across processes needs no actor
    /// messages between processes), and the plan is what each rank runs, in its order.
    pub joins: bool,
    /// Streams per rank. Default [`Streams::Single`].
    pub streams: Streams,
    /// Parameter values and the slots that hold their new values (the update input of their
    /// variable actors).
    pub updates: Vec<(Value, Slot)>,
    /// Values summed over the pieces before they are read (gradients).
    pub accumulate: Vec<Value>,
}

impl Default for ActorConfig {
    fn default() -> Self {
        ActorConfig {
            pieces: 1,
            order: PieceOrder::default(),
            forward: None,
            joins: true,
            streams: Streams::Single,
            updates: Vec::new(),
            accumulate: Vec::new(),
        }
    }
}

/// What an actor of a lowered program does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// Runs `program.steps[step]` (leaf, kernel or boxing) on its rank.
    Step {
        /// Index into `Program::steps`.
        step: usize,
    },
    /// Waits for the source shards of every member of one communicating group of the boxing
    /// `program.steps[step]` (takes no time itself).
    Join {
        /// Index into `Program::steps`.
        step: usize,
    },
    /// Sums the pieces of `slot` on its rank.
    Accumulate {
        /// The slot summed.
        slot: Slot,
    },
    /// The rank's end of step.
    End,
}

/// The payload of every actor: what it does, on which rank, for which piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActorWork {
    /// What it does.
    pub work: Work,
    /// The rank (the group's first rank for a join).
    pub rank: usize,
    /// The piece, 0 for actors that run once per step.
    pub piece: u32,
}

/// A program lowered to actors.
#[derive(Clone, Debug)]
pub struct ActorProgram {
    /// The plan.
    pub plan: Plan<ActorWork>,
    /// Its streams per rank.
    pub streams: Streams,
    /// Micro-batches per step.
    pub pieces: u32,
    /// Per step of the program, when it runs.
    pub phases: Vec<Phase>,
    /// Per slot, whether it is summed over the pieces.
    pub accumulated: Vec<bool>,
    /// The order the pieces run in (after any fallback).
    pub order: PieceOrder,
    /// The last step of the forward ([`ActorConfig::forward`]), if one was named.
    pub forward_end: Option<usize>,
    /// Per (rank, stream), its chained actors in the order they run.
    pub chains: Vec<((usize, u32), Vec<ActorId>)>,
}

impl ActorProgram {
    /// The device of stream `stream` (0: compute, 1: communication) of `rank`.
    pub fn device(&self, rank: usize, stream: u32) -> DeviceId {
        device(self.streams, rank, stream)
    }

    /// The rank a device belongs to.
    pub fn rank_of(&self, device: DeviceId) -> usize {
        (device.0 / self.streams.count()) as usize
    }
}

/// Lowers `program` to an actor plan (see the module doc).
pub fn lower_to_actors(program: &Program, config: &ActorConfig) -> Result<ActorProgram> {
    lowering::lower(program, config)
}

/// The ranks that hold a shard of a layout.
pub fn layout_ranks(layout: &Layout) -> &[usize] {
    layout.placement.ranks()
}

/// The local shape and dtype of `slot` on `rank`, or `None` when the rank holds no shard.
pub fn local_meta(program: &Program, slot: Slot, rank: usize) -> Option<TensorMeta> {
    let info = program.slot(slot);
    let placement = &info.layout.placement;
    let coordinates = placement.coordinates(rank)?;
    let meta = &program.graph.value(info.value).meta;
    let region =
        local_region(meta.shape.dims(), &info.layout.nd_sbp, placement.hierarchy(), &coordinates)
            .ok()?;
    Some(TensorMeta::new(region.shape, meta.dtype))
}

/// The slots a step reads and writes.
pub fn step_slots(step: &Step) -> (Vec<Slot>, Vec<Slot>) {
    match step {
        Step::Leaf { slot, .. } => (Vec::new(), vec![*slot]),
        Step::Boxing { from, to, .. } => (vec![*from], vec![*to]),
        Step::Kernel { inputs, outputs, .. } => (inputs.clone(), outputs.clone()),
    }
}

/// The ranks that run a step.
pub fn step_ranks(program: &Program, step: &Step) -> Vec<usize> {
    let ranks: BTreeSet<usize> = match step {
        Step::Leaf { slot, .. } => {
            layout_ranks(&program.slot(*slot).layout).iter().copied().collect()
        }
        Step::Boxing { from, to, .. } => {
            let from = layout_ranks(&program.slot(*from).layout).iter();
            from.chain(layout_ranks(&program.slot(*to).layout)).copied().collect()
        }
        Step::Kernel { node, .. } => {
            program.graph.node(*node).placement.ranks().iter().copied().collect()
        }
    };
    ranks.into_iter().collect()
}

/// True when a boxing plan moves bytes between devices.
pub fn communicates(plan: &BoxingPlan) -> bool {
    plan.steps.iter().any(|step| !step.kind.is_local())
}

fn device(streams: Streams, rank: usize, stream: u32) -> DeviceId {
    DeviceId(rank as u32 * streams.count() + stream.min(streams.count() - 1))
}

/// When a step runs: before the pieces, once per piece, or after the accumulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Once per step, before the pieces (parameters, their layout changes).
    Before,
    /// Once per piece (everything that depends on an input).
    Piece,
    /// Once per step, on the sums over the pieces (clipping, the update).
    After,
}

/// Per rank of stage `stage` of `stages`, the (piece, is forward) units in the order it runs
/// them (see [`PieceOrder`]).
pub fn piece_schedule(
    order: PieceOrder,
    pieces: u32,
    stage: usize,
    stages: usize,
) -> Vec<(u32, bool)> {
    match order {
        PieceOrder::Sequential => (0..pieces).flat_map(|p| [(p, true), (p, false)]).collect(),
        PieceOrder::GPipe => {
            (0..pieces).map(|p| (p, true)).chain((0..pieces).map(|p| (p, false))).collect()
        }
        PieceOrder::OneForwardOneBackward => {
            let ahead = (stages.saturating_sub(stage + 1) as u32).min(pieces);
            let mut units: Vec<(u32, bool)> = (0..ahead).map(|p| (p, true)).collect();
            for p in 0..pieces - ahead {
                units.push((p + ahead, true));
                units.push((p, false));
            }
            units.extend((pieces - ahead..pieces).map(|p| (p, false)));
            units
        }
    }
}
