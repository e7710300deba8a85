//! The devices a session runs on: one thread per device, each owning a [`Worker`]. Either every
//! rank lives in this process ([`Devices::cpu`], collectives on shared buffers), or this process
//! is one rank of a job started by `meshflow launch` ([`Devices::job`], collectives over the
//! job's health-watched QUIC data plane). [`Devices::place`] puts the ranks on GPUs
//! ([`DeviceKind`]); groups whose members are all GPUs of this process also get NCCL
//! communicators, one per member's device thread.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshflow_actor::{DeviceId, Driver, DriverConfig, Envelope, RunReport, Transport};
use meshflow_comm::cluster::{Health, PeerFailure, WatchedCommunicator};
use meshflow_comm::nccl::{nccl_available, NcclId};
use meshflow_comm::{Communicator, InProcessTransport, Rank, SharedGroup, TransportCommunicator};
use meshflow_ops::cuda::pool::PoolStats;
use meshflow_ops::{Context, Device, Tensor};

use super::executor::{lock, Compiled, Current, RankExecutor};
use super::gpu::{Backend, DeviceKind};
use super::gpu_events::EventWatcher;
use super::transport::DeviceTransport;
use super::worker::{RunRequest, Worker};
use super::SessionConfig;
use crate::compile::actors::ActorWork;
use crate::compile::{Program, Step};
use crate::dist::Job;
use crate::exec::boxing::Comms;
use crate::{Error, Result};

/// The devices of this process: ranks `ranks` of a world of `world` ranks, and the actor
/// driver that runs a compiled program on them (one thread per device).
pub struct Devices {
    workers: Vec<Arc<Mutex<Worker>>>,
    /// Per worker, the device it runs on.
    kinds: Vec<Device>,
    groups: HashSet<Vec<usize>>,
    timeout: Duration,
    ranks: Vec<usize>,
    world: usize,
    job: Option<Arc<Job>>,
    /// Under a job, per device of this process, its transport.
    transports: Vec<Arc<DeviceTransport>>,
    driver: Option<Driver<ActorWork>>,
    compiled: Option<Arc<Compiled>>,
    current: Current,
    /// Failed when a step aborts: every in-process collective and mailbox (and, under a job,
    /// the QUIC data plane) then ends its waits at once, so the peers of a failed device thread
    /// do not sit out their timeout.
    health: Health,
}

impl Devices {
    /// `n` devices, each with a kernel budget of `threads_per_device` threads; collectives give
    /// up after `timeout`.
    pub fn cpu(n: usize, threads_per_device: usize, timeout: Duration) -> Result<Self> {
        if n == 0 {
            return Err(Error::Runtime("a session needs at least one device".into()));
        }
        let health = Health::new();
        let world = SharedGroup::watched((0..n).map(Rank).collect(), timeout, &health);
        let mut devices = Devices::empty(n, timeout, None, health);
        for (rank, world) in world.into_iter().enumerate() {
            devices.add(rank, threads_per_device, Box::new(world));
        }
        Ok(devices)
    }

    /// This process's devices in the job: each process drives the devices it announced when it
    /// joined (`JoinOptions::devices`), device ranks numbered process by process (process 0
    /// has ranks `0..d0`, process 1 the next `d1`, …). Devices of one process exchange through
    /// shared memory, devices of different processes over the job's health-watched QUIC data
    /// plane. Collective: every process of the job must create its session.
    pub fn job(job: Arc<Job>, threads_per_device: usize, timeout: Duration) -> Result<Self> {
        let process_of: Vec<usize> = job
            .members()
            .iter()
            .enumerate()
            .flat_map(|(process, member)| std::iter::repeat_n(process, member.devices as usize))
            .collect();
        let me = job.world().rank;
        let remote = job.connect().map_err(|e| Error::Runtime(e.to_string()))?;
        let world = process_of.len();
        let process_of = Arc::new(process_of);
        let locals = InProcessTransport::world(world, 4, timeout);
        let health = job.health();
        if let Some(local) = locals.first() {
            local.watch(&health);
        }
        let mut devices = Devices::empty(world, timeout, Some(Arc::clone(&job)), health);
        for (rank, local) in locals.into_iter().enumerate() {
            if process_of[rank] != me {
                continue;
            }
            let transport = DeviceTransport {
                rank,
                process_of: Arc::clone(&process_of),
                local,
                remote: remote.clone(),
            };
            let transport = Arc::new(transport);
            let all: Vec<usize> = (0..world).collect();
            let communicator = devices.job_communicator(&transport, &all)?;
            devices.transports.push(transport);
            devices.add(rank, threads_per_device, communicator);
        }
        Ok(devices)
    }

    /// The communicator over the device ranks `group` of the device with `transport`.
    fn job_communicator(
        &self,
        transport: &Arc<DeviceTransport>,
        group: &[usize],
    ) -> Result<Box<dyn Communicator>> {
        let job = self.job.as_ref().ok_or_else(|| Error::Runtime("no job".into()))?;
        let transport: Arc<dyn meshflow_comm::Transport> = transport.clone();
        let members = group.iter().copied().map(Rank).collect();
        let inner = TransportCommunicator::new(transport, members)?;
        Ok(Box::new(WatchedCommunicator::new(Box::new(inner), job.health())))
    }

    fn empty(world: usize, timeout: Duration, job: Option<Arc<Job>>, health: Health) -> Self {
        Devices {
            workers: Vec::new(),
            kinds: Vec::new(),
            groups: HashSet::new(),
            timeout,
            ranks: Vec::new(),
            world,
            job,
            transports: Vec::new(),
            driver: None,
            compiled: None,
            current: Arc::new(Mutex::new(None)),
            health,
        }
    }

    fn add(&mut self, rank: usize, threads_per_device: usize, world: Box<dyn Communicator>) {
        let comms = Comms { rank, groups: Default::default(), world };
        let ctx = Context::with_threads(threads_per_device);
        let worker = Worker::new(rank, ctx, comms, Backend::Cpu);
        self.workers.push(Arc::new(Mutex::new(worker)));
        self.kinds.push(Device::Cpu);
        self.ranks.push(rank);
    }

    /// Puts this process's device ranks on the devices `kind` names (the i-th rank of this
    /// process on `kind.device(i)`). A GPU that cannot be opened (no driver, no such GPU, a
    /// build without the `cuda` feature) is `Error::Ops(meshflow_ops::Error::Device)` naming it.
    /// Call before [`Devices::start`].
    pub fn place(&mut self, kind: &DeviceKind) -> Result<()> {
        for (local, worker) in self.workers.iter().enumerate() {
            let device = kind.device(local)?;
            if device != self.kinds[local] {
                *lock(worker).backend_mut() = Backend::open(device)?;
                self.kinds[local] = device;
            }
        }
        Ok(())
    }

    /// Per rank of this process on a GPU, its rank and the counters of its device's caching
    /// allocator.
    pub fn gpu_pool_stats(&self) -> Result<Vec<(usize, PoolStats)>> {
        let stats = self.each(|w| {
            let rank = w.rank();
            w.backend_mut().gpu().map(|device| (rank, device.pool_stats()))
        })?;
        Ok(stats.into_iter().flatten().collect())
    }

    /// The device of each of this process's ranks, in the order of [`Devices::ranks`].
    pub fn kinds(&self) -> &[Device] {
        &self.kinds
    }

    /// The ranks of this process's devices, in the order [`Devices::each`] answers.
    pub fn ranks(&self) -> &[usize] {
        &self.ranks
    }

    /// Ranks in the whole world (this process and, under a job, the others).
    pub fn world(&self) -> usize {
        self.world
    }

    /// The job this process is one rank of, if any (for collective checkpoints).
    pub fn joined(&self) -> Option<&Arc<Job>> {
        self.job.as_ref()
    }

    /// True when the world spans processes.
    pub fn is_distributed(&self) -> bool {
        self.job.is_some()
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// True when there are no devices (never: [`Devices::cpu`] refuses 0).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Runs `f` on every device's worker of this process, one thread each (`f` may run
    /// collectives), and returns the answers in the order of [`Devices::ranks`].
    pub fn each<R: Send + 'static>(
        &self,
        f: impl Fn(&mut Worker) -> R + Send + Sync + 'static,
    ) -> Result<Vec<R>> {
        let f = &f;
        std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .workers
                .iter()
                .map(|worker| scope.spawn(move || f(&mut lock(worker))))
                .collect();
            handles
                .into_iter()
                .zip(&self.ranks)
                .map(|(handle, rank)| {
                    handle.join().map_err(|_| Error::Runtime(format!("device {rank} panicked")))
                })
                .collect()
        })
    }

    /// Starts the actor driver on `compiled`: one thread per device of this process, each
    /// running its rank's acts (parking when idle: a device thread that spun would take a core
    /// from the kernels of the others). From `config`: `trace` records every act (see
    /// [`Devices::stop`]); `bind_threads`: when the device threads outnumber the cores this
    /// process may use, each is bound to one of them, round-robin by device id
    /// ([`meshflow_actor::affinity`]); `inter_op`: CPU ranks with several threads run their
    /// kernels as a task graph ([`Worker::set_inter_op`]).
    pub fn start(&mut self, compiled: Arc<Compiled>, config: &SessionConfig) -> Result<()> {
        let (trace, bind) = (config.trace, config.bind_threads);
        self.prepare(&compiled.program)?;
        for worker in &self.workers {
            lock(worker).set_inter_op(config.inter_op);
        }
        let allowed = meshflow_actor::affinity::allowed_cores();
        let oversubscribed = self.ranks.len() > allowed.len();
        let cores = if bind && oversubscribed { allowed } else { Vec::new() };
        let config = DriverConfig { spin: Duration::ZERO, trace, cores, ..DriverConfig::default() };
        let workers: HashMap<u32, Arc<Mutex<Worker>>> = self
            .ranks
            .iter()
            .zip(&self.workers)
            .map(|(&rank, worker)| (compiled.lowered.device(rank, 0).0, Arc::clone(worker)))
            .collect();
        let local: Vec<DeviceId> = workers.keys().map(|&device| DeviceId(device)).collect();
        let transport: Option<Arc<dyn Transport>> =
            (local.len() < self.world).then(|| Arc::new(NoActorMessages) as Arc<dyn Transport>);
        let (shared, current) = (Arc::clone(&compiled), Arc::clone(&self.current));
        let on_gpu = self.kinds.iter().any(|kind| *kind != Device::Cpu);
        let events = match on_gpu && compiled.any_crossing() {
            true => Some(Arc::new(EventWatcher::start(Duration::from_micros(20))?)),
            false => None,
        };
        let plan = compiled.lowered.plan.clone();
        let executor = move |device: DeviceId, completion| RankExecutor {
            worker: Arc::clone(&workers[&device.0]),
            compiled: Arc::clone(&shared),
            current: Arc::clone(&current),
            cached: None,
            completion,
            events: events.clone(),
        };
        let mut driver = Driver::start_partial(plan, config, &local, transport, executor)
            .map_err(|e| Error::Runtime(format!("starting the actor driver: {e}")))?;
        driver.on_abort(self.abort_hook(&compiled));
        self.driver = Some(driver);
        self.compiled = Some(compiled);
        Ok(())
    }

    /// What the driver runs when a step aborts: records the failure in the health, naming the
    /// failed device's rank in one process, this process's rank in a job (the job's health
    /// names processes). Its peers' collectives then end at once.
    fn abort_hook(
        &self,
        compiled: &Compiled,
    ) -> impl Fn(Option<DeviceId>, &meshflow_actor::Error) + Send + 'static {
        let rank_of: HashMap<u32, usize> =
            self.ranks.iter().map(|&rank| (compiled.lowered.device(rank, 0).0, rank)).collect();
        let process = self.job.as_ref().map(|job| job.world().rank);
        let health = self.health.clone();
        move |device, error| {
            let device_rank = device.and_then(|device| rank_of.get(&device.0).copied());
            let rank = process.or(device_rank).unwrap_or(0);
            let reason = match device_rank {
                Some(device_rank) => format!("device rank {device_rank}: {error}"),
                None => error.to_string(),
            };
            health.fail(PeerFailure { rank, reason });
        }
    }

    /// Stops the driver; its report holds the acts it ran when started with `trace`.
    pub fn stop(&mut self) -> Result<RunReport> {
        let driver = self.driver.take().ok_or_else(|| Error::Runtime("no driver".into()))?;
        driver.stop().map_err(|e| Error::Runtime(format!("stopping the actor driver: {e}")))
    }

    /// Makes sure every mesh-axis group the program's boxing uses has communicators.
    pub fn prepare(&mut self, program: &Program) -> Result<()> {
        let mut needed: Vec<Vec<usize>> = Vec::new();
        for step in &program.steps {
            if let Step::Boxing { plan, .. } = step {
                for s in &plan.steps {
                    let placement = &s.before.placement;
                    for axis in 0..placement.mesh_axes() {
                        needed.extend(placement.groups(axis));
                    }
                }
            }
        }
        for group in needed {
            if group.iter().any(|&r| r >= self.world) {
                return Err(Error::Runtime(format!(
                    "group {group:?} names a rank beyond the {} devices of this session",
                    self.world
                )));
            }
            if !self.groups.insert(group.clone()) {
                continue;
            }
            if self.job.is_some() {
                self.join_group(group)?;
                continue;
            }
            let members = SharedGroup::watched(
                group.iter().copied().map(Rank).collect(),
                self.timeout,
                &self.health,
            );
            for (member, &rank) in members.into_iter().zip(&group) {
                self.install(rank, group.clone(), Box::new(member))?;
            }
            self.join_nccl(group)?;
        }
        Ok(())
    }

    /// Gives the members of `group` an NCCL communicator when they are all GPUs of this
    /// process, on distinct GPUs, and NCCL loads; otherwise their boxing stays on the host
    /// communicators. The members join at once, each on its own thread (NCCL's init waits for
    /// every member); the unique id goes to them in memory.
    fn join_nccl(&mut self, group: Vec<usize>) -> Result<()> {
        let mut ordinals = Vec::with_capacity(group.len());
        for rank in &group {
            match self.ranks.iter().position(|r| r == rank).map(|i| self.kinds[i]) {
                Some(Device::Cuda(ordinal)) if !ordinals.contains(&ordinal) => {
                    ordinals.push(ordinal)
                }
                _ => return Ok(()),
            }
        }
        if group.len() < 2 || nccl_available().is_err() {
            return Ok(());
        }
        let (id, health) = (NcclId::generate()?, self.health.clone());
        let joined = self.each(move |w| {
            let rank = w.rank();
            w.backend_mut().join_nccl(rank, &group, &id, &health)
        })?;
        joined.into_iter().collect()
    }

    /// Gives this process's members of `group` their communicators over the job's transport.
    fn join_group(&mut self, group: Vec<usize>) -> Result<()> {
        for index in 0..self.ranks.len() {
            let rank = self.ranks[index];
            if group.contains(&rank) {
                let member = self.job_communicator(&self.transports[index], &group)?;
                self.install(rank, group.clone(), member)?;
            }
        }
        Ok(())
    }

    /// Hands `member` (its communicator of group `key`) to the device of `rank`.
    fn install(
        &mut self,
        rank: usize,
        key: Vec<usize>,
        member: Box<dyn Communicator>,
    ) -> Result<()> {
        let index = self.ranks.iter().position(|&r| r == rank);
        let index = index.ok_or_else(|| Error::Runtime(format!("rank {rank} is not here")))?;
        lock(&self.workers[index]).add_group(key, member);
        Ok(())
    }

    /// Runs one step of the started program on every device; per rank of the world, its
    /// shards of the fetched slots (`None` for ranks of other processes).
    pub fn run(&mut self, request: RunRequest) -> Result<Vec<Vec<Option<Tensor>>>> {
        let (Some(driver), Some(compiled)) = (self.driver.as_mut(), self.compiled.clone()) else {
            return Err(Error::Runtime("the devices run no program".into()));
        };
        *lock(&self.current) = Some(Arc::new(request));
        let outcome = driver.run_step(1);
        *lock(&self.current) = None;
        let finished = {
            let compiled = Arc::clone(&compiled);
            self.each(move |worker| worker.finish_step(&compiled))?
        };
        outcome.map_err(|e| Error::Runtime(format!("{e}")))?;
        let mut outputs = vec![vec![None; compiled.fetch.len()]; self.world];
        for (&rank, shards) in self.ranks.iter().zip(finished) {
            outputs[rank] = shards?;
        }
        Ok(outputs)
    }
}

/// The transport of a session's driver across processes: its plan has no edge between ranks,
/// so no actor message ever leaves the process.
struct NoActorMessages;

impl Transport for NoActorMessages {
    fn send(&self, device: DeviceId, _: Vec<Envelope>) -> Result<(), meshflow_actor::Error> {
        Err(meshflow_actor::Error::Stopped {
            reason: format!("an actor message for {device} in another process"),
        })
    }
}
