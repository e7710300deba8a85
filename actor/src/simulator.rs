//! The deterministic simulator: one thread, a virtual clock, the same [`Actor`] state machines.
//!
//! Acts last what a [`CostModel`] says, messages take the latency it gives between two actors,
//! and events due at the same instant are taken in an order shuffled by a seed. A run reports when
//! each sink finished each piece, or, when nothing can progress while work is left, a
//! [`DeadlockReport`]. It also keeps a ledger of every register between a readable and its free,
//! and counts any register written while a consumer still held it.
//!
//! For a planner that wants the time a physical plan takes on a cluster:
//!
//! 1. Implement [`CostModel`] from the plan's own tables (an act's flops over its device's speed,
//!    a message's latency by the pair of devices; a transfer of many bytes is best an act of a
//!    send or receive actor on a device stream of its own, so that it takes its time there).
//! 2. [`Simulator::new`] checks the plan; [`Simulator::one_act_per_device`] makes each
//!    [`DeviceId`] one stream that runs one act at a time, as the threaded driver and a GPU stream
//!    do (by default every actor is its own resource and only registers hold acts back);
//!    [`Simulator::enable_trace`] records every act.
//! 3. [`Simulator::run_step`] as many times as there are steps; each [`StepReport`] gives the
//!    step's finishing time and when each sink finished each piece. A plan that cannot finish is
//!    [`Error::Deadlock`] naming the blocked actors, never a hang.
//! 4. Then [`Simulator::device_busy`] (busy time per device, for utilisation and the bottleneck),
//!    [`Simulator::register_usage`] (registers held at most, per actor: the memory bound) and
//!    [`Simulator::trace`] ([`Trace::chrome_json`] opens in Perfetto).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::executor::run_act;
use crate::{
    Action, Actor, ActorId, ActorKind, Command, DeadlockReport, DeviceId, Envelope, Error,
    Executor, Message, Plan, RegisterUsage, Topology, Trace, TraceEvent,
};

/// How long acts and messages take in virtual time (nanoseconds by convention).
pub trait CostModel {
    /// The duration of act `sequence` of `actor`.
    fn act_duration(&self, actor: ActorId, sequence: u64) -> u64;
    /// The latency of a message from `from` to `to`.
    fn latency(&self, from: ActorId, to: ActorId) -> u64;
}

/// Every act takes `act`, every message `latency`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UniformCost {
    /// The duration of every act.
    pub act: u64,
    /// The latency of every message.
    pub latency: u64,
}

impl CostModel for UniformCost {
    fn act_duration(&self, _actor: ActorId, _sequence: u64) -> u64 {
        self.act
    }

    fn latency(&self, _from: ActorId, _to: ActorId) -> u64 {
        self.latency
    }
}

/// When a sink finished a piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PieceDone {
    /// The sink.
    pub actor: ActorId,
    /// The piece (the sink's act sequence number).
    pub piece: u64,
    /// The virtual time its act ended.
    pub time: u64,
}

/// What one simulated step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepReport {
    /// The virtual time at which the last act of the step ended.
    pub finished_at: u64,
    /// Every piece every sink finished, in time order.
    pub pieces: Vec<PieceDone>,
    /// Acts run in the step.
    pub acts: u64,
}

enum Event {
    Deliver(Envelope),
    Complete(ActorId),
}

struct Scheduled {
    time: u64,
    tiebreak: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.time, self.tiebreak) == (other.time, other.tiebreak)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.time, self.tiebreak).cmp(&(other.time, other.tiebreak))
    }
}

/// A plan running on a virtual clock.
pub struct Simulator<'p, P, C> {
    plan: &'p Plan<P>,
    topology: Topology,
    cost: C,
    actors: Vec<Actor>,
    queue: BinaryHeap<Reverse<Scheduled>>,
    rng: StdRng,
    now: u64,
    step: u64,
    trace: Option<Trace>,
    act_started: Vec<u64>,
    ledger: Vec<bool>,
    ledger_offset: Vec<usize>,
    violations: u64,
    /// Whether each device runs one act at a time.
    one_act_per_device: bool,
    /// Per device, when the acts it was given end (with `one_act_per_device`).
    device_free_at: BTreeMap<DeviceId, u64>,
    /// Per device, the virtual time its acts took.
    device_busy: BTreeMap<DeviceId, u64>,
}

impl<'p, P, C: CostModel> Simulator<'p, P, C> {
    /// Checks `plan` and starts every actor; `seed` shuffles simultaneous events.
    pub fn new(plan: &'p Plan<P>, cost: C, seed: u64) -> Result<Self, Error> {
        let topology = plan.check()?;
        let mut actors: Vec<Actor> = (0..plan.actors.len())
            .map(|index| Actor::new(ActorId(index as u32), plan, &topology))
            .collect();
        for actor in &mut actors {
            actor.handle_message(Message::Command(Command::Start))?;
        }
        let mut ledger_offset = Vec::with_capacity(plan.edges.len());
        let mut total = 0;
        for edge in &plan.edges {
            ledger_offset.push(total);
            total += edge.registers as usize * edge.consumers.len();
        }
        Ok(Self {
            plan,
            topology,
            cost,
            act_started: vec![0; actors.len()],
            actors,
            queue: BinaryHeap::new(),
            rng: StdRng::seed_from_u64(seed),
            now: 0,
            step: 0,
            trace: None,
            ledger: vec![false; total],
            ledger_offset,
            violations: 0,
            one_act_per_device: false,
            device_free_at: BTreeMap::new(),
            device_busy: plan.actors.iter().map(|spec| (spec.device, 0)).collect(),
        })
    }

    /// Records every act from now on.
    pub fn enable_trace(&mut self) {
        self.trace.get_or_insert_with(Trace::default);
    }

    /// The acts recorded since [`Simulator::enable_trace`].
    pub fn trace(&self) -> Option<&Trace> {
        self.trace.as_ref()
    }

    /// From now on each device runs one act at a time, in the order its actors became ready (a
    /// device stream: a thread of the threaded driver, a GPU stream); an act that becomes ready
    /// while its device is busy starts when the device's earlier acts end. Without it every actor
    /// is its own resource.
    pub fn one_act_per_device(&mut self) {
        self.one_act_per_device = true;
    }

    /// Per device of the plan, in device order, the virtual time its acts took since the start:
    /// busy time over [`Simulator::now`] is its utilisation.
    pub fn device_busy(&self) -> Vec<(DeviceId, u64)> {
        self.device_busy.iter().map(|(&device, &busy)| (device, busy)).collect()
    }

    /// The current virtual time.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The checked topology of the plan.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Per actor, the most registers it held and its budget.
    pub fn register_usage(&self) -> Vec<RegisterUsage> {
        self.actors.iter().map(Actor::usage).collect()
    }

    /// How many times a register was made readable to a consumer that still held it (0 unless
    /// the state machine is broken).
    pub fn ledger_violations(&self) -> u64 {
        self.violations
    }

    /// Runs one step of `pieces` pieces to its end, calling `executor` for every act.
    pub fn run_step<E: Executor<P>>(
        &mut self,
        pieces: u64,
        executor: &mut E,
    ) -> Result<StepReport, Error> {
        let acts = self.plan.acts_per_step(&self.topology, pieces)?;
        self.step += 1;
        for (index, &count) in acts.iter().enumerate() {
            let actor = ActorId(index as u32);
            let message = Message::Command(Command::RunStep { step: self.step, acts: count });
            self.schedule(0, Event::Deliver(Envelope { from: actor, to: actor, message }));
        }
        let mut report = StepReport { finished_at: self.now, pieces: Vec::new(), acts: 0 };
        let mut done = 0;
        while let Some(Reverse(scheduled)) = self.queue.pop() {
            self.now = scheduled.time;
            let actor = match scheduled.event {
                Event::Deliver(envelope) => {
                    self.actors[envelope.to.index()].handle_message(envelope.message)?;
                    envelope.to
                }
                Event::Complete(actor) => {
                    self.complete(actor, &mut report)?;
                    actor
                }
            };
            done += self.drive(actor, executor, &mut report)?;
        }
        if done < self.actors.len() {
            return Err(Error::Deadlock(self.deadlock_report()));
        }
        Ok(report)
    }

    /// Stops every actor and runs until the end-of-stream messages are delivered; returns whether
    /// every actor stopped.
    pub fn stop(&mut self) -> Result<bool, Error> {
        for index in 0..self.actors.len() {
            let actor = ActorId(index as u32);
            let message = Message::Command(Command::Stop);
            self.schedule(0, Event::Deliver(Envelope { from: actor, to: actor, message }));
        }
        while let Some(Reverse(scheduled)) = self.queue.pop() {
            self.now = scheduled.time;
            if let Event::Deliver(envelope) = scheduled.event {
                self.actors[envelope.to.index()].handle_message(envelope.message)?;
                self.drive_stopped(envelope.to)?;
            }
        }
        Ok(self.actors.iter().all(Actor::is_stopped))
    }

    fn drive_stopped(&mut self, actor: ActorId) -> Result<(), Error> {
        while let Some(action) = self.actors[actor.index()].poll_action() {
            if let Action::Send(envelope) = action {
                self.send(envelope);
            } else {
                let reason = format!("{action:?} after stop");
                return Err(Error::Protocol { actor, reason });
            }
        }
        Ok(())
    }

    fn schedule(&mut self, delay: u64, event: Event) {
        let tiebreak = self.rng.random();
        self.queue.push(Reverse(Scheduled { time: self.now + delay, tiebreak, event }));
    }

    /// Runs every action the actor has; returns how many steps it finished.
    fn drive<E: Executor<P>>(
        &mut self,
        actor: ActorId,
        executor: &mut E,
        report: &mut StepReport,
    ) -> Result<usize, Error> {
        let mut finished = 0;
        while let Some(action) = self.actors[actor.index()].poll_action() {
            match action {
                Action::Send(envelope) => self.send(envelope),
                Action::StepDone { .. } => finished += 1,
                Action::Act(start) => {
                    run_act(executor, self.plan, &self.actors[actor.index()], start)?;
                    report.acts += 1;
                    let duration = self.cost.act_duration(actor, start.sequence);
                    let begin = self.act_begin(self.plan.actors[actor.index()].device, duration);
                    self.act_started[actor.index()] = begin;
                    self.schedule(begin - self.now + duration, Event::Complete(actor));
                }
            }
        }
        Ok(finished)
    }

    /// When an act of `duration` that is ready now starts on `device`; books the device.
    fn act_begin(&mut self, device: DeviceId, duration: u64) -> u64 {
        *self.device_busy.entry(device).or_default() += duration;
        if !self.one_act_per_device {
            return self.now;
        }
        let free_at = self.device_free_at.entry(device).or_default();
        let begin = (*free_at).max(self.now);
        *free_at = begin + duration;
        begin
    }

    fn complete(&mut self, actor: ActorId, report: &mut StepReport) -> Result<(), Error> {
        self.actors[actor.index()].handle_completion()?;
        let spec = &self.plan.actors[actor.index()];
        let sequence_done = self.sequence_of(actor);
        if spec.kind == ActorKind::Sink {
            report.pieces.push(PieceDone { actor, piece: sequence_done, time: self.now });
        }
        report.finished_at = self.now;
        if let Some(trace) = &mut self.trace {
            let start = self.act_started[actor.index()];
            let device = spec.device;
            trace.events.push(TraceEvent {
                actor,
                device,
                sequence: sequence_done,
                start,
                end: self.now,
            });
        }
        Ok(())
    }

    fn sequence_of(&self, actor: ActorId) -> u64 {
        self.actors[actor.index()].completed() - 1
    }

    fn send(&mut self, envelope: Envelope) {
        self.check_ledger(envelope);
        let latency = self.cost.latency(envelope.from, envelope.to);
        self.schedule(latency, Event::Deliver(envelope));
    }

    fn check_ledger(&mut self, envelope: Envelope) {
        let (edge, register, consumer, readable) = match envelope.message {
            Message::Readable { edge, register, .. } => {
                let consumers = &self.plan.edges[edge.index()].consumers;
                let consumer =
                    consumers.iter().position(|&actor| actor == envelope.to).unwrap_or(0);
                (edge, register, consumer, true)
            }
            Message::Free { edge, register, consumer } => {
                (edge, register, consumer as usize, false)
            }
            _ => return,
        };
        let slot = (register.0 - self.topology.registers(edge).start) as usize;
        let consumers = self.plan.edges[edge.index()].consumers.len();
        let entry =
            &mut self.ledger[self.ledger_offset[edge.index()] + slot * consumers + consumer];
        if *entry == readable {
            self.violations += 1;
        }
        *entry = readable;
    }

    fn deadlock_report(&self) -> DeadlockReport {
        let blocked = self.actors.iter().filter_map(|actor| actor.blocked(self.plan)).collect();
        DeadlockReport { time: self.now, blocked }
    }
}
