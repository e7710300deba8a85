//! Per-rank access to the variables of a session, for checkpoints: which variables there are and
//! how each is laid out ([`VariableSpec`]), each rank's own shards read on its device thread
//! ([`Session::on_each_rank`]), shards set rank by rank ([`Session::set_shards`]), the step
//! counter that drives the optimizer's bias correction and the learning-rate schedule, and, in a
//! session of several processes, the job ([`Session::job`]) and whole variables gathered from
//! every process ([`Session::gather_variables`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use meshflow_ops::io::{self, Named};
use meshflow_ops::{Tensor as HostTensor, TensorMeta, Value};
use meshflow_placement::{local_region, Layout, Region, Sbp};

use super::{assemble, init_shard, Session, Worker};
use crate::dist::Job;
use crate::graph::{Init, Source, STEP_COUNTER};
use crate::{Error, Result};

/// The most bytes one value of the job's key-value store carries when shards are gathered
/// (the store takes up to 4 MiB per value).
const GATHER_CHUNK_BYTES: usize = 3 << 20;

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
    /// True for training state rather than weights: optimizer state (see
    /// [`OPTIMIZER_STATE_SUFFIXES`]) and the graph's step counters (`rng.step.*`).
    pub optimizer_state: bool,
    /// Its initial value (what a rank holds before a step has run).
    pub init: Init,
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

    /// This rank's shard of the initial value, `None` when `rank` is not in the placement.
    pub fn initial_shard(&self, rank: usize) -> Result<Option<HostTensor>> {
        if self.layout.placement.coordinates(rank).is_none() {
            return Ok(None);
        }
        Ok(Some(init_shard(&self.init, &self.meta, &self.layout, rank)?))
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
    /// value, [`VariableSpec::initial_shard`]).
    pub fn shard(&self, spec: &VariableSpec) -> Result<Option<HostTensor>> {
        self.worker.variable(&spec.name)
    }

    /// This rank's current shard of `spec`: what it holds, else its initial value; `None` when
    /// the rank is not in the variable's placement.
    pub fn current(&self, spec: &VariableSpec) -> Result<Option<HostTensor>> {
        match self.shard(spec)? {
            Some(shard) => Ok(Some(shard)),
            None => spec.initial_shard(self.rank()),
        }
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
            let Source::Parameter { init } = &info.source else { continue };
            let name =
                info.name.clone().unwrap_or_else(|| program.graph.label(Value(index as u32)));
            let optimizer_state = name.starts_with(STEP_COUNTER)
                || name
                    .rsplit_once('.')
                    .is_some_and(|(_, suffix)| OPTIMIZER_STATE_SUFFIXES.contains(&suffix));
            specs.push(VariableSpec {
                name,
                meta: info.meta.clone(),
                layout: program.slot(program.produced[index]).layout.clone(),
                optimizer_state,
                init: init.clone(),
            });
        }
        specs
    }

    /// Number of devices of this session (ranks `0..world_size`), in every process.
    pub fn world_size(&self) -> usize {
        self.devices.world()
    }

    /// The ranks whose devices live in this process (all of them unless the session is one
    /// process of a job), in the order [`Session::on_each_rank`] answers.
    pub fn local_ranks(&self) -> &[usize] {
        self.devices.ranks()
    }

    /// The job this session is one process of ([`super::SessionConfig::job`]), if any.
    pub fn job(&self) -> Option<&Arc<Job>> {
        self.devices.joined()
    }

    /// The logical value of every variable (parameters, optimizer state), by name, in every
    /// process: in one process as [`Session::variables`]; in a job, every process publishes the
    /// regions its ranks write (one copy of each, see [`VariableSpec::is_writer`]) through the
    /// job's key-value store, in chunks of at most 3 MiB, and assembles them. Collective: every
    /// process of the job must call it, in the same order. Everything crosses rank 0's
    /// rendezvous server, so this suits models of up to some hundred MB; larger ones are
    /// better saved as a checkpoint ([`crate::checkpoint::save`]) and read with
    /// [`crate::checkpoint::load_logical`] or a single-device session.
    pub fn gather_variables(&self) -> Result<Vec<(String, HostTensor)>> {
        let Some(job) = self.job() else {
            return self.variables();
        };
        static GATHERS: AtomicU64 = AtomicU64::new(0);
        let key = format!("meshflow.gather.{}", GATHERS.fetch_add(1, Ordering::Relaxed));
        let specs = Arc::new(self.variable_specs());
        let held = Arc::clone(&specs);
        let local = self.on_each_rank(move |shards| -> Result<(usize, Vec<u8>)> {
            let mut named = Named::default();
            for spec in held.iter().filter(|s| s.is_writer(shards.rank())) {
                if let Some(shard) = shards.current(spec)? {
                    named.tensors.insert(spec.name.clone(), shard);
                }
            }
            Ok((shards.rank(), io::serialize(&named, "gathered shards")?))
        })?;
        for answer in local {
            let (rank, bytes) = answer?;
            publish(job, &format!("{key}.{rank}"), &bytes)?;
        }
        let mut per_rank: Vec<BTreeMap<String, HostTensor>> = Vec::new();
        for rank in 0..self.world_size() {
            let bytes = fetch(job, &format!("{key}.{rank}"))?;
            per_rank.push(io::deserialize(&bytes, &format!("shards of rank {rank}"))?.tensors);
        }
        specs
            .iter()
            .map(|spec| {
                let shards: Vec<Option<HostTensor>> =
                    per_rank.iter_mut().map(|held| held.remove(&spec.name)).collect();
                Ok((spec.name.clone(), assemble(&spec.meta, &spec.layout, &shards)?))
            })
            .collect()
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

/// Stores `bytes` under `key` in the job's key-value store, in chunks (`key.count`, `key.<k>`).
fn publish(job: &Job, key: &str, bytes: &[u8]) -> Result<()> {
    let chunks: Vec<&[u8]> = bytes.chunks(GATHER_CHUNK_BYTES).collect();
    for (k, chunk) in chunks.iter().enumerate() {
        job.set(&format!("{key}.{k}"), chunk).map_err(|e| Error::Runtime(e.to_string()))?;
    }
    let count = chunks.len().to_string();
    job.set(&format!("{key}.count"), count.as_bytes()).map_err(|e| Error::Runtime(e.to_string()))
}

/// The bytes [`publish`] stored under `key`, waiting for them.
fn fetch(job: &Job, key: &str) -> Result<Vec<u8>> {
    let get = |k: &str| job.get(k).map_err(|e| Error::Runtime(format!("{k}: {e}")));
    let count = get(&format!("{key}.count"))?;
    let count: usize = std::str::from_utf8(&count)
        .ok()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::Runtime(format!("{key}.count: not a number")))?;
    let mut bytes = Vec::new();
    for k in 0..count {
        bytes.extend(get(&format!("{key}.{k}"))?);
    }
    Ok(bytes)
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
