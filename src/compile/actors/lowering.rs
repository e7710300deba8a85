//! Building the actor plan of a program: actors, stream order and edges (see the parent module).

use std::collections::{BTreeSet, HashMap};

use meshflow_actor::{ActorId, ActorKind, Plan};
use meshflow_placement::{transfer_pieces, BoxingPlan, Layout, StepKind};

use super::{
    communicates, device, layout_ranks, piece_schedule, step_ranks, step_slots, ActorConfig,
    ActorProgram, ActorWork, Phase, PieceOrder, Streams, Work,
};
use crate::compile::{Program, Slot, Step};
use crate::graph::Source;
use crate::{Error, Result};

struct ActorLowering<'a> {
    program: &'a Program,
    config: &'a ActorConfig,
    plan: Plan<ActorWork>,
    phases: Vec<Phase>,
    /// Per slot, whether it is summed over pieces.
    accumulated: Vec<bool>,
    /// (step, rank, piece) → actor.
    actors: HashMap<(usize, usize, u32), ActorId>,
    /// (slot, rank) → accumulate actor.
    sums: HashMap<(Slot, usize), ActorId>,
    /// Per (rank, stream), the actors in stream order.
    streams: HashMap<(usize, u32), Vec<ActorId>>,
    /// Per slot, its writing step.
    writer: Vec<Option<usize>>,
    /// The piece order in force.
    order: PieceOrder,
    /// Per (rank, stream), its actors in order, once connected.
    chains: Vec<((usize, u32), Vec<ActorId>)>,
}

impl<'a> ActorLowering<'a> {
    fn new(program: &'a Program, config: &'a ActorConfig) -> Result<Self> {
        let mut writer = vec![None; program.slots.len()];
        for (index, step) in program.steps.iter().enumerate() {
            for slot in step_slots(step).1 {
                writer[slot.0 as usize] = Some(index);
            }
        }
        let mut accumulated = vec![false; program.slots.len()];
        for value in &config.accumulate {
            let slot = program.produced.get(value.0 as usize).ok_or_else(|| {
                Error::Graph(format!("actor lowering: accumulated value %{} is unknown", value.0))
            })?;
            accumulated[slot.0 as usize] = true;
        }
        let mut lowering = ActorLowering {
            program,
            config,
            plan: Plan::new(),
            phases: Vec::new(),
            accumulated,
            actors: HashMap::new(),
            sums: HashMap::new(),
            streams: HashMap::new(),
            writer,
            order: config.order,
            chains: Vec::new(),
        };
        lowering.phases = lowering.classify()?;
        Ok(lowering)
    }

    /// The phase of every step: inputs are per piece, anything reading a per-piece slot is per
    /// piece, anything reading an accumulated slot (or an after-step) runs after the pieces.
    fn classify(&self) -> Result<Vec<Phase>> {
        let program = self.program;
        let mut slot_phase = vec![Phase::Before; program.slots.len()];
        let mut phases = Vec::with_capacity(program.steps.len());
        for (index, step) in program.steps.iter().enumerate() {
            let (reads, writes) = step_slots(step);
            let mut phase = match step {
                Step::Leaf { value, .. } => match program.graph.value(*value).source {
                    Source::Input => Phase::Piece,
                    _ => Phase::Before,
                },
                _ => Phase::Before,
            };
            for slot in &reads {
                let read = match slot_phase[slot.0 as usize] {
                    Phase::Piece if self.accumulated[slot.0 as usize] => Phase::After,
                    other => other,
                };
                phase = match (phase, read) {
                    (Phase::After, Phase::Piece) | (Phase::Piece, Phase::After) => {
                        return Err(Error::Graph(format!(
                            "actor lowering: step {index} reads both per-piece values and \
                             values summed over pieces"
                        )))
                    }
                    (Phase::Before, other) => other,
                    (same, _) => same,
                };
            }
            for slot in writes {
                slot_phase[slot.0 as usize] = phase;
            }
            phases.push(phase);
        }
        Ok(phases)
    }

    fn stream_of(&self, step: &Step) -> u32 {
        match (self.config.streams, step) {
            (Streams::ComputeAndComm, Step::Boxing { plan, .. }) if communicates(plan) => 1,
            _ => 0,
        }
    }

    fn create_actors(&mut self) -> Result<()> {
        for step in 0..self.phases.len() {
            let pieces = if self.phases[step] == Phase::Piece { self.config.pieces } else { 1 };
            for piece in 0..pieces {
                self.add_step(step, piece);
            }
        }
        if self.config.pieces > 1 {
            self.add_sums();
        }
        Ok(())
    }

    /// Puts every rank's chained actors on its streams in the order it runs them: the steps
    /// before the pieces, the pieces' forwards and backwards in the [`PieceOrder`], the sums,
    /// the steps after (all in program order within each part).
    fn order_streams(&mut self) {
        let steps_in = |phase: Phase| -> Vec<usize> {
            (0..self.phases.len()).filter(|&s| self.phases[s] == phase).collect()
        };
        let (before, pieces, mut after) =
            (steps_in(Phase::Before), steps_in(Phase::Piece), steps_in(Phase::After));
        if self.config.streams == Streams::ComputeAndComm {
            after.sort_by_key(|&step| self.ready_order(step));
        }
        let end = self.forward_end();
        let (forward, backward): (Vec<usize>, Vec<usize>) =
            pieces.into_iter().partition(|&step| end.is_none_or(|end| step <= end));
        let stages = self.stages(&forward, &backward);
        if self.order == PieceOrder::OneForwardOneBackward && stages.is_none() {
            self.order = PieceOrder::GPipe;
        }
        let mut ranks: Vec<usize> = self.actors.keys().map(|&(_, rank, _)| rank).collect();
        ranks.sort_unstable();
        ranks.dedup();
        for rank in ranks {
            for &step in &before {
                self.chain(step, rank, 0);
            }
            let (stage, count) = stages
                .as_ref()
                .map_or((0, 1), |(of, count)| (of.get(&rank).copied().unwrap_or(0), *count));
            for (piece, is_forward) in piece_schedule(self.order, self.config.pieces, stage, count)
            {
                let part = if is_forward { &forward } else { &backward };
                for &step in part {
                    self.chain(step, rank, piece);
                }
            }
            let mut sums: Vec<(Slot, ActorId)> = self
                .sums
                .iter()
                .filter(|((_, r), _)| *r == rank)
                .map(|((slot, _), actor)| (*slot, *actor))
                .collect();
            sums.sort_unstable();
            for (_, actor) in sums {
                self.streams.entry((rank, 0)).or_default().push(actor);
            }
            for &step in &after {
                self.chain(step, rank, 0);
            }
        }
    }

    /// Appends the actor of (step, rank, piece), if there is one and it runs on a stream.
    fn chain(&mut self, step: usize, rank: usize, piece: u32) {
        if matches!(self.program.steps[step], Step::Leaf { .. }) {
            return;
        }
        if let Some(&actor) = self.actors.get(&(step, rank, piece)) {
            let stream = self.stream_of(&self.program.steps[step]);
            self.streams.entry((rank, stream)).or_default().push(actor);
        }
    }

    /// The last step of the forward: the writer of [`ActorConfig::forward`].
    fn forward_end(&self) -> Option<usize> {
        let value = self.config.forward?;
        let slot = self.program.produced.get(value.0 as usize)?;
        self.writer[slot.0 as usize]
    }

    /// The pipeline stage of every rank and the stage count, for 1F1B: stages are the
    /// placements of the forward kernels in order of first use. `None` when 1F1B is not safe
    /// there: placements that share ranks, a collective across stages, or a copy between stages
    /// against the direction of its pass (forward copies go to later stages, backward copies to
    /// earlier ones), which would meet its receive in another order.
    fn stages(
        &self,
        forward: &[usize],
        backward: &[usize],
    ) -> Option<(HashMap<usize, usize>, usize)> {
        let program = self.program;
        let mut placements: Vec<&meshflow_placement::Placement> = Vec::new();
        for &step in forward {
            if let Step::Kernel { node, .. } = &program.steps[step] {
                let placement = &program.graph.node(*node).placement;
                if !placements.contains(&placement) {
                    placements.push(placement);
                }
            }
        }
        let mut stage_of = HashMap::new();
        for (stage, placement) in placements.iter().enumerate() {
            for &rank in placement.ranks() {
                if stage_of.insert(rank, stage).is_some() {
                    return None;
                }
            }
        }
        let stage = |layout: &Layout| -> Option<usize> {
            let mut stages = layout.placement.ranks().iter().map(|rank| stage_of.get(rank));
            let first = stages.next()??;
            stages.all(|s| s == Some(first)).then_some(*first)
        };
        let passes = [(forward, true), (backward, false)];
        for (steps, is_forward) in passes {
            for &step in steps {
                let Step::Boxing { from, to, plan } = &program.steps[step] else { continue };
                if !communicates(plan) {
                    continue;
                }
                let source = stage(&program.slot(*from).layout)?;
                let target = stage(&program.slot(*to).layout)?;
                let along = source == target || (source < target) == is_forward;
                if !along {
                    return None;
                }
            }
        }
        let count = placements.len().max(1);
        Some((stage_of, count))
    }

    /// With a communication stream, collectives after the pieces (gradient all-reduces) are
    /// issued in the order their inputs become ready, so they overlap the backward: a boxing
    /// step sorts right after its source's writer, other steps at their own position.
    fn ready_order(&self, step: usize) -> (usize, u8) {
        match &self.program.steps[step] {
            Step::Boxing { from, plan, .. } if communicates(plan) => {
                (self.writer[from.0 as usize].unwrap_or(step), 1)
            }
            _ => (step, 0),
        }
    }

    fn add_step(&mut self, index: usize, piece: u32) {
        let program = self.program;
        let step = &program.steps[index];
        let kind = match step {
            Step::Leaf { value, .. } => match program.graph.value(*value).source {
                Source::Input => ActorKind::Source,
                _ => ActorKind::Variable,
            },
            _ => ActorKind::Compute,
        };
        let stream = self.stream_of(step);
        for rank in step_ranks(program, step) {
            let name = format!("{} r{rank} p{piece}", self.step_name(index));
            let payload = ActorWork { work: Work::Step { step: index }, rank, piece };
            let device = device(self.config.streams, rank, stream);
            let actor = self.plan.add_actor(name, kind, device, payload);
            self.actors.insert((index, rank, piece), actor);
        }
    }

    fn add_sums(&mut self) {
        let program = self.program;
        for (slot, _) in self.accumulated.iter().enumerate().filter(|(_, a)| **a) {
            let slot = Slot(slot as u32);
            for &rank in layout_ranks(&program.slot(slot).layout) {
                let name =
                    format!("accumulate {} r{rank}", program.graph.label(program.slot(slot).value));
                let payload = ActorWork { work: Work::Accumulate { slot }, rank, piece: 0 };
                let device = device(self.config.streams, rank, 0);
                let actor = self.plan.add_actor(name, ActorKind::Compute, device, payload);
                self.sums.insert((slot, rank), actor);
            }
        }
    }

    fn step_name(&self, index: usize) -> String {
        let program = self.program;
        match &program.steps[index] {
            Step::Leaf { value, .. } => format!("leaf {}", program.graph.label(*value)),
            Step::Boxing { from, plan, .. } => {
                let kinds: Vec<&str> = plan.steps.iter().map(|s| s.kind.name()).collect();
                let label = program.graph.label(program.slot(*from).value);
                format!("{} {label}", kinds.join("+"))
            }
            Step::Kernel { node, .. } => {
                format!("{}#{}", program.graph.node(*node).op.name(), node.0)
            }
        }
    }

    /// The actor whose output holds `slot` on `rank` for `piece`, as a reader in `phase` sees it.
    fn source_actor(&self, slot: Slot, rank: usize, piece: u32, phase: Phase) -> Result<ActorId> {
        let step = self.writer[slot.0 as usize].ok_or_else(|| {
            Error::Graph(format!("actor lowering: slot {} has no writer", slot.0))
        })?;
        if self.phases[step] == Phase::Piece && phase != Phase::Piece {
            if let Some(sum) = self.sums.get(&(slot, rank)) {
                return Ok(*sum);
            }
        }
        let piece = if self.phases[step] == Phase::Piece { piece } else { 0 };
        self.actors.get(&(step, rank, piece)).copied().ok_or_else(|| {
            Error::Graph(format!(
                "actor lowering: rank {rank} reads slot {} that step {step} does not write there",
                slot.0
            ))
        })
    }

    fn connect(&mut self) -> Result<()> {
        let mut edges: BTreeSetMap = BTreeSetMap::default();
        self.data_edges(&mut edges)?;
        self.sum_edges(&mut edges)?;
        self.update_edges(&mut edges)?;
        for ((producer, _), consumers) in edges.0 {
            let consumers: Vec<ActorId> = consumers.into_iter().collect();
            self.plan.add_edge(producer, &consumers, 1);
        }
        self.order_edges();
        self.start_unfed();
        Ok(())
    }

    /// Without joins, a boxing actor of a rank that only receives may have no input at all
    /// (the first of its stream): it acts once per step, as a source does.
    fn start_unfed(&mut self) {
        let mut fed = vec![false; self.plan.actors.len()];
        for edge in &self.plan.edges {
            for consumer in &edge.consumers {
                fed[consumer.index()] = true;
            }
        }
        for (spec, fed) in self.plan.actors.iter_mut().zip(fed) {
            if spec.kind == ActorKind::Compute && !fed {
                spec.kind = ActorKind::Source;
            }
        }
    }

    fn data_edges(&mut self, edges: &mut BTreeSetMap) -> Result<()> {
        let program = self.program;
        let keys: Vec<(usize, usize, u32)> = self.sorted_actor_keys();
        let mut joins: HashMap<(usize, usize, u32), ActorId> = HashMap::new();
        let mut groups: HashMap<usize, Vec<Vec<usize>>> = HashMap::new();
        for (index, rank, piece) in keys {
            let consumer = self.actors[&(index, rank, piece)];
            let phase = self.phases[index];
            match &program.steps[index] {
                Step::Leaf { .. } => {}
                Step::Kernel { inputs, .. } => {
                    for slot in inputs {
                        edges.add(self.source_actor(*slot, rank, piece, phase)?, *slot, consumer);
                    }
                }
                Step::Boxing { from, to, plan } => {
                    if !communicates(plan) || !self.config.joins {
                        if layout_ranks(&program.slot(*from).layout).contains(&rank) {
                            let source = self.source_actor(*from, rank, piece, phase)?;
                            edges.add(source, *from, consumer);
                        }
                        continue;
                    }
                    if let std::collections::hash_map::Entry::Vacant(entry) = groups.entry(index) {
                        entry.insert(self.boxing_groups(*from, *to, plan)?);
                    }
                    let group = groups[&index]
                        .iter()
                        .find(|group| group.contains(&rank))
                        .cloned()
                        .unwrap_or_else(|| vec![rank]);
                    let join = match joins.get(&(index, group[0], piece)) {
                        Some(join) => *join,
                        None => {
                            let join = self.add_join(index, group[0], piece);
                            let holders = layout_ranks(&program.slot(*from).layout);
                            for member in group.iter().filter(|m| holders.contains(m)) {
                                let source = self.source_actor(*from, *member, piece, phase)?;
                                edges.add(source, *from, join);
                            }
                            joins.insert((index, group[0], piece), join);
                            join
                        }
                    };
                    edges.add(join, *to, consumer);
                }
            }
        }
        Ok(())
    }

    fn sorted_actor_keys(&self) -> Vec<(usize, usize, u32)> {
        let mut keys: Vec<(usize, usize, u32)> = self.actors.keys().copied().collect();
        keys.sort_unstable();
        keys
    }

    fn add_join(&mut self, step: usize, first: usize, piece: u32) -> ActorId {
        let name = format!("join {} r{first} p{piece}", self.step_name(step));
        let payload = ActorWork { work: Work::Join { step }, rank: first, piece };
        let device = device(self.config.streams, first, 1);
        self.plan.add_actor(name, ActorKind::Compute, device, payload)
    }

    /// The groups of ranks that exchange data in a communicating boxing step: on one placement,
    /// the ranks that agree on every mesh axis the plan does not communicate over; across
    /// placements, the ranks connected by the pieces they copy.
    fn boxing_groups(&self, from: Slot, to: Slot, plan: &BoxingPlan) -> Result<Vec<Vec<usize>>> {
        let program = self.program;
        let source = &program.slot(from).layout;
        let target = &program.slot(to).layout;
        let mut union = UnionFind::default();
        for &rank in source.placement.ranks().iter().chain(target.placement.ranks()) {
            union.find(rank);
        }
        if source.placement == target.placement {
            let placement = &source.placement;
            let axes: BTreeSet<usize> =
                plan.steps.iter().filter_map(|step| mesh_axis(&step.kind)).collect();
            let mut firsts: HashMap<Vec<usize>, usize> = HashMap::new();
            for (index, &rank) in placement.ranks().iter().enumerate() {
                let mut key = placement.coordinates_of_index(index);
                for &axis in &axes {
                    key[axis] = 0;
                }
                let first = *firsts.entry(key).or_insert(rank);
                union.join(first, rank);
            }
        } else {
            let meta = &program.graph.value(program.slot(from).value).meta;
            let pieces = transfer_pieces(meta.shape.dims(), source, target)?;
            for (index, copies) in pieces.iter().enumerate() {
                let rank = target.placement.ranks()[index];
                for piece in copies {
                    union.join(source.placement.ranks()[piece.source_index], rank);
                }
            }
        }
        Ok(union.groups())
    }

    fn sum_edges(&mut self, edges: &mut BTreeSetMap) -> Result<()> {
        let sums: Vec<((Slot, usize), ActorId)> =
            self.sums.iter().map(|(key, actor)| (*key, *actor)).collect();
        for ((slot, rank), sum) in sums {
            for piece in 0..self.config.pieces {
                edges.add(self.source_actor(slot, rank, piece, Phase::Piece)?, slot, sum);
            }
        }
        Ok(())
    }

    fn update_edges(&mut self, edges: &mut BTreeSetMap) -> Result<()> {
        let program = self.program;
        for &(parameter, slot) in &self.config.updates {
            let leaf = program.produced.get(parameter.0 as usize).copied();
            let leaf_step = leaf.and_then(|s| self.writer[s.0 as usize]);
            let Some(leaf_step) =
                leaf_step.filter(|&s| matches!(program.steps[s], Step::Leaf { .. }))
            else {
                return Err(Error::Graph(format!(
                    "actor lowering: update of %{} which is not a leaf",
                    parameter.0
                )));
            };
            for &rank in layout_ranks(&program.slot(slot).layout) {
                let variable =
                    self.actors.get(&(leaf_step, rank, 0)).copied().ok_or_else(|| {
                        Error::Graph(format!(
                        "actor lowering: the update of {} reaches rank {rank} where the variable \
                         does not live",
                        program.graph.label(parameter)
                    ))
                    })?;
                edges.add(self.source_actor(slot, rank, 0, Phase::After)?, slot, variable);
            }
        }
        Ok(())
    }

    /// Chains each stream's actors in order and ends every rank in a sink that reads the last
    /// actor of each stream and every otherwise unread leaf.
    fn order_edges(&mut self) {
        let mut ends: HashMap<usize, Vec<ActorId>> = HashMap::new();
        let mut streams: Vec<((usize, u32), Vec<ActorId>)> = self.streams.drain().collect();
        streams.sort_unstable();
        self.chains = streams.clone();
        for ((rank, _), actors) in streams {
            for pair in actors.windows(2) {
                self.plan.add_edge(pair[0], &[pair[1]], 1);
            }
            if let Some(last) = actors.last() {
                ends.entry(rank).or_default().push(*last);
            }
        }
        let mut has_output = vec![false; self.plan.actors.len()];
        for edge in &self.plan.edges {
            has_output[edge.producer.index()] = true;
        }
        for (index, spec) in self.plan.actors.iter().enumerate() {
            let leaf = matches!(spec.kind, ActorKind::Source | ActorKind::Variable);
            if leaf && !has_output[index] {
                ends.entry(spec.payload.rank).or_default().push(ActorId(index as u32));
            }
        }
        let mut ends: Vec<(usize, Vec<ActorId>)> = ends.into_iter().collect();
        ends.sort_unstable();
        for (rank, lasts) in ends {
            let payload = ActorWork { work: Work::End, rank, piece: 0 };
            let device = device(self.config.streams, rank, 0);
            let sink =
                self.plan.add_actor(format!("end r{rank}"), ActorKind::Sink, device, payload);
            for last in lasts {
                self.plan.add_edge(last, &[sink], 1);
            }
        }
    }
}

/// The mesh axis a communicating boxing step exchanges over, if it stays on one placement.
fn mesh_axis(kind: &StepKind) -> Option<usize> {
    match *kind {
        StepKind::AllReduce { mesh_axis }
        | StepKind::ReduceScatter { mesh_axis, .. }
        | StepKind::AllGather { mesh_axis, .. }
        | StepKind::AllToAll { mesh_axis, .. } => Some(mesh_axis),
        _ => None,
    }
}

/// Data edges under construction: per (producer, slot), its consumers.
#[derive(Default)]
struct BTreeSetMap(std::collections::BTreeMap<(ActorId, Slot), BTreeSet<ActorId>>);

impl BTreeSetMap {
    fn add(&mut self, producer: ActorId, slot: Slot, consumer: ActorId) {
        self.0.entry((producer, slot)).or_default().insert(consumer);
    }
}

/// Disjoint sets of ranks.
#[derive(Default)]
struct UnionFind {
    parent: HashMap<usize, usize>,
}

impl UnionFind {
    fn find(&mut self, rank: usize) -> usize {
        let parent = *self.parent.entry(rank).or_insert(rank);
        if parent == rank {
            return rank;
        }
        let root = self.find(parent);
        self.parent.insert(rank, root);
        root
    }

    fn join(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.parent.insert(a.max(b), a.min(b));
        }
    }

    /// The sets, each sorted, in order of their first rank.
    fn groups(&mut self) -> Vec<Vec<usize>> {
        let ranks: Vec<usize> = self.parent.keys().copied().collect();
        let mut sets: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for rank in ranks {
            let root = self.find(rank);
            sets.entry(root).or_default().push(rank);
        }
        sets.into_values()
            .map(|mut set| {
                set.sort_unstable();
                set
            })
            .collect()
    }
}

/// Lowers `program` to an actor plan (see the parent module).
pub(super) fn lower(program: &Program, config: &ActorConfig) -> Result<ActorProgram> {
    if config.pieces == 0 {
        return Err(Error::Graph("actor lowering: pieces must be at least 1".into()));
    }
    let mut lowering = ActorLowering::new(program, config)?;
    lowering.create_actors()?;
    lowering.order_streams();
    lowering.connect()?;
    let forward_end = lowering.forward_end();
    Ok(ActorProgram {
        plan: lowering.plan,
        streams: config.streams,
        pieces: config.pieces,
        phases: lowering.phases,
        accumulated: lowering.accumulated,
        order: lowering.order,
        forward_end,
        chains: lowering.chains,
    })
}
