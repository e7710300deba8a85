//! The devices a session runs on: one thread per device, each owning a [`Worker`]. Either every
//! rank lives in this process ([`Devices::cpu`], collectives on shared buffers), or this process
//! is one rank of a job started by `meshflow launch` ([`Devices::job`], collectives over the
//! job's health-watched QUIC data plane).

use std::collections::HashSet;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam::channel::{bounded, unbounded, Sender};
use meshflow_comm::{Communicator, Rank, SharedGroup};
use meshflow_ops::{Context, Tensor};

use super::worker::{RunRequest, Worker};
use crate::compile::{Program, Step};
use crate::dist::Job;
use crate::exec::boxing::Comms;
use crate::{Error, Result};

type Call = Box<dyn FnOnce(&mut Worker) + Send>;

/// The devices of this process: ranks `ranks` of a world of `world` ranks.
pub struct Devices {
    senders: Vec<Sender<Call>>,
    threads: Vec<JoinHandle<()>>,
    groups: HashSet<Vec<usize>>,
    timeout: Duration,
    ranks: Vec<usize>,
    world: usize,
    job: Option<Arc<Job>>,
}

impl Devices {
    /// Starts `n` device threads, each with a kernel budget of `threads_per_device` threads;
    /// collectives give up after `timeout`.
    pub fn cpu(n: usize, threads_per_device: usize, timeout: Duration) -> Result<Self> {
        if n == 0 {
            return Err(Error::Runtime("a session needs at least one device".into()));
        }
        let world = SharedGroup::members((0..n).map(Rank).collect(), timeout);
        let mut devices = Devices {
            senders: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
            groups: HashSet::new(),
            timeout,
            ranks: Vec::with_capacity(n),
            world: n,
            job: None,
        };
        for (rank, world) in world.into_iter().enumerate() {
            devices.start(rank, threads_per_device, Box::new(world))?;
        }
        Ok(devices)
    }

    /// This process's one device as rank `job.world().rank` of the job's world (one device
    /// per process). Collective: every rank of the job must create its session.
    pub fn job(job: Arc<Job>, threads_per_device: usize, timeout: Duration) -> Result<Self> {
        let (rank, size) = (job.world().rank, job.world().world_size);
        let all: Vec<usize> = (0..size).collect();
        let world = job.communicator(&all).map_err(|e| Error::Runtime(e.to_string()))?;
        let mut devices = Devices {
            senders: Vec::new(),
            threads: Vec::new(),
            groups: HashSet::new(),
            timeout,
            ranks: Vec::new(),
            world: size,
            job: Some(job),
        };
        devices.start(rank, threads_per_device, world)?;
        Ok(devices)
    }

    fn start(
        &mut self,
        rank: usize,
        threads_per_device: usize,
        world: Box<dyn Communicator>,
    ) -> Result<()> {
        let (sender, receiver) = unbounded::<Call>();
        let comms = Comms { rank, groups: Default::default(), world };
        let thread = std::thread::Builder::new()
            .name(format!("meshflow-device-{rank}"))
            .spawn(move || {
                let mut worker =
                    Worker::new(rank, Context::with_threads(threads_per_device), comms);
                while let Ok(call) = receiver.recv() {
                    call(&mut worker);
                }
            })
            .map_err(|e| Error::Runtime(format!("cannot start device thread {rank}: {e}")))?;
        self.senders.push(sender);
        self.threads.push(thread);
        self.ranks.push(rank);
        Ok(())
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
        self.senders.len()
    }

    /// True when there are no devices (never: [`Devices::cpu`] refuses 0).
    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// Runs `f` on every device's worker of this process and returns the answers in the order
    /// of [`Devices::ranks`].
    pub fn each<R: Send + 'static>(
        &self,
        f: impl Fn(&mut Worker) -> R + Send + Sync + 'static,
    ) -> Result<Vec<R>> {
        let f = Arc::new(f);
        let receivers = self
            .senders
            .iter()
            .enumerate()
            .map(|(index, sender)| {
                let rank = self.ranks[index];
                let (reply, receiver) = bounded(1);
                let f = Arc::clone(&f);
                sender
                    .send(Box::new(move |w: &mut Worker| {
                        let _ = reply.send(f(w));
                    }))
                    .map_err(|_| Error::Runtime(format!("device {rank} has stopped")))?;
                Ok(receiver)
            })
            .collect::<Result<Vec<_>>>()?;
        receivers
            .into_iter()
            .zip(&self.ranks)
            .map(|(r, rank)| r.recv().map_err(|_| Error::Runtime(format!("device {rank} died"))))
            .collect()
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
            if let Some(job) = &self.job {
                self.join_group(job.clone(), group)?;
                continue;
            }
            let members =
                SharedGroup::members(group.iter().copied().map(Rank).collect(), self.timeout);
            for (member, &rank) in members.into_iter().zip(&group) {
                self.install(rank, group.clone(), Box::new(member))?;
            }
        }
        Ok(())
    }

    /// Gives this process's member of `group` (if it has one) its communicator from the job.
    fn join_group(&mut self, job: Arc<Job>, group: Vec<usize>) -> Result<()> {
        for rank in self.ranks.clone() {
            if group.contains(&rank) {
                let member = job.communicator(&group).map_err(|e| Error::Runtime(e.to_string()))?;
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
        let (reply, receiver) = bounded(1);
        self.senders[index]
            .send(Box::new(move |w: &mut Worker| {
                w.add_group(key, member);
                let _ = reply.send(());
            }))
            .map_err(|_| Error::Runtime(format!("device {rank} has stopped")))?;
        receiver.recv().map_err(|_| Error::Runtime(format!("device {rank} died")))
    }

    /// Runs a program on every device; per rank of the world, its shards of the fetched slots
    /// (`None` for ranks of other processes). When ranks fail, the first error that is not a
    /// timeout (usually the consequence of another) is returned.
    pub fn run(&mut self, request: RunRequest) -> Result<Vec<Vec<Option<Tensor>>>> {
        self.prepare(&request.program)?;
        let request = Arc::new(request);
        let fetched = request.fetch.len();
        let results = self.each(move |w| w.run(&request))?;
        let mut errors = Vec::new();
        let mut outputs = vec![vec![None; fetched]; self.world];
        for (&rank, result) in self.ranks.iter().zip(results) {
            match result {
                Ok(shards) => outputs[rank] = shards,
                Err(e) => errors.push((rank, e)),
            }
        }
        if errors.is_empty() {
            return Ok(outputs);
        }
        let first = errors.iter().position(|(_, e)| !e.is_timeout()).unwrap_or(0);
        let (rank, error) = errors.swap_remove(first);
        Err(Error::Runtime(format!("rank {rank}: {error}")))
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        self.senders.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
