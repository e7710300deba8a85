//! One device of a session: a thread that owns its communicators, its thread budget and the
//! shards of the variables placed on it, and runs the steps of a program it takes part in.

use std::collections::HashMap;
use std::sync::Arc;

use meshflow_ops::{Context, OpRef, Tensor, TensorMeta, Value};
use meshflow_placement::{local_region, Layout, Region};

use crate::compile::{Program, Slot, Step};
use crate::exec::boxing::{apply_plan, Comms};
use crate::exec::layout::take_box;
use crate::graph::{Init, NodeId, Source};
use crate::{Error, Result};

/// What one run of a program needs, shared by every device.
pub struct RunRequest {
    /// The program.
    pub program: Arc<Program>,
    /// Logical values of the inputs.
    pub feeds: HashMap<Value, Tensor>,
    /// Ops that replace a node's op for this run (hyper-parameters that change per step).
    pub overrides: HashMap<NodeId, OpRef>,
    /// Slots whose shards come back.
    pub fetch: Vec<Slot>,
    /// Variables (by name) that take the shard of a slot after the run.
    pub assign: Vec<(String, Slot)>,
}

/// A device's state across runs.
pub struct Worker {
    rank: usize,
    ctx: Context,
    comms: Comms,
    variables: HashMap<String, Tensor>,
}

impl Worker {
    /// A device with its communicators and thread budget.
    pub fn new(rank: usize, ctx: Context, comms: Comms) -> Self {
        Worker { rank, ctx, comms, variables: HashMap::new() }
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

    /// This rank's shard of variable `name`, if it holds one.
    pub fn variable(&self, name: &str) -> Option<&Tensor> {
        self.variables.get(name)
    }

    /// Replaces this rank's shard of variable `name`.
    pub fn set_variable(&mut self, name: &str, shard: Tensor) {
        self.variables.insert(name.to_string(), shard);
    }

    /// Runs the steps of `request.program` this rank takes part in; returns its shards of the
    /// fetched slots (`None` where it holds none).
    pub fn run(&mut self, request: &RunRequest) -> Result<Vec<Option<Tensor>>> {
        let program = &request.program;
        let mut local: Vec<Option<Tensor>> = vec![None; program.slots.len()];
        for (step, frees) in program.steps.iter().zip(&program.frees) {
            self.step(request, step, &mut local)?;
            for slot in frees {
                local[slot.0 as usize] = None;
            }
        }
        for (name, slot) in &request.assign {
            if let Some(shard) = local[slot.0 as usize].take() {
                self.variables.insert(name.clone(), shard);
            }
        }
        Ok(request.fetch.iter().map(|slot| local[slot.0 as usize].clone()).collect())
    }

    fn step(
        &mut self,
        request: &RunRequest,
        step: &Step,
        local: &mut [Option<Tensor>],
    ) -> Result<()> {
        let program = &request.program;
        match step {
            Step::Leaf { value, slot } => {
                let layout = &program.slot(*slot).layout;
                if layout.placement.coordinates(self.rank).is_some() {
                    local[slot.0 as usize] = Some(self.leaf(request, *value, layout)?);
                }
            }
            Step::Boxing { from, to, plan } => {
                let value = program.slot(*from).value;
                let dtype = program.graph.value(value).meta.dtype;
                let shard = local[from.0 as usize].clone();
                local[to.0 as usize] = apply_plan(plan, dtype, shard, &mut self.comms)?;
            }
            Step::Kernel { node, inputs, outputs, ops } => {
                let placement = &program.graph.node(*node).placement;
                let Some(coordinates) = placement.coordinates(self.rank) else {
                    return Ok(());
                };
                let index = placement.index_of_coordinates(&coordinates);
                let op = request.overrides.get(node).unwrap_or(&ops[index]);
                let args = inputs
                    .iter()
                    .map(|s| {
                        local[s.0 as usize].clone().ok_or_else(|| {
                            Error::Runtime(format!(
                                "rank {}: {} has no shard of {}",
                                self.rank,
                                op.name(),
                                program.graph.label(program.slot(*s).value)
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let results = self.ctx.install(|| op.forward(&self.ctx, &args)).map_err(|e| {
                    Error::Runtime(format!("rank {}: {}: {e}", self.rank, op.name()))
                })?;
                for (slot, tensor) in outputs.iter().zip(results) {
                    local[slot.0 as usize] = Some(tensor);
                }
            }
        }
        Ok(())
    }

    /// This rank's shard of a leaf.
    fn leaf(&mut self, request: &RunRequest, value: Value, layout: &Layout) -> Result<Tensor> {
        let graph = &request.program.graph;
        let info = graph.value(value);
        let logical = match &info.source {
            Source::Input => request.feeds.get(&value).ok_or_else(|| {
                Error::Runtime(format!("input {} was not fed", graph.label(value)))
            })?,
            Source::Parameter { init } => {
                let name = info.name.clone().unwrap_or_else(|| graph.label(value));
                if let Some(shard) = self.variables.get(&name) {
                    return Ok(shard.clone());
                }
                let shard = init_shard(init, &info.meta, layout, self.rank)?;
                self.variables.insert(name, shard.clone());
                return Ok(shard);
            }
            Source::Constant { value } => value,
            Source::Node { .. } => unreachable!("leaf steps are made for leaves only"),
        };
        shard_of(logical, layout, self.rank)
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
