//! The plan: which actors exist, what kind each is, where it runs, and the edges (with their
//! register counts) between them. The compiler of the root crate fills it; [`Plan::check`] turns it
//! into a [`Topology`] or an [`Error`] that names the offending actors.

use std::ops::Range;

use crate::{ActorId, DeviceId, EdgeId, Error, RegisterId};

/// What an actor does with its registers; each kind is a small state machine in
/// [`Actor`](crate::Actor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActorKind {
    /// Reads one register of every input, writes one of every output, once per piece.
    Compute,
    /// No inputs; writes one register of every output per piece (the user feeds the data).
    Source,
    /// No outputs; reads one register of every input per piece (hands results back to the user).
    Sink,
    /// Persistent state: once per step it writes its value to every output (phase read), then, if
    /// it has an input, reads one update register (phase update). The next step's read waits for
    /// this step's update.
    Variable,
    /// Reads `pieces` input registers, one per act, into one output register, which becomes
    /// readable after the last of them (gradient accumulation).
    Accumulate {
        /// How many input registers make one output register.
        pieces: u32,
    },
    /// Holds one input register for `pieces` acts, each writing one output register.
    Repeat {
        /// How many output registers one input register becomes.
        pieces: u32,
    },
    /// The local half of an edge that crosses threads or processes: reads its input and moves it
    /// into the registers of its [`ActorKind::Receive`] peer (the one consumer of its one output).
    Send,
    /// The remote half: its input registers are the ones a [`ActorKind::Send`] filled.
    Receive,
}

/// One actor of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct ActorSpec<P> {
    /// A human name, used in errors, deadlock reports and traces.
    pub name: String,
    /// Its state machine.
    pub kind: ActorKind,
    /// The device stream (thread) that owns it.
    pub device: DeviceId,
    /// What its act does, opaque to this crate (a kernel id, an op, a closure index …).
    pub payload: P,
}

/// One edge: a fixed producer, fixed consumers and a fixed number of registers that the producer
/// writes round-robin. A register is free again once every consumer has acknowledged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeSpec {
    /// The actor that writes the registers.
    pub producer: ActorId,
    /// The actors that read every register, in the order their inputs list them.
    pub consumers: Vec<ActorId>,
    /// How many registers the edge has: 1 by default, 2 or more for pipelining.
    pub registers: u32,
}

/// A physical plan: actors and edges. An actor's inputs are the edges that list it as consumer
/// and its outputs those it produces, both in edge order.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan<P = ()> {
    /// The actors; [`ActorId`] indexes this.
    pub actors: Vec<ActorSpec<P>>,
    /// The edges; [`EdgeId`] indexes this.
    pub edges: Vec<EdgeSpec>,
}

impl<P> Default for Plan<P> {
    fn default() -> Self {
        Self { actors: Vec::new(), edges: Vec::new() }
    }
}

impl<P> Plan<P> {
    /// An empty plan.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an actor and returns its id.
    pub fn add_actor(
        &mut self,
        name: impl Into<String>,
        kind: ActorKind,
        device: DeviceId,
        payload: P,
    ) -> ActorId {
        self.actors.push(ActorSpec { name: name.into(), kind, device, payload });
        ActorId(index_u32(self.actors.len() - 1))
    }

    /// Adds an edge and returns its id.
    pub fn add_edge(&mut self, producer: ActorId, consumers: &[ActorId], registers: u32) -> EdgeId {
        self.edges.push(EdgeSpec { producer, consumers: consumers.to_vec(), registers });
        EdgeId(index_u32(self.edges.len() - 1))
    }

    /// The name of an actor, or a placeholder for an id the plan does not have.
    pub fn name(&self, actor: ActorId) -> String {
        self.actors
            .get(actor.index())
            .map_or_else(|| format!("<missing {actor}>"), |spec| spec.name.clone())
    }

    /// Checks the plan and derives each actor's inputs, outputs and registers.
    pub fn check(&self) -> Result<Topology, Error> {
        self.check_edges()?;
        let topology = Topology::build(self);
        self.check_arity(&topology)?;
        let order = topological_order(self, &topology)?;
        Ok(Topology { order, ..topology })
    }

    fn check_edges(&self) -> Result<(), Error> {
        for (index, edge) in self.edges.iter().enumerate() {
            let id = EdgeId(index_u32(index));
            let missing = std::iter::once(edge.producer)
                .chain(edge.consumers.iter().copied())
                .find(|actor| actor.index() >= self.actors.len());
            if let Some(actor) = missing {
                return Err(Error::MissingActor {
                    edge: id,
                    actor,
                    producer: self.name(edge.producer),
                });
            }
            if edge.registers == 0 {
                return Err(Error::ZeroRegisters { edge: id, producer: self.name(edge.producer) });
            }
            let mut consumers = edge.consumers.clone();
            consumers.sort();
            consumers.dedup();
            if consumers.is_empty() || consumers.len() != edge.consumers.len() {
                return Err(Error::Consumers { edge: id, producer: self.name(edge.producer) });
            }
        }
        Ok(())
    }

    fn check_arity(&self, topology: &Topology) -> Result<(), Error> {
        for (index, spec) in self.actors.iter().enumerate() {
            let (inputs, outputs) = (topology.inputs[index].len(), topology.outputs[index].len());
            let expected = match spec.kind {
                ActorKind::Source => (inputs == 0 && outputs > 0, "no inputs, some outputs"),
                ActorKind::Sink => (inputs > 0 && outputs == 0, "some inputs, no outputs"),
                ActorKind::Compute => (inputs > 0, "some inputs"),
                ActorKind::Variable => {
                    (inputs <= 1 && outputs > 0, "at most one input, some outputs")
                }
                ActorKind::Accumulate { pieces } | ActorKind::Repeat { pieces } => (
                    inputs == 1 && outputs > 0 && pieces > 0,
                    "one input, some outputs, pieces > 0",
                ),
                ActorKind::Send => (
                    inputs == 1 && self.sends_to_receive(topology, index),
                    "one input, one output to a Receive on another device",
                ),
                ActorKind::Receive => (
                    inputs == 1
                        && self.edges[topology.inputs[index][0].index()]
                            .producer_kind_is_send(self),
                    "one input from a Send",
                ),
            };
            if !expected.0 {
                return Err(Error::Arity {
                    actor: spec.name.clone(),
                    kind: spec.kind,
                    inputs,
                    outputs,
                    expected: expected.1,
                });
            }
        }
        Ok(())
    }

    fn sends_to_receive(&self, topology: &Topology, index: usize) -> bool {
        let outputs = &topology.outputs[index];
        let [edge] = outputs.as_slice() else { return false };
        let consumers = &self.edges[edge.index()].consumers;
        let [receive] = consumers.as_slice() else { return false };
        let spec = &self.actors[receive.index()];
        spec.kind == ActorKind::Receive && spec.device != self.actors[index].device
    }

    /// How many acts each actor performs in a step of `pieces` pieces, or an error naming an actor
    /// whose inputs arrive at different rates (or an accumulation that does not divide its input).
    pub fn acts_per_step(&self, topology: &Topology, pieces: u64) -> Result<Vec<u64>, Error> {
        let mut produced = vec![0u64; self.actors.len()];
        let mut acts = vec![0u64; self.actors.len()];
        for &actor in &topology.order {
            let index = actor.index();
            let spec = &self.actors[index];
            let input_rate = self.input_rate(topology, actor, &produced)?;
            (acts[index], produced[index]) = match spec.kind {
                ActorKind::Source => (pieces, pieces),
                ActorKind::Variable => (1 + topology.inputs[index].len() as u64, 1),
                ActorKind::Accumulate { pieces: group } => {
                    if input_rate % u64::from(group) != 0 {
                        return Err(Error::Indivisible {
                            actor: spec.name.clone(),
                            rate: input_rate,
                            group,
                        });
                    }
                    (input_rate, input_rate / u64::from(group))
                }
                ActorKind::Repeat { pieces: group } => {
                    (input_rate * u64::from(group), input_rate * u64::from(group))
                }
                _ => (input_rate, input_rate),
            };
        }
        self.check_variable_updates(topology, &produced)?;
        Ok(acts)
    }

    fn input_rate(
        &self,
        topology: &Topology,
        actor: ActorId,
        produced: &[u64],
    ) -> Result<u64, Error> {
        if self.actors[actor.index()].kind == ActorKind::Variable {
            return Ok(1);
        }
        let rates: Vec<(String, u64)> = topology.inputs[actor.index()]
            .iter()
            .map(|edge| {
                let producer = self.edges[edge.index()].producer;
                (self.name(producer), produced[producer.index()])
            })
            .collect();
        match rates.first() {
            Some((_, first)) if rates.iter().any(|(_, rate)| rate != first) => {
                Err(Error::RateMismatch { actor: self.name(actor), rates })
            }
            Some((_, first)) => Ok(*first),
            None => Ok(0),
        }
    }

    fn check_variable_updates(&self, topology: &Topology, produced: &[u64]) -> Result<(), Error> {
        for (index, spec) in self.actors.iter().enumerate() {
            if spec.kind != ActorKind::Variable {
                continue;
            }
            for edge in &topology.inputs[index] {
                let producer = self.edges[edge.index()].producer;
                if produced[producer.index()] != 1 {
                    let rates = vec![(self.name(producer), produced[producer.index()])];
                    return Err(Error::RateMismatch { actor: spec.name.clone(), rates });
                }
            }
        }
        Ok(())
    }
}

impl EdgeSpec {
    fn producer_kind_is_send<P>(&self, plan: &Plan<P>) -> bool {
        plan.actors[self.producer.index()].kind == ActorKind::Send
    }
}

/// What [`Plan::check`] derives from a plan: every actor's input and output edges, every edge's
/// registers, and an order in which producers come before consumers (edges into a variable, its
/// updates, excepted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Per actor, its input edges in edge order.
    pub inputs: Vec<Vec<EdgeId>>,
    /// Per actor, its output edges in edge order.
    pub outputs: Vec<Vec<EdgeId>>,
    /// Per edge, the first of its registers.
    register_base: Vec<u32>,
    /// Per edge, its register count.
    register_count: Vec<u32>,
    /// Actors with producers first.
    pub order: Vec<ActorId>,
}

impl Topology {
    fn build<P>(plan: &Plan<P>) -> Self {
        let mut inputs = vec![Vec::new(); plan.actors.len()];
        let mut outputs = vec![Vec::new(); plan.actors.len()];
        let mut register_base = Vec::with_capacity(plan.edges.len());
        let mut next = 0u32;
        for (index, edge) in plan.edges.iter().enumerate() {
            let id = EdgeId(index_u32(index));
            outputs[edge.producer.index()].push(id);
            for consumer in &edge.consumers {
                inputs[consumer.index()].push(id);
            }
            register_base.push(next);
            next += edge.registers;
        }
        let register_count = plan.edges.iter().map(|edge| edge.registers).collect();
        Self { inputs, outputs, register_base, register_count, order: Vec::new() }
    }

    /// The registers of an edge.
    pub fn registers(&self, edge: EdgeId) -> Range<u32> {
        let base = self.register_base[edge.index()];
        base..base + self.register_count[edge.index()]
    }

    /// The register in `slot` of an edge.
    pub fn register(&self, edge: EdgeId, slot: u32) -> RegisterId {
        RegisterId(self.register_base[edge.index()] + slot)
    }

    /// How many registers the whole plan has: register ids run from 0 to this.
    pub fn register_total(&self) -> u32 {
        self.register_base
            .last()
            .zip(self.register_count.last())
            .map_or(0, |(base, count)| base + count)
    }
}

fn topological_order<P>(plan: &Plan<P>, topology: &Topology) -> Result<Vec<ActorId>, Error> {
    let counts_as_dependency =
        |consumer: ActorId| plan.actors[consumer.index()].kind != ActorKind::Variable;
    let mut waiting: Vec<usize> = (0..plan.actors.len())
        .map(|index| {
            if counts_as_dependency(ActorId(index_u32(index))) {
                topology.inputs[index].len()
            } else {
                0
            }
        })
        .collect();
    let mut ready: Vec<ActorId> = (0..plan.actors.len())
        .filter(|&index| waiting[index] == 0)
        .map(|index| ActorId(index_u32(index)))
        .collect();
    let mut order = Vec::with_capacity(plan.actors.len());
    while let Some(actor) = ready.pop() {
        order.push(actor);
        for edge in &topology.outputs[actor.index()] {
            for &consumer in &plan.edges[edge.index()].consumers {
                if counts_as_dependency(consumer) {
                    waiting[consumer.index()] -= 1;
                    if waiting[consumer.index()] == 0 {
                        ready.push(consumer);
                    }
                }
            }
        }
    }
    if order.len() < plan.actors.len() {
        let left: Vec<bool> = waiting.iter().map(|&count| count > 0).collect();
        let on_cycles = trim_downstream(plan, topology, left);
        let actors = (0..plan.actors.len())
            .filter(|&index| on_cycles[index])
            .map(|index| plan.actors[index].name.clone())
            .collect();
        return Err(Error::Cycle { actors });
    }
    Ok(order)
}

/// Of the actors left after a topological sort (on cycles or fed by one), drops those that feed
/// no other left actor, repeatedly, so that only the actors on cycles remain.
fn trim_downstream<P>(plan: &Plan<P>, topology: &Topology, mut left: Vec<bool>) -> Vec<bool> {
    let feeds = |index: usize, left: &[bool]| {
        topology.outputs[index].iter().any(|edge| {
            plan.edges[edge.index()].consumers.iter().any(|consumer| {
                left[consumer.index()] && plan.actors[consumer.index()].kind != ActorKind::Variable
            })
        })
    };
    while let Some(index) = (0..left.len()).find(|&index| left[index] && !feeds(index, &left)) {
        left[index] = false;
    }
    left
}

/// Converts a table index to the `u32` of an id; plans hold far fewer than 2³² items.
pub(crate) fn index_u32(index: usize) -> u32 {
    u32::try_from(index).expect("plans hold fewer than 2^32 actors, edges and registers")
}
