//! Shared test fixtures: an executor whose results are hashes combined along edges, random plans,
//! and a cost model with per-message jitter.

#![allow(dead_code)]

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use meshflow_actor::{
    Act, ActorId, ActorKind, Completion, CostModel, DeviceId, Executor, Plan, Simulator, Stage,
    UniformCost,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// SplitMix64 of `a` combined with `b`: order-sensitive, deterministic.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.rotate_left(29).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Buffers shared by the executors of every thread: one value per register, one state per
/// variable, and what each sink received, keyed by (sink, piece).
#[derive(Clone, Default)]
pub struct Memory {
    pub registers: Arc<Vec<AtomicU64>>,
    pub variables: Arc<Vec<AtomicU64>>,
    pub results: Arc<Mutex<BTreeMap<(ActorId, u64), u64>>>,
}

impl Memory {
    pub fn new(registers: u32, actors: usize) -> Self {
        Self {
            registers: Arc::new((0..registers).map(|_| AtomicU64::new(0)).collect()),
            variables: Arc::new((0..actors).map(|index| AtomicU64::new(index as u64)).collect()),
            results: Arc::default(),
        }
    }

    pub fn results(&self) -> BTreeMap<(ActorId, u64), u64> {
        self.results.lock().expect("no test thread panicked").clone()
    }

    pub fn variable_states(&self) -> Vec<u64> {
        self.variables.iter().map(|state| state.load(Ordering::Relaxed)).collect()
    }
}

/// Computes a deterministic value for every register from the actor and its inputs.
#[derive(Clone)]
pub struct HashExecutor {
    pub memory: Memory,
}

#[derive(Debug, thiserror::Error)]
#[error("never fails")]
pub struct Never;

impl HashExecutor {
    fn read(&self, act: Act<'_, ()>) -> u64 {
        let seed = mix(u64::from(act.actor.0), 0);
        act.inputs.iter().fold(seed, |hash, register| mix(hash, self.load(register.index())))
    }

    fn load(&self, index: usize) -> u64 {
        self.memory.registers[index].load(Ordering::Relaxed)
    }

    fn write(&self, act: Act<'_, ()>, value: u64) {
        for register in act.outputs {
            self.memory.registers[register.index()].store(value, Ordering::Relaxed);
        }
    }
}

impl Executor<()> for HashExecutor {
    type Error = Never;

    fn act(&mut self, act: &Act<'_, ()>) -> Result<Completion, Never> {
        let act = *act;
        let state = &self.memory.variables[act.actor.index()];
        match (act.kind, act.stage) {
            (ActorKind::Source, _) => self.write(act, mix(u64::from(act.actor.0), act.sequence)),
            (ActorKind::Sink, _) => {
                let value = self.read(act);
                let mut results = self.memory.results.lock().expect("no test thread panicked");
                results.insert((act.actor, act.sequence), value);
            }
            (_, Stage::VariableRead) => self.write(act, state.load(Ordering::Relaxed)),
            (_, Stage::VariableUpdate) => {
                let update = self.load(act.inputs[0].index());
                state.store(mix(state.load(Ordering::Relaxed), update), Ordering::Relaxed);
            }
            (_, Stage::Accumulate { index, .. }) => {
                let input = self.load(act.inputs[0].index());
                let sum = if index == 0 { 0 } else { self.load(act.outputs[0].index()) };
                self.write(act, sum.wrapping_add(input));
            }
            (_, Stage::Repeat { index, .. }) => {
                self.write(act, mix(self.load(act.inputs[0].index()), u64::from(index)))
            }
            (ActorKind::Send | ActorKind::Receive, _) => {
                self.write(act, self.load(act.inputs[0].index()))
            }
            _ => self.write(act, self.read(act)),
        }
        Ok(Completion::Done)
    }
}

/// What [`HashExecutor`] wrote over two steps of `pieces` under the simulator (unit act and link
/// costs, `seed`): the reference a threaded run must equal.
pub fn simulated_two_steps(plan: &Plan<()>, pieces: u64, seed: u64) -> Memory {
    let topology = plan.check().expect("well formed");
    let memory = Memory::new(topology.register_total(), plan.actors.len());
    let mut executor = HashExecutor { memory: memory.clone() };
    let mut simulator =
        Simulator::new(plan, UniformCost { act: 1, latency: 1 }, seed).expect("checks");
    simulator.run_step(pieces, &mut executor).expect("runs");
    simulator.run_step(pieces, &mut executor).expect("runs");
    memory
}

/// A random plan: sources, variables fanned out per piece by repeats and updated from
/// accumulations, computes over random earlier per-piece actors, sinks on every loose end, and
/// send/receive pairs on some cross-device links. Returns the plan and its pieces per step.
pub fn random_plan(seed: u64, computes: usize, devices: u32) -> (Plan<()>, u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let pieces = rng.random_range(1..=3u64);
    let mut builder = Builder { plan: Plan::new(), consumers: Vec::new(), rng, devices };
    let mut per_piece = Vec::new();
    for index in 0..builder.rng.random_range(1..=2) {
        per_piece.push(builder.actor(format!("source{index}"), ActorKind::Source));
    }
    let mut variables = Vec::new();
    for index in 0..builder.rng.random_range(0..=2) {
        let variable = builder.actor(format!("variable{index}"), ActorKind::Variable);
        let repeat =
            builder.actor(format!("repeat{index}"), ActorKind::Repeat { pieces: pieces as u32 });
        builder.link(variable, repeat);
        per_piece.push(repeat);
        variables.push(variable);
    }
    for index in 0..computes {
        let compute = builder.actor(format!("compute{index}"), ActorKind::Compute);
        let inputs = builder.rng.random_range(1..=3usize.min(per_piece.len()));
        let mut candidates = per_piece.clone();
        for _ in 0..inputs {
            let chosen = candidates.swap_remove(builder.rng.random_range(0..candidates.len()));
            builder.link(chosen, compute);
        }
        per_piece.push(compute);
    }
    for (index, &variable) in variables.iter().enumerate() {
        let accumulate = builder
            .actor(format!("accumulate{index}"), ActorKind::Accumulate { pieces: pieces as u32 });
        let from = per_piece[builder.rng.random_range(0..per_piece.len())];
        builder.link(from, accumulate);
        builder.link(accumulate, variable);
    }
    for (index, actor) in per_piece.into_iter().enumerate() {
        if builder.consumers[actor.index()].is_empty() {
            let sink = builder.actor(format!("sink{index}"), ActorKind::Sink);
            builder.link(actor, sink);
        }
    }
    (builder.finish(), pieces)
}

struct Builder {
    plan: Plan<()>,
    consumers: Vec<Vec<ActorId>>,
    rng: StdRng,
    devices: u32,
}

impl Builder {
    fn actor(&mut self, name: String, kind: ActorKind) -> ActorId {
        let device = DeviceId(self.rng.random_range(0..self.devices));
        self.consumers.push(Vec::new());
        self.plan.add_actor(name, kind, device, ())
    }

    fn link(&mut self, from: ActorId, to: ActorId) {
        let (from_device, to_device) =
            (self.plan.actors[from.index()].device, self.plan.actors[to.index()].device);
        if from_device != to_device && self.rng.random_bool(0.5) {
            let name = format!("{}->{}", self.plan.name(from), self.plan.name(to));
            let send = self.actor(format!("send {name}"), ActorKind::Send);
            self.plan.actors[send.index()].device = from_device;
            let receive = self.actor(format!("receive {name}"), ActorKind::Receive);
            self.plan.actors[receive.index()].device = to_device;
            self.consumers[from.index()].push(send);
            self.consumers[send.index()].push(receive);
            self.consumers[receive.index()].push(to);
        } else {
            self.consumers[from.index()].push(to);
        }
    }

    fn finish(mut self) -> Plan<()> {
        for (index, consumers) in self.consumers.iter().enumerate() {
            if !consumers.is_empty() {
                let registers = self.rng.random_range(1..=3);
                self.plan.add_edge(ActorId(index as u32), consumers, registers);
            }
        }
        self.plan
    }
}

/// Random act durations per (actor, piece) and random latencies per message, from a seed.
pub struct JitterCost {
    pub seed: u64,
    pub messages: Cell<u64>,
}

impl JitterCost {
    pub fn new(seed: u64) -> Self {
        Self { seed, messages: Cell::new(0) }
    }
}

impl CostModel for JitterCost {
    fn act_duration(&self, actor: ActorId, sequence: u64) -> u64 {
        1 + mix(self.seed, mix(u64::from(actor.0), sequence)) % 100
    }

    fn latency(&self, from: ActorId, to: ActorId) -> u64 {
        let count = self.messages.get();
        self.messages.set(count + 1);
        mix(self.seed ^ count, mix(u64::from(from.0), u64::from(to.0))) % 50
    }
}
