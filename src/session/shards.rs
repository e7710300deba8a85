//! Per-rank access to the variables of a session, for checkpoints: which variables there are and
//! how each is laid out ([`VariableSpec`]), each rank's own shards read on its device thread
//! ([`Session::on_each_rank`]), shards set rank by rank ([`Session::set_shards`]), and the step
//! counter that drives the optimizer's bias correction and the learning-rate schedule.

use std::sync::{Arc, Mutex};

use meshflow_ops::{Tensor as HostTensor, TensorMeta, Value};
use meshflow_placement::{local_region, Layout, Region, Sbp};

use super::{Session, Worker};
use crate::graph::Source;
use crate::{Error, Result};

/// Suffixes of the optimizer-state variables a training session appends: the state of
/// parameter `p` is named `p.exp_avg`, `p.exp_avg_sq` (AdamW) or `p.momentum_buffer` (SGD).
pub const OPTIMIZER_STATE_SUFFIXES: [&str; 3] = ["exp_avg", "exp_avg_sq", "momentum_buffer"];

/// A variable of a session (a parameter or an optimizer state) and the layout it lives in.
#[derive(Clone, Debug)]
pub struct VariableSpec {
    /// Its name (`h.0.attn.c_attn.weight`, `wte.weight.exp_avg` …).
    pub name: String,
    /// Logical shape and dtype.
    pub meta: TensorMeta,
    /// The placement and nd-SBP the compiler gave it.
    pub layout: Layout,
    /// True for optimizer state (see [`OPTIMIZER_STATE_SUFFIXES`]).
    pub optimizer_state: bool,
}

impl VariableSpec {
    /// The region of the logical tensor that `rank` holds, `None` when `rank` is not in the
    /// placement.
    pub fn region(&self, rank: usize) -> Result<Option<Region>> {
        let placement = &self.layout.placement;
        let Some(coordinates) = placement.coordinates(rank) else {
            return Ok(None);
        };
        let dims = self.meta.shape.dims();
        Ok(Some(local_region(dims, &self.layout.nd_sbp, placement.hierarchy(), &coordinates)?))
    }

    /// True when `rank` holds the first of a group of identical copies: it is in the placement
    /// and sits at coordinate 0 on every broadcast mesh axis. Exactly one rank per distinct
    /// region is such a writer, so a checkpoint stores each region once.
    pub fn is_writer(&self, rank: usize) -> bool {
        let Some(coordinates) = self.layout.placement.coordinates(rank) else {
            return false;
        };
        let axes = self.layout.nd_sbp.axes();
        axes.iter().zip(&coordinates).all(|(sbp, &c)| *sbp != Sbp::Broadcast || c == 0)
    }

    /// An error when the layout holds partial sums (a variable is split or broadcast only).
    pub fn check_storable(&self) -> Result<()> {
        if self.layout.nd_sbp.has_partial() {
            return Err(Error::Graph(format!(
                "variable {} lives as partial sums under {}; only split or broadcast variables \
                 can be stored shard by shard",
                self.name, self.layout
            )));
        }
        Ok(())
    }
}

/// One rank's view of its variables, handed to the closure of [`Session::on_each_rank`] on that
/// rank's device thread.
pub struct RankShards<'a> {
    worker: &'a Worker,
}

impl RankShards<'_> {
    /// The rank.
    pub fn rank(&self) -> usize {
        self.worker.rank()
    }

    /// This rank's shard of `spec`; `None` when the rank holds none: it is not in the
    /// variable's placement, or no step has read the variable yet (it still has its initial
    /// value, which [`Session::variables`] gives).
    pub fn shard(&self, spec: &VariableSpec) -> Option<HostTensor> {
        self.worker.variable(&spec.name).cloned()
    }
}

/// Per rank, the shards to set: `(variable name, shard)`.
pub type RankAssignments = Vec<(String, HostTensor)>;

impl Session {
    /// Every variable of the program (parameters, then optimizer state, in graph order) with
    /// its layout.
    pub fn variable_specs(&self) -> Vec<VariableSpec> {
        let program = &self.program;
        let mut specs = Vec::new();
        for (index, info) in program.graph.values.iter().enumerate() {
            let Source::Parameter { .. } = &info.source else { continue };
            let name =
                info.name.clone().unwrap_or_else(|| program.graph.label(Value(index as u32)));
            let optimizer_state = name
                .rsplit_once('.')
                .is_some_and(|(_, suffix)| OPTIMIZER_STATE_SUFFIXES.contains(&suffix));
            specs.push(VariableSpec {
                name,
                meta: info.meta.clone(),
                layout: program.slot(program.produced[index]).layout.clone(),
                optimizer_state,
            });
        }
        specs
    }

    /// Number of devices of this session (ranks `0..world_size`).
    pub fn world_size(&self) -> usize {
        self.devices.len()
    }

    /// Runs `f` on every rank's device thread (in parallel, between steps) and returns the
    /// answers in rank order.
    pub fn on_each_rank<R: Send + 'static>(
        &self,
        f: impl Fn(&RankShards<'_>) -> R + Send + Sync + 'static,
    ) -> Result<Vec<R>> {
        self.devices.each(move |worker| f(&RankShards { worker }))
    }

    /// Sets shards rank by rank (`shards[rank]`), after checking every one against the
    /// variable's layout: each name must be a variable whose placement holds the rank, and each
    /// shard must have that rank's local shape and the variable's dtype. Nothing is set when a
    /// check fails.
    pub fn set_shards(&mut self, shards: Vec<RankAssignments>) -> Result<()> {
        if shards.len() > self.world_size() {
            return Err(Error::Runtime(format!(
                "shards for {} ranks, the session has {}",
                shards.len(),
                self.world_size()
            )));
        }
        let specs = self.variable_specs();
        for (rank, assignments) in shards.iter().enumerate() {
            for (name, shard) in assignments {
                check_shard(&specs, rank, name, shard)?;
            }
        }
        let mut slots: Vec<Option<RankAssignments>> = shards.into_iter().map(Some).collect();
        slots.resize(self.world_size(), None);
        let slots = Arc::new(Mutex::new(slots));
        self.devices.each(move |worker| {
            let mine = slots.lock().map(|mut s| s[worker.rank()].take()).ok().flatten();
            for (name, shard) in mine.unwrap_or_default() {
                worker.set_variable(&name, shard);
            }
        })?;
        Ok(())
    }

    /// Sets the number of steps done: the next step is `steps + 1` for the optimizer's bias
    /// correction and takes the learning rate of position `steps` of the schedule.
    pub fn set_steps_done(&mut self, steps: u64) {
        self.steps_done = steps;
    }
}

/// Checks that `shard` fits variable `name` on `rank`.
fn check_shard(specs: &[VariableSpec], rank: usize, name: &str, shard: &HostTensor) -> Result<()> {
    let spec = specs
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| Error::Graph(format!("no variable named {name:?}")))?;
    let region = spec.region(rank)?.ok_or_else(|| {
        Error::Graph(format!("variable {name} does not live on rank {rank} ({})", spec.layout))
    })?;
    if shard.dims() != region.shape.as_slice() || shard.dtype() != spec.meta.dtype {
        return Err(Error::Graph(format!(
            "variable {name} on rank {rank}: expected a {:?} {} shard under {}, got {:?} {}",
            region.shape,
            spec.meta.dtype,
            spec.layout,
            shard.dims(),
            shard.dtype()
        )));
    }
    Ok(())
}
