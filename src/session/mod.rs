//! Sessions: compile a graph once and run it step after step on devices.
//!
//! [`Session::new`] takes the graph, the tensors to fetch and, for training, the loss and an
//! [`Optimizer`]: it appends the backward (autodiff) and one fused update per parameter, compiles
//! everything into one program, lowers it to an actor plan (one actor per step, rank and
//! micro-batch piece; gradients summed over the pieces; each rank's acts chained in a
//! pipeline order, 1F1B by default) and starts the actor driver, one thread per device.
//! [`Session::step`] feeds the inputs, runs one step of the plan (collectives in one order
//! everywhere), writes the updated parameters and optimizer state back into the devices'
//! variables, and returns the fetched tensors as logical host tensors.

mod assemble;
mod devices;
mod executor;
mod flight;
mod gpu;
mod gpu_events;
pub mod shards;
mod training;
mod transport;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use meshflow_ops::ops::adamw::AdamW;
use meshflow_ops::ops::sgd::Sgd;
use meshflow_ops::{OpRef, Tensor as HostTensor, Value};
use meshflow_placement::{Layout, NdSbp, Placement};

use meshflow_actor::RunReport;

use crate::compile::actors::{lower_to_actors, ActorConfig, ActorProgram, PieceOrder};
use crate::compile::{compile, CompileConfig, Program, Request};
use crate::dist::Job;
use crate::exec::layout::take_box;
use crate::graph::{Graph, NodeId, Source, Tensor};
use crate::schedule::Schedule;
use crate::{Error, Result};

pub use assemble::assemble;
pub use devices::Devices;
use executor::Compiled;
pub use gpu::{Backend, DeviceKind, Gpu};
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
    /// Kernel threads per device, at least 1 ([`Session::new`] refuses 0). Default 1.
    pub threads_per_device: usize,
    /// How long a collective waits for its peers. Default 60 s.
    pub timeout: Duration,
    /// Compilation settings.
    pub compile: CompileConfig,
    /// Training: run each step as this many micro-batches (every input split on axis 0), summing
    /// their gradients before one update (gradient accumulation; pipeline micro-batches). Each
    /// piece's loss is scaled by `1 / micro_batches` first, so the update and the fetched loss
    /// are those of one step on the whole batch when the loss is a mean over the batch (as
    /// `cross_entropy`'s, and PyTorch's `loss / accumulation_steps` habit); a loss summed over
    /// the batch gets `1 / micro_batches` of its gradients. Besides the loss, only values that
    /// do not depend on the inputs can be fetched ([`Session::new`] refuses others). At least 1
    /// ([`Session::new`] refuses 0). Default 1.
    pub micro_batches: usize,
    /// Training: shard the optimizer state over this mesh axis (ZeRO), where a parameter is
    /// broadcast on it. Default `None`.
    pub zero_axis: Option<usize>,
    /// Run as one process of a job started by `meshflow launch` (or srun, mpirun): this
    /// process hosts the devices it announced when it joined (`JoinOptions::devices`; device
    /// ranks are numbered process by process, `devices` is then ignored); devices of one process
    /// exchange through shared memory, devices of different processes over the job's QUIC data
    /// plane. Every process builds the same graph and session. Fetched values are replicated
    /// before they are returned, so every process gets them whole (over every rank of the graph
    /// when the value's own placement leaves a process out, as a pipeline's loss on its last
    /// stage). Default `None`: every device in this process.
    pub job: Option<Arc<Job>>,
    /// The order of the micro-batches' forwards and backwards on each rank (pipeline
    /// schedule). Default [`PieceOrder::OneForwardOneBackward`].
    pub piece_order: PieceOrder,
    /// Record every act of the actor driver ([`Session::stop`] returns them). Default off.
    pub trace: bool,
    /// Where this process's device ranks run: CPU threads, or GPUs ([`DeviceKind::Cuda`]: the
    /// i-th rank of this process on GPU i; variables and activations stay in device memory).
    /// Default [`DeviceKind::Cpu`].
    pub device: DeviceKind,
    /// Bind the device threads to this process's cores, round-robin by rank
    /// ([`meshflow_actor::affinity`]), when there are more of them than cores; otherwise, or
    /// when off, the operating system places them. Default on: four device threads on two
    /// cores stepped in 31–40 ms unbound, 31–34 bound (DP2×PP2, docs/plan.md session 11).
    pub bind_threads: bool,
    /// Run the kernels of a CPU device with several kernel threads as a task graph on its
    /// threads, so that kernels that do not depend on each other run at once (the backward's
    /// weight and input gradients, the optimizer's updates); each act then submits its kernel
    /// and a traced act ([`SessionConfig::trace`]) times the submission, not the kernel. Off:
    /// each act runs its kernel to the end, its threads splitting it. Default on.
    pub inter_op: bool,
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
            piece_order: PieceOrder::default(),
            trace: false,
            device: DeviceKind::Cpu,
            bind_threads: true,
            inter_op: true,
        }
    }
}

/// A compiled program on running devices.
pub struct Session {
    graph: Graph,
    program: Arc<Program>,
    compiled: Arc<Compiled>,
    devices: Devices,
    inputs: Vec<(Value, Vec<Value>)>,
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
        if config.threads_per_device == 0 || config.micro_batches == 0 {
            return Err(Error::Runtime(format!(
                "session: threads_per_device {} and micro_batches {}: both must be at least 1",
                config.threads_per_device, config.micro_batches
            )));
        }
        let built = match &training {
            None => training::inference(graph, fetches),
            Some(t) => training::training(graph, fetches, t, &config)?,
        };
        // In a job every process gets a fetched value whole, so it is broadcast to ranks of
        // every process: over its own placement when that holds every rank of the graph, else
        // over all of them (a pipeline's loss lives on the last stage, which may be one process).
        let data = built.graph.data();
        let all_ranks = data.ranks();
        let replicated = |value: Value| -> Result<Layout> {
            let own = &data.value(value).placement;
            let placement = if own.size() == all_ranks.len() {
                own.clone()
            } else {
                Placement::new(own.device(), vec![all_ranks.len()], all_ranks.clone())?
            };
            let sbp = NdSbp::broadcast(placement.mesh_axes());
            Ok(Layout::new(placement, sbp))
        };
        let distributed = config.job.is_some();
        let mut requests: Vec<Request> = built
            .fetches
            .iter()
            .map(|&value| {
                let layout = distributed.then(|| replicated(value)).transpose()?;
                Ok(Request { value, layout })
            })
            .collect::<Result<_>>()?;
        for (_, value, layout) in &built.assigns {
            requests.push(Request { value: *value, layout: Some(layout.clone()) });
        }
        let program = compile(&built.graph.snapshot(), &requests, &config.compile)?;
        let mut devices = match &config.job {
            Some(job) => Devices::job(Arc::clone(job), config.threads_per_device, config.timeout)?,
            None => Devices::cpu(config.devices, config.threads_per_device, config.timeout)?,
        };
        devices.place(&config.device)?;
        if let Some(&rank) = program.ranks.iter().find(|&&r| r >= devices.world()) {
            return Err(Error::Graph(format!(
                "the graph places work on rank {rank} but the session has {} devices",
                devices.world()
            )));
        }
        let pieces = config.micro_batches.max(1) as u32;
        let actor_config = ActorConfig {
            pieces,
            order: config.piece_order,
            forward: built.forward,
            joins: false,
            accumulate: if pieces > 1 { built.accumulate.clone() } else { Vec::new() },
            ..ActorConfig::default()
        };
        let lowered = lower_to_actors(&program, &actor_config)?;
        let assign = built
            .assigns
            .iter()
            .map(|(name, _, _)| name.clone())
            .zip(program.requested[fetches.len()..].iter().copied())
            .collect();
        let fetch = program.requested[..fetches.len()].to_vec();
        let program = Arc::new(program);
        let compiled = Arc::new(Compiled::new(Arc::clone(&program), lowered, fetch, assign));
        if let Some((fetch, _)) =
            fetches.iter().zip(&compiled.fetch).find(|(_, slot)| compiled.per_piece(**slot))
        {
            return Err(Error::Graph(format!(
                "fetch {}: with {pieces} micro-batches only the loss and values that do not \
                 depend on the inputs can be fetched",
                graph.data().label(fetch.value())
            )));
        }
        devices.start(Arc::clone(&compiled), &config)?;
        Ok(Session {
            graph: graph.clone(),
            program,
            compiled,
            devices,
            inputs: built.inputs,
            training: training.map(|t| (t, built.updates)),
            steps_done: 0,
        })
    }

    /// The actor plan the session runs (one actor per step, rank and piece).
    pub fn actors(&self) -> &ActorProgram {
        &self.compiled.lowered
    }

    /// Stops the devices' actor driver and returns its report: every act with its start and end
    /// when [`SessionConfig::trace`] was on. The session runs no step after this.
    pub fn stop(&mut self) -> Result<RunReport> {
        self.devices.stop()
    }

    /// The compiled program (for reports and tests).
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Steps run so far.
    pub fn steps_done(&self) -> u64 {
        self.steps_done
    }

    /// Per GPU rank of this process, its rank and its device allocator's counters (empty on
    /// CPUs): once the first steps have filled the cache, a step allocates nothing.
    pub fn gpu_pool_stats(&self) -> Result<Vec<(usize, meshflow_ops::cuda::pool::PoolStats)>> {
        self.devices.gpu_pool_stats()
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
        let feeds = self.slice_feeds(fed)?;
        let program = &self.program;
        let request = RunRequest { feeds, overrides: self.overrides() };
        let shards = self.devices.run(request)?;
        self.steps_done += 1;
        self.compiled
            .fetch
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
    ///
    /// In a job whose ranks live in several processes this process does not hold every shard:
    /// that is an error naming the missing ranks; [`Session::gather_variables`] (collective)
    /// assembles them across processes.
    pub fn variables(&self) -> Result<Vec<(String, HostTensor)>> {
        let held = self.devices.ranks();
        let missing: Vec<usize> =
            (0..self.devices.world()).filter(|rank| !held.contains(rank)).collect();
        if !missing.is_empty() {
            return Err(Error::Runtime(format!(
                "Session::variables: ranks {missing:?} live in other processes of the job; \
                 call Session::gather_variables on every process"
            )));
        }
        let program = &self.program;
        let mut out = Vec::new();
        for (index, info) in program.graph.values.iter().enumerate() {
            let Source::Parameter { init } = &info.source else { continue };
            let name =
                info.name.clone().unwrap_or_else(|| program.graph.label(Value(index as u32)));
            let layout = program.slot(program.produced[index]).layout.clone();
            let key = name.clone();
            let local = self.devices.each(move |w| w.variable(&key))?;
            let mut shards = vec![None; self.devices.world()];
            for (&rank, shard) in self.devices.ranks().iter().zip(local) {
                shards[rank] = shard?;
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

    /// The feeds of the compiled graph per piece: each user input's value, or its micro-batch
    /// slices on axis 0. Every input must be fed.
    fn slice_feeds(
        &self,
        mut fed: HashMap<Value, HostTensor>,
    ) -> Result<HashMap<(Value, u32), HostTensor>> {
        let pieces = self.compiled.lowered.pieces;
        let mut out = HashMap::new();
        for (input, targets) in &self.inputs {
            let value = fed.remove(input).ok_or_else(|| {
                Error::Graph(format!("input {} was not fed", self.graph.data().label(*input)))
            })?;
            for target in targets {
                if pieces == 1 {
                    out.insert((*target, 0), value.clone());
                    continue;
                }
                let dims = value.dims().to_vec();
                let rows = dims[0] / pieces as usize;
                for piece in 0..pieces {
                    let mut offsets = vec![0; dims.len()];
                    offsets[0] = piece as usize * rows;
                    let mut shape = dims.clone();
                    shape[0] = rows;
                    out.insert((*target, piece), take_box(&value, &offsets, &shape)?);
                }
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
