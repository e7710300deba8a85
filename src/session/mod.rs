//! Sessions: compile a graph once and run it step after step on devices.
//!
//! [`Session::new`] takes the graph, the tensors to fetch and, for training, the loss and an
//! [`Optimizer`]: it appends the backward (autodiff) and one fused update per parameter, compiles
//! everything into one program, and starts one thread per device. [`Session::step`] feeds the
//! inputs, runs the program on every device (collectives in one order everywhere), writes the
//! updated parameters and optimizer state back into the devices' variables, and returns the
//! fetched tensors as logical host tensors.

mod assemble;
mod devices;
pub mod shards;
mod training;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use meshflow_ops::ops::adamw::AdamW;
use meshflow_ops::ops::sgd::Sgd;
use meshflow_ops::{OpRef, Tensor as HostTensor, Value};
use meshflow_placement::{Layout, NdSbp};

use crate::compile::{compile, CompileConfig, Program, Request};
use crate::dist::Job;
use crate::exec::layout::take_box;
use crate::graph::{Graph, NodeId, Source, Tensor};
use crate::schedule::Schedule;
use crate::{Error, Result};

pub use assemble::assemble;
pub use devices::Devices;
pub use worker::{init_shard, shard_of, RunRequest, Worker};

/// The optimizer a training session appends.
#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    /// `torch.optim.AdamW` (its `lr` is the base rate of the schedule; `step` is ignored).
    AdamW(AdamW),
    /// `torch.optim.SGD` with momentum (its `lr` is the base rate; `step` is ignored).
    Sgd(Sgd),
}

/// What a training session optimises.
#[derive(Clone, Debug)]
pub struct Training {
    /// The scalar loss.
    pub loss: Tensor,
    /// The update rule.
    pub optimizer: Optimizer,
    /// The learning-rate schedule over steps.
    pub schedule: Schedule,
    /// Scale the gradients so that their global 2-norm (over every parameter, across shards
    /// and stages) is at most this (`torch.nn.utils.clip_grad_norm_`). `None`: no clipping.
    pub clip_grad_norm: Option<f64>,
}

impl Training {
    /// Minimises `loss` with `optimizer` under `schedule`, without clipping.
    pub fn new(loss: &Tensor, optimizer: Optimizer, schedule: Schedule) -> Self {
        Training { loss: loss.clone(), optimizer, schedule, clip_grad_norm: None }
    }

    /// With gradients clipped to a global 2-norm of `max_norm`.
    pub fn clip_grad_norm(mut self, max_norm: f64) -> Self {
        self.clip_grad_norm = Some(max_norm);
        self
    }
}

/// How a session runs.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// CPU devices in this process (ranks `0..devices`); every placement must fit.
    pub devices: usize,
    /// Kernel threads per device. Default 1.
    pub threads_per_device: usize,
    /// How long a collective waits for its peers. Default 60 s.
    pub timeout: Duration,
    /// Compilation settings.
    pub compile: CompileConfig,
    /// Training: run each step as this many micro-batches (every input split on axis 0), summing
    /// their gradients before one update (gradient accumulation; pipeline micro-batches).
    /// Default 1.
    pub micro_batches: usize,
    /// Training: shard the optimizer state over this mesh axis (ZeRO), where a parameter is
    /// broadcast on it. Default `None`.
    pub zero_axis: Option<usize>,
    /// Run as one rank of a job started by `meshflow launch` (or srun, mpirun): this process
    /// hosts the device of its rank (`devices` is then the job's world size, one device per
    /// process) and collectives cross processes over the job's QUIC data plane. Every process
    /// builds the same graph and session. Fetched values are replicated before they are
    /// returned, so every process gets them whole. Default `None`: every device in this process.
    pub job: Option<Arc<Job>>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            devices: 1,
            threads_per_device: 1,
            timeout: Duration::from_secs(60),
            compile: CompileConfig::default(),
            micro_batches: 1,
            zero_axis: None,
            job: None,
        }
    }
}

/// A compiled program on running devices.
pub struct Session {
    graph: Graph,
    program: Arc<Program>,
    devices: Devices,
    fetches: usize,
    inputs: Vec<(Value, Vec<Value>)>,
    assign: Vec<(String, crate::compile::Slot)>,
    training: Option<(Training, Vec<NodeId>)>,
    steps_done: u64,
}

impl Session {
    /// Compiles `graph` for `fetches` (and, when `training` is given, its backward and update)
    /// and starts the devices.
    pub fn new(
        graph: &Graph,
        fetches: &[&Tensor],
        training: Option<Training>,
        config: SessionConfig,
    ) -> Result<Self> {
        let built = match &training {
            None => training::inference(graph, fetches),
            Some(t) => training::training(graph, fetches, t, &config)?,
        };
        let replicated = |value: Value| {
            let placement = built.graph.data().value(value).placement.clone();
            let sbp = NdSbp::broadcast(placement.mesh_axes());
            Layout::new(placement, sbp)
        };
        let distributed = config.job.is_some();
        let mut requests: Vec<Request> = built
            .fetches
            .iter()
            .map(|&value| Request { value, layout: distributed.then(|| replicated(value)) })
            .collect();
        for (_, value, layout) in &built.assigns {
            requests.push(Request { value: *value, layout: Some(layout.clone()) });
        }
        let program = compile(&built.graph.snapshot(), &requests, &config.compile)?;
        let (threads, timeout) = (config.threads_per_device, config.timeout);
        let devices = match &config.job {
            Some(job) => Devices::job(Arc::clone(job), threads, timeout)?,
            None => Devices::cpu(config.devices, threads, timeout)?,
        };
        if let Some(&rank) = program.ranks.iter().find(|&&r| r >= devices.world()) {
            return Err(Error::Graph(format!(
                "the graph places work on rank {rank} but the session has {} devices",
                devices.world()
            )));
        }
        let assign = built
            .assigns
            .iter()
            .map(|(name, _, _)| name.clone())
            .zip(program.requested[fetches.len()..].iter().copied())
            .collect();
        Ok(Session {
            graph: graph.clone(),
            program: Arc::new(program),
            devices,
            fetches: fetches.len(),
            inputs: built.inputs,
            assign,
            training: training.map(|t| (t, built.updates)),
            steps_done: 0,
        })
    }

    /// The compiled program (for reports and tests).
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Steps run so far.
    pub fn steps_done(&self) -> u64 {
        self.steps_done
    }

    /// Runs one step with the given input values; returns the fetched tensors (logical).
    pub fn step(&mut self, feeds: &[(&Tensor, HostTensor)]) -> Result<Vec<HostTensor>> {
        let mut fed = HashMap::new();
        for (input, value) in feeds {
            let meta = input.meta();
            if value.meta() != &meta {
                return Err(Error::Graph(format!(
                    "feed for {}: expected {} {}, got {} {}",
                    self.graph.data().label(input.value()),
                    meta.shape,
                    meta.dtype,
                    value.shape(),
                    value.dtype()
                )));
            }
            fed.insert(input.value(), value.clone());
        }
        let fed = self.slice_feeds(fed)?;
        let program = &self.program;
        let overrides = self.overrides();
        let fetch: Vec<_> = program.requested[..self.fetches].to_vec();
        let request = RunRequest {
            program: Arc::clone(program),
            feeds: fed,
            overrides,
            fetch: fetch.clone(),
            assign: self.assign.clone(),
        };
        let shards = self.devices.run(request)?;
        self.steps_done += 1;
        fetch
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let info = program.slot(*slot);
                let meta = &program.graph.value(info.value).meta;
                let per_rank: Vec<Option<HostTensor>> =
                    shards.iter().map(|s| s[i].clone()).collect();
                assemble(meta, &info.layout, &per_rank)
            })
            .collect()
    }

    /// The current logical value of every parameter and optimizer state, by name.
    pub fn variables(&self) -> Result<Vec<(String, HostTensor)>> {
        let program = &self.program;
        let mut out = Vec::new();
        for (index, info) in program.graph.values.iter().enumerate() {
            let Source::Parameter { init } = &info.source else { continue };
            let name =
                info.name.clone().unwrap_or_else(|| program.graph.label(Value(index as u32)));
            let layout = program.slot(program.produced[index]).layout.clone();
            let key = name.clone();
            let local = self.devices.each(move |w| w.variable(&key).cloned())?;
            let mut shards = vec![None; self.devices.world()];
            for (&rank, shard) in self.devices.ranks().iter().zip(local) {
                shards[rank] = shard;
            }
            let value = if shards.iter().all(Option::is_none) {
                init.whole(&info.meta)?
            } else {
                assemble(&info.meta, &layout, &shards)?
            };
            out.push((name, value));
        }
        Ok(out)
    }

    /// Sets variables (parameters, optimizer state) from logical values by name; each device
    /// takes its shard. Unknown names are an error naming them.
    pub fn load_variables(&mut self, values: &[(String, HostTensor)]) -> Result<()> {
        let program = &self.program;
        for (name, value) in values {
            let index = program
                .graph
                .values
                .iter()
                .position(|v| {
                    v.name.as_deref() == Some(name.as_str())
                        && matches!(v.source, Source::Parameter { .. })
                })
                .ok_or_else(|| Error::Graph(format!("no variable named {name:?}")))?;
            let meta = &program.graph.values[index].meta;
            if value.meta() != meta {
                return Err(Error::Graph(format!(
                    "variable {name}: expected {} {}, got {} {}",
                    meta.shape,
                    meta.dtype,
                    value.shape(),
                    value.dtype()
                )));
            }
            let layout = program.slot(program.produced[index]).layout.clone();
            let (name, value) = (name.clone(), value.clone());
            let results = self.devices.each(move |w| -> Result<()> {
                if layout.placement.coordinates(w.rank()).is_some() {
                    let shard = shard_of(&value, &layout, w.rank())?;
                    w.set_variable(&name, shard);
                }
                Ok(())
            })?;
            results.into_iter().collect::<Result<Vec<()>>>()?;
        }
        Ok(())
    }

    /// The feeds of the compiled graph: each user input's value, or its micro-batch slices on
    /// axis 0. Every input must be fed.
    fn slice_feeds(
        &self,
        mut fed: HashMap<Value, HostTensor>,
    ) -> Result<HashMap<Value, HostTensor>> {
        let mut out = HashMap::new();
        for (input, targets) in &self.inputs {
            let value = fed.remove(input).ok_or_else(|| {
                Error::Graph(format!("input {} was not fed", self.graph.data().label(*input)))
            })?;
            if let [target] = targets.as_slice() {
                out.insert(*target, value);
                continue;
            }
            let dims = value.dims().to_vec();
            let rows = dims[0] / targets.len();
            for (i, target) in targets.iter().enumerate() {
                let mut offsets = vec![0; dims.len()];
                offsets[0] = i * rows;
                let mut shape = dims.clone();
                shape[0] = rows;
                out.insert(*target, take_box(&value, &offsets, &shape)?);
            }
        }
        if let Some(extra) = fed.keys().next() {
            let label = self.graph.data().label(*extra);
            return Err(Error::Graph(format!("{label} was fed but is not an input of the graph")));
        }
        Ok(out)
    }

    fn overrides(&self) -> HashMap<NodeId, OpRef> {
        let Some((training, updates)) = &self.training else {
            return HashMap::new();
        };
        let step = self.steps_done + 1;
        let (base, op): (f64, Box<dyn Fn(f64) -> OpRef>) = match &training.optimizer {
            Optimizer::AdamW(a) => {
                let a = a.clone();
                (a.lr, Box::new(move |lr| Arc::new(AdamW { lr, step, ..a.clone() }) as OpRef))
            }
            Optimizer::Sgd(s) => {
                let s = s.clone();
                (s.lr, Box::new(move |lr| Arc::new(Sgd { lr, step, ..s.clone() }) as OpRef))
            }
        };
        let lr = training.schedule.rate(base, self.steps_done as usize);
        updates.iter().map(|&node| (node, op(lr))).collect()
    }
}
