//! CPU devices of one process: one thread per device, each owning a [`Worker`].

use std::collections::HashSet;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam::channel::{bounded, unbounded, Sender};
use meshflow_comm::{Communicator, Rank, SharedGroup};
use meshflow_ops::{Context, Tensor};

use super::worker::{RunRequest, Worker};
use crate::compile::{Program, Step};
use crate::exec::boxing::Comms;
use crate::{Error, Result};

type Call = Box<dyn FnOnce(&mut Worker) + Send>;

/// `n` CPU devices in this process, ranks `0..n`.
pub struct Devices {
    senders: Vec<Sender<Call>>,
    threads: Vec<JoinHandle<()>>,
    groups: HashSet<Vec<usize>>,
    timeout: Duration,
}

impl Devices {
    /// Starts `n` device threads, each with a kernel budget of `threads_per_device` threads;
    /// collectives give up after `timeout`.
    pub fn cpu(n: usize, threads_per_device: usize, timeout: Duration) -> Result<Self> {
        if n == 0 {
            return Err(Error::Runtime("a session needs at least one device".into()));
        }
        let world = SharedGroup::members((0..n).map(Rank).collect(), timeout);
        let mut senders = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for (rank, world) in world.into_iter().enumerate() {
            let (sender, receiver) = unbounded::<Call>();
            let comms = Comms { rank, groups: Default::default(), world: Box::new(world) };
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
            senders.push(sender);
            threads.push(thread);
        }
        Ok(Devices { senders, threads, groups: HashSet::new(), timeout })
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.senders.len()
    }

    /// True when there are no devices (never: [`Devices::cpu`] refuses 0).
    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// Runs `f` on every device's worker and returns the answers in rank order.
    pub fn each<R: Send + 'static>(
        &self,
        f: impl Fn(&mut Worker) -> R + Send + Sync + 'static,
    ) -> Result<Vec<R>> {
        let f = Arc::new(f);
        let receivers = self
            .senders
            .iter()
            .enumerate()
            .map(|(rank, sender)| {
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
            .enumerate()
            .map(|(rank, r)| r.recv().map_err(|_| Error::Runtime(format!("device {rank} died"))))
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
            if group.iter().any(|&r| r >= self.len()) {
                return Err(Error::Runtime(format!(
                    "group {group:?} names a rank beyond the {} devices of this session",
                    self.len()
                )));
            }
            if !self.groups.insert(group.clone()) {
                continue;
            }
            let members =
                SharedGroup::members(group.iter().copied().map(Rank).collect(), self.timeout);
            for (member, &rank) in members.into_iter().zip(&group) {
                let key = group.clone();
                let (reply, receiver) = bounded(1);
                let member: Box<dyn Communicator> = Box::new(member);
                self.senders[rank]
                    .send(Box::new(move |w: &mut Worker| {
                        w.add_group(key, member);
                        let _ = reply.send(());
                    }))
                    .map_err(|_| Error::Runtime(format!("device {rank} has stopped")))?;
                receiver.recv().map_err(|_| Error::Runtime(format!("device {rank} died")))?;
            }
        }
        Ok(())
    }

    /// Runs a program on every device; per rank, its shards of the fetched slots. When ranks
    /// fail, the first error that is not a timeout (usually the consequence of another) is
    /// returned.
    pub fn run(&mut self, request: RunRequest) -> Result<Vec<Vec<Option<Tensor>>>> {
        self.prepare(&request.program)?;
        let request = Arc::new(request);
        let results = self.each(move |w| w.run(&request))?;
        let mut errors = Vec::new();
        let mut outputs = Vec::with_capacity(results.len());
        for (rank, result) in results.into_iter().enumerate() {
            match result {
                Ok(shards) => outputs.push(shards),
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
