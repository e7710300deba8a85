//! One device of a session: its communicators, its thread budget, the shards of the variables
//! placed on it, and the tensors of the step in flight. The actor runtime runs the acts of the
//! rank on the device's thread ([`super::executor`]); each act runs one step of the program for
//! one piece here ([`Worker::act`]).

use std::collections::HashMap;

use meshflow_actor::{ActorId, Enclosure};
use meshflow_ops::ops::add::Add;
use meshflow_ops::{Context, Device, OpRef, Tensor, TensorMeta, Value, DEFAULT_KEEP_WARM};
use meshflow_placement::{local_region, Layout, Region};

use super::executor::{Compiled, Key, SUM};
use super::gpu::Backend;
use crate::compile::actors::Phase;
use crate::compile::{Slot, Step};
use crate::exec::boxing::Comms;
use crate::exec::layout::take_box;
use crate::graph::{Init, NodeId, Source};
use crate::{Error, Result};

/// What one step of a session needs besides the program, shared by every device.
pub struct RunRequest {
    /// Per input and piece, its logical value (the piece's rows of the fed batch).
    pub feeds: HashMap<(Value, u32), Tensor>,
    /// Ops that replace a node's op for this run (hyper-parameters that change per step).
    pub overrides: HashMap<NodeId, OpRef>,
}

/// A device's state across runs.
pub struct Worker {
    rank: usize,
    ctx: Context,
    comms: Comms,
    /// Where this rank keeps its tensors and runs its kernels (host or a GPU).
    backend: Backend,
    variables: HashMap<String, Tensor>,
    /// The shards of the step in flight, by slot and piece ([`SUM`] for sums over pieces).
    store: HashMap<Key, Tensor>,
}

impl Worker {
    /// A device with its communicators, thread budget and backend. A CPU device with several
    /// threads keeps its pool warm between the kernels of a step
    /// ([`Context::with_keep_warm`], [`DEFAULT_KEEP_WARM`]): its acts run on a pool thread
    /// ([`Worker::enclosure`]), and a parked pool thread woke late for each parallel kernel.
    pub fn new(rank: usize, ctx: Context, comms: Comms, backend: Backend) -> Self {
        let ctx = if backend.device() == Device::Cpu && ctx.threads() > 1 {
            ctx.with_keep_warm(DEFAULT_KEEP_WARM)
        } else {
            ctx
        };
        Worker { rank, ctx, comms, backend, variables: HashMap::new(), store: HashMap::new() }
    }

    /// Where this rank keeps its tensors and runs its kernels.
    pub fn backend_mut(&mut self) -> &mut Backend {
        &mut self.backend
    }

    /// Where the device thread serves its acts: inside this device's thread pool on a CPU rank
    /// with several threads (entered once, not once per kernel), nothing else.
    pub fn enclosure(&self) -> Option<Enclosure> {
        if self.backend.device() != Device::Cpu || self.ctx.threads() < 2 {
            return None;
        }
        let ctx = self.ctx.clone();
        Some(std::sync::Arc::new(move |serve: &mut (dyn FnMut() + Send)| ctx.install(serve)))
    }

    /// This device's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Adds the communicator of a group this rank belongs to.
    pub fn add_group(
        &mut self,
        ranks: Vec<usize>,
        communicator: Box<dyn meshflow_comm::Communicator>,
    ) {
        self.comms.groups.insert(ranks, communicator);
    }

    /// A host copy of this rank's shard of variable `name`, if it holds one.
    pub fn variable(&self, name: &str) -> Result<Option<Tensor>> {
        self.variables.get(name).map(|shard| self.backend.download(shard)).transpose()
    }

    /// Replaces this rank's shard of variable `name`.
    pub fn set_variable(&mut self, name: &str, shard: Tensor) {
        self.variables.insert(name.to_string(), shard);
    }

    /// Runs `program.steps[step]` for `piece` as the act of `actor`, then drops the shards whose
    /// last reader it was.
    pub(super) fn act(
        &mut self,
        compiled: &Compiled,
        request: &RunRequest,
        actor: ActorId,
        step: usize,
        piece: u32,
    ) -> Result<()> {
        let program = &compiled.program;
        let phase = compiled.lowered.phases[step];
        match &program.steps[step] {
            Step::Leaf { value, slot } => {
                let layout = &program.slot(*slot).layout;
                if layout.placement.coordinates(self.rank).is_some() {
                    let shard = self.leaf(compiled, request, *value, layout, piece)?;
                    self.write(compiled, *slot, phase, piece, shard)?;
                }
            }
            Step::Boxing { from, to, plan } => {
                let dtype = program.graph.value(program.slot(*from).value).meta.dtype;
                let shard = self.store.get(&compiled.key(*from, phase, piece)).cloned();
                if let Some(out) = self.backend.apply_plan(plan, dtype, shard, &mut self.comms)? {
                    self.write(compiled, *to, phase, piece, out)?;
                }
            }
            Step::Kernel { node, inputs, outputs, ops } => {
                let placement = &program.graph.node(*node).placement;
                if let Some(coordinates) = placement.coordinates(self.rank) {
                    let index = placement.index_of_coordinates(&coordinates);
                    let op = request.overrides.get(node).unwrap_or(&ops[index]);
                    let pieces = compiled.lowered.pieces;
                    let op = &crate::graph::for_piece(op, &program.graph, *node, piece, pieces)?;
                    let args = inputs
                        .iter()
                        .map(|slot| self.read(compiled, *slot, phase, piece, op.name()))
                        .collect::<Result<Vec<_>>>()?;
                    let results = self.backend.forward(&self.ctx, &**op, &args).map_err(|e| {
                        Error::Runtime(format!("rank {}: {}: {e}", self.rank, op.name()))
                    })?;
                    for (slot, tensor) in outputs.iter().zip(results) {
                        self.write(compiled, *slot, phase, piece, tensor)?;
                    }
                }
            }
        }
        for key in compiled.frees(actor) {
            self.store.remove(key);
        }
        Ok(())
    }

    /// Ends a step: the variables take their new shards, and this rank's shards of the fetched
    /// slots come back (`None` where it holds none); everything else of the step is dropped.
    pub(super) fn finish_step(&mut self, compiled: &Compiled) -> Result<Vec<Option<Tensor>>> {
        for (name, slot) in &compiled.assign {
            if let Some(shard) = self.store.get(&compiled.final_key(*slot)) {
                self.variables.insert(name.clone(), shard.clone());
            }
        }
        let fetched = compiled.fetch.iter().map(|slot| {
            let shard = self.store.get(&compiled.final_key(*slot));
            shard.map(|shard| self.backend.download(shard)).transpose()
        });
        let fetched = fetched.collect();
        self.store.clear();
        fetched
    }

    fn read(
        &self,
        compiled: &Compiled,
        slot: Slot,
        phase: Phase,
        piece: u32,
        op: &str,
    ) -> Result<Tensor> {
        let program = &compiled.program;
        self.store.get(&compiled.key(slot, phase, piece)).cloned().ok_or_else(|| {
            Error::Runtime(format!(
                "rank {}: {op} (piece {piece}) has no shard of {}",
                self.rank,
                program.graph.label(program.slot(slot).value)
            ))
        })
    }

    /// Keeps a shard the step wrote where a later act (or the end of the step) reads it; a
    /// per-piece shard of a value summed over pieces is added to its sum at once.
    fn write(
        &mut self,
        compiled: &Compiled,
        slot: Slot,
        phase: Phase,
        piece: u32,
        shard: Tensor,
    ) -> Result<()> {
        if phase == Phase::Piece && compiled.lowered.accumulated[slot.0 as usize] {
            let sum = match self.store.remove(&(slot, SUM)) {
                None => shard.clone(),
                Some(sum) => {
                    let added = self.backend.forward(&self.ctx, &Add, &[sum, shard.clone()]);
                    added?.pop().ok_or_else(|| Error::Runtime("add returned nothing".into()))?
                }
            };
            self.store.insert((slot, SUM), sum);
        }
        let key = (slot, if phase == Phase::Piece { piece } else { 0 });
        if compiled.is_read(self.rank, key) {
            self.store.insert(key, shard);
        }
        Ok(())
    }

    /// This rank's shard of a leaf.
    fn leaf(
        &mut self,
        compiled: &Compiled,
        request: &RunRequest,
        value: Value,
        layout: &Layout,
        piece: u32,
    ) -> Result<Tensor> {
        let graph = &compiled.program.graph;
        let info = graph.value(value);
        let logical = match &info.source {
            Source::Input => request.feeds.get(&(value, piece)).ok_or_else(|| {
                Error::Runtime(format!("input {} (piece {piece}) was not fed", graph.label(value)))
            })?,
            Source::Parameter { init } => {
                let name = info.name.clone().unwrap_or_else(|| graph.label(value));
                let shard = match self.variables.get(&name) {
                    Some(shard) => shard.clone(),
                    None => init_shard(init, &info.meta, layout, self.rank)?,
                };
                let shard = self.backend.upload(shard)?;
                self.variables.insert(name, shard.clone());
                return Ok(shard);
            }
            Source::Constant { value } => value,
            Source::Node { .. } => unreachable!("leaf steps are made for leaves only"),
        };
        self.backend.upload(shard_of(logical, layout, self.rank)?)
    }
}

/// The shard of logical tensor `t` that `rank` holds under `layout` (no partial sums: a leaf is
/// split or broadcast).
pub fn shard_of(t: &Tensor, layout: &Layout, rank: usize) -> Result<Tensor> {
    let region = region_of(t.dims(), layout, rank)?;
    take_box(t, &region.offsets, &region.shape)
}

/// The shard `rank` holds under `layout` of a parameter initialised by `init`.
pub fn init_shard(init: &Init, meta: &TensorMeta, layout: &Layout, rank: usize) -> Result<Tensor> {
    init.region(meta, &region_of(meta.shape.dims(), layout, rank)?)
}

/// The region of a logical tensor of `dims` that `rank` holds under `layout`.
fn region_of(dims: &[usize], layout: &Layout, rank: usize) -> Result<Region> {
    let placement = &layout.placement;
    let coordinates = placement
        .coordinates(rank)
        .ok_or_else(|| Error::Runtime(format!("rank {rank} is not in {placement}")))?;
    Ok(local_region(dims, &layout.nd_sbp, placement.hierarchy(), &coordinates)?)
}
